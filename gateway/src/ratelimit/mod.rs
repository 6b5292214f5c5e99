//! Rate limiting: which limits apply to a request (pure) and who keeps the counters (a trait,
//! implemented in-process here and in Redis for several replicas).

pub mod coalesce;
pub mod gcra;
pub mod local;
pub mod redis;
pub mod refusals;

use async_trait::async_trait;
use gatehouse_crds::{LimitKey, PlanConfig};

pub use gcra::{Decision, Rate};

/// One limit to check for a request: a key and its rate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LimitCheck {
    pub key: String,
    pub rate: Rate,
}

impl LimitCheck {
    /// `requests` per `per_seconds` under `key`.
    pub fn new(key: impl Into<String>, requests: u64, per_seconds: u64) -> LimitCheck {
        LimitCheck {
            key: key.into(),
            rate: Rate::new(requests, per_seconds),
        }
    }
}

#[derive(Clone, Debug, thiserror::Error)]
#[error("rate-limit store unavailable: {0}")]
pub struct LimiterUnavailable(pub String);

#[async_trait]
pub trait Limiter: Send + Sync {
    /// Checks every limit of one request together; consumes all of them or none.
    async fn check(&self, checks: Vec<LimitCheck>) -> Result<Decision, LimiterUnavailable>;
    /// `check`'s answer when it needs no I/O (`None`: call `check`). The proxy asks this first
    /// and skips a boxed future per request. `at`: when the request arrived (a clock read the
    /// caller made anyway).
    fn check_now(&self, _checks: &[LimitCheck], _at: std::time::Instant) -> Option<Decision> {
        None
    }
}

/// The keys of a plan's limits for one caller. The subscription sits in a hash tag so a Redis
/// Cluster keeps all of one subscription's keys in one slot (one script touches them together).
/// Tokens without a user (client_credentials) count per application for `key: user` limits.
/// A key names its limit's rate: a TAT means nothing under another rate (500 of 1000/day leave
/// it 12 h ahead, which 1000/hour would read as a 12 h lockout), so an edited limit starts
/// afresh.
pub fn limit_checks(plan: &PlanConfig, subscription: &str, user: Option<&str>) -> Vec<LimitCheck> {
    plan.rate_limits
        .iter()
        .enumerate()
        .map(|(i, l)| {
            let who = match (l.key, user) {
                (LimitKey::User, Some(u)) => u,
                _ => "-",
            };
            // Per request: plain pushes instead of the formatting machinery.
            let mut digits = itoa::Buffer::new();
            let mut key =
                String::with_capacity(subscription.len() + plan.id.len() + who.len() + 40);
            key.push_str("rl:{");
            key.push_str(subscription);
            key.push_str("}:");
            key.push_str(&plan.id);
            key.push(':');
            push_index(&mut key, i);
            key.push(':');
            key.push_str(digits.format(l.requests));
            key.push('/');
            key.push_str(digits.format(l.per_seconds));
            key.push(':');
            key.push_str(who);
            LimitCheck::new(key, l.requests, l.per_seconds)
        })
        .collect()
}

fn push_index(key: &mut String, i: usize) {
    match u8::try_from(i) {
        Ok(d @ 0..=9) => key.push(char::from(b'0' + d)),
        _ => key.push_str(&i.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gatehouse_crds::RateLimitConfig;

    #[test]
    fn keys_per_user_and_per_application() {
        let plan = PlanConfig {
            id: "demo/basic".into(),
            name: "basic".into(),
            display_name: "Basic".into(),
            fail_open: false,
            rate_limits: vec![
                RateLimitConfig {
                    requests: 10,
                    per_seconds: 1,
                    key: LimitKey::User,
                },
                RateLimitConfig {
                    requests: 1000,
                    per_seconds: 86_400,
                    key: LimitKey::Application,
                },
            ],
        };
        let checks = limit_checks(&plan, "demo/app-sub", Some("u-1"));
        assert_eq!(checks[0].key, "rl:{demo/app-sub}:demo/basic:0:10/1:u-1");
        assert_eq!(checks[1].key, "rl:{demo/app-sub}:demo/basic:1:1000/86400:-");
        assert_eq!(checks[0].rate, Rate::new(10, 1));
        let many = PlanConfig {
            rate_limits: vec![plan.rate_limits[0].clone(); 12],
            ..plan.clone()
        };
        let keys = limit_checks(&many, "s", Some("u"));
        assert_eq!(keys[9].key, "rl:{s}:demo/basic:9:10/1:u");
        assert_eq!(keys[11].key, "rl:{s}:demo/basic:11:10/1:u");
        let anon = limit_checks(&plan, "demo/app-sub", None);
        assert_eq!(anon[0].key, "rl:{demo/app-sub}:demo/basic:0:10/1:-");
    }

    /// A user who spent half of 1000/day is not locked out for 12 h when the limit becomes
    /// 1000/hour: the edited limit has its own key.
    #[test]
    fn an_edited_limit_starts_afresh() {
        let plan = |requests, per_seconds| PlanConfig {
            id: "demo/basic".into(),
            name: "basic".into(),
            display_name: "Basic".into(),
            fail_open: false,
            rate_limits: vec![RateLimitConfig {
                requests,
                per_seconds,
                key: LimitKey::User,
            }],
        };
        let limiter = local::LocalLimiter::default();
        let t0 = 1_000_000_000_000;
        let daily = limit_checks(&plan(1000, 86_400), "demo/s", Some("u"));
        for i in 0..500 {
            assert!(limiter.check_at(&daily, t0 + i).allowed);
        }
        let hourly = limit_checks(&plan(1000, 3_600), "demo/s", Some("u"));
        let d = limiter.check_at(&hourly, t0 + 1_000_000);
        assert!(d.allowed, "{d:?}");
        assert_eq!(d.remaining, 999);
    }
}
