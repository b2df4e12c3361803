#!/usr/bin/env bash
# Fuzz every decoder of untrusted bytes (fuzz/fuzz_targets/): wire frames, secure-aggregation
# steps against a live round, checkpoint files,
# the feature cache, IDX and CIFAR files. Installs the nightly toolchain and cargo-fuzz when
# missing.
#   scripts/fuzz.sh [RUNS] [TARGET...]   RUNS executions per target (default 10,000,000);
#                                        all targets when none is named
# FUZZ_SECONDS=N also stops each target after N seconds (the slow file-reading targets run
# ~6,000 executions a second here, so 10M of them take ~30 min).
# The corpus grows in fuzz/corpus/<target>/, crashes land in fuzz/artifacts/<target>/ and make
# the script fail; each run's executions and time go to target/fuzz-report.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"
rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz
runs="${1:-10000000}"
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  targets=(decode_frame secagg_steps checkpoint feature_cache idx cifar)
fi
report=target/fuzz-report.txt
mkdir -p target
cd fuzz
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t"
  start=$(date +%s)
  # -rss_limit_mb: the readers' limits must hold memory far below this on any input.
  set +e
  cargo +nightly fuzz run "$t" "corpus/$t" -- -runs="$runs" -rss_limit_mb=1024 \
    ${FUZZ_SECONDS:+-max_total_time=$FUZZ_SECONDS} \
    -print_final_stats=1 >"../target/fuzz-$t.log" 2>&1
  status=$?
  set -e
  grep -E 'stat::number_of_executed_units|stat::peak_rss|SUMMARY|panicked' "../target/fuzz-$t.log" || true
  execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "../target/fuzz-$t.log" | grep -o '[0-9]*$' || echo 0)
  echo "$t: $execs executions in $(( $(date +%s) - start )) s, exit $status" | tee -a "../$report"
  [ "$status" -eq 0 ] || { echo "fuzz: $t failed; see fuzz/artifacts/$t/" >&2; exit 1; }
done
