#!/usr/bin/env bash
# CI's parts side by side (.ci/run sources this file): the suites mostly wait on PostgreSQL and on
# Airflow's processes (a load of about 1 on 2 cores), so independent parts run as concurrent groups.
#
# Every suite uses fixed ports on 127.0.0.1 and files under PGBG_CACHE_DIR (the sid root with the
# servers' data directories, Redis's directory), so two of them in one network namespace and one cache
# directory would share servers. A group therefore runs
#   - in a network namespace of its own (its own 127.0.0.1, no other network: whatever needs a package
#     registry is done before, in ci_prepare),
#   - with a PGBG_CACHE_DIR of its own, .ci-groups/NAME/cache, holding a copy of the provisioned sid
#     root without any server's data directory, socket or pid file,
#   - with a TMPDIR and a pytest cache of its own (.ci-groups/NAME),
# and writes its log to .ci-groups/NAME/log. When it ends (or the run is interrupted), the servers it
# started are stopped, whatever is left of its processes is ended and its namespace deleted.
#
#   ci_parallel                 true if groups can run (root, `ip netns`, no PGBG_TEST_DSN); says why not
#   ci_prepare "MATRIX LINES"   provisions the sid root, the browser, Redis and the matrix virtualenvs
#   ci_group NAME COMMAND       starts COMMAND (bash -c) as a group in a namespace
#   ci_host NAME COMMAND        starts COMMAND as a group in this namespace (nothing there listens)
#   ci_wait                     waits for every group; a line each; non-zero if any failed
#   bash scripts/ci.sh clean    stops what groups of this checkout left running; removes .ci-groups/
#   bash scripts/ci.sh stop-servers   (inside a group) stops the servers of its PGBG_CACHE_DIR

CI_REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CI_DIR=$CI_REPO/.ci-groups
CI_MAIN_CACHE=${PGBG_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/airflow_pgbg}
CI_ID=pgbgci$$
CI_GROUPS=()
CI_PIDS=()

ci_log() { echo "ci: $*" >&2; }

ci_parallel() {
    if [ -n "${PGBG_CI_SEQUENTIAL:-}" ]; then ci_log "PGBG_CI_SEQUENTIAL set: one part after another"; return 1; fi
    if [ -n "${PGBG_TEST_DSN:-}" ]; then ci_log "PGBG_TEST_DSN set (a server outside): one part after another"; return 1; fi
    if [ "$(id -u)" != 0 ] || ! command -v ip >/dev/null; then
        ci_log "network namespaces need root and ip (iproute2): one part after another"; return 1
    fi
    local probe=${CI_ID}probe
    if ! { ip netns add "$probe" && ip netns exec "$probe" ip link set lo up; } >/dev/null 2>&1; then
        ip netns delete "$probe" 2>/dev/null
        ci_log "cannot create a network namespace here: one part after another"; return 1
    fi
    ip netns delete "$probe"
}

# What needs the network or writes into the checkout (a virtualenv's editable install rewrites the
# egg-info that Airflow reads the package's plugins from) is done before any group starts.
ci_prepare() {
    local lines=$1
    bash "$CI_REPO/scripts/db.sh" provision
    bash "$CI_REPO/scripts/browser.sh" >/dev/null
    bash "$CI_REPO/scripts/redis.sh" install
    MATRIX=$lines bash "$CI_REPO/scripts/matrix.sh" --venvs
}

