use std::process::ExitCode;

use clap::Parser;
use volumed_csi_controller::Args;

fn main() -> ExitCode {
    let args = Args::parse();
    let config = match args.validate() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("csi-controller: {e}");
            return ExitCode::from(2);
        }
    };
    if args.check_config {
        match serde_json::to_string_pretty(&config) {
            Ok(json) => {
                println!("{json}");
                return ExitCode::SUCCESS;
            }
            Err(e) => {
                eprintln!("csi-controller: cannot render the configuration: {e}");
                return ExitCode::from(2);
            }
        }
    }
    volumed_csi::logging::init(config.log_format);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("csi-controller: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    tracing::info!(endpoint = %config.endpoint, driver = %config.driver_name, "csi-controller starting");
    match runtime.block_on(volumed_csi_controller::run(
        config,
        volumed_csi::serve::shutdown_signal(),
    )) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "csi-controller stopped");
            eprintln!("csi-controller: {e}");
            ExitCode::FAILURE
        }
    }
}
