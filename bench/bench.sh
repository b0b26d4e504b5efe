#!/usr/bin/env bash
# `make bench`: the whole performance picture of waypost from ONE run, each figure next to its
# baseline, written to bench/REPORT.md (overwritten) with a one-line summary appended to
# bench/history.tsv. Builds what it needs; installs wrk and tini with apt when missing (as root).
#
#   bench/bench.sh [--quick]
#
#   --quick   short everything (sanity check of the script, minutes → seconds; figures are rough)
#
# Environment (defaults in brackets):
#   IDLE_SECONDS     idle window for wake-ups [60]         STARTUP_RUNS   exec→child runs [20]
#   LOG_BYTES        log throughput volume [1GiB]          RTT_COUNT      keystrokes timed [200]
#   LOG_ROUNDS       alternating cat/entrypoint rounds [3]
#   TUNNEL_SECONDS   each wrk run [10]                     TUNNEL_CONNS   wrk connections [32]
#   EXEC_BYTES       `exec -- cat` volume [100MiB]         FLEET_INSTANCES  [10000]
#   FLEET_DURATION   fleet steady phase [60s]              SKIP_FLEET=1   leave the fleet out
#   SKIP_PEERS=1     no rathole/bore rows (otherwise built once with cargo install into target/)
#   SKIP_REPLICAS=1  no fleet on 2 replicas + PostgreSQL (bench/fleet-replicas.sh; needs PostgreSQL)
#   NOTE             free text for the history line        KEEP=1         keep the work directory
#
# Everything runs on loopback on this machine; the load average at start and end is in the
# report. Figures that need a server feature that is not built yet say "n/a" and why.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
BENCH="$ROOT/bench"
REPORT="$BENCH/REPORT.md"
HISTORY="$BENCH/history.tsv"

quick=0
for a in "$@"; do
    case "$a" in
    --quick) quick=1 ;;
    -h | --help) sed -n '2,20s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "bench.sh: unknown argument $a" >&2; exit 2 ;;
    esac
done
if ((quick)); then
    : "${IDLE_SECONDS:=10}" "${STARTUP_RUNS:=5}" "${LOG_BYTES:=64MiB}" "${RTT_COUNT:=30}" "${LOG_ROUNDS:=1}"
    : "${TUNNEL_SECONDS:=2}" "${EXEC_BYTES:=8MiB}" "${FLEET_INSTANCES:=200}" "${FLEET_DURATION:=8s}"
fi
IDLE_SECONDS="${IDLE_SECONDS:-60}"
STARTUP_RUNS="${STARTUP_RUNS:-20}"
LOG_BYTES="${LOG_BYTES:-1GiB}"
LOG_ROUNDS="${LOG_ROUNDS:-3}"
RTT_COUNT="${RTT_COUNT:-200}"
TUNNEL_SECONDS="${TUNNEL_SECONDS:-10}"
TUNNEL_CONNS="${TUNNEL_CONNS:-32}"
EXEC_BYTES="${EXEC_BYTES:-100MiB}"
FLEET_INSTANCES="${FLEET_INSTANCES:-10000}"
FLEET_DURATION="${FLEET_DURATION:-60s}"
SKIP_FLEET="${SKIP_FLEET:-0}"
SKIP_PEERS="${SKIP_PEERS:-0}"
SKIP_REPLICAS="${SKIP_REPLICAS:-0}"

say() { printf '\n== %s\n' "$*" >&2; }
warn() { printf 'bench.sh: %s\n' "$*" >&2; }
die() { printf 'bench.sh: %s\n' "$*" >&2; exit 1; }
now_ns() { date +%s%N; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a != "" && b != "" && a == a + 0 && b == b + 0 && b > 0) printf "%.2f", a / b; else printf "n/a" }'; }
fmt() { awk -v v="$1" -v d="${2:-1}" 'BEGIN { if (v == v + 0 && v != "") printf "%.*f", d, v; else printf "n/a" }'; }
median() { tr ' ' '\n' | grep -E '^[0-9.]+$' | sort -n | awk '{ v[NR] = $1 } END { if (NR) print v[int((NR + 1) / 2)] }'; }
loadavg() { cut -d' ' -f1-3 /proc/loadavg; }
kb() { awk -v f="$2:" '$1 == f { print $2; exit }' "/proc/$1/status" 2>/dev/null || true; }

T_START=$(date +%s)
LOAD_START="$(loadavg)"

# ---- prerequisites --------------------------------------------------------------------------------
apt_install() { # apt_install PKG...: only as root (or passwordless sudo); otherwise just warn
    if [[ "$(id -u)" == 0 ]]; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >&2 ||
            { apt-get update -q >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >&2; } || warn "apt-get install $* failed"
    elif sudo -n true 2>/dev/null; then
        sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >&2 || warn "sudo apt-get install $* failed"
    else
        warn "$* missing and not root: install it (apt-get install $*) for the figures that need it"
    fi
}
command -v wrk >/dev/null || apt_install wrk
[[ -x /usr/bin/tini-static ]] || apt_install tini
TINI=/usr/bin/tini-static

# ---- build ----------------------------------------------------------------------------------------
say "building (entrypoint: make build; server + CLI + fleet simulator: release; bench helper)"
make -C "$ROOT" --no-print-directory build >&2
(cd "$ROOT" && cargo build --release -p waypost --bins -p waypost-fleet >&2)
cargo build --release --manifest-path "$BENCH/helper/Cargo.toml" --target-dir "$ROOT/target/bench-helper" >&2
EP="$ROOT/target/x86_64-unknown-linux-musl/min/waypost-entrypoint"
WP="$ROOT/target/release/waypost"
FLEET="$ROOT/target/release/waypost-fleet"
H="$ROOT/target/bench-helper/release/waypost-bench-helper"
for b in "$EP" "$WP" "$FLEET" "$H"; do [[ -x "$b" ]] || die "missing $b after the build"; done
T_BUILT=$(date +%s)

