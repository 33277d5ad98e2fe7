"""A secondary that keeps a point-in-time window (`retain`, and `retain` with
`apply_delay`) under the crash-simulating layer (tests/crashsim.py): the real commit
path journals received batches, the real applier applies them in steps after saving
their before-images (group/applier.py, history.py), checkpoints are taken as the
checkpointer takes them (with its window and journal trims), and a power loss is cut
at hundreds of random points of the run.

After each crash the group's own recovery (Group.open: the journal after the
checkpoint replayed through the history's last step end, no further) must leave:
1. volumes that hold exactly the image after their applied_seq, a consistent seq, the
   history's last step end, never before a step the applier had finished (mark
   "applied") and, with apply_delay, before any record that was not due yet;
2. a window from which the history's undo gives the image after every consistent seq
   P of low_seq .. applied_seq, byte for byte;
3. an applier that goes on: for some crash points the group is started again, takes
   more records and applies them.
"""

from __future__ import annotations

import asyncio
import os
import pathlib
import random
import time
from dataclasses import dataclass, field

import pytest

from replicator.journal.record import FLAG_OPEN, Kind, encode_header
from tests.crashsim import CrashSim
from tests.unit.test_epochs import SIZE, _group  # a secondary Group of one 1 MiB volume
from tests.unit.test_window import _applied

REGION = 64 << 10  # where the records write (of the 1 MiB volume)
RECORDS = 160
HOUR = 3600 * 10**9
VARIANTS = {"retain": {"retain": "1h"},
            "retain+delay": {"retain": "1h", "apply_delay": "15m"}}


@dataclass
class Plan:
    """What the primary sent: each seq's record bytes and what it does to REGION, the
    image after every consistent seq, the batches, and the first seq not due (apply_delay)."""
    records: dict[int, bytes] = field(default_factory=dict)
    ops: dict[int, tuple[int, bytes]] = field(default_factory=dict)  # seq: (offset, bytes)
    images: dict[int, bytes] = field(default_factory=lambda: {0: bytes(REGION)})
    batches: list[tuple[int, int]] = field(default_factory=list)
    not_due: int = RECORDS + 1

    def add(self, seq: int, rng: random.Random, when: int, flags: int) -> bytes:
        offset = rng.randrange(REGION - 1)  # unaligned and overlapping
        length = rng.randint(1, min(9000, REGION - offset))
        if rng.random() < 0.2:
            kind, payload, content = Kind.ZERO, b"", bytes(length)
        else:
            kind = Kind.WRITE
            payload = content = rng.randbytes(length)
        rec = encode_header(seq, b"data", offset, length, kind, when, payload, flags) + payload
        self.records[seq], self.ops[seq] = rec, (offset, content)
        return rec

    def image_after(self, seq: int) -> bytearray:
        """REGION after the records through `seq` (any seq: an epoch's inside too)."""
        base = max(s for s in self.images if s <= seq)
        img = bytearray(self.images[base])
        for s in range(base + 1, seq + 1):
            offset, content = self.ops[s]
            img[offset:offset + len(content)] = content
        return img

    def last_due(self) -> int:
        """The last consistent seq whose records are all due."""
        return max(s for s in self.images if s < self.not_due)


