//! GCRA (generic cell rate algorithm), the arithmetic governor uses and the Redis script mirrors.
//!
//! A limit of `n` per `period` allows a burst of `n`, then one request every `period / n`.
//! State per key is one number, the theoretical arrival time (TAT), in microseconds.
//! Several limits on one request are decided together: if any refuses, none is consumed.

/// One limit as the arithmetic sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rate {
    /// Burst size and requests per period.
    pub limit: u64,
    /// Emission interval T = period / limit, in microseconds (at least 1).
    pub interval_us: u64,
}

impl Rate {
    pub fn new(limit: u64, period_seconds: u64) -> Rate {
        let limit = limit.max(1);
        Rate {
            limit,
            interval_us: (period_seconds * 1_000_000 / limit).max(1),
        }
    }

    /// Delay variation tolerance: how far the TAT may run ahead of now.
    fn tolerance_us(self) -> u64 {
        self.interval_us * (self.limit - 1)
    }
}

/// What one limit says about a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LimitState {
    pub limit: u64,
    /// Requests still allowed right now after this one (0 when refused).
    pub remaining: u64,
    /// Microseconds until the budget is whole again.
    pub reset_us: u64,
    /// Refused: microseconds until a request would pass.
    pub retry_after_us: Option<u64>,
    /// The TAT to store when the request is allowed.
    pub new_tat: u64,
}

/// Decides one limit for a request at `now` given the stored TAT (0 when absent). Pure.
pub fn check(rate: Rate, stored_tat: u64, now: u64) -> LimitState {
    let tat = stored_tat.max(now);
    let tolerance = rate.tolerance_us();
    if tat - now > tolerance {
        return LimitState {
            limit: rate.limit,
            remaining: 0,
            reset_us: tat - now,
            retry_after_us: Some(tat - tolerance - now),
            new_tat: stored_tat,
        };
    }
    let new_tat = tat + rate.interval_us;
    let ahead = new_tat - now;
    let window = rate.interval_us * rate.limit;
    LimitState {
        limit: rate.limit,
        remaining: window.saturating_sub(ahead) / rate.interval_us,
        reset_us: ahead,
        retry_after_us: None,
        new_tat,
    }
}

/// The verdict on a request under all of its limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// The limit to report in RateLimit-* headers: the refusing one, else the tightest.
    pub limit: u64,
    pub remaining: u64,
    pub reset_us: u64,
    pub retry_after_us: u64,
}

impl Decision {
    /// No limits at all.
    pub fn unlimited() -> Decision {
        Decision {
            allowed: true,
            limit: 0,
            remaining: 0,
            reset_us: 0,
            retry_after_us: 0,
        }
    }

    pub fn reset_seconds(&self) -> u64 {
        self.reset_us.div_ceil(1_000_000)
    }

    /// Retry-After in whole seconds, never 0 for a refusal.
    pub fn retry_after_seconds(&self) -> u64 {
        self.retry_after_us.div_ceil(1_000_000).max(1)
    }
}

