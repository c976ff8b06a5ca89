//! Kernel NBD frontend: `/dev/nbdN` configured through the generic-netlink
//! "nbd" family. Each kernel socket is one end of a unix socketpair; the
//! other end is served in this process by an NBD transmission loop over the
//! volume's [`BlockDevice`], so a leader failover is handled by the device
//! (the reconnecting client) and the kernel never sees a disconnect.
//!
//! If volumed itself dies, the kernel keeps the device and queues I/O for
//! `dead_conn_timeout`; a restarted volumed hands over fresh sockets with
//! [`reconnect`] (NBD_CMD_RECONFIGURE).
//!
//! The transmission loop is not implemented here: it is a
//! [`TransmissionServer`], by default [`volumed_nbd_server`], which runs
//! `volumed_nbd::server::serve_transmission` on the socket.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use tokio::task::JoinHandle;
use tracing::Instrument;
use volumed_nbd::BlockDevice;

use crate::netlink::{self, GenlMessage, GenlSocket, NLM_F_ACK, NLM_F_REQUEST};
use crate::{exposed_block_size, AttachOptions, AttachedDevice, FrontendError, FrontendKind, Inner};

pub const NBD_GENL_FAMILY: &str = "nbd";
const NBD_GENL_VERSION: u8 = 1;

// Commands (linux/nbd-netlink.h).
pub(crate) const NBD_CMD_CONNECT: u8 = 1;
pub(crate) const NBD_CMD_DISCONNECT: u8 = 2;
pub(crate) const NBD_CMD_RECONFIGURE: u8 = 3;

// Attributes.
pub(crate) const NBD_ATTR_INDEX: u16 = 1;
pub(crate) const NBD_ATTR_SIZE_BYTES: u16 = 2;
pub(crate) const NBD_ATTR_BLOCK_SIZE_BYTES: u16 = 3;
pub(crate) const NBD_ATTR_TIMEOUT: u16 = 4;
pub(crate) const NBD_ATTR_SERVER_FLAGS: u16 = 5;
pub(crate) const NBD_ATTR_CLIENT_FLAGS: u16 = 6;
pub(crate) const NBD_ATTR_SOCKETS: u16 = 7;
pub(crate) const NBD_ATTR_DEAD_CONN_TIMEOUT: u16 = 8;
pub(crate) const NBD_ATTR_BACKEND_IDENTIFIER: u16 = 10;
pub(crate) const NBD_SOCK_ITEM: u16 = 1;
pub(crate) const NBD_SOCK_FD: u16 = 1;

/// Remove the device when it is disconnected.
pub(crate) const NBD_CFLAG_DESTROY_ON_DISCONNECT: u64 = 1;

// Transmission flags (NBD protocol), as the kernel expects them in
// NBD_ATTR_SERVER_FLAGS.
pub const NBD_FLAG_HAS_FLAGS: u16 = 1 << 0;
pub const NBD_FLAG_READ_ONLY: u16 = 1 << 1;
pub const NBD_FLAG_SEND_FLUSH: u16 = 1 << 2;
pub const NBD_FLAG_SEND_FUA: u16 = 1 << 3;
pub const NBD_FLAG_SEND_TRIM: u16 = 1 << 5;
pub const NBD_FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const NBD_FLAG_CAN_MULTI_CONN: u16 = 1 << 8;

/// Prefix of the backend identifier (`/sys/block/nbdN/backend`) that marks
/// devices as volumed's: `volumed:<volume_id>`.
pub const BACKEND_PREFIX: &str = "volumed:";

/// What the kernel was told about the export, for the transmission loop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransmissionParams {
    /// Names the export in logs: the volume id.
    pub export: String,
    pub size: u64,
    pub block_size: u32,
    pub read_only: bool,
    /// The transmission flags the kernel was given.
    pub flags: u16,
}

/// Serves the NBD transmission phase (no handshake: the kernel starts
/// sending requests at once) of one kernel socket over `device` until the
/// kernel closes it or sends NBD_CMD_DISC.
pub type TransmissionServer = Arc<
    dyn Fn(tokio::net::UnixStream, Arc<dyn BlockDevice>, TransmissionParams) -> BoxFuture<'static, io::Result<()>>
        + Send
        + Sync,
>;

