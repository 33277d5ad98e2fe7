"""Processing offload (issue 17): the far link zstd-compressed by the primary (A) vs
processed by the near sync replica (B), side by side in one run.

    .venv/bin/python -m bench.bench_offload [--runs 5] [--pages 8192] [--rewrites 40000]
                                            [--depth 16] [--rate 1000] [--paced 20000]

Per run and variant, a fresh group of three agents, each in a network namespace of its
own: primary `p`, near `n` (a sync target, on an unshaped veth pair with p) and far `f`
(an async target, on a second veth pair with p). The far target is
    A: {mode: async, compress: zstd}                                (shipped by p)
    B: {mode: async, via: n, process: [delta, zstd, checksum]}     (processed by n)
and, with --variants A,C (or A,B,C), a cascade where p ships only to n:
    C: n's target {mode: async, process: [delta, zstd, checksum]}  (n ships on to f)
(f then hangs off n on a third veth pair, which is the one shaped and counted). Every
link `initial_sync: assume-clean` (all volumes start as the same zeroes). The
variants alternate which goes first from run to run. The workload, over NBD to p at
queue depth --depth, is a "database page" one on a volume of --pages 4 KiB pages:

1. first writes: every page once, with random content (so zstd alone cannot shrink it);
2. rewrites: --rewrites writes of a random page with 64 contiguous random bytes
   changed at a random place in it (the rest as the page was);
   over this phase and the first, the bytes on p's TCP connection to f (the kernel's
   count for that socket, `ss -ti` bytes_acked, inside p's namespace) and everything
   p's veth towards f sent (its tx bytes: TCP/IP headers and pure ACKs included);
   and the CPU each agent spent (utime + stime from /proc/PID/stat) per write, from
   the phase's first write to its last reply (on the unshaped link f is only batches
   behind: the little left to ship then is not counted, nor the status polls of the
   wait until every replica applied the phase);
   then --paced more rewrites at --rate writes a second, the same CPU figures: at one
   rate both variants keep up with, so both primaries see the same batches (unpaced,
   B's write rate is lower and its batches smaller, which costs the primary per write);
3. then p's veth towards f is shaped with `tc qdisc ... tbf rate 100mbit` (the near
   link stays as it is) and the far link's throughput is measured on --rewrites more
   rewrites, then on as many writes of whole new random pages (nothing to compress for
   either variant: the link's own limit): the payload bytes (4 KiB a write, before any
   compression) f received and journaled, per second from the phase's first write to
   f's written seq reaching its last record, against the link's 12.5 MB/s.
At the end every replica's volume is compared with the primary's. A last pass per
variant (not in the medians) runs phases 1-2 with the primary (and in B the near node)
under cProfile, the clock its event loop thread's CPU time; the top of each profile is
printed and written to bench/results/offload-profile-<variant>-<node>.txt.
Medians of the runs and their ratios: stdout and bench/results/offload.json.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import io
import os
import pstats
import random
import re
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.bench_core import cpu_seconds  # noqa: E402
from bench.bench_resync import LINK_MBIT, sh  # noqa: E402
from bench.results_file import RESULTS, each_run, medians, run_line, save  # noqa: E402
from replicator.drill.nbd_client import NbdClient  # noqa: E402
from tests.agents import Topology, wait_until  # noqa: E402

PAGE = 4096
CHANGE = 64  # bytes of a page a rewrite changes
PORT = 7800
VARIANTS = {  # the far target's keys, and which node ships to it
    "A": ({"compress": "zstd"}, "p"),
    "B": ({"via": "n", "process": ["delta", "zstd", "checksum"]}, "p"),
    # claim 12: n processes what it receives and ships it on to f itself (a cascade)
    "C": ({"process": ["delta", "zstd", "checksum"]}, "n"),
}
CLONE_NEWNET = 0x40000000
# The agent under cProfile with the CPU time of its event loop's thread as the clock (the
# wall clock would charge a frame with the time the process waited for a core), the
# profile written as it returns (SIGTERM): argv = [-c, profile path, agent args...].
PROFILED = """import cProfile, sys, time
from replicator.cli import main
prof = cProfile.Profile(time.thread_time)
try:
    prof.runcall(main, sys.argv[2:])
finally:
    prof.dump_stats(sys.argv[1])
