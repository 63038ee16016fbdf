//! Signals that would end the process become a flag instead of sudden death,
//! and every blocking wait ends when one arrives.
//!
//! Dying at once would close cocoon's stdin cleanly (it commits on a clean EOF)
//! and leave a temporary output file behind. So the handler only records the
//! signal; it is installed without `SA_RESTART`, which makes the main thread's
//! blocking syscall fail with `EINTR`, and the copy loops then return
//! [`Error::Interrupted`](crate::Error::Interrupted) to clean up and exit 128+N.
//!
//! Handled: every catchable signal whose default action ends the process —
//! SIGHUP, SIGINT, SIGQUIT, SIGTERM, SIGUSR1, SIGUSR2, SIGALRM, SIGVTALRM,
//! SIGPROF, SIGPWR, SIGSTKFLT, SIGXCPU, SIGXFSZ and the real-time signals.
//! SIGPIPE is ignored by Rust's runtime (a write to a closed pipe is an
//! `EPIPE` error). SIGIO is ignored: it is how the kernel announces the break
//! of a read lease ([`crate::lease`]), which the copy reports by name when it
//! checks the lease; a stray SIGIO changes nothing. Left at their default: the signals the kernel raises for
//! a fault of the running thread (SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGTRAP,
//! SIGSYS), after which a handler cannot resume, and SIGABRT, which `abort()`
//! raises again with its default action whatever the handler does. A death
//! by one of them, like a death by SIGKILL or the OOM killer, is what the
//! guardian ([`crate::guardian`]) is there for. A SIGXFSZ the kernel raises
//! for our own write past `RLIMIT_FSIZE` is not recorded either: that write
//! fails with `EFBIG` ("File too large"), which tells the story better.
//!
//! Some blocking calls do not return on `EINTR`. A socket read under a
//! timeout is restarted by ureq for the rest of the stall timeout, so the
//! handler also wakes a watchdog thread that shuts the process's sockets
//! down; the read ends at once and the registry code finds the signal on its
//! way out. Waits for a child (cocoon after the end of the stream, a
//! credential helper) poll the same wake-up pipe beside the child, see
//! [`wait_readable`] and [`wait_child`]: std's waits retry `EINTR` forever.

use std::io::Read;
use std::mem::ManuallyDrop;
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, IntoRawFd};
use std::os::unix::ffi::OsStrExt;
use std::process::{Child, ExitStatus};
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::Duration;

use nix::libc;
use rustix::event::{PollFd, PollFlags, Timespec};
use rustix::io::Errno;
use rustix::pipe::PipeFlags;

use crate::error::{Error, Result};

static PENDING: AtomicI32 = AtomicI32::new(0);
/// The write end of the wake-up pipe, or -1 before [`install`].
static WAKE: AtomicI32 = AtomicI32::new(-1);
/// Its read end: readable once a signal has arrived. Never read from and
/// never closed, so that every waiter, now or later, sees it readable.
static NOTICE: AtomicI32 = AtomicI32::new(-1);

/// The named signals handled; the real-time ones are added in [`handled`].
const NAMED: [libc::c_int; 13] = [
    libc::SIGHUP,
    libc::SIGINT,
    libc::SIGQUIT,
    libc::SIGTERM,
    libc::SIGUSR1,
    libc::SIGUSR2,
    libc::SIGALRM,
    libc::SIGVTALRM,
    libc::SIGPROF,
    libc::SIGPWR,
    libc::SIGSTKFLT,
    libc::SIGXCPU,
    libc::SIGXFSZ,
];

/// Every signal the handler records (see the module documentation).
pub(crate) fn handled() -> impl Iterator<Item = libc::c_int> {
    NAMED.into_iter().chain(libc::SIGRTMIN()..=libc::SIGRTMAX())
}

extern "C" fn record(sig: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    if sig == libc::SIGXFSZ && raised_for_our_write(info) {
        return;
    }
    // Keep the first signal: it decides the exit status, and only it wakes
    // the waiters (one byte: the pipe can never fill and block us here).
    let first = PENDING
        .compare_exchange(0, sig, Ordering::SeqCst, Ordering::SeqCst)
        .is_ok();
    let fd = WAKE.load(Ordering::SeqCst);
    if first && fd >= 0 {
        // SAFETY: `fd` is the pipe's write end, never closed once published;
        // write(2) is async-signal-safe and rustix calls it directly.
        let _ = rustix::io::write(unsafe { BorrowedFd::borrow_raw(fd) }, &[0]);
    }
}

