"""The agent says once, at start, which event loop it runs on (uvloop is a dependency:
a real agent process runs on it) and serves NBD and replication on it."""

from tests.agents import MiB
from tests.clients import qemu_io


def test_agent_runs_on_uvloop_and_says_so_once(topology):
    topo = topology(["a", "b"], [("a", "b", "async")], volumes={"data": 4 * MiB})
    qemu_io(topo["a"].nbd_uri("data"), "write -P 0x5c 0 1M")
    topo.wait_converged()
    topo.assert_identical()
    for agent in topo.agents.values():
        with open(agent.log_path) as f:
            lines = [x for x in f if "event loop:" in x]
        assert len(lines) == 1 and lines[0].rstrip().endswith("event loop: uvloop"), lines
