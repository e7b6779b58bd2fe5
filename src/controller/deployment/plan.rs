//! WorkerDeployment, pure: from the deployment and the releases it owns to the release its
//! template needs, the releases past the history limit, and its status.

use std::borrow::Borrow;
use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use sha2::{Digest as _, Sha256};

use crate::crd::{
    condition, owned_by, set_condition, ConditionStatus, ReleasePhase, WorkerDeployment,
    WorkerDeploymentStatus, WorkerRelease, WorkerReleaseSpec, WorkerTemplate, DEPLOYMENT_LABEL, MANAGED_BY,
    READY, SCRIPT_LABEL,
};
use crate::image::canonical::to_canonical_json;

/// Hex digits of the template hash in a release's name.
const HASH_LEN: usize = 10;
/// Longest object name Kubernetes takes.
const MAX_NAME: usize = 253;

#[derive(Debug)]
pub struct DeploymentPlan {
    /// The release of the current template, to apply (unchanged if it exists).
    pub release: WorkerRelease,
    /// Owned releases past the history limit, to delete.
    pub delete: Vec<String>,
    pub status: WorkerDeploymentStatus,
}

/// A short hash of the template: equal templates give equal names, so going back to an earlier
/// template finds its release again.
pub fn template_hash(template: &WorkerTemplate) -> Result<String, serde_json::Error> {
    let canonical = to_canonical_json(template)?;
    Ok(hex::encode(Sha256::digest(canonical))[..HASH_LEN].to_owned())
}

pub fn release_name(deployment: &str, hash: &str) -> String {
    let keep = MAX_NAME - HASH_LEN - 1;
    let mut prefix: String = deployment.chars().take(keep).collect();
    while prefix.ends_with(['-', '.']) {
        prefix.pop();
    }
    format!("{prefix}-{hash}")
}

pub fn plan(
    deployment: &WorkerDeployment,
    owned: &[impl Borrow<WorkerRelease>],
    now: Timestamp,
) -> Result<DeploymentPlan, serde_json::Error> {
    let owned: Vec<&WorkerRelease> = owned.iter().map(Borrow::borrow).collect();
    let template = &deployment.spec.template;
    let name = release_name(&deployment.name_any(), &template_hash(template)?);
    let release = desired_release(deployment, &name);

    // Most recently current first: the current release, then the previous history, then any
    // other owned release (status lost or written by an older controller), newest first.
    let previous = deployment.status.as_ref().map(|s| s.release_history.clone()).unwrap_or_default();
    let mut others: Vec<&WorkerRelease> = owned.clone();
    others.sort_by(|a, b| {
        b.creation_timestamp()
            .map(|t| t.0)
            .cmp(&a.creation_timestamp().map(|t| t.0))
            .then(a.name_any().cmp(&b.name_any()))
    });
    let exists = |n: &String| owned.iter().any(|r| &r.name_any() == n);
    let mut history = vec![name.clone()];
    for candidate in previous.iter().filter(|n| exists(n)).chain(others.iter().flat_map(|r| &r.metadata.name))
    {
        if !history.contains(candidate) {
            history.push(candidate.clone());
        }
    }
    // While the current release is not Ready, the newest Ready one is what the account still runs:
    // it is kept even past the limit.
    let is_ready = |n: &String| {
        owned
            .iter()
            .any(|r| &r.name_any() == n && r.status.as_ref().is_some_and(|s| s.phase == ReleasePhase::Ready))
    };
    let last_good = history.iter().find(|n| is_ready(n)).cloned();
    let keep = 1 + deployment.spec.release_history_limit as usize;
    let past_limit = history.split_off(keep.min(history.len()));
    let mut delete = Vec::new();
    for name in past_limit.into_iter().filter(|n| exists(n)) {
        if Some(&name) == last_good.as_ref() {
            history.push(name);
        } else {
            delete.push(name);
        }
    }

    let current = owned.iter().find(|r| r.name_any() == name).copied();
    let wanted = ready_condition(current, deployment.metadata.generation);
    let conditions = set_condition(
        deployment.status.as_ref().map(|s| s.conditions.as_slice()).unwrap_or_default(),
        wanted,
        now,
    );
    let status = WorkerDeploymentStatus {
        observed_generation: deployment.metadata.generation,
        current_release: Some(name),
        release_history: history,
        conditions,
    };
    Ok(DeploymentPlan { release, delete, status })
}

