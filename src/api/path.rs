//! Every path parameter of every route, checked once, before anything is read or written.
//!
//! A name from a path ends up in S3 keys and Kubernetes object names. The S3 server resolves `..`
//! in keys, so an unchecked script name such as `../5678/bworker` once read another account's
//! version with a token of one's own account. So:
//! - [`check_path`] runs on every route of the table (a `route_layer`), before authentication: it
//!   checks each parameter by its name and refuses a parameter it has no rule for, so a new route
//!   cannot forget (and `every_parameter_of_the_route_table_has_a_rule` fails at once);
//! - handlers take the checked names as types ([`AccountId`], [`ScriptName`], [`VersionId`],
//!   [`SecretKey`], [`ZoneId`]) through [`ScriptPath`] and its siblings, and the store builds keys
//!   only from those types (`store::ObjectKey`).

use std::fmt;

use axum::extract::rejection::RawPathParamsRejection;
use axum::extract::{FromRequestParts, RawPathParams, Request};
use axum::http::request::Parts;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::auth::check_account_id;
use super::envelope::ApiError;
use super::secrets::check_secret_key;
use crate::worker::names::check_worker_name;

/// The parameters a route may name. Each has its rule in [`CheckedPath::from_params`].
pub const PARAMETERS: [&str; 5] = ["account_id", "script_name", "version_id", "secret_name", "zone_id"];

macro_rules! checked_name {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(String);

        /// As the string it holds, so that messages quote the name and nothing else.
        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&self.0, f)
            }
        }

        impl $name {
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

checked_name!(
    /// An account id: a DNS-1123 label (see `auth::check_account_id`).
    AccountId
);
checked_name!(
    /// A worker (script) name: a DNS-1123 label, as uploads require.
    ScriptName
);
checked_name!(
    /// A version id: a UUID in its canonical form (lower-case, hyphenated).
    VersionId
);
checked_name!(
    /// A secret's name: letters, digits and `_` (it becomes an environment variable).
    SecretKey
);
checked_name!(
    /// A zone id: 32 lower-case hex digits, as Cloudflare's.
    ZoneId
);

impl AccountId {
    pub fn parse(text: &str) -> Result<AccountId, ApiError> {
        check_account_id(text).map_err(ApiError::Invalid)?;
        Ok(AccountId(text.to_owned()))
    }
}

impl ScriptName {
    pub fn parse(text: &str) -> Result<ScriptName, ApiError> {
        check_worker_name(text).map_err(ApiError::Invalid)?;
        Ok(ScriptName(text.to_owned()))
    }
}

impl VersionId {
    pub fn parse(text: &str) -> Result<VersionId, ApiError> {
        match uuid::Uuid::parse_str(text) {
            Ok(id) if id.hyphenated().to_string() == text => Ok(VersionId(text.to_owned())),
            _ => Err(ApiError::Invalid(format!(
                "version id {text:?} is not a UUID (lower-case, hyphenated, as wrangler prints them)"
            ))),
        }
    }

    /// A fresh id for an upload.
    pub fn new_random() -> VersionId {
        VersionId(uuid::Uuid::new_v4().hyphenated().to_string())
    }
}

impl SecretKey {
    pub fn parse(text: &str) -> Result<SecretKey, ApiError> {
        check_secret_key(text)?;
        Ok(SecretKey(text.to_owned()))
    }
}

impl ZoneId {
    pub fn parse(text: &str) -> Result<ZoneId, ApiError> {
        let valid = text.len() == 32 && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        if !valid {
            return Err(ApiError::Invalid(format!("zone id {text:?} is not 32 lower-case hex digits")));
        }
        Ok(ZoneId(text.to_owned()))
    }

    /// The placeholder zone this server answers for a host name (see `scripts::zones`).
    pub fn for_host(host: &str) -> ZoneId {
        use sha2::{Digest as _, Sha256};
        ZoneId(hex::encode(&Sha256::digest(format!("zone:{host}"))[..16]))
    }
}

/// The checked parameters of one request, put in its extensions by [`check_path`].
#[derive(Clone, Debug, Default)]
pub struct CheckedPath {
    pub account: Option<AccountId>,
    pub script: Option<ScriptName>,
    pub version: Option<VersionId>,
    pub secret: Option<SecretKey>,
    pub zone: Option<ZoneId>,
}

impl CheckedPath {
    /// Checks every parameter (percent-decoded) by its name; a parameter without a rule is refused.
    pub fn from_params<'a>(params: impl IntoIterator<Item = (&'a str, &'a str)>) -> Result<Self, ApiError> {
        let mut checked = CheckedPath::default();
        for (name, value) in params {
            match name {
                "account_id" => checked.account = Some(AccountId::parse(value)?),
                "script_name" => checked.script = Some(ScriptName::parse(value)?),
                "version_id" => checked.version = Some(VersionId::parse(value)?),
                "secret_name" => checked.secret = Some(SecretKey::parse(value)?),
                "zone_id" => checked.zone = Some(ZoneId::parse(value)?),
                other => {
                    tracing::error!(parameter = other, "a route names a path parameter that has no rule");
                    return Err(ApiError::Invalid(format!(
                        "this route's path parameter {other:?} has no rule on this server; refused"
                    )));
                }
            }
        }
        Ok(checked)
    }
}

