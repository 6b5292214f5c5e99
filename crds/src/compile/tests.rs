use k8s_openapi::ByteString;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use super::*;
use crate::manifests::parse_documents;
use crate::resources::{LimitKey, Period, RateLimit, Scope};

const FIXTURE: &str = r#"
apiVersion: gatehouse.dev/v1alpha1
kind: Plan
metadata: {name: basic, namespace: demo}
spec:
  displayName: Basic
  rateLimits:
    - {requests: 10, per: second}
    - {requests: 10000, per: day, key: application}
---
apiVersion: gatehouse.dev/v1alpha1
kind: Plan
metadata: {name: premium, namespace: demo}
spec: {requiresApproval: true}
---
apiVersion: gatehouse.dev/v1alpha1
kind: Api
metadata: {name: mobile, namespace: demo}
spec:
  displayName: Mobile API
  pathPrefix: /mobile
  upstream: {url: "http://127.0.0.1:9001/"}
  plans: [basic, premium]
  auth:
    grants: [refresh_token, authorization_code, client_credentials]
    scopes:
      - {name: profile, description: Read your profile}
      - {name: "orders:read"}
---
apiVersion: gatehouse.dev/v1alpha1
kind: Application
metadata: {name: demo-app, namespace: demo}
spec:
  displayName: Demo App
  clientType: public
  redirectUris:
    - com.example.demo:/oauth2redirect
    - myapp://callback
    - http://127.0.0.1/callback
    - myapp://callback
---
apiVersion: gatehouse.dev/v1alpha1
kind: Application
metadata: {name: demo-service, namespace: demo}
spec: {clientType: confidential}
---
apiVersion: gatehouse.dev/v1alpha1
kind: Subscription
metadata: {name: demo-app-mobile, namespace: demo}
spec: {application: demo-app, api: mobile, plan: basic, clientId: demo-app-mobile}
---
apiVersion: gatehouse.dev/v1alpha1
kind: Subscription
metadata: {name: demo-service-mobile, namespace: demo}
spec:
  application: demo-service
  api: mobile
  plan: basic
  grants: [client_credentials]
  clientSecretRef: {name: demo-service-mobile-credentials, key: clientSecret}
---
apiVersion: v1
kind: Secret
metadata: {name: demo-service-mobile-credentials, namespace: demo, labels: {gatehouse.dev/client-secret: "true"}}
stringData: {clientSecret: demo-secret-change-me-0123456789abcdef}
"#;

const SECRET: &str = "demo-secret-change-me-0123456789abcdef";

fn fixture() -> Resources {
    let mut r = Resources::default();
    let errors = parse_documents(FIXTURE, "fixture", &mut r);
    assert!(errors.is_empty(), "{errors:?}");
    r
}

fn add(r: &mut Resources, yaml: &str) {
    let errors = parse_documents(yaml, "test", r);
    assert!(errors.is_empty(), "{errors:?}");
}

fn api<'a>(r: &'a mut Resources, name: &str) -> &'a mut Api {
    r.apis
        .iter_mut()
        .find(|a| a.metadata.name.as_deref() == Some(name))
        .unwrap()
}
fn plan<'a>(r: &'a mut Resources, name: &str) -> &'a mut Plan {
    r.plans
        .iter_mut()
        .find(|a| a.metadata.name.as_deref() == Some(name))
        .unwrap()
}
fn app<'a>(r: &'a mut Resources, name: &str) -> &'a mut Application {
    r.applications
        .iter_mut()
        .find(|a| a.metadata.name.as_deref() == Some(name))
        .unwrap()
}
fn sub<'a>(r: &'a mut Resources, name: &str) -> &'a mut Subscription {
    r.subscriptions
        .iter_mut()
        .find(|a| a.metadata.name.as_deref() == Some(name))
        .unwrap()
}

fn created(meta: &mut ObjectMeta, at: &str) {
    meta.creation_timestamp = Some(Time(at.parse().unwrap()));
}

fn get<'a>(c: &'a Compiled, kind: Kind, name: &str) -> &'a Verdict {
    c.verdict(kind, "demo", name)
        .unwrap_or_else(|| panic!("no verdict for {kind} demo/{name}: {:#?}", c.verdicts))
}

#[track_caller]
fn assert_invalid(c: &Compiled, kind: Kind, name: &str, reason: &str, needle: &str) {
    let v = get(c, kind, name);
    assert_eq!(v.phase, Phase::Invalid, "{v:#?}");
    assert_eq!(v.reason, reason, "{v:#?}");
    assert!(
        v.message.contains(needle),
        "message {:?} lacks {needle:?}",
        v.message
    );
}

#[track_caller]
fn assert_active(c: &Compiled, kind: Kind, name: &str) {
    let v = get(c, kind, name);
    assert_eq!(v.phase, Phase::Active, "{v:#?}");
    assert_eq!(v.reason, reasons::ACTIVE);
}

fn client<'a>(c: &'a Compiled, client_id: &str) -> Option<&'a ClientConfig> {
    c.config.clients.iter().find(|cl| cl.client_id == client_id)
}

// ------------------------------------------------------------------------- the valid example

#[test]
fn valid_example_compiles() {
    let c = compile(&fixture());
    assert_eq!(c.verdicts.len(), 7);
    assert!(c.problems().next().is_none(), "{:#?}", c.verdicts);

    assert_eq!(c.config.apis.len(), 1);
    let a = &c.config.apis[0];
    assert_eq!(a.id, "demo/mobile");
    assert_eq!(a.display_name, "Mobile API");
    assert_eq!(a.path_prefix, "/mobile");
    assert_eq!(a.upstream.url, "http://127.0.0.1:9001");
    assert!(a.upstream.strip_prefix);
    assert_eq!(a.upstream.timeout_seconds, 30);
    assert_eq!(
        a.grants,
        [
            GrantType::AuthorizationCode,
            GrantType::RefreshToken,
            GrantType::ClientCredentials
        ]
    );
    assert_eq!(a.scopes.len(), 2);
    assert_eq!(a.scopes[0].description, "Read your profile");
    assert_eq!(a.access_token_ttl_seconds, 3600);
    assert_eq!(a.refresh_token_ttl_seconds, 2_592_000);

    let ids: Vec<_> = c.config.plans.iter().map(|p| p.id.as_str()).collect();
    assert_eq!(ids, ["demo/basic", "demo/premium"]);
    let basic = &c.config.plans[0];
    assert_eq!(basic.display_name, "Basic");
    assert_eq!(c.config.plans[1].display_name, "premium");
    assert_eq!(
        basic.rate_limits,
        [
            RateLimitConfig {
                requests: 10,
                per_seconds: 1,
                key: LimitKey::User
            },
            RateLimitConfig {
                requests: 10000,
                per_seconds: 86_400,
                key: LimitKey::Application
            },
        ]
    );

    let ids: Vec<_> = c
        .config
        .clients
        .iter()
        .map(|c| c.client_id.as_str())
        .collect();
    assert_eq!(ids, ["demo-app-mobile", "demo-service-mobile"]);
    let public = client(&c, "demo-app-mobile").unwrap();
    assert_eq!(public.subscription, "demo/demo-app-mobile");
    assert_eq!(public.application, "demo/demo-app");
    assert_eq!(public.application_name, "Demo App");
    assert_eq!(public.api, "demo/mobile");
    assert_eq!(public.plan, "demo/basic");
    assert_eq!(public.client_type, ClientType::Public);
    assert_eq!(public.secret_sha256, None);
    assert_eq!(
        public.redirect_uris,
        [
            "com.example.demo:/oauth2redirect",
            "myapp://callback",
            "http://127.0.0.1/callback"
        ]
    );
    assert!(!public.trusted);
    // client_credentials silently dropped for a public client without spec.grants
    assert_eq!(
        public.grants,
        [GrantType::AuthorizationCode, GrantType::RefreshToken]
    );

    let service = client(&c, "demo-service-mobile").unwrap();
    assert_eq!(service.client_type, ClientType::Confidential);
    assert_eq!(service.application_name, "demo-service");
    assert_eq!(service.grants, [GrantType::ClientCredentials]);
    assert_eq!(
        service.secret_sha256.as_deref(),
        Some(hex::encode(Sha256::digest(SECRET.as_bytes())).as_str())
    );
    assert!(service.redirect_uris.is_empty());

    assert_eq!(
        get(&c, Kind::Subscription, "demo-app-mobile")
            .client_id
            .as_deref(),
        Some("demo-app-mobile")
    );
    assert_eq!(c.config.hash, config_hash(&c.config));
    assert_eq!(c.config.hash.len(), 64);
}

