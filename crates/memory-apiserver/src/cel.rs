//! `x-kubernetes-validations` rules, evaluated with the cel-interpreter crate at every schema node
//! that declares them, with `self` bound to the node's value and, for transition rules, `oldSelf`
//! to the previous value at the same place (on update only, as the real server does).
//!
//! Approximations: a rule is a transition rule when its text mentions `oldSelf`; old values are
//! correlated through object properties only (not into list items); the Kubernetes CEL extension
//! libraries (quantity, url, ip ...) are absent.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock};

use cel_interpreter::objects::{Key, Map as CelMap};
use cel_interpreter::{Context, Program, Value as Cel};
use serde_json::Value;

use crate::compiled::Compiled;
use crate::error::Cause;
use crate::schema::join;

pub fn to_cel(value: &Value) -> Cel {
    match value {
        Value::Null => Cel::Null,
        Value::Bool(b) => Cel::Bool(*b),
        Value::Number(n) => match (n.as_i64(), n.as_u64()) {
            (Some(i), _) => Cel::Int(i),
            (None, Some(u)) => Cel::UInt(u),
            _ => Cel::Float(n.as_f64().unwrap_or_default()),
        },
        Value::String(s) => Cel::String(Arc::new(s.clone())),
        Value::Array(items) => Cel::List(Arc::new(items.iter().map(to_cel).collect())),
        Value::Object(map) => {
            let entries: HashMap<Key, Cel> =
                map.iter().map(|(k, v)| (Key::String(Arc::new(k.clone())), to_cel(v))).collect();
            Cel::Map(CelMap { map: Arc::new(entries) })
        }
    }
}

fn schema_type(schema: &Value, value: &Value) -> String {
    match schema["type"].as_str() {
        Some(t) => t.to_string(),
        None if value.is_string() => "string".to_string(),
        None => "object".to_string(),
    }
}

enum Outcome {
    Pass,
    Fail,
    Error(String),
}

static PROGRAMS: LazyLock<Compiled<Program>> = LazyLock::new(Compiled::new);

fn compiled(rule: &str) -> Result<Arc<Program>, String> {
    PROGRAMS.get(rule, Program::compile)
}

fn evaluate(rule: &str, value: &Value, old: Option<&Value>) -> Outcome {
    let program = match compiled(rule) {
        Ok(p) => p,
        Err(e) => return Outcome::Error(format!("compilation failed: {e}")),
    };
    let mut context = Context::default();
    context.add_variable_from_value("self", to_cel(value));
    if let Some(old) = old {
        context.add_variable_from_value("oldSelf", to_cel(old));
    }
    match program.execute(&context) {
        Ok(Cel::Bool(true)) => Outcome::Pass,
        Ok(Cel::Bool(false)) => Outcome::Fail,
        Ok(other) => Outcome::Error(format!("rule did not evaluate to a bool: {other:?}")),
        Err(e) => Outcome::Error(e.to_string()),
    }
}

fn message_for(rule: &Value, value: &Value, old: Option<&Value>) -> String {
    if let Some(expression) = rule["messageExpression"].as_str() {
        if let Ok(program) = compiled(expression) {
            let mut context = Context::default();
            context.add_variable_from_value("self", to_cel(value));
            if let Some(old) = old {
                context.add_variable_from_value("oldSelf", to_cel(old));
            }
            if let Ok(Cel::String(s)) = program.execute(&context) {
                return s.to_string();
            }
        }
    }
    match rule["message"].as_str() {
        Some(m) => m.to_string(),
        None => format!("failed rule: {}", rule["rule"].as_str().unwrap_or_default()),
    }
}

