//! Restore and clone: filling a new volume from another volume's snapshot.
//!
//! The new volume is an ordinary group, placed anywhere. Its leader reads
//! the snapshot from a replica of the source volume (`ReadSnapshot`, served
//! here by [`serve`]) and writes what it gets through its own log as
//! `Hydrate` entries, each carrying the copy's cursor, so every replica
//! holds an independent copy and a new leader resumes where the last one
//! stopped. Until the copy finishes the volume refuses I/O; the catalog
//! keeps the source snapshot (and its volume's group) alive meanwhile.
//!
//! A file volume's copy covers its reserved ranges too (inodes, directory
//! buckets, counters: everything below the open-handle records), with
//! values shorter than a block. Open-handle records belong to the source's
//! mount sessions, which do not exist in the copy: they are not copied,
//! and inodes unlinked while open (kept only for those handles) are left
//! out with their data, the counters adjusted to match.

use std::sync::Arc;
use std::time::Duration;

use std::collections::BTreeMap;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures::stream::BoxStream;
use tracing::{info, warn};
use volumed_proto::volumed::v1::{ReadSnapshotChunk, ReadSnapshotRequest};

use super::blocks::{decode_value, BlockStore, Stored, BS};
use super::command::{Hydration, VolumeCommand};
use super::replica::VolumeReplica;
use super::state_machine::lock;
use crate::file::layout::{self, Inode, Super};
use crate::raft::network::PeerPool;
use crate::storage::keys::GroupId;
use crate::storage::log_store::NodeId;

/// Blocks per chunk (and per `Hydrate` log entry): 1 MiB of data.
const CHUNK_BLOCKS: usize = 256;
/// Record header: block number and length of the stored value.
const HEADER: usize = 8 + 4;
/// Largest stored value: checksum and one block.
const MAX_VALUE: usize = 4 + BS;

/// Where the copy of a file volume ends: it covers data, inodes,
/// directory buckets and counters, and leaves out the open-handle records.
pub fn file_copy_end() -> u64 {
    layout::open_range().0
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("this replica of {volume} has no snapshot at index {index} (deleted, or never taken)")]
    NoSnapshot { volume: GroupId, index: u64 },
    #[error("this replica of {volume} has not applied index {index} yet")]
    Behind { volume: GroupId, index: u64 },
    #[error("block range {from}..{end} is invalid")]
    Range { from: u64, end: u64 },
    #[error("cannot start a reader: {0}")]
    Spawn(String),
    #[error("cannot read the open files of the snapshot: {0}")]
    Orphans(String),
}

/// Streams the data blocks of the snapshot at `index` in `from..end` from
/// this replica. Waits a little for a lagging replica to apply `index`.
pub async fn serve(
    replica: &VolumeReplica,
    index: u64,
    from: u64,
    end: u64,
) -> Result<BoxStream<'static, Result<ReadSnapshotChunk, String>>, ServeError> {
    let volume = replica.id;
    if from > end {
        return Err(ServeError::Range { from, end });
    }
    for _ in 0..100 {
        if replica.applied_index() >= index {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    {
        let s = lock(replica.shared());
        if s.last_applied.map(|l| l.index).unwrap_or(0) < index {
            return Err(ServeError::Behind { volume, index });
        }
        if !s.meta.snapshot_pins.contains(&index) {
            return Err(ServeError::NoSnapshot { volume, index });
        }
    }
    let blocks: BlockStore = replica.blocks().clone();
    // Only a file volume's copy reaches the reserved ranges.
    let orphans = if end > layout::SUPER_BLOCK {
        orphans_at(&blocks, index).map_err(ServeError::Orphans)?
    } else {
        BTreeMap::new()
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<ReadSnapshotChunk, String>>(4);
    std::thread::Builder::new()
        .name(format!("snap-read-{}", &volume.to_string()[..8]))
        .spawn(move || {
            let mut buf = BytesMut::with_capacity(CHUNK_BLOCKS * (HEADER + MAX_VALUE));
            let mut count = 0usize;
            let mut failure = None;
            let mut gone = false;
            let result = blocks.scan_at(index, from, end, |block, value| {
                if !matches!(decode_value(value), Some(Stored::Data(_))) || value.len() > MAX_VALUE {
                    failure = Some(format!("block {block} fails its checksum on this replica"));
                    return false;
                }
                let adjusted;
                let value = match orphan_filter(&orphans, block) {
                    Filter::Keep => value,
                    Filter::Skip => return true,
                    Filter::Counters => match adjust_counters(value, &orphans) {
                        Ok(v) => {
                            adjusted = v;
                            &adjusted[..]
                        }
                        Err(e) => {
                            failure = Some(e);
                            return false;
                        }
                    },
                };
                buf.put_u64(block);
                buf.put_u32(value.len() as u32);
                buf.put_slice(value);
                count += 1;
                if count == CHUNK_BLOCKS {
                    count = 0;
                    let chunk = ReadSnapshotChunk { records: buf.split().freeze(), next_block: block + 1 };
                    if tx.blocking_send(Ok(chunk)).is_err() {
                        gone = true;
                        return false;
                    }
                }
                true
            });
            if gone {
                return;
            }
            let last = match (result, failure) {
                (Err(e), _) => Err(e.to_string()),
                (Ok(()), Some(f)) => Err(f),
                (Ok(()), None) => Ok(ReadSnapshotChunk { records: buf.split().freeze(), next_block: end }),
            };
            let _ = tx.blocking_send(last);
        })
        .map_err(|e| ServeError::Spawn(e.to_string()))?;
    Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)))
}

