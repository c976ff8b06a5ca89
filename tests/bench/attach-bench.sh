#!/usr/bin/env bash
# Attached-device benchmark (issue 3): fio on the block device volumed
# attaches on a node (FUSE+loop here), raw with direct I/O and on a file in
# ext4 on it, for R=1 and R=3, next to
#   - qemu-nbd behind the very same FUSE+loop frontend and NBD client
#     (tests/src/bin/nbd-fuse-loop.rs): what the frontend costs by itself;
#   - a loop device (direct I/O) over a raw file: the local limit.
# Prints a markdown table with the ratios and keeps fio's JSON under $OUT.
#
#   tests/bench/attach-bench.sh              # 10 s per job, 1 GiB volumes
#   RUNTIME=30 SIZE=2G tests/bench/attach-bench.sh
#
# block-bench.sh (NBD level) may call this script; it runs on its own too.
# Needs: fio, qemu-nbd, qemu-img, jq, mkfs.ext4, losetup; run as root.
# Nothing here asserts a number: it measures and reports.
set -euo pipefail
cd "$(dirname "$0")/../.."

RUNTIME=${RUNTIME:-10}
SIZE=${SIZE:-1G}
FILE_SIZE=${FILE_SIZE:-512M}
OUT=${OUT:-$(mktemp -d /tmp/volumed-attach-bench-XXXXXX)}
STATE=${STATE:-$OUT/cluster}
QEMU_ADDR=127.0.0.9
QEMU_PORT=10811

for v in http_proxy https_proxy HTTP_PROXY HTTPS_PROXY all_proxy ALL_PROXY; do unset "$v"; done
for t in fio qemu-nbd qemu-img jq mkfs.ext4 losetup; do
    command -v "$t" >/dev/null || { echo "attach-bench: $t is missing (apt-get install fio qemu-utils jq e2fsprogs mount)"; exit 1; }
done
[ "$(id -u)" = 0 ] || { echo "attach-bench: run as root (loop devices, FUSE, mounts)"; exit 1; }

if [ -z "${SKIP_BUILD:-}" ]; then
    echo "attach-bench: building release binaries" >&2
    cargo build --release -p volumed -p volctl --bins >&2
    cargo build --release -p volumed-tests --bin nbd-fuse-loop >&2
fi
BIN=target/release
VOLCTL="$BIN/volctl --state-dir $STATE"
mkdir -p "$OUT"

QEMU_PID=""
HELPER_PID=""
LOCAL_LOOP=""
MOUNTS=()
ATTACHED=()
cleanup() {
    set +e
    for m in "${MOUNTS[@]}"; do [ -n "$m" ] && { umount "$m" 2>/dev/null || umount -l "$m"; }; done
    for v in "${ATTACHED[@]}"; do $VOLCTL volume detach "$v" >/dev/null 2>&1; done
    if [ -n "$HELPER_PID" ]; then kill -TERM "$HELPER_PID" 2>/dev/null; wait "$HELPER_PID" 2>/dev/null; fi
    [ -n "$LOCAL_LOOP" ] && losetup -d "$LOCAL_LOOP" 2>/dev/null
    [ -n "$QEMU_PID" ] && kill "$QEMU_PID" 2>/dev/null
    $VOLCTL dev down >/dev/null 2>&1
}
trap cleanup EXIT

echo "attach-bench: starting a 3-node cluster in $STATE" >&2
$VOLCTL dev up --nodes 3 >&2
$VOLCTL volume create abench-r1 --size "$SIZE" --replicas 1 >&2
$VOLCTL volume create abench-r3 --size "$SIZE" --replicas 3 >&2
attach() {
    local dev
    dev=$($VOLCTL -o json volume attach "$1" | jq -r .device)
    ATTACHED+=("$1")
    echo "$dev"
}
R1_DEV=$(attach abench-r1)
R3_DEV=$(attach abench-r3)

# qemu-nbd on a raw file of the same filesystem, behind the same frontend.
RAW="$OUT/qemu-raw.img"
qemu-img create -f raw "$RAW" "$SIZE" >/dev/null
qemu-nbd -f raw -x bench -b "$QEMU_ADDR" -p "$QEMU_PORT" --persistent --shared=8 "$RAW" &
QEMU_PID=$!
sleep 1
exec 3< <("$BIN/nbd-fuse-loop" "$QEMU_ADDR:$QEMU_PORT" bench "$OUT/helper-run")
HELPER_PID=$!
read -r QEMU_DEV <&3

# The local limit: a loop device with direct I/O over a raw file.
LOCAL_RAW="$OUT/local-raw.img"
truncate -s "$SIZE" "$LOCAL_RAW"
LOCAL_LOOP=$(losetup --direct-io=on -f --show "$LOCAL_RAW")

TARGETS=("loop over a file|$LOCAL_LOOP" "qemu-nbd via FUSE+loop|$QEMU_DEV" "volumed R=1|$R1_DEV" "volumed R=3|$R3_DEV")
echo "attach-bench: devices: ${TARGETS[*]}" >&2