/// The transmission server of `volumed_nbd::server`, serving until the
/// kernel disconnects.
pub fn volumed_nbd_server() -> TransmissionServer {
    Arc::new(|stream, device, params| {
        Box::pin(async move {
            let opts = volumed_nbd::server::ServerOptions::default();
            let summary = volumed_nbd::server::serve_transmission(
                stream,
                "kernel".to_string(),
                device,
                params.export,
                &opts,
                futures::future::pending::<()>(),
            )
            .await;
            match summary.end {
                volumed_nbd::server::ConnectionEnd::ProtocolError(e) => Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("kernel connection broke the protocol: {e}"),
                )),
                _ => Ok(()),
            }
        })
    })
}

/// `Ok` when the kernel has the nbd driver (generic-netlink family "nbd");
/// otherwise why not.
pub fn availability() -> Result<(), String> {
    family_id().map(|_| ())
}

fn family_id() -> Result<u16, String> {
    let sock = GenlSocket::open().map_err(|e| format!("cannot open a generic-netlink socket: {e}"))?;
    match sock.family_id(NBD_GENL_FAMILY) {
        Ok(Some(id)) => Ok(id),
        Ok(None) => {
            let module = Path::new("/sys/module/nbd").exists();
            let node = Path::new("/dev/nbd0").exists();
            Err(format!(
                "the kernel has no \"nbd\" generic-netlink family (nbd module {}, /dev/nbd0 {}); \
                 load the nbd module (modprobe nbd) or use the fuse-loop frontend",
                if module { "present" } else { "not loaded" },
                if node { "present" } else { "missing" },
            ))
        }
        Err(e) => Err(format!("looking up the \"nbd\" generic-netlink family failed: {e}")),
    }
}

/// NBD_CMD_CONNECT parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ConnectConfig {
    pub index: Option<u32>,
    pub size: u64,
    pub block_size: u64,
    pub server_flags: u16,
    pub client_flags: u64,
    pub timeout_secs: Option<u64>,
    pub dead_conn_timeout_secs: u64,
    pub backend: String,
    pub socket_fds: Vec<u32>,
}

fn put_sockets(m: &mut GenlMessage, fds: &[u32]) {
    m.begin_nest(NBD_ATTR_SOCKETS);
    for fd in fds {
        m.begin_nest(NBD_SOCK_ITEM).put_u32(NBD_SOCK_FD, *fd).end_nest();
    }
    m.end_nest();
}

fn request(family: u16, cmd: u8, seq: u32) -> GenlMessage {
    GenlMessage::new(family, cmd, NBD_GENL_VERSION, NLM_F_REQUEST | NLM_F_ACK, seq)
}

pub(crate) fn connect_message(family: u16, seq: u32, c: &ConnectConfig) -> Vec<u8> {
    let mut m = request(family, NBD_CMD_CONNECT, seq);
    if let Some(i) = c.index {
        m.put_u32(NBD_ATTR_INDEX, i);
    }
    m.put_u64(NBD_ATTR_SIZE_BYTES, c.size)
        .put_u64(NBD_ATTR_BLOCK_SIZE_BYTES, c.block_size)
        .put_u64(NBD_ATTR_SERVER_FLAGS, c.server_flags as u64)
        .put_u64(NBD_ATTR_CLIENT_FLAGS, c.client_flags);
    if let Some(t) = c.timeout_secs {
        m.put_u64(NBD_ATTR_TIMEOUT, t);
    }
    m.put_u64(NBD_ATTR_DEAD_CONN_TIMEOUT, c.dead_conn_timeout_secs).put_str(NBD_ATTR_BACKEND_IDENTIFIER, &c.backend);
    put_sockets(&mut m, &c.socket_fds);
    m.finish()
}

pub(crate) fn disconnect_message(family: u16, seq: u32, index: u32) -> Vec<u8> {
    let mut m = request(family, NBD_CMD_DISCONNECT, seq);
    m.put_u32(NBD_ATTR_INDEX, index);
    m.finish()
}

/// Grows the device (Linux 5.3+).
pub(crate) fn resize_message(family: u16, seq: u32, index: u32, size: u64, block_size: u64) -> Vec<u8> {
    let mut m = request(family, NBD_CMD_RECONFIGURE, seq);
    m.put_u32(NBD_ATTR_INDEX, index).put_u64(NBD_ATTR_SIZE_BYTES, size).put_u64(NBD_ATTR_BLOCK_SIZE_BYTES, block_size);
    m.finish()
}

