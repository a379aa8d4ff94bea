//! `ivy verify`: a read-only full check of a data directory that reports every finding with
//! file and byte offset instead of stopping at the first, and the few repairs that can never
//! lose good data (`--repair`).
//!
//! Per segment: header and name; every record's length, CRC, kind and path; ids strictly
//! increasing (also across segments); each channel chain link pointing at that channel's
//! previous record; for sealed segments the seal footer against the records (counts, first and
//! last ids, every channel's first/last offset and count) and the index file against an index
//! rebuilt from the records. Every segment but the last of a stream must be sealed.
//!
//! Segments are checked in parallel, one map each; repair drops a file's map before it
//! truncates the file (mmap contract, clause 2).

use super::error::{Corruption, Error};
use super::index;
use super::layout;
use super::mmap::Map;
use super::record::{self, KIND_SEAL};
use super::recovery;
use crate::event_id::EventId;
use std::collections::HashMap;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

/// One problem found.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Finding {
    pub file: PathBuf,
    pub offset: u64,
    pub problem: String,
    /// What `--repair` did about it, if anything.
    pub repaired: Option<String>,
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Report {
    pub streams: usize,
    pub segments: usize,
    pub events: u64,
    pub bytes: u64,
    pub findings: Vec<Finding>,
}

impl Report {
    pub fn is_clean(&self) -> bool {
        self.findings.iter().all(|f| f.repaired.is_some())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Check,
    Repair,
}

/// What one segment's check found.
#[derive(Debug, Default)]
struct SegmentCheck {
    findings: Vec<Finding>,
    events: u64,
    bytes: u64,
    first_id: Option<u64>,
    last_id: Option<u64>,
    is_sealed: bool,
    /// (valid end, file length) when the segment ends in a torn tail.
    torn_tail: Option<(u64, u64)>,
    /// The index file is missing or wrong (sealed segments only).
    needs_index: bool,
}

struct Job {
    path: PathBuf,
    first_id: EventId,
    is_last: bool,
}

/// Checks (and with `Mode::Repair` repairs) the data directory at `dir`. `progress` is called
/// with the bytes checked so far. The caller holds the directory lock (shared to check,
/// exclusive to repair).
pub fn verify(dir: &Path, mode: Mode, progress: &(dyn Fn(u64) + Sync)) -> Result<Report, Error> {
    let streams_dir = layout::streams_dir(dir);
    let mut report = Report::default();
    let mut stream_jobs: Vec<Vec<Job>> = Vec::new();
    let entries =
        fs::read_dir(&streams_dir).map_err(|e| Error::io(&streams_dir, "read directory", e))?;
    let mut names: Vec<_> = entries.filter_map(|e| e.ok()).collect();
    names.sort_by_key(|e| e.file_name());
    for entry in names {
        let name = entry.file_name();
        if name
            .to_str()
            .and_then(layout::parse_stream_dir_name)
            .is_none()
        {
            report.findings.push(Finding {
                file: entry.path(),
                offset: 0,
                problem: "not a stream directory name".into(),
                repaired: None,
            });
            continue;
        }
        let files = recovery::list_segments(&entry.path())?;
        let count = files.len();
        stream_jobs.push(
            files
                .into_iter()
                .enumerate()
                .map(|(i, (first_id, path))| Job {
                    path,
                    first_id,
                    is_last: i + 1 == count,
                })
                .collect(),
        );
    }
    report.streams = stream_jobs.len();
    let jobs: Vec<&Job> = stream_jobs.iter().flatten().collect();
    report.segments = jobs.len();
    let mut checks = check_all(&jobs, progress);
    let mut job_at = 0;
    for stream in &stream_jobs {
        let mut previous_last: Option<(u64, &Path)> = None;
        for job in stream {
            let mut check = checks[job_at].take().unwrap_or_default();
            job_at += 1;
            if let (Some((prev, prev_path)), Some(first)) = (previous_last, check.first_id) {
                if first <= prev {
                    check.findings.push(Finding {
                        file: job.path.clone(),
                        offset: record::SEGMENT_HEADER_LEN as u64,
                        problem: format!(
                            "first id {} is not above the last id {} of {}",
                            EventId(first),
                            EventId(prev),
                            prev_path.display()
                        ),
                        repaired: None,
                    });
                }
            }
            if !job.is_last && !check.is_sealed {
                check.findings.push(Finding {
                    file: job.path.clone(),
                    offset: 0,
                    problem: Corruption::NotSealed.to_string(),
                    repaired: None,
                });
            }
            if mode == Mode::Repair {
                repair(job, &mut check)?;
            }
            if let Some(last) = check.last_id {
                previous_last = Some((last, &job.path));
            }
            report.events += check.events;
            report.bytes += check.bytes;
            report.findings.extend(check.findings);
        }
    }
    Ok(report)
}

/// Checks every job on all cores; results in job order.
fn check_all(jobs: &[&Job], progress: &(dyn Fn(u64) + Sync)) -> Vec<Option<SegmentCheck>> {
    let next = AtomicUsize::new(0);
    let done_bytes = std::sync::atomic::AtomicU64::new(0);
    let results: Vec<parking_lot::Mutex<Option<SegmentCheck>>> =
        jobs.iter().map(|_| parking_lot::Mutex::new(None)).collect();
    let workers = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(jobs.len().max(1));
    std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(job) = jobs.get(i) else { break };
                let check = check_segment(job);
                progress(done_bytes.fetch_add(check.bytes, Ordering::Relaxed) + check.bytes);
                *results[i].lock() = Some(check);
            });
        }
    });
    results.into_iter().map(|m| m.into_inner()).collect()
}

