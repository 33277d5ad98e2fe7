"""The targets of a group as the write path sees them: one TargetLink per target (its
shipper reports through its methods), and the floors writes and flushes wait for."""

from __future__ import annotations

import time

from ..bitmap import Bitmap
from ..config import TargetConfig


class TargetLink:
    """What the write path needs to know of one target; its shipper keeps it current."""

    def __init__(self, cfg: TargetConfig, acked_seq: int, bitmap: Bitmap):
        self.node = cfg.node
        self.configure(cfg)
        self.acked_seq = acked_seq  # durable on the target (what the journal may trim)
        self.written_seq = acked_seq  # written to its journal (what sync writes wait for)
        self.in_sync = False  # connected and caught up: sync writes wait for it
        self.bitmap = bitmap  # active: the target is logging (or resyncing) from it
        self.why = ""  # why it went to logging
        self.resync_mode = "full"  # config.RESYNC_MODES: how the next resync starts
        self.resync_initial = False  # that resync is the target's initial sync
        self.resync_epoch = 0  # bumped by each resync request: a running pass starts over
        self.synced = acked_seq > 0  # has had its initial sync (or streamed from seq 0)
        self.connected = False
        self.disconnected_at = time.monotonic()
        self.finishing = False  # RESYNC_DONE sent: the bitmap's `through` must stay put
        # Logging: when the oldest write it lacks was journaled (wall clock ns; 0: not
        # known yet), kept because the journal trims that record away (lag_seconds).
        self.lacks_since_ns = 0
        self.lag_over = False  # over its max_lag_seconds or max_lag_bytes (group/guard.py)
        self.lag_holds = False  # ...and so holds a primary's writes (on_lag block, throttle)

    def configure(self, cfg: TargetConfig) -> None:
        """Take this target's (possibly changed) configuration; its position stays."""
        self.cfg = cfg
        self.mode = cfg.mode
        self.block = cfg.on_disconnect == "block"  # writes wait while it is not streaming
        self.bunker = cfg.bunker

    def acked(self, written: int, durable: int) -> None:
        """The target acknowledged: written through `written`, durable through `durable`."""
        self.written_seq = max(self.written_seq, written)
        self.acked_seq = max(self.acked_seq, durable)

    def reset_position(self, seq: int) -> None:
        """The target holds exactly seq (a handshake or a resync said so)."""
        self.written_seq = self.acked_seq = seq

    @property
    def logging(self) -> bool:
        return self.bitmap.active

    @property
    def streaming(self) -> bool:
        """Connected and fed from the journal (not away, not logging, not resyncing)."""
        return self.connected and not self.bitmap.active


class Links(dict):
    """node -> TargetLink, with what the write path asks of all of them at once."""

    def _holding(self):
        """The targets writes wait for: the in-sync sync targets, a connected bunker even
        while it catches up (its copy of the journal is what makes a takeover lossless),
        and targets with on_disconnect: block that are not streaming (their position then
        holds every later write back)."""
        return (t for t in self.values()
                if (t.mode == "sync" and (t.in_sync or (t.bunker and t.streaming)))
                or (t.block and not t.streaming))

    def written_floor(self) -> float:
        """Highest seq every target a write waits for has written (inf when none)."""
        return min((t.written_seq for t in self._holding()), default=float("inf"))

    def durable_floor(self) -> float:
        """Highest seq every target a flush waits for has made durable (inf when none)."""
        return min((t.acked_seq for t in self._holding()), default=float("inf"))

    @property
    def blocked_by(self) -> list[str]:
        """Targets that hold writes back right now: with on_disconnect: block and not
        streaming, or over their lag limit with on_lag: block or throttle (guard.py)."""
        return [t.node for t in self.values() if (t.block and not t.streaming) or t.lag_holds]
