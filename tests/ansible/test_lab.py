"""The lab end to end, as an operator runs it: lab up from inventories/lab, site.yml,
pair.yml, a workload written through NBD on the primary host, replicas compared byte
for byte, status.yml, faults (isolate/heal, crash/boot) and the catch-up after them,
a switchover and back, and the DR exercise (failover through the bunker, failback; a copy
at a marker with the application's own check: ext4 and SQLite);
the lab's Prometheus scraping every agent, with the alert rules loaded. The lab is always
torn down, and the teardown is checked to leave nothing behind (its Prometheus too)."""

import json
import os
import re
import sqlite3
import subprocess
import urllib.parse
import urllib.request
import xml.etree.ElementTree as ET

import pytest
import yaml

from replicator import admin
from replicator.drill.nbd_client import NbdClient
from tests.agents import MiB, wait_until
from tests.ansible.ansible_harness import CLI, ROOT, module_utils
from tests.ansible.cron_harness import cron_daemon, lock_free, needs_cron
from tests.ansible.lab_harness import DESTRUCTIVE, Lab, lab_marks, playbook
from tests.ansible import project
from tests.clients import fio, qemu_io, run

pytestmark = lab_marks(timeout=900)


PROMETHEUS = module_utils("replicator_lab_prometheus")


@pytest.fixture(scope="module")
def lab():
    lab = Lab()
    prometheus = PROMETHEUS.LabPrometheus(lab.dir)
    pid = None
    try:
        playbook("lab.yml", "-e", "lab_state=up", "-e", "lab_prometheus=true")
        pid = prometheus.pid()
        assert pid is not None
        yield lab
    finally:
        playbook("lab.yml", "-e", "lab_state=down")
        assert lab.leftovers() == []
        assert pid is None or prometheus.cmdline(pid) is None, "the lab's Prometheus survived"


@pytest.fixture(scope="module")
def deployed(lab):
    out = playbook("site.yml")
    assert "failed=0" in out
    out = playbook("pair.yml")
    for src, dst in (("dc1-app", "dc2-dr"), ("dc1-app", "dc3-arc"), ("dc3-arc", "dc4-vault")):
        assert f"db {src} -> {dst}" in out and "replicating" in out
    return lab


def test_each_lab_host_is_a_machine_of_its_own(lab):
    with open(lab.host_path("dc1-app", "/etc/replicator/marker"), "w") as f:
        f.write("only on dc1-app")
    out = adhoc("hostname; cat /proc/1/comm; cat /etc/replicator/marker 2>/dev/null || echo none")
    for node in lab.nodes:
        marker = "only on dc1-app" if node == "dc1-app" else "none"
        # own hostname, own PID namespace (PID 1 is the lab's init), own /etc/replicator
        assert f"{node} | CHANGED | rc=0 >>\n{node}\npython3\n{marker}\n" in out, out
    os.unlink(lab.host_path("dc1-app", "/etc/replicator/marker"))


def adhoc(shell: str) -> str:
    """Run a shell command on every lab host over SSH (ansible ad hoc)."""
    return subprocess.run([os.path.join(os.path.dirname(CLI), "ansible"), "-i", "inventories/lab",
                           "replicator", "-m", "ansible.builtin.shell", "-a", shell],
                          cwd=ROOT, capture_output=True, text=True, check=True,
                          env=dict(os.environ, ANSIBLE_CONFIG=os.path.join(ROOT, "ansible.cfg"))).stdout


def test_write_through_nbd_and_compare_replicas(deployed):
    lab = deployed
    qemu_io(lab.nbd_uri("data"), "write -P 0xab 0 8M", "write -P 0xcd 40M 4M")
    qemu_io(lab.nbd_uri("log"), "write -P 0x12 0 1M", "write -z 512k 64k")
    fio(lab.nbd_uri("data"), rw="randwrite", bs="4k", iodepth=16, size="64M", runtime=3)
    seq = lab.wait_converged()
    assert seq > 0
    lab.assert_identical()
    table = playbook("status.yml")
    for link in ("dc1-app -> dc2-dr", "dc1-app -> dc1-bunker", "dc1-app -> dc3-arc",
                 "dc3-arc -> dc4-vault"):
        (row,) = [line for line in table.splitlines() if line.split()[:4] == ["db", *link.split()]]
        assert "replicating" in row and f" {seq} " in row, table
    assert "dc1-app -> dc1-bunker: bunker; records the far replicas lack: dc2-dr 0, dc3-arc 0" \
        in table
    assert "0 mismatching region(s)" in playbook("verify.yml")


