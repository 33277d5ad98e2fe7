"""Prometheus metrics of one agent: GET /metrics on `metrics_listen` answers the text
format (prometheus_client's), read from the agent's state at the moment of the scrape,
so a value is never staler than the scrape (README "Metrics" lists every name).

Everything is read on the event loop thread, which owns that state: the HTTP server is
asyncio's, and a scrape is one pass over the groups, shippers and exports. The write
path pays only for what no scrape can read later: each NBD write and flush counts
itself and its latency into its volume's IoStats (two clock reads, one bisect).
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import os
import time

from cryptography import x509
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from . import __version__
from .config import ROLES
from .events import EVENTS

log = logging.getLogger("replicator.metrics")

# seconds; from a page-cache write (~20 us) to a WAN sync round trip or a stalled disk
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                   0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# What status shows as a target's state (shipping/shipper.py phase()), one gauge each.
STATES = ("connecting", "catching-up", "replicating", "logging", "resyncing", "verifying",
          "refused", "needs-resync", "split-brain", "stale", "failed")
MAX_REQUEST = 8192  # bytes of an HTTP request head
MAX_CLIENTS = 8  # scrapes served at once; more are closed at once (Prometheus scrapes one)
CLIENT_TIMEOUT = 10.0  # seconds to send a request head, and to take the answer


class Histogram:
    """Latency counts per LATENCY_BUCKETS bucket; observe is one bisect."""

    __slots__ = ("counts", "total")

    def __init__(self):
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.total += seconds

    def buckets(self) -> list[tuple[str, int]]:
        """Cumulative, as Prometheus has them, +Inf last."""
        out, running = [], 0
        for le, n in zip([*map(str, LATENCY_BUCKETS), "+Inf"], self.counts):
            running += n
            out.append((le, running))
        return out


class IoStats:
    """One volume's NBD writes and flushes: counts, bytes and latency. `write` and
    `flush` wrap a request's completion callback; what fails is not counted."""

    def __init__(self):
        self.writes = self.written_bytes = self.flushes = 0
        self.write_latency, self.flush_latency = Histogram(), Histogram()

    def write(self, nbytes: int, done):
        start = time.monotonic()

        def completed(err: int) -> None:
            if not err:
                self.writes += 1
                self.written_bytes += nbytes
                self.write_latency.observe(time.monotonic() - start)
            done(err)
        return completed

    def flush(self, done):
        start = time.monotonic()

        def completed(err: int) -> None:
            if not err:
                self.flushes += 1
                self.flush_latency.observe(time.monotonic() - start)
            done(err)
        return completed


