"""The replication tree a node reports upstream (REPORT frames) and shows in status:
itself, with the analytics of what it applied (analytics.py), and below it the last
report of each of its targets, so that the primary sees every node of the cascade,
however many hops away, with its lag.

Lag is the primary's to judge: a node reports how far it has applied (`applied_seq`,
and when the primary journaled the newest record it took, `applied_time_ns`), and
`with_lag` measures every node of a tree against the root's own seq and journal: the
seconds are the age of the oldest record a node lacks when the root's journal still
holds it, else the age of the newest one it took (an upper bound: it lacks nothing
older than that).
"""

from __future__ import annotations

import time

from .group import Group

REPORT_INTERVAL = 2.0  # seconds between a receiver's REPORTs upstream


def node_report(node: str, group: Group, children: list[dict]) -> dict:
    """This node's tree of `group`: its own report and its targets' (`children`)."""
    analytics = group.analytics.report() if group.role != "primary" else None
    times = [v["last_write_time_ns"] for v in (analytics or {}).get("volumes", {}).values()
             if v.get("last_write_time_ns")]
    return {"node": node, "role": group.role, "applied_seq": group.commit.applied_seq,
            "applied_time_ns": max(times, default=0), "analytics": analytics,
            "children": children}


def child_report(target: str, report: dict | None, received: float) -> dict:
    """A target's last report as its parent keeps it (`received`: unix time), or a
    stand-in for a target that has not reported."""
    if report is None:
        return {"node": target, "role": None, "applied_seq": None, "applied_time_ns": 0,
                "analytics": None, "children": [], "report_age_s": None}
    return {**report, "report_age_s": round(time.time() - received, 1)}


def with_lag(tree: dict, group: Group) -> dict:
    """`tree` with lag_records and lag_seconds of every node against this one's seq."""
    j = group.journal
    last, now = j.last_seq, time.time_ns()

    def walk(t: dict, root: bool) -> dict:
        applied = t.get("applied_seq")
        if root:
            records, seconds = 0, 0.0
        elif applied is None:
            records = seconds = None
        elif applied >= last:
            records, seconds = 0, 0.0
        else:
            oldest = j.time_ns(applied + 1) or t.get("applied_time_ns") or 0
            records = last - applied
            seconds = round(max(0.0, (now - oldest) / 1e9), 3) if oldest else None
        return {**t, "lag_records": records, "lag_seconds": seconds,
                "children": [walk(c, False) for c in t.get("children", [])]}
    return walk(tree, True)
