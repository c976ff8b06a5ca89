//! NBD wire format: constants and pure encoders/decoders for the fixed
//! newstyle handshake, option haggling and simple request/reply headers.
//!
//! Everything here works on byte slices and never panics, whatever the
//! input: decoders return [`ProtocolError`] for anything malformed. All
//! integers are big-endian on the wire.

use bytes::{BufMut, BytesMut};

use crate::{BlockError, ExportInfo};

// --- Handshake ---------------------------------------------------------

/// First 8 bytes of every newstyle greeting: "NBDMAGIC".
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// Second magic of a newstyle greeting and prefix of every option: "IHAVEOPT".
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Second magic of an oldstyle greeting (not supported, recognised to say so).
pub const OLDSTYLE_MAGIC: u64 = 0x0000_4202_8186_1253;
/// Magic of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;

/// Server handshake flag: fixed newstyle negotiation.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Server handshake flag: the 124 zero bytes after NBD_OPT_EXPORT_NAME may be omitted.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: the client speaks fixed newstyle.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: omit the 124 zero bytes.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Length of the server greeting: NBDMAGIC, IHAVEOPT, handshake flags.
pub const GREETING_LEN: usize = 18;
/// Length of an option request header: IHAVEOPT, option, data length.
pub const OPTION_HEADER_LEN: usize = 16;
/// Length of an option reply header: magic, option, reply type, data length.
pub const OPTION_REPLY_HEADER_LEN: usize = 20;
/// Zero padding after the NBD_OPT_EXPORT_NAME reply unless NO_ZEROES.
pub const EXPORT_NAME_PADDING: usize = 124;
/// Longest string (export name, message) the protocol allows.
pub const MAX_STRING_LEN: usize = 4096;

pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_PEEK_EXPORT: u32 = 4;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;
pub const OPT_EXTENDED_HEADERS: u32 = 11;

pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
/// Set in every error reply type.
pub const REP_FLAG_ERROR: u32 = 1 << 31;
pub const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR | 1;
pub const REP_ERR_POLICY: u32 = REP_FLAG_ERROR | 2;
pub const REP_ERR_INVALID: u32 = REP_FLAG_ERROR | 3;
pub const REP_ERR_PLATFORM: u32 = REP_FLAG_ERROR | 4;
pub const REP_ERR_TLS_REQD: u32 = REP_FLAG_ERROR | 5;
pub const REP_ERR_UNKNOWN: u32 = REP_FLAG_ERROR | 6;
pub const REP_ERR_SHUTDOWN: u32 = REP_FLAG_ERROR | 7;
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = REP_FLAG_ERROR | 8;
pub const REP_ERR_TOO_BIG: u32 = REP_FLAG_ERROR | 9;

pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

// --- Transmission flags (per export) -----------------------------------

pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
pub const TFLAG_ROTATIONAL: u16 = 1 << 4;
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TFLAG_SEND_DF: u16 = 1 << 7;
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub const TFLAG_SEND_RESIZE: u16 = 1 << 9;
pub const TFLAG_SEND_CACHE: u16 = 1 << 10;
pub const TFLAG_SEND_FAST_ZERO: u16 = 1 << 11;

// --- Transmission ------------------------------------------------------

pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Structured reply magic: recognised only to reject it cleanly.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
/// Length of a (compact) request header.
pub const REQUEST_LEN: usize = 28;
/// Length of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;
pub const CMD_RESIZE: u16 = 8;

pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;
pub const CMD_FLAG_PAYLOAD_LEN: u16 = 1 << 5;

// Error numbers carried in simple replies (fixed by the protocol, not the
// host's errno values).
pub const NBD_OK: u32 = 0;
pub const NBD_EPERM: u32 = 1;
pub const NBD_EIO: u32 = 5;
pub const NBD_ENOMEM: u32 = 12;
pub const NBD_EINVAL: u32 = 22;
pub const NBD_ENOSPC: u32 = 28;
pub const NBD_EOVERFLOW: u32 = 75;
pub const NBD_ENOTSUP: u32 = 95;
pub const NBD_ESHUTDOWN: u32 = 108;

