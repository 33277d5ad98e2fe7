#!/usr/bin/env bash
# The demo: five hosts on this machine, deployed and operated with Ansible over real SSH.
#   dc1-app --sync--> dc2-dr                                   (site uplinks 1 Gbit/s)
#   dc1-app --sync--> dc1-bunker                               (journal only)
#   dc1-app --async, zstd--> dc3-arc --async--> dc4-vault      (100 and 50 Mbit/s: a cascade)
# and a group of watched files: dc1-app's /srv/files/vm.img (XFS with reflink) written by
# a program directly, dc1-app --async--> dc3-arc --periodic, 10 s--> dc4-vault.
# Each host is a network namespace with its own address, sshd, hostname, private mounts and
# process tree (lab/playbooks/lab.yml). Then site.yml (CA and certificates, install, configure,
# start: mutual TLS), pair.yml (every link replicating), a workload through NBD on the
# primary host (qemu-io over TLS with the controller's client certificate, fio random writes over
# the host's unix socket; a plain client of the NBD port refused), an ext4 file system on the
# volume log (attach-device) whose files the sync replica shows after the drill, verify.yml (online verify of every
# link: region hashes compared on both ends while replication runs), compare.yml (every replica equals the primary: sha256 on each host) and
# status.yml (one table), then the DR drill (dr_exercise.yml: dc1-app crashed under a
# ledger-logged workload, dc3-arc promoted through the bunker, ledger checked, failback,
# report in /var/tmp/replicator-dr/db), and last every link's lag in seconds as the lab's
# Prometheus (on the controller, scraping every agent's metrics endpoint) has it
# (metrics.yml). Re-running it reuses the lab; the end says how to remove it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH" ANSIBLE_CONFIG="$PWD/ansible.cfg"
started=$SECONDS

play() {  # play [lab/]playbooks/NAME.yml ARGS...
    echo "== ansible-playbook -i inventories/lab $*"
    ansible-playbook -i inventories/lab "$@"
}
inventory() {  # inventory EXPR: a Python expression over the lab inventory's `hostvars`
    ansible-inventory -i inventories/lab --list | python3 -c \
        "import json, sys; hostvars = json.load(sys.stdin)['_meta']['hostvars']; print($1)"
}

play lab/playbooks/lab.yml -e lab_state=up -e lab_prometheus=true
play playbooks/site.yml
play playbooks/pair.yml

primary=$(inventory "next(iter(hostvars.values()))['replicator_groups'][0]['primary']")
address=$(inventory "hostvars['$primary']['ansible_host']")
# NBD on the network is TLS only, with a client certificate of the CA: the controller's is
# the DR exercise's (replicator_pki issued it; nbd_clients grants it the exports)
lab_dir=$(inventory "hostvars['$primary']['replicator_lab_dir']")
certs="$lab_dir/pki/clients/replicator-drill"   # (replicator_pki_dir: the lab's, under its directory)
nbds() { echo "nbds://$address:10809/$1?tls-certificates=$certs"; }
qemu_io_tls() {  # qemu_io_tls EXPORT COMMAND...
    local export=$1; shift
    local args=(); for c in "$@"; do args+=(-c "$c"); done
    qemu-io --object "tls-creds-x509,id=tls0,dir=$certs,endpoint=client" "${args[@]}" \
        --image-opts "driver=nbd,server.type=inet,server.host=$address,server.port=10809,export=$export,tls-creds=tls0"
}
on() {  # on HOST COMMAND: run a shell command on a lab host (over SSH, with Ansible)
    ansible -i inventories/lab "$1" -m ansible.builtin.shell -a "$2" -o \
        | sed -e 's/^[^|]*| [A-Z]* | rc=[0-9]* | (stdout) //' -e 's/\\n/\n/g'
}
cli=/opt/replicator/venv/bin/replicator
socket=/run/replicator/nbd.sock
echo "== workload through NBD over TLS on $primary ($(nbds data))"
qemu_io_tls data "write -P 0xab 0 8M" "write -P 0xcd 32M 4M" | grep -E "^wrote"
qemu_io_tls log "write -P 0x12 0 1M" "write -z 512k 64k" | grep -E "^wrote"
# (fio's nbd engine, like nbdfuse, lets no URI name a certificate file: it runs on the
# primary's host, over the agent's unix socket)
on "$primary" "fio --name=demo --ioengine=nbd --uri='nbd+unix:///data?socket=$socket' \
    --rw=randwrite --bs=4k --iodepth=16 --size=64M --runtime=10 --time_based --output-format=terse" \
    | awk -F";" 'NF > 48 {printf "fio randwrite 4k iodepth 16 over the socket (sync target dc2-dr): %s IOPS\n", $49}'
