//! The API's I/O: versions in S3, and each account's objects in Kubernetes (its WorkerAccount,
//! WorkerDeployments, their releases, and one Secret per script). Every method names the account:
//! an object labelled with another account is treated as absent for reads and refused for writes,
//! so accounts sharing one namespace cannot reach each other's scripts.

use std::collections::BTreeMap;

use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::{ByteStream, DateTimeFormat};
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Namespace, Secret};
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::{json, Value};
use tracing::{error, info};

use super::envelope::ApiError;
use super::upload::{secret_name, version_prefix, Upload};
use crate::crd::{
    owned_by, WorkerAccount, WorkerAccountSpec, WorkerDeployment, WorkerRelease, WorkerTemplate,
    ACCOUNT_LABEL, DEPLOYMENT_LABEL, MANAGED_BY,
};
use crate::worker::METADATA_FILE;

/// The field manager of every write the API makes.
pub const FIELD_MANAGER: &str = "workerbundle-api";
/// When the API last pointed a WorkerDeployment's template at a version (RFC 3339).
pub const DEPLOYED_AT: &str = "workerbundle.dev/deployed-at";
/// The message given with that deployment (`wrangler rollback --message`, `deploy --message`).
pub const DEPLOY_MESSAGE: &str = "workerbundle.dev/deployment-message";
/// S3 writes in flight for one upload.
const PARALLEL_PUTS: usize = 8;

/// Which namespace an account's objects live in.
#[derive(Clone, Debug)]
pub enum Placement {
    /// Every account in this one namespace.
    Shared(String),
    /// Each account in its own namespace, `workers-<account>`, created on first upload.
    PerAccount,
}

impl Placement {
    pub fn namespace(&self, account: &str) -> String {
        match self {
            Placement::Shared(ns) => ns.clone(),
            Placement::PerAccount => format!("workers-{account}"),
        }
    }
}

/// A stored version's metadata and when it was stored.
pub struct StoredVersion {
    pub metadata: Value,
    pub created_on: Option<String>,
}

pub struct Store {
    pub bucket: String,
    s3: aws_sdk_s3::Client,
    kube: Client,
    placement: Placement,
}

fn belongs_to(object: &impl Resource, account: &str) -> bool {
    object.meta().labels.as_ref().and_then(|l| l.get(ACCOUNT_LABEL)).map(String::as_str) == Some(account)
}

/// Logs what failed (for the operator) and tells the client only that the backend failed.
fn kube_error(what: &str, e: kube::Error) -> ApiError {
    error!(error = %crate::error_chain(&e), "Kubernetes API: {what} failed");
    ApiError::Backend(format!("the Kubernetes API failed while {what}; the API's log has the details"))
}

fn s3_error<E>(what: &str, e: SdkError<E>) -> ApiError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    error!(error = %crate::error_chain(&e), code = e.code().unwrap_or_default(), "S3: {what} failed");
    ApiError::Backend(format!("the object store failed while {what}; the API's log has the details"))
}

fn is_not_found<E: ProvideErrorMetadata>(e: &SdkError<E>) -> bool {
    matches!(e.code(), Some("NoSuchKey" | "NotFound"))
        || e.raw_response().is_some_and(|r| r.status().as_u16() == 404)
}

impl Store {
    pub fn new(bucket: String, s3: aws_sdk_s3::Client, kube: Client, placement: Placement) -> Store {
        Store { bucket, s3, kube, placement }
    }

    pub fn namespace(&self, account: &str) -> String {
        self.placement.namespace(account)
    }

    fn api<K>(&self, account: &str) -> Api<K>
    where
        K: Resource<Scope = kube::core::NamespaceResourceScope, DynamicType = ()>,
    {
        Api::namespaced(self.kube.clone(), &self.namespace(account))
    }

    // --- S3 ---

