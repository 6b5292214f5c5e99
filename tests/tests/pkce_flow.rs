//! The authorization code flow with PKCE against the real `gatehouse-gateway` binary: a mobile
//! app (the `oauth2` crate as its OAuth client) sends its user through the gateway's login,
//! signup and consent pages (driven with reqwest, cookies by hand, no redirects followed), gets
//! a code on its redirect URI, exchanges it and calls the API as that user. Every refusal of
//! DESIGN.md 4.1 and 5 is checked with its exact status and error code.
//!
//! Each test starts its own gateway (own data dir, own throttling counters) and echo upstream.

use std::collections::HashMap;
use std::time::Duration;

use gatehouse_tests::flow::{
    self, BACKEND_APP, BACKEND_SECRET, FIRST_PARTY_APP, LIMITED_APP, ORDERS, ORDERS_TEXT,
    OTHER_PASSWORD, PASSWORD, PHONE_APP, PROFILE, PROFILE_TEXT, TIGHT_REQUESTS,
};
use gatehouse_tests::procs::Gateway;
use oauth2::basic::{BasicClient, BasicErrorResponse, BasicErrorResponseType, BasicTokenResponse};
use oauth2::{
    AuthUrl, AuthorizationCode, ClientId, CsrfToken, EndpointNotSet, EndpointSet, HttpClientError,
    PkceCodeChallenge, PkceCodeVerifier, RedirectUrl, RefreshToken, RequestTokenError, Scope,
    TokenResponse, TokenUrl,
};
use reqwest::StatusCode;
use reqwest::header::{self, HeaderMap};
use serde_json::{Value, json};

/// The session cookie's name: `__Host-` prefixed when the issuer is https.
const SESSION_COOKIE: &str = "gatehouse_session";
const SECURE_SESSION_COOKIE: &str = "__Host-gatehouse_session";
const BAD_CREDENTIALS: &str = "The email or password is not correct.";
const THROTTLED: &str = "Too many failed attempts";
const ACCESS_TTL: u64 = 300;

// ------------------------------------------------------------------------------ environment

/// One gateway with the manifests of [`flow::manifests`] and its echo upstream.
struct Env {
    _dir: tempfile::TempDir,
    gw: Gateway,
    /// The `iss` the gateway must put in every authorization response.
    issuer: String,
    /// Follows no redirects (the `oauth2` crate requires that of its HTTP client).
    http: reqwest::Client,
    /// The session cookie's name for this issuer.
    cookie: &'static str,
}

fn no_redirects() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("reqwest client")
}

async fn env() -> Env {
    env_with(&[]).await
}

async fn env_with(flags: &[&str]) -> Env {
    env_in(tempfile::tempdir().unwrap(), flags).await
}

/// A gateway whose embedded store is `dir`/data, which the test may have filled before.
async fn env_in(dir: tempfile::TempDir, flags: &[&str]) -> Env {
    let upstream = gatehouse_tests::echo::spawn().await;
    let mdir = dir.path().join("manifests");
    std::fs::create_dir_all(&mdir).unwrap();
    std::fs::write(
        mdir.join("pkce.yaml"),
        flow::manifests(&format!("http://{upstream}"), ACCESS_TTL),
    )
    .unwrap();
    let gw = tokio::task::block_in_place(|| Gateway::start(&mdir, &dir.path().join("data"), flags));
    let issuer = match flags.iter().position(|f| *f == "--issuer") {
        Some(i) => flags[i + 1].trim_end_matches('/').to_string(),
        None => format!("http://localhost:{}", gw.addr.port()),
    };
    let cookie = if issuer.starts_with("https://") {
        SECURE_SESSION_COOKIE
    } else {
        SESSION_COOKIE
    };
    Env {
        _dir: dir,
        gw,
        issuer,
        http: no_redirects(),
        cookie,
    }
}

// ---------------------------------------------------------------------------------- browser

/// What the browser got back: status, headers and the body as text.
struct Page {
    status: StatusCode,
    headers: HeaderMap,
    body: String,
    /// The session cookie's name.
    cookie: &'static str,
}

impl Page {
    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_else(|| panic!("no {name} header ({}):\n{}", self.status, self.body))
    }

    fn location(&self) -> &str {
        assert_eq!(self.status, StatusCode::SEE_OTHER, "{}", self.body);
        self.header("location")
    }

    fn hidden(&self, name: &str) -> String {
        flow::input_value(&self.body, name)
            .unwrap_or_else(|| panic!("no input {name} ({}):\n{}", self.status, self.body))
    }

    fn alert(&self) -> Option<String> {
        flow::alert(&self.body)
    }

    fn session_cookie(&self) -> Option<&str> {
        self.headers
            .get_all(header::SET_COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find(|c| flow::set_cookie_value(c, self.cookie).is_some())
    }
}

/// A browser tab: one cookie jar (the session and device cookies), redirects not followed.
struct Browser<'e> {
    env: &'e Env,
    http: reqwest::Client,
    session: Option<String>,
    /// The device cookie's value (`<session cookie name>_device`).
    device: Option<String>,
    /// X-Forwarded-For on every request, as an ingress in front of the gateway would add it.
    forwarded_for: Option<&'static str>,
}

impl<'e> Browser<'e> {
    fn new(env: &'e Env) -> Self {
        Browser {
            env,
            http: no_redirects(),
            session: None,
            device: None,
            forwarded_for: None,
        }
    }

    /// The session cookie expires (the device cookie stays, as it outlives sessions).
    fn end_session(&mut self) {
        self.session = None;
    }

    /// A browser whose requests reach the gateway through a proxy that names it `ip`.
    fn behind_proxy_as(env: &'e Env, ip: &'static str) -> Self {
        Browser {
            forwarded_for: Some(ip),
            ..Browser::new(env)
        }
    }

    fn url(&self, path_or_url: &str) -> String {
        if path_or_url.starts_with('/') {
            self.env.gw.url(path_or_url)
        } else {
            path_or_url.to_string()
        }
    }

    async fn send(&mut self, mut req: reqwest::RequestBuilder) -> Page {
        let device_cookie = format!("{}_device", self.env.cookie);
        let jar: Vec<String> = [
            (self.env.cookie, &self.session),
            (&device_cookie, &self.device),
        ]
        .into_iter()
        .filter_map(|(name, value)| value.as_ref().map(|v| format!("{name}={v}")))
        .collect();
        if !jar.is_empty() {
            req = req.header(header::COOKIE, jar.join("; "));
        }
        if let Some(ip) = self.forwarded_for {
            req = req.header("x-forwarded-for", ip);
        }
        let resp = req.send().await.expect("request to the gateway");
        let page = Page {
            status: resp.status(),
            headers: resp.headers().clone(),
            body: resp.text().await.expect("body"),
            cookie: self.env.cookie,
        };
        if let Some(c) = page.session_cookie() {
            self.session = flow::set_cookie_value(c, self.env.cookie).map(str::to_string);
        }
        if let Some(v) = page
            .headers
            .get_all(header::SET_COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find_map(|c| flow::set_cookie_value(c, &device_cookie))
        {
            self.device = Some(v.to_string());
        }
        page
    }

    async fn get(&mut self, path_or_url: &str) -> Page {
        let req = self.http.get(self.url(path_or_url));
        self.send(req).await
    }

    async fn post(&mut self, path: &str, fields: &[(&str, &str)]) -> Page {
        let req = self.http.post(self.url(path)).form(fields);
        self.send(req).await
    }

    /// Posts the form of `page` to `action`: its hidden `csrf` and `req` plus `fields`.
    async fn submit(&mut self, page: &Page, action: &str, fields: &[(&str, &str)]) -> Page {
        let (csrf, req) = (page.hidden("csrf"), page.hidden("req"));
        let mut all = vec![("csrf", csrf.as_str()), ("req", req.as_str())];
        all.extend_from_slice(fields);
        self.post(action, &all).await
    }

    /// The answer to a POST that failed: a 303 (design section 5) to the error page `id`, with
    /// the pages' headers; returns that page.
    async fn failed(&mut self, posted: &Page, id: &str) -> Page {
        assert_eq!(posted.location(), format!("/oauth2/error?e={id}"));
        let page = self.follow(posted).await;
        assert_page_headers(&page);
        page
    }

    /// Follows a 303 to a page of the gateway.
    async fn follow(&mut self, page: &Page) -> Page {
        let to = page.location().to_string();
        assert!(to.starts_with('/'), "redirect leaves the gateway: {to}");
        self.get(&to).await
    }
}

// ------------------------------------------------------------------------------ the mobile app

type TokenResult = Result<
    BasicTokenResponse,
    RequestTokenError<HttpClientError<reqwest::Error>, BasicErrorResponse>,
>;

/// The app's OAuth client: a public client with one redirect URI.
struct App {
    redirect: String,
    /// A trusted subscription's client: never asked to confirm.
    trusted: bool,
    oauth: BasicClient<EndpointSet, EndpointNotSet, EndpointNotSet, EndpointNotSet, EndpointSet>,
}

/// One authorization request as the app made it.
struct Authz {
    url: String,
    state: String,
    verifier: String,
}

fn app(env: &Env, client_id: &'static str, redirect: &str) -> App {
    let mut app = app_without_redirect_uri(env, client_id, redirect);
    app.oauth = app
        .oauth
        .set_redirect_uri(RedirectUrl::new(redirect.to_string()).unwrap());
    app
}

/// An app that sends no redirect_uri (allowed when exactly one is registered); the gateway
/// redirects to `registered`.
fn app_without_redirect_uri(env: &Env, client_id: &'static str, registered: &str) -> App {
    let oauth = BasicClient::new(ClientId::new(client_id.to_string()))
        .set_auth_uri(AuthUrl::new(env.gw.url("/oauth2/authorize")).unwrap())
        .set_token_uri(TokenUrl::new(env.gw.url("/oauth2/token")).unwrap());
    App {
        redirect: registered.to_string(),
        trusted: [FIRST_PARTY_APP, LIMITED_APP].contains(&client_id),
        oauth,
    }
}

impl App {
    fn authorize(&self, scopes: &[&str]) -> Authz {
        self.authorize_with(scopes, CsrfToken::new_random)
    }

    fn authorize_with(&self, scopes: &[&str], state: impl FnOnce() -> CsrfToken) -> Authz {
        let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
        let mut req = self
            .oauth
            .authorize_url(state)
            .set_pkce_challenge(challenge);
        for s in scopes {
            req = req.add_scope(Scope::new(s.to_string()));
        }
        let (url, state) = req.url();
        Authz {
            url: url.to_string(),
            state: state.secret().clone(),
            verifier: verifier.secret().clone(),
        }
    }

    async fn exchange(&self, env: &Env, code: &str, verifier: Option<&str>) -> TokenResult {
        let mut req = self
            .oauth
            .exchange_code(AuthorizationCode::new(code.to_string()));
        if let Some(v) = verifier {
            req = req.set_pkce_verifier(PkceCodeVerifier::new(v.to_string()));
        }
        req.request_async(&env.http).await
    }

    async fn refresh(&self, env: &Env, refresh_token: &str) -> TokenResult {
        let rt = RefreshToken::new(refresh_token.to_string());
        self.oauth
            .exchange_refresh_token(&rt)
            .request_async(&env.http)
            .await
    }

    /// Exchanges a code that must work, returning (access token, refresh token).
    async fn tokens(&self, env: &Env, code: &str, verifier: &str) -> (String, String) {
        let t = self
            .exchange(env, code, Some(verifier))
            .await
            .unwrap_or_else(|e| panic!("code exchange failed: {e:?}\n{}", env.gw.logs()));
        let refresh = t.refresh_token().expect("a refresh token").secret().clone();
        (t.access_token().secret().clone(), refresh)
    }
}

/// The OAuth error code of a refused token request.
/// The error code and description of a refused token request.
fn token_error_text(r: TokenResult) -> (BasicErrorResponseType, String) {
    match r {
        Err(RequestTokenError::ServerResponse(e)) => (
            e.error().clone(),
            e.error_description().cloned().unwrap_or_default(),
        ),
        Err(other) => panic!("expected an OAuth error response, got {other:?}"),
        Ok(t) => panic!(
            "expected an OAuth error, got tokens with scope {:?}",
            t.scopes()
        ),
    }
}

fn token_error(r: TokenResult) -> BasicErrorResponseType {
    token_error_text(r).0
}

fn scopes_of(t: &BasicTokenResponse) -> Vec<String> {
    t.scopes()
        .map(|v| v.iter().map(|s| s.to_string()).collect())
        .unwrap_or_default()
}

/// The parameters of the gateway's redirect back to the app.
struct Callback(HashMap<String, String>);

/// Reads the 303 to `redirect` (exactly that URI, then the query).
fn callback(page: &Page, redirect: &str) -> Callback {
    let location = page.location();
    let (base, query) = location
        .split_once('?')
        .unwrap_or_else(|| panic!("no query in {location}"));
    assert_eq!(base, redirect, "redirected to {location}");
    let mut params = HashMap::new();
    for (k, v) in url::form_urlencoded::parse(query.as_bytes()) {
        assert!(
            params.insert(k.to_string(), v.to_string()).is_none(),
            "{k} repeated in {location}"
        );
    }
    Callback(params)
}

impl Callback {
    fn get(&self, k: &str) -> Option<&str> {
        self.0.get(k).map(String::as_str)
    }

    /// A success response: exactly code, state and iss.
    fn code(&self, env: &Env, state: &str) -> String {
        let mut keys: Vec<&str> = self.0.keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(keys, ["code", "iss", "state"], "{:?}", self.0);
        assert_eq!(self.get("state"), Some(state));
        assert_eq!(self.get("iss"), Some(env.issuer.as_str()));
        self.get("code").unwrap().to_string()
    }