REV="$(git -C "$ROOT" rev-parse --short --verify -q HEAD 2>/dev/null || echo no-commit)"
if [[ -n "$(git -C "$ROOT" status --porcelain -- . ':(exclude)bench/REPORT.md' ':(exclude)bench/history.tsv' 2>/dev/null || true)" ]]; then
    REV="$REV-dirty"
fi

# ---- process bookkeeping --------------------------------------------------------------------------
WORK="$(mktemp -d "${TMPDIR:-/tmp}/waypost-bench.XXXXXX")"
PIDS=()
kill_tree() { # SIGTERM (a good init forwards it), then SIGKILL for it and its children
    local pid="$1" kids i
    kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
    kids="$(cat /proc/"$pid"/task/*/children 2>/dev/null || true)"
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 30; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    for k in $kids; do kill -KILL "$k" 2>/dev/null || true; done
    wait "$pid" 2>/dev/null || true
}
cleanup() {
    local p
    for p in "${PIDS[@]+"${PIDS[@]}"}"; do kill_tree "$p"; done
    PIDS=()
    if [[ "${KEEP:-0}" == 1 ]]; then warn "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
start_bg() { "$@" & PIDS+=("$!"); }

# ---- the server -----------------------------------------------------------------------------------
export WAYPOST_CONTEXT="$WORK/context.json"
unset WAYPOST_ADDR WAYPOST_ADMIN_TOKEN WAYPOST_CA WAYPOST_SERVER WAYPOST_TOKEN
# The metrics listener on a free port, not the default 9703 a running server may hold (older
# servers ignore the variable).
export WAYPOST_METRICS_ADDR=127.0.0.1:0
DATA="$WORK/data"
server_args=(server run --data-dir "$DATA" --control-addr 127.0.0.1:0 --api-addr 127.0.0.1:0 --heartbeat-interval 15s)
have_ingress=0
if "$WP" server run --help 2>/dev/null | grep -q -- --ingress-addr; then
    have_ingress=1
    server_args+=(--ingress-addr 127.0.0.1:0)
fi
say "starting the server"
start_bg "$WP" "${server_args[@]}" >"$WORK/server.log" 2>&1
SERVER_PID=$!
for ((i = 0; i < 300; i++)); do
    grep -q "\"pid\": *$SERVER_PID" "$DATA/server.json" 2>/dev/null && break
    kill -0 "$SERVER_PID" 2>/dev/null || { cat "$WORK/server.log" >&2; die "the server exited during start-up"; }
    sleep 0.1
done
json_field() { sed -n "s/.*\"$2\": *\"\{0,1\}\([^\",]*\)\"\{0,1\}.*/\1/p" "$1" | head -n1; }
INGRESS="$(json_field "$DATA/server.json" ingress_addr)"
wp() { "$WP" "$@"; }
token_env() { # token_env APP → a file of WAYPOST_SERVER/TOKEN/CA lines
    wp app create "$1" >/dev/null
    wp token create --app "$1" -o env >"$WORK/$1.env"
    echo "$WORK/$1.env"
}
# run_ep ENVFILE [VAR=VALUE...] -- CMD...: the entrypoint with a clean environment. Only as
# `start_bg run_ep ...`: it execs, so the background job's pid is the entrypoint's.
run_ep() {
    local envfile="$1"
    shift
    local extra=()
    while [[ "$1" != "--" ]]; do extra+=("$1"); shift; done
    shift
    # shellcheck disable=SC2046
    exec env -i "PATH=$PATH" $(cat "$envfile") WAYPOST_LOG_LEVEL=ERROR "${extra[@]+"${extra[@]}"}" "$EP" "$@"
}
http_ok() { # http_ok HOST:PORT HOST-HEADER: a GET answered 200
    # shellcheck disable=SC2016 # expanded by the inner bash
    timeout 5 bash -c 'exec 3<>"/dev/tcp/${1%:*}/${1##*:}" &&
        printf "GET / HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n" "$2" >&3 && head -n1 <&3' _ "$1" "$2" 2>/dev/null |
        grep -q " 200"
}
instances_live() { wp instances --app "$1" -o json 2>/dev/null | grep -c '"live": *true' || true; }
wait_live() { # wait_live APP N
    local i
    for ((i = 0; i < 200; i++)); do
        (($(instances_live "$1") >= $2)) && return 0
        sleep 0.1
    done
    warn "only $(instances_live "$1") of $2 instances of $1 connected"
    return 1
}

# ---- 1. size ----------------------------------------------------------------------------------------
say "size"
SIZE=$(stat -c %s "$EP")
TINI_SIZE=$(stat -c %s "$TINI" 2>/dev/null || echo "")

# No-session memory: size-report/report.sh's own measurement (three copies, median).
NOSESSION="$(RUNS=3 "$ROOT/size-report/report.sh" --no-history --binary "$EP" 2>&1 || true)"
read -r NS_RSS NS_ANON <<<"$(awk '$1 == "waypost-entrypoint" && NF == 7 { print $3, $4 }' <<<"$NOSESSION" | head -n1)" || true
read -r NS_TRSS NS_TANON <<<"$(awk '$1 == "tini-static" && $3 == "(x)" { print $5, $6 }' <<<"$NOSESSION" | head -n1)" || true

# ---- 2. idle: memory and wake-ups with a session open (runs in the background) ------------------
say "idle: 3 entrypoints with a session open + 3 tini-static, each running sleep; ${IDLE_SECONDS}s of wake-ups"
IDLE_ENV="$(token_env benchidle)"
EP_IDLE=()
TI_IDLE=()
for i in 1 2 3; do
    start_bg run_ep "$IDLE_ENV" -- sleep 3600 </dev/null >/dev/null 2>&1
    EP_IDLE+=("$!")
    start_bg env -i "PATH=$PATH" "$TINI" -s -- sleep 3600 </dev/null >/dev/null 2>&1
    TI_IDLE+=("$!")
done
wait_live benchidle 3 || true
sleep 3 # settle: first Status sent, TLS buffers in place
ep_rss=() ep_anon=() ti_rss=() ti_anon=()
for p in "${EP_IDLE[@]}"; do ep_rss+=("$(kb "$p" VmRSS)"); ep_anon+=("$(kb "$p" RssAnon)"); done
for p in "${TI_IDLE[@]}"; do ti_rss+=("$(kb "$p" VmRSS)"); ti_anon+=("$(kb "$p" RssAnon)"); done
IDLE_RSS=$(median <<<"${ep_rss[*]}")
IDLE_ANON=$(median <<<"${ep_anon[*]}")
TI_RSS=$(median <<<"${ti_rss[*]}")
TI_ANON=$(median <<<"${ti_anon[*]}")
vcs() { awk '$1 == "voluntary_ctxt_switches:" { print $2 }' "/proc/$1/status"; }
(
    e0=$(vcs "${EP_IDLE[0]}") t0=$(vcs "${TI_IDLE[0]}")
    sleep "$IDLE_SECONDS"
    e1=$(vcs "${EP_IDLE[0]}") t1=$(vcs "${TI_IDLE[0]}")
    awk -v a="$e0" -v b="$e1" -v c="$t0" -v d="$t1" -v s="$IDLE_SECONDS" \
        'BEGIN { printf "%.1f %.1f %d %d\n", (b - a) * 60 / s, (d - c) * 60 / s, b - a, d - c }' >"$WORK/wakeups"
) &
WAKE_PID=$!

# ---- 3. startup latency -----------------------------------------------------------------------------
say "startup latency: exec → child start, $STARTUP_RUNS runs each"
START_ENV="$(token_env benchstart)"
read -r SU_DIRECT _ _ _ <<<"$("$H" startup "$STARTUP_RUNS" -- "$H" stamp)"
read -r SU_TINI _ _ _ <<<"$("$H" startup "$STARTUP_RUNS" -- "$TINI" -s -- "$H" stamp)"
# shellcheck disable=SC2046
read -r SU_EP SU_EP_P90 _ _ <<<"$("$H" startup "$STARTUP_RUNS" -- env -i "PATH=$PATH" $(cat "$START_ENV") WAYPOST_LOG_LEVEL=ERROR "$EP" "$H" stamp)"
read -r SU_EPD _ _ _ <<<"$("$H" startup "$STARTUP_RUNS" -- env -i "PATH=$PATH" WAYPOST_DISABLE=1 "$EP" "$H" stamp)"

# ---- 4. exec ----------------------------------------------------------------------------------------
EXEC_NOTE=""
RTT_LOCAL="" RTT_EXEC="" EXEC_MBS="" CAT_MBS=""
if wp exec --help >/dev/null 2>&1; then
    say "exec: keystroke round trip ($RTT_COUNT) and exec -- cat throughput ($EXEC_BYTES)"
    EXEC_ENV="$(token_env benchexec)"
    start_bg run_ep "$EXEC_ENV" -- sleep 3600 </dev/null >/dev/null 2>&1
    wait_live benchexec 1 || true
    SHELL_CMD=(sh -c 'stty raw -echo; echo READY; exec cat')
    read -r RTT_LOCAL RTT_LOCAL_P99 _ _ _ <<<"$("$H" pty-rtt "$RTT_COUNT" -- "${SHELL_CMD[@]}")" || true
    read -r RTT_EXEC RTT_EXEC_P99 _ _ _ <<<"$("$H" pty-rtt "$RTT_COUNT" -- env WAYPOST_CONTEXT="$WAYPOST_CONTEXT" "$WP" exec -t -i --app benchexec -- "${SHELL_CMD[@]}" 2>"$WORK/rtt.err")" ||
        EXEC_NOTE="exec -t failed: $(tail -n1 "$WORK/rtt.err" 2>/dev/null)"
    bytes=$(( $(echo "$EXEC_BYTES" | sed 's/MiB$/*1048576/; s/GiB$/*1073741824/; s/KiB$/*1024/') ))
    t0=$(now_ns)
    got=$("$H" lines "$EXEC_BYTES" | cat | wc -c)
    t1=$(now_ns)
    CAT_MBS=$(awk -v b="$got" -v t=$((t1 - t0)) 'BEGIN { printf "%.1f", b / 1e6 / (t / 1e9) }')
    t0=$(now_ns)
    got=$("$H" lines "$EXEC_BYTES" | "$WP" exec -i --app benchexec -- cat 2>"$WORK/exec.err" | wc -c) || true
    t1=$(now_ns)
    if [[ "$got" == "$bytes" ]]; then
        EXEC_MBS=$(awk -v b="$got" -v t=$((t1 - t0)) 'BEGIN { printf "%.1f", b / 1e6 / (t / 1e9) }')
    else
        EXEC_NOTE="${EXEC_NOTE:+$EXEC_NOTE; }exec -- cat returned $got of $bytes bytes: $(tail -n1 "$WORK/exec.err" 2>/dev/null)"
    fi
else
    EXEC_NOTE="n/a (waypost exec is not built yet)"
fi

wait "$WAKE_PID" || true
read -r WAKE_EP WAKE_TI WAKE_EP_N WAKE_TI_N <<<"$(cat "$WORK/wakeups" 2>/dev/null || echo "n/a n/a n/a n/a")"
for p in "${EP_IDLE[@]}" "${TI_IDLE[@]}"; do kill_tree "$p"; done

# ---- 5. log throughput ------------------------------------------------------------------------------
say "log throughput: $LOG_BYTES of 100-byte lines through the entrypoint (shipping) vs | cat"
LOGS_ENV="$(token_env benchlogs)"
HAVE_LOGS=0
if wp logs --help >/dev/null 2>&1; then HAVE_LOGS=1; fi
# Rounds alternate cat and the entrypoint (ABAB...), and the medians are reported: a pipe's
# throughput swings several-fold with where the scheduler puts writer and reader on 2 cores.
mbs() { awk '{ printf "%.1f", $1 / 1e6 / $2 }' "$1"; }
cat_all=() ep_all=() cpu_all=() hwm_all=()
for ((r = 1; r <= LOG_ROUNDS; r++)); do
    "$H" lines "$LOG_BYTES" --report "$WORK/cat.report" | cat >/dev/null
    cat_all+=("$(mbs "$WORK/cat.report")")
    # shellcheck disable=SC2046
    read -r EPL_WALL EPL_USER EPL_SYS EPL_HWM EPL_EXIT <<<"$("$H" measure -- env -i "PATH=$PATH" $(cat "$LOGS_ENV") \
        WAYPOST_LOG_LEVEL=ERROR "$EP" "$H" lines "$LOG_BYTES" --report "$WORK/ep.report" 2>"$WORK/ep-logs.err")"
    [[ "$EPL_EXIT" == 0 ]] || warn "the entrypoint exited $EPL_EXIT in the log run: $(tail -n2 "$WORK/ep-logs.err")"
    read -r EPL_BYTES _ <"$WORK/ep.report"
    ep_all+=("$(mbs "$WORK/ep.report")")
    cpu_all+=("$(awk -v u="$EPL_USER" -v s="$EPL_SYS" -v b="$EPL_BYTES" 'BEGIN { printf "%.3f", (u + s) / (b / 1073741824) }')")
    hwm_all+=("$EPL_HWM")
done
LOG_CAT_MBS=$(median <<<"${cat_all[*]}")
LOG_EP_MBS=$(median <<<"${ep_all[*]}")
LOG_RATIO=$(ratio "$LOG_EP_MBS" "$LOG_CAT_MBS")
LOG_CPU_PER_GIB=$(fmt "$(median <<<"${cpu_all[*]}")" 2)
EPL_HWM=$(printf '%s\n' "${hwm_all[@]}" | sort -n | tail -n1)
LOG_ROUNDS_TEXT="cat ${cat_all[*]} / entrypoint ${ep_all[*]} MB/s"
INGEST_NOTE=""
INGEST_LPS=""
if ((HAVE_LOGS)); then
    # The server's ingest rate: lines it received from this instance over the entrypoint's wall time
    # (child start to exit, including the final flush of at most 2 s). `logs --stats` prints
    # "app NAME: N lines, ..." and a table INSTANCE ENTRIES LOST.
    sleep 1
    stats_text="$(wp logs --app benchlogs --stats 2>&1 || true)"
    echo "$stats_text" >"$WORK/logs-stats.txt"
    read -r entries lost <<<"$(awk 'NF == 3 && $2 ~ /^[0-9]+$/ && $3 ~ /^[0-9]+$/ { print $2, $3; exit }' <<<"$stats_text")" || true
    if [[ -n "${entries:-}" && -n "${lost:-}" ]]; then
        # Received = sequence numbers the server saw minus those it knows were lost (so log
        # retention pruning old lines does not distort the rate).
        got=$((entries - lost))
        INGEST_LPS=$(awk -v n="$got" -v s="$EPL_WALL" 'BEGIN { printf "%.0f", n / s }')
        INGEST_NOTE="$got of $entries lines received in ${EPL_WALL} s (the entrypoint's wall time); $lost dropped by the entrypoint's bounded buffer (1 MiB) while the server was behind, as designed; the server's capacity with many senders is in the fleet's burst figure"
    else
        INGEST_NOTE="n/a (could not read \`waypost logs --stats\`: $(head -c 200 <<<"$stats_text" | tr '\n' ' '))"
    fi
else
    INGEST_NOTE="n/a (server log storage not built yet)"
fi
# Delivered = stored: the same flood with WAYPOST_LOG_MODE=block (the child's writes wait while
# the entrypoint's buffer is full, so nothing is dropped and the child runs at the speed the
# server stores). Its own app, so the drop-mode rounds above do not count.
BLOCK_STORED_MIBS="" BLOCK_CHILD_MIBS="" BLOCK_NOTE="n/a (server log storage not built yet)"
if ((HAVE_LOGS)); then
    BLOCK_ENV="$(token_env benchlogsblock)"
    # shellcheck disable=SC2046
    read -r BL_WALL _ _ _ BL_EXIT <<<"$("$H" measure -- env -i "PATH=$PATH" $(cat "$BLOCK_ENV") \
        WAYPOST_LOG_LEVEL=ERROR WAYPOST_LOG_MODE=block "$EP" "$H" lines "$LOG_BYTES" --report "$WORK/block.report" 2>"$WORK/block-logs.err")"
    [[ "$BL_EXIT" == 0 ]] || warn "the entrypoint exited $BL_EXIT in the block-mode log run: $(tail -n2 "$WORK/block-logs.err")"
    read -r BL_BYTES BL_SECS <"$WORK/block.report"
    BLOCK_CHILD_MIBS=$(awk -v b="$BL_BYTES" -v s="$BL_SECS" 'BEGIN { printf "%.1f", b / 1048576 / s }')
    sleep 1
    stats_text="$(wp logs --app benchlogsblock --stats 2>&1 || true)"
    read -r bentries blost <<<"$(awk 'NF == 3 && $2 ~ /^[0-9]+$/ && $3 ~ /^[0-9]+$/ { print $2, $3; exit }' <<<"$stats_text")" || true
    if [[ -n "${bentries:-}" && -n "${blost:-}" ]]; then
        bgot=$((bentries - blost))
        # Stored lines × 100 bytes over the entrypoint's wall time (child start to exit, incl. the
        # final flush): what reached the database, not what the child wrote.
        BLOCK_STORED_MIBS=$(awk -v n="$bgot" -v s="$BL_WALL" 'BEGIN { printf "%.1f", n * 100 / 1048576 / s }')
        BLOCK_NOTE="$bgot of $bentries lines stored ($blost lost) in ${BL_WALL} s (the entrypoint's wall time), $(awk -v n="$bgot" -v s="$BL_WALL" 'BEGIN { printf "%.0f", n / s }') lines/s; the child wrote at $BLOCK_CHILD_MIBS MiB/s (its own write time); aim ≥ 100 MiB/s"
    else
        BLOCK_NOTE="n/a (could not read \`waypost logs --stats\`: $(head -c 200 <<<"$stats_text" | tr '\n' ' '))"
    fi
fi

# The same block-mode flood against a fresh server of each backend, side by side (PostgreSQL
# durable: fsync and synchronous commit on); bench/log-ingest.sh, a quarter of LOG_BYTES.
BACKENDS_MD="(skipped: the server has no log storage)"
if ((HAVE_LOGS)); then
    say "logs: delivered (stored) on SQLite and on PostgreSQL"
    BACKENDS_MD="$("$BENCH/log-ingest.sh" "$( ((quick)) && echo 16MiB || echo 256MiB)" 2>"$WORK/ingest-backends.err")" ||
        BACKENDS_MD="${BACKENDS_MD}

The run failed: $(tail -n3 "$WORK/ingest-backends.err" | tr '\n' ' ')"
fi

# ---- 6. tunnel --------------------------------------------------------------------------------------
# Peer tunnels for the same figures, built once from crates.io into target/bench-peers.
RATHOLE_VERSION=0.5.0
BORE_VERSION=0.6.0
PEERS="$ROOT/target/bench-peers"
PEER_NOTE=""
# Each peer is built from its own lock file first; a lock file whose pinned crates no longer build
# with this compiler (rathole 0.5.0 pins a `time` that newer rustc rejects) falls back to a fresh
# resolution within the same semver ranges.
peer_install() { # peer_install BIN CRATE VERSION [cargo install flags...]
    local bin="$1" crate="$2" version="$3"
    shift 3
    [[ -x "$PEERS/bin/$bin" ]] && return 0
    cargo install --quiet --locked --root "$PEERS" --version "$version" "$@" "$crate" >&2 ||
        cargo install --quiet --root "$PEERS" --version "$version" "$@" "$crate" >&2
}
peers_installed() {
    peer_install rathole rathole "$RATHOLE_VERSION" --no-default-features --features server,client || return 1
    peer_install bore bore-cli "$BORE_VERSION" || return 1
}
peer_run() { # peer_run rathole|bore: start its server and client for $APP_PORT, wrk through it
    local name="$1" cport pport pids=() i
    cport="$("$H" freeport)"
    case "$name" in
    rathole)
        pport="$("$H" freeport)"
        printf '[server]\nbind_addr = "127.0.0.1:%s"\ndefault_token = "bench"\n[server.services.web]\nbind_addr = "127.0.0.1:%s"\n' \
            "$cport" "$pport" >"$WORK/rathole-server.toml"
        printf '[client]\nremote_addr = "127.0.0.1:%s"\ndefault_token = "bench"\n[client.services.web]\nlocal_addr = "127.0.0.1:%s"\n' \
            "$cport" "$APP_PORT" >"$WORK/rathole-client.toml"
        "$PEERS/bin/rathole" -s "$WORK/rathole-server.toml" >"$WORK/rathole-server.log" 2>&1 &
        pids+=("$!")
        "$PEERS/bin/rathole" -c "$WORK/rathole-client.toml" >"$WORK/rathole-client.log" 2>&1 &
        pids+=("$!")
        ;;
    bore)
        # bore's control port is fixed (7835); it picks the public port and logs it.
        "$PEERS/bin/bore" server --bind-addr 127.0.0.1 >"$WORK/bore-server.log" 2>&1 &
        pids+=("$!")
        sleep 0.3
        "$PEERS/bin/bore" local "$APP_PORT" --local-host 127.0.0.1 --to 127.0.0.1 >"$WORK/bore-client.log" 2>&1 &
        pids+=("$!")
        for ((i = 0; i < 50; i++)); do
            pport="$(sed 's/\x1b\[[0-9;]*m//g' "$WORK/bore-client.log" | grep -o 'listening at 127.0.0.1:[0-9]*' | grep -o '[0-9]*$' || true)"
            [[ -n "$pport" ]] && break
            sleep 0.1
        done
        ;;
    esac
    local ok=0
    for ((i = 0; i < 100; i++)); do
        if [[ -n "${pport:-}" ]] && http_ok "127.0.0.1:$pport" localhost; then ok=1; break; fi
        sleep 0.1
    done
    if ((ok)); then
        wrk_run "${name}_ka" "http://127.0.0.1:$pport/"
        wrk_run "${name}_nc" "http://127.0.0.1:$pport/" "Connection: close"
    else
        warn "$name did not pass requests to the app; its rows say n/a"
    fi
    for i in "${pids[@]}"; do kill -TERM "$i" 2>/dev/null || true; done
    for i in "${pids[@]}"; do wait "$i" 2>/dev/null || true; done
}
TUN_NOTE=""
declare -A RPS P99
if ((have_ingress)) && command -v wrk >/dev/null; then
    say "tunnel: wrk -t2 -c$TUNNEL_CONNS -d${TUNNEL_SECONDS}s direct vs ingress+tunnel, keep-alive and Connection: close"
    WEB_ENV="$(token_env benchweb)"
    APP_PORT="$("$H" freeport)"
    start_bg run_ep "$WEB_ENV" PORT="$APP_PORT" -- "$H" http "$APP_PORT" </dev/null >/dev/null 2>&1
    WEB_EP=$!
    wait_live benchweb 1 || true
    ok=0
    for ((i = 0; i < 100; i++)); do
        if http_ok "$INGRESS" benchweb.localhost; then ok=1; break; fi
        sleep 0.1
    done
    if ((ok)); then
        wrk_run() { # wrk_run KEY URL [HEADER...]
            local key="$1" url="$2" out
            shift 2
            local hdr=()
            for h in "$@"; do hdr+=(-H "$h"); done
            out="$(wrk -t2 -c"$TUNNEL_CONNS" -d"${TUNNEL_SECONDS}s" --latency "${hdr[@]+"${hdr[@]}"}" "$url" 2>&1)" || true
            echo "$out" >"$WORK/wrk-$key.txt"
            RPS[$key]="$(awk '/^Requests\/sec:/ { print $2 }' <<<"$out")"
            P99[$key]="$(awk '$1 == "99%" { v = $2; if (v ~ /us$/) { sub(/us$/, "", v); v /= 1000 } else if (v ~ /ms$/) { sub(/ms$/, "", v) } else if (v ~ /s$/) { sub(/s$/, "", v); v *= 1000 } print v }' <<<"$out")"
        }
        wrk_run direct_ka "http://127.0.0.1:$APP_PORT/"
        wrk_run tunnel_ka "http://$INGRESS/" "Host: benchweb.localhost"
        wrk_run direct_nc "http://127.0.0.1:$APP_PORT/" "Connection: close"
        wrk_run tunnel_nc "http://$INGRESS/" "Host: benchweb.localhost" "Connection: close"
        TUN_HWM="$(kb "$WEB_EP" VmHWM)"
        # The peers, against the same app in the same run: rathole and bore are plain TCP
        # tunnels (one data connection per visitor, no TLS, no HTTP parsing).
        if ((!SKIP_PEERS)) && peers_installed; then
            peer_run rathole
            peer_run bore
        elif ((!SKIP_PEERS)); then
            PEER_NOTE="n/a (cargo install of rathole $RATHOLE_VERSION / bore-cli $BORE_VERSION failed; see the log)"
        else
            PEER_NOTE="skipped (SKIP_PEERS=1)"
        fi
        # $! is env(1), which exec'd the entrypoint: same pid.
    else
        TUN_NOTE="n/a (the ingress did not answer 200 for benchweb.localhost)"
    fi
    kill_tree "$WEB_EP"
