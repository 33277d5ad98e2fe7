"""Lag limits (on_lag alert, throttle, block) and the stall watchdog on real agents,
with real NBD writers (fio) on the primary's loopback.

The target agent runs in a network namespace of its own behind a shaped veth pair
(tests/shaped.py: kernel tbf, never the host's interfaces), so replication, and only
replication, crosses a link slower than the writer. The stall cases stop the target
(SIGSTOP) or drop every packet of its link, with stall_timeout well under
heartbeat_timeout, so that it is the watchdog, not the heartbeat timeout, that acts.
"""

from __future__ import annotations

import json
import signal
import threading
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.agents import Topology, free_port, kinds, wait_until
from tests.clients import fio, qemu_io
from tests.integration.test_stalls import HEARTBEAT_TYPE, FrameProxy, _drop_acks
from tests.shaped import ShapedLink, place

pytestmark = pytest.mark.integration

RATE = "16mbit"  # the link: 2 MB/s
LINK_BYTES_PER_S = 2_000_000
WRITER = "8m"  # fio's rate: four times the link


def metric(port: int, name: str, **labels) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and s.labels == labels:
                return s.value
    raise AssertionError(f"no sample {name}{labels}")


class Writer(threading.Thread):
    """fio in the background: random 64k writes at WRITER bytes/s."""

    def __init__(self, uri: str, **kw):
        super().__init__(daemon=True)
        self.uri, self.kw, self.out, self.error = uri, kw, "", None

    def run(self):
        try:
            self.out = fio(self.uri, bs="64k", iodepth=4,
                           extra=(f"--rate={WRITER}", "--output-format=json"), **self.kw)
        except BaseException as exc:  # noqa: BLE001 - reported by result()
            self.error = exc

    def result(self, timeout: float = 60) -> dict:
        self.join(timeout)
        assert not self.is_alive(), "fio did not finish"
        if self.error is not None:
            raise self.error
        return json.loads(self.out[self.out.index("{"):])["jobs"][0]["write"]


@pytest.fixture
def shaped(tmp_path, request):
    """Factory: a primary p (loopback, metrics on) and its target t in a namespace behind
    a shaped link; killed and cleaned up whatever happens."""
    made = []

    def make(target: dict, *, agent_options: dict | None = None, rate: str | None = RATE,
             heartbeat_timeout: float = 3.0) -> Topology:
        link = ShapedLink(len(made)).create()
        topo = Topology(tmp_path / f"t{len(made)}", ["p", "t"],
                        [("p", "t", "async", {"compress": "none", **target})],
                        volumes={"data": 16 << 20}, heartbeat_timeout=heartbeat_timeout)
        made.append((topo, link))
        topo.port = free_port()
        topo["p"].config["metrics_listen"] = f"127.0.0.1:{topo.port}"
        topo["p"].config.update(agent_options or {})
        topo["p"].save_config()
        place(topo, "t", link)
        topo.link = link
        topo.start()
        topo.wait_converged(30)  # the initial sync, before the link is shaped
        if rate:
            link.shape(rate)
        return topo

    yield make
    failed = getattr(request.node, "rep_call", None)
    for topo, link in made:
        try:
            if failed is not None and failed.failed:
                print(topo.logs())
            for agent in topo.agents.values():  # a stopped one must get SIGKILL
                if agent.proc is not None:
                    agent.proc.send_signal(signal.SIGCONT)
            topo.stop()
        finally:
            link.delete()


def test_alert_says_the_lag_is_over_and_holds_no_write(shaped):
    topo = shaped({"max_lag_seconds": 1, "on_lag": "alert"})
    p = topo["p"]
    writer = Writer(p.nbd_uri("data"), size="8M")  # 1 s of writes, 4 s of link
    writer.start()
    wait_until(lambda: p.target("db", "t")["lag_limit"]["over"], 20, "the lag over 1 s")
    assert metric(topo.port, "replicator_target_lag_over_limit", group="db", target="t") == 1
    over = kinds(p, "lag_over_limit")
    assert len(over) == 1 and over[0]["target"] == "t" and over[0]["lag_seconds"] >= 1
    assert over[0]["max_lag_seconds"] == 1 and over[0]["on_lag"] == "alert"
    assert p.group("db")["writes_blocked_by"] == []
    done = writer.result()
    assert done["io_bytes"] == 8 << 20
    # the writer was not slowed down to the link: alert holds nothing
    assert done["runtime"] / 1000 < 8 * (1 << 20) / LINK_BYTES_PER_S
    topo.wait_converged(30)
    wait_until(lambda: kinds(p, "lag_under_limit"), 10, "lag_under_limit")
    assert metric(topo.port, "replicator_target_lag_over_limit", group="db", target="t") == 0
    topo.assert_identical()


