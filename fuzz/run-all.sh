#!/usr/bin/env bash
# Runs every fuzz target (or the ones named) for SECONDS each, one after another, with
# libFuzzer through cargo-fuzz, and prints each run's figures.
#
#   fuzz/run-all.sh [SECONDS] [TARGET…]        (default: 600 s, every target)
#
# Needs `cargo install cargo-fuzz`. cargo-fuzz builds with nightly-only flags
# (-Zsanitizer=address); on a stable toolchain RUSTC_BOOTSTRAP=1 (set here unless already
# set) lets stable rustc accept them. Each target's corpus grows in fuzz/corpus/<target>/
# from the committed seeds in fuzz/seeds/<target>/; crashes land in fuzz/artifacts/<target>/
# (both ignored by git); each run's log is fuzz/logs/<target>.log. The figures printed are
# libFuzzer's final ones: executions, executions per second, the corpus at the end (entries/
# size), coverage (cov: edges, ft: features) and crash files. Exits 1 if any target crashed.
set -euo pipefail

cd "$(dirname "$0")"
seconds="${1:-600}"
shift || true
if [ "$#" -gt 0 ]; then
    targets=("$@")
else
    targets=(client_frame client_binary_frame publish_body resume_token connect_token config_toml last_event_id jwks)
fi
export RUSTC_BOOTSTRAP="${RUSTC_BOOTSTRAP:-1}"
rss_mb="${FUZZ_RSS_LIMIT_MB:-2048}"
mkdir -p logs

nice -n 19 cargo fuzz build -O >logs/build.log 2>&1 || { tail -20 logs/build.log >&2; exit 2; }

crashed=0
printf '%-14s %12s %9s %13s %7s %7s %8s\n' target execs execs/s corpus cov ft crashes
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t" "artifacts/$t"
    log="logs/$t.log"
    set +e
    nice -n 19 cargo fuzz run -O "$t" "corpus/$t" "seeds/$t" -- \
        -max_total_time="$seconds" -rss_limit_mb="$rss_mb" -dict=zerodrop.dict \
        -print_final_stats=1 >"$log" 2>&1
    status=$?
    set -e
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
    done_line=$(grep -E '^#[0-9]+[[:space:]]+(DONE|pulse|NEW|REDUCE|INITED)' "$log" | tail -1 || true)
    cov=$(sed -n 's/.* cov: \([0-9]*\).*/\1/p' <<<"$done_line")
    ft=$(sed -n 's/.* ft: \([0-9]*\).*/\1/p' <<<"$done_line")
    corpus=$(sed -n 's/.* corp: \([0-9]*\/[0-9]*[a-zA-Z]*\).*/\1/p' <<<"$done_line")
    crashes=$(find "artifacts/$t" -type f | wc -l)
    printf '%-14s %12s %9s %13s %7s %7s %8s\n' "$t" "${execs:-?}" "${rate:-?}" "$corpus" \
        "${cov:-?}" "${ft:-?}" "$crashes"
    if [ "$status" -ne 0 ] || [ "$crashes" -gt 0 ]; then
        crashed=1
        echo "  $t: exit $status; see fuzz/$log and fuzz/artifacts/$t/" >&2
    fi
done
exit "$crashed"
