#!/usr/bin/env bash
# wsa-fl against Flower's simulation: the same federated training run by each, one after the
# other, on this machine. MLP head 1280→256→10 on the cached Fashion-MNIST features (96 px,
# all 60k training and 10k test rows), 100 clients (Dirichlet α = 0.1), 10 a round, 1 local
# epoch (batch 64, lr 0.05, momentum 0.9, weight decay 1e-5), FedAvg weighted by sample
# count, the global head evaluated on the 10k test rows after every round, no federated
# evaluation. wsa-fl runs first and writes its partition; Flower (1.42, Ray backend, numpy
# head in scripts/flower_sim.py) gives its client i the same rows as wsa-fl's client i.
# Which clients a round samples differs (each framework draws its own), hence the noise in
# the accuracies. Prints, per side, the total wall time, the first and the median round
# time, rounds per second after the first round, the test accuracy (final, and the mean of
# the last 5 rounds), and the Flower/wsa-fl ratios of the times. Needs the model and data
# (scripts/fetch-*.sh) or the feature caches in cache/; installs Flower in .venv-flower.
# Writes runs/flower-compare/ and docs/results/flower/{compare.json,compare.csv,compare.png}.
#   scripts/compare-flower.sh [--rounds N]   (default 20)
#
# What a round's time holds, on each side:
#   wsa-fl  rounds.csv wall_ms: from the round opening until its last update arrives. The
#           engine opens round r in the same step, at the same clock reading, that closed
#           round r−1 (finished its fold, evaluated the new head on the 10k test rows), so
#           round r ≥ 1 holds that closing and evaluation, the task broadcast, the 10 clients'
#           training and their uploads. Round 0 holds no evaluation; the last round's closing
#           is in no round.
#   Flower  the time between the ends of consecutive centralized evaluations (evaluate_fn):
#           round r holds the 10 clients' training (on Ray actors), the aggregation and round
#           r's 10k-row test evaluation. Round 1 also holds Ray's start-up and the actors'
#           creation: the ServerApp evaluates the initial head (round 0) before Ray is up.
#   So in both a steady round is training of 10 clients + aggregation + one 10k evaluation;
#   the medians compare like with like. Total wall time is each whole process: wsa-fl's
#   includes reading the data, checking the feature caches and the QUIC/TLS set-up of 100
#   clients; Flower's includes importing Flower and starting Ray and its actors.
# Threads: wsa-fl as shipped. Flower: Ray gets every CPU (2 here), 1 CPU per client, so 2
# client actors train at once; BLAS/OpenMP pinned to 1 thread in every process (no
# oversubscription of the 2 actors; the server's evaluation runs on 1 thread too).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
rounds=20
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) rounds="$2"; shift 2 ;;
    *) echo "usage: $0 [--rounds N]" >&2; exit 2 ;;
  esac
done
runs=runs/flower-compare
docs=docs/results/flower
mkdir -p "$runs" "$docs"

cargo build --release --locked --bin wsa-fl
rm -rf "$runs/wsa-fl"
start=$(date +%s.%N)
target/release/wsa-fl --clients 100 --per-round 10 --epochs 1 --rounds "$rounds" --batch-size 64 \
  --lr 0.05 --momentum 0.9 --weight-decay 1e-5 --hidden 256 --train-limit 0 --test-limit 0 \
  --validation-fraction 0 --side 96 --partition dirichlet --alpha 0.1 --seeds 0 \
  --strategies fedavg --no-centralized --max-scope-ratio 100 --out "$runs/wsa-fl"
end=$(date +%s.%N)
wsa_total=$(awk "BEGIN { print $end - $start }")

if [ ! -x .venv-flower/bin/python ]; then python3 -m venv .venv-flower; fi
if ! .venv-flower/bin/python -c 'import importlib.metadata as m, numpy, ray, matplotlib
assert m.version("flwr") == "1.42.0"' 2>/dev/null; then
  .venv-flower/bin/pip install --quiet "flwr[simulation]==1.42.0" numpy "matplotlib==3.10.*"
fi
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1
export FLWR_TELEMETRY_ENABLED=0 RAY_USAGE_STATS_ENABLED=0 RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=0
# The feature caches wsa-fl built, named by the backbone's sha256 (first 6 bytes).
backbone=$(sha256sum models/mobilenet_v2_features.onnx | cut -c1-12)
start=$(date +%s.%N)
.venv-flower/bin/python scripts/flower_sim.py --rounds "$rounds" \
  --partition "$runs/wsa-fl/partition-seed0.json" \
  --train "cache/fashion-mnist-train-96-60000-$backbone.feat" \
  --test "cache/fashion-mnist-test-96-10000-$backbone.feat" \
  --out "$runs/flower.json"
