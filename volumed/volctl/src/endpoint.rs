//! Which volumed to talk to, and the gRPC channels to it: the Admin API over
//! TCP and the node-local API over a unix socket.

use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};
use volumed_proto::volumed::v1::admin_client::AdminClient;
use volumed_proto::volumed::v1::node_local_client::NodeLocalClient;

use crate::error::{chain, CliError};
use crate::state::ClusterFile;

/// Volume listings of large clusters exceed tonic's 4 MiB default.
pub const MAX_MESSAGE: usize = 64 << 20;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const PROBE_TIMEOUT: Duration = Duration::from_millis(500);

/// `http://host:port` from what the user typed (`host:port` is accepted).
pub fn normalize(input: &str) -> Result<String, CliError> {
    let bad = |reason: &str| CliError::BadEndpoint { endpoint: input.to_string(), reason: reason.to_string() };
    let s = input.trim();
    if s.is_empty() {
        return Err(bad("it is empty"));
    }
    if s.starts_with("https://") {
        return Err(bad("TLS is not supported; volumed serves plain HTTP/2"));
    }
    let with_scheme = if s.contains("://") { s.to_string() } else { format!("http://{s}") };
    let uri: Uri = with_scheme.parse().map_err(|e: <Uri as std::str::FromStr>::Err| bad(&e.to_string()))?;
    if uri.scheme_str() != Some("http") {
        return Err(bad("the scheme must be http"));
    }
    let authority = uri.authority().ok_or_else(|| bad("no host"))?;
    if authority.port_u16().is_none() {
        return Err(bad("no port (volumed listens on 7400 by default)"));
    }
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err(bad("it must not have a path"));
    }
    Ok(format!("http://{authority}"))
}

/// `host:port` of a normalized endpoint.
fn authority(url: &str) -> &str {
    url.strip_prefix("http://").unwrap_or(url)
}

/// --endpoint / $VOLUMED_ENDPOINT, else the first reachable node of the dev
/// cluster in `state_dir`.
pub fn resolve(given: Option<&str>, state_dir: &Path) -> Result<String, CliError> {
    if let Some(e) = given.filter(|e| !e.trim().is_empty()) {
        return normalize(e);
    }
    let Some(cluster) = ClusterFile::load(state_dir)? else {
        return Err(CliError::NoEndpoint {
            reason: format!(
                "no --endpoint, no VOLUMED_ENDPOINT, and no dev cluster in {}; start one with `volctl dev up`, \
                 or pass --endpoint http://HOST:7400",
                state_dir.display()
            ),
        });
    };
    let mut tried = Vec::new();
    for node in &cluster.volumed {
        let Ok(url) = normalize(&node.api) else {
            continue;
        };
        if reachable(authority(&url)) {
            return Ok(url);
        }
        tried.push(url);
    }
    Err(CliError::NoEndpoint {
        reason: if tried.is_empty() {
            format!(
                "{} lists no volumed; start a cluster with `volctl dev up`, or pass --endpoint http://HOST:7400",
                crate::state::path_in(state_dir).display()
            )
        } else {
            format!(
                "none of the volumed in {} answers ({}); restart them with `volctl dev up`, or pass \
                 --endpoint http://HOST:7400",
                crate::state::path_in(state_dir).display(),
                tried.join(", ")
            )
        },
    })
}

fn reachable(hostport: &str) -> bool {
    let addrs: Vec<SocketAddr> = match hostport.to_socket_addrs() {
        Ok(a) => a.collect(),
        Err(_) => return false,
    };
    addrs.iter().any(|a| TcpStream::connect_timeout(a, PROBE_TIMEOUT).is_ok())
}

/// The node socket for local calls: --node-socket, else the dev-cluster node
/// whose API is the endpoint.
pub fn resolve_node_socket(
    given: Option<&Path>,
    endpoint: Option<&str>,
    state_dir: &Path,
) -> Result<PathBuf, CliError> {
    if let Some(p) = given {
        return Ok(p.to_path_buf());
    }
    let url = match resolve(endpoint, state_dir) {
        Ok(u) => u,
        Err(CliError::NoEndpoint { reason }) => {
            return Err(CliError::NoNodeSocket { endpoint: "this node".into(), reason });
        }
        Err(e) => return Err(e),
    };
    let cluster = ClusterFile::load(state_dir)?;
    let found = cluster
        .iter()
        .flat_map(|c| c.volumed.iter())
        .find(|n| normalize(&n.api).is_ok_and(|api| api == url))
        .map(|n| n.local_socket.clone());
    found.ok_or_else(|| CliError::NoNodeSocket {
        reason: format!("it is not a node of the dev cluster in {}", state_dir.display()),
        endpoint: url,
    })
}

/// A connected Admin client (connection problems are reported here, not on
/// the first call).
pub async fn admin(url: &str) -> Result<AdminClient<Channel>, CliError> {
    let endpoint = Endpoint::from_shared(url.to_string())
        .map_err(|e| CliError::BadEndpoint { endpoint: url.to_string(), reason: chain(&e) })?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(20));
    let channel =
        endpoint.connect().await.map_err(|e| CliError::Unreachable { endpoint: url.to_string(), detail: chain(&e) })?;
    Ok(AdminClient::new(channel).max_decoding_message_size(MAX_MESSAGE).max_encoding_message_size(MAX_MESSAGE))
}

