//! The running configuration: a `GatewayConfig` plus lookup tables and prevalidated header
//! values, built once per config change so the request path only reads.

use std::collections::HashMap;
use std::time::Duration;

use gatehouse_crds::{ApiConfig, ClientConfig, GatewayConfig, PlanConfig};
use http::HeaderValue;
use http::uri::Uri;

use crate::upstream::Target;

pub struct ApiRuntime {
    pub cfg: ApiConfig,
    /// Where requests go (scheme, authority, Host), parsed once.
    pub target: Target,
    /// The upstream URL's path (may be empty).
    pub base_path: String,
    pub timeout: Duration,
}

pub struct ClientRuntime {
    pub cfg: ClientConfig,
    pub api: usize,
    pub plan: usize,
    pub client_id_header: HeaderValue,
    pub application_header: HeaderValue,
    pub plan_header: HeaderValue,
}

#[derive(Default)]
pub struct Snapshot {
    pub config: GatewayConfig,
    /// Same order as `config.apis` (longest prefix first).
    pub apis: Vec<ApiRuntime>,
    pub plans: Vec<PlanConfig>,
    // Looked up on every proxied request; client ids come from tokens the gateway issued.
    clients: foldhash::HashMap<String, ClientRuntime>,
    /// False until a real configuration has been loaded (readiness).
    pub loaded: bool,
}

#[derive(Debug, thiserror::Error)]
#[error("config rejected: {0}")]
pub struct SnapshotError(pub String);

fn header(value: &str, what: &str) -> Result<HeaderValue, SnapshotError> {
    HeaderValue::from_str(value)
        .map_err(|_| SnapshotError(format!("{what} {value:?} cannot be sent as a header")))
}

impl Snapshot {
    pub fn build(config: GatewayConfig) -> Result<Snapshot, SnapshotError> {
        let mut apis = Vec::with_capacity(config.apis.len());
        for api in &config.apis {
            let uri: Uri = api
                .upstream
                .url
                .parse()
                .map_err(|e| SnapshotError(format!("api {} upstream url: {e}", api.id)))?;
            apis.push(ApiRuntime {
                target: Target::new(&uri).map_err(|e| {
                    SnapshotError(format!(
                        "api {} upstream url {}: {e}",
                        api.id, api.upstream.url
                    ))
                })?,
                base_path: uri.path().trim_end_matches('/').to_string(),
                timeout: Duration::from_secs(api.upstream.timeout_seconds.max(1)),
                cfg: api.clone(),
            });
        }
        let plans = config.plans.clone();
        let mut clients =
            HashMap::with_capacity_and_hasher(config.clients.len(), Default::default());
        for c in &config.clients {
            let api = apis.iter().position(|a| a.cfg.id == c.api).ok_or_else(|| {
                SnapshotError(format!(
                    "client {} names unknown api {}",
                    c.client_id, c.api
                ))
            })?;
            let plan = plans.iter().position(|p| p.id == c.plan).ok_or_else(|| {
                SnapshotError(format!(
                    "client {} names unknown plan {}",
                    c.client_id, c.plan
                ))
            })?;
            let rt = ClientRuntime {
                client_id_header: header(&c.client_id, "client id")?,
                application_header: header(&c.application, "application id")?,
                plan_header: header(&plans[plan].name, "plan name")?,
                api,
                plan,
                cfg: c.clone(),
            };
            clients.insert(c.client_id.clone(), rt);
        }
        Ok(Snapshot {
            config,
            apis,
            plans,
            clients,
            loaded: true,
        })
    }

    pub fn client(&self, client_id: &str) -> Option<&ClientRuntime> {
        self.clients.get(client_id)
    }

    pub fn hash(&self) -> &str {
        &self.config.hash
    }
}
