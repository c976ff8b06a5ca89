//! Snapshot helpers for the suites: Admin API calls that must succeed,
//! restores that wait for their copy, and reading a snapshot straight from
//! one chosen replica (the peer `ReadSnapshot` call), which shows what that
//! replica holds without going through any leader.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Buf;
use volumed_proto::volumed::v1 as pb;
use volumed_proto::volumed::v1::raft_transport_client::RaftTransportClient;

use crate::cluster::Cluster;
use crate::workload::BLOCK;

impl Cluster {
    pub async fn create_snapshot(&self, name: &str, volume: &str) -> pb::Snapshot {
        let mut c = self.admin().await;
        match c.create_snapshot(pb::CreateSnapshotRequest { name: name.into(), source_volume: volume.into() }).await {
            Ok(s) => s.into_inner(),
            Err(e) => panic!("create snapshot {name} of {volume}: {e}\n{}", self.logs_tail(40)),
        }
    }

    pub async fn get_snapshot(&self, key: &str) -> Result<pb::Snapshot, tonic::Status> {
        let mut c = self.admin().await;
        c.get_snapshot(pb::GetSnapshotRequest { id_or_name: key.into() }).await.map(|r| r.into_inner())
    }

    /// Creates volume `name` from a snapshot or a volume (`from_volume`)
    /// and waits until its data is copied.
    pub async fn restore(&self, name: &str, source: &str, from_volume: bool, size: u64) -> pb::Volume {
        let mut c = self.admin().await;
        let mut req =
            pb::CreateVolumeRequest { name: name.into(), size_bytes: size, replica_count: 3, ..Default::default() };
        if from_volume {
            req.source_volume = source.into();
        } else {
            req.source_snapshot = source.into();
        }
        let mut r = tonic::Request::new(req);
        r.set_timeout(Duration::from_secs(120));
        match c.create_volume(r).await {
            Ok(v) => v.into_inner(),
            Err(e) => panic!("restore {name} from {source}: {e}\n{}", self.logs_tail(40)),
        }
    }

    /// Reads what node `i`'s replica of `volume` holds for the snapshot
    /// at log `index`, over blocks `0..end_block`: block → data.
    pub async fn read_snapshot_on(
        &self,
        i: usize,
        volume: &str,
        index: u64,
        end_block: u64,
    ) -> Result<BTreeMap<u64, Vec<u8>>, tonic::Status> {
        let ch = tonic::transport::Endpoint::from_shared(self.nodes[i].endpoint())
            .expect("endpoint")
            .connect()
            .await
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        let mut client = RaftTransportClient::new(ch).max_decoding_message_size(64 << 20);
        let id = uuid::Uuid::parse_str(volume).expect("volume id");
        let mut stream = client
            .read_snapshot(pb::ReadSnapshotRequest {
                group_id: bytes::Bytes::copy_from_slice(id.as_bytes()),
                index,
                from_block: 0,
                end_block,
            })
            .await?
            .into_inner();
        let mut out = BTreeMap::new();
        let mut next = 0;
        while let Some(chunk) = stream.message().await? {
            let mut recs = chunk.records;
            while recs.has_remaining() {
                let block = recs.get_u64();
                let len = recs.get_u32() as usize;
                assert_eq!(len, 4 + BLOCK, "block {block}: a block volume's record holds one whole block");
                let crc = recs.get_u32_le();
                let data = recs.split_to(BLOCK);
                assert_eq!(crc32fast::hash(&data), crc, "block {block} of the snapshot fails its checksum");
                out.insert(block, data.to_vec());
            }
            next = chunk.next_block;
        }
        assert_eq!(next, end_block, "the stream must cover every block");
        Ok(out)
    }
}
