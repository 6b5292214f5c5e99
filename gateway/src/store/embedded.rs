//! Embedded store for a single gateway: memory is authoritative for reads (the proxy's token
//! lookup never touches the disk), and every change is written through to a redb file under
//! `--data-dir` before it is acknowledged, so a restart loses nothing.
//!
//! Memory never keeps a change the file did not get. Deletions and plain writes reach memory only
//! after their commit. Changes that must be decided atomically in memory (put-if-absent,
//! put-if-present, counters) queue their write while they hold the entry's lock, so one key's
//! changes reach the file in the order memory saw them, and are undone there when their commit
//! fails. A caller whose write failed (it answers 503) thus leaves things as the file has them:
//! the client's retry finds the token, code or session it asked to remove and removes it for
//! good, instead of being told it is already gone while a restart brings it back. (One gap, on
//! storage failure only: when one failing batch held several such changes of one key, their
//! undos can leave memory on an intermediate value until a restart.)

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use dashmap::DashMap;
use redb::{Database, ReadableTable, TableDefinition};

use super::{Store, StoreError, StoreResult, TokenRecord, unix_now};
use crate::tokens::TokenHash;

const TOKENS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("tokens");
/// key -> 8-byte big-endian expiry (unix seconds, 0 = never) followed by the value.
const KV: TableDefinition<&str, &[u8]> = TableDefinition::new("kv");

#[derive(Clone, PartialEq, Eq)]
struct KvEntry {
    value: Vec<u8>,
    expires_at: u64,
}

impl KvEntry {
    fn live(&self, now: u64) -> bool {
        self.expires_at == 0 || self.expires_at > now
    }

    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8 + self.value.len());
        out.extend_from_slice(&self.expires_at.to_be_bytes());
        out.extend_from_slice(&self.value);
        out
    }

    fn decode(bytes: &[u8]) -> Option<KvEntry> {
        let (exp, value) = bytes.split_at_checked(8)?;
        Some(KvEntry {
            expires_at: u64::from_be_bytes(exp.try_into().ok()?),
            value: value.to_vec(),
        })
    }

    fn counter(count: u64, expires_at: u64) -> KvEntry {
        KvEntry {
            value: count.to_be_bytes().to_vec(),
            expires_at,
        }
    }
}

fn expiry(ttl_secs: u64) -> u64 {
    if ttl_secs == 0 {
        0
    } else {
        unix_now() + ttl_secs
    }
}

/// A change to apply inside the batch's transaction; errors are reported as text.
type Change = Box<dyn FnOnce(&redb::WriteTransaction) -> Result<(), String> + Send>;
type Waiter = tokio::sync::oneshot::Sender<StoreResult<()>>;
type Committed = tokio::sync::oneshot::Receiver<StoreResult<()>>;

