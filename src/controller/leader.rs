//! Leader election on a `coordination.k8s.io/v1` Lease: of several controller processes, only the
//! one holding the lease reconciles.
//!
//! Written here on `Api<Lease>` rather than taken from a crate: kube-lease-manager (the one
//! maintained crate for kube 5) decides through server-side-apply field-owner conflicts and
//! compares renewTime with this machine's wall clock; we want the client-go rules instead, which
//! hold however far apart the machines' clocks are:
//! - every write is a PUT guarded by the resourceVersion read, so of two replicas writing at once
//!   one gets 409 and loses;
//! - a follower counts a lease as expired `leaseDurationSeconds` after it *saw* the record last
//!   change on its own monotonic clock, never by comparing renewTime with its clock; it looks
//!   every eighth of the duration, so it takes over a crashed leader's lease within the duration
//!   plus that;
//! - the leader renews every third of the duration and stops acting (the process exits non-zero)
//!   when it could not renew within two thirds of it, so it is gone before any follower may take
//!   over, with a third of the duration to spare;
//! - on SIGTERM the leader, once its reconciles have finished, clears holderIdentity so that a
//!   follower takes over at its next look instead of waiting for expiry.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use kube::Client;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::error_chain;

/// How to elect: which Lease, who we are, how long a lease lasts.
#[derive(Clone, Debug)]
pub struct LeaseOptions {
    pub name: String,
    /// `None`: POD_NAMESPACE (the controller's own namespace, where its RBAC for the Lease is),
    /// else the watched namespace, else the client's default namespace.
    pub namespace: Option<String>,
    /// This replica's name in `holderIdentity`; unique among the replicas.
    pub identity: String,
    pub duration: Duration,
}

impl LeaseOptions {
    /// How often the leader renews.
    pub fn renew_every(&self) -> Duration {
        self.duration / 3
    }

    /// How often a follower looks at the lease, and the leader retries a failed renewal: a
    /// follower takes over within the lease duration plus this after the leader stopped renewing,
    /// and within this after it released the lease. (client-go: 2 s for 15 s.)
    pub fn retry_every(&self) -> Duration {
        (self.duration / 8).max(Duration::from_millis(250))
    }

    /// How long the leader may go without a successful renewal before it stops acting.
    pub fn renew_deadline(&self) -> Duration {
        self.duration * 2 / 3
    }
}

/// POD_NAME (from the downward API), else `<hostname>-<pid>`: unique among live replicas.
pub fn default_identity() -> String {
    if let Some(pod) = std::env::var("POD_NAME").ok().filter(|p| !p.is_empty()) {
        return pod;
    }
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "workerbundle".into());
    format!("{host}-{}", std::process::id())
}

#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    #[error(
        "cannot use Lease {namespace}/{name}: {message}; check the controller's RBAC for \
         coordination.k8s.io leases (deploy/rbac.yaml) and that the namespace exists"
    )]
    Refused { namespace: String, name: String, message: String },
    #[error(
        "lost the leadership of Lease {namespace}/{name}: {why}; stopping so that another replica \
         can take over"
    )]
    Lost { namespace: String, name: String, why: String },
}

/// The part of a lease the election looks at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub holder: Option<String>,
    pub renew_time: Option<Timestamp>,
    pub duration: Option<Duration>,
}

