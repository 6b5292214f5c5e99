//! Redis store: everything shared by several gateway replicas. Tokens are cached in-process
//! for at most `TOKEN_CACHE_TTL`; revocations are published on a channel every replica listens
//! to, so a revoked token stops working everywhere at once (the cache is bypassed whenever that
//! subscription is down).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use futures_util::StreamExt;
use redis::AsyncCommands;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use super::redis_conn::Connections;
use super::token_cache::TokenCache;

use super::{Store, StoreError, StoreResult, TokenRecord, unix_now};
use crate::tokens::TokenHash;

const PREFIX: &str = "gatehouse:";
const REVOKED_CHANNEL: &str = "gatehouse:revoked";
/// Revocations reach the cache at once (pub/sub); the TTL only bounds how long a token deleted
/// behind the gateway's back (by hand, or a publish that failed) keeps working on a replica.
/// Every active token is read again once per TTL: with 10,000 tokens round-robin at 15k req/s,
/// 10 s sent about 7% of requests to Redis twice; 30 s gave 4-12% more req/s (two A/B pairs).
pub const TOKEN_CACHE_TTL: Duration = Duration::from_secs(30);

/// Deletes every live token of a grant and the grant's index atomically, telling every replica
/// first; returns the token hashes. PUBLISH goes first: when it is refused (an ACL without the
/// channel) the script stops before it has changed anything.
/// KEYS[1]: the grant's sorted set (token hash by expiry), KEYS[2]: its plain set as gateways
/// before session 19 kept it (empty once their tokens have expired; a replica still running
/// that version during a rolling upgrade revokes only the tokens that set lists).
/// ARGV[1]: the token key prefix, ARGV[2]: the revocation channel, ARGV[3]: the expiry (unix s)
/// up to which index entries are dropped first.
const REVOKE_GRANT: &str = r"
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[3])
local members = redis.call('ZRANGE', KEYS[1], 0, -1)
for _, h in ipairs(redis.call('SMEMBERS', KEYS[2])) do members[#members + 1] = h end
for i = 1, #members, 256 do
  redis.call('PUBLISH', ARGV[2], table.concat(members, ',', i, math.min(i + 255, #members)))
end
for _, h in ipairs(members) do redis.call('DEL', ARGV[1] .. h) end
redis.call('DEL', KEYS[1], KEYS[2])
return members
";

/// Deletes one token and takes it out of its grant's index, telling every replica first (as
/// REVOKE_GRANT); returns the record, or nil when there was none.
/// ARGV[1]: the token hash (hex), ARGV[2]: the channel, ARGV[3]: the grant sorted-set prefix,
/// ARGV[4]: the older plain-set prefix.
const REVOKE_TOKEN: &str = r"
local raw = redis.call('GET', KEYS[1])
if not raw then return false end
redis.call('PUBLISH', ARGV[2], ARGV[1])
redis.call('DEL', KEYS[1])
local ok, rec = pcall(cjson.decode, raw)
if ok and type(rec) == 'table' and type(rec.grant_id) == 'string' then
  redis.call('ZREM', ARGV[3] .. rec.grant_id, ARGV[1])
  redis.call('SREM', ARGV[4] .. rec.grant_id, ARGV[1])
end
return raw
";

/// Takes one back from a live counter: DECR keeps the key's TTL, but on an absent (expired)
/// key it would create a counter at -1 that never expires.
const COUNTER_DECR: &str = r"
local v = tonumber(redis.call('GET', KEYS[1]))
if v and v > 0 then redis.call('DECR', KEYS[1]) end
return 0
";

/// Options for reaching Redis.
#[derive(Clone, Debug)]
pub struct RedisOptions {
    pub url: String,
    /// Bound on every command: past it the request gets a 503 instead of waiting.
    pub response_timeout: Duration,
    pub connect_timeout: Duration,
}

impl RedisOptions {
    pub fn new(url: &str) -> RedisOptions {
        RedisOptions {
            url: url.to_string(),
            response_timeout: Duration::from_millis(500),
            connect_timeout: Duration::from_millis(500),
        }
    }
}

pub struct RedisStore {
    conns: Connections,
    cache: TokenCache,
    /// True while this replica receives revocation messages; the cache is used only then.
    listening: Arc<AtomicBool>,
    /// Bumped on every invalidation, so a lookup that raced one does not refill the cache.
    epoch: Arc<AtomicU64>,
    revoke_grant: redis::Script,
    revoke_token: redis::Script,
    counter_decr: redis::Script,
}

fn err(e: redis::RedisError) -> StoreError {
    StoreError::Unavailable(format!("redis: {e}"))
}

fn tok_key(hash: &TokenHash) -> String {
    format!("{PREFIX}tok:{}", hex::encode(hash))
}

/// A grant's tokens: a sorted set of token hashes scored by expiry, pruned on every insert, so
/// a client refreshing in a loop cannot grow it (a plain set kept every access token until the
/// family ended, and revoking it became one long script).
fn grant_key(grant: &str) -> String {
    format!("{PREFIX}{GRANTS}{grant}")
}
const GRANTS: &str = "grants:";
/// Index entries are dropped this long after their token's expiry.
const PRUNE_SLACK_SECS: u64 = 60;

/// The plain set earlier gateways kept per grant; revocation still reads it until its tokens
/// have expired (at most the refresh token lifetime after an upgrade).
fn old_grant_key(grant: &str) -> String {
    format!("{PREFIX}{OLD_GRANT}{grant}")
}
const OLD_GRANT: &str = "grant:";

fn kv_key(key: &str) -> String {
    format!("{PREFIX}kv:{key}")
}

/// The client for `--redis`, with TCP_NODELAY: a worker sends its next batch of checks without
/// waiting for the previous answer, and with Nagle's algorithm on, that batch would sit in the
/// kernel until the previous one is acknowledged (a network round trip).
fn client(url: &str) -> StoreResult<redis::Client> {
    let invalid =
        |e: redis::RedisError| StoreError::Unavailable(format!("invalid --redis URL: {e}"));
    let info = redis::IntoConnectionInfo::into_connection_info(url)
        .map_err(invalid)?
        .set_tcp_settings(redis::io::tcp::TcpSettings::default().set_nodelay(true));
    redis::Client::open(info).map_err(invalid)
}

impl RedisStore {
    /// Connects lazily: the gateway starts (not ready) even when Redis is down, and the
    /// connection manager reconnects with backoff by itself.
    pub fn connect(opts: &RedisOptions) -> StoreResult<Arc<RedisStore>> {
        let client = client(&opts.url)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(opts.connect_timeout))
            .set_response_timeout(Some(opts.response_timeout))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_secs(2));
        let conns = Connections::new(client.clone(), config).map_err(err)?;
        let store = Arc::new(RedisStore {
            conns,
            cache: TokenCache::new(TOKEN_CACHE_TTL),
            listening: Arc::new(AtomicBool::new(false)),
            epoch: Arc::new(AtomicU64::new(0)),
            revoke_grant: redis::Script::new(REVOKE_GRANT),
            revoke_token: redis::Script::new(REVOKE_TOKEN),
            counter_decr: redis::Script::new(COUNTER_DECR),
        });
        store.clone().spawn_listener(client);
        Ok(store)
    }

    pub fn connection(&self) -> Connections {
        self.conns.clone()
    }

    /// Keeps a subscription to the revocation channel, reconnecting with backoff. The channel
    /// is PINGed every `LISTENER_PING`: a connection that went silent (no FIN or RST: a crashed
    /// host, an idle connection dropped by a NAT) counts as lost, so the cache stops being used.
    fn spawn_listener(self: Arc<Self>, client: redis::Client) {
        const LISTENER_PING: Duration = Duration::from_secs(5);
        const LISTENER_TIMEOUT: Duration = Duration::from_secs(1);
        let weak = Arc::downgrade(&self);
        drop(self);
        tokio::spawn(async move {
            let mut delay = Duration::from_millis(100);
            let mut reported = false;
            loop {
                let Some(store) = weak.upgrade() else { return };
                let subscribed = tokio::time::timeout(Duration::from_secs(2), async {
                    let (mut sink, stream) = client.get_async_pubsub().await?.split();
                    sink.subscribe(REVOKED_CHANNEL).await?;
                    Ok::<_, redis::RedisError>((sink, stream))
                })
                .await;
                match subscribed {
                    Ok(Ok((mut sink, mut stream))) => {
                        // Anything revoked while we were not listening may be cached: start
                        // clean. The epoch first, as in `invalidate`: a lookup that read before
                        // and inserts after the clear sees the bump and takes its entry out.
                        store.epoch.fetch_add(1, Ordering::SeqCst);
                        store.cache.clear();
                        store.listening.store(true, Ordering::SeqCst);
                        metrics::gauge!("gatehouse_revocation_listener_up").set(1.0);
                        delay = Duration::from_millis(100);
                        reported = false;
                        tracing::info!("listening for token revocations");
                        let mut ping = tokio::time::interval(LISTENER_PING);
                        ping.tick().await;
                        let why = loop {
                            tokio::select! {
                                msg = stream.next() => match msg {
                                    Some(msg) => {
                                        let payload: String = msg.get_payload().unwrap_or_default();
                                        store.invalidate(&payload);
                                    }
                                    None => break "connection closed",
                                },
                                _ = ping.tick() => {
                                    match tokio::time::timeout(LISTENER_TIMEOUT, sink.ping::<redis::Value>()).await {
                                        Ok(Ok(_)) => {}
                                        Ok(Err(_)) => break "ping failed",
                                        Err(_) => break "no answer to ping",
                                    }
                                }
                            }
                        };
                        store.listening.store(false, Ordering::SeqCst);
                        store.epoch.fetch_add(1, Ordering::SeqCst);
                        store.cache.clear();
                        metrics::gauge!("gatehouse_revocation_listener_up").set(0.0);
                        tracing::warn!(
                            reason = why,
                            "revocation channel lost; token cache bypassed until it is back"
                        );
                    }
                    failed => {
                        let e = match failed {
                            Ok(Err(e)) => e.to_string(),
                            _ => "timed out".to_string(),
                        };
                        // Loud once (an ACL without the channel stays broken), then quiet.
                        if reported {
                            tracing::debug!(error = %e, "subscribing to the revocation channel failed");
                        } else {
                            tracing::warn!(error = %e, channel = REVOKED_CHANNEL, "cannot subscribe to the revocation channel; token cache bypassed (the Redis user needs this channel)");
                            reported = true;
                        }
                    }
                }
                drop(store);
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        });
    }

    /// `e` as a store error, replacing the connections first when it calls for that.
    fn fail(&self, e: redis::RedisError) -> StoreError {
        err(self.conns.check(e))
    }

    /// An operation that may run twice, sent once more when its connection turns out to be
    /// closed (`Connections::retrying`).
    async fn idempotent<T, F, Fut>(&self, op: F) -> StoreResult<T>
    where
        F: Fn(ConnectionManager) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        self.conns.retrying(op).await.map_err(|e| self.fail(e))
    }

    async fn read<T: redis::FromRedisValue>(&self, key: &str) -> StoreResult<T> {
        self.idempotent(|mut c| async move { c.get(key).await })
            .await
    }

    fn invalidate(&self, hex_hashes: &str) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
        for h in hex_hashes.split(',') {
            if let Ok(bytes) = hex::decode(h)
                && let Ok(hash) = TokenHash::try_from(bytes.as_slice())
            {
                self.cache.remove(&hash);
            }
        }
    }
}

#[async_trait]
impl Store for RedisStore {
    async fn put_token(&self, hash: TokenHash, record: TokenRecord) -> StoreResult<()> {
        let json =
            serde_json::to_string(&record).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let ttl = record.expires_at.saturating_sub(unix_now()).max(1);
        let gk = grant_key(&record.grant_id);
        let mut pipe = redis::pipe();
        pipe.atomic()
            .set_ex(tok_key(&hash), json, ttl)
            .ignore()
            .zadd(&gk, hex::encode(hash), record.expires_at)
            .ignore()
            // A minute of slack: replicas' clocks differ, and a token another replica still
            // accepts must stay revocable.
            .zrembyscore(&gk, "-inf", unix_now().saturating_sub(PRUNE_SLACK_SECS))
            .ignore()
            // The grant set lives as long as its longest-lived token.
            .cmd("EXPIRE")
            .arg(&gk)
            .arg(ttl)
            .arg("GT")
            .ignore()
            .cmd("EXPIRE")
            .arg(&gk)
            .arg(ttl)
            .arg("NX")
            .ignore();
        // Writing the same record twice is harmless.
        let pipe = &pipe;
        let _: () = self
            .idempotent(|mut c| async move { pipe.query_async(&mut c).await })
            .await?;
        Ok(())
    }

    async fn get_token(&self, hash: &TokenHash) -> StoreResult<Option<Arc<TokenRecord>>> {
        if let Some(cached) = self.get_token_now(hash) {
            return Ok(cached);
        }
        let now = unix_now();
        let listening = self.listening.load(Ordering::SeqCst);
        let epoch = self.epoch.load(Ordering::SeqCst);
        let raw: Option<String> = self.read(&tok_key(hash)).await?;
        let Some(raw) = raw else {
            return Ok(None);
        };
        let rec: TokenRecord =
            serde_json::from_str(&raw).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        if rec.is_expired(now) {
            return Ok(None);
        }
        if listening && self.epoch.load(Ordering::SeqCst) == epoch {
            self.cache.insert(*hash, &rec);
            // A revocation that bumped the epoch between the check and the insert may have
            // removed nothing yet: take the entry out again. (`invalidate` bumps, then removes.)
            if self.epoch.load(Ordering::SeqCst) != epoch {
                self.cache.remove(hash);
            }
        }
        Ok(Some(Arc::new(rec)))
    }

    /// From the cache, while revocation notices arrive (otherwise a revoked token could live on).
    fn get_token_now(&self, hash: &TokenHash) -> Option<Option<Arc<TokenRecord>>> {
        if !self.listening.load(Ordering::SeqCst) {
            return None;
        }
        let rec = self.cache.get(hash)?;
        Some((!rec.is_expired(unix_now())).then(|| Arc::new(rec)))
    }

    async fn revoke_token(&self, hash: &TokenHash) -> StoreResult<Option<TokenRecord>> {
        let mut c = self.conns.get();
        let hex_hash = hex::encode(hash);
        let raw: Result<Option<String>, _> = self
            .revoke_token
            .key(tok_key(hash))
            .arg(&hex_hash)
            .arg(REVOKED_CHANNEL)
            .arg(format!("{PREFIX}{GRANTS}"))
            .arg(format!("{PREFIX}{OLD_GRANT}"))
            .invoke_async(&mut c)
            .await;
        // As a revocation message would (epoch first, then the entry): lookups under way on
        // this replica must not cache it. Also when the reply was lost: the script may have run,
        // and the next lookup must ask Redis rather than this cache.
        self.epoch.fetch_add(1, Ordering::SeqCst);
        self.cache.remove(hash);
        let raw = raw.map_err(|e| self.fail(e))?;
        let Some(raw) = raw else {
            return Ok(None);
        };
        let rec: TokenRecord =
            serde_json::from_str(&raw).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        Ok(Some(rec))
    }

    async fn revoke_grant(&self, grant_id: &str) -> StoreResult<usize> {
        let mut script = self.revoke_grant.key(grant_key(grant_id));
        script
            .key(old_grant_key(grant_id))
            .arg(format!("{PREFIX}tok:"))
            .arg(REVOKED_CHANNEL)
            .arg(unix_now().saturating_sub(PRUNE_SLACK_SECS));
        // Revoking a grant twice revokes nothing more.
        let script = &script;
        let members: Vec<String> = self
            .idempotent(|mut c| async move { script.invoke_async(&mut c).await })
            .await?;
        self.invalidate(&members.join(","));
        Ok(members.len())
    }

    async fn purge_expired(&self, _now: u64) -> StoreResult<usize> {
        // Redis expires keys itself; only the local cache needs sweeping.
        self.cache.purge();
        Ok(0)
    }

    /// Reachable and writable: a short-lived write rather than PING, which a replica (the old
    /// primary after a failover behind the endpoint) answers too. A write needs no permission
    /// beyond the gatehouse keys (ROLE and INFO are @dangerous in Redis's ACL categories).
    async fn ready(&self) -> StoreResult<()> {
        let mut cmd = redis::cmd("SET");
        cmd.arg(format!("{PREFIX}ready"))
            .arg(1)
            .arg("PX")
            .arg(10_000);
        let cmd = &cmd;
        let _: () = self
            .idempotent(|mut c| async move { cmd.query_async(&mut c).await })
            .await?;
        Ok(())
    }

    async fn kv_put(&self, key: &str, value: &[u8], ttl_secs: u64) -> StoreResult<()> {
        let mut cmd = redis::cmd("SET");
        cmd.arg(kv_key(key)).arg(value);
        if ttl_secs > 0 {
            cmd.arg("EX").arg(ttl_secs);
        }
        let cmd = &cmd;
        let _: () = self
            .idempotent(|mut c| async move { cmd.query_async(&mut c).await })
            .await?;
        Ok(())
    }

    async fn kv_put_new(&self, key: &str, value: &[u8], ttl_secs: u64) -> StoreResult<bool> {
        let mut c = self.conns.get();
        let mut cmd = redis::cmd("SET");
        cmd.arg(kv_key(key)).arg(value).arg("NX");
        if ttl_secs > 0 {
            cmd.arg("EX").arg(ttl_secs);
        }
        let set: Option<String> = cmd.query_async(&mut c).await.map_err(|e| self.fail(e))?;
        Ok(set.is_some())
    }

    async fn kv_put_existing(&self, key: &str, value: &[u8], ttl_secs: u64) -> StoreResult<bool> {
        let mut cmd = redis::cmd("SET");
        cmd.arg(kv_key(key)).arg(value).arg("XX");
        if ttl_secs > 0 {
            cmd.arg("EX").arg(ttl_secs);
        }
        let cmd = &cmd;
        // Sent again after a lost reply, it writes the same again, or nothing if the key went
        // meanwhile (and then it should not be there).
        let set: Option<String> = self
            .idempotent(|mut c| async move { cmd.query_async(&mut c).await })
            .await?;
        Ok(set.is_some())
    }

    async fn kv_get(&self, key: &str) -> StoreResult<Option<Vec<u8>>> {
        self.read(&kv_key(key)).await
    }

    async fn kv_keys(
        &self,
        prefix: &str,
        keep: for<'k> fn(&'k str) -> bool,
    ) -> StoreResult<Vec<String>> {
        // SCAN in steps, so a large key space never blocks the server; MATCH takes a glob, so
        // the prefix's glob characters are escaped.
        let mut pattern = String::new();
        for ch in kv_key(prefix).chars() {
            if matches!(ch, '*' | '?' | '[' | ']' | '\\') {
                pattern.push('\\');
            }
            pattern.push(ch);
        }
        pattern.push('*');
        let strip = kv_key("");
        let mut keys = Vec::new();
        let mut cursor: u64 = 0;
        loop {
            let mut c = self.conns.get();
            let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut c)
                .await
                .map_err(|e| self.fail(e))?;
            keys.extend(
                batch
                    .into_iter()
                    .filter_map(|k| k.strip_prefix(&strip).map(str::to_string))
                    .filter(|k| keep(k)),
            );
            if next == 0 {
                // SCAN may return a key more than once.
                keys.sort_unstable();
                keys.dedup();
                return Ok(keys);
            }
            cursor = next;
        }
    }

    async fn kv_take(&self, key: &str) -> StoreResult<Option<Vec<u8>>> {
        let mut c = self.conns.get();
        redis::cmd("GETDEL")
            .arg(kv_key(key))
            .query_async(&mut c)
            .await
            .map_err(|e| self.fail(e))
    }

    async fn kv_delete(&self, key: &str) -> StoreResult<()> {
        let key = &kv_key(key);
        let _: i64 = self
            .idempotent(|mut c| async move { c.del(key).await })
            .await?;
        Ok(())
    }

    async fn counter_incr(&self, key: &str, window_secs: u64) -> StoreResult<u64> {
        let k = kv_key(key);
        let mut c = self.conns.get();
        let (count,): (u64,) = redis::pipe()
            .atomic()
            .incr(&k, 1u64)
            .cmd("EXPIRE")
            .arg(&k)
            .arg(window_secs)
            .arg("NX")
            .ignore()
            .query_async(&mut c)
            .await
            .map_err(|e| self.fail(e))?;
        Ok(count)
    }

    async fn counter_get(&self, key: &str) -> StoreResult<u64> {
        let v: Option<u64> = self.read(&kv_key(key)).await?;
        Ok(v.unwrap_or(0))
    }

    async fn counter_decr(&self, key: &str) -> StoreResult<()> {
        let mut c = self.conns.get();
        let _: i64 = self
            .counter_decr
            .key(kv_key(key))
            .invoke_async(&mut c)
            .await
            .map_err(|e| self.fail(e))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_disable_nagle_and_bad_urls_are_errors() {
        for url in ["redis://127.0.0.1:6379/", "rediss://redis.example:6380/0"] {
            let c = client(url).unwrap();
            assert!(c.get_connection_info().tcp_settings().nodelay(), "{url}");
        }
        let Err(StoreError::Unavailable(e)) = client("http://nope") else {
            panic!("accepted a non-Redis URL");
        };
        assert!(e.starts_with("invalid --redis URL"), "{e}");
    }
}
