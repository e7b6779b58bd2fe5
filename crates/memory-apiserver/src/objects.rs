//! Create, read, update, patch, apply and delete of single objects, with the server-filled metadata
//! (uid, creationTimestamp, resourceVersion, generation, managedFields), the status subresource
//! split, schema handling of custom resources, and the special cases of built-ins (Secret
//! stringData, Namespace phase, CRD registration).

use base64::Engine;
use serde_json::{json, Value};

use crate::apply::{self, Scope};
use crate::error::{ApiError, ApiResult, Cause};
use crate::gc::{self, Propagation};
use crate::patch::{self, PatchKind};
use crate::resource::{self, ResourceDef};
use crate::schema;
use crate::store::{name_suffix, new_uid, now, Store};
use crate::{cel, crd};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldValidation {
    Strict,
    Warn,
    Ignore,
}

impl FieldValidation {
    pub fn parse(s: Option<&str>) -> ApiResult<FieldValidation> {
        match s {
            None | Some("") | Some("Warn") => Ok(FieldValidation::Warn),
            Some("Strict") => Ok(FieldValidation::Strict),
            Some("Ignore") => Ok(FieldValidation::Ignore),
            Some(other) => Err(ApiError::bad_request(format!(
                "fieldValidation must be one of Ignore, Warn, or Strict, got {other:?}"
            ))),
        }
    }
}

/// What a write request carries besides its body.
pub struct Ctx<'a> {
    pub def: &'a ResourceDef,
    /// Namespace from the URL ("" for cluster-scoped resources).
    pub namespace: String,
    pub manager: String,
    pub validation: FieldValidation,
    pub dry_run: bool,
}

pub struct Written {
    pub object: Value,
    pub warnings: Vec<String>,
    pub created: bool,
}

pub fn scope_for(def: &ResourceDef, subresource: Option<&str>) -> ApiResult<Scope> {
    match subresource {
        None => Ok(if def.status_subresource { Scope::MainOnly } else { Scope::Whole }),
        Some("status") if def.status_subresource => Ok(Scope::StatusOnly),
        Some(_) => Err(ApiError::path_not_found()),
    }
}

/// The object as clients see it: the requested version's apiVersion and schema defaults applied.
pub fn served(def: &ResourceDef, mut object: Value) -> Value {
    object["apiVersion"] = Value::String(def.api_version());
    object["kind"] = Value::String(def.kind.clone());
    if let Some(s) = &def.schema {
        schema::apply_defaults(s, &mut object);
    }
    object
}

pub fn get(store: &Store, def: &ResourceDef, namespace: &str, name: &str) -> ApiResult<Value> {
    store
        .get(&def.storage_key(), namespace, name)
        .cloned()
        .map(|o| served(def, o))
        .ok_or_else(|| ApiError::not_found(def, name))
}

fn check_identity(def: &ResourceDef, ctx: &Ctx, object: &mut Value, url_name: Option<&str>) -> ApiResult<()> {
    if !object.is_object() {
        return Err(ApiError::bad_request("the body of the request must be a JSON or YAML object"));
    }
    match object["apiVersion"].as_str() {
        Some(v) if v != def.api_version() => {
            return Err(ApiError::bad_request(format!(
                "the API version in the data ({v}) does not match the expected API version ({})",
                def.api_version()
            )))
        }
        _ => object["apiVersion"] = Value::String(def.api_version()),
    }
    match object["kind"].as_str() {
        Some(k) if k != def.kind => {
            return Err(ApiError::bad_request(format!(
                "the kind in the data ({k}) does not match the expected kind ({})",
                def.kind
            )))
        }
        _ => object["kind"] = Value::String(def.kind.clone()),
    }
    if !object["metadata"].is_object() {
        object["metadata"] = json!({});
    }
    let meta = &mut object["metadata"];
    if def.namespaced {
        match meta["namespace"].as_str() {
            Some(ns) if !ns.is_empty() && ns != ctx.namespace => {
                return Err(ApiError::bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request",
                ))
            }
            _ => meta["namespace"] = Value::String(ctx.namespace.clone()),
        }
    } else if let Some(m) = meta.as_object_mut() {
        m.remove("namespace");
    }
    if let Some(url_name) = url_name {
        match meta["name"].as_str() {
            Some(n) if !n.is_empty() && n != url_name => {
                return Err(ApiError::bad_request(format!(
                    "the name of the object ({n}) does not match the name on the URL ({url_name})"
                )))
            }
            _ => meta["name"] = Value::String(url_name.to_string()),
        }
    }
    Ok(())
}

