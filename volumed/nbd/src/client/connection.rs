//! The client's connection supervisor: drives the live connection (request
//! writer, reply reader, stall watchdog), reconnects and replays after a
//! loss, and drains old connections after a migration.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::OptionFuture;
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use super::handshake::{self, Established};
use super::{reply_error, ClientState, Live, Outgoing, Shared};
use crate::protocol::*;
use crate::wire::{read_payload, Batch};

/// Requests are written out once this many bytes are batched.
const MAX_BATCH_BYTES: usize = 1 << 20;
/// A connection that lived this long counts as healthy: the next loss
/// starts backing off from the minimum again.
const HEALTHY_AFTER: Duration = Duration::from_secs(1);

type BoxedFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// Why a connection's reader stopped.
#[derive(Debug)]
enum ReadEnd {
    Io(io::Error),
    Protocol(String),
    /// The server answered NBD_ESHUTDOWN: it is going away.
    ServerShutdown,
    /// A draining connection has no more requests outstanding.
    Drained,
}

impl std::fmt::Display for ReadEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadEnd::Io(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                write!(f, "server closed the connection")
            }
            ReadEnd::Io(e) => write!(f, "connection error: {e}"),
            ReadEnd::Protocol(m) => write!(f, "protocol error: {m}"),
            ReadEnd::ServerShutdown => write!(f, "server is shutting down (ESHUTDOWN)"),
            ReadEnd::Drained => write!(f, "drained"),
        }
    }
}

/// The running halves of one connection.
struct Conn {
    epoch: u64,
    addr: std::net::SocketAddr,
    started: Instant,
    reading: BoxedFuture<ReadEnd>,
    writing: Option<BoxedFuture<io::Result<()>>>,
    /// Milliseconds since `started` of the last reply.
    last_reply: Arc<AtomicU64>,
    /// Replies received (any but ESHUTDOWN): the server is really serving.
    answered: Arc<AtomicU64>,
}

impl Conn {
    fn start(sh: &Arc<Shared>, est: Established, epoch: u64, rx: mpsc::UnboundedReceiver<Outgoing>) -> Conn {
        let started = Instant::now();
        let last_reply = Arc::new(AtomicU64::new(0));
        let answered = Arc::new(AtomicU64::new(0));
        let reading =
            Box::pin(read_replies(sh.clone(), est.reader, epoch, started, last_reply.clone(), answered.clone()));
        let writing = Box::pin(write_requests(est.writer, rx));
        Conn { epoch, addr: est.addr, started, reading, writing: Some(writing), last_reply, answered }
    }

    /// How long requests have waited without any reply, if longer than the
    /// stall timeout.
    fn stalled(&self, sh: &Shared) -> Option<Duration> {
        let limit = sh.opts.stall_timeout;
        let since_reply =
            self.started.elapsed().saturating_sub(Duration::from_millis(self.last_reply.load(Ordering::Relaxed)));
        if since_reply < limit {
            return None;
        }
        let inner = sh.lock();
        let oldest = inner.pending.values().find(|p| p.sent_on == self.epoch)?;
        let waited = oldest.sent_at.elapsed();
        (waited >= limit).then_some(waited.min(since_reply))
    }
}

fn watchdog_period(sh: &Shared) -> Duration {
    (sh.opts.stall_timeout / 4).clamp(Duration::from_millis(50), Duration::from_secs(1))
}

/// Tries every endpoint once, in order; returns the first that opens the
/// export, or every endpoint's error.
pub(super) async fn connect_any(sh: &Arc<Shared>) -> Result<Established, String> {
    let addrs = sh.endpoints.endpoints().await;
    if addrs.is_empty() {
        return Err("the endpoint source has no addresses".into());
    }
    let mut errors = Vec::with_capacity(addrs.len());
    for addr in addrs {
        match tokio::time::timeout(sh.opts.connect_timeout, handshake::open(addr, &sh.export)).await {
            Ok(Ok(est)) => return Ok(est),
            Ok(Err(e)) => errors.push(format!("{addr}: {e}")),
            Err(_) => errors.push(format!("{addr}: no answer within {:?}", sh.opts.connect_timeout)),
        }
    }
    Err(errors.join("; "))
}

enum DriveEnd {
    Closed,
    Lost(String),
    /// A migration target is ready; the old connection must be drained.
    Migrated(Box<Established>, Conn),
}

