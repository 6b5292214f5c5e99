//! Client authentication at the token, revocation and introspection endpoints (RFC 6749 2.3):
//! HTTP Basic or body parameters, never both; secrets compared by hash in constant time.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use http::{HeaderMap, header};

use super::form::Form;
use crate::error::{GatewayError, OAuthErrorCode, oauth};
use crate::snapshot::{ClientRuntime, Snapshot};
use crate::tokens;
use gatehouse_crds::ClientType;

/// Client id and secret as presented, before checking.
#[derive(Debug, PartialEq, Eq)]
pub struct Presented {
    pub client_id: String,
    pub secret: Option<String>,
    pub via_basic: bool,
}

fn percent_decode(s: &str) -> String {
    // Basic credentials are form-urlencoded first (RFC 6749 2.3.1).
    url::form_urlencoded::parse(format!("x={s}").as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

/// Extracts the presented credentials. Pure.
pub fn presented(headers: &HeaderMap, form: &Form) -> Result<Presented, GatewayError> {
    let basic = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("basic"))
        .map(|(_, creds)| creds.trim());
    let body_id = form.get("client_id");
    let body_secret = form.get("client_secret");
    if let Some(creds) = basic {
        if body_secret.is_some() {
            return Err(oauth(
                OAuthErrorCode::InvalidRequest,
                "use one client authentication method: HTTP Basic or client_secret in the body",
            ));
        }
        let bad = || {
            oauth(
                OAuthErrorCode::InvalidClient,
                "malformed HTTP Basic credentials",
            )
        };
        let decoded = STANDARD.decode(creds).map_err(|_| bad())?;
        let decoded = String::from_utf8(decoded).map_err(|_| bad())?;
        let (id, secret) = decoded.split_once(':').ok_or_else(bad)?;
        let client_id = percent_decode(id);
        if body_id.is_some_and(|b| b != client_id) {
            return Err(oauth(
                OAuthErrorCode::InvalidRequest,
                "client_id in the body differs from the HTTP Basic client",
            ));
        }
        return Ok(Presented {
            client_id,
            secret: Some(percent_decode(secret)),
            via_basic: true,
        });
    }
    let client_id = body_id.ok_or_else(|| {
        oauth(
            OAuthErrorCode::InvalidClient,
            "client authentication is required (HTTP Basic or client_id in the body)",
        )
    })?;
    Ok(Presented {
        client_id: client_id.to_string(),
        secret: body_secret.map(str::to_string),
        via_basic: false,
    })
}

/// A fixed hash so an unknown client costs the same comparison as a known one.
const DUMMY_SHA256: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Authenticates the client: confidential clients must present their secret; public clients
/// are identified by client_id alone and must not present a secret.
pub fn authenticate<'a>(
    snap: &'a Snapshot,
    p: &Presented,
) -> Result<&'a ClientRuntime, GatewayError> {
    let invalid = || {
        oauth(
            OAuthErrorCode::InvalidClient,
            "client authentication failed",
        )
    };
    let Some(client) = snap.client(&p.client_id) else {
        if let Some(s) = &p.secret {
            let _ = tokens::secret_matches(s, DUMMY_SHA256);
        }
        return Err(invalid());
    };
    match (client.cfg.client_type, &client.cfg.secret_sha256, &p.secret) {
        (ClientType::Confidential, Some(expected), Some(secret)) => {
            if tokens::secret_matches(secret, expected) {
                Ok(client)
            } else {
                Err(invalid())
            }
        }
        (ClientType::Confidential, _, _) => Err(invalid()),
        (ClientType::Public, _, None) => Ok(client),
        (ClientType::Public, _, Some(_)) => Err(oauth(
            OAuthErrorCode::InvalidClient,
            "this is a public client: it has no secret to send",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn form(body: &str) -> Form {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONTENT_TYPE,
            "application/x-www-form-urlencoded".parse().unwrap(),
        );
        Form::parse(&h, body.as_bytes()).unwrap()
    }

    fn basic(id: &str, secret: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        let v = format!("Basic {}", STANDARD.encode(format!("{id}:{secret}")));
        h.insert(header::AUTHORIZATION, v.parse().unwrap());
        h
    }

    #[test]
    fn basic_credentials_are_form_decoded() {
        let p = presented(&basic("my%20app", "s%3Acret"), &form("grant_type=x")).unwrap();
        assert_eq!(
            p,
            Presented {
                client_id: "my app".into(),
                secret: Some("s:cret".into()),
                via_basic: true
            }
        );
    }

    #[test]
    fn body_credentials() {
        let p = presented(&HeaderMap::new(), &form("client_id=a&client_secret=b")).unwrap();
        assert_eq!(
            p,
            Presented {
                client_id: "a".into(),
                secret: Some("b".into()),
                via_basic: false
            }
        );
    }

    #[test]
    fn both_methods_or_none_refused() {
        assert!(presented(&basic("a", "b"), &form("client_secret=b")).is_err());
        assert!(presented(&HeaderMap::new(), &form("grant_type=x")).is_err());
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, "Basic !!!".parse().unwrap());
        assert!(presented(&h, &form("")).is_err());
    }
}
