"""Initial sync of a new target (full, checksum, assume-clean) and operator-requested resyncs
(`replicator resync GROUP TARGET --full | --checksum | --assume-clean`)."""

import os
import random
import shutil

import pytest

from tests.agents import MiB, replicator_cli, wait_until
from tests.clients import qemu_io

GRAN = 64 << 10
SIZE = 16 * MiB


def _fill(path: str, seed: int) -> bytes:
    data = random.Random(seed).randbytes(SIZE)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return data


def _change_regions(path: str, regions: list[int]) -> None:
    with open(path, "r+b") as f:
        for r in regions:
            f.seek(r * GRAN + 17)
            f.write(b"seeded copy differs here")


def _streaming(topo, what="a -> b replicating"):
    def ok():
        t = topo["a"].target("db", "b")
        return t["state"] == "replicating" and t["resync"] is None and t
    return wait_until(ok, 60, what)


@pytest.mark.parametrize("initial_sync", ["full", "checksum"])
def test_new_target_gets_the_primary_image(topology, initial_sync):
    """The primary's volume held data before replication began: a new target receives
    all of it (full), or only the regions that differ from its seeded copy (checksum)."""
    topo = topology(["a", "b"], [("a", "b", "async", {"initial_sync": initial_sync})],
                    volumes={"data": SIZE}, start=False)
    _fill(topo["a"].volume_path("db", "data"), 1)
    os.makedirs(os.path.dirname(topo["b"].volume_path("db", "data")), exist_ok=True)
    shutil.copyfile(topo["a"].volume_path("db", "data"), topo["b"].volume_path("db", "data"))
    changed = sorted(random.Random(2).sample(range(SIZE // GRAN), 5))
    _change_regions(topo["b"].volume_path("db", "data"), changed)
    topo.start()
    t = _streaming(topo)
    topo.assert_identical()
    sent = len(changed) * GRAN if initial_sync == "checksum" else SIZE
    assert t["bytes_sent"] == sent
    qemu_io(topo["a"].nbd_uri("data"), "write -P 0x33 1M 64k")  # then it streams
    topo.wait_converged()
    topo.assert_identical()


def test_assume_clean_sends_nothing_for_two_blank_volumes(topology):
    topo = topology(["a", "b"], [("a", "b", "sync", {"initial_sync": "assume-clean"})])
    t = _streaming(topo)
    assert t["bytes_sent"] == 0
    qemu_io(topo["a"].nbd_uri("data"), "write -P 0x44 0 128k")
    topo.wait_converged()
    topo.assert_identical()


def test_operator_resync_modes(topology):
    topo = topology(["a", "b"], [("a", "b", "async")], volumes={"data": SIZE})
    qemu_io(topo["a"].nbd_uri("data"), "write -P 0x55 0 16M")
    topo.wait_converged()
    base = _streaming(topo)["bytes_sent"]
    _change_regions(topo["b"].volume_path("db", "data"), [7, 8, 200])

    rc, answer = replicator_cli(topo["a"], "resync", "db", "b", "--checksum")
    assert rc == 0, answer
    sent = _streaming(topo, "checksum resync done")["bytes_sent"]
    assert sent - base == 3 * GRAN
    topo.assert_identical()

    rc, _ = replicator_cli(topo["a"], "resync", "db", "b", "--full")
    assert rc == 0
    wait_until(lambda: topo["a"].target("db", "b")["bytes_sent"] > sent, 30, "full resync")
    full = _streaming(topo, "full resync done")["bytes_sent"]
    assert full - sent == SIZE

    _change_regions(topo["b"].volume_path("db", "data"), [3])
    rc, answer = replicator_cli(topo["a"], "resync", "db", "b", "--assume-clean")
    assert rc == 0 and answer["state"] in ("replicating", "resyncing", "logging", "connecting")
    assert _streaming(topo, "assume-clean resync done")["bytes_sent"] == full
    rc, found = replicator_cli(topo["a"], "verify", "db", "b")
    assert rc == 3 and [m["offset"] for m in found["mismatches"]] == [3 * GRAN]


def test_resync_of_an_unknown_target_or_mode_is_refused(topology):
    topo = topology(["a", "b"], [("a", "b", "async")])
    rc, err = replicator_cli(topo["a"], "resync", "db", "zz", "--full")
    assert rc == 1 and "does not ship to 'zz'" in err["error"]
    rc, err = replicator_cli(topo["b"], "resync", "db", "a", "--checksum")
    assert rc == 1 and "does not ship to 'a'" in err["error"]
