//! The attachments of this node: attach, detach, list, health, the
//! per-attachment watcher, and restoring attachments after a restart.
//!
//! One attach or detach of a volume runs at a time (a per-volume async
//! lock); listing and health never wait for them.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::watch;
use tonic::{Code, Request, Status};
use tracing::{error, info, warn, Instrument};
use uuid::Uuid;
use volumed_frontend::{AttachOptions, AttachedDevice, FrontendError, FrontendKind, StaleDevice};
use volumed_nbd::client::{ClientOptions, ClientState, NbdClient};
use volumed_nbd::BlockDevice;
use volumed_proto::volumed::v1 as pb;
use volumed_proto::volumed::v1::admin_server::Admin;

use super::device::GuardedDevice;
use super::endpoints::{self, VolumeEndpoints};
use super::health::{self, AttachmentReport, Facts, State};
use super::mounts::mounts_of;
use super::persist::{LocalRecord, Persistence};
use crate::api::admin::{mode_from_proto, AdminService};
use crate::catalog::state::{AccessMode, VolumeKind};
use crate::cluster::node::NodeRuntime;
use crate::storage::keys::GroupId;

/// How often a watcher looks at leadership, fencing and size.
const WATCH_PERIOD: Duration = Duration::from_millis(500);
/// Pause between attempts to restore an attachment after a restart.
const RESTORE_RETRY: Duration = Duration::from_secs(2);

/// Why an attachment call failed; mapped to a gRPC status at the edge.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
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
    /// An admin API answer (publish, unpublish, lookup), with context.
    #[error("{context}: {}", status.message())]
    Admin { context: String, status: Status },
}

impl AttachError {
    fn admin(context: impl Into<String>) -> impl FnOnce(Status) -> AttachError {
        let context = context.into();
        move |status| AttachError::Admin { context, status }
    }

    pub fn code(&self) -> Code {
        match self {
            AttachError::InvalidArgument(_) => Code::InvalidArgument,
            AttachError::NotFound(_) => Code::NotFound,
            AttachError::AlreadyExists(_) => Code::AlreadyExists,
            AttachError::FailedPrecondition(_) => Code::FailedPrecondition,
            AttachError::Unavailable(_) => Code::Unavailable,
            AttachError::Internal(_) => Code::Internal,
            AttachError::Admin { status, .. } => status.code(),
        }
    }

    fn frontend(volume: Uuid, e: FrontendError) -> AttachError {
        let msg = format!("volume {volume}: {e}");
        match e {
            FrontendError::Unavailable { .. } | FrontendError::Busy { .. } => AttachError::FailedPrecondition(msg),
            FrontendError::InvalidArgument(_) => AttachError::InvalidArgument(msg),
            FrontendError::Device(_) => AttachError::Unavailable(msg),
            FrontendError::Io { .. } | FrontendError::Netlink { .. } => AttachError::Internal(msg),
        }
    }
}

/// What an attach asks for.
#[derive(Debug, Clone)]
pub struct AttachSpec {
    pub volume: String,
    pub mode: AccessMode,
    pub readonly: bool,
    pub force: bool,
    /// `None`: the daemon's default.
    pub frontend: Option<FrontendKind>,
}

impl AttachSpec {
    pub fn from_proto(r: &pb::AttachRequest) -> Result<AttachSpec, AttachError> {
        if r.volume.trim().is_empty() {
            return Err(AttachError::InvalidArgument("volume id or name is required".into()));
        }
        let mode = mode_from_proto(r.mode).map_err(|s| AttachError::InvalidArgument(s.message().to_string()))?;
        let frontend = match pb::Frontend::try_from(r.frontend) {
            Ok(pb::Frontend::Auto) => None,
            Ok(pb::Frontend::KernelNbd) => Some(FrontendKind::KernelNbd),
            Ok(pb::Frontend::FuseLoop) => Some(FrontendKind::FuseLoop),
            Err(_) => {
                return Err(AttachError::InvalidArgument(format!(
                    "unknown frontend {}; use AUTO, KERNEL_NBD or FUSE_LOOP",
                    r.frontend
                )))
            }
        };
        Ok(AttachSpec { volume: r.volume.trim().to_string(), mode, readonly: r.readonly, force: r.force, frontend })
    }
}

/// One local attachment as the node-local API shows it.
#[derive(Debug, Clone)]
pub struct AttachmentInfo {
    pub record: LocalRecord,
    pub state: State,
    pub healthy: bool,
    pub reason: String,
    pub size_bytes: u64,
    pub reconnects: u64,
    pub last_pause: Option<Duration>,
    pub migrations: u64,
    pub errors: u64,
}

