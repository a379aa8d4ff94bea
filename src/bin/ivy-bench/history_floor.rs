//! `history-floor`: `history`'s readers against a server that answers every request with one
//! prebuilt answer of the same size and headers as `ivy serve`'s to `?n=N`, for the machine's
//! floor. That server is hyper's HTTP/1.1 on a multi-thread tokio runtime, as `ivy serve` uses
//! them, with no routing, no log and no read: what it reaches, measured side by side with
//! `history`, is the most any server built on them could answer on this machine through this
//! client; what `history` falls short of it is Ivy's.
//!
//! The server is this binary again (`ivy-bench fixed-answer-server`), in its own process, so that
//! its CPU is reported apart from the tool's, as a real server's is.

use crate::history::measure;
use bytes::Bytes;
use http_body_util::Full;
use std::convert::Infallible;

pub(crate) async fn history_floor(
    seconds: u64,
    connections: usize,
    n: usize,
) -> anyhow::Result<()> {
    let n_text = n.to_string();
    let args = ["fixed-answer-server", "--n", &n_text].map(std::ffi::OsStr::new);
    let (addr, _server) = crate::spawn_floor_server(&args, None)?;
    let label = format!(
        "history-floor: a fixed answer as long as last {n}'s, {connections} keep-alive connections"
    );
    measure(addr, seconds, connections, n, &label).await
}

/// The answer `ivy serve` gives to a last-`n` read of `history`'s channel: `n` lines of 131
/// bytes, with its headers (hyper adds `content-length` and `date`, as there).
fn fixed_answer(n: usize) -> hyper::Response<Full<Bytes>> {
    let data = "h".repeat(100);
    let body: String = (0..n)
        .map(|i| format!("@1800000000.{i:09}:/hist/c:{data}\n"))
        .collect();
    let mut answer = hyper::Response::new(Full::new(Bytes::from(body)));
    let headers = answer.headers_mut();
    for (name, value) in [
        ("content-type", "text/plain; charset=utf-8"),
        ("accept-ranges", "bytes"),
        ("etag", "\"c102dd0d72ecba03\""),
        ("last-modified", "Mon, 30 Nov 2026 13:33:31 GMT"),
        ("cache-control", "no-cache"),
    ] {
        headers.insert(name, hyper::header::HeaderValue::from_static(value));
    }
    answer
}

/// The fixed-answer server: prints its address, then answers every request on every connection
/// with `fixed_answer(n)` until killed.
pub(crate) async fn serve_fixed_answer(n: usize) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    say!("{}", listener.local_addr()?);
    let answer = fixed_answer(n);
    loop {
        let (tcp, _) = listener.accept().await?;
        let _ = tcp.set_nodelay(true);
        let answer = answer.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |_request| {
                let answer = answer.clone();
                async move { Ok::<_, Infallible>(answer) }
            });
            let io = hyper_util::rt::TokioIo::new(tcp);
            let _ = hyper::server::conn::http1::Builder::new()
                .keep_alive(true)
                .serve_connection(io, service)
                .await;
        });
    }
}
