//! The guardian: a small fork of cloudimg that keeps cocoon's stdin from ever
//! ending cleanly unless cloudimg said the stream was complete.
//!
//! cocoon commits when its stdin reaches a clean EOF, and a pipe reaches EOF
//! when its last write end closes. cloudimg's write end closes whenever
//! cloudimg dies — SIGKILL, the OOM killer, a crash — and `PR_SET_PDEATHSIG`
//! reaches only cocoon itself, not what cocoon started (a wrapper script that
//! does not `exec` leaves the importer running). So before cocoon starts,
//! cloudimg forks a guardian that holds a second write end of the same pipe
//! and reads a control pipe from cloudimg. The data path is untouched: cocoon
//! reads the pipe cloudimg splices into; the guardian never writes to it.
//!
//! - `complete` (the stream is complete and verified): the guardian closes
//!   its write end and exits; cloudimg then closes its own: EOF.
//! - `aborted` (cloudimg has killed cocoon's process group), or the control
//!   pipe's EOF without `complete` (cloudimg is gone; the guardian then kills
//!   cocoon's process group itself): the guardian kills every other process
//!   that still holds the pipe's read end — found in `/proc/*/fd`, e.g. a
//!   helper that left cocoon's session with `setsid` — and closes its write
//!   end only once the kernel reports that no reader is left (`poll` sets
//!   `POLLERR` on a write end without readers). A reader it cannot kill, or
//!   cannot see for want of `/proc`, keeps the pipe open: it never sees a
//!   clean end.
//!
//! The guardian sits in a process group of its own, so that a signal to
//! cloudimg's group (Ctrl-C, `kill -- -PGID`) passes it by, ignores every
//! signal cloudimg handles, and closes every descriptor it inherited but
//! its two. It is forked from a process with threads, so between `fork` and
//! `_exit` it makes system calls and nothing else: no allocation, no locks,
//! no unwinding.

use std::ffi::CStr;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use nix::libc;
use nix::sys::wait::{WaitPidFlag, WaitStatus};
use nix::unistd::ForkResult;
use rustix::event::{PollFd, PollFlags, Timespec};
use rustix::fs::{AtFlags, CWD, Mode, OFlags, RawDir};
use rustix::io::Errno;
use rustix::pipe::PipeFlags;
use rustix::process::{Pid, PidfdFlags, Signal};

use crate::error::{Error, Result};

/// Control messages: eight bytes, a tag and a little-endian i32.
const STARTED: u8 = b'S';
const ABORTED: u8 = b'A';
const COMPLETE: u8 = b'C';

/// cloudimg's handle on its guardian.
pub struct Guardian {
    pid: Pid,
    control: Option<OwnedFd>,
}

impl Guardian {
    /// Fork a guardian that holds `pipe`, the write end of cocoon's stdin.
    pub fn start(pipe: BorrowedFd<'_>) -> Result<Guardian> {
        let (control_read, control_write) = rustix::pipe::pipe_with(PipeFlags::CLOEXEC)
            .map_err(|e| Error::io("creating the guardian's control pipe", e.into()))?;
        let parent = rustix::process::getpid();
        // SAFETY: the child runs `guard` only, which makes system calls and
        // never returns (see the module documentation).
        match unsafe { nix::unistd::fork() } {
            Ok(ForkResult::Child) => guard(control_read.as_raw_fd(), pipe.as_raw_fd(), parent),
            Ok(ForkResult::Parent { child }) => Ok(Guardian {
                pid: Pid::from_raw(child.as_raw()).expect("fork returns a positive pid"),
                control: Some(control_write),
            }),
            Err(e) => Err(Error::io("starting the guardian process", e.into())),
        }
    }

    fn send(&self, tag: u8, value: i32) {
        let Some(control) = &self.control else {
            return;
        };
        let v = value.to_le_bytes();
        // Eight bytes to a pipe are written whole or not at all; a guardian
        // that is gone (EPIPE) can do nothing more for us anyway.
        while let Err(Errno::INTR) =
            rustix::io::write(control, &[tag, 0, 0, 0, v[0], v[1], v[2], v[3]])
        {}
    }

    /// cocoon runs as process group `pgid`: the guardian kills it should
    /// cloudimg die.
    pub fn started(&self, pgid: i32) {
        self.send(STARTED, pgid);
    }

    /// The stream is complete and verified: the guardian lets go of the pipe
    /// and exits.
    pub fn complete(mut self) {
        self.send(COMPLETE, 0);
        self.control = None;
        self.reap(Duration::from_secs(2));
    }

    /// cloudimg has killed cocoon's process group: the guardian kills every
    /// other reader of the pipe and exits once none is left. Waits up to
    /// `limit` for that; a guardian still waiting for an unkillable reader
    /// is left running, holding the pipe.
    pub fn aborted(mut self, limit: Duration) {
        self.send(ABORTED, 0);
        self.control = None;
        self.reap(limit);
    }

