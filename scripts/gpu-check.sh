#!/usr/bin/env bash
# The CUDA backend's checks on a GPU host, in two steps, because the GPU host builds nothing:
#
#   scripts/gpu-check.sh build   here: release-build the CUDA tests (crate aggregator-cuda) and
#                                the fold bench (crate aggregator, feature cuda) and copy the
#                                executables to target/gpu-check/ under stable names
#                                (cuda_backend, cuda-lib, fold);
#   scripts/gpu-check.sh run     on the GPU host, from the repo root, with target/gpu-check/
#                                carried over: nvidia-smi, the CUDA-vs-CPU tests, the CUDA
#                                crate's unit tests, then the fold bench. Logs go to $OUT when it is
#                                set (else target/gpu-check/), fold.json to $OUT (else
#                                target/bench/).
#
# Exits non-zero when a build, a test or the bench fails.
set -euo pipefail
cd "$(dirname "$0")/.."

dest=target/gpu-check

# The executable of one target from cargo's JSON messages (test executables are named by a
# hash, so the messages are the only reliable map): file, target kind, target name. Python,
# which setup.sh installs, reads them.
executable() {
  python3 - "$@" <<'PY'
import json, sys
path, kind, name = sys.argv[1:4]
found = ""
for line in open(path):
    m = json.loads(line)
    t = m.get("target", {})
    if m.get("reason") == "compiler-artifact" and m.get("executable") and kind in t.get("kind", []) and t.get("name") == name:
        found = m["executable"]
print(found)
PY
}

build() {
  scripts/setup.sh
  export PATH="$HOME/.cargo/bin:$PATH"
  mkdir -p "$dest"
  cargo test --locked -p aggregator-cuda --release --no-run \
    --message-format=json >"$dest/test-build.json"
  cargo build --locked -p aggregator --features cuda --release --bench fold \
    --message-format=json >"$dest/bench-build.json"
  local name kind target file exe
  for name in cuda_backend:test:cuda_backend cuda-lib:lib:aggregator_cuda fold:bench:fold; do
    IFS=: read -r file kind target <<<"$name"
    case $kind in
      bench) exe=$(executable "$dest/bench-build.json" "$kind" "$target") ;;
      *) exe=$(executable "$dest/test-build.json" "$kind" "$target") ;;
    esac
    if [[ -z "$exe" || ! -x "$exe" ]]; then
      echo "gpu-check: no executable for the $kind target $target" >&2
      exit 1
    fi
    cp "$exe" "$dest/$file"
    echo "gpu-check: $dest/$file <- $exe"
  done
}

# cudarc (built for the CUDA 12.8 API) opens NVRTC as libnvrtc.so or libnvrtc.so.12 (or
# older) through the loader's search path. A CUDA 13 toolkit ships libnvrtc.so.13, often in
# a directory outside that path: put the directory on LD_LIBRARY_PATH, with a libnvrtc.so
# link to the library found (NVRTC then finds its builtins library beside it).
find_nvrtc() {
  local lib
  lib=$({
    ldconfig -p 2>/dev/null | awk '/libnvrtc\.so/ { print $NF }'
    ls -1 /usr/local/cuda/lib64/libnvrtc.so* /usr/local/cuda*/targets/*/lib/libnvrtc.so* \
      2>/dev/null
  } | grep -v -e builtins -e '\.alt\.' | sort -V | tail -n 1 || true)
  if [[ -z "$lib" ]]; then
    echo "gpu-check: no libnvrtc found; the CUDA backend will say so" >&2
    return
  fi
  local links="$PWD/$dest/lib"
  mkdir -p "$links"
  ln -sf "$lib" "$links/libnvrtc.so"
  export LD_LIBRARY_PATH="$links:$(dirname "$lib")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  echo "gpu-check: NVRTC $lib"
}

run() {
  local logs="${OUT:-$dest}"
  mkdir -p "$logs"
  export RUST_BACKTRACE=1
  # Informational: a missing nvidia-smi is not a failure, the tests say whether CUDA works.
  nvidia-smi 2>&1 | tee "$logs/nvidia-smi.txt" || echo "gpu-check: nvidia-smi failed" >&2
  find_nvrtc
  local status=0
  # One test at a time, output shown: the log reads in order and names the device.
  "$dest/cuda_backend" --test-threads=1 --nocapture 2>&1 | tee "$logs/cuda_backend.log" ||
    status=1
  "$dest/cuda-lib" 2>&1 | tee "$logs/lib-tests.log" || status=1
  "$dest/fold" --bench --out "${OUT:-target/bench}" 2>&1 | tee "$logs/fold.log" || status=1
  if [[ $status -ne 0 ]]; then
    echo "gpu-check: FAILED (logs in $logs)" >&2
  else
    echo "gpu-check: passed (logs in $logs)"
  fi
  exit "$status"
}

case "${1:-}" in
  build) build ;;
  run) run ;;
  *)
    echo "usage: $0 build|run" >&2
    exit 2
    ;;
esac