    /// Writes the modules, then `metadata.json`: a reader that finds the metadata finds every module.
    pub async fn put_version(
        &self,
        account: &str,
        script: &str,
        version: &str,
        upload: &Upload,
    ) -> Result<(), ApiError> {
        let prefix = version_prefix(account, script, version);
        // Owned keys and bodies: futures that borrow from the iterator trip up the `Send` check
        // of the handler's future.
        let objects: Vec<(String, Bytes)> =
            upload.modules.iter().map(|(path, bytes)| (format!("{prefix}{path}"), bytes.clone())).collect();
        futures::stream::iter(
            objects.into_iter().map(|(key, bytes)| async move { self.put_object(&key, bytes).await }),
        )
        .buffer_unordered(PARALLEL_PUTS)
        .try_collect::<Vec<()>>()
        .await?;
        let metadata = Bytes::from(upload.metadata.to_string());
        self.put_object(&format!("{prefix}{METADATA_FILE}"), metadata).await
    }

    async fn put_object(&self, key: &str, bytes: Bytes) -> Result<(), ApiError> {
        self.s3
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .body(ByteStream::from(bytes))
            .send()
            .await
            .map_err(|e| s3_error(&format!("storing s3://{}/{key}", self.bucket), e))?;
        Ok(())
    }

    /// A stored version's metadata, or None when there is no such version.
    pub async fn version(
        &self,
        account: &str,
        script: &str,
        version: &str,
    ) -> Result<Option<StoredVersion>, ApiError> {
        let key = format!("{}{METADATA_FILE}", version_prefix(account, script, version));
        let Some((bytes, modified)) = self.get_object(&key).await? else { return Ok(None) };
        let metadata = serde_json::from_slice(&bytes).map_err(|e| {
            error!(key, error = %e, "stored metadata.json is not JSON");
            ApiError::Backend(format!("the stored metadata of version {version} is damaged"))
        })?;
        Ok(Some(StoredVersion { metadata, created_on: modified }))
    }

    /// An object and its modification time (RFC 3339), or None when it does not exist.
    pub async fn get_object(&self, key: &str) -> Result<Option<(Bytes, Option<String>)>, ApiError> {
        let what = || format!("reading s3://{}/{key}", self.bucket);
        let response = match self.s3.get_object().bucket(&self.bucket).key(key).send().await {
            Ok(r) => r,
            Err(e) if is_not_found(&e) => return Ok(None),
            Err(e) => return Err(s3_error(&what(), e)),
        };
        let modified = response.last_modified().and_then(|t| t.fmt(DateTimeFormat::DateTime).ok());
        let body = response.body.collect().await.map_err(|e| {
            error!(key, error = %e, "S3 download broke off");
            ApiError::Backend(format!("the object store failed while {}", what()))
        })?;
        Ok(Some((body.into_bytes(), modified)))
    }

