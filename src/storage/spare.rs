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
//! The price is a second write of every segment's size, and the spare's sync competes with the
//! writer's. Measured with `ivy-bench publish` against `--preallocate false`, same binary, 10 s
//! runs on the CI-class VM:
//! - one connection with a window of 16 (4 MiB segments): 24-29 K -> 31-40 K acknowledged
//!   events/s, with a lower p99;
//! - at saturation (4 connections x 256), over 15 runs each: no throughput change beyond noise, p50
//!   lower in 14 runs, p99 higher in all 15 (by 0.2 to 2.5 ms), and the worst acknowledgement
//!   118-161 ms against 13-386 ms. Syncing the spare every 8 MiB made p99 far worse (each sync is
//!   a journal commit); in a C model of the two writers, filling it with O_DIRECT was worse too
//!   (the writer's partial pages must then be read from disk).
//! - the worst case is the spare's own sync: its 64 MiB reach the device in one burst, and the
//!   writer's syncs queue behind them. In a later sitting (2 runs each, at saturation) the worst
//!   acknowledgement was 122-128 ms with spares and 17-19 ms without (p99 5.8-6.4 against
//!   3.8-4.4 ms). In the C model (60 KB `pwrite` + `fdatasync` beside a 64 MiB fill), the worst
//!   sync was 106-127 ms against 4.5-11 ms with no fill. Starting writeback every MiB with
//!   `sync_file_range` and pausing 4 ms between MiBs cut that to 41-55 ms but doubled the
//!   writer's p99 (3 ms against 1.2-1.9); waiting for each MiB's writeback made its p99 14 ms.
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

/// Zeroes are written in pieces of this size, so that a stop request is seen quickly.
const FILL_CHUNK: usize = 1 << 20;

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
        let mut at = 0u64;
        while at < self.len {
            if self.state.lock().is_done() {
                drop(file);
                io.remove(&self.tmp)?;
                return Ok(None);
            }
            let n = usize::try_from(self.len - at).map_or(FILL_CHUNK, |left| left.min(FILL_CHUNK));
            io.write_at(&self.tmp, &file, at, &zeroes[..n])?;
            at += n as u64;
        }
        // One sync for the whole spare. Syncing every few MiB spread the I/O but made each sync
        // a journal commit (the file grows), and the writer's syncs queued behind them: publish
        // p99 went from 6 to 17 ms with a sync every 8 MiB.
        io.sync_data(&self.tmp, &file)?;
        io.rename(&self.tmp, &self.spare)?;
        Ok(Some(file))
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
