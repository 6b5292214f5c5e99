//! Browser state of the login flow: a session cookie (HttpOnly, SameSite=Lax, Secure on https
//! issuers) naming a server-side session with its CSRF token, and pending authorization
//! requests bound to that session.

use http::{HeaderMap, HeaderValue, header};
use serde::{Deserialize, Serialize};

use crate::store::{Store, StoreResult, kv, unix_now};
use crate::tokens;

pub const COOKIE: &str = "gatehouse_session";
/// The name on https issuers: browsers accept a `__Host-` cookie only when Secure, with Path=/
/// and no Domain, so a sibling subdomain or a plain-http page cannot plant one (login CSRF by
/// a cookie with a longer Path, which the browser would send first).
pub const SECURE_COOKIE: &str = "__Host-gatehouse_session";

/// The session cookie's name for an issuer with (`secure`) or without https.
pub fn cookie_name(secure: bool) -> &'static str {
    if secure { SECURE_COOKIE } else { COOKIE }
}

/// The device cookie (`login.rs`): which account last signed in on this browser. Its name
/// starts like the session cookie's, so the proxy's one scan for `gatehouse_session` also
/// keeps it from backends.
pub const DEVICE_COOKIE: &str = "gatehouse_session_device";
pub const SECURE_DEVICE_COOKIE: &str = "__Host-gatehouse_session_device";
/// How long a browser stays known to an account after a sign-in on it.
pub const DEVICE_TTL: u64 = 180 * 24 * 3_600;

/// The device cookie's name for an issuer with (`secure`) or without https.
pub fn device_cookie_name(secure: bool) -> &'static str {
    if secure {
        SECURE_DEVICE_COOKIE
    } else {
        DEVICE_COOKIE
    }
}

/// The gateway's cookies, in either spelling: what the proxy keeps from backends in both
/// directions.
pub fn is_cookie_name(name: &[u8]) -> bool {
    [COOKIE, SECURE_COOKIE, DEVICE_COOKIE, SECURE_DEVICE_COOKIE]
        .iter()
        .any(|n| name == n.as_bytes())
}
/// A browser session lasts 8 hours; a pending authorization 10 minutes.
pub const SESSION_TTL: u64 = 8 * 3_600;
pub const PENDING_TTL: u64 = 600;

#[derive(Serialize, Deserialize, Clone, Debug, Default)]
pub struct Session {
    pub user_id: Option<String>,
    pub csrf: String,
    /// A one-time message for the next page (after a 303).
    #[serde(default)]
    pub flash: Option<String>,
    #[serde(default)]
    pub flash_email: Option<String>,
    /// When its lifetime started (unix s): a sign-in for a signed-in session, the latest
    /// pending request for an anonymous one. Saving again (a flash message) does not extend
    /// it, so a stolen session cookie ends with the session it was taken from. Sessions saved
    /// before this field start counting at their next load.
    #[serde(default = "unix_now")]
    pub started_at: u64,
    /// Ids of its open pending requests, oldest first (`attach_pending`).
    #[serde(default)]
    pub pending: Vec<String>,
}

/// Open sign-in requests one browser session keeps: a new one past this drops the oldest, so a
/// session (a signed-in one counts per user, not per address) cannot park requests without
/// bound.
pub const MAX_PENDING_PER_SESSION: usize = 10;

/// An authorization request that passed validation and waits for login/consent.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct Pending {
    /// SHA-256 (hex) of the session id it belongs to.
    pub session: String,
    pub client_id: String,
    pub redirect_uri: String,
    /// Whether the request named redirect_uri (then the token request must repeat it) or left
    /// it to the single registered one.
    #[serde(default = "super::authorize::yes")]
    pub redirect_uri_sent: bool,
    pub state: Option<String>,
    /// Requested scopes, space-separated, validated.
    pub scope: String,
    pub code_challenge: String,
    pub created_at: u64,
    /// The user must click Allow even for scopes granted before (or none): the browser was
    /// already signed in when the request came, so nobody typed a password for it, and the
    /// client is an untrusted public one, whose identity nothing proves (RFC 8252 8.6: another
    /// app can claim its redirect URI and start the request).
    #[serde(default)]
    pub confirm: bool,
}

fn session_key(sid: &str) -> String {
    format!("session:{}", hex::encode(tokens::hash(sid)))
}

pub fn session_binding(sid: &str) -> String {
    hex::encode(tokens::hash(sid))
}

fn pending_key(id: &str) -> String {
    format!("authreq:{id}")
}

/// The session id from the Cookie header(s). Two cookies of the name mean none: the second
/// one came from somewhere else than the gateway (a sibling domain, another Path).
pub fn cookie_sid(headers: &HeaderMap, secure: bool) -> Option<String> {
    cookie_token(headers, cookie_name(secure))
}

