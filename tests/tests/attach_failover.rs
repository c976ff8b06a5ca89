//! Attached devices across failures (issue 3): the volume leader killed
//! under a running filesystem workload, the attach caller restarted,
//! fsynced data across the loss of every replica.
//!
//! The clusters have four nodes and the volume three replicas, so the
//! attaching node holds no replica and killing any replica leaves it alive.

use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::{RngCore, SeedableRng};
use volumed_proto::volumed::v1 as pb;
use volumed_tests::cluster::{clean_env, serial, Cluster, ClusterOptions};
use volumed_tests::node_local::{self, assert_no_devices_left, Cleanup};
use volumed_tests::tools::{self, run};

const RWO: pb::AccessMode = pb::AccessMode::SingleNodeWriter;

fn four_nodes() -> ClusterOptions {
    ClusterOptions { nodes: 4, bootstrap_expect: 4, ..ClusterOptions::default() }
}

/// Creates a 3-replica volume and returns the index of the node that holds
/// no replica of it.
async fn volume_off_node(cluster: &Cluster, name: &str, size: u64) -> usize {
    let v = cluster.create_volume(name, size, 3).await;
    let mut holders = Vec::new();
    for r in &v.replicas {
        holders.push(cluster.index_of(r.node_id).await);
    }
    (0..cluster.nodes.len()).find(|i| !holders.contains(i)).expect("a node without a replica")
}

async fn wait_healthy(cluster: &Cluster, name: &str) {
    cluster
        .wait_volume(name, Duration::from_secs(90), "healthy with every replica", |v| {
            v.state == pb::VolumeState::Healthy as i32
                && v.replicas.iter().filter(|r| r.state == pb::ReplicaState::Healthy as i32).count() == 3
        })
        .await;
}

/// The volume's leader once the reports agree: exactly one replica says it
/// leads, twice in a row (a report of a node killed a moment ago can still
/// be fresh).
async fn settled_leader(cluster: &Cluster, name: &str) -> usize {
    let mut last = None;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v = cluster.get_volume(name).await;
        let leaders: Vec<u64> =
            v.replicas.iter().filter(|r| r.role == pb::ReplicaRole::Leader as i32).map(|r| r.node_id).collect();
        let now = (leaders.len() == 1 && leaders[0] == v.leader_node_id).then_some(v.leader_node_id);
        if now.is_some() && now == last {
            return cluster.index_of(v.leader_node_id).await;
        }
        last = now;
        assert!(Instant::now() < deadline, "no settled leader: {v:#?}");
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
}

/// One write+fdatasync of the writer: when it started and ended.
#[derive(Debug, Clone, Copy)]
struct Op {
    start: Instant,
    end: Instant,
}

/// A writer on a file of the mounted filesystem: 64 KiB O_DIRECT writes
/// of random data to rotating slots, each followed by fdatasync, with the
/// CRC of every slot's last content kept for verification.
struct Writer {
    stop: Arc<AtomicBool>,
    ops: Arc<Mutex<Vec<Op>>>,
    error: Arc<Mutex<Option<String>>>,
    handle: Option<std::thread::JoinHandle<Vec<u32>>>,
    path: PathBuf,
}

const SLOT: usize = 64 << 10;
const SLOTS: usize = 256;

fn aligned(len: usize) -> Vec<u8> {
    // O_DIRECT wants aligned buffers: over-allocate and slice.
    vec![0u8; len + 4096]
}

fn aligned_slice(buf: &mut [u8], len: usize) -> &mut [u8] {
    let off = (4096 - (buf.as_ptr() as usize % 4096)) % 4096;
    &mut buf[off..off + len]
}

impl Writer {
    fn start(path: &Path, seed: u64) -> Writer {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .expect("open writer file");
        file.set_len((SLOT * SLOTS) as u64).expect("size writer file");
        let stop = Arc::new(AtomicBool::new(false));
        let ops = Arc::new(Mutex::new(Vec::new()));
        let error = Arc::new(Mutex::new(None));
        let (s, o, e) = (stop.clone(), ops.clone(), error.clone());
        let handle = std::thread::spawn(move || {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let mut crcs = vec![crc32fast::hash(&vec![0u8; SLOT]); SLOTS];
            let mut raw = aligned(SLOT);
            let mut n = 0usize;
            while !s.load(Ordering::Relaxed) {
                let slot = n % SLOTS;
                let buf = aligned_slice(&mut raw, SLOT);
                rng.fill_bytes(buf);
                let start = Instant::now();
                let res = file.write_all_at(buf, (slot * SLOT) as u64).and_then(|()| file.sync_data());
                let end = Instant::now();
                match res {
                    Ok(()) => crcs[slot] = crc32fast::hash(buf),
                    Err(err) => {
                        *e.lock().unwrap() = Some(format!("write #{n} (slot {slot}) failed: {err}"));
                        break;
                    }
                }
                o.lock().unwrap().push(Op { start, end });
                n += 1;
            }
            crcs
        });
        Writer { stop, ops, error, handle: Some(handle), path: path.to_path_buf() }
    }

