//! Properties of everything a user can send about a worker: `metadata.json` of any shape, file
//! names of any shape, names of any shape. Nothing panics; what is accepted obeys the rules the
//! image and Kubernetes rely on; what is refused says why. The same checks replay the committed
//! corpus of hand-picked hostile inputs (testdata/hostile/corpus.json).

use std::collections::BTreeMap;
use std::path::{Component, Path};

use bytes::Bytes;
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

use super::names::{check_module_path, check_worker_name};
use super::{Metadata, ModuleContent, Overrides, Worker, WorkerFiles};

/// JSON of any shape, with the field names metadata.json uses mixed in so that the parser gets
/// past the first level often.
fn any_json() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(serde_json::Value::from),
        "(?s).{0,16}".prop_map(serde_json::Value::from),
    ];
    let key = prop_oneof![
        prop::sample::select(vec![
            "main_module",
            "body_part",
            "compatibility_date",
            "compatibility_flags",
            "bindings",
            "name",
            "type",
            "text",
            "json",
        ])
        .prop_map(str::to_owned),
        "(?s).{0,8}",
    ];
    leaf.prop_recursive(4, 48, 6, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::Array),
            prop::collection::btree_map(key.clone(), inner, 0..6)
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A path that stays under `root` when joined to it, judged component by component.
fn stays_inside(path: &str) -> bool {
    let mut depth = 0i32;
    for component in Path::new(path).components() {
        match component {
            Component::Normal(_) => depth += 1,
            Component::ParentDir => depth -= 1,
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) => return false,
        }
        if depth < 0 {
            return false;
        }
    }
    depth > 0
}

fn file_name() -> impl Strategy<Value = String> {
    prop_oneof![
        "(?s).{0,20}",
        r"[./\\a-z\x00\n]{0,12}",
        prop::sample::select(vec![
            "../x.js",
            "/etc/passwd",
            "a/../../b.js",
            "./index.js",
            "a//b.js",
            "index.js"
        ])
        .prop_map(str::to_owned),
    ]
}

/// The DNS-1123 label rule, written independently of `check_worker_name`.
fn is_dns_label(name: &str) -> bool {
    name.len() <= 63
        && !name.is_empty()
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

/// The committed corpus of hostile inputs (testdata/hostile/corpus.json): `field` as a list.
pub(crate) fn corpus(field: &str) -> Vec<serde_json::Value> {
    let corpus: serde_json::Value =
        serde_json::from_str(include_str!("../../testdata/hostile/corpus.json")).expect("the corpus is JSON");
    corpus[field].as_array().cloned().unwrap_or_else(|| panic!("the corpus has no list {field:?}"))
}

/// A corpus worker: its name and files.
pub(crate) fn corpus_worker(case: &serde_json::Value) -> WorkerFiles {
    let files = case["files"]
        .as_object()
        .expect("files")
        .iter()
        .map(|(path, content)| (path.clone(), Bytes::from(content.as_str().expect("text").to_owned()).into()))
        .collect();
    WorkerFiles { name: case["name"].as_str().expect("name").to_owned(), files }
}

fn check_metadata(bytes: &[u8]) -> Result<(), TestCaseError> {
    if let Err(message) = Metadata::parse(bytes) {
        prop_assert!(message.starts_with("metadata.json is not valid upload metadata"));
    }
    Ok(())
}

/// A worker is refused with a reason, or everything about it obeys the rules.
fn check_worker(files: WorkerFiles) -> Result<(), TestCaseError> {
    let worker = files.name.clone();
    match Worker::from_files(files, &Overrides::default()) {
        Ok(accepted) => {
            prop_assert!(is_dns_label(&accepted.code.name));
            prop_assert!(!accepted.code.modules.is_empty());
            for module in &accepted.code.modules {
                prop_assert!(stays_inside(&module.path), "{:?} escapes the worker", module.path);
                prop_assert!(!module.path.chars().any(char::is_control));
            }
            prop_assert!(accepted.code.modules.iter().any(|m| m.path == accepted.code.main_module));
            for secret in &accepted.settings.secrets {
                prop_assert!(!secret.contains('=') && !secret.contains('\0'));
            }
        }
        Err(error) => {
            prop_assert_eq!(&error.worker, &worker);
            prop_assert!(!error.message.is_empty());
        }
    }
    Ok(())
}

fn check_module_path_rule(path: &str) -> Result<(), TestCaseError> {
    if check_module_path(path).is_ok() {
        prop_assert!(stays_inside(path), "{:?} accepted but escapes", path);
        prop_assert!(!path.contains('\\') && !path.chars().any(char::is_control));
    }
    Ok(())
}

#[test]
fn the_committed_corpus_is_refused_or_obeys_the_rules() {
    let text = |v: &serde_json::Value| v.as_str().expect("a string").to_owned();
    for metadata in corpus("metadata") {
        check_metadata(text(&metadata).as_bytes()).unwrap_or_else(|e| panic!("{metadata}: {e}"));
    }
    for path in corpus("module_paths") {
        check_module_path_rule(&text(&path)).unwrap_or_else(|e| panic!("{path}: {e}"));
    }
    for name in corpus("worker_names") {
        let name = text(&name);
        assert_eq!(check_worker_name(&name).is_ok(), is_dns_label(&name), "{name:?}");
    }
    let workers = corpus("workers");
    let accepted = workers
        .iter()
        .filter(|case| {
            check_worker(corpus_worker(case)).unwrap_or_else(|e| panic!("{}: {e}", case["name"]));
            Worker::from_files(corpus_worker(case), &Overrides::default()).is_ok()
        })
        .count();
    // The corpus must reach the generator too, not only the validation in front of it.
    assert!(
        accepted >= 2 && accepted < workers.len(),
        "{accepted} of {} corpus workers accepted",
        workers.len()
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: crate::hostile_input_cases(), ..ProptestConfig::default() })]

    #[test]
    fn metadata_of_any_bytes_parses_or_says_why(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        check_metadata(&bytes)?;
    }

    #[test]
    fn metadata_of_any_json_parses_or_says_why(value in any_json()) {
        check_metadata(value.to_string().as_bytes())?;
    }

    #[test]
    fn a_worker_from_any_files_and_metadata_is_refused_or_stays_inside(
        names in prop::collection::vec(file_name(), 1..6),
        metadata in prop::option::of(any_json()),
        worker in "(?s).{0,12}|[a-z0-9-]{1,12}",
    ) {
        let mut files: BTreeMap<String, ModuleContent> =
            names.into_iter().map(|n| (n, Bytes::from_static(b"export default {}").into())).collect();
        if let Some(metadata) = metadata {
            files.insert("metadata.json".into(), Bytes::from(metadata.to_string()).into());
        }
        check_worker(WorkerFiles { name: worker, files })?;
    }

    #[test]
    fn module_paths_accepted_are_relative_and_inside(path in file_name()) {
        check_module_path_rule(&path)?;
    }

    #[test]
    fn worker_names_are_exactly_dns_labels(name in "(?s).{0,70}|[a-z0-9-]{0,70}") {
        prop_assert_eq!(check_worker_name(&name).is_ok(), is_dns_label(&name), "{:?}", name);
    }
}