/// Middleware over the whole route table: the request goes on only with every path parameter
/// checked, and carries them as [`CheckedPath`].
pub async fn check_path(
    params: Result<RawPathParams, RawPathParamsRejection>,
    mut request: Request,
    next: Next,
) -> Response {
    let checked = params
        .map_err(|e| ApiError::Invalid(format!("the request path is not valid: {}", e.body_text())))
        .and_then(|params| CheckedPath::from_params(&params));
    match checked {
        Ok(checked) => {
            request.extensions_mut().insert(checked);
            next.run(request).await
        }
        Err(e) => e.into_response(),
    }
}

fn checked(parts: &Parts) -> Result<&CheckedPath, ApiError> {
    parts.extensions.get::<CheckedPath>().ok_or_else(|| {
        tracing::error!("a handler asked for checked path names on a route without check_path");
        ApiError::Backend("the server's route table is misconfigured; its log says why".into())
    })
}

fn required<T: Clone>(value: &Option<T>, what: &str) -> Result<T, ApiError> {
    value.clone().ok_or_else(|| {
        tracing::error!(parameter = what, "a handler asked for a path parameter its route does not have");
        ApiError::Backend("the server's route table is misconfigured; its log says why".into())
    })
}

/// `/accounts/{account_id}/...`
pub struct AccountPath(pub AccountId);

/// `/accounts/{account_id}/workers/.../{script_name}/...`
pub struct ScriptPath {
    pub account: AccountId,
    pub script: ScriptName,
}

/// `.../scripts/{script_name}/versions/{version_id}`
pub struct VersionPath {
    pub account: AccountId,
    pub script: ScriptName,
    pub version: VersionId,
}

/// `.../scripts/{script_name}/secrets/{secret_name}`
pub struct SecretPath {
    pub account: AccountId,
    pub script: ScriptName,
    pub secret: SecretKey,
}

/// `/zones/{zone_id}/...`
pub struct ZonePath(pub ZoneId);

impl<S: Send + Sync> FromRequestParts<S> for AccountPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        Ok(AccountPath(required(&checked(parts)?.account, "account_id")?))
    }
}

impl<S: Send + Sync> FromRequestParts<S> for ScriptPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        let path = checked(parts)?;
        Ok(ScriptPath {
            account: required(&path.account, "account_id")?,
            script: required(&path.script, "script_name")?,
        })
    }
}

impl<S: Send + Sync> FromRequestParts<S> for VersionPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        let path = checked(parts)?;
        Ok(VersionPath {
            account: required(&path.account, "account_id")?,
            script: required(&path.script, "script_name")?,
            version: required(&path.version, "version_id")?,
        })
    }
}

impl<S: Send + Sync> FromRequestParts<S> for SecretPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        let path = checked(parts)?;
        Ok(SecretPath {
            account: required(&path.account, "account_id")?,
            script: required(&path.script, "script_name")?,
            secret: required(&path.secret, "secret_name")?,
        })
    }
}

impl<S: Send + Sync> FromRequestParts<S> for ZonePath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        Ok(ZonePath(required(&checked(parts)?.zone, "zone_id")?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const V1: &str = "0b8a5b8e-6f4e-4c39-9a57-2c4d2b7d8f10";

    #[test]
    fn good_parameters_pass_and_come_out_typed() {
        let path = CheckedPath::from_params([
            ("account_id", "1234"),
            ("script_name", "hello"),
            ("version_id", V1),
            ("secret_name", "API_KEY"),
            ("zone_id", ZoneId::for_host("example.com").as_str()),
        ])
        .unwrap();
        assert_eq!(path.account.unwrap().as_str(), "1234");
        assert_eq!(path.script.unwrap().as_str(), "hello");
        assert_eq!(path.version.unwrap().as_str(), V1);
        assert_eq!(path.secret.unwrap().as_str(), "API_KEY");
        assert_eq!(path.zone.unwrap().as_str().len(), 32);
    }

    #[test]
    fn traversal_and_odd_bytes_are_refused_in_every_parameter() {
        let hostile = ["..", "../5678/bworker", "a/b", "%2e%2e", "a\0b", "\u{2024}\u{2024}", "", " ", "a b"];
        for name in PARAMETERS {
            for value in hostile {
                let r = CheckedPath::from_params([(name, value)]);
                assert!(matches!(r, Err(ApiError::Invalid(_))), "{name}={value:?} passed");
            }
        }
        for (name, value) in [("version_id", &V1.to_uppercase()), ("version_id", &V1.replace('-', ""))] {
            assert!(CheckedPath::from_params([(name, value.as_str())]).is_err(), "{value}");
        }
    }

    #[test]
    fn a_parameter_without_a_rule_is_refused() {
        let r = CheckedPath::from_params([("bucket_name", "x")]);
        assert!(matches!(r, Err(ApiError::Invalid(m)) if m.contains("bucket_name")));
    }

    #[test]
    fn every_parameter_of_the_route_table_has_a_rule() {
        for route in super::super::routes() {
            for segment in route.path.split('/') {
                if let Some(name) = segment.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                    assert!(
                        PARAMETERS.contains(&name),
                        "{} {}: {name} has no rule",
                        route.method,
                        route.path
                    );
                }
            }
        }
    }
}
