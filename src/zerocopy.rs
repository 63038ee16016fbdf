//! The syscall loops that move bytes into the sink: splice, copy_file_range,
//! sendfile, splice through a pipe of our own, and plain read/write.
//!
//! Each strategy moves one chunk per call and reports how much it moved. When
//! the kernel refuses a strategy for this pair of fds (`EINVAL`, `ENOSYS`,
//! `EXDEV`, `EOPNOTSUPP`), the copier moves on to the next strategy of the
//! sink's list *from the byte reached*: a refused call moved nothing, so no
//! byte is lost or repeated. Short transfers simply loop.

use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::io::Errno;
use rustix::pipe::{PipeFlags, SpliceFlags};

use crate::error::{Error, Result};
use crate::signals;
use crate::sink::{Sink, Strategy, grow_pipe};

/// Largest request per call. Big enough that syscall overhead vanishes and a
/// reflink covers a whole part in few calls, small enough that progress and
/// cancellation are checked often.
const SPLICE_CHUNK: usize = 16 << 20;
const COPY_RANGE_CHUNK: usize = 1 << 30;
const SENDFILE_CHUNK: usize = 16 << 20;
/// The user-space buffer of the read/write path.
const BUF_SIZE: usize = 1 << 20;

/// Called after every chunk with the number of bytes moved; an error aborts
/// the copy (a signal, a failed digest elsewhere).
pub type Tick<'a> = &'a mut dyn FnMut(u64) -> Result<()>;

/// Moves file ranges and byte slices into one sink, remembering which
/// strategy the kernel accepted.
pub struct Copier<'s, 'fd> {
    sink: &'s Sink<'fd>,
    /// Index into `sink.strategies()` of the strategy in use.
    current: usize,
    buf: Vec<u8>,
    /// Our own pipe for [`Strategy::SpliceViaPipe`], made on first use.
    pipe: Option<(OwnedFd, OwnedFd)>,
    /// When zero blocks become holes (regular-file sinks only).
    sparse: Sparse,
    /// The output's device, to tell whether a blob shares its file system.
    out_dev: Option<u64>,
    /// A hole was skipped at the end: the file must be extended at finish.
    skipped: bool,
}

/// Whether zero blocks of the disk become holes in a regular-file output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sparse {
    /// Never: every byte is written.
    Never,
    /// Holes, except for blobs on the output's own file system: there an
    /// in-kernel copy (a reflink where possible) costs no new space or less
    /// time than reading and scanning.
    Auto,
    /// Holes for every zero block, whatever the source.
    Always,
}

/// The granularity of holes: a file-system block.
const HOLE_BLOCK: usize = 4096;

