//! A worker, validated and split by where each part goes in the image:
//! - [`WorkerCode`]: the modules and the entry point, which make the worker's own layer;
//! - [`WorkerSettings`]: compatibility date and flags, vars, secret names and the environment
//!   prefix, which go into the small top-level config layer (with the port the bundle gives it).
//!
//! Every source (directory, S3, the upload API) hands over the same thing: a set of files, one of
//! which may be Cloudflare's `metadata.json`; [`Overrides`] (a WorkerDeployment's template, the
//! CLI's flags) are laid over the typed metadata.

mod metadata;
mod module;
pub mod names;
pub mod ports;

#[cfg(test)]
pub(crate) mod hostile_input_tests;

use std::collections::{BTreeMap, BTreeSet};

pub use metadata::{Metadata, RawBinding};
pub use module::{Module, ModuleContent, ModuleKind};

/// The file name of the upload metadata inside a worker source.
pub const METADATA_FILE: &str = "metadata.json";

/// The most of `metadata.json` read from a worker's files (wrangler's is a few KiB).
pub const MAX_METADATA_BYTES: u64 = 1 << 20;

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

/// A plain-text or JSON variable (Cloudflare's `vars`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Var {
    pub name: String,
    pub value: VarValue,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VarValue {
    Text(String),
    /// JSON text, already checked to parse.
    Json(String),
}

/// What goes into the worker's layer: its modules and its entry point.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkerCode {
    pub name: String,
    pub main_module: String,
    /// Sorted by path.
    pub modules: Vec<Module>,
}

impl WorkerCode {
    /// The modules in the order workerd wants them: the main module first, then the rest by path.
    pub fn modules_main_first(&self) -> impl Iterator<Item = &Module> {
        let main = self.modules.iter().filter(|m| m.path == self.main_module);
        main.chain(self.modules.iter().filter(|m| m.path != self.main_module))
    }

    /// Whether a module is read from disk only when the layer is written (a big file).
    pub fn streams_modules(&self) -> bool {
        self.modules.iter().any(|m| matches!(m.content, ModuleContent::File(_)))
    }
}

/// How a worker runs, apart from its code and its port: what the top-level config says of it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WorkerSettings {
    pub compatibility_date: String,
    pub compatibility_flags: Vec<String>,
    /// In the order given; names are unique among vars and secrets.
    pub vars: Vec<Var>,
    /// Names of `secret_text` bindings, read from `<env_prefix><NAME>` at start-up.
    pub secrets: BTreeSet<String>,
    pub env_prefix: String,
}

impl WorkerSettings {
    /// The bindings workerd gets: vars in order, then secrets by name. A var wins over a secret
    /// of the same name (a var is in the image; the secret would only shadow it).
    pub fn bindings(&self) -> Vec<Binding> {
        let mut bindings: Vec<Binding> = self
            .vars
            .iter()
            .map(|v| match &v.value {
                VarValue::Text(value) => Binding::Text { name: v.name.clone(), value: value.clone() },
                VarValue::Json(json) => Binding::Json { name: v.name.clone(), json: json.clone() },
            })
            .collect();
        let var_names: BTreeSet<&str> = self.vars.iter().map(|v| v.name.as_str()).collect();
        bindings.extend(self.secrets.iter().filter(|s| !var_names.contains(s.as_str())).map(|name| {
            Binding::FromEnvironment { name: name.clone(), variable: format!("{}{name}", self.env_prefix) }
        }));
        bindings
    }
}

/// A validated worker: its code and its settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Worker {
    pub code: WorkerCode,
    pub settings: WorkerSettings,
}

/// A worker as one image serves it: its name, its port and its settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServedWorker {
    pub name: String,
    pub port: u16,
    pub settings: WorkerSettings,
}

/// What a worker is built from: its files (module paths to contents, `metadata.json` included).
#[derive(Clone, Debug, Default)]
pub struct WorkerFiles {
    pub name: String,
    pub files: BTreeMap<String, ModuleContent>,
}

/// Settings laid over the uploaded metadata (a WorkerDeployment's template, the CLI's flags).
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    pub main_module: Option<String>,
    pub compatibility_date: Option<String>,
    /// Replace the metadata's flags when not empty.
    pub compatibility_flags: Vec<String>,
    /// Replace the metadata's bindings of the same name, else are added.
    pub vars: Vec<Var>,
    /// `None` gives the default prefix (see [`names::default_env_prefix`]).
    pub env_prefix: Option<String>,
}