/// Hands the kernel new sockets for a device whose connections died.
pub(crate) fn reconnect_message(
    family: u16,
    seq: u32,
    index: u32,
    backend: &str,
    dead_conn_timeout_secs: u64,
    fds: &[u32],
) -> Vec<u8> {
    let mut m = request(family, NBD_CMD_RECONFIGURE, seq);
    m.put_u32(NBD_ATTR_INDEX, index)
        .put_u64(NBD_ATTR_DEAD_CONN_TIMEOUT, dead_conn_timeout_secs)
        .put_str(NBD_ATTR_BACKEND_IDENTIFIER, backend);
    put_sockets(&mut m, fds);
    m.finish()
}

fn index_from_replies(replies: &[netlink::NlMessage]) -> Option<u32> {
    replies.iter().find_map(|r| {
        let attrs = r.payload.get(netlink::GENL_HDRLEN..)?;
        netlink::parse_attrs(attrs)
            .into_iter()
            .find(|(ty, _)| *ty == NBD_ATTR_INDEX)
            .and_then(|(_, v)| netlink::attr_u32(v))
    })
}

pub(crate) fn device_path(index: u32) -> PathBuf {
    PathBuf::from(format!("/dev/nbd{index}"))
}

/// Volumed's nbd devices per sysfs: (index, volume id).
pub(crate) fn list_ours() -> Vec<(u32, String)> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/sys/block") else {
        return out;
    };
    for entry in dir.flatten() {
        let name = entry.file_name();
        let Some(index) = name.to_str().and_then(|s| s.strip_prefix("nbd")).and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(backend) = std::fs::read_to_string(entry.path().join("backend")) else {
            continue;
        };
        if let Some(id) = backend.trim_end().strip_prefix(BACKEND_PREFIX) {
            out.push((index, id.to_string()));
        }
    }
    out.sort();
    out
}

async fn netlink_request(op: &'static str, msg: Vec<u8>, seq: u32) -> Result<Vec<netlink::NlMessage>, FrontendError> {
    tokio::task::spawn_blocking(move || GenlSocket::open().and_then(|s| s.request(&msg, seq)))
        .await
        .map_err(|e| FrontendError::io("blocking task", io::Error::other(e)))?
        .map_err(|source| FrontendError::Netlink { op: op.into(), source })
}

pub(crate) struct KernelNbd {
    device: Arc<dyn BlockDevice>,
    family: u16,
    index: u32,
    path: PathBuf,
    size: AtomicU64,
    block_size: u32,
    connected: bool,
    servers: Vec<JoinHandle<()>>,
}

/// Socket pairs: the kernel's ends, and our served ends.
fn socket_pairs(
    n: u32,
    device: &Arc<dyn BlockDevice>,
    server: &TransmissionServer,
    params: TransmissionParams,
    span: &tracing::Span,
) -> Result<(Vec<OwnedFd>, Vec<JoinHandle<()>>), FrontendError> {
    let mut kernel_ends = Vec::new();
    let mut tasks = Vec::new();
    let res = (|| {
        for i in 0..n {
            let (ours, theirs) =
                std::os::unix::net::UnixStream::pair().map_err(|e| FrontendError::io("socketpair", e))?;
            ours.set_nonblocking(true).map_err(|e| FrontendError::io("socketpair", e))?;
            let ours = tokio::net::UnixStream::from_std(ours).map_err(|e| FrontendError::io("socketpair", e))?;
            kernel_ends.push(OwnedFd::from(theirs));
            let fut = server(ours, device.clone(), params.clone());
            let conn_span = tracing::info_span!(parent: span, "nbd_conn", conn = i);
            tasks.push(tokio::spawn(
                async move {
                    match fut.await {
                        Ok(()) => tracing::debug!("kernel connection closed"),
                        Err(e) => tracing::warn!(error = %e, "kernel connection failed"),
                    }
                }
                .instrument(conn_span),
            ));
        }
        Ok(())
    })();
    match res {
        Ok(()) => Ok((kernel_ends, tasks)),
        Err(e) => {
            for t in &tasks {
                t.abort();
            }
            Err(e)
        }
    }
}

fn flags_for(read_only: bool) -> u16 {
    let mut flags = NBD_FLAG_HAS_FLAGS
        | NBD_FLAG_SEND_FLUSH
        | NBD_FLAG_SEND_FUA
        | NBD_FLAG_SEND_TRIM
        | NBD_FLAG_SEND_WRITE_ZEROES
        // One device behind all sockets: a flush on any covers all.
        | NBD_FLAG_CAN_MULTI_CONN;
    if read_only {
        flags |= NBD_FLAG_READ_ONLY;
    }
    flags
}