    /// An error response: `error`, a description, the exact state and iss, no code.
    fn error(&self, env: &Env, state: &str, error: &str) {
        assert_eq!(self.get("error"), Some(error), "{:?}", self.0);
        assert!(self.get("error_description").is_some_and(|d| !d.is_empty()));
        assert_eq!(self.get("state"), Some(state), "{:?}", self.0);
        assert_eq!(self.get("iss"), Some(env.issuer.as_str()), "{:?}", self.0);
        assert_eq!(self.get("code"), None);
    }
}

// ------------------------------------------------------------------------------- the user

/// Opens the app's authorization URL in the browser: the sign-in page.
async fn open_login(b: &mut Browser<'_>, authz: &Authz) -> Page {
    let page = b.get(&authz.url).await;
    assert_eq!(page.status, StatusCode::OK, "{}", b.env.gw.logs());
    assert!(page.body.contains("action=\"/login\""), "{}", page.body);
    assert!(
        b.session.is_some(),
        "the sign-in page sets the session cookie"
    );
    page
}

/// From the sign-in page: "Create an account" and submit it; returns the 303 (not followed).
async fn submit_signup_form(
    b: &mut Browser<'_>,
    login: &Page,
    email: &str,
    password: &str,
) -> Page {
    let signup = b.get(&format!("/signup?req={}", login.hidden("req"))).await;
    assert_eq!(signup.status, StatusCode::OK, "{}", signup.body);
    assert!(signup.body.contains("action=\"/signup\""));
    b.submit(
        &signup,
        "/signup",
        &[("email", email), ("password", password)],
    )
    .await
}

/// From the sign-in page: "Create an account", submit it, follow to /consent. Returns what
/// /consent answers (the consent page, or the redirect to the app).
async fn sign_up(b: &mut Browser<'_>, login: &Page, email: &str, password: &str) -> Page {
    let done = submit_signup_form(b, login, email, password).await;
    assert!(
        done.location().starts_with("/consent?req="),
        "signup failed: {:?}",
        b.follow(&done).await.alert()
    );
    b.follow(&done).await
}

/// A new browser opens `app`'s sign-in page, goes to "Create an account" and submits it for
/// `email` and `password`; returns the browser and the 303 (not followed).
async fn submit_signup<'e>(
    env: &'e Env,
    app: &App,
    email: &str,
    password: &str,
) -> (Browser<'e>, Page) {
    let mut b = Browser::new(env);
    let login = open_login(&mut b, &app.authorize(&[PROFILE])).await;
    let r = submit_signup_form(&mut b, &login, email, password).await;
    (b, r)
}

/// Submits the sign-in form; returns the 303 (not followed).
async fn log_in(b: &mut Browser<'_>, login: &Page, email: &str, password: &str) -> Page {
    let r = b
        .submit(login, "/login", &[("email", email), ("password", password)])
        .await;
    assert_eq!(r.status, StatusCode::SEE_OTHER, "{}", r.body);
    r
}

/// Answers the consent page; returns the 303 to the app.
async fn decide(b: &mut Browser<'_>, consent: &Page, decision: &str) -> Page {
    assert_eq!(consent.status, StatusCode::OK, "not a consent page");
    assert!(
        consent.body.contains("action=\"/consent\""),
        "{}",
        consent.body
    );
    let r = b
        .submit(consent, "/consent", &[("decision", decision)])
        .await;
    assert_eq!(r.status, StatusCode::SEE_OTHER, "{}", r.body);
    r
}

/// A new user in a new browser: signup and (when asked) consent to `scopes`. Returns the
/// signed-in browser, the code and the verifier.
async fn new_user<'e>(
    env: &'e Env,
    app: &App,
    email: &str,
    scopes: &[&str],
) -> (Browser<'e>, String, String) {
    let mut b = Browser::new(env);
    let authz = app.authorize(scopes);
    let login = open_login(&mut b, &authz).await;
    let mut page = sign_up(&mut b, &login, email, PASSWORD).await;
    if page.status == StatusCode::OK {
        page = decide(&mut b, &page, "allow").await;
    }
    let code = callback(&page, &app.redirect).code(env, &authz.state);
    (b, code, authz.verifier)
}

/// A signed-in browser whose user already granted `scopes`: authorize goes on to /consent,
/// which sends a trusted client's code straight to the app and asks the user to confirm an
/// untrusted (public) one's. Returns the code and the verifier.
async fn code_again(b: &mut Browser<'_>, app: &App, scopes: &[&str]) -> (String, String) {
    let authz = app.authorize(scopes);
    let first = b.get(&authz.url).await;
    assert!(first.location().starts_with("/consent?req="));
    let mut done = b.follow(&first).await;
    if !app.trusted {
        done = decide(b, &done, "allow").await;
    }
    let code = callback(&done, &app.redirect).code(b.env, &authz.state);
    (code, authz.verifier)
}

/// Rewrites the gateway's manifests file with `edit`, which must change it.
fn edit_manifests(env: &Env, edit: impl FnOnce(&str) -> String) {
    let path = env._dir.path().join("manifests/pkce.yaml");
    let old = std::fs::read_to_string(&path).unwrap();
    let new = edit(&old);
    assert_ne!(old, new, "the edit changed nothing");
    std::fs::write(&path, new).unwrap();
}

/// Polls `reloaded` until the gateway shows it runs the edited manifests (at most 15 s).
async fn wait_reloaded<F: Future<Output = bool>>(mut reloaded: impl FnMut() -> F) {
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while !reloaded().await {
        assert!(
            std::time::Instant::now() < deadline,
            "manifests not reloaded"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until the reloaded configuration no longer offers `scope` (a client_credentials
/// request for it is refused).
async fn wait_scope_dropped(env: &Env, scope: &str) {
    wait_reloaded(|| async {
        let form = [("grant_type", "client_credentials"), ("scope", scope)];
        let creds = Some((flow::BACKEND_APP, flow::BACKEND_SECRET));
        let (status, _, _) = post_form(env, "/oauth2/token", creds, &form).await;
        status == StatusCode::BAD_REQUEST
    })
    .await;
}

/// A signed-up user's tokens for `app`: (access, refresh).
async fn user_tokens(env: &Env, app: &App, email: &str, scopes: &[&str]) -> (String, String) {
    let (_, code, verifier) = new_user(env, app, email, scopes).await;
    app.tokens(env, &code, &verifier).await
}

// ------------------------------------------------------------------------------- the API

/// GET /mobile/orders/42 with the token, and spoofed identity headers the gateway must replace.
async fn call_api(env: &Env, token: &str) -> reqwest::Response {
    env.http
        .get(env.gw.url("/mobile/orders/42"))
        .bearer_auth(token)
        .header("X-Authenticated-UserId", "spoofed-user")
        .header("x-authenticated-scope", "admin")
        .header("X-Client-Id", "spoofed-client")
        .send()
        .await
        .unwrap()
}

/// The single value of a header as the echo upstream received it.
fn echoed<'a>(echo: &'a Value, name: &str) -> &'a str {
    let values = echo["headers"][name]
        .as_array()
        .unwrap_or_else(|| panic!("upstream got no {name}: {echo}"));
    assert_eq!(values.len(), 1, "{name}: {values:?}");
    values[0].as_str().unwrap()
}

async fn assert_token_refused_by_api(env: &Env, token: &str) {
    let r = call_api(env, token).await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let www = r.headers()[header::WWW_AUTHENTICATE].to_str().unwrap();
    assert!(www.contains("error=\"invalid_token\""), "{www}");
}

fn is_uuid(s: &str) -> bool {
    s.len() == 36
        && s.char_indices().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == '-',
            _ => c.is_ascii_hexdigit(),
        })
}

async fn post_form(
    env: &Env,
    path: &str,
    basic: Option<(&str, &str)>,
    form: &[(&str, &str)],
) -> (StatusCode, HeaderMap, Value) {
    let mut req = env.http.post(env.gw.url(path)).form(form);
    if let Some((id, secret)) = basic {
        req = req.basic_auth(id, Some(secret));
    }
    let r = req.send().await.unwrap();
    let (status, headers) = (r.status(), r.headers().clone());
    let text = r.text().await.unwrap();
    let body = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}"))
    };
    (status, headers, body)
}

