//! The syscall loops that move a file range into the sink along a kernel
//! route: splice, copy_file_range, sendfile, splice through a pipe of our
//! own, and plain read/write.
//!
//! Each strategy moves one chunk per call and says how it went with a
//! [`Step`]: bytes moved, refused (the kernel will not do this for this pair
//! of fds: `EINVAL`, `ENOSYS`, `EXDEV`, `EOPNOTSUPP`, `EBADF`), or bytes moved
//! and then refused. Only [`Copier::copy_range`] changes strategy, always
//! from the byte reached, so no byte is lost or repeated. Short transfers
//! simply loop.

use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::io::Errno;
use rustix::pipe::{PipeFlags, SpliceFlags};

use crate::error::{Error, Result};
use crate::fdwait;
use crate::route::Strategy;
use crate::signals;
use crate::sink::{Sink, grow_pipe};

/// Largest request per call. Big enough that syscall overhead vanishes and a
/// reflink covers a whole part in few calls, small enough that progress and
/// cancellation are checked often.
const SPLICE_CHUNK: usize = 16 << 20;
const COPY_RANGE_CHUNK: usize = 1 << 30;
const SENDFILE_CHUNK: usize = 16 << 20;
/// The user-space buffer of the read/write path.
pub const BUF_SIZE: usize = 1 << 20;

/// A byte range of a blob file: serve sends arbitrary ones, the stream
/// whole blobs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Range {
    pub offset: u64,
    pub len: u64,
}

/// Called after every chunk with the number of bytes moved; an error aborts
/// the copy (a signal, a failed digest elsewhere, a broken lease).
pub type Tick<'a> = &'a mut dyn FnMut(u64) -> Result<()>;

/// How one call of a strategy went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// `n` bytes moved (0: the file ended early).
    Moved(usize),
    /// The kernel refuses this strategy for this pair of fds; nothing moved.
    Refused,
    /// `n` bytes moved, then the strategy was refused: go on with the next.
    MovedThenRefused(usize),
}

/// Whether an errno means "not for this pair of fds", not a failure.
fn refused(e: Errno) -> bool {
    matches!(
        e,
        Errno::INVAL | Errno::NOSYS | Errno::XDEV | Errno::OPNOTSUPP | Errno::BADF
    )
}

/// Moves file ranges into one sink.
pub struct Copier<'s, 'fd> {
    sink: &'s Sink<'fd>,
    buf: Vec<u8>,
    /// Our own pipe for [`Strategy::SpliceViaPipe`], made on first use.
    pipe: Option<(OwnedFd, OwnedFd)>,
}

impl<'s, 'fd> Copier<'s, 'fd> {
    pub fn new(sink: &'s Sink<'fd>) -> Self {
        Copier {
            sink,
            buf: Vec::new(),
            pipe: None,
        }
    }

    /// Copy exactly `range` of `file` into the sink, trying `strategies` in
    /// order. `what` names the blob in errors.
    pub fn copy_range(
        &mut self,
        file: &File,
        range: Range,
        strategies: &[Strategy],
        what: &str,
        tick: Tick<'_>,
    ) -> Result<()> {
        let Range { mut offset, len } = range;
        let mut left = len;
        let mut current = 0;
        while left > 0 {
            let strategy = *strategies
                .get(current)
                .ok_or_else(|| Error::Other(format!("copying {what}: no way to move its bytes")))?;
            let (moved, next) = match self.step(strategy, file, offset, left) {
                Ok(Step::Moved(0)) => return Err(Error::truncated(what, len - left, len)),
                Ok(Step::Moved(n)) => (n, false),
                Ok(Step::Refused) => (0, true),
                Ok(Step::MovedThenRefused(n)) => (n, true),
                Err(Errno::INTR) => {
                    signals::check()?;
                    (0, false)
                }
                Err(Errno::AGAIN) => {
                    wait_writable(self.sink.fd())?;
                    (0, false)
                }
                Err(e) => return Err(Error::io(format!("copying {what}"), e.into())),
            };
            if next {
                current += 1;
            }
            if moved > 0 {
                offset += moved as u64;
                left -= moved as u64;
                tick(moved as u64)?;
            }
        }
        Ok(())
    }

