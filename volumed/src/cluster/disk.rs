//! Filesystem statistics of the data directory (capacity and free space).

use std::path::Path;

#[derive(Debug, Clone, Copy)]
pub struct FsStats {
    pub total: u64,
    pub free: u64,
}

pub fn fs_stats(path: &Path) -> std::io::Result<FsStats> {
    let st = nix::sys::statvfs::statvfs(path).map_err(std::io::Error::from)?;
    let frag = st.fragment_size();
    Ok(FsStats { total: st.blocks() * frag, free: st.blocks_available() * frag })
}
