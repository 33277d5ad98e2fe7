"""Agent configuration: load YAML, validate every key, and return typed objects.

Errors name the key path and what was expected, e.g.
    groups[0].targets[1].mode: expected one of sync, async; got 'asnyc'
Every error of a file is reported at once: a check that fails notes its error and the
parse goes on, with the key that failed read as its default (or as unknown, None, when
it has none: the checks that depend on it are skipped rather than failing in its wake).
`replicator config check` and the agent share this code, so they refuse the same files.
"""

from __future__ import annotations

import ipaddress
import os
import re
import sys
from dataclasses import dataclass, field

import yaml

from .sizes import size_text

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_FLOAT_MAX = sys.float_info.max
_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}
MAX_RETAIN_SECONDS = 366 * 86400  # a year of history: more is a typo
MIN_RETAIN_BYTES = 16 << 20  # less holds no more than a step or two
MAX_SIZE = 1 << 50  # 1024TiB: more is a typo, and past float range it is no size at all

# sync: a write completes once the target has it too; async: shipped from the journal as
# soon as durable; periodic: shipped every `interval` as one epoch, overwrites coalesced.
MODES = ("sync", "async", "periodic")
CAPTURES = ("nbd", "watch")  # how a volume's writes reach the journal (README: choosing)
# How a watched group finds a consistent point: a reflink clone of each file, freeze/thaw
# hooks around a hashing pass, or nothing at all (crash-inconsistent).
CONSISTENCIES = ("reflink", "hooks", "none")
ROLES = ("primary", "secondary", "bunker")  # bunker: journal only, no volumes
COMPRESSIONS = ("none", "zstd")
# zstd levels a target's records may be compressed with (compress_level): 1, the default,
# is the fastest (on the primary they are compressed on the write path); 19 the smallest
# below zstd's "ultra" levels, which need far more memory on both ends.
ZSTD_LEVELS = (1, 19)
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
WILDCARDS = ("0.0.0.0", "::")  # a listener on one of these takes its port on every address


class ConfigError(Exception):
    """What is wrong with a config: one or more (key path, message) pairs, in the order
    found. str() gives them all, one a line; key_path is the first one's path."""

    def __init__(self, path: str, message: str, more: list[tuple[str, str]] | tuple = ()):
        self.errors = [(path, message), *more]
        super().__init__("\n".join(f"{p}: {m}" if p else m for p, m in self.errors))
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
    compress_level: int = ZSTD_LEVELS[0]  # zstd's level, with compress: zstd
    initial_sync: str = "full"
    on_disconnect: str = "continue"
    bunker: bool = False  # the target keeps only the journal (a sync copy of it)
    interval: float | None = None  # periodic: seconds between epochs
    # Processing offload (seed 000): what is done to the records for this target
    # (PROCESSING), on the node `via` (a near replica of the group, which returns them to
    # this node to relay), or, without via on a secondary, on this node as it receives them.
    via: str | None = None
    process: tuple[str, ...] = ()
    # Lag limits (issue 18): over either, `on_lag` acts (ON_LAG). None: no limit.
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
    # Point in time on a secondary (group/history.py): how far back it can rewind (seconds
    # of history, or bytes of journal and old block content; 0: no history), and how
    # long a record waits, journaled, before it is applied to the volumes.
    retain_seconds: float = 0.0
    retain_bytes: int = 0
    apply_delay: float = 0.0


@dataclass(frozen=True)
class TlsConfig:
    ca: str
    cert: str
    key: str
    crl: str | None = None  # a revocation list of the CA (`replicator pki revoke`), PEM


@dataclass(frozen=True)
class NbdGrant:
    """What one NBD client (the CN of its `pki issue --client` certificate) may open on
    nbd_tls_listen: these exports ("*": every one), read-write or read-only. A replica's
    export is read-only whatever the grant."""
    exports: tuple[str, ...]
    write: bool


@dataclass(frozen=True)
class Config:
    node: str
    listen: tuple[str, int]
    nbd_listen: tuple[str, int] | None  # plain NBD: loopback addresses only
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
    # The other NBD listeners: a unix socket (its mode and group), and NBD with TLS only
    # (STARTTLS before any other option; a client certificate of the CA, granted exports
    # by nbd_clients: client name -> NbdGrant).
    nbd_socket: str | None = None
    nbd_socket_mode: int = 0o660
    nbd_socket_group: str | None = None
    nbd_tls_listen: tuple[str, int] | None = None
    nbd_clients: dict = field(default_factory=dict)
    log_level: str = "info"
    metrics_listen: tuple[str, int] | None = None  # the Prometheus endpoint; None: off
    stall_timeout: float = 60.0  # a target with a backlog, no ack progress this long: reconnected
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
    if n > MAX_SIZE:
        raise ConfigError(path, f"expected at most {size_text(MAX_SIZE)}; got {value!r}")
    return n


