"""A secondary's point-in-time history (group/history.py) on real volume files, driven
the way group/applier.py drives it: each step's before-images saved from the volumes
(history.save), then the step written to them (apply_to_volumes). Going back from the
last image to any consistent seq of the window must give that seq's image byte for
byte, also when the undo is redone over a partly undone image, after a torn or corrupt
tail, after cut_after, and while files rotate and the oldest are dropped."""

from __future__ import annotations

import os
import random
import shutil
import tempfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from replicator.group.commit import apply_to_volumes
from replicator.group.history import History, HistoryError
from replicator.journal.record import FLAG_OPEN, Kind, decode, encode_header
from replicator.volume import Volume

SIZE = 16 << 10  # bytes of each volume
NAMES = ("a", "b")
T0 = 1_800_000_000 * 10**9  # the primary's clock at seq 0


class Replica:
    """Volumes, their history and a model of the image after every consistent seq."""

    def __init__(self, directory: str, file_bytes: int = 64 << 20, file_seconds: float = 0):
        self.dir = directory
        self.volumes = {n: Volume(n, os.path.join(directory, f"{n}.img"), SIZE)
                        for n in NAMES}
        rng = random.Random(directory)
        self.model = {}
        for name, vol in self.volumes.items():
            vol.open()
            self.model[name] = bytearray(rng.randbytes(SIZE))
            vol.write(0, self.model[name])
        self.history = History(os.path.join(directory, "history"), images=True,
                               file_bytes=file_bytes, file_seconds=file_seconds)
        self.history.open()
        self.history.start_at(0, T0)
        self.images = {0: self.image()}  # consistent seq -> the image after it
        self.seq = 0

    def image(self) -> dict[str, bytes]:
        return {n: bytes(m) for n, m in self.model.items()}

    def records(self, ops) -> list:
        """Records after self.seq from (volume, kind, offset, length, open) tuples (the
        last one closes its epoch); the model and self.images follow them."""
        out = []
        for i, (name, kind, offset, length, open_) in enumerate(ops):
            self.seq += 1
            length = min(length, SIZE - offset)
            flags = FLAG_OPEN if open_ and i < len(ops) - 1 else 0
            data = b""
            if kind is Kind.WRITE:
                data = random.Random(self.seq).randbytes(length)
                self.model[name][offset:offset + length] = data
            elif kind is Kind.ZERO:
                self.model[name][offset:offset + length] = bytes(length)
            elif kind is Kind.MARKER:
                name, offset, length, flags = f"m{self.seq}", 0, 0, 0
            else:
                offset = length = 0
            out.append(decode(encode_header(self.seq, name.encode(), offset, length, kind,
                                            T0 + self.seq * 1000, data, flags) + data))
            if not flags:
                self.images[self.seq] = self.image()
        return out

    def step(self, records, apply: bool = True) -> None:
        """One applier step: before-images and step end durably, then the volumes."""
        last = records[-1]
        self.history.save(last.seq, last.time_ns, records, self.volumes)
        if apply:
            apply_to_volumes([(self.volumes[r.volume], r.kind, r.offset, r.length, r.payload)
                              for r in records if r.volume in self.volumes])

    def run(self, records, ends) -> None:
        """Apply `records` in steps, one ending at each consistent one `ends` says."""
        start = 0
        for i, rec in enumerate(records):
            if not rec.flags and (ends[i % len(ends)] or i == len(records) - 1):
                self.step(records[start:i + 1])
                start = i + 1

    def volume_image(self, volumes=None) -> dict[str, bytes]:
        return {n: v.read(0, SIZE) for n, v in (volumes or self.volumes).items()}

    def copy(self, tag: str) -> dict[str, Volume]:
        """Writable copies of the volumes as they are now."""
        out = {}
        for name, vol in self.volumes.items():
            path = os.path.join(self.dir, f"{tag}-{name}.img")
            shutil.copyfile(vol.path, path)
            out[name] = Volume(name, path, SIZE)
            out[name].open()
        return out

    def undo_copy(self, point: int, history: History | None = None,
                  volumes_seq: int | None = None) -> dict[str, bytes]:
        """The image `history` gives for `point`, undone onto a copy of the volumes (which
        hold the image after `volumes_seq`, its last step end unless given)."""
        h = history or self.history
        copies = self.copy(f"undo{point}")
        frm = h.applied_seq if volumes_seq is None else volumes_seq
        try:
            h.undo(point, frm, lambda n, off, data: copies[n].write(off, data))
            return self.volume_image(copies)
        finally:
            for vol in copies.values():
                vol.close()
                os.unlink(vol.path)

    def window(self) -> list[int]:
        return [p for p in sorted(self.images) if p >= self.history.low_seq]

    def close(self) -> None:
        self.history.close()
        for vol in self.volumes.values():
            vol.close()


