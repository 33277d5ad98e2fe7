#!/usr/bin/env bash
# Demo of the main job on this machine: three agents in a cascade
#   dc1 (primary) --sync--> dc2 (intermediate) --async, zstd--> dc3
# a workload written through NBD on dc1 (qemu-io patterns on two volumes + fio random
# writes), the replicas compared byte for byte with cmp, and the status tables printed.
# Everything lives under $DEMO_DIR (default /tmp/replicator-demo) and is stopped at exit.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=.venv/bin/python
REPL=".venv/bin/replicator"
DEMO_DIR=${DEMO_DIR:-/tmp/replicator-demo}
rm -rf "$DEMO_DIR"
mkdir -p "$DEMO_DIR"

pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT

declare -A REPL_PORT=([dc1]=17801 [dc2]=17802 [dc3]=17803)
declare -A NBD_PORT=([dc1]=17811 [dc2]=17812 [dc3]=17813)
declare -A ROLE=([dc1]=primary [dc2]=secondary [dc3]=secondary)
declare -A SOURCE=([dc1]=null [dc2]=dc1 [dc3]=dc2)
declare -A TARGETS=([dc1]="[{node: dc2, mode: sync}]" [dc2]="[{node: dc3, mode: async, compress: zstd}]" [dc3]="[]")

for n in dc1 dc2 dc3; do
    d=$DEMO_DIR/$n
    mkdir -p "$d"
    cat > "$d/agent.yml" <<YAML
node: $n
listen: 127.0.0.1:${REPL_PORT[$n]}
nbd_listen: 127.0.0.1:${NBD_PORT[$n]}
state_dir: $d/state
admin_socket: $d/admin.sock
tls: false  # plain TCP on loopback; the Ansible lab uses mutual TLS
peers: {dc1: 127.0.0.1:${REPL_PORT[dc1]}, dc2: 127.0.0.1:${REPL_PORT[dc2]}, dc3: 127.0.0.1:${REPL_PORT[dc3]}}
groups:
  - name: db
    role: ${ROLE[$n]}
    source: ${SOURCE[$n]}
    journal_size: 64MiB
    volumes:
      - {name: data, path: $d/volumes/data.img, size: 64MiB}
      - {name: log,  path: $d/volumes/log.img,  size: 16MiB}
    targets: ${TARGETS[$n]}
YAML
    $REPL config check "$d/agent.yml"
    $REPL agent -c "$d/agent.yml" 2> "$d/agent.log" &
    pids+=($!)
done

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
    local deadline=$((SECONDS + $1)) what=$2; shift 2
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS >= deadline)); then echo "timed out waiting for $what" >&2; exit 1; fi
        sleep 0.2
    done
}
for n in dc1 dc2 dc3; do wait_for 20 "agent $n" $REPL status -c "$DEMO_DIR/$n/agent.yml"; done
in_sync() { $REPL status -c "$DEMO_DIR/dc1/agent.yml" --json | $PY -c 'import json,sys; sys.exit(0 if json.load(sys.stdin)["groups"][0]["targets"][0]["in_sync"] else 1)'; }
wait_for 20 "dc2 in sync" in_sync

echo "== workload through NBD on dc1"
qemu-io -f raw -c "write -P 0xab 0 8M" -c "write -P 0xcd 32M 4M" "nbd://127.0.0.1:${NBD_PORT[dc1]}/data" | grep -E "^wrote"
qemu-io -f raw -c "write -P 0x12 0 1M" -c "write -z 512k 64k" "nbd://127.0.0.1:${NBD_PORT[dc1]}/log" | grep -E "^wrote"
fio --name=demo --ioengine=nbd --uri="nbd://127.0.0.1:${NBD_PORT[dc1]}/data" --rw=randwrite \
    --bs=4k --iodepth=16 --size=64M --runtime=5 --time_based --output-format=terse \
    | awk -F";" "NF > 48 {printf \"fio randwrite 4k iodepth 16 (sync target): %s IOPS\\n\", \$49}"

converged() {
    $PY - "$DEMO_DIR" <<'PYEOF'
import sys
from replicator import admin
d = sys.argv[1]
seqs = [admin.request(f"{d}/{n}/admin.sock", "status")["groups"][0]["applied_seq"] for n in ("dc1", "dc2", "dc3")]
sys.exit(0 if len(set(seqs)) == 1 else 1)
PYEOF
}
wait_for 60 "replicas to converge" converged

echo "== replicas compared with cmp"
for v in data log; do
    for n in dc2 dc3; do
        cmp "$DEMO_DIR/dc1/volumes/$v.img" "$DEMO_DIR/$n/volumes/$v.img"
        echo "volume $v: dc1 == $n"
    done
done
for n in dc1 dc2 dc3; do
    echo "== replicator status ($n)"
    $REPL status -c "$DEMO_DIR/$n/agent.yml"
done
echo "demo ok: state and logs under $DEMO_DIR"