/// Pruning, defaulting, schema and CEL validation of a custom resource; returns the warnings.
fn check_custom(
    def: &ResourceDef,
    ctx: &Ctx,
    object: &mut Value,
    old: Option<&Value>,
) -> ApiResult<Vec<String>> {
    let Some(s) = &def.schema else { return Ok(Vec::new()) };
    let mut unknown = Vec::new();
    schema::prune(s, object, "", true, &mut unknown);
    let mut warnings = Vec::new();
    if !unknown.is_empty() {
        let listed: Vec<String> = unknown.iter().map(|u| format!("unknown field {u:?}")).collect();
        match ctx.validation {
            FieldValidation::Strict => {
                return Err(ApiError::bad_request(format!(
                    "{kind} in version {version:?} cannot be handled as a {kind}: strict decoding error: {}",
                    listed.join(", "),
                    kind = def.kind,
                    version = def.version
                )))
            }
            FieldValidation::Warn => warnings = listed,
            FieldValidation::Ignore => {}
        }
    }
    schema::apply_defaults(s, object);
    let mut causes = Vec::new();
    schema::validate(s, object, "", &mut causes);
    if causes.is_empty() {
        let old = old.map(|o| {
            let mut o = o.clone();
            schema::apply_defaults(s, &mut o);
            o
        });
        cel::validate(s, object, old.as_ref(), "", &mut causes);
    }
    if !causes.is_empty() {
        let name = object["metadata"]["name"].as_str().unwrap_or_default();
        return Err(ApiError::invalid(def, name, causes));
    }
    Ok(warnings)
}

fn secret_string_data(object: &mut Value) {
    let Some(string_data) = object.as_object_mut().and_then(|m| m.remove("stringData")) else { return };
    let Some(entries) = string_data.as_object() else { return };
    if !object["data"].is_object() {
        object["data"] = json!({});
    }
    for (k, v) in entries {
        let text = v.as_str().unwrap_or_default();
        object["data"][k] = Value::String(base64::engine::general_purpose::STANDARD.encode(text));
    }
}

fn is_crd(def: &ResourceDef) -> bool {
    def.group == "apiextensions.k8s.io" && def.plural == "customresourcedefinitions"
}

fn is_namespace(def: &ResourceDef) -> bool {
    def.group.is_empty() && def.plural == "namespaces"
}

fn built_in_fixups(def: &ResourceDef, object: &mut Value, old: Option<&Value>) -> ApiResult<()> {
    if def.group.is_empty() && def.plural == "secrets" {
        secret_string_data(object);
    }
    if is_namespace(def) && !object["status"]["phase"].is_string() {
        object["status"] = json!({"phase": "Active"});
    }
    if is_crd(def) {
        let causes = crd::validate(object);
        if !causes.is_empty() {
            let name = object["metadata"]["name"].as_str().unwrap_or_default();
            return Err(ApiError::invalid(def, name, causes));
        }
        object["status"] = crd::status(object, old);
    }
    Ok(())
}

fn register_if_crd(store: &mut Store, def: &ResourceDef, object: &Value) {
    if is_crd(def) {
        let name = object["metadata"]["name"].as_str().unwrap_or_default();
        store.register_crd(name, resource::from_crd(object));
    }
}

fn strip_for_compare(object: &Value) -> Value {
    let mut o = object.clone();
    if let Some(meta) = o["metadata"].as_object_mut() {
        meta.remove("resourceVersion");
        meta.remove("managedFields");
    }
    o
}

fn spec_part(def: &ResourceDef, object: &Value) -> Value {
    let mut o = object.clone();
    if let Some(m) = o.as_object_mut() {
        m.remove("metadata");
        if def.status_subresource {
            m.remove("status");
        }
    }
    o
}

