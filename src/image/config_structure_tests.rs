//! The property that nothing a user sends can change the structure of the generated workerd
//! config: a worker built from hostile metadata (names, values, flags and module paths full of
//! quotes, backslashes, braces, `#`, newlines and control characters) gives a config whose tokens,
//! read back by a Cap'n Proto text tokenizer, are those of the same worker with every user string
//! replaced by a plain one — and whose string literals decode back to exactly what was sent.

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

use super::workerd_config::{modules_fragment, top_level_config};
use crate::worker::{
    Module, ModuleContent, ModuleKind, Overrides, ServedWorker, Var, VarValue, Worker, WorkerCode,
    WorkerFiles, WorkerSettings,
};

#[derive(Clone, Debug, PartialEq, Eq)]
enum Token {
    Literal(String),
    Syntax(String),
}

/// Cap'n Proto text as tokens: string literals decoded, comments dropped, identifiers and numbers
/// whole, every other character on its own. Panics on what a parser would refuse inside a literal
/// (a raw line break, an unknown escape, an unterminated literal).
fn tokenize(text: &str) -> Vec<Token> {
    let mut tokens = Vec::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            c if c.is_whitespace() => {}
            '#' => {
                for c in chars.by_ref() {
                    if c == '\n' {
                        break;
                    }
                }
            }
            '"' => {
                let mut literal = String::new();
                loop {
                    match chars.next().expect("unterminated string literal") {
                        '"' => break,
                        '\n' => panic!("raw line break inside a literal: {literal:?}"),
                        '\\' => match chars.next().expect("dangling backslash") {
                            '"' => literal.push('"'),
                            '\\' => literal.push('\\'),
                            'n' => literal.push('\n'),
                            't' => literal.push('\t'),
                            'r' => literal.push('\r'),
                            'x' => {
                                let hex: String =
                                    [chars.next(), chars.next()].into_iter().flatten().collect();
                                let code = u32::from_str_radix(&hex, 16).expect("bad \\x escape");
                                literal.push(char::from_u32(code).expect("bad \\x code"));
                            }
                            other => panic!("unknown escape \\{other}"),
                        },
                        c => literal.push(c),
                    }
                }
                tokens.push(Token::Literal(literal));
            }
            c if c.is_alphanumeric() || c == '_' => {
                let mut word = String::from(c);
                while let Some(&next) = chars.peek() {
                    if !(next.is_alphanumeric() || next == '_') {
                        break;
                    }
                    word.push(next);
                    chars.next();
                }
                tokens.push(Token::Syntax(word));
            }
            c => tokens.push(Token::Syntax(c.to_string())),
        }
    }
    tokens
}

/// The tokens with every literal blanked: the config's structure.
fn structure(tokens: &[Token]) -> Vec<Token> {
    tokens
        .iter()
        .map(|t| match t {
            Token::Literal(_) => Token::Literal(String::new()),
            syntax => syntax.clone(),
        })
        .collect()
}

fn literals(tokens: &[Token]) -> BTreeSet<String> {
    tokens
        .iter()
        .filter_map(|t| match t {
            Token::Literal(l) => Some(l.clone()),
            Token::Syntax(_) => None,
        })
        .collect()
}

/// The same worker with plain strings: same modules by kind and order, same bindings by kind.
fn plain_twin(code: &WorkerCode, settings: &WorkerSettings) -> (WorkerCode, WorkerSettings) {
    let extension = |kind: ModuleKind| match kind {
        ModuleKind::EsModule => "js",
        ModuleKind::CommonJs => "cjs",
        ModuleKind::Text => "txt",
        ModuleKind::Data => "bin",
        ModuleKind::Wasm => "wasm",
        ModuleKind::Json => "json",
    };
    let renamed: BTreeMap<&str, String> = code
        .modules
        .iter()
        .enumerate()
        .map(|(i, m)| (m.path.as_str(), format!("m{i:04}.{}", extension(m.kind))))
        .collect();
    let twin_code = WorkerCode {
        name: "plain".into(),
        main_module: renamed[code.main_module.as_str()].clone(),
        modules: code
            .modules
            .iter()
            .map(|m| Module {
                path: renamed[m.path.as_str()].clone(),
                kind: m.kind,
                content: Default::default(),
            })
            .collect(),
    };
    let vars = settings
        .vars
        .iter()
        .enumerate()
        .map(|(i, v)| Var {
            name: format!("v{i:04}"),
            value: match v.value {
                VarValue::Text(_) => VarValue::Text("x".into()),
                VarValue::Json(_) => VarValue::Json("1".into()),
            },
        })
        .collect();
    let twin_settings = WorkerSettings {
        compatibility_date: "2024-09-23".into(),
        compatibility_flags: (0..settings.compatibility_flags.len()).map(|i| format!("f{i:04}")).collect(),
        vars,
        secrets: (0..settings.secrets.len()).map(|i| format!("s{i:04}")).collect(),
        env_prefix: "P_".into(),
    };
    (twin_code, twin_settings)
}

/// Text a user controls: every character class that could end a literal or start new syntax.
fn hostile_text() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => "(?s).{0,24}",
        3 => r##"[\"\\\n\r\t#(){}\[\],=;:.\x00-\x1f\x7f a-zA-Z0-9é€]{0,24}"##,
        1 => Just("\"), (name = \"evil\", text = \"x\") ]\n# \\\"".to_owned()),
    ]
}

/// A module path segment that passes the path rules but holds syntax characters.
fn hostile_segment() -> impl Strategy<Value = String> {
    r##"[\"#(){}\[\],=;:a-z0-9é _\-]{1,10}"##.prop_filter("not a dot component", |s| s != "." && s != "..")
}

