//! How a `GatewayConfig` travels from the operator to gateway pods: gzip-compressed JSON in a
//! ConfigMap's binaryData, with the content hash in an annotation. 10,000 subscriptions
//! compress far below the 1 MiB object limit.

use std::io::{Read, Write};

use flate2::Compression;
use flate2::read::GzDecoder;
use flate2::write::GzEncoder;

use crate::config::GatewayConfig;

/// binaryData key holding the compressed configuration.
pub const CONFIG_KEY: &str = "config.json.gz";
/// Annotation with the configuration's content hash (skip writes when it is unchanged).
pub const HASH_ANNOTATION: &str = "gatehouse.dev/config-hash";
/// Kubernetes rejects objects above 1 MiB; stay clearly below.
pub const MAX_PUBLISHED_BYTES: usize = 900 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error(
        "the published configuration is {0} bytes compressed, over the {MAX_PUBLISHED_BYTES}-byte limit"
    )]
    TooLarge(usize),
    #[error("cannot encode the configuration: {0}")]
    Encode(String),
    #[error("the published configuration is unreadable: {0}")]
    Decode(String),
}

pub fn encode(config: &GatewayConfig) -> Result<Vec<u8>, PublishError> {
    let json = serde_json::to_vec(config).map_err(|e| PublishError::Encode(e.to_string()))?;
    let mut gz = GzEncoder::new(Vec::new(), Compression::best());
    gz.write_all(&json)
        .map_err(|e| PublishError::Encode(e.to_string()))?;
    let out = gz
        .finish()
        .map_err(|e| PublishError::Encode(e.to_string()))?;
    if out.len() > MAX_PUBLISHED_BYTES {
        return Err(PublishError::TooLarge(out.len()));
    }
    Ok(out)
}

/// Reads a published configuration; refuses one whose hash does not match its content.
pub fn decode(bytes: &[u8]) -> Result<GatewayConfig, PublishError> {
    // Bound the inflated size: a 900 KiB gzip of this JSON is far below 256 MiB.
    let mut json = Vec::new();
    GzDecoder::new(bytes)
        .take(256 * 1024 * 1024)
        .read_to_end(&mut json)
        .map_err(|e| PublishError::Decode(e.to_string()))?;
    let config: GatewayConfig =
        serde_json::from_slice(&json).map_err(|e| PublishError::Decode(e.to_string()))?;
    let expected = crate::compile::config_hash(&config);
    if expected != config.hash {
        return Err(PublishError::Decode(format!(
            "hash mismatch: content {expected}, recorded {}",
            config.hash
        )));
    }
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compile::config_hash;
    use crate::config::{ApiConfig, ClientConfig, PlanConfig, RateLimitConfig, UpstreamConfig};
    use crate::resources::{ClientType, GrantType, LimitKey};

    fn big_config(clients: usize) -> GatewayConfig {
        let mut c = GatewayConfig {
            hash: String::new(),
            apis: vec![ApiConfig {
                id: "demo/mobile".into(),
                display_name: "Mobile".into(),
                path_prefix: "/mobile".into(),
                hosts: vec![],
                upstream: UpstreamConfig {
                    url: "http://backend:8080".into(),
                    strip_prefix: true,
                    timeout_seconds: 30,
                },
                grants: vec![GrantType::AuthorizationCode, GrantType::RefreshToken],
                scopes: vec![],
                access_token_ttl_seconds: 3600,
                refresh_token_ttl_seconds: 86400,
            }],
            plans: vec![PlanConfig {
                id: "demo/basic".into(),
                name: "basic".into(),
                display_name: "Basic".into(),
                rate_limits: vec![RateLimitConfig {
                    requests: 10,
                    per_seconds: 1,
                    key: LimitKey::User,
                }],
                fail_open: false,
            }],
            clients: (0..clients)
                .map(|i| ClientConfig {
                    client_id: format!("app-{i:05}-mobile-8f3a2c1d"),
                    subscription: format!("demo/app-{i:05}-mobile"),
                    application: format!("demo/app-{i:05}"),
                    application_name: format!("Application number {i}"),
                    api: "demo/mobile".into(),
                    plan: "demo/basic".into(),
                    client_type: ClientType::Public,
                    secret_sha256: None,
                    redirect_uris: vec![
                        format!("com.example.app{i}:/oauth2redirect"),
                        "http://127.0.0.1/callback".into(),
                    ],
                    trusted: false,
                    grants: vec![GrantType::AuthorizationCode, GrantType::RefreshToken],
                })
                .collect(),
        };
        c.hash = config_hash(&c);
        c
    }

    #[test]
    fn roundtrip() {
        let c = big_config(3);
        assert_eq!(decode(&encode(&c).unwrap()).unwrap(), c);
    }

    #[test]
    fn ten_thousand_subscriptions_fit_in_a_config_map() {
        let c = big_config(10_000);
        let bytes = encode(&c).expect("fits");
        assert!(bytes.len() < MAX_PUBLISHED_BYTES, "{} bytes", bytes.len());
        assert_eq!(decode(&bytes).unwrap().clients.len(), 10_000);
    }

    #[test]
    fn tampered_or_broken_content_is_refused() {
        let mut c = big_config(2);
        c.clients[0].trusted = true; // hash no longer matches
        assert!(decode(&encode(&c).unwrap()).is_err());
        assert!(decode(b"not gzip").is_err());
    }
}
