"""Mutual TLS between agents: replication works over it, and a peer whose certificate
is not from the CA, or names another node than it claims to be, is refused visibly."""

import os

from replicator import pki
from tests.agents import wait_until
from tests.clients import qemu_io


def _refused(agent, node):
    t = agent.target("db", node)
    return t if t["state"] == "refused" else None


def test_replication_over_mutual_tls(topology):
    topo = topology(["a", "b", "c"], [("a", "b", "sync"), ("b", "c", "async", "zstd")], tls=True)
    qemu_io(topo["a"].nbd_uri("data"), "write -P 0x5a 0 1M")
    topo.wait_converged()
    topo.assert_identical()


def test_target_with_a_foreign_certificate_is_refused(topology, tmp_path):
    topo = topology(["a", "b"], [("a", "b", "async")], tls=True)
    b = topo["b"]
    b.kill()
    rogue_ca = str(tmp_path / "rogue-ca")
    pki.init_ca(rogue_ca, "rogue CA")
    pki.issue(rogue_ca, "b", os.path.dirname(b.config["tls"]["cert"]), force=True)
    b.start()
    t = wait_until(lambda: _refused(topo["a"], "b"), 20, "a -> b refused")
    assert "TLS" in t["last_error"] and "local issuer" in t["last_error"]
    assert topo["a"].group("db")["role"] == "primary"  # the primary keeps serving


def test_source_whose_certificate_names_another_node_is_refused(topology):
    topo = topology(["a", "b"], [("a", "b", "async")], tls=True)
    a = topo["a"]
    a.kill()
    # A valid certificate from the same CA, but for node "x": a cannot pose as the source.
    pki.issue(os.path.join(topo.root, "ca"), "x", os.path.join(topo.root, "x"))
    a.config["tls"]["cert"] = os.path.join(topo.root, "x", "x.crt")
    a.config["tls"]["key"] = os.path.join(topo.root, "x", "x.key")
    a.save_config()
    a.start()
    t = wait_until(lambda: _refused(a, "b"), 20, "a -> b refused")
    assert "IDENTITY" in t["last_error"] and "'x'" in t["last_error"]


def test_agent_refuses_to_start_with_missing_tls_files(topology):
    topo = topology(["a"], [], tls=True, start=False)
    a = topo["a"]
    a.config["tls"]["key"] = "/nonexistent/a.key"
    a.save_config()
    a.start(wait=False)
    assert a.proc.wait(20) == 1
    with open(a.log_path) as f:
        log = f.read()
    assert "cannot start" in log and "/nonexistent/a.key" in log


def test_an_nbd_client_certificate_opens_no_replication_session(topology):
    """A client certificate whose CN is a node's name (`pki issue --client a`) is no
    node's: with it, a cannot pose as b's source."""
    topo = topology(["a", "b"], [("a", "b", "async")], tls=True)
    a = topo["a"]
    a.kill()
    out = os.path.join(topo.root, "clients", "a")
    pki.issue_client(os.path.join(topo.root, "ca"), "a", out)
    a.config["tls"]["cert"] = os.path.join(out, "client-cert.pem")
    a.config["tls"]["key"] = os.path.join(out, "client-key.pem")
    a.save_config()
    a.start()
    t = wait_until(lambda: _refused(a, "b"), 20, "a -> b refused")
    assert "IDENTITY" in t["last_error"] and "'NBD client a'" in t["last_error"], t
