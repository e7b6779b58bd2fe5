//! Undoing a deploy whose later calls ask for something this server does not serve.
//!
//! wrangler makes a worker's new code live first (`PUT .../scripts/{name}`, or `POST .../versions`
//! and `POST .../deployments`) and only then, in separate calls, sends the settings the upload
//! metadata does not carry: cron schedules (`PUT .../schedules`), routes (`PUT .../routes`),
//! custom domains (`PUT .../domains/records`) and, for `versions deploy`, the non-versioned
//! settings (`PATCH .../script-settings`). The upload cannot refuse what it never sees. So when one
//! of those calls is refused, the deploy it belongs to is undone as well: the previous version
//! runs again (a first deploy's worker is deleted with its versions), and nothing goes live unless
//! the whole deploy succeeds.
//!
//! No request says which deploy it belongs to. Every deployment the API makes records on the
//! WorkerDeployment what it replaced and when (annotation [`UNDO`]); a refused call undoes the
//! script's deployment only while that record still describes what runs and is younger than
//! [`WINDOW_SECS`] (wrangler sends these calls within seconds of the upload).

use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use serde::{Deserialize, Serialize};
use tracing::{error, info};

use super::envelope::ApiError;
use super::path::{AccountId, ScriptName, VersionId};
use super::versions::version_info;
use super::Shared;
use crate::crd::{WorkerDeployment, WorkerTemplate};

/// What the API's last deployment of a script replaced: JSON of [`UndoRecord`].
pub const UNDO: &str = "workerbundle.dev/undo";
/// How long after a deployment a refused call still undoes it.
pub const WINDOW_SECS: i64 = 60;
/// A template without a version id is kept whole only up to this size (annotations are small).
const MAX_TEMPLATE_BYTES: usize = 32 << 10;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UndoRecord {
    /// When the deployment was made (RFC 3339).
    pub at: String,
    /// The version it made live.
    pub version: String,
    pub previous: Previous,
}

/// What ran before a deployment.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub enum Previous {
    /// Nothing: a first deploy, undone by deleting the worker and its versions.
    Nothing,
    /// A version: its release (else its stored upload) gives back exactly its template.
    Version { id: String },
    /// A template without a version id (a WorkerDeployment applied by hand), kept whole.
    Template { template: Box<WorkerTemplate> },
    /// A template too large to keep: the deployment cannot be undone.
    Unknown,
}

impl UndoRecord {
    /// The record of a deployment that makes `version` live in place of `before`.
    pub fn new(before: Option<&WorkerDeployment>, version: &VersionId, now: Timestamp) -> UndoRecord {
        let previous = match before.map(|d| &d.spec.template) {
            None => Previous::Nothing,
            Some(WorkerTemplate { version_id: Some(id), .. }) => Previous::Version { id: id.clone() },
            Some(template) => {
                let size = serde_json::to_string(template).map(|s| s.len()).unwrap_or(usize::MAX);
                if size <= MAX_TEMPLATE_BYTES {
                    Previous::Template { template: Box::new(template.clone()) }
                } else {
                    Previous::Unknown
                }
            }
        };
        UndoRecord { at: now.to_string(), version: version.as_str().to_owned(), previous }
    }

