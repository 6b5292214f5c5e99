//! WebSocket tunnels: once the upstream accepted a checked handshake (proxy.rs), bytes are
//! copied both ways until both sides close, within bounds, so tunnels cannot pile up: at most
//! `--max-websockets` at once per gateway (each holds two sockets) and
//! `--max-websockets-per-caller` per subscription and user (one caller cannot take every
//! slot), closed after the Api's timeout (at least `MIN_IDLE`) with no byte either way, and
//! closed when the access token of the handshake expires or, checked every `RECHECK`, is
//! revoked or its subscription removed (the limits are checked once, at the handshake, as Kong
//! and nginx do).

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::OwnedSemaphorePermit;
// tokio's clock, which tests can pause and advance.
use tokio::time::Instant;

/// Default for `--max-websockets`.
pub const MAX_TUNNELS: usize = 10_000;
/// Default for `--max-websockets-per-caller`.
pub const MAX_PER_CALLER: usize = 100;
/// How often an open tunnel asks whether its token still opens the Api.
pub const RECHECK: Duration = Duration::from_secs(30);
const CENTURY: Duration = Duration::from_secs(100 * 365 * 86_400);
/// The shortest idle limit: nginx's `proxy_read_timeout` default. WebSocket clients usually
/// ping every 20-30 s.
pub const MIN_IDLE: Duration = Duration::from_secs(60);

/// How long one tunnel may stay quiet, and live at most.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub idle: Duration,
    pub lifetime: Duration,
    pub recheck: Duration,
}

impl Limits {
    /// For an Api with upstream `timeout` and a token that expires at `expires_at`, at `now`
    /// (Unix seconds). Pure.
    pub fn new(timeout: Duration, expires_at: u64, now: u64) -> Limits {
        Limits {
            idle: timeout.max(MIN_IDLE),
            lifetime: Duration::from_secs(expires_at.saturating_sub(now)),
            recheck: RECHECK,
        }
    }
}

/// Open tunnels per caller on this replica.
pub struct PerCaller {
    open: dashmap::DashMap<String, usize, foldhash::fast::RandomState>,
    max: usize,
}

impl PerCaller {
    pub fn new(max: usize) -> PerCaller {
        PerCaller {
            open: Default::default(),
            max,
        }
    }

    /// One more tunnel for `caller`, unless it holds the maximum already.
    fn take(self: &Arc<Self>, caller: String) -> Option<CallerSlot> {
        {
            let mut n = self.open.entry(caller.clone()).or_insert(0);
            if *n >= self.max {
                return None;
            }
            *n += 1;
        }
        Some(CallerSlot {
            owner: self.clone(),
            caller,
        })
    }

    /// Tunnels `caller` holds.
    pub fn held(&self, caller: &str) -> usize {
        self.open.get(caller).map_or(0, |n| *n)
    }
}

/// A caller's tunnel, counted until dropped.
struct CallerSlot {
    owner: Arc<PerCaller>,
    caller: String,
}

impl Drop for CallerSlot {
    fn drop(&mut self) {
        self.owner.open.remove_if_mut(&self.caller, |_, n| {
            *n -= 1;
            *n == 0
        });
    }
}

/// The right to one tunnel: one of the gateway's and one of its caller's.
pub struct Slot {
    _gateway: OwnedSemaphorePermit,
    _caller: CallerSlot,
}

/// A slot for `caller` (subscription and user), or `None` when the gateway or the caller holds
/// as many tunnels as it may.
pub fn slot(
    gateway: &Arc<tokio::sync::Semaphore>,
    callers: &Arc<PerCaller>,
    caller: String,
) -> Option<Slot> {
    let gateway = gateway.clone().try_acquire_owned().ok()?;
    Some(Slot {
        _gateway: gateway,
        _caller: callers.take(caller)?,
    })
}

/// Waits for both connections to switch, then copies bytes both ways until both sides have
/// closed, the tunnel idles for `limits.idle`, `limits.lifetime` is over, or `still_valid`
/// (asked every `limits.recheck`) says no. Holds `slot` until then.
pub async fn run<F, Fut>(
    client: OnUpgrade,
    upstream: OnUpgrade,
    limits: Limits,
    slot: Slot,
    still_valid: F,
) where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let started = Instant::now();
    let (client, upstream) = match tokio::try_join!(client, upstream) {
        Ok(both) => both,
        Err(e) => {
            tracing::debug!(error = %e, "a WebSocket handshake did not complete");
            return;
        }
    };
    let open = metrics::gauge!("gatehouse_websocket_tunnels");
    open.increment(1.0);
    let why = pipe(
        TokioIo::new(client),
        TokioIo::new(upstream),
        limits,
        started,
        still_valid,
    )
    .await;
    open.decrement(1.0);
    tracing::debug!(why, lasted = ?started.elapsed(), "WebSocket tunnel ended");
    drop(slot);
}

