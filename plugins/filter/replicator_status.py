"""The status table of a whole topology, from every agent's replicator_status result."""

from ansible_collections.voltrail.replicator.plugins.module_utils.replicator_agent import human_bytes

COLUMNS = ("GROUP", "LINK", "MODE", "STATE", "SEQ", "ACKED", "LAG REC", "LAG BYTES", "LAG S",
           "JOURNAL (SOURCE)")


def _row(group, link, result, notes):
    name = f"{link['from']} -> {link['to']}"
    mode = link["mode"] + ("/zstd" if link.get("compress", "none") == "zstd" else "")
    if not result or result.get("unreachable"):
        return [group["name"], name, mode, f"unknown: {link['from']} unreachable"]
    if result.get("failed") or "status" not in result:
        return [group["name"], name, mode, f"unknown: {result.get('msg', 'no status')}"]
    g = next((x for x in result["status"]["groups"] if x["name"] == group["name"]), None)
    t = g and next((x for x in g["targets"] if x["node"] == link["to"]), None)
    if t is None:
        return [group["name"], name, mode, f"unknown: {link['from']}'s agent does not ship "
                                            f"{group['name']} to {link['to']} (run site.yml)"]
    running = t["mode"] + ("/zstd" if t.get("compress", "none") == "zstd" else "")
    if running != mode:
        notes.append(f"{name}: runs {running} but the inventory says {mode} (after a failback, "
                     "`replicator restore` returns to the inventory's links)")
        mode = f"{running}!"
    j = g["journal"]
    state = t["state"]
    r = t.get("resync") or {}
    if state == "resyncing" and r.get("total_bytes"):
        state += f" {100 * r.get('done_bytes', 0) / r['total_bytes']:.0f}%"
    if t.get("last_error") and t["state"] != "replicating":
        notes.append(f"{name}: {t['last_error']}")
    if t.get("bunker"):
        lacks = ", ".join(f"{n} {c}" for n, c in sorted(t.get("far_lag_records", {}).items()))
        notes.append(f"{name}: bunker; records the far replicas lack: {lacks or 'none tracked'}")
    off = t.get("offload")
    if off:
        ratio = (f", {off['bytes_raw'] / off['bytes_processed']:.1f}x fewer bytes than the "
                 "records" if off["bytes_processed"] else "")
        notes.append(f"{name}: processed ({', '.join(off['process'])}) by "
                     f"{off['via'] or link['from']}, now {off['path']}: "
                     f"{off['records_processed']} records relayed processed, "
                     f"{off['records_direct']} direct{ratio}; "
                     f"{off['base_mismatches']} base mismatches"
                     + (f"; {off['via']} refused: {off['refused']}" if off.get("refused") else ""))
    journal = (f"{human_bytes(j['used_bytes'])}/{human_bytes(j['capacity_bytes'])} "
               f"{100 * j['used_bytes'] / j['capacity_bytes']:.0f}%" + (" FULL" if j["full"] else ""))
    return [group["name"], name, mode, state, str(g["seq"]), str(t["acked_seq"]),
            str(t["lag_records"]), human_bytes(t["lag_bytes"]), f"{t['lag_seconds']:.1f}", journal]


def replicator_status_table(groups, results):
    """One line per link of every group: state, lag, journal use of the link's source.
    `results` maps each node to its replicator_status result (or an unreachable one)."""
    rows, notes = [list(COLUMNS)], []
    for g in groups or []:
        for link in g.get("links", []):
            rows.append(_row(g, link, (results or {}).get(link["from"]), notes))
    widths = [max(len(r[i]) for r in rows if len(r) > i) for i in range(len(COLUMNS))]
    lines = []
    for r in rows:
        cells = [c.ljust(widths[i]) if i < len(r) - 1 else c for i, c in enumerate(r)]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines + notes)


def replicator_primary_seqs(groups, results):
    """{group: seq journaled by its primary} from the primaries' replicator_status results."""
    seqs = {}
    for g in groups or []:
        status = ((results or {}).get(g["primary"]) or {}).get("status")
        if not status:
            raise ValueError(f"no status from {g['primary']}, the primary of {g['name']}")
        seqs[g["name"]] = next(x["seq"] for x in status["groups"] if x["name"] == g["name"])
    return seqs


def replicator_caught_up(status, primary_seqs):
    """This node applied, in every group it holds, everything its primary journaled."""
    return all(g["applied_seq"] >= primary_seqs[g["name"]]
               for g in status["groups"] if g["name"] in primary_seqs)


class FilterModule:
    def filters(self):
        return {"replicator_status_table": replicator_status_table,
                "replicator_primary_seqs": replicator_primary_seqs,
                "replicator_caught_up": replicator_caught_up}
