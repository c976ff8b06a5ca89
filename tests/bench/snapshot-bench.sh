#!/usr/bin/env bash
# Snapshot creation time: an empty 1 GiB volume against a filled 8 GiB one,
# both R=3 on a local 3-node cluster. A snapshot is one command in the
# volume's Raft log (no data is copied), so both should cost the same.
# Prints the median, min and max of REPS timed `volctl snapshot create`
# calls per volume (wall time of the whole CLI call: process start,
# connect, the catalog write, the cut in the volume group, the catalog
# write of the cut), and the same for `volctl snapshot get` as the
# baseline cost of a CLI round trip.
#
#   tests/bench/snapshot-bench.sh                         # release build
#   BIN=/work/target-csi/debug tests/bench/snapshot-bench.sh
#   REPS=20 STRIDE=1 tests/bench/snapshot-bench.sh        # fill every block
#
# STRIDE=N writes one 64 KiB extent in every N x 64 KiB over the whole
# 8 GiB volume (STRIDE=1: all 8 GiB; needs 3 x 8 GiB of free disk for R=3,
# plus the Raft log until it is compacted). The default, 8, writes 1 GiB
# spread over the whole volume: 262144 4-KiB blocks, every part of the
# volume's key range populated. Needs fio (nbd engine) and jq; run as root. Nothing here
# asserts a number: it measures and reports.
set -euo pipefail
cd "$(dirname "$0")/../.."

REPS=${REPS:-10}
STRIDE=${STRIDE:-8}
OUT=${OUT:-$(mktemp -d /tmp/volumed-snapbench-XXXXXX)}
STATE=${STATE:-$OUT/cluster}
FIRST_IP=${FIRST_IP:-127.0.77.2}

for v in http_proxy https_proxy HTTP_PROXY HTTPS_PROXY all_proxy ALL_PROXY; do unset "$v"; done
for t in fio jq; do
    command -v "$t" >/dev/null || { echo "snapshot-bench: $t is missing (apt-get install fio jq)"; exit 1; }
done
fio --enghelp=nbd >/dev/null 2>&1 || { echo "snapshot-bench: this fio has no nbd engine"; exit 1; }

if [ -z "${BIN:-}" ]; then
    echo "snapshot-bench: building release binaries (volumed, volctl)" >&2
    cargo build --release -p volumed -p volctl --bins >&2
    BIN=target/release
fi
VOLCTL="$BIN/volctl --state-dir $STATE"

cleanup() { $VOLCTL dev down >/dev/null 2>&1 || true; }
trap cleanup EXIT

echo "snapshot-bench: starting a 3-node cluster in $STATE ($FIRST_IP...)" >&2
$VOLCTL dev up --nodes 3 --no-csi --first-ip "$FIRST_IP" --volumed-bin "$BIN/volumed" >&2
$VOLCTL volume create sb-empty-1g --size 1Gi --replicas 3 >&2
$VOLCTL volume create sb-filled-8g --size 8Gi --replicas 3 >&2

uri=$($VOLCTL -o json volume get sb-filled-8g | jq -r .nbd_uri)
skip=$(( (STRIDE - 1) * 64 ))
rw=write
[ "$skip" -gt 0 ] && rw="write:${skip}k"
echo "snapshot-bench: filling sb-filled-8g over $uri (one 64 KiB extent in $STRIDE)" >&2
start=$(date +%s)
# io_size: one pass over the 8 GiB (fio would otherwise wrap around until
# it wrote 8 GiB).
fio --name=fill --ioengine=nbd --uri="$uri" --rw="$rw" --bs=64k --iodepth=16 --size=8G \
    --io_size=$(( (8 << 30) / STRIDE )) --direct=1 --output-format=json --output="$OUT/fill.json" >/dev/null
written=$(jq -r '.jobs[0].write.io_bytes' "$OUT/fill.json")
echo "snapshot-bench: wrote $written bytes in $(( $(date +%s) - start )) s" >&2
used_empty=$($VOLCTL -o json volume get sb-empty-1g | jq -r .used_bytes)
used_filled=$($VOLCTL -o json volume get sb-filled-8g | jq -r .used_bytes)

# Milliseconds of one command (wall time).
timed() {
    local t0 t1
    t0=$(date +%s%N)
    "$@" >/dev/null
    t1=$(date +%s%N)
    echo $(( (t1 - t0) / 1000000 ))
}

declare -A MS
for i in $(seq 1 "$REPS"); do
    # Interleaved, so drift (compactions, other load) hits both alike.
    for v in sb-empty-1g sb-filled-8g; do
        MS[$v]+="$(timed $VOLCTL snapshot create "$v-s$i" --volume "$v") "
    done
    MS[get]+="$(timed $VOLCTL snapshot get "sb-empty-1g-s$i") "
done

stats() { # "a b c ..." -> "median min max"
    tr ' ' '\n' <<<"$1" | grep -v '^$' | sort -n | awk '
        { v[NR] = $1 }
        END { m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2; printf "%s %s %s", m, v[1], v[NR] }'
}

read -r e_med e_min e_max <<<"$(stats "${MS[sb-empty-1g]}")"
read -r f_med f_min f_max <<<"$(stats "${MS[sb-filled-8g]}")"
read -r g_med g_min g_max <<<"$(stats "${MS[get]}")"
ratio=$(awk -v a="$f_med" -v b="$e_med" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "-" }')

echo
echo "snapshot creation, R=3, 3 nodes on one host, $(nproc) cores, $REPS runs each, $(date -u +%Y-%m-%d), binaries: $BIN"
echo
echo "| volume | data in the volume | median ms | min ms | max ms |"
echo "|---|---|---|---|---|"
echo "| 1 GiB, empty | $used_empty B | $e_med | $e_min | $e_max |"
echo "| 8 GiB, filled (64 KiB in every $(( STRIDE * 64 )) KiB) | $used_filled B | $f_med | $f_min | $f_max |"
echo "| baseline: \`volctl snapshot get\` | - | $g_med | $g_min | $g_max |"
echo
echo "filled / empty (medians): $ratio"
echo "raw times (ms): empty: ${MS[sb-empty-1g]}| filled: ${MS[sb-filled-8g]}| get: ${MS[get]}"
echo "fio fill JSON: $OUT/fill.json"
