//! Self-checking block workloads for the fault suites.
//!
//! Every block a [`Writer`] writes describes itself: a magic, the block
//! number, a sequence number unique over the whole test, pseudo-random fill
//! derived from both, and a CRC32 over everything before it. A [`Ledger`]
//! records, per block, the latest acknowledged sequence number and the
//! sequence numbers of writes whose outcome is unknown (failed or timed
//! out). [`verify`] then reads the volume back and checks every block holds
//! its latest acknowledged version — or a later write that was attempted
//! but never acknowledged, which NBD allows — and never anything else.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rand::{Rng, SeedableRng};
use volumed_nbd::client::NbdClient;
use volumed_nbd::BlockDevice;

pub const BLOCK: usize = 4096;
const MAGIC: &[u8; 8] = b"VOLTEST1";

/// The content of `block` at write `seq`.
pub fn make_block(block: u64, seq: u64) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK];
    b[..8].copy_from_slice(MAGIC);
    b[8..16].copy_from_slice(&block.to_le_bytes());
    b[16..24].copy_from_slice(&seq.to_le_bytes());
    // xorshift fill: cheap, and different for every (block, seq).
    let mut x = block.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ seq.wrapping_mul(0xC2B2_AE3D_27D4_EB4F) | 1;
    for chunk in b[24..BLOCK - 4].chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let bytes = x.to_le_bytes();
        chunk.copy_from_slice(&bytes[..chunk.len()]);
    }
    let crc = crc32fast::hash(&b[..BLOCK - 4]);
    b[BLOCK - 4..].copy_from_slice(&crc.to_le_bytes());
    b
}

/// What a stored block holds: `Ok(None)` for zeros, `Ok(Some((block, seq)))`
/// for an intact self-describing block, `Err` for anything else.
pub fn parse_block(b: &[u8]) -> Result<Option<(u64, u64)>, String> {
    assert_eq!(b.len(), BLOCK);
    if b.iter().all(|x| *x == 0) {
        return Ok(None);
    }
    if &b[..8] != MAGIC {
        return Err(format!("no magic (starts with {:02x?})", &b[..16]));
    }
    let crc = u32::from_le_bytes(b[BLOCK - 4..].try_into().unwrap());
    if crc32fast::hash(&b[..BLOCK - 4]) != crc {
        return Err("checksum mismatch (torn or corrupt block)".into());
    }
    let block = u64::from_le_bytes(b[8..16].try_into().unwrap());
    let seq = u64::from_le_bytes(b[16..24].try_into().unwrap());
    if make_block(block, seq) != b {
        return Err(format!("fill of block {block} seq {seq} differs"));
    }
    Ok(Some((block, seq)))
}

/// What the writers know about one block.
#[derive(Debug, Clone, Default)]
pub struct BlockRecord {
    /// Latest acknowledged write.
    pub acked: Option<u64>,
    /// Writes after `acked` whose outcome is unknown.
    pub uncertain: Vec<u64>,
}

/// One write of a [`Writer`]: when it was issued and when (if ever) it
/// was acknowledged. Writes to one block are issued one after the other,
/// in increasing `seq`.
#[derive(Debug, Clone)]
pub struct WriteEvent {
    pub block: u64,
    pub seq: u64,
    pub issued: Instant,
    pub acked: Option<Instant>,
}

/// Per-block history of a workload, plus an ack timeline.
#[derive(Debug, Default)]
pub struct Ledger {
    /// Every write, in issue order per writer task.
    pub events: Vec<WriteEvent>,
    pub blocks: BTreeMap<u64, BlockRecord>,
    pub acks: u64,
    pub failures: Vec<String>,
    /// Blocks not to write again: a write to them failed, and a later write
    /// must not race with a retry of it somewhere in the stack.
    pub poisoned: std::collections::BTreeSet<u64>,
    ack_times: Vec<Instant>,
}

impl Ledger {
    pub fn acked(&mut self, block: u64, seq: u64) {
        let r = self.blocks.entry(block).or_default();
        r.acked = Some(seq);
        r.uncertain.clear();
        self.acks += 1;
        self.ack_times.push(Instant::now());
    }

    pub fn failed(&mut self, block: u64, seq: u64, err: String) {
        self.blocks.entry(block).or_default().uncertain.push(seq);
        self.poisoned.insert(block);
        self.failures.push(format!("block {block} seq {seq}: {err}"));
    }

    /// Acknowledgements that arrived in `[from, to)`.
    pub fn acks_between(&self, from: Instant, to: Instant) -> usize {
        self.ack_times.iter().filter(|t| **t >= from && **t < to).count()
    }

    /// The longest time without any acknowledgement inside `[from, to]`
    /// (counting from `from` to the first ack after it).
    pub fn longest_pause(&self, from: Instant, to: Instant) -> Duration {
        let mut last = from;
        let mut worst = Duration::ZERO;
        for t in self.ack_times.iter().filter(|t| **t >= from && **t <= to) {
            worst = worst.max(t.duration_since(last));
            last = *t;
        }
        worst.max(to.saturating_duration_since(last))
    }

