//! Raw WebSocket frames a client crate would not send: fragments, pipelining, bad opcodes.

use super::harness::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

struct Raw {
    tcp: TcpStream,
    buf: Vec<u8>,
}

impl Raw {
    async fn open(server: &TestServer) -> Raw {
        let tcp = raw_ws(server.addr).await;
        let mut raw = Raw {
            tcp,
            buf: Vec::new(),
        };
        loop {
            if let Some(end) = raw.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                raw.buf.drain(..end + 4);
                break;
            }
            raw.fill().await;
        }
        let (op, intro) = raw.next().await;
        assert_eq!(op, 1);
        assert!(intro.starts_with(b"@"));
        raw
    }

    async fn fill(&mut self) {
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(WAIT, self.tcp.read(&mut chunk))
            .await
            .expect("data in time")
            .unwrap();
        assert!(n > 0, "connection closed");
        self.buf.extend_from_slice(&chunk[..n]);
    }

    /// The next server frame: (opcode, payload). Server frames are unmasked.
    async fn next(&mut self) -> (u8, Vec<u8>) {
        loop {
            if self.buf.len() >= 2 {
                let op = self.buf[0] & 0x0f;
                let (len, head) = match self.buf[1] & 0x7f {
                    126 if self.buf.len() >= 4 => {
                        (u16::from_be_bytes([self.buf[2], self.buf[3]]) as usize, 4)
                    }
                    127 if self.buf.len() >= 10 => (
                        u64::from_be_bytes(self.buf[2..10].try_into().unwrap()) as usize,
                        10,
                    ),
                    n if n < 126 => (n as usize, 2),
                    _ => (usize::MAX, 0),
                };
                if len != usize::MAX && self.buf.len() >= head + len {
                    let payload = self.buf[head..head + len].to_vec();
                    self.buf.drain(..head + len);
                    return (op, payload);
                }
            }
            self.fill().await;
        }
    }

    /// The close code the server sends, skipping other frames.
    async fn close_code(&mut self) -> u16 {
        loop {
            let (op, payload) = self.next().await;
            if op == 8 {
                return u16::from_be_bytes([payload[0], payload[1]]);
            }
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.tcp.write_all(bytes).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fragments_pipelining_and_control_frames() {
    let server = start().await;
    let mut c = Raw::open(&server).await;
    // One message in three fragments, with a ping between them, all in one write; then two
    // whole messages pipelined in the same write.
    let mut bytes = client_frame(false, 1, b"#a#:/frag");
    bytes.extend(client_frame(true, 9, b"hi"));
    bytes.extend(client_frame(false, 0, b":one "));
    bytes.extend(client_frame(true, 0, "two é".as_bytes()));
    bytes.extend(client_frame(true, 1, b"#b#@"));
    bytes.extend(client_frame(true, 1, b"#c#:/frag:three"));
    c.send(&bytes).await;
    let mut texts = Vec::new();
    let mut pong = false;
    while texts.len() < 3 {
        let (op, payload) = c.next().await;
        match op {
            10 => pong = payload == b"hi",
            1 => texts.push(String::from_utf8(payload).unwrap()),
            other => panic!("opcode {other}"),
        }
    }
    assert!(pong);
    // Replies are matched by key: the time reply need not wait for the publishes' durability.
    texts.sort();
    assert!(
        texts[0].starts_with("#a#@")
            && texts[1].starts_with("#b#@")
            && texts[2].starts_with("#c#@"),
        "{texts:?}"
    );
    let stored = get(&server, "/events/frag").await.text();
    assert!(
        stored.contains(":/frag:one two é\n") && stored.contains(":/frag:three\n"),
        "{stored}"
    );
    // Idle in between (the parser's buffer is released), then a 64 KiB-class frame.
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let big = format!("#d#:/frag:{}", "z".repeat(30_000));
    c.send(&client_frame(true, 1, big.as_bytes())).await;
    let (_, reply) = c.next().await;
    assert!(reply.starts_with(b"#d#@"));
    c.send(&client_frame(true, 8, &1000u16.to_be_bytes())).await;
    assert_eq!(c.close_code().await, 1000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frames_close_with_the_right_code() {
    let server = start().await;
    let cases: Vec<(Vec<u8>, u16)> = vec![
        // Fragments adding up past 64 KiB.
        (
            {
                let mut b = client_frame(false, 1, &vec![b'a'; 40_000]);
                b.extend(client_frame(true, 0, &vec![b'a'; 40_000]));
                b
            },
            1009,
        ),
        (client_frame(true, 1, &[0xff, 0xfe]), 1007),
        (
            {
                let mut b = client_frame(false, 1, &[0xe2, 0x82]);
                b.extend(client_frame(true, 0, &[0x28]));
                b
            },
            1007,
        ),
        (client_frame(true, 0, b"orphan"), 1002),
        (client_frame(true, 3, b"?"), 1002),
        (client_frame(true, 9, &[0u8; 126]), 1002),
        // Unmasked (RFC 6455 5.1), alone and after a masked frame.
        (vec![0x81, 0x01, b'@'], 1002),
        (
            {
                let mut b = client_frame(true, 1, b"#k#@");
                b.extend([0x81, 0x01, b'@']);
                b
            },
            1002,
        ),
        (client_frame(true, 2, b"bin"), 1003),
    ];
    for (bytes, code) in cases {
        let mut c = Raw::open(&server).await;
        c.send(&bytes).await;
        assert_eq!(
            c.close_code().await,
            code,
            "frame {:02x?}",
            &bytes[..bytes.len().min(8)]
        );
    }
    // The server is still serving.
    assert_eq!(get(&server, "/healthz").await.status, 200);
}

/// Pipelined publishes are appended together (`ws.rs`, `Publishes`); a refusal in the middle
/// still answers each publish on its own, in order, and an unkeyed refusal stops what follows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_publishes_each_get_their_own_answer() {
    let server = start_with(
        ivy::config::ServerOptions::default(),
        ivy::storage::StoreOptions {
            event_bytes_max: 50,
            ..ivy::storage::StoreOptions::default()
        },
    )
    .await;
    let mut c = Raw::open(&server).await;
    let too_large = "x".repeat(60);
    let mut bytes = Vec::new();
    for message in [
        "#1#:/p:one".to_owned(),
        format!("#2#:/p:{too_large}"),
        "#3#:/p:three".to_owned(),
        ":/p:four".to_owned(),
        format!(":/p:{too_large}"),
        "#6#:/p:six".to_owned(),
    ] {
        bytes.extend(client_frame(true, 1, message.as_bytes()));
    }
    c.send(&bytes).await;
    let mut texts = Vec::new();
    let code = loop {
        let (op, payload) = c.next().await;
        match op {
            1 => texts.push(String::from_utf8(payload).unwrap()),
            8 => break u16::from_be_bytes([payload[0], payload[1]]),
            other => panic!("opcode {other}"),
        }
    };
    assert_eq!(code, 1011, "{texts:?}");
    let answer = |key: &str| {
        texts
            .iter()
            .find_map(|t| t.strip_prefix(&format!("#{key}#")))
            .unwrap_or_else(|| panic!("no answer to {key} in {texts:?}"))
            .to_owned()
    };
    assert!(answer("2").starts_with("!not stored:"), "{texts:?}");
    let (one, three) = (answer("1"), answer("3"));
    assert!(
        one.starts_with('@') && three.starts_with('@') && one < three,
        "{texts:?}"
    );
    assert!(!texts.iter().any(|t| t.starts_with("#6#")), "{texts:?}");
    let stored = get(&server, "/events/p").await.text();
    let data: Vec<&str> = stored
        .lines()
        .map(|l| l.rsplit_once(':').unwrap().1)
        .collect();
    assert_eq!(data, ["one", "three", "four"], "{stored}");
    assert!(stored.starts_with(&format!("{one}:/p:one\n")), "{stored}");
}
