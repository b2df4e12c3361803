#!/usr/bin/env python3
"""The DP table of docs/privacy.md from scripts/privacy.sh's run folders.

scripts/privacy-table.py docs/results/privacy
Prints a markdown table (last-10 mean test accuracy and the epsilon spent, per partition,
strategy and budget) and writes summary.csv beside the run folders."""
import csv
import math
import pathlib
import sys

root = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "docs/results/privacy")
rows = []
for run in sorted(p for p in root.iterdir() if (p / "rounds.csv").exists()):
    part, _, _, budget = run.name.split("-", 3)
    with open(run / "rounds.csv") as f:
        data = [r for r in csv.DictReader(f) if r["failed"] == "false"]
    for strategy in dict.fromkeys(r["strategy"] for r in data):
        runs = [r for r in data if r["strategy"] == strategy]
        last = [float(r["test_accuracy"]) for r in runs[-10:]]
        eps = float(runs[-1]["epsilon"])
        rows.append({
            "partition": part,
            "budget": budget,
            "strategy": strategy,
            "rounds": len(runs),
            "last10_test_accuracy": sum(last) / len(last),
            "final_test_accuracy": float(runs[-1]["test_accuracy"]),
            "epsilon": eps,
        })
with open(root / "summary.csv", "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
order = {"nodp": 0, "eps8": 1, "eps4": 2, "eps1": 3}
print("| partition | strategy | no DP | ε = 8 | ε = 4 | ε = 1 |")
print("|---|---|---|---|---|---|")
for part in dict.fromkeys(r["partition"] for r in rows):
    for strategy in dict.fromkeys(r["strategy"] for r in rows if r["partition"] == part):
        cells = {r["budget"]: r for r in rows if r["partition"] == part and r["strategy"] == strategy}
        out = []
        for b in sorted(order, key=order.get):
            r = cells.get(b)
            if r is None:
                out.append("—")
            elif math.isnan(r["epsilon"]):
                out.append(f"{r['last10_test_accuracy']:.3f}")
            else:
                out.append(f"{r['last10_test_accuracy']:.3f} (ε {r['epsilon']:.2f}, {r['rounds']} r)")
        print(f"| {part} | {strategy} | " + " | ".join(out) + " |")
