//! Helpers shared by the integration tests.
#![allow(dead_code)]

use ivy::channel::{ChannelPath, Selector};
use ivy::event_id::EventId;
use ivy::storage::{Query, Store};
use std::path::{Path, PathBuf};

pub fn path(p: &str) -> ChannelPath {
    ChannelPath::parse(p).expect("test path")
}

pub fn sel(s: &str) -> Selector {
    Selector::parse(s).expect("test selector")
}

/// (id, path, data) of every event a query returns, panicking on a read error.
pub fn read(store: &Store, selector: &str, query: &Query) -> Vec<(EventId, String, Vec<u8>)> {
    let reader = store.reader(&sel(selector));
    reader
        .events(query)
        .map(|e| {
            let e = e.expect("read");
            (e.id, e.path.to_owned(), e.data.to_vec())
        })
        .collect()
}

/// Every file under `dir`, sorted.
pub fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).expect("read dir").flatten() {
            let p = entry.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// The segment files under `dir`, sorted.
pub fn segments(dir: &Path) -> Vec<PathBuf> {
    files(dir)
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect()
}

/// Copies a data directory (files only; no lock is copied as held).
pub fn copy_dir(from: &Path, to: &Path) {
    for file in files(from) {
        let rel = file.strip_prefix(from).expect("under from");
        let dest = to.join(rel);
        std::fs::create_dir_all(dest.parent().expect("has parent")).expect("mkdir");
        std::fs::copy(&file, &dest).expect("copy");
    }
}

/// Waits (up to 10 s) for the spare-filling thread to leave a spare of `bytes` in `dir`.
pub fn wait_for_spare(dir: &Path, bytes: u64) {
    let spare = dir.join("SPARE");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !spare.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "no spare was made in 10 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert_eq!(std::fs::metadata(&spare).expect("spare").len(), bytes);
}

/// How many cycles a long test runs: the number in environment variable `name`, else `default`
/// (CI runs the defaults; long runs set the variable).
pub fn cycles(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A seed for randomised tests: `IVY_TEST_SEED` or the time; printed so a failure replays.
pub fn seed() -> u64 {
    let seed = std::env::var("IVY_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        });
    eprintln!("IVY_TEST_SEED={seed}");
    seed
}

/// xorshift64*: enough randomness for tests, replayable from the seed.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    /// A random event for an appending test thread: one of `paths`, and data that names it
    /// (`tag`: cycle, thread and number) followed by fewer than `extra` arbitrary bytes.
    pub fn event<'a>(&mut self, paths: &[&'a str], tag: &str, extra: u64) -> (&'a str, Vec<u8>) {
        let path = paths[self.below(paths.len() as u64) as usize];
        let data = format!("{tag}:")
            .bytes()
            .chain((0..self.below(extra)).map(|i| i as u8))
            .collect();
        (path, data)
    }
}

/// A child `ivy serve`, killed when dropped, so that a failed assertion leaves no server behind.
pub struct ChildServer(pub std::process::Child);

impl Drop for ChildServer {
    fn drop(&mut self) {
        // Already reaped when the test stopped it itself; then both calls just fail.
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `ivy serve --listen 127.0.0.1:0 --log error --data DIR ARGS` as a child and returns it
/// with the address it printed.
pub fn serve_child(dir: &Path, args: &[&str]) -> (ChildServer, std::net::SocketAddr) {
    use std::io::BufRead;
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_ivy"))
        .args(["serve", "--listen", "127.0.0.1:0", "--log", "error"])
        .args(args)
        .arg("--data")
        .arg(dir)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn ivy serve");
    let mut server = ChildServer(child);
    let stdout = server.0.stdout.take().expect("stdout");
    let mut line = String::new();
    std::io::BufReader::new(stdout)
        .read_line(&mut line)
        .expect("first line");
    let addr = ivy::server::listening_addr(&line)
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"));
    (server, addr)
}