fn check_rules(schema: &Value, value: &Value, old: Option<&Value>, path: &str, causes: &mut Vec<Cause>) {
    for rule in schema["x-kubernetes-validations"].as_array().into_iter().flatten() {
        let Some(text) = rule["rule"].as_str() else { continue };
        let transition = text.contains("oldSelf");
        if transition && old.is_none() {
            continue;
        }
        let old = if transition { old } else { None };
        let field = match rule["fieldPath"].as_str() {
            Some(extra) => join(path, extra.trim_start_matches('.')),
            None => path.to_string(),
        };
        let body = match evaluate(text, value, old) {
            Outcome::Pass => continue,
            Outcome::Fail => message_for(rule, value, old),
            Outcome::Error(e) => e,
        };
        let cause = match rule["reason"].as_str() {
            Some("FieldValueForbidden") => {
                Cause::with_reason("FieldValueForbidden", &field, format!("Forbidden: {body}"))
            }
            Some("FieldValueRequired") => {
                Cause::with_reason("FieldValueRequired", &field, format!("Required value: {body}"))
            }
            Some("FieldValueDuplicate") => {
                Cause::with_reason("FieldValueDuplicate", &field, format!("Duplicate value: {body}"))
            }
            _ => Cause::invalid(&field, &format!("{:?}", schema_type(schema, value)), &body),
        };
        causes.push(cause);
    }
}

/// Evaluates every rule in the schema tree against `value` (and `old`, when updating).
pub fn validate(schema: &Value, value: &Value, old: Option<&Value>, path: &str, causes: &mut Vec<Cause>) {
    check_rules(schema, value, old, path, causes);
    match value {
        Value::Object(map) => {
            for (key, child) in map {
                if let Some(child_schema) = crate::schema::property_schema(schema, path, key) {
                    let old_child = old.and_then(|o| o.get(key));
                    validate(child_schema, child, old_child, &join(path, key), causes);
                }
            }
        }
        Value::Array(items) => {
            if let Some(item_schema) = schema.get("items") {
                for (i, item) in items.iter().enumerate() {
                    validate(item_schema, item, None, &format!("{path}[{i}]"), causes);
                }
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn run(schema: &Value, value: Value, old: Option<Value>) -> Vec<String> {
        let mut causes = Vec::new();
        validate(schema, &value, old.as_ref(), "", &mut causes);
        causes.iter().map(Cause::message).collect()
    }

    #[test]
    fn uniqueness_rule() {
        let schema = json!({"type": "object", "properties": {"workers": {"type": "array",
            "x-kubernetes-validations": [{"rule": "self.all(w, self.exists_one(x, x.workerNumber == w.workerNumber))", "message": "workerNumber must be unique"}],
            "items": {"type": "object", "properties": {"workerNumber": {"type": "integer"}}}}}});
        assert!(run(&schema, json!({"workers": [{"workerNumber": 1}, {"workerNumber": 2}]}), None).is_empty());
        assert_eq!(
            run(&schema, json!({"workers": [{"workerNumber": 1}, {"workerNumber": 1}]}), None),
            vec!["workers: Invalid value: \"array\": workerNumber must be unique"]
        );
    }

    #[test]
    fn immutability_is_a_transition_rule() {
        let schema = json!({"type": "object", "properties": {"spec": {"type": "object",
            "x-kubernetes-validations": [{"rule": "self == oldSelf", "message": "spec is immutable"}],
            "properties": {"a": {"type": "string"}}}}});
        assert!(run(&schema, json!({"spec": {"a": "x"}}), None).is_empty());
        assert!(run(&schema, json!({"spec": {"a": "x"}}), Some(json!({"spec": {"a": "x"}}))).is_empty());
        assert_eq!(
            run(&schema, json!({"spec": {"a": "y"}}), Some(json!({"spec": {"a": "x"}}))),
            vec!["spec: Invalid value: \"object\": spec is immutable"]
        );
    }

    #[test]
    fn default_message_and_comparisons() {
        let schema = json!({"type": "object", "x-kubernetes-validations": [{"rule": "self.min <= self.max"}],
            "properties": {"min": {"type": "integer"}, "max": {"type": "integer"}}});
        let got = run(&schema, json!({"min": 5, "max": 1}), None);
        assert_eq!(got, vec!["<nil>: Invalid value: \"object\": failed rule: self.min <= self.max"]);
    }
}
