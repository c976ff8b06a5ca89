//! Reconnect and replay: servers die (crash or graceful), answer
//! ESHUTDOWN, stall, or the client is moved; every request still completes
//! with the right data and the pause is measured.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use futures::future::BoxFuture;
use volumed_nbd::client::{ClientOptions, ClientState, EndpointSource, NbdClient};
use volumed_nbd::{BlockDevice, BlockError};

const MIB: u64 = 1 << 20;
const BLOCK: u64 = 4096;

/// Endpoints the test can change while the client runs.
struct Switch(Mutex<Vec<SocketAddr>>);

impl Switch {
    fn new(addrs: Vec<SocketAddr>) -> Arc<Switch> {
        Arc::new(Switch(Mutex::new(addrs)))
    }
    fn set(&self, addrs: Vec<SocketAddr>) {
        *self.0.lock().unwrap() = addrs;
    }
}

impl EndpointSource for Switch {
    fn endpoints(&self) -> BoxFuture<'_, Vec<SocketAddr>> {
        Box::pin(async move { self.0.lock().unwrap().clone() })
    }
}

fn opts() -> ClientOptions {
    ClientOptions {
        io_timeout: Duration::from_secs(30),
        initial_connect_timeout: Duration::from_secs(5),
        ..Default::default()
    }
}

fn exports(dev: Arc<dyn BlockDevice>) -> Arc<Exports> {
    Arc::new(Exports::with(vec![("vol", dev)]))
}

async fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// 32 writes of fresh data and 32 reads of known data, all started at once.
struct Batch {
    writes: Vec<(u64, Vec<u8>)>,
    reads: Vec<u64>,
    tasks: Vec<tokio::task::JoinHandle<Result<Option<Bytes>, BlockError>>>,
}

fn start_batch(c: &Arc<NbdClient>, round: u64) -> Batch {
    let mut b = Batch { writes: Vec::new(), reads: Vec::new(), tasks: Vec::new() };
    for i in 0..32u64 {
        let off = (round * 64 + i) * BLOCK;
        let data = random_bytes(BLOCK as usize);
        let c2 = c.clone();
        let d = Bytes::from(data.clone());
        b.tasks.push(tokio::spawn(async move { c2.write(off, d, i % 4 == 0).await.map(|_| None) }));
        b.writes.push((off, data));
    }
    for i in 0..32u64 {
        // Reads of a region nobody writes: must return the initial data.
        let off = 8 * MIB + (round * 32 + i) * BLOCK;
        let c2 = c.clone();
        b.tasks.push(tokio::spawn(async move { c2.read(off, BLOCK as u32).await.map(Some) }));
        b.reads.push(off);
    }
    b
}

