//! `compile()`: the four custom resources (plus the Secrets they reference) in, one
//! [`GatewayConfig`] and one [`Verdict`] per input resource out.
//!
//! Pure logic, no I/O: the operator calls it with what its watches see, the standalone gateway
//! with what [`crate::manifests::load_paths`] read from disk. One invalid resource never blocks the
//! others: it gets an `Invalid` verdict with a message a person can act on, is left out of the
//! config, and everything that does not depend on it still compiles.
//!
//! Determinism: inputs are processed oldest first (`metadata.creationTimestamp`, then
//! namespace/name, then input order), so when two resources claim the same thing (a pathPrefix, a
//! client_id, an application x api pair, or the same namespace/name twice) the older one keeps it
//! and the newer one is reported. Resources without a creationTimestamp (standalone YAML) count as
//! newer than any resource that has one. A claim stays with the oldest claimant even while that
//! claimant is Invalid for another reason, so fixing (or breaking) one resource never silently
//! hands its pathPrefix or client_id to another. Verdicts come out sorted by kind, namespace and
//! name; the config is sorted as documented on [`GatewayConfig`] and carries a SHA-256 over its
//! canonical JSON.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::Resource;
use sha2::{Digest, Sha256};
use url::{Host, Url};

use crate::config::{
    ApiConfig, ClientConfig, GatewayConfig, PlanConfig, RateLimitConfig, ScopeConfig,
    UpstreamConfig,
};
use crate::resources::{
    APPROVED_ANNOTATION, Api, Application, ClientType, GrantType, Plan, SecretKeyRef, Subscription,
};

/// Namespace assumed for resources that carry none.
pub const DEFAULT_NAMESPACE: &str = "default";

/// Secret key used when a subscription has no `clientSecretRef` but its status names a
/// `credentialsSecret` (the Secret the operator generated).
pub const GENERATED_SECRET_KEY: &str = "clientSecret";

/// Longest Kubernetes object name (a DNS subdomain), which a generated Secret's name must fit.
pub const MAX_OBJECT_NAME: usize = 253;

/// Name of the Secret the operator generates for a subscription without `clientSecretRef`.
pub fn generated_secret_name(subscription: &str) -> String {
    format!("{subscription}-credentials")
}

/// Label a Secret must carry (value `"true"`) before `spec.clientSecretRef` may name it. Without
/// it, anyone allowed to create Subscriptions could point one at any Secret of the namespace (a
/// database password, an API key) and have the gateways accept its value as a client secret:
/// a guessing oracle for a Secret they cannot read. Kong's controller asks the same
/// (`konghq.com/credential`). The Secret the operator generates for a subscription needs no
/// label: it is the one that subscription controls (its ownerReference).
pub const CLIENT_SECRET_LABEL: &str = "gatehouse.dev/client-secret";

/// Is this Secret labelled for use by `spec.clientSecretRef`?
pub fn opted_in(meta: &ObjectMeta) -> bool {
    meta.labels
        .as_ref()
        .and_then(|l| l.get(CLIENT_SECRET_LABEL))
        .is_some_and(|v| v == "true")
}

/// The uid of the Subscription controlling this Secret (the operator's generated credentials).
pub fn controlling_subscription(meta: &ObjectMeta) -> Option<&str> {
    meta.owner_references
        .iter()
        .flatten()
        .find(|o| {
            o.controller == Some(true)
                && o.kind == "Subscription"
                && o.api_version.starts_with("gatehouse.dev/")
        })
        .map(|o| o.uid.as_str())
        .filter(|uid| !uid.is_empty())
}

/// May this Secret be some subscription's client secret? The operator reads the data of no
/// other Secret.
pub fn may_hold_client_secret(meta: &ObjectMeta) -> bool {
    opted_in(meta) || controlling_subscription(meta).is_some()
}

/// Shortest client secret accepted, in bytes.
pub const MIN_CLIENT_SECRET_BYTES: usize = 16;

/// Everything `compile()` looks at.
#[derive(Clone, Debug, Default)]
pub struct Resources {
    pub apis: Vec<Api>,
    pub plans: Vec<Plan>,
    pub applications: Vec<Application>,
    pub subscriptions: Vec<Subscription>,
    /// Secrets referenced by subscriptions of confidential applications (others are ignored).
    pub secrets: Vec<Secret>,
}

impl Resources {
    /// Appends everything `other` holds.
    pub fn extend(&mut self, other: Resources) {
        self.apis.extend(other.apis);
        self.plans.extend(other.plans);
        self.applications.extend(other.applications);
        self.subscriptions.extend(other.subscriptions);
        self.secrets.extend(other.secrets);
    }
}

/// The resource kind a [`Verdict`] is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Api,
    Plan,
    Application,
    Subscription,
}

impl Kind {
    /// The Kubernetes kind name (`Api`, `Plan`, `Application`, `Subscription`).
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Api => "Api",
            Kind::Plan => "Plan",
            Kind::Application => "Application",
            Kind::Subscription => "Subscription",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Outcome for one resource; `status.phase` on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Phase {
    Active,
    PendingApproval,
    Invalid,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Active => "Active",
            Phase::PendingApproval => "PendingApproval",
            Phase::Invalid => "Invalid",
        }
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The machine-readable reasons a [`Verdict`] can carry (the `reason` of the Ready condition).
pub mod reasons {
    /// Everything fine; the resource is part of the config.
    pub const ACTIVE: &str = "Active";
    /// Subscription to a plan with `requiresApproval`, not yet annotated as approved.
    pub const AWAITING_APPROVAL: &str = "AwaitingApproval";
    /// `metadata.name` is missing or empty.
    pub const MISSING_NAME: &str = "MissingName";
    /// The same kind/namespace/name appears twice in the input (standalone manifests only).
    pub const DUPLICATE_RESOURCE: &str = "DuplicateResource";
    /// The spec is larger than `MAX_SPEC_BYTES`.
    pub const TOO_LARGE: &str = "TooLarge";
    /// A referenced resource does not exist in the same namespace.
    pub const DANGLING_REFERENCE: &str = "DanglingReference";
    /// A referenced resource exists but is Invalid itself.
    pub const INVALID_REFERENCE: &str = "InvalidReference";
    pub const INVALID_RATE_LIMIT: &str = "InvalidRateLimit";
    pub const INVALID_PATH_PREFIX: &str = "InvalidPathPrefix";
    /// Another (older) Api already uses this pathPrefix.
    pub const PATH_PREFIX_CONFLICT: &str = "PathPrefixConflict";
    pub const INVALID_UPSTREAM: &str = "InvalidUpstream";
    pub const INVALID_HOST: &str = "InvalidHost";
    pub const INVALID_SCOPE: &str = "InvalidScope";
    pub const INVALID_GRANTS: &str = "InvalidGrants";
    pub const INVALID_TTL: &str = "InvalidTtl";
    pub const INVALID_REDIRECT_URI: &str = "InvalidRedirectUri";
    /// The subscription's plan is not listed in the Api's `plans`.
    pub const PLAN_NOT_OFFERED: &str = "PlanNotOffered";
    /// A grant in the subscription's `grants` is not enabled on the Api.
    pub const GRANT_NOT_ALLOWED: &str = "GrantNotAllowed";
    /// A public application asked for client_credentials.
    pub const PUBLIC_CLIENT_CREDENTIALS: &str = "PublicClientCredentials";
    /// The effective grant set is empty.
    pub const NO_GRANTS: &str = "NoGrants";
    /// authorization_code granted, but the application has no redirectUris.
    pub const NO_REDIRECT_URIS: &str = "NoRedirectUris";
    /// Confidential application without a readable client secret.
    pub const MISSING_CLIENT_SECRET: &str = "MissingClientSecret";
    /// Client secret shorter than 16 bytes.
    pub const WEAK_CLIENT_SECRET: &str = "WeakClientSecret";
    pub const INVALID_CLIENT_ID: &str = "InvalidClientId";
    /// Another (older) subscription already uses this client_id.
    pub const CLIENT_ID_CONFLICT: &str = "ClientIdConflict";
    /// Another (older) subscription already connects this application to this api.
    pub const DUPLICATE_SUBSCRIPTION: &str = "DuplicateSubscription";
}

/// What `compile()` concluded about one input resource.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
    pub phase: Phase,
    /// CamelCase machine reason, one of [`reasons`].
    pub reason: String,
    /// A sentence a person can act on: which field is wrong and how to fix it.
    pub message: String,
    /// Subscriptions: the client_id this subscription holds (set when it is syntactically valid
    /// and not taken by an older subscription, whatever the phase).
    pub client_id: Option<String>,
}

