//! A reconnecting, pipelining NBD client that is itself a [`BlockDevice`].
//!
//! [`NbdClient::connect`] opens an export on the first endpoint of an
//! [`EndpointSource`] that accepts it. Requests are pipelined over one TCP
//! connection (TCP_NODELAY, many in flight, matched by handle).
//!
//! When the connection breaks, stalls (no reply for
//! [`ClientOptions::stall_timeout`] while requests are outstanding) or the
//! server answers a request with `NBD_ESHUTDOWN`, the client asks the
//! endpoint source again, reconnects (first attempt at once, then backing
//! off from [`ClientOptions::backoff_min`] to [`ClientOptions::backoff_max`],
//! trying the endpoints in the order given) and sends every request still
//! unanswered again, in the order they were first submitted. Callers see a
//! pause, not an error. A request fails only when the server answers it
//! with another error (returned as is, never retried) or when it has not
//! succeeded within [`ClientOptions::io_timeout`].
//!
//! [`NbdClient::reconnect`] moves to the endpoint source's current first
//! choice without a pause: the new connection is opened first, new requests
//! go to it, and the old one is drained (its unanswered requests finish
//! there) and closed with `NBD_CMD_DISC`.
//!
//! Mapping of the [`BlockDevice`] calls: `read`/`write` are split into
//! requests of at most the server's maximum block size; `write` with `fua`
//! uses `NBD_CMD_FLAG_FUA` (or a flush after the write if the server lacks
//! FUA); `trim` is sent as `NBD_CMD_WRITE_ZEROES` without `NO_HOLE`, because
//! `NBD_CMD_TRIM` does not promise that the range reads back as zeros and
//! the [`BlockDevice`] contract does; `write_zeroes` sets `NO_HOLE` unless
//! `may_trim`. Servers without `WRITE_ZEROES` get zero-filled writes.

mod connection;
mod handshake;

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures::future::BoxFuture;
use futures::stream::{self, StreamExt, TryStreamExt};
use tokio::sync::{mpsc, oneshot, watch, Notify, Semaphore};
use tokio::task::JoinHandle;
use tracing::warn;

use crate::protocol::*;
use crate::{BlockDevice, BlockError};
use handshake::Geometry;

/// Where an export can be reached. Asked again on every reconnect; the
/// first address that accepts the export wins, so order them by preference
/// (the volume's current leader first, then the other replicas).
pub trait EndpointSource: Send + Sync + 'static {
    fn endpoints(&self) -> BoxFuture<'_, Vec<SocketAddr>>;
}

/// A fixed list of endpoints.
#[derive(Debug, Clone)]
pub struct StaticEndpoints(pub Vec<SocketAddr>);

impl EndpointSource for StaticEndpoints {
    fn endpoints(&self) -> BoxFuture<'_, Vec<SocketAddr>> {
        Box::pin(async move { self.0.clone() })
    }
}

/// Tunables of the client.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// A request that has not succeeded this long after it was submitted
    /// fails with [`BlockError::Io`], however many reconnects it went through.
    pub io_timeout: Duration,
    /// Limit for one connection attempt to one endpoint (TCP connect and
    /// handshake).
    pub connect_timeout: Duration,
    /// How long [`NbdClient::connect`] keeps trying before giving up.
    pub initial_connect_timeout: Duration,
    /// First pause between failed reconnect rounds (the first retry after a
    /// loss is immediate).
    pub backoff_min: Duration,
    /// Longest pause between reconnect rounds.
    pub backoff_max: Duration,
    /// A connection with requests outstanding and no reply for this long is
    /// considered dead and replaced.
    pub stall_timeout: Duration,
    /// Most requests in flight at once; callers beyond wait.
    pub max_in_flight: usize,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            io_timeout: Duration::from_secs(120),
            connect_timeout: Duration::from_secs(5),
            initial_connect_timeout: Duration::from_secs(30),
            backoff_min: Duration::from_millis(50),
            backoff_max: Duration::from_secs(1),
            stall_timeout: Duration::from_secs(30),
            max_in_flight: 256,
        }
    }
}

/// Connection state, as seen by [`NbdClient::state`] and
/// [`NbdClient::watch_state`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientState {
    Connected {
        addr: SocketAddr,
    },
    /// The connection was lost at `since`; requests wait for a new one.
    Reconnecting {
        since: Instant,
        last_error: String,
    },
    Closed,
}