    /// Reap the guardian once it has exited, waiting at most `limit`.
    fn reap(&self, limit: Duration) {
        let nix_pid = nix::unistd::Pid::from_raw(self.pid.as_raw_nonzero().get());
        let pidfd = rustix::process::pidfd_open(self.pid, PidfdFlags::empty()).ok();
        let end = Instant::now() + limit;
        loop {
            match nix::sys::wait::waitpid(nix_pid, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(nix::errno::Errno::EINTR) => {}
                _ => return,
            }
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            let step = left.min(Duration::from_millis(100));
            match &pidfd {
                Some(fd) => {
                    let mut fds = [PollFd::new(fd, PollFlags::IN)];
                    let _ = rustix::event::poll(&mut fds, Timespec::try_from(step).ok().as_ref());
                }
                None => std::thread::sleep(step.min(Duration::from_millis(5))),
            }
        }
    }
}

impl Drop for Guardian {
    /// Neither complete nor aborted (cocoon could not be started, or the
    /// import was dropped): the control pipe's end tells the guardian to
    /// treat it as cloudimg's death.
    fn drop(&mut self) {
        if self.control.take().is_some() {
            self.reap(Duration::from_millis(500));
        }
    }
}

/// The guardian's whole life, in the forked child. System calls only.
fn guard(control: RawFd, pipe: RawFd, parent: Pid) -> ! {
    close_all_but(control, pipe);
    let _ = rustix::process::setpgid(None, None);
    ignore_signals();
    // SAFETY: the two descriptors close_all_but kept open.
    let (control, pipe) = unsafe {
        (
            BorrowedFd::borrow_raw(control),
            BorrowedFd::borrow_raw(pipe),
        )
    };
    let mut group = None;
    let aborted = loop {
        match read_message(control) {
            Some((STARTED, pgid)) => group = Pid::from_raw(pgid),
            Some((COMPLETE, _)) => exit(),
            Some((ABORTED, _)) => break true,
            Some(_) => {}
            // cloudimg is gone without saying the stream was complete.
            None => break false,
        }
    };
    if !aborted && let Some(group) = group {
        let _ = rustix::process::kill_process_group(group, Signal::KILL);
    }
    hold_until_no_reader(pipe, parent);
    exit()
}

fn exit() -> ! {
    // SAFETY: _exit(2) ends the process without running anything of ours.
    unsafe { libc::_exit(0) }
}

/// One control message, or `None` at the control pipe's end.
fn read_message(control: BorrowedFd<'_>) -> Option<(u8, i32)> {
    let mut msg = [0u8; 8];
    let mut got = 0;
    while got < msg.len() {
        match rustix::io::read(control, &mut msg[got..]) {
            Ok(0) => return None,
            Ok(n) => got += n,
            Err(Errno::INTR) => {}
            Err(_) => return None,
        }
    }
    Some((msg[0], i32::from_le_bytes([msg[4], msg[5], msg[6], msg[7]])))
}

/// Close every descriptor but `a` and `b`: the guardian must not keep
/// cloudimg's stdout, stderr, sockets or blob files open, nor a read end of
/// cocoon's pipe.
fn close_all_but(a: RawFd, b: RawFd) {
    let (lo, hi) = (a.min(b) as u32, a.max(b) as u32);
    close_range(0, lo.checked_sub(1));
    close_range(lo + 1, hi.checked_sub(1));
    close_range(hi + 1, Some(u32::MAX));
}

fn close_range(first: u32, last: Option<u32>) {
    let Some(last) = last.filter(|&l| l >= first) else {
        return;
    };
    // SAFETY: close_range(2) on descriptors this process never uses again.
    let done = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            first as libc::c_uint,
            last as libc::c_uint,
            0 as libc::c_uint,
        )
    } == 0;
    if !done {
        // Before Linux 5.9: one close(2) per descriptor.
        for fd in first..=last.min(65_535) {
            // SAFETY: as above.
            unsafe {
                libc::close(fd as libc::c_int);
            }
        }
    }
}

/// Ignore what cloudimg handles, and the terminal's stop signals.
fn ignore_signals() {
    // SAFETY: sigaction(2) with SIG_IGN and an empty mask.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = libc::SIG_IGN;
        libc::sigemptyset(&mut action.sa_mask);
        for sig in crate::signals::handled().chain([libc::SIGTSTP, libc::SIGTTIN, libc::SIGTTOU]) {
            libc::sigaction(sig, &action, std::ptr::null_mut());
        }
    }
}