impl Record {
    pub fn of(lease: &Lease) -> Record {
        let spec = lease.spec.as_ref();
        Record {
            holder: spec.and_then(|s| s.holder_identity.clone()).filter(|h| !h.is_empty()),
            renew_time: spec.and_then(|s| s.renew_time.as_ref()).map(|t| t.0),
            duration: spec
                .and_then(|s| s.lease_duration_seconds)
                .and_then(|s| u64::try_from(s).ok())
                .map(Duration::from_secs),
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    /// Nobody holds it, or its holder let it expire: take it.
    Acquire,
    /// It names us: renew it.
    Renew,
    /// Another replica holds it; it expires after this long unless renewed.
    Wait(Duration),
}

/// What to do with a lease whose `record` this replica has seen unchanged since `seen_since`.
pub fn decide(
    record: &Record,
    seen_since: Instant,
    me: &str,
    our_duration: Duration,
    now: Instant,
) -> Decision {
    match record.holder.as_deref() {
        None => Decision::Acquire,
        Some(holder) if holder == me => Decision::Renew,
        Some(_) => {
            let expires = seen_since + record.duration.unwrap_or(our_duration);
            match expires.checked_duration_since(now) {
                Some(left) if !left.is_zero() => Decision::Wait(left),
                _ => Decision::Acquire,
            }
        }
    }
}

/// The lease as we last wrote it, and when that write was sent.
#[derive(Debug)]
pub struct Held {
    lease: Lease,
    sent: Instant,
}

pub struct Elector {
    api: Api<Lease>,
    options: LeaseOptions,
    namespace: String,
    /// The record last read and since when it has looked like that.
    observed: Option<(Record, Instant)>,
}

enum Step {
    /// Boxed: a Lease is large next to the other variant.
    Acquired(Box<Held>),
    Wait {
        holder: String,
        left: Duration,
    },
}

impl Elector {
    pub fn new(client: Client, options: LeaseOptions, watched_namespace: Option<&str>) -> Elector {
        let namespace = options
            .namespace
            .clone()
            .or_else(|| std::env::var("POD_NAMESPACE").ok().filter(|n| !n.is_empty()))
            .or_else(|| watched_namespace.map(str::to_owned))
            .unwrap_or_else(|| client.default_namespace().to_owned());
        Elector { api: Api::namespaced(client, &namespace), options, namespace, observed: None }
    }

    /// Waits until this replica holds the lease, calling `standing_by` when it finds another
    /// replica leading. Transient API errors are retried; a refusal (401, 403, 404 of the
    /// namespace) is returned.
    pub async fn acquire(&mut self, mut standing_by: impl FnMut()) -> Result<Held, LeaderError> {
        let mut announced: Option<String> = None;
        loop {
            match self.try_acquire().await {
                Ok(Step::Acquired(held)) => {
                    info!(
                        lease = %self.lease_name(),
                        identity = %self.options.identity,
                        duration = ?self.options.duration,
                        "leader: holding the lease"
                    );
                    return Ok(*held);
                }
                Ok(Step::Wait { holder, left }) => {
                    if announced.as_ref() != Some(&holder) && !left.is_zero() {
                        info!(lease = %self.lease_name(), %holder, "another replica leads; standing by");
                        standing_by();
                        announced = Some(holder);
                    }
                    tokio::time::sleep(left.min(self.options.retry_every())).await;
                }
                Err(e) if is_refusal(&e) => return Err(self.refused(&e)),
                Err(e) => {
                    warn!(lease = %self.lease_name(), error = %error_chain(&e), "cannot read the lease; retrying");
                    tokio::time::sleep(self.options.retry_every()).await;
                }
            }
        }
    }

    async fn try_acquire(&mut self) -> Result<Step, kube::Error> {
        let now = Instant::now();
        let Some(current) = self.api.get_opt(&self.options.name).await? else {
            let lease = self.lease_for_us(None);
            let sent = Instant::now();
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(lease) => Ok(Step::Acquired(Box::new(Held { lease, sent }))),
                // Another replica created it first: look again.
                Err(kube::Error::Api(e)) if e.code == 409 => {
                    Ok(Step::Wait { holder: "(just created)".into(), left: Duration::ZERO })
                }
                Err(e) => Err(e),
            };
        };
        let record = Record::of(&current);
        let since = match &self.observed {
            Some((seen, since)) if *seen == record => *since,
            _ => now,
        };
        self.observed = Some((record.clone(), since));
        match decide(&record, since, &self.options.identity, self.options.duration, now) {
            Decision::Wait(left) => Ok(Step::Wait { holder: record.holder.unwrap_or_default(), left }),
            Decision::Acquire | Decision::Renew => {
                let lease = self.lease_for_us(Some(&current));
                let sent = Instant::now();
                match self.api.replace(&self.options.name, &PostParams::default(), &lease).await {
                    Ok(lease) => Ok(Step::Acquired(Box::new(Held { lease, sent }))),
                    // Someone wrote it since we read it (another replica took it): look again.
                    Err(kube::Error::Api(e)) if e.code == 409 => {
                        Ok(Step::Wait { holder: "(changed)".into(), left: Duration::ZERO })
                    }
                    Err(e) => Err(e),
                }
            }
        }
    }

    /// `current` (or a new lease) naming us as holder, renewed now.
    fn lease_for_us(&self, current: Option<&Lease>) -> Lease {
        let now = MicroTime(Timestamp::now());
        let mut lease = current.cloned().unwrap_or_else(|| Lease {
            metadata: ObjectMeta {
                name: Some(self.options.name.clone()),
                namespace: Some(self.namespace.clone()),
                ..ObjectMeta::default()
            },
            spec: None,
        });
        let mut spec = lease.spec.take().unwrap_or_default();
        if spec.holder_identity.as_deref() != Some(self.options.identity.as_str()) {
            if current.is_some() {
                spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0).saturating_add(1));
            }
            spec.holder_identity = Some(self.options.identity.clone());
            spec.acquire_time = Some(now.clone());
        }
        spec.renew_time = Some(now);
        spec.lease_duration_seconds =
            Some(i32::try_from(self.options.duration.as_secs()).unwrap_or(i32::MAX));
        spec.lease_transitions.get_or_insert(0);
        lease.spec = Some(spec);
        lease
    }

    /// Runs `work` while renewing the lease; releases the lease once `work` is done. Returns at
    /// once, dropping `work` mid-way, when the lease could not be renewed: acting on past that
    /// point could overlap with the next leader.
    pub async fn lead(
        self,
        mut held: Held,
        work: impl std::future::Future<Output = ()>,
    ) -> Result<(), LeaderError> {
        let lost = tokio::select! {
            () = work => None,
            lost = self.keep(&mut held) => Some(lost),
        };
        match lost {
            Some(lost) => Err(lost),
            None => {
                self.release(held).await;
                Ok(())
            }
        }
    }

    /// Renews the lease every third of its duration for as long as it can; returns why it could
    /// not (the caller must stop acting at once).
    pub async fn keep(&self, held: &mut Held) -> LeaderError {
        let mut last_error = String::from("no renewal succeeded");
        loop {
            tokio::time::sleep_until(held.sent + self.options.renew_every()).await;
            loop {
                let deadline = held.sent + self.options.renew_deadline();
                let now = Instant::now();
                if now >= deadline {
                    return self.lost(format!(
                        "could not renew it within {:?} ({last_error})",
                        self.options.renew_deadline()
                    ));
                }
                let sent = Instant::now();
                let lease = self.lease_for_us(Some(&held.lease));
                let params = PostParams::default();
                let attempt = self.api.replace(&self.options.name, &params, &lease);
                match tokio::time::timeout(deadline - now, attempt).await {
                    Ok(Ok(lease)) => {
                        *held = Held { lease, sent };
                        break;
                    }
                    Ok(Err(kube::Error::Api(e))) if e.code == 409 => {
                        // Written by someone else since our last renewal: still ours only if it
                        // still names us (then renew the fresh copy).
                        match self.api.get_opt(&self.options.name).await {
                            Ok(Some(fresh)) if self.names_us(&fresh) => {
                                held.lease = fresh;
                                continue;
                            }
                            Ok(fresh) => {
                                let holder = fresh.and_then(|l| Record::of(&l).holder);
                                let holder = holder.unwrap_or_else(|| "nobody".into());
                                return self.lost(format!("{holder} holds it now"));
                            }
                            Err(e) => last_error = error_chain(&e),
                        }
                    }
                    Ok(Err(e)) => last_error = error_chain(&e),
                    Err(_) => last_error = "the renewal timed out".into(),
                }
                warn!(lease = %self.lease_name(), error = %last_error, "cannot renew the lease; retrying");
                let left = deadline.saturating_duration_since(Instant::now());
                tokio::time::sleep(left.min(self.options.retry_every())).await;
            }
        }
    }

    /// Clears holderIdentity so that a follower takes over at once. Only after this replica has
    /// stopped acting.
    pub async fn release(&self, held: Held) {
        let mut lease = held.lease;
        for _ in 0..3 {
            if let Some(spec) = lease.spec.as_mut() {
                spec.holder_identity = None;
            }
            match self.api.replace(&self.options.name, &PostParams::default(), &lease).await {
                Ok(_) => {
                    info!(lease = %self.lease_name(), "lease released");
                    return;
                }
                Err(kube::Error::Api(e)) if e.code == 409 => match self.api.get_opt(&self.options.name).await
                {
                    Ok(Some(fresh)) if self.names_us(&fresh) => {
                        lease = fresh;
                    }
                    // Not ours any more: nothing to release.
                    Ok(_) => return,
                    Err(e) => {
                        warn!(error = %error_chain(&e), "cannot release the lease; it expires by itself");
                        return;
                    }
                },
                Err(e) => {
                    warn!(error = %error_chain(&e), "cannot release the lease; it expires by itself");
                    return;
                }
            }
        }
    }

    fn names_us(&self, lease: &Lease) -> bool {
        Record::of(lease).holder.as_deref() == Some(self.options.identity.as_str())
    }

    fn lease_name(&self) -> String {
        format!("{}/{}", self.namespace, self.options.name)
    }

    fn lost(&self, why: String) -> LeaderError {
        LeaderError::Lost { namespace: self.namespace.clone(), name: self.options.name.clone(), why }
    }

    fn refused(&self, e: &kube::Error) -> LeaderError {
        LeaderError::Refused {
            namespace: self.namespace.clone(),
            name: self.options.name.clone(),
            message: error_chain(e),
        }
    }
}

