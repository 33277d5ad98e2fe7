"""The crash-simulating file layer itself (tests/crashsim.py): synced data always
survives a power loss, unsynced data sometimes does and sometimes does not, a name is
durable only once its directory is fsync'd, and the layer sees every change."""

import os
import random

import pytest
from hypothesis import given, settings, strategies as st

from replicator import fallocate as falloc
from replicator import statefile
from tests.crashsim import CrashSim, CrashSimError, Sparse, run_and_crash


def _create(path, data=b""):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    if data:
        os.pwrite(fd, data, 0)
    return fd


def _images(sim, seeds=range(200), point=None, **kw):
    rec = sim.recording
    point = len(rec) if point is None else point
    return [rec.crash(point, random.Random(s), **kw) for s in seeds]


def test_synced_data_always_survives_and_unsynced_data_sometimes(tmp_path):
    with CrashSim(tmp_path) as sim:
        fd = _create(tmp_path / "f")
        statefile.fsync_dir(str(tmp_path))  # the name is durable
        os.pwrite(fd, b"A" * 1000, 0)
        os.fdatasync(fd)
        os.pwrite(fd, b"B" * 1000, 1000)  # never synced
        os.close(fd)
    seen = set()
    for img in _images(sim):
        data = img.data("f")
        assert data[:1000] == b"A" * 1000
        tail = data[1000:]
        assert set(tail) <= {0, ord("B")} and len(tail) <= 1000
        seen.add("all" if tail == b"B" * 1000 else "none" if not tail else "torn")
    assert seen == {"all", "none", "torn"}


def test_writes_persist_whole_when_not_torn(tmp_path):
    with CrashSim(tmp_path) as sim:
        fd = _create(tmp_path / "f")
        statefile.fsync_dir(str(tmp_path))
        os.fsync(fd)
        os.write(fd, b"x" * 3000)
        os.write(fd, b"y" * 3000)
        os.close(fd)
    got = {img.data("f") for img in _images(sim, block=0)}
    assert got == {b"", b"x" * 3000, bytes(3000) + b"y" * 3000, b"x" * 3000 + b"y" * 3000}


def test_a_sync_that_had_not_returned_guarantees_nothing(tmp_path):
    with CrashSim(tmp_path) as sim:
        fd = _create(tmp_path / "f")
        statefile.fsync_dir(str(tmp_path))
        os.pwrite(fd, b"data", 0)
        os.fdatasync(fd)
        os.close(fd)
    rec = sim.recording
    start = next(i for i in range(1, len(rec) + 1) if rec.call_at(i)[0] == "sync_start")
    assert {img.data("f") for img in _images(sim, point=start)} == {b"", b"data"}
    assert {img.data("f") for img in _images(sim, point=start + 1)} == {b"data"}


def test_a_new_name_is_durable_only_once_its_directory_is_fsynced(tmp_path):
    with CrashSim(tmp_path) as sim:
        fd = _create(tmp_path / "new", b"content")
        os.fsync(fd)  # the content, not the name
        os.close(fd)
    assert {"new" in img.files for img in _images(sim)} == {True, False}
    for img in _images(sim):
        if "new" in img.files:
            assert img.data("new") == b"content"


@pytest.mark.parametrize("namespace", ["prefix", "subset"])
def test_a_rename_without_a_directory_fsync_can_be_lost(tmp_path, namespace):
    with CrashSim(tmp_path) as sim:
        for name, data in (("cur", b"old"), ("tmp", b"new")):
            fd = _create(tmp_path / name, data)
            os.fsync(fd)
            os.close(fd)
        statefile.fsync_dir(str(tmp_path))
        os.replace(tmp_path / "tmp", tmp_path / "cur")
    got = {(img.data("cur"), "tmp" in img.files) for img in _images(sim, namespace=namespace)}
    assert got == {(b"old", True), (b"new", False)}  # atomic: never both or neither


def test_a_rename_followed_by_a_directory_fsync_survives(tmp_path):
    with CrashSim(tmp_path) as sim:
        fd = _create(tmp_path / "tmp", b"new")
        os.fsync(fd)
        os.close(fd)
        os.replace(tmp_path / "tmp", tmp_path / "cur")
        statefile.fsync_dir(str(tmp_path))
    for img in _images(sim):
        assert set(img.files) == {"cur"} and img.data("cur") == b"new"


def test_rename_of_unsynced_content_can_leave_an_empty_or_torn_file(tmp_path):
    """The classic mistake (write, rename, no fsync of the data) is caught: the name
    survives, the content need not."""
    with CrashSim(tmp_path) as sim:
        fd = _create(tmp_path / "tmp", b"n" * 2000)
        os.close(fd)
        os.replace(tmp_path / "tmp", tmp_path / "cur")
        statefile.fsync_dir(str(tmp_path))
    got = {img.data("cur") for img in _images(sim)}
    assert b"n" * 2000 in got and b"" in got
    assert any(0 < len(d) and d != b"n" * 2000 for d in got)  # torn


def test_unlink_without_directory_fsync_can_come_back(tmp_path):
    (tmp_path / "gone").write_bytes(b"before")  # exists before the layer: durable
    with CrashSim(tmp_path) as sim:
        os.unlink(tmp_path / "gone")
    assert {"gone" in img.files for img in _images(sim)} == {True, False}


