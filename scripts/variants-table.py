#!/usr/bin/env python3
"""The variant tables of docs/results.md (issue 17) from wsa-fl run folders:
scripts/variants-table.py FOLDER [FOLDER...] [--sort validation|test]

One row per run (strategy, and the folder's aggregator flags when they are not the defaults):
mean over seeds of the last-10-round test and validation accuracy (± std over the seeds), and
the client-drift figures of the same rounds: the mean cosine between a client's step and the
round's step, how much of the clients' movement survived the average (step agreement), and
the spread of the clients' scope σ (coefficient of variation, averaged over tensors). Failed
round attempts (below quorum, retried) are counted. Sorted by validation accuracy: choices are
made on it, never on the test set. Writes the table to stdout and every row to
variants-table.csv in the current folder."""
import csv, json, math, os, sys


def mean_std(values):
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return float("nan"), float("nan")
    m = sum(values) / len(values)
    # The sample std over seeds, as wsa-fl's tables give it.
    n = max(len(values) - 1, 1)
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / n)


def flags(config):
    """The aggregator settings a folder changed from wsa-fl's defaults, as flags."""
    out = []
    targets = config.get("targets") or {}
    fusion = (targets.get("fusion") or {}).get("kind", "median")
    if fusion != "median":
        out.append(f"--target-fusion {fusion}")
    if targets.get("align_head"):
        out.append("--align-head")
    return " ".join(out)


def load(folder):
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    last = config["rounds"] - 10
    runs = {}
    with open(os.path.join(folder, "rounds.csv")) as f:
        for row in csv.DictReader(f):
            run = runs.setdefault(row["strategy"], {"failed": 0, "seeds": {}})
            if row["failed"] == "true":
                run["failed"] += 1
                continue
            if int(row["round"]) < last:
                continue
            seed = run["seeds"].setdefault(row["seed"], {k: [] for k in FIELDS})
            for k in FIELDS:
                seed[k].append(float(row[k]))
    suffix = flags(config)
    rows = []
    for label, run in runs.items():
        per_seed = {k: [sum(s[k]) / len(s[k]) for s in run["seeds"].values()] for k in FIELDS}
        rows.append(
            {
                "run": f"{label} {suffix}".strip(),
                "folder": folder,
                "seeds": len(run["seeds"]),
                "failed_attempts": run["failed"],
                **{k: mean_std(per_seed[k]) for k in FIELDS},
            }
        )
    return rows


FIELDS = ["test_accuracy", "validation_accuracy", "step_cosine", "step_agreement", "std_spread"]


def main(args):
    sort = "validation_accuracy"
    if "--sort" in args:
        i = args.index("--sort")
        sort = {"validation": "validation_accuracy", "test": "test_accuracy"}[args[i + 1]]
        del args[i : i + 2]
    rows = [r for folder in args for r in load(folder)]
    rows.sort(key=lambda r: -r[sort][0] if not math.isnan(r[sort][0]) else 0)
    pm = lambda v: f"{v[0]:.4f} ± {v[1]:.4f}"
    print("| run | seeds | validation, last 10 | test, last 10 | step cosine | step agreement | σ spread | failed attempts |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['run']} | {r['seeds']} | {pm(r['validation_accuracy'])} | {pm(r['test_accuracy'])} "
            f"| {r['step_cosine'][0]:.3f} | {r['step_agreement'][0]:.3f} | {r['std_spread'][0]:.4f} "
            f"| {r['failed_attempts']} |"
        )
    with open("variants-table.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "folder", "seeds", "failed_attempts"] + [f"{k}_{s}" for k in FIELDS for s in ("mean", "std")])
        for r in rows:
            w.writerow([r["run"], r["folder"], r["seeds"], r["failed_attempts"]] + [x for k in FIELDS for x in r[k]])


if __name__ == "__main__":
    main(sys.argv[1:])
