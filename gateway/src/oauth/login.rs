//! The built-in identity provider's pages: sign in, sign up, consent. Every POST answers 303
//! (a wrong field travels as a one-time flash message in the session; a form that cannot be
//! used at all ends on its error page's address, `error_pages`); every form carries the
//! session's CSRF token and the pending authorization id.

use std::collections::HashMap;
use std::sync::Arc;

use super::PageBody;
use axum::extract::{FromRequestParts, Query, State};
use axum::response::Response;
use http::request::Parts;
use http::{HeaderMap, StatusCode, header};

use super::PeerIp;
use super::authorize::{self, Next, consent_key, error_page, see_other, store_error_page};
use super::session::{self, Session};
use crate::accounts;
use crate::pages;
use crate::password;
use crate::password::Verified;
use crate::state::AppState;
use crate::store::kv;

/// Failed sign-ins allowed per account (or per known device of the account, below) and per
/// client IP in one window.
pub const MAX_FAILURES_PER_ACCOUNT: u64 = 5;
pub const MAX_FAILURES_PER_IP: u64 = 20;
/// Default signups per client IP per hour; mobile carriers put many users behind one address.
pub const MAX_SIGNUPS_PER_IP: u64 = 100;
/// Default sign-ins at /login (right password or wrong) per client IP in one window: each
/// costs an Argon2id verification, and right ones take back their failure count, so without
/// it one account's holder signing in and out in a loop could keep the hashing pool busy for
/// everybody. High, as mobile carriers put many users behind one address: spending it takes
/// 1,000 verifications (the 20 failures an address may make lock it out sooner).
pub const MAX_PASSWORD_CHECKS_PER_IP: u64 = 1_000;
pub const THROTTLE_WINDOW_SECS: u64 = 15 * 60;

const BAD_CREDENTIALS: &str = "The email or password is not correct.";
const THROTTLED: &str = "Too many failed attempts. Please wait 15 minutes and try again.";
const TOO_MANY_SIGN_INS: &str =
    "Too many sign-ins from this network. Please wait 15 minutes and try again.";

/// The browsers an account signed in on (`Device`s, least recently used first), all in one
/// value: however sign-ins race, an account holds at most this one record.
fn devices_key(email: &str) -> String {
    format!("devices:{email}")
}

/// Known devices kept per account; a sign-in on another forgets the least recently used, so
/// signing in to one's own account in a loop cannot grow the store.
pub const MAX_DEVICES_PER_ACCOUNT: usize = 10;

/// One known browser: its device cookie's id (the token's SHA-256, hex) and until when it is
/// known (unix seconds).
#[derive(serde::Serialize, serde::Deserialize)]
struct Device {
    id: String,
    until: u64,
}

/// A browser on which this account signed in before: its device cookie's id.
struct KnownDevice(String);

/// The counters a sign-in attempt is charged to: its address's, and its account's, or, from a
/// browser on which this account signed in before (its device cookie), that browser's own
/// instead of the account's (OWASP's device cookies). Anyone who knows an email can use up the
/// account's attempts; they lock new browsers out for the window, not the owner's own.
struct Counters {
    by_ip: String,
    by_account: String,
    device: Option<KnownDevice>,
}

impl Counters {
    fn new(email: &str, ip: &str, device: Option<KnownDevice>) -> Self {
        let by_account = match &device {
            Some(d) => format!("throttle:login:device:{}", d.0),
            None => format!("throttle:login:acct:{email}"),
        };
        Counters {
            by_ip: format!("throttle:login:ip:{ip}"),
            by_account,
            device,
        }
    }
}

/// This browser's device cookie when the account signed in on it and knows it still. A cookie
/// of another account, unknown, expired, forgotten, replaced by a later sign-in, or unreadable
/// counts as no device.
async fn known_device(state: &AppState, headers: &HeaderMap, email: &str) -> Option<KnownDevice> {
    let token = session::device_token(headers, state.secure_cookies())?;
    let id = hex::encode(crate::tokens::hash(&token));
    let devices: Vec<Device> = kv::get(&*state.store, &devices_key(email)).await.ok()??;
    let now = crate::store::unix_now();
    devices
        .iter()
        .any(|d| d.id == id && d.until > now)
        .then_some(KnownDevice(id))
}

