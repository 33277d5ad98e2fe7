"""The Flusher (journal fdatasync off the loop) and the group's in-order completion of
batches whose fdatasyncs end out of order or fail."""

from __future__ import annotations

import asyncio
import errno
import logging
import os

import pytest

import tests.agents

from replicator.config import parse
from replicator.group import Group
from replicator.journal.flusher import SLOTS, Flusher
from replicator.journal.segments import Journal, JournalError

LOG = logging.getLogger("test")


async def _sync_all(flusher: Flusher, fds: list[int]) -> list[int]:
    loop = asyncio.get_running_loop()
    futs = [loop.create_future() for _ in fds]
    for fd, fut in zip(fds, futs):
        flusher.fdatasync(fd, fut.set_result)
    return list(await asyncio.wait_for(asyncio.gather(*futs), 10))


@pytest.mark.parametrize("use_aio", [True, False])
def test_fdatasync_completes_on_the_loop_and_reports_errors(tmp_path, use_aio):
    async def main():
        flusher = Flusher(asyncio.get_running_loop(), log=LOG, use_aio=use_aio)
        assert flusher.mode == ("aio" if use_aio else "thread")
        fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT)
        try:
            os.write(fd, b"x" * 4096)
            assert await _sync_all(flusher, [fd]) == [0]
            # every slot at once, more than once
            for _ in range(3):
                assert await _sync_all(flusher, [fd] * SLOTS) == [0] * SLOTS
            bad = os.open(tmp_path / "g", os.O_WRONLY | os.O_CREAT)
            os.close(bad)  # a closed descriptor: EBADF, and the flusher works on
            assert await _sync_all(flusher, [bad, fd]) == [errno.EBADF, 0]
        finally:
            os.close(fd)
            flusher.close()

    asyncio.run(main())


class _HeldFlusher:
    """Stands in for the kernel so the test decides when and how each fdatasync ends
    (this machine has no block device that fails on demand)."""

    def __init__(self):
        self.pending: list = []

    def fdatasync(self, fd, callback):
        self.pending.append(callback)

    def close(self):
        pass


def _group(tmp_path, state_dir=None) -> Group:
    cfg = parse({"node": "p", "listen": "127.0.0.1:1", "nbd_listen": "127.0.0.1:2",
                 "state_dir": str(state_dir or tmp_path / "state"), "tls": False, "peers": {},
                 "groups": [{"name": "db", "role": "primary", "journal_size": "16MiB",
                             "volumes": [{"name": "data", "path": str(tmp_path / "d.img"),
                                          "size": "1MiB"}], "targets": []}]})
    group = Group(cfg.group("db"), cfg.state_dir)
    group.open()
    return group


def test_batches_complete_in_seq_order_and_a_failure_frees_its_seqs(tmp_path):
    async def main():
        g = _group(tmp_path)
        g.start()
        held = g._flusher = _HeldFlusher()
        vol = g.volumes["data"]
        results: dict[str, int] = {}

        async def write(name, offset, data):
            """Submit; return once the committer has written it (its fdatasync is
            pending) or it was refused."""
            pending = len(held.pending)
            g.submit_write(vol, offset, data, lambda err: results.setdefault(name, err))

            async def written():
                while len(held.pending) == pending and name not in results:
                    await asyncio.sleep(0)
            await asyncio.wait_for(written(), 5)

        await write("a", 0, b"A" * 512)
        await write("b", 512, b"B" * 512)
        assert len(held.pending) == 2 and results == {}
        held.pending.pop(1)(0)  # b's fdatasync ends first: b waits for a
        assert results == {}
        held.pending.pop(0)(0)
        assert results == {"a": 0, "b": 0} and g.journal.last_seq == 2
        size = os.path.getsize(g.journal._segments[-1].path)

        await write("c", 0, b"C" * 512)
        await write("d", 1024, b"D" * 512)
        held.pending.pop(1)(0)  # d looks fine, but it was written behind c, which fails
        held.pending.pop(0)(errno.EIO)
        assert results["c"] == errno.EIO and results["d"] == errno.EIO
        assert g.journal.last_seq == 2
        assert os.path.getsize(g.journal._segments[-1].path) == size  # cut back
        assert g.halted is None  # nobody received c or d: their seqs are free again

        await write("e", 2048, b"E" * 512)
        held.pending.pop(0)(0)
        assert results["e"] == 0 and g.journal.last_seq == 3
        assert vol.read(0, 512) == b"A" * 512 and vol.read(2048, 512) == b"E" * 512

        # A batch a target already received cannot give its seqs back: writes stop.
        g.early_senders.add(lambda first, last, bufs: True)
        await write("f", 0, b"F" * 512)
        held.pending.pop(0)(errno.EIO)
        assert results["f"] == errno.EIO and "was shipped" in g.halted
        g.early_senders.clear()
        await write("g", 0, b"G" * 512)
        assert results["g"] == errno.EIO and not held.pending
        await g.stop()

        j = Journal(os.path.join(g.dir, "journal"), capacity=16 << 20)
        j.open()
        assert j.last_seq == 3
        j.close()

    asyncio.run(main())


@pytest.fixture
def small_fs(tmp_path):
    """A 24 MiB tmpfs: a state directory on a disk that fills up for real (the 16 MiB
    journal reserves 20 MiB at open)."""
    with tests.agents.small_fs(tmp_path / "small", "24m") as mnt:
        yield mnt


def test_a_full_disk_does_not_fail_writes_the_journal_reserved_room_for(tmp_path, small_fs):
    """The journal's space is taken at open: with every other byte of its file system
    gone, writes roll through new segments and checkpoints trim and save. Only a batch
    larger than a segment needs fresh space; it fails ENOSPC, status says the journal
    is full, and nothing torn is left."""
    async def main():
        g = _group(tmp_path, state_dir=small_fs)
        g.start()
        vol = g.volumes["data"]
        loop = asyncio.get_running_loop()

        async def write(i: int, size: int = 65536) -> int:
            fut = loop.create_future()
            g.submit_write(vol, (i % 16) * 65536, bytes([i % 256]) * size, fut.set_result)
            return await asyncio.wait_for(fut, 10)

        filler = tests.agents.fill_up(small_fs)
        for i in range(1, 401):  # 25 MiB through a 16 MiB journal: segments come and go
            assert await write(i) == 0, i
        last = g.journal.last_seq
        assert await write(500, 3 << 20) == errno.ENOSPC  # bigger than a 2 MiB segment
        assert g.journal_no_space and g.journal.last_seq == last and g.halted is None
        os.unlink(filler)
        assert await write(501) == 0  # room again: the next write takes the freed seq
        assert g.journal.last_seq == last + 1 and not g.journal_no_space
        await g.stop()

        j = Journal(os.path.join(g.dir, "journal"), capacity=16 << 20)
        j.open()  # no torn or partial record was left by the failed batch
        first, last_seq, data = j.read(last + 1, 1 << 20)
        assert (first, last_seq) == (last + 1, last + 1)
        assert data.endswith(bytes([501 % 256]) * 65536)
        j.close()

    asyncio.run(main())


def test_a_journal_whose_reservation_does_not_fit_is_refused_at_open(tmp_path):
    with tests.agents.small_fs(tmp_path / "tiny", "8m") as mnt:
        with pytest.raises(JournalError, match="cannot reserve its 20971520 bytes"):
            _group(tmp_path, state_dir=mnt)
