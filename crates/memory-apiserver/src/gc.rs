//! Deletion: finalizers, propagation policies and the garbage collector that removes dependents
//! (ownerReferences) whose owners are all gone, transitively, across every kind.
//!
//! The real garbage collector works asynchronously; here it runs inside the request that removed the
//! owner, which only makes it faster. Deleting a CRD removes its objects; deleting a namespace removes
//! every object in it at once (the real namespace controller honours their finalizers first).

use std::collections::{HashMap, HashSet};

use serde_json::Value;

use crate::resource::StorageKey;
use crate::store::{now, Store};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Propagation {
    Background,
    Foreground,
    Orphan,
}

impl Propagation {
    pub fn parse(s: &str) -> Option<Propagation> {
        match s {
            "Background" => Some(Propagation::Background),
            "Foreground" => Some(Propagation::Foreground),
            "Orphan" => Some(Propagation::Orphan),
            _ => None,
        }
    }
}

const FOREGROUND: &str = "foregroundDeletion";

fn names(object: &Value) -> (String, String) {
    let meta = &object["metadata"];
    (
        meta["namespace"].as_str().unwrap_or_default().to_string(),
        meta["name"].as_str().unwrap_or_default().to_string(),
    )
}

fn owner_uids(object: &Value) -> Vec<String> {
    object["metadata"]["ownerReferences"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["uid"].as_str().map(String::from))
        .collect()
}

fn finalizers(object: &Value) -> Vec<String> {
    object["metadata"]["finalizers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|f| f.as_str().map(String::from))
        .collect()
}

pub fn is_deleting(object: &Value) -> bool {
    object["metadata"]["deletionTimestamp"].is_string()
}

/// Deletes one object as a DELETE request does: marked for deletion while finalizers remain,
/// removed otherwise. Returns the object as it is afterwards (marked or last seen).
pub fn delete_object(
    store: &mut Store,
    key: &StorageKey,
    namespace: &str,
    name: &str,
    policy: Propagation,
) -> Option<Value> {
    let mut object = store.get(key, namespace, name)?.clone();
    let uid = object["metadata"]["uid"].as_str().unwrap_or_default().to_string();
    if policy == Propagation::Orphan {
        orphan_dependents(store, &uid);
    }
    let mut pending = finalizers(&object);
    if policy == Propagation::Foreground && !pending.iter().any(|f| f == FOREGROUND) {
        pending.push(FOREGROUND.to_string());
    }
    if pending.is_empty() {
        let removed = remove_now(store, key, namespace, name);
        collect(store);
        return removed;
    }
    if !is_deleting(&object) || finalizers(&object) != pending {
        if !is_deleting(&object) {
            object["metadata"]["deletionTimestamp"] = Value::String(now());
            object["metadata"]["deletionGracePeriodSeconds"] = Value::from(0);
        }
        object["metadata"]["finalizers"] = Value::from(pending);
        object = store.put(key, object);
    }
    collect(store);
    Some(object)
}

fn orphan_dependents(store: &mut Store, uid: &str) {
    for (key, mut object) in store.all() {
        let Some(refs) = object["metadata"]["ownerReferences"].as_array() else { continue };
        if !refs.iter().any(|r| r["uid"] == uid) {
            continue;
        }
        let kept: Vec<Value> = refs.iter().filter(|r| r["uid"] != uid).cloned().collect();
        if kept.is_empty() {
            if let Some(meta) = object["metadata"].as_object_mut() {
                meta.remove("ownerReferences");
            }
        } else {
            object["metadata"]["ownerReferences"] = Value::Array(kept);
        }
        store.put(&key, object);
    }
}

/// Removes an object for good, with what goes with it: a CRD's resource type and objects, a
/// namespace's contents.
pub fn remove_now(store: &mut Store, key: &StorageKey, namespace: &str, name: &str) -> Option<Value> {
    let removed = store.remove(key, namespace, name)?;
    if key.group == "apiextensions.k8s.io" && key.plural == "customresourcedefinitions" {
        for resource in store.unregister_crd(name) {
            for object in store.list(&resource, None) {
                let (ns, n) = names(&object);
                store.remove(&resource, &ns, &n);
            }
        }
    } else if key.group.is_empty() && key.plural == "namespaces" {
        for (k, object) in store.all() {
            let (ns, n) = names(&object);
            if ns == name {
                store.remove(&k, &ns, &n);
            }
        }
    }
    Some(removed)
}

/// Runs until nothing changes: deletes dependents whose owners are all gone or are being deleted in
/// the foreground, and releases foreground deletions whose dependents are gone. Each round reads
/// the objects in place and clones only the one it changes.
pub fn collect(store: &mut Store) {
    loop {
        let Some(action) = next_collection(store) else { return };
        match action {
            Collection::Dependent(key, ns, name) => {
                tracing::debug!(kind = %key.plural, %ns, %name, "garbage collecting dependent");
                delete_object_no_collect(store, &key, &ns, &name);
            }
            Collection::Release(key, ns, name, rest) => {
                if rest.is_empty() {
                    remove_now(store, &key, &ns, &name);
                } else if let Some(mut updated) = store.get(&key, &ns, &name).cloned() {
                    updated["metadata"]["finalizers"] = Value::from(rest);
                    store.put(&key, updated);
                }
            }
        }
    }
}

enum Collection {
    /// A dependent to delete.
    Dependent(StorageKey, String, String),
    /// A foreground deletion whose dependents are gone, with its other finalizers.
    Release(StorageKey, String, String, Vec<String>),
}

/// The first thing the garbage collector has to do, if any.
fn next_collection(store: &Store) -> Option<Collection> {
    let by_uid: HashMap<&str, &Value> =
        store.iter_all().filter_map(|(_, o)| o["metadata"]["uid"].as_str().map(|u| (u, o))).collect();
    let owned: HashSet<String> = store.iter_all().flat_map(|(_, o)| owner_uids(o)).collect();
    for (key, object) in store.iter_all() {
        let owners = owner_uids(object);
        if !owners.is_empty() && !is_deleting(object) {
            let live: Vec<&&Value> = owners.iter().filter_map(|u| by_uid.get(u.as_str())).collect();
            let owner_in_foreground =
                live.iter().any(|o| is_deleting(o) && finalizers(o).iter().any(|f| f == FOREGROUND));
            if live.is_empty() || owner_in_foreground {
                let (ns, name) = names(object);
                return Some(Collection::Dependent(key.clone(), ns, name));
            }
        }
        let uid = object["metadata"]["uid"].as_str().unwrap_or_default();
        let fins = finalizers(object);
        if is_deleting(object) && fins.iter().any(|f| f == FOREGROUND) && !owned.contains(uid) {
            let rest: Vec<String> = fins.into_iter().filter(|f| f != FOREGROUND).collect();
            let (ns, name) = names(object);
            return Some(Collection::Release(key.clone(), ns, name, rest));
        }
    }
    None
}

/// The live owner an owner reference of an object in `namespace` names (kind, name and uid).
fn owner<'a>(store: &'a Store, namespace: &str, reference: &Value) -> Option<&'a Value> {
    let def = store.defs().iter().find(|d| {
        reference["kind"].as_str() == Some(d.kind.as_str())
            && reference["apiVersion"].as_str() == Some(d.api_version().as_str())
    })?;
    let owner_namespace = if def.namespaced { namespace } else { "" };
    let found = store.get(&def.storage_key(), owner_namespace, reference["name"].as_str()?)?;
    (found["metadata"]["uid"] == reference["uid"]).then_some(found)
}

