"""Agent configuration: load YAML, validate every key, and return typed objects.

Errors name the key path and what was expected, e.g.
    groups[0].targets[1].mode: expected one of sync, async; got 'asnyc'
`replicator config check` and the agent share this code, so they refuse the same files.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

import yaml

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, None: 1}

# sync: a write completes once the target has it too; async: shipped from the journal as
# soon as durable; periodic: shipped every `interval` as one epoch, overwrites coalesced.
MODES = ("sync", "async", "periodic")
CAPTURES = ("nbd", "watch")  # how a volume's writes reach the journal (README: choosing)
# How a watched group finds a consistent point: a reflink clone of each file, freeze/thaw
# hooks around a hashing pass, or nothing at all (crash-inconsistent).
CONSISTENCIES = ("reflink", "hooks", "none")
ROLES = ("primary", "secondary", "bunker")  # bunker: journal only, no volumes
COMPRESSIONS = ("none", "zstd")
# How a resync starts (a new target's initial sync, or one an operator asks for): send
# every region, every region whose checksum differs, or nothing (the target is declared
# identical; only later writes are sent).
RESYNC_MODES = ("full", "checksum", "assume-clean")
ON_DISCONNECT = ("continue", "block")  # block: writes wait while the target is not streaming
# What a streaming target over its max_lag_seconds / max_lag_bytes does to writes: nothing
# but an event and a metric, slow them to what the target takes, or hold them.
ON_LAG = ("alert", "throttle", "block")
ALLOCATIONS = ("preallocate", "check", "sparse")  # how an image file's blocks are allocated
DURABILITIES = ("flush", "write")  # when a write completes: see GroupConfig.durability
# What a near replica computes for a far target from each write and the content it
# overwrites (offload/codec.py): the difference, zstd of it, a checksum of that content
# (the far side checks it holds the same), encryption with the far link's key.
PROCESSING = ("delta", "zstd", "checksum", "encrypt")


class ConfigError(Exception):
    def __init__(self, path: str, message: str):
        super().__init__(f"{path}: {message}" if path else message)
        self.key_path = path


@dataclass(frozen=True)
class VolumeConfig:
    name: str
    path: str
    size: int
    allocation: str = "preallocate"  # see volume.py: preallocate | check | sparse
    capture: str = "nbd"  # nbd: written through the NBD server; watch: a file programs write


@dataclass(frozen=True)
class TargetConfig:
    node: str
    mode: str
    compress: str = "none"
    initial_sync: str = "full"
    on_disconnect: str = "continue"
    bunker: bool = False  # the target keeps only the journal (a sync copy of it)
    interval: float | None = None  # periodic: seconds between epochs
    # Processing offload (seed 000): what is done to the records for this target
    # (PROCESSING), on the node `via` (a near replica of the group, which returns them to
    # this node to relay), or, without via on a secondary, on this node as it receives them.
    via: str | None = None
    process: tuple[str, ...] = ()
    max_lag_seconds: float | None = None
    max_lag_bytes: int | None = None
    on_lag: str = "alert"


@dataclass(frozen=True)
class GroupConfig:
    name: str
    role: str
    source: str | None
    journal_size: int
    volumes: tuple[VolumeConfig, ...]
    targets: tuple[TargetConfig, ...]
    bitmap_granularity: int = 64 << 10
    logging_high_water: int = 0  # lag in journal bytes that switches a target to logging
    resync_rate: int = 0  # bytes per second per resync; 0: unlimited
    bunker: str | None = None  # the node whose journal a takeover here replays first
    # Other members of the group, besides source, targets and bunker: nodes that may read
    # this node's journal (FETCH), e.g. the far replicas a bunker serves at a takeover.
    members: tuple[str, ...] = ()
    # The durability contract (DESIGN.md): "flush" completes a write once journaled (FLUSH
    # and FUA are the durability points); "write" makes every write durable first.
    durability: str = "flush"
    commit_interval: float = 1.0  # seconds an unflushed write may stay not durable
    # Watched groups (capture: watch): how a consistent point is found, how often an
    # epoch is taken (at most `epoch_interval` after the first change, or once the files
    # were `quiet` that long), and the hooks run around it.
    consistency: str = "reflink"
    epoch_interval: float = 10.0
    quiet: float = 1.0
    freeze: str | None = None
    thaw: str | None = None
    hook_timeout: float = 30.0
    # Processing offload: the key (a file of 64 hex digits) of each far link whose
    # records are encrypted, by far node: on the near node that encrypts them and on the
    # far node that decrypts them (the primary relaying them has none).
    link_keys: dict = field(default_factory=dict)


@dataclass(frozen=True)
class TlsConfig:
    ca: str
    cert: str
    key: str


@dataclass(frozen=True)
class Config:
    node: str
    listen: tuple[str, int]
    nbd_listen: tuple[str, int]
    state_dir: str
    admin_socket: str
    peers: dict[str, tuple[str, int]]
    groups: tuple[GroupConfig, ...]
    tls: TlsConfig | None  # None: plain TCP, chosen explicitly with `tls: false`
    heartbeat_interval: float = 1.0
    heartbeat_timeout: float = 5.0
    sync_ack_timeout: float = 10.0  # a sync target silent on ACKs this long leaves sync
    nbd_max_connections: int = 256  # NBD connections at once, handshaking ones included
    nbd_max_connections_per_export: int = 64  # of those, on one export
    nbd_handshake_timeout: float = 10.0  # a connection that picks no export is dropped
    log_level: str = "info"
    metrics_listen: tuple[str, int] | None = None
    stall_timeout: float = 60.0
    source_path: str = field(default="", compare=False)

    def group(self, name: str) -> GroupConfig:
        for g in self.groups:
            if g.name == name:
                return g
        raise KeyError(name)


def parse_size(value, path: str) -> int:
    if isinstance(value, bool):
        raise ConfigError(path, f"expected a size like 64MiB or a byte count; got {value!r}")
    if isinstance(value, int):
        n = value
    else:
        m = _SIZE_RE.match(str(value))
        if not m:
            raise ConfigError(path, f"expected a size like 64MiB or a byte count; got {value!r}")
        n = int(m.group(1)) * _UNITS[(m.group(2) or "")[:1].upper()]
    if n <= 0:
        raise ConfigError(path, f"expected a positive size; got {value!r}")
    return n


def parse_duration(value, path: str, low: float = 0.001, high: float = 86400.0) -> float:
    """Seconds from 10, 2.5, "10s", "500ms", "2m" or "1h", between low and high."""
    if isinstance(value, bool):
        raise ConfigError(path, f"expected a duration like 10s or 500ms; got {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        m = _DURATION_RE.match(str(value))
        if not m:
            raise ConfigError(path, f"expected a duration like 10s or 500ms; got {value!r}")
        seconds = float(m.group(1)) * _SECONDS[m.group(2)]
    if not low <= seconds <= high:
        raise ConfigError(path, f"expected between {low:g}s and {high:g}s; got {value!r}")
    return seconds


def parse_address(value, path: str) -> tuple[str, int]:
    if not isinstance(value, str) or ":" not in value:
        raise ConfigError(path, f"expected HOST:PORT; got {value!r}")
    host, _, port = value.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(path, f"expected HOST:PORT with a port 1..65535; got {value!r}")
    return host, int(port)


class _Reader:
    """Walks a mapping, tracks the key path, and rejects keys nobody read."""

    def __init__(self, data, path: str):
        if not isinstance(data, dict):
            raise ConfigError(path, f"expected a mapping; got {type(data).__name__}")
        self.data, self.path, self.seen = data, path, set()

    def sub(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def get(self, key: str, default=..., *, types=None):
        self.seen.add(key)
        if key not in self.data or self.data[key] is None and default is not ...:
            if default is ...:
                raise ConfigError(self.sub(key), "required key is missing")
            return default
        value = self.data[key]
        if types and not isinstance(value, types) or isinstance(value, bool) and bool not in (types or ()):
            names = " or ".join(t.__name__ for t in types) if types else "a value"
            raise ConfigError(self.sub(key), f"expected {names}; got {value!r}")
        return value

    def name(self, key: str) -> str:
        value = self.get(key, types=(str,))
        if not NAME_RE.match(value):
            raise ConfigError(self.sub(key), "expected a name of letters, digits, '.', '_', "
                                             f"'-' (max 63, starting alphanumeric); got {value!r}")
        return value

    def choice(self, key: str, choices, default=...) -> str:
        value = self.get(key, default, types=(str,))
        if value not in choices:
            raise ConfigError(self.sub(key), f"expected one of {', '.join(choices)}; got {value!r}")
        return value

    def done(self) -> None:
        unknown = sorted(set(map(str, self.data)) - self.seen)
        if unknown:
            raise ConfigError(self.sub(unknown[0]), "unknown key (typo?)")


def _items(value, path: str) -> list:
    if not isinstance(value, list):
        raise ConfigError(path, f"expected a list; got {type(value).__name__}")
    return value


def _volume(data, path: str, allocation: str) -> VolumeConfig:
    r = _Reader(data, path)
    vol_path = r.get("path", types=(str,))
    if not os.path.isabs(vol_path):
        raise ConfigError(r.sub("path"), f"expected an absolute path; got {vol_path!r}")
    size = parse_size(r.get("size"), r.sub("size"))
    if size % 512:
        raise ConfigError(r.sub("size"), f"expected a multiple of 512 bytes; got {size}")
    v = VolumeConfig(name=r.name("name"), path=vol_path, size=size,
                     allocation=r.choice("allocation", ALLOCATIONS, allocation),
                     capture=r.choice("capture", CAPTURES, "nbd"))
    r.done()
    return v


def _target(data, path: str, node: str, peers) -> TargetConfig:
    r = _Reader(data, path)
    target = r.name("node")
    if target == node:
        raise ConfigError(r.sub("node"), f"a group cannot target its own node {node!r}")
    if target not in peers:
        raise ConfigError(r.sub("node"), f"{target!r} is not in peers (known: "
                                         f"{', '.join(sorted(peers)) or 'none'})")
    mode = r.choice("mode", MODES)
    interval = r.get("interval", None)
    if mode == "periodic":
        if interval is None:
            raise ConfigError(r.sub("interval"), "a periodic target needs an interval "
                                                 "(seconds between epochs, e.g. 30s)")
        interval = parse_duration(interval, r.sub("interval"), low=0.1)
    elif interval is not None:
        raise ConfigError(r.sub("interval"), f"only a periodic target has an interval "
                                             f"(this one is {mode})")
    t = TargetConfig(node=target, mode=mode,
                     compress=r.choice("compress", COMPRESSIONS, "none"),
                     initial_sync=r.choice("initial_sync", RESYNC_MODES, "full"),
                     on_disconnect=r.choice("on_disconnect", ON_DISCONNECT, "continue"),
                     bunker=r.get("bunker", False, types=(bool,)), interval=interval,
                     **_offload(r, mode), **_lag_limits(r))
    if t.bunker and t.mode != "sync":
        raise ConfigError(r.sub("bunker"), "a bunker keeps a synchronous copy of the journal: "
                                           "its mode must be sync")
    r.done()
    return t


def _lag_limits(r: _Reader) -> dict:
    seconds, nbytes = r.get("max_lag_seconds", None), r.get("max_lag_bytes", None)
    out = {"max_lag_seconds": None if seconds is None else
           parse_duration(seconds, r.sub("max_lag_seconds"), low=0.1),
           "max_lag_bytes": None if nbytes is None else parse_size(nbytes, r.sub("max_lag_bytes")),
           "on_lag": r.choice("on_lag", ON_LAG, "alert")}
    return out


def _offload(r: _Reader, mode: str) -> dict:
    """A target's `via` and `process`, checked on their own (_group checks them against
    the other targets)."""
    via = r.get("via", None, types=(str,))
    process = r.get("process", [], types=(list,))
    for i, op in enumerate(process):
        if op not in PROCESSING:
            raise ConfigError(f"{r.sub('process')}[{i}]",
                              f"expected one of {', '.join(PROCESSING)}; got {op!r}")
    if len(set(process)) != len(process):
        raise ConfigError(r.sub("process"), f"an operation is named twice: {process}")
    if via is not None and not process:
        raise ConfigError(r.sub("via"), "a target processed via a near replica needs "
                                        f"`process` (some of {', '.join(PROCESSING)})")
    if process and mode != "async":
        raise ConfigError(r.sub("process"), "only an async target's records are processed "
                                            f"(this one is {mode}: a periodic link coalesces "
                                            "them, a sync one cannot wait for a near node)")
    return {"via": via, "process": tuple(op for op in PROCESSING if op in process)}


def _tls(r: _Reader) -> TlsConfig | None:
    expected = ("expected a mapping {ca, cert, key} of PEM file paths (mutual TLS), "
                "or false for plain TCP")
    r.seen.add("tls")
    if "tls" not in r.data:
        raise ConfigError("tls", f"required key is missing: {expected}")
    value = r.data["tls"]
    if value is False:
        return None
    if not isinstance(value, dict):
        raise ConfigError("tls", f"{expected}; got {value!r}")
    t = _Reader(value, "tls")
    paths = {}
    for key in ("ca", "cert", "key"):
        paths[key] = t.get(key, types=(str,))
        if not os.path.isabs(paths[key]):
            raise ConfigError(t.sub(key), f"expected an absolute path; got {paths[key]!r}")
    t.done()
    return TlsConfig(**paths)


def _group(data, path: str, node: str, peers) -> GroupConfig:
    r = _Reader(data, path)
    name = r.name("name")
    role = r.choice("role", ROLES)
    source = r.get("source", None, types=(str,))
    if role in ("secondary", "bunker"):
        if source is None:
            raise ConfigError(r.sub("source"), f"a {role} needs the node allowed to ship to it")
        if source not in peers:
            raise ConfigError(r.sub("source"), f"{source!r} is not in peers")
    elif source is not None:
        raise ConfigError(r.sub("source"), "only a secondary or bunker has a source; set it "
                                           "to null")
    journal_size = parse_size(r.get("journal_size", "256MiB"), r.sub("journal_size"))
    if journal_size < (16 << 20):
        raise ConfigError(r.sub("journal_size"), f"expected at least 16MiB; got {journal_size}")
    allocation = r.choice("allocation", ALLOCATIONS, "preallocate")
    volumes = [_volume(v, f"{r.sub('volumes')}[{i}]", allocation)
               for i, v in enumerate(_items(r.get("volumes", []), r.sub("volumes")))]
    if role == "bunker" and volumes:
        raise ConfigError(r.sub("volumes"), "a bunker keeps only the journal: no volumes")
    if role != "bunker" and not volumes:
        raise ConfigError(r.sub("volumes"), "a group needs at least one volume")
    targets = [_target(t, f"{r.sub('targets')}[{i}]", node, peers)
               for i, t in enumerate(_items(r.get("targets", []), r.sub("targets")))]
    for key, items in (("volumes", [v.name for v in volumes]),
                       ("targets", [t.node for t in targets])):
        dup = {x for x in items if items.count(x) > 1}
        if dup:
            raise ConfigError(r.sub(key), f"duplicate name {sorted(dup)[0]!r}")
    if source is not None and source in {t.node for t in targets}:
        raise ConfigError(r.sub("targets"), f"{source!r} is this group's source; a target "
                                             "cannot also be the source (loop)")
    _check_vias(targets, role, r.sub("targets"))
    granularity = parse_size(r.get("bitmap_granularity", "64KiB"), r.sub("bitmap_granularity"))
    if granularity < 4096 or granularity & (granularity - 1):
        raise ConfigError(r.sub("bitmap_granularity"),
                          f"expected a power of two of at least 4KiB; got {granularity}")
    high_water = parse_size(r.get("logging_high_water", journal_size * 3 // 4),
                            r.sub("logging_high_water"))
    if high_water >= journal_size:
        raise ConfigError(r.sub("logging_high_water"),
                          f"expected less than journal_size ({journal_size}); got {high_water}")
    bunker = r.get("bunker", None, types=(str,))
    if bunker is not None and bunker not in peers:
        raise ConfigError(r.sub("bunker"), f"{bunker!r} is not in peers")
    rate = r.get("resync_rate", 0)
    rate = 0 if rate in (0, "0", "unlimited") else parse_size(rate, r.sub("resync_rate"))
    members = r.get("members", [], types=(list,))
    for i, member in enumerate(members):
        if not isinstance(member, str) or member not in peers:
            raise ConfigError(f"{r.sub('members')}[{i}]", f"{member!r} is not in peers")
    link_keys = r.get("link_keys", {}, types=(dict,))
    for far, key_path in link_keys.items():
        if far not in peers and far != node:
            raise ConfigError(f"{r.sub('link_keys')}.{far}", f"{far!r} is not in peers")
        if not isinstance(key_path, str) or not os.path.isabs(key_path):
            raise ConfigError(f"{r.sub('link_keys')}.{far}",
                              f"expected an absolute path; got {key_path!r}")
    durability = r.choice("durability", DURABILITIES, "flush")
    watch = _watch(r, volumes)
    if any(v.capture == "watch" for v in volumes) and any(t.process for t in targets):
        raise ConfigError(r.sub("targets"), "a watched group's epochs are shipped as they "
                                            "are: no target of it is processed (process, via)")
    commit_interval = r.get("commit_interval", 1.0, types=(int, float))
    if isinstance(commit_interval, bool) or not 0.001 <= commit_interval <= 60:
        raise ConfigError(r.sub("commit_interval"),
                          f"expected seconds between 0.001 and 60; got {commit_interval!r}")
    r.done()
    return GroupConfig(name=name, role=role, source=source, journal_size=journal_size,
                       volumes=tuple(volumes), targets=tuple(targets),
                       bitmap_granularity=granularity, logging_high_water=high_water,
                       resync_rate=rate, bunker=bunker, members=tuple(members),
                       durability=durability, commit_interval=float(commit_interval),
                       link_keys=dict(link_keys), **watch)


def _check_vias(targets: list[TargetConfig], role: str, path: str) -> None:
    """A `via` is another target of the group that holds volumes, streamed record by
    record; `process` without one means this node processes as it receives: a secondary."""
    by_node = {t.node: t for t in targets}
    for i, t in enumerate(targets):
        where = f"{path}[{i}]"
        if t.via is None and t.process and role != "secondary":
            raise ConfigError(f"{where}.process", "only a secondary processes what it "
                                                  "receives for its own target; a "
                                                  f"{role} names a near replica (via)")
        if t.via is None:
            continue
        near = by_node.get(t.via)
        if near is None or near is t:
            raise ConfigError(f"{where}.via", f"{t.via!r} is not another target of this "
                                              "group: the near replica must be one")
        if near.bunker or near.mode == "periodic" or near.via is not None:
            raise ConfigError(f"{where}.via", f"{t.via!r} cannot process for {t.node}: a "
                                              "near replica holds the volumes and is sent "
                                              "every record directly (sync or async, no "
                                              "bunker, no via of its own)")


def _watch(r: _Reader, volumes: list[VolumeConfig]) -> dict:
    """The watched-group keys, checked: a group's volumes are all watched or none is."""
    keys = ("consistency", "interval", "quiet", "freeze", "thaw", "hook_timeout")
    captures = {v.capture for v in volumes}
    if len(captures) > 1:
        raise ConfigError(r.sub("volumes"), "a group's volumes are all capture: watch or all "
                                            "capture: nbd (write order across both cannot "
                                            "be kept)")
    if captures != {"watch"}:
        for key in keys:
            if r.get(key, None) is not None:
                raise ConfigError(r.sub(key), "only a group of watched volumes (capture: "
                                              "watch) has this key")
        return {}
    out = {"consistency": r.choice("consistency", CONSISTENCIES, "reflink"),
           "epoch_interval": parse_duration(r.get("interval", 10), r.sub("interval"), low=0.1),
           "quiet": parse_duration(r.get("quiet", 1), r.sub("quiet")),
           "hook_timeout": parse_duration(r.get("hook_timeout", 30), r.sub("hook_timeout"))}
    for key in ("freeze", "thaw"):
        out[key] = r.get(key, None, types=(str,))
    if out["consistency"] == "hooks" and not (out["freeze"] and out["thaw"]):
        raise ConfigError(r.sub("freeze"), "consistency hooks needs both a freeze and a thaw "
                                           "command (e.g. fsfreeze -f /mnt, fsfreeze -u /mnt)")
    if bool(out["freeze"]) != bool(out["thaw"]):
        raise ConfigError(r.sub("thaw" if out["freeze"] else "freeze"),
                          "freeze and thaw go together: every freeze must be undone")
    return out


