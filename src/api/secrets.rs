//! `wrangler secret put/list/delete`: keys of the script's Secret (`<script>-secrets`, referenced
//! by the template's `secretRef`). Only the Secret changes, never the template: a secret value
//! change does not make a release. Values go to the Kubernetes API and nowhere else: not to S3, a
//! log line, an Event or a status.

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::response::Response;
use axum::Json;
use serde::Deserialize;
use serde_json::json;

use super::envelope::{json_body, ok, ApiError};
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
    Path((account, script)): Path<(String, String)>,
    body: Result<Json<PutSecret>, JsonRejection>,
) -> Result<Response, ApiError> {
    let secret = json_body(body)?;
    check_secret_key(&secret.name)?;
    if let Some(kind) = secret.kind.as_deref().filter(|k| *k != "secret_text") {
        return Err(ApiError::Invalid(format!(
            "secrets of type {kind:?} are not supported (only secret_text)"
        )));
    }
    let deployment = api.store.existing(&account, &script).await?;
    api.store.put_secret(&deployment, &account, &secret.name, &secret.text).await?;
    tracing::info!(%account, %script, key = %secret.name, "secret set");
    Ok(ok(json!({"name": secret.name, "type": "secret_text"})))
}

/// `GET .../scripts/{script}/secrets`: names and types, never values.
pub async fn list(
    State(api): State<Shared>,
    Path((account, script)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    api.store.existing(&account, &script).await?;
    let secret = api.store.secret(&account, &script).await?;
    let names: Vec<serde_json::Value> = secret
        .and_then(|s| s.data)
        .into_iter()
        .flat_map(|data| data.into_keys())
        .map(|name| json!({"name": name, "type": "secret_text"}))
        .collect();
    Ok(ok(names))
}

/// `DELETE .../scripts/{script}/secrets/{name}`.
pub async fn delete(
    State(api): State<Shared>,
    Path((account, script, name)): Path<(String, String, String)>,
) -> Result<Response, ApiError> {
    api.store.existing(&account, &script).await?;
    if !api.store.delete_secret_key(&account, &script, &name).await? {
        return Err(ApiError::NotFound(format!("worker {script:?} has no secret {name:?}")));
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
