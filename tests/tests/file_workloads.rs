//! Real workloads on a shared file volume (issue 7): a Debian package's
//! tree unpacked on node A is checksummed file by file on node B; the
//! volume's leader is SIGKILLed while many files are copied (no error
//! reaches the application, every fsynced file is intact); the process
//! that asked for the mount (`volctl`) comes and goes without affecting it.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use volumed_tests::cluster::{clean_env, serial, workspace_bin, Cluster, ClusterOptions};
use volumed_tests::files::{mount_dir, sha_tree, ATTR_TTL};
use volumed_tests::tools::run;

/// A Debian binary package, downloaded once into a cache with `apt-get
/// download` (packages.debian.org / the configured mirror).
fn debian_package(name: &str) -> PathBuf {
    let cache = Path::new("/var/tmp/volumed-test-debs");
    std::fs::create_dir_all(cache).expect("package cache");
    let find = || {
        std::fs::read_dir(cache)
            .ok()?
            .flatten()
            .map(|e| e.path())
            .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with(&format!("{name}_"))))
    };
    if let Some(p) = find() {
        return p;
    }
    // The mirror may only be reachable through the environment's proxy:
    // apt-get keeps it.
    let out = Command::new("apt-get").args(["download", name]).current_dir(cache).output().expect("apt-get");
    find().unwrap_or_else(|| {
        panic!(
            "apt-get download {name} failed (the test needs the package once; put a {name}_*.deb into {}): {}",
            cache.display(),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn unpack(deb: &Path, into: &Path) {
    let script = "dpkg-deb --fsys-tarfile \"$1\" | tar -x -C \"$2\"";
    run("sh", &["-c", script, "sh", deb.to_str().expect("utf-8"), into.to_str().expect("utf-8")]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn debian_tree_unpacked_on_a_is_identical_on_b() {
    let _serial = serial();
    let deb = debian_package("linux-libc-dev");
    let cluster = Cluster::start(ClusterOptions::default()).await;
    cluster.create_file_volume("src", 512 << 20, 3).await;
    let (a, b) = (mount_dir(&cluster, "a"), mount_dir(&cluster, "b"));
    cluster.mount(0, "src", &a).await.expect("mount a");
    cluster.mount(2, "src", &b).await.expect("mount b");
    let reference = cluster.path().join("reference");
    std::fs::create_dir_all(&reference).expect("reference dir");
    let (a2, b2, r2) = (a.clone(), b.clone(), reference.clone());
    tokio::task::spawn_blocking(move || {
        unpack(&deb, &r2);
        unpack(&deb, &a2);
        std::thread::sleep(ATTR_TTL);
        let (want, got) = (sha_tree(&r2), sha_tree(&b2));
        let files = want.lines().count();
        assert!(files > 500, "the package has {files} files");
        assert_eq!(got, want, "sha256 of the tree read on node B differs from the package's");
        // Symlinks and modes came through as well.
        // Directory sizes are the filesystem's own business: left out.
        let ls = |d: &Path| {
            let script = "cd \"$1\" && find . -type d -printf '%p d %m\\n' -o -printf '%p %y %m %l %s\\n' | sort";
            let out = run("sh", &["-c", script, "sh", d.to_str().expect("utf-8")]);
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        assert_eq!(ls(&b2), ls(&r2), "tree listing (types, modes, link targets, sizes) differs");
    })
    .await
    .expect("unpack and compare");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leader_killed_during_a_copy_of_many_files() {
    let _serial = serial();
    let mut cluster = Cluster::start(ClusterOptions::default()).await;
    cluster.create_file_volume("copy", 512 << 20, 3).await;
    let leader = cluster.leader_index("copy").await;
    let mounter = (leader + 1) % 3;
    let m = mount_dir(&cluster, "m");
    cluster.mount(mounter, "copy", &m).await.expect("mount");

    const FILES: usize = 400;
    let written = Arc::new(AtomicUsize::new(0));
    let (m2, w2) = (m.clone(), written.clone());
    let copier = std::thread::spawn(move || -> Result<Duration, String> {
        let mut longest = Duration::ZERO;
        for i in 0..FILES {
            let t0 = std::time::Instant::now();
            let dir = m2.join(format!("d{}", i % 10));
            std::fs::create_dir_all(&dir).map_err(|e| format!("mkdir {}: {e}", dir.display()))?;
            let p = dir.join(format!("f{i}"));
            let data: Vec<u8> = (0..(16 << 10) + i * 97).map(|k| (k * 13 + i) as u8).collect();
            let mut f = std::fs::File::create(&p).map_err(|e| format!("create {}: {e}", p.display()))?;
            f.write_all(&data).map_err(|e| format!("write {}: {e}", p.display()))?;
            f.sync_all().map_err(|e| format!("fsync {}: {e}", p.display()))?;
            w2.store(i + 1, Ordering::Release);
            longest = longest.max(t0.elapsed());
        }
        Ok(longest)
    });
    // Kill the leader once a good part is written.
    while written.load(Ordering::Acquire) < FILES / 4 {
        assert!(!copier.is_finished(), "the copy ended early");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let at = written.load(Ordering::Acquire);
    cluster.kill(leader);
    let result = tokio::task::spawn_blocking(move || copier.join()).await.expect("join").expect("copier thread");
    let longest = result.unwrap_or_else(|e| {
        panic!("the application saw an error when the leader died (after {at} files): {e}\n{}", cluster.logs_tail(30))
    });
    // Reported, not asserted (speed is measured, not tested): the pause.
    eprintln!("longest file copy (across the leader's death): {longest:?}");

    // Every file intact, read back through the mount and through a new
    // mount on the third node.
    let other = (0..3).find(|i| *i != leader && *i != mounter).expect("third node");
    let n = mount_dir(&cluster, "n");
    cluster.mount(other, "copy", &n).await.expect("mount on the third node");
    let (m2, n2) = (m.clone(), n.clone());
    tokio::task::spawn_blocking(move || {
        for root in [&m2, &n2] {
            for i in 0..FILES {
                let p = root.join(format!("d{}/f{i}", i % 10));
                let data = std::fs::read(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()));
                let want: Vec<u8> = (0..(16 << 10) + i * 97).map(|k| (k * 13 + i) as u8).collect();
                assert!(data == want, "{} differs", p.display());
            }
        }
    })
    .await
    .expect("verify");
    cluster.restart(leader);
}

/// `volctl` against node `i`; node-local commands get its socket.
fn volctl(cluster: &Cluster, i: usize, args: &[&str]) -> std::process::Output {
    let sock = cluster.local_socket(i);
    let mut cmd = Command::new(workspace_bin("volctl"));
    clean_env(&mut cmd).args(["--endpoint", &cluster.node(i).endpoint()]).args(args);
    if matches!(args.get(1), Some(&"mount" | &"unmount" | &"attach" | &"attachments")) {
        cmd.args(["--node-socket", sock.to_str().expect("utf-8")]);
    }
    cmd.output().expect("run volctl")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn volctl_mount_outlives_volctl() {
    let _serial = serial();
    let cluster = Cluster::start(ClusterOptions::default()).await;
    cluster.create_file_volume("admin", 64 << 20, 3).await;
    let m = mount_dir(&cluster, "admin");
    let out = volctl(&cluster, 1, &["volume", "mount", "admin", m.to_str().expect("utf-8")]);
    assert!(out.status.success(), "volctl volume mount: {}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("mounted at"), "{}", String::from_utf8_lossy(&out.stdout));
    // volctl has exited: the mount is the node's.
    let m2 = m.clone();
    tokio::task::spawn_blocking(move || {
        std::fs::write(m2.join("after-volctl-exited"), b"still mounted").expect("write");
        assert_eq!(std::fs::read(m2.join("after-volctl-exited")).expect("read"), b"still mounted");
    })
    .await
    .expect("io");
    let out = volctl(&cluster, 1, &["volume", "attachments"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains(m.to_str().expect("utf-8")) && text.contains("ok"), "{text}");
    let out = volctl(&cluster, 1, &["volume", "get", "admin"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("file"),
        "volume get shows the kind: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A block-volume command on a file volume says what to do instead.
    let out = volctl(&cluster, 1, &["volume", "attach", "admin"]);
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("mounted"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = volctl(&cluster, 1, &["volume", "unmount", m.to_str().expect("utf-8")]);
    assert!(out.status.success(), "volctl volume unmount: {}", String::from_utf8_lossy(&out.stderr));
    assert!(volumed_tests::tools::mounts_below(cluster.path()).is_empty(), "still mounted");
    let out = volctl(&cluster, 1, &["volume", "unmount", m.to_str().expect("utf-8")]);
    assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).contains("nothing to do"));
}