impl AttachmentInfo {
    pub fn to_proto(&self) -> pb::LocalAttachment {
        pb::LocalAttachment {
            volume_id: self.record.volume_id.to_string(),
            volume_name: self.record.volume_name.clone(),
            device: self.record.device.display().to_string(),
            frontend: self.record.frontend.to_string(),
            generation: self.record.generation,
            healthy: self.healthy,
            reason: self.reason.clone(),
            state: self.state.as_str().to_string(),
            readonly: self.record.readonly || !self.record.mode.writes(false),
            size_bytes: self.size_bytes,
            reconnects: self.reconnects,
            last_pause_ms: self.last_pause.map(|d| d.as_millis() as u64).unwrap_or(0),
            migrations: self.migrations,
            io_errors: self.errors,
        }
    }
}

/// The data path of an attachment that has a device.
struct Live {
    guard: Arc<GuardedDevice>,
    /// Taken out by detach; the lock is async because resize awaits it.
    device: tokio::sync::Mutex<Option<AttachedDevice>>,
}

/// What is known about an attachment besides its data path.
#[derive(Default)]
struct Conditions {
    broken: Option<String>,
    fenced: Option<String>,
    restoring: Option<String>,
    /// A device of an earlier run that may still be mounted (broken ones).
    stale_device: Option<PathBuf>,
    leader_known: bool,
    /// Last judgement, for reports.
    judged: Option<(State, bool, String)>,
}

struct Entry {
    record: Mutex<LocalRecord>,
    live: Mutex<Option<Arc<Live>>>,
    status: Mutex<Conditions>,
    /// Stops the watcher or restorer of this entry.
    stop: watch::Sender<bool>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Entry {
    fn new(record: LocalRecord) -> Arc<Entry> {
        let (stop, _) = watch::channel(false);
        Arc::new(Entry {
            record: Mutex::new(record),
            live: Mutex::new(None),
            status: Mutex::new(Conditions::default()),
            stop,
        })
    }

    fn record(&self) -> LocalRecord {
        lock(&self.record).clone()
    }

    fn live(&self) -> Option<Arc<Live>> {
        lock(&self.live).clone()
    }

    fn judge(&self) -> (State, bool, String) {
        let live = self.live();
        let st = lock(&self.status);
        let mut f = Facts {
            broken: st.broken.clone(),
            fenced: st.fenced.clone(),
            restoring: st.restoring.clone(),
            leader_known: st.leader_known,
            ..Facts::default()
        };
        if let Some(l) = &live {
            if let ClientState::Reconnecting { since, last_error } = l.guard.client().state() {
                f.disconnected = Some((since.elapsed(), last_error));
            }
            f.oldest_request = l.guard.oldest_request();
        } else if f.broken.is_none() && f.fenced.is_none() && f.restoring.is_none() {
            f.broken = Some("the attachment has no device".into());
        }
        health::judge(&f)
    }

    fn info(&self) -> AttachmentInfo {
        let (state, healthy, reason) = self.judge();
        let live = self.live();
        let stats = live.as_ref().map(|l| l.guard.client().stats()).unwrap_or_default();
        AttachmentInfo {
            record: self.record(),
            state,
            healthy,
            reason,
            size_bytes: live.as_ref().map(|l| l.guard.size()).unwrap_or(0),
            reconnects: stats.reconnects,
            last_pause: stats.last_pause,
            migrations: stats.migrations,
            errors: live.as_ref().map(|l| l.guard.errors()).unwrap_or(0),
        }
    }
}

/// Per volume: the lock that orders attach/detach, and the entry.
#[derive(Default)]
struct Slot {
    op: tokio::sync::Mutex<()>,
    entry: Mutex<Option<Arc<Entry>>>,
}

/// Which frontend this node uses when the caller does not say, and why.
#[derive(Debug, Clone)]
pub struct FrontendChoice {
    pub kind: FrontendKind,
    pub reason: String,
}

impl FrontendChoice {
    /// From the `--frontend` flag: `auto` probes for the kernel nbd driver.
    pub fn from_flag(flag: &str) -> FrontendChoice {
        match flag.parse::<FrontendKind>() {
            Ok(kind) => FrontendChoice { kind, reason: "forced by --frontend".into() },
            Err(_) => match volumed_frontend::kernel_nbd::availability() {
                Ok(()) => FrontendChoice {
                    kind: FrontendKind::KernelNbd,
                    reason: "auto: the kernel has the nbd driver".into(),
                },
                Err(why) => FrontendChoice {
                    kind: FrontendKind::FuseLoop,
                    reason: format!("auto: kernel nbd unusable ({why})"),
                },
            },
        }
    }
}

pub struct AttachManager {
    node: Arc<NodeRuntime>,
    frontend: FrontendChoice,
    persist: Persistence,
    slots: Mutex<BTreeMap<Uuid, Arc<Slot>>>,
    save_lock: tokio::sync::Mutex<()>,
}

fn client_options() -> ClientOptions {
    ClientOptions {
        // A filesystem above turns an error into a read-only remount: wait
        // out long outages rather than fail.
        io_timeout: Duration::from_secs(120),
        connect_timeout: Duration::from_secs(2),
        initial_connect_timeout: Duration::from_secs(30),
        // Reconnects after a leader loss poll the replicas for the new
        // leader; short pauses keep the failover pause near the election time.
        backoff_min: Duration::from_millis(20),
        backoff_max: Duration::from_millis(100),
        // A leader that froze with requests on it (paused, partitioned) is
        // abandoned after this; its requests are replayed on the new one.
        stall_timeout: Duration::from_secs(10),
        max_in_flight: 256,
    }
}

impl AttachManager {
    /// Cleans up what an earlier run left, loads the persisted attachments
    /// and starts restoring them in the background. Call before serving
    /// the node-local API.
    pub async fn start(node: Arc<NodeRuntime>) -> Arc<AttachManager> {
        let frontend = FrontendChoice::from_flag(&node.config.frontend);
        info!(frontend = %frontend.kind, reason = %frontend.reason, "device frontend chosen");
        let mgr = Arc::new(AttachManager {
            persist: Persistence::new(&node.config.data_dir),
            frontend,
            node,
            slots: Mutex::new(BTreeMap::new()),
            save_lock: tokio::sync::Mutex::new(()),
        });
        let run_dir = mgr.node.config.run_dir.clone();
        let stale =
            tokio::task::spawn_blocking(move || volumed_frontend::recover_stale(&run_dir)).await.unwrap_or_default();
        let records = match mgr.persist.load() {
            Ok(r) => r,
            Err(e) => {
                error!(error = %e, "cannot read the persisted attachments");
                Vec::new()
            }
        };
        for rec in records {
            mgr.adopt(rec, &stale);
        }
        for s in stale.iter().filter(|s| !mgr.has(&s.volume_id)) {
            warn!(volume = %s.volume_id, device = ?s.device_path, in_use = s.in_use,
                "a device of an earlier run belongs to no persisted attachment; it was cleaned up");
        }
        mgr.publish_reports();
        mgr
    }