def parse_duration(value, path: str, low: float = 0.001, high: float = 86400.0) -> float:
    """Seconds from 10, 2.5, "10s", "500ms", "2m" or "1h", between low and high."""
    if isinstance(value, bool):
        raise ConfigError(path, f"expected a duration like 10s or 500ms; got {value!r}")
    if isinstance(value, (int, float)):
        try:
            seconds = float(value)
        except OverflowError:  # an int past the float range: out of range anyway
            seconds = float("inf")
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
    if not host or not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        raise ConfigError(path, f"expected HOST:PORT with a port 1..65535; got {value!r}")
    return host, int(port)


def _address_text(address: tuple[str, int]) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _clash(a: tuple[str, int], b: tuple[str, int]) -> bool:
    """Two listeners cannot both bind: the same port on the same host, or on any host
    when either is a wildcard."""
    return a[1] == b[1] and (a[0] == b[0] or a[0] in WILDCARDS or b[0] in WILDCARDS)


def _not_a_peer(name, peers: dict | None) -> bool:
    """`name` is not in peers; never said while peers itself is invalid (None): that one
    error is enough."""
    return peers is not None and name not in peers


class _Problems:
    """The errors found so far, in the order found."""

    def __init__(self):
        self.errors: list[tuple[str, str]] = []

    def add(self, path: str, message: str) -> None:
        self.errors.append((path, message))

    def raise_any(self) -> None:
        if self.errors:
            raise ConfigError(*self.errors[0], self.errors[1:])