#[test]
fn verdicts_cover_every_resource_sorted_by_kind_namespace_name() {
    let c = compile(&fixture());
    let keys: Vec<_> = c
        .verdicts
        .iter()
        .map(|v| format!("{}/{}", v.kind, v.name))
        .collect();
    assert_eq!(
        keys,
        [
            "Api/mobile",
            "Plan/basic",
            "Plan/premium",
            "Application/demo-app",
            "Application/demo-service",
            "Subscription/demo-app-mobile",
            "Subscription/demo-service-mobile",
        ]
    );
}

#[test]
fn empty_input_compiles_to_an_empty_config() {
    let c = compile(&Resources::default());
    assert!(c.verdicts.is_empty());
    assert!(c.config.apis.is_empty() && c.config.plans.is_empty() && c.config.clients.is_empty());
    assert_eq!(c.config.hash, config_hash(&c.config));
}

#[test]
fn ready_condition_reflects_the_phase() {
    let c = compile(&fixture());
    let cond = get(&c, Kind::Api, "mobile").ready_condition(Some(3));
    assert_eq!(cond.type_, "Ready");
    assert_eq!(cond.status, "True");
    assert_eq!(cond.reason, "Active");
    assert_eq!(cond.observed_generation, Some(3));

    let mut r = fixture();
    plan(&mut r, "basic").spec.rate_limits[0].requests = 0;
    let c = compile(&r);
    let cond = get(&c, Kind::Plan, "basic").ready_condition(None);
    assert_eq!(cond.status, "False");
    assert_eq!(cond.reason, reasons::INVALID_RATE_LIMIT);
    assert_eq!(Phase::PendingApproval.as_str(), "PendingApproval");
    assert_eq!(Kind::Subscription.to_string(), "Subscription");
}

// ------------------------------------------------------------------------- hash and determinism

#[test]
fn hash_is_stable_and_independent_of_input_order() {
    let r = fixture();
    let a = compile(&r);
    let b = compile(&r);
    assert_eq!(a, b);

    let mut shuffled = r.clone();
    shuffled.plans.reverse();
    shuffled.applications.reverse();
    shuffled.subscriptions.reverse();
    let c = compile(&shuffled);
    assert_eq!(a.config, c.config);
    assert_eq!(a.verdicts, c.verdicts);
}

#[test]
fn hash_changes_when_something_changes() {
    let base = compile(&fixture()).config.hash;

    let mut r = fixture();
    plan(&mut r, "basic").spec.rate_limits[0].requests = 11;
    assert_ne!(compile(&r).config.hash, base);

    let mut r = fixture();
    r.secrets[0].data.as_mut().unwrap().insert(
        "clientSecret".into(),
        ByteString(b"another-secret-0123456789".to_vec()),
    );
    assert_ne!(compile(&r).config.hash, base);

    let mut r = fixture();
    sub(&mut r, "demo-app-mobile").spec.trusted = true;
    assert_ne!(compile(&r).config.hash, base);

    // Things that do not reach the config do not change the hash.
    let mut r = fixture();
    app(&mut r, "demo-app").spec.owner = "someone@example.com".into();
    assert_eq!(compile(&r).config.hash, base);
}

// ------------------------------------------------------------------------- identity

#[test]
fn missing_name_does_not_panic() {
    let mut r = fixture();
    let mut nameless = r.plans[0].clone();
    nameless.metadata.name = None;
    nameless.metadata.namespace = None;
    r.plans.push(nameless);
    let c = compile(&r);
    let v = c.verdict(Kind::Plan, "default", "").unwrap();
    assert_eq!(v.phase, Phase::Invalid);
    assert_eq!(v.reason, reasons::MISSING_NAME);
    assert_eq!(c.problems().count(), 1);
}

#[test]
fn duplicate_resource_keeps_the_first_copy() {
    let mut r = fixture();
    let mut copy = api(&mut r, "mobile").clone();
    copy.spec.upstream.url = "http://other:1".into();
    r.apis.push(copy);
    let c = compile(&r);
    let vs: Vec<_> = c.verdicts.iter().filter(|v| v.kind == Kind::Api).collect();
    assert_eq!(vs.len(), 2);
    assert_eq!(vs[0].phase, Phase::Active);
    assert_eq!(vs[1].reason, reasons::DUPLICATE_RESOURCE);
    assert_eq!(c.config.apis[0].upstream.url, "http://127.0.0.1:9001");
    assert_eq!(c.config.clients.len(), 2);
}

// ------------------------------------------------------------------------- plans

#[test]
fn plan_with_more_than_sixteen_limits_is_invalid() {
    let mut r = fixture();
    let limits = &mut plan(&mut r, "basic").spec.rate_limits;
    let first = limits[0].clone();
    limits.resize(MAX_RATE_LIMITS, first.clone());
    assert_active(&compile(&r), Kind::Plan, "basic");
    plan(&mut r, "basic").spec.rate_limits.push(first);
    assert_invalid(
        &compile(&r),
        Kind::Plan,
        "basic",
        reasons::INVALID_RATE_LIMIT,
        "at most 16",
    );
}

#[test]
fn plan_with_zero_requests_is_invalid_and_the_rest_compiles() {
    let mut r = fixture();
    plan(&mut r, "basic").spec.rate_limits[1].requests = 0;
    let c = compile(&r);
    assert_invalid(
        &c,
        Kind::Plan,
        "basic",
        reasons::INVALID_RATE_LIMIT,
        "spec.rateLimits[1].requests",
    );
    assert_active(&c, Kind::Plan, "premium");
    // The Api still offers the plan (it exists), but its subscriptions cannot use it.
    assert_active(&c, Kind::Api, "mobile");
    assert_invalid(
        &c,
        Kind::Subscription,
        "demo-app-mobile",
        reasons::INVALID_REFERENCE,
        "plan basic is Invalid: spec.rateLimits[1].requests",
    );
    assert!(c.config.clients.is_empty());
    assert_eq!(c.config.plans.len(), 1);
}

#[test]
fn plan_without_rate_limits_is_valid() {
    let mut r = fixture();
    plan(&mut r, "basic").spec.rate_limits.clear();
    let c = compile(&r);
    assert_active(&c, Kind::Plan, "basic");
    assert!(get(&c, Kind::Plan, "basic").message.contains("unlimited"));
    assert!(c.config.plans[0].rate_limits.is_empty());
}

// ------------------------------------------------------------------------- apis

#[test]
fn path_prefix_rules() {
    for ok in [
        "/",
        "/mobile",
        "/v1/mobile",
        "/a-b_c.d~e",
        "/oauth2x",
        "/v1/login",
    ] {
        assert_eq!(check_path_prefix(ok), Ok(()), "{ok}");
    }
    for bad in [
        "",
        "mobile",
        "/mobile/",
        "//",
        "/mo?bile",
        "/a#b",
        "/a%20b",
        "/v1;x",
        "/a\\b",
        "/a b",
        "/a\tb",
        "/a/../b",
        "/..",
        "/a/./b",
        "/a//b",
        "/oauth2",
        "/OAuth2/x",
        "/login",
        "/signup",
        "/consent",
        "/.well-known/x",
    ] {
        assert!(check_path_prefix(bad).is_err(), "{bad:?} accepted");
    }
    let mut r = fixture();
    api(&mut r, "mobile").spec.path_prefix = "/mobile/".into();
    let c = compile(&r);
    assert_invalid(
        &c,
        Kind::Api,
        "mobile",
        reasons::INVALID_PATH_PREFIX,
        "\"/mobile\"",
    );
    assert!(c.config.apis.is_empty());
    assert_active(&c, Kind::Plan, "basic");
    assert_invalid(
        &c,
        Kind::Subscription,
        "demo-app-mobile",
        reasons::INVALID_REFERENCE,
        "api mobile is Invalid",
    );
}

const SECOND_API: &str = r#"
apiVersion: gatehouse.dev/v1alpha1
kind: Api
metadata: {name: NAME, namespace: NS}
spec:
  pathPrefix: PREFIX
  upstream: {url: "http://second:8080"}
"#;

fn second_api(r: &mut Resources, ns: &str, name: &str, prefix: &str) {
    add(
        r,
        &SECOND_API
            .replace("NAME", name)
            .replace("NS", ns)
            .replace("PREFIX", prefix),
    );
}