async fn wait_for_node(path: &Path) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !path.exists() {
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    true
}

impl KernelNbd {
    fn prepare(
        device: &Arc<dyn BlockDevice>,
        opts: &AttachOptions,
    ) -> Result<(u16, TransmissionServer, TransmissionParams), FrontendError> {
        let family =
            family_id().map_err(|reason| FrontendError::Unavailable { kind: FrontendKind::KernelNbd, reason })?;
        let Some(server) = opts.nbd_server.clone() else {
            return Err(FrontendError::InvalidArgument(
                "the kernel-nbd frontend needs a transmission server (AttachOptions::nbd_server)".into(),
            ));
        };
        let size = device.size();
        let block_size = exposed_block_size(&**device);
        if size == 0 || !size.is_multiple_of(block_size as u64) {
            return Err(FrontendError::InvalidArgument(format!(
                "device size {size} must be a non-zero multiple of its block size {block_size}"
            )));
        }
        let read_only = opts.readonly || device.read_only();
        let params = TransmissionParams {
            export: opts.volume_id.clone(),
            size,
            block_size,
            read_only,
            flags: flags_for(read_only),
        };
        Ok((family, server, params))
    }

    pub(crate) async fn attach(
        device: Arc<dyn BlockDevice>,
        opts: &AttachOptions,
        span: &tracing::Span,
    ) -> Result<Self, FrontendError> {
        let (family, server, params) = Self::prepare(&device, opts)?;
        let n = opts.nbd_connections.clamp(1, 16);
        let (kernel_ends, servers) = socket_pairs(n, &device, &server, params.clone(), span)?;
        let seq = netlink::next_seq();
        let msg = connect_message(
            family,
            seq,
            &ConnectConfig {
                index: None,
                size: params.size,
                block_size: params.block_size as u64,
                server_flags: params.flags,
                client_flags: NBD_CFLAG_DESTROY_ON_DISCONNECT,
                timeout_secs: opts.nbd_io_timeout.map(|d| d.as_secs().max(1)),
                dead_conn_timeout_secs: opts.nbd_dead_conn_timeout.as_secs(),
                backend: format!("{BACKEND_PREFIX}{}", opts.volume_id),
                socket_fds: kernel_ends.iter().map(|f| f.as_raw_fd() as u32).collect(),
            },
        );
        let replies = match netlink_request("NBD_CMD_CONNECT", msg, seq).await {
            Ok(r) => r,
            Err(e) => {
                servers.iter().for_each(JoinHandle::abort);
                return Err(e);
            }
        };
        // The kernel took its own references to the sockets.
        drop(kernel_ends);
        let mut this = KernelNbd {
            device,
            family,
            index: u32::MAX,
            path: PathBuf::new(),
            size: AtomicU64::new(params.size),
            block_size: params.block_size,
            connected: false,
            servers,
        };
        let Some(index) = index_from_replies(&replies) else {
            this.servers.iter().for_each(JoinHandle::abort);
            return Err(FrontendError::Netlink {
                op: "NBD_CMD_CONNECT".into(),
                source: io::Error::other("reply carries no device index"),
            });
        };
        this.index = index;
        this.path = device_path(index);
        this.connected = true;
        if !wait_for_node(&this.path).await {
            let err =
                FrontendError::io(format!("open {}", this.path.display()), io::Error::from(io::ErrorKind::NotFound));
            this.teardown_blocking(span);
            return Err(err);
        }
        Ok(this)
    }

    pub(crate) async fn reconnect(
        index: u32,
        device: Arc<dyn BlockDevice>,
        opts: &AttachOptions,
        span: &tracing::Span,
    ) -> Result<Self, FrontendError> {
        let (family, server, params) = Self::prepare(&device, opts)?;
        let n = opts.nbd_connections.clamp(1, 16);
        let (kernel_ends, servers) = socket_pairs(n, &device, &server, params.clone(), span)?;
        let seq = netlink::next_seq();
        let fds: Vec<u32> = kernel_ends.iter().map(|f| f.as_raw_fd() as u32).collect();
        let msg = reconnect_message(
            family,
            seq,
            index,
            &format!("{BACKEND_PREFIX}{}", opts.volume_id),
            opts.nbd_dead_conn_timeout.as_secs(),
            &fds,
        );
        if let Err(e) = netlink_request("NBD_CMD_RECONFIGURE", msg, seq).await {
            servers.iter().for_each(JoinHandle::abort);
            return Err(e);
        }
        drop(kernel_ends);
        Ok(KernelNbd {
            device,
            family,
            index,
            path: device_path(index),
            size: AtomicU64::new(params.size),
            block_size: params.block_size,
            connected: true,
            servers,
        })
    }

