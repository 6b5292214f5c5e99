//! Standalone configuration: Api/Plan/Application/Subscription/Secret YAML from files and
//! folders, compiled with the same `compile()` the operator uses, reloaded when files change.
//!
//! Each file counts on its own (DESIGN §2: one invalid resource never blocks the others). A file
//! that cannot be read, or has a document that cannot be used, keeps the version of it that last
//! loaded cleanly (a half-saved edit changes nothing), or is left out when none did (at
//! start-up); its errors are logged with the file and document, and every other file's changes
//! apply.

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use gatehouse_crds::{ApiConfig, Phase, Resources, compile_after, manifests};
use notify::{RecommendedWatcher, RecursiveMode, Watcher};

use crate::snapshot::Snapshot;
use crate::state::AppState;

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// A path that does not exist, or a folder that cannot be listed.
    #[error("cannot read manifests: {0}")]
    Io(#[from] std::io::Error),
}

/// The `--manifests` paths, and what each file held when it last loaded cleanly.
pub struct Manifests {
    paths: Vec<PathBuf>,
    last_good: HashMap<PathBuf, Resources>,
    /// The Apis of the last load: they keep their path prefixes (`compile_after`).
    served: Vec<ApiConfig>,
}

impl Manifests {
    pub fn new(paths: Vec<PathBuf>) -> Manifests {
        Manifests {
            paths,
            last_good: HashMap::new(),
            served: Vec::new(),
        }
    }

    pub fn paths(&self) -> &[PathBuf] {
        &self.paths
    }

    /// Reads every file; a file with errors contributes its last clean version, if any.
    fn read(&mut self) -> Result<Resources, LoadError> {
        let files = manifests::load_files(&self.paths)?;
        let mut resources = Resources::default();
        // Rebuilt from the files listed now, so a deleted file is forgotten.
        let mut last_good = HashMap::with_capacity(files.len());
        for file in files {
            if file.errors.is_empty() {
                resources.extend(file.resources.clone());
                last_good.insert(file.path, file.resources);
                continue;
            }
            let kept = self.last_good.remove(&file.path);
            let outcome = match kept {
                Some(_) => "keeping the previous configuration from this file",
                None => "this file is left out",
            };
            for e in &file.errors {
                tracing::error!("{e} ({outcome})");
            }
            if let Some(r) = kept {
                resources.extend(r.clone());
                last_good.insert(file.path, r);
            }
        }
        self.last_good = last_good;
        Ok(resources)
    }