/// `resp` (a sign-in's answer) with the browser remembered as a device of `email` for
/// `DEVICE_TTL` from now, under a new device cookie: a known browser's old one stops counting
/// (a copy taken from it is worth nothing after the owner's next sign-in), and someone who signs
/// in daily never falls back to the account's counter. When the store cannot say which devices
/// the account has, the sign-in goes on without remembering (never overwriting the list).
async fn remember_device(
    state: &AppState,
    mut resp: Response,
    c: &Counters,
    email: &str,
) -> Response {
    if !resp.status().is_redirection() {
        return resp;
    }
    let store = &*state.store;
    let key = devices_key(email);
    let Ok(devices) = kv::get::<Vec<Device>>(store, &key).await else {
        return resp;
    };
    let now = crate::store::unix_now();
    let replaced = c.device.as_ref().map(|d| d.0.as_str());
    let mut devices: Vec<Device> = devices
        .unwrap_or_default()
        .into_iter()
        .filter(|d| d.until > now && Some(d.id.as_str()) != replaced)
        .collect();
    let token = crate::tokens::generate();
    devices.push(Device {
        id: hex::encode(crate::tokens::hash(&token)),
        until: now + session::DEVICE_TTL,
    });
    let forgotten = devices.len().saturating_sub(MAX_DEVICES_PER_ACCOUNT);
    devices.drain(..forgotten);
    if kv::put(store, &key, &devices, session::DEVICE_TTL)
        .await
        .is_ok()
    {
        resp.headers_mut().append(
            header::SET_COOKIE,
            session::set_device_cookie(&token, state.secure_cookies()),
        );
    }
    resp
}

/// `path?req=<req>`, the id percent-encoded: a posted `req` is whatever the form sent, and a
/// control character in a Location header would turn the 303 into an error.
fn with_req(path: &str, req: &str) -> String {
    let req: String = url::form_urlencoded::byte_serialize(req.as_bytes()).collect();
    format!("{path}?req={req}")
}

fn form_fields(body: &[u8]) -> HashMap<String, String> {
    url::form_urlencoded::parse(body).into_owned().collect()
}

pub(super) fn session_expired() -> Response {
    super::error_pages::known(super::error_pages::SESSION_EXPIRED)
}

fn forbidden_form() -> Response {
    super::error_pages::known(super::error_pages::FORM_EXPIRED)
}

fn with_cookie(mut resp: Response, sid: &str, state: &AppState) -> Response {
    resp.headers_mut().insert(
        header::SET_COOKIE,
        session::set_cookie(sid, state.secure_cookies()),
    );
    resp
}

/// Session and CSRF check shared by the POST handlers.
async fn posted_session(
    state: &AppState,
    headers: &HeaderMap,
    fields: &HashMap<String, String>,
) -> Result<(String, Session), Response> {
    let (sid, sess) = session::load(&*state.store, headers, state.secure_cookies())
        .await
        .map_err(store_error_page)?
        .ok_or_else(session_expired)?;
    if !session::csrf_ok(&sess, fields.get("csrf").map(String::as_str)) {
        return Err(forbidden_form());
    }
    Ok((sid, sess))
}

fn app_name(state: &AppState, client_id: &str) -> String {
    state
        .config
        .load()
        .client(client_id)
        .map(|c| c.cfg.application_name.clone())
        .unwrap_or_else(|| "the app".to_string())
}

#[derive(serde::Deserialize)]
pub struct ReqParam {
    #[serde(default)]
    req: String,
}

/// The sign-in pages' `req` query parameter. A query that does not parse (`req` twice, bad
/// percent-encoding) gets a page with the pages' security headers, not axum's plain-text
/// rejection.
pub struct ReqQuery(ReqParam);

impl<S: Send + Sync> FromRequestParts<S> for ReqQuery {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Response> {
        match Query::<ReqParam>::from_request_parts(parts, state).await {
            Ok(Query(q)) => Ok(ReqQuery(q)),
            Err(_) => Err(error_page(
                StatusCode::BAD_REQUEST,
                "Bad request",
                "This sign-in link is not valid. Go back to the app and start again.",
            )),
        }
    }
}