# name -> (type, help, labels); the families a scrape fills (Collector.collect)
_G, _C, _H = GaugeMetricFamily, CounterMetricFamily, HistogramMetricFamily
GROUP, VOLUME, TARGET = ("group",), ("group", "volume"), ("group", "target")
METRICS = {
    "replicator_build_info": (_G, "The agent's version (value 1).", ("version",)),
    "replicator_agent_start_time_seconds": (_G, "When the agent started (unix time).", ()),
    "replicator_group_role": (_G, "The group's role on this node (1 for its role).",
                              ("group", "role")),
    "replicator_group_journaled_seq": (_G, "Last seq written to the journal.", GROUP),
    "replicator_group_durable_seq": (_G, "Last seq made durable (fdatasync) here.", GROUP),
    "replicator_group_applied_seq": (_G, "Last seq the volumes hold.", GROUP),
    "replicator_journal_used_bytes": (_G, "Journal bytes in use.", GROUP),
    "replicator_journal_capacity_bytes": (_G, "Journal capacity.", GROUP),
    "replicator_group_split_brain": (_G, "1 while a peer's line diverged from ours.", GROUP),
    "replicator_group_writes_blocked": (_G, "1 while writes wait for a target (on_disconnect "
                                            "or on_lag: block).", GROUP),
    "replicator_group_writes_halted": (_G, "1 when writes fail until a restart (status says "
                                           "why).", GROUP),
    "replicator_volume_writes": (_C, "NBD writes and zeroes completed.", VOLUME),
    "replicator_volume_written_bytes": (_C, "Bytes NBD writes and zeroes completed.", VOLUME),
    "replicator_volume_flushes": (_C, "NBD flushes completed.", VOLUME),
    "replicator_volume_write_latency_seconds": (_H, "NBD write latency, request to reply.",
                                                VOLUME),
    "replicator_volume_flush_latency_seconds": (_H, "NBD flush latency, request to reply.",
                                                VOLUME),
    "replicator_target_state": (_G, "1 for the target's state (as status shows it).",
                                ("group", "target", "state")),
    "replicator_target_acked_seq": (_G, "Last seq the target made durable.", TARGET),
    "replicator_target_lag_records": (_G, "Records the target lacks.", TARGET),
    "replicator_target_lag_bytes": (_G, "Journal bytes the target lacks.", TARGET),
    "replicator_target_lag_seconds": (_G, "Age of the oldest write the target lacks (the "
                                          "RPO at risk); 0 when it has them all.", TARGET),
    "replicator_target_max_lag_seconds": (_G, "The target's configured max_lag_seconds.",
                                          TARGET),
    "replicator_target_lag_over_limit": (_G, "1 while the target is over its max_lag_seconds "
                                             "or max_lag_bytes.", TARGET),
    "replicator_target_sent_bytes": (_C, "Payload bytes sent, before compression.", TARGET),
    "replicator_target_wire_bytes": (_C, "Bytes written to the target's sockets.", TARGET),
    "replicator_target_reconnects": (_C, "Sessions established after the first.", TARGET),
    "replicator_target_stalls": (_C, "Sessions the stall watchdog ended.", TARGET),
    "replicator_target_resync_done_bytes": (_G, "The running resync's bytes done.", TARGET),
    "replicator_target_resync_total_bytes": (_G, "The running resync's bytes in all.", TARGET),
    "replicator_target_resync_eta_seconds": (_G, "The running resync's estimated seconds "
                                                 "left (0: none runs; absent: not known "
                                                 "yet).", TARGET),
    "replicator_target_verify_mismatches": (_G, "Regions the last verify found different.",
                                            TARGET),
    "replicator_target_last_verify_timestamp_seconds": (_G, "When the last verify ended.",
                                                        TARGET),
    "replicator_bunker_far_lag_records": (_G, "Bunker: records the far replicas lack.", GROUP),
    "replicator_bunker_covers_far_replicas": (_G, "Bunker: 1 while its journal holds every "
                                                  "record the far replicas lack.", GROUP),
    "replicator_window_start_timestamp_seconds": (_G, "Secondary with retain: the time of the "
                                                      "oldest point it can rewind to.", GROUP),
    "replicator_window_retained_bytes": (_G, "Secondary with retain: bytes its window holds "
                                             "(before-images and journal records).", GROUP),
    "replicator_apply_waiting_records": (_G, "Secondary with retain or apply_delay: records "
                                             "durable here, not yet in the volumes.", GROUP),
    "replicator_certificate_expiry_timestamp_seconds": (_G, "When the TLS certificate "
                                                            "expires (unix time): the CA's, "
                                                            "and the node's in use.",
                                                        ("certificate",)),
    "replicator_crl_next_update_timestamp_seconds": (_G, "When the CRL in use (tls.crl) ends: "
                                                         "past it, every peer is refused.", ()),
    "replicator_events": (_C, "Events emitted (replicator events), by kind.", ("kind",)),
}
# The names a scrape shows (counters with _total), for dashboards and rules to check.
METRIC_NAMES = frozenset(n + "_total" if spec[0] is _C else n for n, spec in METRICS.items())


_expiry_cache: dict[str, tuple[float, float | None]] = {}  # path -> (mtime, expiry)


