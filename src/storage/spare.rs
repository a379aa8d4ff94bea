//! Spare segment files: zero-filled ahead of time, so that appends overwrite blocks instead of
//! extending the file.
//!
//! Why: an `fdatasync` after a write that extends a file must also commit the file's new size and
//! block map to the filesystem journal; after a write over blocks already written it flushes data
//! only. On the CI-class VM, 50 KB `pwrite` + `fdatasync` took 0.48 ms appending and 0.24 ms
//! overwriting (medians of 2,000). Under `always` every group commit waits for one such sync, so
//! this is most of an acknowledgement's time. `fallocate` does not help: its unwritten extents are
//! converted on first write, which is again a journal commit. PostgreSQL zero-fills its WAL
//! segments for the same reason.
//!
//! A background thread keeps at most one spare, `DIR/SPARE`: `segment_bytes_max` zero bytes,
//! written as `DIR/SPARE.tmp`, synced, then renamed. The writer takes it for a stream that rolls
//! because its segment is full (such a stream will likely fill the next one too; a cold stream's
//! first segment stays small), renames it to the new segment's name and writes the header over its
//! first bytes. The first full roll of a process finds no spare and asks for one. If filling fails
//! (a full disk, say), spares stop until the store is reopened and segments are created empty as
//! before: a spare is an optimisation, never a reason to refuse an append, and a thread that keeps
//! retrying on a full disk would take the space the writer needs.
//!
//! **The fill is paced.** The zeroes go out in 128 KiB pieces, at most `PACE` (2) bytes per byte
//! the writer has written since the fill began (`Spares::note_written`), so a spare is ready when
//! the segment that asked for it is half full. Each piece's writeback is started at once
//! (`FileIo::write_back`, `sync_file_range`) and waited for before the next but one is written.
//! Why: a cache flush makes durable everything the device has taken, so any sync of the writer
//! waits for whatever zeroes were sent before it. Filled in one go and synced once, a spare's
//! 64 MiB reached the device in one burst, and the writer's syncs behind it took 100-150 ms; as
//! paced pieces, each sync waits for at most 256 KiB of zeroes. `ivy-bench publish` at saturation
//! (4 connections x 256), 3 runs each, alternating:
//! - one sitting: one burst 568-703 K acknowledged events/s, p99 5.2-7.1 ms, worst 124-139 ms;
//!   paced 128 KiB pieces 698-728 K, p99 3.3-3.9 ms, worst 14-16 ms;
//! - a later one, with slower syncs: one burst 552-630 K, p99 4.7-5.8 ms, worst 122-129 ms; paced
//!   538-656 K, p99 3.9-5.4 ms, worst 74-163 ms (a full sitting of the paced build just before:
//!   worst 10-19 ms in 3 runs).
//!
//! So the bursts' stalls are gone and p99 is lower, throughput the same within the VM's noise, and
//! p50 higher (1.14-1.24 -> 1.31-1.59 ms): zeroes are now in the way of many syncs, a little each.
//! Pieces of 1 MiB kept a p99 of 6.5-7.1 ms; 256 KiB gave 3.8-4.6 ms; not waiting for the pieces
//! brought back a 245 ms worst; a `PACE` of 4, 4.2-4.6 ms (1.25 and 1.5: no better than 2).
//!
//! The price is a second write of every segment's size. Measured with `ivy-bench publish` against
//! `--preallocate false` (then with the fill in one burst), same binary, 10 s runs on the CI-class
//! VM:
//! - one connection with a window of 16 (4 MiB segments): 24-29 K -> 31-40 K acknowledged
//!   events/s, with a lower p99;
//! - at saturation (4 connections x 256), over 15 runs each: no throughput change beyond noise, p50
//!   lower in 14 runs. Syncing the spare every 8 MiB made p99 far worse (each sync is a journal
//!   commit, as the file grows; `sync_file_range` starts writeback without one); in a C model of
//!   the two writers, filling it with O_DIRECT was worse too (the writer's partial pages must then
//!   be read from disk).
//!
//! Hence `StoreOptions::preallocate`.
//!
//! For the format this means that the live segment of a stream may end in zeroes up to its end of
//! file (free space, not a torn tail), and that sealing cuts the file at its trailer
//! (`storage-format.md`). A spare left by an earlier process is removed at open; it is not part of
//! the log.

use super::error::Result;
use super::io::{FileIo, OsIo};
use super::StoreOptions;
use parking_lot::{Condvar, Mutex};
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;

pub const SPARE_FILE: &str = "SPARE";
pub const SPARE_TMP_FILE: &str = "SPARE.tmp";

/// Zeroes are written in pieces of this size, each written back before the next but one.
const FILL_CHUNK: usize = 128 << 10;
/// The filler writes at most this many bytes of zeroes per byte the writer writes, so a spare is
/// ready when the segment that asked for it is half full.
const PACE: u64 = 2;

