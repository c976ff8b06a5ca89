#!/usr/bin/env bash
# pjdfstest (the Rust port, crates.io `pjdfstest`) on a FUSE mount of an
# R=3 file volume of a local 3-node cluster. Prints pjdfstest's summary;
# exit status is pjdfstest's.
#
#   tests/bench/file-pjdfstest.sh                       # release build
#   BIN=/work/target-file/debug tests/bench/file-pjdfstest.sh
#
# Installs pjdfstest 0.2.2 with `cargo install` into $OUT/pjdfstest once
# (PJDFSTEST=/path/to/pjdfstest to use another). Needs the users nobody
# and daemon (present on Debian). Enabled features: utimensat, utime_now,
# rename_ctime; not: posix_fallocate (file volumes are thin), remounts,
# a secondary filesystem. Run as root.
set -euo pipefail
cd "$(dirname "$0")/../.."

OUT=${OUT:-$(mktemp -d /tmp/volumed-pjdfstest-XXXXXX)}
STATE=${STATE:-$OUT/cluster}
FIRST_IP=${FIRST_IP:-127.0.79.2}

if [ -z "${PJDFSTEST:-}" ]; then
    cargo install pjdfstest --version 0.2.2 --root "$OUT/pjdfstest" >&2
    PJDFSTEST=$OUT/pjdfstest/bin/pjdfstest
fi
for v in http_proxy https_proxy HTTP_PROXY HTTPS_PROXY all_proxy ALL_PROXY; do unset "$v"; done
if [ -z "${BIN:-}" ]; then
    cargo build --release -p volumed -p volctl --bins >&2
    BIN=target/release
fi
VOLCTL="$BIN/volctl --state-dir $STATE"
MNT=$OUT/mnt
mkdir -p "$MNT"
cleanup() {
    $VOLCTL volume unmount "$MNT" >/dev/null 2>&1 || umount -l "$MNT" 2>/dev/null || true
    $VOLCTL dev down >/dev/null 2>&1 || true
    echo "file-pjdfstest: log and cluster state in $OUT" >&2
}
trap cleanup EXIT

$VOLCTL dev up --nodes 3 --no-csi --first-ip "$FIRST_IP" --volumed-bin "$BIN/volumed" >&2
$VOLCTL volume create pjd --size 4Gi --replicas 3 --kind file >&2
$VOLCTL volume mount pjd "$MNT" >&2
mkdir -p "$MNT/t"
chmod 777 "$MNT/t"
cat > "$OUT/pjdfstest.toml" <<'TOML'
[features]
utimensat = {}
utime_now = {}
rename_ctime = {}

[settings]
naptime = 0.001
allow_remount = false
expected_failures = []

[dummy_auth]
entries = [["nobody", "nogroup"], ["daemon", "daemon"]]
TOML
"$PJDFSTEST" -c "$OUT/pjdfstest.toml" -p "$MNT/t" | tee "$OUT/pjdfstest.log" | tail -1
