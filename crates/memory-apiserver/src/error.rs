//! Errors as the real API server reports them: a `Status` object with its reason, code, details and
//! the real message wording, because kubectl prints the message and clients branch on the reason.

use serde_json::{json, Value};

use crate::resource::ResourceDef;

/// One field-level failure inside an `Invalid` (422) or conflict error.
#[derive(Debug, Clone, PartialEq)]
pub struct Cause {
    pub reason: &'static str,
    pub field: String,
    /// The part after `field: `, e.g. `Required value`.
    pub body: String,
}

impl Cause {
    pub fn required(field: &str) -> Cause {
        Cause { reason: "FieldValueRequired", field: field.to_string(), body: "Required value".to_string() }
    }

    pub fn invalid(field: &str, value: &str, detail: &str) -> Cause {
        Cause {
            reason: "FieldValueInvalid",
            field: field.to_string(),
            body: format!("Invalid value: {value}: {detail}"),
        }
    }

    pub fn with_reason(reason: &'static str, field: &str, body: String) -> Cause {
        Cause { reason, field: field.to_string(), body }
    }

    pub fn message(&self) -> String {
        if self.field.is_empty() {
            // The real server prints a rule on the root schema with a nil field path.
            format!("<nil>: {}", self.body)
        } else {
            format!("{}: {}", self.field, self.body)
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
    pub details: Option<Value>,
}

impl ApiError {
    fn new(code: u16, reason: &'static str, message: String) -> ApiError {
        ApiError { code, reason, message, details: None }
    }

    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(400, "BadRequest", message.into())
    }

    pub fn not_found(def: &ResourceDef, name: &str) -> ApiError {
        ApiError {
            details: Some(json!({"name": name, "group": def.group, "kind": def.plural})),
            ..ApiError::new(404, "NotFound", format!("{} \"{name}\" not found", def.group_resource()))
        }
    }

    /// A path the server does not serve at all (unknown group, version or resource).
    pub fn path_not_found() -> ApiError {
        ApiError::new(404, "NotFound", "the server could not find the requested resource".to_string())
    }

    pub fn namespace_not_found(namespace: &str) -> ApiError {
        ApiError {
            details: Some(json!({"name": namespace, "kind": "namespaces"})),
            ..ApiError::new(404, "NotFound", format!("namespaces \"{namespace}\" not found"))
        }
    }

    pub fn already_exists(def: &ResourceDef, name: &str) -> ApiError {
        ApiError {
            details: Some(json!({"name": name, "group": def.group, "kind": def.plural})),
            ..ApiError::new(
                409,
                "AlreadyExists",
                format!("{} \"{name}\" already exists", def.group_resource()),
            )
        }
    }

    pub fn conflict(def: &ResourceDef, name: &str, why: &str) -> ApiError {
        ApiError {
            details: Some(json!({"name": name, "group": def.group, "kind": def.plural})),
            ..ApiError::new(
                409,
                "Conflict",
                format!("Operation cannot be fulfilled on {} \"{name}\": {why}", def.group_resource()),
            )
        }
    }

    pub fn stale(def: &ResourceDef, name: &str) -> ApiError {
        ApiError::conflict(
            def,
            name,
            "the object has been modified; please apply your changes to the latest version and try again",
        )
    }

    /// Server-side apply conflicts: the message lists fields per manager, like the real server.
    pub fn apply_conflict(message: String, causes: Vec<Cause>) -> ApiError {
        let causes: Vec<Value> =
            causes.iter().map(|c| json!({"reason": c.reason, "message": c.body, "field": c.field})).collect();
        ApiError { details: Some(json!({"causes": causes})), ..ApiError::new(409, "Conflict", message) }
    }

    pub fn invalid(def: &ResourceDef, name: &str, causes: Vec<Cause>) -> ApiError {
        let qualified =
            if def.group.is_empty() { def.kind.clone() } else { format!("{}.{}", def.kind, def.group) };
        let list = if causes.len() == 1 {
            causes[0].message()
        } else {
            format!("[{}]", causes.iter().map(Cause::message).collect::<Vec<_>>().join(", "))
        };
        let json_causes: Vec<Value> =
            causes.iter().map(|c| json!({"reason": c.reason, "message": c.body, "field": c.field})).collect();
        ApiError {
            details: Some(json!({"name": name, "group": def.group, "kind": def.kind, "causes": json_causes})),
            ..ApiError::new(422, "Invalid", format!("{qualified} \"{name}\" is invalid: {list}"))
        }
    }

    pub fn method_not_allowed(message: impl Into<String>) -> ApiError {
        ApiError::new(405, "MethodNotAllowed", message.into())
    }

    pub fn unsupported_media_type(content_type: &str) -> ApiError {
        ApiError::new(415, "UnsupportedMediaType", format!("the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml; got {content_type:?}"))
    }

    pub fn gone(message: impl Into<String>) -> ApiError {
        ApiError::new(410, "Expired", message.into())
    }

    /// A well-formed request that cannot be carried out, e.g. a JSON patch whose `test` fails.
    pub fn unprocessable(message: impl Into<String>) -> ApiError {
        ApiError::new(422, "Invalid", message.into())
    }

    /// A request without the server's bearer token, answered as the real server answers it.
    pub fn unauthorized() -> ApiError {
        ApiError::new(401, "Unauthorized", "Unauthorized".to_string())
    }

    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(500, "InternalError", message.into())
    }

    pub fn to_status(&self) -> Value {
        let mut status = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        });
        if let Some(details) = &self.details {
            status["details"] = details.clone();
        }
        status
    }
}

pub type ApiResult<T> = Result<T, ApiError>;
