#!/usr/bin/env bash
# The WSA experiment of docs/results.md, step by step. Fashion-MNIST, full train (10% held out
# as validation) and test, 96², MLP 1280→256→10, 100 clients, 10 per round, 5 local epochs,
# batch 64, SGD lr 0.05, momentum 0.9, weight decay 1e-5, 100 rounds, seeds 0,1,2.
#   scripts/experiment.sh sweep            λ sweep at Dirichlet α = 0.1 (choose λ on validation)
#   scripts/experiment.sh grid LAMBDA      all strategies at α = 0.1, 0.5 and IID with that λ
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --release --locked --bin wsa-fl
common=(--clients 100 --per-round 10 --epochs 5 --batch-size 64 --lr 0.05 --momentum 0.9
  --weight-decay 1e-5 --rounds 100 --seeds 0,1,2 --hidden 256 --train-limit 0 --test-limit 0
  --validation-fraction 0.1 --side 96)
case "${1:-}" in
  sweep)
    target/release/wsa-fl "${common[@]}" --partition dirichlet --alpha 0.1 --no-centralized \
      --strategies fedavg,wsa:1,wsa:10,wsa:30,wsa:100,wsa:300,wsa:1000 --out runs/exp-sweep-a0.1
    ;;
  grid)
    lambda="${2:?usage: experiment.sh grid LAMBDA}"
    strategies="fedavg,fedprox:0.01,fedprox:0.1,wsa:$lambda:mean-std,wsa:$lambda:root-mean-var,wsa:$lambda:mixture"
    target/release/wsa-fl "${common[@]}" --partition dirichlet --alpha 0.1 --strategies "$strategies" --out runs/exp-a0.1
    target/release/wsa-fl "${common[@]}" --partition dirichlet --alpha 0.5 --strategies "$strategies" --out runs/exp-a0.5
    target/release/wsa-fl "${common[@]}" --partition iid --strategies "$strategies" --out runs/exp-iid
    ;;
  *) echo "usage: $0 sweep | grid LAMBDA" >&2; exit 2 ;;
esac
