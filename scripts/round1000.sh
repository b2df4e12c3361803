#!/usr/bin/env bash
# The 1,000-client round (issue 19, part 2): every client in every round, one local step each
# (60 rows, batch 64), MLP head 1280→256→10, all over real QUIC and TLS in one process on this
# machine. Three transports, one after the other in this script:
#   f32-osbuf   f32 both ways, UDP buffers left at the OS default (the build before issue 19);
#   f32         f32 both ways, 8 MiB UDP buffers (the shipped default);
#   int8        int8 both ways, 8 MiB UDP buffers, clients that hold their last task's head get
#               the change from it (from round 1 on every client does).
# Per run: each round's time, bytes out (tasks) and in (updates), delta tasks, the UDP
# datagrams the kernel dropped for want of buffer (/proc/net/snmp RcvbufErrors, whole machine),
# and the process's peak RSS. Writes docs/results/round1000/round1000.{csv,json}.
#   scripts/round1000.sh [ROUNDS]   (default 4; round 0 holds the connections' warm-up)
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
rounds=${1:-4}
cargo build --release --locked --bin wsa-fl
out=docs/results/round1000
mkdir -p "$out" runs
rm -f runs/round1000-drops.txt
drops() { awk '/^Udp:/ { getline; print $6; exit }' /proc/net/snmp; }
for variant in f32-osbuf f32 int8; do
  case "$variant" in
    f32-osbuf) wire=(--udp-buffer 0) ;;
    f32) wire=() ;;
    int8) wire=(--encoding int8 --downlink-encoding int8) ;;
  esac
  before=$(drops)
  /usr/bin/time -v target/release/wsa-fl --clients 1000 --per-round 1000 --rounds "$rounds" \
    --epochs 1 --batch-size 64 --partition iid --train-limit 0 --test-limit 2000 \
    --strategies fedavg --no-centralized "${wire[@]}" --out "runs/round1000-$variant" \
    2> "runs/round1000-$variant.time"
  echo "$variant $(( $(drops) - before ))" >> "runs/round1000-drops.txt"
done
python3 - "$out" <<'PY'
import csv, json, re, statistics, sys
out = sys.argv[1]
drops = dict(line.split() for line in open("runs/round1000-drops.txt"))
rows = []
for variant in ["f32-osbuf", "f32", "int8"]:
    rounds = [json.loads(l) for l in open(f"runs/round1000-{variant}/aggregator-rounds.jsonl")]
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)",
                    open(f"runs/round1000-{variant}.time").read())
    steady = [r["duration_ms"] / 1000 for r in rounds[1:]] or [rounds[0]["duration_ms"] / 1000]
    rows.append({
        "variant": variant,
        "round_seconds": [r["duration_ms"] / 1000 for r in rounds],
        "median_round_seconds_after_first": statistics.median(steady),
        "accepted": [r["accepted_count"] for r in rounds],
        "delta_tasks": [r.get("delta_tasks", 0) for r in rounds],
        "mb_out_per_round": statistics.mean(r["transport"]["bytes_out"] for r in rounds) / 1e6,
        "mb_in_per_round": statistics.mean(r["wire_bytes_in"] for r in rounds) / 1e6,
        "udp_receive_drops": int(drops[variant]),
        "peak_rss_gib": int(rss.group(1)) / 2**20 if rss else None,
    })
base = rows[0]["median_round_seconds_after_first"]
for r in rows:
    r["speedup_vs_f32_osbuf"] = base / r["median_round_seconds_after_first"]
json.dump(rows, open(f"{out}/round1000.json", "w"), indent=1)
with open(f"{out}/round1000.csv", "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["variant", "median_round_s", "speedup", "rounds_s", "mb_out", "mb_in",
                "udp_drops", "peak_rss_gib"])
    for r in rows:
        w.writerow([r["variant"], f"{r['median_round_seconds_after_first']:.2f}",
                    f"{r['speedup_vs_f32_osbuf']:.2f}",
                    " ".join(f"{s:.1f}" for s in r["round_seconds"]),
                    f"{r['mb_out_per_round']:.0f}", f"{r['mb_in_per_round']:.0f}",
                    r["udp_receive_drops"], f"{r['peak_rss_gib']:.2f}"])
print(open(f"{out}/round1000.csv").read())
PY
rm -f runs/round1000-drops.txt
