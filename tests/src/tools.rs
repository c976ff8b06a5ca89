//! Running third-party tools (libnbd's nbdcopy/nbdinfo, qemu-img, fio,
//! mkfs, fsck) from tests, and cleaning up kernel objects.

use std::path::Path;
use std::process::{Command, Output};

use super::cluster::clean_env;

/// Fails the test with the package to install when a tool is missing.
pub fn require(tool: &str, package: &str) {
    let found =
        std::env::var_os("PATH").map(|p| std::env::split_paths(&p).any(|d| d.join(tool).exists())).unwrap_or(false)
            || Path::new("/usr/sbin").join(tool).exists()
            || Path::new("/sbin").join(tool).exists();
    assert!(found, "{tool} is not installed: apt-get install {package} (.ci/run installs it)");
}

/// Runs a command with a clean environment; panics with its output when it
/// fails.
pub fn run(program: &str, args: &[&str]) -> Output {
    let out = try_run(program, args);
    assert!(
        out.status.success(),
        "{program} {} failed ({}):\nstdout: {}\nstderr: {}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub fn try_run(program: &str, args: &[&str]) -> Output {
    let mut cmd = Command::new(program);
    clean_env(&mut cmd).args(args);
    cmd.output().unwrap_or_else(|e| panic!("cannot run {program}: {e}"))
}

/// Mount points below `dir`, deepest first.
pub fn mounts_below(dir: &Path) -> Vec<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let prefix = dir.display().to_string();
    let mut found: Vec<String> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape_mount_path)
        .filter(|m| m.starts_with(&prefix))
        .collect();
    found.sort_by_key(|m| std::cmp::Reverse(m.len()));
    found
}

fn unescape_mount_path(s: &str) -> String {
    s.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")
}

/// Lazily unmounts everything below `dir` (leftovers of a failed test).
pub fn unmount_below(dir: &Path) {
    for m in mounts_below(dir) {
        let _ = try_run("umount", &["-l", &m]);
    }
}

/// Writes `len` bytes of seeded pseudo-random data to `path`.
pub fn random_file(path: &Path, len: usize, seed: u64) {
    use rand::{RngCore, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut buf = vec![0u8; len];
    rng.fill_bytes(&mut buf);
    std::fs::write(path, buf).expect("write random file");
}

pub fn files_equal(a: &Path, b: &Path) -> bool {
    let (Ok(x), Ok(y)) = (std::fs::read(a), std::fs::read(b)) else { return false };
    x == y
}
