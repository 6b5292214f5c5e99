//! Redis connections per thread. Each gateway worker runs its own single-threaded runtime; a
//! connection made on that thread is driven by that runtime, so a Redis round trip on the
//! request path never hands work to another thread.
//!
//! redis-rs's ConnectionManager reconnects only when a command fails with a dropped-connection
//! error. Two failures never look like that: a server that became a replica in a failover
//! behind the endpoint (every write answers READONLY on a healthy connection) and a connection
//! that went silent without FIN or RST (every command times out). For those, `reset` makes every
//! thread open a new connection (resolving the host again) on its next command.
//!
//! A connection the server closed while it was idle (Redis restarted, a pod rescheduled) is only
//! found dead by the next command, which redis-rs fails while it reconnects. `retrying` runs an
//! operation that may safely run twice once more on the new connection.

use std::cell::RefCell;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

thread_local! {
    /// (owner id, generation, connection): a thread may serve several stores (tests), each its
    /// own server.
    static CONNECTIONS: RefCell<Vec<(u64, u64, ConnectionManager)>> = const { RefCell::new(Vec::new()) };
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// At most one reset per this many milliseconds (a burst of timeouts is one event).
const RESET_EVERY_MS: u64 = 1_000;

#[derive(Clone)]
pub struct Connections {
    id: u64,
    client: redis::Client,
    config: ConnectionManagerConfig,
    /// Used when a per-thread connection cannot be set up.
    shared: ConnectionManager,
    /// Bumped by `reset`; a thread whose connection is older makes a new one.
    generation: Arc<AtomicU64>,
    /// Milliseconds after `started` of the last reset.
    last_reset_ms: Arc<AtomicU64>,
    started: Instant,
}

/// Whether an error means the connection it came on should be replaced: READONLY (also inside
/// an aborted transaction or a script error) or a response timeout.
pub fn needs_new_connection(e: &redis::RedisError) -> bool {
    let readonly = redis::ServerErrorKind::ReadOnly;
    e.is_timeout()
        || e.kind() == redis::ErrorKind::Server(readonly)
        || e.clone()
            .into_server_errors()
            .is_some_and(|errs| errs.iter().any(|(_, se)| se.kind() == Some(readonly)))
}

impl Connections {
    pub fn new(
        client: redis::Client,
        config: ConnectionManagerConfig,
    ) -> redis::RedisResult<Connections> {
        let shared = ConnectionManager::new_lazy_with_config(client.clone(), config.clone())?;
        Ok(Connections {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            client,
            config,
            shared,
            generation: Arc::new(AtomicU64::new(0)),
            last_reset_ms: Arc::new(AtomicU64::new(0)),
            started: Instant::now(),
        })
    }

    /// This thread's connection (made lazily, reconnecting by itself). Call from a runtime.
    pub fn get(&self) -> ConnectionManager {
        let generation = self.generation.load(Ordering::Acquire);
        CONNECTIONS.with(|conns| {
            let mut conns = conns.borrow_mut();
            if let Some(pos) = conns.iter().position(|(id, _, _)| *id == self.id) {
                if conns[pos].1 == generation {
                    return conns[pos].2.clone();
                }
                // Commands still under way keep the old connection until they finish.
                conns.swap_remove(pos);
            }
            match ConnectionManager::new_lazy_with_config(self.client.clone(), self.config.clone())
            {
                Ok(c) => {
                    conns.push((self.id, generation, c.clone()));
                    c
                }
                Err(_) => self.shared.clone(),
            }
        })
    }

    /// Every thread makes a new connection on its next command. Rate-limited.
    pub fn reset(&self, why: &str) {
        let now = self.started.elapsed().as_millis() as u64 + RESET_EVERY_MS;
        let last = self.last_reset_ms.load(Ordering::Relaxed);
        if now < last + RESET_EVERY_MS
            || self
                .last_reset_ms
                .compare_exchange(last, now, Ordering::AcqRel, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        self.generation.fetch_add(1, Ordering::AcqRel);
        tracing::warn!(reason = why, "replacing the Redis connections");
    }

    /// Runs `op` on this thread's connection and, when that connection turns out to be closed,
    /// once more on its replacement. Only for operations that may run twice (reads and plain
    /// overwrites): the error cannot tell a command never sent from one whose reply was lost.
    pub async fn retrying<T, F, Fut>(&self, op: F) -> redis::RedisResult<T>
    where
        F: Fn(ConnectionManager) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        match op(self.get()).await {
            Err(e) if e.is_connection_dropped() => op(self.get()).await,
            other => other,
        }
    }

    /// `e` after replacing the connections when it calls for that.
    pub fn check(&self, e: redis::RedisError) -> redis::RedisError {
        if needs_new_connection(&e) {
            self.reset(if e.is_timeout() {
                "timeout"
            } else {
                "READONLY: the server is a replica"
            });
        }
        e
    }
}
