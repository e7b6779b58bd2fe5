//! WorkerRelease, pure: the worker its template and fetched files make, the repository its layer
//! goes to, and the status that reports the outcome.

use std::collections::BTreeMap;

use bytes::Bytes;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use sha2::{Digest as _, Sha256};

use super::super::context::Settings;
use super::super::Error;
use crate::crd::{
    condition, set_condition, ConditionStatus, LayerDescriptor, ReleasePhase, ResolvedModule,
    ResolvedSettings, VarType, WorkerAccount, WorkerRelease, WorkerReleaseStatus, WorkerTemplate, WorkerVar,
    ACCOUNT_LABEL, READY,
};
use crate::image::assemble::LayerRef;
use crate::source::S3Url;
use crate::worker::names::tenant_env_prefix;
use crate::worker::{Overrides, Var, VarValue, Worker, WorkerFiles, WorkerSettings};

/// A release is built once: its spec cannot change, so a Ready status for its generation is final.
pub fn is_built(release: &WorkerRelease) -> bool {
    release.status.as_ref().is_some_and(|s| {
        s.phase == ReleasePhase::Ready
            && s.layer.is_some()
            && s.observed_generation == release.metadata.generation
    })
}

pub fn script_urls(template: &WorkerTemplate) -> Result<Vec<S3Url>, Error> {
    template.script_urls.iter().map(|u| S3Url::parse(u).map_err(Error::Invalid)).collect()
}

/// The worker made of the files under each URL (a later URL's file replaces an earlier one's) and
/// the template, whose settings are laid over a `metadata.json` among the files.
pub fn resolve_worker(
    template: &WorkerTemplate,
    fetched: &[(S3Url, BTreeMap<String, Bytes>)],
) -> Result<(Worker, Vec<ResolvedModule>), Error> {
    let mut files = BTreeMap::new();
    let mut origin = BTreeMap::new();
    for (url, found) in fetched {
        for (path, bytes) in found {
            let source = if url.is_prefix() { format!("{url}{path}") } else { url.to_string() };
            origin.insert(path.clone(), (source, bytes.clone()));
            files.insert(path.clone(), bytes.clone().into());
        }
    }
    let worker =
        Worker::from_files(WorkerFiles { name: template.script_name.clone(), files }, &overrides(template))?;
    let modules = worker
        .code
        .modules_main_first()
        .filter_map(|m| origin.get(&m.path).map(|(source, bytes)| (m, source, bytes)))
        .map(|(m, source, bytes)| ResolvedModule {
            name: m.path.clone(),
            source: source.clone(),
            size: bytes.len() as i64,
            sha256: hex::encode(Sha256::digest(bytes)),
        })
        .collect();
    Ok((worker, modules))
}

/// The template's settings, to be laid over the uploaded metadata.
fn overrides(template: &WorkerTemplate) -> Overrides {
    Overrides {
        main_module: template.main_module.clone(),
        compatibility_date: template.compatibility_date.clone(),
        compatibility_flags: template.compatibility_flags.clone(),
        vars: template.vars.iter().map(var_of).collect(),
        // A tenant's worker: never a prefix made from its name (see `tenant_env_prefix`).
        env_prefix: Some(
            template.env_prefix.clone().unwrap_or_else(|| tenant_env_prefix(&template.script_name)),
        ),
    }
}

fn var_of(var: &WorkerVar) -> Var {
    let value = match var.kind {
        VarType::Text => VarValue::Text(var.value.clone()),
        VarType::Json => VarValue::Json(var.value.clone()),
    };
    Var { name: var.name.clone(), value }
}

/// The worker's settings as a release's status records them.
pub fn resolved_settings(settings: &WorkerSettings) -> ResolvedSettings {
    ResolvedSettings {
        compatibility_date: settings.compatibility_date.clone(),
        compatibility_flags: settings.compatibility_flags.clone(),
        vars: settings
            .vars
            .iter()
            .map(|v| match &v.value {
                VarValue::Text(t) => {
                    WorkerVar { name: v.name.clone(), kind: VarType::Text, value: t.clone() }
                }
                VarValue::Json(j) => {
                    WorkerVar { name: v.name.clone(), kind: VarType::Json, value: j.clone() }
                }
            })
            .collect(),
        secret_names: settings.secrets.iter().cloned().collect(),
        env_prefix: settings.env_prefix.clone(),
    }
}

/// A release's recorded settings, back in the builder's terms.
pub fn worker_settings(resolved: &ResolvedSettings) -> WorkerSettings {
    WorkerSettings {
        compatibility_date: resolved.compatibility_date.clone(),
        compatibility_flags: resolved.compatibility_flags.clone(),
        vars: resolved.vars.iter().map(var_of).collect(),
        secrets: resolved.secret_names.iter().cloned().collect(),
        env_prefix: resolved.env_prefix.clone(),
    }
}