_op = st.tuples(st.sampled_from(NAMES),
                st.sampled_from([Kind.WRITE] * 5 + [Kind.ZERO] * 2 + [Kind.SKIP, Kind.MARKER]),
                st.integers(0, SIZE - 1), st.integers(0, 3000), st.booleans())
_ops = st.lists(_op, min_size=1, max_size=24)
_ends = st.lists(st.booleans(), min_size=1, max_size=8)


_PER_EXAMPLE = [HealthCheck.function_scoped_fixture]  # workdir() makes a directory each


@pytest.fixture
def workdir(tmp_path):
    """A directory per hypothesis example (tmp_path is one per test)."""
    made = []

    def make() -> str:
        made.append(tempfile.mkdtemp(dir=tmp_path))
        return made[-1]
    yield make
    for d in made:
        shutil.rmtree(d, ignore_errors=True)


def _same(got: dict[str, bytes], want: dict[str, bytes], what: str) -> None:
    for name in NAMES:
        if got[name] != want[name]:
            at = next(i for i, (x, y) in enumerate(zip(got[name], want[name])) if x != y)
            pytest.fail(f"{what}: volume {name} differs from byte {at} on")


def _check_window(r: Replica, history: History | None = None) -> None:
    for point in r.window():
        _same(r.undo_copy(point, history), r.images[point], f"undo to seq {point}")


def test_a_block_written_twice_in_one_step_goes_back_to_the_first_write(workdir):
    """Seq 1 is a consistent point inside the step 1..2: its image holds seq 1's write,
    which seq 2 overwrote in the same step."""
    r = Replica(workdir())
    recs = r.records([("a", Kind.WRITE, 100, 50, False), ("a", Kind.WRITE, 120, 50, False)])
    r.step(recs)
    assert r.volume_image() == r.images[2]
    _same(r.undo_copy(0), r.images[0], "undo to seq 0")
    _same(r.undo_copy(1), r.images[1], "undo to seq 1")
    r.close()


@settings(max_examples=60, deadline=None, suppress_health_check=_PER_EXAMPLE)
@given(ops=_ops, ends=_ends, file_bytes=st.sampled_from([64 << 20, 400, 4000]))
def test_undo_from_the_last_image_gives_every_consistent_seqs_image(workdir, ops, ends,
                                                                    file_bytes):
    r = Replica(workdir(), file_bytes=file_bytes)
    r.run(r.records(ops), ends)
    assert r.volume_image() == r.images[r.seq]
    assert r.history.applied_seq == r.seq and r.history.low_seq == 0
    _check_window(r)
    files = r.history.files()
    r.history.close()
    again = History(r.history.directory, images=True, file_bytes=file_bytes)
    assert again.open() == r.seq  # a restart finds the same window
    assert again.files() == files and again.low_time_ns == r.history.low_time_ns
    _check_window(r, again)
    again.close()
    r.close()


class _Crash(Exception):
    pass


@settings(max_examples=40, deadline=None, suppress_health_check=_PER_EXAMPLE)
@given(ops=_ops, ends=_ends, data=st.data())
def test_an_undo_redone_over_a_partly_undone_image_ends_the_same(workdir, ops, ends, data):
    """history.py's crash argument: an interrupted undo is simply done again."""
    r = Replica(workdir(), file_bytes=1000)
    r.run(r.records(ops), ends)
    point = data.draw(st.sampled_from(r.window()), label="point")
    crash_after = data.draw(st.integers(0, 30), label="writes before the crash")
    copies = r.copy("partly")
    done = []

    def write(name, offset, chunk):
        if len(done) == crash_after:
            raise _Crash
        done.append(1)
        copies[name].write(offset, chunk)
    try:
        r.history.undo(point, r.seq, write)
    except _Crash:
        pass
    r.history.undo(point, r.seq, lambda n, off, chunk: copies[n].write(off, chunk))
    _same(r.volume_image(copies), r.images[point], f"undo to seq {point} redone")
    r.close()


