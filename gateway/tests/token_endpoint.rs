//! POST /oauth2/token with the client_credentials grant, through the real router.

mod common;

use common::*;

#[tokio::test]
async fn client_credentials_with_basic_auth() {
    let h = Harness::new(100).await;
    let resp = h
        .call(token_request(
            "grant_type=client_credentials&scope=profile",
            Some(("svc-mobile", SECRET)),
        ))
        .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["cache-control"], "no-store");
    assert_eq!(resp.headers()["pragma"], "no-cache");
    let v = json(resp).await;
    assert_eq!(v["token_type"], "Bearer");
    assert_eq!(v["expires_in"], 3600);
    assert_eq!(v["scope"], "profile");
    assert!(
        v.get("refresh_token").is_none(),
        "no refresh token for client_credentials"
    );
    let token = v["access_token"].as_str().unwrap();
    assert_eq!(token.len(), 43, "256-bit base64url token");
}

#[tokio::test]
async fn client_credentials_with_body_auth() {
    let h = Harness::new(100).await;
    let body = format!("grant_type=client_credentials&client_id=svc-mobile&client_secret={SECRET}");
    let resp = h.call(token_request(&body, None)).await;
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn the_store_keeps_only_the_hash() {
    let h = Harness::new(100).await;
    let token = h.cc_token("svc-mobile", None).await;
    let hash = gatehouse_gateway::tokens::hash(&token);
    let rec = h
        .state
        .store
        .get_token(&hash)
        .await
        .unwrap()
        .expect("stored under its hash");
    assert_eq!(rec.client_id, "svc-mobile");
    assert_eq!(rec.user_id, None);
    let file = std::fs::read(h.dir.path().join("data/gatehouse.redb")).unwrap();
    assert!(
        !file.windows(token.len()).any(|w| w == token.as_bytes()),
        "the raw token must not be on disk"
    );
}

#[tokio::test]
async fn wrong_secret_is_invalid_client() {
    let h = Harness::new(100).await;
    for auth in [
        ("svc-mobile", "wrong-secret"),
        ("nobody", SECRET),
        ("svc-mobile", ""),
    ] {
        let resp = h
            .call(token_request("grant_type=client_credentials", Some(auth)))
            .await;
        assert_eq!(resp.status(), 401, "{auth:?}");
        assert_eq!(
            resp.headers()["www-authenticate"],
            "Basic realm=\"gatehouse\""
        );
        assert_eq!(resp.headers()["cache-control"], "no-store");
        assert_eq!(json(resp).await["error"], "invalid_client");
    }
    let body = "grant_type=client_credentials&client_id=svc-mobile&client_secret=nope";
    let resp = h.call(token_request(body, None)).await;
    assert_eq!(resp.status(), 401);
    // A confidential client must authenticate at all.
    let resp = h
        .call(token_request(
            "grant_type=client_credentials&client_id=svc-mobile",
            None,
        ))
        .await;
    assert_eq!(json(resp).await["error"], "invalid_client");
}

#[tokio::test]
async fn public_clients_cannot_use_client_credentials() {
    let h = Harness::new(100).await;
    let resp = h
        .call(token_request(
            "grant_type=client_credentials&client_id=app-mobile",
            None,
        ))
        .await;
    assert_eq!(resp.status(), 400);
    assert_eq!(json(resp).await["error"], "unauthorized_client");
    // and a secret for a public client is refused
    let resp = h
        .call(token_request(
            "grant_type=client_credentials",
            Some(("app-mobile", "x")),
        ))
        .await;
    assert_eq!(json(resp).await["error"], "invalid_client");
}

#[tokio::test]
async fn grant_not_allowed_for_the_subscription() {
    let h = Harness::new(100).await;
    // svc-v2's Api only allows client_credentials; authorization_code etc. are not this client's.
    let resp = h
        .call(token_request(
            "grant_type=password&username=a&password=b",
            Some(("svc-v2", SECRET)),
        ))
        .await;
    assert_eq!(resp.status(), 400);
    assert_eq!(json(resp).await["error"], "unsupported_grant_type");
}

#[tokio::test]
async fn unknown_scope_is_invalid_scope() {
    let h = Harness::new(100).await;
    let resp = h
        .call(token_request(
            "grant_type=client_credentials&scope=profile+admin",
            Some(("svc-mobile", SECRET)),
        ))
        .await;
    assert_eq!(resp.status(), 400);
    let v = json(resp).await;
    assert_eq!(v["error"], "invalid_scope");
    assert!(v["error_description"].as_str().unwrap().contains("admin"));

    // A value outside RFC 6749 5.2's character set is not echoed.
    let resp = h
        .call(token_request(
            "grant_type=client_credentials&scope=%22%3E%5Cx%C3%A9",
            Some(("svc-mobile", SECRET)),
        ))
        .await;
    let v = json(resp).await;
    assert_eq!(v["error"], "invalid_scope");
    let d = v["error_description"].as_str().unwrap();
    assert!(
        d.bytes()
            .all(|b| matches!(b, 0x20..=0x21 | 0x23..=0x5B | 0x5D..=0x7E)),
        "{d}"
    );
}

#[tokio::test]
async fn malformed_requests_are_invalid_request() {
    let h = Harness::new(100).await;
    // both authentication methods at once
    let body = format!("grant_type=client_credentials&client_secret={SECRET}");
    let resp = h
        .call(token_request(&body, Some(("svc-mobile", SECRET))))
        .await;
    assert_eq!(json(resp).await["error"], "invalid_request");
    // missing grant_type
    let resp = h
        .call(token_request("scope=profile", Some(("svc-mobile", SECRET))))
        .await;
    assert_eq!(json(resp).await["error"], "invalid_request");
    // repeated parameter
    let resp = h
        .call(token_request(
            "grant_type=client_credentials&grant_type=client_credentials",
            Some(("svc-mobile", SECRET)),
        ))
        .await;
    assert_eq!(json(resp).await["error"], "invalid_request");
    // JSON instead of a form
    let req = http::Request::post("/oauth2/token")
        .header("content-type", "application/json")
        .header("authorization", basic("svc-mobile", SECRET))
        .body(axum::body::Body::from(
            "{\"grant_type\":\"client_credentials\"}",
        ))
        .unwrap();
    let resp = h.call(req).await;
    assert_eq!(resp.status(), 400);
    assert_eq!(json(resp).await["error"], "invalid_request");
}
