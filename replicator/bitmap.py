"""Dirty-region bitmap of one target of one group (VVR's DCM, DRBD's quick-sync bitmap).

While a target is away (or too far behind for the journal) the group stops keeping
journal records for it and records instead, per volume, which regions (granularity
bytes each, 64 KiB by default; the last region of a volume may be shorter) were written
since the target's last acknowledged seq. A resync then ships the current content of
those regions only.

Persistence: the bitmap is derived from the journal, never written on the write path.
`through` is the seq through which journal records have been marked; the group marks
and saves the bitmap before it trims records past `through`, and never trims a record
a saved bitmap does not cover. After a crash the bitmap on disk plus the journal
records after its `through` rebuild exactly the same set (the group re-marks them at
open). So a bit is never lost, though a region may be marked that a crash left unwritten.

File layout (little-endian), replaced atomically without fresh space (statefile.py):
    magic "RBM1", granularity u32, through u64, active u8, volume count u16,
    then per volume: name length u16, name (UTF-8), size u64, bits (ceil(regions/8) bytes,
    bit i of byte j = region 8*j+i), then CRC32C u32 of everything before it.
"""

from __future__ import annotations

import struct

from crc32c import crc32c

from . import statefile

MAGIC = b"RBM1"
DEFAULT_GRANULARITY = 64 << 10
_HEAD = struct.Struct("<4sIQBH")
_VOL = struct.Struct("<H")
_SIZE = struct.Struct("<Q")
_CRC = struct.Struct("<I")


class BitmapError(Exception):
    pass


class Bitmap:
    def __init__(self, path: str, volumes: dict[str, int], granularity: int = DEFAULT_GRANULARITY):
        if granularity < 4096 or granularity & (granularity - 1):
            raise ValueError(f"granularity {granularity}: expected a power of two >= 4096")
        self.path = path
        self.granularity = granularity
        self.sizes = dict(volumes)
        self.bits = {name: bytearray(-(-self.regions(name) // 8)) for name in volumes}
        self.through = 0  # journal records <= through are marked
        self.active = False  # the target is logging: this bitmap, not the journal, covers it
        self.remarked: set | None = None  # during a resync pass: regions marked again
        self._remarked_all = False  # during a pass: set_all marked every region again

    def regions(self, volume: str) -> int:
        return -(-self.sizes[volume] // self.granularity)

    # ---- bits -------------------------------------------------------------------------
    def mark(self, volume: str, offset: int, length: int) -> None:
        """Mark every region that [offset, offset+length) touches."""
        if length <= 0:
            return
        bits, g = self.bits[volume], self.granularity
        first, last = offset // g, min((offset + length - 1) // g, self.regions(volume) - 1)
        for r in range(first, last + 1):
            bits[r >> 3] |= 1 << (r & 7)
            if self.remarked is not None:
                self.remarked.add((volume, r))

    def begin_pass(self) -> None:
        """A resync pass starts: from now on a region marked again is not cleared by
        the acknowledgement of the copy sent before (clear)."""
        self.remarked, self._remarked_all = set(), False

    def end_pass(self) -> None:
        self.remarked, self._remarked_all = None, False

    def set_all(self) -> None:
        if self.remarked is not None:  # a pass runs: every region is marked again
            self._remarked_all = True
        for name in self.bits:
            n = self.regions(name)
            bits = self.bits[name]
            bits[:] = b"\xff" * len(bits)
            if n % 8:
                bits[-1] = (1 << (n % 8)) - 1

    def clear(self, volume: str, region: int) -> bool:
        """Clear one region unless it was marked again since the pass began; True if cleared."""
        if self.remarked is not None and (self._remarked_all or (volume, region) in self.remarked):
            return False
        self.bits[volume][region >> 3] &= ~(1 << (region & 7)) & 0xFF
        return True

    def clear_all(self) -> None:
        for bits in self.bits.values():
            bits[:] = bytes(len(bits))

    def dirty(self):
        """(volume, region, offset, length) of every marked region, in volume then
        offset order; the last region of a volume is cut at the volume's end."""
        g = self.granularity
        for name, bits in self.bits.items():
            size = self.sizes[name]
            for j, byte in enumerate(bits):
                if not byte:
                    continue
                for i in range(8):
                    if byte >> i & 1:
                        r = j * 8 + i
                        off = r * g
                        yield name, r, off, min(g, size - off)

    def count(self) -> int:
        return sum(bin(b).count("1") for bits in self.bits.values() for b in bits)

    def dirty_bytes(self) -> int:
        return sum(length for *_, length in self.dirty())

    # ---- persistence ------------------------------------------------------------------
    def save(self) -> None:
        parts = [_HEAD.pack(MAGIC, self.granularity, self.through, self.active, len(self.bits))]
        for name, bits in self.bits.items():
            raw = name.encode()
            parts += [_VOL.pack(len(raw)), raw, _SIZE.pack(self.sizes[name]), bytes(bits)]
        body = b"".join(parts)
        statefile.replace(self.path, body + _CRC.pack(crc32c(body)))  # same size each time

    def load(self) -> bool:
        """Read the saved bitmap; False when there is none. Raises BitmapError when the
        file is damaged or was made for other volumes or another granularity."""
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return False
        if len(data) < _HEAD.size + 4 or _CRC.unpack_from(data, len(data) - 4)[0] != crc32c(data[:-4]):
            raise BitmapError(f"{self.path}: damaged (checksum mismatch or truncated)")
        magic, gran, through, active, nvol = _HEAD.unpack_from(data)
        if magic != MAGIC:
            raise BitmapError(f"{self.path}: not a bitmap file")
        if gran != self.granularity:
            raise BitmapError(f"{self.path}: granularity {gran}, configured {self.granularity}")
        pos, loaded = _HEAD.size, {}
        try:  # a file whose checksum holds may still lie (a writer's bug): refuse it cleanly
            for _ in range(nvol):
                (n,) = _VOL.unpack_from(data, pos)
                name = data[pos + 2:pos + 2 + n].decode()
                pos += 2 + n
                (size,) = _SIZE.unpack_from(data, pos)
                pos += 8
                nbytes = -(-(-(-size // gran)) // 8)
                loaded[name] = (size, bytearray(data[pos:pos + nbytes]))
                pos += nbytes
        except (struct.error, UnicodeDecodeError) as exc:
            raise BitmapError(f"{self.path}: damaged volume entry at offset {pos}: {exc}") from None
        if pos != len(data) - _CRC.size:
            raise BitmapError(f"{self.path}: damaged: the volumes' bits end at offset {pos}, "
                              f"the file at {len(data) - _CRC.size}")
        if {n: s for n, (s, _) in loaded.items()} != self.sizes:
            raise BitmapError(f"{self.path}: made for volumes "
                              f"{ {n: s for n, (s, _) in loaded.items()} }, configured {self.sizes}")
        self.bits = {n: b for n, (_, b) in loaded.items()}
        self.through, self.active = through, bool(active)
        return True
