//! Structural-schema handling of custom resources, in the order the real server applies it:
//! pruning of unknown fields, defaulting, then validation (types, required, enum, bounds, lengths,
//! pattern, items) whose causes are all collected with the real paths and wording.

use serde_json::{Number, Value};

use crate::error::Cause;

/// `spec.workers[0].name` style paths, as the real server prints them.
pub fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

fn preserves_unknown(schema: &Value) -> bool {
    schema["x-kubernetes-preserve-unknown-fields"] == Value::Bool(true)
}

fn is_embedded(schema: &Value) -> bool {
    schema["x-kubernetes-embedded-resource"] == Value::Bool(true)
}

/// Removes fields the schema does not declare, recording their paths (for Strict field validation).
/// `root` keeps apiVersion, kind and metadata, which every object carries whatever its schema says.
pub fn prune(schema: &Value, value: &mut Value, path: &str, root: bool, unknown: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            let properties = schema.get("properties").and_then(Value::as_object);
            let additional = schema.get("additionalProperties");
            let keep_all = preserves_unknown(schema);
            let keys: Vec<String> = map.keys().cloned().collect();
            for key in keys {
                let child_path = join(path, &key);
                if (root || is_embedded(schema)) && matches!(key.as_str(), "apiVersion" | "kind" | "metadata")
                {
                    continue;
                }
                let child_schema =
                    properties.and_then(|p| p.get(&key)).or_else(|| additional.filter(|a| a.is_object()));
                match child_schema {
                    Some(child) => {
                        if let Some(v) = map.get_mut(&key) {
                            prune(child, v, &child_path, false, unknown);
                        }
                    }
                    None if keep_all || additional == Some(&Value::Bool(true)) => {}
                    None => {
                        map.remove(&key);
                        unknown.push(child_path);
                    }
                }
            }
        }
        Value::Array(items) => {
            if let Some(item_schema) = schema.get("items") {
                for (i, item) in items.iter_mut().enumerate() {
                    prune(item_schema, item, &format!("{path}[{i}]"), false, unknown);
                }
            }
        }
        _ => {}
    }
}

/// Fills in `default` values of absent properties, recursively, as the real server does on create,
/// update and read.
pub fn apply_defaults(schema: &Value, value: &mut Value) {
    match value {
        Value::Object(map) => {
            if let Some(properties) = schema.get("properties").and_then(Value::as_object) {
                for (key, child) in properties {
                    if !map.contains_key(key) {
                        if let Some(default) = child.get("default") {
                            map.insert(key.clone(), default.clone());
                        }
                    }
                    if let Some(v) = map.get_mut(key) {
                        apply_defaults(child, v);
                    }
                }
            } else if let Some(additional) = schema.get("additionalProperties").filter(|a| a.is_object()) {
                for v in map.values_mut() {
                    apply_defaults(additional, v);
                }
            }
        }
        Value::Array(items) => {
            if let Some(item_schema) = schema.get("items") {
                for item in items {
                    apply_defaults(item_schema, item);
                }
            }
        }
        _ => {}
    }
}

/// How a value is shown after `Invalid value: ` in messages.
pub fn show(value: &Value) -> String {
    match value {
        Value::String(s) => format!("{s:?}"),
        Value::Object(_) => "\"object\"".to_string(),
        Value::Array(_) => "\"array\"".to_string(),
        Value::Null => "\"null\"".to_string(),
        other => other.to_string(),
    }
}

fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn type_matches(expected: &str, value: &Value) -> bool {
    match (expected, value) {
        ("object", Value::Object(_)) | ("array", Value::Array(_)) | ("string", Value::String(_)) => true,
        ("boolean", Value::Bool(_)) => true,
        ("integer", Value::Number(n)) => {
            n.is_i64() || n.is_u64() || n.as_f64().is_some_and(|f| f.fract() == 0.0)
        }
        ("number", Value::Number(_)) => true,
        _ => false,
    }
}

fn number(n: &Value) -> Option<f64> {
    n.as_f64()
}

fn show_number(n: &Number) -> String {
    n.to_string()
}

