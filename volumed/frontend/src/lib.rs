//! Node frontends: turn an `Arc<dyn BlockDevice>` (in production a
//! reconnecting NBD client to the volume's leader) into a local block
//! device node, hosted by the volumed daemon itself so that restarting the
//! CSI node plugin never interrupts I/O.
//!
//! Two frontends:
//!
//! - [`FrontendKind::FuseLoop`]: volumed serves the volume as the single
//!   file `<run_dir>/fuse/<volume_id>/disk` of a FUSE filesystem, and a loop
//!   device with direct I/O and 4 KiB blocks is bound to it. Works on any
//!   kernel with FUSE and loop.
//! - [`FrontendKind::KernelNbd`]: `/dev/nbdN` configured over generic
//!   netlink, each kernel socket one end of a socketpair whose other end is
//!   served in-process by an NBD transmission loop over the same device.
//!   The kernel never sees a failover: the device handles it.
//!
//! The daemon calls [`detect`] once, [`recover_stale`] at start-up, then
//! [`attach`] / [`AttachedDevice::resize`] / [`AttachedDevice::detach`] per
//! volume.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use volumed_nbd::BlockDevice;

mod error;
mod fuse_fs;
mod fuse_loop;
pub mod kernel_nbd;
mod loopdev;
mod mountinfo;
mod netlink;
mod stale;

pub use error::{block_error_errno, FrontendError};
pub use kernel_nbd::{TransmissionParams, TransmissionServer};
pub use stale::{recover_stale, StaleDevice};

/// Which frontend hosts a volume's block device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum FrontendKind {
    /// `/dev/nbdN` through the kernel NBD driver.
    KernelNbd,
    /// A loop device over a file served by volumed through FUSE.
    FuseLoop,
}

impl fmt::Display for FrontendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FrontendKind::KernelNbd => "kernel-nbd",
            FrontendKind::FuseLoop => "fuse-loop",
        })
    }
}

/// The name is not one of `kernel-nbd`, `fuse-loop`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown frontend {0:?}: expected \"kernel-nbd\" or \"fuse-loop\"")]
pub struct ParseFrontendKindError(pub String);

impl FromStr for FrontendKind {
    type Err = ParseFrontendKindError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "kernel-nbd" => Ok(FrontendKind::KernelNbd),
            "fuse-loop" => Ok(FrontendKind::FuseLoop),
            other => Err(ParseFrontendKindError(other.to_string())),
        }
    }
}

/// Picks the frontend for this host: kernel NBD when the kernel has the
/// nbd generic-netlink family, FUSE+loop otherwise. Logs the choice and why.
pub fn detect() -> FrontendKind {
    match kernel_nbd::availability() {
        Ok(()) => {
            tracing::info!(frontend = %FrontendKind::KernelNbd, "kernel nbd driver available");
            FrontendKind::KernelNbd
        }
        Err(reason) => {
            tracing::info!(
                frontend = %FrontendKind::FuseLoop,
                %reason,
                "kernel nbd unusable, using FUSE+loop"
            );
            FrontendKind::FuseLoop
        }
    }
}

/// What to attach and how.
#[derive(Clone)]
pub struct AttachOptions {
    /// Volume id: letters, digits, `.`, `_`, `-` (at most 128 bytes). Used
    /// in paths, mount names and the NBD backend identifier.
    pub volume_id: String,
    /// Expose the device read-only.
    pub readonly: bool,
    /// The daemon's run directory; the FUSE frontend mounts at
    /// `<run_dir>/fuse/<volume_id>/`.
    pub run_dir: PathBuf,
    /// Kernel NBD only: serves the transmission phase of each kernel
    /// socket. [`AttachOptions::new`] sets [`kernel_nbd::volumed_nbd_server`].
    pub nbd_server: Option<TransmissionServer>,
    /// Kernel NBD only: number of sockets (kernel queues). Default 2.
    pub nbd_connections: u32,
    /// Kernel NBD only: how long the kernel waits for new sockets after
    /// all connections died (for example a volumed restart) before failing
    /// I/O. Default 60 s.
    pub nbd_dead_conn_timeout: Duration,
    /// Kernel NBD only: per-request timeout; `None` leaves failover timing
    /// entirely to the device.
    pub nbd_io_timeout: Option<Duration>,
}

