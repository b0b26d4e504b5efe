#!/usr/bin/env bash
# Build the shipped waypost-entrypoint binary and report its size and idle memory next to tini.
#
#   size-report/report.sh [--no-history] [--binary PATH]
#
#   --no-history   do not append a line to size-report/history.tsv (CI checks use this)
#   --binary PATH  measure this already built binary instead of building one
#
# Environment:
#   NOTE=...       free-form note for the history line (tabs and newlines become spaces)
#   TINI=PATH      the tini to compare against (default: tini-static on PATH, then /usr/bin/tini-static)
#   SETTLE=SECS    how long each process runs before its memory is read (default 1)
#   RUNS=N         copies of each process measured side by side; the median is reported (default 3)
#
# Memory is read from /proc/PID/status of the ENTRYPOINT process itself (not its child), running
# `sleep 30` with stdout/stderr on /dev/null: stdout is not a tty, so the entrypoint captures the
# child's output through pipes, which is the realistic (container) case. The environment is
# cleared to PATH plus the variables shown, so a WAYPOST_SERVER in your shell does not leak in.
set -euo pipefail
# shellcheck source=size-report/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

HISTORY="$ROOT/size-report/history.tsv"
history=1
bin=""

usage() {
    sed -n '2,18s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"
}

while (($# > 0)); do
    case "$1" in
    --no-history) history=0 ;;
    --binary)
        (($# >= 2)) || { usage >&2; exit 2; }
        bin="$2"
        shift
        ;;
    --binary=*) bin="${1#--binary=}" ;;
    -h | --help) usage; exit 0 ;;
    *) echo "report.sh: unknown argument: $1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done

settle="${SETTLE:-1}"
[[ "$settle" =~ ^[0-9]+(\.[0-9]+)?$ ]] || die "SETTLE must be a number of seconds, got '$settle'"
runs="${RUNS:-3}"
[[ "$runs" =~ ^[1-9][0-9]?$ ]] || die "RUNS must be a number from 1 to 99, got '$runs'"

[[ -r /proc/self/status ]] || die "/proc is not mounted; memory cannot be measured"

# --- the comparison binary (checked before the build so a missing tini fails fast) -------------
tini="${TINI:-}"
if [[ -z "$tini" ]]; then
    tini="$(command -v tini-static 2>/dev/null || true)"
    [[ -n "$tini" ]] || tini=/usr/bin/tini-static
fi
[[ -x "$tini" ]] || die "tini-static not found at '$tini' (Debian package 'tini'; or set TINI=/path/to/tini-static)"

# --- build --------------------------------------------------------------------------------------
if [[ -n "$bin" ]]; then
    [[ -x "$bin" ]] || die "--binary $bin: no such executable"
else
    bin="$(build_min)"
fi
bin="$(readlink -f "$bin")"
tini="$(readlink -f "$tini")"

size="$(stat -c %s "$bin")"
tini_size="$(stat -c %s "$tini")"

# The min profile strips; say so loudly if this binary still carries a symbol table.
stripped="stripped"
if command -v readelf >/dev/null 2>&1 && readelf -S -W "$bin" 2>/dev/null | grep -q '[[:space:]]\.symtab[[:space:]]'; then
    stripped="NOT stripped"
    echo "report.sh: warning: $bin has a .symtab; the reported size is not the stripped size" >&2
fi

# --- process bookkeeping: every process we start is killed on exit, whatever happens -----------
started=() # PIDs of the measured processes (entrypoint or tini); their children are found via /proc

children_of() {
    local pid="$1" f
    if [[ -r "/proc/$pid/task/$pid/children" ]]; then
        for f in /proc/"$pid"/task/*/children; do
            cat "$f" 2>/dev/null || true
        done | tr ' ' '\n' | grep -E '^[0-9]+$' || true
    else # kernels without CONFIG_PROC_CHILDREN: scan the PPid of every process
        awk -v p="$pid" '$1 == "PPid:" && $2 == p { split(FILENAME, a, "/"); print a[3] }' \
            /proc/[0-9]*/status 2>/dev/null || true
    fi
}

# kill_tree PID: politely (SIGTERM, which a good init forwards to its child), then by force.
kill_tree() {
    local pid="$1" kids i
    kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
    kids="$(children_of "$pid")"
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 20; i++)); do # up to 2 s
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        kids="$kids $(children_of "$pid")"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    # The child (sleep 30) may outlive a killed init; it is ours, so end it too.
    local k
    for k in $kids; do
        kill -KILL "$k" 2>/dev/null || true
    done
    wait "$pid" 2>/dev/null || true
}