    pub fn last_ack(&self) -> Option<Instant> {
        self.ack_times.last().copied()
    }
}

/// Concurrent writers over blocks `first..first + count` of one device.
pub struct Writer {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    pub ledger: Arc<Mutex<Ledger>>,
    pub first: u64,
    pub count: u64,
}

/// Sequence numbers are unique over the whole test process.
static SEQ: AtomicU64 = AtomicU64::new(1);

impl Writer {
    /// Starts `depth` writers (so `depth` writes are in flight at once).
    /// Writer `w` owns the blocks congruent to `w` modulo `depth`, so two
    /// writes to one block are never in flight together. Every 64th write
    /// of a writer is followed by a FLUSH.
    pub fn start(dev: Arc<NbdClient>, first: u64, count: u64, depth: usize, seed: u64) -> Writer {
        assert!(count >= depth as u64);
        let stop = Arc::new(AtomicBool::new(false));
        let ledger = Arc::new(Mutex::new(Ledger::default()));
        let mut tasks = Vec::new();
        for w in 0..depth as u64 {
            let (dev, stop, ledger) = (dev.clone(), stop.clone(), ledger.clone());
            let depth = depth as u64;
            tasks.push(tokio::spawn(async move {
                let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ (w << 32));
                let mine = (count - w).div_ceil(depth);
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let block = first + w + depth * rng.random_range(0..mine);
                    if ledger.lock().unwrap().poisoned.contains(&block) {
                        continue;
                    }
                    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
                    let data = Bytes::from(make_block(block, seq));
                    let issued = Instant::now();
                    match dev.write(block * BLOCK as u64, data, false).await {
                        Ok(()) => {
                            let mut l = ledger.lock().unwrap();
                            l.acked(block, seq);
                            l.events.push(WriteEvent { block, seq, issued, acked: Some(Instant::now()) });
                        }
                        Err(e) => {
                            {
                                let mut l = ledger.lock().unwrap();
                                l.failed(block, seq, e.to_string());
                                l.events.push(WriteEvent { block, seq, issued, acked: None });
                            }
                            // Do not spin on a device that refuses everything.
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                    n += 1;
                    if n.is_multiple_of(64) {
                        if let Err(e) = dev.flush().await {
                            ledger.lock().unwrap().failures.push(format!("flush: {e}"));
                        }
                    }
                }
            }));
        }
        Writer { stop, tasks, ledger, first, count }
    }

    pub fn acks(&self) -> u64 {
        self.ledger.lock().unwrap().acks
    }