/// Group commit: one thread owns redb writes and commits every change that queued up while the
/// previous commit was syncing in one transaction. Each caller is still answered only after
/// its change is durable, but concurrent token responses share one fsync instead of paying
/// one each (measured: 637 code exchanges/s with a transaction per change).
struct GroupCommit {
    queue: Option<std::sync::mpsc::Sender<(Change, Waiter)>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for GroupCommit {
    /// Waits for queued changes to commit and for the writer to close the database, so the
    /// same directory can be opened again right away (redb holds a file lock).
    fn drop(&mut self) {
        drop(self.queue.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Changes per transaction at most, so one commit stays short.
const MAX_BATCH: usize = 512;

/// Expired entries the janitor deletes per transaction (a few milliseconds of the writer).
const PURGE_CHUNK: usize = 1024;

impl GroupCommit {
    fn start(db: Arc<Database>) -> std::io::Result<GroupCommit> {
        let (tx, rx) = std::sync::mpsc::channel::<(Change, Waiter)>();
        let thread = std::thread::Builder::new()
            .name("gatehouse-store-writer".into())
            .spawn(move || {
                // Ends when the store (the only sender) is dropped.
                while let Ok(first) = rx.recv() {
                    let mut batch = vec![first];
                    while batch.len() < MAX_BATCH {
                        match rx.try_recv() {
                            Ok(next) => batch.push(next),
                            Err(_) => break,
                        }
                    }
                    commit(&db, batch);
                }
            })?;
        Ok(GroupCommit {
            queue: Some(tx),
            thread: Some(thread),
        })
    }

    async fn submit(&self, change: Change) -> StoreResult<()> {
        Self::done(self.enqueue(change)?).await
    }

    /// Queues a change without waiting (a send on an unbounded channel, so a caller may hold a
    /// lock while it queues). Changes commit in the order they were queued.
    fn enqueue(&self, change: Change) -> StoreResult<Committed> {
        let (done, wait) = tokio::sync::oneshot::channel();
        self.queue
            .as_ref()
            .ok_or_else(|| io("the store is closing"))?
            .send((change, done))
            .map_err(|_| io("the store writer has stopped"))?;
        Ok(wait)
    }

    /// Waits for a queued change's commit.
    async fn done(wait: Committed) -> StoreResult<()> {
        wait.await.map_err(|_| io("the store writer has stopped"))?
    }
}

/// Applies a batch in one transaction. Changes are plain inserts and removes, so one failing
/// means storage trouble: the whole batch is aborted and every caller gets the error.
fn commit(db: &Database, batch: Vec<(Change, Waiter)>) {
    let txn = match db.begin_write() {
        Ok(t) => t,
        Err(e) => {
            let msg = e.to_string();
            for (_, w) in batch {
                let _ = w.send(Err(io(&msg)));
            }
            return;
        }
    };
    let mut applied = Vec::with_capacity(batch.len());
    let mut batch = batch.into_iter();
    while let Some((change, waiter)) = batch.next() {
        if let Err(msg) = change(&txn) {
            let _ = txn.abort();
            let _ = waiter.send(Err(io(&msg)));
            // Neither the changes before it nor those after it (never run) were committed.
            for w in applied.into_iter().chain(batch.map(|(_, w)| w)) {
                let _ = w.send(Err(io(format!("aborted with a failed write: {msg}"))));
            }
            return;
        }
        applied.push(waiter);
    }
    let result = txn.commit().map_err(|e| e.to_string());
    for w in applied {
        let _ = w.send(result.clone().map_err(io));
    }
}

pub struct EmbeddedStore {
    db: Arc<Database>,
    writer: GroupCommit,
    /// Keyed by SHA-256 outputs, which no client can steer into one bucket: foldhash suffices.
    tokens: DashMap<TokenHash, Arc<TokenRecord>, foldhash::fast::RandomState>,
    /// grant_id -> token hashes, rebuilt from `tokens` on start.
    grants: DashMap<String, Vec<TokenHash>>,
    kv: DashMap<String, KvEntry>,
}

fn io(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

impl EmbeddedStore {
    /// Opens (or creates) `dir/gatehouse.redb` and loads the live entries.
    pub fn open(dir: &Path) -> StoreResult<EmbeddedStore> {
        std::fs::create_dir_all(dir)
            .map_err(|e| io(format!("cannot create data dir {}: {e}", dir.display())))?;
        let path = dir.join("gatehouse.redb");
        // Reads are served from memory; redb's page cache only speeds up writes and the start-up
        // load, so it is kept small (its default is 1 GiB).
        let db = redb::Builder::new()
            .set_cache_size(32 * 1024 * 1024)
            .create(&path)
            .map_err(|e| match e {
                // redb's file lock: the only error that means another process has the file.
                redb::DatabaseError::DatabaseAlreadyOpen => io(format!(
                    "cannot open {}: another gateway is using this --data-dir (stop it, give \
                     this one its own --data-dir, or use --redis to share state)",
                    path.display()
                )),
                e => io(format!("cannot open {}: {e}", path.display())),
            })?;
        let db = Arc::new(db);
        let store = EmbeddedStore {
            writer: GroupCommit::start(db.clone()).map_err(io)?,
            db,
            tokens: DashMap::default(),
            grants: DashMap::new(),
            kv: DashMap::new(),
        };
        store.load()?;
        Ok(store)
    }

    fn load(&self) -> StoreResult<()> {
        let now = unix_now();
        let txn = self.db.begin_write().map_err(io)?;
        // Entries that expired while the gateway was stopped never reach memory, where the
        // janitor looks: they are deleted here, in the same transaction.
        let mut dead_tokens: Vec<TokenHash> = Vec::new();
        let mut dead_kv: Vec<String> = Vec::new();
        {
            let mut table = txn.open_table(TOKENS).map_err(io)?;
            for entry in table.iter().map_err(io)? {
                let (k, v) = entry.map_err(io)?;
                let hash: TokenHash = k
                    .value()
                    .try_into()
                    .map_err(|_| StoreError::Corrupt("token key is not 32 bytes".into()))?;
                let rec: TokenRecord = serde_json::from_slice(v.value())
                    .map_err(|e| StoreError::Corrupt(format!("token record: {e}")))?;
                if rec.is_expired(now) {
                    dead_tokens.push(hash);
                    continue;
                }
                self.grants
                    .entry(rec.grant_id.clone())
                    .or_default()
                    .push(hash);
                self.tokens.insert(hash, Arc::new(rec));
            }
            for h in &dead_tokens {
                table.remove(h.as_slice()).map_err(io)?;
            }
            let mut table = txn.open_table(KV).map_err(io)?;
            for entry in table.iter().map_err(io)? {
                let (k, v) = entry.map_err(io)?;
                let e = KvEntry::decode(v.value())
                    .ok_or_else(|| StoreError::Corrupt(format!("kv entry {}", k.value())))?;
                if e.live(now) {
                    self.kv.insert(k.value().to_string(), e);
                } else {
                    dead_kv.push(k.value().to_string());
                }
            }
            for k in &dead_kv {
                table.remove(k.as_str()).map_err(io)?;
            }
        }
        txn.commit().map_err(io)?;
        Ok(())
    }

    /// Runs a change to the tokens table; returns once it is on disk.
    async fn write<F>(&self, f: F) -> StoreResult<()>
    where
        F: FnOnce(&mut redb::Table<&[u8], &[u8]>) -> Result<(), redb::StorageError>
            + Send
            + 'static,
    {
        self.writer
            .submit(Box::new(move |txn| {
                let mut table = txn.open_table(TOKENS).map_err(|e| e.to_string())?;
                f(&mut table).map_err(|e| e.to_string())
            }))
            .await
    }

    async fn kv_write(&self, key: &str, entry: Option<KvEntry>) -> StoreResult<()> {
        GroupCommit::done(self.kv_enqueue(key, entry, None)?).await
    }

    /// Queues a kv write. With `live_at`, an entry is written only over a live one in the file:
    /// the file then decides in the order of its commits what memory decided under the entry
    /// lock, so a delete that committed first (and leaves memory after its commit) wins there
    /// too.
    fn kv_enqueue(
        &self,
        key: &str,
        entry: Option<KvEntry>,
        live_at: Option<u64>,
    ) -> StoreResult<Committed> {
        let key = key.to_string();
        self.writer.enqueue(Box::new(move |txn| {
            let mut table = txn.open_table(KV).map_err(|e| e.to_string())?;
            if let Some(now) = live_at {
                let there = table
                    .get(key.as_str())
                    .map_err(|e| e.to_string())?
                    .and_then(|v| KvEntry::decode(v.value()))
                    .is_some_and(|e| e.live(now));
                if !there {
                    return Ok(());
                }
            }
            match entry {
                Some(e) => table.insert(key.as_str(), e.encode().as_slice()).map(drop),
                None => table.remove(key.as_str()).map(drop),
            }
            .map_err(|e| e.to_string())
        }))
    }

    /// Changes one kv entry in memory under its entry lock, so concurrent callers decide one
    /// after the other (put-if-absent, counters), then writes it. `change` gets the current
    /// entry and returns the new one, or None to leave it alone. When the write fails, memory
    /// gets back what it had, unless another change has replaced the entry since (that one's
    /// own commit decides).
    async fn kv_update(
        &self,
        key: &str,
        change: impl FnOnce(Option<&KvEntry>) -> Option<KvEntry>,
    ) -> StoreResult<Option<KvEntry>> {
        self.kv_update_if(key, change, None).await
    }

    /// `kv_update` whose file write is conditional as in `kv_enqueue(.., live_at)`.
    async fn kv_update_if(
        &self,
        key: &str,
        change: impl FnOnce(Option<&KvEntry>) -> Option<KvEntry>,
        live_at: Option<u64>,
    ) -> StoreResult<Option<KvEntry>> {
        // The write is queued under the entry lock too, so two changes of one key reach the file
        // in the order memory saw them.
        let (before, after, committed) = match self.kv.entry(key.to_string()) {
            dashmap::Entry::Occupied(mut o) => {
                let Some(after) = change(Some(o.get())) else {
                    return Ok(None);
                };
                let committed = self.kv_enqueue(key, Some(after.clone()), live_at)?;
                (Some(o.insert(after.clone())), after, committed)
            }
            dashmap::Entry::Vacant(v) => {
                let Some(after) = change(None) else {
                    return Ok(None);
                };
                let committed = self.kv_enqueue(key, Some(after.clone()), live_at)?;
                v.insert(after.clone());
                (None, after, committed)
            }
        };
        if let Err(e) = GroupCommit::done(committed).await {
            if let dashmap::Entry::Occupied(mut o) = self.kv.entry(key.to_string())
                && *o.get() == after
            {
                match before {
                    Some(b) => drop(o.insert(b)),
                    None => drop(o.remove()),
                }
            }
            return Err(e);
        }
        Ok(Some(after))
    }

    fn live_token(&self, hash: &TokenHash) -> Option<Arc<TokenRecord>> {
        let now = unix_now();
        self.tokens
            .get(hash)
            .filter(|r| !r.is_expired(now))
            .map(|r| Arc::clone(&r))
    }

    fn forget(&self, hash: &TokenHash, rec: &TokenRecord) {
        if let Some(mut list) = self.grants.get_mut(&rec.grant_id) {
            list.retain(|h| h != hash);
        }
        self.grants.remove_if(&rec.grant_id, |_, l| l.is_empty());
    }

    async fn delete_many(&self, hashes: Vec<TokenHash>) -> StoreResult<()> {
        if hashes.is_empty() {
            return Ok(());
        }
        self.write(move |t| {
            for h in &hashes {
                t.remove(h.as_slice())?;
            }
            Ok(())
        })
        .await
    }

    /// Deletes kv entries from the file if they are expired there.
    async fn kv_delete_expired(&self, keys: Vec<String>, now: u64) -> StoreResult<()> {
        self.writer
            .submit(Box::new(move |txn| {
                let mut table = txn.open_table(KV).map_err(|e| e.to_string())?;
                for k in &keys {
                    // A write queued after the purge's scan (a counter's new window) may have
                    // made the key live again: that one stays.
                    let expired = table
                        .get(k.as_str())
                        .map_err(|e| e.to_string())?
                        .and_then(|v| KvEntry::decode(v.value()))
                        .is_some_and(|e| !e.live(now));
                    if expired {
                        table.remove(k.as_str()).map_err(|e| e.to_string())?;
                    }
                }
                Ok(())
            }))
            .await
    }
}

#[async_trait]
impl Store for EmbeddedStore {
    async fn put_token(&self, hash: TokenHash, record: TokenRecord) -> StoreResult<()> {
        let bytes = serde_json::to_vec(&record).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        self.write(move |t| t.insert(hash.as_slice(), bytes.as_slice()).map(|_| ()))
            .await?;
        // The token before its grant entry: `revoke_grant` must not find a hash whose token is
        // yet to arrive (it would delete it from the file, miss it in memory, and it would live).
        let grant_id = record.grant_id.clone();
        self.tokens.insert(hash, Arc::new(record));
        self.grants.entry(grant_id).or_default().push(hash);
        Ok(())
    }

    async fn get_token(&self, hash: &TokenHash) -> StoreResult<Option<Arc<TokenRecord>>> {
        Ok(self.live_token(hash))
    }

    fn get_token_now(&self, hash: &TokenHash) -> Option<Option<Arc<TokenRecord>>> {
        Some(self.live_token(hash))
    }

    async fn revoke_token(&self, hash: &TokenHash) -> StoreResult<Option<TokenRecord>> {
        if !self.tokens.contains_key(hash) {
            return Ok(None);
        }
        // The file first: see the module comment.
        self.delete_many(vec![*hash]).await?;
        // Of concurrent revocations (a refresh spends its token this way) one gets the record.
        let Some((hash, rec)) = self.tokens.remove(hash) else {
            return Ok(None);
        };
        self.forget(&hash, &rec);
        Ok(Some(Arc::unwrap_or_clone(rec)))
    }

    async fn revoke_grant(&self, grant_id: &str) -> StoreResult<usize> {
        let hashes = self
            .grants
            .get(grant_id)
            .map(|l| l.clone())
            .unwrap_or_default();
        // The file first: see the module comment.
        self.delete_many(hashes.clone()).await?;
        let gone: std::collections::HashSet<TokenHash> = hashes
            .iter()
            .filter(|h| self.tokens.remove(*h).is_some())
            .copied()
            .collect();
        // One pass over the grant's list (a token issued into it meanwhile stays listed).
        if let Some(mut list) = self.grants.get_mut(grant_id) {
            list.retain(|h| !gone.contains(h));
        }
        self.grants.remove_if(grant_id, |_, l| l.is_empty());
        Ok(gone.len())
    }

    async fn purge_expired(&self, now: u64) -> StoreResult<usize> {
        // Expired entries answer no read, so they leave memory before the file: if a commit
        // fails, they stay in the file only, and `load` deletes them at the next start. Only
        // what this call removed goes to the file: a key written again since the scan is live.
        let tokens: Vec<TokenHash> = self
            .tokens
            .iter()
            .filter(|e| e.value().is_expired(now))
            .map(|e| *e.key())
            .collect();
        let mut tokens: Vec<TokenHash> = tokens
            .into_iter()
            .filter_map(|h| {
                let (h, rec) = self.tokens.remove_if(&h, |_, r| r.is_expired(now))?;
                self.forget(&h, &rec);
                Some(h)
            })
            .collect();
        let keys: Vec<String> = self
            .kv
            .iter()
            .filter(|e| !e.value().live(now))
            .map(|e| e.key().clone())
            .collect();
        let mut keys: Vec<String> = keys
            .into_iter()
            .filter(|k| self.kv.remove_if(k, |_, e| !e.live(now)).is_some())
            .collect();
        let purged = tokens.len() + keys.len();
        // In key order neighbours share B-tree pages (measured: a third less time in the writer).
        tokens.sort_unstable();
        keys.sort_unstable();
        // A transaction per chunk, not per key: a commit per key capped the purge at the
        // disk's fsync rate, below the rate at which codes, sessions and markers expire under
        // load. Not one for all either: the writer would hold every token response for as long.
        for chunk in tokens.chunks(PURGE_CHUNK) {
            self.delete_many(chunk.to_vec()).await?;
        }
        for chunk in keys.chunks(PURGE_CHUNK) {
            self.kv_delete_expired(chunk.to_vec(), now).await?;
        }
        Ok(purged)
    }

    async fn ready(&self) -> StoreResult<()> {
        Ok(())
    }

    async fn kv_put(&self, key: &str, value: &[u8], ttl_secs: u64) -> StoreResult<()> {
        let e = KvEntry {
            value: value.to_vec(),
            expires_at: expiry(ttl_secs),
        };
        self.kv_write(key, Some(e.clone())).await?;
        self.kv.insert(key.to_string(), e);
        Ok(())
    }

    async fn kv_put_new(&self, key: &str, value: &[u8], ttl_secs: u64) -> StoreResult<bool> {
        let now = unix_now();
        let e = KvEntry {
            value: value.to_vec(),
            expires_at: expiry(ttl_secs),
        };
        let written = self
            .kv_update(key, |current| match current {
                Some(c) if c.live(now) => None,
                _ => Some(e),
            })
            .await?;
        Ok(written.is_some())
    }

    async fn kv_put_existing(&self, key: &str, value: &[u8], ttl_secs: u64) -> StoreResult<bool> {
        let now = unix_now();
        let e = KvEntry {
            value: value.to_vec(),
            expires_at: expiry(ttl_secs),
        };
        // Decided in memory, and again in the file: a delete racing this save may have committed
        // first, and then leaves memory only after its commit (see `kv_enqueue`).
        let change = |current: Option<&KvEntry>| match current {
            Some(c) if c.live(now) => Some(e),
            _ => None,
        };
        let written = self.kv_update_if(key, change, Some(now)).await?;
        Ok(written.is_some())
    }

    async fn kv_keys(
        &self,
        prefix: &str,
        keep: for<'k> fn(&'k str) -> bool,
    ) -> StoreResult<Vec<String>> {
        let now = unix_now();
        Ok(self
            .kv
            .iter()
            .filter(|e| e.key().starts_with(prefix) && keep(e.key()) && e.value().live(now))
            .map(|e| e.key().clone())
            .collect())
    }

    async fn kv_get(&self, key: &str) -> StoreResult<Option<Vec<u8>>> {
        let now = unix_now();
        Ok(self
            .kv
            .get(key)
            .filter(|e| e.live(now))
            .map(|e| e.value.clone()))
    }

    async fn kv_take(&self, key: &str) -> StoreResult<Option<Vec<u8>>> {
        let now = unix_now();
        if !self.kv.contains_key(key) {
            return Ok(None);
        }
        // The file first: see the module comment.
        self.kv_write(key, None).await?;
        // Of concurrent takers only the one that removes it from memory gets the value.
        Ok(self
            .kv
            .remove(key)
            .and_then(|(_, e)| e.live(now).then_some(e.value)))
    }

    async fn kv_delete(&self, key: &str) -> StoreResult<()> {
        if self.kv.contains_key(key) {
            // The file first: see the module comment.
            self.kv_write(key, None).await?;
            self.kv.remove(key);
        }
        Ok(())
    }

    async fn counter_incr(&self, key: &str, window_secs: u64) -> StoreResult<u64> {
        let now = unix_now();
        let written = self
            .kv_update(key, |current| {
                Some(match current {
                    Some(c) if c.live(now) => {
                        KvEntry::counter(counter_value(&c.value) + 1, c.expires_at)
                    }
                    _ => KvEntry::counter(1, now + window_secs),
                })
            })
            .await?;
        Ok(written.map_or(0, |e| counter_value(&e.value)))
    }

    async fn counter_get(&self, key: &str) -> StoreResult<u64> {
        let now = unix_now();
        Ok(self
            .kv
            .get(key)
            .filter(|e| e.live(now))
            .map_or(0, |e| counter_value(&e.value)))
    }

    async fn counter_decr(&self, key: &str) -> StoreResult<()> {
        let now = unix_now();
        self.kv_update(key, |current| match current {
            Some(c) if c.live(now) && counter_value(&c.value) > 0 => {
                Some(KvEntry::counter(counter_value(&c.value) - 1, c.expires_at))
            }
            _ => None,
        })
        .await?;
        Ok(())
    }
}

fn counter_value(bytes: &[u8]) -> u64 {
    bytes.try_into().map(u64::from_be_bytes).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::TokenKind;
    use crate::tokens;

    fn rec(grant: &str, expires_at: u64) -> TokenRecord {
        TokenRecord {
            kind: TokenKind::Access,
            client_id: "c".into(),
            subscription: "demo/s".into(),
            api: "demo/a".into(),
            user_id: Some("u".into()),
            scope: "profile".into(),
            grant_id: grant.into(),
            issued_at: 1,
            expires_at,
        }
    }

    /// A save that only writes while the entry exists (`kv_put_existing`, a session's) racing a
    /// delete (a sign-out) on the same key: whichever way they interleave, the file ends as
    /// memory does, so a restart cannot bring a signed-out session back. (With the check in
    /// memory only, each run left one to a few of the 200 sessions in the file.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_save_racing_a_delete_leaves_the_file_as_memory() {
        let dir = tempfile::tempdir().unwrap();
        let s = Arc::new(EmbeddedStore::open(dir.path()).unwrap());
        let mut in_memory = Vec::new();
        for i in 0..200 {
            let key = format!("session:{i}");
            s.kv_put(&key, b"v0", 600).await.unwrap();
            let (a, b) = (s.clone(), s.clone());
            let (k1, k2) = (key.clone(), key.clone());
            let save = tokio::spawn(async move { a.kv_put_existing(&k1, b"v1", 600).await });
            let delete = tokio::spawn(async move { b.kv_delete(&k2).await });
            save.await.unwrap().unwrap();
            delete.await.unwrap().unwrap();
            in_memory.push(s.kv_get(&key).await.unwrap());
        }
        Arc::into_inner(s).expect("no other handle on the store");
        let s = EmbeddedStore::open(dir.path()).unwrap();
        for (i, memory) in in_memory.into_iter().enumerate() {
            let file = s.kv_get(&format!("session:{i}")).await.unwrap();
            assert_eq!(file, memory, "session {i}: the file and memory differ");
        }
    }

    /// Concurrent changes of one key decided in memory (saves of one session, counter
    /// increments) reach the file in the order memory made them.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_changes_of_one_key_end_the_same_in_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let s = Arc::new(EmbeddedStore::open(dir.path()).unwrap());
        s.kv_put("session:x", b"v0", 600).await.unwrap();
        let mut tasks = Vec::new();
        for i in 0..200u32 {
            let s = s.clone();
            tasks.push(tokio::spawn(async move {
                let value = i.to_be_bytes();
                s.kv_put_existing("session:x", &value, 600).await.unwrap();
                s.counter_incr("tries", 600).await.unwrap();
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let (session, count) = (
            s.kv_get("session:x").await.unwrap(),
            s.counter_get("tries").await.unwrap(),
        );
        assert_eq!(count, 200);
        Arc::into_inner(s).expect("no other handle on the store");
        let s = EmbeddedStore::open(dir.path()).unwrap();
        assert_eq!(s.kv_get("session:x").await.unwrap(), session);
        assert_eq!(s.counter_get("tries").await.unwrap(), 200);
    }

    #[tokio::test]
    async fn tokens_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let far = unix_now() + 3_600;
        let (a, b) = (tokens::hash("a"), tokens::hash("b"));
        {
            let s = EmbeddedStore::open(dir.path()).unwrap();
            s.put_token(a, rec("g1", far)).await.unwrap();
            s.put_token(b, rec("g1", far)).await.unwrap();
            s.revoke_token(&b).await.unwrap();
        }
        let s = EmbeddedStore::open(dir.path()).unwrap();
        assert_eq!(
            s.get_token(&a).await.unwrap().as_deref(),
            Some(&rec("g1", far))
        );
        assert_eq!(s.get_token(&b).await.unwrap(), None);
        assert_eq!(s.revoke_grant("g1").await.unwrap(), 1);
        drop(s);
        let s = EmbeddedStore::open(dir.path()).unwrap();
        assert_eq!(s.get_token(&a).await.unwrap(), None);
    }

    #[tokio::test]
    async fn expired_tokens_are_invisible_and_purged() {
        let dir = tempfile::tempdir().unwrap();
        let s = EmbeddedStore::open(dir.path()).unwrap();
        let now = unix_now();
        s.put_token(tokens::hash("old"), rec("g", now - 1))
            .await
            .unwrap();
        s.put_token(tokens::hash("new"), rec("g", now + 60))
            .await
            .unwrap();
        assert_eq!(s.get_token(&tokens::hash("old")).await.unwrap(), None);
        assert_eq!(s.purge_expired(now).await.unwrap(), 1);
        drop(s);
        let s = EmbeddedStore::open(dir.path()).unwrap();
        assert_eq!(s.tokens.len(), 1);
        assert_eq!(s.grants.get("g").map(|l| l.len()), Some(1));
    }

    #[tokio::test]
    async fn concurrent_writers() {
        let dir = tempfile::tempdir().unwrap();
        let s = Arc::new(EmbeddedStore::open(dir.path()).unwrap());
        let far = unix_now() + 3_600;
        let tasks: Vec<_> = (0..50)
            .map(|i| {
                let s = s.clone();
                tokio::spawn(async move {
                    s.put_token(tokens::hash(&i.to_string()), rec("g", far))
                        .await
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        assert_eq!(s.grants.get("g").unwrap().len(), 50);
        drop(s);
        let s = EmbeddedStore::open(dir.path()).unwrap();
        assert_eq!(s.tokens.len(), 50);
    }

    #[tokio::test]
    async fn kv_entries_survive_restart_and_take_is_single_use() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = EmbeddedStore::open(dir.path()).unwrap();
            s.kv_put("user:1", b"alice", 0).await.unwrap();
            s.kv_put("code:x", b"c", 60).await.unwrap();
            assert!(s.kv_put_new("email:a", b"1", 0).await.unwrap());
            assert!(!s.kv_put_new("email:a", b"2", 0).await.unwrap());
            assert_eq!(s.counter_incr("tries", 60).await.unwrap(), 1);
            assert_eq!(s.counter_incr("tries", 60).await.unwrap(), 2);
        }
        let s = Arc::new(EmbeddedStore::open(dir.path()).unwrap());
        assert_eq!(
            s.kv_get("user:1").await.unwrap().as_deref(),
            Some(&b"alice"[..])
        );
        assert_eq!(
            s.kv_get("email:a").await.unwrap().as_deref(),
            Some(&b"1"[..])
        );
        assert_eq!(s.counter_get("tries").await.unwrap(), 2);
        // Of many concurrent takers exactly one gets the code.
        let takers: Vec<_> = (0..20)
            .map(|_| {
                let s = s.clone();
                tokio::spawn(async move { s.kv_take("code:x").await.unwrap() })
            })
            .collect();
        let mut got = 0;
        for t in takers {
            got += t.await.unwrap().is_some() as usize;
        }
        assert_eq!(got, 1);
        drop(s);
        let s = EmbeddedStore::open(dir.path()).unwrap();
        assert_eq!(
            s.kv_get("code:x").await.unwrap(),
            None,
            "a taken code stays taken"
        );
    }

    #[tokio::test]
    async fn expired_kv_entries_are_gone() {
        let dir = tempfile::tempdir().unwrap();
        let s = EmbeddedStore::open(dir.path()).unwrap();
        s.kv.insert(
            "old".into(),
            KvEntry {
                value: b"v".to_vec(),
                expires_at: unix_now() - 1,
            },
        );
        assert_eq!(s.kv_get("old").await.unwrap(), None);
        assert!(
            s.kv_put_new("old", b"new", 10).await.unwrap(),
            "expired key counts as absent"
        );
        s.kv.insert(
            "gone".into(),
            KvEntry {
                value: b"v".to_vec(),
                expires_at: unix_now() - 1,
            },
        );
        assert_eq!(s.purge_expired(unix_now()).await.unwrap(), 1);
        assert!(s.kv.get("gone").is_none());
    }

    #[test]
    fn second_gateway_on_same_dir_gets_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let _a = EmbeddedStore::open(dir.path()).unwrap();
        let err = EmbeddedStore::open(dir.path()).err().expect("locked");
        assert!(err.to_string().contains("another gateway"), "{err}");
    }
    fn disk_rows(s: &EmbeddedStore) -> (u64, u64) {
        use redb::ReadableTableMetadata;
        let r = s.db.begin_read().unwrap();
        (
            r.open_table(TOKENS).unwrap().len().unwrap(),
            r.open_table(KV).unwrap().len().unwrap(),
        )
    }

    /// An entry that expires while the gateway is stopped never reaches memory, where the
    /// purge looks, so `load` must delete it from the file; else every stop leaks what expired
    /// during the downtime, and every start reads it again.
    #[tokio::test]
    async fn entries_that_expired_while_stopped_are_deleted_from_disk() {
        let dir = tempfile::tempdir().unwrap();
        let past = unix_now() - 10;
        {
            let s = EmbeddedStore::open(dir.path()).unwrap();
            // What a running gateway wrote; by the next start these have expired.
            s.put_token(tokens::hash("old"), rec("g", past))
                .await
                .unwrap();
            s.kv_write(
                "session:old",
                Some(KvEntry {
                    value: b"v".to_vec(),
                    expires_at: past,
                }),
            )
            .await
            .unwrap();
            assert_eq!(disk_rows(&s), (1, 1));
        }
        let s = EmbeddedStore::open(dir.path()).unwrap();
        assert_eq!(s.tokens.len(), 0);
        assert_eq!(s.kv.len(), 0);
        s.purge_expired(unix_now()).await.unwrap();
        assert_eq!(
            disk_rows(&s),
            (0, 0),
            "expired rows must not stay in the file forever"
        );
    }

    /// The purge must not delete expired kv entries one durable commit at a time (that
    /// caps it at the fsync rate, below the rate entries expire under load): with the writer
    /// held, all 100 dead keys leave memory at once and are deleted together.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn purge_deletes_expired_kv_entries_in_one_commit() {
        let dir = tempfile::tempdir().unwrap();
        let s = Arc::new(EmbeddedStore::open(dir.path()).unwrap());
        let past = unix_now() - 10;
        for i in 0..100 {
            s.kv.insert(
                format!("authreq:{i}"),
                KvEntry {
                    value: b"v".to_vec(),
                    expires_at: past,
                },
            );
        }
        // Hold the writer so that every commit waits for us.
        let (release, blocker) = hold_writer(&s);
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let purge = {
            let s = s.clone();
            tokio::spawn(async move { s.purge_expired(unix_now()).await })
        };
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        let left_in_memory = s.kv.len();
        release.send(()).unwrap();
        blocker.await.unwrap().unwrap();
        assert_eq!(purge.await.unwrap().unwrap(), 100);
        assert_eq!(
            left_in_memory, 0,
            "purge must queue every deletion at once, not one commit per key"
        );
    }

    /// Holds the store's writer until the returned sender sends: every commit waits meanwhile.
    fn hold_writer(
        s: &Arc<EmbeddedStore>,
    ) -> (
        std::sync::mpsc::Sender<()>,
        tokio::task::JoinHandle<StoreResult<()>>,
    ) {
        let (release, hold) = std::sync::mpsc::channel::<()>();
        let s = s.clone();
        let blocker = tokio::spawn(async move {
            s.writer
                .submit(Box::new(move |_| {
                    let _ = hold.recv();
                    Ok(())
                }))
                .await
        });
        (release, blocker)
    }

    /// A key the purge found dead may be written again (a login's new throttle window)
    /// before the purge's delete commits: the file must keep that live entry, or a restart
    /// forgets it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn purge_does_not_delete_an_entry_recreated_meanwhile() {
        let dir = tempfile::tempdir().unwrap();
        let s = Arc::new(EmbeddedStore::open(dir.path()).unwrap());
        let past = unix_now() - 10;
        for k in ["throttle:a", "throttle:b"] {
            let e = KvEntry {
                value: 5u64.to_be_bytes().to_vec(),
                expires_at: past,
            };
            s.kv.insert(k.into(), e.clone());
            s.kv_write(k, Some(e)).await.unwrap();
        }
        let (release, blocker) = hold_writer(&s);
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let purge = {
            let s = s.clone();
            tokio::spawn(async move { s.purge_expired(unix_now()).await })
        };
        // The purge has taken dead keys out of memory and waits for its commit.
        while s.kv.len() == 2 {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        // Failed logins start new windows for both keys.
        let incrs: Vec<_> = ["throttle:a", "throttle:b"]
            .into_iter()
            .map(|k| {
                let s = s.clone();
                tokio::spawn(async move { s.counter_incr(k, 900).await })
            })
            .collect();
        while ["throttle:a", "throttle:b"]
            .iter()
            .any(|k| s.kv.get(*k).is_none_or(|e| !e.live(unix_now())))
        {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        release.send(()).unwrap();
        blocker.await.unwrap().unwrap();
        for t in incrs {
            assert_eq!(t.await.unwrap().unwrap(), 1);
        }
        purge.await.unwrap().unwrap();
        assert_eq!(s.counter_get("throttle:a").await.unwrap(), 1);
        assert_eq!(s.counter_get("throttle:b").await.unwrap(), 1);
        let s = Arc::into_inner(s).expect("only owner");
        drop(s);
        let s = EmbeddedStore::open(dir.path()).unwrap();
        for k in ["throttle:a", "throttle:b"] {
            assert_eq!(
                s.counter_get(k).await.unwrap(),
                1,
                "{k}: the live counter must survive a restart"
            );
        }
    }

    /// Only redb's lock error means another gateway; a file that is not a database (or a
    /// permission problem) must not be blamed on one.
    #[test]
    fn open_errors_other_than_the_lock_do_not_blame_another_gateway() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("gatehouse.redb"), vec![0x42u8; 8192]).unwrap();
        let err = EmbeddedStore::open(dir.path())
            .err()
            .expect("not a database");
        let msg = err.to_string();
        println!("{msg}");
        assert!(!msg.contains("another gateway"), "{msg}");
    }

    /// Measurement (not a pass/fail test): how long purging N expired kv entries takes,
    /// against writing them concurrently.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore]
    async fn measure_purge_rate() {
        let dir = tempfile::tempdir().unwrap();
        let s = Arc::new(EmbeddedStore::open(dir.path()).unwrap());
        let n = 2_000;
        let t = std::time::Instant::now();
        let tasks: Vec<_> = (0..n)
            .map(|i| {
                let s = s.clone();
                tokio::spawn(async move { s.kv_put(&format!("authreq:{i}"), b"v", 1).await })
            })
            .collect();
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        println!("{n} concurrent kv_put: {:?}", t.elapsed());
        tokio::time::sleep(std::time::Duration::from_millis(2_100)).await;
        let t = std::time::Instant::now();
        let purged = s.purge_expired(unix_now()).await.unwrap();
        println!("purge of {purged} expired kv entries: {:?}", t.elapsed());
    }

    /// Queues a change straight into the writer, as `submit` does.
    fn queue(s: &EmbeddedStore, change: Change) -> tokio::sync::oneshot::Receiver<StoreResult<()>> {
        let (done, wait) = tokio::sync::oneshot::channel();
        s.writer
            .queue
            .as_ref()
            .unwrap()
            .send((change, done))
            .unwrap();
        wait
    }

    /// Runs `op` with its write in a batch that fails to commit, as on a full disk: while the
    /// writer is held, `op` queues its write, then a change that fails joins the same batch.
    async fn with_failed_commit<T>(s: &EmbeddedStore, op: impl Future<Output = T>) -> T {
        let (started, running) = tokio::sync::oneshot::channel();
        let (release, hold) = std::sync::mpsc::channel::<()>();
        let _held = queue(
            s,
            Box::new(move |_| {
                let _ = started.send(());
                let _ = hold.recv();
                Ok(())
            }),
        );
        running.await.unwrap();
        let mut op = std::pin::pin!(op);
        // One poll runs `op` up to waiting for its commit: its write is queued.
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        assert!(
            op.as_mut().poll(&mut cx).is_pending(),
            "the operation wrote nothing"
        );
        let _failing = queue(s, Box::new(|_| Err("No space left on device".into())));
        release.send(()).unwrap();
        op.await
    }

    /// A revocation whose commit failed answered 503. The client retries (RFC 7009); the
    /// retry must find the token and revoke it for good, not answer 200 from memory while the
    /// token is still in the file and live again after the next restart.
    #[tokio::test]
    async fn a_revocation_that_failed_to_commit_is_revoked_by_the_retry() {
        let dir = tempfile::tempdir().unwrap();
        let (h, r) = (tokens::hash("t"), rec("g", unix_now() + 3_600));
        let s = EmbeddedStore::open(dir.path()).unwrap();
        s.put_token(h, r.clone()).await.unwrap();
        assert!(with_failed_commit(&s, s.revoke_token(&h)).await.is_err());
        assert_eq!(
            s.get_token(&h).await.unwrap().as_deref(),
            Some(&r),
            "memory as the file has it"
        );
        assert_eq!(
            s.revoke_token(&h).await.unwrap(),
            Some(r),
            "the retry revokes"
        );
        drop(s);
        let s = EmbeddedStore::open(dir.path()).unwrap();
        assert_eq!(
            s.get_token(&h).await.unwrap(),
            None,
            "revoked, yet live after a restart"
        );
    }

    /// The same for a family (refresh token revocation, replayed code, reused refresh token).
    #[tokio::test]
    async fn a_grant_revocation_that_failed_to_commit_is_revoked_by_the_retry() {
        let dir = tempfile::tempdir().unwrap();
        let far = unix_now() + 3_600;
        let (a, b, c) = (tokens::hash("a"), tokens::hash("b"), tokens::hash("c"));
        let s = EmbeddedStore::open(dir.path()).unwrap();
        s.put_token(a, rec("g1", far)).await.unwrap();
        s.put_token(b, rec("g1", far)).await.unwrap();
        s.put_token(c, rec("g2", far)).await.unwrap();
        assert!(with_failed_commit(&s, s.revoke_grant("g1")).await.is_err());
        assert!(
            s.get_token(&a).await.unwrap().is_some(),
            "memory as the file has it"
        );
        assert_eq!(
            s.revoke_grant("g1").await.unwrap(),
            2,
            "the retry revokes both"
        );
        assert!(s.grants.get("g1").is_none());
        drop(s);
        let s = EmbeddedStore::open(dir.path()).unwrap();
        assert_eq!(s.get_token(&a).await.unwrap(), None);
        assert_eq!(s.get_token(&b).await.unwrap(), None);
        assert!(s.get_token(&c).await.unwrap().is_some());
    }

    /// A code exchange or a logout whose commit failed leaves the code or
    /// the session in place for the retry, and neither comes back after the retry removed it.
    #[tokio::test]
    async fn a_take_or_delete_that_failed_to_commit_leaves_the_entry_for_the_retry() {
        let dir = tempfile::tempdir().unwrap();
        let s = EmbeddedStore::open(dir.path()).unwrap();
        s.kv_put("code:x", b"c", 60).await.unwrap();
        s.kv_put("session:s", b"logged in", 3_600).await.unwrap();
        assert!(with_failed_commit(&s, s.kv_take("code:x")).await.is_err());
        assert!(
            with_failed_commit(&s, s.kv_delete("session:s"))
                .await
                .is_err()
        );
        assert_eq!(
            s.kv_get("code:x").await.unwrap().as_deref(),
            Some(&b"c"[..])
        );
        assert!(s.kv_get("session:s").await.unwrap().is_some());
        assert_eq!(
            s.kv_take("code:x").await.unwrap().as_deref(),
            Some(&b"c"[..])
        );
        s.kv_delete("session:s").await.unwrap();
        drop(s);
        let s = EmbeddedStore::open(dir.path()).unwrap();
        assert_eq!(
            s.kv_get("code:x").await.unwrap(),
            None,
            "a taken code stays taken"
        );
        assert_eq!(
            s.kv_get("session:s").await.unwrap(),
            None,
            "a logout stays done"
        );
    }

    /// The other changes: one whose commit failed leaves memory as the file has it, so no
    /// value exists only until the next restart (an email claimed by an account that was never
    /// stored, a throttle count the file does not have).
    #[tokio::test]
    async fn a_write_that_failed_to_commit_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let s = EmbeddedStore::open(dir.path()).unwrap();
        s.kv_put("user:1", b"old", 0).await.unwrap();
        assert!(
            with_failed_commit(&s, s.kv_put("user:1", b"new", 0))
                .await
                .is_err()
        );
        assert_eq!(
            s.kv_get("user:1").await.unwrap().as_deref(),
            Some(&b"old"[..])
        );

        assert!(
            with_failed_commit(&s, s.kv_put_new("email:a", b"1", 0))
                .await
                .is_err()
        );
        assert_eq!(s.kv_get("email:a").await.unwrap(), None);
        assert!(
            s.kv_put_new("email:a", b"1", 0).await.unwrap(),
            "the retry claims it"
        );

        assert_eq!(s.counter_incr("tries", 60).await.unwrap(), 1);
        assert!(
            with_failed_commit(&s, s.counter_incr("tries", 60))
                .await
                .is_err()
        );
        assert_eq!(s.counter_get("tries").await.unwrap(), 1);
        assert!(
            with_failed_commit(&s, s.counter_decr("tries"))
                .await
                .is_err()
        );
        assert_eq!(s.counter_get("tries").await.unwrap(), 1);
        assert!(
            with_failed_commit(&s, s.counter_incr("fresh", 60))
                .await
                .is_err()
        );
        assert!(
            s.kv.get("fresh").is_none(),
            "a counter that was never stored"
        );
        drop(s);
        let s = EmbeddedStore::open(dir.path()).unwrap();
        assert_eq!(
            s.kv_get("user:1").await.unwrap().as_deref(),
            Some(&b"old"[..])
        );
        assert_eq!(
            s.kv_get("email:a").await.unwrap().as_deref(),
            Some(&b"1"[..])
        );
        assert_eq!(s.counter_get("tries").await.unwrap(), 1);
    }
}