#[test]
fn path_prefix_conflict_older_wins() {
    // Without timestamps: namespace/name order decides ("demo/mobile" < "demo/zzz").
    let mut r = fixture();
    second_api(&mut r, "demo", "zzz", "/mobile");
    let c = compile(&r);
    assert_active(&c, Kind::Api, "mobile");
    assert_invalid(
        &c,
        Kind::Api,
        "zzz",
        reasons::PATH_PREFIX_CONFLICT,
        "demo/mobile",
    );
    assert_eq!(c.config.clients.len(), 2);

    // With timestamps, the older one wins even when its name sorts later.
    let mut r = fixture();
    second_api(&mut r, "demo", "aaa", "/mobile");
    created(&mut api(&mut r, "mobile").metadata, "2024-01-01T00:00:00Z");
    created(&mut api(&mut r, "aaa").metadata, "2024-06-01T00:00:00Z");
    let c = compile(&r);
    assert_active(&c, Kind::Api, "mobile");
    assert_invalid(
        &c,
        Kind::Api,
        "aaa",
        reasons::PATH_PREFIX_CONFLICT,
        "demo/mobile",
    );

    // ...and the other way round.
    created(&mut api(&mut r, "aaa").metadata, "2023-06-01T00:00:00Z");
    let c = compile(&r);
    assert_active(&c, Kind::Api, "aaa");
    assert_invalid(
        &c,
        Kind::Api,
        "mobile",
        reasons::PATH_PREFIX_CONFLICT,
        "demo/aaa",
    );
    assert_invalid(
        &c,
        Kind::Subscription,
        "demo-app-mobile",
        reasons::INVALID_REFERENCE,
        "api mobile is Invalid",
    );

    // Across namespaces too, and in any letter case: the gateway would refuse every path the
    // two claim ignoring case, so a newer "/Mobile" would take the older "/mobile" down.
    let mut r = fixture();
    second_api(&mut r, "other", "mobile", "/mobile");
    second_api(&mut r, "other", "upper", "/Mobile");
    second_api(&mut r, "other", "v2", "/MOBILE/v2");
    let c = compile(&r);
    assert_active(&c, Kind::Api, "mobile");
    for name in ["mobile", "upper"] {
        let v = c.verdict(Kind::Api, "other", name).unwrap();
        assert_eq!(v.reason, reasons::PATH_PREFIX_CONFLICT, "{name}");
        assert!(v.message.contains("demo/mobile"), "{}", v.message);
    }
    // A longer prefix in another namespace would take part of the older Api's paths.
    let v = c.verdict(Kind::Api, "other", "v2").unwrap();
    assert_eq!(v.reason, reasons::PATH_PREFIX_CONFLICT);
    assert!(v.message.contains("demo/mobile"), "{}", v.message);
}

#[test]
fn nested_prefixes_across_namespaces_need_disjoint_hosts() {
    // In one namespace a longer prefix is the owner's choice, whatever its case.
    let mut r = fixture();
    second_api(&mut r, "demo", "v2", "/MOBILE/v2");
    let c = compile(&r);
    assert_active(&c, Kind::Api, "mobile");
    assert_active(&c, Kind::Api, "v2");

    // Across namespaces, either way round: the older claim wins.
    let mut r = fixture();
    second_api(&mut r, "other", "deeper", "/mobile/orders");
    second_api(&mut r, "zother", "outer", "/Mob");
    second_api(&mut r, "aother", "sibling", "/mobiles");
    created(&mut api(&mut r, "mobile").metadata, "2024-01-01T00:00:00Z");
    let c = compile(&r);
    assert_active(&c, Kind::Api, "mobile");
    let deeper = c.verdict(Kind::Api, "other", "deeper").unwrap();
    assert_eq!(deeper.reason, reasons::PATH_PREFIX_CONFLICT);
    assert!(deeper.message.contains("demo/mobile"), "{}", deeper.message);
    // "/mob" does not contain "/mobile" on a segment boundary, nor "/mobiles" "/mobile".
    assert_eq!(
        c.verdict(Kind::Api, "zother", "outer").unwrap().phase,
        Phase::Active
    );
    assert_eq!(
        c.verdict(Kind::Api, "aother", "sibling").unwrap().phase,
        Phase::Active
    );
    // An older Api deeper down wins against a newer one above it.
    let mut r = fixture();
    second_api(&mut r, "other", "inner", "/Mobile/V1");
    created(&mut api(&mut r, "inner").metadata, "2023-01-01T00:00:00Z");
    created(&mut api(&mut r, "mobile").metadata, "2024-06-01T00:00:00Z");
    let c = compile(&r);
    assert_eq!(
        c.verdict(Kind::Api, "other", "inner").unwrap().phase,
        Phase::Active
    );
    let v = get(&c, Kind::Api, "mobile");
    assert_eq!(v.reason, reasons::PATH_PREFIX_CONFLICT);
    assert!(v.message.contains("other/inner"), "{}", v.message);

    // "/" contains every prefix.
    let mut r = fixture();
    second_api(&mut r, "other", "root", "/");
    let c = compile(&r);
    assert_active(&c, Kind::Api, "mobile");
    let v = c.verdict(Kind::Api, "other", "root").unwrap();
    assert_eq!(v.reason, reasons::PATH_PREFIX_CONFLICT);
    assert!(v.message.contains("contain one another"), "{}", v.message);

    // Disjoint hosts cannot take each other's requests; overlapping ones, or none, can.
    let mut r = fixture();
    api(&mut r, "mobile").spec.hosts = vec!["a.example.com".into()];
    second_api(&mut r, "other", "b", "/mobile/v2");
    api(&mut r, "b").spec.hosts = vec!["B.example.com:443".into()];
    second_api(&mut r, "other", "both", "/mobile/v3");
    api(&mut r, "both").spec.hosts = vec!["c.example.com".into(), "a.example.com".into()];
    second_api(&mut r, "other", "any", "/mobile/v4");
    second_api(&mut r, "other", "spelled", "/mobile/v5");
    api(&mut r, "spelled").spec.hosts = vec!["A.EXAMPLE.COM:8443".into()];
    let c = compile(&r);
    assert_active(&c, Kind::Api, "mobile");
    assert_eq!(
        c.verdict(Kind::Api, "other", "b").unwrap().phase,
        Phase::Active
    );
    for name in ["both", "any", "spelled"] {
        let v = c.verdict(Kind::Api, "other", name).unwrap();
        assert_eq!(v.reason, reasons::PATH_PREFIX_CONFLICT, "{name}");
    }
    // An older Api on every host against a newer one on some.
    let mut r = fixture();
    second_api(&mut r, "other", "hosted", "/mobile/v2");
    api(&mut r, "hosted").spec.hosts = vec!["b.example.com".into()];
    let c = compile(&r);
    let v = c.verdict(Kind::Api, "other", "hosted").unwrap();
    assert_eq!(v.reason, reasons::PATH_PREFIX_CONFLICT);
}

#[test]
fn an_api_keeps_the_prefix_it_served_when_an_older_one_moves_onto_it() {
    // other/old is older, then edits its prefix under (or onto) demo/mobile's.
    for moved in ["/mobile/orders", "/mobile", "/MOBILE"] {
        let mut r = fixture();
        second_api(&mut r, "other", "old", moved);
        created(&mut api(&mut r, "old").metadata, "2020-01-01T00:00:00Z");
        created(&mut api(&mut r, "mobile").metadata, "2024-01-01T00:00:00Z");
        // Without history the older claim wins...
        let c = compile(&r);
        assert_eq!(
            get(&c, Kind::Api, "mobile").reason,
            reasons::PATH_PREFIX_CONFLICT
        );
        // ...with the configuration served before, the incumbent keeps its prefix.
        let mut before = fixture();
        second_api(&mut before, "other", "old", "/elsewhere");
        let previous = compile(&before).config.apis;
        let c = compile_after(&r, &previous);
        assert_active(&c, Kind::Api, "mobile");
        let v = c.verdict(Kind::Api, "other", "old").unwrap();
        assert_eq!(v.reason, reasons::PATH_PREFIX_CONFLICT, "{moved}");
        assert!(v.message.contains("demo/mobile"), "{}", v.message);

        // An incumbent that widens its hosts, or changes its prefix, claims anew by age.
        let mut hosted = fixture();
        api(&mut hosted, "mobile").spec.hosts = vec!["a.example.com".into()];
        let previous = compile(&hosted).config.apis;
        let c = compile_after(&r, &previous);
        assert_eq!(
            get(&c, Kind::Api, "mobile").reason,
            reasons::PATH_PREFIX_CONFLICT
        );
        let mut renamed = fixture();
        api(&mut renamed, "mobile").spec.path_prefix = "/m".into();
        let previous = compile(&renamed).config.apis;
        let c = compile_after(&r, &previous);
        assert_eq!(
            get(&c, Kind::Api, "mobile").reason,
            reasons::PATH_PREFIX_CONFLICT
        );
    }
    // Two Apis served together before (nested across namespaces, by an older version) stay
    // served until one of them moves.
    let mut r = fixture();
    second_api(&mut r, "other", "deeper", "/mobile/orders");
    let mut previous = compile(&fixture()).config.apis;
    let mut deeper = previous[0].clone();
    deeper.id = "other/deeper".into();
    deeper.path_prefix = "/mobile/orders".into();
    previous.push(deeper);
    let c = compile_after(&r, &previous);
    assert_active(&c, Kind::Api, "mobile");
    assert_eq!(
        c.verdict(Kind::Api, "other", "deeper").unwrap().phase,
        Phase::Active
    );
    api(&mut r, "deeper").spec.path_prefix = "/mobile/order".into();
    let c = compile_after(&r, &previous);
    assert_active(&c, Kind::Api, "mobile");
    let v = c.verdict(Kind::Api, "other", "deeper").unwrap();
    assert_eq!(v.reason, reasons::PATH_PREFIX_CONFLICT);

    // Narrowing its hosts keeps the claim.
    let mut r = fixture();
    api(&mut r, "mobile").spec.hosts = vec!["A.example.com".into()];
    created(&mut api(&mut r, "mobile").metadata, "2024-01-01T00:00:00Z");
    second_api(&mut r, "other", "old", "/mobile/x");
    created(&mut api(&mut r, "old").metadata, "2020-01-01T00:00:00Z");
    let previous = compile(&fixture()).config.apis;
    let c = compile_after(&r, &previous);
    assert_active(&c, Kind::Api, "mobile");
}

