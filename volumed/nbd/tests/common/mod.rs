//! Shared test support: a file-backed BlockDevice, device wrappers that
//! misbehave on purpose, an export table, a server harness and helpers for
//! running third-party tools.
#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use volumed_nbd::server::{serve, ServerOptions};
use volumed_nbd::{BlockDevice, BlockError, ExportInfo, ExportResolver, OpenError};

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("NBD_TEST_LOG").unwrap_or_else(|_| "warn".into()))
        .with_test_writer()
        .try_init();
}

/// A real file behind the BlockDevice contract: pread/pwrite, fdatasync on
/// flush and FUA, fallocate(PUNCH_HOLE) on trim.
pub struct FileDevice {
    file: Arc<File>,
    size: AtomicU64,
    read_only: bool,
    block_size: u32,
}

fn io_err(e: std::io::Error) -> BlockError {
    BlockError::Io(e.to_string())
}

fn fallocate(file: &File, mode: libc::c_int, offset: u64, len: u64) -> std::io::Result<()> {
    // SAFETY: plain syscall on a valid descriptor owned by `file`.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), mode, offset as libc::off_t, len as libc::off_t) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

impl FileDevice {
    pub fn open(path: &Path, read_only: bool) -> Arc<FileDevice> {
        let file = OpenOptions::new().read(true).write(!read_only).open(path).unwrap();
        let size = file.metadata().unwrap().len();
        Arc::new(FileDevice { file: Arc::new(file), size: AtomicU64::new(size), read_only, block_size: 4096 })
    }

    /// Grows the backing file (and the device).
    pub fn grow(&self, new_size: u64) {
        self.file.set_len(new_size).unwrap();
        self.size.store(new_size, Ordering::SeqCst);
    }

    fn check(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size() => Ok(()),
            _ => Err(BlockError::OutOfRange),
        }
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&File) -> std::io::Result<T> + Send + 'static,
    ) -> Result<T, BlockError> {
        let file = self.file.clone();
        tokio::task::spawn_blocking(move || f(&file)).await.map_err(|e| BlockError::Io(e.to_string()))?.map_err(io_err)
    }
}

impl BlockDevice for FileDevice {
    fn size(&self) -> u64 {
        self.size.load(Ordering::SeqCst)
    }
    fn block_size(&self) -> u32 {
        self.block_size
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn read(&self, offset: u64, len: u32) -> BoxFuture<'_, Result<Bytes, BlockError>> {
        Box::pin(async move {
            self.check(offset, len.into())?;
            self.blocking(move |f| {
                let mut buf = vec![0u8; len as usize];
                f.read_exact_at(&mut buf, offset)?;
                Ok(Bytes::from(buf))
            })
            .await
        })
    }
    fn write(&self, offset: u64, data: Bytes, fua: bool) -> BoxFuture<'_, Result<(), BlockError>> {
        Box::pin(async move {
            if self.read_only {
                return Err(BlockError::ReadOnly);
            }
            self.check(offset, data.len() as u64)?;
            self.blocking(move |f| {
                f.write_all_at(&data, offset)?;
                if fua {
                    f.sync_data()?;
                }
                Ok(())
            })
            .await
        })
    }
    fn flush(&self) -> BoxFuture<'_, Result<(), BlockError>> {
        Box::pin(async move { self.blocking(|f| f.sync_data()).await })
    }
    fn trim(&self, offset: u64, len: u64, fua: bool) -> BoxFuture<'_, Result<(), BlockError>> {
        Box::pin(async move {
            if self.read_only {
                return Err(BlockError::ReadOnly);
            }
            self.check(offset, len)?;
            self.blocking(move |f| {
                fallocate(f, libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, offset, len)?;
                if fua {
                    f.sync_data()?;
                }
                Ok(())
            })
            .await
        })
    }
    fn write_zeroes(&self, offset: u64, len: u64, fua: bool, may_trim: bool) -> BoxFuture<'_, Result<(), BlockError>> {
        Box::pin(async move {
            if self.read_only {
                return Err(BlockError::ReadOnly);
            }
            self.check(offset, len)?;
            self.blocking(move |f| {
                let mode = if may_trim {
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
                } else {
                    libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
                };
                if fallocate(f, mode, offset, len).is_err() {
                    let zeros = vec![0u8; 1 << 20];
                    let mut at = offset;
                    while at < offset + len {
                        let n = (offset + len - at).min(zeros.len() as u64) as usize;
                        f.write_all_at(&zeros[..n], at)?;
                        at += n as u64;
                    }
                }
                if fua {
                    f.sync_data()?;
                }
                Ok(())
            })
            .await
        })
    }
}

/// Holds every request until `open()`; counts how many arrived. Dropping
/// the future (a killed server) abandons the request before it touches the
/// inner device.
pub struct GatedDevice {
    pub inner: Arc<dyn BlockDevice>,
    pub arrived: AtomicUsize,
    gate: watch::Sender<bool>,
}

