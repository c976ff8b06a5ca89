//! The Volumed storage daemon.

use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;
use volumed::config::Flags;

// jemalloc replaces malloc for the whole process, RocksDB's C++ included
// (`unprefixed_malloc_on_supported_platforms`): under 1 MiB sequential reads
// glibc's malloc/free of RocksDB's 4 KiB blocks took 15% of a leader's CPU.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let flags = Flags::parse();
    let config = match flags.check() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("volumed: {e}");
            return ExitCode::from(2);
        }
    };
    if flags.check_config {
        return match serde_json::to_string_pretty(&config) {
            Ok(json) => {
                println!("{json}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("volumed: {e}");
                ExitCode::from(2)
            }
        };
    }
    let filter = EnvFilter::try_from_env("VOLUMED_LOG")
        .unwrap_or_else(|_| EnvFilter::new("info,openraft=warn,h2=warn,tower=warn,hyper=warn"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if config.log_format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().thread_name("volumed").build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("volumed: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(volumed::daemon::run(config));
    // Ending the runtime drops every task and with them the last handles of
    // the node's RocksDB, which closes it (see `storage::Store`) before the
    // process exits. Blocking tasks get a bounded time to finish.
    runtime.shutdown_timeout(std::time::Duration::from_secs(10));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("volumed: {e}");
            ExitCode::FAILURE
        }
    }
}
