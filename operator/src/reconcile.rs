//! Pure reconcile logic: from everything the operator sees to what it must write (generated
//! client ids, credential Secrets, statuses, the compiled configuration). No Kubernetes I/O.

use gatehouse_crds::{
    ApiConfig, ClientType, Compiled, Condition, Kind, Phase, ResourceStatus, Resources,
    Subscription, Verdict, compile_after,
};
use k8s_openapi::api::core::v1::Secret;
use kube_client::ResourceExt;

/// Key of the generated client secret (and of the client id) in a credentials Secret.
pub const SECRET_KEY: &str = gatehouse_crds::compile::GENERATED_SECRET_KEY;
pub const CLIENT_ID_KEY: &str = "clientId";
/// Label on Secrets the operator created.
pub const MANAGED_LABEL: &str = "app.kubernetes.io/managed-by";
pub const MANAGED_VALUE: &str = "gatehouse-operator";

/// A credentials Secret to create, owned by its Subscription.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewSecret {
    pub namespace: String,
    pub name: String,
    pub subscription: String,
    pub subscription_uid: String,
    pub client_id: String,
    pub client_secret: String,
}

/// The uid a credentials Secret this pass is about to create is judged by (compile needs one to
/// accept it). The controller puts the uid the API server assigned in its place
/// (`record_created`) before any status is written; never a real uid (those are UUIDs).
pub const UID_BEING_CREATED: &str = "(being created)";

/// Credentials Secrets this operator process created: (namespace, Secret name) -> uid, kept
/// until the subscription's status, read back, records it. A pass whose view lags behind the
/// status the previous one wrote (the Secret's watch event came first) finds the uid here, and
/// so does not refuse the operator's own Secret.
pub type Created = std::collections::BTreeMap<(String, String), String>;

/// What the operator knows beyond the resources it watches.
#[derive(Clone, Debug, Default)]
pub struct Known {
    /// The Apis of the configuration published last (they keep their path prefixes).
    pub served_apis: Vec<ApiConfig>,
    /// Subscription ("namespace/name") -> the SHA-256 (hex) of the client secret the gateways
    /// accept for it, from the configuration published last.
    pub served_secrets: std::collections::BTreeMap<String, String>,
    pub created: Created,
}

impl Known {
    /// From the configuration published last, if any.
    pub fn served(config: Option<gatehouse_crds::GatewayConfig>, created: Created) -> Known {
        let config = config.unwrap_or_default();
        Known {
            served_secrets: config
                .clients
                .into_iter()
                .filter_map(|c| Some((c.subscription, c.secret_sha256?)))
                .collect(),
            served_apis: config.apis,
            created,
        }
    }
}

/// A status to write because it differs from what the resource has.
#[derive(Clone, Debug, PartialEq)]
pub struct StatusUpdate {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
    /// The resourceVersion the status was decided on: written only if the resource is still at
    /// it, so a pass working from a lagging view (a new leader's, a watch behind) cannot put an
    /// older status (an older credentials Secret's uid) back over a newer one.
    pub resource_version: Option<String>,
    pub status: ResourceStatus,
}

/// A generated credentials Secret whose `clientId` no longer names the subscription's client
/// (spec.clientId set or changed after the Secret was made): the key is rewritten, the secret
/// kept.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientIdUpdate {
    pub namespace: String,
    pub name: String,
    /// The recorded Secret's uid: the write applies to that object only.
    pub uid: String,
    pub client_id: String,
}

#[derive(Debug)]
pub struct Plan {
    pub compiled: Compiled,
    pub new_secrets: Vec<NewSecret>,
    pub client_id_updates: Vec<ClientIdUpdate>,
    pub statuses: Vec<StatusUpdate>,
}

/// Random values the operator generates (injected so tests are deterministic).
pub trait Generator {
    /// A client secret with 256 bits of entropy.
    fn secret(&mut self) -> String;
}

