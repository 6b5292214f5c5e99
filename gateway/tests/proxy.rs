//! The proxy contract (design 4.2) through the real router and an echo upstream.

mod common;

use axum::body::Body;
use common::*;
use http::Request;

#[tokio::test]
async fn identity_headers_reach_the_upstream_and_spoofs_do_not() {
    let h = Harness::new(100).await;
    let token = h.cc_token("svc-mobile", Some("profile orders")).await;
    let req = get("/mobile/items?x=1", Some(&token))
        .header("host", "gw.test")
        .header("X-Authenticated-UserId", "admin")
        .header("x-authenticated-scope", "everything")
        .header("X-Client-Id", "someone-else")
        .header("x-api-plan", "gold")
        .header("X-Application-Id", "evil/app")
        .header("connection", "close, x-secret-hop")
        .header("x-secret-hop", "1")
        .header("te", "trailers")
        .header("x-request-id", "trace-123")
        .header("x-custom", "kept")
        .body(Body::empty())
        .unwrap();
    let resp = h.call(req).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-request-id"], "trace-123");
    assert_eq!(resp.headers()["ratelimit-limit"], "100");
    assert_eq!(resp.headers()["ratelimit-remaining"], "99");
    assert!(resp.headers().contains_key("ratelimit-reset"));
    let echo = json(resp).await;
    assert_eq!(echo["path"], "/items", "prefix stripped");
    assert_eq!(echo["query"], "x=1");
    assert!(
        echo["headers"].get("x-authenticated-userid").is_none(),
        "client_credentials has no user"
    );
    assert_eq!(
        echo["headers"]["x-authenticated-scope"],
        serde_json::json!(["profile orders"])
    );
    assert_eq!(
        echo["headers"]["x-client-id"],
        serde_json::json!(["svc-mobile"])
    );
    assert_eq!(
        echo["headers"]["x-application-id"],
        serde_json::json!(["t/svc"])
    );
    assert_eq!(echo["headers"]["x-api-plan"], serde_json::json!(["basic"]));
    assert!(
        echo["headers"].get("authorization").is_none(),
        "bearer token not forwarded"
    );
    assert!(echo["headers"].get("x-secret-hop").is_none());
    assert!(echo["headers"].get("te").is_none());
    assert_eq!(seen(&echo, "x-forwarded-host"), Some("gw.test"));
    assert_eq!(seen(&echo, "x-forwarded-proto"), Some("http"));
    assert!(seen(&echo, "x-forwarded-for").is_some());
    assert_eq!(seen(&echo, "x-request-id"), Some("trace-123"));
    assert_eq!(seen(&echo, "x-custom"), Some("kept"));
    let upstream = h.upstream.to_string();
    assert_eq!(seen(&echo, "host"), Some(upstream.as_str()));
}

#[tokio::test]
async fn the_upstream_gets_its_own_host_and_every_forwarded_for_hop() {
    let h = Harness::new(100).await;
    let token = h.cc_token("svc-mobile", None).await;
    // Connection naming Host must neither leave the upstream without one nor hide the client's.
    let req = get("/mobile/items", Some(&token))
        .header("host", "gw.test")
        .header("connection", "host")
        .header("x-forwarded-for", "198.51.100.1")
        .header("x-forwarded-for", "198.51.100.2")
        .body(Body::empty())
        .unwrap();
    let resp = h.call(req).await;
    assert_eq!(resp.status(), 200);
    let echo = json(resp).await;
    let upstream = h.upstream.to_string();
    assert_eq!(seen(&echo, "host"), Some(upstream.as_str()));
    assert_eq!(seen(&echo, "x-forwarded-host"), Some("gw.test"));
    assert_eq!(
        echo["headers"]["x-forwarded-for"],
        serde_json::json!(["198.51.100.1, 198.51.100.2, unknown"]),
        "both hops, then the peer (none in this in-process harness)"
    );
}

