//! Shared limiter: the GCRA of `gcra.rs` as one Lua script, so every limit of a request is
//! checked and consumed atomically in one round trip, on one clock (Redis `TIME`) for all
//! replicas. All keys of one request share the subscription hash tag (one Cluster slot).
//!
//! One script call decides a batch of requests, in order, as if each had been its own call at
//! the same instant: the requests a worker receives together travel together (`coalesce.rs`).
//! Each `redis.call` from Lua costs about 1.4 µs in the server, so the script reads every key of
//! the batch with one MGET and writes each changed key once at the end. Numbers travel packed
//! as little-endian doubles (Redis's bundled `struct` library): one `tonumber` (a `strtod`) per
//! argument and one reply element per number cost more than the GCRA arithmetic itself.

use std::sync::Arc;

use async_trait::async_trait;

use super::coalesce::{Coalescer, Runner};
use super::gcra::Decision;
use super::refusals::Refusals;
use super::{LimitCheck, Limiter, LimiterUnavailable};
use crate::store::redis_conn::Connections;

/// KEYS: every distinct key of the batch. ARGV[1]: now in µs, or "" for the server clock.
/// ARGV[2]: packed doubles (`pack`): per request its number of limits and, per limit, its key's
/// index in KEYS (1-based), its emission interval (µs) and its limit. Returns packed doubles,
/// six per request: allowed, limit, remaining, reset_us, retry_us, and for a refusal which of
/// the request's limits (1-based) reported its wait (0 when allowed). Lua numbers are doubles
/// whichever way they arrive, so packing changes no arithmetic. Stack use stays far below Lua's
/// 8,000 slots: at most `MAX_BATCH` (64) requests of at most 16 limits each (`compile`).
/// Per request it mirrors `gcra::check` and `gcra::combine` (ties resolved the same way); a
/// refused request changes nothing. Numbers go to SET as numbers: Redis writes them with 17
/// significant digits, exact for every TAT below 2^53 µs.
pub const GCRA_SCRIPT: &str = r"
local now = tonumber(ARGV[1])
if now == nil then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local nkeys = #KEYS
local tats, changed = {}, {}
if nkeys > 0 then
  tats = redis.call('MGET', unpack(KEYS))
end
for k = 1, nkeys do
  tats[k] = tonumber(tats[k]) or 0
  changed[k] = false