/// The client id of a subscription without spec.clientId: its name and 8 hex digits derived
/// from its namespace, name and uid. Derived, not random, so that every pass and every operator
/// replica arrives at the same id even when a status write has not reached them yet (a second
/// random id used to replace the first in status while the Secret kept the first). A
/// subscription deleted and created again gets a new uid, hence a new id: the old one's tokens
/// stay dead.
pub fn generated_client_id(namespace: &str, name: &str, uid: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::new()
        .chain_update(b"gatehouse client id\0")
        .chain_update(namespace.as_bytes())
        .chain_update(b"\0")
        .chain_update(name.as_bytes())
        .chain_update(b"\0")
        .chain_update(uid.as_bytes())
        .finalize();
    format!("{name}-{}", hex::encode(&digest[..4]))
}

/// The `clientId` the operator's credentials Secret holds.
fn secret_client_id(secret: &Secret) -> Option<String> {
    let value = secret.data.as_ref()?.get(CLIENT_ID_KEY)?;
    String::from_utf8(value.0.clone()).ok()
}

fn ns(obj: &impl ResourceExt) -> String {
    obj.namespace()
        .unwrap_or_else(|| gatehouse_crds::compile::DEFAULT_NAMESPACE.to_string())
}

fn is_confidential(res: &Resources, sub: &Subscription) -> bool {
    res.applications.iter().any(|a| {
        ns(a) == ns(sub)
            && a.name_any() == sub.spec.application
            && a.spec.client_type == ClientType::Confidential
    })
}

/// Decides everything for one pass. `served`: the Apis of the configuration published last
/// (they keep their path prefixes). `now` is an RFC 3339 timestamp for new transitions.
pub fn plan(mut res: Resources, known: &Known, generator: &mut dyn Generator, now: &str) -> Plan {
    let original = res.clone();
    let mut tentative: Vec<NewSecret> = Vec::new();
    let mut id_updates: Vec<(String, ClientIdUpdate)> = Vec::new();
    let secrets_snapshot = res.secrets.clone();
    let applications = res.clone();
    for sub in &mut res.subscriptions {
        let namespace = ns(sub);
        let name = sub.name_any();
        let uid = sub.metadata.uid.clone().unwrap_or_default();
        let secret_name = gatehouse_crds::compile::generated_secret_name(&name);
        let existing = secrets_snapshot
            .iter()
            .find(|s| ns(*s) == namespace && s.name_any() == secret_name);
        // Confidential without clientSecretRef: the operator generates its Secret (a name too
        // long for Kubernetes is compile's to report).
        let generates = sub.spec.client_secret_ref.is_none()
            && is_confidential(&applications, sub)
            && secret_name.len() <= gatehouse_crds::compile::MAX_OBJECT_NAME;
        let status = sub.status.get_or_insert_with(ResourceStatus::default);
        if generates
            && let Some(secret) = existing
            && let Some(adopted) = adopted_uid(secret, &uid, &name, status, known)
        {
            status.credentials_secret_uid = Some(adopted);
        }
        // The Secret under the generated name when it is the one the status records: only it
        // lends its clientId or gets the current one written into it, never a planted one.
        let own = existing.filter(|s| {
            s.metadata.uid.as_deref().is_some_and(|u| !u.is_empty())
                && s.metadata.uid == status.credentials_secret_uid
                && !uid.is_empty()
                && gatehouse_crds::compile::controlling_subscription(&s.metadata)
                    == Some(uid.as_str())
        });
        // A generated id lives in status. Without one (a status lost, or not seen yet) it is
        // the one the operator's credentials Secret holds (an older operator's random id),
        // else derived again.
        if sub.spec.client_id.is_none() && status.client_id.is_none() {
            status.client_id = Some(
                own.and_then(secret_client_id)
                    .unwrap_or_else(|| generated_client_id(&namespace, &name, &uid)),
            );
        }
        let client_id = sub
            .spec
            .client_id
            .clone()
            .or_else(|| status.client_id.clone())
            .unwrap_or_default();
        if !generates {
            continue;
        }
        if existing.is_some() {
            if let Some(own) = own
                && secret_client_id(own).is_some_and(|held| held != client_id)
            {
                id_updates.push((
                    name.clone(),
                    ClientIdUpdate {
                        namespace: namespace.clone(),
                        name: secret_name.clone(),
                        uid: own.metadata.uid.clone().unwrap_or_default(),
                        client_id: client_id.clone(),
                    },
                ));
            }
        } else {
            tentative.push(NewSecret {
                namespace: namespace.clone(),
                name: secret_name.clone(),
                subscription: name.clone(),
                subscription_uid: uid.clone(),
                client_id,
                client_secret: generator.secret(),
            });
            status.credentials_secret_uid = Some(UID_BEING_CREATED.to_string());
        }
        status.credentials_secret = Some(secret_name);
    }
    for s in &tentative {
        let mut secret = secret_object(s);
        secret.metadata.uid = Some(UID_BEING_CREATED.to_string());
        res.secrets.push(secret);
    }
    let compiled = compile_after(&res, &known.served_apis);
    // Only subscriptions that came out Active (valid and approved) get a Secret created.
    let new_secrets: Vec<NewSecret> = tentative
        .into_iter()
        .filter(|s| {
            compiled
                .verdict(Kind::Subscription, &s.namespace, &s.subscription)
                .is_some_and(|v| v.phase == Phase::Active)
        })
        .collect();
    // Likewise only for Active ones: an id compile refused (a duplicate) is not handed out.
    let client_id_updates = id_updates
        .into_iter()
        .filter(|(sub, u)| {
            compiled
                .verdict(Kind::Subscription, &u.namespace, sub)
                .is_some_and(|v| v.phase == Phase::Active)
        })
        .map(|(_, u)| u)
        .collect();
    let statuses = status_updates(&original, &res, &compiled, &new_secrets, now);
    Plan {
        compiled,
        new_secrets,
        client_id_updates,
        statuses,
    }
}

