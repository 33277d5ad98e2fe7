"""A whole Group under the crash-simulating layer (tests/crashsim.py): the real write
path (asyncio loop, memtable, group commits on the Flusher's thread, the io worker's
checkpoints) and invariant 1 of the durability contract after a power loss at
thousands of random points.

Writes complete once journaled; FLUSH makes them durable. After the crash the reopened
group (its own recovery: journal scan, replay after the checkpoint) must hold in its
volume exactly the image after some seq k, with k at least the last seq a completed
FLUSH covered (mark "flushed"): never a write its journal lost, never a flushed write
missing.
"""

import asyncio
import os
import random

import pytest

from replicator.config import parse
from replicator.group import Group
from tests.crashsim import CrashSim

VOLUME = 256 << 10


def _group(root: str) -> Group:
    cfg = parse({"node": "p", "listen": "127.0.0.1:1", "nbd_listen": "127.0.0.1:2",
                 "state_dir": os.path.join(root, "state"), "tls": False, "peers": {},
                 "groups": [{"name": "db", "role": "primary", "journal_size": "16MiB",
                             "volumes": [{"name": "data", "path": os.path.join(root, "d.img"),
                                          "size": VOLUME}], "targets": []}]})
    group = Group(cfg.group("db"), cfg.state_dir)
    group.open()
    return group


def _workload(root: str, seed: int, writes: int):
    """Returns (workload, ops): ops[seq] = (offset, data) once the workload ran (data
    None: a zeroing)."""
    ops: dict[int, tuple[int, bytes | None]] = {}

    def workload(sim: CrashSim) -> None:
        rng = random.Random(seed)

        async def main():
            g = _group(root)
            g.start()
            vol = g.volumes["data"]
            loop = asyncio.get_running_loop()
            pending = set()
            completed = 0  # the highest seq completed (writes complete in seq order)
            for i in range(writes):
                offset = rng.randrange(0, VOLUME // 512 - 8) * 512
                seq = g.commit._next_seq  # the primary numbers writes as they are submitted
                fut = loop.create_future()

                def done(err, seq=seq, fut=fut):
                    nonlocal completed
                    assert err == 0, os.strerror(err)
                    completed = max(completed, seq)
                    fut.set_result(seq)
                if rng.random() < 0.15:
                    length = rng.randrange(1, 8) * 512
                    ops[seq] = (offset, None, length)
                    g.commit.submit_zero(vol, offset, length, done)
                else:
                    data = bytes([rng.randrange(1, 256)]) * (rng.randrange(1, 8) * 512)
                    ops[seq] = (offset, data, len(data))
                    g.commit.submit_write(vol, offset, data, done)
                pending.add(fut)
                if len(pending) >= rng.choice((1, 4)):  # QD 1 and QD 4
                    finished, pending = await asyncio.wait(pending, timeout=10,
                                                           return_when=asyncio.FIRST_COMPLETED)
                    assert finished, "a write never completed"
                if rng.random() < 0.2:  # a FLUSH covers the writes completed before it
                    covers, flushed = completed, loop.create_future()
                    g.commit.submit_flush(flushed.set_result)
                    assert await asyncio.wait_for(flushed, 10) == 0
                    sim.mark("flushed", covers)
                if rng.random() < 0.03:  # a checkpoint, as the checkpointer takes them
                    await g.commit.settle()
                    await loop.run_in_executor(g._io, g._sync_and_save,
                                               g.journal.position(g.commit.applied_seq))
            if pending:
                await asyncio.wait(pending, timeout=10)
            await g.stop()

        asyncio.run(main())

    return workload, ops


def _image_after(ops, k: int) -> bytes:
    img = bytearray(VOLUME)
    for seq in range(1, k + 1):
        offset, data, length = ops[seq]
        img[offset:offset + length] = data if data is not None else bytes(length)
    return bytes(img)


@pytest.mark.parametrize("namespace", ["prefix", "subset"])
@pytest.mark.parametrize("seed", [1, 2])
def test_group_volume_is_a_prefix_image_after_power_loss(tmp_path, namespace, seed):
    root = str(tmp_path / "run")
    workload, ops = _workload(root, seed=seed, writes=300)
    with CrashSim(root) as sim:
        workload(sim)
    rec = sim.recording
    rec.verify()
    rng = random.Random(seed)
    points = rng.sample(range(len(rec) + 1), min(len(rec) + 1, 600))
    image_root = str(tmp_path / "image")
    beyond = set()
    for img in rec.crashes(points, rng, namespace=namespace):
        img.materialize(image_root)
        g = _group(image_root)  # the group's own recovery
        try:
            k = g.journal.last_seq
            where = f"crash point {img.point}"
            flushed = img.last_mark("flushed", 0)
            assert k >= flushed, f"{where}: seq {flushed} was flushed, the journal ends at {k}"
            with open(os.path.join(image_root, "d.img"), "rb") as f:
                assert f.read() == _image_after(ops, k), f"{where}: volume is not the " \
                                                         f"image after seq {k}"
            beyond.add(k - flushed)
        finally:
            g.journal.close()
            for vol in g.volumes.values():
                vol.close()
    assert len(points) >= 500 and len(beyond) > 1  # sometimes unflushed writes survived