/// Inodes of the snapshot at `index` that were unlinked while open: they
/// live only for the source's mount sessions. Maps each to its data blocks.
fn orphans_at(blocks: &BlockStore, index: u64) -> Result<BTreeMap<u64, u64>, String> {
    let (from, end) = layout::open_range();
    let mut open = Vec::new();
    blocks
        .scan_at(index, from, end, |b, _| {
            open.push(layout::ino_of_open_block(b));
            true
        })
        .map_err(|e| e.to_string())?;
    let mut out = BTreeMap::new();
    for ino in open {
        let b = layout::inode_block(ino);
        let mut inode: Option<Result<Inode, String>> = None;
        blocks
            .scan_at(index, b, b + 1, |_, v| {
                inode = Some(match decode_value(v) {
                    Some(Stored::Data(d)) => crate::storage::decode("inode", &d).map_err(|e| e.to_string()),
                    _ => Err(format!("inode {ino} fails its checksum on this replica")),
                });
                false
            })
            .map_err(|e| e.to_string())?;
        if let Some(i) = inode.transpose()? {
            if i.nlink == 0 {
                out.insert(ino, i.blocks);
            }
        }
    }
    Ok(out)
}

enum Filter {
    Keep,
    Skip,
    Counters,
}

fn orphan_filter(orphans: &BTreeMap<u64, u64>, block: u64) -> Filter {
    if block == layout::SUPER_BLOCK {
        return if orphans.is_empty() { Filter::Keep } else { Filter::Counters };
    }
    if orphans.is_empty() {
        return Filter::Keep;
    }
    let first_inode = layout::inode_block(0);
    let ino = if block < first_inode {
        // A data block: its inode is the high bits.
        block / layout::data_range(1).0
    } else if block < layout::dentry_range(0).0 {
        block - first_inode
    } else {
        return Filter::Keep;
    };
    if orphans.contains_key(&ino) {
        Filter::Skip
    } else {
        Filter::Keep
    }
}

/// The counters of the copy: without the left-out orphans.
fn adjust_counters(value: &[u8], orphans: &BTreeMap<u64, u64>) -> Result<Vec<u8>, String> {
    let Some(Stored::Data(d)) = decode_value(value) else {
        return Err("the file volume counters fail their checksum on this replica".into());
    };
    let mut sup: Super = crate::storage::decode("file volume counters", &d).map_err(|e| e.to_string())?;
    let n = orphans.len() as u64;
    sup.inodes = sup.inodes.saturating_sub(n);
    sup.orphans = sup.orphans.saturating_sub(n);
    sup.data_blocks = sup.data_blocks.saturating_sub(orphans.values().sum());
    let raw = crate::storage::encode(&sup).map_err(|e| e.to_string())?;
    Ok(super::blocks::encode_value(&raw))
}

/// Splits a chunk into verified `(block, data)` pairs.
pub fn decode_records(mut records: Bytes) -> Result<Vec<(u64, Bytes)>, String> {
    let mut out = Vec::with_capacity(records.len() / (HEADER + MAX_VALUE) + 1);
    while records.has_remaining() {
        if records.remaining() < HEADER {
            return Err(format!("chunk ends inside a record header ({} bytes left)", records.remaining()));
        }
        let block = records.get_u64();
        let len = records.get_u32() as usize;
        if len <= 4 || len > MAX_VALUE || len > records.remaining() {
            return Err(format!("record of block {block} has an invalid length {len}"));
        }
        let value = records.split_to(len);
        match decode_value(&value) {
            Some(Stored::Data(_)) => out.push((block, value.slice(4..))),
            _ => return Err(format!("block {block} failed its checksum in transit")),
        }
    }
    Ok(out)
}