elif ((have_ingress)); then
    TUN_NOTE="n/a (wrk not installed)"
else
    TUN_NOTE="n/a (the server's ingress is not built yet)"
fi

# The rest needs the machine to itself: stop the report's server.
kill_tree "$SERVER_PID"

# ---- 7. fleet ---------------------------------------------------------------------------------------
FLEET_MD=""
if [[ "$SKIP_FLEET" != 1 ]]; then
    say "fleet: $FLEET_INSTANCES simulated entrypoints against one server (waypost-fleet)"
    if "$FLEET" --waypost-bin "$WP" --spawn-server --instances "$FLEET_INSTANCES" --duration "$FLEET_DURATION" \
        --heartbeat-interval 15s --idle-window "$( ((quick)) && echo 4s || echo 30s)" \
        --burst "$( ((quick)) && echo 2s || echo 10s)" \
        --json "$WORK/fleet.json" --markdown "$WORK/fleet.md" >"$WORK/fleet.txt" 2>"$WORK/fleet.err"; then
        FLEET_MD="$(cat "$WORK/fleet.md")"
    else
        FLEET_MD="$(cat "$WORK/fleet.md" 2>/dev/null || true)"
        FLEET_MD="${FLEET_MD}

The fleet run failed: $(tail -n3 "$WORK/fleet.err" | tr '\n' ' ')"
    fi
    cat "$WORK/fleet.txt" >&2 || true