    fn count(&self) -> usize {
        self.ops.lock().unwrap().len()
    }

    fn ops_started_after(&self, t: Instant) -> usize {
        self.ops.lock().unwrap().iter().filter(|o| o.start > t).count()
    }

    fn error(&self) -> Option<String> {
        self.error.lock().unwrap().clone()
    }

    /// Waits for `n` more completed writes (the writer is making progress).
    async fn progress(&self, n: usize, cluster: &Cluster) {
        let target = self.count() + n;
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.count() < target {
            if let Some(e) = self.error() {
                panic!("writer failed: {e}\n{}", cluster.logs_tail(30));
            }
            assert!(Instant::now() < deadline, "writer made no progress for 60 s\n{}", cluster.logs_tail(30));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The longest stall any write saw after `t0` (among writes ending
    /// within `window` of it).
    fn pause_after(&self, t0: Instant, window: Duration) -> Duration {
        self.ops
            .lock()
            .unwrap()
            .iter()
            .filter(|o| o.end > t0 && o.end < t0 + window)
            .map(|o| o.end - o.start.max(t0))
            .max()
            .unwrap_or_default()
    }

    /// Stops the writer and checks every slot reads back as last written.
    fn finish_and_verify(mut self) -> usize {
        self.stop.store(true, Ordering::Relaxed);
        let crcs = self.handle.take().expect("writer").join().expect("writer thread");
        if let Some(e) = self.error() {
            panic!("writer failed: {e}");
        }
        verify_slots(&self.path, &crcs);
        self.count()
    }
}

fn verify_slots(path: &Path, crcs: &[u32]) {
    let file = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(path).expect("open for verify");
    let mut raw = aligned(SLOT);
    for (slot, crc) in crcs.iter().enumerate() {
        let buf = aligned_slice(&mut raw, SLOT);
        file.read_exact_at(buf, (slot * SLOT) as u64).expect("read back");
        assert_eq!(crc32fast::hash(buf), *crc, "slot {slot} of {} differs from what was acknowledged", path.display());
    }
}

fn summary(pauses: &[Duration]) -> String {
    let mut ms: Vec<u128> = pauses.iter().map(|d| d.as_millis()).collect();
    ms.sort_unstable();
    let median = ms[ms.len() / 2];
    format!("n={} min={}ms median={}ms max={}ms all(ms)={:?}", ms.len(), ms[0], median, ms[ms.len() - 1], ms)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn filesystem_writer_survives_repeated_leader_kills() {
    let _serial = serial();
    tools::require("mkfs.ext4", "e2fsprogs");
    let mut cluster = Cluster::start(four_nodes()).await;
    let cleanup = Cleanup::new(&cluster);
    let name = "failover";
    let host = volume_off_node(&cluster, name, 512 << 20).await;
    let a = cluster.attach(host, name, RWO, false).await.expect("attach");
    run("mkfs.ext4", &["-q", "-F", &a.device]);
    let mnt = cluster.path().join("mnt");
    cleanup.mount(&a.device, &mnt, &[]);
    let writer = Writer::start(&mnt.join("data.bin"), 42);
    writer.progress(20, &cluster).await;

    const KILLS: usize = 10;
    let mut pauses = Vec::new();
    let mut daemon_pauses = Vec::new();
    for k in 0..KILLS {
        let leader = settled_leader(&cluster, name).await;
        assert_ne!(leader, host, "the attaching node holds no replica");
        writer.progress(10, &cluster).await;
        let before = cluster.attachments(host).await[0].reconnects;
        let t0 = Instant::now();
        cluster.kill(leader);
        // I/O resumed once writes started after the kill complete.
        let deadline = t0 + Duration::from_secs(60);
        while writer.ops_started_after(t0) < 5 {
            if let Some(e) = writer.error() {
                panic!("kill {k}: writer failed: {e}\n{}", cluster.logs_tail(40));
            }
            assert!(Instant::now() < deadline, "kill {k}: I/O did not resume within 60 s\n{}", cluster.logs_tail(40));
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let pause = writer.pause_after(t0, Duration::from_secs(60));
        let att = cluster.attachments(host).await.remove(0);
        eprintln!(
            "kill {k}: node {leader} (volume leader) killed; writer paused {} ms; volumed: {} reconnects, last pause {} ms, {} moves to a new leader",
            pause.as_millis(),
            att.reconnects,
            att.last_pause_ms,
            att.migrations
        );
        if att.reconnects > before {
            daemon_pauses.push(Duration::from_millis(att.last_pause_ms));
        }
        pauses.push(pause);
        cluster.restart(leader);
        wait_healthy(&cluster, name).await;
    }
    writer.progress(10, &cluster).await;
    let att = cluster.attachments(host).await.remove(0);
    assert!(att.healthy && att.io_errors == 0, "{att:#?}");
    let writes = writer.finish_and_verify();
    eprintln!("FAILOVER PAUSES (writer on ext4, {KILLS} leader kills, {writes} fsynced writes): {}", summary(&pauses));
    if !daemon_pauses.is_empty() {
        eprintln!("FAILOVER PAUSES (volumed NBD client reconnects): {}", summary(&daemon_pauses));
    }
    cleanup.umount(&mnt);
    run("e2fsck", &["-fn", &a.device]);
    assert!(cluster.detach(host, name).await.expect("detach"));
    assert_no_devices_left(&cluster, host);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fio_verify_passes_through_a_leader_kill() {
    let _serial = serial();
    tools::require("fio", "fio");
    let mut cluster = Cluster::start(four_nodes()).await;
    let cleanup = Cleanup::new(&cluster);
    let name = "fio";
    let host = volume_off_node(&cluster, name, 512 << 20).await;
    let a = cluster.attach(host, name, RWO, false).await.expect("attach");
    run("mkfs.ext4", &["-q", "-F", &a.device]);
    let mnt = cluster.path().join("mnt");
    cleanup.mount(&a.device, &mnt, &[]);
    let file = mnt.join("fio.dat");
    let mut cmd = Command::new("fio");
    clean_env(&mut cmd).args([
        "--name=verify",
        &format!("--filename={}", file.display()),
        "--size=96M",
        "--rw=randwrite",
        "--bs=4k",
        "--ioengine=libaio",
        "--iodepth=16",
        "--direct=1",
        "--verify=crc32c",
        "--verify_fatal=1",
        "--verify_backlog=512",
        "--do_verify=1",
        "--fsync=64",
        "--end_fsync=1",
        "--output-format=terse",
    ]);
    // fio saves its verify state (`local-verify-0-verify.state`) in its
    // working directory: the cluster's temporary one, not the source tree.
    cmd.current_dir(cluster.path());
    let fio = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn fio");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let leader = cluster.leader_index(name).await;
    assert_ne!(leader, host);
    cluster.kill(leader);
    eprintln!("killed the volume leader (node {leader}) under fio");
    let out = tokio::task::spawn_blocking(move || fio.wait_with_output()).await.unwrap().expect("fio");
    assert!(
        out.status.success(),
        "fio failed ({}): {}\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        cluster.logs_tail(30)
    );
    let att = cluster.attachments(host).await.remove(0);
    eprintln!("fio finished cleanly; volumed: {} reconnects, last pause {} ms", att.reconnects, att.last_pause_ms);
    assert!(att.reconnects >= 1, "the kill must have cost a reconnect: {att:#?}");
    assert_eq!(att.io_errors, 0);
    cluster.restart(leader);
    cleanup.umount(&mnt);
    run("e2fsck", &["-fn", &a.device]);
    assert!(cluster.detach(host, name).await.expect("detach"));
    assert_no_devices_left(&cluster, host);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fsynced_data_survives_killing_every_replica() {
    let _serial = serial();
    let mut cluster = Cluster::start(four_nodes()).await;
    let cleanup = Cleanup::new(&cluster);
    let name = "durable";
    let host = volume_off_node(&cluster, name, 256 << 20).await;
    let a = cluster.attach(host, name, RWO, false).await.expect("attach");
    run("mkfs.ext4", &["-q", "-F", &a.device]);
    let mnt = cluster.path().join("mnt");
    cleanup.mount(&a.device, &mnt, &[]);
    run("sync", &[]);
    let mut data = vec![0u8; 6 << 20];
    rand::rngs::StdRng::seed_from_u64(5).fill_bytes(&mut data);
    let path = mnt.join("fsynced.bin");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&path).expect("create");
        f.write_all(&data).expect("write");
        // fsync -> FLUSH through loop and FUSE -> majority-durable.
        f.sync_all().expect("fsync");
        std::fs::File::open(&mnt).expect("dir").sync_all().expect("fsync dir");
    }
    // Every replica dies at once, right after fsync returned.
    let replicas: Vec<usize> = (0..4).filter(|i| *i != host).collect();
    for &i in &replicas {
        cluster.kill(i);
    }
    for &i in &replicas {
        cluster.restart(i);
    }
    wait_healthy(&cluster, name).await;
    // Clean pages are dropped: the reads below come from the volume.
    node_local::drop_caches();
    let back = std::fs::read(&path).expect("read back");
    assert!(back == data, "fsynced data lost or changed after every replica was killed");
    let att = cluster.wait_attachment(host, name, Duration::from_secs(30), "healthy again", |a| a.healthy).await;
    eprintln!(
        "device reconnected after a full replica restart: {} reconnects, last pause {} ms",
        att.reconnects, att.last_pause_ms
    );
    cleanup.umount(&mnt);
    run("e2fsck", &["-fn", &a.device]);
    assert!(cluster.detach(host, name).await.expect("detach"));
    assert_no_devices_left(&cluster, host);
}

// ---------------------------------------------------------------- attach caller

const CALLER_SOCKET: &str = "VOLUMED_TEST_CALLER_SOCKET";
const CALLER_VOLUME: &str = "VOLUMED_TEST_CALLER_VOLUME";
const CALLER_OUT: &str = "VOLUMED_TEST_CALLER_OUT";

/// Stand-in for the CSI node plugin: this test binary run as a child
/// process that attaches a volume, writes the device to a file and stays
/// alive (holding its connection to volumed) until killed.
#[tokio::test]
#[ignore = "run as a child process by attach_caller_restart_does_not_interrupt_io"]
async fn attach_caller_child() {
    let (Ok(sock), Ok(volume), Ok(out)) =
        (std::env::var(CALLER_SOCKET), std::env::var(CALLER_VOLUME), std::env::var(CALLER_OUT))
    else {
        return;
    };
    let mut c = node_local::connect(Path::new(&sock)).await.expect("connect");
    let r = c
        .attach(pb::AttachRequest { volume, mode: RWO as i32, ..Default::default() })
        .await
        .expect("attach")
        .into_inner();
    let tmp = format!("{out}.tmp");
    std::fs::write(&tmp, format!("DEVICE {} {}", r.device, r.generation)).expect("write result");
    std::fs::rename(&tmp, &out).expect("publish result");
    // Like a plugin, keep talking to volumed; stop when it is gone.
    while c.list_attachments(pb::ListAttachmentsRequest {}).await.is_ok() {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A caller process, killed when dropped (also when the test fails).
struct Caller(Child);

impl Drop for Caller {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the caller and returns it with the line it reported.
fn spawn_caller(sock: &Path, volume: &str, out: &Path) -> (Caller, String) {
    let _ = std::fs::remove_file(out);
    let exe = std::env::current_exe().expect("test binary");
    let mut cmd = Command::new(exe);
    clean_env(&mut cmd)
        .args(["--exact", "attach_caller_child", "--include-ignored", "--test-threads=1"])
        .env(CALLER_SOCKET, sock)
        .env(CALLER_VOLUME, volume)
        .env(CALLER_OUT, out)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut caller = Caller(cmd.spawn().expect("spawn caller"));
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(line) = std::fs::read_to_string(out) {
            return (caller, line);
        }
        if let Ok(Some(st)) = caller.0.try_wait() {
            panic!("caller ended ({st}) without attaching");
        }
        assert!(Instant::now() < deadline, "caller did not attach within 60 s");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn attach_caller_restart_does_not_interrupt_io() {
    let _serial = serial();
    let cluster = Cluster::start(ClusterOptions::default()).await;
    let cleanup = Cleanup::new(&cluster);
    let name = "caller";
    cluster.create_volume(name, 256 << 20, 3).await;
    let sock = cluster.local_socket(0);
    let out = cluster.path().join("caller.out");
    let (mut first, line) = spawn_caller(&sock, name, &out);
    let device = line.split(' ').nth(1).expect("device").to_string();
    run("mkfs.ext4", &["-q", "-F", &device]);
    let mnt = cluster.path().join("mnt");
    cleanup.mount(&device, &mnt, &[]);
    let writer = Writer::start(&mnt.join("data.bin"), 7);
    writer.progress(20, &cluster).await;

    // The caller dies (SIGKILL, like a crashed plugin container) ...
    let t0 = Instant::now();
    first.0.kill().expect("kill caller");
    first.0.wait().expect("reap caller");
    writer.progress(20, &cluster).await;
    // ... and its replacement attaches again: same device, same generation.
    let (mut second, line2) = spawn_caller(&sock, name, &out);
    assert_eq!(line2, line, "a restarted caller must get the same device back");
    writer.progress(20, &cluster).await;
    second.0.kill().expect("kill caller");
    second.0.wait().expect("reap caller");
    writer.progress(20, &cluster).await;
    let stall = writer.pause_after(t0, Duration::from_secs(600));
    let att = cluster.attachments(0).await.remove(0);
    assert_eq!(att.reconnects, 0, "the data path never noticed: {att:#?}");
    assert!(att.healthy, "{att:#?}");
    let writes = writer.finish_and_verify();
    eprintln!("attach caller killed twice during {writes} fsynced writes; longest write {} ms", stall.as_millis());
    cleanup.umount(&mnt);
    assert!(cluster.detach(0, name).await.expect("detach"));
    assert_no_devices_left(&cluster, 0);
}
