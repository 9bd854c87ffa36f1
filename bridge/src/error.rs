//! The hub's errors, and the gRPC status each maps to.

use std::path::PathBuf;

use bridge_proto::{
    control::ControlError, identity::InvalidName, pattern::NameError, sampling::RateError,
};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no worker `{0}` is known to the hub (`bridge workers` lists them)")]
    UnknownWorker(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    Control(#[from] ControlError),
    #[error("{0}")]
    Name(#[from] NameError),
    #[error("{0}")]
    Rate(#[from] RateError),
    /// A worker id, pool or label that breaks `bridge_proto::identity`'s rule.
    #[error("{0}")]
    Identity(#[from] InvalidName),
    #[error("cannot write control state to {path}: {source}")]
    StateWrite {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read control state from {path}: {message}")]
    StateRead { path: PathBuf, message: String },
    #[error("the hub is shutting down")]
    ShuttingDown,
    /// Something the hub depends on (NATS, in cluster mode) is out of reach; worth retrying.
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
    /// A configured limit was reached.
    #[error("{0}")]
    Limit(String),
}

impl Error {
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::InvalidArgument(message.into())
    }
}

impl From<Error> for tonic::Status {
    fn from(error: Error) -> Self {
        let message = error.to_string();
        match error {
            Error::UnknownWorker(_) => Self::not_found(message),
            Error::InvalidArgument(_)
            | Error::Control(_)
            | Error::Name(_)
            | Error::Rate(_)
            | Error::Identity(_) => Self::invalid_argument(message),
            Error::StateWrite { .. } | Error::StateRead { .. } => Self::internal(message),
            Error::ShuttingDown | Error::Unavailable(_) => Self::unavailable(message),
            Error::Internal(_) => Self::internal(message),
            Error::Limit(_) => Self::resource_exhausted(message),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
