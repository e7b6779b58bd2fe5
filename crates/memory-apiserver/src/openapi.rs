//! OpenAPI v3 documents, only as much as kubectl needs: for each group/version, a PATCH operation
//! per kind that lists the `fieldValidation` query parameter. kubectl then knows the server validates
//! fields itself and sends `fieldValidation=Strict` instead of validating on the client (which
//! would need full schemas). Custom resources also get their openAPIV3Schema as a component.

use serde_json::{json, Map, Value};

use crate::resource::ResourceDef;

/// The path under /openapi/v3/ of a group/version's document.
pub fn gv_path(def: &ResourceDef) -> String {
    if def.group.is_empty() {
        format!("api/{}", def.version)
    } else {
        format!("apis/{}/{}", def.group, def.version)
    }
}

pub fn root(defs: &[ResourceDef], hash: u64) -> Value {
    let mut paths = Map::new();
    for def in defs {
        let path = gv_path(def);
        let url = format!("/openapi/v3/{path}?hash={hash:016X}");
        paths.insert(path, json!({"serverRelativeURL": url}));
    }
    json!({"paths": paths})
}

fn schema_name(def: &ResourceDef) -> String {
    let reversed: Vec<&str> = def.group.split('.').rev().collect();
    format!("{}.{}.{}", reversed.join("."), def.version, def.kind)
}

pub fn group_version(defs: &[&ResourceDef]) -> Value {
    let mut paths = Map::new();
    let mut schemas = Map::new();
    for def in defs {
        let gvk = json!({"group": def.group, "version": def.version, "kind": def.kind});
        let prefix = if def.group.is_empty() {
            format!("/api/{}", def.version)
        } else {
            format!("/apis/{}/{}", def.group, def.version)
        };
        let item = if def.namespaced {
            format!("{prefix}/namespaces/{{namespace}}/{}/{{name}}", def.plural)
        } else {
            format!("{prefix}/{}/{{name}}", def.plural)
        };
        let parameters = json!([
            {"name": "dryRun", "in": "query", "schema": {"type": "string", "uniqueItems": true}},
            {"name": "fieldManager", "in": "query", "schema": {"type": "string", "uniqueItems": true}},
            {"name": "fieldValidation", "in": "query", "schema": {"type": "string", "uniqueItems": true}},
            {"name": "force", "in": "query", "schema": {"type": "boolean", "uniqueItems": true}},
        ]);
        let operation = |verb: &str| {
            json!({
                "operationId": format!("{verb}{}", def.kind),
                "parameters": parameters,
                "responses": {"200": {"description": "OK"}},
                "x-kubernetes-action": verb,
                "x-kubernetes-group-version-kind": gvk,
            })
        };
        paths.insert(
            item,
            json!({"get": operation("get"), "put": operation("put"), "patch": operation("patch")}),
        );
        if let Some(schema) = &def.schema {
            let mut schema = schema.clone();
            schema["x-kubernetes-group-version-kind"] = json!([gvk]);
            schemas.insert(schema_name(def), schema);
        }
    }
    json!({
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": "v1.32.0"},
        "paths": paths,
        "components": {"schemas": schemas},
    })
}
