#!/usr/bin/env bash
# The fleet against two server replicas sharing one PostgreSQL, next to one server on SQLite.
#
#   bench/fleet-replicas.sh            (after: cargo build --release -p waypost --bins -p waypost-fleet)
#
# Starts a private PostgreSQL (temp dir, free port, 127.0.0.1 only) with the durability a
# production operator keeps: fsync, synchronous_commit and full_page_writes on (the defaults;
# scripts/with-postgres.sh turns them off for tests). Then, unless BASELINE_JSON names the JSON of
# a one-server SQLite fleet run from the same machine and build (bench.sh passes its own), runs
# that fleet first; then `waypost-fleet --spawn-server --replicas 2 --database URL`, which ends
# by SIGKILLing one replica. Prints Markdown on stdout (the side-by-side table, the database's
# size and settings); progress on stderr. Everything shares the machine's cores.
#
# Knobs: FLEET_INSTANCES [10000], FLEET_DURATION [60s], FLEET_IDLE [30s], FLEET_BURST [10s],
# REPLICAS [2], BASELINE_JSON, PG_DURABLE=0 (the test settings instead: fsync, synchronous_commit
# and full_page_writes off, to see what durability costs), KEEP_WORK=1 (leave the work dirs: JSONs, server logs, PG log).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
FLEET_INSTANCES="${FLEET_INSTANCES:-10000}"
FLEET_DURATION="${FLEET_DURATION:-60s}"
FLEET_IDLE="${FLEET_IDLE:-30s}"
FLEET_BURST="${FLEET_BURST:-10s}"
REPLICAS="${REPLICAS:-2}"
BASELINE_JSON="${BASELINE_JSON:-}"
WP="$ROOT/target/release/waypost"
FLEET="$ROOT/target/release/waypost-fleet"
# Connections PostgreSQL accepts: each replica holds a few (store, logs, NOTIFY listener) plus
# psql here; the default of 100 leaves plenty.
PG_MAX_CONNECTIONS=100
DB=waypost_fleet
if [[ "${PG_DURABLE:-1}" == 0 ]]; then
    PG_DURABILITY="-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
else
    PG_DURABILITY="-c fsync=on -c synchronous_commit=on -c full_page_writes=on"
fi

say() { printf '\n== %s\n' "$*" >&2; }
[[ -x "$WP" && -x "$FLEET" ]] || {
    echo "fleet-replicas.sh: build first: cargo build --release -p waypost --bins -p waypost-fleet" >&2
    exit 2
}

# The highest version under Debian's /usr/lib/postgresql/*/bin, else PATH.
pgbin=""
for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -t/ -k5,5 -rn); do
    if [[ -x "$d/initdb" && -x "$d/pg_ctl" ]]; then pgbin="$d"; break; fi
done
if [[ -z "$pgbin" ]]; then
    p="$(command -v initdb || true)"
    [[ -n "$p" ]] || { echo "fleet-replicas.sh: PostgreSQL not found (Debian: apt-get install postgresql)" >&2; exit 2; }
    pgbin="$(dirname "$p")"
fi
as_pg=()
if [[ "$(id -u)" == 0 ]]; then as_pg=(runuser -u postgres --); fi

