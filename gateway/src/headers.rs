//! Header rewriting between client and upstream. Pure functions over `HeaderMap`.

use base64::Engine as _;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};

pub const USER_ID: HeaderName = HeaderName::from_static("x-authenticated-userid");
pub const SCOPE: HeaderName = HeaderName::from_static("x-authenticated-scope");
pub const CLIENT_ID: HeaderName = HeaderName::from_static("x-client-id");
pub const APPLICATION_ID: HeaderName = HeaderName::from_static("x-application-id");
pub const API_PLAN: HeaderName = HeaderName::from_static("x-api-plan");
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub const FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub const FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub const FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
pub const RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("ratelimit-limit");
pub const RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("ratelimit-remaining");
pub const RATELIMIT_RESET: HeaderName = HeaderName::from_static("ratelimit-reset");

/// A decimal number as a header value. Below 10,000 (every rate-limit reset and most limits
/// and remainders) it is a slice of one static string: `HeaderValue::from(u64)` allocates, and
/// each proxied response carries three numbers.
pub fn number(n: u64) -> HeaderValue {
    // (offset, length) in `0123456789101112...`: 10 one-digit, 90 two-digit, 900 three-digit
    // numbers, then four digits each.
    let (start, len) = match n {
        0..10 => (n, 1),
        10..100 => (10 + 2 * (n - 10), 2),
        100..1_000 => (190 + 3 * (n - 100), 3),
        1_000..10_000 => (2_890 + 4 * (n - 1_000), 4),
        _ => return large_number(n),
    };
    static DIGITS: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let digits: &'static str =
        DIGITS.get_or_init(|| (0..10_000u32).map(|i| i.to_string()).collect());
    HeaderValue::from_static(&digits[start as usize..(start + len) as usize])
}

/// Digits written on the stack and copied once (`HeaderValue::from(u64)` allocates twice).
fn large_number(n: u64) -> HeaderValue {
    let mut buf = itoa::Buffer::new();
    HeaderValue::from_str(buf.format(n)).expect("digits are a valid header value")
}

/// Hop-by-hop headers (RFC 9110 7.6.1) never forwarded in either direction.
pub fn is_hop_by_hop(name: &str) -> bool {
    matches!(
        name,
        "connection"
            | "keep-alive"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            // Not standard, but sent by old clients; RFC 9110 7.6.1 asks intermediaries to drop it.
            | "proxy-connection"
    )
}

/// Is every Transfer-Encoding of the request the one coding the gateway undoes, chunked (or is
/// there none)? RFC 9112 6.1: others get 501. Pure.
pub fn transfer_coding_supported(headers: &HeaderMap) -> bool {
    let mut codings = headers
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(<[u8]>::trim_ascii);
    match codings.next() {
        None => true,
        Some(first) => first.eq_ignore_ascii_case(b"chunked") && codings.next().is_none(),
    }
}

/// Names a client may not set: the gateway's identity headers (any `X-Authenticated-*`).
fn is_identity(name: &str) -> bool {
    name.starts_with("x-authenticated-")
        || matches!(name, "x-client-id" | "x-application-id" | "x-api-plan")
}

/// Forwarding headers the gateway sets itself (X-Forwarded-Host) or does not maintain: a
/// client's copy would tell the upstream a host, port, prefix or address of its choosing.
/// X-Forwarded-For is not here: the gateway appends to it.
fn is_forwarding(name: &str) -> bool {
    matches!(
        name,
        "forwarded"
            | "x-forwarded-host"
            | "x-forwarded-port"
            | "x-forwarded-prefix"
            | "x-forwarded-server"
            | "x-forwarded-uri"
            | "x-real-ip"
            // Client address as other proxies and CDNs name it.
            | "true-client-ip"
            | "x-client-ip"
            | "client-ip"
            | "x-cluster-client-ip"
            | "cf-connecting-ip"
            | "fastly-client-ip"
            // Scheme as frameworks read it besides X-Forwarded-Proto (Rack reads X-Forwarded-Ssl
            // first): a client's `on` would make the upstream believe in https.
            | "x-forwarded-ssl"
            | "x-forwarded-scheme"
            | "x-forwarded-protocol"
            | "x-url-scheme"
            | "front-end-https"
            // Some frameworks and IIS route by these instead of the request line.
            | "x-original-url"
            | "x-original-uri"
            | "x-rewrite-url"
    )
}

