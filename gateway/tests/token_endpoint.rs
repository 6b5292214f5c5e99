//! POST /oauth2/token with the client_credentials grant, through the real router.

mod common;

use std::sync::Arc;

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

/// The embedded store, except that `put_token` fails while `fail_puts` is set; the next
/// `revoke_token` waits for `release` when `hold_revokes` is set (telling `entered` first),
/// before revoking, or after it when `hold_after_revoke` is set, and so does the next revoke of
/// the token in `hold_revoke_of` (before revoking); the next `revoke_token` fails
/// without revoking when `fail_revokes` is set; `revoke_token` revokes but answers an error while
/// `lose_revoke_replies` is set (a reply lost to a timeout). `puts` records the hash of every
/// token stored, `revokes` counts finished `revoke_token` calls.
struct FlakyStore {
    inner: gatehouse_gateway::store::embedded::EmbeddedStore,
    fail_puts: std::sync::atomic::AtomicBool,
    hold_revokes: std::sync::atomic::AtomicBool,
    hold_after_revoke: std::sync::atomic::AtomicBool,
    hold_revoke_of: std::sync::Mutex<Option<gatehouse_gateway::tokens::TokenHash>>,
    fail_revokes: std::sync::atomic::AtomicBool,
    lose_revoke_replies: std::sync::atomic::AtomicBool,
    puts: std::sync::Mutex<Vec<gatehouse_gateway::tokens::TokenHash>>,
    revokes: std::sync::atomic::AtomicUsize,
    entered: tokio::sync::Notify,
    release: tokio::sync::Notify,
}

/// A harness on a `FlakyStore` (nothing failing or held yet).
async fn flaky_harness() -> (Harness, Arc<FlakyStore>) {
    flaky_harness_with(|_| {}).await
}

/// `flaky_harness` with `tweak` applied to the state.
async fn flaky_harness_with(
    tweak: impl FnOnce(&mut gatehouse_gateway::state::AppState),
) -> (Harness, Arc<FlakyStore>) {
    let upstream = gatehouse_tests::echo::spawn().await;
    let flaky = Arc::new(std::sync::OnceLock::<Arc<FlakyStore>>::new());
    let keep = flaky.clone();
    let h = Harness::with_store(
        manifests(&format!("http://{upstream}"), 100),
        upstream,
        "http://gw.test",
        move |inner| {
            let s = Arc::new(FlakyStore {
                inner,
                fail_puts: Default::default(),
                hold_revokes: Default::default(),
                hold_after_revoke: Default::default(),
                hold_revoke_of: Default::default(),
                fail_revokes: Default::default(),
                lose_revoke_replies: Default::default(),
                puts: Default::default(),
                revokes: Default::default(),
                entered: Default::default(),
                release: Default::default(),
            });
            keep.set(s.clone()).ok();
            s
        },
        tweak,
    )
    .await;
    let flaky = flaky.get().unwrap().clone();
    (h, flaky)
}

mod flaky {
    use std::sync::Arc;
    use std::sync::atomic::Ordering;

    use gatehouse_gateway::store::{Store, StoreError, StoreResult, TokenRecord};
    use gatehouse_gateway::tokens::TokenHash;

