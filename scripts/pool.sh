#!/usr/bin/env bash
# Virtual clients (docs/benchmarks.md, "A million registered clients"): round time, peak RSS
# and set-up time of a fleet of N registered clients, 100 a round, run by a pool of 2 worker
# processes (`wsa-fl --workers 2`), at N = 10², 10³, 10⁴, 10⁵, 10⁶; and the same 100-client
# fleet with every client connected all run long, the baseline of the round-time target. MLP
# head 1280→256→10 on the Fashion-MNIST features, recipe data (class mix Dirichlet α = 0.1,
# 300–900 rows a client), 1 local epoch, 8 rounds of FedAvg. Needs the model and data
# (scripts/fetch-*.sh). Writes docs/results/pool/{pool.csv,pool.json,pool.png}.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --release --locked --bin wsa-fl
bin=target/release/wsa-fl
runs=runs/pool
docs=docs/results/pool
mkdir -p "$runs" "$docs"
common=(--per-round 100 --partition recipe --rows 600 --alpha 0.1 --rounds 8 --epochs 1
  --hidden 256 --train-limit 0 --test-limit 2000 --strategies fedavg --no-centralized
  --max-scope-ratio 100 --seeds 0)
$bin --clients 100 "${common[@]}" --out "$runs/alive-100"
for n in 100 1000 10000 100000 1000000; do
  $bin --clients "$n" "${common[@]}" --workers 2 --out "$runs/pool-$n"
done
if [ ! -x .venv-models/bin/python ]; then python3 -m venv .venv-models; fi
.venv-models/bin/pip install --quiet "matplotlib==3.10.*"
.venv-models/bin/python - "$runs" "$docs" <<'PY'
import csv, json, statistics, sys
runs, docs = sys.argv[1], sys.argv[2]
rows = []
for name in ["alive-100"] + [f"pool-{n}" for n in (100, 1000, 10000, 100000, 1000000)]:
    summary = json.load(open(f"{runs}/{name}/summary.json"))
    walls = [int(r["wall_ms"]) for r in csv.DictReader(open(f"{runs}/{name}/rounds.csv"))
             if r["failed"] == "false" and int(r["round"]) > 0]
    workers = summary.get("workers_peak_rss_mib", [])
    rows.append({
        "run": name,
        "mode": "pool" if name.startswith("pool") else "all connected",
        "registered": summary["config"]["clients"],
        "rounds_timed": len(walls),
        "round_s_median": statistics.median(walls) / 1e3,
        "round_s_mean": statistics.mean(walls) / 1e3,
        "setup_s": summary.get("setup_seconds", float("nan")),
        "simulator_rss_mib": summary["peak_rss_mib"],
        "workers_rss_mib": sum(workers),
        "total_rss_mib": summary["peak_rss_mib"] + sum(workers),
        "final_test_accuracy": summary["strategies"][0]["final_accuracy"][0],
    })
base = rows[0]["round_s_median"]
for r in rows:
    r["round_vs_all_connected_100"] = r["round_s_median"] / base
with open(f"{docs}/pool.csv", "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
json.dump(rows, open(f"{docs}/pool.json", "w"), indent=2)
print("| registered | mode | round (median, s) | vs 100 connected | set-up (s) | peak RSS, all processes (MiB) |")
print("|---|---|---|---|---|---|")
for r in rows:
    print(f"| {r['registered']:,} | {r['mode']} | {r['round_s_median']:.2f} | "
          f"{r['round_vs_all_connected_100']:.2f}× | {r['setup_s']:.1f} | {r['total_rss_mib']:.0f} |")
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
pool = rows[1:]
fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
a.plot([r["registered"] for r in pool], [r["round_s_median"] for r in pool], "o-", label="pool of 2 workers")
a.axhline(base, color="gray", ls="--", label="100 clients, all connected")
a.axhline(1.5 * base, color="red", ls=":", label="target: 1.5× that")
a.set(xscale="log", xlabel="registered clients (100 a round)", ylabel="round time, median (s)")
a.set_ylim(bottom=0)
a.legend()
b.plot([r["registered"] for r in pool], [r["total_rss_mib"] / 1024 for r in pool], "o-", label="simulator + workers")
b.plot([r["registered"] for r in pool], [r["simulator_rss_mib"] / 1024 for r in pool], "s--", label="simulator (aggregator)")
b.axhline(4, color="red", ls=":", label="target: 4 GiB")
b.set(xscale="log", xlabel="registered clients (100 a round)", ylabel="peak RSS (GiB)")
b.set_ylim(bottom=0)
b.legend()
fig.tight_layout()
fig.savefig(f"{docs}/pool.png", dpi=120)
PY