/// The device cookie's token, read as the session id is.
pub fn device_token(headers: &HeaderMap, secure: bool) -> Option<String> {
    cookie_token(headers, device_cookie_name(secure))
}

fn cookie_token(headers: &HeaderMap, name: &str) -> Option<String> {
    let mut values = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .filter(|(k, _)| *k == name)
        .map(|(_, v)| v);
    match (values.next(), values.next()) {
        (Some(v), None) if tokens::looks_like_token(v) => Some(v.to_string()),
        _ => None,
    }
}

pub async fn load(
    store: &dyn Store,
    headers: &HeaderMap,
    secure: bool,
) -> StoreResult<Option<(String, Session)>> {
    let Some(sid) = cookie_sid(headers, secure) else {
        return Ok(None);
    };
    Ok(kv::get::<Session>(store, &session_key(&sid))
        .await?
        .map(|s| (sid, s)))
}

/// A new session with a fresh id and CSRF token, already saved.
pub async fn create(store: &dyn Store, user_id: Option<String>) -> StoreResult<(String, Session)> {
    let sid = tokens::generate();
    let session = Session {
        user_id,
        csrf: tokens::generate(),
        flash: None,
        flash_email: None,
        started_at: unix_now(),
        pending: Vec::new(),
    };
    let key = session_key(&sid);
    kv::put(store, &key, &session, ttl_left(&session, unix_now())).await?;
    Ok((sid, session))
}

/// How long a session lives from `started_at`. One nobody signed in to only serves a pending
/// request, which lives 10 minutes: it goes with it, so cookieless requests cannot pile up
/// 8-hour sessions.
fn lifetime(session: &Session) -> u64 {
    if session.user_id.is_some() {
        SESSION_TTL
    } else {
        PENDING_TTL
    }
}

/// Seconds the session has left at `now` (at least 1, so a save never keeps it for ever). Pure.
pub fn ttl_left(session: &Session, now: u64) -> u64 {
    (session.started_at.saturating_add(lifetime(session)))
        .saturating_sub(now)
        .max(1)
}

/// Saves a session that was loaded. False when it is gone: signed out (or replaced at sign-in)
/// by another request since it was loaded, which a save must not undo.
pub async fn save(store: &dyn Store, sid: &str, session: &Session) -> StoreResult<bool> {
    kv::put_existing(
        store,
        &session_key(sid),
        session,
        ttl_left(session, unix_now()),
    )
    .await
}

/// Records a new pending request in its session and deletes the session's oldest ones past
/// `MAX_PENDING_PER_SESSION`. An anonymous session lives as long as its newest request then
/// (a sign-in started again after 9 minutes must not lose its session a minute later); a
/// signed-in one keeps its end. False when the session is gone (`save`): the new request is
/// deleted then, and the session's others are left as they are.
pub async fn attach_pending(
    store: &dyn Store,
    sid: &str,
    session: &mut Session,
    id: &str,
) -> StoreResult<bool> {
    session.pending.push(id.to_string());
    let excess = session
        .pending
        .len()
        .saturating_sub(MAX_PENDING_PER_SESSION);
    let dropped: Vec<String> = session.pending.drain(..excess).collect();
    if session.user_id.is_none() {
        session.started_at = unix_now();
    }
    if !save(store, sid, session).await? {
        store.kv_delete(&pending_key(id)).await?;
        return Ok(false);
    }
    for old in dropped {
        store.kv_delete(&pending_key(&old)).await?;
    }
    Ok(true)
}

pub async fn destroy(store: &dyn Store, sid: &str) -> StoreResult<()> {
    store.kv_delete(&session_key(sid)).await
}

/// Tells the browser to forget the session cookie.
pub fn clear_cookie(secure: bool) -> HeaderValue {
    let (name, secure) = (cookie_name(secure), if secure { "; Secure" } else { "" });
    HeaderValue::from_str(&format!(
        "{name}=; Path=/; HttpOnly; SameSite=Lax; Max-Age=0{secure}"
    ))
    .expect("static cookie is header-safe")
}

pub fn set_cookie(sid: &str, secure: bool) -> HeaderValue {
    let (name, secure) = (cookie_name(secure), if secure { "; Secure" } else { "" });
    HeaderValue::from_str(&format!(
        "{name}={sid}; Path=/; HttpOnly; SameSite=Lax; Max-Age={SESSION_TTL}{secure}"
    ))
    .expect("token is header-safe")
}

