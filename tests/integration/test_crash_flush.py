"""kill -9 of the primary (and in some rounds of its sync target too) at random moments
under a workload that flushes every few writes (issue 14, "Tests", second bullet).

Topology: primary a, sync target b, async target c, agents as real processes on
loopback. Each round, a small NBD writer (`FlushingWriter`) keeps a few self-describing
4 KiB writes in flight on a's export and, after every 1..8 of them, sends a FLUSH (or,
one time in four, makes the next write a FUA write), until a
timer SIGKILLs a (in about a third of the rounds b as well, at the same moment). The
killed agents are restarted (b before a, so b's recovered state can be read before a
feeds it), the group converges, and the round is checked.

Why the checks are sound (the prefix argument):
- Write i of a round goes to block `order.block(i)`, a permutation of the volume's
  blocks, so a round writes every block at most once, and its payload
  (replicator/drill/block.py) names the round (run id) and i.
- Every node starts the round with the same image `before` (converged and compared).
- The NBD server takes one connection's requests in the order they arrive and
  submits each to the group before parsing the next (capture/nbd.py), and the round
  has no other writer; so write i is seq s0+1+i, s0 being a's seq at the start
  (checked: a's seq after recovery is s0 plus the writes its volume holds).
- The group's image after seq s0+k is therefore `before` with writes 0..k-1 put in
  their blocks, and since no block is written twice in a round, block order.block(i)
  shows whether write i is in an image: it holds write i's payload or its `before`
  content. So a volume is an image after some seq exactly when the writes it holds are
  {0..k-1} for some k and it equals `before` with those k writes (nothing torn,
  nothing foreign, no write present whose predecessor is absent). `prefix_length`
  checks this and returns k.
- A FLUSH sent when the writes C had completed covers C; a FUA write i sent when C had
  completed covers C and i (it completes as the write followed by a flush, which
  covers every write completed before it). Once its reply arrives, every write it
  covers is durable on a and on b (in sync: checked before each round), so
  k >= (highest covered index)+1 on a's recovered volume and on b's, wherever the
  kill fell.
- A write completes only once b has written it to its journal: when only a dies, b
  already has every write that completed (b's seq right after the kill), and the
  converged image holds them all (the loss of the primary alone loses nothing that
  completed). When b dies too, completed but unflushed writes may be lost.
- Status: flush_seq <= durable_seq <= seq on a (sampled while writing), never below
  what a completed flush promised, and per target durable_seq <= written_seq <= seq.

Killed volumes are also checked raw, right after the kill and before the restart
replays the journal: the write path only applies durable records to the volumes, in
seq order (group.py), so the file itself must already be an image after some seq.

What kill -9 cannot show: the page cache and the kernel's socket buffers outlive the
process, so a missing fdatasync (or a sync target acked too early) loses nothing
here; power loss is the crash-simulating file layer's test (issue 14, first bullet).
What it does show: recovery (a writev cut short by the kill, the replay from the
checkpoint), the order volumes are written in, and every node agreeing afterwards.

CRASH_FLUSH_SEED and CRASH_FLUSH_ROUNDS (environment) choose the seed and the number
of rounds; a failure names the seed and the round.
"""

from __future__ import annotations

import os
import random
import signal
import struct
import threading

import pytest

from replicator.drill import block
from replicator.drill.nbd_client import NbdClient
from tests.agents import MiB, wait_until

pytestmark = pytest.mark.integration

BS = 4096
VOLUME_SIZE = 8 * MiB
NBLOCKS = VOLUME_SIZE // BS
ROUNDS = int(os.environ.get("CRASH_FLUSH_ROUNDS", "50"))
SEED = int(os.environ.get("CRASH_FLUSH_SEED", "1401"))

_REQUEST = struct.Struct(">IHHQQI")  # magic, flags, command, cookie, offset, length
_REPLY = struct.Struct(">IIQ")  # magic, error, cookie
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
CMD_WRITE, CMD_FLUSH = 1, 3
FLAG_FUA = 1 << 0