else
    FLEET_MD="(skipped: SKIP_FLEET=1)"
fi

# ---- 8. fleet on replicas sharing PostgreSQL, next to the SQLite fleet above -----------------------
REPLICAS_MD="(skipped: SKIP_REPLICAS=1 or SKIP_FLEET=1)"
if [[ "$SKIP_FLEET" != 1 && "$SKIP_REPLICAS" != 1 ]]; then
    say "fleet: $FLEET_INSTANCES simulated entrypoints against 2 replicas sharing PostgreSQL"
    rc=0
    REPLICAS_MD="$(BASELINE_JSON="$( [[ -s "$WORK/fleet.json" ]] && echo "$WORK/fleet.json" || true)" \
        FLEET_INSTANCES="$FLEET_INSTANCES" FLEET_DURATION="$FLEET_DURATION" \
        FLEET_IDLE="$( ((quick)) && echo 4s || echo 30s)" FLEET_BURST="$( ((quick)) && echo 2s || echo 10s)" \
        "$BENCH/fleet-replicas.sh" 2>"$WORK/replicas.err")" || rc=$?
    ((rc == 0)) || REPLICAS_MD="${REPLICAS_MD}

The replicas run failed ($rc): $(tail -n3 "$WORK/replicas.err" | tr '\n' ' ')"
fi

