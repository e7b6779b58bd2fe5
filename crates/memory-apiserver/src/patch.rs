//! PATCH bodies: JSON merge patch (RFC 7386), JSON patch (RFC 6902), and an approximation of
//! strategic merge patch good enough for what kubectl's client-side apply sends.
//!
//! Strategic merge patch is approximated: it is merge patch, except that lists of objects whose items
//! all carry a `name` are merged item by item on that key (the merge key of containers, env, ports,
//! volumes, CRD versions ...), `$patch: delete|replace` on such items and maps is honoured, and the
//! other directives (`$setElementOrder/...`, `$retainKeys`, `$deleteFromPrimitiveList/...`) are
//! dropped. Lists of scalars are replaced, as for a list without a patch strategy.

use serde_json::{Map, Value};

use crate::error::{ApiError, ApiResult};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatchKind {
    Json,
    Merge,
    Strategic,
    Apply,
}

impl PatchKind {
    pub fn from_content_type(content_type: &str) -> Option<PatchKind> {
        let media = content_type.split(';').next().unwrap_or_default().trim();
        match media {
            "application/json-patch+json" => Some(PatchKind::Json),
            "application/merge-patch+json" => Some(PatchKind::Merge),
            "application/strategic-merge-patch+json" => Some(PatchKind::Strategic),
            "application/apply-patch+yaml" | "application/apply-patch+json" => Some(PatchKind::Apply),
            _ => None,
        }
    }
}

pub fn parse_json(body: &[u8]) -> ApiResult<Value> {
    serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("error decoding patch: {e}")))
}

pub fn apply_json_patch(target: &Value, body: &[u8]) -> ApiResult<Value> {
    let patch: json_patch::Patch = serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request(format!("the server rejected our request due to an error in our request: {e}"))
    })?;
    let mut doc = target.clone();
    for operation in patch.0 {
        // As the real server's JSON patch library does, a `test` for null passes on a missing
        // path (kube-rs's finalizer helper relies on it to add the first finalizer).
        if let json_patch::PatchOperation::Test(test) = &operation {
            if test.value.is_null() && doc.pointer(test.path.as_str()).is_none() {
                continue;
            }
        }
        json_patch::patch(&mut doc, &[operation]).map_err(|e| ApiError::unprocessable(format!("{e}")))?;
    }
    Ok(doc)
}

pub fn apply_merge_patch(target: &Value, body: &[u8]) -> ApiResult<Value> {
    let patch = parse_json(body)?;
    if !patch.is_object() {
        return Err(ApiError::bad_request("error decoding patch: a merge patch must be a JSON object"));
    }
    let mut doc = target.clone();
    json_patch::merge(&mut doc, &patch);
    Ok(doc)
}

pub fn apply_strategic_patch(target: &Value, body: &[u8]) -> ApiResult<Value> {
    let patch = parse_json(body)?;
    if !patch.is_object() {
        return Err(ApiError::bad_request(
            "error decoding patch: a strategic merge patch must be a JSON object",
        ));
    }
    let mut doc = target.clone();
    strategic_merge(&mut doc, &patch);
    Ok(doc)
}

fn is_directive(key: &str) -> bool {
    key.starts_with("$setElementOrder/")
        || key.starts_with("$deleteFromPrimitiveList/")
        || key == "$retainKeys"
        || key == "$patch"
}

fn named_items(list: &[Value]) -> bool {
    !list.is_empty() && list.iter().all(|item| item.get("name").and_then(Value::as_str).is_some())
}

fn strategic_merge(target: &mut Value, patch: &Value) {
    let Some(patch_map) = patch.as_object() else {
        *target = patch.clone();
        return;
    };
    if patch_map.get("$patch").and_then(Value::as_str) == Some("replace") {
        *target = Value::Object(strip_directives(patch_map));
        return;
    }
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let Some(target_map) = target.as_object_mut() else { return };
    for (key, value) in patch_map {
        if is_directive(key) {
            continue;
        }
        match value {
            Value::Null => {
                target_map.remove(key);
            }
            Value::Object(_) => {
                if value.get("$patch").and_then(Value::as_str) == Some("delete") {
                    target_map.remove(key);
                } else {
                    strategic_merge(target_map.entry(key.clone()).or_insert(Value::Null), value);
                }
            }
            Value::Array(items) => {
                let existing = target_map.get(key).and_then(Value::as_array);
                match existing {
                    Some(current) if named_items(items) && (current.is_empty() || named_items(current)) => {
                        let merged = merge_named_lists(current, items);
                        target_map.insert(key.clone(), Value::Array(merged));
                    }
                    _ => {
                        let cleaned: Vec<Value> = items
                            .iter()
                            .filter(|i| i.get("$patch").is_none())
                            .map(|i| match i.as_object() {
                                Some(m) => Value::Object(strip_directives(m)),
                                None => i.clone(),
                            })
                            .collect();
                        target_map.insert(key.clone(), Value::Array(cleaned));
                    }
                }
            }
            _ => {
                target_map.insert(key.clone(), value.clone());
            }
        }
    }
}

fn strip_directives(map: &Map<String, Value>) -> Map<String, Value> {
    map.iter()
        .filter(|(k, _)| !is_directive(k))
        .map(|(k, v)| {
            let v = match v {
                Value::Object(m) => Value::Object(strip_directives(m)),
                other => other.clone(),
            };
            (k.clone(), v)
        })
        .collect()
}

fn merge_named_lists(current: &[Value], patch: &[Value]) -> Vec<Value> {
    let mut result: Vec<Value> = current.to_vec();
    for item in patch {
        let name = item.get("name").cloned();
        let position = result.iter().position(|c| c.get("name") == name.as_ref());
        let delete = item.get("$patch").and_then(Value::as_str) == Some("delete");
        match (position, delete) {
            (Some(i), true) => {
                result.remove(i);
            }
            (None, true) => {}
            (Some(i), false) => strategic_merge(&mut result[i], item),
            (None, false) => {
                let mut fresh = Value::Object(Map::new());
                strategic_merge(&mut fresh, item);
                result.push(fresh);
            }
        }
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn strategic_merges_named_lists_and_drops_directives() {
        let target =
            json!({"spec": {"containers": [{"name": "a", "image": "x"}, {"name": "b", "image": "y"}]}});
        let patch = json!({"spec": {
            "$setElementOrder/containers": [{"name": "a"}, {"name": "b"}],
            "containers": [{"name": "b", "image": "z"}, {"name": "a", "$patch": "delete"}]
        }});
        let out = apply_strategic_patch(&target, patch.to_string().as_bytes()).unwrap();
        assert_eq!(out, json!({"spec": {"containers": [{"name": "b", "image": "z"}]}}));
    }

    #[test]
    fn a_json_patch_test_for_null_passes_on_a_missing_path() {
        let target = serde_json::json!({"metadata": {"name": "x"}});
        let add = br#"[{"op":"test","path":"/metadata/finalizers","value":null},
                       {"op":"add","path":"/metadata/finalizers","value":["f"]}]"#;
        let patched = apply_json_patch(&target, add).unwrap();
        assert_eq!(patched["metadata"]["finalizers"], serde_json::json!(["f"]));
        let again = apply_json_patch(&patched, add).unwrap_err();
        assert!(format!("{again:?}").contains("finalizers"), "a test against a present value still fails");
    }

    #[test]
    fn merge_patch_removes_nulls() {
        let out =
            apply_merge_patch(&json!({"a": 1, "b": {"c": 2}}), br#"{"b": {"c": null}, "d": 3}"#).unwrap();
        assert_eq!(out, json!({"a": 1, "b": {}, "d": 3}));
    }
}