/// The kernel raises SIGXFSZ for a write past `RLIMIT_FSIZE` as if the
/// process had sent it to itself (`SI_USER`, our own pid); nothing in
/// cloudimg ever does that.
fn raised_for_our_write(info: *const libc::siginfo_t) -> bool {
    // SAFETY: with SA_SIGINFO the kernel passes a valid siginfo_t; getpid(2)
    // is async-signal-safe.
    unsafe {
        !info.is_null() && (*info).si_code == libc::SI_USER && (*info).si_pid() == libc::getpid()
    }
}

/// Ignore SIGIO, with which the kernel announces a lease break (its default
/// action would end the process). Idempotent.
pub(crate) fn ignore_lease_breaks() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: installing SIG_IGN runs no code of ours.
        unsafe {
            let _ = nix::sys::signal::signal(
                nix::sys::signal::Signal::SIGIO,
                nix::sys::signal::SigHandler::SigIgn,
            );
        }
    });
}

/// Install the recording handler for every [`handled`] signal, the
/// wake-up pipe and the watchdog it wakes; ignore SIGIO.
pub fn install() {
    ignore_lease_breaks();
    if let Ok((read, write)) = rustix::pipe::pipe_with(PipeFlags::CLOEXEC) {
        let notice = read.into_raw_fd();
        NOTICE.store(notice, Ordering::SeqCst);
        // The watchdog starts with the signals blocked (threads inherit the
        // mask), so that they always land on this thread.
        let mut old = empty_set();
        // SAFETY: plain sigset_t values on our stack.
        unsafe {
            libc::pthread_sigmask(libc::SIG_BLOCK, &handled_set(), &mut old);
        }
        // Without a watchdog, a stalled socket read ends at its timeout.
        let _ = std::thread::Builder::new()
            .name("cloudimg-signals".to_owned())
            .spawn(move || watchdog(notice));
        // SAFETY: as above.
        unsafe {
            libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
        }
        WAKE.store(write.into_raw_fd(), Ordering::SeqCst);
    }
    // SAFETY: a zeroed sigaction is valid; the handler only touches atomics
    // and calls write(2) and getpid(2), which are async-signal-safe.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = record as *const () as libc::sighandler_t;
        action.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut action.sa_mask);
        for sig in handled() {
            libc::sigaction(sig, &action, std::ptr::null_mut());
        }
    }
}

/// Wait for the first signal, then cut the network short.
fn watchdog(notice: i32) {
    // SAFETY: NOTICE is never closed once published.
    let notice = unsafe { BorrowedFd::borrow_raw(notice) };
    loop {
        let mut fds = [PollFd::new(&notice, PollFlags::IN)];
        match rustix::event::poll(&mut fds, None) {
            Ok(n) if n > 0 => break,
            Ok(_) | Err(Errno::INTR) => {}
            Err(_) => return,
        }
    }
    shut_down_sockets();
}

/// Shut down every socket the process holds above stderr: the registry
/// connections (an output socket is stdout, and cocoon's stdin is a pipe).
/// Reads blocked on them return, and new requests fail, so the registry
/// code returns to where it checks for the signal.
fn shut_down_sockets() {
    let Ok(fds) = std::fs::read_dir("/proc/self/fd") else {
        return;
    };
    for entry in fds.flatten() {
        let Some(fd) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let socket = std::fs::read_link(entry.path())
            .is_ok_and(|target| target.as_os_str().as_bytes().starts_with(b"socket:"));
        if fd > 2 && socket {
            // SAFETY: borrowed for one shutdown(2) and never closed here
            // (ManuallyDrop). Should the fd have been closed and reused
            // meanwhile, the call fails or cuts a new socket, and the run is
            // being stopped anyway.
            let stream = ManuallyDrop::new(unsafe { TcpStream::from_raw_fd(fd) });
            let _ = stream.shutdown(Shutdown::Both);
        }
    }
}

/// The signal received so far, if any.
pub fn pending() -> Option<i32> {
    match PENDING.load(Ordering::SeqCst) {
        0 => None,
        n => Some(n),
    }
}

