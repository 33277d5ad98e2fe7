"""Replica analytics: rates over windows, hot regions, overwrite share, compressibility
and the delta ratio computed from synthetic workloads on a fake clock; and the
`status --analytics` table of a replication tree."""

import json
import os
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from replicator.analytics import BLOCK, HISTORY, REGIONS_PER_SLOT, Analytics
from replicator.cli import analytics_table
from replicator.journal.record import Kind

MiB = 1 << 20
PAGE = bytes(BLOCK)


class Clock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def workload(a: Analytics, clock: Clock, *, rate: int, seconds: int, offsets, length=BLOCK,
             kind=Kind.WRITE, payload=PAGE, volume="vm"):
    """`rate` records a second for `seconds` of the clock, at the offsets given."""
    offsets = iter(offsets)
    for _ in range(seconds):
        start = clock.now
        for i in range(rate):
            clock.now = start + i / rate
            a.observe(volume, next(offsets), length, kind,
                      payload if kind == Kind.WRITE else b"", 0)
        clock.now = start + 1


def test_known_rates_over_each_window():
    clock = Clock()
    a = Analytics(clock=clock)
    workload(a, clock, rate=100, seconds=20, offsets=(BLOCK * i for i in range(2000)))
    r = a.report()
    v = r["volumes"]["vm"]
    assert r["observed_s"] == 20
    assert v["writes"] == 2000 and v["bytes"] == 2000 * BLOCK
    # 60 s and 300 s are longer than what was observed: they divide by the 20 s
    assert v["writes_per_s"] == {"10s": 100.0, "60s": 100.0, "300s": 100.0}
    assert v["bytes_per_s"] == {"10s": 409600.0, "60s": 409600.0, "300s": 409600.0}
    json.dumps(r)  # the status tree carries it as it is


def test_rates_fall_as_the_writes_age_out_of_the_windows():
    clock = Clock()
    a = Analytics(clock=clock)
    workload(a, clock, rate=50, seconds=10, offsets=(BLOCK * i for i in range(500)))
    clock.now += 50  # 60 s after the first write, 50 s after the last
    v = a.report()["volumes"]["vm"]
    assert v["writes_per_s"]["10s"] == 0.0
    assert v["writes_per_s"]["60s"] == pytest.approx(500 / 60)
    assert sum(r["writes"] for r in v["hot_regions"]) == 500  # still inside the 300 s
    clock.now += HISTORY
    v = a.report()["volumes"]["vm"]
    assert v["writes_per_s"] == {"10s": 0.0, "60s": 0.0, "300s": 0.0}
    assert v["hot_regions"] == [] and v["compressibility"] is None
    assert v["writes"] == 500  # the totals stay


def test_a_hot_range_is_first_in_hot_regions():
    rng = random.Random(17)
    hot = 37 * MiB
    offsets = (hot + rng.randrange(256) * BLOCK if rng.random() < 0.9
               else rng.randrange(1024 * 256) * BLOCK for _ in range(3000))
    clock = Clock()
    a = Analytics(clock=clock)
    workload(a, clock, rate=100, seconds=30, offsets=offsets)
    regions = a.report()["volumes"]["vm"]["hot_regions"]
    assert len(regions) == 8
    assert regions[0]["offset"] == hot and regions[0]["length"] == MiB
    assert 0.85 * 3000 < regions[0]["writes"] <= 3000
    assert regions[0]["bytes"] == regions[0]["writes"] * BLOCK
    assert all(r["writes"] < 20 for r in regions[1:])


def test_a_hot_region_stands_out_among_more_regions_than_a_second_counts():
    """A second writing more distinct regions than it has counters (Misra-Gries): the
    hot region is still first, its count never above the truth nor far below it."""
    clock = Clock()
    a = Analytics(clock=clock)
    spread = iter(range(100, 100 + 10 * REGIONS_PER_SLOT))
    offsets = [5 * MiB if i % 10 else next(spread) * MiB for i in range(5000)]
    workload(a, clock, rate=5000, seconds=1, offsets=offsets)
    first = a.report()["volumes"]["vm"]["hot_regions"][0]
    assert first["offset"] == 5 * MiB
    assert 4500 - 5000 / (REGIONS_PER_SLOT + 1) <= first["writes"] <= 4500


