//! CustomResourceDefinitions: the checks the real server makes that clients trip over, and the
//! status (NamesAccepted, Established, acceptedNames, storedVersions) that clients wait for.
//! A CRD is established the moment it is written: there is no controller delay to wait out.

use serde_json::{json, Value};

use crate::error::Cause;
use crate::store::now;

pub fn validate(crd: &Value) -> Vec<Cause> {
    let mut causes = Vec::new();
    let spec = &crd["spec"];
    let group = spec["group"].as_str().unwrap_or_default();
    let plural = spec["names"]["plural"].as_str().unwrap_or_default();
    if group.is_empty() {
        causes.push(Cause::required("spec.group"));
    }
    if plural.is_empty() {
        causes.push(Cause::required("spec.names.plural"));
    }
    if spec["names"]["kind"].as_str().unwrap_or_default().is_empty() {
        causes.push(Cause::required("spec.names.kind"));
    }
    let name = crd["metadata"]["name"].as_str().unwrap_or_default();
    if !group.is_empty() && !plural.is_empty() && name != format!("{plural}.{group}") {
        causes.push(Cause::invalid(
            "metadata.name",
            &format!("{name:?}"),
            "must be spec.names.plural+\".\"+spec.group",
        ));
    }
    match spec["scope"].as_str() {
        Some("Namespaced") | Some("Cluster") => {}
        Some(other) => causes.push(Cause::with_reason(
            "FieldValueNotSupported",
            "spec.scope",
            format!("Unsupported value: {other:?}: supported values: \"Cluster\", \"Namespaced\""),
        )),
        None => causes.push(Cause::required("spec.scope")),
    }
    let versions = spec["versions"].as_array().cloned().unwrap_or_default();
    if versions.is_empty() {
        causes.push(Cause::invalid(
            "spec.versions",
            "null",
            "must have exactly one version marked as storage version",
        ));
    } else {
        let storage = versions.iter().filter(|v| v["storage"] == Value::Bool(true)).count();
        if storage != 1 {
            causes.push(Cause::invalid(
                "spec.versions",
                "\"array\"",
                "must have exactly one version marked as storage version",
            ));
        }
        for (i, v) in versions.iter().enumerate() {
            if !v["schema"]["openAPIV3Schema"].is_object() {
                causes.push(Cause::required(&format!("spec.versions[{i}].schema.openAPIV3Schema")));
            }
        }
    }
    causes
}

/// The status the real CRD controllers converge to, keeping condition times when nothing changed.
pub fn status(crd: &Value, old: Option<&Value>) -> Value {
    let names = &crd["spec"]["names"];
    let kind = names["kind"].as_str().unwrap_or_default();
    let mut accepted = names.clone();
    if accepted["singular"].as_str().unwrap_or_default().is_empty() {
        accepted["singular"] = Value::String(kind.to_lowercase());
    }
    if accepted["listKind"].as_str().unwrap_or_default().is_empty() {
        accepted["listKind"] = Value::String(format!("{kind}List"));
    }
    let stored: Vec<Value> = crd["spec"]["versions"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|v| v["storage"] == Value::Bool(true))
        .map(|v| v["name"].clone())
        .collect();
    let since = old
        .and_then(|o| o["status"]["conditions"].as_array())
        .and_then(|c| c.first())
        .and_then(|c| c["lastTransitionTime"].as_str())
        .map(String::from)
        .unwrap_or_else(now);
    json!({
        "acceptedNames": accepted,
        "conditions": [
            {"type": "NamesAccepted", "status": "True", "lastTransitionTime": since, "reason": "NoConflicts", "message": "no conflicts found"},
            {"type": "Established", "status": "True", "lastTransitionTime": since, "reason": "InitialNamesAccepted", "message": "the initial names have been accepted"},
        ],
        "storedVersions": stored,
    })
}