    pub fn to_annotation(&self) -> String {
        // A struct of strings and a template: serializing it cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// The record on `deployment`, when it still describes what runs and is recent at `now`.
    pub fn current(deployment: &WorkerDeployment, now: Timestamp) -> Option<UndoRecord> {
        let record: UndoRecord = serde_json::from_str(deployment.annotations().get(UNDO)?).ok()?;
        let at: Timestamp = record.at.parse().ok()?;
        let age = now.as_second() - at.as_second();
        let runs = deployment.spec.template.version_id.as_deref() == Some(record.version.as_str());
        // A little of the future is allowed: several API replicas' clocks differ a bit.
        (runs && (-5..=WINDOW_SECS).contains(&age)).then_some(record)
    }
}

/// What a refused call did about the deploy it belongs to.
#[derive(Debug, PartialEq)]
pub enum Outcome {
    /// The previous version runs again.
    Reverted,
    /// The deploy was the worker's first: the worker and its versions are gone.
    Deleted,
    /// No deployment of the last [`WINDOW_SECS`] to undo (e.g. `wrangler triggers deploy`).
    NothingRecent,
    /// There is no such worker (a concurrent refusal of the same deploy may have deleted it).
    NoWorker,
    /// The deployment was recent but what it replaced is not known: the new version keeps running.
    CannotUndo,
}

impl Outcome {
    fn describe(&self, script: &ScriptName) -> String {
        match self {
            Outcome::Reverted => "the previous version keeps running".into(),
            Outcome::Deleted => {
                format!("the deploy was undone: worker {:?} was new and has been deleted", script.as_str())
            }
            Outcome::NothingRecent => {
                "the running version was left as it is (no deployment of the last minute to undo)".into()
            }
            Outcome::NoWorker => format!(
                "worker {:?} does not exist (a deploy that made it was undone, or it was never deployed)",
                script.as_str()
            ),
            Outcome::CannotUndo => "the new version could not be undone and keeps running \
                 (what it replaced was not recorded); deploy the previous one again"
                .into(),
        }
    }
}

/// Refuses a call of a deploy's trigger phase: undoes the script's recent deployment, and returns
/// the error to answer, `refused` (which names the setting) followed by what became of the deploy.
pub async fn refuse_after_deploy(
    api: &Shared,
    account: &AccountId,
    script: &ScriptName,
    refused: &str,
) -> ApiError {
    match undo_recent(api, account, script, refused).await {
        Ok(outcome) => {
            info!(%account, %script, ?outcome, "refused after the deploy: {refused}");
            ApiError::Invalid(format!("{refused}; {}", outcome.describe(script)))
        }
        Err(e) => {
            error!(%account, %script, error = %e, "undoing a deploy failed");
            ApiError::Backend(format!(
                "{refused}; undoing the deploy that made the new version live failed ({e}): it may \
                 still run, deploy the previous version again"
            ))
        }
    }
}

async fn undo_recent(
    api: &Shared,
    account: &AccountId,
    script: &ScriptName,
    refused: &str,
) -> Result<Outcome, ApiError> {
    let Some(deployment) = api.store.deployment(account, script).await? else { return Ok(Outcome::NoWorker) };
    let Some(record) = UndoRecord::current(&deployment, Timestamp::now()) else {
        return Ok(Outcome::NothingRecent);
    };
    let message = format!("undone: {refused}");
    let template = match record.previous {
        Previous::Nothing => {
            api.store.delete_script(account, script).await?;
            api.store.delete_versions(account, script).await?;
            return Ok(Outcome::Deleted);
        }
        Previous::Unknown => return Ok(Outcome::CannotUndo),
        Previous::Template { template } => *template,
        Previous::Version { id } => {
            let Ok(version) = VersionId::parse(&id) else { return Ok(Outcome::CannotUndo) };
            let releases = api.store.releases(account, script).await?;
            match version_info(api, account, script, Some(&deployment), &releases, &version).await? {
                Some(info) => info.template,
                None => return Ok(Outcome::CannotUndo),
            }
        }
    };
    api.store.apply_template(account, script, &template, Some(&message), None).await?;
    Ok(Outcome::Reverted)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::WorkerDeploymentSpec;

    const V1: &str = "11111111-1111-4111-8111-111111111111";
    const V2: &str = "22222222-2222-4222-8222-222222222222";

    fn deployment(version: Option<&str>, record: Option<&UndoRecord>) -> WorkerDeployment {
        let template = WorkerTemplate { version_id: version.map(str::to_owned), ..WorkerTemplate::default() };
        let mut d =
            WorkerDeployment::new("hello", WorkerDeploymentSpec { template, release_history_limit: 10 });
        if let Some(record) = record {
            d.metadata.annotations = Some([(UNDO.to_owned(), record.to_annotation())].into_iter().collect());
        }
        d
    }

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_second(seconds).unwrap()
    }

    #[test]
    fn a_record_says_what_ran_before() {
        let v2 = VersionId::parse(V2).unwrap();
        assert_eq!(UndoRecord::new(None, &v2, at(0)).previous, Previous::Nothing);
        let before = deployment(Some(V1), None);
        assert_eq!(UndoRecord::new(Some(&before), &v2, at(0)).previous, Previous::Version { id: V1.into() });
        let by_hand = deployment(None, None);
        assert!(matches!(UndoRecord::new(Some(&by_hand), &v2, at(0)).previous, Previous::Template { .. }));
        let mut huge = deployment(None, None);
        huge.spec.template.main_module = Some("x".repeat(MAX_TEMPLATE_BYTES));
        assert_eq!(UndoRecord::new(Some(&huge), &v2, at(0)).previous, Previous::Unknown);
    }

    #[test]
    fn a_record_applies_while_it_is_recent_and_describes_what_runs() {
        let v2 = VersionId::parse(V2).unwrap();
        let record = UndoRecord::new(Some(&deployment(Some(V1), None)), &v2, at(1_000));
        let now = deployment(Some(V2), Some(&record));
        assert_eq!(UndoRecord::current(&now, at(1_010)), Some(record.clone()));
        assert_eq!(UndoRecord::current(&now, at(1_000 + WINDOW_SECS + 1)), None, "too old");
        let reverted = deployment(Some(V1), Some(&record));
        assert_eq!(UndoRecord::current(&reverted, at(1_010)), None, "already undone");
        assert_eq!(UndoRecord::current(&deployment(Some(V2), None), at(1_010)), None, "no record");
        let mut garbled = now.clone();
        garbled.metadata.annotations = Some([(UNDO.to_owned(), "{".to_owned())].into_iter().collect());
        assert_eq!(UndoRecord::current(&garbled, at(1_010)), None);
    }
}
