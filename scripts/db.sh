#!/usr/bin/env bash
# Provision (once, cached) and start PostgreSQL 18 servers with the real pg_background 2.x.
#
# Debian 12 has no pg_background package and its glibc is too old for sid's, so the servers run
# from a minimal Debian sid root made with debootstrap; the host reaches them over TCP on loopback.
# Idempotent: a second run only checks the server is up. The last line printed is the DSN. With
# PGBG_TEST_DSN set (and no --instance), nothing is provisioned and that DSN is printed instead.
#
#   scripts/db.sh [start|restart|stop|status|provision] [--instance NAME --port N] [--without EXT] [-c name=value ...]
#
# The default instance ("main", port 54318) is the one `make test` and `make demo` use. Tests start
# others with their own data directory and settings, e.g. a server with max_connections=100 that a
# test may restart: --instance fleet --port 54319 -c max_connections=100. --without pg_background
# starts a server on which that extension is not available (PostgreSQL 18's extension_control_path
# lists every other extension), as on a managed service. `provision` only provisions the root (no
# server starts: CI copies the root into each of its groups, scripts/ci.sh).
set -euo pipefail

ACTION=start
INSTANCE=main
PORT=${PGBG_DB_PORT:-54318}
EXTRA=()
WITHOUT=
while [ $# -gt 0 ]; do
    case "$1" in
        start|restart|stop|status|provision) ACTION=$1 ;;
        --instance) INSTANCE=$2; shift ;;
        --port) PORT=$2; shift ;;
        --without) WITHOUT=$2; shift ;;
        -c) EXTRA+=(-c "$2"); shift ;;
        *) echo "db: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done

if [ -n "${PGBG_TEST_DSN:-}" ] && [ "$INSTANCE" = main ] && [ "$ACTION" != provision ]; then
    echo "$PGBG_TEST_DSN"
    exit 0
fi

CACHE_DIR=${PGBG_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/airflow_pgbg}
ROOT=$CACHE_DIR/sid-root
PGBIN=/usr/lib/postgresql/18/bin
if [ "$INSTANCE" = main ]; then
    PGDATA=/var/lib/postgresql/pgbg
else
    PGDATA=/var/lib/postgresql/pgbg-$INSTANCE
fi
LOG=$PGDATA.log
# What the root installs: the server, the extension, pg_cron (the launcher of managed servers) and
# PgBouncer (scripts/pgbouncer.sh puts it in front of a server; Debian 12's is too old).
PACKAGES="postgresql-18 postgresql-18-pg-background postgresql-18-cron pgbouncer"

log() { echo "db: $*" >&2; }

if [ "$(id -u)" != 0 ]; then
    log "provisioning needs root (debootstrap, chroot); or set PGBG_TEST_DSN to an existing server"
    exit 1
fi

# Same mirror the host already uses, so nothing new is trusted or reached.
mirror() {
    local uri
    uri=$(grep -hoE '(URIs:|deb) +https?://[^ ]+/debian/?( |$)' /etc/apt/sources.list /etc/apt/sources.list.d/* 2>/dev/null \
          | head -n1 | awk '{print $2}')
    echo "${uri%/}"
}

in_root() { chroot "$ROOT" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 "$@"; }
as_postgres() { in_root /usr/sbin/runuser -u postgres -- "$@"; }

mount_proc() {
    mountpoint -q "$ROOT/proc" || mount -t proc proc "$ROOT/proc"
}

apt_in() {  # root dir, packages...
    local dir=$1; shift
    chroot "$dir" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive \
        sh -c "apt-get -qq -o Acquire::Check-Valid-Until=false update &&
               apt-get install -y -qq --no-install-recommends $*" >&2
}

provision() {
    if ! command -v debootstrap >/dev/null; then
        log "installing debootstrap"
        apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >&2
    fi
    local tmp=$ROOT.partial m
    m=$(mirror)
    [ -n "$m" ] || { log "no Debian mirror found in the host's apt sources"; exit 1; }
    if [ -d "$tmp/proc" ]; then umount "$tmp/proc" 2>/dev/null || true; fi
    rm -rf "$tmp"
    mkdir -p "$CACHE_DIR"
    log "debootstrap sid into $tmp (about 30 s)"
    debootstrap --variant=minbase sid "$tmp" "$m" >&2
    mount -t proc proc "$tmp/proc"
    log "installing $PACKAGES (about 1 min)"
    apt_in "$tmp" "$PACKAGES"
    umount "$tmp/proc"
    mv "$tmp" "$ROOT"
    touch "$ROOT/.pgbg-provisioned"
}

[ -f "$ROOT/.pgbg-provisioned" ] || provision
mount_proc
# A root provisioned before pg_cron joined the package list gets it now.
if [ ! -f "$ROOT/usr/share/postgresql/18/extension/pg_cron.control" ]; then
    log "installing postgresql-18-cron into the existing root"
    apt_in "$ROOT" postgresql-18-cron
fi
[ "$ACTION" = provision ] && exit 0

pg_ctl() { as_postgres "$PGBIN/pg_ctl" -D "$PGDATA" "$@"; }
running() { pg_ctl status >/dev/null 2>&1; }

case "$ACTION" in
    stop)
        if running; then pg_ctl -m fast -w stop >&2; fi
        exit 0 ;;
    status)
        running && echo running || echo stopped
        exit 0 ;;
esac

if [ ! -f "$ROOT$PGDATA/PG_VERSION" ]; then
    log "initdb ($INSTANCE)"
    in_root install -d -o postgres -g postgres "$PGDATA"
    as_postgres "$PGBIN/initdb" -A trust -U postgres -E UTF8 --locale=C.UTF-8 -D "$PGDATA" >&2
fi
in_root install -d -o postgres -g postgres /var/run/postgresql

if [ -n "$WITHOUT" ]; then
    # An extension directory with every extension of the server but one.
    EXTDIR=/var/lib/postgresql/extensions-without-$WITHOUT
    rm -rf "$ROOT$EXTDIR"
    mkdir -p "$ROOT$EXTDIR/extension"
    for f in "$ROOT"/usr/share/postgresql/18/extension/*; do
        case "$(basename "$f")" in "$WITHOUT"--*|"$WITHOUT".control) ;; *) cp "$f" "$ROOT$EXTDIR/extension/" ;; esac
    done
    EXTRA+=(-c "extension_control_path=$EXTDIR")
fi

# mmap shared memory: the root has no /dev/shm. max_worker_processes leaves room for the engine's
# workers; 200 connections cover the Airflow end-to-end harness. pg_cron is preloaded (it runs in
# the postgres database, with background workers, as on the managed services that offer it).
OPTS="-c listen_addresses=127.0.0.1 -p $PORT -c max_worker_processes=32 -c dynamic_shared_memory_type=mmap \
      -c max_connections=200 -c unix_socket_directories=/var/run/postgresql \
      -c shared_preload_libraries=pg_cron -c cron.database_name=postgres -c cron.use_background_workers=on \
      -c cron.max_running_jobs=16 ${EXTRA[*]:-}"

if [ "$ACTION" = restart ] && running; then
    log "restarting PostgreSQL 18 ($INSTANCE) on 127.0.0.1:$PORT"
    pg_ctl -l "$LOG" -w -t 60 -m fast restart -o "$OPTS" >&2
elif ! running; then
    log "starting PostgreSQL 18 ($INSTANCE) on 127.0.0.1:$PORT"
    pg_ctl -l "$LOG" -w -t 60 start -o "$OPTS" >&2
fi

echo "postgresql://postgres@127.0.0.1:$PORT/postgres"
