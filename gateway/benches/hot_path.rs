//! Micro-benchmarks of the per-request pure functions (criterion).

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use gatehouse_crds::{ApiConfig, UpstreamConfig};
use gatehouse_gateway::headers::{self, Forwarded, Identity};
use gatehouse_gateway::ratelimit::LimitCheck;
use gatehouse_gateway::ratelimit::gcra::{self, Rate};
use gatehouse_gateway::ratelimit::local::LocalLimiter;
use gatehouse_gateway::{routing, tokens};
use http::{HeaderMap, HeaderValue};

fn apis(n: usize) -> Vec<ApiConfig> {
    let mut v: Vec<ApiConfig> = (0..n)
        .map(|i| ApiConfig {
            id: format!("ns/api{i}"),
            display_name: String::new(),
            path_prefix: format!("/service-{i}/v1"),
            hosts: vec![],
            upstream: UpstreamConfig {
                url: "http://u".into(),
                strip_prefix: true,
                timeout_seconds: 30,
            },
            grants: vec![],
            scopes: vec![],
            access_token_ttl_seconds: 3600,
            refresh_token_ttl_seconds: 3600,
        })
        .collect();
    v.sort_by(|a, b| {
        b.path_prefix
            .len()
            .cmp(&a.path_prefix.len())
            .then(a.path_prefix.cmp(&b.path_prefix))
    });
    v
}

fn bench(c: &mut Criterion) {
    let token = tokens::generate();
    c.bench_function("token_hash_sha256", |b| {
        b.iter(|| tokens::hash(black_box(&token)))
    });
    c.bench_function("token_shape_check", |b| {
        b.iter(|| tokens::looks_like_token(black_box(&token)))
    });

    let rate = Rate::new(10, 1);
    c.bench_function("gcra_check", |b| {
        b.iter(|| gcra::check(black_box(rate), black_box(1_000_000), black_box(1_500_000)))
    });

    let limiter = LocalLimiter::default();
    let checks = vec![
        LimitCheck::new("rl:{demo/app}:demo/basic:0:1000000/1:user-1", 1_000_000, 1),
        LimitCheck::new(
            "rl:{demo/app}:demo/basic:1:1000000000/86400:-",
            1_000_000_000,
            86_400,
        ),
    ];
    let mut now = 1_000_000_000u64;
    c.bench_function("local_limiter_two_limits", |b| {
        b.iter(|| {
            now += 1;
            limiter.check_at(black_box(&checks), now)
        })
    });

    let table = apis(50);
    c.bench_function("route_match_50_apis", |b| {
        b.iter(|| {
            routing::match_api(
                black_box(&table),
                Some("api.example.com"),
                black_box("/service-42/v1/items/7"),
            )
        })
    });

    let (cid, app, plan, rid) = (
        HeaderValue::from_static("demo-app-mobile"),
        HeaderValue::from_static("demo/demo-app"),
        HeaderValue::from_static("basic"),
        HeaderValue::from_static("0f8fad5b-d9cb-469f-a165-70867728950e"),
    );
    let mut base = HeaderMap::new();
    for (k, v) in [
        ("host", "api.example.com"),
        (
            "authorization",
            "Bearer abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG",
        ),
        ("accept", "application/json"),
        ("user-agent", "DemoApp/1.0 (iPhone; iOS 18)"),
        ("accept-encoding", "gzip"),
        ("x-authenticated-userid", "spoof"),
        ("connection", "keep-alive"),
    ] {
        base.insert(k, HeaderValue::from_static(v));
    }
    c.bench_function("header_rewrite", |b| {
        b.iter(|| {
            let mut h = base.clone();
            let id = Identity {
                user_id: Some(HeaderValue::from_static(
                    "9506635a-1205-4931-9fc7-9e61ba4ebba4",
                )),
                scope: HeaderValue::from_static("profile"),
                client_id: &cid,
                application_id: &app,
                plan: &plan,
            };
            let fwd = Forwarded {
                peer_ip: &HeaderValue::from_static("10.1.2.3"),
                proto: "http",
                request_id: &rid,
                upstream_host: &HeaderValue::from_static("backend:8080"),
            };
            headers::rewrite_request(&mut h, &id, &fwd);
            h
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
