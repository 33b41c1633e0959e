#!/usr/bin/env bash
# Make sure the system packages the tests need are present.
# As root with apt-get available, install what is missing; otherwise print what to install.
set -euo pipefail

missing=()
python3 -c 'import venv, ensurepip' 2>/dev/null || missing+=(python3-venv)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v mosquitto >/dev/null 2>&1 || missing+=(mosquitto)
command -v node >/dev/null 2>&1 || missing+=(nodejs)
command -v npm >/dev/null 2>&1 || missing+=(npm)

[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing system packages: ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
    # The tests start their own private servers; do not leave the packaged ones' defaults to chance.
    exit 0
fi

echo "fleetgate tests need these system packages, which are missing:" >&2
echo "    sudo apt-get install -y ${missing[*]}" >&2
exit 1
