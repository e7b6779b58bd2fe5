//! Cloudflare's script-upload metadata (`metadata.json`), the same JSON wrangler sends as the
//! `metadata` part of its multipart upload.

use serde::Deserialize;

/// The fields workerbundle reads. Fields wrangler sends that do not change what the image runs
/// (`logpush`, `observability`, `tags`, ...) are accepted and ignored.
#[derive(Debug, Default, Deserialize)]
pub struct Metadata {
    pub main_module: Option<String>,
    /// The service-worker format's single script; not supported (workerd needs ES modules here).
    pub body_part: Option<String>,
    pub compatibility_date: Option<String>,
    #[serde(default)]
    pub compatibility_flags: Vec<String>,
    #[serde(default)]
    pub bindings: Vec<RawBinding>,
}

/// One entry of `bindings`, before validation.
#[derive(Debug, Deserialize)]
pub struct RawBinding {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
    pub json: Option<serde_json::Value>,
}

impl Metadata {
    pub fn parse(bytes: &[u8]) -> Result<Self, String> {
        serde_json::from_slice(bytes).map_err(|e| format!("metadata.json is not valid upload metadata: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_what_wrangler_sends() {
        let m = Metadata::parse(
            br#"{"main_module":"index.js","bindings":[{"name":"GREETING","type":"plain_text","text":"hi"},
                {"name":"CFG","type":"json","json":{"a":1}}],"compatibility_date":"2024-09-23",
                "compatibility_flags":["nodejs_compat"],"observability":{"enabled":false}}"#,
        )
        .unwrap();
        assert_eq!(m.main_module.as_deref(), Some("index.js"));
        assert_eq!(m.bindings.len(), 2);
        assert_eq!(m.bindings[1].json, Some(serde_json::json!({"a": 1})));
        assert_eq!(m.compatibility_flags, ["nodejs_compat"]);
    }

    #[test]
    fn invalid_json_is_a_clear_error() {
        let err = Metadata::parse(b"{not json").unwrap_err();
        assert!(err.contains("metadata.json is not valid"), "{err}");
    }
}
