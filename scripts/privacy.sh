#!/usr/bin/env bash
# Client-level DP measurements for docs/privacy.md: FedAvg and WSA (the shipped default, WSA
# with FedProx's term) on Fashion-MNIST features, 1,000 clients of 60 rows, 100 asked a round,
# at epsilon 1, 4 and 8 (delta = 1/1000) after ROUNDS rounds, next to the same runs without DP.
#   scripts/privacy.sh PART [ROUNDS] [HIDDEN]   PART: shards | iid; HIDDEN: '' (linear) or 256
# Non-IID is McMahan's shards (two classes a client): the Dirichlet partition (per class over
# clients) finds no α = 0.1 draw that gives 1,000 (or 300) clients 10 rows each.
# The noise multipliers that reach each epsilon at q = 0.1 come from the accountant
# (scripts/dp-reference.py's package agrees): 50 rounds 2.329 / 1.014 / 0.744,
# 100 rounds 3.107 / 1.217 / 0.883. The budget flag stops a run at its epsilon.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked --bin wsa-fl
part="${1:?shards or iid}"
rounds="${2:-50}"
hidden="${3:-}"
case "$part" in
  shards) partition=(--partition shards) ;;
  iid) partition=(--partition iid) ;;
  *) echo "unknown partition $part" >&2; exit 2 ;;
esac
case "$rounds" in
  50) z=(2.329 1.014 0.744) ;;
  100) z=(3.107 1.217 0.883) ;;
  *) echo "noise multipliers are tabled for 50 or 100 rounds" >&2; exit 2 ;;
esac
eps=(1 4 8)
setup=(--clients 1000 --per-round 100 --epochs 5 --batch-size 16 --lr 0.05 --momentum 0.9
  --weight-decay 1e-5 --hidden "$hidden" --train-limit 0 --test-limit 0 --side 96
  --rounds "$rounds" --seeds 0 --no-centralized --max-scope-ratio 100
  --strategies fedavg,wsa:100:mean-std:mu=0.1 "${partition[@]}")
name="h${hidden:-lin}-r$rounds"
out=docs/results/privacy/$part-$name
# Under DP the targets are the noised head's own scopes (wsa-fl's default with --dp-noise);
# without, the median of the clients' (the shipped default).
[ -d "$out-nodp" ] || target/release/wsa-fl "${setup[@]}" --out "$out-nodp"
for i in 0 1 2; do
  target/release/wsa-fl "${setup[@]}" --dp-noise "${z[$i]}" --dp-clip adaptive:1 \
    --dp-delta 1e-3 --dp-budget "${eps[$i]}.0001" --out "$out-eps${eps[$i]}"
done
