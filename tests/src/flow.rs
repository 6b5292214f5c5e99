//! Helpers for end-to-end tests of the authorization code flow: a manifest set with public,
//! trusted, rate-limited and confidential clients, and plain string helpers to read the
//! gateway's login pages (hidden inputs, the flash message, the session cookie) without an HTML
//! parser. Everything here is std-only so both the HTTP tests and the browser test can use it.

/// Namespace of every resource in [`manifests`].
pub const NAMESPACE: &str = "pkce";

/// Public app, non-trusted subscription (consent page), plan `generous`.
pub const PHONE_APP: &str = "phone-app";
/// Its registered redirect URIs: custom scheme, private-use scheme, loopback (any port).
pub const PHONE_REDIRECTS: [&str; 3] = [
    "myapp://callback",
    "com.example.app:/cb",
    "http://127.0.0.1/callback",
];
/// Public app, trusted subscription (no consent page), plan `generous`. Registers
/// `myapp://callback` too, so a code of [`PHONE_APP`] differs only in its client.
pub const FIRST_PARTY_APP: &str = "first-party";
/// Public app, trusted subscription on plan `tight`: [`TIGHT_REQUESTS`] requests per minute.
pub const LIMITED_APP: &str = "limited-app";
pub const TIGHT_REQUESTS: u32 = 3;
/// Confidential app of the same Api (client_credentials, introspection).
pub const BACKEND_APP: &str = "backend";
pub const BACKEND_SECRET: &str = "pkce-backend-secret-0123456789abcdef";

/// Scope names and the descriptions the consent page shows for them.
pub const PROFILE: &str = "profile";
pub const PROFILE_TEXT: &str = "Read your profile";
pub const ORDERS: &str = "orders";
pub const ORDERS_TEXT: &str = "See your orders";

/// A password that passes the policy (12+ characters, zxcvbn score >= 3).
pub const PASSWORD: &str = "purple monkey dishwasher sunrise";
/// Another strong password, used as the wrong one.
pub const OTHER_PASSWORD: &str = "velvet harbor lantern quietly";

/// Api `mobile` under /mobile proxied to `upstream` (e.g. `http://127.0.0.1:1234`), with the
/// applications and subscriptions above. Access tokens live `access_ttl` seconds.
pub fn manifests(upstream: &str, access_ttl: u64) -> String {
    let ns = NAMESPACE;
    let [r1, r2, r3] = PHONE_REDIRECTS;
    format!(
        r#"apiVersion: gatehouse.dev/v1alpha1
kind: Plan
metadata: {{name: generous, namespace: {ns}}}
spec:
  rateLimits: [{{requests: 1000, per: second}}]
---
apiVersion: gatehouse.dev/v1alpha1
kind: Plan
metadata: {{name: tight, namespace: {ns}}}
spec:
  rateLimits: [{{requests: {TIGHT_REQUESTS}, per: minute}}]
---
apiVersion: gatehouse.dev/v1alpha1
kind: Api
metadata: {{name: mobile, namespace: {ns}}}
spec:
  displayName: Mobile API
  pathPrefix: /mobile
  upstream: {{url: "{upstream}"}}
  plans: [generous, tight]
  auth:
    grants: [authorization_code, refresh_token, client_credentials]
    scopes:
      - {{name: {PROFILE}, description: {PROFILE_TEXT}}}
      - {{name: {ORDERS}, description: {ORDERS_TEXT}}}
    accessTokenTtlSeconds: {access_ttl}
    refreshTokenTtlSeconds: 3600
---
apiVersion: gatehouse.dev/v1alpha1
kind: Application
metadata: {{name: {PHONE_APP}, namespace: {ns}}}
spec:
  displayName: Phone App
  clientType: public
  redirectUris: ["{r1}", "{r2}", "{r3}"]
---
apiVersion: gatehouse.dev/v1alpha1
kind: Subscription
metadata: {{name: phone-app-mobile, namespace: {ns}}}
spec:
  application: {PHONE_APP}
  api: mobile
  plan: generous
  trusted: false
  clientId: {PHONE_APP}
---
apiVersion: gatehouse.dev/v1alpha1
kind: Application
metadata: {{name: {FIRST_PARTY_APP}, namespace: {ns}}}
spec:
  displayName: First Party
  clientType: public
  redirectUris: ["myapp://callback"]
---
apiVersion: gatehouse.dev/v1alpha1
kind: Subscription
metadata: {{name: first-party-mobile, namespace: {ns}}}
spec:
  application: {FIRST_PARTY_APP}
  api: mobile
  plan: generous
  trusted: true
  clientId: {FIRST_PARTY_APP}
---
apiVersion: gatehouse.dev/v1alpha1
kind: Application
metadata: {{name: {LIMITED_APP}, namespace: {ns}}}
spec:
  displayName: Limited App
  clientType: public
  redirectUris: ["myapp://callback"]
---
apiVersion: gatehouse.dev/v1alpha1
kind: Subscription
metadata: {{name: limited-app-mobile, namespace: {ns}}}
spec:
  application: {LIMITED_APP}
  api: mobile
  plan: tight
  trusted: true
  clientId: {LIMITED_APP}
---
apiVersion: gatehouse.dev/v1alpha1
kind: Application
metadata: {{name: {BACKEND_APP}, namespace: {ns}}}
spec: {{clientType: confidential}}
---
apiVersion: v1
kind: Secret
metadata: {{name: backend-credentials, namespace: {ns}, labels: {{gatehouse.dev/client-secret: "true"}}}}
stringData: {{clientSecret: "{BACKEND_SECRET}"}}
---
apiVersion: gatehouse.dev/v1alpha1
kind: Subscription
metadata: {{name: backend-mobile, namespace: {ns}}}
spec:
  application: {BACKEND_APP}
  api: mobile
  plan: generous
  clientId: {BACKEND_APP}
  grants: [client_credentials]
  clientSecretRef: {{name: backend-credentials, key: clientSecret}}
"#
    )
}

