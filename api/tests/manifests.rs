//! The CRD's schema rules, applied offline to every manifest under `e2e/manifests/`.
//!
//! `good/` must pass; each file under `bad/` must be refused with the message in its
//! `# expect:` line; each file under `bad-updates/` holds two documents, and updating the
//! first into the second must be refused. The CEL rules run in kube-cel (the same rules the
//! API server runs); types, enums, required fields, lengths, patterns and ranges are checked
//! by a small structural walker that reports errors the way the API server words them. The e2e suite sends the
//! same files to a real kube-apiserver.

use corescale_api::{validate_spec, VirtualMachine};
use serde_json::Value;
use std::path::{Path, PathBuf};

fn schema() -> Value {
    let crd = corescale_api::crd();
    let s = crd.spec.versions[0]
        .schema
        .as_ref()
        .unwrap()
        .open_api_v3_schema
        .as_ref()
        .unwrap();
    serde_json::to_value(s).unwrap()
}

fn dir(sub: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../e2e/manifests")
        .join(sub)
}

fn files(sub: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir(sub))
        .unwrap_or_else(|e| panic!("reading e2e/manifests/{sub}: {e}"))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    v.sort();
    assert!(!v.is_empty(), "no manifests in e2e/manifests/{sub}");
    v
}

fn docs(path: &Path) -> (Vec<Value>, Option<String>) {
    let text = std::fs::read_to_string(path).unwrap();
    let expect = text
        .lines()
        .find_map(|l| l.strip_prefix("# expect: "))
        .map(str::to_string);
    let docs = text
        .split("\n---\n")
        .map(|d| {
            serde_yaml::from_str::<Value>(d).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        })
        .collect();
    (docs, expect)
}

/// The OpenAPI checks the API server makes besides CEL: type, enum, required, maxLength,
/// pattern, minimum and maximum, worded as it words them.
fn structural(schema: &Value, v: &Value, path: &str, errs: &mut Vec<String>) {
    let ty = schema.get("type").and_then(Value::as_str);
    if v.is_null() {
        return;
    }
    let ok = match ty {
        Some("integer") => v.is_i64() || v.is_u64(),
        Some("number") => v.is_number(),
        Some("string") => v.is_string(),
        Some("boolean") => v.is_boolean(),
        Some("object") => v.is_object(),
        Some("array") => v.is_array(),
        _ => true,
    };
    if !ok {
        errs.push(format!(
            "{path}: Invalid value: \"{}\": {path} in body must be of type {}",
            json_type(v),
            ty.unwrap_or("?")
        ));
        return;
    }
    if let Some(en) = schema.get("enum").and_then(Value::as_array) {
        if !en.contains(v) {
            errs.push(format!("{path}: Unsupported value: {v}"));
        }
    }
    if let (Some(max), Some(s)) = (schema.get("maxLength").and_then(Value::as_u64), v.as_str()) {
        if u64::try_from(s.chars().count()).unwrap() > max {
            errs.push(format!(
                "{path}: Too long: may not be more than {max} bytes"
            ));
        }
    }
    if let (Some(p), Some(s)) = (schema.get("pattern").and_then(Value::as_str), v.as_str()) {
        if !regex::Regex::new(p).unwrap().is_match(s) {
            errs.push(format!(
                "{path}: Invalid value: {v}: {path} in body should match '{p}'"
            ));
        }
    }
    // The schema holds bounds as JSON numbers (255.0), which print as the API server prints
    // them (255).
    let bound = |k: &str| schema.get(k).and_then(Value::as_f64);
    if let (Some(n), Some(x)) = (v.as_i64(), v.as_f64()) {
        if let Some(min) = bound("minimum").filter(|m| x < *m) {
            errs.push(format!(
                "{path}: Invalid value: {n}: {path} in body should be greater than or equal to {min}"
            ));
        }
        if let Some(max) = bound("maximum").filter(|m| x > *m) {
            errs.push(format!(
                "{path}: Invalid value: {n}: {path} in body should be less than or equal to {max}"
            ));
        }
    }
    if let (Some(each), Some(obj)) = (schema.get("additionalProperties"), v.as_object()) {
        for (k, child) in obj {
            structural(each, child, &join(path, k), errs);
        }
    }
    if let (Some(each), Some(items)) = (schema.get("items"), v.as_array()) {
        for (i, child) in items.iter().enumerate() {
            structural(each, child, &format!("{path}[{i}]"), errs);
        }
    }
    if let (Some(props), Some(obj)) = (
        schema.get("properties").and_then(Value::as_object),
        v.as_object(),
    ) {
        for req in schema
            .get("required")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let r = req.as_str().unwrap();
            if !obj.contains_key(r) {
                errs.push(format!("{}: Required value", join(path, r)));
            }
        }
        for (k, child) in obj {
            match props.get(k) {
                Some(s) => structural(s, child, &join(path, k), errs),
                // Strict field validation (kubectl's default) refuses unknown fields.
                // (The API server adds apiVersion, kind and metadata to every root schema.)
                // ObjectMeta's own fields are the API server's: the CRD only bounds the name.
                None if schema.get("x-kubernetes-preserve-unknown-fields").is_none()
                    && path != "metadata"
                    && !(path.is_empty()
                        && matches!(k.as_str(), "apiVersion" | "kind" | "metadata")) =>
                {
                    errs.push(format!(
                        "strict decoding error: unknown field \"{}\"",
                        join(path, k)
                    ));
                }
                None => {}
            }
        }
    }
}

