//! In-process limiter for a single gateway: GCRA state in sharded maps.

use std::hash::BuildHasher;
use std::sync::LazyLock;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use foldhash::fast::RandomState;
use hashbrown::HashTable;
use parking_lot::Mutex;

use super::gcra::{self, Decision, LimitState, Rate};
use super::{LimitCheck, Limiter, LimiterUnavailable};

const SHARDS: usize = 64;

/// Per-request lists sized for the usual plan (up to four limits) without a heap allocation.
type Small<T> = smallvec::SmallVec<[T; 4]>;

pub struct LocalLimiter {
    // foldhash, not SipHash: it is hashed on every proxied request. The proxy's keys come from the gateway's own records (subscription, user id); the address
    // throttle's from client addresses, which a client varies only within its own prefixes,
    // and foldhash is seeded at random per process, so colliding keys cannot be chosen.
    // Each key is hashed once per check: the hash picks the shard and finds the entry, for the
    // read and for the update (a HashTable takes the hash from its caller).
    shards: Vec<Mutex<HashTable<(String, u64)>>>,
    hasher: RandomState,
}

impl Default for LocalLimiter {
    fn default() -> Self {
        LocalLimiter {
            shards: (0..SHARDS)
                .map(|_| Mutex::new(Default::default()))
                .collect(),
            hasher: RandomState::default(),
        }
    }
}

/// The in-process limiters' clock, in microseconds since the Unix epoch.
pub fn now_us() -> u64 {
    micros_at(Instant::now())
}

/// `at` on the limiters' clock: the monotonic clock, anchored to the wall clock once per
/// process. A wall-clock step cannot hand out or take back allowance, and the proxy converts
/// the instant it read when the request arrived instead of reading the clock again (22 ns
/// each here).
pub fn micros_at(at: Instant) -> u64 {
    static ANCHOR: LazyLock<(Instant, u64)> = LazyLock::new(|| {
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64);
        (Instant::now(), wall)
    });
    let (base, base_us) = *ANCHOR;
    // `at` may precede the anchor (read before the first call set it).
    match at.checked_duration_since(base) {
        Some(after) => base_us + after.as_micros() as u64,
        None => base_us.saturating_sub(base.duration_since(at).as_micros() as u64),
    }
}

impl LocalLimiter {
    fn hash(&self, key: &str) -> u64 {
        self.hasher.hash_one(key)
    }

    /// The shard from bits the table does not use for its buckets (low bits) or its control
    /// bytes (top seven), so the keys of one shard still spread over its table.
    fn shard_of(hash: u64) -> usize {
        ((hash >> 32) as usize) % SHARDS
    }

    /// Decides at an explicit instant (tests replay sequences with it).
    pub fn check_at(&self, checks: &[LimitCheck], now: u64) -> Decision {
        if checks.is_empty() {
            return Decision::unlimited();
        }
        // Lock every shard involved, in index order (no deadlock between requests), so the
        // check-then-consume of all limits is atomic with respect to other requests. Plans have
        // a few limits: the lists stay on the stack.
        let hashes: Small<u64> = checks.iter().map(|c| self.hash(&c.key)).collect();
        let mut idx: Small<usize> = hashes.iter().map(|&h| Self::shard_of(h)).collect();
        idx.sort_unstable();
        idx.dedup();
        let mut guards: Small<_> = idx.iter().map(|&i| self.shards[i].lock()).collect();
        // Each check's guard, found once for the read and the update.
        let at: Small<usize> = hashes
            .iter()
            .map(|&h| idx.binary_search(&Self::shard_of(h)).expect("locked"))
            .collect();
        let states: Small<LimitState> = checks
            .iter()
            .zip(hashes.iter().zip(&at))
            .map(|(c, (&h, &g))| {
                let tat = guards[g]
                    .find(h, |(k, _)| *k == c.key)
                    .map_or(0, |(_, tat)| *tat);
                gcra::check(c.rate, tat, now)
            })
            .collect();
        let decision = gcra::combine(&states);
        if decision.allowed {
            for ((c, st), (&h, &g)) in checks.iter().zip(&states).zip(hashes.iter().zip(&at)) {
                let table = &mut guards[g];
                // An existing key is updated in place: no new String per request.
                match table.find_mut(h, |(k, _)| *k == c.key) {
                    Some((_, tat)) => *tat = st.new_tat,
                    None => {
                        table.insert_unique(h, (c.key.clone(), st.new_tat), |(k, _)| self.hash(k));
                    }
                }
            }
        }
        decision
    }

    /// Drops keys whose budget is whole again (a TAT in the past is the same as no entry).
    pub fn purge_idle(&self, now: u64) -> usize {
        let mut removed = 0;
        for shard in &self.shards {
            let mut map = shard.lock();
            let before = map.len();
            map.retain(|(_, tat)| *tat > now);
            removed += before - map.len();
        }
        removed
    }

    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A per-client limit (a client address, or a signed-in user) on one of the gateway's own
/// endpoints, kept in process (per replica): it guards the store against writes, so it must
/// not cost a store write itself.
pub struct AddressThrottle {
    limiter: LocalLimiter,
    rate: Rate,
}

impl AddressThrottle {
    /// `per_minute` requests per client per minute, as a burst, then evenly spaced.
    pub fn per_minute(per_minute: u64) -> AddressThrottle {
        AddressThrottle {
            limiter: LocalLimiter::default(),
            rate: Rate::new(per_minute, 60),
        }
    }

