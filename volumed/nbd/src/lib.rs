//! The NBD protocol for volumed, and the [`BlockDevice`] contract that joins
//! the pieces of the block data path:
//!
//! - the volume engine implements [`BlockDevice`] for a volume it leads;
//! - [`server`] exports any [`BlockDevice`] over NBD (fixed newstyle);
//! - [`client`] is a reconnecting NBD client that is itself a
//!   [`BlockDevice`], used by the node frontends and for forwarding to a
//!   volume's leader.
//!
//! # What is supported
//!
//! Handshake: fixed newstyle only, with `NO_ZEROES`. Options:
//! `NBD_OPT_EXPORT_NAME`, `NBD_OPT_GO`, `NBD_OPT_INFO` (replies
//! `NBD_INFO_EXPORT`, `NBD_INFO_BLOCK_SIZE` = 512 / the device's block size /
//! 32 MiB, and `NBD_INFO_NAME` when asked), `NBD_OPT_LIST`, `NBD_OPT_ABORT`.
//! Every other option (TLS, structured replies, meta contexts, extended
//! headers) gets `NBD_REP_ERR_UNSUP`, so clients fall back to simple replies.
//! Opening an export maps [`OpenError::Unknown`] to `NBD_REP_ERR_UNKNOWN`,
//! [`OpenError::Policy`] to `NBD_REP_ERR_POLICY` and
//! [`OpenError::Unavailable`] to `NBD_REP_ERR_SHUTDOWN`.
//!
//! Transmission: `READ`, `WRITE`, `FLUSH`, `TRIM`, `WRITE_ZEROES` (without
//! `NO_HOLE` the device may free the range), `DISC`; `FUA` on writes, trims
//! and write-zeroes. Exports advertise `HAS_FLAGS`, `SEND_FLUSH`, `SEND_FUA`,
//! `SEND_TRIM`, `SEND_WRITE_ZEROES`, `CAN_MULTI_CONN`, and `READ_ONLY` when
//! the device is read-only. Simple replies only; requests run concurrently
//! and may be answered out of order.
//!
//! # Error numbers
//!
//! | [`BlockError`] / condition          | NBD error            |
//! |-------------------------------------|----------------------|
//! | `Io`                                | `NBD_EIO` (5)        |
//! | `Fenced` (logged as fenced)         | `NBD_EIO` (5)        |
//! | `OutOfRange` on read / trim         | `NBD_EINVAL` (22)    |
//! | `OutOfRange` on write / write-zeroes| `NBD_ENOSPC` (28)    |
//! | `ReadOnly`                          | `NBD_EPERM` (1)      |
//! | `NoSpace`                           | `NBD_ENOSPC` (28)    |
//! | `Invalid`                           | `NBD_EINVAL` (22)    |
//! | `Unavailable`                       | `NBD_ESHUTDOWN` (108)|
//! | zero length, unknown command or flag| `NBD_EINVAL` (22)    |
//! | read or write longer than 32 MiB    | `NBD_EINVAL` (22)    |
//! | `FAST_ZERO` flag (never advertised) | `NBD_ENOTSUP` (95)   |
//!
//! A write longer than 32 MiB is answered `NBD_EINVAL` and the connection is
//! then closed (its payload cannot be skipped safely); a bad request magic
//! closes the connection. Trim and write-zeroes carry no payload and are
//! accepted up to the 32-bit length limit, as Linux and qemu send them.
//!
//! Fenced writes use `NBD_EIO` rather than `NBD_EPERM`: they must reach the
//! filesystem as I/O errors, and a reconnecting client reads `NBD_EPERM` as
//! "read-only export". The client maps error numbers back with
//! [`BlockError::from_nbd_errno`] (EPERM→`ReadOnly`, EIO/ENOMEM→`Io`,
//! EINVAL/EOVERFLOW/ENOTSUP→`Invalid`, ENOSPC→`NoSpace`,
//! ESHUTDOWN→`Unavailable`, anything else→`Io`), turning EINVAL/ENOSPC for a
//! range past the known end into `OutOfRange`. It never returns
//! `NBD_ESHUTDOWN` to its callers: it reconnects and replays instead.

