"""monitoring/: the alert rules pass promtool's check and unit tests, the Grafana dashboard
is well formed, and every expression in either names only series the agent exports."""

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from replicator.metrics import METRIC_NAMES

MONITORING = Path(__file__).resolve().parents[2] / "monitoring"
ALERTS = MONITORING / "alerts.yml"
ALERT_TESTS = MONITORING / "alerts.test.yml"
DASHBOARD = MONITORING / "dashboard.json"
DATASOURCE = "${datasource}"
EXPECTED_ALERTS = {
    "ReplicatorLagOverObjective", "ReplicatorLinkNotReplicating", "ReplicatorSplitBrain",
    "ReplicatorTargetStalled", "ReplicatorJournalNearlyFull", "ReplicatorCertificateExpiring",
    "ReplicatorCrlExpiring",
    "ReplicatorAgentDown", "ReplicatorWritesHalted",
}
# Grafana's variables, as Prometheus would see them once Grafana substituted them.
GRAFANA_VARIABLES = {"$group": ".*", "$__rate_interval": "1m"}

needs_promtool = pytest.mark.skipif(
    shutil.which("promtool") is None,
    reason="promtool is not installed (scripts/setup.sh installs the Debian package prometheus)")

# PromQL strings ("...", '...', `...`), label matchers ({...}) and label lists after
# by/without/on/ignoring/group_left/group_right hold label names and values, never a
# metric name; what remains names series.
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_LABEL_LIST = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_METRIC = re.compile(r"(?<![\w:])replicator_[A-Za-z0-9_:]*")
_HISTOGRAM_SUFFIX = re.compile(r"_(?:bucket|sum|count)$")


def metric_names(expr: str) -> set[str]:
    """The replicator_ series an expression reads, a histogram's _bucket/_sum/_count
    named by the histogram's base name."""
    code = _LABEL_LIST.sub(" ", _MATCHERS.sub(" ", _STRING.sub(" ", expr)))
    return {_HISTOGRAM_SUFFIX.sub("", name) for name in _METRIC.findall(code)}


def alert_rules() -> list[dict]:
    (group,) = yaml.safe_load(ALERTS.read_text())["groups"]
    assert group["name"] == "replicator"
    return group["rules"]


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_queries(dash: dict) -> list[str]:
    """Every PromQL expression of the dashboard's panels."""
    return [t["expr"] for p in dash["panels"] for t in p["targets"]]


def variable(dash: dict, name: str) -> dict:
    (var,) = [v for v in dash["templating"]["list"] if v["name"] == name]
    return var


# --- the extraction of metric names itself -------------------------------------------

_name_tail = st.from_regex(r"[a-z][a-z0-9_]{0,15}", fullmatch=True)
_label = st.sampled_from(["group", "target", "volume", "le", "state", "replicator_role"])
_value = st.text(alphabet=st.characters(codec="ascii", exclude_categories=("Cc",)), max_size=20)