/// Keep the write end until the pipe has no reader left, killing readers
/// outside cocoon's group on the way.
fn hold_until_no_reader(pipe: BorrowedFd<'_>, parent: Pid) {
    let inode = rustix::fs::fstat(pipe)
        .ok()
        .map(|st| (st.st_dev, st.st_ino));
    let mut pause = Duration::from_millis(20);
    loop {
        // No events asked for: poll reports POLLERR once no reader is left.
        let mut fds = [PollFd::from_borrowed_fd(pipe, PollFlags::empty())];
        if let Ok(n) = rustix::event::poll(&mut fds, Timespec::try_from(pause).ok().as_ref())
            && n > 0
            && fds[0]
                .revents()
                .intersects(PollFlags::ERR | PollFlags::NVAL)
        {
            return;
        }
        if let Some((dev, ino)) = inode {
            kill_readers(dev, ino, parent);
        }
        pause = (pause * 2).min(Duration::from_secs(1));
    }
}

/// SIGKILL every process but us and cloudimg that has the pipe `dev:ino`
/// open for reading.
fn kill_readers(dev: u64, ino: u64, parent: Pid) {
    let me = rustix::process::getpid();
    let dir_flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
    let Ok(proc) = rustix::fs::openat(CWD, c"/proc", dir_flags, Mode::empty()) else {
        return;
    };
    let mut buf = [MaybeUninit::<u8>::uninit(); 4096];
    let mut procs = RawDir::new(proc.as_fd(), &mut buf);
    while let Some(Ok(entry)) = procs.next() {
        let name = entry.file_name().to_bytes();
        let Some(pid) = parse_pid(name) else {
            continue;
        };
        if pid == me || pid == parent {
            continue;
        }
        // Pin the process before looking at its descriptors, so that a pid
        // reused in between is never killed for another process's pipe.
        let pidfd = rustix::process::pidfd_open(pid, PidfdFlags::empty()).ok();
        if holds_reader(proc.as_fd(), name, dev, ino) {
            let _ = match &pidfd {
                Some(fd) => rustix::process::pidfd_send_signal(fd, Signal::KILL),
                None => rustix::process::kill_process(pid, Signal::KILL),
            };
        }
    }
}

/// Whether `/proc/PID/fd` holds a read end of the pipe `dev:ino`.
fn holds_reader(proc: BorrowedFd<'_>, pid: &[u8], dev: u64, ino: u64) -> bool {
    let mut path = [0u8; 32];
    let Some(name) = path.get_mut(..pid.len()) else {
        return false;
    };
    name.copy_from_slice(pid);
    let Some(tail) = path.get_mut(pid.len()..pid.len() + 4) else {
        return false;
    };
    tail.copy_from_slice(b"/fd\0");
    let Ok(path) = CStr::from_bytes_until_nul(&path) else {
        return false;
    };
    let dir_flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
    let Ok(fds) = rustix::fs::openat(proc, path, dir_flags, Mode::empty()) else {
        return false;
    };
    let mut buf = [MaybeUninit::<u8>::uninit(); 2048];
    let mut entries = RawDir::new(fds.as_fd(), &mut buf);
    while let Some(Ok(entry)) = entries.next() {
        let fd = entry.file_name();
        if fd.to_bytes().first() == Some(&b'.') {
            continue;
        }
        let same = rustix::fs::statat(&fds, fd, AtFlags::empty())
            .is_ok_and(|st| st.st_dev == dev && st.st_ino == ino);
        // The link's own mode tells how the descriptor was opened: owner
        // read for a read end.
        if same
            && rustix::fs::statat(&fds, fd, AtFlags::SYMLINK_NOFOLLOW)
                .is_ok_and(|st| st.st_mode & 0o400 != 0)
        {
            return true;
        }
    }
    false
}

/// A `/proc` entry name that is a pid.
fn parse_pid(name: &[u8]) -> Option<Pid> {
    if name.is_empty() || name.len() > 10 {
        return None;
    }
    let mut n: i32 = 0;
    for &c in name {
        if !c.is_ascii_digit() {
            return None;
        }
        n = n.checked_mul(10)?.checked_add(i32::from(c - b'0'))?;
    }
    Pid::from_raw(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_names_that_are_pids() {
        assert_eq!(
            parse_pid(b"1").map(Pid::as_raw_nonzero).map(|p| p.get()),
            Some(1)
        );
        assert_eq!(
            parse_pid(b"4194304").map(|p| p.as_raw_nonzero().get()),
            Some(4_194_304)
        );
        for bad in [&b""[..], b"0", b"self", b"12a", b"99999999999", b"-1"] {
            assert!(parse_pid(bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn finds_the_readers_of_a_pipe() {
        let (read, write) = rustix::pipe::pipe().unwrap();
        let st = rustix::fs::fstat(&read).unwrap();
        let (dev, ino) = (st.st_dev, st.st_ino);
        let proc = rustix::fs::openat(
            CWD,
            c"/proc",
            OFlags::RDONLY | OFlags::DIRECTORY,
            Mode::empty(),
        )
        .unwrap();
        let me = rustix::process::getpid().as_raw_nonzero().get().to_string();
        assert!(holds_reader(proc.as_fd(), me.as_bytes(), dev, ino));
        drop(read);
        // A write end alone is no reader.
        assert!(!holds_reader(proc.as_fd(), me.as_bytes(), dev, ino));
        drop(write);
    }
}
