//! Redis connections per thread. Each gateway worker runs its own single-threaded runtime; a
//! connection made on that thread is driven by that runtime, so a Redis round trip on the
//! request path never hands work to another thread.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

thread_local! {
    /// (owner id, connection): a thread may serve several stores (tests), each its own server.
    static CONNECTIONS: RefCell<Vec<(u64, ConnectionManager)>> = const { RefCell::new(Vec::new()) };
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

#[derive(Clone)]
pub struct Connections {
    id: u64,
    client: redis::Client,
    config: ConnectionManagerConfig,
    /// Used when a per-thread connection cannot be set up.
    shared: ConnectionManager,
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
        })
    }

    /// This thread's connection (made lazily, reconnecting by itself). Call from a runtime.
    pub fn get(&self) -> ConnectionManager {
        CONNECTIONS.with(|conns| {
            let mut conns = conns.borrow_mut();
            if let Some((_, c)) = conns.iter().find(|(id, _)| *id == self.id) {
                return c.clone();
            }
            match ConnectionManager::new_lazy_with_config(self.client.clone(), self.config.clone())
            {
                Ok(c) => {
                    conns.push((self.id, c.clone()));
                    c
                }
                Err(_) => self.shared.clone(),
            }
        })
    }
}