#[test]
fn apis_are_sorted_longest_prefix_first() {
    let mut r = fixture();
    second_api(&mut r, "demo", "root", "/");
    second_api(&mut r, "demo", "deep", "/mobile/v2");
    second_api(&mut r, "demo", "abc", "/abcdef");
    second_api(&mut r, "demo", "zz", "/aaaaaa");
    let c = compile(&r);
    let prefixes: Vec<_> = c
        .config
        .apis
        .iter()
        .map(|a| a.path_prefix.as_str())
        .collect();
    assert_eq!(
        prefixes,
        ["/mobile/v2", "/aaaaaa", "/abcdef", "/mobile", "/"]
    );
}

#[test]
fn upstream_url_rules() {
    for (raw, normalized) in [
        ("http://127.0.0.1:9001", "http://127.0.0.1:9001"),
        ("http://Backend:8080/", "http://backend:8080"),
        ("https://b.example/v1/", "https://b.example/v1"),
        ("http://b:80/api", "http://b/api"),
        ("http://[::1]:8080/", "http://[::1]:8080"),
        ("http://my_svc.ns:80", "http://my_svc.ns"),
    ] {
        assert_eq!(normalize_upstream_url(raw).unwrap(), normalized, "{raw}");
    }
    for bad in [
        "",
        "backend:8080",
        "127.0.0.1:9001",
        "/relative",
        "ftp://b/",
        "file:///etc/passwd",
        "http://user:pw@b/",
        "http://user@b/",
        "http://b/?x=1",
        "http://b/?",
        "http://b/#frag",
        "http://b:99999/",
        // Characters the URL standard lets into a host name but HTTP does not.
        "http://backend{x}:8080",
        "http://a\"b/",
        "http://a`b/",
    ] {
        assert!(normalize_upstream_url(bad).is_err(), "{bad:?} accepted");
    }
    // Cloud metadata and link-local addresses, in the spellings the URL standard reads as them.
    for bad in [
        "http://169.254.169.254/latest/meta-data",
        "http://169.254.170.2",
        "http://2852039166/",
        "http://0xA9FEA9FE/",
        "http://0251.0376.0251.0376/",
        "http://[fe80::1]:8080",
        "http://[::ffff:169.254.169.254]/",
        "http://[fd00:ec2::254]/",
        "http://100.100.100.200/",
    ] {
        let e = normalize_upstream_url(bad).expect_err(bad);
        assert!(e.contains("metadata"), "{bad}: {e}");
    }
    for ok in [
        "http://10.0.0.1",
        "http://[fd00::1]",
        "http://169.255.0.1",
        "http://[::1]",
    ] {
        assert!(normalize_upstream_url(ok).is_ok(), "{ok}");
    }
    let long = format!("http://b/{}", "x".repeat(2100));
    assert!(normalize_upstream_url(&long).is_err());
    for (raw, shown) in [
        ("redis://:pw@h:6379/0", "redis://***@h:6379/0"),
        ("rediss://user:pw@h/?next=a@b", "rediss://***@h/?next=a@b"),
        ("redis://h:6379", "redis://h:6379"),
        ("not a url @ all", "not a url @ all"),
    ] {
        assert_eq!(without_user_info(raw), shown);
    }
    // A password in a rejected URL does not reach the message (status conditions, logs).
    for bad in [
        "http://user:s3cret@b/",
        "http://user:s3cret@b/?q=1",
        "ftp://u:s3cret@b",
    ] {
        let e = normalize_upstream_url(bad).unwrap_err();
        assert!(!e.contains("s3cret"), "{e}");
        assert!(e.contains("***@b"), "{e}");
    }
    let mut r = fixture();
    api(&mut r, "mobile").spec.upstream.url = "http://b/?x=1".into();
    let c = compile(&r);
    assert_invalid(
        &c,
        Kind::Api,
        "mobile",
        reasons::INVALID_UPSTREAM,
        "spec.upstream.url",
    );

    for timeout in [0, 86_401, u64::MAX] {
        let mut r = fixture();
        api(&mut r, "mobile").spec.upstream.timeout_seconds = timeout;
        assert_invalid(
            &compile(&r),
            Kind::Api,
            "mobile",
            reasons::INVALID_UPSTREAM,
            "timeoutSeconds",
        );
    }
    let mut r = fixture();
    api(&mut r, "mobile").spec.upstream.timeout_seconds = 86_400;
    assert_active(&compile(&r), Kind::Api, "mobile");
}

#[test]
fn dangling_plan_reference_invalidates_the_api_only() {
    let mut r = fixture();
    api(&mut r, "mobile").spec.plans.push("gold".into());
    second_api(&mut r, "demo", "other", "/other");
    let c = compile(&r);
    assert_invalid(
        &c,
        Kind::Api,
        "mobile",
        reasons::DANGLING_REFERENCE,
        "plan gold",
    );
    assert_active(&c, Kind::Api, "other");
    assert_active(&c, Kind::Plan, "basic");
    assert_eq!(c.config.apis.len(), 1);
    assert_invalid(
        &c,
        Kind::Subscription,
        "demo-app-mobile",
        reasons::INVALID_REFERENCE,
        "api mobile is Invalid",
    );

    // Plans of another namespace do not count.
    let mut r = fixture();
    second_api(&mut r, "other", "x", "/x");
    r.apis.last_mut().unwrap().spec.plans = vec!["basic".into()];
    let c = compile(&r);
    let v = c.verdict(Kind::Api, "other", "x").unwrap();
    assert_eq!(v.reason, reasons::DANGLING_REFERENCE);
    assert!(v.message.contains("namespace other"), "{}", v.message);
}

#[test]
fn scope_rules() {
    for ok in ["profile", "orders:read", "a!#$[]^~", "x"] {
        assert!(is_valid_scope_token(ok), "{ok}");
    }
    for bad in ["", "a b", "a\"b", "a\\b", "é", "a\tb"] {
        assert!(!is_valid_scope_token(bad), "{bad:?}");
    }
    let mut r = fixture();
    api(&mut r, "mobile").spec.auth.scopes.push(Scope {
        name: "orders read".into(),
        description: String::new(),
    });
    assert_invalid(
        &compile(&r),
        Kind::Api,
        "mobile",
        reasons::INVALID_SCOPE,
        "scopes[2]",
    );

    let mut r = fixture();
    api(&mut r, "mobile").spec.auth.scopes.push(Scope {
        name: "profile".into(),
        description: "again".into(),
    });
    assert_invalid(
        &compile(&r),
        Kind::Api,
        "mobile",
        reasons::INVALID_SCOPE,
        "more than once",
    );
}

#[test]
fn grant_rules() {
    let mut r = fixture();
    api(&mut r, "mobile").spec.auth.grants.clear();
    assert_invalid(
        &compile(&r),
        Kind::Api,
        "mobile",
        reasons::INVALID_GRANTS,
        "empty",
    );

    let mut r = fixture();
    api(&mut r, "mobile").spec.auth.grants = vec![GrantType::RefreshToken];
    assert_invalid(
        &compile(&r),
        Kind::Api,
        "mobile",
        reasons::INVALID_GRANTS,
        "without authorization_code",
    );

    let mut r = fixture();
    api(&mut r, "mobile").spec.auth.grants = vec![
        GrantType::ClientCredentials,
        GrantType::AuthorizationCode,
        GrantType::ClientCredentials,
    ];
    let c = compile(&r);
    assert_active(&c, Kind::Api, "mobile");
    assert_eq!(
        c.config.apis[0].grants,
        [GrantType::AuthorizationCode, GrantType::ClientCredentials]
    );
}

