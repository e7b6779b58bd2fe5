//! The kinds of module a worker can hold, as workerd names them.

/// A module kind; chosen from the file extension, as wrangler does for the module types it sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModuleKind {
    EsModule,
    CommonJs,
    Text,
    Data,
    Wasm,
    Json,
}

impl ModuleKind {
    /// `.js`/`.mjs` ES module, `.cjs` CommonJS, `.wasm` WebAssembly, `.json` JSON, common text
    /// formats as text, anything else as binary data.
    pub fn from_path(path: &str) -> Self {
        let ext = path.rsplit_once('.').map(|(_, e)| e.to_ascii_lowercase()).unwrap_or_default();
        match ext.as_str() {
            "js" | "mjs" => ModuleKind::EsModule,
            "cjs" => ModuleKind::CommonJs,
            "wasm" => ModuleKind::Wasm,
            "json" => ModuleKind::Json,
            "txt" | "html" | "htm" | "css" | "md" | "csv" | "svg" | "xml" | "map" => ModuleKind::Text,
            _ => ModuleKind::Data,
        }
    }

    /// The field name of `Workerd.Worker.Module` that holds this kind.
    pub fn capnp_field(self) -> &'static str {
        match self {
            ModuleKind::EsModule => "esModule",
            ModuleKind::CommonJs => "commonJsModule",
            ModuleKind::Text => "text",
            ModuleKind::Data => "data",
            ModuleKind::Wasm => "wasm",
            ModuleKind::Json => "json",
        }
    }

    pub fn is_script(self) -> bool {
        matches!(self, ModuleKind::EsModule | ModuleKind::CommonJs)
    }
}

/// One file of a worker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Module {
    /// Relative `/`-separated path; also the name the worker imports it by.
    pub path: String,
    pub kind: ModuleKind,
    pub content: bytes::Bytes,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_follow_extensions() {
        assert_eq!(ModuleKind::from_path("index.js"), ModuleKind::EsModule);
        assert_eq!(ModuleKind::from_path("a/b.MJS"), ModuleKind::EsModule);
        assert_eq!(ModuleKind::from_path("legacy.cjs"), ModuleKind::CommonJs);
        assert_eq!(ModuleKind::from_path("add.wasm"), ModuleKind::Wasm);
        assert_eq!(ModuleKind::from_path("cfg.json"), ModuleKind::Json);
        assert_eq!(ModuleKind::from_path("page.html"), ModuleKind::Text);
        assert_eq!(ModuleKind::from_path("blob.bin"), ModuleKind::Data);
        assert_eq!(ModuleKind::from_path("noext"), ModuleKind::Data);
    }
}