impl Worker {
    /// Validates a worker's files and metadata, with `overrides` laid over the metadata. Nothing
    /// is written; every problem is reported with the worker's name and what to change.
    pub fn from_files(input: WorkerFiles, overrides: &Overrides) -> Result<Worker, WorkerError> {
        let name = input.name;
        let fail = |message: String| WorkerError { worker: name.clone(), message };
        names::check_worker_name(&name).map_err(fail)?;
        let env_prefix = overrides.env_prefix.clone().unwrap_or_else(|| names::default_env_prefix(&name));
        names::check_env_prefix(&env_prefix).map_err(fail)?;

        let mut files = input.files;
        let metadata = match files.remove(METADATA_FILE) {
            Some(content) => {
                // A metadata file is small; one read from disk too big to be one is refused.
                if content.len() > MAX_METADATA_BYTES {
                    return Err(fail(format!(
                        "{METADATA_FILE} is {} bytes; at most {MAX_METADATA_BYTES} are read",
                        content.len()
                    )));
                }
                let bytes =
                    content.read_all().map_err(|e| fail(format!("cannot read {METADATA_FILE}: {e}")))?;
                Metadata::parse(&bytes).map_err(fail)?
            }
            None => Metadata::default(),
        };
        if metadata.body_part.is_some() && metadata.main_module.is_none() && overrides.main_module.is_none() {
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

        let main_module =
            pick_main_module(overrides.main_module.as_ref().or(metadata.main_module.as_ref()), &modules)
                .map_err(fail)?;
        let compatibility_date = overrides
            .compatibility_date
            .clone()
            .or(metadata.compatibility_date)
            .unwrap_or_else(|| DEFAULT_COMPATIBILITY_DATE.to_owned());
        check_date(&compatibility_date).map_err(fail)?;
        let flags = if overrides.compatibility_flags.is_empty() {
            metadata.compatibility_flags
        } else {
            overrides.compatibility_flags.clone()
        };
        let compatibility_flags = check_flags(&flags).map_err(fail)?;
        let (mut vars, secrets) = convert_bindings(&metadata.bindings, &env_prefix).map_err(fail)?;
        for var in &overrides.vars {
            check_var(var).map_err(fail)?;
            vars.retain(|v| v.name != var.name);
            vars.push(var.clone());
        }
        let settings = WorkerSettings { compatibility_date, compatibility_flags, vars, secrets, env_prefix };
        Ok(Worker { code: WorkerCode { name, main_module, modules }, settings })
    }
}

fn pick_main_module(named: Option<&String>, modules: &[Module]) -> Result<String, String> {
    let main = match named {
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

/// A compatibility date must be a real date of the form YYYY-MM-DD.
pub fn check_date(date: &str) -> Result<(), String> {
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

fn check_var(var: &Var) -> Result<(), String> {
    names::check_binding_name(&var.name)?;
    if let VarValue::Json(text) = &var.value {
        serde_json::from_str::<serde_json::Value>(text)
            .map_err(|e| format!("var {:?} has type json but its value is not JSON: {e}", var.name))?;
    }
    Ok(())
}

/// Splits uploaded bindings into vars and secret names; any other type is refused by name.
fn convert_bindings(raw: &[RawBinding], env_prefix: &str) -> Result<(Vec<Var>, BTreeSet<String>), String> {
    let mut seen = BTreeSet::new();
    let mut vars = Vec::new();
    let mut secrets = BTreeSet::new();
    for b in raw {
        names::check_binding_name(&b.name)?;
        if !seen.insert(b.name.as_str()) {
            return Err(format!("binding {:?} is defined twice", b.name));
        }
        let name = b.name.clone();
        match b.kind.as_str() {
            "plain_text" => {
                let text =
                    b.text.clone().ok_or_else(|| format!("plain_text binding {name:?} has no \"text\""))?;
                vars.push(Var { name, value: VarValue::Text(text) });
            }
            "json" => {
                let json = b
                    .json
                    .as_ref()
                    .map(|v| v.to_string())
                    .ok_or_else(|| format!("json binding {name:?} has no \"json\" value"))?;
                vars.push(Var { name, value: VarValue::Json(json) });
            }
            "secret_text" if b.text.is_some() => {
                return Err(format!(
                    "secret_text binding {name:?} carries its value; secret values never go into an image: \
                     remove \"text\" and pass the value as the environment variable {env_prefix}{name}"
                ))
            }
            "secret_text" => {
                names::check_secret_name(&name)?;
                secrets.insert(name);
            }
            other => {
                return Err(format!(
                "binding {name:?} has type {other:?}; supported types are plain_text, json and secret_text"
            ))
            }
        }
    }
    Ok((vars, secrets))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(entries: &[(&str, &str)]) -> WorkerFiles {
        WorkerFiles {
            name: "hello".into(),
            files: entries
                .iter()
                .map(|(k, v)| (k.to_string(), bytes::Bytes::from(v.to_string()).into()))
                .collect(),
        }
    }

    fn worker(input: WorkerFiles) -> Worker {
        Worker::from_files(input, &Overrides::default()).unwrap()
    }

    #[test]
    fn metadata_drives_main_module_date_and_bindings() {
        let w = worker(files(&[
            (
                "metadata.json",
                r#"{"main_module":"src/main.js","compatibility_date":"2025-01-02",
              "compatibility_flags":["nodejs_compat"],
              "bindings":[{"name":"G","type":"plain_text","text":"hi"},{"name":"C","type":"json","json":{"b":[1,2]}},
                          {"name":"API_KEY","type":"secret_text"}]}"#,
            ),
            ("src/main.js", "export default {}"),
            ("add.wasm", "\0asm"),
        ]));
        assert_eq!(w.code.main_module, "src/main.js");
        assert_eq!(w.settings.compatibility_date, "2025-01-02");
        assert_eq!(w.code.modules.len(), 2, "metadata.json is not a module");
        assert_eq!(w.code.modules_main_first().next().unwrap().path, "src/main.js");
        assert_eq!(
            w.settings.bindings(),
            [
                Binding::Text { name: "G".into(), value: "hi".into() },
                Binding::Json { name: "C".into(), json: r#"{"b":[1,2]}"#.into() },
                Binding::FromEnvironment { name: "API_KEY".into(), variable: "HELLO_API_KEY".into() },
            ]
        );
    }

    #[test]
    fn defaults_without_metadata() {
        let w = worker(files(&[("index.js", "export default {}")]));
        assert_eq!(w.code.main_module, "index.js");
        assert_eq!(w.settings.compatibility_date, DEFAULT_COMPATIBILITY_DATE);
        assert_eq!(w.settings.env_prefix, "HELLO_");
    }

    #[test]
    fn overrides_win_over_metadata() {
        let input = files(&[
            (
                "metadata.json",
                r#"{"main_module":"a.js","compatibility_date":"2024-01-01","compatibility_flags":["x"],
                "bindings":[{"name":"G","type":"plain_text","text":"hi"},{"name":"K","type":"secret_text"}]}"#,
            ),
            ("a.js", ""),
            ("b.js", ""),
        ]);
        let overrides = Overrides {
            main_module: Some("b.js".into()),
            compatibility_date: Some("2025-06-01".into()),
            compatibility_flags: vec!["nodejs_compat".into()],
            vars: vec![
                Var { name: "G".into(), value: VarValue::Text("hello".into()) },
                Var { name: "L".into(), value: VarValue::Json(r#"{"rps":5}"#.into()) },
            ],
            env_prefix: Some("APP_".into()),
        };
        let w = Worker::from_files(input, &overrides).unwrap();
        assert_eq!(w.code.main_module, "b.js");
        assert_eq!(w.settings.compatibility_date, "2025-06-01");
        assert_eq!(w.settings.compatibility_flags, ["nodejs_compat"]);
        assert_eq!(
            w.settings.bindings(),
            [
                Binding::Text { name: "G".into(), value: "hello".into() },
                Binding::Json { name: "L".into(), json: r#"{"rps":5}"#.into() },
                Binding::FromEnvironment { name: "K".into(), variable: "APP_K".into() },
            ]
        );
        let bad_json = Overrides {
            vars: vec![Var { name: "J".into(), value: VarValue::Json("{nope".into()) }],
            ..Overrides::default()
        };
        let err = Worker::from_files(files(&[("index.js", "")]), &bad_json).unwrap_err().to_string();
        assert!(err.contains("not JSON"), "{err}");
    }

    #[test]
    fn a_var_shadows_a_secret_of_the_same_name() {
        let settings = WorkerSettings {
            vars: vec![Var { name: "K".into(), value: VarValue::Text("v".into()) }],
            secrets: ["K".to_owned(), "S".to_owned()].into(),
            env_prefix: "P_".into(),
            ..WorkerSettings::default()
        };
        assert_eq!(
            settings.bindings(),
            [
                Binding::Text { name: "K".into(), value: "v".into() },
                Binding::FromEnvironment { name: "S".into(), variable: "P_S".into() },
            ]
        );
    }

    fn error_of(input: WorkerFiles) -> String {
        Worker::from_files(input, &Overrides::default()).unwrap_err().to_string()
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
    }
}
