#!/usr/bin/env bash
# Quick write-path check (a subset of block-bench.sh): 4 KiB random writes
# at QD1 and QD32 and 1 MiB sequential writes, 10 s each, over NBD against
# qemu-nbd on a raw file, volumed R=1 and volumed R=3, in one run. Prints one
# line per job; ratios are to the qemu-nbd line of the same job.
#
#   cargo build --release --workspace --bins && tests/bench/write-quick.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
for v in http_proxy https_proxy HTTP_PROXY HTTPS_PROXY all_proxy ALL_PROXY; do unset "$v"; done
ST=$(mktemp -d /tmp/volumed-write-quick-XXXXXX)
V="target/release/volctl --state-dir $ST"
QP=""
cleanup() { [ -n "$QP" ] && kill "$QP" 2>/dev/null || true; $V dev down >/dev/null 2>&1 || true; rm -rf "$ST"; }
trap cleanup EXIT
$V dev up --nodes 3 --first-ip 127.0.9.2 >/dev/null
$V volume create r3 --size 1Gi --replicas 3 >/dev/null
$V volume create r1 --size 1Gi --replicas 1 >/dev/null
R3=$($V -o json volume get r3 | jq -r .nbd_uri)
R1=$($V -o json volume get r1 | jq -r .nbd_uri)
qemu-img create -f raw "$ST/raw.img" 1G >/dev/null
qemu-nbd -f raw -x bench -b 127.0.0.9 -p 10812 --persistent --shared=8 "$ST/raw.img" &
QP=$!
sleep 1
Q=nbd://127.0.0.9:10812/bench
for job in "randwrite 4k 1" "randwrite 4k 32" "write 1M 8"; do
    read -r rw bs qd <<<"$job"
    for t in "qemu-nbd|$Q" "volumed R=1|$R1" "volumed R=3|$R3"; do
        fio --name=j --ioengine=nbd --uri="${t#*|}" --rw="$rw" --bs="$bs" --iodepth="$qd" --runtime=10 \
            --time_based --ramp_time=2 --direct=1 --norandommap --output-format=json --output="$ST/o.json" >/dev/null
        jq -r --arg n "${t%%|*}" --arg j "$rw $bs QD$qd" \
            '"\($j) \($n): \(.jobs[0].write.iops|floor) IOPS, \((.jobs[0].write.bw_bytes/1e6)|floor) MB/s, p50 \((.jobs[0].write.clat_ns.percentile["50.000000"]/1000)|floor) µs, p99 \((.jobs[0].write.clat_ns.percentile["99.000000"]/1000)|floor) µs"' "$ST/o.json"
    done
done
