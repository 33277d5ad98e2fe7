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

Every key the agent reads in a group, a volume or a target can be set (GROUP_CONFIG_KEYS,
VOLUME_KEYS, TARGET_KEYS) and goes as it is to the members' configs; the agent's own
parser (config.py, shipped in the collection) checks their values here on the controller.

Each group's links must form a tree rooted at its primary: the primary receives
nothing, every other member receives from exactly one node, and every member is
reachable from the primary. `replicator_topology_errors` says what breaks that, in
words an operator can act on; the other filters assume a valid topology.
"""

import re

from ansible_collections.voltrail.replicator.replicator import config as agent

NAME_RE = agent.NAME_RE
# An inventory group's keys that its members' group configs take as they are (the agent
# checks their values), and the keys of a watched group, which go to its primary only.
GROUP_CONFIG_KEYS = ("journal_size", "allocation", "bitmap_granularity", "logging_high_water",
                     "resync_rate", "durability", "commit_interval")
WATCH_KEYS = ("consistency", "interval", "quiet", "freeze", "thaw", "hook_timeout")
GROUP_KEYS = ("name", "primary", "volumes", "links", "drill_volume", *GROUP_CONFIG_KEYS,
              *WATCH_KEYS)
VOLUME_KEYS = ("name", "size", "path", "capture", "allocation")
# A link's keys that its source's target config takes as they are; and those that go to
# its target's group config (a replica's point in time).
TARGET_KEYS = ("mode", "interval", "compress", "compress_level", "initial_sync",
               "on_disconnect", "bunker", "via", "process", "max_lag_seconds",
               "max_lag_bytes", "on_lag")
REPLICA_KEYS = ("retain", "apply_delay")
LINK_KEYS = ("from", "to", *TARGET_KEYS, *REPLICA_KEYS)
# Keys of a node's agent config and the role variables they come from, where the name is
# not replicator_agent_KEY.
NODE_VARS = {"node": "replicator_agent_node_name",
             "listen": "replicator_agent_address, replicator_agent_port",
             "nbd_tls_listen": "replicator_agent_nbd_tls_listen (by default replicator_agent_address, "
                               "replicator_agent_nbd_port)",
             "admin_socket": "replicator_agent_run_dir",
             "tls": "replicator_agent_tls, replicator_agent_pki_dir, replicator_agent_tls_crl",
             "peers": "the peers' replicator_agent_address and replicator_agent_port"}


def _unknown(where, data, known):
    return [f"{where}: unknown key {k!r} (known: {', '.join(sorted(known))})"
            for k in sorted(set(map(str, data)) - set(known))]


def _group_errors(i, g, hosts):
    """What is wrong with the shape of group `g`: its names, keys, hosts and tree (the
    values of the keys the agent reads are _agent_errors')."""
    where = f"replicator_groups[{i}]"
    if not isinstance(g, dict):
        return [f"{where}: expected a mapping with name, primary, volumes, links"]
    name = g.get("name")
    if not isinstance(name, str) or not NAME_RE.match(name):
        return [f"{where}.name: expected a group name (letters, digits, '.', '_', '-'); "
                f"got {name!r}"]
    where = f"{where} ({name})"
    errors = _unknown(where, g, GROUP_KEYS)
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
        errors += _unknown(f"{where}: volumes[{j}] ({v['name']})", v, VOLUME_KEYS)
        if str(v["name"]) in seen:
            errors.append(f"{where}: volume {v['name']!r} is declared twice")
        seen.add(str(v["name"]))
    if "drill_volume" in g and str(g["drill_volume"]) not in seen:
        errors.append(f"{where}: drill_volume {g['drill_volume']!r} is not one of its volumes "
                      f"({', '.join(sorted(seen)) or 'none'})")
    links = g.get("links", [])
    if not isinstance(links, list):
        return errors + [f"{where}: links must be a list of {{from, to, mode, ...}}"]
    source_of = {}
    for j, link in enumerate(links):
        lw = f"{where}: links[{j}]"
        if not isinstance(link, dict):
            errors.append(f"{lw}: expected {{from, to, mode, ...}}")
            continue
        errors += _unknown(lw, link, LINK_KEYS)
        src, dst = link.get("from"), link.get("to")
        strangers = [(end, node) for end, node in (("from", src), ("to", dst))
                     if node not in hosts]
        errors += [f"{lw}: {end} {node!r} is not a host of the inventory group "
                   f"(hosts: {', '.join(hosts)})" for end, node in strangers]
        if strangers:
            continue
        if link.get("bunker") is True and (link.get("mode") != "sync" or src != primary):
            errors.append(f"{lw}: a bunker keeps a synchronous copy of the primary's journal: "
                          f"it must be linked from the primary {primary} with mode sync")
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
    bunkers = [link.get("to") for link in links if isinstance(link, dict)
               and link.get("bunker") is True]
    if len(bunkers) > 1:
        errors.append(f"{where}: more than one bunker ({', '.join(map(str, bunkers))}); a group "
                      "has at most one")
    feeds = {link.get("from") for link in links if isinstance(link, dict)
             and link.get("from") in hosts}
    errors += [f"{where}: bunker {b} cannot ship to other nodes (it has no volumes)"
               for b in bunkers if b in feeds]
    if primary not in hosts:
        return errors
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


_ITEM = re.compile(r"^(targets|volumes)\[(\d+)\](?:\.(.+))?$")


def _inventory_place(i, g, rendered, node, path):
    """Where the key `path` of the group config `rendered` (of inventory group
    replicator_groups[i], `g`, on `node`) is set in the inventory."""
    where = f"replicator_groups[{i}] ({g['name']})"
    links = g.get("links", [])
    item = _ITEM.match(path)
    if item and item[1] == "targets":
        to = rendered["targets"][int(item[2])]["node"]
        j = next(j for j, x in enumerate(links) if (x["from"], x["to"]) == (node, to))
        return f"{where}: links[{j}] ({node} -> {to})" + (f": {item[3]}" if item[3] else "")
    if item:
        j = int(item[2])
        return f"{where}: volumes[{j}] ({g['volumes'][j]['name']})" + \
            (f": {item[3]}" if item[3] else "")
    key = path.split(".")[0].split("[")[0]
    if key in REPLICA_KEYS:
        j = next(j for j, x in enumerate(links) if x["to"] == node)
        return f"{where}: links[{j}] ({links[j]['from']} -> {node}): {path}"
    if key == "targets":
        return f"{where}: the links from {node}"
    if key in GROUP_KEYS:
        return f"{where}: {path}" + (" (the role's replicator_agent_journal_size)"
                                     if key == "journal_size" and key not in g else "")
    return f"{where}, as {node}'s agent config renders it: {path}"


def _agent_errors(groups, hosts, journal_size):
    """What the agents would refuse in the group configs the inventory renders for every
    host, said of the inventory's keys; each once (each member reads a group's keys)."""
    index = {g["name"]: i for i, g in enumerate(groups)}
    out = {}
    for node in hosts:
        for rendered in replicator_node_groups(groups, node, journal_size=journal_size):
            i = index[rendered["name"]]
            for path, message in agent.group_errors(rendered, node):
                out.setdefault(f"{_inventory_place(i, groups[i], rendered, node, path)}: "
                               f"{message}", None)
    return list(out)


def replicator_topology_errors(groups, hosts, journal_size="256MiB"):
    """Every reason the topology is not usable, as sentences (empty list: valid): its
    shape, then every value the agents would refuse in the configs it renders (sizes,
    durations, choices and the rules between keys, as the agent's own parser reads them);
    `journal_size` is the role's, for groups that do not set one."""
    hosts = list(hosts)
    if groups is None:
        return []
    if not isinstance(groups, list):
        return ["replicator_groups: expected a list of groups"]
    errors = []
    names = {}
    for i, g in enumerate(groups):
        errors += _group_errors(i, g, hosts)
        name = g.get("name") if isinstance(g, dict) else None
        if isinstance(name, str) and name in names:
            errors.append(f"replicator_groups[{i}]: group {name!r} is declared twice "
                          f"(also replicator_groups[{names[name]}])")
        elif isinstance(name, str):
            names[name] = i
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
    return errors or _agent_errors(groups, hosts, journal_size)


def replicator_config_errors(config, groups=None):
    """What the agent would refuse in `config`, a node's whole agent config as the role
    renders it (checked on the controller with the agent's own parser, before anything is
    written), each error said of the role variable or inventory key it comes from; empty
    when the agent takes it. `groups` is the topology the config's groups come from."""
    try:
        agent.parse(config)
    except agent.ConfigError as exc:
        errors = exc.errors
    else:
        return []
    node = config.get("node") if isinstance(config, dict) else None
    index = {g.get("name"): i for i, g in enumerate(groups or []) if isinstance(g, dict)}
    rendered = config.get("groups") if isinstance(config, dict) else None
    out = []
    for path, message in errors:
        place = None
        if path.startswith("groups["):
            k, rest = path[len("groups["):].split("]", 1)
            g = rendered[int(k)] if isinstance(rendered, list) else {}
            if isinstance(g, dict) and g.get("name") in index and rest.startswith("."):
                i = index[g["name"]]
                place = _inventory_place(i, groups[i], g, node, rest[1:])
        if place is None:
            key = path.split(".")[0]
            place = f"{NODE_VARS.get(key, f'replicator_agent_{key}')} (agent key {path})"
        out.append(f"{node}: {place}: {message}")
    return out


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
    """The `groups` section of `node`'s agent config: each group's keys as the inventory
    sets them (GROUP_CONFIG_KEYS; WATCH_KEYS on its primary), its links from `node` as
    targets (TARGET_KEYS), its link to `node`'s REPLICA_KEYS."""
    out = []
    for g in groups or []:
        if node not in members(g):
            continue
        links = g.get("links", [])
        incoming = next((x for x in links if x["to"] == node), {})
        source = incoming.get("from")
        bunker = next((x["to"] for x in links if x.get("bunker") is True), None)
        role = ("primary" if node == g["primary"] else "bunker" if node == bunker
                else "secondary")
        # a replica of a watched file is an ordinary volume: capture is the primary's
        copied = ("allocation", "capture") if role == "primary" else ("allocation",)
        out.append({
            "name": g["name"],
            "role": role,
            "source": source,
            "journal_size": journal_size,
            **{k: g[k] for k in GROUP_CONFIG_KEYS if k in g},
            "volumes": [] if role == "bunker" else [
                {"name": v["name"],
                 "path": v.get("path") or f"{volume_dir}/{g['name']}/{v['name']}.img",
                 "size": v["size"],
                 **{k: v[k] for k in copied if k in v}} for v in g["volumes"]],
            "targets": [{"node": x["to"], **{k: x[k] for k in TARGET_KEYS if k in x}}
                        for x in links if x["from"] == node],
            **({"link_keys": keys} if (keys := {
                far: f"{key_dir}/links/{g['name']}-{far}.key"
                for near, far in sorted(_link_keys(g)) if node in (near, far)}) else {}),
            **({k: g[k] for k in WATCH_KEYS if k in g} if role == "primary" else {}),
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
            "replicator_config_errors": replicator_config_errors,
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
