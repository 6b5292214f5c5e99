//! `GET /oauth2/authorize` and the end of the flow: consent decision and the code redirect.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{RawQuery, State};
use axum::response::{IntoResponse, Response};
use gatehouse_crds::GrantType;
use http::{HeaderMap, HeaderValue, StatusCode, header};
use serde::{Deserialize, Serialize};

use super::session::{self, Pending, Session};
use super::{PeerIp, redirect};
use crate::pages;
use crate::snapshot::{ClientRuntime, Snapshot};
use crate::state::AppState;
use crate::store::{Store, StoreError, kv, unix_now};
use crate::tokens;

/// Codes live at most 60 s.
pub const CODE_TTL: u64 = 60;

/// What the store keeps for an authorization code, under the SHA-256 of the code.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct CodeRecord {
    pub client_id: String,
    pub redirect_uri: String,
    /// Whether the authorization request carried redirect_uri (RFC 6749 4.1.3: the token
    /// request must then carry the same value; otherwise it may leave it out).
    #[serde(default = "yes")]
    pub redirect_uri_sent: bool,
    pub code_challenge: String,
    pub user_id: String,
    pub scope: String,
    pub grant_id: String,
    pub expires_at: u64,
    /// The subscription that held `client_id` and its Api when the code was issued: a client
    /// id taken over by another Subscription meanwhile (explicit spec.clientId), or moved to
    /// another Api, does not redeem it. Empty in codes issued before these were recorded.
    #[serde(default)]
    pub subscription: String,
    #[serde(default)]
    pub api: String,
}

/// Serde default for records written before `redirect_uri_sent` existed: they always had one.
pub fn yes() -> bool {
    true
}

pub fn code_key(code: &str) -> String {
    format!("code:{}", hex::encode(tokens::hash(code)))
}

/// Where a spent code leaves the id of the grant it started, so a replay can revoke it.
pub fn used_code_key(code: &str) -> String {
    format!("usedcode:{}", hex::encode(tokens::hash(code)))
}

pub fn consent_key(user_id: &str, client: &ClientRuntime) -> String {
    format!(
        "consent:{user_id}:{}:{}",
        client.cfg.application, client.cfg.api
    )
}

/// The longest `state` an app may send (RFC 6749 sets no limit; apps send a random value of a
/// few dozen characters).
pub const MAX_STATE_LEN: usize = 2_048;

/// Sign-in requests (each stores a pending request, and a session for a new browser, for
/// `PENDING_TTL`) one client address may start per minute on one replica: a burst of this many,
/// then one every 60/N seconds. Generous for people behind a shared address (carrier NAT),
/// while one address can keep at most about N * 11 requests parked per replica.
pub const MAX_SIGN_IN_STARTS_PER_MINUTE: u64 = 120;

/// HTML error page for problems that must not be redirected (unknown client, bad redirect_uri).
pub fn error_page(status: StatusCode, title: &str, message: &str) -> Response {
    pages::respond(status, pages::error(title, message))
}

pub fn store_error_page(e: StoreError) -> Response {
    tracing::error!(error = %e, "store failure in the login flow");
    super::error_pages::known(super::error_pages::UNAVAILABLE)
}

/// 303 to the app's redirect URI with the given parameters plus `state` and `iss` (RFC 9207).
pub fn redirect_to_app(
    issuer: &str,
    redirect_uri: &str,
    state: Option<&str>,
    params: &[(&str, &str)],
) -> Response {
    let mut all: Vec<(&str, &str)> = params.to_vec();
    if let Some(s) = state {
        all.push(("state", s));
    }
    all.push(("iss", issuer));
    see_other(&redirect::with_params(redirect_uri, &all))
}

pub fn see_other(location: &str) -> Response {
    match HeaderValue::from_str(location) {
        Ok(v) => {
            let mut r = StatusCode::SEE_OTHER.into_response();
            r.headers_mut().insert(header::LOCATION, v);
            r.headers_mut()
                .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            r.headers_mut().insert(
                header::REFERRER_POLICY,
                HeaderValue::from_static("no-referrer"),
            );
            r
        }
        Err(_) => error_page(
            StatusCode::BAD_REQUEST,
            "Invalid redirect",
            "The redirect address is not valid.",
        ),
    }
}