/// GET /login and GET /signup: render the form for a pending request of this session.
async fn show(state: &AppState, headers: &HeaderMap, req: &str, signup: bool) -> Response {
    let (sid, mut sess) = match session::load(&*state.store, headers, state.secure_cookies()).await
    {
        Ok(Some(s)) => s,
        Ok(None) => return session_expired(),
        Err(e) => return store_error_page(e),
    };
    let pending = match session::get_pending(&*state.store, req, &sid).await {
        Ok(Some(p)) => p,
        Ok(None) => return authorize::expired_request_page(),
        Err(e) => return store_error_page(e),
    };
    let flash = sess.flash.take();
    let email = sess.flash_email.take().unwrap_or_default();
    if flash.is_some() {
        let _ = session::save(&*state.store, &sid, &sess).await;
    }
    let form = pages::Form {
        csrf: &sess.csrf,
        request_id: req,
    };
    let app = app_name(state, &pending.client_id);
    let html = if signup {
        pages::signup(
            &form,
            &app,
            &email,
            flash.as_deref(),
            state.password_min_len,
            &with_req("/login", req),
        )
    } else {
        pages::login(
            &form,
            &app,
            &email,
            flash.as_deref(),
            &with_req("/signup", req),
        )
    };
    pages::respond(StatusCode::OK, html)
}

pub async fn login_page(
    State(state): State<Arc<AppState>>,
    ReqQuery(q): ReqQuery,
    headers: HeaderMap,
) -> Response {
    show(&state, &headers, &q.req, false).await
}

pub async fn signup_page(
    State(state): State<Arc<AppState>>,
    ReqQuery(q): ReqQuery,
    headers: HeaderMap,
) -> Response {
    show(&state, &headers, &q.req, true).await
}

/// Signs the user in: a new session id (no fixation), the pending request moved to it, then on
/// to consent or the code.
async fn signed_in(state: &AppState, old_sid: &str, req: &str, user_id: &str) -> Response {
    let store = &*state.store;
    let (sid, _) = match session::create(store, Some(user_id.to_string())).await {
        Ok(s) => s,
        Err(e) => return store_error_page(e),
    };
    if let Ok(Some(mut p)) = session::get_pending(store, req, old_sid).await {
        p.session = session::session_binding(&sid);
        // Gone since it was read (taken, expired): not brought back; consent then says so.
        if let Err(e) = session::update_pending(store, req, &p).await {
            return store_error_page(e);
        }
    }
    let _ = session::destroy(store, old_sid).await;
    let next = if req.is_empty() {
        see_other("/consent")
    } else {
        see_other(&with_req("/consent", req))
    };
    with_cookie(next, &sid, state)
}

async fn throttled(state: &AppState, c: &Counters) -> bool {
    let acct = state
        .store
        .counter_get(&c.by_account)
        .await
        .unwrap_or(u64::MAX);
    let by_ip = state.store.counter_get(&c.by_ip).await.unwrap_or(u64::MAX);
    acct >= MAX_FAILURES_PER_ACCOUNT || by_ip >= MAX_FAILURES_PER_IP
}

/// Counts a password attempt as failed before it is verified; false (nothing kept) when the
/// account or the address has no attempts left, or the store cannot count. Checking first and
/// counting after the slow verification let parallel guesses all pass a check made before any
/// of them was counted. A correct password takes its count back (`give_back_attempt`). While
/// it is checked an attempt counts against the address too: at most 20 attempts per address are
/// failed or under way in a window. The address is counted first: one over its limit touches
/// no account counter, so it cannot park a 15-minute key per made-up email at full speed.
async fn reserve_attempt(state: &AppState, c: &Counters) -> bool {
    let (acct, by_ip) = (&c.by_account, &c.by_ip);
    let store = &state.store;
    // A refused attempt is not a failure: what was counted is taken back.
    match store.counter_incr(by_ip, THROTTLE_WINDOW_SECS).await {
        Ok(n) if n <= MAX_FAILURES_PER_IP => {}
        Ok(_) => {
            let _ = store.counter_decr(by_ip).await;
            return false;
        }
        Err(_) => return false,
    }
    let a = store.counter_incr(acct, THROTTLE_WINDOW_SECS).await;
    if matches!(a, Ok(n) if n <= MAX_FAILURES_PER_ACCOUNT) {
        return true;
    }
    if a.is_ok() {
        let _ = store.counter_decr(acct).await;
    }
    let _ = store.counter_decr(by_ip).await;
    false
}

fn attempt_failed() {
    metrics::counter!("gatehouse_login_failures_total").increment(1);
}

/// The address's budget of password checks (`--max-password-checks-per-ip`: right password
/// or wrong, never taken back).
fn checks_key(ip: &str) -> String {
    format!("throttle:login:checks:{ip}")
}

/// Takes back a reserved attempt's counts: the password was correct, or it was never checked.
async fn give_back_attempt(state: &AppState, c: &Counters) {
    let _ = state.store.counter_decr(&c.by_account).await;
    let _ = state.store.counter_decr(&c.by_ip).await;
}

