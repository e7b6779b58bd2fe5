//! A worker: its modules, its entry point, its compatibility settings and its bindings, validated
//! into the shape the image builder needs. Every source (directory, S3, the upload API) hands over
//! the same thing: a set of files, one of which may be Cloudflare's `metadata.json`.

mod metadata;
mod module;
pub mod names;

use std::collections::{BTreeMap, BTreeSet};

pub use metadata::{Metadata, RawBinding};
pub use module::{Module, ModuleKind};

/// The file name of the upload metadata inside a worker source.
pub const METADATA_FILE: &str = "metadata.json";

/// The compatibility date used when metadata names none. Fixed, so an image never depends on the
/// day it was built.
pub const DEFAULT_COMPATIBILITY_DATE: &str = "2024-09-23";

/// Main modules tried, in order, when metadata names none.
const DEFAULT_MAIN_MODULES: [&str; 4] = ["index.js", "index.mjs", "worker.js", "worker.mjs"];

#[derive(Debug, thiserror::Error)]
#[error("worker {worker:?}: {message}")]
pub struct WorkerError {
    pub worker: String,
    pub message: String,
}

/// A binding as workerd will see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Binding {
    /// A plain string (`plain_text`).
    Text { name: String, value: String },
    /// A JSON value, kept as JSON text (`json`).
    Json { name: String, json: String },
    /// A secret read from the process environment at start-up (`secret_text`); its value never
    /// enters the image.
    FromEnvironment { name: String, variable: String },
}

impl Binding {
    pub fn name(&self) -> &str {
        match self {
            Binding::Text { name, .. }
            | Binding::Json { name, .. }
            | Binding::FromEnvironment { name, .. } => name,
        }
    }
}

/// A validated worker, ready to be laid into an image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Worker {
    pub name: String,
    pub port: u16,
    pub env_prefix: String,
    pub main_module: String,
    pub compatibility_date: String,
    pub compatibility_flags: Vec<String>,
    pub bindings: Vec<Binding>,
    /// Sorted by path.
    pub modules: Vec<Module>,
}

/// What a worker is built from: its files (module paths to contents, `metadata.json` included)
/// and how it is served.
#[derive(Clone, Debug, Default)]
pub struct WorkerFiles {
    pub name: String,
    pub port: u16,
    /// `None` gives the default prefix (see [`names::default_env_prefix`]).
    pub env_prefix: Option<String>,
    pub files: BTreeMap<String, Vec<u8>>,
}

impl Worker {
    /// Validates a worker's files and metadata. Nothing is written; every problem is reported with
    /// the worker's name and what to change.
    pub fn from_files(input: WorkerFiles) -> Result<Worker, WorkerError> {
        let fail = |message: String| WorkerError { worker: input.name.clone(), message };
        names::check_worker_name(&input.name).map_err(fail)?;
        if input.port == 0 {
            return Err(fail("port 0 is outside 1-65535".into()));
        }
        let env_prefix = input.env_prefix.clone().unwrap_or_else(|| names::default_env_prefix(&input.name));
        names::check_env_prefix(&env_prefix).map_err(fail)?;

        let mut files = input.files.clone();
        let metadata = match files.remove(METADATA_FILE) {
            Some(bytes) => Metadata::parse(&bytes).map_err(fail)?,
            None => Metadata::default(),
        };
        if metadata.body_part.is_some() && metadata.main_module.is_none() {
            return Err(fail(
                "the service-worker format (body_part) is not supported; upload ES modules (main_module)"
                    .into(),
            ));
        }

        let mut modules = Vec::with_capacity(files.len());
        for (path, content) in files {
            names::check_module_path(&path).map_err(fail)?;
            modules.push(Module { kind: ModuleKind::from_path(&path), path, content });
        }
        if modules.is_empty() {
            return Err(fail("has no modules".into()));
        }

        let main_module = pick_main_module(&metadata, &modules).map_err(fail)?;
        let compatibility_date =
            metadata.compatibility_date.clone().unwrap_or_else(|| DEFAULT_COMPATIBILITY_DATE.to_owned());
        check_date(&compatibility_date).map_err(fail)?;
        let compatibility_flags = check_flags(&metadata.compatibility_flags).map_err(fail)?;
        let bindings = convert_bindings(&metadata.bindings, &env_prefix).map_err(fail)?;

        Ok(Worker {
            name: input.name,
            port: input.port,
            env_prefix,
            main_module,
            compatibility_date,
            compatibility_flags,
            bindings,
            modules,
        })
    }

