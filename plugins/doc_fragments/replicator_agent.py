# Copyright: (c) 2026, The replicator team
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Options shared by the modules that talk to a replicator agent (see AGENT_ARGS,
LINK_ARGS and GROUP_ARGS in module_utils/replicator_agent.py): the agent (every one of
them), the selection of links (status, wait, pair, resync, verify) and the group of an
operation (promote, demote, switchover, ...)."""


class ModuleDocFragment:
    DOCUMENTATION = r"""
options:
  cli:
    description: The replicator command on the host.
    type: path
    default: /opt/replicator/venv/bin/replicator
  config:
    description: The agent's configuration file.
    type: path
    default: /etc/replicator/agent.yml
"""

    LINKS = r"""
options:
  group:
    description: Only this group's links.
    type: str
  targets:
    description: Only the links to these nodes.
    type: list
    elements: str
"""

    OPERATION = r"""
notes:
  - Reads the agent's status first and runs the operation only when the group is not yet
    as the operation leaves it (a second run changes nothing). In check mode nothing is
    run; C(changed) and the diff say what would happen. The diff shows the group's role,
    generation, source, targets (as NODE:MODE[:zstd][:bunker][:block]), whether it is
    inconsistent and with whom it is in split brain, before and after.
options:
  group:
    description: The replication group.
    type: str
    required: true
attributes:
  check_mode:
    description: Nothing is run; C(changed) and the diff say what would happen.
    support: full
  diff_mode:
    description: The group's state before and after (predicted in check mode).
    support: full
"""
