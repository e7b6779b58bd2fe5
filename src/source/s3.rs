//! Worker sources in S3 or any S3-compatible store: `s3://BUCKET/PREFIX/` (every object under the
//! prefix is a module, named relative to the prefix) or `s3://BUCKET/KEY` (one module).
//!
//! Listings are paginated; downloads run in parallel (bounded); limits cap the object count, each
//! object and the total. Downloads are cached in memory for the life of the process, keyed by
//! bucket, key and ETag (or size and modification time where the store lists no ETag), so an
//! unchanged object is never downloaded twice by the same process.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use aws_config::environment::{EnvironmentVariableCredentialsProvider, EnvironmentVariableRegionProvider};
use aws_config::meta::credentials::CredentialsProviderChain;
use aws_config::meta::region::RegionProviderChain;
use aws_config::profile::{ProfileFileCredentialsProvider, ProfileFileRegionProvider};
use aws_config::web_identity_token::WebIdentityTokenCredentialsProvider;
use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::config::Region;
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_smithy_runtime::client::retries::classifiers::HttpStatusCodeClassifier;
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use tracing::{debug, info, warn};

use super::SourceError;
use crate::error_chain;
use crate::worker::names::check_module_path;

/// `s3://BUCKET/PREFIX/` or `s3://BUCKET/KEY`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct S3Url {
    pub bucket: String,
    /// A prefix ends with `/` (or is empty); anything else is one object's key.
    pub key: String,
}

impl S3Url {
    pub fn parse(text: &str) -> Result<Self, String> {
        let rest = text.strip_prefix("s3://").ok_or_else(|| format!("{text:?} is not an s3:// URL"))?;
        let (bucket, key) = rest.split_once('/').unwrap_or((rest, ""));
        let valid_bucket = (3..=63).contains(&bucket.len())
            && bucket.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
        if !valid_bucket {
            return Err(format!(
                "{text:?}: {bucket:?} is not a valid bucket name (3-63 of a-z, 0-9, '-', '.')"
            ));
        }
        Ok(S3Url { bucket: bucket.to_owned(), key: key.to_owned() })
    }

    pub fn is_prefix(&self) -> bool {
        self.key.is_empty() || self.key.ends_with('/')
    }
}

impl fmt::Display for S3Url {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "s3://{}/{}", self.bucket, self.key)
    }
}

#[derive(Clone, Debug)]
pub struct S3Limits {
    pub max_objects: usize,
    pub max_object_bytes: u64,
    pub max_total_bytes: u64,
}

impl Default for S3Limits {
    /// Generous for Workers (Cloudflare caps a worker at 10 MiB compressed), small enough that a
    /// wrong prefix cannot fill the controller's memory.
    fn default() -> Self {
        S3Limits { max_objects: 10_000, max_object_bytes: 64 << 20, max_total_bytes: 256 << 20 }
    }
}

#[derive(Clone, Debug)]
pub struct S3Options {
    /// An S3-compatible endpoint (`http://127.0.0.1:8014`); else `AWS_ENDPOINT_URL` or AWS itself.
    pub endpoint: Option<String>,
    /// Else the standard chain (`AWS_REGION`, profile); `us-east-1` when nothing names one.
    pub region: Option<String>,
    /// Keys asked for per listing page (S3 returns at most 1000).
    pub page_size: i32,
    /// Objects downloaded at once.
    pub parallel: usize,
    pub limits: S3Limits,
    /// An access key id and secret key to use instead of the credential chain (a store this
    /// process started itself, as `workerbundle dev` does).
    pub static_credentials: Option<(String, String)>,
}

