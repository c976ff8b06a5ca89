//! The `main` both plugin binaries share.

use crate::serve::{shutdown_signal, ServeError};

/// What both plugin binaries share in `main`: report a bad configuration
/// (exit 2), print the validated one for `--check-config`, otherwise set up
/// logging and serve until SIGTERM/SIGINT.
pub struct PluginMain<'a, C> {
    /// Binary name, prefixed to every message.
    pub name: &'a str,
    pub config: Result<C, String>,
    pub check_config: bool,
    pub log_format: fn(&C) -> crate::logging::LogFormat,
    /// Endpoint and driver name, for the start line.
    pub describe: fn(&C) -> (String, String),
}

impl<C: serde::Serialize> PluginMain<'_, C> {
    pub fn run<F, Fut>(self, serve: F) -> std::process::ExitCode
    where
        F: FnOnce(C, std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>) -> Fut,
        Fut: std::future::Future<Output = Result<(), ServeError>>,
    {
        use std::process::ExitCode;
        let name = self.name;
        let config = match self.config {
            Ok(c) => c,
            Err(e) => {
                eprintln!("{name}: {e}");
                return ExitCode::from(2);
            }
        };
        if self.check_config {
            return match serde_json::to_string_pretty(&config) {
                Ok(json) => {
                    println!("{json}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("{name}: cannot render the configuration: {e}");
                    ExitCode::from(2)
                }
            };
        }
        crate::logging::init((self.log_format)(&config));
        let runtime = match tokio::runtime::Runtime::new() {
            Ok(r) => r,
            Err(e) => {
                eprintln!("{name}: cannot start the runtime: {e}");
                return ExitCode::FAILURE;
            }
        };
        let (endpoint, driver) = (self.describe)(&config);
        tracing::info!(%endpoint, %driver, "{name} starting");
        match runtime.block_on(serve(config, Box::pin(shutdown_signal()))) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!(error = %e, "{name} stopped");
                eprintln!("{name}: {e}");
                ExitCode::FAILURE
            }
        }
    }
}
