//! An upstream that answers every request with what it received, as JSON:
//! `{"method","path","query","headers":{name:[values]},"bodyBytes"}`.
//! Special paths (anywhere in the path): `/download/<n>` streams n bytes back,
//! `/slow/<ms>` waits before answering, `/status/<code>` answers with that status.
//! Request bodies are counted while streaming, never buffered.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use hyper::StatusCode;

fn segment_after<'a>(path: &'a str, marker: &str) -> Option<&'a str> {
    let mut parts = path.split('/');
    while let Some(p) = parts.next() {
        if p == marker {
            return parts.next();
        }
    }
    None
}

async fn echo(req: Request) -> Response {
    let path = req.uri().path().to_string();
    if let Some(ms) = segment_after(&path, "slow").and_then(|v| v.parse::<u64>().ok()) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    if let Some(n) = segment_after(&path, "download").and_then(|v| v.parse::<u64>().ok()) {
        const CHUNK: usize = 64 * 1024;
        let chunk = Bytes::from(vec![b'x'; CHUNK]);
        let stream = futures_util::stream::unfold(n, move |left| {
            let chunk = chunk.clone();
            async move {
                if left == 0 {
                    return None;
                }
                let take = left.min(CHUNK as u64) as usize;
                Some((
                    Ok::<_, std::io::Error>(chunk.slice(..take)),
                    left - take as u64,
                ))
            }
        });
        return Response::builder()
            .header("content-type", "application/octet-stream")
            .body(Body::from_stream(stream))
            .expect("static response");
    }
    let status = segment_after(&path, "status")
        .and_then(|v| v.parse::<u16>().ok())
        .and_then(|c| StatusCode::from_u16(c).ok())
        .unwrap_or(StatusCode::OK);

    let mut headers: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (k, v) in req.headers() {
        headers
            .entry(k.as_str().to_string())
            .or_default()
            .push(String::from_utf8_lossy(v.as_bytes()).into_owned());
    }
    let method = req.method().to_string();
    let query = req.uri().query().map(str::to_string);
    let mut body = req.into_body().into_data_stream();
    let mut body_bytes: u64 = 0;
    while let Some(chunk) = body.next().await {
        match chunk {
            Ok(c) => body_bytes += c.len() as u64,
            Err(e) => return (StatusCode::BAD_REQUEST, e.to_string()).into_response(),
        }
    }
    let doc = serde_json::json!({
        "method": method,
        "path": path,
        "query": query,
        "headers": headers,
        "bodyBytes": body_bytes,
    });
    (status, axum::Json(doc)).into_response()
}

pub fn router() -> Router {
    Router::new().fallback(echo)
}

/// Serves the echo upstream on `listener` until the process ends.
pub async fn serve(listener: tokio::net::TcpListener) -> std::io::Result<()> {
    axum::serve(listener, router()).await
}

/// Starts the echo upstream on a free loopback port in the current runtime.
pub async fn spawn() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind echo upstream");
    let addr = listener.local_addr().expect("local addr");
    tokio::spawn(async move {
        let _ = serve(listener).await;
    });
    addr
}

/// Drains a body, returning its length (for download tests that must not buffer).
pub async fn count_body(body: Body) -> u64 {
    let mut n = 0;
    let mut s = body.into_data_stream();
    while let Some(Ok(c)) = s.next().await {
        n += c.len() as u64;
    }
    n
}