#[test]
fn host_rules() {
    assert_eq!(
        normalize_host("API.Example.com:8443").unwrap(),
        "api.example.com"
    );
    assert_eq!(normalize_host("localhost").unwrap(), "localhost");
    assert_eq!(normalize_host("10.0.0.1:80").unwrap(), "10.0.0.1");
    assert_eq!(normalize_host("[::1]:8080").unwrap(), "[::1]");
    assert_eq!(normalize_host("[FE80::1]").unwrap(), "[fe80::1]");
    for bad in [
        "",
        "bad host",
        "-a.com",
        "a-.com",
        "a..b",
        "host:abc",
        "host:",
        "host:123456",
        "a.com.",
        "*.example.com",
        "ex_ample.com",
        "[::1",
        "[nope]",
        "[::1]x",
    ] {
        assert!(normalize_host(bad).is_err(), "{bad:?} accepted");
    }
    let mut r = fixture();
    api(&mut r, "mobile").spec.hosts = vec!["API.example.com:443".into(), "api.example.com".into()];
    let c = compile(&r);
    assert_eq!(c.config.apis[0].hosts, ["api.example.com"]);

    api(&mut r, "mobile").spec.hosts.push("not a host".into());
    assert_invalid(
        &compile(&r),
        Kind::Api,
        "mobile",
        reasons::INVALID_HOST,
        "not a host",
    );
}

#[test]
fn ttl_rules() {
    // Zero, and beyond ten years (u64::MAX overflowed `now + ttl` when a token was issued).
    for ttl in [0, MAX_TOKEN_TTL_SECS + 1, u64::MAX] {
        let mut r = fixture();
        api(&mut r, "mobile").spec.auth.access_token_ttl_seconds = ttl;
        assert_invalid(
            &compile(&r),
            Kind::Api,
            "mobile",
            reasons::INVALID_TTL,
            "accessTokenTtlSeconds",
        );
        let mut r = fixture();
        api(&mut r, "mobile").spec.auth.refresh_token_ttl_seconds = ttl;
        assert_invalid(
            &compile(&r),
            Kind::Api,
            "mobile",
            reasons::INVALID_TTL,
            "refreshTokenTtlSeconds",
        );
    }
    let mut r = fixture();
    let auth = &mut api(&mut r, "mobile").spec.auth;
    auth.access_token_ttl_seconds = MAX_TOKEN_TTL_SECS;
    auth.refresh_token_ttl_seconds = MAX_TOKEN_TTL_SECS;
    assert_active(&compile(&r), Kind::Api, "mobile");
}

#[test]
fn all_api_problems_are_reported_the_first_reason_wins() {
    let mut r = fixture();
    let a = api(&mut r, "mobile");
    a.spec.path_prefix = "nope".into();
    a.spec.upstream.url = "ftp://x".into();
    let c = compile(&r);
    let v = get(&c, Kind::Api, "mobile");
    assert_eq!(v.reason, reasons::INVALID_PATH_PREFIX);
    assert!(v.message.contains("spec.upstream.url"), "{}", v.message);
}

// ------------------------------------------------------------------------- applications

#[test]
fn redirect_uri_rules() {
    for ok in [
        "com.example.demo:/oauth2redirect",
        "myapp://callback",
        "http://127.0.0.1/callback",
        "http://127.0.0.1:51004/cb",
        "http://[::1]/cb",
        "http://localhost:8080/cb",
        "https://app.example.com/cb?x=1",
        "HTTPS://app.example.com/cb",
    ] {
        assert_eq!(validate_redirect_uri(ok), Ok(()), "{ok}");
    }
    for bad in [
        "",
        "/relative/cb",
        "callback",
        "http://example.com/cb",
        "http://127.0.0.2/cb",
        "http://localhost.example.com/cb",
        "https://app.example.com/cb#frag",
        "myapp://cb#",
        "javascript:alert(1)",
        "JavaScript:alert(1)",
        "data:text/html,hi",
        "file:///etc/passwd",
        "vbscript:msgbox",
        " https://app.example.com/cb",
        "https://app.example.com/c b",
    ] {
        assert!(validate_redirect_uri(bad).is_err(), "{bad:?} accepted");
    }
}

#[test]
fn invalid_redirect_uri_invalidates_the_application_and_its_subscriptions_only() {
    let mut r = fixture();
    app(&mut r, "demo-app")
        .spec
        .redirect_uris
        .push("javascript:alert(1)".into());
    let c = compile(&r);
    assert_invalid(
        &c,
        Kind::Application,
        "demo-app",
        reasons::INVALID_REDIRECT_URI,
        "spec.redirectUris[4]",
    );
    assert_invalid(
        &c,
        Kind::Subscription,
        "demo-app-mobile",
        reasons::INVALID_REFERENCE,
        "application demo-app is Invalid: spec.redirectUris[4]",
    );
    assert_active(&c, Kind::Application, "demo-service");
    assert_active(&c, Kind::Subscription, "demo-service-mobile");
    assert_eq!(c.config.clients.len(), 1);
}

// ------------------------------------------------------------------------- subscriptions

#[test]
fn missing_references_are_each_named() {
    let mut r = fixture();
    let s = sub(&mut r, "demo-app-mobile");
    s.spec.application = "ghost".into();
    s.spec.plan = "gold".into();
    let c = compile(&r);
    let v = get(&c, Kind::Subscription, "demo-app-mobile");
    assert_eq!(v.reason, reasons::DANGLING_REFERENCE);
    assert!(
        v.message
            .contains("application ghost does not exist in namespace demo"),
        "{}",
        v.message
    );
    assert!(
        v.message.contains("plan gold does not exist"),
        "{}",
        v.message
    );
    assert!(!v.message.contains("api mobile"), "{}", v.message);
    assert_active(&c, Kind::Subscription, "demo-service-mobile");

    // References never cross namespaces.
    let mut r = fixture();
    let mut s = sub(&mut r, "demo-app-mobile").clone();
    s.metadata.namespace = Some("other".into());
    s.spec.client_id = Some("other-client".into());
    r.subscriptions.push(s);
    let c = compile(&r);
    let v = c
        .verdict(Kind::Subscription, "other", "demo-app-mobile")
        .unwrap();
    assert_eq!(v.reason, reasons::DANGLING_REFERENCE);
    assert_eq!(c.config.clients.len(), 2);
}

#[test]
fn plan_must_be_offered_by_the_api() {
    let mut r = fixture();
    add(
        &mut r,
        "apiVersion: gatehouse.dev/v1alpha1\nkind: Plan\nmetadata: {name: gold, namespace: demo}\nspec: {}\n",
    );
    sub(&mut r, "demo-app-mobile").spec.plan = "gold".into();
    let c = compile(&r);
    assert_invalid(
        &c,
        Kind::Subscription,
        "demo-app-mobile",
        reasons::PLAN_NOT_OFFERED,
        "basic, premium",
    );
    assert_active(&c, Kind::Subscription, "demo-service-mobile");
}

#[test]
fn subscription_grants_must_be_enabled_on_the_api() {
    let mut r = fixture();
    api(&mut r, "mobile").spec.auth.grants = vec![GrantType::AuthorizationCode];
    let c = compile(&r);
    assert_invalid(
        &c,
        Kind::Subscription,
        "demo-service-mobile",
        reasons::GRANT_NOT_ALLOWED,
        "client_credentials",
    );
    assert_active(&c, Kind::Subscription, "demo-app-mobile");
    assert_eq!(
        client(&c, "demo-app-mobile").unwrap().grants,
        [GrantType::AuthorizationCode]
    );
}

#[test]
fn explicit_grants_are_used_sorted_and_deduplicated() {
    let mut r = fixture();
    sub(&mut r, "demo-app-mobile").spec.grants = Some(vec![
        GrantType::RefreshToken,
        GrantType::AuthorizationCode,
        GrantType::RefreshToken,
    ]);
    let c = compile(&r);
    assert_eq!(
        client(&c, "demo-app-mobile").unwrap().grants,
        [GrantType::AuthorizationCode, GrantType::RefreshToken]
    );
    sub(&mut r, "demo-app-mobile").spec.grants = Some(vec![GrantType::AuthorizationCode]);
    let c = compile(&r);
    assert_eq!(
        client(&c, "demo-app-mobile").unwrap().grants,
        [GrantType::AuthorizationCode]
    );
    sub(&mut r, "demo-app-mobile").spec.grants = Some(vec![GrantType::RefreshToken]);
    assert_invalid(
        &compile(&r),
        Kind::Subscription,
        "demo-app-mobile",
        reasons::INVALID_GRANTS,
        "refresh_token",
    );
}

#[test]
fn public_client_cannot_ask_for_client_credentials() {
    let mut r = fixture();
    sub(&mut r, "demo-app-mobile").spec.grants = Some(vec![
        GrantType::AuthorizationCode,
        GrantType::ClientCredentials,
    ]);
    let c = compile(&r);
    assert_invalid(
        &c,
        Kind::Subscription,
        "demo-app-mobile",
        reasons::PUBLIC_CLIENT_CREDENTIALS,
        "public client",
    );
    assert_active(&c, Kind::Subscription, "demo-service-mobile");
}

