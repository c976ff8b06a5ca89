//! Attaches any NBD export as a local block device through volumed's
//! FUSE+loop frontend and reconnecting NBD client — the data path of an
//! attached volume, without volumed behind it. The benchmarks use it to put
//! qemu-nbd behind the same layers, so their cost can be told apart from
//! volumed's.
//!
//!   nbd-fuse-loop HOST:PORT EXPORT RUN_DIR
//!
//! Prints the device path, then holds the device until SIGTERM or SIGINT,
//! when it detaches (flush, loop device, FUSE mount) and exits.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use tokio::signal::unix::{signal, SignalKind};
use volumed_frontend::{AttachOptions, FrontendKind};
use volumed_nbd::client::{ClientOptions, NbdClient, StaticEndpoints};

async fn run(addr: SocketAddr, export: String, run_dir: PathBuf) -> Result<(), String> {
    let mut term = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| e.to_string())?;
    let client = NbdClient::connect(Arc::new(StaticEndpoints(vec![addr])), export.clone(), ClientOptions::default())
        .await
        .map_err(|e| e.to_string())?;
    let id: String = export.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '-' }).collect();
    let dev = volumed_frontend::attach(
        FrontendKind::FuseLoop,
        client.clone(),
        AttachOptions::new(format!("nbd-{id}"), run_dir),
    )
    .await
    .map_err(|e| e.to_string())?;
    println!("{}", dev.device_path().display());
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    dev.detach().await.map_err(|e| e.error.to_string())?;
    client.close().await;
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [addr, export, run_dir] = args.as_slice() else {
        eprintln!("usage: nbd-fuse-loop HOST:PORT EXPORT RUN_DIR");
        return ExitCode::from(2);
    };
    let Ok(addr) = addr.parse::<SocketAddr>() else {
        eprintln!("nbd-fuse-loop: {addr:?} is not an IP:PORT address");
        return ExitCode::from(2);
    };
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("nbd-fuse-loop: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(addr, export.clone(), PathBuf::from(run_dir))) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nbd-fuse-loop: {e}");
            ExitCode::FAILURE
        }
    }
}
