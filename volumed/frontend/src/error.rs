//! Errors of the frontends, and how device errors become errno values for
//! the kernel (FUSE replies).

use std::io;
use std::path::PathBuf;

use volumed_nbd::BlockError;

use crate::FrontendKind;

/// Why attaching, resizing or detaching a device failed.
#[derive(Debug, thiserror::Error)]
pub enum FrontendError {
    /// The frontend cannot work on this host (kernel module or device node
    /// missing). The message says what is missing.
    #[error("the {kind} frontend is not available on this host: {reason}")]
    Unavailable { kind: FrontendKind, reason: String },
    /// The caller asked for something that cannot be done (bad size, bad
    /// volume id, missing transmission server, shrinking).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The device is still in use (mounted or opened by someone else), so it
    /// was left attached.
    #[error("{device} is busy: {reason}")]
    Busy { device: PathBuf, reason: String },
    /// A system call or kernel interface failed.
    #[error("{op}: {source}")]
    Io {
        op: String,
        #[source]
        source: io::Error,
    },
    /// The kernel refused a generic-netlink request.
    #[error("netlink {op}: {source}")]
    Netlink {
        op: String,
        #[source]
        source: io::Error,
    },
    /// The block device behind the frontend failed.
    #[error("block device: {0}")]
    Device(#[from] BlockError),
}

impl FrontendError {
    pub(crate) fn io(op: impl Into<String>, source: io::Error) -> Self {
        FrontendError::Io { op: op.into(), source }
    }
}

/// The errno the kernel sees for a failed device request.
///
/// Fencing and an unavailable volume (the reconnecting client has given
/// up) are plain I/O errors for the filesystem above: it must not retry on
/// its own, and a read-only remount is its usual reaction to EIO.
pub fn block_error_errno(err: &BlockError) -> i32 {
    match err {
        BlockError::Io(_) | BlockError::Fenced(_) | BlockError::Unavailable(_) => libc::EIO,
        BlockError::OutOfRange | BlockError::Invalid(_) => libc::EINVAL,
        BlockError::ReadOnly => libc::EROFS,
        BlockError::NoSpace => libc::ENOSPC,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_mapping() {
        assert_eq!(block_error_errno(&BlockError::Io("x".into())), libc::EIO);
        assert_eq!(block_error_errno(&BlockError::Fenced("g".into())), libc::EIO);
        assert_eq!(block_error_errno(&BlockError::Unavailable("no leader".into())), libc::EIO);
        assert_eq!(block_error_errno(&BlockError::NoSpace), libc::ENOSPC);
        assert_eq!(block_error_errno(&BlockError::ReadOnly), libc::EROFS);
        assert_eq!(block_error_errno(&BlockError::OutOfRange), libc::EINVAL);
        assert_eq!(block_error_errno(&BlockError::Invalid("misaligned".into())), libc::EINVAL);
    }
}
