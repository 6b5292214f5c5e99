//! `POST /oauth2/token`.

use std::sync::Arc;

use super::OAuthBody;
use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use gatehouse_crds::{ClientType, GrantType};
use http::HeaderMap;
use serde::Serialize;

use super::authorize::{CodeRecord, code_key, used_code_key};
use super::client_auth;
use super::form::Form;
use super::no_store;
use super::pkce;
use crate::accounts;
use crate::error::{GatewayError, OAuthErrorCode, oauth};
use crate::snapshot::{ClientRuntime, Snapshot};
use crate::state::AppState;
use crate::store::{TokenKind, TokenRecord, kv, unix_now};
use crate::tokens;

#[derive(Serialize, Debug)]
pub struct TokenResponse {
    pub access_token: String,
    pub token_type: &'static str,
    pub expires_in: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refresh_token: Option<String>,
    /// Left out when nothing was granted: a scope value has at least one token (RFC 6749 3.3).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub scope: String,
}

pub async fn handle(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    OAuthBody(body): OAuthBody,
) -> Response {
    let answer =
        super::to_completion(|gone| async move { token(&state, &headers, &body, &gone).await });
    match answer.await {
        Ok(resp) => {
            let mut r = Json(resp).into_response();
            no_store(r.headers_mut());
            r
        }
        Err(e) => e.into_response(),
    }
}

/// `gone`: cancelled once the client no longer waits for the answer (`to_completion`).
async fn token(
    state: &AppState,
    headers: &HeaderMap,
    body: &[u8],
    gone: &tokio_util::sync::CancellationToken,
) -> Result<TokenResponse, GatewayError> {
    let form = Form::parse(headers, body)?;
    let grant_type = form.require("grant_type")?;
    let snap = state.config.load_full();
    let presented = client_auth::presented(headers, &form)?;
    let client = client_auth::authenticate(&snap, &presented)?;
    match grant_type {
        "client_credentials" => client_credentials(state, &snap, client, &form).await,
        "authorization_code" => authorization_code(state, &snap, client, &form).await,
        "refresh_token" => super::refresh::refresh_token(state, &snap, client, &form, gone).await,
        other => Err(oauth(
            OAuthErrorCode::UnsupportedGrantType,
            format!("grant_type {} is not supported", super::shown(other)),
        )),
    }
}

/// Scopes requested, checked against the Api's; returns them normalized (space-separated,
/// deduplicated, in request order).
pub fn check_scopes(
    snap: &Snapshot,
    client: &ClientRuntime,
    requested: Option<&str>,
) -> Result<String, GatewayError> {
    let mut out: Vec<&str> = Vec::new();
    for s in requested.unwrap_or("").split(' ').filter(|s| !s.is_empty()) {
        if !offers(snap, client, s) {
            return Err(oauth(
                OAuthErrorCode::InvalidScope,
                format!("scope {} is not offered by this API", super::shown(s)),
            ));
        }
        if !out.contains(&s) {
            out.push(s);
        }
    }
    Ok(out.join(" "))
}

/// Whether the client's Api offers `scope` now.
fn offers(snap: &Snapshot, client: &ClientRuntime, scope: &str) -> bool {
    snap.apis[client.api]
        .cfg
        .scopes
        .iter()
        .any(|known| known.name == scope)
}

/// `granted` less the scopes the Api no longer offers. When that leaves none of a non-empty
/// grant, `invalid_scope`: a token response without `scope` says "all you asked for".
pub(super) fn still_offered(
    snap: &Snapshot,
    client: &ClientRuntime,
    granted: &str,
) -> Result<String, GatewayError> {
    let kept: Vec<&str> = granted
        .split(' ')
        .filter(|s| !s.is_empty() && offers(snap, client, s))
        .collect();
    if kept.is_empty() && !granted.trim().is_empty() {
        return Err(oauth(
            OAuthErrorCode::InvalidScope,
            "the Api offers none of the granted scopes any more; authorize again",
        ));
    }
    Ok(kept.join(" "))
}

