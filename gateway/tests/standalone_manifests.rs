//! Standalone manifests: a bad file keeps its last good version (or is left out) while the
//! other files apply; a replaced or symlink-flipped folder is still watched.

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Once};
use std::time::{Duration, Instant};

use gatehouse_gateway::ratelimit::local::LocalLimiter;
use gatehouse_gateway::source::{self, Manifests};
use gatehouse_gateway::state::AppState;
use gatehouse_gateway::store::embedded::EmbeddedStore;

fn base(limit: u32) -> String {
    format!(
        r#"apiVersion: gatehouse.dev/v1alpha1
kind: Plan
metadata: {{name: basic, namespace: t}}
spec:
  rateLimits: [{{requests: {limit}, per: second}}]
---
apiVersion: gatehouse.dev/v1alpha1
kind: Api
metadata: {{name: mobile, namespace: t}}
spec:
  pathPrefix: /mobile
  upstream: {{url: "http://127.0.0.1:9"}}
  plans: [basic]
  auth: {{grants: [client_credentials]}}
---
apiVersion: gatehouse.dev/v1alpha1
kind: Application
metadata: {{name: svc, namespace: t}}
spec: {{clientType: confidential}}
---
apiVersion: v1
kind: Secret
metadata: {{name: svc-credentials, namespace: t, labels: {{gatehouse.dev/client-secret: "true"}}}}
stringData: {{clientSecret: "service-secret-0123456789abcdef0123"}}
"#
    )
}

fn subscription(name: &str) -> String {
    format!(
        r#"---
apiVersion: gatehouse.dev/v1alpha1
kind: Subscription
metadata: {{name: {name}, namespace: t}}
spec:
  application: svc
  api: mobile
  plan: basic
  clientId: {name}
  clientSecretRef: {{name: svc-credentials, key: clientSecret}}
"#
    )
}

/// An application of its own with its subscription: a client independent of the others.
fn client(name: &str) -> String {
    format!(
        r#"---
apiVersion: gatehouse.dev/v1alpha1
kind: Application
metadata: {{name: {name}, namespace: t}}
spec: {{clientType: confidential}}
---
apiVersion: gatehouse.dev/v1alpha1
kind: Subscription
metadata: {{name: {name}, namespace: t}}
spec:
  application: {name}
  api: mobile
  plan: basic
  clientId: {name}
  clientSecretRef: {{name: svc-credentials, key: clientSecret}}
"#
    )
}

fn state(data: &Path) -> Arc<AppState> {
    Arc::new(AppState::new(
        Arc::new(EmbeddedStore::open(data).unwrap()),
        Arc::new(LocalLimiter::default()),
        "http://gw.test",
    ))
}

/// A state on a store in `data` with the manifests at `path` loaded and watched; the watch task.
fn watched(path: &Path, data: &Path) -> (Arc<AppState>, tokio::task::JoinHandle<()>) {
    let st = state(data);
    let mut manifests = Manifests::new(vec![path.to_path_buf()]);
    manifests.reload(&st).unwrap();
    let watch = source::watch(st.clone(), manifests).unwrap();
    (st, watch)
}

/// The first limit of the first plan: what the tests' edits change.
fn limit(st: &AppState) -> u64 {
    st.config.load().plans[0].rate_limits[0].requests
}

async fn eventually(what: &str, secs: u64, check: impl Fn() -> bool) -> bool {
    let end = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < end {
        if check() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("timed out: {what}");
    false
}

/// Removing a subscription takes effect while another file in the folder has a document that
/// does not parse (DESIGN section 2: "One invalid resource never blocks the others").
#[tokio::test]
async fn a_bad_document_elsewhere_does_not_keep_a_removed_subscription_alive() {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("manifests");
    std::fs::create_dir_all(&m).unwrap();
    std::fs::write(m.join("a.yaml"), base(10) + &subscription("svc-mobile")).unwrap();
    let st = state(&dir.path().join("data"));
    source::reload(&st, std::slice::from_ref(&m)).unwrap();
    assert!(st.config.load().client("svc-mobile").is_some());

    // An operator revokes the subscription; a teammate's unrelated file has a typo.
    std::fs::write(m.join("a.yaml"), base(10)).unwrap();
    std::fs::write(
        m.join("b.yaml"),
        "apiVersion: gatehouse.dev/v1alpha1\nkind: Application\nmetadata: {name: other, namespace: t}\nspec: {clientType: confidentail}\n",
    )
    .unwrap();
    let result = source::reload(&st, std::slice::from_ref(&m));
    println!("{result:?}");
    assert!(
        st.config.load().client("svc-mobile").is_none(),
        "the removed subscription still issues tokens"
    );
}

const BAD_APPLICATION: &str = "apiVersion: gatehouse.dev/v1alpha1\nkind: Application\nmetadata: {name: other, namespace: t}\nspec: {clientType: confidentail}\n";

thread_local! {
    static CAPTURED: RefCell<Option<Vec<u8>>> = const { RefCell::new(None) };
}

/// The log lines written on this thread while `f` runs. One global subscriber writes into the
/// thread's buffer: per-test scoped subscribers miss events when parallel tests register the
/// same callsites without one.
fn logged<T>(f: impl FnOnce() -> T) -> (T, String) {
    struct ThreadBuffer;
    impl std::io::Write for ThreadBuffer {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            CAPTURED.with_borrow_mut(|c| c.as_mut().map(|c| c.extend_from_slice(b)));
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(|| ThreadBuffer)
            .finish();
        tracing::subscriber::set_global_default(subscriber).unwrap();
    });
    CAPTURED.set(Some(Vec::new()));
    let out = f();
    let text = String::from_utf8(CAPTURED.take().unwrap_or_default()).unwrap();
    (out, text)
}