T_END=$(date +%s)
LOAD_END="$(loadavg)"

# ---- the report ---------------------------------------------------------------------------------------
kib() { awk -v v="$1" 'BEGIN { if (v == v + 0 && v != "") printf "%d KiB", v; else printf "n/a" }'; }
ms() { awk -v v="$1" 'BEGIN { if (v == v + 0 && v != "") printf "%.2f ms", v / 1000; else printf "n/a" }'; }
rps() { fmt "${RPS[$1]:-}" 0; }
p99() { fmt "${P99[$1]:-}" 2; }
tunnel_rows() {
    if [[ -n "$TUN_NOTE" ]]; then
        echo "| tunnel requests/s and p99 | $TUN_NOTE | | | |"
        return
    fi
    echo "| tunnel, keep-alive: requests/s | $(rps tunnel_ka) | $(rps direct_ka) direct | $(ratio "${RPS[tunnel_ka]:-}" "${RPS[direct_ka]:-}") | aim ≥ 0.6 |"
    echo "| tunnel, keep-alive: p99 latency | $(p99 tunnel_ka) ms | $(p99 direct_ka) ms direct | $(ratio "${P99[tunnel_ka]:-}" "${P99[direct_ka]:-}") | |"
    echo "| tunnel, new connection per request: requests/s | $(rps tunnel_nc) | $(rps direct_nc) direct | $(ratio "${RPS[tunnel_nc]:-}" "${RPS[direct_nc]:-}") | aim ≥ 0.6; \`Connection: close\` |"
    echo "| tunnel, new connection per request: p99 latency | $(p99 tunnel_nc) ms | $(p99 direct_nc) ms direct | $(ratio "${P99[tunnel_nc]:-}" "${P99[direct_nc]:-}") | |"
    echo "| entrypoint peak RSS under that load (VmHWM) | $(kib "${TUN_HWM:-}") | $(kib "$IDLE_RSS") idle with a session | $(ratio "${TUN_HWM:-}" "$IDLE_RSS") | all four wrk runs against one instance |"
    if [[ -n "$PEER_NOTE" ]]; then
        echo "| peers (rathole, bore) | $PEER_NOTE | | | |"
        return
    fi
    local p v
    for p in rathole bore; do
        v="$RATHOLE_VERSION"
        [[ "$p" == bore ]] && v="$BORE_VERSION"
        echo "| peer $p $v, keep-alive: requests/s | $(rps "${p}_ka") | $(rps direct_ka) direct | $(ratio "${RPS[${p}_ka]:-}" "${RPS[direct_ka]:-}") | waypost ÷ $p: $(ratio "${RPS[tunnel_ka]:-}" "${RPS[${p}_ka]:-}") |"
        echo "| peer $p $v, new connection per request: requests/s | $(rps "${p}_nc") | $(rps direct_nc) direct | $(ratio "${RPS[${p}_nc]:-}" "${RPS[direct_nc]:-}") | waypost ÷ $p: $(ratio "${RPS[tunnel_nc]:-}" "${RPS[${p}_nc]:-}") |"
    done
}
exec_rows() {
    if [[ -z "$RTT_EXEC" && -z "$EXEC_MBS" ]]; then
        echo "| exec keystroke round trip | ${EXEC_NOTE:-n/a} | $(ms "$RTT_LOCAL") local PTY (p50) | | |"
        return
    fi
    echo "| exec -ti keystroke round trip, p50 | $(ms "$RTT_EXEC") | $(ms "$RTT_LOCAL") local PTY | $(ratio "$RTT_EXEC" "$RTT_LOCAL") | $RTT_COUNT keystrokes, \`sh -c 'stty raw -echo; exec cat'\` on both |"
    echo "| exec -ti keystroke round trip, p99 | $(ms "${RTT_EXEC_P99:-}") | $(ms "${RTT_LOCAL_P99:-}") local PTY | $(ratio "${RTT_EXEC_P99:-}" "${RTT_LOCAL_P99:-}") | |"
    echo "| \`waypost exec -i -- cat\` throughput, $EXEC_BYTES | $(fmt "$EXEC_MBS") MB/s | $(fmt "$CAT_MBS") MB/s through a local \`cat\` | $(ratio "$EXEC_MBS" "$CAT_MBS") | ${EXEC_NOTE} |"
}