use std::sync::Arc;

use bytes::Bytes;
use futures::future::BoxFuture;

pub mod client;
pub mod protocol;
pub mod server;
mod wire;

/// Why a block operation failed. Mapped to NBD error numbers at the wire
/// (see [`BlockError::nbd_errno`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BlockError {
    /// The data could not be read or written.
    #[error("I/O error: {0}")]
    Io(String),
    /// The writer's attachment generation is older than the volume's fence:
    /// the volume has been attached elsewhere since.
    #[error("fenced: {0}")]
    Fenced(String),
    /// The request reaches past the end of the device.
    #[error("request past the end of the device")]
    OutOfRange,
    /// Write to a read-only export.
    #[error("device is read-only")]
    ReadOnly,
    /// The volume has no space left for this write.
    #[error("no space left on the volume")]
    NoSpace,
    /// Malformed request (misaligned, zero or oversize length, bad flags).
    #[error("invalid request: {0}")]
    Invalid(String),
    /// This server cannot serve the volume right now (no leader, leadership
    /// moved, shutting down). Clients should reconnect and retry, possibly
    /// elsewhere: it is mapped to NBD_ESHUTDOWN on the wire.
    #[error("unavailable: {0}")]
    Unavailable(String),
}

/// A virtual block device: a volume on its leader, a remote NBD export, or a
/// test double. Offsets and lengths are in bytes. Implementations must be
/// safe to call concurrently; requests may complete out of order.
pub trait BlockDevice: Send + Sync + 'static {
    /// Current size in bytes (it may grow while the device is in use).
    fn size(&self) -> u64;
    /// Preferred I/O granularity in bytes (the engine's block size).
    fn block_size(&self) -> u32 {
        4096
    }
    fn read_only(&self) -> bool {
        false
    }
    fn read(&self, offset: u64, len: u32) -> BoxFuture<'_, Result<Bytes, BlockError>>;
    /// With `fua`, returns only once the data is durable (as after a flush).
    fn write(&self, offset: u64, data: Bytes, fua: bool) -> BoxFuture<'_, Result<(), BlockError>>;
    /// Returns once every write completed before this call is durable.
    fn flush(&self) -> BoxFuture<'_, Result<(), BlockError>>;
    /// Discard a range: it reads as zeros afterwards and its space is freed.
    fn trim(&self, offset: u64, len: u64, fua: bool) -> BoxFuture<'_, Result<(), BlockError>>;
    /// Write zeros; `may_trim` allows freeing the space (NBD without NO_HOLE).
    fn write_zeroes(&self, offset: u64, len: u64, fua: bool, may_trim: bool) -> BoxFuture<'_, Result<(), BlockError>>;
}

/// One entry of an export listing (NBD_OPT_LIST).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    pub name: String,
    pub description: String,
}

/// Why an export name could not be opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    /// No such export: NBD_REP_ERR_UNKNOWN.
    #[error("unknown export {0:?}")]
    Unknown(String),
    /// The export exists but may not be opened this way (for example a
    /// write connection without the current attachment generation):
    /// NBD_REP_ERR_POLICY.
    #[error("refused by policy: {0}")]
    Policy(String),
    /// Temporarily unavailable (no leader yet): NBD_REP_ERR_SHUTDOWN.
    #[error("unavailable: {0}")]
    Unavailable(String),
}

/// Maps export names to devices for the NBD server.
pub trait ExportResolver: Send + Sync + 'static {
    fn list(&self) -> BoxFuture<'_, Vec<ExportInfo>>;
    fn open(&self, name: &str) -> BoxFuture<'_, Result<Arc<dyn BlockDevice>, OpenError>>;
}