    pub(crate) fn device_path(&self) -> &Path {
        &self.path
    }

    pub(crate) fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    pub(crate) async fn resize(&self, new_size: u64, span: &tracing::Span) -> Result<(), FrontendError> {
        let cur = self.size();
        if new_size == cur {
            return Ok(());
        }
        if new_size < cur || !new_size.is_multiple_of(self.block_size as u64) {
            return Err(FrontendError::InvalidArgument(format!(
                "cannot resize from {cur} to {new_size} bytes: only growth to a multiple of {} is supported",
                self.block_size
            )));
        }
        let dev_size = self.device.size();
        if dev_size < new_size {
            return Err(FrontendError::InvalidArgument(format!(
                "the volume is only {dev_size} bytes; grow it before growing the device to {new_size}"
            )));
        }
        let seq = netlink::next_seq();
        let msg = resize_message(self.family, seq, self.index, new_size, self.block_size as u64);
        netlink_request("NBD_CMD_RECONFIGURE (size)", msg, seq).await?;
        self.size.store(new_size, Ordering::Release);
        tracing::info!(parent: span, from = cur, to = new_size, "device resized");
        Ok(())
    }

    pub(crate) async fn detach(&mut self, span: &tracing::Span) -> Result<(), FrontendError> {
        if self.connected {
            let path = self.path.clone();
            let busy = tokio::task::spawn_blocking(move || {
                if crate::fuse_loop::claimed_exclusively(&path) {
                    return Some(());
                }
                // Push cached writes down before disconnecting.
                if let Ok(f) = std::fs::File::open(&path) {
                    let _ = f.sync_all();
                }
                None
            })
            .await
            .map_err(|e| FrontendError::io("blocking task", io::Error::other(e)))?;
            if busy.is_some() {
                return Err(FrontendError::Busy {
                    device: self.path.clone(),
                    reason: "it is mounted or held open exclusively; unmount it first".into(),
                });
            }
            self.device.flush().await?;
            let seq = netlink::next_seq();
            let msg = disconnect_message(self.family, seq, self.index);
            netlink_request("NBD_CMD_DISCONNECT", msg, seq).await?;
            self.connected = false;
        }
        // The kernel closes its sockets: the transmission loops end.
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.servers.iter().any(|t| !t.is_finished()) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        for t in self.servers.drain(..) {
            if !t.is_finished() {
                tracing::warn!(parent: span, "transmission loop did not end after disconnect; aborting it");
                t.abort();
            }
        }
        Ok(())
    }

    pub(crate) fn teardown_blocking(&mut self, span: &tracing::Span) {
        if self.connected {
            let seq = netlink::next_seq();
            let msg = disconnect_message(self.family, seq, self.index);
            match GenlSocket::open().and_then(|s| s.request(&msg, seq)) {
                Ok(_) => self.connected = false,
                Err(e) => {
                    tracing::error!(parent: span, error = %e, device = %self.path.display(), "NBD_CMD_DISCONNECT failed")
                }
            }
        }
        for t in self.servers.drain(..) {
            t.abort();
        }
    }
}

