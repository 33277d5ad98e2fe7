"""Replica analytics: what a node learns from the records it applies, computed where it
is cheap (a replica) rather than in the primary's write path (issue 17; seed 000,
claims 24-29).

One `Analytics` per group on a node. The apply path calls `observe` for every record it
applies, on the event loop, so the work per record is a few integer operations and
dictionary updates: O(1), no thread, nothing kept per record.

- Rates: each volume has a ring of per-second slots (the current second and the
  HISTORY before it); a slot says which second it counts and starts over when the ring
  comes round to it again. A window (10 s, 60 s, 300 s) is made of complete seconds:
  the current one counts once it is over, so a rate does not dip at the start of every
  second. A window longer than the time observed so far (`observed_s`, complete seconds
  since the Analytics was made) divides by the time observed.
- Hot regions: each slot keeps a Misra-Gries summary of the regions its second wrote,
  at most REGIONS_PER_SLOT counters. A region with more than 1/(REGIONS_PER_SLOT + 1) of
  a second's writes is always in it, and no count is above the true one (it is low by
  at most that second's writes / (REGIONS_PER_SLOT + 1)); a second that writes fewer
  regions than that is counted exactly. So memory is bounded whatever the workload. A
  record counts in the region its first byte falls in.
- Overwrite share: of the bytes written since the Analytics was made, those that fell
  on 4 KiB blocks written before. A bitmap per volume, a bit per block, grown from the
  highest block written (at once to the volume's size when `sizes` names it).
- Compressibility: zstd (level 1) compressed / raw size of the first `sample_bytes` of
  payload each volume writes in each second, so its cost is bounded whatever the write
  rate. ZERO records carry no payload and are not sampled.
- Delta ratio: processed / raw bytes of the records a near node delta-compressed, as
  `delta` reports them; group-wide.

Hot regions, compressibility and the delta ratio cover the last HISTORY complete
seconds, like the longest rate window; a ratio is None when nothing fed it there.
"""

from __future__ import annotations

import heapq
import time

import zstandard

from .journal.record import Kind

BLOCK = 4096  # the unit of first write vs overwrite
HISTORY = 300  # complete seconds the rings hold: the longest window
WINDOWS = (10, 60, 300)
HOT_REGIONS = 8  # regions a report names
REGIONS_PER_SLOT = 64  # Misra-Gries counters per second of a volume
_RING = HISTORY + 1  # the complete seconds and the current one

_WRITE, _ZERO, _SKIP, _MARKER = int(Kind.WRITE), int(Kind.ZERO), int(Kind.SKIP), int(Kind.MARKER)
_ONES = memoryview(b"\xff" * 65536)  # set bitmap bytes from this, a chunk at a time


class _Second:
    """One second of one volume."""
    __slots__ = ("second", "writes", "bytes", "regions", "sampled", "compressed")

    def __init__(self):
        self.second: int | None = None  # which second it counts; None: none yet
        self.regions: dict[int, list[int]] = {}  # region -> [writes, bytes]

    def start(self, second: int) -> None:
        self.second = second
        self.writes = self.bytes = self.sampled = self.compressed = 0
        self.regions.clear()


class _DeltaSecond:
    """One second of a group's delta reports."""
    __slots__ = ("second", "raw", "processed")

    def __init__(self):
        self.second: int | None = None


class _Volume:
    __slots__ = ("size", "writes", "bytes", "overwritten", "bitmap", "seconds",
                 "last_time_ns")

    def __init__(self, size: int | None):
        self.size = size  # bytes, when the constructor was told
        self.writes = self.bytes = self.overwritten = 0  # since the Analytics was made
        self.bitmap = bytearray()  # bit b of byte i: block 8 * i + b was written
        self.seconds = [_Second() for _ in range(_RING)]
        self.last_time_ns: int | None = None  # primary's journal time of the newest write