/// The schema of property `key` of the object at `path`: its own, else `additionalProperties`.
/// None for the root's `metadata`, which the server checks itself rather than by the CRD's schema.
pub fn property_schema<'a>(schema: &'a Value, path: &str, key: &str) -> Option<&'a Value> {
    if path.is_empty() && key == "metadata" {
        return None;
    }
    let additional = schema.get("additionalProperties").filter(|a| a.is_object());
    schema.get("properties").and_then(|p| p.get(key)).or(additional)
}

pub fn validate(schema: &Value, value: &Value, path: &str, causes: &mut Vec<Cause>) {
    if value.is_null() {
        if schema["nullable"] == Value::Bool(true) {
            return;
        }
        if let Some(t) = schema["type"].as_str() {
            causes.push(Cause::invalid(
                path,
                "\"null\"",
                &format!("{path} in body must be of type {t}: \"null\""),
            ));
        }
        return;
    }
    if schema["x-kubernetes-int-or-string"] == Value::Bool(true) {
        if !(value.is_string() || type_matches("integer", value)) {
            causes.push(Cause::invalid(
                path,
                &show(value),
                &format!("{path} in body must be of type integer-or-string: {:?}", type_name(value)),
            ));
            return;
        }
    } else if let Some(expected) = schema["type"].as_str() {
        if !type_matches(expected, value) {
            let got = type_name(value);
            causes.push(Cause::invalid(
                path,
                &format!("{got:?}"),
                &format!("{path} in body must be of type {expected}: {got:?}"),
            ));
            return;
        }
    }
    if let Some(options) = schema["enum"].as_array() {
        if !options.contains(value) {
            let supported: Vec<String> = options.iter().map(|o| o.to_string()).collect();
            causes.push(Cause::with_reason(
                "FieldValueNotSupported",
                path,
                format!("Unsupported value: {}: supported values: {}", value, supported.join(", ")),
            ));
        }
    }
    match value {
        Value::Number(n) => validate_number(schema, n, path, causes),
        Value::String(s) => validate_string(schema, s, path, causes),
        Value::Array(items) => {
            let len = items.len() as u64;
            if let Some(min) = schema["minItems"].as_u64().filter(|m| len < *m) {
                causes.push(Cause::invalid(
                    path,
                    &show(value),
                    &format!("{path} in body should have at least {min} items"),
                ));
            }
            if let Some(max) = schema["maxItems"].as_u64().filter(|m| len > *m) {
                causes.push(Cause::with_reason(
                    "FieldValueTooMany",
                    path,
                    format!("Too many: {len}: must have at most {max} items"),
                ));
            }
            if let Some(item_schema) = schema.get("items") {
                for (i, item) in items.iter().enumerate() {
                    validate(item_schema, item, &format!("{path}[{i}]"), causes);
                }
            }
        }
        Value::Object(map) => {
            for required in schema["required"].as_array().into_iter().flatten() {
                if let Some(key) = required.as_str() {
                    if !map.contains_key(key) {
                        causes.push(Cause::required(&join(path, key)));
                    }
                }
            }
            for (key, child) in map {
                if let Some(child_schema) = property_schema(schema, path, key) {
                    validate(child_schema, child, &join(path, key), causes);
                }
            }
            let count = map.len() as u64;
            if let Some(min) = schema["minProperties"].as_u64().filter(|m| count < *m) {
                causes.push(Cause::invalid(
                    path,
                    &show(value),
                    &format!("{path} in body should have at least {min} properties"),
                ));
            }
            if let Some(max) = schema["maxProperties"].as_u64().filter(|m| count > *m) {
                causes.push(Cause::with_reason(
                    "FieldValueTooMany",
                    path,
                    format!("Too many: {count}: must have at most {max} items"),
                ));
            }
        }
        _ => {}
    }
}

