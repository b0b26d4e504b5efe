#!/usr/bin/env bash
# Delivered (stored) log throughput of one instance, WAYPOST_LOG_MODE=block, on SQLite and on
# PostgreSQL side by side: the same flood of 100-byte lines through the real entrypoint into a
# fresh server of each backend. Needs the release builds `make bench` makes (it calls this), and
# PostgreSQL for the second row (scripts/with-postgres.sh with PG_DURABLE=1: fsync and synchronous
# commit on, as an operator runs it; skipped with a note when PostgreSQL is missing).
#
#   bench/log-ingest.sh [BYTES]        (default 256MiB; prints one markdown row per backend)
#
# With WAYPOST_TEST_DATABASE set (a base URL, as scripts/with-postgres.sh exports), the
# PostgreSQL row runs against that cluster; otherwise the script runs itself under
# scripts/with-postgres.sh for it.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
BYTES="${1:-256MiB}"
EP="$ROOT/target/x86_64-unknown-linux-musl/min/waypost-entrypoint"
WP="${WP:-$ROOT/target/release/waypost}"   # WP=OTHER_BUILD: a baseline server side by side
H="$ROOT/target/bench-helper/release/waypost-bench-helper"
for b in "$EP" "$WP" "$H"; do [[ -x "$b" ]] || { echo "log-ingest.sh: missing $b (run make bench first)" >&2; exit 2; }; done

# run_one LABEL [--database URL]: prints "LABEL stored_mibs child_mibs lines secs".
run_one() {
    local label="$1"; shift
    local work; work="$(mktemp -d)"
    local pid
    (
        export WAYPOST_CONTEXT="$work/context.json" HOME="$work"
        unset WAYPOST_ADDR WAYPOST_ADMIN_TOKEN WAYPOST_CA WAYPOST_SERVER WAYPOST_TOKEN WAYPOST_DATABASE_URL
        export WAYPOST_METRICS_ADDR=127.0.0.1:0 # not the default 9703 a running server may hold
        "$WP" server run --data-dir "$work/data" --control-addr 127.0.0.1:0 --api-addr 127.0.0.1:0 \
            --ingress-addr 127.0.0.1:0 "$@" >"$work/server.log" 2>&1 &
        pid=$!
        trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null; rm -rf "$work"' EXIT
        for ((i = 0; i < 300; i++)); do
            grep -q "\"pid\": *$pid" "$work/data/server.json" 2>/dev/null && break
            kill -0 "$pid" 2>/dev/null || { cat "$work/server.log" >&2; exit 1; }
            sleep 0.1
        done
        "$WP" app create ingest >/dev/null
        "$WP" token create --app ingest -o env >"$work/ingest.env"
        # shellcheck disable=SC2046
        read -r wall _ _ _ code <<<"$("$H" measure -- env -i "PATH=$PATH" $(cat "$work/ingest.env") \
            WAYPOST_LOG_LEVEL=ERROR WAYPOST_LOG_MODE=block "$EP" "$H" lines "$BYTES" --report "$work/report" 2>"$work/ep.err")"
        [[ "$code" == 0 ]] || { echo "log-ingest.sh: the entrypoint exited $code: $(tail -n2 "$work/ep.err")" >&2; exit 1; }
        read -r bytes secs <"$work/report"
        sleep 1
        read -r entries lost <<<"$("$WP" logs --app ingest --stats 2>&1 | awk 'NF == 3 && $2 ~ /^[0-9]+$/ && $3 ~ /^[0-9]+$/ { print $2, $3; exit }')"
        got=$((entries - lost))
        awk -v l="$label" -v n="$got" -v w="$wall" -v b="$bytes" -v s="$secs" \
            'BEGIN { printf "%s %.1f %.1f %d %.2f\n", l, n * 100 / 1048576 / w, b / 1048576 / s, n, w }'
    )
}

if [[ "${1:-}" == --pg-only ]]; then
    BYTES="${2:-256MiB}"
    base="$WAYPOST_TEST_DATABASE"
    port="${base##*:}"
    bin="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -t/ -k5,5 -rn | head -n1)"
    name="ingest_$$"
    "${bin:-/usr/bin}/createdb" -h 127.0.0.1 -p "$port" -U postgres "$name"
    run_one postgres --database "$base/$name"
    exit 0
fi

echo "| backend | delivered (stored) | the child's own write speed | lines | wall |"
echo "|---|---|---|---|---|"
row() { read -r l s c n w; echo "| $l | $s MiB/s | $c MiB/s | $n | $w s |"; }
run_one sqlite | row
if [[ -n "${WAYPOST_TEST_DATABASE:-}" ]]; then
    "$0" --pg-only "$BYTES" | row
elif ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null; then
    PG_DURABLE=1 "$ROOT/scripts/with-postgres.sh" "$0" --pg-only "$BYTES" | row
else
    echo "| postgres | n/a (PostgreSQL not installed) | | | |"
fi
