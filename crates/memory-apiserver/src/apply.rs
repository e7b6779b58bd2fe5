//! Field ownership (metadata.managedFields) and server-side apply.
//!
//! Approximations, documented in the crate docs: fields are tracked by object keys only, so a list
//! is one atomic field (no `k:`/`v:` item keys), and `.` entries are not written. With that, the
//! behaviour clients rely on is real: apply creates or merges, fields one manager applied before and
//! omits now are removed unless another manager also owns them, fields set by Update managers stay,
//! a differing value owned by another manager is a 409 conflict unless `force=true`, which takes
//! ownership.

use std::collections::BTreeSet;

use serde_json::{json, Map, Value};

use crate::error::{ApiError, ApiResult, Cause};
use crate::store::now;

pub type FieldPath = Vec<String>;

/// Which part of an object a request may write: the main resource (all but status when there is
/// a status subresource) or the status subresource.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Whole,
    MainOnly,
    StatusOnly,
}

impl Scope {
    pub fn subresource(self) -> Option<&'static str> {
        match self {
            Scope::StatusOnly => Some("status"),
            _ => None,
        }
    }
}

const TRACKED_METADATA: &[&str] = &["labels", "annotations", "finalizers", "ownerReferences"];

/// The part of an object that field ownership covers for `scope`.
pub fn tracked_part(object: &Value, scope: Scope) -> Value {
    let mut out = Map::new();
    let Some(map) = object.as_object() else { return Value::Object(out) };
    for (key, value) in map {
        match key.as_str() {
            "apiVersion" | "kind" => {}
            "metadata" => {
                if scope == Scope::StatusOnly {
                    continue;
                }
                let meta: Map<String, Value> = value
                    .as_object()
                    .map(|m| {
                        m.iter()
                            .filter(|(k, _)| TRACKED_METADATA.contains(&k.as_str()))
                            .map(|(k, v)| (k.clone(), v.clone()))
                            .collect()
                    })
                    .unwrap_or_default();
                if !meta.is_empty() {
                    out.insert(key.clone(), Value::Object(meta));
                }
            }
            "status" if scope == Scope::MainOnly => {}
            _ if scope == Scope::StatusOnly && key != "status" => {}
            _ => {
                out.insert(key.clone(), value.clone());
            }
        }
    }
    Value::Object(out)
}

