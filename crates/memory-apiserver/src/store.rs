//! The state of the server: registered resource types, objects, one global resourceVersion counter,
//! and a bounded history of change events from which watches are served.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::ops::Bound;
use std::sync::Arc;

use serde_json::{json, Value};
use tokio::sync::broadcast;

use crate::resource::{builtins, ResourceDef, StorageKey};
use crate::selector::LabelSelector;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    pub fn parse(s: &str) -> Option<EventType> {
        match s {
            "ADDED" => Some(EventType::Added),
            "MODIFIED" => Some(EventType::Modified),
            "DELETED" => Some(EventType::Deleted),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
}

#[derive(Debug)]
pub struct Event {
    pub rv: u64,
    pub key: StorageKey,
    pub kind: EventType,
    pub object: Value,
}

/// Watch history older than this many events is forgotten (watches from before it get 410).
pub const DEFAULT_HISTORY: usize = 10_000;

/// (namespace or "", name)
pub type ObjectKey = (String, String);

/// `label=value` → the objects of one resource that carry it.
type LabelIndex = HashMap<(String, String), BTreeSet<ObjectKey>>;

pub struct Store {
    defs: Vec<ResourceDef>,
    /// Sorted by namespace then name: one namespace's objects are one range.
    objects: BTreeMap<StorageKey, BTreeMap<ObjectKey, Value>>,
    /// Per resource, by label: a selector with an equality is answered from its smallest set.
    labels: HashMap<StorageKey, LabelIndex>,
    rv: u64,
    history: VecDeque<Arc<Event>>,
    history_limit: usize,
    /// The newest resourceVersion whose event is no longer retained.
    compacted: u64,
    events: broadcast::Sender<Arc<Event>>,
    /// Events of the change in progress, sent to watchers by [`Store::publish`] once the change is
    /// durable: no watcher acts on a change that a crash could still undo.
    held: Vec<Arc<Event>>,
    /// Changes whenever resource types are (un)registered, for OpenAPI document hashes.
    pub discovery_generation: u64,
}

pub enum Since {
    Events(Vec<Arc<Event>>),
    TooOld,
}

impl Store {
    pub fn new(history_limit: usize) -> Store {
        // Watchers may fall as far behind as the history reaches: the channel holds the same
        // events the history does (shared, not copied).
        let (events, _) = broadcast::channel(history_limit.clamp(4096, 1 << 16));
        let mut store = Store {
            defs: builtins(),
            objects: BTreeMap::new(),
            labels: HashMap::new(),
            rv: 0,
            history: VecDeque::new(),
            history_limit: history_limit.max(1),
            compacted: 0,
            events,
            held: Vec::new(),
            discovery_generation: 1,
        };
        let namespaces = store.namespaces_key();
        let default_ns = json!({
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {
                "name": "default",
                "uid": new_uid(),
                "creationTimestamp": now(),
                "labels": {"kubernetes.io/metadata.name": "default"},
            },
            "spec": {"finalizers": ["kubernetes"]},
            "status": {"phase": "Active"},
        });
        store.put(&namespaces, default_ns);
        store.publish();
        store
    }

    pub fn defs(&self) -> &[ResourceDef] {
        &self.defs
    }

    pub fn find_def(&self, group: &str, version: &str, plural: &str) -> Option<ResourceDef> {
        self.defs.iter().find(|d| d.group == group && d.version == version && d.plural == plural).cloned()
    }

    pub fn namespaces_key(&self) -> StorageKey {
        StorageKey { group: String::new(), plural: "namespaces".to_string() }
    }

    pub fn register_crd(&mut self, crd_name: &str, defs: Vec<ResourceDef>) {
        let before: Vec<ResourceDef> =
            self.defs.iter().filter(|d| d.crd.as_deref() == Some(crd_name)).cloned().collect();
        if before == defs {
            return;
        }
        self.defs.retain(|d| d.crd.as_deref() != Some(crd_name));
        self.defs.extend(defs);
        self.discovery_generation += 1;
    }

    pub fn unregister_crd(&mut self, crd_name: &str) -> Vec<StorageKey> {
        let keys: Vec<StorageKey> = self
            .defs
            .iter()
            .filter(|d| d.crd.as_deref() == Some(crd_name))
            .map(ResourceDef::storage_key)
            .collect();
        self.defs.retain(|d| d.crd.as_deref() != Some(crd_name));
        self.discovery_generation += 1;
        keys
    }

    pub fn current_rv(&self) -> u64 {
        self.rv
    }

    pub fn get(&self, key: &StorageKey, namespace: &str, name: &str) -> Option<&Value> {
        self.objects.get(key)?.get(&(namespace.to_string(), name.to_string()))
    }

    /// Objects of one resource, in one namespace or all of them (`None`), sorted by namespace and
    /// name. Takes time in proportion to what it returns: a namespace is one range of the map.
    pub fn list(&self, key: &StorageKey, namespace: Option<&str>) -> Vec<Value> {
        self.range(key, namespace).map(|(_, v)| v.clone()).collect()
    }

    fn range<'a>(
        &'a self,
        key: &StorageKey,
        namespace: Option<&str>,
    ) -> Box<dyn Iterator<Item = (&'a ObjectKey, &'a Value)> + 'a> {
        let Some(objects) = self.objects.get(key) else { return Box::new(std::iter::empty()) };
        match namespace {
            None => Box::new(objects.iter()),
            Some(ns) => {
                let ns = ns.to_string();
                let start = (ns.clone(), String::new());
                Box::new(
                    objects
                        .range((Bound::Included(start), Bound::Unbounded))
                        .take_while(move |((n, _), _)| *n == ns),
                )
            }
        }
    }

    /// Objects of one resource matching `labels`, in one namespace or all. With an equality in
    /// the selector, only the objects carrying that label are looked at (the fewest of them, when
    /// there are several); otherwise the namespace's range.
    pub fn select(&self, key: &StorageKey, namespace: Option<&str>, labels: &LabelSelector) -> Vec<Value> {
        let index = self.labels.get(key);
        let smallest = labels
            .equalities()
            .map(|(k, v)| {
                let len = index.and_then(|i| i.get(&(k.to_string(), v.to_string()))).map_or(0, BTreeSet::len);
                (len, k, v)
            })
            .min_by_key(|(len, _, _)| *len);
        match smallest {
            Some((_, k, v)) => {
                let Some(set) = index.and_then(|i| i.get(&(k.to_string(), v.to_string()))) else {
                    return Vec::new();
                };
                let Some(objects) = self.objects.get(key) else { return Vec::new() };
                set.iter()
                    .filter(|(ns, _)| namespace.is_none_or(|n| n == ns))
                    .filter_map(|k| objects.get(k))
                    .filter(|o| labels.matches(o))
                    .cloned()
                    .collect()
            }
            None => {
                self.range(key, namespace).map(|(_, v)| v).filter(|o| labels.matches(o)).cloned().collect()
            }
        }
    }

    /// Every stored object, by reference: the garbage collector looks across all kinds.
    pub fn iter_all(&self) -> impl Iterator<Item = (&StorageKey, &Value)> {
        self.objects.iter().flat_map(|(k, objs)| objs.values().map(move |v| (k, v)))
    }

    /// Every stored object with its storage key: the garbage collector looks across all kinds.
    pub fn all(&self) -> Vec<(StorageKey, Value)> {
        self.iter_all().map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    fn next_rv(&mut self) -> u64 {
        self.rv += 1;
        self.rv
    }

    fn record(&mut self, key: &StorageKey, kind: EventType, object: Value) {
        let event = Arc::new(Event { rv: self.rv, key: key.clone(), kind, object });
        self.history.push_back(event.clone());
        while self.history.len() > self.history_limit {
            if let Some(old) = self.history.pop_front() {
                self.compacted = old.rv;
            }
        }
        self.held.push(event);
    }

    /// Sends the held events to watchers; the caller has made the change durable (or knows it
    /// cannot).
    pub fn publish(&mut self) {
        for event in self.held.drain(..) {
            // No receivers is normal: nobody is watching.
            let _ = self.events.send(event);
        }
    }

    /// Stores a new or changed object under a fresh resourceVersion and tells watchers.
    pub fn put(&mut self, key: &StorageKey, mut object: Value) -> Value {
        let rv = self.next_rv();
        object["metadata"]["resourceVersion"] = Value::String(rv.to_string());
        let previous = self.insert(key, object.clone());
        let kind = if previous.is_some() { EventType::Modified } else { EventType::Added };
        self.record(key, kind, object.clone());
        object
    }

    /// Stores `object` and files it under its labels; the object it replaces, if any.
    fn insert(&mut self, key: &StorageKey, object: Value) -> Option<Value> {
        let namespace = object["metadata"]["namespace"].as_str().unwrap_or_default().to_string();
        let name = object["metadata"]["name"].as_str().unwrap_or_default().to_string();
        let object_key = (namespace, name);
        let index = self.labels.entry(key.clone()).or_default();
        for label in labels_of(&object) {
            index.entry(label).or_default().insert(object_key.clone());
        }
        let previous = self.objects.entry(key.clone()).or_default().insert(object_key.clone(), object);
        if let Some(previous) = &previous {
            let now: BTreeSet<(String, String)> =
                self.objects[key].get(&object_key).map(labels_of).unwrap_or_default().into_iter().collect();
            let gone: Vec<(String, String)> =
                labels_of(previous).into_iter().filter(|l| !now.contains(l)).collect();
            self.unfile(key, &object_key, gone);
        }
        previous
    }

    fn unfile(&mut self, key: &StorageKey, object_key: &ObjectKey, labels: Vec<(String, String)>) {
        let Some(index) = self.labels.get_mut(key) else { return };
        for label in labels {
            if let Some(set) = index.get_mut(&label) {
                set.remove(object_key);
                if set.is_empty() {
                    index.remove(&label);
                }
            }
        }
    }

    pub fn remove(&mut self, key: &StorageKey, namespace: &str, name: &str) -> Option<Value> {
        let object_key = (namespace.to_string(), name.to_string());
        let mut object = self.objects.get_mut(key)?.remove(&object_key)?;
        self.unfile(key, &object_key, labels_of(&object));
        let rv = self.next_rv();
        object["metadata"]["resourceVersion"] = Value::String(rv.to_string());
        self.record(key, EventType::Deleted, object.clone());
        Some(object)
    }

    /// Events after `rv`, or `TooOld` when some of them are no longer retained.
    pub fn since(&self, rv: u64) -> Since {
        if rv < self.compacted {
            return Since::TooOld;
        }
        // The history is in resourceVersion order.
        let first = self.history.partition_point(|e| e.rv <= rv);
        Since::Events(self.history.range(first..).cloned().collect())
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Event>> {
        self.events.subscribe()
    }

    /// Every object and the resourceVersion counter, as JSON, for a server that keeps its state
    /// across restarts: `{"resourceVersion": N, "objects": [[group, plural, object], ...]}`.
    /// Serialized from references: it runs on every write, so nothing is copied first.
    pub fn snapshot_bytes(&self) -> serde_json::Result<Vec<u8>> {
        #[derive(serde::Serialize)]
        struct Snapshot<'a> {
            #[serde(rename = "resourceVersion")]
            resource_version: u64,
            objects: Vec<(&'a str, &'a str, &'a Value)>,
        }
        let objects =
            self.iter_all().map(|(key, object)| (key.group.as_str(), key.plural.as_str(), object)).collect();
        serde_json::to_vec(&Snapshot { resource_version: self.rv, objects })
    }

    /// Loads a [`Store::snapshot_bytes`] document: objects come back as they were (CRDs registered again), and
    /// resourceVersions go on from where they stopped. Watch history starts empty, so a client
    /// resuming from an older resourceVersion gets 410 and lists again, as after a real restart.
    pub fn restore(&mut self, snapshot: &Value) -> Result<(), String> {
        let rv = snapshot["resourceVersion"].as_u64().ok_or("the snapshot has no resourceVersion")?;
        let objects = snapshot["objects"].as_array().ok_or("the snapshot has no objects")?;
        for entry in objects {
            let (Some(group), Some(plural), Some(object)) =
                (entry[0].as_str(), entry[1].as_str(), entry.get(2))
            else {
                return Err(format!("a snapshot entry is malformed: {entry}"));
            };
            let key = StorageKey { group: group.to_string(), plural: plural.to_string() };
            self.replay(&key, EventType::Added, object.clone());
        }
        self.resume_at(rv);
        Ok(())
    }

    /// Redoes one change read back from disk, without telling watchers (there are none yet): the
    /// object stored, or gone for a deletion; a CRD's resources registered or unregistered with it.
    pub fn replay(&mut self, key: &StorageKey, kind: EventType, object: Value) {
        let is_crd = key.group == "apiextensions.k8s.io" && key.plural == "customresourcedefinitions";
        let namespace = object["metadata"]["namespace"].as_str().unwrap_or_default().to_string();
        let name = object["metadata"]["name"].as_str().unwrap_or_default().to_string();
        match kind {
            EventType::Deleted => {
                let object_key = (namespace, name.clone());
                if let Some(gone) = self.objects.get_mut(key).and_then(|o| o.remove(&object_key)) {
                    self.unfile(key, &object_key, labels_of(&gone));
                }
                if is_crd {
                    self.unregister_crd(&name);
                }
            }
            EventType::Added | EventType::Modified => {
                if is_crd {
                    self.register_crd(&name, crate::resource::from_crd(&object));
                }
                self.insert(key, object);
            }
        }
    }

    /// After replaying: resourceVersions go on from `rv`, and watches from before it get 410.
    pub fn resume_at(&mut self, rv: u64) {
        self.rv = self.rv.max(rv);
        self.compacted = self.rv;
    }

    /// The changes of the write in progress, for the journal.
    pub fn held(&self) -> &[Arc<Event>] {
        &self.held
    }
}

/// An object's labels as `(key, value)` pairs.
fn labels_of(object: &Value) -> Vec<(String, String)> {
    object["metadata"]["labels"]
        .as_object()
        .map(|m| m.iter().filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string()))).collect())
        .unwrap_or_default()
}

