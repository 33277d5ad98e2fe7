"""Undo log of a replica being resynced: read one entry at a time (never one read of the
whole log: Linux returns at most ~2 GiB per read), torn tails cut, corruption raised."""

from __future__ import annotations

import os
import tracemalloc

import pytest

from replicator import undo as undo_mod
from replicator.undo import UndoError, UndoLog

REGION = 64 << 10


def _fill(log: UndoLog, count: int, start: int = 0) -> None:
    for i in range(start, start + count, 16):
        log.save([("data", j * REGION, bytes([j % 251]) * REGION)
                  for j in range(i, min(i + 16, start + count))])


def test_a_log_larger_than_one_read_returns_is_kept_whole(tmp_path, monkeypatch):
    """A read returns less than asked (the kernel's ~2 GiB cap, here made 1 MiB):
    every entry must survive the reopen, none be taken for a torn tail."""
    path = str(tmp_path / "resync.undo")
    log = UndoLog(path)
    log.open()
    _fill(log, 64)  # 4 MiB of entries
    log.close()
    size = os.path.getsize(path)
    real_pread = os.pread
    monkeypatch.setattr(undo_mod.os, "pread", lambda fd, n, off: real_pread(fd, min(n, 1 << 20), off))
    log = UndoLog(path)
    log.open()
    assert os.path.getsize(path) == size
    assert len(log.saved) == 64
    entries = list(log.entries_newest_first())
    assert [o for _, o, _ in entries] == [j * REGION for j in reversed(range(64))]
    assert all(old == bytes([o // REGION % 251]) * REGION for _, o, old in entries)
    log.close()


def test_a_rollback_reads_the_log_one_entry_at_a_time(tmp_path):
    path = str(tmp_path / "resync.undo")
    log = UndoLog(path)
    log.open()
    _fill(log, 512)  # 32 MiB
    log.close()
    log = UndoLog(path)
    tracemalloc.start()
    try:
        log.open()
        count = 0
        for _, _, old in log.entries_newest_first():
            count += len(old) == REGION
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        log.close()
    assert count == 512
    assert peak < 4 << 20, f"{peak} bytes held to scan and replay a 32 MiB undo log"


def test_a_torn_tail_is_cut_and_a_damaged_entry_is_an_error(tmp_path):
    path = str(tmp_path / "resync.undo")
    log = UndoLog(path)
    log.open()
    _fill(log, 3)
    log.close()
    whole = os.path.getsize(path)
    entry = whole // 3
    for cut in (whole - 1, whole - entry + 10, whole - entry + 1):
        os.truncate(path, cut)
        log = UndoLog(path)
        log.open()
        assert len(log.saved) == 2 and os.path.getsize(path) == whole - entry
        _fill(log, 1, start=2)
        log.close()
    with open(path, "r+b") as f:  # flip a byte of the first entry's old data
        f.seek(100)
        b = f.read(1)
        f.seek(100)
        f.write(bytes([b[0] ^ 1]))
    with pytest.raises(UndoError, match="checksum mismatch in entry at offset 0"):
        UndoLog(path).open()