def _torn_setup(directory: str, new_file: bool) -> tuple[Replica, int, int, bytes, list]:
    """Steps applied, then one more saved whose volume writes a crash prevented: (the
    replica, the step before it, the last file's size before it, the last file's
    content, the step's records)."""
    r = Replica(directory)
    rng = random.Random(7)
    for _ in range(4):
        r.step(r.records([(rng.choice(NAMES), Kind.WRITE, rng.randrange(SIZE - 300),
                           rng.randrange(1, 300), False) for _ in range(3)]))
    if new_file:
        r.history.file_bytes = 1  # the step just saved closed its file
        r.step(r.records([("b", Kind.WRITE, 10, 20, False)]))
        r.history.file_bytes = 64 << 20
    prev = r.seq
    path = os.path.join(r.history.directory, sorted(os.listdir(r.history.directory))[-1])
    before = os.path.getsize(path)
    last = r.records([("a", Kind.WRITE, 5, 40, True), ("b", Kind.ZERO, 3, 17, False)])
    del r.images[r.seq]  # never applied: not a point the volumes can go back from
    r.seq = prev
    r.step(last, apply=False)
    r.history.close()
    with open(path, "rb") as f:
        content = f.read()
    assert len(content) > before
    return r, prev, before, content, last


def _reopen_to(r: Replica, path: str, prev: int, before: int) -> History:
    h = History(r.history.directory, images=True)
    assert h.open() == prev and h.applied_seq == prev
    assert os.path.getsize(path) == before  # the torn step is cut off for good
    return h