/// Reconnect counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientStats {
    /// Connections replaced after a loss (not counting migrations).
    pub reconnects: u64,
    /// Time from the last loss until the new connection carried the replayed
    /// requests.
    pub last_pause: Option<Duration>,
    /// Sum of all pauses.
    pub total_pause: Duration,
    /// Requests sent again after a loss.
    pub replayed: u64,
    /// Completed moves by [`NbdClient::reconnect`].
    pub migrations: u64,
    /// Requests that failed with a timeout.
    pub timeouts: u64,
}

/// [`NbdClient::connect`] could not open the export.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnectError {
    #[error("export name {0:?} is longer than 4096 bytes")]
    BadExportName(String),
    #[error("could not open NBD export {export:?} within {waited:?}: {last_error}")]
    GaveUp { export: String, waited: Duration, last_error: String },
}

/// A request waiting for its reply.
struct Pending {
    req: Request,
    payload: Option<Bytes>,
    /// `None` once the caller gave up: the reply is still read off the wire
    /// (a read's payload must be consumed), but the request is not replayed.
    done: Option<oneshot::Sender<Result<Bytes, BlockError>>>,
    /// Epoch of the connection it was last sent on (0: not sent).
    sent_on: u64,
    sent_at: Instant,
}

impl Pending {
    fn wanted(&self) -> bool {
        self.done.as_ref().is_some_and(|d| !d.is_closed())
    }
}

/// One request on its way to the connection writer.
pub(crate) struct Outgoing {
    header: [u8; REQUEST_LEN],
    payload: Option<Bytes>,
}

impl Outgoing {
    fn of(p: &Pending) -> Outgoing {
        Outgoing { header: p.req.encode(), payload: p.payload.clone() }
    }

    fn disconnect() -> Outgoing {
        let req = Request { flags: 0, command: CMD_DISC, handle: 0, offset: 0, length: 0 };
        Outgoing { header: req.encode(), payload: None }
    }
}

/// The connection new requests go to.
struct Live {
    epoch: u64,
    tx: mpsc::UnboundedSender<Outgoing>,
}

struct Inner {
    next_handle: u64,
    next_epoch: u64,
    /// By handle, which is also submission order.
    pending: BTreeMap<u64, Pending>,
    live: Option<Live>,
    /// Epochs of old connections still finishing their requests.
    draining: HashSet<u64>,
}

impl Inner {
    /// Sends every wanted request not in flight on a live or draining
    /// connection to `live`, oldest first; drops unwanted ones. Returns how
    /// many were sent.
    fn resend_to_live(&mut self) -> u64 {
        let Some(live) = &self.live else { return 0 };
        let mut sent = 0;
        let draining = &self.draining;
        self.pending.retain(|_, p| {
            if p.sent_on == live.epoch || (p.sent_on != 0 && draining.contains(&p.sent_on)) {
                return true;
            }
            if !p.wanted() {
                return false;
            }
            if live.tx.send(Outgoing::of(p)).is_ok() {
                p.sent_on = live.epoch;
                p.sent_at = Instant::now();
                sent += 1;
            }
            true
        });
        sent
    }

    fn outstanding_on(&self, epoch: u64) -> bool {
        self.pending.values().any(|p| p.sent_on == epoch)
    }
}

pub(crate) struct Shared {
    export: String,
    endpoints: Arc<dyn EndpointSource>,
    opts: ClientOptions,
    inner: Mutex<Inner>,
    size: AtomicU64,
    flags: AtomicU32,
    preferred_block: AtomicU32,
    max_request: AtomicU32,
    slots: Semaphore,
    state: watch::Sender<ClientState>,
    stats: Mutex<ClientStats>,
    /// Set by `close`: no new requests.
    closing: AtomicBool,
    /// Wakes the supervisor for [`NbdClient::reconnect`].
    migrate: Notify,
    /// Wakes the supervisor's reconnect loop on close.
    close: Notify,
    /// Signalled whenever the pending table becomes empty.
    idle: Notify,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the table half-updated
        // in a way later users could not cope with.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn stats(&self) -> MutexGuard<'_, ClientStats> {
        self.stats.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn apply_geometry(&self, g: &Geometry) {
        self.size.store(g.size, Ordering::Relaxed);
        self.flags.store(g.flags.into(), Ordering::Relaxed);
        let (preferred, max) = match g.block_sizes {
            Some((_, preferred, max)) => (preferred, max),
            None => (4096, MAX_REQUEST_LEN),
        };
        let max = max.clamp(MIN_BLOCK_SIZE, MAX_REQUEST_LEN);
        self.preferred_block.store(preferred.clamp(MIN_BLOCK_SIZE, max), Ordering::Relaxed);
        self.max_request.store(max, Ordering::Relaxed);
    }

