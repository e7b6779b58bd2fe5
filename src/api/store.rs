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
use super::path::{AccountId, ScriptName, SecretKey, VersionId};
use super::undo::{UndoRecord, UNDO};
use super::upload::{secret_name, Upload};
use crate::crd::{
    owned_by, WorkerAccount, WorkerAccountSpec, WorkerDeployment, WorkerRelease, WorkerTemplate,
    ACCOUNT_LABEL, DEPLOYMENT_LABEL, MANAGED_BY,
};
use crate::worker::names::check_module_path;
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

/// A key in the API's bucket, made only from checked names: `<account>/<script>/[<version>/[<file>]]`.
/// The S3 server resolves `..` in keys, so a key built from a raw path segment could reach another
/// account's objects; this type cannot be made from one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectKey(String);

impl ObjectKey {
    /// `<account>/<script>/`: every version of a script.
    pub fn script_prefix(account: &AccountId, script: &ScriptName) -> ObjectKey {
        ObjectKey(format!("{account}/{script}/"))
    }

    /// `<account>/<script>/<version>/`: one version's files.
    pub fn version_prefix(account: &AccountId, script: &ScriptName, version: &VersionId) -> ObjectKey {
        ObjectKey(format!("{account}/{script}/{version}/"))
    }

    /// One module of a version; the module path is checked as an upload's is (it may come from a
    /// WorkerDeployment written by hand).
    pub fn module(
        account: &AccountId,
        script: &ScriptName,
        version: &VersionId,
        module: &str,
    ) -> Result<ObjectKey, ApiError> {
        check_module_path(module).map_err(|e| {
            error!(%account, %script, %version, error = %e, "a module path that cannot be a key");
            ApiError::Backend(format!(
                "version {version} of worker {script:?} names a module path that is not valid"
            ))
        })?;
        Ok(ObjectKey(format!("{}{module}", Self::version_prefix(account, script, version).0)))
    }

    /// A version's `metadata.json`.
    pub fn metadata(account: &AccountId, script: &ScriptName, version: &VersionId) -> ObjectKey {
        ObjectKey(format!("{}{METADATA_FILE}", Self::version_prefix(account, script, version).0))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
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
        account: &AccountId,
        script: &ScriptName,
        version: &VersionId,
        upload: &Upload,
    ) -> Result<(), ApiError> {
        // Owned keys and bodies: futures that borrow from the iterator trip up the `Send` check
        // of the handler's future.
        let objects = upload
            .modules
            .iter()
            .map(|(path, bytes)| Ok((ObjectKey::module(account, script, version, path)?, bytes.clone())))
            .collect::<Result<Vec<(ObjectKey, Bytes)>, ApiError>>()?;
        futures::stream::iter(
            objects.into_iter().map(|(key, bytes)| async move { self.put_object(&key, bytes).await }),
        )
        .buffer_unordered(PARALLEL_PUTS)
        .try_collect::<Vec<()>>()
        .await?;
        let metadata = Bytes::from(upload.metadata.to_string());
        self.put_object(&ObjectKey::metadata(account, script, version), metadata).await
    }

    async fn put_object(&self, key: &ObjectKey, bytes: Bytes) -> Result<(), ApiError> {
        let key = key.as_str();
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
        account: &AccountId,
        script: &ScriptName,
        version: &VersionId,
    ) -> Result<Option<StoredVersion>, ApiError> {
        let key = ObjectKey::metadata(account, script, version);
        let Some((bytes, modified)) = self.get_object(&key).await? else { return Ok(None) };
        let metadata = serde_json::from_slice(&bytes).map_err(|e| {
            error!(key = key.as_str(), error = %e, "stored metadata.json is not JSON");
            ApiError::Backend(format!("the stored metadata of version {version} is damaged"))
        })?;
        Ok(Some(StoredVersion { metadata, created_on: modified }))
    }

