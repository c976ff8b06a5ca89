//! Mounts of file volumes on this node: volumed hosts the FUSE filesystem
//! itself, so the CSI node plugin or `volctl` that asked for it can come
//! and go without touching the mount. The list is persisted; after a
//! restart of volumed each mount is made again at the same path (the old
//! FUSE connection died with the old process: its dead mount is detached
//! first, and its open handles are released in the volume).

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fuser::{Config, MountOption, Session, SessionACL};
use tonic::{Code, Request};
use tracing::{error, info, warn, Instrument};
use uuid::Uuid;
use volumed_proto::volumed::v1 as pb;
use volumed_proto::volumed::v1::admin_server::Admin;

use super::client::FileClient;
use super::fuse::{MountFs, VolFs};
use super::ops::{FileOp, FileResult};
use super::persist::{MountPersistence, MountRecord};
use crate::api::admin::{kind_from_proto, mode_from_proto, AdminService};
use crate::catalog::state::{AccessMode, VolumeKind};
use crate::cluster::node::NodeRuntime;

/// FUSE session threads per mount: they only decode requests.
const FUSE_THREADS: usize = 4;
/// How long a mount waits for the volume's leader before giving up.
const FIRST_CONTACT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
}

impl MountError {
    pub fn code(&self) -> Code {
        match self {
            MountError::InvalidArgument(_) => Code::InvalidArgument,
            MountError::NotFound(_) => Code::NotFound,
            MountError::AlreadyExists(_) => Code::AlreadyExists,
            MountError::FailedPrecondition(_) => Code::FailedPrecondition,
            MountError::Unavailable(_) => Code::Unavailable,
            MountError::Internal(_) => Code::Internal,
        }
    }
}

/// One mount: its record and, once mounted, the filesystem serving it.
pub struct MountEntry {
    pub rec: Mutex<MountRecord>,
    live: Mutex<Option<Live>>,
    /// Why it is not serving (restoring, broken), if so.
    problem: Mutex<Option<String>>,
}

struct Live {
    fs: Arc<MountFs>,
    thread: std::thread::JoinHandle<io::Result<()>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub struct MountManager {
    node: Arc<NodeRuntime>,
    persist: MountPersistence,
    mounts: Mutex<BTreeMap<PathBuf, Arc<MountEntry>>>,
    /// Serialises mount, unmount and saves.
    op: tokio::sync::Mutex<()>,
}

/// `target` without trailing slashes; must be absolute.
fn normalize(target: &str) -> Result<PathBuf, MountError> {
    let t = target.trim();
    if t.is_empty() {
        return Err(MountError::InvalidArgument("target path is required".into()));
    }
    if !t.starts_with('/') {
        return Err(MountError::InvalidArgument(format!("target {t:?} must be an absolute path")));
    }
    let t = t.trim_end_matches('/');
    Ok(PathBuf::from(if t.is_empty() { "/" } else { t }))
}

fn unescape(s: &str) -> String {
    s.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")
}

/// What is mounted at `path` (filesystem type, source), if it is a mount
/// point.
pub fn mounted_at(path: &Path) -> Option<(String, String)> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let mut found = None;
    for line in text.lines() {
        let Some((left, right)) = line.split_once(" - ") else { continue };
        let mp = left.split(' ').nth(4).map(unescape);
        if mp.as_deref() == Some(path.to_string_lossy().as_ref()) {
            // The last one listed is the one on top.
            let mut f = right.split(' ');
            let fstype = f.next().unwrap_or_default().to_string();
            let source = f.next().map(unescape).unwrap_or_default();
            found = Some((fstype, source));
        }
    }
    found
}

/// Whether a mount is one of ours (FUSE with a `volumed:<name>` source).
fn is_ours(fstype: &str, source: &str) -> bool {
    fstype.starts_with("fuse") && source.starts_with("volumed:")
}

/// Detaches a dead volumed FUSE mount left at `target` by an earlier run.
fn detach_stale(target: &Path) -> Result<bool, MountError> {
    match mounted_at(target) {
        Some((t, src)) if is_ours(&t, &src) => {
            nix::mount::umount2(target, nix::mount::MntFlags::MNT_DETACH)
                .map_err(|e| MountError::Internal(format!("detach the stale mount at {}: {e}", target.display())))?;
            Ok(true)
        }
        Some((t, _)) => Err(MountError::AlreadyExists(format!(
            "{} already has a {t} filesystem mounted; unmount it or choose another target",
            target.display()
        ))),
        None => Ok(false),
    }
}

