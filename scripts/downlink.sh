#!/usr/bin/env bash
# The accuracy cost of an int8 downlink and uplink against f32 both ways (issue 19, part 2):
# the settings of docs/results.md (100 clients, 10 a round, MLP head, 100 rounds, 3 seeds),
# the shipped default strategy, at Dirichlet 0.1 and IID. Three ways to send the head:
#   f32            f32 both ways;
#   int8-keyframes int8 both ways, every task the quantized head (--no-downlink-deltas);
#   int8           int8 both ways, a client holding its last task's head gets the change;
# and two that change the features instead of the wire (issue 19, part 3), f32 both ways:
#   int8-backbone  features from the statically quantized backbone (models/quantize.py);
#   int8w-backbone features from the backbone with int8 weights (models/convert.py).
# Writes docs/results/downlink/<partition>-<variant>/ and downlink.{csv,json} beside them.
#   [VARIANTS="f32 int8-keyframes int8"] scripts/downlink.sh [PART...]
#   VARIANTS="int8-backbone int8w-backbone" scripts/downlink.sh a0.1     (part 3's runs)
#   PART: a0.1 | iid (default: both). A run folder left from an earlier run counts in the table.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked --bin wsa-fl
setup=(--clients 100 --per-round 10 --epochs 5 --batch-size 64 --lr 0.05 --momentum 0.9
  --weight-decay 1e-5 --hidden 256 --train-limit 0 --test-limit 0 --validation-fraction 0.1
  --side 96 --rounds 100 --seeds 0,1,2 --no-centralized --max-scope-ratio 100
  --strategies wsa:100:mean-std:mu=0.1)
parts=("$@")
[ ${#parts[@]} -gt 0 ] || parts=(a0.1 iid)
out=docs/results/downlink
variants=${VARIANTS:-f32 int8-keyframes int8}
for part in "${parts[@]}"; do
  case "$part" in
    a0.1) partition=(--partition dirichlet --alpha 0.1) ;;
    iid) partition=(--partition iid) ;;
    *) echo "unknown partition $part" >&2; exit 2 ;;
  esac
  for variant in $variants; do
    case "$variant" in
      f32) wire=() ;;
      int8-keyframes) wire=(--encoding int8 --downlink-encoding int8 --no-downlink-deltas) ;;
      int8) wire=(--encoding int8 --downlink-encoding int8) ;;
      int8-backbone)
        [ -f models/mobilenet_v2_features_int8.onnx ] || .venv-models/bin/python models/quantize.py
        wire=(--model models/mobilenet_v2_features_int8.onnx) ;;
      int8w-backbone)
        wire=(--model models/mobilenet_v2_features_int8w.onnx) ;;
      *) echo "unknown variant $variant" >&2; exit 2 ;;
    esac
    target/release/wsa-fl "${setup[@]}" "${partition[@]}" "${wire[@]}" --out "$out/$part-$variant"
    # Keep what the table and plots need; credentials, models and logs stay out of git.
    rm -rf "$out/$part-$variant"/{creds,creds-ca,models,partition-seed*.json,rounds.jsonl}
  done
done
python3 - "$out" <<'PY'
import csv, json, statistics, sys
from pathlib import Path
out = Path(sys.argv[1])
# Byte counts come from each run's aggregator-rounds.jsonl, which is not kept in git: a run
# without it keeps the figures the last table recorded.
previous = {}
if (out / "downlink.json").exists():
    previous = {(r["partition"], r["variant"]): r for r in json.load(open(out / "downlink.json"))}
rows = []
for run in sorted(p for p in out.iterdir() if (p / "rounds.csv").exists()):
    part, _, variant = run.name.partition("-")
    by_seed = {}
    for r in csv.DictReader(open(run / "rounds.csv")):
        by_seed.setdefault(int(r["seed"]), []).append(r)
    last10 = {s: statistics.mean(float(r["test_accuracy"]) for r in rs[-10:])
              for s, rs in by_seed.items()}
    jsonl = run / "aggregator-rounds.jsonl"
    wire_keys = ("bytes_out_per_round", "bytes_in_per_round", "delta_tasks_per_round")
    if jsonl.exists():
        out_b = in_b = deltas = n = 0
        for line in open(jsonl):
            d = json.loads(line)
            out_b += d["transport"]["bytes_out"]; in_b += d["wire_bytes_in"]
            deltas += d.get("delta_tasks", 0); n += 1
        wire = dict(zip(wire_keys, (out_b / max(n, 1), in_b / max(n, 1), deltas / max(n, 1))))
    else:
        old = previous.get((part, variant), {})
        wire = {k: old.get(k, 0.0) for k in wire_keys}
    rows.append({"partition": part, "variant": variant,
                 "last10_by_seed": last10,
                 "mean": statistics.mean(last10.values()),
                 "std": statistics.stdev(last10.values()) if len(last10) > 1 else 0.0,
                 **wire})
base = {r["partition"]: r for r in rows if r["variant"] == "f32"}
for r in rows:
    b = base.get(r["partition"])
    if b:
        diffs = [100 * (r["last10_by_seed"][s] - b["last10_by_seed"][s]) for s in b["last10_by_seed"]]
        r["points_vs_f32"] = statistics.mean(diffs)
        r["points_vs_f32_std"] = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
json.dump(rows, open(out / "downlink.json", "w"), indent=1)
with open(out / "downlink.csv", "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["partition", "variant", "last10_mean", "last10_std", "points_vs_f32",
                "points_vs_f32_std", "bytes_out_per_round", "bytes_in_per_round",
                "delta_tasks_per_round"])
    for r in rows:
        w.writerow([r["partition"], r["variant"], f"{r['mean']:.4f}", f"{r['std']:.4f}",
                    f"{r.get('points_vs_f32', 0):+.2f}", f"{r.get('points_vs_f32_std', 0):.2f}",
                    f"{r['bytes_out_per_round']:.0f}", f"{r['bytes_in_per_round']:.0f}",
                    f"{r['delta_tasks_per_round']:.1f}"])
print(open(out / "downlink.csv").read())
PY
# The per-round logs are large; their byte counts now live in downlink.json.
rm -f "$out"/*/aggregator-rounds.jsonl
