//! Client side of the handshake: open an export with NBD_OPT_GO (falling
//! back to NBD_OPT_EXPORT_NAME), or query it with NBD_OPT_INFO.

use std::io;
use std::net::SocketAddr;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

use crate::protocol::*;

/// Buffer for reading replies: many reply headers per `read` syscall.
const READ_BUFFER: usize = 256 << 10;
/// Longest option reply accepted (no reply we expect comes close).
const MAX_OPTION_REPLY: u32 = 64 << 10;

#[derive(Debug, thiserror::Error)]
pub(crate) enum HandshakeError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("server refused the export ({kind}): {message}")]
    Refused { reply_type: u32, kind: &'static str, message: String },
}

impl From<ProtocolError> for HandshakeError {
    fn from(e: ProtocolError) -> Self {
        HandshakeError::Protocol(e.to_string())
    }
}

/// What the handshake says about the export.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Geometry {
    pub size: u64,
    pub flags: u16,
    /// (minimum, preferred, maximum), if the server sent them.
    pub block_sizes: Option<(u32, u32, u32)>,
}

/// A connection in transmission phase.
pub(crate) struct Established {
    pub addr: SocketAddr,
    pub reader: BufReader<OwnedReadHalf>,
    pub writer: OwnedWriteHalf,
    pub geometry: Geometry,
}

async fn dial(addr: SocketAddr) -> io::Result<(BufReader<OwnedReadHalf>, OwnedWriteHalf)> {
    let sock = TcpStream::connect(addr).await?;
    // Requests are batched by the writer; Nagle would only add latency.
    sock.set_nodelay(true)?;
    let (r, w) = sock.into_split();
    Ok((BufReader::with_capacity(READ_BUFFER, r), w))
}

/// Connects to `addr` and opens `export` for transmission.
pub(crate) async fn open(addr: SocketAddr, export: &str) -> Result<Established, HandshakeError> {
    let (mut reader, mut writer) = dial(addr).await?;
    let no_zeroes = greet(&mut reader, &mut writer).await?;
    let geometry = match haggle_info(&mut reader, &mut writer, export, OPT_GO).await {
        Ok(g) => g,
        Err(HandshakeError::Refused { reply_type: REP_ERR_UNSUP, .. }) => {
            export_name(&mut reader, &mut writer, export, no_zeroes).await?
        }
        Err(e) => return Err(e),
    };
    Ok(Established { addr, reader, writer, geometry })
}

/// Connects to `addr`, asks about `export` with NBD_OPT_INFO and leaves
/// with NBD_OPT_ABORT, without entering transmission.
pub(crate) async fn query(addr: SocketAddr, export: &str) -> Result<Geometry, HandshakeError> {
    let (mut reader, mut writer) = dial(addr).await?;
    greet(&mut reader, &mut writer).await?;
    let geometry = haggle_info(&mut reader, &mut writer, export, OPT_INFO).await?;
    writer.write_all(&encode_option(OPT_ABORT, &[])).await?;
    writer.flush().await?;
    // The ack to ABORT is optional; do not wait for it.
    Ok(geometry)
}

/// Reads the greeting and answers with our flags; returns whether the 124
/// zero bytes after NBD_OPT_EXPORT_NAME are omitted.
async fn greet<R, W>(r: &mut R, w: &mut W) -> Result<bool, HandshakeError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut greeting = [0u8; GREETING_LEN];
    r.read_exact(&mut greeting).await?;
    let flags = decode_greeting(&greeting)?;
    if flags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(HandshakeError::Protocol("server does not offer fixed newstyle negotiation".into()));
    }
    let no_zeroes = flags & FLAG_NO_ZEROES != 0;
    let mut client_flags = FLAG_C_FIXED_NEWSTYLE;
    if no_zeroes {
        client_flags |= FLAG_C_NO_ZEROES;
    }
    w.write_all(&client_flags.to_be_bytes()).await?;
    Ok(no_zeroes)
}

async fn haggle_info<R, W>(r: &mut R, w: &mut W, export: &str, option: u32) -> Result<Geometry, HandshakeError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    w.write_all(&encode_option(option, &encode_info_request(export, &[INFO_BLOCK_SIZE]))).await?;
    w.flush().await?;
    let mut export_info = None;
    let mut block_sizes = None;
    loop {
        let mut hdr = [0u8; OPTION_REPLY_HEADER_LEN];
        r.read_exact(&mut hdr).await?;
        let hdr = decode_option_reply_header(&hdr)?;
        if hdr.option != option {
            return Err(HandshakeError::Protocol(format!("reply to option {} while waiting for {option}", hdr.option)));
        }
        if hdr.length > MAX_OPTION_REPLY {
            return Err(HandshakeError::Protocol(format!("option reply of {} bytes", hdr.length)));
        }
        let mut data = vec![0u8; hdr.length as usize];
        r.read_exact(&mut data).await?;
        match hdr.reply_type {
            REP_INFO => match decode_info(&data)? {
                Info::Export { size, flags } => export_info = Some((size, flags)),
                Info::BlockSize { min, preferred, max } => block_sizes = Some((min, preferred, max)),
                _ => {}
            },
            REP_ACK => {
                let (size, flags) = export_info
                    .ok_or_else(|| HandshakeError::Protocol("server acknowledged without NBD_INFO_EXPORT".into()))?;
                return Ok(Geometry { size, flags, block_sizes });
            }
            t if t & REP_FLAG_ERROR != 0 => {
                return Err(HandshakeError::Refused {
                    reply_type: t,
                    kind: reply_type_name(t),
                    message: String::from_utf8_lossy(&data).into_owned(),
                });
            }
            // Reply types from extensions we never asked for: skip them.
            _ => {}
        }
    }
}

/// The pre-NBD_OPT_GO way in, for servers that do not know GO.
async fn export_name<R, W>(r: &mut R, w: &mut W, export: &str, no_zeroes: bool) -> Result<Geometry, HandshakeError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    w.write_all(&encode_option(OPT_EXPORT_NAME, export.as_bytes())).await?;
    w.flush().await?;
    let size = r.read_u64().await?;
    let flags = r.read_u16().await?;
    if !no_zeroes {
        let mut pad = [0u8; EXPORT_NAME_PADDING];
        r.read_exact(&mut pad).await?;
    }
    Ok(Geometry { size, flags, block_sizes: None })
}