# The provisioned root without what a server, PgBouncer or a bind mount left in it.
_ci_copy_root() {
    local src=$CI_MAIN_CACHE/sid-root dst=$1/sid-root excludes=() mnt
    excludes=(--exclude=./proc --exclude='./tmp/*' --exclude='./var/lib/postgresql/pgbg*'
              --exclude='./var/lib/postgresql/pgbouncer-*' --exclude='./var/lib/postgresql/extensions-without-*'
              --exclude='./var/run/postgresql/*' --exclude='./run/postgresql/*')
    # A mount inside the root (a checkout py313.sh bound there) is not the root's.
    while read -r mnt; do
        case "$mnt" in "$src"/*) excludes+=("--exclude=.${mnt#"$src"}") ;; esac
    done < <(awk '{print $5}' /proc/self/mountinfo)
    mkdir -p "$dst"
    tar -C "$src" "${excludes[@]}" -cf - . | tar -C "$dst" -xf -
    mkdir -p "$dst/proc"
}

_ci_start() {  # name, namespace or "", command
    local name=$1 ns=$2 command=$3 dir=$CI_DIR/$1
    rm -rf "$dir"
    mkdir -p "$dir/tmp"
    if [ -n "$ns" ]; then
        _ci_copy_root "$dir/cache"
        ip netns add "$ns"
        echo "$ns" >"$dir/netns"  # for make clean, after a run killed outright
        ip netns exec "$ns" ip link set lo up
    fi
    (
        set +e
        started=$SECONDS
        env=(PGBG_CACHE_DIR="$dir/cache" TMPDIR="$dir/tmp" MATRIX_LOGS="$dir"
             PYTEST_ADDOPTS="${PYTEST_ADDOPTS:+$PYTEST_ADDOPTS }-o cache_dir=$dir/pytest-cache")
        if [ -n "$ns" ]; then
            # The servers are stopped in the group's own mount namespace (ip netns exec makes one, with
            # the sid root's /proc mounted in it).
            ip netns exec "$ns" env "${env[@]}" bash -c "$command; rc=\$?; bash '$CI_REPO/scripts/ci.sh' stop-servers; exit \$rc" \
                >"$dir/log" 2>&1 </dev/null
        else
            env "${env[@]}" bash -c "$command" >"$dir/log" 2>&1 </dev/null
        fi
        echo $? >"$dir/rc"
        echo $((SECONDS - started)) >"$dir/seconds"
        if [ -n "$ns" ]; then _ci_end_namespace "$ns"; fi
    ) &
    CI_GROUPS+=("$name")
    CI_PIDS+=($!)
    ci_log "group $name started${ns:+ (network namespace $ns)}: $command"
}

ci_group() { _ci_start "$1" "$CI_ID-$1" "$2"; }
ci_host() { _ci_start "$1" "" "$2"; }

# Whatever still runs in the namespace (a server a script did not stop, an orphaned Airflow process)
# ends; the namespace goes.
_ci_end_namespace() {
    local ns=$1 pids
    ip netns list 2>/dev/null | awk '{print $1}' | grep -qx "$ns" || return 0
    pids=$(ip netns pids "$ns" 2>/dev/null || true)
    if [ -n "$pids" ]; then
        # shellcheck disable=SC2086
        kill $pids 2>/dev/null || true
        for _ in $(seq 50); do
            pids=$(ip netns pids "$ns" 2>/dev/null || true)
            [ -z "$pids" ] && break
            sleep 0.2
        done
        # shellcheck disable=SC2086
        if [ -n "$pids" ]; then kill -KILL $pids 2>/dev/null || true; fi
    fi
    ip netns delete "$ns" 2>/dev/null || true
}

# On exit or interrupt: every group of this run ends, and its namespace goes.
ci_cleanup() {
    local name pid
    for pid in "${CI_PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for name in "${CI_GROUPS[@]}"; do _ci_end_namespace "$CI_ID-$name"; done
    return 0
}

_ci_counts() {  # the pytest summary lines of a group's logs -> "N passed, M skipped; ..."
    local dir=$1 f counts=()
    for f in "$dir/log" "$dir"/*.log; do
        [ -f "$f" ] || continue
        while IFS= read -r line; do counts+=("$line"); done < <(
            grep -aE "^(=+ )?[0-9]+ (passed|failed|error|skipped|deselected)" "$f" | sed -E 's/=//g; s/ in [0-9.]+s.*//; s/^ +//')
    done
    [ ${#counts[@]} -gt 0 ] || { echo "no pytest result"; return; }
    local out
    printf -v out '%s; ' "${counts[@]}"
    echo "${out%; }"
}

ci_wait() {
    local i name dir rc failed=0 outcome
    for i in "${!CI_PIDS[@]}"; do wait "${CI_PIDS[$i]}" || true; done
    echo
    echo "ci groups (logs in .ci-groups/NAME/):"
    for name in "${CI_GROUPS[@]}"; do
        dir=$CI_DIR/$name
        rc=$(cat "$dir/rc" 2>/dev/null || echo 1)
        outcome=ok; [ "$rc" = 0 ] || { outcome=FAILED; failed=1; }
        printf '  %-10s %-6s %5ss  %s\n' "$name" "$outcome" "$(cat "$dir/seconds" 2>/dev/null || echo '?')" "$(_ci_counts "$dir")"
    done
    for name in "${CI_GROUPS[@]}"; do
        dir=$CI_DIR/$name
        [ "$(cat "$dir/rc" 2>/dev/null || echo 1)" = 0 ] && continue
        # CI keeps only this output: what failed, and the end of the group's log.
        echo
        echo "---- $name: failed tests"
        cat "$dir/log" "$dir"/*.log 2>/dev/null | grep -aE "^(FAILED|ERROR) " | cut -c1-300 | sort -u | head -n 30 || true
        echo "---- $name: last lines of its log"
        tail -n 60 "$dir/log" || true
    done
    return $failed
}

# Inside a group: stop the servers its scripts started (db.sh instances, PgBouncers, Redis).
_ci_stop_servers() {
    local cache=${PGBG_CACHE_DIR:?} d name pidfile
    for d in "$cache"/sid-root/var/lib/postgresql/pgbg*/; do
        [ -f "$d/PG_VERSION" ] || continue
        name=$(basename "$d"); name=${name#pgbg}; name=${name#-}
        bash "$CI_REPO/scripts/db.sh" stop --instance "${name:-main}" || true
    done
    for d in "$cache"/sid-root/var/lib/postgresql/pgbouncer-*/; do
        [ -d "$d" ] || continue
        name=$(basename "$d")
        bash "$CI_REPO/scripts/pgbouncer.sh" stop --instance "${name#pgbouncer-}" || true
    done
    for pidfile in "$cache"/redis/redis-*.pid; do
        [ -f "$pidfile" ] || continue
        name=$(basename "$pidfile" .pid)
        bash "$CI_REPO/scripts/redis.sh" stop --port "${name#redis-}" --dir "$cache/redis" || true
    done
}

# make clean: what groups of this checkout left (an interrupted run killed with SIGKILL) goes too.
_ci_clean() {
    local f
    [ -d "$CI_DIR" ] || return 0
    for f in "$CI_DIR"/*/netns; do
        if [ -f "$f" ]; then _ci_end_namespace "$(cat "$f")"; fi
    done
    rm -rf "$CI_DIR"
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    case "${1:-}" in
        stop-servers) _ci_stop_servers ;;
        clean) _ci_clean ;;
        *) echo "usage: scripts/ci.sh clean|stop-servers (or source it, as .ci/run does)" >&2; exit 2 ;;
    esac
fi
