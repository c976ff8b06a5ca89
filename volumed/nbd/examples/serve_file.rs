//! Serves a file as an NBD export with this crate's server, for manual
//! testing and benchmarking against other servers:
//!
//! ```text
//! cargo run --release -p volumed-nbd --example serve_file -- FILE 127.0.0.1:10809 [EXPORT]
//! fio --ioengine=nbd --uri=nbd://127.0.0.1:10809/EXPORT ...
//! ```

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::Arc;

use volumed_nbd::server::{serve, ServerOptions};
use volumed_nbd::BlockDevice;

#[tokio::main]
async fn main() {
    common::init_tracing();
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        eprintln!("usage: serve_file FILE ADDR [EXPORT]");
        std::process::exit(2);
    }
    let export = args.get(3).cloned().unwrap_or_else(|| "file".into());
    let device = common::FileDevice::open(std::path::Path::new(&args[1]), false);
    let exports = common::Exports::with(vec![(export.as_str(), device as Arc<dyn BlockDevice>)]);
    let listener = match tokio::net::TcpListener::bind(&args[2]).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("cannot listen on {}: {e}", args[2]);
            std::process::exit(1);
        }
    };
    eprintln!("serving {} as {export:?} on {}", args[1], args[2]);
    serve(listener, Arc::new(exports), ServerOptions::default(), async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await;
}
