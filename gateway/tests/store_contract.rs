//! One contract, two backends: every test here runs against the embedded store and against a
//! private redis-server.

use std::sync::Arc;
use std::time::Duration;

use gatehouse_gateway::store::embedded::EmbeddedStore;
use gatehouse_gateway::store::redis::{RedisOptions, RedisStore};
use gatehouse_gateway::store::{Store, TokenKind, TokenRecord, unix_now};
use gatehouse_gateway::tokens;
use gatehouse_tests::redis::RedisServer;

/// Keeps the backend's resources alive for the test.
#[allow(dead_code)]
enum Guard {
    Dir(tempfile::TempDir),
    Redis(RedisServer),
}

async fn embedded() -> (Arc<dyn Store>, Guard) {
    let dir = tempfile::tempdir().unwrap();
    let s = EmbeddedStore::open(dir.path()).unwrap();
    (Arc::new(s), Guard::Dir(dir))
}

async fn redis() -> (Arc<dyn Store>, Guard) {
    let server = tokio::task::spawn_blocking(RedisServer::start)
        .await
        .unwrap();
    let s = RedisStore::connect(&RedisOptions::new(&server.url())).unwrap();
    s.ready().await.expect("redis reachable");
    (s, Guard::Redis(server))
}

fn rec(grant: &str, ttl: i64) -> TokenRecord {
    let now = unix_now() as i64;
    TokenRecord {
        kind: TokenKind::Access,
        client_id: "c".into(),
        subscription: "ns/s".into(),
        api: "ns/a".into(),
        user_id: Some("u".into()),
        scope: "profile".into(),
        grant_id: grant.into(),
        issued_at: now as u64,
        expires_at: (now + ttl) as u64,
    }
}

macro_rules! contract {
    ($backend:ident) => {
        mod $backend {
            use super::*;

            #[tokio::test(flavor = "multi_thread")]
            async fn tokens_put_get_revoke() {
                let (s, _g) = super::$backend().await;
                let (a, b) = (tokens::hash("a"), tokens::hash("b"));
                s.put_token(a, rec("g1", 3600)).await.unwrap();
                s.put_token(b, rec("g1", 3600)).await.unwrap();
                assert_eq!(
                    s.get_token(&a).await.unwrap().as_deref(),
                    Some(&rec("g1", 3600))
                );
                assert_eq!(
                    s.revoke_token(&a).await.unwrap().map(|r| r.grant_id),
                    Some("g1".into())
                );
                assert_eq!(s.get_token(&a).await.unwrap(), None);
                assert_eq!(
                    s.revoke_token(&a).await.unwrap(),
                    None,
                    "second revoke finds nothing"
                );
                assert!(s.get_token(&b).await.unwrap().is_some());
            }

            #[tokio::test(flavor = "multi_thread")]
            async fn expired_tokens_are_invisible() {
                let (s, _g) = super::$backend().await;
                let h = tokens::hash("old");
                s.put_token(h, rec("g", -5)).await.unwrap();
                assert_eq!(s.get_token(&h).await.unwrap(), None);
            }

            #[tokio::test(flavor = "multi_thread")]
            async fn revoking_a_grant_revokes_exactly_its_tokens() {
                let (s, _g) = super::$backend().await;
                for i in 0..5 {
                    s.put_token(tokens::hash(&format!("f{i}")), rec("family", 3600))
                        .await
                        .unwrap();
                }
                s.put_token(tokens::hash("other"), rec("other", 3600))
                    .await
                    .unwrap();
                // a cached lookup must not survive the revocation
                assert!(s.get_token(&tokens::hash("f0")).await.unwrap().is_some());
                assert_eq!(s.revoke_grant("family").await.unwrap(), 5);
                for i in 0..5 {
                    assert_eq!(
                        s.get_token(&tokens::hash(&format!("f{i}"))).await.unwrap(),
                        None
                    );
                }
                assert!(s.get_token(&tokens::hash("other")).await.unwrap().is_some());
                assert_eq!(s.revoke_grant("family").await.unwrap(), 0);
            }

            #[tokio::test(flavor = "multi_thread")]
            async fn kv_roundtrip_and_put_new() {
                let (s, _g) = super::$backend().await;
                s.kv_put("k", b"v1", 0).await.unwrap();
                assert_eq!(s.kv_get("k").await.unwrap().as_deref(), Some(&b"v1"[..]));
                s.kv_put("k", b"v2", 60).await.unwrap();
                assert_eq!(s.kv_get("k").await.unwrap().as_deref(), Some(&b"v2"[..]));
                assert!(!s.kv_put_new("k", b"v3", 0).await.unwrap());
                assert!(s.kv_put_new("fresh", b"x", 0).await.unwrap());
                assert!(s.kv_put_existing("k", b"v4", 60).await.unwrap());
                assert_eq!(s.kv_get("k").await.unwrap().as_deref(), Some(&b"v4"[..]));
                s.kv_delete("k").await.unwrap();
                assert_eq!(s.kv_get("k").await.unwrap(), None);
                assert!(!s.kv_put_existing("k", b"v5", 60).await.unwrap());
                assert_eq!(
                    s.kv_get("k").await.unwrap(),
                    None,
                    "written back after a delete"
                );
                assert_eq!(s.kv_get("never").await.unwrap(), None);
            }

            #[tokio::test(flavor = "multi_thread")]
            async fn only_one_of_many_concurrent_claims_wins() {
                let (s, _g) = super::$backend().await;
                s.kv_put("code", b"c", 60).await.unwrap();
                let mut tasks = vec![];
                for i in 0..20 {
                    let s = s.clone();
                    tasks.push(tokio::spawn(async move {
                        let took = s.kv_take("code").await.unwrap().is_some() as usize;
                        let claimed = s
                            .kv_put_new("email", format!("{i}").as_bytes(), 0)
                            .await
                            .unwrap() as usize;
                        (took, claimed)
                    }));
                }
                let (mut took, mut claimed) = (0, 0);
                for t in tasks {
                    let (a, b) = t.await.unwrap();
                    took += a;
                    claimed += b;
                }
                assert_eq!((took, claimed), (1, 1));
            }

            #[tokio::test(flavor = "multi_thread")]
            async fn entries_expire() {
                let (s, _g) = super::$backend().await;
                s.kv_put("short", b"v", 1).await.unwrap();
                assert!(s.counter_incr("ctr", 1).await.unwrap() == 1);
                tokio::time::sleep(Duration::from_millis(2_100)).await;
                // Taking one back from an expired counter does not bring it back.
                s.counter_decr("ctr").await.unwrap();
                assert_eq!(s.kv_get("short").await.unwrap(), None);
                assert_eq!(s.kv_take("short").await.unwrap(), None);
                assert_eq!(s.counter_get("ctr").await.unwrap(), 0);
                assert!(s.kv_put_new("short", b"again", 0).await.unwrap());
                s.kv_put("brief", b"v", 1).await.unwrap();
                tokio::time::sleep(Duration::from_millis(2_100)).await;
                assert!(!s.kv_put_existing("brief", b"back", 60).await.unwrap());
                assert_eq!(s.kv_get("brief").await.unwrap(), None);
            }

            #[tokio::test(flavor = "multi_thread")]
            async fn counters_count_within_a_window() {
                let (s, _g) = super::$backend().await;
                assert_eq!(s.counter_get("c").await.unwrap(), 0);
                for i in 1..=5 {
                    assert_eq!(s.counter_incr("c", 60).await.unwrap(), i);
                }
                assert_eq!(s.counter_get("c").await.unwrap(), 5);
                s.counter_decr("c").await.unwrap();
                assert_eq!(s.counter_get("c").await.unwrap(), 4);
                assert_eq!(s.counter_incr("c", 60).await.unwrap(), 5);
                // Never below 0, and nothing appears for an absent counter.
                s.counter_incr("one", 60).await.unwrap();
                for _ in 0..3 {
                    s.counter_decr("one").await.unwrap();
                    s.counter_decr("absent").await.unwrap();
                }
                assert_eq!(s.counter_get("one").await.unwrap(), 0);
                assert_eq!(s.counter_incr("one", 60).await.unwrap(), 1);
                assert_eq!(s.counter_get("absent").await.unwrap(), 0);
                assert_eq!(s.kv_get("absent").await.unwrap(), None);
                assert!(s.ready().await.is_ok());
            }
        }
    };
}