fn parse_query(raw: Option<&str>) -> Result<HashMap<String, String>, String> {
    let mut map = HashMap::new();
    for (k, v) in url::form_urlencoded::parse(raw.unwrap_or("").as_bytes()) {
        if map.insert(k.to_string(), v.to_string()).is_some() {
            return Err(format!("parameter {} is repeated", super::shown(&k)));
        }
    }
    Ok(map)
}

pub async fn handle(
    State(state): State<Arc<AppState>>,
    RawQuery(query): RawQuery,
    PeerIp(ip): PeerIp,
    headers: HeaderMap,
) -> Response {
    let snap = state.config.load_full();
    let q = match parse_query(query.as_deref()) {
        Ok(q) => q,
        Err(e) => return error_page(StatusCode::BAD_REQUEST, "Invalid sign-in request", &e),
    };
    let get = |k: &str| q.get(k).map(String::as_str).filter(|v| !v.is_empty());

    // 1. Client and redirect URI: failures here are never redirected (the target is unverified).
    let Some(client) = get("client_id").and_then(|id| snap.client(id)) else {
        return error_page(
            StatusCode::BAD_REQUEST,
            "Unknown application",
            "This sign-in link names an application that is not registered. Please contact the app's developer.",
        );
    };
    let redirect_uri = match get("redirect_uri") {
        Some(r) if redirect::matches(&client.cfg.redirect_uris, r) => r.to_string(),
        Some(_) => {
            return error_page(
                StatusCode::BAD_REQUEST,
                "Invalid redirect address",
                "The app asked to return to an address that is not registered for it. Please contact the app's developer.",
            );
        }
        // Without redirect_uri only an unambiguous single registration is acceptable.
        None if client.cfg.redirect_uris.len() == 1
            && !client.cfg.redirect_uris[0].starts_with("http://") =>
        {
            client.cfg.redirect_uris[0].clone()
        }
        None => {
            return error_page(
                StatusCode::BAD_REQUEST,
                "Missing redirect address",
                "The sign-in link has no redirect_uri. Please contact the app's developer.",
            );
        }
    };
    // Kept in the store with the pending request until sign-in: bounded, so anonymous requests
    // cannot park megabytes each (answered on a page: redirecting would carry it back).
    if get("state").is_some_and(|s| s.len() > MAX_STATE_LEN) {
        return error_page(
            StatusCode::BAD_REQUEST,
            "Sign-in link too long",
            &format!(
                "The sign-in link's state parameter is longer than {MAX_STATE_LEN} characters. Please contact the app's developer."
            ),
        );
    }
    let app_state = get("state").map(str::to_string);
    let fail = |code: &str, desc: &str| {
        redirect_to_app(
            &state.issuer,
            &redirect_uri,
            app_state.as_deref(),
            &[("error", code), ("error_description", desc)],
        )
    };

    // 2. Everything else goes back to the app as an error redirect.
    match get("response_type") {
        Some("code") => {}
        Some(_) => {
            return fail(
                "unsupported_response_type",
                "only response_type=code is supported",
            );
        }
        None => return fail("invalid_request", "response_type is required"),
    }
    if !client.cfg.grants.contains(&GrantType::AuthorizationCode) {
        return fail(
            "unauthorized_client",
            "this client may not use the authorization code grant",
        );
    }
    let Some(challenge) = get("code_challenge") else {
        return fail(
            "invalid_request",
            "code_challenge is required (PKCE with S256)",
        );
    };
    if get("code_challenge_method") != Some("S256") {
        return fail("invalid_request", "code_challenge_method must be S256");
    }
    if !super::pkce::valid_challenge(challenge) {
        return fail(
            "invalid_request",
            "code_challenge must be the base64url SHA-256 of the code verifier (43 characters)",
        );
    }
    let scope = match super::token::check_scopes(&snap, client, get("scope")) {
        Ok(s) => s,
        Err(_) => {
            return fail(
                "invalid_scope",
                "a requested scope is not offered by this API",
            );
        }
    };

    // 3. Remember the request on the server, bound to this browser's session. Anyone holding
    // a public client id could otherwise fill the store with parked requests: each address
    // has a share per minute. A browser signed in here counts as its user instead, so a flood
    // from its network (or from everyone, behind an ingress not listed in --trusted-proxies)
    // does not lock it out; signed-in sessions only come from throttled logins. Counted
    // before the writes, so a request that then fails on the store still used its share.
    let existing = match session::load(&*state.store, &headers, state.secure_cookies()).await {
        Ok(s) => s,
        Err(e) => return store_error_page(e),
    };
    let counted_as = match existing.as_ref().and_then(|(_, s)| s.user_id.as_deref()) {
        Some(user) => format!("user:{user}"),
        None => ip,
    };
    if !state.sign_in_starts.allow(&counted_as) {
        metrics::counter!("gatehouse_authorize_throttled_total").increment(1);
        return fail(
            "temporarily_unavailable",
            "too many sign-in requests from this network; try again in a minute",
        );
    }
    let (sid, mut sess, new_cookie) = match existing {
        Some((sid, s)) => (sid, s, false),
        None => match session::create(&*state.store, None).await {
            Ok((sid, s)) => (sid, s, true),
            Err(e) => return store_error_page(e),
        },
    };
    let pending = Pending {
        session: session::session_binding(&sid),
        client_id: client.cfg.client_id.clone(),
        redirect_uri: redirect_uri.clone(),
        redirect_uri_sent: get("redirect_uri").is_some(),
        state: app_state.clone(),
        scope,
        code_challenge: challenge.to_string(),
        created_at: unix_now(),
        confirm: sess.user_id.is_some()
            && !client.cfg.trusted
            && client.cfg.client_type == gatehouse_crds::ClientType::Public,
    };
    let req_id = match session::put_pending(&*state.store, &pending).await {
        Ok(id) => id,
        Err(e) => return store_error_page(e),
    };
    match session::attach_pending(&*state.store, &sid, &mut sess, &req_id).await {
        Ok(true) => {}
        // Signed out by another request (or expired) since it was loaded: it stays gone.
        Ok(false) => return super::login::session_expired(),
        Err(e) => return store_error_page(e),
    }
    let mut resp = match &sess.user_id {
        // Already signed in here: straight on to consent or the code.
        Some(_) => see_other(&format!("/consent?req={req_id}")),
        None => {
            let form = pages::Form {
                csrf: &sess.csrf,
                request_id: &req_id,
            };
            pages::respond(
                StatusCode::OK,
                pages::login(
                    &form,
                    &client.cfg.application_name,
                    "",
                    None,
                    &format!("/signup?req={req_id}"),
                ),
            )
        }
    };
    if new_cookie {
        resp.headers_mut().insert(
            header::SET_COOKIE,
            session::set_cookie(&sid, state.secure_cookies()),
        );
    }
    resp
}