/// Should a client's request header named `name` (lowercase) be dropped? Underscores count as
/// dashes: CGI-style servers read `X_Authenticated_UserId` as `X-Authenticated-UserId`.
fn client_may_not_send(name: &str) -> bool {
    let check = |n: &str| is_hop_by_hop(n) || is_identity(n) || is_forwarding(n);
    if name.contains('_') {
        // Also the ones the gateway sets: a second spelling would shadow or join its value.
        let dashed = name.replace('_', "-");
        check(&dashed)
            || matches!(
                dashed.as_str(),
                "x-forwarded-for" | "x-forwarded-proto" | "x-request-id" | "authorization"
            )
    } else {
        check(name) || name == "authorization"
    }
}

const MAX_CONNECTION_TOKENS: usize = 64;

/// Removes every header whose name `drop` selects, plus any the Connection header names.
/// One pass over the (few) names present instead of a hash lookup per name that might be.
fn remove_where(headers: &mut HeaderMap, mut drop: impl FnMut(&str) -> bool) {
    // Usually one or two names (Authorization, a hop-by-hop header): on the stack.
    let mut doomed: smallvec::SmallVec<[HeaderName; 4]> = smallvec::SmallVec::new();
    for name in headers.keys() {
        if drop(name.as_str()) {
            doomed.push(name.clone());
        }
    }
    let tokens = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        // A client names one to three; past 64 the rest are left alone (nginx honours none), so
        // a long header costs at most 64 lookups.
        .take(MAX_CONNECTION_TOKENS);
    for token in tokens {
        // Only names present, once each: a lookup each, not an allocation and a removal each.
        let token = token.trim();
        if !headers.contains_key(token)
            || doomed
                .iter()
                .any(|d| d.as_str().eq_ignore_ascii_case(token))
        {
            continue;
        }
        if let Ok(name) = HeaderName::from_bytes(token.as_bytes()) {
            doomed.push(name);
        }
    }
    for name in doomed {
        headers.remove(name);
    }
}

/// Turns an upstream response's headers into the client's. With Transfer-Encoding a
/// Content-Length is wrong by definition and an intermediary must drop it (RFC 9112 6.3; hyper
/// keeps both in the map). The upstream's RateLimit-* never pass for the gateway's (it sets its
/// own when the plan has limits), and it may not set the gateway's session cookie on the
/// gateway's origin (session fixation into the login pages).
pub fn rewrite_response(headers: &mut HeaderMap) {
    if headers.contains_key(header::TRANSFER_ENCODING) {
        headers.remove(header::CONTENT_LENGTH);
    }
    remove_where(headers, |name| {
        is_hop_by_hop(name) || name.starts_with("ratelimit")
    });
    let sets_session = |v: &HeaderValue| session::is_cookie_name(set_cookie_name(v.as_bytes()));
    if headers.get_all(header::SET_COOKIE).iter().any(sets_session) {
        let kept: Vec<HeaderValue> = headers
            .get_all(header::SET_COOKIE)
            .iter()
            .filter(|v| !sets_session(v))
            .cloned()
            .collect();
        headers.remove(header::SET_COOKIE);
        for v in kept {
            headers.append(header::SET_COOKIE, v);
        }
    }
}

/// The gateway's browser session cookie (either name): backends never see it nor set it.
use crate::oauth::session::{self, COOKIE as SESSION_COOKIE};

/// The name of a Set-Cookie value (`name=value; attributes`), trimmed.
fn cookie_name(v: &[u8]) -> Option<&[u8]> {
    let end = v.iter().position(|&b| b == b'=')?;
    Some(v[..end].trim_ascii())
}

/// The name a browser sends a Set-Cookie's cookie back under: its name, or for a nameless
/// cookie (`=a=b` or `a`, RFC 6265bis 5.6) its value, which a `Cookie` header then reads as
/// `a=b` or `a`.
fn set_cookie_name(v: &[u8]) -> &[u8] {
    let pair = v.split(|&b| b == b';').next().unwrap_or(v).trim_ascii();
    let (name, value) = match pair.iter().position(|&b| b == b'=') {
        Some(eq) => (pair[..eq].trim_ascii(), &pair[eq + 1..]),
        None => (&b""[..], pair),
    };
    if !name.is_empty() {
        return name;
    }
    cookie_name(value).unwrap_or(value).trim_ascii()
}

fn mentions_session(v: &[u8]) -> bool {
    v.windows(SESSION_COOKIE.len())
        .any(|w| w == SESSION_COOKIE.as_bytes())
}

