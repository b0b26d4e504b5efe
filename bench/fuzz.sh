#!/usr/bin/env bash
# `make fuzz`: every cargo-fuzz target (fuzz/fuzz_targets/*) for FUZZ_SECONDS each, then a table
# of executions per target. Needs the nightly toolchain and cargo-fuzz.
#
#   bench/fuzz.sh [TARGET...]        (default: every target `cargo fuzz list` shows)
#
# Environment: FUZZ_SECONDS (default 60) per target; FUZZ_JOBS (default 1) parallel workers per
# target (libFuzzer -fork); FUZZ_ARGS extra libFuzzer flags.
# Each target starts from its committed seeds (fuzz/corpus/TARGET/seed-*) plus whatever earlier
# runs left in that directory (ignored by git). A crash stops the run with exit 1 and names the
# reproducer under fuzz/artifacts/TARGET/.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
cd "$ROOT/fuzz"
secs="${FUZZ_SECONDS:-60}"
jobs="${FUZZ_JOBS:-1}"
targets=("$@")
((${#targets[@]})) || mapfile -t targets < <(cargo +nightly fuzz list)
# Build every target once, then run the binaries directly: `cargo fuzz run` would rebuild
# whenever a source file changed in between.
echo "== building the fuzz targets (cargo +nightly fuzz build)"
if ((${#targets[@]} == 1)); then cargo +nightly fuzz build "${targets[0]}" >&2; else cargo +nightly fuzz build >&2; fi
host="$(rustc +nightly -vV | sed -n 's/^host: //p')"
bindir="$ROOT/fuzz/target/$host/release"
logdir="$(mktemp -d "${TMPDIR:-/tmp}/waypost-fuzz.XXXXXX")"
summary=()
status=0
for t in "${targets[@]}"; do
    echo "== fuzz target $t (${secs}s)"
    mkdir -p "corpus/$t" "artifacts/$t"
    fork=()
    ((jobs > 1)) && fork=(-fork="$jobs")
    set +e
    # shellcheck disable=SC2086
    "$bindir/$t" -artifact_prefix="artifacts/$t/" -max_total_time="$secs" -print_final_stats=1 \
        "${fork[@]+"${fork[@]}"}" ${FUZZ_ARGS:-} "corpus/$t" 2>&1 | tee "$logdir/$t.log" |
        grep -E '^(#[0-9]+ +(INITED|DONE|pulse)|==|SUMMARY|stat::|INFO: Running|Done [0-9]+ runs|artifact_prefix|Test unit written|thread .* panicked)'
    codes=("${PIPESTATUS[@]}")
    set -e
    rc=${codes[0]}
    execs="$(awk -F: '/stat::number_of_executed_units/ { gsub(/ /, "", $2); n += $2 } END { print n + 0 }' "$logdir/$t.log")"
    if ((execs == 0)); then # -fork mode reports "#N DONE ... " lines instead
        execs="$(grep -oE '^#[0-9]+' "$logdir/$t.log" | tail -n1 | tr -d '#' || echo 0)"
    fi
    rate="$(awk -v n="$execs" -v s="$secs" 'BEGIN { printf "%.0f", n / s }')"
    cov="$(grep -oE 'cov: [0-9]+' "$logdir/$t.log" | tail -n1 | awk '{ print $2 }')"
    if ((rc != 0)); then
        summary+=("$(printf '%-16s %14s %10s/s  cov %-6s CRASH (exit %d) — see fuzz/artifacts/%s/ and %s' "$t" "$execs" "$rate" "${cov:-?}" "$rc" "$t" "$logdir/$t.log")")
        status=1
        break
    fi
    summary+=("$(printf '%-16s %14s %10s/s  cov %-6s ok' "$t" "$execs" "$rate" "${cov:-?}")")
done
echo
echo "== fuzz summary (${secs}s per target)"
printf '%-16s %14s %12s  %-10s %s\n' target executions rate coverage result
printf '%s\n' "${summary[@]}"
((status == 0)) && rm -rf "$logdir"
exit "$status"
