"""reload.py: the diff of two configs, by name, and which keys the agent takes live."""

import dataclasses

import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from replicator import config, reload
from replicator.config import parse
from replicator.reload import ANY, KEYS, RESTART, classify, diff, key_text

BASE = """
node: dc1
listen: 127.0.0.1:7801
nbd_listen: 127.0.0.1:10801
state_dir: /var/lib/replicator
tls: false
peers: {dc2: 127.0.0.1:7802, dc3: 127.0.0.1:7803}
groups:
  - name: db
    role: primary
    journal_size: 64MiB
    volumes:
      - {name: data, path: /srv/data.img, size: 16MiB}
      - {name: log, path: /srv/log.img, size: 4MiB}
    targets:
      - {node: dc2, mode: sync}
"""


def cfg(edit=None) -> config.Config:
    data = yaml.safe_load(BASE)
    if edit:
        edit(data)
    return parse(data, source_path="/etc/replicator/agent.yml")


def keys(changes) -> list[str]:
    return [c.key for c in changes]


def test_the_same_config_has_no_changes_and_where_it_was_read_is_none():
    a = cfg()
    assert diff(a, cfg()) == []
    assert diff(a, dataclasses.replace(a, source_path="/elsewhere.yml")) == []


def test_a_target_added_is_one_change_of_its_own_key_and_live():
    def add(d):
        d["groups"][0]["targets"].append({"node": "dc3", "mode": "async", "compress": "zstd"})
    changes = diff(cfg(), cfg(add))
    assert keys(changes) == ["groups[db].targets[dc3]"]
    assert changes[0].old is None and changes[0].new["mode"] == "async"
    assert changes[0].new["compress"] == "zstd"
    assert reload.restart_required(changes) == []
    back = diff(cfg(add), cfg())
    assert keys(back) == ["groups[db].targets[dc3]"] and back[0].new is None


def test_mode_rate_peer_and_timer_changes_are_live():
    def edit(d):
        d["groups"][0]["targets"][0]["mode"] = "async"
        d["groups"][0]["resync_rate"] = "10MiB"
        d["peers"]["dc2"] = "127.0.0.2:7802"
        d["heartbeat_timeout"] = 7
        d["log_level"] = "debug"
    changes = diff(cfg(), cfg(edit))
    assert keys(changes) == ["groups[db].resync_rate", "groups[db].targets[dc2].mode",
                             "heartbeat_timeout", "log_level", "peers[dc2]"]
    assert changes[1].as_dict() == {"key": "groups[db].targets[dc2].mode", "from": "sync",
                                    "to": "async"}
    assert changes[4].old == "127.0.0.1:7802" and changes[4].new == "127.0.0.2:7802"
    assert reload.restart_required(changes) == []


def test_identity_listeners_and_volumes_need_a_restart():
    def edit(d):
        d["nbd_listen"] = "127.0.0.1:10901"
        d["groups"][0]["volumes"][0]["size"] = "32MiB"
        d["groups"][0]["volumes"].pop()
        d["groups"][0]["journal_size"] = "128MiB"
        d["groups"][0]["targets"][0]["mode"] = "async"  # live, but with the rest: nothing
    changes = diff(cfg(), cfg(edit))
    assert reload.restart_required(changes) == [
        "groups[db].journal_size", "groups[db].volumes[data].size", "groups[db].volumes[log]",
        "nbd_listen"]
    assert changes[-1].as_dict() == {"key": "nbd_listen", "from": "127.0.0.1:10801",
                                     "to": "127.0.0.1:10901"}
    assert "groups[db].targets[dc2].mode" in keys(changes)


def test_a_list_reordered_is_no_change():
    def two(d):
        d["groups"][0]["targets"].append({"node": "dc3", "mode": "async"})

    def swapped(d):
        two(d)
        d["groups"][0]["targets"].reverse()
        d["groups"][0]["volumes"].reverse()
    assert diff(cfg(two), cfg(swapped)) == []