pub(super) fn require_grant(client: &ClientRuntime, grant: GrantType) -> Result<(), GatewayError> {
    if client.cfg.grants.contains(&grant) {
        Ok(())
    } else {
        Err(oauth(
            OAuthErrorCode::UnauthorizedClient,
            format!("this client may not use the {} grant", grant.as_str()),
        ))
    }
}

async fn client_credentials(
    state: &AppState,
    snap: &Snapshot,
    client: &ClientRuntime,
    form: &Form,
) -> Result<TokenResponse, GatewayError> {
    if client.cfg.client_type != ClientType::Confidential {
        return Err(oauth(
            OAuthErrorCode::UnauthorizedClient,
            "client_credentials is only for confidential clients",
        ));
    }
    require_grant(client, GrantType::ClientCredentials)?;
    let scope = check_scopes(snap, client, form.get("scope"))?;
    within_issuance_limit(state, client, None)?;
    let ttl = snap.apis[client.api].cfg.access_token_ttl_seconds;
    let access_token = issue(
        state,
        client,
        Issue::Access,
        None,
        &scope,
        &uuid::Uuid::new_v4().to_string(),
        ttl,
    )
    .await?;
    Ok(TokenResponse {
        access_token,
        token_type: "Bearer",
        expires_in: ttl,
        refresh_token: None,
        scope,
    })
}

/// Default of `--max-token-grants-per-minute`.
pub const MAX_TOKEN_GRANTS_PER_MINUTE: u64 = 60;

/// Counts a grant against the issuance limit: per client and user, or per client for
/// client_credentials. Checked before anything is stored or spent, so a refused code or
/// refresh token still works when the client retries after `Retry-After`.
fn within_issuance_limit(
    state: &AppState,
    client: &ClientRuntime,
    user_id: Option<&str>,
) -> Result<(), GatewayError> {
    let key = match user_id {
        Some(user) => format!("{}\0{user}", client.cfg.client_id),
        None => client.cfg.client_id.clone(),
    };
    state
        .token_grants
        .admit(&key)
        .map_err(GatewayError::SlowDown)
}

pub(super) fn invalid_grant(desc: &str) -> GatewayError {
    oauth(OAuthErrorCode::InvalidGrant, desc)
}

pub(super) fn unavailable(e: crate::store::StoreError) -> GatewayError {
    tracing::error!(error = %e, "store failure at the token endpoint");
    oauth(
        OAuthErrorCode::TemporarilyUnavailable,
        "the token store is unavailable",
    )
}

/// Where a rotated refresh token from before families (`refresh.rs`) left its grant id, so
/// reuse can revoke the family.
pub(super) fn rotated_key(hash: &tokens::TokenHash) -> String {
    format!("rotated:{}", hex::encode(hash))
}

/// A spent code or rotated refresh token left a marker naming its client and grant: revoke
/// that grant when `client_id` is its client. Returns how many tokens went, or None when there
/// is no marker or it names another client.
pub(super) async fn revoke_marked_grant(
    state: &AppState,
    marker: &str,
    client_id: &str,
) -> Result<Option<usize>, GatewayError> {
    let Some(value) = kv::get::<String>(&*state.store, marker)
        .await
        .map_err(unavailable)?
    else {
        return Ok(None);
    };
    let grant_id = match parse_marker(&value) {
        (Some(owner), grant) if owner == client_id => grant,
        // Another client sending a spent code or token it saw: refused, and it cannot revoke
        // the owner's tokens (no tokens were ever issued to it from this grant).
        (Some(_), _) => return Ok(None),
        (None, grant) => grant,
    };
    let n = revoke_family(state, grant_id).await.map_err(unavailable)?;
    Ok(Some(n))
}

/// A spent code's or rotated refresh token's marker: "<client id> <grant id>". Markers
/// written before the client was recorded hold only the grant id. Pure.
pub(super) fn marker_value(client_id: &str, grant_id: &str) -> String {
    format!("{client_id} {grant_id}")
}

fn parse_marker(value: &str) -> (Option<&str>, &str) {
    // Grant ids are UUIDs: the last space separates them.
    match value.rsplit_once(' ') {
        Some((client, grant)) => (Some(client), grant),
        None => (None, value),
    }
}