#[tokio::test]
async fn missing_token_is_401_with_bearer_challenge() {
    let h = Harness::new(100).await;
    let resp = h
        .call(get("/mobile/items", None).body(Body::empty()).unwrap())
        .await;
    assert_eq!(resp.status(), 401);
    assert_eq!(
        resp.headers()["www-authenticate"],
        "Bearer realm=\"gatehouse\""
    );
    let v = json(resp).await;
    assert!(v["request_id"].is_string());
}

#[tokio::test]
async fn bad_tokens_are_invalid_token() {
    let h = Harness::new(100).await;
    let forged = "A".repeat(43);
    for t in ["garbage", forged.as_str()] {
        let resp = h
            .call(get("/mobile/items", Some(t)).body(Body::empty()).unwrap())
            .await;
        assert_eq!(resp.status(), 401, "{t}");
        let www = resp.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .to_string();
        assert!(
            www.starts_with("Bearer ") && www.contains("error=\"invalid_token\""),
            "{www}"
        );
    }
    // Basic instead of Bearer: malformed request
    let req = Request::get("/mobile/items")
        .header("authorization", "Basic Zm9vOmJhcg==")
        .body(Body::empty())
        .unwrap();
    let resp = h.call(req).await;
    assert_eq!(resp.status(), 400);
    assert!(
        resp.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .contains("invalid_request")
    );
}