/// Largest request this implementation sends or accepts (32 MiB): the
/// NBD_INFO_BLOCK_SIZE maximum the server advertises.
pub const MAX_REQUEST_LEN: u32 = 32 << 20;
/// Smallest block size advertised by the server.
pub const MIN_BLOCK_SIZE: u32 = 512;

/// A malformed message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("bad magic {found:#x} (expected {expected:#x})")]
    BadMagic { expected: u64, found: u64 },
    #[error("message truncated: need {need} bytes, have {have}")]
    Truncated { need: usize, have: usize },
    #[error("{0}")]
    Malformed(&'static str),
}

fn be_u16(b: &[u8], at: usize) -> Result<u16, ProtocolError> {
    match b.get(at..at + 2) {
        Some(s) => Ok(u16::from_be_bytes([s[0], s[1]])),
        None => Err(ProtocolError::Truncated { need: at + 2, have: b.len() }),
    }
}

fn be_u32(b: &[u8], at: usize) -> Result<u32, ProtocolError> {
    match b.get(at..at + 4) {
        Some(s) => Ok(u32::from_be_bytes([s[0], s[1], s[2], s[3]])),
        None => Err(ProtocolError::Truncated { need: at + 4, have: b.len() }),
    }
}

fn be_u64(b: &[u8], at: usize) -> Result<u64, ProtocolError> {
    match b.get(at..at + 8) {
        Some(s) => {
            let mut a = [0u8; 8];
            a.copy_from_slice(s);
            Ok(u64::from_be_bytes(a))
        }
        None => Err(ProtocolError::Truncated { need: at + 8, have: b.len() }),
    }
}

fn utf8_string(b: &[u8]) -> Result<String, ProtocolError> {
    if b.len() > MAX_STRING_LEN {
        return Err(ProtocolError::Malformed("string longer than 4096 bytes"));
    }
    if b.contains(&0) {
        return Err(ProtocolError::Malformed("string contains NUL"));
    }
    String::from_utf8(b.to_vec()).map_err(|_| ProtocolError::Malformed("string is not UTF-8"))
}

// --- Greeting ----------------------------------------------------------

/// The server's newstyle greeting.
pub fn encode_greeting(handshake_flags: u16) -> [u8; GREETING_LEN] {
    let mut out = [0u8; GREETING_LEN];
    out[0..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    out[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    out[16..18].copy_from_slice(&handshake_flags.to_be_bytes());
    out
}

/// Parses the server greeting; returns the handshake flags.
pub fn decode_greeting(b: &[u8]) -> Result<u16, ProtocolError> {
    let magic = be_u64(b, 0)?;
    if magic != NBDMAGIC {
        return Err(ProtocolError::BadMagic { expected: NBDMAGIC, found: magic });
    }
    let second = be_u64(b, 8)?;
    if second == OLDSTYLE_MAGIC {
        return Err(ProtocolError::Malformed("oldstyle negotiation is not supported"));
    }
    if second != IHAVEOPT {
        return Err(ProtocolError::BadMagic { expected: IHAVEOPT, found: second });
    }
    be_u16(b, 16)
}

// --- Options (client to server) ----------------------------------------

/// Header of an option request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub length: u32,
}

pub fn decode_option_header(b: &[u8]) -> Result<OptionHeader, ProtocolError> {
    let magic = be_u64(b, 0)?;
    if magic != IHAVEOPT {
        return Err(ProtocolError::BadMagic { expected: IHAVEOPT, found: magic });
    }
    Ok(OptionHeader { option: be_u32(b, 8)?, length: be_u32(b, 12)? })
}

/// A whole option request (header and data).
pub fn encode_option(option: u32, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(OPTION_HEADER_LEN + data.len());
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
    out
}

/// Data of NBD_OPT_INFO / NBD_OPT_GO.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    pub name: String,
    /// NBD_INFO_* types the client asked for.
    pub requests: Vec<u16>,
}

