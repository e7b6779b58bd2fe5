//! meta.k8s.io/v1 Table responses, which `kubectl get` asks for: NAME plus the CRD's
//! additionalPrinterColumns (or AGE when it declares none, as the real server defaults), with the
//! simple JSONPath forms printer columns use.

use serde_json::{json, Value};

use crate::resource::ResourceDef;

pub fn wants_table(accept: &str) -> bool {
    accept.split(',').next().is_some_and(|first| first.contains("as=Table"))
}

struct Column {
    name: String,
    kind: String,
    format: String,
    description: String,
    priority: i64,
    path: String,
}

fn columns(def: &ResourceDef) -> Vec<Column> {
    let mut out = vec![Column {
        name: "Name".to_string(),
        kind: "string".to_string(),
        format: "name".to_string(),
        description: "Name must be unique within a namespace.".to_string(),
        priority: 0,
        path: ".metadata.name".to_string(),
    }];
    let age = Column {
        name: "Age".to_string(),
        kind: "date".to_string(),
        format: String::new(),
        description:
            "CreationTimestamp is a timestamp representing the server time when this object was created."
                .to_string(),
        priority: 0,
        path: ".metadata.creationTimestamp".to_string(),
    };
    if def.printer_columns.is_empty() {
        out.push(age);
        return out;
    }
    for c in &def.printer_columns {
        out.push(Column {
            name: c["name"].as_str().unwrap_or_default().to_string(),
            kind: c["type"].as_str().unwrap_or("string").to_string(),
            format: c["format"].as_str().unwrap_or_default().to_string(),
            description: c["description"].as_str().unwrap_or_default().to_string(),
            priority: c["priority"].as_i64().unwrap_or(0),
            path: c["jsonPath"].as_str().unwrap_or_default().to_string(),
        });
    }
    out
}

#[derive(Debug, PartialEq)]
enum Step {
    Key(String),
    Index(usize),
    Filter(String, String),
}

fn parse_path(path: &str) -> Vec<Step> {
    let mut steps = Vec::new();
    let mut rest = path.trim().trim_start_matches('{').trim_end_matches('}');
    while !rest.is_empty() {
        if let Some(r) = rest.strip_prefix('.') {
            let end = r.find(['.', '[']).unwrap_or(r.len());
            if end > 0 {
                steps.push(Step::Key(r[..end].to_string()));
            }
            rest = &r[end..];
        } else if let Some(r) = rest.strip_prefix('[') {
            let Some(end) = r.find(']') else { break };
            let inner = &r[..end];
            if let Some(filter) = inner.strip_prefix("?(@.").and_then(|f| f.strip_suffix(')')) {
                if let Some((key, value)) = filter.split_once("==") {
                    let value = value.trim().trim_matches('"').trim_matches('\'');
                    steps.push(Step::Filter(key.trim().to_string(), value.to_string()));
                }
            } else if let Ok(i) = inner.trim().parse() {
                steps.push(Step::Index(i));
            } else {
                steps.push(Step::Key(inner.trim_matches('\'').trim_matches('"').to_string()));
            }
            rest = &r[end + 1..];
        } else {
            let end = rest.find(['.', '[']).unwrap_or(rest.len());
            steps.push(Step::Key(rest[..end].to_string()));
            rest = &rest[end..];
        }
    }
    steps
}

pub fn eval_path<'a>(object: &'a Value, path: &str) -> Option<&'a Value> {
    parse_path(path).iter().try_fold(object, |v, step| match step {
        Step::Key(k) => v.get(k),
        Step::Index(i) => v.get(*i),
        Step::Filter(k, want) => v.as_array()?.iter().find(|item| match &item[k] {
            Value::String(s) => s == want,
            other => serde_json::from_str::<Value>(want).ok().as_ref() == Some(other),
        }),
    })
}

/// The real server's short durations: 42s, 5m3s, 3h, 2d4h ...
pub fn human_age(timestamp: &str) -> String {
    let Ok(then) = chrono::DateTime::parse_from_rfc3339(timestamp) else { return "<unknown>".to_string() };
    let seconds = (chrono::Utc::now() - then.with_timezone(&chrono::Utc)).num_seconds().max(0);
    let (minutes, hours, days) = (seconds / 60, seconds / 3600, seconds / 86400);
    if seconds < 120 {
        format!("{seconds}s")
    } else if minutes < 10 {
        match seconds % 60 {
            0 => format!("{minutes}m"),
            s => format!("{minutes}m{s}s"),
        }
    } else if hours < 3 {
        format!("{minutes}m")
    } else if hours < 8 {
        match minutes % 60 {
            0 => format!("{hours}h"),
            m => format!("{hours}h{m}m"),
        }
    } else if hours < 48 {
        format!("{hours}h")
    } else if days < 8 {
        match hours % 24 {
            0 => format!("{days}d"),
            h => format!("{days}d{h}h"),
        }
    } else if days < 365 * 2 {
        format!("{days}d")
    } else {
        format!("{}y", days / 365)
    }
}

fn cell(column: &Column, object: &Value) -> Value {
    let Some(value) = eval_path(object, &column.path) else { return Value::Null };
    match column.kind.as_str() {
        "date" => value.as_str().map(|t| Value::String(human_age(t))).unwrap_or(Value::Null),
        "integer" | "number" | "boolean" => value.clone(),
        _ => match value {
            Value::String(_) => value.clone(),
            other => Value::String(other.to_string()),
        },
    }
}

fn row(columns: &[Column], object: &Value, include: &str) -> Value {
    let cells: Vec<Value> = columns.iter().map(|c| cell(c, object)).collect();
    let embedded = match include {
        "None" => Value::Null,
        "Object" => object.clone(),
        _ => {
            json!({"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": object["metadata"]})
        }
    };
    json!({"cells": cells, "object": embedded})
}

pub fn table(def: &ResourceDef, objects: &[Value], rv: Option<u64>, include: &str) -> Value {
    let columns = columns(def);
    let definitions: Vec<Value> = columns
        .iter()
        .map(|c| {
            json!({"name": c.name, "type": c.kind, "format": c.format, "description": c.description, "priority": c.priority})
        })
        .collect();
    let rows: Vec<Value> = objects.iter().map(|o| row(&columns, o, include)).collect();
    let mut metadata = json!({});
    if let Some(rv) = rv {
        metadata["resourceVersion"] = Value::String(rv.to_string());
    }
    json!({"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": metadata, "columnDefinitions": definitions, "rows": rows})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn printer_column_paths() {
        let obj = json!({"spec": {"workers": [{"name": "a"}]}, "status": {"conditions": [
            {"type": "Progressing", "status": "False"}, {"type": "Ready", "status": "True"}]}});
        assert_eq!(eval_path(&obj, ".spec.workers[0].name"), Some(&json!("a")));
        assert_eq!(eval_path(&obj, r#".status.conditions[?(@.type=="Ready")].status"#), Some(&json!("True")));
        assert_eq!(eval_path(&obj, ".status.missing"), None);
    }
}