def tcp_listeners(lab, node: str) -> list[tuple[str, int, str]]:
    """(address, port, process) of every TCP socket listening in a lab host's namespace."""
    out = run(["ip", "netns", "exec", lab.netns(node), "ss", "-Hltnp"])
    found = []
    for line in out.splitlines():
        fields = line.split()
        address, port = fields[3].rsplit(":", 1)
        process = re.search(r'users:\(\("([^"]+)"', line)
        found.append((address.strip("[]"), int(port), process.group(1) if process else "?"))
    return found


def loopback(address: str) -> bool:
    return address.startswith("127.") or address in ("::1", "localhost")


def test_only_authenticated_listeners_face_the_network(deployed):
    """What a lab host exposes off loopback, as site.yml deploys it by default: the
    replication port (mutual TLS), NBD with TLS only, sshd, and metrics only where the
    inventory put them on the address (the lab does; the role's default is loopback). A
    plain NBD client of the NBD port is refused before any export is named; the DR
    exercise's client certificate opens an export; plain NBD is the host's unix socket,
    0660 root, reachable from the root namespace through the lab directory."""
    lab = deployed
    for node in lab.nodes:
        with open(lab.host_path(node, "/etc/replicator/agent.yml")) as f:
            conf = yaml.safe_load(f)
        assert "nbd_listen" not in conf, (node, conf)  # no plain NBD on TCP at all
        allowed = {int(conf["listen"].rsplit(":", 1)[1]): "replication (mutual TLS)",
                   int(conf["nbd_tls_listen"].rsplit(":", 1)[1]): "NBD TLS", 22: "sshd"}
        assert conf["tls"] and conf["nbd_tls_listen"] == f"{lab.address[node]}:10809", conf
        assert set(conf["nbd_clients"]) == {"replicator-drill"}, conf["nbd_clients"]
        metrics = conf.get("metrics_listen")
        if metrics and not loopback(metrics.rsplit(":", 1)[0].strip("[]")):
            allowed[int(metrics.rsplit(":", 1)[1])] = "metrics (configured off loopback)"
        listeners = tcp_listeners(lab, node)
        assert listeners, node
        exposed = [(a, p, proc) for a, p, proc in listeners if not loopback(a)]
        assert [x for x in exposed if x[1] not in allowed] == [], (node, listeners)
        ports = {p for _, p, _ in exposed}
        assert {7789, 10809} <= ports, (node, listeners)
        sock = os.stat(lab.nbd_socket(node))
        assert (oct(sock.st_mode & 0o777), sock.st_uid, sock.st_gid) == ("0o660", 0, 0), node
    address = lab.address[lab.primary]
    plain = subprocess.run(["nbdinfo", "--list", f"nbd://{address}:10809"], capture_output=True,
                           text=True, timeout=60)
    told = plain.stdout + plain.stderr
    assert plain.returncode != 0, told
    for volume in lab.volumes:
        assert f"export=\"{volume}\"" not in told and f"export: {volume}" not in told, told
        assert volume not in plain.stdout, told
    info = run(["nbdinfo", "--json", lab.nbds_uri("data")])
    assert json.loads(info)["exports"][0]["export-size"] == 64 * MiB, info
    listed = run(["nbdinfo", "--list", "--json", lab.nbds_uri("")])
    every_volume = sorted(v["name"] for g in lab.groups.values() if lab.primary in lab.members(g["name"])
                          for v in g["volumes"])  # (the watched files' volume is an export too)
    assert sorted(e["export-name"] for e in json.loads(listed)["exports"]) == every_volume
    # a volume is read the same over TLS and through the socket
    assert run(["nbdinfo", "--size", lab.nbds_uri("log")]) == \
        run(["nbdinfo", "--size", lab.nbd_uri("log")])


