//! Refusals the shared store decided, remembered until their wait is over, so a caller over its
//! limit is answered 429 by the replica itself instead of costing a Redis round trip per
//! request (a client hammering past its limit is exactly the traffic a limiter exists for).
//!
//! The answers are Redis's: while one limit's key refuses, every request that names the key is
//! refused, on every replica, and a refused request changes nothing. So the key's TAT stands
//! still until the wait reported with the refusal is over (nobody can move it), and its Redis
//! key cannot expire before (it lives until past its TAT). The wait is counted from when the
//! batch was sent, which is no later than the script's instant: the remembered refusal ends no
//! later than Redis's own. Keys name their rate, so an edited limit is a new key and is asked
//! afresh. What this cannot see is Redis losing or changing the key behind the gateways' backs
//! (a restart without persistence, a failover that lost writes, eviction, a quota reset by
//! hand, a clock step on the Redis host): so Redis is asked again at least every
//! `MAX_TRUSTED`, and such a caller is refused at most that much longer than Redis would.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use dashmap::DashMap;

use super::{Decision, LimitCheck};

/// At most this many keys are remembered; beyond it refusals go to Redis each time, as before.
pub const MAX_REMEMBERED: usize = 100_000;
/// How long a refusal is answered from memory before Redis is asked again (a caller refused
/// for an hour costs one round trip per this much per replica, not one per request).
pub const MAX_TRUSTED: Duration = Duration::from_secs(5);

#[derive(Clone, Copy, Debug)]
struct Refusal {
    limit: u64,
    /// Until then requests under this key are refused here; then Redis is asked again.
    until: Instant,
    /// The first instant a request under this key may pass (for Retry-After).
    retry_at: Instant,
    /// When the key's budget is whole again.
    reset_at: Instant,
}

#[derive(Default)]
pub struct Refusals {
    // Keys come from the gateway's own records (subscription, user id); foldhash is seeded per
    // process.
    entries: DashMap<String, Refusal, foldhash::fast::RandomState>,
    /// Entries held (never fewer: raised before an insert, lowered after a removal): when 0
    /// (a gateway whose callers stay within their limits) a check is one atomic load, no
    /// hashing.
    len: AtomicUsize,
}

