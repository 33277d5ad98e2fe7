#!/usr/bin/env bash
# Sets up everything the demo and the tests need on a fresh Debian machine (as root):
# Debian packages (real NBD clients, fio, iproute2, sshd, promtool), a virtual environment in
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
# Daemons whose service must not start here (see install_without_starting_services):
# prometheus brings promtool, which the tests use on monitoring/; cron is the scheduler the
# lab test of roles/replicator_dr_schedule starts itself, as its own child.
daemons_missing=()
for pkg in prometheus cron; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
        || daemons_missing+=("$pkg")
done
if ((${#missing[@]})) || ((${#daemons_missing[@]})); then
    apt-get update -qq
fi
if ((${#missing[@]})); then
    echo "setup.sh: installing Debian packages: ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# A package's postinst starts its service through invoke-rc.d or deb-systemd-invoke, and
# both ask /usr/sbin/policy-rc.d first: exit 101 means "action forbidden", under sysvinit
# and systemd alike. A policy-rc.d already there (a container image's) is the machine's
# own and is left as it is; one made here is removed again, even if apt-get fails.
POLICY_RC=/usr/sbin/policy-rc.d
install_without_starting_services() {
    local made_policy=
    if [[ ! -e $POLICY_RC ]]; then
        printf '#!/bin/sh\n# made by setup.sh for one apt-get install: start no service\nexit 101\n' \
            >"$POLICY_RC"
        chmod 755 "$POLICY_RC"
        made_policy=1
        trap 'rm -f "$POLICY_RC"' EXIT
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
    if [[ $made_policy ]]; then
        rm -f "$POLICY_RC"
        trap - EXIT
    fi
}
if ((${#daemons_missing[@]})); then
    echo "setup.sh: installing Debian packages ${daemons_missing[*]} (their services not started)"
    install_without_starting_services "${daemons_missing[@]}"
    for pkg in "${daemons_missing[@]}"; do
        if pids=$(ps -C "$pkg" -o pid=); then
            echo "setup.sh: a $pkg daemon runs after the install (pid ${pids//[[:space:]]/ })," \
                 "although policy-rc.d forbade starting it" >&2
            exit 1
        fi
    done
fi

PY=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
    "$PY" -m venv .venv
fi
version=$(sha256sum pyproject.toml | cut -c1-16)
stamp=.venv/.installed-$version
if [[ ! -f $stamp ]]; then
    .venv/bin/pip install -q --upgrade pip
    .venv/bin/pip install -q -e '.[test]'
    rm -f .venv/.installed-*
    touch "$stamp"
fi
# The agent's dependencies, its build requirement and pip as wheels: the lab inventories
# install agents from them (replicator_agent_wheel_find_links), so that deploying needs no
# package index once setup is done.
if [[ ! -f .venv/wheelhouse/.made-$version ]]; then
    rm -rf .venv/wheelhouse
    .venv/bin/pip wheel -q --wheel-dir .venv/wheelhouse.new . pip 'setuptools>=61'
    rm -f .venv/wheelhouse.new/replicator-*.whl
    touch ".venv/wheelhouse.new/.made-$version"
    mv .venv/wheelhouse.new .venv/wheelhouse
fi

# The checkout as the collections voltrail.replicator (the repository root) and
# voltrail.replicator_lab (lab/), for ansible.cfg's collections_path: links, so that an edit
# is seen at once (`ansible-galaxy collection build` makes the shipped copy).
mkdir -p .collections/ansible_collections/voltrail
ln -sfn ../../.. .collections/ansible_collections/voltrail/replicator
ln -sfn ../../../lab .collections/ansible_collections/voltrail/replicator_lab