/// The uid to record for `secret`, the Secret of a subscription's generated name that exists,
/// when the status does not record it and it is the operator's own:
/// - one this process created (the status that records it not read back yet), or
/// - where an operator from before uids were recorded left a status naming the Secret without
///   a uid, the one holding the very client secret the gateways accept for this subscription
///   in the configuration the operator published: adopting it grants nothing its writer did
///   not hold already.
///
/// Else None: a Secret someone else created under that name is never adopted, whatever
/// ownerReference it carries (compile refuses it and the status says to delete it). With a uid
/// recorded, a Secret of another uid under that name is refused even if it holds the served
/// secret: it was created after the operator's was deleted, and deleting the Secret is how a
/// leaked client secret is rotated.
fn adopted_uid(
    secret: &Secret,
    subscription_uid: &str,
    subscription: &str,
    status: &ResourceStatus,
    known: &Known,
) -> Option<String> {
    use sha2::Digest;
    let secret_uid = secret.metadata.uid.as_deref().filter(|u| !u.is_empty())?;
    let controlled = !subscription_uid.is_empty()
        && gatehouse_crds::compile::controlling_subscription(&secret.metadata)
            == Some(subscription_uid);
    if !controlled || status.credentials_secret_uid.as_deref() == Some(secret_uid) {
        return None;
    }
    let namespace = ns(secret);
    let ours = known
        .created
        .get(&(namespace.clone(), secret.name_any()))
        .map(String::as_str)
        == Some(secret_uid);
    let value = secret
        .data
        .as_ref()
        .and_then(|d| d.get(SECRET_KEY))
        .map(|v| v.0.as_slice());
    // Only where an operator from before uids were recorded left its Secret: such a status
    // names it with no uid, which this operator never writes. Not for a subscription that used
    // a clientSecretRef (its published secret is that Secret's), nor for one created again
    // under the same name (its status is new).
    let served = status.credentials_secret_uid.is_none()
        && status.credentials_secret.as_deref() == Some(secret.name_any().as_str())
        && value.is_some_and(|v| {
            known
                .served_secrets
                .get(&format!("{namespace}/{subscription}"))
                == Some(&hex::encode(sha2::Sha256::digest(v)))
        });
    (ours || served).then(|| secret_uid.to_string())
}

