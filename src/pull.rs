//! The Go reference's Puller and CocoonRunner: stream an image into
//! `cocoon image import NAME`, and never let cocoon commit a disk that is not
//! complete and verified.
//!
//! cocoon commits when its stdin reaches a clean EOF. So on any failure before
//! the stream is complete — read error, size or digest mismatch, a signal — the
//! child's process group is killed *before* its stdin is closed, and only then
//! reaped. cocoon runs in a session of its own (so also in a process group of
//! its own, and without a controlling terminal: a read of `/dev/tty` fails at
//! once instead of stopping it with SIGTTIN, out of sight), with
//! `PR_SET_PDEATHSIG=SIGKILL`, and beside a [`Guardian`] that holds a second
//! write end of its stdin: even our own sudden death (SIGKILL, OOM, a crash)
//! can then never hand anything that reads the pipe a clean EOF. Waiting for
//! cocoon after the end of the stream ends on a signal too.
//! Error precedence is the Go reference's: the stream error, then the close error,
//! then the child's exit status.

use std::ffi::OsString;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use nix::sys::signal::Signal;
use nix::unistd::Pid;
use rustix::pipe::PipeFlags;

use crate::error::{Error, Result};
use crate::guardian::Guardian;
use crate::manifest::{DiskPlan, disk_plan};
use crate::progress::Progress;
use crate::signals;
use crate::sink::{Sink, grow_pipe};
use crate::source::BlobSource;
use crate::stream::{self, Options};

/// Environment variable naming the cocoon binary (default: `cocoon` on PATH).
pub const ENV_COCOON: &str = "EPOCH_COCOON_BINARY";

/// Starts an import and hands back its stdin.
pub trait CocoonRunner {
    /// Start `cocoon image import NAME` (or what stands in for it), its
    /// stdin a pipe whose write end the [`Import`] holds.
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
    /// The program to run: `cocoon` (looked up on PATH) unless told otherwise.
    pub binary: OsString,
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
        // The guardian holds a write end before cocoon exists: from then on,
        // nothing but our `finish` can bring the pipe to a clean end.
        let guardian = Guardian::start(write.as_fd())?;
        let mut cmd = Command::new(&self.binary);
        cmd.args(["image", "import", name])
            .stdin(Stdio::from(read))
            .stdout(Stdio::from(stderr))
            .stderr(Stdio::inherit());
        // SAFETY: setsid and prctl are async-signal-safe and touch no memory
        // of ours.
        unsafe {
            cmd.pre_exec(|| {
                nix::unistd::setsid()?;
                nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)
            });
        }
        let child = cmd.spawn().map_err(|e| {
            Error::Child(format!(
                "cannot start {shown:?} ({e}); install cocoon or set {ENV_COCOON}"
            ))
        })?;
        // The session's id is cocoon's pid, and so is its process group's.
        guardian.started(child.id() as i32);
        Ok(Box::new(ExecImport {
            child,
            stdin: write,
            name: name.to_owned(),
            guardian,
        }))
    }
}

struct ExecImport {
    child: Child,
    stdin: OwnedFd,
    name: String,
    guardian: Guardian,
}

/// How long an abort waits for the guardian to see the last reader of the
/// pipe gone.
const GUARDIAN_WAIT: Duration = Duration::from_secs(2);

impl ExecImport {
    fn kill_group(&self) {
        // The child is not reaped yet, so its pid (= its group id) cannot have
        // been reused; killing the group also takes any helpers it started.
        let pid = Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::killpg(pid, Signal::SIGKILL);
    }
}

