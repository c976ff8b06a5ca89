//! Generated gRPC types and services.
//!
//! - [`volumed::v1`]: volumed's admin, node-local and peer-transport APIs.
//! - [`csi::v1`]: the Container Storage Interface v1.12 (wire-compatible with
//!   the published spec).

pub mod volumed {
    pub mod v1 {
        tonic::include_proto!("volumed.v1");
    }
}

pub mod csi {
    pub mod v1 {
        tonic::include_proto!("csi.v1");
    }
}