#[test]
fn empty_grant_set_is_invalid() {
    // Public client on an Api that only offers client_credentials: nothing left by default.
    let mut r = fixture();
    api(&mut r, "mobile").spec.auth.grants = vec![GrantType::ClientCredentials];
    let c = compile(&r);
    assert_invalid(
        &c,
        Kind::Subscription,
        "demo-app-mobile",
        reasons::NO_GRANTS,
        "no grants",
    );
    assert_active(&c, Kind::Subscription, "demo-service-mobile");

    let mut r = fixture();
    sub(&mut r, "demo-app-mobile").spec.grants = Some(vec![]);
    assert_invalid(
        &compile(&r),
        Kind::Subscription,
        "demo-app-mobile",
        reasons::NO_GRANTS,
        "spec.grants",
    );
}

#[test]
fn authorization_code_needs_redirect_uris() {
    let mut r = fixture();
    app(&mut r, "demo-app").spec.redirect_uris.clear();
    let c = compile(&r);
    assert_active(&c, Kind::Application, "demo-app");
    assert_invalid(
        &c,
        Kind::Subscription,
        "demo-app-mobile",
        reasons::NO_REDIRECT_URIS,
        "redirectUris",
    );

    // A confidential client with the Api's default grants gets authorization_code too.
    let mut r = fixture();
    sub(&mut r, "demo-service-mobile").spec.grants = None;
    assert_invalid(
        &compile(&r),
        Kind::Subscription,
        "demo-service-mobile",
        reasons::NO_REDIRECT_URIS,
        "[client_credentials]",
    );
}

#[test]
fn confidential_client_needs_a_secret() {
    // No reference at all.
    let mut r = fixture();
    sub(&mut r, "demo-service-mobile").spec.client_secret_ref = None;
    let c = compile(&r);
    assert_invalid(
        &c,
        Kind::Subscription,
        "demo-service-mobile",
        reasons::MISSING_CLIENT_SECRET,
        "operator generate",
    );
    assert_active(&c, Kind::Subscription, "demo-app-mobile");

    // The Secret does not exist.
    let mut r = fixture();
    r.secrets.clear();
    let c = compile(&r);
    assert_invalid(
        &c,
        Kind::Subscription,
        "demo-service-mobile",
        reasons::MISSING_CLIENT_SECRET,
        "kubectl create secret generic demo-service-mobile-credentials",
    );

    // The Secret lives in another namespace.
    let mut r = fixture();
    r.secrets[0].metadata.namespace = Some("other".into());
    assert_invalid(
        &compile(&r),
        Kind::Subscription,
        "demo-service-mobile",
        reasons::MISSING_CLIENT_SECRET,
        "does not exist in namespace demo",
    );

    // The key is missing.
    let mut r = fixture();
    sub(&mut r, "demo-service-mobile")
        .spec
        .client_secret_ref
        .as_mut()
        .unwrap()
        .key = "password".into();
    assert_invalid(
        &compile(&r),
        Kind::Subscription,
        "demo-service-mobile",
        reasons::MISSING_CLIENT_SECRET,
        "no key password",
    );

    // Too short.
    let mut r = fixture();
    r.secrets[0]
        .data
        .as_mut()
        .unwrap()
        .insert("clientSecret".into(), ByteString(b"short".to_vec()));
    assert_invalid(
        &compile(&r),
        Kind::Subscription,
        "demo-service-mobile",
        reasons::WEAK_CLIENT_SECRET,
        "5 bytes",
    );

    // The operator's Secret for a 242-character subscription would get a 254-character name.
    for (len, fits) in [(241, true), (242, false)] {
        let mut r = fixture();
        let name = "s".repeat(len);
        let generated = generated_secret_name(&name);
        let s = sub(&mut r, "demo-service-mobile");
        s.metadata.name = Some(name.clone());
        s.spec.client_secret_ref = None;
        s.spec.client_id = Some("long-name-client".into());
        s.status
            .get_or_insert_with(Default::default)
            .credentials_secret = Some(generated.clone());
        s.metadata.uid = Some("u-long".into());
        s.status.as_mut().unwrap().credentials_secret_uid = Some("uid-of-the-secret".into());
        r.secrets[0].metadata.uid = Some("uid-of-the-secret".into());
        r.secrets[0].metadata.name = Some(generated);
        r.secrets[0].metadata.owner_references = Some(vec![
            k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
                api_version: "gatehouse.dev/v1alpha1".into(),
                kind: "Subscription".into(),
                name: name.clone(),
                uid: "u-long".into(),
                controller: Some(true),
                block_owner_deletion: None,
            },
        ]);
        let c = compile(&r);
        if fits {
            assert_active(&c, Kind::Subscription, &name);
        } else {
            assert_invalid(
                &c,
                Kind::Subscription,
                &name,
                reasons::MISSING_CLIENT_SECRET,
                "254 characters long, but Kubernetes names are at most 253: shorten the subscription's name to at most 241",
            );
        }
    }
}

#[test]
fn secret_is_read_from_data_and_string_data() {
    let mut r = fixture();
    // Secret as the API server returns it: only `data` (base64 on the wire).
    add(
        &mut r,
        "apiVersion: v1\nkind: Secret\nmetadata: {name: b64, namespace: demo, labels: {gatehouse.dev/client-secret: \"true\"}}\ndata: {clientSecret: MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=}\n",
    );
    sub(&mut r, "demo-service-mobile")
        .spec
        .client_secret_ref
        .as_mut()
        .unwrap()
        .name = "b64".into();
    let c = compile(&r);
    assert_eq!(
        client(&c, "demo-service-mobile")
            .unwrap()
            .secret_sha256
            .as_deref(),
        Some(hex::encode(Sha256::digest(b"0123456789abcdef0123456789abcdef")).as_str())
    );

    // A Secret built in code with stringData only (not merged by the manifest loader).
    let mut r = fixture();
    let s = &mut r.secrets[0];
    s.string_data = s.data.take().map(|d| {
        d.into_iter()
            .map(|(k, v)| (k, String::from_utf8(v.0).unwrap()))
            .collect()
    });
    let c = compile(&r);
    assert_active(&c, Kind::Subscription, "demo-service-mobile");
}

#[test]
fn a_secret_ref_needs_the_opt_in_label() {
    let missing = {
        let mut r = fixture();
        r.secrets.clear();
        get(&compile(&r), Kind::Subscription, "demo-service-mobile")
            .message
            .clone()
    };
    for labels in [
        None,
        Some([("gatehouse.dev/client-secret", "false")]),
        Some([("app.kubernetes.io/name", "db")]),
    ] {
        let mut r = fixture();
        r.secrets[0].metadata.labels =
            labels.map(|l| l.map(|(k, v)| (k.to_string(), v.to_string())).into());
        let c = compile(&r);
        assert_invalid(
            &c,
            Kind::Subscription,
            "demo-service-mobile",
            reasons::MISSING_CLIENT_SECRET,
            "labelled gatehouse.dev/client-secret=true",
        );
        assert!(client(&c, "demo-service-mobile").is_none());
        // Word for word what a missing Secret says: nothing about an unlabelled one's keys or
        // length, not even that it exists.
        assert_eq!(
            get(&c, Kind::Subscription, "demo-service-mobile").message,
            missing,
            "{labels:?}"
        );
    }
    // An unlabelled Secret with a short value and no such key: still only "not labelled".
    let mut r = fixture();
    r.secrets[0].metadata.labels = None;
    let s = sub(&mut r, "demo-service-mobile");
    s.spec.client_secret_ref.as_mut().unwrap().key = "password".into();
    let c = compile(&r);
    let message = &get(&c, Kind::Subscription, "demo-service-mobile").message;
    assert!(!message.contains("no key"), "{message}");
    assert!(!message.contains("bytes long"), "{message}");
}

/// The fixture's demo-service-mobile as the operator leaves it without clientSecretRef: its
/// status names the generated Secret and the uid it was created with. The Secret's
/// ownerReference is `owner` (kind, uid).
fn generated_secret_fixture(owner: Option<(&str, &str)>, labelled: bool) -> Resources {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
    let mut r = fixture();
    if !labelled {
        r.secrets[0].metadata.labels = None;
    }
    r.secrets[0].metadata.owner_references = owner.map(|(kind, uid)| {
        vec![OwnerReference {
            api_version: "gatehouse.dev/v1alpha1".into(),
            kind: kind.into(),
            name: "demo-service-mobile".into(),
            uid: uid.into(),
            controller: Some(true),
            block_owner_deletion: Some(false),
        }]
    });
    let s = sub(&mut r, "demo-service-mobile");
    s.metadata.uid = Some("uid-of-the-subscription".into());
    s.spec.client_secret_ref = None;
    s.status = Some(crate::resources::ResourceStatus {
        credentials_secret: Some("demo-service-mobile-credentials".into()),
        credentials_secret_uid: Some("uid-of-the-secret".into()),
        ..Default::default()
    });
    r.secrets[0].metadata.uid = Some("uid-of-the-secret".into());
    r
}

