//! The "done when": a local cluster, a volume, and nbdcopy of a real
//! file into the export and back gives identical bytes.

use volumed_tests::cluster::{Cluster, ClusterOptions};
use volumed_tests::tools::{self, files_equal, random_file};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nbdcopy_roundtrip_through_a_three_replica_volume() {
    tools::require("nbdcopy", "libnbd-bin");
    let cluster = Cluster::start(ClusterOptions::default()).await;
    let vol = cluster.create_volume("smoke", 64 << 20, 3).await;
    assert_eq!(vol.size_bytes, 64 << 20);
    assert!(vol.nbd_uri.starts_with("nbd://"), "{}", vol.nbd_uri);

    let src = cluster.path().join("in.img");
    let back = cluster.path().join("out.img");
    random_file(&src, 48 << 20, 7);
    tools::run("nbdcopy", &[src.to_str().unwrap(), &vol.nbd_uri]);
    tools::run("nbdcopy", &[&vol.nbd_uri, back.to_str().unwrap()]);
    let back_data = std::fs::read(&back).unwrap();
    assert_eq!(back_data.len(), 64 << 20);
    assert_eq!(&back_data[..48 << 20], &std::fs::read(&src).unwrap()[..], "data differs");
    assert!(back_data[48 << 20..].iter().all(|b| *b == 0), "unwritten tail must read as zeros");
    let _ = files_equal;

    let v = cluster.get_volume("smoke").await;
    assert_eq!(v.replicas.len(), 3, "{v:#?}");
}
