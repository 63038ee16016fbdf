//! The output, classified once by `fstat`: which kind of fd it is decides which
//! syscalls [`crate::zerocopy`] tries, in which order.

use std::os::fd::{AsFd, BorrowedFd};

use rustix::fs::{FileType, OFlags};

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

/// How bytes are moved from a file range to the sink, best first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Strategy {
    Splice,
    CopyFileRange,
    Sendfile,
    SpliceViaPipe,
    ReadWrite,
}

/// An output fd and the strategies chosen for it.
#[derive(Debug)]
pub struct Sink<'fd> {
    fd: BorrowedFd<'fd>,
    kind: SinkKind,
    strategies: &'static [Strategy],
}

/// Environment knob that forces the portable read/write path (for tests and
/// benchmarks of the fallback).
pub const ENV_IO: &str = "CLOUDIMG_IO";

impl<'fd> Sink<'fd> {
    /// Classify `fd`, enlarging it first when it is a pipe we write into.
    pub fn new(fd: BorrowedFd<'fd>) -> Result<Sink<'fd>> {
        let st = rustix::fs::fstat(fd).map_err(|e| Error::io("inspecting the output", e.into()))?;
        let flags = rustix::fs::fcntl_getfl(fd)
            .map_err(|e| Error::io("inspecting the output", e.into()))?;
        let kind = match FileType::from_raw_mode(st.st_mode) {
            FileType::Fifo => SinkKind::Pipe,
            FileType::RegularFile if !flags.contains(OFlags::APPEND) => SinkKind::File,
            FileType::Socket => SinkKind::Socket,
            _ => SinkKind::Other,
        };
        if kind == SinkKind::Pipe {
            grow_pipe(fd);
        }
        let forced_rw = std::env::var(ENV_IO).is_ok_and(|v| v == "readwrite");
        let strategies: &'static [Strategy] = if forced_rw {
            &[Strategy::ReadWrite]
        } else {
            match kind {
                SinkKind::Pipe => &[Strategy::Splice, Strategy::ReadWrite],
                SinkKind::File => &[
                    Strategy::CopyFileRange,
                    Strategy::Sendfile,
                    Strategy::ReadWrite,
                ],
                SinkKind::Socket => &[Strategy::Sendfile, Strategy::ReadWrite],
                SinkKind::Other => &[Strategy::SpliceViaPipe, Strategy::ReadWrite],
            }
        };
        Ok(Sink {
            fd,
            kind,
            strategies,
        })
    }

    pub fn fd(&self) -> BorrowedFd<'fd> {
        self.fd
    }

    pub fn kind(&self) -> SinkKind {
        self.kind
    }

    /// The strategies for a file-range blob, best first.
    pub fn strategies(&self) -> &'static [Strategy] {
        self.strategies
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