    fn flags(&self) -> u16 {
        self.flags.load(Ordering::Relaxed) as u16
    }

    fn set_state(&self, s: ClientState) {
        self.state.send_replace(s);
    }
}

/// Trim and write-zeroes carry no payload; they are split only to fit the
/// 32-bit length field, in pieces every known server accepts.
const ZERO_CHUNK: u64 = 1 << 30;
/// Zero-filled writes (for servers without WRITE_ZEROES) use this buffer.
static ZEROS: [u8; 1 << 20] = [0; 1 << 20];
/// How many pieces of a split request are in flight at once.
const SPLIT_PARALLELISM: usize = 32;

/// A reconnecting NBD client for one export. Cheap to share (`Arc`); all
/// methods may be called concurrently.
pub struct NbdClient {
    shared: Arc<Shared>,
    supervisor: Mutex<Option<JoinHandle<()>>>,
}

impl NbdClient {
    /// Opens `export` on the first endpoint that accepts it, retrying all
    /// endpoints with backoff for up to
    /// [`ClientOptions::initial_connect_timeout`].
    pub async fn connect(
        endpoints: Arc<dyn EndpointSource>,
        export: String,
        opts: ClientOptions,
    ) -> Result<Arc<NbdClient>, ConnectError> {
        if export.len() > MAX_STRING_LEN {
            return Err(ConnectError::BadExportName(export));
        }
        let (state, _) =
            watch::channel(ClientState::Reconnecting { since: Instant::now(), last_error: "not connected yet".into() });
        let shared = Arc::new(Shared {
            export,
            endpoints,
            slots: Semaphore::new(opts.max_in_flight.max(1)),
            opts,
            inner: Mutex::new(Inner {
                next_handle: 1,
                next_epoch: 1,
                pending: BTreeMap::new(),
                live: None,
                draining: HashSet::new(),
            }),
            size: AtomicU64::new(0),
            flags: AtomicU32::new(0),
            preferred_block: AtomicU32::new(4096),
            max_request: AtomicU32::new(MAX_REQUEST_LEN),
            state,
            stats: Mutex::new(ClientStats::default()),
            closing: AtomicBool::new(false),
            migrate: Notify::new(),
            close: Notify::new(),
            idle: Notify::new(),
        });

        let started = Instant::now();
        let deadline = started + shared.opts.initial_connect_timeout;
        let mut backoff = shared.opts.backoff_min;
        let first = loop {
            match connection::connect_any(&shared).await {
                Ok(est) => break est,
                Err(e) => {
                    if Instant::now() + backoff >= deadline {
                        return Err(ConnectError::GaveUp {
                            export: shared.export.clone(),
                            waited: started.elapsed(),
                            last_error: e,
                        });
                    }
                    shared.set_state(ClientState::Reconnecting { since: started, last_error: e });
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(shared.opts.backoff_max);
                }
            }
        };
        shared.apply_geometry(&first.geometry);
        shared.set_state(ClientState::Connected { addr: first.addr });
        let supervisor = tokio::spawn(connection::supervise(shared.clone(), first));
        Ok(Arc::new(NbdClient { shared, supervisor: Mutex::new(Some(supervisor)) }))
    }

    pub fn export(&self) -> &str {
        &self.shared.export
    }

    pub fn state(&self) -> ClientState {
        self.shared.state.borrow().clone()
    }

    /// Follows state changes (connected, reconnecting, closed).
    pub fn watch_state(&self) -> watch::Receiver<ClientState> {
        self.shared.state.subscribe()
    }

