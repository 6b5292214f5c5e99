//! Redirect URI matching (RFC 8252, OAuth 2.1): exact string comparison, except that a loopback
//! IP literal with http may use any port (the app listens on an ephemeral one, RFC 8252 7.3).

use url::Url;

/// A loopback redirect URI split around its port: (scheme and IP literal, the rest), the port
/// itself (digits, at most 65535) dropped. Textual, like the exact match: a URL parser would
/// resolve dot segments, drop tabs and rewrite hosts such as `127.1`, so that spellings nobody
/// registered would match (RFC 9700 2.1 asks for exact comparison; only the port may vary).
fn loopback_parts(uri: &str) -> Option<(&'static str, &str)> {
    let (ip, after) = ["http://127.0.0.1", "http://[::1]"]
        .into_iter()
        .find_map(|ip| uri.strip_prefix(ip).map(|after| (ip, after)))?;
    let rest = match after.strip_prefix(':') {
        Some(port) => {
            // 1-5 digits: `parse` alone would take any number of leading zeros.
            let digits = port.bytes().take_while(u8::is_ascii_digit).count();
            if digits > 5 {
                return None;
            }
            port[..digits].parse::<u16>().ok()?;
            &port[digits..]
        }
        None => after,
    };
    // The authority ends here; anything else (`127.0.0.1.example.com`) is another host.
    matches!(rest.bytes().next(), None | Some(b'/' | b'?' | b'#')).then_some((ip, rest))
}

/// Is `requested` one of the `registered` redirect URIs?
pub fn matches(registered: &[String], requested: &str) -> bool {
    if registered.iter().any(|r| r == requested) {
        return true;
    }
    // The requested URI, port removed, must equal a registered loopback URI with its port
    // removed, character for character: no prefix, pattern or normalization.
    let Some(req) = loopback_parts(requested) else {
        return false;
    };
    registered
        .iter()
        .any(|r| loopback_parts(r).is_some_and(|reg| reg == req))
}

/// `redirect_uri` with the response parameters appended to its query.
pub fn with_params(redirect_uri: &str, params: &[(&str, &str)]) -> String {
    match Url::parse(redirect_uri) {
        Ok(mut u) => {
            {
                let mut q = u.query_pairs_mut();
                for (k, v) in params {
                    q.append_pair(k, v);
                }
            }
            u.to_string()
        }
        // Registered URIs are validated at compile time; keep a safe fallback anyway.
        Err(_) => {
            let sep = if redirect_uri.contains('?') { '&' } else { '?' };
            let q: String = url::form_urlencoded::Serializer::new(String::new())
                .extend_pairs(params)
                .finish();
            format!("{redirect_uri}{sep}{q}")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg() -> Vec<String> {
        [
            "com.example.demo:/oauth2redirect",
            "myapp://callback",
            "http://127.0.0.1/callback",
            "http://[::1]:1234/cb",
            "https://app.example.com/cb",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    #[test]
    fn exact_matches() {
        for ok in [
            "com.example.demo:/oauth2redirect",
            "myapp://callback",
            "https://app.example.com/cb",
        ] {
            assert!(matches(&reg(), ok), "{ok}");
        }
        for bad in [
            "myapp://callback/",
            "myapp://callbacK",
            "myapp://callback?x=1",
            "myapp://callback#f",
            "MYAPP://callback",
            "https://app.example.com/cb/../evil",
            "https://app.example.com/cb2",
            "https://app.example.com:443/cb",
            "com.example.demo:/oauth2redirect/x",
        ] {
            assert!(!matches(&reg(), bad), "{bad}");
        }
    }

    #[test]
    fn loopback_any_port() {
        assert!(matches(&reg(), "http://127.0.0.1:51234/callback"));
        assert!(matches(&reg(), "http://127.0.0.1/callback"));
        assert!(matches(&reg(), "http://[::1]:9/cb"));
        assert!(!matches(&reg(), "http://127.0.0.1:51234/other"));
        assert!(!matches(&reg(), "http://127.0.0.1:51234/callback?x"));
        assert!(!matches(&reg(), "https://127.0.0.1:51234/callback"));
        assert!(!matches(&reg(), "http://localhost:51234/callback"));
        assert!(!matches(&reg(), "http://127.0.0.2:51234/callback"));
        assert!(matches(&reg(), "http://127.0.0.1:65535/callback"));
        assert!(matches(&reg(), "http://[::1]/cb"));
    }

    #[test]
    fn loopback_spellings_a_parser_would_normalize_do_not_match() {
        for bad in [
            "http://127.0.0.1:5/./callback",
            "http://127.0.0.1:5/x/../callback",
            "http://127.0.0.1:5/%2e/callback",
            "http://127.0.0.1:5/call\tback",
            "http://127.0.0.1:5/call\nback",
            "http://127.0.0.1:5\\callback",
            "http://127.1:5/callback",
            "http://0x7f.1:5/callback",
            "HTTP://127.0.0.1:5/callback",
            "http://127.0.0.1:/callback",
            "http://127.0.0.1:65536/callback",
            "http://127.0.0.1:+5/callback",
            "http://127.0.0.1:000005/callback",
            "http://127.0.0.1.example.com/callback",
            "http://127.0.0.1:5.example.com/callback",
            "http://127.0.0.1:5@evil.example/callback",
            "http://[::1]:5/cb/",
            "http://[0:0:0:0:0:0:0:1]:5/cb",
        ] {
            assert!(!matches(&reg(), bad), "{bad:?}");
        }
    }

    #[test]
    fn params_are_appended() {
        assert_eq!(
            with_params("myapp://callback", &[("code", "a b"), ("state", "s&t")]),
            "myapp://callback?code=a+b&state=s%26t"
        );
        assert_eq!(
            with_params("com.example.demo:/oauth2redirect", &[("code", "x")]),
            "com.example.demo:/oauth2redirect?code=x"
        );
        assert_eq!(
            with_params("https://a.example/cb?keep=1", &[("code", "x")]),
            "https://a.example/cb?keep=1&code=x"
        );
    }
}
