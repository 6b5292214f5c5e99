//! `POST /oauth2/introspect` (RFC 7662), for confidential clients of the same API. An inactive
//! token answers exactly `{"active":false}`.

use std::sync::Arc;

use super::OAuthBody;
use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use gatehouse_crds::ClientType;
use http::HeaderMap;
use serde_json::{Value, json};

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
    match introspect(&state, &headers, &body).await {
        Ok(v) => {
            let mut r = Json(v).into_response();
            no_store(r.headers_mut());
            r
        }
        Err(e) => e.into_response(),
    }
}

async fn introspect(
    state: &AppState,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Value, GatewayError> {
    let form = Form::parse(headers, body)?;
    let snap = state.config.load_full();
    let client = client_auth::authenticate(&snap, &client_auth::presented(headers, &form)?)?;
    if client.cfg.client_type != ClientType::Confidential {
        return Err(oauth(
            OAuthErrorCode::InvalidClient,
            "introspection is only for confidential clients",
        ));
    }
    let token = form.require("token")?;
    let inactive = json!({ "active": false });
    let record = state
        .store
        .get_token(&tokens::hash(token))
        .await
        .map_err(|e| {
            tracing::error!(error = %e, "store failure at introspection");
            oauth(
                OAuthErrorCode::TemporarilyUnavailable,
                "the token store is unavailable",
            )
        })?;
    let Some(record) = record else {
        return Ok(inactive);
    };
    // Only tokens of the caller's own API, of a subscription still configured for that API
    // (the proxy and refresh refuse the others, so they are not active).
    if record.api != client.cfg.api || snap.token_client(&record).is_none() {
        return Ok(inactive);
    }
    let mut v = json!({
        "active": true,
        "scope": record.scope,
        "client_id": record.client_id,
        "token_type": match record.kind { TokenKind::Access => "Bearer", TokenKind::Refresh => "refresh_token" },
        "exp": record.expires_at,
        "iat": record.issued_at,
        "iss": state.issuer,
        "aud": record.api,
    });
    if let Some(sub) = &record.user_id {
        v["sub"] = json!(sub);
    }
    Ok(v)
}