/// Verifies a password on the blocking pool; against a dummy hash when there is no user, so
/// both answers take the same time.
async fn verify(password: String, hash: Option<String>) -> Verified {
    password::run_blocking(move || {
        let known = hash.is_some();
        let phc = hash.unwrap_or_else(|| password::dummy_hash().to_string());
        match password::verify_typed(&password, &phc) {
            _ if !known => Verified::No,
            verified => verified,
        }
    })
    .await
    .unwrap_or(Verified::No)
}

/// After a sign-in that matched only the password as typed (a hash made before passwords were
/// normalized): replaces that hash with one of the normalized password. The account's email is
/// the start-up sweep's (`accounts::index_normalized_emails`). Best effort: a failure leaves the
/// account as it was, still reachable as before.
async fn update_account(
    state: &AppState,
    user: &accounts::User,
    verified: Verified,
    password: String,
) {
    if verified != Verified::AsTyped {
        return;
    }
    let Some(hash) =
        password::run_blocking(move || password::hash(&password::normalize(&password))).await
    else {
        return;
    };
    if let Err(e) = accounts::set_password_hash(&*state.store, user, hash).await {
        tracing::warn!(error = %e, "cannot replace a password hash made before normalization");
    }
}

/// What the login and signup forms post, after the session and CSRF check.
struct Posted {
    sid: String,
    sess: Session,
    req: String,
    /// Where an error sends the browser back to (the same form, same pending request).
    back: String,
    /// Normalized.
    email: String,
    /// The form an account made before normalization would be kept under, when it differs.
    legacy_email: Option<String>,
    /// As typed (normalized where it is checked or hashed).
    pw: String,
}

/// The part the login and signup POSTs share: session + CSRF, the fields, and a usable email
/// (a missing or invalid one is flashed and answered with a 303 back to `page`).
async fn read_post(
    state: &AppState,
    headers: &HeaderMap,
    body: &[u8],
    page: &str,
    bad_email: &str,
    forms: fn(&str) -> Option<accounts::EmailForms>,
) -> Result<Posted, Response> {
    let fields = form_fields(body);
    let (sid, mut sess) = posted_session(state, headers, &fields).await?;
    let req = fields.get("req").cloned().unwrap_or_default();
    let back = with_req(page, &req);
    let raw_email = fields.get("email").map(String::as_str).unwrap_or("");
    let Some(accounts::EmailForms {
        email,
        legacy: legacy_email,
    }) = forms(raw_email)
    else {
        authorize::flash(state, &sid, &mut sess, bad_email, Some(raw_email)).await;
        return Err(see_other(&back));
    };
    let pw = fields.get("password").cloned().unwrap_or_default();
    Ok(Posted {
        sid,
        sess,
        req,
        back,
        email,
        legacy_email,
        pw,
    })
}

pub async fn login_post(
    State(state): State<Arc<AppState>>,
    PeerIp(ip): PeerIp,
    headers: HeaderMap,
    PageBody(body): PageBody,
) -> Response {
    let Posted {
        sid,
        mut sess,
        req,
        back,
        email,
        legacy_email,
        pw,
    } = match read_post(
        &state,
        &headers,
        &body,
        "/login",
        "Enter your email address.",
        accounts::login_forms,
    )
    .await
    {
        Ok(p) => p,
        Err(r) => return r,
    };
    // The address's budget of checks: looked at first, touching nothing (a spent one must not
    // let requests park failure counters per made-up email), and counted once the attempt is
    // reserved, as that one goes on to Argon2id.
    let checks = checks_key(&ip);
    match state.store.counter_get(&checks).await {
        Ok(n) if n >= state.max_password_checks_per_ip => {
            authorize::flash(&state, &sid, &mut sess, TOO_MANY_SIGN_INS, Some(&email)).await;
            return see_other(&back);
        }
        Ok(_) => {}
        Err(e) => return store_error_page(e),
    }
    // The account is looked up only for an attempt that goes on to Argon2: a refused one
    // answers at once, and a lookup before it would time whether the email has an account.
    let counters = Counters::new(&email, &ip, known_device(&state, &headers, &email).await);
    if !reserve_attempt(&state, &counters).await {
        authorize::flash(&state, &sid, &mut sess, THROTTLED, Some(&email)).await;
        return see_other(&back);
    }
    match state
        .store
        .counter_incr(&checks, THROTTLE_WINDOW_SECS)
        .await
    {
        Ok(n) if n <= state.max_password_checks_per_ip => {}
        counted => {
            give_back_attempt(&state, &counters).await;
            if let Err(e) = counted {
                return store_error_page(e);
            }
            authorize::flash(&state, &sid, &mut sess, TOO_MANY_SIGN_INS, Some(&email)).await;
            return see_other(&back);
        }
    }
    let user = match accounts::find(&*state.store, &email, legacy_email.as_deref()).await {
        Ok(u) => u,
        Err(e) => {
            give_back_attempt(&state, &counters).await;
            return store_error_page(e);
        }
    };
    let verified = verify(pw.clone(), user.as_ref().map(|u| u.password_hash.clone())).await;
    let (Some(user), Verified::Yes | Verified::AsTyped) = (user, &verified) else {
        attempt_failed();
        authorize::flash(&state, &sid, &mut sess, BAD_CREDENTIALS, Some(&email)).await;
        return see_other(&back);
    };
    give_back_attempt(&state, &counters).await;
    update_account(&state, &user, verified, pw).await;
    metrics::counter!("gatehouse_logins_total").increment(1);
    let resp = signed_in(&state, &sid, &req, &user.id).await;
    remember_device(&state, resp, &counters, &email).await
}