/// Combines per-limit states: refused if any refuses (the longest wait is reported), otherwise
/// the limit with the fewest remaining requests.
pub fn combine(states: &[LimitState]) -> Decision {
    if states.is_empty() {
        return Decision::unlimited();
    }
    if let Some(worst) = states
        .iter()
        .filter(|s| s.retry_after_us.is_some())
        .max_by_key(|s| s.retry_after_us)
    {
        return Decision {
            allowed: false,
            limit: worst.limit,
            remaining: 0,
            reset_us: worst.reset_us,
            retry_after_us: worst.retry_after_us.unwrap_or(0),
        };
    }
    let tightest = states
        .iter()
        .min_by_key(|s| (s.remaining, s.limit))
        .expect("non-empty");
    Decision {
        allowed: true,
        limit: tightest.limit,
        remaining: tightest.remaining,
        reset_us: tightest.reset_us,
        retry_after_us: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000;

    /// Runs requests at the given instants against one limit, returns which passed.
    fn run(rate: Rate, times: &[u64]) -> Vec<bool> {
        let mut tat = 0;
        times
            .iter()
            .map(|&now| {
                let st = check(rate, tat, now);
                if st.retry_after_us.is_none() {
                    tat = st.new_tat;
                }
                st.retry_after_us.is_none()
            })
            .collect()
    }

    #[test]
    fn burst_of_n_then_one_per_interval() {
        let rate = Rate::new(5, 1);
        let t0 = 1_000 * S;
        let got = run(rate, &[t0; 7]);
        assert_eq!(got, [true, true, true, true, true, false, false]);
        // one new request every 200 ms
        let mut tat = 0;
        for _ in 0..5 {
            tat = check(rate, tat, t0).new_tat;
        }
        assert!(check(rate, tat, t0 + 199_999).retry_after_us.is_some());
        assert!(check(rate, tat, t0 + 200_000).retry_after_us.is_none());
    }

    #[test]
    fn remaining_counts_down_and_reset_reports_refill() {
        let rate = Rate::new(3, 60);
        let now = 10 * S;
        let a = check(rate, 0, now);
        assert_eq!((a.remaining, a.reset_us), (2, 20 * S));
        let b = check(rate, a.new_tat, now);
        assert_eq!((b.remaining, b.reset_us), (1, 40 * S));
        let c = check(rate, b.new_tat, now);
        assert_eq!((c.remaining, c.reset_us), (0, 60 * S));
        let d = check(rate, c.new_tat, now);
        assert_eq!(d.retry_after_us, Some(20 * S));
        assert_eq!(d.new_tat, c.new_tat, "a refusal consumes nothing");
    }

    #[test]
    fn idle_key_is_full_again() {
        let rate = Rate::new(2, 1);
        let st = check(rate, 5 * S, 100 * S);
        assert_eq!(st.remaining, 1);
    }

    #[test]
    fn combine_reports_refusal_with_longest_wait() {
        let ok = check(Rate::new(10, 1), 0, S);
        let refused = LimitState {
            limit: 100,
            remaining: 0,
            reset_us: 5 * S,
            retry_after_us: Some(3 * S),
            new_tat: 0,
        };
        let d = combine(&[ok, refused]);
        assert!(!d.allowed);
        assert_eq!((d.limit, d.retry_after_seconds()), (100, 3));
    }

    #[test]
    fn combine_reports_tightest_when_allowed() {
        let a = check(Rate::new(10, 1), 0, S); // 9 left
        let b = check(Rate::new(3, 60), 0, S); // 2 left
        let d = combine(&[a, b]);
        assert!(d.allowed);
        assert_eq!((d.limit, d.remaining), (3, 2));
        assert_eq!(combine(&[]), Decision::unlimited());
    }

    #[test]
    fn retry_after_is_at_least_one_second() {
        let d = Decision {
            allowed: false,
            limit: 1,
            remaining: 0,
            reset_us: 10,
            retry_after_us: 10,
        };
        assert_eq!(d.retry_after_seconds(), 1);
    }

    /// The same request sequence through governor (the reference GCRA) and through `check`
    /// must pass and fail at the same instants.
    #[test]
    fn agrees_with_governor() {
        use governor::clock::FakeRelativeClock;
        use governor::{Quota, RateLimiter};
        use std::num::NonZeroU32;
        use std::time::Duration;

        for (limit, period) in [(1u32, 1u64), (5, 1), (10, 60), (7, 3)] {
            let clock = FakeRelativeClock::default();
            let quota = Quota::with_period(Duration::from_micros(period * S / limit as u64))
                .unwrap()
                .allow_burst(NonZeroU32::new(limit).unwrap());
            let reference = RateLimiter::direct_with_clock(quota, clock.clone());
            let rate = Rate::new(limit as u64, period);
            // deterministic pseudo-random gaps between 0 and ~period/limit*2
            let mut seed = 0x9e37_79b9_7f4a_7c15u64;
            let mut now = 0u64;
            let mut tat = 0u64;
            for i in 0..2_000 {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                let gap = seed % (2 * rate.interval_us + 1) / 3;
                now += gap;
                clock.advance(Duration::from_micros(gap));
                let ours = check(rate, tat, now + S);
                if ours.retry_after_us.is_none() {
                    tat = ours.new_tat;
                }
                let theirs = reference.check().is_ok();
                assert_eq!(
                    ours.retry_after_us.is_none(),
                    theirs,
                    "limit {limit}/{period}s diverged at request {i} (t={now}us)"
                );
            }
        }
    }
}
