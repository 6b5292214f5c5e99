//! The four custom resources of group `gatehouse.dev`, version `v1alpha1`.
//!
//! Field names are camelCase on the wire; every optional field has a default so a minimal
//! manifest is short. Cross-resource references are names in the same namespace.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub const GROUP: &str = "gatehouse.dev";
pub const VERSION: &str = "v1alpha1";
/// Annotation an administrator sets on a Subscription whose plan requires approval.
pub const APPROVED_ANNOTATION: &str = "gatehouse.dev/approved";

/// Status shared by all four kinds: what the operator (or `validate`) concluded.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ResourceStatus {
    /// Active | PendingApproval | Invalid
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Subscriptions only: the client_id the gateway accepts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    /// Subscriptions of confidential applications: the Secret holding clientId/clientSecret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret: Option<String>,
    /// The uid of `credentialsSecret`, recorded by the operator when it created that Secret.
    /// Only that Secret is this subscription's: one created by anyone else under the same name,
    /// even with an ownerReference naming this subscription, is not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret_uid: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// A Kubernetes-style condition (type Ready is always present once reconciled).
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    #[serde(rename = "type")]
    pub type_: String,
    /// "True" | "False" | "Unknown"
    pub status: String,
    pub reason: String,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

// ---------------------------------------------------------------- Plan

