//! The state of the server: registered resource types, objects, one global resourceVersion counter,
//! and a bounded history of change events from which watches are served.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use serde_json::{json, Value};
use tokio::sync::broadcast;

use crate::resource::{builtins, ResourceDef, StorageKey};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
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

pub struct Store {
    defs: Vec<ResourceDef>,
    objects: BTreeMap<StorageKey, BTreeMap<ObjectKey, Value>>,
    rv: u64,
    history: VecDeque<Arc<Event>>,
    history_limit: usize,
    /// The newest resourceVersion whose event is no longer retained.
    compacted: u64,
    events: broadcast::Sender<Arc<Event>>,
    /// Changes whenever resource types are (un)registered, for OpenAPI document hashes.
    pub discovery_generation: u64,
}

pub enum Since {
    Events(Vec<Arc<Event>>),
    TooOld,
}

impl Store {
    pub fn new(history_limit: usize) -> Store {
        let (events, _) = broadcast::channel(4096);
        let mut store = Store {
            defs: builtins(),
            objects: BTreeMap::new(),
            rv: 0,
            history: VecDeque::new(),
            history_limit: history_limit.max(1),
            compacted: 0,
            events,
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

    /// Objects of one resource, in one namespace or all of them (`None`), sorted by namespace and name.
    pub fn list(&self, key: &StorageKey, namespace: Option<&str>) -> Vec<Value> {
        let Some(objects) = self.objects.get(key) else { return Vec::new() };
        objects
            .iter()
            .filter(|((ns, _), _)| namespace.is_none_or(|n| n == ns))
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// Every stored object with its storage key: the garbage collector looks across all kinds.
    pub fn all(&self) -> Vec<(StorageKey, Value)> {
        self.objects.iter().flat_map(|(k, objs)| objs.values().map(move |v| (k.clone(), v.clone()))).collect()
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
        // No receivers is normal: nobody is watching.
        let _ = self.events.send(event);
    }

    /// Stores a new or changed object under a fresh resourceVersion and tells watchers.
    pub fn put(&mut self, key: &StorageKey, mut object: Value) -> Value {
        let rv = self.next_rv();
        object["metadata"]["resourceVersion"] = Value::String(rv.to_string());
        let namespace = object["metadata"]["namespace"].as_str().unwrap_or_default().to_string();
        let name = object["metadata"]["name"].as_str().unwrap_or_default().to_string();
        let previous = self.objects.entry(key.clone()).or_default().insert((namespace, name), object.clone());
        let kind = if previous.is_some() { EventType::Modified } else { EventType::Added };
        self.record(key, kind, object.clone());
        object
    }

    pub fn remove(&mut self, key: &StorageKey, namespace: &str, name: &str) -> Option<Value> {
        let mut object = self.objects.get_mut(key)?.remove(&(namespace.to_string(), name.to_string()))?;
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
        Since::Events(self.history.iter().filter(|e| e.rv > rv).cloned().collect())
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Event>> {
        self.events.subscribe()
    }

    /// Every object and the resourceVersion counter, as JSON, for a server that keeps its state
    /// across restarts.
    pub fn snapshot(&self) -> Value {
        let objects: Vec<Value> =
            self.all().into_iter().map(|(key, object)| json!([key.group, key.plural, object])).collect();
        json!({"resourceVersion": self.rv, "objects": objects})
    }

    /// Loads a [`Store::snapshot`]: objects come back as they were (CRDs registered again), and
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
            let namespace = object["metadata"]["namespace"].as_str().unwrap_or_default().to_string();
            let name = object["metadata"]["name"].as_str().unwrap_or_default().to_string();
            if group == "apiextensions.k8s.io" && plural == "customresourcedefinitions" {
                self.register_crd(&name, crate::resource::from_crd(object));
            }
            self.objects.entry(key).or_default().insert((namespace, name), object.clone());
        }
        self.rv = rv;
        self.compacted = rv;
        Ok(())
    }
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