{
    echo "# waypost benchmark report"
    echo
    echo "Generated by \`make bench\` (bench/bench.sh) — one run, every figure next to its baseline."
    echo
    echo "| | |"
    echo "|---|---|"
    echo "| revision | \`$REV\` |"
    echo "| date (UTC) | $(date -u +%Y-%m-%dT%H:%M:%SZ) |"
    echo "| machine | $(nproc) cores, $(awk '/MemTotal/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo), $(uname -sr) |"
    echo "| load average at start / end | $LOAD_START / $LOAD_END |"
    echo "| duration | build $((T_BUILT - T_START)) s, measurements $((T_END - T_BUILT)) s |"
    echo "| mode | $( ((quick)) && echo "**--quick** (short runs; rough figures)" || echo full) |"
    echo
    echo "Everything runs on loopback on this one machine: load generator, server, entrypoint and app"
    echo "share its cores, so ratios are the meaningful part. Ratio = waypost ÷ baseline."
    echo
    echo "## Entrypoint"
    echo
    echo "| figure | waypost | baseline | ratio | note |"
    echo "|---|---|---|---|---|"
    echo "| binary size | $SIZE bytes | $TINI_SIZE bytes tini-static | $(ratio "$SIZE" "$TINI_SIZE") | \`make build\` (static musl, min profile) |"
    echo "| idle VmRSS, session open, child \`sleep\` | $(kib "$IDLE_RSS") | $(kib "$TI_RSS") tini-static -s, same child | $(ratio "$IDLE_RSS" "$TI_RSS") | median of 3 copies each |"
    echo "| idle RssAnon, session open | $(kib "$IDLE_ANON") | $(kib "$TI_ANON") tini-static | $(ratio "$IDLE_ANON" "$TI_ANON") | |"
    echo "| idle VmRSS / RssAnon, no server (size-report) | $(kib "${NS_RSS:-}") / $(kib "${NS_ANON:-}") | $(kib "${NS_TRSS:-}") / $(kib "${NS_TANON:-}") tini-static | $(ratio "${NS_RSS:-}" "${NS_TRSS:-}") | size-report/report.sh |"
    echo "| idle wake-ups per minute, session open | $WAKE_EP | $WAKE_TI tini-static | $(ratio "$WAKE_EP" "$WAKE_TI") | voluntary context switches over ${IDLE_SECONDS}s ($WAKE_EP_N vs $WAKE_TI_N); heartbeat 15 s = 4 Pings + 4 Pongs a minute |"
    echo "| startup latency exec → child, median | $(ms "$SU_EP") | $(ms "$SU_DIRECT") child started directly | $(ratio "$SU_EP" "$SU_DIRECT") | server up: TLS + Hello + Welcome before the child; p90 $(ms "$SU_EP_P90"); $STARTUP_RUNS runs |"
    echo "| startup latency, WAYPOST_DISABLE=1 | $(ms "$SU_EPD") | $(ms "$SU_TINI") tini-static | $(ratio "$SU_EPD" "$SU_TINI") | plain init, no server |"
    echo
    echo "## Logs"
    echo
    echo "A child writing $LOG_BYTES of 100-byte lines; stdout to /dev/null."
    echo
    echo "| figure | waypost | baseline | ratio | note |"
    echo "|---|---|---|---|---|"
    echo "| throughput while shipping to the server | $LOG_EP_MBS MB/s | $LOG_CAT_MBS MB/s piped into \`cat >/dev/null\` | $LOG_RATIO | aim ≥ 0.5; the child's own write time; median of $LOG_ROUNDS alternating rounds ($LOG_ROUNDS_TEXT) |"
    echo "| entrypoint CPU per GiB | $LOG_CPU_PER_GIB s | | | own user + system time (/proc/PID/stat), median of the rounds; last round: user $EPL_USER s + sys $EPL_SYS s, wall $EPL_WALL s incl. start and the final flush |"
    echo "| entrypoint peak RSS (VmHWM) | $(kib "$EPL_HWM") | $(kib "$IDLE_RSS") idle with a session | $(ratio "$EPL_HWM" "$IDLE_RSS") | highest of the rounds |"
    echo "| server ingest | $(fmt "$INGEST_LPS" 0) lines/s | | | $INGEST_NOTE |"
    echo "| delivered (stored), WAYPOST_LOG_MODE=block | ${BLOCK_STORED_MIBS:-n/a} MiB/s | ${BLOCK_CHILD_MIBS:-n/a} MiB/s the child's own write speed | $(ratio "${BLOCK_STORED_MIBS:-}" "${BLOCK_CHILD_MIBS:-}") | $BLOCK_NOTE |"
    echo
    echo "Delivered (stored) by backend: \`bench/log-ingest.sh\`, the block-mode flood into a fresh server on each (PostgreSQL 15 local, fsync and synchronous commit on):"
    echo
    echo "$BACKENDS_MD"
    echo
    echo "## URL service (tunnel) and exec"
    echo
    echo "| figure | waypost | baseline | ratio | note |"
    echo "|---|---|---|---|---|"
    tunnel_rows
    exec_rows
    echo
    echo "wrk: \`wrk -t2 -c$TUNNEL_CONNS -d${TUNNEL_SECONDS}s --latency\`; the app is a 12-byte HTTP/1.1 responder (bench/helper \`http\`) run by the entrypoint; direct = its port, tunnel = the server's ingress with \`Host: benchweb.localhost\`; the peers tunnel the same app's port over their own loopback server (rathole: TCP transport, bore: defaults). All three tunnels share the machine's 2 cores with wrk and the app, so a tunnel's ceiling here is set by the CPU each hop costs per request."
    echo
    echo "## Fleet: one server, $FLEET_INSTANCES simulated entrypoints"
    echo
    echo "\`waypost-fleet --spawn-server --instances $FLEET_INSTANCES --duration $FLEET_DURATION\`: tokio tasks speaking the real protocol (TLS 1.3, Hello/Welcome, Ping + Status every 15 s, LogBatch/LogAck, ConfigApplied, the entrypoint's jittered backoff), on loopback; the simulator shares the 2 cores with the server."
    echo
    echo "$FLEET_MD"
    echo
    echo "## Fleet: 2 replicas sharing PostgreSQL, next to the one server on SQLite above"
    echo
    echo "\`bench/fleet-replicas.sh\`: \`waypost-fleet --spawn-server --replicas 2 --database postgres://...\`, same instances and phases; each instance starts at a random replica and moves to the next on loss, as the entrypoint does with a WAYPOST_SERVER list; the run ends by SIGKILLing replica B. PostgreSQL runs with fsync, synchronous_commit and full_page_writes on. Both replicas, PostgreSQL and the simulator share the 2 cores."
    echo
    echo "$REPLICAS_MD"
} >"$REPORT"

