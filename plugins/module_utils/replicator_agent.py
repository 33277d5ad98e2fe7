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
    """Run `replicator ARGS -c CONFIG --json`; return its decoded JSON."""
    cmd = [module.params["cli"], *args, "-c", module.params["config"], "--json"]
    rc, out, err = module.run_command(cmd)
    if rc not in ok_rcs:
        raise AgentError(f"{' '.join(cmd)}: exit {rc}: {(err or out).strip()}")
    try:
        return json.loads(out)
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
    missing = set(targets or ()) - {t["node"] for g, t in pairs}
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


# ---- the operation modules (promote, demote, switchover, ...) ------------------------
GROUP_ARGS = dict(group=dict(type="str", required=True))
_TARGET_OPTIONS = ("zstd", "bunker", "block")
_SECONDS = {"ms": 0.001, "s": 1, "": 1, "m": 60, "h": 3600, "d": 86400}  # as the agent reads them
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|)\s*$")


def group_of(status: dict, name: str) -> dict:
    """The status of group `name` on this node."""
    for g in status["groups"]:
        if g["name"] == name:
            return g
    raise AgentError(f"node {status['node']} has no group {name!r} "
                     f"(groups: {', '.join(g['name'] for g in status['groups']) or 'none'})")


def target_spec(t: dict) -> str:
    """A target of the status as TARGET_SPEC (NODE:MODE[:zstd][:bunker][:block]), the
    notation of promote --target and attach --target, intervals in seconds."""
    mode = f"periodic={t['interval']:g}s" if t["mode"] == "periodic" else t["mode"]
    return ":".join([t["node"], mode]
                    + (["zstd"] if t.get("compress") == "zstd" else [])
                    + (["bunker"] if t.get("bunker") else [])
                    + (["block"] if t.get("on_disconnect") == "block" else []))


def canonical_spec(spec: str) -> str:
    """A TARGET_SPEC as target_spec writes it (MODE defaults to async), so that a wanted
    target compares with the status's; a malformed one is an error."""
    node, *rest = str(spec).split(":")
    mode, sep, every = (rest[0] if rest else "async").partition("=")
    options = rest[1:]
    m = _DURATION_RE.match(every)
    if not node or mode not in ("sync", "async", "periodic") \
            or (mode == "periodic") != bool(m and every) \
            or len(set(options)) != len(options) or not set(options) <= set(_TARGET_OPTIONS):
        raise AgentError(f"target {spec!r}: expected NODE[:sync|async|periodic=INTERVAL]"
                         "[:zstd][:bunker][:block]")
    if mode == "periodic":
        mode = f"periodic={float(m.group(1)) * _SECONDS[m.group(2)]:g}s"
    return ":".join([node, mode] + [o for o in _TARGET_OPTIONS if o in options])


def group_state(status: dict, name: str) -> dict:
    """What an operation changes of a group here, as the modules' diff shows it."""
    g = group_of(status, name)
    return {"node": status["node"], "role": g["role"], "role_from": g.get("role_from"),
            "generation": g.get("generation"),
            "source": g.get("source") if g["role"] != "primary" else None,
            "targets": sorted(target_spec(t) for t in g["targets"]),
            "inconsistent": g.get("inconsistent", False),
            "split_brain": (g.get("split_brain") or {}).get("peer")}


def diff(module, before, after) -> dict:
    """The `diff` of a module's answer when the run asked for one (--diff)."""
    return {"diff": {"before": before, "after": after}} if module._diff else {}


def operate(module, command: list[str], plan) -> None:
    """Run one operation the way every operation module does: read the group's status,
    ask plan(state, group status) what the operation would leave (None: nothing to do;
    AgentError: refused), run `replicator COMMAND` unless in check mode, and exit with
    the command's answer (`result`), the group's state before and after (`diff`, and
    `state`) and its links."""
    name = module.params["group"]
    result = None
    try:
        status = call(module, "status")
        before = group_state(status, name)
        after = plan(dict(before), group_of(status, name))
        changed = after is not None
        if changed and not module.check_mode:
            result = call(module, *command)
            status = call(module, "status")
        if not changed or not module.check_mode:
            after = group_state(status, name)
        links = [link(status, g, t) for g, t in select(status, name)]
    except AgentError as exc:
        module.fail_json(msg=str(exc), result=result)
    module.exit_json(changed=changed, result=result, state=after, links=links,
                     **diff(module, before, after))


def handover_plan(name: str, to: str, op: str, replicating: bool):
    """The plan (see operate) of a switchover or failback of group `name` to `to`, run on
    the primary: done once this node follows `to`; `replicating`: `to` must be (the
    failback waits for it)."""
    def plan(before, g):
        if g["role"] == "secondary" and g["source"] == to:
            return None
        if g["role"] != "primary":
            raise AgentError(f"group {name} is {g['role']} on {before['node']} (source "
                             f"{g['source']}); run the {op} on the primary")
        target = next((t for t in g["targets"] if t["node"] == to), None)
        if target is None:
            raise AgentError(f"group {name} on node {before['node']} does not ship to {to!r} "
                             f"(targets: {', '.join(before['targets']) or 'none'})")
        if replicating and target["state"] != "replicating":
            raise AgentError(f"{to} is {target['state']}: a {op} needs it replicating")
        return {**before, "role": "secondary", "role_from": "runtime", "source": to,
                "targets": []}
    return plan
