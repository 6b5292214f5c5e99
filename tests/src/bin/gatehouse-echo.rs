//! Echo upstream for the demo: answers every request with the method, path and headers it
//! received (so you can see X-Authenticated-UserId and friends).

use clap::Parser;

#[derive(Parser)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:9001")]
    listen: std::net::SocketAddr,
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    eprintln!(
        "echo upstream listening on http://{}",
        listener.local_addr()?
    );
    gatehouse_tests::echo::serve(listener).await
}
