"""Filters for playbooks/lab.yml."""


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


class FilterModule:
    def filters(self):
        return {"replicator_lab_hosts": replicator_lab_hosts}
