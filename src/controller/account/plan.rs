//! WorkerAccount, pure: from the account, the WorkerDeployments it selects, their releases and
//! the bundle as it is, to the bundle as it should be and the account's status.
//!
//! Each selected deployment contributes its current release when that is Ready; while it is not
//! (building, failed), the release the bundle already runs for that worker stays. Ports are
//! stable: a worker keeps its port across releases; a new worker takes the lowest free port from
//! 8080.
//!
//! Workers deployed together land in one image: while a selected deployment's release is still
//! being built, and for at most [`SETTLE`] after that release (or the deployment, before it has
//! one) was made, a change to the bundle waits ([`AccountPlan::hold`]). Without it, 100 accounts
//! created at once pushed 2.6 images each, every intermediate one a config blob, a manifest and a
//! Deployment rollout nobody asked for.

use std::borrow::Borrow;
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;

use crate::crd::{
    condition, owned_by, set_condition, BundlePodTemplate, BundleWorker, ConditionStatus, ReleasePhase,
    WorkerAccount, WorkerAccountStatus, WorkerBundle, WorkerBundleSpec, WorkerDeployment, WorkerRelease,
    ACCOUNT_LABEL, MANAGED_BY, READY,
};
use crate::worker::ports::assign_ports;

#[derive(Debug)]
pub enum BundlePlan {
    Apply(Box<WorkerBundle>),
    /// The bundle's name is taken by an object this account does not own: nothing is written.
    Conflict(String),
}

/// How long a bundle change waits, at most, for a release being built alongside it.
/// Long enough to cover a release's wait in a busy build queue (1000 accounts created at once
/// keep releases Pending for well over 10 s), short enough that one stuck release does not hold
/// its account's other workers for long.
pub const SETTLE: Duration = Duration::from_secs(30);

#[derive(Debug)]
pub struct AccountPlan {
    pub bundle: BundlePlan,
    pub status: WorkerAccountStatus,
    /// Some: releases of selected deployments are still being built; a changed bundle waits this
    /// long at most (a release turning Ready wakes the account sooner).
    pub hold: Option<Duration>,
}

pub fn bundle_name(account: &WorkerAccount) -> String {
    account.spec.worker_bundle_name.clone().unwrap_or_else(|| format!("workers-{}", account.name_any()))
}

/// The selector an account uses: its own, else its account label.
pub fn selector(account: &WorkerAccount) -> LabelSelector {
    account.spec.worker_release_selector.clone().unwrap_or_else(|| LabelSelector {
        match_labels: Some([(ACCOUNT_LABEL.to_owned(), account.name_any())].into()),
        match_expressions: None,
    })
}

/// Whether `labels` match `selector` (matchLabels and matchExpressions, as Kubernetes defines them).
pub fn selects(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    let labels_match = selector.match_labels.iter().flatten().all(|(k, v)| labels.get(k) == Some(v));
    let expressions_match = selector.match_expressions.iter().flatten().all(|e| {
        let values = e.values.as_deref().unwrap_or_default();
        match e.operator.as_str() {
            "In" => labels.get(&e.key).is_some_and(|v| values.contains(v)),
            "NotIn" => labels.get(&e.key).is_none_or(|v| !values.contains(v)),
            "Exists" => labels.contains_key(&e.key),
            "DoesNotExist" => !labels.contains_key(&e.key),
            _ => false,
        }
    });
    labels_match && expressions_match
}