pub fn decode_info_request(b: &[u8]) -> Result<InfoRequest, ProtocolError> {
    let name_len = be_u32(b, 0)? as usize;
    if name_len > MAX_STRING_LEN {
        return Err(ProtocolError::Malformed("export name longer than 4096 bytes"));
    }
    let name_end = 4 + name_len;
    let name = match b.get(4..name_end) {
        Some(n) => utf8_string(n)?,
        None => return Err(ProtocolError::Truncated { need: name_end, have: b.len() }),
    };
    let count = be_u16(b, name_end)? as usize;
    let list_start = name_end + 2;
    let expected = list_start + 2 * count;
    if b.len() != expected {
        return Err(ProtocolError::Malformed("info request length does not match its contents"));
    }
    let mut requests = Vec::with_capacity(count);
    for i in 0..count {
        requests.push(be_u16(b, list_start + 2 * i)?);
    }
    Ok(InfoRequest { name, requests })
}

pub fn encode_info_request(name: &str, requests: &[u16]) -> Vec<u8> {
    let mut out = Vec::with_capacity(6 + name.len() + 2 * requests.len());
    out.extend_from_slice(&(name.len() as u32).to_be_bytes());
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(&(requests.len() as u16).to_be_bytes());
    for r in requests {
        out.extend_from_slice(&r.to_be_bytes());
    }
    out
}

/// Data of NBD_OPT_EXPORT_NAME: the whole payload is the name.
pub fn decode_export_name(b: &[u8]) -> Result<String, ProtocolError> {
    utf8_string(b)
}

// --- Option replies (server to client) ---------------------------------

/// Header of an option reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReplyHeader {
    pub option: u32,
    pub reply_type: u32,
    pub length: u32,
}

/// Appends a whole option reply to `out`.
pub fn encode_option_reply(out: &mut BytesMut, option: u32, reply_type: u32, data: &[u8]) {
    out.reserve(OPTION_REPLY_HEADER_LEN + data.len());
    out.put_u64(OPTION_REPLY_MAGIC);
    out.put_u32(option);
    out.put_u32(reply_type);
    out.put_u32(data.len() as u32);
    out.put_slice(data);
}

pub fn decode_option_reply_header(b: &[u8]) -> Result<OptionReplyHeader, ProtocolError> {
    let magic = be_u64(b, 0)?;
    if magic != OPTION_REPLY_MAGIC {
        return Err(ProtocolError::BadMagic { expected: OPTION_REPLY_MAGIC, found: magic });
    }
    Ok(OptionReplyHeader { option: be_u32(b, 8)?, reply_type: be_u32(b, 12)?, length: be_u32(b, 16)? })
}

/// Payload of one NBD_REP_INFO reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Info {
    Export {
        size: u64,
        flags: u16,
    },
    Name(String),
    Description(String),
    BlockSize {
        min: u32,
        preferred: u32,
        max: u32,
    },
    /// An information type this implementation does not know.
    Other(u16),
}

pub fn encode_info(info: &Info) -> Vec<u8> {
    let mut out = Vec::new();
    match info {
        Info::Export { size, flags } => {
            out.extend_from_slice(&INFO_EXPORT.to_be_bytes());
            out.extend_from_slice(&size.to_be_bytes());
            out.extend_from_slice(&flags.to_be_bytes());
        }
        Info::Name(n) => {
            out.extend_from_slice(&INFO_NAME.to_be_bytes());
            out.extend_from_slice(n.as_bytes());
        }
        Info::Description(d) => {
            out.extend_from_slice(&INFO_DESCRIPTION.to_be_bytes());
            out.extend_from_slice(d.as_bytes());
        }
        Info::BlockSize { min, preferred, max } => {
            out.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
            out.extend_from_slice(&min.to_be_bytes());
            out.extend_from_slice(&preferred.to_be_bytes());
            out.extend_from_slice(&max.to_be_bytes());
        }
        Info::Other(t) => out.extend_from_slice(&t.to_be_bytes()),
    }
    out
}

