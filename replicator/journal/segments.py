"""The group journal: an append-only run of records in segment files.

Files under the journal directory:
    <first_seq:020d>.seg   records, contiguous in seq, the next file starts at last+1
    base                   "<seq> <hcrc>": the position just before the oldest kept
                           record (what was trimmed away), written before any trim
                           (replaced in place: statefile.py)
    reserve                blocks held for the segments to come (space.py)

Only the group's write path appends, whole batches at a time, on the event loop; the
in-memory index (per segment: first seq, record offsets and header CRCs) is updated
when the batch is durable, so readers only ever see durable records. The group makes a
segment durable to its end before it writes the next one, so only the last segment can
hold records a power loss tore.

Recovery (`open`) scans every segment and ends the log at the first sign of a power
loss, cutting the segment there and removing every later one; anything else that does
not decode, or a seq that does not follow its predecessor, raises
JournalCorruptError(path, offset). The argument:
  - What is durable in a segment is a prefix of it: records are only appended, an
    fdatasync covers everything written to the file before it, and a cut only removes
    a failed batch from the end. Past that prefix a power loss may leave any subset of
    the later writes, torn at sector boundaries, in any order (tests/crashsim.py).
  - So the first record that a power loss could have damaged ends the log, and nothing
    after it was durable in order: its segment's later bytes, and the later segments
    (a batch in a later segment completed after this one, never before).
  - A power loss leaves a record short (the file ends inside it) or with sectors that
    read as zeroes (a segment is a new file whose blocks past its end are allocated
    unwritten, or were freed by a cut: a sector that never reached the disk reads as
    zeroes), or removes a segment's whole unsynced tail, so the next segment starts
    past the seq its predecessor ends at. Those end the log (logged as a warning).
  - A flipped bit leaves no zeroed sector: a record that fails its checks with every
    sector holding data is corruption. (A record whose payload really is a zeroed sector
    and that is also damaged ends the log instead of raising: the one case confused.)
    Segments reused in place would break the zero rule (an unwritten sector would hold
    an earlier lap's bytes) unless zeroed first; measured here, that costs more than it
    saves (BENCHMARKS.md, "Journal segments reused in place").
"""

from __future__ import annotations

import logging
import os
from array import array
from bisect import bisect_right
from dataclasses import dataclass, field

from .. import statefile
from .record import HEADER, HEADER_SIZE, RecordError, decode, iterate, trusted_extent
from .space import JournalError, Space

log = logging.getLogger(__name__)
SECTOR = 512  # the smallest unit a disk writes whole
CHUNK = 8 << 20  # bytes a reader of many records takes per read
_ZERO_SECTOR = bytes(SECTOR)


class JournalCorruptError(JournalError):
    def __init__(self, path: str, offset: int, reason: str):
        super().__init__(f"journal corrupt in {path} at offset {offset}: {reason}")
        self.path = path
        self.offset = offset
        self.reason = reason


class Appended:
    """A batch written by Journal.append, not committed yet: what sync and commit need
    (the writer holds it without looking inside)."""
    __slots__ = ("seg", "fd", "sizes", "hcrcs")

    def __init__(self, seg, fd: int, sizes: list[int], hcrcs: list[int]):
        self.seg, self.fd, self.sizes, self.hcrcs = seg, fd, sizes, hcrcs


@dataclass(frozen=True, slots=True)
class Position:
    """Where a log stands: the last seq and the header CRC of that record. Two logs
    at the same seq with different CRCs have diverged."""
    seq: int
    hcrc: int


@dataclass(eq=False)
class _Segment:
    path: str
    first_seq: int
    offsets: array = field(default_factory=lambda: array("Q"))
    hcrcs: array = field(default_factory=lambda: array("I"))
    size: int = 0  # end of the durable, indexed records
    tail: int = 0  # end of what batches in flight have reserved (>= size)

    @property
    def last_seq(self) -> int:
        return self.first_seq + len(self.offsets) - 1

    def end_of(self, seq: int) -> int:
        i = seq - self.first_seq + 1
        return self.offsets[i] if i < len(self.offsets) else self.size


