# Copyright: (c) 2026, The replicator team
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The replication topology declared in the inventory, as filters.

    replicator_groups:
      - name: db
        primary: dc1-app
        journal_size: 256MiB                  # optional
        drill_volume: log                     # optional: the volume DR exercises overwrite
        volumes: [{name: data, size: 256MiB}, {name: log, size: 64MiB, path: /srv/log.img}]
        links:
          - {from: dc1-app, to: dc2-dr, mode: sync}
          - {from: dc1-app, to: dc3-arc, mode: async, compress: zstd}
          - {from: dc3-arc, to: dc4-vault, mode: async, initial_sync: checksum,
             on_disconnect: continue, retain: 24h, apply_delay: 15m}
          - {from: dc1-app, to: dc1-bunker, mode: sync, bunker: true}
      - name: files                           # a group of watched files
        primary: dc1-app
        consistency: reflink                  # watched groups: reflink | hooks | none,
        interval: 10s                         # interval, quiet, freeze, thaw, hook_timeout
        volumes: [{name: vm, size: 64MiB, path: /srv/files/vm.img, capture: watch}]
        links:
          - {from: dc1-app, to: dc3-arc, mode: async}
          - {from: dc3-arc, to: dc4-vault, mode: periodic, interval: 30s}

A volume with `capture: watch` is a file programs write directly: the primary watches
it (the group's watch keys go to the primary only); its replicas are ordinary volumes,
served over NBD once promoted. A `periodic` link ships an epoch every `interval`.

An async link may be processed (seed 000): `process: [delta, zstd, checksum, encrypt]`
(some of them) with `via: NODE`, another replica its source links to (typically the sync
one, on a fast link), which processes each write against its own copy and hands the
result back for the source to relay; or, without `via` on a link from a replica, that
replica processes what it receives for it (it ships the result on itself):

          - {from: dc1-app, to: dc2-dr, mode: sync}
          - {from: dc1-app, to: dc3-arc, mode: async, via: dc2-dr,
             process: [delta, zstd, checksum, encrypt]}

`encrypt` uses a key per far link, made on the controller and installed on the node that
processes and the far node only (the replicator_pki role; replicator_node_link_keys).

A link's `retain` and `apply_delay` go to its target's group config (keys of a replica
that holds volumes, so not of a bunker's link): `retain: 24h` or `retain: 20GiB` keeps
the history a rewind (`replicator rewind`, `promote --at`, the DR exercise at a marker)
goes back through; `apply_delay: 15m` applies the records to its volumes that much later.
The agent checks their values when the role validates the rendered config.

A link with `bunker: true` (sync, at most one per group, from the primary) makes its
target a bunker: it keeps only the journal; the other members replay from it when
promoted (`replicator promote`).

Each group's links must form a tree rooted at its primary: the primary receives
nothing, every other member receives from exactly one node, and every member is
reachable from the primary. `replicator_topology_errors` says what breaks that, in
words an operator can act on; the other filters assume a valid topology.
"""

import re

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
MODES = ("sync", "async", "periodic")
WATCH_KEYS = ("consistency", "interval", "quiet", "freeze", "thaw", "hook_timeout")
GROUP_KEYS = {"name", "primary", "volumes", "links", "journal_size", "drill_volume", *WATCH_KEYS}
VOLUME_KEYS = {"name", "size", "path", "capture"}
CAPTURES = ("nbd", "watch")
LINK_CHOICES = {"compress": ("none", "zstd"), "initial_sync": ("full", "checksum", "assume-clean"),
                "on_disconnect": ("continue", "block")}  # optional keys, first = default
REPLICA_KEYS = ("retain", "apply_delay")  # keys of a link that go to its target's group
LINK_KEYS = {"from", "to", "mode", "bunker", "interval", "via", "process", *LINK_CHOICES,
             *REPLICA_KEYS}
PROCESSING = ("delta", "zstd", "checksum", "encrypt")


def _group_errors(i, g, hosts):
    where = f"replicator_groups[{i}]"
    if not isinstance(g, dict):
        return [f"{where}: expected a mapping with name, primary, volumes, links"]
    name = g.get("name")
    if not isinstance(name, str) or not NAME_RE.match(name):
        return [f"{where}.name: expected a group name (letters, digits, '.', '_', '-'); "
                f"got {name!r}"]
    where = f"{where} ({name})"
    errors = [f"{where}: unknown key {k!r} (known: {', '.join(sorted(GROUP_KEYS))})"
              for k in sorted(set(g) - GROUP_KEYS)]
    primary = g.get("primary")
    if primary not in hosts:
        errors.append(f"{where}: primary {primary!r} is not a host of the inventory group "
                      f"(hosts: {', '.join(hosts)}); add it or fix the name")
    volumes = g.get("volumes")
    if not isinstance(volumes, list) or not volumes:
        errors.append(f"{where}: volumes must be a non-empty list of {{name, size[, path]}}")
        volumes = []
    seen = set()
    for j, v in enumerate(volumes):
        if not isinstance(v, dict) or not NAME_RE.match(str(v.get("name", ""))) or "size" not in v:
            errors.append(f"{where}: volumes[{j}] needs a name and a size, like "
                          "{name: data, size: 256MiB}")
            continue
        errors += [f"{where}: volumes[{j}]: unknown key {k!r}" for k in sorted(set(v) - VOLUME_KEYS)]
        if v["name"] in seen:
            errors.append(f"{where}: volume {v['name']!r} is declared twice")
        seen.add(v["name"])
        if v.get("capture", "nbd") not in CAPTURES:
            errors.append(f"{where}: volumes[{j}]: capture must be one of {', '.join(CAPTURES)}; "
                          f"got {v.get('capture')!r}")
    captures = {v.get("capture", "nbd") for v in volumes if isinstance(v, dict)}
    if len(captures) > 1:
        errors.append(f"{where}: its volumes are all capture: watch or all capture: nbd "
                      "(write order across both cannot be kept); split the group")
    if captures != {"watch"}:
        errors += [f"{where}: {k} is a key of watched groups only (capture: watch volumes)"
                   for k in WATCH_KEYS if k in g]
    if "drill_volume" in g and g["drill_volume"] not in seen:
        errors.append(f"{where}: drill_volume {g['drill_volume']!r} is not one of its volumes "
                      f"({', '.join(sorted(seen)) or 'none'})")
    links = g.get("links", [])
    if not isinstance(links, list):
        return errors + [f"{where}: links must be a list of {{from, to, mode[, compress]}}"]
    source_of = {}
    for j, link in enumerate(links):
        lw = f"{where}: links[{j}]"
        if not isinstance(link, dict):
            errors.append(f"{lw}: expected {{from, to, mode[, compress]}}")
            continue
        errors += [f"{lw}: unknown key {k!r} (known: {', '.join(sorted(LINK_KEYS))})"
                   for k in sorted(set(link) - LINK_KEYS)]
        src, dst = link.get("from"), link.get("to")
        for end, node in (("from", src), ("to", dst)):
            if node not in hosts:
                errors.append(f"{lw}: {end} {node!r} is not a host of the inventory group "
                              f"(hosts: {', '.join(hosts)})")
        if link.get("mode") not in MODES:
            errors.append(f"{lw}: mode must be one of {', '.join(MODES)}; got {link.get('mode')!r}")
        elif (link["mode"] == "periodic") != ("interval" in link):
            errors.append(f"{lw}: a periodic link needs an interval (e.g. interval: 30s), and "
                          "only a periodic one has one")
        for key, choices in LINK_CHOICES.items():
            if link.get(key, choices[0]) not in choices:
                errors.append(f"{lw}: {key} must be one of {', '.join(choices)}; "
                              f"got {link.get(key)!r}")
        if link.get("bunker", False) not in (True, False):
            errors.append(f"{lw}: bunker must be true or false")
        elif link.get("bunker") and (link.get("mode") != "sync" or src != primary):
            errors.append(f"{lw}: a bunker keeps a synchronous copy of the primary's journal: "
                          f"it must be linked from the primary {primary} with mode sync")
        if link.get("bunker") is True and any(k in link for k in REPLICA_KEYS):
            errors.append(f"{lw}: a bunker keeps only the journal: retain and apply_delay are "
                          "keys of a replica with volumes (set them on its link)")
        for key in REPLICA_KEYS:
            if key in link and (isinstance(link[key], bool)
                                or not isinstance(link[key], (str, int, float))):
                errors.append(f"{lw}: {key} must be a duration like 24h"
                              + (" or a size like 20GiB" if key == "retain" else "")
                              + f"; got {link[key]!r}")
        if src == dst:
            errors.append(f"{lw}: {src} links to itself")
        elif dst == primary:
            errors.append(f"{lw}: {src} -> {dst} ships to the primary; the primary is the root "
                          "of the tree and receives nothing (reverse the link or change primary)")
        elif dst in source_of:
            errors.append(f"{lw}: {dst} already receives {name} from {source_of[dst]}; a replica "
                          "has exactly one source (remove one of the two links)")
        else:
            source_of[dst] = src
    errors += _offload_errors(where, primary, [x for x in links if isinstance(x, dict)])
    if captures == {"watch"} and any(isinstance(x, dict) and "process" in x for x in links):
        errors.append(f"{where}: a watched group's epochs are shipped as they are: none of its "
                      "links is processed (remove process and via)")
    bunkers = [link.get("to") for link in links if isinstance(link, dict) and link.get("bunker")]
    if len(bunkers) > 1:
        errors.append(f"{where}: more than one bunker ({', '.join(map(str, bunkers))}); a group "
                      "has at most one")
    feeds = {link.get("from") for link in links if isinstance(link, dict)}
    errors += [f"{where}: bunker {b} cannot ship to other nodes (it has no volumes)"
               for b in bunkers if b in feeds]
    # every member must be reachable from the primary (this also rules out cycles)
    reached, frontier = {primary}, [primary]
    while frontier:
        node = frontier.pop()
        for dst, src in source_of.items():
            if src == node and dst not in reached:
                reached.add(dst)
                frontier.append(dst)
    for dst, src in source_of.items():
        if dst not in reached:
            errors.append(f"{where}: link {src} -> {dst} is not fed by the primary {primary}: "
                          f"{src} receives {name} from nobody (or a loop); links must form a "
                          "tree rooted at the primary")
    return errors


def _offload_errors(where, primary, links):
    """What is wrong with the links' `via` and `process`."""
    errors = []
    for j, link in enumerate(links):
        if "process" not in link and "via" not in link:
            continue
        lw = f"{where}: link {link.get('from')} -> {link.get('to')}"
        process = link.get("process", [])
        if not isinstance(process, list) or not process or \
                any(op not in PROCESSING for op in process) or len(set(process)) != len(process):
            errors.append(f"{lw}: process must be a list of some of {', '.join(PROCESSING)}, "
                          f"each once; got {process!r}")
        if link.get("mode") != "async":
            errors.append(f"{lw}: only an async link is processed (this one is "
                          f"{link.get('mode')})")
        via = link.get("via")
        if via is None:
            if link.get("from") == primary:
                errors.append(f"{lw}: the primary does not process its own writes: name a "
                              "near replica it links to (via), or process on a replica's link")
            continue
        near = next((x for x in links if x.get("from") == link.get("from")
                     and x.get("to") == via), None)
        if near is None or via == link.get("to"):
            errors.append(f"{lw}: via {via!r} must be another replica {link.get('from')} links "
                          "to (the near replica that processes)")
        elif near.get("bunker") or near.get("mode") not in ("sync", "async") or "via" in near:
            errors.append(f"{lw}: via {via} cannot process: a near replica holds volumes and is "
                          "sent every record directly (sync or async, no bunker, no via)")
    return errors


def replicator_topology_errors(groups, hosts):
    """Every reason the topology is not usable, as sentences (empty list: valid)."""
    hosts = list(hosts)
    if groups is None:
        return []
    if not isinstance(groups, list):
        return ["replicator_groups: expected a list of groups"]
    errors = []
    names = {}
    for i, g in enumerate(groups):
        errors += _group_errors(i, g, hosts)
        if isinstance(g, dict) and g.get("name") in names:
            errors.append(f"replicator_groups[{i}]: group {g['name']!r} is declared twice "
                          f"(also replicator_groups[{names[g['name']]}])")
        elif isinstance(g, dict):
            names[g.get("name")] = i
    if errors:
        return errors
    # volume names are NBD export names: unique per node across its groups
    for node in hosts:
        owner = {}
        for g in groups:
            if node in members(g):
                for v in g["volumes"]:
                    if v["name"] in owner:
                        errors.append(f"{node}: volume {v['name']!r} is in groups "
                                      f"{owner[v['name']]} and {g['name']}; volume names are NBD "
                                      "export names and must be unique per host")
                    owner[v["name"]] = g["name"]
    return errors


def members(group):
    """Nodes of a group: its primary and both ends of every link."""
    nodes = [group["primary"]]
    for link in group.get("links", []):
        for node in (link["from"], link["to"]):
            if node not in nodes:
                nodes.append(node)
    return nodes


def _link_keys(g):
    """{(processing node, far node)} of the links of `g` whose records are encrypted."""
    return {(link.get("via") or link["from"], link["to"]) for link in g.get("links", [])
            if "encrypt" in link.get("process", [])}


def replicator_node_link_keys(groups, node):
    """Names of the link keys `node` needs (GROUP-FARNODE): as the node that encrypts a far
    link's records, or as that far node."""
    return sorted(f"{g['name']}-{far}" for g in groups or [] for near, far in _link_keys(g)
                  if node in (near, far))


def replicator_node_groups(groups, node, volume_dir="/var/lib/replicator/volumes",
                           journal_size="256MiB", key_dir="/etc/replicator/pki"):
    """The `groups` section of `node`'s agent config."""
    out = []
    for g in groups or []:
        if node not in members(g):
            continue
        incoming = next((l for l in g.get("links", []) if l["to"] == node), {})
        source = incoming.get("from")
        bunker = next((l["to"] for l in g.get("links", []) if l.get("bunker")), None)
        role = ("primary" if node == g["primary"] else "bunker" if node == bunker
                else "secondary")
        watched = role == "primary" and any(v.get("capture") == "watch" for v in g["volumes"])
        out.append({
            "name": g["name"],
            "role": role,
            "source": source,
            "journal_size": g.get("journal_size", journal_size),
            "volumes": [] if role == "bunker" else [
                {"name": v["name"],
                 "path": v.get("path") or f"{volume_dir}/{g['name']}/{v['name']}.img",
                 "size": v["size"],
                 **({"capture": "watch"} if watched else {})} for v in g["volumes"]],
            "targets": [{"node": l["to"], "mode": l["mode"],
                         **{k: l.get(k, choices[0]) for k, choices in LINK_CHOICES.items()},
                         **({"bunker": True} if l.get("bunker") else {}),
                         **({"interval": l["interval"]} if "interval" in l else {}),
                         **({k: l[k] for k in ("via", "process") if k in l})}
                        for l in g.get("links", []) if l["from"] == node],
            **({"link_keys": keys} if (keys := {
                far: f"{key_dir}/links/{g['name']}-{far}.key"
                for near, far in sorted(_link_keys(g)) if node in (near, far)}) else {}),
            **({k: g[k] for k in WATCH_KEYS if k in g} if watched else {}),
            **({"bunker": bunker} if bunker and role == "secondary" else {}),
            **{k: incoming[k] for k in REPLICA_KEYS if k in incoming},
            # a bunker serves the takeover replay (FETCH) of the group's other members
            **({"members": [m for m in members(g) if m not in (node, source)]}
               if role == "bunker" else {}),
        })
    return out


def replicator_node_volumes(groups, node, volume_dir="/var/lib/replicator/volumes"):
    """The volumes `node` holds: [{key: GROUP/VOLUME, group, volume, path, primary}]."""
    return [{"key": f"{g['name']}/{v['name']}", "group": g["name"], "volume": v["name"],
             "path": v["path"], "primary": next(x["primary"] for x in groups if x["name"] == g["name"])}
            for g in replicator_node_groups(groups, node, volume_dir) for v in g["volumes"]]


def replicator_node_peers(groups, node):
    """Nodes `node` may exchange data with, sorted: every other member of its groups (a
    promoted replica ships to all of them, a takeover reads the bunker)."""
    peers = set()
    for g in groups or []:
        if node in members(g):
            peers.update(members(g))
    peers.discard(node)
    return sorted(peers)


def replicator_links(groups, group=None, source=None, target=None):
    """Links of the topology as [{group, from, to, mode, compress, bunker}], optionally
    only those of one group, from one node or to one node (None/'' selects all)."""
    out = []
    for g in groups or []:
        if group and g["name"] != group:
            continue
        for link in g.get("links", []):
            if source and link["from"] != source or target and link["to"] != target:
                continue
            out.append({"group": g["name"], "from": link["from"], "to": link["to"],
                        "mode": link["mode"], "compress": link.get("compress", "none"),
                        "bunker": bool(link.get("bunker")),
                        **({"interval": link["interval"]} if "interval" in link else {})})
    return out


def _target_spec(link):
    """A link as the agent's `--target` takes it: NODE:MODE[:zstd][:bunker][:block],
    MODE periodic=INTERVAL for a periodic link."""
    mode = f"periodic={link['interval']}" if link["mode"] == "periodic" else link["mode"]
    return ":".join([link["to"], mode]
                    + (["zstd"] if link.get("compress", "none") == "zstd" else [])
                    + (["bunker"] if link.get("bunker") else [])
                    + (["block"] if link.get("on_disconnect", "continue") == "block" else []))


def replicator_failover_plan(groups, group, lost, promoted):
    """What a takeover of `group` by `promoted` after the loss of its primary `lost` does
    to the group's tree, from the declared topology:

    - the promoted node takes over the lost primary's links: a sync link stays sync, the
      bunker stays the bunker, compression stays;
    - when the promoted node sat below an intermediate, the links on the way up to the
      lost primary are reversed (each keeps its mode), so every survivor still has one
      source and the cascade keeps its intermediates;
    - every other link stays as declared; the lost primary is nobody's target until it
      comes back (failback: `failback_link`, the link to it mirrored).

    Returns {group, lost, promoted, survivors, bunker, links (the new tree), promote_targets
    (the promoted node's outgoing links as `--target` specs), steps (the survivors' source
    changes, in the order they must happen, before the promotion: [{node, source, attach:
    [specs]}]), wait ({node: [targets that must replicate]}), failback_link (the spec of the
    link that brings `lost` back as a replica)}. Raises ValueError for a plan that cannot be
    made, with a sentence an operator can act on."""
    g = next((x for x in groups or [] if x["name"] == group), None)
    if g is None:
        raise ValueError(f"no group {group!r} in replicator_groups "
                         f"({', '.join(x['name'] for x in groups or []) or 'none'})")
    nodes = members(g)
    links = [dict(link) for link in g.get("links", [])]
    bunker = next((link["to"] for link in links if link.get("bunker")), None)
    if lost != g["primary"]:
        raise ValueError(f"{lost} is not the primary of {group} ({g['primary']} is): only the "
                         "primary's loss is failed over")
    if promoted not in nodes or promoted == lost:
        raise ValueError(f"{promoted!r} is not a replica of {group} "
                         f"(members: {', '.join(nodes)})")
    if promoted == bunker:
        raise ValueError(f"{promoted} is the bunker of {group}: it holds no volumes; promote a "
                         "replica (it replays from the bunker)")
    source_of = {link["to"]: link for link in links}
    path = [promoted]  # promoted, its source, ... up to the node right below `lost`
    while source_of[path[-1]]["from"] != lost:
        path.append(source_of[path[-1]]["from"])
    on_path = {(source_of[n]["from"], n) for n in path}
    new = []
    for link in links:
        end = (link["from"], link["to"])
        if end in on_path:
            if link["from"] != lost:  # reversed; the link from `lost` into the path goes
                new.append({**link, "from": link["to"], "to": link["from"]})
        elif link["from"] == lost:  # its near replica (via) is not the promoted node's
            new.append({k: v for k, v in link.items() if k not in ("via", "process")}
                       | {"from": promoted})
        else:
            new.append(link)
    declared = {link["to"]: link["from"] for link in links}
    # Every survivor is told its new source before the promotion, so the new primary's
    # first connection to it is accepted. The path first, from the top: each node takes
    # the one below it as its source (which drops that node as a target), so the promoted
    # node no longer hears anyone when it is promoted.
    steps = []
    for upper, lower in zip(reversed(path), reversed(path[:-1])):
        steps.append({"node": upper, "source": lower, "attach": []})
    new_source = {link["to"]: link["from"] for link in new}
    for node in nodes:
        if node in (lost, promoted) or node in path:
            continue
        if new_source.get(node) != declared.get(node):
            steps.append({"node": node, "source": new_source[node], "attach": []})
    # a reversed link below the promoted node's own: its upper end attaches it
    declared_links = {(x["from"], x["to"]) for x in links}
    for step in steps:
        step["attach"] = [_target_spec(link) for link in new if link["from"] == step["node"]
                          and (link["from"], link["to"]) not in declared_links]
    promote_targets = [_target_spec(link) for link in new if link["from"] == promoted]
    into_lost = source_of[path[-1]]  # the link from the lost primary towards the promoted
    return {
        "group": group, "lost": lost, "promoted": promoted,
        "survivors": [n for n in nodes if n != lost],
        "bunker": bunker,
        "links": new,
        "promote_targets": promote_targets,
        "steps": steps,
        "wait": _outgoing(new),
        "failback_link": _target_spec({**into_lost, "to": lost, "bunker": False}),
    }


def _outgoing(links) -> dict:
    """{node: [the nodes it ships to]} of a list of links, in their order."""
    out = {}
    for link in links:
        out.setdefault(link["from"], []).append(link["to"])
    return out


def replicator_outgoing(groups, group):
    """{node: [targets]} of the declared links of `group`: what must replicate when the
    group is as the inventory declares it."""
    g = next(x for x in groups if x["name"] == group)
    return _outgoing(g.get("links", []))


def replicator_watched_groups(groups):
    """Names of the groups whose volumes are watched files (capture: watch)."""
    return [g["name"] for g in groups or []
            if any(v.get("capture") == "watch" for v in g.get("volumes", []))]


def replicator_drill_target(groups, group):
    """The replica a DR exercise of `group` promotes by default: the first async replica
    (a far site, the classic DR copy), else the first sync one; never the bunker."""
    g = next(x for x in groups if x["name"] == group)
    replicas = [link for link in g.get("links", []) if not link.get("bunker")]
    if not replicas:
        raise ValueError(f"group {group} has no replica to promote (only a bunker)")
    return next((link["to"] for link in replicas if link["mode"] == "async"), replicas[0]["to"])


def replicator_endpoint(hostvars_of_host, default_port, address_var="replicator_agent_address",
                        port_var="replicator_agent_port"):
    """HOST:PORT where a node's agent listens, from its inventory variables."""
    hv = hostvars_of_host
    address = hv.get(address_var) or hv.get("ansible_host") or hv["inventory_hostname"]
    return f"{address}:{hv.get(port_var) or default_port}"


class FilterModule:
    def filters(self):
        return {
            "replicator_topology_errors": replicator_topology_errors,
            "replicator_node_groups": replicator_node_groups,
            "replicator_watched_groups": replicator_watched_groups,
            "replicator_node_peers": replicator_node_peers,
            "replicator_node_link_keys": replicator_node_link_keys,
            "replicator_node_volumes": replicator_node_volumes,
            "replicator_links": replicator_links,
            "replicator_endpoint": replicator_endpoint,
            "replicator_failover_plan": replicator_failover_plan,
            "replicator_drill_target": replicator_drill_target,
            "replicator_outgoing": replicator_outgoing,
        }