"""
_libc = ctypes.CDLL(None, use_errno=True)


class Net:
    """Three namespaces p, n, f; veth pairs p-f (10.215.1.0/24), p-n (10.215.2.0/24) and
    n-f (10.215.3.0/24); `shipper` ("p", or "n" for variant C) is the one that ships to f.
    Everything it made goes on close, whatever happened."""

    def __init__(self, shipper: str = "p"):
        tag = f"rbo{os.getpid() % 10000}"
        self.shipper = shipper
        self.ns = {n: f"{tag}{n}" for n in "pnf"}
        self.dev = {d: f"{tag}{d}" for d in ("pf", "fp", "pn", "np", "nf", "fn")}
        self.ip = {"p": "10.215.1.1", "f": "10.215.1.2", "pn": "10.215.2.1", "n": "10.215.2.2",
                   "nf": "10.215.3.1", "fn": "10.215.3.2"}
        self.procs: list[subprocess.Popen] = []

    def __enter__(self) -> "Net":
        try:
            for ns in self.ns.values():
                sh("ip", "netns", "add", ns)
                sh("ip", "-n", ns, "link", "set", "lo", "up")
            for a, b in (("pf", "fp"), ("pn", "np"), ("nf", "fn")):
                sh("ip", "link", "add", self.dev[a], "netns", self.ns[a[0]], "type", "veth",
                   "peer", "name", self.dev[b], "netns", self.ns[b[0]])
            for ns, dev, ip in (("p", "pf", "p"), ("f", "fp", "f"), ("p", "pn", "pn"),
                                ("n", "np", "n"), ("n", "nf", "nf"), ("f", "fn", "fn")):
                sh("ip", "-n", self.ns[ns], "addr", "add", f"{self.ip[ip]}/24", "dev",
                   self.dev[dev])
                sh("ip", "-n", self.ns[ns], "link", "set", self.dev[dev], "up")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for ns in self.ns.values():  # its veths go with it
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)

    def configure(self, topo: Topology) -> None:
        """Every agent listens on its own side of its veths; p reaches n and f on theirs."""
        seen_from = {"p": {"n": self.ip["n"], "f": self.ip["f"]},
                     "n": {"p": self.ip["pn"], "f": self.ip["fn"]},
                     "f": {"p": self.ip["p"], "n": self.ip["nf"]}}
        for node, agent in topo.agents.items():
            agent.config["listen"] = f"0.0.0.0:{PORT}"
            agent.config["peers"] = {o: f"{ip}:{PORT}" for o, ip in seen_from[node].items()}
            agent.config["nbd_listen"] = f"127.0.0.1:{agent.nbd_port}"
            agent.save_config()

    def start(self, agent, profile: str | None = None) -> None:
        """Start `agent` in its namespace (the Popen is the agent: ip netns exec execs);
        `profile`: the path of a cProfile dump it writes as it stops."""
        log = open(agent.log_path, "a")
        run = ["-c", PROFILED, profile] if profile else ["-m", "replicator.cli"]
        agent.proc = subprocess.Popen(["ip", "netns", "exec", self.ns[agent.node],
                                       sys.executable, *run, "agent", "-c", agent.config_path],
                                      stdout=log, stderr=log)
        log.close()
        self.procs.append(agent.proc)

    def _towards_f(self) -> tuple[str, str, str]:
        """The shipper's namespace, its veth towards f and f's address on it."""
        if self.shipper == "n":
            return self.ns["n"], self.dev["nf"], self.ip["fn"]
        return self.ns["p"], self.dev["pf"], self.ip["f"]

    def shape(self) -> None:
        ns, dev, _ = self._towards_f()
        sh("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev,
           "root", "tbf", "rate", f"{LINK_MBIT}mbit", "burst", "64kb", "latency", "50ms")

    def far_bytes(self) -> dict:
        """What the shipper sent towards f so far: `tcp`, the payload bytes its
        connections to f's port had acked (per local port: a new connection starts from
        0), and `veth`, everything its veth towards f transmitted."""
        ns, dev, far = self._towards_f()
        out = subprocess.run(["ip", "netns", "exec", ns, "ss", "-tinH", "state",
                              "established", "dst", f"{far}:{PORT}"],
                             capture_output=True, text=True, check=True).stdout
        tcp = {}
        for conn in re.split(r"\n(?=\S)", out.strip()):
            port = re.search(r":(\d+)\s+\S+:%d" % PORT, conn)
            acked = re.search(r"bytes_acked:(\d+)", conn)
            if port:
                tcp[int(port.group(1))] = int(acked.group(1)) if acked else 0
        link = subprocess.run(["ip", "-n", ns, "-j", "-s", "link", "show", "dev", dev],
                              capture_output=True, text=True, check=True)
        veth = int(re.search(r'"tx":\{"bytes":(\d+)', link.stdout).group(1))
        return {"tcp": tcp, "veth": veth}

    @contextlib.contextmanager
    def inside(self, node: str):
        """This thread in `node`'s network namespace (sockets made in it stay there)."""
        home = os.open("/proc/self/ns/net", os.O_RDONLY)
        there = os.open(f"/var/run/netns/{self.ns[node]}", os.O_RDONLY)
        try:
            if _libc.setns(there, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns into " + self.ns[node])
            try:
                yield
            finally:
                if _libc.setns(home, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns back home")
        finally:
            os.close(there)
            os.close(home)


def sent(before: dict, after: dict) -> dict:
    """Bytes towards f between two far_bytes(); `reconnected`: a connection was new."""
    tcp = sum(n - before["tcp"].get(port, 0) for port, n in after["tcp"].items())
    return {"tcp": tcp, "veth": after["veth"] - before["veth"],
            "reconnected": set(after["tcp"]) != set(before["tcp"])}


class PageWriter:
    """The page workload over one NBD connection, `depth` writes in flight."""

    def __init__(self, client: NbdClient, pages: int, depth: int, seed: int):
        self.client, self.depth = client, depth
        self.rng = random.Random(seed)
        self.pages = [bytearray(PAGE) for _ in range(pages)]
        self.cookie = 0

    def _write(self, writes, rate: float = 0.0) -> int:
        """Send `writes`, `depth` in flight; `rate`: at most that many a second."""
        inflight, start = 0, time.monotonic()
        for k, (offset, data) in enumerate(writes):
            if rate and (ahead := start + k / rate - time.monotonic()) > 0:
                time.sleep(ahead)  # the workload's pace
            if inflight == self.depth:
                self._reply()
                inflight -= 1
            self.cookie += 1
            self.client.send_write(self.cookie, offset, data)
            inflight += 1
        for _ in range(inflight):
            self._reply()
        return self.cookie

    def _reply(self) -> None:
        cookie, err = self.client.recv_reply()
        if err:
            raise OSError(err, f"NBD write {cookie} failed")

    def first_writes(self) -> None:
        self._write(self._whole(i) for i in range(len(self.pages)))

    def new_pages(self, n: int) -> None:
        """`n` writes of whole new random content to random pages."""
        self._write(self._whole(self.rng.randrange(len(self.pages))) for _ in range(n))

    def rewrites(self, n: int, rate: float = 0.0) -> None:
        self._write((self._rewrite() for _ in range(n)), rate)

    def _whole(self, i: int):
        self.pages[i][:] = self.rng.randbytes(PAGE)
        return i * PAGE, bytes(self.pages[i])

    def _rewrite(self):
        i = self.rng.randrange(len(self.pages))
        at = self.rng.randrange(PAGE - CHANGE + 1)
        self.pages[i][at:at + CHANGE] = self.rng.randbytes(CHANGE)
        return i * PAGE, bytes(self.pages[i])


def offload_counts(shipper) -> dict:
    off = shipper.target("db", "f").get("offload") or {}
    return {k: off.get(k, 0) for k in ("records_processed", "records_direct",
                                       "base_mismatches", "dropped_runs")}


def wire_phase(topo, net, cpu_pids, phase: str, work) -> dict:
    """Run `work` (writes): its bytes towards f once every replica applied it, the CPU
    per write of each agent while it ran, IOPS, and the far link's path."""
    p, shipper = topo["p"], topo[net.shipper]
    seq0, off0 = p.group("db")["seq"], offload_counts(shipper)
    b0, c0 = net.far_bytes(), {n: cpu_seconds(pid) for n, pid in cpu_pids.items()}
    start = time.monotonic()
    work()
    wrote = time.monotonic() - start
    c1 = {n: cpu_seconds(pid) for n, pid in cpu_pids.items()}
    seq = topo.wait_converged(120)  # (its status polls are not in the CPU figures)
    b1 = net.far_bytes()
    writes, moved = seq - seq0, sent(b0, b1)
    off1 = offload_counts(shipper)
    out = {f"{phase}_writes": writes, f"{phase}_iops": writes / wrote,
           f"{phase}_tcp_bytes": moved["tcp"], f"{phase}_veth_bytes": moved["veth"],
           f"{phase}_tcp_per_write": moved["tcp"] / writes,
           f"{phase}_reconnected": moved["reconnected"]}
    for n in cpu_pids:
        out[f"{phase}_cpu_us_{n}"] = (sum(c1[n]) - sum(c0[n])) / writes * 1e6
    for k in off1:
        out[f"{phase}_{k}"] = off1[k] - off0[k]
    return out


def link_phase(topo, net, work, phase: str) -> dict:
    """The shaped far link: payload bytes per second f received and journaled, from the
    phase's first write to f's written seq reaching the phase's last record."""
    p, shipper = topo["p"], topo[net.shipper]
    seq0, off0 = p.group("db")["seq"], offload_counts(shipper)
    start = time.monotonic()
    work()
    wrote = time.monotonic() - start
    last = p.group("db")["seq"]
    wait_until(lambda: shipper.target("db", "f")["written_seq"] >= last, 600,
               f"f to receive {phase}", interval=0.05)
    seconds = time.monotonic() - start
    payload = (last - seq0) * PAGE
    return {f"{phase}_iops": (last - seq0) / wrote, f"{phase}_s": seconds,
            f"{phase}_MBps": payload / seconds / 1e6,
            f"{phase}_of_link": payload * 8 / seconds / (LINK_MBIT * 1e6),
            **{f"{phase}_{k}": v - off0[k] for k, v in offload_counts(shipper).items()}}


def one_run(root: str, variant: str, args, seed: int, profile: dict | None = None) -> dict:
    """One variant's phases; `profile`: node -> the path of its cProfile dump (then only
    phases 1-2)."""
    keys, shipper = VARIANTS[variant]
    topo = Topology(root, ["p", "n", "f"],
                    [("p", "n", "sync", {"initial_sync": "assume-clean"}),
                     (shipper, "f", "async", {"initial_sync": "assume-clean", **keys})],
                    volumes={"data": args.pages * PAGE}, journal_size="2GiB",
                    heartbeat_timeout=5.0)
    out: dict = {}
    with Net(shipper) as net:
        net.configure(topo)
        for node in ("f", "n", "p"):
            net.start(topo[node], (profile or {}).get(node))
        for agent in topo.agents.values():
            wait_until(agent.status, 30, f"agent {agent.node}")
        topo.wait_converged(60)
        p = topo["p"]
        with net.inside("p"):
            client = NbdClient.connect("127.0.0.1", p.nbd_port, "data")
        try:
            writer = PageWriter(client, args.pages, args.depth, seed)
            pids = {n: a.proc.pid for n, a in topo.agents.items()}
            out.update(wire_phase(topo, net, pids, "first", writer.first_writes))
            out.update(wire_phase(topo, net, pids, "rewrite",
                                  lambda: writer.rewrites(args.rewrites)))
            if profile is None:
                out.update(wire_phase(topo, net, pids, "paced",
                                      lambda: writer.rewrites(args.paced, args.rate)))
                net.shape()
                out.update(link_phase(topo, net, lambda: writer.rewrites(args.rewrites),
                                      "link_rewrite"))
                out.update(link_phase(topo, net, lambda: writer.new_pages(args.rewrites),
                                      "link_new"))
        finally:
            client.close()
        topo.wait_converged(600)
        topo.assert_identical()
        for node in ("p", "n", "f"):  # SIGTERM: a profiled primary writes its profile
            topo[node].stop()
    return out


def profile_top(path: str, n: int = 30) -> str:
    """The functions with the most CPU of their own, then the agent's own functions by
    CPU inclusive of what they call (not the imports at start)."""
    text = io.StringIO()
    stats = pstats.Stats(path, stream=text)
    stats.sort_stats("tottime").print_stats(n)
    stats.sort_stats("cumulative").print_stats("/replicator/", n)
    short = re.sub(r"\S*/replicator/", "", text.getvalue())  # the agent's: from the package
    return re.sub(r"/\S*/(?=[\w.]+\.py:)", "", short)  # the others: the file's name


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--pages", type=int, default=8192, help="4 KiB pages of the volume")
    ap.add_argument("--rewrites", type=int, default=40000, help="writes of each later phase")
    ap.add_argument("--depth", type=int, default=16, help="NBD writes in flight")
    ap.add_argument("--rate", type=float, default=1000,
                    help="writes a second of the paced rewrites (both variants keep up)")
    ap.add_argument("--paced", type=int, default=20000, help="paced rewrites")
    ap.add_argument("--no-profile", action="store_true", help="skip the cProfile pass")
    ap.add_argument("--variants", default="A,B",
                    help="A (zstd on p), B (processed via n), C (n processes and ships on to "
                         "f itself): A and at least one of the others")
    args = ap.parse_args()
    variants = args.variants.split(",")
    if "A" not in variants or not set(variants) - {"A"} or set(variants) - set(VARIANTS):
        ap.error("--variants: A and one or both of B, C")
    # SIGTERM as an exception: the namespaces, agents and files go on the way out
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    if min(args.runs, args.pages, args.rewrites, args.depth, args.rate, args.paced) <= 0:
        ap.error("--runs, --pages, --rewrites, --depth, --rate and --paced must be positive")
    runs = {v: [] for v in variants}
    for n, root in each_run(args.runs, "bench-offload-"):
        order = variants if n % 2 else variants[::-1]
        for variant in order:
            out = one_run(os.path.join(root, variant), variant, args, seed=n)
            runs[variant].append(out)
            run_line(n, {"variant": variant, **out})
    med = {v: medians(r) for v, r in runs.items()}
    a = med["A"]
    summary = {
        "pages": args.pages, "rewrites": args.rewrites, "depth": args.depth,
        "rate": args.rate, "paced": args.paced,
        "link_mbit": LINK_MBIT, "runs": runs, "median": med,
        "every_run_without_reconnect": not any(
            r[k] for rs in runs.values() for r in rs for k in r if k.endswith("reconnected")),
    }
    for v in (x for x in variants if x != "A"):
        b, tag = med[v], "" if v == "B" else f"{v}_"  # B's keys as they always were
        summary.update({
            f"{tag}rewrite_wire_fewer_tcp": a["rewrite_tcp_bytes"] / b["rewrite_tcp_bytes"],
            f"{tag}rewrite_wire_fewer_veth": a["rewrite_veth_bytes"] / b["rewrite_veth_bytes"],
            f"{tag}first_wire_ratio_tcp": a["first_tcp_bytes"] / b["first_tcp_bytes"],
            f"{tag}rewrite_primary_cpu_less": 1 - b["rewrite_cpu_us_p"] / a["rewrite_cpu_us_p"],
            f"{tag}paced_primary_cpu_less": 1 - b["paced_cpu_us_p"] / a["paced_cpu_us_p"],
            f"{tag}link_rewrite_of_link": {"A": a["link_rewrite_of_link"],
                                           v: b["link_rewrite_of_link"]},
            f"{tag}link_new_of_link": {"A": a["link_new_of_link"], v: b["link_new_of_link"]},
        })
    if not args.no_profile:
        os.makedirs(RESULTS, exist_ok=True)
        for variant, nodes in (("A", "p"), ("B", "pn"), ("C", "pn")):  # and the near node
            if variant not in variants:
                continue
            for _, root in each_run(1, f"bench-offload-prof{variant}-"):
                dumps = {node: os.path.join(root, f"{node}.prof") for node in nodes}
                out = one_run(os.path.join(root, variant), variant, args, seed=99,
                              profile=dumps)
                tops = {node: profile_top(path) for node, path in dumps.items()}
            summary[f"profiled_{variant}"] = out
            for node, top in tops.items():
                path = os.path.join(RESULTS, f"offload-profile-{variant}-{node}.txt")
                with open(path, "w") as f:
                    f.write(f"variant {variant}, node {node} under cProfile; the run: {out}\n\n"
                            f"{top}")
                print(f"--- {node} under cProfile, variant {variant} ({path}) ---\n"
                      + top[:6000])
    save("offload", summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