/// The device cookie: HttpOnly, SameSite=Lax, `__Host-` and Secure on https issuers, like the
/// session's, for as long as the device record lives.
pub fn set_device_cookie(token: &str, secure: bool) -> HeaderValue {
    let (name, secure) = (
        device_cookie_name(secure),
        if secure { "; Secure" } else { "" },
    );
    HeaderValue::from_str(&format!(
        "{name}={token}; Path=/; HttpOnly; SameSite=Lax; Max-Age={DEVICE_TTL}{secure}"
    ))
    .expect("token is header-safe")
}

pub fn csrf_ok(session: &Session, presented: Option<&str>) -> bool {
    presented.is_some_and(|p| tokens::constant_time_eq(p.as_bytes(), session.csrf.as_bytes()))
}

pub async fn put_pending(store: &dyn Store, p: &Pending) -> StoreResult<String> {
    let id = tokens::generate();
    kv::put(store, &pending_key(&id), p, PENDING_TTL).await?;
    Ok(id)
}

/// Rewrites a pending request that exists; false when it is gone (taken or expired since it
/// was read), which a rewrite must not bring back.
pub async fn update_pending(store: &dyn Store, id: &str, p: &Pending) -> StoreResult<bool> {
    let left = (p.created_at + PENDING_TTL)
        .saturating_sub(unix_now())
        .max(1);
    kv::put_existing(store, &pending_key(id), p, left).await
}

/// The pending request if it exists and belongs to this session.
pub async fn get_pending(store: &dyn Store, id: &str, sid: &str) -> StoreResult<Option<Pending>> {
    if !tokens::looks_like_token(id) {
        return Ok(None);
    }
    let p: Option<Pending> = kv::get(store, &pending_key(id)).await?;
    Ok(p.filter(|p| {
        tokens::constant_time_eq(p.session.as_bytes(), session_binding(sid).as_bytes())
    }))
}

