//! Which Api a request belongs to, and where it goes upstream. Pure functions.

use std::borrow::Cow;

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

/// Why a request path is refused before any check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PathRefusal {
    /// A `.` or `..` segment, in any spelling.
    DotSegment,
    /// A spelling a backend would resolve to another Api's path.
    OtherApi,
}

/// The path as backends commonly resolve it: `;parameters` cut from each segment (Tomcat,
/// Spring, Jetty), escapes of unreserved characters decoded (RFC 3986 6.2.2.2: WSGI, Go,
/// nginx), `%2F`, `%5C` and `\` read as separators, runs of `/` merged (nginx `merge_slashes`,
/// Go's path cleaning). Borrowed, with no work beyond one scan, for paths with none of these.
pub fn canonical(path: &str) -> Cow<'_, str> {
    let b = path.as_bytes();
    let mut plain = true;
    for (i, &c) in b.iter().enumerate() {
        if matches!(c, b'%' | b';' | b'\\') || (c == b'/' && b.get(i + 1) == Some(&b'/')) {
            plain = false;
            break;
        }
    }
    if plain {
        return Cow::Borrowed(path);
    }
    let hex = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut out: Vec<u8> = Vec::with_capacity(b.len());
    let mut in_params = false;
    let mut i = 0;
    while i < b.len() {
        let mut c = b[i];
        let mut escaped = None;
        if c == b'%'
            && let (Some(h), Some(l)) = (
                b.get(i + 1).copied().and_then(hex),
                b.get(i + 2).copied().and_then(hex),
            )
        {
            let d = h * 16 + l;
            // Only what backends decode before routing; other escapes stay as sent.
            if d.is_ascii_alphanumeric()
                || matches!(d, b'-' | b'.' | b'_' | b'~' | b'/' | b'\\' | b';')
            {
                c = d;
            } else {
                escaped = Some(&b[i..i + 3]);
            }
            i += 2;
        }
        i += 1;
        match (escaped, c) {
            (Some(verbatim), _) if !in_params => out.extend_from_slice(verbatim),
            (Some(_), _) => {}
            (None, b'/' | b'\\') => {
                in_params = false;
                if out.last() != Some(&b'/') {
                    out.push(b'/');
                }
            }
            (None, b';') => in_params = true,
            (None, _) if in_params => {}
            (None, _) => out.push(c),
        }
    }
    // Only ASCII bytes were replaced or removed, so the result is UTF-8 like the input.
    Cow::Owned(
        String::from_utf8(out)
            .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()),
    )
}

/// The index of the Api serving a request (None: no Api matches), or why its path is refused:
/// routing and plan checks use the path as sent and the backend gets it as sent, so a spelling
/// the backend resolves differently (`/shop//admin`, `/shop/%61dmin`, `/shop/admin;x`,
/// `/shop/Admin` on a case-insensitive server, `/public/../admin`) must not select a shorter
/// prefix's Api, and its token and plan, than the backend's reading would.
/// `upper_case_prefix`: some Api's prefix has an upper-case letter (then a lower-case path can
/// read as that Api's on a case-insensitive server too).
pub fn route(
    apis: &[ApiConfig],
    host: Option<&str>,
    path: &str,
    upper_case_prefix: bool,
) -> Result<Option<usize>, PathRefusal> {
    let canon = canonical(path);
    if canon.as_bytes().contains(&b'.') && canon.split('/').any(|s| s == "." || s == "..") {
        return Err(PathRefusal::DotSegment);
    }
    let chosen = match_api(apis, host, path);
    if let Cow::Owned(c) = &canon
        && match_api(apis, host, c) != chosen
    {
        return Err(PathRefusal::OtherApi);
    }
    // `canon`, not `path`: an escaped capital (`%41`) is one too once the backend decodes it.
    if (upper_case_prefix || canon.bytes().any(|c| c.is_ascii_uppercase()))
        && match_api_by(apis, host, &canon, prefix_matches_ignoring_case) != chosen
    {
        return Err(PathRefusal::OtherApi);
    }
    Ok(chosen)
}

fn prefix_matches_ignoring_case(prefix: &str, path: &str) -> bool {
    if prefix == "/" {
        return true;
    }
    match path.get(..prefix.len()) {
        Some(head) if head.eq_ignore_ascii_case(prefix) => {
            let rest = &path[prefix.len()..];
            rest.is_empty() || rest.starts_with('/')
        }
        _ => false,
    }
}