/// The writer's handle on the spare and its filler thread (see the module docs).
pub struct Spares {
    inner: Arc<Inner>,
    filler: Option<JoinHandle<()>>,
}

struct Inner {
    spare: PathBuf,
    tmp: PathBuf,
    len: u64,
    io: Arc<dyn FileIo>,
    state: Mutex<State>,
    wake: Condvar,
}

#[derive(Default)]
struct State {
    ready: Option<File>,
    is_wanted: bool,
    is_stopping: bool,
    /// Filling failed once: no more spares in this process.
    is_disabled: bool,
    /// Bytes the writer has written (`Spares::note_written`), which pace the fill.
    written: u64,
}

impl State {
    fn needs_filling(&self) -> bool {
        self.is_wanted && self.ready.is_none()
    }

    /// The filler has nothing more to do: the store is closing, or spares failed.
    fn is_done(&self) -> bool {
        self.is_stopping || self.is_disabled
    }
}

impl Spares {
    /// Spares for the store in `dir`. No thread runs until a spare is first asked for.
    pub fn new(dir: &Path, opts: &StoreOptions) -> Spares {
        let inner = Inner {
            spare: dir.join(SPARE_FILE),
            tmp: dir.join(SPARE_TMP_FILE),
            len: opts.segment_bytes_max,
            io: Arc::clone(&opts.io),
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
        };
        Spares {
            inner: Arc::new(inner),
            filler: None,
        }
    }

    /// Renames the spare, if one is ready, to `path` (a new segment's name) and returns it open;
    /// either way the next one is asked for. A failed rename (the streams on another filesystem,
    /// say) stops spares until restart: the caller then creates the file as usual.
    ///
    /// The rename happens under the state lock, before the filler is told to make the next spare.
    /// Otherwise the filler could rename its next spare over `SPARE` first: the writer would then
    /// move the new file into place while writing through the handle of the old one, now
    /// unlinked, and acknowledged events would be lost (`tests/crash.rs` found exactly this).
    pub fn take_as(&mut self, path: &Path) -> Option<File> {
        let taken = {
            let mut state = self.inner.state.lock();
            if state.is_disabled {
                return None;
            }
            state.is_wanted = true;
            match state.ready.take() {
                None => None,
                Some(file) => match self.inner.io.rename(&self.inner.spare, path) {
                    Ok(()) => Some(file),
                    Err(e) => {
                        tracing::warn!(from = %self.inner.spare.display(), to = %path.display(), error = %e, "cannot rename the spare segment; segments are created empty until restart");
                        state.is_disabled = true;
                        drop(file);
                        if let Err(e) = self.inner.io.remove(&self.inner.spare) {
                            tracing::warn!(path = %self.inner.spare.display(), error = %e, "cannot remove the spare segment");
                        }
                        None
                    }
                },
            }
        };
        self.inner.wake.notify_one();
        self.start_filler();
        taken
    }

    /// Counts bytes the writer wrote, which pace the filler (once a round: the lock is free
    /// but for the filler's brief checks, never held across its I/O).
    pub fn note_written(&self, bytes: u64) {
        self.inner.state.lock().written += bytes;
        self.inner.wake.notify_one();
    }

    fn start_filler(&mut self) {
        if self.filler.is_some() {
            return;
        }
        let inner = Arc::clone(&self.inner);
        match std::thread::Builder::new()
            .name("ivy-spare".into())
            .spawn(move || inner.run())
        {
            Ok(handle) => self.filler = Some(handle),
            Err(e) => {
                tracing::warn!(error = %e, "cannot start the spare-segment thread");
                self.inner.disable();
            }
        }
    }
}

impl Drop for Spares {
    fn drop(&mut self) {
        self.inner.state.lock().is_stopping = true;
        self.inner.wake.notify_one();
        if let Some(handle) = self.filler.take() {
            let _joined = handle.join();
        }
    }
}

impl Inner {
    /// No more spares in this process (after a failure): segments are created empty.
    fn disable(&self) {
        self.state.lock().is_disabled = true;
        self.wake.notify_one();
        tracing::warn!("spare segments are off until restart; new segments are created empty");
    }

    fn run(&self) {
        loop {
            {
                let mut state = self.state.lock();
                while !state.is_done() && !state.needs_filling() {
                    self.wake.wait(&mut state);
                }
                if state.is_done() {
                    return;
                }
            }
            match self.fill() {
                Ok(Some(file)) => {
                    let mut state = self.state.lock();
                    if state.is_done() {
                        // Spares were stopped while this one was made (a failed rename).
                        drop(file);
                        let _ = self.io.remove(&self.spare);
                        return;
                    }
                    state.ready = Some(file);
                    state.is_wanted = false;
                }
                Ok(None) => return,
                Err(e) => {
                    tracing::warn!(path = %self.tmp.display(), error = %e, "cannot fill a spare segment");
                    let _ = self.io.remove(&self.tmp);
                    self.disable();
                    return;
                }
            }
        }
    }

