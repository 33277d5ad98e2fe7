"""The journal after a power loss, at thousands of random crash points (tests/crashsim.py).

The workload drives the Journal the way the group's write path does (group/commit.py `_write`,
`commit_soon`, `_durable`): reserve, append (one writev), batches piling up in the page
cache until a commit fdatasyncs and indexes them all, segments rolling (durable first),
trims through a checkpoint with their deletes, and (in one variant) batches whose writev
fails part way, so the journal is cut back and their seqs are written again. After each simulated power loss the journal reopens with its ordinary recovery
and must hold exactly a gap-free run of records base+1..last, every one byte for byte
the latest version appended for its seq before the crash (never a torn record, never
a superseded one), `last` at least the last record whose fdatasync had returned, and it
must take the next batch. The checkpoint variant adds group.json (statefile.replace).
"""

import errno
import json
import os
import random

import pytest

from replicator import statefile
from replicator.journal.record import Kind, decode, encode_header, iterate
from replicator.journal.segments import Journal
from tests.crashsim import CrashSim

CAPACITY = 48 << 10
SEGMENT = 8 << 10


def _record(seq: int, rng: random.Random, lap: int = 0) -> bytes:
    kind = Kind.WRITE if rng.random() < 0.9 else Kind.ZERO
    payload = bytes([(seq * 7 + lap * 101) % 251 + 1]) * rng.randint(1, 1500) \
        if kind == Kind.WRITE else b""
    hdr = encode_header(seq, b"vol", seq * 4096, len(payload) or 4096, kind, lap, payload)
    return bytes(hdr) + payload


def _journal(root: str) -> Journal:
    return Journal(os.path.join(root, "journal"), capacity=CAPACITY, segment_size=SEGMENT)


class _Writer:
    """The group's use of the journal, batch by batch (group/commit.py `_write`, `commit_soon`,
    `_synced`, `_durable`): batches are appended into the page cache and pile up; a
    commit fdatasyncs every segment they went to and indexes them in order; a segment is
    made durable before a batch goes to the next one; a failed writev cuts the segment
    back and its seqs are written again. Marks in the recording: ("appended", (first,
    last, lap)) once a batch is in the page cache, ("durable", last) once a commit's
    fdatasync returned, ("base", seq) once a trim moved the base."""

    def __init__(self, journal: Journal, sim: CrashSim, rng: random.Random):
        self.j, self.sim, self.rng = journal, sim, rng
        self.next_seq = journal.last_seq + 1
        self.in_flight: list[tuple] = []  # (Appended, last_seq): not durable yet
        self.versions: dict[tuple[int, int], bytes] = {}  # (seq, lap) -> record
        self.lap = 0

    def _batch(self) -> tuple[int, list[bytes]]:
        first = self.next_seq
        count = self.rng.randint(1, 4)
        return first, [_record(s, self.rng, self.lap) for s in range(first, first + count)]

    def append(self) -> None:
        first, recs = self._batch()
        if self.in_flight and self.j.starts_segment(sum(map(len, recs))):
            self.flush_all()
        batch = self.j.append(first, recs, [len(r) for r in recs], [decode(r).hcrc for r in recs])
        for seq, r in enumerate(recs, start=first):
            self.versions[seq, self.lap] = r
        self.next_seq += len(recs)
        self.sim.mark("appended", (first, self.next_seq - 1, self.lap))
        self.in_flight.append((batch, self.next_seq - 1))

    def flush_all(self) -> None:
        """One commit: an fdatasync of each segment written to, then the index."""
        if not self.in_flight:
            return
        for fd in dict.fromkeys(b.fd for b, _ in self.in_flight):
            os.fdatasync(fd)
        for batch, _ in self.in_flight:
            self.j.commit(batch)
        self.sim.mark("durable", self.in_flight[-1][-1])
        self.in_flight.clear()

    def fail_append(self) -> None:
        """A writev that fails part way (ENOSPC, say): some of the batch's records reach
        the page cache whole, then the error; the journal cuts them off (durably) and
        the group numbers the next batch from the same seq, so it is written again."""
        first, recs = self._batch()
        if self.in_flight and self.j.starts_segment(sum(map(len, recs))):
            self.flush_all()
        data = b"".join(recs)
        cut = self.rng.randint(1, len(data) - 1)
        for seq, r in enumerate(recs, start=first):
            self.versions[seq, self.lap] = r
        # In flight until append raises: a crash before that may keep its whole records
        # (a client was told nothing yet); once it failed they must never come back.
        self.sim.mark("attempt", (first, first + len(recs) - 1, self.lap))
        writev = os.writev

        def failing(fd_, bufs):
            writev(fd_, [data[:cut]])
            raise OSError(errno.ENOSPC, "No space left on device")
        os.writev = failing
        try:
            with pytest.raises(OSError):
                self.j.append(first, recs, [len(r) for r in recs], [decode(r).hcrc for r in recs])
        finally:
            os.writev = writev
        self.sim.mark("failed", (first, first + len(recs) - 1, self.lap))
        self.lap += 1


def _workload(root: str, sim: CrashSim, seed: int, batches: int, *, failures: bool,
              checkpoints: bool) -> _Writer:
    rng = random.Random(seed)
    j = _journal(root)
    j.open()
    w = _Writer(j, sim, rng)
    checkpoint = 0
    for _ in range(batches):
        w.append()
        if rng.random() < 0.3:
            w.flush_all()
        if failures and rng.random() < 0.08:
            w.fail_append()
        if rng.random() < 0.15 and j.last_seq > j.base.seq:
            # A checkpoint (group/core.py _save: the volumes' fdatasync, then group.json),
            # then the trim it allows.
            w.flush_all()
            low = checkpoint = rng.randint(max(j.base.seq, checkpoint), j.last_seq)
            if checkpoints:  # it never moves back
                pos = j.position(low)
                statefile.replace(os.path.join(root, "group.json"),
                                  json.dumps({"checkpoint": [pos.seq, pos.hcrc]}).encode(),
                                  pad=True)
                sim.mark("checkpoint", pos.seq)
            gone = j.trim_through(low)
            if gone:
                sim.mark("base", j.base.seq)
                j.delete(gone)
    w.flush_all()
    j.close()
    return w