/// Is this a Host header value (RFC 9112 3.2, RFC 3986 3.2.2 host and port)? A name of
/// letters, digits, `-`, `.`, `_` and `~`, or a bracketed IPv6 literal, then optionally `:` and
/// 1-5 digits. Nothing else: a comma (`api.example.com:443,evil.example` routed by its first
/// part while a backend reading the last list item saw the second), user info, a path, a
/// space or a backslash would let a backend read another host than the gateway routed by.
/// A byte scan: it runs on every proxied request.
pub fn valid_host(h: &[u8]) -> bool {
    let (host, port) = match h.first() {
        Some(b'[') => match h.iter().position(|&b| b == b']') {
            Some(end) => {
                let literal = &h[1..end];
                if literal.is_empty()
                    || !literal
                        .iter()
                        .all(|&b| b.is_ascii_hexdigit() || b == b':' || b == b'.')
                {
                    return false;
                }
                (&h[..=end], &h[end + 1..])
            }
            None => return false,
        },
        _ => {
            let end = h.iter().position(|&b| b == b':').unwrap_or(h.len());
            let name = &h[..end];
            if name.is_empty()
                || !name
                    .iter()
                    .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~'))
            {
                return false;
            }
            (name, &h[end..])
        }
    };
    !host.is_empty()
        && match port {
            [] => true,
            [b':', digits @ ..] => {
                (1..=5).contains(&digits.len()) && digits.iter().all(u8::is_ascii_digit)
            }
            _ => false,
        }
}

/// Host header value without port, for matching against an Api's `hosts` (already lowercase).
/// A name's one trailing dot goes too: `api.example.com.` is the same absolute DNS name, and
/// nginx and Envoy route it as `api.example.com`.
pub fn host_without_port(host: &str) -> &str {
    if host.starts_with('[') {
        // IPv6 literal: keep the brackets, drop a port after them.
        return host.split_inclusive(']').next().unwrap_or(host);
    }
    let name = host.rsplit_once(':').map_or(host, |(h, _)| h);
    name.strip_suffix('.').unwrap_or(name)
}

/// The index of the Api serving this request: the longest matching pathPrefix among the Apis
/// whose `hosts` is empty or contains the request's host. `apis` is sorted longest prefix first.
pub fn match_api(apis: &[ApiConfig], host: Option<&str>, path: &str) -> Option<usize> {
    match_api_by(apis, host, path, prefix_matches)
}

fn match_api_by(
    apis: &[ApiConfig],
    host: Option<&str>,
    path: &str,
    matches: fn(&str, &str) -> bool,
) -> Option<usize> {
    let host = host.map(host_without_port);
    apis.iter().position(|api| {
        matches(&api.path_prefix, path)
            && (api.hosts.is_empty()
                || host.is_some_and(|h| api.hosts.iter().any(|a| a.eq_ignore_ascii_case(h))))
    })
}