pub async fn signup_post(
    State(state): State<Arc<AppState>>,
    PeerIp(ip): PeerIp,
    headers: HeaderMap,
    PageBody(body): PageBody,
) -> Response {
    let Posted {
        sid,
        mut sess,
        req,
        back,
        email,
        legacy_email,
        pw,
    } = match read_post(
        &state,
        &headers,
        &body,
        "/signup",
        "Enter a valid email address.",
        accounts::signup_forms,
    )
    .await
    {
        Ok(p) => p,
        Err(r) => return r,
    };
    if !state
        .accounts_indexed
        .load(std::sync::atomic::Ordering::SeqCst)
    {
        authorize::flash(
            &state,
            &sid,
            &mut sess,
            "Signing up is not available for a moment while the service starts. Try again in a few seconds.",
            Some(&email),
        )
        .await;
        return see_other(&back);
    }
    let signups = state
        .store
        .counter_incr(
            &format!("throttle:signup:ip:{ip}"),
            THROTTLE_WINDOW_SECS * 4,
        )
        .await
        .unwrap_or(u64::MAX);
    let counters = Counters::new(&email, &ip, known_device(&state, &headers, &email).await);
    if signups > state.max_signups_per_ip || throttled(&state, &counters).await {
        authorize::flash(&state, &sid, &mut sess, THROTTLED, Some(&email)).await;
        return see_other(&back);
    }
    // Strength check and hashing are CPU work: off the async runtime. Both see the normalized
    // password, the one every later sign-in is checked in.
    let (pw2, email2, min) = (pw.clone(), email.clone(), state.password_min_len);
    let checked = password::run_blocking(move || {
        let pw2 = password::normalize(&pw2);
        password::check(&pw2, &email2, min).map(|()| password::hash(&pw2))
    })
    .await;
    let hash = match checked {
        Some(Ok(h)) => h,
        Some(Err(problem)) => {
            authorize::flash(&state, &sid, &mut sess, &problem.to_string(), Some(&email)).await;
            return see_other(&back);
        }
        None => {
            return store_error_page(crate::store::StoreError::Unavailable(
                "hashing failed".into(),
            ));
        }
    };
    // An account made before normalization under this spelling takes the address as surely as
    // one under the normalized form (which `create` claims atomically).
    let created = match &legacy_email {
        Some(legacy) => match accounts::find_by_email(&*state.store, legacy).await {
            Ok(Some(_)) => Ok(None),
            Ok(None) => accounts::create(&*state.store, &email, hash).await,
            Err(e) => Err(e),
        },
        None => accounts::create(&*state.store, &email, hash).await,
    };
    match created {
        Ok(Some(user)) => {
            metrics::counter!("gatehouse_signups_total").increment(1);
            let resp = signed_in(&state, &sid, &req, &user.id).await;
            remember_device(&state, resp, &counters, &email).await
        }
        Ok(None) => {
            // The email is taken. If the password is the account's, this is a sign-in; otherwise
            // the answer is the sign-in failure, counted against the same throttles, so signup
            // is no faster password oracle than login.
            let existing = accounts::find(&*state.store, &email, legacy_email.as_deref())
                .await
                .ok()
                .flatten();
            if !reserve_attempt(&state, &counters).await {
                authorize::flash(&state, &sid, &mut sess, THROTTLED, Some(&email)).await;
                return see_other(&back);
            }
            let verified = verify(
                pw.clone(),
                existing.as_ref().map(|u| u.password_hash.clone()),
            )
            .await;
            if let (Some(user), Verified::Yes | Verified::AsTyped) = (existing, &verified) {
                give_back_attempt(&state, &counters).await;
                update_account(&state, &user, verified, pw).await;
                let resp = signed_in(&state, &sid, &req, &user.id).await;
                return remember_device(&state, resp, &counters, &email).await;
            }
            attempt_failed();
            authorize::flash(
                &state,
                &sid,
                &mut sess,
                "We could not create an account with these details. If you already have an account, sign in instead.",
                Some(&email),
            )
            .await;
            see_other(&back)
        }
        Err(e) => store_error_page(e),
    }
}