/// Whether `revoke_family` ended this grant (within the last `REVOKED_GRANT_MEMORY`).
pub(super) async fn grant_revoked(state: &AppState, grant_id: &str) -> Result<bool, GatewayError> {
    Ok(kv::get::<bool>(&*state.store, &revoked_grant_key(grant_id))
        .await
        .map_err(unavailable)?
        .is_some())
}

/// Marks a grant revoked for as long as tokens could still be issued into it (a code exchange
/// or refresh that was already past its checks when the grant was revoked).
const REVOKED_GRANT_MEMORY: u64 = 24 * 3_600;

fn revoked_grant_key(grant_id: &str) -> String {
    format!("revokedgrant:{grant_id}")
}

/// Revokes every token of a grant, and leaves a mark that makes any token issued into it
/// afterwards (by a request already under way) revoke itself (`token_pair`). Returns how many
/// tokens went.
pub async fn revoke_family(
    state: &AppState,
    grant_id: &str,
) -> Result<usize, crate::store::StoreError> {
    kv::put(
        &*state.store,
        &revoked_grant_key(grant_id),
        &true,
        REVOKED_GRANT_MEMORY,
    )
    .await?;
    state.store.revoke_grant(grant_id).await
}

/// How long a spent code is remembered for replay detection.
const USED_CODE_MEMORY: u64 = 24 * 3_600;

async fn authorization_code(
    state: &AppState,
    snap: &Snapshot,
    client: &ClientRuntime,
    form: &Form,
) -> Result<TokenResponse, GatewayError> {
    require_grant(client, GrantType::AuthorizationCode)?;
    let code = form.require("code")?;
    let store: &dyn crate::store::Store = &*state.store;
    let replayed = |n: usize| {
        tracing::warn!(client_id = %client.cfg.client_id, revoked = n, "authorization code replayed; its tokens are revoked");
        metrics::counter!("gatehouse_code_replays_total").increment(1);
        invalid_grant("the authorization code is invalid, expired or already used")
    };
    // The replay marker is written before the code is spent, so a second redemption finds the
    // code or the marker, never neither. Single use: of concurrent redemptions only the one
    // that takes the code proceeds; the others are replays.
    let (key, marker) = (code_key(code), used_code_key(code));
    let Some(record) = kv::get::<CodeRecord>(store, &key)
        .await
        .map_err(unavailable)?
    else {
        return Err(
            match revoke_marked_grant(state, &marker, &client.cfg.client_id).await? {
                Some(n) => replayed(n),
                None => invalid_grant("the authorization code is invalid, expired or already used"),
            },
        );
    };
    // Checked before the code is spent: a request with another client's id or a wrong verifier
    // (anyone who saw the code in a URL could send one) must not burn it for its owner.
    if about_to_expire(record.expires_at) {
        return Err(invalid_grant("the authorization code has expired"));
    }
    if !tokens::constant_time_eq(record.client_id.as_bytes(), client.cfg.client_id.as_bytes()) {
        return Err(invalid_grant(
            "the authorization code was issued to another client",
        ));
    }
    // redirect_uri is required when the authorization request had it (RFC 6749 4.1.3); when
    // present it must be the URI the code was sent to.
    match form.get("redirect_uri") {
        None if record.redirect_uri_sent => {
            return Err(oauth(
                OAuthErrorCode::InvalidRequest,
                "redirect_uri is required: the authorization request had one",
            ));
        }
        Some(r) if r != record.redirect_uri => {
            return Err(invalid_grant(
                "redirect_uri differs from the one in the authorization request",
            ));
        }
        _ => {}
    }
    // Every code carries an S256 challenge, so a verifier is always required and checked.
    let Some(verifier) = form.get("code_verifier") else {
        return Err(oauth(
            OAuthErrorCode::InvalidRequest,
            "code_verifier is required (PKCE)",
        ));
    };
    if !pkce::valid_verifier(verifier) {
        return Err(oauth(
            OAuthErrorCode::InvalidRequest,
            "code_verifier must be 43-128 characters of A-Z a-z 0-9 - . _ ~",
        ));
    }
    if !pkce::verify_s256(verifier, &record.code_challenge) {
        return Err(invalid_grant(
            "code_verifier does not match the code_challenge",
        ));
    }
    // As on refresh: the code's subscription must still hold this client id for the same Api,
    // and scopes the Api stopped offering since the user consented are not granted. (Codes
    // from before these were recorded, at most 60 s old at an upgrade, carry neither.)
    let moved = !record.subscription.is_empty()
        && (record.subscription != client.cfg.subscription || record.api != client.cfg.api);
    if moved {
        return Err(invalid_grant(
            "the code belongs to a subscription that no longer holds this client",
        ));
    }
    let scope = still_offered(snap, client, &record.scope)?;
    if accounts::get(store, &record.user_id)
        .await
        .map_err(unavailable)?
        .is_none()
    {
        return Err(invalid_grant("the user no longer exists"));
    }
    // The pair first, then the code is spent (see `answer_once`).
    // The family's first refresh token; its record is written at the first rotation.
    let keys = super::refresh::refresh_keys(state).await?;
    let family = Family {
        grant_id: &record.grant_id,
        id: &tokens::new_family(),
        key: keys.signing(),
    };
    let pair = token_pair(state, snap, client, &record.user_id, &scope, &scope, family).await?;
    let owner = marker_value(&record.client_id, &record.grant_id);
    let spent = match kv::put(store, &marker, &owner, USED_CODE_MEMORY).await {
        // Only whether this request took it matters: the record was read above.
        Ok(()) => store.kv_take(&key).await.map(|taken| taken.is_some()),
        Err(e) => Err(e),
    };
    let presented = Presented {
        grant_id: &record.grant_id,
        expires_at: record.expires_at,
        keep_refresh: false,
    };
    answer_once(state, pair, spent, presented, replayed).await
}

