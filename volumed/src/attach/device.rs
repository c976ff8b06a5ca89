//! The block device a frontend serves for an attachment: the reconnecting
//! NBD client to the volume's leader, behind a gate that
//!
//! - fails every request at once (and the ones waiting) when the catalog
//!   says this attachment was fenced, instead of letting them wait out the
//!   client's reconnect attempts — the leader refuses them anyway;
//! - refuses writes on a read-only attachment locally;
//! - tracks requests in flight, so health can tell a stuck volume from an
//!   idle one.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::BoxFuture;
use tokio::sync::Notify;
use volumed_nbd::client::NbdClient;
use volumed_nbd::{BlockDevice, BlockError};

pub struct GuardedDevice {
    client: Arc<NbdClient>,
    readonly: bool,
    fenced: AtomicBool,
    fence_reason: Mutex<String>,
    fence_wake: Notify,
    inflight: AtomicU64,
    /// Milliseconds since `base` of the last completion, or of the moment
    /// requests started waiting after an idle period.
    progress_ms: AtomicU64,
    base: Instant,
    errors: AtomicU64,
}

/// Counts one request in flight for as long as it lives.
struct InFlight<'a>(&'a GuardedDevice);

impl<'a> InFlight<'a> {
    fn start(d: &'a GuardedDevice) -> Self {
        if d.inflight.fetch_add(1, Ordering::AcqRel) == 0 {
            d.stamp();
        }
        InFlight(d)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.stamp();
        self.0.inflight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl GuardedDevice {
    pub fn new(client: Arc<NbdClient>, readonly: bool) -> Arc<GuardedDevice> {
        Arc::new(GuardedDevice {
            client,
            readonly,
            fenced: AtomicBool::new(false),
            fence_reason: Mutex::new(String::new()),
            fence_wake: Notify::new(),
            inflight: AtomicU64::new(0),
            progress_ms: AtomicU64::new(0),
            base: Instant::now(),
            errors: AtomicU64::new(0),
        })
    }

    pub fn client(&self) -> &Arc<NbdClient> {
        &self.client
    }

    fn stamp(&self) {
        self.progress_ms.store(self.base.elapsed().as_millis() as u64, Ordering::Release);
    }

    /// From now on every request fails with [`BlockError::Fenced`].
    pub fn fence(&self, reason: &str) {
        if let Ok(mut r) = self.fence_reason.lock() {
            *r = reason.to_string();
        }
        self.fenced.store(true, Ordering::Release);
        self.fence_wake.notify_waiters();
    }

    pub fn is_fenced(&self) -> bool {
        self.fenced.load(Ordering::Acquire)
    }

    fn fenced_error(&self) -> Option<BlockError> {
        if !self.is_fenced() {
            return None;
        }
        let why = self.fence_reason.lock().map(|r| r.clone()).unwrap_or_default();
        Some(BlockError::Fenced(why))
    }

    /// How long the oldest request has waited without any request
    /// completing; `None` when idle.
    pub fn oldest_request(&self) -> Option<Duration> {
        if self.inflight.load(Ordering::Acquire) == 0 {
            return None;
        }
        let now = self.base.elapsed().as_millis() as u64;
        Some(Duration::from_millis(now.saturating_sub(self.progress_ms.load(Ordering::Acquire))))
    }

    /// Requests that failed (any error) since the attachment was made.
    pub fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }

    async fn guarded<T>(&self, op: impl Future<Output = Result<T, BlockError>>) -> Result<T, BlockError> {
        let res = self.gate(op).await;
        if res.is_err() {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        res
    }

    async fn gate<T>(&self, op: impl Future<Output = Result<T, BlockError>>) -> Result<T, BlockError> {
        if let Some(e) = self.fenced_error() {
            return Err(e);
        }
        let woken = self.fence_wake.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        // Fenced between the first check and registering for the wake-up.
        if let Some(e) = self.fenced_error() {
            return Err(e);
        }
        let _count = InFlight::start(self);
        tokio::select! {
            biased;
            r = op => r,
            _ = &mut woken => Err(self.fenced_error().unwrap_or_else(|| BlockError::Fenced(String::new()))),
        }
    }

    fn check_write(&self) -> Result<(), BlockError> {
        if self.readonly {
            Err(BlockError::ReadOnly)
        } else {
            Ok(())
        }
    }
}

impl BlockDevice for GuardedDevice {
    fn size(&self) -> u64 {
        self.client.size()
    }

    fn block_size(&self) -> u32 {
        self.client.block_size()
    }

    fn read_only(&self) -> bool {
        self.readonly || self.client.read_only()
    }

    fn read(&self, offset: u64, len: u32) -> BoxFuture<'_, Result<Bytes, BlockError>> {
        Box::pin(self.guarded(self.client.read(offset, len)))
    }

    fn write(&self, offset: u64, data: Bytes, fua: bool) -> BoxFuture<'_, Result<(), BlockError>> {
        Box::pin(async move {
            self.check_write()?;
            self.guarded(self.client.write(offset, data, fua)).await
        })
    }