    #[async_trait::async_trait]
    impl Store for super::FlakyStore {
        async fn put_token(&self, hash: TokenHash, record: TokenRecord) -> StoreResult<()> {
            if self.fail_puts.load(Ordering::SeqCst) {
                return Err(StoreError::Unavailable("injected".into()));
            }
            self.puts.lock().unwrap().push(hash);
            self.inner.put_token(hash, record).await
        }
        async fn get_token(&self, hash: &TokenHash) -> StoreResult<Option<Arc<TokenRecord>>> {
            self.inner.get_token(hash).await
        }
        async fn revoke_token(&self, hash: &TokenHash) -> StoreResult<Option<TokenRecord>> {
            let held = self.hold_revoke_of.lock().unwrap().take_if(|h| h == hash);
            if self.hold_revokes.swap(false, Ordering::SeqCst) || held.is_some() {
                self.entered.notify_one();
                self.release.notified().await;
            }
            if self.fail_revokes.swap(false, Ordering::SeqCst) {
                return Err(StoreError::Unavailable("injected".into()));
            }
            let revoked = self.inner.revoke_token(hash).await;
            self.revokes.fetch_add(1, Ordering::SeqCst);
            if self.hold_after_revoke.swap(false, Ordering::SeqCst) {
                self.entered.notify_one();
                self.release.notified().await;
            }
            if self.lose_revoke_replies.load(Ordering::SeqCst) {
                return Err(StoreError::Unavailable("injected: reply lost".into()));
            }
            revoked
        }
        async fn revoke_grant(&self, grant_id: &str) -> StoreResult<usize> {
            self.inner.revoke_grant(grant_id).await
        }
        async fn purge_expired(&self, now: u64) -> StoreResult<usize> {
            self.inner.purge_expired(now).await
        }
        async fn ready(&self) -> StoreResult<()> {
            self.inner.ready().await
        }
        async fn kv_put(&self, key: &str, value: &[u8], ttl: u64) -> StoreResult<()> {
            self.inner.kv_put(key, value, ttl).await
        }
        async fn kv_put_new(&self, key: &str, value: &[u8], ttl: u64) -> StoreResult<bool> {
            self.inner.kv_put_new(key, value, ttl).await
        }
        async fn kv_put_existing(&self, key: &str, value: &[u8], ttl: u64) -> StoreResult<bool> {
            self.inner.kv_put_existing(key, value, ttl).await
        }
        async fn kv_get(&self, key: &str) -> StoreResult<Option<Vec<u8>>> {
            self.inner.kv_get(key).await
        }
        async fn kv_take(&self, key: &str) -> StoreResult<Option<Vec<u8>>> {
            self.inner.kv_take(key).await
        }
        async fn kv_delete(&self, key: &str) -> StoreResult<()> {
            self.inner.kv_delete(key).await
        }
        async fn kv_keys(
            &self,
            prefix: &str,
            keep: for<'k> fn(&'k str) -> bool,
        ) -> StoreResult<Vec<String>> {
            self.inner.kv_keys(prefix, keep).await
        }
        async fn counter_incr(&self, key: &str, window_secs: u64) -> StoreResult<u64> {
            self.inner.counter_incr(key, window_secs).await
        }
        async fn counter_get(&self, key: &str) -> StoreResult<u64> {
            self.inner.counter_get(key).await
        }
        async fn counter_decr(&self, key: &str) -> StoreResult<()> {
            self.inner.counter_decr(key).await
        }
    }
}

/// A token of app-mobile's user u-1 in grant `grant`, as a code exchange stores it.
fn user_token(
    kind: gatehouse_gateway::store::TokenKind,
    grant: &str,
    expires_at: u64,
) -> gatehouse_gateway::store::TokenRecord {
    gatehouse_gateway::store::TokenRecord {
        kind,
        client_id: "app-mobile".into(),
        subscription: "t/app-mobile".into(),
        api: "t/mobile".into(),
        user_id: Some("u-1".into()),
        scope: "profile".into(),
        grant_id: grant.into(),
        issued_at: gatehouse_gateway::store::unix_now(),
        expires_at,
    }
}

