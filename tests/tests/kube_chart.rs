//! The Helm chart (charts/gatehouse): its CRDs are the generated ones, `helm lint` and
//! `helm template` pass with the default values and with external Redis + ServiceMonitor +
//! NetworkPolicy, and `helm install` / `helm upgrade` work against a real kube-apiserver
//! (built by `scripts/kube-tools.sh`; there is no kubelet, so pods never start and the install
//! does not wait for them). The approval guard (a ValidatingAdmissionPolicy) is checked for real:
//! a user outside the admin groups cannot set or change `gatehouse.dev/approved`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use gatehouse_tests::kube::{self, KubeApiServer, KubeOptions};
use serde_json::Value;

const RELEASE: &str = "gh";
const NAMESPACE: &str = "gatehouse-system";
const GUARD_MESSAGE: &str = "may set or change the gatehouse.dev/approved annotation";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn chart() -> String {
    repo().join("charts/gatehouse").display().to_string()
}

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

/// helm without an API server (lint, template), with its state in a temp dir.
fn helm_offline(args: &[&str]) -> Output {
    let home = tempfile::tempdir().expect("temp dir");
    Command::new(kube::tool("helm"))
        .args(args)
        .env("HELM_CACHE_HOME", home.path().join("cache"))
        .env("HELM_CONFIG_HOME", home.path().join("config"))
        .env("HELM_DATA_HOME", home.path().join("data"))
        .env("KUBECONFIG", home.path().join("no-kubeconfig"))
        .stdin(Stdio::null())
        .output()
        .expect("running helm")
}

