//! The benchmark's reference point for "hyper and tokio, nothing else": a reverse proxy with
//! no checks and no added headers, built like the gateway's proxy path (one current-thread
//! runtime per core on the gateway's own SO_REUSEPORT listeners, hyper's HTTP/1 server and
//! client). Each client connection gets its own upstream connection, the cheapest pooling
//! there is.
//!
//! `gatehouse-bare-proxy LISTEN UPSTREAM [WORKERS]`, e.g. `127.0.0.1:9003 127.0.0.1:9002 2`.

use std::net::SocketAddr;
use std::sync::Arc;

use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Uri};
use hyper_util::rt::TokioIo;
use tokio::sync::Mutex;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let listen: SocketAddr = args.next().unwrap_or("127.0.0.1:9003".into()).parse()?;
    let upstream: Arc<str> = args.next().unwrap_or("127.0.0.1:9002".into()).into();
    let workers: usize = match args.next() {
        Some(w) => w.parse()?,
        None => std::thread::available_parallelism().map_or(1, |n| n.get()),
    };
    eprintln!("bare proxy on http://{listen} -> http://{upstream}, {workers} workers");
    let threads: Vec<_> = gatehouse_gateway::server::bind_workers(listen, workers)?
        .into_iter()
        .map(|listener| {
            let upstream = upstream.clone();
            std::thread::spawn(move || -> anyhow::Result<()> {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?
                    .block_on(serve(listener, upstream))
            })
        })
        .collect();
    for t in threads {
        t.join()
            .map_err(|_| anyhow::anyhow!("a worker panicked"))??;
    }
    Ok(())
}

async fn serve(listener: std::net::TcpListener, upstream: Arc<str>) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::from_std(listener)?;
    loop {
        let (client, _) = listener.accept().await?;
        let upstream = upstream.clone();
        tokio::spawn(async move {
            if let Err(e) = proxy_connection(client, &upstream).await {
                eprintln!("connection: {e}");
            }
        });
    }
}

async fn proxy_connection(client: tokio::net::TcpStream, upstream: &str) -> anyhow::Result<()> {
    client.set_nodelay(true)?;
    let up = tokio::net::TcpStream::connect(upstream).await?;
    up.set_nodelay(true)?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(up)).await?;
    tokio::spawn(conn);
    // HTTP/1 serves one request at a time per connection: the lock is never contended.
    let sender = Arc::new(Mutex::new(sender));
    let svc = service_fn(move |mut req: Request<Incoming>| {
        let sender = sender.clone();
        async move {
            if let Some(pq) = req.uri().path_and_query().cloned() {
                *req.uri_mut() = Uri::from(pq);
            }
            let mut sender = sender.lock().await;
            sender.ready().await?;
            sender.send_request(req).await
        }
    });
    hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(client), svc)
        .await?;
    Ok(())
}
