//! Upstream name resolution that never yields a link-local or cloud instance-metadata address
//! (`gatehouse_crds::compile::is_metadata_ip`). compile refuses such an address written in an
//! Api's URL and `upstream::Target` refuses it in a published configuration; this catches a
//! host name that resolves to one (a DNS record the Api's owner controls, or one rebound
//! after compile looked). Only new connections resolve, so the request path pays nothing.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use gatehouse_crds::compile::is_metadata_ip;
use hyper_util::client::legacy::connect::dns::{GaiResolver, Name};
use tower::Service;

/// getaddrinfo (on the blocking pool, as hyper-util does it) with metadata addresses removed.
#[derive(Clone)]
pub struct GuardedResolver(GaiResolver);

impl GuardedResolver {
    pub fn new() -> GuardedResolver {
        GuardedResolver(GaiResolver::new())
    }
}

impl Default for GuardedResolver {
    fn default() -> Self {
        GuardedResolver::new()
    }
}

/// The addresses a connection may use, in the resolver's order; an error when none is left.
/// Pure.
pub fn allowed(
    name: &str,
    addrs: impl Iterator<Item = SocketAddr>,
) -> io::Result<std::vec::IntoIter<SocketAddr>> {
    let mut refused = false;
    let kept: Vec<SocketAddr> = addrs
        .filter(|a| {
            let bad = is_metadata_ip(a.ip());
            refused |= bad;
            !bad
        })
        .collect();
    if kept.is_empty() && refused {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{name} resolves only to link-local or cloud instance-metadata addresses, which the gateway never proxies to"
            ),
        ));
    }
    Ok(kept.into_iter())
}

impl Service<Name> for GuardedResolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let lookup = self.0.call(name.clone());
        Box::pin(async move { allowed(name.as_str(), lookup.await?) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn metadata_addresses_are_dropped_and_none_left_is_an_error() {
        let mixed = [
            sa("169.254.169.254:80"),
            sa("10.0.0.7:80"),
            sa("[fe80::1]:80"),
        ];
        assert_eq!(
            allowed("b", mixed.into_iter()).unwrap().collect::<Vec<_>>(),
            [sa("10.0.0.7:80")]
        );
        let e = allowed("evil.example", [sa("169.254.169.254:80")].into_iter()).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::PermissionDenied);
        assert!(e.to_string().contains("evil.example"), "{e}");
        // Nothing resolved is getaddrinfo's answer to pass on, not a refusal.
        assert!(allowed("b", std::iter::empty()).unwrap().next().is_none());
    }

    #[tokio::test]
    async fn names_resolving_to_metadata_are_refused() {
        let mut r = GuardedResolver::new();
        // getaddrinfo reads numeric spellings itself (inet_aton takes hex and decimal forms).
        for name in ["169.254.169.254", "0xA9FEA9FE", "2852039166"] {
            let e = r.call(name.parse().unwrap()).await.unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "{name}: {e}");
        }
        let local: Vec<SocketAddr> = r
            .call("127.0.0.1".parse().unwrap())
            .await
            .unwrap()
            .collect();
        assert_eq!(local, [sa("127.0.0.1:0")]);
    }
}