    /// Reads, compiles and checks the manifests; logs every resource that is not Active.
    pub fn load(&mut self) -> Result<Snapshot, LoadError> {
        let resources = self.read()?;
        let compiled = compile_after(&resources, &self.served);
        self.served = compiled.config.apis.clone();
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
    pub fn reload(&mut self, state: &AppState) -> Result<bool, LoadError> {
        let snap = self.load()?;
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
}

/// One load with no earlier versions to keep: a file with errors is left out.
pub fn reload(state: &AppState, paths: &[PathBuf]) -> Result<bool, LoadError> {
    Manifests::new(paths.to_vec()).reload(state)
}

/// Watches the manifest paths and reloads on change (debounced). Editors that save by rename
/// are covered by watching the containing folders. A folder given as a path that is replaced
/// (renamed over, deleted and created again, or a symlink flipped to another folder) is
/// watched again: a watch stays with the folder it was placed on (or goes with it), so the
/// folder holding the path is watched too, and an event there naming the path moves the watch.
pub fn watch(
    state: Arc<AppState>,
    manifests: Manifests,
) -> notify::Result<tokio::task::JoinHandle<()>> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let changed = tx.clone();
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if let Ok(ev) = res
            && !ev.kind.is_access()
        {
            let _ = changed.send(());
        }
    })?;
    let mut folders = Vec::new();
    for p in manifests.paths() {
        if p.is_dir() {
            watcher.watch(p, RecursiveMode::Recursive)?;
            folders.push(Folder {
                path: p.clone(),
                id: file_id(p),
            });
        } else {
            watcher.watch(&parent(p), RecursiveMode::NonRecursive)?;
        }
    }
    // Set for a folder when an event in the folder holding it names it. Only such events count
    // there, so other entries (a home folder's churn, the data dir) cause no reloads.
    let swapped: Arc<[AtomicBool]> = folders.iter().map(|_| AtomicBool::new(false)).collect();
    let names: Vec<Option<OsString>> = folders
        .iter()
        .map(|f| f.path.file_name().map(ToOwned::to_owned))
        .collect();
    let flags = swapped.clone();
    let mut swaps = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        let Ok(ev) = res else { return };
        if ev.kind.is_access() {
            return;
        }
        let mut any = false;
        for (name, flag) in names.iter().zip(flags.iter()) {
            // No paths: a rescan, after which anything may have changed.
            if ev.paths.is_empty() || ev.paths.iter().any(|p| p.file_name() == name.as_deref()) {
                flag.store(true, Ordering::Relaxed);
                any = true;
            }
        }
        if any {
            let _ = tx.send(());
        }
    })?;
    for f in &folders {
        // "." or "/" has no name to be swapped under.
        if f.path.file_name().is_none() {
            continue;
        }
        let holder = parent(&f.path);
        if let Err(e) = swaps.watch(&holder, RecursiveMode::NonRecursive) {
            tracing::warn!(folder = %holder.display(), "cannot watch the folder holding {}; if that is replaced, its edits are not seen until a restart: {e}", f.path.display());
        }
    }
    let reloader = Arc::new(Mutex::new(Reloader {
        manifests,
        watcher,
        folders,
        swapped,
    }));
    Ok(tokio::spawn(async move {
        let _swaps = swaps; // lives as long as the task
        while rx.recv().await.is_some() {
            // Let a burst of events (write + rename + chmod) settle into one reload.
            tokio::time::sleep(Duration::from_millis(150)).await;
            while rx.try_recv().is_ok() {}
            let st = state.clone();
            let r = reloader.clone();
            // File reads and (re)watching a folder tree are blocking work.
            let done = tokio::task::spawn_blocking(move || {
                let mut r = r.lock().unwrap_or_else(PoisonError::into_inner);
                r.rewatch();
                r.manifests.reload(&st)
            });
            match done.await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::error!("{e}; keeping the previous configuration"),
                Err(e) => tracing::error!("reload task failed: {e}"),
            }
        }
    }))
}

fn parent(p: &Path) -> PathBuf {
    p.parent()
        .filter(|d| !d.as_os_str().is_empty())
        .map_or_else(|| PathBuf::from("."), PathBuf::from)
}

struct Reloader {
    manifests: Manifests,
    watcher: RecommendedWatcher,
    folders: Vec<Folder>,
    /// Per folder: named by an event in the folder holding it since the last reload.
    swapped: Arc<[AtomicBool]>,
}

/// A folder path watched recursively, and what it led to when the watch was placed.
struct Folder {
    path: PathBuf,
    id: Option<FileId>,
}

impl Reloader {
    /// Places the watch of a folder path again when the path was named by an event where it
    /// lives (a new folder may reuse the old one's inode number) or now leads elsewhere. Runs
    /// before the files are read, so an edit made right after a swap is read now or seen later.
    fn rewatch(&mut self) {
        for (f, swapped) in self.folders.iter_mut().zip(self.swapped.iter()) {
            let id = file_id(&f.path);
            if !swapped.swap(false, Ordering::Relaxed) && id == f.id {
                continue;
            }
            // The old watch follows the old folder, or went with it.
            let _ = self.watcher.unwatch(&f.path);
            if id.is_some()
                && let Err(e) = self.watcher.watch(&f.path, RecursiveMode::Recursive)
            {
                // Left unwatched: the next event tries again.
                tracing::error!(folder = %f.path.display(), "cannot watch the manifests folder again: {e}");
                f.id = None;
                continue;
            }
            f.id = id;
        }
    }
}

/// What a path leads to (after symlinks): device and inode.
#[cfg(unix)]
type FileId = (u64, u64);

#[cfg(unix)]
fn file_id(p: &Path) -> Option<FileId> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).ok().map(|m| (m.dev(), m.ino()))
}

#[cfg(not(unix))]
type FileId = PathBuf;

#[cfg(not(unix))]
fn file_id(p: &Path) -> Option<FileId> {
    std::fs::canonicalize(p).ok()
}
