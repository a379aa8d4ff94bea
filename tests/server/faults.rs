//! Faults under a real server (issue "Faults"): a full disk, a read-only data directory, running
//! out of file descriptors, a disk that stops syncing. Publishes fail with a clear reason (HTTP 507 or 503, `#KEY#!reason`),
//! reads keep working, nothing stored is damaged, and publishing resumes by itself once the cause
//! is gone.
//!
//! The disk and the read-only directory are real: a small tmpfs mounted by the test, and a
//! read-only bind mount over the data directory. Mounting needs root, which CI has; elsewhere
//! set `IVY_NO_MOUNT=1` to leave those two tests out (they say so on stderr).

use super::harness::{self, TestServer};
use ivy::config::ServerOptions;
use ivy::storage::StoreOptions;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// A mount made by the test, undone when dropped (lazily, so a failed test cannot leave a busy
/// mount behind).
struct Mount(PathBuf);

impl Mount {
    /// `mount ARGS... TARGET`, where ARGS end with the source.
    fn run(args: &[&str], target: &Path) -> Mount {
        let out = Command::new("mount")
            .args(args)
            .arg(target)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "mount {args:?} failed: {} (these tests need root, as CI has; IVY_NO_MOUNT=1 leaves them out)",
            String::from_utf8_lossy(&out.stderr)
        );
        Mount(target.to_path_buf())
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn mounts_allowed(test: &str) -> bool {
    if std::env::var_os("IVY_NO_MOUNT").is_some() {
        eprintln!("{test}: left out (IVY_NO_MOUNT is set)");
        return false;
    }
    true
}

/// POSTs `data` until a publish is refused, adding the ids of those stored meanwhile to
/// `stored` (at most `limit` in all); returns the refusal's status and reason.
async fn post_until_refused(
    server: &TestServer,
    path: &str,
    data: &[u8],
    stored: &mut Vec<String>,
    limit: usize,
) -> (u16, String) {
    loop {
        let (status, body) = harness::try_post(server, path, data).await;
        if status != 200 {
            return (status, body);
        }
        stored.push(harness::id_of(&body));
        assert!(stored.len() < limit, "{path}: no publish was refused");
    }
}

/// POSTs until one is stored again; returns its id.
async fn post_until_stored(server: &TestServer, path: &str, data: &[u8]) -> String {
    let start = Instant::now();
    loop {
        let (status, body) = harness::try_post(server, path, data).await;
        if status == 200 {
            return body.trim().to_owned();
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "publishing did not resume: {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn disk_full_is_507_reads_keep_working_and_publishing_resumes() {
    if !mounts_allowed("disk_full") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let _disk = Mount::run(&["-t", "tmpfs", "-o", "size=4m", "tmpfs"], tmp.path());
    let data_dir = tmp.path().join("data");
    let mut server =
        harness::start_in(&data_dir, ServerOptions::default(), StoreOptions::default()).await;
    let mut stored = Vec::new();
    for n in 0..20 {
        stored.push(harness::id_of(
            &harness::post(&server, "/full/a", format!("before {n}").as_bytes()).await,
        ));
    }

    // Fill the disk. The page the live segment ends in is allocated already, so the first
    // small publishes may still fit; keep publishing until one is refused.
    let filler = tmp.path().join("filler");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).unwrap();
        while f.write_all(&[7u8; 64 * 1024]).is_ok() {}
    }
    let event = vec![b'x'; 1000];
    let (status, reason) = post_until_refused(&server, "/full/a", &event, &mut stored, 2000).await;
    assert_eq!(status, 507, "{reason}");
    assert!(reason.contains("No space left"), "{reason}");
    let mut ws = harness::ws(&server).await;
    let refusal = ws.request("k1", ":/full/a:while full").await;
    assert!(
        refusal.starts_with("!not written") && refusal.contains("No space left"),
        "{refusal}"
    );
    assert_eq!(
        harness::ids(&server, "/full/a").await,
        stored,
        "reads during the fault"
    );
    assert!(harness::metric(&server, "ivy_write_failures_total").await > 0);

    std::fs::remove_file(&filler).unwrap();
    stored.push(harness::id_of(
        &post_until_stored(&server, "/full/a", b"after").await,
    ));
    let ack = ws.request("k2", ":/full/a:after, over WebSocket").await;
    assert!(!ack.starts_with('!'), "{ack}");
    stored.push(harness::id_of(&ack));
    assert_eq!(
        harness::ids(&server, "/full/a").await,
        stored,
        "nothing failed was stored"
    );
    server.shutdown().await;
    harness::verify_clean(&data_dir);
}

#[tokio::test]
async fn read_only_data_directory_is_503_then_publishing_resumes() {
    if !mounts_allowed("read_only") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let data_dir = tmp.path().join("data");
    // Small segments, so that publishing soon needs a new file, which a read-only directory
    // refuses (files already open stay writable, as on a real remount they would keep the
    // filesystem from going read-only at all).
    let mut server = harness::start_in(
        &data_dir,
        ServerOptions::default(),
        StoreOptions {
            segment_bytes_max: 4096,
            ..StoreOptions::default()
        },
    )
    .await;
    let mut stored = vec![harness::id_of(
        &harness::post(&server, "/ro/a", b"before").await,
    )];
    let dir_arg = data_dir.to_str().unwrap();
    let read_only = Mount::run(&["--bind", dir_arg], &data_dir);
    let remounted = Command::new("mount")
        .args(["-o", "remount,bind,ro", dir_arg])
        .status()
        .unwrap();
    assert!(remounted.success());

    let (status, reason) = harness::try_post(&server, "/other", b"new channel").await;
    assert_eq!(status, 503, "{reason}");
    assert!(reason.contains("Read-only file system"), "{reason}");
    let event = vec![b'y'; 900];
    let (status, reason) = post_until_refused(&server, "/ro/a", &event, &mut stored, 20).await;
    assert_eq!(status, 503, "{reason}");
    assert!(reason.contains("Read-only file system"), "{reason}");
    assert_eq!(
        harness::ids(&server, "/ro/a").await,
        stored,
        "reads during the fault"
    );

    drop(read_only);
    stored.push(harness::id_of(
        &post_until_stored(&server, "/ro/a", &event).await,
    ));
    harness::post(&server, "/other", b"new channel").await;
    assert_eq!(harness::ids(&server, "/ro/a").await, stored);
    server.shutdown().await;
    harness::verify_clean(&data_dir);
}

/// A child `ivy serve` with 64 descriptors shares them out (connections at most 32, streams at
/// most 16, the rest for the store's own files): idle connections past their share are refused
/// and cannot stop a write that needs a new file, and a client inventing top-level channels is
/// refused the 17th stream with a reason while every existing channel goes on being written.
#[tokio::test]
async fn descriptors_are_shared_out_so_no_client_stops_the_writes() {
    let tmp = tempfile::tempdir().unwrap();
    let data_dir = tmp.path().join("data");
    let (mut child, server) = harness::spawn_serve(&data_dir, &["--log", "error"], "ulimit -n 64");
    let addr = server.addr;
    let mut ws = harness::ws(&server).await;
    let first = ws.request("a", ":/fd/a:before").await;
    assert!(!first.starts_with('!'), "{first}");

    // More idle connections than the limit has descriptors: past 32 they are refused.
    let mut idle = Vec::new();
    for _ in 0..80 {
        idle.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // A new stream needs a new segment file, which needs a descriptor: there is one.
    let stored = ws.request("b", ":/fd-new/x:needs a file").await;
    assert!(!stored.starts_with('!'), "{stored}");

    // /fd and /fd-new are two streams; 14 more may start, then every new one is refused.
    let mut refused = 0;
    for i in 0..20 {
        let reply = ws.request("c", &format!(":/top{i}:x")).await;
        if i < 14 {
            assert!(!reply.starts_with('!'), "stream {i}: {reply}");
        } else {
            assert!(
                reply.starts_with("!not stored: the store holds 16 streams"),
                "stream {i}: {reply}"
            );
            refused += 1;
        }
        // Existing channels are not held up by the refusals: stored at once, every time.
        let existing = ws.request("d", ":/fd/a:existing").await;
        assert!(!existing.starts_with('!'), "after stream {i}: {existing}");
    }
    assert_eq!(refused, 6);
    // HTTP too needs a connection of its own, once the idle ones are gone.
    drop(idle);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(harness::get(&server, "/healthz").await.status, 200);
    assert_eq!(
        harness::ids(&server, "/fd-new/x").await,
        vec![harness::id_of(&stored)]
    );
    assert_eq!(harness::ids(&server, "/fd/a").await.len(), 21);

    child.terminate();
    harness::verify_clean(&data_dir);
}

/// A disk whose syncs the test controls: the OS's files, except that `fdatasync` waits while the
/// test holds it, and fails with EIO while the test breaks it.
#[derive(Default)]
struct SyncControl {
    held: parking_lot::Mutex<bool>,
    released: parking_lot::Condvar,
    broken: std::sync::atomic::AtomicBool,
}

impl SyncControl {
    fn hold(&self, held: bool) {
        *self.held.lock() = held;
        self.released.notify_all();
    }

    fn break_syncs(&self, broken: bool) {
        self.broken
            .store(broken, std::sync::atomic::Ordering::SeqCst);
    }
}

impl ivy::storage::io::FileIo for SyncControl {
    fn create(&self, path: &Path) -> std::io::Result<std::fs::File> {
        ivy::storage::io::OsIo.create(path)
    }
    fn write_at(
        &self,
        path: &Path,
        file: &std::fs::File,
        offset: u64,
        bytes: &[u8],
    ) -> std::io::Result<()> {
        ivy::storage::io::OsIo.write_at(path, file, offset, bytes)
    }
    fn sync_data(&self, path: &Path, file: &std::fs::File) -> std::io::Result<()> {
        let mut held = self.held.lock();
        while *held {
            self.released.wait(&mut held);
        }
        drop(held);
        if self.broken.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(std::io::Error::from_raw_os_error(5));
        }
        ivy::storage::io::OsIo.sync_data(path, file)
    }
    fn sync_dir(&self, dir: &Path) -> std::io::Result<()> {
        ivy::storage::io::OsIo.sync_dir(dir)
    }
    fn rename(&self, from: &Path, to: &Path) -> std::io::Result<()> {
        ivy::storage::io::OsIo.rename(from, to)
    }
    fn truncate(&self, path: &Path, file: &std::fs::File, len: u64) -> std::io::Result<()> {
        ivy::storage::io::OsIo.truncate(path, file, len)
    }
    fn remove(&self, path: &Path) -> std::io::Result<()> {
        ivy::storage::io::OsIo.remove(path)
    }
}

/// While the disk does not finish a sync, publishers past the writer's budget wait, and they
/// wait without a runtime thread: with more of them than the runtime has threads, every other
/// client is still answered. Once the disk goes on, every publish is acknowledged and stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_disk_holds_up_its_publishers_not_the_runtime() {
    let disk = std::sync::Arc::new(SyncControl::default());
    let server = harness::start_with(
        ServerOptions::default(),
        StoreOptions {
            pending_bytes_max: 64 * 1024,
            preallocate: false,
            io: disk.clone(),
            ..StoreOptions::default()
        },
    )
    .await;
    disk.hold(true);
    const PUBLISHERS: usize = 4;
    const EACH: usize = 100;
    let data = "d".repeat(4096);
    let mut publishers = Vec::new();
    for p in 0..PUBLISHERS {
        let mut ws = harness::ws(&server).await;
        let data = data.clone();
        publishers.push(tokio::spawn(async move {
            for i in 0..EACH {
                ws.send(&format!("#{i}#:/stall/p{p}:{data}")).await;
            }
            let mut acks = Vec::new();
            while acks.len() < EACH {
                let m = ws.recv().await;
                if m.starts_with('#') {
                    acks.push(m);
                }
            }
            acks
        }));
    }
    // 1.6 MB of publishes against a 64 KiB budget and a disk that does not sync: they wait.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let answered = tokio::time::timeout(Duration::from_secs(5), async {
        let health = harness::get(&server, "/healthz").await.status;
        let mut other = harness::ws(&server).await;
        let time = other.request("t", "@").await;
        let read = harness::get(&server, "/events/elsewhere?n=1").await.status;
        (health, time, read)
    })
    .await
    .expect("other clients are answered while the disk stalls");
    assert_eq!(answered.0, 200);
    assert!(answered.1.starts_with('@'), "{}", answered.1);
    assert_eq!(answered.2, 200);
    assert!(publishers.iter().all(|p| !p.is_finished()));

    disk.hold(false);
    for publisher in publishers {
        let acks = publisher.await.unwrap();
        for (i, ack) in acks.iter().enumerate() {
            assert!(ack.starts_with(&format!("#{i}#@")), "{ack}");
        }
    }
    for p in 0..PUBLISHERS {
        assert_eq!(
            harness::ids(&server, &format!("/stall/p{p}")).await.len(),
            EACH
        );
    }
}