#[test]
fn generated_credentials_secret_from_status_is_used() {
    // The operator's own Secret carries no opt-in label: the subscription controls it.
    let r = generated_secret_fixture(Some(("Subscription", "uid-of-the-subscription")), false);
    let c = compile(&r);
    assert_active(&c, Kind::Subscription, "demo-service-mobile");
    assert!(
        client(&c, "demo-service-mobile")
            .unwrap()
            .secret_sha256
            .is_some()
    );
}

/// A Secret that only has the generated name is never adopted: not another workload's, not
/// another subscription's, not even one labelled for clientSecretRef (the well-known demo
/// secret is, and "remove spec.clientSecretRef to let the operator generate one" must not
/// keep it). The status says nothing of its keys or length.
#[test]
fn a_secret_with_the_generated_name_is_not_adopted() {
    for (owner, labelled) in [
        (None, false),
        (None, true),
        (Some(("Subscription", "uid-of-another-subscription")), false),
        (Some(("Deployment", "uid-of-the-subscription")), false),
    ] {
        let mut r = generated_secret_fixture(owner, labelled);
        // A short value: a leak would say how short.
        r.secrets[0].string_data = Some([("clientSecret".to_string(), "short".to_string())].into());
        r.secrets[0].data = None;
        assert_not_adopted(&r, &format!("{owner:?} {labelled}"));
    }
}

/// demo-service-mobile is refused as not having its generated credentials, its status says
/// nothing of the Secret's value, and it has no client.
fn assert_not_adopted(r: &Resources, case: &str) {
    let c = compile(r);
    assert_invalid(
        &c,
        Kind::Subscription,
        "demo-service-mobile",
        reasons::MISSING_CLIENT_SECRET,
        "is not this subscription's generated credentials",
    );
    let message = &get(&c, Kind::Subscription, "demo-service-mobile").message;
    assert!(!message.contains("bytes long"), "{case}: {message}");
    assert!(client(&c, "demo-service-mobile").is_none(), "{case}");
}

/// A Secret controlled by the subscription but not the one the operator recorded creating: a
/// Secret written by someone allowed to create Secrets but not to read them, with an
/// ownerReference copied from the subscription (its uid is public), before the operator
/// created its own (while the subscription waited for approval) or after the operator's was
/// deleted. Its secret is the writer's choice, so it is never used.
#[test]
fn a_forged_owner_reference_is_not_enough() {
    let owner = Some(("Subscription", "uid-of-the-subscription"));
    for recorded in [None, Some(""), Some("uid-of-the-deleted-secret")] {
        let mut r = generated_secret_fixture(owner, false);
        r.secrets[0].metadata.uid = Some("uid-of-the-forged-secret".into());
        let status = sub(&mut r, "demo-service-mobile").status.as_mut().unwrap();
        status.credentials_secret_uid = recorded.map(str::to_string);
        assert_not_adopted(&r, &format!("{recorded:?}"));
    }
    // A Secret without a uid (never from the API server) matches no record either.
    let mut r = generated_secret_fixture(owner, false);
    r.secrets[0].metadata.uid = None;
    sub(&mut r, "demo-service-mobile")
        .status
        .as_mut()
        .unwrap()
        .credentials_secret_uid = Some(String::new());
    assert!(client(&compile(&r), "demo-service-mobile").is_none());
}

#[test]
fn public_client_ignores_a_secret_ref() {
    let mut r = fixture();
    sub(&mut r, "demo-app-mobile").spec.client_secret_ref = Some(SecretKeyRef {
        name: "does-not-exist".into(),
        key: "clientSecret".into(),
    });
    let c = compile(&r);
    assert_active(&c, Kind::Subscription, "demo-app-mobile");
    assert_eq!(client(&c, "demo-app-mobile").unwrap().secret_sha256, None);
}

#[test]
fn client_id_comes_from_spec_then_status_then_name() {
    let mut r = fixture();
    let s = sub(&mut r, "demo-app-mobile");
    s.spec.client_id = None;
    let c = compile(&r);
    assert!(client(&c, "demo-app-mobile").is_some());

    let s = sub(&mut r, "demo-app-mobile");
    s.status = Some(crate::resources::ResourceStatus {
        client_id: Some("generated-1234".into()),
        ..Default::default()
    });
    let c = compile(&r);
    assert!(client(&c, "generated-1234").is_some());
    assert_eq!(
        get(&c, Kind::Subscription, "demo-app-mobile")
            .client_id
            .as_deref(),
        Some("generated-1234")
    );

    sub(&mut r, "demo-app-mobile").spec.client_id = Some("from-spec".into());
    assert!(client(&compile(&r), "from-spec").is_some());
}

#[test]
fn client_id_format() {
    for ok in ["a", "demo-app_1.x~y", &"x".repeat(128)] {
        assert!(is_valid_client_id(ok), "{ok}");
    }
    for bad in ["", "a b", "a/b", "a:b", "é", &"x".repeat(129)] {
        assert!(!is_valid_client_id(bad), "{bad:?}");
    }
    let mut r = fixture();
    sub(&mut r, "demo-app-mobile").spec.client_id = Some("has space".into());
    let c = compile(&r);
    assert_invalid(
        &c,
        Kind::Subscription,
        "demo-app-mobile",
        reasons::INVALID_CLIENT_ID,
        "spec.clientId",
    );
    assert_eq!(
        get(&c, Kind::Subscription, "demo-app-mobile").client_id,
        None
    );
    assert_active(&c, Kind::Subscription, "demo-service-mobile");
}

#[test]
fn client_id_conflict_older_wins() {
    let mut r = fixture();
    sub(&mut r, "demo-service-mobile").spec.client_id = Some("demo-app-mobile".into());
    created(
        &mut sub(&mut r, "demo-service-mobile").metadata,
        "2024-01-01T00:00:00Z",
    );
    created(
        &mut sub(&mut r, "demo-app-mobile").metadata,
        "2024-02-01T00:00:00Z",
    );
    let c = compile(&r);
    assert_active(&c, Kind::Subscription, "demo-service-mobile");
    assert_invalid(
        &c,
        Kind::Subscription,
        "demo-app-mobile",
        reasons::CLIENT_ID_CONFLICT,
        "demo/demo-service-mobile",
    );
    assert_eq!(
        get(&c, Kind::Subscription, "demo-app-mobile").client_id,
        None
    );
    assert_eq!(c.config.clients.len(), 1);
    assert_eq!(
        client(&c, "demo-app-mobile").unwrap().subscription,
        "demo/demo-service-mobile"
    );

    // Swap the ages: the other one wins now.
    created(
        &mut sub(&mut r, "demo-service-mobile").metadata,
        "2024-03-01T00:00:00Z",
    );
    let c = compile(&r);
    assert_active(&c, Kind::Subscription, "demo-app-mobile");
    assert_invalid(
        &c,
        Kind::Subscription,
        "demo-service-mobile",
        reasons::CLIENT_ID_CONFLICT,
        "demo/demo-app-mobile",
    );

    // The older one keeps its client_id even while it is itself invalid.
    app(&mut r, "demo-app")
        .spec
        .redirect_uris
        .push("http://evil.example/cb".into());
    let c = compile(&r);
    assert_invalid(
        &c,
        Kind::Subscription,
        "demo-app-mobile",
        reasons::INVALID_REFERENCE,
        "demo-app is Invalid",
    );
    assert_invalid(
        &c,
        Kind::Subscription,
        "demo-service-mobile",
        reasons::CLIENT_ID_CONFLICT,
        "demo/demo-app-mobile",
    );
}

const PREMIUM_SUB: &str = r#"
apiVersion: gatehouse.dev/v1alpha1
kind: Subscription
metadata: {name: demo-app-premium, namespace: demo}
spec: {application: demo-app, api: mobile, plan: premium}
"#;

#[test]
fn approval_required_plans_stay_pending_until_annotated() {
    let mut r = fixture();
    sub(&mut r, "demo-app-mobile").spec.plan = "premium".into();
    let c = compile(&r);
    let v = get(&c, Kind::Subscription, "demo-app-mobile");
    assert_eq!(v.phase, Phase::PendingApproval);
    assert_eq!(v.reason, reasons::AWAITING_APPROVAL);
    assert!(
        v.message.contains(
            "kubectl annotate subscriptions.gatehouse.dev demo-app-mobile -n demo gatehouse.dev/approved=true --overwrite"
        ),
        "{}",
        v.message
    );
    assert_eq!(v.client_id.as_deref(), Some("demo-app-mobile"));
    assert_eq!(v.ready_condition(None).status, "False");
    assert!(client(&c, "demo-app-mobile").is_none());
    assert_active(&c, Kind::Subscription, "demo-service-mobile");

    let annotate = |r: &mut Resources, value: &str| {
        sub(r, "demo-app-mobile").metadata.annotations =
            Some([(APPROVED_ANNOTATION.to_string(), value.to_string())].into());
    };
    annotate(&mut r, "false");
    assert_eq!(
        get(&compile(&r), Kind::Subscription, "demo-app-mobile").phase,
        Phase::PendingApproval
    );
    annotate(&mut r, "true");
    let c = compile(&r);
    assert_active(&c, Kind::Subscription, "demo-app-mobile");
    assert_eq!(client(&c, "demo-app-mobile").unwrap().plan, "demo/premium");
}

