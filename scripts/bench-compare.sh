#!/usr/bin/env bash
# Runs the CPU benchmarks of two commits alternately in one script, so that a change's effect
# is read as a ratio on the same machine at the same time (machines are shared and noisy):
#
#   scripts/bench-compare.sh BASE [NEW]     # NEW defaults to HEAD; ROUNDS=2 runs of each
#
# Each commit is checked out in its own worktree and built in its own target folder: cargo
# names a workspace crate's artifacts by its path relative to the workspace root, so two
# checkouts sharing one target folder overwrite each other's artifacts, and a build of one can
# link the other's crate. Benches are found by target name (codec, engine, train_epoch, fold,
# round_latency), whichever crate holds them in that commit. Outputs (each run's text and the
# fold's JSON) land in target/bench-compare/<commit>-<bench>-<run>.*; the summary is up to the
# reader (docs/benchmarks.md, "The 2026-11-30 reshape", reads one).
set -euo pipefail
cd "$(dirname "$0")/.."
base=${1:?usage: scripts/bench-compare.sh BASE [NEW]}
new=${2:-HEAD}
rounds=${ROUNDS:-2}
work=${BENCH_COMPARE_DIR:-target/bench-compare}
mkdir -p "$work"
work=$(cd "$work" && pwd)

build() {
  local rev=$1 sha tree
  sha=$(git rev-parse --short "$rev")
  tree="$work/tree-$sha"
  [ -d "$tree" ] || git worktree add --detach "$tree" "$sha" >/dev/null
  echo "bench-compare: building the benches of $sha" >&2
  (cd "$tree" && CARGO_TARGET_DIR="$work/target-$sha" cargo bench --locked --no-run \
    --workspace --bench codec --bench engine --bench train_epoch --bench fold \
    --bench round_latency --message-format=json) >"$work/build-$sha.json"
  python3 - "$work/build-$sha.json" "$work/bin-$sha" <<'PY'
import json, os, shutil, sys
src, dest = sys.argv[1:3]
os.makedirs(dest, exist_ok=True)
for line in open(src):
    m = json.loads(line)
    t = m.get("target", {})
    if m.get("reason") == "compiler-artifact" and m.get("executable") and "bench" in t.get("kind", []):
        shutil.copy(m["executable"], os.path.join(dest, t["name"]))
PY
  echo "$sha"
}

shas=("$(build "$base")" "$(build "$new")")
for run in $(seq 1 "$rounds"); do
  for sha in "${shas[@]}"; do
    bin="$work/bin-$sha"
    for bench in codec engine train_epoch; do
      [ -x "$bin/$bench" ] && "$bin/$bench" --bench >"$work/$sha-$bench-$run.txt" 2>&1
    done
    "$bin/fold" --bench --quick --out "$work/$sha-fold-$run" >"$work/$sha-fold-$run.txt" 2>&1
    "$bin/round_latency" --bench >"$work/$sha-round_latency-$run.txt" 2>&1
    echo "bench-compare: $sha run $run done" >&2
  done
done
echo "bench-compare: outputs in $work (${shas[*]})"
