//! The command line: every command, flag and environment variable.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgGroup, Args, Parser, Subcommand, ValueEnum};

use crate::units;

pub const DEFAULT_STATE_DIR: &str = "/tmp/volumed-dev";

#[derive(Debug, Parser)]
#[command(
    name = "volctl",
    version,
    about = "Admin CLI of Volumed: cluster, nodes, volumes, snapshots, attachments, and a local dev cluster",
    after_help = "The endpoint is --endpoint, else $VOLUMED_ENDPOINT, else the first reachable node of the \
                  dev cluster in --state-dir (see `volctl dev up`)."
)]
pub struct Cli {
    /// volumed API address (http://HOST:PORT); any node of the cluster answers.
    #[arg(long, env = "VOLUMED_ENDPOINT", global = true, value_name = "URL")]
    pub endpoint: Option<String>,
    /// Output format.
    #[arg(short = 'o', long, global = true, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    /// State directory of the local dev cluster (cluster.json, node data, logs).
    #[arg(long, env = "VOLUMED_STATE_DIR", global = true, value_name = "DIR", default_value = DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Cluster-wide state.
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// Nodes of the cluster.
    #[command(subcommand)]
    Node(NodeCmd),
    /// Volumes, and their devices on this node.
    #[command(subcommand)]
    Volume(VolumeCmd),
    /// Snapshots of volumes, and group snapshots (one cut across volumes).
    #[command(subcommand)]
    Snapshot(SnapshotCmd),
    /// A local multi-node cluster for development and tests.
    #[command(subcommand)]
    Dev(DevCmd),
}

#[derive(Debug, Subcommand)]
pub enum ClusterCmd {
    /// Catalog leader and voters, node and volume counts, readiness.
    Status,
}

#[derive(Debug, Subcommand)]
pub enum NodeCmd {
    /// Every node with its state, addresses, capacity and replica count.
    List,
    /// Remove a node for good: its replicas are re-created elsewhere now.
    Remove {
        /// Node name or numeric id.
        node: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum VolumeCmd {
    /// Create a volume, empty or from a snapshot or volume (idempotent for the same name and spec).
    Create(CreateArgs),
    /// One volume with its replicas, rebuild/restore progress, attachments and snapshots.
    Get {
        /// Volume name or id.
        volume: String,
    },
    /// Every volume.
    List {
        /// Also volumes deleted but kept for their snapshots.
        #[arg(long)]
        all: bool,
    },
    /// Delete a volume; with snapshots it is kept hidden until its last snapshot is deleted.
    Delete {
        /// Volume name or id.
        volume: String,
    },
    /// Grow a volume.
    Resize {
        /// Volume name or id.
        volume: String,
        /// New size (bytes, or with a unit: 512Mi, 10Gi, 100G).
        #[arg(long, value_parser = units::parse_volume_size)]
        size: u64,
    },
    /// Check every block's checksum on every replica and repair bad ones.
    Scrub {
        /// Volume name or id.
        volume: String,
    },
    /// Attach a block volume on this node (the node-local volumed hosts the device).
    Attach(AttachArgs),
    /// Detach a volume from this node.
    Detach {
        /// Volume name or id.
        volume: String,
        #[command(flatten)]
        socket: NodeSocketArg,
    },
    /// Mount a file volume at PATH on this node (the node-local volumed serves it through FUSE).
    Mount(MountArgs),
    /// Unmount a file volume mounted at PATH on this node.
    Unmount {
        /// Mount point.
        path: PathBuf,
        #[command(flatten)]
        socket: NodeSocketArg,
    },
    /// Devices and mounts the node-local volumed hosts.
    Attachments {
        #[command(flatten)]
        socket: NodeSocketArg,
    },
}

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("source").args(["from_snapshot", "from_volume"])))]
pub struct CreateArgs {
    /// Volume name (not a uuid; at most 253 characters, no '/').
    pub name: String,
    /// Size (bytes, or with a unit: 512Mi, 10Gi, 100G); from a snapshot or
    /// volume: at least the source's size, which is the default.
    #[arg(long, value_parser = units::parse_volume_size, required_unless_present_any = ["from_snapshot", "from_volume"])]
    pub size: Option<u64>,
    /// Restore: fill the volume with this snapshot's data (name or id).
    #[arg(long, value_name = "SNAPSHOT")]
    pub from_snapshot: Option<String>,
    /// Clone: fill the volume with this volume's current data (name or id).
    #[arg(long, value_name = "VOLUME")]
    pub from_volume: Option<String>,
    /// With --from-*: return once the volume exists; the copy goes on in
    /// the background (progress in `volctl volume get`).
    #[arg(long, requires = "source")]
    pub no_wait: bool,
    /// Replica count (default: the cluster's, 3).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub replicas: Option<u32>,
    /// Block device or shared filesystem.
    #[arg(long, value_enum, default_value_t = Kind::Block)]
    pub kind: Kind,
    /// Volume parameter stored with the volume (repeatable), e.g. fsType=xfs.
    #[arg(long = "param", value_name = "KEY=VALUE", value_parser = parse_param)]
    pub params: Vec<(String, String)>,
    /// Place every replica in a different zone (node label `zone`); fail otherwise.
    #[arg(long)]
    pub spread_zones: bool,
}