fn mode_to_proto(m: AccessMode) -> pb::AccessMode {
    match m {
        AccessMode::SingleNodeWriter => pb::AccessMode::SingleNodeWriter,
        AccessMode::SingleNodeReaderOnly => pb::AccessMode::SingleNodeReaderOnly,
        AccessMode::MultiNodeReaderOnly => pb::AccessMode::MultiNodeReaderOnly,
        AccessMode::MultiNodeSingleWriter => pb::AccessMode::MultiNodeSingleWriter,
        AccessMode::MultiNodeMultiWriter => pb::AccessMode::MultiNodeMultiWriter,
    }
}

fn random_session() -> u64 {
    loop {
        let s = rand::random::<u64>();
        if s != 0 {
            return s;
        }
    }
}

impl MountManager {
    /// Loads the persisted mounts and starts making them again in the
    /// background.
    pub async fn start(node: Arc<NodeRuntime>) -> Arc<MountManager> {
        let mgr = Arc::new(MountManager {
            persist: MountPersistence::new(&node.config.data_dir),
            node,
            mounts: Mutex::new(BTreeMap::new()),
            op: tokio::sync::Mutex::new(()),
        });
        let records = match mgr.persist.load() {
            Ok(r) => r,
            Err(e) => {
                error!(error = %e, "cannot read the persisted mounts");
                Vec::new()
            }
        };
        for rec in records {
            let entry = Arc::new(MountEntry {
                rec: Mutex::new(rec.clone()),
                live: Mutex::new(None),
                problem: Mutex::new(Some("restoring after a restart of volumed".into())),
            });
            lock(&mgr.mounts).insert(rec.target.clone(), entry.clone());
            let me = mgr.clone();
            tokio::spawn(async move { me.restore(entry).await }.instrument(
                tracing::info_span!("mount-restore", volume = %rec.volume_id, target = %rec.target.display()),
            ));
        }
        mgr
    }