/// The Secret `s` was created with `uid`: the status this pass writes for its subscription
/// records that uid instead of `UID_BEING_CREATED`.
pub fn record_created(statuses: &mut [StatusUpdate], s: &NewSecret, uid: &str) {
    for u in statuses {
        if u.kind == Kind::Subscription
            && u.namespace == s.namespace
            && u.name == s.subscription
            && u.status.credentials_secret_uid.as_deref() == Some(UID_BEING_CREATED)
        {
            u.status.credentials_secret_uid = Some(uid.to_string());
        }
    }
}

/// Forgets the Secrets whose subscriptions' statuses now record them, or that belong to no
/// subscription any more.
pub fn prune_created(created: &mut Created, res: &Resources) {
    created.retain(|(namespace, secret_name), uid| {
        res.subscriptions.iter().any(|sub| {
            &ns(sub) == namespace
                && &gatehouse_crds::compile::generated_secret_name(&sub.name_any()) == secret_name
                && sub
                    .status
                    .as_ref()
                    .and_then(|s| s.credentials_secret_uid.as_ref())
                    != Some(uid)
        })
    });
}

/// The Secret object for a generated credential, owned by its Subscription (deleting that
/// deletes it; no finalizer).
pub fn secret_object(s: &NewSecret) -> Secret {
    use kube_client::Resource;
    let mut secret = Secret::default();
    secret.metadata.name = Some(s.name.clone());
    secret.metadata.namespace = Some(s.namespace.clone());
    secret.metadata.owner_references = Some(vec![
        k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
            api_version: Subscription::api_version(&()).to_string(),
            kind: Subscription::kind(&()).to_string(),
            name: s.subscription.clone(),
            uid: s.subscription_uid.clone(),
            controller: Some(true),
            block_owner_deletion: Some(false),
        },
    ]);
    secret.metadata.labels = Some([(MANAGED_LABEL.to_string(), MANAGED_VALUE.to_string())].into());
    secret.type_ = Some("Opaque".to_string());
    secret.string_data = Some(
        [
            (CLIENT_ID_KEY.to_string(), s.client_id.clone()),
            (SECRET_KEY.to_string(), s.client_secret.clone()),
        ]
        .into(),
    );
    secret
}

/// A resource as the pass saw it: its status, generation and resourceVersion.
#[derive(Default)]
struct Current {
    status: Option<ResourceStatus>,
    generation: Option<i64>,
    resource_version: Option<String>,
}

fn current_status(res: &Resources, kind: Kind, namespace: &str, name: &str) -> Current {
    fn find<K: ResourceExt>(
        items: &[K],
        namespace: &str,
        name: &str,
        status: impl Fn(&K) -> Option<ResourceStatus>,
    ) -> Current {
        items
            .iter()
            .find(|o| ns(*o) == namespace && o.name_any() == name)
            .map_or_else(Current::default, |o| Current {
                status: status(o),
                generation: o.meta().generation,
                resource_version: o.meta().resource_version.clone(),
            })
    }
    match kind {
        Kind::Api => find(&res.apis, namespace, name, |o| o.status.clone()),
        Kind::Plan => find(&res.plans, namespace, name, |o| o.status.clone()),
        Kind::Application => find(&res.applications, namespace, name, |o| o.status.clone()),
        Kind::Subscription => find(&res.subscriptions, namespace, name, |o| o.status.clone()),
    }
}

/// Takes the clients of the subscriptions `out` names ("namespace/name") out of the
/// configuration to publish, and hashes it again.
pub fn leave_out(compiled: &mut Compiled, out: impl Fn(&str) -> bool) {
    compiled.config.clients.retain(|c| !out(&c.subscription));
    compiled.config.hash = gatehouse_crds::compile::config_hash(&compiled.config);
}

