#!/usr/bin/env bash
# The whole test suite: set up, fetch the model and data the tests use, check the converted
# model against real labelled ImageNet images with onnxruntime, then formatting, lints and every
# test of every crate (with the model required, so nothing silently skips), then the ARM edge
# build under qemu.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"
scripts/fetch-model.sh
scripts/fetch-fashion-mnist.sh
.venv-models/bin/python models/verify.py
cargo fmt --all -- --check
cargo clippy --locked --workspace --all-targets -- -D warnings
# The ARM builds' configuration: the edge client without the ONNX front end.
cargo clippy --locked -p edge-client --no-default-features --all-targets -- -D warnings
# tract's threading within one image, off by default (docs/benchmarks.md): kept compiling.
cargo clippy --locked -p edge-client --features multithread-mm --example profile_backbone -- -D warnings
WSA_REQUIRE_MODEL=1 cargo test --locked --workspace --all-targets
# The CUDA backend (crate aggregator-cuda, a workspace member) builds, lints and runs its tests
# above without a GPU or the CUDA toolkit (cudarc loads the driver at run time; its tests say
# "skipped: no CUDA driver" here and run for real on a GPU host: scripts/gpu-check.sh). The
# aggregator's `cuda` feature, which wires it in, is linted too.
cargo clippy --locked -p aggregator --features cuda --all-targets -- -D warnings
# ARM: the pure crates' tests under qemu-aarch64 and the cross-built client against an x86-64
# aggregator. aarch64 only, for time (a cold cross build is ~6 min on 2 cores);
# WSA_CROSS=all adds armv7, WSA_CROSS=none skips.
case "${WSA_CROSS:-aarch64}" in
  none) ;;
  *) scripts/cross-test.sh "${WSA_CROSS:-aarch64}" ;;
esac
# The fuzz targets build (running them needs nightly + cargo-fuzz: scripts/fuzz.sh).
CARGO_TARGET_DIR=target/fuzz cargo check --locked --manifest-path fuzz/Cargo.toml --bins
