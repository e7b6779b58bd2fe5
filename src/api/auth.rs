//! Bearer tokens → accounts. The token table holds `ACCOUNT_ID SHA256_HEX_OF_TOKEN` lines, never a
//! live token; it comes from a file (re-read when it changes) or a Kubernetes Secret (re-read every
//! few seconds). A table that cannot be parsed refuses every request: a typo made while revoking a
//! token must not keep the revoked token alive.

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client};
use sha2::{Digest as _, Sha256};
use tracing::{info, warn};

use super::envelope::ApiError;

/// The key of the token Secret that holds the table.
pub const SECRET_KEY: &str = "tokens";
/// How long a table read from a Secret is trusted before it is read again.
const SECRET_TTL: Duration = Duration::from_secs(5);

/// Token hash (lower-case hex) → the accounts it may act on.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TokenTable {
    accounts: HashMap<String, BTreeSet<String>>,
}

impl TokenTable {
    /// Parses `ACCOUNT_ID SHA256_HEX` lines; blank lines and `#` comments are skipped. A token may
    /// appear on several lines, one per account.
    pub fn parse(text: &str) -> Result<TokenTable, String> {
        let mut accounts: HashMap<String, BTreeSet<String>> = HashMap::new();
        for (number, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let fields: Vec<&str> = line.split_whitespace().collect();
            let [account, hash] = fields[..] else {
                return Err(format!(
                    "line {}: expected `ACCOUNT_ID SHA256_HEX_OF_TOKEN`, found {} fields",
                    number + 1,
                    fields.len()
                ));
            };
            check_account_id(account).map_err(|e| format!("line {}: {e}", number + 1))?;
            let valid_hash = hash.len() == 64 && hash.bytes().all(|b| b.is_ascii_hexdigit());
            if !valid_hash {
                return Err(format!(
                    "line {}: {:?} is not a SHA-256 in hex (64 hex digits; make it with `printf %s TOKEN | sha256sum`)",
                    number + 1,
                    hash
                ));
            }
            accounts.entry(hash.to_ascii_lowercase()).or_default().insert(account.to_owned());
        }
        Ok(TokenTable { accounts })
    }

    /// The accounts of a presented token, or None for an unknown token.
    pub fn accounts_of(&self, token: &str) -> Option<&BTreeSet<String>> {
        self.accounts.get(&token_hash(token))
    }

    pub fn len(&self) -> usize {
        self.accounts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.accounts.is_empty()
    }
}

pub fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// An account id names a namespace-scoped WorkerAccount and appears in namespace names and S3
/// keys: a DNS-1123 label of at most 50 characters (Cloudflare's are 32 hex digits).
pub fn check_account_id(account: &str) -> Result<(), String> {
    let bytes = account.as_bytes();
    let valid = !bytes.is_empty()
        && bytes.len() <= 50
        && bytes.iter().all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'-'))
        && bytes.first().is_some_and(u8::is_ascii_alphanumeric)
        && bytes.last().is_some_and(u8::is_ascii_alphanumeric);
    if valid {
        Ok(())
    } else {
        Err(format!(
            "account id {account:?} must be 1-50 characters of a-z, 0-9 and '-', starting and ending \
             with a letter or digit"
        ))
    }
}

