//! NBD server: exports [`BlockDevice`]s named by an [`ExportResolver`].
//!
//! - [`serve`] accepts TCP connections until its shutdown future resolves.
//! - [`serve_connection`] runs one connection (handshake + transmission) on
//!   any byte stream.
//! - [`serve_transmission`] runs only the transmission phase, for a device
//!   whose handshake happened out of band (the kernel NBD driver gets its
//!   size and flags by ioctl and speaks transmission only).
//!
//! Requests are read in a loop and each runs on its own task, so many are
//! in flight at once (at most [`ServerOptions::max_in_flight`]; the reader
//! stops reading while that many are outstanding, which pushes back on the
//! client through TCP). Replies go out through a single writer in
//! completion order, batched into one `writev` while more are queued.
//!
//! A request that is rejected never reaches the device: its payload is
//! read and dropped and an error reply is sent. The connection is closed
//! only where the byte stream cannot be trusted any more: a bad request
//! magic, or a write longer than [`ServerOptions::max_request_len`] (its
//! payload cannot be skipped safely).

mod handshake;
mod transmission;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, BufReader};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{info, warn, Instrument};

use crate::{BlockDevice, ExportResolver};

pub use transmission::export_flags;

/// Buffer for reading requests: many small headers per `read` syscall.
const READ_BUFFER: usize = 256 << 10;

/// Tunables of the server.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Most requests of one connection running at once.
    pub max_in_flight: usize,
    /// A client must finish option haggling within this time.
    pub handshake_timeout: Duration,
    /// On shutdown, how long running requests may take to finish and have
    /// their replies sent before the connections are cut.
    pub shutdown_grace: Duration,
    /// Longest request accepted (and advertised as the maximum block size).
    pub max_request_len: u32,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            max_in_flight: 256,
            handshake_timeout: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(5),
            max_request_len: crate::protocol::MAX_REQUEST_LEN,
        }
    }
}

/// What one connection did; also logged as one line when it ends.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConnectionSummary {
    /// The export opened, if the handshake got that far.
    pub export: Option<String>,
    pub peer: String,
    pub duration: Duration,
    pub reads: u64,
    pub writes: u64,
    pub flushes: u64,
    pub trims: u64,
    pub write_zeroes: u64,
    /// Requests answered with an error (rejected or failed on the device).
    pub errors: u64,
    /// Why the connection ended.
    pub end: ConnectionEnd,
}

/// Why a connection ended.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum ConnectionEnd {
    /// The client sent NBD_CMD_DISC or NBD_OPT_ABORT.
    #[default]
    Disconnect,
    /// The client closed the connection (or it broke).
    Closed,
    /// The server is shutting down.
    Shutdown,
    /// The peer broke the protocol; the message says how.
    ProtocolError(String),
    /// The export could not be opened with NBD_OPT_EXPORT_NAME, which has no
    /// error reply.
    ExportRefused(String),
}

