//! Conditions as Kubernetes API conventions want them: one per type, `lastTransitionTime` moving
//! only when the status flips, `observedGeneration` saying which spec they describe.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

/// The condition every kind reports.
pub const READY: &str = "Ready";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConditionStatus {
    True,
    False,
    Unknown,
}

impl ConditionStatus {
    fn as_str(self) -> &'static str {
        match self {
            ConditionStatus::True => "True",
            ConditionStatus::False => "False",
            ConditionStatus::Unknown => "Unknown",
        }
    }
}

/// A condition as a plan wants it; the transition time is filled in by [`set_condition`].
pub fn condition(
    type_: &str,
    status: ConditionStatus,
    reason: &str,
    message: impl Into<String>,
    generation: Option<i64>,
) -> Condition {
    Condition {
        type_: type_.into(),
        status: status.as_str().into(),
        reason: reason.into(),
        message: message.into(),
        observed_generation: generation,
        last_transition_time: Time(Timestamp::UNIX_EPOCH),
    }
}

/// `existing` with `wanted` in place of the condition of its type. The transition time is kept
/// when the status did not change, so rewriting the same status changes nothing.
pub fn set_condition(existing: &[Condition], wanted: Condition, now: Timestamp) -> Vec<Condition> {
    let mut out: Vec<Condition> = existing.iter().filter(|c| c.type_ != wanted.type_).cloned().collect();
    let previous = existing.iter().find(|c| c.type_ == wanted.type_);
    let last_transition_time = match previous {
        Some(p) if p.status == wanted.status => p.last_transition_time.clone(),
        _ => Time(now),
    };
    out.push(Condition { last_transition_time, ..wanted });
    out.sort_by(|a, b| a.type_.cmp(&b.type_));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_second(seconds).unwrap()
    }

    #[test]
    fn transition_time_moves_only_when_the_status_flips() {
        let first =
            set_condition(&[], condition(READY, ConditionStatus::False, "Building", "", Some(1)), at(10));
        assert_eq!(first[0].last_transition_time, Time(at(10)));
        let same = set_condition(
            &first,
            condition(READY, ConditionStatus::False, "Failed", "boom", Some(2)),
            at(20),
        );
        assert_eq!(same[0].last_transition_time, Time(at(10)), "same status keeps the time");
        assert_eq!((same[0].reason.as_str(), same[0].observed_generation), ("Failed", Some(2)));
        let flipped =
            set_condition(&same, condition(READY, ConditionStatus::True, "Built", "", Some(2)), at(30));
        assert_eq!(flipped[0].last_transition_time, Time(at(30)));
        assert_eq!(flipped.len(), 1);
    }

    #[test]
    fn other_condition_types_are_kept() {
        let a = set_condition(&[], condition("A", ConditionStatus::True, "R", "", None), at(1));
        let ab = set_condition(&a, condition(READY, ConditionStatus::True, "R", "", None), at(2));
        assert_eq!(ab.iter().map(|c| c.type_.as_str()).collect::<Vec<_>>(), ["A", READY]);
    }
}