fn clients(st: &AppState) -> Vec<String> {
    let mut ids: Vec<String> = st
        .config
        .load()
        .config
        .clients
        .iter()
        .map(|c| c.client_id.clone())
        .collect();
    ids.sort();
    ids
}

/// A file that stops parsing keeps the version of it that last loaded cleanly, and says so
/// with its file and document; at the same time another file's changes (a subscription
/// removed, one added) apply. Fixed, it applies too.
#[test]
fn a_broken_file_keeps_its_last_good_version_while_the_other_files_apply() {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("manifests");
    std::fs::create_dir_all(&m).unwrap();
    std::fs::write(m.join("a.yaml"), base(10)).unwrap();
    std::fs::write(m.join("b.yaml"), client("svc-mobile")).unwrap();
    std::fs::write(m.join("c.yaml"), client("svc-web")).unwrap();
    let st = state(&dir.path().join("data"));
    let mut manifests = Manifests::new(vec![m.clone()]);
    assert!(manifests.reload(&st).unwrap());
    assert_eq!(clients(&st), ["svc-mobile", "svc-web"]);

    // b.yaml half-saved (the subscription gone, a bad document in its place); c.yaml edited.
    std::fs::write(m.join("b.yaml"), BAD_APPLICATION).unwrap();
    std::fs::write(m.join("c.yaml"), client("svc-new")).unwrap();
    let (result, logs) = logged(|| manifests.reload(&st));
    assert!(result.unwrap());
    assert_eq!(clients(&st), ["svc-mobile", "svc-new"], "{logs}");
    let b = m.join("b.yaml").display().to_string();
    assert!(
        logs.contains(&format!(
            "{b}: document 1: Application t/other: spec.clientType"
        )),
        "{logs}"
    );
    assert!(
        logs.contains("keeping the previous configuration from this file"),
        "{logs}"
    );

    // Fixed: b.yaml's new version applies.
    std::fs::write(m.join("b.yaml"), "").unwrap();
    assert!(manifests.reload(&st).unwrap());
    assert_eq!(clients(&st), ["svc-new"]);

    // Broken again: its last good version is now the empty one.
    std::fs::write(
        m.join("b.yaml"),
        BAD_APPLICATION.to_string() + &client("svc-mobile"),
    )
    .unwrap();
    assert!(!manifests.reload(&st).unwrap(), "nothing changed");
    assert_eq!(clients(&st), ["svc-new"]);
}

/// At start-up a bad file is left out, with an error that names it and does not claim a
/// previous configuration, and the gateway starts with the other files.
#[test]
fn at_start_up_a_bad_file_is_left_out_and_the_rest_loads() {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("manifests");
    std::fs::create_dir_all(&m).unwrap();
    std::fs::write(m.join("a.yaml"), base(10) + &client("svc-mobile")).unwrap();
    // A good subscription next to the bad document: the whole file is left out.
    std::fs::write(
        m.join("b.yaml"),
        client("svc-web") + "---\n" + BAD_APPLICATION,
    )
    .unwrap();
    let st = state(&dir.path().join("data"));
    let (result, logs) = logged(|| Manifests::new(vec![m.clone()]).reload(&st));
    assert!(result.unwrap());
    assert!(st.config.load().loaded);
    assert_eq!(clients(&st), ["svc-mobile"]);
    let b = m.join("b.yaml").display().to_string();
    assert!(logs.contains(&format!("{b}: document ")), "{logs}");
    assert!(logs.contains("spec.clientType: unknown variant"), "{logs}");
    assert!(logs.contains("this file is left out"), "{logs}");
    assert!(!logs.contains("keeping the previous"), "{logs}");

    // A path that cannot be read at all is still an error to report.
    let missing: PathBuf = dir.path().join("nope");
    let err = Manifests::new(vec![missing]).reload(&st).unwrap_err();
    assert!(
        err.to_string().starts_with("cannot read manifests: "),
        "{err}"
    );
    assert!(!err.to_string().contains("keeping"), "{err}");
}

