//! Running a volumed node: listeners, background loops, clean shutdown.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};
use tonic::transport::Server;
use tracing::{error, info, Instrument};
use volumed_proto::volumed::v1::admin_server::AdminServer;
use volumed_proto::volumed::v1::node_local_server::NodeLocalServer;
use volumed_proto::volumed::v1::raft_transport_server::RaftTransportServer;

use crate::api::admin::AdminService;
use crate::api::node_local::{self, NodeLocalService};
use crate::api::transport::TransportService;
use crate::attach::AttachManager;
use crate::cluster::exports::Exports;
use crate::cluster::node::NodeRuntime;
use crate::cluster::{bootstrap, heartbeat, replicas, snapshots};
use crate::config::NodeConfig;
use crate::raft::network::MAX_PEER_MESSAGE;

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: String, source: std::io::Error },
    #[error(transparent)]
    Node(#[from] crate::cluster::node::NodeError),
    #[error("signal handler: {0}")]
    Signal(std::io::Error),
    #[error(transparent)]
    LocalSocket(#[from] node_local::SocketError),
}

pub async fn run(config: NodeConfig) -> Result<(), DaemonError> {
    let span = tracing::info_span!("volumed", node = config.node_id, name = %config.node_name);
    async move {
        let grpc_listener = TcpListener::bind(config.listen)
            .await
            .map_err(|source| DaemonError::Listen { addr: config.listen.to_string(), source })?;
        let nbd_listener = TcpListener::bind(config.nbd_listen)
            .await
            .map_err(|source| DaemonError::Listen { addr: config.nbd_listen.to_string(), source })?;
        let local_listener = node_local::bind(&config.local_socket)?;
        let mut sigterm = signal(SignalKind::terminate()).map_err(DaemonError::Signal)?;
        let mut sigint = signal(SignalKind::interrupt()).map_err(DaemonError::Signal)?;

        let node = NodeRuntime::open(config.clone()).await?;
        info!(listen = %config.listen, advertise = %config.advertise, nbd = %config.nbd_advertise, "volumed starting");

        let (health_reporter, health_service) = tonic_health::server::health_reporter();
        health_reporter.set_service_status("", tonic_health::ServingStatus::Serving).await;
        let mut stop = node.shutdown.subscribe();
        let grpc = Server::builder()
            .tcp_nodelay(true)
            .http2_keepalive_interval(Some(Duration::from_secs(10)))
            // The receiving side's windows bound how much of an AppendEntries
            // (up to 8 entries of 1 MiB) or a snapshot stream is in flight
            // before the sender waits for a WINDOW_UPDATE; hyper's default
            // is 1 MiB per connection. Same sizes as the client side
            // (raft::network::peer_endpoint).
            .initial_stream_window_size(Some(8 << 20))
            .initial_connection_window_size(Some(32 << 20))
            .add_service(health_service)
            .add_service(
                RaftTransportServer::new(TransportService::new(node.clone()))
                    .max_decoding_message_size(MAX_PEER_MESSAGE)
                    .max_encoding_message_size(MAX_PEER_MESSAGE),
            )
            .add_service(
                AdminServer::new(AdminService::new(node.clone()))
                    .max_decoding_message_size(MAX_PEER_MESSAGE)
                    .max_encoding_message_size(MAX_PEER_MESSAGE),
            )
            .serve_with_incoming_shutdown(
                // The builder's tcp_nodelay applies only to listeners tonic
                // binds itself; without it small Raft replies wait out
                // Nagle + delayed ACK (a ~40 ms tail on every replicated write).
                tonic::transport::server::TcpIncoming::from(grpc_listener).with_nodelay(Some(true)),
                async move {
                    let _ = stop.changed().await;
                },
            );
        let grpc_task = tokio::spawn(async move {
            if let Err(e) = grpc.await {
                error!(error = %e, "gRPC server failed");
            }
        });

        let mut stop = node.shutdown.subscribe();
        let nbd_task = tokio::spawn(volumed_nbd::server::serve(
            nbd_listener,
            Exports::new(&node),
            volumed_nbd::server::ServerOptions::default(),
            async move {
                let _ = stop.changed().await;
            },
        ));

        // Devices of the last run are cleaned up before anyone can attach.
        let attachments = AttachManager::start(node.clone()).await;
        let mounts = crate::file::mounts::MountManager::start(node.clone()).await;
        let local_api = NodeLocalService::new(node.clone(), attachments.clone(), mounts.clone());
        let mut stop = node.shutdown.subscribe();
        let local = Server::builder().add_service(NodeLocalServer::new(local_api)).serve_with_incoming_shutdown(
            tokio_stream::wrappers::UnixListenerStream::new(local_listener),
            async move {
                let _ = stop.changed().await;
            },
        );
        let local_task = tokio::spawn(async move {
            if let Err(e) = local.await {
                error!(error = %e, "node-local API server failed");
            }
        });
        info!(socket = %config.local_socket.display(), "node-local API listening");

        tokio::spawn(bootstrap::run(node.clone()).in_current_span());
        tokio::spawn(replicas::run(node.clone()).in_current_span());
        tokio::spawn(heartbeat::run(node.clone()).in_current_span());
        tokio::spawn(snapshots::run(node.clone()).in_current_span());
        tokio::spawn(node.catalog.clone().run_reconciler(node.shutdown.subscribe()).in_current_span());

        tokio::select! {
            _ = sigterm.recv() => info!("SIGTERM: shutting down"),
            _ = sigint.recv() => info!("SIGINT: shutting down"),
        }
        // Buffered writes of file mounts first, while the volumes' leaders
        // (maybe this node) still answer.
        if tokio::time::timeout(Duration::from_secs(15), mounts.shutdown()).await.is_err() {
            error!("storing buffered writes of file mounts timed out");
        }
        // Devices next: they may use this node's NBD server and replicas.
        if tokio::time::timeout(Duration::from_secs(30), attachments.shutdown()).await.is_err() {
            error!("releasing attached devices timed out");
        }
        shutdown(node, grpc_task, nbd_task).await;
        let _ = tokio::time::timeout(Duration::from_secs(5), local_task).await;
        let _ = std::fs::remove_file(&config.local_socket);
        Ok(())
    }
    .instrument(span)
    .await
}

async fn shutdown(node: Arc<NodeRuntime>, grpc: tokio::task::JoinHandle<()>, nbd: tokio::task::JoinHandle<()>) {
    // Stop taking requests first (NBD drains in-flight requests), then stop
    // the Raft groups, then make the WAL durable.
    let _ = node.shutdown.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(10), nbd).await;
    let _ = tokio::time::timeout(Duration::from_secs(5), grpc).await;
    node.stop().await;
    info!("volumed stopped");
}
