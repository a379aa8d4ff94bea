//! The server: listener, connection limit, WebSocket upgrades and graceful shutdown; it wires
//! the hub (`fanout.rs`), the HTTP service (`http/`) and WebSocket sessions (`ws.rs` reads,
//! `writer.rs` writes).
//!
//! Embedding: `Server::new(store, options)` gives a value whose `handle` answers any hyper
//! request (mount it under a larger hyper program, as the original Ivy offered its ServeMux), and
//! whose `serve` runs the whole server on a listener until a shutdown future resolves.
//!
//! Shutdown: stop accepting; every WebSocket is closed with 1001 and every HTTP connection is
//! finished gracefully (at most `SHUTDOWN_GRACE`); then everything acknowledged is synced and the
//! store is closed.

mod budget;
mod catchup;
pub mod descriptors;
mod error;
mod fanout;
pub mod http;
mod linger;
mod recent;
mod session;
mod stall;
mod tcp;
mod writer;
mod ws;

use crate::config::ServerOptions;
use crate::metrics::Metrics;
use crate::storage::Store;
use fanout::Hub;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use session::Session;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};

/// How long shutdown waits for connections to finish.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// State every connection shares.
pub struct Shared {
    hub: Arc<Hub>,
    opts: Arc<ServerOptions>,
    /// `true` once shutdown began; connections watch it.
    shutdown: watch::Sender<bool>,
    connections: Arc<Semaphore>,
    /// Bytes of POST bodies being received (`ServerOptions::body_bytes_in_flight_max`).
    bodies: Arc<budget::Budget>,
    /// Bytes of HTTP answers built and not yet written (`ServerOptions::answer_bytes_total_max`).
    answers: Arc<budget::Budget>,
    /// Whole answers kept while they hold (`http/cache.rs`).
    answer_cache: http::AnswerCache,
    next_session: AtomicU64,
    sid_seed: std::collections::hash_map::RandomState,
}

/// An Ivy server over a store.
pub struct Server {
    shared: Arc<Shared>,
    dispatcher: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    /// Starts the fan-out dispatcher over `store`.
    pub fn new(store: Store, opts: ServerOptions) -> std::io::Result<Server> {
        let metrics = Arc::new(Metrics::new());
        // A store that already reports to another server's metrics keeps doing so.
        store.observe_commits(Arc::clone(&metrics) as Arc<dyn crate::storage::CommitObserver>);
        let hub = Arc::new(Hub::new(store, metrics, &opts));
        let for_thread = Arc::clone(&hub);
        let dispatcher = std::thread::Builder::new()
            .name("ivy-fanout".into())
            .spawn(move || for_thread.run_dispatcher())?;
        let (shutdown, _) = watch::channel(false);
        let connections = Arc::new(Semaphore::new(opts.connections_max));
        let bodies = Arc::new(budget::Budget::new(opts.body_bytes_in_flight_max));
        let answers = Arc::new(budget::Budget::new(opts.answer_bytes_total_max));
        let answer_cache =
            http::AnswerCache::new(opts.answer_cache_bytes, opts.answer_bytes_total_max);
        Ok(Server {
            shared: Arc::new(Shared {
                hub,
                opts: Arc::new(opts),
                shutdown,
                connections,
                bodies,
                answers,
                answer_cache,
                next_session: AtomicU64::new(1),
                sid_seed: std::collections::hash_map::RandomState::new(),
            }),
            dispatcher: Some(dispatcher),
        })
    }

    pub fn store(&self) -> &Store {
        &self.shared.hub.store
    }

    /// Answers one request (for embedding in another hyper service).
    pub async fn handle(&self, req: Request<Incoming>) -> Response<http::Body> {
        http::handle(Arc::clone(&self.shared), req).await
    }