/// Owns the client's connections until it is closed or dropped.
pub(super) async fn supervise(sh: Arc<Shared>, first: Established) {
    let mut next = Some(first);
    let mut lost_at: Option<Instant> = None;
    let mut backoff = sh.opts.backoff_min;
    // Wait before the next attempt (the last connection failed at once).
    let mut hold_off = false;
    let mut drainers = JoinSet::new();
    loop {
        let est = match next.take() {
            Some(est) => est,
            None => match reconnect(&sh, &mut backoff, lost_at.unwrap_or_else(Instant::now), hold_off).await {
                Some(est) => est,
                None => break,
            },
        };
        sh.apply_geometry(&est.geometry);
        let (tx, rx) = mpsc::unbounded_channel();
        let (epoch, resent, old) = {
            let mut inner = sh.lock();
            let epoch = inner.next_epoch;
            inner.next_epoch += 1;
            // A migration leaves the old connection live until now: close its
            // queue (after a DISC) and let it finish what it has.
            let old = inner.live.take();
            if let Some(old) = &old {
                let _ = old.tx.send(Outgoing::disconnect());
                inner.draining.insert(old.epoch);
            }
            inner.live = Some(Live { epoch, tx });
            let resent = inner.resend_to_live();
            (epoch, resent, old)
        };
        let addr = est.addr;
        match lost_at.take() {
            Some(t) => {
                let pause = t.elapsed();
                let mut stats = sh.stats();
                stats.reconnects += 1;
                stats.last_pause = Some(pause);
                stats.total_pause += pause;
                stats.replayed += resent;
                info!(export = %sh.export, %addr, pause_ms = pause.as_millis() as u64, replayed = resent, "NBD client reconnected");
            }
            None if old.is_some() => {
                sh.stats().migrations += 1;
                info!(export = %sh.export, %addr, "NBD client migrated");
            }
            None => {}
        }
        sh.set_state(ClientState::Connected { addr });

        let connected_at = Instant::now();
        let conn = Conn::start(&sh, est, epoch, rx);
        let answered = conn.answered.clone();
        let end = drive(&sh, conn).await;
        while drainers.try_join_next().is_some() {}
        match end {
            DriveEnd::Closed => break,
            DriveEnd::Migrated(target, old) => {
                backoff = sh.opts.backoff_min;
                next = Some(*target);
                drainers.spawn(drain(sh.clone(), old));
            }
            DriveEnd::Lost(reason) => {
                let since = Instant::now();
                {
                    let mut inner = sh.lock();
                    if inner.live.as_ref().is_some_and(|l| l.epoch == epoch) {
                        inner.live = None;
                    }
                }
                // A connection that served something (or lived a while) was
                // fine: retry at once. One that failed straight away, say with
                // ESHUTDOWN from a server without leadership, is retried with
                // growing pauses rather than in a tight loop.
                hold_off = answered.load(Ordering::Relaxed) == 0 && connected_at.elapsed() < HEALTHY_AFTER;
                if !hold_off {
                    backoff = sh.opts.backoff_min;
                }
                warn!(export = %sh.export, %addr, "NBD connection lost: {reason}; reconnecting");
                lost_at = Some(since);
                sh.set_state(ClientState::Reconnecting { since, last_error: reason });
            }
        }
    }
    sh.lock().live = None;
    drainers.abort_all();
    sh.set_state(ClientState::Closed);
}

/// Tries the endpoints until one accepts (None: the client is closing).
/// The first round is immediate unless `hold_off`.
async fn reconnect(sh: &Arc<Shared>, backoff: &mut Duration, since: Instant, hold_off: bool) -> Option<Established> {
    if hold_off && !pause(sh, backoff).await {
        return None;
    }
    loop {
        if sh.closing.load(Ordering::SeqCst) {
            return None;
        }
        match connect_any(sh).await {
            Ok(est) => return Some(est),
            Err(e) => {
                debug!(export = %sh.export, "reconnect failed: {e}");
                sh.set_state(ClientState::Reconnecting { since, last_error: e });
            }
        }
        if !pause(sh, backoff).await {
            return None;
        }
    }
}

/// Sleeps for `backoff` and doubles it; false if the client closed meanwhile.
async fn pause(sh: &Shared, backoff: &mut Duration) -> bool {
    let slept = tokio::select! {
        _ = tokio::time::sleep(*backoff) => true,
        _ = sh.close.notified() => false,
    };
    *backoff = (*backoff * 2).min(sh.opts.backoff_max);
    slept && !sh.closing.load(Ordering::SeqCst)
}

/// Runs the live connection until it is lost, the client closes, or a
/// migration target is ready.
async fn drive(sh: &Arc<Shared>, mut conn: Conn) -> DriveEnd {
    let mut watchdog = tokio::time::interval(watchdog_period(sh));
    watchdog.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut migrating: Option<BoxedFuture<Result<Established, String>>> = None;
    let closing = || sh.closing.load(Ordering::SeqCst);
    loop {
        tokio::select! {
            end = &mut conn.reading => {
                return if closing() { DriveEnd::Closed } else { DriveEnd::Lost(end.to_string()) };
            }
            Some(res) = OptionFuture::from(conn.writing.as_mut()), if conn.writing.is_some() => {
                conn.writing = None;
                if closing() {
                    return DriveEnd::Closed;
                }
                return DriveEnd::Lost(match res {
                    Ok(()) => "request queue closed".into(),
                    Err(e) => format!("write failed: {e}"),
                });
            }
            _ = watchdog.tick() => {
                if let Some(waited) = conn.stalled(sh) {
                    return DriveEnd::Lost(format!("no reply for {waited:?}"));
                }
            }
            _ = sh.migrate.notified(), if migrating.is_none() => {
                let sh2 = sh.clone();
                migrating = Some(Box::pin(async move { connect_any(&sh2).await }));
            }
            Some(target) = OptionFuture::from(migrating.as_mut()), if migrating.is_some() => {
                migrating = None;
                match target {
                    Ok(est) => return DriveEnd::Migrated(Box::new(est), conn),
                    Err(e) => warn!(export = %sh.export, addr = %conn.addr, "migration failed, staying: {e}"),
                }
            }
        }
    }
}