def certificate_expiry(path: str) -> float | None:
    """When the PEM certificate at `path` expires (unix time), read again only when the
    file changes (a scrape must not parse certificates each time)."""
    try:
        mtime = os.stat(path).st_mtime
        cached = _expiry_cache.get(path)
        if cached is not None and cached[0] == mtime:
            return cached[1]
        with open(path, "rb") as f:
            expiry = x509.load_pem_x509_certificate(f.read()).not_valid_after_utc.timestamp()
    except (OSError, ValueError):
        return None
    _expiry_cache[path] = (mtime, expiry)
    return expiry


class Collector:
    """The agent's metrics for prometheus_client, read at each scrape."""

    def __init__(self, agent):
        self.agent = agent

    def collect(self):
        fam = {name: kind(name, doc, labels=list(labels))
               for name, (kind, doc, labels) in METRICS.items()}
        a = self.agent
        fam["replicator_build_info"].add_metric([__version__], 1)
        fam["replicator_agent_start_time_seconds"].add_metric([], a.started)
        for g in a.groups.values():
            self._group(fam, g)
            for s in a.shippers.get(g.name, []):
                self._target(fam, g.name, s)
        for name, export in a.exports.items():
            self._volume(fam, export.group.name, name, export.stats)
        if a.cfg.tls is not None:
            expiry = certificate_expiry(a.cfg.tls.ca)
            if expiry is not None:
                fam["replicator_certificate_expiry_timestamp_seconds"].add_metric(["ca"], expiry)
            creds = a.credentials  # what the agent serves with, until a reload reads anew
            fam["replicator_certificate_expiry_timestamp_seconds"].add_metric(
                ["node"], creds.cert.not_valid_after_utc.timestamp())
            if creds.crl is not None and creds.crl.next_update_utc is not None:
                fam["replicator_crl_next_update_timestamp_seconds"].add_metric(
                    [], creds.crl.next_update_utc.timestamp())
        for kind, n in sorted(EVENTS.counts.items()):
            fam["replicator_events"].add_metric([kind], n)
        return fam.values()

    @staticmethod
    def _group(fam: dict, g) -> None:
        n, c, j = [g.name], g.commit, g.journal
        for role in ROLES:
            fam["replicator_group_role"].add_metric([g.name, role], int(g.role == role))
        fam["replicator_group_journaled_seq"].add_metric(n, c.written_seq)
        fam["replicator_group_durable_seq"].add_metric(n, c.durable_seq)
        fam["replicator_group_applied_seq"].add_metric(n, c.applied_seq)
        fam["replicator_journal_used_bytes"].add_metric(n, j.used_bytes)
        fam["replicator_journal_capacity_bytes"].add_metric(n, j.capacity)
        fam["replicator_group_split_brain"].add_metric(n, int(g.lineage.split_brain is not None))
        fam["replicator_group_writes_blocked"].add_metric(n, int(bool(g.targets.blocked_by)))
        fam["replicator_group_writes_halted"].add_metric(
            n, int(bool(c.halted or c.volume_error)))
        w = g.window
        if w.active:
            fam["replicator_apply_waiting_records"].add_metric(n, w.applier.waiting)
            if w.history.images:
                fam["replicator_window_start_timestamp_seconds"].add_metric(
                    n, w.start_time_ns / 1e9)
                fam["replicator_window_retained_bytes"].add_metric(n, w.retained_bytes)
        bunker = g.retention.bunker_status()
        if bunker is not None and bunker["far_seq"] is not None:
            fam["replicator_bunker_far_lag_records"].add_metric(n, bunker["far_lag_records"])
            fam["replicator_bunker_covers_far_replicas"].add_metric(
                n, int(bunker["covers_far_replicas"]))

    @staticmethod
    def _volume(fam: dict, group: str, volume: str, st: IoStats) -> None:
        labels = [group, volume]
        fam["replicator_volume_writes"].add_metric(labels, st.writes)
        fam["replicator_volume_written_bytes"].add_metric(labels, st.written_bytes)
        fam["replicator_volume_flushes"].add_metric(labels, st.flushes)
        fam["replicator_volume_write_latency_seconds"].add_metric(
            labels, st.write_latency.buckets(), st.write_latency.total)
        fam["replicator_volume_flush_latency_seconds"].add_metric(
            labels, st.flush_latency.buckets(), st.flush_latency.total)

    @staticmethod
    def _target(fam: dict, group: str, s) -> None:
        t, labels = s.target, [group, s.target.node]
        phase = s.phase()
        for state in STATES:
            fam["replicator_target_state"].add_metric([*labels, state], int(phase == state))
        records, nbytes, seconds = s.group.lag(t)
        fam["replicator_target_acked_seq"].add_metric(labels, t.acked_seq)
        fam["replicator_target_lag_records"].add_metric(labels, records)
        fam["replicator_target_lag_bytes"].add_metric(labels, nbytes)
        fam["replicator_target_lag_seconds"].add_metric(labels, seconds)
        if t.cfg.max_lag_seconds is not None:
            fam["replicator_target_max_lag_seconds"].add_metric(labels, t.cfg.max_lag_seconds)
        fam["replicator_target_lag_over_limit"].add_metric(labels, int(t.lag_over))
        fam["replicator_target_sent_bytes"].add_metric(labels, s.bytes_sent)
        fam["replicator_target_wire_bytes"].add_metric(labels, s.wire_bytes)
        fam["replicator_target_reconnects"].add_metric(labels, s.reconnects)
        fam["replicator_target_stalls"].add_metric(labels, s.stalls)
        r = s.resync.status() if s.resync is not None else None
        fam["replicator_target_resync_done_bytes"].add_metric(labels, r["done_bytes"] if r else 0)
        fam["replicator_target_resync_total_bytes"].add_metric(labels, r["total_bytes"] if r else 0)
        if r is None or r["eta_seconds"] is not None:  # (a resync's first moment: unknown)
            fam["replicator_target_resync_eta_seconds"].add_metric(
                labels, r["eta_seconds"] if r else 0)
        if s.last_verify is not None:
            fam["replicator_target_verify_mismatches"].add_metric(
                labels, s.last_verify["mismatches"])
            fam["replicator_target_last_verify_timestamp_seconds"].add_metric(
                labels, s.last_verify["time"])


