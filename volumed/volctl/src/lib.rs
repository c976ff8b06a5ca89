//! volctl: the admin CLI of Volumed. It talks gRPC to any volumed (the
//! Admin API; nodes forward to the catalog leader), to the volumed on this
//! node over its unix socket (attach/detach), and runs a local dev cluster
//! (`volctl dev up/down`).
//!
//! - [`cli`]: commands and flags;
//! - [`endpoint`]: which volumed to talk to, and the channels;
//! - [`commands`]: one function per API command ([`commands::snapshots`]:
//!   snapshots and group snapshots);
//! - [`render`], [`table`], [`units`]: JSON and human output;
//! - [`error`]: gRPC codes → messages that say what to do;
//! - [`state`]: the dev cluster's `cluster.json`;
//! - [`dev`]: `dev up` / `dev down`.

pub mod cli;
pub mod commands;
pub mod dev;
pub mod endpoint;
pub mod error;
pub mod render;
pub mod state;
pub mod table;
pub mod units;

use cli::{Cli, ClusterCmd, Command, DevCmd, GroupCmd, NodeCmd, SnapshotCmd, VolumeCmd};
use commands::{Api, Local};
use error::CliError;

/// Runs one command; the result is what goes to stdout.
pub async fn run(cli: Cli) -> Result<String, CliError> {
    let out = cli.output;
    let endpoint = cli.endpoint.as_deref();
    let state_dir = cli.state_dir.as_path();
    match cli.command {
        Command::Dev(DevCmd::Up(a)) => dev::up::up(&a, state_dir, out).await,
        Command::Dev(DevCmd::Down(a)) => dev::down::down(&a, state_dir, out).await,
        Command::Volume(VolumeCmd::Attach(a)) => {
            let mut local = Local::connect(&a.socket, endpoint, state_dir).await?;
            commands::volume_attach(&mut local, &a, out).await
        }
        Command::Volume(VolumeCmd::Detach { volume, socket }) => {
            let mut local = Local::connect(&socket, endpoint, state_dir).await?;
            commands::volume_detach(&mut local, &volume, out).await
        }
        Command::Volume(VolumeCmd::Mount(a)) => {
            let mut local = Local::connect(&a.socket, endpoint, state_dir).await?;
            commands::volume_mount(&mut local, &a, out).await
        }
        Command::Volume(VolumeCmd::Unmount { path, socket }) => {
            let mut local = Local::connect(&socket, endpoint, state_dir).await?;
            commands::volume_unmount(&mut local, &path, out).await
        }
        Command::Volume(VolumeCmd::Attachments { socket }) => {
            let mut local = Local::connect(&socket, endpoint, state_dir).await?;
            commands::volume_attachments(&mut local, out).await
        }
        Command::Cluster(cmd) => {
            let mut api = Api::connect(&endpoint::resolve(endpoint, state_dir)?).await?;
            match cmd {
                ClusterCmd::Status => commands::cluster_status(&mut api, out).await,
            }
        }
        Command::Node(cmd) => {
            let mut api = Api::connect(&endpoint::resolve(endpoint, state_dir)?).await?;
            match cmd {
                NodeCmd::List => commands::node_list(&mut api, out).await,
                NodeCmd::Remove { node } => commands::node_remove(&mut api, &node, out).await,
            }
        }
        Command::Volume(cmd) => {
            let mut api = Api::connect(&endpoint::resolve(endpoint, state_dir)?).await?;
            match cmd {
                VolumeCmd::Create(a) => commands::volume_create(&mut api, &a, out).await,
                VolumeCmd::Get { volume } => commands::volume_get(&mut api, &volume, out).await,
                VolumeCmd::List { all } => commands::volume_list(&mut api, all, out).await,
                VolumeCmd::Delete { volume } => commands::volume_delete(&mut api, &volume, out).await,
                VolumeCmd::Resize { volume, size } => commands::volume_resize(&mut api, &volume, size, out).await,
                VolumeCmd::Scrub { volume } => commands::volume_scrub(&mut api, &volume, out).await,
                VolumeCmd::Attach(_)
                | VolumeCmd::Detach { .. }
                | VolumeCmd::Mount(_)
                | VolumeCmd::Unmount { .. }
                | VolumeCmd::Attachments { .. } => {
                    unreachable!("node-local commands are matched above")
                }
            }
        }
        Command::Snapshot(cmd) => {
            use commands::snapshots as s;
            let mut api = Api::connect(&endpoint::resolve(endpoint, state_dir)?).await?;
            match cmd {
                SnapshotCmd::Create { name, volume } => s::create(&mut api, &name, &volume, out).await,
                SnapshotCmd::List { volume } => s::list(&mut api, volume.as_deref(), out).await,
                SnapshotCmd::Get { snapshot } => s::get(&mut api, &snapshot, out).await,
                SnapshotCmd::Delete { snapshot } => s::delete(&mut api, &snapshot, out).await,
                SnapshotCmd::Group(GroupCmd::Create { name, volumes }) => {
                    s::group_create(&mut api, &name, &volumes, out).await
                }
                SnapshotCmd::Group(GroupCmd::Get { group }) => s::group_get(&mut api, &group, out).await,
                SnapshotCmd::Group(GroupCmd::Delete { group }) => s::group_delete(&mut api, &group, out).await,
            }
        }
    }
}
