//! Reading Api/Plan/Application/Subscription (and Secret) manifests from YAML or JSON, for the
//! standalone gateway and for tests. Problems with single documents are collected as
//! [`ManifestError`]s and never stop the other documents from loading.

use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_yaml::Value;

use crate::compile::{DEFAULT_NAMESPACE, Resources};
use crate::resources::{Api, Application, GROUP, Plan, Subscription, VERSION};

/// A document that could not be used. Not fatal: the other documents still load.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ManifestError {
    /// Where the YAML came from (usually a file path).
    pub source: String,
    /// 1-based position of the document in the source; 0 when the whole source is affected
    /// (e.g. the file could not be read).
    pub document: usize,
    pub message: String,
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.document == 0 {
            write!(f, "{}: {}", self.source, self.message)
        } else {
            write!(
                f,
                "{}: document {}: {}",
                self.source, self.document, self.message
            )
        }
    }
}

impl std::error::Error for ManifestError {}

/// Parses every document of a (multi-document) YAML or JSON text into `into`.
///
/// Dispatches on `apiVersion` + `kind`: `gatehouse.dev/v1alpha1` Api, Plan, Application,
/// Subscription; `v1` Secret (with `stringData` merged into `data`); `kind: List` with `items`.
/// `v1` Namespace objects are accepted and ignored, so a folder meant for `kubectl apply -f` can be
/// loaded as it is. Empty documents are skipped. A missing `metadata.namespace` becomes `default`.
pub fn parse_documents(yaml: &str, source: &str, into: &mut Resources) -> Vec<ManifestError> {
    let mut errors = Vec::new();
    let mut previous_syntax_error: Option<String> = None;
    for (i, document) in serde_yaml::Deserializer::from_str(yaml).enumerate() {
        let index = i + 1;
        let value = match Value::deserialize(document) {
            Ok(value) => value,
            Err(e) => {
                let message = e.to_string();
                // After a syntax error the YAML parser repeats the same error forever.
                if previous_syntax_error.as_deref() == Some(message.as_str()) {
                    break;
                }
                errors.push(ManifestError {
                    source: source.to_string(),
                    document: index,
                    message: format!("not valid YAML: {message}"),
                });
                previous_syntax_error = Some(message);
                continue;
            }
        };
        previous_syntax_error = None;
        let mut context = Context {
            source,
            document: index,
            errors: &mut errors,
        };
        add_value(value, "", &mut context, into);
    }
    errors
}

/// Loads files and folders. Folders are read recursively: every `*.yaml`, `*.yml` and `*.json`
/// file, hidden files and folders (names starting with '.') skipped, in sorted path order. Files
/// named explicitly are read whatever their name. The same file reached twice is read once.
///
/// A path that does not exist (or a folder that cannot be listed) is an `io::Error`; a file that
/// cannot be read or is not UTF-8, and every bad document, are [`ManifestError`]s.
pub fn load_paths(paths: &[PathBuf]) -> Result<(Resources, Vec<ManifestError>), std::io::Error> {
    let mut resources = Resources::default();
    let mut errors = Vec::new();
    for file in load_files(paths)? {
        resources.extend(file.resources);
        errors.extend(file.errors);
    }
    Ok((resources, errors))
}

/// What one file held, as [`load_files`] read it.
#[derive(Clone, Debug)]
pub struct FileManifests {
    pub path: PathBuf,
    /// The resources of its documents that could be used.
    pub resources: Resources,
    /// Empty when every document could be used.
    pub errors: Vec<ManifestError>,
}

/// [`load_paths`] file by file, for a caller that treats each file on its own (the standalone
/// gateway keeps a bad file's last good version). Files come in the same order. A file that
/// cannot be read (it may have been deleted since its folder was listed) is an error of that
/// file, for document 0; a path that does not exist or a folder that cannot be listed is still
/// an `io::Error`.
pub fn load_files(paths: &[PathBuf]) -> Result<Vec<FileManifests>, std::io::Error> {
    let mut files = Vec::new();
    let mut read = BTreeSet::new();
    for path in list_files(paths)? {
        let source = path.display().to_string();
        let bytes = match std::fs::canonicalize(&path) {
            Ok(canonical) => match read.insert(canonical) {
                true => std::fs::read(&path),
                false => continue,
            },
            Err(e) => Err(e),
        };
        let mut resources = Resources::default();
        let errors = match bytes {
            Ok(bytes) => parse_file(bytes, &source, &mut resources),
            Err(e) => vec![ManifestError {
                source,
                document: 0,
                message: format!("cannot read: {e}"),
            }],
        };
        files.push(FileManifests {
            path,
            resources,
            errors,
        });
    }
    Ok(files)
}