pub fn now() -> String {
    chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ").to_string()
}

pub fn new_uid() -> String {
    let hex = |n: usize| {
        (0..n).map(|_| char::from_digit(fastrand::u32(0..16), 16).unwrap_or('0')).collect::<String>()
    };
    format!(
        "{}-{}-4{}-{}{}-{}",
        hex(8),
        hex(4),
        hex(3),
        ['8', '9', 'a', 'b'][fastrand::usize(0..4)],
        hex(3),
        hex(12)
    )
}

/// The five-character suffix generateName gets, from the real server's alphabet (no vowels).
pub fn name_suffix() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    (0..5).map(|_| ALPHABET[fastrand::usize(0..ALPHABET.len())] as char).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object(namespace: &str, name: &str, app: &str) -> Value {
        json!({"metadata": {"namespace": namespace, "name": name, "labels": {"app": app}}})
    }

    fn names(objects: Vec<Value>) -> Vec<String> {
        objects
            .iter()
            .map(|o| {
                format!(
                    "{}/{}",
                    o["metadata"]["namespace"].as_str().unwrap(),
                    o["metadata"]["name"].as_str().unwrap()
                )
            })
            .collect()
    }

    #[test]
    fn lists_read_one_namespace_range_and_selects_read_one_label_set() {
        let mut store = Store::new(100);
        let key = StorageKey { group: "g".into(), plural: "things".into() };
        for (ns, name, app) in [("a", "x", "web"), ("a", "y", "db"), ("ab", "x", "web"), ("b", "z", "web")] {
            store.put(&key, object(ns, name, app));
        }
        // "a" is a prefix of "ab": the range stops at the namespace, not at the prefix.
        assert_eq!(names(store.list(&key, Some("a"))), ["a/x", "a/y"]);
        assert_eq!(names(store.list(&key, Some("ab"))), ["ab/x"]);
        assert_eq!(names(store.list(&key, Some("c"))), Vec::<String>::new());
        assert_eq!(store.list(&key, None).len(), 4);

        let web = LabelSelector::parse("app=web").unwrap();
        assert_eq!(names(store.select(&key, None, &web)), ["a/x", "ab/x", "b/z"]);
        assert_eq!(names(store.select(&key, Some("a"), &web)), ["a/x"]);
        assert_eq!(store.labels[&key][&("app".into(), "web".into())].len(), 3, "the index holds the set");
        let not_web = LabelSelector::parse("app!=web").unwrap();
        assert_eq!(names(store.select(&key, None, &not_web)), ["a/y"]);

        // Relabelled and removed objects leave the index; no empty sets stay behind.
        store.put(&key, object("a", "x", "db"));
        assert_eq!(names(store.select(&key, None, &web)), ["ab/x", "b/z"]);
        assert_eq!(names(store.select(&key, None, &LabelSelector::parse("app=db").unwrap())), ["a/x", "a/y"]);
        store.remove(&key, "ab", "x");
        store.remove(&key, "b", "z");
        assert_eq!(names(store.select(&key, None, &web)), Vec::<String>::new());
        assert!(!store.labels[&key].contains_key(&("app".into(), "web".into())));
    }
}
