"""The Flusher (journal fdatasync off the loop) and the group's durability points:
writes complete journaled, flushes and commit_interval make them durable, failures halt."""

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


def _group(tmp_path, state_dir=None, **keys) -> Group:
    cfg = parse({"node": "p", "listen": "127.0.0.1:1", "nbd_listen": "127.0.0.1:2",
                 "state_dir": str(state_dir or tmp_path / "state"), "tls": False, "peers": {},
                 "groups": [{"name": "db", "role": "primary", "journal_size": "16MiB",
                             "volumes": [{"name": "data", "path": str(tmp_path / "d.img"),
                                          "size": "1MiB"}], "targets": [], **keys}]})
    group = Group(cfg.group("db"), cfg.state_dir)
    group.open()
    return group


async def _until(cond, what: str, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.001)


def test_writes_complete_written_and_flushes_wait_for_the_commit(tmp_path):
    """The durability contract on one node: a write completes once journaled (readable,
    not in the volume yet), a FLUSH once an fdatasync covers it; flushes that arrive
    during a commit share the next one; a failed fdatasync fails the group loudly."""
    async def main():
        g = _group(tmp_path)
        g.start()
        held = g.commit.flusher = _HeldFlusher()
        vol = g.volumes["data"]
        results: dict[str, int] = {}

        def done(name):
            return lambda err: results.setdefault(name, err)

        g.commit.submit_write(vol, 0, b"A" * 512, done("a"))
        await _until(lambda: "a" in results, "write a")
        assert results == {"a": 0} and not held.pending  # nobody asked for durability
        assert (g.commit.written_seq, g.commit.durable_seq, g.journal.last_seq) == (1, 0, 0)
        assert g.commit.read(vol, 0, 1024) == b"A" * 512 + bytes(512)  # seen, from the memtable
        assert vol.read(0, 512) == bytes(512)  # the volume waits for the journal

        g.commit.submit_flush(done("flush1"))
        assert len(held.pending) == 1 and "flush1" not in results
        g.commit.submit_write(vol, 512, b"B" * 512, done("b"))
        await _until(lambda: "b" in results, "write b")
        g.commit.submit_flush(done("flush2"))
        assert len(held.pending) == 1  # one commit at a time; flush2 waits for the next
        held.pending.pop(0)(0)
        assert results["flush1"] == 0 and "flush2" not in results
        assert (g.commit.durable_seq, g.commit.flush_seq, g.commit.applied_seq) == (1, 1, 1)
        assert vol.read(0, 512) == b"A" * 512 and vol.read(512, 512) == bytes(512)
        assert len(held.pending) == 1  # the next commit started at once, for flush2
        g.commit.submit_flush(done("flush3"))  # shares it
        held.pending.pop(0)(0)
        assert results["flush2"] == results["flush3"] == 0 and g.commit.flush_seq == 2
        assert vol.read(512, 512) == b"B" * 512 and g.journal.last_seq == 2

        g.commit.submit_flush(done("flush4"))  # nothing new: at once, no fdatasync
        assert results["flush4"] == 0 and not held.pending

        g.commit.submit_write(vol, 1024, b"C" * 512, done("c"))
        await _until(lambda: "c" in results, "write c")
        g.commit.submit_flush(done("flush5"))
        held.pending.pop(0)(errno.EIO)  # the disk lost it: nobody may build on seq 3
        assert results["flush5"] == errno.EIO and "fdatasync failed" in g.commit.halted
        assert g.commit.durable_seq == 2 and g.journal.last_seq == 2  # never shipped
        g.commit.submit_write(vol, 0, b"D" * 512, done("d"))
        assert results["d"] == errno.EIO
        g.commit.submit_flush(done("flush6"))
        assert results["flush6"] == errno.EIO
        await g.stop()

    asyncio.run(main())


def test_commit_interval_makes_unflushed_writes_durable(tmp_path):
    async def main():
        g = _group(tmp_path, commit_interval=0.05)
        g.start()
        held = g.commit.flusher = _HeldFlusher()
        vol = g.volumes["data"]
        results = []
        g.commit.submit_write(vol, 0, b"A" * 512, results.append)
        await _until(lambda: results, "the write")
        assert not held.pending
        await _until(lambda: held.pending, "the commit_interval commit", timeout=2)
        held.pending.pop(0)(0)
        assert g.commit.durable_seq == 1 and vol.read(0, 512) == b"A" * 512
        assert g.commit.flush_seq == 0  # durable, but nobody was promised it
        await g.stop()

    asyncio.run(main())