/// `/healthz` tells a supervisor what the store can do: 200 while it takes appends, and while it
/// refuses them only until its retry (a failed write it undid); 503 with the reason once it takes
/// no writes until restart (here: a failed sync under `interval`, whose events were already
/// published), so that the process is restarted and recovery decides from the disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_says_when_only_a_restart_brings_writes_back() {
    let disk = std::sync::Arc::new(SyncControl::default());
    let store_opts = |durability| StoreOptions {
        durability,
        write_retry: Duration::from_secs(60),
        preallocate: false,
        io: disk.clone(),
        ..StoreOptions::default()
    };
    // Under `always` a failed sync is undone: appends pause, the process is healthy.
    let server = harness::start_with(
        ServerOptions::default(),
        store_opts(ivy::storage::Durability::Always),
    )
    .await;
    let health = harness::get(&server, "/healthz").await;
    assert_eq!((health.status, health.text()), (200, "ok\n".to_string()));
    disk.break_syncs(true);
    let (status, reason) = harness::try_post(&server, "/h", b"lost").await;
    assert_eq!(status, 503, "{reason}");
    let health = harness::get(&server, "/healthz").await;
    assert_eq!(health.status, 200, "{}", health.text());
    assert!(
        health
            .text()
            .starts_with("ok; appends are refused for now: not written:")
            && health.text().contains("resume by themselves"),
        "{}",
        health.text()
    );
    disk.break_syncs(false);
    drop(server);

    // Under `interval` it cannot be undone: 503, with the reason, until restart.
    let server = harness::start_with(
        ServerOptions::default(),
        store_opts(ivy::storage::Durability::Interval(Duration::from_millis(
            20,
        ))),
    )
    .await;
    harness::post(&server, "/h", b"kept").await;
    assert_eq!(harness::get(&server, "/healthz").await.status, 200);
    disk.break_syncs(true);
    // Refused when the failed sync was the one of `kept`, else published and never synced.
    let (status, reason) = harness::try_post(&server, "/h", b"never synced").await;
    assert!(status == 200 || status == 503, "{status} {reason}");
    let until = Instant::now() + Duration::from_secs(10);
    let health = loop {
        let health = harness::get(&server, "/healthz").await;
        if health.status != 200 {
            break health;
        }
        assert!(Instant::now() < until, "still healthy: {}", health.text());
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(health.status, 503, "{}", health.text());
    assert!(
        health.text().starts_with("not written:") && health.text().contains("until restart"),
        "{}",
        health.text()
    );
    // Reads go on.
    assert_eq!(harness::get(&server, "/events/h").await.status, 200);
}
