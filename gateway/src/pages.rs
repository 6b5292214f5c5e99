//! Server-rendered HTML pages of the authorization server: login, signup, consent and error
//! (DESIGN.md §4.1, §5).
//!
//! The pages use no JavaScript and load nothing from elsewhere: one small inline stylesheet,
//! system fonts, large inputs and buttons, and a viewport meta tag so they read well in a phone's
//! in-app browser tab. Every dynamic value goes through [`escape`]. [`respond`] adds the security
//! headers, including a Content-Security-Policy that allows exactly that stylesheet by its hash.

use std::sync::LazyLock;

use axum::body::Body;
use axum::response::Response;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use http::header::{
    CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE, REFERRER_POLICY, X_CONTENT_TYPE_OPTIONS,
    X_FRAME_OPTIONS,
};
use http::{HeaderValue, StatusCode};
use sha2::{Digest, Sha256};

/// The only stylesheet, inlined into every page. The CSP allows it by its SHA-256, so any change
/// here is picked up automatically; never add `style` attributes (the CSP would block them).
const STYLE: &str = "
:root{color-scheme:light dark;--fg:#1b1d21;--bg:#f3f4f6;--card:#fff;--muted:#5b6170;--line:#c9cdd5;--accent:#2457d6;--accent-fg:#fff;--err-bg:#fdecec;--err-fg:#8a1c1c}
@media (prefers-color-scheme:dark){:root{--fg:#e8eaed;--bg:#15171b;--card:#1f2228;--muted:#a3a9b6;--line:#434853;--accent:#6f9bff;--accent-fg:#0d1117;--err-bg:#3a1d1d;--err-fg:#ffb4b4}}
*{box-sizing:border-box}
body{margin:0;font:17px/1.5 system-ui,-apple-system,\"Segoe UI\",Roboto,\"Helvetica Neue\",Arial,sans-serif;color:var(--fg);background:var(--bg);-webkit-text-size-adjust:100%}
main{max-width:28rem;margin:0 auto;padding:1.5rem 1rem 3rem}
.card{background:var(--card);border-radius:12px;padding:1.5rem 1.25rem;box-shadow:0 1px 3px rgba(0,0,0,.12)}
h1{font-size:1.45rem;line-height:1.3;margin:0 0 1rem;overflow-wrap:anywhere}
p{margin:0 0 1rem;overflow-wrap:anywhere}
label{display:block;font-weight:600;margin:1rem 0 .35rem}
input[type=email],input[type=password],input[type=text]{display:block;width:100%;font:inherit;font-size:1.05rem;padding:.8rem .9rem;min-height:3rem;border:1px solid var(--line);border-radius:8px;background:var(--card);color:var(--fg)}
input:focus,button:focus,a:focus{outline:3px solid var(--accent);outline-offset:2px}
button{display:block;width:100%;font:inherit;font-weight:600;min-height:3rem;margin-top:1.25rem;padding:.8rem 1rem;border:1px solid var(--accent);border-radius:8px;background:var(--accent);color:var(--accent-fg);cursor:pointer}
button.secondary{background:transparent;color:var(--accent)}
.hint{color:var(--muted);font-size:.95rem;margin:.4rem 0 0}
.alert{background:var(--err-bg);color:var(--err-fg);border-radius:8px;padding:.75rem .9rem}
.muted{color:var(--muted)}
.alt{margin:1.25rem 0 0;text-align:center}
ul.scopes{margin:0 0 1rem;padding-left:1.25rem}
ul.scopes li{margin:.35rem 0}
a{color:var(--accent)}
";

/// `'sha256-…'` source expression of [`STYLE`], computed once.
static STYLE_HASH: LazyLock<String> = LazyLock::new(|| {
    format!(
        "'sha256-{}'",
        STANDARD.encode(Sha256::digest(STYLE.as_bytes()))
    )
});

/// The Content-Security-Policy of every page. No `form-action`: after a POST the server answers
/// 303 to the app's redirect URI (often a custom scheme), which `form-action` would block in
/// browsers that apply it to redirects.
static CSP: LazyLock<HeaderValue> = LazyLock::new(|| {
    let csp = format!(
        "default-src 'none'; style-src {}; img-src 'self' data:; frame-ancestors 'none'; \
         base-uri 'none'",
        *STYLE_HASH
    );
    HeaderValue::from_str(&csp).expect("CSP is a valid header value")
});

/// Hidden fields every form carries.
#[derive(Debug, Clone, Copy)]
pub struct Form<'a> {
    /// The CSRF token (hidden input `csrf`).
    pub csrf: &'a str,
    /// The pending authorization request id (hidden input `req`); may be empty.
    pub request_id: &'a str,
}

/// One requested scope on the consent page.
#[derive(Debug, Clone, Copy)]
pub struct ScopeView<'a> {
    pub name: &'a str,
    /// Shown to the user; the name is shown when this is empty.
    pub description: &'a str,
}

/// Escapes text for HTML element content and quoted attribute values.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + s.len() / 8);
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Wraps `body` (already escaped HTML) in the page skeleton; `title` is escaped here.
fn page(title: &str, body: &str) -> String {
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <meta name=\"robots\" content=\"noindex, nofollow\">\n\
         <title>{title}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n<main>\n\
         <div class=\"card\">\n{body}</div>\n</main>\n</body>\n</html>\n",
        title = escape(title),
    )
}

fn hidden_fields(form: &Form) -> String {
    format!(
        "<input type=\"hidden\" name=\"csrf\" value=\"{}\">\n\
         <input type=\"hidden\" name=\"req\" value=\"{}\">\n",
        escape(form.csrf),
        escape(form.request_id)
    )
}

fn alert(error: Option<&str>) -> String {
    match error {
        Some(message) if !message.is_empty() => {
            format!(
                "<p class=\"alert\" role=\"alert\">{}</p>\n",
                escape(message)
            )
        }
        _ => String::new(),
    }
}

/// The sign-in page: POST `/login` with `email`, `password`, `csrf`, `req`.
pub fn login(
    form: &Form,
    app_name: &str,
    email: &str,
    error: Option<&str>,
    signup_href: &str,
) -> String {
    let title = format!("Sign in to {app_name}");
    // Put the cursor where typing starts: the email, or the password when the email is known.
    let (email_focus, password_focus) = if email.is_empty() {
        (" autofocus", "")
    } else {
        ("", " autofocus")
    };
    let body = format!(
        "<h1>{h1}</h1>\n{alert}\
         <form method=\"post\" action=\"/login\">\n{hidden}\
         <label for=\"email\">Email</label>\n\
         <input id=\"email\" name=\"email\" type=\"email\" autocomplete=\"username\" \
         autocapitalize=\"none\" spellcheck=\"false\" required value=\"{email}\"{email_focus}>\n\
         <label for=\"password\">Password</label>\n\
         <input id=\"password\" name=\"password\" type=\"password\" \
         autocomplete=\"current-password\" required{password_focus}>\n\
         <button type=\"submit\">Sign in</button>\n\
         </form>\n\
         <p class=\"alt\">New here? <a href=\"{signup}\">Create an account</a></p>\n",
        h1 = escape(&title),
        alert = alert(error),
        hidden = hidden_fields(form),
        email = escape(email),
        signup = escape(signup_href),
    );
    page(&title, &body)
}

/// The account creation page: POST `/signup` with `email`, `password`, `csrf`, `req`.
pub fn signup(
    form: &Form,
    app_name: &str,
    email: &str,
    error: Option<&str>,
    min_len: usize,
    login_href: &str,
) -> String {
    let title = format!("Create an account for {app_name}");
    let (email_focus, password_focus) = if email.is_empty() {
        (" autofocus", "")
    } else {
        ("", " autofocus")
    };
    let body = format!(
        "<h1>{h1}</h1>\n{alert}\
         <form method=\"post\" action=\"/signup\">\n{hidden}\
         <label for=\"email\">Email</label>\n\
         <input id=\"email\" name=\"email\" type=\"email\" autocomplete=\"username\" \
         autocapitalize=\"none\" spellcheck=\"false\" required value=\"{email}\"{email_focus}>\n\
         <label for=\"password\">Password</label>\n\
         <input id=\"password\" name=\"password\" type=\"password\" \
         autocomplete=\"new-password\" minlength=\"{min_len}\" maxlength=\"{max_len}\" \
         aria-describedby=\"password-hint\" required{password_focus}>\n\
         <p id=\"password-hint\" class=\"hint\">At least {min_len} characters. Long passphrases \
         are best; no special characters required.</p>\n\
         <button type=\"submit\">Create account</button>\n\
         </form>\n\
         <p class=\"alt\">Already have an account? <a href=\"{login}\">Sign in</a></p>\n",
        h1 = escape(&title),
        alert = alert(error),
        hidden = hidden_fields(form),
        email = escape(email),
        max_len = crate::password::MAX_LENGTH,
        login = escape(login_href),
    );
    page(&title, &body)
}

/// The consent page: POST `/consent` with `decision=allow` or `decision=deny`, `csrf`, `req`.
pub fn consent(
    form: &Form,
    app_name: &str,
    api_name: &str,
    user_email: &str,
    scopes: &[ScopeView],
) -> String {
    let title = format!("{app_name} wants to access {api_name} on your behalf");
    let mut list = String::new();
    if !scopes.is_empty() {
        list.push_str("<p>It will be able to:</p>\n<ul class=\"scopes\">\n");
        for scope in scopes {
            let text = if scope.description.trim().is_empty() {
                scope.name
            } else {
                scope.description
            };
            list.push_str("<li>");
            list.push_str(&escape(text));
            list.push_str("</li>\n");
        }
        list.push_str("</ul>\n");
    }
    let body = format!(
        "<h1>{h1}</h1>\n\
         <p class=\"muted\">Signed in as {email}</p>\n{list}\
         <form method=\"post\" action=\"/consent\">\n{hidden}\
         <button type=\"submit\" name=\"decision\" value=\"allow\">Allow</button>\n\
         <button type=\"submit\" name=\"decision\" value=\"deny\" class=\"secondary\">Deny</button>\n\
         </form>\n",
        h1 = escape(&title),
        email = escape(user_email),
        hidden = hidden_fields(form),
    );
    page(&title, &body)
}

/// The sign-out page: POST `/logout` with `csrf` (a link alone must not sign anyone out).
pub fn logout(csrf: &str, user_email: &str) -> String {
    let body = format!(
        "<h1>Sign out</h1>\n\
         <p class=\"muted\">Signed in as {email}</p>\n\
         <form method=\"post\" action=\"/logout\">\n\
         <input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\n\
         <button type=\"submit\">Sign out</button>\n\
         </form>\n",
        email = escape(user_email),
        csrf = escape(csrf),
    );
    page("Sign out", &body)
}

/// A plain error page, e.g. for an unknown client or an unregistered redirect_uri (which must
/// never be redirected to).
pub fn error(title: &str, message: &str) -> String {
    let body = format!("<h1>{}</h1>\n<p>{}</p>\n", escape(title), escape(message));
    page(title, &body)
}

/// Wraps a page in a response with the HTML content type and the security headers: no framing,
/// a CSP that allows only the inline stylesheet, no referrer, no sniffing and no caching.
pub fn respond(status: StatusCode, html: String) -> Response {
    let mut response = Response::new(Body::from(html));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    headers.insert(X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(CONTENT_SECURITY_POLICY, CSP.clone());
    headers.insert(REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    headers.insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    const EVIL: &str = "<script>alert('x')</script>&\"";
    const FORM: Form<'static> = Form {
        csrf: "csrf-token-123",
        request_id: "req-456",
    };

    fn all_pages(app: &str) -> Vec<String> {
        let scopes = [
            ScopeView {
                name: "orders:read",
                description: "See your orders",
            },
            ScopeView {
                name: "orders:write",
                description: "",
            },
        ];
        vec![
            login(
                &FORM,
                app,
                "a@example.com",
                Some("Wrong email or password."),
                "/signup?req=1",
            ),
            signup(&FORM, app, "", None, 12, "/login?req=1"),
            consent(&FORM, app, "Orders API", "a@example.com", &scopes),
            error(app, "Something went wrong."),
        ]
    }

    /// Number of occurrences of `needle` in `hay`.
    fn count(hay: &str, needle: &str) -> usize {
        hay.matches(needle).count()
    }

    #[test]
    fn escape_covers_special_characters() {
        assert_eq!(
            escape(r#"<a href="x">Tom & Jerry's</a>"#),
            "&lt;a href=&quot;x&quot;&gt;Tom &amp; Jerry&#39;s&lt;/a&gt;"
        );
        assert_eq!(escape("plain ünïcode"), "plain ünïcode");
    }

    #[test]
    fn script_app_name_is_escaped_everywhere() {
        for html in all_pages(EVIL) {
            assert!(!html.contains("<script"), "{html}");
            assert!(!html.contains("alert('x')"), "{html}");
            assert!(html.contains("&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;&amp;&quot;"));
        }
        // Every other dynamic value too.
        let html = login(
            &Form {
                csrf: EVIL,
                request_id: EVIL,
            },
            "App",
            EVIL,
            Some(EVIL),
            EVIL,
        );
        assert!(!html.contains("<script"), "{html}");
        assert_eq!(count(&html, "&lt;script&gt;"), 5);
        let html = signup(
            &Form {
                csrf: EVIL,
                request_id: EVIL,
            },
            "App",
            EVIL,
            Some(EVIL),
            12,
            EVIL,
        );
        assert!(!html.contains("<script"), "{html}");
        assert_eq!(count(&html, "&lt;script&gt;"), 5);
        let scopes = [
            ScopeView {
                name: EVIL,
                description: "",
            },
            ScopeView {
                name: "x",
                description: EVIL,
            },
        ];
        let html = consent(
            &Form {
                csrf: EVIL,
                request_id: EVIL,
            },
            "App",
            EVIL,
            EVIL,
            &scopes,
        );
        assert!(!html.contains("<script"), "{html}");
        // title + h1 (api name), email, two scopes, two hidden fields.
        assert_eq!(count(&html, "&lt;script&gt;"), 7);
        let html = error(EVIL, EVIL);
        assert!(!html.contains("<script"), "{html}");
    }

    #[test]
    fn every_form_has_hidden_fields() {
        for html in all_pages("App") {
            let forms = count(&html, "<form ");
            assert_eq!(
                count(
                    &html,
                    r#"<input type="hidden" name="csrf" value="csrf-token-123">"#
                ),
                forms
            );
            assert_eq!(
                count(&html, r#"<input type="hidden" name="req" value="req-456">"#),
                forms
            );
        }
        // An empty request id still yields the field.
        let html = login(
            &Form {
                csrf: "t",
                request_id: "",
            },
            "App",
            "",
            None,
            "/signup",
        );
        assert!(html.contains(r#"<input type="hidden" name="req" value="">"#));
    }

    #[test]
    fn login_page_fields() {
        let html = login(
            &FORM,
            "Shop",
            "a@example.com",
            Some("Wrong email or password."),
            "/signup",
        );
        assert!(html.contains("<title>Sign in to Shop</title>"));
        assert!(html.contains(r#"<form method="post" action="/login">"#));
        assert!(html.contains(r#"name="email" type="email" autocomplete="username""#));
        assert!(html.contains(r#"value="a@example.com""#));
        assert!(
            html.contains(r#"name="password" type="password" autocomplete="current-password""#)
        );
        assert!(html.contains(r#"role="alert">Wrong email or password.</p>"#));
        assert!(html.contains(r#"<a href="/signup">Create an account</a>"#));
        assert!(html.contains(r#"<button type="submit">"#));
        assert!(!login(&FORM, "Shop", "", None, "/signup").contains("role=\"alert\""));
    }

    #[test]
    fn signup_page_fields() {
        let html = signup(
            &FORM,
            "Shop",
            "",
            Some("Use at least 15 characters."),
            15,
            "/login",
        );
        assert!(html.contains(r#"<form method="post" action="/signup">"#));
        assert!(html.contains(r#"autocomplete="new-password" minlength="15" maxlength="256""#));
        assert!(html.contains(
            "At least 15 characters. Long passphrases are best; no special characters required."
        ));
        assert!(html.contains(r#"role="alert">Use at least 15 characters.</p>"#));
        assert!(html.contains(r#"<a href="/login">"#));
    }

    #[test]
    fn consent_page_has_both_decisions() {
        let html = &all_pages("Shop")[2];
        assert!(html.contains(r#"<form method="post" action="/consent">"#));
        assert!(html.contains(r#"name="decision" value="allow""#));
        assert!(html.contains(r#"name="decision" value="deny""#));
        assert!(html.contains("Shop wants to access Orders API on your behalf"));
        assert!(html.contains("Signed in as a@example.com"));
        assert!(html.contains("<li>See your orders</li>"));
        // Falls back to the name when there is no description.
        assert!(html.contains("<li>orders:write</li>"));
        assert!(!html.contains("orders:read"));
    }

    #[test]
    fn pages_are_phone_friendly_and_self_contained() {
        for html in all_pages("App") {
            assert!(html.starts_with("<!DOCTYPE html>"));
            assert!(html.contains(
                r#"<meta name="viewport" content="width=device-width, initial-scale=1">"#
            ));
            assert_eq!(count(&html, "<style>"), 1);
            assert!(!html.contains("<script"));
            assert!(
                !html.contains(" style="),
                "inline style attributes are blocked by the CSP"
            );
            assert!(!html.contains("http://") && !html.contains("https://"));
            assert!(!html.contains("<link"));
        }
    }

    #[test]
    fn respond_sets_headers() {
        let response = respond(StatusCode::BAD_REQUEST, error("Oops", "Bad request."));
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
        let h = response.headers();
        assert_eq!(h[CONTENT_TYPE], "text/html; charset=utf-8");
        assert_eq!(h[X_FRAME_OPTIONS], "DENY");
        assert_eq!(h[REFERRER_POLICY], "no-referrer");
        assert_eq!(h[X_CONTENT_TYPE_OPTIONS], "nosniff");
        assert_eq!(h[CACHE_CONTROL], "no-store");
        let csp = h[CONTENT_SECURITY_POLICY].to_str().unwrap();
        assert!(
            csp.starts_with("default-src 'none'; style-src 'sha256-"),
            "{csp}"
        );
        assert!(csp.contains("img-src 'self' data:"));
        assert!(csp.contains("frame-ancestors 'none'"));
        assert!(csp.contains("base-uri 'none'"));
        assert!(!csp.contains("form-action"));
        assert!(!csp.contains("script-src"));
    }

    #[test]
    fn csp_style_hash_matches_the_page_stylesheet() {
        let html = signup(&FORM, "App", "", None, 12, "/login");
        let start = html.find("<style>").unwrap() + "<style>".len();
        let end = html.find("</style>").unwrap();
        let inline = &html[start..end];
        let expected = format!(
            "'sha256-{}'",
            STANDARD.encode(Sha256::digest(inline.as_bytes()))
        );

        let response = respond(StatusCode::OK, html.clone());
        let csp = response.headers()[CONTENT_SECURITY_POLICY]
            .to_str()
            .unwrap();
        let style_src = csp
            .split(';')
            .map(str::trim)
            .find_map(|directive| directive.strip_prefix("style-src "))
            .unwrap();
        assert_eq!(style_src, expected);
    }

    #[tokio::test]
    async fn respond_body_is_the_page() {
        use http_body_util::BodyExt as _;
        let html = error("Unknown application", "This sign-in link is not valid.");
        let response = respond(StatusCode::NOT_FOUND, html.clone());
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, html.as_bytes());
    }
}