async fn introspect(env: &Env, token: &str) -> Value {
    let (status, headers, body) = post_form(
        env,
        "/oauth2/introspect",
        Some((BACKEND_APP, BACKEND_SECRET)),
        &[("token", token)],
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(headers[header::CACHE_CONTROL], "no-store");
    body
}

async fn revoke(env: &Env, client_id: &str, token: &str) -> StatusCode {
    let (status, _, body) = post_form(
        env,
        "/oauth2/revoke",
        None,
        &[("client_id", client_id), ("token", token)],
    )
    .await;
    assert_eq!(body, Value::Null, "revocation answers with an empty body");
    status
}

async fn userinfo(env: &Env, token: Option<&str>) -> (StatusCode, Value) {
    let mut req = env.http.get(env.gw.url("/oauth2/userinfo"));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let r = req.send().await.unwrap();
    (r.status(), r.json().await.unwrap_or(Value::Null))
}

/// The security headers every page of the login flow carries.
fn assert_page_headers(page: &Page) {
    assert_eq!(page.header("x-frame-options"), "DENY");
    let csp = page.header("content-security-policy");
    assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
    assert_eq!(page.header("referrer-policy"), "no-referrer");
    assert_eq!(page.header("content-type"), "text/html; charset=utf-8");
}

// ================================================================================== tests

/// The pending request keeps the app's `state` in the store until sign-in: up to 2,048
/// characters are taken; a longer one gets a page and stores nothing.
#[tokio::test(flavor = "multi_thread")]
async fn an_oversized_state_is_refused_before_anything_is_stored() {
    let env = env().await;
    let app = app(&env, PHONE_APP, "myapp://callback");
    let fits = "s".repeat(2_048);
    let mut b = Browser::new(&env);
    open_login(
        &mut b,
        &app.authorize_with(&[PROFILE], || CsrfToken::new(fits)),
    )
    .await;

    let long = "s".repeat(2_049);
    let mut b = Browser::new(&env);
    let page = b
        .get(&app.authorize_with(&[PROFILE], || CsrfToken::new(long)).url)
        .await;
    assert_eq!(page.status, StatusCode::BAD_REQUEST);
    assert!(page.body.contains("Sign-in link too long"), "{}", page.body);
    assert!(page.session_cookie().is_none(), "no session was created");
    assert_page_headers(&page);
}

/// The value of the sign-in form's email field.
fn email_shown(page: &Page) -> String {
    let field = &page.body[page.body.find("name=\"email\"").expect("email field")..];
    let value = &field[field.find("value=\"").expect("value") + 7..];
    flow::unescape(&value[..value.find('"').expect("end of value")])
}

/// A refused email is shown again in the form (it rides in the stored session) only when it
/// could be an address; the gateway's forms take at most 16 KiB.
#[tokio::test(flavor = "multi_thread")]
async fn a_refused_email_is_kept_only_when_address_sized_and_forms_are_bounded() {
    let env = env().await;
    let app = app(&env, PHONE_APP, "myapp://callback");
    let mut b = Browser::new(&env);
    let login = open_login(&mut b, &app.authorize(&[PROFILE])).await;

    let typo = "nina.example.com";
    let r = log_in(&mut b, &login, typo, PASSWORD).await;
    let again = b.follow(&r).await;
    assert_eq!(email_shown(&again), typo, "a typo is shown for correction");

    for junk in [
        "\u{1}".repeat(300),
        format!("{}@example.com", "a".repeat(250)),
    ] {
        let r = log_in(&mut b, &again, &junk, PASSWORD).await;
        let page = b.follow(&r).await;
        assert_eq!(email_shown(&page), "", "not kept: {:?}", &junk[..20]);
    }

    let big = "a".repeat(20 * 1024);
    let r = b
        .submit(&again, "/login", &[("email", &big), ("password", PASSWORD)])
        .await;
    let page = b.failed(&r, "form-too-large").await;
    assert_eq!(
        page.status,
        StatusCode::BAD_REQUEST,
        "a GET of it has no body to refuse"
    );
    assert!(page.body.contains("Form not accepted"), "{}", page.body);
    // At the token endpoint the same is an RFC 6749 error, not cached.
    let form = [("grant_type", "authorization_code"), ("code", big.as_str())];
    let (status, headers, body) = post_form(&env, "/oauth2/token", None, &form).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(body["error"], "invalid_request", "{body}");
    assert_eq!(headers[header::CACHE_CONTROL], "no-store");
}

#[tokio::test(flavor = "multi_thread")]
async fn signup_consent_code_exchange_and_identity_headers_at_the_upstream() {
    let env = env().await;
    let app = app(&env, PHONE_APP, "myapp://callback");
    // A state with characters that need encoding must come back exactly.
    let state = "s t/a+t=e&x=\u{e9}%41";
    let authz = app.authorize_with(&[PROFILE, ORDERS], || CsrfToken::new(state.to_string()));
    let mut b = Browser::new(&env);
    let login = open_login(&mut b, &authz).await;
    assert!(
        login.body.contains("Sign in to Phone App"),
        "{}",
        login.body
    );
    let before = b.session.clone();

    let consent = sign_up(&mut b, &login, "Alice.PKCE@Example.com", PASSWORD).await;
    assert_ne!(b.session, before, "signing in issues a new session id");
    assert_eq!(consent.status, StatusCode::OK, "{}", consent.body);
    assert!(consent.body.contains(PROFILE_TEXT) && consent.body.contains(ORDERS_TEXT));
    assert!(consent.body.contains("Signed in as alice.pkce@example.com"));
    let done = decide(&mut b, &consent, "allow").await;
    let code = callback(&done, "myapp://callback").code(&env, state);

    let t = app
        .exchange(&env, &code, Some(&authz.verifier))
        .await
        .expect("code exchange");
    assert_eq!(t.token_type(), &oauth2::basic::BasicTokenType::Bearer);
    assert_eq!(t.expires_in(), Some(Duration::from_secs(ACCESS_TTL)));
    assert_eq!(scopes_of(&t), [PROFILE, ORDERS]);
    assert!(t.refresh_token().is_some());
    let access = t.access_token().secret();
    assert_eq!(access.len(), 43, "256-bit base64url token");

    let r = call_api(&env, access).await;
    assert_eq!(r.status(), StatusCode::OK);
    let echo: Value = r.json().await.unwrap();
    assert_eq!(echo["path"], "/orders/42");
    let user_id = echoed(&echo, "x-authenticated-userid");
    assert!(is_uuid(user_id), "{user_id}");
    assert_eq!(echoed(&echo, "x-authenticated-scope"), "profile orders");
    assert_eq!(echoed(&echo, "x-client-id"), PHONE_APP);
    assert_eq!(echoed(&echo, "x-application-id"), "pkce/phone-app");
    assert_eq!(echoed(&echo, "x-api-plan"), "generous");
    assert!(echo["headers"].get("authorization").is_none());

    let (status, info) = userinfo(&env, Some(access)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        info,
        json!({"sub": user_id, "email": "alice.pkce@example.com"})
    );
}

/// Every Argon2id hash takes 19 MiB. After a burst of sign-ups that memory must go back to the
/// OS by itself, with no further request to trigger it: replicas are sized by what they hold
/// between bursts, and Kubernetes evicts on resident memory.
#[tokio::test(flavor = "multi_thread")]
async fn memory_of_a_signup_burst_goes_back_to_the_os() {
    const MIB: u64 = 1024;
    let env = env().await;
    let app = app(&env, PHONE_APP, "myapp://callback");
    let before = env.gw.rss_kib().expect("reading /proc/<pid>/status");
    let emails: Vec<String> = (0..6).map(|i| format!("burst{i}@example.com")).collect();
    futures_util::future::join_all(emails.iter().map(|e| new_user(&env, &app, e, &[PROFILE])))
        .await;
    let peak = env.gw.peak_rss_kib().unwrap();
    assert!(
        peak >= before + 19 * MIB,
        "hashing should have taken 19 MiB at least: {before} KiB before, peak {peak} KiB"
    );
    // jemalloc's background thread purges what stayed unused for 1 s; allow a few seconds. The
    // bound is below one hash's 19 MiB, so a single buffer kept resident fails the test; what
    // stays is sessions, users and the allocator's own bookkeeping (about 8 MiB here).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let now = env.gw.rss_kib().unwrap();
        if now <= before + 16 * MIB {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "resident memory stayed at {now} KiB 10 s after the burst ({before} KiB before, peak {peak} KiB)"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn returning_user_logs_in_and_is_asked_only_for_new_scopes_and_can_deny() {
    let env = env().await;
    let app = app(&env, PHONE_APP, "myapp://callback");
    new_user(&env, &app, "bob@example.com", &[PROFILE]).await;

    // Another browser: the sign-in form (email in another case), no consent for `profile`.
    let mut b = Browser::new(&env);
    let authz = app.authorize(&[PROFILE]);
    let login = open_login(&mut b, &authz).await;
    let r = log_in(&mut b, &login, "BOB@Example.COM", PASSWORD).await;
    assert!(
        r.location().starts_with("/consent?req="),
        "{}",
        r.location()
    );
    let done = b.follow(&r).await;
    let code = callback(&done, "myapp://callback").code(&env, &authz.state);
    let t = app
        .exchange(&env, &code, Some(&authz.verifier))
        .await
        .unwrap();
    assert_eq!(scopes_of(&t), [PROFILE]);

    // A new scope: consent again, listing only the new one. Deny.
    let authz = app.authorize(&[PROFILE, ORDERS]);
    let first = b.get(&authz.url).await;
    assert!(
        first.location().starts_with("/consent?req="),
        "signed in: no login page"
    );
    let consent = b.follow(&first).await;
    assert_eq!(consent.status, StatusCode::OK);
    assert!(consent.body.contains(ORDERS_TEXT), "{}", consent.body);
    assert!(!consent.body.contains(PROFILE_TEXT), "{}", consent.body);
    let denied = decide(&mut b, &consent, "deny").await;
    callback(&denied, "myapp://callback").error(&env, &authz.state, "access_denied");

    // Denying remembered nothing: asked again; allowing grants both.
    let authz = app.authorize(&[PROFILE, ORDERS]);
    let first = b.get(&authz.url).await;
    let consent = b.follow(&first).await;
    assert!(consent.body.contains(ORDERS_TEXT) && !consent.body.contains(PROFILE_TEXT));
    let done = decide(&mut b, &consent, "allow").await;
    let code = callback(&done, "myapp://callback").code(&env, &authz.state);
    let t = app
        .exchange(&env, &code, Some(&authz.verifier))
        .await
        .unwrap();
    assert_eq!(scopes_of(&t), [PROFILE, ORDERS]);

    // Now both are granted: nothing new to list, but the signed-in browser still confirms.
    let (code, verifier) = code_again(&mut b, &app, &[ORDERS]).await;
    let t = app.exchange(&env, &code, Some(&verifier)).await.unwrap();
    assert_eq!(scopes_of(&t), [ORDERS]);

    // The consent is per user: a new user of the same app is asked.
    let mut other = Browser::new(&env);
    let login = open_login(&mut other, &app.authorize(&[PROFILE])).await;
    let page = sign_up(&mut other, &login, "carol@example.com", PASSWORD).await;
    assert_eq!(page.status, StatusCode::OK, "consent page for a new user");
    assert!(page.body.contains(PROFILE_TEXT));
}

/// RFC 8252 8.6: any app on the phone can claim an untrusted public client's redirect URI and
/// open its authorization link in the user's signed-in browser. Such a request gets its code
/// only after the user clicks Allow, even for scopes granted before or for none. Having typed
/// the password for the request counts as that interaction.
#[tokio::test(flavor = "multi_thread")]
async fn a_signed_in_browser_confirms_each_request_of_an_untrusted_public_app() {
    let env = env().await;
    let phone = app(&env, PHONE_APP, "myapp://callback");
    let (mut b, _, _) = new_user(&env, &phone, "iris@example.com", &[PROFILE]).await;

    for scopes in [&[PROFILE][..], &[]] {
        let authz = phone.authorize(scopes);
        let first = b.get(&authz.url).await;
        assert!(first.location().starts_with("/consent?req="));
        let page = b.follow(&first).await;
        assert_eq!(
            page.status,
            StatusCode::OK,
            "{scopes:?}: no code without a click"
        );
        assert!(page.body.contains("Phone App wants to access Mobile API"));
        assert!(page.body.contains("Signed in as iris@example.com"));
        assert!(
            !page.body.contains(PROFILE_TEXT),
            "granted before: not listed"
        );
        assert_page_headers(&page);
        let done = decide(&mut b, &page, "allow").await;
        let code = callback(&done, "myapp://callback").code(&env, &authz.state);
        let t = phone.exchange(&env, &code, Some(&authz.verifier)).await;
        assert_eq!(scopes_of(&t.unwrap()), scopes, "no scope member when none");
    }
    let authz = phone.authorize(&[PROFILE]);
    let first = b.get(&authz.url).await;
    let page = b.follow(&first).await;
    let denied = decide(&mut b, &page, "deny").await;
    callback(&denied, "myapp://callback").error(&env, &authz.state, "access_denied");

    // Signing in for the request is the interaction: granted scopes go straight to the app.
    let mut fresh = Browser::new(&env);
    let authz = phone.authorize(&[PROFILE]);
    let login = open_login(&mut fresh, &authz).await;
    let r = log_in(&mut fresh, &login, "iris@example.com", PASSWORD).await;
    let done = fresh.follow(&r).await;
    callback(&done, "myapp://callback").code(&env, &authz.state);

    // A trusted (first-party) app's request goes straight through, as designed.
    let trusted = app(&env, FIRST_PARTY_APP, "myapp://callback");
    let authz = trusted.authorize(&[PROFILE]);
    let first = b.get(&authz.url).await;
    let done = b.follow(&first).await;
    callback(&done, "myapp://callback").code(&env, &authz.state);
}

#[tokio::test(flavor = "multi_thread")]
async fn trusted_subscription_never_shows_a_consent_page() {
    let env = env().await;
    let trusted = app(&env, FIRST_PARTY_APP, "myapp://callback");
    let mut b = Browser::new(&env);
    let authz = trusted.authorize(&[PROFILE, ORDERS]);
    let login = open_login(&mut b, &authz).await;
    assert!(login.body.contains("Sign in to First Party"));
    let after_signup = sign_up(&mut b, &login, "dave@example.com", PASSWORD).await;
    // /consent answers with the redirect to the app right away.
    let code = callback(&after_signup, "myapp://callback").code(&env, &authz.state);
    let t = trusted
        .exchange(&env, &code, Some(&authz.verifier))
        .await
        .unwrap();
    assert_eq!(scopes_of(&t), [PROFILE, ORDERS]);
    let echo: Value = call_api(&env, t.access_token().secret())
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(echoed(&echo, "x-client-id"), FIRST_PARTY_APP);
    assert_eq!(echoed(&echo, "x-authenticated-scope"), "profile orders");

    // One registered redirect URI: the app may leave redirect_uri out of the authorization
    // request, and then out of the token request too (RFC 6749 4.1.3).
    let implicit_redirect = app_without_redirect_uri(&env, FIRST_PARTY_APP, "myapp://callback");
    let (code, verifier) = code_again(&mut b, &implicit_redirect, &[PROFILE]).await;
    implicit_redirect.tokens(&env, &code, &verifier).await;
    // Sending it anyway (the registered one) is fine too; another one is not.
    let (code, verifier) = code_again(&mut b, &implicit_redirect, &[PROFILE]).await;
    trusted.tokens(&env, &code, &verifier).await;
    let (code, verifier) = code_again(&mut b, &trusted, &[PROFILE]).await;
    let r = implicit_redirect
        .exchange(&env, &code, Some(&verifier))
        .await;
    assert_eq!(
        token_error(r),
        BasicErrorResponseType::InvalidRequest,
        "redirect_uri was in the authorization request: required"
    );

    // Trust belongs to the subscription: the same user on the non-trusted app is asked.
    let phone = app(&env, PHONE_APP, "myapp://callback");
    let first = b.get(&phone.authorize(&[PROFILE]).url).await;
    let consent = b.follow(&first).await;
    assert_eq!(consent.status, StatusCode::OK);
    assert!(consent.body.contains(PROFILE_TEXT));
}

#[tokio::test(flavor = "multi_thread")]
async fn codes_are_single_use_and_bound_to_verifier_client_and_redirect() {
    let env = env().await;
    let phone = app(&env, PHONE_APP, "myapp://callback");
    let (mut b, code, verifier) = new_user(&env, &phone, "erin@example.com", &[PROFILE]).await;

    // Replay: refused, and the tokens issued from that code stop working.
    let (access, refresh) = phone.tokens(&env, &code, &verifier).await;
    assert_eq!(call_api(&env, &access).await.status(), StatusCode::OK);
    // Another client sending the spent code (it saw the URL) is refused without revoking.
    let thief = app(&env, FIRST_PARTY_APP, "myapp://callback");
    let r = thief.exchange(&env, &code, Some(&verifier)).await;
    assert_eq!(token_error(r), BasicErrorResponseType::InvalidGrant);
    assert_eq!(call_api(&env, &access).await.status(), StatusCode::OK);
    let replay = phone.exchange(&env, &code, Some(&verifier)).await;
    assert_eq!(token_error(replay), BasicErrorResponseType::InvalidGrant);
    assert_token_refused_by_api(&env, &access).await;
    assert_eq!(
        token_error(phone.refresh(&env, &refresh).await),
        BasicErrorResponseType::InvalidGrant
    );

    // Wrong verifier (well-formed, another pair's). A refused exchange does not spend the
    // code: whoever saw it in a URL cannot burn it for the app that holds the verifier.
    let (code, verifier) = code_again(&mut b, &phone, &[PROFILE]).await;
    let (_, other) = PkceCodeChallenge::new_random_sha256();
    let r = phone.exchange(&env, &code, Some(other.secret())).await;
    assert_eq!(token_error(r), BasicErrorResponseType::InvalidGrant);
    let (access, _) = phone.tokens(&env, &code, &verifier).await;
    assert_eq!(call_api(&env, &access).await.status(), StatusCode::OK);

    // The challenge itself as the verifier (a `plain` downgrade).
    let authz = phone.authorize(&[PROFILE]);
    let challenge = url::Url::parse(&authz.url)
        .unwrap()
        .query_pairs()
        .find(|(k, _)| k == "code_challenge")
        .unwrap()
        .1
        .to_string();
    let first = b.get(&authz.url).await;
    let confirm = b.follow(&first).await;
    let done = decide(&mut b, &confirm, "allow").await;
    let code = callback(&done, "myapp://callback").code(&env, &authz.state);
    let r = phone.exchange(&env, &code, Some(&challenge)).await;
    assert_eq!(token_error(r), BasicErrorResponseType::InvalidGrant);

    // No verifier at all: a missing parameter (RFC 6749 5.2).
    let (code, _) = code_again(&mut b, &phone, &[PROFILE]).await;
    let r = phone.exchange(&env, &code, None).await;
    assert_eq!(token_error(r), BasicErrorResponseType::InvalidRequest);

    // Another client (same redirect URI registered, right verifier); the code stays its owner's.
    let (code, verifier) = code_again(&mut b, &phone, &[PROFILE]).await;
    let r = thief.exchange(&env, &code, Some(&verifier)).await;
    assert_eq!(token_error(r), BasicErrorResponseType::InvalidGrant);
    let (access, _) = phone.tokens(&env, &code, &verifier).await;
    assert_eq!(call_api(&env, &access).await.status(), StatusCode::OK);

    // Another (registered) redirect_uri than the authorization request's.
    let (code, verifier) = code_again(&mut b, &phone, &[PROFILE]).await;
    let elsewhere = app(&env, PHONE_APP, "com.example.app:/cb");
    let r = elsewhere.exchange(&env, &code, Some(&verifier)).await;
    assert_eq!(token_error(r), BasicErrorResponseType::InvalidGrant);

    // The raw answer: 400, JSON error, no-store.
    let (code, verifier) = code_again(&mut b, &phone, &[PROFILE]).await;
    let form = [
        ("grant_type", "authorization_code"),
        ("client_id", PHONE_APP),
        ("code", code.as_str()),
        ("redirect_uri", "myapp://callback"),
        ("code_verifier", &verifier[..42]),
    ];
    let (status, headers, body) = post_form(&env, "/oauth2/token", None, &form).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(headers[header::CACHE_CONTROL], "no-store");
    assert_eq!(body["error"], "invalid_request", "42 characters: {body}");
}

/// With retries of a refresh turned off (`--refresh-retry-seconds 0`), so that any second use of
/// a refresh token is reuse however the two requests interleave; with the default window see
/// `a_refresh_can_be_retried_within_its_window_only`.
#[tokio::test(flavor = "multi_thread")]
async fn concurrent_uses_of_one_code_or_refresh_token_leave_no_live_tokens() {
    let env = env_with(&["--refresh-retry-seconds", "0"]).await;
    let phone = app(&env, PHONE_APP, "myapp://callback");
    let (mut b, code, verifier) = new_user(&env, &phone, "rita@example.com", &[PROFILE]).await;
    // One code redeemed twice at once (a retried request, or a thief with the verifier): at
    // most one answer has tokens, and whichever request loses revokes them, however the two
    // interleave.
    let (mut code, mut verifier) = (code, verifier);
    for round in 0..4 {
        if round > 0 {
            (code, verifier) = code_again(&mut b, &phone, &[PROFILE]).await;
        }
        let (r1, r2) = tokio::join!(
            phone.exchange(&env, &code, Some(&verifier)),
            phone.exchange(&env, &code, Some(&verifier))
        );
        let won: Vec<_> = [r1, r2].into_iter().filter_map(Result::ok).collect();
        assert!(won.len() <= 1, "round {round}: both redemptions got tokens");
        for t in &won {
            assert_token_refused_by_api(&env, t.access_token().secret()).await;
            let refresh = t.refresh_token().unwrap().secret();
            assert_eq!(
                token_error(phone.refresh(&env, refresh).await),
                BasicErrorResponseType::InvalidGrant
            );
        }
    }
    // One refresh token used twice at once: the same.
    for round in 0..4 {
        let (code, verifier) = code_again(&mut b, &phone, &[PROFILE]).await;
        let (access, refresh) = phone.tokens(&env, &code, &verifier).await;
        let (r1, r2) = tokio::join!(phone.refresh(&env, &refresh), phone.refresh(&env, &refresh));
        let won: Vec<_> = [r1, r2].into_iter().filter_map(Result::ok).collect();
        assert!(won.len() <= 1, "round {round}: both refreshes got tokens");
        assert_token_refused_by_api(&env, &access).await;
        for t in &won {
            assert_token_refused_by_api(&env, t.access_token().secret()).await;
            let next = t.refresh_token().unwrap().secret();
            assert_eq!(
                token_error(phone.refresh(&env, next).await),
                BasicErrorResponseType::InvalidGrant
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_expired_code_is_refused() {
    let env = env().await;
    let phone = app(&env, PHONE_APP, "myapp://callback");
    let (_, code, verifier) = new_user(&env, &phone, "frank@example.com", &[PROFILE]).await;
    // Codes live at most 60 s.
    tokio::time::sleep(Duration::from_secs(61)).await;
    let r = phone.exchange(&env, &code, Some(&verifier)).await;
    assert_eq!(token_error(r), BasicErrorResponseType::InvalidGrant);
}

#[tokio::test(flavor = "multi_thread")]
async fn authorization_requests_are_validated() {
    let env = env().await;
    let challenge = PkceCodeChallenge::new_random_sha256().0;
    let good: Vec<(&str, &str)> = vec![
        ("response_type", "code"),
        ("client_id", PHONE_APP),
        ("redirect_uri", "myapp://callback"),
        ("scope", PROFILE),
        ("state", "st-1 &x"),
        ("code_challenge", challenge.as_str()),
        ("code_challenge_method", "S256"),
    ];
    let with = |changes: &[(&'static str, Option<&'static str>)]| -> String {
        let mut params: Vec<(&str, &str)> = good.clone();
        for (k, v) in changes {
            params.retain(|(name, _)| name != k);
            if let Some(v) = v {
                params.push((k, v));
            }
        }
        url::Url::parse_with_params(&env.gw.url("/oauth2/authorize"), &params)
            .unwrap()
            .to_string()
    };
    let mut b = Browser::new(&env);

    // Sanity: the unchanged request shows the sign-in page.
    assert_eq!(b.get(&with(&[])).await.status, StatusCode::OK);

    // Refusals that go back to the app: error, description, exact state, iss.
    let bad_challenge = "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw+cM";
    for (changes, error) in [
        (
            vec![("code_challenge_method", Some("plain"))],
            "invalid_request",
        ),
        (vec![("code_challenge_method", None)], "invalid_request"),
        (vec![("code_challenge", None)], "invalid_request"),
        (
            vec![("code_challenge", Some("too-short"))],
            "invalid_request",
        ),
        (
            vec![("code_challenge", Some(bad_challenge))],
            "invalid_request",
        ),
        (
            vec![("response_type", Some("token"))],
            "unsupported_response_type",
        ),
        (vec![("response_type", None)], "invalid_request"),
        (vec![("scope", Some("profile admin"))], "invalid_scope"),
    ] {
        let page = b.get(&with(&changes)).await;
        assert_eq!(
            page.status,
            StatusCode::SEE_OTHER,
            "{changes:?}: {}",
            page.body
        );
        callback(&page, "myapp://callback").error(&env, "st-1 &x", error);
    }

    // Never redirected: unknown or missing client, unregistered redirect URI.
    for changes in [
        vec![("client_id", Some("no-such-app"))],
        vec![("client_id", None)],
        vec![("redirect_uri", Some("myapp://evil"))],
        vec![("redirect_uri", Some("myapp://callback/"))],
        vec![("redirect_uri", Some("http://127.0.0.1:5555/other"))],
        vec![("redirect_uri", Some("http://localhost:5555/callback"))],
        // loopback spellings a URL parser would normalize to the registered one
        vec![("redirect_uri", Some("http://127.0.0.1:5555/./callback"))],
        vec![("redirect_uri", Some("http://127.0.0.1:5555/x/../callback"))],
        vec![("redirect_uri", Some("http://127.1:5555/callback"))],
        // even with other errors that would otherwise be redirected
        vec![
            ("redirect_uri", Some("https://attacker.example/cb")),
            ("response_type", Some("token")),
        ],
        // several URIs registered: redirect_uri is required
        vec![("redirect_uri", None)],
    ] {
        let page = b.get(&with(&changes)).await;
        assert_eq!(
            page.status,
            StatusCode::BAD_REQUEST,
            "{changes:?}: {}",
            page.body
        );
        assert!(page.headers.get(header::LOCATION).is_none(), "{changes:?}");
        assert!(page.body.starts_with("<!DOCTYPE html>"));
        assert_page_headers(&page);
    }

    // Loopback: any port; the code comes back to exactly that URI and can be exchanged.
    let loopback = "http://127.0.0.1:54321/callback";
    let looper = app(&env, PHONE_APP, loopback);
    let (mut b, code, verifier) = new_user(&env, &looper, "gina@example.com", &[PROFILE]).await;
    looper.tokens(&env, &code, &verifier).await;
    let bare = app(&env, PHONE_APP, "http://127.0.0.1/callback");
    let (code, verifier) = code_again(&mut b, &bare, &[PROFILE]).await;
    bare.tokens(&env, &code, &verifier).await;

    // Private-use scheme.
    let private = app(&env, PHONE_APP, "com.example.app:/cb");
    let (code, verifier) = code_again(&mut b, &private, &[PROFILE]).await;
    private.tokens(&env, &code, &verifier).await;
}

/// GET /logout shows a button; its CSRF-checked POST ends the browser session, so the next
/// sign-in link asks for the password again. A POST without the form's token changes nothing.
#[tokio::test(flavor = "multi_thread")]
async fn logout_ends_the_browser_session() {
    let env = env().await;
    let phone = app(&env, PHONE_APP, "myapp://callback");
    let (mut b, _, _) = new_user(&env, &phone, "lou@example.com", &[PROFILE]).await;
    // Signed in: a new authorization goes straight on to /consent.
    let first = b.get(&phone.authorize(&[PROFILE]).url).await;
    assert!(first.location().starts_with("/consent?req="));

    let page = b.get("/logout").await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(
        page.body.contains("Signed in as lou@example.com"),
        "{}",
        page.body
    );
    assert_page_headers(&page);
    let forged = b.post("/logout", &[("csrf", "forged")]).await;
    let refused = b.failed(&forged, "form-expired").await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN);
    let still = b.get(&phone.authorize(&[PROFILE]).url).await;
    assert!(
        still.location().starts_with("/consent?req="),
        "still signed in"
    );

    let csrf = page.hidden("csrf");
    let done = b.post("/logout", &[("csrf", csrf.as_str())]).await;
    assert_eq!(done.location(), "/logout", "303 after the POST");
    assert!(done.header("set-cookie").contains("Max-Age=0"));
    let page = b.follow(&done).await;
    assert!(page.body.contains("Signed out"), "{}", page.body);
    assert_page_headers(&page);
    // The next sign-in link shows the sign-in page again.
    open_login(&mut b, &phone.authorize(&[PROFILE])).await;
    let page = b.get("/logout").await;
    assert!(
        page.body.contains("This browser is not signed in"),
        "{}",
        page.body
    );
}

/// A redirect URI removed from the Application while a user was signing in gets no code: the
/// pending request is checked against the configuration again before the redirect.
#[tokio::test(flavor = "multi_thread")]
async fn a_redirect_uri_removed_during_sign_in_gets_no_code() {
    let env = env().await;
    let phone = app(&env, PHONE_APP, "com.example.app:/cb");
    let mut b = Browser::new(&env);
    let login = open_login(&mut b, &phone.authorize(&[PROFILE])).await;

    edit_manifests(&env, |m| m.replace("\"com.example.app:/cb\", ", ""));
    // Reloaded once the URI is no longer registered.
    wait_reloaded(|| async {
        let page = Browser::new(&env)
            .get(&phone.authorize(&[PROFILE]).url)
            .await;
        page.status == StatusCode::BAD_REQUEST
    })
    .await;

    let consent = sign_up(&mut b, &login, "kim@example.com", PASSWORD).await;
    let r = b
        .submit(&consent, "/consent", &[("decision", "allow")])
        .await;
    let page = b.failed(&r, "unregistered").await;
    assert_eq!(page.status, StatusCode::BAD_REQUEST, "{}", page.body);
    assert!(
        page.body.contains("App no longer registered"),
        "{}",
        page.body
    );
}

/// Refreshing and code exchange follow the configuration: a client id now used by another
/// Subscription does not inherit the old one's refresh tokens or codes, and a scope the Api
/// stopped offering is left out.
#[tokio::test(flavor = "multi_thread")]
async fn refresh_and_codes_follow_the_subscription_and_the_apis_scopes() {
    let env = env().await;
    let phone = app(&env, PHONE_APP, "myapp://callback");
    let first = app(&env, FIRST_PARTY_APP, "myapp://callback");
    let (_, phone_refresh) = user_tokens(&env, &phone, "ivy@example.com", &[PROFILE, ORDERS]).await;
    let (_, first_refresh) =
        user_tokens(&env, &first, "jack@example.com", &[PROFILE, ORDERS]).await;
    // Codes issued before the change, redeemed after it (within their 60 s).
    let (_, phone_code, phone_verifier) =
        new_user(&env, &phone, "kim@example.com", &[PROFILE, ORDERS]).await;
    let (_, first_code, first_verifier) =
        new_user(&env, &first, "lee@example.com", &[PROFILE, ORDERS]).await;

    // A new Subscription takes over the phone app's clientId; the Api drops `orders`.
    let scope_line = format!("      - {{name: {ORDERS}, description: {ORDERS_TEXT}}}\n");
    edit_manifests(&env, |m| {
        assert!(m.contains(&scope_line) && m.contains("name: phone-app-mobile,"));
        m.replace("name: phone-app-mobile,", "name: phone-app-mobile-v2,")
            .replace(&scope_line, "")
    });
    // Reloaded once `orders` is no longer offered.
    wait_scope_dropped(&env, ORDERS).await;

    let r = phone.refresh(&env, &phone_refresh).await;
    assert_eq!(token_error(r), BasicErrorResponseType::InvalidGrant);
    let t = first.refresh(&env, &first_refresh).await.expect("refresh");
    assert_eq!(scopes_of(&t), [PROFILE]);

    let r = phone
        .exchange(&env, &phone_code, Some(&phone_verifier))
        .await;
    let (code, text) = token_error_text(r);
    assert_eq!(code, BasicErrorResponseType::InvalidGrant);
    assert!(
        text.contains("no longer holds this client"),
        "not for its age: {text}"
    );
    let t = first
        .exchange(&env, &first_code, Some(&first_verifier))
        .await;
    let t = t.expect("exchange");
    assert_eq!(scopes_of(&t), [PROFILE]);

    // The Api drops its last scope the grant had: no token whose response would leave `scope`
    // out (which reads as "all you asked for"), and the refresh token is not spent.
    let scope_line = format!("      - {{name: {PROFILE}, description: {PROFILE_TEXT}}}\n");
    let renamed = format!("      - {{name: account, description: {PROFILE_TEXT}}}\n");
    edit_manifests(&env, |m| m.replace(&scope_line, &renamed));
    wait_scope_dropped(&env, PROFILE).await;
    let refresh = t.refresh_token().expect("a refresh token").secret().clone();
    for _ in 0..2 {
        let r = first.refresh(&env, &refresh).await;
        assert_eq!(token_error(r), BasicErrorResponseType::InvalidScope);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn refresh_tokens_rotate_and_reuse_revokes_the_family() {
    let env = env().await;
    let phone = app(&env, PHONE_APP, "myapp://callback");
    let (a1, r1) = user_tokens(&env, &phone, "hank@example.com", &[PROFILE, ORDERS]).await;

    let t2 = phone.refresh(&env, &r1).await.expect("refresh");
    let a2 = t2.access_token().secret().clone();
    let r2 = t2.refresh_token().expect("rotated").secret().clone();
    assert_ne!(a2, a1);
    assert_ne!(r2, r1);
    assert_eq!(scopes_of(&t2), [PROFILE, ORDERS]);
    assert_eq!(call_api(&env, &a2).await.status(), StatusCode::OK);

    // A wider scope is refused, and the refusal does not spend the refresh token.
    let r = phone
        .oauth
        .exchange_refresh_token(&RefreshToken::new(r2.clone()))
        .add_scope(Scope::new("admin".into()))
        .request_async(&env.http)
        .await;
    assert_eq!(token_error(r), BasicErrorResponseType::InvalidScope);
    // A narrower one is fine.
    let t3 = phone
        .oauth
        .exchange_refresh_token(&RefreshToken::new(r2.clone()))
        .add_scope(Scope::new(PROFILE.into()))
        .request_async(&env.http)
        .await
        .expect("narrower refresh");
    assert_eq!(scopes_of(&t3), [PROFILE]);
    let a3 = t3.access_token().secret().clone();
    let r3 = t3.refresh_token().unwrap().secret().clone();
    let echo: Value = call_api(&env, &a3).await.json().await.unwrap();
    assert_eq!(echoed(&echo, "x-authenticated-scope"), PROFILE);
    // Only the access token was narrowed: the new refresh token keeps the grant's scope
    // (RFC 6749 section 6).
    let t4 = phone
        .refresh(&env, &r3)
        .await
        .expect("refresh after narrowing");
    assert_eq!(scopes_of(&t4), [PROFILE, ORDERS]);
    let a4 = t4.access_token().secret().clone();
    let r4 = t4.refresh_token().unwrap().secret().clone();

    // A made-up token with the family's id (the first 22 characters of one of its tokens, as a
    // log might keep them) is unknown: refused, revoking nothing, at both endpoints.
    let forged = format!("{}{}", &r1[..22], "A".repeat(64));
    assert_eq!(
        token_error(phone.refresh(&env, &forged).await),
        BasicErrorResponseType::InvalidGrant
    );
    assert_eq!(revoke(&env, PHONE_APP, &forged).await, StatusCode::OK);
    assert_eq!(call_api(&env, &a4).await.status(), StatusCode::OK);

    // The rotated token comes back: refused, and the whole family is revoked.
    assert_eq!(
        token_error(phone.refresh(&env, &r1).await),
        BasicErrorResponseType::InvalidGrant
    );
    for access in [&a1, &a2, &a3, &a4] {
        assert_token_refused_by_api(&env, access).await;
    }
    assert_eq!(
        token_error(phone.refresh(&env, &r4).await),
        BasicErrorResponseType::InvalidGrant
    );
}

/// The access and refresh token of a token response.
fn pair_of(t: &BasicTokenResponse) -> (String, String) {
    let refresh = t.refresh_token().expect("a refresh token");
    (t.access_token().secret().clone(), refresh.secret().clone())
}

/// With `--refresh-retry-seconds 30`, a refresh whose answer never reached the app (a dropped
/// connection) can be retried with the same token for 30 s: the retry gets a new pair, and the
/// pair in the lost answer stops working. Once the new refresh token is used, the old one is
/// reuse and ends the family; so is a retry after the window, and (below) any second use with
/// the window off, the default. Another client sending a rotated token changes nothing.
#[tokio::test(flavor = "multi_thread")]
async fn a_refresh_can_be_retried_within_its_window_only() {
    let env = env_with(&["--refresh-retry-seconds", "30"]).await;
    let phone = app(&env, PHONE_APP, "myapp://callback");
    let (a0, r0) = user_tokens(&env, &phone, "olga@example.com", &[PROFILE]).await;
    assert_eq!(r0.len(), 86, "a refresh token carries its family, signed");
    let (a1, r1) = pair_of(&phone.refresh(&env, &r0).await.expect("refresh"));
    let (a2, r2) = pair_of(&phone.refresh(&env, &r0).await.expect("the retry"));
    assert_token_refused_by_api(&env, &a1).await;
    for access in [&a0, &a2] {
        assert_eq!(call_api(&env, access).await.status(), StatusCode::OK);
    }
    let (a3, r3) = pair_of(&phone.refresh(&env, &r2).await.expect("refresh"));
    // r0 and r2 are rotated now: another client sending one is refused and ends nothing.
    let thief = app(&env, FIRST_PARTY_APP, "myapp://callback");
    for rotated in [&r0, &r2] {
        assert_eq!(
            token_error(thief.refresh(&env, rotated).await),
            BasicErrorResponseType::InvalidGrant
        );
    }
    assert_eq!(call_api(&env, &a3).await.status(), StatusCode::OK);
    assert_eq!(
        token_error(phone.refresh(&env, &r0).await),
        BasicErrorResponseType::InvalidGrant,
        "a retry after the new token was used"
    );
    for access in [&a0, &a2, &a3] {
        assert_token_refused_by_api(&env, access).await;
    }
    for refresh in [&r1, &r3] {
        assert_eq!(
            token_error(phone.refresh(&env, refresh).await),
            BasicErrorResponseType::InvalidGrant
        );
    }

    // The lost answer's refresh token, if it arrived after all, is reuse once the retry took
    // its place (window still 30 s).
    let (_, r0) = user_tokens(&env, &phone, "oscar@example.com", &[PROFILE]).await;
    let (_, r1) = pair_of(&phone.refresh(&env, &r0).await.expect("refresh"));
    let (a2, _) = pair_of(&phone.refresh(&env, &r0).await.expect("the retry"));
    assert_eq!(
        token_error(phone.refresh(&env, &r1).await),
        BasicErrorResponseType::InvalidGrant
    );
    assert_token_refused_by_api(&env, &a2).await;

    // Two uses at once: whichever way they interleave, at most one answered pair works.
    for round in 0..4 {
        let (_, r0) = user_tokens(&env, &phone, &format!("otto{round}@example.com"), &[]).await;
        let (t1, t2) = tokio::join!(phone.refresh(&env, &r0), phone.refresh(&env, &r0));
        let mut working = 0;
        for t in [t1, t2].iter().filter_map(|t| t.as_ref().ok()) {
            if call_api(&env, t.access_token().secret()).await.status() == StatusCode::OK {
                working += 1;
            }
        }
        assert!(working <= 1, "round {round}: two pairs work");
    }

    // A window of 1 s: a retry 2 s later is reuse. With none (the default), at once.
    for (flags, wait) in [(&["--refresh-retry-seconds", "1"][..], 2), (&[][..], 0)] {
        let env = env_with(flags).await;
        let phone = app(&env, PHONE_APP, "myapp://callback");
        let (a0, r0) = user_tokens(&env, &phone, "olga@example.com", &[PROFILE]).await;
        let (a1, _) = pair_of(&phone.refresh(&env, &r0).await.expect("refresh"));
        tokio::time::sleep(Duration::from_secs(wait)).await;
        assert_eq!(
            token_error(phone.refresh(&env, &r0).await),
            BasicErrorResponseType::InvalidGrant,
            "{flags:?}"
        );
        for access in [&a0, &a1] {
            assert_token_refused_by_api(&env, access).await;
        }
    }
}

/// Revoking the refresh token `revoked` (of PHONE_APP): another client's request answers 200
/// and changes nothing; PHONE_APP's own ends the family, so the API refuses `access` and the
/// token endpoint refuses `refresh`.
async fn revoked_by_its_client_only(
    env: &Env,
    phone: &App,
    revoked: &str,
    access: &str,
    refresh: &str,
) {
    assert_eq!(revoke(env, FIRST_PARTY_APP, revoked).await, StatusCode::OK);
    assert_eq!(call_api(env, access).await.status(), StatusCode::OK);
    assert_eq!(revoke(env, PHONE_APP, revoked).await, StatusCode::OK);
    assert_token_refused_by_api(env, access).await;
    assert_eq!(
        token_error(phone.refresh(env, refresh).await),
        BasicErrorResponseType::InvalidGrant
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn revoking_a_refresh_token_revokes_its_access_tokens() {
    let env = env().await;
    let phone = app(&env, PHONE_APP, "myapp://callback");
    let (mut b, code, verifier) = new_user(&env, &phone, "ivan@example.com", &[PROFILE]).await;
    let (access, refresh) = phone.tokens(&env, &code, &verifier).await;
    assert_eq!(call_api(&env, &access).await.status(), StatusCode::OK);

    revoked_by_its_client_only(&env, &phone, &refresh, &access, &refresh).await;

    // Revoking an access token.
    let (code, verifier) = code_again(&mut b, &phone, &[PROFILE]).await;
    let (access, _) = phone.tokens(&env, &code, &verifier).await;
    assert_eq!(revoke(&env, PHONE_APP, &access).await, StatusCode::OK);
    assert_token_refused_by_api(&env, &access).await;

    // A refresh token already rotated (a sign-out racing a background refresh, or a stolen
    // token refreshed by someone else): revoking it ends its family, the newer tokens too.
    // Another client's attempt changes nothing.
    let (code, verifier) = code_again(&mut b, &phone, &[PROFILE]).await;
    let (_, r1) = phone.tokens(&env, &code, &verifier).await;
    let t2 = phone.refresh(&env, &r1).await.expect("refresh");
    let (a2, r2) = (
        t2.access_token().secret().clone(),
        t2.refresh_token().expect("rotated").secret().clone(),
    );
    revoked_by_its_client_only(&env, &phone, &r1, &a2, &r2).await;

    // Unknown tokens: 200.
    assert_eq!(
        revoke(&env, PHONE_APP, "no-such-token").await,
        StatusCode::OK
    );
    assert_eq!(
        revoke(
            &env,
            PHONE_APP,
            PkceCodeChallenge::new_random_sha256().1.secret()
        )
        .await,
        StatusCode::OK
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn introspection_is_for_confidential_clients_of_the_api() {
    let env = env().await;
    let phone = app(&env, PHONE_APP, "myapp://callback");
    let (access, refresh) = user_tokens(&env, &phone, "judy@example.com", &[PROFILE]).await;
    let (_, info) = userinfo(&env, Some(&access)).await;

    let v = introspect(&env, &access).await;
    assert_eq!(v["active"], true, "{v}");
    assert_eq!(v["sub"], info["sub"]);
    assert_eq!(v["scope"], PROFILE);
    assert_eq!(v["client_id"], PHONE_APP);
    assert_eq!(v["token_type"], "Bearer");
    assert_eq!(v["iss"], env.issuer.as_str());
    let (iat, exp) = (v["iat"].as_u64().unwrap(), v["exp"].as_u64().unwrap());
    assert_eq!(exp - iat, ACCESS_TTL);

    // A public client may not introspect (not even its own token); nor a wrong secret.
    let (status, _, body) = post_form(
        &env,
        "/oauth2/introspect",
        None,
        &[("client_id", PHONE_APP), ("token", access.as_str())],
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body["error"], "invalid_client");
    let (status, _, body) = post_form(
        &env,
        "/oauth2/introspect",
        Some((BACKEND_APP, "not-the-secret-0123456789")),
        &[("token", access.as_str())],
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body["error"], "invalid_client");

    // After revocation, and for unknown tokens: exactly {"active":false}.
    assert_eq!(revoke(&env, PHONE_APP, &refresh).await, StatusCode::OK);
    assert_eq!(introspect(&env, &access).await, json!({"active": false}));
    assert_eq!(introspect(&env, &refresh).await, json!({"active": false}));
    assert_eq!(introspect(&env, "unknown").await, json!({"active": false}));
}

#[tokio::test(flavor = "multi_thread")]
async fn userinfo_and_metadata() {
    let env = env().await;

    let r = env
        .http
        .get(env.gw.url("/.well-known/oauth-authorization-server"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let m: Value = r.json().await.unwrap();
    let iss = env.issuer.as_str();
    assert_eq!(m["issuer"], iss);
    for (key, path) in [
        ("authorization_endpoint", "/oauth2/authorize"),
        ("token_endpoint", "/oauth2/token"),
        ("revocation_endpoint", "/oauth2/revoke"),
        ("introspection_endpoint", "/oauth2/introspect"),
        ("userinfo_endpoint", "/oauth2/userinfo"),
    ] {
        assert_eq!(m[key], format!("{iss}{path}"), "{key}");
    }
    assert_eq!(m["code_challenge_methods_supported"], json!(["S256"]));
    assert_eq!(m["response_types_supported"], json!(["code"]));
    let grants: Vec<&str> = m["grant_types_supported"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g.as_str().unwrap())
        .collect();
    assert!(grants.contains(&"authorization_code") && grants.contains(&"refresh_token"));
    assert!(!grants.contains(&"implicit") && !grants.contains(&"password"));
    assert_eq!(m["authorization_response_iss_parameter_supported"], true);
    let scopes = m["scopes_supported"].as_array().unwrap();
    assert!(scopes.contains(&json!(PROFILE)) && scopes.contains(&json!(ORDERS)));

    // userinfo: a user's token answers; no token, a service token or garbage do not.
    let phone = app(&env, PHONE_APP, "myapp://callback");
    let (access, _) = user_tokens(&env, &phone, "Kate@Example.com", &[PROFILE]).await;
    let (status, info) = userinfo(&env, Some(&access)).await;
    assert_eq!(status, StatusCode::OK);
    assert!(is_uuid(info["sub"].as_str().unwrap()), "{info}");
    assert_eq!(info["email"], "kate@example.com");
    assert_eq!(info.as_object().unwrap().len(), 2, "{info}");

    assert_eq!(userinfo(&env, None).await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(
        userinfo(&env, Some("garbage")).await.0,
        StatusCode::UNAUTHORIZED
    );
    let (status, _, svc) = post_form(
        &env,
        "/oauth2/token",
        Some((BACKEND_APP, BACKEND_SECRET)),
        &[("grant_type", "client_credentials"), ("scope", PROFILE)],
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{svc}");
    let (status, body) = userinfo(&env, svc["access_token"].as_str()).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_issuer_flag_sets_iss_metadata_and_secure_cookies() {
    let env = env_with(&["--issuer", "https://login.example.test/"]).await;
    assert_eq!(env.issuer, "https://login.example.test");
    let m: Value = env
        .http
        .get(env.gw.url("/.well-known/oauth-authorization-server"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(m["issuer"], "https://login.example.test");
    assert_eq!(
        m["token_endpoint"],
        "https://login.example.test/oauth2/token"
    );

    let phone = app(&env, PHONE_APP, "myapp://callback");
    let mut b = Browser::new(&env);
    let authz = phone.authorize(&[PROFILE]);
    let login = open_login(&mut b, &authz).await;
    let cookie = login.session_cookie().unwrap();
    assert!(
        flow::set_cookie_attributes(cookie).contains(&"Secure"),
        "{cookie}"
    );
    // __Host-: only this origin, over https, can set it (no sibling domain, no other Path).
    assert!(cookie.starts_with("__Host-gatehouse_session="), "{cookie}");
    assert!(flow::set_cookie_attributes(cookie).contains(&"Path=/"));
    // An error response carries this iss too.
    let page = b.get(&authz.url.replace("S256", "plain")).await;
    callback(&page, "myapp://callback").error(&env, &authz.state, "invalid_request");

    // Signed in, the session answers to its __Host- name only, and only when it comes once.
    sign_up(&mut b, &login, "ursula@example.com", PASSWORD).await;
    let sid = b.session.clone().unwrap();
    let planted = tokens_like_sid();
    for (cookie, signed_in) in [
        (format!("__Host-gatehouse_session={sid}"), true),
        (format!("gatehouse_session={sid}"), false),
        // Either order: the browser sends the one with the longer Path first.
        (
            format!("__Host-gatehouse_session={planted}; __Host-gatehouse_session={sid}"),
            false,
        ),
        (
            format!("__Host-gatehouse_session={sid}; __Host-gatehouse_session={planted}"),
            false,
        ),
    ] {
        let page = env
            .http
            .get(env.gw.url("/logout"))
            .header(header::COOKIE, &cookie)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert_eq!(
            page.contains("Signed in as ursula@example.com"),
            signed_in,
            "{cookie}"
        );
    }
}

/// A well-formed session id that names no session.
fn tokens_like_sid() -> String {
    "A".repeat(43)
}

#[tokio::test(flavor = "multi_thread")]
async fn forms_need_the_csrf_token_and_pages_carry_security_headers() {
    let env = env().await;
    let phone = app(&env, PHONE_APP, "myapp://callback");
    let (mut other, _, _) = new_user(&env, &phone, "leo@example.com", &[PROFILE]).await;

    let mut b = Browser::new(&env);
    let authz = phone.authorize(&[PROFILE, ORDERS]);
    let login = open_login(&mut b, &authz).await;
    assert_page_headers(&login);
    let cookie = login.session_cookie().unwrap().to_string();
    let attrs = flow::set_cookie_attributes(&cookie);
    for a in ["HttpOnly", "SameSite=Lax", "Path=/"] {
        assert!(attrs.contains(&a), "{cookie}");
    }
    assert!(!attrs.contains(&"Secure"), "http issuer: {cookie}");
    let sid = b.session.clone();
    let req = login.hidden("req");

    // Right credentials, missing or foreign CSRF token: 403, no new session, no flash.
    let foreign = other.get(&phone.authorize(&[ORDERS]).url).await;
    let foreign = other.follow(&foreign).await; // a consent page of another session
    for csrf in [None, Some(foreign.hidden("csrf")), Some("x".repeat(43))] {
        let mut fields = vec![
            ("req", req.as_str()),
            ("email", "leo@example.com"),
            ("password", PASSWORD),
        ];
        if let Some(c) = &csrf {
            fields.push(("csrf", c.as_str()));
        }
        let r = b.post("/login", &fields).await;
        assert!(r.session_cookie().is_none(), "csrf {csrf:?}");
        let page = b.failed(&r, "form-expired").await;
        assert_eq!(page.status, StatusCode::FORBIDDEN, "csrf {csrf:?}");
    }
    assert_eq!(b.session, sid);
    let consent = b.get(&format!("/consent?req={req}")).await;
    assert_eq!(consent.status, StatusCode::FORBIDDEN, "still not signed in");
    let again = b.get(&format!("/login?req={req}")).await;
    assert_eq!(again.status, StatusCode::OK);
    assert_eq!(again.alert(), None);

    // Signup without the token either.
    let r = b
        .post(
            "/signup",
            &[
                ("req", req.as_str()),
                ("email", "mallory@example.com"),
                ("password", PASSWORD),
            ],
        )
        .await;
    assert_eq!(
        b.failed(&r, "form-expired").await.status,
        StatusCode::FORBIDDEN
    );

    // With it: signed in under a new session id; the consent page has the headers too.
    let r = log_in(&mut b, &again, "leo@example.com", PASSWORD).await;
    assert!(r.location().starts_with("/consent?req="));
    assert_ne!(b.session, sid);
    let consent = b.follow(&r).await;
    assert_eq!(consent.status, StatusCode::OK);
    assert_page_headers(&consent);

    // The consent form needs it as well: no redirect to the app without it.
    let r = b
        .post("/consent", &[("req", req.as_str()), ("decision", "allow")])
        .await;
    assert_eq!(
        b.failed(&r, "form-expired").await.status,
        StatusCode::FORBIDDEN
    );
    let foreign_csrf = foreign.hidden("csrf");
    let r = b
        .post(
            "/consent",
            &[
                ("req", req.as_str()),
                ("decision", "allow"),
                ("csrf", foreign_csrf.as_str()),
            ],
        )
        .await;
    assert_eq!(
        b.failed(&r, "form-expired").await.status,
        StatusCode::FORBIDDEN
    );
    let done = decide(&mut b, &consent, "allow").await;
    let code = callback(&done, "myapp://callback").code(&env, &authz.state);

    // Token responses, success and error: no-store.
    let form = [
        ("grant_type", "authorization_code"),
        ("client_id", PHONE_APP),
        ("code", code.as_str()),
        ("redirect_uri", "myapp://callback"),
        ("code_verifier", authz.verifier.as_str()),
    ];
    for expected in [StatusCode::OK, StatusCode::BAD_REQUEST] {
        let (status, headers, body) = post_form(&env, "/oauth2/token", None, &form).await;
        assert_eq!(status, expected, "{body}");
        assert_eq!(headers[header::CACHE_CONTROL], "no-store");
        if status == StatusCode::OK {
            assert_eq!(body["token_type"], "Bearer");
            assert_eq!(body["expires_in"], ACCESS_TTL);
            assert_eq!(body["scope"], "profile orders");
            assert!(body["refresh_token"].is_string());
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_email_and_wrong_password_look_the_same() {
    let env = env().await;
    let phone = app(&env, PHONE_APP, "myapp://callback");
    let email = "mia@example.com";

    // Signing in before the account exists...
    let mut b1 = Browser::new(&env);
    let login = open_login(&mut b1, &phone.authorize(&[PROFILE])).await;
    let unknown = log_in(&mut b1, &login, email, OTHER_PASSWORD).await;
    let unknown_page = b1.follow(&unknown).await;

    // ... and with a wrong password once it does.
    new_user(&env, &phone, email, &[PROFILE]).await;
    let mut b2 = Browser::new(&env);
    let login = open_login(&mut b2, &phone.authorize(&[PROFILE])).await;
    let wrong = log_in(&mut b2, &login, email, OTHER_PASSWORD).await;
    let wrong_page = b2.follow(&wrong).await;

    let strip_req = |l: &str| l.split_once("?req=").unwrap().0.to_string();
    assert_eq!(strip_req(unknown.location()), "/login");
    assert_eq!(strip_req(wrong.location()), "/login");
    assert_eq!(unknown.body, wrong.body);
    assert!(unknown.session_cookie().is_none() && wrong.session_cookie().is_none());
    assert_eq!(unknown_page.status, StatusCode::OK);
    assert_eq!(wrong_page.status, StatusCode::OK);
    assert_eq!(unknown_page.alert().as_deref(), Some(BAD_CREDENTIALS));
    assert_eq!(
        flow::without_form_tokens(&unknown_page.body),
        flow::without_form_tokens(&wrong_page.body)
    );
    let mut h1 = unknown_page.headers.clone();
    let mut h2 = wrong_page.headers.clone();
    for h in [&mut h1, &mut h2] {
        h.remove(header::DATE);
    }
    assert_eq!(h1, h2);
}

#[tokio::test(flavor = "multi_thread")]
async fn failed_logins_are_throttled_per_account() {
    let env = env().await;
    let phone = app(&env, PHONE_APP, "myapp://callback");
    new_user(&env, &phone, "nina@example.com", &[PROFILE]).await;
    new_user(&env, &phone, "oscar@example.com", &[PROFILE]).await;

    let mut b = Browser::new(&env);
    let page = open_login(&mut b, &phone.authorize(&[PROFILE])).await;
    let mut page = fail_five(&mut b, page, "nina@example.com").await;
    // Sixth wrong attempt, then even the right password: throttled, not signed in.
    for password in [OTHER_PASSWORD, PASSWORD] {
        let r = log_in(&mut b, &page, "nina@example.com", password).await;
        assert!(r.location().starts_with("/login?req="), "{password}");
        assert!(r.session_cookie().is_none());
        page = b.follow(&r).await;
        let alert = page.alert().unwrap_or_default();
        assert!(alert.starts_with(THROTTLED), "{alert}");
    }
    // Per account: another account signs in from the same address.
    let r = log_in(&mut b, &page, "oscar@example.com", PASSWORD).await;
    assert!(
        r.location().starts_with("/consent?req="),
        "{}",
        r.location()
    );
}

/// Others' failures lock an account out of new browsers only: a browser on which the account
/// signed in before has its own failure count (OWASP's device cookies), so whoever knows an
/// email cannot keep its owner out. The device counts only for its own account, and its own
/// failures throttle it.
#[tokio::test(flavor = "multi_thread")]
async fn a_known_browser_is_not_locked_out_by_others_failures() {
    let env = env().await;
    let phone = app(&env, PHONE_APP, "myapp://callback");
    new_user(&env, &phone, "nina@example.com", &[PROFILE]).await;
    new_user(&env, &phone, "oscar@example.com", &[PROFILE]).await;

    // Nina signs in on her phone's browser once: it becomes a known device of her account.
    let mut owner = Browser::new(&env);
    let login = open_login(&mut owner, &phone.authorize(&[PROFILE])).await;
    let r = log_in(&mut owner, &login, "nina@example.com", PASSWORD).await;
    assert!(
        r.location().starts_with("/consent?req="),
        "{}",
        r.location()
    );
    let device = owner
        .device
        .clone()
        .expect("a device cookie after signing in");
    let set = r
        .headers
        .get_all(header::SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|c| c.contains(&device))
        .unwrap();
    for attribute in ["HttpOnly", "SameSite=Lax", "Path=/"] {
        assert!(
            flow::set_cookie_attributes(set).contains(&attribute),
            "{set}"
        );
    }
    owner.end_session();

    // Someone else uses up both accounts' attempts from a browser of their own.
    let mut other = Browser::new(&env);
    let mut page = open_login(&mut other, &phone.authorize(&[PROFILE])).await;
    for email in ["nina@example.com", "oscar@example.com"] {
        page = fail_five(&mut other, page, email).await;
        page = refused_as_throttled(&mut other, &page, email).await;
    }
    // A browser that signed in as someone else is a new browser to Nina's account, and the
    // device changes nothing for another account.
    let page = open_login(&mut owner, &phone.authorize(&[PROFILE])).await;
    let page = refused_as_throttled(&mut owner, &page, "oscar@example.com").await;
    // Nina's own browser still signs her in, and gets a new device cookie.
    let r = log_in(&mut owner, &page, "nina@example.com", PASSWORD).await;
    assert!(
        r.location().starts_with("/consent?req="),
        "{}",
        r.location()
    );
    assert!(owner.device.is_some() && owner.device.as_deref() != Some(device.as_str()));
    owner.end_session();
    // A copy of the cookie it had before is worth nothing now.
    let mut copy = Browser::new(&env);
    copy.device = Some(device.clone());
    let page = open_login(&mut copy, &phone.authorize(&[PROFILE])).await;
    refused_as_throttled(&mut copy, &page, "nina@example.com").await;

    // The device's own failures: five, then throttled there too.
    let page = open_login(&mut owner, &phone.authorize(&[PROFILE])).await;
    let page = fail_five(&mut owner, page, "nina@example.com").await;
    refused_as_throttled(&mut owner, &page, "nina@example.com").await;
}

/// Five wrong passwords for `email` from `b`, starting on the login `page`: each answered as a
/// wrong password (nothing throttled yet). The page after the last.
async fn fail_five(b: &mut Browser<'_>, mut page: Page, email: &str) -> Page {
    for attempt in 1..=5 {
        let r = log_in(b, &page, email, OTHER_PASSWORD).await;
        assert!(r.location().starts_with("/login?req="), "{attempt}");
        page = b.follow(&r).await;
        assert_eq!(
            page.alert().as_deref(),
            Some(BAD_CREDENTIALS),
            "{email}, attempt {attempt}"
        );
    }
    page
}

/// The right password for `email` from the login `page`, refused by the throttle: no session,
/// the throttle's message. The page it shows.
async fn refused_as_throttled(b: &mut Browser<'_>, page: &Page, email: &str) -> Page {
    let r = log_in(b, page, email, PASSWORD).await;
    assert!(r.location().starts_with("/login?req="), "{email}");
    assert!(r.session_cookie().is_none(), "{email}");
    let page = b.follow(&r).await;
    let alert = page.alert().unwrap_or_default();
    assert!(alert.starts_with(THROTTLED), "{email}: {alert}");
    page
}

/// An account remembers its ten most recent browsers: signing in on an eleventh forgets the
/// oldest (the store holds at most ten device records per account, however often someone signs
/// in to their own account), and a browser signing in again becomes the most recent.
#[tokio::test(flavor = "multi_thread")]
async fn an_account_remembers_its_ten_latest_browsers() {
    let env = env().await;
    let phone = app(&env, PHONE_APP, "myapp://callback");
    let email = "paula@example.com";
    new_user(&env, &phone, email, &[PROFILE]).await;
    let mut browsers: Vec<Browser> = Vec::new();
    for i in 0..11 {
        let mut b = Browser::new(&env);
        let login = open_login(&mut b, &phone.authorize(&[PROFILE])).await;
        let r = log_in(&mut b, &login, email, PASSWORD).await;
        assert!(
            r.location().starts_with("/consent?req="),
            "{i}: {}",
            r.location()
        );
        assert!(b.device.is_some(), "{i}");
        b.end_session();
        browsers.push(b);
        if i == 5 {
            // The first browser signs in again halfway: it becomes the most recent. With the
            // browser new_user signed up on, that leaves twelve, of which the signup browser
            // and the second one are the oldest two.
            let b = &mut browsers[0];
            let login = open_login(b, &phone.authorize(&[PROFILE])).await;
            let r = log_in(b, &login, email, PASSWORD).await;
            assert!(
                r.location().starts_with("/consent?req="),
                "{}",
                r.location()
            );
            b.end_session();
        }
    }
    // Lock the account for new browsers.
    let mut other = Browser::new(&env);
    let page = open_login(&mut other, &phone.authorize(&[PROFILE])).await;
    fail_five(&mut other, page, email).await;
    let (first, rest) = browsers.split_at_mut(1);
    assert!(
        signs_in(&mut first[0], &phone, email).await,
        "the first browser, signed in again, was forgotten"
    );
    assert!(
        !signs_in(&mut rest[0], &phone, email).await,
        "the oldest two of twelve are still known devices"
    );
    for (i, b) in rest.iter_mut().enumerate().skip(1) {
        assert!(
            signs_in(b, &phone, email).await,
            "browser {} was forgotten",
            i + 2
        );
    }
}

/// Whether `b` signs in to `email` with the right password (its session then ends).
async fn signs_in(b: &mut Browser<'_>, phone: &App, email: &str) -> bool {
    let login = open_login(b, &phone.authorize(&[PROFILE])).await;
    let r = log_in(b, &login, email, PASSWORD).await;
    b.end_session();
    r.location().starts_with("/consent?req=")
}

/// `--max-token-grants-per-minute`: grants per client and user (per client for
/// client_credentials) on a replica. Over it the token endpoint answers 429 `slow_down` with
/// Retry-After, before anything is stored or spent: the refused refresh token still works.
#[tokio::test(flavor = "multi_thread")]
async fn token_grants_are_limited_per_client_and_user() {
    let env = env_with(&["--max-token-grants-per-minute", "4"]).await;
    let phone = app(&env, PHONE_APP, "myapp://callback");
    let (_, code, verifier) = new_user(&env, &phone, "quinn@example.com", &[PROFILE]).await;
    // Grant 1 is the code exchange, 2-4 refreshes.
    let (_, mut refresh) = phone.tokens(&env, &code, &verifier).await;
    for i in 2..=4 {
        let t = phone
            .refresh(&env, &refresh)
            .await
            .unwrap_or_else(|e| panic!("grant {i}: {e:?}"));
        refresh = t.refresh_token().expect("rotated").secret().clone();
    }
    let (status, headers, body) = post_form(
        &env,
        "/oauth2/token",
        None,
        &[
            ("grant_type", "refresh_token"),
            ("refresh_token", &refresh),
            ("client_id", PHONE_APP),
        ],
    )
    .await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert_eq!(body["error"], "slow_down", "{body}");
    assert_eq!(headers[header::CACHE_CONTROL], "no-store");
    let wait: u64 = headers[header::RETRY_AFTER]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=15).contains(&wait), "Retry-After {wait}");
    assert_eq!(
        introspect(&env, &refresh).await["active"],
        true,
        "the refused refresh token was spent"
    );
    // Another user of the same app is counted apart.
    let (_, code, verifier) = new_user(&env, &phone, "rosa@example.com", &[PROFILE]).await;
    phone.tokens(&env, &code, &verifier).await;

    // client_credentials: per client.
    let cc = [("grant_type", "client_credentials")];
    for i in 1..=4 {
        let (status, _, body) = post_form(
            &env,
            "/oauth2/token",
            Some((BACKEND_APP, BACKEND_SECRET)),
            &cc,
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{i}: {body}");
    }
    let (status, headers, body) = post_form(
        &env,
        "/oauth2/token",
        Some((BACKEND_APP, BACKEND_SECRET)),
        &cc,
    )
    .await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert_eq!(body["error"], "slow_down");
    assert!(headers.contains_key(header::RETRY_AFTER));
}

/// Behind an ingress every request comes from the ingress's address. With that address in
/// `--trusted-proxies`, the per-address failure limit counts per client as X-Forwarded-For names
/// it: one client's 20 failures lock out that client, not everybody behind the same ingress.
#[tokio::test(flavor = "multi_thread")]
async fn behind_a_trusted_proxy_failed_logins_count_per_forwarded_client() {
    let env = env_with(&["--trusted-proxies", "127.0.0.0/8"]).await;
    let phone = app(&env, PHONE_APP, "myapp://callback");
    new_user(&env, &phone, "rita@example.com", &[PROFILE]).await;

    let mut attacker = Browser::behind_proxy_as(&env, "203.0.113.66");
    let mut page = open_login(&mut attacker, &phone.authorize(&[PROFILE])).await;
    // Twenty failures spread over five accounts (four each: under the per-account limit).
    for i in 0..20 {
        let email = format!("guess{}@example.com", i % 5);
        let r = log_in(&mut attacker, &page, &email, OTHER_PASSWORD).await;
        page = attacker.follow(&r).await;
        assert_eq!(page.alert().as_deref(), Some(BAD_CREDENTIALS), "{i}");
    }
    // That client is now throttled, also on a fresh account.
    let r = log_in(&mut attacker, &page, "guess9@example.com", OTHER_PASSWORD).await;
    let alert = attacker.follow(&r).await.alert().unwrap_or_default();
    assert!(alert.starts_with(THROTTLED), "{alert}");

    // Another client behind the same proxy signs in.
    let mut user = Browser::behind_proxy_as(&env, "198.51.100.7");
    let login = open_login(&mut user, &phone.authorize(&[PROFILE])).await;
    let r = log_in(&mut user, &login, "rita@example.com", PASSWORD).await;
    assert!(
        r.location().starts_with("/consent?req="),
        "{}",
        r.location()
    );
}

/// An address over its failure limit is refused before any account is counted, so a script
/// cannot park a 15-minute counter per made-up email at full speed (no Argon2 runs for it).
/// Redis mode, where the counters can be listed.
#[tokio::test(flavor = "multi_thread")]
async fn a_throttled_address_counts_no_accounts() {
    let redis = tokio::task::block_in_place(gatehouse_tests::redis::RedisServer::start);
    let url = redis.url();
    let env = env_with(&["--trusted-proxies", "127.0.0.0/8", "--redis", &url]).await;
    let account_counters = || -> Vec<String> {
        let out = std::process::Command::new("redis-cli")
            .args(["-p", &redis.port.to_string(), "--scan", "--pattern"])
            .arg("*throttle:login:acct:*")
            .output()
            .expect("redis-cli");
        let mut keys: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect();
        keys.sort();
        keys
    };
    let phone = app(&env, PHONE_APP, "myapp://callback");
    let mut attacker = Browser::behind_proxy_as(&env, "203.0.113.66");
    let mut page = open_login(&mut attacker, &phone.authorize(&[PROFILE])).await;
    for i in 0..20 {
        let email = format!("guess{}@example.com", i % 5);
        let r = log_in(&mut attacker, &page, &email, OTHER_PASSWORD).await;
        page = attacker.follow(&r).await;
        assert_eq!(page.alert().as_deref(), Some(BAD_CREDENTIALS), "{i}");
    }
    let counted = account_counters();
    assert_eq!(counted.len(), 5, "{counted:?}");
    for i in 0..10 {
        let r = log_in(
            &mut attacker,
            &page,
            &format!("new{i}@example.com"),
            OTHER_PASSWORD,
        )
        .await;
        page = attacker.follow(&r).await;
        let alert = page.alert().unwrap_or_default();
        assert!(alert.starts_with(THROTTLED), "{alert}");
    }
    assert_eq!(account_counters(), counted);
}

#[tokio::test(flavor = "multi_thread")]
async fn one_address_cannot_park_sign_in_requests_without_limit() {
    let env = env_with(&[
        "--trusted-proxies",
        "127.0.0.0/8",
        "--max-sign-in-starts-per-minute",
        "3",
    ])
    .await;
    let phone = app(&env, PHONE_APP, "myapp://callback");
    // Someone on that network signs up (one of the address's three).
    let mut neighbour = Browser::behind_proxy_as(&env, "203.0.113.9");
    let login = open_login(&mut neighbour, &phone.authorize(&[PROFILE])).await;
    sign_up(&mut neighbour, &login, "otto@example.com", PASSWORD).await;
    // A script with the app's public client id, no cookies: each request would store a new
    // session and a pending request for ten minutes.
    for _ in 0..2 {
        let mut b = Browser::behind_proxy_as(&env, "203.0.113.9");
        open_login(&mut b, &phone.authorize(&[PROFILE])).await;
    }
    let mut b = Browser::behind_proxy_as(&env, "203.0.113.9");
    let authz = phone.authorize_with(&[PROFILE], || CsrfToken::new("st-9".into()));
    let page = b.get(&authz.url).await;
    assert_eq!(page.status, StatusCode::SEE_OTHER, "{}", page.body);
    callback(&page, "myapp://callback").error(&env, "st-9", "temporarily_unavailable");
    assert!(page.session_cookie().is_none(), "no session was created");
    // The signed-in neighbour counts as its user, not as the exhausted address.
    let again = neighbour.get(&phone.authorize(&[PROFILE]).url).await;
    assert!(
        again.location().starts_with("/consent?req="),
        "{} {}",
        again.status,
        again.location()
    );
    // Someone else, behind the same proxy, signs up and in as usual.
    let mut user = Browser::behind_proxy_as(&env, "198.51.100.8");
    let login = open_login(&mut user, &phone.authorize(&[PROFILE])).await;
    let after = sign_up(&mut user, &login, "nora@example.com", PASSWORD).await;
    assert_eq!(after.status, StatusCode::OK, "{}", after.body);
    assert!(after.body.contains("action=\"/consent\""), "{}", after.body);
    let metrics = env.gw.metrics().await;
    assert!(
        metrics
            .lines()
            .any(|l| l == "gatehouse_authorize_throttled_total 1"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn parallel_guesses_get_no_more_tries_than_sequential_ones() {
    let env = env().await;
    let phone = app(&env, PHONE_APP, "myapp://callback");
    new_user(&env, &phone, "paula@example.com", &[PROFILE]).await;
    // Twelve browsers post a wrong password for one account at the same moment: the password
    // checks queue on the hashing pool, so every post is in flight before any has failed.
    let mut browsers: Vec<Browser> = (0..12).map(|_| Browser::new(&env)).collect();
    let mut pages = Vec::new();
    for b in &mut browsers {
        pages.push(open_login(b, &phone.authorize(&[PROFILE])).await);
    }
    let answers = futures_util::future::join_all(browsers.iter_mut().zip(&pages).map(
        |(b, page)| async move {
            let r = log_in(b, page, "paula@example.com", OTHER_PASSWORD).await;
            b.follow(&r).await.alert().unwrap_or_default()
        },
    ))
    .await;
    let checked = answers.iter().filter(|a| *a == BAD_CREDENTIALS).count();
    let throttled = answers.iter().filter(|a| a.starts_with(THROTTLED)).count();
    assert_eq!((checked, throttled), (5, 7), "{answers:?}");
    // The account is now locked for the window, even for the right password.
    let b = &mut browsers[0];
    let page = open_login(b, &phone.authorize(&[PROFILE])).await;
    let r = log_in(b, &page, "paula@example.com", PASSWORD).await;
    assert!(r.session_cookie().is_none());
    assert!(
        b.follow(&r)
            .await
            .alert()
            .unwrap_or_default()
            .starts_with(THROTTLED)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn signing_in_does_not_use_up_the_failure_allowance() {
    let env = env().await;
    let phone = app(&env, PHONE_APP, "myapp://callback");
    new_user(&env, &phone, "quinn@example.com", &[PROFILE]).await;
    // Four failures, then many successful sign-ins (same address, same account), then four
    // more failures: still not throttled, because a correct password takes its count back.
    let mut b = Browser::new(&env);
    let mut page = open_login(&mut b, &phone.authorize(&[PROFILE])).await;
    for _ in 0..4 {
        let r = log_in(&mut b, &page, "quinn@example.com", OTHER_PASSWORD).await;
        page = b.follow(&r).await;
        assert_eq!(page.alert().as_deref(), Some(BAD_CREDENTIALS));
    }
    for _ in 0..25 {
        let mut ok = Browser::new(&env);
        let login = open_login(&mut ok, &phone.authorize(&[PROFILE])).await;
        let r = log_in(&mut ok, &login, "quinn@example.com", PASSWORD).await;
        assert!(
            r.location().starts_with("/consent?req="),
            "{}",
            r.location()
        );
    }
    let r = log_in(&mut b, &page, "quinn@example.com", OTHER_PASSWORD).await;
    page = b.follow(&r).await;
    assert_eq!(page.alert().as_deref(), Some(BAD_CREDENTIALS));
}

#[tokio::test(flavor = "multi_thread")]
async fn signup_refuses_weak_passwords_and_taken_emails() {
    let env = env().await;
    let phone = app(&env, PHONE_APP, "myapp://callback");
    let mut b = Browser::new(&env);
    let login = open_login(&mut b, &phone.authorize(&[PROFILE])).await;
    let mut page = b.get(&format!("/signup?req={}", login.hidden("req"))).await;
    for weak in ["short pass", "password1234", "qwertyuiopasdf"] {
        let r = b
            .submit(
                &page,
                "/signup",
                &[("email", "pat@example.com"), ("password", weak)],
            )
            .await;
        assert!(r.location().starts_with("/signup?req="), "{weak}");
        page = b.follow(&r).await;
        assert!(page.alert().is_some(), "{weak}: {}", page.body);
    }
    // 64 characters and more are allowed.
    let long = "correct horse battery staple ".repeat(3);
    assert!(long.len() > 64);
    let r = b
        .submit(
            &page,
            "/signup",
            &[("email", "pat@example.com"), ("password", long.as_str())],
        )
        .await;
    assert!(r.location().starts_with("/consent?req="));

    // The email is taken (in any case): no second account with another password.
    let (mut b2, r) = submit_signup(&env, &phone, "PAT@example.com", PASSWORD).await;
    assert!(r.location().starts_with("/signup?req="));
    assert!(b2.follow(&r).await.alert().is_some());
}

#[tokio::test(flavor = "multi_thread")]
async fn the_plan_rate_limit_applies_to_user_tokens() {
    let env = env().await;
    let limited = app(&env, LIMITED_APP, "myapp://callback");
    let (access, _) = user_tokens(&env, &limited, "quinn@example.com", &[PROFILE]).await;
    for i in 0..TIGHT_REQUESTS {
        let r = call_api(&env, &access).await;
        assert_eq!(r.status(), StatusCode::OK, "call {i}");
        assert_eq!(r.headers()["ratelimit-limit"], TIGHT_REQUESTS.to_string());
        assert_eq!(
            r.headers()["ratelimit-remaining"],
            (TIGHT_REQUESTS - 1 - i).to_string()
        );
    }
    let r = call_api(&env, &access).await;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry: u64 = r.headers()[header::RETRY_AFTER]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    // 3 per minute: the next request is allowed within 20 s.
    assert!((1..=20).contains(&retry), "Retry-After {retry}");
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"], "rate_limited");
}
// A refused revocation notice must not spend the refresh token. Redis 7 creates ACL users with
// `resetchannels` (acl-pubsub-default), so a user scoped to the gatehouse keys
// (`~gatehouse:* +@all`) may neither SUBSCRIBE nor PUBLISH. Spending first and publishing after
// made the refresh a 503 that had spent the token, and the client's retry a "reuse" that revoked
// the family. Publish and delete run in one script, notice first: the refused refresh spends
// nothing, and once the channel is allowed the same refresh token works.

#[tokio::test(flavor = "multi_thread")]
async fn a_refused_revocation_publish_spends_nothing() {
    let redis = tokio::task::block_in_place(gatehouse_tests::redis::RedisServer::start);
    let acl = |args: &[&str]| {
        let out = std::process::Command::new("redis-cli")
            .arg("-p")
            .arg(redis.port.to_string())
            .args(args)
            .output()
            .expect("redis-cli");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(
        acl(&[
            "ACL",
            "SETUSER",
            "gh",
            "on",
            ">pw-0123456789",
            "~gatehouse:*",
            "+@all"
        ])
        .contains("OK")
    );
    let url = format!("redis://gh:pw-0123456789@127.0.0.1:{}/", redis.port);
    let env = env_with(&["--redis", &url]).await;
    let phone = app(&env, PHONE_APP, "myapp://callback");
    let (access, refresh) = user_tokens(&env, &phone, "acl@example.com", &[PROFILE]).await;
    assert_eq!(call_api(&env, &access).await.status(), StatusCode::OK);

    // The channel is refused: the refresh cannot complete (a 503 is fine) ...
    let first = phone.refresh(&env, &refresh).await;
    assert!(
        first.is_err(),
        "a refresh succeeded although PUBLISH is refused"
    );
    // ... but it must not have spent the refresh token.
    use sha2::Digest;
    let key = format!(
        "gatehouse:tok:{}",
        hex_lower(&sha2::Sha256::digest(refresh.as_bytes()))
    );
    assert_eq!(
        acl(&["EXISTS", &key]).trim(),
        "1",
        "the refused refresh spent the refresh token"
    );

    // Fix the ACL; the client's retry with the same refresh token now works, and the family
    // was never revoked.
    assert!(acl(&["ACL", "SETUSER", "gh", "&gatehouse:revoked"]).contains("OK"));
    let retry = phone.refresh(&env, &refresh).await;
    assert!(
        retry.is_ok(),
        "the retry was treated as reuse: {:?}\n{}",
        retry.err(),
        env.gw.logs()
    );
    assert_eq!(call_api(&env, &access).await.status(), StatusCode::OK);
    // The listener's refused SUBSCRIBE was reported at the default log level.
    assert!(
        env.gw.logs().contains("revocation channel"),
        "the refused SUBSCRIBE is not reported:\n{}",
        env.gw.logs()
    );
}

fn hex_lower(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

// ------------------------------------------------------------------------ unicode spellings

/// A passphrase with accents, as one keyboard types it (combining accents) and as another does
/// (precomposed, with an ideographic space and full-width digits from an East Asian input
/// method, and a no-break space).
const ACCENTED_COMBINING: &str = "cre\u{0300}me bru\u{0302}le\u{0301}e du lundi 2024 matin";
const ACCENTED_OTHER_KEYBOARD: &str = "cr\u{00E8}me\u{3000}br\u{00FB}l\u{00E9}e du\u{00A0}lundi \u{FF12}\u{FF10}\u{FF12}\u{FF14} matin";

/// Signs in from a new browser as `email` with `password`; the user id the gateway sends
/// upstream (userinfo's `sub`), or None when the sign-in is refused.
async fn sign_in_sub(env: &Env, app: &App, email: &str, password: &str) -> Option<String> {
    let mut b = Browser::new(env);
    let authz = app.authorize(&[PROFILE]);
    let login = open_login(&mut b, &authz).await;
    let r = log_in(&mut b, &login, email, password).await;
    if !r.location().starts_with("/consent?req=") {
        let page = b.follow(&r).await;
        assert_eq!(page.alert().as_deref(), Some(BAD_CREDENTIALS), "{email:?}");
        return None;
    }
    let mut done = b.follow(&r).await;
    if done.status == StatusCode::OK {
        done = decide(&mut b, &done, "allow").await;
    }
    let code = callback(&done, &app.redirect).code(env, &authz.state);
    let (access, _) = app.tokens(env, &code, &authz.verifier).await;
    let (status, info) = userinfo(env, Some(&access)).await;
    assert_eq!(status, StatusCode::OK, "{info}");
    Some(info["sub"].as_str().unwrap().to_string())
}

/// One account however a keyboard spells its email and password (NFKC, then lowercase and NFC
/// for the email; NFKC for the password): a combining accent and a precomposed one, full-width
/// letters and digits, an ideographic or no-break space. A signup in another spelling of a
/// taken address is refused like any taken address.
#[tokio::test(flavor = "multi_thread")]
async fn one_account_however_a_keyboard_spells_email_and_password() {
    let env = env().await;
    let phone = app(&env, PHONE_APP, "myapp://callback");
    let mut b = Browser::new(&env);
    let authz = phone.authorize(&[PROFILE]);
    let login = open_login(&mut b, &authz).await;
    let consent = sign_up(
        &mut b,
        &login,
        "JE\u{0301}RO\u{0302}ME@Example.com",
        ACCENTED_COMBINING,
    )
    .await;
    let done = decide(&mut b, &consent, "allow").await;
    let code = callback(&done, &phone.redirect).code(&env, &authz.state);
    let (access, _) = phone.tokens(&env, &code, &authz.verifier).await;
    let (_, info) = userinfo(&env, Some(&access)).await;
    let sub = info["sub"].as_str().unwrap().to_string();

    for (email, password) in [
        ("j\u{00E9}r\u{00F4}me@example.com", ACCENTED_OTHER_KEYBOARD),
        (
            "\u{FF4A}\u{00E9}r\u{00F4}\u{FF4D}\u{FF45}\u{FF20}example.com",
            ACCENTED_COMBINING,
        ),
    ] {
        assert_eq!(
            sign_in_sub(&env, &phone, email, password).await.as_deref(),
            Some(sub.as_str()),
            "{email:?} {password:?}"
        );
    }
    assert_eq!(
        sign_in_sub(
            &env,
            &phone,
            "j\u{00E9}r\u{00F4}me@example.com",
            "creme brulee du lundi 2024 matin"
        )
        .await,
        None,
        "accents are part of the password"
    );

    // The precomposed spelling of the address is taken.
    let (mut other, r) = submit_signup(
        &env,
        &phone,
        "j\u{00E9}r\u{00F4}me@example.com",
        "an entirely different passphrase 7781",
    )
    .await;
    assert!(r.location().starts_with("/signup?req="), "{}", r.location());
    let page = other.follow(&r).await;
    assert!(
        page.alert()
            .unwrap_or_default()
            .starts_with("We could not create an account with these details."),
        "{:?}",
        page.alert()
    );
}

/// An account made before emails and passwords were normalized (kept under the email as typed,
/// lowercased, with a hash of the password as typed). At start-up the gateway records it under
/// its normalized email: every spelling of the address finds it and a signup in another
/// spelling is refused. Its password as typed then works once, and that sign-in replaces the
/// hash with one of the normalized password, which every keyboard's spelling matches.
#[tokio::test(flavor = "multi_thread")]
async fn an_account_from_before_normalization_is_brought_up_to_date() {
    use gatehouse_gateway::{accounts, password, store::embedded::EmbeddedStore};
    let dir = tempfile::tempdir().unwrap();
    let typed_email = "je\u{0301}ro\u{0302}me@example.com";
    // An address that is one only before normalization: NFKC turns its full-width at sign
    // into a second `@`.
    let wide_at = "a\u{FF20}b@example.com";
    let (old, odd) = {
        let store = EmbeddedStore::open(&dir.path().join("data")).unwrap();
        let hash = password::hash(ACCENTED_COMBINING);
        let old = accounts::create(&store, typed_email, hash.clone())
            .await
            .unwrap()
            .unwrap();
        let odd = accounts::create(&store, wide_at, hash)
            .await
            .unwrap()
            .unwrap();
        (old, odd)
    };
    let env = env_in(dir, &[]).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !env
        .gw
        .logs()
        .contains("accounts indexed by their normalized email")
    {
        assert!(std::time::Instant::now() < deadline, "{}", env.gw.logs());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let phone = app(&env, PHONE_APP, "myapp://callback");

    // Another spelling of the address is taken.
    let (_, r) = submit_signup(
        &env,
        &phone,
        "J\u{00C9}R\u{00D4}ME@example.com",
        "an entirely different passphrase 7781",
    )
    .await;
    assert!(r.location().starts_with("/signup?req="), "{}", r.location());

    // The old hash matches only the password exactly as it was typed.
    assert_eq!(
        sign_in_sub(&env, &phone, typed_email, ACCENTED_OTHER_KEYBOARD).await,
        None
    );
    assert_eq!(
        sign_in_sub(
            &env,
            &phone,
            "j\u{00E9}r\u{00F4}me@example.com",
            ACCENTED_COMBINING
        )
        .await,
        Some(old.id.clone())
    );
    for (email, password) in [
        ("j\u{00E9}r\u{00F4}me@example.com", ACCENTED_OTHER_KEYBOARD),
        ("J\u{00C9}R\u{00D4}ME@EXAMPLE.COM", ACCENTED_COMBINING),
        (typed_email, ACCENTED_OTHER_KEYBOARD),
    ] {
        assert_eq!(
            sign_in_sub(&env, &phone, email, password).await.as_deref(),
            Some(old.id.as_str()),
            "{email:?} {password:?}"
        );
    }
    assert_eq!(
        sign_in_sub(&env, &phone, wide_at, ACCENTED_OTHER_KEYBOARD).await,
        None
    );
    assert_eq!(
        sign_in_sub(&env, &phone, wide_at, ACCENTED_COMBINING).await,
        Some(odd.id.clone())
    );
    assert_eq!(
        sign_in_sub(&env, &phone, wide_at, ACCENTED_OTHER_KEYBOARD).await,
        Some(odd.id)
    );
}