class MetricsServer:
    """GET /metrics (and /) over HTTP/1.x on the loop; anything else gets a 404."""

    def __init__(self, agent):
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(Collector(agent))
        self._server: asyncio.base_events.Server | None = None
        self._clients = 0

    async def start(self, host: str, port: int) -> None:
        self._server = await asyncio.start_server(self._handle, host, port,
                                                  limit=MAX_REQUEST)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._clients >= MAX_CLIENTS:
            writer.close()
            return
        self._clients += 1
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), CLIENT_TIMEOUT)
            method, path, *_ = head.split(b" ", 2) + [b""]
            if method not in (b"GET", b"HEAD") or path.split(b"?")[0] not in (b"/metrics", b"/"):
                status, ctype, body = "404 Not Found", "text/plain", b"GET /metrics\n"
            else:
                try:
                    status, ctype, body = "200 OK", CONTENT_TYPE_LATEST, generate_latest(
                        self.registry)
                except Exception as exc:  # noqa: BLE001 - a collector bug: say so, not "down"
                    log.warning("metrics: the scrape failed: %r", exc)
                    status, ctype, body = "500 Internal Server Error", "text/plain", \
                        f"scrape failed: {exc!r}\n".encode()
            writer.write(f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: "
                         f"{len(body)}\r\nConnection: close\r\n\r\n".encode()
                         + (body if method != b"HEAD" else b""))
            await asyncio.wait_for(writer.drain(), CLIENT_TIMEOUT)
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError,
                asyncio.LimitOverrunError) as exc:
            log.debug("metrics request failed: %s", exc)
        finally:
            self._clients -= 1
            writer.close()
