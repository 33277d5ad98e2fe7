# PYTHON_ARGCOMPLETE_OK  (argcomplete: this script completes its own arguments)
"""`replicator` command line: the agent itself and the operator commands that talk to a
running agent over its admin socket (named by the same config file)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import time

import argcomplete

from . import __version__, admin, config, logs, reload
from .sizes import human_bytes, size_text

DEFAULT_CONFIG = "/etc/replicator/agent.yml"
COMPLETION_SHELLS = ("bash", "zsh", "fish")


def format_status(st: dict) -> str:
    """The human table: one block per group, one line per target (like drbdadm status)."""
    lines = [f"node {st['node']}  (pid {st['pid']}, up {st['uptime_seconds']:.0f}s)"]
    nbd = st.get("nbd") or {}
    if nbd.get("listeners"):
        lines.append(f"nbd on {', '.join(nbd['listeners'])}")
    tls = st.get("tls")
    if tls:
        line = f"tls {tls['subject']} until {tls['not_after'][:10]} ({tls['days_left']:g} days)"
        if tls["days_left"] < 30:
            line += "  EXPIRES-SOON"
        crl = tls.get("crl")
        if crl:
            line += f"  crl: {crl['revoked']} revoked, next update {(crl['next_update'] or '-')[:10]}"
            if crl["days_left"] is not None and crl["days_left"] < 14:
                line += "  CRL-ENDS-SOON"
        lines.append(line)
    for g in st["groups"]:
        j = g["journal"]
        head = (f"{g['name']}  role:{g['role']}  seq:{g['seq']}  applied:{g['applied_seq']}  "
                f"journal:{human_bytes(j['used_bytes'])}/{human_bytes(j['capacity_bytes'])}")
        if j["full"]:
            head += "  JOURNAL-FULL"
        if g.get("writes_halted"):
            head += f"  WRITES-HALTED({g['writes_halted']})"
        if g.get("writes_blocked_by"):
            head += f"  WRITES-BLOCKED-BY:{','.join(g['writes_blocked_by'])}"
        if g.get("open_epoch"):
            head += f"  EPOCH-OPEN(seq {g['open_epoch'][0]}..{g['open_epoch'][1]}, not shown yet)"
        if g.get("inconsistent"):
            head += f"  INCONSISTENT(consistent at seq {g['consistent_seq']})"
        if g.get("split_brain"):
            head += f"  SPLIT-BRAIN(with {g['split_brain']['peer']})"
        if g.get("generation"):
            head += f"  gen:{g['generation']}" + ("(runtime role)" if g.get("role_from") == "runtime" else "")
        b = g.get("bunker")
        if b and b["far_seq"] is not None:
            head += (f"  far-lag:{b['far_lag_records']} rec"
                     + ("" if b["covers_far_replicas"] else "  OVERRUN(a takeover replay is short)"))
        if g["role"] in ("secondary", "bunker"):
            up = g["upstream"]
            head += f"  source:{g['source']}" + (f" connected({up['peer']})" if up else " disconnected")
        lines.append(head)
        for v in g["volumes"]:
            lines.append(f"  volume {v['name']:<12} {human_bytes(v['size']):>10}  {v['path']}")
        pit = g.get("window")
        if pit and pit["active"]:
            line = "  window"
            if pit["from_seq"] is not None:
                line += (f" seq {pit['from_seq']}..{pit['to_seq']} ({pit['from_time']} .. "
                         f"{pit['to_time']})  {human_bytes(pit['retained_bytes'])} of "
                         f"retain {pit['retain']}")
            if pit["apply_delay_seconds"]:
                line += (f"  apply_delay:{pit['apply_delay_seconds']:g}s waiting:"
                         f"{pit['waiting_records']} rec"
                         + ("  DELAY-SHORTENED(journal half full)" if pit["delay_shortened"] else ""))
            if pit["limited_by"]:
                line += f"  LIMITED-BY:{pit['limited_by']}"
            if pit["held"]:
                line += f"  HELD({pit['held']})"
            lines.append(line)
        w = g.get("watch")
        if w and w["watching"]:
            e = w["last_epoch"]
            lines.append(f"  watch {w['consistency']}  {w['state']}  epochs:{w['epochs']}"
                         + (f"  last: seq {e['seq']}, {human_bytes(e['bytes'])} in "
                            f"{e['capture_ms']:.0f} ms" if e else "")
                         + (f"  ({w['error']})" if w["error"] else ""))
        for t in g["targets"]:
            lines.append(
                f"  -> {t['node']:<12} {t['mode']:<5} {t['state']:<12} acked:{t['acked_seq']:<8} "
                f"lag:{t['lag_records']} rec/{human_bytes(t['lag_bytes'])}/{t['lag_seconds']:.1f}s"
                + ("  zstd" if t["compress"] == "zstd" else "")
                + (f"  ({t['last_error']})" if t["last_error"] else ""))
            if t["mode"] == "periodic":
                e, due = t.get("last_epoch"), t.get("next_due")
                lines.append(f"     every {t['interval']:g}s"
                             + (f"  last epoch: seq {e['seq']}, {human_bytes(e['bytes_before'])}"
                                f" -> {human_bytes(e['bytes_after'])} ({e['why']})" if e else "")
                             + (f"  next in {max(0.0, due - time.time()):.0f}s" if due else ""))
            for what in ("resync", "verify"):
                p = t.get(what)
                if p:
                    eta = f", eta {p['eta_seconds']:.0f}s" if p.get("eta_seconds") is not None else ""
                    lines.append(f"     {what}{' ' + p['mode'] if p.get('mode') else ''}: "
                                 f"{human_bytes(p['done_bytes'])}/{human_bytes(p['total_bytes'])}"
                                 f" at {human_bytes(p['rate_bytes_per_s'])}/s{eta}")
    return "\n".join(lines)


def analytics_table(tree: dict) -> str:
    """The replication tree of `status --analytics`: one line per node, indented by its
    depth below this one, with its lag; under it one line per volume of its analytics
    (the 10 s rates, overwrite share, compressibility, the hottest region)."""
    lines: list[str] = []

    def node(t: dict, depth: int) -> None:
        pad = "  " * depth
        head = (f"{pad}{'-> ' if depth else ''}{t['node']}  role:{t['role']}  "
                f"applied:{t['applied_seq']}")
        if t["lag_records"] is not None or t["lag_seconds"] is not None:
            head += (f"  lag:{'?' if t['lag_records'] is None else t['lag_records']} rec/"
                     f"{'?' if t['lag_seconds'] is None else format(t['lag_seconds'], '.1f')}s")
        a = t["analytics"]
        if a is None:
            head += "  (no analytics)"
        else:
            head += f"  observed:{a['observed_s']}s"
            if a["delta_ratio"] is not None:
                head += f"  delta:{a['delta_ratio']:.2f}"
        lines.append(head)
        for name, v in (a["volumes"] if a else {}).items():
            share, ratio = v["overwrite_share"], v["compressibility"]
            hot = v["hot_regions"][0] if v["hot_regions"] else None
            lines.append(
                f"{pad}   volume {name:<12} {v['writes_per_s']['10s']:.0f} w/s "
                f"{human_bytes(v['bytes_per_s']['10s'])}/s"
                f"  overwrite:{'-' if share is None else format(share, '.0%')}"
                f"  compress:{'-' if ratio is None else format(ratio, '.2f')}"
                + (f"  hot:{human_bytes(hot['offset'])}+{human_bytes(hot['length'])}"
                   f" ({hot['writes']} writes)" if hot else ""))
        for child in t["children"]:
            node(child, depth + 1)

    node(tree, 0)
    return "\n".join(lines)


def _invalid(path: str, exc: config.ConfigError) -> str:
    """Every error of a config: on the line when there is one, else one a line below."""
    if len(exc.errors) == 1:
        return f"replicator: invalid config {path}: {exc}"
    return (f"replicator: invalid config {path}: {len(exc.errors)} errors\n"
            + "\n".join(f"  {line}" for line in str(exc).splitlines()))


def _load(path: str) -> config.Config:
    try:
        return config.load(path)
    except config.ConfigError as exc:
        print(_invalid(path, exc), file=sys.stderr)
        raise SystemExit(2) from None


def cmd_agent(args) -> int:
    # A SIGHUP (systemctl reload) before the agent's loop handles it must not end the
    # agent: the config it is about to read is the file as it is now anyway.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    cfg = _load(args.config)
    repeats = logs.setup(cfg.node, cfg.log_level, args.log_format)
    # Not needed by the client commands, nor by shell completion (run at every TAB).
    from .agent import event_loop, run
    from .group import GroupError
    from .journal.segments import JournalError
    from .volume import VolumeError
    new_loop, name = event_loop()
    logging.getLogger("replicator.agent").info("event loop: %s", name)
    try:
        with asyncio.Runner(loop_factory=new_loop) as runner:
            return runner.run(run(cfg))
    except (GroupError, JournalError, VolumeError, OSError) as exc:
        logging.getLogger("replicator").error("cannot start: %s", exc)
        return 1
    finally:
        repeats.report()


def _call(args, op: str, timeout: float | None = 30.0, **params):
    """Send one operation to the agent named by the config: its result, or None after
    saying why not (on stderr, and as JSON with --json)."""
    cfg = _load(args.config)
    try:
        return admin.request(cfg.admin_socket, op, timeout=timeout, **params)
    except admin.AdminError as exc:
        if args.json:
            print(json.dumps({"ok": False, "error": str(exc)}))
        print(f"replicator {op}: {exc}", file=sys.stderr)
        return None


def _operate(args, op: str, human, **params) -> int:
    """One operation; print its result as JSON or as `human` puts it."""
    result = _call(args, op, **params)
    if result is None:
        return 1
    print(json.dumps(result, indent=2) if args.json else human(result))
    return 0


def cmd_status(args) -> int:
    def human(st: dict) -> str:
        if not args.analytics:
            return format_status(st)
        return "\n\n".join(f"group {g['name']}:\n{analytics_table(g['tree'])}"
                           for g in st["groups"])
    return _operate(args, "status", human, group=args.group)


def _event_detail(key: str, value) -> str:
    """A byte count (a key naming bytes: used_bytes, rate_bytes_per_s) as 20.0MiB."""
    if "bytes" in key.split("_") and isinstance(value, (int, float)) \
            and not isinstance(value, bool):
        return human_bytes(value)
    return str(value)


def format_event(e: dict) -> str:
    """One event as a line: time, seq, where, kind, details."""
    where = " -> ".join(filter(None, [e.get("group"), e.get("target")]))
    details = " ".join(f"{k}={_event_detail(k, v)}" for k, v in e.items()
                       if k not in ("seq", "time", "kind", "group", "target") and v not in ("", None))
    seq = f"#{e['seq']}" if e.get("seq") is not None else "#-"
    return " ".join(filter(None, [e["time"], seq, where, e["kind"], details]))


def cmd_events(args) -> int:
    cfg = _load(args.config)
    try:
        for event in admin.stream(cfg.admin_socket, "events", since=args.since,
                                  follow=args.follow, stream=args.stream):
            if args.group is not None and event.get("group") not in (None, args.group):
                continue
            print(json.dumps(event) if args.json else format_event(event), flush=True)
    except admin.AdminError as exc:
        print(f"replicator events: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:  # (| head)
        sys.stderr.close()
    return 0


def cmd_rollback(args) -> int:
    return _operate(args, "rollback", lambda r: (
        f"group {r['group']}: resync rolled back, {r['regions_restored']} regions restored; "
        f"consistent at seq {r['consistent_seq']}"), group=args.group, force=args.force)


def cmd_resync(args) -> int:
    rate = None
    if args.rate is not None:
        try:
            rate = 0 if args.rate in ("0", "unlimited") else config.parse_size(args.rate, "--rate")
        except config.ConfigError as exc:
            print(f"replicator resync: {exc}", file=sys.stderr)
            return 2
    return _operate(args, "resync", lambda r: (
        f"group {r['group']} -> {r['target']}: {r['state']}, resync rate limit "
        f"{human_bytes(r['rate_limit_bytes_per_s']) + '/s' if r['rate_limit_bytes_per_s'] else 'none'}"),
        group=args.group, target=args.target, rate=rate, mode=args.mode)


EXIT_MISMATCH = 3


def _verify_report(r: dict) -> str:
    lines = [f"group {r['group']} -> {r['target']}: {human_bytes(r['bytes_checked'])} in "
             f"{r['regions_checked']} regions checked at seq {r['first_seq']}..{r['last_seq']} "
             f"in {r['seconds']:.1f}s: {len(r['mismatches'])} mismatching region(s)"]
    lines += [f"  {m['volume']} offset {size_text(m['offset'])} length {size_text(m['length'])}"
              for m in r["mismatches"]]
    if r["repaired"]:
        lines.append(f"repaired: {r['repaired']} region(s), {human_bytes(r['repaired_bytes'])} "
                     "resynced")
    return "\n".join(lines)


def _marker_line(m: dict) -> str:
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(m["time_ns"] / 1e9))
    return (f"{m['seq']:>10}  {when}  {m['name']}"
            + ("  (application-consistent)" if m["consistent"] else "")
            + ("" if m.get("in_journal", True) else "  (no longer in the journal)"))


def cmd_mark(args) -> int:
    return _operate(args, "mark", lambda r: f"group {r['group']}: marker {r['name']} at seq "
                    f"{r['seq']}" + (" (application-consistent)" if r["consistent"] else ""),
                    timeout=2 * args.hook_timeout + 30, group=args.group, name=args.name,
                    freeze=args.freeze, thaw=args.thaw, hook_timeout=args.hook_timeout)


def cmd_markers(args) -> int:
    return _operate(args, "markers", lambda r: "\n".join(
        [f"group {r['group']}: {len(r['markers'])} marker(s)"]
        + [_marker_line(m) for m in r["markers"]]), group=args.group)


def cmd_verify(args) -> int:
    try:
        offset = config.parse_size(args.offset, "--offset") if args.offset else 0
        length = config.parse_size(args.length, "--length") if args.length else None
    except config.ConfigError as exc:
        print(f"replicator verify: {exc}", file=sys.stderr)
        return 2
    if (args.offset or args.length) and not args.volume:
        print("replicator verify: --offset/--length need --volume", file=sys.stderr)
        return 2
    result = _call(args, "verify", timeout=None, group=args.group, target=args.target,
                   repair=args.repair, volume=args.volume, offset=offset, length=length,
                   repair_timeout=args.repair_timeout)
    if result is None:
        return 1
    print(json.dumps(result, indent=2) if args.json else _verify_report(result))
    return EXIT_MISMATCH if result["mismatches"] else 0


TARGET_SPEC = "NODE:sync|async|periodic=INTERVAL[:zstd][:bunker][:block]"


def parse_target(spec: str) -> dict:
    """NODE:MODE[:OPTION...] -> the admin API's target: MODE is sync, async or
    periodic=INTERVAL (e.g. periodic=30s); options `zstd` (compress the link), `bunker`
    (the target keeps only the journal), `block` (on_disconnect: block)."""
    node, *rest = spec.split(":")
    mode, _, every = rest[0].partition("=") if rest else ("", "", "")
    if not node or mode not in config.MODES or bool(every) != (mode == "periodic"):
        raise ValueError(f"--target {spec!r}: expected {TARGET_SPEC}")
    try:
        interval = config.parse_duration(every, "interval", low=0.1) if every else None
    except config.ConfigError as exc:
        raise ValueError(f"--target {spec!r}: {exc}") from None
    options = set(rest[1:])
    unknown = options - {"zstd", "bunker", "block"}
    if unknown or len(options) != len(rest) - 1:
        raise ValueError(f"--target {spec!r}: unknown or repeated option(s) "
                         f"{', '.join(sorted(unknown)) or ', '.join(rest[1:])}; expected {TARGET_SPEC}")
    return {"node": node, "mode": mode, "compress": "zstd" if "zstd" in options else "none",
            "bunker": "bunker" in options,
            "on_disconnect": "block" if "block" in options else "continue",
            **({"interval": interval} if interval is not None else {})}


def cmd_promote(args) -> int:
    try:
        targets = [parse_target(spec) for spec in args.target] if args.target else None
    except ValueError as exc:
        print(f"replicator promote: {exc}", file=sys.stderr)
        return 2

    def human(r: dict) -> str:
        replay = r.get("bunker_replay")
        at = r.get("at")
        if r.get("copy"):
            line = (f"group {r['group']}: a writable copy at seq {r['seq']} in "
                    + ", ".join(v["path"] for v in r["copy"]["volumes"].values())
                    + " (this replica goes on replicating)")
        else:
            line = (f"group {r['group']}: primary here, generation {r['generation']} from seq "
                    f"{r['seq'] + 1}; ships to {', '.join(r['targets']) or 'nobody'}")
        if at:
            line += (f"\nthe volumes hold seq {at['seq']} ({at['time']}"
                     + (f", marker {at['marker']}" if at["marker"] else "") + "); "
                     f"{r['kept_records']} later record(s) set aside, not applied, in {r['kept']}")
        if replay and "error" not in replay:
            line += (f"\nreplayed {replay['replayed']} record(s) from bunker {replay['bunker']}: "
                     "no acknowledged write lost (RPO 0)")
        elif replay:
            line += f"\nbunker replay FAILED ({replay['error']}): RPO unknown"
        return line

    return _operate(args, "promote", human, timeout=None, group=args.group, force=args.force,
                    targets=targets, bunker=args.bunker, no_bunker=args.no_bunker,
                    copy=os.path.abspath(args.copy) if args.copy else None, at=args.at)


def cmd_rewind(args) -> int:
    def human(r: dict) -> str:
        c = r["copy"]
        return (f"group {r['group']}: a writable copy at seq {c['seq']} ({c['time']}"
                + (f", marker {c['marker']}" if c["marker"] else "") + ") in "
                + ", ".join(v["path"] for v in c["volumes"].values())
                + f" (taken back from seq {c['rewound_from']} in {r['seconds']}s; "
                "replication went on)")

    return _operate(args, "rewind", human, timeout=None, group=args.group, to=args.to,
                    copy=os.path.abspath(args.copy))


def cmd_demote(args) -> int:
    return _operate(args, "demote", lambda r: (
        f"group {r['group']}: secondary here, source {r['source']}"),
        group=args.group, source=args.source)


def cmd_switchover(args) -> int:
    return _operate(args, "switchover", lambda r: (
        f"group {r['group']}: primary moved {r['from']} -> {r['to']} at seq {r['seq']} in "
        f"{r['seconds']:.2f}s (every target drained: "
        f"{', '.join(f'{n}@{q}' for n, q in r['drained'].items())})"),
        timeout=None, group=args.group, to=args.to, drain_timeout=args.timeout)


def cmd_failback(args) -> int:
    return _operate(args, "failback", lambda r: (
        f"group {r['group']}: {r['to']} rejoined as a replica ({human_bytes(r['rejoin_bytes'])} "
        f"sent for {human_bytes(r['volume_bytes'])} of volumes), then the primary moved "
        f"{r['from']} -> {r['to']} at seq {r['seq']}"),
        timeout=None, group=args.group, to=args.to, drain_timeout=args.timeout,
        rejoin_timeout=args.rejoin_timeout)


def cmd_attach(args) -> int:
    spec = args.target if ":" in args.target else args.target + ":async"
    try:
        target = parse_target(spec)
    except ValueError as exc:
        print(f"replicator attach: {exc}", file=sys.stderr)
        return 2
    return _operate(args, "attach", lambda r: (
        f"group {r['group']}: ships to {', '.join(r['targets'])}"),
        group=args.group, target=target)


def cmd_reparent(args) -> int:
    return _operate(args, "reparent", lambda r: (
        f"group {r['group']}: source is now {r['source']}"), group=args.group, source=args.source)


def cmd_restore(args) -> int:
    return _operate(args, "restore", lambda r: (
        f"group {r['group']}: {r['role']}, source {r['source']}, targets "
        f"{', '.join(r['targets']) or 'none'} (as configured)"
        + ("" if r["changed"] else "; nothing to change")), group=args.group)


def cmd_resolve(args) -> int:
    return _operate(args, "resolve", lambda r: (
        f"group {r['group']}: this node gives up its writes since the split; {r['survivor']}'s "
        "line wins when it connects (what is rolled back is kept: see status 'discarded')"),
        group=args.group, survivor=args.survivor, discard_local=args.discard_local)


def format_reload(r: dict) -> str:
    """A reload's answer for a person: what changed, and whether it was taken."""
    def value(v) -> str:
        return "(none)" if v is None else json.dumps(v)

    lines = [f"  {c['key']}: {value(c['from'])} -> {value(c['to'])}" for c in r["changes"]]
    if r["errors"]:
        return "\n".join(["the agent's config file is invalid; nothing changed:",
                          *(f"  {e}" for e in r["errors"])])
    if not r["changes"]:
        return "nothing to change: the agent runs with what its config file says"
    if r["restart_required"]:
        head = (f"nothing {'would be ' if r['dry_run'] else ''}applied: a restart is needed "
                f"for {', '.join(r['restart_required'])}; the changes:")
    else:
        head = "would apply, live:" if r["dry_run"] else "applied, live:"
    return "\n".join([head, *lines])


