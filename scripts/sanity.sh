#!/usr/bin/env bash
# ansible-test sanity on the collections as they ship: voltrail.replicator (the repository
# root) and voltrail.replicator_lab (lab/) are built, installed into a temporary tree and
# tested there, with this checkout's Python and ansible-test (no containers).
#   bash scripts/sanity.sh              every test that can run here
#   bash scripts/sanity.sh --test pep8  extra arguments go to ansible-test sanity
# Skipped: pslint (PowerShell: none here, and no pwsh). The ignore files are
# tests/sanity/ignore-X.Y.txt (one line per exception, each with its reason).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
export PATH="$root/.venv/bin:$PATH"
# ansible-test bootstraps pip in each test's virtual environment with a get-pip script it
# downloads from ci-files.testing.ansible.com, which this machine cannot reach: ours takes
# pip from ensurepip and the packages from the package index pip is configured with.
cache=$HOME/.ansible/test/cache
mkdir -p "$cache"
requirements=$(python -c 'import ansible_test, os; print(os.path.dirname(ansible_test.__file__))')/_internal/python_requirements.py
pip_version=$(grep -o "pip='[0-9.]*'" "$requirements" | head -1 | tr -dc '0-9.' | tr . _)
[[ -n $pip_version ]] || { echo "sanity.sh: cannot tell which pip ansible-test bootstraps" >&2; exit 1; }
cp scripts/ansible_test_get_pip.py "$cache/get_pip_${pip_version}.py"

work=$(mktemp -d /tmp/sanity.XXXXXX)
trap 'rm -rf "$work"' EXIT
printf '[defaults]\ncollections_path = %s\n' "$work" > "$work/ansible.cfg"
status=0
for src in . lab; do
    ANSIBLE_CONFIG=$work/ansible.cfg ansible-galaxy collection build --output-path "$work" "$src" >/dev/null
done
for archive in "$work"/*.tar.gz; do
    ANSIBLE_CONFIG=$work/ansible.cfg ansible-galaxy collection install -p "$work" "$archive" >/dev/null
done
for name in replicator replicator_lab; do
    echo "== ansible-test sanity voltrail.$name"
    (cd "$work/ansible_collections/voltrail/$name" &&
        ansible-test sanity --python "$(python -c 'import sys; print("%d.%d" % sys.version_info[:2])')" \
            --skip-test pslint "$@") || status=1
done
exit $status