    pub fn frontend(&self) -> &FrontendChoice {
        &self.frontend
    }

    fn has(&self, volume_id: &str) -> bool {
        let Ok(id) = Uuid::parse_str(volume_id) else { return false };
        self.slot_if(id).is_some_and(|s| lock(&s.entry).is_some())
    }

    fn slot(&self, id: Uuid) -> Arc<Slot> {
        lock(&self.slots).entry(id).or_default().clone()
    }

    fn slot_if(&self, id: Uuid) -> Option<Arc<Slot>> {
        lock(&self.slots).get(&id).cloned()
    }

    fn entries(&self) -> Vec<Arc<Entry>> {
        let slots: Vec<Arc<Slot>> = lock(&self.slots).values().cloned().collect();
        slots.iter().filter_map(|s| lock(&s.entry).clone()).collect()
    }

    /// The local entry of a volume id or name.
    fn find(&self, key: &str) -> Option<(Uuid, Arc<Entry>)> {
        self.entries().into_iter().find_map(|e| {
            let r = e.record();
            (r.volume_id.to_string() == key || r.volume_name == key).then_some((r.volume_id, e))
        })
    }

    /// Takes a persisted attachment back at start-up.
    fn adopt(self: &Arc<Self>, rec: LocalRecord, stale: &[StaleDevice]) {
        let id = rec.volume_id;
        let found = stale.iter().find(|s| s.volume_id == id.to_string());
        let entry = Entry::new(rec.clone());
        let in_use_fuse = found.is_some_and(|s| s.kind == FrontendKind::FuseLoop && s.in_use);
        if in_use_fuse {
            let dev = found.and_then(|s| s.device_path.clone()).unwrap_or_else(|| rec.device.clone());
            let where_ = mounts_of(&dev);
            let mounted = if where_.is_empty() {
                "held open".to_string()
            } else {
                format!("mounted at {}", where_.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "))
            };
            let mut st = lock(&entry.status);
            st.broken = Some(format!(
                "volumed restarted while {} was {mounted}; the FUSE connection behind it ended with the old process, \
                 so it fails all I/O. Unmount it, then attach the volume again (or detach it)",
                dev.display()
            ));
            st.stale_device = Some(dev);
            drop(st);
            warn!(volume = %id, "attachment broken by the restart: its device was in use");
            *lock(&self.slot(id).entry) = Some(entry);
            return;
        }
        lock(&entry.status).restoring = Some("waiting for the cluster".into());
        *lock(&self.slot(id).entry) = Some(entry.clone());
        let nbd_index = found.and_then(|s| if s.kind == FrontendKind::KernelNbd { s.nbd_index } else { None });
        let me = self.clone();
        tokio::spawn(
            async move { me.restore_loop(entry, nbd_index).await }
                .instrument(tracing::info_span!("restore", volume = %id)),
        );
    }

    // ------------------------------------------------------------------ attach

    pub async fn attach(self: &Arc<Self>, spec: AttachSpec) -> Result<AttachmentInfo, AttachError> {
        let (id, name, kind) = self.resolve(&spec.volume).await?;
        if kind == VolumeKind::File {
            return Err(AttachError::FailedPrecondition(format!(
                "volume {name} is a file volume: it is mounted (NodeLocal.Mount), not attached as a block device"
            )));
        }
        let slot = self.slot(id);
        let _op = slot.op.lock().await;
        let existing = lock(&slot.entry).clone();
        if let Some(entry) = existing {
            if let Some(info) = self.reuse(id, &entry, &spec).await? {
                return Ok(info);
            }
        }
        let entry = self.attach_fresh(id, &name, &spec).await?;
        *lock(&slot.entry) = Some(entry.clone());
        self.save().await.map_err(AttachError::Internal)?;
        self.spawn_watcher(entry.clone());
        self.publish_reports();
        Ok(entry.info())
    }

    /// Answers an attach of a volume that has a local entry: the same
    /// device when it fits, `None` when the entry was cleared and a fresh
    /// attach should follow.
    async fn reuse(
        &self,
        id: Uuid,
        entry: &Arc<Entry>,
        spec: &AttachSpec,
    ) -> Result<Option<AttachmentInfo>, AttachError> {
        let rec = entry.record();
        let info = entry.info();
        match info.state {
            State::Attached | State::Reconnecting if entry.live().is_some() => {
                if rec.mode != spec.mode || rec.readonly != spec.readonly {
                    return Err(AttachError::AlreadyExists(format!(
                        "volume {} is attached on this node as {:?}{}; detach it before attaching it as {:?}{}",
                        rec.volume_name,
                        rec.mode,
                        if rec.readonly { " read-only" } else { "" },
                        spec.mode,
                        if spec.readonly { " read-only" } else { "" }
                    )));
                }
                if spec.frontend.is_some_and(|f| f != rec.frontend) {
                    return Err(AttachError::AlreadyExists(format!(
                        "volume {} is attached on this node through {}; detach it to use another frontend",
                        rec.volume_name, rec.frontend
                    )));
                }
                Ok(Some(info))
            }
            State::Attached | State::Reconnecting => Err(AttachError::Unavailable(format!(
                "volume {} is being restored on this node ({}); retry shortly",
                rec.volume_name, info.reason
            ))),
            State::Broken | State::Fenced => {
                let dev = lock(&entry.status).stale_device.clone().unwrap_or_else(|| rec.device.clone());
                let mounted = mounts_of(&dev);
                if !mounted.is_empty() {
                    return Err(AttachError::FailedPrecondition(format!(
                        "volume {} is {} on this node ({}), and its device {} is still mounted at {}; unmount it first",
                        rec.volume_name,
                        info.state.as_str(),
                        info.reason,
                        dev.display(),
                        mounted[0].display()
                    )));
                }
                info!(volume = %id, state = info.state.as_str(), "replacing an unusable attachment");
                self.teardown(entry).await?;
                Ok(None)
            }
        }
    }

    async fn attach_fresh(
        self: &Arc<Self>,
        id: Uuid,
        name: &str,
        spec: &AttachSpec,
    ) -> Result<Arc<Entry>, AttachError> {
        let me = self.node.node_id();
        let kind = spec.frontend.unwrap_or(self.frontend.kind);
        let had =
            self.node.catalog.read(|s| s.volumes.get(&id).is_some_and(|v| v.attachments.iter().any(|a| a.node == me)));
        let att = AdminService::new(self.node.clone())
            .publish_volume(Request::new(pb::PublishVolumeRequest {
                id_or_name: id.to_string(),
                node_id: me,
                mode: mode_proto(spec.mode) as i32,
                readonly: spec.readonly,
                force: spec.force,
            }))
            .await
            .map_err(AttachError::admin(format!("publishing volume {name} to this node")))?
            .into_inner();
        let rec = LocalRecord {
            volume_id: id,
            volume_name: name.to_string(),
            mode: spec.mode,
            readonly: spec.readonly,
            generation: att.generation,
            frontend: kind,
            device: PathBuf::new(),
            attached_at_ms: crate::catalog::service::now_ms(),
        };
        match self.open(&rec, None).await {
            Ok((live, device)) => {
                let mut rec = rec;
                rec.device = device;
                let entry = Entry::new(rec.clone());
                *lock(&entry.live) = Some(live);
                lock(&entry.status).leader_known = true;
                info!(volume = %id, device = %entry.record().device.display(), frontend = %kind,
                    generation = rec.generation, force = spec.force, "volume attached");
                Ok(entry)
            }
            Err(e) => {
                if !had {
                    self.unpublish(id, name)
                        .await
                        .unwrap_or_else(|u| warn!(volume = %id, error = %u, "rolling back the publish"));
                }
                Err(e)
            }
        }
    }

    /// Connects to the volume's leader and creates the device. With
    /// `nbd_index`, re-adopts a kernel nbd device left by an earlier run.
    async fn open(&self, rec: &LocalRecord, nbd_index: Option<u32>) -> Result<(Arc<Live>, PathBuf), AttachError> {
        let id = rec.volume_id;
        let source = Arc::new(VolumeEndpoints::new(Arc::downgrade(&self.node), id));
        let export = format!("{id}@{}", rec.generation);
        let client = NbdClient::connect(source, export, client_options()).await.map_err(|e| {
            AttachError::Unavailable(format!("volume {}: cannot reach its leader: {e}", rec.volume_name))
        })?;
        // Reader-only access modes give a read-only device too.
        let readonly = rec.readonly || !rec.mode.writes(false);
        let guard = GuardedDevice::new(client.clone(), readonly);
        let mut opts = AttachOptions::new(id.to_string(), &self.node.config.run_dir);
        opts.readonly = readonly;
        let dev: Arc<dyn BlockDevice> = guard.clone();
        let attached = match nbd_index {
            Some(index) => volumed_frontend::kernel_nbd::reconnect(index, dev, opts).await,
            None => volumed_frontend::attach(rec.frontend, dev, opts).await,
        };
        match attached {
            Ok(device) => {
                let path = device.device_path().to_path_buf();
                Ok((Arc::new(Live { guard, device: tokio::sync::Mutex::new(Some(device)) }), path))
            }
            Err(e) => {
                client.close().await;
                Err(AttachError::frontend(id, e))
            }
        }
    }

    // ------------------------------------------------------------------ detach

    /// Removes the local device (refused while it is mounted) and this
    /// node's catalog attachment. `Ok(false)` when nothing was attached.
    pub async fn detach(self: &Arc<Self>, key: &str) -> Result<bool, AttachError> {
        let key = key.trim();
        if key.is_empty() {
            return Err(AttachError::InvalidArgument("volume id or name is required".into()));
        }
        let (id, name) = match self.find(key) {
            Some((id, e)) => (id, e.record().volume_name),
            None => match self.resolve(key).await {
                Ok((id, name, _)) => (id, name),
                // Unknown everywhere: nothing to do.
                Err(AttachError::NotFound(_)) => return Ok(false),
                Err(e) => return Err(e),
            },
        };
        let slot = self.slot(id);
        let _op = slot.op.lock().await;
        let entry = lock(&slot.entry).clone();
        let existed = match entry {
            Some(entry) => {
                let rec = entry.record();
                let dev = lock(&entry.status).stale_device.clone().unwrap_or_else(|| rec.device.clone());
                let mounted = mounts_of(&dev);
                if !mounted.is_empty() && !dev.as_os_str().is_empty() {
                    return Err(AttachError::FailedPrecondition(format!(
                        "device {} of volume {} is mounted at {}; unmount it first",
                        dev.display(),
                        rec.volume_name,
                        mounted.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
                    )));
                }
                self.teardown(&entry).await?;
                *lock(&slot.entry) = None;
                self.save().await.map_err(AttachError::Internal)?;
                self.publish_reports();
                info!(volume = %id, device = %rec.device.display(), "volume detached");
                true
            }
            None => false,
        };
        self.unpublish(id, &name).await?;
        Ok(existed)
    }

    /// Releases the device and the client of an entry (it stays in its
    /// slot; the caller removes it).
    async fn teardown(&self, entry: &Arc<Entry>) -> Result<(), AttachError> {
        let Some(live) = entry.live() else {
            let _ = entry.stop.send(true);
            return Ok(());
        };
        let rec = entry.record();
        let fenced = live.guard.is_fenced();
        let mut slot = live.device.lock().await;
        if let Some(device) = slot.take() {
            if fenced {
                // Nothing can be flushed to a fenced volume: release the
                // device without the final flush (a blocking teardown).
                match tokio::task::spawn_blocking(move || drop(device)).await {
                    Ok(()) => {}
                    Err(e) => {
                        return Err(AttachError::Internal(format!("releasing the device of {}: {e}", rec.volume_name)))
                    }
                }
            } else if let Err(e) = device.detach().await {
                let msg = format!("volume {}: {}", rec.volume_name, e.error);
                let busy = matches!(e.error, FrontendError::Busy { .. });
                // The device stays attached (and watched) as it was.
                *slot = Some(e.device);
                return Err(if busy { AttachError::FailedPrecondition(msg) } else { AttachError::Unavailable(msg) });
            }
        }
        drop(slot);
        let _ = entry.stop.send(true);
        live.guard.client().close().await;
        *lock(&entry.live) = None;
        Ok(())
    }

    async fn unpublish(&self, id: Uuid, name: &str) -> Result<(), AttachError> {
        AdminService::new(self.node.clone())
            .unpublish_volume(Request::new(pb::UnpublishVolumeRequest {
                id_or_name: id.to_string(),
                node_id: self.node.node_id(),
            }))
            .await
            .map_err(AttachError::admin(format!("unpublishing volume {name} from this node")))?;
        Ok(())
    }

    // ------------------------------------------------------------------ queries

    pub fn list(&self) -> Vec<AttachmentInfo> {
        self.entries().iter().map(|e| e.info()).collect()
    }

    pub fn get(&self, key: &str) -> Option<AttachmentInfo> {
        self.find(key.trim()).map(|(_, e)| e.info())
    }

    /// Id, name and kind of a volume: from the local catalog copy, else
    /// from the catalog leader (a volume created a moment ago).
    async fn resolve(&self, key: &str) -> Result<(Uuid, String, VolumeKind), AttachError> {
        if let Some(found) =
            self.node.catalog.read(|s| s.volume_by_id_or_name(key).map(|v| (v.id, v.name.clone(), v.kind)))
        {
            return Ok(found);
        }
        let v = AdminService::new(self.node.clone())
            .get_volume(Request::new(pb::GetVolumeRequest { id_or_name: key.to_string() }))
            .await
            .map_err(|s| match s.code() {
                Code::NotFound => AttachError::NotFound(format!("volume {key} not found")),
                _ => AttachError::Admin { context: format!("looking up volume {key}"), status: s },
            })?
            .into_inner();
        let id = Uuid::parse_str(&v.id).map_err(|e| AttachError::Internal(format!("volume id {:?}: {e}", v.id)))?;
        // Wait for the local copy: the data path reads placement from it.
        for _ in 0..100 {
            if self.node.catalog.read(|s| s.volumes.contains_key(&id)) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok((id, v.name, crate::api::admin::kind_from_proto(v.kind)))
    }

    // ------------------------------------------------------------------ background

    fn spawn_watcher(self: &Arc<Self>, entry: Arc<Entry>) {
        let id = entry.record().volume_id;
        let me = self.clone();
        tokio::spawn(async move { me.watch(entry).await }.instrument(tracing::info_span!("attachment", volume = %id)));
    }

    /// Keeps one attachment in line: fencing and size from the catalog,
    /// the connection on the volume's leader, health for reports.
    async fn watch(self: Arc<Self>, entry: Arc<Entry>) {
        let mut stop = entry.stop.subscribe();
        let mut applied = self.node.catalog.applied_watch();
        let mut shutdown = self.node.shutdown.subscribe();
        let mut tick = tokio::time::interval(WATCH_PERIOD);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_leader_check = tokio::time::Instant::now();
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                r = applied.changed() => { if r.is_err() { return } }
                _ = stop.changed() => return,
                _ = shutdown.changed() => return,
            }
            if *stop.borrow() {
                return;
            }
            let Some(live) = entry.live() else { return };
            self.check_catalog(&entry, &live).await;
            if last_leader_check.elapsed() >= WATCH_PERIOD && !live.guard.is_fenced() {
                last_leader_check = tokio::time::Instant::now();
                self.check_leader(&entry, &live).await;
            }
            self.refresh_health(&entry);
        }
    }