impl GatedDevice {
    pub fn new(inner: Arc<dyn BlockDevice>) -> Arc<GatedDevice> {
        Arc::new(GatedDevice { inner, arrived: AtomicUsize::new(0), gate: watch::channel(false).0 })
    }
    pub fn open(&self) {
        self.gate.send_replace(true);
    }
    /// Holds requests again from now on (requests already past stay past).
    pub fn close(&self) {
        self.gate.send_replace(false);
    }
    pub fn arrived(&self) -> usize {
        self.arrived.load(Ordering::SeqCst)
    }
    async fn pass(&self) {
        self.arrived.fetch_add(1, Ordering::SeqCst);
        let mut rx = self.gate.subscribe();
        let _ = rx.wait_for(|open| *open).await;
    }
}

impl BlockDevice for GatedDevice {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read(&self, offset: u64, len: u32) -> BoxFuture<'_, Result<Bytes, BlockError>> {
        Box::pin(async move {
            self.pass().await;
            self.inner.read(offset, len).await
        })
    }
    fn write(&self, offset: u64, data: Bytes, fua: bool) -> BoxFuture<'_, Result<(), BlockError>> {
        Box::pin(async move {
            self.pass().await;
            self.inner.write(offset, data, fua).await
        })
    }
    fn flush(&self) -> BoxFuture<'_, Result<(), BlockError>> {
        Box::pin(async move {
            self.pass().await;
            self.inner.flush().await
        })
    }
    fn trim(&self, offset: u64, len: u64, fua: bool) -> BoxFuture<'_, Result<(), BlockError>> {
        Box::pin(async move {
            self.pass().await;
            self.inner.trim(offset, len, fua).await
        })
    }
    fn write_zeroes(&self, offset: u64, len: u64, fua: bool, may_trim: bool) -> BoxFuture<'_, Result<(), BlockError>> {
        Box::pin(async move {
            self.pass().await;
            self.inner.write_zeroes(offset, len, fua, may_trim).await
        })
    }
}

/// Fails requests with a chosen error: the first `unavailable` requests with
/// `Unavailable` (NBD_ESHUTDOWN), and any request touching `poison_offset`
/// with `Io`.
pub struct FaultyDevice {
    pub inner: Arc<dyn BlockDevice>,
    pub unavailable: AtomicUsize,
    pub poison_offset: Option<u64>,
    pub fenced_offset: Option<u64>,
    pub calls: AtomicUsize,
}

impl FaultyDevice {
    fn fault(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let left = self.unavailable.load(Ordering::SeqCst);
        if left > 0 && self.unavailable.compare_exchange(left, left - 1, Ordering::SeqCst, Ordering::SeqCst).is_ok() {
            return Err(BlockError::Unavailable("leadership moved".into()));
        }
        let hits = |p: Option<u64>| p.is_some_and(|p| offset <= p && p < offset + len);
        if hits(self.poison_offset) {
            return Err(BlockError::Io("bad sector".into()));
        }
        if hits(self.fenced_offset) {
            return Err(BlockError::Fenced("attachment generation 3 < fence 4".into()));
        }
        Ok(())
    }
}

impl BlockDevice for FaultyDevice {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read(&self, offset: u64, len: u32) -> BoxFuture<'_, Result<Bytes, BlockError>> {
        Box::pin(async move {
            self.fault(offset, len.into())?;
            self.inner.read(offset, len).await
        })
    }
    fn write(&self, offset: u64, data: Bytes, fua: bool) -> BoxFuture<'_, Result<(), BlockError>> {
        Box::pin(async move {
            self.fault(offset, data.len() as u64)?;
            self.inner.write(offset, data, fua).await
        })
    }
    fn flush(&self) -> BoxFuture<'_, Result<(), BlockError>> {
        Box::pin(async move {
            self.fault(u64::MAX, 0)?;
            self.inner.flush().await
        })
    }
    fn trim(&self, offset: u64, len: u64, fua: bool) -> BoxFuture<'_, Result<(), BlockError>> {
        Box::pin(async move {
            self.fault(offset, len)?;
            self.inner.trim(offset, len, fua).await
        })
    }
    fn write_zeroes(&self, offset: u64, len: u64, fua: bool, may_trim: bool) -> BoxFuture<'_, Result<(), BlockError>> {
        Box::pin(async move {
            self.fault(offset, len)?;
            self.inner.write_zeroes(offset, len, fua, may_trim).await
        })
    }
}

/// Export table for the server. Names listed in `policy` / `unavailable`
/// are refused with the matching OpenError.
#[derive(Default)]
pub struct Exports {
    pub devices: Mutex<HashMap<String, Arc<dyn BlockDevice>>>,
    pub policy: HashSet<String>,
    pub unavailable: HashSet<String>,
}

