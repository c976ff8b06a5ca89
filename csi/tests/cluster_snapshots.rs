//! Snapshots, restores, clones and group snapshots through the real
//! csi-controller and csi-node plugins of a running volumed cluster, the
//! way external-snapshotter, external-provisioner and kubelet drive them.
//! Data is checked byte for byte through the node plugin (raw block
//! devices and an ext4 filesystem published on other nodes).
//!
//! One dev cluster for the whole file (`volctl dev up`; see `common`):
//! `cargo build --workspace --bins && cargo test -p volumed-csi --test
//! cluster_snapshots` as root. With `VOLUMED_CLUSTER_STATE=<state-dir>` the
//! test uses that running cluster instead.

mod common;

use std::collections::HashSet;
use std::io::{Read, Seek, SeekFrom, Write};
use std::time::Duration;

use common::*;
use tonic::{Code, Status};
use volumed_csi::proto::volume_content_source::{SnapshotSource, Type, VolumeSource};
use volumed_csi::proto::{self as csi};

const SIZE: i64 = 64 * MIB;
/// Where the test writes on raw block volumes: the first, a middle and the
/// last MiB.
const OFFSETS: [u64; 3] = [0, 20 << 20, (63 << 20) as u64];
const CHUNK: usize = 1 << 20;

/// Deterministic bytes for `tag` at `offset` (xorshift), so each pattern is
/// distinct everywhere.
fn pattern(tag: u64, offset: u64) -> Vec<u8> {
    let mut x = tag.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ offset ^ 0xD1B5_4A32_D192_ED03;
    let mut out = Vec::with_capacity(CHUNK);
    while out.len() < CHUNK {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out
}

fn write_pattern(path: &std::path::Path, tag: u64) {
    let mut f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    for off in OFFSETS {
        f.seek(SeekFrom::Start(off)).unwrap();
        f.write_all(&pattern(tag, off)).unwrap();
    }
    f.sync_all().unwrap();
}

/// Whether the device at `path` holds pattern `tag` at every offset.
#[track_caller]
fn assert_pattern(path: &std::path::Path, tag: u64, what: &str) {
    let mut f = std::fs::File::open(path).unwrap();
    for off in OFFSETS {
        let mut back = vec![0u8; CHUNK];
        f.seek(SeekFrom::Start(off)).unwrap();
        f.read_exact(&mut back).unwrap();
        assert!(back == pattern(tag, off), "{what}: bytes at {off} are not pattern {tag}");
    }
}

fn snapshot_source(id: &str) -> csi::VolumeContentSource {
    csi::VolumeContentSource { r#type: Some(Type::Snapshot(SnapshotSource { snapshot_id: id.into() })) }
}

fn volume_source(id: &str) -> csi::VolumeContentSource {
    csi::VolumeContentSource { r#type: Some(Type::Volume(VolumeSource { volume_id: id.into() })) }
}

fn from_req(
    name: &str,
    size: Option<i64>,
    cap: csi::VolumeCapability,
    source: csi::VolumeContentSource,
) -> csi::CreateVolumeRequest {
    csi::CreateVolumeRequest {
        volume_content_source: Some(source),
        ..create_req(name, size.map(|s| (s, 0)), &[("replicas", "3")], vec![cap])
    }
}

async fn create_from(c: &Csi, req: csi::CreateVolumeRequest) -> Result<csi::Volume, Status> {
    let v = c.ctrl.clone().create_volume(req).await?.into_inner().volume.unwrap();
    c.track(&v.volume_id);
    Ok(v)
}

async fn snapshot(c: &Csi, name: &str, volume_id: &str) -> Result<csi::Snapshot, Status> {
    let r = c
        .ctrl
        .clone()
        .create_snapshot(csi::CreateSnapshotRequest {
            source_volume_id: volume_id.into(),
            name: name.into(),
            ..Default::default()
        })
        .await?;
    Ok(r.into_inner().snapshot.unwrap())
}

async fn get_snapshot(c: &Csi, id: &str) -> Result<csi::Snapshot, Status> {
    let r =
        c.ctrl.clone().get_snapshot(csi::GetSnapshotRequest { snapshot_id: id.into(), ..Default::default() }).await?;
    Ok(r.into_inner().snapshot.unwrap())
}

async fn delete_snapshot(c: &Csi, id: &str) -> Result<(), Status> {
    c.ctrl
        .clone()
        .delete_snapshot(csi::DeleteSnapshotRequest { snapshot_id: id.into(), ..Default::default() })
        .await
        .map(drop)
}

async fn list(c: &Csi, req: csi::ListSnapshotsRequest) -> Result<csi::ListSnapshotsResponse, Status> {
    c.ctrl.clone().list_snapshots(req).await.map(|r| r.into_inner())
}

fn listed(r: &csi::ListSnapshotsResponse) -> Vec<String> {
    r.entries.iter().map(|e| e.snapshot.as_ref().unwrap().snapshot_id.clone()).collect()
}

/// ControllerPublish + NodeStage + NodePublish on `node`.
async fn attach(c: &Csi, node: usize, v: &csi::Volume, cap: csi::VolumeCapability, staging: &str, target: &str) {
    let pc = c.controller_publish(&v.volume_id, node, cap.clone(), false).await.unwrap();
    c.stage(node, v, staging, cap.clone(), pc.clone()).await.unwrap();
    c.publish(node, v, staging, target, cap, false, pc).await.unwrap();
}

async fn detach(c: &Csi, node: usize, id: &str, staging: &str, target: &str) {
    c.unpublish(node, id, target).await.unwrap();
    c.unstage(node, id, staging).await.unwrap();
    c.controller_unpublish(id, node).await.unwrap();
}

#[tokio::test]
async fn snapshots_restores_clones_and_groups() {
    let c = Csi::connect(cluster());
    assert!(c.nodes.len() >= 3, "needs three nodes");
    capabilities(&c).await;
    let block = block_cap(Mode::SingleNodeWriter);

    // ---- A: pattern 1, snapshot, pattern 2 over it.
    let a = c.create(&c.name("src"), SIZE, &[("replicas", "3")], vec![block.clone()]).await.unwrap();
    let (a_stage, a_dev) = ("plugins/src/staging", "pods/src/volumeDevices/d");
    attach(&c, 0, &a, block.clone(), a_stage, a_dev).await;
    write_pattern(&c.nodes[0].path(a_dev), 1);
    let s1 = snapshot(&c, &c.name("s1"), &a.volume_id).await.unwrap();
    assert!(s1.ready_to_use, "{s1:?}");
    assert_eq!(s1.size_bytes, SIZE, "size_bytes is the restore size");
    assert_eq!(s1.source_volume_id, a.volume_id);
    assert!(s1.group_snapshot_id.is_empty());
    let t = s1.creation_time.expect("creation_time");
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    assert!((now - 600..=now + 5).contains(&t.seconds), "creation_time {t:?} vs now {now}");
    write_pattern(&c.nodes[0].path(a_dev), 2);
    snapshot_idempotency(&c, &a, &s1).await;

    // ---- Restore s1 into a new volume on node 1: it reads pattern 1.
    let r = create_from(&c, from_req(&c.name("restored"), None, block.clone(), snapshot_source(&s1.snapshot_id)))
        .await
        .unwrap();
    assert_eq!(r.capacity_bytes, SIZE, "no size asked: the snapshot's");
    assert_eq!(r.content_source, Some(snapshot_source(&s1.snapshot_id)), "content_source echoed");
    assert_ne!(r.volume_id, a.volume_id);
    let again =
        create_from(&c, from_req(&c.name("restored"), Some(SIZE), block.clone(), snapshot_source(&s1.snapshot_id)))
            .await
            .unwrap();
    assert_eq!(again.volume_id, r.volume_id, "CreateVolume from a snapshot is idempotent by name");
    let (r_stage, r_dev) = ("plugins/restored/staging", "pods/restored/volumeDevices/d");
    attach(&c, 1, &r, block.clone(), r_stage, r_dev).await;
    assert_pattern(&c.nodes[1].path(r_dev), 1, "restored volume");
    assert_pattern(&c.nodes[0].path(a_dev), 2, "source after the restore");
    // Independent afterwards: a write to the restore does not reach the source.
    write_pattern(&c.nodes[1].path(r_dev), 3);
    assert_pattern(&c.nodes[0].path(a_dev), 2, "source after a write to its restore");

    // ---- Clone A (live, pattern 2) onto node 2, larger than A.
    let cl =
        create_from(&c, from_req(&c.name("clone"), Some(SIZE + 16 * MIB), block.clone(), volume_source(&a.volume_id)))
            .await
            .unwrap();
    assert_eq!(cl.capacity_bytes, SIZE + 16 * MIB);
    assert_eq!(cl.content_source, Some(volume_source(&a.volume_id)));
    let (c_stage, c_dev) = ("plugins/clone/staging", "pods/clone/volumeDevices/d");
    attach(&c, 2, &cl, block.clone(), c_stage, c_dev).await;
    assert_pattern(&c.nodes[2].path(c_dev), 2, "clone");
    write_pattern(&c.nodes[2].path(c_dev), 4);
    assert_pattern(&c.nodes[0].path(a_dev), 2, "source after a write to its clone");

    restore_bad_input(&c, &a, &s1, block.clone()).await;
    interrupted_restore_is_retried(&c, &s1, block.clone()).await;
    listing(&c, &a, &r, &s1).await;
    groups(&c, [&a, &r, &cl], block.clone()).await;
    ext4_restore(&c).await;

    // ---- Deletion: idempotent; a deleted volume's snapshots stay restorable.
    let s2 = snapshot(&c, &c.name("s2"), &a.volume_id).await.unwrap();
    delete_snapshot(&c, &s1.snapshot_id).await.unwrap();
    delete_snapshot(&c, &s1.snapshot_id).await.unwrap();
    delete_snapshot(&c, MISSING_VOLUME).await.unwrap();
    delete_snapshot(&c, "not-an-id").await.unwrap();
    code(delete_snapshot(&c, "").await, Code::InvalidArgument);
    code(get_snapshot(&c, &s1.snapshot_id).await, Code::NotFound);
    let l = list(&c, csi::ListSnapshotsRequest { snapshot_id: s1.snapshot_id.clone(), ..Default::default() })
        .await
        .unwrap();
    assert!(l.entries.is_empty(), "a deleted snapshot is not listed");
    detach(&c, 0, &a.volume_id, a_stage, a_dev).await;
    c.delete(&a.volume_id).await.unwrap();
    let kept = get_snapshot(&c, &s2.snapshot_id).await.unwrap();
    assert_eq!(kept.source_volume_id, a.volume_id, "the snapshot outlives its volume");
    let by_source = list(&c, csi::ListSnapshotsRequest { source_volume_id: a.volume_id.clone(), ..Default::default() })
        .await
        .unwrap();
    assert!(listed(&by_source).contains(&s2.snapshot_id), "listed by its deleted volume's id");
    assert!(by_source.entries.iter().all(|e| e.snapshot.as_ref().unwrap().source_volume_id == a.volume_id));
    let late = create_from(&c, from_req(&c.name("late"), None, block.clone(), snapshot_source(&s2.snapshot_id)))
        .await
        .unwrap();
    let (l_stage, l_dev) = ("plugins/late/staging", "pods/late/volumeDevices/d");
    attach(&c, 0, &late, block.clone(), l_stage, l_dev).await;
    assert_pattern(&c.nodes[0].path(l_dev), 2, "restore of a deleted volume's snapshot");
    detach(&c, 0, &late.volume_id, l_stage, l_dev).await;
    code(
        create_from(&c, from_req(&c.name("clone-gone"), None, block.clone(), volume_source(&a.volume_id))).await,
        Code::NotFound,
    );
    delete_snapshot(&c, &s2.snapshot_id).await.unwrap();

    detach(&c, 1, &r.volume_id, r_stage, r_dev).await;
    detach(&c, 2, &cl.volume_id, c_stage, c_dev).await;
}

async fn capabilities(c: &Csi) {
    use csi::controller_service_capability::rpc::Type as Rpc;
    let caps = c.ctrl.clone().controller_get_capabilities(csi::ControllerGetCapabilitiesRequest {}).await.unwrap();
    let rpcs: HashSet<i32> = caps
        .into_inner()
        .capabilities
        .iter()
        .filter_map(|c| c.r#type.as_ref().map(|csi::controller_service_capability::Type::Rpc(r)| r.r#type))
        .collect();
    for want in [Rpc::CreateDeleteSnapshot, Rpc::ListSnapshots, Rpc::GetSnapshot, Rpc::CloneVolume] {
        assert!(rpcs.contains(&(want as i32)), "{want:?} advertised");
    }
    let plugin = c.identity.clone().get_plugin_capabilities(csi::GetPluginCapabilitiesRequest {}).await.unwrap();
    let group_svc = csi::PluginCapability {
        r#type: Some(csi::plugin_capability::Type::Service(csi::plugin_capability::Service {
            r#type: csi::plugin_capability::service::Type::GroupControllerService as i32,
        })),
    };
    assert!(plugin.into_inner().capabilities.contains(&group_svc), "GROUP_CONTROLLER_SERVICE advertised");
    let g = c.group().group_controller_get_capabilities(csi::GroupControllerGetCapabilitiesRequest {}).await.unwrap();
    let g = g.into_inner().capabilities;
    assert_eq!(g.len(), 1);
    assert_eq!(
        g[0].r#type,
        Some(csi::group_controller_service_capability::Type::Rpc(csi::group_controller_service_capability::Rpc {
            r#type: csi::group_controller_service_capability::rpc::Type::CreateDeleteGetVolumeGroupSnapshot as i32
        }))
    );
}

async fn snapshot_idempotency(c: &Csi, a: &csi::Volume, s1: &csi::Snapshot) {
    let again = snapshot(c, &c.name("s1"), &a.volume_id).await.unwrap();
    assert_eq!(again.snapshot_id, s1.snapshot_id, "CreateSnapshot is idempotent by name");
    assert_eq!(again.creation_time, s1.creation_time, "the same cut, not a new one");
    let other = c.create(&c.name("other"), 16 * MIB, &[], vec![block_cap(Mode::SingleNodeWriter)]).await.unwrap();
    let m = code(snapshot(c, &c.name("s1"), &other.volume_id).await, Code::AlreadyExists);
    assert!(m.contains(&c.name("s1")), "{m}");
    let other_snap = snapshot(c, &c.name("other-snap"), &other.volume_id).await.unwrap();
    assert_eq!(other_snap.source_volume_id, other.volume_id);
    // Bad input, each naming the field.
    let m = code(snapshot(c, "", &a.volume_id).await, Code::InvalidArgument);
    assert!(m.contains("name"), "{m}");
    let m = code(snapshot(c, &c.name("x"), "").await, Code::InvalidArgument);
    assert!(m.contains("source_volume_id"), "{m}");
    code(snapshot(c, &c.name("x"), MISSING_VOLUME).await, Code::NotFound);
    code(snapshot(c, &c.name("x"), "not-a-volume-id").await, Code::NotFound);
    code(snapshot(c, "bad\u{7}name", &a.volume_id).await, Code::InvalidArgument);
    let with_params = c
        .ctrl
        .clone()
        .create_snapshot(csi::CreateSnapshotRequest {
            source_volume_id: a.volume_id.clone(),
            name: c.name("s1"),
            parameters: [("csi.storage.k8s.io/volumesnapshot/name".to_string(), "snap".to_string())].into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(with_params.snapshot.unwrap().snapshot_id, s1.snapshot_id, "CO metadata keys are accepted");
    let e = c
        .ctrl
        .clone()
        .create_snapshot(csi::CreateSnapshotRequest {
            source_volume_id: a.volume_id.clone(),
            name: c.name("x"),
            parameters: [("retention".to_string(), "7d".to_string())].into(),
            ..Default::default()
        })
        .await;
    let m = code(e, Code::InvalidArgument);
    assert!(m.contains("retention"), "{m}");
    for (params, ok) in [(&[("freeze", "maybe")][..], false), (&[("freeze", "false")], true)] {
        let r = c
            .ctrl
            .clone()
            .create_snapshot(csi::CreateSnapshotRequest {
                source_volume_id: other.volume_id.clone(),
                name: c.name("unfrozen"),
                parameters: params.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
                ..Default::default()
            })
            .await;
        if ok {
            assert!(r.unwrap().into_inner().snapshot.unwrap().ready_to_use);
        } else {
            let m = code(r, Code::InvalidArgument);
            assert!(m.contains("freeze"), "{m}");
        }
    }
    code(get_snapshot(c, "").await, Code::InvalidArgument);
    code(get_snapshot(c, MISSING_VOLUME).await, Code::NotFound);
    code(get_snapshot(c, "garbage").await, Code::NotFound);
    let got = get_snapshot(c, &s1.snapshot_id).await.unwrap();
    assert_eq!(got, *s1, "GetSnapshot answers what CreateSnapshot did");
}

async fn restore_bad_input(c: &Csi, a: &csi::Volume, s1: &csi::Snapshot, block: csi::VolumeCapability) {
    let m = code(
        create_from(c, from_req(&c.name("small"), Some(SIZE / 2), block.clone(), snapshot_source(&s1.snapshot_id)))
            .await,
        Code::OutOfRange,
    );
    assert!(m.contains("smaller"), "{m}");
    code(
        create_from(c, from_req(&c.name("small-clone"), Some(16 * MIB), block.clone(), volume_source(&a.volume_id)))
            .await,
        Code::OutOfRange,
    );
    let mut capped = from_req(&c.name("capped"), None, block.clone(), snapshot_source(&s1.snapshot_id));
    capped.capacity_range = Some(csi::CapacityRange { required_bytes: 0, limit_bytes: 32 * MIB });
    code(create_from(c, capped).await, Code::OutOfRange);
    for missing in [MISSING_VOLUME, "no-such-snapshot"] {
        let m = code(
            create_from(c, from_req(&c.name("nosnap"), None, block.clone(), snapshot_source(missing))).await,
            Code::NotFound,
        );
        assert!(m.contains(missing), "{m}");
        code(
            create_from(c, from_req(&c.name("novol"), None, block.clone(), volume_source(missing))).await,
            Code::NotFound,
        );
    }
    let m = code(
        create_from(c, from_req(&c.name("empty"), None, block.clone(), snapshot_source(""))).await,
        Code::InvalidArgument,
    );
    assert!(m.contains("volume_content_source.snapshot.snapshot_id"), "{m}");
    let m = code(
        create_from(c, from_req(&c.name("none"), None, block.clone(), csi::VolumeContentSource { r#type: None })).await,
        Code::InvalidArgument,
    );
    assert!(m.contains("volume_content_source"), "{m}");
    // The name of a restore, asked again with another source or none.
    code(
        create_from(c, from_req(&c.name("restored"), None, block.clone(), volume_source(&a.volume_id))).await,
        Code::AlreadyExists,
    );
    code(c.create(&c.name("restored"), SIZE, &[("replicas", "3")], vec![block.clone()]).await, Code::AlreadyExists);
    // An empty volume's name, asked again with a source.
    code(
        create_from(c, from_req(&c.name("src"), None, block.clone(), snapshot_source(&s1.snapshot_id))).await,
        Code::AlreadyExists,
    );
}

/// A restore asked with a deadline too short for the copy gets an error
/// the external-provisioner retries (never a final one), and the retry gets
/// the same, complete volume.
async fn interrupted_restore_is_retried(c: &Csi, s1: &csi::Snapshot, block: csi::VolumeCapability) {
    let name = c.name("hurried");
    let mut req = tonic::Request::new(from_req(&name, None, block.clone(), snapshot_source(&s1.snapshot_id)));
    req.set_timeout(Duration::from_millis(1500));
    let first = c.ctrl.clone().create_volume(req).await;
    eprintln!(
        "restore with a 1.5 s deadline answered: {:?}",
        first.as_ref().map(|_| "OK").map_err(|s| (s.code(), s.message()))
    );
    let first_id = match first {
        Ok(r) => Some(r.into_inner().volume.unwrap().volume_id),
        Err(s) => {
            assert!(
                matches!(s.code(), Code::Aborted | Code::DeadlineExceeded | Code::Cancelled),
                "a restore in progress must be retried, not failed: {s:?}"
            );
            if s.code() == Code::Aborted {
                assert!(s.message().contains("retry"), "{}", s.message());
            }
            None
        }
    };
    let v = create_from(c, from_req(&name, None, block.clone(), snapshot_source(&s1.snapshot_id))).await.unwrap();
    if let Some(id) = first_id {
        assert_eq!(id, v.volume_id);
    }
    let (stage, dev) = ("plugins/hurried/staging", "pods/hurried/volumeDevices/d");
    attach(c, 0, &v, block, stage, dev).await;
    assert_pattern(&c.nodes[0].path(dev), 1, "restore retried after its deadline");
    detach(c, 0, &v.volume_id, stage, dev).await;
}

async fn listing(c: &Csi, a: &csi::Volume, r: &csi::Volume, s1: &csi::Snapshot) {
    let mut mine = vec![s1.snapshot_id.clone()];
    for i in 0..3 {
        mine.push(snapshot(c, &c.name(&format!("l{i}")), &a.volume_id).await.unwrap().snapshot_id);
    }
    let of_r = snapshot(c, &c.name("of-restored"), &r.volume_id).await.unwrap();
    // Everything, one page at a time: each exactly once.
    let all = listed(&list(c, csi::ListSnapshotsRequest::default()).await.unwrap());
    let mut paged = Vec::new();
    let mut token = String::new();
    loop {
        let page = list(c, csi::ListSnapshotsRequest { max_entries: 2, starting_token: token, ..Default::default() })
            .await
            .unwrap();
        assert!(page.entries.len() <= 2);
        paged.extend(listed(&page));
        if page.next_token.is_empty() {
            break;
        }
        token = page.next_token;
    }
    assert_eq!(paged.len(), all.len(), "{paged:?} vs {all:?}");
    assert_eq!(paged.iter().collect::<HashSet<_>>(), all.iter().collect::<HashSet<_>>());
    assert!(all.contains(&of_r.snapshot_id));
    // By source volume: exactly A's.
    let of_a = list(c, csi::ListSnapshotsRequest { source_volume_id: a.volume_id.clone(), ..Default::default() })
        .await
        .unwrap();
    let mut got = listed(&of_a);
    got.sort();
    mine.sort();
    assert_eq!(got, mine);
    assert!(of_a.entries.iter().all(|e| e.snapshot.as_ref().unwrap().source_volume_id == a.volume_id));
    // By id, and both filters at once.
    let one =
        list(c, csi::ListSnapshotsRequest { snapshot_id: s1.snapshot_id.clone(), ..Default::default() }).await.unwrap();
    assert_eq!(listed(&one), vec![s1.snapshot_id.clone()]);
    let both = list(
        c,
        csi::ListSnapshotsRequest {
            snapshot_id: s1.snapshot_id.clone(),
            source_volume_id: r.volume_id.clone(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert!(both.entries.is_empty(), "s1 is not a snapshot of the restored volume");
    for unknown in [MISSING_VOLUME, "garbage"] {
        let l = list(c, csi::ListSnapshotsRequest { snapshot_id: unknown.into(), ..Default::default() }).await.unwrap();
        assert!(l.entries.is_empty());
        let l = list(c, csi::ListSnapshotsRequest { source_volume_id: unknown.into(), ..Default::default() })
            .await
            .unwrap();
        assert!(l.entries.is_empty());
    }
    code(
        list(c, csi::ListSnapshotsRequest { starting_token: "bogus".into(), ..Default::default() }).await,
        Code::Aborted,
    );
    let m =
        code(list(c, csi::ListSnapshotsRequest { max_entries: -1, ..Default::default() }).await, Code::InvalidArgument);
    assert!(m.contains("max_entries"), "{m}");
    // Deleting the last entry of a page keeps its token valid (csi-sanity
    // does this): the next page goes on after it.
    let first = list(c, csi::ListSnapshotsRequest { max_entries: 1, ..Default::default() }).await.unwrap();
    let gone = listed(&first)[0].clone();
    assert_eq!(gone, all.iter().min().unwrap().clone(), "pages are ordered by id");
    delete_snapshot(c, &gone).await.unwrap();
    let rest =
        list(c, csi::ListSnapshotsRequest { starting_token: first.next_token, ..Default::default() }).await.unwrap();
    let mut expected: Vec<String> = all.iter().filter(|i| **i != gone).cloned().collect();
    expected.sort();
    let mut got = listed(&rest);
    got.sort();
    assert_eq!(got, expected);
}

async fn groups(c: &Csi, vols: [&csi::Volume; 3], block: csi::VolumeCapability) {
    let ids: Vec<String> = vols.iter().map(|v| v.volume_id.clone()).collect();
    let name = c.name("group");
    let create = |name: String, ids: Vec<String>| {
        let mut g = c.group();
        async move {
            g.create_volume_group_snapshot(csi::CreateVolumeGroupSnapshotRequest {
                name,
                source_volume_ids: ids,
                ..Default::default()
            })
            .await
            .map(|r| r.into_inner().group_snapshot.unwrap())
        }
    };
    let g = create(name.clone(), ids.clone()).await.unwrap();
    assert!(g.ready_to_use);
    assert!(g.creation_time.is_some());
    assert_eq!(g.snapshots.len(), 3);
    let mut sources: Vec<String> = g.snapshots.iter().map(|s| s.source_volume_id.clone()).collect();
    sources.sort();
    let mut want = ids.clone();
    want.sort();
    assert_eq!(sources, want);
    assert!(g.snapshots.iter().all(|s| s.group_snapshot_id == g.group_snapshot_id && s.ready_to_use));
    let member_ids: Vec<String> = g.snapshots.iter().map(|s| s.snapshot_id.clone()).collect();

    // Idempotent (in any order of the volumes); another set is ALREADY_EXISTS.
    let mut reversed = ids.clone();
    reversed.reverse();
    let again = create(name.clone(), reversed).await.unwrap();
    assert_eq!(again.group_snapshot_id, g.group_snapshot_id);
    code(create(name.clone(), ids[..2].to_vec()).await, Code::AlreadyExists);
    // Bad input.
    code(create(String::new(), ids.clone()).await, Code::InvalidArgument);
    let m = code(create(c.name("g-empty"), vec![]).await, Code::InvalidArgument);
    assert!(m.contains("source_volume_ids"), "{m}");
    let m = code(create(c.name("g-twice"), vec![ids[0].clone(), ids[0].clone()]).await, Code::InvalidArgument);
    assert!(m.contains("twice"), "{m}");
    let before = listed(&list(c, csi::ListSnapshotsRequest::default()).await.unwrap());
    code(create(c.name("g-missing"), vec![ids[0].clone(), MISSING_VOLUME.into()]).await, Code::NotFound);
    code(create(c.name("g-bad-id"), vec![ids[0].clone(), "garbage".into()]).await, Code::NotFound);
    let after = listed(&list(c, csi::ListSnapshotsRequest::default()).await.unwrap());
    assert_eq!(before, after, "nothing of a failed group snapshot is kept");

    // Get: with the member list; a wrong list is INVALID_ARGUMENT.
    let get = |gid: String, members: Vec<String>| {
        let mut gc = c.group();
        async move {
            gc.get_volume_group_snapshot(csi::GetVolumeGroupSnapshotRequest {
                group_snapshot_id: gid,
                snapshot_ids: members,
                ..Default::default()
            })
            .await
            .map(|r| r.into_inner().group_snapshot.unwrap())
        }
    };
    let got = get(g.group_snapshot_id.clone(), member_ids.clone()).await.unwrap();
    assert_eq!(got, g);
    code(get(g.group_snapshot_id.clone(), member_ids[..2].to_vec()).await, Code::InvalidArgument);
    code(get(MISSING_VOLUME.into(), member_ids.clone()).await, Code::NotFound);
    code(get(String::new(), member_ids.clone()).await, Code::InvalidArgument);

    // A member is listed with its group, cannot be deleted alone, and restores.
    let member = g.snapshots.iter().find(|s| s.source_volume_id == vols[0].volume_id).unwrap();
    assert_eq!(get_snapshot(c, &member.snapshot_id).await.unwrap(), *member);
    let m = code(delete_snapshot(c, &member.snapshot_id).await, Code::InvalidArgument);
    assert!(m.contains(&g.group_snapshot_id), "{m}");
    let from_member =
        create_from(c, from_req(&c.name("from-member"), None, block.clone(), snapshot_source(&member.snapshot_id)))
            .await
            .unwrap();
    let (stage, dev) = ("plugins/member/staging", "pods/member/volumeDevices/d");
    attach(c, 1, &from_member, block.clone(), stage, dev).await;
    assert_pattern(&c.nodes[1].path(dev), 2, "restore of a group member");
    detach(c, 1, &from_member.volume_id, stage, dev).await;

    // Delete: the member list must match; then idempotent.
    let delete = |gid: String, members: Vec<String>| {
        let mut gc = c.group();
        async move {
            gc.delete_volume_group_snapshot(csi::DeleteVolumeGroupSnapshotRequest {
                group_snapshot_id: gid,
                snapshot_ids: members,
                ..Default::default()
            })
            .await
            .map(drop)
        }
    };
    code(delete(g.group_snapshot_id.clone(), vec![member_ids[0].clone()]).await, Code::InvalidArgument);
    code(delete(String::new(), member_ids.clone()).await, Code::InvalidArgument);
    delete(g.group_snapshot_id.clone(), member_ids.clone()).await.unwrap();
    delete(g.group_snapshot_id.clone(), member_ids.clone()).await.unwrap();
    delete(MISSING_VOLUME.into(), vec![]).await.unwrap();
    code(get(g.group_snapshot_id.clone(), member_ids.clone()).await, Code::NotFound);
    for m in &member_ids {
        code(get_snapshot(c, m).await, Code::NotFound);
    }
}

/// The Kubernetes flow on a filesystem: ext4 mounted on node 0, a file,
/// a snapshot, the file rewritten; the restore, mounted on node 2, has the
/// file as it was at the snapshot. The snapshot class's default freeze
/// puts what was only in node 0's page cache into the cut too, and thaws
/// the filesystem right after.
async fn ext4_restore(c: &Csi) {
    let fs = ext4();
    let e = c.create(&c.name("fs"), SIZE, &[("replicas", "3")], vec![fs.clone()]).await.unwrap();
    let (stage, target) = ("plugins/fs/globalmount", "pods/fs/volumes/data");
    attach(c, 0, &e, fs.clone(), stage, target).await;
    let file = c.nodes[0].path(&format!("{target}/state.txt"));
    {
        let mut f = std::fs::File::create(&file).unwrap();
        f.write_all(b"before the snapshot").unwrap();
        f.sync_all().unwrap();
    }
    // Written, not synced: only in node 0's page cache.
    let cached: Vec<u8> = (0..3 * CHUNK).map(|i| (i % 251) as u8).collect();
    std::fs::write(c.nodes[0].path(&format!("{target}/cached.bin")), &cached).unwrap();
    let s = snapshot(c, &c.name("fs-snap"), &e.volume_id).await.unwrap();
    // Thawed: a write and its fsync go through at once (a frozen
    // filesystem would hold them until volumed's 15 s hold ran out).
    let path = file.clone();
    let write = tokio::task::spawn_blocking(move || {
        let mut f = std::fs::File::create(&path).unwrap();
        f.write_all(b"after").unwrap();
        f.sync_all().unwrap();
    });
    tokio::time::timeout(Duration::from_secs(8), write)
        .await
        .expect("the filesystem stayed frozen after CreateSnapshot")
        .unwrap();
    let restored =
        create_from(c, from_req(&c.name("fs-restored"), Some(SIZE), fs.clone(), snapshot_source(&s.snapshot_id)))
            .await
            .unwrap();
    let (r_stage, r_target) = ("plugins/fs-restored/globalmount", "pods/fs-restored/volumes/data");
    attach(c, 2, &restored, fs.clone(), r_stage, r_target).await;
    let back = std::fs::read(c.nodes[2].path(&format!("{r_target}/state.txt"))).unwrap();
    assert_eq!(back, b"before the snapshot");
    let back = std::fs::read(c.nodes[2].path(&format!("{r_target}/cached.bin"))).unwrap();
    assert!(back == cached, "the page cache at the snapshot is in it (freeze)");
    assert_eq!(std::fs::read(&file).unwrap(), b"after");
    detach(c, 2, &restored.volume_id, r_stage, r_target).await;
    detach(c, 0, &e.volume_id, stage, target).await;
    delete_snapshot(c, &s.snapshot_id).await.unwrap();
}