class FlushingWriter:
    """Writes 0, 1, 2, ... of one round (write i: block `order.block(i)`, payload
    `block.encode(run_id, i, ...)`), at most `depth` requests in flight, a FLUSH or a
    FUA write after every 1..8 writes (drawn from `rng`). Runs until the connection dies.

    `completed` lists write indices in the order their replies came. A FLUSH (a FUA
    write) remembers how many had completed when it was sent; when its reply arrives
    every write it covers is promised durable, and `flushed_max` becomes the highest
    index of those (-1: none yet)."""

    def __init__(self, port: int, export: str, run_id: bytes, order: block.Order,
                 rng: random.Random, depth: int):
        self.client = NbdClient.connect("127.0.0.1", port, export, timeout=20)
        self.sock = self.client.sock
        assert self.client.can_fua, "the agent's export does not offer FUA"
        self.run_id, self.order, self.rng, self.depth = run_id, order, rng, depth
        self.issued = 0
        self.completed: list[int] = []
        self._completed_max: list[int] = []  # [j]: max(completed[:j+1])
        self.flushed_max = -1
        self.fua_done = 0
        self.flushes_sent = 0
        self.flushes_done = 0
        self.error: str | None = None  # an NBD error reply (there should be none)
        self._rbuf = bytearray()

    def payload(self, i: int) -> bytes:
        return block.encode(self.run_id, i, self.order.block(i) * BS, BS)

    def run(self) -> None:
        # cookie -> (index or None for a FLUSH, how many had completed when it was sent,
        # whether it is a durability point)
        in_flight: dict[int, tuple[int | None, int, bool]] = {}
        cookie = 0
        until_flush = self.rng.randint(1, 8)
        try:
            while True:
                can_write = self.issued < self.order.nblocks
                if len(in_flight) < self.depth and (can_write or until_flush == 0):
                    cookie += 1
                    fua = until_flush == 0 and can_write and self.rng.random() < 0.25
                    if until_flush == 0 and not fua:
                        self.sock.sendall(_REQUEST.pack(REQUEST_MAGIC, 0, CMD_FLUSH, cookie, 0, 0))
                        in_flight[cookie] = (None, len(self.completed), True)
                        self.flushes_sent += 1
                        until_flush = self.rng.randint(1, 8)
                    else:
                        i = self.issued
                        self.sock.sendall(_REQUEST.pack(REQUEST_MAGIC, FLAG_FUA if fua else 0,
                                                        CMD_WRITE, cookie,
                                                        self.order.block(i) * BS, BS)
                                          + self.payload(i))
                        in_flight[cookie] = (i, len(self.completed), fua)
                        self.issued += 1
                        if fua:
                            self.flushes_sent += 1
                            until_flush = self.rng.randint(1, 8)
                        else:
                            until_flush -= 1
                    continue
                # Nothing more to send now: take a reply (when the round has written
                # every block, this waits for the kill).
                magic, err, got = _REPLY.unpack(self._recv(_REPLY.size))
                if magic != SIMPLE_REPLY_MAGIC or got not in in_flight:
                    raise AssertionError(f"bad NBD reply (magic 0x{magic:x}, cookie {got})")
                index, completed_then, durable = in_flight.pop(got)
                if err:
                    self.error = (f"{'flush' if index is None else 'write ' + str(index)}: "
                                  f"errno {err}")
                    return
                covered = [index] if index is not None else []
                if index is not None:
                    self.completed.append(index)
                    self._completed_max.append(max(index, self._completed_max[-1]
                                                   if self._completed_max else -1))
                if durable:
                    if completed_then:
                        covered.append(self._completed_max[completed_then - 1])
                    self.flushed_max = max(self.flushed_max, *covered, -1)
                    self.flushes_done += 1
                    self.fua_done += index is not None
        except (ConnectionError, OSError):
            return  # the kill
        finally:
            self.sock.close()

    def _recv(self, n: int) -> bytes:
        while len(self._rbuf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("the agent closed the NBD connection")
            self._rbuf += chunk
        data = bytes(self._rbuf[:n])
        del self._rbuf[:n]
        return data


def read_image(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def prefix_length(image: bytes, before: bytes, writer: FlushingWriter, what: str) -> int:
    """k such that `image` is `before` with writes 0..k-1 of the round (see the module
    docstring); fails with the first block that breaks it."""
    assert len(image) == len(before), f"{what}: volume is {len(image)} bytes"
    present = []
    for i in range(writer.issued):
        off = writer.order.block(i) * BS
        got = image[off:off + BS]
        if got == writer.payload(i):
            present.append(True)
        elif got == before[off:off + BS]:
            present.append(False)
        else:
            ident = block.decode(got)
            holds = f"drill block {ident.index}" if ident else "other data"
            raise AssertionError(f"{what}: block {off // BS} (write {i}) holds neither write "
                                 f"{i} nor its content before the round: {holds}")
    k = present.index(False) if False in present else len(present)
    if any(present[k:]):
        later = k + present[k:].index(True)
        raise AssertionError(f"{what}: not a prefix: write {later} is present but write {k} "
                             f"is not ({sum(present)} of {writer.issued} writes present)")
    expected = bytearray(before)
    for i in range(k):
        off = writer.order.block(i) * BS
        expected[off:off + BS] = writer.payload(i)
    if image != bytes(expected):
        diff = next(n for n in range(0, len(image), BS)
                    if image[n:n + BS] != expected[n:n + BS])
        raise AssertionError(f"{what}: block {diff // BS}, written by no write of the round, "
                             "changed")
    return k


class StatusSampler(threading.Thread):
    """Polls a's status while the round writes; keeps (flushed seq floor known before
    the request, group status)."""

    def __init__(self, agent, s0: int, writer: FlushingWriter):
        super().__init__(daemon=True)
        self.agent, self.s0, self.writer = agent, s0, writer
        self.samples: list[tuple[int, dict]] = []
        self.stop = threading.Event()

    def flushed_floor(self) -> int:
        flushed_max = self.writer.flushed_max
        return self.s0 + 1 + flushed_max if flushed_max >= 0 else 0  # restarted: from 0

    def run(self) -> None:
        while not self.stop.wait(0.05):
            floor = self.flushed_floor()
            try:
                st = self.agent.group("db")
            except Exception:  # noqa: BLE001 - killed: the round is over
                return
            self.samples.append((floor, st))


def check_status(g: dict, what: str, flushed_floor: int = 0) -> None:
    assert g["flush_seq"] <= g["durable_seq"] <= g["seq"], \
        f"{what}: flush_seq {g['flush_seq']} durable_seq {g['durable_seq']} seq {g['seq']}"
    assert g["flush_seq"] >= flushed_floor, \
        f"{what}: flush_seq {g['flush_seq']} below {flushed_floor}, which a completed FLUSH covered"
    for t in g["targets"]:
        assert t["durable_seq"] <= t["written_seq"] <= g["seq"], \
            f"{what}: target {t['node']}: durable {t['durable_seq']} written {t['written_seq']} " \
            f"seq {g['seq']}"


def test_kill_primary_and_sync_target_under_flushes(topology):
    rng = random.Random(SEED)
    topo = topology(["a", "b", "c"], [("a", "b", "sync"), ("a", "c", "async")],
                    volumes={"data": VOLUME_SIZE})
    a, b = topo["a"], topo["b"]
    paths = {n: topo[n].volume_path("db", "data") for n in ("a", "b", "c")}
    totals = {"writes": 0, "completed": 0, "flushed": 0, "lost_unflushed": 0, "both": 0,
              "samples": 0, "flushes_in_flight": 0, "fua": 0}
    with_b = [rnd % 3 == 2 for rnd in range(ROUNDS)]  # a third of the rounds kill b too
    rng.shuffle(with_b)
    for rnd, kill_b in enumerate(with_b):
        where = f"seed {SEED} round {rnd}"
        wait_until(lambda: a.target("db", "b")["in_sync"], 30, f"{where}: b in sync")
        s0 = topo.wait_converged(60)
        topo.assert_identical()
        before = read_image(paths["a"])
        kill_at = rng.uniform(0.05, 0.4)
        order = block.Order.shuffled(NBLOCKS, rng.getrandbits(32))
        writer = FlushingWriter(a.nbd_port, "data", rng.randbytes(16), order,
                                random.Random(rng.getrandbits(32)), rng.choice((1, 2, 4, 8)))
        victims = [a, b] if kill_b else [a]
        sampler = StatusSampler(a, s0, writer)

        def kill():
            for v in victims:  # together: no agent gets to react in between
                v.proc.send_signal(signal.SIGKILL)
        timer = threading.Timer(kill_at, kill)
        sampler.start()
        timer.start()
        try:
            writer.run()
        finally:
            timer.join()
            sampler.stop.set()
            sampler.join(10)
        assert writer.error is None, f"{where}: {writer.error}"
        for v in victims:
            v.kill()  # reap
        need = writer.flushed_max + 1  # writes a recovered image must hold
        totals["samples"] += len(sampler.samples)
        totals["fua"] += writer.fua_done
        totals["flushes_in_flight"] += writer.flushes_sent - writer.flushes_done
        for floor, g in sampler.samples:
            check_status(g, f"{where}: a while writing", floor)

        # The killed volumes as the kill left them, before any replay.
        for v in victims:
            prefix_length(read_image(paths[v.node]), before, writer, f"{where}: {v.node} raw")
        if kill_b:
            b.start()  # alone: what it recovered, before a feeds it anything
            k_b = prefix_length(read_image(paths["b"]), before, writer, f"{where}: b recovered")
            gb = b.group("db")
            assert gb["seq"] == s0 + k_b, f"{where}: b journal at {gb['seq']}, volume {s0 + k_b}"
        else:
            gb = b.group("db")  # alive: it has what it wrote to its journal
            assert gb["seq"] >= s0 + len(writer.completed), \
                f"{where}: b has seq {gb['seq']}, but {len(writer.completed)} writes completed"
            k_b = gb["durable_seq"] - s0  # its volume may still be applying: its durable seq
        assert k_b >= need, f"{where}: b lacks flushed writes: has {k_b}, flushed {need}"

        a.start()
        k_a = prefix_length(read_image(paths["a"]), before, writer, f"{where}: a recovered")
        ga = a.group("db")
        assert ga["seq"] == s0 + k_a, f"{where}: a journal at {ga['seq']}, volume {s0 + k_a}"
        assert k_a >= need, f"{where}: a lost flushed writes: has {k_a}, flushed {need}"
        check_status(ga, f"{where}: a after restart")

        seq = topo.wait_converged(60)
        topo.assert_identical()
        k = prefix_length(read_image(paths["a"]), before, writer, f"{where}: converged")
        assert seq == s0 + k, f"{where}: converged at seq {seq}, image after {s0 + k}"
        if not kill_b:
            assert k >= len(writer.completed), \
                f"{where}: only a died, yet {len(writer.completed) - k} completed writes are lost"
        totals["writes"] += writer.issued
        totals["completed"] += len(writer.completed)
        totals["flushed"] += need
        totals["lost_unflushed"] += sum(1 for i in writer.completed if i >= k)
        totals["both"] += kill_b
    print(f"seed {SEED}, {ROUNDS} rounds ({totals['both']} with b killed too): "
          f"{totals['writes']} writes issued, {totals['completed']} completed, "
          f"{totals['flushed']} covered by a completed flush "
          f"({totals['fua']} of the flushes FUA writes), "
          f"{totals['lost_unflushed']} completed but unflushed lost; "
          f"{totals['flushes_in_flight']} flushes in flight at a kill; "
          f"{totals['samples']} status samples")
    assert totals["samples"] >= ROUNDS, "a's status was hardly sampled while writing"
    assert totals["flushed"] > 0 and totals["both"] > 0
