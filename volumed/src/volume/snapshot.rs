//! Moving a whole replica: the Raft snapshot stream that brings a new or
//! lagging replica up to date.
//!
//! The sender iterates the volume's block keys and sends every version
//! visible at the snapshot index, plus older versions that user snapshots
//! (as of that index) still read — so a rebuilt replica carries the
//! snapshots too. The receiver spools the stream to a file and then
//! installs it under an install marker (see `state_machine`), so a crash
//! mid-install is finished at the next start instead of leaving half a
//! volume.
//!
//! Record format: `block:u64 ‖ version:u64 ‖ len:u32 ‖ value` (big-endian),
//! where `value` is the stored form (crc ‖ data, or empty for a zero marker).

use std::collections::{BTreeSet, HashMap};
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::{BufMut, Bytes, BytesMut};
use futures::stream::BoxStream;
use futures::{Stream, StreamExt};
use openraft::Snapshot;
use rocksdb::{Direction, IteratorMode, ReadOptions, WriteBatch};
use tracing::{info, warn};

use super::blocks::{decode_value, BlockStore};
use super::command::VolumeTc;
use super::state_machine::{lock, SmShared, VolumeMeta};
use crate::raft::network::{SnapshotSource, SNAPSHOT_CHUNK};
use crate::storage::keys::{self, GroupId, CF_BLOCKS};
use crate::storage::log_store::NodeId;
use crate::storage::{decode, encode, StoreError};

/// What openraft carries around as "the snapshot".
#[derive(Debug)]
pub enum VolumeSnapshotData {
    /// Our own snapshot: an index, pinned while this value (or a stream of
    /// it) lives; data is read from RocksDB when sent.
    Local { index: u64, volume: VolumeMeta, pin: Arc<StreamPin> },
    /// A snapshot received from the leader, spooled to a file.
    Received { path: PathBuf, volume: VolumeMeta },
}

/// Bytes sent / total of snapshot transfers in progress, by target node.
#[derive(Debug, Default)]
pub struct TransferProgress {
    inner: Mutex<HashMap<NodeId, (u64, u64)>>,
}

impl TransferProgress {
    pub fn get(&self, node: NodeId) -> Option<(u64, u64)> {
        self.inner.lock().ok().and_then(|m| m.get(&node).copied())
    }
    fn set(&self, node: NodeId, done: u64, total: u64) {
        if let Ok(mut m) = self.inner.lock() {
            m.insert(node, (done, total.max(done)));
        }
    }
    pub fn clear(&self, node: NodeId) {
        if let Ok(mut m) = self.inner.lock() {
            m.remove(&node);
        }
    }
}

/// Streams this replica's snapshots to peers.
pub struct VolumeSnapshotSource {
    pub blocks: BlockStore,
    pub shared: Arc<Mutex<SmShared>>,
    pub progress: Arc<TransferProgress>,
    /// Bytes per second per transfer; 0 = unlimited.
    pub bandwidth: u64,
}

/// Keeps the versions visible at `index` from being collected.
#[derive(Debug)]
pub struct StreamPin {
    shared: Arc<Mutex<SmShared>>,
    index: u64,
}

impl StreamPin {
    /// Pins `index`; the caller holds the state-machine lock, so no write can
    /// collect a version between reading the index and pinning it.
    pub fn new(shared_locked: &mut SmShared, shared: Arc<Mutex<SmShared>>, index: u64) -> StreamPin {
        *shared_locked.stream_pins.entry(index).or_insert(0) += 1;
        StreamPin { shared, index }
    }
}

impl Drop for StreamPin {
    fn drop(&mut self) {
        let mut s = lock(&self.shared);
        if let Some(n) = s.stream_pins.get_mut(&self.index) {
            *n -= 1;
            if *n == 0 {
                s.stream_pins.remove(&self.index);
            }
        }
    }
}

