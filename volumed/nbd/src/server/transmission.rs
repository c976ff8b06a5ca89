//! Server side of the transmission phase: a request reader that runs each
//! request on its own task, and a single reply writer.

use std::future::Future;
use std::io;
use std::sync::Arc;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tracing::{debug, warn};

use super::{ConnectionEnd, ConnectionSummary, ServerOptions};
use crate::protocol::*;
use crate::wire::{read_payload, Batch};
use crate::{BlockDevice, BlockError};

/// Replies are written out once this many bytes are batched, even if more
/// are queued, to bound the latency of the first reply.
const MAX_BATCH_BYTES: usize = 1 << 20;

/// Transmission flags for `device`: everything this server implements, plus
/// READ_ONLY when the device is.
pub fn export_flags(device: &dyn BlockDevice) -> u16 {
    let mut flags = TFLAG_HAS_FLAGS
        | TFLAG_SEND_FLUSH
        | TFLAG_SEND_FUA
        | TFLAG_SEND_TRIM
        | TFLAG_SEND_WRITE_ZEROES
        | TFLAG_CAN_MULTI_CONN;
    if device.read_only() {
        flags |= TFLAG_READ_ONLY;
    }
    flags
}

struct Reply {
    handle: u64,
    error: u32,
    /// Read data; `Some` only for successful reads.
    data: Option<Bytes>,
    /// Held until the reply is on the wire, so replies the client does not
    /// read count against the in-flight limit.
    _slot: OwnedSemaphorePermit,
}

/// A request turned down before reaching the device.
struct Reject {
    errno: u32,
    why: String,
}

impl Reject {
    fn new(errno: u32, why: impl Into<String>) -> Reject {
        Reject { errno, why: why.into() }
    }
}

const KNOWN_FLAGS: u16 =
    CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_DF | CMD_FLAG_REQ_ONE | CMD_FLAG_FAST_ZERO | CMD_FLAG_PAYLOAD_LEN;

/// Checks a request against the protocol and the device before any byte of
/// the device is touched. The size is read now, so a device that grew is
/// usable up to its new size on a connection opened before.
fn validate(req: &Request, device: &dyn BlockDevice, max_len: u32) -> Result<(), Reject> {
    let cmd = req.command;
    if req.flags & !KNOWN_FLAGS != 0 {
        return Err(Reject::new(NBD_EINVAL, format!("unknown command flags {:#x}", req.flags)));
    }
    if req.flags & CMD_FLAG_PAYLOAD_LEN != 0 {
        return Err(Reject::new(NBD_EINVAL, "PAYLOAD_LEN flag without extended headers"));
    }
    if req.flags & CMD_FLAG_NO_HOLE != 0 && cmd != CMD_WRITE_ZEROES {
        return Err(Reject::new(NBD_EINVAL, "NO_HOLE flag on a command other than write_zeroes"));
    }
    if req.flags & CMD_FLAG_FAST_ZERO != 0 {
        // Never advertised: a fast-zero request must fail rather than be slow.
        return Err(Reject::new(NBD_ENOTSUP, "fast zero is not supported"));
    }
    if cmd == CMD_FLUSH {
        return Ok(());
    }
    if device.read_only() && matches!(cmd, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES) {
        return Err(Reject::new(BlockError::ReadOnly.nbd_errno(), "export is read-only"));
    }
    if req.length == 0 {
        return Err(Reject::new(NBD_EINVAL, "zero-length request"));
    }
    // The maximum block size bounds payloads; trim and write-zeroes carry
    // none, and Linux and qemu send them up to 4 GiB.
    if matches!(cmd, CMD_READ | CMD_WRITE) && req.length > max_len {
        return Err(Reject::new(NBD_EINVAL, format!("length {} exceeds the maximum {max_len}", req.length)));
    }
    let size = device.size();
    let past_end = match req.offset.checked_add(req.length.into()) {
        Some(end) => end > size,
        None => true,
    };
    if past_end {
        let errno = BlockError::OutOfRange.nbd_errno_for(cmd);
        return Err(Reject::new(errno, format!("{} bytes at {} past the end ({size})", req.length, req.offset)));
    }
    Ok(())
}