/// Consumes the pending request (one code per authorization request).
pub async fn take_pending(store: &dyn Store, id: &str, sid: &str) -> StoreResult<Option<Pending>> {
    if get_pending(store, id, sid).await?.is_none() {
        return Ok(None);
    }
    kv::take(store, &pending_key(id)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookie_parsing() {
        let sid = tokens::generate();
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            format!("a=b; {COOKIE}={sid}; c=d").parse().unwrap(),
        );
        assert_eq!(cookie_sid(&h, false), Some(sid.clone()));
        // On an https issuer only the __Host- name counts.
        assert_eq!(cookie_sid(&h, true), None);
        let secure = format!("{COOKIE}=x; {SECURE_COOKIE}={sid}");
        h.insert(header::COOKIE, secure.parse().unwrap());
        assert_eq!(cookie_sid(&h, true), Some(sid.clone()));
        h.insert(header::COOKIE, format!("{COOKIE}=short").parse().unwrap());
        assert_eq!(cookie_sid(&h, false), None);
        // Two of the name (one planted for a longer Path): no session at all.
        let other = tokens::generate();
        let two = format!("{COOKIE}={other}; {COOKIE}={sid}");
        h.insert(header::COOKIE, two.parse().unwrap());
        assert_eq!(cookie_sid(&h, false), None);
        h.insert(header::COOKIE, format!("{COOKIE}={sid}").parse().unwrap());
        h.append(header::COOKIE, format!("{COOKIE}={other}").parse().unwrap());
        assert_eq!(cookie_sid(&h, false), None);
    }

    #[test]
    fn device_cookies() {
        let token = tokens::generate();
        let mut h = HeaderMap::new();
        let both = format!("{COOKIE}={}; {DEVICE_COOKIE}={token}", tokens::generate());
        h.insert(header::COOKIE, both.parse().unwrap());
        assert_eq!(device_token(&h, false), Some(token.clone()));
        assert_ne!(cookie_sid(&h, false), Some(token.clone()));
        assert_eq!(device_token(&h, true), None);
        let c = set_device_cookie(&token, true);
        let c = c.to_str().unwrap();
        assert!(
            c.starts_with(&format!("{SECURE_DEVICE_COOKIE}={token};")),
            "{c}"
        );
        assert!(c.contains("HttpOnly") && c.contains("SameSite=Lax") && c.contains("; Secure"));
        assert!(c.contains("; Path=/;") && !c.contains("Domain"));
        for name in [COOKIE, SECURE_COOKIE, DEVICE_COOKIE, SECURE_DEVICE_COOKIE] {
            assert!(is_cookie_name(name.as_bytes()), "{name}");
        }
        assert!(!is_cookie_name(b"gatehouse_session_x"));
    }

    #[test]
    fn only_signed_in_sessions_are_kept_for_hours_counted_from_their_start() {
        let t0 = 1_000_000;
        let anonymous = Session {
            started_at: t0,
            ..Session::default()
        };
        assert_eq!(ttl_left(&anonymous, t0), PENDING_TTL);
        let signed_in = Session {
            user_id: Some("u1".into()),
            started_at: t0,
            ..Session::default()
        };
        assert_eq!(ttl_left(&signed_in, t0), SESSION_TTL);
        // Saving later (a flash message) keeps the end where it was; past it, 1 s.
        assert_eq!(ttl_left(&signed_in, t0 + 3_600), SESSION_TTL - 3_600);
        assert_eq!(ttl_left(&signed_in, t0 + SESSION_TTL + 50), 1);
        // A session saved before `started_at` existed starts counting when loaded.
        let old: Session = serde_json::from_str(r#"{"user_id":"u1","csrf":"c"}"#).unwrap();
        assert!(old.started_at + 5 >= unix_now());
    }

    /// A pending sign-in request of session `sid`.
    fn pending_of(sid: &str) -> Pending {
        Pending {
            session: session_binding(sid),
            client_id: "c".into(),
            redirect_uri: "app:/cb".into(),
            redirect_uri_sent: true,
            state: None,
            scope: String::new(),
            code_challenge: "x".into(),
            created_at: unix_now(),
            confirm: false,
        }
    }

    /// A session keeps its newest `MAX_PENDING_PER_SESSION` requests (older ones are deleted),
    /// and a new request gives an anonymous session the request's 10 minutes again while a
    /// signed-in one keeps the end of its 8 hours.
    #[tokio::test]
    async fn a_session_keeps_its_newest_requests_and_only_an_anonymous_one_is_renewed() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::embedded::EmbeddedStore::open(dir.path()).unwrap();
        let long_ago = unix_now() - 540;
        for (user_id, renewed) in [(None, true), (Some("u1".to_string()), false)] {
            let (sid, mut s) = create(&store, user_id).await.unwrap();
            s.started_at = long_ago;
            save(&store, &sid, &s).await.unwrap();
            let mut ids = vec![];
            for _ in 0..MAX_PENDING_PER_SESSION + 2 {
                let id = put_pending(&store, &pending_of(&sid)).await.unwrap();
                attach_pending(&store, &sid, &mut s, &id).await.unwrap();
                ids.push(id);
            }
            assert_eq!(s.started_at != long_ago, renewed);
            let kept: Session = kv::get(&store, &session_key(&sid)).await.unwrap().unwrap();
            assert_eq!(kept.started_at, s.started_at);
            assert_eq!(kept.pending, ids[2..]);
            for (i, id) in ids.iter().enumerate() {
                let open = get_pending(&store, id, &sid).await.unwrap().is_some();
                assert_eq!(open, i >= 2, "request {i}");
            }
        }
    }

    /// A request that loaded the session before another signed it out saves nothing: the
    /// session stays gone, and a sign-in request it was starting is deleted with it.
    #[tokio::test]
    async fn a_save_after_sign_out_does_not_bring_the_session_back() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::embedded::EmbeddedStore::open(dir.path()).unwrap();
        let (sid, mut s) = create(&store, Some("u1".into())).await.unwrap();
        s.flash = Some("saved".into());
        assert!(save(&store, &sid, &s).await.unwrap());
        destroy(&store, &sid).await.unwrap();
        assert!(!save(&store, &sid, &s).await.unwrap());
        let id = put_pending(&store, &pending_of(&sid)).await.unwrap();
        assert!(!attach_pending(&store, &sid, &mut s, &id).await.unwrap());
        let gone = kv::get::<Session>(&store, &session_key(&sid))
            .await
            .unwrap();
        assert!(gone.is_none(), "the session came back");
        assert!(get_pending(&store, &id, &sid).await.unwrap().is_none());
    }

    #[test]
    fn cookie_attributes() {
        let c = set_cookie("x", true);
        let c = c.to_str().unwrap();
        assert!(c.contains("HttpOnly") && c.contains("SameSite=Lax") && c.contains("Secure"));
        assert!(c.starts_with("__Host-gatehouse_session=x;") && c.contains("; Path=/;"));
        assert!(!c.contains("Domain"));
        let plain = set_cookie("x", false);
        assert!(plain.to_str().unwrap().starts_with("gatehouse_session=x;"));
        assert!(!plain.to_str().unwrap().contains("Secure"));
        assert!(
            clear_cookie(true)
                .to_str()
                .unwrap()
                .starts_with("__Host-gatehouse_session=;")
        );
    }

    #[test]
    fn csrf_compare() {
        let s = Session {
            csrf: "abc".into(),
            ..Default::default()
        };
        assert!(csrf_ok(&s, Some("abc")));
        assert!(!csrf_ok(&s, Some("abd")));
        assert!(!csrf_ok(&s, None));
    }
}
