"""Hostile and confused peers against real agents on loopback (issue 13, items 4-7): a
hand-written peer speaks the wire protocol (replicator.wire, sans-IO) over a socket and
tries to take a replica over, demote a primary, read a journal, corrupt a replica's
position or crash a handler. Each attempt must be refused, logged at WARNING with the
peer's identity, and change nothing."""

from __future__ import annotations

import json
import os
import contextlib
import socket
import ssl
import threading
import time

import pytest

from replicator import pki
from replicator.generations import from_json
from replicator.wire import (NEED_DATA, PROTOCOL_MAX, PROTOCOL_MIN, Ack, Connection,
                             ConnectionClosed, Error, Feature, Fetch, Hello,
                             Refusal, Refuse, ResyncBegin, ResyncDone, Role, Welcome,
                             negotiate)
from tests.agents import wait_until
from tests.clients import qemu_io

FORGED_GENERATION = (0x0E0E0E0E0E0E0E0E, 10**6)


class LaxConnection(Connection):
    """A Connection that sends whatever it is given, in any state, unchecked: what a
    buggy or hostile peer puts on the wire (framing and checksums stay valid)."""

    def _next_state(self, direction, kind, error):
        return self.state

    def _check(self, event, error):
        pass


class Peer:
    """One hand-written connection to an agent's replication port."""

    def __init__(self, port: int, *, tls: ssl.SSLContext | None = None, lax: bool = False,
                 server_name: str | None = None):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        if tls is not None:
            sock = tls.wrap_socket(sock, server_hostname=server_name)
        self.sock = sock
        self.local = "%s:%d" % sock.getsockname()[:2]
        self.conn = (LaxConnection if lax else Connection)(Role.SENDER)

    def send(self, *events) -> None:
        for ev in events:
            self.sock.sendall(self.conn.send(ev))

    def next(self):
        """The next event from the agent, or ConnectionClosed (also on a reset)."""
        while True:
            ev = self.conn.next_event()
            if ev is not NEED_DATA:
                return ev
            try:
                data = self.sock.recv(1 << 20)
            except (ConnectionResetError, ssl.SSLError):
                data = b""
            self.conn.receive_data(data)

    def events(self) -> list:
        """Every event until the agent closes the connection."""
        out = []
        while not isinstance(ev := self.next(), ConnectionClosed):
            out.append(ev)
        return out

    def close(self) -> None:
        self.sock.close()


def _port(agent) -> int:
    return int(agent.config["listen"].rsplit(":", 1)[1])


def _history(agent, group="db") -> tuple:
    """The group's generations as the agent saved them (group.json)."""
    path = os.path.join(agent.config["state_dir"], "groups", group, "group.json")
    with open(path) as f:
        return tuple((g.id, g.first_seq) for g in from_json(json.load(f).get("generations")))


def _hello(node: str, target: str, *, seq: int, history: tuple, features=Feature(0)) -> Hello:
    return Hello(proto_min=PROTOCOL_MIN, proto_max=PROTOCOL_MAX, features=features, node=node,
                 group="db", target=target, seq=seq, history=history)


def _log(agent) -> str:
    with open(agent.log_path) as f:
        return f.read()


def _warned(agent, *words) -> str | None:
    """The first WARNING line of the agent's log that holds every word."""
    return next((line for line in _log(agent).splitlines()
                 if " WARNING " in line and all(w in line for w in words)), None)


def _client_tls(topo, node: str, ca_dir: str | None = None) -> ssl.SSLContext:
    """A client context with a certificate for `node` from the topology's CA (or from
    `ca_dir`), trusting any server: the hostile side does not care who answers."""
    ca_dir = ca_dir or os.path.join(topo.root, "ca")
    out = os.path.join(topo.root, "hostile", os.path.basename(ca_dir), node)
    if not os.path.exists(os.path.join(out, f"{node}.crt")):
        pki.issue(ca_dir, node, out)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.load_cert_chain(os.path.join(out, f"{node}.crt"), os.path.join(out, f"{node}.key"))
    return ctx