impl Exports {
    pub fn with(devices: Vec<(&str, Arc<dyn BlockDevice>)>) -> Exports {
        Exports {
            devices: Mutex::new(devices.into_iter().map(|(n, d)| (n.to_string(), d)).collect()),
            ..Default::default()
        }
    }
}

impl ExportResolver for Exports {
    fn list(&self) -> BoxFuture<'_, Vec<ExportInfo>> {
        Box::pin(async move {
            let mut names: Vec<String> = self.devices.lock().unwrap().keys().cloned().collect();
            names.sort();
            names.into_iter().map(|name| ExportInfo { description: format!("test volume {name}"), name }).collect()
        })
    }
    fn open(&self, name: &str) -> BoxFuture<'_, Result<Arc<dyn BlockDevice>, OpenError>> {
        let name = name.to_string();
        Box::pin(async move {
            if self.policy.contains(&name) {
                return Err(OpenError::Policy(format!("{name} needs the current attachment generation")));
            }
            if self.unavailable.contains(&name) {
                return Err(OpenError::Unavailable(format!("{name} has no leader yet")));
            }
            self.devices.lock().unwrap().get(&name).cloned().ok_or(OpenError::Unknown(name))
        })
    }
}

/// Our server on 127.0.0.1:<free port>, run on its own task.
pub struct TestServer {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl TestServer {
    pub async fn start(resolver: Arc<dyn ExportResolver>) -> TestServer {
        Self::start_with(resolver, ServerOptions::default()).await
    }

    pub async fn start_with(resolver: Arc<dyn ExportResolver>, opts: ServerOptions) -> TestServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(serve(listener, resolver, opts, async move {
            let _ = stopped.await;
        }));
        TestServer { addr, stop: Some(stop), task: Some(task) }
    }

    pub fn uri(&self, export: &str) -> String {
        format!("nbd://{}/{export}", self.addr)
    }

    /// Like a crash: every connection is cut, in-flight requests abandoned.
    pub async fn kill(mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
    }

    /// Graceful shutdown through the server's shutdown future.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(30), task).await;
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// A file of `size` bytes in `dir`: sparse zeros, or random bytes.
pub fn make_file(dir: &Path, name: &str, size: u64, random: bool) -> PathBuf {
    use rand::RngCore;
    let path = dir.join(name);
    let f = File::create(&path).unwrap();
    f.set_len(size).unwrap();
    if random {
        let mut rng = rand::rng();
        let mut buf = vec![0u8; 1 << 20];
        let mut at = 0;
        while at < size {
            let n = (size - at).min(buf.len() as u64) as usize;
            rng.fill_bytes(&mut buf[..n]);
            f.write_all_at(&buf[..n], at).unwrap();
            at += n as u64;
        }
    }
    path
}

pub fn random_bytes(len: usize) -> Vec<u8> {
    use rand::RngCore;
    let mut v = vec![0u8; len];
    rand::rng().fill_bytes(&mut v);
    v
}

pub fn file_bytes(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap()
}

/// Checks a third-party tool is installed, failing with the package to install.
pub fn require_tool(tool: &str, package: &str) {
    let found =
        std::env::var_os("PATH").map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file())).unwrap_or(false);
    assert!(found, "`{tool}` is not installed: install the Debian package `{package}` (apt-get install {package})");
}

/// A command for a child process, without proxy settings.
pub fn tool(program: &str) -> Command {
    let mut c = Command::new(program);
    for v in
        ["http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY", "no_proxy", "NO_PROXY"]
    {
        c.env_remove(v);
    }
    c
}

/// Runs a command on the blocking pool; panics with its output if it fails.
pub async fn run_ok(mut cmd: Command) -> String {
    let shown = format!("{cmd:?}");
    let out = tokio::task::spawn_blocking(move || cmd.output()).await.unwrap().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{shown} failed ({}):\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// A free TCP port on 127.0.0.1 (for tools that need a port number).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A qemu-nbd child serving a raw file; killed (by its pid) on drop.
pub struct QemuNbd {
    pub addr: SocketAddr,
    child: std::process::Child,
}

impl QemuNbd {
    pub async fn start(file: &Path, export: &str) -> QemuNbd {
        require_tool("qemu-nbd", "qemu-utils");
        let port = free_port();
        let child = tool("qemu-nbd")
            .args(["-f", "raw", "-x", export, "-p", &port.to_string(), "-b", "127.0.0.1", "--persistent", "--shared=8"])
            .arg(file)
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let mut q = QemuNbd { addr, child };
        for _ in 0..200 {
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                return q;
            }
            if let Ok(Some(status)) = q.child.try_wait() {
                panic!("qemu-nbd exited early: {status}");
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("qemu-nbd did not listen on {addr}");
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
