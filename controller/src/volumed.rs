//! The volumed admin API with fail-over over several addresses.
//!
//! Any volumed answers admin calls (non-leaders forward writes), so the
//! controller keeps a list and moves to the next address when one is
//! UNAVAILABLE. The address that answered last is tried first next time.

use std::fmt;
use std::future::Future;
use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde::Serialize;
use tonic::transport::Channel;
use tonic::{Code, Response, Status};
use volumed_csi::identity::Readiness;
use volumed_csi::serve::{self, Endpoint};
use volumed_proto::volumed::v1::admin_client::AdminClient;
use volumed_proto::volumed::v1::ClusterStatusRequest;

/// One volumed admin address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(into = "String")]
pub enum VolumedUrl {
    /// `http://host:port` (a bare `host:port` means the same).
    Http(String),
    Unix(std::path::PathBuf),
}

impl FromStr for VolumedUrl {
    type Err = String;

    fn from_str(s: &str) -> Result<VolumedUrl, String> {
        if s.starts_with("unix:") {
            return match s.parse::<Endpoint>() {
                Ok(Endpoint::Unix(p)) => Ok(VolumedUrl::Unix(p)),
                Ok(_) => Err(format!("\"{s}\" is not a unix socket address")),
                Err(e) => Err(e.to_string()),
            };
        }
        let hostport = s.strip_prefix("http://").unwrap_or(s).trim_end_matches('/');
        if hostport.contains("://") {
            return Err(format!("\"{s}\": expected host:port, http://host:port or unix:///path"));
        }
        let (host, port) = hostport.rsplit_once(':').ok_or_else(|| format!("\"{s}\": missing :port"))?;
        let host_ok = !host.is_empty()
            && (host.starts_with('[') && host.ends_with(']')
                || host.chars().all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-'));
        if !host_ok || port.parse::<u16>().is_err() {
            return Err(format!("\"{s}\": expected host:port, http://host:port or unix:///path"));
        }
        Ok(VolumedUrl::Http(format!("http://{hostport}")))
    }
}

impl fmt::Display for VolumedUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VolumedUrl::Http(u) => f.write_str(u),
            VolumedUrl::Unix(p) => write!(f, "unix://{}", p.display()),
        }
    }
}

impl From<VolumedUrl> for String {
    fn from(u: VolumedUrl) -> String {
        u.to_string()
    }
}

/// Per-call deadline towards volumed; the CO retries on DEADLINE_EXCEEDED.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

pub(crate) fn channel(url: &VolumedUrl) -> Channel {
    match url {
        VolumedUrl::Unix(p) => serve::channel(&Endpoint::Unix(p.clone())),
        VolumedUrl::Http(u) => match tonic::transport::Endpoint::from_shared(u.clone()) {
            Ok(ep) => ep.connect_timeout(Duration::from_secs(5)).timeout(CALL_TIMEOUT).connect_lazy(),
            // Validated by FromStr; an unusable address fails every call.
            Err(_) => serve::channel(&Endpoint::Unix("/nonexistent/volumed.sock".into())),
        },
    }
}

pub struct Volumed {
    clients: Vec<(VolumedUrl, AdminClient<Channel>)>,
    preferred: AtomicUsize,
}

/// Whether to try the next address: the node is down or has no catalog
/// leader right now.
fn should_fail_over(s: &Status) -> bool {
    match s.code() {
        Code::Unavailable => true,
        Code::Unknown | Code::Cancelled => s.message().contains("transport"),
        _ => false,
    }
}

impl Volumed {
    pub fn new(urls: &[VolumedUrl]) -> Volumed {
        Volumed {
            clients: urls.iter().map(|u| (u.clone(), AdminClient::new(channel(u)))).collect(),
            preferred: AtomicUsize::new(0),
        }
    }

    /// Runs `op` against the addresses in turn until one answers with
    /// anything but UNAVAILABLE.
    pub async fn call<T, F, Fut>(&self, what: &str, op: F) -> Result<T, Status>
    where
        F: Fn(AdminClient<Channel>) -> Fut,
        Fut: Future<Output = Result<Response<T>, Status>>,
    {
        let n = self.clients.len();
        let start = self.preferred.load(Ordering::Relaxed);
        let mut last = None;
        for i in 0..n {
            let idx = (start + i) % n;
            let (url, client) = &self.clients[idx];
            match op(client.clone()).await {
                Ok(r) => {
                    self.preferred.store(idx, Ordering::Relaxed);
                    return Ok(r.into_inner());
                }
                Err(s) if should_fail_over(&s) => {
                    tracing::warn!(volumed = %url, call = what, error = %s.message(), "volumed unavailable, trying the next address");
                    last = Some(s);
                }
                Err(s) => return Err(s),
            }
        }
        Err(match last {
            Some(s) => Status::unavailable(format!(
                "{what}: no volumed answered ({n} address(es) tried); last error: {}",
                s.message()
            )),
            None => Status::unavailable(format!("{what}: no volumed address configured")),
        })
    }
}

#[tonic::async_trait]
impl Readiness for Volumed {
    async fn check(&self) -> Result<(), String> {
        let st = self
            .call("ClusterStatus", |mut c| async move { c.cluster_status(ClusterStatusRequest {}).await })
            .await
            .map_err(|s| format!("volumed: {}", s.message()))?;
        if st.ready {
            Ok(())
        } else {
            Err(format!("volumed node {} has no catalog leader or has not applied its state yet", st.answered_by))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!("127.0.0.1:7001".parse::<VolumedUrl>().unwrap(), VolumedUrl::Http("http://127.0.0.1:7001".into()));
        assert_eq!(
            "http://volumed.svc:7001/".parse::<VolumedUrl>().unwrap(),
            VolumedUrl::Http("http://volumed.svc:7001".into())
        );
        assert_eq!("[::1]:7001".parse::<VolumedUrl>().unwrap(), VolumedUrl::Http("http://[::1]:7001".into()));
        assert_eq!(
            "unix:///run/volumed/admin.sock".parse::<VolumedUrl>().unwrap(),
            VolumedUrl::Unix("/run/volumed/admin.sock".into())
        );
        for bad in ["", "host", "host:port", "https://h:1", "h:99999", "a b:1", "unix://rel"] {
            assert!(bad.parse::<VolumedUrl>().is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn fails_over_and_reports_unavailable() {
        // Two addresses nobody listens on (port 1 on loopback refuses).
        let v = Volumed::new(&["127.0.0.1:1".parse().unwrap(), "unix:///nonexistent/volumed.sock".parse().unwrap()]);
        let tried = std::sync::atomic::AtomicUsize::new(0);
        let err = v
            .call("ClusterStatus", |mut c| {
                tried.fetch_add(1, Ordering::Relaxed);
                async move { c.cluster_status(ClusterStatusRequest {}).await }
            })
            .await
            .unwrap_err();
        assert_eq!(tried.load(Ordering::Relaxed), 2, "both addresses tried");
        assert_eq!(err.code(), Code::Unavailable);
        assert!(err.message().contains("2 address(es) tried"), "{}", err.message());
        assert!(v.check().await.is_err());
    }
}