impl AttachOptions {
    pub fn new(volume_id: impl Into<String>, run_dir: impl Into<PathBuf>) -> Self {
        AttachOptions {
            volume_id: volume_id.into(),
            readonly: false,
            run_dir: run_dir.into(),
            nbd_server: Some(kernel_nbd::volumed_nbd_server()),
            nbd_connections: 2,
            nbd_dead_conn_timeout: Duration::from_secs(60),
            nbd_io_timeout: None,
        }
    }
}

impl fmt::Debug for AttachOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AttachOptions")
            .field("volume_id", &self.volume_id)
            .field("readonly", &self.readonly)
            .field("run_dir", &self.run_dir)
            .field("nbd_server", &self.nbd_server.is_some())
            .field("nbd_connections", &self.nbd_connections)
            .field("nbd_dead_conn_timeout", &self.nbd_dead_conn_timeout)
            .field("nbd_io_timeout", &self.nbd_io_timeout)
            .finish()
    }
}

pub(crate) fn validate_volume_id(id: &str) -> Result<(), FrontendError> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && id != "."
        && id != ".."
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(FrontendError::InvalidArgument(format!(
            "volume id {id:?} must be 1-128 characters of [A-Za-z0-9._-] and not \".\" or \"..\""
        )))
    }
}

/// Block size exposed by the frontends: the device's, within 512..=4096.
pub(crate) fn exposed_block_size(device: &dyn BlockDevice) -> u32 {
    let bs = device.block_size();
    if bs.is_power_of_two() {
        bs.clamp(512, 4096)
    } else {
        4096
    }
}

enum Inner {
    Fuse(fuse_loop::FuseLoop),
    Nbd(kernel_nbd::KernelNbd),
}

/// A volume's device node, hosted by this process. Call
/// [`AttachedDevice::detach`] to release it; dropping it without detaching
/// tears it down best-effort (and logs a warning).
pub struct AttachedDevice {
    inner: Option<Inner>,
    volume_id: String,
    span: tracing::Span,
}

impl fmt::Debug for AttachedDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AttachedDevice")
            .field("volume_id", &self.volume_id)
            .field("kind", &self.inner.as_ref().map(|_| self.kind()))
            .field("device_path", &self.device_path())
            .finish()
    }
}

/// Detaching failed; the device is handed back so the caller can retry
/// (every step of detach is idempotent) or keep using it.
#[derive(Debug, thiserror::Error)]
#[error("{error}")]
pub struct DetachError {
    #[source]
    pub error: FrontendError,
    pub device: AttachedDevice,
}

impl AttachedDevice {
    fn inner(&self) -> &Inner {
        // Only `detach` and `drop` take it, and both consume self.
        self.inner.as_ref().unwrap_or_else(|| unreachable!("AttachedDevice used after detach"))
    }

    /// The block device node (`/dev/loopN` or `/dev/nbdN`).
    pub fn device_path(&self) -> &Path {
        match self.inner.as_ref() {
            Some(Inner::Fuse(f)) => f.device_path(),
            Some(Inner::Nbd(n)) => n.device_path(),
            None => Path::new(""),
        }
    }

    pub fn kind(&self) -> FrontendKind {
        match self.inner() {
            Inner::Fuse(_) => FrontendKind::FuseLoop,
            Inner::Nbd(_) => FrontendKind::KernelNbd,
        }
    }

    pub fn volume_id(&self) -> &str {
        &self.volume_id
    }

    /// Current size of the exposed device in bytes.
    pub fn size(&self) -> u64 {
        match self.inner() {
            Inner::Fuse(f) => f.size(),
            Inner::Nbd(n) => n.size(),
        }
    }

    /// FUSE+loop only: the FUSE-served file the loop device is bound to.
    pub fn backing_file(&self) -> Option<&Path> {
        match self.inner() {
            Inner::Fuse(f) => Some(f.disk_path()),
            Inner::Nbd(_) => None,
        }
    }

