//! The seed's Puller and CocoonRunner: stream an image into
//! `cocoon image import NAME`, and never let cocoon commit a disk that is not
//! complete and verified.
//!
//! cocoon commits when its stdin reaches a clean EOF. So on any failure before
//! the stream is complete — read error, size or digest mismatch, a signal — the
//! child's process group is killed *before* its stdin is closed, and only then
//! reaped. The child also gets `PR_SET_PDEATHSIG=SIGKILL`, so that even our own
//! sudden death (SIGKILL, OOM) takes it down instead of handing it an EOF.
//! Error precedence is the seed's: the stream error, then the close error,
//! then the child's exit status.

use std::ffi::OsString;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, ExitStatus, Stdio};

use nix::sys::signal::Signal;
use nix::unistd::Pid;
use rustix::pipe::PipeFlags;

use crate::error::{Error, Result};
use crate::manifest::{DiskPlan, disk_plan};
use crate::progress::Progress;
use crate::sink::{Sink, grow_pipe};
use crate::source::BlobSource;
use crate::stream::{self, Options};

/// Environment variable naming the cocoon binary (default: `cocoon` on PATH).
pub const ENV_COCOON: &str = "EPOCH_COCOON_BINARY";

/// Starts an import and hands back its stdin.
pub trait CocoonRunner {
    fn image_import(&self, name: &str) -> Result<Box<dyn Import>>;
}

/// A running import.
pub trait Import {
    /// The write end of the import's stdin.
    fn stdin(&self) -> BorrowedFd<'_>;
    /// The stream failed: kill the import so it cannot commit, then reap it.
    /// Returns how it ended, when it had already exited on its own.
    fn abort(self: Box<Self>) -> Option<ExitStatus>;
    /// The stream is complete and verified: close stdin (cocoon commits on
    /// this EOF) and wait for the import to succeed.
    fn finish(self: Box<Self>) -> Result<()>;
}

/// Runs the real `cocoon` binary (or `$EPOCH_COCOON_BINARY`).
pub struct ExecCocoon {
    pub binary: OsString,
}

impl ExecCocoon {
    pub fn from_env() -> ExecCocoon {
        ExecCocoon {
            binary: std::env::var_os(ENV_COCOON)
                .filter(|v| !v.is_empty())
                .unwrap_or_else(|| "cocoon".into()),
        }
    }
}

impl CocoonRunner for ExecCocoon {
    fn image_import(&self, name: &str) -> Result<Box<dyn Import>> {
        let shown = self.binary.to_string_lossy().into_owned();
        let (read, write) = rustix::pipe::pipe_with(PipeFlags::CLOEXEC)
            .map_err(|e| Error::io("creating cocoon's stdin pipe", e.into()))?;
        grow_pipe(write.as_fd());
        let stderr = std::io::stderr()
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| Error::io("duplicating stderr", e))?;
        let mut cmd = Command::new(&self.binary);
        cmd.args(["image", "import", name])
            .stdin(Stdio::from(read))
            .stdout(Stdio::from(stderr))
            .stderr(Stdio::inherit())
            .process_group(0);
        // SAFETY: prctl is async-signal-safe and touches no memory of ours.
        unsafe {
            cmd.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)
            });
        }
        let child = cmd.spawn().map_err(|e| {
            Error::Child(format!(
                "cannot start {shown:?} ({e}); install cocoon or set {ENV_COCOON}"
            ))
        })?;
        Ok(Box::new(ExecImport {
            child,
            stdin: write,
            name: name.to_owned(),
        }))
    }
}

struct ExecImport {
    child: Child,
    stdin: OwnedFd,
    name: String,
}

impl Import for ExecImport {
    fn stdin(&self) -> BorrowedFd<'_> {
        self.stdin.as_fd()
    }

    fn abort(mut self: Box<Self>) -> Option<ExitStatus> {
        let pid = Pid::from_raw(self.child.id() as i32);
        // The child is not reaped yet, so its pid (= its group id) cannot have
        // been reused; killing the group also takes any helpers it started.
        let _ = nix::sys::signal::killpg(pid, Signal::SIGKILL);
        drop(self.stdin);
        let status = self.child.wait().ok()?;
        (status.signal() != Some(Signal::SIGKILL as i32)).then_some(status)
    }

    fn finish(mut self: Box<Self>) -> Result<()> {
        nix::unistd::close(self.stdin)
            .map_err(|e| Error::io("closing cocoon's stdin", e.into()))?;
        let status = self
            .child
            .wait()
            .map_err(|e| Error::io("waiting for cocoon", e))?;
        if status.success() {
            Ok(())
        } else {
            Err(Error::Child(format!(
                "cocoon image import {} failed ({})",
                self.name,
                describe(status)
            )))
        }
    }
}

fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (_, Some(sig)) => format!("killed by signal {sig}"),
        _ => status.to_string(),
    }
}

/// The seed's Puller: a source and a way to run cocoon.
pub struct Puller<'a> {
    pub source: &'a dyn BlobSource,
    pub cocoon: &'a dyn CocoonRunner,
}

impl Puller<'_> {
    /// Resolve the image, then stream its disk into `cocoon image import name`.
    /// cocoon starts only once the manifest is known to be a usable cloud image.
    pub fn pull(&self, name: &str, opts: &Options, progress: &mut Progress) -> Result<DiskPlan> {
        let resolved = self.source.resolve()?;
        let plan = disk_plan(&resolved.manifest)?;
        // The disk's first bytes match its format before cocoon sees any.
        let source = crate::qcow2::check_start(&plan, self.source, opts.format)?;
        progress.set_total(plan.total);
        let import = self.cocoon.image_import(name)?;
        let streamed = Sink::new(import.stdin())
            .and_then(|sink| stream::stream_plan(&plan, &*source, &sink, opts, progress));
        match streamed {
            Ok(()) => import.finish().map(|()| plan),
            Err(e) => {
                let early_exit = import.abort();
                Err(match (e, early_exit) {
                    // cocoon went away on its own and our write found the
                    // pipe closed: its exit is the real story.
                    (Error::BrokenPipe(_), Some(status)) => Error::Child(format!(
                        "cocoon image import {name} exited before the image was complete ({})",
                        describe(status)
                    )),
                    // cocoon closed its stdin but kept running: it was killed
                    // above, before it could commit what it had read.
                    (Error::BrokenPipe(_), None) => Error::Child(format!(
                        "cocoon image import {name} stopped reading before the image was \
                         complete (it was killed)"
                    )),
                    (e, _) => e,
                })
            }
        }
    }
}