impl Verdict {
    /// The `Ready` condition for the resource's status (`True` only when Active).
    pub fn ready_condition(&self, observed_generation: Option<i64>) -> crate::resources::Condition {
        crate::resources::Condition {
            type_: "Ready".to_string(),
            status: if self.phase == Phase::Active {
                "True"
            } else {
                "False"
            }
            .to_string(),
            reason: self.reason.clone(),
            message: self.message.clone(),
            last_transition_time: None,
            observed_generation,
        }
    }
}

/// Result of [`compile()`].
#[derive(Clone, Debug, PartialEq)]
pub struct Compiled {
    pub config: GatewayConfig,
    /// One per input resource, sorted by kind, namespace, name.
    pub verdicts: Vec<Verdict>,
}

impl Compiled {
    /// The (first) verdict for `kind` `namespace/name`.
    pub fn verdict(&self, kind: Kind, namespace: &str, name: &str) -> Option<&Verdict> {
        self.verdicts
            .iter()
            .find(|v| v.kind == kind && v.namespace == namespace && v.name == name)
    }

    /// Verdicts that are not Active.
    pub fn problems(&self) -> impl Iterator<Item = &Verdict> {
        self.verdicts.iter().filter(|v| v.phase != Phase::Active)
    }
}

/// SHA-256 (hex) of the canonical JSON of `config` with its `hash` field set to "".
pub fn config_hash(config: &GatewayConfig) -> String {
    let mut copy = config.clone();
    copy.hash = String::new();
    let json = serde_json::to_vec(&copy).expect("GatewayConfig serializes to JSON");
    hex::encode(Sha256::digest(&json))
}

/// Checks a redirect URI an Application registers (RFC 8252 for native apps):
/// an absolute URI without fragment; `https`, private-use schemes (`com.example.app:/cb`,
/// `myapp://cb`) and `http` on loopback hosts (127.0.0.1, [::1], localhost) are allowed;
/// `javascript:`, `data:`, `file:` and `vbscript:` are not. `Err` is a sentence for a person.
pub fn validate_redirect_uri(uri: &str) -> Result<(), String> {
    if uri.is_empty() {
        return Err("redirect URI is empty".to_string());
    }
    if uri.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "redirect URI {uri:?} contains whitespace or control characters; percent-encode them or remove them"
        ));
    }
    let url = Url::parse(uri).map_err(|e| {
        format!(
            "redirect URI {uri:?} is not an absolute URI ({e}); use e.g. https://app.example.com/callback or com.example.app:/callback"
        )
    })?;
    let scheme = url.scheme();
    if matches!(scheme, "javascript" | "data" | "file" | "vbscript") {
        return Err(format!(
            "redirect URI {uri:?} uses the forbidden scheme {scheme}:; use https, a private-use scheme or http on a loopback address"
        ));
    }
    if url.fragment().is_some() {
        return Err(format!(
            "redirect URI {uri:?} contains a fragment (#...); remove it (RFC 6749 section 3.1.2)"
        ));
    }
    match scheme {
        "http" => {
            let loopback = match url.host() {
                Some(Host::Ipv4(ip)) => ip == Ipv4Addr::LOCALHOST,
                Some(Host::Ipv6(ip)) => ip == Ipv6Addr::LOCALHOST,
                Some(Host::Domain(d)) => d == "localhost",
                None => false,
            };
            if loopback {
                Ok(())
            } else {
                Err(format!(
                    "redirect URI {uri:?} uses http on a non-loopback host; http is only allowed for 127.0.0.1, [::1] and localhost, use https or a private-use scheme such as com.example.app:/callback"
                ))
            }
        }
        "https" => match url.host_str() {
            Some(h) if !h.is_empty() => Ok(()),
            _ => Err(format!("redirect URI {uri:?} has no host")),
        },
        _ => Ok(()),
    }
}

/// Whether `id` is an acceptable client_id: `^[A-Za-z0-9._~-]{1,128}$`.
pub fn is_valid_client_id(id: &str) -> bool {
    (1..=128).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'~' | b'-'))
}

/// Whether `name` is an RFC 6749 scope-token: one or more of %x21 / %x23-5B / %x5D-7E.
pub fn is_valid_scope_token(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b == 0x21 || (0x23..=0x5B).contains(&b) || (0x5D..=0x7E).contains(&b))
}

// ------------------------------------------------------------------------------------ compile

/// Turns the resources into a gateway configuration and a verdict for every resource.
pub fn compile(res: &Resources) -> Compiled {
    compile_after(res, &[])
}

/// `compile`, keeping path prefixes with the Apis that served them in `previous` (the Apis of
/// the configuration compiled or published before this one). Otherwise the oldest Api wins a
/// conflict, and a tenant with an old Api could edit its prefix onto a newer Api's and take
/// over its paths, or knock it out. An Api keeps its claim while its prefix is unchanged and
/// its hosts are not widened.
pub fn compile_after(res: &Resources, previous: &[ApiConfig]) -> Compiled {
    let mut verdicts = Vec::new();

    let plans = compile_plans(&res.plans, &mut verdicts);
    let apis = compile_apis(&res.apis, &plans, previous, &mut verdicts);
    let apps = compile_applications(&res.applications, &mut verdicts);
    let secrets = index_secrets(&res.secrets);
    let clients = compile_subscriptions(
        &res.subscriptions,
        &Refs {
            plans: &plans,
            apis: &apis,
            apps: &apps,
            secrets: &secrets,
        },
        &mut verdicts,
    );

    let mut api_configs: Vec<ApiConfig> = apis
        .into_values()
        .filter_map(|s| s.ok().map(|a| a.config))
        .collect();
    api_configs.sort_by(|a, b| {
        b.path_prefix
            .len()
            .cmp(&a.path_prefix.len())
            .then_with(|| a.path_prefix.cmp(&b.path_prefix))
            .then_with(|| a.id.cmp(&b.id))
    });
    let mut plan_configs: Vec<PlanConfig> = plans
        .into_values()
        .filter_map(|s| s.ok().map(|p| p.config))
        .collect();
    plan_configs.sort_by(|a, b| a.id.cmp(&b.id));
    let mut client_configs = clients;
    client_configs.sort_by(|a, b| a.client_id.cmp(&b.client_id));

    let mut config = GatewayConfig {
        hash: String::new(),
        apis: api_configs,
        plans: plan_configs,
        clients: client_configs,
    };
    config.hash = config_hash(&config);

    // Stable: duplicates of one kind/namespace/name stay in age order.
    verdicts.sort_by(|a, b| (a.kind, &a.namespace, &a.name).cmp(&(b.kind, &b.namespace, &b.name)));
    Compiled { config, verdicts }
}