WORK="$(mktemp -d "${TMPDIR:-/tmp}/waypost-fleet-replicas.XXXXXX")"
# Its own temp dir, owned by `postgres` when root: it may not enter the 0700 work dir.
PGDIR="$(mktemp -d "${TMPDIR:-/tmp}/waypost-fleet-pg.XXXXXX")"
((${#as_pg[@]} == 0)) || chown postgres "$PGDIR"
cleanup() {
    (cd "$PGDIR" && "${as_pg[@]}" "$pgbin/pg_ctl" stop -D "$PGDIR/data" -m fast -w >/dev/null 2>&1) || true
    if [[ "${KEEP_WORK:-0}" == 1 ]]; then
        echo "fleet-replicas.sh: work dirs kept: $WORK $PGDIR" >&2
    else
        rm -rf "$WORK" "$PGDIR"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
cd_pg() { (cd "$PGDIR" && "${as_pg[@]}" "$@"); }

say "PostgreSQL $("$pgbin/pg_ctl" --version | awk '{print $3}'): $PG_DURABILITY"
cd_pg "$pgbin/initdb" -D "$PGDIR/data" --auth=trust -U postgres -E UTF8 --locale=C >"$PGDIR/initdb.out" 2>&1 || {
    cat "$PGDIR/initdb.out" >&2
    exit 2
}
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
started=""
for attempt in 1 2 3; do
    PORT="$(free_port)"
    if cd_pg "$pgbin/pg_ctl" start -D "$PGDIR/data" -l "$PGDIR/log" -w -o \
        "-p $PORT -k '$PGDIR' -c listen_addresses=127.0.0.1 -c max_connections=$PG_MAX_CONNECTIONS $PG_DURABILITY" \
        >"$PGDIR/pg_ctl.out" 2>&1; then
        started=1
        break
    fi
done
[[ -n "$started" ]] || { cat "$PGDIR/pg_ctl.out" "$PGDIR/log" >&2; exit 2; }
PG_PID="$(head -n1 "$PGDIR/data/postmaster.pid")"
"$pgbin/createdb" -h 127.0.0.1 -p "$PORT" -U postgres "$DB"
URL="postgres://postgres@127.0.0.1:$PORT/$DB"
psql_q() { "$pgbin/psql" -h 127.0.0.1 -p "$PORT" -U postgres -d "$DB" -XAtq -F $'\t' -c "$1"; }

common=(--waypost-bin "$WP" --spawn-server --instances "$FLEET_INSTANCES" --duration "$FLEET_DURATION"
    --heartbeat-interval 15s --idle-window "$FLEET_IDLE" --burst "$FLEET_BURST")

SQLITE_NOTE=""
if [[ -z "$BASELINE_JSON" ]]; then
    say "fleet: $FLEET_INSTANCES instances against one server on SQLite (the baseline)"
    BASELINE_JSON="$WORK/sqlite.json"
    "$FLEET" "${common[@]}" --data-dir "$WORK/sqlite" --json "$BASELINE_JSON" >"$WORK/sqlite.txt" 2>"$WORK/sqlite.err" || true
    cat "$WORK/sqlite.txt" >&2 || true
    if [[ -f "$WORK/sqlite/waypost.db" ]]; then
        SQLITE_NOTE="SQLite file after the baseline run: $(du -ch "$WORK"/sqlite/waypost.db* | tail -n1 | cut -f1) (waypost.db + WAL)."
    fi
fi

say "fleet: $FLEET_INSTANCES instances against $REPLICAS replicas sharing PostgreSQL"
# The most connections PostgreSQL had for the database during the run, sampled every 2 s.
(
    while :; do psql_q "select count(*) from pg_stat_activity where datname = '$DB'" >>"$WORK/conns" 2>/dev/null || true; sleep 2; done
) &
SAMPLER=$!
status=0
"$FLEET" "${common[@]}" --replicas "$REPLICAS" --database "$URL" --database-pid "$PG_PID" \
    --data-dir "$WORK/replicas" --baseline "$BASELINE_JSON" \
    --json "$WORK/replicas.json" --markdown "$WORK/replicas.md" >"$WORK/replicas.txt" 2>"$WORK/replicas.err" || status=$?
kill "$SAMPLER" 2>/dev/null || true
wait "$SAMPLER" 2>/dev/null || true
cat "$WORK/replicas.txt" >&2 || true
((status == 0)) || { echo "fleet-replicas.sh: the replicas run failed ($status):" >&2; tail -n5 "$WORK/replicas.err" >&2; }

# ---- the report -----------------------------------------------------------------------------------
cat "$WORK/replicas.md" 2>/dev/null || echo "The replicas run failed: $(tail -n3 "$WORK/replicas.err" | tr '\n' ' ')"
echo
db_size="$(psql_q "select pg_size_pretty(pg_database_size('$DB'))")"
wal="$(psql_q "select pg_size_pretty(pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0'))")"
echo "PostgreSQL $("$pgbin/pg_ctl" --version | awk '{print $3}') after the run: database $db_size, WAL written since initdb $wal (settings: $(psql_q "select string_agg(name || '=' || current_setting(name), ', ' order by name) from pg_settings where name in ('fsync', 'synchronous_commit', 'full_page_writes', 'shared_buffers', 'max_connections', 'wal_level')")). ${SQLITE_NOTE}"
echo
echo "| table | rows (estimate) | size with indexes |"
echo "|---|---|---|"
psql_q "select relname, n_live_tup, pg_size_pretty(pg_total_relation_size(relid)) from pg_stat_user_tables order by pg_total_relation_size(relid) desc limit 8" |
    awk -F'\t' '{ printf "| %s | %s | %s |\n", $1, $2, $3 }'
echo
echo "Connections to the database: at most $(sort -n "$WORK/conns" 2>/dev/null | tail -n1) during the run (sampled every 2 s, the psql sampling itself included), $(psql_q "select count(*) from pg_stat_activity where datname = '$DB'") at the end with one replica left."
exit "$status"