    /// Serves connections from `listener` until `shutdown` resolves, then shuts down gracefully
    /// and closes the store.
    pub async fn serve(
        mut self,
        listener: TcpListener,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> std::io::Result<()> {
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                accepted = listener.accept() => {
                    let (tcp, peer) = match accepted {
                        Ok(a) => a,
                        Err(e) => {
                            // Out of descriptors and the like: back off instead of spinning.
                            tracing::warn!(error = %e, "accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    };
                    let _ = tcp.set_nodelay(true);
                    match Arc::clone(&self.shared.connections).try_acquire_owned() {
                        Ok(permit) => {
                            tokio::spawn(serve_connection(Arc::clone(&self.shared), tcp, Arc::new(permit)));
                        }
                        Err(_) => {
                            tracing::warn!(%peer, "connection limit reached; refusing");
                            tokio::spawn(refuse(tcp));
                        }
                    }
                }
                () = &mut shutdown => break,
            }
        }
        drop(listener);
        tracing::info!("shutting down: closing connections");
        let _ = self.shared.shutdown.send(true);
        let max = self.shared.opts.connections_max;
        let waited = tokio::time::timeout(SHUTDOWN_GRACE, async {
            while self.shared.connections.available_permits() < max {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        if waited.is_err() {
            tracing::warn!("some connections did not finish within the grace period");
        }
        self.shared.hub.stop();
        if let Some(handle) = self.dispatcher.take() {
            let _ = tokio::task::spawn_blocking(move || handle.join()).await;
        }
        let store = self.shared.hub.store.clone();
        tokio::task::spawn_blocking(move || store.close())
            .await
            .map_err(std::io::Error::other)?
            .map_err(std::io::Error::other)?;
        tracing::info!("store closed; bye");
        Ok(())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shared.hub.stop();
    }
}

/// The first line `ivy serve` prints on stdout. Programs that start it (the load tool, the
/// tests) read the address from it with `listening_addr`, so the two stay together here.
pub fn listening_line(addr: std::net::SocketAddr, data: &std::path::Path) -> String {
    format!(
        "ivy listening on http://{addr} (WebSocket ws://{addr}/ws), data in {}",
        data.display()
    )
}

/// The address in a `listening_line`.
pub fn listening_addr(line: &str) -> Option<std::net::SocketAddr> {
    line.split("http://")
        .nth(1)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The accept queue asked of the kernel (which caps it at `net.core.somaxconn`). With the usual
/// 1024, a burst of a few thousand connects overflows it and the kernel resets connections that
/// the client already believes open (seen in `tests/server/hostile.rs`, 2,200 at once).
const LISTEN_BACKLOG: u32 = 4096;

/// A listener for `Server::serve` with a deep accept queue (see `LISTEN_BACKLOG`).
pub fn listen(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// A connection past the limit: 503 and close.
async fn refuse(mut tcp: tokio::net::TcpStream) {
    // Written by hand (no hyper connection is spent on it); the length is derived, not typed.
    const BODY: &str = "too many connections, retry\n";
    let answer = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{BODY}",
        BODY.len()
    );
    let _ = tcp.write_all(answer.as_bytes()).await;
    drop(linger::LingeringTcp::new(tcp));
}

async fn serve_connection(
    shared: Arc<Shared>,
    tcp: tokio::net::TcpStream,
    permit: Arc<OwnedSemaphorePermit>,
) {
    shared.hub.metrics.connections.inc();
    let io = TokioIo::new(stall::WriteStall::new(
        linger::LingeringTcp::new(tcp),
        shared.opts.write_timeout,
        shared.hub.metrics.write_timeouts.clone(),
    ));
    let service_shared = Arc::clone(&shared);
    let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
        let shared = Arc::clone(&service_shared);
        req.extensions_mut().insert(Arc::clone(&permit));
        async move { Ok::<_, std::convert::Infallible>(http::handle(shared, req).await) }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(shared.opts.header_timeout)
        .max_buf_size(shared.opts.header_bytes_max.max(8192))
        .keep_alive(true);
    let conn = builder.serve_connection(io, service).with_upgrades();
    tokio::pin!(conn);
    let mut shutdown = shared.shutdown.subscribe();
    tokio::select! {
        result = conn.as_mut() => {
            if let Err(e) = result {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        }
        _ = wait_for_stop(&mut shutdown) => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
    shared.hub.metrics.connections.dec();
}

async fn wait_for_stop(shutdown: &mut watch::Receiver<bool>) {
    while !*shutdown.borrow_and_update() {
        if shutdown.changed().await.is_err() {
            return;
        }
    }
}

/// `GET /ws`: checks the upgrade, the origin and the subprotocol, then hands the connection to
/// a session.
pub(crate) fn upgrade(shared: &Arc<Shared>, mut req: Request<Incoming>) -> Response<http::Body> {
    if req.method() != hyper::Method::GET {
        return http::method_not_allowed("GET");
    }
    if !fastwebsockets::upgrade::is_upgrade_request(&req) {
        // RFC 9110 15.5.22: a 426 names the protocol to upgrade to.
        let mut resp = http::text(StatusCode::UPGRADE_REQUIRED, "expected a WebSocket upgrade");
        resp.headers_mut().insert(
            hyper::header::UPGRADE,
            hyper::header::HeaderValue::from_static("websocket"),
        );
        return resp;
    }
    let headers = req.headers();
    let origin = headers
        .get(hyper::header::ORIGIN)
        .and_then(|v| v.to_str().ok());
    let host = headers
        .get(hyper::header::HOST)
        .and_then(|v| v.to_str().ok());
    if !shared.opts.origins.allows(origin, host) {
        return http::text(StatusCode::FORBIDDEN, "origin not allowed");
    }
    let offered: Vec<String> = headers
        .get_all(hyper::header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|p| p.trim().to_owned())
        .filter(|p| !p.is_empty())
        .collect();
    if !offered.is_empty() && !offered.iter().any(|p| p == "ivy1") {
        return http::text(
            StatusCode::BAD_REQUEST,
            "unsupported subprotocol (this server speaks ivy1)",
        );
    }
    let permit = req.extensions().get::<Arc<OwnedSemaphorePermit>>().cloned();
    let (resp, fut) = match fastwebsockets::upgrade::upgrade(&mut req) {
        Ok(pair) => pair,
        Err(e) => {
            return http::text(
                StatusCode::BAD_REQUEST,
                format!("bad WebSocket upgrade: {e}"),
            )
        }
    };
    let n = shared.next_session.fetch_add(1, Ordering::Relaxed);
    let sid = format!("{:016x}", shared.sid_seed.hash_one(n));
    let session = Arc::new(Session::new(
        n,
        sid.into_boxed_str(),
        Arc::clone(&shared.hub.outbound),
    ));
    let hub = Arc::clone(&shared.hub);
    let opts = Arc::clone(&shared.opts);
    let shutdown = shared.shutdown.subscribe();
    tokio::spawn(async move {
        // Holding the permit keeps the upgraded connection counted until it closes.
        let _permit = permit;
        match fut.await {
            Ok(ws) => ws::run(hub, opts, ws.into_inner(), session, shutdown).await,
            Err(e) => tracing::debug!(error = %e, "upgrade did not complete"),
        }
    });
    let mut resp = resp.map(|b| b.map_err(|never| match never {}).boxed());
    if !offered.is_empty() {
        resp.headers_mut().insert(
            hyper::header::SEC_WEBSOCKET_PROTOCOL,
            hyper::header::HeaderValue::from_static("ivy1"),
        );
    }
    resp
}