# The application's own check of a copy, as an operator writes dr_exercise_app_check:
# {data} is the copy's image of the volume data. The file system must be whole (fsck -n),
# and the database read out of it must pass SQLite's integrity check and hold its rows.
APP_ROWS = 2000
APP_CHECK = (
    't=$(mktemp -d) && trap \'rm -rf "$t"\' EXIT && fsck.ext4 -fn {data}'
    ' && debugfs -R "dump /db.sqlite $t/db.sqlite" {data} && test -s "$t/db.sqlite"'
    ' && python3 -c "import sqlite3, sys; c = sqlite3.connect(\'file:\' + sys.argv[1] + \'?mode=ro\','
    ' uri=True); r = c.execute(\'PRAGMA integrity_check\').fetchall();'
    ' n = c.execute(\'SELECT count(*) FROM t\').fetchone()[0]; print(\'integrity\', r[0][0], \'rows\', n);'
    f' sys.exit(r != [(\'ok\',)] or n != {APP_ROWS})" "$t/db.sqlite"')


def agents(lab) -> dict:
    """Per host: the agent's pid, its agent.yml, and each group's role, source and targets."""
    out = {}
    for node in lab.nodes:
        st = lab.status(node)
        with open(lab.host_path(node, "/etc/replicator/agent.yml")) as f:
            conf = f.read()
        groups = {g["name"]: (g["role"], g.get("source"), sorted(t["node"] for t in g["targets"]))
                  for g in st["groups"]}
        out[node] = (st["pid"], conf, groups)
    return out


CHECKED_OPERATIONS = [  # operation playbooks in check mode, and a line of the diff each shows
    # (pair and verify: every link replicates and matches, so they would change nothing)
    (("switchover.yml", "-e", "replicator_switchover_to=dc2-dr"), "+    role: secondary"),
    (("pair.yml", "-e", "replicator_pair_initial_sync=checksum"), None),
    (("resync.yml", "-e", "replicator_resync_mode=full", "-e", "replicator_resync_rate=20MiB"), "+++ after"),
    (("reparent.yml", "-e", "replicator_reparent_node=dc4-vault", "-e", "replicator_reparent_source=dc2-dr"),
     "+++ after"),
    (("verify.yml",), None),
]


def test_check_diff_changes_nothing_and_shows_what_would_change(deployed):
    """site.yml and the operation playbooks under --check --diff: every host's agent, its
    configuration and every group's role, source and targets are as before; the diffs say
    what a real run would do (a new agent.yml line; a role that moves)."""
    lab = deployed
    before = agents(lab)
    out = playbook("site.yml", "--check", "--diff", "-e", json.dumps({"replicator_agent_heartbeat_timeout": 7}))
    assert "failed=0" in out and "+heartbeat_timeout: 7" in out, out[-4000:]
    assert re.search(r"^-heartbeat_timeout: [0-9.]+$", out, re.M), out[-4000:]
    assert "would restart" not in out  # a live change: its dry run says reload suffices
    for (name, *args), diff_line in CHECKED_OPERATIONS:
        out = playbook(name, "--check", "--diff", *args)
        assert "failed=0" in out, (name, out[-4000:])
        assert (diff_line in out) if diff_line else ("+++ after" not in out), (name, out[-4000:])
    assert agents(lab) == before
    for node in lab.nodes:
        assert not os.path.exists(lab.host_path(node, "/etc/replicator/agent.yml.check"))


def test_a_live_change_is_reloaded_without_cutting_nbd_clients(deployed):
    """A timer changed in the inventory: site.yml reloads every agent (same pid) instead of
    restarting it, and an NBD client connected before it keeps writing on the same
    connection; the change is undone the same way."""
    lab = deployed
    before = agents(lab)
    client = NbdClient.connect_unix(lab.nbd_socket(), "data")
    try:
        out = playbook("site.yml", "-e", json.dumps({"replicator_agent_heartbeat_timeout": 7}))
        assert "failed=0" in out and "Reload the agent's configuration" in out, out[-4000:]
        assert "restarts for" not in out, out[-4000:]
        after = agents(lab)
        for node in lab.nodes:
            assert after[node][0] == before[node][0], node  # the same agent process
            assert after[node][2] == before[node][2], node
            assert "heartbeat_timeout: 7" in after[node][1]
        client.send_write(1, 16 * MiB, b"\x5e" * MiB)
        client.send_flush(2)
        assert sorted(client.recv_reply() for _ in range(2)) == [(1, 0), (2, 0)]
    finally:
        client.close()
    out = playbook("site.yml")
    assert "failed=0" in out
    assert agents(lab) == before  # back as deployed, still the same agents
    lab.wait_converged()
    lab.assert_identical()