fn helm_offline_ok(args: &[&str]) -> String {
    let out = helm_offline(args);
    assert!(
        out.status.success(),
        "helm {args:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `kind: X` lines at the top level of a multi-document manifest.
fn kinds(manifest: &str) -> Vec<String> {
    manifest
        .lines()
        .filter_map(|l| l.strip_prefix("kind: "))
        .map(|k| k.trim().to_string())
        .collect()
}

/// `Kind/name` of every cluster-scoped object in a rendered manifest.
fn cluster_scoped(manifest: &str) -> Vec<String> {
    const KINDS: [&str; 4] = [
        "ClusterRole",
        "ClusterRoleBinding",
        "ValidatingAdmissionPolicy",
        "ValidatingAdmissionPolicyBinding",
    ];
    manifest
        .split("\n---")
        .filter_map(|doc| {
            let kind = doc.lines().find_map(|l| l.strip_prefix("kind: "))?.trim();
            let name = doc
                .lines()
                .skip_while(|l| *l != "metadata:")
                .find_map(|l| l.strip_prefix("  name: "))?
                .trim();
            KINDS.contains(&kind).then(|| format!("{kind}/{name}"))
        })
        .collect()
}

fn count(manifest: &str, kind: &str) -> usize {
    kinds(manifest).iter().filter(|k| *k == kind).count()
}

const EXTERNAL_VALUES: &[&str] = &[
    "--set",
    "redis.enabled=false",
    "--set",
    "externalRedis.url=rediss://redis.example.com:6380/0",
    "--set",
    "externalRedis.password=s3cret-password",
    "--set",
    "metrics.serviceMonitor.enabled=true",
    "--set",
    "networkPolicy.enabled=true",
    "--set",
    "operator.watchNamespaces={demo,shop}",
    "--set",
    "gateway.service.type=NodePort",
    "--set",
    "gateway.service.nodePort=30080",
    "--set-string",
    "gateway.trustedProxies=10.244.0.0/16",
    "--set",
    "gateway.maxSignInStartsPerMinute=600",
];

#[test]
fn kube_chart_crds_are_identical_to_the_generated_ones() {
    let generated = yaml_files(&repo().join("crds"));
    let copies = yaml_files(&repo().join("charts/gatehouse/crds"));
    assert_eq!(
        generated.len(),
        4,
        "expected four CRDs in crds/: {generated:?}"
    );
    let names = |files: &[PathBuf]| -> Vec<String> {
        files
            .iter()
            .map(|p| p.file_name().expect("name").to_string_lossy().into_owned())
            .collect()
    };
    assert_eq!(
        names(&generated),
        names(&copies),
        "charts/gatehouse/crds/ must hold exactly the files of crds/ \
         (fix: cp crds/*.yaml charts/gatehouse/crds/)"
    );
    for (g, c) in generated.iter().zip(&copies) {
        let a = std::fs::read(g).expect("read");
        let b = std::fs::read(c).expect("read");
        assert!(
            a == b,
            "{} differs from {} (fix: cp crds/*.yaml charts/gatehouse/crds/)",
            c.display(),
            g.display()
        );
    }
}

#[test]
fn kube_chart_lints_and_renders_with_default_and_external_values() {
    let chart = chart();
    let lint = helm_offline_ok(&["lint", "--strict", &chart]);
    assert!(lint.contains("0 chart(s) failed"), "{lint}");
    let mut ext_lint = vec!["lint", "--strict", &chart];
    ext_lint.extend_from_slice(EXTERNAL_VALUES);
    helm_offline_ok(&ext_lint);

    // --- defaults: in-cluster Redis with AOF and a PVC ---------------------------------------
    let default = helm_offline_ok(&["template", RELEASE, &chart, "--namespace", NAMESPACE]);
    for (kind, n) in [
        ("Deployment", 2),
        ("StatefulSet", 1),
        ("HorizontalPodAutoscaler", 1),
        ("PodDisruptionBudget", 1),
        ("ClusterRole", 1),
        ("ValidatingAdmissionPolicy", 2),
        ("ValidatingAdmissionPolicyBinding", 2),
        ("ServiceMonitor", 0),
        ("NetworkPolicy", 0),
    ] {
        assert_eq!(count(&default, kind), n, "{kind} in {:?}", kinds(&default));
    }
    for needle in [
        "- --appendonly\n            - \"yes\"",
        "- --appendfsync\n            - \"everysec\"",
        "- --maxmemory\n            - \"400mb\"\n            - --maxmemory-policy\n            - noeviction",
        "volumeClaimTemplates:",
        "readOnlyRootFilesystem: true",
        "runAsNonRoot: true",
        "type: RuntimeDefault",
        "drop:\n              - ALL",
        "topologySpreadConstraints:",
        "preStop:\n              sleep:",
        "terminationGracePeriodSeconds: 40",
        "path: /healthz",
        "path: /readyz",
        "--lease-name=gatehouse-operator",
        "--config-map=gatehouse-system/gh-gatehouse-gateway-config",
        "redis://:$(REDIS_PASSWORD)@gh-gatehouse-redis.gatehouse-system.svc:6379",
        "resourceNames: [gh-gatehouse-gateway-config]",
    ] {
        assert!(default.contains(needle), "default render lacks {needle:?}");
    }
    // Two releases of one name in two namespaces: no cluster-scoped object shares a name.
    let other = helm_offline_ok(&["template", RELEASE, &chart, "--namespace", "gatehouse-two"]);
    let (mine, theirs) = (cluster_scoped(&default), cluster_scoped(&other));
    assert_eq!(mine.len(), 6, "{mine:?}");
    assert!(
        mine.iter().all(|o| !theirs.contains(o)),
        "{mine:?} / {theirs:?}"
    );
    // The operator emits no events, so it may not write them.
    assert!(!default.contains("resources: [events]"), "events RBAC");
    // No wildcard permissions anywhere.
    assert!(!default.contains("\"*\"]\n    verbs") && !default.contains("verbs: [\"*\"]"));

    // --- external Redis, ServiceMonitor, NetworkPolicy, namespaced RBAC ----------------------
    let mut args = vec!["template", RELEASE, &chart, "--namespace", NAMESPACE];
    args.extend_from_slice(EXTERNAL_VALUES);
    let ext = helm_offline_ok(&args);
    for (kind, n) in [
        ("StatefulSet", 0),
        ("ServiceMonitor", 2),
        ("NetworkPolicy", 2),
        ("ClusterRole", 0),
        // one per watched namespace + the operator's and the gateway's own
        ("Role", 4),
    ] {
        assert_eq!(count(&ext, kind), n, "{kind} in {:?}", kinds(&ext));
    }
    assert!(
        ext.contains("rediss://:$(REDIS_PASSWORD)@redis.example.com:6380/0"),
        "external Redis URL not rendered"
    );
    // The gateways cannot reach link-local addresses (cloud instance metadata), but DNS.
    let gateway_policy = ext
        .split("\n---")
        .find(|d| {
            d.contains("\nkind: NetworkPolicy\n") && d.contains("policyTypes: [Ingress, Egress]")
        })
        .unwrap_or_else(|| panic!("no gateway egress policy in {ext}"));
    // The same metadata addresses as compile::is_metadata_ip refuses as upstreams.
    for needle in [
        "except: [169.254.0.0/16, 100.100.100.200/32, 168.63.129.16/32, 192.0.0.192/32]",
        "- fd00:ec2::/64\n",
        "- 64:ff9b::a9fe:0/112\n",
    ] {
        assert!(gateway_policy.contains(needle), "{gateway_policy}");
    }
    assert!(gateway_policy.contains("port: 53"), "{gateway_policy}");
    // One replica and minAvailable 1 (or any percentage of one) would block every node
    // drain: no budget then.
    for min_available in ["1", "50%"] {
        let min = format!("gateway.podDisruptionBudget.minAvailable={min_available}");
        let single = helm_offline_ok(&[
            "template",
            RELEASE,
            &chart,
            "--namespace",
            NAMESPACE,
            "--set",
            "gateway.autoscaling.enabled=false",
            "--set",
            "gateway.replicas=1",
            "--set-string",
            &min,
        ]);
        assert_eq!(count(&single, "PodDisruptionBudget"), 0, "{min}");
    }
    assert_eq!(count(&default, "PodDisruptionBudget"), 1);
    // The ingress's addresses reach the gateway's throttles only when set.
    assert!(ext.contains("- --trusted-proxies=10.244.0.0/16"));
    assert!(!default.contains("--trusted-proxies"));
    assert!(ext.contains("- --max-sign-in-starts-per-minute=600"));
    assert!(default.contains("- --max-sign-in-starts-per-minute=120"));
    assert!(default.contains("- --max-token-grants-per-minute=60\n"));
    assert!(default.contains("- --max-websockets=10000\n"));
    assert!(default.contains("- --max-websockets-per-caller=100\n"));
    // From a values file Helm reads 1000000 as a float and would print 1e+06, which the
    // gateway refuses.
    let big = std::env::temp_dir().join(format!("gatehouse-big-{}.yaml", std::process::id()));
    std::fs::write(
        &big,
        "gateway:\n  maxSignInStartsPerMinute: 1000000\n  maxTokenGrantsPerMinute: 1000000\n  maxWebsockets: 1000000\n",
    )
    .unwrap();
    let big_render = helm_offline_ok(&[
        "template",
        RELEASE,
        &chart,
        "--namespace",
        NAMESPACE,
        "-f",
        &big.display().to_string(),
    ]);
    let _ = std::fs::remove_file(&big);
    assert!(
        big_render.contains("- --max-sign-in-starts-per-minute=1000000\n"),
        "{big_render}"
    );
    assert!(
        big_render.contains("- --max-token-grants-per-minute=1000000\n"),
        "{big_render}"
    );
    assert!(
        big_render.contains("- --max-websockets=1000000\n"),
        "{big_render}"
    );
    assert!(ext.contains("nodePort: 30080"));
    // The NodePort Service carries only the proxy port; the admin port (metrics, readiness
    // with store errors) is on a ClusterIP Service of its own.
    let services: Vec<&str> = ext
        .split("\n---")
        .filter(|d| d.contains("\nkind: Service\n"))
        .collect();
    let public = services
        .iter()
        .find(|d| d.contains("type: NodePort"))
        .expect("a NodePort Service");
    assert!(!public.contains("name: admin"), "{public}");
    let admin = services
        .iter()
        .find(|d| d.contains("name: gh-gatehouse-gateway-admin"))
        .expect("the gateway's admin Service");
    assert!(
        admin.contains("type: ClusterIP") && admin.contains("name: admin"),
        "{admin}"
    );
    assert!(ext.contains("--namespace=demo") && ext.contains("--namespace=shop"));

    // --- values are checked -------------------------------------------------------------------
    let out = helm_offline(&["template", RELEASE, &chart, "--set", "redis.enabled=false"]);
    assert!(
        !out.status.success(),
        "external Redis without a URL rendered"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("externalRedis.url is required"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = helm_offline(&[
        "template",
        RELEASE,
        &chart,
        "--set",
        "gateway.service.type=Ingress",
    ]);
    assert!(
        !out.status.success(),
        "the schema accepted a bad service type"
    );
}

/// `kubectl --as=USER --as-group=GROUP annotate ...` (impersonation by the admin).
fn annotate_as(kube: &KubeApiServer, user: &str, group: &str, extra: &[&str]) -> Output {
    let as_user = format!("--as={user}");
    let as_group = format!("--as-group={group}");
    let mut args = vec![
        as_user.as_str(),
        as_group.as_str(),
        "annotate",
        "subscriptions.gatehouse.dev",
        "demo-app-mobile",
        "-n",
        "demo",
    ];
    args.extend_from_slice(extra);
    kube.kubectl(&args)
}

fn patch_as_operator_named(
    kube: &KubeApiServer,
    as_operator: &str,
    name: &str,
    patch: &str,
) -> Output {
    kube.kubectl(&[
        as_operator,
        "patch",
        "secret",
        name,
        "-n",
        "demo",
        "--type=merge",
        "-p",
        patch,
    ])
}

/// A policy (or its change) takes effect once the API server has compiled it: tries `attempt`
/// (a server dry-run, or a change that is harmless when it goes through) until `done` holds,
/// for at most 30 s; `waiting` says what for.
fn until(waiting: &str, attempt: impl Fn() -> Output, done: impl Fn(&Output) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = attempt();
        if done(&out) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{waiting}: still not after 30 s: {}",
            describe(&out)
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

fn refused_by_guard(out: &Output) -> bool {
    !out.status.success() && String::from_utf8_lossy(&out.stderr).contains(GUARD_MESSAGE)
}

fn describe(out: &Output) -> String {
    format!(
        "{}: {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn kube_chart_installs_on_the_api_server_guards_approval_and_upgrades() {
    let kube = KubeApiServer::start_with(KubeOptions {
        controller_manager: false,
    });
    let chart = chart();

    // --- install (no --wait: pods never run here) -------------------------------------------
    kube.helm_ok(&[
        "install",
        RELEASE,
        &chart,
        "--namespace",
        NAMESPACE,
        "--create-namespace",
        "--set",
        "gateway.issuer=http://localhost:8080",
    ]);
    let manifest = kube.helm_ok(&["get", "manifest", RELEASE, "--namespace", NAMESPACE]);
    let expected = kinds(&manifest);
    assert!(expected.len() >= 20, "rendered: {expected:?}");
    // Every rendered object exists on the server.
    let out = kube.kubectl_stdin(&["get", "-f", "-", "-o", "json"], &manifest);
    assert!(out.status.success(), "kubectl get -f: {}", describe(&out));
    let got: Value = serde_json::from_slice(&out.stdout).expect("kubectl JSON");
    let items = got["items"].as_array().expect("items");
    let mut got_kinds: Vec<String> = items
        .iter()
        .map(|i| i["kind"].as_str().unwrap_or_default().to_string())
        .collect();
    let mut want = expected.clone();
    got_kinds.sort();
    want.sort();
    assert_eq!(got_kinds, want, "objects on the server vs rendered");
    for kind in [
        "ValidatingAdmissionPolicy",
        "ValidatingAdmissionPolicyBinding",
        "StatefulSet",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
    ] {
        assert!(want.iter().any(|k| k == kind), "{kind} not rendered");
    }
    for crd in [
        "apis.gatehouse.dev",
        "plans.gatehouse.dev",
        "applications.gatehouse.dev",
        "subscriptions.gatehouse.dev",
    ] {
        kube.kubectl_ok(&["get", "crd", crd]);
    }
    let secret = kube.get_json(&["secret", "gh-gatehouse-redis", "-n", NAMESPACE]);
    let password = secret["data"]["redis-password"]
        .as_str()
        .expect("redis password")
        .to_string();
    assert!(!password.is_empty());

    // The operator's service account can do what it needs and no more.
    let sa = format!("--as=system:serviceaccount:{NAMESPACE}:gh-gatehouse-operator");
    let can = |args: &[&str]| -> bool {
        let mut all = vec![sa.as_str(), "auth", "can-i"];
        all.extend_from_slice(args);
        kube.kubectl(&all).status.success()
    };
    assert!(can(&["watch", "subscriptions.gatehouse.dev", "-A"]));
    assert!(can(&[
        "patch",
        "subscriptions.gatehouse.dev",
        "--subresource=status",
        "-n",
        "demo"
    ]));
    assert!(can(&["create", "secrets", "-n", "demo"]));
    assert!(can(&["patch", "secrets", "-n", "demo"]));
    assert!(can(&[
        "patch",
        "configmap/gh-gatehouse-gateway-config",
        "-n",
        NAMESPACE
    ]));
    assert!(can(&[
        "update",
        "lease/gatehouse-operator",
        "-n",
        NAMESPACE
    ]));
    // It deletes a Secret it created when recording it in the status was refused.
    assert!(can(&["delete", "secrets", "-n", "demo"]));
    assert!(!can(&[
        "patch",
        "subscriptions.gatehouse.dev",
        "-n",
        "demo"
    ]));
    assert!(!can(&["patch", "configmap/other", "-n", NAMESPACE]));
    let gw = format!("--as=system:serviceaccount:{NAMESPACE}:gh-gatehouse-gateway");
    let gw_can = |args: &[&str]| -> bool {
        let mut all = vec![gw.as_str(), "auth", "can-i"];
        all.extend_from_slice(args);
        kube.kubectl(&all).status.success()
    };
    assert!(gw_can(&[
        "watch",
        "configmap/gh-gatehouse-gateway-config",
        "-n",
        NAMESPACE
    ]));
    assert!(!gw_can(&["get", "configmap/other", "-n", NAMESPACE]));
    assert!(!gw_can(&["get", "secrets", "-n", NAMESPACE]));

    // --- the approval guard ------------------------------------------------------------------
    kube.kubectl_ok(&[
        "apply",
        "-f",
        &repo().join("examples/mobile").display().to_string(),
    ]);
    // alice (group devs) and bob (group gatehouse:admins) may edit subscriptions in demo.
    kube.apply(
        "apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: subscription-editor, namespace: demo}
rules:
- apiGroups: [gatehouse.dev]
  resources: [subscriptions]
  verbs: [get, list, create, update, patch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: subscription-editors, namespace: demo}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: subscription-editor}
subjects:
- {apiGroup: rbac.authorization.k8s.io, kind: User, name: alice}
- {apiGroup: rbac.authorization.k8s.io, kind: User, name: bob}
",
    );
    until(
        "the approval guard refusing alice",
        || {
            annotate_as(
                &kube,
                "alice",
                "devs",
                &["gatehouse.dev/approved=true", "--dry-run=server"],
            )
        },
        refused_by_guard,
    );
    // A non-admin: setting the annotation is refused, with the policy's message ...
    let out = annotate_as(&kube, "alice", "devs", &["gatehouse.dev/approved=true"]);
    assert!(refused_by_guard(&out), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("gh-gatehouse-gatehouse-system-approval-guard"),
        "{}",
        describe(&out)
    );
    // ... other annotations are fine (so the refusal is the policy, not RBAC).
    let out = annotate_as(&kube, "alice", "devs", &["example.com/note=hello"]);
    assert!(out.status.success(), "{}", describe(&out));
    // Creating a Subscription that is already approved is refused too.
    let created = kube.kubectl_stdin(
        &["--as=alice", "--as-group=devs", "apply", "-f", "-"],
        "apiVersion: gatehouse.dev/v1alpha1
kind: Subscription
metadata:
  name: sneaky
  namespace: demo
  annotations: {gatehouse.dev/approved: \"true\"}
spec: {application: demo-app, api: mobile, plan: premium}
",
    );
    assert!(refused_by_guard(&created), "{}", describe(&created));
    // So is a trusted one (no consent screen for its users), approved or not.
    let trusted = kube.kubectl_stdin(
        &["--as=alice", "--as-group=devs", "apply", "-f", "-"],
        "apiVersion: gatehouse.dev/v1alpha1
kind: Subscription
metadata: {name: trusty, namespace: demo}
spec: {application: demo-app, api: mobile, plan: premium, trusted: true}
",
    );
    assert!(
        !trusted.status.success()
            && String::from_utf8_lossy(&trusted.stderr).contains("may mark a Subscription trusted"),
        "{}",
        describe(&trusted)
    );
    // One an admin trusted keeps its trust only while it stays what was trusted.
    kube.apply(
        "apiVersion: gatehouse.dev/v1alpha1
kind: Subscription
metadata: {name: trusty, namespace: demo}
spec: {application: demo-app, api: mobile, plan: premium, trusted: true}
",
    );
    let note = kube.kubectl(&[
        "--as=alice",
        "--as-group=devs",
        "annotate",
        "subscriptions.gatehouse.dev",
        "trusty",
        "-n",
        "demo",
        "example.com/note=fine",
    ]);
    assert!(note.status.success(), "{}", describe(&note));
    let moved = kube.kubectl(&[
        "--as=alice",
        "--as-group=devs",
        "patch",
        "subscriptions.gatehouse.dev",
        "trusty",
        "-n",
        "demo",
        "--type=merge",
        "-p",
        r#"{"spec":{"plan":"basic"}}"#,
    ]);
    assert!(
        !moved.status.success()
            && String::from_utf8_lossy(&moved.stderr).contains("may mark a Subscription trusted"),
        "{}",
        describe(&moved)
    );
    kube.kubectl_ok(&[
        "delete",
        "subscriptions.gatehouse.dev",
        "trusty",
        "-n",
        "demo",
    ]);

    // The cluster admin (system:masters) approves.
    kube.kubectl_ok(&[
        "annotate",
        "subscriptions.gatehouse.dev",
        "demo-app-mobile",
        "-n",
        "demo",
        "gatehouse.dev/approved=true",
    ]);
    // Nor can she move the approved subscription to another plan (or api, application, trust).
    for patch in [
        r#"{"spec":{"plan":"premium"}}"#,
        r#"{"spec":{"trusted":true}}"#,
    ] {
        let out = kube.kubectl(&[
            "--as=alice",
            "--as-group=devs",
            "patch",
            "subscriptions.gatehouse.dev",
            "demo-app-mobile",
            "-n",
            "demo",
            "--type=merge",
            "-p",
            patch,
        ]);
        assert!(
            !out.status.success()
                && String::from_utf8_lossy(&out.stderr)
                    .contains("of an approved Subscription may only be changed by members of"),
            "{patch}: {}",
            describe(&out)
        );
    }
    // alice can neither change nor remove it, but may still edit other things.
    let out = annotate_as(
        &kube,
        "alice",
        "devs",
        &["--overwrite", "gatehouse.dev/approved=false"],
    );
    assert!(refused_by_guard(&out), "{}", describe(&out));
    let out = annotate_as(&kube, "alice", "devs", &["gatehouse.dev/approved-"]);
    assert!(refused_by_guard(&out), "{}", describe(&out));
    let out = annotate_as(
        &kube,
        "alice",
        "devs",
        &["--overwrite", "example.com/note=again"],
    );
    assert!(out.status.success(), "{}", describe(&out));
    // A member of the configured admin group may change it.
    let out = annotate_as(
        &kube,
        "bob",
        "gatehouse:admins",
        &["--overwrite", "gatehouse.dev/approved=false"],
    );
    assert!(out.status.success(), "{}", describe(&out));
    let sub = kube.get_json(&[
        "subscriptions.gatehouse.dev",
        "demo-app-mobile",
        "-n",
        "demo",
    ]);
    assert_eq!(
        sub["metadata"]["annotations"]["gatehouse.dev/approved"], "false",
        "{sub}"
    );

    // --- the operator's Secret writes --------------------------------------------------------
    // RBAC lets the operator write any Secret; the policy lets it write only what
    // reconcile::secret_object makes: an Opaque `<subscription>-credentials` controlled by that
    // Subscription, with the one label, no annotations and only clientId/clientSecret (never a
    // service-account token Secret, which Kubernetes would fill with a token it could read).
    let sub_uid = sub["metadata"]["uid"].as_str().expect("subscription uid");
    let as_operator = format!("--as=system:serviceaccount:{NAMESPACE}:gh-gatehouse-operator");
    let owner = format!(
        "[{{apiVersion: gatehouse.dev/v1alpha1, kind: Subscription, name: demo-app-mobile, uid: {sub_uid}, controller: true}}]"
    );
    let ours = "{app.kubernetes.io/managed-by: gatehouse-operator}";
    // A Secret in demo: name, type, labels, ownerReferences, extra metadata lines, data.
    let secret = |name: &str, kind: &str, labels: &str, owners: &str, extra: &str, data: &str| {
        format!(
            "apiVersion: v1\nkind: Secret\nmetadata:\n  name: {name}\n  namespace: demo\n  labels: {labels}\n  ownerReferences: {owners}\n{extra}type: {kind}\nstringData: {data}\n"
        )
    };
    let legit = |name: &str| {
        secret(
            name,
            "Opaque",
            ours,
            &owner,
            "",
            "{clientId: c, clientSecret: s}",
        )
    };
    let create = |yaml: &str| {
        kube.kubectl_stdin(
            &[
                as_operator.as_str(),
                "create",
                "--dry-run=server",
                "-f",
                "-",
            ],
            yaml,
        )
    };
    // The policy's own message, not just its name: an expression that fails to evaluate is
    // refused too (failurePolicy Fail), with another message.
    let refused = |out: &Output| {
        !out.status.success()
            && String::from_utf8_lossy(&out.stderr)
                .contains("the gatehouse operator only writes its own credentials Secrets")
    };
    until(
        "the operator's Secret guard refusing a planted Secret",
        || create(&legit("planted")),
        refused,
    );
    let name = "demo-app-mobile-credentials";
    let sa_token = "  annotations: {kubernetes.io/service-account.name: default}\n";
    for (what, yaml) in [
        (
            "a service-account token",
            secret(
                name,
                "kubernetes.io/service-account-token",
                ours,
                &owner,
                sa_token,
                "{}",
            ),
        ),
        (
            "unowned",
            secret(name, "Opaque", ours, "[]", "", "{clientId: c}"),
        ),
        (
            "unlabelled",
            secret(name, "Opaque", "{}", &owner, "", "{clientId: c}"),
        ),
        (
            "another label",
            secret(
                name,
                "Opaque",
                "{app.kubernetes.io/managed-by: gatehouse-operator, argocd.argoproj.io/secret-type: cluster}",
                &owner,
                "",
                "{clientId: c}",
            ),
        ),
        (
            "annotated",
            secret(
                name,
                "Opaque",
                ours,
                &owner,
                "  annotations: {a: b}\n",
                "{clientId: c}",
            ),
        ),
        (
            "another key",
            secret(name, "Opaque", ours, &owner, "", "{config: x}"),
        ),
    ] {
        let out = create(&yaml);
        assert!(refused(&out), "{what}: {}", describe(&out));
    }
    // What the operator does with its Secrets passes: create, the clientId patch (a merge
    // patch naming the Secret's uid, controller.rs), delete.
    let out = create(&legit(name));
    assert!(out.status.success(), "{}", describe(&out));
    let out = kube.kubectl_stdin(&["create", "-f", "-"], &legit(name));
    assert!(out.status.success(), "{}", describe(&out));
    let secret_uid = kube.get_json(&["secret", name, "-n", "demo"])["metadata"]["uid"]
        .as_str()
        .expect("secret uid")
        .to_string();
    let patch_as_operator = |patch: &str| patch_as_operator_named(&kube, &as_operator, name, patch);
    let out = patch_as_operator(&format!(
        r#"{{"metadata":{{"uid":"{secret_uid}"}},"stringData":{{"clientId":"renamed"}}}}"#
    ));
    assert!(out.status.success(), "{}", describe(&out));
    for patch in [
        r#"{"stringData":{"config":"x"}}"#,
        r#"{"metadata":{"labels":{"argocd.argoproj.io/secret-type":"cluster"}}}"#,
        r#"{"metadata":{"annotations":{"a":"b"}}}"#,
    ] {
        let out = patch_as_operator(patch);
        assert!(refused(&out), "{patch}: {}", describe(&out));
    }
    let out = kube.kubectl(&[
        as_operator.as_str(),
        "delete",
        "secret",
        name,
        "-n",
        "demo",
        "--dry-run=server",
    ]);
    assert!(out.status.success(), "{}", describe(&out));
    kube.kubectl_ok(&["delete", "secret", name, "-n", "demo"]);
    // Another Secret of the namespace: not the operator's to change or delete.
    kube.kubectl_ok(&[
        "create",
        "secret",
        "generic",
        "unrelated",
        "-n",
        "demo",
        "--from-literal=k=v",
    ]);
    let out = patch_as_operator_named(
        &kube,
        &as_operator,
        "unrelated",
        r#"{"stringData":{"k":"w"}}"#,
    );
    assert!(refused(&out), "{}", describe(&out));
    let out = kube.kubectl(&[
        as_operator.as_str(),
        "delete",
        "secret",
        "unrelated",
        "-n",
        "demo",
    ]);
    assert!(refused(&out), "{}", describe(&out));
    // Anyone else is not affected by it.
    kube.kubectl_ok(&["delete", "secret", "unrelated", "-n", "demo"]);

    // --- upgrade with changed values ---------------------------------------------------------
    kube.helm_ok(&[
        "upgrade",
        RELEASE,
        &chart,
        "--namespace",
        NAMESPACE,
        "--reuse-values",
        "--set",
        "gateway.autoscaling.enabled=false",
        "--set",
        "gateway.replicas=3",
        "--set",
        "operator.replicas=1",
        "--set",
        "gateway.service.type=NodePort",
        "--set",
        "gateway.service.nodePort=30080",
        "--set",
        "approvalGuard.adminUsers={carol}",
        "--set",
        "networkPolicy.enabled=true",
    ]);
    let status = kube.helm_ok(&["status", RELEASE, "--namespace", NAMESPACE, "-o", "json"]);
    let status: Value = serde_json::from_str(&status).expect("helm status JSON");
    assert_eq!(status["info"]["status"], "deployed", "{status}");
    assert_eq!(status["version"], 2, "{status}");
    let gw = kube.get_json(&["deployment", "gh-gatehouse-gateway", "-n", NAMESPACE]);
    assert_eq!(gw["spec"]["replicas"], 3, "{gw}");
    let op = kube.get_json(&["deployment", "gh-gatehouse-operator", "-n", NAMESPACE]);
    assert_eq!(op["spec"]["replicas"], 1, "{op}");
    let svc = kube.get_json(&["service", "gh-gatehouse-gateway", "-n", NAMESPACE]);
    assert_eq!(svc["spec"]["type"], "NodePort", "{svc}");
    assert_eq!(svc["spec"]["ports"][0]["nodePort"], 30080, "{svc}");
    // The API server took the policies as written (its validation, e.g. of the IPv6 block).
    let np = kube.get_json(&["networkpolicy", "gh-gatehouse-gateway", "-n", NAMESPACE]);
    assert_eq!(np["spec"]["policyTypes"][1], "Egress", "{np}");
    assert_eq!(
        np["spec"]["egress"][1]["to"][0]["ipBlock"]["except"][0], "169.254.0.0/16",
        "{np}"
    );
    let hpa = kube.kubectl(&["get", "hpa", "gh-gatehouse-gateway", "-n", NAMESPACE]);
    assert!(
        !hpa.status.success(),
        "the HPA survived autoscaling.enabled=false"
    );
    // The Redis password (and so the data on its volume) is kept across upgrades.
    let secret = kube.get_json(&["secret", "gh-gatehouse-redis", "-n", NAMESPACE]);
    assert_eq!(secret["data"]["redis-password"], password.as_str());
    // The new admin user takes effect (once the API server has the updated policy).
    kube.kubectl_ok(&[
        "create",
        "rolebinding",
        "carol-edits-subscriptions",
        "--role=subscription-editor",
        "--user=carol",
        "-n",
        "demo",
    ]);
    until(
        "carol (approvalGuard.adminUsers after the upgrade) allowed",
        || {
            annotate_as(
                &kube,
                "carol",
                "devs",
                &["--overwrite", "gatehouse.dev/approved=true"],
            )
        },
        |out| out.status.success(),
    );
}