/// Reverses the page's HTML escaping of text and attribute values.
pub fn unescape(s: &str) -> String {
    s.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&amp;", "&")
}

/// The value of the first `<input ... name="{name}" value="...">` in `html`.
pub fn input_value(html: &str, name: &str) -> Option<String> {
    let marker = format!("name=\"{name}\" value=\"");
    let start = html.find(&marker)? + marker.len();
    let len = html[start..].find('"')?;
    Some(unescape(&html[start..start + len]))
}

/// `html` with the values of the hidden `csrf` and `req` inputs blanked, so two renderings of
/// the same page for different sessions or requests can be compared byte for byte.
pub fn without_form_tokens(html: &str) -> String {
    let mut out = html.to_string();
    for name in ["csrf", "req"] {
        let marker = format!("name=\"{name}\" value=\"");
        let mut from = 0;
        while let Some(pos) = out[from..].find(&marker) {
            let start = from + pos + marker.len();
            let Some(len) = out[start..].find('"') else {
                break;
            };
            out.replace_range(start..start + len, "");
            from = start;
        }
    }
    // The request id also appears in the link to the other form (`/signup?req=...`).
    for link in ["/signup?req=", "/login?req="] {
        let mut from = 0;
        while let Some(pos) = out[from..].find(link) {
            let start = from + pos + link.len();
            let len = out[start..].find('"').unwrap_or(0);
            out.replace_range(start..start + len, "");
            from = start;
        }
    }
    out
}

/// The text of the page's alert (the one-time flash message), if it shows one.
pub fn alert(html: &str) -> Option<String> {
    let marker = "role=\"alert\">";
    let start = html.find(marker)? + marker.len();
    let len = html[start..].find("</p>")?;
    Some(unescape(&html[start..start + len]))
}

/// The value of cookie `name` in a `Set-Cookie` header value.
pub fn set_cookie_value<'a>(set_cookie: &'a str, name: &str) -> Option<&'a str> {
    let (pair, _) = set_cookie.split_once(';').unwrap_or((set_cookie, ""));
    let (k, v) = pair.trim().split_once('=')?;
    (k == name).then_some(v)
}

/// The session cookie from a response's `Set-Cookie` headers, ready for a `Cookie` header:
/// `gatehouse_session=<id>`, or `__Host-gatehouse_session=<id>` from an https issuer.
pub fn session_cookie(resp: &reqwest::Response) -> Option<String> {
    resp.headers()
        .get_all(reqwest::header::SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(|v| {
            ["gatehouse_session", "__Host-gatehouse_session"]
                .into_iter()
                .find_map(|name| set_cookie_value(v, name).map(|id| format!("{name}={id}")))
        })
}

/// The attributes of a `Set-Cookie` header value (`HttpOnly`, `SameSite=Lax`, ...), trimmed.
pub fn set_cookie_attributes(set_cookie: &str) -> Vec<&str> {
    set_cookie.split(';').skip(1).map(str::trim).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: &str = "<form>\n<input type=\"hidden\" name=\"csrf\" value=\"abc\">\n\
        <input type=\"hidden\" name=\"req\" value=\"r&amp;1\">\n<p class=\"alert\" \
        role=\"alert\">The email &amp; password</p><a href=\"/signup?req=r1\">x</a>";

    #[test]
    fn reads_inputs_alert_and_blanks_tokens() {
        assert_eq!(input_value(PAGE, "csrf").as_deref(), Some("abc"));
        assert_eq!(input_value(PAGE, "req").as_deref(), Some("r&1"));
        assert_eq!(input_value(PAGE, "email"), None);
        assert_eq!(alert(PAGE).as_deref(), Some("The email & password"));
        let blank = without_form_tokens(PAGE);
        assert!(blank.contains("name=\"csrf\" value=\"\""), "{blank}");
        assert!(blank.contains("name=\"req\" value=\"\""), "{blank}");
        assert!(blank.contains("href=\"/signup?req=\""), "{blank}");
    }

    #[test]
    fn cookies() {
        let c = "gatehouse_session=xyz; Path=/; HttpOnly; SameSite=Lax";
        assert_eq!(set_cookie_value(c, "gatehouse_session"), Some("xyz"));
        assert_eq!(set_cookie_value(c, "other"), None);
        assert_eq!(
            set_cookie_attributes(c),
            vec!["Path=/", "HttpOnly", "SameSite=Lax"]
        );
    }
}
