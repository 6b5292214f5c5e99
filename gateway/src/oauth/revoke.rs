//! `POST /oauth2/revoke` (RFC 7009). Revoking a refresh token revokes its whole grant (the
//! access tokens issued with it too), also when that token was already rotated; unknown tokens
//! and other clients' tokens answer 200 and change nothing.

use std::sync::Arc;

use super::OAuthBody;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use http::{HeaderMap, StatusCode};

use super::client_auth;
use super::form::Form;
use super::no_store;
use crate::error::{GatewayError, OAuthErrorCode, oauth};
use crate::state::AppState;
use crate::store::TokenKind;
use crate::tokens;

pub async fn handle(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    OAuthBody(body): OAuthBody,
) -> Response {
    let answer = super::to_completion(|_| async move { revoke(&state, &headers, &body).await });
    match answer.await {
        Ok(()) => {
            let mut r = StatusCode::OK.into_response();
            no_store(r.headers_mut());
            r
        }
        Err(e) => e.into_response(),
    }
}

async fn revoke(state: &AppState, headers: &HeaderMap, body: &[u8]) -> Result<(), GatewayError> {
    let form = Form::parse(headers, body)?;
    let snap = state.config.load_full();
    let client = client_auth::authenticate(&snap, &client_auth::presented(headers, &form)?)?;
    let token = form.require("token")?;
    let hash = tokens::hash(token);
    let unavailable = |e: crate::store::StoreError| {
        tracing::error!(error = %e, "store failure at revocation");
        oauth(
            OAuthErrorCode::TemporarilyUnavailable,
            "the token store is unavailable",
        )
    };
    let record = state.store.get_token(&hash).await.map_err(unavailable)?;
    match record.as_deref() {
        Some(r) if r.kind == TokenKind::Access => {
            if r.client_id != client.cfg.client_id {
                // Not this client's token: nothing happens, and nothing is revealed.
                return Ok(());
            }
            state.store.revoke_token(&hash).await.map_err(unavailable)?;
        }
        // A refresh token, live or already rotated, ends its family (`refresh::revoke`).
        live => {
            if super::refresh::revoke(state, client, token, live)
                .await?
                .is_none()
            {
                return Ok(());
            }
        }
    }
    metrics::counter!("gatehouse_tokens_revoked_total").increment(1);
    Ok(())
}