    async fn check_catalog(&self, entry: &Arc<Entry>, live: &Arc<Live>) {
        let rec = entry.record();
        let me = self.node.node_id();
        let v = self.node.catalog.read(|s| s.volumes.get(&rec.volume_id).cloned());
        let Some(v) = v else {
            self.fence(entry, live, format!("volume {} was deleted", rec.volume_name));
            return;
        };
        if rec.generation < v.fence_floor && !live.guard.is_fenced() {
            let holder = v
                .attachments
                .iter()
                .find(|a| a.generation >= v.fence_floor && a.node != me)
                .map(|a| format!(" (now attached to node {} with generation {})", a.node, a.generation))
                .unwrap_or_default();
            self.fence(
                entry,
                live,
                format!(
                    "volume {} was force-attached elsewhere{holder}: this node's generation {} is fenced, its writes are refused",
                    rec.volume_name, rec.generation
                ),
            );
            return;
        }
        let current = live.guard.size();
        if v.size_bytes > current {
            self.grow(entry, live, v.size_bytes).await;
        }
    }

    fn fence(&self, entry: &Arc<Entry>, live: &Arc<Live>, reason: String) {
        if live.guard.is_fenced() {
            return;
        }
        warn!(reason = %reason, "attachment fenced");
        live.guard.fence(&reason);
        lock(&entry.status).fenced = Some(reason);
        self.refresh_health(entry);
    }

