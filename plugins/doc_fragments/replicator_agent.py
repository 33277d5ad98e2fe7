# Copyright: (c) 2026, The replicator team
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Options shared by the modules that talk to a replicator agent (AGENT_ARGS and LINK_ARGS
in module_utils/replicator_agent.py): voltrail.replicator.replicator_agent for every one,
voltrail.replicator.replicator_agent.links for those that select links."""


class ModuleDocFragment:
    DOCUMENTATION = r"""
options:
  cli:
    description: The replicator command on the host (C(replicator_agent_install_dir)/venv/bin/replicator).
    type: path
    default: /opt/replicator/venv/bin/replicator
  config:
    description: The agent's configuration file (C(replicator_agent_config_dir)/agent.yml).
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
