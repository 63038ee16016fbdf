//! SIGINT, SIGTERM and SIGHUP become a flag instead of sudden death.
//!
//! Dying at once would close cocoon's stdin cleanly (it commits on a clean EOF)
//! and leave a temporary output file behind. So the handler only records the
//! signal; it is installed without `SA_RESTART`, which makes the main thread's
//! blocking syscall fail with `EINTR`, and the copy loops then return
//! [`Error::Interrupted`](crate::Error::Interrupted) to clean up and exit 128+N.

use std::sync::atomic::{AtomicI32, Ordering};

use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, SigmaskHow, Signal};

static PENDING: AtomicI32 = AtomicI32::new(0);

const HANDLED: [Signal; 3] = [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP];

extern "C" fn record(sig: libc_int) {
    // Keep the first signal: it decides the exit status.
    let _ = PENDING.compare_exchange(0, sig, Ordering::SeqCst, Ordering::SeqCst);
}

#[allow(non_camel_case_types)]
type libc_int = std::ffi::c_int;

/// Install the recording handler for SIGINT, SIGTERM and SIGHUP.
pub fn install() {
    let action = SigAction::new(
        SigHandler::Handler(record),
        SaFlags::empty(),
        SigSet::empty(),
    );
    for sig in HANDLED {
        // SAFETY: the handler only touches an atomic, which is async-signal-safe.
        unsafe {
            let _ = nix::sys::signal::sigaction(sig, &action);
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
    let mut set = SigSet::empty();
    for sig in HANDLED {
        set.add(sig);
    }
    let _ = nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&set), None);
}

/// `Err(Interrupted)` when a signal has arrived.
pub fn check() -> crate::Result<()> {
    match pending() {
        Some(sig) => Err(crate::Error::Interrupted(sig)),
        None => Ok(()),
    }
}