echo "== a plain NBD client of that port is refused before it learns any export"
if nbdinfo --list "nbd://$address:10809" >/dev/null 2>&1; then
    echo "demo: plain NBD was served on $address:10809" >&2; exit 1
fi
echo "refused: TLS required"

echo "== an ext4 file system on $primary's volume log: attach-device (nbdfuse + loop over the agent's unix socket), files written and fsync'd"
on "$primary" "set -e; dev=\$($cli attach-device 'nbd+unix:///log?socket=$socket' --name demo-log)
    mkfs.ext4 -q -F \$dev; mkdir -p /mnt/demo; mount \$dev /mnt/demo
    for f in alpha beta gamma; do head -c 1M /dev/urandom > /mnt/demo/\$f; done; sync -f /mnt/demo/alpha
    cd /mnt/demo && sha256sum alpha beta gamma; cd /; umount /mnt/demo; $cli detach-device demo-log" \
    | tee /tmp/replicator-demo-files.sha256

echo "== a program writes a file directly on $primary: /srv/files/vm.img, watched (group files)"
ansible -i inventories/lab "$primary" -m ansible.builtin.command -a \
    "fio --name=vm --filename=/srv/files/vm.img --size=64M --ioengine=psync --rw=randwrite
     --bs=64k --io_size=32M --output-format=terse" | awk -F";" 'NF > 48 {
        printf "fio psync randwrite 64k into the watched file: %s KiB/s\n", $48}'

play playbooks/verify.yml
play playbooks/compare.yml
play playbooks/status.yml
play playbooks/dr_exercise.yml -e dr_exercise_mode=destructive -e replicator_safe_mode=false \
    -e dr_report_dir=/var/tmp/replicator-dr
sed -n '1,12p' /var/tmp/replicator-dr/db/report.md
replica=$(inventory "[l['to'] for l in hostvars['$primary']['replicator_groups'][0]['links'] if l.get('mode') == 'sync' and not l.get('bunker')][0]")
echo "== after the drill: the ext4 file system on $replica's copy of log (read-only), the same files"
on "$replica" "set -e; dev=\$($cli attach-device 'nbd+unix:///log?socket=$socket' --name demo-log --read-only)
    mkdir -p /mnt/demo; mount -o ro,noload \$dev /mnt/demo; cd /mnt/demo
    echo '$(grep -E '^[0-9a-f]{64}  ' /tmp/replicator-demo-files.sha256 | tr '\n' ';')' | tr ';' '\n' | sha256sum -c
    cd /; umount /mnt/demo; $cli detach-device demo-log"
play playbooks/metrics.yml

prometheus=$(inventory "hostvars['$primary']['replicator_lab_prometheus_listen']")
cat <<TEXT

demo ok in $((SECONDS - started))s. The DR report: /var/tmp/replicator-dr/db/report.{md,json,xml}.
The lab is still up; try:
  ssh -i $lab_dir/ssh/id_ed25519 -o UserKnownHostsFile=/dev/null -o StrictHostKeyChecking=no root@$address
  .venv/bin/ansible-playbook -i inventories/lab playbooks/status.yml
  .venv/bin/ansible-playbook -i inventories/lab playbooks/metrics.yml -e replicator_metrics_query=replicator_target_lag_bytes
  curl -s 'http://$prometheus/api/v1/query?query=replicator_target_lag_seconds'   (Prometheus, alerts: http://$prometheus/alerts)
  .venv/bin/ansible-playbook -i inventories/lab lab/playbooks/lab_fault.yml -e lab_fault=isolate -l dc3-arc
Tear it down (removes every namespace, link, process and file it made):
  .venv/bin/ansible-playbook -i inventories/lab lab/playbooks/lab.yml -e lab_state=down
TEXT