JOBS=("randwrite-4k-qd32|randwrite|4k|32" "randread-4k-qd32|randread|4k|32"
      "randwrite-4k-qd1|randwrite|4k|1" "randread-4k-qd1|randread|4k|1"
      "seqwrite-1m|write|1M|8" "seqread-1m|read|1M|8")

declare -A RESULT
slug() { echo "$1" | tr ' =+/' '____'; }
run_jobs() { # layer target-name filename size
    local layer=$1 name=$2 file=$3 size=$4
    for j in "${JOBS[@]}"; do
        IFS='|' read -r job rw bs qd <<<"$j"
        echo "attach-bench: $layer $job on $name" >&2
        local out="$OUT/$(slug "$name")-$layer-$job.json"
        fio --name="$job" --filename="$file" --size="$size" --ioengine=libaio --rw="$rw" --bs="$bs" \
            --iodepth="$qd" --direct=1 --runtime="$RUNTIME" --time_based --ramp_time=2 --randrepeat=0 \
            --norandommap --group_reporting --output-format=json --output="$out" >/dev/null
        local side
        side=$([[ $rw == *write* ]] && echo write || echo read)
        RESULT["$layer|$job|$name"]="$(jq -r ".jobs[0].$side.iops" "$out")|$(jq -r ".jobs[0].$side.bw_bytes" "$out")|$(jq -r ".jobs[0].$side.clat_ns.percentile[\"50.000000\"] // 0" "$out")|$(jq -r ".jobs[0].$side.clat_ns.percentile[\"99.000000\"] // 0" "$out")"
    done
}

for t in "${TARGETS[@]}"; do
    name=${t%%|*}; dev=${t#*|}
    # Fill first so reads touch stored data (thin volumes answer unwritten
    # blocks without touching storage).
    echo "attach-bench: filling $name ($dev)" >&2
    fio --name=fill --filename="$dev" --ioengine=libaio --rw=write --bs=1M --iodepth=8 --direct=1 \
        --output-format=json --output="$OUT/fill-$(slug "$name").json" >/dev/null
    run_jobs raw "$name" "$dev" "$SIZE"
    mnt="$OUT/mnt-$(slug "$name")"
    mkdir -p "$mnt"
    mkfs.ext4 -q -F "$dev"
    mount "$dev" "$mnt"
    MOUNTS+=("$mnt")
    fio --name=layout --filename="$mnt/fio.dat" --size="$FILE_SIZE" --rw=write --bs=1M --direct=1 \
        --ioengine=libaio --iodepth=8 --output-format=json --output="$OUT/layout-$(slug "$name").json" >/dev/null
    run_jobs ext4 "$name" "$mnt/fio.dat" "$FILE_SIZE"
    umount "$mnt"
    MOUNTS=()
done

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.0f%%", 100 * a / b; else print "-" }'; }
val() { # layer job name -> iops or MB/s
    local r=${RESULT["$1|$2|$3"]}
    IFS='|' read -r iops bw p50 p99 <<<"$r"
    if [[ $2 == seq* ]]; then awk -v a="$bw" 'BEGIN { printf "%.0f", a / 1e6 }'; else awk -v a="$iops" 'BEGIN { printf "%.0f", a }'; fi
}
lat() { # layer job name -> p50/p99 µs
    IFS='|' read -r iops bw p50 p99 <<<"${RESULT["$1|$2|$3"]}"
    awk -v a="$p50" -v b="$p99" 'BEGIN { printf "%.0f/%.0f", a / 1000, b / 1000 }'
}

L="loop over a file"; Q="qemu-nbd via FUSE+loop"; A="volumed R=1"; B="volumed R=3"
echo
echo "fio (libaio, direct) on the attached device, ${RUNTIME}s per job, $SIZE devices, ext4 file $FILE_SIZE, $(nproc) cores, $(date -u +%Y-%m-%d)"
echo
echo "| layer | workload | loop/file (local limit) | qemu-nbd via FUSE+loop | volumed R=1 | R=1 / qemu path | volumed R=3 | R=3 / qemu path | R=1 / local |"
echo "|---|---|---|---|---|---|---|---|---|"
for layer in raw ext4; do
    for j in "${JOBS[@]}"; do
        IFS='|' read -r job rw bs qd <<<"$j"
        unit=$([[ $job == seq* ]] && echo "MB/s" || echo "IOPS")
        l=$(val $layer "$job" "$L"); q=$(val $layer "$job" "$Q"); a=$(val $layer "$job" "$A"); b=$(val $layer "$job" "$B")
        echo "| $layer | $job ($unit) | $l | $q | $a | $(ratio "$a" "$q") | $b | $(ratio "$b" "$q") | $(ratio "$a" "$l") |"
        if [ "$qd" = "1" ]; then
            echo "| $layer | $job p50/p99 µs | $(lat $layer "$job" "$L") | $(lat $layer "$job" "$Q") | $(lat $layer "$job" "$A") | | $(lat $layer "$job" "$B") | | |"
        fi
    done
done
echo
echo "raw fio JSON: $OUT"
