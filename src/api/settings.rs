//! A script's settings: `GET`/`PATCH .../settings` (bindings; `wrangler secret bulk` sets secrets
//! through it) and `GET`/`PATCH .../script-settings` (the non-versioned settings wrangler syncs
//! after a deployment).

use std::collections::{BTreeMap, BTreeSet};

use axum::extract::multipart::{Multipart, MultipartRejection};
use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::response::Response;
use axum::Json;
use bytes::BytesMut;
use serde_json::{json, Map, Value};

use super::envelope::{json_body, ok, ApiError};
use super::path::{AccountId, ScriptName, ScriptPath, SecretKey};
use super::undo::refuse_after_deploy;
use super::upload::{metadata_verdict, Verdict};
use super::versions::bindings_json;
use super::Shared;
use crate::crd::{VarType, WorkerTemplate};

/// The one part of a settings PATCH, and its size cap (it is a small JSON document).
const SETTINGS_PART: &str = "settings";
const MAX_SETTINGS_BYTES: usize = 1 << 20;

/// The script's bindings as Cloudflare lists them: its vars with their values, its secrets by name
/// only (`wrangler secret bulk` sends each back as `{type, name}` to keep it).
async fn bindings(
    api: &Shared,
    account: &AccountId,
    script: &ScriptName,
    template: &WorkerTemplate,
) -> Result<Vec<Value>, ApiError> {
    let mut bindings = bindings_json(template);
    let secrets = api.store.secret_names(account, script).await?;
    bindings.extend(secrets.iter().map(|name| json!({"name": name, "type": "secret_text"})));
    Ok(bindings)
}

fn settings_json(bindings: Vec<Value>, template: &WorkerTemplate) -> Value {
    json!({
        "bindings": bindings,
        "compatibility_date": template.compatibility_date,
        "compatibility_flags": template.compatibility_flags,
        "usage_model": "standard",
        "logpush": false,
        "placement": {},
        "tail_consumers": [],
        "observability": {"enabled": false},
        "tags": [],
    })
}

/// `GET .../scripts/{script}/settings`.
pub async fn settings(
    State(api): State<Shared>,
    ScriptPath { account, script }: ScriptPath,
) -> Result<Response, ApiError> {
    let deployment = api.store.existing(&account, &script).await?;
    let template = &deployment.spec.template;
    let bindings = bindings(&api, &account, &script, template).await?;
    Ok(ok(settings_json(bindings, template)))
}

/// `PATCH .../scripts/{script}/settings` (`wrangler secret bulk`): a multipart form with one part,
/// `settings`, holding `{"bindings": [...]}`. Only secrets change here: a binding given as
/// `{type, name}` keeps what the worker has, a `secret_text` with a `text` sets that secret (the
/// same Secret `PUT .../secrets` writes); anything that would change code or vars is refused by
/// name, and so is leaving out a binding the worker has.
pub async fn patch_settings(
    State(api): State<Shared>,
    ScriptPath { account, script }: ScriptPath,
    multipart: Result<Multipart, MultipartRejection>,
) -> Result<Response, ApiError> {
    let settings = read_settings_form(multipart).await?;
    let wanted = settings_bindings(settings)?;
    let deployment = api.store.existing(&account, &script).await?;
    let template = &deployment.spec.template;
    let secrets: BTreeSet<String> = api.store.secret_names(&account, &script).await?.into_iter().collect();
    let values = secrets_to_set(script.as_str(), template, &secrets, &wanted)?;
    if !values.is_empty() {
        api.store.put_secrets(&deployment, &account, &values).await?;
    }
    let keys: Vec<&str> = values.keys().map(SecretKey::as_str).collect();
    tracing::info!(%account, %script, ?keys, "secrets set through settings");
    let bindings = bindings(&api, &account, &script, template).await?;
    Ok(ok(settings_json(bindings, template)))
}