/// Copies both ways between `client` and `upstream` within `limits` counted from `started`;
/// returns why it stopped.
async fn pipe<A, B, F, Fut>(
    client: A,
    upstream: B,
    limits: Limits,
    started: Instant,
    mut still_valid: F,
) -> &'static str
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    // Milliseconds after `started` of the last byte read from either side.
    let last = Arc::new(AtomicU64::new(0));
    let mut client = Activity::new(client, &last, started);
    let mut upstream = Activity::new(upstream, &last, started);
    let copy = tokio::io::copy_bidirectional(&mut client, &mut upstream);
    tokio::pin!(copy);
    // `Instant + Duration` panics past the clock's range: no limit is longer than a century.
    let idle = limits.idle.min(CENTURY);
    let ends = started + limits.lifetime.min(CENTURY);
    let mut idle_check = started + idle;
    let recheck = limits.recheck.min(CENTURY);
    let mut next_recheck = started + recheck;
    loop {
        tokio::select! {
            copied = &mut copy => match copied {
                Ok(_) => break "closed",
                Err(e) => {
                    tracing::debug!(error = %e, "a WebSocket tunnel failed");
                    break "failed";
                }
            },
            () = tokio::time::sleep_until(ends) => break "the token expired",
            () = tokio::time::sleep_until(idle_check) => {
                let quiet_since = started + Duration::from_millis(last.load(Ordering::Relaxed));
                let next = quiet_since + idle;
                if next <= Instant::now() {
                    break "idle";
                }
                idle_check = next;
            }
            () = tokio::time::sleep_until(next_recheck) => {
                if !still_valid().await {
                    break "the token no longer opens the Api";
                }
                next_recheck += recheck;
            }
        }
    }
}

/// A connection that notes when it last read something.
struct Activity<T> {
    io: T,
    last: Arc<AtomicU64>,
    started: Instant,
}