/// After a volumed restart: hands a kernel NBD device that is still
/// waiting for its dead connections (see [`crate::StaleDevice`]) fresh
/// sockets served over `device`. The kernel resumes queued I/O.
pub async fn reconnect(
    device_index: u32,
    device: Arc<dyn BlockDevice>,
    opts: AttachOptions,
) -> Result<AttachedDevice, FrontendError> {
    crate::validate_volume_id(&opts.volume_id)?;
    let span = tracing::info_span!("frontend", volume_id = %opts.volume_id, frontend = %FrontendKind::KernelNbd);
    let nbd = KernelNbd::reconnect(device_index, device, &opts, &span).await?;
    tracing::info!(parent: &span, device = %nbd.device_path().display(), "kernel nbd device reconnected");
    Ok(AttachedDevice { inner: Some(Inner::Nbd(nbd)), volume_id: opts.volume_id, span })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netlink::{parse_attrs, parse_messages};

    fn attr_u64(p: &[u8]) -> u64 {
        u64::from_ne_bytes(p.try_into().unwrap())
    }

    fn header(b: &[u8]) -> (u32, u16, u16, u32, u8, u8) {
        (
            u32::from_ne_bytes(b[0..4].try_into().unwrap()),
            u16::from_ne_bytes([b[4], b[5]]),
            u16::from_ne_bytes([b[6], b[7]]),
            u32::from_ne_bytes(b[8..12].try_into().unwrap()),
            b[16],
            b[17],
        )
    }

    #[test]
    fn connect_message_bytes() {
        let c = ConnectConfig {
            index: None,
            size: 1 << 30,
            block_size: 4096,
            server_flags: flags_for(false),
            client_flags: NBD_CFLAG_DESTROY_ON_DISCONNECT,
            timeout_secs: None,
            dead_conn_timeout_secs: 60,
            backend: "volumed:pvc-1".into(),
            socket_fds: vec![7, 9],
        };
        let b = connect_message(0x1d, 42, &c);
        let (len, ty, flags, seq, cmd, ver) = header(&b);
        assert_eq!(len as usize, b.len());
        assert_eq!((ty, flags, seq, cmd, ver), (0x1d, NLM_F_REQUEST | NLM_F_ACK, 42, NBD_CMD_CONNECT, 1));
        // Five u64 attributes (12 bytes each), the backend string
        // (4 + 14 -> 20), and SOCKETS: 4 + 2 * (4 + 8).
        assert_eq!(b.len(), 20 + 5 * 12 + 20 + 4 + 2 * 12);

        // Exact bytes of the first attribute: len 12, type SIZE_BYTES.
        let mut want = Vec::new();
        want.extend_from_slice(&12u16.to_ne_bytes());
        want.extend_from_slice(&NBD_ATTR_SIZE_BYTES.to_ne_bytes());
        want.extend_from_slice(&(1u64 << 30).to_ne_bytes());
        assert_eq!(&b[20..32], &want[..]);

        let attrs = parse_attrs(&b[20..]);
        let types: Vec<u16> = attrs.iter().map(|a| a.0).collect();
        assert_eq!(
            types,
            vec![
                NBD_ATTR_SIZE_BYTES,
                NBD_ATTR_BLOCK_SIZE_BYTES,
                NBD_ATTR_SERVER_FLAGS,
                NBD_ATTR_CLIENT_FLAGS,
                NBD_ATTR_DEAD_CONN_TIMEOUT,
                NBD_ATTR_BACKEND_IDENTIFIER,
                NBD_ATTR_SOCKETS
            ]
        );
        assert_eq!(attr_u64(attrs[1].1), 4096);
        assert_eq!(attr_u64(attrs[2].1), 0x1 | 0x4 | 0x8 | 0x20 | 0x40 | 0x100);
        assert_eq!(attr_u64(attrs[3].1), 1);
        assert_eq!(attr_u64(attrs[4].1), 60);
        assert_eq!(attrs[5].1, b"volumed:pvc-1\0");
        // SOCKETS is nested (flag set on the wire) and holds one SOCK_ITEM
        // per fd, each with a u32 SOCK_FD.
        let sockets_off = 20 + 5 * 12 + 20;
        assert_eq!(
            u16::from_ne_bytes([b[sockets_off + 2], b[sockets_off + 3]]),
            NBD_ATTR_SOCKETS | netlink::NLA_F_NESTED
        );
        let items = parse_attrs(attrs[6].1);
        assert_eq!(items.len(), 2);
        let fds: Vec<u32> = items
            .iter()
            .map(|(ty, p)| {
                assert_eq!(*ty, NBD_SOCK_ITEM);
                let inner = parse_attrs(p);
                assert_eq!(inner.len(), 1);
                assert_eq!(inner[0].0, NBD_SOCK_FD);
                assert_eq!(inner[0].1.len(), 4);
                netlink::attr_u32(inner[0].1).unwrap()
            })
            .collect();
        assert_eq!(fds, vec![7, 9]);
        assert_eq!(parse_messages(&b).unwrap().len(), 1);
    }

    #[test]
    fn connect_with_index_timeout_and_read_only() {
        let c = ConnectConfig {
            index: Some(3),
            size: 8192,
            block_size: 512,
            server_flags: flags_for(true),
            client_flags: 0,
            timeout_secs: Some(30),
            dead_conn_timeout_secs: 5,
            backend: "volumed:v".into(),
            socket_fds: vec![4],
        };
        let b = connect_message(0x20, 1, &c);
        let attrs = parse_attrs(&b[20..]);
        assert_eq!(attrs[0].0, NBD_ATTR_INDEX);
        assert_eq!(attrs[0].1, 3u32.to_ne_bytes());
        let flags = attrs.iter().find(|a| a.0 == NBD_ATTR_SERVER_FLAGS).unwrap().1;
        assert_ne!(attr_u64(flags) & NBD_FLAG_READ_ONLY as u64, 0);
        let t = attrs.iter().find(|a| a.0 == NBD_ATTR_TIMEOUT).unwrap().1;
        assert_eq!(attr_u64(t), 30);
    }

    #[test]
    fn disconnect_message_bytes() {
        let b = disconnect_message(0x1d, 5, 2);
        let mut want = Vec::new();
        want.extend_from_slice(&28u32.to_ne_bytes());
        want.extend_from_slice(&0x1du16.to_ne_bytes());
        want.extend_from_slice(&(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
        want.extend_from_slice(&5u32.to_ne_bytes());
        want.extend_from_slice(&0u32.to_ne_bytes());
        want.extend_from_slice(&[NBD_CMD_DISCONNECT, 1, 0, 0]);
        want.extend_from_slice(&8u16.to_ne_bytes());
        want.extend_from_slice(&NBD_ATTR_INDEX.to_ne_bytes());
        want.extend_from_slice(&2u32.to_ne_bytes());
        assert_eq!(b, want);
    }

    #[test]
    fn resize_message_bytes() {
        let b = resize_message(0x1d, 6, 4, 2 << 30, 4096);
        let (len, _, _, seq, cmd, _) = header(&b);
        assert_eq!((len as usize, seq, cmd), (b.len(), 6, NBD_CMD_RECONFIGURE));
        assert_eq!(b.len(), 20 + 8 + 12 + 12);
        let attrs = parse_attrs(&b[20..]);
        assert_eq!(attrs[0], (NBD_ATTR_INDEX, &4u32.to_ne_bytes()[..]));
        assert_eq!(attrs[1].0, NBD_ATTR_SIZE_BYTES);
        assert_eq!(attr_u64(attrs[1].1), 2 << 30);
        assert_eq!(attrs[2].0, NBD_ATTR_BLOCK_SIZE_BYTES);
        assert_eq!(attr_u64(attrs[2].1), 4096);
    }

    #[test]
    fn reconnect_message_bytes() {
        let b = reconnect_message(0x1d, 8, 1, "volumed:x", 60, &[11]);
        let (_, _, _, _, cmd, _) = header(&b);
        assert_eq!(cmd, NBD_CMD_RECONFIGURE);
        let attrs = parse_attrs(&b[20..]);
        let types: Vec<u16> = attrs.iter().map(|a| a.0).collect();
        assert_eq!(
            types,
            vec![NBD_ATTR_INDEX, NBD_ATTR_DEAD_CONN_TIMEOUT, NBD_ATTR_BACKEND_IDENTIFIER, NBD_ATTR_SOCKETS]
        );
        let item = parse_attrs(attrs[3].1);
        assert_eq!(netlink::attr_u32(parse_attrs(item[0].1)[0].1), Some(11));
    }

    #[test]
    fn index_is_read_from_the_connect_reply() {
        let mut m = GenlMessage::new(0x1d, NBD_CMD_CONNECT, 1, 0, 3);
        m.put_u32(NBD_ATTR_INDEX, 5);
        let msgs = parse_messages(&m.finish()).unwrap();
        assert_eq!(index_from_replies(&msgs), Some(5));
        assert_eq!(index_from_replies(&[]), None);
    }

    /// An in-memory device for the socketpair test.
    struct MemDevice {
        data: std::sync::Mutex<Vec<u8>>,
        flushes: AtomicU64,
    }

    impl BlockDevice for MemDevice {
        fn size(&self) -> u64 {
            self.data.lock().unwrap().len() as u64
        }
        fn read(&self, offset: u64, len: u32) -> BoxFuture<'_, Result<bytes::Bytes, volumed_nbd::BlockError>> {
            let d = self.data.lock().unwrap();
            let out = bytes::Bytes::copy_from_slice(&d[offset as usize..offset as usize + len as usize]);
            Box::pin(async move { Ok(out) })
        }
        fn write(
            &self,
            offset: u64,
            data: bytes::Bytes,
            _fua: bool,
        ) -> BoxFuture<'_, Result<(), volumed_nbd::BlockError>> {
            self.data.lock().unwrap()[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
            Box::pin(async { Ok(()) })
        }
        fn flush(&self) -> BoxFuture<'_, Result<(), volumed_nbd::BlockError>> {
            self.flushes.fetch_add(1, Ordering::SeqCst);
            Box::pin(async { Ok(()) })
        }
        fn trim(&self, offset: u64, len: u64, _fua: bool) -> BoxFuture<'_, Result<(), volumed_nbd::BlockError>> {
            self.data.lock().unwrap()[offset as usize..(offset + len) as usize].fill(0);
            Box::pin(async { Ok(()) })
        }
        fn write_zeroes(
            &self,
            offset: u64,
            len: u64,
            fua: bool,
            _may_trim: bool,
        ) -> BoxFuture<'_, Result<(), volumed_nbd::BlockError>> {
            self.trim(offset, len, fua)
        }
    }

    fn nbd_request(cmd: u16, handle: u64, offset: u64, len: u32) -> Vec<u8> {
        let mut b = Vec::with_capacity(28);
        b.extend_from_slice(&0x2560_9513u32.to_be_bytes());
        b.extend_from_slice(&0u16.to_be_bytes());
        b.extend_from_slice(&cmd.to_be_bytes());
        b.extend_from_slice(&handle.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        b
    }

    fn nbd_reply(s: &mut std::os::unix::net::UnixStream) -> (u32, u64) {
        use std::io::Read;
        let mut r = [0u8; 16];
        s.read_exact(&mut r).unwrap();
        assert_eq!(u32::from_be_bytes(r[0..4].try_into().unwrap()), 0x6744_6698);
        (u32::from_be_bytes(r[4..8].try_into().unwrap()), u64::from_be_bytes(r[8..16].try_into().unwrap()))
    }

    /// Plays the kernel on its end of a socketpair: the served end must
    /// answer the transmission phase (no handshake) over the device.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn kernel_end_of_a_socketpair_is_served() {
        use std::io::{Read, Write};
        let mem = Arc::new(MemDevice { data: std::sync::Mutex::new(vec![0u8; 1 << 20]), flushes: AtomicU64::new(0) });
        let device: Arc<dyn BlockDevice> = mem.clone();
        let params = TransmissionParams {
            export: "t".into(),
            size: 1 << 20,
            block_size: 4096,
            read_only: false,
            flags: flags_for(false),
        };
        let span = tracing::Span::none();
        let (mut kernel_ends, tasks) = socket_pairs(1, &device, &volumed_nbd_server(), params, &span).unwrap();
        let sock = std::os::unix::net::UnixStream::from(kernel_ends.pop().unwrap());
        let payload: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
        let p2 = payload.clone();
        tokio::task::spawn_blocking(move || {
            let mut s = sock;
            s.write_all(&nbd_request(1, 11, 8192, 4096)).unwrap();
            s.write_all(&p2).unwrap();
            assert_eq!(nbd_reply(&mut s), (0, 11));
            s.write_all(&nbd_request(0, 12, 8192, 4096)).unwrap();
            assert_eq!(nbd_reply(&mut s), (0, 12));
            let mut back = vec![0u8; 4096];
            s.read_exact(&mut back).unwrap();
            assert_eq!(back, p2);
            s.write_all(&nbd_request(3, 13, 0, 0)).unwrap();
            assert_eq!(nbd_reply(&mut s), (0, 13));
            // Past the end: an error reply, not a dropped connection.
            s.write_all(&nbd_request(0, 14, 1 << 20, 4096)).unwrap();
            let (err, h) = nbd_reply(&mut s);
            assert_eq!(h, 14);
            assert_ne!(err, 0);
            s.write_all(&nbd_request(2, 15, 0, 0)).unwrap();
        })
        .await
        .unwrap();
        for t in tasks {
            tokio::time::timeout(Duration::from_secs(5), t).await.unwrap().unwrap();
        }
        assert_eq!(&mem.data.lock().unwrap()[8192..8192 + 4096], &payload[..]);
        assert_eq!(mem.flushes.load(Ordering::SeqCst), 1);
    }

    /// This machine has no nbd driver: the real family lookup must say so.
    #[test]
    fn availability_reports_a_missing_driver() {
        if Path::new("/sys/module/nbd").exists() {
            eprintln!("nbd driver present; skipping the negative check");
            return;
        }
        let err = availability().unwrap_err();
        assert!(err.contains("no \"nbd\" generic-netlink family"), "{err}");
        assert!(err.contains("fuse-loop"), "{err}");
    }
}