pub fn create(store: &mut Store, ctx: &Ctx, mut object: Value) -> ApiResult<Written> {
    let def = ctx.def;
    check_identity(def, ctx, &mut object, None)?;
    if object["metadata"]["resourceVersion"].as_str().is_some_and(|rv| !rv.is_empty()) {
        return Err(ApiError::bad_request("resourceVersion should not be set on objects to be created"));
    }
    let name = match object["metadata"]["name"].as_str().filter(|n| !n.is_empty()) {
        Some(n) => n.to_string(),
        None => match object["metadata"]["generateName"].as_str().filter(|g| !g.is_empty()) {
            Some(prefix) => format!("{prefix}{}", name_suffix()),
            None => {
                return Err(ApiError::invalid(
                    def,
                    "",
                    vec![Cause::required("metadata.name").with_detail("name or generateName is required")],
                ))
            }
        },
    };
    if let Some(why) = schema::dns_subdomain_errors(&name) {
        return Err(ApiError::invalid(
            def,
            &name,
            vec![Cause::invalid("metadata.name", &format!("{name:?}"), &why)],
        ));
    }
    if def.namespaced && store.get(&store.namespaces_key(), "", &ctx.namespace).is_none() {
        return Err(ApiError::namespace_not_found(&ctx.namespace));
    }
    if store.get(&def.storage_key(), &ctx.namespace, &name).is_some() {
        return Err(ApiError::already_exists(def, &name));
    }
    let meta = object["metadata"]
        .as_object_mut()
        .ok_or_else(|| ApiError::bad_request("metadata must be an object"))?;
    meta.insert("name".to_string(), Value::String(name.clone()));
    for server_owned in
        ["uid", "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds", "generation"]
    {
        meta.remove(server_owned);
    }
    if def.status_subresource && !is_namespace(def) {
        if let Some(m) = object.as_object_mut() {
            m.remove("status");
        }
    }
    let warnings = check_custom(def, ctx, &mut object, None)?;
    built_in_fixups(def, &mut object, None)?;
    let applied_fields = object["metadata"]["managedFields"].take();
    let meta = &mut object["metadata"];
    meta["uid"] = Value::String(new_uid());
    meta["creationTimestamp"] = Value::String(now());
    if def.tracks_generation {
        meta["generation"] = Value::from(1);
    }
    object["metadata"]["managedFields"] = if applied_fields.is_array() {
        applied_fields
    } else {
        apply::record_update(None, &object, &ctx.manager, &def.api_version(), Scope::Whole)
    };
    if ctx.dry_run {
        return Ok(Written { object: served(def, object), warnings, created: true });
    }
    register_if_crd(store, def, &object);
    let stored = store.put(&def.storage_key(), object);
    Ok(Written { object: served(def, stored), warnings, created: true })
}

/// Replaces an existing object with `new` (already merged, for patches), keeping what the scope
/// does not allow to change, and running the same checks as the real server's update.
fn commit_update(
    store: &mut Store,
    ctx: &Ctx,
    old: &Value,
    mut new: Value,
    scope: Scope,
    managed: Option<Value>,
) -> ApiResult<Written> {
    let def = ctx.def;
    let name = old["metadata"]["name"].as_str().unwrap_or_default().to_string();
    let old_rv = old["metadata"]["resourceVersion"].as_str().unwrap_or_default();
    if let Some(rv) = new["metadata"]["resourceVersion"].as_str().filter(|rv| !rv.is_empty()) {
        if rv != old_rv {
            return Err(ApiError::stale(def, &name));
        }
    }
    match scope {
        Scope::StatusOnly => {
            let status = new.get("status").cloned();
            new = old.clone();
            match status {
                Some(s) => new["status"] = s,
                None => {
                    if let Some(m) = new.as_object_mut() {
                        m.remove("status");
                    }
                }
            }
        }
        Scope::MainOnly => match old.get("status") {
            Some(s) => new["status"] = s.clone(),
            None => {
                if let Some(m) = new.as_object_mut() {
                    m.remove("status");
                }
            }
        },
        Scope::Whole => {}
    }
    for kept in [
        "uid",
        "creationTimestamp",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
        "generation",
        "name",
        "namespace",
    ] {
        match old["metadata"].get(kept) {
            Some(v) => new["metadata"][kept] = v.clone(),
            None => {
                if let Some(m) = new["metadata"].as_object_mut() {
                    m.remove(kept);
                }
            }
        }
    }
    if gc::is_deleting(old) {
        let before: Vec<&Value> =
            old["metadata"]["finalizers"].as_array().map(|a| a.iter().collect()).unwrap_or_default();
        let added =
            new["metadata"]["finalizers"].as_array().into_iter().flatten().any(|f| !before.contains(&f));
        if added {
            return Err(ApiError::invalid(
                def,
                &name,
                vec![Cause::with_reason(
                    "FieldValueForbidden",
                    "metadata.finalizers",
                    "Forbidden: no new finalizers can be added if the object is being deleted".to_string(),
                )],
            ));
        }
    }
    let warnings = check_custom(def, ctx, &mut new, Some(old))?;
    built_in_fixups(def, &mut new, Some(old))?;
    if def.tracks_generation && spec_part(def, &new) != spec_part(def, old) {
        let generation = old["metadata"]["generation"].as_i64().unwrap_or(1);
        new["metadata"]["generation"] = Value::from(generation + 1);
    }
    new["metadata"]["managedFields"] = match managed {
        Some(m) => m,
        None => apply::record_update(Some(old), &new, &ctx.manager, &def.api_version(), scope),
    };
    new["metadata"]["resourceVersion"] = Value::String(old_rv.to_string());
    let unchanged = strip_for_compare(&new) == strip_for_compare(old);
    if unchanged || ctx.dry_run {
        let object = if unchanged { old.clone() } else { new };
        return Ok(Written { object: served(def, object), warnings, created: false });
    }
    register_if_crd(store, def, &new);
    let key = def.storage_key();
    let finalized =
        gc::is_deleting(&new) && new["metadata"]["finalizers"].as_array().is_none_or(Vec::is_empty);
    let concern = gc::concern(old, &new);
    let stored = store.put(&key, new);
    if finalized {
        gc::remove_now(store, &key, &ctx.namespace, &name);
    }
    // Most writes (spec, status, a live object's finalizers) leave owners and deletion alone; a
    // change of owners concerns the object only; only deletions make the collector look at every
    // object.
    match concern {
        _ if finalized => gc::collect(store),
        gc::Concern::All => gc::collect(store),
        gc::Concern::Object { dropped } => gc::collect_object(store, &key, &ctx.namespace, &name, &dropped),
        gc::Concern::None => {}
    }
    Ok(Written { object: served(def, stored), warnings, created: false })
}