def test_truncate_fallocate_and_builtin_open_descriptors_are_seen(tmp_path):
    """The journal's recovery cuts a segment through a builtin file object's fileno;
    volumes punch holes with fallocate: all of it is recorded and verify agrees."""
    with CrashSim(tmp_path) as sim:
        fd = _create(tmp_path / "v", b"\xff" * 20000)
        os.posix_fallocate(fd, 0, 40000)
        try:
            falloc.fallocate(fd, falloc.PUNCH_HOLE | falloc.KEEP_SIZE, 4096, 8192)
        except OSError:
            pass  # a file system without holes: the zeroing is still recorded as absent
        os.fdatasync(fd)
        os.close(fd)
        with open(tmp_path / "v", "r+b") as f:
            os.ftruncate(f.fileno(), 10000)
            os.fsync(f.fileno())
        statefile.fsync_dir(str(tmp_path))
    sim.recording.verify()
    for img in _images(sim, seeds=range(20)):
        assert img.data("v") == (tmp_path / "v").read_bytes()


def test_verify_catches_a_write_around_the_layer(tmp_path):
    with CrashSim(tmp_path) as sim:
        fd = _create(tmp_path / "f", b"seen")
        os.close(fd)
        with open(tmp_path / "f", "r+b") as f:  # FileIO.write does not go through os
            f.write(b"SEEN")
    with pytest.raises(CrashSimError, match="did not see"):
        sim.recording.verify()


def test_files_outside_the_root_are_left_alone(tmp_path):
    (tmp_path / "root").mkdir()
    with CrashSim(tmp_path / "root") as sim:
        fd = _create(tmp_path / "outside", b"x")
        os.fsync(fd)
        os.close(fd)
    assert len(sim.recording) == 0
    assert (tmp_path / "outside").read_bytes() == b"x"


def test_the_os_functions_are_restored(tmp_path):
    real = os.pwrite, os.fdatasync, falloc.fallocate
    with CrashSim(tmp_path):
        assert os.pwrite is not real[0]
    assert (os.pwrite, os.fdatasync, falloc.fallocate) == real


def test_run_and_crash_materializes_in_place_with_marks(tmp_path):
    def workload(sim):
        fd = _create(tmp_path / "log")
        statefile.fsync_dir(str(tmp_path))
        for i in range(10):
            os.write(fd, b"%d\n" % i)
            os.fdatasync(fd)
            sim.mark("synced", i)
        os.close(fd)

    for seed in range(30):
        img = run_and_crash(workload, str(tmp_path), seed=seed)
        last = img.last_mark("synced", -1)
        lines = (tmp_path / "log").read_bytes().split(b"\n") if "log" in img.files else [b""]
        assert [int(x) for x in lines if x][:last + 1] == list(range(last + 1))


@settings(max_examples=60, deadline=None)
@given(ops=st.lists(st.tuples(st.sampled_from(["write", "sync", "truncate"]),
                              st.integers(0, 9000), st.binary(min_size=1, max_size=3000)),
                    max_size=12),
       seed=st.integers(0, 2 ** 32 - 1))
def test_an_image_is_the_synced_content_plus_some_later_writes(tmp_path_factory, ops, seed):
    """Property: at any crash point, every byte of the file is the value some write
    put there at or after the last sync (or the synced value), never anything else; and
    at the end of the run, persisting everything gives the real file."""
    root = tmp_path_factory.mktemp("prop")
    with CrashSim(root) as sim:
        fd = _create(root / "f")
        statefile.fsync_dir(str(root))
        for op, offset, data in ops:
            if op == "write":
                os.pwrite(fd, data, offset)
            elif op == "sync":
                os.fdatasync(fd)
            else:
                os.ftruncate(fd, offset)
        os.close(fd)
    rec = sim.recording
    rec.verify()
    assert rec.crash(len(rec), random.Random(seed), persist=1.0).data("f") == \
        (root / "f").read_bytes()
    # Replay by hand: the content at the last sync and every value written after it.
    named = 3  # create, the directory's fsync start and end: from here on "f" exists
    assert [rec.call_at(i)[0] for i in (1, 2, 3)] == ["create", "dirsync_start", "sync_end"]
    for point in range(named, len(rec) + 1):
        img = rec.crash(point, random.Random(seed + point))
        synced, after = Sparse(), []
        calls = [rec.call_at(i) for i in range(named + 1, point + 1)]
        for ev in [c for c in calls if c[0] != "sync_start"]:
            if ev[0] == "write":
                after.append(ev)
            elif ev[0] == "truncate":
                after.append(ev)
            elif ev[0] == "sync_end":
                for w in after:
                    if w[0] == "write":
                        synced.write(w[2], w[3])
                    else:
                        synced.truncate(w[2])
                after = []
        got = img.data("f")
        want = synced.bytes()
        if not any(w[0] == "truncate" for w in after):
            assert len(got) >= len(want)  # only a truncate shrinks a file
        for i, b in enumerate(got):
            candidates = {want[i] if i < len(want) else 0, 0}
            candidates |= {w[3][i - w[2]] for w in after
                           if w[0] == "write" and w[2] <= i < w[2] + len(w[3])}
            assert b in candidates, (point, i)
