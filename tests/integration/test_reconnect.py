"""A target that restarts is streamed to again within a second of listening (issue 14):
the primary's reconnect backoff is capped short, so neither a short outage (target back
before the primary gave up on its journal position) nor a long one (target in logging,
resynced from the bitmap) leaves it waiting seconds for the next connect."""

import socket
import time

import pytest

from tests.agents import MiB, wait_until
from tests.clients import qemu_io

VOLUMES = {"data": 16 * MiB}
BACK_WITHIN = 1.5  # seconds from the restarted target's listen port accepting to replicating


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def _listen_port(agent) -> int:
    return int(agent.config["listen"].rsplit(":", 1)[1])


@pytest.mark.parametrize("outage", ["short", "logging"])
def test_restarted_target_is_replicating_within_a_second_of_listening(topology, outage):
    topo = topology(["a", "b"], [("a", "b", "async")], volumes=VOLUMES, heartbeat_timeout=2.0)
    a, b = topo["a"], topo["b"]
    qemu_io(a.nbd_uri("data"), "write -P 0x11 0 1M")
    topo.wait_converged()

    b.kill()  # SIGKILL
    wait_until(lambda: a.target("db", b.node)["state"] not in ("replicating", "catching-up"),
               10, "a to see b gone")
    qemu_io(a.nbd_uri("data"), "write -P 0x22 4M 256k", "write -P 0x33 9M 64k")
    if outage == "logging":
        # Away longer than heartbeat_timeout: the old backoff (0.1 s doubling to 5 s)
        # had grown to seconds by now.
        t = wait_until(lambda: (lambda t: t if t["state"] == "logging" else None)(
            a.target("db", b.node)), 20, "b to be logging")
        assert t["dirty_bytes"] > 0
    else:
        assert a.target("db", b.node)["state"] == "connecting"

    port = _listen_port(b)
    b.start(wait=False)
    wait_until(lambda: _accepts(port), 20, "the restarted b to listen", interval=0.005)
    listening = time.monotonic()
    wait_until(lambda: a.target("db", b.node)["state"] == "replicating", BACK_WITHIN,
               f"a to replicate to b within {BACK_WITHIN}s of b listening", interval=0.02)
    took = time.monotonic() - listening
    assert took <= BACK_WITHIN, f"b replicating {took:.2f}s after listening"

    topo.wait_converged()
    topo.assert_identical()