/// Where the release's layer goes: its WorkerAccount's repository, else the controller's prefix
/// plus the account (the release's account label, else its namespace).
pub fn repository(
    release: &WorkerRelease,
    account: Option<&WorkerAccount>,
    settings: &Settings,
) -> Result<String, Error> {
    let account_name =
        release.labels().get(ACCOUNT_LABEL).cloned().or_else(|| release.namespace()).unwrap_or_default();
    account_repository(account.and_then(|a| a.spec.repository.as_deref()), &account_name, settings)
}

/// An account's repository: the one it names, else the controller's prefix plus the account name.
/// Releases push their layers and bundles their images there, so a bundle's push finds its
/// workers' layers in place.
pub fn account_repository(
    explicit: Option<&str>,
    account_name: &str,
    settings: &Settings,
) -> Result<String, Error> {
    if let Some(repository) = explicit {
        return Ok(repository.to_owned());
    }
    match &settings.repository_prefix {
        Some(prefix) => Ok(format!("{}/{account_name}", prefix.trim_end_matches('/'))),
        None => Err(Error::Invalid(format!(
            "no repository for account {account_name:?}: set spec.repository on its WorkerAccount or start \
             the controller with --repository-prefix"
        ))),
    }
}

pub fn ready_status(
    release: &WorkerRelease,
    worker: &Worker,
    modules: Vec<ResolvedModule>,
    layer: &LayerRef,
    repository: &str,
    now: Timestamp,
) -> WorkerReleaseStatus {
    let generation = release.metadata.generation;
    let wanted = condition(
        READY,
        ConditionStatus::True,
        "Built",
        format!("layer {} pushed to {repository}", layer.digest),
        generation,
    );
    WorkerReleaseStatus {
        observed_generation: generation,
        phase: ReleasePhase::Ready,
        layer: Some(LayerDescriptor {
            media_type: crate::image::layer::MEDIA_TYPE_LAYER_GZIP.into(),
            digest: layer.digest.to_string(),
            diff_id: layer.diff_id.to_string(),
            size: layer.size as i64,
        }),
        repository: Some(repository.into()),
        main_module: Some(worker.code.main_module.clone()),
        modules,
        settings: Some(resolved_settings(&worker.settings)),
        conditions: set_condition(existing_conditions(release), wanted, now),
    }
}

/// A failure keeps nothing of an earlier attempt but the conditions' history.
pub fn failed_status(release: &WorkerRelease, error: &Error, now: Timestamp) -> WorkerReleaseStatus {
    let generation = release.metadata.generation;
    let wanted = condition(READY, ConditionStatus::False, error.reason(), error.message(), generation);
    WorkerReleaseStatus {
        observed_generation: generation,
        phase: ReleasePhase::Failed,
        conditions: set_condition(existing_conditions(release), wanted, now),
        ..WorkerReleaseStatus::default()
    }
}