def test_a_group_added_needs_a_restart():
    def edit(d):
        d["groups"].append({"name": "web", "role": "primary", "volumes": [
            {"name": "www", "path": "/srv/www.img", "size": "4MiB"}]})
    changes = diff(cfg(), cfg(edit))
    assert keys(changes) == ["groups[web]"]
    assert reload.restart_required(changes) == ["groups[web]"]


def test_outcome_shape():
    def edit(d):
        d["node"] = "dc9"
    out = reload.outcome(diff(cfg(), cfg(edit)), dry_run=True)
    assert out == {"reloaded": False, "dry_run": True,
                   "changes": [{"key": "node", "from": "dc1", "to": "dc9"}],
                   "restart_required": ["node"], "errors": []}


def test_key_text():
    assert key_text(("groups", "db.1", "targets", "dc2", "mode")) == "groups[db.1].targets[dc2].mode"
    assert key_text(("peers", "dc2")) == "peers[dc2]" and key_text(("tls",)) == "tls"


def _field_keys(cls, prefix):
    """The KEYS pattern of every field of the config dataclass `cls` under `prefix`,
    the field that names an item (it is its key) left out."""
    nested = {"groups": (config.GroupConfig, "name"), "volumes": (config.VolumeConfig, "name"),
              "targets": (config.TargetConfig, "node")}
    for f in dataclasses.fields(cls):
        if not f.compare:
            continue
        if f.name in nested:
            item, naming = nested[f.name]
            yield prefix + (f.name, ANY)
            yield from (k for k in _field_keys(item, prefix + (f.name, ANY))
                        if k != prefix + (f.name, ANY, naming))
        elif f.name == "peers":
            yield prefix + ("peers", ANY)
        else:
            yield prefix + (f.name,)


def test_every_config_field_is_classified_on_purpose():
    """A field added to config.py must be put in KEYS (as live only if the agent takes it)."""
    fields = set(_field_keys(config.Config, ()))
    assert fields - set(KEYS) == set(), "config fields reload.KEYS does not name"
    assert set(KEYS) - fields == set(), "reload.KEYS names keys the config does not have"


# Near misses too: the segments KEYS uses, in other places and with other names.
_segment = st.one_of(
    st.text(st.characters(min_codepoint=97, max_codepoint=122), min_size=1, max_size=8),
    st.sampled_from(sorted({s for pattern in KEYS for s in pattern if s != ANY})))


def _named(path) -> bool:
    return any(len(p) == len(path) and all(x in (ANY, y) for x, y in zip(p, path))
               for p in KEYS)


@settings(max_examples=500, deadline=None)
@given(st.lists(_segment, min_size=1, max_size=6).map(tuple))
def test_a_key_keys_does_not_name_is_never_live(path):
    if not _named(path):
        assert classify(path) == RESTART


_target = st.fixed_dictionaries({
    "node": st.sampled_from(["dc2", "dc3"]),
    "mode": st.sampled_from(["sync", "async"]),
    "compress": st.sampled_from(["none", "zstd"]),
    "on_disconnect": st.sampled_from(["continue", "block"])})


@st.composite
def _configs(draw):
    data = yaml.safe_load(BASE)
    g = data["groups"][0]
    targets = draw(st.lists(_target, max_size=2, unique_by=lambda t: t["node"]))
    g["targets"] = targets
    g["resync_rate"] = draw(st.sampled_from([0, "1MiB", "64MiB"]))
    data["heartbeat_timeout"] = draw(st.sampled_from([5, 9.5]))
    data["log_level"] = draw(st.sampled_from(["info", "debug"]))
    if draw(st.booleans()):
        data["peers"]["dc4"] = "127.0.0.1:7804"
    return parse(data)


@settings(max_examples=200, deadline=None)
@given(_configs(), _configs())
def test_diff_is_empty_exactly_for_equal_configs_and_these_changes_are_live(a, b):
    assert diff(a, a) == [] and diff(b, b) == []
    assert (diff(a, b) == []) == (a == b)
    assert reload.restart_required(diff(a, b)) == []  # only live keys differ here
    assert keys(diff(a, b)) == keys(diff(b, a))
