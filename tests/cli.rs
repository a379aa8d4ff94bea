//! The `ivy` binary run as a user would: import, dump, stats, verify (clean, damaged, repaired).

mod common;

use common::segments;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

fn ivy(args: &[&str], stdin: &[u8]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ivy"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ivy");
    // A command that does not read its input may exit first: a broken pipe is fine then.
    if let Err(e) = child.stdin.take().expect("stdin").write_all(stdin) {
        assert_eq!(e.kind(), std::io::ErrorKind::BrokenPipe, "write stdin: {e}");
    }
    child.wait_with_output().expect("wait")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn dir_arg(dir: &Path) -> &str {
    dir.to_str().expect("utf-8 temp path")
}

const LINES: &str = "@1700000000.000000001:/rooms/a/chat:hello\n\
@1700000000.000000002:/rooms/b/chat:line%0Abreak and 100%25\n\
@1700000000.000000003:/:at the root\n\
@1700000000.000000004:/logs/x:ends with a dot%2E\n\
@1700000000.000000005:/rooms/a:bytes %FF%FE\n";

#[test]
fn import_then_dump_is_byte_identical() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir_arg(dir.path());
    let out = ivy(&["import", d], LINES.as_bytes());
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = ivy(&["dump", d], b"");
    assert!(out.status.success());
    assert_eq!(text(&out.stdout), LINES);

    let second = tempfile::tempdir().unwrap();
    let out = ivy(&["import", dir_arg(second.path())], LINES.as_bytes());
    assert!(out.status.success());
    assert_eq!(
        ivy(&["dump", dir_arg(second.path())], b"").stdout,
        LINES.as_bytes()
    );

    let glob = ivy(&["dump", d, "/rooms/*/chat"], b"");
    assert_eq!(text(&glob.stdout).lines().count(), 2);
    let ranged = ivy(
        &[
            "dump",
            d,
            "/**",
            "--since",
            "1700000000.000000002",
            "--until",
            "@1700000000.000000003",
        ],
        b"",
    );
    assert_eq!(text(&ranged.stdout).lines().count(), 2);
    let bad = ivy(&["dump", d, "/a/**/b"], b"");
    assert_eq!(bad.status.code(), Some(2));
    assert!(text(&bad.stderr).contains("invalid glob path"));
}

#[test]
fn import_without_ids_and_refusals() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir_arg(dir.path());
    assert!(ivy(&["import", d], b"/a:one\nb/c:two\r\n").status.success());
    let dump = text(&ivy(&["dump", d], b"").stdout);
    assert!(
        dump.contains(":/a:one\n") && dump.contains(":/b/c:two\n"),
        "{dump}"
    );

    // An id not above the store's last: named by line; nothing after it is written.
    let out = ivy(
        &["import", d],
        b"/ok:1\n@0000000001.000000000:/x:old\n/never:2\n",
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("line 2"),
        "{}",
        text(&out.stderr)
    );
    let dump = text(&ivy(&["dump", d], b"").stdout);
    assert!(dump.contains("/ok:1") && !dump.contains("/never"));

    for (input, reason) in [
        (&b"/A:upper\n"[..], "line 1"),
        (b"/a/../b:x\n", "line 1"),
        (b"no colon\n", "line 1"),
        (b"/a:%zz\n", "line 1"),
    ] {
        let out = ivy(&["import", d], input);
        assert_eq!(out.status.code(), Some(2));
        assert!(text(&out.stderr).contains(reason), "{}", text(&out.stderr));
    }
}

#[test]
fn stats_and_verify_on_a_clean_store() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir_arg(dir.path());
    assert!(ivy(&["import", d], LINES.as_bytes()).status.success());
    let stats = text(&ivy(&["stats", d], b"").stdout);
    assert!(
        stats.contains("/rooms") && stats.contains("total (3 streams)"),
        "{stats}"
    );
    let json: serde_json::Value =
        serde_json::from_slice(&ivy(&["stats", d, "--json"], b"").stdout).unwrap();
    assert_eq!(json.as_array().unwrap().len(), 3);
    let out = ivy(&["verify", d], b"");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stdout));
    assert!(text(&out.stdout).contains("clean"));
    let missing = ivy(&["verify", "/definitely/not/here"], b"");
    assert_eq!(missing.status.code(), Some(2));
}

/// Makes a store with several sealed segments through the library (small segments).
fn sealed_store(dir: &Path) {
    use ivy::storage::{Durability, Store, StoreOptions};
    let opts = StoreOptions {
        durability: Durability::Never,
        segment_bytes_max: 400,
        ..StoreOptions::default()
    };
    let store = Store::open(dir, opts).unwrap();
    for i in 0..40u32 {
        store
            .append(&common::path("/s/x"), format!("event {i}").as_bytes())
            .unwrap();
    }
    store.close().unwrap();
}