    async fn restore(self: Arc<Self>, entry: Arc<MountEntry>) {
        let rec = lock(&entry.rec).clone();
        let target = rec.target.clone();
        match tokio::task::spawn_blocking(move || detach_stale(&target)).await {
            Ok(Ok(true)) => info!("detached the dead mount of the previous run"),
            Ok(Ok(false)) => {}
            Ok(Err(e)) => {
                warn!(error = %e, "cannot restore the mount");
                *lock(&entry.problem) = Some(e.to_string());
                return;
            }
            Err(e) => warn!(error = %e, "stale mount check"),
        }
        let mut shutdown = self.node.shutdown.subscribe();
        let old_session = rec.session;
        loop {
            let mut fresh = rec.clone();
            fresh.session = random_session();
            match self.mount_fuse(&fresh).await {
                Ok(live) => {
                    let fs = live.fs.clone();
                    *lock(&entry.live) = Some(live);
                    *lock(&entry.problem) = None;
                    *lock(&entry.rec) = fresh;
                    let _g = self.op.lock().await;
                    if let Err(e) = self.save() {
                        warn!(error = %e, "saving the mount list");
                    }
                    drop(_g);
                    info!("mount restored");
                    if let Err(e) = fs.client.apply_one(FileOp::EndSession { session: old_session }).await {
                        warn!(error = %e, "releasing the open files of the previous run");
                    }
                    return;
                }
                Err(e) => {
                    *lock(&entry.problem) = Some(format!("restoring after a restart of volumed: {e}"));
                    warn!(error = %e, "mount not restored yet; retrying");
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                _ = shutdown.changed() => return,
            }
        }
    }

    fn save(&self) -> Result<(), super::persist::PersistError> {
        let recs: Vec<MountRecord> = lock(&self.mounts).values().map(|e| lock(&e.rec).clone()).collect();
        self.persist.save(&recs)
    }

    /// Id, name and kind of a volume: local catalog copy, else the leader.
    async fn resolve(&self, key: &str) -> Result<(Uuid, String, VolumeKind), MountError> {
        if let Some(found) =
            self.node.catalog.read(|s| s.volume_by_id_or_name(key).map(|v| (v.id, v.name.clone(), v.kind)))
        {
            return Ok(found);
        }
        let v = AdminService::new(self.node.clone())
            .get_volume(Request::new(pb::GetVolumeRequest { id_or_name: key.to_string() }))
            .await
            .map_err(|s| match s.code() {
                Code::NotFound => MountError::NotFound(format!("volume {key} not found")),
                _ => MountError::Unavailable(format!("looking up volume {key}: {}", s.message())),
            })?
            .into_inner();
        let id = Uuid::parse_str(&v.id).map_err(|e| MountError::Internal(format!("volume id {:?}: {e}", v.id)))?;
        for _ in 0..100 {
            if self.node.catalog.read(|s| s.volumes.contains_key(&id)) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok((id, v.name, kind_from_proto(v.kind)))
    }

    /// Mounts a file volume at `req.target` (idempotent for the same
    /// volume and options).
    pub async fn mount(self: &Arc<Self>, req: &pb::MountRequest) -> Result<MountRecord, MountError> {
        let target = normalize(&req.target)?;
        if req.volume.trim().is_empty() {
            return Err(MountError::InvalidArgument("volume id or name is required".into()));
        }
        let mode = if req.mode == pb::AccessMode::Unspecified as i32 {
            AccessMode::MultiNodeMultiWriter
        } else {
            mode_from_proto(req.mode).map_err(|s| MountError::InvalidArgument(s.message().to_string()))?
        };
        let readonly = req.readonly || !mode.writes(false);
        for o in &req.options {
            if !matches!(
                o.as_str(),
                "allow_other" | "default_permissions" | "ro" | "rw" | "noatime" | "nosuid" | "nodev"
            ) {
                return Err(MountError::InvalidArgument(format!(
                    "mount option {o:?} is not supported (supported: ro, rw, noatime, nosuid, nodev; \
                     allow_other and default_permissions are always on)"
                )));
            }
        }
        let readonly = readonly || req.options.iter().any(|o| o == "ro");
        let (id, name, kind) = self.resolve(req.volume.trim()).await?;
        if kind != VolumeKind::File {
            return Err(MountError::FailedPrecondition(format!(
                "volume {name} is a block volume: attach it (NodeLocal.Attach) and mount a filesystem on the device, \
                 or create a volume of kind file to mount it here"
            )));
        }
        let _g = self.op.lock().await;
        let mut existing = lock(&self.mounts).get(&target).cloned();
        if let Some(e) = existing.clone() {
            // Unmounted behind our back (a plain `umount`): its session
            // ended; forget it and mount afresh.
            let t = target.clone();
            let mounted = tokio::task::spawn_blocking(move || mounted_at(&t).is_some()).await.unwrap_or(false);
            let dead = lock(&e.live).as_ref().is_some_and(|l| l.thread.is_finished());
            if dead || (!mounted && lock(&e.problem).is_none()) {
                warn!(target = %target.display(), "the earlier mount is gone; mounting again");
                let old = lock(&e.live).take();
                if let Some(l) = old {
                    let session = lock(&e.rec).session;
                    if let Err(err) = l.fs.client.apply_one(FileOp::EndSession { session }).await {
                        warn!(error = %err, "releasing the open files of the lost mount");
                    }
                }
                lock(&self.mounts).remove(&target);
                existing = None;
            }
        }
        if let Some(e) = existing {
            let rec = lock(&e.rec).clone();
            if rec.volume_id != id {
                return Err(MountError::AlreadyExists(format!(
                    "{} is already the mount of volume {}; unmount it first",
                    target.display(),
                    rec.volume_name
                )));
            }
            if rec.readonly != readonly {
                return Err(MountError::AlreadyExists(format!(
                    "volume {name} is mounted at {} {}; unmount it to mount it {}",
                    target.display(),
                    if rec.readonly { "read-only" } else { "read-write" },
                    if readonly { "read-only" } else { "read-write" }
                )));
            }
            if let Some(p) = lock(&e.problem).clone() {
                return Err(MountError::Unavailable(format!("volume {name} at {}: {p}", target.display())));
            }
            return Ok(rec);
        }
        let t = target.clone();
        tokio::task::spawn_blocking(move || {
            detach_stale(&t)?;
            std::fs::create_dir_all(&t).map_err(|e| MountError::Internal(format!("create {}: {e}", t.display())))
        })
        .await
        .map_err(|e| MountError::Internal(e.to_string()))??;
        let rec = MountRecord {
            volume_id: id,
            volume_name: name.clone(),
            target: target.clone(),
            readonly,
            mode,
            session: random_session(),
            mounted_at_ms: crate::catalog::service::now_ms(),
        };
        self.publish(&rec).await;
        let live = self.mount_fuse(&rec).await?;
        let entry = Arc::new(MountEntry {
            rec: Mutex::new(rec.clone()),
            live: Mutex::new(Some(live)),
            problem: Mutex::new(None),
        });
        lock(&self.mounts).insert(target.clone(), entry);
        if let Err(e) = self.save() {
            warn!(error = %e, "saving the mount list; the mount will not survive a restart of volumed");
        }
        info!(volume = %id, target = %target.display(), readonly, "file volume mounted");
        Ok(rec)
    }

    /// Records the mount in the catalog (shown per node by `volctl volume
    /// get`). Informational for file volumes: a conflict with an existing
    /// record of this node does not stop the mount.
    async fn publish(&self, rec: &MountRecord) {
        let r = AdminService::new(self.node.clone())
            .publish_volume(Request::new(pb::PublishVolumeRequest {
                id_or_name: rec.volume_id.to_string(),
                node_id: self.node.node_id(),
                mode: mode_to_proto(rec.mode) as i32,
                readonly: rec.readonly,
                force: false,
            }))
            .await;
        if let Err(s) = r {
            warn!(volume = %rec.volume_id, error = %s.message(), "recording the mount in the catalog");
        }
    }

    async fn unpublish(&self, volume: Uuid) {
        let r = AdminService::new(self.node.clone())
            .unpublish_volume(Request::new(pb::UnpublishVolumeRequest {
                id_or_name: volume.to_string(),
                node_id: self.node.node_id(),
            }))
            .await;
        if let Err(s) = r {
            warn!(volume = %volume, error = %s.message(), "removing the mount's catalog record");
        }
    }

    async fn mount_fuse(&self, rec: &MountRecord) -> Result<Live, MountError> {
        let client = FileClient::new(self.node.clone(), rec.volume_id);
        // Creates the root on first use, and proves the leader answers.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as i64)
            .unwrap_or(0);
        match tokio::time::timeout(FIRST_CONTACT, client.apply_one(FileOp::Init { now })).await {
            Ok(Ok(FileResult::Attr(_))) => {}
            Ok(Ok(other)) => {
                return Err(MountError::Internal(format!("volume {}: initialising: {other:?}", rec.volume_name)))
            }
            Ok(Err(e)) => return Err(MountError::Unavailable(e.to_string())),
            Err(_) => {
                return Err(MountError::Unavailable(format!(
                    "volume {}: no leader answered within {FIRST_CONTACT:?}",
                    rec.volume_name
                )))
            }
        }
        let span = tracing::info_span!("mount", volume = %rec.volume_id, target = %rec.target.display());
        let fs = MountFs::new(client, tokio::runtime::Handle::current(), rec.session, rec.readonly, span.clone());
        let mut config = Config::default();
        config.mount_options = vec![
            MountOption::FSName(format!("volumed:{}", rec.volume_name)),
            MountOption::Subtype("volumed".into()),
            MountOption::DefaultPermissions,
            MountOption::NoDev,
            MountOption::NoSuid,
            MountOption::NoAtime,
            if rec.readonly { MountOption::RO } else { MountOption::RW },
        ];
        // Pods run as any user: everyone may use it, and the kernel checks
        // permissions against the modes (default_permissions).
        config.acl = SessionACL::All;
        config.n_threads = Some(FUSE_THREADS);
        config.clone_fd = true;
        let target = rec.target.clone();
        let fs2 = fs.clone();
        let thread = tokio::task::spawn_blocking(move || -> Result<_, MountError> {
            let session = Session::new(VolFs(fs2.clone()), &target, &config)
                .map_err(|e| MountError::Internal(format!("mount FUSE at {}: {e}", target.display())))?;
            let _ = fs2.notifier.set(session.notifier());
            std::thread::Builder::new()
                .name("volumed-fs".into())
                .spawn(move || {
                    let _e = span.enter();
                    let r = session.run();
                    if let Err(e) = &r {
                        error!(error = %e, "FUSE session ended with an error");
                    }
                    r
                })
                .map_err(|e| MountError::Internal(format!("spawn the FUSE session thread: {e}")))
        })
        .await
        .map_err(|e| MountError::Internal(e.to_string()))??;
        Ok(Live { fs, thread })
    }

    /// Unmounts `target`. `Ok(false)` when nothing of ours was there.
    pub async fn unmount(&self, target: &str) -> Result<bool, MountError> {
        let target = normalize(target)?;
        let _g = self.op.lock().await;
        let Some(entry) = lock(&self.mounts).get(&target).cloned() else {
            // A dead mount of an earlier run that nobody restored.
            let t = target.clone();
            return tokio::task::spawn_blocking(move || match mounted_at(&t) {
                Some((ty, src)) if is_ours(&ty, &src) => detach_stale(&t),
                _ => Ok(false),
            })
            .await
            .map_err(|e| MountError::Internal(e.to_string()))?;
        };
        let rec = lock(&entry.rec).clone();
        let live = lock(&entry.live).take();
        if let Some(live) = live {
            live.fs.flush_all().await;
            let t = target.clone();
            let r = tokio::task::spawn_blocking(move || nix::mount::umount2(&t, nix::mount::MntFlags::empty()))
                .await
                .map_err(|e| MountError::Internal(e.to_string()))?;
            match r {
                Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => {}
                Err(nix::errno::Errno::EBUSY) => {
                    *lock(&entry.live) = Some(live);
                    return Err(MountError::FailedPrecondition(format!(
                        "{} is busy (open files or a working directory in it, or a bind mount of it); \
                         close them or unmount the bind mounts first",
                        target.display()
                    )));
                }
                Err(e) => {
                    *lock(&entry.live) = Some(live);
                    return Err(MountError::Internal(format!("unmount {}: {e}", target.display())));
                }
            }
            let thread = live.thread;
            let _ = tokio::task::spawn_blocking(move || {
                let deadline = std::time::Instant::now() + Duration::from_secs(5);
                while !thread.is_finished() && std::time::Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(5));
                }
                if thread.is_finished() {
                    let _ = thread.join();
                }
            })
            .await;
            if let Err(e) = live.fs.client.apply_one(FileOp::EndSession { session: rec.session }).await {
                warn!(error = %e, "releasing the mount's open files");
            }
        } else {
            let t = target.clone();
            let _ = tokio::task::spawn_blocking(move || detach_stale(&t)).await;
        }
        lock(&self.mounts).remove(&target);
        if let Err(e) = self.save() {
            warn!(error = %e, "saving the mount list");
        }
        let others = lock(&self.mounts).values().any(|e| lock(&e.rec).volume_id == rec.volume_id);
        if !others {
            self.unpublish(rec.volume_id).await;
        }
        info!(volume = %rec.volume_id, target = %target.display(), "file volume unmounted");
        Ok(true)
    }