    pub fn stats(&self) -> ClientStats {
        self.shared.stats().clone()
    }

    /// The transmission flags (`TFLAG_*`) of the current connection.
    pub fn transmission_flags(&self) -> u16 {
        self.shared.flags()
    }

    /// Requests a move to the endpoint source's current first choice (for
    /// example a new volume leader). Returns at once; the move happens in the
    /// background without pausing requests and shows in [`Self::state`] and
    /// [`ClientStats::migrations`]. If no endpoint accepts, the client stays
    /// where it is.
    pub fn reconnect(&self) {
        self.shared.migrate.notify_one();
    }

    /// Asks the server for the export's current size (NBD_OPT_INFO on a
    /// short side connection, so transmission is not disturbed) and returns
    /// it; [`BlockDevice::size`] reports it from then on. The size is also
    /// re-read on every reconnect.
    pub async fn refresh_size(&self) -> Result<u64, BlockError> {
        let sh = &self.shared;
        let mut addrs = Vec::new();
        if let ClientState::Connected { addr } = self.state() {
            addrs.push(addr);
        }
        for a in sh.endpoints.endpoints().await {
            if !addrs.contains(&a) {
                addrs.push(a);
            }
        }
        let mut errors = Vec::new();
        for addr in addrs {
            match tokio::time::timeout(sh.opts.connect_timeout, handshake::query(addr, &sh.export)).await {
                Ok(Ok(g)) => {
                    sh.size.store(g.size, Ordering::Relaxed);
                    return Ok(g.size);
                }
                Ok(Err(e)) => errors.push(format!("{addr}: {e}")),
                Err(_) => errors.push(format!("{addr}: no answer within {:?}", sh.opts.connect_timeout)),
            }
        }
        Err(BlockError::Unavailable(format!("cannot query the size of {:?}: {}", sh.export, errors.join("; "))))
    }

    /// Waits (up to the I/O timeout) for requests in flight, sends
    /// `NBD_CMD_DISC` and closes the connection. Later requests fail.
    pub async fn close(&self) {
        let sh = &self.shared;
        sh.closing.store(true, Ordering::SeqCst);
        let deadline = tokio::time::Instant::now() + sh.opts.io_timeout;
        loop {
            let idle = sh.idle.notified();
            if !sh.lock().pending.values().any(Pending::wanted) {
                break;
            }
            if tokio::time::timeout_at(deadline, idle).await.is_err() {
                warn!(export = %sh.export, "closing with requests still unanswered");
                break;
            }
        }
        {
            let mut inner = sh.lock();
            if let Some(live) = inner.live.take() {
                let _ = live.tx.send(Outgoing::disconnect());
            }
        }
        sh.close.notify_one();
        let handle = self.supervisor.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(mut handle) = handle {
            if tokio::time::timeout(sh.opts.connect_timeout, &mut handle).await.is_err() {
                handle.abort();
            }
        }
        // Anyone still waiting learns the client is gone.
        sh.lock().pending.clear();
        sh.set_state(ClientState::Closed);
    }

    fn closed_error() -> BlockError {
        BlockError::Io("the NBD client is closed".into())
    }

