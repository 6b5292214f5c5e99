//! The error pages a sign-in form's POST can end on. Each has a GET address of its own
//! (`/oauth2/error?e=<id>`, under the gateway's own prefix, like Ory Hydra's error page), and a
//! POST that fails is answered with a 303 to it (design section 5: 303 after every POST), so
//! reloading the page shown does not post the form again.

use axum::extract::{RawQuery, Request};
use axum::middleware::Next;
use axum::response::Response;
use http::{Method, StatusCode, header};

use super::authorize::{error_page, see_other};

/// Marks a response as the known error page `id`, so `after_post` can answer a POST that ended
/// on it with a 303 to its address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Known(pub &'static str);

pub const SESSION_EXPIRED: &str = "session-expired";
pub const FORM_EXPIRED: &str = "form-expired";
pub const UNAVAILABLE: &str = "unavailable";
pub const REQUEST_EXPIRED: &str = "request-expired";
pub const UNREGISTERED: &str = "unregistered";
pub const INVALID_ANSWER: &str = "invalid-answer";
pub const FORM_TOO_LARGE: &str = "form-too-large";
pub const FORM_NOT_ACCEPTED: &str = "form-not-accepted";

struct Page {
    id: &'static str,
    /// As the answer to the request that failed.
    status: StatusCode,
    /// At its address: a GET that can be reloaded, so no 5xx that monitoring would take for
    /// an outage, and no 413 without a body.
    shown: StatusCode,
    title: &'static str,
    message: &'static str,
}

const PAGES: &[Page] = &[
    Page {
        id: SESSION_EXPIRED,
        status: StatusCode::FORBIDDEN,
        shown: StatusCode::FORBIDDEN,
        title: "Session expired",
        message: "Your sign-in session expired or cookies are blocked. Please go back to the app and start again.",
    },
    Page {
        id: FORM_EXPIRED,
        status: StatusCode::FORBIDDEN,
        shown: StatusCode::FORBIDDEN,
        title: "Form expired",
        message: "This form is no longer valid. Please go back to the app and start again.",
    },
    Page {
        id: UNAVAILABLE,
        status: StatusCode::SERVICE_UNAVAILABLE,
        shown: StatusCode::OK,
        title: "Temporarily unavailable",
        message: "Sign-in is temporarily unavailable. Please go back and try again in a moment.",
    },
    Page {
        id: REQUEST_EXPIRED,
        status: StatusCode::BAD_REQUEST,
        shown: StatusCode::BAD_REQUEST,
        title: "Sign-in expired",
        message: "This sign-in request has expired or was already used. Please go back to the app and start again.",
    },
    Page {
        id: UNREGISTERED,
        status: StatusCode::BAD_REQUEST,
        shown: StatusCode::BAD_REQUEST,
        title: "App no longer registered",
        message: "This app or its return address was removed while you were signing in. Please go back to the app and start again.",
    },
    Page {
        id: INVALID_ANSWER,
        status: StatusCode::BAD_REQUEST,
        shown: StatusCode::BAD_REQUEST,
        title: "Invalid answer",
        message: "Choose Allow or Deny.",
    },
    Page {
        id: FORM_TOO_LARGE,
        status: StatusCode::PAYLOAD_TOO_LARGE,
        shown: StatusCode::BAD_REQUEST,
        title: "Form not accepted",
        message: "The form was too large or did not arrive whole. Please go back and try again.",
    },
    Page {
        id: FORM_NOT_ACCEPTED,
        status: StatusCode::BAD_REQUEST,
        shown: StatusCode::BAD_REQUEST,
        title: "Form not accepted",
        message: "The form was too large or did not arrive whole. Please go back and try again.",
    },
];

fn find(id: &str) -> Option<&'static Page> {
    PAGES.iter().find(|p| p.id == id)
}

/// The known error page `id` (one of the consts above, each in `PAGES`: unit test).
pub fn known(id: &'static str) -> Response {
    let Some(p) = find(id) else {
        tracing::error!(id, "unknown error page");
        return error_page(
            StatusCode::INTERNAL_SERVER_ERROR,
            "Error",
            "Something went wrong.",
        );
    };
    let mut r = error_page(p.status, p.title, p.message);
    r.extensions_mut().insert(Known(p.id));
    r
}