/// The `settings` part of the form, as a JSON object.
async fn read_settings_form(
    multipart: Result<Multipart, MultipartRejection>,
) -> Result<Map<String, Value>, ApiError> {
    let mut multipart = multipart.map_err(|e| {
        ApiError::Invalid(format!("settings are sent as multipart/form-data: {}", e.body_text()))
    })?;
    let bad_form = |e: axum::extract::multipart::MultipartError| {
        ApiError::Invalid(format!("the settings form is not valid multipart/form-data: {}", e.body_text()))
    };
    let mut settings = None;
    while let Some(mut field) = multipart.next_field().await.map_err(bad_form)? {
        let name = field.name().unwrap_or_default().to_owned();
        if name != SETTINGS_PART {
            return Err(ApiError::Invalid(format!(
                "the settings form has a part {name:?}; it takes one part, `settings`"
            )));
        }
        let mut bytes = BytesMut::new();
        while let Some(chunk) = field.chunk().await.map_err(bad_form)? {
            if bytes.len() + chunk.len() > MAX_SETTINGS_BYTES {
                return Err(ApiError::TooLarge(format!(
                    "the `settings` part is larger than {MAX_SETTINGS_BYTES} bytes"
                )));
            }
            bytes.extend_from_slice(&chunk);
        }
        if settings.replace(bytes).is_some() {
            return Err(ApiError::Invalid("the settings form has two `settings` parts".into()));
        }
    }
    let bytes =
        settings.ok_or_else(|| ApiError::Invalid("the settings form has no `settings` part".into()))?;
    serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::Invalid(format!("the `settings` part is not a JSON object: {e}")))
}

/// The bindings of a settings PATCH; every other setting is refused by name unless it asks for
/// nothing.
fn settings_bindings(settings: Map<String, Value>) -> Result<Vec<Value>, ApiError> {
    let mut bindings = None;
    let mut refusals = Vec::new();
    for (key, value) in settings {
        if key == "bindings" {
            match value {
                Value::Array(list) => bindings = Some(list),
                _ => refusals.push("bindings must be a list".to_owned()),
            }
            continue;
        }
        match metadata_verdict(&key, &value) {
            Verdict::NothingToDo => {}
            Verdict::Refused(message) => refusals.push(message),
            Verdict::Served => {
                refusals.push(format!("{key} cannot be changed through settings here: deploy a new version"))
            }
        }
    }
    if !refusals.is_empty() {
        return Err(ApiError::Invalid(format!(
            "these settings cannot be changed here: {}",
            refusals.join("; ")
        )));
    }
    bindings.ok_or_else(|| ApiError::Invalid("the settings name no bindings".into()))
}

/// The secrets a settings PATCH sets, after checking that it changes nothing else: each of
/// `wanted` keeps a binding the worker has (`{type, name}`) or sets a secret (`secret_text` with
/// `text`), and every binding the worker has is in `wanted`. Pure: all refusals are named at once.
pub fn secrets_to_set(
    script: &str,
    template: &WorkerTemplate,
    secrets: &BTreeSet<String>,
    wanted: &[Value],
) -> Result<BTreeMap<SecretKey, String>, ApiError> {
    let mut values = BTreeMap::new();
    let mut seen = BTreeSet::new();
    let mut refusals = Vec::new();
    for binding in wanted {
        let (Some(name), Some(kind)) = (binding["name"].as_str(), binding["type"].as_str()) else {
            refusals.push(format!("a binding without a name or type: {binding}"));
            continue;
        };
        if !seen.insert(name.to_owned()) {
            refusals.push(format!("binding {name:?} is listed twice"));
            continue;
        }
        let extra: Vec<&String> = binding
            .as_object()
            .into_iter()
            .flat_map(|o| o.keys())
            .filter(|k| *k != "name" && *k != "type")
            .collect();
        let var = template.vars.iter().find(|v| v.name == name);
        let keeps = extra.is_empty()
            && match (kind, var) {
                ("inherit", Some(_)) => true,
                ("plain_text", Some(v)) => matches!(v.kind, VarType::Text),
                ("json", Some(v)) => matches!(v.kind, VarType::Json),
                ("inherit" | "secret_text", None) => secrets.contains(name),
                _ => false,
            };
        if keeps {
            continue;
        }
        match (kind, binding["text"].as_str(), extra.as_slice()) {
            ("secret_text", Some(text), [only]) if only.as_str() == "text" => {
                if var.is_some() {
                    refusals.push(format!("{name:?} is a var of worker {script:?}; a secret cannot take its name"));
                    continue;
                }
                match SecretKey::parse(name) {
                    Ok(key) => {
                        values.insert(key, text.to_owned());
                    }
                    Err(e) => refusals.push(e.to_string()),
                }
            }
            (_, _, []) => refusals.push(format!(
                "binding {name:?} ({kind}) is not a binding of worker {script:?} to keep"
            )),
            _ => refusals.push(format!(
                "binding {name:?} ({kind}) with a value would change the worker's code or vars; \
                 settings here only set secrets (secret_text): change vars and bindings with `wrangler deploy`"
            )),
        }
    }
    for var in template.vars.iter().filter(|v| !seen.contains(&v.name)) {
        refusals.push(format!(
            "var {:?} is left out; removing a var takes a deploy (`wrangler deploy`)",
            var.name
        ));
    }
    for secret in secrets.iter().filter(|s| !seen.contains(*s)) {
        refusals.push(format!(
            "secret {secret:?} is left out; delete a secret with `wrangler secret delete {secret}`"
        ));
    }
    if refusals.is_empty() {
        Ok(values)
    } else {
        Err(ApiError::Invalid(format!("the settings were not changed: {}", refusals.join("; "))))
    }
}

