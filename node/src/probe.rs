//! What a device holds, before anything is written to it: `blkid -p`
//! (low-level superblock probing, no cache) and, when blkid finds no
//! signature, a look at the first MiB. A device is formatted only when both
//! say it is blank.

use std::ffi::OsStr;
use std::io::Read;
use std::path::Path;
use std::time::Duration;

use volumed_csi::errors::CsiError;

use crate::cmd;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Content {
    /// No signature and the first MiB reads as zeros: safe to format.
    Blank,
    /// A filesystem of this type (blkid TYPE).
    Filesystem(String),
    /// Something else (partition table, RAID member, unknown data): never
    /// formatted over.
    Other(String),
}

const PROBE_TIMEOUT: Duration = Duration::from_secs(60);
const ZERO_CHECK_BYTES: usize = 1 << 20;

/// Parses `blkid -p -o export` output into (TYPE, USAGE, PTTYPE).
fn parse_export(out: &str) -> (Option<String>, Option<String>, Option<String>) {
    let mut ty = None;
    let mut usage = None;
    let mut pt = None;
    for line in out.lines() {
        if let Some((k, v)) = line.split_once('=') {
            match k {
                "TYPE" => ty = Some(v.to_string()),
                "USAGE" => usage = Some(v.to_string()),
                "PTTYPE" => pt = Some(v.to_string()),
                _ => {}
            }
        }
    }
    (ty, usage, pt)
}

fn first_mib_is_zero(device: &Path) -> Result<bool, std::io::Error> {
    let mut f = std::fs::File::open(device)?;
    let mut buf = vec![0u8; ZERO_CHECK_BYTES];
    let mut filled = 0;
    while filled < buf.len() {
        let n = f.read(&mut buf[filled..])?;
        if n == 0 {
            break;
        }
        filled += n;
    }
    Ok(buf[..filled].iter().all(|&b| b == 0))
}

pub async fn probe(device: &Path) -> Result<Content, CsiError> {
    let out = cmd::run(
        "blkid",
        &[OsStr::new("-p"), OsStr::new("-o"), OsStr::new("export"), device.as_os_str()],
        PROBE_TIMEOUT,
    )
    .await
    .map_err(|e| CsiError::Internal(format!("probing {}: {e}", device.display())))?;
    match out.code {
        Some(0) => {
            let (ty, usage, pt) = parse_export(&out.stdout);
            Ok(match (ty, usage, pt) {
                (Some(t), Some(u), _) if u == "filesystem" => Content::Filesystem(t),
                (Some(t), _, _) => Content::Other(format!("a {t} signature")),
                (None, _, Some(p)) => Content::Other(format!("a {p} partition table")),
                _ => Content::Other("an unrecognised signature".into()),
            })
        }
        // 2: nothing found by any prober.
        Some(2) => {
            let zero = tokio::task::spawn_blocking({
                let d = device.to_path_buf();
                move || first_mib_is_zero(&d)
            })
            .await
            .map_err(|e| CsiError::Internal(format!("reading {}: {e}", device.display())))?
            .map_err(|e| CsiError::Internal(format!("reading {}: {e}", device.display())))?;
            Ok(if zero {
                Content::Blank
            } else {
                Content::Other("data without a filesystem signature in its first MiB".into())
            })
        }
        // 8: several signatures that contradict each other.
        Some(8) => Ok(Content::Other("several conflicting signatures".into())),
        _ => Err(CsiError::Internal(format!(
            "blkid -p {} failed (exit {:?}): {}",
            device.display(),
            out.code,
            out.diagnostics()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn export_format() {
        let (t, u, p) = parse_export("DEVNAME=/dev/loop3\nUUID=abc\nVERSION=1.0\nTYPE=ext4\nUSAGE=filesystem\n");
        assert_eq!(t.as_deref(), Some("ext4"));
        assert_eq!(u.as_deref(), Some("filesystem"));
        assert_eq!(p, None);
        let (t, _, p) = parse_export("DEVNAME=/dev/loop3\nPTUUID=x\nPTTYPE=gpt\n");
        assert_eq!(t, None);
        assert_eq!(p.as_deref(), Some("gpt"));
    }

    #[tokio::test]
    async fn files_probe_like_devices() {
        // blkid probes regular files the same way; no root needed.
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("img");
        let f = std::fs::File::create(&img).unwrap();
        f.set_len(8 << 20).unwrap();
        assert_eq!(probe(&img).await.unwrap(), Content::Blank);
        std::fs::write(&img, vec![0xabu8; 4096]).unwrap();
        std::fs::File::options().write(true).open(&img).unwrap().set_len(8 << 20).unwrap();
        assert!(matches!(probe(&img).await.unwrap(), Content::Other(_)));
    }
}
