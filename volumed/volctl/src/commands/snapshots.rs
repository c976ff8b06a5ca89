//! `volctl snapshot ...`: snapshots and group snapshots through the Admin
//! API. The API's deletes are idempotent (CSI needs that); a person who
//! named something that does not exist is told so.

use volumed_proto::volumed::v1 as pb;

use super::Api;
use crate::cli::Output;
use crate::error::{CliError, Subject};
use crate::render::json;
use crate::render::snapshots::{self as view, sort_snapshots};

impl Api {
    /// Every snapshot (of `volume` when given), all pages.
    pub async fn snapshots(&mut self, volume: Option<&str>) -> Result<Vec<pb::Snapshot>, CliError> {
        let subject = match volume {
            Some(v) => Subject::Volume(v.to_string()),
            None => Subject::Cluster,
        };
        let mut out = Vec::new();
        let mut token = String::new();
        loop {
            let req = pb::ListSnapshotsRequest {
                source_volume: volume.unwrap_or_default().to_string(),
                starting_token: token.clone(),
                ..Default::default()
            };
            let r = self.client.list_snapshots(req).await;
            let page = r.map(|r| r.into_inner()).map_err(self.err(subject.clone()))?;
            out.extend(page.snapshots);
            // A server repeating its token would loop forever.
            if page.next_token.is_empty() || page.next_token == token {
                return Ok(out);
            }
            token = page.next_token;
        }
    }

    /// The snapshots of the volume with id `id`.
    pub async fn snapshots_of(&mut self, id: &str) -> Result<Vec<pb::Snapshot>, CliError> {
        self.snapshots(Some(id)).await
    }
}

fn one(s: &pb::Snapshot, output: Output) -> String {
    match output {
        Output::Json => json(&view::snapshot_view(s)),
        Output::Table => view::snapshot_text(s),
    }
}

fn group(g: &pb::GroupSnapshot, output: Output) -> String {
    match output {
        Output::Json => json(&view::group_view(g)),
        Output::Table => view::group_text(g),
    }
}

pub async fn create(api: &mut Api, name: &str, volume: &str, output: Output) -> Result<String, CliError> {
    let req = pb::CreateSnapshotRequest { name: name.to_string(), source_volume: volume.to_string() };
    let r = api.client.create_snapshot(req).await;
    let subject = Subject::NewSnapshot { snapshot: name.to_string(), volume: volume.to_string() };
    let s = r.map(|r| r.into_inner()).map_err(api.err(subject))?;
    Ok(one(&s, output))
}

pub async fn list(api: &mut Api, volume: Option<&str>, output: Output) -> Result<String, CliError> {
    // A volume that does not exist is an error here (the API lists nothing).
    let volume_id = match volume {
        Some(v) => Some(resolve_volume(api, v).await?),
        None => None,
    };
    let mut snaps = api.snapshots(volume_id.as_deref()).await?;
    sort_snapshots(&mut snaps);
    Ok(match output {
        Output::Json => json(&snaps.iter().map(view::snapshot_view).collect::<Vec<_>>()),
        Output::Table => view::snapshots_text(&snaps),
    })
}

/// The id of a volume named `key`, also of one deleted but kept for its
/// snapshots (whose id still lists them).
async fn resolve_volume(api: &mut Api, key: &str) -> Result<String, CliError> {
    match api.volume(key).await {
        Ok(v) => Ok(v.id),
        Err(CliError::NotFound(_)) => {
            let kept = api.volumes(true).await?;
            kept.into_iter()
                .find(|v| v.retained && v.id == key)
                .map(|v| v.id)
                .ok_or_else(|| CliError::NotFound(format!("volume {key} not found (see `volctl volume list --all`)")))
        }
        Err(e) => Err(e),
    }
}

pub async fn get(api: &mut Api, key: &str, output: Output) -> Result<String, CliError> {
    let r = api.client.get_snapshot(pb::GetSnapshotRequest { id_or_name: key.to_string() }).await;
    let s = r.map(|r| r.into_inner()).map_err(api.err(Subject::Snapshot(key.to_string())))?;
    Ok(one(&s, output))
}

pub async fn delete(api: &mut Api, key: &str, output: Output) -> Result<String, CliError> {
    let r = api.client.delete_snapshot(pb::DeleteSnapshotRequest { id_or_name: key.to_string() }).await;
    let existed = r.map(|r| r.into_inner().existed).map_err(api.err(Subject::Snapshot(key.to_string())))?;
    if !existed {
        return Err(CliError::NotFound(format!("snapshot {key} not found (see `volctl snapshot list`)")));
    }
    Ok(match output {
        Output::Json => json(&serde_json::json!({ "deleted": key })),
        Output::Table => format!(
            "snapshot {key} deleted; the space only it held is freed in the background (see `volctl volume get`)\n"
        ),
    })
}

pub async fn group_create(api: &mut Api, name: &str, volumes: &[String], output: Output) -> Result<String, CliError> {
    let req = pb::CreateGroupSnapshotRequest { name: name.to_string(), source_volumes: volumes.to_vec() };
    let r = api.client.create_group_snapshot(req).await;
    let g = r.map(|r| r.into_inner()).map_err(api.err(Subject::NewGroupSnapshot(name.to_string())))?;
    Ok(group(&g, output))
}

pub async fn group_get(api: &mut Api, key: &str, output: Output) -> Result<String, CliError> {
    let r = api.client.get_group_snapshot(pb::GetGroupSnapshotRequest { id_or_name: key.to_string() }).await;
    let g = r.map(|r| r.into_inner()).map_err(api.err(Subject::GroupSnapshot(key.to_string())))?;
    Ok(group(&g, output))
}

pub async fn group_delete(api: &mut Api, key: &str, output: Output) -> Result<String, CliError> {
    let r = api.client.delete_group_snapshot(pb::DeleteGroupSnapshotRequest { id_or_name: key.to_string() }).await;
    let existed = r.map(|r| r.into_inner().existed).map_err(api.err(Subject::GroupSnapshot(key.to_string())))?;
    if !existed {
        return Err(CliError::NotFound(format!(
            "group snapshot {key} not found (`volctl snapshot list` shows the group of each snapshot)"
        )));
    }
    Ok(match output {
        Output::Json => json(&serde_json::json!({ "deleted": key })),
        Output::Table => format!("group snapshot {key} and its member snapshots deleted\n"),
    })
}
