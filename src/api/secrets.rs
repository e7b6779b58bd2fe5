//! `wrangler secret put/list/delete`: keys of the script's Secret (`<script>-secrets`, referenced
//! by the template's `secretRef`). Only the Secret changes, never the template: a secret value
//! change does not make a release. Values go to the Kubernetes API and nowhere else: not to S3, a
//! log line, an Event or a status.

use std::collections::BTreeMap;

use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::response::Response;
use axum::Json;
use serde::Deserialize;
use serde_json::json;

use super::envelope::{json_body, ok, ApiError};
use super::path::{ScriptPath, SecretKey, SecretPath};
use super::Shared;

/// The body of `PUT .../secrets`. Not `Debug`: the value must not end up in a log by accident.
#[derive(Deserialize)]
pub struct PutSecret {
    name: String,
    text: String,
    #[serde(rename = "type", default)]
    kind: Option<String>,
}

/// A secret's name is a Secret key, a binding name and the tail of an environment variable
/// (`<ENV_PREFIX><NAME>`): letters, digits and `_`, not starting with a digit.
pub fn check_secret_key(name: &str) -> Result<(), ApiError> {
    let valid = !name.is_empty()
        && name.len() <= 200
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        && !name.starts_with(|c: char| c.is_ascii_digit());
    if valid {
        Ok(())
    } else {
        Err(ApiError::Invalid(format!(
            "secret name {name:?} must be 1-200 letters, digits and '_', not starting with a digit \
             (it becomes an environment variable)"
        )))
    }
}

/// `PUT .../scripts/{script}/secrets`.
pub async fn put(
    State(api): State<Shared>,
    ScriptPath { account, script }: ScriptPath,
    body: Result<Json<PutSecret>, JsonRejection>,
) -> Result<Response, ApiError> {
    let secret = json_body(body)?;
    let key = SecretKey::parse(&secret.name)?;
    if let Some(kind) = secret.kind.as_deref().filter(|k| *k != "secret_text") {
        return Err(ApiError::Invalid(format!(
            "secrets of type {kind:?} are not supported (only secret_text)"
        )));
    }
    let deployment = api.store.existing(&account, &script).await?;
    let values = BTreeMap::from([(key.clone(), secret.text)]);
    api.store.put_secrets(&deployment, &account, &values).await?;
    tracing::info!(%account, %script, %key, "secret set");
    Ok(ok(json!({"name": key.as_str(), "type": "secret_text"})))
}

/// `GET .../scripts/{script}/secrets`: names and types, never values.
pub async fn list(
    State(api): State<Shared>,
    ScriptPath { account, script }: ScriptPath,
) -> Result<Response, ApiError> {
    api.store.existing(&account, &script).await?;
    let names = api.store.secret_names(&account, &script).await?;
    let names: Vec<serde_json::Value> =
        names.iter().map(|name| json!({"name": name, "type": "secret_text"})).collect();
    Ok(ok(names))
}

/// `DELETE .../scripts/{script}/secrets/{name}`.
pub async fn delete(
    State(api): State<Shared>,
    SecretPath { account, script, secret: name }: SecretPath,
) -> Result<Response, ApiError> {
    api.store.existing(&account, &script).await?;
    if !api.store.delete_secret_key(&account, &script, &name).await? {
        return Err(ApiError::NotFound(format!(
            "worker {:?} has no secret {:?}",
            script.as_str(),
            name.as_str()
        )));
    }
    tracing::info!(%account, %script, key = %name, "secret deleted");
    Ok(ok(json!({})))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_names_are_environment_safe() {
        for ok in ["API_KEY", "k", "_x1"] {
            assert!(check_secret_key(ok).is_ok(), "{ok}");
        }
        for bad in ["", "1X", "A-B", "A.B", "A=B", "A B"] {
            assert!(check_secret_key(bad).is_err(), "{bad}");
        }
    }
}
