//! Requests served, counted by verb and resource, as the real server's
//! `apiserver_request_total{verb,resource}` counts them: what tests and benchmarks read to see how
//! much a client asks of the API (`GET /debug/requests`, or [`crate::MemoryApiServer::requests`]).

use std::collections::BTreeMap;
use std::sync::Mutex;

use serde_json::{json, Value};

/// Request counts by (verb, resource); verbs are the real server's: get, list, watch, create,
/// update, patch, delete, deletecollection.
pub type Counts = BTreeMap<(String, String), u64>;

#[derive(Default)]
pub struct Requests {
    counts: Mutex<Counts>,
}

impl Requests {
    pub fn record(&self, verb: &str, resource: &str) {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        *counts.entry((verb.to_string(), resource.to_string())).or_default() += 1;
    }

    pub fn counts(&self) -> Counts {
        self.counts.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// `{"total": N, "byVerb": {"list": N, ...}, "byResource": {"list workerreleases": N, ...}}`
    pub fn to_json(&self) -> Value {
        let counts = self.counts();
        let mut by_verb: BTreeMap<&str, u64> = BTreeMap::new();
        let mut by_resource: BTreeMap<String, u64> = BTreeMap::new();
        for ((verb, resource), n) in &counts {
            *by_verb.entry(verb).or_default() += n;
            by_resource.insert(format!("{verb} {resource}"), *n);
        }
        json!({"total": counts.values().sum::<u64>(), "byVerb": by_verb, "byResource": by_resource})
    }
}

/// The verb of a request on a resource path, as the real server names it.
pub fn verb(method: &axum::http::Method, named: bool, watch: bool) -> &'static str {
    use axum::http::Method;
    match (method.clone(), named) {
        (Method::GET, true) => "get",
        (Method::GET, false) if watch => "watch",
        (Method::GET, false) => "list",
        (Method::POST, _) => "create",
        (Method::PUT, _) => "update",
        (Method::PATCH, _) => "patch",
        (Method::DELETE, true) => "delete",
        (Method::DELETE, false) => "deletecollection",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_add_up_by_verb_and_resource() {
        let requests = Requests::default();
        requests.record("list", "workerreleases");
        requests.record("list", "workerreleases");
        requests.record("patch", "workerbundles");
        let json = requests.to_json();
        assert_eq!(json["total"], 3);
        assert_eq!(json["byVerb"]["list"], 2);
        assert_eq!(json["byResource"]["patch workerbundles"], 1);
    }
}
