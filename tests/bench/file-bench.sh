#!/usr/bin/env bash
# Shared file volumes (kind=file): small-file create rate and 1 MiB
# sequential write / read throughput on a FUSE mount of an R=3 volume of a
# local 3-node cluster, against a local directory and a FUSE passthrough
# of a local directory (bindfs). Nothing here asserts a number: it
# measures and reports a table.
#
#   tests/bench/file-bench.sh                          # release build
#   BIN=/work/target-file/debug tests/bench/file-bench.sh
#   FILES=2000 SEQ_MB=512 tests/bench/file-bench.sh
#
# Small files: FILES files of 4 KiB written by `cp -r` of a prepared tree
# (create, write, close: what an unpack does), once by one cp and once by
# 8 cp processes in parallel (each an eighth of the tree), which
# shows the leader batching concurrent operations into one log entry. Sequential: dd of SEQ_MB
# MiB in 1 MiB blocks with conv=fsync (write), then a read with the page
# cache dropped (echo 3 > drop_caches). Run as root; needs bindfs
# (apt-get install bindfs) for the FUSE-passthrough baseline.
set -euo pipefail
cd "$(dirname "$0")/../.."

FILES=${FILES:-1000}
SEQ_MB=${SEQ_MB:-256}
KEEP_OUT=${OUT:+1}
OUT=${OUT:-$(mktemp -d /tmp/volumed-filebench-XXXXXX)}
STATE=${STATE:-$OUT/cluster}
FIRST_IP=${FIRST_IP:-127.0.78.2}

for v in http_proxy https_proxy HTTP_PROXY HTTPS_PROXY all_proxy ALL_PROXY; do unset "$v"; done
command -v bindfs >/dev/null || { echo "file-bench: bindfs is missing (apt-get install bindfs)"; exit 1; }

if [ -z "${BIN:-}" ]; then
    echo "file-bench: building release binaries (volumed, volctl)" >&2
    cargo build --release -p volumed -p volctl --bins >&2
    BIN=target/release
fi
VOLCTL="$BIN/volctl --state-dir $STATE"
LOCAL="$OUT/local"
BACKING="$OUT/backing"
PASS="$OUT/passthrough"
VOL="$OUT/volume"
mkdir -p "$LOCAL" "$BACKING" "$PASS" "$VOL" "$OUT/src"

cleanup() {
    umount "$PASS" 2>/dev/null || true
    $VOLCTL volume unmount "$VOL" >/dev/null 2>&1 || umount -l "$VOL" 2>/dev/null || true
    $VOLCTL dev down >/dev/null 2>&1 || true
    [ -n "$KEEP_OUT" ] || rm -rf "$OUT"
}
trap cleanup EXIT

echo "file-bench: starting a 3-node cluster in $STATE ($FIRST_IP...)" >&2
$VOLCTL dev up --nodes 3 --no-csi --first-ip "$FIRST_IP" --volumed-bin "$BIN/volumed" >&2
$VOLCTL volume create fb-shared --size 8Gi --replicas 3 --kind file >&2
$VOLCTL volume mount fb-shared "$VOL" >&2
bindfs "$BACKING" "$PASS"

# The small-file source tree: FILES files of 4 KiB in 8 directories.
for d in $(seq 0 7); do mkdir -p "$OUT/src/d$d"; done
head -c 4096 /dev/urandom > "$OUT/one"
for i in $(seq 1 "$FILES"); do cp "$OUT/one" "$OUT/src/d$((i % 8))/f$i"; done

ms() { echo $(( ($(date +%s%N) - $1) / 1000000 )); }

run() { # name dir
    local name=$1 dir=$2 t0 create_ms par_ms write_ms read_ms
    sync
    t0=$(date +%s%N)
    cp -r "$OUT/src" "$dir/small"
    sync -f "$dir/small" 2>/dev/null || sync
    create_ms=$(ms "$t0")
    mkdir "$dir/par"
    t0=$(date +%s%N)
    for d in $(seq 0 7); do cp -r "$OUT/src/d$d" "$dir/par/" & done
    wait
    sync -f "$dir/par" 2>/dev/null || sync
    par_ms=$(ms "$t0")
    t0=$(date +%s%N)
    dd if=/dev/zero of="$dir/seq" bs=1M count="$SEQ_MB" conv=fsync status=none
    write_ms=$(ms "$t0")
    echo 3 > /proc/sys/vm/drop_caches
    t0=$(date +%s%N)
    dd if="$dir/seq" of=/dev/null bs=1M status=none
    read_ms=$(ms "$t0")
    printf '%-22s %10d %12d %12d %12d\n' "$name" \
        $(( FILES * 1000 / (create_ms > 0 ? create_ms : 1) )) \
        $(( FILES * 1000 / (par_ms > 0 ? par_ms : 1) )) \
        $(( SEQ_MB * 1000 / (write_ms > 0 ? write_ms : 1) )) \
        $(( SEQ_MB * 1000 / (read_ms > 0 ? read_ms : 1) ))
    rm -rf "$dir/small" "$dir/par" "$dir/seq"
}

echo
echo "files: $FILES x 4 KiB (cp -r), sequential: $SEQ_MB MiB in 1 MiB blocks (dd, conv=fsync; read after drop_caches)"
printf '%-22s %10s %12s %12s %12s\n' "target" "files/s" "files/s x8" "write MB/s" "read MB/s"
run "local directory" "$LOCAL"
run "FUSE passthrough" "$PASS"
run "volumed file R=3" "$VOL"