def _check(root: str, img, w: _Writer, *, checkpoints: bool) -> int:
    """Recover the image's journal and check it; returns how many records past the
    durable point survived."""
    where = f"crash point {img.point}"
    durable = img.last_mark("durable", 0)
    current: dict[int, int] = {}  # seq -> lap of its latest version before the crash
    for label, value in img.marks:
        if label in ("appended", "attempt"):
            first, last, lap = value
            for seq in range(first, last + 1):
                current[seq] = lap
        elif label == "failed":
            first, last, lap = value
            for seq in range(first, last + 1):
                if current.get(seq) == lap:
                    del current[seq]
    j = _journal(root)
    j.open()
    try:
        assert j.base.seq >= img.last_mark("base", 0), where
        assert j.last_seq >= durable, f"{where}: journal ends at {j.last_seq}, " \
                                      f"seq {durable} was durable"
        seq = j.first_seq
        while seq <= j.last_seq:
            first, last, data = j.read(seq, 1 << 20)
            pos = 0
            for rec in iterate(data):
                raw = bytes(data[pos:pos + rec.size])
                pos += rec.size
                assert rec.seq in current, f"{where}: seq {rec.seq} was never appended"
                assert raw == w.versions[rec.seq, current[rec.seq]], \
                    f"{where}: seq {rec.seq} is not its latest version " \
                    f"(lap {rec.time_ns}, latest {current[rec.seq]})"
            seq = last + 1
        if j.base.seq:
            assert j.base.hcrc == decode(w.versions[j.base.seq, current[j.base.seq]]).hcrc
        if checkpoints:
            saved = img.last_mark("checkpoint", 0)
            cp = [0, 0]
            if os.path.exists(os.path.join(root, "group.json")):
                with open(os.path.join(root, "group.json")) as f:
                    cp = json.load(f)["checkpoint"]
            assert cp[0] >= saved, f"{where}: checkpoint {cp[0]}, {saved} was saved"
            # What the group's open checks: base <= checkpoint <= last, the same record.
            assert j.base.seq <= cp[0] <= j.last_seq, f"{where}: checkpoint {cp[0]} " \
                                                      f"outside {j.base.seq}..{j.last_seq}"
            if cp[0]:
                assert j.position(cp[0]).hcrc == cp[1], where
            statefile.replace(os.path.join(root, "group.json"), b"{}", pad=True)  # works
        recovered = j.last_seq
        # The recovered journal takes the next batch, and keeps it over a reopen.
        nxt = j.last_seq + 1
        rec = _record(nxt, random.Random(nxt))
        batch = j.append(nxt, [rec], [len(rec)], [decode(rec).hcrc])
        os.fdatasync(batch.fd)
        j.commit(batch)
    finally:
        j.close()
    j = _journal(root)
    j.open()
    assert j.last_seq == nxt, where
    j.close()
    return recovered - durable


def _run(tmp_path, seed, *, batches=120, points=500, failures=False, checkpoints=False,
         namespace="prefix", block=512):
    root = str(tmp_path / "run")
    with CrashSim(root) as sim:
        w = _workload(root, sim, seed, batches, failures=failures, checkpoints=checkpoints)
    rec = sim.recording
    rec.verify()
    rng = random.Random(seed)
    chosen = rng.sample(range(len(rec) + 1), min(points, len(rec) + 1))
    image_root = str(tmp_path / "image")
    extra = []
    for img in rec.crashes(chosen, rng, namespace=namespace, block=block):
        img.materialize(image_root)
        extra.append(_check(image_root, img, w, checkpoints=checkpoints))
    assert len(extra) == points and len(rec) > points
    # Not vacuous: unsynced records sometimes survived the crash and sometimes did not.
    assert any(n > 0 for n in extra) and any(n == 0 for n in extra)


@pytest.mark.parametrize("seed", range(4))
def test_journal_recovers_a_durable_prefix_after_power_loss(tmp_path, seed):
    _run(tmp_path, seed)


@pytest.mark.parametrize("seed", range(2))
def test_a_cut_after_a_failed_write_never_lets_a_superseded_record_back(tmp_path, seed):
    _run(tmp_path, 100 + seed, failures=True)


@pytest.mark.parametrize("block", [0, 4096])
def test_journal_recovers_with_whole_writes_or_pages_as_the_unit(tmp_path, block):
    """Writes that persist whole (any subset of them), and 4 KiB pages instead of
    sectors as the unit a disk writes."""
    _run(tmp_path, 400 + block, points=300, block=block)


def test_journal_recovers_when_names_persist_in_any_order(tmp_path):
    """POSIX's weakest promise: namespace operations not followed by a directory fsync
    persist as any subset, not only in order."""
    _run(tmp_path, 200, namespace="subset")


@pytest.mark.parametrize("seed", range(2))
def test_checkpoint_and_journal_agree_after_power_loss(tmp_path, seed):
    """group.json (statefile.replace: spare written in place, fsync, link, rename,
    rename, directory fsync) always names a record the recovered journal holds."""
    _run(tmp_path, 300 + seed, checkpoints=True)