class Analytics:
    """The analytics of one group on one node, fed with the records it applies."""

    def __init__(self, *, region_size: int = 1 << 20, sizes: dict[str, int] | None = None,
                 sample_bytes: int = 1 << 20, clock=time.monotonic):
        if not isinstance(region_size, int) or region_size <= 0:
            raise ValueError(f"analytics: region_size must be a positive number of bytes, "
                             f"not {region_size!r}")
        if not isinstance(sample_bytes, int) or sample_bytes < 0:
            raise ValueError(f"analytics: sample_bytes must be a number of bytes >= 0, "
                             f"not {sample_bytes!r}")
        self.region_size = region_size
        self.sample_bytes = sample_bytes
        self._clock = clock
        self._start = int(clock())
        self._volumes: dict[str, _Volume] = {}
        for name, size in (sizes or {}).items():
            if not isinstance(size, int) or size < 0:
                raise ValueError(f"analytics: size of volume {name!r} must be a number of "
                                 f"bytes >= 0, not {size!r}")
            self._volumes[name] = _Volume(size)
        self._delta = [_DeltaSecond() for _ in range(_RING)]
        self._zstd = zstandard.ZstdCompressor(level=1)

    def observe(self, volume: str, offset: int, length: int, kind: int, payload,
                time_ns: int) -> None:
        """Count one applied record: a WRITE with its payload, a ZERO of `length` bytes
        (no payload); a SKIP or a MARKER changes nothing and is not counted. `time_ns` is
        when the primary journaled it."""
        if kind == _SKIP or kind == _MARKER:
            return
        if kind != _WRITE and kind != _ZERO:
            raise ValueError(f"analytics: record of volume {volume!r} at offset {offset} "
                             f"has unknown kind {kind!r}")
        if offset < 0 or length < 0:
            raise ValueError(f"analytics: record of volume {volume!r} at offset {offset} "
                             f"length {length}: negative")
        v = self._volumes.get(volume)
        if v is None:
            v = self._volumes[volume] = _Volume(None)
        now = int(self._clock())
        s = v.seconds[now % _RING]
        if s.second != now:
            s.start(now)
        s.writes += 1
        s.bytes += length
        v.writes += 1
        v.bytes += length
        v.last_time_ns = time_ns
        regions = s.regions
        region = offset // self.region_size
        counter = regions.get(region)
        if counter is not None:
            counter[0] += 1
            counter[1] += length
        elif len(regions) < REGIONS_PER_SLOT:
            regions[region] = [1, length]
        else:
            _cancel_one_each(regions)
        if not length:
            return
        v.overwritten += _mark_written(v, offset, length)
        if kind == _WRITE and s.sampled < self.sample_bytes:
            chunk = memoryview(payload)[:self.sample_bytes - s.sampled]
            s.sampled += len(chunk)
            s.compressed += len(self._zstd.compress(chunk))

    def delta(self, raw_bytes: int, processed_bytes: int) -> None:
        """A record of `raw_bytes` this node delta-compressed to `processed_bytes`."""
        if raw_bytes < 0 or processed_bytes < 0:
            raise ValueError(f"analytics: delta of {raw_bytes} raw bytes to "
                             f"{processed_bytes}: sizes must be >= 0")
        now = int(self._clock())
        d = self._delta[now % _RING]
        if d.second != now:
            d.second, d.raw, d.processed = now, 0, 0
        d.raw += raw_bytes
        d.processed += processed_bytes

    def report(self, now: float | None = None) -> dict:
        """The analytics as of `now` (the clock's time; default: now), JSON-serialisable:

        - `observed_s`: complete seconds since the Analytics was made; `region_size`;
          `delta_ratio`: processed / raw over the last HISTORY seconds, or None;
        - `volumes`: by name (every volume written, and those `sizes` named):
          `writes`, `bytes` (totals); `writes_per_s`, `bytes_per_s` ({"10s", "60s",
          "300s"}); `hot_regions`: up to HOT_REGIONS {offset, length, writes, bytes},
          most writes first; `overwrite_share` (None before any byte);
          `compressibility` and the `sampled_bytes` it is over (None, 0: no sample);
          `last_write_time_ns`: when the primary journaled the newest record counted.
        """
        second = int(self._clock() if now is None else now)
        observed = max(0, second - self._start)
        raw = processed = 0
        for d in self._delta:
            if d.second is not None and second - HISTORY <= d.second < second:
                raw += d.raw
                processed += d.processed
        return {
            "observed_s": observed,
            "region_size": self.region_size,
            "delta_ratio": processed / raw if raw else None,
            "volumes": {name: self._volume_report(v, second, observed)
                        for name, v in sorted(self._volumes.items())},
        }

    def _volume_report(self, v: _Volume, second: int, observed: int) -> dict:
        done = [s for s in v.seconds
                if s.second is not None and second - HISTORY <= s.second < second]
        writes_per_s, bytes_per_s = {}, {}
        for window in WINDOWS:
            span = min(window, observed)
            inside = [s for s in done if s.second >= second - window]
            writes_per_s[f"{window}s"] = sum(s.writes for s in inside) / span if span else 0.0
            bytes_per_s[f"{window}s"] = sum(s.bytes for s in inside) / span if span else 0.0
        regions: dict[int, list[int]] = {}
        for s in done:
            for region, (writes, nbytes) in s.regions.items():
                total = regions.setdefault(region, [0, 0])
                total[0] += writes
                total[1] += nbytes
        hot = heapq.nlargest(HOT_REGIONS, regions.items(),
                             key=lambda item: (item[1][0], item[1][1], -item[0]))
        sampled = sum(s.sampled for s in done)
        return {
            "writes": v.writes,
            "bytes": v.bytes,
            "writes_per_s": writes_per_s,
            "bytes_per_s": bytes_per_s,
            "hot_regions": [{"offset": region * self.region_size, "length": self.region_size,
                             "writes": writes, "bytes": nbytes}
                            for region, (writes, nbytes) in hot],
            "overwrite_share": v.overwritten / v.bytes if v.bytes else None,
            "compressibility": sum(s.compressed for s in done) / sampled if sampled else None,
            "sampled_bytes": sampled,
            "last_write_time_ns": v.last_time_ns,
        }


