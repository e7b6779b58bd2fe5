//! Pushing an image at the floor of round trips.
//!
//! - Blobs the repository is known to hold are not sent: known from this process's own pushes,
//!   or learned with ONE GET of the manifest the tag points at now (never a HEAD per base layer);
//!   not even that GET where the caller knows the repository is new ([`assume_new_repository`])
//!   or what it holds ([`assume_holds`]: what this machine's last push left there).
//! - Base layers in another repository of the same registry are mounted; a 202 answer (mount
//!   refused) cancels the stray session and falls back to an upload.
//! - Blobs under 4 MiB go up in one request (`POST ?digest=`) where the registry takes it, else
//!   POST + PUT; larger blobs go in chunks under 4 MiB, resuming from the registry's offset after
//!   a failure.
//! - Blobs go up in parallel (bounded); the manifest is PUT last, only after every blob it names
//!   is confirmed, so a tag never points at a manifest with a missing blob.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Mutex;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use reqwest::header::{CONTENT_RANGE, CONTENT_TYPE, LOCATION, RANGE};
use reqwest::{Method, StatusCode};
use tracing::{debug, info, info_span, warn, Instrument};

use super::client::{describe, is_transient, RegistryClient, Req};
use super::pull::{fetch_blob, MANIFEST_ACCEPT};
use super::RegistryError;
use crate::digest::Digest;

/// The largest body of one upload request: some registries (GHCR) refuse requests over 4 MiB.
pub const MAX_REQUEST_BODY: usize = 4 * 1024 * 1024 - 64 * 1024;
/// Largest blob sent with `POST ?digest=` before the registry has shown it takes them.
const PROBE_LIMIT: usize = 64 * 1024;
/// Blobs uploaded at once.
pub const PARALLEL_UPLOADS: usize = 4;

/// Where a blob's bytes come from.
#[derive(Clone, Debug)]
pub enum BlobSource {
    Memory(Bytes),
    /// A blob file of an OCI layout: HEADed first (it is probably there from an earlier push).
    File(PathBuf),
    /// Another repository of the same registry: mounted.
    Repository(String),
}

#[derive(Clone, Debug)]
pub struct PushBlob {
    pub digest: Digest,
    pub size: u64,
    pub source: BlobSource,
}

/// What a registry's repositories are known to hold, and what the registry can do; kept for the
/// life of the process so that a second push pays only for what changed.
#[derive(Debug, Default)]
pub struct PushMemory {
    known: Mutex<HashSet<(String, Digest)>>,
    learned: Mutex<HashSet<String>>,
    single_request_upload: Mutex<Option<bool>>,
    /// Upload sessions opened ahead of need, by repository (see [`open_sessions_ahead`] and
    /// [`keep_sessions`]). Any of a repository's sessions serves any of its blobs.
    sessions: Mutex<HashMap<String, Vec<String>>>,
    /// Repositories whose [`keep_sessions`] POST is in flight.
    opening: Mutex<HashSet<String>>,
}

impl PushMemory {
    fn knows(&self, repo: &str, digest: &Digest) -> bool {
        self.known.lock().is_ok_and(|k| k.contains(&(repo.to_owned(), digest.clone())))
    }

    fn remember(&self, repo: &str, digest: &Digest) {
        if let Ok(mut known) = self.known.lock() {
            known.insert((repo.to_owned(), digest.clone()));
        }
    }

    fn forget_repository(&self, repo: &str) {
        if let Ok(mut known) = self.known.lock() {
            known.retain(|(r, _)| r != repo);
        }
    }

    fn single_request(&self) -> Option<bool> {
        self.single_request_upload.lock().ok().and_then(|v| *v)
    }

    fn set_single_request(&self, value: bool) {
        if let Ok(mut v) = self.single_request_upload.lock() {
            *v = Some(value);
        }
    }