/// Leaf paths: maps are descended into; scalars, lists and empty maps are leaves.
pub fn leaves(value: &Value) -> BTreeSet<FieldPath> {
    fn walk(value: &Value, prefix: &mut FieldPath, out: &mut BTreeSet<FieldPath>) {
        match value.as_object() {
            Some(map) if !map.is_empty() => {
                for (k, v) in map {
                    prefix.push(k.clone());
                    walk(v, prefix, out);
                    prefix.pop();
                }
            }
            _ => {
                if !prefix.is_empty() {
                    out.insert(prefix.clone());
                }
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(value, &mut Vec::new(), &mut out);
    out
}

pub fn value_at<'a>(value: &'a Value, path: &[String]) -> Option<&'a Value> {
    path.iter().try_fold(value, |v, k| v.as_object()?.get(k))
}

fn overlaps(a: &[String], b: &[String]) -> bool {
    a.starts_with(b) || b.starts_with(a)
}

pub fn path_string(path: &[String]) -> String {
    path.iter().map(|p| format!(".{p}")).collect()
}

pub fn to_fields_v1(paths: &BTreeSet<FieldPath>) -> Value {
    let mut root = Map::new();
    for path in paths {
        let mut node = &mut root;
        for key in path {
            let entry = node.entry(format!("f:{key}")).or_insert_with(|| Value::Object(Map::new()));
            let Value::Object(next) = entry else { break };
            node = next;
        }
    }
    Value::Object(root)
}

/// Reads `f:` entries; list item entries (`k:`, `v:`, `i:`) make their list one owned field.
pub fn from_fields_v1(fields: &Value) -> BTreeSet<FieldPath> {
    fn walk(node: &Value, prefix: &mut FieldPath, out: &mut BTreeSet<FieldPath>) {
        let Some(map) = node.as_object() else { return };
        if map.is_empty()
            || map.keys().any(|k| k.starts_with("k:") || k.starts_with("v:") || k.starts_with("i:"))
        {
            if !prefix.is_empty() {
                out.insert(prefix.clone());
            }
            return;
        }
        for (k, v) in map {
            if let Some(name) = k.strip_prefix("f:") {
                prefix.push(name.to_string());
                walk(v, prefix, out);
                prefix.pop();
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(fields, &mut Vec::new(), &mut out);
    out
}

#[derive(Debug, Clone)]
pub struct Entry {
    pub manager: String,
    pub operation: String,
    pub api_version: String,
    pub time: String,
    pub subresource: Option<String>,
    pub fields: BTreeSet<FieldPath>,
}

impl Entry {
    fn is(&self, manager: &str, operation: &str, subresource: Option<&str>) -> bool {
        self.manager == manager && self.operation == operation && self.subresource.as_deref() == subresource
    }

    fn describe(&self) -> String {
        let mut s = format!("{:?}", self.manager);
        if let Some(sub) = &self.subresource {
            s.push_str(&format!(" with subresource {sub:?}"));
        }
        if self.operation == "Update" {
            s.push_str(&format!(" using {} at {}", self.api_version, self.time));
        }
        s
    }
}

pub fn read_entries(object: &Value) -> Vec<Entry> {
    object["metadata"]["managedFields"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| Entry {
            manager: e["manager"].as_str().unwrap_or_default().to_string(),
            operation: e["operation"].as_str().unwrap_or("Update").to_string(),
            api_version: e["apiVersion"].as_str().unwrap_or_default().to_string(),
            time: e["time"].as_str().unwrap_or_default().to_string(),
            subresource: e["subresource"].as_str().map(String::from),
            fields: from_fields_v1(&e["fieldsV1"]),
        })
        .collect()
}

pub fn write_entries(entries: &[Entry]) -> Value {
    Value::Array(
        entries
            .iter()
            .filter(|e| !e.fields.is_empty())
            .map(|e| {
                let mut v = json!({
                    "manager": e.manager,
                    "operation": e.operation,
                    "apiVersion": e.api_version,
                    "time": e.time,
                    "fieldsType": "FieldsV1",
                    "fieldsV1": to_fields_v1(&e.fields),
                });
                if let Some(sub) = &e.subresource {
                    v["subresource"] = Value::String(sub.clone());
                }
                v
            })
            .collect(),
    )
}

/// Ownership after a create, update or patch by `manager`: changed fields move to it, removed
/// fields leave everybody.
pub fn record_update(
    old: Option<&Value>,
    new: &Value,
    manager: &str,
    api_version: &str,
    scope: Scope,
) -> Value {
    let mut entries = old.map(read_entries).unwrap_or_default();
    let old_part = old.map(|o| tracked_part(o, scope)).unwrap_or_else(|| json!({}));
    let new_part = tracked_part(new, scope);
    let old_leaves = leaves(&old_part);
    let new_leaves = leaves(&new_part);
    let removed: Vec<&FieldPath> = old_leaves.iter().filter(|p| value_at(&new_part, p).is_none()).collect();
    let changed: Vec<&FieldPath> =
        new_leaves.iter().filter(|p| value_at(&old_part, p) != value_at(&new_part, p)).collect();
    for entry in &mut entries {
        entry
            .fields
            .retain(|f| !removed.iter().any(|r| overlaps(f, r)) && !changed.iter().any(|c| overlaps(f, c)));
    }
    if !changed.is_empty() {
        let sub = scope.subresource();
        let position = entries.iter().position(|e| e.is(manager, "Update", sub));
        let entry = match position {
            Some(i) => &mut entries[i],
            None => {
                entries.push(Entry {
                    manager: manager.to_string(),
                    operation: "Update".to_string(),
                    api_version: api_version.to_string(),
                    time: String::new(),
                    subresource: sub.map(String::from),
                    fields: BTreeSet::new(),
                });
                let last = entries.len() - 1;
                &mut entries[last]
            }
        };
        entry.time = now();
        entry.api_version = api_version.to_string();
        entry.fields.extend(changed.into_iter().cloned());
    }
    write_entries(&entries)
}

fn remove_path(value: &mut Value, path: &[String]) {
    let Some((last, parents)) = path.split_last() else { return };
    let mut node = value;
    for key in parents {
        match node.get_mut(key) {
            Some(next) => node = next,
            None => return,
        }
    }
    if let Some(map) = node.as_object_mut() {
        map.remove(last);
    }
}

/// Drops maps left empty by removals, from the deepest up, unless somebody owns them.
fn prune_empty_parents(value: &mut Value, path: &[String], owned: &BTreeSet<FieldPath>) {
    for depth in (2..path.len()).rev() {
        let parent = &path[..depth];
        let empty = value_at(value, parent).and_then(Value::as_object).is_some_and(Map::is_empty);
        if empty && !owned.contains(parent) {
            remove_path(value, parent);
        }
    }
}

fn deep_merge(target: &mut Value, applied: &Value) {
    match (target.as_object_mut(), applied.as_object()) {
        (Some(t), Some(a)) if !a.is_empty() => {
            for (k, v) in a {
                deep_merge(t.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
        _ => *target = applied.clone(),
    }
}

/// Server-side apply of `applied` by `manager` onto `current` (`None`: the object is created).
pub fn apply(
    current: Option<&Value>,
    applied: &Value,
    manager: &str,
    force: bool,
    scope: Scope,
) -> ApiResult<Value> {
    let api_version = applied["apiVersion"].as_str().unwrap_or_default().to_string();
    let applied_part = tracked_part(applied, scope);
    let applied_leaves = leaves(&applied_part);
    let mut entries = current.map(read_entries).unwrap_or_default();
    let sub = scope.subresource();
    let base = current.cloned().unwrap_or_else(|| applied.clone());
    let current_part = tracked_part(&base, scope);

    let mut conflicts: Vec<(usize, FieldPath)> = Vec::new();
    if current.is_some() {
        for (i, entry) in entries.iter().enumerate() {
            if entry.is(manager, "Apply", sub) {
                continue;
            }
            for path in &applied_leaves {
                for owned in entry.fields.iter().filter(|o| overlaps(o, path)) {
                    let longer = if owned.len() > path.len() { owned } else { path };
                    if value_at(&current_part, longer) != value_at(&applied_part, longer) {
                        conflicts.push((i, path.clone()));
                        break;
                    }
                }
            }
        }
    }
    if !conflicts.is_empty() && !force {
        return Err(conflict_error(&entries, &conflicts));
    }
    for (i, path) in &conflicts {
        entries[*i].fields.retain(|f| !overlaps(f, path));
    }

    let mut object = base;
    let previous: BTreeSet<FieldPath> =
        entries.iter().find(|e| e.is(manager, "Apply", sub)).map(|e| e.fields.clone()).unwrap_or_default();
    let others: BTreeSet<FieldPath> = entries
        .iter()
        .filter(|e| !e.is(manager, "Apply", sub))
        .flat_map(|e| e.fields.iter().cloned())
        .collect();
    for path in previous.difference(&applied_leaves) {
        let kept_by_others = others.iter().any(|o| overlaps(o, path));
        let reapplied = applied_leaves.iter().any(|a| overlaps(a, path));
        if !kept_by_others && !reapplied {
            remove_path(&mut object, path);
            prune_empty_parents(&mut object, path, &others);
        }
    }
    if current.is_some() {
        deep_merge(&mut object, &applied_part);
    }

    entries.retain(|e| !e.is(manager, "Apply", sub));
    entries.push(Entry {
        manager: manager.to_string(),
        operation: "Apply".to_string(),
        api_version,
        time: now(),
        subresource: sub.map(String::from),
        fields: applied_leaves,
    });
    object["metadata"]["managedFields"] = write_entries(&entries);
    Ok(object)
}

fn conflict_error(entries: &[Entry], conflicts: &[(usize, FieldPath)]) -> ApiError {
    let causes: Vec<Cause> = conflicts
        .iter()
        .map(|(i, path)| {
            Cause::with_reason(
                "FieldManagerConflict",
                &path_string(path),
                format!("conflict with {}", entries[*i].describe()),
            )
        })
        .collect();
    let message = if let [(i, path)] = conflicts {
        format!(
            "Apply failed with 1 conflict: conflict with {}: {}",
            entries[*i].describe(),
            path_string(path)
        )
    } else {
        let mut managers: Vec<usize> = conflicts.iter().map(|(i, _)| *i).collect();
        managers.sort_by_key(|i| entries[*i].manager.clone());
        managers.dedup();
        let mut lines = Vec::new();
        for m in managers {
            lines.push(format!("conflicts with {}:", entries[m].describe()));
            for (_, path) in conflicts.iter().filter(|(i, _)| *i == m) {
                lines.push(format!("- {}", path_string(path)));
            }
        }
        format!("Apply failed with {} conflicts: {}", conflicts.len(), lines.join("\n"))
    };
    ApiError::apply_conflict(message, causes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_v1_round_trip() {
        let obj =
            json!({"metadata": {"labels": {"a": "1"}, "name": "x"}, "spec": {"list": [1], "m": {"k": "v"}}});
        let set = leaves(&tracked_part(&obj, Scope::Whole));
        let v1 = to_fields_v1(&set);
        assert_eq!(
            v1,
            json!({"f:metadata": {"f:labels": {"f:a": {}}}, "f:spec": {"f:list": {}, "f:m": {"f:k": {}}}})
        );
        assert_eq!(from_fields_v1(&v1), set);
    }

    #[test]
    fn omitted_fields_are_removed_but_others_stay() {
        let first = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": {"a": "1", "b": "2"}});
        let created = apply(None, &first, "mgr", false, Scope::Whole).unwrap();
        let mut updated = created.clone();
        updated["data"]["c"] = json!("3");
        updated["metadata"]["managedFields"] =
            record_update(Some(&created), &updated, "other", "v1", Scope::Whole);
        let second =
            json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": {"a": "1"}});
        let out = apply(Some(&updated), &second, "mgr", false, Scope::Whole).unwrap();
        assert_eq!(out["data"], json!({"a": "1", "c": "3"}));
    }

    #[test]
    fn conflicting_value_needs_force() {
        let first =
            json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": {"a": "1"}});
        let mut obj = first.clone();
        obj["metadata"]["managedFields"] = record_update(None, &obj, "editor", "v1", Scope::Whole);
        let mine =
            json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": {"a": "2"}});
        let err = apply(Some(&obj), &mine, "mgr", false, Scope::Whole).err().unwrap();
        assert_eq!(err.code, 409);
        assert!(
            err.message.starts_with("Apply failed with 1 conflict: conflict with \"editor\" using v1 at "),
            "{}",
            err.message
        );
        assert!(err.message.ends_with(": .data.a"));
        let forced = apply(Some(&obj), &mine, "mgr", true, Scope::Whole).unwrap();
        assert_eq!(forced["data"]["a"], "2");
        assert_eq!(read_entries(&forced).len(), 1);
    }
}