/// The code or refresh token a request presented: its grant family and when it expires.
pub(super) struct Presented<'a> {
    pub grant_id: &'a str,
    pub expires_at: u64,
    /// When spending fails, keep the unsent pair's refresh token: its family's record names it,
    /// so the client's retry can still redeem it (`refresh.rs`).
    pub keep_refresh: bool,
}

/// Seconds a code or refresh token must have left to be redeemed. It is spent only after the
/// new pair is stored (`answer_once`); one that expired meanwhile is gone from the store, which
/// would read as a replay and revoke the family of a legitimate client.
const SPEND_MARGIN_SECONDS: u64 = 2;

pub(super) fn about_to_expire(expires_at: u64) -> bool {
    expires_at <= unix_now().saturating_add(SPEND_MARGIN_SECONDS)
}

/// Answers a code exchange or refresh whose new `pair` is stored, once the presented code or
/// token was spent (`spent`: whether this request took it). Issuing first means a pair that
/// cannot be stored leaves the code or token unspent for the client's retry (spent first, the
/// retry looked like a replay and revoked the family). Of concurrent uses only the one that
/// took it answers; for the others it is a replay, which revokes the family, the pairs they
/// issued included. When spending failed, whether it happened is unknown (a lost reply): the
/// pair nobody will get is removed, but its refresh token when `keep_refresh` (a retry within
/// `--refresh-retry-seconds` may redeem it: `refresh.rs`).
pub(super) async fn answer_once(
    state: &AppState,
    pair: TokenResponse,
    spent: Result<bool, crate::store::StoreError>,
    presented: Presented<'_>,
    replayed: impl FnOnce(usize) -> GatewayError,
) -> Result<TokenResponse, GatewayError> {
    match spent {
        Ok(true) => Ok(pair),
        // Not there to take because it expired while the pair was stored (a store slower than
        // SPEND_MARGIN_SECONDS): no replay, so nothing is revoked beyond the unsent pair.
        Ok(false) if presented.expires_at <= unix_now() => {
            discard(state, &pair, false).await;
            Err(invalid_grant(
                "the authorization code or refresh token has expired",
            ))
        }
        Ok(false) => {
            let n = revoke_family(state, presented.grant_id)
                .await
                .map_err(unavailable)?;
            Err(replayed(n))
        }
        Err(e) => {
            discard(state, &pair, presented.keep_refresh).await;
            Err(unavailable(e))
        }
    }
}