/// The files `paths` name, folders listed recursively, in the order they are read.
fn list_files(paths: &[PathBuf]) -> Result<Vec<PathBuf>, std::io::Error> {
    let mut files = Vec::new();
    for path in paths {
        let meta = std::fs::metadata(path).map_err(|e| with_path(path, e))?;
        if meta.is_dir() {
            let mut found = Vec::new();
            let mut visited = BTreeSet::new();
            collect_dir(path, &mut found, &mut visited)?;
            found.sort();
            files.extend(found);
        } else {
            files.push(path.clone());
        }
    }
    Ok(files)
}

fn parse_file(bytes: Vec<u8>, source: &str, into: &mut Resources) -> Vec<ManifestError> {
    match String::from_utf8(bytes) {
        Ok(text) => parse_documents(&text, source, into),
        Err(_) => vec![ManifestError {
            source: source.to_string(),
            document: 0,
            message: "not UTF-8 text; manifests must be YAML or JSON".to_string(),
        }],
    }
}

fn with_path(path: &Path, e: std::io::Error) -> std::io::Error {
    std::io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

fn collect_dir(
    dir: &Path,
    found: &mut Vec<PathBuf>,
    visited: &mut BTreeSet<PathBuf>,
) -> Result<(), std::io::Error> {
    // Guards against symlink loops.
    let canonical = std::fs::canonicalize(dir).map_err(|e| with_path(dir, e))?;
    if !visited.insert(canonical) {
        return Ok(());
    }
    for entry in std::fs::read_dir(dir).map_err(|e| with_path(dir, e))? {
        let entry = entry.map_err(|e| with_path(dir, e))?;
        let name = entry.file_name();
        if name.to_string_lossy().starts_with('.') {
            continue;
        }
        let path = entry.path();
        // Follows symlinks; a dangling symlink is skipped.
        let Ok(meta) = std::fs::metadata(&path) else {
            continue;
        };
        if meta.is_dir() {
            collect_dir(&path, found, visited)?;
        } else if meta.is_file() && has_manifest_extension(&path) {
            found.push(path);
        }
    }
    Ok(())
}

fn has_manifest_extension(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "yaml" | "yml" | "json"))
}

struct Context<'a> {
    source: &'a str,
    document: usize,
    errors: &'a mut Vec<ManifestError>,
}

impl Context<'_> {
    fn error(&mut self, at: &str, message: String) {
        let message = if at.is_empty() {
            message
        } else {
            format!("{at}: {message}")
        };
        self.errors.push(ManifestError {
            source: self.source.to_string(),
            document: self.document,
            message,
        });
    }
}

fn str_field<'v>(value: &'v Value, field: &str) -> Option<&'v str> {
    value.get(field).and_then(Value::as_str)
}

/// `Kind namespace/name` for messages, as far as the document tells.
fn describe(kind: &str, value: &Value) -> String {
    let meta = value.get("metadata");
    let name = meta.and_then(|m| str_field(m, "name"));
    let ns = meta
        .and_then(|m| str_field(m, "namespace"))
        .unwrap_or(DEFAULT_NAMESPACE);
    match name {
        Some(name) => format!("{kind} {ns}/{name}"),
        None => kind.to_string(),
    }
}