    /// Waits until `n` more writes were acknowledged (panics after `timeout`).
    pub async fn wait_acks(&self, n: u64, timeout: Duration) {
        let target = self.acks() + n;
        let deadline = Instant::now() + timeout;
        while self.acks() < target {
            assert!(
                Instant::now() < deadline,
                "writer made no progress: {} of {target} acks after {timeout:?}; failures: {:?}",
                self.acks(),
                self.ledger.lock().unwrap().failures.iter().take(5).collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops the writers, waits for their last writes to finish and returns
    /// what they did.
    pub async fn stop(self) -> Ledger {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.expect("writer task panicked");
        }
        let mut l = self.ledger.lock().unwrap();
        std::mem::take(&mut *l)
    }
}

/// Reads blocks `first..first + count` and checks them against `ledger`.
/// Returns the number of blocks holding data.
pub async fn verify(dev: &dyn BlockDevice, ledger: &Ledger, first: u64, count: u64) -> Result<u64, String> {
    let mut bad = Vec::new();
    let mut with_data = 0u64;
    let per_read = 256u64; // 1 MiB
    let mut b = first;
    while b < first + count {
        let n = per_read.min(first + count - b);
        let data = dev
            .read(b * BLOCK as u64, (n as usize * BLOCK) as u32)
            .await
            .map_err(|e| format!("read of blocks {b}..{}: {e}", b + n))?;
        for i in 0..n {
            let block = b + i;
            let got = parse_block(&data[i as usize * BLOCK..(i as usize + 1) * BLOCK]);
            let rec = ledger.blocks.get(&block).cloned().unwrap_or_default();
            let ok = match (&got, rec.acked) {
                (Ok(Some((gb, _))), _) if *gb != block => false,
                (Ok(Some((_, s))), acked) => acked == Some(*s) || rec.uncertain.contains(s),
                (Ok(None), None) => true,
                (Ok(None), Some(_)) => false,
                (Err(_), _) => false,
            };
            if got.as_ref().is_ok_and(|g| g.is_some()) {
                with_data += 1;
            }
            if !ok && bad.len() < 10 {
                bad.push(format!(
                    "block {block}: read {got:?}, expected acked {:?} or one of {:?}",
                    rec.acked, rec.uncertain
                ));
            } else if !ok {
                bad.push(String::new());
            }
        }
        b += n;
    }
    if bad.is_empty() {
        Ok(with_data)
    } else {
        let n = bad.len();
        bad.retain(|s| !s.is_empty());
        Err(format!("{n} block(s) wrong: {}", bad.join("; ")))
    }
}

/// Writes `count` blocks sequentially from `first` with known content
/// (sequence numbers from `seq0`), `depth` writes in flight; returns a
/// ledger of them. For bulk fills.
pub async fn fill(dev: &Arc<NbdClient>, first: u64, count: u64, blocks_per_write: u64, depth: usize) -> Ledger {
    use futures::stream::{self, StreamExt};
    let seq0 = SEQ.fetch_add(count, Ordering::Relaxed);
    let writes = stream::iter((0..count.div_ceil(blocks_per_write)).map(|i| {
        let dev = dev.clone();
        async move {
            let start = first + i * blocks_per_write;
            let n = blocks_per_write.min(first + count - start);
            let mut buf = Vec::with_capacity(n as usize * BLOCK);
            for b in start..start + n {
                buf.extend_from_slice(&make_block(b, seq0 + (b - first)));
            }
            dev.write(start * BLOCK as u64, Bytes::from(buf), false)
                .await
                .unwrap_or_else(|e| panic!("fill write at block {start}: {e}"));
            (start, n)
        }
    }))
    .buffer_unordered(depth);
    let done: Vec<(u64, u64)> = writes.collect().await;
    let mut ledger = Ledger::default();
    for (start, n) in done {
        for b in start..start + n {
            ledger.acked(b, seq0 + (b - first));
        }
    }
    ledger
}

/// What a point-in-time copy holds of one device: the sequence number of
/// each block's content (`None`: zeros) over the writer's range.
pub type Image = BTreeMap<u64, Option<u64>>;

/// Reads blocks `first..first + count` of `dev` into an [`Image`]; every
/// block must be zeros or an intact self-describing block of its own
/// number.
pub async fn read_image(dev: &dyn BlockDevice, first: u64, count: u64) -> Result<Image, String> {
    let mut out = Image::new();
    let mut b = first;
    while b < first + count {
        let n = 256u64.min(first + count - b);
        let data = dev
            .read(b * BLOCK as u64, (n as usize * BLOCK) as u32)
            .await
            .map_err(|e| format!("read of blocks {b}..{}: {e}", b + n))?;
        for i in 0..n {
            let block = b + i;
            match parse_block(&data[i as usize * BLOCK..(i as usize + 1) * BLOCK])? {
                None => out.insert(block, None),
                Some((got, _)) if got != block => return Err(format!("block {block} holds block {got}'s data")),
                Some((_, seq)) => out.insert(block, Some(seq)),
            };
        }
        b += n;
    }
    Ok(out)
}

/// Checks that images of several devices, taken as one cut while writers
/// ran, show one point in time: every block holds a write that was really
/// issued to it (or zeros), and no write that is in the cut was issued
/// after a write that is not in it had been acknowledged (anywhere, on any
/// of the devices). `parts` pairs each device's image with its writer's
/// events. Returns (writes in the cut, acknowledged writes not in it).
pub fn check_cut(parts: &[(&Image, &[WriteEvent])]) -> Result<(usize, usize), String> {
    let mut latest_issue_in: Option<(Instant, u64)> = None;
    let mut earliest_ack_out: Option<(Instant, u64)> = None;
    let (mut inside, mut outside) = (0usize, 0usize);
    for (image, events) in parts {
        let mut by_block: BTreeMap<u64, Vec<&WriteEvent>> = BTreeMap::new();
        for e in events.iter() {
            by_block.entry(e.block).or_default().push(e);
        }
        for (block, seq) in image.iter() {
            let writes = by_block.get(block).map(Vec::as_slice).unwrap_or(&[]);
            if let Some(seq) = seq {
                if !writes.iter().any(|w| w.seq == *seq) {
                    return Err(format!("block {block} holds seq {seq}, which was never written to it"));
                }
            }
            for w in writes {
                let included = seq.is_some_and(|s| w.seq <= s);
                if included {
                    inside += 1;
                    if latest_issue_in.is_none_or(|(t, _)| w.issued > t) {
                        latest_issue_in = Some((w.issued, w.seq));
                    }
                } else if let Some(acked) = w.acked {
                    outside += 1;
                    if earliest_ack_out.is_none_or(|(t, _)| acked < t) {
                        earliest_ack_out = Some((acked, w.seq));
                    }
                }
            }
        }
    }
    if let (Some((issued, inner)), Some((acked, outer))) = (latest_issue_in, earliest_ack_out) {
        if acked < issued {
            return Err(format!(
                "not one point in time: seq {inner} is in the cut, but was issued {:?} after seq {outer}, which is not, \
                 had been acknowledged",
                issued - acked
            ));
        }
    }
    Ok((inside, outside))
}