/// Access token plus (when the client may refresh) a refresh token, in one grant family. The
/// access token gets `scope`; the refresh token `refresh_scope`, which stays the grant's scope
/// when a refresh narrows the access token (RFC 6749 section 6). The refresh token carries
/// the family's id (`tokens::generate_refresh`).
pub(super) async fn token_pair(
    state: &AppState,
    snap: &Snapshot,
    client: &ClientRuntime,
    user_id: &str,
    scope: &str,
    refresh_scope: &str,
    family: Family<'_>,
) -> Result<TokenResponse, GatewayError> {
    let grant_id = family.grant_id;
    within_issuance_limit(state, client, Some(user_id))?;
    let api = &snap.apis[client.api].cfg;
    let access_token = issue(
        state,
        client,
        Issue::Access,
        Some(user_id),
        scope,
        grant_id,
        api.access_token_ttl_seconds,
    )
    .await?;
    let refresh_token = if client.cfg.grants.contains(&GrantType::RefreshToken) {
        Some(
            issue(
                state,
                client,
                Issue::Refresh {
                    family: family.id,
                    key: family.key,
                },
                Some(user_id),
                refresh_scope,
                grant_id,
                api.refresh_token_ttl_seconds,
            )
            .await?,
        )
    } else {
        None
    };
    // The grant was revoked while these were being issued (a replay of its code, reuse of its
    // refresh token, revocation): they must not outlive it.
    if grant_revoked(state, grant_id).await? {
        state
            .store
            .revoke_grant(grant_id)
            .await
            .map_err(unavailable)?;
        return Err(invalid_grant("the grant was revoked"));
    }
    Ok(TokenResponse {
        access_token,
        token_type: "Bearer",
        expires_in: api.access_token_ttl_seconds,
        refresh_token,
        scope: scope.to_string(),
    })
}

/// Best effort: removes the tokens of a response that is not sent (but the refresh token when
/// `keep_refresh`).
pub(super) async fn discard(state: &AppState, pair: &TokenResponse, keep_refresh: bool) {
    let refresh = pair.refresh_token.as_ref().filter(|_| !keep_refresh);
    let tokens = std::iter::once(&pair.access_token).chain(refresh);
    for t in tokens {
        let _ = state.store.revoke_token(&tokens::hash(t)).await;
    }
}

/// A grant family: the grant id its tokens are stored under, and the id its refresh tokens
/// carry, signed with `key` (`refresh::refresh_keys`).
#[derive(Clone, Copy)]
pub(super) struct Family<'a> {
    pub grant_id: &'a str,
    pub id: &'a tokens::FamilyId,
    pub key: &'a tokens::RefreshKey,
}

/// What `issue` makes.
pub enum Issue<'a> {
    Access,
    /// A refresh token of `family`, signed with `key`.
    Refresh {
        family: &'a tokens::FamilyId,
        key: &'a tokens::RefreshKey,
    },
}

/// Creates and stores one token; returns the token itself (the store keeps only its hash).
pub async fn issue(
    state: &AppState,
    client: &ClientRuntime,
    what: Issue<'_>,
    user_id: Option<&str>,
    scope: &str,
    grant_id: &str,
    ttl: u64,
) -> Result<String, GatewayError> {
    let (token, kind) = match what {
        Issue::Access => (tokens::generate(), TokenKind::Access),
        Issue::Refresh { family, key } => {
            (tokens::generate_refresh(key, family), TokenKind::Refresh)
        }
    };
    let now = unix_now();
    let record = TokenRecord {
        kind,
        client_id: client.cfg.client_id.clone(),
        subscription: client.cfg.subscription.clone(),
        api: client.cfg.api.clone(),
        user_id: user_id.map(str::to_string),
        scope: scope.to_string(),
        grant_id: grant_id.to_string(),
        issued_at: now,
        expires_at: now + ttl,
    };
    state
        .store
        .put_token(tokens::hash(&token), record)
        .await
        .map_err(|e| {
            tracing::error!(error = %e, "cannot store token");
            oauth(
                OAuthErrorCode::TemporarilyUnavailable,
                "the token store is unavailable",
            )
        })?;
    metrics::counter!("gatehouse_tokens_issued_total", "kind" => match kind { TokenKind::Access => "access", TokenKind::Refresh => "refresh" }).increment(1);
    Ok(token)
}