fn existing_conditions(
    release: &WorkerRelease,
) -> &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition] {
    release.status.as_ref().map(|s| s.conditions.as_slice()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{WorkerAccountSpec, WorkerReleaseSpec};
    use crate::worker::Binding;

    fn template() -> WorkerTemplate {
        WorkerTemplate {
            script_name: "api".into(),
            script_urls: vec!["s3://workers/1234/api/v1/".into(), "s3://workers/shared/lib.js".into()],
            ..WorkerTemplate::default()
        }
    }

    fn fetched(files: &[(&str, &str)], url: &str) -> (S3Url, BTreeMap<String, Bytes>) {
        (
            S3Url::parse(url).unwrap(),
            files.iter().map(|(p, c)| (p.to_string(), Bytes::from(c.to_string()))).collect(),
        )
    }

    fn release(labels: &[(&str, &str)]) -> WorkerRelease {
        let mut r = WorkerRelease::new("api-0123456789", WorkerReleaseSpec { template: template() });
        r.metadata.namespace = Some("tenants".into());
        r.metadata.generation = Some(1);
        r.metadata.labels = Some(labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect());
        r
    }

    #[test]
    fn later_urls_replace_earlier_files_and_modules_name_their_source() {
        let (worker, modules) = resolve_worker(
            &template(),
            &[
                fetched(&[("index.js", "export default {}"), ("lib.js", "old")], "s3://workers/1234/api/v1/"),
                fetched(&[("lib.js", "new")], "s3://workers/shared/lib.js"),
            ],
        )
        .unwrap();
        assert_eq!(worker.code.main_module, "index.js");
        let lib = modules.iter().find(|m| m.name == "lib.js").unwrap();
        assert_eq!((lib.source.as_str(), lib.size), ("s3://workers/shared/lib.js", 3));
        assert_eq!(modules[0].source, "s3://workers/1234/api/v1/index.js");
        assert_eq!(modules[0].sha256, hex::encode(Sha256::digest(b"export default {}")));
    }

    #[test]
    fn template_settings_win_over_uploaded_metadata() {
        let uploaded = r#"{"main_module":"a.js","compatibility_date":"2024-01-01",
            "bindings":[{"type":"plain_text","name":"GREETING","text":"hi"},{"type":"plain_text","name":"KEEP","text":"k"}]}"#;
        let mut t = template();
        t.main_module = Some("b.js".into());
        t.compatibility_date = Some("2025-06-01".into());
        t.compatibility_flags = vec!["nodejs_compat".into()];
        t.vars = vec![
            WorkerVar { name: "GREETING".into(), kind: VarType::Text, value: "hello".into() },
            WorkerVar { name: "LIMITS".into(), kind: VarType::Json, value: r#"{"rps":5}"#.into() },
        ];
        let files = fetched(&[("a.js", "a"), ("b.js", "b"), ("metadata.json", uploaded)], "s3://workers/p/");
        let (worker, modules) = resolve_worker(&t, &[files]).unwrap();
        assert_eq!(worker.code.main_module, "b.js");
        assert_eq!(modules[0].name, "b.js", "main module first");
        assert!(modules.iter().all(|m| m.name != "metadata.json"));
        let settings = &worker.settings;
        assert_eq!(settings.compatibility_date, "2025-06-01");
        assert_eq!(settings.compatibility_flags, ["nodejs_compat"]);
        let bindings = settings.bindings();
        assert!(bindings.contains(&Binding::Text { name: "GREETING".into(), value: "hello".into() }));
        assert!(bindings.contains(&Binding::Text { name: "KEEP".into(), value: "k".into() }));
        assert!(bindings.iter().any(|b| b.name() == "LIMITS"));
        // What the status records gives back the same settings: the bundle needs nothing else.
        assert_eq!(worker_settings(&resolved_settings(settings)), *settings);
    }

    #[test]
    fn bad_input_becomes_an_invalid_worker_error_naming_the_problem() {
        let mut t = template();
        t.vars = vec![WorkerVar { name: "X".into(), kind: VarType::Json, value: "{nope".into() }];
        let err = resolve_worker(&t, &[fetched(&[("index.js", "")], "s3://workers/p/")]).unwrap_err();
        assert_eq!(err.reason(), "InvalidWorker");
        assert!(err.message().contains("\"X\""), "{}", err.message());
        let err =
            resolve_worker(&template(), &[fetched(&[("main.txt", "")], "s3://workers/p/")]).unwrap_err();
        assert_eq!(err.reason(), "InvalidWorker");
        let err = resolve_worker(&template(), &[fetched(&[("metadata.json", "[]")], "s3://workers/p/")])
            .unwrap_err();
        assert!(err.message().contains("metadata.json"), "{}", err.message());
    }

    #[test]
    fn repository_comes_from_the_account_else_the_prefix_and_account_label() {
        let settings = Settings {
            repository_prefix: Some("127.0.0.1:5000/workers/".into()),
            source_date_epoch: 0,
            base_image: None,
            network_policies: true,
            startup_check: None,
        };
        let labelled = release(&[(ACCOUNT_LABEL, "1234")]);
        assert_eq!(repository(&labelled, None, &settings).unwrap(), "127.0.0.1:5000/workers/1234");
        assert_eq!(repository(&release(&[]), None, &settings).unwrap(), "127.0.0.1:5000/workers/tenants");
        let account = WorkerAccount::new(
            "1234",
            WorkerAccountSpec { repository: Some("reg.example/acme/w".into()), ..Default::default() },
        );
        assert_eq!(repository(&labelled, Some(&account), &settings).unwrap(), "reg.example/acme/w");
        let none = Settings { repository_prefix: None, ..settings };
        let err = repository(&labelled, None, &none).unwrap_err();
        assert!(err.message().contains("--repository-prefix"), "{}", err.message());
    }

    #[test]
    fn a_ready_status_is_final_for_its_generation_and_a_failure_clears_the_layer() {
        let mut r = release(&[]);
        assert!(!is_built(&r));
        let (worker, modules) =
            resolve_worker(&template(), &[fetched(&[("index.js", "x")], "s3://workers/p/")]).unwrap();
        let digests = LayerRef {
            diff_id: crate::digest::Digest::of(b"t"),
            digest: crate::digest::Digest::of(b"g"),
            size: 10,
        };
        let now = Timestamp::from_second(5).unwrap();
        r.status = Some(ready_status(&r, &worker, modules, &digests, "reg/x", now));
        assert!(is_built(&r));
        let status = r.status.as_ref().unwrap();
        assert_eq!(status.layer.as_ref().unwrap().digest, digests.digest.to_string());
        // A tenant's worker without envPrefix: a hashed prefix, never one made from its name.
        assert_eq!(status.settings.as_ref().unwrap().env_prefix, tenant_env_prefix("api"));
        assert!(status.settings.as_ref().unwrap().env_prefix.starts_with("WB"));
        assert_eq!(status.conditions[0].status, "True");
        r.metadata.generation = Some(2);
        assert!(!is_built(&r), "a new generation is built again");
        let missing =
            crate::source::SourceError::S3 { url: "s3://b/k".into(), message: "no such key".into() };
        let failed = failed_status(&r, &Error::Source(missing), now);
        assert_eq!((failed.phase, failed.layer.is_none()), (ReleasePhase::Failed, true));
        assert_eq!(failed.conditions[0].reason, "SourceUnavailable");
        assert!(failed.conditions[0].message.contains("s3://b/k"));
    }
}
