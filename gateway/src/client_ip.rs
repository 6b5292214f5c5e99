//! Who the client is, for per-address throttles (login failures, signups). Behind an ingress or
//! a load balancer every request comes from the proxy's address, so a per-address limit would
//! be one limit for everybody: an attacker's 20 bad logins would lock every user out. The
//! addresses of those proxies are configured (`--trusted-proxies`); a request from one of them
//! is attributed to the nearest address in `X-Forwarded-For` that is not a trusted proxy, as
//! nginx's `real_ip_recursive` and Kong's `trusted_ips` do. Pure.

use std::net::{IpAddr, Ipv6Addr};
use std::str::FromStr;

use http::HeaderMap;
use ipnet::IpNet;

use crate::headers::FORWARDED_FOR;

/// The proxies whose `X-Forwarded-For` is believed. Empty: nobody's (the socket address counts).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies(Vec<IpNet>);

impl FromStr for TrustedProxies {
    type Err = String;

    /// Comma-separated CIDRs or single addresses: `10.0.0.0/8, 192.168.1.7, fd00::/8`.
    fn from_str(s: &str) -> Result<TrustedProxies, String> {
        let mut nets = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let net = match part.parse::<IpNet>() {
                Ok(n) => n,
                Err(_) => part.parse::<IpAddr>().map(IpNet::from).map_err(|_| {
                    format!("{part:?} is neither an IP address nor a CIDR like 10.0.0.0/8")
                })?,
            };
            nets.push(net);
        }
        Ok(TrustedProxies(nets))
    }
}

impl TrustedProxies {
    /// No proxy is trusted: every request counts as its socket's address.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn trusts(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.0.iter().any(|n| n.contains(&ip))
    }

    /// The client's address: `peer` itself unless it is a trusted proxy; then, walking
    /// `X-Forwarded-For` from its end (the entry the nearest proxy appended), the first address
    /// that is not a trusted proxy. An entry that is not an address ends the walk at the proxy
    /// that passed it on; when every entry is trusted, the first one.
    pub fn client_ip(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        if self.0.is_empty() || !self.trusts(peer) {
            return peer;
        }
        let mut client = peer;
        // Several X-Forwarded-For lines are one list, in order (RFC 9110 5.3).
        for line in headers.get_all(FORWARDED_FOR).iter().rev() {
            // Bytes, entry by entry: a proxy that merges the client's value into its own line
            // keeps the client's bytes, and a non-ASCII one must not cost the entries after it.
            for entry in line.as_bytes().rsplit(|&b| b == b',') {
                let Some(ip) = std::str::from_utf8(entry)
                    .ok()
                    .and_then(|e| parse_entry(e.trim()))
                else {
                    return client;
                };
                client = ip;
                if !self.trusts(ip) {
                    return ip;
                }
            }
        }
        client
    }
}

/// An X-Forwarded-For entry: an address, also `[v6]`, `[v6]:port` or `v4:port` as some
/// proxies write them.
fn parse_entry(entry: &str) -> Option<IpAddr> {
    if let Ok(ip) = entry.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Some(rest) = entry.strip_prefix('[') {
        return rest
            .split(']')
            .next()?
            .parse::<Ipv6Addr>()
            .ok()
            .map(IpAddr::V6);
    }
    entry.parse::<std::net::SocketAddr>().ok().map(|a| a.ip())
}

/// IPv4-mapped IPv6 addresses (dual-stack sockets) as the IPv4 address they are.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// The throttles' key for a client address: an IPv4 address as is; for IPv6 its /64, the
/// smallest block one subscriber is given (each host in it can pick any address).
pub fn throttle_key(ip: IpAddr) -> String {
    match canonical(ip) {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => {
            let s = v6.segments();
            let net = Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0);
            format!("{net}/64")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn xff(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(FORWARDED_FOR, v.parse().unwrap());
        }
        h
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn without_trusted_proxies_the_socket_address_counts() {
        let none = TrustedProxies::default();
        assert_eq!(
            none.client_ip(ip("10.1.2.3"), &xff(&["1.2.3.4"])),
            ip("10.1.2.3")
        );
    }

    #[test]
    fn a_trusted_proxy_is_looked_through_an_untrusted_peer_is_not() {
        let t: TrustedProxies = "10.0.0.0/8, 192.168.1.7".parse().unwrap();
        // (socket peer, X-Forwarded-For lines, the client it counts as)
        let merged = {
            let mut h = HeaderMap::new();
            let v = http::HeaderValue::from_bytes(b"\xff\xfe, 203.0.113.9").unwrap();
            h.insert(FORWARDED_FOR, v);
            h
        };
        assert_eq!(t.client_ip(ip("10.1.2.3"), &merged), ip("203.0.113.9"));
        let cases: [(&str, &[&str], &str); 11] = [
            // The ingress (10.x) appended the client's address.
            ("10.1.2.3", &["203.0.113.9"], "203.0.113.9"),
            // A client that talks to the gateway directly cannot pick its address.
            ("198.51.100.1", &["203.0.113.9"], "198.51.100.1"),
            // A forged entry in front of what the ingress appended is not believed.
            ("10.1.2.3", &["1.1.1.1, 203.0.113.9"], "203.0.113.9"),
            // Two trusted hops (load balancer 192.168.1.7, then the ingress), two header lines.
            (
                "10.1.2.3",
                &["6.6.6.6, 203.0.113.9", "192.168.1.7"],
                "203.0.113.9",
            ),
            // No header: the proxy itself.
            ("10.1.2.3", &[], "10.1.2.3"),
            // Every entry trusted: the first one.
            ("10.1.2.3", &["10.9.9.9"], "10.9.9.9"),
            // Garbage ends the walk at the proxy that passed it on.
            ("10.1.2.3", &["203.0.113.9, nonsense"], "10.1.2.3"),
            // Ports and brackets as some proxies write them.
            ("10.1.2.3", &["203.0.113.9:4711"], "203.0.113.9"),
            ("10.1.2.3", &["[2001:db8::1]:4711"], "2001:db8::1"),
            // A dual-stack socket's IPv4-mapped peer is the IPv4 proxy.
            ("::ffff:10.1.2.3", &["203.0.113.9"], "203.0.113.9"),
            // An untrusted IPv6 peer counts as itself.
            ("2001:db8::7", &["203.0.113.9"], "2001:db8::7"),
        ];
        for (peer, lines, want) in cases {
            assert_eq!(
                t.client_ip(ip(peer), &xff(lines)),
                ip(want),
                "{peer} {lines:?}"
            );
        }
    }

    #[test]
    fn bad_lists_are_refused_with_the_entry() {
        let e = "10.0.0.0/8, ten".parse::<TrustedProxies>().unwrap_err();
        assert!(e.contains("\"ten\""), "{e}");
        assert_eq!(
            "".parse::<TrustedProxies>().unwrap(),
            TrustedProxies::default()
        );
    }

    #[test]
    fn ipv6_clients_are_throttled_per_64() {
        assert_eq!(throttle_key(ip("203.0.113.9")), "203.0.113.9");
        assert_eq!(throttle_key(ip("::ffff:203.0.113.9")), "203.0.113.9");
        assert_eq!(
            throttle_key(ip("2001:db8:1:2:aaaa::1")),
            "2001:db8:1:2::/64"
        );
        assert_eq!(
            throttle_key(ip("2001:db8:1:2:ffff::9")),
            throttle_key(ip("2001:db8:1:2::1"))
        );
        assert_ne!(
            throttle_key(ip("2001:db8:1:3::1")),
            throttle_key(ip("2001:db8:1:2::1"))
        );
    }
}
