#!/usr/bin/env python3
"""Compares the rounds.csv of two fleet runs (`wsa-fl`) for a change that should not change
results: scripts/compare-rounds.py BEFORE/rounds.csv AFTER/rounds.csv

The model's trajectory (test and validation accuracy, test loss, accepted updates, rounds,
seeds, strategies) must match bit for bit (the CSV holds Rust's shortest round-tripping
decimals); exit status 1 otherwise. Two columns differ between two runs of one build and are
only reported: train_loss and mean_kl in the last bit (builds before 2026-11-30 summed the
clients' reported metrics in arrival order; they are now summed in client order) and bytes_in by a few bytes (updates carry their training time as a
varint). wall_ms is left out. Labels written before 2026-11-30 (`wsa(lambda=10,MeanStd)`) are
mapped to the current spelling (`wsa:10:mean-std`)."""
import csv, re, sys

def new_label(label):
    rules = {"MeanStd": "mean-std", "RootMeanVar": "root-mean-var", "Mixture": "mixture"}
    label = re.sub(r"wsa\(lambda=([^,]+),(\w+)\)", lambda m: f"wsa:{m.group(1)}:{rules[m.group(2)]}", label)
    label = re.sub(r"fedprox\(mu=([^)]+)\)", r"fedprox:\1", label)
    label = re.sub(r"clip\(([^)]+)\)", r"clip:\1", label)
    label = re.sub(r"trimmed\(([^)]+)\)", r"trimmed:\1", label)
    return label

def rows(path):
    with open(path) as f:
        out = list(csv.DictReader(f))
    for r in out:
        r["strategy"] = new_label(r["strategy"])
    return out

EXACT = ["strategy", "seed", "round", "test_accuracy", "validation_accuracy", "test_loss", "accepted"]
a, b = rows(sys.argv[1]), rows(sys.argv[2])
ok = len(a) == len(b)
print(f"{len(a)} vs {len(b)} rows")
for k in EXACT:
    d = sum(1 for x, y in zip(a, b) if x[k] != y[k])
    ok &= d == 0
    print(f"  {k}: {d} differing")
for k in ["train_loss", "mean_kl"]:
    rel = 0.0
    for x, y in zip(a, b):
        u, v = float(x[k]), float(y[k])
        if u == u and v == v and u != v:
            rel = max(rel, abs(u - v) / max(abs(u), abs(v)))
    print(f"  {k}: largest relative difference {rel:.1e}")
d = max(abs(int(x["bytes_in"]) - int(y["bytes_in"])) for x, y in zip(a, b))
print(f"  bytes_in: largest difference {d} bytes")
print("model trajectory identical" if ok else "MODEL TRAJECTORY DIFFERS")
sys.exit(0 if ok else 1)