    /// One transfer of at most `left` bytes with `strategy`.
    fn step(
        &mut self,
        strategy: Strategy,
        file: &File,
        offset: u64,
        left: u64,
    ) -> std::result::Result<Step, Errno> {
        let out = self.sink.fd();
        let mut off = offset;
        let want = |cap: usize| usize::try_from(left).map_or(cap, |l| l.min(cap));
        let moved = match strategy {
            Strategy::Splice => rustix::pipe::splice(
                file,
                Some(&mut off),
                out,
                None,
                want(SPLICE_CHUNK),
                SpliceFlags::MORE,
            ),
            Strategy::CopyFileRange => {
                rustix::fs::copy_file_range(file, Some(&mut off), out, None, want(COPY_RANGE_CHUNK))
            }
            Strategy::Sendfile => {
                rustix::fs::sendfile(out, file, Some(&mut off), want(SENDFILE_CHUNK))
            }
            Strategy::SpliceViaPipe => {
                return self.splice_via_pipe(file, offset, want(SPLICE_CHUNK));
            }
            Strategy::ReadWrite => {
                // The last resort: its errors are errors, never a refusal.
                let n = want(BUF_SIZE);
                self.buf.resize(BUF_SIZE, 0);
                let got = pread(file, &mut self.buf[..n], offset)?;
                write_all(out, &self.buf[..got])?;
                return Ok(Step::Moved(got));
            }
        };
        match moved {
            Ok(n) => Ok(Step::Moved(n)),
            Err(e) if refused(e) => Ok(Step::Refused),
            Err(e) => Err(e),
        }
    }

    /// file → our pipe → sink. Whatever entered the pipe leaves it before we
    /// return: if the sink refuses splice half-way, the rest is read back out
    /// of the pipe and written, and the step says so.
    fn splice_via_pipe(
        &mut self,
        file: &File,
        offset: u64,
        len: usize,
    ) -> std::result::Result<Step, Errno> {
        if self.pipe.is_none() {
            let (r, w) = rustix::pipe::pipe_with(PipeFlags::CLOEXEC)?;
            grow_pipe(w.as_fd());
            self.pipe = Some((r, w));
        }
        let (r, w) = self.pipe.as_ref().expect("pipe just made");
        let out = self.sink.fd();
        let mut off = offset;
        let n = match rustix::pipe::splice(file, Some(&mut off), w, None, len, SpliceFlags::MORE) {
            Ok(n) => n,
            Err(e) if refused(e) => return Ok(Step::Refused),
            Err(e) => return Err(e),
        };
        let mut inside = n;
        while inside > 0 {
            match rustix::pipe::splice(r, None, out, None, inside, SpliceFlags::MORE) {
                Ok(0) => return Err(Errno::IO),
                Ok(k) => {
                    inside -= k;
                    // Cut short by a signal: the stream is being abandoned.
                    if inside > 0 && signals::pending().is_some() {
                        return Err(Errno::INTR);
                    }
                }
                Err(Errno::INTR) if signals::pending().is_none() => {}
                Err(Errno::AGAIN) => wait_writable_errno(out)?,
                Err(e) if refused(e) => {
                    drain_pipe(r, out, inside, &mut self.buf)?;
                    return Ok(Step::MovedThenRefused(n));
                }
                Err(e) => return Err(e),
            }
        }
        Ok(Step::Moved(n))
    }
}

/// A byte range of a file as a reader (`pread`, so the fd's position is
/// never shared state): the buffered route's source for file blobs, and
/// capped manifest reads from layouts and archives.
pub struct FileRange<'a> {
    file: &'a File,
    offset: u64,
    left: u64,
}

