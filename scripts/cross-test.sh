#!/usr/bin/env bash
# Tests the ARM edge builds under qemu-user: scripts/cross-test.sh [aarch64|armv7|all] (default
# all). For each target: the pure crates' tests (wsa, protocol, datasets) run under qemu through
# the runners in .cargo/config.toml, then the cross-built edge client (scripts/cross-build.sh)
# joins an x86-64 aggregator on loopback for 2 rounds on real images and its features are
# compared with the x86-64 ones (tests/cross_edge_client.rs).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
which="${1:-all}"
case "$which" in
  aarch64) arches=(aarch64) ;;
  armv7) arches=(armv7) ;;
  all) arches=(aarch64 armv7) ;;
  *) echo "usage: $0 [aarch64|armv7|all]" >&2; exit 2 ;;
esac
scripts/cross-build.sh "$which"
[ -f data/fashion-mnist/t10k-images-idx3-ubyte.gz ] || scripts/fetch-fashion-mnist.sh
for arch in "${arches[@]}"; do
  case "$arch" in
    aarch64) t=aarch64-unknown-linux-gnu ;;
    armv7) t=armv7-unknown-linux-gnueabihf ;;
  esac
  echo "cross-test: pure crates under qemu ($t)"
  cargo test --locked --target "$t" -p wsa -p protocol -p datasets -p support --lib --tests
done
echo "cross-test: edge client under qemu against an x86-64 aggregator (${arches[*]})"
WSA_REQUIRE_MODEL=1 WSA_CROSS_TARGETS=$(IFS=,; echo "${arches[*]}") \
  cargo test --locked --test cross_edge_client -- --nocapture
