#!/usr/bin/env bash
# The UI test drives Debian's headless Chromium (no browser download: the machine has no internet
# beyond package registries). Idempotent; prints the browser's path.
set -euo pipefail
if ! command -v chromium >/dev/null; then
    if [ "$(id -u)" != 0 ]; then
        echo "browser: chromium is missing; install it (apt-get install chromium) or set PGBG_CHROMIUM" >&2
        exit 1
    fi
    echo "browser: installing chromium" >&2
    (apt-get install -y -qq chromium || { apt-get update -qq && apt-get install -y -qq chromium; }) >&2
fi
command -v chromium