fn join(path: &str, k: &str) -> String {
    if path.is_empty() {
        k.to_string()
    } else {
        format!("{path}.{k}")
    }
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::String(_) => "string",
        Value::Number(_) => "number",
        Value::Bool(_) => "boolean",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
        Value::Null => "null",
    }
}

/// The schema's defaults written into `v` where it lacks them, as the API server does to a
/// new object and to a stored one when it reads it (so an update's `oldSelf` has them).
fn defaulted(schema: &Value, v: &Value) -> Value {
    let mut v = v.clone();
    if let (Some(props), Some(obj)) = (
        schema.get("properties").and_then(Value::as_object),
        v.as_object_mut(),
    ) {
        for (k, child) in props {
            match obj.get(k) {
                Some(present) => {
                    let d = defaulted(child, present);
                    obj.insert(k.clone(), d);
                }
                None => {
                    if let Some(d) = child.get("default") {
                        obj.insert(k.clone(), d.clone());
                    }
                }
            }
        }
    }
    v
}

/// Every error the API server would report for creating (or updating from `old`) `obj`.
fn admission_errors(obj: &Value, old: Option<&Value>) -> Vec<String> {
    let schema = schema();
    let obj = &defaulted(&schema, obj);
    let old = old.map(|o| defaulted(&schema, o));
    let old = old.as_ref();
    let mut errs = Vec::new();
    structural(&schema, obj, "", &mut errs);
    if !errs.is_empty() {
        return errs; // the API server stops before CEL when the structure is wrong
    }
    if let Err(e) = kube::core::cel::Validator::new().validate(&schema, obj, old) {
        errs.extend(e.iter().map(|e| e.to_string()));
    }
    errs
}

#[test]
fn good_manifests_are_accepted_and_valid_in_rust_too() {
    for f in files("good") {
        let (d, _) = docs(&f);
        let errs = admission_errors(&d[0], None);
        assert!(errs.is_empty(), "{} refused: {errs:?}", f.display());
        let vm: VirtualMachine =
            serde_json::from_value(d[0].clone()).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        validate_spec(&vm.spec).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        // Updating to itself is always allowed (transition rules).
        let errs = admission_errors(&d[0], Some(&d[0]));
        assert!(
            errs.is_empty(),
            "{} refused as its own update: {errs:?}",
            f.display()
        );
    }
}

