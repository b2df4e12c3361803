#!/usr/bin/env bash
# The whole test suite: set up, fetch the model and data the tests use, check the converted
# model against real labelled ImageNet images with onnxruntime, then formatting, lints and every
# test of every crate (with the model required, so nothing silently skips).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"
scripts/fetch-model.sh
scripts/fetch-fashion-mnist.sh
.venv-models/bin/python models/verify.py
cargo fmt --all -- --check
cargo clippy --locked --workspace --all-targets -- -D warnings
WSA_REQUIRE_MODEL=1 cargo test --locked --workspace --all-targets
# The wire decoder's fuzz target builds (running it needs nightly + cargo-fuzz: protocol/fuzz/README.md).
CARGO_TARGET_DIR=target/fuzz cargo check --locked --manifest-path protocol/fuzz/Cargo.toml