fn desired_release(deployment: &WorkerDeployment, name: &str) -> WorkerRelease {
    let mut labels: BTreeMap<String, String> = deployment.labels().clone();
    labels.insert(DEPLOYMENT_LABEL.into(), deployment.name_any());
    labels.insert(SCRIPT_LABEL.into(), deployment.spec.template.script_name.clone());
    labels.insert("app.kubernetes.io/managed-by".into(), MANAGED_BY.into());
    WorkerRelease {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: deployment.namespace(),
            labels: Some(labels),
            owner_references: owned_by(deployment),
            ..ObjectMeta::default()
        },
        spec: WorkerReleaseSpec { template: deployment.spec.template.clone() },
        status: None,
    }
}

fn ready_condition(
    current: Option<&WorkerRelease>,
    generation: Option<i64>,
) -> k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
    let status = current.and_then(|r| r.status.as_ref());
    let failure =
        status.and_then(|s| s.conditions.iter().find(|c| c.type_ == READY)).map(|c| c.message.clone());
    match status.map(|s| s.phase) {
        Some(ReleasePhase::Ready) => condition(
            READY,
            ConditionStatus::True,
            "ReleaseReady",
            "the current release is built",
            generation,
        ),
        Some(ReleasePhase::Failed) => condition(
            READY,
            ConditionStatus::False,
            "ReleaseFailed",
            failure.unwrap_or_else(|| "the current release failed".into()),
            generation,
        ),
        _ => condition(
            READY,
            ConditionStatus::Unknown,
            "Building",
            "the current release is being built",
            generation,
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{WorkerDeploymentSpec, WorkerReleaseStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn template(main: &str) -> WorkerTemplate {
        WorkerTemplate {
            script_name: "api".into(),
            script_urls: vec!["s3://workers/1234/api/".into()],
            main_module: Some(main.into()),
            ..WorkerTemplate::default()
        }
    }

    fn deployment(template: WorkerTemplate, limit: u32, history: &[&str]) -> WorkerDeployment {
        let mut d =
            WorkerDeployment::new("api", WorkerDeploymentSpec { template, release_history_limit: limit });
        d.metadata.namespace = Some("ns".into());
        d.metadata.uid = Some("uid-1".into());
        d.metadata.generation = Some(3);
        d.metadata.labels = Some([("workerbundle.dev/account".to_owned(), "1234".to_owned())].into());
        d.status = Some(WorkerDeploymentStatus {
            release_history: history.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        });
        d
    }

    fn release(name: &str, created: i64, phase: ReleasePhase) -> WorkerRelease {
        let mut r = WorkerRelease::new(name, WorkerReleaseSpec { template: template("x.js") });
        r.metadata.creation_timestamp = Some(Time(Timestamp::from_second(created).unwrap()));
        r.status = Some(WorkerReleaseStatus { phase, ..Default::default() });
        r
    }

    fn now() -> Timestamp {
        Timestamp::from_second(1_000).unwrap()
    }

    #[test]
    fn one_release_per_template_named_by_its_hash_owned_and_labelled() {
        let d = deployment(template("index.js"), 10, &[]);
        let plan = plan(&d, &[] as &[WorkerRelease], now()).unwrap();
        let name = plan.release.metadata.name.clone().unwrap();
        assert!(name.starts_with("api-") && name.len() == 4 + HASH_LEN, "{name}");
        assert_eq!(plan.release.spec.template, d.spec.template);
        let owner = &plan.release.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.uid.as_str(), owner.controller),
            ("WorkerDeployment", "uid-1", Some(true))
        );
        let labels = plan.release.metadata.labels.as_ref().unwrap();
        assert_eq!(labels["workerbundle.dev/account"], "1234");
        assert_eq!(labels[DEPLOYMENT_LABEL], "api");
        assert_eq!(labels[SCRIPT_LABEL], "api");
        assert_eq!(plan.status.current_release.as_deref(), Some(name.as_str()));
        assert_eq!(plan.status.observed_generation, Some(3));
        assert!(plan.delete.is_empty());
    }

    #[test]
    fn equal_templates_give_equal_names_and_any_change_a_new_one() {
        let a = template_hash(&template("index.js")).unwrap();
        assert_eq!(a, template_hash(&template("index.js")).unwrap());
        assert_ne!(a, template_hash(&template("main.js")).unwrap());
        let mut flagged = template("index.js");
        flagged.compatibility_flags.push("nodejs_compat".into());
        assert_ne!(a, template_hash(&flagged).unwrap());
    }

    #[test]
    fn going_back_reuses_the_old_release_and_puts_it_first() {
        let old = release_name("api", &template_hash(&template("index.js")).unwrap());
        let newer = release_name("api", &template_hash(&template("main.js")).unwrap());
        let d = deployment(template("index.js"), 10, &[&newer, &old]);
        let owned = [release(&old, 1, ReleasePhase::Ready), release(&newer, 2, ReleasePhase::Ready)];
        let plan = plan(&d, &owned, now()).unwrap();
        assert_eq!(plan.release.metadata.name.as_deref(), Some(old.as_str()));
        assert_eq!(plan.status.release_history, [old.clone(), newer]);
        assert_eq!(plan.status.conditions[0].status, "True", "the old release is Ready already");
    }

    #[test]
    fn history_past_the_limit_is_deleted_but_never_the_current_release() {
        let current = release_name("api", &template_hash(&template("index.js")).unwrap());
        let d = deployment(template("index.js"), 1, &[&current, "api-b", "api-c"]);
        let owned = [
            release(&current, 1, ReleasePhase::Ready),
            release("api-b", 3, ReleasePhase::Ready),
            release("api-c", 2, ReleasePhase::Ready),
            release("api-stray", 4, ReleasePhase::Ready),
        ];
        let plan = plan(&d, &owned, now()).unwrap();
        assert_eq!(plan.status.release_history, [current.clone(), "api-b".to_owned()]);
        assert_eq!(plan.delete, ["api-c", "api-stray"]);
        let zero = deployment(template("index.js"), 0, &[&current, "api-b"]);
        let plan = super::plan(&zero, &owned, now()).unwrap();
        assert_eq!(plan.status.release_history, [current]);
        assert!(!plan.delete.is_empty());
    }

    #[test]
    fn the_newest_ready_release_is_kept_while_the_current_one_is_not_ready() {
        let current = release_name("api", &template_hash(&template("index.js")).unwrap());
        let d = deployment(template("index.js"), 0, &[&current, "api-good", "api-older"]);
        let owned = [
            release(&current, 3, ReleasePhase::Failed),
            release("api-good", 2, ReleasePhase::Ready),
            release("api-older", 1, ReleasePhase::Ready),
        ];
        let plan = plan(&d, &owned, now()).unwrap();
        assert_eq!(plan.status.release_history, [current, "api-good".to_owned()]);
        assert_eq!(plan.delete, ["api-older"]);
    }

    #[test]
    fn owned_releases_missing_from_the_history_count_newest_first() {
        let d = deployment(template("index.js"), 2, &[]);
        let owned = [
            release("api-old", 1, ReleasePhase::Ready),
            release("api-mid", 2, ReleasePhase::Ready),
            release("api-new", 3, ReleasePhase::Ready),
        ];
        let plan = plan(&d, &owned, now()).unwrap();
        assert_eq!(&plan.status.release_history[1..], ["api-new", "api-mid"]);
        assert_eq!(plan.delete, ["api-old"]);
    }

    #[test]
    fn ready_follows_the_current_release() {
        let name = release_name("api", &template_hash(&template("index.js")).unwrap());
        let d = deployment(template("index.js"), 10, &[]);
        let building = plan(&d, &[] as &[WorkerRelease], now()).unwrap();
        assert_eq!(building.status.conditions[0].status, "Unknown");
        let mut failed = release(&name, 1, ReleasePhase::Failed);
        failed.status.as_mut().unwrap().conditions = vec![condition(
            READY,
            ConditionStatus::False,
            "SourceUnavailable",
            "s3://b/k: no such key",
            None,
        )];
        let plan = plan(&d, &[failed], now()).unwrap();
        let c = &plan.status.conditions[0];
        assert_eq!((c.status.as_str(), c.reason.as_str()), ("False", "ReleaseFailed"));
        assert!(c.message.contains("s3://b/k"), "{}", c.message);
    }

    #[test]
    fn long_deployment_names_still_give_valid_release_names() {
        let name = release_name(&"a".repeat(253), "0123456789");
        assert_eq!(name.len(), MAX_NAME);
        assert!(release_name(&format!("{}-x", "a".repeat(241)), "0123456789").len() <= MAX_NAME);
        assert!(!release_name(&format!("{}-", "a".repeat(241)), "h").contains("--"));
    }
}
