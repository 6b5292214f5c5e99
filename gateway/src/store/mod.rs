//! Gateway state (tokens now; users, codes, sessions with the login flow) behind one trait,
//! implemented by the embedded store here and by Redis for several replicas.

pub mod embedded;
pub mod redis;
pub mod redis_conn;
pub mod token_cache;

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::tokens::TokenHash;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store unavailable: {0}")]
    Unavailable(String),
    #[error("store data could not be read: {0}")]
    Corrupt(String),
}

pub type StoreResult<T> = Result<T, StoreError>;

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum TokenKind {
    Access,
    Refresh,
}

/// What the store keeps for a token, under the SHA-256 of the token.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct TokenRecord {
    pub kind: TokenKind,
    pub client_id: String,
    /// `<namespace>/<subscription>`
    pub subscription: String,
    /// `<namespace>/<api>`
    pub api: String,
    /// Absent for client_credentials tokens.
    pub user_id: Option<String>,
    /// Granted scopes, space-separated.
    pub scope: String,
    /// Every token descended from one authorization shares it, so a replayed code or a reused
    /// refresh token can revoke them all.
    pub grant_id: String,
    /// Unix seconds.
    pub issued_at: u64,
    pub expires_at: u64,
}

impl TokenRecord {
    pub fn is_expired(&self, now: u64) -> bool {
        self.expires_at <= now
    }
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[async_trait]
pub trait Store: Send + Sync {
    async fn put_token(&self, hash: TokenHash, record: TokenRecord) -> StoreResult<()>;
    /// The live (unexpired, unrevoked) token with this hash. Shared, not copied: every proxied
    /// request reads one.
    async fn get_token(&self, hash: &TokenHash) -> StoreResult<Option<Arc<TokenRecord>>>;
    /// `get_token`'s answer when the store has it in memory (outer `None`: ask `get_token`).
    /// The proxy asks this first and skips a boxed future per request.
    fn get_token_now(&self, _hash: &TokenHash) -> Option<Option<Arc<TokenRecord>>> {
        None
    }
    /// Removes one token; returns what it was.
    async fn revoke_token(&self, hash: &TokenHash) -> StoreResult<Option<TokenRecord>>;
    /// Removes every token of a grant; returns how many.
    async fn revoke_grant(&self, grant_id: &str) -> StoreResult<usize>;
    /// Drops expired entries; returns how many.
    async fn purge_expired(&self, now: u64) -> StoreResult<usize>;
    /// Can the store serve requests right now?
    async fn ready(&self) -> StoreResult<()>;

    // Small records of the login flow (users, sessions, codes, consents, markers) as bytes under
    // string keys. `ttl_secs` 0 means the entry never expires.

    async fn kv_put(&self, key: &str, value: &[u8], ttl_secs: u64) -> StoreResult<()>;
    /// Writes only when the key is absent (or expired); false when it exists.
    async fn kv_put_new(&self, key: &str, value: &[u8], ttl_secs: u64) -> StoreResult<bool>;
    /// Writes only when a live entry is there; false when it is absent or expired (a session
    /// saved while another request signs it out stays signed out).
    async fn kv_put_existing(&self, key: &str, value: &[u8], ttl_secs: u64) -> StoreResult<bool>;
    async fn kv_get(&self, key: &str) -> StoreResult<Option<Vec<u8>>>;
    /// Reads and deletes in one atomic step: of two concurrent takers only one gets the value.
    async fn kv_take(&self, key: &str) -> StoreResult<Option<Vec<u8>>>;
    async fn kv_delete(&self, key: &str) -> StoreResult<()>;
    /// Every live key that starts with `prefix` and that `keep` accepts (asked as they are read,
    /// so a large key space is never held at once): for a sweep at start-up, never on a
    /// request's path (it reads the whole key space).
    async fn kv_keys(
        &self,
        prefix: &str,
        keep: for<'k> fn(&'k str) -> bool,
    ) -> StoreResult<Vec<String>>;
    /// Adds one to a counter that expires `window_secs` after its first increment; returns the
    /// new count (fixed-window throttling).
    async fn counter_incr(&self, key: &str, window_secs: u64) -> StoreResult<u64>;
    /// The current count of such a counter (0 when absent or expired).
    async fn counter_get(&self, key: &str) -> StoreResult<u64>;
    /// Takes back one increment of a live counter, keeping its window; never below 0, and an
    /// absent or expired counter stays absent.
    async fn counter_decr(&self, key: &str) -> StoreResult<()>;
}

/// Typed access to the key-value part of a store, as JSON.
pub mod kv {
    use serde::Serialize;
    use serde::de::DeserializeOwned;

    use super::{Store, StoreError, StoreResult};

    fn encode<T: Serialize>(v: &T) -> StoreResult<Vec<u8>> {
        serde_json::to_vec(v).map_err(|e| StoreError::Corrupt(e.to_string()))
    }

    fn decode<T: DeserializeOwned>(b: Option<Vec<u8>>) -> StoreResult<Option<T>> {
        b.map(|b| serde_json::from_slice(&b).map_err(|e| StoreError::Corrupt(e.to_string())))
            .transpose()
    }

    pub async fn put<T: Serialize>(s: &dyn Store, key: &str, v: &T, ttl: u64) -> StoreResult<()> {
        s.kv_put(key, &encode(v)?, ttl).await
    }

    pub async fn put_new<T: Serialize>(
        s: &dyn Store,
        key: &str,
        v: &T,
        ttl: u64,
    ) -> StoreResult<bool> {
        s.kv_put_new(key, &encode(v)?, ttl).await
    }

    pub async fn put_existing<T: Serialize>(
        s: &dyn Store,
        key: &str,
        v: &T,
        ttl: u64,
    ) -> StoreResult<bool> {
        s.kv_put_existing(key, &encode(v)?, ttl).await
    }

    pub async fn get<T: DeserializeOwned>(s: &dyn Store, key: &str) -> StoreResult<Option<T>> {
        decode(s.kv_get(key).await?)
    }

    pub async fn take<T: DeserializeOwned>(s: &dyn Store, key: &str) -> StoreResult<Option<T>> {
        decode(s.kv_take(key).await?)
    }
}
