#!/usr/bin/env bash
# `make bench-soak`: one instance under steady use for SOAK_SECONDS — its child logging steadily,
# config changes (each restarts the child), exec sessions with and without a PTY — and the
# entrypoint's memory sampled throughout. Writes bench/SOAK.md; exits 1 if the entrypoint's RSS
# at the end is above its RSS after the warm-up (plus a one-page-per-minute noise allowance,
# at most 64 KiB). Not run by CI.
#
# Environment (defaults in brackets):
#   SOAK_SECONDS   total length [3600]            LOG_RATE      child log lines per second [200]
#   CONFIG_EVERY   seconds between config changes [60]
#   EXEC_EVERY     seconds between exec sessions [10] (every third one is `exec -t` on a PTY)
#   WARMUP         seconds before the start sample [min(60, SOAK_SECONDS/6)]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
SOAK_SECONDS="${SOAK_SECONDS:-3600}"
LOG_RATE="${LOG_RATE:-200}"
CONFIG_EVERY="${CONFIG_EVERY:-60}"
EXEC_EVERY="${EXEC_EVERY:-10}"
WARMUP="${WARMUP:-$((SOAK_SECONDS / 6 < 60 ? SOAK_SECONDS / 6 : 60))}"
OUT="$ROOT/bench/SOAK.md"

die() { echo "soak.sh: $*" >&2; exit 1; }
kb() { awk -v f="$2:" '$1 == f { print $2; exit }' "/proc/$1/status" 2>/dev/null || true; }

echo "== building" >&2
make -C "$ROOT" --no-print-directory build >&2
(cd "$ROOT" && cargo build --release -p waypost --bins >&2)
cargo build --release --manifest-path "$ROOT/bench/helper/Cargo.toml" --target-dir "$ROOT/target/bench-helper" >&2
EP="$ROOT/target/x86_64-unknown-linux-musl/min/waypost-entrypoint"
WP="$ROOT/target/release/waypost"
H="$ROOT/target/bench-helper/release/waypost-bench-helper"

