//! Measures this crate's NBD client: QD random 4 KiB reads or writes against
//! any NBD server for a few seconds, printing IOPS.
//!
//! ```text
//! cargo run --release -p volumed-nbd --example bench_client -- 127.0.0.1:10809 EXPORT randread|randwrite [SECONDS] [QD]
//! ```

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use volumed_nbd::client::{ClientOptions, NbdClient, StaticEndpoints};
use volumed_nbd::BlockDevice;

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 4 {
        eprintln!("usage: bench_client ADDR EXPORT randread|randwrite [SECONDS] [QD]");
        std::process::exit(2);
    }
    let addr = match args[1].parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("bad address {}: {e}", args[1]);
            std::process::exit(2);
        }
    };
    let write = args[3] == "randwrite";
    let secs: u64 = args.get(4).and_then(|s| s.parse().ok()).unwrap_or(8);
    let qd: u64 = args.get(5).and_then(|s| s.parse().ok()).unwrap_or(32);
    let client = match NbdClient::connect(
        Arc::new(StaticEndpoints(vec![addr])),
        args[2].clone(),
        ClientOptions::default(),
    )
    .await
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(1);
        }
    };
    let blocks = client.size() / 4096;
    let done = Arc::new(AtomicU64::new(0));
    let until = Instant::now() + Duration::from_secs(secs);
    let mut workers = Vec::new();
    for w in 0..qd {
        let c = client.clone();
        let done = done.clone();
        workers.push(tokio::spawn(async move {
            let data = Bytes::from(vec![w as u8; 4096]);
            // xorshift: cheap, deterministic per worker.
            let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ (w + 1);
            while Instant::now() < until {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let off = (x % blocks) * 4096;
                let ok = if write {
                    c.write(off, data.clone(), false).await.is_ok()
                } else {
                    c.read(off, 4096).await.is_ok()
                };
                if !ok {
                    eprintln!("request failed");
                    return;
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for w in workers {
        let _ = w.await;
    }
    let n = done.load(Ordering::Relaxed);
    println!("{} {}: {:.0} IOPS (QD {qd})", args[1], args[3], n as f64 / secs as f64);
    client.close().await;
}