    fn flush(&self) -> BoxFuture<'_, Result<(), BlockError>> {
        Box::pin(self.guarded(self.client.flush()))
    }

    fn trim(&self, offset: u64, len: u64, fua: bool) -> BoxFuture<'_, Result<(), BlockError>> {
        Box::pin(async move {
            self.check_write()?;
            self.guarded(self.client.trim(offset, len, fua)).await
        })
    }

    fn write_zeroes(&self, offset: u64, len: u64, fua: bool, may_trim: bool) -> BoxFuture<'_, Result<(), BlockError>> {
        Box::pin(async move {
            self.check_write()?;
            self.guarded(self.client.write_zeroes(offset, len, fua, may_trim)).await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use volumed_nbd::client::{ClientOptions, StaticEndpoints};
    use volumed_nbd::server::{serve, ServerOptions};
    use volumed_nbd::{ExportInfo, ExportResolver, OpenError};

    /// Reads answer zeros; writes never complete (a leader that stopped
    /// answering).
    struct Stuck;

    impl BlockDevice for Stuck {
        fn size(&self) -> u64 {
            1 << 20
        }
        fn read(&self, _offset: u64, len: u32) -> BoxFuture<'_, Result<Bytes, BlockError>> {
            Box::pin(async move { Ok(Bytes::from(vec![0u8; len as usize])) })
        }
        fn write(&self, _offset: u64, _data: Bytes, _fua: bool) -> BoxFuture<'_, Result<(), BlockError>> {
            Box::pin(futures::future::pending())
        }
        fn flush(&self) -> BoxFuture<'_, Result<(), BlockError>> {
            Box::pin(async { Ok(()) })
        }
        fn trim(&self, _offset: u64, _len: u64, _fua: bool) -> BoxFuture<'_, Result<(), BlockError>> {
            Box::pin(futures::future::pending())
        }
        fn write_zeroes(&self, _o: u64, _l: u64, _f: bool, _t: bool) -> BoxFuture<'_, Result<(), BlockError>> {
            Box::pin(futures::future::pending())
        }
    }

    struct One;

    impl ExportResolver for One {
        fn list(&self) -> BoxFuture<'_, Vec<ExportInfo>> {
            Box::pin(async { Vec::new() })
        }
        fn open(&self, _name: &str) -> BoxFuture<'_, Result<Arc<dyn BlockDevice>, OpenError>> {
            Box::pin(async { Ok(Arc::new(Stuck) as Arc<dyn BlockDevice>) })
        }
    }

    async fn guarded(readonly: bool) -> Arc<GuardedDevice> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve(listener, Arc::new(One), ServerOptions::default(), futures::future::pending()));
        let client = NbdClient::connect(Arc::new(StaticEndpoints(vec![addr])), "v@1".into(), ClientOptions::default())
            .await
            .unwrap();
        GuardedDevice::new(client, readonly)
    }

    #[tokio::test]
    async fn fencing_fails_waiting_and_new_requests_at_once() {
        let d = guarded(false).await;
        assert_eq!(d.read(0, 4096).await.unwrap().len(), 4096);
        assert_eq!(d.oldest_request(), None, "idle");
        let waiting = {
            let d = d.clone();
            tokio::spawn(async move { d.write(0, Bytes::from(vec![1u8; 4096]), false).await })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        let age = d.oldest_request().expect("a write is waiting");
        assert!(age >= Duration::from_millis(200), "{age:?}");
        d.fence("moved to node 2");
        let r = tokio::time::timeout(Duration::from_secs(2), waiting).await.expect("woken by the fence").unwrap();
        assert_eq!(r, Err(BlockError::Fenced("moved to node 2".into())));
        assert!(matches!(d.read(0, 4096).await, Err(BlockError::Fenced(_))));
        assert!(matches!(d.flush().await, Err(BlockError::Fenced(_))));
        assert_eq!(d.oldest_request(), None);
        assert_eq!(d.errors(), 3);
    }

    #[tokio::test]
    async fn read_only_attachment_refuses_writes_locally() {
        let d = guarded(true).await;
        assert!(d.read_only());
        assert_eq!(d.write(0, Bytes::from(vec![1u8; 4096]), false).await, Err(BlockError::ReadOnly));
        assert_eq!(d.trim(0, 4096, false).await, Err(BlockError::ReadOnly));
        assert_eq!(d.read(0, 512).await.unwrap().len(), 512);
    }
}
