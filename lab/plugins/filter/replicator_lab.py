"""Filters for lab/playbooks/lab.yml."""


def replicator_lab_hosts(names, hostvars):
    """Inventory hosts as the lab module's `hosts`: [{name, address, site, filesystems}]
    (filesystems: the host's replicator_lab_filesystems, [{mountpoint, type, size}])."""
    hosts = []
    for name in names:
        hv = hostvars[name]
        if "ansible_host" not in hv:
            raise ValueError(f"lab host {name} needs ansible_host (its address in the lab network)")
        hosts.append({"name": name, "address": str(hv["ansible_host"]),
                      "site": str(hv.get("replicator_lab_site", name)),
                      "filesystems": list(hv.get("replicator_lab_filesystems") or [])})
    return hosts


def replicator_lab_metrics_targets(names, hostvars):
    """{host: its replicator_agent_metrics_listen} for the hosts whose agent serves metrics
    (the lab's Prometheus scrapes them from the controller)."""
    targets = {}
    for name in names:
        listen = hostvars[name].get("replicator_agent_metrics_listen")
        if listen:
            targets[name] = str(listen)
    return targets


class FilterModule:
    def filters(self):
        return {"replicator_lab_hosts": replicator_lab_hosts,
                "replicator_lab_metrics_targets": replicator_lab_metrics_targets}