// ------------------------------------------------------------------------------------ helpers

/// One input resource with its identity, in processing (age) order.
struct Entry<'a, T> {
    item: &'a T,
    namespace: &'a str,
    name: &'a str,
}

type Key = (String, String);

fn namespace_of(meta: &ObjectMeta) -> &str {
    match meta.namespace.as_deref() {
        Some(ns) if !ns.is_empty() => ns,
        _ => DEFAULT_NAMESPACE,
    }
}

/// Sorts by age (creationTimestamp, unknown last), then namespace/name, then input order.
fn by_age<T: Resource>(items: &[T]) -> Vec<Entry<'_, T>> {
    let mut indexed: Vec<(usize, &T)> = items.iter().enumerate().collect();
    indexed.sort_by(|(ia, a), (ib, b)| {
        let (ma, mb) = (a.meta(), b.meta());
        let age = |t: Option<&Time>| (t.is_none(), t.cloned());
        age(ma.creation_timestamp.as_ref())
            .cmp(&age(mb.creation_timestamp.as_ref()))
            .then_with(|| namespace_of(ma).cmp(namespace_of(mb)))
            .then_with(|| {
                ma.name
                    .as_deref()
                    .unwrap_or("")
                    .cmp(mb.name.as_deref().unwrap_or(""))
            })
            .then_with(|| ia.cmp(ib))
    });
    indexed
        .into_iter()
        .map(|(_, item)| {
            let meta = item.meta();
            Entry {
                item,
                namespace: namespace_of(meta),
                name: meta.name.as_deref().unwrap_or(""),
            }
        })
        .collect()
}

fn key(namespace: &str, name: &str) -> Key {
    (namespace.to_string(), name.to_string())
}

fn verdict(
    kind: Kind,
    namespace: &str,
    name: &str,
    phase: Phase,
    reason: &str,
    message: String,
) -> Verdict {
    Verdict {
        kind,
        namespace: namespace.to_string(),
        name: name.to_string(),
        phase,
        reason: reason.to_string(),
        message,
        client_id: None,
    }
}

