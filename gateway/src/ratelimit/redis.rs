//! Shared limiter: the GCRA of `gcra.rs` as one Lua script, so every limit of a request is
//! checked and consumed atomically in one round trip, on one clock (Redis `TIME`) for all
//! replicas. All keys of one request share the subscription hash tag (one Cluster slot).

use async_trait::async_trait;

use super::gcra::Decision;
use super::{LimitCheck, Limiter, LimiterUnavailable};
use crate::store::redis_conn::Connections;

/// KEYS: one per limit. ARGV[1]: now in µs, or "" for the server clock; then per limit its
/// emission interval (µs) and its limit. Returns {allowed, limit, remaining, reset_us, retry_us}.
/// Mirrors `gcra::check` and `gcra::combine` line for line (ties resolved the same way).
pub const GCRA_SCRIPT: &str = r"
local now = tonumber(ARGV[1])
if now == nil then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local new_tats, ttl = {}, {}
local best = nil
local refused = nil
for i = 1, #KEYS do
  local interval = tonumber(ARGV[2 * i])
  local limit = tonumber(ARGV[2 * i + 1])
  local stored = tonumber(redis.call('GET', KEYS[i]) or '0')
  local tat = math.max(stored, now)
  local tolerance = interval * (limit - 1)
  if tat - now > tolerance then
    local retry = tat - tolerance - now
    if refused == nil or retry >= refused[5] then
      refused = {0, limit, 0, tat - now, retry}
    end
  else
    local new_tat = tat + interval
    local ahead = new_tat - now
    local remaining = math.floor(math.max(interval * limit - ahead, 0) / interval)
    new_tats[i] = new_tat
    ttl[i] = math.ceil(ahead / 1000) + 1000
    if best == nil or remaining < best[3] or (remaining == best[3] and limit < best[2]) then
      best = {1, limit, remaining, ahead, 0}
    end
  end
end
if refused ~= nil then
  return refused
end
for i = 1, #KEYS do
  redis.call('SET', KEYS[i], string.format('%.0f', new_tats[i]), 'PX', string.format('%.0f', ttl[i]))
end
if best == nil then
  return {1, 0, 0, 0, 0}
end
return best
";

pub struct RedisLimiter {
    conns: Connections,
    script: redis::Script,
    prefix: &'static str,
}

impl RedisLimiter {
    pub fn new(conns: Connections) -> RedisLimiter {
        RedisLimiter {
            conns,
            script: redis::Script::new(GCRA_SCRIPT),
            prefix: "gatehouse:",
        }
    }

    /// Decides at an explicit instant (µs), or on the Redis clock when `now` is None.
    pub async fn check_at(
        &self,
        checks: &[LimitCheck],
        now: Option<u64>,
    ) -> Result<Decision, LimiterUnavailable> {
        if checks.is_empty() {
            return Ok(Decision::unlimited());
        }
        let mut inv = self.script.prepare_invoke();
        for c in checks {
            inv.key(format!("{}{}", self.prefix, c.key));
        }
        inv.arg(now.map(|n| n.to_string()).unwrap_or_default());
        for c in checks {
            inv.arg(c.rate.interval_us).arg(c.rate.limit);
        }
        let mut conn = self.conns.get();
        // invoke_async sends EVALSHA and falls back to loading the script on NOSCRIPT.
        let (allowed, limit, remaining, reset_us, retry_after_us): (u8, u64, u64, u64, u64) = inv
            .invoke_async(&mut conn)
            .await
            .map_err(|e| LimiterUnavailable(e.to_string()))?;
        Ok(Decision {
            allowed: allowed == 1,
            limit,
            remaining,
            reset_us,
            retry_after_us,
        })
    }
}

#[async_trait]
impl Limiter for RedisLimiter {
    async fn check(&self, checks: &[LimitCheck]) -> Result<Decision, LimiterUnavailable> {
        self.check_at(checks, None).await
    }
}
