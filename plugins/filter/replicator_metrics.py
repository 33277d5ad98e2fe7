# Copyright: (c) 2026, The replicator team
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""A Prometheus instant query of a per-target metric, as one row per link of the topology
(playbooks/metrics.yml). The agents label a target's series `group` and `target`; the
scrape configuration adds `node`, the agent scraped, which is the link's source."""

import math


def _series(response):
    """{(group, source, target): value} from an instant query's answer (the largest value
    where several series name one link)."""
    if not isinstance(response, dict) or response.get("status") != "success":
        raise ValueError(f"not a successful Prometheus answer: {str(response)[:200]}")
    data = response.get("data") or {}
    if data.get("resultType") != "vector":
        raise ValueError(f"expected an instant vector; got {data.get('resultType')!r}")
    found = {}
    for s in data.get("result") or []:
        labels = s.get("metric") or {}
        if not all(k in labels for k in ("group", "node", "target")):
            raise ValueError(f"a series without the labels group, node and target: {labels} "
                             "(does the scrape configuration label each agent node=<host>?)")
        value = float(s["value"][1])
        key = (labels["group"], labels["node"], labels["target"])
        found[key] = max(found.get(key, value), value)
    return found


def _number(value):
    return "NaN" if math.isnan(value) else f"{value:.1f}"


def replicator_metrics_links(groups, response, column="VALUE"):
    """{lines, missing, extra}: `lines` a table with one row per link of `groups` (its value,
    or `missing`) and one per series of a link the inventory does not declare; `missing`
    and `extra` name those links as `GROUP SOURCE -> TARGET`."""
    found = _series(response)
    links = [(g["name"], link["from"], link["to"]) for g in groups for link in g.get("links", [])]
    rows = [(g, f"{src} -> {dst}", _number(found[(g, src, dst)]) if (g, src, dst) in found
             else "missing") for g, src, dst in links]
    extra = sorted(set(found) - set(links))
    rows += [(g, f"{src} -> {dst}", f"{_number(found[(g, src, dst)])} (not in the inventory)")
             for g, src, dst in extra]
    table = [("GROUP", "LINK", column)] + rows
    widths = [max(len(r[i]) for r in table) for i in range(2)]
    return {
        "lines": [f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]}" for r in table],
        "missing": [f"{g} {src} -> {dst}" for g, src, dst in links if (g, src, dst) not in found],
        "extra": [f"{g} {src} -> {dst}" for g, src, dst in extra],
    }


class FilterModule:
    def filters(self):
        return {"replicator_metrics_links": replicator_metrics_links}