/// Problems found on one resource: the first reason wins, all messages are reported.
#[derive(Default)]
struct Issues(Vec<(&'static str, String)>);

impl Issues {
    fn push(&mut self, reason: &'static str, message: impl Into<String>) {
        self.0.push((reason, message.into()));
    }
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    fn reason(&self) -> &'static str {
        self.0.first().map(|(r, _)| *r).unwrap_or(reasons::ACTIVE)
    }
    fn message(&self) -> String {
        self.0
            .iter()
            .map(|(_, m)| m.as_str())
            .collect::<Vec<_>>()
            .join("; ")
    }
}

/// Checks the identity of an entry; returns a verdict when it cannot be compiled at all
/// (no name, or the same kind/namespace/name was already seen).
fn identity_problem<T>(kind: Kind, e: &Entry<'_, T>, seen: &mut BTreeSet<Key>) -> Option<Verdict>
where
    T: kube::core::object::HasSpec,
    T::Spec: serde::Serialize,
{
    if e.name.is_empty() {
        return Some(verdict(
            kind,
            e.namespace,
            e.name,
            Phase::Invalid,
            reasons::MISSING_NAME,
            format!(
                "{kind} in namespace {} has no metadata.name; give it a name",
                e.namespace
            ),
        ));
    }
    if !seen.insert(key(e.namespace, e.name)) {
        return Some(verdict(
            kind,
            e.namespace,
            e.name,
            Phase::Invalid,
            reasons::DUPLICATE_RESOURCE,
            format!(
                "{kind} {}/{} is defined more than once; this copy is ignored, remove one of them",
                e.namespace, e.name
            ),
        ));
    }
    let size = serde_json::to_vec(e.item.spec()).map_or(usize::MAX, |v| v.len());
    if size > MAX_SPEC_BYTES {
        return Some(verdict(
            kind,
            e.namespace,
            e.name,
            Phase::Invalid,
            reasons::TOO_LARGE,
            format!(
                "{kind} {}/{}: spec is {size} bytes as JSON, at most {MAX_SPEC_BYTES} are accepted; shorten its descriptions, names or lists",
                e.namespace, e.name
            ),
        ));
    }
    None
}

/// The largest spec a resource may have (as JSON). Every gateway gets the whole configuration
/// in one ConfigMap (at most 900 KiB compressed): unbounded, one tenant's Api with megabytes of
/// scope descriptions would stop publishing for every tenant.
pub const MAX_SPEC_BYTES: usize = 32 * 1024;

fn display_or_name(display: &str, name: &str) -> String {
    if display.trim().is_empty() {
        name.to_string()
    } else {
        display.to_string()
    }
}

fn dedup_keep_order<T: Clone + Ord>(items: &[T]) -> Vec<T> {
    let mut seen = BTreeSet::new();
    items
        .iter()
        .filter(|i| seen.insert((*i).clone()))
        .cloned()
        .collect()
}

fn grant_list(grants: &[GrantType]) -> String {
    grants
        .iter()
        .map(|g| g.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

// ------------------------------------------------------------------------------------ plans

/// Rate limits per plan. Every limit is a key the gateway's Redis script reads and writes for
/// each request; the bound keeps a batch of requests (64) well inside the Lua stack (8,000
/// values), and no real plan needs more windows than second..year.
pub const MAX_RATE_LIMITS: usize = 16;

struct PlanOk {
    config: PlanConfig,
    requires_approval: bool,
}

/// What a resource compiled to: Ok, or the message of its Invalid verdict.
type State<T> = Result<T, String>;

fn compile_plans(plans: &[Plan], verdicts: &mut Vec<Verdict>) -> BTreeMap<Key, State<PlanOk>> {
    let mut out = BTreeMap::new();
    let mut seen = BTreeSet::new();
    for e in by_age(plans) {
        if let Some(v) = identity_problem(Kind::Plan, &e, &mut seen) {
            verdicts.push(v);
            continue;
        }
        let spec = &e.item.spec;
        let mut issues = Issues::default();
        if spec.rate_limits.len() > MAX_RATE_LIMITS {
            issues.push(
                reasons::INVALID_RATE_LIMIT,
                format!(
                    "spec.rateLimits has {} entries; a plan may have at most {MAX_RATE_LIMITS}",
                    spec.rate_limits.len()
                ),
            );
        }
        for (i, limit) in spec.rate_limits.iter().enumerate() {
            if limit.requests < 1 {
                issues.push(
                    reasons::INVALID_RATE_LIMIT,
                    format!(
                        "spec.rateLimits[{i}].requests is {}; it must be at least 1 (remove the entry for no limit)",
                        limit.requests
                    ),
                );
            }
        }
        let id = format!("{}/{}", e.namespace, e.name);
        let v = if issues.is_empty() {
            let message = if spec.rate_limits.is_empty() {
                format!("plan {id} is valid (no rate limits: unlimited)")
            } else {
                format!(
                    "plan {id} is valid ({} rate limits)",
                    spec.rate_limits.len()
                )
            };
            out.insert(
                key(e.namespace, e.name),
                Ok(PlanOk {
                    config: PlanConfig {
                        id,
                        name: e.name.to_string(),
                        display_name: display_or_name(&spec.display_name, e.name),
                        rate_limits: spec
                            .rate_limits
                            .iter()
                            .map(|l| RateLimitConfig {
                                requests: l.requests,
                                per_seconds: l.per.seconds(),
                                key: l.key,
                            })
                            .collect(),
                        fail_open: spec.fail_open,
                    },
                    requires_approval: spec.requires_approval,
                }),
            );
            verdict(
                Kind::Plan,
                e.namespace,
                e.name,
                Phase::Active,
                reasons::ACTIVE,
                message,
            )
        } else {
            out.insert(key(e.namespace, e.name), Err(issues.message()));
            verdict(
                Kind::Plan,
                e.namespace,
                e.name,
                Phase::Invalid,
                issues.reason(),
                issues.message(),
            )
        };
        verdicts.push(v);
    }
    out
}

// ------------------------------------------------------------------------------------ apis

struct ApiOk {
    config: ApiConfig,
    /// Plan names offered (deduplicated).
    plans: Vec<String>,
}

/// Checks a pathPrefix; `Err` is a sentence for a person.
pub fn check_path_prefix(prefix: &str) -> Result<(), String> {
    if prefix.is_empty() {
        return Err("spec.pathPrefix is empty; use e.g. /mobile".to_string());
    }
    if !prefix.starts_with('/') {
        return Err(format!(
            "spec.pathPrefix {prefix:?} must start with '/', e.g. /{prefix}"
        ));
    }
    if let Some(c) = prefix
        .chars()
        // '%', ';' and '\' would not survive the normalization routing compares against
        // (escapes decoded, ';parameters' cut, '\' read as '/'): no request could reach the Api.
        .find(|c| matches!(c, '?' | '#' | '%' | ';' | '\\') || c.is_whitespace() || c.is_control())
    {
        return Err(format!(
            "spec.pathPrefix {prefix:?} must not contain {c:?}; use a plain path such as /mobile"
        ));
    }
    if prefix == "/" {
        return Ok(());
    }
    if prefix.ends_with('/') {
        return Err(format!(
            "spec.pathPrefix {prefix:?} must not end with '/'; use {:?}",
            prefix.trim_end_matches('/')
        ));
    }
    for segment in prefix[1..].split('/') {
        match segment {
            "" => {
                return Err(format!(
                    "spec.pathPrefix {prefix:?} contains an empty segment ('//'); remove it"
                ));
            }
            "." | ".." => {
                return Err(format!(
                    "spec.pathPrefix {prefix:?} contains a {segment:?} segment; use a plain path such as /mobile"
                ));
            }
            _ => {}
        }
    }
    let first = prefix[1..].split('/').next().unwrap_or("");
    if let Some(reserved) = RESERVED_PREFIXES
        .iter()
        .find(|r| r[1..].eq_ignore_ascii_case(first))
    {
        return Err(format!(
            "spec.pathPrefix {prefix:?} is under {reserved}, which the gateway itself serves (OAuth endpoints and login pages); choose another prefix"
        ));
    }
    Ok(())
}

/// Paths the gateway serves itself; an Api below them would never see a request.
pub const RESERVED_PREFIXES: &[&str] = &[
    "/oauth2",
    "/login",
    "/signup",
    "/consent",
    "/logout",
    "/.well-known",
];

/// The URL as messages and logs may show it: user info (a password, perhaps) replaced by `***`.
/// Works on text that does not parse as a URL too (an error message quotes what was given).
pub fn without_user_info(raw: &str) -> String {
    if let Some(scheme_end) = raw.find("://") {
        let rest = &raw[scheme_end + 3..];
        let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        if let Some(at) = rest[..authority_end].rfind('@') {
            return format!("{}***{}", &raw[..scheme_end + 3], &rest[at..]);
        }
    }
    raw.to_string()
}

/// Link-local addresses and the clouds' instance-metadata and platform endpoints: an upstream
/// there would hand the node's or pod's cloud credentials (169.254.169.254 and others) to
/// anyone holding a token for the Api. The gateway also refuses a host name that resolves to
/// one. Loopback and private ranges stay allowed: cluster services and the standalone demo
/// live there. Pure.
pub fn is_metadata_ip(ip: IpAddr) -> bool {
    let v4 = |ip: Ipv4Addr| {
        ip.is_link_local()
            || [
                Ipv4Addr::new(100, 100, 100, 200), // Alibaba Cloud
                Ipv4Addr::new(168, 63, 129, 16),   // Azure WireServer
                Ipv4Addr::new(192, 0, 0, 192),     // Oracle Cloud
            ]
            .contains(&ip)
    };
    match ip {
        IpAddr::V4(ip) => v4(ip),
        IpAddr::V6(ip) => {
            let s = ip.segments();
            // An IPv4 address inside: mapped (::ffff:a.b.c.d), compatible (::a.b.c.d) or NAT64
            // (64:ff9b::a.b.c.d, which DNS64 synthesizes from an A record).
            let embedded = ip.to_ipv4().or_else(|| {
                (s[..6] == [0x64, 0xff9b, 0, 0, 0, 0]).then(|| {
                    let o = ip.octets();
                    Ipv4Addr::new(o[12], o[13], o[14], o[15])
                })
            });
            (s[0] & 0xffc0) == 0xfe80 // link-local
                || s[..4] == [0xfd00, 0x0ec2, 0, 0] // AWS: instance metadata, EKS Pod Identity
                || ip == Ipv6Addr::new(0xfd20, 0xce, 0, 0, 0, 0, 0, 0x254) // GCP
                || ip == Ipv6Addr::new(0xfd00, 0xc1, 0, 0, 0, 0, 0xa9fe, 0xa9fe) // Oracle Cloud
                || embedded.is_some_and(v4)
        }
    }
}

fn metadata_refusal(shown: &str, ip: &str) -> String {
    format!(
        "spec.upstream.url {shown:?}: {ip} is a link-local or cloud instance-metadata address, which the gateway never proxies to (it would expose the node's cloud credentials); use the backend's Service name"
    )
}

/// Longest upstream URL accepted; the gateway's HTTP stack refuses URIs over 64 KiB.
const MAX_UPSTREAM_URL: usize = 2048;

/// Normalizes an upstream base URL (no trailing slash); `Err` is a sentence for a person.
pub fn normalize_upstream_url(raw: &str) -> Result<String, String> {
    let shown = without_user_info(raw);
    if raw.len() > MAX_UPSTREAM_URL {
        return Err(format!(
            "spec.upstream.url is {} characters long; at most {MAX_UPSTREAM_URL} are accepted",
            raw.len()
        ));
    }
    let url = Url::parse(raw).map_err(|e| {
        format!(
            "spec.upstream.url {shown:?} is not an absolute URL ({e}); use e.g. http://backend.namespace.svc:8080"
        )
    })?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!(
            "spec.upstream.url {shown:?} must use http or https, not {}",
            url.scheme()
        ));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(format!(
            "spec.upstream.url {shown:?} must not contain user info (user:password@); remove it"
        ));
    }
    match url.host() {
        None => return Err(format!("spec.upstream.url {shown:?} has no host")),
        // The URL standard lets some characters through in host names that HTTP does not.
        Some(url::Host::Domain(d))
            if d.is_empty()
                || !d
                    .bytes()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_')) =>
        {
            return Err(format!(
                "spec.upstream.url {shown:?}: the host {d:?} may only use letters, digits, '-', '.' and '_'"
            ));
        }
        Some(Host::Ipv4(ip)) if is_metadata_ip(IpAddr::V4(ip)) => {
            return Err(metadata_refusal(&shown, &ip.to_string()));
        }
        Some(Host::Ipv6(ip)) if is_metadata_ip(IpAddr::V6(ip)) => {
            return Err(metadata_refusal(&shown, &ip.to_string()));
        }
        Some(_) => {}
    }
    if url.query().is_some() {
        return Err(format!(
            "spec.upstream.url {shown:?} must not contain a query (?...); remove it"
        ));
    }
    if url.fragment().is_some() {
        return Err(format!(
            "spec.upstream.url {shown:?} must not contain a fragment (#...); remove it"
        ));
    }
    let mut s = url.to_string();
    while s.ends_with('/') {
        s.pop();
    }
    Ok(s)
}

/// Lower-cases a Host match entry and strips its port; `Err` is a sentence for a person.
pub fn normalize_host(raw: &str) -> Result<String, String> {
    let bad = |why: &str| {
        Err(format!(
            "spec.hosts entry {raw:?} is not a valid host name ({why}); use e.g. api.example.com"
        ))
    };
    let lower = raw.to_ascii_lowercase();
    if lower.is_empty() {
        return bad("empty");
    }
    let valid_port = |p: &str| {
        !p.is_empty()
            && p.len() <= 5
            && p.bytes().all(|b| b.is_ascii_digit())
            && p.parse::<u16>().is_ok()
    };
    if let Some(rest) = lower.strip_prefix('[') {
        let Some((addr, after)) = rest.split_once(']') else {
            return bad("unterminated '['");
        };
        if addr.parse::<Ipv6Addr>().is_err() {
            return bad("not an IPv6 address");
        }
        if !after.is_empty() && !after.strip_prefix(':').is_some_and(valid_port) {
            return bad("invalid port");
        }
        return Ok(format!("[{addr}]"));
    }
    let host = match lower.rsplit_once(':') {
        Some((h, port)) => {
            if !valid_port(port) {
                return bad("invalid port");
            }
            h
        }
        None => lower.as_str(),
    };
    if host.is_empty() || host.len() > 253 {
        return bad("length");
    }
    for label in host.split('.') {
        if label.is_empty() || label.len() > 63 {
            return bad("empty or too long label");
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return bad("only letters, digits, '-' and '.' are allowed");
        }
        if label.starts_with('-') || label.ends_with('-') {
            return bad("a label starts or ends with '-'");
        }
    }
    Ok(host.to_string())
}

/// The longest token lifetime an Api may set: expiry times stay far from overflowing, and
/// Redis takes them as `EX` seconds.
pub const MAX_TOKEN_TTL_SECS: u64 = 10 * 365 * 86_400;
/// The longest upstream timeout: the gateway adds it to the instant a request arrived.
pub const MAX_UPSTREAM_TIMEOUT_SECS: u64 = 86_400;

/// An Api's hold on a path prefix (lower-cased), for `nested_claim`.
struct Claim {
    prefix: String,
    namespace: String,
    id: String,
    /// Normalized; empty: every host.
    hosts: Vec<String>,
    /// Served like this in the previous configuration (`holds_claim`).
    held: bool,
}

/// Would one of two Apis in different namespaces take requests meant for the other? The gateway
/// routes to the longest matching prefix, so an Api under `/shop/cart` in one namespace would
/// receive (and answer, and rate-limit) requests the owner of `/shop` in another namespace
/// expects. Refused either way round: a newer `/shop` would get a hole it did not ask for.
/// Within one namespace nesting is the owner's choice; across namespaces only Apis on disjoint
/// hosts may nest. Compared lower-cased, like the gateway's case check. Two Apis served together
/// before (by a version without this rule) go on being served until one of them changes its
/// prefix or widens its hosts: refusing one at an upgrade would take a working Api down. Pure.
fn nested_claim(kept: &Claim, new: &Claim) -> bool {
    // As `routing::prefix_matches`: "/" covers every path.
    let nested = |outer: &str, inner: &str| {
        outer == "/"
            || inner
                .strip_prefix(outer)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
    };
    let hosts_overlap = kept.hosts.is_empty()
        || new.hosts.is_empty()
        || kept.hosts.iter().any(|h| new.hosts.contains(h));
    kept.namespace != new.namespace
        && !(kept.held && new.held)
        && hosts_overlap
        && (nested(&kept.prefix, &new.prefix) || nested(&new.prefix, &kept.prefix))
}

/// Did `previous` serve this Api's prefix on (at least) these hosts? Prefixes compared
/// lower-cased; `hosts` normalized (lower-cased, no port); empty hosts mean every host.
fn holds_claim(previous: &[ApiConfig], id: &str, prefix: &str, hosts: &[String]) -> bool {
    previous.iter().any(|p| {
        p.id == id
            && p.path_prefix.eq_ignore_ascii_case(prefix)
            && (p.hosts.is_empty()
                || (!hosts.is_empty() && hosts.iter().all(|h| p.hosts.contains(h))))
    })
}

fn compile_apis(
    apis: &[Api],
    plans: &BTreeMap<Key, State<PlanOk>>,
    previous: &[ApiConfig],
    verdicts: &mut Vec<Verdict>,
) -> BTreeMap<Key, State<ApiOk>> {
    let mut out = BTreeMap::new();
    let mut seen = BTreeSet::new();
    // pathPrefix (lower-cased) -> the Api (namespace/name) holding it; an Api that served it in
    // `previous` keeps it, else the oldest syntactically valid claim wins. Lower-cased: the
    // gateway refuses a path two prefixes claim ignoring case (a case-insensitive backend would
    // read it as either), so a newer `/Shop` would otherwise make every request to an older
    // `/shop` fail.
    let mut prefixes: HashMap<String, String> = HashMap::new();
    // Every claim, for the nesting rule across namespaces (`nested_claim`).
    let mut claims: Vec<Claim> = Vec::new();
    let mut entries: Vec<_> = by_age(apis)
        .into_iter()
        .map(|e| {
            let id = format!("{}/{}", e.namespace, e.name);
            let mut hosts = Vec::new();
            let mut bad_hosts = Vec::new();
            for h in &e.item.spec.hosts {
                match normalize_host(h) {
                    Ok(h) if !hosts.contains(&h) => hosts.push(h),
                    Ok(_) => {}
                    Err(m) => bad_hosts.push(m),
                }
            }
            let held = holds_claim(previous, &id, &e.item.spec.path_prefix, &hosts);
            (e, id, hosts, bad_hosts, held)
        })
        .collect();
    // Stable: incumbents first, each group by age.
    entries.sort_by_key(|(.., held)| !held);
    for (e, id, hosts, bad_hosts, held) in entries {
        if let Some(v) = identity_problem(Kind::Api, &e, &mut seen) {
            verdicts.push(v);
            continue;
        }
        let spec = &e.item.spec;
        let mut issues = Issues::default();
        for m in bad_hosts {
            issues.push(reasons::INVALID_HOST, m);
        }

        match check_path_prefix(&spec.path_prefix) {
            Err(m) => issues.push(reasons::INVALID_PATH_PREFIX, m),
            Ok(()) => {
                let claim = Claim {
                    prefix: spec.path_prefix.to_ascii_lowercase(),
                    namespace: e.namespace.to_string(),
                    id: id.clone(),
                    hosts: hosts.clone(),
                    held,
                };
                if let Some(holder) = prefixes.get(&claim.prefix) {
                    issues.push(
                        reasons::PATH_PREFIX_CONFLICT,
                        format!(
                            "spec.pathPrefix {} is already used by the Api {holder}, which keeps it (it served it first, or is older); choose another pathPrefix or delete one of the two Apis",
                            spec.path_prefix
                        ),
                    );
                } else if let Some(kept) = claims.iter().find(|c| nested_claim(c, &claim)) {
                    issues.push(
                        reasons::PATH_PREFIX_CONFLICT,
                        format!(
                            "spec.pathPrefix {} and the pathPrefix {} of the Api {} (another namespace, which keeps it: it served it first, or is older) contain one another and their spec.hosts overlap, so one namespace's Api would receive requests meant for the other's; choose a pathPrefix outside {}, give both Apis spec.hosts that share no host, or put both Apis in one namespace",
                            spec.path_prefix, kept.prefix, kept.id, kept.prefix
                        ),
                    );
                } else {
                    prefixes.insert(claim.prefix.clone(), id.clone());
                    claims.push(claim);
                }
            }
        }

        let upstream_url = match normalize_upstream_url(&spec.upstream.url) {
            Ok(u) => u,
            Err(m) => {
                issues.push(reasons::INVALID_UPSTREAM, m);
                String::new()
            }
        };
        if !(1..=MAX_UPSTREAM_TIMEOUT_SECS).contains(&spec.upstream.timeout_seconds) {
            issues.push(
                reasons::INVALID_UPSTREAM,
                format!(
                    "spec.upstream.timeoutSeconds must be between 1 and {MAX_UPSTREAM_TIMEOUT_SECS} (one day)"
                ),
            );
        }

        let plan_names = dedup_keep_order(&spec.plans);
        let missing: Vec<&str> = plan_names
            .iter()
            .filter(|p| !plans.contains_key(&key(e.namespace, p)))
            .map(String::as_str)
            .collect();
        if !missing.is_empty() {
            let (noun, verb) = if missing.len() == 1 {
                ("plan", "does")
            } else {
                ("plans", "do")
            };
            issues.push(
                reasons::DANGLING_REFERENCE,
                format!(
                    "spec.plans names {noun} {}, which {verb} not exist in namespace {}; create the Plan or remove it from spec.plans",
                    missing.join(", "),
                    e.namespace
                ),
            );
        }

        let auth = &spec.auth;
        let mut grants = dedup_keep_order(&auth.grants);
        grants.sort();
        if grants.is_empty() {
            issues.push(
                reasons::INVALID_GRANTS,
                "spec.auth.grants is empty; list at least one of authorization_code, client_credentials",
            );
        } else if grants.contains(&GrantType::RefreshToken)
            && !grants.contains(&GrantType::AuthorizationCode)
        {
            issues.push(
                reasons::INVALID_GRANTS,
                "spec.auth.grants has refresh_token without authorization_code; refresh tokens are only issued by the authorization code flow, add authorization_code or remove refresh_token",
            );
        }

        let mut scope_names = BTreeSet::new();
        for (i, s) in auth.scopes.iter().enumerate() {
            if !is_valid_scope_token(&s.name) {
                issues.push(
                    reasons::INVALID_SCOPE,
                    format!(
                        "spec.auth.scopes[{i}].name {:?} is not a valid scope (RFC 6749: non-empty, printable ASCII without space, '\"' or '\\'); use e.g. orders:read",
                        s.name
                    ),
                );
            } else if !scope_names.insert(s.name.as_str()) {
                issues.push(
                    reasons::INVALID_SCOPE,
                    format!(
                        "spec.auth.scopes lists {:?} more than once; remove the duplicate",
                        s.name
                    ),
                );
            }
        }

        for (field, ttl, default) in [
            ("accessTokenTtlSeconds", auth.access_token_ttl_seconds, 3600),
            (
                "refreshTokenTtlSeconds",
                auth.refresh_token_ttl_seconds,
                2_592_000,
            ),
        ] {
            if !(1..=MAX_TOKEN_TTL_SECS).contains(&ttl) {
                issues.push(
                    reasons::INVALID_TTL,
                    format!(
                        "spec.auth.{field} must be between 1 and {MAX_TOKEN_TTL_SECS} (ten years; default {default})"
                    ),
                );
            }
        }

        let v = if issues.is_empty() {
            let message = format!("serving {} from {upstream_url}", spec.path_prefix);
            out.insert(
                key(e.namespace, e.name),
                Ok(ApiOk {
                    config: ApiConfig {
                        id,
                        display_name: display_or_name(&spec.display_name, e.name),
                        path_prefix: spec.path_prefix.clone(),
                        hosts,
                        upstream: UpstreamConfig {
                            url: upstream_url,
                            strip_prefix: spec.upstream.strip_prefix,
                            timeout_seconds: spec.upstream.timeout_seconds,
                        },
                        grants,
                        scopes: auth
                            .scopes
                            .iter()
                            .map(|s| ScopeConfig {
                                name: s.name.clone(),
                                description: s.description.clone(),
                            })
                            .collect(),
                        access_token_ttl_seconds: auth.access_token_ttl_seconds,
                        refresh_token_ttl_seconds: auth.refresh_token_ttl_seconds,
                    },
                    plans: plan_names,
                }),
            );
            verdict(
                Kind::Api,
                e.namespace,
                e.name,
                Phase::Active,
                reasons::ACTIVE,
                message,
            )
        } else {
            out.insert(key(e.namespace, e.name), Err(issues.message()));
            verdict(
                Kind::Api,
                e.namespace,
                e.name,
                Phase::Invalid,
                issues.reason(),
                issues.message(),
            )
        };
        verdicts.push(v);
    }
    out
}

// ------------------------------------------------------------------------------------ applications

struct AppOk {
    display_name: String,
    client_type: ClientType,
    /// Deduplicated, original order.
    redirect_uris: Vec<String>,
}

fn compile_applications(
    apps: &[Application],
    verdicts: &mut Vec<Verdict>,
) -> BTreeMap<Key, State<AppOk>> {
    let mut out = BTreeMap::new();
    let mut seen = BTreeSet::new();
    for e in by_age(apps) {
        if let Some(v) = identity_problem(Kind::Application, &e, &mut seen) {
            verdicts.push(v);
            continue;
        }
        let spec = &e.item.spec;
        let mut issues = Issues::default();
        for (i, uri) in spec.redirect_uris.iter().enumerate() {
            if let Err(m) = validate_redirect_uri(uri) {
                issues.push(
                    reasons::INVALID_REDIRECT_URI,
                    format!("spec.redirectUris[{i}]: {m}"),
                );
            }
        }
        let v = if issues.is_empty() {
            let redirect_uris = dedup_keep_order(&spec.redirect_uris);
            let kind = match spec.client_type {
                ClientType::Public => "public",
                ClientType::Confidential => "confidential",
            };
            let message = format!(
                "application {}/{} is valid ({kind} client, {} redirect URIs)",
                e.namespace,
                e.name,
                redirect_uris.len()
            );
            out.insert(
                key(e.namespace, e.name),
                Ok(AppOk {
                    display_name: display_or_name(&spec.display_name, e.name),
                    client_type: spec.client_type,
                    redirect_uris,
                }),
            );
            verdict(
                Kind::Application,
                e.namespace,
                e.name,
                Phase::Active,
                reasons::ACTIVE,
                message,
            )
        } else {
            out.insert(key(e.namespace, e.name), Err(issues.message()));
            verdict(
                Kind::Application,
                e.namespace,
                e.name,
                Phase::Invalid,
                issues.reason(),
                issues.message(),
            )
        };
        verdicts.push(v);
    }
    out
}

// ------------------------------------------------------------------------------------ secrets

/// A Secret's values (`stringData` overrides `data` like the API server does), whether it is
/// labelled for use by `spec.clientSecretRef`, and the Subscription controlling it.
struct SecretValues {
    values: BTreeMap<String, Vec<u8>>,
    opted_in: bool,
    controller: Option<String>,
    uid: Option<String>,
}

/// (namespace, name) -> the Secret's values.
type SecretIndex = BTreeMap<Key, SecretValues>;

fn index_secrets(secrets: &[Secret]) -> SecretIndex {
    let mut out = SecretIndex::new();
    for e in by_age(secrets) {
        if e.name.is_empty() {
            continue;
        }
        let k = key(e.namespace, e.name);
        if out.contains_key(&k) {
            continue; // the older one wins, as everywhere else
        }
        let mut values: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        for (name, value) in e.item.data.iter().flatten() {
            values.insert(name.clone(), value.0.clone());
        }
        for (name, value) in e.item.string_data.iter().flatten() {
            values.insert(name.clone(), value.as_bytes().to_vec());
        }
        let meta = &e.item.metadata;
        out.insert(
            k,
            SecretValues {
                values,
                opted_in: opted_in(meta),
                controller: controlling_subscription(meta).map(str::to_string),
                uid: meta.uid.clone().filter(|u| !u.is_empty()),
            },
        );
    }
    out
}

// ------------------------------------------------------------------------------------ subscriptions

struct Refs<'a> {
    plans: &'a BTreeMap<Key, State<PlanOk>>,
    apis: &'a BTreeMap<Key, State<ApiOk>>,
    apps: &'a BTreeMap<Key, State<AppOk>>,
    secrets: &'a SecretIndex,
}

fn compile_subscriptions(
    subs: &[Subscription],
    refs: &Refs<'_>,
    verdicts: &mut Vec<Verdict>,
) -> Vec<ClientConfig> {
    let mut clients = Vec::new();
    let mut seen = BTreeSet::new();
    // client_id -> "namespace/name" of the subscription holding it.
    let mut client_ids: HashMap<String, String> = HashMap::new();
    // (namespace, application, api) -> "namespace/name" of the subscription holding the pair.
    let mut pairs: HashMap<(String, String, String), String> = HashMap::new();

    for e in by_age(subs) {
        if let Some(v) = identity_problem(Kind::Subscription, &e, &mut seen) {
            verdicts.push(v);
            continue;
        }
        let sub = e.item;
        let spec = &sub.spec;
        let ns = e.namespace;
        let id = format!("{ns}/{}", e.name);
        let mut issues = Issues::default();

        // Claims first, so they depend only on age, not on the validity of anything else.
        let pair = (ns.to_string(), spec.application.clone(), spec.api.clone());
        if let Some(holder) = pairs.get(&pair) {
            issues.push(
                reasons::DUPLICATE_SUBSCRIPTION,
                format!(
                    "application {} already subscribes to api {} through the older subscription {holder}; change the plan there instead, or delete one of the two",
                    spec.application, spec.api
                ),
            );
        } else {
            pairs.insert(pair, id.clone());
        }

        let client_id = spec
            .client_id
            .clone()
            .or_else(|| sub.status.as_ref().and_then(|s| s.client_id.clone()))
            .unwrap_or_else(|| e.name.to_string());
        let mut holds_client_id = false;
        if !is_valid_client_id(&client_id) {
            issues.push(
                reasons::INVALID_CLIENT_ID,
                format!(
                    "client_id {client_id:?} is not valid: use 1 to 128 characters from A-Z a-z 0-9 . _ ~ - (set spec.clientId)"
                ),
            );
        } else if let Some(holder) = client_ids.get(&client_id) {
            issues.push(
                reasons::CLIENT_ID_CONFLICT,
                format!(
                    "client_id {client_id} is already used by the older subscription {holder}; set a different spec.clientId"
                ),
            );
        } else {
            client_ids.insert(client_id.clone(), id.clone());
            holds_client_id = true;
        }

        let client = check_subscription(e.namespace, e.name, sub, &client_id, refs, &mut issues);

        let mut v = match client {
            Some((client, requires_approval)) if issues.is_empty() => {
                let approved = sub
                    .metadata
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get(APPROVED_ANNOTATION))
                    .is_some_and(|v| v == "true");
                if requires_approval && !approved {
                    verdict(
                        Kind::Subscription,
                        ns,
                        e.name,
                        Phase::PendingApproval,
                        reasons::AWAITING_APPROVAL,
                        format!(
                            "plan {} requires approval; an administrator approves this subscription with: kubectl annotate subscriptions.gatehouse.dev {} -n {ns} {APPROVED_ANNOTATION}=true --overwrite",
                            spec.plan, e.name
                        ),
                    )
                } else {
                    let message = format!(
                        "client {client_id} is active on api {} with plan {} (grants: {})",
                        spec.api,
                        spec.plan,
                        grant_list(&client.grants)
                    );
                    clients.push(client);
                    verdict(
                        Kind::Subscription,
                        ns,
                        e.name,
                        Phase::Active,
                        reasons::ACTIVE,
                        message,
                    )
                }
            }
            _ => verdict(
                Kind::Subscription,
                ns,
                e.name,
                Phase::Invalid,
                issues.reason(),
                issues.message(),
            ),
        };
        if holds_client_id {
            v.client_id = Some(client_id);
        }
        verdicts.push(v);
    }
    clients
}

