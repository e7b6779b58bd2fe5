//! The kinds of module a worker can hold, as workerd names them, and where a module's bytes are.

use std::io::{self, Read};

use bytes::Bytes;

use crate::image::file_source::FileSource;

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
    pub content: ModuleContent,
}

/// A module's bytes: in memory (uploads, S3 objects, small files), or a big file on disk that is
/// read only while its layer is written, so that a build's memory does not grow with its input.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModuleContent {
    Memory(Bytes),
    File(FileSource),
}

impl ModuleContent {
    pub fn len(&self) -> u64 {
        match self {
            ModuleContent::Memory(bytes) => bytes.len() as u64,
            ModuleContent::File(source) => source.size(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bytes, read whole; for files known to be small (`metadata.json`).
    pub fn read_all(&self) -> io::Result<Bytes> {
        match self {
            ModuleContent::Memory(bytes) => Ok(bytes.clone()),
            ModuleContent::File(source) => {
                let mut bytes = Vec::with_capacity(usize::try_from(source.size()).unwrap_or(0));
                source.open()?.read_to_end(&mut bytes)?;
                Ok(Bytes::from(bytes))
            }
        }
    }
}

impl Default for ModuleContent {
    fn default() -> Self {
        ModuleContent::Memory(Bytes::new())
    }
}

impl From<Bytes> for ModuleContent {
    fn from(bytes: Bytes) -> Self {
        ModuleContent::Memory(bytes)
    }
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
