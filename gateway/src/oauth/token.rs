//! `POST /oauth2/token`.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use gatehouse_crds::{ClientType, GrantType};
use http::HeaderMap;
use serde::Serialize;

use super::client_auth;
use super::form::Form;
use super::no_store;
use crate::error::{GatewayError, OAuthErrorCode, oauth};
use crate::snapshot::{ClientRuntime, Snapshot};
use crate::state::AppState;
use crate::store::{TokenKind, TokenRecord, unix_now};
use crate::tokens;

#[derive(Serialize, Debug)]
pub struct TokenResponse {
    pub access_token: String,
    pub token_type: &'static str,
    pub expires_in: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refresh_token: Option<String>,
    pub scope: String,
}

pub async fn handle(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    match token(&state, &headers, &body).await {
        Ok(resp) => {
            let mut r = Json(resp).into_response();
            no_store(r.headers_mut());
            r
        }
        Err(e) => e.into_response(),
    }
}

async fn token(
    state: &AppState,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<TokenResponse, GatewayError> {
    let form = Form::parse(headers, body)?;
    let grant_type = form.require("grant_type")?;
    let snap = state.config.load_full();
    let presented = client_auth::presented(headers, &form)?;
    let client = client_auth::authenticate(&snap, &presented)?;
    match grant_type {
        "client_credentials" => client_credentials(state, &snap, client, &form).await,
        other => Err(oauth(
            OAuthErrorCode::UnsupportedGrantType,
            format!("grant_type {other} is not supported"),
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
    let api = &snap.apis[client.api].cfg;
    let mut out: Vec<&str> = Vec::new();
    for s in requested.unwrap_or("").split(' ').filter(|s| !s.is_empty()) {
        if !api.scopes.iter().any(|known| known.name == s) {
            return Err(oauth(
                OAuthErrorCode::InvalidScope,
                format!("scope {s} is not offered by this API"),
            ));
        }
        if !out.contains(&s) {
            out.push(s);
        }
    }
    Ok(out.join(" "))
}

fn require_grant(client: &ClientRuntime, grant: GrantType) -> Result<(), GatewayError> {
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
    let ttl = snap.apis[client.api].cfg.access_token_ttl_seconds;
    let access_token = issue(
        state,
        client,
        TokenKind::Access,
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

/// Creates and stores one token; returns the token itself (the store keeps only its hash).
pub async fn issue(
    state: &AppState,
    client: &ClientRuntime,
    kind: TokenKind,
    user_id: Option<&str>,
    scope: &str,
    grant_id: &str,
    ttl: u64,
) -> Result<String, GatewayError> {
    let token = tokens::generate();
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