def test_throttle_keeps_the_lag_inside_the_limit_at_about_the_link_rate(shaped):
    max_lag = 2.0
    tolerance = 1.0  # the guard looks every 0.1 s; acks come per 1 MiB batch
    topo = shaped({"max_lag_seconds": max_lag, "on_lag": "throttle"})
    p = topo["p"]
    run_for = 10
    writer = Writer(p.nbd_uri("data"), size="16M", runtime=run_for)
    writer.start()
    worst, rates = 0.0, []
    while writer.is_alive():
        t = p.target("db", "t")
        worst = max(worst, t["lag_seconds"])
        rates.append(t["lag_limit"]["admitted_bytes_per_second"])
        writer.join(0.1)  # (a sample every 0.1 s while it writes)
    done = writer.result()
    assert worst <= max_lag + tolerance, f"lag reached {worst}s (limit {max_lag}s)"
    # Writes went on at about the link's rate: not stopped, not much faster.
    rate = done["io_bytes"] / (done["runtime"] / 1000)
    print(f"throttle: worst lag {worst:.2f}s (limit {max_lag}s) at {rate:.0f} B/s of writes")
    assert 0.4 * LINK_BYTES_PER_S < rate < 1.6 * LINK_BYTES_PER_S, f"{rate:.0f} B/s"
    assert any(rates)
    assert kinds(p, "lag_over_limit") == []
    topo.wait_converged(30)
    topo.assert_identical()


def test_block_holds_writes_while_over_and_lets_them_go(shaped):
    topo = shaped({"max_lag_seconds": 1, "on_lag": "block"})
    p = topo["p"]
    size = 16 << 20  # 2 s of writes, 8 s of link
    writer = Writer(p.nbd_uri("data"), size="16M")
    writer.start()
    wait_until(lambda: p.group("db")["writes_blocked_by"] == ["t"], 20, "writes blocked by t")
    assert metric(topo.port, "replicator_group_writes_blocked", group="db") == 1
    held_at = p.group("db")["seq"]
    # While it is over, no write gets a seq; the writer waits, it does not fail.
    # (Sampled for half a second, as long as every sample still shows it blocked.)
    deadline = time.monotonic() + 0.5
    while time.monotonic() < deadline:
        g = p.group("db")
        if not g["writes_blocked_by"]:
            break
        assert g["seq"] == held_at
    done = writer.result()  # every write completed, each once the target was under again
    assert done["io_bytes"] == size
    assert done["runtime"] / 1000 > 0.6 * size / LINK_BYTES_PER_S  # paced by the link
    over = kinds(p, "lag_over_limit")
    assert over and over[0]["on_lag"] == "block" and over[0]["lag_seconds"] >= 1
    topo.wait_converged(30)
    wait_until(lambda: kinds(p, "lag_under_limit"), 10, "lag_under_limit")
    assert p.group("db")["writes_blocked_by"] == []
    assert metric(topo.port, "replicator_group_writes_blocked", group="db") == 0
    topo.assert_identical()


STALL = {"stall_timeout": 2}


def _stall_then_converge(topo, stop, resume) -> None:
    p = topo["p"]
    stop()
    writer = Writer(p.nbd_uri("data"), size="4M")  # a backlog the target never acks
    writer.start()
    try:
        wait_until(lambda: p.target("db", "t")["stalls"] >= 1, 20, "the watchdog")
        stalled = kinds(p, "stalled")
        assert len(stalled) == 1 and stalled[0]["target"] == "t"
        assert stalled[0]["backlog_records"] > 0 and stalled[0]["seconds"] >= 2
        assert "stalled" in p.log_tail(200)
        assert metric(topo.port, "replicator_target_stalls_total", group="db", target="t") == 1
    finally:
        resume()
    writer.result()
    topo.wait_converged(45)
    assert p.target("db", "t")["stalls"] == 1
    topo.assert_identical()


def test_a_stopped_target_is_reconnected_by_the_watchdog(shaped):
    topo = shaped({}, agent_options=STALL, rate=None, heartbeat_timeout=10.0)
    t = topo["t"].proc
    _stall_then_converge(topo, lambda: t.send_signal(signal.SIGSTOP),
                         lambda: t.send_signal(signal.SIGCONT))


def test_a_link_dropping_every_packet_is_reconnected_by_the_watchdog(shaped):
    topo = shaped({}, agent_options=STALL, heartbeat_timeout=10.0)
    _stall_then_converge(topo, topo.link.drop_all, topo.link.restore)


def test_a_target_whose_heartbeats_flow_but_acks_stopped_is_stalled(topology):
    """The watchdog judges ACK progress, not liveness: ACKs vanish in a frame proxy,
    heartbeats pass, and the session is still ended after stall_timeout."""
    topo = topology(["p", "t"], [("p", "t", "async")], start=False, heartbeat_timeout=10.0)
    port = int(topo["p"].config["peers"]["t"].rsplit(":", 1)[1])
    proxy = FrameProxy(port)
    try:
        topo["p"].config["peers"]["t"] = f"127.0.0.1:{proxy.port}"
        topo["p"].config.update(STALL)
        topo["p"].save_config()
        topo.start()
        topo.wait_converged()
        p = topo["p"]
        drop = _drop_acks(proxy)
        qemu_io(p.nbd_uri("data"), *[f"write -P 7 {i * 64}k 64k" for i in range(16)])
        wait_until(lambda: p.target("db", "t")["stalls"] >= 1, 20, "the watchdog")
        drop.clear()
        assert proxy.seen.get(HEARTBEAT_TYPE, 0) > 0  # the link was alive all along
        (stalled,) = kinds(p, "stalled")
        assert stalled["seconds"] >= 2 and stalled["backlog_records"] > 0
        topo.wait_converged()
        assert p.target("db", "t")["stalls"] == 1
        topo.assert_identical()
    finally:
        proxy.close()