/// Lets an old connection finish its requests. Whatever it does not finish
/// goes to the live connection.
async fn drain(sh: Arc<Shared>, mut conn: Conn) {
    let mut watchdog = tokio::time::interval(watchdog_period(&sh));
    let why = loop {
        tokio::select! {
            end = &mut conn.reading => break end.to_string(),
            Some(res) = OptionFuture::from(conn.writing.as_mut()), if conn.writing.is_some() => {
                conn.writing = None;
                if let Err(e) = res {
                    break format!("write failed: {e}");
                }
            }
            _ = watchdog.tick() => {
                if let Some(waited) = conn.stalled(&sh) {
                    break format!("no reply for {waited:?}");
                }
            }
        }
    };
    let resent = {
        let mut inner = sh.lock();
        inner.draining.remove(&conn.epoch);
        if inner.outstanding_on(conn.epoch) {
            inner.resend_to_live()
        } else {
            0
        }
    };
    debug!(export = %sh.export, addr = %conn.addr, resent, "old NBD connection finished: {why}");
}

/// Matches replies to pending requests and completes them.
async fn read_replies(
    sh: Arc<Shared>,
    mut r: BufReader<OwnedReadHalf>,
    epoch: u64,
    started: Instant,
    last_reply: Arc<AtomicU64>,
    answered: Arc<AtomicU64>,
) -> ReadEnd {
    loop {
        let mut hdr = [0u8; SIMPLE_REPLY_LEN];
        if let Err(e) = r.read_exact(&mut hdr).await {
            return ReadEnd::Io(e);
        }
        let reply = match SimpleReply::decode(&hdr) {
            Ok(reply) => reply,
            Err(e) => return ReadEnd::Protocol(e.to_string()),
        };
        if reply.error == NBD_ESHUTDOWN {
            // The request stays pending and is replayed elsewhere.
            return ReadEnd::ServerShutdown;
        }
        // One lock per reply: take the entry and note what its removal means.
        let (entry, now_idle, drained) = {
            let mut inner = sh.lock();
            let entry = match inner.pending.get(&reply.handle) {
                Some(p) if p.sent_on == epoch => inner.pending.remove(&reply.handle),
                _ => None,
            };
            let drained = inner.draining.contains(&epoch) && !inner.outstanding_on(epoch);
            (entry, inner.pending.is_empty(), drained)
        };
        let Some(mut p) = entry else {
            return ReadEnd::Protocol(format!("reply for unknown handle {:#x}", reply.handle));
        };
        let result = if reply.error != NBD_OK {
            Err(reply_error(reply.error, &p.req, sh.size.load(Ordering::Relaxed)))
        } else if p.req.command == CMD_READ {
            match read_payload(&mut r, p.req.length as usize).await {
                Ok(data) => Ok(data),
                Err(e) => {
                    // Cut off mid-payload: the request goes back for replay.
                    sh.lock().pending.insert(reply.handle, p);
                    return ReadEnd::Io(e);
                }
            }
        } else {
            Ok(Bytes::new())
        };
        last_reply.store(started.elapsed().as_millis() as u64, Ordering::Relaxed);
        answered.fetch_add(1, Ordering::Relaxed);
        if let Some(done) = p.done.take() {
            let _ = done.send(result);
        }
        if now_idle {
            sh.idle.notify_waiters();
        }
        if drained {
            return ReadEnd::Drained;
        }
    }
}

/// Writes queued requests, batching whatever is queued into one `writev`.
/// Ends when the queue is closed (after the final DISC).
async fn write_requests(mut w: OwnedWriteHalf, mut rx: mpsc::UnboundedReceiver<Outgoing>) -> io::Result<()> {
    let mut batch = Batch::new();
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        while let Some(out) = next.take() {
            batch.push_slice(&out.header);
            if let Some(p) = out.payload {
                batch.push_payload(p);
            }
            if batch.len() < MAX_BATCH_BYTES {
                next = rx.try_recv().ok();
            }
        }
        batch.write_to(&mut w).await?;
    }
    shutdown(&mut w).await;
    Ok(())
}

async fn shutdown<W: AsyncWrite + Unpin>(w: &mut W) {
    let _ = w.shutdown().await;
}
