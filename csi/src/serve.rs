//! Endpoints, unix-socket serving (with stale-socket removal) and client
//! channels over unix sockets.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::net::{UnixListener, UnixStream};
use tokio_stream::wrappers::UnixListenerStream;
use tonic::transport::server::Router;
use tonic::transport::{Channel, Uri};

/// Where a gRPC server listens or a client connects.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(into = "String")]
pub enum Endpoint {
    /// `unix:///abs/path` (also accepted: `unix:/abs/path`, a bare `/abs/path`).
    Unix(PathBuf),
    /// `tcp://127.0.0.1:port` (also `http://`), for tools and tests.
    Tcp(SocketAddr),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("endpoint \"{input}\": {reason}")]
pub struct EndpointError {
    pub input: String,
    pub reason: String,
}

impl FromStr for Endpoint {
    type Err = EndpointError;

    fn from_str(s: &str) -> Result<Endpoint, EndpointError> {
        let err = |reason: &str| EndpointError { input: s.to_string(), reason: reason.to_string() };
        let unix_path = if let Some(rest) = s.strip_prefix("unix://") {
            Some(rest)
        } else if let Some(rest) = s.strip_prefix("unix:") {
            Some(rest)
        } else if s.starts_with('/') {
            Some(s)
        } else {
            None
        };
        if let Some(p) = unix_path {
            if !p.starts_with('/') {
                return Err(err("a unix socket path must be absolute (unix:///path/to/csi.sock)"));
            }
            if p.len() > 107 {
                return Err(err("a unix socket path must be shorter than 108 bytes"));
            }
            return Ok(Endpoint::Unix(PathBuf::from(p)));
        }
        let addr = s
            .strip_prefix("tcp://")
            .or_else(|| s.strip_prefix("http://"))
            .ok_or_else(|| err("expected unix:///path or tcp://ip:port"))?;
        let addr = addr.trim_end_matches('/');
        addr.parse::<SocketAddr>().map(Endpoint::Tcp).map_err(|_| err("expected tcp://ip:port with a numeric address"))
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Unix(p) => write!(f, "unix://{}", p.display()),
            Endpoint::Tcp(a) => write!(f, "tcp://{a}"),
        }
    }
}

impl From<Endpoint> for String {
    fn from(e: Endpoint) -> String {
        e.to_string()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("socket {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("socket {0} is in use: another process is serving on it")]
    InUse(PathBuf),
    #[error("{0} exists and is not a socket; refusing to remove it")]
    NotSocket(PathBuf),
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Binds a unix socket, removing a stale one left by a crashed process.
/// A socket someone still answers on is never taken over, and a path that
/// is not a socket is never deleted.
pub fn bind_unix(path: &Path) -> Result<UnixListener, ServeError> {
    let io_err = |source| ServeError::Io { path: path.to_path_buf(), source };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io_err)?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => return Err(ServeError::InUse(path.to_path_buf())),
            Err(_) => {
                tracing::info!(path = %path.display(), "removing stale socket");
                match std::fs::remove_file(path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(io_err(e)),
                }
            }
        },
        Ok(_) => return Err(ServeError::NotSocket(path.to_path_buf())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(e)),
    }
    UnixListener::bind(path).map_err(io_err)
}

/// Serves `router` on `endpoint` until `shutdown` resolves; the socket file
/// is removed afterwards.
pub async fn serve(
    router: Router,
    endpoint: &Endpoint,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    match endpoint {
        Endpoint::Unix(path) => {
            let listener = bind_unix(path)?;
            tracing::info!(endpoint = %endpoint, "serving");
            let res = router.serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown).await;
            let _ = std::fs::remove_file(path);
            res.map_err(ServeError::from)
        }
        Endpoint::Tcp(addr) => {
            tracing::info!(endpoint = %endpoint, "serving");
            router.serve_with_shutdown(*addr, shutdown).await.map_err(ServeError::from)
        }
    }
}

/// A channel that connects on first use (and reconnects after failures).
pub fn channel(endpoint: &Endpoint) -> Channel {
    match endpoint {
        Endpoint::Unix(path) => {
            let path = path.clone();
            // The authority is never used for a unix socket; tonic needs one.
            tonic::transport::Endpoint::from_static("http://localhost")
                .connect_timeout(std::time::Duration::from_secs(5))
                .connect_with_connector_lazy(tower::service_fn(move |_: Uri| {
                    let path = path.clone();
                    async move { Ok::<_, io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
                }))
        }
        Endpoint::Tcp(addr) => {
            let uri = format!("http://{addr}");
            match tonic::transport::Endpoint::from_shared(uri) {
                Ok(ep) => ep.connect_timeout(std::time::Duration::from_secs(5)).connect_lazy(),
                // A SocketAddr always renders as a valid authority.
                Err(_) => unreachable_channel(),
            }
        }
    }
}

fn unreachable_channel() -> Channel {
    tonic::transport::Endpoint::from_static("http://127.0.0.1:1").connect_lazy()
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    match (term, int) {
        (Ok(mut t), Ok(mut i)) => {
            tokio::select! {
                _ = t.recv() => {}
                _ = i.recv() => {}
            }
        }
        // Without signal handlers there is nothing to wait for but the end.
        _ => std::future::pending::<()>().await,
    }
    tracing::info!("shutting down");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse() {
        assert_eq!("unix:///csi/csi.sock".parse::<Endpoint>().unwrap(), Endpoint::Unix("/csi/csi.sock".into()));
        assert_eq!("unix:/csi/csi.sock".parse::<Endpoint>().unwrap(), Endpoint::Unix("/csi/csi.sock".into()));
        assert_eq!("/run/x.sock".parse::<Endpoint>().unwrap(), Endpoint::Unix("/run/x.sock".into()));
        assert_eq!(
            "tcp://127.0.0.1:9000".parse::<Endpoint>().unwrap(),
            Endpoint::Tcp("127.0.0.1:9000".parse().unwrap())
        );
        assert_eq!(
            "http://127.0.0.1:9000/".parse::<Endpoint>().unwrap(),
            Endpoint::Tcp("127.0.0.1:9000".parse().unwrap())
        );
        for bad in ["unix://relative.sock", "csi.sock", "tcp://localhost:1", "ftp://x", ""] {
            assert!(bad.parse::<Endpoint>().is_err(), "{bad}");
        }
        let long = format!("unix:///{}", "a".repeat(120));
        assert!(long.parse::<Endpoint>().is_err());
        assert_eq!(Endpoint::Unix("/a/b.sock".into()).to_string(), "unix:///a/b.sock");
    }

    #[tokio::test]
    async fn stale_socket_is_replaced_live_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/csi.sock");
        // A live listener: refused.
        let live = bind_unix(&path).unwrap();
        assert!(matches!(bind_unix(&path), Err(ServeError::InUse(_))));
        drop(live);
        // The socket file outlives the listener: stale, replaced.
        assert!(path.exists());
        let again = bind_unix(&path).unwrap();
        drop(again);
        // A regular file is never removed.
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, b"data").unwrap();
        assert!(matches!(bind_unix(&path), Err(ServeError::NotSocket(_))));
        assert_eq!(std::fs::read(&path).unwrap(), b"data");
    }
}