pub fn decode_info(b: &[u8]) -> Result<Info, ProtocolError> {
    let kind = be_u16(b, 0)?;
    let body = &b[2..];
    let exact = |n: usize| {
        if body.len() == n {
            Ok(())
        } else {
            Err(ProtocolError::Malformed("NBD_REP_INFO payload has the wrong length"))
        }
    };
    match kind {
        INFO_EXPORT => {
            exact(10)?;
            Ok(Info::Export { size: be_u64(body, 0)?, flags: be_u16(body, 8)? })
        }
        INFO_NAME => Ok(Info::Name(utf8_string(body)?)),
        INFO_DESCRIPTION => Ok(Info::Description(utf8_string(body)?)),
        INFO_BLOCK_SIZE => {
            exact(12)?;
            Ok(Info::BlockSize { min: be_u32(body, 0)?, preferred: be_u32(body, 4)?, max: be_u32(body, 8)? })
        }
        other => Ok(Info::Other(other)),
    }
}

/// Payload of one NBD_REP_SERVER reply (an NBD_OPT_LIST entry).
pub fn encode_server_entry(entry: &ExportInfo) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + entry.name.len() + entry.description.len());
    out.extend_from_slice(&(entry.name.len() as u32).to_be_bytes());
    out.extend_from_slice(entry.name.as_bytes());
    out.extend_from_slice(entry.description.as_bytes());
    out
}

pub fn decode_server_entry(b: &[u8]) -> Result<ExportInfo, ProtocolError> {
    let name_len = be_u32(b, 0)? as usize;
    let name_end = 4usize.saturating_add(name_len);
    match b.get(4..name_end) {
        Some(n) => Ok(ExportInfo { name: utf8_string(n)?, description: utf8_string(&b[name_end..])? }),
        None => Err(ProtocolError::Truncated { need: name_end, have: b.len() }),
    }
}

/// The reply to NBD_OPT_EXPORT_NAME: size, transmission flags and, unless
/// NO_ZEROES was agreed, 124 zero bytes.
pub fn encode_export_name_reply(size: u64, flags: u16, no_zeroes: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(10 + EXPORT_NAME_PADDING);
    out.extend_from_slice(&size.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    if !no_zeroes {
        out.resize(10 + EXPORT_NAME_PADDING, 0);
    }
    out
}

/// Human-readable name of an option reply type, for error messages.
pub fn reply_type_name(reply_type: u32) -> &'static str {
    match reply_type {
        REP_ACK => "NBD_REP_ACK",
        REP_SERVER => "NBD_REP_SERVER",
        REP_INFO => "NBD_REP_INFO",
        REP_META_CONTEXT => "NBD_REP_META_CONTEXT",
        REP_ERR_UNSUP => "NBD_REP_ERR_UNSUP",
        REP_ERR_POLICY => "NBD_REP_ERR_POLICY",
        REP_ERR_INVALID => "NBD_REP_ERR_INVALID",
        REP_ERR_PLATFORM => "NBD_REP_ERR_PLATFORM",
        REP_ERR_TLS_REQD => "NBD_REP_ERR_TLS_REQD",
        REP_ERR_UNKNOWN => "NBD_REP_ERR_UNKNOWN",
        REP_ERR_SHUTDOWN => "NBD_REP_ERR_SHUTDOWN",
        REP_ERR_BLOCK_SIZE_REQD => "NBD_REP_ERR_BLOCK_SIZE_REQD",
        REP_ERR_TOO_BIG => "NBD_REP_ERR_TOO_BIG",
        _ => "unknown reply type",
    }
}

// --- Requests and simple replies ---------------------------------------

/// A request header (compact form, no extended headers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    /// NBD_CMD_* (kept raw so unknown commands can be answered).
    pub command: u16,
    /// The client's cookie, echoed in the reply.
    pub handle: u64,
    pub offset: u64,
    pub length: u32,
}

