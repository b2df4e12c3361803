#!/usr/bin/env bash
# The main job: set up, fetch the model and Fashion-MNIST, build optimized, then run the fleet
# simulator's demo (20 clients over QUIC, Dirichlet α = 0.1, FedAvg vs WSA, 20 rounds, plus a
# centralized bound). Extra flags go to the simulator (`target/release/wsa-fl --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"
scripts/fetch-model.sh
scripts/fetch-fashion-mnist.sh
cargo build --release --locked --bin wsa-fl
exec target/release/wsa-fl "$@"