def _holds(predicate, seconds: float, what: str) -> None:
    """`predicate` stays true for `seconds` (polled; fails at the first false)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert predicate(), f"{what} stopped holding"
        time.sleep(0.1)


def _replicating(topo):
    qemu_io(topo["a"].nbd_uri("data"), "write -P 0x11 0 256k")
    topo.wait_converged()


# ---- item 4: authority ------------------------------------------------------------------

@pytest.mark.parametrize("tls", [False, True], ids=["tcp", "tls"])
@pytest.mark.parametrize("claimant,code", [("evil", Refusal.UNKNOWN_PEER),
                                           ("c", Refusal.WRONG_SOURCE)],
                         ids=["outside-peers", "peer-not-source"])
def test_a_forged_newer_generation_does_not_take_a_replica_over(topology, tls, claimant, code):
    """The replica's own history plus a forged newer generation, from a node outside its
    peers or from a peer that is not its source: refused, logged, and the source goes
    on replicating (before: `source is now evil`, then the real primary demoted)."""
    topo = topology(["a", "b", "c"], [("a", "b", "async")], tls=tls, start=False)
    a, b = topo["a"].start(), topo["b"].start()  # c: only in their peers
    qemu_io(a.nbd_uri("data"), "write -P 0x11 0 256k")
    wait_until(lambda: b.group("db")["applied_seq"] == a.group("db")["seq"] > 0, 30, "b synced")
    seq = b.group("db")["seq"]
    peer = Peer(_port(b), tls=_client_tls(topo, claimant) if tls else None)
    try:
        peer.send(_hello(claimant, "b", seq=seq, history=_history(b) + (FORGED_GENERATION,)))
        reply = peer.next()
    finally:
        peer.close()
    assert isinstance(reply, Refuse) and reply.code == code, reply
    line = wait_until(lambda: _warned(b, "refused group db", f"'{claimant}'", peer.local), 10,
                      "the refusal logged at WARNING with the peer's name and address")
    if tls:
        assert f"CN={claimant}" in line
    g = b.group("db")
    assert (g["source"], g["role"], g["seq"]) == ("a", "secondary", seq)
    qemu_io(a.nbd_uri("data"), "write -P 0x22 1M 64k")
    wait_until(lambda: b.group("db")["applied_seq"] == a.group("db")["seq"], 20,
               "a still replicating to b")
    assert a.group("db")["role"] == "primary"


def test_a_newer_generation_claimed_to_the_primary_does_not_demote_it(topology):
    """A member of the group (here posing as the target b, on plain TCP) tells the
    primary it holds a later generation: before, the primary demoted itself and every
    application write failed EPERM; now it is refused and the primary stays primary."""
    topo = topology(["a", "b"], [("a", "b", "async")])
    a = topo["a"]
    _replicating(topo)
    seq = a.group("db")["seq"]
    peer = Peer(_port(a))
    try:
        peer.send(_hello("b", "a", seq=seq + 5, history=_history(a) + ((7, seq + 1),)))
        reply = peer.next()
    finally:
        peer.close()
    assert isinstance(reply, Refuse) and reply.code == Refusal.NOT_REPLICA, reply
    assert "replicator demote db --source b" in reply.reason
    wait_until(lambda: _warned(a, "refused group db", "'b'", peer.local), 10, "refusal logged")
    assert a.group("db")["role"] == "primary"
    qemu_io(a.nbd_uri("data"), "write -P 0x33 0 64k")  # still writable
    topo.wait_converged()



@contextlib.contextmanager
def _answering_for(node, answer):
    """Something else listens on `node`'s replication port (the node is down): every
    connection gets its HELLO read and `answer(hello)` sent back, until the block ends."""
    server = socket.create_server(("127.0.0.1", _port(node)))
    done = threading.Event()

    def serve():
        while not done.is_set():
            try:
                sock, _ = server.accept()
            except OSError:
                return
            with sock:
                conn = Connection(Role.RECEIVER)
                sock.settimeout(5)
                try:
                    while (ev := conn.next_event()) is NEED_DATA:
                        conn.receive_data(sock.recv(65536))
                    sock.sendall(conn.send(answer(ev)))
                except OSError:
                    pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        server.close()
        thread.join(10)


def test_a_target_that_says_stale_does_not_demote_the_primary(topology):
    """Something answering on the target's address refuses the primary as STALE (a
    later primary's line is here): before, the primary demoted itself within seconds;
    now it shows the target `stale` and stays primary until an operator acts."""
    topo = topology(["a", "b"], [("a", "b", "async")])
    a, b = topo["a"], topo["b"]
    _replicating(topo)
    b.kill()
    with _answering_for(b, lambda ev: Refuse(code=Refusal.STALE, reason="b follows x now")):
        wait_until(lambda: a.target("db", "b")["state"] == "stale", 30, "a -> b stale")
        # before, the primary demoted itself within seconds: it must hold for longer
        _holds(lambda: a.group("db")["role"] == "primary" and a.group("db")["role_from"] == "config"
               and a.target("db", "b")["state"] == "stale", 8, "a primary, b stale")
        qemu_io(a.nbd_uri("data"), "write -P 0x44 0 64k")  # still writable


@pytest.mark.parametrize("tls", [False, True], ids=["tcp", "tls"])
def test_only_members_may_fetch_a_journal(topology, tls):
    """A peer that is no member of the group asks the primary and the bunker for their
    journals (FETCH): refused at WARNING, no record sent (before: all the data, logged
    at INFO). A member, the far replica, still may (takeover replay)."""
    topo = topology(["a", "k", "c", "x"], [("a", "k", "sync", {"bunker": True}),
                                           ("a", "c", "async")],
                    bunkers=["k"], node_options={"c": {"bunker": "k"}, "k": {"members": ["c"]}},
                    tls=tls, start=False)
    for n in ("a", "k", "c"):
        topo[n].start(wait=False)
    for n in ("a", "k", "c"):
        wait_until(topo[n].status, 20, f"{n} up")
    qemu_io(topo["a"].nbd_uri("data"), "write -P 0x11 0 256k")
    seq = topo["a"].group("db")["seq"]
    wait_until(lambda: topo["k"].group("db")["seq"] == seq, 20, "k holds every record")
    for node in ("a", "k"):
        agent = topo[node]
        for who in ("x", "c"):
            peer = Peer(_port(agent), tls=_client_tls(topo, who) if tls else None)
            try:
                peer.send(_hello(who, node, seq=0, history=(), features=Feature.FETCH))
                reply = peer.next()
                if who == "c" and isinstance(reply, Welcome):
                    peer.send(Fetch(seq=0, crc=0))
                    got = peer.events()
            finally:
                peer.close()
            if who == "x":
                assert isinstance(reply, Refuse) and reply.code == Refusal.NOT_MEMBER, reply
                wait_until(lambda: _warned(agent, "refused group db", "'x'", peer.local), 10,
                           f"{node}: refused fetch logged")
            else:  # a member: the takeover replay still works
                assert isinstance(reply, Welcome), reply
                # (a journal may already have trimmed what c acknowledged: then it says so
                # for the position 0 asked here, which is an answer, not a refusal)
                trimmed = (isinstance(got[-1], Error)
                           and got[-1].code == Refusal.POSITION and "trimmed" in got[-1].message)
                assert trimmed or isinstance(got[-1], Ack) and got[-1].seq == seq, got


# ---- a peer of an older protocol (3: xxh3-128 region hashes) ------------------------------

def test_a_protocol_2_source_is_refused_with_the_versions_and_who_to_upgrade(topology):
    """A source still on protocol 2 (8-byte CRC region hashes) connects to a replica:
    REFUSE(VERSION) naming both ranges and the node to upgrade, logged; nothing changes."""
    topo = topology(["a", "b"], [("a", "b", "async")])
    b = topo["b"]
    _replicating(topo)
    seq = b.group("db")["seq"]
    peer = Peer(_port(b))
    try:
        peer.send(Hello(proto_min=2, proto_max=2, features=Feature(0), node="a", group="db",
                        target="b", seq=seq, history=_history(b)))
        reply = peer.next()
    finally:
        peer.close()
    assert isinstance(reply, Refuse) and reply.code == Refusal.VERSION, reply
    assert reply.reason == (f"'a' speaks replication protocol 2..2, 'b' speaks "
                            f"{PROTOCOL_MIN}..{PROTOCOL_MAX}: upgrade 'a'"), reply.reason
    wait_until(lambda: _warned(b, "refused group db", "VERSION", "upgrade 'a'", peer.local), 10,
               "the refusal logged at WARNING")
    qemu_io(topo["a"].nbd_uri("data"), "write -P 0x22 1M 64k")
    topo.wait_converged()  # the real source is unaffected
    assert b.group("db")["applied_seq"] > seq


def test_a_protocol_2_target_shows_refused_with_its_reason(topology):
    """The other way round: what answers on the target's address speaks only protocol 2
    and refuses our HELLO (as a protocol 2 agent does): the primary shows the target
    `refused` with that reason, stays writable, and replicates once the target is back."""
    topo = topology(["a", "b"], [("a", "b", "async")])
    a, b = topo["a"], topo["b"]
    _replicating(topo)
    b.kill()
    hellos = []

    def as_protocol_2(ev):
        hellos.append((ev, negotiate(ev, 2, 2, Feature.ZSTD)))
        return Refuse(code=Refusal.VERSION,
                      reason=f"protocol {ev.proto_min}..{ev.proto_max} not in 2..2")
    with _answering_for(b, as_protocol_2):
        t = wait_until(lambda: (t := a.target("db", "b"))["state"] == "refused" and t, 30,
                       "a -> b refused")
        assert "VERSION" in t["last_error"] and \
            f"protocol {PROTOCOL_MIN}..{PROTOCOL_MAX} not in 2..2" in t["last_error"], t
        hello, agreed = hellos[0]
        assert (hello.proto_min, hello.proto_max, agreed) == (PROTOCOL_MIN, PROTOCOL_MAX, None)
        qemu_io(a.nbd_uri("data"), "write -P 0x44 0 64k")  # still writable
    b.start()
    topo.wait_converged()


# ---- item 5: TLS with a certificate of another CA ------------------------------------------

def test_a_certificate_of_another_ca_is_refused_and_logged(topology, tmp_path):
    topo = topology(["a", "b"], [("a", "b", "async")], tls=True)
    b = topo["b"]
    rogue = str(tmp_path / "rogue-ca")
    pki.init_ca(rogue, "rogue CA")
    try:
        peer = Peer(_port(b), tls=_client_tls(topo, "a", ca_dir=rogue))
        try:
            reply = peer.next()
        finally:
            peer.close()
        assert isinstance(reply, ConnectionClosed)
        local = peer.local
    except (ssl.SSLError, OSError) as exc:  # TLS 1.3: the refusal may arrive at wrap time
        local = None
        assert "certificate" in str(exc).lower() or isinstance(exc, OSError)
    line = wait_until(lambda: _warned(b, "TLS handshake failed"), 10, "the refusal logged")
    assert "certificate" in line.lower() and "127.0.0.1:" in line
    if local:
        assert local in line
    topo.wait_converged()  # the real source is unaffected


# ---- item 6: frames out of their state or range ------------------------------------------

def _as_source(topo):
    """b's real source a is stopped; a hand-written peer connects as a (plain TCP,
    where the name is the identity) and is welcomed: a Peer in STREAMING."""
    a, b = topo["a"], topo["b"]
    _replicating(topo)
    seq = b.group("db")["seq"]
    a.kill()
    wait_until(lambda: b.group("db")["upstream"] is None, 20, "b to lose its source")
    peer = Peer(_port(b), lax=True)
    peer.send(_hello("a", "b", seq=seq, history=_history(b)))
    welcome = peer.next()
    assert isinstance(welcome, Welcome) and welcome.seq == seq, welcome
    return peer, seq


HOSTILE_STREAMS = {
    "resync-done-without-a-resync": lambda seq: [ResyncDone(seq=2**64 - 1, crc=0)],
    "resync-done-off-its-pass": lambda seq: [ResyncBegin(seq=seq), ResyncDone(seq=seq + 9, crc=0)],
    "resync-to-an-impossible-seq": lambda seq: [ResyncBegin(seq=2**64 - 1),
                                                ResyncDone(seq=2**64 - 1, crc=0)],
}


@pytest.mark.parametrize("stream", list(HOSTILE_STREAMS))
def test_frames_out_of_their_state_or_range_are_refused(topology, stream):
    """Before: RESYNC_DONE(2**64-1) with no resync running was acknowledged, the
    replica's position jumped to 2**64-1, survived a restart, and every write after a
    promote failed EIO. Now the connection refuses it; the position does not move."""
    topo = topology(["a", "b"], [("a", "b", "async")])
    b = topo["b"]
    peer, seq = _as_source(topo)
    try:
        peer.send(*HOSTILE_STREAMS[stream](seq))
        got = peer.events()
    finally:
        peer.close()
    assert not [ev for ev in got if isinstance(ev, Ack)], got
    assert isinstance(got[-1], Error) and got[-1].code == Refusal.PROTOCOL, got  # and why
    wait_until(lambda: _warned(b, "protocol error from", "'a'"), 10, "the refusal logged")
    g = b.group("db")
    assert (g["seq"], g["applied_seq"], g["role"], g["inconsistent"]) == \
        (seq, seq, "secondary", False)
    b.kill()
    b.start()
    assert b.group("db")["seq"] == seq  # and nothing of it was saved


# ---- item 7: ERROR with a code this version does not know -----------------------------

def test_an_error_with_an_unknown_code_is_reported_not_crashed_on(topology):
    topo = topology(["a", "b"], [("a", "b", "async")])
    b = topo["b"]
    peer, _ = _as_source(topo)
    try:
        peer.send(Error(code=4242, message="from a newer peer"))
        assert peer.events() == []
    finally:
        peer.close()
    wait_until(lambda: _warned(b, "code 4242", "from a newer peer"), 10, "the error reported")
    assert "Traceback" not in _log(b) and "AttributeError" not in _log(b)
    topo["a"].start()
    topo.wait_converged()  # the real source reconnects as before


def test_an_error_before_hello_is_reported_and_ends_only_that_link(topology):
    """The table lets ERROR come first: before, the receiver took it for a broken
    protocol and then failed telling the peer why (its connection was not broken)."""
    topo = topology(["a", "b"], [("a", "b", "async")])
    b = topo["b"]
    _replicating(topo)
    peer = Peer(_port(b))
    try:
        peer.send(Error(code=4243, message="giving up before HELLO"))
        assert peer.events() == []
    finally:
        peer.close()
    wait_until(lambda: _warned(b, "code 4243", "before its HELLO", "giving up before HELLO"),
               10, "the error reported")
    assert "Traceback" not in _log(b)
    assert b.group("db")["role"] == "secondary"