/// The resourceVersion of a resource as the pass saw it.
pub fn viewed_version(res: &Resources, kind: Kind, namespace: &str, name: &str) -> Option<String> {
    current_status(res, kind, namespace, name).resource_version
}

fn status_updates(
    original: &Resources,
    prepared: &Resources,
    compiled: &Compiled,
    new_secrets: &[NewSecret],
    now: &str,
) -> Vec<StatusUpdate> {
    compiled
        .verdicts
        .iter()
        .filter_map(|v| {
            let old = current_status(original, v.kind, &v.namespace, &v.name);
            let prepared_status = current_status(prepared, v.kind, &v.namespace, &v.name).status;
            let desired = desired_status(
                v,
                old.status.as_ref(),
                prepared_status.as_ref(),
                old.generation,
                new_secrets,
                now,
            );
            (old.status.as_ref() != Some(&desired)).then(|| StatusUpdate {
                kind: v.kind,
                namespace: v.namespace.clone(),
                name: v.name.clone(),
                resource_version: old.resource_version,
                status: desired,
            })
        })
        .collect()
}

/// A Ready condition's lastTransitionTime: kept while its status stays `status`, else `now`.
fn transition_time(previous: Option<&Condition>, status: &str, now: &str) -> Option<String> {
    match previous {
        Some(p) if p.status == status => p.last_transition_time.clone(),
        _ => Some(now.to_string()),
    }
}

fn desired_status(
    v: &Verdict,
    old: Option<&ResourceStatus>,
    prepared: Option<&ResourceStatus>,
    generation: Option<i64>,
    new_secrets: &[NewSecret],
    now: &str,
) -> ResourceStatus {
    let mut cond: Condition = v.ready_condition(generation);
    let previous = old.and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"));
    cond.last_transition_time = transition_time(previous, &cond.status, now);
    let mut status = ResourceStatus {
        phase: Some(v.phase.as_str().to_string()),
        observed_generation: generation,
        client_id: None,
        credentials_secret: None,
        credentials_secret_uid: None,
        conditions: vec![cond],
    };
    if v.kind == Kind::Subscription {
        // The id the gateways accept (the compiled one: spec.clientId first), else the one
        // prepared for it (a generated id kept in the status).
        status.client_id = v
            .client_id
            .clone()
            .or_else(|| prepared.and_then(|p| p.client_id.clone()));
        // The uid: adopted, being created, or the one recorded, which stays while its Secret is
        // away or unused (a clientSecretRef for a while): a Secret created under the name
        // meanwhile is not taken for it, and the operator's own is still its own afterwards.
        let being_created = new_secrets
            .iter()
            .any(|s| s.namespace == v.namespace && s.subscription == v.name);
        status.credentials_secret_uid =
            match prepared.and_then(|p| p.credentials_secret_uid.clone()) {
                Some(placeholder) if placeholder == UID_BEING_CREATED && !being_created => {
                    old.and_then(|s| s.credentials_secret_uid.clone())
                }
                uid => uid,
            };
        // The Secret is named only with its uid: this operator never writes a name without
        // one, so a status that does was left by an operator from before uids were recorded.
        if status.credentials_secret_uid.is_some() {
            status.credentials_secret = prepared
                .and_then(|p| p.credentials_secret.clone())
                .or_else(|| old.and_then(|s| s.credentials_secret.clone()));
        }
    }
    status
}

/// Reason of a subscription whose credentials Secret the API server would not create.
pub const CREDENTIALS_SECRET_FAILED: &str = "CredentialsSecretFailed";