/// Stores an authorization code for a new user `email` of app-mobile, as the consent step
/// would, expiring at `expires_at`; returns the token request body that redeems it.
async fn stored_code(h: &Harness, email: &str, grant: &str, expires_at: u64) -> String {
    use base64::Engine;
    use gatehouse_gateway::oauth::authorize::{CodeRecord, code_key};
    use sha2::Digest;
    let store = &*h.state.store;
    let user = gatehouse_gateway::accounts::create(store, email, "x".into())
        .await
        .unwrap()
        .unwrap();
    let (code, verifier) = (gatehouse_gateway::tokens::generate(), "v".repeat(43));
    let record = CodeRecord {
        client_id: "app-mobile".into(),
        redirect_uri: "myapp://cb".into(),
        redirect_uri_sent: true,
        code_challenge: base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(sha2::Sha256::digest(&verifier)),
        user_id: user.id,
        scope: "profile".into(),
        grant_id: grant.into(),
        expires_at,
        subscription: "t/app-mobile".into(),
        api: "t/mobile".into(),
    };
    gatehouse_gateway::store::kv::put(store, &code_key(&code), &record, 60)
        .await
        .unwrap();
    format!(
        "grant_type=authorization_code&client_id=app-mobile&redirect_uri=myapp%3A%2F%2Fcb&code={code}&code_verifier={verifier}"
    )
}

/// A user's first pair of app-mobile (access, refresh), from a code exchange at `h`.
async fn first_pair(h: &Harness, email: &str) -> (String, String) {
    let now = gatehouse_gateway::store::unix_now();
    let exchange = stored_code(h, email, &format!("g-{email}"), now + 60).await;
    let resp = h.call(token_request(&exchange, None)).await;
    assert_eq!(resp.status(), 200);
    pair(json(resp).await)
}

fn pair(v: serde_json::Value) -> (String, String) {
    let field = |k: &str| v[k].as_str().expect(k).to_string();
    (field("access_token"), field("refresh_token"))
}

fn refresh_body(token: &str) -> String {
    format!("grant_type=refresh_token&client_id=app-mobile&refresh_token={token}")
}

async fn live(h: &Harness, hash: gatehouse_gateway::tokens::TokenHash) -> bool {
    h.state.store.get_token(&hash).await.unwrap().is_some()
}

async fn token_live(h: &Harness, token: &str) -> bool {
    live(h, gatehouse_gateway::tokens::hash(token)).await
}

/// The two tokens stored since `since` (an index into `puts`) other than `presented` (put
/// back) are the pair of an answer nobody got: neither is live.
async fn unsent_pair_gone(h: &Harness, flaky: &FlakyStore, since: usize, presented: &str) {
    let unsent = stored_since(flaky, since, presented);
    assert_eq!(unsent.len(), 2, "the unsent access and refresh token");
    for hash in unsent {
        assert!(!live(h, hash).await, "a token of the unsent pair is live");
    }
}

/// The tokens stored since `since` (an index into `puts`), less `except`.
fn stored_since(
    flaky: &FlakyStore,
    since: usize,
    except: &str,
) -> Vec<gatehouse_gateway::tokens::TokenHash> {
    let except = gatehouse_gateway::tokens::hash(except);
    let puts = flaky.puts.lock().unwrap();
    puts[since..]
        .iter()
        .filter(|h| **h != except)
        .copied()
        .collect()
}

/// A refresh whose spend fails without happening answers 503; the presented token is still
/// live, the pair made for the answer is removed, and the client's retry is a plain refresh.
#[tokio::test]
async fn a_refresh_whose_spend_fails_leaves_its_token_usable() {
    use std::sync::atomic::Ordering;

    let (h, flaky) = flaky_harness().await;
    let (a0, r0) = first_pair(&h, "fail@example.com").await;
    let before = flaky.puts.lock().unwrap().len();
    flaky.fail_revokes.store(true, Ordering::SeqCst);
    let resp = h.call(token_request(&refresh_body(&r0), None)).await;
    assert_eq!(resp.status(), 503);
    assert!(token_live(&h, &r0).await && token_live(&h, &a0).await);
    unsent_pair_gone(&h, &flaky, before, &r0).await;
    let resp = h.call(token_request(&refresh_body(&r0), None)).await;
    assert_eq!(resp.status(), 200, "the retry is not reuse");
}