#[cfg(test)]
mod marker_tests {
    use super::*;

    #[test]
    fn markers_name_client_and_grant_and_old_ones_only_the_grant() {
        let v = marker_value("phone-app", "5f0c6a1e-0000-4000-8000-000000000001");
        assert_eq!(
            parse_marker(&v),
            (Some("phone-app"), "5f0c6a1e-0000-4000-8000-000000000001")
        );
        assert_eq!(parse_marker("5f0c6a1e"), (None, "5f0c6a1e"));
    }
}

#[cfg(test)]
mod answer_once_tests {
    use super::*;
    use crate::store::{TokenKind, TokenRecord};

    fn state() -> (tempfile::TempDir, AppState) {
        let dir = tempfile::tempdir().unwrap();
        let state = AppState::for_tests(dir.path());
        (dir, state)
    }

    async fn put(state: &AppState, token: &str, kind: TokenKind) {
        let now = unix_now();
        let record = TokenRecord {
            kind,
            client_id: "phone-app".into(),
            subscription: "t/phone-app".into(),
            api: "t/mobile".into(),
            user_id: Some("u-1".into()),
            scope: String::new(),
            grant_id: "g-1".into(),
            issued_at: now,
            expires_at: now + 3_600,
        };
        state
            .store
            .put_token(tokens::hash(token), record)
            .await
            .unwrap();
    }

    async fn live(state: &AppState, token: &str) -> bool {
        state
            .store
            .get_token(&tokens::hash(token))
            .await
            .unwrap()
            .is_some()
    }

    /// The store holds the family's other token and the pair issued for this request; the
    /// presented code or refresh token was not there to take (`Ok(false)`).
    async fn lost_take(expires_at: u64) -> (AppState, tempfile::TempDir, GatewayError) {
        let (dir, state) = state();
        put(&state, "sibling-access", TokenKind::Access).await;
        put(&state, "new-access", TokenKind::Access).await;
        put(&state, "new-refresh", TokenKind::Refresh).await;
        let pair = TokenResponse {
            access_token: "new-access".into(),
            token_type: "Bearer",
            expires_in: 3_600,
            refresh_token: Some("new-refresh".into()),
            scope: String::new(),
        };
        let presented = Presented {
            grant_id: "g-1",
            expires_at,
            keep_refresh: false,
        };
        let err = answer_once(&state, pair, Ok(false), presented, |_| {
            invalid_grant("replayed")
        })
        .await
        .expect_err("not answered with the pair");
        (state, dir, err)
    }

    /// A store slower than SPEND_MARGIN_SECONDS: the refresh token expired while the new pair
    /// was stored, so it was gone when spent. That is no replay: the client hears "expired",
    /// the unsent pair is removed, and the family's other tokens live on.
    #[tokio::test]
    async fn a_take_lost_to_expiry_revokes_nothing() {
        let (state, _dir, err) = lost_take(unix_now() - 1).await;
        assert!(
            matches!(&err, GatewayError::OAuth(OAuthErrorCode::InvalidGrant, d) if d.contains("expired")),
            "{err:?}"
        );
        assert!(!live(&state, "new-access").await && !live(&state, "new-refresh").await);
        assert!(
            live(&state, "sibling-access").await,
            "the family was revoked"
        );
    }

    /// The same lost take before expiry is a replay: the whole family goes.
    #[tokio::test]
    async fn a_take_lost_before_expiry_is_a_replay() {
        let (state, _dir, err) = lost_take(unix_now() + 600).await;
        assert!(
            matches!(&err, GatewayError::OAuth(OAuthErrorCode::InvalidGrant, d) if d == "replayed"),
            "{err:?}"
        );
        for t in ["sibling-access", "new-access", "new-refresh"] {
            assert!(!live(&state, t).await, "{t} outlived the replay");
        }
    }
}
