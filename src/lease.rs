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
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use nix::libc;
use rustix::event::{PollFd, PollFlags};

use crate::error::{Error, Result};
use crate::signals;
use crate::sink::{Sink, SinkKind};

/// Take a read lease on `file` (opened read-only). `false` when the kernel
/// refuses one, or when the file lives on a file system where a lease does
/// not see every writer ([`sole_write_path`]); the blob is then buffered.
pub fn take(file: &File) -> bool {
    if !sole_write_path(file) {
        return false;
    }
    signals::ignore_lease_breaks();
    // SAFETY: fcntl on an fd we own, with integer arguments only.
    unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETLEASE, libc::F_RDLCK) == 0 }
}

/// Whether every change to `file`'s bytes must go through its inode in this
/// kernel — an open for writing or a truncate, which break a lease. That holds
/// for local disk and memory file systems. It does not for stacking and
/// remote ones, though the kernel grants leases there all the same: on
/// overlayfs the lease sits on the overlay inode while the lower or upper
/// file can be written through its own path; on FUSE (virtiofs included) the
/// server answers reads as it likes; on NFS, SMB, 9p or Ceph another client
/// writes. Unknown file systems count as such.
fn sole_write_path(file: &File) -> bool {
    // f_type is i64 here, but its width differs between architectures.
    #[allow(clippy::unnecessary_cast)]
    rustix::fs::fstatfs(file).is_ok_and(|st| trusted_fs(st.f_type as i64))
}

/// `statfs` magic numbers of the file systems on which a lease sees every
/// writer.
fn trusted_fs(magic: i64) -> bool {
    const EXT234: i64 = 0xEF53;
    const XFS: i64 = 0x5846_5342;
    const BTRFS: i64 = 0x9123_683E;
    const TMPFS: i64 = 0x0102_1994;
    const RAMFS: i64 = 0x8584_58F6;
    const F2FS: i64 = 0xF2F5_2010;
    const BCACHEFS: i64 = 0xCA45_1A4E;
    // `f_type` is signed on some targets: compare the low 32 bits.
    matches!(
        magic & 0xFFFF_FFFF,
        EXT234 | XFS | BTRFS | TMPFS | RAMFS | F2FS | BCACHEFS
    )
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
/// empty (or has no reader any more). Files and devices hold copies, not
/// references; a verified blob never enters a socket on a kernel route
/// ([`crate::route`]: a local peer acknowledges references it has not read).
fn wait_consumed(sink: &Sink<'_>) -> Result<()> {
    let fd = sink.fd();
    if sink.kind() != SinkKind::Pipe {
        return Ok(());
    }
    let mut nap = Duration::from_micros(50);
    loop {
        signals::check()?;
        match rustix::io::ioctl_fionread(fd) {
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

    #[test]
    fn leases_are_trusted_only_where_every_writer_goes_through_the_inode() {
        for local in [0xEF53, 0x5846_5342, 0x9123_683E, 0x0102_1994] {
            assert!(trusted_fs(local), "{local:#x}");
        }
        // BTRFS_SUPER_MAGIC as a sign-extended 32-bit f_type.
        assert!(trusted_fs(0x9123_683Ei64 as i32 as i64));
        // overlayfs, FUSE (virtiofs), NFS, SMB2, 9p, Ceph, ZFS.
        for stacked_or_remote in [
            0x794C_7630,
            0x6573_5546,
            0x6969,
            0xFE53_4D42,
            0x0102_1997,
            0x00C3_6400,
            0x2FC1_2FC1,
        ] {
            assert!(!trusted_fs(stacked_or_remote), "{stacked_or_remote:#x}");
        }
    }

    use std::os::unix::fs::OpenOptionsExt;
}