def cmd_reload(args) -> int:
    """Exit 0: applied (or nothing to change), 3: a restart is needed (nothing applied),
    2: the config is invalid, 1: no agent answered or it refused."""
    def failed(code: int, errors: list[str], text: str) -> int:
        if args.json:
            print(json.dumps(reload.outcome([], dry_run=args.dry_run, errors=errors)))
        print(text, file=sys.stderr)
        return code

    try:
        cfg = config.load(args.config)
    except config.ConfigError as exc:
        return failed(2, str(exc).splitlines(), _invalid(args.config, exc))
    try:
        r = admin.request(cfg.admin_socket, "reload", timeout=120, dry_run=args.dry_run,
                          config=os.path.realpath(args.config))
    except admin.AdminError as exc:
        return failed(1, [str(exc)], f"replicator reload: {exc}")
    print(json.dumps(r, indent=2) if args.json else format_reload(r))
    return 2 if r["errors"] else 3 if r["restart_required"] else 0


def cmd_config_check(args) -> int:
    try:
        cfg = config.load(args.file)
    except config.ConfigError as exc:
        if args.json:
            print(json.dumps({"ok": False, "errors": [{"path": path, "message": message}
                                                      for path, message in exc.errors]}))
        else:
            print(_invalid(args.file, exc), file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"ok": True, "errors": [], "node": cfg.node,
                          "groups": [g.name for g in cfg.groups]}))
    else:
        print(f"{args.file}: ok (node {cfg.node}, {len(cfg.groups)} group(s))")
    return 0


