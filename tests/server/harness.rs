//! A real server on 127.0.0.1:0 with a temporary data directory, and clients that speak to it as
//! browsers and old Ivy clients do: a WebSocket client crate (tokio-tungstenite) and raw HTTP/1.1.
#![allow(dead_code)]

use futures_util::{SinkExt, StreamExt};
use ivy::config::ServerOptions;
use ivy::server::Server;
use ivy::storage::{Durability, Store, StoreOptions};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;

pub const WAIT: Duration = Duration::from_secs(20);

pub struct TestServer {
    pub addr: SocketAddr,
    pub dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

pub async fn start() -> TestServer {
    start_with(ServerOptions::default(), StoreOptions::default()).await
}

pub async fn start_with(opts: ServerOptions, store_opts: StoreOptions) -> TestServer {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let mut server = start_in(&dir, opts, store_opts).await;
    server._tmp = Some(tmp);
    server
}

pub async fn start_in(
    dir: &std::path::Path,
    opts: ServerOptions,
    store_opts: StoreOptions,
) -> TestServer {
    let store_opts = StoreOptions {
        durability: Durability::Always,
        ..store_opts
    };
    let store = tokio::task::spawn_blocking({
        let dir = dir.to_path_buf();
        move || Store::open(dir, store_opts)
    })
    .await
    .unwrap()
    .unwrap();
    let listener = ivy::server::listen("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = listener.local_addr().unwrap();
    let server = Server::new(store, opts).unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(server.serve(listener, async move {
        let _ = stopped.await;
    }));
    TestServer {
        addr,
        dir: dir.to_path_buf(),
        _tmp: None,
        stop: Some(stop),
        task: Some(task),
    }
}

impl TestServer {
    /// Graceful shutdown, as SIGTERM does; waits until the store is closed.
    pub async fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(WAIT, task)
                .await
                .expect("shutdown in time")
                .unwrap()
                .unwrap();
        }
    }

    /// A server run by someone else (a child `ivy serve`): the helpers talk to it alike.
    pub fn external(addr: SocketAddr, dir: PathBuf) -> TestServer {
        TestServer {
            addr,
            dir,
            _tmp: None,
            stop: None,
            task: None,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }
}

pub struct Ws {
    pub stream: tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>,
    pub sid: String,
    pub protocol: Option<String>,
}

/// The value of a sample in the server's `/metrics` (a counter, a gauge, or a histogram's
/// `_sum`, `_count` or `NAME_bucket{le="X"}`), which must be a whole number.
pub async fn metric(server: &TestServer, name: &str) -> u64 {
    let metrics = get(server, "/metrics").await.text();
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|v| v.fract() == 0.0 && *v >= 0.0)
        .map(|v| v as u64)
        .unwrap_or_else(|| panic!("no whole-number metric {name} in {metrics}"))
}