/// Runs the transmission phase until the client disconnects, the
/// connection breaks, the protocol is violated, or `shutdown` resolves.
pub(super) async fn run<R, W>(
    mut reader: BufReader<R>,
    writer: W,
    device: Arc<dyn BlockDevice>,
    opts: &ServerOptions,
    shutdown: impl Future<Output = ()> + Send,
    summary: &mut ConnectionSummary,
) where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send,
{
    let (tx, rx) = mpsc::unbounded_channel();
    let (broken_tx, broken_rx) = oneshot::channel();
    let read_side = read_requests(&mut reader, device, opts, tx, shutdown, broken_rx, summary);
    let write_side = write_replies(writer, rx, broken_tx);
    let (end, errors) = tokio::join!(read_side, write_side);
    summary.end = end;
    summary.errors = errors;
}

#[allow(clippy::too_many_arguments)]
async fn read_requests<R: AsyncRead + Unpin + Send>(
    reader: &mut BufReader<R>,
    device: Arc<dyn BlockDevice>,
    opts: &ServerOptions,
    tx: mpsc::UnboundedSender<Reply>,
    shutdown: impl Future<Output = ()> + Send,
    mut broken: oneshot::Receiver<()>,
    summary: &mut ConnectionSummary,
) -> ConnectionEnd {
    let slots = Arc::new(Semaphore::new(opts.max_in_flight.max(1)));
    let max_len = opts.max_request_len;
    let mut tasks: JoinSet<()> = JoinSet::new();
    tokio::pin!(shutdown);

    let end = loop {
        while tasks.try_join_next().is_some() {}

        let mut hdr = [0u8; REQUEST_LEN];
        let read = tokio::select! {
            biased;
            _ = &mut shutdown => break ConnectionEnd::Shutdown,
            _ = &mut broken => break ConnectionEnd::Closed,
            r = reader.read_exact(&mut hdr) => r,
        };
        if let Err(e) = read {
            if e.kind() != io::ErrorKind::UnexpectedEof {
                debug!(error = %e, "connection read failed");
            }
            break ConnectionEnd::Closed;
        }
        let req = match Request::decode(&hdr) {
            Ok(r) => r,
            Err(e) => {
                warn!(error = %e, "bad request header; closing");
                break ConnectionEnd::ProtocolError(format!("request header: {e}"));
            }
        };
        let slot = tokio::select! {
            biased;
            _ = &mut shutdown => break ConnectionEnd::Shutdown,
            s = slots.clone().acquire_owned() => match s {
                Ok(s) => s,
                Err(_) => break ConnectionEnd::Closed,
            },
        };

        let payload = match req.command {
            CMD_DISC => break ConnectionEnd::Disconnect,
            CMD_READ => {
                summary.reads += 1;
                None
            }
            CMD_FLUSH => {
                summary.flushes += 1;
                None
            }
            CMD_TRIM => {
                summary.trims += 1;
                None
            }
            CMD_WRITE_ZEROES => {
                summary.write_zeroes += 1;
                None
            }
            CMD_WRITE => {
                summary.writes += 1;
                if req.length > max_len {
                    // The payload cannot be skipped safely (up to 4 GiB of
                    // it): answer, then close.
                    let why = format!("write of {} bytes exceeds the maximum {max_len}; closing", req.length);
                    warn!(handle = req.handle, offset = req.offset, "{why}");
                    let _ = tx.send(Reply { handle: req.handle, error: NBD_EINVAL, data: None, _slot: slot });
                    break ConnectionEnd::ProtocolError(why);
                }
                match read_payload(reader, req.length as usize).await {
                    Ok(p) => Some(p),
                    Err(_) => break ConnectionEnd::Closed,
                }
            }
            other => {
                debug!(command = other, "unknown command");
                let _ = tx.send(Reply { handle: req.handle, error: NBD_EINVAL, data: None, _slot: slot });
                continue;
            }
        };

        if let Err(reject) = validate(&req, device.as_ref(), max_len) {
            debug!(
                command = command_name(req.command),
                offset = req.offset,
                length = req.length,
                errno = errno_name(reject.errno),
                "request rejected: {}",
                reject.why
            );
            let _ = tx.send(Reply { handle: req.handle, error: reject.errno, data: None, _slot: slot });
            continue;
        }

        let device = device.clone();
        let tx = tx.clone();
        tasks.spawn(async move {
            let (error, data) = execute(device.as_ref(), &req, payload).await;
            let _ = tx.send(Reply { handle: req.handle, error, data, _slot: slot });
        });
    };

    // Finish what was accepted so every reply is sent (after a disconnect
    // the protocol asks for it); on shutdown only within the grace period.
    drop(tx);
    if end == ConnectionEnd::Shutdown {
        let drained =
            tokio::time::timeout(opts.shutdown_grace, async { while tasks.join_next().await.is_some() {} }).await;
        if drained.is_err() {
            warn!(abandoned = tasks.len(), "requests still running at shutdown; abandoning them");
            tasks.abort_all();
        }
    }
    while tasks.join_next().await.is_some() {}
    end
}

