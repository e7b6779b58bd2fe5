//! One registry, spoken to over HTTP: authentication on demand, retries with backoff and jitter,
//! and a count of every request sent (so pushes can be held to their round-trip budget).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use reqwest::header::{HeaderMap, HeaderValue, AUTHORIZATION, LOCATION, RETRY_AFTER, WWW_AUTHENTICATE};
use reqwest::{Method, Response, StatusCode};
use tracing::{debug, warn};

use super::auth::{parse_challenge, Challenge, Credentials};
use super::connected::ConnectionWatch;
use super::RegistryError;
use crate::error_chain;

#[derive(Clone, Debug)]
pub struct RetryPolicy {
    /// Attempts per request (or per upload chunk), the first included.
    pub attempts: u32,
    pub base_delay: Duration,
    pub max_delay: Duration,
    /// Attempts, the first included, while no connection can be made to a registry that has not
    /// answered once in this process. Such a registry is most likely not there at all (not
    /// started, wrong host or port), and the full backoff would only delay saying so; one that
    /// answered before is restarting or overloaded, and gets the full policy.
    pub unanswered_attempts: u32,
    /// The pause before the next of those attempts.
    pub unanswered_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts: 8,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(10),
            unanswered_attempts: 2,
            unanswered_delay: Duration::from_millis(500),
        }
    }
}

impl RetryPolicy {
    /// Exponential backoff with full jitter; a Retry-After from the registry wins when longer.
    fn delay(&self, attempt: u32, retry_after: Option<Duration>) -> Duration {
        let exp = self.base_delay.saturating_mul(1u32 << attempt.min(16)).min(self.max_delay);
        let jittered = exp.mul_f64(0.5 + fastrand::f64() * 0.5);
        retry_after.map_or(jittered, |ra| ra.min(self.max_delay * 3).max(jittered))
    }
}

#[derive(Clone, Debug, Default)]
pub struct ClientOptions {
    pub credentials: Option<Credentials>,
    /// Allow plain HTTP; only ever honoured for loopback registries.
    pub insecure: bool,
    pub retry: RetryPolicy,
    /// Most requests per second to this registry (retries and token requests included); 0: no
    /// limit.
    pub requests_per_second: u32,
}

/// A request that can be sent again: its body is reference-counted bytes.
#[derive(Clone, Debug)]
pub struct Req {
    pub method: Method,
    /// Either a path (`/v2/...`) or an absolute URL (upload locations).
    pub target: String,
    pub headers: HeaderMap,
    pub body: Option<Bytes>,
}

impl Req {
    pub fn new(method: Method, target: impl Into<String>) -> Self {
        Req { method, target: target.into(), headers: HeaderMap::new(), body: None }
    }

    pub fn header(mut self, name: reqwest::header::HeaderName, value: &str) -> Self {
        if let Ok(value) = HeaderValue::from_str(value) {
            self.headers.insert(name, value);
        }
        self
    }

    pub fn body(mut self, body: Bytes) -> Self {
        self.body = Some(body);
        self
    }
}

pub struct RegistryClient {
    http: reqwest::Client,
    registry: String,
    base_url: String,
    credentials: Option<Credentials>,
    /// Scopes asked for when a bearer token is needed (`repository:NAME:pull,push`).
    scopes: Mutex<Vec<String>>,
    authorization: Mutex<Option<String>>,
    retry: RetryPolicy,
    requests: AtomicU64,
    /// Request body bytes sent, retries included (what the registry link carried up).
    bytes_sent: AtomicU64,
    /// Whether the registry has sent any HTTP response (whatever its status) in this process.
    answered: AtomicBool,
    pacer: Option<super::pacer::Pacer>,
    connections: ConnectionWatch,
}

