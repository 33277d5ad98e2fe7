"""`--target NODE:MODE[:OPTION...]` (MODE sync, async or periodic=INTERVAL) of `replicator promote` and `attach`: every option the
topology's links have (compression, bunker, on_disconnect), and clear refusals."""

import pytest

from replicator.cli import parse_target


@pytest.mark.parametrize("spec, want", [
    ("dc2-dr:sync", {"node": "dc2-dr", "mode": "sync", "compress": "none", "bunker": False,
                     "on_disconnect": "continue"}),
    ("dc3-arc:async:zstd", {"node": "dc3-arc", "mode": "async", "compress": "zstd",
                            "bunker": False, "on_disconnect": "continue"}),
    ("k:sync:bunker:block", {"node": "k", "mode": "sync", "compress": "none", "bunker": True,
                             "on_disconnect": "block"}),
    ("k:sync:block:bunker", {"node": "k", "mode": "sync", "compress": "none", "bunker": True,
                             "on_disconnect": "block"}),
    ("far:periodic=30s:zstd", {"node": "far", "mode": "periodic", "compress": "zstd",
                               "bunker": False, "on_disconnect": "continue", "interval": 30.0}),
])
def test_target_specs(spec, want):
    assert parse_target(spec) == want


@pytest.mark.parametrize("spec, message", [
    ("dc2-dr", "expected NODE:sync|async"),
    (":sync", "expected NODE:sync|async"),
    ("dc2-dr:asnyc", "expected NODE:sync|async"),
    ("dc2-dr:sync:gzip", "unknown or repeated option(s) gzip"),
    ("dc2-dr:sync:zstd:zstd", "unknown or repeated option(s) zstd, zstd"),
    ("far:periodic", "expected NODE:sync|async|periodic=INTERVAL"),
    ("far:async=10s", "expected NODE:sync|async|periodic=INTERVAL"),
    ("far:periodic=soon", "interval: expected a duration like 10s"),
])
def test_bad_target_specs_are_refused(spec, message):
    with pytest.raises(ValueError) as exc:
        parse_target(spec)
    assert message in str(exc.value) and repr(spec) in str(exc.value)
