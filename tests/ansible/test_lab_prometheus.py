"""The lab's Prometheus without the lab: a real `prometheus` on loopback started, kept,
reloaded and stopped by plugins/module_utils/replicator_lab_prometheus.py; its generated
configuration checked by promtool; and the filter that turns a query's answer into one row
per link of the topology."""

import json
import os
import shutil
import socket
import subprocess
import urllib.request

import pytest
from hypothesis import given, strategies as st

from tests.agents import wait_until
from tests.ansible.ansible_harness import ROOT, filters, module_utils
from tests.ansible.lab_harness import Lab, playbook

prom = module_utils("replicator_lab_prometheus")
net = module_utils("replicator_lab_net")
LINKS = filters("replicator_metrics")["replicator_metrics_links"]
RULES = os.path.join(ROOT, "monitoring", "alerts.yml")
needs_prometheus = pytest.mark.skipif(not shutil.which("prometheus") or not shutil.which("promtool"),
                                      reason="needs the Debian package prometheus (scripts/setup.sh)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.load(r)


# ---------------------------------------------------------------- configuration

@pytest.mark.parametrize("text, parsed", [("10.213.0.11:9808", ("10.213.0.11", 9808)),
                                          ("localhost:1", ("localhost", 1)),
                                          ("[::1]:9090", ("::1", 9090))])
def test_endpoint(text, parsed):
    assert prom.endpoint(text, "x") == parsed


@pytest.mark.parametrize("text", ["10.213.0.11", ":9808", "host:0", "host:65536", "host:port",
                                  "a b:1", "host:²", "[::1:9090", ""])
def test_endpoint_refuses(text):
    with pytest.raises(net.LabError, match="x: expected HOST:PORT"):
        prom.endpoint(text, "x")


@given(st.text(max_size=30))
def test_endpoint_parses_or_refuses_any_text(text):
    try:
        host, port = prom.endpoint(text, "x")
    except net.LabError:
        return
    assert 0 < port < 65536 and host and text.endswith(f":{port}") and host in text


@given(st.ip_addresses(v=4).map(str), st.integers(1, 65535))
def test_endpoint_round_trip(host, port):
    assert prom.endpoint(f"{host}:{port}", "x") == (host, port)


@needs_prometheus
def test_generated_configuration_passes_promtool(tmp_path):
    text = prom.render_config({"dc2-dr": "10.213.0.12:9808", "dc1-app": "10.213.0.11:9808"}, [RULES])
    path = tmp_path / "prometheus.yml"
    path.write_text(text)
    p = subprocess.run(["promtool", "check", "config", str(path)], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "job_name: replicator" in text and "scrape_interval: 2s" in text
    assert text.index('labels: {node: "dc1-app"}') < text.index('labels: {node: "dc2-dr"}')
    assert f"  - {json.dumps(RULES)}\n" in text


def test_configuration_needs_valid_targets():
    with pytest.raises(net.LabError, match="no lab host has a metrics endpoint"):
        prom.render_config({}, [])
    with pytest.raises(net.LabError, match="host dc1-app: replicator_agent_metrics_listen: "
                                           "expected HOST:PORT"):
        prom.render_config({"dc1-app": "10.213.0.11"}, [])


# ---------------------------------------------------------------- the process

@pytest.fixture
def lab_dir(tmp_path):
    p = prom.LabPrometheus(str(tmp_path))
    yield str(tmp_path)
    p.down()


@needs_prometheus
def test_up_is_idempotent_reloads_and_down_stops_it(lab_dir):
    p, listen = prom.LabPrometheus(lab_dir), f"127.0.0.1:{free_port()}"
    url = p.url(listen)
    assert p.up(listen, {"a": "127.0.0.1:9"}, [RULES]) is True
    pid = p.pid()
    assert pid and p.status(listen) == {"running": True, "pid": pid, "url": url,
                                        "config": os.path.join(lab_dir, "prometheus", "prometheus.yml")}
    rules = get(url + "/api/v1/rules")["data"]["groups"]
    assert any(r["name"] == "ReplicatorAgentDown" for g in rules for r in g["rules"])
    assert p.up(listen, {"a": "127.0.0.1:9"}, [RULES]) is False and p.pid() == pid  # no second one

    assert p.up(listen, {"a": "127.0.0.1:9", "b": "127.0.0.1:10"}, [RULES]) is True
    assert p.pid() == pid  # reloaded, not restarted
    wait_until(lambda: {t["labels"]["node"] for t in get(url + "/api/v1/targets")["data"]
                        ["activeTargets"]} == {"a", "b"}, 20, "the reloaded scrape targets")

    assert p.down() is True
    assert p.cmdline(pid) is None and not os.path.exists(os.path.join(lab_dir, "prometheus"))
    assert p.down() is False


@needs_prometheus
def test_down_never_signals_a_process_that_is_not_ours(lab_dir):
    p = prom.LabPrometheus(lab_dir)
    other = subprocess.Popen(["sleep", "60"])
    try:
        os.makedirs(p.dir)
        with open(p.pidfile, "w") as f:
            f.write(f"{other.pid}\n")  # a stale PID file naming a reused PID
        assert p.pid() is None
        assert p.down() is True  # removes the directory, signals nothing
        assert other.poll() is None
    finally:
        other.kill()
        other.wait()


@needs_prometheus
def test_a_prometheus_that_cannot_start_says_why(lab_dir):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        listen = f"127.0.0.1:{busy.getsockname()[1]}"
        with pytest.raises(net.LabError, match="prometheus exited at start with 1; see .*prometheus.log"):
            prom.LabPrometheus(lab_dir).up(listen, {"a": "127.0.0.1:9"}, [])


@needs_prometheus
def test_metrics_playbook_names_every_link_without_a_series(lab_dir):
    """metrics.yml against a real Prometheus that has no replicator series (its one target
    does not answer): a row per link of the lab inventory, each missing, and a failure
    naming them."""
    p, listen = prom.LabPrometheus(lab_dir), f"127.0.0.1:{free_port()}"
    p.up(listen, {"dc1-app": "127.0.0.1:9"}, [])
    out = playbook("metrics.yml", "-e", f"replicator_prometheus_url={p.url(listen)}",
                   "-e", "replicator_metrics_timeout=1", check=False)
    links = Lab().links()
    for group, source, target in links:
        assert f"{group} " in out and f" {source} -> {target} " in out
    assert out.count(" missing\n") == len(links), out
    assert ("no replicator_target_lag_seconds for "
            + ", ".join(f"{g} {s} -> {t}" for g, s, t in links)) in " ".join(out.split()), out


# ---------------------------------------------------------------- one row per link

GROUPS = [{"name": "db", "primary": "a", "links": [{"from": "a", "to": "b"}, {"from": "b", "to": "c"}]},
          {"name": "files", "primary": "a", "links": [{"from": "a", "to": "c"}]}]


def answer(series):
    return {"status": "success", "data": {"resultType": "vector", "result": [
        {"metric": {"__name__": "replicator_target_lag_seconds", "group": g, "node": n, "target": t,
                    "job": "replicator"}, "value": [1700000000.0, str(v)]}
        for (g, n, t), v in series]}}


def test_rows_per_link_with_missing_and_undeclared_links():
    out = LINKS(GROUPS, answer([(("db", "a", "b"), 0.25), (("files", "a", "c"), 3),
                                (("files", "a", "c"), 1), (("db", "c", "b"), 0)]),
                column="LAG S")
    assert out["lines"] == ["GROUP  LINK    LAG S",
                            "db     a -> b  0.2",
                            "db     b -> c  missing",
                            "files  a -> c  3.0",  # the worst of its series
                            "db     c -> b  0.0 (not in the inventory)"]
    assert out["missing"] == ["db b -> c"] and out["extra"] == ["db c -> b"]


@pytest.mark.parametrize("response, message", [
    ({"status": "error", "error": "parse error"}, "not a successful Prometheus answer"),
    ({"status": "success", "data": {"resultType": "matrix", "result": []}}, "instant vector"),
    ({"status": "success", "data": {"resultType": "vector", "result": [
        {"metric": {"group": "db", "target": "b"}, "value": [0, "1"]}]}}, "labels group, node"),
])
def test_rows_refuse_what_is_not_a_labelled_vector(response, message):
    with pytest.raises(ValueError, match=message):
        LINKS(GROUPS, response)


NODES = st.sampled_from(["a", "b", "c", "d"])
LINK = st.tuples(st.sampled_from(["db", "files"]), NODES, NODES)


@given(st.lists(LINK, max_size=8, unique=True),
       st.lists(st.tuples(LINK, st.floats(0, 1e6)), max_size=12))
def test_every_link_gets_exactly_one_row(links, series):
    groups = [{"name": name, "links": [{"from": s, "to": t} for g, s, t in links if g == name]}
              for name in ("db", "files")]
    out = LINKS(groups, answer(series))
    have = {key for key, _ in series}
    declared = [lk for g in groups for lk in ((g["name"], x["from"], x["to"]) for x in g["links"])]
    assert len(out["lines"]) == 1 + len(declared) + len(have - set(declared))
    assert out["missing"] == [f"{g} {s} -> {t}" for g, s, t in declared if (g, s, t) not in have]
    assert sorted(out["extra"]) == sorted(f"{g} {s} -> {t}" for g, s, t in have - set(declared))