impl Request {
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut out = [0u8; REQUEST_LEN];
        out[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        out[4..6].copy_from_slice(&self.flags.to_be_bytes());
        out[6..8].copy_from_slice(&self.command.to_be_bytes());
        out[8..16].copy_from_slice(&self.handle.to_be_bytes());
        out[16..24].copy_from_slice(&self.offset.to_be_bytes());
        out[24..28].copy_from_slice(&self.length.to_be_bytes());
        out
    }

    pub fn decode(b: &[u8]) -> Result<Request, ProtocolError> {
        let magic = be_u32(b, 0)?;
        if magic != REQUEST_MAGIC {
            return Err(ProtocolError::BadMagic { expected: REQUEST_MAGIC.into(), found: magic.into() });
        }
        Ok(Request {
            flags: be_u16(b, 4)?,
            command: be_u16(b, 6)?,
            handle: be_u64(b, 8)?,
            offset: be_u64(b, 16)?,
            length: be_u32(b, 24)?,
        })
    }

    /// Whether a request of this command carries `length` bytes of payload.
    pub fn has_payload(&self) -> bool {
        self.command == CMD_WRITE
    }
}

/// A simple reply header. A successful NBD_CMD_READ reply is followed by
/// exactly the requested number of bytes; error replies carry no data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimpleReply {
    pub error: u32,
    pub handle: u64,
}

impl SimpleReply {
    pub fn encode(&self) -> [u8; SIMPLE_REPLY_LEN] {
        let mut out = [0u8; SIMPLE_REPLY_LEN];
        out[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
        out[4..8].copy_from_slice(&self.error.to_be_bytes());
        out[8..16].copy_from_slice(&self.handle.to_be_bytes());
        out
    }

    pub fn decode(b: &[u8]) -> Result<SimpleReply, ProtocolError> {
        let magic = be_u32(b, 0)?;
        if magic == STRUCTURED_REPLY_MAGIC {
            return Err(ProtocolError::Malformed("structured reply received but never negotiated"));
        }
        if magic != SIMPLE_REPLY_MAGIC {
            return Err(ProtocolError::BadMagic { expected: SIMPLE_REPLY_MAGIC.into(), found: magic.into() });
        }
        Ok(SimpleReply { error: be_u32(b, 4)?, handle: be_u64(b, 8)? })
    }
}

/// Human-readable command name, for logs.
pub fn command_name(command: u16) -> &'static str {
    match command {
        CMD_READ => "read",
        CMD_WRITE => "write",
        CMD_DISC => "disconnect",
        CMD_FLUSH => "flush",
        CMD_TRIM => "trim",
        CMD_CACHE => "cache",
        CMD_WRITE_ZEROES => "write_zeroes",
        CMD_BLOCK_STATUS => "block_status",
        CMD_RESIZE => "resize",
        _ => "unknown",
    }
}

/// Human-readable name of an NBD error number, for logs and messages.
pub fn errno_name(errno: u32) -> &'static str {
    match errno {
        NBD_OK => "OK",
        NBD_EPERM => "EPERM",
        NBD_EIO => "EIO",
        NBD_ENOMEM => "ENOMEM",
        NBD_EINVAL => "EINVAL",
        NBD_ENOSPC => "ENOSPC",
        NBD_EOVERFLOW => "EOVERFLOW",
        NBD_ENOTSUP => "ENOTSUP",
        NBD_ESHUTDOWN => "ESHUTDOWN",
        _ => "unknown error",
    }
}

// --- Error mapping -----------------------------------------------------

impl BlockError {
    /// The NBD error number for this error in a reply to a read (or any
    /// command other than a write). See [`BlockError::nbd_errno_for`].
    ///
    /// [`BlockError::Fenced`] maps to `NBD_EIO`, not `NBD_EPERM`: a write
    /// from a stale attachment must reach the filesystem as an I/O error
    /// (every client turns EIO into a failed bio, while EPERM would look like
    /// a read-only device to a reconnecting client). The server logs fenced
    /// requests under their own message so they stay distinguishable.
    pub fn nbd_errno(&self) -> u32 {
        match self {
            BlockError::Io(_) | BlockError::Fenced(_) => NBD_EIO,
            BlockError::OutOfRange => NBD_EINVAL,
            BlockError::ReadOnly => NBD_EPERM,
            BlockError::NoSpace => NBD_ENOSPC,
            BlockError::Invalid(_) => NBD_EINVAL,
            BlockError::Unavailable(_) => NBD_ESHUTDOWN,
        }
    }