    /// The modules in the order workerd wants them: the main module first, then the rest by path.
    pub fn modules_main_first(&self) -> impl Iterator<Item = &Module> {
        let main = self.modules.iter().filter(|m| m.path == self.main_module);
        main.chain(self.modules.iter().filter(|m| m.path != self.main_module))
    }
}

fn pick_main_module(metadata: &Metadata, modules: &[Module]) -> Result<String, String> {
    let main = match &metadata.main_module {
        Some(main) => main.clone(),
        None => DEFAULT_MAIN_MODULES
            .iter()
            .find(|c| modules.iter().any(|m| m.path == **c))
            .map(|c| (*c).to_owned())
            .ok_or_else(|| {
                format!(
                    "no main module: metadata.json names none and none of {} exists",
                    DEFAULT_MAIN_MODULES.join(", ")
                )
            })?,
    };
    names::check_module_path(&main)?;
    let module = modules.iter().find(|m| m.path == main).ok_or_else(|| {
        let present: Vec<&str> = modules.iter().map(|m| m.path.as_str()).collect();
        format!("main module {main:?} is missing (modules present: {})", present.join(", "))
    })?;
    if !module.kind.is_script() {
        return Err(format!("main module {main:?} is not JavaScript (.js, .mjs or .cjs)"));
    }
    Ok(main)
}

fn check_date(date: &str) -> Result<(), String> {
    let valid = date.len() == 10 && chrono::NaiveDate::parse_from_str(date, "%Y-%m-%d").is_ok();
    if !valid {
        return Err(format!("compatibility_date {date:?} is not a date of the form YYYY-MM-DD"));
    }
    Ok(())
}

fn check_flags(flags: &[String]) -> Result<Vec<String>, String> {
    let mut seen = BTreeSet::new();
    for flag in flags {
        let valid = !flag.is_empty() && flag.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !valid {
            return Err(format!("compatibility flag {flag:?} may hold only letters, digits and '_'"));
        }
        if !seen.insert(flag) {
            return Err(format!("compatibility flag {flag:?} is given twice"));
        }
    }
    Ok(flags.to_vec())
}