if [[ ! -s "$HISTORY" ]]; then
    printf 'date_utc\trev\tmode\tload_start\tsize_bytes\tidle_rss_kib\tidle_anon_kib\twakeups_per_min\tstartup_ms\tlog_ratio\ttunnel_ka_ratio\ttunnel_nc_ratio\texec_rtt_p50_ms\tfleet\tnote\n' >"$HISTORY"
fi
fleet_summary="$(awk -F'|' '/instances connected/ { gsub(/^ +| +$/, "", $3); print $3 }' <<<"$FLEET_MD" | head -n1)"
printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$REV" \
    "$( ((quick)) && echo quick || echo full)" "$LOAD_START" "$SIZE" "$IDLE_RSS" "$IDLE_ANON" "$WAKE_EP" \
    "$(awk -v v="$SU_EP" 'BEGIN { printf "%.2f", v / 1000 }')" "$LOG_RATIO" \
    "$(ratio "${RPS[tunnel_ka]:-}" "${RPS[direct_ka]:-}")" "$(ratio "${RPS[tunnel_nc]:-}" "${RPS[direct_nc]:-}")" \
    "$(awk -v v="$RTT_EXEC" 'BEGIN { if (v != "") printf "%.2f", v / 1000; else printf "n/a" }')" \
    "${fleet_summary:-n/a}" "$(printf '%s' "${NOTE:-}" | tr '\t\r\n' '   ')" >>"$HISTORY"

say "wrote $REPORT ($(( $(date +%s) - T_START )) s)"
cat "$REPORT"
