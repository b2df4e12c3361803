#!/usr/bin/env bash
# Benchmarks that write JSON under target/bench/ (see docs/benchmarks.md).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"
cargo bench --locked -p wsa --bench train_epoch