    /// Whether the kernel does direct I/O to the volume (always true for
    /// kernel NBD; for FUSE+loop, the loop device's DIO flag).
    pub fn direct_io(&self) -> bool {
        match self.inner() {
            Inner::Fuse(f) => f.direct_io(),
            Inner::Nbd(_) => true,
        }
    }

    /// Grows the device to `new_size` bytes, online. The block device must
    /// already be at least that large; shrinking is refused. The loop
    /// device's capacity (LOOP_SET_CAPACITY) or the nbd size (netlink
    /// reconfigure) is updated, so `blockdev --getsize64` and online
    /// filesystem growth see it.
    pub async fn resize(&self, new_size: u64) -> Result<(), FrontendError> {
        match self.inner() {
            Inner::Fuse(f) => f.resize(new_size, &self.span).await,
            Inner::Nbd(n) => n.resize(new_size, &self.span).await,
        }
    }

    /// Releases the device node and everything behind it (loop device,
    /// FUSE mount, its directory; or the nbd device and its sockets),
    /// after flushing. Refuses with [`FrontendError::Busy`] while the
    /// device is mounted or held open exclusively, handing the device back.
    pub async fn detach(mut self) -> Result<(), DetachError> {
        let span = self.span.clone();
        let res = match self.inner.as_mut() {
            Some(Inner::Fuse(f)) => f.detach(&span).await,
            Some(Inner::Nbd(n)) => n.detach(&span).await,
            None => Ok(()),
        };
        match res {
            Ok(()) => {
                self.inner = None;
                tracing::info!(parent: &span, "device detached");
                Ok(())
            }
            Err(error) => Err(DetachError { error, device: self }),
        }
    }
}

impl Drop for AttachedDevice {
    fn drop(&mut self) {
        let Some(inner) = self.inner.take() else {
            return;
        };
        tracing::warn!(parent: &self.span, "device dropped without detach; tearing it down");
        match inner {
            Inner::Fuse(mut f) => f.teardown_blocking(&self.span),
            Inner::Nbd(mut n) => n.teardown_blocking(&self.span),
        }
    }
}

/// Attaches `device` through the chosen frontend and returns the device
/// node. On any failure everything done so far is undone.
pub async fn attach(
    kind: FrontendKind,
    device: Arc<dyn BlockDevice>,
    opts: AttachOptions,
) -> Result<AttachedDevice, FrontendError> {
    validate_volume_id(&opts.volume_id)?;
    let span = tracing::info_span!("frontend", volume_id = %opts.volume_id, frontend = %kind);
    let inner = match kind {
        FrontendKind::FuseLoop => Inner::Fuse(fuse_loop::FuseLoop::attach(device, &opts, &span).await?),
        FrontendKind::KernelNbd => Inner::Nbd(kernel_nbd::KernelNbd::attach(device, &opts, &span).await?),
    };
    let dev = AttachedDevice { inner: Some(inner), volume_id: opts.volume_id.clone(), span };
    tracing::info!(parent: &dev.span, device = %dev.device_path().display(), size = dev.size(), "device attached");
    Ok(dev)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kind_round_trips() {
        for k in [FrontendKind::KernelNbd, FrontendKind::FuseLoop] {
            assert_eq!(k.to_string().parse::<FrontendKind>().unwrap(), k);
        }
        assert_eq!(FrontendKind::FuseLoop.to_string(), "fuse-loop");
        assert_eq!(FrontendKind::KernelNbd.to_string(), "kernel-nbd");
        let err = "nbd".parse::<FrontendKind>().unwrap_err();
        assert!(err.to_string().contains("kernel-nbd"));
    }

    #[test]
    fn volume_ids() {
        assert!(validate_volume_id("pvc-1234_a.b").is_ok());
        for bad in ["", ".", "..", "a/b", "a b", "x\0", &"a".repeat(129)] {
            assert!(matches!(validate_volume_id(bad), Err(FrontendError::InvalidArgument(_))), "{bad:?}");
        }
    }
}