/// A gRPC channel over a unix socket, connected now.
pub async fn unix_channel(socket: &Path) -> Result<Channel, tonic::transport::Error> {
    let path = socket.to_path_buf();
    // The authority is never used on a unix socket, but HTTP/2 needs one.
    Endpoint::from_static("http://localhost")
        .connect_timeout(CONNECT_TIMEOUT)
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
        }))
        .await
}

/// A connected NodeLocal client over the node's unix socket.
pub async fn node_local(socket: &Path) -> Result<NodeLocalClient<Channel>, CliError> {
    let channel = unix_channel(socket)
        .await
        .map_err(|e| CliError::NodeSocketUnreachable { socket: socket.to_path_buf(), detail: chain(&e) })?;
    Ok(NodeLocalClient::new(channel).max_decoding_message_size(MAX_MESSAGE).max_encoding_message_size(MAX_MESSAGE))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::tests::entry;
    use std::net::TcpListener;

    #[test]
    fn endpoints_are_normalized() {
        assert_eq!(normalize("http://127.0.0.2:7400").unwrap(), "http://127.0.0.2:7400");
        assert_eq!(normalize("http://127.0.0.2:7400/").unwrap(), "http://127.0.0.2:7400");
        assert_eq!(normalize("10.0.0.5:7400").unwrap(), "http://10.0.0.5:7400");
        assert_eq!(
            normalize("http://volumed-api.volumed-system.svc.cluster.local:7400").unwrap(),
            "http://volumed-api.volumed-system.svc.cluster.local:7400"
        );
        for (bad, why) in [
            ("", "empty"),
            ("https://x:7400", "TLS"),
            ("http://x", "no port"),
            ("ftp://x:1", "scheme"),
            ("http://x:1/api", "path"),
            ("http://x y:1", "invalid"),
        ] {
            let e = normalize(bad).expect_err(bad).to_string();
            assert!(e.contains(why) && e.contains("http://HOST:PORT"), "{bad}: {e}");
        }
    }

    #[test]
    fn given_endpoint_wins_without_a_state_dir() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(resolve(Some("127.0.0.9:1"), dir.path()).unwrap(), "http://127.0.0.9:1");
    }

    #[test]
    fn no_endpoint_and_no_cluster_tells_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let e = resolve(None, dir.path()).unwrap_err().to_string();
        assert!(e.contains("volctl dev up") && e.contains("--endpoint"), "{e}");
        let e = resolve(Some("  "), dir.path()).unwrap_err().to_string();
        assert!(e.contains("volctl dev up"), "{e}");
    }

    #[test]
    fn first_reachable_node_of_the_cluster_file() {
        let dir = tempfile::tempdir().unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let live = format!("http://{}", listener.local_addr().unwrap());
        // Port 1 on loopback refuses at once.
        let dead = "http://127.0.0.1:1".to_string();
        let c = ClusterFile {
            volumed: vec![entry(1, &dead), entry(2, &live), entry(3, &dead)],
            state_dir: dir.path().into(),
            ..Default::default()
        };
        c.save(dir.path()).unwrap();
        assert_eq!(resolve(None, dir.path()).unwrap(), live);
        // The node socket of that node, or of the node named by --endpoint.
        assert_eq!(resolve_node_socket(None, None, dir.path()).unwrap(), PathBuf::from("/s/node-2/run/volumed.sock"));
        assert_eq!(
            resolve_node_socket(None, Some("127.0.0.1:1"), dir.path()).unwrap(),
            PathBuf::from("/s/node-1/run/volumed.sock")
        );
        assert_eq!(resolve_node_socket(Some(Path::new("/given")), None, dir.path()).unwrap(), PathBuf::from("/given"));
        let e = resolve_node_socket(None, Some("http://10.1.1.1:7400"), dir.path()).unwrap_err().to_string();
        assert!(e.contains("--node-socket") && e.contains("http://10.1.1.1:7400"), "{e}");

        drop(listener);
        let e = resolve(None, dir.path()).unwrap_err().to_string();
        assert!(e.contains("none of the volumed") && e.contains("volctl dev up"), "{e}");
        let e = resolve_node_socket(None, None, dir.path()).unwrap_err().to_string();
        assert!(e.contains("--node-socket"), "{e}");
    }

    #[tokio::test]
    async fn unreachable_endpoint_is_reported_on_connect() {
        let e = admin("http://127.0.0.1:1").await.unwrap_err().to_string();
        assert!(e.starts_with("cannot reach volumed at http://127.0.0.1:1: "), "{e}");
        assert!(e.contains("refused"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("none.sock");
        let e = node_local(&sock).await.unwrap_err().to_string();
        assert!(e.contains("cannot reach the node-local volumed") && e.contains("--node-socket"), "{e}");
        assert!(e.contains("No such file"), "{e}");
    }
}
