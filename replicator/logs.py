"""The agent's log on stderr: records as text or as JSON lines, floods collapsed.

text: `TIME NODE LEVEL LOGGER: MESSAGE`, without the time when stderr is the journal
(journald stamps every line itself: a second time would only be noise).
json: one object a line, for log shippers: time (ISO 8601, UTC), level, logger, node,
message, and exception (the traceback) when there is one.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import datetime, timezone

from . import logfilter

FORMATS = ("text", "json")


def journald_stream(stream) -> bool:
    """`stream` is connected to the journal: systemd sets JOURNAL_STREAM to the device and
    inode of the stream it gave the service (one inherited by a process whose stderr was
    redirected elsewhere does not count: the journal's own check, sd_journal_stream_fd)."""
    dev, _, ino = os.environ.get("JOURNAL_STREAM", "").partition(":")
    if not (dev.isdigit() and ino.isdigit()):
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):  # no file behind it (io.StringIO...)
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


class JsonFormatter(logging.Formatter):
    def __init__(self, node: str):
        super().__init__()
        self.node = node

    def format(self, record: logging.LogRecord) -> str:
        line = {"time": datetime.fromtimestamp(record.created, timezone.utc)
                .isoformat(timespec="milliseconds"),
                "level": record.levelname.lower(), "logger": record.name, "node": self.node,
                "message": record.getMessage()}
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line)


def handler(node: str, log_format: str, stream) -> logging.Handler:
    """A handler writing to `stream` in `log_format` (FORMATS)."""
    h = logging.StreamHandler(stream)
    if log_format == "json":
        h.setFormatter(JsonFormatter(node))
    else:
        stamp = "" if journald_stream(stream) else "%(asctime)s "
        h.setFormatter(logging.Formatter(f"{stamp}{node} %(levelname)s %(name)s: %(message)s"))
    return h


def setup(node: str, level: str, log_format: str) -> logfilter.RepeatFilter:
    """The agent's root handler on stderr; its RepeatFilter (report() it at the end)."""
    h = handler(node, log_format, sys.stderr)
    root = logging.getLogger()
    root.addHandler(h)
    root.setLevel(getattr(logging, level.upper()))
    # Floods (clients, failing writes) must not drown the log: repeats are collapsed.
    return logfilter.install(h)
