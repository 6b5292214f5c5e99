//! In-cluster configuration: watch the one ConfigMap the operator publishes and swap the
//! running configuration when its content changes. A missing or unreadable ConfigMap keeps
//! the last good configuration (and the gateway stays not-ready until it has had one).
//! Needs only get/list/watch on that ConfigMap.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use gatehouse_crds::publish::{self, CONFIG_KEY};
use k8s_openapi::api::core::v1::ConfigMap;
use kube_client::Api;
use kube_client::runtime::watcher::{self, Event};

use crate::snapshot::Snapshot;
use crate::state::AppState;

/// Applies one version of the ConfigMap. Returns whether the configuration changed.
pub fn apply(state: &AppState, cm: &ConfigMap) -> Result<bool, String> {
    let bytes = cm
        .binary_data
        .as_ref()
        .and_then(|d| d.get(CONFIG_KEY))
        .ok_or_else(|| format!("the ConfigMap has no binaryData[{CONFIG_KEY}]"))?;
    let config = publish::decode(&bytes.0).map_err(|e| e.to_string())?;
    if state.config.load().loaded && state.config.load().hash() == config.hash {
        return Ok(false);
    }
    let (snap, problems) = Snapshot::build(config);
    for p in problems {
        tracing::error!("left out of the configuration: {p}");
    }
    tracing::info!(hash = %&snap.hash()[..12], apis = snap.config.apis.len(), clients = snap.config.clients.len(), "configuration loaded from ConfigMap");
    metrics::counter!("gatehouse_config_reloads_total").increment(1);
    state.swap_config(snap);
    Ok(true)
}

pub fn parse_ref(s: &str) -> Option<(String, String)> {
    let (ns, name) = s.split_once('/')?;
    (!ns.is_empty() && !name.is_empty()).then(|| (ns.to_string(), name.to_string()))
}

/// Watches the ConfigMap until the process ends; reconnects on errors.
pub async fn watch(
    state: Arc<AppState>,
    client: kube_client::Client,
    namespace: String,
    name: String,
) {
    let api: Api<ConfigMap> = Api::namespaced(client, &namespace);
    let cfg = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut stream = std::pin::pin!(watcher::watcher(api, cfg));
    while let Some(ev) = stream.next().await {
        match ev {
            Ok(Event::Apply(cm)) | Ok(Event::InitApply(cm)) => {
                if let Err(e) = apply(&state, &cm) {
                    tracing::error!(configmap = %format!("{namespace}/{name}"), "keeping the previous configuration: {e}");
                }
            }
            Ok(Event::Delete(_)) => {
                tracing::warn!(configmap = %format!("{namespace}/{name}"), "ConfigMap deleted; keeping the last configuration");
            }
            Ok(Event::Init) | Ok(Event::InitDone) => {}
            Err(e) => {
                tracing::warn!(error = %e, "ConfigMap watch failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gatehouse_crds::{GatewayConfig, compile::config_hash};
    use k8s_openapi::ByteString;

    fn cm(config: &GatewayConfig) -> ConfigMap {
        ConfigMap {
            binary_data: Some(
                [(
                    CONFIG_KEY.to_string(),
                    ByteString(publish::encode(config).unwrap()),
                )]
                .into(),
            ),
            ..Default::default()
        }
    }

    #[test]
    fn swaps_on_new_content_and_keeps_the_last_good_one() {
        let dir = tempfile::tempdir().unwrap();
        let state = AppState::for_tests(dir.path());
        assert!(!state.config.load().loaded);
        let mut config = GatewayConfig::default();
        config.hash = config_hash(&config);
        assert_eq!(apply(&state, &cm(&config)), Ok(true));
        assert!(state.config.load().loaded);
        assert_eq!(apply(&state, &cm(&config)), Ok(false), "same hash: no swap");
        // broken content: refused, previous configuration kept
        let broken = ConfigMap {
            binary_data: Some([(CONFIG_KEY.to_string(), ByteString(b"garbage".to_vec()))].into()),
            ..Default::default()
        };
        assert!(apply(&state, &broken).is_err());
        assert!(apply(&state, &ConfigMap::default()).is_err());
        assert_eq!(state.config.load().hash(), config.hash);
    }

    #[test]
    fn config_map_refs() {
        assert_eq!(parse_ref("ns/name"), Some(("ns".into(), "name".into())));
        assert_eq!(parse_ref("name"), None);
        assert_eq!(parse_ref("/name"), None);
    }
}