/// The token of an `Authorization: Bearer <token>` header.
pub fn bearer(header: Option<&str>) -> Option<&str> {
    let value = header?.trim();
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// The account a path acts on: the segment after `accounts`, if any.
pub fn account_in_path(path: &str) -> Option<&str> {
    let mut segments = path.split('/');
    segments.by_ref().find(|s| *s == "accounts")?;
    segments.next().filter(|s| !s.is_empty())
}

/// Who is calling: the token's hash (the rate limiter's key) and its accounts.
#[derive(Clone, Debug)]
pub struct Caller {
    pub token_hash: String,
    pub accounts: BTreeSet<String>,
}

/// The decision for one request, before anything is read or written: `account` is the one the
/// path acts on (checked and percent-decoded), if any.
pub fn authorize(
    table: &TokenTable,
    header: Option<&str>,
    account: Option<&str>,
) -> Result<Caller, ApiError> {
    let token = bearer(header).ok_or(ApiError::NoToken)?;
    let accounts = table.accounts_of(token).ok_or(ApiError::BadToken)?;
    if let Some(account) = account {
        if !accounts.contains(account) {
            return Err(ApiError::Forbidden(account.to_owned()));
        }
    }
    Ok(Caller { token_hash: token_hash(token), accounts: accounts.clone() })
}

/// Where the table comes from.
#[derive(Clone, Debug)]
pub enum TokenSource {
    File(PathBuf),
    Secret { namespace: String, name: String },
}

struct Cached {
    /// For a file: its modification time and length when read; for a Secret: unused.
    stamp: Option<(SystemTime, u64)>,
    read_at: Instant,
    table: Result<TokenTable, String>,
}

/// The current token table, re-read when its source changes.
pub struct Tokens {
    source: TokenSource,
    client: Option<Client>,
    cache: Mutex<Option<Cached>>,
}

impl Tokens {
    /// Reads the table once; an unreadable or malformed table at start-up is an error.
    pub async fn load(source: TokenSource, client: Option<Client>) -> Result<Tokens, String> {
        let tokens = Tokens { source, client, cache: Mutex::new(None) };
        let table = tokens.current().await?;
        info!(tokens = table.len(), "token table loaded");
        Ok(tokens)
    }

    /// The table as it is now; an error when the source cannot be read or parsed.
    pub async fn current(&self) -> Result<TokenTable, String> {
        match &self.source {
            TokenSource::File(path) => {
                let meta = tokio::fs::metadata(path)
                    .await
                    .map_err(|e| format!("cannot read the token file {}: {e}", path.display()))?;
                let stamp = Some((meta.modified().unwrap_or(SystemTime::UNIX_EPOCH), meta.len()));
                if let Some(hit) = self.cached(|c| c.stamp == stamp) {
                    return hit;
                }
                let text = tokio::fs::read_to_string(path)
                    .await
                    .map_err(|e| format!("cannot read the token file {}: {e}", path.display()));
                let table = text.and_then(|t| {
                    TokenTable::parse(&t).map_err(|e| format!("token file {}: {e}", path.display()))
                });
                self.store(stamp, &table);
                table
            }
            TokenSource::Secret { namespace, name } => {
                if let Some(hit) = self.cached(|c| c.read_at.elapsed() < SECRET_TTL) {
                    return hit;
                }
                let table = self.read_secret(namespace, name).await;
                self.store(None, &table);
                table
            }
        }
    }

    fn cached(&self, fresh: impl Fn(&Cached) -> bool) -> Option<Result<TokenTable, String>> {
        let cache = self.cache.lock().ok()?;
        cache.as_ref().filter(|c| fresh(c)).map(|c| c.table.clone())
    }

    fn store(&self, stamp: Option<(SystemTime, u64)>, table: &Result<TokenTable, String>) {
        if let Ok(mut cache) = self.cache.lock() {
            let changed = cache.as_ref().map(|c| &c.table) != Some(table);
            if changed {
                match table {
                    Ok(t) => info!(tokens = t.len(), "token table (re)loaded"),
                    Err(e) => {
                        warn!(error = %e, "token table unusable: every request is refused until it is fixed")
                    }
                }
            }
            *cache = Some(Cached { stamp, read_at: Instant::now(), table: table.clone() });
        }
    }

    async fn read_secret(&self, namespace: &str, name: &str) -> Result<TokenTable, String> {
        let client = self.client.clone().ok_or("no Kubernetes client to read the token Secret with")?;
        let secret = Api::<Secret>::namespaced(client, namespace)
            .get(name)
            .await
            .map_err(|e| format!("cannot read the token Secret {namespace}/{name}: {e}"))?;
        let bytes = secret
            .data
            .as_ref()
            .and_then(|d| d.get(SECRET_KEY))
            .map(|b| b.0.clone())
            .ok_or_else(|| format!("the token Secret {namespace}/{name} has no key {SECRET_KEY:?}"))?;
        let text = String::from_utf8(bytes)
            .map_err(|_| format!("the token Secret {namespace}/{name}: key {SECRET_KEY:?} is not UTF-8"))?;
        TokenTable::parse(&text).map_err(|e| format!("token Secret {namespace}/{name}: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> TokenTable {
        TokenTable::parse(&format!(
            "# account token-hash\n1234 {}\n\n5678 {}\n5678 {}\n",
            token_hash("alpha"),
            token_hash("beta"),
            token_hash("alpha").to_uppercase()
        ))
        .unwrap()
    }

    #[test]
    fn parses_lines_and_comments() {
        let t = table();
        assert_eq!(t.len(), 2);
        assert_eq!(t.accounts_of("alpha").unwrap().iter().collect::<Vec<_>>(), ["1234", "5678"]);
        assert!(t.accounts_of("gamma").is_none());
    }

    #[test]
    fn malformed_tables_name_the_line() {
        for (bad, what) in [
            ("1234", "line 1"),
            ("1234 abc", "SHA-256"),
            (&format!("\nUPPER {}", token_hash("x")), "line 2"),
            (&format!("a b {}", token_hash("x")), "3 fields"),
        ] {
            let err = TokenTable::parse(bad).unwrap_err();
            assert!(err.contains(what), "{bad:?}: {err}");
        }
    }

    #[test]
    fn bearer_tokens() {
        assert_eq!(bearer(Some("Bearer abc")), Some("abc"));
        assert_eq!(bearer(Some("bearer  abc ")), Some("abc"));
        assert_eq!(bearer(Some("Basic abc")), None);
        assert_eq!(bearer(Some("Bearer ")), None);
        assert_eq!(bearer(None), None);
    }

    #[test]
    fn paths_name_their_account() {
        assert_eq!(account_in_path("/client/v4/accounts/1234/workers/scripts/x"), Some("1234"));
        assert_eq!(account_in_path("/client/v4/accounts/1234"), Some("1234"));
        assert_eq!(account_in_path("/client/v4/memberships"), None);
        assert_eq!(account_in_path("/client/v4/accounts/"), None);
    }

    #[test]
    fn a_token_reaches_its_own_accounts_only() {
        let t = table();
        assert!(authorize(&t, Some("Bearer beta"), Some("5678")).is_ok());
        assert!(
            matches!(authorize(&t, Some("Bearer beta"), Some("1234")), Err(ApiError::Forbidden(a)) if a == "1234")
        );
        assert!(matches!(authorize(&t, None, Some("1234")), Err(ApiError::NoToken)));
        assert!(matches!(authorize(&t, Some("Bearer nope"), Some("1234")), Err(ApiError::BadToken)));
        let caller = authorize(&t, Some("Bearer alpha"), None).unwrap();
        assert_eq!(caller.accounts.len(), 2);
        assert_eq!(caller.token_hash, token_hash("alpha"));
    }

    #[test]
    fn account_ids() {
        for ok in ["1234", "023e105f4ecef8ad9ca31a8372d0c353", "a-b"] {
            assert!(check_account_id(ok).is_ok(), "{ok}");
        }
        for bad in ["", "-a", "A1", "a_b", "a/b", "..", &"a".repeat(51)] {
            assert!(check_account_id(bad).is_err(), "{bad}");
        }
    }
}
