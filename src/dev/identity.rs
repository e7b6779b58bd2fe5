//! The account and API token of a `workerbundle dev` data directory, made once and kept there so
//! that wrangler's settings stay valid across restarts. The API reads only the token's sha256.

use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

pub struct Identity {
    pub account: String,
    pub token: String,
    /// `ACCOUNT SHA256(TOKEN)`, the API's `--tokens` file.
    pub tokens_file: PathBuf,
}

pub fn load_or_create(data: &Path) -> Result<Identity, String> {
    let path = data.join("identity.json");
    let (account, token) = match std::fs::read(&path) {
        Ok(bytes) => {
            let value: serde_json::Value =
                serde_json::from_slice(&bytes).map_err(|e| format!("{}: {e}", path.display()))?;
            let field = |name: &str| {
                value[name]
                    .as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| format!("{}: no {name}", path.display()))
            };
            (field("account")?, field("token")?)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // Cloudflare account ids are 32 hex characters; tokens 40 characters.
            let account = format!("{:032x}", fastrand::u128(..));
            let token = format!("{:032x}{:08x}", fastrand::u128(..), fastrand::u32(..));
            let body = serde_json::json!({"account": account, "token": token}).to_string();
            write_private(&path, body.as_bytes())?;
            (account, token)
        }
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    let tokens_file = data.join("tokens");
    let line = format!("{account} {}\n", hex::encode(Sha256::digest(token.as_bytes())));
    write_private(&tokens_file, line.as_bytes())?;
    Ok(Identity { account, token, tokens_file })
}

/// Writes a file only its owner can read.
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    file.write_all(bytes).map_err(|e| format!("cannot write {}: {e}", path.display()))
}
