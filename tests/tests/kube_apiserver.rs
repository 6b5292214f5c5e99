//! Against a real kube-apiserver + etcd (+ kube-controller-manager), built by
//! `scripts/kube-tools.sh`: our generated CRDs are accepted (structural schemas), the mobile
//! example applies with its defaults filled in by the API server, and a Secret owned by a
//! Subscription is garbage-collected when the Subscription is deleted.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use gatehouse_tests::kube::{KubeApiServer, KubeOptions};
use serde_json::Value;

const CRDS: [&str; 4] = [
    "apis.gatehouse.dev",
    "plans.gatehouse.dev",
    "applications.gatehouse.dev",
    "subscriptions.gatehouse.dev",
];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn crd_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo().join("crds"))
        .expect("crds/")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert_eq!(
        files.len(),
        4,
        "expected four CRD files in crds/: {files:?}"
    );
    files
}

fn install_crds(kube: &KubeApiServer) {
    for file in crd_files() {
        kube.kubectl_ok(&["apply", "--server-side", "-f", &file.display().to_string()]);
    }
    let mut args = vec!["wait", "--for=condition=Established", "--timeout=30s"];
    let names: Vec<String> = CRDS.iter().map(|c| format!("crd/{c}")).collect();
    args.extend(names.iter().map(String::as_str));
    kube.kubectl_ok(&args);
}

fn condition<'a>(obj: &'a Value, kind: &str) -> Option<&'a Value> {
    obj["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == kind)
}

#[test]
fn kube_apiserver_accepts_crds_applies_examples_with_defaults_and_collects_owned_secrets() {
    // The controller-manager is started once the CRDs exist, so that its garbage collector
    // watches Subscriptions from its first discovery (it re-reads discovery only every 30 s).
    let mut kube = KubeApiServer::start_with(KubeOptions {
        controller_manager: false,
    });
    eprintln!("etcd + kube-apiserver ready in {:.1?}", kube.startup_time());

    // --- CRDs: accepted, Established, structural ------------------------------------------
    let t = Instant::now();
    install_crds(&kube);
    eprintln!("CRDs established in {:.1?}", t.elapsed());
    kube.start_controller_manager();
    for crd in CRDS {
        let obj = kube.get_json(&["crd", crd]);
        let established = condition(&obj, "Established").expect("Established condition");
        assert_eq!(established["status"], "True", "{crd}: {established}");
        if let Some(c) = condition(&obj, "NonStructuralSchema") {
            assert_ne!(
                c["status"], "True",
                "{crd} has a non-structural schema: {c}"
            );
        }
    }

    // --- examples/mobile (namespace file included) ------------------------------------------
    let examples = repo().join("examples/mobile");
    kube.kubectl_ok(&["apply", "-f", &examples.display().to_string()]);

    let api = kube.get_json(&["apis.gatehouse.dev", "mobile", "-n", "demo"]);
    assert_eq!(api["spec"]["pathPrefix"], "/mobile", "{api}");
    assert_eq!(api["spec"]["upstream"]["stripPrefix"], true, "{api}");

    let subs = kube.get_json(&["subscriptions.gatehouse.dev", "-n", "demo"]);
    let items = subs["items"].as_array().expect("items");
    assert_eq!(items.len(), 2, "{subs}");
    // demo-service-mobile does not set `trusted`: the CRD's default fills it in.
    let service = kube.get_json(&[
        "subscriptions.gatehouse.dev",
        "demo-service-mobile",
        "-n",
        "demo",
    ]);
    assert_eq!(
        service["spec"]["trusted"], false,
        "default not applied: {service}"
    );
    assert_eq!(
        service["spec"]["clientSecretRef"]["name"], "demo-service-mobile-credentials",
        "{service}"
    );

    let plans = kube.get_json(&["plans.gatehouse.dev", "-n", "demo"]);
    assert_eq!(plans["items"].as_array().map(Vec::len), Some(2), "{plans}");
    let apps = kube.get_json(&["applications.gatehouse.dev", "-n", "demo"]);
    assert_eq!(apps["items"].as_array().map(Vec::len), Some(2), "{apps}");

    // The schema is enforced by the server: a wrong type is rejected.
    let bad = kube.kubectl_stdin(
        &["apply", "-f", "-"],
        "apiVersion: gatehouse.dev/v1alpha1
kind: Plan
metadata: {name: broken, namespace: demo}
spec:
  rateLimits:
  - requests: lots
    per: second
",
    );
    assert!(
        !bad.status.success(),
        "a Plan with requests: lots was accepted"
    );
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(stderr.contains("requests"), "unexpected error: {stderr}");

    // Printer columns work (what `kubectl get subscriptions` shows users).
    let table = kube.kubectl_ok(&["get", "subscriptions.gatehouse.dev", "-n", "demo"]);
    assert!(
        table.contains("APPLICATION") && table.contains("demo-app-mobile"),
        "{table}"
    );

    // helm can talk to this server with the same kubeconfig.
    kube.helm_ok(&["list", "--all-namespaces"]);

    // --- owner-reference garbage collection (kube-controller-manager) ----------------------
    // Only once the collector monitors Subscriptions is the deletion below seen at once.
    let t = Instant::now();
    kube.wait_garbage_collector_knows(
        "gatehouse.dev/v1alpha1, Resource=subscriptions",
        Duration::from_secs(60),
    );
    eprintln!(
        "garbage collector monitors subscriptions after {:.1?}",
        t.elapsed()
    );

    let sub = kube.get_json(&[
        "subscriptions.gatehouse.dev",
        "demo-app-mobile",
        "-n",
        "demo",
    ]);
    let uid = sub["metadata"]["uid"].as_str().expect("uid");
    kube.apply(&format!(
        "apiVersion: v1
kind: Secret
metadata:
  name: demo-app-mobile-credentials
  namespace: demo
  ownerReferences:
  - apiVersion: gatehouse.dev/v1alpha1
    kind: Subscription
    name: demo-app-mobile
    uid: {uid}
type: Opaque
stringData:
  clientId: demo-app-mobile
"
    ));
    kube.kubectl_ok(&["get", "secret", "demo-app-mobile-credentials", "-n", "demo"]);

    kube.kubectl_ok(&[
        "delete",
        "subscriptions.gatehouse.dev",
        "demo-app-mobile",
        "-n",
        "demo",
    ]);
    let deleted = Instant::now();
    loop {
        let out = kube.kubectl(&["get", "secret", "demo-app-mobile-credentials", "-n", "demo"]);
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(stderr.contains("NotFound"), "unexpected: {stderr}");
            break;
        }
        assert!(
            deleted.elapsed() < Duration::from_secs(30),
            "the Secret owned by the deleted Subscription still exists after 30 s{}",
            kube.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!(
        "owned Secret collected {:.1?} after the Subscription was deleted",
        deleted.elapsed()
    );

    // The other subscription's objects are untouched.
    kube.kubectl_ok(&[
        "get",
        "secret",
        "demo-service-mobile-credentials",
        "-n",
        "demo",
    ]);
}