pub fn plan(
    account: &WorkerAccount,
    deployments: &[impl Borrow<WorkerDeployment>],
    releases: &[impl Borrow<WorkerRelease>],
    existing: Option<&WorkerBundle>,
    now: Timestamp,
) -> AccountPlan {
    let deployments: Vec<&WorkerDeployment> = deployments.iter().map(Borrow::borrow).collect();
    let releases: Vec<&WorkerRelease> = releases.iter().map(Borrow::borrow).collect();
    let name = bundle_name(account);
    let generation = account.metadata.generation;
    let previous_conditions = account.status.as_ref().map(|s| s.conditions.as_slice()).unwrap_or_default();
    let status = |workers: usize, wanted| WorkerAccountStatus {
        observed_generation: generation,
        worker_bundle_name: Some(name.clone()),
        workers: workers as i64,
        conditions: set_condition(previous_conditions, wanted, now),
    };

    if let Some(bundle) = existing {
        let uid = account.uid().unwrap_or_default();
        if !bundle.owner_references().iter().any(|o| o.uid == uid) {
            let message = format!("WorkerBundle {name} exists and belongs to another owner; choose another spec.workerBundleName");
            let wanted =
                condition(READY, ConditionStatus::False, "BundleNameTaken", message.clone(), generation);
            return AccountPlan {
                bundle: BundlePlan::Conflict(message),
                status: status(0, wanted),
                hold: None,
            };
        }
    }

    let selector = selector(account);
    let mut selected: Vec<&WorkerDeployment> = deployments
        .iter()
        .filter(|d| selects(&selector, d.labels()) && d.metadata.deletion_timestamp.is_none())
        .copied()
        .collect();
    // Two deployments of one script: the older one wins, the other is reported.
    selected.sort_by(|a, b| {
        a.creation_timestamp()
            .map(|t| t.0)
            .cmp(&b.creation_timestamp().map(|t| t.0))
            .then(a.name_any().cmp(&b.name_any()))
    });
    let running: BTreeMap<&str, &BundleWorker> = existing
        .map(|b| b.spec.workers.iter().map(|w| (w.worker_name.as_str(), w)).collect())
        .unwrap_or_default();
    let ready = |release_name: &str| {
        releases.iter().find(|r| r.name_any() == release_name).filter(|r| {
            r.status.as_ref().is_some_and(|s| s.phase == ReleasePhase::Ready && s.layer.is_some())
        })
    };

    // Since when each release still being built (not Ready, not Failed) has been wanted.
    let building_since = |deployment: &WorkerDeployment, current: Option<&str>| -> Option<Timestamp> {
        let created = |meta: &ObjectMeta| meta.creation_timestamp.as_ref().map(|t| t.0);
        match current {
            None => created(&deployment.metadata),
            Some(name) => match releases.iter().find(|r| r.name_any() == name) {
                Some(release) => {
                    let phase = release.status.as_ref().map(|s| s.phase).unwrap_or_default();
                    (phase == ReleasePhase::Pending).then(|| created(&release.metadata)).flatten()
                }
                None => created(&deployment.metadata),
            },
        }
    };
    let mut hold: Option<Duration> = None;

    let mut chosen: BTreeMap<String, &WorkerRelease> = BTreeMap::new();
    let mut seen = BTreeSet::new();
    let mut problems = Vec::new();
    for deployment in &selected {
        let script = deployment.spec.template.script_name.clone();
        let deployment_name = deployment.name_any();
        if !seen.insert(script.clone()) {
            problems.push(format!(
                "WorkerDeployment {deployment_name} runs a script another deployment runs already"
            ));
            continue;
        }
        let current = deployment.status.as_ref().and_then(|s| s.current_release.as_deref());
        if let Some(since) = building_since(deployment, current) {
            let waited = Duration::try_from(now.duration_since(since)).unwrap_or_default();
            if let Some(left) = SETTLE.checked_sub(waited).filter(|left| !left.is_zero()) {
                hold = Some(hold.map_or(left, |h| h.max(left)));
            }
        }
        let fallback = running.get(script.as_str()).map(|w| w.release.as_str());
        match current.and_then(ready).or_else(|| fallback.and_then(ready)) {
            Some(release) => {
                if let Some(current) = current.filter(|c| *c != release.name_any()) {
                    problems.push(format!(
                        "{deployment_name}: release {current} is not ready; {} keeps running",
                        release.name_any()
                    ));
                }
                chosen.insert(script, release);
            }
            None => problems.push(format!("{deployment_name}: no release is ready yet")),
        }
    }

    // Workers keep the port they run on; new ones take the lowest free port from 8080.
    let requests: Vec<(&str, Option<u16>)> = chosen
        .keys()
        .map(|script| (script.as_str(), running.get(script.as_str()).map(|w| w.worker_number)))
        .collect();
    let ports = assign_ports(&requests).unwrap_or_default();
    let workers: Vec<BundleWorker> = chosen
        .iter()
        .zip(ports)
        .map(|((script, release), port)| BundleWorker {
            worker_name: script.clone(),
            worker_number: port,
            env_prefix: release
                .status
                .as_ref()
                .and_then(|s| s.settings.as_ref())
                .map(|s| s.env_prefix.clone())
                .or_else(|| release.spec.template.env_prefix.clone()),
            secret_ref: release.spec.template.secret_ref.clone(),
            release: release.name_any(),
        })
        .collect();
    let count = workers.len();
    let bundle = desired_bundle(account, &name, workers);
    let wanted = if problems.is_empty() {
        condition(
            READY,
            ConditionStatus::True,
            "BundleUpToDate",
            format!("{count} workers in WorkerBundle {name}"),
            generation,
        )
    } else {
        let message = problems.join("; ");
        condition(READY, ConditionStatus::False, "WorkersNotReady", message, generation)
    };
    AccountPlan { bundle: BundlePlan::Apply(Box::new(bundle)), status: status(count, wanted), hold }
}