/// A Cookie header without the gateway's session cookie; None when nothing else is left.
fn without_session_cookie(v: &HeaderValue) -> Option<HeaderValue> {
    let kept: Vec<&[u8]> = v
        .as_bytes()
        .split(|&b| b == b';')
        .filter(|pair| !cookie_name(pair).is_some_and(session::is_cookie_name))
        .map(<[u8]>::trim_ascii)
        .filter(|pair| !pair.is_empty())
        .collect();
    if kept.is_empty() {
        return None;
    }
    HeaderValue::from_bytes(&kept.join(&b"; "[..])).ok()
}

/// Who the caller is, as the upstream will be told. Values are prevalidated header values.
pub struct Identity<'a> {
    pub user_id: Option<HeaderValue>,
    pub scope: HeaderValue,
    pub client_id: &'a HeaderValue,
    pub application_id: &'a HeaderValue,
    pub plan: &'a HeaderValue,
}

/// How the request reached us.
pub struct Forwarded<'a> {
    /// The client's address, rendered once per connection.
    pub peer_ip: &'a HeaderValue,
    pub proto: &'static str,
    pub request_id: &'a HeaderValue,
    /// The Host the upstream gets (its own authority).
    pub upstream_host: &'a HeaderValue,
}

/// Turns the client's request headers into the upstream's: hop-by-hop headers, the bearer token
/// and every client-supplied identity header (any case, any `X-Authenticated-*`) removed, then
/// the gateway's identity and forwarding headers set.
pub fn rewrite_request(headers: &mut HeaderMap, id: &Identity<'_>, fwd: &Forwarded<'_>) {
    // The upstream gets its own Host; the client's is taken out (for X-Forwarded-Host) before
    // Connection can name it for removal. Replaced in place: one map operation, not two. If
    // Connection names Host, `upstream::send` gives the upstream its Host (tests/proxy.rs).
    let host = headers.insert(header::HOST, fwd.upstream_host.clone());
    // HeaderMap names are lowercase already, so this catches every spelling a client used.
    // The same pass notes X-Forwarded-For, so most requests skip hashing its name to look.
    let mut has_xff = false;
    remove_where(headers, |name| {
        has_xff |= name == "x-forwarded-for";
        client_may_not_send(name)
    });
    // The gateway's browser session is not the backend's to see (it would let a backend sign
    // in as the user at the gateway). Only requests that carry cookies pay for the scan.
    if headers
        .get_all(header::COOKIE)
        .iter()
        .any(|v| mentions_session(v.as_bytes()))
    {
        let rest: Vec<HeaderValue> = headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(without_session_cookie)
            .collect();
        headers.remove(header::COOKIE);
        for v in rest {
            headers.append(header::COOKIE, v);
        }
    }
    // Room for the nine headers below at once, instead of growing the map while inserting.
    headers.reserve(9);

    if let Some(user) = &id.user_id {
        headers.insert(USER_ID, user.clone());
    }
    headers.insert(SCOPE, id.scope.clone());
    headers.insert(CLIENT_ID, id.client_id.clone());
    headers.insert(APPLICATION_ID, id.application_id.clone());
    headers.insert(API_PLAN, id.plan.clone());

    // X-Forwarded-Host: the Host the client asked for.
    if let Some(host) = host {
        headers.insert(FORWARDED_HOST, host);
    }
    // Several X-Forwarded-For headers are one list (RFC 9110 5.3): all of them, then the peer.
    let mut prev: Vec<u8> = Vec::new();
    if has_xff {
        for v in headers.get_all(&FORWARDED_FOR) {
            if !v.is_empty() {
                prev.extend_from_slice(v.as_bytes());
                prev.extend_from_slice(b", ");
            }
        }
    }
    let xff = if prev.is_empty() {
        Some(fwd.peer_ip.clone())
    } else {
        prev.extend_from_slice(fwd.peer_ip.as_bytes());
        HeaderValue::from_bytes(&prev).ok()
    };
    if let Some(v) = xff {
        headers.insert(FORWARDED_FOR, v);
    }
    headers.insert(FORWARDED_PROTO, HeaderValue::from_static(fwd.proto));
    headers.insert(REQUEST_ID, fwd.request_id.clone());
}