impl RegistryClient {
    pub fn new(registry: &str, loopback: bool, options: ClientOptions) -> Result<Self, RegistryError> {
        let scheme = if options.insecure {
            if !loopback {
                return Err(RegistryError::Config(format!(
                    "--insecure allows plain HTTP only for registries on this machine (127.0.0.1, ::1, localhost), not {registry}"
                )));
            }
            "http"
        } else {
            "https"
        };
        let connections = ConnectionWatch::new();
        let mut builder = reqwest::Client::builder().connector_layer(connections.clone());
        if loopback {
            // A registry on this machine is never reached through a proxy from the environment.
            builder = builder.no_proxy();
        }
        let http = builder
            .user_agent(concat!("workerbundle/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(300))
            .pool_max_idle_per_host(8)
            .build()
            .map_err(|e| RegistryError::Config(format!("cannot create an HTTP client: {e}")))?;
        Ok(RegistryClient {
            http,
            registry: registry.to_owned(),
            base_url: format!("{scheme}://{registry}"),
            credentials: options.credentials,
            scopes: Mutex::new(Vec::new()),
            authorization: Mutex::new(None),
            retry: options.retry,
            requests: AtomicU64::new(0),
            bytes_sent: AtomicU64::new(0),
            answered: AtomicBool::new(false),
            pacer: super::pacer::Pacer::new(options.requests_per_second),
            connections,
        })
    }

    pub fn registry(&self) -> &str {
        &self.registry
    }

    /// Whether credentials were given for this registry: without any, a registry that asks for
    /// them refuses the push whatever is sent first.
    pub fn has_credentials(&self) -> bool {
        self.credentials.is_some()
    }

    /// Waits until the first connection to the registry is made (`true`) or fails (`false`).
    pub async fn first_connection(&self) -> bool {
        self.connections.first_connection().await
    }

    /// Requests sent so far, retries and token requests included.
    pub fn request_count(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Request body bytes sent so far, retries included.
    pub fn bytes_sent(&self) -> u64 {
        self.bytes_sent.load(Ordering::Relaxed)
    }

    pub fn retry_policy(&self) -> &RetryPolicy {
        &self.retry
    }

    /// Adds `repository:NAME:ACTIONS` to the scopes a bearer token is asked for.
    pub fn want_scope(&self, repository: &str, actions: &str) {
        let scope = format!("repository:{repository}:{actions}");
        if let Ok(mut scopes) = self.scopes.lock() {
            if !scopes.contains(&scope) {
                scopes.push(scope);
            }
        }
    }

    pub fn url(&self, target: &str) -> String {
        if target.starts_with("http://") || target.starts_with("https://") {
            target.to_owned()
        } else {
            format!("{}{target}", self.base_url)
        }
    }

    /// Sends once: no retry, but a 401 is answered by authenticating and sending again.
    pub async fn send_once(&self, req: &Req) -> Result<Response, RegistryError> {
        let response = self.raw(req).await?;
        if response.status() != StatusCode::UNAUTHORIZED {
            return Ok(response);
        }
        self.authenticate(req, &response).await?;
        let response = self.raw(req).await?;
        if response.status() == StatusCode::UNAUTHORIZED {
            let message = registry_message(response).await;
            return Err(RegistryError::Unauthorized {
                registry: self.registry.clone(),
                request: describe(req),
                message,
            });
        }
        Ok(response)
    }

    /// Sends with retries on connection errors, 408, 429 and 5xx. Only for requests that are safe
    /// to repeat (GET, HEAD, PUT of a manifest, DELETE, starting an upload).
    ///
    /// The first retry of a request is a warning; later ones are debug lines, so a struggling
    /// registry costs one line per request rather than one per attempt. A registry that has never
    /// answered and takes no connections gets `unanswered_attempts` quick tries, not the backoff.
    pub async fn send(&self, req: &Req) -> Result<Response, RegistryError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let outcome = self.send_once(req).await;
            let (retry_after, why, no_connection) = match &outcome {
                Ok(r) if is_transient(r.status()) => {
                    (retry_after(r.headers()), format!("HTTP {}", r.status()), false)
                }
                Err(RegistryError::Transport { message, .. }) => (None, message.clone(), false),
                Err(RegistryError::Connect { registry, reason, .. }) => {
                    (None, format!("registry {registry}: {reason}"), true)
                }
                _ => return outcome,
            };
            let unanswered = no_connection && !self.answered.load(Ordering::Relaxed);
            let attempts = if unanswered {
                self.retry.attempts.min(self.retry.unanswered_attempts)
            } else {
                self.retry.attempts
            };
            if attempt >= attempts {
                return match outcome {
                    Ok(response) => Err(self.status_error(req, response, attempt).await),
                    Err(e) => Err(e.after_attempts(attempt)),
                };
            }
            let delay =
                if unanswered { self.retry.unanswered_delay } else { self.retry.delay(attempt, retry_after) };
            if attempt == 1 {
                warn!(request = %describe(req), ?delay, "{why}; retrying");
            } else {
                debug!(request = %describe(req), attempt, ?delay, "{why}; retrying");
            }
            tokio::time::sleep(delay).await;
        }
    }

    /// The error for a response the caller did not expect, with the registry's own message.
    pub async fn status_error(&self, req: &Req, response: Response, attempts: u32) -> RegistryError {
        let status = response.status();
        RegistryError::Status {
            registry: self.registry.clone(),
            request: describe(req),
            status: status.as_u16(),
            message: registry_message(response).await,
            attempts,
        }
    }

    async fn raw(&self, req: &Req) -> Result<Response, RegistryError> {
        if let Some(pacer) = &self.pacer {
            pacer.turn().await;
        }
        self.requests.fetch_add(1, Ordering::Relaxed);
        let mut builder =
            self.http.request(req.method.clone(), self.url(&req.target)).headers(req.headers.clone());
        if let Some(auth) = self.authorization.lock().ok().and_then(|a| a.clone()) {
            builder = builder.header(AUTHORIZATION, auth);
        }
        if let Some(body) = &req.body {
            self.bytes_sent.fetch_add(body.len() as u64, Ordering::Relaxed);
            builder = builder.body(body.clone());
        } else if matches!(req.method, Method::PUT | Method::POST | Method::PATCH) {
            builder = builder.header(reqwest::header::CONTENT_LENGTH, "0");
        }
        debug!(request = %describe(req), "sending");
        match builder.send().await {
            Ok(response) => {
                self.answered.store(true, Ordering::Relaxed);
                if super::record::enabled() {
                    let location = response.headers().get(LOCATION).and_then(|v| v.to_str().ok());
                    super::record::record(
                        req.method.as_str(),
                        &self.url(&req.target),
                        &req.headers,
                        req.body.clone().unwrap_or_default(),
                        location,
                    );
                }
                Ok(response)
            }
            Err(e) if e.is_connect() => {
                let (reason, hint) = connect_failure(&e);
                Err(RegistryError::Connect {
                    registry: self.registry.clone(),
                    request: describe(req),
                    reason,
                    hint: hint.into(),
                    attempts: 1,
                })
            }
            Err(e) => Err(RegistryError::Transport {
                registry: self.registry.clone(),
                request: describe(req),
                message: error_chain(&e),
            }),
        }
    }

    async fn authenticate(&self, req: &Req, response: &Response) -> Result<(), RegistryError> {
        let unauthorized = |message: String| RegistryError::Unauthorized {
            registry: self.registry.clone(),
            request: describe(req),
            message,
        };
        let header =
            response.headers().get(WWW_AUTHENTICATE).and_then(|v| v.to_str().ok()).unwrap_or_default();
        let value = match parse_challenge(header) {
            Some(Challenge::Basic) => {
                self.credentials.as_ref().map(Credentials::basic_header).ok_or_else(|| {
                    unauthorized(
                        "the registry wants a user name and password (--creds, --authfile or docker login)"
                            .into(),
                    )
                })?
            }
            Some(Challenge::Bearer { realm, service, scope }) => {
                format!(
                    "Bearer {}",
                    self.fetch_token(req, &realm, service.as_deref(), scope.as_deref()).await?
                )
            }
            None => return Err(unauthorized(format!("unsupported auth challenge {header:?}"))),
        };
        if let Ok(mut auth) = self.authorization.lock() {
            *auth = Some(value);
        }
        Ok(())
    }

    async fn fetch_token(
        &self,
        req: &Req,
        realm: &str,
        service: Option<&str>,
        scope: Option<&str>,
    ) -> Result<String, RegistryError> {
        let mut query: Vec<(&str, String)> = Vec::new();
        if let Some(service) = service {
            query.push(("service", service.to_owned()));
        }
        let mut scopes = self.scopes.lock().map(|s| s.clone()).unwrap_or_default();
        if let Some(scope) = scope {
            if !scopes.iter().any(|s| s == scope) {
                scopes.push(scope.to_owned());
            }
        }
        query.extend(scopes.into_iter().map(|s| ("scope", s)));
        let mut token_req = self.http.get(realm).query(&query);
        if let Some(creds) = &self.credentials {
            token_req = token_req.basic_auth(&creds.username, Some(&creds.password));
        }
        self.requests.fetch_add(1, Ordering::Relaxed);
        let fail = |message: String| RegistryError::Unauthorized {
            registry: self.registry.clone(),
            request: describe(req),
            message: format!("token from {realm}: {message}"),
        };
        let response = token_req.send().await.map_err(|e| fail(error_chain(&e)))?;
        if !response.status().is_success() {
            let status = response.status();
            return Err(fail(format!("HTTP {status}: {}", registry_message(response).await)));
        }
        #[derive(serde::Deserialize)]
        struct Token {
            token: Option<String>,
            access_token: Option<String>,
        }
        let body = response.bytes().await.map_err(|e| fail(format!("unreadable token answer: {e}")))?;
        let token: Token =
            serde_json::from_slice(&body).map_err(|e| fail(format!("unreadable token answer: {e}")))?;
        token.token.or(token.access_token).ok_or_else(|| fail("the answer holds no token".into()))
    }
}

/// Why no connection could be made, and what to check, in words a user can act on. reqwest's
/// own text repeats the URL and wraps the cause in three layers ("error sending request for url
/// (...): client error (Connect): tcp connect error: Connection refused (os error 111)").
fn connect_failure(error: &reqwest::Error) -> (String, &'static str) {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(cause) = source {
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::ConnectionRefused {
                return ("connection refused".into(), "is the registry running, at that host and port?");
            }
        }
        source = cause.source();
    }
    if error.is_timeout() {
        return ("no connection within 10 s".into(), "is the host reachable, and the port open?");
    }
    (format!("cannot connect: {}", error_chain(error)), "check the host name and the network")
}