def _quoted(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


@st.composite
def _selector(draw):
    """A series selector and the name the extraction must report for it (or None)."""
    ours = draw(st.booleans())
    others = st.sampled_from(["up", "node_load1", "not_replicator_lag"])
    name = "replicator_" + draw(_name_tail) if ours else draw(others)
    suffix = draw(st.sampled_from(["", "_bucket", "_sum", "_count"])) if ours else ""
    matchers = draw(st.lists(st.tuples(_label, st.sampled_from(["=", "=~", "!="]), _value),
                             max_size=3))
    text = name + suffix
    if matchers or draw(st.booleans()):
        text += "{" + ", ".join(f"{k}{op}{_quoted(v)}" for k, op, v in matchers) + "}"
    return text, (_HISTOGRAM_SUFFIX.sub("", name + suffix) if ours else None)


@st.composite
def _expression(draw, depth=3):
    """A PromQL expression and the replicator_ names it reads."""
    if depth == 0 or draw(st.integers(0, 3)) == 0:
        text, name = draw(_selector())
        return text, {name} - {None}
    kind = draw(st.sampled_from(["rate", "sum", "binary", "quantile", "number"]))
    inner, names = draw(_expression(depth - 1))
    if kind == "rate":
        window = draw(st.sampled_from(["5m", "1h30m", "$__rate_interval"]))
        return f"rate({inner}[{window}])", names
    if kind == "sum":
        labels = ", ".join(draw(st.lists(_label, max_size=3)))
        clause = draw(st.sampled_from(["by", "without"]))
        return f"sum {clause} ({labels}) ({inner})", names
    if kind == "quantile":
        return f"histogram_quantile(0.99, sum by (le) ({inner}))", names
    if kind == "number":
        return f"100 * {inner} > 80", names
    right, more = draw(_expression(depth - 1))
    op = draw(st.sampled_from(["+", "/", "and", "unless", "or", ">"]))
    matching = draw(st.sampled_from(["", " on (group, target)", " ignoring (state)",
                                     " on (group) group_left (role)"]))
    return f"{inner} {op}{matching} {right}", names | more


@settings(max_examples=300, deadline=None)
@given(_expression())
def test_metric_names_finds_exactly_the_series_an_expression_reads(case):
    expr, names = case
    assert metric_names(expr) == names


def test_metric_names_maps_histogram_series_to_the_base_and_skips_strings():
    expr = ('histogram_quantile(0.99, sum by (le) (rate('
            'replicator_volume_write_latency_seconds_bucket{group=~"replicator_fake"}[5m])))'
            ' / replicator_volume_flush_latency_seconds_count')
    assert metric_names(expr) == {"replicator_volume_write_latency_seconds",
                                  "replicator_volume_flush_latency_seconds"}


# --- the alert rules -----------------------------------------------------------------

@needs_promtool
def test_promtool_checks_the_rules():
    done = subprocess.run(["promtool", "check", "rules", str(ALERTS)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


@needs_promtool
def test_promtool_unit_tests_of_the_rules_pass():
    done = subprocess.run(["promtool", "test", "rules", str(ALERT_TESTS)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_alert_is_there_with_severity_and_annotations():
    rules = alert_rules()
    assert {r["alert"] for r in rules} == EXPECTED_ALERTS
    for rule in rules:
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert rule["annotations"].keys() == {"summary", "description"}, rule["alert"]


def test_every_alert_has_a_unit_test_that_fires_it():
    fired = {t["alertname"] for case in yaml.safe_load(ALERT_TESTS.read_text())["tests"]
             for t in case["alert_rule_test"] if t["exp_alerts"]}
    assert fired == EXPECTED_ALERTS


def test_alert_expressions_name_only_exported_metrics():
    for rule in alert_rules():
        unknown = metric_names(rule["expr"]) - METRIC_NAMES
        assert not unknown, (
            f"alert {rule['alert']} reads series the agent does not export: {unknown}")


# --- the dashboard -------------------------------------------------------------------

def test_dashboard_is_a_grafana_dashboard_with_its_variables():
    dash = dashboard()
    assert dash["schemaVersion"] >= 38
    source = variable(dash, "datasource")
    assert (source["type"], source["query"]) == ("datasource", "prometheus")
    group = variable(dash, "group")
    assert group["type"] == "query"
    assert group["datasource"]["uid"] == DATASOURCE
    assert re.fullmatch(r"label_values\(replicator_\w+, group\)", group["query"]["query"])


def test_every_panel_queries_the_chosen_datasource():
    dash = dashboard()
    assert dash["panels"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), f"panel ids repeat: {ids}"
    for panel in dash["panels"]:
        assert panel["datasource"] == {"type": "prometheus", "uid": DATASOURCE}, panel["title"]
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == DATASOURCE, panel["title"]


def test_dashboard_expressions_name_only_exported_metrics():
    dash = dashboard()
    queries = dashboard_queries(dash) + [variable(dash, "group")["query"]["query"]]
    for expr in queries:
        names = metric_names(expr)
        assert names, f"dashboard query names no replicator series: {expr}"
        assert not names - METRIC_NAMES, (
            f"dashboard query reads series the agent does not export: {names - METRIC_NAMES}"
            f" in {expr}")


@needs_promtool
def test_dashboard_expressions_are_valid_promql(tmp_path):
    """promtool parses each query (its Grafana variables substituted) as a recording rule."""
    rules = []
    for i, expr in enumerate(dashboard_queries(dashboard())):
        for name, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(name, value)
        assert "$" not in expr, f"a Grafana variable this test does not know: {expr}"
        rules.append({"record": f"dashboard:query_{i}", "expr": expr})
    path = tmp_path / "dashboard_queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    done = subprocess.run(["promtool", "check", "rules", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