#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "gatehouse.dev",
    version = "v1alpha1",
    kind = "Plan",
    doc = "A Plan: rate limits (and whether approval is needed) that a Subscription gets.",
    namespaced,
    status = "ResourceStatus",
    shortname = "gplan",
    category = "gatehouse",
    printcolumn = r#"{"name":"Display","type":"string","jsonPath":".spec.displayName"}"#,
    printcolumn = r#"{"name":"Approval","type":"boolean","jsonPath":".spec.requiresApproval"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct PlanSpec {
    #[serde(default)]
    pub display_name: String,
    #[serde(default)]
    pub description: String,
    /// Subscriptions to this plan stay PendingApproval until annotated gatehouse.dev/approved: "true".
    #[serde(default)]
    pub requires_approval: bool,
    /// Every entry is enforced (GCRA: a burst of `requests`, then one every per/requests).
    #[serde(default)]
    pub rate_limits: Vec<RateLimit>,
    /// When the shared rate-limit store (Redis) cannot be reached: false (default) answers 503,
    /// true lets requests through unchecked.
    #[serde(default)]
    pub fail_open: bool,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RateLimit {
    #[schemars(range(min = 1))]
    pub requests: u64,
    pub per: Period,
    #[serde(default)]
    pub key: LimitKey,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Period {
    Second,
    Minute,
    Hour,
    Day,
}

impl Period {
    pub fn seconds(self) -> u64 {
        match self {
            Period::Second => 1,
            Period::Minute => 60,
            Period::Hour => 3_600,
            Period::Day => 86_400,
        }
    }
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum LimitKey {
    /// One budget per user and application (client_credentials tokens: per application).
    #[default]
    User,
    /// One budget shared by all users of the application.
    Application,
}

// ---------------------------------------------------------------- Api

#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "gatehouse.dev",
    version = "v1alpha1",
    kind = "Api",
    doc = "An Api: a pathPrefix proxied to an upstream, with the plans and OAuth 2.0 grants and scopes it offers.",
    namespaced,
    status = "ResourceStatus",
    shortname = "gapi",
    category = "gatehouse",
    printcolumn = r#"{"name":"Prefix","type":"string","jsonPath":".spec.pathPrefix"}"#,
    printcolumn = r#"{"name":"Upstream","type":"string","jsonPath":".spec.upstream.url"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ApiSpec {
    #[serde(default)]
    pub display_name: String,
    #[serde(default)]
    pub description: String,
    /// Unique across all Apis in any letter case; requests under it are proxied. Starts with
    /// '/'. An Api of another namespace may only nest under it or above it (/shop, /shop/cart)
    /// when both list spec.hosts and share none.
    pub path_prefix: String,
    /// Optional Host header match (exact, case-insensitive, port ignored).
    #[serde(default)]
    pub hosts: Vec<String>,
    pub upstream: Upstream,
    /// Names of the Plans subscriptions to this Api may use.
    #[serde(default)]
    pub plans: Vec<String>,
    #[serde(default)]
    pub auth: ApiAuth,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Upstream {
    /// http:// or https:// base URL of the backend.
    pub url: String,
    /// Remove pathPrefix before forwarding: /mobile/items -> /items.
    #[serde(default = "default_true")]
    pub strip_prefix: bool,
    #[serde(default = "default_timeout")]
    #[schemars(range(min = 1))]
    pub timeout_seconds: u64,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ApiAuth {
    #[serde(default = "default_grants")]
    pub grants: Vec<GrantType>,
    #[serde(default)]
    pub scopes: Vec<Scope>,
    #[serde(default = "default_access_ttl")]
    #[schemars(range(min = 1))]
    pub access_token_ttl_seconds: u64,
    #[serde(default = "default_refresh_ttl")]
    #[schemars(range(min = 1))]
    pub refresh_token_ttl_seconds: u64,
}

impl Default for ApiAuth {
    fn default() -> Self {
        ApiAuth {
            grants: default_grants(),
            scopes: Vec::new(),
            access_token_ttl_seconds: default_access_ttl(),
            refresh_token_ttl_seconds: default_refresh_ttl(),
        }
    }
}

#[derive(
    Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum GrantType {
    AuthorizationCode,
    RefreshToken,
    ClientCredentials,
}

impl GrantType {
    pub fn as_str(self) -> &'static str {
        match self {
            GrantType::AuthorizationCode => "authorization_code",
            GrantType::RefreshToken => "refresh_token",
            GrantType::ClientCredentials => "client_credentials",
        }
    }
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Scope {
    pub name: String,
    #[serde(default)]
    pub description: String,
}

// ---------------------------------------------------------------- Application

#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "gatehouse.dev",
    version = "v1alpha1",
    kind = "Application",
    doc = "An Application: an OAuth 2.0 client (a mobile/native app or a server) with its redirect URIs.",
    namespaced,
    status = "ResourceStatus",
    shortname = "gapp",
    category = "gatehouse",
    printcolumn = r#"{"name":"Type","type":"string","jsonPath":".spec.clientType"}"#,
    printcolumn = r#"{"name":"Owner","type":"string","jsonPath":".spec.owner"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ApplicationSpec {
    #[serde(default)]
    pub display_name: String,
    #[serde(default)]
    pub owner: String,
    #[serde(default)]
    pub client_type: ClientType,
    /// Exact-match redirect URIs; http only for loopback hosts (any port for 127.0.0.1 / [::1]).
    #[serde(default)]
    pub redirect_uris: Vec<String>,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ClientType {
    /// Native or mobile app: PKCE, no secret.
    #[default]
    Public,
    /// Server-side client with a secret.
    Confidential,
}

// ---------------------------------------------------------------- Subscription

#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "gatehouse.dev",
    version = "v1alpha1",
    kind = "Subscription",
    doc = "A Subscription: gives an Application a client_id for one Api under one Plan.",
    namespaced,
    status = "ResourceStatus",
    shortname = "gsub",
    category = "gatehouse",
    printcolumn = r#"{"name":"Application","type":"string","jsonPath":".spec.application"}"#,
    printcolumn = r#"{"name":"Api","type":"string","jsonPath":".spec.api"}"#,
    printcolumn = r#"{"name":"Plan","type":"string","jsonPath":".spec.plan"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Client ID","type":"string","jsonPath":".status.clientId"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct SubscriptionSpec {
    pub application: String,
    pub api: String,
    pub plan: String,
    /// Trusted: no consent screen, every requested scope is granted.
    #[serde(default)]
    pub trusted: bool,
    /// Defaults to status.clientId (set by the operator), else the subscription's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    /// Confidential applications: Secret key holding the client secret. The Secret (type
    /// Opaque, same namespace) must be labelled gatehouse.dev/client-secret: "true".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_secret_ref: Option<SecretKeyRef>,
    /// Grants this client may use; a subset of the Api's. Default: the Api's grants that fit the
    /// client type (public clients never get client_credentials).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grants: Option<Vec<GrantType>>,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    pub name: String,
    #[serde(default = "default_secret_key")]
    pub key: String,
}

fn default_true() -> bool {
    true
}
fn default_timeout() -> u64 {
    30
}
fn default_grants() -> Vec<GrantType> {
    vec![GrantType::AuthorizationCode, GrantType::RefreshToken]
}
fn default_access_ttl() -> u64 {
    3_600
}
fn default_refresh_ttl() -> u64 {
    2_592_000
}
fn default_secret_key() -> String {
    "clientSecret".to_string()
}
