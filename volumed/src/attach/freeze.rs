//! Filesystem freeze around a snapshot: FIFREEZE on the filesystems
//! mounted from a volume's device on this node, FITHAW after the cut.
//!
//! A snapshot alone is crash-consistent: it holds what reached the volume,
//! not what still sits in this node's page cache. Freezing first flushes
//! dirty data and the journal and blocks new writes, so the cut holds a
//! clean filesystem. The caller (csi-controller) freezes on every node the
//! volume is attached to, snapshots, then thaws. A freeze whose thaw never
//! comes (the caller died) thaws by itself after its hold time: an
//! application must never stay blocked.
//!
//! The ioctls run on blocking threads: FIFREEZE writes the dirty pages back
//! through the device, whose FUSE server lives in this very process.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use tonic::Status;
use tracing::{info, warn};
use uuid::Uuid;
use volumed_proto::volumed::v1 as pb;

use super::mounts::mounts_of;
use crate::cluster::node::NodeRuntime;

/// `_IOWR('X', 119, int)` and `_IOWR('X', 120, int)` of linux/fs.h.
const FIFREEZE: libc::c_ulong = 0xC004_5877;
const FITHAW: libc::c_ulong = 0xC004_5878;

const DEFAULT_HOLD: Duration = Duration::from_secs(10);
const MAX_HOLD: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum FreezeError {
    #[error("volume {0} not found")]
    NoVolume(String),
    #[error("volume {volume} is already frozen here (by another snapshot); retry once it is thawed")]
    Busy { volume: Uuid },
    #[error("cannot freeze {mount} ({errno}); take the snapshot without freezing")]
    Freeze { mount: PathBuf, errno: std::io::Error },
    #[error("cannot open {mount}: {source}")]
    Open { mount: PathBuf, source: std::io::Error },
    #[error("freeze worker failed: {0}")]
    Worker(String),
}

impl From<FreezeError> for Status {
    fn from(e: FreezeError) -> Status {
        match &e {
            FreezeError::NoVolume(_) => Status::not_found(e.to_string()),
            FreezeError::Busy { .. } => Status::aborted(e.to_string()),
            FreezeError::Freeze { .. } | FreezeError::Open { .. } => Status::failed_precondition(e.to_string()),
            FreezeError::Worker(_) => Status::internal(e.to_string()),
        }
    }
}

/// Filesystems frozen here, per volume: the open mount points (FITHAW
/// needs a file of the same filesystem) and the token of the freeze.
struct Frozen {
    token: u64,
    dirs: Vec<(PathBuf, File)>,
}

fn frozen() -> &'static Mutex<HashMap<Uuid, Frozen>> {
    static FROZEN: OnceLock<Mutex<HashMap<Uuid, Frozen>>> = OnceLock::new();
    FROZEN.get_or_init(|| Mutex::new(HashMap::new()))
}