def test_site_from_an_installed_collection_by_fqcn(deployed, tmp_path):
    """A new user's project: the built collection installed, no ansible.cfg of ours; its
    site playbook by FQCN against the lab inventory finds the lab as deployed (nothing to
    change), and its check mode too."""
    lab = deployed
    before = agents(lab)
    env = project.fresh_project(tmp_path / "project", project.build(tmp_path / "build"))
    inventory = os.path.join(ROOT, "inventories", "lab")
    for mode in (["--check", "--diff"], []):
        out = project.run("ansible-playbook", "-i", inventory, "voltrail.replicator.site", *mode,
                          cwd=tmp_path / "project", env=env)
        recap = re.findall(r"^(\S+)\s+: ok=\d+\s+changed=(\d+)\s+unreachable=0\s+failed=0", out, re.M)
        assert sorted(recap) == sorted((node, "0") for node in lab.nodes), out[-4000:]
    assert agents(lab) == before


def app_image(tmp_path) -> str:
    """An 8 MiB ext4 file system holding /db.sqlite, made in user space (mkfs.ext4 -d)."""
    root = tmp_path / "app-root"
    root.mkdir()
    db = sqlite3.connect(root / "db.sqlite")
    with db:
        db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
        db.executemany("INSERT INTO t (v) VALUES (?)", [(f"row {i} " * 20,) for i in range(APP_ROWS)])
    db.close()
    image = str(tmp_path / "app.img")
    run(["mkfs.ext4", "-q", "-F", "-d", str(root), "-L", "app", image, "8M"])
    return image