class _Reader:
    """Walks a mapping, tracks the key path, notes what is wrong, and rejects keys nobody
    read. A key that fails reads as its default (None when required) and is in `bad`, so
    that the checks depending on it can be skipped."""

    def __init__(self, data: dict, path: str, problems: _Problems):
        self.data, self.path, self.problems = data, path, problems
        self.seen: set = set()
        self.bad: set[str] = set()

    @classmethod
    def of(cls, data, path: str, problems: _Problems) -> _Reader | None:
        """A reader of `data`, or None (the error noted) when it is not a mapping."""
        if not isinstance(data, dict):
            problems.add(path, f"expected a mapping; got {type(data).__name__}")
            return None
        return cls(data, path, problems)

    def sub(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def fail(self, key: str, message: str, default=None):
        """Note an error of `key`; returns `default`, what the key reads as from now on."""
        self.seen.add(key)
        self.bad.add(key)
        self.problems.add(self.sub(key), message)
        return default

    def given(self, key: str) -> bool:
        return self.data.get(key) is not None

    def get(self, key: str, default=..., *, types=None):
        self.seen.add(key)
        if key not in self.data or self.data[key] is None and default is not ...:
            if default is ...:
                return self.fail(key, "required key is missing")
            return default
        value = self.data[key]
        if types and not isinstance(value, types) or isinstance(value, bool) and bool not in (types or ()):
            names = " or ".join(t.__name__ for t in types) if types else "a value"
            return self.fail(key, f"expected {names}; got {value!r}",
                             None if default is ... else default)
        if types and float in types and isinstance(value, int) and abs(value) > _FLOAT_MAX:
            return self.fail(key, f"expected a number a float can hold; got one of "
                                  f"{len(str(abs(value)))} digits", None if default is ... else default)
        return value

    def check(self, key: str, parse, raw, **kwargs):
        """`raw` (the key's value) through parse(raw, key path) (parse_size,
        parse_duration, parse_address): its result, or None when it fails or is None."""
        if raw is None:
            return None
        try:
            return parse(raw, self.sub(key), **kwargs)
        except ConfigError as exc:
            self.bad.add(key)
            self.problems.errors.extend(exc.errors)
            return None

    def value(self, key: str, parse, default=..., **kwargs):
        """The key (or `default`, as written in a config) through `parse`; see check."""
        return self.check(key, parse, self.get(key, default), **kwargs)

    def name(self, key: str) -> str | None:
        value = self.get(key, types=(str,))
        if value is not None and not NAME_RE.match(value):
            return self.fail(key, "expected a name of letters, digits, '.', '_', '-' (max 63, "
                                  f"starting alphanumeric); got {value!r}")
        return value

    def choice(self, key: str, choices, default=...) -> str | None:
        value = self.get(key, default, types=(str,))
        if value is not None and value not in choices:
            return self.fail(key, f"expected one of {', '.join(choices)}; got {value!r}",
                             None if default is ... else default)
        return value

    def absolute_path(self, key: str, default=...) -> str | None:
        value = self.get(key, default, types=(str,))
        if value is not None and not os.path.isabs(value):
            return self.fail(key, f"expected an absolute path; got {value!r}")
        return value

    def done(self) -> None:
        for key in sorted(set(map(str, self.data)) - set(map(str, self.seen))):
            self.problems.add(self.sub(key), "unknown key (typo?)")


def _items(r: _Reader, key: str) -> list:
    value = r.get(key, [])
    if not isinstance(value, list):
        return r.fail(key, f"expected a list; got {type(value).__name__}", [])
    return value


def _volume(data, path: str, allocation: str, problems: _Problems) -> VolumeConfig | None:
    r = _Reader.of(data, path, problems)
    if r is None:
        return None
    vol_path = r.absolute_path("path")
    size = r.value("size", parse_size)
    if size is not None and size % 512:
        size = r.fail("size", f"expected a multiple of 512 bytes; got {size_text(size)}")
    v = VolumeConfig(name=r.name("name"), path=vol_path, size=size,
                     allocation=r.choice("allocation", ALLOCATIONS, allocation),
                     capture=r.choice("capture", CAPTURES, "nbd"))
    r.done()
    return v


def _target(data, path: str, node: str | None, peers: dict | None,
            problems: _Problems) -> TargetConfig | None:
    r = _Reader.of(data, path, problems)
    if r is None:
        return None
    target = r.name("node")
    if target is not None and target == node:
        r.fail("node", f"a group cannot target its own node {node!r}")
    elif target is not None and _not_a_peer(target, peers):
        r.fail("node", f"{target!r} is not in peers (known: {', '.join(sorted(peers)) or 'none'})")
    mode = r.choice("mode", MODES)
    interval = None
    if mode == "periodic":
        if not r.given("interval"):
            r.fail("interval", "a periodic target needs an interval (seconds between epochs, "
                               "e.g. 30s)")
        interval = r.value("interval", parse_duration, None, low=0.1)
    elif mode is not None and r.given("interval"):
        r.fail("interval", f"only a periodic target has an interval (this one is {mode})")
    r.seen.add("interval")
    compress = r.choice("compress", COMPRESSIONS, "none")
    level = r.get("compress_level", ZSTD_LEVELS[0], types=(int,))
    if not ZSTD_LEVELS[0] <= level <= ZSTD_LEVELS[1]:
        level = r.fail("compress_level", f"expected a zstd level {ZSTD_LEVELS[0]}.."
                                         f"{ZSTD_LEVELS[1]}; got {level}", ZSTD_LEVELS[0])
    elif r.given("compress_level") and compress == "none" and "compress" not in r.bad:
        r.fail("compress_level", "the level of zstd: only a target with compress: zstd has one")
    initial_sync = r.choice("initial_sync", RESYNC_MODES, "full")
    on_disconnect = r.choice("on_disconnect", ON_DISCONNECT, "continue")
    bunker = r.get("bunker", False, types=(bool,))
    if bunker and mode not in ("sync", None):
        r.fail("bunker", "a bunker keeps a synchronous copy of the journal: its mode must be sync")
    t = TargetConfig(node=target, mode=mode, compress=compress, compress_level=level,
                     initial_sync=initial_sync,
                     on_disconnect=on_disconnect, bunker=bunker, interval=interval,
                     **_offload(r, mode), **_lag_limits(r, mode, interval, bunker))
    r.done()
    return t


def _offload(r: _Reader, mode: str | None) -> dict:
    """A target's `via` and `process`, checked on their own (_group checks them against
    the other targets). When either fails, the target reads as not processed."""
    via = r.get("via", None, types=(str,))
    process = r.get("process", [], types=(list,))
    for i, op in enumerate(process):
        if op not in PROCESSING:
            r.problems.add(f"{r.sub('process')}[{i}]",
                           f"expected one of {', '.join(PROCESSING)}; got {op!r}")
            r.bad.add("process")
    if "process" not in r.bad and len(set(process)) != len(process):
        r.fail("process", f"an operation is named twice: {process}")
    if r.bad & {"via", "process"}:
        return {"via": None, "process": ()}
    if via is not None and not process:
        r.fail("via", "a target processed via a near replica needs `process` (some of "
                      f"{', '.join(PROCESSING)})")
    if process and mode not in ("async", None):
        r.fail("process", "only an async target's records are processed (this one is "
                          f"{mode}: a periodic link coalesces them, a sync one cannot wait "
                          "for a near node)")
        return {"via": via, "process": ()}
    return {"via": via, "process": tuple(op for op in PROCESSING if op in process)}


def _lag_limits(r: _Reader, mode: str | None, interval: float | None, bunker: bool) -> dict:
    """A target's max_lag_seconds, max_lag_bytes and what over them does (on_lag)."""
    seconds = r.value("max_lag_seconds", parse_duration, None, low=0.1)
    size = r.value("max_lag_bytes", parse_size, None)
    on_lag = r.choice("on_lag", ON_LAG, "alert")
    if r.given("on_lag") and not (r.given("max_lag_seconds") or r.given("max_lag_bytes")):
        r.fail("on_lag", "on_lag acts when the target is over a limit: set max_lag_seconds "
                         "or max_lag_bytes too")
    if mode == "periodic" and seconds is not None and interval is not None and seconds <= interval:
        r.fail("max_lag_seconds", f"a periodic target lags by up to its interval "
                                  f"({interval:g}s) by design: expected more than that; "
                                  f"got {seconds:g}s")
    if mode == "periodic" and on_lag == "throttle":
        r.fail("on_lag", "a periodic target drains in bursts, one epoch per interval: its "
                         "drain rate cannot pace writes; use alert or block")
    if bunker and on_lag in ("throttle", "block"):
        r.fail("on_lag", f"a bunker may not {on_lag} writes: its synchronous copy of the "
                         "journal is what a takeover replays, so it is kept in sync (or "
                         "resynced) and never traded against the writes; use on_lag: alert "
                         "(or on_disconnect: block)")
    return {"max_lag_seconds": seconds, "max_lag_bytes": size, "on_lag": on_lag}


def _tls(r: _Reader) -> TlsConfig | None:
    expected = ("expected a mapping {ca, cert, key[, crl]} of PEM file paths (mutual TLS), "
                "or false for plain TCP")
    if "tls" not in r.data:
        return r.fail("tls", f"required key is missing: {expected}")
    r.seen.add("tls")
    value = r.data["tls"]
    if value is False:
        return None
    if not isinstance(value, dict):
        return r.fail("tls", f"{expected}; got {value!r}")
    t = _Reader(value, "tls", r.problems)
    paths = {key: t.absolute_path(key) for key in ("ca", "cert", "key")}
    paths["crl"] = t.absolute_path("crl", None)
    t.done()
    return TlsConfig(**paths)


def _group(data, path: str, node: str | None, peers: dict | None,
           problems: _Problems) -> GroupConfig | None:
    r = _Reader.of(data, path, problems)
    if r is None:
        return None
    name = r.name("name")
    role = r.choice("role", ROLES)
    source = r.get("source", None, types=(str,))
    if role in ("secondary", "bunker"):
        if source is None and "source" not in r.bad:
            r.fail("source", f"a {role} needs the node allowed to ship to it")
        elif source is not None and _not_a_peer(source, peers):
            source = r.fail("source", f"{source!r} is not in peers")
    elif role is not None and source is not None:
        source = r.fail("source", "only a secondary or bunker has a source; set it to null")
    journal_size = r.value("journal_size", parse_size, "256MiB")
    if journal_size is not None and journal_size < (16 << 20):
        journal_size = r.fail("journal_size",
                              f"expected at least 16MiB; got {size_text(journal_size)}")
    allocation = r.choice("allocation", ALLOCATIONS, "preallocate")
    volumes = [v for i, raw in enumerate(_items(r, "volumes"))
               if (v := _volume(raw, f"{r.sub('volumes')}[{i}]", allocation, problems))]
    if "volumes" not in r.bad:
        if role == "bunker" and r.data.get("volumes"):
            r.fail("volumes", "a bunker keeps only the journal: no volumes")
        if role not in ("bunker", None) and not r.data.get("volumes"):
            r.fail("volumes", "a group needs at least one volume")
    targets = [t for i, raw in enumerate(_items(r, "targets"))
               if (t := _target(raw, f"{r.sub('targets')}[{i}]", node, peers, problems))]
    for key, items in (("volumes", [v.name for v in volumes]),
                       ("targets", [t.node for t in targets])):
        dup = {x for x in items if x is not None and items.count(x) > 1}
        if dup:
            r.fail(key, f"duplicate name {sorted(dup)[0]!r}")
    if source is not None and source in {t.node for t in targets}:
        r.fail("targets", f"{source!r} is this group's source; a target cannot also be the "
                          "source (loop)")
    _check_vias(targets, role, r)
    granularity = r.value("bitmap_granularity", parse_size, "64KiB")
    if granularity is not None and (granularity < 4096 or granularity & (granularity - 1)):
        r.fail("bitmap_granularity", f"expected a power of two of at least 4KiB; got "
                                     f"{size_text(granularity)}")
    high_water = r.value("logging_high_water", parse_size,
                         None if journal_size is None else journal_size * 3 // 4)
    if high_water is not None and journal_size is not None and high_water >= journal_size:
        r.fail("logging_high_water", f"expected less than journal_size "
                                     f"({size_text(journal_size)}); got {size_text(high_water)}")
    for i, t in enumerate(targets):
        if high_water is not None and t.max_lag_bytes is not None \
                and t.max_lag_bytes >= high_water:
            r.problems.add(f"{r.sub('targets')}[{i}].max_lag_bytes",
                           f"{size_text(t.max_lag_bytes)} would never be reached: at "
                           f"logging_high_water ({size_text(high_water)}) the target goes "
                           "to logging first; expected less")
    bunker = r.get("bunker", None, types=(str,))
    if bunker is not None and _not_a_peer(bunker, peers):
        r.fail("bunker", f"{bunker!r} is not in peers")
    rate = r.get("resync_rate", 0)
    rate = 0 if rate in (0, "0", "unlimited") else r.check("resync_rate", parse_size, rate)
    members = r.get("members", [], types=(list,))
    for i, member in enumerate(members):
        if not isinstance(member, str) or _not_a_peer(member, peers):
            problems.add(f"{r.sub('members')}[{i}]", f"{member!r} is not in peers")
    link_keys = r.get("link_keys", {}, types=(dict,))
    for far, key_path in link_keys.items():
        if far != node and _not_a_peer(far, peers):
            problems.add(f"{r.sub('link_keys')}.{far}", f"{far!r} is not in peers")
        elif not isinstance(key_path, str) or not os.path.isabs(key_path):
            problems.add(f"{r.sub('link_keys')}.{far}",
                         f"expected an absolute path; got {key_path!r}")
    durability = r.choice("durability", DURABILITIES, "flush")
    watch = _watch(r, volumes)
    if any(v.capture == "watch" for v in volumes) and any(t.process for t in targets):
        r.fail("targets", "a watched group's epochs are shipped as they are: no target of it "
                          "is processed (process, via)")
    commit_interval = r.get("commit_interval", 1.0, types=(int, float))
    if not 0.001 <= commit_interval <= 60:
        r.fail("commit_interval", f"expected seconds between 0.001 and 60; got {commit_interval!r}")
    point_in_time = _point_in_time(r, role)
    r.done()
    return GroupConfig(name=name, role=role, source=source, journal_size=journal_size,
                       volumes=tuple(volumes), targets=tuple(targets),
                       bitmap_granularity=granularity, logging_high_water=high_water,
                       resync_rate=rate, bunker=bunker, members=tuple(members),
                       durability=durability, commit_interval=float(commit_interval),
                       link_keys=dict(link_keys), **watch, **point_in_time)


def _point_in_time(r: _Reader, role: str | None) -> dict:
    """`retain` (a duration, or a size) and `apply_delay`: keys of a secondary."""
    out = {}
    raw = r.get("retain", None, types=(str,))
    if raw is not None:
        if _DURATION_RE.match(raw) and not raw.strip().isdigit():
            out["retain_seconds"] = r.check("retain", parse_duration, raw, low=1,
                                            high=MAX_RETAIN_SECONDS)
        elif raw.strip().isdigit():
            r.fail("retain", f"expected a time like 24h or a size like 20GiB; {raw!r} is "
                             "neither (say 3600s, or 3600B)")
        else:
            nbytes = out["retain_bytes"] = r.check("retain", parse_size, raw)
            if nbytes is not None and nbytes < MIN_RETAIN_BYTES:
                out["retain_bytes"] = r.fail("retain", f"expected at least "
                                                       f"{size_text(MIN_RETAIN_BYTES)} (the "
                                                       "window is dropped a file at a time); "
                                                       f"got {size_text(nbytes)}")
    delay = r.value("apply_delay", parse_duration, None, low=0, high=7 * 86400)
    if delay is not None:
        out["apply_delay"] = delay
    for key in ("retain", "apply_delay"):
        if key in r.data and key not in r.bad and role not in ("secondary", None):
            r.fail(key, f"a key of a secondary (its volumes keep the history); "
                        f"this node is the group's {role}")
    if out.get("apply_delay") and r.data.get("targets"):
        r.fail("apply_delay", "a delayed secondary's volumes are behind its journal: it cannot "
                              "resync or process for targets of its own (put the delay on a "
                              "leaf replica)")
    return {k: v for k, v in out.items() if v is not None}


def group_errors(data, node: str) -> list[tuple[str, str]]:
    """What is wrong with one group's config on `node`, as (key path within the group,
    message) pairs, checked on its own: node names are not looked up in peers. What a
    controller can check of each node's groups before it renders any config."""
    problems = _Problems()
    _group(data, "", node, None, problems)
    return problems.errors


def _check_vias(targets: list[TargetConfig], role: str | None, r: _Reader) -> None:
    """A `via` is another target of the group that holds volumes, streamed record by
    record; `process` without one means this node processes as it receives: a secondary."""
    by_node = {t.node: t for t in targets if t.node is not None}
    for i, t in enumerate(targets):
        where = f"{r.sub('targets')}[{i}]"
        if t.via is None and t.process and role not in ("secondary", None):
            r.problems.add(f"{where}.process", "only a secondary processes what it receives "
                                               f"for its own target; a {role} names a near "
                                               "replica (via)")
        if t.via is None:
            continue
        near = by_node.get(t.via)
        if near is None or near is t:
            r.problems.add(f"{where}.via", f"{t.via!r} is not another target of this group: "
                                           "the near replica must be one")
        elif near.bunker or near.mode == "periodic" or near.via is not None:
            r.problems.add(f"{where}.via", f"{t.via!r} cannot process for {t.node}: a near "
                                           "replica holds the volumes and is sent every "
                                           "record directly (sync or async, no bunker, no "
                                           "via of its own)")


def _watch(r: _Reader, volumes: list[VolumeConfig]) -> dict:
    """The watched-group keys, checked: a group's volumes are all watched or none is."""
    keys = ("consistency", "interval", "quiet", "freeze", "thaw", "hook_timeout")
    captures = {v.capture for v in volumes}
    if len(captures) > 1:
        r.fail("volumes", "a group's volumes are all capture: watch or all capture: nbd "
                          "(write order across both cannot be kept)")
        r.seen.update(keys)
        return {}
    if captures != {"watch"}:
        for key in keys:
            if r.get(key, None) is not None:
                r.fail(key, "only a group of watched volumes (capture: watch) has this key")
        return {}
    out = {"consistency": r.choice("consistency", CONSISTENCIES, "reflink"),
           "epoch_interval": r.value("interval", parse_duration, 10, low=0.1),
           "quiet": r.value("quiet", parse_duration, 1),
           "hook_timeout": r.value("hook_timeout", parse_duration, 30)}
    for key in ("freeze", "thaw"):
        out[key] = r.get(key, None, types=(str,))
    if out["consistency"] == "hooks" and not (out["freeze"] and out["thaw"]):
        r.fail("freeze", "consistency hooks needs both a freeze and a thaw command (e.g. "
                         "fsfreeze -f /mnt, fsfreeze -u /mnt)")
    elif bool(out["freeze"]) != bool(out["thaw"]):
        r.fail("thaw" if out["freeze"] else "freeze",
               "freeze and thaw go together: every freeze must be undone")
    return out


def _volumes_unique(groups: list[GroupConfig], problems: _Problems) -> None:
    """Volume paths and names (the NBD export names) are unique per node; a name twice
    in one group is that group's error already."""
    paths: dict[str, str] = {}
    exports: dict[str, tuple[int, str]] = {}
    for i, g in enumerate(groups):
        for j, v in enumerate(g.volumes):
            where = f"groups[{i}].volumes[{j}]"
            if v.path is not None and v.path in paths:
                problems.add(f"{where}.path", f"{v.path} is already used by {paths[v.path]}")
            elif v.path is not None:
                paths[v.path] = where
            if v.name is not None and v.name in exports and exports[v.name][0] != i:
                problems.add(f"{where}.name", f"volume {v.name!r} already exists in "
                                              f"{exports[v.name][1]} (volume names are NBD "
                                              "export names: unique per node)")
            elif v.name is not None:
                exports.setdefault(v.name, (i, where))


def _listeners(r: _Reader, keys: tuple[str, ...]) -> dict:
    """The agent's listening addresses, each on a port of its own."""
    out: dict[str, tuple[str, int] | None] = {}
    for key in keys:
        address = r.value(key, parse_address, ... if key == "listen" else None)
        for other, theirs in out.items():
            if address is not None and theirs is not None and _clash(address, theirs):
                wild = address[0] if address[0] in WILDCARDS else theirs[0]
                how = ("the same address" if address == theirs else
                       f"{wild} takes the port on every address")
                r.fail(key, f"{_address_text(address)} clashes with {other} "
                            f"({_address_text(theirs)}): {how}; each listener needs a port "
                            "of its own")
                break
        out[key] = address
    return out


def _socket_path(r: _Reader, key: str, default) -> str | None:
    path = r.absolute_path(key, default)
    if path is not None and len(path.encode()) > 100:
        return r.fail(key, "path too long for a unix socket (max 100 bytes)")
    return path


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve anywhere
        return False


def _nbd(r: _Reader, addresses: dict, state_dir: str | None, tls: TlsConfig | None,
         groups: list[GroupConfig]) -> dict:
    """The NBD listeners besides the addresses, and who may use the TLS one (Config's
    nbd_* fields): plain NBD has no authentication, so it is served on a unix socket
    and on loopback only; any other address is nbd_tls_listen's, with client
    certificates. Without any of the three, the socket STATE_DIR/nbd.sock."""
    plain, secure = addresses["nbd_listen"], addresses["nbd_tls_listen"]
    if plain is not None and not _loopback(plain[0]):
        r.fail("nbd_listen", f"plain NBD has no authentication, so it listens on loopback "
                             f"only (127.0.0.1, ::1); got {_address_text(plain)}: for clients "
                             "on other hosts use nbd_tls_listen (TLS with client certificates)")
    if secure is not None and tls is None and "tls" not in r.bad:
        r.fail("nbd_tls_listen", "needs the node's TLS files (tls: {ca, cert, key}); this "
                                 "agent runs with tls: false")
    default_socket = None
    if not any(r.given(k) for k in ("nbd_socket", "nbd_listen", "nbd_tls_listen")):
        default_socket = os.path.join(state_dir or "/var/lib/replicator", "nbd.sock")
    socket_path = _socket_path(r, "nbd_socket", default_socket)
    mode = r.get("nbd_socket_mode", 0o660, types=(int, str))
    if isinstance(mode, str):
        mode = int(mode, 8) if re.fullmatch(r"0?[0-7]{3}", mode) else r.fail(
            "nbd_socket_mode", f"expected an octal mode like 0660; got {mode!r}", 0o660)
    if not 0 <= mode <= 0o777:
        mode = r.fail("nbd_socket_mode", f"expected an octal mode like 0660; got {mode:o}", 0o660)
    elif mode & 0o007:
        mode = r.fail("nbd_socket_mode", f"mode {mode:04o} lets every user of the host read "
                      "and write the volumes; give access with nbd_socket_group", 0o660)
    group = r.get("nbd_socket_group", None, types=(str, int))
    clients = _nbd_clients(r, {v.name for g in groups for v in g.volumes})
    if clients and secure is None and "nbd_tls_listen" not in r.bad:
        r.fail("nbd_clients", "grants exports on nbd_tls_listen, which is not set")
    return {"nbd_socket": socket_path, "nbd_socket_mode": mode,
            "nbd_socket_group": None if group is None else str(group),
            "nbd_clients": clients}


def _nbd_clients(r: _Reader, volumes: set[str]) -> dict:
    """nbd_clients: {client name: {exports: [volume names] or "*", access: rw or ro}}."""
    raw = r.get("nbd_clients", {}, types=(dict,))
    clients = {}
    for name, grant in raw.items():
        where = f"nbd_clients.{name}"
        if not isinstance(name, str) or not NAME_RE.match(name):
            r.problems.add(where, "expected a client name (the CN of its certificate) as key")
            continue
        g = _Reader.of(grant, r.sub(where), r.problems)
        if g is None:
            continue
        exports = g.get("exports", types=(list, str))
        if exports == "*":
            exports = ["*"]
        elif isinstance(exports, str):
            exports = g.fail("exports", f'expected a list of volume names or "*"; got {exports!r}')
        for export in exports or ():
            if not isinstance(export, str) or export != "*" and export not in volumes:
                g.fail("exports", f"no volume {export!r} on this node; volumes: "
                                  f"{', '.join(sorted(volumes)) or '(none)'}")
        access = g.choice("access", ("rw", "ro"), "rw")
        g.done()
        if exports is not None and not g.bad:
            clients[name] = NbdGrant(exports=tuple(exports), write=access == "rw")
    return clients


def parse(data, source_path: str = "") -> Config:
    """Validate a decoded YAML document and build the Config; ConfigError names every
    error found."""
    problems = _Problems()
    r = _Reader.of(data if data is not None else {}, "", problems)
    if r is None:
        problems.raise_any()
    node = r.name("node")
    addresses = _listeners(r, ("listen", "nbd_listen", "nbd_tls_listen", "metrics_listen"))
    state_dir = r.absolute_path("state_dir", "/var/lib/replicator")
    admin_socket = _socket_path(r, "admin_socket", os.path.join(
        state_dir or "/var/lib/replicator", "admin.sock"))
    peers_raw = r.get("peers", {}, types=(dict,))
    peers: dict | None = None if "peers" in r.bad else {}
    for peer, addr in peers_raw.items():
        if not isinstance(peer, str) or not NAME_RE.match(peer):
            problems.add(f"peers.{peer}", "expected a node name as key")
        else:
            peers[peer] = r.check(f"peers.{peer}", parse_address, addr)
    groups = [g for i, raw in enumerate(_items(r, "groups"))
              if (g := _group(raw, f"groups[{i}]", node, peers, problems))]
    names = [g.name for g in groups]
    for i, g in enumerate(groups):
        if g.name is not None and names.count(g.name) > 1:
            problems.add(f"groups[{i}].name", f"duplicate group {g.name!r}")
    _volumes_unique(groups, problems)
    interval = r.get("heartbeat_interval", 1.0, types=(int, float))
    timeout = r.get("heartbeat_timeout", 5.0, types=(int, float))
    if not 0 < interval < timeout:
        r.fail("heartbeat_timeout", "expected 0 < heartbeat_interval < heartbeat_timeout")
    sync_ack_timeout = r.get("sync_ack_timeout", 10.0, types=(int, float))
    if not interval < sync_ack_timeout:
        r.fail("sync_ack_timeout", f"expected seconds more than heartbeat_interval "
                                   f"({interval:g}); got {sync_ack_timeout!r}")
    stall_timeout = r.value("stall_timeout", parse_duration, 60, low=0.5)
    if stall_timeout is not None and not interval < stall_timeout:
        r.fail("stall_timeout", f"expected more than heartbeat_interval ({interval:g}s): a "
                                "healthy target acks at least that often; got "
                                f"{stall_timeout:g}s")
    sync = any(t.mode == "sync" for g in groups for t in g.targets)
    if stall_timeout is not None and sync and isinstance(sync_ack_timeout, (int, float)) \
            and not sync_ack_timeout < stall_timeout:
        r.fail("stall_timeout", f"expected more than sync_ack_timeout ({sync_ack_timeout:g}s) "
                                "with a sync target: a sync target silent on ACKs leaves sync "
                                "(its waiting writes go on) before the watchdog reconnects it; "
                                f"got {stall_timeout:g}s")
    nbd_max = r.get("nbd_max_connections", 256, types=(int,))
    if nbd_max < 1:
        nbd_max = r.fail("nbd_max_connections", f"expected at least 1; got {nbd_max}", 256)
    nbd_per_export = r.get("nbd_max_connections_per_export", min(64, nbd_max), types=(int,))
    if not 1 <= nbd_per_export <= nbd_max and "nbd_max_connections" not in r.bad:
        r.fail("nbd_max_connections_per_export",
               f"expected 1..nbd_max_connections ({nbd_max}); got {nbd_per_export}")
    nbd_handshake = r.get("nbd_handshake_timeout", 10.0, types=(int, float))
    if not nbd_handshake > 0:
        r.fail("nbd_handshake_timeout", f"expected positive seconds; got {nbd_handshake}")
    log_level = r.choice("log_level", ("debug", "info", "warning", "error"), "info")
    tls = _tls(r)
    nbd = _nbd(r, addresses, state_dir, tls, groups)
    r.done()
    problems.raise_any()
    return Config(node=node, listen=addresses["listen"], nbd_listen=addresses["nbd_listen"],
                  nbd_tls_listen=addresses["nbd_tls_listen"], **nbd,
                  state_dir=state_dir, admin_socket=admin_socket, peers=peers,
                  groups=tuple(groups), tls=tls,
                  heartbeat_interval=float(interval), heartbeat_timeout=float(timeout),
                  sync_ack_timeout=float(sync_ack_timeout), nbd_max_connections=nbd_max,
                  nbd_max_connections_per_export=nbd_per_export,
                  nbd_handshake_timeout=float(nbd_handshake), log_level=log_level,
                  metrics_listen=addresses["metrics_listen"], stall_timeout=stall_timeout,
                  source_path=source_path)


def load(path: str) -> Config:
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except OSError as exc:
        raise ConfigError("", f"cannot read {path}: {exc.strerror}") from None
    except (yaml.YAMLError, ValueError) as exc:  # ValueError: an int of 4300+ digits
        raise ConfigError("", f"{path} is not valid YAML: {exc}") from None
    return parse(data, source_path=path)
