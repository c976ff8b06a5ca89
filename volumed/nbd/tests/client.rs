//! Our client against the real qemu-nbd and against our own server.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use futures::future::join_all;
use tokio::net::TcpListener;
use volumed_nbd::client::{ClientOptions, ClientState, NbdClient, StaticEndpoints};
use volumed_nbd::protocol::*;
use volumed_nbd::server::{serve_connection, ConnectionEnd, ServerOptions};
use volumed_nbd::{BlockDevice, BlockError};

const MIB: u64 = 1 << 20;

fn opts() -> ClientOptions {
    ClientOptions {
        io_timeout: Duration::from_secs(30),
        initial_connect_timeout: Duration::from_secs(5),
        ..Default::default()
    }
}

async fn connect(addr: SocketAddr, export: &str) -> Arc<NbdClient> {
    NbdClient::connect(Arc::new(StaticEndpoints(vec![addr])), export.into(), opts()).await.unwrap()
}

/// The same workout against any server: data must land in `backing` and
/// read back identically.
async fn exercise(c: &NbdClient, backing: &Path, size: u64) {
    assert_eq!(c.size(), size);
    assert!(!c.read_only());
    assert!(matches!(c.state(), ClientState::Connected { .. }));

    // 64 concurrent 4 KiB writes of distinct data, then concurrent reads.
    let blocks: Vec<Vec<u8>> = (0..64).map(|_| random_bytes(4096)).collect();
    let writes = blocks.iter().enumerate().map(|(i, b)| c.write(i as u64 * 8192, Bytes::from(b.clone()), i % 7 == 0));
    for r in join_all(writes).await {
        r.unwrap();
    }
    let reads = (0..64).map(|i| c.read(i as u64 * 8192, 4096));
    for (i, r) in join_all(reads).await.into_iter().enumerate() {
        assert_eq!(&r.unwrap()[..], &blocks[i][..], "block {i}");
    }
    c.flush().await.unwrap();

    // Unaligned, odd-sized I/O.
    let odd = random_bytes(12345);
    c.write(3 * MIB + 17, Bytes::from(odd.clone()), false).await.unwrap();
    assert_eq!(&c.read(3 * MIB + 17, 12345).await.unwrap()[..], &odd[..]);

    // More than the 32 MiB request limit: split by the client.
    let big = random_bytes(40 * MIB as usize);
    c.write(4 * MIB, Bytes::from(big.clone()), true).await.unwrap();
    let back = c.read(4 * MIB, big.len() as u32).await.unwrap();
    assert!(back[..] == big[..], "40 MiB read differs");

    // Trim and write-zeroes read back as zeros.
    c.trim(4 * MIB, 8 * MIB, false).await.unwrap();
    assert!(c.read(4 * MIB, 8 * MIB as u32).await.unwrap().iter().all(|&b| b == 0));
    c.write_zeroes(20 * MIB, MIB, true, false).await.unwrap();
    c.write_zeroes(22 * MIB, MIB, false, true).await.unwrap();
    assert!(c.read(20 * MIB, 3 * MIB as u32).await.unwrap()[..MIB as usize].iter().all(|&b| b == 0));
    assert!(c.read(22 * MIB, MIB as u32).await.unwrap().iter().all(|&b| b == 0));

    // Past the end: OutOfRange, nothing written.
    assert_eq!(c.read(size - 512, 1024).await, Err(BlockError::OutOfRange));
    assert_eq!(c.write(size - 512, Bytes::from(vec![1u8; 1024]), false).await, Err(BlockError::OutOfRange));
    assert_eq!(c.write_zeroes(size, 512, false, false).await, Err(BlockError::OutOfRange));
    assert!(matches!(c.read(0, 0).await, Err(BlockError::Invalid(_))));

    c.flush().await.unwrap();
    let file = file_bytes(backing);
    for (i, b) in blocks.iter().enumerate() {
        assert_eq!(&file[i * 8192..i * 8192 + 4096], &b[..], "backing block {i}");
    }
    let at = (3 * MIB + 17) as usize;
    assert_eq!(&file[at..at + odd.len()], &odd[..]);
    let big_at = 4 * MIB as usize;
    assert!(file[big_at..big_at + 8 * MIB as usize].iter().all(|&b| b == 0), "trim not in the file");
    // 4..12 MiB trimmed, 20..21 and 22..23 MiB zeroed, the rest of the big write intact.
    assert!(file[12 * MIB as usize..20 * MIB as usize] == big[8 * MIB as usize..16 * MIB as usize], "big write");
    assert!(file[20 * MIB as usize..21 * MIB as usize].iter().all(|&b| b == 0));
    assert!(file[21 * MIB as usize..22 * MIB as usize] == big[17 * MIB as usize..18 * MIB as usize], "big write");
    assert!(file[22 * MIB as usize..23 * MIB as usize].iter().all(|&b| b == 0));
    assert!(file[23 * MIB as usize..big_at + big.len()] == big[19 * MIB as usize..], "big write");
    assert!(file[size as usize - 1024..].iter().all(|&b| b == 0), "a rejected write changed the file");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_against_qemu_nbd() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let size = 64 * MIB;
    let disk = make_file(dir.path(), "q.raw", size, false);
    let q = QemuNbd::start(&disk, "qvol").await;
    let c = connect(q.addr, "qvol").await;
    let flags = c.transmission_flags();
    assert_ne!(flags & TFLAG_SEND_FLUSH, 0);
    assert_ne!(flags & TFLAG_SEND_WRITE_ZEROES, 0);
    exercise(&c, &disk, size).await;
    c.close().await;
    assert_eq!(c.state(), ClientState::Closed);
    assert!(c.read(0, 512).await.is_err(), "a closed client must refuse requests");

    // qemu-nbd refuses an unknown export name; connect gives up with a reason.
    let err = NbdClient::connect(
        Arc::new(StaticEndpoints(vec![q.addr])),
        "other".into(),
        ClientOptions { initial_connect_timeout: Duration::from_millis(300), ..opts() },
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("other"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_against_our_server() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let size = 64 * MIB;
    let disk = make_file(dir.path(), "v.img", size, false);
    let ro = make_file(dir.path(), "ro.img", MIB, true);
    let exports = Exports::with(vec![
        ("vol", FileDevice::open(&disk, false) as Arc<dyn BlockDevice>),
        ("ro", FileDevice::open(&ro, true) as Arc<dyn BlockDevice>),
    ]);
    let server = TestServer::start(Arc::new(exports)).await;
    let c = connect(server.addr, "vol").await;
    assert_eq!(c.block_size(), 4096);
    assert_eq!(
        c.transmission_flags(),
        TFLAG_HAS_FLAGS
            | TFLAG_SEND_FLUSH
            | TFLAG_SEND_FUA
            | TFLAG_SEND_TRIM
            | TFLAG_SEND_WRITE_ZEROES
            | TFLAG_CAN_MULTI_CONN
    );
    exercise(&c, &disk, size).await;
    assert_eq!(c.stats().reconnects, 0);
    c.close().await;

    let r = connect(server.addr, "ro").await;
    assert!(r.read_only());
    let before = file_bytes(&ro);
    assert_eq!(r.write(0, Bytes::from_static(b"nope"), false).await, Err(BlockError::ReadOnly));
    assert_eq!(r.trim(0, 4096, false).await, Err(BlockError::ReadOnly));
    assert_eq!(&r.read(0, 4096).await.unwrap()[..], &before[..4096]);
    assert!(file_bytes(&ro) == before);
    r.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_errors_reach_the_caller_without_retry() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let disk = make_file(dir.path(), "v.img", 4 * MIB, false);
    let dev = Arc::new(FaultyDevice {
        inner: FileDevice::open(&disk, false),
        unavailable: 0.into(),
        poison_offset: Some(MIB),
        fenced_offset: Some(2 * MIB),
        calls: 0.into(),
    });
    let server = TestServer::start(Arc::new(Exports::with(vec![("vol", dev.clone() as Arc<dyn BlockDevice>)]))).await;
    let c = connect(server.addr, "vol").await;
    match c.read(MIB, 4096).await {
        Err(BlockError::Io(m)) => assert!(m.contains("EIO"), "{m}"),
        other => panic!("expected Io, got {other:?}"),
    }
    // Fenced writes surface as I/O errors.
    assert!(matches!(c.write(2 * MIB, Bytes::from(vec![1u8; 4096]), false).await, Err(BlockError::Io(_))));
    assert!(file_bytes(&disk)[2 * MIB as usize..2 * MIB as usize + 4096].iter().all(|&b| b == 0));
    c.write(0, Bytes::from(vec![2u8; 4096]), false).await.unwrap();
    assert_eq!(dev.calls.load(std::sync::atomic::Ordering::SeqCst), 3, "errors must not be retried");
    assert_eq!(c.stats().reconnects, 0);
    c.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_size_sees_a_grown_device() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let disk = make_file(dir.path(), "v.img", 4 * MIB, false);
    let dev = FileDevice::open(&disk, false);
    let server = TestServer::start(Arc::new(Exports::with(vec![("vol", dev.clone() as Arc<dyn BlockDevice>)]))).await;
    let c = connect(server.addr, "vol").await;
    assert_eq!(c.size(), 4 * MIB);
    assert_eq!(c.read(5 * MIB, 512).await, Err(BlockError::OutOfRange));
    dev.grow(8 * MIB);
    assert_eq!(c.refresh_size().await.unwrap(), 8 * MIB);
    assert_eq!(c.size(), 8 * MIB);
    c.write(7 * MIB, Bytes::from(vec![9u8; 4096]), false).await.unwrap();
    assert_eq!(&c.read(7 * MIB, 4096).await.unwrap()[..], &[9u8; 4096][..]);
    assert_eq!(c.stats().reconnects, 0, "the size query must not disturb the connection");
    c.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_sends_disconnect_after_in_flight_requests() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let disk = make_file(dir.path(), "v.img", 4 * MIB, false);
    let exports: Arc<Exports> =
        Arc::new(Exports::with(vec![("vol", FileDevice::open(&disk, false) as Arc<dyn BlockDevice>)]));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (sock, peer) = listener.accept().await.unwrap();
        serve_connection(sock, peer.to_string(), exports, &ServerOptions::default(), std::future::pending()).await
    });
    let c = connect(addr, "vol").await;
    let writes = (0..32u64).map(|i| c.write(i * 4096, Bytes::from(vec![i as u8; 4096]), false));
    join_all(writes).await.into_iter().for_each(|r| r.unwrap());
    c.flush().await.unwrap();
    c.close().await;
    let summary = tokio::time::timeout(Duration::from_secs(10), server).await.unwrap().unwrap();
    assert_eq!(summary.end, ConnectionEnd::Disconnect);
    assert_eq!(summary.export.as_deref(), Some("vol"));
    assert_eq!(summary.writes, 32);
    assert_eq!(summary.flushes, 1);
    assert_eq!(summary.errors, 0);
    let file = file_bytes(&disk);
    for i in 0..32usize {
        assert!(file[i * 4096..(i + 1) * 4096].iter().all(|&b| b == i as u8));
    }
}
