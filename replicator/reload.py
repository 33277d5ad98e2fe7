"""Reload: what changed between the running config and the file, and whether the agent
can take it live (`replicator reload`, SIGHUP; like `drbdadm adjust`).

A config is flattened into keys, tuples of path segments, e.g.
    ("heartbeat_timeout",)  ("peers", "dc2")  ("groups", "db", "targets", "dc2", "mode")
where a group, a volume, a target and a peer are found by name, never by position (a
list reordered changes nothing). A group, volume, target or peer there on one side only
is one change of its own key, ("groups", "db", "targets", "dc3"), from None or to None.

KEYS says of each key whether the running agent takes it live or needs a restart. A key
it does not name needs a restart: a new config field is never applied live by accident
(tests/unit/test_reload.py checks that every field is named). The reload applies all of
a file or nothing: one key that needs a restart and nothing is applied.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

from .config import Config, _address_text

LIVE, RESTART = "live", "restart"
ANY = "*"  # in a KEYS pattern: any one name (a group's, a target's, a peer's)

# Collections found by name: field -> the field of an item that names it.
_NAMED_BY = {"groups": "name", "volumes": "name", "targets": "node"}
_ADDRESSES = ("listen", "nbd_listen", "nbd_tls_listen", "metrics_listen")  # (host, port): shown as HOST:PORT

KEYS: dict[tuple[str, ...], str] = {
    # What the agent is: its identity, where it listens and keeps its state, where its
    # TLS files are and its log's plumbing.
    ("node",): RESTART,
    ("listen",): RESTART,
    ("nbd_listen",): RESTART,
    ("metrics_listen",): RESTART,
    ("state_dir",): RESTART,
    ("admin_socket",): RESTART,
    ("nbd_tls_listen",): RESTART,
    ("nbd_socket",): RESTART,
    ("nbd_socket_mode",): RESTART,
    ("nbd_socket_group",): RESTART,
    ("tls",): RESTART,  # where the files are; what they hold is read again at every reload
    # The address book: admission reads it at each HELLO; a target's shipper whose
    # address changed reconnects there.
    ("peers", ANY): LIVE,
    # Link timers: every shipper reconnects with them (the receiver takes them at once).
    ("heartbeat_interval",): LIVE,
    ("heartbeat_timeout",): LIVE,
    ("sync_ack_timeout",): LIVE,
    ("stall_timeout",): LIVE,
    # NBD admission: read at each accept and handshake; connections open stay.
    ("nbd_max_connections",): LIVE,
    ("nbd_max_connections_per_export",): LIVE,
    ("nbd_handshake_timeout",): LIVE,
    ("nbd_clients",): LIVE,  # read at each TLS client's LIST, INFO and GO
    ("log_level",): LIVE,
    # A group added or removed: its journal, volumes and exports are opened at start.
    ("groups", ANY): RESTART,
    ("groups", ANY, "role"): RESTART,  # role changes are operator acts (promote, demote)
    ("groups", ANY, "source"): RESTART,
    ("groups", ANY, "journal_size"): RESTART,
    ("groups", ANY, "volumes", ANY): RESTART,
    ("groups", ANY, "volumes", ANY, "path"): RESTART,
    ("groups", ANY, "volumes", ANY, "size"): RESTART,
    ("groups", ANY, "volumes", ANY, "allocation"): RESTART,
    ("groups", ANY, "volumes", ANY, "capture"): RESTART,
    ("groups", ANY, "bitmap_granularity"): RESTART,  # every saved bitmap has the old one
    ("groups", ANY, "durability"): RESTART,
    ("groups", ANY, "commit_interval"): RESTART,
    ("groups", ANY, "consistency"): RESTART,
    ("groups", ANY, "epoch_interval"): RESTART,
    ("groups", ANY, "quiet"): RESTART,
    ("groups", ANY, "freeze"): RESTART,
    ("groups", ANY, "thaw"): RESTART,
    ("groups", ANY, "hook_timeout"): RESTART,
    ("groups", ANY, "link_keys"): RESTART,  # an offload session keys its link once
    ("groups", ANY, "retain_seconds"): RESTART,
    ("groups", ANY, "retain_bytes"): RESTART,
    ("groups", ANY, "apply_delay"): RESTART,
    # Read by the group, its shippers and admission as they go.
    ("groups", ANY, "resync_rate"): LIVE,
    ("groups", ANY, "logging_high_water"): LIVE,
    ("groups", ANY, "bunker"): LIVE,
    ("groups", ANY, "members"): LIVE,
    # A target added or removed: its shipper started or stopped (its position and
    # bitmap kept for when it comes back). A changed one's shipper reconnects with it.
    ("groups", ANY, "targets", ANY): LIVE,
    ("groups", ANY, "targets", ANY, "mode"): LIVE,
    ("groups", ANY, "targets", ANY, "interval"): LIVE,
    ("groups", ANY, "targets", ANY, "compress"): LIVE,
    ("groups", ANY, "targets", ANY, "compress_level"): LIVE,
    ("groups", ANY, "targets", ANY, "initial_sync"): LIVE,
    ("groups", ANY, "targets", ANY, "on_disconnect"): LIVE,
    ("groups", ANY, "targets", ANY, "max_lag_seconds"): LIVE,
    ("groups", ANY, "targets", ANY, "max_lag_bytes"): LIVE,
    ("groups", ANY, "targets", ANY, "on_lag"): LIVE,
    ("groups", ANY, "targets", ANY, "bunker"): RESTART,  # what the target keeps at all
    ("groups", ANY, "targets", ANY, "via"): RESTART,  # relays are shared with the receiver
    ("groups", ANY, "targets", ANY, "process"): RESTART,
}


class Change(NamedTuple):
    """One key whose value differs: `old` or `new` is None where it is absent."""
    path: tuple[str, ...]
    old: object
    new: object

    @property
    def key(self) -> str:
        return key_text(self.path)

    def as_dict(self) -> dict:
        return {"key": self.key, "from": self.old, "to": self.new}


def classify(path: tuple[str, ...]) -> str:
    """LIVE or RESTART for a key; RESTART for any key KEYS does not name."""
    for pattern, how in KEYS.items():
        if len(pattern) == len(path) and all(p in (ANY, s) for p, s in zip(pattern, path)):
            return how
    return RESTART


def key_text(path: tuple[str, ...]) -> str:
    """A key as an operator reads it: groups[db].targets[dc2].mode, peers[dc2]."""
    out = ""
    for i, segment in enumerate(path):
        if i and (path[i - 1] in _NAMED_BY or path[i - 1] == "peers"):
            out += f"[{segment}]"
        else:
            out += f".{segment}" if out else segment
    return out


def _plain(value):
    """A config value as JSON has it (tuples as lists, dataclasses as mappings)."""
    if dataclasses.is_dataclass(value):
        return {k: _plain(v) for k, v in dataclasses.asdict(value).items()}
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def _flatten(obj, prefix: tuple[str, ...], values: dict, named: set) -> None:
    """Every key of the dataclass `obj` under `prefix` into `values`; the keys of items
    found by name (groups, volumes, targets, peers) also into `named`."""
    for f in dataclasses.fields(obj):
        if not f.compare:  # source_path: where it was read, not what it says
            continue
        value, key = getattr(obj, f.name), prefix + (f.name,)
        if f.name in _NAMED_BY:
            for item in value:
                item_key = key + (getattr(item, _NAMED_BY[f.name]),)
                values[item_key] = _plain(item)
                named.add(item_key)
                _flatten(item, item_key, values, named)
        elif f.name == "peers":
            for peer, address in value.items():
                values[key + (peer,)] = _address_text(address)
        elif f.name in _ADDRESSES and value is not None:
            values[key] = _address_text(value)
        else:
            values[key] = _plain(value)


def diff(old: Config, new: Config) -> list[Change]:
    """What differs from `old` to `new`, sorted by key: a named item present on one side
    only is one change (its keys are not listed as well)."""
    a, b, named = {}, {}, set()
    _flatten(old, (), a, named)
    _flatten(new, (), b, named)
    one_sided = {k for k in named if (k in a) != (k in b)}
    changes = []
    for key in sorted(a.keys() | b.keys()):
        if any(key[:n] in one_sided for n in range(1, len(key))):
            continue  # inside an item added or removed: that item is the change
        if key in named and key not in one_sided:
            continue  # an item on both sides: its keys say what changed
        if a.get(key) != b.get(key):
            changes.append(Change(key, a.get(key), b.get(key)))
    return changes


def restart_required(changes: list[Change]) -> list[str]:
    """The keys of `changes` the running agent cannot take live."""
    return [c.key for c in changes if classify(c.path) == RESTART]


def outcome(changes: list[Change], *, dry_run: bool, reloaded: bool = False,
            errors: list[str] | tuple = ()) -> dict:
    """The answer of a reload (the CLI's --json): what changed, whether it was applied,
    what needs a restart, what is wrong with the file."""
    return {"reloaded": reloaded, "dry_run": dry_run,
            "changes": [c.as_dict() for c in changes],
            "restart_required": restart_required(changes), "errors": list(errors)}
