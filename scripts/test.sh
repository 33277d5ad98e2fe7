#!/usr/bin/env bash
# Sets everything up, then runs the whole test suite: pytest (unit; integration with real
# agents and real NBD clients; the Ansible modules and the lab end to end), ansible-lint
# with the production profile, ansible-test sanity on both collections, and the molecule
# scenario over the lab. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
echo "== ansible-lint (production profile)"
ansible-lint
echo "== ansible-test sanity (both collections, as built and installed)"
bash scripts/sanity.sh
echo "== molecule test (the lab)"
molecule test
