#!/usr/bin/env bash
# Installs (once: Debian's redis-server on the host) and starts a Redis server on loopback, the Celery
# broker of the deployment tests (tests/deploy). Idempotent; the last line printed is its URL.
#
#   scripts/redis.sh [start|stop|status|install] [--port N] [--dir DIR]    (install: only the package)
set -euo pipefail

ACTION=start
PORT=63790
DIR=${PGBG_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/airflow_pgbg}/redis
while [ $# -gt 0 ]; do
    case "$1" in
        start|stop|status|install) ACTION=$1 ;;
        --port) PORT=$2; shift ;;
        --dir) DIR=$2; shift ;;
        *) echo "redis: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done

log() { echo "redis: $*" >&2; }

if ! command -v redis-server >/dev/null; then
    if [ "$(id -u)" != 0 ]; then
        log "redis-server is missing and installing it needs root (apt-get install redis-server)"
        exit 1
    fi
    log "installing redis-server"
    apt-get update -qq >&2
    # The package's own service is not wanted: each test run starts a server of its own.
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-server >&2
fi
[ "$ACTION" = install ] && exit 0

mkdir -p "$DIR"
PIDFILE=$DIR/redis-$PORT.pid
# The pid file outlives a reboot, and its pid may since belong to another process.
running() { [ -f "$PIDFILE" ] && [ "$(cat "/proc/$(cat "$PIDFILE")/comm" 2>/dev/null)" = redis-server ]; }

case "$ACTION" in
    stop)
        if running; then kill "$(cat "$PIDFILE")"; fi
        exit 0 ;;
    status)
        running && echo running || echo stopped
        exit 0 ;;
esac

if ! running; then
    log "starting Redis on 127.0.0.1:$PORT"
    # No persistence: a broker of a test run starts empty.
    redis-server --bind 127.0.0.1 --port "$PORT" --daemonize yes --pidfile "$PIDFILE" \
        --logfile "$DIR/redis-$PORT.log" --dir "$DIR" --save "" --appendonly no >&2
    for _ in $(seq 100); do
        redis-cli -p "$PORT" ping >/dev/null 2>&1 && break
        sleep 0.05
    done
    redis-cli -p "$PORT" ping >/dev/null || { log "did not start; see $DIR/redis-$PORT.log"; exit 1; }
fi

echo "redis://127.0.0.1:$PORT/0"
