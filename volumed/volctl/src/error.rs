//! What can go wrong, as one-line messages that say what to do. gRPC status
//! codes are mapped here, at the edge, with the subject of the call.

use std::error::Error as _;
use std::path::PathBuf;

use tonic::{Code, Status};

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// `reason` ends with what to do.
    #[error("no volumed endpoint: {reason}")]
    NoEndpoint { reason: String },
    #[error("invalid endpoint {endpoint:?}: {reason} (expected http://HOST:PORT)")]
    BadEndpoint { endpoint: String, reason: String },
    #[error("cannot reach volumed at {endpoint}: {detail} (is the cluster up? `volctl dev up`, or check --endpoint)")]
    Unreachable { endpoint: String, detail: String },
    #[error(
        "cannot reach the node-local volumed at {}: {detail} (is volumed running on this node, and are you root? \
         pass --node-socket PATH)",
        socket.display()
    )]
    NodeSocketUnreachable { socket: PathBuf, detail: String },
    #[error(
        "no node socket for {endpoint}: {reason}; run volctl on that node and pass --node-socket PATH \
         (in a pod: /run/volumed/volumed.sock)"
    )]
    NoNodeSocket { endpoint: String, reason: String },
    /// A gRPC error, already phrased for the user.
    #[error("{message}")]
    Api { code: Code, message: String },
    #[error("{0}")]
    NotFound(String),
    #[error("{}: {source} (fix or delete the file; `volctl dev down` removes the state directory)", path.display())]
    StateFile {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// `volctl dev` problems, phrased by the caller.
    #[error("{0}")]
    Dev(String),
    /// The command ran and has a report, but found a problem the exit code
    /// must show: `output` goes to stdout, the message to stderr.
    #[error("{message}")]
    Failed { output: String, message: String },
}

impl CliError {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> CliError {
        CliError::Io { context: context.into(), source }
    }
}

/// What a call was about, for messages like "volume X not found".
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subject {
    Volume(String),
    Node(String),
    /// An existing snapshot (get, delete).
    Snapshot(String),
    /// A snapshot being taken of `volume`.
    NewSnapshot {
        snapshot: String,
        volume: String,
    },
    /// An existing group snapshot (get, delete).
    GroupSnapshot(String),
    /// A group snapshot being taken.
    NewGroupSnapshot(String),
    /// A new volume filled from `source` ("snapshot s1", "volume v1").
    Restore {
        volume: String,
        source: String,
    },
    Cluster,
}

/// Where the call went: the Admin API at a URL, or a node's unix socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Api(String),
    Socket(PathBuf),
}

impl Target {
    fn describe(&self) -> String {
        match self {
            Target::Api(url) => format!("volumed at {url}"),
            Target::Socket(p) => format!("the node-local volumed at {}", p.display()),
        }
    }
}

/// The full chain of an error, deduplicated ("transport error: tcp connect
/// error: Connection refused (os error 111)").
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        let s = err.to_string();
        if !s.is_empty() && !parts.iter().any(|p| p.contains(&s)) {
            parts.push(s);
        }
        cur = err.source();
    }
    one_line(&parts.join(": "))
}

fn one_line(s: &str) -> String {
    s.trim().replace(['\n', '\r'], "; ")
}

