//! The in-process limiter and the Redis script must answer the same request sequence the same
//! way: same allow/refuse, same limit, remaining, reset and retry-after.

use gatehouse_gateway::ratelimit::local::LocalLimiter;
use gatehouse_gateway::ratelimit::redis::RedisLimiter;
use gatehouse_gateway::ratelimit::{LimitCheck, Limiter};
use gatehouse_gateway::store::redis::{RedisOptions, RedisStore};
use gatehouse_tests::redis::RedisServer;
use std::time::{Duration, Instant};

async fn redis_limiter() -> (RedisLimiter, RedisServer) {
    let server = tokio::task::spawn_blocking(RedisServer::start)
        .await
        .unwrap();
    let store = RedisStore::connect(&RedisOptions::new(&server.url())).unwrap();
    (RedisLimiter::new(store.connection()), server)
}

/// The limits of three callers under one plan: `per_second` per user, `per_minute` per
/// application.
fn three_callers(per_second: u64, per_minute: u64) -> Vec<Vec<LimitCheck>> {
    (0..3)
        .map(|u| {
            vec![
                LimitCheck::new(format!("rl:{{s}}:p:0:u{u}"), per_second, 1),
                LimitCheck::new("rl:{s}:p:1:-", per_minute, 60),
            ]
        })
        .collect()
}