/// Checks references, grants, redirect URIs and the client secret. Returns the client (and
/// whether its plan requires approval) when the references resolve; problems go to `issues`.
fn check_subscription(
    ns: &str,
    name: &str,
    sub: &Subscription,
    client_id: &str,
    refs: &Refs<'_>,
    issues: &mut Issues,
) -> Option<(ClientConfig, bool)> {
    let spec = &sub.spec;

    // References: report every one that is missing or invalid.
    let mut dangling = Vec::new();
    let mut invalid = Vec::new();
    fn resolve<'a, T>(
        what: &str,
        target: &str,
        ns: &str,
        map: &'a BTreeMap<Key, State<T>>,
        dangling: &mut Vec<String>,
        invalid: &mut Vec<String>,
    ) -> Option<&'a T> {
        match map.get(&key(ns, target)) {
            None => {
                dangling.push(format!(
                    "{what} {target} does not exist in namespace {ns} (spec.{what}); create it or fix the name"
                ));
                None
            }
            Some(Err(m)) => {
                invalid.push(format!("{what} {target} is Invalid: {m}"));
                None
            }
            Some(Ok(t)) => Some(t),
        }
    }
    let app = resolve(
        "application",
        &spec.application,
        ns,
        refs.apps,
        &mut dangling,
        &mut invalid,
    );
    let api = resolve("api", &spec.api, ns, refs.apis, &mut dangling, &mut invalid);
    let plan = resolve(
        "plan",
        &spec.plan,
        ns,
        refs.plans,
        &mut dangling,
        &mut invalid,
    );
    for m in dangling {
        issues.push(reasons::DANGLING_REFERENCE, m);
    }
    for m in invalid {
        issues.push(reasons::INVALID_REFERENCE, m);
    }
    let (app, api, plan) = (app?, api?, plan?);

    if !api.plans.iter().any(|p| p == &spec.plan) {
        issues.push(
            reasons::PLAN_NOT_OFFERED,
            format!(
                "plan {} is not offered by api {} (its spec.plans: {}); pick one of those or add {} to the Api's spec.plans",
                spec.plan,
                spec.api,
                if api.plans.is_empty() { "none".to_string() } else { api.plans.join(", ") },
                spec.plan
            ),
        );
    }

    let public = app.client_type == ClientType::Public;
    let api_grants = &api.config.grants;
    let mut grants: Vec<GrantType> = match &spec.grants {
        Some(requested) => {
            let requested = dedup_keep_order(requested);
            for g in &requested {
                if !api_grants.contains(g) {
                    issues.push(
                        reasons::GRANT_NOT_ALLOWED,
                        format!(
                            "spec.grants asks for {}, which api {} does not enable (its grants: {}); remove it or add it to the Api's spec.auth.grants",
                            g.as_str(),
                            spec.api,
                            grant_list(api_grants)
                        ),
                    );
                }
            }
            if public && requested.contains(&GrantType::ClientCredentials) {
                issues.push(
                    reasons::PUBLIC_CLIENT_CREDENTIALS,
                    format!(
                        "spec.grants asks for client_credentials, but application {} is a public client (no secret); remove client_credentials or make the application confidential",
                        spec.application
                    ),
                );
            }
            if requested.contains(&GrantType::RefreshToken)
                && !requested.contains(&GrantType::AuthorizationCode)
            {
                issues.push(
                    reasons::INVALID_GRANTS,
                    "spec.grants has refresh_token without authorization_code; refresh tokens are only issued by the authorization code flow, add authorization_code or remove refresh_token",
                );
            }
            requested
        }
        None => api_grants
            .iter()
            .copied()
            .filter(|g| !(public && *g == GrantType::ClientCredentials))
            .collect(),
    };
    grants.sort();
    if grants.is_empty() {
        issues.push(
            reasons::NO_GRANTS,
            format!(
                "subscription {ns}/{name} ends up with no grants (api {} enables: {}); set spec.grants to a non-empty subset",
                spec.api,
                grant_list(api_grants)
            ),
        );
    }
    if grants.contains(&GrantType::AuthorizationCode) && app.redirect_uris.is_empty() {
        issues.push(
            reasons::NO_REDIRECT_URIS,
            format!(
                "the authorization_code grant needs a redirect URI, but application {} has no spec.redirectUris; add one, or set spec.grants to [client_credentials] on this subscription",
                spec.application
            ),
        );
    }

    let secret_sha256 = match app.client_type {
        ClientType::Public => None,
        ClientType::Confidential => client_secret(ns, name, sub, refs.secrets, issues),
    };

    let client = ClientConfig {
        client_id: client_id.to_string(),
        subscription: format!("{ns}/{name}"),
        application: format!("{ns}/{}", spec.application),
        application_name: app.display_name.clone(),
        api: api.config.id.clone(),
        plan: plan.config.id.clone(),
        client_type: app.client_type,
        secret_sha256,
        redirect_uris: app.redirect_uris.clone(),
        trusted: spec.trusted,
        grants,
    };
    Some((client, plan.requires_approval))
}