    /// Writes and syncs a zero-filled `SPARE.tmp`, then renames it to `SPARE`. `None` when asked
    /// to stop on the way (the temporary is removed).
    fn fill(&self) -> io::Result<Option<File>> {
        let io = &*self.io;
        io.remove(&self.tmp)?;
        let file = io.create(&self.tmp)?;
        let zeroes = vec![0u8; FILL_CHUNK];
        let start = self.state.lock().written;
        let mut at = 0u64;
        let mut previous: Option<(u64, u64)> = None;
        while at < self.len {
            if !self.wait_for_writer(start + at / PACE) {
                drop(file);
                io.remove(&self.tmp)?;
                return Ok(None);
            }
            let n = usize::try_from(self.len - at).map_or(FILL_CHUNK, |left| left.min(FILL_CHUNK));
            io.write_at(&self.tmp, &file, at, &zeroes[..n])?;
            // Start this piece's writeback and wait for the one before: at most two pieces are
            // in flight, so the writer's syncs never queue behind more than 256 KiB of zeroes.
            // Only a pacing hint: where it fails (a filesystem without it), the spare is still
            // made, and a real write error surfaces at the sync below.
            let _hint = io.write_back(&self.tmp, &file, at, n as u64, false);
            if let Some((offset, len)) = previous {
                let _hint = io.write_back(&self.tmp, &file, offset, len, true);
            }
            previous = Some((at, n as u64));
            at += n as u64;
        }
        // All but the last piece are written back by now: this sync waits for at most one piece,
        // and commits the file's size and block map.
        io.sync_data(&self.tmp, &file)?;
        io.rename(&self.tmp, &self.spare)?;
        Ok(Some(file))
    }

    /// Waits until the writer has written `target` bytes in all; false when asked to stop.
    fn wait_for_writer(&self, target: u64) -> bool {
        let mut state = self.state.lock();
        while !state.is_done() && state.written < target {
            self.wake.wait(&mut state);
        }
        !state.is_done()
    }
}

/// Removes the spare files an earlier process left in `dir` (the writer, at open, whether or not
/// it preallocates). Not through `opts.io`: like recovery, this runs before the writer does.
pub fn remove_left_over(dir: &Path) -> Result<()> {
    for name in [SPARE_FILE, SPARE_TMP_FILE] {
        super::segment::remove_existing(&OsIo, &dir.join(name))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    fn spares(dir: &Path) -> Spares {
        let opts = StoreOptions {
            segment_bytes_max: 8 * FILL_CHUNK as u64,
            ..StoreOptions::default()
        };
        Spares::new(dir, &opts)
    }

    fn wait_until(what: &str, done: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(Instant::now() < deadline, "{what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn the_fill_keeps_pace_with_what_the_writer_writes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut spares = spares(dir.path());
        let tmp = dir.path().join(SPARE_TMP_FILE);
        assert!(
            spares.take_as(&dir.path().join("a.seg")).is_none(),
            "none made yet"
        );
        // With nothing written, only the first piece goes out: the next needs half a piece.
        wait_until("the fill starts", || tmp.exists());
        std::thread::sleep(Duration::from_millis(100));
        let len = || std::fs::metadata(&tmp).map(|m| m.len()).unwrap_or(0);
        assert_eq!(len(), FILL_CHUNK as u64, "the filler waits for the writer");
        assert!(!dir.path().join(SPARE_FILE).exists());
        // Three pieces' worth written lets it fill 6 more (at most PACE bytes per byte): 7 of 8.
        spares.note_written(3 * FILL_CHUNK as u64);
        wait_until("the paced pieces", || len() == 7 * FILL_CHUNK as u64);
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(
            len(),
            7 * FILL_CHUNK as u64,
            "no further than the pace allows"
        );
        spares.note_written(FILL_CHUNK as u64);
        wait_until("the spare is ready", || {
            dir.path().join(SPARE_FILE).exists()
        });
        let taken = dir.path().join("b.seg");
        let file = spares.take_as(&taken).expect("the spare, once made");
        assert_eq!(
            file.metadata().expect("metadata").len(),
            8 * FILL_CHUNK as u64
        );
        let bytes = std::fs::read(&taken).expect("read the taken spare");
        assert!(bytes.iter().all(|&b| b == 0));
    }

    #[test]
    fn a_fill_waiting_for_the_writer_stops_with_the_store() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut spares = spares(dir.path());
        assert!(spares.take_as(&dir.path().join("a.seg")).is_none());
        let tmp = dir.path().join(SPARE_TMP_FILE);
        wait_until("the fill starts", || tmp.exists());
        let started = Instant::now();
        drop(spares);
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the filler was joined promptly"
        );
        assert!(!tmp.exists(), "the unfinished spare is removed");
    }
}