def test_region_size_is_the_constructors():
    clock = Clock()
    a = Analytics(region_size=64 * 1024, clock=clock)
    workload(a, clock, rate=10, seconds=1, offsets=[200 * 1024] * 10)
    clock.now += 1
    assert a.report()["volumes"]["vm"]["hot_regions"] == [
        {"offset": 192 * 1024, "length": 64 * 1024, "writes": 10, "bytes": 10 * BLOCK}]


def test_rewriting_half_of_what_was_written_is_half_overwrite():
    clock = Clock()
    a = Analytics(clock=clock)
    workload(a, clock, rate=256, seconds=2,
             offsets=[BLOCK * i for i in range(256)] + [BLOCK * i for i in range(256)])
    assert a.report()["volumes"]["vm"]["overwrite_share"] == 0.5


def test_overwrite_share_counts_the_bytes_on_blocks_written_before():
    clock = Clock()
    a = Analytics(sizes={"vm": 64 * MiB}, clock=clock)
    a.observe("vm", 100, 10, Kind.WRITE, bytes(10), 0)  # block 0 is now written
    a.observe("vm", 4000, 200, Kind.WRITE, bytes(200), 0)  # 96 bytes in block 0, 104 in 1
    a.observe("vm", 0, 3 * BLOCK, Kind.WRITE, bytes(3 * BLOCK), 0)  # blocks 0, 1 again
    assert a.report()["volumes"]["vm"]["overwrite_share"] == (96 + 2 * BLOCK) / (
        10 + 200 + 3 * BLOCK)


def test_zero_records_count_as_writes_without_payload_and_skips_not_at_all():
    clock = Clock()
    a = Analytics(clock=clock)
    a.observe("vm", 0, 8 << 30, Kind.ZERO, b"", 0)  # a whole-device discard: 2 M blocks
    a.observe("vm", 5 << 30, BLOCK, Kind.WRITE, os.urandom(BLOCK), 0)
    for _ in range(100):
        a.observe("vm", 0, 0, Kind.SKIP, b"", 0)
    a.observe("other", 0, 0, Kind.SKIP, b"", 0)
    clock.now += 1
    r = a.report()
    assert list(r["volumes"]) == ["vm"]  # a volume only skipped is not there
    v = r["volumes"]["vm"]
    assert v["writes"] == 2 and v["bytes"] == (8 << 30) + BLOCK
    assert v["writes_per_s"]["10s"] == 2.0  # observed for 1 s only
    assert v["overwrite_share"] == BLOCK / ((8 << 30) + BLOCK)
    assert v["sampled_bytes"] == BLOCK  # the ZERO had nothing to sample
    assert v["compressibility"] > 0.95


def test_compressibility_of_zeroes_and_of_random_bytes():
    for payload, low, high in ((bytes(64 * 1024), 0.0, 0.05),
                               (os.urandom(64 * 1024), 0.95, 1.05)):
        clock = Clock()
        a = Analytics(clock=clock)
        workload(a, clock, rate=10, seconds=3, offsets=(i * 64 * 1024 for i in range(30)),
                 length=len(payload), payload=payload)
        v = a.report()["volumes"]["vm"]
        assert v["sampled_bytes"] == 30 * 64 * 1024
        assert low < v["compressibility"] < high


def test_the_sample_budget_holds_whatever_the_write_rate():
    clock = Clock()
    a = Analytics(clock=clock)
    payload = os.urandom(MiB)
    workload(a, clock, rate=100, seconds=1, offsets=(i * MiB for i in range(100)),
             length=MiB, payload=payload)  # 100 MiB in one second
    v = a.report()["volumes"]["vm"]
    assert v["bytes_per_s"]["10s"] == 100 * MiB
    assert v["sampled_bytes"] == MiB
    a = Analytics(sample_bytes=0, clock=clock)
    a.observe("vm", 0, MiB, Kind.WRITE, payload, 0)
    clock.now += 1
    assert a.report()["volumes"]["vm"]["compressibility"] is None


def test_the_delta_ratio_is_processed_over_raw():
    clock = Clock()
    a = Analytics(clock=clock)
    assert a.report()["delta_ratio"] is None
    for _ in range(10):
        a.delta(BLOCK, 100)
    a.delta(BLOCK, 0)
    clock.now += 1
    assert a.report()["delta_ratio"] == 1000 / (11 * BLOCK)
    clock.now += HISTORY + 1
    assert a.report()["delta_ratio"] is None