fn ioctl(dir: &File, request: libc::c_ulong) -> std::io::Result<()> {
    let arg: libc::c_int = 0;
    // SAFETY: a valid open descriptor; both requests take an int argument
    // the kernel ignores.
    let r = unsafe { libc::ioctl(dir.as_raw_fd(), request, arg) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn thaw_all(volume: Uuid, dirs: &[(PathBuf, File)]) -> u32 {
    let mut thawed = 0;
    for (mount, dir) in dirs {
        match ioctl(dir, FITHAW) {
            Ok(()) => thawed += 1,
            // EINVAL: not frozen (someone thawed it already).
            Err(e) => warn!(volume = %volume, mount = %mount.display(), error = %e, "thaw failed"),
        }
    }
    thawed
}

/// Freezes every filesystem mounted from `device`; on a failure, thaws the
/// ones frozen so far.
fn freeze_device(device: &str) -> Result<Vec<(PathBuf, File)>, FreezeError> {
    let mut done: Vec<(PathBuf, File)> = Vec::new();
    // All mounts of one device share one filesystem: freeze it once.
    let Some(mount) = mounts_of(std::path::Path::new(device)).into_iter().next() else {
        return Ok(done);
    };
    let dir = File::open(&mount).map_err(|source| FreezeError::Open { mount: mount.clone(), source })?;
    match ioctl(&dir, FIFREEZE) {
        Ok(()) => done.push((mount, dir)),
        Err(errno) => return Err(FreezeError::Freeze { mount, errno }),
    }
    Ok(done)
}

fn resolve(node: &NodeRuntime, key: &str) -> Result<Uuid, FreezeError> {
    let key = key.trim();
    node.catalog
        .read(|s| s.volume_by_id_or_name(key).map(|v| v.id))
        .ok_or_else(|| FreezeError::NoVolume(key.to_string()))
}

pub async fn freeze(
    node: &NodeRuntime,
    req: pb::FreezeFilesystemsRequest,
) -> Result<pb::FreezeFilesystemsResponse, Status> {
    if req.volume.trim().is_empty() {
        return Err(Status::invalid_argument("volume (id or name) is required"));
    }
    let volume = resolve(node, &req.volume)?;
    let hold = match req.hold_ms {
        0 => DEFAULT_HOLD,
        ms => Duration::from_millis(ms.into()).min(MAX_HOLD),
    };
    let device = node
        .local_attachments
        .read()
        .ok()
        .and_then(|a| a.iter().find(|a| a.volume == volume).map(|a| a.device.clone()))
        .filter(|d| !d.is_empty());
    let mut answer = pb::FreezeFilesystemsResponse { node_id: node.node_id(), ..Default::default() };
    let Some(device) = device else { return Ok(answer) };
    let token = loop {
        let t: u64 = rand::random();
        if t != 0 {
            break t;
        }
    };
    // Take the volume's slot first: one freeze at a time per volume.
    {
        let mut map = frozen().lock().map_err(|_| Status::internal("freeze registry poisoned"))?;
        if map.contains_key(&volume) {
            return Err(FreezeError::Busy { volume }.into());
        }
        map.insert(volume, Frozen { token, dirs: Vec::new() });
    }
    let dirs = match tokio::task::spawn_blocking(move || freeze_device(&device)).await {
        Ok(Ok(dirs)) => dirs,
        Ok(Err(e)) => {
            let _ = take(volume, token);
            return Err(e.into());
        }
        Err(e) => {
            let _ = take(volume, token);
            return Err(FreezeError::Worker(e.to_string()).into());
        }
    };
    if dirs.is_empty() {
        let _ = take(volume, token);
        return Ok(answer);
    }
    answer.token = token;
    answer.mount_points = dirs.iter().map(|(m, _)| m.display().to_string()).collect();
    info!(volume = %volume, mounts = ?answer.mount_points, hold_ms = hold.as_millis() as u64, "filesystems frozen");
    let unregistered = match frozen().lock() {
        Ok(mut map) => match map.get_mut(&volume) {
            Some(f) => {
                f.dirs = dirs;
                None
            }
            None => Some(dirs),
        },
        Err(_) => Some(dirs),
    };
    if let Some(dirs) = unregistered {
        // Without the registry nobody could thaw it later: thaw now.
        let _ = tokio::task::spawn_blocking(move || thaw_all(volume, &dirs)).await;
        return Err(Status::internal("freeze registry lost the freeze; thawed again, retry"));
    }
    tokio::spawn(async move {
        tokio::time::sleep(hold).await;
        if let Some(thawed) = take(volume, token) {
            let n = tokio::task::spawn_blocking(move || thaw_all(volume, &thawed)).await.unwrap_or(0);
            if n > 0 {
                warn!(volume = %volume, thawed = n, "no thaw came in time: filesystems thawed by themselves");
            }
        }
    });
    Ok(answer)
}

/// The frozen mounts of `volume` if `token` froze them.
fn take(volume: Uuid, token: u64) -> Option<Vec<(PathBuf, File)>> {
    let mut map = frozen().lock().ok()?;
    if map.get(&volume).is_some_and(|f| f.token == token) {
        map.remove(&volume).map(|f| f.dirs)
    } else {
        None
    }
}

pub async fn thaw(node: &NodeRuntime, req: pb::ThawFilesystemsRequest) -> Result<pb::ThawFilesystemsResponse, Status> {
    if req.volume.trim().is_empty() {
        return Err(Status::invalid_argument("volume (id or name) is required"));
    }
    let volume = resolve(node, &req.volume)?;
    // Idempotent: an unknown token (thawed already, by itself or by an
    // earlier call) thaws nothing.
    let Some(dirs) = take(volume, req.token) else { return Ok(pb::ThawFilesystemsResponse { thawed: 0 }) };
    let thawed = tokio::task::spawn_blocking(move || thaw_all(volume, &dirs))
        .await
        .map_err(|e| Status::internal(format!("thaw worker failed: {e}")))?;
    info!(volume = %volume, thawed, "filesystems thawed");
    Ok(pb::ThawFilesystemsResponse { thawed })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_are_linux_fs_h() {
        let int = std::mem::size_of::<libc::c_int>();
        assert_eq!(FIFREEZE, nix::request_code_readwrite!(b'X', 119, int) as libc::c_ulong);
        assert_eq!(FITHAW, nix::request_code_readwrite!(b'X', 120, int) as libc::c_ulong);
    }

    #[test]
    fn errors_map_to_status_codes() {
        let busy: Status = FreezeError::Busy { volume: Uuid::nil() }.into();
        assert_eq!(busy.code(), tonic::Code::Aborted);
        let e: Status =
            FreezeError::Freeze { mount: "/mnt/x".into(), errno: std::io::Error::from_raw_os_error(libc::EOPNOTSUPP) }
                .into();
        assert_eq!(e.code(), tonic::Code::FailedPrecondition);
        assert!(e.message().contains("/mnt/x") && e.message().contains("without freezing"), "{}", e.message());
        assert_eq!(Status::from(FreezeError::NoVolume("v".into())).code(), tonic::Code::NotFound);
    }
}