/// Block the handled signals in the calling thread, so that they are
/// delivered to the main thread, whose syscalls they must interrupt.
pub fn block_in_this_thread() {
    // SAFETY: a sigset_t value on our stack.
    unsafe {
        libc::pthread_sigmask(libc::SIG_BLOCK, &handled_set(), std::ptr::null_mut());
    }
}

fn empty_set() -> libc::sigset_t {
    // SAFETY: sigemptyset initialises the set it is given.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        set
    }
}

fn handled_set() -> libc::sigset_t {
    let mut set = empty_set();
    for sig in handled() {
        // SAFETY: an initialised set and a valid signal number.
        unsafe {
            libc::sigaddset(&mut set, sig);
        }
    }
    set
}

/// `Err(Interrupted)` when a signal has arrived.
pub fn check() -> Result<()> {
    match pending() {
        Some(sig) => Err(Error::Interrupted(sig)),
        None => Ok(()),
    }
}

/// Block until `fd` is readable (or at its end), `timeout` passes, or a
/// signal arrives: `Ok(true)`, `Ok(false)`, `Err(Interrupted)`. Race-free:
/// a signal that lands just before the wait has already made the wake-up
/// pipe readable.
pub fn wait_readable(fd: Option<BorrowedFd<'_>>, timeout: Option<Duration>) -> Result<bool> {
    // A timeout too long for a timespec is as good as none.
    let timeout = timeout.and_then(|t| Timespec::try_from(t).ok());
    loop {
        check()?;
        let notice = NOTICE.load(Ordering::SeqCst);
        // SAFETY: NOTICE is never closed once published.
        let notice = (notice >= 0).then(|| unsafe { BorrowedFd::borrow_raw(notice) });
        let mut fds: Vec<PollFd<'_>> = fd
            .iter()
            .chain(notice.iter())
            .map(|f| PollFd::from_borrowed_fd(*f, PollFlags::IN))
            .collect();
        match rustix::event::poll(&mut fds, timeout.as_ref()) {
            Ok(0) => return Ok(false),
            Ok(_) if fd.is_some() && !fds[0].revents().is_empty() => return Ok(true),
            // The wake-up pipe: the loop's check() reports the signal.
            Ok(_) | Err(Errno::INTR) => {}
            Err(e) => return Err(Error::io("waiting", e.into())),
        }
    }
}

/// Wait for `child` to exit, as `Child::wait` does, except that a signal
/// ends the wait with `Err(Interrupted)`; the child is then left running
/// for the caller to kill.
pub fn wait_child(child: &mut Child) -> Result<ExitStatus> {
    // A pidfd becomes readable when the process exits (Linux 5.3); without
    // one, look again every 50 ms.
    let pidfd = rustix::process::pidfd_open(
        rustix::process::Pid::from_child(child),
        rustix::process::PidfdFlags::empty(),
    )
    .ok();
    loop {
        if let Some(status) = child
            .try_wait()
            .map_err(|e| Error::io("waiting for a child process", e))?
        {
            return Ok(status);
        }
        match &pidfd {
            Some(fd) => wait_readable(Some(fd.as_fd()), None)?,
            None => wait_readable(None, Some(Duration::from_millis(50)))?,
        };
    }
}

/// Read `child`'s stdout to its end and wait for it, as
/// `Child::wait_with_output` does, except that a signal ends the wait: the
/// child is killed and reaped, and the result is `Err(Interrupted)`. `what`
/// names the child in errors.
pub fn child_output(mut child: Child, what: &str) -> Result<(ExitStatus, Vec<u8>)> {
    let collect = |child: &mut Child| -> Result<(ExitStatus, Vec<u8>)> {
        let mut out = Vec::new();
        if let Some(mut stdout) = child.stdout.take() {
            let mut buf = [0u8; 8192];
            loop {
                wait_readable(Some(stdout.as_fd()), None)?;
                match stdout.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => out.extend_from_slice(&buf[..n]),
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(Error::io(format!("reading from {what}"), e)),
                }
            }
        }
        Ok((wait_child(child)?, out))
    };
    let result = collect(&mut child);
    if result.is_err() {
        let _ = child.kill();
        let _ = child.wait();
    }
    result
}
