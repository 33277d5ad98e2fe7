"""Online verify of one target: compare its hashes of every region of some ranges with
ours, in-band. Each chunk becomes a Probe that the stream places among the records
(hashed here at the journal's last seq, on the target after exactly that seq);
HASH_DEPTH of them are in flight at a time."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Callable

from ..group import Group, TargetLink
from ..verify import chunks, differing
from .peer import ShipError
from .resync import HASH_DEPTH


class Probe:
    """One verify HASH_REQUEST: the regions, our hashes of them at `seq`, the answer."""
    __slots__ = ("volume", "offset", "length", "seq", "hashes", "reply")

    def __init__(self, volume: str, offset: int, length: int, reply: asyncio.Future):
        self.volume, self.offset, self.length, self.reply = volume, offset, length, reply
        self.seq, self.hashes = 0, b""


class Verify:
    """One verify run: the pieces to compare, the mismatches found, its progress."""

    def __init__(self, group: Group, target: TargetLink,
                 ranges: list[tuple[str, int, int | None]]):
        self.group, self.target = group, target
        self.gran = group.cfg.bitmap_granularity
        self.pieces = [(volume, off, n) for volume, offset, length in ranges
                       for off, n in chunks(group.volumes[volume].size, self.gran, offset,
                                            length)]
        self.total_bytes = sum(n for *_, n in self.pieces)
        self.done_bytes = 0
        self.mismatches: list[dict] = []
        self.seqs: list[int] = []  # the seq each answered probe was hashed at
        self.started = time.monotonic()

    def status(self) -> dict:
        rate = self.done_bytes / max(1e-6, time.monotonic() - self.started)
        return {"done_bytes": self.done_bytes, "total_bytes": self.total_bytes,
                "mismatches": len(self.mismatches), "rate_bytes_per_s": round(rate),
                "eta_seconds": round((self.total_bytes - self.done_bytes) / rate, 1)
                if rate else None}

    async def run(self, place: Callable[[Probe], None],
                  withdraw: Callable[[Probe], None]) -> dict:
        """Hand every probe to `place` (the stream sends it), HASH_DEPTH at a time;
        `withdraw` takes back those not sent when the run ends early."""
        loop = asyncio.get_running_loop()
        inflight: deque[Probe] = deque()
        try:
            for piece in self.pieces:
                probe = Probe(*piece, loop.create_future())
                place(probe)
                inflight.append(probe)
                if len(inflight) >= HASH_DEPTH:
                    await self._settle(inflight.popleft())
            while inflight:
                await self._settle(inflight.popleft())
        finally:
            for volume in {piece[0] for piece in self.pieces}:
                self.group.volumes[volume].forget()
            for probe in inflight:
                withdraw(probe)
        return self._result()

    async def _settle(self, probe: Probe) -> None:
        reply = await probe.reply
        ours = probe.hashes
        if len(reply.hashes) != len(ours) or reply.seq != probe.seq:
            raise ShipError(f"{self.target.node} answered a hash request for seq {probe.seq} "
                            f"with {len(reply.hashes)} bytes at seq {reply.seq}")
        for i in differing(ours, reply.hashes):
            offset = probe.offset + i * self.gran
            self.mismatches.append({"volume": probe.volume, "offset": offset,
                                    "length": min(self.gran,
                                                  probe.offset + probe.length - offset)})
        self.done_bytes += probe.length
        self.seqs.append(probe.seq)

    def _result(self) -> dict:
        return {"group": self.group.name, "target": self.target.node,
                "bytes_checked": self.done_bytes,
                "regions_checked": sum(-(-n // self.gran) for *_, n in self.pieces),
                "first_seq": min(self.seqs, default=None),
                "last_seq": max(self.seqs, default=None),
                "seconds": round(time.monotonic() - self.started, 3),
                "mismatches": self.mismatches}
