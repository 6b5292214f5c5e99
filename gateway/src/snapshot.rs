//! The running configuration: a `GatewayConfig` plus lookup tables and prevalidated header
//! values, built once per config change so the request path only reads.

use std::collections::HashMap;
use std::time::Duration;

use gatehouse_crds::{ApiConfig, ClientConfig, GatewayConfig, PlanConfig};
use http::HeaderValue;
use http::uri::Uri;

use crate::store::{TokenKind, TokenRecord};
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
    /// Some pathPrefix has an upper-case letter: every path gets the case-insensitive routing
    /// check then, not only paths with one (`routing::route`).
    pub upper_case_prefix: bool,
}

fn header(value: &str, what: &str) -> Result<HeaderValue, String> {
    HeaderValue::from_str(value).map_err(|_| format!("{what} {value:?} cannot be sent as a header"))
}

fn api_runtime(api: &ApiConfig) -> Result<ApiRuntime, String> {
    let uri: Uri = api
        .upstream
        .url
        .parse()
        .map_err(|e| format!("api {}: upstream url: {e}", api.id))?;
    Ok(ApiRuntime {
        target: Target::new(&uri)
            .map_err(|e| format!("api {}: upstream url {}: {e}", api.id, api.upstream.url))?,
        base_path: uri.path().trim_end_matches('/').to_string(),
        timeout: Duration::from_secs(api.upstream.timeout_seconds.max(1)),
        cfg: api.clone(),
    })
}

fn client_runtime(
    c: &ClientConfig,
    apis: &[ApiRuntime],
    plans: &[PlanConfig],
) -> Result<ClientRuntime, String> {
    let api = apis
        .iter()
        .position(|a| a.cfg.id == c.api)
        .ok_or_else(|| format!("client {}: unknown or left-out api {}", c.client_id, c.api))?;
    let plan = plans
        .iter()
        .position(|p| p.id == c.plan)
        .ok_or_else(|| format!("client {}: unknown plan {}", c.client_id, c.plan))?;
    Ok(ClientRuntime {
        client_id_header: header(&c.client_id, "client id")?,
        application_header: header(&c.application, "application id")?,
        plan_header: header(&plans[plan].name, "plan name")?,
        api,
        plan,
        cfg: c.clone(),
    })
}

impl Snapshot {
    /// Builds the lookup tables. An Api whose upstream URL the HTTP stack cannot use, and a
    /// client naming an unknown (or left-out) Api or plan or holding a value that cannot be a
    /// header, are left out and described in the returned list: one bad entry must not keep the
    /// rest of a configuration (a revoked subscription among its changes) from applying.
    pub fn build(mut config: GatewayConfig) -> (Snapshot, Vec<String>) {
        let mut problems = Vec::new();
        let mut apis = Vec::with_capacity(config.apis.len());
        config.apis.retain(|api| match api_runtime(api) {
            Ok(rt) => {
                apis.push(rt);
                true
            }
            Err(e) => {
                problems.push(e);
                false
            }
        });
        let plans = config.plans.clone();
        let mut clients =
            HashMap::with_capacity_and_hasher(config.clients.len(), Default::default());
        config
            .clients
            .retain(|c| match client_runtime(c, &apis, &plans) {
                Ok(rt) => {
                    clients.insert(c.client_id.clone(), rt);
                    true
                }
                Err(e) => {
                    problems.push(e);
                    false
                }
            });
        let upper_case_prefix = config
            .apis
            .iter()
            .any(|a| a.path_prefix.bytes().any(|c| c.is_ascii_uppercase()));
        let snap = Snapshot {
            upper_case_prefix,
            config,
            apis,
            plans,
            clients,
            loaded: true,
        };
        (snap, problems)
    }

    /// The same configuration built again, sharing no allocation with `self` (its header
    /// values included): a worker thread's own copy (`AppState::local_config`).
    pub fn copy(&self) -> Snapshot {
        if !self.loaded {
            return Snapshot::default();
        }
        // `build` left out what it could not use, so building again leaves nothing out.
        Snapshot::build(self.config.clone()).0
    }

    pub fn client(&self, client_id: &str) -> Option<&ClientRuntime> {
        self.clients.get(client_id)
    }

    /// The subscription a token was issued through, while the configuration still has it for
    /// the token's Api: a removed or re-pointed subscription's tokens are dead (introspection
    /// says inactive, refresh refuses them).
    pub fn token_client(&self, record: &TokenRecord) -> Option<&ClientRuntime> {
        self.client(&record.client_id).filter(|c| {
            c.cfg.subscription == record.subscription && self.apis[c.api].cfg.id == record.api
        })
    }

    /// `token_client` for access tokens: the subscription an access token opens its Api
    /// through. The proxy asks this per request, an open WebSocket tunnel every 30 s.
    pub fn access_client(&self, record: &TokenRecord) -> Option<&ClientRuntime> {
        self.token_client(record)
            .filter(|_| record.kind == TokenKind::Access)
    }

