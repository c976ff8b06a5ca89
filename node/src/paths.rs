//! Staging and target paths must lie under the kubelet directory: absolute,
//! normalised (no `.`, `..`, empty components or trailing slash) - the
//! plugin runs as root and mounts and deletes there.

use std::path::{Component, Path, PathBuf};

use volumed_csi::errors::CsiError;

pub fn validate(root: &Path, path: &str, field: &'static str) -> Result<PathBuf, CsiError> {
    if path.is_empty() {
        return Err(CsiError::Missing(field));
    }
    let bad = |why: &str| CsiError::InvalidArgument(format!("{field} \"{path}\": {why}"));
    if path.contains('\0') {
        return Err(bad("contains a NUL byte"));
    }
    if !path.starts_with('/') {
        return Err(bad("must be an absolute path"));
    }
    if path.len() > 1 && path.ends_with('/') || path.contains("//") {
        return Err(bad("must be normalised (no empty components or trailing '/')"));
    }
    let p = Path::new(path);
    for c in p.components() {
        match c {
            Component::RootDir | Component::Normal(_) => {}
            Component::ParentDir => return Err(bad("must not contain '..'")),
            Component::CurDir => return Err(bad("must not contain '.'")),
            Component::Prefix(_) => return Err(bad("is not a unix path")),
        }
    }
    // Path::components hides "/./" in the middle; check the text too.
    if path.split('/').any(|s| s == "." || s == "..") {
        return Err(bad("must be normalised (no '.' or '..' components)"));
    }
    if p == root || !p.starts_with(root) {
        return Err(bad(&format!("must be under the kubelet directory {}", root.display())));
    }
    Ok(p.to_path_buf())
}

/// A volume id becomes a file name (raw block staging), so it must be one.
pub fn validate_volume_id(id: &str) -> Result<(), CsiError> {
    if id.is_empty() {
        return Err(CsiError::Missing("volume_id"));
    }
    let bad = |why: &str| CsiError::InvalidArgument(format!("volume_id {id:?}: {why}"));
    if id.len() > 128 {
        return Err(bad("longer than 128 bytes"));
    }
    if id == "." || id == ".." || id.contains('/') || id.chars().any(|c| c.is_control()) {
        return Err(bad("must not contain '/' or control characters, nor be '.' or '..'"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROOT: &str = "/var/lib/kubelet";

    fn check(p: &str) -> Result<PathBuf, CsiError> {
        validate(Path::new(ROOT), p, "target_path")
    }

    #[test]
    fn accepted() {
        assert_eq!(
            check("/var/lib/kubelet/pods/x/volumes/kubernetes.io~csi/pv/mount").unwrap(),
            PathBuf::from("/var/lib/kubelet/pods/x/volumes/kubernetes.io~csi/pv/mount")
        );
    }

    #[test]
    fn refused() {
        let cases = [
            "",
            "relative/path",
            "/var/lib/kubelet/../../etc",
            "/var/lib/kubelet/pods/..",
            "/var/lib/kubelet/./pods",
            "/var/lib/kubelet//pods",
            "/var/lib/kubelet/pods/",
            "/var/lib/kubelet",
            "/var/lib/kubeletx/pods",
            "/etc/passwd",
            "/tmp/x",
            "/var/lib/kubelet/a\0b",
        ];
        for c in cases {
            let e = check(c).unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{c:?}");
            if !c.is_empty() {
                assert!(e.to_string().contains("target_path"), "{e}");
            }
        }
    }

    #[test]
    fn volume_ids() {
        assert!(validate_volume_id("0b7f6c1e-3f2a-4c1d-9e8f-0123456789ab").is_ok());
        for bad in ["", ".", "..", "a/b", "../x", "a\nb", &"x".repeat(129)] {
            assert_eq!(validate_volume_id(bad).unwrap_err().code(), tonic::Code::InvalidArgument, "{bad:?}");
        }
    }
}