#[test]
fn invalid_beats_pending() {
    let mut r = fixture();
    let s = sub(&mut r, "demo-app-mobile");
    s.spec.plan = "premium".into();
    s.spec.client_id = Some("bad id".into());
    assert_invalid(
        &compile(&r),
        Kind::Subscription,
        "demo-app-mobile",
        reasons::INVALID_CLIENT_ID,
        "bad id",
    );
}

#[test]
fn second_subscription_of_an_application_to_an_api_is_a_duplicate() {
    let mut r = fixture();
    add(&mut r, PREMIUM_SUB);
    let c = compile(&r);
    // No timestamps: name order, demo-app-mobile < demo-app-premium.
    assert_active(&c, Kind::Subscription, "demo-app-mobile");
    assert_invalid(
        &c,
        Kind::Subscription,
        "demo-app-premium",
        reasons::DUPLICATE_SUBSCRIPTION,
        "demo/demo-app-mobile",
    );
    assert_eq!(
        get(&c, Kind::Subscription, "demo-app-premium")
            .client_id
            .as_deref(),
        Some("demo-app-premium")
    );

    // The older one wins, whatever the names.
    created(
        &mut sub(&mut r, "demo-app-premium").metadata,
        "2024-01-01T00:00:00Z",
    );
    created(
        &mut sub(&mut r, "demo-app-mobile").metadata,
        "2024-01-02T00:00:00Z",
    );
    let c = compile(&r);
    assert_eq!(
        get(&c, Kind::Subscription, "demo-app-premium").phase,
        Phase::PendingApproval
    );
    assert_invalid(
        &c,
        Kind::Subscription,
        "demo-app-mobile",
        reasons::DUPLICATE_SUBSCRIPTION,
        "demo/demo-app-premium",
    );
    assert_eq!(c.config.clients.len(), 1);
}

#[test]
fn resources_with_a_timestamp_are_older_than_those_without() {
    let mut r = fixture();
    add(&mut r, PREMIUM_SUB);
    created(
        &mut sub(&mut r, "demo-app-premium").metadata,
        "2024-01-01T00:00:00Z",
    );
    let c = compile(&r);
    assert_invalid(
        &c,
        Kind::Subscription,
        "demo-app-mobile",
        reasons::DUPLICATE_SUBSCRIPTION,
        "demo-app-premium",
    );
}

#[test]
fn rest_still_compiles_when_many_things_are_wrong() {
    let mut r = fixture();
    add(
        &mut r,
        &SECOND_API
            .replace("NAME", "broken")
            .replace("NS", "demo")
            .replace("PREFIX", "nope"),
    );
    add(
        &mut r,
        "apiVersion: gatehouse.dev/v1alpha1\nkind: Plan\nmetadata: {name: bad, namespace: demo}\nspec: {rateLimits: [{requests: 0, per: minute}]}\n",
    );
    add(
        &mut r,
        "apiVersion: gatehouse.dev/v1alpha1\nkind: Subscription\nmetadata: {name: orphan, namespace: demo}\nspec: {application: nobody, api: broken, plan: bad}\n",
    );
    let c = compile(&r);
    assert_eq!(c.verdicts.len(), 10);
    assert_eq!(c.problems().count(), 3);
    let v = get(&c, Kind::Subscription, "orphan");
    assert_eq!(v.reason, reasons::DANGLING_REFERENCE);
    assert!(v.message.contains("api broken is Invalid"), "{}", v.message);
    assert!(v.message.contains("plan bad is Invalid"), "{}", v.message);
    assert_eq!(c.config.clients.len(), 2);
    assert_eq!(c.config.apis.len(), 1);
    assert_eq!(c.config.plans.len(), 2);
}

#[test]
fn rate_limit_key_and_period_reach_the_config() {
    let mut r = fixture();
    plan(&mut r, "premium").spec.rate_limits = vec![RateLimit {
        requests: 5,
        per: Period::Hour,
        key: LimitKey::User,
    }];
    let c = compile(&r);
    assert_eq!(
        c.config.plans[1].rate_limits,
        [RateLimitConfig {
            requests: 5,
            per_seconds: 3600,
            key: LimitKey::User
        }]
    );
}

/// One resource cannot make the published configuration too large for everybody: a spec over
/// 32 KiB (as JSON) is Invalid, and what refers to it with it; the rest is compiled.
#[test]
fn oversized_specs_are_invalid_alone() {
    let mut r = fixture();
    second_api(&mut r, "other", "small", "/small");
    api(&mut r, "mobile").spec.auth.scopes[0].description = "x".repeat(MAX_SPEC_BYTES);
    let c = compile(&r);
    assert_invalid(&c, Kind::Api, "mobile", reasons::TOO_LARGE, "at most 32768");
    assert_eq!(
        c.verdict(Kind::Api, "other", "small").unwrap().phase,
        Phase::Active
    );
    assert_eq!(
        c.verdict(Kind::Subscription, "demo", "demo-app-mobile")
            .unwrap()
            .phase,
        Phase::Invalid
    );
    // Just under the bound is fine.
    let mut r = fixture();
    api(&mut r, "mobile").spec.auth.scopes[0].description = "x".repeat(MAX_SPEC_BYTES - 1_024);
    assert_active(&compile(&r), Kind::Api, "mobile");
}

/// The chart's gateway NetworkPolicy keeps the gateways away from the addresses this crate
/// refuses as upstreams (a second layer): every `except` block is metadata, and each metadata
/// address below (every one `is_metadata_ip` names, and the NAT64 spellings of the IPv4
/// ones) sits in one.
#[test]
fn the_charts_network_policy_excludes_the_metadata_addresses() {
    use std::net::IpAddr;
    let policy = include_str!("../../../charts/gatehouse/templates/networkpolicy.yaml");
    // `except: [a, b]` on one line (IPv4) or `- a` lines under `except:` (IPv6).
    let mut cidrs: Vec<&str> = vec![];
    let mut in_list = false;
    for line in policy.lines().map(str::trim) {
        if let Some(inline) = line.strip_prefix("except: [") {
            cidrs.extend(inline.trim_end_matches(']').split(", "));
        }
        in_list = match line.strip_prefix("- ") {
            Some(item) if in_list && item.contains('/') => {
                cidrs.push(item);
                true
            }
            _ => line == "except:" || (in_list && line.starts_with('#')),
        };
    }
    let blocks: Vec<(IpAddr, u32)> = cidrs
        .into_iter()
        .map(|c| {
            let (ip, len) = c.trim_matches('"').split_once('/').expect("a CIDR");
            (
                ip.parse().expect("an address"),
                len.parse().expect("a length"),
            )
        })
        .collect();
    assert_eq!(blocks.len(), 12, "{blocks:?}");
    let inside = |ip: IpAddr, (net, len): (IpAddr, u32)| match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) => {
            len == 0 || (u32::from(a) ^ u32::from(n)) >> (32 - len) == 0
        }
        (IpAddr::V6(a), IpAddr::V6(n)) => {
            len == 0 || (u128::from(a) ^ u128::from(n)) >> (128 - len) == 0
        }
        _ => false,
    };
    for &(net, _) in &blocks {
        assert!(is_metadata_ip(net), "{net} is excluded but not metadata");
    }
    for ip in [
        "169.254.169.254",
        "169.254.170.23",
        "100.100.100.200",
        "168.63.129.16",
        "192.0.0.192",
        "fe80::a9fe:a9fe",
        "fd00:ec2::254",
        "fd00:ec2::23",
        "fd20:ce::254",
        "fd00:c1::a9fe:a9fe",
        // NAT64 spellings of the IPv4 ones (compile refuses those too).
        "64:ff9b::a9fe:a9fe",
        "64:ff9b::6464:64c8",
        "64:ff9b::a83f:8110",
        "64:ff9b::c000:c0",
    ] {
        let ip: IpAddr = ip.parse().unwrap();
        assert!(is_metadata_ip(ip), "{ip}");
        assert!(
            blocks.iter().any(|&b| inside(ip, b)),
            "{ip} is metadata but the NetworkPolicy lets gateways reach it"
        );
    }
}