#[test]
fn bad_manifests_are_refused_naming_the_field() {
    for f in files("bad") {
        let (d, expect) = docs(&f);
        let expect = expect.unwrap_or_else(|| panic!("{} has no '# expect:' line", f.display()));
        let errs = admission_errors(&d[0], None);
        assert!(
            errs.iter().any(|e| e.contains(&expect)),
            "{}: expected an error containing {expect:?}, got {errs:?}",
            f.display()
        );
        // The Rust mirror refuses it too, either while decoding or in validate_spec.
        if let Ok(vm) = serde_json::from_value::<VirtualMachine>(d[0].clone()) {
            // Serde ignores unknown fields: the API server's strict decoding refuses them.
            let name_rule =
                expect.starts_with("metadata.name") || expect.starts_with("unknown field");
            assert!(
                name_rule || validate_spec(&vm.spec).is_err(),
                "{}: validate_spec accepted what the CRD refuses",
                f.display()
            );
        }
    }
}

#[test]
fn bad_updates_are_refused_naming_the_field() {
    for f in files("bad-updates") {
        let (d, expect) = docs(&f);
        let expect = expect.unwrap_or_else(|| panic!("{} has no '# expect:' line", f.display()));
        assert_eq!(
            d.len(),
            2,
            "{}: needs the original and the update",
            f.display()
        );
        let errs = admission_errors(&d[0], None);
        assert!(
            errs.is_empty(),
            "{}: original refused: {errs:?}",
            f.display()
        );
        let errs = admission_errors(&d[1], Some(&d[0]));
        assert!(
            errs.iter().any(|e| e.contains(&expect)),
            "{}: expected an error containing {expect:?}, got {errs:?}",
            f.display()
        );
    }
}

#[test]
fn every_field_has_a_description_for_kubectl_explain() {
    fn walk(s: &Value, path: &str, missing: &mut Vec<String>) {
        if let Some(props) = s.get("properties").and_then(Value::as_object) {
            for (k, child) in props {
                let p = join(path, k);
                let skip =
                    path.is_empty() && matches!(k.as_str(), "apiVersion" | "kind" | "metadata");
                let described = child
                    .get("description")
                    .and_then(Value::as_str)
                    .is_some_and(|d| !d.is_empty());
                if !skip && !described {
                    missing.push(p.clone());
                }
                walk(child, &p, missing);
            }
        }
        if let Some(items) = s.get("items") {
            walk(items, path, missing);
        }
    }
    let mut missing = Vec::new();
    walk(&schema(), "", &mut missing);
    assert!(
        missing.is_empty(),
        "fields without a description: {missing:?}"
    );
}

#[test]
fn scale_subresource_and_columns() {
    let crd = corescale_api::crd();
    let v = &crd.spec.versions[0];
    let scale = v.subresources.as_ref().unwrap().scale.as_ref().unwrap();
    assert_eq!(scale.spec_replicas_path, ".spec.cpus");
    assert_eq!(scale.status_replicas_path, ".status.cpus");
    assert_eq!(
        scale.label_selector_path.as_deref(),
        Some(".status.selector")
    );
    let cols: Vec<&str> = v
        .additional_printer_columns
        .as_ref()
        .unwrap()
        .iter()
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(cols, ["CPUS", "ONLINE", "MAX", "NODE", "PHASE", "AGE"]);
    assert_eq!(
        crd.spec.names.short_names.as_deref(),
        Some(&["cvm".to_string()][..])
    );
}

#[test]
fn committed_crd_matches_the_types() {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../crds/virtualmachines.corescale.dev.yaml");
    let committed = std::fs::read_to_string(&path)
        .expect("crds/virtualmachines.corescale.dev.yaml is missing: run `make generate`");
    assert!(
        committed == corescale_api::crd_yaml(),
        "crds/ is out of date with api/src/types.rs: run `make generate` and commit the result"
    );
}
