#!/usr/bin/env bash
# The main job: set up, fetch the model and Fashion-MNIST, build optimized, then run the fleet
# simulator's demo (20 clients over QUIC, Dirichlet α = 0.1, 40 rounds of FedAvg, FedProx and
# the shipped WSA + FedProx, plus a centralized bound), and end by classifying a dozen test
# images with the WSA run's final model through `edge-client predict` (the run folder's
# predictions.png). Extra flags go to the simulator (`target/release/wsa-fl --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"
scripts/fetch-model.sh --main-only
scripts/fetch-fashion-mnist.sh
cargo build --release --locked -p wsa-fl -p edge-client
target/release/wsa-fl "$@"

# The run folder (--out, if given) and the first WSA model in it, seed 0's.
out=runs/fleet
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  case "${args[i]}" in
    --out) out="${args[i + 1]:-$out}" ;;
    --out=*) out="${args[i]#--out=}" ;;
  esac
done
model=$(ls -d "$out"/models/wsa*-seed* 2>/dev/null | head -n 1 || true)
if [ -n "$model" ] && [ -z "$(printf '%s\n' "$@" | grep -E '^--(synthetic|dataset)' || true)" ]; then
  echo "classifying 12 Fashion-MNIST test images with $model through edge-client predict:"
  target/release/wsa-fl showcase --model "$model" --out "$out"
fi