impl<'a> FileRange<'a> {
    /// `range` of `file`.
    pub fn new(file: &'a File, range: Range) -> Self {
        FileRange {
            file,
            offset: range.offset,
            left: range.len,
        }
    }
}

impl std::io::Read for FileRange<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let want = usize::try_from(self.left).map_or(buf.len(), |l| l.min(buf.len()));
        let got = pread(self.file, &mut buf[..want], self.offset)?;
        self.offset += got as u64;
        self.left -= got as u64;
        Ok(got)
    }
}

/// `pread` that retries `EINTR` unless a signal is pending.
pub fn pread(file: &File, buf: &mut [u8], offset: u64) -> std::result::Result<usize, Errno> {
    loop {
        match rustix::io::pread(file, &mut *buf, offset) {
            Err(Errno::INTR) if signals::pending().is_none() => {}
            r => return r,
        }
    }
}

/// Move `len` bytes that sit in pipe `r` to `out` through user space.
fn drain_pipe(
    r: &OwnedFd,
    out: BorrowedFd<'_>,
    mut len: usize,
    buf: &mut Vec<u8>,
) -> std::result::Result<(), Errno> {
    buf.resize(BUF_SIZE, 0);
    while len > 0 {
        let want = len.min(buf.len());
        let got = match rustix::io::read(r, &mut buf[..want]) {
            Ok(0) => return Err(Errno::IO),
            Ok(n) => n,
            Err(Errno::INTR) => continue,
            Err(e) => return Err(e),
        };
        write_all(out, &buf[..got])?;
        len -= got;
    }
    Ok(())
}