/// Waits (up to `WAIT`) until the metric `name` satisfies `is_done`; fails with `what` if it
/// never does.
pub async fn until_metric(
    server: &TestServer,
    name: &str,
    is_done: impl Fn(u64) -> bool,
    what: &str,
) {
    let until = tokio::time::Instant::now() + WAIT;
    while !is_done(metric(server, name).await) {
        assert!(tokio::time::Instant::now() < until, "{what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Connects with subprotocol `ivy1` and reads the intro line.
pub async fn ws(server: &TestServer) -> Ws {
    ws_with(server, &[("Sec-WebSocket-Protocol", "ivy1")])
        .await
        .expect("upgrade accepted")
}

pub async fn ws_with(
    server: &TestServer,
    headers: &[(&str, &str)],
) -> Result<Ws, tokio_tungstenite::tungstenite::Error> {
    ws_at_with(server.addr, headers).await
}

/// `ws` for a server at `addr` that is not a `TestServer` (an embedding, a second server).
pub async fn ws_at(addr: std::net::SocketAddr) -> Ws {
    ws_at_with(addr, &[("Sec-WebSocket-Protocol", "ivy1")])
        .await
        .expect("upgrade accepted")
}

/// Sends the request that opens a WebSocket with subprotocol ivy1 at `addr`, for raw-socket
/// clients (the 101 is theirs to read, or not).
pub async fn send_upgrade<W: tokio::io::AsyncWrite + Unpin>(w: &mut W, addr: SocketAddr) {
    let request = format!(
        "GET /ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: ivy1\r\n\r\n"
    );
    w.write_all(request.as_bytes()).await.unwrap();
}

/// A raw socket to `addr` that has sent the WebSocket upgrade request.
pub async fn raw_ws(addr: SocketAddr) -> TcpStream {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    send_upgrade(&mut tcp, addr).await;
    tcp
}

/// A client's frame (masked, as clients must), for raw-socket clients.
pub fn client_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [0x11u8, 0x22, 0x33, 0x44];
    let mut out = vec![(u8::from(fin) << 7) | opcode];
    match payload.len() {
        n if n < 126 => out.push(0x80 | n as u8),
        n if n < 65536 => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    out
}

/// A connection whose receive buffer is `bytes`, so that a client that does not read soon
/// leaves the server with writes it cannot make (the kernel's buffers hold little).
///
/// Its segments are Ethernet-sized, as across a real network. Loopback's are 64 KiB, and with a
/// receive window smaller than one segment the kernel may fall into sending only on its window
/// probes, one window per 200 ms (seen: 15 KB/s, with `ss -tin` showing `timer:(persist)` and
/// `snd_wnd:3120`), which turned a 4 s test into hours now and then.
pub async fn tcp_with_receive_buffer(addr: SocketAddr, bytes: u32) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(bytes).unwrap();
    socket2::SockRef::from(&socket).set_tcp_mss(1460).unwrap();
    socket.connect(addr).await.unwrap()
}

/// `ws`, over `tcp_with_receive_buffer`.
pub async fn ws_with_receive_buffer(server: &TestServer, bytes: u32) -> Ws {
    let tcp = tcp_with_receive_buffer(server.addr, bytes).await;
    let mut req = format!("ws://{}/ws", server.addr)
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("Sec-WebSocket-Protocol", "ivy1".parse().unwrap());
    let (stream, _) =
        tokio_tungstenite::client_async(req, tokio_tungstenite::MaybeTlsStream::Plain(tcp))
            .await
            .unwrap();
    ws_ready(stream, Some("ivy1".into())).await
}

pub async fn ws_at_with(
    addr: std::net::SocketAddr,
    headers: &[(&str, &str)],
) -> Result<Ws, tokio_tungstenite::tungstenite::Error> {
    let mut req = format!("ws://{addr}/ws").into_client_request().unwrap();
    for (k, v) in headers {
        req.headers_mut().insert(
            tokio_tungstenite::tungstenite::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    let (stream, resp) = tokio_tungstenite::connect_async(req).await?;
    let protocol = resp
        .headers()
        .get("sec-websocket-protocol")
        .map(|v| v.to_str().unwrap().to_owned());
    Ok(ws_ready(stream, protocol).await)
}

/// Reads the intro line of a new connection.
async fn ws_ready(
    stream: tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>,
    protocol: Option<String>,
) -> Ws {
    let mut ws = Ws {
        stream,
        sid: String::new(),
        protocol,
    };
    let intro = ws.recv().await;
    let (_, sid) = intro.split_once(":~/sid:").expect("intro line");
    assert!(intro.starts_with('@'));
    ws.sid = sid.to_owned();
    ws
}

impl Ws {
    pub async fn send(&mut self, text: &str) {
        self.stream.send(Message::text(text)).await.unwrap();
    }

    /// The next message of any kind.
    pub async fn message(&mut self) -> Message {
        tokio::time::timeout(WAIT, self.stream.next())
            .await
            .expect("a message in time")
            .expect("open")
            .unwrap()
    }

    /// The next text message (pings are answered by the client crate).
    pub async fn recv(&mut self) -> String {
        loop {
            match self.message().await {
                Message::Text(t) => return t.to_string(),
                Message::Ping(_) | Message::Pong(_) => continue,
                other => panic!("expected text, got {other:?}"),
            }
        }
    }

    /// Sends `#KEY#...` and returns the reply to it (skipping events meanwhile).
    pub async fn request(&mut self, key: &str, command: &str) -> String {
        self.send(&format!("#{key}#{command}")).await;
        let prefix = format!("#{key}#");
        loop {
            let m = self.recv().await;
            if let Some(rest) = m.strip_prefix(&prefix) {
                return rest.to_owned();
            }
        }
    }

    /// Waits for the close frame and returns its code.
    pub async fn closed(&mut self) -> u16 {
        loop {
            match tokio::time::timeout(WAIT, self.stream.next())
                .await
                .expect("close in time")
            {
                Some(Ok(Message::Close(Some(frame)))) => return u16::from(frame.code),
                Some(Ok(Message::Close(None))) => return u16::from(CloseCode::Status),
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return 1006,
            }
        }
    }

    /// Nothing arrives within `d`.
    pub async fn quiet_for(&mut self, d: Duration) -> Option<String> {
        match tokio::time::timeout(d, self.stream.next()).await {
            Err(_) => None,
            Ok(Some(Ok(Message::Text(t)))) => Some(t.to_string()),
            Ok(other) => Some(format!("{other:?}")),
        }
    }
}

pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// One raw HTTP/1.1 request (`Connection: close`), parsed with httparse; chunked bodies are
/// decoded.
pub async fn http(
    server: &TestServer,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> HttpResponse {
    let mut tcp = TcpStream::connect(server.addr).await.unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n",
        server.addr
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() || method == "POST" {
        req.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    req.push_str("\r\n");
    tcp.write_all(req.as_bytes()).await.unwrap();
    tcp.write_all(body).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(WAIT, tcp.read_to_end(&mut raw))
        .await
        .expect("response in time")
        .unwrap();
    parse_response(&raw, method == "HEAD")
}

pub fn parse_response(raw: &[u8], is_head: bool) -> HttpResponse {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut resp = httparse::Response::new(&mut headers);
    let n = match resp.parse(raw).unwrap() {
        httparse::Status::Complete(n) => n,
        httparse::Status::Partial => panic!("partial response: {}", String::from_utf8_lossy(raw)),
    };
    let headers: Vec<(String, String)> = resp
        .headers
        .iter()
        .map(|h| {
            (
                h.name.to_owned(),
                String::from_utf8_lossy(h.value).into_owned(),
            )
        })
        .collect();
    let status = resp.code.unwrap();
    let rest = &raw[n..];
    let is_chunked = headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    let body = if is_head {
        Vec::new()
    } else if is_chunked {
        dechunk(rest)
    } else {
        rest.to_vec()
    };
    HttpResponse {
        status,
        headers,
        body,
    }
}

fn dechunk(mut rest: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let line_end = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .expect("chunk size line");
        let size =
            usize::from_str_radix(std::str::from_utf8(&rest[..line_end]).unwrap().trim(), 16)
                .unwrap();
        rest = &rest[line_end + 2..];
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&rest[..size]);
        rest = &rest[size + 2..];
    }
}

/// POSTs raw data (content type `text/plain`); returns (status, body).
pub async fn try_post(server: &TestServer, path: &str, data: &[u8]) -> (u16, String) {
    let r = http(
        server,
        "POST",
        &format!("/events{path}"),
        &[("Content-Type", "text/plain")],
        data,
    )
    .await;
    (r.status, r.text())
}

/// POST raw data (content type `text/plain`) and return the id line.
pub async fn post(server: &TestServer, path: &str, data: &[u8]) -> String {
    let (status, body) = try_post(server, path, data).await;
    assert_eq!(status, 200, "{body}");
    body.trim().to_owned()
}

/// An id as an ack, a POST answer or an event line gives it (with or without `@`).
pub fn id_of(s: &str) -> String {
    s.trim().trim_start_matches('@').to_owned()
}

/// The ids of `path`'s events, oldest first.
pub async fn ids(server: &TestServer, path: &str) -> Vec<String> {
    let r = get(server, &format!("/events{path}?n=100000")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    r.text()
        .lines()
        .map(|l| id_of(l.split(':').next().unwrap_or("")))
        .collect()
}

/// `ivy verify DIR` exits 0.
pub fn verify_clean(dir: &std::path::Path) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ivy"))
        .arg("verify")
        .arg(dir)
        .output()
        .expect("run ivy verify");
    assert!(
        out.status.success(),
        "verify: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

pub async fn get(server: &TestServer, path: &str) -> HttpResponse {
    get_with(server, path, &[]).await
}

/// A GET with request headers (conditional requests, ranges, origins).
pub async fn get_with(server: &TestServer, path: &str, headers: &[(&str, &str)]) -> HttpResponse {
    http(server, "GET", path, headers, b"").await
}

/// The status of a GET with headers.
pub async fn status_of(server: &TestServer, path: &str, headers: &[(&str, &str)]) -> u16 {
    get_with(server, path, headers).await.status
}

/// A child `ivy serve` on 127.0.0.1:0 over `dir`, run by `sh -c "SETUP && exec ivy serve ..."`
/// (SETUP sets limits, such as `ulimit -n 64`); killed when dropped unless terminated. Its stderr
/// goes to `DIR.stderr`, which `terminate` checks for panics.
pub fn spawn_serve(dir: &std::path::Path, args: &[&str], setup: &str) -> (ChildServer, TestServer) {
    let quoted: Vec<String> = args.iter().map(|a| format!("'{a}'")).collect();
    let mut child = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "{setup} && exec '{}' serve --listen 127.0.0.1:0 --data '{}' {}",
            env!("CARGO_BIN_EXE_ivy"),
            dir.display(),
            quoted.join(" ")
        ))
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(dir.with_extension("stderr")).expect("stderr file"))
        .spawn()
        .expect("spawn ivy serve");
    let mut line = String::new();
    {
        use std::io::BufRead;
        std::io::BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("first line");
    }
    let addr = ivy::server::listening_addr(&line)
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"));
    (
        ChildServer(child, dir.with_extension("stderr")),
        TestServer::external(addr, dir.to_path_buf()),
    )
}

/// A child server process and its stderr file; killed if the test ends before `terminate`.
pub struct ChildServer(std::process::Child, PathBuf);

impl ChildServer {
    pub fn pid(&self) -> u32 {
        self.0.id()
    }

    /// Resident memory of the server, from `/proc`.
    pub fn rss_bytes(&self) -> u64 {
        ivy::metrics::resident_bytes(self.0.id()).expect("the server is running")
    }

    /// SIGTERM, and the graceful exit it must lead to.
    pub fn terminate(&mut self) {
        let status = std::process::Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
        let exit = self.0.wait().expect("wait");
        assert!(exit.success(), "ivy serve exited with {exit}");
        // A panic in a connection task does not end the process; it is printed, though.
        let stderr = std::fs::read_to_string(&self.1).unwrap_or_default();
        assert!(
            !stderr.contains("panicked"),
            "ivy serve panicked:\n{stderr}"
        );
    }
}

impl Drop for ChildServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        if std::thread::panicking() {
            // The test failed: what the server said is the first thing to read.
            let stderr = std::fs::read_to_string(&self.1).unwrap_or_default();
            eprintln!("ivy serve's stderr:\n{stderr}");
        }
    }
}
