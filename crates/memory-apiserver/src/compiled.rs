//! Things compiled from schema text (CEL rules, regex patterns), once per process: a CRD's few
//! rules and patterns are checked on every write, and compiling them each time was most of the
//! server's CPU under load.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Compiled forms by source text; a failure to compile is kept too (it is reported every time).
pub struct Compiled<T> {
    by_text: Mutex<HashMap<String, Result<Arc<T>, String>>>,
}

impl<T> Compiled<T> {
    pub fn new() -> Self {
        Compiled { by_text: Mutex::new(HashMap::new()) }
    }

    /// `text` compiled with `compile`, the first time only.
    pub fn get<E: ToString>(
        &self,
        text: &str,
        compile: impl FnOnce(&str) -> Result<T, E>,
    ) -> Result<Arc<T>, String> {
        let mut by_text = self.by_text.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(compiled) = by_text.get(text) {
            return compiled.clone();
        }
        let compiled = compile(text).map(Arc::new).map_err(|e| e.to_string());
        by_text.insert(text.to_owned(), compiled.clone());
        compiled
    }
}