def _cancel_one_each(regions: dict[int, list[int]]) -> None:
    """Misra-Gries with every counter taken: the new write and one write of each counted
    region cancel out (a region's bytes shrink by its average write). Each counter
    removed this way was added by as many writes, so the cost per record stays O(1)."""
    for region, counter in list(regions.items()):
        if counter[0] == 1:
            del regions[region]
        else:
            counter[1] -= counter[1] // counter[0]
            counter[0] -= 1


def _mark_written(v: _Volume, offset: int, length: int) -> int:
    """Mark the blocks of [offset, offset + length) written; the bytes of it that fell on
    blocks written before."""
    end = offset + length
    first, last = offset // BLOCK, (end - 1) // BLOCK
    bitmap = v.bitmap
    need = (last >> 3) + 1
    if need > len(bitmap):
        want = max(need, len(bitmap) + len(bitmap) // 4,
                   0 if v.size is None else (v.size + 8 * BLOCK - 1) // (8 * BLOCK))
        bitmap.extend(bytes(want - len(bitmap)))
    if first == last:  # the common case: within one block
        byte, bit = first >> 3, 1 << (first & 7)
        old = bitmap[byte]
        if old & bit:
            return length
        bitmap[byte] = old | bit
        return 0
    first_was = bitmap[first >> 3] >> (first & 7) & 1
    last_was = bitmap[last >> 3] >> (last & 7) & 1
    overwritten = _count_and_set(bitmap, first, last + 1) * BLOCK
    # the edge blocks were written in part only
    return (overwritten - first_was * (offset - first * BLOCK)
            - last_was * ((last + 1) * BLOCK - end))


def _count_and_set(bitmap: bytearray, start: int, end: int) -> int:
    """Set bits [start, end) (end > start); how many of them were set before."""
    first, last = start >> 3, (end - 1) >> 3
    head = (0xFF << (start & 7)) & 0xFF
    tail = 0xFF >> (7 - ((end - 1) & 7))
    if first == last:
        mask = head & tail
        old = bitmap[first]
        bitmap[first] = old | mask
        return (old & mask).bit_count()
    count = (bitmap[first] & head).bit_count() + (bitmap[last] & tail).bit_count()
    bitmap[first] |= head
    bitmap[last] |= tail
    for a in range(first + 1, last, len(_ONES)):
        b = min(a + len(_ONES), last)
        count += int.from_bytes(bitmap[a:b], "little").bit_count()
        bitmap[a:b] = _ONES[:b - a]
    return count
