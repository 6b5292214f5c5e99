//! `GET /oauth2/userinfo`: the signed-in user's id (the X-Authenticated-UserId value) and email.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use http::HeaderMap;
use serde_json::json;

use crate::accounts;
use crate::error::GatewayError;
use crate::headers::{self, Bearer};
use crate::state::AppState;
use crate::store::TokenKind;
use crate::tokens;

pub async fn handle(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    let token = match headers::bearer(&headers) {
        Bearer::Token(t) => t,
        Bearer::Missing => return GatewayError::MissingToken.into_response(),
        Bearer::Malformed => {
            return GatewayError::InvalidRequest(
                "the Authorization header must be exactly one 'Bearer <token>'",
            )
            .into_response();
        }
    };
    let record = match state.store.get_token(&tokens::hash(token)).await {
        Ok(Some(r)) if r.kind == TokenKind::Access => r,
        Ok(_) => return GatewayError::InvalidToken.into_response(),
        Err(_) => return GatewayError::StoreUnavailable.into_response(),
    };
    // client_credentials tokens have no user to describe.
    let Some(user_id) = &record.user_id else {
        return GatewayError::InvalidToken.into_response();
    };
    let snap = state.config.load();
    if snap
        .client(&record.client_id)
        .is_none_or(|c| c.cfg.subscription != record.subscription)
    {
        return GatewayError::InvalidToken.into_response();
    }
    match accounts::get(&*state.store, user_id).await {
        Ok(Some(u)) => {
            let mut r = Json(json!({ "sub": u.id, "email": u.email })).into_response();
            super::no_store(r.headers_mut());
            r
        }
        Ok(None) => GatewayError::InvalidToken.into_response(),
        Err(_) => GatewayError::StoreUnavailable.into_response(),
    }
}
