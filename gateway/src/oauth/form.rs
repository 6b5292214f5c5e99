//! Form bodies of the OAuth endpoints: `application/x-www-form-urlencoded`, each parameter at
//! most once (RFC 6749 3.2).

use std::collections::HashMap;

use http::{HeaderMap, header};

use crate::error::{GatewayError, OAuthErrorCode, oauth};

pub struct Form(HashMap<String, String>);

impl Form {
    pub fn parse(headers: &HeaderMap, body: &[u8]) -> Result<Form, GatewayError> {
        let ct = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let mime = ct.split(';').next().unwrap_or("").trim();
        if !mime.eq_ignore_ascii_case("application/x-www-form-urlencoded") {
            return Err(oauth(
                OAuthErrorCode::InvalidRequest,
                "the body must be application/x-www-form-urlencoded",
            ));
        }
        let mut map = HashMap::new();
        for (k, v) in url::form_urlencoded::parse(body) {
            if map.insert(k.to_string(), v.to_string()).is_some() {
                return Err(oauth(
                    OAuthErrorCode::InvalidRequest,
                    format!("parameter {} is repeated", super::shown(&k)),
                ));
            }
        }
        Ok(Form(map))
    }

    /// A parameter; empty values count as absent (RFC 6749 3.1).
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .get(name)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }

    pub fn require(&self, name: &str) -> Result<&str, GatewayError> {
        self.get(name).ok_or_else(|| {
            oauth(
                OAuthErrorCode::InvalidRequest,
                format!("missing parameter {name}"),
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn form_headers() -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONTENT_TYPE,
            "application/x-www-form-urlencoded; charset=UTF-8"
                .parse()
                .unwrap(),
        );
        h
    }

    #[test]
    fn parses_and_rejects_repeats() {
        let f = Form::parse(
            &form_headers(),
            b"grant_type=client_credentials&scope=a+b&x=",
        )
        .unwrap();
        assert_eq!(f.get("scope"), Some("a b"));
        assert_eq!(f.get("x"), None);
        assert!(f.require("code").is_err());
        assert!(Form::parse(&form_headers(), b"a=1&a=2").is_err());
        assert!(Form::parse(&HeaderMap::new(), b"a=1").is_err());
    }
}
