//! What can stop a reconcile, and a short label per cause for logs, conditions and Events.

use crate::error_chain;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// The worker's files could not be read (missing key, bucket, credentials, store down).
    #[error("{0}")]
    Source(String),
    /// The files were read but do not make a valid worker.
    #[error("{0}")]
    InvalidWorker(String),
    #[error("{0}")]
    Registry(String),
    /// The object asks for something that cannot be done as written.
    #[error("{0}")]
    Invalid(String),
    #[error("cannot serialize {what}: {source}")]
    Serialize { what: &'static str, source: serde_json::Error },
}

impl Error {
    /// A CamelCase reason, as conditions and Events want it.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Kube(_) => "KubernetesApiError",
            Error::Source(_) => "SourceUnavailable",
            Error::InvalidWorker(_) => "InvalidWorker",
            Error::Registry(_) => "RegistryError",
            Error::Invalid(_) => "InvalidSpec",
            Error::Serialize { .. } => "InternalError",
        }
    }

    /// The whole chain, for a condition message a user can act on.
    pub fn message(&self) -> String {
        error_chain(self)
    }
}
