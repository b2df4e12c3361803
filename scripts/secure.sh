#!/usr/bin/env bash
# Secure aggregation measurements for docs/privacy.md.
#   scripts/secure.sh accuracy   secure vs plain FedAvg and WSA (+FedProx) at Dirichlet 0.1, the
#                                settings of docs/results.md (100 clients, 10 a round, MLP
#                                head, 100 rounds, 3 seeds); both runs weight clients uniformly
#                                and fuse targets from the clients' scopes (follow-rule), the
#                                choices secure aggregation allows, so the ring code (at the
#                                shipped clip of 1, and at 100) is the only difference.
#   scripts/secure.sh cost       round time and bytes, secure vs plain, at 10, 100 and 1,000
#                                clients a round (every client every round, linear head, IID,
#                                4 rounds of FedAvg), one run after the other.
#   scripts/secure.sh bench      the protocol's CPU and bytes per client and at the aggregator
#                                (cargo bench -p secagg; target/bench/secagg.json).
set -euo pipefail
cd "$(dirname "$0")/.."
part="${1:?accuracy, cost or bench}"
out=docs/results/secure
case "$part" in
  accuracy)
    cargo build --release --locked --bin wsa-fl
    setup=(--clients 100 --per-round 10 --epochs 5 --batch-size 64 --lr 0.05 --momentum 0.9
      --weight-decay 1e-5 --hidden 256 --train-limit 0 --test-limit 0 --validation-fraction 0.1
      --side 96 --rounds 100 --seeds 0,1,2 --no-centralized --max-scope-ratio 100
      --partition dirichlet --alpha 0.1 --weighting uniform --target-fusion follow-rule
      --strategies fedavg,wsa:100:mean-std:mu=0.1)
    target/release/wsa-fl "${setup[@]}" --out "$out/a0.1-plain"
    # The shipped clip (1) binds on this fleet's largest step coordinates; 100 does not, and
    # still codes a 10-client mean to 2.3e-7.
    target/release/wsa-fl "${setup[@]}" --secure --out "$out/a0.1-secure"
    target/release/wsa-fl "${setup[@]}" --secure --secure-clip 100 --out "$out/a0.1-secure-clip100"
    ;;
  cost)
    cargo build --release --locked --bin wsa-fl
    for n in 10 100 1000; do
      setup=(--clients "$n" --per-round "$n" --epochs 1 --batch-size 16 --lr 0.05
        --momentum 0.9 --hidden '' --train-limit 0 --test-limit 0 --side 96 --rounds 4
        --seeds 0 --no-centralized --partition iid --weighting uniform --max-scope-ratio 100
        --target-fusion follow-rule --strategies fedavg)
      target/release/wsa-fl "${setup[@]}" --out "$out/cost-$n-plain"
      target/release/wsa-fl "${setup[@]}" --secure --out "$out/cost-$n-secure"
    done
    ;;
  bench)
    cargo bench --locked -p secagg --bench secagg
    mkdir -p "$out"
    cp target/bench/secagg.json "$out/bench.json"
    ;;
  *) echo "unknown part $part" >&2; exit 2 ;;
esac
