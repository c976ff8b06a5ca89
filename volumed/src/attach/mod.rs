//! Attachments of volumes on this node: volumed hosts the block device
//! (FUSE+loop or kernel NBD) itself, so restarting whoever asked for it
//! (the CSI node plugin, `volctl`) never interrupts I/O.
//!
//! - [`manager`]: attach / detach / list, the per-attachment watcher
//!   (fencing, leader moves, growth, health) and restoring after a restart;
//! - [`endpoints`]: finding the volume's leader for the NBD client;
//! - [`device`]: the fencing gate in front of the NBD client;
//! - [`health`]: attachment states and reasons;
//! - [`persist`]: the attachment list in `<data-dir>/attachments.json`;
//! - [`mounts`]: where a device is mounted;
//! - [`freeze`]: FIFREEZE/FITHAW of a volume's mounted filesystems around
//!   a snapshot.

pub mod device;
pub mod endpoints;
pub mod freeze;
pub mod health;
pub mod manager;
pub mod mounts;
pub mod persist;

pub use health::AttachmentReport;
pub use manager::{AttachError, AttachManager, AttachSpec, AttachmentInfo, FrontendChoice};
