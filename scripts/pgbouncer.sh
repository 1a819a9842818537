#!/usr/bin/env bash
# Provision (once, cached) and start PgBouncer in front of a server of scripts/db.sh.
#
# Production PostgreSQL mostly sits behind PgBouncer in transaction mode, where a client's session is
# not a server session; the suite runs the hook, the trigger, the fleet watcher and real Airflow
# deployments through it. Debian 12's pgbouncer (1.18) predates prepared statements in transaction
# mode (1.21), so it runs from the same Debian sid root as the servers (1.26 there), as the postgres
# user, on loopback. Idempotent: a second run only checks it is up. The last line printed is the DSN.
#
#   scripts/pgbouncer.sh [start|stop|restart|status] [--instance NAME] [--port N] [--server-port M]
#                        [--mode transaction|session] [-s name=value ...]
#
# Defaults: instance "main-tx", port 64318, in front of the main server (54318), transaction mode. -s adds
# a setting of the [pgbouncer] section (e.g. -s default_pool_size=4).
set -euo pipefail

ACTION=start
INSTANCE=main-tx
PORT=64318
SERVER_PORT=${PGBG_DB_PORT:-54318}
MODE=transaction
SETTINGS=()
while [ $# -gt 0 ]; do
    case "$1" in
        start|stop|restart|status) ACTION=$1 ;;
        --instance) INSTANCE=$2; shift ;;
        --port) PORT=$2; shift ;;
        --server-port) SERVER_PORT=$2; shift ;;
        --mode) MODE=$2; shift ;;
        -s) SETTINGS+=("$2"); shift ;;
        *) echo "pgbouncer: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done
case "$MODE" in transaction|session) ;; *) echo "pgbouncer: --mode transaction or session" >&2; exit 2 ;; esac

CACHE_DIR=${PGBG_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/airflow_pgbg}
ROOT=$CACHE_DIR/sid-root
DIR=/var/lib/postgresql/pgbouncer-$INSTANCE
INI=$DIR/pgbouncer.ini
PIDFILE=$DIR/pgbouncer.pid

log() { echo "pgbouncer: $*" >&2; }

if [ "$(id -u)" != 0 ]; then
    log "needs root (chroot into the sid root of scripts/db.sh)"
    exit 1
fi
if [ ! -f "$ROOT/.pgbg-provisioned" ]; then
    # The root and its servers come from db.sh (debootstrap on first use).
    bash "$(dirname "$0")/db.sh" >/dev/null
fi
mountpoint -q "$ROOT/proc" || mount -t proc proc "$ROOT/proc"

in_root() { chroot "$ROOT" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 "$@"; }
as_postgres() { in_root /usr/sbin/runuser -u postgres -- "$@"; }

if [ ! -x "$ROOT/usr/sbin/pgbouncer" ]; then
    log "installing pgbouncer into the sid root"
    chroot "$ROOT" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive \
        sh -c "apt-get -qq -o Acquire::Check-Valid-Until=false update &&
               apt-get install -y -qq --no-install-recommends pgbouncer" >&2
fi

pid() { [ -f "$ROOT$PIDFILE" ] && cat "$ROOT$PIDFILE"; }
# The pid file outlives a reboot, and its pid may since belong to another process.
running() { local p; p=$(pid) && [ -n "$p" ] && [ "$(cat "/proc/$p/comm" 2>/dev/null)" = pgbouncer ]; }

stop() {
    local p
    if running; then
        p=$(pid)
        kill -INT "$p"  # shut down at once; clients see their connection end
        for _ in $(seq 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.05; done
    fi
    rm -f "$ROOT$PIDFILE"
}

case "$ACTION" in
    stop) stop; exit 0 ;;
    status) running && echo running || echo stopped; exit 0 ;;
    restart) stop ;;
esac

if ! running; then
    rm -f "$ROOT$PIDFILE"  # stale: PgBouncer refuses to start while its pid is alive, whoever has it now
    in_root install -d -o postgres -g postgres "$DIR"
    # Every database of the server, as any role: the servers trust loopback, and so does the pooler,
    # which looks a role up with its auth_query (as postgres) rather than from a list kept in step.
    {
        echo "[databases]"
        echo "* = host=127.0.0.1 port=$SERVER_PORT"
        echo "[pgbouncer]"
        echo "listen_addr = 127.0.0.1"
        echo "listen_port = $PORT"
        echo "unix_socket_dir ="
        echo "auth_type = trust"
        echo "auth_file = $DIR/userlist.txt"
        echo "auth_user = postgres"
        echo "pool_mode = $MODE"
        echo "max_client_conn = 4000"
        echo "default_pool_size = 20"
        echo "max_prepared_statements = 200"
        echo "logfile = $DIR/pgbouncer.log"
        echo "pidfile = $PIDFILE"
        echo "admin_users = postgres"
        for s in "${SETTINGS[@]}"; do echo "${s%%=*} = ${s#*=}"; done
    } >"$ROOT$INI"
    echo '"postgres" ""' >"$ROOT$DIR/userlist.txt"
    chroot "$ROOT" chown postgres:postgres "$INI" "$DIR/userlist.txt"
    log "starting PgBouncer ($INSTANCE, $MODE mode) on 127.0.0.1:$PORT in front of 127.0.0.1:$SERVER_PORT"
    # One descriptor per client and server connection (the default soft limit, 1024, is below them).
    ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
    as_postgres /usr/sbin/pgbouncer -d "$INI" >&2
    for _ in $(seq 100); do running && break; sleep 0.05; done
    running || { log "did not start; see $ROOT$DIR/pgbouncer.log"; tail -n 20 "$ROOT$DIR/pgbouncer.log" >&2; exit 1; }
fi

echo "postgresql://postgres@127.0.0.1:$PORT/postgres"
