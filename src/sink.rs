//! The output, classified once by `fstat`: what kind of fd it is, which file
//! system it lives on and whether zero blocks could become holes in it.
//! [`crate::route`] turns that into the syscalls a blob is moved with.

use std::os::fd::{AsFd, BorrowedFd};

use rustix::fs::{FileType, OFlags, SeekFrom};

use crate::error::{Error, Result};

/// What the output fd is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SinkKind {
    /// A pipe or FIFO: splice.
    Pipe,
    /// A regular file not opened for appending: copy_file_range (reflinks).
    File,
    /// A socket: sendfile.
    Socket,
    /// A block or character device, a terminal, an append-mode file: splice
    /// through a pipe of our own where the kernel allows it, else read/write.
    Other,
}

/// An output fd and what was learnt about it.
#[derive(Debug)]
pub struct Sink<'fd> {
    fd: BorrowedFd<'fd>,
    kind: SinkKind,
    /// The device of a regular-file output (to tell whether a blob shares
    /// its file system).
    dev: Option<u64>,
    /// A regular file written at its end: a skipped block reads back as zeros.
    at_end: bool,
}

impl<'fd> Sink<'fd> {
    /// Classify `fd`, enlarging it first when it is a pipe we write into.
    pub fn new(fd: BorrowedFd<'fd>) -> Result<Sink<'fd>> {
        let inspecting = |e: rustix::io::Errno| Error::io("inspecting the output", e.into());
        let st = rustix::fs::fstat(fd).map_err(inspecting)?;
        let flags = rustix::fs::fcntl_getfl(fd).map_err(inspecting)?;
        let kind = match FileType::from_raw_mode(st.st_mode) {
            FileType::Fifo => SinkKind::Pipe,
            FileType::RegularFile if !flags.contains(OFlags::APPEND) => SinkKind::File,
            FileType::Socket => SinkKind::Socket,
            _ => SinkKind::Other,
        };
        if kind == SinkKind::Pipe {
            grow_pipe(fd);
        }
        let (dev, at_end) = if kind == SinkKind::File {
            let pos = rustix::fs::seek(fd, SeekFrom::Current(0)).map_err(inspecting)?;
            (Some(st.st_dev), pos >= st.st_size as u64)
        } else {
            (None, false)
        };
        Ok(Sink {
            fd,
            kind,
            dev,
            at_end,
        })
    }

    /// The output fd.
    pub(crate) fn fd(&self) -> BorrowedFd<'fd> {
        self.fd
    }

    /// What the output is.
    pub(crate) fn kind(&self) -> SinkKind {
        self.kind
    }

    /// Whether zero blocks may be skipped: a regular file written at its end.
    pub(crate) fn can_hold_holes(&self) -> bool {
        self.at_end
    }

    /// Whether a file on device `dev` lives on the output's file system.
    pub(crate) fn same_file_system(&self, dev: u64) -> bool {
        self.dev == Some(dev)
    }
}

impl AsFd for Sink<'_> {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd
    }
}

/// Enlarge a pipe towards `/proc/sys/fs/pipe-max-size` (1 MiB by default):
/// a 1 MiB pipe moves a file into a reading process several times faster than
/// the default 64 KiB one. Unprivileged users can be refused large sizes once
/// they hold many pipes, so halve until the kernel agrees. Returns the size.
pub fn grow_pipe(fd: BorrowedFd<'_>) -> usize {
    let current = rustix::pipe::fcntl_getpipe_size(fd).unwrap_or(64 << 10);
    let max = std::fs::read_to_string("/proc/sys/fs/pipe-max-size")
        .ok()
        .and_then(|s| s.trim().parse::<usize>().ok())
        .unwrap_or(1 << 20);
    let mut want = max;
    while want > current {
        if let Ok(got) = rustix::pipe::fcntl_setpipe_size(fd, want) {
            return got;
        }
        want /= 2;
    }
    current
}