/// The Sec-WebSocket-Key of a WebSocket handshake (RFC 6455 4.1: an HTTP/1.1 GET with
/// `Upgrade: websocket`, `Connection: upgrade`, any case, and one key of 16 bytes in base64),
/// or `None`. Other upgrades (h2c, TLS) are never passed on: such a request is forwarded as a
/// plain one without them. Pure.
pub fn websocket_handshake(
    method: &http::Method,
    version: http::Version,
    headers: &HeaderMap,
) -> Option<HeaderValue> {
    // Most requests have no Upgrade header: one lookup and out.
    let upgrade = headers.get(header::UPGRADE)?;
    if *method != http::Method::GET
        || version != http::Version::HTTP_11
        || !has_token(upgrade, "websocket")
        || !headers
            .get_all(header::CONNECTION)
            .iter()
            .any(|v| has_token(v, "upgrade"))
    {
        return None;
    }
    let mut keys = headers.get_all(header::SEC_WEBSOCKET_KEY).iter();
    let key = keys.next()?;
    let decoded = base64::engine::general_purpose::STANDARD.decode(key.as_bytes());
    (keys.next().is_none() && decoded.is_ok_and(|k| k.len() == 16)).then(|| key.clone())
}

/// The Sec-WebSocket-Accept that proves a server read the handshake with `key` (RFC 6455
/// 4.2.2). Pure.
pub fn websocket_accept(key: &[u8]) -> String {
    use sha1::Digest;
    const GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
    let mut sha = sha1::Sha1::new();
    sha.update(key);
    sha.update(GUID);
    base64::engine::general_purpose::STANDARD.encode(sha.finalize())
}

/// Did the upstream switch to WebSocket for the handshake with `key`: its 101 names the
/// protocol and proves it read the key? Without the proof, a 101 from something that goes on
/// speaking HTTP would give the client a channel past the gateway's header checks. Pure.
pub fn switched_to_websocket(headers: &HeaderMap, key: &HeaderValue) -> bool {
    headers
        .get(header::UPGRADE)
        .is_some_and(|v| has_token(v, "websocket"))
        && headers
            .get(header::SEC_WEBSOCKET_ACCEPT)
            .is_some_and(|v| v.as_bytes() == websocket_accept(key.as_bytes()).as_bytes())
}

/// Is `token` one of the comma-separated tokens of `value` (case-insensitive)?
fn has_token(value: &HeaderValue, token: &str) -> bool {
    value
        .to_str()
        .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
}

/// Puts back the two hop-by-hop headers a WebSocket handshake needs on this hop, after the
/// rewrite removed the client's (or the upstream's) copies.
pub fn set_websocket_upgrade(headers: &mut HeaderMap) {
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
}

/// A client-supplied request id is kept when it is short and plain, so traces join up;
/// otherwise the gateway makes one.
pub fn request_id(headers: &HeaderMap) -> HeaderValue {
    if let Some(v) = headers.get(&REQUEST_ID)
        && !v.is_empty()
        && v.len() <= 128
        && v.as_bytes().iter().all(|b| b.is_ascii_graphic())
    {
        return v.clone();
    }
    // A v4 UUID from the thread's CSPRNG: no getrandom syscall per request.
    let id = uuid::Builder::from_random_bytes(rand::random()).into_uuid();
    let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
    HeaderValue::from_str(id.hyphenated().encode_lower(&mut buf)).expect("uuid is a valid header")
}

/// The token from `Authorization: Bearer <token>` (scheme case-insensitive).
pub enum Bearer<'a> {
    Missing,
    Malformed,
    Token(&'a str),
}

pub fn bearer(headers: &HeaderMap) -> Bearer<'_> {
    let mut values = headers.get_all(header::AUTHORIZATION).iter();
    let (Some(value), None) = (values.next(), values.next()) else {
        return if headers.contains_key(header::AUTHORIZATION) {
            Bearer::Malformed
        } else {
            Bearer::Missing
        };
    };
    let Ok(value) = value.to_str() else {
        return Bearer::Malformed;
    };
    // Byte comparisons: `split_once` and `contains` set up a char searcher per request.
    match value.get(..7) {
        Some(scheme) if scheme.eq_ignore_ascii_case("bearer ") => {
            let token = value[7..].trim();
            if token.is_empty() || token.as_bytes().contains(&b' ') {
                Bearer::Malformed
            } else {
                Bearer::Token(token)
            }
        }
        _ => Bearer::Malformed,
    }
}

