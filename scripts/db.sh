#!/usr/bin/env bash
# Provision (once, cached) and start a PostgreSQL 18 server with the real pg_background 2.x.
#
# Debian 12 has no pg_background package and its glibc is too old for sid's, so the server
# runs from a minimal Debian sid root made with debootstrap; the host reaches it over TCP on
# loopback. Idempotent: a second run only checks the server is up. The last line printed is
# the DSN. With PGBG_TEST_DSN set, nothing is provisioned and that DSN is printed instead.
set -euo pipefail

if [ -n "${PGBG_TEST_DSN:-}" ]; then
    echo "$PGBG_TEST_DSN"
    exit 0
fi

CACHE_DIR=${PGBG_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/airflow_pgbg}
ROOT=$CACHE_DIR/sid-root
PORT=${PGBG_DB_PORT:-54318}
PGBIN=/usr/lib/postgresql/18/bin
PGDATA=/var/lib/postgresql/pgbg
LOG=/var/lib/postgresql/pgbg.log

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
    log "installing postgresql-18 and postgresql-18-pg-background (about 1 min)"
    chroot "$tmp" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive \
        sh -c 'apt-get -qq -o Acquire::Check-Valid-Until=false update &&
               apt-get install -y -qq --no-install-recommends postgresql-18 postgresql-18-pg-background' >&2
    umount "$tmp/proc"
    mv "$tmp" "$ROOT"
    touch "$ROOT/.pgbg-provisioned"
}

[ -f "$ROOT/.pgbg-provisioned" ] || provision
mount_proc

if [ ! -f "$ROOT$PGDATA/PG_VERSION" ]; then
    log "initdb"
    in_root install -d -o postgres -g postgres "$PGDATA"
    as_postgres "$PGBIN/initdb" -A trust -U postgres -E UTF8 --locale=C.UTF-8 -D "$PGDATA" >&2
fi
in_root install -d -o postgres -g postgres /var/run/postgresql

if ! as_postgres "$PGBIN/pg_ctl" -D "$PGDATA" status >/dev/null 2>&1; then
    log "starting PostgreSQL 18 on 127.0.0.1:$PORT"
    # mmap shared memory: the root has no /dev/shm. max_worker_processes leaves room for
    # the engine's workers; 200 connections cover the Airflow end-to-end harness.
    as_postgres "$PGBIN/pg_ctl" -D "$PGDATA" -l "$LOG" -w -t 60 start -o \
        "-c listen_addresses=127.0.0.1 -p $PORT -c max_worker_processes=32 \
         -c dynamic_shared_memory_type=mmap -c max_connections=200 \
         -c unix_socket_directories=/var/run/postgresql" >&2
fi

echo "postgresql://postgres@127.0.0.1:$PORT/postgres"
