#!/usr/bin/env bash
# The system packages the test suite runs as real services: Chromium (the MLflow UI test drives it
# through Playwright) and PostgreSQL (MLflow's backend store and Optuna's RDB storage). Installs
# whichever is missing from Debian's packages; `make test` runs this first, so a fresh machine
# needs no other step. Needs root (or sudo without a password) only when something is missing.
set -euo pipefail
missing=()
[ -x /usr/lib/chromium/chromium ] || missing+=(chromium)
compgen -G '/usr/lib/postgresql/*/bin/pg_ctl' >/dev/null || missing+=(postgresql)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -eq 0 ]; then
    as_root=()
elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
    as_root=(sudo -n)
else
    echo "make test: the tests need the Debian packages ${missing[*]}, which are not installed," >&2
    echo "and installing them needs root. Run: sudo apt-get install -y ${missing[*]}" >&2
    exit 1
fi
echo "== installing ${missing[*]} (the tests' real services), a few minutes"
log=$(mktemp -t dynroute-apt-XXXXXX.log)
if ! { "${as_root[@]}" apt-get update -qq &&
       DEBIAN_FRONTEND=noninteractive "${as_root[@]}" apt-get install -y -qq "${missing[@]}"; } \
       >"$log" 2>&1; then
    tail -n 30 "$log" >&2
    echo "make test: installing ${missing[*]} failed; the whole log is $log" >&2
    exit 1
fi
rm -f "$log"
