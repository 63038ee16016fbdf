//! Read leases: how a file blob moved by the kernel stays the file that was
//! hashed.
//!
//! On a kernel route the hashing threads `pread` a blob while the kernel
//! copies it separately — and a splice into a pipe only passes references to
//! page-cache pages, which the reader sees as they are when it reads them.
//! Someone writing the blob in between would make the delivered bytes differ
//! from the hashed ones. A read lease (`F_SETLEASE F_RDLCK`) closes that gap:
//! the kernel grants it only while nobody has the file open for writing
//! (writable mappings included), and breaks it when someone opens it for
//! writing or truncates it — that opener then waits (up to
//! `/proc/sys/fs/lease-break-time`) and the lease is gone for good. So a
//! lease still held after the consumer has taken every byte proves that the
//! file was not written while we had it.
//!
//! Where no lease can be had (the file is open for writing, we neither own
//! it nor have `CAP_LEASE`, the file system has no leases, leases are
//! disabled), [`crate::route`] sends the blob through a buffer that is
//! hashed exactly as written.
//!
//! The kernel announces a break with SIGIO, whose default action is to end
//! the process: it is ignored, and the lease's state is asked for instead.

use std::fs::File;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::Arc;
use std::time::Duration;

use nix::libc;
use rustix::event::{PollFd, PollFlags};

use crate::error::{Error, Result};
use crate::signals;
use crate::sink::{Sink, SinkKind};

/// Take a read lease on `file` (opened read-only). `false` when the kernel
/// refuses one; the reason does not matter, the blob is then buffered.
pub fn take(file: &File) -> bool {
    signals::ignore_lease_breaks();
    // SAFETY: fcntl on an fd we own, with integer arguments only.
    unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETLEASE, libc::F_RDLCK) == 0 }
}

/// Whether the read lease on `file` is still held, with no break pending.
pub fn held(file: &File) -> bool {
    // SAFETY: as in `take`.
    unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETLEASE) == libc::F_RDLCK }
}

/// Leased blobs, kept open (and so leased) until the consumer can no longer
/// observe their pages.
#[derive(Default)]
pub struct Leases {
    held: Vec<(Arc<File>, String)>,
}

impl Leases {
    /// Keep `file`, leased, until [`Leases::release`]; `label` names the
    /// blob in errors.
    pub fn keep(&mut self, file: Arc<File>, label: String) {
        self.held.push((file, label));
    }

    /// Wait until the sink holds no more references to the blobs' pages,
    /// then check that every lease survived: a broken one means the file
    /// was opened for writing while it streamed.
    pub fn release(self, sink: &Sink<'_>) -> Result<()> {
        if self.held.is_empty() {
            return Ok(());
        }
        wait_consumed(sink)?;
        for (file, label) in &self.held {
            ensure_held(file, label)?;
        }
        Ok(())
    }
}

/// `Err` naming the blob when its lease was broken.
pub fn ensure_held(file: &File, label: &str) -> Result<()> {
    if held(file) {
        Ok(())
    } else {
        Err(Error::Integrity(format!(
            "{label}: the blob file was opened for writing while it was streamed; \
             the output cannot be vouched for"
        )))
    }
}

/// Wait until what was moved into the sink has left our hands: a pipe is
/// empty (or has no reader any more), a socket has every byte acknowledged
/// (or is closed). Files and devices hold copies, not references. `serve`
/// calls it before the last bytes of every response.
pub fn wait_consumed(sink: &Sink<'_>) -> Result<()> {
    let fd = sink.fd();
    let pending: fn(BorrowedFd<'_>) -> rustix::io::Result<u64> = match sink.kind() {
        SinkKind::Pipe => |fd| rustix::io::ioctl_fionread(fd),
        SinkKind::Socket => socket_outq,
        SinkKind::File | SinkKind::Other => return Ok(()),
    };
    let mut nap = Duration::from_micros(50);
    loop {
        signals::check()?;
        match pending(fd) {
            Ok(0) | Err(_) => return Ok(()),
            Ok(_) => {}
        }
        let mut pfd = [PollFd::new(&fd, PollFlags::empty())];
        let now = rustix::event::Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        let _ = rustix::event::poll(&mut pfd, Some(&now));
        if pfd[0].revents().intersects(PollFlags::ERR | PollFlags::HUP) {
            return Ok(()); // the reader is gone: nobody will see those pages
        }
        std::thread::sleep(nap);
        nap = (nap * 2).min(Duration::from_millis(10));
    }
}

/// Bytes a socket has not yet had acknowledged (TCP) or read (unix).
fn socket_outq(fd: BorrowedFd<'_>) -> rustix::io::Result<u64> {
    // SAFETY: SIOCOUTQ (the number of TIOCOUTQ) writes one int.
    let getter = unsafe {
        rustix::ioctl::Getter::<{ libc::TIOCOUTQ as rustix::ioctl::Opcode }, libc::c_int>::new()
    };
    // SAFETY: the getter's type matches what the kernel writes.
    let n = unsafe { rustix::ioctl::ioctl(fd, getter) }?;
    Ok(u64::try_from(n).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn a_lease_is_refused_while_the_file_is_open_for_writing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blob");
        let mut w = File::create(&path).unwrap();
        w.write_all(b"bytes").unwrap();
        let r = File::open(&path).unwrap();
        assert!(!take(&r), "leased while a writer holds the file");
        drop(w);
        let r = File::open(&path).unwrap();
        assert!(take(&r));
        assert!(held(&r));
        assert!(ensure_held(&r, "x").is_ok());
    }

    #[test]
    fn opening_for_writing_breaks_the_lease_for_good() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blob");
        std::fs::write(&path, b"bytes").unwrap();
        let r = File::open(&path).unwrap();
        assert!(take(&r));
        // A non-blocking open for writing starts the break and fails at once.
        let opened = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&path);
        assert!(opened.is_err(), "a writer got in past the lease");
        assert!(!held(&r));
        let e = ensure_held(&r, "layer \"p\"").unwrap_err().to_string();
        assert!(
            e.contains("opened for writing while it was streamed"),
            "{e}"
        );
    }

    use std::os::unix::fs::OpenOptionsExt;
}