    /// Sends one request and waits for its reply (across reconnects) for
    /// up to the I/O timeout.
    async fn submit(
        &self,
        command: u16,
        flags: u16,
        offset: u64,
        length: u32,
        payload: Option<Bytes>,
    ) -> Result<Bytes, BlockError> {
        let sh = &self.shared;
        let deadline = tokio::time::Instant::now() + sh.opts.io_timeout;
        let _slot = match tokio::time::timeout_at(deadline, sh.slots.acquire()).await {
            Ok(Ok(slot)) => slot,
            Ok(Err(_)) => return Err(Self::closed_error()),
            Err(_) => return Err(self.timed_out()),
        };
        let (tx, rx) = oneshot::channel();
        let handle = {
            let mut inner = sh.lock();
            if sh.closing.load(Ordering::SeqCst) {
                return Err(Self::closed_error());
            }
            let handle = inner.next_handle;
            inner.next_handle += 1;
            let req = Request { flags, command, handle, offset, length };
            let mut p = Pending { req, payload, done: Some(tx), sent_on: 0, sent_at: Instant::now() };
            if let Some(live) = &inner.live {
                if live.tx.send(Outgoing::of(&p)).is_ok() {
                    p.sent_on = live.epoch;
                }
            }
            inner.pending.insert(handle, p);
            handle
        };
        match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(Self::closed_error()),
            Err(_) => {
                self.abandon(handle);
                Err(self.timed_out())
            }
        }
    }

    fn timed_out(&self) -> BlockError {
        self.shared.stats().timeouts += 1;
        let state = match self.state() {
            ClientState::Reconnecting { last_error, .. } => {
                format!(" (reconnecting: {last_error})")
            }
            _ => String::new(),
        };
        BlockError::Io(format!(
            "NBD request on {:?} did not complete within {:?}{state}",
            self.shared.export, self.shared.opts.io_timeout
        ))
    }

    /// Forgets a request the caller gave up on. If it is on the wire its
    /// reply must still be read, so the entry stays (without a receiver).
    fn abandon(&self, handle: u64) {
        let mut inner = self.shared.lock();
        let on_wire = match inner.pending.get(&handle) {
            Some(p) => {
                p.sent_on != 0
                    && (inner.live.as_ref().is_some_and(|l| l.epoch == p.sent_on)
                        || inner.draining.contains(&p.sent_on))
            }
            None => return,
        };
        if on_wire {
            if let Some(p) = inner.pending.get_mut(&handle) {
                p.done = None;
            }
        } else {
            inner.pending.remove(&handle);
        }
    }

    fn max_request(&self) -> u32 {
        self.shared.max_request.load(Ordering::Relaxed)
    }

    fn check_range(offset: u64, len: u64) -> Result<(), BlockError> {
        if len == 0 {
            return Err(BlockError::Invalid("zero-length request".into()));
        }
        offset.checked_add(len).map(|_| ()).ok_or(BlockError::OutOfRange)
    }

    /// Pieces of at most `chunk` bytes covering `len` bytes from `offset`.
    fn pieces(offset: u64, len: u64, chunk: u64) -> impl Iterator<Item = (u64, u64)> {
        let count = len.div_ceil(chunk);
        (0..count).map(move |i| {
            let start = i * chunk;
            (offset + start, chunk.min(len - start))
        })
    }

    async fn read_impl(&self, offset: u64, len: u32) -> Result<Bytes, BlockError> {
        Self::check_range(offset, len.into())?;
        let chunk = self.max_request();
        if len <= chunk {
            return self.submit(CMD_READ, 0, offset, len, None).await;
        }
        let parts: Vec<Bytes> = stream::iter(Self::pieces(offset, len.into(), chunk.into()))
            .map(|(off, l)| self.submit(CMD_READ, 0, off, l as u32, None))
            .buffered(SPLIT_PARALLELISM)
            .try_collect()
            .await?;
        let mut out = BytesMut::with_capacity(len as usize);
        for p in parts {
            out.extend_from_slice(&p);
        }
        Ok(out.freeze())
    }

    async fn write_impl(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), BlockError> {
        if self.read_only() {
            return Err(BlockError::ReadOnly);
        }
        let len = data.len() as u64;
        Self::check_range(offset, len)?;
        let flags = self.shared.flags();
        let native_fua = fua && flags & TFLAG_SEND_FUA != 0;
        let cmd_flags = if native_fua { CMD_FLAG_FUA } else { 0 };
        let chunk = self.max_request();
        if len <= chunk.into() {
            self.submit(CMD_WRITE, cmd_flags, offset, len as u32, Some(data)).await?;
        } else {
            stream::iter(Self::pieces(offset, len, chunk.into()))
                .map(|(off, l)| {
                    let start = (off - offset) as usize;
                    let piece = data.slice(start..start + l as usize);
                    self.submit(CMD_WRITE, cmd_flags, off, l as u32, Some(piece))
                })
                .buffer_unordered(SPLIT_PARALLELISM)
                .try_for_each(|_| async { Ok(()) })
                .await?;
        }
        if fua && !native_fua {
            self.flush_impl().await?;
        }
        Ok(())
    }

    async fn flush_impl(&self) -> Result<(), BlockError> {
        if self.shared.flags() & TFLAG_SEND_FLUSH == 0 {
            // The server says it has nothing to flush (no write cache).
            return Ok(());
        }
        self.submit(CMD_FLUSH, 0, 0, 0, None).await.map(|_| ())
    }

    async fn zeroes_impl(&self, offset: u64, len: u64, fua: bool, may_trim: bool) -> Result<(), BlockError> {
        if self.read_only() {
            return Err(BlockError::ReadOnly);
        }
        Self::check_range(offset, len)?;
        let flags = self.shared.flags();
        if flags & TFLAG_SEND_WRITE_ZEROES == 0 {
            return self.zero_fill(offset, len, fua).await;
        }
        let native_fua = fua && flags & TFLAG_SEND_FUA != 0;
        let mut cmd_flags = if native_fua { CMD_FLAG_FUA } else { 0 };
        if !may_trim {
            cmd_flags |= CMD_FLAG_NO_HOLE;
        }
        stream::iter(Self::pieces(offset, len, ZERO_CHUNK))
            .map(|(off, l)| self.submit(CMD_WRITE_ZEROES, cmd_flags, off, l as u32, None))
            .buffer_unordered(SPLIT_PARALLELISM)
            .try_for_each(|_| async { Ok(()) })
            .await?;
        if fua && !native_fua {
            self.flush_impl().await?;
        }
        Ok(())
    }

    async fn zero_fill(&self, offset: u64, len: u64, fua: bool) -> Result<(), BlockError> {
        let chunk = u64::from(self.max_request()).min(ZEROS.len() as u64);
        stream::iter(Self::pieces(offset, len, chunk))
            .map(|(off, l)| self.write_impl(off, Bytes::from_static(&ZEROS[..l as usize]), false))
            .buffer_unordered(SPLIT_PARALLELISM)
            .try_for_each(|_| async { Ok(()) })
            .await?;
        if fua {
            self.flush_impl().await?;
        }
        Ok(())
    }
}