fn existing(store: &Store, ctx: &Ctx, name: &str) -> ApiResult<Value> {
    store
        .get(&ctx.def.storage_key(), &ctx.namespace, name)
        .cloned()
        .ok_or_else(|| ApiError::not_found(ctx.def, name))
}

pub fn update(store: &mut Store, ctx: &Ctx, name: &str, scope: Scope, mut body: Value) -> ApiResult<Written> {
    check_identity(ctx.def, ctx, &mut body, Some(name))?;
    let old = existing(store, ctx, name)?;
    commit_update(store, ctx, &old, body, scope, None)
}

pub fn patch(
    store: &mut Store,
    ctx: &Ctx,
    name: &str,
    scope: Scope,
    kind: PatchKind,
    body: &[u8],
    force: bool,
) -> ApiResult<Written> {
    let def = ctx.def;
    if kind == PatchKind::Apply {
        return server_side_apply(store, ctx, name, scope, body, force);
    }
    if kind == PatchKind::Strategic && def.is_custom() {
        return Err(ApiError::unsupported_media_type("application/strategic-merge-patch+json"));
    }
    let old = existing(store, ctx, name)?;
    let current = served(def, old.clone());
    let mut patched = match kind {
        PatchKind::Json => patch::apply_json_patch(&current, body)?,
        PatchKind::Merge => patch::apply_merge_patch(&current, body)?,
        _ => patch::apply_strategic_patch(&current, body)?,
    };
    check_identity(def, ctx, &mut patched, Some(name))?;
    commit_update(store, ctx, &old, patched, scope, None)
}

fn parse_apply_body(body: &[u8]) -> ApiResult<Value> {
    let text = std::str::from_utf8(body).map_err(|_| ApiError::bad_request("apply body is not UTF-8"))?;
    let value: Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(_) => serde_saphyr::from_str(text)
            .map_err(|e| ApiError::bad_request(format!("error decoding YAML: {e}")))?,
    };
    if !value.is_object() {
        return Err(ApiError::bad_request("apply body must be an object"));
    }
    Ok(value)
}

