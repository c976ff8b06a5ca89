//! gRPC edges of volumed: the peer transport, the admin API, and the
//! node-local API. Typed errors from inside become status codes here.

pub mod admin;
pub mod node_local;
pub mod transport;

use tonic::Status;

use crate::catalog::service::CatalogWriteError;
use crate::catalog::state::CatalogError;

pub fn status_of_catalog(e: CatalogWriteError) -> Status {
    match e {
        CatalogWriteError::Rejected(r) => match r {
            CatalogError::NotFound(m) => Status::not_found(m),
            CatalogError::AlreadyExists(m) => Status::already_exists(m),
            CatalogError::InvalidArgument(m) => Status::invalid_argument(m),
            CatalogError::FailedPrecondition(m) => Status::failed_precondition(m),
            CatalogError::ResourceExhausted(m) => Status::resource_exhausted(m),
            CatalogError::OutOfRange(m) => Status::out_of_range(m),
            CatalogError::Unavailable(m) => Status::unavailable(m),
        },
        CatalogWriteError::NoLeader(m) => Status::unavailable(format!(
            "the catalog has no reachable leader ({m}); is a majority of catalog voters up?"
        )),
        CatalogWriteError::Internal(m) => Status::internal(m),
    }
}