fn finding(path: &Path, offset: u64, problem: impl ToString) -> Finding {
    Finding {
        file: path.to_path_buf(),
        offset,
        problem: problem.to_string(),
        repaired: None,
    }
}

fn check_segment(job: &Job) -> SegmentCheck {
    let mut check = SegmentCheck::default();
    let path = &job.path;
    let map = match File::open(path).and_then(|f| Map::whole(&f)) {
        Ok(m) => m,
        Err(e) => {
            check
                .findings
                .push(finding(path, 0, format!("cannot read: {e}")));
            return check;
        }
    };
    let bytes = map.bytes(map.len());
    check.bytes = bytes.len() as u64;
    match record::decode_segment_header(bytes) {
        Ok(id) if id == job.first_id.0 => {}
        Ok(_) => check
            .findings
            .push(finding(path, 16, Corruption::NameMismatch)),
        Err((offset, kind)) => {
            if !(job.is_last && recovery::is_torn_at_creation(bytes)) {
                check.findings.push(finding(path, offset, kind));
            } else {
                check.torn_tail = Some((0, bytes.len() as u64));
                check.findings.push(finding(
                    path,
                    0,
                    "segment torn at creation (no complete header)",
                ));
            }
            return check;
        }
    }
    // A stream's last segment is sealed only as recovery takes it (`is_written_seal`): a copy
    // taken while the segment filled and sealed is a live segment with a torn tail, which
    // recovery cuts (before, verify took it for a damaged sealed segment: not torn, and not
    // repaired). Every other segment is sealed by the write order, so its trailer alone says so.
    let seal_at = record::decode_trailer(bytes)
        .filter(|at| !job.is_last || recovery::is_written_seal(bytes, *at));
    let records_end = seal_at.filter(|s| *s < bytes.len()).unwrap_or(bytes.len());
    let chains = scan_records(job, bytes, records_end, &mut check);
    if let Some(at) = seal_at {
        check_seal(job, bytes, at, &chains, &mut check);
    }
    check
}

/// Per-channel (first offset, last offset, count), as the records show them.
type Chains<'a> = HashMap<&'a str, (u64, u64, u64)>;