fn is_zero(block: &[u8]) -> bool {
    let (head, words, tail) = unsafe { block.align_to::<u128>() };
    head.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

fn falls_back(e: Errno) -> bool {
    matches!(
        e,
        Errno::INVAL | Errno::NOSYS | Errno::XDEV | Errno::OPNOTSUPP | Errno::BADF
    )
}

impl<'s, 'fd> Copier<'s, 'fd> {
    pub fn new(sink: &'s Sink<'fd>) -> Self {
        Copier {
            sink,
            current: 0,
            buf: Vec::new(),
            pipe: None,
            sparse: Sparse::Never,
            out_dev: None,
            skipped: false,
        }
    }

    /// Make zero blocks holes, as `mode` says, when the sink is a regular
    /// file positioned at its end (so a skipped block reads back as zeros).
    pub fn set_sparse(&mut self, mode: Sparse) -> Result<()> {
        if mode == Sparse::Never || self.sink.kind() != crate::sink::SinkKind::File {
            return Ok(());
        }
        let out = self.sink.fd();
        let st =
            rustix::fs::fstat(out).map_err(|e| Error::io("inspecting the output", e.into()))?;
        let pos = rustix::fs::seek(out, rustix::fs::SeekFrom::Current(0))
            .map_err(|e| Error::io("inspecting the output", e.into()))?;
        if pos >= st.st_size as u64 {
            self.sparse = mode;
            self.out_dev = Some(st.st_dev);
        }
        Ok(())
    }

    /// Whether this blob's zero blocks become holes.
    fn sparse_for(&self, file: &File) -> bool {
        match self.sparse {
            Sparse::Never => false,
            Sparse::Always => true,
            Sparse::Auto => rustix::fs::fstat(file).is_ok_and(|st| Some(st.st_dev) != self.out_dev),
        }
    }

    /// Finish the output: a file that ends in a hole gets its full length.
    pub fn finish(&mut self) -> Result<()> {
        if !self.skipped {
            return Ok(());
        }
        let out = self.sink.fd();
        let pos = rustix::fs::seek(out, rustix::fs::SeekFrom::Current(0))
            .map_err(|e| Error::io("finishing the output", e.into()))?;
        rustix::fs::ftruncate(out, pos).map_err(|e| Error::io("finishing the output", e.into()))
    }

    /// Write `bytes` with zero blocks (aligned to the output offset) skipped
    /// by seeking over them: one `write` per run of data, one `lseek` per run
    /// of zero blocks.
    fn write_sparse(&mut self, bytes: &[u8]) -> std::result::Result<(), Errno> {
        let out = self.sink.fd();
        let pos = rustix::fs::seek(out, rustix::fs::SeekFrom::Current(0))?;
        let mut run_start = 0usize;
        let mut run_zero: Option<bool> = None;
        let mut at = 0usize;
        // The first block ends at the next block boundary of the output.
        let mut end = (HOLE_BLOCK - (pos as usize % HOLE_BLOCK)).min(bytes.len());
        let flush = |from: usize, to: usize, zero: bool| -> std::result::Result<(), Errno> {
            if zero {
                rustix::fs::seek(out, rustix::fs::SeekFrom::Current((to - from) as i64))?;
            } else {
                write_all(out, &bytes[from..to])?;
            }
            Ok(())
        };
        while at < bytes.len() {
            let zero = end - at == HOLE_BLOCK && is_zero(&bytes[at..end]);
            match run_zero {
                Some(z) if z != zero => {
                    flush(run_start, at, z)?;
                    run_start = at;
                }
                _ => {}
            }
            run_zero = Some(zero);
            at = end;
            end = (at + HOLE_BLOCK).min(bytes.len());
        }
        if let Some(z) = run_zero {
            flush(run_start, bytes.len(), z)?;
            // A trailing hole must be given its length at the end.
            self.skipped = z;
        }
        Ok(())
    }

    /// The strategy in use now (it can change after a fallback).
    pub fn strategy(&self) -> Strategy {
        self.sink.strategies()[self.current]
    }

    /// Copy exactly `len` bytes of `file` from `offset` into the sink.
    /// `what` names the blob in errors.
    pub fn copy_range(
        &mut self,
        file: &File,
        mut offset: u64,
        len: u64,
        what: &str,
        tick: Tick<'_>,
    ) -> Result<()> {
        let mut left = len;
        let sparse = self.sparse_for(file);
        while left > 0 {
            let strategy = if sparse {
                Strategy::ReadWrite
            } else {
                self.strategy()
            };
            match self.step(strategy, file, offset, left) {
                Ok(0) => {
                    return Err(Error::Integrity(format!(
                        "{what}: blob ended after {} of {len} bytes",
                        len - left
                    )));
                }
                Ok(n) => {
                    let n = n as u64;
                    offset += n;
                    left -= n;
                    tick(n)?;
                }
                Err(Errno::INTR) => signals::check()?,
                Err(e) if falls_back(e) && self.current + 1 < self.sink.strategies().len() => {
                    self.current += 1;
                }
                Err(e) => return Err(Error::io(format!("copying {what}"), e.into())),
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
    ) -> std::result::Result<usize, Errno> {
        let out = self.sink.fd();
        let mut off = offset;
        let want = |cap: usize| usize::try_from(left).map_or(cap, |l| l.min(cap));
        match strategy {
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
            Strategy::SpliceViaPipe => self.splice_via_pipe(file, offset, want(SPLICE_CHUNK)),
            Strategy::ReadWrite => {
                let n = want(BUF_SIZE);
                self.buf.resize(BUF_SIZE, 0);
                let got = loop {
                    match rustix::io::pread(file, &mut self.buf[..n], offset) {
                        Err(Errno::INTR) if signals::pending().is_none() => {}
                        r => break r?,
                    }
                };
                if self.sparse != Sparse::Never {
                    let buf = std::mem::take(&mut self.buf);
                    let written = self.write_sparse(&buf[..got]);
                    self.buf = buf;
                    written?;
                } else {
                    write_all(out, &self.buf[..got])?;
                }
                Ok(got)
            }
        }
    }

    /// file → our pipe → sink. Whatever entered the pipe leaves it before we
    /// return: if the sink refuses splice half-way, the rest is read back
    /// out of the pipe and written, and the copier falls back for the future.
    fn splice_via_pipe(
        &mut self,
        file: &File,
        offset: u64,
        len: usize,
    ) -> std::result::Result<usize, Errno> {
        if self.pipe.is_none() {
            let (r, w) = rustix::pipe::pipe_with(PipeFlags::CLOEXEC)?;
            grow_pipe(w.as_fd());
            self.pipe = Some((r, w));
        }
        let (r, w) = self.pipe.as_ref().expect("pipe just made");
        let out = self.sink.fd();
        let mut off = offset;
        let n = rustix::pipe::splice(file, Some(&mut off), w, None, len, SpliceFlags::MORE)?;
        let mut inside = n;
        while inside > 0 {
            match rustix::pipe::splice(r, None, out, None, inside, SpliceFlags::MORE) {
                Ok(0) => return Err(Errno::IO),
                Ok(k) => inside -= k,
                Err(Errno::INTR) if signals::pending().is_none() => {}
                Err(e) if falls_back(e) => {
                    drain_pipe(r, out, inside, &mut self.buf)?;
                    self.current += 1;
                    return Ok(n);
                }
                Err(e) => return Err(e),
            }
        }
        Ok(n)
    }

    /// Write a byte slice (from a stream blob) into the sink.
    pub fn write_bytes(&mut self, bytes: &[u8]) -> Result<()> {
        let written = if self.sparse == Sparse::Never {
            write_all(self.sink.fd(), bytes)
        } else {
            self.write_sparse(bytes)
        };
        written.map_err(|e| match e {
            Errno::INTR => signals::check().err().unwrap_or(Error::Interrupted(0)),
            e => Error::io("writing the output", e.into()),
        })
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

/// `write` until everything is out. EINTR is retried unless a signal is
/// pending, in which case it is reported so the caller can abort.
pub fn write_all(out: BorrowedFd<'_>, mut bytes: &[u8]) -> std::result::Result<(), Errno> {
    while !bytes.is_empty() {
        match rustix::io::write(out, bytes) {
            Ok(0) => return Err(Errno::IO),
            Ok(n) => bytes = &bytes[n..],
            Err(Errno::INTR) if signals::pending().is_none() => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