/// The path and query to request upstream: the upstream URL's own path, then the request path
/// with the prefix removed when `strip` is set, then `?query`. Always starts with '/'. Sized
/// exactly: the URI takes the buffer over without copying it into a smaller one.
pub fn upstream_path(
    base_path: &str,
    prefix: &str,
    path: &str,
    strip: bool,
    query: Option<&str>,
) -> String {
    let rest = if strip && prefix != "/" {
        &path[prefix.len().min(path.len())..]
    } else {
        path
    };
    let base = base_path.trim_end_matches('/');
    let slash = !rest.starts_with('/');
    let len = base.len() + usize::from(slash) + rest.len() + query.map_or(0, |q| q.len() + 1);
    let mut out = String::with_capacity(len);
    out.push_str(base);
    if slash {
        out.push('/');
    }
    out.push_str(rest);
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    debug_assert_eq!(out.len(), len);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_paths_are_what_backends_resolve() {
        for (raw, want) in [
            ("/shop//admin/users", "/shop/admin/users"),
            ("/shop/%61dmin/users", "/shop/admin/users"),
            ("/shop/%61%64%6D%69%6E/users", "/shop/admin/users"),
            ("/shop/admin;x/users", "/shop/admin/users"),
            ("/shop/admin;jsessionid=1", "/shop/admin"),
            ("/shop/admin%2Fusers", "/shop/admin/users"),
            ("/shop/admin%5cusers", "/shop/admin/users"),
            ("/shop\\admin/users", "/shop/admin/users"),
            ("/shop/a%3Bb/x", "/shop/a/x"),
            ("/shop/a;b%20c/x", "/shop/a/x"),
            ("/public/%2e%2e/admin", "/public/../admin"),
            // Escapes of reserved or non-ASCII characters stay escaped; a stray % stays.
            ("/shop/a%20b/%C3%A9", "/shop/a%20b/%C3%A9"),
            ("/shop/100%", "/shop/100%"),
            ("/shop/%zz", "/shop/%zz"),
            ("/shop/caf\u{e9};v=1", "/shop/caf\u{e9}"),
        ] {
            assert_eq!(canonical(raw), want, "{raw}");
        }
        for p in [
            "/",
            "/shop/items",
            "/shop/items/",
            "/shop/report.v1.json",
            "/a/b/c",
        ] {
            assert!(matches!(canonical(p), Cow::Borrowed(_)), "{p}");
        }
    }

    #[test]
    fn dot_segments_are_refused_in_every_spelling() {
        let apis = [api("/public", &[]), api("/", &[])];
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
            assert_eq!(
                route(&apis, None, p, false),
                Err(PathRefusal::DotSegment),
                "{p}"
            );
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
            assert!(route(&apis, None, p, false).is_ok(), "{p}");
        }
    }

    #[test]
    fn spellings_that_reach_a_longer_prefix_are_refused() {
        let apis = [api("/shop/admin", &[]), api("/shop", &[]), api("/", &[])];
        for p in [
            "/shop//admin/users",
            "/shop/%61dmin/users",
            "/shop/%61%64%6d%69%6e/users",
            "/shop/admin;x/users",
            "/shop/admin%2Fusers",
            "/shop/Admin/users",
            "/SHOP/admin",
            "/%73hop/admin",
            "//shop/admin",
            "/shop/ADMIN%2Fx",
            "/shop/%41dmin/users",
            "/shop/%41%44MIN",
            "/%53hop/admin",
        ] {
            assert_eq!(
                route(&apis, None, p, false),
                Err(PathRefusal::OtherApi),
                "{p}"
            );
        }
        // Spellings that stay with the Api the path selects as sent are served as sent.
        for (p, want) in [
            ("/shop/admin/users", 0),
            ("/shop/admin//users", 0),
            ("/shop/items/a%20b", 1),
            ("/shop/items;v=2", 1),
            ("/shop/Items/ABC", 1),
            ("/shop/a%2Fb", 1),
            ("/other/%41", 2),
        ] {
            assert_eq!(route(&apis, None, p, false), Ok(Some(want)), "{p}");
        }
        assert_eq!(route(&apis[..2], None, "/nothing", false), Ok(None));
        // A prefix with capitals: a lower-case path reads as it on a case-insensitive server.
        let apis = [api("/Admin", &[]), api("/", &[])];
        assert_eq!(
            route(&apis, None, "/admin/x", true),
            Err(PathRefusal::OtherApi)
        );
        assert_eq!(route(&apis, None, "/Admin/x", true), Ok(Some(0)));
        assert_eq!(route(&apis, None, "/other", true), Ok(Some(1)));
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
        // The absolute form of the name routes like the name.
        assert_eq!(
            match_api(&apis, Some("api.example.com.:8443"), "/mobile/x"),
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
        assert_eq!(host_without_port("a.b."), "a.b");
        assert_eq!(host_without_port("a.b.:443"), "a.b");
        // Only one dot: `a.b..` is no DNS name and matches nothing.
        assert_eq!(host_without_port("a.b.."), "a.b.");
    }

    #[test]
    fn upstream_paths() {
        let cases = [
            (("", "/mobile", "/mobile/items", true, None), "/items"),
            (("", "/mobile", "/mobile", true, None), "/"),
            (
                ("/v1/", "/mobile", "/mobile/items", true, None),
                "/v1/items",
            ),
            (
                ("/v1", "/mobile", "/mobile/items", false, None),
                "/v1/mobile/items",
            ),
            (("", "/", "/x", true, None), "/x"),
            (("", "/mobile", "/mobile", true, Some("a=1")), "/?a=1"),
            (
                ("/v1", "/m", "/m/x", true, Some("q=%20&b")),
                "/v1/x?q=%20&b",
            ),
            (("", "/m", "/m/x", true, Some("")), "/x?"),
        ];
        for ((base, prefix, path, strip, query), want) in cases {
            let got = upstream_path(base, prefix, path, strip, query);
            assert_eq!(got, want);
            // Exactly sized (the Bytes conversion in the proxy copies otherwise).
            assert_eq!(got.capacity(), got.len(), "{want}");
        }
    }

    #[test]
    fn host_header_values() {
        for ok in [
            "api.example.com",
            "api.example.com:8443",
            "127.0.0.1:8080",
            "[::1]:8080",
            "[2001:db8::1]",
            "xn--bcher-kva.example",
            "gw.test",
        ] {
            assert!(valid_host(ok.as_bytes()), "{ok}");
        }
        for bad in [
            "",
            "a b",
            "user@api.example.com",
            "api.example.com/x",
            "api.example.com?x",
            "api.example.com#x",
            "api.example.com\\x",
            "a\"b",
            "a<b>",
            "api.example.com:443,evil.example",
            "api.example.com;x",
            "gw.test:abc",
            "gw.test:",
            "gw.test:123456",
            "gw.test:80:80",
            "[::1",
            "[]",
            "[::1]x",
            "[::1]:",
            "[fe80::1%25eth0]",
            "a%41.example",
        ] {
            assert!(!valid_host(bad.as_bytes()), "{bad}");
        }
    }
}