def test_dr_exercise_at_a_marker_checks_the_application(deployed, tmp_path):
    """The test failover to a point before a logical corruption. A real ext4 file system
    holding a SQLite database is written to the primary's volume data through NBD; the
    drill takes a marker (between freeze and thaw commands) and the application check
    passes on dc4-vault's copy rewound to it. Then the operator marks the group
    (mark.yml) and the file system is overwritten: a copy rewound to that marker passes, and the same check on a current copy fails
    the drill (the negative control), as does a check that does not end in time."""
    lab = deployed
    run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", app_image(tmp_path),
         lab.nbd_uri("data")])
    lab.wait_converged()

    def drill(name, *args, check=True):
        report_dir = str(tmp_path / name)
        out = playbook("dr_exercise.yml", "-e", f"dr_report_dir={report_dir}",
                       "-e", "dr_exercise_mode=copy", "-e", "dr_exercise_volume_name=log",
                       "-e", "dr_exercise_target=dc4-vault", "-e", "dr_exercise_writes=200",
                       "-e", json.dumps({"dr_exercise_app_check": APP_CHECK}), *args,
                       check=check, timeout=900)
        with open(os.path.join(report_dir, "db", "report.json")) as f:
            return out, json.load(f)

    def check_of(report, name):
        (found,) = [c for c in report["checks"] if c["name"] == name]
        return found

    hooks = "/var/lib/replicator/dr-hooks.log"  # a lab host's own directory
    _, report = drill("marked", "-e", "dr_exercise_marker=app-ok", "-e", json.dumps({
        "dr_exercise_marker_freeze": f"echo frozen >> {hooks}",
        "dr_exercise_marker_thaw": f"echo thawed >> {hooks}"}))
    assert report["result"] == "pass", report
    with open(lab.host_path("dc1-app", hooks)) as f:
        assert f.read() == "frozen\nthawed\n"  # the marker was taken between the two
    (on_primary,) = [m for m in admin.request(lab.host_path("dc1-app", "/run/replicator/admin.sock"),
                                              "markers", group="db", timeout=5)["markers"]
                     if m["name"] == "app-ok"]
    marker = report["marker"]
    assert marker["taken_by_drill"] is True and marker["consistent"] is True
    assert marker["seq"] == on_primary["seq"]
    point = report["point"]
    assert (point["seq"], point["marker"]) == (on_primary["seq"], "app-ok") and point["time"]
    assert point["rewound_from"] >= point["seq"]
    assert check_of(report, "the copy is at marker app-ok")["status"] == "passed"
    # every write acknowledged before the marker was asked for is in the copy at it
    assert report["ledger"]["acknowledged"] >= 200 and report["rpo_writes_lost"] == 0
    assert report["ledger"]["prefix"] is True
    assert report["app_check"]["rc"] == 0
    assert f"integrity ok rows {APP_ROWS}" in report["app_check"]["output_tail"]
    assert check_of(report, "application check on the copy")["status"] == "passed"
    assert "marker app-ok" in open(os.path.join(tmp_path, "marked", "db", "report.md")).read()

    # the operator marks the group (mark.yml) before an upgrade that goes wrong: a logical
    # corruption, replicated everywhere, overwrites the file system's first MiB (its
    # superblock, group descriptors and inode table)
    out = playbook("mark.yml", "-e", "replicator_mark_group=db",
                   "-e", "replicator_mark_name=before-upgrade")
    (seq,) = {int(n) for n in re.findall(r"db dc4-vault: marker before-upgrade at seq\s+(\d+)", out)}
    qemu_io(lab.nbd_uri("data"), "write -P 0x5a 0 1M")
    lab.wait_converged()
    # the copy rewound to that marker, after the corruption: the application is whole
    _, report = drill("recovered", "-e", "dr_exercise_marker=before-upgrade")
    assert report["result"] == "pass", report
    assert report["marker"]["taken_by_drill"] is False
    assert report["point"]["seq"] == seq and report["point"]["marker"] == "before-upgrade"
    assert report["app_check"]["rc"] == 0
    # the marker came before the drill: none of its writes is in the copy
    assert report["ledger"]["acknowledged"] == 0 and report["ledger"]["unacknowledged_present"] == 0
    assert check_of(report, "no write of the drill after the marker is in the copy")["status"] == "passed"
    assert not os.path.exists(lab.host_path("dc4-vault", "/var/lib/replicator/drill/db"))
    # the negative control: the same check on a current copy fails, and the drill with it
    out, report = drill("current", check=False)
    assert "the DR exercise failed for db" in out
    assert report["result"] == "fail" and report["point"]["marker"] is None
    app = check_of(report, "application check on the copy")
    assert app["status"] == "failed" and "exited 8" in app["message"], app
    assert report["app_check"]["rc"] == 8
    assert any("Bad magic number in super-block" in line for line in report["app_check"]["output_tail"])
    assert any(r.startswith("application check on the copy: ") for r in report["reasons"])
    assert check_of(report, "RPO within objective")["status"] == "passed"  # only the app failed
    assert [e["event"] for e in report["timeline"]][-1] == "copy_deleted"
    assert "Bad magic number" in open(os.path.join(tmp_path, "current", "db", "report.md")).read()
    suite = ET.parse(os.path.join(tmp_path, "current", "db", "report.xml")).getroot().find("testsuite")
    assert int(suite.get("failures")) == 1
    # a check that does not end in time is killed, and fails
    _, report = drill("hung", "-e", json.dumps({"dr_exercise_app_check": "echo checking {data}; sleep 60",
                                                "dr_exercise_app_check_timeout": 2}), check=False)
    app = check_of(report, "application check on the copy")
    assert app["status"] == "failed" and "exited 124 (timed out after 2 s)" in app["message"], app
    assert report["app_check"]["output_tail"] == ["checking /var/lib/replicator/drill/db/data.img"]

    lab.wait_converged()
    lab.assert_identical()  # the replicas went on: corrupted like the primary