    /// Grows the device once the leader serves the new size.
    async fn grow(&self, entry: &Arc<Entry>, live: &Arc<Live>, want: u64) {
        let served = match live.guard.client().refresh_size().await {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(error = %e, "size refresh");
                return;
            }
        };
        let target = want.min(served);
        let device = live.device.lock().await;
        let Some(device) = device.as_ref() else { return };
        if target <= device.size() {
            return;
        }
        match device.resize(target).await {
            Ok(()) => info!(volume = %entry.record().volume_id, size = target, "device grown with the volume"),
            Err(e) => warn!(error = %e, "cannot grow the device"),
        }
    }

    /// Moves the client to the leader when it is connected elsewhere.
    async fn check_leader(&self, entry: &Arc<Entry>, live: &Arc<Live>) {
        let rec = entry.record();
        let client = live.guard.client();
        let ClientState::Connected { addr } = client.state() else {
            let view = endpoints::discover(&self.node, rec.volume_id).await;
            lock(&entry.status).leader_known = view.leader.is_some();
            return;
        };
        let group = GroupId(rec.volume_id);
        if let Some(n) = endpoints::node_at(&self.node, addr).await {
            let r = endpoints::status_of(&self.node, n, group).await;
            if r.is_some_and(|r| r.role == Some(crate::volume::replica::ReportedRole::Leader)) {
                lock(&entry.status).leader_known = true;
                return;
            }
        }
        let view = endpoints::discover(&self.node, rec.volume_id).await;
        lock(&entry.status).leader_known = view.leader.is_some();
        if let Some(l) = view.leader {
            if !endpoints::nbd_addr_of(&self.node, l).await.contains(&addr) {
                info!(from = %addr, leader = l, "moving to the volume's new leader");
                client.reconnect();
            }
        }
    }

