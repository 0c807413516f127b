#!/usr/bin/env bash
# Run a command with a throwaway PostgreSQL server on loopback, for the several-workers test:
#   bash scripts/with-postgres.sh python -m pytest tests/test_workers.py
# The server lives in a temporary folder (trust authentication, 127.0.0.1 only) and is stopped
# and deleted when the command ends; the command sees its URL in HERETIC_TEST_POSTGRES_URL.
# Needs the Debian `postgresql` package (initdb, pg_ctl); as root, the server runs as the
# `postgres` user that package creates, since PostgreSQL refuses to run as root.
set -euo pipefail

if [ $# -eq 0 ]; then
    echo "usage: $0 COMMAND [ARGS...]" >&2
    exit 2
fi

bindir=""
if command -v pg_ctl >/dev/null 2>&1; then
    bindir=$(dirname "$(readlink -f "$(command -v pg_ctl)")")
else
    for d in /usr/lib/postgresql/*/bin; do
        [ -x "$d/pg_ctl" ] && bindir=$d
    done
fi
if [ -z "$bindir" ]; then
    echo "PostgreSQL is not installed: apt-get install -y postgresql" >&2
    exit 1
fi

as_server_user() {
    if [ "$(id -u)" -eq 0 ]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

root=$(mktemp -d /tmp/heretic-pg.XXXXXX)
chmod 755 "$root"
[ "$(id -u)" -eq 0 ] && chown postgres: "$root"
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')

stop() {
    as_server_user "$bindir/pg_ctl" -D "$root/data" -m immediate stop >/dev/null 2>&1 || true
    rm -rf "$root"
}
trap stop EXIT

as_server_user "$bindir/initdb" -D "$root/data" -U postgres --auth=trust --no-sync >"$root/initdb.log" 2>&1 \
    || { cat "$root/initdb.log" >&2; exit 1; }
as_server_user "$bindir/pg_ctl" -D "$root/data" -l "$root/server.log" -w \
    -o "-h 127.0.0.1 -p $port -k $root -c fsync=off" start >/dev/null \
    || { cat "$root/server.log" >&2; exit 1; }
as_server_user "$bindir/createdb" -h 127.0.0.1 -p "$port" -U postgres heretic_test

export HERETIC_TEST_POSTGRES_URL="postgresql://postgres@127.0.0.1:$port/heretic_test"
echo "PostgreSQL on $HERETIC_TEST_POSTGRES_URL" >&2
"$@"