/// A reproducible pseudo-random sequence (xorshift64).
fn xorshift(mut seed: u64) -> impl FnMut() -> u64 {
    move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn same_sequence_same_answers() {
    let (redis, _server) = redis_limiter().await;
    let local = LocalLimiter::default();
    // Three callers; a plan with a per-user 5/s and a per-application 20/min limit.
    let plans = three_callers(5, 20);
    let mut now: u64 = 1_700_000_000_000_000;
    let mut next = xorshift(0x2545_f491_4f6c_dd1d);
    let mut allowed = 0;
    for i in 0..600 {
        let seed = next();
        now += seed % 400_000; // 0-400 ms apart
        let checks = &plans[(seed % 3) as usize];
        let a = local.check_at(checks, now);
        let b = redis.check_at(checks, Some(now)).await.unwrap();
        assert_eq!(a, b, "request {i} at t={now}: local {a:?} vs redis {b:?}");
        allowed += a.allowed as usize;
    }
    assert!(
        allowed > 50 && allowed < 600,
        "the sequence exercised both answers ({allowed} allowed)"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refusal_consumes_none_of_the_other_limits_in_redis() {
    let (redis, _server) = redis_limiter().await;
    let now = 1_700_000_000_000_000u64;
    let wide = LimitCheck::new("rl:{s}:wide", 100, 1);
    let narrow = LimitCheck::new("rl:{s}:narrow", 2, 1);
    for _ in 0..2 {
        assert!(
            redis
                .check_at(&[wide.clone(), narrow.clone()], Some(now))
                .await
                .unwrap()
                .allowed
        );
    }
    for _ in 0..10 {
        assert!(
            !redis
                .check_at(&[wide.clone(), narrow.clone()], Some(now))
                .await
                .unwrap()
                .allowed
        );
    }
    let d = redis.check_at(&[wide], Some(now)).await.unwrap();
    assert_eq!(d.remaining, 97);
}

#[tokio::test(flavor = "multi_thread")]
async fn server_clock_mode_limits_a_burst() {
    let (redis, _server) = redis_limiter().await;
    let checks = [LimitCheck::new("rl:{s}:clock", 5, 1)];
    let mut passed = 0;
    for _ in 0..8 {
        passed += redis.check_at(&checks, None).await.unwrap().allowed as usize;
    }
    assert_eq!(passed, 5);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_batch_answers_like_its_requests_one_by_one() {
    let (redis, _server) = redis_limiter().await;
    let local = LocalLimiter::default();
    let plans = three_callers(4, 30);
    let mut now: u64 = 1_700_000_000_000_000;
    let mut next = xorshift(0x9e37_79b9_7f4a_7c15);
    let (mut allowed, mut refused) = (0, 0);
    for b in 0..80 {
        now += next() % 700_000;
        // 1-8 requests decided at one instant, the same caller often several times.
        let batch: Vec<&[LimitCheck]> = (0..1 + next() % 8)
            .map(|_| plans[(next() % 3) as usize].as_slice())
            .collect();
        let expected: Vec<_> = batch.iter().map(|c| local.check_at(c, now)).collect();
        let got = redis.check_batch_at(&batch, Some(now)).await.unwrap();
        assert_eq!(expected, got, "batch {b} at t={now}");
        allowed += got.iter().filter(|d| d.allowed).count();
        refused += got.iter().filter(|d| !d.allowed).count();
    }
    assert!(
        allowed > 30 && refused > 30,
        "the batches exercised both answers ({allowed} allowed, {refused} refused)"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_checks_admit_exactly_the_burst() {
    let (redis, _server) = redis_limiter().await;
    // Submitted together, so they go to Redis as one batch (or a few): still exactly 10 pass.
    let answers = futures_util::future::join_all(
        (0..40).map(|_| redis.check(vec![LimitCheck::new("rl:{s}:burst", 10, 3600)])),
    )
    .await;
    let passed = answers
        .iter()
        .filter(|a| a.as_ref().unwrap().allowed)
        .count();
    assert_eq!(passed, 10);
    let last = answers.last().unwrap().as_ref().unwrap();
    assert!(last.retry_after_us > 0 && last.limit == 10);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_key_under_two_rates_in_one_batch_keeps_one_tat() {
    // A plan changed between two requests of one batch: the key is the same, its rate is not.
    let (redis, _server) = redis_limiter().await;
    let local = LocalLimiter::default();
    let now = 1_700_000_000_000_000u64;
    let wide = [LimitCheck::new("rl:{s}:p:0:u", 3, 1)];
    let narrow = [LimitCheck::new("rl:{s}:p:0:u", 2, 1)];
    let batch: Vec<&[LimitCheck]> = vec![&wide, &narrow, &narrow, &wide, &wide];
    let expected: Vec<_> = batch.iter().map(|c| local.check_at(c, now)).collect();
    let got = redis.check_batch_at(&batch, Some(now)).await.unwrap();
    assert_eq!(expected, got);
    assert_eq!(
        got.iter().map(|d| d.allowed).collect::<Vec<_>>(),
        // The narrow request moved the TAT 833 ms ahead: past the wide limit's 667 ms too.
        [true, true, false, false, false]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_largest_batch_fits_the_script() {
    // A full batch (64 requests, the coalescer's bound) of plans with 16 limits each (the
    // compile bound), every key distinct: 1,024 keys and 3,136 packed numbers in one call.
    let (redis, _server) = redis_limiter().await;
    let local = LocalLimiter::default();
    let requests: Vec<Vec<LimitCheck>> = (0..64)
        .map(|u| {
            (0..16)
                .map(|l| LimitCheck::new(format!("rl:{{s}}:p:{l}:u{u}"), 1 + l, 1 + l * 60))
                .collect()
        })
        .collect();
    let now = 1_700_000_000_000_000u64;
    for round in 0..3 {
        let batch: Vec<&[LimitCheck]> = requests.iter().map(Vec::as_slice).collect();
        let expected: Vec<_> = batch.iter().map(|c| local.check_at(c, now)).collect();
        let got = redis.check_batch_at(&batch, Some(now)).await.unwrap();
        assert_eq!(expected, got, "round {round}");
        // The 1-per-second limit admits each caller once.
        assert_eq!(
            got.iter().filter(|d| d.allowed).count(),
            64 * (round == 0) as usize
        );
    }
}

/// A Redis that lost its scripts (restarted, `SCRIPT FLUSH`) gets the script again and the
/// check goes on; the first call also found no script, since nothing loaded it in advance.
#[tokio::test(flavor = "multi_thread")]
async fn a_flushed_script_is_loaded_again() {
    let (redis, server) = redis_limiter().await;
    let checks = vec![LimitCheck::new("rl:{s}:p:0:u", 10, 1)];
    let first = redis.check(checks.clone()).await.unwrap();
    assert!(first.allowed && first.remaining == 9, "{first:?}");
    let client = redis::Client::open(server.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut conn)
        .await
        .unwrap();
    let second = redis.check(checks).await.unwrap();
    assert!(second.allowed && second.remaining == 8, "{second:?}");
}

/// On the server clock a refusal is remembered: a caller over its limit is answered without a
/// round trip (`check_now`), with the wait Redis reported (less the time since), and the other
/// callers of the subscription are not affected. (The proxy asks `check_now` first; that no
/// script call is made is checked end to end in tests/tests/redis_mode.rs.)
#[tokio::test(flavor = "multi_thread")]
async fn a_refusal_is_answered_from_memory_until_its_wait_is_over() {
    let (redis, _server) = redis_limiter().await;
    let app = LimitCheck::new("rl:{s}:p:1:-", 1000, 3600);
    let checks = vec![LimitCheck::new("rl:{s}:p:0:u", 2, 3600), app.clone()];
    assert_eq!(redis.check_now(&checks, Instant::now()), None);
    for _ in 0..2 {
        assert!(redis.check(checks.clone()).await.unwrap().allowed);
        assert_eq!(redis.check_now(&checks, Instant::now()), None);
    }
    let refused = redis.check(checks.clone()).await.unwrap();
    assert!(!refused.allowed && refused.limit == 2, "{refused:?}");
    let local = redis
        .check_now(&checks, Instant::now())
        .expect("the refusal is remembered");
    assert!(!local.allowed && local.limit == 2 && local.remaining == 0);
    assert!(
        local.retry_after_us <= refused.retry_after_us
            && local.retry_after_us + 1_000_000 > refused.retry_after_us,
        "{local:?} vs {refused:?}"
    );
    assert!(local.reset_us <= refused.reset_us && local.reset_us > local.retry_after_us);
    let other = [LimitCheck::new("rl:{s}:p:0:v", 2, 3600), app];
    assert_eq!(redis.check_now(&other, Instant::now()), None);

    // Refused by a request's second limit, shared by the subscription's users: every user's
    // requests wait for it.
    let daily = LimitCheck::new("rl:{t}:p:1:-", 1, 86_400);
    let for_user = |u: &str| {
        vec![
            LimitCheck::new(format!("rl:{{t}}:p:0:{u}"), 100, 1),
            daily.clone(),
        ]
    };
    assert!(redis.check(for_user("a")).await.unwrap().allowed);
    assert!(!redis.check(for_user("a")).await.unwrap().allowed);
    let d = redis
        .check_now(&for_user("b"), Instant::now())
        .expect("the shared limit's refusal is remembered");
    assert_eq!(d.limit, 1);
}

/// A remembered refusal ends no later than Redis's own: the moment it is over, Redis admits
/// the caller again.
#[tokio::test(flavor = "multi_thread")]
async fn a_remembered_refusal_ends_no_later_than_redis_refuses() {
    let (redis, _server) = redis_limiter().await;
    // 2 per second: a burst of 2, then one every 500 ms; the budget is whole 1 s after the
    // burst, while a third request may pass 500 ms after it.
    let checks = vec![LimitCheck::new("rl:{s}:p:0:w", 2, 1)];
    for _ in 0..2 {
        assert!(redis.check(checks.clone()).await.unwrap().allowed);
    }
    let refused = redis.check(checks.clone()).await.unwrap();
    assert!(!refused.allowed && refused.retry_after_us < refused.reset_us);
    assert!(
        redis.check_now(&checks, Instant::now()).is_some(),
        "remembered"
    );
    // Redis's wait, counted from after its answer: the remembered one is over by then.
    tokio::time::sleep(Duration::from_micros(refused.retry_after_us)).await;
    assert_eq!(redis.check_now(&checks, Instant::now()), None);
    let again = redis.check(checks).await.unwrap();
    assert!(again.allowed, "Redis still refuses: {again:?}");
}

/// Requests decided together in one script call on the server clock: the refusals among them
/// are remembered under the key that refused, whichever request of the batch it was.
#[tokio::test(flavor = "multi_thread")]
async fn refusals_inside_a_batch_are_remembered() {
    let (redis, _server) = redis_limiter().await;
    let for_user = |u: &str| {
        vec![
            LimitCheck::new("rl:{b}:p:1:-", 1000, 3600),
            LimitCheck::new(format!("rl:{{b}}:p:0:{u}"), 2, 3600),
        ]
    };
    // One script call on the server clock: five requests of user a, one of user b.
    let (a, b) = (for_user("a"), for_user("b"));
    let batch: Vec<&[LimitCheck]> = vec![&a, &a, &a, &a, &a, &b];
    let answers: Vec<bool> = redis
        .check_batch_at(&batch, None)
        .await
        .unwrap()
        .iter()
        .map(|d| d.allowed)
        .collect();
    assert_eq!(answers, [true, true, false, false, false, true]);
    let d = redis
        .check_now(&for_user("a"), Instant::now())
        .expect("user a's refusal is remembered");
    assert_eq!((d.limit, d.remaining), (2, 0));
    assert_eq!(redis.check_now(&for_user("b"), Instant::now()), None);
}
