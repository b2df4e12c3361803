#!/usr/bin/env bash
# Builds the edge client for ARM boards: scripts/cross-build.sh [aarch64|armv7|all] (default all).
#
# Installs what is missing (Debian cross gcc + libc, qemu-user, the rust targets), converts the
# backbone to NNEF on the host (the ARM builds carry no ONNX front end), builds with the
# size-tuned `edge` profile and writes, per target,
#   dist/<target>/edge-client             the stripped binary
#   dist/<target>/edge-client.sha256
#   dist/<target>/build.json              size in bytes, sha256, cold-or-warm build seconds
# and, shared by all targets, dist/mobilenet_v2_features.nnef.tgz (the backbone) and the
# deployment examples from edge-client/deploy/ (client.toml, edge-client.service).
# Linkers and qemu runners come from .cargo/config.toml.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

case "${1:-all}" in
  aarch64) arches=(aarch64) ;;
  armv7) arches=(armv7) ;;
  all) arches=(aarch64 armv7) ;;
  *) echo "usage: $0 [aarch64|armv7|all]" >&2; exit 2 ;;
esac

triple() { case "$1" in aarch64) echo aarch64-unknown-linux-gnu ;; armv7) echo armv7-unknown-linux-gnueabihf ;; esac; }

need_apt=()
for arch in "${arches[@]}"; do
  case "$arch" in
    aarch64)
      command -v aarch64-linux-gnu-gcc >/dev/null 2>&1 || need_apt+=(gcc-aarch64-linux-gnu)
      [ -e /usr/aarch64-linux-gnu/lib/libc.so.6 ] || need_apt+=(libc6-dev-arm64-cross)
      command -v qemu-aarch64 >/dev/null 2>&1 || need_apt+=(qemu-user)
      ;;
    armv7)
      command -v arm-linux-gnueabihf-gcc >/dev/null 2>&1 || need_apt+=(gcc-arm-linux-gnueabihf)
      [ -e /usr/arm-linux-gnueabihf/lib/libc.so.6 ] || need_apt+=(libc6-dev-armhf-cross)
      command -v qemu-arm >/dev/null 2>&1 || need_apt+=(qemu-user)
      ;;
  esac
done
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "cross-build: installing ${need_apt[*]} with apt-get"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}"
fi
installed=$(rustup target list --installed)
for arch in "${arches[@]}"; do
  t=$(triple "$arch")
  grep -qx "$t" <<<"$installed" || rustup target add "$t"
done

# The backbone as NNEF, converted by a host build of the client (the dev profile is enough:
# tract itself is compiled optimized there, see Cargo.toml).
nnef=models/mobilenet_v2_features.nnef.tgz
if [ ! -f "$nnef" ] || [ models/mobilenet_v2_features.onnx -nt "$nnef" ]; then
  [ -f models/mobilenet_v2_features.onnx ] || scripts/fetch-model.sh
  cargo run --locked --quiet -p edge-client -- convert-model \
    --onnx models/mobilenet_v2_features.onnx --out "$nnef"
fi
mkdir -p dist
cp "$nnef" edge-client/deploy/client.toml edge-client/deploy/edge-client.service dist/

for arch in "${arches[@]}"; do
  t=$(triple "$arch")
  # Cold when target/<triple>/edge does not exist yet; build.json says which.
  if [ -d "target/$t/edge" ]; then kind=warm; else kind=cold; fi
  start=$(date +%s)
  cargo build --locked --profile edge -p edge-client --no-default-features --bin edge-client \
    --target "$t"
  seconds=$(($(date +%s) - start))
  mkdir -p "dist/$t"
  cp "target/$t/edge/edge-client" "dist/$t/edge-client"
  (cd "dist/$t" && sha256sum edge-client > edge-client.sha256)
  size=$(stat -c %s "dist/$t/edge-client")
  sha=$(cut -d' ' -f1 "dist/$t/edge-client.sha256")
  printf '{"target":"%s","bytes":%s,"sha256":"%s","build_seconds":%s,"build":"%s"}\n' \
    "$t" "$size" "$sha" "$seconds" "$kind" > "dist/$t/build.json"
  echo "cross-build: dist/$t/edge-client  $((size / 1024)) KiB  sha256 $sha  ($kind build, ${seconds}s)"
done
