//! One active operator: a coordination.k8s.io Lease, renewed by the leader; a standby takes it
//! over once it has not been renewed for its duration. Writes use the Lease's resourceVersion,
//! so two candidates can never both win a round.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
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

/// Pure decision for one round.
pub fn decide(spec: Option<&LeaseSpec>, me: &str, now: Timestamp) -> Action {
    let Some(spec) = spec else {
        return Action::Create;
    };
    match spec.holder_identity.as_deref() {
        Some(h) if h == me => Action::Renew,
        None | Some("") => Action::TakeOver,
        Some(_) => {
            let duration =
                SignedDuration::from_secs(spec.lease_duration_seconds.unwrap_or(15) as i64);
            let renewed = spec
                .renew_time
                .as_ref()
                .or(spec.acquire_time.as_ref())
                .map(|t| t.0);
            match renewed {
                Some(t) if t + duration > now => Action::Wait,
                _ => Action::TakeOver,
            }
        }
    }
}

pub struct Elector {
    api: Api<Lease>,
    name: String,
    identity: String,
}

impl Elector {
    pub fn new(api: Api<Lease>, name: &str, identity: &str) -> Elector {
        Elector {
            api,
            name: name.to_string(),
            identity: identity.to_string(),
        }
    }

    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// One round: are we the leader after it?
    pub async fn try_lead(&self) -> Result<bool, kube_client::Error> {
        let now = Timestamp::now();
        let current = self.api.get_opt(&self.name).await?;
        let action = decide(
            current.as_ref().and_then(|l| l.spec.as_ref()),
            &self.identity,
            now,
        );
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

    fn spec(holder: &str, renewed_secs_ago: i64) -> LeaseSpec {
        let now = Timestamp::now();
        LeaseSpec {
            holder_identity: Some(holder.into()),
            lease_duration_seconds: Some(15),
            renew_time: Some(MicroTime(now - SignedDuration::from_secs(renewed_secs_ago))),
            ..Default::default()
        }
    }

    #[test]
    fn decisions() {
        let now = Timestamp::now();
        assert_eq!(decide(None, "a", now), Action::Create);
        assert_eq!(decide(Some(&spec("a", 3)), "a", now), Action::Renew);
        assert_eq!(decide(Some(&spec("b", 3)), "a", now), Action::Wait);
        assert_eq!(decide(Some(&spec("b", 16)), "a", now), Action::TakeOver);
        assert_eq!(
            decide(Some(&LeaseSpec::default()), "a", now),
            Action::TakeOver
        );
    }
}