    fn refresh_health(&self, entry: &Arc<Entry>) {
        let judged = entry.judge();
        let (changed, flipped) = {
            let mut st = lock(&entry.status);
            let changed = st.judged.as_ref() != Some(&judged);
            // The reason text ticks (seconds waited); log state changes only.
            let flipped = st.judged.as_ref().map(|(s, h, _)| (*s, *h)) != Some((judged.0, judged.1));
            st.judged = Some(judged.clone());
            (changed, flipped)
        };
        if flipped {
            let (state, healthy, reason) = &judged;
            if *healthy {
                info!(state = state.as_str(), "attachment healthy");
            } else {
                warn!(state = state.as_str(), reason = %reason, "attachment unhealthy");
            }
        }
        if changed {
            self.publish_reports();
        }
    }

    /// Hands the current attachment states to the heartbeat.
    fn publish_reports(&self) {
        let reports: Vec<AttachmentReport> = self
            .entries()
            .iter()
            .map(|e| {
                let i = e.info();
                AttachmentReport {
                    volume: i.record.volume_id,
                    generation: i.record.generation,
                    device: i.record.device.display().to_string(),
                    frontend: i.record.frontend.to_string(),
                    state: i.state.as_str().to_string(),
                    healthy: i.healthy,
                    reason: i.reason,
                }
            })
            .collect();
        let changed = match self.node.local_attachments.write() {
            Ok(mut g) => {
                let changed = *g != reports;
                *g = reports;
                changed
            }
            Err(_) => false,
        };
        if changed {
            self.node.report_now.notify_one();
        }
    }

