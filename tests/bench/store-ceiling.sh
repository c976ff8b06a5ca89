#!/usr/bin/env bash
# The ceiling of the storage design, next to qemu-nbd, in one run: fio's
# 1 MiB sequential and 4 KiB QD32 random writes against qemu-nbd serving a
# raw file, then the store_ceiling example (RocksDB opened as volumed opens
# it, taking block data with no NBD, Raft or lookups in the way). Prints
# each figure and its ratio to qemu-nbd.
#
#   tests/bench/store-ceiling.sh            (RT: seconds per run, default 15)
set -euo pipefail
for v in http_proxy https_proxy HTTP_PROXY HTTPS_PROXY all_proxy ALL_PROXY; do unset "$v"; done
cd "$(dirname "$0")/../.."
RT=${RT:-15}
cargo build --release -q -p volumed --example store_ceiling
DIR=$(mktemp -d /tmp/volumed-ceiling-XXXXXX)
QP=""
cleanup() {
    [ -n "$QP" ] && kill "$QP" 2>/dev/null || true
    rm -rf "$DIR"
}
trap cleanup EXIT
qemu-img create -f raw "$DIR/raw.img" 1G >/dev/null
qemu-nbd -f raw -x bench -b 127.0.0.9 -p 10813 --persistent --shared=8 "$DIR/raw.img" &
QP=$!
sleep 1
qemu_rate() { # rw bs qd -> bytes/s
    fio --name=j --ioengine=nbd --uri=nbd://127.0.0.9:10813/bench --rw="$1" --bs="$2" --iodepth="$3" \
        --runtime="$RT" --time_based --ramp_time=2 --direct=1 --norandommap --output-format=json \
        --output="$DIR/o.json" >/dev/null
    jq '.jobs[0].write.bw_bytes' "$DIR/o.json"
}
SEQ=$(qemu_rate write 1M 8)
RAND=$(qemu_rate randwrite 4k 32)
kill "$QP"
QP=""
echo "qemu-nbd seq (write 1M QD8): $((SEQ / 1000000)) MB/s"
echo "qemu-nbd rand (randwrite 4k QD32): $((RAND / 4096)) IOPS"
target/release/examples/store_ceiling "$RT" "$DIR" | while read -r pattern mode mb _ blocks _; do
    if [ "$pattern" = seq ]; then base=$SEQ; else base=$RAND; fi
    echo "$pattern ${mode%:}: $mb MB/s, $blocks blocks/s = $((mb * 100000000 / base))% of qemu-nbd"
done
