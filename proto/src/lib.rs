//! Generated gRPC types and services.
//!
//! - [`volumed::v1`]: volumed's admin, node-local and peer-transport APIs.

pub mod volumed {
    pub mod v1 {
        tonic::include_proto!("volumed.v1");
    }
}
