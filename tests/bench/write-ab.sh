#!/usr/bin/env bash
# Block-path A/B: the write jobs of write-quick.sh against qemu-nbd on a raw
# file and against two builds of Volumed (3-node clusters side by side, one
# per build), in one run, so a change is judged against the build before it
# under the same machine load. Prints one line per job and target.
#
#   tests/bench/write-ab.sh BASE_DIR NEW_DIR [REPLICAS...]
#
# BASE_DIR and NEW_DIR each hold a `volctl` and a `volumed` (volctl starts the
# volumed next to it), e.g. copies of target/release from two commits.
# REPLICAS defaults to "1 3". RT (seconds per job, default 10) and JOBS
# ("rw bs qd|..." as fio takes them, in order; read jobs read what the
# jobs before them wrote, e.g. JOBS="write 1M 8|randread 4k 32") override
# the defaults.
set -euo pipefail
[ $# -ge 2 ] || { echo "usage: $0 BASE_DIR NEW_DIR [REPLICAS...]" >&2; exit 2; }
for v in http_proxy https_proxy HTTP_PROXY HTTPS_PROXY all_proxy ALL_PROXY; do unset "$v"; done
BASE=$1
NEW=$2
shift 2
REPLICAS=("$@")
[ ${#REPLICAS[@]} -gt 0 ] || REPLICAS=(1 3)
STB=$(mktemp -d /tmp/volumed-write-ab-base-XXXXXX)
STN=$(mktemp -d /tmp/volumed-write-ab-new-XXXXXX)
QP=""
cleanup() {
    [ -n "$QP" ] && kill "$QP" 2>/dev/null || true
    "$BASE/volctl" --state-dir "$STB" dev down >/dev/null 2>&1 || true
    "$NEW/volctl" --state-dir "$STN" dev down >/dev/null 2>&1 || true
    rm -rf "$STB" "$STN"
}
trap cleanup EXIT
"$BASE/volctl" --state-dir "$STB" dev up --no-csi --nodes 3 --first-ip 127.0.9.2 >/dev/null 2>&1
"$NEW/volctl" --state-dir "$STN" dev up --no-csi --nodes 3 --first-ip 127.0.10.2 >/dev/null 2>&1
declare -A URI
for r in "${REPLICAS[@]}"; do
    for side in base new; do
        if [ "$side" = base ]; then bin=$BASE st=$STB; else bin=$NEW st=$STN; fi
        "$bin/volctl" --state-dir "$st" volume create "r$r" --size 1Gi --replicas "$r" >/dev/null
        URI[$side$r]=$("$bin/volctl" --state-dir "$st" -o json volume get "r$r" | jq -r .nbd_uri)
    done
done
qemu-img create -f raw "$STB/raw.img" 1G >/dev/null
qemu-nbd -f raw -x bench -b 127.0.0.9 -p 10812 --persistent --shared=8 "$STB/raw.img" &
QP=$!
sleep 1
IFS='|' read -ra JOB_LIST <<<"${JOBS:-randwrite 4k 1|randwrite 4k 32|write 1M 8}"
for job in "${JOB_LIST[@]}"; do
    read -r rw bs qd <<<"$job"
    targets=("qemu-nbd|nbd://127.0.0.9:10812/bench")
    for r in "${REPLICAS[@]}"; do
        targets+=("base R=$r|${URI[base$r]}" "new R=$r|${URI[new$r]}")
    done
    for t in "${targets[@]}"; do
        fio --name=j --ioengine=nbd --uri="${t#*|}" --rw="$rw" --bs="$bs" --iodepth="$qd" --runtime="${RT:-10}" \
            --time_based --ramp_time=2 --direct=1 --norandommap --output-format=json --output="$STB/o.json" >/dev/null
        dir="write"
        [[ $rw == *read* ]] && dir="read"
        jq -r --arg n "${t%%|*}" --arg j "$rw $bs QD$qd" --arg d "$dir" \
            '"\($j) \($n): \(.jobs[0][$d].iops|floor) IOPS, \((.jobs[0][$d].bw_bytes/1e6)|floor) MB/s, p50 \((.jobs[0][$d].clat_ns.percentile["50.000000"]/1000)|floor) µs"' "$STB/o.json"
    done
done