def _plan(seed: int, delay: bool) -> Plan:
    """RECORDS records, some in epochs of 2..5 (FLAG_OPEN but the last), journaled by the
    primary 2 h ago .. now (so the history's files are cut by time and the oldest fall
    out of retain); with a delay the last ones are not due (a future time)."""
    rng = random.Random(seed)
    plan = Plan()
    now = time.time_ns()
    if delay:
        plan.not_due = RECORDS * 3 // 4 + 1
    img = bytearray(REGION)
    left = 0  # records of the open epoch still to come before its last one
    for seq in range(1, RECORDS + 1):
        if not left and seq < RECORDS and rng.random() < 0.12:
            left = rng.randint(1, 4)
        flags = FLAG_OPEN if left and seq < RECORDS else 0
        left = left - 1 if flags else 0
        when = now - 2 * HOUR + (seq - 1) * (100 * HOUR // 60) // RECORDS  # .. -20 min
        if seq >= plan.not_due:
            when = now + HOUR
        plan.add(seq, rng, when, flags)
        offset, content = plan.ops[seq]
        img[offset:offset + len(content)] = content
        if not flags:
            plan.images[seq] = bytes(img)
    seq = 1
    while seq <= RECORDS:
        last = min(RECORDS, seq + rng.randint(0, 5))
        plan.batches.append((seq, last))
        seq = last + 1
    return plan


async def _checkpoint(g) -> None:
    """A checkpoint as the checkpointer takes one, with its trims of the window and the
    journal after it."""
    await g.commit.settle()
    await asyncio.get_running_loop().run_in_executor(
        g._io, g._sync_and_save, g.journal.position(g.commit.applied_seq))
    await g.window.trim()
    await g.retention.trim()


def _workload(root: str, plan: Plan, options: dict, seed: int):
    def workload(sim: CrashSim) -> None:
        rng = random.Random(seed)

        async def main():
            g = _group(pathlib.Path(root), **options)
            g.start()
            loop = asyncio.get_running_loop()
            try:
                for first, last in plan.batches:
                    fut = loop.create_future()
                    g.commit.submit_records(first, last, b"".join(
                        plan.records[s] for s in range(first, last + 1)), fut.set_result)
                    assert await asyncio.wait_for(fut, 10) == 0
                    if rng.random() < 0.5:
                        await g.commit.commit_now()
                        sim.mark("durable", g.commit.durable_seq)
                    if rng.random() < 0.25:  # let the applier catch up with what is due
                        due = max(s for s in plan.images
                                  if s <= g.commit.consistent_seq and s < plan.not_due)
                        await _applied(g, due)
                    if rng.random() < 0.1:
                        await _checkpoint(g)
                    sim.mark("applied", g.commit.applied_seq)
                await g.commit.commit_now()
                await _applied(g, plan.last_due())
                sim.mark("applied", g.commit.applied_seq)
                assert g.window.low_seq > 0, "no history file fell out of retain"
            finally:
                await g.stop()

        asyncio.run(main())

    return workload


def _close(g) -> None:
    g.journal.close()
    g.window.history.close()
    for vol in g.volumes.values():
        vol.close()
    g._io.shutdown()


def _check_recovered(g, plan: Plan, img, where: str) -> int:
    """Invariants 1 and 2 on a reopened group; returns its applied_seq."""
    j, h = g.journal, g.window.history
    assert j.last_seq >= img.last_mark("durable", 0), f"{where}: lost a durable record"
    applied = g.commit.applied_seq
    assert applied in plan.images, f"{where}: applied_seq {applied} is inside an epoch"
    assert applied == h.applied_seq, \
        f"{where}: applied_seq {applied}, the history's last step end {h.applied_seq}"
    assert applied <= g.commit.consistent_seq <= j.last_seq, where
    assert applied >= img.last_mark("applied", 0), \
        f"{where}: the volumes went back before a finished step ({applied})"
    assert applied <= plan.last_due(), f"{where}: applied seq {applied}, not due yet"
    with open(g.volumes["data"].path, "rb") as f:
        got = f.read()
    assert got[REGION:] == bytes(SIZE - REGION), where
    assert got[:REGION] == plan.images[applied], \
        f"{where}: the volume is not the image after its applied_seq {applied}"
    firsts = sorted(int(n[:-5]) for n in os.listdir(h.directory) if n.endswith(".hist"))
    for (last, _, _), first in zip(h.files(), firsts[1:]):
        assert first == last + 1, f"{where}: history files {firsts}: the one from seq " \
                                  f"{first} follows one that ends at seq {last}"
    low = g.window.low_seq
    assert low in plan.images and low <= applied, f"{where}: window starts at {low}"
    # Every consistent point, newest first: each undo goes on from the image of the
    # point after it; a few points also straight from the volume, as a rewind does.
    image, above = bytearray(got[:REGION]), applied
    points = sorted((s for s in plan.images if low <= s <= applied), reverse=True)
    for p in points:
        h.undo(p, above, _onto(image))
        above = p
        assert image == plan.images[p], f"{where}: undo to seq {p} (applied {applied})"
    for p in random.Random(applied).sample(points, min(2, len(points))):
        fresh = bytearray(got[:REGION])
        h.undo(p, applied, _onto(fresh))
        assert fresh == plan.images[p], f"{where}: undo from {applied} to seq {p}"
    return applied


def _onto(image: bytearray):
    """history.undo's writer into a copy of REGION."""
    def write(name: str, offset: int, data) -> None:
        assert name == "data"
        image[offset:offset + len(data)] = data
    return write


async def _go_on(g, plan: Plan, where: str) -> None:
    """Invariant 3: the reopened group takes three more records (due) and applies them
    (with the delay: those before the records not due once caught up)."""
    g.start()
    try:
        first = g.journal.last_seq + 1
        more = Plan()
        rng = random.Random(first)
        recs = [more.add(s, rng, time.time_ns() - 2 * HOUR, 0) for s in range(first, first + 3)]
        fut = asyncio.get_running_loop().create_future()
        g.commit.submit_records(first, first + 2, b"".join(recs), fut.set_result)
        assert await asyncio.wait_for(fut, 10) == 0
        await g.commit.commit_now()
        last = first + 2
        if first <= plan.not_due:  # nothing waits for the delay before them
            await _applied(g, last)
        else:
            await _applied(g, plan.last_due())
            assert g.commit.applied_seq == plan.last_due(), where
            await g.window.applier.catch_up()
        assert g.commit.applied_seq == last, f"{where}: applied {g.commit.applied_seq}"
        img = plan.image_after(first - 1)
        for offset, content in more.ops.values():
            img[offset:offset + len(content)] = content
        assert g.volumes["data"].read(0, REGION) == img, f"{where}: after going on"
    finally:
        await g.stop()


def _after_history_unlinks(rec) -> list[int]:
    """The crash points right after the window's trim unlinked a history file, and the
    two after them (before the next fsync of the history directory a file system may
    persist those unlinks in any order)."""
    out, calls, left = [], 0, 0
    for ev in rec.events:
        if ev[0] == "mark":
            continue
        calls += 1
        if ev[0] == "unlink" and "/history/" in ev[1]:
            left = 3
        elif ev[0] == "dirsync_start" and ev[2].endswith("history"):
            left = 0
        if left:
            out.append(calls)
            left -= 1
    return out


def _check_point(img, rec, plan: Plan, options: dict, image_root: str, go_on: bool) -> int:
    img.materialize(image_root)
    where = f"crash point {img.point} of {len(rec)} (after {rec.call_at(img.point)!r:.80})"
    g = _group(pathlib.Path(image_root), **options)  # the group's own recovery
    try:
        applied = _check_recovered(g, plan, img, where)
    except BaseException:
        _close(g)
        raise
    if go_on:
        asyncio.run(_go_on(g, plan, where))
    else:
        _close(g)
    return applied




@pytest.mark.parametrize("namespace", ["prefix", "subset"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_a_window_survives_power_loss(tmp_path, variant, namespace):
    options = VARIANTS[variant]
    seed = sorted(VARIANTS).index(variant) * 2 + (namespace == "subset") + 1
    plan = _plan(seed, "apply_delay" in options)
    root = str(tmp_path / "run")
    with CrashSim(root) as sim:
        _workload(root, plan, options, seed)(sim)
    rec = sim.recording
    rec.verify()
    rng = random.Random(seed)
    points = rng.sample(range(len(rec) + 1), min(len(rec) + 1, 220))
    image_root = str(tmp_path / "image")
    applied, went_on = set(), 0
    for img in rec.crashes(points, rng, namespace=namespace):
        go_on = img.point % 6 == 0
        went_on += go_on
        applied.add(_check_point(img, rec, plan, options, image_root, go_on))
    assert len(applied) > 10 and went_on > 10
    trims = _after_history_unlinks(rec)
    assert trims, "the window's trim dropped no history file"
    for attempt in range(6):  # each unlink persisted or not, independently
        for img in rec.crashes(trims, random.Random(attempt), namespace=namespace,
                               persist=0.5):
            _check_point(img, rec, plan, options, image_root, go_on=False)


def test_a_group_stops_while_its_applier_is_woken(tmp_path):
    """A delayed secondary's stop (agent shutdown) right after a received batch became
    durable (the applier is being woken for it) returns."""
    now = time.time_ns()
    plan = Plan()
    rng = random.Random(0)
    recs = [plan.add(seq, rng, now + HOUR, 0) for seq in (1, 2)]  # not due

    async def main():
        g = _group(tmp_path, retain="1h", apply_delay="15m")
        g.start()
        for seq, rec in enumerate(recs, 1):
            fut = asyncio.get_running_loop().create_future()
            g.commit.submit_records(seq, seq, rec, fut.set_result)
            assert await fut == 0
            await g.commit.commit_now()
        try:
            await asyncio.wait_for(g.stop(), 5)
        except asyncio.TimeoutError:
            raise AssertionError("Group.stop did not return in 5 s: the applier lost its "
                                 "cancellation (asyncio.wait_for on Python 3.11 returns the "
                                 "woken event instead)") from None
        assert g.commit.applied_seq == 0
    asyncio.run(main())