/// Maps a gRPC status to a message that says what went wrong and what to do.
pub fn from_status(status: &Status, target: &Target, subject: &Subject) -> CliError {
    let msg = one_line(status.message());
    let msg = if msg.is_empty() { status.code().description().to_string() } else { msg };
    let code = status.code();
    // A status made by the client's transport (connection refused, reset)
    // carries its cause as a source; one sent by the server does not.
    if let (Code::Unavailable, Some(source)) = (code, status.source()) {
        let cause = chain(source);
        let detail = if msg.contains(&cause) { msg } else { format!("{msg}: {cause}") };
        return match target {
            Target::Api(url) => CliError::Unreachable { endpoint: url.clone(), detail },
            Target::Socket(p) => CliError::NodeSocketUnreachable { socket: p.clone(), detail },
        };
    }
    let who = target.describe();
    let message = match (code, subject) {
        (Code::NotFound, Subject::Volume(v)) => {
            return CliError::NotFound(format!("volume {v} not found (see `volctl volume list`)"))
        }
        (Code::NotFound, Subject::Node(n)) => return CliError::NotFound(format!("node {n} not found (see `volctl node list`)")),
        (Code::NotFound, Subject::Snapshot(s)) => {
            return CliError::NotFound(format!("snapshot {s} not found (see `volctl snapshot list`)"))
        }
        (Code::NotFound, Subject::NewSnapshot { volume, .. }) => {
            return CliError::NotFound(format!("volume {volume} not found (see `volctl volume list`)"))
        }
        (Code::NotFound, Subject::GroupSnapshot(g)) => {
            return CliError::NotFound(format!(
                "group snapshot {g} not found (`volctl snapshot list` shows the group of each snapshot)"
            ))
        }
        (Code::NotFound, Subject::NewGroupSnapshot(_)) => {
            return CliError::NotFound(format!("{msg} (see `volctl volume list`)"))
        }
        (Code::NotFound, Subject::Restore { source, .. }) => {
            return CliError::NotFound(format!(
                "{source} not found: {msg} (see `volctl snapshot list` and `volctl volume list`)"
            ))
        }
        (Code::NotFound, Subject::Cluster) => format!("not found: {msg}"),
        (Code::InvalidArgument, _) => format!("invalid request: {msg} (see `volctl help`)"),
        (Code::AlreadyExists, Subject::Volume(v)) => format!(
            "volume {v} already exists with a different spec: {msg} (pick another name, or see it with `volctl volume get {v}`)"
        ),
        (Code::AlreadyExists, Subject::NewSnapshot { snapshot: n, .. }) => format!(
            "snapshot {n} already exists for another volume: {msg} (pick another name, or see it with `volctl snapshot get {n}`)"
        ),
        (Code::AlreadyExists, Subject::NewGroupSnapshot(n)) => format!(
            "group snapshot {n} already exists for other volumes: {msg} (pick another name, or see it with \
             `volctl snapshot group get {n}`)"
        ),
        (Code::AlreadyExists, Subject::Restore { volume, .. }) => format!(
            "volume {volume} already exists with a different spec or source: {msg} (pick another name, or see it \
             with `volctl volume get {volume}`)"
        ),
        (Code::AlreadyExists, _) => format!("already exists: {msg}"),
        (Code::OutOfRange, Subject::Restore { source, .. }) => format!(
            "too small: {msg} (a volume made from {source} is at least as large as it; leave --size out to get its size)"
        ),
        (Code::OutOfRange, _) => format!("out of range: {msg}"),
        (Code::Aborted, _) => format!("{who} gave up: {msg} (nothing was kept; retry)"),
        (Code::ResourceExhausted, _) => {
            format!("not enough nodes or space: {msg} (see `volctl node list`)")
        }
        (Code::FailedPrecondition, _) => format!("not possible in the current state: {msg}"),
        // volumed's own UNAVAILABLE messages may already say what to check.
        (Code::Unavailable, _) if msg.contains("volctl ") => {
            format!("{who} cannot serve this right now: {msg}")
        }
        (Code::Unavailable, _) => format!(
            "{who} cannot serve this right now: {msg} (retry shortly; `volctl cluster status` shows whether the \
             catalog has a leader)"
        ),
        (Code::DeadlineExceeded, _) => {
            format!("{who} did not answer in time: {msg} (retry; `volctl cluster status` shows the cluster's health)")
        }
        (Code::Unimplemented, _) => {
            format!("{who} does not implement this call: {msg} (is it an older volumed? upgrade it)")
        }
        (Code::PermissionDenied | Code::Unauthenticated, _) => format!("permission denied by {who}: {msg}"),
        (Code::Cancelled, _) => format!("the call to {who} was cancelled: {msg}"),
        _ => format!("{who} failed ({}): {msg}", code_name(code)),
    };
    CliError::Api { code, message }
}

fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api() -> Target {
        Target::Api("http://127.0.0.2:7400".into())
    }

    #[test]
    fn not_found_names_the_volume_and_the_next_step() {
        let e = from_status(&Status::not_found("volume v9 not found"), &api(), &Subject::Volume("v9".into()));
        assert_eq!(e.to_string(), "volume v9 not found (see `volctl volume list`)");
        let e = from_status(&Status::not_found("node 4"), &api(), &Subject::Node("node-4".into()));
        assert_eq!(e.to_string(), "node node-4 not found (see `volctl node list`)");
    }

    #[test]
    fn server_messages_are_kept_and_explained() {
        let v = Subject::Volume("v".into());
        let e = from_status(&Status::invalid_argument("replica_count 9 is out of range (1..=5)"), &api(), &v);
        assert!(e.to_string().starts_with("invalid request: replica_count 9 is out of range"), "{e}");
        let e = from_status(&Status::resource_exhausted("4 replicas need 4 nodes"), &api(), &v);
        assert!(e.to_string().contains("4 replicas need 4 nodes") && e.to_string().contains("volctl node list"), "{e}");
        let e = from_status(&Status::already_exists("size differs"), &api(), &v);
        assert!(
            e.to_string().contains("volume v already exists") && e.to_string().contains("volctl volume get v"),
            "{e}"
        );
        let e = from_status(&Status::unavailable("the catalog has no leader"), &api(), &Subject::Cluster);
        let s = e.to_string();
        assert!(
            s.contains("volumed at http://127.0.0.2:7400") && s.contains("no leader") && s.contains("cluster status"),
            "{s}"
        );
        // Advice the server already gave is not repeated.
        let e = from_status(
            &Status::unavailable(
                "the catalog has no leader; is a majority of catalog voters up? (volctl cluster status)",
            ),
            &api(),
            &Subject::Cluster,
        );
        assert_eq!(e.to_string().matches("volctl cluster status").count(), 1, "{e}");
        let e = from_status(&Status::internal("boom\nsecond line"), &api(), &Subject::Cluster);
        assert_eq!(e.to_string(), "volumed at http://127.0.0.2:7400 failed (INTERNAL): boom; second line");
        let e = from_status(&Status::unimplemented(""), &Target::Socket("/r/volumed.sock".into()), &Subject::Cluster);
        assert!(e.to_string().contains("node-local volumed at /r/volumed.sock does not implement"), "{e}");
        assert!(matches!(e, CliError::Api { code: Code::Unimplemented, .. }));
    }

    #[test]
    fn snapshot_and_restore_errors_name_the_right_thing() {
        let e = from_status(&Status::not_found("snapshot s9 not found"), &api(), &Subject::Snapshot("s9".into()));
        assert_eq!(e.to_string(), "snapshot s9 not found (see `volctl snapshot list`)");
        let new = Subject::NewSnapshot { snapshot: "s1".into(), volume: "v9".into() };
        let e = from_status(&Status::not_found("volume v9 not found"), &api(), &new);
        assert_eq!(e.to_string(), "volume v9 not found (see `volctl volume list`)");
        let e = from_status(&Status::already_exists("snapshot s1 already exists for another volume (x)"), &api(), &new);
        assert!(e.to_string().contains("volctl snapshot get s1"), "{e}");
        let r = Subject::Restore { volume: "r".into(), source: "snapshot s1".into() };
        let e = from_status(&Status::not_found("snapshot s1 not found"), &api(), &r);
        assert!(e.to_string().starts_with("snapshot s1 not found: "), "{e}");
        assert!(matches!(e, CliError::NotFound(_)));
        let e = from_status(&Status::out_of_range("the new volume is smaller than its source"), &api(), &r);
        assert!(e.to_string().contains("leave --size out"), "{e}");
        let e = from_status(
            &Status::aborted("a member failed; rolled back"),
            &api(),
            &Subject::NewGroupSnapshot("g".into()),
        );
        assert!(e.to_string().contains("rolled back") && e.to_string().contains("retry"), "{e}");
        let e = from_status(&Status::not_found("x"), &api(), &Subject::GroupSnapshot("g1".into()));
        assert!(e.to_string().starts_with("group snapshot g1 not found"), "{e}");
    }

    #[test]
    fn transport_failures_say_cannot_reach() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "Connection refused (os error 111)");
        let status = Status::from_error(Box::new(io));
        assert_eq!(status.code(), Code::Unknown);
        // What tonic builds for a failed connection: UNAVAILABLE with a cause.
        let mut status = Status::unavailable("tcp connect error");
        status.set_source(std::sync::Arc::new(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "Connection refused (os error 111)",
        )));
        let e = from_status(&status, &api(), &Subject::Cluster).to_string();
        assert!(e.starts_with("cannot reach volumed at http://127.0.0.2:7400: "), "{e}");
        assert!(e.contains("Connection refused") && e.contains("volctl dev up"), "{e}");
        let e = from_status(&status, &Target::Socket("/x.sock".into()), &Subject::Cluster).to_string();
        assert!(e.starts_with("cannot reach the node-local volumed at /x.sock"), "{e}");
    }
}
