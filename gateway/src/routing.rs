//! Which Api a request belongs to, and where it goes upstream. Pure functions.

use gatehouse_crds::ApiConfig;

/// Does `prefix` cover `path` on a segment boundary? (`/mobile` covers `/mobile` and
/// `/mobile/x`, not `/mobilex`.)
pub fn prefix_matches(prefix: &str, path: &str) -> bool {
    if prefix == "/" {
        return true;
    }
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

/// Does the path hold a `.` or `..` segment, also percent-encoded (`%2e`) or behind an encoded
/// or backslash separator (`%2f`, `%5c`, `\`)? Such a path is refused: routing and plan checks
/// use the path as sent, and a backend that resolves it would serve another Api's resource.
pub fn has_dot_segment(path: &str) -> bool {
    // One pass over the bytes: most paths have no '.', and few need decoding.
    let (mut dot, mut encoded) = (false, false);
    for &c in path.as_bytes() {
        match c {
            b'.' => dot = true,
            b'%' | b'\\' => encoded = true,
            _ => {}
        }
    }
    // A `;` starts path parameters, which Java servers cut off before resolving (`..;x`).
    let dotted = |s: &str| matches!(s.split(';').next(), Some("." | ".."));
    if !encoded {
        return dot && path.split('/').any(dotted);
    }
    // A dot segment needs a dot, literal or encoded: other escapes (%20, UTF-8) need no decoding.
    let encoded_dot = path
        .as_bytes()
        .windows(3)
        .any(|w| w[0] == b'%' && w[1] == b'2' && w[2] | 0x20 == b'e');
    if !dot && !encoded_dot {
        return false;
    }
    let decoded = path
        .to_ascii_lowercase()
        .replace("%2e", ".")
        .replace("%2f", "/")
        .replace("%5c", "/")
        .replace('\\', "/");
    decoded.split('/').any(dotted)
}

/// Host header value without port, for matching against an Api's `hosts` (already lowercase).
pub fn host_without_port(host: &str) -> &str {
    if host.starts_with('[') {
        // IPv6 literal: keep the brackets, drop a port after them.
        return host.split_inclusive(']').next().unwrap_or(host);
    }
    host.rsplit_once(':').map_or(host, |(h, _)| h)
}

/// The index of the Api serving this request: the longest matching pathPrefix among the Apis
/// whose `hosts` is empty or contains the request's host. `apis` is sorted longest prefix first.
pub fn match_api(apis: &[ApiConfig], host: Option<&str>, path: &str) -> Option<usize> {
    let host = host.map(host_without_port);
    apis.iter().position(|api| {
        prefix_matches(&api.path_prefix, path)
            && (api.hosts.is_empty()
                || host.is_some_and(|h| api.hosts.iter().any(|a| a.eq_ignore_ascii_case(h))))
    })
}

/// The path to request upstream: the upstream URL's own path, then the request path with the
/// prefix removed when `strip` is set. Always starts with '/'.
pub fn upstream_path(base_path: &str, prefix: &str, path: &str, strip: bool) -> String {
    let rest = if strip && prefix != "/" {
        &path[prefix.len().min(path.len())..]
    } else {
        path
    };
    let base = base_path.trim_end_matches('/');
    let mut out = String::with_capacity(base.len() + rest.len() + 1);
    out.push_str(base);
    if !rest.starts_with('/') {
        out.push('/');
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_segments_are_found_in_every_spelling() {
        for p in [
            "/public/../admin",
            "/public/./x",
            "/public/..",
            "/public/%2e%2e/admin",
            "/public/%2E./admin",
            "/public/..%2fadmin",
            "/public/..%5cadmin",
            "/public/..\\admin",
            "/..",
            "/public/..;/admin",
            "/public/%2e%2e;x/admin",
            "/public/.;",
        ] {
            assert!(has_dot_segment(p), "{p}");
        }
        for p in [
            "/",
            "/public/x",
            "/public/report.pdf",
            "/public/...",
            "/public/.well-known/x",
            "/public/a..b",
            "/public/%20x",
            "/public/%2ex",
            "/public/a;b",
            "/public/..x;y",
        ] {
            assert!(!has_dot_segment(p), "{p}");
        }
    }
    use gatehouse_crds::UpstreamConfig;

    fn api(prefix: &str, hosts: &[&str]) -> ApiConfig {
        ApiConfig {
            id: format!("ns{prefix}"),
            display_name: String::new(),
            path_prefix: prefix.into(),
            hosts: hosts.iter().map(|h| h.to_string()).collect(),
            upstream: UpstreamConfig {
                url: "http://u".into(),
                strip_prefix: true,
                timeout_seconds: 30,
            },
            grants: vec![],
            scopes: vec![],
            access_token_ttl_seconds: 1,
            refresh_token_ttl_seconds: 1,
        }
    }

    #[test]
    fn segment_boundaries() {
        assert!(prefix_matches("/mobile", "/mobile"));
        assert!(prefix_matches("/mobile", "/mobile/items"));
        assert!(!prefix_matches("/mobile", "/mobilex"));
        assert!(!prefix_matches("/mobile", "/"));
        assert!(prefix_matches("/", "/anything"));
    }

    #[test]
    fn longest_prefix_wins_and_hosts_filter() {
        let apis = vec![
            api("/mobile/v2", &[]),
            api("/mobile", &["api.example.com"]),
            api("/mobile", &[]),
            api("/", &[]),
        ];
        assert_eq!(match_api(&apis, None, "/mobile/v2/x"), Some(0));
        assert_eq!(
            match_api(&apis, Some("API.example.com:8443"), "/mobile/x"),
            Some(1)
        );
        assert_eq!(match_api(&apis, Some("other"), "/mobile/x"), Some(2));
        assert_eq!(match_api(&apis, None, "/other"), Some(3));
        assert_eq!(match_api(&apis[..3], None, "/other"), None);
    }

    #[test]
    fn host_ports() {
        assert_eq!(host_without_port("a.b:80"), "a.b");
        assert_eq!(host_without_port("a.b"), "a.b");
        assert_eq!(host_without_port("[::1]:8080"), "[::1]");
        assert_eq!(host_without_port("[::1]"), "[::1]");
    }

    #[test]
    fn upstream_paths() {
        assert_eq!(
            upstream_path("", "/mobile", "/mobile/items", true),
            "/items"
        );
        assert_eq!(upstream_path("", "/mobile", "/mobile", true), "/");
        assert_eq!(
            upstream_path("/v1/", "/mobile", "/mobile/items", true),
            "/v1/items"
        );
        assert_eq!(
            upstream_path("/v1", "/mobile", "/mobile/items", false),
            "/v1/mobile/items"
        );
        assert_eq!(upstream_path("", "/", "/x", true), "/x");
    }
}