def test_durability_write_completes_each_write_durable(tmp_path):
    async def main():
        g = _group(tmp_path, durability="write")
        g.start()
        held = g.commit.flusher = _HeldFlusher()
        vol = g.volumes["data"]
        results = []
        g.commit.submit_write(vol, 0, b"A" * 512, results.append)
        await _until(lambda: held.pending, "the commit")
        assert results == []  # written, not durable: not complete yet
        held.pending.pop(0)(0)
        assert results == [0] and g.commit.durable_seq == 1 and g.commit.flush_seq == 1
        await g.stop()

    asyncio.run(main())


def test_a_loop_that_fails_fails_the_group_loudly(tmp_path, caplog):
    """An exception in the committer halts the group: status says why, writes get EIO,
    nothing hangs."""
    async def main():
        g = _group(tmp_path)

        def broken(batch):
            raise RuntimeError("injected")
        g.commit._write = broken
        g.start()
        results = []
        g.commit.submit_write(g.volumes["data"], 0, b"A" * 512, results.append)
        await _until(lambda: g.commit.halted, "the group to halt")
        assert "committer failed" in g.commit.halted and "injected" in g.commit.halted
        g.commit.submit_write(g.volumes["data"], 0, b"A" * 512, results.append)
        g.commit.submit_flush(results.append)
        assert results[-2:] == [errno.EIO, errno.EIO]
        await asyncio.wait_for(g.stop(), 5)

    asyncio.run(main())
    assert "the committer failed" in caplog.text


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
            g.commit.submit_write(vol, (i % 16) * 65536, bytes([i % 256]) * size, fut.set_result)
            return await asyncio.wait_for(fut, 10)

        filler = tests.agents.fill_up(small_fs)
        for i in range(1, 401):  # 25 MiB through a 16 MiB journal: segments come and go
            assert await write(i) == 0, i
        last = g.commit.written_seq
        assert await write(500, 3 << 20) == errno.ENOSPC  # bigger than a 2 MiB segment
        assert g.commit.journal_no_space and g.commit.written_seq == last and g.commit.halted is None
        os.unlink(filler)
        assert await write(501) == 0  # room again: the next write takes the freed seq
        assert g.commit.written_seq == last + 1 and not g.commit.journal_no_space
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


def test_a_shipper_that_fails_says_so_and_tries_again(tmp_path, caplog, monkeypatch):
    """A bug in a shipper session (here: an exception injected into its connect) must
    not end the shipper silently: status says it failed and why, the log has the
    traceback, and it tries again after a pause."""
    from replicator.shipping import shipper as shipper_mod
    from replicator.config import TargetConfig

    async def main():
        g = _group(tmp_path)
        g.start()
        link = g.targets.get("b") or g._add_target(TargetConfig(node="b", mode="async"))
        s = shipper_mod.Shipper(g, link, node="p", address=("127.0.0.1", 1), compress=False,
                                heartbeat_interval=1.0, heartbeat_timeout=3.0)
        calls = []

        async def broken():
            calls.append(1)
            raise RuntimeError("injected")
        monkeypatch.setattr(s.dialer, "connect", broken)
        monkeypatch.setattr(shipper_mod, "REFUSED_BACKOFF", 0.05)
        s.start()
        await _until(lambda: len(calls) >= 2, "the shipper to try again")
        assert s.state == "failed" and "injected" in s.last_error
        await s.stop()
        await g.stop()

    asyncio.run(main())
    assert "the shipper failed" in caplog.text and "RuntimeError: injected" in caplog.text


def test_a_receiver_link_that_fails_is_logged_and_the_listener_lives_on(caplog, monkeypatch):
    """A bug while serving one replication link (injected into its handshake) ends that
    link with the traceback in the log, not the listener, and not silently."""
    import socket

    from replicator.receiver import Receiver

    async def main():
        async def no_promotion(group, targets):
            raise AssertionError("no HANDOVER in this test")
        r = Receiver("b", {}, heartbeat_timeout=3.0, promote=no_promotion)

        async def broken(link):
            raise RuntimeError("injected")
        monkeypatch.setattr(r, "_handshake", broken)
        listener = socket.create_server(("127.0.0.1", 0))
        theirs = socket.create_connection(listener.getsockname())
        ours, _ = listener.accept()
        listener.close()
        try:
            ours.setblocking(False)
            await asyncio.wait_for(r._handle(ours), 5)  # returns: nothing escapes
        finally:
            theirs.close()

    asyncio.run(main())
    assert "replication link from" in caplog.text and "RuntimeError: injected" in caplog.text
