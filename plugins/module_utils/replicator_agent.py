# Copyright: (c) 2026, The replicator team
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Talk to a running replicator agent through its command line (`replicator ... --json`)
and describe its links. Shared by the replicator_* modules; pure functions where it can
be, so the unit tests feed them status documents."""

from __future__ import annotations

import json
import re

DEFAULT_CLI = "/opt/replicator/venv/bin/replicator"
DEFAULT_CONFIG = "/etc/replicator/agent.yml"
AGENT_ARGS = dict(
    cli=dict(type="path", default=DEFAULT_CLI),
    config=dict(type="path", default=DEFAULT_CONFIG),
)
LINK_ARGS = dict(
    group=dict(type="str"),
    targets=dict(type="list", elements="str"),
)


class AgentError(Exception):
    """The agent command failed or printed something that is not its JSON."""


def call(module, *args, ok_rcs=(0,)):
    """Run `replicator ARGS -c CONFIG --json`; return (rc, decoded JSON)."""
    cmd = [module.params["cli"], *args, "-c", module.params["config"], "--json"]
    rc, out, err = module.run_command(cmd)
    if rc not in ok_rcs:
        raise AgentError(f"{' '.join(cmd)}: exit {rc}: {(err or out).strip()}")
    try:
        return rc, json.loads(out)
    except ValueError:
        raise AgentError(f"{' '.join(cmd)}: expected JSON, got: {out[:300]!r}") from None


def select(status: dict, group: str | None = None, targets=None) -> list[tuple[dict, dict]]:
    """(group, target) pairs of this node's status, restricted to one group and/or some
    targets; a named group or target that this node does not ship to is an error."""
    groups = [g for g in status["groups"] if not group or g["name"] == group]
    if group and not groups:
        raise AgentError(f"node {status['node']} has no group {group!r} "
                         f"(groups: {', '.join(g['name'] for g in status['groups']) or 'none'})")
    pairs = [(g, t) for g in groups for t in g["targets"]
             if not targets or t["node"] in targets]
    missing = set(targets or ()) - {t["node"] for _, t in pairs}
    if missing:
        raise AgentError(f"node {status['node']} does not ship {group or 'any group'} to "
                         f"{', '.join(sorted(missing))}")
    return pairs


def link(status: dict, group: dict, target: dict) -> dict:
    """One link of the topology as the playbooks report it."""
    journal = group["journal"]
    return {
        "group": group["name"], "source": status["node"], "target": target["node"],
        "mode": target["mode"], "compress": target["compress"], "state": target["state"],
        "in_sync": target["in_sync"], "seq": group["seq"], "acked_seq": target["acked_seq"],
        "lag_records": target["lag_records"], "lag_bytes": target["lag_bytes"],
        "lag_seconds": target["lag_seconds"], "last_error": target.get("last_error"),
        "resync": target.get("resync"),
        "journal_used_bytes": journal["used_bytes"], "journal_capacity_bytes": journal["capacity_bytes"],
        "journal_full": journal["full"],
    }


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return str(n)


def progress_line(lk: dict) -> str:
    """`db dc1-app -> dc3-arc async/zstd: resyncing 42% 34.0MiB/80.0MiB 11.2MiB/s eta 4s`"""
    head = f"{lk['group']} {lk['source']} -> {lk['target']} {lk['mode']}" + (
        "/zstd" if lk["compress"] == "zstd" else "")
    r = lk.get("resync")
    if lk["state"] == "resyncing" and r:
        total = r.get("total_bytes") or 0
        pct = f"{100 * r.get('done_bytes', 0) / total:.0f}% " if total else ""
        eta = r.get("eta_seconds")
        detail = (f"{pct}{human_bytes(r.get('done_bytes', 0))}/{human_bytes(total)} "
                  f"{human_bytes(r.get('rate_bytes_per_s') or 0)}/s"
                  + (f" eta {eta:.0f}s" if eta is not None else ""))
    else:
        detail = (f"seq {lk['seq']} acked {lk['acked_seq']} lag {lk['lag_records']} rec/"
                  f"{human_bytes(lk['lag_bytes'])}/{lk['lag_seconds']:.1f}s")
    error = f" ({lk['last_error']})" if lk.get("last_error") and lk["state"] != "replicating" else ""
    return f"{head}: {lk['state']} {detail}{error}"


_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_RATE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*$", re.IGNORECASE)


def parse_rate(value) -> int:
    """Bytes per second from `50MiB`, `1G`, `0` (unlimited) or a plain number."""
    m = _RATE_RE.match(str(value))
    if not m:
        raise AgentError(f"rate {value!r}: expected bytes per second like 50MiB, 1G or 0")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).upper()])
