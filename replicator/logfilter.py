"""One filter for the agent's log handler: bursts of similar lines are collapsed.

A flood of clients or of failing writes once grew the log by 0.5-3 MB/s (790 MB in four
minutes), which buries the one line an operator needs and can fill the disk the journal
lives on. Records are "similar" when they come from the same logger at the same level
with the same message template (its first line: asyncio's tracebacks vary below it),
whatever their arguments. Of each kind, the first `burst` records of a `window` pass;
the last of them says that more are being suppressed; the rest are counted, and the
count is reported as "N similar messages suppressed" once the window has passed: by the
first record of any kind after it, or by the reporting thread `install` starts (so a
flood that simply stops is summed up within a window, not at the next log line), and by
`report()`, which the agent calls as it stops.
"""

from __future__ import annotations

import logging
import threading
import time

MAX_KINDS = 4096  # kinds remembered; the oldest windows are forgotten past this


class RepeatFilter(logging.Filter):
    def __init__(self, burst: int = 10, window: float = 10.0, clock=time.monotonic):
        super().__init__()
        self.burst = burst
        self.window = window
        self.clock = clock
        self._kinds: dict[tuple, list] = {}  # kind -> [window start, passed, suppressed]
        self._reporting = False
        self._lock = threading.RLock()  # executor threads log too

    def filter(self, record: logging.LogRecord) -> bool:
        with self._lock:
            return self._filter(record)

    def _filter(self, record: logging.LogRecord) -> bool:
        if self._reporting:  # a summary this filter is logging itself
            return True
        now = self.clock()
        self._report(now)
        first = str(record.msg).split("\n", 1)[0]
        kind = (record.name, record.levelno, first)
        seen = self._kinds.get(kind)
        if seen is None or now - seen[0] >= self.window:
            if len(self._kinds) >= MAX_KINDS:
                self._forget(now)
            self._kinds[kind] = [now, 1, 0]
            return True
        seen[1] += 1
        if seen[1] < self.burst:
            return True
        if seen[1] == self.burst:
            record.msg = (f"{record.getMessage()} (more messages like this are suppressed "
                          f"for up to {self.window:g}s)")
            record.args = None
            return True
        seen[2] += 1
        return False

    def report(self, now: float | None = None) -> None:
        """Log how many records of each kind were suppressed in windows that are over
        (every window, when `now` is None)."""
        with self._lock:
            self._report(now)

    def _report(self, now: float | None) -> None:
        done = [(kind, seen) for kind, seen in self._kinds.items()
                if seen[2] and (now is None or now - seen[0] >= self.window)]
        if not done:
            return
        self._reporting = True
        try:
            for (name, level, first), seen in done:
                logging.getLogger(name).log(
                    level, "%d similar messages suppressed in %.0fs: %s", seen[2],
                    (now if now is not None else self.clock()) - seen[0], first)
                seen[2] = 0
        finally:
            self._reporting = False

    def _forget(self, now: float) -> None:
        self.report()  # what the forgotten windows counted so far
        for kind in sorted(self._kinds, key=lambda k: self._kinds[k][0])[:MAX_KINDS // 4]:
            del self._kinds[kind]


def install(handler: logging.Handler, **kwargs) -> RepeatFilter:
    """Put a RepeatFilter on `handler` (every record the agent logs passes there), and
    report what it suppressed every window from a daemon thread."""
    f = RepeatFilter(**kwargs)
    handler.addFilter(f)

    def reporter() -> None:
        while True:
            time.sleep(f.window)
            f.report(f.clock())

    threading.Thread(target=reporter, name="log-repeats", daemon=True).start()
    return f