/// A refresh whose spend ran but whose answer from the store was lost (a timeout) answers 503.
/// Whose spend that was is unknown (a concurrent use could have taken the token), so nothing is
/// put back: without a retry window the client's retry is reuse and ends the family, as design
/// section 5 has it; with one, the retry redeems the pair the failed answer would have carried.
#[tokio::test]
async fn a_refresh_whose_spend_reply_is_lost_is_reuse_unless_a_window_allows_a_retry() {
    use std::sync::atomic::Ordering;

    for window in [0, 30] {
        let (h, flaky) = flaky_harness_with(|s| s.refresh_retry_secs = window).await;
        let (a0, r0) = first_pair(&h, "lost@example.com").await;
        flaky.lose_revoke_replies.store(true, Ordering::SeqCst);
        let resp = h.call(token_request(&refresh_body(&r0), None)).await;
        assert_eq!(resp.status(), 503);
        flaky.lose_revoke_replies.store(false, Ordering::SeqCst);
        assert!(!token_live(&h, &r0).await, "window {window}: the spend ran");
        let resp = h.call(token_request(&refresh_body(&r0), None)).await;
        if window == 0 {
            assert_eq!(json(resp).await["error"], "invalid_grant");
            assert!(!token_live(&h, &a0).await, "the family was not revoked");
            continue;
        }
        assert_eq!(resp.status(), 200, "the retry in the window");
        let (a1, r1) = pair(json(resp).await);
        assert!(token_live(&h, &a0).await && token_live(&h, &a1).await);
        // Once the new refresh token is used, the old one is reuse.
        let resp = h.call(token_request(&refresh_body(&r1), None)).await;
        let (a2, _) = pair(json(resp).await);
        let resp = h.call(token_request(&refresh_body(&r0), None)).await;
        assert_eq!(json(resp).await["error"], "invalid_grant");
        for t in [&a0, &a1, &a2] {
            assert!(!token_live(&h, t).await, "reuse left {t} live");
        }
    }
}

/// A refresh or code exchange that cannot store its new pair answers 503 and spends nothing:
/// the client's retry with the same refresh token or code works, and the access token it holds
/// keeps working. (Spending first made that retry look like reuse or a replay, which revoked
/// the whole family.)
#[tokio::test]
async fn a_refresh_or_code_exchange_that_cannot_store_its_tokens_spends_nothing() {
    use gatehouse_gateway::store::TokenKind;
    use std::sync::atomic::Ordering;

    let (h, flaky) = flaky_harness().await;
    // A user's access and refresh token of app-mobile, as a code exchange leaves them.
    let now = gatehouse_gateway::store::unix_now();
    let record = |kind| user_token(kind, "g-1", now + 3600);
    let (access, refresh) = (
        gatehouse_gateway::tokens::generate(),
        gatehouse_gateway::tokens::generate(),
    );
    let store = h.state.store.clone();
    for (token, kind) in [(&access, TokenKind::Access), (&refresh, TokenKind::Refresh)] {
        let hash = gatehouse_gateway::tokens::hash(token);
        store.put_token(hash, record(kind)).await.unwrap();
    }
    let body = format!("grant_type=refresh_token&client_id=app-mobile&refresh_token={refresh}");

    flaky.fail_puts.store(true, Ordering::SeqCst);
    let resp = h.call(token_request(&body, None)).await;
    assert_eq!(resp.status(), 503);
    assert_eq!(json(resp).await["error"], "temporarily_unavailable");
    flaky.fail_puts.store(false, Ordering::SeqCst);

    let resp = h.call(token_request(&body, None)).await;
    assert_eq!(resp.status(), 200, "the retry is not reuse");
    let v = json(resp).await;
    // A refresh token from before families (43 characters) is rotated into one that carries
    // its family (86).
    let next = v["refresh_token"].as_str().expect("a refresh token");
    assert_eq!(next.len(), 86);
    let live = |t: &str| {
        let (store, hash) = (store.clone(), gatehouse_gateway::tokens::hash(t));
        async move { store.get_token(&hash).await.unwrap().is_some() }
    };
    assert!(live(&access).await, "the family was not revoked");
    // The token it presented is spent now: a third use is reuse, found by the marker its
    // rotation left, and it ends the family, the new refresh token too.
    let resp = h.call(token_request(&body, None)).await;
    assert_eq!(resp.status(), 400);
    assert_eq!(json(resp).await["error"], "invalid_grant");
    assert!(!live(&access).await && !live(next).await);

    // The same for a code: not spent by an exchange whose tokens cannot be stored.
    let body = stored_code(&h, "c@example.com", "g-2", now + 60).await;
    flaky.fail_puts.store(true, Ordering::SeqCst);
    let resp = h.call(token_request(&body, None)).await;
    assert_eq!(resp.status(), 503);
    flaky.fail_puts.store(false, Ordering::SeqCst);
    let resp = h.call(token_request(&body, None)).await;
    assert_eq!(resp.status(), 200, "the retry is not a replay");
    let resp = h.call(token_request(&body, None)).await;
    assert_eq!(json(resp).await["error"], "invalid_grant", "single use");
}