/// `GET /oauth2/error?e=<id>`: a known error page, with its status.
pub async fn show(RawQuery(query): RawQuery) -> Response {
    let id = query.and_then(|q| {
        url::form_urlencoded::parse(q.as_bytes())
            .find(|(k, _)| k == "e")
            .map(|(_, v)| v.into_owned())
    });
    match id.as_deref().and_then(find) {
        Some(p) => error_page(p.shown, p.title, p.message),
        None => error_page(
            StatusCode::NOT_FOUND,
            "Not found",
            "There is no such page. Please go back to the app and start again.",
        ),
    }
}

/// Middleware for the sign-in pages: a POST whose answer is a known error page is answered
/// with a 303 to that page's address instead, keeping the cookies the answer set.
pub async fn after_post(request: Request, next: Next) -> Response {
    let post = request.method() == Method::POST;
    let response = next.run(request).await;
    let Some(Known(id)) = response.extensions().get::<Known>().copied() else {
        return response;
    };
    if !post {
        return response;
    }
    let mut redirect = see_other(&format!("/oauth2/error?e={id}"));
    for cookie in response.headers().get_all(header::SET_COOKIE) {
        redirect
            .headers_mut()
            .append(header::SET_COOKIE, cookie.clone());
    }
    redirect
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_id_has_a_page() {
        for id in [
            SESSION_EXPIRED,
            FORM_EXPIRED,
            UNAVAILABLE,
            REQUEST_EXPIRED,
            UNREGISTERED,
            INVALID_ANSWER,
            FORM_TOO_LARGE,
            FORM_NOT_ACCEPTED,
        ] {
            assert!(find(id).is_some(), "{id}");
        }
        assert_eq!(PAGES.len(), 8);
    }

    #[test]
    fn ids_are_distinct_and_url_safe() {
        for (i, p) in PAGES.iter().enumerate() {
            assert!(p.id.bytes().all(|b| b.is_ascii_lowercase() || b == b'-'));
            assert!(PAGES[i + 1..].iter().all(|q| q.id != p.id), "{}", p.id);
            assert!(p.status.is_client_error() || p.status.is_server_error());
        }
    }

    #[tokio::test]
    async fn each_page_has_its_address_and_status() {
        for p in PAGES {
            let r = show(RawQuery(Some(format!("e={}", p.id)))).await;
            assert_eq!(r.status(), p.shown, "{}", p.id);
            assert!(!r.status().is_server_error() && r.status() != StatusCode::PAYLOAD_TOO_LARGE);
            assert_eq!(known(p.id).status(), p.status);
            assert_eq!(known(p.id).extensions().get::<Known>(), Some(&Known(p.id)));
        }
        let r = show(RawQuery(Some("e=nope".into()))).await;
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
        assert_eq!(show(RawQuery(None)).await.status(), StatusCode::NOT_FOUND);
    }

    /// A POST that ends on a known page gets a 303 to its address, keeping its cookies; a GET
    /// gets the page itself, and a POST answered otherwise is left alone.
    #[tokio::test]
    async fn only_a_post_ending_on_a_known_page_is_redirected() {
        use axum::Router;
        use axum::routing::get;
        use tower::ServiceExt;

        let failing = || async {
            let mut r = known(FORM_EXPIRED);
            r.headers_mut()
                .append(header::SET_COOKIE, "a=1".parse().unwrap());
            r
        };
        let app = Router::new()
            .route("/form", get(failing).post(failing))
            .route(
                "/plain",
                axum::routing::post(|| async { StatusCode::IM_A_TEAPOT }),
            )
            .route_layer(axum::middleware::from_fn(after_post));
        let call = |method: Method, uri: &str| {
            let req = http::Request::builder()
                .method(method)
                .uri(uri)
                .body(axum::body::Body::empty())
                .unwrap();
            app.clone().oneshot(req)
        };
        let r = call(Method::POST, "/form").await.unwrap();
        assert_eq!(r.status(), StatusCode::SEE_OTHER);
        assert_eq!(
            r.headers()[header::LOCATION],
            "/oauth2/error?e=form-expired"
        );
        assert_eq!(r.headers()[header::SET_COOKIE], "a=1");
        let r = call(Method::GET, "/form").await.unwrap();
        assert_eq!(r.status(), StatusCode::FORBIDDEN);
        let r = call(Method::POST, "/plain").await.unwrap();
        assert_eq!(r.status(), StatusCode::IM_A_TEAPOT);
    }
}
