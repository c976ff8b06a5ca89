//! Compiles every `.proto` under `proto/` with protox (a pure-Rust protobuf
//! compiler), so a fresh machine needs no system `protoc`.

use std::path::{Path, PathBuf};

fn collect(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            collect(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "proto") {
            out.push(path);
        }
    }
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from("proto");
    let mut files = Vec::new();
    collect(&root, &mut files)?;
    files.sort();
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(&files, [&root])?;
    tonic_prost_build::configure().build_server(true).build_client(true).bytes(".volumed.v1").compile_fds(fds)?;
    Ok(())
}
