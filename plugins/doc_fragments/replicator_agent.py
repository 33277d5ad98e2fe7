"""Options shared by the modules that talk to a replicator agent (see AGENT_ARGS and
LINK_ARGS in module_utils/replicator_agent.py)."""


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
  group:
    description: Only this group's links.
    type: str
  targets:
    description: Only the links to these nodes.
    type: list
    elements: str
"""
