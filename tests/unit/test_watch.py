"""Watch capture's change finding: extent-map diffs of real reflink clones on
loop-mounted XFS (reflink=1) and btrfs, block hash diffs, and the range logic under
hypothesis."""

import fcntl
import os
import random
import shutil

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from replicator import fallocate as falloc
from replicator.capture import watch
from replicator.capture.watch import Extent
from replicator.volume import Volume
from tests.agents import loop_fs

BLOCK = 4096


@pytest.fixture(scope="session", params=["xfs", "btrfs"])
def reflink_fs(request, tmp_path_factory):
    """A mounted file system with reflinks (XFS with reflink=1, btrfs) in a loop image,
    for the whole session."""
    missing = [t for t in (f"mkfs.{request.param}", "losetup", "mount")
               if shutil.which(t) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} for a loop-mounted {request.param}")
    with loop_fs(tmp_path_factory.mktemp(request.param) / "mnt", request.param) as mnt:
        yield mnt


def clone(src_fd: int, path: str) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    fcntl.ioctl(fd, watch.FICLONE, src_fd)
    return fd


def covered(ranges) -> set[int]:
    return {b for off, n, _ in ranges for b in range(off // BLOCK, -(-(off + n) // BLOCK))}


def test_extent_diff_is_exact(reflink_fs):
    rng = random.Random(16)
    path = os.path.join(reflink_fs, "disk.img")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    os.pwrite(fd, rng.randbytes(16 << 20), 0)
    os.ftruncate(fd, 32 << 20)  # a sparse second half
    prev = clone(fd, path + ".prev")
    written = set(rng.sample(range((32 << 20) // BLOCK), 300))
    for b in written:
        os.pwrite(fd, rng.randbytes(BLOCK), b * BLOCK)
    falloc.fallocate(fd, falloc.PUNCH_HOLE | falloc.KEEP_SIZE, 1 << 20, 64 << 10, path)
    new = clone(fd, path + ".new")
    ranges = watch.changed_extents(watch.fiemap(prev), os.fstat(prev).st_size,
                                   watch.fiemap(new), os.fstat(new).st_size)
    punched = set(range((1 << 20) // BLOCK, ((1 << 20) + (64 << 10)) // BLOCK))
    assert covered(ranges) == written | punched  # no block missed, none sent for nothing
    for off, n, data in ranges:
        assert data == (not set(range(off // BLOCK, (off + n) // BLOCK)) <= punched - written)
    # an unchanged file: nothing
    again = clone(fd, path + ".again")
    assert watch.changed_extents(watch.fiemap(new), os.fstat(new).st_size,
                                 watch.fiemap(again), os.fstat(again).st_size) == []
    for f in (fd, prev, new, again):
        os.close(f)
    for suffix in ("", ".prev", ".new", ".again"):
        os.unlink(path + suffix)


def test_extent_diff_sees_a_shrunk_and_a_grown_file(reflink_fs):
    path = os.path.join(reflink_fs, "grow.img")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    os.pwrite(fd, b"\x7f" * (1 << 20), 0)
    prev = clone(fd, path + ".prev")
    os.ftruncate(fd, 300000)  # mid-block: the tail of block 73 reads zeroes now
    new = clone(fd, path + ".new")
    ranges = watch.changed_extents(watch.fiemap(prev), 1 << 20, watch.fiemap(new), 300000)
    assert [(o, n) for o, n, data in ranges if not data][-1][0] + \
        [(o, n) for o, n, data in ranges if not data][-1][1] == 1 << 20
    assert not any(data and o + n <= 300000 - 300000 % BLOCK for o, n, data in ranges)
    # zeroes past the shrunk file's end: every byte of [300000, 1 MiB) is covered
    assert all(any(o <= b < o + n for o, n, _ in ranges) for b in range(300000, 1 << 20, 997))
    for f in (fd, prev, new):
        os.close(f)
    for suffix in ("", ".prev", ".new"):
        os.unlink(path + suffix)


def test_hash_diff_on_real_files(reflink_fs):
    rng = random.Random(7)
    path = os.path.join(reflink_fs, "hashed.img")
    size = 8 << 20
    with open(path, "wb") as f:
        f.write(rng.randbytes(size - 12345))  # shorter than the volume: zeroes past it
    fd = os.open(path, os.O_RDWR)
    before = watch.file_hashes(fd, size)
    assert len(before) == size // watch.HASH_BLOCK * 16
    blocks = sorted(rng.sample(range(size // watch.HASH_BLOCK), 9))
    for b in blocks:
        os.pwrite(fd, b"\x01", b * watch.HASH_BLOCK + rng.randrange(watch.HASH_BLOCK))
    after = watch.file_hashes(fd, size)
    ranges = watch.changed_blocks(before, after, watch.HASH_BLOCK, size)
    assert sorted(b for o, n, _ in ranges
                  for b in range(o // watch.HASH_BLOCK, (o + n) // watch.HASH_BLOCK)) == blocks
    assert all(data for *_, data in ranges)
    os.close(fd)
    os.unlink(path)


def test_a_watched_volume_is_never_created_and_reads_zeroes_past_its_image(tmp_path):
    primary = True
    vol = Volume("w", str(tmp_path / "missing.img"), 1 << 20)
    vol.watched = lambda: primary
    vol.open()
    assert not os.path.exists(vol.path)
    assert vol.read(4096, 100) == bytes(100)
    image = tmp_path / "image"
    image.write_bytes(b"abc")
    fd = os.open(image, os.O_RDONLY)
    vol.view(fd)
    assert vol.read(1, 5) == b"bc\0\0\0"
    with vol.mapped(0, 8) as view:
        assert bytes(view) == b"abc" + bytes(5)
    vol.sync()  # nothing of its own to sync
    with pytest.raises(OSError):
        vol.write(0, b"x")  # never its file to write
    assert not os.path.exists(vol.path)
    primary = False  # demoted: a replica's volume from its first use on
    vol.view(None)
    assert vol.read(0, 4) == bytes(4) and os.path.getsize(vol.path) == 1 << 20
    vol.write(0, b"x")
    vol.close()
    os.close(fd)


# ---- the range logic, against a block-by-block model ---------------------------------
# A map is one entry per block: None (hole), "u" (unwritten), "o" (opaque address) or
# a physical block number.
block_maps = st.lists(st.one_of(st.none(), st.just("u"), st.just("o"), st.integers(0, 40)),
                      max_size=40)


def extents_of(blocks) -> list[Extent]:
    """The map as FIEMAP would give it: runs of contiguous blocks merged."""
    out = []
    for i, b in enumerate(blocks):
        if b is None:
            continue
        flags = {"u": watch.FIEMAP_EXTENT_UNWRITTEN, "o": 0x8}.get(b, 0)
        phys = 1000 * BLOCK if isinstance(b, str) else b * BLOCK
        last = out[-1] if out else None
        if last and last.logical + last.length == i * BLOCK and last.flags == flags and \
                last.physical + last.length == phys and not flags:
            out[-1] = last._replace(length=last.length + BLOCK)
        else:
            out.append(Extent(i * BLOCK, phys, BLOCK, flags))
    return out


def reads(blocks, i):
    b = blocks[i] if i < len(blocks) else None
    return None if b in (None, "u") else b


@settings(max_examples=300, deadline=None)
@given(block_maps, block_maps)
def test_changed_extents_matches_the_block_model(old, new):
    ranges = watch.changed_extents(extents_of(old), len(old) * BLOCK,
                                   extents_of(new), len(new) * BLOCK)
    expect = {i for i in range(max(len(old), len(new)))
              if reads(old, i) != reads(new, i) or "o" in (reads(old, i), reads(new, i))}
    expect -= {i for i in expect if reads(old, i) is None and reads(new, i) is None}
    assert covered(ranges) == expect
    for off, n, data in ranges:
        assert off % BLOCK == 0 and n % BLOCK == 0 and n > 0
        assert all((reads(new, i) is not None) == data
                   for i in range(off // BLOCK, (off + n) // BLOCK))
    for (o1, n1, d1), (o2, _, d2) in zip(ranges, ranges[1:]):
        assert o1 + n1 < o2 or o1 + n1 == o2 and d1 != d2  # sorted, merged


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5 << 20), st.integers(1, 5 << 20), st.booleans()),
                max_size=8),
       st.integers(4096, 3 << 20))
def test_pieces_and_parts_cover_ranges_within_bounds(ranges, most):
    ranges = sorted(ranges)
    cut = list(watch.pieces(ranges, most))
    assert sum(n for _, n, _ in cut) == sum(n for _, n, _ in ranges)
    assert all(n <= (most if data else watch.ZERO_BYTES) for _, n, data in cut)
    records = [("f", o, n, d) for o, n, d in cut]
    grouped = watch.parts(records, most=4 * most)
    assert [r for part in grouped for r in part] == records
    assert all(part for part in grouped)
    assert all(sum(r[2] for r in part if r[3]) <= 4 * most for part in grouped)


def test_changed_blocks_merges_neighbours():
    h = lambda *ids: b"".join(bytes([i]) * 16 for i in ids)  # noqa: E731
    assert watch.changed_blocks(h(1, 2, 3, 4, 5), h(1, 9, 9, 4, 9), 10, 45) == \
        [(10, 20, True), (40, 5, True)]