    pub fn list(&self) -> Vec<pb::LocalMount> {
        let entries: Vec<Arc<MountEntry>> = lock(&self.mounts).values().cloned().collect();
        entries
            .iter()
            .map(|e| {
                let rec = lock(&e.rec).clone();
                let problem = lock(&e.problem).clone();
                let alive = lock(&e.live).as_ref().map(|l| !l.thread.is_finished());
                let (healthy, reason) = match (problem, alive) {
                    (Some(p), _) => (false, p),
                    (None, Some(true)) => (true, String::new()),
                    (None, Some(false)) => (false, "the FUSE session ended (unmounted outside volumed?)".into()),
                    (None, None) => (false, "not mounted".into()),
                };
                pb::LocalMount {
                    volume_id: rec.volume_id.to_string(),
                    volume_name: rec.volume_name,
                    target: rec.target.display().to_string(),
                    healthy,
                    reason,
                    readonly: rec.readonly,
                }
            })
            .collect()
    }

    /// Stores what mounts have buffered. The mounts themselves stay: they
    /// fail with ENOTCONN until volumed is back and mounts them again
    /// (unmounting would let writes land in the directory underneath).
    pub async fn shutdown(&self) {
        let fss: Vec<Arc<MountFs>> =
            lock(&self.mounts).values().filter_map(|e| lock(&e.live).as_ref().map(|l| l.fs.clone())).collect();
        for fs in fss {
            fs.flush_all().await;
        }
    }
}