/// Accepts connections on `listener` until `shutdown` resolves, then stops
/// accepting, lets running requests finish (up to
/// [`ServerOptions::shutdown_grace`]) and closes every connection.
///
/// Dropping the returned future instead cuts every connection at once,
/// like a crash: in-flight requests are abandoned without replies.
pub async fn serve(
    listener: TcpListener,
    resolver: Arc<dyn ExportResolver>,
    opts: ServerOptions,
    shutdown: impl Future<Output = ()>,
) {
    let opts = Arc::new(opts);
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut connections = JoinSet::new();
    let local = listener.local_addr().map(|a| a.to_string()).unwrap_or_default();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((sock, peer)) => {
                    // Replies are batched by the writer; Nagle would only add latency.
                    if let Err(e) = sock.set_nodelay(true) {
                        warn!(%peer, error = %e, "cannot set TCP_NODELAY");
                    }
                    let (r, w) = sock.into_split();
                    let resolver = resolver.clone();
                    let opts = opts.clone();
                    let stop = stop_signal(stop_rx.clone());
                    connections.spawn(async move {
                        serve_split(r, w, peer.to_string(), resolver, &opts, stop).await;
                    });
                }
                Err(e) => {
                    // Typically EMFILE/ENFILE: back off instead of spinning.
                    warn!(listen = %local, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    drop(listener);
    let _ = stop_tx.send(true);
    let grace = opts.shutdown_grace + opts.shutdown_grace / 2;
    let drained = tokio::time::timeout(grace, async { while connections.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        warn!(listen = %local, remaining = connections.len(), "connections did not finish in time; cutting them");
    }
}

async fn stop_signal(mut rx: watch::Receiver<bool>) {
    // An error means the server future was dropped: stop as well.
    let _ = rx.wait_for(|stop| *stop).await;
}

/// Serves one connection on any byte stream: handshake (fixed newstyle),
/// then transmission until the client disconnects or `shutdown` resolves.
/// `peer` names the client in logs.
pub async fn serve_connection<S>(
    stream: S,
    peer: String,
    resolver: Arc<dyn ExportResolver>,
    opts: &ServerOptions,
    shutdown: impl Future<Output = ()> + Send,
) -> ConnectionSummary
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (r, w) = tokio::io::split(stream);
    serve_split(r, w, peer, resolver, opts, shutdown).await
}

/// Serves the transmission phase only, for a device whose size and flags
/// the client learned out of band (kernel NBD over a socketpair). Use
/// [`export_flags`] for the flags to hand to the client.
pub async fn serve_transmission<S>(
    stream: S,
    peer: String,
    device: Arc<dyn BlockDevice>,
    export: String,
    opts: &ServerOptions,
    shutdown: impl Future<Output = ()> + Send,
) -> ConnectionSummary
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let span = tracing::info_span!("nbd_conn", %peer, export = %export);
    async move {
        let started = Instant::now();
        let (r, w) = tokio::io::split(stream);
        let mut summary = ConnectionSummary { export: Some(export), peer, ..Default::default() };
        let reader = BufReader::with_capacity(READ_BUFFER, r);
        transmission::run(reader, w, device, opts, shutdown, &mut summary).await;
        summary.duration = started.elapsed();
        log_summary(&summary);
        summary
    }
    .instrument(span)
    .await
}

async fn serve_split<R, W>(
    r: R,
    mut w: W,
    peer: String,
    resolver: Arc<dyn ExportResolver>,
    opts: &ServerOptions,
    shutdown: impl Future<Output = ()> + Send,
) -> ConnectionSummary
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let span = tracing::info_span!("nbd_conn", %peer, export = tracing::field::Empty);
    async move {
        let started = Instant::now();
        let mut summary = ConnectionSummary { peer, ..Default::default() };
        let mut reader = BufReader::with_capacity(READ_BUFFER, r);
        tokio::pin!(shutdown);
        let negotiated = tokio::select! {
            n = tokio::time::timeout(
                opts.handshake_timeout,
                handshake::negotiate(&mut reader, &mut w, resolver.as_ref(), opts),
            ) => n,
            _ = &mut shutdown => {
                summary.end = ConnectionEnd::Shutdown;
                Ok(Ok(handshake::Outcome::Ended))
            }
        };
        match negotiated {
            Ok(Ok(handshake::Outcome::Transmit { export, device })) => {
                tracing::Span::current().record("export", export.as_str());
                summary.export = Some(export);
                transmission::run(reader, w, device, opts, shutdown, &mut summary).await;
            }
            Ok(Ok(handshake::Outcome::Ended)) => {}
            Ok(Err(e)) => summary.end = e.into_end(),
            Err(_) => {
                summary.end =
                    ConnectionEnd::ProtocolError(format!("handshake not finished within {:?}", opts.handshake_timeout))
            }
        }
        summary.duration = started.elapsed();
        log_summary(&summary);
        summary
    }
    .instrument(span)
    .await
}

fn log_summary(s: &ConnectionSummary) {
    info!(
        export = s.export.as_deref().unwrap_or("-"),
        peer = %s.peer,
        duration_ms = s.duration.as_millis() as u64,
        reads = s.reads,
        writes = s.writes,
        flushes = s.flushes,
        trims = s.trims,
        write_zeroes = s.write_zeroes,
        errors = s.errors,
        end = ?s.end,
        "nbd connection closed"
    );
}