impl Refusals {
    /// Remembers that the limit under `key` refused a request decided no earlier than `sent`,
    /// with the wait and reset `decision` reports.
    pub fn remember(&self, key: &str, sent: Instant, decision: &Decision) {
        if decision.allowed || decision.retry_after_us == 0 {
            return;
        }
        let wait = Duration::from_micros(decision.retry_after_us);
        // Numbers from Redis that no clock can reach are not remembered (no overflow panic).
        let (Some(retry_at), Some(reset_at)) = (
            sent.checked_add(wait),
            sent.checked_add(Duration::from_micros(decision.reset_us)),
        ) else {
            return;
        };
        let refusal = Refusal {
            limit: decision.limit,
            until: sent + wait.min(MAX_TRUSTED),
            retry_at,
            reset_at,
        };
        if let Some(mut held) = self.entries.get_mut(key) {
            if refusal.until > held.until {
                *held = refusal;
            }
            return;
        }
        if self.len.load(Ordering::Relaxed) >= MAX_REMEMBERED {
            return;
        }
        self.len.fetch_add(1, Ordering::Relaxed);
        if self.entries.insert(key.to_string(), refusal).is_some() {
            // Another thread inserted it meanwhile: counted once.
            self.len.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// The refusal of a request with these limits at `now`, when one of its keys is still
    /// refusing (the longest wait is reported, as the script does); `None`: ask the store.
    pub fn check(&self, checks: &[LimitCheck], now: Instant) -> Option<Decision> {
        if self.is_empty() {
            return None;
        }
        let mut worst: Option<Refusal> = None;
        for c in checks {
            let Some(r) = self.entries.get(c.key.as_str()).map(|r| *r) else {
                continue;
            };
            if r.until <= now {
                // Over, or time to ask Redis again: forget it, unless a newer refusal replaced
                // it meanwhile.
                if self
                    .entries
                    .remove_if(c.key.as_str(), |_, r| r.until <= now)
                    .is_some()
                {
                    self.len.fetch_sub(1, Ordering::Relaxed);
                }
                continue;
            }
            if worst.is_none_or(|w| r.retry_at >= w.retry_at) {
                worst = Some(r);
            }
        }
        worst.map(|r| Decision {
            allowed: false,
            limit: r.limit,
            remaining: 0,
            reset_us: r.reset_at.saturating_duration_since(now).as_micros() as u64,
            retry_after_us: (r.retry_at - now).as_micros() as u64,
        })
    }

    /// Drops refusals that are over; returns how many.
    pub fn purge(&self, now: Instant) -> usize {
        let mut removed = 0;
        self.entries.retain(|_, r| {
            let keep = r.until > now;
            removed += usize::from(!keep);
            keep
        });
        self.len.fetch_sub(removed, Ordering::Relaxed);
        removed
    }

    pub fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(limit: u64, retry_ms: u64, reset_ms: u64) -> Decision {
        Decision {
            allowed: false,
            limit,
            remaining: 0,
            reset_us: reset_ms * 1000,
            retry_after_us: retry_ms * 1000,
        }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_refusal_holds_until_its_wait_is_over_and_not_a_moment_longer() {
        let r = Refusals::default();
        let t0 = Instant::now();
        let checks = [LimitCheck::new("rl:{s}:p:0:u", 2, 1)];
        assert_eq!(r.check(&checks, t0), None);
        r.remember("rl:{s}:p:0:u", t0, &refused(2, 400, 900));
        let d = r.check(&checks, t0 + ms(100)).expect("still refused");
        assert_eq!(d, refused(2, 300, 800));
        let d = r.check(&checks, t0 + ms(399)).expect("still refused");
        assert_eq!(d.retry_after_us, 1000);
        // At the instant the wait ends the store decides again, and the entry is gone.
        assert_eq!(r.check(&checks, t0 + ms(400)), None);
        assert!(r.is_empty());
    }

    #[test]
    fn a_long_wait_is_reported_whole_but_redis_is_asked_again_after_max_trusted() {
        let r = Refusals::default();
        let t0 = Instant::now();
        let checks = [LimitCheck::new("k", 10, 86_400)];
        r.remember("k", t0, &refused(10, 3_600_000, 7_200_000));
        let just_before = MAX_TRUSTED - ms(1);
        let d = r
            .check(&checks, t0 + just_before)
            .expect("refused from memory");
        assert_eq!(
            Duration::from_micros(d.retry_after_us),
            Duration::from_secs(3600) - just_before
        );
        assert_eq!(
            r.check(&checks, t0 + MAX_TRUSTED),
            None,
            "Redis decides again"
        );
        assert!(r.is_empty());
        // The largest wait Redis could send does not panic (overflow is checked).
        let huge = Decision {
            retry_after_us: u64::MAX,
            reset_us: u64::MAX,
            ..refused(10, 0, 0)
        };
        r.remember("k", t0, &huge);
        let d = r.check(&checks, t0).expect("remembered");
        assert_eq!(d.retry_after_us, u64::MAX);
    }

    #[test]
    fn a_request_is_refused_when_any_of_its_keys_refuses_with_the_longest_wait() {
        let r = Refusals::default();
        let t0 = Instant::now();
        let user = LimitCheck::new("rl:{s}:p:0:u1", 5, 1);
        let app = LimitCheck::new("rl:{s}:p:1:-", 1000, 86_400);
        let other_user = LimitCheck::new("rl:{s}:p:0:u2", 5, 1);
        r.remember(&user.key, t0, &refused(5, 200, 1000));
        // Another caller of the same subscription is not affected by u1's refusal.
        assert_eq!(r.check(&[other_user.clone(), app.clone()], t0), None);
        assert_eq!(
            r.check(&[user.clone(), app.clone()], t0).map(|d| d.limit),
            Some(5)
        );
        // The application's daily budget runs out: everyone of the subscription waits for it.
        r.remember(&app.key, t0, &refused(1000, 3_600_000, 86_400_000));
        let d = r.check(&[user.clone(), app.clone()], t0).unwrap();
        assert_eq!((d.limit, d.retry_after_us), (1000, 3_600_000_000));
        assert!(r.check(&[other_user, app], t0 + ms(1000)).is_some());
    }

    #[test]
    fn a_later_refusal_of_a_key_extends_it_an_earlier_one_does_not() {
        let r = Refusals::default();
        let t0 = Instant::now();
        let checks = [LimitCheck::new("k", 1, 1)];
        r.remember("k", t0, &refused(1, 500, 500));
        r.remember("k", t0 + ms(100), &refused(1, 100, 100)); // ends at 200 ms: earlier
        assert_eq!(
            r.check(&checks, t0 + ms(300)).unwrap().retry_after_us,
            200_000
        );
        r.remember("k", t0 + ms(300), &refused(1, 700, 700)); // ends at 1000 ms: later
        assert_eq!(
            r.check(&checks, t0 + ms(600)).unwrap().retry_after_us,
            400_000
        );
        assert_eq!(r.len(), 1);
    }

    #[test]
    fn allowed_answers_are_not_remembered_and_purge_drops_what_is_over() {
        let r = Refusals::default();
        let t0 = Instant::now();
        r.remember("a", t0, &Decision::unlimited());
        assert!(r.is_empty());
        r.remember("a", t0, &refused(1, 100, 100));
        r.remember("b", t0, &refused(1, 300, 300));
        assert_eq!(r.purge(t0 + ms(200)), 1);
        assert_eq!(r.len(), 1);
        assert_eq!(r.purge(t0 + ms(300)), 1);
        assert!(r.is_empty());
        r.remember("b", t0, &refused(1, 300, 300));
        assert!(
            r.check(&[LimitCheck::new("b", 1, 1)], t0 + ms(200))
                .is_some()
        );
    }

    #[test]
    fn memory_is_bounded() {
        let r = Refusals::default();
        let t0 = Instant::now();
        for i in 0..MAX_REMEMBERED + 10 {
            r.remember(&format!("k{i}"), t0, &refused(1, 1000, 1000));
        }
        assert_eq!(r.len(), MAX_REMEMBERED);
        // Past the bound a refusal is not remembered: the store is asked, as without this.
        let late = [LimitCheck::new(format!("k{}", MAX_REMEMBERED + 5), 1, 1)];
        assert_eq!(r.check(&late, t0), None);
    }
}