async fn finish_batch(b: Batch, initial: &[u8], disk: &std::path::Path) {
    let mut results = Vec::new();
    for t in b.tasks {
        results.push(tokio::time::timeout(Duration::from_secs(30), t).await.expect("request hung").unwrap());
    }
    for (i, r) in results.iter().enumerate() {
        assert!(r.is_ok(), "request {i} failed: {r:?}");
    }
    for (j, off) in b.reads.iter().enumerate() {
        let got = results[32 + j].as_ref().unwrap().as_ref().unwrap();
        assert_eq!(&got[..], &initial[*off as usize..(*off + BLOCK) as usize], "read at {off}");
    }
    let file = file_bytes(disk);
    for (off, data) in &b.writes {
        assert_eq!(&file[*off as usize..*off as usize + data.len()], &data[..], "write at {off}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_server_with_64_in_flight_is_replaced_and_everything_replayed() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let disk = make_file(dir.path(), "v.img", 16 * MIB, true);
    let initial = file_bytes(&disk);
    let file = FileDevice::open(&disk, false);

    let mut gate = GatedDevice::new(file.clone());
    let mut server = TestServer::start(exports(gate.clone())).await;
    let endpoints = Switch::new(vec![server.addr]);
    let c = NbdClient::connect(endpoints.clone(), "vol".into(), opts()).await.unwrap();

    let rounds = 5;
    let mut pauses = Vec::new();
    for round in 0..rounds {
        let batch = start_batch(&c, round);
        wait_until("64 requests at the server", Duration::from_secs(10), || gate.arrived() == 64).await;

        // The replacement holds replays at its gate until all 64 are there.
        let next_gate = GatedDevice::new(file.clone());
        let next = TestServer::start(exports(next_gate.clone())).await;
        endpoints.set(vec![server.addr, next.addr]);
        let killed = Instant::now();
        server.kill().await;
        wait_until("64 replays at the new server", Duration::from_secs(10), || next_gate.arrived() == 64).await;
        let replay_seen = killed.elapsed();
        next_gate.open();
        finish_batch(batch, &initial, &disk).await;

        let stats = c.stats();
        assert_eq!(stats.reconnects, round + 1);
        assert_eq!(c.state(), ClientState::Connected { addr: next.addr });
        let pause = stats.last_pause.expect("a pause is recorded");
        pauses.push(pause);
        eprintln!("round {round}: client pause {pause:?}, kill to all replays at the new server {replay_seen:?}");

        // Set up the next round: the new server holds requests again.
        next_gate.close();
        next_gate.arrived.store(0, Ordering::SeqCst);
        server = next;
        gate = next_gate;
    }
    let stats = c.stats();
    assert_eq!(stats.replayed, 64 * rounds);
    assert_eq!(stats.timeouts, 0);
    pauses.sort();
    eprintln!(
        "reconnect pause over {rounds} kills: min {:?} median {:?} max {:?}",
        pauses[0],
        pauses[pauses.len() / 2],
        pauses[pauses.len() - 1]
    );
    gate.open();
    c.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eshutdown_replies_are_replayed_not_returned() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let disk = make_file(dir.path(), "v.img", 16 * MIB, true);
    let initial = file_bytes(&disk);
    let dev = Arc::new(FaultyDevice {
        inner: FileDevice::open(&disk, false),
        unavailable: 5.into(),
        poison_offset: None,
        fenced_offset: None,
        calls: 0.into(),
    });
    let server = TestServer::start(exports(dev.clone())).await;
    let c = NbdClient::connect(Switch::new(vec![server.addr]), "vol".into(), opts()).await.unwrap();
    let batch = start_batch(&c, 0);
    finish_batch(batch, &initial, &disk).await;
    assert_eq!(dev.unavailable.load(Ordering::SeqCst), 0);
    assert!(c.stats().reconnects >= 1, "{:?}", c.stats());
    c.flush().await.unwrap();
    c.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_server_shutdown_under_load() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let disk = make_file(dir.path(), "v.img", 16 * MIB, false);
    let file = FileDevice::open(&disk, false);
    let s1 = TestServer::start(exports(file.clone())).await;
    let s2 = TestServer::start(exports(file.clone())).await;
    let endpoints = Switch::new(vec![s1.addr, s2.addr]);
    let c = NbdClient::connect(endpoints.clone(), "vol".into(), opts()).await.unwrap();

    // 8 workers each write-then-verify their own blocks in a loop.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut workers = Vec::new();
    for w in 0..8u64 {
        let c = c.clone();
        let stop = stop.clone();
        workers.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let off = (w * 256 + n % 256) * BLOCK;
                let data = Bytes::from(random_bytes(BLOCK as usize));
                c.write(off, data.clone(), false).await.unwrap();
                assert_eq!(c.read(off, BLOCK as u32).await.unwrap(), data);
                n += 1;
            }
            n
        }));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    s1.stop().await;
    wait_until("a reconnect to s2", Duration::from_secs(10), || c.state() == ClientState::Connected { addr: s2.addr })
        .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::SeqCst);
    let mut total = 0;
    for w in workers {
        total += w.await.unwrap();
    }
    assert!(total > 0);
    assert_eq!(c.stats().timeouts, 0);
    eprintln!("graceful shutdown: {total} write+verify rounds, stats {:?}", c.stats());
    c.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migration_moves_new_requests_at_once_and_drains_the_old_connection() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let disk = make_file(dir.path(), "v.img", 16 * MIB, true);
    let initial = file_bytes(&disk);
    let file = FileDevice::open(&disk, false);
    let old_gate = GatedDevice::new(file.clone());
    let counted = Arc::new(FaultyDevice {
        inner: file.clone(),
        unavailable: 0.into(),
        poison_offset: None,
        fenced_offset: None,
        calls: 0.into(),
    });
    let s1 = TestServer::start(exports(old_gate.clone())).await;
    let s2 = TestServer::start(exports(counted.clone())).await;
    let endpoints = Switch::new(vec![s1.addr]);
    let c = NbdClient::connect(endpoints.clone(), "vol".into(), opts()).await.unwrap();

    let first = start_batch(&c, 0);
    wait_until("64 requests held at the old leader", Duration::from_secs(10), || old_gate.arrived() == 64).await;
    endpoints.set(vec![s2.addr, s1.addr]);
    c.reconnect();
    wait_until("the move to s2", Duration::from_secs(10), || c.state() == ClientState::Connected { addr: s2.addr })
        .await;

    // New requests complete on s2 while the old ones still wait on s1.
    let second = start_batch(&c, 1);
    finish_batch(second, &initial, &disk).await;
    assert_eq!(counted.calls.load(Ordering::SeqCst), 64, "old requests must not be replayed on s2");

    old_gate.open();
    finish_batch(first, &initial, &disk).await;
    let stats = c.stats();
    assert_eq!((stats.migrations, stats.reconnects, stats.replayed), (1, 0, 0), "{stats:?}");
    assert_eq!(counted.calls.load(Ordering::SeqCst), 64);
    c.close().await;
    drop(s1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_connection_is_replaced() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let disk = make_file(dir.path(), "v.img", 16 * MIB, true);
    let initial = file_bytes(&disk);
    let file = FileDevice::open(&disk, false);
    let hung = GatedDevice::new(file.clone());
    let s1 = TestServer::start(exports(hung.clone())).await;
    let s2 = TestServer::start(exports(file.clone())).await;
    let endpoints = Switch::new(vec![s1.addr]);
    let c = NbdClient::connect(
        endpoints.clone(),
        "vol".into(),
        ClientOptions { stall_timeout: Duration::from_millis(400), ..opts() },
    )
    .await
    .unwrap();
    let batch = start_batch(&c, 0);
    wait_until("requests at the hung server", Duration::from_secs(10), || hung.arrived() == 64).await;
    endpoints.set(vec![s2.addr]);
    let t = Instant::now();
    finish_batch(batch, &initial, &disk).await;
    assert!(t.elapsed() >= Duration::from_millis(300), "replaced before the stall timeout");
    assert_eq!(c.state(), ClientState::Connected { addr: s2.addr });
    assert_eq!(c.stats().reconnects, 1);
    c.close().await;
    drop(s1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn io_timeout_when_no_server_comes_back() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let disk = make_file(dir.path(), "v.img", 4 * MIB, false);
    let file = FileDevice::open(&disk, false);
    let s1 = TestServer::start(exports(file.clone())).await;
    let endpoints = Switch::new(vec![s1.addr]);
    let c = NbdClient::connect(
        endpoints.clone(),
        "vol".into(),
        ClientOptions { io_timeout: Duration::from_millis(700), ..opts() },
    )
    .await
    .unwrap();
    c.write(0, Bytes::from(vec![1u8; 4096]), false).await.unwrap();
    let gone = s1.addr;
    s1.kill().await;

    let t = Instant::now();
    match c.write(4096, Bytes::from(vec![2u8; 4096]), false).await {
        Err(BlockError::Io(m)) => assert!(m.contains("did not complete"), "{m}"),
        other => panic!("expected a timeout, got {other:?}"),
    }
    let waited = t.elapsed();
    assert!(waited >= Duration::from_millis(600) && waited < Duration::from_secs(5), "{waited:?}");
    match c.state() {
        ClientState::Reconnecting { last_error, .. } => {
            assert!(last_error.contains(&gone.to_string()), "{last_error}")
        }
        other => panic!("expected Reconnecting, got {other:?}"),
    }
    assert_eq!(c.stats().timeouts, 1);
    // The timed-out write was never executed anywhere.
    assert!(file_bytes(&disk)[4096..8192].iter().all(|&b| b == 0));

    // A server coming back (elsewhere) is picked up.
    let s2 = TestServer::start(exports(file.clone())).await;
    endpoints.set(vec![s2.addr]);
    wait_until("reconnect", Duration::from_secs(10), || c.state() == ClientState::Connected { addr: s2.addr }).await;
    assert_eq!(&c.read(0, 4096).await.unwrap()[..], &[1u8; 4096][..]);
    c.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_eshutdown_backs_off_instead_of_spinning() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let disk = make_file(dir.path(), "v.img", 4 * MIB, false);
    let dev = Arc::new(FaultyDevice {
        inner: FileDevice::open(&disk, false),
        unavailable: usize::MAX.into(),
        poison_offset: None,
        fenced_offset: None,
        calls: 0.into(),
    });
    let server = TestServer::start(exports(dev.clone())).await;
    let c = NbdClient::connect(
        Switch::new(vec![server.addr]),
        "vol".into(),
        ClientOptions { io_timeout: Duration::from_millis(1500), ..opts() },
    )
    .await
    .unwrap();
    assert!(matches!(c.read(0, 4096).await, Err(BlockError::Io(_))));
    let attempts = dev.calls.load(Ordering::SeqCst);
    // Backing off 50 ms, 100 ms, ... 1 s allows about 6 attempts in 1.5 s; a
    // tight loop would make hundreds.
    assert!((2..=10).contains(&attempts), "{attempts} attempts in 1.5 s");
    c.close().await;
}
