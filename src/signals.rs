//! SIGINT, SIGTERM and SIGHUP become a flag instead of sudden death.
//!
//! Dying at once would close cocoon's stdin cleanly (it commits on a clean EOF)
//! and leave a temporary output file behind. So the handler only records the
//! signal; it is installed without `SA_RESTART`, which makes the main thread's
//! blocking syscall fail with `EINTR`, and the copy loops then return
//! [`Error::Interrupted`](crate::Error::Interrupted) to clean up and exit 128+N.
//!
//! One blocking call does not return on `EINTR`: a socket read under a
//! timeout, which ureq restarts for the rest of the stall timeout (a minute by
//! default). So the handler also wakes a watchdog thread that shuts the
//! process's sockets down; the read ends at once and the registry code finds
//! the signal on its way out.

use std::mem::ManuallyDrop;
use std::net::{Shutdown, TcpStream};
use std::os::fd::{BorrowedFd, FromRawFd, IntoRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicI32, Ordering};

use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, SigmaskHow, Signal};
use rustix::io::Errno;
use rustix::pipe::PipeFlags;

static PENDING: AtomicI32 = AtomicI32::new(0);
/// The write end of the watchdog's pipe, or -1 when there is no watchdog.
static WAKE: AtomicI32 = AtomicI32::new(-1);

const HANDLED: [Signal; 3] = [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP];

extern "C" fn record(sig: libc_int) {
    // Keep the first signal: it decides the exit status, and only it wakes
    // the watchdog (one byte: the pipe can never fill and block us here).
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

#[allow(non_camel_case_types)]
type libc_int = std::ffi::c_int;

/// Install the recording handler for SIGINT, SIGTERM and SIGHUP, and the
/// watchdog it wakes.
pub fn install() {
    if let Ok((read, write)) = rustix::pipe::pipe_with(PipeFlags::CLOEXEC) {
        // The watchdog starts with the signals blocked (threads inherit the
        // mask), so that they always land on this thread.
        let mut old = SigSet::empty();
        let _ = nix::sys::signal::pthread_sigmask(
            SigmaskHow::SIG_BLOCK,
            Some(&handled()),
            Some(&mut old),
        );
        let spawned = std::thread::Builder::new()
            .name("cloudimg-signals".to_owned())
            .spawn(move || watchdog(read));
        let _ = nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&old), None);
        if spawned.is_ok() {
            WAKE.store(write.into_raw_fd(), Ordering::SeqCst);
        }
    }
    let action = SigAction::new(
        SigHandler::Handler(record),
        SaFlags::empty(),
        SigSet::empty(),
    );
    for sig in HANDLED {
        // SAFETY: the handler only touches atomics and calls write(2), which
        // are async-signal-safe.
        unsafe {
            let _ = nix::sys::signal::sigaction(sig, &action);
        }
    }
}

/// Wait for the handler's wake-up, then cut the network short.
fn watchdog(read: OwnedFd) {
    let mut byte = [0u8; 1];
    loop {
        match rustix::io::read(&read, &mut byte) {
            Ok(1) => break,
            Err(Errno::INTR) => {}
            _ => return,
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
    let _ = nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&handled()), None);
}

fn handled() -> SigSet {
    let mut set = SigSet::empty();
    for sig in HANDLED {
        set.add(sig);
    }
    set
}

/// `Err(Interrupted)` when a signal has arrived.
pub fn check() -> crate::Result<()> {
    match pending() {
        Some(sig) => Err(crate::Error::Interrupted(sig)),
        None => Ok(()),
    }
}
