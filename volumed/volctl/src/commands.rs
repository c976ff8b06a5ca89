//! The Admin API and node-local commands: one function per command, each
//! returning what goes to stdout.

use std::path::Path;

use tonic::transport::Channel;
use volumed_proto::volumed::v1 as pb;
use volumed_proto::volumed::v1::admin_client::AdminClient;

use crate::cli::{AttachArgs, CreateArgs, FrontendArg, Kind, MountArgs, NodeSocketArg, Output};
use crate::endpoint;
use crate::error::{from_status, CliError, Subject, Target};
use crate::render::{self, json};
use crate::units::human_size;

pub mod snapshots;

/// A connected Admin client and where it points (for error messages).
pub struct Api {
    pub(crate) client: AdminClient<Channel>,
    target: Target,
}

impl Api {
    pub async fn connect(url: &str) -> Result<Api, CliError> {
        Ok(Api { client: endpoint::admin(url).await?, target: Target::Api(url.to_string()) })
    }

    pub(crate) fn err(&self, subject: Subject) -> impl Fn(tonic::Status) -> CliError + '_ {
        move |s| from_status(&s, &self.target, &subject)
    }

    pub async fn cluster_status(&mut self) -> Result<pb::ClusterStatusResponse, CliError> {
        let r = self.client.cluster_status(pb::ClusterStatusRequest {}).await;
        r.map(|r| r.into_inner()).map_err(self.err(Subject::Cluster))
    }

    pub async fn nodes(&mut self) -> Result<Vec<pb::Node>, CliError> {
        let r = self.client.list_nodes(pb::ListNodesRequest {}).await;
        let mut nodes = r.map(|r| r.into_inner().nodes).map_err(self.err(Subject::Cluster))?;
        nodes.sort_by(|a, b| a.name.cmp(&b.name).then(a.node_id.cmp(&b.node_id)));
        Ok(nodes)
    }

    /// Every volume; with `include_retained`, also those deleted but kept
    /// for their snapshots.
    pub async fn volumes(&mut self, include_retained: bool) -> Result<Vec<pb::Volume>, CliError> {
        let mut out = Vec::new();
        let mut token = String::new();
        loop {
            let req = pb::ListVolumesRequest { max_entries: 0, starting_token: token.clone(), include_retained };
            let r = self.client.list_volumes(req).await;
            let page = r.map(|r| r.into_inner()).map_err(self.err(Subject::Cluster))?;
            out.extend(page.volumes);
            // A server repeating its token would loop forever.
            if page.next_token.is_empty() || page.next_token == token {
                break;
            }
            token = page.next_token;
        }
        Ok(out)
    }

    pub async fn volume(&mut self, key: &str) -> Result<pb::Volume, CliError> {
        let r = self.client.get_volume(pb::GetVolumeRequest { id_or_name: key.to_string() }).await;
        r.map(|r| r.into_inner()).map_err(self.err(Subject::Volume(key.to_string())))
    }
}

pub async fn cluster_status(api: &mut Api, output: Output) -> Result<String, CliError> {
    let c = api.cluster_status().await?;
    Ok(match output {
        Output::Json => json(&render::cluster_view(&c)),
        Output::Table => render::cluster_text(&c),
    })
}

pub async fn node_list(api: &mut Api, output: Output) -> Result<String, CliError> {
    let nodes = api.nodes().await?;
    Ok(match output {
        Output::Json => json(&nodes.iter().map(render::node_view).collect::<Vec<_>>()),
        Output::Table => render::nodes_text(&nodes),
    })
}

/// A node by exact name, else by numeric id.
fn find_node<'a>(nodes: &'a [pb::Node], key: &str) -> Option<&'a pb::Node> {
    nodes
        .iter()
        .find(|n| n.name == key)
        .or_else(|| key.parse::<u64>().ok().and_then(|id| nodes.iter().find(|n| n.node_id == id)))
}

pub async fn node_remove(api: &mut Api, key: &str, output: Output) -> Result<String, CliError> {
    let nodes = api.nodes().await?;
    let node = find_node(&nodes, key)
        .ok_or_else(|| CliError::NotFound(format!("node {key} not found (see `volctl node list`)")))?
        .clone();
    let r = api.client.remove_node(pb::RemoveNodeRequest { node_id: node.node_id }).await;
    let moving = r.map(|r| r.into_inner().replicas_moving).map_err(api.err(Subject::Node(key.to_string())))?;
    Ok(match output {
        Output::Json => json(&serde_json::json!({
            "node_id": node.node_id, "name": node.name, "replicas_moving": moving,
        })),
        Output::Table => format!(
            "node {} (id {}) removed; {moving} replica{} moving to other nodes (watch with `volctl volume list`)\n",
            node.name,
            node.node_id,
            if moving == 1 { " is" } else { "s are" }
        ),
    })
}

