use std::io::Write;
use std::process::ExitCode;

use clap::Parser;
use volctl::cli::Cli;
use volctl::error::CliError;

/// Writes to stdout; a closed pipe (`volctl volume list | head`) is not an error.
fn emit(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
}

fn main() -> ExitCode {
    // Usage errors exit 2 (clap's convention), with clap's message.
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            volctl::dev::note(&format!("error: cannot start the async runtime: {e}"));
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(volctl::run(cli)) {
        Ok(text) => {
            emit(&text);
            ExitCode::SUCCESS
        }
        Err(e) => {
            if let CliError::Failed { output, .. } = &e {
                emit(output);
            }
            volctl::dev::note(&format!("error: {e}"));
            ExitCode::from(1)
        }
    }
}