    /// The NBD error number for this error in a reply to `command`: as
    /// [`BlockError::nbd_errno`], except that a write or write-zeroes past
    /// the end of the device is `NBD_ENOSPC`, as the protocol asks.
    pub fn nbd_errno_for(&self, command: u16) -> u32 {
        match (self, command) {
            (BlockError::OutOfRange, CMD_WRITE | CMD_WRITE_ZEROES) => NBD_ENOSPC,
            _ => self.nbd_errno(),
        }
    }

    /// The error a client reports for an NBD error number. The wire cannot
    /// say whether EINVAL/ENOSPC meant "past the end": callers that know the
    /// device size refine that to [`BlockError::OutOfRange`].
    pub fn from_nbd_errno(errno: u32) -> BlockError {
        match errno {
            NBD_EPERM => BlockError::ReadOnly,
            NBD_EIO => BlockError::Io("the NBD server reported an I/O error (EIO)".into()),
            NBD_ENOMEM => BlockError::Io("the NBD server is out of memory (ENOMEM)".into()),
            NBD_EINVAL => BlockError::Invalid("the NBD server rejected the request (EINVAL)".into()),
            NBD_ENOSPC => BlockError::NoSpace,
            NBD_EOVERFLOW => BlockError::Invalid("request too large for the NBD server (EOVERFLOW)".into()),
            NBD_ENOTSUP => BlockError::Invalid("operation not supported by the NBD server (ENOTSUP)".into()),
            NBD_ESHUTDOWN => BlockError::Unavailable("the NBD server is shutting down (ESHUTDOWN)".into()),
            other => BlockError::Io(format!("the NBD server reported error {other}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn request_round_trip() {
        let r = Request { flags: CMD_FLAG_FUA, command: CMD_WRITE, handle: 0xdead_beef, offset: 4096, length: 512 };
        assert_eq!(Request::decode(&r.encode()), Ok(r));
    }

    #[test]
    fn reply_round_trip() {
        let r = SimpleReply { error: NBD_EINVAL, handle: u64::MAX };
        assert_eq!(SimpleReply::decode(&r.encode()), Ok(r));
    }

    #[test]
    fn greeting_round_trip() {
        let g = encode_greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        assert_eq!(decode_greeting(&g), Ok(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES));
    }

    #[test]
    fn info_request_round_trip_and_length_check() {
        let b = encode_info_request("vol-1", &[INFO_BLOCK_SIZE, INFO_NAME]);
        assert_eq!(
            decode_info_request(&b),
            Ok(InfoRequest { name: "vol-1".into(), requests: vec![INFO_BLOCK_SIZE, INFO_NAME] })
        );
        let mut longer = b.clone();
        longer.push(0);
        assert!(decode_info_request(&longer).is_err());
        assert!(decode_info_request(&b[..b.len() - 1]).is_err());
        let mut huge = b.clone();
        huge[0..4].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(decode_info_request(&huge).is_err());
    }

    #[test]
    fn infos_round_trip() {
        for info in [
            Info::Export { size: 1 << 40, flags: TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH },
            Info::Name("n".into()),
            Info::Description("d".into()),
            Info::BlockSize { min: 512, preferred: 4096, max: MAX_REQUEST_LEN },
        ] {
            assert_eq!(decode_info(&encode_info(&info)), Ok(info));
        }
        assert!(decode_info(&encode_info(&Info::Export { size: 1, flags: 1 })[..11]).is_err());
    }

    #[test]
    fn server_entry_round_trip() {
        let e = ExportInfo { name: "a".into(), description: "the a volume".into() };
        assert_eq!(decode_server_entry(&encode_server_entry(&e)), Ok(e));
    }

    #[test]
    fn option_reply_round_trip() {
        let mut b = BytesMut::new();
        encode_option_reply(&mut b, OPT_GO, REP_ERR_UNKNOWN, b"no such export");
        let h = decode_option_reply_header(&b).unwrap();
        assert_eq!(h, OptionReplyHeader { option: OPT_GO, reply_type: REP_ERR_UNKNOWN, length: 14 });
        assert_eq!(&b[OPTION_REPLY_HEADER_LEN..], b"no such export");
    }

    #[test]
    fn errno_mapping() {
        assert_eq!(BlockError::Io("x".into()).nbd_errno(), NBD_EIO);
        assert_eq!(BlockError::Fenced("g3 < g4".into()).nbd_errno(), NBD_EIO);
        assert_eq!(BlockError::OutOfRange.nbd_errno_for(CMD_READ), NBD_EINVAL);
        assert_eq!(BlockError::OutOfRange.nbd_errno_for(CMD_TRIM), NBD_EINVAL);
        assert_eq!(BlockError::OutOfRange.nbd_errno_for(CMD_WRITE), NBD_ENOSPC);
        assert_eq!(BlockError::OutOfRange.nbd_errno_for(CMD_WRITE_ZEROES), NBD_ENOSPC);
        assert_eq!(BlockError::ReadOnly.nbd_errno(), NBD_EPERM);
        assert_eq!(BlockError::NoSpace.nbd_errno(), NBD_ENOSPC);
        assert_eq!(BlockError::Invalid("x".into()).nbd_errno(), NBD_EINVAL);
        assert_eq!(BlockError::Unavailable("x".into()).nbd_errno(), NBD_ESHUTDOWN);
        assert_eq!(BlockError::from_nbd_errno(NBD_EPERM), BlockError::ReadOnly);
        assert_eq!(BlockError::from_nbd_errno(NBD_ENOSPC), BlockError::NoSpace);
        assert!(matches!(BlockError::from_nbd_errno(NBD_ESHUTDOWN), BlockError::Unavailable(_)));
        assert!(matches!(BlockError::from_nbd_errno(NBD_EINVAL), BlockError::Invalid(_)));
        assert!(matches!(BlockError::from_nbd_errno(NBD_EIO), BlockError::Io(_)));
        assert!(matches!(BlockError::from_nbd_errno(9999), BlockError::Io(_)));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn decoders_never_panic(b in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode_greeting(&b);
            let _ = decode_option_header(&b);
            let _ = decode_info_request(&b);
            let _ = decode_export_name(&b);
            let _ = decode_option_reply_header(&b);
            let _ = decode_info(&b);
            let _ = decode_server_entry(&b);
            let _ = Request::decode(&b);
            let _ = SimpleReply::decode(&b);
        }

        #[test]
        fn info_request_decoder_never_panics_on_plausible_input(
            name_len in 0u32..6000,
            name in proptest::collection::vec(any::<u8>(), 0..40),
            count in any::<u16>(),
            tail in proptest::collection::vec(any::<u8>(), 0..40),
        ) {
            let mut b = name_len.to_be_bytes().to_vec();
            b.extend_from_slice(&name);
            b.extend_from_slice(&count.to_be_bytes());
            b.extend_from_slice(&tail);
            let _ = decode_info_request(&b);
        }

        #[test]
        fn request_round_trips(flags: u16, command: u16, handle: u64, offset: u64, length: u32) {
            let r = Request { flags, command, handle, offset, length };
            prop_assert_eq!(Request::decode(&r.encode()), Ok(r));
        }

        #[test]
        fn bad_request_magic_is_rejected(magic in any::<u32>().prop_filter("not the magic", |m| *m != REQUEST_MAGIC), rest in proptest::collection::vec(any::<u8>(), 24)) {
            let mut b = magic.to_be_bytes().to_vec();
            b.extend_from_slice(&rest);
            prop_assert!(Request::decode(&b).is_err());
        }
    }
}