    pub fn hash(&self) -> &str {
        &self.config.hash
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gatehouse_crds::{ClientType, GrantType, UpstreamConfig};

    fn api(id: &str, prefix: &str, url: &str) -> ApiConfig {
        ApiConfig {
            id: id.into(),
            display_name: id.into(),
            path_prefix: prefix.into(),
            hosts: vec![],
            upstream: UpstreamConfig {
                url: url.into(),
                strip_prefix: true,
                timeout_seconds: 30,
            },
            grants: vec![GrantType::ClientCredentials],
            scopes: vec![],
            access_token_ttl_seconds: 3600,
            refresh_token_ttl_seconds: 86400,
        }
    }

    fn client(id: &str, api: &str, plan: &str, application: &str) -> ClientConfig {
        ClientConfig {
            client_id: id.into(),
            subscription: format!("demo/{id}"),
            application: application.into(),
            application_name: application.into(),
            api: api.into(),
            plan: plan.into(),
            client_type: ClientType::Confidential,
            secret_sha256: None,
            redirect_uris: vec![],
            trusted: false,
            grants: vec![GrantType::ClientCredentials],
        }
    }

    fn basic_plan() -> PlanConfig {
        PlanConfig {
            id: "demo/basic".into(),
            name: "basic".into(),
            display_name: "Basic".into(),
            rate_limits: vec![],
            fail_open: false,
        }
    }

    fn one_client_config(hash: &str, client_id: &str) -> GatewayConfig {
        GatewayConfig {
            hash: hash.into(),
            apis: vec![api("demo/good", "/good", "http://backend:8080/v1")],
            plans: vec![basic_plan()],
            clients: vec![client(client_id, "demo/good", "demo/basic", "demo/app")],
        }
    }

    #[test]
    fn an_access_token_opens_only_through_its_own_subscription_and_api() {
        let (snap, _) = Snapshot::build(one_client_config("h", "ok"));
        let token = TokenRecord {
            kind: TokenKind::Access,
            client_id: "ok".into(),
            subscription: "demo/ok".into(),
            api: "demo/good".into(),
            user_id: None,
            scope: String::new(),
            grant_id: "g".into(),
            issued_at: 0,
            expires_at: u64::MAX,
        };
        assert!(snap.access_client(&token).is_some_and(|c| c.api == 0));
        let refused = [
            TokenRecord {
                kind: TokenKind::Refresh,
                ..token.clone()
            },
            // A subscription deleted and created again under the same client id.
            TokenRecord {
                subscription: "demo/other".into(),
                ..token.clone()
            },
            // The subscription now points at another Api.
            TokenRecord {
                api: "demo/old".into(),
                ..token.clone()
            },
            TokenRecord {
                client_id: "gone".into(),
                ..token.clone()
            },
        ];
        let refresh = refused[0].clone();
        assert!(snap.token_client(&refresh).is_some(), "any kind");
        for r in refused {
            assert!(snap.access_client(&r).is_none(), "{r:?}");
            if r.kind == TokenKind::Access {
                assert!(snap.token_client(&r).is_none(), "{r:?}");
            }
        }
    }

    /// Where a snapshot's client-id header value keeps its bytes.
    fn header_bytes(snap: &Snapshot, client_id: &str) -> usize {
        snap.client(client_id)
            .unwrap()
            .client_id_header
            .as_bytes()
            .as_ptr() as usize
    }

    #[test]
    fn each_thread_proxies_with_its_own_copy_of_the_current_configuration() {
        let dir = tempfile::tempdir().unwrap();
        let state = crate::state::AppState::for_tests(dir.path());
        assert!(!state.local_config().loaded, "nothing loaded yet");
        state.swap_config(Snapshot::build(one_client_config("h1", "first")).0);
        let shared = header_bytes(&state.config.load(), "first");
        let here = state.local_config();
        assert!(here.loaded);
        assert_eq!(here.hash(), "h1");
        assert_eq!(here.apis[0].base_path, "/v1");
        assert_eq!(here.client("first").unwrap().client_id_header, "first");
        // Asked again on the same thread: the same copy, not a new build per request.
        assert!(std::sync::Arc::ptr_eq(&here, &state.local_config()));
        let there = std::thread::scope(|s| {
            s.spawn(|| header_bytes(&state.local_config(), "first"))
                .join()
                .unwrap()
        });
        let mine = header_bytes(&here, "first");
        assert!(
            mine != shared && there != shared && mine != there,
            "each thread's header values have their own bytes"
        );
        // A new configuration reaches this thread's next request.
        state.swap_config(Snapshot::build(one_client_config("h2", "second")).0);
        let now = state.local_config();
        assert_eq!(now.hash(), "h2");
        assert!(now.client("first").is_none());
        assert!(now.client("second").is_some());
    }

    #[test]
    fn bad_entries_are_left_out_and_the_rest_applies() {
        let config = GatewayConfig {
            hash: "h".into(),
            apis: vec![
                api("demo/good", "/good", "http://backend:8080/v1"),
                api("demo/bad", "/bad", "http://backend{x}:8080"),
            ],
            plans: vec![basic_plan()],
            clients: vec![
                client("ok", "demo/good", "demo/basic", "demo/app"),
                client("on-bad-api", "demo/bad", "demo/basic", "demo/app"),
                client("no-plan", "demo/good", "demo/gone", "demo/app"),
                client("bad-header", "demo/good", "demo/basic", "demo/äpp\n"),
            ],
        };
        let (snap, problems) = Snapshot::build(config);
        assert_eq!(problems.len(), 4, "{problems:?}");
        assert!(problems[0].starts_with("api demo/bad"), "{problems:?}");
        // Routing indexes `apis` by position in `config.apis`: both hold the good Api only.
        let ids: Vec<&str> = snap.config.apis.iter().map(|a| a.id.as_str()).collect();
        assert_eq!(ids, ["demo/good"]);
        assert_eq!(snap.apis.len(), 1);
        assert_eq!(snap.apis[0].base_path, "/v1");
        assert!(snap.client("ok").is_some_and(|c| c.api == 0));
        for gone in ["on-bad-api", "no-plan", "bad-header"] {
            assert!(snap.client(gone).is_none(), "{gone}");
        }
        assert_eq!(snap.config.clients.len(), 1);
        assert_eq!(snap.hash(), "h");
        assert!(snap.loaded);
    }
}
