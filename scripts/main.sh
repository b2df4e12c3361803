#!/usr/bin/env bash
# The main job: set up, build optimized, run the demo federated comparison. Extra flags are
# passed to the demo (see `--help`).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --release --locked --bin wsa-fl
exec target/release/wsa-fl "$@"
