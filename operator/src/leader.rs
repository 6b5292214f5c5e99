//! One active operator: a coordination.k8s.io Lease, renewed by the leader; a standby takes it
//! over once it has not been renewed for its duration. Writes use the Lease's resourceVersion,
//! so two candidates can never both win a round.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube_client::api::{Api, PostParams};

pub const LEASE_DURATION: Duration = Duration::from_secs(15);
pub const RENEW_EVERY: Duration = Duration::from_secs(5);
pub const RETRY_EVERY: Duration = Duration::from_secs(2);
/// A leader that has not renewed for this long stops (client-go's renewDeadline): a standby
/// may take over LEASE_DURATION after the last renewal, and the two must never overlap, also
/// when a renewal hangs (the API client's own timeout is minutes).
pub const RENEW_DEADLINE: Duration = Duration::from_secs(10);

/// How long the next lease round may take: for a leader, what is left of RENEW_DEADLINE since
/// the start of its last successful round (None: it must stop now); a standby has no hurry.
pub fn round_budget(leading: bool, since_last_renewal: Duration) -> Option<Duration> {
    if !leading {
        return Some(LEASE_DURATION);
    }
    RENEW_DEADLINE
        .checked_sub(since_last_renewal)
        .filter(|left| !left.is_zero())
}

#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    /// No Lease yet: create it with us as holder.
    Create,
    /// We hold it: renew.
    Renew,
    /// The holder stopped renewing: take it over.
    TakeOver,
    /// Someone else holds a live lease.
    Wait,
}

/// Pure decision for one round. `unchanged_for`: how long this process has seen the Lease's
/// holder and renewTime stay the same, by its own clock. The renewTime in the Lease is stamped
/// by the holder's clock; comparing it with ours would let a standby whose clock runs ahead take
/// over from a leader that is still acting (client-go judges expiry the same way).
pub fn decide(spec: Option<&LeaseSpec>, me: &str, unchanged_for: Duration) -> Action {
    let Some(spec) = spec else {
        return Action::Create;
    };
    match spec.holder_identity.as_deref() {
        Some(h) if h == me => Action::Renew,
        None | Some("") => Action::TakeOver,
        Some(_) => {
            let duration = Duration::from_secs(
                u64::try_from(spec.lease_duration_seconds.unwrap_or(15)).unwrap_or(15),
            );
            if unchanged_for >= duration {
                Action::TakeOver
            } else {
                Action::Wait
            }
        }
    }
}

/// When this process first saw the Lease's current holder and renewal.
#[derive(Default)]
pub struct Observer {
    last: Option<(String, std::time::Instant)>,
}

impl Observer {
    /// How long `record` has been unchanged as of `now` (zero when it just changed).
    pub fn unchanged_for(&mut self, record: String, now: std::time::Instant) -> Duration {
        match &self.last {
            Some((seen, since)) if *seen == record => now.saturating_duration_since(*since),
            _ => {
                self.last = Some((record, now));
                Duration::ZERO
            }
        }
    }
}

/// The next lease round: a leader renews every RENEW_EVERY, but retries a failed round after
/// RETRY_EVERY, so that one failed round leaves time for another before RENEW_DEADLINE.
pub fn pause(leading: bool, round_ok: bool) -> Duration {
    if leading && round_ok {
        RENEW_EVERY
    } else {
        RETRY_EVERY
    }
}

pub struct Elector {
    api: Api<Lease>,
    name: String,
    identity: String,
    observer: std::sync::Mutex<Observer>,
}

