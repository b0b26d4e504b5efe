#!/usr/bin/env bash
# Run a command next to a throwaway PostgreSQL cluster, as testkit's pg::Cluster starts one.
#
#   scripts/with-postgres.sh CMD [ARG...]
#
# The cluster lives in a temp dir, listens on a free port on 127.0.0.1 only, trusts the
# superuser `postgres` without a password and runs with durability off. CMD sees
# WAYPOST_TEST_DATABASE=postgres://postgres@127.0.0.1:PORT (no database: each test creates its
# own). The cluster is stopped and its dir removed however CMD ends; the exit status is CMD's.
# Needs the Debian package `postgresql` (or initdb and pg_ctl on PATH); as root, the server
# runs as the `postgres` user the package creates. Durability is off (fsync, synchronous commit,
# full-page writes) unless PG_DURABLE=1, which keeps PostgreSQL's defaults (for benchmarks).
set -euo pipefail

usage() { sed -n '2,13s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"; }
(($# > 0)) || { usage >&2; exit 2; }
[[ "$1" != -h && "$1" != --help ]] || { usage; exit 0; }

# Start attempts, each on a new port: between choosing a port and the server binding it,
# another process can take it.
START_ATTEMPTS=3
# Connections the cluster accepts: parallel tests each run server processes with a pool.
MAX_CONNECTIONS=300

# The highest version under Debian's /usr/lib/postgresql/*/bin, else PATH.
bin=""
for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -t/ -k5,5 -rn); do
    if [[ -x "$d/initdb" && -x "$d/pg_ctl" ]]; then bin="$d"; break; fi
done
if [[ -z "$bin" ]]; then
    initdb_path="$(command -v initdb || true)"
    [[ -n "$initdb_path" ]] || {
        echo "with-postgres.sh: PostgreSQL not found: no initdb in /usr/lib/postgresql/*/bin or on PATH (Debian: apt-get install postgresql)" >&2
        exit 2
    }
    bin="$(dirname "$initdb_path")"
fi

# Tests want speed, not durability; benchmarks (PG_DURABLE=1) the settings an operator runs with.
durability="-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
[[ "${PG_DURABLE:-0}" != 1 ]] || durability=""

# PostgreSQL refuses to run as root: then every server-side command runs as `postgres`.
as_pg=()
if [[ "$(id -u)" == 0 ]]; then as_pg=(runuser -u postgres --); fi

dir="$(mktemp -d "${TMPDIR:-/tmp}/waypost-pg.XXXXXX")"
cleanup() {
    "${as_pg[@]}" "$bin/pg_ctl" stop -D "$dir/data" -m immediate -w >/dev/null 2>&1 || true
    rm -rf "$dir"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
((${#as_pg[@]} == 0)) || chown postgres "$dir"
# Run from the cluster's dir: `postgres` may not be allowed into the caller's.
cd_pg() { (cd "$dir" && "${as_pg[@]}" "$@"); }

# C locale: initdb fails on a LANG whose locale is not generated on the machine.
cd_pg "$bin/initdb" -D "$dir/data" --auth=trust -U postgres --no-sync -E UTF8 --locale=C >"$dir/initdb.out" 2>&1 || {
    cat "$dir/initdb.out" >&2
    exit 2
}

# A port nothing listens on: the kernel's choice for port 0 when python3 is there, else a random
# one in the ephemeral range that refuses a connection now.
free_port() {
    if command -v python3 >/dev/null 2>&1; then
        python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
        return
    fi
    local p
    while :; do
        p=$((32768 + RANDOM % 28000))
        (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null || { echo "$p"; return; }
    done
}

started=""
for ((attempt = 1; attempt <= START_ATTEMPTS; attempt++)); do
    port="$(free_port)"
    if cd_pg "$bin/pg_ctl" start -D "$dir/data" -l "$dir/log" -w -o \
        "-p $port -k '$dir' -c listen_addresses=127.0.0.1 $durability -c max_connections=$MAX_CONNECTIONS" \
        >"$dir/pg_ctl.out" 2>&1; then
        started=1
        break
    fi
done
if [[ -z "$started" ]]; then
    echo "with-postgres.sh: PostgreSQL did not start (last port $port):" >&2
    cat "$dir/pg_ctl.out" "$dir/log" >&2 || true
    exit 2
fi

export WAYPOST_TEST_DATABASE="postgres://postgres@127.0.0.1:$port"
echo "with-postgres.sh: PostgreSQL $("$bin/pg_ctl" --version | awk '{print $3}') at $WAYPOST_TEST_DATABASE" >&2
status=0
"$@" || status=$?
exit "$status"