impl Default for S3Options {
    fn default() -> Self {
        S3Options {
            endpoint: None,
            region: None,
            page_size: 1000,
            parallel: 16,
            limits: S3Limits::default(),
            static_credentials: None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct CacheKey {
    bucket: String,
    key: String,
    version: String,
}

/// One listed object.
#[derive(Clone, Debug)]
struct Listed {
    key: String,
    size: u64,
    version: String,
}

/// Attempts at a download whose body breaks off (see `S3Source::fetch`).
const BODY_ATTEMPTS: u32 = 3;

/// An S3 client with its download cache; keep one per process.
pub struct S3Source {
    client: aws_sdk_s3::Client,
    endpoint: String,
    options: S3Options,
    cache: Mutex<HashMap<CacheKey, Bytes>>,
    downloads: AtomicU64,
}

impl S3Source {
    pub async fn new(options: S3Options) -> Self {
        // The credential and region chains are spelled out rather than aws-config's defaults:
        // those end at the instance metadata service (169.254.169.254), and a build must never
        // send traffic to a host nobody named. Env, profile and web identity remain.
        let credentials =
            CredentialsProviderChain::first_try("environment", EnvironmentVariableCredentialsProvider::new())
                .or_else("profile", ProfileFileCredentialsProvider::builder().build())
                .or_else("web-identity", WebIdentityTokenCredentialsProvider::builder().build());
        let region = RegionProviderChain::first_try(options.region.clone().map(Region::new))
            .or_else(EnvironmentVariableRegionProvider::new())
            .or_else(ProfileFileRegionProvider::builder().build())
            .or_else(Region::new("us-east-1"));
        let defaults = aws_config::defaults(aws_config::BehaviorVersion::latest()).region(region);
        let defaults = match &options.static_credentials {
            Some((id, secret)) => defaults.credentials_provider(aws_sdk_s3::config::Credentials::new(
                id.clone(),
                secret.clone(),
                None,
                None,
                "workerbundle",
            )),
            None => defaults.credentials_provider(credentials),
        };
        let shared = defaults.load().await;
        let mut config = aws_sdk_s3::config::Builder::from(&shared)
            .retry_config(RetryConfig::standard().with_max_attempts(5))
            // A 429 without an error code in its body is retried too (with backoff like the rest).
            .retry_classifier(HttpStatusCodeClassifier::new_from_codes(&[429][..]))
            .force_path_style(true);
        if let Some(endpoint) = &options.endpoint {
            config = config.endpoint_url(endpoint);
        }
        let endpoint = options
            .endpoint
            .clone()
            .or_else(|| shared.endpoint_url().map(str::to_owned))
            .unwrap_or_else(|| "AWS S3".to_owned());
        S3Source {
            client: aws_sdk_s3::Client::from_conf(config.build()),
            endpoint,
            options,
            cache: Mutex::new(HashMap::new()),
            downloads: AtomicU64::new(0),
        }
    }

    /// The S3 client, for writers (the upload API) that share this set-up of endpoint, region and
    /// credentials.
    pub fn client(&self) -> &aws_sdk_s3::Client {
        &self.client
    }

    /// Objects downloaded so far (cache hits excluded).
    pub fn downloads(&self) -> u64 {
        self.downloads.load(Ordering::Relaxed)
    }

    /// Reads a worker's files from `url`.
    pub async fn read(&self, url: &S3Url) -> Result<BTreeMap<String, Bytes>, SourceError> {
        let listed = if url.is_prefix() { self.list(url).await? } else { vec![self.head(url).await?] };
        let limits = &self.options.limits;
        let mut total = 0u64;
        let mut named = Vec::with_capacity(listed.len());
        for object in listed {
            let name = if url.is_prefix() {
                object.key[url.key.len()..].to_owned()
            } else {
                object.key.rsplit('/').next().unwrap_or_default().to_owned()
            };
            check_module_path(&name).map_err(|m| invalid(url, m))?;
            if object.size > limits.max_object_bytes {
                return Err(invalid(
                    url,
                    format!(
                        "object {} is {} bytes, over the per-object limit of {} bytes",
                        object.key, object.size, limits.max_object_bytes
                    ),
                ));
            }
            total += object.size;
            if total > limits.max_total_bytes {
                return Err(invalid(
                    url,
                    format!("the objects add up to more than the limit of {} bytes", limits.max_total_bytes),
                ));
            }
            named.push((name, object));
        }
        let fetched: Vec<(String, Bytes)> =
            futures::stream::iter(named.into_iter().map(|(name, object)| async move {
                self.fetch(url, &object).await.map(|bytes| (name, bytes))
            }))
            .buffer_unordered(self.options.parallel.max(1))
            .try_collect()
            .await?;
        info!(source = %url, objects = fetched.len(), bytes = total, "worker read from S3");
        Ok(fetched.into_iter().collect())
    }

    async fn list(&self, url: &S3Url) -> Result<Vec<Listed>, SourceError> {
        let mut pages = self
            .client
            .list_objects_v2()
            .bucket(&url.bucket)
            .prefix(&url.key)
            .max_keys(self.options.page_size)
            .into_paginator()
            .send();
        let mut listed = Vec::new();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| self.error(url, None, e))?;
            for object in page.contents() {
                let Some(key) = object.key() else { continue };
                let size = object.size().unwrap_or(0).max(0) as u64;
                if key.ends_with('/') && size == 0 {
                    continue; // a "directory" marker, not a module
                }
                listed.push(Listed {
                    key: key.to_owned(),
                    size,
                    version: version_tag(object.e_tag(), size, object.last_modified()),
                });
                if listed.len() > self.options.limits.max_objects {
                    return Err(invalid(
                        url,
                        format!("holds more than the limit of {} objects", self.options.limits.max_objects),
                    ));
                }
            }
        }
        if listed.is_empty() {
            return Err(invalid(url, "holds no objects (is the prefix right?)".into()));
        }
        debug!(source = %url, objects = listed.len(), "listed");
        Ok(listed)
    }

    async fn head(&self, url: &S3Url) -> Result<Listed, SourceError> {
        let head = self.client.head_object().bucket(&url.bucket).key(&url.key).send().await;
        let head = head.map_err(|e| self.error(url, Some(&url.key), e))?;
        let size = head.content_length().unwrap_or(0).max(0) as u64;
        Ok(Listed {
            key: url.key.clone(),
            size,
            version: version_tag(head.e_tag(), size, head.last_modified()),
        })
    }

    /// The SDK retries a request until its response starts; a body that breaks off afterwards
    /// (a reset, a proxy cutting it) is fetched again here, [`BODY_ATTEMPTS`] times in all.
    async fn fetch(&self, url: &S3Url, object: &Listed) -> Result<Bytes, SourceError> {
        let cache_key =
            CacheKey { bucket: url.bucket.clone(), key: object.key.clone(), version: object.version.clone() };
        if let Some(hit) = self.cache.lock().ok().and_then(|c| c.get(&cache_key).cloned()) {
            return Ok(hit);
        }
        let mut attempt = 1;
        let bytes = loop {
            let response = self.client.get_object().bucket(&url.bucket).key(&object.key).send().await;
            let response = response.map_err(|e| self.error(url, Some(&object.key), e))?;
            let length = response.content_length().unwrap_or(0).max(0) as u64;
            if length > self.options.limits.max_object_bytes {
                return Err(invalid(
                    url,
                    format!(
                        "object {} is {length} bytes, over the per-object limit of {} bytes",
                        object.key, self.options.limits.max_object_bytes
                    ),
                ));
            }
            match response.body.collect().await {
                Ok(body) => break body.into_bytes(),
                Err(e) if attempt < BODY_ATTEMPTS => {
                    let wait = Duration::from_millis(200 << attempt).mul_f64(0.5 + fastrand::f64() / 2.0);
                    warn!(key = %object.key, error = %e, retry_in = ?wait, "download broke off; fetching it again");
                    tokio::time::sleep(wait).await;
                    attempt += 1;
                }
                Err(e) => {
                    return Err(SourceError::S3 {
                        url: format!("s3://{}/{}", url.bucket, object.key),
                        message: format!(
                            "download from {} broke off ({attempt} attempts): {e}",
                            self.endpoint
                        ),
                    })
                }
            }
        };
        self.downloads.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut cache) = self.cache.lock() {
            cache.insert(cache_key, bytes.clone());
        }
        Ok(bytes)
    }