impl Elector {
    pub fn new(api: Api<Lease>, name: &str, identity: &str) -> Elector {
        Elector {
            api,
            name: name.to_string(),
            identity: identity.to_string(),
            observer: Default::default(),
        }
    }

    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// One round: are we the leader after it?
    pub async fn try_lead(&self) -> Result<bool, kube_client::Error> {
        let now = Timestamp::now();
        let current = self.api.get_opt(&self.name).await?;
        let spec = current.as_ref().and_then(|l| l.spec.as_ref());
        let record = spec.map_or_else(String::new, |s| {
            format!("{:?} {:?}", s.holder_identity, s.renew_time)
        });
        let unchanged_for = self
            .observer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .unchanged_for(record, std::time::Instant::now());
        let action = decide(spec, &self.identity, unchanged_for);
        let mut lease = current.unwrap_or_default();
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        match action {
            Action::Wait => return Ok(false),
            Action::Renew => {
                spec.renew_time = Some(MicroTime(now));
            }
            Action::Create | Action::TakeOver => {
                spec.holder_identity = Some(self.identity.clone());
                spec.lease_duration_seconds = Some(LEASE_DURATION.as_secs() as i32);
                spec.acquire_time = Some(MicroTime(now));
                spec.renew_time = Some(MicroTime(now));
                if action == Action::TakeOver {
                    spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
                }
            }
        }
        let result = if action == Action::Create {
            lease.metadata.name = Some(self.name.clone());
            self.api.create(&PostParams::default(), &lease).await
        } else {
            // resourceVersion from the read: a concurrent writer makes this a 409.
            self.api
                .replace(&self.name, &PostParams::default(), &lease)
                .await
        };
        match result {
            Ok(_) => Ok(true),
            Err(kube_client::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Gives the Lease up when we hold it (shutdown), so a standby takes over at its next round
    /// instead of waiting LEASE_DURATION.
    pub async fn release(&self) -> Result<(), kube_client::Error> {
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            return Ok(());
        };
        let Some(spec) = lease.spec.as_mut() else {
            return Ok(());
        };
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        self.api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
            .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_leader_stops_before_a_standby_may_take_over() {
        assert_eq!(
            round_budget(false, Duration::from_secs(60)),
            Some(LEASE_DURATION)
        );
        assert_eq!(
            round_budget(true, Duration::from_secs(4)),
            Some(Duration::from_secs(6))
        );
        assert_eq!(round_budget(true, RENEW_DEADLINE), None);
        assert_eq!(round_budget(true, Duration::from_secs(11)), None);
        // Renewing every RENEW_EVERY leaves room for a failed round before the deadline, and
        // the deadline comes before the lease can be taken over.
        assert!(RENEW_EVERY * 2 <= RENEW_DEADLINE && RENEW_DEADLINE < LEASE_DURATION);
    }

    fn spec(holder: &str) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(holder.into()),
            lease_duration_seconds: Some(15),
            renew_time: Some(MicroTime(Timestamp::now())),
            ..Default::default()
        }
    }

    #[test]
    fn decisions() {
        let s = Duration::from_secs;
        assert_eq!(decide(None, "a", s(0)), Action::Create);
        assert_eq!(decide(Some(&spec("a")), "a", s(3)), Action::Renew);
        assert_eq!(decide(Some(&spec("b")), "a", s(3)), Action::Wait);
        assert_eq!(decide(Some(&spec("b")), "a", s(14)), Action::Wait);
        assert_eq!(decide(Some(&spec("b")), "a", s(15)), Action::TakeOver);
        assert_eq!(
            decide(Some(&LeaseSpec::default()), "a", s(0)),
            Action::TakeOver
        );
    }

    /// Expiry counts on the standby's own clock from when it saw the last change: a renewTime
    /// stamped far in the past (a leader's clock running behind, or ours ahead) is no reason to
    /// take over from a leader that keeps renewing.
    #[test]
    fn expiry_counts_from_when_a_change_was_seen() {
        let t0 = std::time::Instant::now();
        let s = Duration::from_secs;
        let mut o = Observer::default();
        assert_eq!(o.unchanged_for("b 1".into(), t0), s(0));
        assert_eq!(o.unchanged_for("b 1".into(), t0 + s(10)), s(10));
        // Renewed (whatever time it wrote): counting starts again.
        assert_eq!(o.unchanged_for("b 2".into(), t0 + s(12)), s(0));
        assert_eq!(o.unchanged_for("b 2".into(), t0 + s(26)), s(14));
        assert_eq!(o.unchanged_for("b 2".into(), t0 + s(27)), s(15));
    }

    #[test]
    fn a_failed_round_is_retried_well_before_the_deadline() {
        assert_eq!(pause(true, true), RENEW_EVERY);
        assert_eq!(pause(true, false), RETRY_EVERY);
        assert_eq!(pause(false, true), RETRY_EVERY);
        // Renewal due at RENEW_EVERY after the last success; if it fails, at least one more
        // round fits before RENEW_DEADLINE.
        assert!(RENEW_EVERY + RETRY_EVERY < RENEW_DEADLINE);
    }
}