class Journal:
    def __init__(self, directory: str, *, capacity: int, segment_size: int | None = None):
        self.directory = directory
        self.capacity = capacity
        self.segment_size = segment_size or max(1 << 20, min(64 << 20, capacity // 8))
        self._segments: list[_Segment] = []
        self._firsts: list[int] = []
        self._fds: dict[str, int] = {}  # append descriptors
        self._rfds: dict[str, int] = {}  # read descriptors (shippers, status), kept open
        self.base = Position(0, 0)
        self.space = Space(directory, reservation=self.reservation,
                           segment_size=self.segment_size, segments=lambda: len(self._segments))

    @property
    def reservation(self) -> int:
        """Bytes the journal keeps allocated: capacity plus two segments."""
        return self.capacity + 2 * self.segment_size

    # ---- recovery -------------------------------------------------------------------
    def open(self) -> None:
        os.makedirs(self.directory, exist_ok=True)
        base_path = os.path.join(self.directory, "base")
        if os.path.exists(base_path):
            with open(base_path, "rb") as f:
                raw = f.read()
            try:  # "<seq> <hcrc>" padded with spaces (statefile.replace)
                seq, hcrc = (int(field) for field in raw.decode("ascii").split())
                if seq < 0 or not 0 <= hcrc < 1 << 32:
                    raise ValueError("out of range")
            except ValueError:  # (UnicodeDecodeError is one)
                raise JournalCorruptError(base_path, 0, f"base is not '<seq> <hcrc>': "
                                                        f"{raw[:64]!r}") from None
            self.base = Position(seq, hcrc)
        else:  # now, while there is room: a trim on a full disk only rewrites it
            self._write_base(self.base)
        names = sorted(n for n in os.listdir(self.directory) if n.endswith(".seg"))
        expected = self.base.seq + 1
        end, dropped = None, []  # where a power loss ended the log; segments past it
        for name in names:
            path = os.path.join(self.directory, name)
            first = int(name[:-4])
            if end is not None:
                os.unlink(path)
                dropped.append(name)
                continue
            if first < expected and not self._segments:
                # Left over by a trim interrupted after `base` was written.
                os.unlink(path)
                continue
            if first > expected and self._segments:  # the previous one's tail was lost
                end = f"{name} starts at seq {first}, the log before it ends at {expected - 1}"
                os.unlink(path)
                dropped.append(name)
                continue
            if first != expected:
                raise JournalCorruptError(path, 0, f"segment starts at seq {first}, "
                                                   f"expected {expected}")
            seg, end = self._scan(path, first)
            self._add(seg)
            expected = seg.last_seq + 1
        if dropped:
            statefile.fsync_dir(self.directory)
        if end is not None:
            log.warning("journal %s: the log ends at seq %d (%s): what followed never "
                        "became durable (a power loss)%s", self.directory, expected - 1, end,
                        f"; removed the later segments {dropped}" if dropped else "")
        self.space.open([seg.path for seg in self._segments])

    def _scan(self, path: str, first: int) -> tuple[_Segment, str | None]:
        """Index a segment's records; cut it where a power loss ended it (and say
        where, else None). See the module docstring."""
        seg = _Segment(path, first)
        with open(path, "rb") as f:
            data = f.read()
        pos, seq, end = 0, first, None
        while pos < len(data):
            try:
                rec = decode(data, pos)
            except RecordError as exc:
                if exc.torn or _unwritten_sector(data, pos):
                    end = f"{os.path.basename(path)} at offset {pos}: {exc}"
                    break
                raise JournalCorruptError(path, pos, str(exc)) from None
            if rec.seq != seq:
                raise JournalCorruptError(path, pos, f"seq {rec.seq} where {seq} expected")
            seg.offsets.append(pos)
            seg.hcrcs.append(rec.hcrc)
            pos += rec.size
            seq += 1
        if pos < len(data):
            with open(path, "r+b") as f:
                self.space.cut(f.fileno(), path, pos)
                os.fsync(f.fileno())
        seg.size = seg.tail = pos
        return seg, end

    def _add(self, seg: _Segment) -> None:
        self._segments.append(seg)
        self._firsts.append(seg.first_seq)

    # ---- positions ------------------------------------------------------------------
    @property
    def first_seq(self) -> int:
        """Oldest seq still held (last_seq + 1 when empty)."""
        return self.base.seq + 1

    @property
    def last_seq(self) -> int:
        for seg in reversed(self._segments):
            if seg.offsets:
                return seg.last_seq
        return self.base.seq

    @property
    def used_bytes(self) -> int:
        return sum(s.size for s in self._segments)

    def position(self, seq: int | None = None) -> Position | None:
        """The position at `seq` (default: the last record), None if no longer held."""
        seq = self.last_seq if seq is None else seq
        if seq == self.base.seq:
            return self.base
        seg = self._segment_of(seq)
        if seg is None:
            return None
        return Position(seq, seg.hcrcs[seq - seg.first_seq])

    def _segment_of(self, seq: int) -> _Segment | None:
        if not self.first_seq <= seq <= self.last_seq:
            return None
        return self._segments[bisect_right(self._firsts, seq) - 1]

    def bytes_between(self, after_seq: int, through_seq: int) -> int:
        """Encoded bytes of the records (after_seq, through_seq]."""
        total = 0
        seq = max(after_seq + 1, self.first_seq)
        while seq <= through_seq:
            seg = self._segment_of(seq)
            if seg is None:
                break
            last = min(through_seq, seg.last_seq)
            total += seg.end_of(last) - seg.offsets[seq - seg.first_seq]
            seq = last + 1
        return total

    def oldest_segment_last_seq(self) -> int | None:
        """Last seq of the oldest segment, if it is not the one being appended to (a
        trim through it frees a segment)."""
        return self._segments[0].last_seq if len(self._segments) > 1 else None

    def has_room(self, nbytes: int) -> bool:
        """reserve(nbytes) would be served from the reserved space. A batch larger
        than a segment never is (it takes fresh space): True, nothing to wait for."""
        seg = self._segments[-1] if self._segments else None
        if nbytes > self.segment_size or seg is not None and (
                seg.tail == 0 or seg.tail + nbytes <= self.segment_size):
            return True
        return self.space.has_room()

    # ---- appending (loop) --------------------------------------------------------------
    def starts_segment(self, nbytes: int) -> bool:
        """A batch of `nbytes` would start a new segment (the writer makes everything
        before it durable first, so only the last segment can be torn)."""
        seg = self._segments[-1] if self._segments else None
        return seg is None or bool(seg.tail and seg.tail + nbytes > self.segment_size)

    def append(self, first_seq: int, buffers: list, sizes: list[int],
               hcrcs: list[int]) -> Appended:
        """Loop: write a batch of records (seq first_seq..., their `sizes` and header
        CRCs) into the page cache with one writev (IOV_MAX permitting), starting a new
        segment when the current one is full. Several batches may be appended before the
        first is committed; they are written in order. Readers see a batch only once it
        is committed (after sync). On failure (OSError, ENOSPC say) the batch is cut off
        again, durably (a power loss must not bring its records back under the seqs the
        next batch reuses), and nothing of it stays."""
        nbytes = sum(sizes)
        seg, fd, at = self._place(first_seq, nbytes)
        try:
            for i in range(0, len(buffers), 1024):  # IOV_MAX
                chunk = buffers[i:i + 1024]
                n = os.writev(fd, chunk)
                rest = sum(len(b) for b in chunk) - n
                if rest:  # short write: the next one reports the real error (ENOSPC)
                    tail = b"".join(bytes(b) for b in chunk)[n:]
                    while tail:
                        tail = tail[os.write(fd, tail):]
        except BaseException:
            self.space.cut(fd, seg.path, at)
            seg.tail = at
            try:
                os.fdatasync(fd)
            except OSError as exc:
                log.error("journal %s: cannot make the cut after a failed batch durable "
                          "(%s): a power loss before the next fdatasync may leave its "
                          "records in the journal", self.directory, exc)
            raise
        return Appended(seg, fd, sizes, hcrcs)

    def sync(self, batches: list[Appended], fdatasync, done) -> None:
        """Make `batches` durable: `fdatasync(fd, callback)` (the Flusher's) for each
        segment they went to; done(err) once every one ended (err: the first failure)."""
        fds = list(dict.fromkeys(b.fd for b in batches))  # one segment, two at most
        state = {"left": len(fds), "err": 0}

        def ended(err: int) -> None:
            state["left"] -= 1
            state["err"] = state["err"] or err
            if not state["left"]:
                done(state["err"])
        for fd in fds:
            fdatasync(fd, ended)

    def commit(self, batch: Appended) -> None:
        """Loop: index a batch that sync made durable (batches in seq order)."""
        seg = batch.seg
        pos = seg.size
        for size in batch.sizes:
            seg.offsets.append(pos)
            pos += size
        seg.hcrcs.extend(batch.hcrcs)
        seg.size = pos

    def _place(self, first_seq: int, nbytes: int) -> tuple[_Segment, int, int]:
        """Where a batch of `nbytes` goes: (segment, fd, offset)."""
        seg = self._segments[-1] if self._segments else None
        if self.starts_segment(nbytes):
            path = os.path.join(self.directory, f"{first_seq:020d}.seg")
            self._fds[path] = self.space.new_segment(path)
            self._add(_Segment(path, first_seq))
            seg = self._segments[-1]
        if seg.path not in self._fds:
            self._fds[seg.path] = os.open(seg.path, os.O_WRONLY | os.O_APPEND)
        at = seg.tail
        seg.tail += nbytes
        return seg, self._fds[seg.path], at

    # ---- reading ---------------------------------------------------------------------
    def read(self, from_seq: int, max_bytes: int,
             through: int | None = None) -> tuple[int, int, bytes]:
        """Durable records from `from_seq` on (up to `through`), at most `max_bytes` (but
        at least one record), never across a segment: (first_seq, last_seq, bytes)."""
        seg = self._segment_of(from_seq)
        if seg is None:
            raise JournalError(f"seq {from_seq} not held (journal has {self.first_seq}"
                               f"..{self.last_seq})")
        i = from_seq - seg.first_seq
        start = seg.offsets[i]
        limit = start + max_bytes
        j = bisect_right(seg.offsets, limit, lo=i)  # records i..j-1 start within budget
        k = j - 1 if j == len(seg.offsets) and seg.size <= limit else j - 2
        last = seg.first_seq + max(k, i)
        if through is not None:
            last = max(from_seq, min(last, through))
        end = seg.end_of(last)
        data = os.pread(self._reader(seg), end - start, start)
        if len(data) != end - start:
            raise JournalError(f"short read of {seg.path} at {start}")
        return from_seq, last, data

    def chunks(self, after: int, through: int | None = None, max_bytes: int = CHUNK):
        """Durable records after seq `after` through `through` (default: the last), as
        read() returns them, chunk by chunk."""
        through = self.last_seq if through is None else through
        seq = after + 1
        while seq <= through:
            chunk = self.read(seq, max_bytes, through)
            yield chunk
            seq = chunk[1] + 1

    def records(self, after: int, through: int | None = None):
        """The decoded records of chunks(after, through), one by one."""
        for _, _, data in self.chunks(after, through):
            yield from iterate(data)

    def time_ns(self, seq: int) -> int:
        """When the primary journaled record `seq` (0 if it is not held)."""
        seg = self._segment_of(seq)
        if seg is None:
            return 0
        head = os.pread(self._reader(seg), HEADER_SIZE, seg.offsets[seq - seg.first_seq])
        return HEADER.unpack(head)[6]

    def _reader(self, seg: _Segment) -> int:
        fd = self._rfds.get(seg.path)
        if fd is None:
            fd = self._rfds[seg.path] = os.open(seg.path, os.O_RDONLY)
        return fd

    # ---- trimming --------------------------------------------------------------------
    def trim_through(self, seq: int) -> list[str]:
        """Forget whole segments whose records are all <= seq (never the active one):
        `base` moves past them and their descriptors close. Returns their paths, for
        delete() (which the group runs off the loop: freeing a big file's extents takes
        a while)."""
        drop = []
        for seg in self._segments[:-1]:
            if seg.last_seq <= seq and seg.tail == seg.size:
                drop.append(seg)
            else:
                break
        if not drop:
            return []
        last = drop[-1]
        self._write_base(Position(last.last_seq, last.hcrcs[-1]))
        for seg in drop:
            self._close_fds(seg.path)
        del self._segments[:len(drop)]
        del self._firsts[:len(drop)]
        return [seg.path for seg in drop]

    def delete(self, paths: list[str]) -> None:
        """Remove segments that trim_through() let go of (any thread)."""
        self.space.unlink(paths)
        statefile.fsync_dir(self.directory)

    def rebase(self, pos: Position) -> None:
        """Drop every record and restart the journal after `pos` (a replica that a
        resync brought to the sender's image at pos.seq). Segments go first, then
        `base` is replaced, so a crash in between leaves an empty journal at the old
        base, which the group's recovery rebases again from its checkpoint."""
        paths = [seg.path for seg in self._segments]
        for path in paths:
            self._close_fds(path)
        self._segments.clear()
        self._firsts.clear()
        self.space.unlink(paths)
        statefile.fsync_dir(self.directory)
        self._write_base(pos)

    def truncate_after(self, seq: int) -> int:
        """Drop the durable records after `seq` (a replica promoted with an epoch that
        never closed). Later segments go first, then the one holding seq is cut and made
        durable, so a crash in between leaves a log that still ends in that epoch, which
        the next promote drops again. Nothing may be in flight. Returns how many."""
        dropped = self.last_seq - seq
        if dropped <= 0:
            return 0
        if seq < self.base.seq:
            raise JournalError(f"journal {self.directory}: cannot cut back to seq {seq}, "
                               f"before its base {self.base.seq}")
        later = [s for s in self._segments if s.first_seq > seq]
        for seg in later:
            self._close_fds(seg.path)
        self.space.unlink([seg.path for seg in later])
        statefile.fsync_dir(self.directory)
        del self._segments[len(self._segments) - len(later):]
        del self._firsts[len(self._firsts) - len(later):]
        if self._segments:
            seg = self._segments[-1]
            keep = seq - seg.first_seq + 1
            end = seg.end_of(seq)
            with open(seg.path, "r+b") as f:
                self.space.cut(f.fileno(), seg.path, end)
                os.fsync(f.fileno())
            del seg.offsets[keep:]
            del seg.hcrcs[keep:]
            seg.size = seg.tail = end
        return dropped

    def _write_base(self, pos: Position) -> None:
        statefile.replace(os.path.join(self.directory, "base"),
                          f"{pos.seq} {pos.hcrc}\n".encode(), pad=True)
        self.base = pos

    def _close_fds(self, path: str) -> None:
        """Close the append and read descriptors of one segment, if open."""
        for fds in (self._fds, self._rfds):
            fd = fds.pop(path, None)
            if fd is not None:
                os.close(fd)

    def close(self) -> None:
        for fds in (self._fds, self._rfds):
            for fd in fds.values():
                os.close(fd)
            fds.clear()
        self.space.close()


def _unwritten_sector(data: bytes, pos: int) -> bool:
    """The record at `pos` (which failed its checks) has a sector that never reached
    the disk: from the record's start or the sector's start to the sector's end (or the
    record's end) it reads as zeroes. Only the record's own extent is looked at, as far
    as its header can be trusted (record.trusted_extent)."""
    end = trusted_extent(data, pos)
    sector = pos - pos % SECTOR
    while sector < end:
        lo, hi = max(sector, pos), min(sector + SECTOR, end)
        if data[lo:hi] == _ZERO_SECTOR[:hi - lo]:
            return True
        sector += SECTOR
    return False