fn validate_number(schema: &Value, n: &Number, path: &str, causes: &mut Vec<Cause>) {
    let Some(v) = n.as_f64() else { return };
    let shown = show_number(n);
    if let Some(min) = schema.get("minimum").and_then(number) {
        let exclusive = schema["exclusiveMinimum"] == Value::Bool(true);
        if v < min || (exclusive && v == min) {
            let relation = if exclusive { "greater than" } else { "greater than or equal to" };
            causes.push(Cause::invalid(
                path,
                &shown,
                &format!("{path} in body should be {relation} {}", schema["minimum"]),
            ));
        }
    }
    if let Some(max) = schema.get("maximum").and_then(number) {
        let exclusive = schema["exclusiveMaximum"] == Value::Bool(true);
        if v > max || (exclusive && v == max) {
            let relation = if exclusive { "less than" } else { "less than or equal to" };
            causes.push(Cause::invalid(
                path,
                &shown,
                &format!("{path} in body should be {relation} {}", schema["maximum"]),
            ));
        }
    }
    let (low, high) = match schema["format"].as_str() {
        Some("int32") => (i32::MIN as f64, i32::MAX as f64),
        _ => (f64::MIN, f64::MAX),
    };
    if v < low || v > high {
        causes.push(Cause::invalid(path, &shown, &format!("{path} in body must be of type int32: {shown}")));
    }
}

fn validate_string(schema: &Value, s: &str, path: &str, causes: &mut Vec<Cause>) {
    let len = s.chars().count() as u64;
    let shown = format!("{s:?}");
    if let Some(min) = schema["minLength"].as_u64().filter(|m| len < *m) {
        causes.push(Cause::invalid(
            path,
            &shown,
            &format!("{path} in body should be at least {min} chars long"),
        ));
    }
    if let Some(max) = schema["maxLength"].as_u64().filter(|m| len > *m) {
        causes.push(Cause::with_reason(
            "FieldValueTooLong",
            path,
            format!("Too long: may not be more than {max} bytes"),
        ));
    }
    if let Some(pattern) = schema["pattern"].as_str() {
        match compiled_pattern(pattern) {
            Ok(re) if !re.is_match(s) => {
                causes.push(Cause::invalid(
                    path,
                    &shown,
                    &format!("{path} in body should match '{pattern}'"),
                ));
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(%pattern, error = %e, "schema pattern does not compile; not checked"),
        }
    }
}

/// DNS-1123 subdomain: the rule for custom resource names and most built-in names.
fn compiled_pattern(pattern: &str) -> Result<std::sync::Arc<regex::Regex>, String> {
    static PATTERNS: std::sync::LazyLock<crate::compiled::Compiled<regex::Regex>> =
        std::sync::LazyLock::new(crate::compiled::Compiled::new);
    PATTERNS.get(pattern, regex::Regex::new)
}

pub fn dns_subdomain_errors(name: &str) -> Option<String> {
    let re_ok = name.len() <= 253
        && !name.is_empty()
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        });
    if re_ok {
        None
    } else if name.len() > 253 {
        Some("must be no more than 253 characters".to_string())
    } else {
        Some(
            "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and \
             must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is \
             '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')"
                .to_string(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn causes(schema: Value, value: Value) -> Vec<String> {
        let mut out = Vec::new();
        validate(&schema, &value, "", &mut out);
        out.iter().map(Cause::message).collect()
    }

    #[test]
    fn real_wording() {
        let schema = json!({"type": "object", "properties": {"spec": {"type": "object", "required": ["name"], "properties": {
            "limit": {"type": "integer", "minimum": 0},
            "mode": {"type": "string", "enum": ["a", "b"]},
            "name": {"type": "string", "pattern": "^[a-z]+$"}
        }}}});
        let got = causes(schema, json!({"spec": {"limit": -1, "mode": "x"}}));
        assert_eq!(
            got,
            vec![
                "spec.name: Required value",
                "spec.limit: Invalid value: -1: spec.limit in body should be greater than or equal to 0",
                "spec.mode: Unsupported value: \"x\": supported values: \"a\", \"b\"",
            ]
        );
    }

    #[test]
    fn prune_and_default() {
        let schema = json!({"type": "object", "properties": {"spec": {"type": "object", "properties": {
            "keep": {"type": "string", "default": "d"},
            "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}
        }}}});
        let mut value = json!({"apiVersion": "x/v1", "kind": "K", "metadata": {"name": "a"}, "spec": {"drop": 1, "free": {"any": 1}}});
        let mut unknown = Vec::new();
        prune(&schema, &mut value, "", true, &mut unknown);
        apply_defaults(&schema, &mut value);
        assert_eq!(unknown, vec!["spec.drop"]);
        assert_eq!(value["spec"], json!({"keep": "d", "free": {"any": 1}}));
    }
}