#[derive(Debug, Clone)]
struct HostileWorker {
    main: String,
    others: Vec<(Vec<String>, &'static str)>,
    flags: Vec<String>,
    texts: Vec<(String, String)>,
    jsons: Vec<(String, String)>,
    secrets: Vec<String>,
}

fn hostile_worker() -> impl Strategy<Value = HostileWorker> {
    (
        hostile_segment(),
        prop::collection::vec(
            (
                prop::collection::vec(hostile_segment(), 1..3),
                prop::sample::select(vec![".js", ".wasm", ".txt", ".json", ".cjs", ""]),
            ),
            0..4,
        ),
        prop::collection::vec("[a-z_0-9]{1,12}", 0..3),
        prop::collection::vec((hostile_text(), hostile_text()), 0..4),
        prop::collection::vec((hostile_text(), hostile_text()), 0..3),
        prop::collection::vec(hostile_text(), 0..3),
    )
        .prop_map(|(main, others, flags, texts, jsons, secrets)| HostileWorker {
            main: format!("{main}.js"),
            others,
            flags,
            texts,
            jsons,
            secrets,
        })
}

impl HostileWorker {
    /// The worker's files. Binding names get a distinct first character each, so that most
    /// generated workers pass validation and reach the generator (an environment variable's
    /// name cannot hold `=`, so secrets' names do without it).
    fn files(&self) -> WorkerFiles {
        let mut bindings: Vec<serde_json::Value> = Vec::new();
        for (i, (name, text)) in self.texts.iter().enumerate() {
            bindings
                .push(serde_json::json!({"name": format!("t{i}{name}"), "type": "plain_text", "text": text}));
        }
        for (i, (name, json)) in self.jsons.iter().enumerate() {
            bindings.push(serde_json::json!({"name": format!("j{i}{name}"), "type": "json", "json": json}));
        }
        for (i, name) in self.secrets.iter().enumerate() {
            let name = format!("s{i}{}", name.replace('=', ""));
            bindings.push(serde_json::json!({"name": name, "type": "secret_text"}));
        }
        let metadata = serde_json::json!({
            "main_module": self.main,
            "compatibility_date": "2024-09-23",
            "compatibility_flags": self.flags,
            "bindings": bindings,
        });
        let mut files: BTreeMap<String, ModuleContent> = BTreeMap::new();
        files.insert(self.main.clone(), Bytes::from_static(b"export default {}").into());
        for (segments, extension) in &self.others {
            files.insert(format!("{}{extension}", segments.join("/")), Bytes::from_static(b"x").into());
        }
        files.insert("metadata.json".into(), Bytes::from(metadata.to_string()).into());
        WorkerFiles { name: "hostile".into(), files }
    }
}

/// What a worker sends never changes the structure of the config: the same tokens as a plain
/// twin's, every string back out of its literal exactly as sent.
fn check_config_structure(files: WorkerFiles, port: u16) -> Result<(), TestCaseError> {
    // Invalid input is refused whole (duplicate names, NUL, ...); what is accepted must be inert.
    let Ok(worker) = Worker::from_files(files, &Overrides::default()) else {
        return Ok(());
    };
    let (twin_code, twin_settings) = plain_twin(&worker.code, &worker.settings);
    let served = ServedWorker { name: worker.code.name.clone(), port, settings: worker.settings.clone() };
    let twin = ServedWorker { name: "plain".into(), port, settings: twin_settings };

    let config = tokenize(&top_level_config(&[&served]));
    prop_assert_eq!(structure(&config), structure(&tokenize(&top_level_config(&[&twin]))));
    let fragment = tokenize(&modules_fragment(&worker.code));
    prop_assert_eq!(structure(&fragment), structure(&tokenize(&modules_fragment(&twin_code))));

    // Every string the user sent comes back out of its literal exactly as sent.
    let config_literals = literals(&config);
    for var in &worker.settings.vars {
        prop_assert!(config_literals.contains(&var.name));
        match &var.value {
            VarValue::Text(v) | VarValue::Json(v) => prop_assert!(config_literals.contains(v)),
        }
    }
    for secret in &worker.settings.secrets {
        prop_assert!(config_literals.contains(secret));
    }
    let fragment_literals = literals(&fragment);
    for module in &worker.code.modules {
        prop_assert!(fragment_literals.contains(&module.path));
    }
    Ok(())
}

#[test]
fn the_committed_corpus_never_changes_the_config_structure() {
    for case in crate::worker::hostile_input_tests::corpus("workers") {
        let files = crate::worker::hostile_input_tests::corpus_worker(&case);
        check_config_structure(files, 8080).unwrap_or_else(|e| panic!("{}: {e}", case["name"]));
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: crate::hostile_input_cases(), ..ProptestConfig::default() })]

    #[test]
    fn user_input_never_changes_the_config_structure(hostile in hostile_worker(), port in 1024u16..65535) {
        check_config_structure(hostile.files(), port)?;
    }
}

#[test]
fn the_tokenizer_sees_a_breakout_when_quoting_is_skipped() {
    // The property above is only as good as the tokenizer: an unquoted value must change it.
    let value = "x\"), (name = \"evil\", text = \"y";
    let quoted = tokenize(&format!("(name = {}, text = \"v\")", super::capnp::quote(value)));
    let raw = tokenize(&format!("(name = \"{value}\", text = \"v\")"));
    assert_ne!(structure(&quoted), structure(&raw));
    assert_eq!(quoted[3], Token::Literal(value.into()));
}