@pytest.mark.parametrize("new_file", [False, True], ids=["same-file", "first-of-a-file"])
def test_a_torn_last_step_reopens_to_the_step_before_it(workdir, new_file):
    r, prev, before, content, last = _torn_setup(workdir(), new_file)
    path = os.path.join(r.history.directory, sorted(os.listdir(r.history.directory))[-1])
    points = (0, prev - 2, prev)
    # Whole, the step is saved and its volume writes not begun (a rewind's copy taken
    # then): going back from the volumes' seq passes over its before-images.
    h = History(r.history.directory, images=True)
    assert h.open() == prev + len(last)
    for point in points:
        _same(r.undo_copy(point, h, volumes_seq=prev), r.images[point], f"undo to {point}")
    h.close()
    for cut in range(before, len(content)):
        with open(path, "wb") as f:
            f.write(content[:cut])
        h = _reopen_to(r, path, prev, before)
        for point in points:
            _same(r.undo_copy(point, h), r.images[point], f"cut at {cut}, undo to seq {point}")
        h.close()
    # The step is done again after the restart (its records are still journaled).
    with open(path, "wb") as f:
        f.write(content[:(before + len(content)) // 2])
    r.history = _reopen_to(r, path, prev, before)
    r.step(r.records([(rec.volume, rec.kind, rec.offset, rec.length, rec.flags)
                      for rec in last]))
    assert r.volume_image() == r.images[r.seq]
    _check_window(r)
    r.close()


@pytest.mark.parametrize("new_file", [False, True], ids=["same-file", "first-of-a-file"])
def test_a_flipped_bit_in_the_last_step_reopens_to_the_step_before_it(workdir, new_file):
    r, prev, before, content, _ = _torn_setup(workdir(), new_file)
    path = os.path.join(r.history.directory, sorted(os.listdir(r.history.directory))[-1])
    for at in range(before, len(content)):
        flipped = bytearray(content)
        flipped[at] ^= 1 << (at % 8)
        with open(path, "wb") as f:
            f.write(flipped)
        h = _reopen_to(r, path, prev, before)
        _same(r.undo_copy(prev - 1, h), r.images[prev - 1], f"bit flipped at {at}")
        h.close()
    r.close()


@settings(max_examples=40, deadline=None, suppress_health_check=_PER_EXAMPLE)
@given(ops=_ops, more=_ops, ends=_ends, data=st.data(),
       file_bytes=st.sampled_from([64 << 20, 500]))
def test_cut_after_a_rewind_then_new_steps_keep_the_window_exact(workdir, ops, more, ends,
                                                                 data, file_bytes):
    """promote --at: the volumes go back to a point, the before-images after it are cut,
    and the records applied from there on (other records with the same seqs) are saved
    anew."""
    r = Replica(workdir(), file_bytes=file_bytes)
    r.run(r.records(ops), ends)
    point = data.draw(st.sampled_from(r.window()), label="point")
    r.history.undo(point, r.seq, lambda n, off, chunk: r.volumes[n].write(off, chunk))
    r.history.cut_after(point, T0 + point * 1000)
    assert r.history.applied_seq == point
    for seq in [s for s in r.images if s > point]:
        del r.images[seq]
    r.seq, r.model = point, {n: bytearray(img) for n, img in r.images[point].items()}
    assert r.volume_image() == r.images[point]
    r.run(r.records(more), ends)
    assert r.history.applied_seq == r.seq and r.volume_image() == r.images[r.seq]
    _check_window(r)
    r.history.close()
    again = History(r.history.directory, images=True, file_bytes=file_bytes)
    assert again.open() == r.seq
    _check_window(r, again)
    again.close()
    r.close()


def test_cut_after_before_the_window_starts_a_new_one_there(workdir):
    r = Replica(workdir(), file_bytes=300)
    for _ in range(6):
        r.step(r.records([("a", Kind.WRITE, 0, 200, False)]))
    while r.history.drop_oldest():
        pass
    low = r.history.low_seq
    assert low > 2
    r.history.cut_after(1, T0 + 1000)
    assert (r.history.low_seq, r.history.applied_seq, len(r.history.files())) == (1, 1, 1)
    with pytest.raises(HistoryError, match="seq 0 is before the window"):
        r.history.undo(0, 1, lambda *a: None)
    r.close()


def test_drop_oldest_moves_the_window_start_and_waits_while_pinned(workdir):
    r = Replica(workdir(), file_bytes=600)
    for i in range(12):
        r.step(r.records([("a", Kind.WRITE, i * 100, 300, False),
                          ("b", Kind.ZERO, i * 50, 100, False)]))
    h = r.history
    assert len(h.files()) > 3
    while len(h.files()) > 1:
        old_low, files = h.low_seq, h.files()
        h.pin()
        assert not h.drop_oldest() and h.files() == files and h.low_seq == old_low
        h.unpin()
        assert h.drop_oldest()
        assert h.low_seq == files[0][0]  # the dropped file's last step end
        assert h.files() == files[1:] and len(os.listdir(h.directory)) == len(files) - 1
        with pytest.raises(HistoryError, match=f"seq {old_low} is before the window"):
            r.undo_copy(old_low)
        _check_window(r)
    assert not h.drop_oldest()  # never the file appended to
    r.step(r.records([("a", Kind.WRITE, 7, 9, False)]))
    _check_window(r)
    r.close()


def test_a_file_is_closed_at_the_first_step_end_past_its_size(workdir):
    r = Replica(workdir(), file_bytes=1000)
    rng = random.Random(3)
    for _ in range(30):
        n = len(r.history.files())
        r.step(r.records([("a", Kind.WRITE, rng.randrange(SIZE - 200), rng.randrange(1, 200),
                           False) for _ in range(rng.randrange(1, 4))]))
        files = r.history.files()
        closed = len(files) > n
        assert closed == (files[n - 1][2] >= 1000)
        assert all(size >= 1000 for _, _, size in files[:-1])
    names = sorted(os.listdir(r.history.directory))
    firsts = [int(n[:-5]) for n in names]
    assert firsts[0] == 1 and firsts[1:] == [last + 1 for last, _, _ in r.history.files()[:-1]]
    _check_window(r)
    r.close()


def test_a_file_is_closed_at_the_first_step_end_past_its_time_span(workdir):
    r = Replica(workdir(), file_seconds=1e-5)  # 10 us: 10 seqs of the records' clock
    began = T0  # the first step end's time in the file appended to (start_at's)
    for _ in range(40):
        n = len(r.history.files())
        r.step(r.records([("b", Kind.WRITE, r.seq, 8, False)]))
        now = T0 + r.seq * 1000
        closed = len(r.history.files()) > n
        assert closed == (now - began >= 10_000), f"seq {r.seq}"
        began = now if closed else began  # a new file starts at the step end before it
    assert len(r.history.files()) > 3
    _check_window(r)
    r.close()


def test_a_restart_finds_the_window_start_time_it_had(workdir):
    """low_time_ns (the window's start time where the journal no longer has it) and the
    time a file's span counts from are the same after the history is reopened."""
    r = Replica(workdir(), file_bytes=600)
    for i in range(12):
        r.step(r.records([("a", Kind.WRITE, i * 100, 300, False),
                          ("b", Kind.ZERO, i * 50, 100, False)]))
    while r.history.drop_oldest():
        again = History(r.history.directory, images=True, file_bytes=600)
        again.open()
        assert (again.low_seq, again.low_time_ns) == (r.history.low_seq, r.history.low_time_ns)
        again.close()
    r.close()
