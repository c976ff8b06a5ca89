//! Fencing between nodes (issue 3): two volumed instances of one cluster
//! act as nodes A and B. A forced move of an RWO attachment to B fences A:
//! A's writes fail with EIO even after its "network" (a SIGSTOP freeze)
//! comes back, and B's data stays as B wrote it. Several writer nodes are
//! allowed only with a multi-writer access mode.

use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::time::Duration;

use tonic::Code;
use volumed_proto::volumed::v1 as pb;
use volumed_tests::cluster::{serial, Cluster, ClusterOptions};
use volumed_tests::node_local::{assert_no_devices_left, Cleanup};

const RWO: pb::AccessMode = pb::AccessMode::SingleNodeWriter;
const RWX: pb::AccessMode = pb::AccessMode::MultiNodeMultiWriter;
const BS: usize = 4096;

fn buf() -> Vec<u8> {
    vec![0u8; 2 * BS]
}

fn aligned(b: &mut [u8]) -> &mut [u8] {
    let off = (BS - (b.as_ptr() as usize % BS)) % BS;
    &mut b[off..off + BS]
}

/// Writes block `n` of `dev` (O_DIRECT) filled with `byte`, synced.
fn write_block(dev: &str, n: u64, byte: u8) -> std::io::Result<()> {
    let f = std::fs::OpenOptions::new().write(true).custom_flags(libc::O_DIRECT).open(dev)?;
    let mut raw = buf();
    let b = aligned(&mut raw);
    b.fill(byte);
    f.write_all_at(b, n * BS as u64)?;
    f.sync_data()
}

fn read_block(dev: &str, n: u64) -> Vec<u8> {
    let f = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(dev).expect("open");
    let mut raw = buf();
    let b = aligned(&mut raw);
    f.read_exact_at(b, n * BS as u64).expect("read block");
    b.to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn forced_move_fences_the_old_node_even_after_it_comes_back() {
    let _serial = serial();
    let mut cluster = Cluster::start(ClusterOptions::default()).await;
    let _cleanup = Cleanup::new(&cluster);
    let (node_a, node_b) = (0, 1);
    cluster.create_volume("fence", 64 << 20, 3).await;
    let a = cluster.attach(node_a, "fence", RWO, false).await.expect("attach on A");
    write_block(&a.device, 0, b'A').expect("A writes while it holds the volume");
    write_block(&a.device, 7, b'A').expect("A writes while it holds the volume");

    // Without force, a second RWO node is refused with a clear error.
    let e = cluster.attach(node_b, "fence", RWO, false).await.expect_err("second RWO node");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("allows one node only") && e.message().contains("force"), "{}", e.message());
    assert!(cluster.attachments(node_b).await.is_empty(), "a refused attach leaves nothing on B");

    // A drops off the network (frozen); Kubernetes moves the volume to B.
    cluster.pause(node_a);
    let b = cluster.attach(node_b, "fence", RWO, true).await.expect("forced attach on B");
    assert!(b.generation > a.generation, "a forced move bumps the generation: {} -> {}", a.generation, b.generation);
    assert_eq!(read_block(&b.device, 0), vec![b'A'; BS], "B sees what A had written");
    for n in [0u64, 1, 7] {
        write_block(&b.device, n, b'B').expect("B writes");
    }

    // A comes back and tries to write: every write fails with EIO.
    cluster.resume(node_a);
    for n in [0u64, 2, 7] {
        let err = write_block(&a.device, n, b'Z').expect_err("a fenced node must not write");
        assert_eq!(err.raw_os_error(), Some(libc::EIO), "block {n}: {err}");
    }
    let fenced =
        cluster.wait_attachment(node_a, "fence", Duration::from_secs(20), "fenced", |x| x.state == "fenced").await;
    assert!(!fenced.healthy && fenced.reason.contains("generation"), "{fenced:#?}");
    let mut c = cluster.local(node_a).await;
    let h = c.device_health(pb::DeviceHealthRequest { volume: "fence".into() }).await.expect("health").into_inner();
    assert!(h.attached && !h.healthy && h.reason.starts_with("fenced"), "{h:?}");

    // B's data is exactly what B wrote.
    for n in [0u64, 1, 7] {
        assert_eq!(read_block(&b.device, n), vec![b'B'; BS], "block {n} on B");
    }
    assert_eq!(read_block(&b.device, 2), vec![0u8; BS], "A's refused write must not land");

    // volctl volume get: where each attachment is and its state.
    let (id_a, id_b) = (cluster.node_id(node_a).await, cluster.node_id(node_b).await);
    let v = cluster
        .wait_volume("fence", Duration::from_secs(20), "both attachments reported", |v| {
            v.attachments.iter().any(|x| x.node_id == id_b && x.state == "attached" && x.device == b.device)
                && v.attachments.iter().any(|x| x.node_id == id_a && x.state.starts_with("fenced"))
        })
        .await;
    eprintln!("attachments after the forced move: {:#?}", v.attachments);

    // A cleans up without touching B's attachment.
    assert!(cluster.detach(node_a, "fence").await.expect("detach on A"));
    assert_no_devices_left(&cluster, node_a);
    write_block(&b.device, 3, b'B').expect("B still writes after A detached");
    assert_eq!(read_block(&b.device, 3), vec![b'B'; BS]);
    let still = cluster.get_volume("fence").await;
    assert!(still.attachments.iter().any(|x| x.node_id == id_b), "{:?}", still.attachments);
    assert!(cluster.detach(node_b, "fence").await.expect("detach on B"));
    assert_no_devices_left(&cluster, node_b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn several_writer_nodes_only_with_a_multi_writer_mode() {
    let _serial = serial();
    let cluster = Cluster::start(ClusterOptions::default()).await;
    let _cleanup = Cleanup::new(&cluster);
    cluster.create_volume("shared", 64 << 20, 3).await;
    let a = cluster.attach(0, "shared", RWX, false).await.expect("multi-writer attach on A");
    let b = cluster.attach(1, "shared", RWX, false).await.expect("multi-writer attach on B");
    write_block(&a.device, 1, b'a').expect("A writes");
    write_block(&b.device, 2, b'b').expect("B writes");
    assert_eq!(read_block(&b.device, 1), vec![b'a'; BS], "B reads A's block");
    assert_eq!(read_block(&a.device, 2), vec![b'b'; BS], "A reads B's block");
    // An exclusive writer cannot join writers of a shared mode.
    let e = cluster.attach(2, "shared", RWO, false).await.expect_err("RWO next to multi-writers");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    for i in [0, 1] {
        let l = cluster.attachments(i).await;
        assert!(l[0].healthy && l[0].state == "attached", "{l:?}");
    }
    assert!(cluster.detach(0, "shared").await.expect("detach A"));
    assert!(cluster.detach(1, "shared").await.expect("detach B"));
    assert_no_devices_left(&cluster, 0);
    assert_no_devices_left(&cluster, 1);
    cluster.wait_volume("shared", Duration::from_secs(10), "no attachments", |v| v.attachments.is_empty()).await;
}