    /// Counts a request from `client`; false when it is over the limit (nothing counted).
    pub fn allow(&self, client: &str) -> bool {
        self.allow_at(client, now_us())
    }

    pub fn allow_at(&self, client: &str, now: u64) -> bool {
        self.admit_at(client, now).is_ok()
    }

    /// Counts a request from `client`, or says in how many seconds one would be allowed.
    pub fn admit(&self, client: &str) -> Result<(), u64> {
        self.admit_at(client, now_us())
    }

    pub fn admit_at(&self, client: &str, now: u64) -> Result<(), u64> {
        let check = LimitCheck {
            key: client.to_string(),
            rate: self.rate,
        };
        let d = self.limiter.check_at(std::slice::from_ref(&check), now);
        if d.allowed {
            Ok(())
        } else {
            Err(d.retry_after_seconds())
        }
    }

    pub fn purge_idle(&self, now: u64) -> usize {
        self.limiter.purge_idle(now)
    }
}

#[async_trait]
impl Limiter for LocalLimiter {
    async fn check(&self, checks: Vec<LimitCheck>) -> Result<Decision, LimiterUnavailable> {
        Ok(self.check_at(&checks, now_us()))
    }

    fn check_now(&self, checks: &[LimitCheck], at: Instant) -> Option<Decision> {
        Some(self.check_at(checks, micros_at(at)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_throttle_says_when_to_come_back() {
        let t = AddressThrottle::per_minute(3);
        let now = 1_000_000_000;
        for _ in 0..3 {
            assert_eq!(t.admit_at("client", now), Ok(()));
        }
        // One request every 20 s after the burst.
        assert_eq!(t.admit_at("client", now), Err(20));
        assert_eq!(t.admit_at("client", now + 15_000_000), Err(5));
        assert_eq!(t.admit_at("other", now), Ok(()));
        assert_eq!(t.admit_at("client", now + 20_000_000), Ok(()));
    }

    #[test]
    fn the_clock_is_monotonic_time_on_the_wall_clock_scale() {
        let at = Instant::now();
        let later = at + std::time::Duration::from_millis(1_500);
        // Whole microseconds on each side: at most one apart from the exact difference.
        assert!((micros_at(later) - micros_at(at)).abs_diff(1_500_000) <= 1);
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_micros() as u64;
        assert!(
            now_us().abs_diff(wall) < 1_000_000,
            "{} vs {wall}",
            now_us()
        );
        assert!(now_us() >= micros_at(at));
    }

    #[test]
    fn refusal_by_one_limit_consumes_none_of_the_others() {
        let l = LocalLimiter::default();
        let now = 1_000_000_000;
        let wide = LimitCheck::new("wide", 100, 1);
        let narrow = LimitCheck::new("narrow", 2, 1);
        assert!(l.check_at(&[wide.clone(), narrow.clone()], now).allowed);
        assert!(l.check_at(&[wide.clone(), narrow.clone()], now).allowed);
        for _ in 0..10 {
            assert!(!l.check_at(&[wide.clone(), narrow.clone()], now).allowed);
        }
        // Only the two allowed requests were counted against `wide`.
        let d = l.check_at(&[wide], now);
        assert_eq!(d.remaining, 97);
    }

    #[test]
    fn an_address_gets_its_burst_then_one_request_per_interval() {
        let t = AddressThrottle::per_minute(3);
        let now = 1_000_000_000;
        for _ in 0..3 {
            assert!(t.allow_at("203.0.113.7", now));
        }
        assert!(!t.allow_at("203.0.113.7", now));
        assert!(!t.allow_at("203.0.113.7", now + 19_000_000));
        // Another address has its own budget.
        assert!(t.allow_at("2001:db8::/64", now));
        // 60 s / 3 later one more request is allowed, and only one.
        assert!(t.allow_at("203.0.113.7", now + 20_000_000));
        assert!(!t.allow_at("203.0.113.7", now + 20_000_001));
        assert_eq!(
            t.purge_idle(now + 61_000_000),
            1,
            "the other address is idle"
        );
        assert_eq!(t.purge_idle(now + 80_000_000), 1);
    }

    #[test]
    fn keys_are_independent_and_idle_keys_purged() {
        let l = LocalLimiter::default();
        let now = 5_000_000;
        assert!(l.check_at(&[LimitCheck::new("a", 1, 1)], now).allowed);
        assert!(!l.check_at(&[LimitCheck::new("a", 1, 1)], now).allowed);
        assert!(l.check_at(&[LimitCheck::new("b", 1, 1)], now).allowed);
        assert_eq!(l.len(), 2);
        assert_eq!(l.purge_idle(now + 2_000_000), 2);
        assert!(l.is_empty());
    }

    #[test]
    fn many_keys_survive_their_tables_growing_and_each_keeps_its_own_count() {
        // 20,000 keys over 64 shards: every table grows (rehashing its entries) many times.
        let l = LocalLimiter::default();
        let now = 7_000_000;
        let key = |i: u32| LimitCheck::new(format!("rl:{{sub}}:plan:0:user-{i}"), 2, 3600);
        for i in 0..20_000 {
            assert!(l.check_at(&[key(i)], now).allowed);
        }
        assert_eq!(l.len(), 20_000);
        for i in 0..20_000 {
            let d = l.check_at(&[key(i)], now);
            assert!(
                d.allowed && d.remaining == 0,
                "key {i} lost its first request"
            );
        }
        for i in (0..20_000).step_by(97) {
            assert!(!l.check_at(&[key(i)], now).allowed, "key {i}");
        }
        assert_eq!(l.len(), 20_000);
    }
}