pub fn create_request(a: &CreateArgs) -> pb::CreateVolumeRequest {
    pb::CreateVolumeRequest {
        name: a.name.clone(),
        // 0 with a source: the source's size.
        size_bytes: a.size.unwrap_or(0),
        replica_count: a.replicas.unwrap_or(0),
        kind: match a.kind {
            Kind::Block => pb::VolumeKind::Block,
            Kind::File => pb::VolumeKind::File,
        } as i32,
        parameters: a.params.iter().cloned().collect(),
        requisite: Vec::new(),
        preferred: Vec::new(),
        spread_zones: a.spread_zones,
        source_snapshot: a.from_snapshot.clone().unwrap_or_default(),
        source_volume: a.from_volume.clone().unwrap_or_default(),
        no_wait: a.no_wait,
    }
}

/// What a create call is about, for its error messages.
fn create_subject(a: &CreateArgs) -> Subject {
    let source = match (&a.from_snapshot, &a.from_volume) {
        (Some(s), _) => format!("snapshot {s}"),
        (None, Some(v)) => format!("volume {v}"),
        (None, None) => return Subject::Volume(a.name.clone()),
    };
    Subject::Restore { volume: a.name.clone(), source }
}

fn volume_out(v: &pb::Volume, output: Output) -> String {
    match output {
        Output::Json => json(&render::volume_view(v)),
        Output::Table => render::volume_text(v),
    }
}

pub async fn volume_create(api: &mut Api, a: &CreateArgs, output: Output) -> Result<String, CliError> {
    let r = api.client.create_volume(create_request(a)).await;
    let v = r.map(|r| r.into_inner()).map_err(api.err(create_subject(a)))?;
    Ok(volume_out(&v, output))
}

/// The volume with its snapshot chain.
pub async fn volume_get(api: &mut Api, key: &str, output: Output) -> Result<String, CliError> {
    let v = api.volume(key).await?;
    let snaps = api.snapshots_of(&v.id).await?;
    Ok(match output {
        Output::Json => {
            let mut view = render::volume_view(&v);
            let mut sorted = snaps.clone();
            sorted.sort_by_key(|s| s.log_index);
            view.snapshots = Some(sorted.iter().map(render::snapshots::snapshot_view).collect());
            json(&view)
        }
        Output::Table if snaps.is_empty() => render::volume_text(&v),
        Output::Table => format!(
            "{}
{}",
            render::volume_text(&v),
            render::snapshots::chain_text(&snaps)
        ),
    })
}

pub async fn volume_list(api: &mut Api, all: bool, output: Output) -> Result<String, CliError> {
    let volumes = api.volumes(all).await?;
    Ok(match output {
        Output::Json => json(&volumes.iter().map(render::volume_view).collect::<Vec<_>>()),
        Output::Table => render::volumes_text(&volumes),
    })
}

pub async fn volume_delete(api: &mut Api, key: &str, output: Output) -> Result<String, CliError> {
    let subject = Subject::Volume(key.to_string());
    let r = api.client.delete_volume(pb::DeleteVolumeRequest { id_or_name: key.to_string() }).await;
    let existed = r.map(|r| r.into_inner().existed).map_err(api.err(subject))?;
    // The API is idempotent (CSI needs that); a person who typed a name that
    // does not exist wants to know.
    if !existed {
        return Err(CliError::NotFound(format!("volume {key} not found (see `volctl volume list`)")));
    }
    Ok(match output {
        Output::Json => json(&serde_json::json!({ "deleted": key })),
        Output::Table => format!("volume {key} deleted\n"),
    })
}

pub async fn volume_resize(api: &mut Api, key: &str, size: u64, output: Output) -> Result<String, CliError> {
    let req = pb::ResizeVolumeRequest { id_or_name: key.to_string(), size_bytes: size };
    let r = api.client.resize_volume(req).await;
    let v = r.map(|r| r.into_inner()).map_err(api.err(Subject::Volume(key.to_string())))?;
    Ok(match output {
        Output::Json => json(&render::volume_view(&v)),
        Output::Table => {
            format!("volume {} resized to {} ({} bytes)\n", v.name, human_size(v.size_bytes), v.size_bytes)
        }
    })
}

