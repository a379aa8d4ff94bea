//! The load tool against a real server, briefly: its figures are only worth something if its
//! checks are right. `fanout` runs against a server that closes lagging subscribers early
//! (`--lag-events-max 200`), so the slow subscribers are closed with 1013 again and again and must
//! resume from their last id with nothing lost, duplicated or reordered: this checks the tool's
//! resume and count, and the server's `+/path@TS` resume under load. `publish` and `history` must
//! report a rate and the CPU each side used, and exit 0.

mod common;

use std::net::SocketAddr;
use std::process::Command;

/// Runs `ivy-bench --addr ADDR --seconds 1 ARGS`; its report, after checking it exited 0.
fn bench(addr: SocketAddr, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_ivy-bench"))
        .args(["--addr", &addr.to_string(), "--seconds", "1"])
        .args(args)
        .output()
        .expect("run ivy-bench");
    let report = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "ivy-bench {args:?} failed: {report}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    report
}

/// The figure (digits and a decimal point) after `label` in `report`.
fn figure_after(report: &str, label: &str) -> f64 {
    let at = report
        .find(label)
        .unwrap_or_else(|| panic!("no {label:?} in {report}"));
    report[at + label.len()..]
        .trim_start()
        .split(|c: char| !c.is_ascii_digit() && c != '.')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no number after {label:?} in {report}"))
}

#[test]
fn fan_out_with_slow_subscribers_that_must_resume_loses_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_server, addr) = common::serve_child(dir.path(), &["--lag-events-max", "200"]);
    // 4 KB events from a window of 64: a few times more events per second than a slow
    // subscriber reads (about 8,000), so it falls behind past what the socket buffers hold, while
    // the run, which ends when the slow ones have everything, stays a few seconds long.
    let report = bench(
        addr,
        &[
            "fanout",
            "--subscribers",
            "10",
            "--slow-fraction",
            "0.5",
            "--size",
            "4000",
            "--window",
            "64",
        ],
    );
    assert!(figure_after(&report, "(5 slow):") > 0.0, "{report}");
    assert!(
        report.contains("lost 0, duplicated 0, reordered 0"),
        "{report}"
    );
    assert!(
        report.contains("slow subscribers complete: 5/5"),
        "{report}"
    );
    assert!(
        figure_after(&report, "resumed after a lagging close:") > 0.0,
        "the slow subscribers were never closed as lagging, so resuming was not tried: {report}"
    );
}

#[test]
fn publish_and_history_report_a_rate_and_the_cpu_each_side_used() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (server, addr) = common::serve_child(dir.path(), &["--lag-events-max", "200"]);
    let pid = server.0.id().to_string();
    let report = bench(
        addr,
        &[
            "publish",
            "--connections",
            "2",
            "--window",
            "16",
            "--server-pid",
            &pid,
        ],
    );
    assert!(report.contains("acknowledged events/s"), "{report}");
    assert!(report.contains("ack latency: p50"), "{report}");
    // A second of publishing keeps the server busy for tens of 10 ms ticks.
    assert!(figure_after(&report, "cpu: server") > 0.0, "{report}");
    assert!(report.contains("us/event; ivy-bench "), "{report}");
    assert!(report.contains("% idle"), "{report}");
    let report = bench(addr, &["history", "--connections", "2", "--events", "500"]);
    assert!(report.contains("requests/s"), "{report}");
    assert!(report.contains("request latency: p50"), "{report}");
    // Without `--server-pid` the server's share is unknown and left out.
    assert!(report.contains("cpu: ivy-bench "), "{report}");
    assert!(!report.contains("server"), "{report}");
}

#[test]
fn the_fan_out_floor_delivers_everything_and_no_subscriber_stops_short() {
    let out = Command::new(env!("CARGO_BIN_EXE_ivy-bench"))
        .args([
            "--seconds",
            "1",
            "floor",
            "--subscribers",
            "20",
            "--rate",
            "200",
        ])
        .args(["--receiver-threads", "2"])
        .output()
        .expect("run ivy-bench");
    let report = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{report}");
    assert!(figure_after(&report, "(0 slow):") >= 100.0, "{report}");
    assert!(
        report.contains("lost 0, duplicated 0, reordered 0"),
        "{report}"
    );
    // Every subscriber had every event, and none met the end of its connection first (the
    // floor once closed its sockets while its subscribers still waited to hear it was done).
    assert!(!report.contains("stopped before"), "{report}");
    assert!(
        report.contains("publish-to-delivery (fast subscribers): p50"),
        "{report}"
    );
}

/// Runs a floor mode, which starts its own server: its report, after checking that it exited 0,
/// reported that server's CPU beside its own, and left no server (`marker` in its command line)
/// and no file in the temporary directory behind.
fn floor_run(args: &[&str], marker: &str) -> String {
    let tmp = tempfile::tempdir().expect("tempdir");
    // No stderr pipe: a server left behind would hold it open, and the test would hang instead
    // of failing below.
    let out = Command::new(env!("CARGO_BIN_EXE_ivy-bench"))
        .args(["--seconds", "1"])
        .args(args)
        .env("TMPDIR", tmp.path())
        .stderr(std::process::Stdio::null())
        .output()
        .expect("run ivy-bench");
    let report = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{report}");
    assert!(figure_after(&report, "cpu: server") > 0.0, "{report}");
    let left: Vec<_> = std::fs::read_dir("/proc")
        .expect("/proc")
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .filter(|cmdline| String::from_utf8_lossy(cmdline).contains(marker))
        .collect();
    assert!(left.is_empty(), "a {marker} is still running");
    let files: Vec<_> = std::fs::read_dir(tmp.path())
        .expect("tmp")
        .flatten()
        .collect();
    assert!(files.is_empty(), "left behind: {files:?}");
    report
}

#[test]
fn history_floor_reports_its_server_and_stops_it() {
    let report = floor_run(
        &["history-floor", "--connections", "2"],
        "fixed-answer-server",
    );
    assert!(
        figure_after(&report, "keep-alive connections:") > 0.0,
        "{report}"
    );
    assert!(report.contains("request latency: p50"), "{report}");
}

/// `publish-floor`'s server acknowledges every message, keyed by the client's own key: a
/// missing or wrong ack would leave the client's window shut or fail its count.
#[test]
fn publish_floor_reports_its_server_and_stops_it() {
    let report = floor_run(
        &["publish-floor", "--connections", "2", "--window", "16"],
        "commit-floor-server",
    );
    assert!(figure_after(&report, "window 16, 100 B:") > 0.0, "{report}");
    assert!(report.contains("ack latency: p50"), "{report}");
    // With its zero-filler too, whose file goes with the rest.
    let with_zeroes = ["--zero-fill-pace", "2"];
    let args = ["publish-floor", "--connections", "2", "--window", "16"];
    let report = floor_run(&[&args[..], &with_zeroes].concat(), "commit-floor-server");
    assert!(figure_after(&report, "window 16, 100 B:") > 0.0, "{report}");
}
