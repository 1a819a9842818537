#!/usr/bin/env bash
# pytest under Python 3.13 (the host has 3.11): from the Debian sid root that scripts/db.sh provisions,
# which has python3.13, with the repository bind-mounted at the same path and the newest Airflow from
# constraints.txt in a virtualenv inside the root. Same server as `make test`. Arguments go to pytest;
# --prepare only builds the virtualenv (no server starts: CI builds it before its groups, which have
# no network, scripts/ci.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
PREPARE=0
if [ "${1:-}" = --prepare ]; then PREPARE=1; shift; fi
if [ $PREPARE = 1 ]; then bash scripts/db.sh provision; else DSN=$(bash scripts/db.sh | tail -n 1); fi
CACHE_DIR=${PGBG_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/airflow_pgbg}
ROOT=$CACHE_DIR/sid-root
VENV=/opt/pgbg-py313
# The host's CA bundle: package downloads may go through the host's TLS-inspecting proxy.
CA=/etc/ssl/certs/ca-certificates.crt

log() { echo "py313: $*" >&2; }
in_root() {
    chroot "$ROOT" /usr/bin/env -i PATH=$VENV/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 HOME=/root \
        SSL_CERT_FILE=/tmp/host-ca.crt PIP_CERT=/tmp/host-ca.crt PYTHONDONTWRITEBYTECODE=1 "$@"
}

cleanup() {
    umount "$ROOT/tmp/host-ca.crt" 2>/dev/null || true
    umount "$ROOT$REPO" 2>/dev/null || true
}
trap cleanup EXIT

if [ ! -x "$ROOT/usr/bin/python3.13" ]; then
    log "installing python3.13 into the sid root"
    in_root sh -c 'DEBIAN_FRONTEND=noninteractive apt-get -qq -o Acquire::Check-Valid-Until=false update &&
                   DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3.13 python3.13-venv' >&2
fi
mkdir -p "$ROOT$REPO"
mountpoint -q "$ROOT$REPO" || mount --bind "$REPO" "$ROOT$REPO"
touch "$ROOT/tmp/host-ca.crt"
mountpoint -q "$ROOT/tmp/host-ca.crt" || mount --bind -o ro "$CA" "$ROOT/tmp/host-ca.crt"

STAMP=$ROOT$VENV/.installed
if [ ! -f "$STAMP" ] || [ constraints.txt -nt "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ]; then
    log "virtualenv $VENV (Python 3.13) from constraints.txt"
    rm -rf "$ROOT$VENV"
    in_root python3.13 -m venv "$VENV"
    in_root sh -c "cd '$REPO' && python -m pip install -q --upgrade pip && python -m pip install -q -c constraints.txt -e '.[test]'" >&2
    touch "$STAMP"
fi
[ $PREPARE = 1 ] && exit 0
in_root sh -c "cd '$REPO' && PGBG_TEST_DSN='$DSN' python -m pytest -q -p no:cacheprovider $*"
