#!/usr/bin/env bash
# Make sure the system packages fleetgate needs are present.
#   system-deps.sh build   what creating the virtualenv needs (venv, a C compiler and Python headers
#                          for crcmod's C extension)
#   system-deps.sh test    the above plus the servers and tools the tests start (redis, mosquitto, node)
# As root with apt-get available, install what is missing; otherwise print what to install and fail.
set -euo pipefail

mode=${1:-test}
python=${PYTHON:-python3}
missing=()

"$python" -c 'import venv, ensurepip' 2>/dev/null || missing+=(python3-venv)
"$python" -c 'import os, sysconfig; raise SystemExit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
    || missing+=(python3-dev)
command -v cc >/dev/null 2>&1 || missing+=(gcc)

if [ "$mode" = test ]; then
    command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
    command -v mosquitto >/dev/null 2>&1 || missing+=(mosquitto)
    command -v node >/dev/null 2>&1 || missing+=(nodejs)
    command -v npm >/dev/null 2>&1 || missing+=(npm)
fi

[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing system packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}"
    exit 0
fi

echo "fleetgate needs these system packages, which are missing:" >&2
echo "    sudo apt-get install -y ${missing[*]}" >&2
exit 1
