//! Bad input at the engine's edges: the Admin API answers malformed or
//! impossible requests with the documented status code and a message that
//! says why; the NBD server survives garbage, unknown exports and requests
//! past the end of a device, and keeps serving everyone else.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use bytes::Bytes;
use tonic::Code;
use volumed_nbd::client::ClientOptions;
use volumed_nbd::{BlockDevice, BlockError};
use volumed_proto::volumed::v1 as pb;
use volumed_tests::cluster::{serial, Cluster, ClusterOptions};
use volumed_tests::tools;

fn create(name: &str, size: u64, replicas: u32) -> pb::CreateVolumeRequest {
    pb::CreateVolumeRequest { name: name.into(), size_bytes: size, replica_count: replicas, ..Default::default() }
}

#[track_caller]
fn expect_code<T: std::fmt::Debug>(r: Result<tonic::Response<T>, tonic::Status>, code: Code, words: &[&str]) -> String {
    let status = match r {
        Ok(v) => panic!("expected {code:?}, got {:?}", v.into_inner()),
        Err(s) => s,
    };
    assert_eq!(status.code(), code, "{status:?}");
    for w in words {
        assert!(status.message().contains(w), "message {:?} should mention {w:?}", status.message());
    }
    status.message().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn admin_api_rejects_bad_volume_requests_with_the_right_codes() {
    let _serial = serial();
    let cluster = Cluster::start(ClusterOptions { capacity: Some("10Gi".into()), ..Default::default() }).await;
    // Ask a node that does not lead the catalog too: it proxies.
    let catalog = cluster.catalog_leader_index().await;
    let other = (0..3).find(|i| *i != catalog).unwrap();
    for node in [catalog, other] {
        let mut a = cluster.admin_of(node).await.expect("admin client");
        let tag = format!("n{node}");

        let m = expect_code(
            a.create_volume(create(&format!("{tag}-huge"), 11 << 30, 1)).await,
            Code::ResourceExhausted,
            &["free space"],
        );
        println!("too large: {m}");
        let m = expect_code(
            a.create_volume(create(&format!("{tag}-r4"), 1 << 20, 4)).await,
            Code::ResourceExhausted,
            &["4 replicas", "3"],
        );
        println!("R=4 on 3 nodes: {m}");
        expect_code(
            a.create_volume(create(&format!("{tag}-r6"), 1 << 20, 6)).await,
            Code::InvalidArgument,
            &["replica_count"],
        );
        expect_code(a.create_volume(create(&format!("{tag}-zero"), 0, 1)).await, Code::InvalidArgument, &["size"]);
        expect_code(a.create_volume(create("", 1 << 20, 1)).await, Code::InvalidArgument, &["name"]);
        expect_code(a.create_volume(create("   ", 1 << 20, 1)).await, Code::InvalidArgument, &["name"]);
        expect_code(a.create_volume(create("a/b", 1 << 20, 1)).await, Code::InvalidArgument, &["name"]);

        // R=0 means the default, 3.
        let v = a.create_volume(create(&format!("{tag}-default"), 8 << 20, 0)).await.expect("create").into_inner();
        assert_eq!(v.replica_count, 3);
        assert_eq!(v.replicas.len(), 3, "{v:#?}");

        // Same name: same size gives the same volume, another size is refused.
        let again = a
            .create_volume(create(&format!("{tag}-default"), 8 << 20, 0))
            .await
            .expect("idempotent create")
            .into_inner();
        assert_eq!(again.id, v.id);
        let m = expect_code(
            a.create_volume(create(&format!("{tag}-default"), 16 << 20, 0)).await,
            Code::AlreadyExists,
            &["already exists"],
        );
        println!("same name, other size: {m}");

        // Two 6 GiB volumes do not fit in 10 GiB nodes: the second is refused.
        a.create_volume(create(&format!("{tag}-big"), 6 << 30, 3)).await.expect("6 GiB fits");
        expect_code(
            a.create_volume(create(&format!("{tag}-big2"), 6 << 30, 3)).await,
            Code::ResourceExhausted,
            &["free space"],
        );
        a.delete_volume(pb::DeleteVolumeRequest { id_or_name: format!("{tag}-big") }).await.expect("delete");

        let m = expect_code(
            a.resize_volume(pb::ResizeVolumeRequest { id_or_name: v.id.clone(), size_bytes: 4 << 20 }).await,
            Code::InvalidArgument,
            &["shrink"],
        );
        println!("shrink: {m}");
        let grown = a
            .resize_volume(pb::ResizeVolumeRequest { id_or_name: v.id.clone(), size_bytes: 12 << 20 })
            .await
            .expect("grow");
        assert_eq!(grown.into_inner().size_bytes, 12 << 20);

        expect_code(
            a.get_volume(pb::GetVolumeRequest { id_or_name: "no-such-volume".into() }).await,
            Code::NotFound,
            &["no-such-volume"],
        );
        expect_code(
            a.get_volume(pb::GetVolumeRequest { id_or_name: uuid::Uuid::new_v4().to_string() }).await,
            Code::NotFound,
            &["not found"],
        );
        let d = a
            .delete_volume(pb::DeleteVolumeRequest { id_or_name: "no-such-volume".into() })
            .await
            .expect("delete unknown");
        assert!(!d.into_inner().existed);
        expect_code(a.remove_node(pb::RemoveNodeRequest { node_id: 12345 }).await, Code::NotFound, &["12345"]);
        expect_code(a.scrub_volume(pb::ScrubVolumeRequest { id_or_name: "nope".into() }).await, Code::NotFound, &[]);

        let d = a.delete_volume(pb::DeleteVolumeRequest { id_or_name: v.id.clone() }).await.expect("delete");
        assert!(d.into_inner().existed);
        let d = a.delete_volume(pb::DeleteVolumeRequest { id_or_name: v.id.clone() }).await.expect("delete again");
        assert!(!d.into_inner().existed);
    }
    // Nothing of the refused requests was created.
    let listed = cluster.admin().await.list_volumes(pb::ListVolumesRequest::default()).await.unwrap().into_inner();
    assert!(listed.volumes.is_empty(), "{:?}", listed.volumes.iter().map(|v| &v.name).collect::<Vec<_>>());
}

fn export_size(uri: &str) -> u64 {
    let out = tools::run("nbdinfo", &["--json", uri]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("nbdinfo JSON");
    v["exports"][0]["export-size"].as_u64().expect("export-size")
}

/// Sends `bytes` on a fresh connection and returns what the server said
/// before it closed the connection (it must close it).
fn garbage(addr: &str, bytes: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let _ = s.write_all(bytes);
    let mut got = Vec::new();
    match s.read_to_end(&mut got) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("the server did not close a connection that sent garbage ({e}); got {} bytes", got.len()),
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nbd_server_survives_garbage_unknown_exports_and_reads_past_the_end() {
    tools::require("nbdinfo", "libnbd-bin");
    let _serial = serial();
    let cluster = Cluster::start(ClusterOptions::default()).await;
    let v = cluster.create_volume("edge", 8 << 20, 3).await;
    let node = cluster.leader_index(&v.id).await;
    let addr = cluster.node(node).nbd.clone();

    // Garbage instead of a handshake, a bad option header, and a client
    // that connects and leaves without a word.
    let greeting = garbage(&addr, &[0xde; 1024]);
    assert!(greeting.starts_with(b"NBDMAGIC"), "the server greets first: {:?}", &greeting[..greeting.len().min(16)]);
    let mut bad_opt = Vec::new();
    bad_opt.extend_from_slice(&1u32.to_be_bytes()); // client flags: fixed newstyle
    bad_opt.extend_from_slice(b"IHAVEOPX"); // wrong option magic
    bad_opt.extend_from_slice(&[0; 8]);
    garbage(&addr, &bad_opt);
    let mut huge_opt = Vec::new();
    huge_opt.extend_from_slice(&1u32.to_be_bytes());
    huge_opt.extend_from_slice(b"IHAVEOPT");
    huge_opt.extend_from_slice(&7u32.to_be_bytes()); // NBD_OPT_GO
    huge_opt.extend_from_slice(&u32::MAX.to_be_bytes()); // absurd length
    garbage(&addr, &huge_opt);
    drop(TcpStream::connect(&addr).expect("connect"));

    // Unknown exports fail cleanly, with the reason.
    for name in ["no-such-volume", "edge@notanumber", &format!("{}@7%23fwd", uuid::Uuid::new_v4())] {
        let out = tools::try_run("nbdinfo", &[&format!("nbd://{addr}/{name}")]);
        let err = String::from_utf8_lossy(&out.stderr);
        println!("nbdinfo {name}: {}", err.trim());
        assert!(!out.status.success(), "nbdinfo of {name} must fail");
        assert!(!err.trim().is_empty(), "nbdinfo of {name} says why");
    }
    // The export name can be the volume's name, too.
    assert_eq!(export_size(&format!("nbd://{addr}/edge")), 8 << 20);

    // Requests past the end fail; the connection and the node keep working.
    let client = cluster.nbd_client(&v.id, &[node], ClientOptions::default()).await;
    client.write(0, Bytes::from(vec![7u8; 4096]), false).await.expect("write");
    let size = 8u64 << 20;
    assert_eq!(client.read(size - 4096, 8192).await, Err(BlockError::OutOfRange));
    assert_eq!(client.read(size, 4096).await, Err(BlockError::OutOfRange));
    assert_eq!(client.write(size - 512, Bytes::from(vec![1u8; 4096]), false).await, Err(BlockError::OutOfRange));
    assert_eq!(client.trim(size, 4096, false).await, Err(BlockError::OutOfRange));
    assert_eq!(client.read(u64::MAX - 4095, 4096).await, Err(BlockError::OutOfRange));
    assert_eq!(&client.read(0, 4096).await.expect("read after errors")[..], &[7u8; 4096][..]);
    assert_eq!(&client.read(size - 4096, 4096).await.expect("last block")[..], &[0u8; 4096][..]);
    client.close().await;

    assert_eq!(export_size(&cluster.node(node).nbd_uri(&v.id)), 8 << 20);
    assert!(cluster.running().contains(&node), "the node survived");
    assert_eq!(cluster.log_count(node, &["panicked"]), 0, "{}", cluster.logs_tail(20));
}