/// True when the query string carries an `access_token` parameter (RFC 6750 2.3), which the
/// gateway refuses: URLs end up in logs and Referer headers.
pub fn query_has_token(query: Option<&str>) -> bool {
    query.is_some_and(|q| {
        q.split('&')
            .any(|pair| pair.split('=').next() == Some("access_token"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hv(s: &str) -> HeaderValue {
        HeaderValue::from_str(s).unwrap()
    }

    #[test]
    fn numbers_are_their_decimal_form() {
        for n in [
            0,
            7,
            9,
            10,
            42,
            99,
            100,
            555,
            999,
            1_000,
            4_321,
            9_999,
            10_000,
            86_400,
            u64::MAX,
        ] {
            assert_eq!(number(n).to_str().unwrap(), n.to_string(), "{n}");
        }
        for n in 0..10_000 {
            assert_eq!(number(n), HeaderValue::from(n));
        }
    }

    #[test]
    fn rewrite_removes_spoofed_identity_and_sets_ours() {
        let mut h = HeaderMap::new();
        h.insert("X-Authenticated-UserId", hv("attacker"));
        h.append("x-authenticated-userid", hv("attacker2"));
        h.insert("X-AUTHENTICATED-SCOPE", hv("admin"));
        h.insert("x-authenticated-anything", hv("x"));
        h.insert("X-Client-Id", hv("evil"));
        h.insert("x-api-plan", hv("gold"));
        h.insert("x-application-id", hv("x/y"));
        h.insert(header::AUTHORIZATION, hv("Bearer secret-token"));
        h.insert(header::HOST, hv("api.example.com"));
        h.insert(header::CONNECTION, hv("keep-alive, x-drop-me"));
        h.insert("x-drop-me", hv("1"));
        h.insert("keep-alive", hv("timeout=5"));
        h.insert("x-forwarded-for", hv("10.0.0.1"));
        h.insert("accept", hv("application/json"));
        let (c, a, p, rid) = (hv("cid"), hv("demo/app"), hv("basic"), hv("req-1"));
        let id = Identity {
            user_id: Some(hv("uuid-1")),
            scope: hv("profile"),
            client_id: &c,
            application_id: &a,
            plan: &p,
        };
        let fwd = Forwarded {
            peer_ip: &hv("127.0.0.1"),
            proto: "http",
            request_id: &rid,
            upstream_host: &hv("backend:8080"),
        };
        rewrite_request(&mut h, &id, &fwd);

        assert_eq!(h.get_all("x-authenticated-userid").iter().count(), 1);
        assert_eq!(h["x-authenticated-userid"], "uuid-1");
        assert_eq!(h["x-authenticated-scope"], "profile");
        assert!(!h.contains_key("x-authenticated-anything"));
        assert_eq!(h["x-client-id"], "cid");
        assert_eq!(h["x-application-id"], "demo/app");
        assert_eq!(h["x-api-plan"], "basic");
        assert!(!h.contains_key(header::AUTHORIZATION));
        assert_eq!(h[header::HOST], "backend:8080");
        assert!(!h.contains_key(header::CONNECTION));
        assert!(!h.contains_key("x-drop-me"));
        assert!(!h.contains_key("keep-alive"));
        assert_eq!(h["x-forwarded-host"], "api.example.com");
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, 127.0.0.1");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-request-id"], "req-1");
        assert_eq!(h["accept"], "application/json");
    }

    /// `rewrite_request` for a client_credentials token (no user) from `peer`.
    fn rewrite_without_user(h: &mut HeaderMap, peer: &str) {
        let (c, a, p, rid) = (hv("cid"), hv("demo/app"), hv("basic"), hv("r"));
        let id = Identity {
            user_id: None,
            scope: hv(""),
            client_id: &c,
            application_id: &a,
            plan: &p,
        };
        let fwd = Forwarded {
            peer_ip: &hv(peer),
            proto: "http",
            request_id: &rid,
            upstream_host: &hv("backend:8080"),
        };
        rewrite_request(h, &id, &fwd);
    }

    #[test]
    fn websocket_handshakes_are_recognized_and_nothing_else() {
        use http::{Method, Version};
        const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
        let with = |pairs: &[(&str, &str)]| {
            let mut h = HeaderMap::new();
            for (k, v) in pairs {
                h.append(HeaderName::from_bytes(k.as_bytes()).unwrap(), hv(v));
            }
            h
        };
        let get = |h: &HeaderMap| websocket_handshake(&Method::GET, Version::HTTP_11, h);
        let key = ("sec-websocket-key", KEY);
        let ws = with(&[("upgrade", "websocket"), ("connection", "Upgrade"), key]);
        assert_eq!(get(&ws), Some(hv(KEY)));
        // Browsers send `keep-alive, Upgrade`; case does not matter.
        let firefox = with(&[
            ("upgrade", "WebSocket"),
            ("connection", "keep-alive, Upgrade"),
            key,
        ]);
        assert!(get(&firefox).is_some());
        let split = with(&[
            ("upgrade", "websocket"),
            ("connection", "keep-alive"),
            ("connection", "upgrade"),
            key,
        ]);
        assert!(get(&split).is_some());
        assert!(websocket_handshake(&Method::POST, Version::HTTP_11, &ws).is_none());
        assert!(websocket_handshake(&Method::GET, Version::HTTP_10, &ws).is_none());
        let refused = [
            vec![("upgrade", "websocket"), key],
            vec![
                ("upgrade", "h2c"),
                ("connection", "Upgrade, HTTP2-Settings"),
                key,
            ],
            vec![("upgrade", "websocketx"), ("connection", "upgrade"), key],
            // The key: missing, not base64, not 16 bytes, twice.
            vec![("upgrade", "websocket"), ("connection", "upgrade")],
            vec![
                ("upgrade", "websocket"),
                ("connection", "upgrade"),
                ("sec-websocket-key", "not base64!"),
            ],
            vec![
                ("upgrade", "websocket"),
                ("connection", "upgrade"),
                ("sec-websocket-key", "dGhlIHNhbXBsZQ=="),
            ],
            vec![
                ("upgrade", "websocket"),
                ("connection", "upgrade"),
                key,
                key,
            ],
            vec![],
        ];
        for pairs in refused {
            assert!(get(&with(&pairs)).is_none(), "{pairs:?}");
        }

        // RFC 6455 1.3's example.
        assert_eq!(
            websocket_accept(KEY.as_bytes()),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
        let accept = ("sec-websocket-accept", "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
        assert!(switched_to_websocket(
            &with(&[("upgrade", "websocket"), accept]),
            &hv(KEY)
        ));
        assert!(!switched_to_websocket(
            &with(&[("upgrade", "h2c"), accept]),
            &hv(KEY)
        ));
        assert!(!switched_to_websocket(
            &with(&[("upgrade", "websocket")]),
            &hv(KEY)
        ));
        let other_key = hv("AAAAAAAAAAAAAAAAAAAAAA==");
        assert!(!switched_to_websocket(
            &with(&[("upgrade", "websocket"), accept]),
            &other_key
        ));

        // The rewrite drops the handshake's hop-by-hop headers; they are put back for this hop.
        let mut h = ws.clone();
        remove_where(&mut h, is_hop_by_hop);
        assert_eq!(h.len(), 1, "only the key is left");
        set_websocket_upgrade(&mut h);
        assert!(get(&h).is_some());
    }

    #[test]
    fn every_hop_by_hop_header_is_dropped_both_ways() {
        let names = [
            "connection",
            "keep-alive",
            "proxy-authenticate",
            "proxy-authorization",
            "te",
            "trailer",
            "transfer-encoding",
            "upgrade",
            "proxy-connection",
        ];
        let mut h = HeaderMap::new();
        for n in names {
            h.insert(HeaderName::from_static(n), hv("x"));
        }
        h.append(header::CONNECTION, hv("X-Other , close"));
        h.insert("x-other", hv("1"));
        h.insert("content-type", hv("text/plain"));
        let mut req = h.clone();
        rewrite_response(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert_eq!(h["content-type"], "text/plain");

        rewrite_without_user(&mut req, "10.0.0.2");
        for n in names.iter().chain(&["x-other"]) {
            assert!(!req.contains_key(*n), "{n} forwarded");
        }
        assert_eq!(req["content-type"], "text/plain");
    }

    #[test]
    fn a_long_connection_header_removes_the_headers_its_first_64_tokens_name() {
        let mut tokens = vec!["a"; 59];
        tokens.extend([
            "X-Other",
            "x-other",
            "X-OTHER",
            "not a name",
            "content-type",
        ]);
        // Past the 64th token nothing more is removed.
        tokens.extend(["x-kept"; 1000]);
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, hv(&tokens.join(",")));
        h.insert("x-other", hv("1"));
        h.insert("content-type", hv("text/plain"));
        h.insert("x-kept", hv("1"));
        let mut req = h.clone();
        rewrite_response(&mut h);
        assert_eq!(h.keys().map(|k| k.as_str()).collect::<Vec<_>>(), ["x-kept"]);
        rewrite_without_user(&mut req, "10.0.0.2");
        assert!(req.contains_key("x-kept"));
        assert!(!req.contains_key("x-other") && !req.contains_key("content-type"));
    }

    #[test]
    fn clients_cannot_set_forwarding_or_underscored_identity_headers() {
        let mut h = HeaderMap::new();
        for n in [
            "forwarded",
            "x-forwarded-host",
            "x-forwarded-port",
            "x-forwarded-prefix",
            "x-real-ip",
            "x-original-url",
            "x-original-uri",
            "x-rewrite-url",
            "x-forwarded-uri",
            "true-client-ip",
            "x-client-ip",
            "client-ip",
            "x-cluster-client-ip",
            "cf-connecting-ip",
            "fastly-client-ip",
            "x-forwarded-ssl",
            "x-forwarded-scheme",
            "x-forwarded-protocol",
            "x-url-scheme",
            "front-end-https",
            "x_forwarded_ssl",
            "x_authenticated_userid",
            "x_client_id",
            "x_forwarded_host",
            "x_api-plan",
            "x_forwarded_proto",
            "x_forwarded_for",
            "x_request_id",
        ] {
            h.insert(HeaderName::from_bytes(n.as_bytes()).unwrap(), hv("spoof"));
        }
        h.insert("my_header", hv("kept"));
        h.insert(header::HOST, hv("api.example"));
        // Connection naming Host must not hide the real Host from X-Forwarded-Host.
        h.insert(header::CONNECTION, hv("host"));
        rewrite_without_user(&mut h, "10.0.0.3");
        assert_eq!(h["x-forwarded-host"], "api.example");
        assert_eq!(h["my_header"], "kept");
        // Connection named Host: gone here, set again by `upstream::send` (tests/proxy.rs).
        assert!(!h.contains_key(header::HOST));
        for (name, value) in &h {
            assert_ne!(value, "spoof", "{name} forwarded");
        }
        // Without a Host header there is no X-Forwarded-Host at all, not the client's.
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-host", hv("evil.example"));
        rewrite_without_user(&mut h, "10.0.0.3");
        assert!(!h.contains_key("x-forwarded-host"));
        assert_eq!(h[header::HOST], "backend:8080");
    }

    #[test]
    fn every_forwarded_for_header_is_kept_in_order_before_the_peer() {
        let mut h = HeaderMap::new();
        h.append("x-forwarded-for", hv("10.0.0.1"));
        h.append("x-forwarded-for", hv(""));
        h.append("x-forwarded-for", hv("10.0.0.2, 10.0.0.3"));
        rewrite_without_user(&mut h, "10.0.0.9");
        assert_eq!(h.get_all("x-forwarded-for").iter().count(), 1);
        assert_eq!(
            h["x-forwarded-for"],
            "10.0.0.1, 10.0.0.2, 10.0.0.3, 10.0.0.9"
        );
        // Only empty ones: the peer alone.
        let mut h = HeaderMap::new();
        h.append("x-forwarded-for", hv(""));
        rewrite_without_user(&mut h, "10.0.0.9");
        assert_eq!(h["x-forwarded-for"], "10.0.0.9");
    }

    #[test]
    fn upstream_responses_lose_conflicting_length_rate_limits_and_the_session_cookie() {
        let mut h = HeaderMap::new();
        h.insert(header::TRANSFER_ENCODING, hv("chunked"));
        h.insert(header::CONTENT_LENGTH, hv("5"));
        h.insert("ratelimit-limit", hv("999"));
        h.insert("ratelimit-remaining", hv("999"));
        h.insert("ratelimit-reset", hv("0"));
        h.insert("ratelimit-policy", hv("999;w=1"));
        h.append(header::SET_COOKIE, hv("app=1; Path=/"));
        h.append(
            header::SET_COOKIE,
            hv(" gatehouse_session=fixed; Path=/; HttpOnly"),
        );
        h.append(header::SET_COOKIE, hv("gatehouse_session_x=2"));
        // Nameless cookies come back as `gatehouse_session=fixed` / `gatehouse_session`.
        h.append(header::SET_COOKIE, hv("=gatehouse_session=fixed; Path=/"));
        h.append(header::SET_COOKIE, hv(" = gatehouse_session =fixed"));
        h.append(header::SET_COOKIE, hv("gatehouse_session"));
        h.append(header::SET_COOKIE, hv("=other=1"));
        h.append(
            header::SET_COOKIE,
            hv("__Host-gatehouse_session=x; Path=/; Secure"),
        );
        h.append(
            header::SET_COOKIE,
            hv("gatehouse_session_device=planted; Path=/"),
        );
        rewrite_response(&mut h);
        assert!(!h.contains_key(header::CONTENT_LENGTH), "{h:?}");
        assert!(!h.contains_key(header::TRANSFER_ENCODING));
        assert!(
            h.keys().all(|n| !n.as_str().starts_with("ratelimit")),
            "{h:?}"
        );
        let cookies: Vec<_> = h.get_all(header::SET_COOKIE).iter().collect();
        assert_eq!(
            cookies,
            [
                hv("app=1; Path=/"),
                hv("gatehouse_session_x=2"),
                hv("=other=1")
            ]
        );
        // A plain response keeps its length.
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_LENGTH, hv("5"));
        rewrite_response(&mut h);
        assert_eq!(h[header::CONTENT_LENGTH], "5");
    }

    #[test]
    fn the_session_cookie_is_not_forwarded() {
        for (sent, forwarded) in [
            ("a=1; gatehouse_session=s3cr3t; b=2", Some("a=1; b=2")),
            ("gatehouse_session=s3cr3t", None),
            ("gatehouse_session=s3cr3t;a=1", Some("a=1")),
            ("__Host-gatehouse_session=s3cr3t; a=1", Some("a=1")),
            // The device cookie neither.
            ("a=1; gatehouse_session_device=d3v1c3", Some("a=1")),
            (
                "__Host-gatehouse_session_device=d3v1c3; __Host-gatehouse_session=s",
                None,
            ),
            (
                "a=1; my_gatehouse_session=x",
                Some("a=1; my_gatehouse_session=x"),
            ),
            ("a=1", Some("a=1")),
        ] {
            let mut h = HeaderMap::new();
            h.insert(header::COOKIE, hv(sent));
            rewrite_without_user(&mut h, "10.0.0.4");
            assert_eq!(
                h.get(header::COOKIE).map(|v| v.to_str().unwrap()),
                forwarded,
                "{sent}"
            );
        }
    }

    #[test]
    fn client_credentials_tokens_carry_no_user() {
        let mut h = HeaderMap::new();
        h.insert("x-authenticated-userid", hv("spoof"));
        rewrite_without_user(&mut h, "::1");
        assert!(!h.contains_key("x-authenticated-userid"));
        assert_eq!(h["x-forwarded-for"], "::1");
    }

    #[test]
    fn bearer_parsing() {
        let mut h = HeaderMap::new();
        assert!(matches!(bearer(&h), Bearer::Missing));
        h.insert(header::AUTHORIZATION, hv("bearer abc"));
        assert!(matches!(bearer(&h), Bearer::Token("abc")));
        h.insert(header::AUTHORIZATION, hv("Basic abc"));
        assert!(matches!(bearer(&h), Bearer::Malformed));
        h.insert(header::AUTHORIZATION, hv("Bearer "));
        assert!(matches!(bearer(&h), Bearer::Malformed));
        h.insert(header::AUTHORIZATION, hv("Bearer"));
        assert!(matches!(bearer(&h), Bearer::Malformed));
        h.insert(header::AUTHORIZATION, hv("Bearer a b"));
        assert!(matches!(bearer(&h), Bearer::Malformed));
        h.insert(header::AUTHORIZATION, hv("Bearerx abc"));
        assert!(matches!(bearer(&h), Bearer::Malformed));
        h.insert(header::AUTHORIZATION, hv("BEARER  xyz "));
        assert!(matches!(bearer(&h), Bearer::Token("xyz")));
        h.insert(header::AUTHORIZATION, hv("Bearer a"));
        h.append(header::AUTHORIZATION, hv("Bearer b"));
        assert!(matches!(bearer(&h), Bearer::Malformed));
    }

    #[test]
    fn request_ids() {
        let mut h = HeaderMap::new();
        assert_eq!(request_id(&h).len(), 36);
        h.insert("x-request-id", hv("abc-123"));
        assert_eq!(request_id(&h), "abc-123");
        h.insert("x-request-id", hv(&"x".repeat(200)));
        assert_eq!(request_id(&h).len(), 36);
    }

    #[test]
    fn query_tokens() {
        assert!(query_has_token(Some("a=1&access_token=x")));
        assert!(query_has_token(Some("access_token")));
        assert!(!query_has_token(Some("my_access_token=1")));
        assert!(!query_has_token(None));
    }

    #[test]
    fn only_chunked_is_a_supported_transfer_coding() {
        let with = |values: &[&str]| {
            let mut h = HeaderMap::new();
            for v in values {
                h.append(header::TRANSFER_ENCODING, hv(v));
            }
            transfer_coding_supported(&h)
        };
        assert!(with(&[]));
        assert!(with(&["chunked"]));
        assert!(with(&["Chunked "]));
        assert!(!with(&["gzip, chunked"]));
        assert!(!with(&["gzip", "chunked"]));
        assert!(!with(&["chunked, chunked"]));
        assert!(!with(&["identity"]));
    }
}