impl Drop for NbdClient {
    fn drop(&mut self) {
        if let Some(handle) = self.supervisor.get_mut().unwrap_or_else(|e| e.into_inner()).take() {
            handle.abort();
        }
    }
}

impl std::fmt::Debug for NbdClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdClient").field("export", &self.shared.export).field("state", &self.state()).finish()
    }
}

impl BlockDevice for NbdClient {
    /// The size from the last handshake or [`NbdClient::refresh_size`].
    fn size(&self) -> u64 {
        self.shared.size.load(Ordering::Relaxed)
    }

    /// The server's preferred block size (4096 if it sent none).
    fn block_size(&self) -> u32 {
        self.shared.preferred_block.load(Ordering::Relaxed)
    }

    fn read_only(&self) -> bool {
        self.shared.flags() & TFLAG_READ_ONLY != 0
    }

    fn read(&self, offset: u64, len: u32) -> BoxFuture<'_, Result<Bytes, BlockError>> {
        Box::pin(self.read_impl(offset, len))
    }

    fn write(&self, offset: u64, data: Bytes, fua: bool) -> BoxFuture<'_, Result<(), BlockError>> {
        Box::pin(self.write_impl(offset, data, fua))
    }

    fn flush(&self) -> BoxFuture<'_, Result<(), BlockError>> {
        Box::pin(self.flush_impl())
    }

    fn trim(&self, offset: u64, len: u64, fua: bool) -> BoxFuture<'_, Result<(), BlockError>> {
        Box::pin(self.zeroes_impl(offset, len, fua, true))
    }

    fn write_zeroes(&self, offset: u64, len: u64, fua: bool, may_trim: bool) -> BoxFuture<'_, Result<(), BlockError>> {
        Box::pin(self.zeroes_impl(offset, len, fua, may_trim))
    }
}

/// The error to report for an error reply to `req`: as
/// [`BlockError::from_nbd_errno`], except that EINVAL or ENOSPC for a range
/// past the known end of the device is [`BlockError::OutOfRange`].
fn reply_error(errno: u32, req: &Request, size: u64) -> BlockError {
    let past_end = req.command != CMD_FLUSH && req.offset.checked_add(req.length.into()).is_none_or(|end| end > size);
    match errno {
        NBD_EINVAL | NBD_ENOSPC if past_end => BlockError::OutOfRange,
        other => BlockError::from_nbd_errno(other),
    }
}