impl<T> Activity<T> {
    fn new(io: T, last: &Arc<AtomicU64>, started: Instant) -> Activity<T> {
        Activity {
            io,
            last: last.clone(),
            started,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Activity<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            let ms = self.started.elapsed().as_millis() as u64;
            self.last.store(ms, Ordering::Relaxed);
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Activity<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_follow_the_api_timeout_and_the_token() {
        let l = Limits::new(Duration::from_secs(30), 10_003_600, 10_000_000);
        assert_eq!(l.idle, MIN_IDLE, "never below a minute");
        assert_eq!(l.recheck, RECHECK);
        assert_eq!(l.lifetime, Duration::from_secs(3600));
        let l = Limits::new(Duration::from_secs(600), 10, 20);
        assert_eq!(l.idle, Duration::from_secs(600));
        assert_eq!(
            l.lifetime,
            Duration::ZERO,
            "an expired token gets no tunnel time"
        );
    }

    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream, duplex};

    /// A tunnel between two in-memory connections; returns the far ends and the tunnel.
    fn tunnel(
        limits: Limits,
    ) -> (
        DuplexStream,
        DuplexStream,
        tokio::task::JoinHandle<&'static str>,
    ) {
        let (client, gw_client) = duplex(1024);
        let (gw_upstream, upstream) = duplex(1024);
        let t = tokio::spawn(pipe(
            gw_client,
            gw_upstream,
            limits,
            Instant::now(),
            || async { true },
        ));
        (client, upstream, t)
    }

    async fn pass(from: &mut DuplexStream, to: &mut DuplexStream, msg: &[u8]) {
        from.write_all(msg).await.unwrap();
        let mut got = vec![0; msg.len()];
        to.read_exact(&mut got).await.unwrap();
        assert_eq!(got, msg);
    }

    const HOUR: Duration = Duration::from_secs(3600);

    #[tokio::test(start_paused = true)]
    async fn a_quiet_tunnel_closes_after_its_idle_limit_and_traffic_keeps_it_open() {
        let idle = Duration::from_secs(60);
        let (mut client, mut upstream, t) = tunnel(Limits {
            idle,
            lifetime: HOUR,
            recheck: HOUR,
        });
        for _ in 0..5 {
            // Either direction counts.
            tokio::time::sleep(Duration::from_secs(50)).await;
            pass(&mut client, &mut upstream, b"ping").await;
            tokio::time::sleep(Duration::from_secs(50)).await;
            pass(&mut upstream, &mut client, b"pong").await;
        }
        assert!(!t.is_finished(), "500 s of traffic every 50 s");
        tokio::time::sleep(Duration::from_secs(59)).await;
        assert!(!t.is_finished());
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(t.await.unwrap(), "idle");
        // Both far ends see the tunnel close.
        assert_eq!(client.read(&mut [0; 8]).await.unwrap(), 0);
        assert_eq!(upstream.read(&mut [0; 8]).await.unwrap(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_tunnel_ends_with_its_token_however_busy() {
        let lifetime = Duration::from_secs(90);
        let (mut client, mut upstream, t) = tunnel(Limits {
            idle: HOUR,
            lifetime,
            recheck: HOUR,
        });
        for _ in 0..8 {
            tokio::time::sleep(Duration::from_secs(10)).await;
            pass(&mut client, &mut upstream, b"data").await;
        }
        tokio::time::sleep(Duration::from_secs(11)).await;
        assert_eq!(t.await.unwrap(), "the token expired");
    }

    #[test]
    fn each_caller_holds_at_most_its_share_of_the_gateways_slots() {
        let gateway = Arc::new(tokio::sync::Semaphore::new(3));
        let callers = Arc::new(PerCaller::new(2));
        let a1 = slot(&gateway, &callers, "s/a".into()).expect("a's first");
        let a2 = slot(&gateway, &callers, "s/a".into()).expect("a's second");
        assert!(
            slot(&gateway, &callers, "s/a".into()).is_none(),
            "a's third"
        );
        assert_eq!(
            gateway.available_permits(),
            1,
            "the refusal took no gateway slot"
        );
        let b1 = slot(&gateway, &callers, "s/b".into()).expect("b's first");
        assert!(
            slot(&gateway, &callers, "s/c".into()).is_none(),
            "the gateway is full"
        );
        assert_eq!(callers.held("s/c"), 0);
        drop(a1);
        assert_eq!(callers.held("s/a"), 1);
        let a3 = slot(&gateway, &callers, "s/a".into()).expect("a's slot came back");
        drop((a2, a3, b1));
        assert_eq!(gateway.available_permits(), 3);
        assert!(callers.open.is_empty(), "no entry left behind");
    }

    #[tokio::test(start_paused = true)]
    async fn limits_beyond_any_clock_do_not_panic() {
        let forever = Duration::from_secs(u64::MAX);
        let (mut client, mut upstream, t) = tunnel(Limits {
            idle: forever,
            lifetime: forever,
            recheck: forever,
        });
        pass(&mut client, &mut upstream, b"x").await;
        drop((client, upstream));
        assert_eq!(t.await.unwrap(), "closed");
    }

    #[tokio::test(start_paused = true)]
    async fn a_tunnel_ends_once_its_token_no_longer_opens_the_api() {
        let valid = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let asked = Arc::new(AtomicU64::new(0));
        let (client, gw_client) = duplex(1024);
        let (gw_upstream, upstream) = duplex(1024);
        let limits = Limits {
            idle: HOUR,
            lifetime: HOUR,
            recheck: Duration::from_secs(30),
        };
        let (v, a) = (valid.clone(), asked.clone());
        let t = tokio::spawn(pipe(
            gw_client,
            gw_upstream,
            limits,
            Instant::now(),
            move || {
                a.fetch_add(1, Ordering::SeqCst);
                let ok = v.load(Ordering::SeqCst);
                async move { ok }
            },
        ));
        tokio::time::sleep(Duration::from_secs(95)).await;
        assert_eq!(asked.load(Ordering::SeqCst), 3, "asked at 30, 60 and 90 s");
        assert!(!t.is_finished());
        valid.store(false, Ordering::SeqCst); // revoked
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert_eq!(t.await.unwrap(), "the token no longer opens the Api");
        drop((client, upstream));
    }

    #[tokio::test]
    async fn a_side_that_closes_ends_the_tunnel() {
        let (mut client, mut upstream, t) = tunnel(Limits {
            idle: HOUR,
            lifetime: HOUR,
            recheck: HOUR,
        });
        pass(&mut client, &mut upstream, b"bye").await;
        drop(client);
        // The upstream sees the close, and closing its side ends the copy.
        assert_eq!(upstream.read(&mut [0; 8]).await.unwrap(), 0);
        drop(upstream);
        assert_eq!(t.await.unwrap(), "closed");
    }
}