/// `write` until everything is out. `EINTR` is retried unless a signal is
/// pending, in which case it is reported so the caller can abort; an output
/// in non-blocking mode (`EAGAIN`) is waited for. A signal that cuts a write
/// short after some bytes (a pipe that filled up: the kernel then returns the
/// count, not `EINTR`) is reported too, instead of writing on.
pub fn write_all(out: BorrowedFd<'_>, mut bytes: &[u8]) -> std::result::Result<(), Errno> {
    while !bytes.is_empty() {
        match rustix::io::write(out, bytes) {
            Ok(0) => return Err(Errno::IO),
            Ok(n) => {
                bytes = &bytes[n..];
                if !bytes.is_empty() && signals::pending().is_some() {
                    return Err(Errno::INTR);
                }
            }
            Err(Errno::INTR) if signals::pending().is_none() => {}
            Err(Errno::AGAIN) => wait_writable_errno(out)?,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Wait until `out` (a non-blocking output someone handed us) takes bytes
/// again. `EINTR` with a signal pending is reported.
fn wait_writable_errno(out: BorrowedFd<'_>) -> std::result::Result<(), Errno> {
    loop {
        match fdwait::wait_writable(out) {
            Err(Errno::INTR) if signals::pending().is_none() => {}
            r => return r,
        }
    }
}

fn wait_writable(out: BorrowedFd<'_>) -> Result<()> {
    wait_writable_errno(out).map_err(|e| match e {
        Errno::INTR => signals::check().err().unwrap_or(Error::Interrupted(0)),
        e => Error::io("waiting for the output", e.into()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route::strategies;
    use crate::sink::SinkKind;
    use std::io::{Read, Write};

    fn blob(len: usize) -> (tempfile::TempDir, File, Vec<u8>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blob");
        let data: Vec<u8> = (0..len).map(|i| (i * 7 + i / 251) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        (dir, File::open(&path).unwrap(), data)
    }

    fn copy_into(sink_fd: BorrowedFd<'_>, file: &File, range: Range, s: &[Strategy]) -> u64 {
        let sink = Sink::new(sink_fd).unwrap();
        let mut copier = Copier::new(&sink);
        let mut ticks = 0;
        copier
            .copy_range(file, range, s, "blob", &mut |n| {
                ticks += n;
                Ok(())
            })
            .unwrap();
        ticks
    }

    #[test]
    fn every_strategy_moves_an_arbitrary_range_exactly() {
        let (_d, file, data) = blob(3 << 20);
        let range = Range {
            offset: 12345,
            len: (2 << 20) + 777,
        };
        let want = &data[12345..12345 + range.len as usize];
        let out_dir = tempfile::tempdir().unwrap();
        for s in [
            Strategy::CopyFileRange,
            Strategy::Sendfile,
            Strategy::SpliceViaPipe,
            Strategy::ReadWrite,
        ] {
            let path = out_dir.path().join(format!("{s:?}"));
            let out = File::create_new(&path).unwrap();
            assert_eq!(copy_into(out.as_fd(), &file, range, &[s]), range.len);
            assert_eq!(std::fs::read(&path).unwrap(), want, "{s:?}");
        }
        // Splice needs a pipe on one side: read it on a thread.
        let (r, w) = rustix::pipe::pipe().unwrap();
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            File::from(r).read_to_end(&mut got).unwrap();
            got
        });
        copy_into(w.as_fd(), &file, range, &[Strategy::Splice]);
        drop(w);
        assert_eq!(reader.join().unwrap(), want);
    }

    #[test]
    fn a_refused_strategy_hands_over_at_the_byte_reached() {
        // An append-mode file refuses copy_file_range and splice (EINVAL/
        // EBADF): the list falls through to read/write, nothing lost or
        // repeated.
        let (_d, file, data) = blob(1 << 20);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out");
        let mut out = std::fs::OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(&path)
            .unwrap();
        out.write_all(b"head").unwrap();
        let all = Range {
            offset: 0,
            len: data.len() as u64,
        };
        let list = [
            Strategy::CopyFileRange,
            Strategy::SpliceViaPipe,
            Strategy::ReadWrite,
        ];
        copy_into(out.as_fd(), &file, all, &list);
        let back = std::fs::read(&path).unwrap();
        assert_eq!(&back[..4], b"head");
        assert_eq!(&back[4..], &data[..]);
        assert_eq!(Sink::new(out.as_fd()).unwrap().kind(), SinkKind::Other);
        assert_eq!(strategies(SinkKind::Other), &list[1..]);
    }

    #[test]
    fn a_blob_shorter_than_its_range_is_an_integrity_error() {
        let (_d, file, _) = blob(1000);
        let dir = tempfile::tempdir().unwrap();
        let out = File::create_new(dir.path().join("out")).unwrap();
        let sink = Sink::new(out.as_fd()).unwrap();
        let e = Copier::new(&sink)
            .copy_range(
                &file,
                Range {
                    offset: 0,
                    len: 2000,
                },
                strategies(SinkKind::File),
                "layer \"p\"",
                &mut |_| Ok(()),
            )
            .unwrap_err();
        assert!(matches!(e, Error::Integrity(_)), "{e}");
        assert!(
            e.to_string().contains("ended after 1000 of 2000 bytes"),
            "{e}"
        );
    }

    #[test]
    fn a_non_blocking_pipe_is_waited_for_not_failed() {
        let (_d, file, data) = blob(4 << 20);
        let (r, w) = rustix::pipe::pipe().unwrap();
        rustix::fs::fcntl_setfl(&w, rustix::fs::OFlags::NONBLOCK).unwrap();
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            let mut r = File::from(r);
            let mut buf = [0u8; 4096];
            loop {
                std::thread::sleep(std::time::Duration::from_micros(200));
                match r.read(&mut buf).unwrap() {
                    0 => return got,
                    n => got.extend_from_slice(&buf[..n]),
                }
            }
        });
        let all = Range {
            offset: 0,
            len: data.len() as u64,
        };
        for s in [Strategy::Splice, Strategy::ReadWrite] {
            copy_into(w.as_fd(), &file, all, &[s]);
        }
        drop(w);
        let got = reader.join().unwrap();
        assert_eq!(&got[..data.len()], &data[..]);
        assert_eq!(&got[data.len()..], &data[..]);
    }
}