    /// Turns an SDK error into one a user can act on, naming the URL.
    fn error<E>(&self, url: &S3Url, key: Option<&str>, err: SdkError<E>) -> SourceError
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
    {
        let target = match key {
            Some(key) => format!("s3://{}/{key}", url.bucket),
            None => url.to_string(),
        };
        let status = err.raw_response().map(|r| r.status().as_u16());
        let code = err.code().map(str::to_owned);
        let message = match (code.as_deref(), status) {
            (Some("NoSuchBucket"), _) => format!("bucket {:?} does not exist", url.bucket),
            (Some("NoSuchKey" | "NotFound"), _) | (None, Some(404)) if key.is_some() => {
                format!("no such key (or no bucket {:?})", url.bucket)
            }
            (Some("NotFound"), _) | (None, Some(404)) => format!("bucket {:?} does not exist", url.bucket),
            (Some("SignatureDoesNotMatch"), _) => {
                "the request signature does not match: check the secret access key (AWS_SECRET_ACCESS_KEY)"
                    .to_owned()
            }
            (Some("InvalidAccessKeyId"), _) => {
                "the access key id is not known to the store (AWS_ACCESS_KEY_ID)".to_owned()
            }
            (Some("AccessDenied"), _) | (None, Some(403)) => {
                "access denied: the credentials may not read this".to_owned()
            }
            _ => match &err {
                SdkError::DispatchFailure(d) if d.is_io() || d.is_timeout() => {
                    format!("cannot reach the S3 endpoint {}: {}", self.endpoint, error_chain(&err))
                }
                SdkError::TimeoutError(_) => format!("the S3 endpoint {} timed out", self.endpoint),
                SdkError::DispatchFailure(_) if error_chain(&err).contains("no credentials") => {
                    "no AWS credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, a profile \
                     (AWS_PROFILE), or web identity (AWS_WEB_IDENTITY_TOKEN_FILE)"
                        .to_owned()
                }
                _ => format!(
                    "{}{}{}",
                    status.map(|s| format!("HTTP {s}: ")).unwrap_or_default(),
                    code.map(|c| format!("{c}: ")).unwrap_or_default(),
                    err.message().map(str::to_owned).unwrap_or_else(|| error_chain(&err))
                ),
            },
        };
        SourceError::S3 { url: target, message }
    }
}

fn version_tag(etag: Option<&str>, size: u64, modified: Option<&aws_sdk_s3::primitives::DateTime>) -> String {
    match etag {
        Some(etag) if !etag.is_empty() => format!("etag:{etag}"),
        _ => format!("size:{size}:modified:{}", modified.map(|m| m.as_nanos()).unwrap_or_default()),
    }
}

fn invalid(url: &S3Url, message: String) -> SourceError {
    SourceError::S3 { url: url.to_string(), message }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_prefixes_and_keys() {
        let p = S3Url::parse("s3://workers/acct/api/v3/").unwrap();
        assert_eq!((p.bucket.as_str(), p.key.as_str(), p.is_prefix()), ("workers", "acct/api/v3/", true));
        let k = S3Url::parse("s3://workers/acct/api/index.js").unwrap();
        assert!(!k.is_prefix());
        assert!(S3Url::parse("s3://workers").unwrap().is_prefix());
        for bad in ["workers/x", "s3://UPPER/x", "s3://ab/x", "s3://bad_bucket/x"] {
            assert!(S3Url::parse(bad).is_err(), "{bad}");
        }
    }
}