end=$(date +%s.%N)
flower_total=$(awk "BEGIN { print $end - $start }")

.venv-flower/bin/python - "$runs" "$docs" "$wsa_total" "$flower_total" <<'PY'
import csv, json, statistics, sys
runs, docs, wsa_total, flower_total = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
wsa = [r for r in csv.DictReader(open(f"{runs}/wsa-fl/rounds.csv"))
       if r["strategy"] == "fedavg" and r["failed"] == "false"]
flower = json.load(open(f"{runs}/flower.json"))

def side(name, total, seconds, accuracy):
    # Rounds per second without the first round, which holds Flower's Ray start-up.
    return {"framework": name, "rounds": len(seconds), "total_s": total,
            "round_s_median": statistics.median(seconds),
            "round_s_mean": statistics.mean(seconds),
            "first_round_s": seconds[0],
            "rounds_per_s": (len(seconds) - 1) / sum(seconds[1:]) if len(seconds) > 1 else 1 / seconds[0],
            "final_test_accuracy": accuracy[-1],
            "last5_test_accuracy": statistics.mean(accuracy[-5:])}

rows = [
    side("wsa-fl", wsa_total, [int(r["wall_ms"]) / 1e3 for r in wsa],
         [float(r["test_accuracy"]) for r in wsa]),
    side("flower", flower_total, [r["seconds"] for r in flower["rounds"]],
         [r["test_accuracy"] for r in flower["rounds"]]),
]
w, f = rows
ratios = {"round_s_median": f["round_s_median"] / w["round_s_median"],
          "total_s": f["total_s"] / w["total_s"]}
json.dump({"sides": rows, "flower_over_wsa_fl": ratios, "flower_versions": flower["versions"],
           "flower_threads": flower["threads"],
           "per_round": {"wsa-fl": [{"round": int(r["round"]) + 1, "seconds": int(r["wall_ms"]) / 1e3,
                                     "test_accuracy": float(r["test_accuracy"])} for r in wsa],
                         "flower": flower["rounds"]}},
          open(f"{docs}/compare.json", "w"), indent=1)
with open(f"{docs}/compare.csv", "w", newline="") as out:
    wr = csv.DictWriter(out, fieldnames=list(rows[0]))
    wr.writeheader()
    wr.writerows(rows)
print("| | rounds | total (s) | first round (s) | round, median (s) | rounds/s after the first "
      "| final test acc | last 5 mean |")
print("|---|---|---|---|---|---|---|---|")
for r in rows:
    print(f"| {r['framework']} | {r['rounds']} | {r['total_s']:.1f} | {r['first_round_s']:.2f} | "
          f"{r['round_s_median']:.3f} | {r['rounds_per_s']:.2f} | {r['final_test_accuracy']:.4f} | "
          f"{r['last5_test_accuracy']:.4f} |")
print(f"Flower/wsa-fl: median round {ratios['round_s_median']:.2f}×, total {ratios['total_s']:.2f}× "
      f"(flwr {flower['versions']['flwr']}, ray {flower['versions']['ray']})")
PY
# The per-round figures as a picture beside the numbers.
.venv-flower/bin/python - "$docs" <<'PY'
import json, sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
docs = sys.argv[1]
per_round = json.load(open(f"{docs}/compare.json"))["per_round"]
fig, (time_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 3.8))
for name, rounds in per_round.items():
    x = [r["round"] for r in rounds]
    time_ax.plot(x, [r["seconds"] for r in rounds], marker=".", label=name)
    acc_ax.plot(x, [r["test_accuracy"] for r in rounds], marker=".", label=name)
time_ax.set(xlabel="round", ylabel="seconds", yscale="log",
            title="round time (Flower's first holds Ray's start-up)")
acc_ax.set(xlabel="round", ylabel="test accuracy (10k rows)", title="accuracy after each round")
for ax in (time_ax, acc_ax):
    ax.grid(alpha=0.3)
    ax.legend()
fig.tight_layout()
fig.savefig(f"{docs}/compare.png", dpi=110)
print(f"plot: {docs}/compare.png")
PY