fn desired_bundle(account: &WorkerAccount, name: &str, workers: Vec<BundleWorker>) -> WorkerBundle {
    let labels = [
        (ACCOUNT_LABEL.to_owned(), account.name_any()),
        ("app.kubernetes.io/managed-by".to_owned(), MANAGED_BY.to_owned()),
    ];
    let pod_template = account.spec.pod_template.as_ref().map(|p| BundlePodTemplate {
        image_pull_secret: p.image_pull_secret.clone(),
        ..BundlePodTemplate::default()
    });
    WorkerBundle {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: account.namespace(),
            labels: Some(labels.into()),
            owner_references: owned_by(account),
            ..ObjectMeta::default()
        },
        spec: WorkerBundleSpec {
            deployment_name: name.to_owned(),
            repository: account.spec.repository.clone(),
            base_image: account.spec.base_image.clone(),
            workers,
            pod_template,
        },
        status: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{
        LayerDescriptor, WorkerAccountSpec, WorkerDeploymentSpec, WorkerDeploymentStatus, WorkerReleaseSpec,
        WorkerReleaseStatus, WorkerTemplate,
    };
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelectorRequirement, Time};

    fn account() -> WorkerAccount {
        let mut a = WorkerAccount::new("1234", WorkerAccountSpec::default());
        a.metadata.namespace = Some("tenants".into());
        a.metadata.uid = Some("acct-uid".into());
        a.metadata.generation = Some(1);
        a
    }

    fn template(script: &str) -> WorkerTemplate {
        WorkerTemplate {
            script_name: script.into(),
            script_urls: vec![format!("s3://workers/1234/{script}/")],
            env_prefix: Some(format!("{}_", script.to_uppercase())),
            ..WorkerTemplate::default()
        }
    }

    fn deployment(
        name: &str,
        script: &str,
        account: &str,
        current: Option<&str>,
        created: i64,
    ) -> WorkerDeployment {
        let mut d = WorkerDeployment::new(
            name,
            WorkerDeploymentSpec { template: template(script), release_history_limit: 10 },
        );
        d.metadata.labels = Some([(ACCOUNT_LABEL.to_owned(), account.to_owned())].into());
        d.metadata.creation_timestamp = Some(Time(Timestamp::from_second(created).unwrap()));
        d.status =
            Some(WorkerDeploymentStatus { current_release: current.map(Into::into), ..Default::default() });
        d
    }

    fn release(name: &str, script: &str, phase: ReleasePhase) -> WorkerRelease {
        let mut r = WorkerRelease::new(name, WorkerReleaseSpec { template: template(script) });
        r.status = Some(WorkerReleaseStatus {
            phase,
            layer: (phase == ReleasePhase::Ready).then(LayerDescriptor::default),
            ..Default::default()
        });
        r
    }

    fn bundle_with(workers: &[(&str, u16, &str)]) -> WorkerBundle {
        let BundlePlan::Apply(mut bundle) =
            plan(&account(), &[] as &[WorkerDeployment], &[] as &[WorkerRelease], None, now()).bundle
        else {
            panic!()
        };
        bundle.spec.workers = workers
            .iter()
            .map(|(name, port, release)| BundleWorker {
                worker_name: name.to_string(),
                worker_number: *port,
                release: release.to_string(),
                ..Default::default()
            })
            .collect();
        *bundle
    }

    fn now() -> Timestamp {
        Timestamp::from_second(100).unwrap()
    }

    fn applied(plan: &AccountPlan) -> &WorkerBundle {
        match &plan.bundle {
            BundlePlan::Apply(b) => b,
            BundlePlan::Conflict(m) => panic!("conflict: {m}"),
        }
    }

    fn ports(bundle: &WorkerBundle) -> Vec<(&str, u16, &str)> {
        bundle
            .spec
            .workers
            .iter()
            .map(|w| (w.worker_name.as_str(), w.worker_number, w.release.as_str()))
            .collect()
    }

    #[test]
    fn a_new_account_gets_its_bundle_with_the_ready_worker_on_8080() {
        let plan = plan(
            &account(),
            &[deployment("api", "api", "1234", Some("api-1"), 1)],
            &[release("api-1", "api", ReleasePhase::Ready)],
            None,
            now(),
        );
        let bundle = applied(&plan);
        assert_eq!(bundle.metadata.name.as_deref(), Some("workers-1234"));
        assert_eq!(bundle.spec.deployment_name, "workers-1234");
        assert_eq!(ports(bundle), [("api", 8080, "api-1")]);
        assert_eq!(bundle.spec.workers[0].env_prefix.as_deref(), Some("API_"));
        let owner = &bundle.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!((owner.kind.as_str(), owner.uid.as_str()), ("WorkerAccount", "acct-uid"));
        assert_eq!(plan.status.workers, 1);
        assert_eq!(plan.status.conditions[0].status, "True");
    }

    #[test]
    fn a_change_waits_for_releases_being_built_alongside_but_not_past_the_settle_time() {
        let created_at = |mut r: WorkerRelease, second: i64| {
            r.metadata.creation_timestamp = Some(Time(Timestamp::from_second(second).unwrap()));
            r
        };
        let ready = release("api-1", "api", ReleasePhase::Ready);
        let hold = |deployments: &[WorkerDeployment], releases: &[WorkerRelease]| {
            plan(&account(), deployments, releases, None, now()).hold
        };
        let api = deployment("api", "api", "1234", Some("api-1"), 1);

        // auth's release was made 2 s ago and is still being built: wait for it, 28 s at most.
        let auth = deployment("auth", "auth", "1234", Some("auth-1"), 1);
        let building = created_at(release("auth-1", "auth", ReleasePhase::Pending), 98);
        assert_eq!(
            hold(&[api.clone(), auth.clone()], &[ready.clone(), building]),
            Some(Duration::from_secs(28))
        );
        // Made 31 s ago: no more waiting; the ready worker goes out alone.
        let slow = created_at(release("auth-1", "auth", ReleasePhase::Pending), 69);
        let plan_now =
            plan(&account(), &[api.clone(), auth.clone()], &[ready.clone(), slow.clone()], None, now());
        assert_eq!(plan_now.hold, None);
        assert_eq!(ports(applied(&plan_now)), [("api", 8080, "api-1")]);
        // Failed is not being built: nothing to wait for.
        let failed = created_at(release("auth-1", "auth", ReleasePhase::Failed), 98);
        assert_eq!(hold(&[api.clone(), auth], &[ready.clone(), failed]), None);
        // A deployment made 1 s ago without a release yet: wait 29 s at most.
        let fresh = deployment("new", "new", "1234", None, 99);
        assert_eq!(hold(&[api.clone(), fresh], std::slice::from_ref(&ready)), Some(Duration::from_secs(29)));
        // Only Ready releases: nothing held.
        assert_eq!(hold(&[api], &[ready]), None);
    }

    #[test]
    fn deployments_of_other_accounts_are_not_selected() {
        let plan = plan(
            &account(),
            &[deployment("other", "other", "999", Some("other-1"), 1)],
            &[release("other-1", "other", ReleasePhase::Ready)],
            None,
            now(),
        );
        assert!(applied(&plan).spec.workers.is_empty());
    }

    #[test]
    fn ports_are_stable_across_releases_and_new_workers_take_the_lowest_free_port() {
        let existing = bundle_with(&[("api", 8081, "api-1"), ("auth", 8083, "auth-1")]);
        let plan = plan(
            &account(),
            &[
                deployment("api", "api", "1234", Some("api-2"), 1),
                deployment("auth", "auth", "1234", Some("auth-1"), 2),
                deployment("blog", "blog", "1234", Some("blog-1"), 3),
                deployment("cart", "cart", "1234", Some("cart-1"), 4),
            ],
            &[
                release("api-1", "api", ReleasePhase::Ready),
                release("api-2", "api", ReleasePhase::Ready),
                release("auth-1", "auth", ReleasePhase::Ready),
                release("blog-1", "blog", ReleasePhase::Ready),
                release("cart-1", "cart", ReleasePhase::Ready),
            ],
            Some(&existing),
            now(),
        );
        assert_eq!(
            ports(applied(&plan)),
            [
                ("api", 8081, "api-2"),
                ("auth", 8083, "auth-1"),
                ("blog", 8080, "blog-1"),
                ("cart", 8082, "cart-1")
            ]
        );
    }

    #[test]
    fn a_worker_keeps_its_running_release_while_the_current_one_is_not_ready() {
        let existing = bundle_with(&[("api", 8080, "api-1")]);
        let plan = plan(
            &account(),
            &[deployment("api", "api", "1234", Some("api-2"), 1)],
            &[release("api-1", "api", ReleasePhase::Ready), release("api-2", "api", ReleasePhase::Failed)],
            Some(&existing),
            now(),
        );
        assert_eq!(ports(applied(&plan)), [("api", 8080, "api-1")]);
        let ready = &plan.status.conditions[0];
        assert_eq!((ready.status.as_str(), ready.reason.as_str()), ("False", "WorkersNotReady"));
        assert!(ready.message.contains("api-2"), "{}", ready.message);
    }

    #[test]
    fn a_worker_with_no_ready_release_is_left_out_and_reported() {
        let plan = plan(
            &account(),
            &[deployment("api", "api", "1234", Some("api-1"), 1)],
            &[release("api-1", "api", ReleasePhase::Pending)],
            None,
            now(),
        );
        assert!(applied(&plan).spec.workers.is_empty());
        assert_eq!(plan.status.conditions[0].status, "False");
    }

    #[test]
    fn a_removed_deployment_frees_its_port() {
        let existing = bundle_with(&[("api", 8080, "api-1"), ("auth", 8081, "auth-1")]);
        let plan = plan(
            &account(),
            &[
                deployment("auth", "auth", "1234", Some("auth-1"), 1),
                deployment("blog", "blog", "1234", Some("blog-1"), 2),
            ],
            &[release("auth-1", "auth", ReleasePhase::Ready), release("blog-1", "blog", ReleasePhase::Ready)],
            Some(&existing),
            now(),
        );
        assert_eq!(ports(applied(&plan)), [("auth", 8081, "auth-1"), ("blog", 8080, "blog-1")]);
    }

    #[test]
    fn two_deployments_of_one_script_the_older_wins() {
        let plan = plan(
            &account(),
            &[
                deployment("api-b", "api", "1234", Some("b-1"), 2),
                deployment("api-a", "api", "1234", Some("a-1"), 1),
            ],
            &[release("a-1", "api", ReleasePhase::Ready), release("b-1", "api", ReleasePhase::Ready)],
            None,
            now(),
        );
        assert_eq!(ports(applied(&plan)), [("api", 8080, "a-1")]);
        assert!(plan.status.conditions[0].message.contains("api-b"));
    }

    #[test]
    fn a_bundle_owned_by_someone_else_is_not_touched() {
        let mut foreign = bundle_with(&[]);
        foreign.metadata.owner_references.as_mut().unwrap()[0].uid = "someone-else".into();
        let plan =
            plan(&account(), &[] as &[WorkerDeployment], &[] as &[WorkerRelease], Some(&foreign), now());
        assert!(matches!(plan.bundle, BundlePlan::Conflict(_)));
        assert_eq!(plan.status.conditions[0].reason, "BundleNameTaken");
    }

    #[test]
    fn selectors_follow_kubernetes_rules() {
        let labels: BTreeMap<String, String> = [("tier".to_owned(), "web".to_owned())].into();
        let expr = |op: &str, values: &[&str]| LabelSelector {
            match_labels: None,
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: "tier".into(),
                operator: op.into(),
                values: Some(values.iter().map(|v| v.to_string()).collect()),
            }]),
        };
        assert!(selects(&expr("In", &["web", "api"]), &labels));
        assert!(!selects(&expr("NotIn", &["web"]), &labels));
        assert!(selects(&expr("Exists", &[]), &labels));
        assert!(!selects(&expr("DoesNotExist", &[]), &labels));
        assert!(!selects(&expr("Bogus", &[]), &labels));
        assert!(selects(&LabelSelector::default(), &labels), "an empty selector selects everything");
    }
}
