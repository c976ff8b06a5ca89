//! Server side of the fixed newstyle handshake and option haggling.

use std::io;
use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tracing::debug;

use super::{transmission::export_flags, ConnectionEnd, ServerOptions};
use crate::protocol::*;
use crate::wire::discard;
use crate::{BlockDevice, ExportResolver, OpenError};

/// Option data longer than this is refused with NBD_REP_ERR_TOO_BIG (no
/// option we support needs more than a 4 KiB name and a few info types).
const MAX_OPTION_LEN: u32 = 64 << 10;
/// Option data longer than this is not even skipped: the connection is cut.
const MAX_SKIPPABLE_OPTION_LEN: u32 = 1 << 20;

pub(super) enum Outcome {
    /// NBD_OPT_GO or NBD_OPT_EXPORT_NAME succeeded.
    Transmit { export: String, device: Arc<dyn BlockDevice> },
    /// The client aborted (NBD_OPT_ABORT) or the server is shutting down.
    Ended,
}

#[derive(Debug, thiserror::Error)]
pub(super) enum HandshakeError {
    #[error("connection error: {0}")]
    Io(#[from] io::Error),
    #[error("{0}")]
    Protocol(String),
    #[error("{0}")]
    ExportRefused(String),
}

impl HandshakeError {
    pub(super) fn into_end(self) -> ConnectionEnd {
        match self {
            HandshakeError::Io(_) => ConnectionEnd::Closed,
            HandshakeError::Protocol(m) => ConnectionEnd::ProtocolError(m),
            HandshakeError::ExportRefused(m) => ConnectionEnd::ExportRefused(m),
        }
    }
}

/// Greets the client and haggles options until it picks an export (or
/// leaves). Every option gets a reply; only a broken byte stream (bad
/// magic, unknown client flags, absurd lengths) closes the connection.
pub(super) async fn negotiate<R, W>(
    r: &mut R,
    w: &mut W,
    resolver: &dyn ExportResolver,
    opts: &ServerOptions,
) -> Result<Outcome, HandshakeError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    w.write_all(&encode_greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)).await?;
    w.flush().await?;

    let client_flags = r.read_u32().await?;
    let known = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES;
    if client_flags & !known != 0 {
        return Err(HandshakeError::Protocol(format!("unknown client flags {client_flags:#x}")));
    }
    if client_flags & FLAG_C_FIXED_NEWSTYLE == 0 {
        return Err(HandshakeError::Protocol("client does not speak fixed newstyle negotiation".into()));
    }
    let no_zeroes = client_flags & FLAG_C_NO_ZEROES != 0;

    let mut out = BytesMut::with_capacity(4096);
    loop {
        let mut hdr = [0u8; OPTION_HEADER_LEN];
        r.read_exact(&mut hdr).await?;
        let hdr = decode_option_header(&hdr).map_err(|e| HandshakeError::Protocol(format!("option header: {e}")))?;
        if hdr.length > MAX_OPTION_LEN {
            if hdr.length > MAX_SKIPPABLE_OPTION_LEN {
                return Err(HandshakeError::Protocol(format!("option data of {} bytes", hdr.length)));
            }
            discard(r, hdr.length.into()).await?;
            let msg = format!("option data of {} bytes exceeds the {MAX_OPTION_LEN} byte limit", hdr.length);
            reply(w, &mut out, hdr.option, REP_ERR_TOO_BIG, msg.as_bytes()).await?;
            continue;
        }
        let mut data = vec![0u8; hdr.length as usize];
        r.read_exact(&mut data).await?;
        debug!(option = hdr.option, len = hdr.length, "nbd option");

        match hdr.option {
            OPT_EXPORT_NAME => {
                // This option has no error reply: refusing means closing.
                let name = decode_export_name(&data)
                    .map_err(|e| HandshakeError::ExportRefused(format!("bad export name: {e}")))?;
                let device = resolver.open(&name).await.map_err(|e| HandshakeError::ExportRefused(e.to_string()))?;
                let size = device.size();
                w.write_all(&encode_export_name_reply(size, export_flags(device.as_ref()), no_zeroes)).await?;
                w.flush().await?;
                return Ok(Outcome::Transmit { export: name, device });
            }
            OPT_ABORT => {
                // The client may already have gone; the ack is a courtesy.
                let _ = reply(w, &mut out, OPT_ABORT, REP_ACK, &[]).await;
                return Ok(Outcome::Ended);
            }
            OPT_LIST => {
                if !data.is_empty() {
                    reply(w, &mut out, OPT_LIST, REP_ERR_INVALID, b"NBD_OPT_LIST takes no data").await?;
                    continue;
                }
                for entry in resolver.list().await {
                    encode_option_reply(&mut out, OPT_LIST, REP_SERVER, &encode_server_entry(&entry));
                }
                reply(w, &mut out, OPT_LIST, REP_ACK, &[]).await?;
            }
            OPT_INFO | OPT_GO => {
                let req = match decode_info_request(&data) {
                    Ok(req) => req,
                    Err(e) => {
                        let msg = format!("malformed request: {e}");
                        reply(w, &mut out, hdr.option, REP_ERR_INVALID, msg.as_bytes()).await?;
                        continue;
                    }
                };
                let device = match resolver.open(&req.name).await {
                    Ok(d) => d,
                    Err(e) => {
                        let code = match e {
                            OpenError::Unknown(_) => REP_ERR_UNKNOWN,
                            OpenError::Policy(_) => REP_ERR_POLICY,
                            OpenError::Unavailable(_) => REP_ERR_SHUTDOWN,
                        };
                        reply(w, &mut out, hdr.option, code, e.to_string().as_bytes()).await?;
                        continue;
                    }
                };
                let info = Info::Export { size: device.size(), flags: export_flags(device.as_ref()) };
                encode_option_reply(&mut out, hdr.option, REP_INFO, &encode_info(&info));
                if req.requests.contains(&INFO_NAME) {
                    encode_option_reply(&mut out, hdr.option, REP_INFO, &encode_info(&Info::Name(req.name.clone())));
                }
                // Sent even when not asked for (the protocol allows it), so
                // clients that can use the preferred size do.
                let sizes = block_sizes(device.as_ref(), opts);
                encode_option_reply(&mut out, hdr.option, REP_INFO, &encode_info(&sizes));
                reply(w, &mut out, hdr.option, REP_ACK, &[]).await?;
                if hdr.option == OPT_GO {
                    return Ok(Outcome::Transmit { export: req.name, device });
                }
            }
            other => {
                // STARTTLS, STRUCTURED_REPLY, meta contexts, extended headers
                // and anything newer: the client falls back to the basics.
                let msg = format!("option {other} is not supported by this server");
                reply(w, &mut out, other, REP_ERR_UNSUP, msg.as_bytes()).await?;
            }
        }
    }
}

/// The NBD_INFO_BLOCK_SIZE this server advertises: minimum 512, preferred
/// the device's block size (as a power of two within range), maximum the
/// request limit.
pub(super) fn block_sizes(device: &dyn BlockDevice, opts: &ServerOptions) -> Info {
    let max = (opts.max_request_len.max(MIN_BLOCK_SIZE) / MIN_BLOCK_SIZE) * MIN_BLOCK_SIZE;
    let preferred = device.block_size().clamp(MIN_BLOCK_SIZE, max);
    let preferred = if preferred.is_power_of_two() { preferred } else { preferred.next_power_of_two() / 2 };
    Info::BlockSize { min: MIN_BLOCK_SIZE, preferred: preferred.max(MIN_BLOCK_SIZE), max }
}

/// Appends one reply to `out` and sends everything queued there.
async fn reply<W: AsyncWrite + Unpin>(
    w: &mut W,
    out: &mut BytesMut,
    option: u32,
    reply_type: u32,
    data: &[u8],
) -> io::Result<()> {
    encode_option_reply(out, option, reply_type, data);
    w.write_all(out).await?;
    out.clear();
    w.flush().await
}