pub fn is_transient(status: StatusCode) -> bool {
    status == StatusCode::REQUEST_TIMEOUT
        || status == StatusCode::TOO_MANY_REQUESTS
        || status.is_server_error()
}

fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?;
    value.trim().parse::<u64>().ok().map(Duration::from_secs)
}

pub fn describe(req: &Req) -> String {
    let path = req.target.split('?').next().unwrap_or_default();
    let path = path.find("/v2/").map_or(path, |i| &path[i..]);
    format!("{} {path}", req.method)
}

/// The registry's error message (`errors[].message` of the distribution spec), else the body.
pub async fn registry_message(response: Response) -> String {
    let status = response.status();
    let body = response.text().await.unwrap_or_default();
    #[derive(serde::Deserialize)]
    struct Errors {
        errors: Vec<ErrorEntry>,
    }
    #[derive(serde::Deserialize)]
    struct ErrorEntry {
        code: Option<String>,
        message: Option<String>,
    }
    match serde_json::from_str::<Errors>(&body) {
        Ok(errors) if !errors.errors.is_empty() => errors
            .errors
            .iter()
            .map(|e| {
                format!("{}: {}", e.code.as_deref().unwrap_or("ERROR"), e.message.as_deref().unwrap_or(""))
            })
            .collect::<Vec<_>>()
            .join("; "),
        _ if body.trim().is_empty() => format!("HTTP {status}"),
        _ => body.chars().take(300).collect(),
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use super::*;

    fn client(port: u16) -> RegistryClient {
        let retry = RetryPolicy {
            attempts: 4,
            base_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(5),
            unanswered_attempts: 2,
            unanswered_delay: Duration::from_millis(1),
        };
        let options = ClientOptions { insecure: true, retry, ..Default::default() };
        RegistryClient::new(&format!("127.0.0.1:{port}"), true, options).unwrap()
    }

    #[tokio::test]
    async fn a_registry_that_never_answered_gets_the_quick_attempts_only() {
        // Bound and released at once: nothing listens there.
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let client = client(port);
        let error = client.send(&Req::new(Method::GET, "/v2/")).await.unwrap_err();
        assert_eq!(client.request_count(), 2);
        assert!(matches!(error, RegistryError::Connect { attempts: 2, .. }), "{error}");
        let message = error.to_string();
        assert!(message.starts_with(&format!("registry 127.0.0.1:{port}: connection refused")), "{message}");
    }

    #[tokio::test]
    async fn a_registry_that_answered_before_gets_the_full_policy() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        // Answers one request, then goes away (the listener is dropped): a registry restarting.
        let server = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let _ = stream.read(&mut [0u8; 4096]);
            stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n").unwrap();
        });
        let client = client(port);
        let response = client.send(&Req::new(Method::GET, "/v2/")).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        server.join().unwrap();
        let error = client.send(&Req::new(Method::GET, "/v2/")).await.unwrap_err();
        assert_eq!(client.request_count(), 1 + 4);
        assert!(matches!(error, RegistryError::Connect { attempts: 4, .. }), "{error}");
    }
}