impl SnapshotSource<VolumeTc> for VolumeSnapshotSource {
    fn open(
        &self,
        snapshot: &Snapshot<VolumeTc>,
        target: NodeId,
    ) -> Result<(Vec<u8>, BoxStream<'static, Result<Bytes, String>>), String> {
        let VolumeSnapshotData::Local { index, ref volume, ref pin } = *snapshot.snapshot else {
            return Err("only local snapshots can be sent".into());
        };
        let (volume, pin) = (volume.clone(), pin.clone());
        let header = encode(&volume).map_err(|e| e.to_string())?;
        let total = volume.live_blocks * (super::command::BLOCK_SIZE + 24);
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, String>>(4);
        let blocks = self.blocks.clone();
        let progress = self.progress.clone();
        let pace = Pace::new(self.bandwidth);
        let group = blocks.group();
        progress.set(target, 0, total);
        std::thread::Builder::new()
            .name(format!("snap-send-{}", &group.to_string()[..8]))
            .spawn(move || {
                let _pin = pin;
                let mut pins: BTreeSet<u64> = volume.snapshot_pins.clone();
                pins.insert(index);
                let result = scan_visible(&blocks, index, &pins, |chunk, sent| {
                    progress.set(target, sent, total);
                    pace.wait(sent);
                    tx.blocking_send(Ok(chunk)).is_ok()
                });
                // The transfer is over either way: a progress entry left
                // behind would show the target as rebuilding forever (and
                // keep the catalog from closing the rebuild).
                progress.clear(target);
                match result {
                    Ok(sent) => info!(volume = %group, target, index, bytes = sent, "snapshot sent"),
                    Err(e) => {
                        warn!(volume = %group, target, index, error = %e, "snapshot stream failed");
                        let _ = tx.blocking_send(Err(e.to_string()));
                    }
                }
            })
            .map_err(|e| e.to_string())?;
        Ok((header, Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }
}

/// Paces a transfer to a byte rate: after `sent` bytes it sleeps until
/// `sent / rate` seconds after the start, so bursts average out over the
/// whole transfer rather than per chunk.
struct Pace {
    rate: u64,
    start: std::time::Instant,
}

impl Pace {
    fn new(rate: u64) -> Pace {
        Pace { rate, start: std::time::Instant::now() }
    }

    /// Runs on the sender's own thread: sleeping blocks nothing else.
    fn wait(&self, sent: u64) {
        if self.rate == 0 {
            return;
        }
        let due = std::time::Duration::from_secs_f64(sent as f64 / self.rate as f64);
        if let Some(ahead) = due.checked_sub(self.start.elapsed()) {
            std::thread::sleep(ahead);
        }
    }
}

/// Iterates the versions a snapshot at `index` must carry and hands them
/// out in chunks. Returns the bytes produced. `emit` returns false when the
/// receiver went away.
fn scan_visible(
    blocks: &BlockStore,
    index: u64,
    pins: &BTreeSet<u64>,
    mut emit: impl FnMut(Bytes, u64) -> bool,
) -> Result<u64, StoreError> {
    let group = blocks.group();
    let store = blocks.store();
    let cf = store.cf(CF_BLOCKS)?;
    let (start, end) = keys::group_range(group);
    let mut ro = ReadOptions::default();
    ro.set_iterate_upper_bound(end);
    ro.set_total_order_seek(true);
    // A consistent view: versions written while we stream are newer than
    // `index` and skipped anyway, but GC of versions pinned by nothing but
    // a user snapshot deleted meanwhile must not tear a block's chain.
    let snap = store.db().snapshot();
    ro.set_snapshot(&snap);
    let it = store.db().iterator_cf_opt(&cf, ro, IteratorMode::From(&start, Direction::Forward));
    let mut buf = BytesMut::with_capacity(SNAPSHOT_CHUNK + 8192);
    let mut sent = 0u64;
    let mut cur_block = None;
    let mut newer = u64::MAX;
    for item in it {
        let (k, v) = item?;
        let Some((g, block, version)) = keys::parse_block_key(&k) else { continue };
        if g != group {
            break;
        }
        if cur_block != Some(block) {
            cur_block = Some(block);
            newer = u64::MAX;
        }
        let keep = version <= index && pins.range(version..newer).next().is_some();
        newer = version;
        if !keep {
            continue;
        }
        if !v.is_empty() && decode_value(&v).is_none() {
            return Err(StoreError::Corrupt {
                what: format!("block {block} version {version}"),
                detail: "checksum mismatch while sending a snapshot; scrub the volume".into(),
            });
        }
        buf.put_u64(block);
        buf.put_u64(version);
        buf.put_u32(v.len() as u32);
        buf.put_slice(&v);
        if buf.len() >= SNAPSHOT_CHUNK {
            sent += buf.len() as u64;
            if !emit(buf.split().freeze(), sent) {
                return Ok(sent);
            }
        }
    }
    if !buf.is_empty() {
        sent += buf.len() as u64;
        emit(buf.split().freeze(), sent);
    }
    Ok(sent)
}

#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    #[error("snapshot file {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("snapshot stream broken: {0}")]
    Stream(String),
    #[error("snapshot stream ended before its last chunk")]
    Truncated,
}

/// Spools a snapshot stream to `<dir>/<group>-<index>.snap`. The stream
/// yields `(data, last)`.
pub async fn receive_to_file<S>(dir: &Path, group: GroupId, index: u64, mut stream: S) -> Result<PathBuf, ReceiveError>
where
    S: Stream<Item = Result<(Bytes, bool), String>> + Unpin,
{
    let path = dir.join(format!("{group}-{index}.snap"));
    let io = |source| ReceiveError::Io { path: path.clone(), source };
    tokio::fs::create_dir_all(dir).await.map_err(io)?;
    let file = tokio::fs::File::create(&path).await.map_err(io)?;
    let mut w = tokio::io::BufWriter::with_capacity(1 << 20, file);
    use tokio::io::AsyncWriteExt;
    let mut complete = false;
    while let Some(item) = stream.next().await {
        let (data, last) = item.map_err(ReceiveError::Stream)?;
        w.write_all(&data).await.map_err(io)?;
        if last {
            complete = true;
            break;
        }
    }
    if !complete {
        let _ = tokio::fs::remove_file(&path).await;
        return Err(ReceiveError::Truncated);
    }
    w.flush().await.map_err(io)?;
    // The file is the only copy of the data during install: make it durable.
    w.get_ref().sync_all().await.map_err(io)?;
    Ok(path)
}

/// Writes every record of a spooled snapshot into the volume's keys. The
/// caller has cleared them and writes the final, synced batch.
pub fn load_file_into(blocks: &BlockStore, path: &Path) -> Result<(), StoreError> {
    let group = blocks.group();
    let store = blocks.store();
    let cf = store.cf(CF_BLOCKS)?;
    let corrupt = |detail: String| StoreError::Corrupt { what: format!("snapshot file {}", path.display()), detail };
    let file = std::fs::File::open(path).map_err(|e| corrupt(e.to_string()))?;
    let mut r = BufReader::with_capacity(1 << 20, file);
    let mut batch = WriteBatch::default();
    let mut batch_bytes = 0usize;
    let mut head = [0u8; 20];
    loop {
        match r.read_exact(&mut head) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(corrupt(e.to_string())),
        }
        let block = u64::from_be_bytes(head[0..8].try_into().map_err(|_| corrupt("header".into()))?);
        let version = u64::from_be_bytes(head[8..16].try_into().map_err(|_| corrupt("header".into()))?);
        let len = u32::from_be_bytes(head[16..20].try_into().map_err(|_| corrupt("header".into()))?) as usize;
        if len > 8192 {
            return Err(corrupt(format!("record of {len} bytes")));
        }
        let mut value = vec![0u8; len];
        r.read_exact(&mut value).map_err(|e| corrupt(e.to_string()))?;
        if !value.is_empty() && decode_value(&value).is_none() {
            return Err(corrupt(format!("block {block} version {version} fails its checksum")));
        }
        batch.put_cf(&cf, keys::block_key(group, block, version), &value);
        batch_bytes += 20 + len;
        if batch_bytes >= 8 << 20 {
            store.write(std::mem::take(&mut batch))?;
            batch_bytes = 0;
        }
    }
    store.write(batch)?;
    Ok(())
}