async fn execute(device: &dyn BlockDevice, req: &Request, payload: Option<Bytes>) -> (u32, Option<Bytes>) {
    let fua = req.flags & CMD_FLAG_FUA != 0;
    let result = match req.command {
        CMD_READ => match device.read(req.offset, req.length).await {
            Ok(data) if data.len() == req.length as usize => return (NBD_OK, Some(data)),
            Ok(data) => {
                Err(BlockError::Io(format!("device returned {} bytes for a {} byte read", data.len(), req.length)))
            }
            Err(e) => Err(e),
        },
        CMD_WRITE => device.write(req.offset, payload.unwrap_or_default(), fua).await,
        CMD_FLUSH => device.flush().await,
        CMD_TRIM => device.trim(req.offset, req.length.into(), fua).await,
        CMD_WRITE_ZEROES => {
            let may_trim = req.flags & CMD_FLAG_NO_HOLE == 0;
            device.write_zeroes(req.offset, req.length.into(), fua, may_trim).await
        }
        _ => Err(BlockError::Invalid("unknown command".into())),
    };
    match result {
        Ok(()) => (NBD_OK, None),
        Err(e) => {
            let errno = e.nbd_errno_for(req.command);
            if matches!(e, BlockError::Fenced(_)) {
                warn!(command = command_name(req.command), offset = req.offset, "fenced request refused: {e}");
            } else {
                debug!(
                    command = command_name(req.command),
                    offset = req.offset,
                    errno = errno_name(errno),
                    "request failed: {e}"
                );
            }
            (errno, None)
        }
    }
}

/// Writes replies in completion order, batching those already queued into
/// one `writev`. Returns how many were errors. After a write failure it
/// keeps draining the queue so running requests can finish.
async fn write_replies<W: AsyncWrite + Unpin>(
    mut w: W,
    mut rx: mpsc::UnboundedReceiver<Reply>,
    broken: oneshot::Sender<()>,
) -> u64 {
    let mut batch = Batch::new();
    let mut held: Vec<Reply> = Vec::with_capacity(256);
    let mut errors = 0u64;
    let mut broken = Some(broken);
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        while let Some(reply) = next.take() {
            if reply.error != NBD_OK {
                errors += 1;
            }
            batch.push_slice(&SimpleReply { error: reply.error, handle: reply.handle }.encode());
            if let Some(data) = &reply.data {
                batch.push_payload(data.clone());
            }
            held.push(reply);
            if batch.len() < MAX_BATCH_BYTES {
                next = rx.try_recv().ok();
            }
        }
        if broken.is_some() {
            if let Err(e) = batch.write_to(&mut w).await {
                debug!(error = %e, "reply write failed; dropping further replies");
                if let Some(b) = broken.take() {
                    let _ = b.send(());
                }
            }
        } else {
            batch.clear();
        }
        held.clear();
    }
    if broken.is_some() {
        let _ = w.shutdown().await;
    }
    errors
}