def test_prometheus_scrapes_every_agent_and_sees_every_link(deployed):
    lab = deployed
    prometheus = PROMETHEUS.LabPrometheus(lab.dir)
    pid = prometheus.pid()

    def query(expr):
        return lab.prometheus("query?query=" + urllib.parse.quote(expr))["result"]

    def every_agent_up():
        return sorted(s["metric"]["node"] for s in query('up{job="replicator"}')
                      if s["value"][1] == "1") == sorted(lab.nodes)
    wait_until(every_agent_up, 30, "Prometheus to scrape every agent (up == 1)")

    def every_link_has_lag():
        return set(lab.links()) <= {(s["metric"]["group"], s["metric"]["node"], s["metric"]["target"])
                                    for s in query("replicator_target_lag_seconds")}
    wait_until(every_link_has_lag, 10, "replicator_target_lag_seconds of every link")
    out = playbook("metrics.yml")
    for group, source, target in lab.links():  # one line per link, with its lag in seconds
        assert re.search(rf"\b{group} +{source} -> {target} +\d+\.\d\b", out), out
    # each agent's /metrics, fetched as Prometheus does, passes promtool's lint
    for t in lab.prometheus("targets")["activeTargets"]:
        with urllib.request.urlopen(t["scrapeUrl"], timeout=5) as r:
            body = r.read()
        p = subprocess.run(["promtool", "check", "metrics"], input=body, capture_output=True)
        assert p.returncode == 0, (t["labels"]["node"], p.stdout, p.stderr)
    p = subprocess.run(["promtool", "check", "config", prometheus.config], capture_output=True,
                       text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    with open(os.path.join(ROOT, "monitoring", "alerts.yml")) as f:
        alerts = {r["alert"] for g in yaml.safe_load(f)["groups"] for r in g["rules"] if "alert" in r}
    loaded = {r["name"] for g in lab.prometheus("rules")["groups"] for r in g["rules"]}
    assert "ReplicatorAgentDown" in alerts and alerts <= loaded
    # a second up keeps the one Prometheus that runs
    playbook("lab.yml", "-e", "lab_state=up", "-e", "lab_prometheus=true")
    assert prometheus.pid() == pid


def test_isolated_host_catches_up_after_heal(deployed):
    lab = deployed
    playbook("lab_fault.yml", "-e", "lab_fault=isolate", "-l", "dc3-arc")
    try:
        qemu_io(lab.nbd_uri("data"), "write -P 0x77 16M 24M")
        wait_until(lambda: next(t for t in lab.group_status("dc1-app")["targets"]
                                if t["node"] == "dc3-arc")["state"] != "replicating",
                   30, "dc1-app to notice that dc3-arc is away")
    finally:
        playbook("lab_fault.yml", "-e", "lab_fault=heal", "-l", "dc3-arc")
    assert "db dc3-arc -> dc4-vault" in playbook("pair.yml", "-e", "replicator_pair_timeout=120")
    lab.wait_converged()
    lab.assert_identical()


def test_crashed_host_boots_with_its_agent(deployed):
    lab = deployed
    before = lab.state()["procs"]["dc4-vault"]["init"]
    playbook("lab_fault.yml", "-e", "lab_fault=crash", "-l", "dc4-vault")
    assert module_utils("replicator_lab").pidns_members(before["pidns"]) == [], \
        "a process of the crashed host survived"
    qemu_io(lab.nbd_uri("log"), "write -P 0x99 2M 2M")
    playbook("lab_fault.yml", "-e", "lab_fault=boot", "-l", "dc4-vault")
    assert lab.state()["procs"]["dc4-vault"]["init"]["pid"] != before["pid"]
    # the agent came back by itself (the supervisor runs at boot): pair only waits for it
    playbook("pair.yml", "-e", "replicator_pair_timeout=120")
    lab.wait_converged()
    lab.assert_identical()



def test_switchover_and_back_loses_nothing(deployed):
    lab = deployed
    qemu_io(lab.nbd_uri("data"), "write -P 0x21 0 4M")
    lab.wait_converged()
    out = playbook("switchover.yml", "-e", "replicator_switchover_to=dc2-dr")
    assert '"to": "dc2-dr"' in out or "dc2-dr" in out
    assert lab.group_status("dc2-dr")["role"] == "primary"
    assert lab.group_status("dc1-app")["role"] == "secondary"
    qemu_io(lab.nbd_uri("data", node="dc2-dr"), "write -P 0x22 8M 4M")
    playbook("switchover.yml", "-e", "replicator_switchover_to=dc1-app")
    assert lab.group_status("dc1-app")["role"] == "primary"
    lab.wait_converged()
    lab.assert_identical()  # dc2-dr's write is on every replica, byte for byte


def test_dr_exercise_through_the_bunker(deployed, tmp_path):
    """The scheduled drill: workload with a ledger, the primary's host crashed, failover
    to the far async replica through the bunker, ledger check, failback, report."""
    lab = deployed
    report_dir = str(tmp_path / "dr")
    playbook("dr_exercise.yml", "-e", f"dr_report_dir={report_dir}", *DESTRUCTIVE, timeout=900)
    report_dir = os.path.join(report_dir, "db")  # one directory per group drilled
    with open(os.path.join(report_dir, "report.json")) as f:
        report = json.load(f)
    assert report["result"] == "pass", report
    assert report["rpo_writes_lost"] == 0 and report["ledger"]["acknowledged"] >= 500
    assert 0 < report["rto_seconds"] < 60
    assert report["failback_bytes_shipped"] < report["volume_size"] / 10
    suite = ET.parse(os.path.join(report_dir, "report.xml")).getroot().find("testsuite")
    assert suite is not None and int(suite.get("failures")) == 0
    assert "PASS" in open(os.path.join(report_dir, "report.md")).read()
    # during the takeover, dc3-arc had taken over dc1-app's links as declared: the sync
    # replica stayed sync, the bunker stayed its bunker, the cascade kept its far hop
    during = {(lk["source"], lk["target"]): lk["mode"] for lk in report["takeover_links"]}
    assert during == {("dc3-arc", "dc2-dr"): "sync", ("dc3-arc", "dc1-bunker"): "sync",
                      ("dc3-arc", "dc4-vault"): "async"}, during
    # back to the declared topology, every link replicating, replicas identical
    assert lab.group_status("dc1-app")["role"] == "primary"
    links = {t["node"]: (t["mode"], t["compress"]) for t in lab.group_status("dc1-app")["targets"]}
    assert links == {"dc2-dr": ("sync", "none"), "dc1-bunker": ("sync", "none"),
                     "dc3-arc": ("async", "zstd")}  # not the takeover's all-async links
    lab.wait_converged()
    lab.assert_identical()


def test_dr_exercise_promoting_the_leaf_below_the_intermediate(deployed, tmp_path):
    """Promoting dc4-vault, which receives from the intermediate dc3-arc: the link
    between them is reversed (dc3-arc becomes dc4-vault's replica) and dc4-vault takes
    over dc1-app's links; failback puts every link back as declared."""
    lab = deployed
    report_dir = str(tmp_path / "dr")
    playbook("dr_exercise.yml", "-e", f"dr_report_dir={report_dir}", *DESTRUCTIVE, "-e", "dr_exercise_target=dc4-vault",
             "-e", "dr_exercise_writes=300", timeout=900)
    with open(os.path.join(report_dir, "db", "report.json")) as f:
        report = json.load(f)
    assert report["result"] == "pass", report
    assert report["promoted"] == "dc4-vault" and report["rpo_writes_lost"] == 0
    during = {(lk["source"], lk["target"]): lk["mode"] for lk in report["takeover_links"]}
    assert during == {("dc4-vault", "dc2-dr"): "sync", ("dc4-vault", "dc1-bunker"): "sync",
                      ("dc4-vault", "dc3-arc"): "async"}, during
    assert lab.group_status("dc3-arc")["source"] == "dc1-app"
    assert [t["node"] for t in lab.group_status("dc3-arc")["targets"]] == ["dc4-vault"]
    lab.wait_converged()
    lab.assert_identical()


def test_dr_exercise_copy_mode_leaves_production_running(deployed, tmp_path):
    """The non-destructive drill for real hosts: nothing is stopped; the far replica
    promotes a copy of itself through the bunker, the copy is checked against the
    ledger and deleted, and the replica and its primary are left as they were."""
    lab = deployed
    before = {n: lab.group_status(n) for n in ("dc1-app", "dc3-arc")}
    report_dir = str(tmp_path / "dr")
    out = playbook("dr_exercise.yml", "-e", f"dr_report_dir={report_dir}",
                   "-e", "dr_exercise_mode=copy", check=False)
    assert "set aside for drills" in out  # copy mode refuses to write a volume not named
    playbook("dr_exercise.yml", "-e", f"dr_report_dir={report_dir}", "-e", "dr_exercise_mode=copy",
             "-e", "dr_exercise_volume_name=log", "-e", "dr_exercise_writes=300", timeout=900)
    with open(os.path.join(report_dir, "db", "report.json")) as f:
        report = json.load(f)
    assert report["result"] == "pass", report
    assert report["rpo_writes_lost"] == 0 and report["ledger"]["acknowledged"] >= 300
    assert report["ledger"]["acked_before"] is not None
    assert report["ledger"]["writer_stopped"] == "signal"  # it wrote on through the copy
    assert report["takeover"]["role"] == "copy" and report["takeover"]["rpo_records"] == 0
    assert [e["event"] for e in report["timeline"]][-1] == "copy_deleted"
    assert not os.path.exists(lab.host_path("dc3-arc", "/var/lib/replicator/drill/db"))
    for node, was in before.items():
        now = lab.group_status(node)
        assert (now["role"], now["generation"]) == (was["role"], was["generation"])
    lab.wait_converged()
    lab.assert_identical()


@needs_cron
def test_scheduled_dr_exercise_fires_from_cron(deployed, tmp_path):
    """The DR exercise on a schedule, as an operator installs it with dr_schedule.yml on a
    controller without systemd: every minute, copy mode. Debian's cron, started by the
    test as its own child (tests/ansible/cron_harness.py: over the test's cron.d only),
    fires it; a run directory with a passing report and the index appear; state=absent
    removes the schedule."""
    lab = deployed
    base = tmp_path / "dr"
    settings = {"replicator_dr_schedule_cron": "* * * * *",
                "replicator_dr_schedule_cron_file": str(tmp_path / "cron.d" / "replicator-dr-exercise"),
                "replicator_dr_schedule_runner": str(tmp_path / "replicator-dr-run"),
                "replicator_dr_schedule_report_dir": str(base), "replicator_dr_schedule_keep": 3,
                "replicator_dr_schedule_extra_vars": {"dr_exercise_volume_name": "log",
                                                      "dr_exercise_writes": 300}}
    with cron_daemon(str(tmp_path)):
        # the defaults: the cron path (no systemd here), this inventory, the directory
        # ansible-playbook runs from (the checkout), the playbook voltrail.replicator.dr_exercise
        out = playbook("dr_schedule.yml", "-e", json.dumps(settings))
        assert "Schedule it (cron)" in out
        with open(settings["replicator_dr_schedule_cron_file"]) as f:
            assert f"* * * * * root {tmp_path}/replicator-dr-run\n" in f.read()
        try:
            (run_dir,) = wait_until(lambda: sorted(p for p in base.iterdir() if p.is_dir()),
                                    150, "cron to start the first scheduled run", interval=1)[:1]
        finally:  # no further run (one that fires meanwhile finds the lock held)
            playbook("dr_schedule.yml", "-e", json.dumps(settings),
                     "-e", "replicator_dr_schedule_state=absent")
            # a run going on ends before the test does (and the lab's teardown)
            wait_until(lambda: lock_free(str(base / ".lock")), 600, "the scheduled run to end",
                       interval=1)
    log = (run_dir / "ansible.log").read_text() if (run_dir / "ansible.log").exists() else "(no log)"
    assert (run_dir / "db" / "report.json").exists(), f"{sorted(os.listdir(run_dir))}\n{log[-4000:]}"
    with open(run_dir / "db" / "report.json") as f:
        report = json.load(f)
    assert report["result"] == "pass", log[-3000:]
    assert report["rpo_writes_lost"] == 0 and report["ledger"]["acknowledged"] >= 300
    assert report["takeover"]["role"] == "copy"  # the copy drill: production went on
    for name in ("report.xml", "report.md", "report.html"):
        assert (run_dir / "db" / name).is_file(), name
    assert "PLAY RECAP" in log
    with open(base / "index.json") as f:
        rows = json.load(f)["rows"]
    assert [(r["run"], r["group"], r["result"]) for r in rows] == [(run_dir.name, "db", "pass")]
    assert rows[0]["rto_seconds"] == report["rto_seconds"]
    index_html = (base / "index.html").read_text()
    assert "<svg" in index_html and f'href="{run_dir.name}/db/report.html"' in index_html
    assert not os.path.exists(settings["replicator_dr_schedule_cron_file"])
    assert not (tmp_path / "replicator-dr-run").exists()
    lab.wait_converged()
    lab.assert_identical()