/// SHA-256 (hex) of a confidential client's secret, or an issue when it cannot be found.
fn client_secret(
    ns: &str,
    name: &str,
    sub: &Subscription,
    secrets: &SecretIndex,
    issues: &mut Issues,
) -> Option<String> {
    if sub.spec.client_secret_ref.is_none() {
        // Caught here, with a status the user can read, rather than as the API server's
        // refusal of the Secret the operator would try to create.
        let generated = generated_secret_name(name);
        if generated.len() > MAX_OBJECT_NAME {
            let suffix = generated.len() - name.len();
            issues.push(
                reasons::MISSING_CLIENT_SECRET,
                format!(
                    "the operator would generate this client's secret in Secret {generated}, which is {} characters long, but Kubernetes names are at most {MAX_OBJECT_NAME}: shorten the subscription's name to at most {} characters or point spec.clientSecretRef at an existing Secret",
                    generated.len(),
                    MAX_OBJECT_NAME - suffix,
                ),
            );
            return None;
        }
    }
    let (reference, field) = match (
        &sub.spec.client_secret_ref,
        sub.status
            .as_ref()
            .and_then(|s| s.credentials_secret.clone()),
    ) {
        (Some(r), _) => (r.clone(), "spec.clientSecretRef"),
        (None, Some(generated)) => (
            SecretKeyRef {
                name: generated,
                key: GENERATED_SECRET_KEY.to_string(),
            },
            "status.credentialsSecret",
        ),
        (None, None) => {
            let secret = format!("{name}-client-secret");
            issues.push(
                reasons::MISSING_CLIENT_SECRET,
                format!(
                    "application {} is confidential, so this subscription needs a client secret: create a Secret (kubectl create secret generic {secret} -n {ns} --from-literal=clientSecret=$(openssl rand -hex 32) && kubectl label secret {secret} -n {ns} {CLIENT_SECRET_LABEL}=true) and point spec.clientSecretRef at it, or let the gatehouse operator generate one",
                    sub.spec.application,
                ),
            );
            return None;
        }
    };
    // Usable: the Secret the operator generated for this subscription (controlled by it, and
    // the very object whose uid the operator recorded when it created it), or, named by
    // spec.clientSecretRef, one labelled for it. Never a Secret that merely has the generated
    // name: following "remove spec.clientSecretRef" would otherwise adopt whatever sits there
    // (the well-known demo secret, another workload's credentials). Nor one that merely claims
    // to be owned: anyone allowed to create Secrets can write an ownerReference naming this
    // subscription's uid (readable by all who can list Subscriptions), for example while it
    // waits for approval, and would choose its client secret.
    let uid = sub.metadata.uid.as_deref().unwrap_or_default();
    let recorded = sub
        .status
        .as_ref()
        .and_then(|s| s.credentials_secret_uid.as_deref())
        .unwrap_or_default();
    let by_ref = sub.spec.client_secret_ref.is_some();
    let usable = |s: &&SecretValues| {
        let generated = !uid.is_empty()
            && s.controller.as_deref() == Some(uid)
            && !recorded.is_empty()
            && s.uid.as_deref() == Some(recorded);
        generated || (by_ref && s.opted_in)
    };
    // One message for a Secret that is missing and one that is not usable, and nothing about
    // the keys or the length of an unusable one: the status must not tell a Subscription's
    // author what Secrets they cannot read hold.
    let Some(SecretValues { values, .. }) = secrets.get(&key(ns, &reference.name)).filter(usable)
    else {
        let message = if by_ref {
            format!(
                "Secret {} named by {field} does not exist in namespace {ns} as an Opaque Secret labelled {CLIENT_SECRET_LABEL}=true; create it (kubectl create secret generic {} -n {ns} --from-literal={}=$(openssl rand -hex 32) && kubectl label secret {} -n {ns} {CLIENT_SECRET_LABEL}=true), label an existing one, or remove spec.clientSecretRef to let the operator generate one",
                reference.name, reference.name, reference.key, reference.name
            )
        } else {
            format!(
                "Secret {} named by {field} is not this subscription's generated credentials in namespace {ns} (an Opaque Secret it owns); a Secret of that name that is not the operator's keeps it from generating one: delete it, or, if it is yours, label it {CLIENT_SECRET_LABEL}=true and name it in spec.clientSecretRef",
                reference.name
            )
        };
        issues.push(reasons::MISSING_CLIENT_SECRET, message);
        return None;
    };
    let Some(secret) = values.get(&reference.key) else {
        issues.push(
            reasons::MISSING_CLIENT_SECRET,
            format!(
                "Secret {} in namespace {ns} has no key {} (named by {field}); add the key or fix the key name",
                reference.name, reference.key
            ),
        );
        return None;
    };
    if secret.len() < MIN_CLIENT_SECRET_BYTES {
        issues.push(
            reasons::WEAK_CLIENT_SECRET,
            format!(
                "the client secret in Secret {} key {} is {} bytes long; use at least {MIN_CLIENT_SECRET_BYTES} (32 random bytes recommended, e.g. openssl rand -hex 32)",
                reference.name,
                reference.key,
                secret.len()
            ),
        );
        return None;
    }
    Some(hex::encode(Sha256::digest(secret)))
}

#[cfg(test)]
mod tests;
