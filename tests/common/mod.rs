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
/// Where a segment file's records end, and its length: the writer keeps zeroes after the
/// records (`Segment::zero_ahead`). Only for events whose data ends in a nonzero byte.
pub fn records_end_and_len(seg: &Path) -> (u64, u64) {
    let bytes = std::fs::read(seg).unwrap();
    let end = bytes.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
    (end as u64, bytes.len() as u64)
}

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

/// `tests/independent_reader.py`: a reader of data directories written from `storage-format.md`
/// alone (see `independent_reader.rs`).
const READER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/independent_reader.py");

/// What one run of the independent reader printed.
pub struct IndependentRead {
    pub status: i32,
    pub events: String,
    /// Each problem it reported: file relative to the directory, byte offset, and whether it is
    /// torn (a torn tail, or a segment torn at creation; the rest is damage or a lost index).
    pub problems: Vec<(String, u64, bool)>,
    pub stderr: String,
}

pub fn independent_read(dir: &Path, args: &[&str]) -> IndependentRead {
    let out = std::process::Command::new("python3")
        .arg(READER)
        .arg(dir)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("python3 is needed to run {READER}: {e}"));
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let problems = stderr
        .lines()
        .filter_map(|line| {
            let (file, rest) = line.split_once(": byte ")?;
            let offset = rest.split(':').next()?.parse().ok()?;
            Some((file.to_string(), offset, rest.contains("torn")))
        })
        .collect();
    IndependentRead {
        status: out.status.code().expect("the reader exited"),
        events: String::from_utf8(out.stdout).expect("the reader prints UTF-8"),
        problems,
        stderr,
    }
}

/// The reader's line for each event: `SECONDS.NANOS PATH DATA_HEX`.
pub fn lines(events: &[(EventId, String, Vec<u8>)]) -> String {
    events
        .iter()
        .map(|(id, p, data)| {
            let hex: String = data.iter().map(|b| format!("{b:02x}")).collect();
            format!("{id} {p} {hex}\n")
        })
        .collect()
}

/// Verify's findings as the reader's problems are kept: file relative to `dir`, offset, and
/// whether it is torn.
pub fn verify_findings(dir: &Path) -> Vec<(String, u64, bool)> {
    let report = ivy::storage::verify::verify(dir, ivy::storage::verify::Mode::Check, &|_| {})
        .expect("verify runs");
    report
        .findings
        .iter()
        .map(|f| {
            let rel = f.file.strip_prefix(dir).unwrap_or(&f.file);
            let is_torn = f.problem.contains("torn");
            (rel.to_string_lossy().into_owned(), f.offset, is_torn)
        })
        .collect()
}

/// Reads `dir` as a crash or a copy may leave it with the independent reader and with the
/// engine (read-only, so torn tails are left alone and not read): both must read the same
/// events, and each problem the reader reports must be one `verify` reports. Returns the
/// reader's problems.
pub fn independent_read_agrees(dir: &Path, context: &str) -> Vec<(String, u64, bool)> {
    let got = independent_read(dir, &[]);
    let store = Store::open_read_only(dir, ivy::storage::StoreOptions::default())
        .unwrap_or_else(|e| panic!("{context}: the engine cannot read it: {e}"));
    let expected = read(&store, "/**", &Query::all());
    assert!(
        got.events == lines(&expected),
        "{context}: the independent reader read otherwise ({})",
        got.stderr
    );
    let found = verify_findings(dir);
    for problem in &got.problems {
        assert!(
            found.contains(problem),
            "{context}: the independent reader found {problem:?}, verify {found:?}"
        );
    }
    assert_eq!(
        got.status,
        i32::from(!got.problems.is_empty()),
        "{context}: {}",
        got.stderr
    );
    got.problems
}
