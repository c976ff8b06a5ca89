//! Log setup and the one structured line every RPC writes.

use std::future::Future;
use std::time::Instant;

use serde::Serialize;
use tonic::{Response, Status};
use tracing::Instrument;

use crate::errors::CsiError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Installs the global subscriber (stderr; RUST_LOG overrides the `info`
/// default). A second call is a no-op, which tests rely on.
pub fn init(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // No colour codes when stderr is a log file (a detached process).
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// Runs one RPC body inside a span carrying the RPC name and volume id and
/// logs one line with the outcome (gRPC code) and the duration.
pub async fn observe<T, F>(rpc: &'static str, volume_id: &str, body: F) -> Result<Response<T>, Status>
where
    F: Future<Output = Result<T, CsiError>>,
{
    let span = tracing::info_span!("csi", rpc, volume_id);
    let start = Instant::now();
    let result = body.instrument(span).await;
    let duration_ms = start.elapsed().as_secs_f64() * 1000.0;
    // Outside the span: the line carries rpc and volume_id itself.
    match result {
        Ok(v) => {
            tracing::info!(rpc, volume_id, outcome = "OK", duration_ms, "rpc done");
            Ok(Response::new(v))
        }
        Err(e) => {
            let code = format!("{:?}", e.code());
            tracing::warn!(rpc, volume_id, outcome = %code, duration_ms, error = %e, "rpc failed");
            Err(e.into())
        }
    }
}
