//! The file operations the writer depends on for durability, behind a trait so that a test can
//! record which bytes were made durable and throw the rest away (a power-loss test). The engine
//! uses `OsIo`; nothing else implements it outside tests.
//!
//! Reads do not go through here: they use the maps (`mmap.rs`), and recovery runs at open, before
//! any write.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

pub trait FileIo: Send + Sync + 'static {
    /// Creates a file that must not exist yet, open for reading and writing.
    fn create(&self, path: &Path) -> io::Result<File>;
    /// Writes all of `bytes` at `offset`.
    fn write_at(&self, path: &Path, file: &File, offset: u64, bytes: &[u8]) -> io::Result<()>;
    /// Makes the file's written bytes durable (`fdatasync`).
    fn sync_data(&self, path: &Path, file: &File) -> io::Result<()>;
    /// Makes a directory's entries durable (new files, renames).
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Cuts a file to `len` bytes (rolling back a failed write).
    fn truncate(&self, path: &Path, file: &File, len: u64) -> io::Result<()>;
    /// Removes a file; one that is not there is not an error.
    fn remove(&self, path: &Path) -> io::Result<()>;
    /// Starts writing `len` bytes at `offset` back to the device, and with `wait` waits until
    /// they are written. A pacing hint that makes nothing durable (no cache flush, no metadata),
    /// so a test's files may ignore it.
    fn write_back(
        &self,
        _path: &Path,
        _file: &File,
        _offset: u64,
        _len: u64,
        _wait: bool,
    ) -> io::Result<()> {
        Ok(())
    }
}

/// The operating system's files.
#[derive(Debug, Default, Clone, Copy)]
pub struct OsIo;

impl FileIo for OsIo {
    fn create(&self, path: &Path) -> io::Result<File> {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
    }

    fn write_at(&self, _path: &Path, file: &File, offset: u64, bytes: &[u8]) -> io::Result<()> {
        file.write_all_at(bytes, offset)
    }

    fn sync_data(&self, _path: &Path, file: &File) -> io::Result<()> {
        file.sync_data()
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        File::open(dir)?.sync_all()
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(from, to)
    }

    fn truncate(&self, _path: &Path, file: &File, len: u64) -> io::Result<()> {
        file.set_len(len)
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        match std::fs::remove_file(path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            other => other,
        }
    }

    #[cfg(target_os = "linux")]
    fn write_back(
        &self,
        _path: &Path,
        file: &File,
        offset: u64,
        len: u64,
        wait: bool,
    ) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        let flags = if wait {
            libc::SYNC_FILE_RANGE_WAIT_BEFORE
                | libc::SYNC_FILE_RANGE_WRITE
                | libc::SYNC_FILE_RANGE_WAIT_AFTER
        } else {
            libc::SYNC_FILE_RANGE_WRITE
        };
        let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        };
        // SAFETY: sync_file_range takes no pointers, only integers, and `file` keeps its
        // descriptor open for the call.
        #[allow(unsafe_code)]
        let done = unsafe { libc::sync_file_range(file.as_raw_fd(), offset, len, flags) };
        if done == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
}
