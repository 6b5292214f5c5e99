//! Redirect URI matching (RFC 8252, OAuth 2.1): exact string comparison, except that a loopback
//! IP literal with http may use any port (the app listens on an ephemeral one, RFC 8252 7.3).

use url::Url;

fn loopback_without_port(u: &Url) -> Option<Url> {
    let is_loopback_ip = matches!(u.host_str(), Some("127.0.0.1") | Some("[::1]"));
    if u.scheme() != "http" || !is_loopback_ip {
        return None;
    }
    let mut u = u.clone();
    u.set_port(None).ok()?;
    Some(u)
}

/// Is `requested` one of the `registered` redirect URIs?
pub fn matches(registered: &[String], requested: &str) -> bool {
    if registered.iter().any(|r| r == requested) {
        return true;
    }
    let Some(req) = Url::parse(requested)
        .ok()
        .and_then(|u| loopback_without_port(&u))
    else {
        return false;
    };
    // The requested URI, port removed, must equal a registered loopback URI with its port removed
    // and be otherwise identical (path, query) - no prefix or pattern matching.
    registered.iter().any(|r| {
        Url::parse(r)
            .ok()
            .and_then(|u| loopback_without_port(&u))
            .is_some_and(|u| u == req)
    })
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
