"""Metrics, events and a real Prometheus (issue 18), on real agents on loopback.

- /metrics answers the Prometheus text format that `promtool check metrics` accepts,
  with what real NBD clients did (writes, bytes, flushes, latency) and every target's
  state and lag seconds;
- `replicator events` lists every state change with sequence numbers, and `--since
  <status's event_seq> --follow` misses none of those that follow;
- a real Prometheus (the Debian package's) scrapes the agent and answers a query of
  every link's lag seconds.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request

import pytest

from prometheus_client.parser import text_string_to_metric_families

from tests.agents import Topology, events, free_port, wait_until
from tests.clients import qemu_io

pytestmark = pytest.mark.integration


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        return r.read().decode()


def samples(text: str) -> dict:
    """(name, frozenset of label items) -> value."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def value(text: str, name: str, **labels) -> float:
    return samples(text)[(name, frozenset(labels.items()))]


@pytest.fixture
def pair(tmp_path):
    topo = Topology(tmp_path, ["p", "s"], [("p", "s", "async")])
    port = free_port()
    topo["p"].config["metrics_listen"] = f"127.0.0.1:{port}"
    topo["p"].save_config()
    topo.port = port
    topo.start()
    try:
        yield topo
    finally:
        topo.stop()


def test_metrics_count_what_real_clients_did_and_promtool_accepts_them(pair):
    p = pair["p"]
    pair.wait_converged()
    qemu_io(p.nbd_uri("data"), *[f"write -P {i} {i * 64}k 64k" for i in range(8)], "flush")
    pair.wait_converged()
    text = scrape(pair.port)
    vol = {"group": "db", "volume": "data"}
    assert value(text, "replicator_volume_writes_total", **vol) == 8
    assert value(text, "replicator_volume_written_bytes_total", **vol) == 8 * 64 * 1024
    assert value(text, "replicator_volume_flushes_total", **vol) >= 1
    assert value(text, "replicator_volume_write_latency_seconds_count", **vol) == 8
    assert value(text, "replicator_volume_write_latency_seconds_bucket", le="+Inf", **vol) == 8
    link = {"group": "db", "target": "s"}
    assert value(text, "replicator_target_state", state="replicating", **link) == 1
    assert value(text, "replicator_target_state", state="connecting", **link) == 0
    assert value(text, "replicator_target_lag_seconds", **link) == 0
    assert value(text, "replicator_target_acked_seq", **link) == p.group("db")["seq"]
    assert value(text, "replicator_target_sent_bytes_total", **link) >= 8 * 64 * 1024
    assert value(text, "replicator_target_wire_bytes_total", **link) > \
        value(text, "replicator_target_sent_bytes_total", **link)
    assert value(text, "replicator_group_role", group="db", role="primary") == 1
    assert value(text, "replicator_events_total", kind="agent_started") == 1
    if shutil.which("promtool"):
        lint = subprocess.run(["promtool", "check", "metrics"], input=text, text=True,
                              capture_output=True)
        assert lint.returncode == 0, lint.stdout + lint.stderr
    else:
        pytest.fail("promtool is missing: scripts/setup.sh installs the prometheus package")

    # The target goes away: its state and lag say so, the reconnect is counted.
    pair["s"].kill()
    qemu_io(p.nbd_uri("data"), "write -P 9 0 4k")
    wait_until(lambda: value(scrape(pair.port), "replicator_target_state", state="connecting",
                             **link) == 1, 20, "the target's state to read connecting")
    wait_until(lambda: value(scrape(pair.port), "replicator_target_lag_records", **link) == 1,
               20, "the lag of one record")
    pair["s"].start()
    wait_until(lambda: value(scrape(pair.port), "replicator_target_reconnects_total",
                             **link) == 1, 30, "one reconnect counted")


def test_metrics_endpoint_refuses_other_requests_and_idle_crowds(pair):
    req = urllib.request.Request(f"http://127.0.0.1:{pair.port}/other")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=5)
    assert err.value.code == 404
    head = urllib.request.Request(f"http://127.0.0.1:{pair.port}/metrics", method="HEAD")
    with urllib.request.urlopen(head, timeout=5) as r:
        assert r.status == 200 and r.read() == b""
    # Clients that connect and say nothing: a few at most are served at once, the rest
    # closed at once (memory and descriptors stay bounded); once they go, it answers.
    idle = [socket.create_connection(("127.0.0.1", pair.port)) for _ in range(8)]
    try:
        extra = socket.create_connection(("127.0.0.1", pair.port))
        extra.settimeout(5)
        assert extra.recv(1) == b""  # closed without an answer
        extra.close()
    finally:
        for s in idle:
            s.close()
    wait_until(lambda: scrape(pair.port), 20, "a scrape once the idle clients left")


def test_events_list_state_changes_and_follow_misses_none(pair):
    p, s = pair["p"], pair["s"]
    pair.wait_converged()
    past = events(p)
    kinds = [e["kind"] for e in past]
    assert kinds[0] == "agent_started"
    states = [e["state"] for e in past if e["kind"] == "state" and e["target"] == "s"]
    assert states[0] == "connecting" and states[-1] == "replicating", past
    assert [e["seq"] for e in past] == list(range(1, len(past) + 1))

    since = p.status()["event_seq"]
    follow = subprocess.Popen([sys.executable, "-m", "replicator.cli", "events", "--json",
                               "--follow", "--since", str(since), "-c", p.config_path],
                              stdout=subprocess.PIPE, text=True)
    try:
        s.kill()
        s.start()
        pair.wait_converged()
        got = []
        wait_until(lambda: got.append(json.loads(follow.stdout.readline())) or
                   [e["state"] for e in got if e["kind"] == "state"][-2:] ==
                   ["catching-up", "replicating"], 30, lambda: f"the reconnect's events: {got}")
    finally:
        follow.kill()
        follow.wait()
    assert [e["seq"] for e in got] == list(range(since + 1, since + 1 + len(got)))
    assert got[0]["kind"] == "state" and got[0]["state"] == "connecting" and got[0]["error"]
    # What --follow printed is what a later listing holds.
    assert events(p, "--since", str(since))[:len(got)] == got


def test_a_real_prometheus_scrapes_the_agent(pair, tmp_path):
    prometheus = shutil.which("prometheus")
    if prometheus is None:
        pytest.fail("prometheus is missing: scripts/setup.sh installs the prometheus package")
    pair.wait_converged()
    cfg = tmp_path / "prometheus.yml"
    cfg.write_text(json.dumps({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": "replicator",
                            "static_configs": [{"targets": [f"127.0.0.1:{pair.port}"]}]}]}))
    port = free_port()
    log = open(tmp_path / "prometheus.log", "w")
    proc = subprocess.Popen([prometheus, f"--config.file={cfg}",
                             f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=log, stderr=log)
    try:
        def query(q: str) -> list:
            url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": q})
            with urllib.request.urlopen(url, timeout=5) as r:
                return json.load(r)["data"]["result"]
        result = wait_until(lambda: query("replicator_target_lag_seconds"), 60,
                            lambda: "Prometheus to have scraped the agent:\n"
                            + (tmp_path / "prometheus.log").read_text()[-2000:])
        assert [(r["metric"]["group"], r["metric"]["target"]) for r in result] == [("db", "s")]
        assert float(result[0]["value"][1]) == 0.0
        assert query('up{job="replicator"}')[0]["value"][1] == "1"
    finally:
        proc.terminate()
        proc.wait(20)
        log.close()