    async fn save(&self) -> Result<(), String> {
        let _g = self.save_lock.lock().await;
        let records: Vec<LocalRecord> = self.entries().iter().map(|e| e.record()).collect();
        let persist = self.persist.clone();
        tokio::task::spawn_blocking(move || persist.save(&records))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("cannot persist the attachment list: {e}"))
    }

    /// Restores one persisted attachment: waits for the cluster, checks the
    /// catalog still gives this node the same generation, then re-creates
    /// the device.
    async fn restore_loop(self: Arc<Self>, entry: Arc<Entry>, nbd_index: Option<u32>) {
        let mut stop = entry.stop.subscribe();
        let mut shutdown = self.node.shutdown.subscribe();
        let rec = entry.record();
        let slot = self.slot(rec.volume_id);
        loop {
            {
                let _op = slot.op.lock().await;
                if *stop.borrow() || !lock(&slot.entry).as_ref().is_some_and(|e| Arc::ptr_eq(e, &entry)) {
                    return;
                }
                match self.restore_once(&rec, nbd_index).await {
                    Ok(Ok((live, device))) => {
                        lock(&entry.record).device = device.clone();
                        *lock(&entry.live) = Some(live);
                        {
                            let mut st = lock(&entry.status);
                            st.restoring = None;
                            st.leader_known = true;
                        }
                        if let Err(e) = self.save().await {
                            error!(error = %e, "persisting the restored attachment");
                        }
                        info!(device = %device.display(), "attachment restored after the restart");
                        self.spawn_watcher(entry.clone());
                        self.publish_reports();
                        return;
                    }
                    Ok(Err((state, reason))) => {
                        warn!(state = state.as_str(), reason = %reason, "attachment cannot be restored");
                        let mut st = lock(&entry.status);
                        st.restoring = None;
                        match state {
                            State::Fenced => st.fenced = Some(reason),
                            _ => st.broken = Some(reason),
                        }
                        drop(st);
                        self.publish_reports();
                        return;
                    }
                    Err(transient) => {
                        lock(&entry.status).restoring = Some(transient);
                        self.publish_reports();
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(RESTORE_RETRY) => {}
                _ = stop.changed() => return,
                _ = shutdown.changed() => return,
            }
        }
    }

    /// `Err`: try again later. `Ok(Err)`: the attachment cannot come back.
    #[allow(clippy::type_complexity)]
    async fn restore_once(
        &self,
        rec: &LocalRecord,
        nbd_index: Option<u32>,
    ) -> Result<Result<(Arc<Live>, PathBuf), (State, String)>, String> {
        let v = AdminService::new(self.node.clone())
            .get_volume(Request::new(pb::GetVolumeRequest { id_or_name: rec.volume_id.to_string() }))
            .await;
        let v = match v {
            Ok(v) => v.into_inner(),
            Err(s) if s.code() == Code::NotFound => {
                return Ok(Err((
                    State::Broken,
                    format!("volume {} was deleted while volumed was down", rec.volume_name),
                )))
            }
            Err(s) => return Err(format!("asking the catalog: {}", s.message())),
        };
        let me = self.node.node_id();
        let ours = v.attachments.iter().any(|a| a.node_id == me && a.generation == rec.generation);
        if !ours {
            return Ok(Err((
                State::Fenced,
                format!(
                    "while volumed was down the attachment of volume {} (generation {}) was moved to another node or \
                     unpublished; detach it here",
                    rec.volume_name, rec.generation
                ),
            )));
        }
        // The local catalog copy must know the volume (placement).
        if !self.node.catalog.read(|s| s.volumes.contains_key(&rec.volume_id)) {
            return Err("this node's catalog copy is still catching up".into());
        }
        match self.open(rec, nbd_index).await {
            Ok(x) => Ok(Ok(x)),
            Err(AttachError::Unavailable(m)) => Err(m),
            Err(e) => Ok(Err((State::Broken, format!("cannot re-create the device: {e}")))),
        }
    }

    /// Graceful stop: devices nobody uses are detached (their records stay,
    /// so the next start re-creates them); devices in use cannot outlive
    /// this process and are left for the next start to clean up.
    pub async fn shutdown(&self) {
        for entry in self.entries() {
            let _ = entry.stop.send(true);
            let Some(live) = entry.live() else { continue };
            let rec = entry.record();
            let mut slot = live.device.lock().await;
            let Some(device) = slot.take() else { continue };
            let mounted = mounts_of(device.device_path());
            if !mounted.is_empty() || live.guard.is_fenced() {
                warn!(volume = %rec.volume_id, device = %device.device_path().display(), mounted = ?mounted,
                    "device in use: it stops working when volumed exits and is reported broken after the restart");
                // Its teardown would fail (busy) or could not flush; the
                // next start cleans up what is left.
                std::mem::forget(device);
                continue;
            }
            match tokio::time::timeout(Duration::from_secs(10), device.detach()).await {
                Ok(Ok(())) => info!(volume = %rec.volume_id, "device released for the restart"),
                Ok(Err(e)) => {
                    warn!(volume = %rec.volume_id, error = %e.error, "device kept at shutdown");
                    std::mem::forget(e.device);
                }
                Err(_) => warn!(volume = %rec.volume_id, "device release timed out at shutdown"),
            }
            drop(slot);
            live.guard.client().close().await;
        }
    }
}

fn mode_proto(m: AccessMode) -> pb::AccessMode {
    match m {
        AccessMode::SingleNodeWriter => pb::AccessMode::SingleNodeWriter,
        AccessMode::SingleNodeReaderOnly => pb::AccessMode::SingleNodeReaderOnly,
        AccessMode::MultiNodeReaderOnly => pb::AccessMode::MultiNodeReaderOnly,
        AccessMode::MultiNodeSingleWriter => pb::AccessMode::MultiNodeSingleWriter,
        AccessMode::MultiNodeMultiWriter => pb::AccessMode::MultiNodeMultiWriter,
    }
}
