//! examples/mobile must load and compile without a single problem.

use std::path::PathBuf;

use gatehouse_crds::manifests::load_paths;
use gatehouse_crds::{ClientType, GrantType, Phase, compile};

#[test]
fn mobile_example_compiles_cleanly() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/mobile");
    let (resources, errors) = load_paths(&[dir]).expect("examples/mobile is readable");
    assert!(errors.is_empty(), "manifest errors: {errors:#?}");
    assert_eq!(resources.plans.len(), 2);
    assert_eq!(resources.apis.len(), 1);
    assert_eq!(resources.applications.len(), 2);
    assert_eq!(resources.subscriptions.len(), 2);
    assert_eq!(resources.secrets.len(), 1);

    let compiled = compile(&resources);
    assert_eq!(compiled.verdicts.len(), 7);
    for v in &compiled.verdicts {
        assert_eq!(v.phase, Phase::Active, "{v:#?}");
        assert_eq!(v.namespace, "demo");
    }

    let config = &compiled.config;
    assert_eq!(config.apis.len(), 1);
    assert_eq!(config.apis[0].path_prefix, "/mobile");
    assert_eq!(config.apis[0].upstream.url, "http://127.0.0.1:9001");
    assert_eq!(config.plans.len(), 2);
    assert_eq!(config.clients.len(), 2);

    let app = &config.clients[0];
    assert_eq!(app.client_id, "demo-app-mobile");
    assert_eq!(app.client_type, ClientType::Public);
    assert_eq!(app.application, "demo/demo-app");
    assert_eq!(
        app.grants,
        [GrantType::AuthorizationCode, GrantType::RefreshToken]
    );
    assert_eq!(app.redirect_uris.len(), 3);

    let service = &config.clients[1];
    assert_eq!(service.client_id, "demo-service-mobile");
    assert_eq!(service.client_type, ClientType::Confidential);
    assert_eq!(service.grants, [GrantType::ClientCredentials]);
    assert!(service.secret_sha256.is_some());
}