/// Starts a refresh with `token` whose spend `hold` (one of the store's hold flags) holds, then
/// drops the request, as hyper does when its client goes away.
async fn refresh_then_go_away(
    h: &Harness,
    flaky: &FlakyStore,
    token: &str,
    hold: &std::sync::atomic::AtomicBool,
) {
    hold.store(true, std::sync::atomic::Ordering::SeqCst);
    tokio::select! {
        _ = h.call(token_request(&refresh_body(token), None)) => panic!("answered while held"),
        () = flaky.entered.notified() => {}
    }
}

/// Waits (at most 5 s) until the store has finished `n` revocations.
async fn revokes_reach(flaky: &FlakyStore, n: usize, what: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while flaky.revokes.load(std::sync::atomic::Ordering::SeqCst) < n {
        assert!(std::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// A client that goes away in the middle of a refresh (hyper then drops the request's future)
/// does not stop the rotation half-way, and nobody gets its answer, so the rotation is undone:
/// the new pair is removed and the presented token put back. Its retry is then a plain refresh,
/// not reuse. (Stopped half-way, the embedded store, which commits its file before its memory,
/// left a spent token live until a restart.)
#[tokio::test]
async fn a_refresh_whose_client_goes_away_is_finished_and_undone() {
    let (h, flaky) = flaky_harness().await;
    let (a0, r0) = first_pair(&h, "gone@example.com").await;
    let before = flaky.puts.lock().unwrap().len();
    refresh_then_go_away(&h, &flaky, &r0, &flaky.hold_revokes).await;
    // The request's future is gone, as when its connection closes; the spend goes on.
    flaky.release.notify_one();
    // The spend, then the unsent pair's refresh and access token.
    revokes_reach(
        &flaky,
        3,
        "the rotation stopped half-way after its request went away",
    )
    .await;
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    assert!(token_live(&h, &r0).await, "not put back");
    unsent_pair_gone(&h, &flaky, before, &r0).await;
    let resp = h.call(token_request(&refresh_body(&r0), None)).await;
    assert_eq!(resp.status(), 200, "the retry is a plain refresh");
    assert!(token_live(&h, &a0).await);
}

/// The same undo when, while the request whose client went away was finishing, a retry in the
/// window already redeemed the pair it made: the rotation then stands (putting the presented
/// token back would leave the family two live chains), and only the retry's pair works.
#[tokio::test]
async fn an_undo_after_a_retry_redeemed_its_pair_puts_nothing_back() {
    use std::sync::atomic::Ordering;

    let (h, flaky) = flaky_harness_with(|s| s.refresh_retry_secs = 30).await;
    let (_, r0) = first_pair(&h, "split@example.com").await;
    refresh_then_go_away(&h, &flaky, &r0, &flaky.hold_after_revoke).await;
    // r0 is spent; its request's client is gone. The retry redeems the pair it made.
    let resp = h.call(token_request(&refresh_body(&r0), None)).await;
    assert_eq!(resp.status(), 200, "the retry in the window");
    let (a2, r2) = pair(json(resp).await);
    let done = flaky.revokes.load(Ordering::SeqCst);
    flaky.release.notify_one();
    revokes_reach(&flaky, done + 1, "no undo attempted").await;
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    assert!(
        !token_live(&h, &r0).await,
        "put back beside the retry's pair"
    );
    assert!(token_live(&h, &a2).await && token_live(&h, &r2).await);
}

/// An undo whose grant is revoked while it puts the presented token back (here: the family
/// ended through `/oauth2/revoke` with the spent token, between the undo's removal of the new
/// pair and the put): the token does not come back, since the undo checks the grant after the
/// put and revokes it again.
#[tokio::test]
async fn an_undo_racing_a_revocation_leaves_nothing_live() {
    let (h, flaky) = flaky_harness().await;
    let (a0, r0) = first_pair(&h, "race@example.com").await;
    let before = flaky.puts.lock().unwrap().len();
    refresh_then_go_away(&h, &flaky, &r0, &flaky.hold_revokes).await;
    // The client is gone. Hold the undo at its removal of the unsent access token (stored
    // first), after it took the unsent refresh token.
    let unsent_access = flaky.puts.lock().unwrap()[before];
    *flaky.hold_revoke_of.lock().unwrap() = Some(unsent_access);
    flaky.release.notify_one();
    flaky.entered.notified().await;
    let revoke = http::Request::post("/oauth2/revoke")
        .header("content-type", "application/x-www-form-urlencoded")
        .body(axum::body::Body::from(format!(
            "client_id=app-mobile&token={r0}"
        )))
        .unwrap();
    assert_eq!(h.call(revoke).await.status(), 200);
    assert!(!token_live(&h, &a0).await, "the family was not revoked");
    flaky.release.notify_one();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while flaky.puts.lock().unwrap().len() < before + 3 {
        assert!(std::time::Instant::now() < deadline, "nothing put back");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    assert!(
        !token_live(&h, &r0).await,
        "a token of a revoked grant came back"
    );
}

/// A refresh token or code in its last 2 s is refused as expired before anything is issued or
/// spent. It is spent only after the new pair is stored, and one that expired meanwhile would
/// be gone from the store: that read as reuse and revoked the family of a legitimate client.
#[tokio::test]
async fn a_refresh_token_or_code_about_to_expire_is_refused_and_revokes_nothing() {
    use gatehouse_gateway::store::TokenKind;

    let h = Harness::new(100).await;
    let store = h.state.store.clone();
    let now = gatehouse_gateway::store::unix_now();
    let record = |kind, expires_at| user_token(kind, "g-1", expires_at);
    let (access, refresh) = (
        gatehouse_gateway::tokens::generate(),
        gatehouse_gateway::tokens::generate(),
    );
    let hash = gatehouse_gateway::tokens::hash;
    store
        .put_token(hash(&access), record(TokenKind::Access, now + 3600))
        .await
        .unwrap();
    // At the margin: 2 s left is refused too.
    store
        .put_token(hash(&refresh), record(TokenKind::Refresh, now + 2))
        .await
        .unwrap();
    let body = format!("grant_type=refresh_token&client_id=app-mobile&refresh_token={refresh}");
    let resp = h.call(token_request(&body, None)).await;
    assert_eq!(resp.status(), 400);
    let v = json(resp).await;
    assert_eq!(v["error"], "invalid_grant");
    assert!(
        v["error_description"].as_str().unwrap().contains("expired"),
        "{v}"
    );
    assert!(
        store.get_token(&hash(&access)).await.unwrap().is_some(),
        "the family was not revoked"
    );

    let body = stored_code(&h, "d@example.com", "g-2", now + 1).await;
    let resp = h.call(token_request(&body, None)).await;
    assert_eq!(resp.status(), 400);
    let v = json(resp).await;
    assert_eq!(v["error"], "invalid_grant");
    assert!(
        v["error_description"].as_str().unwrap().contains("expired"),
        "{v}"
    );
}
