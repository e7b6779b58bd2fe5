//! Registries: push, pull, mount and delete over the OCI distribution API.
//!
//! The protocol is spoken directly over reqwest rather than through oci-client's push helpers:
//! those send every blob with their own POST/PUT sequence and cannot skip, mount-with-fallback,
//! upload in a single request, resume chunks, or tell us how many requests a push cost, and that
//! control is the whole point of this module (see push.rs for the rules).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

pub mod auth;
pub mod client;
pub mod connected;
mod pacer;
pub mod pull;
pub mod push;
pub mod record;
pub mod reference;

use crate::digest::Digest;
pub use auth::Credentials;
pub use client::{ClientOptions, RegistryClient, RetryPolicy};
pub use push::{push_image, BlobSource, PushBlob, PushMemory, PushReport};
pub use reference::RegistryRef;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("registry {registry}: {request} failed: {message}")]
    Transport { registry: String, request: String, message: String },
    /// No connection could be made (refused, unresolvable host, connect timeout).
    #[error("registry {registry}: {reason} ({request}, {attempts} attempt(s)); {hint}")]
    Connect { registry: String, request: String, reason: String, hint: String, attempts: u32 },
    #[error("registry {registry}: {request} answered HTTP {status} after {attempts} attempt(s): {message}")]
    Status { registry: String, request: String, status: u16, message: String, attempts: u32 },
    #[error("registry {registry}: {request} answered 401 Unauthorized: {message}")]
    Unauthorized { registry: String, request: String, message: String },
    #[error("registry {registry}: {message}")]
    Protocol { registry: String, message: String },
    #[error("pushing blob {digest}: {source}")]
    Blob { digest: Digest, source: Box<RegistryError> },
    #[error("{0}")]
    Config(String),
    #[error("{message}")]
    Local { message: String },
}

impl RegistryError {
    /// The registry refused a manifest because a blob it names is missing
    /// (`MANIFEST_BLOB_UNKNOWN` / `BLOB_UNKNOWN`).
    pub fn is_blob_unknown(&self) -> bool {
        matches!(self, RegistryError::Status { status: 400 | 404, message, .. } if message.contains("BLOB_UNKNOWN"))
    }

    /// The same error, saying how many attempts it took (for errors that count them).
    pub fn after_attempts(self, attempts: u32) -> Self {
        match self {
            RegistryError::Connect { registry, request, reason, hint, .. } => {
                RegistryError::Connect { registry, request, reason, hint, attempts }
            }
            other => other,
        }
    }

    /// Whether trying again may help (connection trouble, 408, 429, 5xx).
    pub fn is_transient(&self) -> bool {
        match self {
            RegistryError::Transport { .. } | RegistryError::Connect { .. } => true,
            RegistryError::Blob { source, .. } => source.is_transient(),
            RegistryError::Status { status, .. } => {
                reqwest::StatusCode::from_u16(*status).is_ok_and(client::is_transient)
            }
            _ => false,
        }
    }
}

type RegistryEntry = (Arc<RegistryClient>, Arc<PushMemory>);

/// One client and one push memory per registry host, shared by every build of a process (the CLI
/// runs one; the controller keeps it for its lifetime so a rebuild pays only for what changed).
pub struct Registries {
    options: RegistryOptions,
    clients: Mutex<HashMap<String, RegistryEntry>>,
}

/// Totals of one registry's client: requests (retries and token requests included) and request
/// body bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegistryTraffic {
    pub registry: String,
    pub requests: u64,
    pub bytes_sent: u64,
}

/// How to reach registries: credentials and transport.
#[derive(Clone, Debug, Default)]
pub struct RegistryOptions {
    /// `USER:PASS` for every registry.
    pub creds: Option<String>,
    /// A docker config.json (or Kubernetes `.dockerconfigjson`) to read credentials from.
    pub authfile: Option<std::path::PathBuf>,
    /// The raw `.dockerconfigjson` payload of a Kubernetes Secret.
    pub dockerconfigjson: Option<Vec<u8>>,
    /// Plain HTTP for loopback registries.
    pub insecure: bool,
    pub retry: RetryPolicy,
    /// Most requests per second to each registry; 0: no limit.
    pub requests_per_second: u32,
}

impl Registries {
    pub fn new(options: RegistryOptions) -> Self {
        Registries { options, clients: Default::default() }
    }

    /// Registries reached the same way, with the credentials of a `.dockerconfigjson` first (an
    /// account's image pull secret) and these registries' own for hosts it does not name.
    pub fn with_docker_config(&self, dockerconfigjson: Vec<u8>) -> Self {
        Registries::new(RegistryOptions { dockerconfigjson: Some(dockerconfigjson), ..self.options.clone() })
    }

    fn entry(&self, registry: &str) -> Result<(Arc<RegistryClient>, Arc<PushMemory>), RegistryError> {
        let mut clients =
            self.clients.lock().map_err(|_| RegistryError::Config("registry clients poisoned".into()))?;
        if let Some(entry) = clients.get(registry) {
            return Ok(entry.clone());
        }
        // An account's own secret first; the process's --creds/--authfile for registries it
        // does not name.
        let from_secret = match &self.options.dockerconfigjson {
            Some(payload) => auth::credentials_from_docker_config(payload, registry)
                .map_err(|e| RegistryError::Config(format!(".dockerconfigjson: {e}")))?,
            None => None,
        };
        let credentials = match from_secret {
            Some(credentials) => Some(credentials),
            None => auth::resolve_credentials(
                self.options.creds.as_deref(),
                self.options.authfile.as_deref(),
                registry,
            )
            .map_err(RegistryError::Config)?,
        };
        let loopback =
            RegistryRef { registry: registry.into(), repository: String::new(), tag: None, digest: None }
                .is_loopback();
        let options = ClientOptions {
            credentials,
            insecure: self.options.insecure,
            retry: self.options.retry.clone(),
            requests_per_second: self.options.requests_per_second,
        };
        let entry =
            (std::sync::Arc::new(RegistryClient::new(registry, loopback, options)?), Default::default());
        clients.insert(registry.to_owned(), entry.clone());
        Ok(entry)
    }

    pub fn client(&self, registry: &str) -> Result<Arc<RegistryClient>, RegistryError> {
        self.entry(registry).map(|(client, _)| client)
    }

    /// What was sent to each registry so far (for metrics).
    pub fn traffic(&self) -> Vec<RegistryTraffic> {
        let Ok(clients) = self.clients.lock() else { return Vec::new() };
        clients
            .iter()
            .map(|(registry, (client, _))| RegistryTraffic {
                registry: registry.clone(),
                requests: client.request_count(),
                bytes_sent: client.bytes_sent(),
            })
            .collect()
    }

    /// Cancels every upload session opened ahead and still unused, on every registry.
    pub async fn cancel_open_sessions(&self) {
        let entries: Vec<RegistryEntry> = match self.clients.lock() {
            Ok(clients) => clients.values().cloned().collect(),
            Err(_) => return,
        };
        let cancels = entries.iter().map(|(client, memory)| push::cancel_every_session(client, memory));
        futures::future::join_all(cancels).await;
    }

    /// The push memory of a registry (created with its client).
    pub fn memory(&self, registry: &str) -> Arc<PushMemory> {
        self.entry(registry).map(|(_, memory)| memory).unwrap_or_default()
    }
}