#[tokio::test]
async fn a_token_only_opens_its_own_api() {
    let h = Harness::new(100).await;
    let v2_token = h.cc_token("svc-v2", None).await;
    let resp = h
        .call(
            get("/mobile/items", Some(&v2_token))
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(
        resp.status(),
        401,
        "a /mobile/v2 token must not open /mobile"
    );
    let mobile_token = h.cc_token("svc-mobile", None).await;
    let resp = h
        .call(
            get("/mobile/v2/items", Some(&mobile_token))
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(
        resp.status(),
        401,
        "a /mobile token must not open /mobile/v2"
    );
}

#[tokio::test]
async fn tokens_in_the_query_string_are_refused() {
    let h = Harness::new(100).await;
    let token = h.cc_token("svc-mobile", None).await;
    let resp = h
        .call(
            get(&format!("/mobile/items?access_token={token}"), None)
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(resp.status(), 400);
    // even together with a valid header
    let resp = h
        .call(
            get(&format!("/mobile/items?access_token={token}"), Some(&token))
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(resp.status(), 400);
    assert_eq!(json(resp).await["error"], "invalid_request");
}

#[tokio::test]
async fn paths_with_dot_segments_are_refused_before_routing() {
    let h = Harness::new(100).await;
    // A /mobile token must not reach /mobile/v2's resources through a path the backend would
    // resolve, in any spelling.
    let token = h.cc_token("svc-mobile", None).await;
    // A dot that is not a segment of its own is an ordinary path.
    for (path, status) in [
        ("/mobile/../mobile/v2/things", 400),
        ("/mobile/%2e%2E/mobile/v2/things", 400),
        ("/mobile/..%2fmobile/v2/things", 400),
        ("/mobile/./items", 400),
        ("/mobile/report.v1.json", 200),
    ] {
        let resp = h
            .call(get(path, Some(&token)).body(Body::empty()).unwrap())
            .await;
        assert_eq!(resp.status(), status, "{path}");
        if status == 400 {
            assert_eq!(json(resp).await["error"], "invalid_request", "{path}");
        }
    }
}

#[tokio::test]
async fn longest_prefix_wins_and_upstream_path_is_kept() {
    let h = Harness::new(100).await;
    let token = h.cc_token("svc-v2", None).await;
    let resp = h
        .call(
            get("/mobile/v2/things", Some(&token))
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(json(resp).await["path"], "/version2/things");
}

#[tokio::test]
async fn hosts_restrict_an_api_and_unknown_paths_are_404() {
    let h = Harness::new(100).await;
    let token = h.cc_token("svc-other", None).await;
    let ok = get("/other/x", Some(&token))
        .header("host", "API.example.com:8080")
        .body(Body::empty())
        .unwrap();
    let resp = h.call(ok).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(
        json(resp).await["path"],
        "/other/x",
        "stripPrefix: false keeps the prefix"
    );
    // The absolute (trailing-dot) form of the name is the same host.
    let absolute = get("/other/x", Some(&token))
        .header("host", "api.example.com.")
        .body(Body::empty())
        .unwrap();
    assert_eq!(h.call(absolute).await.status(), 200);
    let wrong_host = get("/other/x", Some(&token))
        .header("host", "evil.example.com")
        .body(Body::empty())
        .unwrap();
    assert_eq!(h.call(wrong_host).await.status(), 404);
    let resp = h
        .call(
            get("/nothing-here", Some(&token))
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(resp.status(), 404);
    assert_eq!(json(resp).await["error"], "not_found");
    // segment boundary: /mobilex is not /mobile
    assert_eq!(
        h.call(get("/mobilex", None).body(Body::empty()).unwrap())
            .await
            .status(),
        404
    );
}

#[tokio::test]
async fn unreachable_upstream_is_502_json_and_slow_is_504() {
    let h = Harness::new(100).await;
    let dead = h.cc_token("svc-dead", None).await;
    let resp = h
        .call(get("/dead/x", Some(&dead)).body(Body::empty()).unwrap())
        .await;
    assert_eq!(resp.status(), 502);
    let rid = resp.headers()["x-request-id"].to_str().unwrap().to_string();
    let v = json(resp).await;
    assert_eq!(v["error"], "bad_gateway");
    assert_eq!(v["request_id"], rid.as_str());

    // /mobile has timeoutSeconds: 1
    let token = h.cc_token("svc-mobile", None).await;
    let started = std::time::Instant::now();
    let resp = h
        .call(
            get("/mobile/slow/3000", Some(&token))
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(resp.status(), 504);
    assert_eq!(json(resp).await["error"], "gateway_timeout");
    assert!(started.elapsed() < std::time::Duration::from_millis(2_900));
}

#[tokio::test]
async fn upstream_status_and_headers_pass_through() {
    let h = Harness::new(100).await;
    let token = h.cc_token("svc-mobile", None).await;
    let resp = h
        .call(
            get("/mobile/status/418", Some(&token))
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(resp.status(), 418);
    assert_eq!(resp.headers()["content-type"], "application/json");
}

#[tokio::test]
async fn over_the_limit_is_429_with_retry_after_then_recovers() {
    let h = Harness::new(3).await;
    let token = h.cc_token("svc-mobile", None).await;
    let mut remaining = vec![];
    for _ in 0..3 {
        let resp = h
            .call(get("/mobile/x", Some(&token)).body(Body::empty()).unwrap())
            .await;
        assert_eq!(resp.status(), 200);
        remaining.push(
            resp.headers()["ratelimit-remaining"]
                .to_str()
                .unwrap()
                .to_string(),
        );
    }
    assert_eq!(remaining, ["2", "1", "0"]);
    let resp = h
        .call(get("/mobile/x", Some(&token)).body(Body::empty()).unwrap())
        .await;
    assert_eq!(resp.status(), 429);
    assert_eq!(resp.headers()["retry-after"], "1");
    assert_eq!(resp.headers()["ratelimit-limit"], "3");
    assert_eq!(resp.headers()["ratelimit-remaining"], "0");
    assert_eq!(json(resp).await["error"], "rate_limited");
    // one request every 1/3 s comes back
    tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    let resp = h
        .call(get("/mobile/x", Some(&token)).body(Body::empty()).unwrap())
        .await;
    assert_eq!(resp.status(), 200);
    let resp = h
        .call(get("/mobile/x", Some(&token)).body(Body::empty()).unwrap())
        .await;
    assert_eq!(resp.status(), 429);
}

#[tokio::test]
async fn revoked_subscription_tokens_stop_working_on_reload() {
    let h = Harness::new(100).await;
    let token = h.cc_token("svc-mobile", None).await;
    assert_eq!(
        h.call(get("/mobile/x", Some(&token)).body(Body::empty()).unwrap())
            .await
            .status(),
        200
    );
    // Remove the subscription from the manifests and reload.
    h.remove_subscription("svc-mobile");
    assert_eq!(
        h.call(get("/mobile/x", Some(&token)).body(Body::empty()).unwrap())
            .await
            .status(),
        401
    );
}
