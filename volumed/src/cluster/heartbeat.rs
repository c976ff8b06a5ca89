//! Every node reports to the catalog leader once a second (and at once
//! when a local replica changes): liveness, capacity, and a status line per
//! replica. The leader answers `GetVolume` and decides rebuilds from these.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::debug;
use volumed_proto::volumed::v1::NodeHeartbeat;

use super::node::NodeRuntime;
use crate::catalog::service::NodeReport;
use crate::storage::encode;
use crate::volume::replica::ReplicaReport;

pub fn collect(node: &NodeRuntime) -> NodeReport {
    let replicas: Vec<ReplicaReport> = node.local_replicas().iter().map(|r| r.report()).collect();
    let crc_repairs = node.local_replicas().iter().map(|r| r.counters.crc_repairs.load(Ordering::Relaxed)).sum();
    let disk_free_bytes = super::disk::fs_stats(&node.config.data_dir).map(|s| s.free).unwrap_or(0);
    let attachments = node.local_attachments.read().map(|a| a.clone()).unwrap_or_default();
    NodeReport {
        at: Instant::now(),
        capacity_bytes: node.capacity_bytes,
        disk_free_bytes,
        crc_repairs,
        replicas,
        attachments,
    }
}

/// Report period while a snapshot transfer runs here.
const REBUILD_REPORT_PERIOD: Duration = Duration::from_millis(250);

pub async fn run(node: Arc<NodeRuntime>) {
    let mut shutdown = node.shutdown.subscribe();
    loop {
        let report = collect(&node);
        for r in &report.replicas {
            if let Some(why) = &r.fatal {
                let group = crate::storage::keys::GroupId(r.volume);
                super::replicas::rebuild_failed(&node, group, why).await;
            }
        }
        // While this node streams a replica to another, report more often
        // so the rebuild's progress shows (GetVolume reads these reports).
        let period = if report.replicas.iter().any(|r| !r.transfers.is_empty()) {
            REBUILD_REPORT_PERIOD.min(node.catalog.liveness().heartbeat)
        } else {
            node.catalog.liveness().heartbeat
        };
        send(&node, report).await;
        tokio::select! {
            _ = tokio::time::sleep(period) => {}
            _ = node.report_now.notified() => {
                // Coalesce bursts of changes.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            _ = shutdown.changed() => return,
        }
    }
}

async fn send(node: &NodeRuntime, report: NodeReport) {
    let me = node.node_id();
    let Some(leader) = node.catalog.leader() else { return };
    if leader == me {
        node.catalog.record_heartbeat(me, report);
        return;
    }
    let status = match encode(&report.replicas) {
        Ok(s) => s,
        Err(e) => {
            debug!(error = %e, "encode heartbeat");
            return;
        }
    };
    let attachments = if report.attachments.is_empty() {
        Vec::new()
    } else {
        match encode(&report.attachments) {
            Ok(a) => a,
            Err(e) => {
                debug!(error = %e, "encode attachment reports");
                Vec::new()
            }
        }
    };
    let Ok(mut client) = node.pool.client(leader, None) else { return };
    let mut req = tonic::Request::new(NodeHeartbeat {
        node_id: me,
        capacity_bytes: report.capacity_bytes,
        disk_free_bytes: report.disk_free_bytes,
        crc_repairs: report.crc_repairs,
        status: status.into(),
        attachments: attachments.into(),
    });
    req.set_timeout(Duration::from_secs(2));
    if let Err(e) = client.heartbeat(req).await {
        debug!(leader, error = %e.message(), "heartbeat");
    }
}