pub async fn volume_scrub(api: &mut Api, key: &str, output: Output) -> Result<String, CliError> {
    let r = api.client.scrub_volume(pb::ScrubVolumeRequest { id_or_name: key.to_string() }).await;
    let s = r.map(|r| r.into_inner()).map_err(api.err(Subject::Volume(key.to_string())))?;
    let text = match output {
        Output::Json => json(&serde_json::json!({
            "volume": key,
            "blocks_checked": s.blocks_checked,
            "blocks_repaired": s.blocks_repaired,
            "blocks_unrepairable": s.blocks_unrepairable,
        })),
        Output::Table => format!(
            "volume {key}: {} blocks checked across all replicas, {} repaired, {} unrepairable\n",
            s.blocks_checked, s.blocks_repaired, s.blocks_unrepairable
        ),
    };
    if s.blocks_unrepairable > 0 {
        // The report still goes out; the exit code must say data is at risk.
        return Err(CliError::Failed {
            output: text,
            message: format!(
                "volume {key}: {} blocks have no healthy copy on any replica; restore the data from a backup or snapshot",
                s.blocks_unrepairable
            ),
        });
    }
    Ok(text)
}

// ---------------------------------------------------------------- node-local

/// A connected NodeLocal client and its socket.
pub struct Local {
    client: volumed_proto::volumed::v1::node_local_client::NodeLocalClient<Channel>,
    target: Target,
}

impl Local {
    pub async fn connect(
        socket: &NodeSocketArg,
        endpoint_flag: Option<&str>,
        state_dir: &Path,
    ) -> Result<Local, CliError> {
        let path = endpoint::resolve_node_socket(socket.node_socket.as_deref(), endpoint_flag, state_dir)?;
        Ok(Local { client: endpoint::node_local(&path).await?, target: Target::Socket(path) })
    }

    fn err(&self, subject: Subject) -> impl Fn(tonic::Status) -> CliError + '_ {
        move |s| from_status(&s, &self.target, &subject)
    }
}

pub fn attach_request(a: &AttachArgs) -> pb::AttachRequest {
    pb::AttachRequest {
        volume: a.volume.clone(),
        mode: if a.readonly { pb::AccessMode::SingleNodeReaderOnly } else { pb::AccessMode::SingleNodeWriter } as i32,
        readonly: a.readonly,
        force: a.force,
        frontend: match a.frontend {
            FrontendArg::Auto => pb::Frontend::Auto,
            FrontendArg::KernelNbd => pb::Frontend::KernelNbd,
            FrontendArg::FuseLoop => pb::Frontend::FuseLoop,
        } as i32,
    }
}

pub async fn volume_attach(local: &mut Local, a: &AttachArgs, output: Output) -> Result<String, CliError> {
    let r = local.client.attach(attach_request(a)).await;
    let resp = r.map(|r| r.into_inner()).map_err(local.err(Subject::Volume(a.volume.clone())))?;
    Ok(match output {
        Output::Json => json(&render::attach_view(&resp)),
        Output::Table => render::attach_text(&resp),
    })
}

pub async fn volume_detach(local: &mut Local, key: &str, output: Output) -> Result<String, CliError> {
    let r = local.client.detach(pb::DetachRequest { volume: key.to_string() }).await;
    let existed = r.map(|r| r.into_inner().existed).map_err(local.err(Subject::Volume(key.to_string())))?;
    Ok(match output {
        Output::Json => json(&serde_json::json!({ "volume": key, "existed": existed })),
        Output::Table if existed => format!("volume {key} detached from this node\n"),
        Output::Table => format!("volume {key} was not attached on this node; nothing to do\n"),
    })
}

/// `path` made absolute against the current directory: the node-local
/// volumed runs elsewhere and cannot resolve our relative paths.
fn absolute(path: &std::path::Path) -> String {
    if path.is_absolute() {
        return path.display().to_string();
    }
    match std::env::current_dir() {
        Ok(cwd) => cwd.join(path).display().to_string(),
        Err(_) => path.display().to_string(),
    }
}

pub fn mount_request(a: &MountArgs) -> pb::MountRequest {
    pb::MountRequest {
        volume: a.volume.clone(),
        target: absolute(&a.path),
        readonly: a.readonly,
        mode: if a.readonly { pb::AccessMode::MultiNodeReaderOnly } else { pb::AccessMode::MultiNodeMultiWriter }
            as i32,
        options: Vec::new(),
    }
}

pub async fn volume_mount(local: &mut Local, a: &MountArgs, output: Output) -> Result<String, CliError> {
    let req = mount_request(a);
    let r = local.client.mount(req.clone()).await;
    let resp = r.map(|r| r.into_inner()).map_err(local.err(Subject::Volume(a.volume.clone())))?;
    Ok(match output {
        Output::Json => json(&serde_json::json!({
            "volume": a.volume, "volume_id": resp.volume_id, "target": resp.target, "readonly": a.readonly,
        })),
        Output::Table => format!(
            "volume {} mounted at {}{} (served by the node's volumed; it stays mounted when volctl exits)\n",
            a.volume,
            resp.target,
            if a.readonly { " read-only" } else { "" }
        ),
    })
}

