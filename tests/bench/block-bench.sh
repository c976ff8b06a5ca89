#!/usr/bin/env bash
# Block-path benchmark: fio over NBD against volumed (R=1 and R=3 on a local
# 3-node cluster) and, in the same run, against qemu-nbd serving a raw file
# on the same disk. Prints a markdown table with ratios to qemu-nbd and
# keeps fio's JSON under $OUT.
#
#   tests/bench/block-bench.sh                # release build, 20 s per job
#   RUNTIME=60 SIZE=4G tests/bench/block-bench.sh
#
# Needs: fio (with the nbd engine), qemu-nbd, jq; run as root. Nothing here
# asserts a number: it measures and reports.
set -euo pipefail
cd "$(dirname "$0")/../.."

RUNTIME=${RUNTIME:-20}
SIZE=${SIZE:-2G}
OUT=${OUT:-$(mktemp -d /tmp/volumed-bench-XXXXXX)}
STATE=${STATE:-$OUT/cluster}
QEMU_ADDR=127.0.0.9
QEMU_PORT=10810

for v in http_proxy https_proxy HTTP_PROXY HTTPS_PROXY all_proxy ALL_PROXY; do unset "$v"; done
for t in fio qemu-nbd qemu-img jq; do
    command -v "$t" >/dev/null || { echo "block-bench: $t is missing (apt-get install fio qemu-utils jq)"; exit 1; }
done
fio --enghelp=nbd >/dev/null 2>&1 || { echo "block-bench: this fio has no nbd engine"; exit 1; }

echo "block-bench: building release binaries" >&2
cargo build --release --workspace --bins >&2
BIN=target/release
VOLCTL="$BIN/volctl --state-dir $STATE"

QEMU_PID=""
cleanup() {
    [ -n "$QEMU_PID" ] && kill "$QEMU_PID" 2>/dev/null || true
    $VOLCTL dev down >/dev/null 2>&1 || true
}
trap cleanup EXIT

echo "block-bench: starting a 3-node cluster in $STATE" >&2
$VOLCTL dev up --nodes 3 >&2
$VOLCTL volume create bench-r1 --size "$SIZE" --replicas 1 >&2
$VOLCTL volume create bench-r3 --size "$SIZE" --replicas 3 >&2
uri_of() { $VOLCTL -o json volume get "$1" | jq -r .nbd_uri; }
R1=$(uri_of bench-r1)
R3=$(uri_of bench-r3)

# The peer: qemu-nbd serving a raw file on the same filesystem as the
# cluster's data directories, with its default (writeback) cache — the same
# durability contract as volumed (data safe on FLUSH/FUA).
RAW="$STATE/qemu-raw.img"
qemu-img create -f raw "$RAW" "$SIZE" >/dev/null
qemu-nbd -f raw -x bench -b "$QEMU_ADDR" -p "$QEMU_PORT" --persistent --shared=8 "$RAW" &
QEMU_PID=$!
sleep 1
QEMU="nbd://$QEMU_ADDR:$QEMU_PORT/bench"

TARGETS=("qemu-nbd|$QEMU" "volumed R=1|$R1" "volumed R=3|$R3")

run_fio() { # name uri job rw bs iodepth
    local name=$1 uri=$2 job=$3 rw=$4 bs=$5 qd=$6
    local file="$OUT/$(echo "$name" | tr ' =' '__')-$job.json"
    fio --name="$job" --ioengine=nbd --uri="$uri" --rw="$rw" --bs="$bs" --iodepth="$qd" \
        --runtime="$RUNTIME" --time_based --ramp_time=3 --direct=1 --randrepeat=0 \
        --norandommap --group_reporting --output-format=json --output="$file" >/dev/null
    echo "$file"
}

# Fill every target first so reads touch real data (thin volumes would
# otherwise answer reads of unwritten blocks without touching storage).
for t in "${TARGETS[@]}"; do
    name=${t%%|*}; uri=${t#*|}
    echo "block-bench: filling $name" >&2
    fio --name=fill --ioengine=nbd --uri="$uri" --rw=write --bs=1M --iodepth=8 --direct=1 \
        --output-format=json --output="$OUT/fill-$(echo "$name" | tr ' =' '__').json" >/dev/null
done

JOBS=("randwrite-4k-qd32|randwrite|4k|32" "randread-4k-qd32|randread|4k|32"
      "randwrite-4k-qd1|randwrite|4k|1" "randread-4k-qd1|randread|4k|1"
      "seqwrite-1m|write|1M|8" "seqread-1m|read|1M|8")

declare -A RESULT
for j in "${JOBS[@]}"; do
    IFS='|' read -r job rw bs qd <<<"$j"
    for t in "${TARGETS[@]}"; do
        name=${t%%|*}; uri=${t#*|}
        echo "block-bench: $job on $name" >&2
        f=$(run_fio "$name" "$uri" "$job" "$rw" "$bs" "$qd")
        side=$([[ $rw == *write* ]] && echo write || echo read)
        iops=$(jq -r ".jobs[0].$side.iops" "$f")
        bw=$(jq -r ".jobs[0].$side.bw_bytes" "$f")
        p50=$(jq -r ".jobs[0].$side.clat_ns.percentile[\"50.000000\"] // 0" "$f")
        p99=$(jq -r ".jobs[0].$side.clat_ns.percentile[\"99.000000\"] // 0" "$f")
        RESULT["$job|$name"]="$iops|$bw|$p50|$p99"
    done
done

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.0f%%", 100 * a / b; else print "-" }'; }
fmt_iops() { awk -v a="$1" 'BEGIN { printf "%.0f", a }'; }
fmt_mbs() { awk -v a="$1" 'BEGIN { printf "%.0f", a / 1e6 }'; }
fmt_us() { awk -v a="$1" 'BEGIN { printf "%.0f", a / 1000 }'; }

echo
echo "fio over NBD, ${RUNTIME}s per job, volume size $SIZE, $(nproc) cores, $(date -u +%Y-%m-%d)"
echo
echo "| workload | qemu-nbd | volumed R=1 | R=1 / qemu | volumed R=3 | R=3 / qemu |"
echo "|---|---|---|---|---|---|"
for j in "${JOBS[@]}"; do
    IFS='|' read -r job rw bs qd <<<"$j"
    IFS='|' read -r qi qb q50 q99 <<<"${RESULT["$job|qemu-nbd"]}"
    IFS='|' read -r ai ab a50 a99 <<<"${RESULT["$job|volumed R=1"]}"
    IFS='|' read -r bi bb b50 b99 <<<"${RESULT["$job|volumed R=3"]}"
    if [ "$bs" = "1M" ]; then
        echo "| $job (MB/s) | $(fmt_mbs "$qb") | $(fmt_mbs "$ab") | $(ratio "$ab" "$qb") | $(fmt_mbs "$bb") | $(ratio "$bb" "$qb") |"
    else
        echo "| $job (IOPS) | $(fmt_iops "$qi") | $(fmt_iops "$ai") | $(ratio "$ai" "$qi") | $(fmt_iops "$bi") | $(ratio "$bi" "$qi") |"
    fi
    if [ "$qd" = "1" ]; then
        echo "| $job p50/p99 µs | $(fmt_us "$q50")/$(fmt_us "$q99") | $(fmt_us "$a50")/$(fmt_us "$a99") | | $(fmt_us "$b50")/$(fmt_us "$b99") | |"
    fi
done
echo
echo "raw fio JSON: $OUT"
