//! Typed errors of the plugins and their mapping to CSI status codes.
//!
//! Handlers build a [`CsiError`] whose variant is the CSI code the spec asks
//! for; the message names the volume, node and path involved. Errors coming
//! back from volumed keep volumed's code (its codes already follow the CSI
//! meanings, see admin.proto) and get the caller's context in front.

use std::fmt::Display;

use tonic::{Code, Status};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CsiError {
    /// A REQUIRED field is empty.
    #[error("{0} is required")]
    Missing(&'static str),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    OutOfRange(String),
    #[error("{0}")]
    ResourceExhausted(String),
    #[error("{0}")]
    Aborted(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Unimplemented(String),
    #[error("{0}")]
    DeadlineExceeded(String),
    #[error("{0}")]
    Internal(String),
}

impl CsiError {
    pub fn code(&self) -> Code {
        match self {
            CsiError::Missing(_) | CsiError::InvalidArgument(_) => Code::InvalidArgument,
            CsiError::NotFound(_) => Code::NotFound,
            CsiError::AlreadyExists(_) => Code::AlreadyExists,
            CsiError::FailedPrecondition(_) => Code::FailedPrecondition,
            CsiError::OutOfRange(_) => Code::OutOfRange,
            CsiError::ResourceExhausted(_) => Code::ResourceExhausted,
            CsiError::Aborted(_) => Code::Aborted,
            CsiError::Unavailable(_) => Code::Unavailable,
            CsiError::Unimplemented(_) => Code::Unimplemented,
            CsiError::DeadlineExceeded(_) => Code::DeadlineExceeded,
            CsiError::Internal(_) => Code::Internal,
        }
    }

    /// Builds the variant for `code`; OK and the codes CSI never asks for
    /// (UNKNOWN, CANCELLED, DATA_LOSS, ...) become INTERNAL.
    pub fn with_code(code: Code, message: String) -> CsiError {
        match code {
            Code::InvalidArgument => CsiError::InvalidArgument(message),
            Code::NotFound => CsiError::NotFound(message),
            Code::AlreadyExists => CsiError::AlreadyExists(message),
            Code::FailedPrecondition => CsiError::FailedPrecondition(message),
            Code::OutOfRange => CsiError::OutOfRange(message),
            Code::ResourceExhausted => CsiError::ResourceExhausted(message),
            Code::Aborted => CsiError::Aborted(message),
            Code::Unavailable => CsiError::Unavailable(message),
            Code::Unimplemented => CsiError::Unimplemented(message),
            Code::DeadlineExceeded => CsiError::DeadlineExceeded(message),
            _ => CsiError::Internal(message),
        }
    }

    /// Puts `context` ("volume 1234", "node 3, path /x") in front of the message.
    pub fn context(self, context: impl Display) -> CsiError {
        let code = self.code();
        CsiError::with_code(code, format!("{context}: {self}"))
    }
}

impl From<CsiError> for Status {
    fn from(e: CsiError) -> Status {
        Status::new(e.code(), e.to_string())
    }
}

/// An error from a volumed call, keeping its code and naming what the plugin
/// was doing. A transport failure (volumed not reachable) is UNAVAILABLE so
/// the CO retries.
pub fn from_volumed(status: Status, context: impl Display) -> CsiError {
    let code = match status.code() {
        // tonic reports connection failures as UNKNOWN/CANCELLED in some
        // versions; to a CO they all mean "try again later".
        Code::Unknown | Code::Cancelled if status.message().contains("transport") => Code::Unavailable,
        c => c,
    };
    let msg = if status.message().is_empty() {
        format!("{context}: volumed answered {code:?}")
    } else {
        format!("{context}: {}", status.message())
    };
    CsiError::with_code(code, msg)
}

/// Shorthand for handlers: `Err(invalid(format!(...)))`.
pub fn invalid(msg: impl Into<String>) -> CsiError {
    CsiError::InvalidArgument(msg.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_follow_variants() {
        assert_eq!(CsiError::Missing("volume_id").code(), Code::InvalidArgument);
        assert_eq!(Status::from(CsiError::Missing("volume_id")).message(), "volume_id is required");
        assert_eq!(CsiError::NotFound("x".into()).code(), Code::NotFound);
        assert_eq!(CsiError::OutOfRange("x".into()).code(), Code::OutOfRange);
        assert_eq!(CsiError::Aborted("x".into()).code(), Code::Aborted);
        assert_eq!(CsiError::with_code(Code::DataLoss, "x".into()).code(), Code::Internal);
    }

    #[test]
    fn volumed_errors_keep_code_and_gain_context() {
        let e = from_volumed(Status::not_found("no volume abc"), "volume abc");
        assert_eq!(e.code(), Code::NotFound);
        assert_eq!(e.to_string(), "volume abc: no volume abc");
        let e = from_volumed(Status::unavailable(""), "volume abc");
        assert_eq!(e.code(), Code::Unavailable);
        assert!(e.to_string().starts_with("volume abc: "));
        let e = from_volumed(Status::unknown("transport error"), "list");
        assert_eq!(e.code(), Code::Unavailable);
    }

    #[test]
    fn context_prefixes_and_keeps_code() {
        let e = CsiError::FailedPrecondition("busy".into()).context("volume v1, node 2");
        assert_eq!(e.code(), Code::FailedPrecondition);
        assert_eq!(e.to_string(), "volume v1, node 2: busy");
    }
}