fn add_value(value: Value, at: &str, cx: &mut Context<'_>, into: &mut Resources) {
    if value.is_null() {
        return;
    }
    if !value.is_mapping() {
        cx.error(
            at,
            "expected a Kubernetes object (a mapping with apiVersion, kind, metadata)".to_string(),
        );
        return;
    }
    let (Some(api_version), Some(kind)) =
        (str_field(&value, "apiVersion"), str_field(&value, "kind"))
    else {
        cx.error(at, "missing apiVersion or kind".to_string());
        return;
    };
    let (api_version, kind) = (api_version.to_string(), kind.to_string());
    let gatehouse = format!("{GROUP}/{VERSION}");
    let what = describe(&kind, &value);
    match (api_version.as_str(), kind.as_str()) {
        (_, "List") => {
            let items = match value.get("items") {
                None | Some(Value::Null) => return,
                Some(Value::Sequence(items)) => items.clone(),
                Some(_) => {
                    cx.error(at, "List: items must be a sequence".to_string());
                    return;
                }
            };
            for (i, item) in items.into_iter().enumerate() {
                let item_at = if at.is_empty() {
                    format!("items[{i}]")
                } else {
                    format!("{at}.items[{i}]")
                };
                add_value(item, &item_at, cx, into);
            }
        }
        (v, "Api") if v == gatehouse => {
            if let Some(mut r) = typed::<Api>(value, at, &what, cx)
                && checked_meta(&mut r.metadata, at, &what, cx)
            {
                into.apis.push(r);
            }
        }
        (v, "Plan") if v == gatehouse => {
            if let Some(mut r) = typed::<Plan>(value, at, &what, cx)
                && checked_meta(&mut r.metadata, at, &what, cx)
            {
                into.plans.push(r);
            }
        }
        (v, "Application") if v == gatehouse => {
            if let Some(mut r) = typed::<Application>(value, at, &what, cx)
                && checked_meta(&mut r.metadata, at, &what, cx)
            {
                into.applications.push(r);
            }
        }
        (v, "Subscription") if v == gatehouse => {
            if let Some(mut r) = typed::<Subscription>(value, at, &what, cx)
                && checked_meta(&mut r.metadata, at, &what, cx)
            {
                into.subscriptions.push(r);
            }
        }
        ("v1", "Secret") => {
            if let Some(mut r) = typed::<Secret>(value, at, &what, cx)
                && checked_meta(&mut r.metadata, at, &what, cx)
            {
                merge_string_data(&mut r);
                into.secrets.push(r);
            }
        }
        ("v1", "Namespace") => {}
        (v, "Api" | "Plan" | "Application" | "Subscription") if v.starts_with(GROUP) => {
            cx.error(
                at,
                format!("{what}: unsupported apiVersion {v}; use {gatehouse}"),
            );
        }
        (v, k) => cx.error(
            at,
            format!(
                "unsupported kind {k} (apiVersion {v}); expected Api, Plan, Application or Subscription ({gatehouse}), or Secret (v1)"
            ),
        ),
    }
}

/// Deserializes through YAML text so serde's error names the offending field path.
fn typed<T: DeserializeOwned>(
    value: Value,
    at: &str,
    what: &str,
    cx: &mut Context<'_>,
) -> Option<T> {
    let result = serde_yaml::to_string(&value).and_then(|text| serde_yaml::from_str::<T>(&text));
    match result {
        Ok(t) => Some(t),
        Err(e) => {
            cx.error(at, format!("{what}: {}", strip_location(&e)));
            None
        }
    }
}

/// serde_yaml's message without " at line N column M", which would point into re-serialized
/// text rather than the user's file.
fn strip_location(e: &serde_yaml::Error) -> String {
    let message = e.to_string();
    match message.rfind(" at line ") {
        Some(pos) if e.location().is_some() => message[..pos].to_string(),
        _ => message,
    }
}

fn default_namespace(meta: &mut ObjectMeta) {
    if meta.namespace.as_deref().is_none_or(str::is_empty) {
        meta.namespace = Some(DEFAULT_NAMESPACE.to_string());
    }
}

/// Is `s` a name Kubernetes accepts (RFC 1123: lowercase letters, digits, '-' and '.', at most
/// `max` characters, alphanumeric at both ends)? The API server checks this in a cluster; from a
/// folder nothing else does, and names travel in headers to the upstream.
pub fn is_k8s_name(s: &str, max: usize) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= max
        && b.iter()
            .all(|&c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-' || c == b'.')
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
}

/// Defaults the namespace and checks the names; false (and an error) when one is not valid.
fn checked_meta(meta: &mut ObjectMeta, at: &str, what: &str, cx: &mut Context<'_>) -> bool {
    default_namespace(meta);
    let ns = meta.namespace.as_deref().unwrap_or(DEFAULT_NAMESPACE);
    if !is_k8s_name(ns, 63) || ns.contains('.') {
        cx.error(
            at,
            format!("{what}: metadata.namespace {ns:?} is not a valid namespace (lowercase letters, digits and '-', at most 63)"),
        );
        return false;
    }
    match meta.name.as_deref() {
        Some(name) if !is_k8s_name(name, 253) => {
            cx.error(
                at,
                format!("{what}: metadata.name {name:?} is not a valid Kubernetes name (lowercase letters, digits, '-' and '.', at most 253)"),
            );
            false
        }
        _ => true,
    }
}