    fn take_session(&self, repo: &str) -> Option<String> {
        self.sessions.lock().ok()?.get_mut(repo)?.pop()
    }

    fn add_session(&self, repo: &str, location: String) {
        if let Ok(mut sessions) = self.sessions.lock() {
            sessions.entry(repo.to_owned()).or_default().push(location);
        }
    }

    fn take_all_sessions(&self, repo: &str) -> Vec<String> {
        self.sessions.lock().ok().and_then(|mut s| s.remove(repo)).unwrap_or_default()
    }

    /// Claims the right to open the sessions the repository lacks to have `count` open: how
    /// many, or `None` when it has them already or another task is opening some.
    fn claim_opening(&self, repo: &str, count: usize) -> Option<usize> {
        let open = self.sessions.lock().ok()?.get(repo).map_or(0, Vec::len);
        let missing = count.checked_sub(open).filter(|m| *m > 0)?;
        self.opening.lock().ok()?.insert(repo.to_owned()).then_some(missing)
    }

    fn opened(&self, repo: &str) {
        if let Ok(mut opening) = self.opening.lock() {
            opening.remove(repo);
        }
    }

    /// Every session still open, on any repository, emptying the memory of them.
    fn take_every_session(&self) -> Vec<String> {
        let Ok(mut sessions) = self.sessions.lock() else { return Vec::new() };
        sessions.drain().flat_map(|(_, list)| list).collect()
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PushReport {
    pub uploaded: usize,
    pub mounted: usize,
    pub skipped: usize,
    /// Requests sent to the registry during this push (token requests included).
    pub requests: u64,
}

enum Outcome {
    Uploaded,
    Mounted,
    Present,
}

pub async fn push_image(
    client: &RegistryClient,
    memory: &PushMemory,
    repo: &str,
    tag: &str,
    blobs: Vec<PushBlob>,
    manifest_media_type: &str,
    manifest: Bytes,
) -> Result<(Digest, PushReport), RegistryError> {
    let span = info_span!("push", registry = client.registry(), repo, tag);
    async move {
        let start = client.request_count();
        for blob in &blobs {
            if let BlobSource::Repository(from) = &blob.source {
                client.want_scope(from, "pull");
            }
        }
        learn_repository(client, memory, repo, tag).await?;

        let digest = Digest::of(&manifest);
        let mut report = PushReport::default();
        let mut recovering = false;
        loop {
            push_blobs(client, memory, repo, &blobs, &mut report).await?;
            match put_manifest(client, repo, tag, manifest_media_type, &manifest, &digest).await {
                // The registry lost a blob this process remembered (deleted, garbage-collected):
                // forget what we knew of the repository and send every blob it lacks, once.
                Err(e) if e.is_blob_unknown() && !recovering => {
                    warn!(error = %e, "the registry no longer holds a blob it had; pushing what it lacks");
                    memory.forget_repository(repo);
                    report = PushReport::default();
                    recovering = true;
                }
                outcome => break outcome?,
            }
        }
        memory.remember(repo, &digest);
        cancel_sessions(client, memory, repo).await;
        report.requests = client.request_count() - start;
        info!(%digest, uploaded = report.uploaded, mounted = report.mounted, skipped = report.skipped, requests = report.requests, "pushed");
        Ok((digest, report))
    }
    .instrument(span)
    .await
}

/// Sends every blob the repository is not known to hold (each digest once), in parallel.
async fn push_blobs(
    client: &RegistryClient,
    memory: &PushMemory,
    repo: &str,
    blobs: &[PushBlob],
    report: &mut PushReport,
) -> Result<(), RegistryError> {
    let mut pending = Vec::new();
    let mut seen = HashSet::new();
    for blob in blobs {
        if !seen.insert(blob.digest.clone()) {
            continue;
        }
        let same_repo = matches!(&blob.source, BlobSource::Repository(from) if from == repo);
        if memory.knows(repo, &blob.digest) || same_repo {
            report.skipped += 1;
        } else {
            pending.push(blob.clone());
        }
    }
    let outcomes: Vec<Outcome> = futures::stream::iter(pending.into_iter().map(|blob| async move {
        let digest = blob.digest.clone();
        push_blob(client, memory, repo, blob)
            .await
            .map_err(|source| RegistryError::Blob { digest, source: Box::new(source) })
    }))
    .buffer_unordered(PARALLEL_UPLOADS)
    .try_collect()
    .await?;
    for outcome in outcomes {
        match outcome {
            Outcome::Uploaded => report.uploaded += 1,
            Outcome::Mounted => report.mounted += 1,
            Outcome::Present => report.skipped += 1,
        }
    }
    Ok(())
}

/// PUTs the manifest under the tag and checks the digest the registry stored it as.
async fn put_manifest(
    client: &RegistryClient,
    repo: &str,
    tag: &str,
    media_type: &str,
    manifest: &Bytes,
    digest: &Digest,
) -> Result<(), RegistryError> {
    let req = Req::new(Method::PUT, format!("/v2/{repo}/manifests/{tag}"))
        .header(CONTENT_TYPE, media_type)
        .body(manifest.clone());
    let response = client.send(&req).await?;
    if response.status() != StatusCode::CREATED {
        return Err(client.status_error(&req, response, 1).await);
    }
    if let Some(echoed) = response.headers().get("docker-content-digest").and_then(|v| v.to_str().ok()) {
        if echoed != digest.as_str() {
            return Err(RegistryError::Protocol {
                registry: client.registry().into(),
                message: format!("stored the manifest as {echoed}, but its digest is {digest}"),
            });
        }
    }
    Ok(())
}

/// Makes sure one blob is in the repository: known from this process (no request), present (one
/// HEAD, when `check_first`), or uploaded. Returns whether it was uploaded. The controller pushes
/// each worker's layer this way when its release is built, long before any manifest names it; a
/// new layer is not HEADed first (it is almost never there, and the HEAD was a sixth of the
/// registry's requests at scale), one the release recorded before is.
pub async fn push_blob_if_missing(
    client: &RegistryClient,
    memory: &PushMemory,
    repo: &str,
    digest: &Digest,
    bytes: Bytes,
    check_first: bool,
) -> Result<bool, RegistryError> {
    client.want_scope(repo, "pull,push");
    if memory.knows(repo, digest) {
        return Ok(false);
    }
    let uploaded = if check_first && exists(client, repo, digest).await? {
        false
    } else {
        upload(client, memory, repo, digest, &UploadBody::Memory(bytes))
            .await
            .map_err(|source| RegistryError::Blob { digest: digest.clone(), source: Box::new(source) })?;
        true
    };
    memory.remember(repo, digest);
    Ok(uploaded)
}

/// Opens `count` upload sessions (`POST /blobs/uploads/`, at once) while the caller is busy with
/// something else, typically assembling the image: a blob that turns out to be new then goes up
/// with ONE request (the PUT) after assembly instead of two. A fresh CLI whose push changes one
/// worker sends two new blobs (that worker's layer and the image config), so it opens two; a
/// session no blob used is cancelled after the push. Failures are left to the upload itself.
pub async fn open_sessions_ahead(client: &RegistryClient, memory: &PushMemory, repo: &str, count: usize) {
    if memory.single_request() == Some(true) {
        // POST ?digest= with the body is already one request per blob.
        return;
    }
    client.want_scope(repo, "pull,push");
    let opened = futures::future::join_all((0..count).map(|_| open_session(client, repo))).await;
    for session in opened.into_iter().flatten() {
        memory.add_session(repo, session);
    }
}

/// Makes sure `count` upload sessions of the repository are open for its next blobs, unless
/// sessions are being opened already: the long-running controller's way of taking POSTs off the
/// path of a change. A new release opens one while its sources are read, for its layer, or two
/// when its bundle's next image config can go up beside the layer (see
/// `controller::bundle::ahead`); after a layer went up without it, one is opened for that config,
/// which comes a debounce later. Sessions are kept for the blobs a change is about to send and no
/// more, whatever the number of releases in flight, so a change costs the same requests as
/// before (POSTs sent earlier, not extra ones). An unused session is cancelled by the
/// repository's next image push, or at shutdown ([`cancel_every_session`]); one the registry has
/// expired meanwhile costs a fresh POST.
pub async fn keep_sessions(client: &RegistryClient, memory: &PushMemory, repo: &str, count: usize) {
    let Some(missing) = memory.claim_opening(repo, count) else { return };
    open_sessions_ahead(client, memory, repo, missing).await;
    memory.opened(repo);
}

/// Cancels every upload session this process still holds open, on every repository: at shutdown,
/// so that none is left on the registry (bounded by the caller's deadline).
pub async fn cancel_every_session(client: &RegistryClient, memory: &PushMemory) {
    cancel(client, memory.take_every_session()).await;
}

/// One `POST /blobs/uploads/` ahead of need: the session's Location, or `None` (the upload then
/// opens its own).
async fn open_session(client: &RegistryClient, repo: &str) -> Option<String> {
    start_upload(client, repo).await.map_err(|e| debug!(error = %e, "no upload session opened ahead")).ok()
}

/// `POST /blobs/uploads/` with no body: asks for a new upload session.
fn new_session(repo: &str) -> Req {
    Req::new(Method::POST, format!("/v2/{repo}/blobs/uploads/"))
}

/// `POST /blobs/uploads/`: a new upload session's Location.
async fn start_upload(client: &RegistryClient, repo: &str) -> Result<String, RegistryError> {
    let start = new_session(repo);
    let response = client.send(&start).await?;
    if response.status() != StatusCode::ACCEPTED {
        return Err(client.status_error(&start, response, 1).await);
    }
    location(&response).ok_or_else(|| missing_location(client, &start))
}

/// Cancels the sessions opened ahead that no blob used, so that none is left on the registry.
async fn cancel_sessions(client: &RegistryClient, memory: &PushMemory, repo: &str) {
    cancel(client, memory.take_all_sessions(repo)).await;
}

async fn cancel(client: &RegistryClient, sessions: Vec<String>) {
    let cancels = sessions.into_iter().map(|session| async move {
        if let Err(e) = client.send_once(&Req::new(Method::DELETE, session)).await {
            debug!(error = %e, "an unused upload session was not cancelled");
        }
    });
    futures::future::join_all(cancels).await;
}

/// Skips the GET of [`learn_repository`] for a repository the caller knows holds nothing of its
/// own to reuse (the first image of a new bundle); a blob that is there all the same is uploaded
/// again, which the registry takes as any upload.
pub fn assume_new_repository(memory: &PushMemory, repo: &str) {
    if let Ok(mut learned) = memory.learned.lock() {
        learned.insert(repo.to_owned());
    }
}

/// Skips the GET of [`learn_repository`] for a repository the caller knows holds `blobs` (what
/// its last push from this machine left there). Knowledge that turns out wrong costs the push a
/// refused manifest PUT and the blobs the repository lacks, as for anything this process
/// remembers ([`push_image`]).
pub fn assume_holds(memory: &PushMemory, repo: &str, blobs: &[Digest]) {
    assume_new_repository(memory, repo);
    for blob in blobs {
        memory.remember(repo, blob);
    }
}

/// What a fresh process does before it pushes, while its image is assembled: learns what the
/// repository holds, from `known` (what this machine's last push left there, see
/// [`assume_holds`]) or else with the GET of [`learn_repository`], and opens `count` upload
/// sessions ahead. The first request goes first: the GET, or with `known` the first POST in its
/// place. The other POSTs wait for its answer where there are credentials (on a registry that asks
/// for a token, requests sent before the first answer would each be refused and sent again), and
/// otherwise only for its connection: a round trip less, and a registry that takes no connection
/// gets the first request's attempts alone. (A registry that wants a token without credentials
/// refuses the push anyway, or, if it hands anonymous ones out for pushing, costs one refused
/// POST each.) A first request that cannot reach the registry ends the build at once.
pub async fn prepare_push(
    client: &RegistryClient,
    memory: &PushMemory,
    repo: &str,
    tag: &str,
    known: Option<&[Digest]>,
    count: usize,
) -> Result<(), RegistryError> {
    client.want_scope(repo, "pull,push");
    let first = async {
        match known {
            Some(blobs) => {
                assume_holds(memory, repo, blobs);
                let response = client.send(&new_session(repo)).await?;
                match (response.status(), location(&response)) {
                    (StatusCode::ACCEPTED, Some(session)) => memory.add_session(repo, session),
                    // Left to the upload, which reports it with its context.
                    (status, _) => debug!(%status, "no upload session opened ahead"),
                }
                Ok(())
            }
            None => learn_repository(client, memory, repo, tag).await,
        }
    };
    let rest = if known.is_some() { count.saturating_sub(1) } else { count };
    if client.has_credentials() {
        first.await?;
        open_sessions_ahead(client, memory, repo, rest).await;
    } else {
        let others = async {
            if client.first_connection().await {
                open_sessions_ahead(client, memory, repo, rest).await;
            }
            Ok(())
        };
        futures::future::try_join(first, others).await?;
    }
    Ok(())
}

/// One GET of the manifest the tag points at now tells which blobs the repository holds; done
/// once per repository and process (later pushes know what they pushed).
pub async fn learn_repository(
    client: &RegistryClient,
    memory: &PushMemory,
    repo: &str,
    tag: &str,
) -> Result<(), RegistryError> {
    client.want_scope(repo, "pull,push");
    let first_time = memory.learned.lock().is_ok_and(|mut l| l.insert(repo.to_owned()));
    if !first_time {
        return Ok(());
    }
    let req = Req::new(Method::GET, format!("/v2/{repo}/manifests/{tag}"))
        .header(reqwest::header::ACCEPT, MANIFEST_ACCEPT);
    let response = client.send(&req).await?;
    if !response.status().is_success() {
        debug!(status = %response.status(), "no current manifest to learn from");
        return Ok(());
    }
    let body = response.bytes().await.unwrap_or_default();
    let Ok(manifest) = serde_json::from_slice::<serde_json::Value>(&body) else { return Ok(()) };
    let descriptors =
        manifest["layers"].as_array().into_iter().flatten().chain(std::iter::once(&manifest["config"]));
    for digest in descriptors.filter_map(|d| d["digest"].as_str()).filter_map(Digest::parse) {
        memory.remember(repo, &digest);
    }
    Ok(())
}

async fn push_blob(
    client: &RegistryClient,
    memory: &PushMemory,
    repo: &str,
    blob: PushBlob,
) -> Result<Outcome, RegistryError> {
    let outcome = match &blob.source {
        BlobSource::Repository(from) => match mount(client, repo, from, &blob.digest).await? {
            true => Outcome::Mounted,
            false => {
                let bytes = fetch_blob(client, from, &blob.digest).await?;
                upload(client, memory, repo, &blob.digest, &UploadBody::Memory(bytes)).await?
            }
        },
        BlobSource::File(path) => {
            if exists(client, repo, &blob.digest).await? {
                Outcome::Present
            } else {
                let body = UploadBody::File { path: path.clone(), len: blob.size };
                upload(client, memory, repo, &blob.digest, &body).await?
            }
        }
        BlobSource::Memory(bytes) => {
            upload(client, memory, repo, &blob.digest, &UploadBody::Memory(bytes.clone())).await?
        }
    };
    memory.remember(repo, &blob.digest);
    Ok(outcome)
}

async fn exists(client: &RegistryClient, repo: &str, digest: &Digest) -> Result<bool, RegistryError> {
    let response = client.send(&Req::new(Method::HEAD, format!("/v2/{repo}/blobs/{digest}"))).await?;
    Ok(response.status().is_success())
}

/// Cross-repository mount; `false` when the registry declined (its upload session is cancelled).
async fn mount(
    client: &RegistryClient,
    repo: &str,
    from: &str,
    digest: &Digest,
) -> Result<bool, RegistryError> {
    let req = Req::new(Method::POST, format!("/v2/{repo}/blobs/uploads/?mount={digest}&from={from}"));
    let response = client.send(&req).await?;
    match response.status() {
        StatusCode::CREATED => Ok(true),
        StatusCode::ACCEPTED => {
            if let Some(location) = location(&response) {
                let _ = client.send_once(&Req::new(Method::DELETE, location)).await;
            }
            warn!(%digest, from, "cross-repository mount declined; uploading instead");
            Ok(false)
        }
        _ => Err(client.status_error(&req, response, 1).await),
    }
}

/// Uploads one blob; a failure in the middle starts a fresh session (after checking whether the
/// blob arrived after all).
/// A blob's bytes as they go up: in memory, or a file read one request body at a time, so that
/// pushing a layer from disk holds at most one chunk of it, whatever its size.
enum UploadBody {
    Memory(Bytes),
    File { path: PathBuf, len: u64 },
}

impl UploadBody {
    fn len(&self) -> usize {
        match self {
            UploadBody::Memory(bytes) => bytes.len(),
            UploadBody::File { len, .. } => usize::try_from(*len).unwrap_or(usize::MAX),
        }
    }

    async fn slice(&self, range: std::ops::Range<usize>) -> Result<Bytes, RegistryError> {
        match self {
            UploadBody::Memory(bytes) => Ok(bytes.slice(range)),
            UploadBody::File { path, .. } => {
                let path = path.clone();
                let read = tokio::task::spawn_blocking(move || {
                    use std::os::unix::fs::FileExt;
                    let mut buf = vec![0; range.len()];
                    std::fs::File::open(&path)?.read_exact_at(&mut buf, range.start as u64)?;
                    Ok::<_, std::io::Error>(Bytes::from(buf))
                });
                let failed = |message: String| RegistryError::Local { message };
                read.await
                    .map_err(|e| failed(format!("reading a blob stopped: {e}")))?
                    .map_err(|e| failed(format!("cannot read blob {}: {e}", self.describe())))
            }
        }
    }

    fn describe(&self) -> String {
        match self {
            UploadBody::Memory(_) => "in memory".into(),
            UploadBody::File { path, .. } => path.display().to_string(),
        }
    }
}

async fn upload(
    client: &RegistryClient,
    memory: &PushMemory,
    repo: &str,
    digest: &Digest,
    body: &UploadBody,
) -> Result<Outcome, RegistryError> {
    // No local re-hash: the registry checks the digest on the final PUT (distribution spec), and
    // hashing a base layer again would cost more than its upload on loopback.
    let policy = client.retry_policy().clone();
    let mut attempt = 0;
    loop {
        attempt += 1;
        let result = if body.len() <= MAX_REQUEST_BODY {
            match body.slice(0..body.len()).await {
                Ok(bytes) => upload_small(client, memory, repo, digest, bytes).await,
                Err(e) => Err(e),
            }
        } else {
            upload_chunked(client, memory, repo, digest, body).await
        };
        match result {
            Ok(()) => return Ok(Outcome::Uploaded),
            Err(e) if e.is_transient() && attempt < policy.attempts => {
                // One warning per blob; the attempts after it are detail.
                if attempt == 1 {
                    warn!(%digest, error = %e, "upload failed; starting again");
                } else {
                    debug!(%digest, attempt, error = %e, "upload failed; starting again");
                }
                tokio::time::sleep(policy.base_delay * attempt).await;
                if exists(client, repo, digest).await? {
                    return Ok(Outcome::Uploaded);
                }
            }
            Err(e) => return Err(e),
        }
    }
}

async fn upload_small(
    client: &RegistryClient,
    memory: &PushMemory,
    repo: &str,
    digest: &Digest,
    bytes: Bytes,
) -> Result<(), RegistryError> {
    if let Some(session) = memory.take_session(repo) {
        let put = Req::new(Method::PUT, with_digest(&session, digest))
            .header(CONTENT_TYPE, "application/octet-stream")
            .body(bytes.clone());
        let response = client.send_once(&put).await?;
        match response.status() {
            StatusCode::CREATED => return Ok(()),
            // Opened a while ago (a kept session) and expired by the registry: open a fresh one.
            StatusCode::NOT_FOUND => debug!("the upload session opened ahead is gone; opening another"),
            _ => return Err(client.status_error(&put, response, 1).await),
        }
    }
    // Until the registry has shown whether it takes single-request uploads, only small blobs
    // probe it: a refusal (202) would have sent the body for nothing.
    let single = match memory.single_request() {
        Some(known) => known,
        None => bytes.len() <= PROBE_LIMIT,
    };
    let start = if single {
        Req::new(Method::POST, format!("/v2/{repo}/blobs/uploads/?digest={digest}"))
            .header(CONTENT_TYPE, "application/octet-stream")
            .body(bytes.clone())
    } else {
        new_session(repo)
    };
    let response = client.send(&start).await?;
    match response.status() {
        StatusCode::CREATED if start.body.is_some() => {
            memory.set_single_request(true);
            return Ok(());
        }
        StatusCode::ACCEPTED => {
            if start.body.is_some() {
                debug!("registry does not take single-request uploads; using POST + PUT");
                memory.set_single_request(false);
            }
        }
        _ => return Err(client.status_error(&start, response, 1).await),
    }
    let session = location(&response).ok_or_else(|| missing_location(client, &start))?;
    let put = Req::new(Method::PUT, with_digest(&session, digest))
        .header(CONTENT_TYPE, "application/octet-stream")
        .body(bytes);
    expect_created(client, &put).await
}

async fn upload_chunked(
    client: &RegistryClient,
    memory: &PushMemory,
    repo: &str,
    digest: &Digest,
    body: &UploadBody,
) -> Result<(), RegistryError> {
    let (mut session, mut opened_ahead) = match memory.take_session(repo) {
        Some(session) => (session, true),
        None => (start_upload(client, repo).await?, false),
    };
    let mut offset = 0usize;
    let policy = client.retry_policy().clone();
    let mut failures = 0;
    while offset < body.len() {
        let end = (offset + MAX_REQUEST_BODY).min(body.len());
        let patch = Req::new(Method::PATCH, session.clone())
            .header(CONTENT_TYPE, "application/octet-stream")
            .header(CONTENT_RANGE, &format!("{offset}-{}", end - 1))
            .body(body.slice(offset..end).await?);
        let failure = match client.send_once(&patch).await {
            Ok(r) if r.status() == StatusCode::ACCEPTED => {
                session = location(&r).unwrap_or(session);
                offset = end;
                failures = 0;
                opened_ahead = false;
                continue;
            }
            // A session opened ahead that the registry has expired meanwhile: a fresh one.
            Ok(r) if opened_ahead && r.status() == StatusCode::NOT_FOUND => {
                debug!("the upload session opened ahead is gone; opening another");
                session = start_upload(client, repo).await?;
                opened_ahead = false;
                continue;
            }
            Ok(r) if is_transient(r.status()) => client.status_error(&patch, r, 1).await,
            Ok(r) => return Err(client.status_error(&patch, r, 1).await),
            Err(e) if e.is_transient() => e,
            Err(e) => return Err(e),
        };
        failures += 1;
        if failures >= policy.attempts {
            return Err(failure);
        }
        tokio::time::sleep(policy.base_delay * failures).await;
        // Ask the registry how much it has, and carry on from there.
        let status = client.send(&Req::new(Method::GET, session.clone())).await?;
        if status.status() != StatusCode::NO_CONTENT {
            return Err(failure);
        }
        if let Some(next) = location(&status) {
            session = next;
        }
        let range = status.headers().get(RANGE).and_then(|v| v.to_str().ok()).unwrap_or_default();
        let Some(held) = resume_offset(range, end, body.len()) else { return Err(failure) };
        offset = held;
        debug!(request = %describe(&patch), offset, "resuming upload");
    }
    expect_created(client, &Req::new(Method::PUT, with_digest(&session, digest))).await
}

/// Where to resume a chunked upload from the registry's `Range: 0-N` (N = last byte held), or
/// `None` when the answer makes no sense for what we sent (then the blob starts again).
/// Distribution answers `0-0` for an empty upload too; chunks are never one byte, so `0-0` means
/// nothing arrived. A resume point must be a chunk boundary we sent, at most `chunk_end`.
fn resume_offset(range: &str, chunk_end: usize, len: usize) -> Option<usize> {
    let last: usize = range.trim().strip_prefix("0-")?.parse().ok()?;
    let held = if last == 0 { 0 } else { last + 1 };
    let boundary = held % MAX_REQUEST_BODY == 0 || held == len;
    (held <= chunk_end && boundary).then_some(held)
}

async fn expect_created(client: &RegistryClient, req: &Req) -> Result<(), RegistryError> {
    let response = client.send_once(req).await?;
    if response.status() == StatusCode::CREATED {
        Ok(())
    } else {
        Err(client.status_error(req, response, 1).await)
    }
}

fn location(response: &reqwest::Response) -> Option<String> {
    response.headers().get(LOCATION).and_then(|v| v.to_str().ok()).map(str::to_owned)
}

fn missing_location(client: &RegistryClient, req: &Req) -> RegistryError {
    RegistryError::Protocol {
        registry: client.registry().into(),
        message: format!("{} answered 202 without a Location for the upload", describe(req)),
    }
}

fn with_digest(location: &str, digest: &Digest) -> String {
    let separator = if location.contains('?') { '&' } else { '?' };
    format!("{location}{separator}digest={digest}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resume_offsets_follow_the_registry_range() {
        let len = MAX_REQUEST_BODY * 2 + 10;
        assert_eq!(resume_offset("0-0", MAX_REQUEST_BODY, len), Some(0), "nothing arrived");
        let first = format!("0-{}", MAX_REQUEST_BODY - 1);
        assert_eq!(resume_offset(&first, MAX_REQUEST_BODY * 2, len), Some(MAX_REQUEST_BODY));
        assert_eq!(
            resume_offset(&first, MAX_REQUEST_BODY, len),
            Some(MAX_REQUEST_BODY),
            "the failed chunk landed"
        );
        assert_eq!(resume_offset("0-99", MAX_REQUEST_BODY, len), None, "not a boundary we sent");
        assert_eq!(resume_offset(&format!("0-{}", len - 1), len, len), Some(len));
        assert_eq!(resume_offset("bytes=5", MAX_REQUEST_BODY, len), None);
    }

    #[test]
    fn digests_are_appended_to_upload_locations() {
        let d = Digest::of(b"x");
        assert_eq!(with_digest("/v2/r/blobs/uploads/u", &d), format!("/v2/r/blobs/uploads/u?digest={d}"));
        assert_eq!(
            with_digest("/v2/r/blobs/uploads/u?_state=s", &d),
            format!("/v2/r/blobs/uploads/u?_state=s&digest={d}")
        );
    }
}