/// Decodes the header of a volume snapshot stream.
pub fn decode_header(extra: &[u8]) -> Result<VolumeMeta, StoreError> {
    decode("volume snapshot header", extra)
}

/// Writes a snapshot file directly (tests and tools).
pub fn write_records(path: &Path, records: &[(u64, u64, Vec<u8>)]) -> std::io::Result<()> {
    let mut w = BufWriter::new(std::fs::File::create(path)?);
    for (block, version, value) in records {
        w.write_all(&block.to_be_bytes())?;
        w.write_all(&version.to_be_bytes())?;
        w.write_all(&(value.len() as u32).to_be_bytes())?;
        w.write_all(value)?;
    }
    w.flush()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volume::blocks::{EntryWriter, Pins, Stored, BS};

    #[test]
    fn pace_holds_a_transfer_to_its_rate_and_unlimited_never_waits() {
        // 1 MiB at 8 MiB/s is due 125 ms after the start: wait() may not
        // return earlier (a lower bound only; sleeping longer is allowed).
        let pace = Pace::new(8 << 20);
        pace.wait(1 << 20);
        assert!(pace.start.elapsed() >= std::time::Duration::from_millis(125));
        let free = Pace::new(0);
        free.wait(u64::MAX);
    }

    #[test]
    fn stream_carries_visible_and_user_pinned_versions_only() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::storage::Store::open(dir.path()).unwrap();
        let bs = BlockStore::new(store, GroupId(uuid::Uuid::new_v4()));
        let write = |version: u64, pins: &Pins, block: u64, byte: u8| {
            let mut w = EntryWriter::new(&bs, version, pins);
            w.write(block * 4096, &[byte; BS]).unwrap();
            bs.store().write(w.into_batch()).unwrap();
        };
        // Pins: user snapshot at 12, Raft snapshot at 25.
        let pins: Pins = [12, 25].into();
        write(10, &pins, 0, 1); // visible at 12
        write(20, &pins, 0, 2); // visible at 25
        write(30, &pins, 0, 3); // after the snapshot index
        write(11, &pins, 1, 4);
        let mut chunks = Vec::new();
        let user: BTreeSet<u64> = [12, 25].into();
        scan_visible(&bs, 25, &user, |c, _| {
            chunks.push(c);
            true
        })
        .unwrap();
        let path = dir.path().join("s.snap");
        std::fs::write(&path, chunks.concat()).unwrap();

        let other = BlockStore::new(bs.store().clone(), GroupId(uuid::Uuid::new_v4()));
        load_file_into(&other, &path).unwrap();
        assert_eq!(other.versions(0).unwrap(), vec![(20, false), (10, false)]);
        assert_eq!(other.read_at(0, 12).unwrap().unwrap().1, Stored::Data(vec![1; BS]));
        assert_eq!(other.read_at(0, u64::MAX).unwrap().unwrap().1, Stored::Data(vec![2; BS]));
        assert_eq!(other.versions(1).unwrap(), vec![(11, false)]);
    }

    #[test]
    fn corrupt_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::storage::Store::open(dir.path()).unwrap();
        let bs = BlockStore::new(store, GroupId(uuid::Uuid::new_v4()));
        let mut value = super::super::blocks::encode_value(&[5u8; BS]);
        value[10] ^= 1;
        let path = dir.path().join("bad.snap");
        write_records(&path, &[(0, 1, value)]).unwrap();
        assert!(load_file_into(&bs, &path).is_err());
    }
}
