#!/usr/bin/env python3
"""The lying-clients table of docs/reliability.md from the run folders of
`scripts/experiment.sh trust PART`: scripts/trust-table.py runs/exp-trust-iid [CLEAN_DIR]

One row per strategy under each rule, one column per attack and attacker fraction. A cell is
the mean test accuracy of the last 10 rounds (mean ± std over the seeds) and its gap to the
clean run of the same strategy and rule, in points, in bold beyond the 3-point margin. Round
attempts that failed their quorum (retried, so the run went on) are counted; a seed that did
not finish every round is marked stalled. Writes the table to stdout and every cell to trust-table.csv in the folder."""
import csv, json, os, sys

MARGIN = 3.0  # points: the stated margin


def load(folder):
    """{label: (mean, std, failed attempts, rounds missing)} of one run folder, or None."""
    summary = os.path.join(folder, "summary.json")
    if not os.path.exists(summary):
        return None
    with open(summary) as f:
        s = json.load(f)
    rounds = s["config"]["rounds"]
    seeds = s["config"]["seeds"]
    failed, done = {}, {}
    with open(os.path.join(folder, "rounds.csv")) as f:
        for row in csv.DictReader(f):
            label = row["strategy"]
            if row["failed"] == "true":
                failed[label] = failed.get(label, 0) + 1
            else:
                done[label] = done.get(label, 0) + 1
    out = {}
    for st in s["strategies"]:
        label = st["strategy"]
        mean, std = st["last10_accuracy"]
        missing = rounds * len(seeds) - done.get(label, 0)
        out[label] = (mean, std, failed.get(label, 0), missing)
    return out


def column_name(folder):
    name = os.path.basename(folder.rstrip("/"))
    if name == "clean":
        return "clean"
    # "claim-10000000_sign-flip-1-0.2" → "sign-flip:1, 4 of 20" (every attacker claims 10 M).
    attack, fraction = name.rsplit("-", 1)
    attack = attack.replace("claim-10000000_", "")
    head, _, factor = attack.rpartition("-")
    if factor.replace(".", "").isdigit():
        attack = f"{head}:{factor}"
    share = {"0.05": "1 of 20", "0.2": "4 of 20"}.get(fraction, fraction)
    return f"{attack}, {share}"


def main():
    root = sys.argv[1]
    clean_dir = sys.argv[2] if len(sys.argv) > 2 else os.path.join(root, "clean")
    clean = load(clean_dir)
    if clean is None:
        sys.exit(f"no finished clean run in {clean_dir}")
    folders = sorted(
        os.path.join(root, d)
        for d in os.listdir(root)
        if os.path.isdir(os.path.join(root, d)) and d != "clean"
    )
    columns = [(column_name(f), load(f)) for f in folders]
    columns = [(n, c) for n, c in columns if c is not None]
    labels = list(clean)
    print("| strategy + rule | clean | " + " | ".join(n for n, _ in columns) + " |")
    print("|---" * (len(columns) + 2) + "|")
    rows = []
    for label in labels:
        c_mean, c_std, c_failed, c_missing = clean[label]
        cells = [f"{c_mean:.3f} ± {c_std:.3f}"]
        for name, col in columns:
            if label not in col:
                cells.append("—")
                continue
            mean, std, failed, missing = col[label]
            gap = 100 * (mean - c_mean)
            cell = f"{mean:.3f} ({gap:+.1f})"
            if abs(gap) > MARGIN and gap < 0:
                cell = f"**{cell}**"
            if failed:
                cell += f" ({failed} failed attempts)"
            if missing:
                cell += f" **stalled: {missing} rounds missing**"
            cells.append(cell)
            rows.append([label, name, mean, std, gap, failed, missing])
        print(f"| {label} | " + " | ".join(cells) + " |")
    with open(os.path.join(root, "trust-table.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["strategy", "attack", "last10_mean", "last10_std", "gap_points",
                    "failed_attempts", "rounds_missing"])
        w.writerows(rows)


if __name__ == "__main__":
    main()