/// Moves `stringData` into `data` (overriding equal keys), as the API server does on write.
fn merge_string_data(secret: &mut Secret) {
    if let Some(string_data) = secret.string_data.take() {
        let data = secret.data.get_or_insert_with(Default::default);
        for (k, v) in string_data {
            data.insert(k, ByteString(v.into_bytes()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::GrantType;

    fn parse(yaml: &str) -> (Resources, Vec<ManifestError>) {
        let mut r = Resources::default();
        let errors = parse_documents(yaml, "test.yaml", &mut r);
        (r, errors)
    }

    const PLAN: &str = "apiVersion: gatehouse.dev/v1alpha1
kind: Plan
metadata: {name: basic, namespace: demo}
spec:
  rateLimits:
    - {requests: 10, per: second}
";

    #[test]
    fn names_kubernetes_would_refuse_are_errors() {
        for (meta, bad) in [
            ("{name: Basic, namespace: demo}", "metadata.name"),
            ("{name: bäsic, namespace: demo}", "metadata.name"),
            ("{name: 'a b', namespace: demo}", "metadata.name"),
            ("{name: -basic, namespace: demo}", "metadata.name"),
            ("{name: basic, namespace: Demo}", "metadata.namespace"),
            ("{name: basic, namespace: a.b}", "metadata.namespace"),
        ] {
            let yaml = PLAN.replace("{name: basic, namespace: demo}", meta);
            let (r, errors) = parse(&yaml);
            assert!(r.plans.is_empty(), "{meta}");
            assert_eq!(errors.len(), 1, "{meta}");
            assert!(errors[0].message.contains(bad), "{}", errors[0].message);
        }
        let (r, errors) = parse(&PLAN.replace("basic,", "basic-2.v1,"));
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(r.plans.len(), 1);
    }

    #[test]
    fn parses_every_kind_from_one_stream() {
        let yaml = format!(
            "{PLAN}---
apiVersion: gatehouse.dev/v1alpha1
kind: Api
metadata: {{name: mobile, namespace: demo}}
spec:
  pathPrefix: /mobile
  upstream: {{url: 'http://127.0.0.1:9001'}}
  plans: [basic]
---
apiVersion: gatehouse.dev/v1alpha1
kind: Application
metadata: {{name: app}}
spec: {{clientType: confidential}}
---
apiVersion: gatehouse.dev/v1alpha1
kind: Subscription
metadata: {{name: sub, namespace: demo}}
spec: {{application: app, api: mobile, plan: basic}}
---
apiVersion: v1
kind: Secret
metadata: {{name: creds, namespace: demo}}
stringData: {{clientSecret: abc}}
"
        );
        let (r, errors) = parse(&yaml);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(r.plans.len(), 1);
        assert_eq!(r.apis.len(), 1);
        assert_eq!(r.applications.len(), 1);
        assert_eq!(r.subscriptions.len(), 1);
        assert_eq!(r.secrets.len(), 1);
        // defaults from the resource types
        let api = &r.apis[0].spec;
        assert!(api.upstream.strip_prefix);
        assert_eq!(api.upstream.timeout_seconds, 30);
        assert_eq!(
            api.auth.grants,
            vec![GrantType::AuthorizationCode, GrantType::RefreshToken]
        );
    }

    #[test]
    fn namespace_defaults_to_default() {
        let (r, errors) = parse(
            "apiVersion: gatehouse.dev/v1alpha1\nkind: Application\nmetadata: {name: app}\nspec: {}\n",
        );
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(
            r.applications[0].metadata.namespace.as_deref(),
            Some("default")
        );
    }

    #[test]
    fn empty_documents_and_comments_are_skipped() {
        let yaml = format!("---\n# just a comment\n---\n{PLAN}---\n---\n");
        let (r, errors) = parse(&yaml);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(r.plans.len(), 1);
        let (r, errors) = parse("");
        assert!(errors.is_empty());
        assert_eq!(r.plans.len(), 0);
    }

    #[test]
    fn unknown_kind_is_reported_with_source_and_index_and_the_rest_loads() {
        let yaml = format!(
            "{PLAN}---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: x}}\n---\n{}",
            PLAN.replace("basic", "premium")
        );
        let (r, errors) = parse(&yaml);
        assert_eq!(r.plans.len(), 2);
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].source, "test.yaml");
        assert_eq!(errors[0].document, 2);
        assert!(errors[0].message.contains("Deployment"), "{}", errors[0]);
        assert!(errors[0].to_string().starts_with("test.yaml: document 2: "));
    }

    #[test]
    fn namespace_objects_are_ignored() {
        let yaml =
            format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: demo}}\n---\n{PLAN}");
        let (r, errors) = parse(&yaml);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(r.plans.len(), 1);
    }

    #[test]
    fn unknown_grant_is_reported_with_the_serde_message() {
        let yaml = format!(
            "{PLAN}---
apiVersion: gatehouse.dev/v1alpha1
kind: Api
metadata: {{name: mobile, namespace: demo}}
spec:
  pathPrefix: /mobile
  upstream: {{url: 'http://127.0.0.1:9001'}}
  auth: {{grants: [authorization_code, password]}}
"
        );
        let (r, errors) = parse(&yaml);
        assert_eq!(r.plans.len(), 1);
        assert!(r.apis.is_empty());
        assert_eq!(errors.len(), 1, "{errors:?}");
        let e = &errors[0];
        assert_eq!(e.document, 2);
        assert!(e.message.contains("Api demo/mobile"), "{e}");
        assert!(e.message.contains("unknown variant `password`"), "{e}");
        assert!(e.message.contains("spec.auth.grants"), "{e}");
        assert!(!e.message.contains(" at line "), "{e}");
    }

    #[test]
    fn missing_path_prefix_is_reported() {
        let yaml = "apiVersion: gatehouse.dev/v1alpha1
kind: Api
metadata: {name: mobile, namespace: demo}
spec:
  upstream: {url: 'http://127.0.0.1:9001'}
";
        let (r, errors) = parse(yaml);
        assert!(r.apis.is_empty());
        assert_eq!(errors.len(), 1);
        assert!(
            errors[0].message.contains("missing field `pathPrefix`"),
            "{}",
            errors[0]
        );
    }

    #[test]
    fn wrong_gatehouse_version_is_reported() {
        let (_, errors) = parse(&PLAN.replace("v1alpha1", "v1beta1"));
        assert_eq!(errors.len(), 1);
        assert!(
            errors[0]
                .message
                .contains("unsupported apiVersion gatehouse.dev/v1beta1")
        );
    }

    #[test]
    fn non_objects_and_missing_kind_are_reported() {
        let (_, errors) = parse("- a\n- b\n---\nfoo: bar\n");
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert_eq!((errors[0].document, errors[1].document), (1, 2));
        assert!(errors[1].message.contains("missing apiVersion or kind"));
    }

    #[test]
    fn list_items_are_loaded() {
        let yaml = "apiVersion: v1
kind: List
items:
  - apiVersion: gatehouse.dev/v1alpha1
    kind: Plan
    metadata: {name: a, namespace: demo}
    spec: {}
  - apiVersion: gatehouse.dev/v1alpha1
    kind: Plan
    metadata: {name: b, namespace: demo}
    spec: {rateLimits: [{requests: 1, per: fortnight}]}
";
        let (r, errors) = parse(yaml);
        assert_eq!(r.plans.len(), 1);
        assert_eq!(errors.len(), 1);
        assert!(
            errors[0].message.starts_with("items[1]: Plan demo/b: "),
            "{}",
            errors[0]
        );
    }

    #[test]
    fn secret_string_data_is_merged_into_data() {
        let yaml = "apiVersion: v1
kind: Secret
metadata: {name: creds}
data: {a: aGVsbG8=, b: b2xk}
stringData: {b: new, c: see}
";
        let (r, errors) = parse(yaml);
        assert!(errors.is_empty(), "{errors:?}");
        let s = &r.secrets[0];
        assert!(s.string_data.is_none());
        let data = s.data.as_ref().unwrap();
        assert_eq!(data["a"].0, b"hello");
        assert_eq!(data["b"].0, b"new");
        assert_eq!(data["c"].0, b"see");
        assert_eq!(s.metadata.namespace.as_deref(), Some("default"));
    }

    #[test]
    fn json_documents_are_accepted() {
        let json = r#"{"apiVersion":"gatehouse.dev/v1alpha1","kind":"Plan","metadata":{"name":"p","namespace":"x"},"spec":{}}"#;
        let (r, errors) = parse(json);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(r.plans[0].metadata.name.as_deref(), Some("p"));
    }

    #[test]
    fn a_syntax_error_is_reported_once_and_does_not_loop() {
        let yaml = format!("{PLAN}---\nkey: [unclosed\n---\n{PLAN}");
        let (r, errors) = parse(&yaml);
        assert_eq!(r.plans.len(), 1);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].document, 2);
        assert!(errors[0].message.starts_with("not valid YAML"));
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("gatehouse-manifests-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn load_paths_reads_folders_recursively_sorted_and_skips_hidden_and_other_files() {
        let dir = temp_dir("folders");
        std::fs::create_dir_all(dir.join("nested")).unwrap();
        std::fs::create_dir_all(dir.join(".hidden")).unwrap();
        let plan = |name: &str| PLAN.replace("basic", name);
        std::fs::write(dir.join("b.yaml"), plan("b")).unwrap();
        std::fs::write(dir.join("a.yml"), plan("a")).unwrap();
        std::fs::write(dir.join("nested/c.json"), plan("c")).unwrap();
        std::fs::write(dir.join("nested/README.md"), "not yaml: [").unwrap();
        std::fs::write(dir.join(".skipped.yaml"), plan("hidden-file")).unwrap();
        std::fs::write(dir.join(".hidden/d.yaml"), plan("hidden-dir")).unwrap();
        std::fs::write(dir.join("broken.yaml"), "apiVersion: v1\nkind: Pod\n").unwrap();

        let (r, errors) = load_paths(std::slice::from_ref(&dir)).unwrap();
        let names: Vec<_> = r
            .plans
            .iter()
            .map(|p| p.metadata.name.clone().unwrap())
            .collect();
        assert_eq!(names, ["a", "b", "c"]);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(errors[0].source.ends_with("broken.yaml"));

        // A file given explicitly is read whatever its name; the same file twice is read once.
        let (r, _) =
            load_paths(&[dir.join(".skipped.yaml"), dir.clone(), dir.join("a.yml")]).unwrap();
        assert_eq!(r.plans.len(), 4);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn load_files_keeps_each_files_resources_and_errors_apart() {
        let dir = temp_dir("per-file");
        std::fs::write(dir.join("a.yaml"), PLAN.replace("basic", "a")).unwrap();
        let bad = format!(
            "{}---\napiVersion: apps/v1\nkind: Deployment\n",
            PLAN.replace("basic", "b")
        );
        std::fs::write(dir.join("b.yaml"), bad).unwrap();
        std::fs::write(dir.join("c.yaml"), [0xff, 0xfe]).unwrap();

        let files = load_files(&[dir.clone(), dir.join("a.yaml")]).unwrap();
        let names: Vec<_> = files
            .iter()
            .map(|f| f.path.file_name().unwrap().to_str().unwrap())
            .collect();
        assert_eq!(names, ["a.yaml", "b.yaml", "c.yaml"], "a.yaml read once");
        assert!(files[0].errors.is_empty());
        assert_eq!(files[0].resources.plans.len(), 1);
        // b.yaml's good document is there, next to the error of its bad one.
        assert_eq!(files[1].resources.plans.len(), 1);
        assert_eq!(files[1].errors.len(), 1);
        assert_eq!(files[1].errors[0].document, 2);
        assert_eq!(files[2].errors[0].document, 0);
        assert!(load_files(&[dir.join("nope")]).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn load_paths_fails_on_a_missing_path() {
        let dir = temp_dir("missing");
        let missing = dir.join("nope");
        let err = load_paths(&[missing]).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::NotFound);
        assert!(err.to_string().contains("nope"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn load_paths_reports_non_utf8_files() {
        let dir = temp_dir("utf8");
        std::fs::write(dir.join("bad.yaml"), [0xff, 0xfe, 0x00]).unwrap();
        let (_, errors) = load_paths(std::slice::from_ref(&dir)).unwrap();
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].document, 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
