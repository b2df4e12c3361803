#!/usr/bin/env bash
# Fleet scale on this machine (docs/benchmarks.md, "Fleet"): the steady-state round of a
# 100-client fleet (10 per round, 1 epoch, MLP head, Dirichlet α = 0.1, full training set), and
# one-step rounds with 1,000 clients (MLP head, f32) and 10,000 clients (linear head, int8), all
# over real QUIC in one process. Peak RSS comes from /usr/bin/time -v (the whole process:
# aggregator and every client). Needs the model and data (scripts/fetch-*.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --release --locked --bin wsa-fl
bin=target/release/wsa-fl
$bin --clients 100 --per-round 10 --epochs 1 --rounds 12 --train-limit 0 --test-limit 0 \
  --strategies fedavg,wsa:10 --no-centralized --out runs/steady100
/usr/bin/time -v $bin --clients 1000 --per-round 1000 --rounds 3 --epochs 1 --batch-size 64 \
  --partition iid --train-limit 0 --test-limit 2000 --strategies fedavg --no-centralized \
  --out runs/scale1000 2> runs/scale1000.time
/usr/bin/time -v $bin --clients 10000 --per-round 10000 --rounds 2 --epochs 1 --batch-size 64 \
  --partition iid --min-size 1 --train-limit 0 --test-limit 2000 --strategies fedavg \
  --no-centralized --hidden '' --encoding int8 --out runs/scale10000 2> runs/scale10000.time
# The same with the clients in 4 other processes: the aggregator's own peak RSS.
$bin --clients 10000 --per-round 10000 --rounds 2 --epochs 1 --batch-size 64 --partition iid \
  --min-size 1 --train-limit 0 --test-limit 2000 --strategies fedavg --no-centralized \
  --hidden '' --encoding int8 --client-processes 4 --out runs/scale10000-apart
# Load (docs/reliability.md): 1,000 clients in 4 other processes, all in each of 20 rounds.
$bin --clients 1000 --per-round 1000 --rounds 20 --epochs 1 --batch-size 64 --partition iid \
  --train-limit 0 --test-limit 2000 --strategies fedavg --no-centralized --client-processes 4 \
  --out runs/load1000
for run in steady100 scale1000 scale10000 scale10000-apart load1000; do
  echo "== $run"
  python3 - "runs/$run/aggregator-rounds.jsonl" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    d = json.loads(line); t = d["transport"]
    print(f"round {d['round']}: {d['accepted_count']} accepted in {d['duration_ms']} ms, "
          f"engine {t['engine_update_us'] / max(1, t['engine_updates']):.0f} µs/update, "
          f"{t['bytes_out'] / 1e6:.0f} MB out, {d['wire_bytes_in'] / 1e6:.0f} MB in")
PY
done
grep -h "Maximum resident" runs/scale*.time