fn convert_bindings(raw: &[RawBinding], env_prefix: &str) -> Result<Vec<Binding>, String> {
    let mut seen = BTreeSet::new();
    let mut bindings = Vec::with_capacity(raw.len());
    for b in raw {
        names::check_binding_name(&b.name)?;
        if !seen.insert(b.name.as_str()) {
            return Err(format!("binding {:?} is defined twice", b.name));
        }
        let name = b.name.clone();
        bindings.push(match b.kind.as_str() {
            "plain_text" => Binding::Text {
                value: b
                    .text
                    .clone()
                    .ok_or_else(|| format!("plain_text binding {name:?} has no \"text\""))?,
                name,
            },
            "json" => Binding::Json {
                json: b
                    .json
                    .as_ref()
                    .map(|v| v.to_string())
                    .ok_or_else(|| format!("json binding {name:?} has no \"json\" value"))?,
                name,
            },
            "secret_text" if b.text.is_some() => {
                return Err(format!(
                    "secret_text binding {name:?} carries its value; secret values never go into an image: \
                     remove \"text\" and pass the value as the environment variable {env_prefix}{name}"
                ))
            }
            "secret_text" => {
                names::check_secret_name(&name)?;
                Binding::FromEnvironment { variable: format!("{env_prefix}{name}"), name }
            }
            other => {
                return Err(format!(
                "binding {name:?} has type {other:?}; supported types are plain_text, json and secret_text"
            ))
            }
        });
    }
    Ok(bindings)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(entries: &[(&str, &str)]) -> WorkerFiles {
        WorkerFiles {
            name: "hello".into(),
            port: 8080,
            env_prefix: None,
            files: entries.iter().map(|(k, v)| (k.to_string(), v.as_bytes().to_vec())).collect(),
        }
    }

    #[test]
    fn metadata_drives_main_module_date_and_bindings() {
        let w = Worker::from_files(files(&[
            ("metadata.json", r#"{"main_module":"src/main.js","compatibility_date":"2025-01-02",
              "compatibility_flags":["nodejs_compat"],
              "bindings":[{"name":"G","type":"plain_text","text":"hi"},{"name":"C","type":"json","json":{"b":[1,2]}},
                          {"name":"API_KEY","type":"secret_text"}]}"#),
            ("src/main.js", "export default {}"),
            ("add.wasm", "\0asm"),
        ]))
        .unwrap();
        assert_eq!(w.main_module, "src/main.js");
        assert_eq!(w.compatibility_date, "2025-01-02");
        assert_eq!(w.modules.len(), 2, "metadata.json is not a module");
        assert_eq!(w.modules_main_first().next().unwrap().path, "src/main.js");
        assert_eq!(
            w.bindings,
            [
                Binding::Text { name: "G".into(), value: "hi".into() },
                Binding::Json { name: "C".into(), json: r#"{"b":[1,2]}"#.into() },
                Binding::FromEnvironment { name: "API_KEY".into(), variable: "HELLO_API_KEY".into() },
            ]
        );
    }

    #[test]
    fn defaults_without_metadata() {
        let w = Worker::from_files(files(&[("index.js", "export default {}")])).unwrap();
        assert_eq!(w.main_module, "index.js");
        assert_eq!(w.compatibility_date, DEFAULT_COMPATIBILITY_DATE);
        assert_eq!(w.env_prefix, "HELLO_");
    }

    #[test]
    fn env_prefix_can_be_set() {
        let mut input = files(&[
            ("metadata.json", r#"{"bindings":[{"name":"K","type":"secret_text"}]}"#),
            ("index.js", ""),
        ]);
        input.env_prefix = Some("APP_".into());
        let w = Worker::from_files(input).unwrap();
        assert_eq!(w.bindings[0], Binding::FromEnvironment { name: "K".into(), variable: "APP_K".into() });
    }

    fn error_of(input: WorkerFiles) -> String {
        Worker::from_files(input).unwrap_err().to_string()
    }

    #[test]
    fn bad_input_is_refused_with_a_reason() {
        let missing = error_of(files(&[("metadata.json", r#"{"main_module":"main.js"}"#), ("other.js", "")]));
        assert!(missing.contains("main module \"main.js\" is missing"), "{missing}");
        assert!(error_of(files(&[("util.js", "")])).contains("no main module"));
        assert!(error_of(files(&[("index.js", ""), ("../x.js", "")])).contains("'..'"));
        let escape =
            error_of(files(&[("metadata.json", r#"{"main_module":"../../etc/x.js"}"#), ("index.js", "")]));
        assert!(escape.contains("'..'"), "{escape}");
        assert!(error_of(files(&[("index.js", ""), ("/abs.js", "")])).contains("absolute"));
        assert!(error_of(files(&[("metadata.json", "{nope"), ("index.js", "")])).contains("not valid"));
        let secret = error_of(files(&[
            ("metadata.json", r#"{"bindings":[{"name":"K","type":"secret_text","text":"v"}]}"#),
            ("index.js", ""),
        ]));
        assert!(secret.contains("never go into an image"), "{secret}");
        let kv = error_of(files(&[
            ("metadata.json", r#"{"bindings":[{"name":"K","type":"kv_namespace","namespace_id":"x"}]}"#),
            ("index.js", ""),
        ]));
        assert!(kv.contains("\"kv_namespace\""), "{kv}");
        let date =
            error_of(files(&[("metadata.json", r#"{"compatibility_date":"2024-13-01"}"#), ("index.js", "")]));
        assert!(date.contains("YYYY-MM-DD"), "{date}");
        let mut bad_name = files(&[("index.js", "")]);
        bad_name.name = "Bad_Name".into();
        assert!(error_of(bad_name).contains("DNS-1123"));
        let mut port0 = files(&[("index.js", "")]);
        port0.port = 0;
        assert!(error_of(port0).contains("1-65535"));
    }
}