/// The signed-in user of this session, or the page to show instead.
async fn signed_in_user(
    state: &AppState,
    headers: &HeaderMap,
) -> Result<(String, Session, accounts::User), Response> {
    let (sid, sess) = session::load(&*state.store, headers, state.secure_cookies())
        .await
        .map_err(store_error_page)?
        .ok_or_else(session_expired)?;
    let user_id = sess.user_id.clone().ok_or_else(session_expired)?;
    let user = accounts::get(&*state.store, &user_id)
        .await
        .map_err(store_error_page)?
        .ok_or_else(session_expired)?;
    Ok((sid, sess, user))
}

pub async fn consent_page(
    State(state): State<Arc<AppState>>,
    ReqQuery(q): ReqQuery,
    headers: HeaderMap,
) -> Response {
    let (sid, sess, user) = match signed_in_user(&state, &headers).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    if q.req.is_empty() {
        return error_page(
            StatusCode::OK,
            "Signed in",
            &format!(
                "You are signed in as {}. You can return to the app.",
                user.email
            ),
        );
    }
    let snap = state.config.load_full();
    match authorize::proceed(&state, &snap, &q.req, &sid, &user.id).await {
        Err(r) => r,
        Ok(Next::Redirect(r)) => r,
        Ok(Next::Consent(scopes)) => {
            let pending = match session::get_pending(&*state.store, &q.req, &sid).await {
                Ok(Some(p)) => p,
                _ => return authorize::expired_request_page(),
            };
            let Some(client) = snap.client(&pending.client_id) else {
                return authorize::expired_request_page();
            };
            let api = &snap.apis[client.api].cfg;
            let views: Vec<pages::ScopeView> = scopes
                .iter()
                .map(|s| pages::ScopeView {
                    name: s,
                    description: api
                        .scopes
                        .iter()
                        .find(|x| &x.name == s)
                        .map_or("", |x| x.description.as_str()),
                })
                .collect();
            let api_name = if api.display_name.is_empty() {
                api.id.as_str()
            } else {
                api.display_name.as_str()
            };
            let form = pages::Form {
                csrf: &sess.csrf,
                request_id: &q.req,
            };
            pages::respond(
                StatusCode::OK,
                pages::consent(
                    &form,
                    &client.cfg.application_name,
                    api_name,
                    &user.email,
                    &views,
                ),
            )
        }
    }
}

pub async fn consent_post(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    PageBody(body): PageBody,
) -> Response {
    let fields = form_fields(&body);
    let (sid, sess, user) = match signed_in_user(&state, &headers).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    if !session::csrf_ok(&sess, fields.get("csrf").map(String::as_str)) {
        return forbidden_form();
    }
    let req = fields.get("req").cloned().unwrap_or_default();
    match fields.get("decision").map(String::as_str) {
        Some("allow") => {
            let snap = state.config.load_full();
            let pending = match session::get_pending(&*state.store, &req, &sid).await {
                Ok(Some(p)) => p,
                Ok(None) => return authorize::expired_request_page(),
                Err(e) => return store_error_page(e),
            };
            let Some(client) = snap.client(&pending.client_id) else {
                return authorize::expired_request_page();
            };
            // Remember the grant: later requests ask only for scopes not yet granted.
            let key = consent_key(&user.id, client);
            let mut granted: Vec<String> = kv::get(&*state.store, &key)
                .await
                .ok()
                .flatten()
                .unwrap_or_default();
            for s in pending.scope.split(' ').filter(|s| !s.is_empty()) {
                if !granted.iter().any(|g| g == s) {
                    granted.push(s.to_string());
                }
            }
            if let Err(e) = kv::put(&*state.store, &key, &granted, 0).await {
                return store_error_page(e);
            }
            match authorize::issue_code(&state, &req, &sid, &user.id).await {
                Ok(r) | Err(r) => r,
            }
        }
        Some("deny") => authorize::deny(&state, &req, &sid).await,
        _ => super::error_pages::known(super::error_pages::INVALID_ANSWER),
    }
}