impl Import for ExecImport {
    fn stdin(&self) -> BorrowedFd<'_> {
        self.stdin.as_fd()
    }

    fn abort(mut self: Box<Self>) -> Option<ExitStatus> {
        self.kill_group();
        drop(self.stdin);
        let status = self.child.wait().ok();
        // Readers outside the group (a helper that left cocoon's session)
        // are the guardian's: it kills them and holds the pipe until none
        // is left.
        self.guardian.aborted(GUARDIAN_WAIT);
        let status = status?;
        (status.signal() != Some(Signal::SIGKILL as i32)).then_some(status)
    }

    fn finish(mut self: Box<Self>) -> Result<()> {
        self.guardian.complete();
        nix::unistd::close(self.stdin)
            .map_err(|e| Error::io("closing cocoon's stdin", e.into()))?;
        let status = match signals::wait_child(&mut self.child) {
            Ok(status) => status,
            Err(e) => {
                // A signal while cocoon takes its time after the end of the
                // stream: it may have committed already, or be committing.
                let pid = Pid::from_raw(self.child.id() as i32);
                let _ = nix::sys::signal::killpg(pid, Signal::SIGKILL);
                let _ = self.child.wait();
                return Err(e);
            }
        };
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

/// The Go reference's Puller: a source and a way to run cocoon.
pub struct Puller<'a> {
    /// Where the image comes from.
    pub source: &'a dyn BlobSource,
    /// How cocoon is started.
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
                let broken_pipe = matches!(e.root(), Error::BrokenPipe(_));
                Err(match (broken_pipe, early_exit) {
                    // cocoon went away on its own and our write found the
                    // pipe closed: its exit is the real story.
                    (true, Some(status)) => Error::Child(format!(
                        "cocoon image import {name} exited before the image was complete ({})",
                        describe(status)
                    )),
                    // cocoon closed its stdin but kept running: it was killed
                    // above, before it could commit what it had read.
                    (true, None) => Error::Child(format!(
                        "cocoon image import {name} stopped reading before the image was \
                         complete (it was killed)"
                    )),
                    (false, _) => e,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Cursor, Read};
    use std::os::unix::process::ExitStatusExt;
    use std::sync::{Arc, Mutex};
    use std::thread::JoinHandle;

    use crate::digest::{Algorithm, Digest};
    use crate::manifest::{
        ANNOTATION_TITLE, ARTIFACT_OS_IMAGE, Descriptor, DiskLayer, MEDIA_OCI_CONFIG, Manifest,
    };
    use crate::source::{Blob, Resolved};

    const PART: &str = "application/vnd.cocoonstack.disk.qcow2.part";

    /// A source of one disk part: the manifest promises `promised`, the
    /// blob serves `served`.
    struct Source {
        promised: Vec<u8>,
        served: Vec<u8>,
        /// A container image's manifest instead of a cloud image's.
        container: bool,
    }

    impl Source {
        fn new(promised: Vec<u8>) -> Source {
            Source {
                served: promised.clone(),
                promised,
                container: false,
            }
        }
    }

    impl BlobSource for Source {
        fn resolve(&self) -> Result<Resolved> {
            let digest = Digest::of(Algorithm::Sha256, &self.promised);
            let layer = Descriptor {
                media_type: PART.into(),
                digest: digest.to_string(),
                size: self.promised.len() as u64,
                annotations: [(ANNOTATION_TITLE.to_owned(), "disk.00.part".to_owned())].into(),
                ..Descriptor::default()
            };
            let manifest = Manifest {
                artifact_type: (!self.container).then(|| ARTIFACT_OS_IMAGE.into()),
                config: self.container.then(|| Descriptor {
                    media_type: MEDIA_OCI_CONFIG.into(),
                    ..Descriptor::default()
                }),
                layers: vec![layer],
                ..Manifest::default()
            };
            Ok(Resolved {
                reference: "test".into(),
                bytes: Vec::new(),
                digest,
                manifest,
                index: Vec::new(),
            })
        }

        fn open_blob(&self, _: &DiskLayer) -> Result<Blob> {
            Ok(Blob::Stream(Box::new(Cursor::new(self.served.clone()))))
        }
    }

    /// What the fake cocoon does with its stdin.
    #[derive(Clone, Copy)]
    enum Reader {
        /// Read to the end.
        All,
        /// Read this many bytes, then close the pipe.
        StopAfter(usize),
    }

    /// How the fake import ends.
    struct Script {
        reader: Reader,
        /// What `abort` says: `Some` when cocoon had exited on its own.
        exited: Option<ExitStatus>,
        /// What `finish` says (closing stdin, waiting for cocoon).
        finish: Option<Error>,
    }

    /// Starts a fake import over a real pipe, and writes down what the
    /// puller did with it.
    struct Runner {
        script: Mutex<Option<Script>>,
        /// "import NAME", "abort", "finish", in order.
        calls: Arc<Mutex<Vec<String>>>,
        /// What the fake cocoon read.
        received: Arc<Mutex<Vec<u8>>>,
    }

    impl Runner {
        fn new(reader: Reader, exited: Option<ExitStatus>, finish: Option<Error>) -> Runner {
            Runner {
                script: Mutex::new(Some(Script {
                    reader,
                    exited,
                    finish,
                })),
                calls: Arc::default(),
                received: Arc::default(),
            }
        }

        fn calls(&self) -> Vec<String> {
            self.calls.lock().unwrap().clone()
        }
    }

    struct FakeImport {
        stdin: OwnedFd,
        reader: JoinHandle<Vec<u8>>,
        exited: Option<ExitStatus>,
        finish: Option<Error>,
        calls: Arc<Mutex<Vec<String>>>,
        received: Arc<Mutex<Vec<u8>>>,
    }

    impl FakeImport {
        fn end(self, call: &str) -> (Option<ExitStatus>, Option<Error>) {
            self.calls.lock().unwrap().push(call.to_owned());
            drop(self.stdin);
            *self.received.lock().unwrap() = self.reader.join().unwrap();
            (self.exited, self.finish)
        }
    }

    impl CocoonRunner for Runner {
        fn image_import(&self, name: &str) -> Result<Box<dyn Import>> {
            self.calls.lock().unwrap().push(format!("import {name}"));
            let script = self.script.lock().unwrap().take().expect("one import");
            let (read, write) = rustix::pipe::pipe_with(PipeFlags::CLOEXEC).unwrap();
            let reader = std::thread::spawn(move || {
                let mut read = std::fs::File::from(read);
                let mut got = Vec::new();
                match script.reader {
                    Reader::All => {
                        read.read_to_end(&mut got).unwrap();
                    }
                    Reader::StopAfter(n) => {
                        got.resize(n, 0);
                        read.read_exact(&mut got).unwrap();
                    }
                }
                got
            });
            Ok(Box::new(FakeImport {
                stdin: write,
                reader,
                exited: script.exited,
                finish: script.finish,
                calls: Arc::clone(&self.calls),
                received: Arc::clone(&self.received),
            }))
        }
    }

    impl Import for FakeImport {
        fn stdin(&self) -> BorrowedFd<'_> {
            self.stdin.as_fd()
        }

        fn abort(self: Box<Self>) -> Option<ExitStatus> {
            (*self).end("abort").0
        }

        fn finish(self: Box<Self>) -> Result<()> {
            match (*self).end("finish").1 {
                Some(e) => Err(e),
                None => Ok(()),
            }
        }
    }

    /// More than a grown pipe holds, so a reader that stops early is seen.
    /// A 3 MiB "qcow2" disk: the magic (checked before cocoon starts), then
    /// a pattern.
    fn disk() -> Vec<u8> {
        let mut d: Vec<u8> = (0..3 << 20).map(|i| (i % 251) as u8).collect();
        d[..4].copy_from_slice(b"QFI\xfb");
        d
    }

    fn exit_status(code: i32) -> ExitStatus {
        ExitStatus::from_raw(code << 8)
    }

    fn pull(source: &Source, runner: &Runner) -> Result<DiskPlan> {
        let puller = Puller {
            source,
            cocoon: runner,
        };
        puller.pull("img", &Options::default(), &mut Progress::new(0, true))
    }

    #[test]
    fn a_complete_stream_is_finished_and_read_whole() {
        let runner = Runner::new(Reader::All, None, None);
        let plan = pull(&Source::new(disk()), &runner).unwrap();
        assert_eq!(plan.total, disk().len() as u64);
        assert_eq!(runner.calls(), ["import img", "finish"]);
        assert!(*runner.received.lock().unwrap() == disk());
    }

    #[test]
    fn the_stream_error_beats_the_close_error_and_the_child_exit() {
        let mut source = Source::new(disk());
        source.served[12345] ^= 1;
        // cocoon exited 3 on its own, and closing its stdin would fail: the
        // stream's error is the one reported, and finish is never reached.
        let closing = Error::io("closing cocoon's stdin", std::io::Error::other("EIO"));
        let runner = Runner::new(Reader::All, Some(exit_status(3)), Some(closing));
        let e = pull(&source, &runner).unwrap_err();
        assert!(e.to_string().contains("digest mismatch"), "{e}");
        assert_eq!(runner.calls(), ["import img", "abort"]);
    }

    #[test]
    fn the_close_error_is_the_answer_of_a_complete_stream() {
        let closing = Error::io("closing cocoon's stdin", std::io::Error::other("EIO"));
        let runner = Runner::new(Reader::All, None, Some(closing));
        let e = pull(&Source::new(disk()), &runner).unwrap_err();
        assert_eq!(e.to_string(), "closing cocoon's stdin: EIO");
        assert_eq!(runner.calls(), ["import img", "finish"]);
    }

    #[test]
    fn a_broken_pipe_from_a_cocoon_that_exited_is_reported_as_its_exit() {
        let runner = Runner::new(Reader::StopAfter(1000), Some(exit_status(0)), None);
        let e = pull(&Source::new(disk()), &runner).unwrap_err();
        assert!(matches!(e, Error::Child(_)), "{e:?}");
        assert_eq!(
            e.to_string(),
            "cocoon image import img exited before the image was complete (exit status 0)"
        );
        assert_eq!(runner.calls(), ["import img", "abort"]);
        assert_eq!(runner.received.lock().unwrap().len(), 1000);
    }

    #[test]
    fn a_broken_pipe_from_a_cocoon_still_running_says_it_was_killed() {
        let runner = Runner::new(Reader::StopAfter(1000), None, None);
        let e = pull(&Source::new(disk()), &runner).unwrap_err();
        assert_eq!(
            e.to_string(),
            "cocoon image import img stopped reading before the image was complete \
             (it was killed)"
        );
        assert_eq!(runner.calls(), ["import img", "abort"]);
    }

    #[test]
    fn a_manifest_that_is_no_cloud_image_never_starts_cocoon() {
        let mut source = Source::new(disk());
        source.container = true;
        let runner = Runner::new(Reader::All, None, None);
        let e = pull(&source, &runner).unwrap_err();
        assert!(e.to_string().contains("not a cloud image"), "{e}");
        assert!(runner.calls().is_empty());
    }
}