/// The copy loop of a hydrating volume's leader. Returns when the copy is
/// finished or this node stops leading (the next leader resumes).
pub async fn run(replica: Arc<VolumeReplica>, pool: Arc<PeerPool>, sources: Vec<NodeId>) {
    let mut round = 0usize;
    loop {
        let Some(h) = replica.meta().hydration else { return };
        if h.finished || !replica.is_leader() {
            return;
        }
        if sources.is_empty() {
            warn!(volume = %replica.id, source = %h.source_volume, "no replica of the source volume to copy from");
            tokio::time::sleep(Duration::from_secs(2)).await;
            continue;
        }
        let source = sources[round % sources.len()];
        match copy_from(&replica, &pool, source, &h).await {
            Ok(()) => {}
            Err(e) => {
                warn!(volume = %replica.id, source = %h.source_volume, node = source, error = %e, "copy from snapshot interrupted");
                round += 1;
                tokio::time::sleep(Duration::from_millis(if round.is_multiple_of(sources.len()) { 1000 } else { 100 }))
                    .await;
            }
        }
    }
}

async fn copy_from(replica: &VolumeReplica, pool: &PeerPool, node: NodeId, h: &Hydration) -> Result<(), String> {
    let mut client = pool.client(node, None).map_err(|e| e.to_string())?;
    let req = ReadSnapshotRequest {
        group_id: Bytes::copy_from_slice(h.source_volume.as_bytes()),
        index: h.source_index,
        from_block: h.next_block,
        end_block: h.end_block,
    };
    let mut stream = client.read_snapshot(req).await.map_err(|s| format!("node {node}: {}", s.message()))?.into_inner();
    let mut from = h.next_block;
    if from == 0 {
        info!(volume = %replica.id, source = %h.source_volume, node, blocks = h.total_blocks, "copying from snapshot");
    }
    while let Some(chunk) = stream.message().await.map_err(|s| format!("node {node}: {}", s.message()))? {
        let blocks = decode_records(chunk.records)?;
        let next = chunk.next_block;
        if next < from || next > h.end_block {
            return Err(format!("node {node} sent cursor {next} outside {from}..={}", h.end_block));
        }
        let resp = replica
            .propose(VolumeCommand::Hydrate { from_block: from, next_block: next, blocks })
            .await
            .map_err(|e| e.to_string())?;
        if let Some(why) = resp.refused {
            return Err(why);
        }
        from = next;
        if from >= h.end_block {
            info!(volume = %replica.id, source = %h.source_volume, "copy from snapshot finished");
            return Ok(());
        }
    }
    Err(format!("node {node} ended the stream at block {from} of {}", h.end_block))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volume::blocks::encode_value;

    #[test]
    fn orphans_and_their_data_are_left_out_and_counters_follow() {
        let orphans: BTreeMap<u64, u64> = [(7u64, 3u64)].into();
        let skip = |b| matches!(orphan_filter(&orphans, b), Filter::Skip);
        assert!(skip(layout::data_block(7, 0)) && skip(layout::data_block(7, 5)) && skip(layout::inode_block(7)));
        assert!(!skip(layout::data_block(8, 0)) && !skip(layout::inode_block(8)) && !skip(layout::data_block(6, 9)));
        assert!(!skip(layout::dentry_block(7, 1)), "directory buckets are kept: the names are gone already");
        assert!(matches!(orphan_filter(&orphans, layout::SUPER_BLOCK), Filter::Counters));
        assert!(matches!(orphan_filter(&BTreeMap::new(), layout::inode_block(7)), Filter::Keep));
        let sup = Super { next_ino: 9, inodes: 5, data_blocks: 10, orphans: 1 };
        let raw = encode_value(&crate::storage::encode(&sup).unwrap());
        let Some(Stored::Data(d)) = decode_value(&adjust_counters(&raw, &orphans).unwrap()) else {
            panic!("bad value")
        };
        let got: Super = crate::storage::decode("counters", &d).unwrap();
        assert_eq!(got, Super { next_ino: 9, inodes: 4, data_blocks: 7, orphans: 0 });
    }

    #[test]
    fn records_roundtrip_and_corruption_is_refused() {
        let mut buf = BytesMut::new();
        for (b, byte) in [(3u64, 7u8), (9, 8)] {
            buf.put_u64(b);
            buf.put_u32((4 + BS) as u32);
            buf.put_slice(&encode_value(&[byte; BS]));
        }
        // A short metadata record, as a file volume holds.
        buf.put_u64(1 << 60);
        buf.put_u32(4 + 3);
        buf.put_slice(&encode_value(b"ino"));
        let good = buf.clone().freeze();
        let got = decode_records(good).unwrap();
        assert_eq!(got.len(), 3);
        assert_eq!((got[1].0, got[1].1[0]), (9, 8));
        assert_eq!((got[2].0, &got[2].1[..]), (1 << 60, &b"ino"[..]));
        buf[100] ^= 1;
        assert!(decode_records(buf.freeze()).unwrap_err().contains("checksum"));
        assert!(decode_records(Bytes::from_static(b"short")).is_err());
    }
}