/// GET /logout: a button that signs the browser out (signing out on a GET would let any page
/// sign users out with an image tag).
pub async fn logout_page(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    match signed_in_user(&state, &headers).await {
        Ok((_, sess, user)) => {
            pages::respond(StatusCode::OK, pages::logout(&sess.csrf, &user.email))
        }
        Err(_) => pages::respond(
            StatusCode::OK,
            pages::error(
                "Signed out",
                "This browser is not signed in. You can close this window.",
            ),
        ),
    }
}

/// POST /logout (CSRF-checked): ends the browser session. Tokens the apps hold stay valid until
/// they expire or are revoked; the next sign-in link asks for the password again.
pub async fn logout_post(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    PageBody(body): PageBody,
) -> Response {
    let fields = form_fields(&body);
    let (sid, _) = match posted_session(&state, &headers, &fields).await {
        Ok(s) => s,
        Err(resp) => return resp,
    };
    if let Err(e) = session::destroy(&*state.store, &sid).await {
        return store_error_page(e);
    }
    // 303 after the POST (a reload must not post again); GET /logout then says signed out.
    let mut resp = see_other("/logout");
    resp.headers_mut().insert(
        header::SET_COOKIE,
        session::clear_cookie(state.secure_cookies()),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh browser: its Cookie header naming a new anonymous session, and that session's
    /// CSRF token.
    async fn browser(state: &AppState) -> (HeaderMap, String) {
        let (sid, sess) = session::create(&*state.store, None).await.unwrap();
        let mut headers = HeaderMap::new();
        headers.insert(
            header::COOKIE,
            format!("{}={sid}", session::COOKIE).parse().unwrap(),
        );
        (headers, sess.csrf)
    }

    /// A sign-in page's query that does not parse gets a page with the security headers (no
    /// framing, no sniffing), not a plain-text rejection; a good one passes.
    #[tokio::test]
    async fn a_bad_sign_in_query_gets_a_page_with_the_security_headers() {
        let parts = |uri: &str| http::Request::get(uri).body(()).unwrap().into_parts().0;
        let Err(r) = ReqQuery::from_request_parts(&mut parts("/login?req=a&req=b"), &()).await
        else {
            panic!("a repeated req was accepted");
        };
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
        assert_eq!(r.headers()[header::X_FRAME_OPTIONS], "DENY");
        assert_eq!(r.headers()[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
        let Ok(ReqQuery(q)) = ReqQuery::from_request_parts(&mut parts("/login?req=r1"), &()).await
        else {
            panic!("a good query was refused");
        };
        assert_eq!(q.req, "r1");
    }

    /// A posted `req` goes back into the 303's Location percent-encoded: one with a control
    /// character (`%0A`) would otherwise make the answer a 400 instead of a 303.
    #[tokio::test]
    async fn a_posted_request_id_is_encoded_in_the_redirect() {
        let dir = tempfile::tempdir().unwrap();
        let state = Arc::new(AppState::for_tests(dir.path()));
        let (headers, csrf) = browser(&state).await;
        let body = format!("csrf={csrf}&req=a%0Ab%26c&email=not-an-email&password=x");
        let r = login_post(
            State(state.clone()),
            PeerIp("192.0.2.9".into()),
            headers,
            PageBody(body.into()),
        )
        .await;
        assert_eq!(r.status(), StatusCode::SEE_OTHER);
        assert_eq!(r.headers()[header::LOCATION], "/login?req=a%0Ab%26c");
    }

    /// Right passwords count against the address's budget of checks too (each is an Argon2id
    /// run): past it, a sign-in from that address is refused before any hashing, and before
    /// it touches any other counter (a made-up email parks none). Another address is not
    /// affected.
    #[tokio::test]
    async fn every_password_check_counts_against_the_address() {
        let dir = tempfile::tempdir().unwrap();
        let mut state = AppState::for_tests(dir.path());
        state.max_password_checks_per_ip = 3;
        let state = Arc::new(state);
        let pw = "violet harbour lantern quietly 1987";
        let hash = crate::password::hash(pw);
        accounts::create(&*state.store, "owner@example.com", hash)
            .await
            .unwrap()
            .unwrap();
        // One sign-in as `who` (its local part) from `ip` in a fresh browser: where it was
        // sent, and the flash message it left, if any.
        let sign_in = |ip: &'static str, who: &'static str, password: &'static str| {
            let state = state.clone();
            async move {
                let (headers, csrf) = browser(&state).await;
                let body = format!(
                    "csrf={csrf}&req=r1&email={who}%40example.com&password={}",
                    password.replace(' ', "+")
                );
                let r = login_post(
                    State(state.clone()),
                    PeerIp(ip.into()),
                    headers.clone(),
                    PageBody(body.into()),
                )
                .await;
                assert_eq!(r.status(), StatusCode::SEE_OTHER);
                let location = r.headers()[header::LOCATION].to_str().unwrap().to_string();
                let flash = session::load(&*state.store, &headers, false)
                    .await
                    .unwrap()
                    .and_then(|(_, s)| s.flash);
                (location, flash)
            }
        };
        let signed_in = ("/consent?req=r1".to_string(), None);
        let refused = (
            "/login?req=r1".to_string(),
            Some(TOO_MANY_SIGN_INS.to_string()),
        );
        let wrong = (
            "/login?req=r1".to_string(),
            Some(BAD_CREDENTIALS.to_string()),
        );
        assert_eq!(sign_in("192.0.2.7", "owner", pw).await, signed_in);
        assert_eq!(sign_in("192.0.2.7", "owner", pw).await, signed_in);
        assert_eq!(sign_in("192.0.2.7", "nobody", pw).await, wrong);
        // The budget of 3 is spent: refused, right password or not.
        assert_eq!(sign_in("192.0.2.7", "owner", pw).await, refused);
        assert_eq!(sign_in("192.0.2.7", "made-up", pw).await, refused);
        assert_eq!(sign_in("192.0.2.8", "owner", pw).await, signed_in);
        // The refusals counted no failure and parked no counter for the made-up email.
        let count = |key: &'static str| {
            let state = state.clone();
            async move { state.store.counter_get(key).await.unwrap() }
        };
        assert_eq!(count("throttle:login:acct:owner@example.com").await, 0);
        assert_eq!(count("throttle:login:acct:nobody@example.com").await, 1);
        let parked = state
            .store
            .kv_keys("throttle:login:acct:made-up", |_| true)
            .await
            .unwrap();
        assert!(parked.is_empty(), "{parked:?}");
    }

    /// Until the start-up sweep has recorded accounts from before email normalization under
    /// their normalized address, a signup is answered "in a moment" and makes no account;
    /// afterwards the same form makes it.
    #[tokio::test]
    async fn signups_wait_for_the_start_up_sweep() {
        let dir = tempfile::tempdir().unwrap();
        let state = Arc::new(AppState::for_tests(dir.path()));
        state
            .accounts_indexed
            .store(false, std::sync::atomic::Ordering::SeqCst);
        let (headers, csrf) = browser(&state).await;
        let signup = |csrf: String| {
            let state = state.clone();
            let headers = headers.clone();
            async move {
                let body = format!(
                    "csrf={csrf}&req=r1&email=new%40example.com&password=violet+harbour+lantern+quietly+1987"
                );
                signup_post(
                    State(state),
                    PeerIp("192.0.2.7".into()),
                    headers,
                    PageBody(body.into()),
                )
                .await
            }
        };
        let r = signup(csrf).await;
        assert_eq!(r.status(), StatusCode::SEE_OTHER);
        assert_eq!(r.headers()[header::LOCATION], "/signup?req=r1");
        let (_, sess) = session::load(&*state.store, &headers, false)
            .await
            .unwrap()
            .unwrap();
        assert!(
            sess.flash
                .as_deref()
                .is_some_and(|f| f.starts_with("Signing up is not available for a moment")),
            "{:?}",
            sess.flash
        );
        let made = accounts::find_by_email(&*state.store, "new@example.com");
        assert_eq!(made.await.unwrap(), None);

        state
            .accounts_indexed
            .store(true, std::sync::atomic::Ordering::SeqCst);
        signup(sess.csrf).await;
        let made = accounts::find_by_email(&*state.store, "new@example.com");
        assert!(made.await.unwrap().is_some());
    }
}