/// Scopes in `requested` that the user has not yet granted to this application and API.
pub fn new_scopes<'a>(requested: &'a str, granted: &[String]) -> Vec<&'a str> {
    requested
        .split(' ')
        .filter(|s| !s.is_empty() && !granted.iter().any(|g| g == s))
        .collect()
}

/// After login: either the consent page is needed, or the code goes to the app.
pub enum Next {
    Consent(Vec<String>),
    Redirect(Response),
}

/// Decides what follows for a signed-in user and, when no consent is needed, issues the code
/// (consuming the pending request).
pub async fn proceed(
    state: &AppState,
    snap: &Snapshot,
    req_id: &str,
    sid: &str,
    user_id: &str,
) -> Result<Next, Response> {
    let pending = session::get_pending(&*state.store, req_id, sid)
        .await
        .map_err(store_error_page)?
        .ok_or_else(expired_request_page)?;
    let client = snap.client(&pending.client_id).ok_or_else(|| {
        error_page(
            StatusCode::BAD_REQUEST,
            "Unknown application",
            "This application is no longer registered.",
        )
    })?;
    if !client.cfg.trusted && (pending.confirm || !pending.scope.is_empty()) {
        let granted: Vec<String> = kv::get(&*state.store, &consent_key(user_id, client))
            .await
            .map_err(store_error_page)?
            .unwrap_or_default();
        let missing = new_scopes(&pending.scope, &granted);
        // With `confirm` the page is shown even when it lists nothing new.
        if !missing.is_empty() || pending.confirm {
            return Ok(Next::Consent(
                missing.into_iter().map(str::to_string).collect(),
            ));
        }
    }
    Ok(Next::Redirect(
        issue_code(state, req_id, sid, user_id).await?,
    ))
}

