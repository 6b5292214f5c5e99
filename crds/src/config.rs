//! `GatewayConfig`: the one document the gateway runs from. Produced by `compile()` both in the
//! operator and in standalone mode, serialized into a ConfigMap by the operator.

use serde::{Deserialize, Serialize};

use crate::resources::{ClientType, GrantType, LimitKey};

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GatewayConfig {
    /// SHA-256 (hex) over the canonical JSON of everything below; equal configs have equal hashes.
    pub hash: String,
    /// Sorted by pathPrefix, longest first, so the first match is the longest prefix.
    pub apis: Vec<ApiConfig>,
    pub plans: Vec<PlanConfig>,
    /// Sorted by client_id.
    pub clients: Vec<ClientConfig>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ApiConfig {
    /// `<namespace>/<name>`
    pub id: String,
    pub display_name: String,
    pub path_prefix: String,
    /// Lower-cased host names without port; empty = any host.
    pub hosts: Vec<String>,
    pub upstream: UpstreamConfig,
    pub grants: Vec<GrantType>,
    pub scopes: Vec<ScopeConfig>,
    pub access_token_ttl_seconds: u64,
    pub refresh_token_ttl_seconds: u64,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct UpstreamConfig {
    /// Base URL without trailing slash, e.g. `http://backend:8080` or `http://backend:8080/v1`.
    pub url: String,
    pub strip_prefix: bool,
    pub timeout_seconds: u64,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ScopeConfig {
    pub name: String,
    pub description: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PlanConfig {
    /// `<namespace>/<name>`
    pub id: String,
    pub name: String,
    pub display_name: String,
    pub rate_limits: Vec<RateLimitConfig>,
    pub fail_open: bool,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RateLimitConfig {
    pub requests: u64,
    pub per_seconds: u64,
    pub key: LimitKey,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ClientConfig {
    pub client_id: String,
    /// `<namespace>/<subscription name>`
    pub subscription: String,
    /// `<namespace>/<application name>` (the X-Application-Id header)
    pub application: String,
    pub application_name: String,
    /// `<namespace>/<api name>`, an id in `apis`
    pub api: String,
    /// `<namespace>/<plan name>`, an id in `plans`
    pub plan: String,
    pub client_type: ClientType,
    /// Confidential clients: SHA-256 (hex) of the client secret; never the secret itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_sha256: Option<String>,
    pub redirect_uris: Vec<String>,
    pub trusted: bool,
    /// Effective grants (Api grants intersected with the subscription's and the client type).
    pub grants: Vec<GrantType>,
}