end
local floor = math.floor
local packed = ARGV[2]
local v = {struct.unpack('<' .. string.rep('d', #packed / 8), packed)}
local nv = #v - 1 -- unpack also returns the position after the last number
local pending, ks = {}, {}
local out, o = {}, 0
local a = 1
while a <= nv do
  local n = v[a]
  local refused_limit, refused_reset, refused_retry, refused_by = nil, 0, 0, 0
  local best_limit, best_remaining, best_reset = nil, 0, 0
  for i = 1, n do
    local j = a + 3 * i - 2
    local k = v[j]
    local interval, limit = v[j + 1], v[j + 2]
    local tat = tats[k]
    if tat < now then tat = now end
    local tolerance = interval * (limit - 1)
    if tat - now > tolerance then
      local retry = tat - tolerance - now
      if refused_limit == nil or retry >= refused_retry then
        refused_limit, refused_reset, refused_retry, refused_by = limit, tat - now, retry, i
      end
    else
      local ahead = tat + interval - now
      local room = interval * limit - ahead
      if room < 0 then room = 0 end
      local remaining = floor(room / interval)
      if best_limit == nil or remaining < best_remaining
          or (remaining == best_remaining and limit < best_limit) then
        best_limit, best_remaining, best_reset = limit, remaining, ahead
      end
      ks[i], pending[i] = k, tat + interval
    end
  end
  a = a + 3 * n + 1
  if refused_limit ~= nil then
    out[o + 1], out[o + 2], out[o + 3], out[o + 4], out[o + 5], out[o + 6] =
      0, refused_limit, 0, refused_reset, refused_retry, refused_by
  else
    -- Allowed: consume every limit, each from the TAT read before this request.
    for i = 1, n do
      tats[ks[i]] = pending[i]
      changed[ks[i]] = true
    end
    out[o + 1], out[o + 2], out[o + 3], out[o + 4], out[o + 5], out[o + 6] =
      1, best_limit or 0, best_remaining, best_reset, 0, 0
  end
  o = o + 6
end
for k = 1, nkeys do
  if changed[k] then
    redis.call('SET', KEYS[k], tats[k], 'PX', math.ceil((tats[k] - now) / 1000) + 1000)
  end
end
return struct.pack('<' .. string.rep('d', o), unpack(out))
";

/// The KEYS and numeric ARGV (after `now`) of one script call for a batch of requests.
#[derive(Debug, PartialEq, Eq)]
pub struct ScriptCall {
    pub keys: Vec<String>,
    pub args: Vec<u64>,
}

/// Encodes a batch: each distinct key once, prefixed; each request as its limit count and, per
/// limit, (key index, interval, limit). Rates travel with each request, so a plan changed
/// between two requests of one batch still applies per request to the one TAT of a key. Pure.
pub fn encode(prefix: &str, batch: &[&[LimitCheck]]) -> ScriptCall {
    let mut index: foldhash::HashMap<&str, u64> = Default::default();
    let mut keys = Vec::new();
    let mut args = Vec::with_capacity(batch.iter().map(|r| 1 + 3 * r.len()).sum());
    for request in batch {
        args.push(request.len() as u64);
        for c in *request {
            let k = *index.entry(c.key.as_str()).or_insert_with(|| {
                let mut key = String::with_capacity(prefix.len() + c.key.len());
                key.push_str(prefix);
                key.push_str(&c.key);
                keys.push(key);
                keys.len() as u64
            });
            args.extend([k, c.rate.interval_us, c.rate.limit]);
        }
    }
    ScriptCall { keys, args }
}

/// The numbers of ARGV[2]: little-endian doubles, as the script's `struct.unpack('<d...')` reads
/// them. Lua would parse a decimal argument to the same nearest double. Pure.
pub fn pack(args: &[u64]) -> Vec<u8> {
    args.iter()
        .flat_map(|&a| (a as f64).to_le_bytes())
        .collect()
}

/// The script's answer for one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Answer {
    pub decision: Decision,
    /// For a refusal: the position in the request's checks of the limit whose wait the
    /// decision reports.
    pub refused_by: Option<usize>,
}

/// Splits the script's packed reply into one answer per request. Doubles convert to integers
/// by truncation, as Redis converts a Lua number to an integer reply. Pure.
pub fn decode(reply: &[u8], requests: usize) -> Result<Vec<Answer>, LimiterUnavailable> {
    const REQUEST: usize = 6 * 8;
    if reply.len() != REQUEST * requests {
        return Err(LimiterUnavailable(format!(
            "the rate-limit script answered {} bytes for {requests} requests",
            reply.len()
        )));
    }
    let n = |b: &[u8], i: usize| {
        let bytes: [u8; 8] = b[8 * i..8 * i + 8].try_into().expect("8 bytes");
        f64::from_le_bytes(bytes) as u64
    };
    Ok(reply
        .chunks_exact(REQUEST)
        .map(|r| Answer {
            decision: Decision {
                allowed: n(r, 0) == 1,
                limit: n(r, 1),
                remaining: n(r, 2),
                reset_us: n(r, 3),
                retry_after_us: n(r, 4),
            },
            refused_by: (n(r, 5) as usize).checked_sub(1),
        })
        .collect())
}

/// Runs the script; shared by the per-thread batch drivers.
pub struct ScriptRunner {
    conns: Connections,
    script: redis::Script,
    prefix: &'static str,
    /// What the script refused on the server clock, until each wait is over.
    refusals: Refusals,
}

impl ScriptRunner {
    /// Decides `batch` at an explicit instant (µs), or on the Redis clock when `now` is None.
    async fn call(
        &self,
        batch: &[&[LimitCheck]],
        now: Option<u64>,
    ) -> Result<Vec<Decision>, LimiterUnavailable> {
        // No later than the script's instant (on the server clock), so a refusal remembered
        // from here ends no later than Redis's own.
        let sent = std::time::Instant::now();
        let call = encode(self.prefix, batch);
        let packed = pack(&call.args);
        // The EVALSHA command built in place: a `ScriptInvocation` would copy every key and
        // argument into its own buffers first, and again into the command.
        let size: usize = call.keys.iter().map(String::len).sum::<usize>() + packed.len() + 64;
        let mut cmd = redis::Cmd::with_capacity(5 + call.keys.len(), size);
        cmd.arg("EVALSHA")
            .arg(self.script.get_hash())
            .arg(call.keys.len())
            .arg(&call.keys);
        match now {
            Some(n) => cmd.arg(n),
            None => cmd.arg(""),
        };
        cmd.arg(packed);
        let mut conn = self.conns.get();
        let reply: Vec<u8> = match cmd.query_async(&mut conn).await {
            // A Redis that restarted or flushed its scripts: load it and send the batch again.
            Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
                self.script
                    .load_async(&mut conn)
                    .await
                    .map_err(|e| LimiterUnavailable(self.conns.check(e).to_string()))?;
                cmd.query_async(&mut conn).await
            }
            other => other,
        }
        // A replica (READONLY) or a silent connection: the next batch goes on a new one.
        .map_err(|e| LimiterUnavailable(self.conns.check(e).to_string()))?;
        let answers = decode(&reply, batch.len())?;
        Ok(answers
            .iter()
            .zip(batch)
            .map(|(a, checks)| {
                // Only the server clock is real time; an explicit `now` (tests) is not.
                if now.is_none()
                    && let Some(c) = a.refused_by.and_then(|i| checks.get(i))
                {
                    self.refusals.remember(&c.key, sent, &a.decision);
                }
                a.decision
            })
            .collect())
    }
}

#[async_trait]
impl Runner for ScriptRunner {
    async fn run(&self, batch: &[&[LimitCheck]]) -> Result<Vec<Decision>, LimiterUnavailable> {
        self.call(batch, None).await
    }
}

pub struct RedisLimiter {
    runner: Arc<ScriptRunner>,
    coalescer: Coalescer<ScriptRunner>,
}

impl RedisLimiter {
    pub fn new(conns: Connections) -> RedisLimiter {
        let runner = Arc::new(ScriptRunner {
            conns,
            script: redis::Script::new(GCRA_SCRIPT),
            prefix: "gatehouse:",
            refusals: Refusals::default(),
        });
        RedisLimiter {
            coalescer: Coalescer::new(runner.clone()),
            runner,
        }
    }

    /// Decides one request on its own script call, at an explicit instant (µs) or on the Redis
    /// clock when `now` is None.
    pub async fn check_at(
        &self,
        checks: &[LimitCheck],
        now: Option<u64>,
    ) -> Result<Decision, LimiterUnavailable> {
        if checks.is_empty() {
            return Ok(Decision::unlimited());
        }
        let mut d = self.runner.call(&[checks], now).await?;
        Ok(d.pop().expect("decode checked the length"))
    }

    /// Decides several requests in one script call, in order, at one instant.
    pub async fn check_batch_at(
        &self,
        batch: &[&[LimitCheck]],
        now: Option<u64>,
    ) -> Result<Vec<Decision>, LimiterUnavailable> {
        self.runner.call(batch, now).await
    }

    /// Forgets refusals that are over (a refused caller that never came back); returns how
    /// many.
    pub fn purge_refusals(&self, now: std::time::Instant) -> usize {
        self.runner.refusals.purge(now)
    }
}

#[async_trait]
impl Limiter for RedisLimiter {
    async fn check(&self, checks: Vec<LimitCheck>) -> Result<Decision, LimiterUnavailable> {
        if checks.is_empty() {
            return Ok(Decision::unlimited());
        }
        self.coalescer.submit(checks).await
    }

    /// A caller whose limit Redis refused is refused here, without a round trip, until its
    /// wait is over (Redis is asked again every `refusals::MAX_TRUSTED` meanwhile). `at` is
    /// not used: the token lookup before may have waited for Redis, and a refusal that ended
    /// meanwhile must not refuse this request.
    fn check_now(&self, checks: &[LimitCheck], _at: std::time::Instant) -> Option<Decision> {
        let refusals = &self.runner.refusals;
        if refusals.is_empty() {
            return None;
        }
        refusals.check(checks, std::time::Instant::now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_names_each_key_once() {
        let a = [
            LimitCheck::new("rl:{s}:p:0:u1", 5, 1),
            LimitCheck::new("rl:{s}:p:1:-", 20, 60),
        ];
        let b = [
            LimitCheck::new("rl:{s}:p:0:u2", 5, 1),
            LimitCheck::new("rl:{s}:p:1:-", 20, 60),
        ];
        let call = encode("g:", &[&a, &b, &a]);
        assert_eq!(
            call.keys,
            ["g:rl:{s}:p:0:u1", "g:rl:{s}:p:1:-", "g:rl:{s}:p:0:u2"]
        );
        assert_eq!(
            call.args,
            [
                2, 1, 200_000, 5, 2, 3_000_000, 20, // a
                2, 3, 200_000, 5, 2, 3_000_000, 20, // b
                2, 1, 200_000, 5, 2, 3_000_000, 20, // a again
            ]
        );
        // The same key under another rate (a plan changed mid-batch): one key, two rates.
        let c = [LimitCheck::new("rl:{s}:p:0:u1", 6, 1)];
        let call = encode("", &[&a, &c]);
        assert_eq!(call.keys.len(), 2);
        assert_eq!(&call.args[7..], [1, 1, 166_666, 6]);
    }

    #[test]
    fn replies_split_per_request_and_bad_lengths_are_errors() {
        let reply: Vec<u8> = [
            1.0, 5.0, 4.0, 200_000.9, 0.0, 0.0, // allowed
            0.0, 5.0, 0.0, 900_000.0, 1e5, 2.0, // refused by the second limit
        ]
        .iter()
        .flat_map(|f: &f64| f.to_le_bytes())
        .collect();
        let a = decode(&reply, 2).unwrap();
        let d: Vec<Decision> = a.iter().map(|a| a.decision).collect();
        assert!(d[0].allowed && d[0].remaining == 4 && d[0].reset_us == 200_000);
        assert_eq!(a[0].refused_by, None);
        assert!(!d[1].allowed && d[1].retry_after_us == 100_000 && d[1].limit == 5);
        assert_eq!(a[1].refused_by, Some(1));
        assert!(decode(&reply[..48], 2).is_err());
        assert!(decode(&reply[..47], 1).is_err());
        assert!(decode(&[], 1).is_err());
        assert!(decode(&[], 0).unwrap().is_empty());
    }

    #[test]
    fn numbers_pack_as_little_endian_doubles() {
        let p = pack(&[1, 200_000, 1_000_000_000_000]);
        assert_eq!(p.len(), 24);
        assert_eq!(p[..8], 1.0f64.to_le_bytes());
        assert_eq!(f64::from_le_bytes(p[16..].try_into().unwrap()), 1e12);
    }
}
