//! What can stop a reconcile, and a short label per cause for logs, conditions, Events and metrics.

use crate::build::BuildError;
use crate::error_chain;
use crate::registry::RegistryError;
use crate::source::SourceError;
use crate::startup_check::StartupError;
use crate::worker::WorkerError;

/// Any error with its sources, for failures the controller did not expect.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API")]
    Kube(#[from] kube::Error),
    /// The worker's files could not be read (missing key, bucket, credentials, store down).
    #[error(transparent)]
    Source(#[from] SourceError),
    /// The files were read but do not make a valid worker.
    #[error(transparent)]
    InvalidWorker(#[from] WorkerError),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// The worker does not start when workerd loads it alone (or the check could not run).
    #[error(transparent)]
    Startup(#[from] StartupError),
    /// The object asks for something that cannot be done as written.
    #[error("{0}")]
    Invalid(String),
    /// A failure of the controller itself (a task that stopped, I/O, serialization): not the
    /// user's to fix, but reported as it is.
    #[error("{context}")]
    Internal {
        context: String,
        #[source]
        source: BoxError,
    },
}

impl Error {
    pub fn internal(context: impl Into<String>, source: impl Into<BoxError>) -> Self {
        Error::Internal { context: context.into(), source: source.into() }
    }

    /// A CamelCase reason, as conditions and Events want it; also the metrics' label.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Kube(_) => "KubernetesApiError",
            Error::Source(_) => "SourceUnavailable",
            Error::InvalidWorker(_) => "InvalidWorker",
            Error::Registry(_) => "RegistryError",
            Error::Startup(e) if e.is_workers_fault() => "WorkerCannotStart",
            Error::Startup(_) => "StartupCheckUnavailable",
            Error::Invalid(_) => "InvalidSpec",
            Error::Internal { .. } => "InternalError",
        }
    }

    /// The whole chain, for a condition message a user can act on.
    pub fn message(&self) -> String {
        error_chain(self)
    }
}

impl From<BuildError> for Error {
    fn from(error: BuildError) -> Self {
        match error {
            BuildError::Registry(e) => Error::Registry(e),
            BuildError::Invalid(message) => Error::Invalid(message),
            BuildError::Load(crate::source::LoadError::Source(e)) => Error::Source(e),
            BuildError::Load(crate::source::LoadError::Worker(e)) => Error::InvalidWorker(e),
            other => Error::internal("image build", other),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_failures_have_their_own_reason_and_keep_their_cause() {
        let io = std::io::Error::other("disk full");
        let error = Error::internal("cannot write the worker's layer", io);
        assert_eq!(error.reason(), "InternalError");
        assert_eq!(error.message(), "cannot write the worker's layer: disk full");
        let worker = Error::from(WorkerError { worker: "api".into(), message: "has no modules".into() });
        assert_eq!(
            (worker.reason(), worker.message().as_str()),
            ("InvalidWorker", "worker \"api\": has no modules")
        );
    }
}