fn scan_records<'a>(
    job: &Job,
    bytes: &'a [u8],
    end: usize,
    check: &mut SegmentCheck,
) -> Chains<'a> {
    let path = &job.path;
    let mut chains: Chains<'a> = HashMap::new();
    let mut at = record::SEGMENT_HEADER_LEN;
    let mut previous: Option<u64> = None;
    while at < end {
        let rec = match record::decode(&bytes[..end], at) {
            Ok(rec) if rec.kind == KIND_SEAL => {
                if job.is_last {
                    // A seal whose trailer never made it: a torn tail.
                    check.torn_tail = Some((at as u64, bytes.len() as u64));
                    check.findings.push(finding(
                        path,
                        at as u64,
                        "torn tail (seal without trailer)",
                    ));
                } else {
                    check.findings.push(finding(
                        path,
                        at as u64,
                        "seal record without a valid trailer",
                    ));
                }
                return chains;
            }
            Ok(rec) => rec,
            Err(_) if job.is_last && recovery::is_zeroes(&bytes[at..]) => {
                // The rest of a segment made from a zero-filled spare: free space.
                return chains;
            }
            Err(kind) => {
                let follows = recovery::next_valid_record(&bytes[..end], at);
                if job.is_last && follows.is_none() && end == bytes.len() {
                    check.torn_tail = Some((at as u64, bytes.len() as u64));
                    check.findings.push(finding(
                        path,
                        at as u64,
                        format!("torn tail ({kind}); {} bytes", bytes.len() - at),
                    ));
                    return chains;
                }
                check.findings.push(finding(path, at as u64, kind));
                match follows {
                    Some(next) => {
                        at = next;
                        continue;
                    }
                    None => return chains,
                }
            }
        };
        let offset = at as u64;
        if let Some(prev) = previous {
            if rec.id <= prev {
                check.findings.push(finding(
                    path,
                    offset,
                    Corruption::IdNotIncreasing {
                        id: rec.id,
                        previous: prev,
                    },
                ));
            }
        } else if rec.id != job.first_id.0 {
            check.findings.push(finding(
                path,
                offset,
                "first record's id differs from the segment's name",
            ));
        }
        previous = Some(rec.id);
        check.first_id.get_or_insert(rec.id);
        check.last_id = Some(rec.id);
        check.events += 1;
        let expected_prev = chains.get(rec.path).map_or(0, |c| c.1);
        if rec.prev != expected_prev {
            check.findings.push(finding(
                path,
                offset + 20,
                Corruption::BadChainLink(rec.prev),
            ));
        }
        let entry = chains.entry(rec.path).or_insert((offset, offset, 0));
        entry.1 = offset;
        entry.2 += 1;
        at += rec.len;
    }
    chains
}

fn check_seal(
    job: &Job,
    bytes: &[u8],
    seal_at: usize,
    chains: &Chains<'_>,
    check: &mut SegmentCheck,
) {
    let path = &job.path;
    let seal = match record::decode(bytes, seal_at) {
        Ok(rec) if record::ends_at_trailer(&rec, seal_at, bytes.len()) => rec,
        Ok(_) => {
            check.findings.push(finding(
                path,
                seal_at as u64,
                Corruption::BadFooter("seal record"),
            ));
            return;
        }
        Err(kind) => {
            check.findings.push(finding(path, seal_at as u64, kind));
            return;
        }
    };
    let footer_at = (seal_at + seal.len - seal.data.len()) as u64;
    let footer = match record::decode_footer(seal.data) {
        Ok(f) => f,
        Err(kind) => {
            check.findings.push(finding(path, footer_at, kind));
            return;
        }
    };
    check.is_sealed = true;
    let s = footer.summary;
    if s.event_count != check.events
        || Some(s.first_id) != check.first_id
        || Some(s.last_id) != check.last_id
        || s.channel_count != chains.len() as u64
    {
        check.findings.push(finding(
            path,
            footer_at,
            "seal footer's counts or ids differ from the records",
        ));
    }
    let mut previous: Option<&str> = None;
    for i in 0..footer.channel_count() {
        let entry = match footer.entry(i) {
            Ok(e) => e,
            Err(kind) => {
                check.findings.push(finding(path, footer_at, kind));
                return;
            }
        };
        if previous.is_some_and(|p| p.as_bytes() >= entry.path.as_bytes()) {
            check
                .findings
                .push(finding(path, footer_at, "channel table is not sorted"));
        }
        previous = Some(entry.path);
        if chains.get(entry.path) != Some(&(entry.first_offset, entry.last_offset, entry.count)) {
            check.findings.push(finding(
                path,
                footer_at,
                format!(
                    "channel table entry for {} differs from the records",
                    entry.path
                ),
            ));
        }
    }
    check_index(job, &bytes[..seal_at], check);
}