fn server_side_apply(
    store: &mut Store,
    ctx: &Ctx,
    name: &str,
    scope: Scope,
    body: &[u8],
    force: bool,
) -> ApiResult<Written> {
    let def = ctx.def;
    let mut applied = parse_apply_body(body)?;
    if applied["apiVersion"].as_str().unwrap_or_default().is_empty()
        || applied["kind"].as_str().unwrap_or_default().is_empty()
    {
        return Err(ApiError::bad_request(format!(
            "invalid object type: {}, Kind={}",
            applied["apiVersion"].as_str().unwrap_or_default(),
            applied["kind"].as_str().unwrap_or_default()
        )));
    }
    check_identity(def, ctx, &mut applied, Some(name))?;
    if ctx.manager.is_empty() {
        return Err(ApiError::bad_request(
            "PATCH, application/apply-patch+yaml requires fieldManager to be set",
        ));
    }
    match store.get(&def.storage_key(), &ctx.namespace, name).cloned() {
        None => {
            if scope == Scope::StatusOnly {
                return Err(ApiError::not_found(def, name));
            }
            let result = apply::apply(None, &applied, &ctx.manager, force, scope)?;
            create(store, ctx, result)
        }
        Some(old) => {
            // A resourceVersion in an applied configuration is a precondition, as in any update.
            let wanted = applied["metadata"]["resourceVersion"].as_str().unwrap_or_default();
            if !wanted.is_empty() && Some(wanted) != old["metadata"]["resourceVersion"].as_str() {
                return Err(ApiError::stale(def, name));
            }
            let current = served(def, old.clone());
            let result = apply::apply(Some(&current), &applied, &ctx.manager, force, scope)?;
            let mut new = result;
            let managed = new["metadata"]["managedFields"].take();
            new["metadata"]["resourceVersion"] = Value::String(String::new());
            commit_update(store, ctx, &old, new, scope, Some(managed))
        }
    }
}

pub struct DeleteOptions {
    pub propagation: Propagation,
    pub precondition_uid: Option<String>,
    pub precondition_rv: Option<String>,
    pub dry_run: bool,
}

impl DeleteOptions {
    /// From the optional DeleteOptions body, with query parameters taking precedence.
    pub fn parse(body: &[u8], propagation_query: Option<&str>, dry_run: bool) -> ApiResult<DeleteOptions> {
        let body: Value = if body.iter().all(u8::is_ascii_whitespace) {
            json!({})
        } else {
            serde_json::from_slice(body)
                .map_err(|e| ApiError::bad_request(format!("invalid DeleteOptions: {e}")))?
        };
        let orphan = body["orphanDependents"] == Value::Bool(true);
        let policy = propagation_query.or(body["propagationPolicy"].as_str());
        let propagation = match policy {
            Some(p) => Propagation::parse(p).ok_or_else(|| {
                ApiError::bad_request(format!("propagationPolicy: Unsupported value: {p:?}: supported values: \"Foreground\", \"Background\", \"Orphan\""))
            })?,
            None if orphan => Propagation::Orphan,
            None => Propagation::Background,
        };
        Ok(DeleteOptions {
            propagation,
            precondition_uid: body["preconditions"]["uid"].as_str().map(String::from),
            precondition_rv: body["preconditions"]["resourceVersion"].as_str().map(String::from),
            dry_run: dry_run || body["dryRun"].as_array().is_some_and(|a| !a.is_empty()),
        })
    }
}

pub fn delete(
    store: &mut Store,
    def: &ResourceDef,
    namespace: &str,
    name: &str,
    options: &DeleteOptions,
) -> ApiResult<Value> {
    let key = def.storage_key();
    let current = store.get(&key, namespace, name).cloned().ok_or_else(|| ApiError::not_found(def, name))?;
    if let Some(uid) = &options.precondition_uid {
        if current["metadata"]["uid"].as_str() != Some(uid) {
            return Err(ApiError::conflict(
                def,
                name,
                &format!(
                    "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                    current["metadata"]["uid"].as_str().unwrap_or_default()
                ),
            ));
        }
    }
    if let Some(rv) = &options.precondition_rv {
        if current["metadata"]["resourceVersion"].as_str() != Some(rv) {
            return Err(ApiError::conflict(
                def,
                name,
                &format!(
                    "Precondition failed: ResourceVersion in precondition: {rv}, ResourceVersion in object meta: {}",
                    current["metadata"]["resourceVersion"].as_str().unwrap_or_default()
                ),
            ));
        }
    }
    if options.dry_run {
        return Ok(served(def, current));
    }
    let after = gc::delete_object(store, &key, namespace, name, options.propagation).unwrap_or(current);
    Ok(served(def, after))
}

/// `metadata.name: Required value: name or generateName is required` and the like.
trait WithDetail {
    fn with_detail(self, detail: &str) -> Self;
}

impl WithDetail for Cause {
    fn with_detail(mut self, detail: &str) -> Cause {
        self.body = format!("{}: {detail}", self.body);
        self
    }
}

/// A List object of `def`'s kind.
pub fn list_object(def: &ResourceDef, items: Vec<Value>, rv: u64) -> Value {
    json!({
        "kind": def.list_kind,
        "apiVersion": def.api_version(),
        "metadata": {"resourceVersion": rv.to_string()},
        "items": items,
    })
}