#[test]
fn verify_names_file_and_offset_of_a_flipped_byte() {
    let dir = tempfile::tempdir().unwrap();
    sealed_store(dir.path());
    let seg = segments(dir.path()).remove(0);
    let mut bytes = std::fs::read(&seg).unwrap();
    bytes[32 + 29] ^= 0x01;
    std::fs::write(&seg, &bytes).unwrap();
    let out = ivy(&["verify", dir_arg(dir.path())], b"");
    assert_eq!(out.status.code(), Some(1));
    let report = text(&out.stdout);
    assert!(
        report.contains(&format!(
            "{}: byte 32: record checksum mismatch",
            seg.display()
        )),
        "{report}"
    );
    let json: serde_json::Value =
        serde_json::from_slice(&ivy(&["verify", dir_arg(dir.path()), "--json"], b"").stdout)
            .unwrap();
    assert_eq!(json["findings"][0]["offset"], 32);
    // --repair does not touch a sealed segment's data: still a problem, nothing cut.
    let out = ivy(&["verify", dir_arg(dir.path()), "--repair"], b"");
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(std::fs::read(&seg).unwrap(), bytes);
}

#[test]
fn verify_repair_cuts_a_torn_tail_and_rebuilds_an_index() {
    let dir = tempfile::tempdir().unwrap();
    sealed_store(dir.path());
    let segs = segments(dir.path());
    let last = segs.last().unwrap();
    let mut f = std::fs::OpenOptions::new().append(true).open(last).unwrap();
    f.write_all(&[0x55; 17]).unwrap();
    drop(f);
    std::fs::remove_file(segs[0].with_extension("idx")).unwrap();
    let d = dir_arg(dir.path());
    let out = ivy(&["verify", d], b"");
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stdout).contains("torn tail"),
        "{}",
        text(&out.stdout)
    );
    let out = ivy(&["verify", d, "--repair"], b"");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stdout));
    let out = ivy(&["verify", d], b"");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stdout));
    assert_eq!(text(&ivy(&["dump", d], b"").stdout).lines().count(), 40);
}

#[test]
fn offline_tools_refuse_a_directory_held_by_a_writer() {
    use ivy::storage::{Store, StoreOptions};
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
    store.append(&common::path("/a"), b"x").unwrap();
    let d = dir_arg(dir.path());
    for args in [
        vec!["verify", d],
        vec!["verify", d, "--repair"],
        vec!["dump", d],
        vec!["stats", d],
        vec!["import", d],
    ] {
        let out = ivy(&args, b"/b:y\n");
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(
            text(&out.stderr).contains("in use by another process"),
            "{}",
            text(&out.stderr)
        );
    }
    drop(store);
}

/// A data directory that cannot be made is refused with exit 2 and one line that gives the
/// operating system's reason once (it was printed twice: by the storage error and again as its
/// cause).
#[test]
fn a_data_directory_that_is_a_file_is_refused_with_its_reason_once() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("not-a-directory");
    std::fs::write(&file, b"x").unwrap();
    let out = ivy(
        &["serve", "--listen", "127.0.0.1:0", "--data", dir_arg(&file)],
        b"",
    );
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    let last = err.lines().last().unwrap_or_default();
    assert!(last.starts_with("ivy: cannot open data directory"), "{err}");
    assert_eq!(last.matches("Not a directory").count(), 1, "{err}");
}

/// The stream depth is fixed when a data directory is created: its streams on disk are cut at
/// that depth. `--stream-depth` may repeat it or be left out; another depth is refused with a
/// reason and leaves the directory as it was (before, it was ignored without a word).
#[test]
fn serve_keeps_a_directory_s_stream_depth_and_refuses_another() {
    let dir = tempfile::tempdir().unwrap();
    let depth_file = || std::fs::read_to_string(dir.path().join("IVY")).unwrap();
    let (server, _) = common::serve_child(dir.path(), &["--stream-depth", "2"]);
    drop(server);
    assert!(depth_file().contains("stream_depth 2"));
    // Left out, or repeated: the server starts on the directory's depth.
    for args in [&[][..], &["--stream-depth", "2"][..]] {
        let (server, _) = common::serve_child(dir.path(), args);
        drop(server);
    }
    // Spawned, not waited for: a server that starts anyway must fail the test, not hang it.
    let mut child = Command::new(env!("CARGO_BIN_EXE_ivy"))
        .args(["serve", "--listen", "127.0.0.1:0", "--stream-depth", "1"])
        .arg("--data")
        .arg(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ivy serve");
    let mut first = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut first,
    )
    .unwrap();
    if !first.is_empty() {
        let _ = child.kill();
        let _ = child.wait();
        panic!("it started with another depth: {first}");
    }
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(err.contains("created with stream depth 2"), "{err}");
    assert!(depth_file().contains("stream_depth 2"));
}