fn script_settings_json() -> Value {
    json!({"logpush": false, "observability": {"enabled": false}, "tags": [], "tail_consumers": []})
}

/// `GET .../scripts/{script}/script-settings`.
pub async fn script_settings(
    State(api): State<Shared>,
    ScriptPath { account, script }: ScriptPath,
) -> Result<Response, ApiError> {
    api.store.existing(&account, &script).await?;
    Ok(ok(script_settings_json()))
}

/// What a script-settings PATCH asks for that is not served, by name; empty when it asks for
/// nothing this server would have to do. `observability` is accepted: a worker's logs go to
/// workerd's output.
pub fn script_settings_refusals(settings: &Map<String, Value>) -> Vec<String> {
    let mut refusals = Vec::new();
    for (key, value) in settings {
        let verdict = match key.as_str() {
            "tags" if value.is_null() || value.as_array().is_some_and(Vec::is_empty) => Verdict::NothingToDo,
            "tags" => Verdict::Refused("worker tags (tags) are not stored yet".into()),
            "logpush" | "tail_consumers" | "streaming_tail_consumers" | "observability" => {
                metadata_verdict(key, value)
            }
            other => Verdict::Refused(format!("script setting {other:?} is not served")),
        };
        if let Verdict::Refused(message) = verdict {
            refusals.push(message);
        }
    }
    refusals
}