pub async fn volume_unmount(local: &mut Local, path: &std::path::Path, output: Output) -> Result<String, CliError> {
    let target = absolute(path);
    let r = local.client.unmount(pb::UnmountRequest { target: target.clone() }).await;
    let existed = r.map(|r| r.into_inner().existed).map_err(local.err(Subject::Cluster))?;
    Ok(match output {
        Output::Json => json(&serde_json::json!({ "target": target, "existed": existed })),
        Output::Table if existed => format!("{target} unmounted\n"),
        Output::Table => format!("no file volume is mounted at {target}; nothing to do\n"),
    })
}

pub async fn volume_attachments(local: &mut Local, output: Output) -> Result<String, CliError> {
    let r = local.client.list_attachments(pb::ListAttachmentsRequest {}).await;
    let l = r.map(|r| r.into_inner()).map_err(local.err(Subject::Cluster))?;
    Ok(match output {
        Output::Json => json(&render::local_view(&l)),
        Output::Table => render::local_text(&l),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn volume_cmd(args: &[&str]) -> crate::cli::VolumeCmd {
        let cli = crate::cli::Cli::try_parse_from(["volctl", "volume"].iter().chain(args)).unwrap();
        match cli.command {
            crate::cli::Command::Volume(v) => v,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn create_request_from_flags() {
        let crate::cli::VolumeCmd::Create(a) = volume_cmd(&[
            "create",
            "db",
            "--size",
            "10G",
            "--param",
            "fsType=ext4",
            "--spread-zones",
            "--kind",
            "file",
        ]) else {
            panic!()
        };
        let r = create_request(&a);
        assert_eq!(r.name, "db");
        assert_eq!(r.size_bytes, 10_000_000_000);
        assert_eq!(r.replica_count, 0, "unset means the cluster default");
        assert_eq!(r.kind(), pb::VolumeKind::File);
        assert_eq!(r.parameters.get("fsType").map(String::as_str), Some("ext4"));
        assert!(r.spread_zones);
    }

    #[test]
    fn mount_request_is_rwx_with_an_absolute_target() {
        let crate::cli::VolumeCmd::Mount(a) = volume_cmd(&["mount", "shared", "rel/dir"]) else { panic!() };
        let r = mount_request(&a);
        assert_eq!(r.volume, "shared");
        assert!(r.target.starts_with('/') && r.target.ends_with("/rel/dir"), "{}", r.target);
        assert_eq!((r.mode(), r.readonly), (pb::AccessMode::MultiNodeMultiWriter, false));
        let crate::cli::VolumeCmd::Mount(a) = volume_cmd(&["mount", "shared", "/mnt/x", "--readonly"]) else {
            panic!()
        };
        let r = mount_request(&a);
        assert_eq!((r.target.as_str(), r.mode(), r.readonly), ("/mnt/x", pb::AccessMode::MultiNodeReaderOnly, true));
    }

    #[test]
    fn attach_request_from_flags() {
        let crate::cli::VolumeCmd::Attach(a) = volume_cmd(&["attach", "db", "--readonly", "--frontend", "kernel-nbd"])
        else {
            panic!()
        };
        let r = attach_request(&a);
        assert_eq!(r.volume, "db");
        assert!(r.readonly && !r.force);
        assert_eq!(r.mode(), pb::AccessMode::SingleNodeReaderOnly);
        assert_eq!(r.frontend(), pb::Frontend::KernelNbd);
        let crate::cli::VolumeCmd::Attach(a) = volume_cmd(&["attach", "db", "--force"]) else { panic!() };
        let r = attach_request(&a);
        assert_eq!(r.mode(), pb::AccessMode::SingleNodeWriter);
        assert_eq!(r.frontend(), pb::Frontend::Auto);
        assert!(r.force);
    }

    #[test]
    fn nodes_are_found_by_name_then_id() {
        let n = |id: u64, name: &str| pb::Node { node_id: id, name: name.into(), ..Default::default() };
        let nodes = vec![n(1, "node-1"), n(2, "3"), n(3, "node-3")];
        assert_eq!(find_node(&nodes, "node-1").map(|n| n.node_id), Some(1));
        assert_eq!(find_node(&nodes, "3").map(|n| n.node_id), Some(2), "an exact name beats an id");
        assert_eq!(find_node(&nodes, "1").map(|n| n.node_id), Some(1));
        assert!(find_node(&nodes, "node-9").is_none());
    }
}