cleanup() {
    local pid
    for pid in "${started[@]+"${started[@]}"}"; do
        kill_tree "$pid"
    done
    started=()
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

status_kb() { # status_kb PID FIELD -> the number of kB, or empty
    awk -v f="$2:" '$1 == f { print $2; exit }' "/proc/$1/status" 2>/dev/null || true
}

median() { tr ' ' '\n' | grep -E '^[0-9]+$' | sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }

# measure LABEL ENV... -- CMD...: start RUNS copies of CMD side by side, each in a clean
# environment, let them settle, and set the globals RSS and ANON (kB, the median over the copies).
# Runs in this shell (not a subshell) so the EXIT trap sees every PID.
measure() {
    local label="$1"
    shift
    local envs=()
    while [[ "$1" != "--" ]]; do
        envs+=("$1")
        shift
    done
    shift
    local exe
    exe="$(readlink -f "$1")"

    local pids=() i pid
    for ((i = 0; i < runs; i++)); do
        env -i "PATH=$PATH" "${envs[@]+"${envs[@]}"}" "$@" </dev/null >/dev/null 2>&1 &
        pids+=("$!")
        started+=("$!")
    done
    sleep "$settle"

    local rss_all="" anon_all="" rss anon actual
    for pid in "${pids[@]}"; do
        if ! kill -0 "$pid" 2>/dev/null; then
            local rc=0
            wait "$pid" || rc=$?
            die "$label exited (status $rc) within ${settle}s of starting '$*'; it must stay up while its child runs"
        fi
        # $! is the process env(1) became, which exec'd the measured binary: make sure it is that
        # binary (and not env, or a child) before trusting the numbers.
        actual="$(readlink -f "/proc/$pid/exe" 2>/dev/null || true)"
        [[ "$actual" == "$exe" ]] || die "$label: PID $pid is '$actual', expected '$exe'"
        if [[ -z "$(children_of "$pid")" ]]; then
            echo "report.sh: warning: $label (PID $pid) has no child after ${settle}s" >&2
        fi
        rss="$(status_kb "$pid" VmRSS)"
        anon="$(status_kb "$pid" RssAnon)"
        [[ "$rss" =~ ^[0-9]+$ && "$anon" =~ ^[0-9]+$ ]] ||
            die "$label: could not read VmRSS/RssAnon from /proc/$pid/status"
        rss_all+=" $rss"
        anon_all+=" $anon"
    done
    RSS="$(median <<<"$rss_all")"
    ANON="$(median <<<"$anon_all")"

    local keep=() p
    for pid in "${pids[@]}"; do
        kill_tree "$pid"
    done
    for p in "${started[@]}"; do
        [[ " ${pids[*]} " == *" $p "* ]] || keep+=("$p")
    done
    started=("${keep[@]+"${keep[@]}"}")
}

measure "waypost-entrypoint" WAYPOST_LOG_LEVEL=ERROR -- "$bin" sleep 30
wp_rss=$RSS wp_anon=$ANON
measure "waypost-entrypoint (WAYPOST_DISABLE=1)" WAYPOST_LOG_LEVEL=ERROR WAYPOST_DISABLE=1 -- "$bin" sleep 30
wd_rss=$RSS wd_anon=$ANON
measure "tini-static" -- "$tini" -s -- sleep 30
ti_rss=$RSS ti_anon=$ANON

# --- report ---------------------------------------------------------------------------------------
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else printf "n/a" }'; }

kib="$(awk -v s="$size" 'BEGIN { printf "%.1f", s / 1024 }')"
echo "binary:  $bin"
echo "size:    $size bytes ($kib KiB, $stripped)"
budget="$(read_budget 2>/dev/null || true)"
if [[ -n "$budget" ]]; then
    echo "budget:  $budget bytes ($(awk -v s="$size" -v b="$budget" 'BEGIN { printf "%.1f", 100 * s / b }')% used; size-report/check-budget.sh enforces it)"
fi
echo "compare: $tini ($tini_size bytes)"
echo "memory:  idle, ${settle}s after start, of the init process itself running 'sleep 30', stdout/stderr on /dev/null;"
echo "         median of $runs side-by-side copies each"
echo

fmt='%-40s %11s %9s %10s %8s %8s %10s\n'
# shellcheck disable=SC2059
{
    printf "$fmt" "binary" "size bytes" "VmRSS kB" "RssAnon kB" "size/x" "RSS/x" "Anon/x"
    printf "$fmt" "waypost-entrypoint" "$size" "$wp_rss" "$wp_anon" \
        "$(ratio "$size" "$tini_size")" "$(ratio "$wp_rss" "$ti_rss")" "$(ratio "$wp_anon" "$ti_anon")"
    printf "$fmt" "waypost-entrypoint WAYPOST_DISABLE=1" "$size" "$wd_rss" "$wd_anon" \
        "$(ratio "$size" "$tini_size")" "$(ratio "$wd_rss" "$ti_rss")" "$(ratio "$wd_anon" "$ti_anon")"
    printf "$fmt" "tini-static -s (x)" "$tini_size" "$ti_rss" "$ti_anon" "1.00" "1.00" "1.00"
}
echo "(x/ columns: ratio to tini-static; WAYPOST_LOG_LEVEL=ERROR for both waypost rows)"

# --- history --------------------------------------------------------------------------------------
if ((history)); then
    rev="$(git -C "$ROOT" rev-parse --short --verify -q HEAD 2>/dev/null || echo "no-commit")"
    # Dirty = tracked changes or untracked files, ignoring the history file itself (else every run
    # after an uncommitted append would read as dirty) and target/.
    if [[ -n "$(git -C "$ROOT" status --porcelain -- . ':(exclude)size-report/history.tsv' ':(exclude)target' 2>/dev/null || true)" ]]; then
        rev="$rev-dirty"
    fi
    note="$(printf '%s' "${NOTE:-}" | tr '\t\r\n' '   ')"
    if [[ ! -s "$HISTORY" ]]; then
        printf 'date_utc\trev\tsize_bytes\tvmrss_kb\trssanon_kb\ttini_vmrss_kb\ttini_rssanon_kb\tnote\n' >"$HISTORY"
    fi
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$rev" "$size" \
        "$wp_rss" "$wp_anon" "$ti_rss" "$ti_anon" "$note" >>"$HISTORY"
    echo
    echo "appended to size-report/history.tsv: $(tail -n1 "$HISTORY")"
fi