WORK="$(mktemp -d "${TMPDIR:-/tmp}/waypost-soak.XXXXXX")"
PIDS=()
# shellcheck disable=SC2317 # called by the trap
cleanup() {
    local p
    for p in "${PIDS[@]+"${PIDS[@]}"}"; do kill -TERM "$p" 2>/dev/null || true; done
    sleep 1
    for p in "${PIDS[@]+"${PIDS[@]}"}"; do kill -KILL "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
    [[ "${KEEP:-0}" == 1 ]] || rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

export WAYPOST_CONTEXT="$WORK/context.json"
unset WAYPOST_ADDR WAYPOST_ADMIN_TOKEN WAYPOST_CA WAYPOST_SERVER WAYPOST_TOKEN
export WAYPOST_METRICS_ADDR=127.0.0.1:0 # not the default 9703 a running server may hold
args=(server run --data-dir "$WORK/data" --control-addr 127.0.0.1:0 --api-addr 127.0.0.1:0)
"$WP" server run --help | grep -q -- --ingress-addr && args+=(--ingress-addr 127.0.0.1:0)
"$WP" "${args[@]}" >"$WORK/server.log" 2>&1 &
SERVER=$!
PIDS+=("$SERVER")
for ((i = 0; i < 300; i++)); do
    grep -q "\"pid\": *$SERVER" "$WORK/data/server.json" 2>/dev/null && break
    kill -0 "$SERVER" 2>/dev/null || die "the server exited: $(tail -n3 "$WORK/server.log")"
    sleep 0.1
done
"$WP" app create soak >/dev/null
"$WP" token create --app soak -o env >"$WORK/soak.env"
have_config=0; "$WP" config set --help >/dev/null 2>&1 && have_config=1
have_exec=0; "$WP" exec --help >/dev/null 2>&1 && have_exec=1

# shellcheck disable=SC2046
env -i "PATH=$PATH" $(cat "$WORK/soak.env") WAYPOST_LOG_LEVEL=INFO "$EP" "$H" lines 0 --rate "$LOG_RATE" \
    </dev/null >/dev/null 2>"$WORK/entrypoint.err" &
EPID=$!
PIDS+=("$EPID")
echo "== soak: ${SOAK_SECONDS}s, entrypoint pid $EPID, logs $LOG_RATE lines/s, config every ${CONFIG_EVERY}s ($( ((have_config)) || echo "n/a: not built")), exec every ${EXEC_EVERY}s ($( ((have_exec)) || echo "n/a: not built"))" >&2

printf 't_s\tvmrss_kib\trssanon_kib\tvmhwm_kib\tfds\n' >"$WORK/samples.tsv"
sample() {
    printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$(kb "$EPID" VmRSS)" "$(kb "$EPID" RssAnon)" "$(kb "$EPID" VmHWM)" \
        "$(find /proc/"$EPID"/fd -mindepth 1 -maxdepth 1 2>/dev/null | wc -l)" >>"$WORK/samples.tsv"
}
t0=$(date +%s)
next_cfg=$CONFIG_EVERY next_exec=$EXEC_EVERY next_sample=0
configs=0 config_fail=0 execs=0 exec_fail=0 ptys=0 pty_fail=0 gen=0
start_rss="" start_anon="" start_t=""
while :; do
    t=$(($(date +%s) - t0))
    ((t >= SOAK_SECONDS)) && break
    kill -0 "$EPID" 2>/dev/null || die "the entrypoint exited during the soak: $(tail -n3 "$WORK/entrypoint.err")"
    if ((t >= next_sample)); then
        sample "$t"
        if [[ -z "$start_t" ]] && ((t >= WARMUP)); then
            start_t=$t start_rss=$(kb "$EPID" VmRSS) start_anon=$(kb "$EPID" RssAnon)
        fi
        next_sample=$((t + 10))
    fi
    if ((have_config && t >= next_cfg)); then
        gen=$((gen + 1))
        if "$WP" config set --app soak "SOAK_GEN=$gen" >/dev/null 2>>"$WORK/cli.err"; then configs=$((configs + 1)); else config_fail=$((config_fail + 1)); fi
        next_cfg=$((t + CONFIG_EVERY))
    fi
    if ((have_exec && t >= next_exec)); then
        execs=$((execs + 1))
        if ((execs % 3 == 0)); then
            ptys=$((ptys + 1))
            "$H" pty-rtt 10 -- "$WP" exec -t -i --app soak -- sh -c 'stty raw -echo; echo READY; exec cat' >/dev/null 2>>"$WORK/cli.err" ||
                pty_fail=$((pty_fail + 1))
        else
            got="$("$WP" exec --app soak -- sh -c 'head -c 100000 /dev/zero | wc -c' 2>>"$WORK/cli.err" | tr -d ' ')" || true
            [[ "$got" == 100000 ]] || exec_fail=$((exec_fail + 1))
        fi
        next_exec=$((t + EXEC_EVERY))
    fi
    sleep 1
done
t=$(($(date +%s) - t0))
sample "$t"
end_rss=$(kb "$EPID" VmRSS) end_anon=$(kb "$EPID" RssAnon) hwm=$(kb "$EPID" VmHWM)
: "${start_rss:=$end_rss}" "${start_anon:=$end_anon}" "${start_t:=$t}"
max_rss=$(awk -F'\t' 'NR > 1 && $2 > m { m = $2 } END { print m }' "$WORK/samples.tsv")
minutes=$(((t - start_t + 59) / 60))
allow=$((minutes * 4 < 64 ? minutes * 4 : 64))
verdict="ok: no growth"
rc=0
if ((end_rss > start_rss + allow)); then
    verdict="GREW by $((end_rss - start_rss)) KiB (allowance $allow KiB)"
    rc=1
elif ((end_rss > start_rss)); then
    verdict="ok: +$((end_rss - start_rss)) KiB, within the allowance of $allow KiB (see the second half)"
fi
# A leak keeps growing; a working set that settles does not: the second half on its own.
half_t="" half_rss=""
read -r half_t half_rss < <(awk -F'\t' -v h=$((t / 2)) 'NR > 1 && $1 >= h { print $1, $2; exit }' "$WORK/samples.tsv") || true
lines_stored="$("$WP" logs --app soak --stats 2>/dev/null | tr '\n' ' ' | head -c 300 || true)"
{
    echo "# waypost soak"
    echo
    echo "\`make bench-soak\` (bench/soak.sh), revision \`$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo ?)\`, $(date -u +%Y-%m-%dT%H:%M:%SZ), load at end $(cut -d' ' -f1-3 /proc/loadavg)."
    echo
    echo "One instance for ${t}s: child logging $LOG_RATE lines/s, config change every ${CONFIG_EVERY}s (restart), exec every ${EXEC_EVERY}s (every third with a PTY)."
    echo
    echo "| figure | value |"
    echo "|---|---|"
    echo "| entrypoint VmRSS after ${start_t}s warm-up → at the end | $start_rss KiB → $end_rss KiB |"
    echo "| entrypoint RssAnon after warm-up → at the end | $start_anon KiB → $end_anon KiB |"
    echo "| highest VmRSS sample / VmHWM | $max_rss KiB / $hwm KiB |"
    echo "| entrypoint VmRSS over the second half (${half_t:-?}s → end) | ${half_rss:-?} KiB → $end_rss KiB |"
    echo "| verdict | $verdict |"
    echo "| config changes applied / failed | $configs / $config_fail $( ((have_config)) || echo "(config set not built)") |"
    echo "| exec sessions (pipes) ok / failed | $((execs - ptys - exec_fail)) / $exec_fail $( ((have_exec)) || echo "(exec not built)") |"
    echo "| exec -t sessions (PTY) ok / failed | $((ptys - pty_fail)) / $pty_fail |"
    echo "| server log stats at the end | ${lines_stored:-n/a} |"
    echo
    echo "Samples (every 10 s):"
    echo
    echo '```'
    cat "$WORK/samples.tsv"
    echo '```'
} >"$OUT"
cat "$OUT"
[[ -s "$WORK/cli.err" ]] && { echo "CLI errors (last 5):" >&2; tail -n5 "$WORK/cli.err" >&2; }
exit "$rc"
