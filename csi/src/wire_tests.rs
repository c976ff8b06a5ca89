//! Wire compatibility of proto/csi/v1/csi.proto with CSI v1.12: field
//! numbers and enum values of the parts added after v1.0 are checked
//! against hand-encoded protobuf bytes (tag = field << 3 | wire type).

use prost::Message;
use volumed_proto::csi::v1 as csi;

fn key(field: u32, wire: u32) -> u8 {
    (field << 3 | wire) as u8
}

#[test]
fn field_numbers_match_the_spec() {
    // CreateVolumeRequest.mutable_parameters = 8 (map entry: key 1, value 2).
    let r = csi::CreateVolumeRequest {
        mutable_parameters: [("a".to_string(), "b".to_string())].into(),
        ..Default::default()
    };
    assert_eq!(r.encode_to_vec(), vec![key(8, 2), 6, key(1, 2), 1, b'a', key(2, 2), 1, b'b']);

    // MountVolume.volume_mount_group = 3.
    let m = csi::volume_capability::MountVolume { volume_mount_group: "7".into(), ..Default::default() };
    assert_eq!(m.encode_to_vec(), vec![key(3, 2), 1, b'7']);

    // NodeStageVolumeRequest.staging_target_path = 3, volume_context = 6.
    let s = csi::NodeStageVolumeRequest { staging_target_path: "/s".into(), ..Default::default() };
    assert_eq!(s.encode_to_vec(), vec![key(3, 2), 2, b'/', b's']);

    // NodePublishVolumeRequest.target_path = 4, readonly = 6.
    let p = csi::NodePublishVolumeRequest { target_path: "/t".into(), readonly: true, ..Default::default() };
    assert_eq!(p.encode_to_vec(), vec![key(4, 2), 2, b'/', b't', key(6, 0), 1]);

    // Snapshot.group_snapshot_id = 6; ControllerModifyVolumeRequest.mutable_parameters = 3.
    let sn = csi::Snapshot { group_snapshot_id: "g".into(), ..Default::default() };
    assert_eq!(sn.encode_to_vec(), vec![key(6, 2), 1, b'g']);
    let mv = csi::ControllerModifyVolumeRequest {
        volume_id: "v".into(),
        mutable_parameters: [("k".to_string(), "v".to_string())].into(),
        ..Default::default()
    };
    assert_eq!(mv.encode_to_vec(), vec![key(1, 2), 1, b'v', key(3, 2), 6, key(1, 2), 1, b'k', key(2, 2), 1, b'v']);

    // ControllerExpandVolumeResponse.node_expansion_required = 2;
    // NodeGetInfoResponse.max_volumes_per_node = 2 (int64).
    let e = csi::ControllerExpandVolumeResponse { capacity_bytes: 1, node_expansion_required: true };
    assert_eq!(e.encode_to_vec(), vec![key(1, 0), 1, key(2, 0), 1]);
    let ni = csi::NodeGetInfoResponse { max_volumes_per_node: 5, ..Default::default() };
    assert_eq!(ni.encode_to_vec(), vec![key(2, 0), 5]);

    // ProbeResponse.ready is a google.protobuf.BoolValue (a message).
    let pr = csi::ProbeResponse { ready: Some(true) };
    assert_eq!(pr.encode_to_vec(), vec![key(1, 2), 2, key(1, 0), 1]);

    // GetCapacityResponse.maximum_volume_size = 2 is an Int64Value.
    let gc = csi::GetCapacityResponse { maximum_volume_size: Some(3), ..Default::default() };
    assert_eq!(gc.encode_to_vec(), vec![key(2, 2), 2, key(1, 0), 3]);
}

#[test]
fn enum_values_match_the_spec() {
    use csi::controller_service_capability::rpc::Type as C;
    assert_eq!(C::ModifyVolume as i32, 14);
    assert_eq!(C::GetSnapshot as i32, 15);
    assert_eq!(C::SingleNodeMultiWriter as i32, 13);
    use csi::node_service_capability::rpc::Type as N;
    assert_eq!(N::VolumeMountGroup as i32, 6);
    use csi::volume_capability::access_mode::Mode as M;
    assert_eq!(M::SingleNodeSingleWriter as i32, 6);
    assert_eq!(M::SingleNodeMultiWriter as i32, 7);
    use csi::plugin_capability::service::Type as S;
    assert_eq!(S::GroupControllerService as i32, 3);
    assert_eq!(S::SnapshotMetadataService as i32, 4);
    use csi::group_controller_service_capability::rpc::Type as G;
    assert_eq!(G::CreateDeleteGetVolumeGroupSnapshot as i32, 1);
    assert_eq!(csi::BlockMetadataType::VariableLength as i32, 2);
}
