"""Periodic links: a target that gets the group's records in epochs, overwrites inside an
epoch coalesced, applied all or nothing; as a hop of a cascade, when it is away, in
status, and on the wire."""

import struct
import subprocess
import sys
import threading
import time

import pytest

from replicator.drill.nbd_client import NbdClient
from tests.agents import MiB, kinds, replicator_cli, wait_until
from tests.clients import fio, qemu_io
from tests.integration.test_replication import write_patterns

pytestmark = pytest.mark.integration

BLOCK = 4096
COUNTER = struct.Struct("<Q")


def periodic(interval: float) -> dict:
    return {"interval": interval}


class CounterWriter:
    """Writes block (n - 1) % blocks with the counter n, n = 1, 2, ..., one write at a
    time over NBD, until stopped: after any prefix of its writes, block i holds the
    largest n written so far with (n - 1) % blocks == i (0: not written yet)."""

    def __init__(self, agent, volume: str, blocks: int):
        self.client = NbdClient.connect("127.0.0.1", agent.nbd_port, volume)
        self.blocks = blocks
        self.written = 0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            n = 0
            while not self._stop.is_set():
                n += 1
                block = COUNTER.pack(n) * (BLOCK // COUNTER.size)
                self.client.send_write(n, (n - 1) % self.blocks * BLOCK, block)
                cookie, err = self.client.recv_reply()
                assert (cookie, err) == (n, 0), f"write {n}: errno {err}"
                self.written = n
        except BaseException as exc:  # noqa: BLE001 - reported by stop()
            self.error = exc

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(30)
        self.client.close()
        if self.error is not None and exc[0] is None:
            raise self.error


def prefix_image_error(image: bytes, blocks: int) -> str | None:
    """None if `image` is what some prefix of CounterWriter's writes leaves, else why
    not: with w the last write of the prefix (the highest counter), block i must hold
    the largest n <= w with (n - 1) % blocks == i."""
    values = [COUNTER.unpack_from(image, i * BLOCK)[0] for i in range(blocks)]
    w = max(values)
    for i, v in enumerate(values):
        expected = w - (w - 1 - i) % blocks
        if v != max(expected, 0):
            return f"block {i} holds {v}, a prefix through write {w} leaves {max(expected, 0)}"
    return None


def test_periodic_target_converges_to_the_primary(topology):
    topo = topology(["a", "b"], [("a", "b", "periodic", periodic(1))])
    write_patterns(topo["a"])
    fio(topo["a"].nbd_uri("data"), size="1M", extra=["--io_size=12M"])
    seq = topo.wait_converged()
    topo.assert_identical()
    epoch = topo["a"].target("db", "b")["last_epoch"]
    assert epoch["seq"] == seq
    assert topo["a"].target("db", "b")["early_batches"] == 0
    # The replica applied each epoch all at once, and said so.
    applied = kinds(topo["b"], "epoch_applied")
    assert applied and applied[-1]["through_seq"] == seq
    assert all(e["records"] > 0 for e in applied)


def test_replica_only_ever_shows_epoch_images(topology):
    """Each epoch here holds several passes over 1024 blocks (4 MiB, more than one RECORDS
    frame): all but the last pass go as SKIPs, so an image in the middle of an epoch
    (its SKIPs and part of the last pass applied) is not any prefix of the writes."""
    blocks = 1024
    # The journal holds what b has not acked: an interval of the writer's ~40 MB/s and
    # more (a smaller one sends b to logging, and its resyncs show no epoch images).
    topo = topology(["a", "b"], [("a", "b", "periodic", periodic(1.5))],
                    journal_size="512MiB")
    a, b = topo["a"], topo["b"]
    path = b.volume_path("db", "data")
    topo.wait_converged()  # the initial sync done: from here on b only applies epochs
    samples = []
    with CounterWriter(a, "data", blocks) as writer:
        wait_until(lambda: writer.written > blocks, 30, "a first pass over the blocks")
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline:
            before = b.group("db")["applied_seq"]
            with open(path, "rb") as f:
                image = f.read(blocks * BLOCK)
            if b.group("db")["applied_seq"] == before:
                samples.append((before, image))
    assert writer.written > 3 * blocks
    assert a.target("db", "b")["state"] == "replicating"  # no resync came in between
    assert "resync started" not in open(b.log_path).read()
    seqs = sorted({seq for seq, _ in samples})
    assert len(seqs) >= 3, f"the replica applied too few epochs while sampled: {seqs}"
    for seq, image in samples:
        assert prefix_image_error(image, blocks) is None, \
            f"at seq {seq}: {prefix_image_error(image, blocks)}"
    st = a.target("db", "b")["last_epoch"]
    assert st["skipped"] > 0 and st["bytes_after"] < st["bytes_before"]
    topo.wait_converged()
    topo.assert_identical()


@pytest.mark.parametrize("first_hop", ["sync", "periodic"])  # periodic: SKIPs and open
def test_cascade_with_a_periodic_far_hop(topology, first_hop):  # records come in to dc2
    topo = topology(["dc1", "dc2", "dc3"],
                    [("dc1", "dc2", first_hop, *([periodic(0.7)] if first_hop == "periodic"
                                                 else [])),
                     ("dc2", "dc3", "periodic", periodic(1))])
    topo.wait_converged()  # the initial syncs done: what is sent from here on is records
    hops = (("dc1", "dc2"), ("dc2", "dc3"))
    base = {hop: topo[hop[0]].target("db", hop[1])["bytes_sent"] for hop in hops}
    write_patterns(topo["dc1"])
    fio(topo["dc1"].nbd_uri("data"), size="2M", extra=["--io_size=12M"])
    seq = topo.wait_converged()
    topo.assert_identical()
    far = topo["dc2"].target("db", "dc3")
    assert far["mode"] == "periodic" and far["last_epoch"]["seq"] == seq
    sent = {hop: topo[hop[0]].target("db", hop[1])["bytes_sent"] - base[hop] for hop in hops}
    if first_hop == "sync":
        assert sent[hops[1]] < sent[hops[0]], sent  # the far hop's epochs were coalesced
    else:  # what comes in is coalesced already; one far epoch may hold several of them
        assert sent[hops[1]] <= sent[hops[0]], sent


def test_periodic_target_away_logs_and_resyncs(topology):
    topo = topology(["a", "b"], [("a", "b", "periodic", periodic(1))],
                    volumes={"data": 64 * MiB, "log": 16 * MiB}, journal_size="16MiB",
                    heartbeat_timeout=1.5)
    a, b = topo["a"], topo["b"]
    topo.wait_converged()
    b.kill()
    fio(a.nbd_uri("data"), size="48M", extra=["--io_size=8M"])
    qemu_io(a.nbd_uri("data"), "write -P 0x5c 8M 24M")
    t = wait_until(lambda: (lambda t: t if t["state"] == "logging" else None)(
        a.target("db", "b")), 20, "b to be logging")
    assert t["dirty_bytes"] > 0
    b.start()
    topo.wait_converged(120)
    topo.assert_identical()
    assert "resync complete" in open(a.log_path).read()
    qemu_io(a.nbd_uri("log"), "write -P 0x5d 0 1M")  # epochs again after the resync
    seq = topo.wait_converged()
    assert a.target("db", "b")["last_epoch"]["seq"] == seq


def test_an_interval_of_more_than_the_journal_keeps_goes_early(topology):
    """An interval's writes would be more than logging_high_water (48 MiB of a 64 MiB
    journal): an epoch goes once it holds half of that, and b never goes to logging."""
    topo = topology(["a", "b"], [("a", "b", "periodic", periodic(15))],
                    volumes={"data": 64 * MiB})
    a = topo["a"]
    topo.wait_converged()
    # 64 MiB at 10 MB/s: 150 MB in an interval
    fio(a.nbd_uri("data"), rw="write", bs="64k", size="64M", extra=["--rate=10m"])
    t = a.target("db", "b")
    assert t["last_epoch"]["why"] == "backlog" and t["state"] == "replicating", t
    topo.wait_converged(30)  # the rest at the interval
    assert a.target("db", "b")["last_epoch"]["why"] == "interval"
    assert "logging" not in open(a.log_path).read()
    topo.assert_identical()


def test_periodic_status(topology):
    interval = 4.0
    topo = topology(["a", "b"], [("a", "b", "periodic", periodic(interval))])
    a = topo["a"]
    topo.wait_converged()
    # early in an interval, the same 64 KiB four times: three of them coalesced away
    wait_until(lambda: a.target("db", "b")["next_due"] - time.time() > interval / 2,
               interval + 5, "the start of an interval")
    qemu_io(a.nbd_uri("data"), *["write -P 0x21 0 64k"] * 4)
    sent = time.time()
    seq = topo.wait_converged()
    t = a.target("db", "b")
    assert (t["mode"], t["interval"]) == ("periodic", interval)
    epoch = t["last_epoch"]
    assert epoch["seq"] == seq and epoch["records"] >= 4 and epoch["skipped"] >= 3
    assert epoch["why"] == "interval"
    assert epoch["bytes_after"] < epoch["bytes_before"] / 3
    assert sent - 1 <= epoch["time"] <= time.time()
    assert epoch["time"] < t["next_due"] <= epoch["time"] + interval + 0.1
    assert t["lag_seconds"] == 0
    qemu_io(a.nbd_uri("data"), "write -P 0x22 1M 4k")  # waits for the next epoch
    lagging = wait_until(lambda: (lambda t: t if t["lag_seconds"] > 0.2 else None)(
        a.target("db", "b")), interval + 5, "lag_seconds to grow between epochs")
    assert lagging["lag_records"] >= 1
    table = subprocess.run([sys.executable, "-m", "replicator.cli", "status", "-c",
                            a.config_path], capture_output=True, text=True, check=True).stdout
    assert f"every {interval:g}s  last epoch: seq {seq}," in table and "(interval)  next in" in table


def test_periodic_sends_fewer_bytes_than_async_for_overwrites(topology):
    topo = topology(["p", "asy", "per"], [("p", "asy", "async"),
                                          ("p", "per", "periodic", periodic(2))])
    p = topo["p"]
    topo.wait_converged()
    base = {n: p.target("db", n)["bytes_sent"] for n in ("asy", "per")}
    # 4096 random 4 KiB writes over 256 KiB: each block rewritten ~64 times
    fio(p.nbd_uri("data"), size="256k", extra=["--io_size=16M"])
    topo.wait_converged()
    topo.assert_identical()
    sent = {n: p.target("db", n)["bytes_sent"] - base[n] for n in ("asy", "per")}
    assert sent["per"] * 3 < sent["asy"], sent


def test_verify_of_and_below_a_periodic_hop_under_a_workload(topology):
    """The probes to a periodic target go between epochs, each hashed here at the seq an
    epoch ends at; below it (b -> c), at b's last consistent seq, not inside an epoch
    that is still coming in."""
    topo = topology(["a", "b", "c"], [("a", "b", "periodic", periodic(1)), ("b", "c", "async")],
                    volumes={"data": 16 * MiB})
    a = topo["a"]
    topo.wait_converged()
    load = subprocess.Popen(
        ["fio", "--name=load", "--ioengine=nbd", f"--uri={a.nbd_uri('data')}",
         "--rw=randwrite", "--bs=4k", "--iodepth=8", "--size=16M", "--runtime=60",
         "--time_based"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        start = a.group("db")["seq"]
        wait_until(lambda: a.group("db")["seq"] > start + 500, 30, "fio writing")
        for source, target in (("a", "b"), ("b", "c")):
            rc, result = replicator_cli(topo[source], "verify", "db", target, timeout=60)
            assert rc == 0 and result["mismatches"] == [], result
            assert result["bytes_checked"] == 16 * MiB
        assert load.poll() is None, "the workload stopped during the verify"
    finally:
        load.terminate()
        load.wait(30)


def test_switchover_to_a_periodic_target_does_not_wait_for_its_interval(topology):
    """The drain and the handover end an epoch early at the switchover's seq."""
    topo = topology(["a", "b"], [("a", "b", "periodic", periodic(60))],
                    volumes={"data": 16 * MiB})
    a, b = topo["a"], topo["b"]
    topo.wait_converged()
    qemu_io(a.nbd_uri("data"), "write -P 0x61 0 1M", "write -P 0x62 512k 1M")
    started = time.monotonic()
    rc, r = replicator_cli(a, "switchover", "db", "--to", "b")
    assert rc == 0, r
    assert time.monotonic() - started < 20 and r["drained"]["b"] == r["seq"]
    assert b.group("db")["role"] == "primary" and a.group("db")["role"] == "secondary"
    topo.primary = "b"
    topo.assert_identical()  # b got every record through the handover's seq
    qemu_io(b.nbd_uri("data"), "write -P 0x63 0 64k")  # the new primary is writable
    # b's link back to a is periodic too, with the same interval (HANDOVER carries it)
    wait_until(lambda: b.target("db", "a")["state"] == "replicating", 30, "b -> a replicating")
    assert b.target("db", "a")["interval"] == 60


def test_takeover_of_a_periodic_far_replica_replays_its_last_interval_from_the_bunker(topology):
    """a ships sync to the bunker k and every 30 s to c; the primary's site is lost
    between two epochs: promoting c replays from k what the next epoch would have sent."""
    topo = topology(["a", "k", "c"], [("a", "k", "sync", {"bunker": True}),
                                      ("a", "c", "periodic", periodic(30))],
                    volumes={"data": 16 * MiB}, bunkers=["k"], node_options={"c": {"bunker": "k"}})
    a, k, c = topo["a"], topo["k"], topo["c"]
    topo.wait_converged()
    qemu_io(a.nbd_uri("data"), "write -P 0x71 0 4M", "write -P 0x72 1M 1M")
    seq = a.group("db")["seq"]
    assert k.group("db")["seq"] == seq and c.group("db")["applied_seq"] < seq
    a.kill()  # before c's next epoch
    rc, r = replicator_cli(c, "promote", "db")
    assert rc == 0, r
    assert r["bunker_replay"]["to_seq"] == seq and r["rpo_records"] == 0
    assert c.group("db")["seq"] == seq and c.group("db")["role"] == "primary"
    topo.assert_identical()  # a's volumes are c's now