contract!(embedded);
contract!(redis);

/// Redis keeps a grant's tokens in a sorted set by expiry, pruned on every insert (a minute after
/// expiry): a client that refreshes in a loop leaves one entry per recent token, not one per
/// token ever issued. Grants indexed by earlier gateways (a plain set) are
/// still revoked whole.
#[tokio::test(flavor = "multi_thread")]
async fn redis_grant_indexes_keep_only_live_tokens() {
    let server = tokio::task::spawn_blocking(RedisServer::start)
        .await
        .unwrap();
    let s = RedisStore::connect(&RedisOptions::new(&server.url())).unwrap();
    s.ready().await.unwrap();
    let cli = |args: &[&str]| -> String {
        let out = std::process::Command::new("redis-cli")
            .args(["-p", &server.port.to_string()])
            .args(args)
            .output()
            .expect("redis-cli");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    // Expired 2 s ago (within the minute of slack for other replicas' clocks), and 2 minutes.
    for i in 0..3 {
        s.put_token(tokens::hash(&format!("recent{i}")), rec("loop", -2))
            .await
            .unwrap();
    }
    assert_eq!(cli(&["ZCARD", "gatehouse:grants:loop"]), "3");
    for i in 0..3 {
        s.put_token(tokens::hash(&format!("old{i}")), rec("loop", -120))
            .await
            .unwrap();
    }
    s.put_token(tokens::hash("live"), rec("loop", 3600))
        .await
        .unwrap();
    // The long-expired ones left the index at once; the recent ones stay for the slack.
    assert_eq!(cli(&["ZCARD", "gatehouse:grants:loop"]), "4");
    assert_eq!(s.revoke_grant("loop").await.unwrap(), 4);
    assert_eq!(s.get_token(&tokens::hash("live")).await.unwrap(), None);

    // A grant indexed the old way: its tokens go too.
    let old = tokens::hash("old-style");
    s.put_token(old, rec("old", 3600)).await.unwrap();
    cli(&["DEL", "gatehouse:grants:old"]);
    cli(&["SADD", "gatehouse:grant:old", &hex::encode(old)]);
    assert_eq!(s.revoke_grant("old").await.unwrap(), 1);
    assert_eq!(s.get_token(&old).await.unwrap(), None);
    assert_eq!(cli(&["EXISTS", "gatehouse:grant:old"]), "0");
}
