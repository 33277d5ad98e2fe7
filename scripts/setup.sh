#!/usr/bin/env bash
# Sets up everything the demo and the tests need on a fresh Debian machine (as root):
# Debian packages (real NBD clients, fio, iproute2, sshd), a virtual environment in
# .venv with the project and its test tools. Idempotent; quick when nothing is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ $EUID -ne 0 ]]; then
    echo "setup.sh: run as root (it installs Debian packages and builds network namespaces)" >&2
    exit 1
fi

DEBS=(qemu-utils libnbd-bin fio iproute2 openssh-server openssh-client rsync xxhash
      python3-venv util-linux procps xfsprogs btrfs-progs sqlite3)
missing=()
for pkg in "${DEBS[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
    echo "setup.sh: installing Debian packages: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
    "$PY" -m venv .venv
fi
stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
if [[ ! -f $stamp ]]; then
    .venv/bin/pip install -q --upgrade pip
    .venv/bin/pip install -q -e '.[test]'
    rm -f .venv/.installed-*
    touch "$stamp"
fi