pub fn expired_request_page() -> Response {
    super::error_pages::known(super::error_pages::REQUEST_EXPIRED)
}

/// The subscription and Api of the pending request's client if the client still has its
/// redirect URI: an administrator may have removed either (a leaked or hijacked URI) in the
/// minutes since the request was checked.
fn still_registered(state: &AppState, p: &Pending) -> Option<(String, String)> {
    state
        .config
        .load()
        .client(&p.client_id)
        .filter(|c| super::redirect::matches(&c.cfg.redirect_uris, &p.redirect_uri))
        .map(|c| (c.cfg.subscription.clone(), c.cfg.api.clone()))
}

fn unregistered_page() -> Response {
    super::error_pages::known(super::error_pages::UNREGISTERED)
}

/// Consumes the pending request and redirects to the app with a fresh single-use code.
pub async fn issue_code(
    state: &AppState,
    req_id: &str,
    sid: &str,
    user_id: &str,
) -> Result<Response, Response> {
    let store: &dyn Store = &*state.store;
    let pending = session::take_pending(store, req_id, sid)
        .await
        .map_err(store_error_page)?
        .ok_or_else(expired_request_page)?;
    let Some((subscription, api)) = still_registered(state, &pending) else {
        return Err(unregistered_page());
    };
    let code = tokens::generate();
    let record = CodeRecord {
        client_id: pending.client_id.clone(),
        redirect_uri: pending.redirect_uri.clone(),
        redirect_uri_sent: pending.redirect_uri_sent,
        code_challenge: pending.code_challenge.clone(),
        user_id: user_id.to_string(),
        scope: pending.scope.clone(),
        grant_id: uuid::Uuid::new_v4().to_string(),
        expires_at: unix_now() + CODE_TTL,
        subscription,
        api,
    };
    kv::put(store, &code_key(&code), &record, CODE_TTL)
        .await
        .map_err(store_error_page)?;
    metrics::counter!("gatehouse_authorization_codes_issued_total").increment(1);
    Ok(redirect_to_app(
        &state.issuer,
        &pending.redirect_uri,
        pending.state.as_deref(),
        &[("code", &code)],
    ))
}

/// Denied consent: access_denied to the app, pending request consumed.
pub async fn deny(state: &AppState, req_id: &str, sid: &str) -> Response {
    match session::take_pending(&*state.store, req_id, sid).await {
        Ok(Some(p)) if still_registered(state, &p).is_none() => unregistered_page(),
        Ok(Some(p)) => redirect_to_app(
            &state.issuer,
            &p.redirect_uri,
            p.state.as_deref(),
            &[
                ("error", "access_denied"),
                ("error_description", "the user denied access"),
            ],
        ),
        Ok(None) => expired_request_page(),
        Err(e) => store_error_page(e),
    }
}

/// Helper for handlers holding a session: makes sure the session is saved with a flash message.
pub async fn flash(
    state: &AppState,
    sid: &str,
    sess: &mut Session,
    msg: &str,
    email: Option<&str>,
) {
    sess.flash = Some(msg.to_string());
    // Shown again only when it could be an address: any other text (a megabyte of control
    // characters) would be stored in the session as sent.
    sess.flash_email = email
        .filter(|e| e.len() <= crate::accounts::MAX_EMAIL_LEN && !e.chars().any(char::is_control))
        .map(str::to_string);
    if let Err(e) = session::save(&*state.store, sid, sess).await {
        tracing::warn!(error = %e, "cannot save flash message");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_new_scopes_are_asked() {
        let granted = vec!["profile".to_string()];
        assert_eq!(new_scopes("profile orders", &granted), vec!["orders"]);
        assert!(new_scopes("profile", &granted).is_empty());
        assert!(new_scopes("", &granted).is_empty());
    }

    #[test]
    fn repeated_query_parameters_are_refused() {
        assert!(parse_query(Some("a=1&a=2")).is_err());
        assert_eq!(parse_query(Some("a=1&b=x+y")).unwrap()["b"], "x y");
    }
}