#[derive(Debug, Subcommand)]
pub enum SnapshotCmd {
    /// Snapshot a volume (crash-consistent, O(1); idempotent for the same name and volume).
    Create {
        /// Snapshot name (not a uuid; at most 253 characters, no '/').
        name: String,
        /// The volume to snapshot (name or id).
        #[arg(long)]
        volume: String,
    },
    /// Every snapshot, or those of one volume (oldest first: its chain).
    List {
        /// Only the snapshots of this volume (name or id; also a deleted volume's id).
        #[arg(long)]
        volume: Option<String>,
    },
    /// One snapshot: its source, cut, sizes and the restores still copying from it.
    Get {
        /// Snapshot name or id.
        snapshot: String,
    },
    /// Delete a snapshot; the space only it held is freed in the background.
    Delete {
        /// Snapshot name or id.
        snapshot: String,
    },
    /// Group snapshots: one consistent cut across several volumes.
    #[command(subcommand)]
    Group(GroupCmd),
}

#[derive(Debug, Subcommand)]
pub enum GroupCmd {
    /// Snapshot several volumes at one point (all or nothing).
    Create {
        /// Group snapshot name (not a uuid; at most 253 characters, no '/').
        name: String,
        /// A volume of the group (name or id; repeat for each).
        #[arg(long = "volume", required = true, value_name = "VOLUME")]
        volumes: Vec<String>,
    },
    /// One group snapshot and its member snapshots.
    Get {
        /// Group snapshot name or id.
        group: String,
    },
    /// Delete a group snapshot with all its member snapshots.
    Delete {
        /// Group snapshot name or id.
        group: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Kind {
    Block,
    File,
}

#[derive(Debug, Args)]
pub struct AttachArgs {
    /// Volume name or id.
    pub volume: String,
    /// Take the attachment from another node (that node's writes are fenced).
    #[arg(long)]
    pub force: bool,
    /// Attach read-only.
    #[arg(long)]
    pub readonly: bool,
    /// Device frontend (auto: the daemon's --frontend).
    #[arg(long, value_enum, default_value_t = FrontendArg::Auto)]
    pub frontend: FrontendArg,
    #[command(flatten)]
    pub socket: NodeSocketArg,
}

#[derive(Debug, Args)]
pub struct MountArgs {
    /// File volume name or id.
    pub volume: String,
    /// Mount point (created if missing; relative paths are taken from the current directory).
    pub path: PathBuf,
    /// Mount read-only.
    #[arg(long)]
    pub readonly: bool,
    #[command(flatten)]
    pub socket: NodeSocketArg,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FrontendArg {
    Auto,
    KernelNbd,
    FuseLoop,
}

#[derive(Debug, Clone, Args)]
pub struct NodeSocketArg {
    /// Unix socket of this node's volumed (default: the dev-cluster node
    /// whose API is the endpoint; in a pod: /run/volumed/volumed.sock).
    #[arg(long, env = "VOLUMED_LOCAL_SOCKET", value_name = "PATH")]
    pub node_socket: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum DevCmd {
    /// Start (or restart) a local cluster of volumed processes.
    Up(UpArgs),
    /// Stop the local cluster and remove its state.
    Down(DownArgs),
}

#[derive(Debug, Clone, Args)]
pub struct UpArgs {
    /// Number of nodes [default: 3, or the size of the existing cluster].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=200))]
    pub nodes: Option<u32>,
    /// How long a node may be unreachable before its replicas are rebuilt elsewhere.
    #[arg(long, value_parser = units::checked_duration_text, default_value = "5m")]
    pub node_down_grace: String,
    /// The volumed binary [default: `volumed` next to volctl, else on PATH].
    #[arg(long, env = "VOLUMED_BIN", value_name = "PATH")]
    pub volumed_bin: Option<PathBuf>,
    /// Zone labels assigned to the nodes round robin (comma-separated), e.g. a,b,c.
    #[arg(long, value_delimiter = ',', value_name = "ZONES")]
    pub zones: Vec<String>,
    /// Give up when the cluster has not formed after this long.
    #[arg(long, value_parser = units::parse_duration, default_value = "120s")]
    pub timeout: Duration,
    /// Address of node-1; node i listens on this address + (i-1). Change it
    /// to run two dev clusters side by side.
    #[arg(long, default_value = "127.0.0.2")]
    pub first_ip: Ipv4Addr,
    /// gRPC port of every node.
    #[arg(long, default_value_t = 7400)]
    pub api_port: u16,
    /// NBD port of every node.
    #[arg(long, default_value_t = 10809)]
    pub nbd_port: u16,
    /// The csi-controller binary [default: next to volctl, else on PATH].
    #[arg(long, env = "CSI_CONTROLLER_BIN", value_name = "PATH")]
    pub csi_controller_bin: Option<PathBuf>,
    /// The csi-node binary [default: next to volctl, else on PATH].
    #[arg(long, env = "CSI_NODE_BIN", value_name = "PATH")]
    pub csi_node_bin: Option<PathBuf>,
    /// Start only volumed, without the CSI plugins (one csi-controller, one
    /// csi-node per node).
    #[arg(long)]
    pub no_csi: bool,
}

#[derive(Debug, Clone, Args)]
pub struct DownArgs {
    /// Stop the processes but keep data, logs and cluster.json (`dev up` restarts them).
    #[arg(long)]
    pub keep_data: bool,
}

fn parse_param(s: &str) -> Result<(String, String), String> {
    let (k, v) = s.split_once('=').ok_or_else(|| format!("{s:?} is not KEY=VALUE"))?;
    let k = k.trim();
    if k.is_empty() {
        return Err(format!("{s:?} has an empty key"));
    }
    Ok((k.to_string(), v.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::error::ErrorKind;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("volctl").chain(args.iter().copied()))
    }

    #[test]
    fn the_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn global_flags_go_before_or_after_the_command() {
        let c = parse(&["--output", "json", "node", "list"]).unwrap();
        assert_eq!(c.output, Output::Json);
        assert!(matches!(c.command, Command::Node(NodeCmd::List)));
        let c = parse(&["volume", "list", "-o", "json", "--endpoint", "http://10.0.0.1:7400"]).unwrap();
        assert_eq!(c.output, Output::Json);
        assert_eq!(c.endpoint.as_deref(), Some("http://10.0.0.1:7400"));
        let c = parse(&["dev", "up", "--state-dir", "/tmp/x"]).unwrap();
        assert_eq!(c.state_dir, PathBuf::from("/tmp/x"));
    }

    #[test]
    fn create_parses_sizes_params_and_kinds() {
        let c = parse(&[
            "volume",
            "create",
            "v1",
            "--size",
            "1Gi",
            "--replicas",
            "2",
            "--kind",
            "file",
            "--param",
            "fsType=xfs",
            "--param",
            "a=b=c",
            "--spread-zones",
        ])
        .unwrap();
        let Command::Volume(VolumeCmd::Create(a)) = c.command else { panic!("not create") };
        assert_eq!(a.name, "v1");
        assert_eq!(a.size, Some(1 << 30));
        assert_eq!(a.replicas, Some(2));
        assert_eq!(a.kind, Kind::File);
        assert_eq!(a.params, vec![("fsType".into(), "xfs".into()), ("a".into(), "b=c".into())]);
        assert!(a.spread_zones);
    }

    #[test]
    fn create_from_a_source_needs_no_size() {
        let c = parse(&["volume", "create", "r", "--from-snapshot", "s1", "--no-wait"]).unwrap();
        let Command::Volume(VolumeCmd::Create(a)) = c.command else { panic!("not create") };
        assert_eq!((a.size, a.from_snapshot.as_deref(), a.no_wait), (None, Some("s1"), true));
        let c = parse(&["volume", "create", "c", "--from-volume", "v1", "--size", "2Gi"]).unwrap();
        let Command::Volume(VolumeCmd::Create(a)) = c.command else { panic!("not create") };
        assert_eq!((a.size, a.from_volume.as_deref()), (Some(2 << 30), Some("v1")));
        let e = parse(&["volume", "create", "x", "--from-snapshot", "s", "--from-volume", "v"]).unwrap_err();
        assert_eq!(e.exit_code(), 2);
        assert!(e.to_string().contains("cannot be used with"), "{e}");
        let e = parse(&["volume", "create", "x", "--size", "1Gi", "--no-wait"]).unwrap_err();
        assert_eq!(e.exit_code(), 2);
    }

    #[test]
    fn snapshot_commands() {
        let c = parse(&["snapshot", "create", "s1", "--volume", "v1"]).unwrap();
        assert!(
            matches!(c.command, Command::Snapshot(SnapshotCmd::Create { ref name, ref volume }) if name == "s1" && volume == "v1")
        );
        let c = parse(&["snapshot", "list", "--volume", "v1", "-o", "json"]).unwrap();
        assert!(matches!(c.command, Command::Snapshot(SnapshotCmd::List { volume: Some(ref v) }) if v == "v1"));
        let c = parse(&["snapshot", "group", "create", "g", "--volume", "a", "--volume", "b"]).unwrap();
        let Command::Snapshot(SnapshotCmd::Group(GroupCmd::Create { name, volumes })) = c.command else {
            panic!("not group create")
        };
        assert_eq!((name.as_str(), volumes), ("g", vec!["a".to_string(), "b".to_string()]));
        for (args, needle) in [
            (&["snapshot", "create", "s1"][..], "--volume"),
            (&["snapshot", "group", "create", "g"], "--volume"),
            (&["snapshot", "get"], "<SNAPSHOT>"),
        ] {
            let e = parse(args).expect_err(&format!("{args:?} was accepted"));
            assert_eq!(e.exit_code(), 2, "{args:?}");
            assert!(e.to_string().contains(needle), "{args:?}: {e}");
        }
    }

    #[test]
    fn bad_arguments_are_usage_errors() {
        for (args, needle) in [
            (&["volume", "create", "v", "--size", "lots"][..], "not a size"),
            (&["volume", "create", "v", "--size", "0"], "greater than 0"),
            (&["volume", "create", "v"], "--size"),
            (&["volume", "create", "v", "--size", "1Gi", "--replicas", "0"], "0"),
            (&["volume", "create", "v", "--size", "1Gi", "--param", "novalue"], "KEY=VALUE"),
            (&["volume", "create", "v", "--size", "1Gi", "--kind", "tape"], "tape"),
            (&["volume", "resize", "v", "--size", "10Qi"], "unknown size unit"),
            (&["volume", "attach", "v", "--frontend", "iscsi"], "iscsi"),
            (&["dev", "up", "--node-down-grace", "soon"], "not a duration"),
            (&["dev", "up", "--nodes", "0"], "0"),
            (&["-o", "yaml", "node", "list"], "yaml"),
            (&["no-such-command"], "no-such-command"),
        ] {
            let e = parse(args).expect_err(&format!("{args:?} was accepted"));
            assert_eq!(e.exit_code(), 2, "{args:?}");
            assert!(e.to_string().contains(needle), "{args:?}: {e}");
        }
    }

    #[test]
    fn help_after_arguments_exits_zero() {
        for args in [
            &["--output", "json", "node", "list", "--help"][..],
            &["node", "remove", "node-a", "--help"],
            &["--endpoint", "http://127.0.0.1:1", "cluster", "status", "--help"],
            &["volume", "list", "--help"],
            &["snapshot", "group", "delete", "g", "--help"],
        ] {
            let e = parse(args).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::DisplayHelp, "{args:?}");
            assert_eq!(e.exit_code(), 0);
        }
    }

    #[test]
    fn dev_up_defaults() {
        let c = parse(&["dev", "up"]).unwrap();
        let Command::Dev(DevCmd::Up(a)) = c.command else { panic!("not dev up") };
        assert_eq!(a.nodes, None);
        assert_eq!(a.node_down_grace, "5m");
        assert_eq!(a.timeout, Duration::from_secs(120));
        assert_eq!(a.first_ip, Ipv4Addr::new(127, 0, 0, 2));
        assert_eq!((a.api_port, a.nbd_port), (7400, 10809));
        let c = parse(&["dev", "up", "--zones", "a,b,c", "--nodes", "5", "--timeout", "3m"]).unwrap();
        let Command::Dev(DevCmd::Up(a)) = c.command else { panic!("not dev up") };
        assert_eq!(a.zones, vec!["a", "b", "c"]);
        assert_eq!(a.nodes, Some(5));
        assert_eq!(a.timeout, Duration::from_secs(180));
    }

    #[test]
    fn attach_flags() {
        let c = parse(&[
            "volume",
            "attach",
            "v",
            "--force",
            "--readonly",
            "--frontend",
            "fuse-loop",
            "--node-socket",
            "/s",
        ])
        .unwrap();
        let Command::Volume(VolumeCmd::Attach(a)) = c.command else { panic!("not attach") };
        assert!(a.force && a.readonly);
        assert_eq!(a.frontend, FrontendArg::FuseLoop);
        assert_eq!(a.socket.node_socket, Some(PathBuf::from("/s")));
    }
}