def test_an_empty_analytics_reports_zeros_and_none():
    clock = Clock()
    assert Analytics(clock=clock).report() == {
        "observed_s": 0, "region_size": MiB, "delta_ratio": None, "volumes": {}}
    a = Analytics(sizes={"vm": 10 * MiB}, clock=clock)
    clock.now += 5
    assert a.report()["volumes"]["vm"] == {
        "writes": 0, "bytes": 0,
        "writes_per_s": {"10s": 0.0, "60s": 0.0, "300s": 0.0},
        "bytes_per_s": {"10s": 0.0, "60s": 0.0, "300s": 0.0},
        "hot_regions": [], "overwrite_share": None, "compressibility": None,
        "sampled_bytes": 0, "last_write_time_ns": None}


def test_the_newest_journal_time_is_reported():
    a = Analytics(clock=Clock())
    a.observe("vm", 0, BLOCK, Kind.WRITE, PAGE, 1_700_000_000_000_000_000)
    a.observe("vm", 0, BLOCK, Kind.WRITE, PAGE, 1_700_000_000_500_000_000)
    assert a.report()["volumes"]["vm"]["last_write_time_ns"] == 1_700_000_000_500_000_000


@pytest.mark.parametrize("kwargs, message", [
    ({"region_size": 0}, "region_size must be a positive number of bytes, not 0"),
    ({"region_size": 1.5}, "region_size must be a positive number of bytes, not 1.5"),
    ({"sample_bytes": -1}, "sample_bytes must be a number of bytes >= 0, not -1"),
    ({"sizes": {"vm": -4096}}, "size of volume 'vm' must be a number of bytes >= 0"),
])
def test_bad_constructor_arguments_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Analytics(**kwargs)


def test_bad_records_and_deltas_are_refused():
    a = Analytics(clock=Clock())
    with pytest.raises(ValueError, match="record of volume 'vm' at offset 0 has unknown kind 7"):
        a.observe("vm", 0, BLOCK, 7, PAGE, 0)
    with pytest.raises(ValueError, match="record of volume 'vm' at offset -4096 length 4096"):
        a.observe("vm", -BLOCK, BLOCK, Kind.WRITE, PAGE, 0)
    with pytest.raises(ValueError, match="delta of 10 raw bytes to -1"):
        a.delta(10, -1)


records = st.lists(st.tuples(
    st.sampled_from(["a", "b"]),
    st.integers(0, 16 * MiB),  # offset: 16 regions, so the hot regions are exact
    st.integers(0, 40 * BLOCK),  # length: straddles blocks and bitmap bytes
    st.sampled_from([Kind.WRITE, Kind.ZERO, Kind.SKIP]),
    st.sampled_from([0.0, 0.0, 0.3, 1.0, 7.0, 120.0]),  # clock step before it
), max_size=60)