/// The status of a subscription left out because its credentials Secret could not be created
/// (a quota, a policy, a name taken by a Secret of another type): Invalid, Ready=False, with the
/// API server's answer. Replaces `planned`, the update compile's verdict asked for; None when
/// the resource already says exactly this.
pub fn credentials_failed(
    res: &Resources,
    planned: Option<&StatusUpdate>,
    namespace: &str,
    name: &str,
    error: &str,
    now: &str,
) -> Option<StatusUpdate> {
    let Current {
        status: old,
        generation,
        resource_version,
    } = current_status(res, Kind::Subscription, namespace, name);
    let previous = old
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"));
    let status = ResourceStatus {
        phase: Some(Phase::Invalid.as_str().to_string()),
        observed_generation: generation,
        client_id: planned
            .and_then(|u| u.status.client_id.clone())
            .or_else(|| old.as_ref().and_then(|s| s.client_id.clone())),
        // What was recorded stays: a create refused because the operator's own Secret is there
        // but not seen yet must not cost the record that makes it the subscription's.
        credentials_secret: old.as_ref().and_then(|s| s.credentials_secret.clone()),
        credentials_secret_uid: old.as_ref().and_then(|s| s.credentials_secret_uid.clone()),
        conditions: vec![Condition {
            type_: "Ready".to_string(),
            status: "False".to_string(),
            reason: CREDENTIALS_SECRET_FAILED.to_string(),
            message: format!(
                "the credentials Secret {} cannot be created (retried every 10 s): {error}",
                gatehouse_crds::compile::generated_secret_name(name)
            ),
            last_transition_time: transition_time(previous, "False", now),
            observed_generation: generation,
        }],
    };
    (old.as_ref() != Some(&status)).then(|| StatusUpdate {
        kind: Kind::Subscription,
        namespace: namespace.to_string(),
        name: name.to_string(),
        resource_version,
        status,
    })
}

/// Reason of a valid resource whose configuration could not be published to the gateways.
pub const PUBLISH_FAILED: &str = "PublishFailed";

/// Does this update say Ready=True?
pub fn says_ready(update: &StatusUpdate) -> bool {
    update
        .status
        .conditions
        .iter()
        .any(|c| c.type_ == "Ready" && c.status == "True")
}

/// `planned` (a Ready=True update) as it must read while the configuration that would serve it
/// cannot be published (a ConfigMap over the API server's size limit, RBAC, a policy): Ready
/// False, so `kubectl wait --for=condition=Ready` does not report a resource the gateways do
/// not serve. The phase stays: the spec itself is valid. The error is in the operator's log
/// only. None when the resource already says exactly this.
pub fn publish_failed(
    res: &Resources,
    mut planned: StatusUpdate,
    now: &str,
) -> Option<StatusUpdate> {
    let old = current_status(res, planned.kind, &planned.namespace, &planned.name).status;
    let previous = old
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"));
    for c in &mut planned.status.conditions {
        if c.type_ == "Ready" {
            c.status = "False".to_string();
            c.reason = PUBLISH_FAILED.to_string();
            c.message = "valid, but the operator cannot publish the gateways' configuration (retried every 2 s; its log says why)".to_string();
            c.last_transition_time = transition_time(previous, "False", now);
        }
    }
    (old.as_ref() != Some(&planned.status)).then_some(planned)
}

/// The body of a status merge patch (RFC 7396) that leaves the status exactly `status`: fields
/// it does not have are sent as null, which removes them (left out, the server would keep an
/// old `credentialsSecret` or `clientId` for ever, and the status would never converge).
pub fn status_patch(status: &ResourceStatus, resource_version: Option<&str>) -> serde_json::Value {
    let mut value = serde_json::to_value(status).unwrap_or_default();
    if let Some(fields) = value.as_object_mut() {
        for name in [
            "phase",
            "observedGeneration",
            "clientId",
            "credentialsSecret",
            "credentialsSecretUid",
            "conditions",
        ] {
            fields.entry(name).or_insert(serde_json::Value::Null);
        }
    }
    match resource_version {
        Some(rv) => serde_json::json!({ "metadata": { "resourceVersion": rv }, "status": value }),
        None => serde_json::json!({ "status": value }),
    }
}

#[cfg(test)]
mod tests;
