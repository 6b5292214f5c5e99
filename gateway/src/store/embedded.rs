//! Embedded store for a single gateway: memory is authoritative for reads (the proxy's token
//! lookup never touches the disk), and every change is written through to a redb file under
//! `--data-dir` before it is acknowledged, so a restart loses nothing.

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use dashmap::DashMap;
use redb::{Database, ReadableTable, TableDefinition};

use super::{Store, StoreError, StoreResult, TokenRecord, unix_now};
use crate::tokens::TokenHash;

const TOKENS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("tokens");

pub struct EmbeddedStore {
    db: Arc<Database>,
    tokens: DashMap<TokenHash, TokenRecord>,
    /// grant_id -> token hashes, rebuilt from `tokens` on start.
    grants: DashMap<String, Vec<TokenHash>>,
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
        let db = Database::create(&path).map_err(|e| {
            io(format!(
                "cannot open {} (is another gateway using this --data-dir?): {e}",
                path.display()
            ))
        })?;
        let store = EmbeddedStore {
            db: Arc::new(db),
            tokens: DashMap::new(),
            grants: DashMap::new(),
        };
        store.load()?;
        Ok(store)
    }

    fn load(&self) -> StoreResult<()> {
        let now = unix_now();
        let txn = self.db.begin_write().map_err(io)?;
        {
            let table = txn.open_table(TOKENS).map_err(io)?;
            for entry in table.iter().map_err(io)? {
                let (k, v) = entry.map_err(io)?;
                let hash: TokenHash = k
                    .value()
                    .try_into()
                    .map_err(|_| StoreError::Corrupt("token key is not 32 bytes".into()))?;
                let rec: TokenRecord = serde_json::from_slice(v.value())
                    .map_err(|e| StoreError::Corrupt(format!("token record: {e}")))?;
                if rec.is_expired(now) {
                    continue;
                }
                self.grants
                    .entry(rec.grant_id.clone())
                    .or_default()
                    .push(hash);
                self.tokens.insert(hash, rec);
            }
        }
        txn.commit().map_err(io)?;
        Ok(())
    }

    /// Runs a write transaction off the async runtime (redb fsyncs on commit).
    async fn write<F>(&self, f: F) -> StoreResult<()>
    where
        F: FnOnce(&mut redb::Table<&[u8], &[u8]>) -> Result<(), redb::StorageError>
            + Send
            + 'static,
    {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || -> StoreResult<()> {
            let txn = db.begin_write().map_err(io)?;
            {
                let mut table = txn.open_table(TOKENS).map_err(io)?;
                f(&mut table).map_err(io)?;
            }
            txn.commit().map_err(io)
        })
        .await
        .map_err(io)?
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
}

#[async_trait]
impl Store for EmbeddedStore {
    async fn put_token(&self, hash: TokenHash, record: TokenRecord) -> StoreResult<()> {
        let bytes = serde_json::to_vec(&record).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        self.write(move |t| t.insert(hash.as_slice(), bytes.as_slice()).map(|_| ()))
            .await?;
        self.grants
            .entry(record.grant_id.clone())
            .or_default()
            .push(hash);
        self.tokens.insert(hash, record);
        Ok(())
    }

    async fn get_token(&self, hash: &TokenHash) -> StoreResult<Option<TokenRecord>> {
        let now = unix_now();
        Ok(self
            .tokens
            .get(hash)
            .filter(|r| !r.is_expired(now))
            .map(|r| r.clone()))
    }

    async fn revoke_token(&self, hash: &TokenHash) -> StoreResult<Option<TokenRecord>> {
        // Memory first: from this instant the token no longer authorizes anything.
        let Some((hash, rec)) = self.tokens.remove(hash) else {
            return Ok(None);
        };
        self.forget(&hash, &rec);
        self.delete_many(vec![hash]).await?;
        Ok(Some(rec))
    }

    async fn revoke_grant(&self, grant_id: &str) -> StoreResult<usize> {
        let hashes = self
            .grants
            .remove(grant_id)
            .map(|(_, l)| l)
            .unwrap_or_default();
        for h in &hashes {
            self.tokens.remove(h);
        }
        let n = hashes.len();
        self.delete_many(hashes).await?;
        Ok(n)
    }

    async fn purge_expired(&self, now: u64) -> StoreResult<usize> {
        let expired: Vec<(TokenHash, TokenRecord)> = self
            .tokens
            .iter()
            .filter(|e| e.value().is_expired(now))
            .map(|e| (*e.key(), e.value().clone()))
            .collect();
        for (h, rec) in &expired {
            self.tokens.remove(h);
            self.forget(h, rec);
        }
        let n = expired.len();
        self.delete_many(expired.into_iter().map(|(h, _)| h).collect())
            .await?;
        Ok(n)
    }

    async fn ready(&self) -> StoreResult<()> {
        Ok(())
    }
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
        assert_eq!(s.get_token(&a).await.unwrap(), Some(rec("g1", far)));
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

    #[test]
    fn second_gateway_on_same_dir_gets_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let _a = EmbeddedStore::open(dir.path()).unwrap();
        let err = EmbeddedStore::open(dir.path()).err().expect("locked");
        assert!(err.to_string().contains("another gateway"), "{err}");
    }
}
