#!/usr/bin/env bash
# The accuracy cost of an int8 downlink and uplink against f32 both ways (issue 19, part 2):
# the settings of docs/results.md (100 clients, 10 a round, MLP head, 100 rounds, 3 seeds),
# the shipped default strategy, at Dirichlet 0.1 and IID.
#   scripts/downlink.sh [PART...]   PART: a0.1 | iid (default: both)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked --bin wsa-fl
setup=(--clients 100 --per-round 10 --epochs 5 --batch-size 64 --lr 0.05 --momentum 0.9
  --weight-decay 1e-5 --hidden 256 --train-limit 0 --test-limit 0 --validation-fraction 0.1
  --side 96 --rounds 100 --seeds 0,1,2 --no-centralized --max-scope-ratio 100
  --strategies wsa:100:mean-std:mu=0.1)
parts=("$@")
[ ${#parts[@]} -gt 0 ] || parts=(a0.1 iid)
for part in "${parts[@]}"; do
  case "$part" in
    a0.1) partition=(--partition dirichlet --alpha 0.1) ;;
    iid) partition=(--partition iid) ;;
    *) echo "unknown partition $part" >&2; exit 2 ;;
  esac
  for enc in f32 int8; do
    target/release/wsa-fl "${setup[@]}" "${partition[@]}" --encoding "$enc" \
      --downlink-encoding "$enc" --out "docs/results/downlink/$part-$enc"
  done
done