fn is_refusal(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if matches!(s.code, 401 | 403 | 404))
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::coordination::v1::LeaseSpec;

    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    fn held_by(holder: Option<&str>) -> Record {
        Record { holder: holder.map(str::to_owned), renew_time: None, duration: Some(15 * SECOND) }
    }

    #[test]
    fn a_free_lease_is_taken() {
        let now = Instant::now();
        assert_eq!(decide(&held_by(None), now, "me", 15 * SECOND, now), Decision::Acquire);
    }

    #[test]
    fn our_own_lease_is_renewed() {
        let now = Instant::now();
        assert_eq!(decide(&held_by(Some("me")), now, "me", 15 * SECOND, now), Decision::Renew);
    }

    #[test]
    fn another_holders_fresh_lease_is_waited_for_until_it_expires() {
        let seen = Instant::now();
        let record = held_by(Some("other"));
        assert_eq!(decide(&record, seen, "me", 4 * SECOND, seen + 5 * SECOND), Decision::Wait(10 * SECOND));
        // Its own duration counts, not ours; expiry runs from when we saw it, not its renewTime.
        assert_eq!(decide(&record, seen, "me", 4 * SECOND, seen + 15 * SECOND), Decision::Acquire);
        let no_duration = Record { duration: None, ..record };
        assert_eq!(decide(&no_duration, seen, "me", 4 * SECOND, seen + 3 * SECOND), Decision::Wait(SECOND));
        assert_eq!(decide(&no_duration, seen, "me", 4 * SECOND, seen + 4 * SECOND), Decision::Acquire);
    }

    #[test]
    fn an_empty_holder_is_no_holder() {
        let lease = Lease {
            metadata: ObjectMeta::default(),
            spec: Some(LeaseSpec { holder_identity: Some(String::new()), ..LeaseSpec::default() }),
        };
        assert_eq!(Record::of(&lease).holder, None);
    }

    #[test]
    fn the_leader_stops_well_before_a_follower_may_take_over() {
        let options =
            LeaseOptions { name: "l".into(), namespace: None, identity: "me".into(), duration: 15 * SECOND };
        assert_eq!(options.renew_every(), 5 * SECOND);
        assert!(options.renew_deadline() + options.renew_every() / 2 < options.duration);
        assert!(options.retry_every() < options.renew_every());
    }
}