    /// Deletes every stored version of a script.
    pub async fn delete_versions(&self, account: &str, script: &str) -> Result<usize, ApiError> {
        let prefix = format!("{account}/{script}/");
        let mut pages =
            self.s3.list_objects_v2().bucket(&self.bucket).prefix(&prefix).into_paginator().send();
        let mut keys = Vec::new();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| s3_error(&format!("listing s3://{}/{prefix}", self.bucket), e))?;
            keys.extend(page.contents().iter().filter_map(|o| o.key().map(str::to_owned)));
        }
        let count = keys.len();
        futures::stream::iter(keys.into_iter().map(|key| async move {
            self.s3
                .delete_object()
                .bucket(&self.bucket)
                .key(&key)
                .send()
                .await
                .map(|_| ())
                .map_err(|e| s3_error(&format!("deleting s3://{}/{key}", self.bucket), e))
        }))
        .buffer_unordered(PARALLEL_PUTS)
        .try_collect::<Vec<()>>()
        .await?;
        Ok(count)
    }

    // --- Kubernetes ---

    /// The account's namespace (one per account) and WorkerAccount, created when missing.
    pub async fn ensure_account(&self, account: &str) -> Result<(), ApiError> {
        let namespace = self.namespace(account);
        if let Placement::PerAccount = self.placement {
            let namespaces: Api<Namespace> = Api::all(self.kube.clone());
            let found =
                namespaces.get_opt(&namespace).await.map_err(|e| kube_error("reading a namespace", e))?;
            if found.is_none() {
                let object = Namespace {
                    metadata: ObjectMeta {
                        name: Some(namespace.clone()),
                        labels: Some(labels(account)),
                        ..ObjectMeta::default()
                    },
                    ..Namespace::default()
                };
                match namespaces.create(&PostParams::default(), &object).await {
                    Ok(_) => info!(%namespace, "namespace created"),
                    Err(kube::Error::Api(e)) if e.code == 409 => {}
                    Err(e) => return Err(kube_error("creating the account's namespace", e)),
                }
            }
        }
        let accounts: Api<WorkerAccount> = self.api(account);
        if accounts.get_opt(account).await.map_err(|e| kube_error("reading the WorkerAccount", e))?.is_none()
        {
            let mut object = WorkerAccount::new(account, WorkerAccountSpec::default());
            object.metadata.labels = Some(labels(account));
            match accounts.create(&PostParams::default(), &object).await {
                Ok(_) => info!(%account, %namespace, "WorkerAccount created"),
                Err(kube::Error::Api(e)) if e.code == 409 => {}
                Err(e) => return Err(kube_error("creating the WorkerAccount", e)),
            }
        }
        Ok(())
    }

    /// The account's WorkerDeployment of `script`, or None (also when another account owns that name).
    pub async fn deployment(
        &self,
        account: &str,
        script: &str,
    ) -> Result<Option<WorkerDeployment>, ApiError> {
        let found = self
            .api::<WorkerDeployment>(account)
            .get_opt(script)
            .await
            .map_err(|e| kube_error("reading a WorkerDeployment", e))?;
        Ok(found.filter(|d| belongs_to(d, account)))
    }

    /// The account's WorkerDeployment of `script`, or Cloudflare's "not found".
    pub async fn existing(&self, account: &str, script: &str) -> Result<WorkerDeployment, ApiError> {
        self.deployment(account, script).await?.ok_or_else(|| ApiError::script_not_found(script))
    }

    /// Refuses a script name another account already uses in a shared namespace.
    pub async fn check_name_free(&self, account: &str, script: &str) -> Result<(), ApiError> {
        let found = self
            .api::<WorkerDeployment>(account)
            .get_opt(script)
            .await
            .map_err(|e| kube_error("reading a WorkerDeployment", e))?;
        match found {
            Some(d) if !belongs_to(&d, account) => Err(ApiError::Invalid(format!(
                "the worker name {script:?} is taken in this server's shared namespace; choose another \
                 name (or run the API with --namespace-per-account)"
            ))),
            _ => Ok(()),
        }
    }

    pub async fn deployments(&self, account: &str) -> Result<Vec<WorkerDeployment>, ApiError> {
        let params = ListParams::default().labels(&format!("{ACCOUNT_LABEL}={account}"));
        let list = self
            .api::<WorkerDeployment>(account)
            .list(&params)
            .await
            .map_err(|e| kube_error("listing WorkerDeployments", e))?;
        Ok(list.items)
    }

    /// Points the script's WorkerDeployment at `template` (server-side apply; created if missing).
    pub async fn apply_template(
        &self,
        account: &str,
        script: &str,
        template: &WorkerTemplate,
        message: Option<&str>,
    ) -> Result<WorkerDeployment, ApiError> {
        let mut annotations = json!({ DEPLOYED_AT: Timestamp::now().to_string() });
        if let Some(message) = message.filter(|m| !m.is_empty()) {
            annotations[DEPLOY_MESSAGE] = json!(message);
        }
        let body = json!({
            "apiVersion": WorkerDeployment::api_version(&()),
            "kind": WorkerDeployment::kind(&()),
            "metadata": {
                "name": script,
                "namespace": self.namespace(account),
                "labels": labels(account),
                "annotations": annotations,
            },
            "spec": { "template": template },
        });
        let params = PatchParams::apply(FIELD_MANAGER).force();
        let applied = self
            .api::<WorkerDeployment>(account)
            .patch(script, &params, &Patch::Apply(&body))
            .await
            .map_err(|e| kube_error("applying the WorkerDeployment", e))?;
        info!(%account, %script, version = template.version_id.as_deref().unwrap_or_default(), "template applied");
        Ok(applied)
    }

    /// Deletes the script's WorkerDeployment (its releases go with it) and its Secret.
    pub async fn delete_script(&self, account: &str, script: &str) -> Result<(), ApiError> {
        let params = DeleteParams::background();
        match self.api::<WorkerDeployment>(account).delete(script, &params).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(kube_error("deleting the WorkerDeployment", e)),
        }
        if self.secret(account, script).await?.is_some() {
            match self.api::<Secret>(account).delete(&secret_name(script), &params).await {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => return Err(kube_error("deleting the script's Secret", e)),
            }
        }
        Ok(())
    }

    /// The releases made for the script's WorkerDeployment.
    pub async fn releases(&self, account: &str, script: &str) -> Result<Vec<WorkerRelease>, ApiError> {
        let params =
            ListParams::default().labels(&format!("{DEPLOYMENT_LABEL}={script},{ACCOUNT_LABEL}={account}"));
        let list = self
            .api::<WorkerRelease>(account)
            .list(&params)
            .await
            .map_err(|e| kube_error("listing WorkerReleases", e))?;
        Ok(list.items)
    }

    // --- Secrets: values pass through, never logged ---

    /// The script's Secret, or None.
    pub async fn secret(&self, account: &str, script: &str) -> Result<Option<Secret>, ApiError> {
        let found = self
            .api::<Secret>(account)
            .get_opt(&secret_name(script))
            .await
            .map_err(|e| kube_error("reading the script's Secret", e))?;
        Ok(found.filter(|s| belongs_to(s, account)))
    }

    /// Sets one key of the script's Secret, creating the Secret (owned by the WorkerDeployment, so
    /// it goes when the worker goes) if needed.
    pub async fn put_secret(
        &self,
        deployment: &WorkerDeployment,
        account: &str,
        key: &str,
        value: &str,
    ) -> Result<(), ApiError> {
        let script = deployment.name_any();
        let name = secret_name(&script);
        let encoded = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, value);
        let update = json!({"data": {key: encoded}});
        let found = self
            .api::<Secret>(account)
            .get_opt(&name)
            .await
            .map_err(|e| kube_error("reading the script's Secret", e))?;
        match found {
            Some(existing) if !belongs_to(&existing, account) => {
                return Err(ApiError::Invalid(format!(
                    "the Secret name {name:?} is taken by another account in this server's shared namespace"
                )))
            }
            Some(_) => return self.merge_secret(account, &name, &update).await,
            None => {}
        }
        let object = Secret {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(self.namespace(account)),
                labels: Some(labels(account)),
                owner_references: owned_by(deployment),
                ..ObjectMeta::default()
            },
            type_: Some("Opaque".into()),
            data: Some(BTreeMap::from([(
                key.to_owned(),
                k8s_openapi::ByteString(value.as_bytes().to_vec()),
            )])),
            ..Secret::default()
        };
        let params = PostParams { field_manager: Some(FIELD_MANAGER.into()), ..PostParams::default() };
        match self.api::<Secret>(account).create(&params, &object).await {
            Ok(_) => Ok(()),
            // Created meanwhile by a concurrent put: add the key to it.
            Err(kube::Error::Api(e)) if e.code == 409 => self.merge_secret(account, &name, &update).await,
            Err(e) => Err(kube_error("creating the script's Secret", e)),
        }
    }

    async fn merge_secret(&self, account: &str, name: &str, body: &Value) -> Result<(), ApiError> {
        let params = PatchParams { field_manager: Some(FIELD_MANAGER.into()), ..PatchParams::default() };
        self.api::<Secret>(account)
            .patch(name, &params, &Patch::Merge(body))
            .await
            .map_err(|e| kube_error("updating the script's Secret", e))?;
        Ok(())
    }

    /// Removes one key of the script's Secret; false when it had no such key.
    pub async fn delete_secret_key(&self, account: &str, script: &str, key: &str) -> Result<bool, ApiError> {
        let Some(secret) = self.secret(account, script).await? else { return Ok(false) };
        if !secret.data.as_ref().is_some_and(|d| d.contains_key(key)) {
            return Ok(false);
        }
        self.merge_secret(account, &secret_name(script), &json!({"data": {key: null}})).await?;
        Ok(true)
    }
}

fn labels(account: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (ACCOUNT_LABEL.to_owned(), account.to_owned()),
        ("app.kubernetes.io/managed-by".to_owned(), MANAGED_BY.to_owned()),
    ])
}