@settings(max_examples=200, deadline=None)
@given(records, st.sampled_from([0.0, 1.0, 30.0, 400.0]))
def test_any_records_keep_the_invariants(recs, after):
    """Checked against a plain model: a set of written blocks and a list of records."""
    clock = Clock(0.0)
    a = Analytics(clock=clock)
    written: dict[str, set[int]] = {}
    overwritten: dict[str, int] = {}
    seen = []  # (second, volume, offset, length) of each counted record
    zeroes = bytes(40 * BLOCK)
    for volume, offset, length, kind, step in recs:
        clock.now += step
        a.observe(volume, offset, length, kind, zeroes[:length] if kind == Kind.WRITE else b"",
                  0)
        if kind == Kind.SKIP:
            continue
        seen.append((int(clock.now), volume, offset, length))
        blocks = written.setdefault(volume, set())
        for b in range(offset // BLOCK, (offset + length + BLOCK - 1) // BLOCK if length else 0):
            if b in blocks:
                overwritten[volume] = overwritten.get(volume, 0) + (
                    min(offset + length, (b + 1) * BLOCK) - max(offset, b * BLOCK))
            blocks.add(b)
    clock.now += after
    r = a.report()
    now = int(clock.now)
    assert r["observed_s"] == now
    assert sorted(r["volumes"]) == sorted(written)
    for name, v in r["volumes"].items():
        mine = [s for s in seen if s[1] == name]
        assert v["writes"] == len(mine) and v["bytes"] == sum(s[3] for s in mine)
        share = v["overwrite_share"]
        assert (share is None) == (v["bytes"] == 0)
        if share is not None:
            assert 0 <= share <= 1
            assert share == pytest.approx(overwritten.get(name, 0) / v["bytes"])
        for window, rate in v["writes_per_s"].items():
            span = min(int(window[:-1]), now)
            assert rate >= 0 and v["bytes_per_s"][window] >= 0
            assert rate * span == pytest.approx(
                sum(1 for s in mine if now - span <= s[0] < now))
        window = [s for s in mine if now - HISTORY <= s[0] < now]
        assert sum(h["writes"] for h in v["hot_regions"]) <= len(window)
        exact: dict[int, list[int]] = {}
        for s in window:
            counts = exact.setdefault(s[2] // MiB, [0, 0])
            counts[0] += 1
            counts[1] += s[3]
        want = sorted(exact.items(), key=lambda i: (-i[1][0], -i[1][1], i[0]))[:8]
        assert [(h["offset"] // MiB, [h["writes"], h["bytes"]])
                for h in v["hot_regions"]] == want
        comp = v["compressibility"]
        assert comp is None or comp > 0


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 1 << 21), st.integers(1, 1 << 21)), max_size=12))
def test_long_ranges_mark_their_blocks_exactly(ranges):
    """Block-aligned ZEROs of up to 8 GiB (the bitmap is set a chunk at a time): the
    overwritten bytes are those of blocks set before, as a Python int counts them."""
    clock = Clock()
    a = Analytics(clock=clock)
    model = overwritten = total = 0
    for first, count in ranges:
        mask = ((1 << count) - 1) << first
        overwritten += (model & mask).bit_count() * BLOCK
        total += count * BLOCK
        model |= mask
        a.observe("vm", first * BLOCK, count * BLOCK, Kind.ZERO, b"", 0)
    share = a.report()["volumes"]["vm"]["overwrite_share"] if ranges else None
    assert share == (overwritten / total if ranges else None)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 1000), st.integers(1, 3 * BLOCK),
                          st.sampled_from([0.0, 0.0, 0.0, 0.6])), min_size=1, max_size=600))
def test_hot_region_counts_are_never_above_the_truth(recs):
    """More regions in a second than it has counters: each count is at most the true
    one, and low by at most the window's writes / (REGIONS_PER_SLOT + 1)."""
    clock = Clock(0.0)
    a = Analytics(region_size=BLOCK, clock=clock)
    exact: dict[int, list[int]] = {}
    for block, length, step in recs:
        clock.now += step
        a.observe("vm", block * BLOCK, length, Kind.WRITE, bytes(length), 0)
        counts = exact.setdefault(block, [0, 0])
        counts[0] += 1
        counts[1] += length
    clock.now += 1
    hot = a.report()["volumes"]["vm"]["hot_regions"]
    for h in hot:
        writes, nbytes = exact[h["offset"] // BLOCK]
        assert writes - len(recs) / (REGIONS_PER_SLOT + 1) <= h["writes"] <= writes
        assert 0 < h["bytes"] <= nbytes


def test_the_tree_table_indents_each_node_by_its_depth():
    clock = Clock()
    a = Analytics(clock=clock)
    a.delta(1000, 100)
    workload(a, clock, rate=100, seconds=12, offsets=[3 * MiB] * 1200, payload=PAGE)
    leaf = {"node": "dc3-arc", "role": "secondary", "applied_seq": 1190, "lag_records": 10,
            "lag_seconds": 1.5, "analytics": a.report(), "children": []}
    mid = {"node": "dc2-dr", "role": "secondary", "applied_seq": 1200, "lag_records": 0,
           "lag_seconds": 0.0, "analytics": None, "children": [leaf]}
    root = {"node": "dc1-app", "role": "primary", "applied_seq": 1200, "lag_records": None,
            "lag_seconds": None, "analytics": None, "children": [mid]}
    assert analytics_table(root).splitlines() == [
        "dc1-app  role:primary  applied:1200  (no analytics)",
        "  -> dc2-dr  role:secondary  applied:1200  lag:0 rec/0.0s  (no analytics)",
        "    -> dc3-arc  role:secondary  applied:1190  lag:10 rec/1.5s  observed:12s  "
        "delta:0.10",
        "       volume vm           100 w/s 400.0KiB/s  overwrite:100%  compress:0.00  "
        "hot:3.0MiB+1.0MiB (1200 writes)",
    ]