/// What an update from `old` to `new` asks of the garbage collector.
#[derive(Debug, PartialEq, Eq)]
pub enum Concern {
    /// Nothing: writes of spec or status, and finalizers of an object not being deleted.
    None,
    /// Only the object itself: its owners changed (are they still there?), and the owners it
    /// dropped (one being deleted in the foreground may have waited for it).
    Object { dropped: Vec<Value> },
    /// Every object: a deletion started, or a deleting object's finalizers changed.
    All,
}

pub fn concern(old: &Value, new: &Value) -> Concern {
    let deleting = is_deleting(old) || is_deleting(new);
    if is_deleting(old) != is_deleting(new) || (deleting && finalizers(old) != finalizers(new)) {
        Concern::All
    } else if owner_uids(old) != owner_uids(new) {
        let kept = owner_uids(new);
        let dropped = old["metadata"]["ownerReferences"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|r| r["uid"].as_str().is_none_or(|uid| !kept.iter().any(|k| k == uid)))
            .cloned()
            .collect();
        Concern::Object { dropped }
    } else {
        Concern::None
    }
}

/// Collects one object whose owners changed: deleted when none of its owners exists, or one is
/// being deleted in the foreground. Owners are found by reference (kind, name, uid), not by
/// scanning every object: at tens of thousands of objects, a full collection per write was most
/// of this server's time.
pub fn collect_object(store: &mut Store, key: &StorageKey, namespace: &str, name: &str, dropped: &[Value]) {
    if dropped.iter().filter_map(|r| owner(store, namespace, r)).any(is_deleting) {
        collect(store);
        return;
    }
    let Some(object) = store.get(key, namespace, name) else { return };
    let references: Vec<Value> =
        object["metadata"]["ownerReferences"].as_array().cloned().unwrap_or_default();
    if references.is_empty() || is_deleting(object) {
        return;
    }
    let live: Vec<&Value> = references.iter().filter_map(|r| owner(store, namespace, r)).collect();
    let owner_in_foreground =
        live.iter().any(|o| is_deleting(o) && finalizers(o).iter().any(|f| f == FOREGROUND));
    if live.is_empty() || owner_in_foreground {
        tracing::debug!(kind = %key.plural, %namespace, %name, "garbage collecting dependent");
        delete_object_no_collect(store, key, namespace, name);
        // Its own dependents may follow.
        collect(store);
    }
}

fn delete_object_no_collect(store: &mut Store, key: &StorageKey, namespace: &str, name: &str) {
    let Some(object) = store.get(key, namespace, name).cloned() else { return };
    if finalizers(&object).is_empty() {
        remove_now(store, key, namespace, name);
    } else {
        let mut object = object;
        object["metadata"]["deletionTimestamp"] = Value::String(now());
        object["metadata"]["deletionGracePeriodSeconds"] = Value::from(0);
        store.put(key, object);
    }
}