def parse(data, source_path: str = "") -> Config:
    """Validate a decoded YAML document and build the Config."""
    r = _Reader(data if data is not None else {}, "")
    node = r.name("node")
    listen = parse_address(r.get("listen"), "listen")
    nbd_listen = parse_address(r.get("nbd_listen"), "nbd_listen")
    state_dir = r.get("state_dir", "/var/lib/replicator", types=(str,))
    if not os.path.isabs(state_dir):
        raise ConfigError("state_dir", f"expected an absolute path; got {state_dir!r}")
    admin_socket = r.get("admin_socket", os.path.join(state_dir, "admin.sock"), types=(str,))
    if len(admin_socket.encode()) > 100:
        raise ConfigError("admin_socket", "path too long for a unix socket (max 100 bytes)")
    peers_raw = r.get("peers", {}, types=(dict,))
    peers = {}
    for peer, addr in peers_raw.items():
        if not isinstance(peer, str) or not NAME_RE.match(peer):
            raise ConfigError(f"peers.{peer}", "expected a node name as key")
        peers[peer] = parse_address(addr, f"peers.{peer}")
    groups = [_group(g, f"groups[{i}]", node, peers)
              for i, g in enumerate(_items(r.get("groups", []), "groups"))]
    names = [g.name for g in groups]
    for i, g in enumerate(groups):
        if names.count(g.name) > 1:
            raise ConfigError(f"groups[{i}].name", f"duplicate group {g.name!r}")
    paths: dict[str, str] = {}
    exports: dict[str, str] = {}  # the volume name is the NBD export name
    for i, g in enumerate(groups):
        for j, v in enumerate(g.volumes):
            where = f"groups[{i}].volumes[{j}]"
            if v.path in paths:
                raise ConfigError(f"{where}.path", f"{v.path} is already used by {paths[v.path]}")
            if v.name in exports:
                raise ConfigError(f"{where}.name", f"volume {v.name!r} already exists in "
                                                   f"{exports[v.name]} (volume names are NBD "
                                                   "export names: unique per node)")
            paths[v.path] = where
            exports[v.name] = where
    interval = r.get("heartbeat_interval", 1.0, types=(int, float))
    timeout = r.get("heartbeat_timeout", 5.0, types=(int, float))
    if not 0 < interval < timeout:
        raise ConfigError("heartbeat_timeout", "expected 0 < heartbeat_interval < heartbeat_timeout")
    sync_ack_timeout = r.get("sync_ack_timeout", 10.0, types=(int, float))
    if not interval < sync_ack_timeout:
        raise ConfigError("sync_ack_timeout", f"expected seconds more than heartbeat_interval "
                                              f"({interval:g}); got {sync_ack_timeout!r}")
    nbd_max = r.get("nbd_max_connections", 256, types=(int,))
    if nbd_max < 1:
        raise ConfigError("nbd_max_connections", f"expected at least 1; got {nbd_max}")
    nbd_per_export = r.get("nbd_max_connections_per_export", min(64, nbd_max), types=(int,))
    if not 1 <= nbd_per_export <= nbd_max:
        raise ConfigError("nbd_max_connections_per_export",
                          f"expected 1..nbd_max_connections ({nbd_max}); got {nbd_per_export}")
    nbd_handshake = r.get("nbd_handshake_timeout", 10.0, types=(int, float))
    if nbd_handshake <= 0:
        raise ConfigError("nbd_handshake_timeout", f"expected positive seconds; got {nbd_handshake}")
    log_level = r.choice("log_level", ("debug", "info", "warning", "error"), "info")
    metrics = r.get("metrics_listen", None)
    metrics = parse_address(metrics, "metrics_listen") if metrics is not None else None
    stall_timeout = parse_duration(r.get("stall_timeout", 60), "stall_timeout", low=0.5)
    tls = _tls(r)
    r.done()
    return Config(node=node, listen=listen, nbd_listen=nbd_listen, state_dir=state_dir,
                  admin_socket=admin_socket, peers=peers, groups=tuple(groups), tls=tls,
                  heartbeat_interval=float(interval), heartbeat_timeout=float(timeout),
                  sync_ack_timeout=float(sync_ack_timeout), nbd_max_connections=nbd_max,
                  nbd_max_connections_per_export=nbd_per_export,
                  nbd_handshake_timeout=float(nbd_handshake),
                  log_level=log_level, metrics_listen=metrics, stall_timeout=stall_timeout,
                  source_path=source_path)


def load(path: str) -> Config:
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except OSError as exc:
        raise ConfigError("", f"cannot read {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError("", f"{path} is not valid YAML: {exc}") from None
    return parse(data, source_path=path)