/// `PATCH .../scripts/{script}/script-settings`: wrangler sends it after a deployment (`deploy`
/// only warns when it fails; `versions deploy` fails). A setting that is not served is refused by
/// name and, as with the trigger calls, undoes the deployment it follows (see `undo`).
pub async fn patch_script_settings(
    State(api): State<Shared>,
    ScriptPath { account, script }: ScriptPath,
    body: Result<Json<Map<String, Value>>, JsonRejection>,
) -> Result<Response, ApiError> {
    let settings = json_body(body)?;
    let refusals = script_settings_refusals(&settings);
    if !refusals.is_empty() {
        return Err(refuse_after_deploy(&api, &account, &script, &refusals.join("; ")).await);
    }
    api.store.existing(&account, &script).await?;
    Ok(ok(script_settings_json()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::WorkerVar;

    fn template() -> WorkerTemplate {
        WorkerTemplate {
            vars: vec![
                WorkerVar { name: "GREETING".into(), kind: VarType::Text, value: "hi".into() },
                WorkerVar { name: "CFG".into(), kind: VarType::Json, value: "{}".into() },
            ],
            ..WorkerTemplate::default()
        }
    }

    fn secrets(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    fn refused(result: Result<BTreeMap<SecretKey, String>, ApiError>) -> String {
        match result {
            Err(ApiError::Invalid(m)) => m,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    /// What `wrangler secret bulk` sends: every binding back as `{type, name}`, new secrets with text.
    #[test]
    fn secret_bulk_sets_secrets_and_keeps_the_rest() {
        let wanted = [
            json!({"type": "plain_text", "name": "GREETING"}),
            json!({"type": "json", "name": "CFG"}),
            json!({"type": "secret_text", "name": "OLD"}),
            json!({"type": "secret_text", "name": "API_KEY", "text": "s3cr3t"}),
            json!({"type": "secret_text", "name": "REPLACED", "text": "new"}),
        ];
        let set = secrets_to_set("hello", &template(), &secrets(&["OLD", "REPLACED"]), &wanted).unwrap();
        let set: Vec<(&str, &str)> = set.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert_eq!(set, [("API_KEY", "s3cr3t"), ("REPLACED", "new")]);
        // A draft worker: no bindings at all.
        let draft =
            secrets_to_set("hello", &WorkerTemplate::default(), &secrets(&[]), &wanted[3..4]).unwrap();
        assert_eq!(draft.len(), 1);
    }

    #[test]
    fn anything_but_secrets_is_refused_by_name() {
        let keep = |extra: Vec<Value>| {
            let mut all = vec![
                json!({"type": "plain_text", "name": "GREETING"}),
                json!({"type": "json", "name": "CFG"}),
            ];
            all.extend(extra);
            secrets_to_set("hello", &template(), &secrets(&["OLD"]), &all)
        };
        let old = json!({"type": "secret_text", "name": "OLD"});
        let m = refused(keep(vec![old.clone(), json!({"type": "plain_text", "name": "NEW", "text": "x"})]));
        assert!(m.contains("\"NEW\"") && m.contains("wrangler deploy"), "{m}");
        let m =
            refused(keep(vec![old.clone(), json!({"type": "plain_text", "name": "GREETING", "text": "x"})]));
        assert!(m.contains("twice"), "{m}");
        let m = refused(keep(vec![
            old.clone(),
            json!({"type": "kv_namespace", "name": "KV", "namespace_id": "x"}),
        ]));
        assert!(m.contains("\"KV\""), "{m}");
        let m = refused(keep(vec![old.clone(), json!({"type": "secret_text", "name": "GONE"})]));
        assert!(m.contains("\"GONE\"") && m.contains("not a binding"), "{m}");
        let m =
            refused(keep(vec![old.clone(), json!({"type": "secret_text", "name": "bad-name", "text": "x"})]));
        assert!(m.contains("bad-name"), "{m}");
        let m = refused(keep(vec![]));
        assert!(m.contains("secret \"OLD\" is left out"), "{m}");
        let m = refused(secrets_to_set("hello", &template(), &secrets(&[]), &[]));
        assert!(m.contains("var \"GREETING\" is left out") && m.contains("var \"CFG\""), "{m}");
        let shadow = vec![old, json!({"type": "secret_text", "name": "GREETING", "text": "x"})];
        let mut all = vec![json!({"type": "json", "name": "CFG"})];
        all.extend(shadow);
        let m = refused(secrets_to_set("hello", &template(), &secrets(&["OLD"]), &all));
        assert!(m.contains("\"GREETING\" is a var"), "{m}");
    }

    #[test]
    fn settings_other_than_bindings_are_refused_unless_they_ask_for_nothing() {
        let object = |v: Value| v.as_object().unwrap().clone();
        assert_eq!(
            settings_bindings(object(json!({"bindings": [], "logpush": false}))).unwrap(),
            Vec::<Value>::new()
        );
        let m = settings_bindings(object(json!({"bindings": [], "compatibility_date": "2025-01-01"})))
            .unwrap_err();
        assert!(m.to_string().contains("compatibility_date"), "{m}");
        let m = settings_bindings(object(json!({"bindings": [], "tail_consumers": [{"service": "t"}]})))
            .unwrap_err();
        assert!(m.to_string().contains("tail consumers"), "{m}");
        assert!(settings_bindings(object(json!({}))).is_err());
    }

    #[test]
    fn script_settings_serve_observability_and_refuse_logpush_and_tail_consumers() {
        let object = |v: Value| v.as_object().unwrap().clone();
        assert!(script_settings_refusals(&object(json!({"observability": {"enabled": false}, "tags": []})))
            .is_empty());
        assert!(script_settings_refusals(&object(
            json!({"observability": {"enabled": true}, "logpush": false})
        ))
        .is_empty());
        let r =
            script_settings_refusals(&object(json!({"logpush": true, "tail_consumers": [{"service": "x"}],
            "streaming_tail_consumers": [{"service": "y"}], "tags": ["t"], "other": 1})));
        let all = r.join("\n");
        for words in ["logpush", "tail consumers", "streaming tail consumers", "tags", "\"other\""] {
            assert!(all.contains(words), "{all}");
        }
    }
}