    /// An object and its modification time (RFC 3339), or None when it does not exist.
    pub async fn get_object(&self, key: &ObjectKey) -> Result<Option<(Bytes, Option<String>)>, ApiError> {
        let key = key.as_str();
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
    pub async fn delete_versions(&self, account: &AccountId, script: &ScriptName) -> Result<usize, ApiError> {
        let prefix = ObjectKey::script_prefix(account, script);
        let prefix = prefix.as_str();
        let mut pages = self.s3.list_objects_v2().bucket(&self.bucket).prefix(prefix).into_paginator().send();
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
    pub async fn ensure_account(&self, account: &AccountId) -> Result<(), ApiError> {
        let account = account.as_str();
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
        account: &AccountId,
        script: &ScriptName,
    ) -> Result<Option<WorkerDeployment>, ApiError> {
        let found = self
            .api::<WorkerDeployment>(account.as_str())
            .get_opt(script.as_str())
            .await
            .map_err(|e| kube_error("reading a WorkerDeployment", e))?;
        Ok(found.filter(|d| belongs_to(d, account.as_str())))
    }

    /// The account's WorkerDeployment of `script`, or Cloudflare's "not found".
    pub async fn existing(
        &self,
        account: &AccountId,
        script: &ScriptName,
    ) -> Result<WorkerDeployment, ApiError> {
        self.deployment(account, script).await?.ok_or_else(|| ApiError::script_not_found(script.as_str()))
    }

    /// Refuses a script name another account already uses in a shared namespace.
    pub async fn check_name_free(&self, account: &AccountId, script: &ScriptName) -> Result<(), ApiError> {
        let found = self
            .api::<WorkerDeployment>(account.as_str())
            .get_opt(script.as_str())
            .await
            .map_err(|e| kube_error("reading a WorkerDeployment", e))?;
        match found {
            Some(d) if !belongs_to(&d, account.as_str()) => Err(ApiError::Invalid(format!(
                "the worker name {:?} is taken in this server's shared namespace; choose another \
                 name (or run the API with --namespace-per-account)",
                script.as_str()
            ))),
            _ => Ok(()),
        }
    }

    pub async fn deployments(&self, account: &AccountId) -> Result<Vec<WorkerDeployment>, ApiError> {
        let params = ListParams::default().labels(&format!("{ACCOUNT_LABEL}={account}"));
        let list = self
            .api::<WorkerDeployment>(account.as_str())
            .list(&params)
            .await
            .map_err(|e| kube_error("listing WorkerDeployments", e))?;
        Ok(list.items)
    }

    /// Points the script's WorkerDeployment at `template` (server-side apply; created if missing).
    /// `undo` records what this deployment replaced, for a refused trigger call of the same deploy
    /// (see `undo`); None when this apply is itself an undo, or changes nothing that runs.
    pub async fn apply_template(
        &self,
        account: &AccountId,
        script: &ScriptName,
        template: &WorkerTemplate,
        message: Option<&str>,
        undo: Option<&UndoRecord>,
    ) -> Result<WorkerDeployment, ApiError> {
        let mut annotations = json!({ DEPLOYED_AT: Timestamp::now().to_string() });
        if let Some(message) = message.filter(|m| !m.is_empty()) {
            annotations[DEPLOY_MESSAGE] = json!(message);
        }
        if let Some(undo) = undo {
            annotations[UNDO] = json!(undo.to_annotation());
        }
        let body = json!({
            "apiVersion": WorkerDeployment::api_version(&()),
            "kind": WorkerDeployment::kind(&()),
            "metadata": {
                "name": script.as_str(),
                "namespace": self.namespace(account.as_str()),
                "labels": labels(account.as_str()),
                "annotations": annotations,
            },
            "spec": { "template": template },
        });
        let params = PatchParams::apply(FIELD_MANAGER).force();
        let applied = self
            .api::<WorkerDeployment>(account.as_str())
            .patch(script.as_str(), &params, &Patch::Apply(&body))
            .await
            .map_err(|e| kube_error("applying the WorkerDeployment", e))?;
        info!(%account, %script, version = template.version_id.as_deref().unwrap_or_default(), "template applied");
        Ok(applied)
    }

    /// Deletes the script's WorkerDeployment (its releases go with it) and its Secret.
    pub async fn delete_script(&self, account: &AccountId, script: &ScriptName) -> Result<(), ApiError> {
        let params = DeleteParams::background();
        match self.api::<WorkerDeployment>(account.as_str()).delete(script.as_str(), &params).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(kube_error("deleting the WorkerDeployment", e)),
        }
        if self.secret(account, script).await?.is_some() {
            match self.api::<Secret>(account.as_str()).delete(&secret_name(script.as_str()), &params).await {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => return Err(kube_error("deleting the script's Secret", e)),
            }
        }
        Ok(())
    }

    /// The releases made for the script's WorkerDeployment.
    pub async fn releases(
        &self,
        account: &AccountId,
        script: &ScriptName,
    ) -> Result<Vec<WorkerRelease>, ApiError> {
        let params =
            ListParams::default().labels(&format!("{DEPLOYMENT_LABEL}={script},{ACCOUNT_LABEL}={account}"));
        let list = self
            .api::<WorkerRelease>(account.as_str())
            .list(&params)
            .await
            .map_err(|e| kube_error("listing WorkerReleases", e))?;
        Ok(list.items)
    }

    // --- Secrets: values pass through, never logged ---

    /// The script's Secret, or None.
    pub async fn secret(&self, account: &AccountId, script: &ScriptName) -> Result<Option<Secret>, ApiError> {
        let found = self
            .api::<Secret>(account.as_str())
            .get_opt(&secret_name(script.as_str()))
            .await
            .map_err(|e| kube_error("reading the script's Secret", e))?;
        Ok(found.filter(|s| belongs_to(s, account.as_str())))
    }

    /// Sets keys of the script's Secret in one write, creating the Secret (owned by the
    /// WorkerDeployment, so it goes when the worker goes) if needed.
    pub async fn put_secrets(
        &self,
        deployment: &WorkerDeployment,
        account: &AccountId,
        values: &BTreeMap<SecretKey, String>,
    ) -> Result<(), ApiError> {
        let account = account.as_str();
        let name = secret_name(&deployment.name_any());
        let encoded: serde_json::Map<String, Value> = values
            .iter()
            .map(|(key, value)| {
                let value = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, value);
                (key.as_str().to_owned(), json!(value))
            })
            .collect();
        let update = json!({"data": encoded});
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
        let data = values
            .iter()
            .map(|(key, value)| (key.as_str().to_owned(), k8s_openapi::ByteString(value.as_bytes().to_vec())))
            .collect();
        let object = Secret {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(self.namespace(account)),
                labels: Some(labels(account)),
                owner_references: owned_by(deployment),
                ..ObjectMeta::default()
            },
            type_: Some("Opaque".into()),
            data: Some(data),
            ..Secret::default()
        };
        let params = PostParams { field_manager: Some(FIELD_MANAGER.into()), ..PostParams::default() };
        match self.api::<Secret>(account).create(&params, &object).await {
            Ok(_) => Ok(()),
            // Created meanwhile by a concurrent put: add the keys to it.
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
    pub async fn delete_secret_key(
        &self,
        account: &AccountId,
        script: &ScriptName,
        key: &SecretKey,
    ) -> Result<bool, ApiError> {
        let Some(secret) = self.secret(account, script).await? else { return Ok(false) };
        if !secret.data.as_ref().is_some_and(|d| d.contains_key(key.as_str())) {
            return Ok(false);
        }
        let body = json!({"data": {key.as_str(): null}});
        self.merge_secret(account.as_str(), &secret_name(script.as_str()), &body).await?;
        Ok(true)
    }

    /// The names of the script's secrets (never their values).
    pub async fn secret_names(
        &self,
        account: &AccountId,
        script: &ScriptName,
    ) -> Result<Vec<String>, ApiError> {
        let secret = self.secret(account, script).await?;
        Ok(secret.and_then(|s| s.data).into_iter().flat_map(|data| data.into_keys()).collect())
    }
}

fn labels(account: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (ACCOUNT_LABEL.to_owned(), account.to_owned()),
        ("app.kubernetes.io/managed-by".to_owned(), MANAGED_BY.to_owned()),
    ])
}