fn check_index(job: &Job, records: &[u8], check: &mut SegmentCheck) {
    let idx_path = layout::index_path_for(&job.path);
    let map = match File::open(&idx_path).and_then(|f| Map::whole(&f)) {
        Ok(m) => m,
        Err(e) => {
            check.needs_index = true;
            check
                .findings
                .push(finding(&idx_path, 0, format!("index file unreadable: {e}")));
            return;
        }
    };
    let file = match index::decode_file(map.bytes(map.len())) {
        Ok(f) => f,
        Err((offset, kind)) => {
            check.needs_index = true;
            check.findings.push(finding(&idx_path, offset, kind));
            return;
        }
    };
    if file.segment_first_id != job.first_id.0 {
        check.needs_index = true;
        check
            .findings
            .push(finding(&idx_path, 16, "index belongs to another segment"));
        return;
    }
    let Ok(expected) = index::rebuild(records, file.interval_bytes) else {
        return; // the record damage is reported already
    };
    let actual: Vec<_> = file.entries().collect();
    if actual != expected {
        check.needs_index = true;
        let i = actual
            .iter()
            .zip(&expected)
            .position(|(a, e)| a != e)
            .unwrap_or(actual.len().min(expected.len()));
        let offset = (index::INDEX_HEADER_LEN + i * index::ENTRY_LEN) as u64;
        check.findings.push(finding(
            &idx_path,
            offset,
            Corruption::BadIndexEntry {
                entry: i as u64,
                what: "does not match the records",
            },
        ));
    }
}

/// The repairs that cannot lose good data: cut a torn tail of a stream's last segment, and
/// rewrite a sealed segment's index from its records.
fn repair(job: &Job, check: &mut SegmentCheck) -> Result<(), Error> {
    if let Some((valid_end, file_len)) = check.torn_tail {
        if job.is_last {
            let path = &job.path;
            if valid_end == 0 {
                fs::remove_file(path).map_err(|e| Error::io(path, "remove", e))?;
            } else {
                recovery::cut_tail(path, valid_end, file_len)?;
            }
            let note = format!("cut {} bytes at offset {valid_end}", file_len - valid_end);
            mark_repaired(check, |f| f.file == *path && f.offset == valid_end, &note);
        }
    }
    if check.needs_index && check.is_sealed {
        let file = File::open(&job.path).map_err(|e| Error::io(&job.path, "open", e))?;
        let sealed = super::segment::Sealed::open(&job.path, &file, job.first_id)?;
        super::segment::rebuild_index_file(
            &super::io::OsIo,
            &job.path,
            job.first_id,
            &sealed,
            super::DEFAULT_INDEX_INTERVAL,
        )?;
        let idx_path = layout::index_path_for(&job.path);
        mark_repaired(
            check,
            |f| f.file == idx_path,
            "index rebuilt from the segment",
        );
    }
    Ok(())
}

fn mark_repaired(check: &mut SegmentCheck, which: impl Fn(&Finding) -> bool, note: &str) {
    for f in check.findings.iter_mut().filter(|f| which(f)) {
        f.repaired = Some(note.to_owned());
    }
}