/// A folder replaced by renaming (`mv new current`, as deploy tools do) is watched again: later
/// edits of the new folder are loaded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edits_after_the_folder_was_replaced_are_loaded() {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("manifests");
    std::fs::create_dir_all(&m).unwrap();
    std::fs::write(m.join("all.yaml"), base(10)).unwrap();
    let (st, _w) = watched(&m, &dir.path().join("data"));

    // Sanity: an edit in place is picked up.
    std::fs::write(m.join("all.yaml"), base(11)).unwrap();
    assert!(eventually("edit in place", 5, || limit(&st) == 11).await);

    // Replace the folder.
    let new = dir.path().join("manifests.new");
    std::fs::create_dir_all(&new).unwrap();
    std::fs::write(new.join("all.yaml"), base(12)).unwrap();
    std::fs::rename(&m, dir.path().join("manifests.old")).unwrap();
    std::fs::rename(&new, &m).unwrap();
    assert!(eventually("replaced folder", 5, || limit(&st) == 12).await);

    // A later edit of the (new) folder.
    tokio::time::sleep(Duration::from_millis(500)).await;
    std::fs::write(m.join("all.yaml"), base(13)).unwrap();
    assert!(
        eventually("edit after replacement", 5, || limit(&st) == 13).await,
        "edits after the folder was replaced are ignored until a restart (limit is {})",
        limit(&st)
    );
}

/// `--manifests current` where `current` is a symlink to a release folder: flipping the
/// symlink (`ln -sfn v2 current`) loads the new release.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flipped_symlink_folder_is_reloaded() {
    let dir = tempfile::tempdir().unwrap();
    for (v, n) in [("v1", 10), ("v2", 20)] {
        std::fs::create_dir_all(dir.path().join(v)).unwrap();
        std::fs::write(dir.path().join(v).join("all.yaml"), base(n)).unwrap();
    }
    let current = dir.path().join("current");
    std::os::unix::fs::symlink("v1", &current).unwrap();
    let (st, _w) = watched(&current, &dir.path().join("data"));
    assert_eq!(limit(&st), 10);

    // ln -sfn v2 current (atomically: a new link renamed over the old one)
    let tmp = dir.path().join(".current.tmp");
    std::os::unix::fs::symlink("v2", &tmp).unwrap();
    std::fs::rename(&tmp, &current).unwrap();
    assert!(
        eventually("symlink flip", 5, || limit(&st) == 20).await,
        "still serving v1 after the flip (limit {})",
        limit(&st)
    );
}

/// A folder deleted and created again (`rm -rf m && cp -r new m`; ext4 may reuse its inode) is
/// watched again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edits_after_the_folder_was_deleted_and_created_again_are_loaded() {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("manifests");
    std::fs::create_dir_all(&m).unwrap();
    std::fs::write(m.join("all.yaml"), base(10)).unwrap();
    let (st, _w) = watched(&m, &dir.path().join("data"));

    std::fs::remove_dir_all(&m).unwrap();
    std::fs::create_dir_all(&m).unwrap();
    std::fs::write(m.join("all.yaml"), base(12)).unwrap();
    assert!(eventually("re-created folder", 5, || limit(&st) == 12).await);

    tokio::time::sleep(Duration::from_millis(500)).await;
    std::fs::write(m.join("all.yaml"), base(13)).unwrap();
    assert!(
        eventually("edit after re-creation", 5, || limit(&st) == 13).await,
        "edits after the folder was re-created are ignored (limit is {})",
        limit(&st)
    );
}

/// An Api added later in another namespace cannot take the prefix (or part of it) of the Api
/// being served, even when it would win by order (its namespace sorts first, and files carry no
/// creation time): the served one keeps its prefix across reloads.
#[test]
fn a_served_prefix_stays_with_its_api_across_reloads() {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("manifests");
    std::fs::create_dir_all(&m).unwrap();
    std::fs::write(m.join("a.yaml"), base(10)).unwrap();
    let st = state(&dir.path().join("data"));
    let mut manifests = Manifests::new(vec![m.clone()]);
    manifests.reload(&st).unwrap();
    let served = |st: &AppState| -> Vec<(String, String)> {
        st.config
            .load()
            .config
            .apis
            .iter()
            .map(|a| (a.id.clone(), a.path_prefix.clone()))
            .collect()
    };
    assert_eq!(served(&st), [("t/mobile".into(), "/mobile".into())]);

    let other = |prefix: &str| {
        format!(
            "apiVersion: gatehouse.dev/v1alpha1\nkind: Plan\nmetadata: {{name: p, namespace: a}}\nspec: {{}}\n---\napiVersion: gatehouse.dev/v1alpha1\nkind: Api\nmetadata: {{name: grab, namespace: a}}\nspec:\n  pathPrefix: {prefix}\n  upstream: {{url: \"http://127.0.0.1:9\"}}\n  plans: [p]\n  auth: {{grants: [client_credentials]}}\n"
        )
    };
    for prefix in ["/mobile", "/mobile/v2"] {
        std::fs::write(m.join("b.yaml"), other(prefix)).unwrap();
        manifests.reload(&st).unwrap();
        assert_eq!(
            served(&st),
            [("t/mobile".into(), "/mobile".into())],
            "{prefix}"
        );
        // A fresh start has no history: then namespace order decides (a/grab first).
        let fresh = state(&dir.path().join(format!("fresh{}", prefix.len())));
        Manifests::new(vec![m.clone()]).reload(&fresh).unwrap();
        assert_eq!(
            served(&fresh),
            [("a/grab".into(), prefix.into())],
            "{prefix}"
        );
    }
}
