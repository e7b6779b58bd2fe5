//! Cloudflare's response envelope (`success`, `errors[{code,message}]`, `messages`, `result`) and
//! the API's errors, each with the HTTP status and Cloudflare error code wrangler understands.

use axum::extract::rejection::JsonRejection;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use serde_json::{json, Value};

/// Cloudflare's "not found" code: wrangler reads it as "no such worker/version yet".
pub const NOT_FOUND: u32 = 10007;
/// Cloudflare's authentication error code.
pub const AUTH: u32 = 10000;
/// An upload or request body that is not acceptable (Cloudflare's validation error).
pub const INVALID: u32 = 10021;
/// The worker exceeds a size limit (Cloudflare's "script too large").
pub const TOO_LARGE: u32 = 10027;
/// Too many requests.
pub const RATE_LIMITED: u32 = 971;
/// Something behind the API failed.
pub const INTERNAL: u32 = 10013;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    NotFound(String),
    #[error("no API token: send `Authorization: Bearer <token>` (wrangler: set CLOUDFLARE_API_TOKEN)")]
    NoToken,
    #[error("the API token is not valid (unknown to this server, or revoked)")]
    BadToken,
    #[error("the API token may not access account {0:?}")]
    Forbidden(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    TooLarge(String),
    #[error(
        "too many requests for this token (limit {per_minute} per minute); try again in {retry_after_secs} s"
    )]
    RateLimited { per_minute: u32, retry_after_secs: u64 },
    /// The message is for the client; the details go to the log where the error is made.
    #[error("{0}")]
    Backend(String),
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::NoToken | ApiError::BadToken => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::Invalid(_) => StatusCode::BAD_REQUEST,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Backend(_) => StatusCode::BAD_GATEWAY,
        }
    }

    pub fn code(&self) -> u32 {
        match self {
            ApiError::NotFound(_) => NOT_FOUND,
            ApiError::NoToken | ApiError::BadToken | ApiError::Forbidden(_) => AUTH,
            ApiError::Invalid(_) => INVALID,
            ApiError::TooLarge(_) => TOO_LARGE,
            ApiError::RateLimited { .. } => RATE_LIMITED,
            ApiError::Backend(_) => INTERNAL,
        }
    }

    pub fn script_not_found(script: &str) -> ApiError {
        ApiError::NotFound(format!("worker {script:?} not found (deploy it first)"))
    }
}

/// The body of a failed request.
pub fn error_body(code: u32, message: &str) -> Value {
    json!({
        "success": false,
        "errors": [{"code": code, "message": message}],
        "messages": [],
        "result": null,
    })
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status(), Json(error_body(self.code(), &self.to_string()))).into_response();
        if let ApiError::RateLimited { retry_after_secs, .. } = self {
            if let Ok(value) = retry_after_secs.to_string().parse() {
                response.headers_mut().insert("retry-after", value);
            }
        }
        response
    }
}

/// A successful result in the envelope.
pub fn ok<T: Serialize>(result: T) -> Response {
    Json(json!({"success": true, "errors": [], "messages": [], "result": result})).into_response()
}

/// A list result with Cloudflare's paging information: everything on one page.
pub fn ok_list<T: Serialize>(items: Vec<T>) -> Response {
    let count = items.len();
    Json(json!({
        "success": true, "errors": [], "messages": [], "result": items,
        "result_info": {"page": 1, "per_page": count.max(1), "count": count, "total_count": count, "total_pages": 1},
    }))
    .into_response()
}

/// A JSON request body, or a Cloudflare-shaped error saying what is wrong with it.
pub fn json_body<T>(body: Result<Json<T>, JsonRejection>) -> Result<T, ApiError> {
    body.map(|Json(value)| value).map_err(|e| {
        ApiError::Invalid(format!("the request body is not what this call takes: {}", e.body_text()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_carry_cloudflare_codes_and_statuses() {
        let e = ApiError::script_not_found("hello");
        assert_eq!((e.status(), e.code()), (StatusCode::NOT_FOUND, 10007));
        assert_eq!(ApiError::NoToken.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(ApiError::Forbidden("b".into()).status(), StatusCode::FORBIDDEN);
        let body = error_body(10007, "x");
        assert_eq!(body["success"], false);
        assert_eq!(body["errors"][0]["code"], 10007);
        assert_eq!(body["errors"][0]["message"], "x");
    }
}