def cmd_completion(args) -> int:
    print(argcomplete.shellcode(["replicator"], shell=args.shell))
    return 0


def cmd_pki(args) -> int:
    from . import pki
    try:
        if args.pki_command == "init":
            made = pki.init_ca(args.dir)
            what = os.path.join(args.dir, "ca.crt")
        elif args.pki_command == "link-key":
            made, what = pki.link_key(args.dir, args.name)
        elif args.pki_command == "revoke":
            count, what = pki.revoke(args.dir, args.certs)
            if args.json:
                print(json.dumps({"changed": True, "path": what, "revoked": count}))
            else:
                print(f"{what}: signed anew, {count} certificate(s) revoked; copy it to "
                      "every node's tls.crl and reload them")
            return 0
        elif args.client:
            what = args.out or os.path.join(args.dir, "clients", args.node)
            made = pki.issue_client(args.dir, args.node, what, force=args.force)
        else:
            made = pki.issue(args.dir, args.node, args.out or args.dir,
                             addresses=tuple(args.address), force=args.force)
            what = os.path.join(args.out or args.dir, f"{args.node}.crt")
    except (pki.PkiError, OSError) as exc:
        print(f"replicator pki: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"changed": made, "path": what}))
    else:
        print(f"{what}: {'created' if made else 'exists, unchanged'}")
    return 0


# --- attach-device / detach-device: an NBD export as a local block device ---------------

def cmd_attach_device(args) -> int:
    from . import device
    try:
        st = device.attach(args.uri, name=args.name, read_only=args.read_only,
                           run_dir=args.run_dir, timeout=args.timeout)
    except (device.DeviceError, OSError) as exc:
        if args.json:
            print(json.dumps({"ok": False, "error": str(exc)}))
        print(f"replicator attach-device: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(st, indent=2) if args.json else st["device"])
    return 0


def cmd_detach_device(args) -> int:
    from . import device
    try:
        st = device.detach(args.target, run_dir=args.run_dir, timeout=args.timeout)
    except (device.DeviceError, OSError) as exc:
        if args.json:
            print(json.dumps({"ok": False, "error": str(exc)}))
        print(f"replicator detach-device: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({"ok": True, "name": st["name"], "device": st.get("device")})
          if args.json else f"{st['name']}: {st.get('device')} detached")
    return 0


def add_device_parsers(sub) -> None:
    from .device import DEFAULT_RUN_DIR
    ad = sub.add_parser("attach-device", help="expose an NBD export (URI) as a local block "
                        "device (nbd-client where the kernel has nbd, else nbdfuse + loop); "
                        "prints the device")
    ad.add_argument("uri", metavar="URI", help="libnbd URI: nbd://HOST:PORT/EXPORT, "
                    "nbd+unix:///EXPORT?socket=PATH, nbds://...?tls-certificates=DIR")
    ad.add_argument("--name", help="the name to detach it by (default: the export name)")
    ad.add_argument("--read-only", action="store_true")
    ad.set_defaults(func=cmd_attach_device)
    dd = sub.add_parser("detach-device", help="undo attach-device (refused while mounted)")
    dd.add_argument("target", metavar="NAME_OR_DEVICE")
    dd.set_defaults(func=cmd_detach_device)
    for dp in (ad, dd):
        dp.add_argument("--run-dir", default=DEFAULT_RUN_DIR,
                        help=f"where attached devices are recorded (default {DEFAULT_RUN_DIR})")
        dp.add_argument("--timeout", type=float, default=30.0, help="seconds (default 30)")
        dp.add_argument("--json", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="replicator", description=__doc__)
    p.add_argument("--version", action="version", version=f"replicator {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    a = sub.add_parser("agent", help="run the agent in the foreground")
    a.add_argument("-c", "--config", default=DEFAULT_CONFIG)
    a.add_argument("--log-format", choices=logs.FORMATS, default="text",
                   help="text (default; without timestamps when stderr is the journal: "
                        "journald adds its own) or json (one object a line)")
    a.set_defaults(func=cmd_agent)

    s = sub.add_parser("status", help="show the running agent's groups and targets")
    s.add_argument("-c", "--config", default=DEFAULT_CONFIG)
    s.add_argument("--json", action="store_true")
    s.add_argument("--analytics", action="store_true",
                   help="the replication tree: every node below this one, its lag and the "
                        "analytics of what it applied")
    s.add_argument("group", nargs="?")
    s.set_defaults(func=cmd_status)

    ev = sub.add_parser("events", help="the agent's state changes, one per line (seq "
                                       "numbers: `status` shows the last one)")
    ev.add_argument("-c", "--config", default=DEFAULT_CONFIG)
    ev.add_argument("--json", action="store_true", help="one JSON object per line")
    ev.add_argument("--follow", "-f", action="store_true",
                    help="keep printing new events as they happen")
    ev.add_argument("--since", type=int, default=0, metavar="SEQ",
                    help="only events after SEQ (e.g. status's event_seq)")
    ev.add_argument("--stream", metavar="ID",
                    help="the stream --since is of (status's event_stream): after a restart "
                         "of the agent, an events_lost line says what was missed")
    ev.add_argument("--group", help="only this group's events (and the agent's own)")
    ev.set_defaults(func=cmd_events)

    rb = sub.add_parser("rollback", help="undo an interrupted resync on this replica: back to "
                                         "its last consistent image")
    rb.add_argument("group")
    rb.add_argument("--force", action="store_true", help="even while the source is connected")
    rs = sub.add_parser("resync", help="start a resync of a target, or tune its rate limit")
    rs.add_argument("group")
    rs.add_argument("target")
    rs.add_argument("--rate", help="resync rate limit, e.g. 50MiB (per second), 0 = unlimited")
    how = rs.add_mutually_exclusive_group()
    how.add_argument("--full", dest="mode", action="store_const", const="full",
                     help="send every region now")
    how.add_argument("--checksum", dest="mode", action="store_const", const="checksum",
                     help="send only the regions whose hashes differ on the target (a seeded "
                          "or copied replica)")
    how.add_argument("--assume-clean", dest="mode", action="store_const", const="assume-clean",
                     help="send nothing: declare the target identical (two blank volumes); "
                          "later writes are shipped")
    vf = sub.add_parser("verify", help="compare a target's regions with ours, online; exit 3 "
                                       "when some differ")
    vf.add_argument("group")
    vf.add_argument("target")
    vf.add_argument("--repair", action="store_true", help="resync the regions that differ")
    vf.add_argument("--volume", help="only this volume (default: every volume of the group)")
    vf.add_argument("--offset", help="with --volume: start here (e.g. 1GiB)")
    vf.add_argument("--length", help="with --volume: only this many bytes")
    vf.add_argument("--repair-timeout", type=float, default=3600.0,
                    help="seconds to wait for the repair resync (default 3600)")
    pr = sub.add_parser("promote", help="make this replica the primary (takeover); refused "
                                        "for an inconsistent or split-brained image unless forced")
    pr.add_argument("group")
    pr.add_argument("--force", action="store_true")
    pr.add_argument("--bunker", help="replay this bunker's journal first (default: the "
                                     "group's `bunker` key)")
    pr.add_argument("--no-bunker", action="store_true",
                    help="do not replay from the bunker (accept losing what only it holds)")
    pr.add_argument("--copy", metavar="DIR",
                    help="promote a copy instead (DR drill): a snapshot of this replica in "
                         "DIR, brought forward from the bunker; the replica is untouched")
    pr.add_argument("--target", action="append", metavar=TARGET_SPEC,
                    help="ship to this node once primary (repeatable; added to the current "
                         "targets)")
    pr.add_argument("--at", metavar="SEQ|TIME|MARKER",
                    help="take over at this point of the replica's window (retain): before a "
                         "logical corruption; the records after it are set aside, not applied, "
                         "and no bunker is replayed")
    rw = sub.add_parser("rewind", help="on a secondary with retain / apply_delay: a writable "
                                       "copy of its volumes at a point of its window (a seq, a "
                                       "time like 2026-12-02T05:10:00Z or -15m, or a marker), "
                                       "while it goes on replicating")
    rw.add_argument("group")
    rw.add_argument("--to", required=True, metavar="SEQ|TIME|MARKER")
    rw.add_argument("--copy", required=True, metavar="DIR",
                    help="a new (or empty) directory: one image per volume and snapshot.json")
    dm = sub.add_parser("demote", help="make this primary a secondary of SOURCE")
    dm.add_argument("group")
    dm.add_argument("--source", required=True, help="the node that is (or becomes) the primary")
    so = sub.add_parser("switchover", help="planned: move the primary role to a replicating "
                                           "target with no write lost")
    so.add_argument("group")
    so.add_argument("--to", required=True)
    so.add_argument("--timeout", type=float, default=60.0,
                    help="seconds to drain the targets (default 60); writes wait meanwhile")
    fb = sub.add_parser("failback", help="after a takeover, on the new primary: wait until "
                                         "the old primary rejoined as a replica (only changed "
                                         "regions sent), then switch the role back to it")
    fb.add_argument("group")
    fb.add_argument("--to", required=True, help="the old primary")
    fb.add_argument("--rejoin-timeout", type=float, default=600.0,
                    help="seconds to wait for its rejoin resync (default 600)")
    fb.add_argument("--timeout", type=float, default=60.0,
                    help="seconds to drain the targets (default 60); writes wait meanwhile")
    rv = sub.add_parser("resolve", help="split brain: on the losing node, give up its writes "
                                        "since the split (they are kept in a file)")
    rv.add_argument("group")
    rv.add_argument("--discard-local", action="store_true", required=True)
    rv.add_argument("--survivor", required=True, help="the node whose data wins")
    at = sub.add_parser("attach", help="ship the group to one more target (re-parenting a "
                                       "replica whose source was lost)")
    at.add_argument("group")
    at.add_argument("--target", required=True, metavar=TARGET_SPEC,
                    help="MODE defaults to async")
    rp = sub.add_parser("reparent", help="on a replica whose source was lost: take records "
                                         "from SOURCE (of the same line) from now on; a "
                                         "target that becomes the source is dropped")
    rp.add_argument("group")
    rp.add_argument("--source", required=True)
    mk = sub.add_parser("mark", help="on the primary: a named point in the journal (a marker), "
                                     "optionally between freeze and thaw commands so that it "
                                     "is application-consistent; it travels down every link")
    mk.add_argument("group")
    mk.add_argument("name")
    mk.add_argument("--freeze", help="shell command run first (e.g. fsfreeze -f /mnt)")
    mk.add_argument("--thaw", help="shell command run after, whatever happened (fsfreeze -u /mnt)")
    mk.add_argument("--hook-timeout", type=float, default=30.0,
                    help="seconds each hook may take (default 30; killed after)")
    mks = sub.add_parser("markers", help="the group's markers on this node: seq, time, name")
    mks.add_argument("group")
    rt = sub.add_parser("restore", help="back to the configured source and targets once the "
                                        "role is where the config has it (after a failback)")
    rt.add_argument("group")
    for op, func in ((rt, cmd_restore), (rb, cmd_rollback), (rs, cmd_resync), (vf, cmd_verify),
                     (pr, cmd_promote), (dm, cmd_demote), (so, cmd_switchover), (fb, cmd_failback),
                     (rv, cmd_resolve), (at, cmd_attach), (rp, cmd_reparent), (mk, cmd_mark),
                     (mks, cmd_markers), (rw, cmd_rewind)):
        op.add_argument("-c", "--config", default=DEFAULT_CONFIG)
        op.add_argument("--json", action="store_true")
        op.set_defaults(func=func)

    rl = sub.add_parser("reload", help="make the agent re-read its config file and take the "
                                       "changes live, without cutting NBD clients (like "
                                       "SIGHUP, drbdadm adjust); exit 3 when they need a "
                                       "restart (nothing is applied), 2 when the file is "
                                       "invalid")
    rl.add_argument("-c", "--config", default=DEFAULT_CONFIG,
                    help="the agent's config file (with --dry-run, any file naming the same "
                         "admin_socket: what reloading it would do)")
    rl.add_argument("--dry-run", action="store_true",
                    help="say what would change and whether it needs a restart; apply nothing")
    rl.add_argument("--json", action="store_true")
    rl.set_defaults(func=cmd_reload)

    sub.add_parser("drill", help="DR drill tools: `replicator drill ledger|report|index "
                   "--help`")
    c = sub.add_parser("config", help="configuration tools")
    csub = c.add_subparsers(dest="config_command", required=True)
    chk = csub.add_parser("check", help="validate a config file: every error at once "
                                        "(exit 2 on any)")
    chk.add_argument("file")
    chk.add_argument("--json", action="store_true")
    chk.set_defaults(func=cmd_config_check)

    k = sub.add_parser("pki", help="make the replication CA, node certificates and link keys")
    ksub = k.add_subparsers(dest="pki_command", required=True)
    init = ksub.add_parser("init", help="create DIR/ca.crt and DIR/ca.key (kept if present)")
    iss = ksub.add_parser("issue", help="write OUT/NODE.crt and OUT/NODE.key signed by the "
                                        "CA; with --client, an NBD client's certificate")
    iss.add_argument("node", metavar="NAME", help="the node (or with --client the client)")
    iss.add_argument("--out", help="output directory (default: the CA directory; with "
                                   "--client DIR/clients/NAME)")
    iss.add_argument("--address", action="append", default=[], metavar="IP",
                     help="an IP address of the node, for NBD clients that connect by "
                          "address (repeatable)")
    iss.add_argument("--client", action="store_true",
                     help="an NBD client certificate: OUT/ca-cert.pem, client-cert.pem, "
                          "client-key.pem, as nbds://...?tls-certificates=OUT and qemu's "
                          "tls-creds-x509 dir=OUT read them; it opens what nbd_clients grants NAME")
    iss.add_argument("--force", action="store_true", help="replace an existing certificate")
    rv = ksub.add_parser("revoke", help="add certificates to DIR/crl.pem (tls.crl of the "
                                        "nodes), signed anew; with none, only signed anew")
    rv.add_argument("certs", nargs="*", metavar="CERT", help="certificate files (PEM)")
    lk = ksub.add_parser("link-key", help="write DIR/links/NAME.key, the key of a far link "
                                          "whose records a near replica encrypts (kept if "
                                          "present)")
    lk.add_argument("name", help="e.g. GROUP-FARNODE")
    for kp in (init, iss, lk, rv):
        kp.add_argument("--dir", required=True, help="the CA directory")
        kp.add_argument("--json", action="store_true")
        kp.set_defaults(func=cmd_pki)

    cp = sub.add_parser("completion", help="print the shell code that completes replicator's "
                                           "arguments, e.g. `replicator completion bash > "
                                           "/etc/bash_completion.d/replicator`")
    cp.add_argument("shell", choices=COMPLETION_SHELLS)
    cp.set_defaults(func=cmd_completion)
    add_device_parsers(sub)
    return p


DRILL = {"ledger": "a workload that flushes every few writes and logs every acknowledged "
                   "(flushed) write, and its check against a volume image (python -m "
                   "replicator.drill.ledger)",
         "report": "the DR drill report: report.json, report.xml (JUnit), report.md, "
                   "report.html",
         "index": "the index of scheduled DR exercise runs: keeps the newest N, writes "
                  "index.html (each run's verdict, the trend of RPO and RTO) and index.json"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["drill"]:  # the drill tools keep their own argument parsers
        tool = argv[1] if len(argv) > 1 else ""
        if tool not in DRILL:
            print("usage: replicator drill {ledger|report|index} ...\n" + "\n".join(
                f"  {name}: {what}" for name, what in DRILL.items()), file=sys.stderr)
            return 2
        from importlib import import_module
        return import_module(f"replicator.drill.{tool}").main(argv[2:])
    parser = build_parser()
    argcomplete.autocomplete(parser)  # exits here when the shell asks for completions
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
