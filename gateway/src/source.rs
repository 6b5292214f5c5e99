//! Standalone configuration: Api/Plan/Application/Subscription/Secret YAML from files and
//! folders, compiled with the same `compile()` the operator uses, reloaded when files change.
//! A load that cannot be parsed keeps the last good configuration.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use gatehouse_crds::{Phase, compile, manifests};
use notify::{RecursiveMode, Watcher};

use crate::snapshot::Snapshot;
use crate::state::AppState;

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read manifests: {0}")]
    Io(#[from] std::io::Error),
    #[error("manifests have errors, keeping the previous configuration:\n{0}")]
    Parse(String),
}

/// Reads, compiles and checks the manifests; logs every resource that is not Active.
pub fn load(paths: &[PathBuf]) -> Result<Snapshot, LoadError> {
    let (resources, errors) = manifests::load_paths(paths)?;
    if !errors.is_empty() {
        let list: Vec<String> = errors.iter().map(|e| format!("  {e}")).collect();
        return Err(LoadError::Parse(list.join("\n")));
    }
    let compiled = compile(&resources);
    for v in &compiled.verdicts {
        match v.phase {
            Phase::Active => {
                tracing::debug!(kind = %v.kind, resource = %format!("{}/{}", v.namespace, v.name), "active")
            }
            _ => tracing::warn!(
                kind = %v.kind,
                resource = %format!("{}/{}", v.namespace, v.name),
                phase = v.phase.as_str(),
                reason = %v.reason,
                "{}", v.message
            ),
        }
    }
    let (snap, problems) = Snapshot::build(compiled.config);
    for p in problems {
        tracing::error!("left out of the configuration: {p}");
    }
    Ok(snap)
}

/// Loads into the state unless the configuration is unchanged. Returns whether it swapped.
pub fn reload(state: &AppState, paths: &[PathBuf]) -> Result<bool, LoadError> {
    let snap = load(paths)?;
    if state.config.load().loaded && state.config.load().hash() == snap.hash() {
        return Ok(false);
    }
    tracing::info!(
        hash = %&snap.hash()[..12],
        apis = snap.config.apis.len(),
        clients = snap.config.clients.len(),
        "configuration loaded"
    );
    metrics::counter!("gatehouse_config_reloads_total").increment(1);
    state.swap_config(snap);
    Ok(true)
}

/// Watches the manifest paths and reloads on change (debounced). Editors that save by rename
/// are covered by watching the containing folders.
pub fn watch(
    state: Arc<AppState>,
    paths: Vec<PathBuf>,
) -> notify::Result<tokio::task::JoinHandle<()>> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if let Ok(ev) = res
            && !ev.kind.is_access()
        {
            let _ = tx.send(());
        }
    })?;
    for p in &paths {
        let (target, mode) = if p.is_dir() {
            (p.clone(), RecursiveMode::Recursive)
        } else {
            let parent = p
                .parent()
                .filter(|d| !d.as_os_str().is_empty())
                .map_or_else(|| PathBuf::from("."), PathBuf::from);
            (parent, RecursiveMode::NonRecursive)
        };
        watcher.watch(&target, mode)?;
    }
    Ok(tokio::spawn(async move {
        let _watcher = watcher; // lives as long as the task
        while rx.recv().await.is_some() {
            // Let a burst of events (write + rename + chmod) settle into one reload.
            tokio::time::sleep(Duration::from_millis(150)).await;
            while rx.try_recv().is_ok() {}
            let st = state.clone();
            let ps = paths.clone();
            match tokio::task::spawn_blocking(move || reload(&st, &ps)).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::error!("{e}"),
                Err(e) => tracing::error!("reload task failed: {e}"),
            }
        }
    }))
}
