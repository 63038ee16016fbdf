//! `cloudimg serve`: a directory of OCI image layouts over HTTP/1.1 — the
//! assembled disks under `/dl/NAME` (epoch's download route, with
//! `Content-Length`, `HEAD`, `Range` and `ETag`) and a read-only OCI
//! distribution view under `/v2/`.
//!
//! Blocking and thread-per-connection: the accepting thread hands each
//! connection to a thread of its own (at most `--max-connections`; past
//! that, `503` with `Retry-After`). A connection reads request heads under a
//! size limit and two deadlines ([`http::HeadReader`]), answers each
//! ([`dl`], [`v2`]), and moves body bytes from blob files into its socket
//! with `sendfile` ([`body`]), never sending as good a byte that is not known
//! to be the byte that was hashed ([`verdicts`]).
//!
//! A body send has a deadline that every chunk moves forward; a reaper
//! thread shuts down the socket of a connection whose deadline passed (a
//! reader that stopped reading), which ends its blocked call and frees the
//! thread. SIGINT/SIGTERM stop the accepting; running responses get
//! `--grace` seconds to finish, then their sockets are shut down the same
//! way. A second signal skips the grace.

mod body;
mod dl;
pub mod http;
mod image;
pub mod names;
mod v2;
pub mod verdicts;

use std::collections::HashMap;
use std::io::Read;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nix::sys::signal::{SigSet, SigmaskHow, Signal};
use rustix::net::Shutdown;

use crate::error::{Error, Result};
use crate::inspect::clean;
use body::{Body, Env};
use http::{Head, HeadError, HeadReader, Ranged, Request};
use image::Fail;
use names::{Root, Route};
use verdicts::Verdicts;

/// How to serve.
#[derive(Clone, Debug)]
pub struct Config {
    pub root: PathBuf,
    pub listen: String,
    pub max_connections: usize,
    /// Check digests (`--no-verify` turns this off, for trusted storage).
    pub verify: bool,
    /// Let the kernel move bytes (`CLOUDIMG_IO=readwrite` says no).
    pub kernel: bool,
    /// From a request head's first byte to its end.
    pub head_timeout: Duration,
    /// A kept-alive connection waiting for its next request.
    pub idle_timeout: Duration,
    /// A response that moves no byte for this long is dropped.
    pub send_timeout: Duration,
    /// After SIGINT/SIGTERM, how long running responses may go on.
    pub grace: Duration,
    /// The verdict file (default: `ROOT/.cloudimg-serve-verdicts`).
    pub state: Option<PathBuf>,
}

/// The verdict file's default name under the root.
pub const STATE_FILE: &str = ".cloudimg-serve-verdicts";
/// Connections turned away at once while the server is full; past this
/// they are closed without a word.
const MAX_REJECTING: usize = 16;

/// A connection as the reaper sees it.
struct Slot {
    fd: RawFd,
    /// Milliseconds since the server started after which the socket is shut
    /// down; 0 while no body is being sent.
    deadline: AtomicU64,
    /// The reaper shut the socket down.
    cut: AtomicBool,
}

struct Server {
    config: Config,
    root: Root,
    verdicts: Verdicts,
    conns: Mutex<HashMap<u64, Arc<Slot>>>,
    next_id: AtomicU64,
    rejecting: AtomicUsize,
    /// No new connections or requests; running responses go on.
    stopping: AtomicBool,
    /// Every socket is shut down, hashing ends.
    hard_stop: AtomicBool,
    started: Instant,
}

impl Server {
    fn conns(&self) -> MutexGuard<'_, HashMap<u64, Arc<Slot>>> {
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64 + 1
    }

    fn env(&self) -> Env<'_> {
        Env {
            verify: self.config.verify,
            kernel: self.config.kernel,
            verdicts: &self.verdicts,
            stop: &self.hard_stop,
        }
    }
}

/// Run the server until SIGINT or SIGTERM.
pub fn run(config: Config) -> Result<()> {
    let root = Root::open(&config.root)
        .map_err(|e| Error::io(format!("--root {}", config.root.display()), e))?;
    let state = config
        .state
        .clone()
        .unwrap_or_else(|| config.root.join(STATE_FILE));
    let (verdicts, note) = Verdicts::load(Some(state));
    let listener = TcpListener::bind(&config.listen)
        .map_err(|e| Error::io(format!("listening on {}", config.listen), e))?;
    let addr = listener
        .local_addr()
        .map_err(|e| Error::io("listening", e))?;
    // Every thread started from here on inherits the blocked signals; one
    // thread waits for them.
    let signals = SigSet::from_iter([Signal::SIGINT, Signal::SIGTERM]);
    nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&signals), None)
        .map_err(|e| Error::io("blocking signals", e.into()))?;
    let names = root.names();
    eprintln!(
        "cloudimg serve: listening on http://{addr}/ (root {}{}; {} image{}: {}); {note}",
        config.root.display(),
        if config.verify {
            ""
        } else {
            ", digests NOT verified"
        },
        names.len(),
        if names.len() == 1 { "" } else { "s" },
        if names.is_empty() {
            "none yet".to_owned()
        } else {
            names.join(", ")
        }
    );
    let server = Arc::new(Server {
        config,
        root,
        verdicts,
        conns: Mutex::default(),
        next_id: AtomicU64::new(1),
        rejecting: AtomicUsize::new(0),
        stopping: AtomicBool::new(false),
        hard_stop: AtomicBool::new(false),
        started: Instant::now(),
    });
    let listener = Arc::new(listener);
    {
        let (server, listener) = (Arc::clone(&server), Arc::clone(&listener));
        std::thread::Builder::new()
            .name("serve-signals".into())
            .spawn(move || wait_for_signals(&server, &listener, signals))
            .map_err(|e| Error::io("starting the signal thread", e))?;
    }
    {
        let server = Arc::clone(&server);
        std::thread::Builder::new()
            .name("serve-reaper".into())
            .spawn(move || reap(&server))
            .map_err(|e| Error::io("starting the reaper thread", e))?;
    }
    accept_loop(&server, &listener);
    server.stopping.store(true, Ordering::SeqCst);
    let running = |s: &Server| s.conns().len();
    let until = Instant::now() + server.config.grace;
    while running(&server) > 0 && Instant::now() < until && !server.hard_stop.load(Ordering::SeqCst)
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    server.hard_stop.store(true, Ordering::SeqCst);
    let until = Instant::now() + Duration::from_secs(5);
    while running(&server) > 0 && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!(
        "cloudimg serve: stopped ({} connection{} cut)",
        running(&server),
        if running(&server) == 1 { "" } else { "s" }
    );
    Ok(())
}

fn wait_for_signals(server: &Server, listener: &TcpListener, signals: SigSet) {
    loop {
        let Ok(sig) = signals.wait() else { continue };
        if server.stopping.swap(true, Ordering::SeqCst) {
            eprintln!("cloudimg serve: {sig} again: closing every connection now");
            server.hard_stop.store(true, Ordering::SeqCst);
            continue;
        }
        eprintln!(
            "cloudimg serve: {sig}: no new connections; {} running, {} s to finish",
            server.conns().len(),
            server.config.grace.as_secs()
        );
        // Ends the blocked accept (EINVAL), the accept loop sees `stopping`.
        let _ = rustix::net::shutdown(listener, Shutdown::Read);
    }
}

/// Shut down the sockets whose send deadline has passed, and all of them
/// once the server stops for good.
fn reap(server: &Server) {
    loop {
        std::thread::sleep(Duration::from_millis(100));
        let now = server.now_ms();
        let hard = server.hard_stop.load(Ordering::SeqCst);
        // Under the lock: a connection leaves the map before its fd closes,
        // so every fd here is still its own.
        for slot in server.conns().values() {
            let deadline = slot.deadline.load(Ordering::SeqCst);
            if hard || (deadline != 0 && now > deadline) {
                slot.cut.store(true, Ordering::SeqCst);
                // SAFETY: the fd is open while its slot is in the map.
                let fd = unsafe { BorrowedFd::borrow_raw(slot.fd) };
                let _ = rustix::net::shutdown(fd, Shutdown::Both);
            }
        }
    }
}

fn accept_loop(server: &Arc<Server>, listener: &TcpListener) {
    loop {
        let (stream, peer) = match listener.accept() {
            Ok(c) => c,
            Err(_) if server.stopping.load(Ordering::SeqCst) => return,
            Err(e) => {
                // Out of fds or memory: back off instead of spinning.
                eprintln!("cloudimg serve: accepting: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        if server.stopping.load(Ordering::SeqCst) {
            return;
        }
        let id = server.next_id.fetch_add(1, Ordering::Relaxed);
        let slot = Arc::new(Slot {
            fd: stream.as_raw_fd(),
            deadline: AtomicU64::new(0),
            cut: AtomicBool::new(false),
        });
        {
            let mut conns = server.conns();
            if conns.len() >= server.config.max_connections {
                drop(conns);
                reject(server, stream, peer);
                continue;
            }
            conns.insert(id, Arc::clone(&slot));
        }
        let s = Arc::clone(server);
        let spawned = std::thread::Builder::new()
            .name("serve-conn".into())
            .stack_size(256 << 10)
            .spawn(move || {
                connection(&s, &stream, peer, &slot);
                // Out of the map before the fd closes (see `reap`).
                s.conns().remove(&id);
                drop(stream);
            });
        if spawned.is_err() {
            server.conns().remove(&id);
        }
    }
}

/// Turn a connection away with `503` and `Retry-After`, on a short-lived
/// thread that reads the request first (so the client sees the answer, not
/// a reset).
fn reject(server: &Arc<Server>, stream: TcpStream, peer: SocketAddr) {
    if server.rejecting.fetch_add(1, Ordering::SeqCst) >= MAX_REJECTING {
        server.rejecting.fetch_sub(1, Ordering::SeqCst);
        return;
    }
    let s = Arc::clone(server);
    let spawned = std::thread::Builder::new()
        .name("serve-reject".into())
        .stack_size(64 << 10)
        .spawn(move || {
            let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
            let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
            let mut buf = [0u8; 4096];
            let _ = (&stream).read(&mut buf);
            let max = s.config.max_connections;
            let body = format!("cloudimg: too many connections (at most {max}); retry\n");
            let head = Head::new(503)
                .field("Retry-After", 1)
                .field("Content-Type", "text/plain; charset=utf-8")
                .field("Content-Length", body.len());
            let mut bytes = head.render(true);
            bytes.extend_from_slice(body.as_bytes());
            let _ = std::io::Write::write_all(&mut &stream, &bytes);
            let _ = stream.shutdown(std::net::Shutdown::Write);
            let _ = (&stream).read(&mut buf);
            eprintln!("{peer} - - 503 0 0.000s (at most {max} connections)");
            s.rejecting.fetch_sub(1, Ordering::SeqCst);
        });
    if spawned.is_err() {
        server.rejecting.fetch_sub(1, Ordering::SeqCst);
    }
}

/// How one request went, for the log line.
pub struct Outcome {
    status: u16,
    bytes: u64,
    note: Option<String>,
    /// The connection must not carry another request.
    close: bool,
}

fn connection(server: &Server, stream: &TcpStream, peer: SocketAddr, slot: &Slot) {
    let _ = stream.set_nonblocking(true);
    let _ = stream.set_nodelay(true);
    let mut reader = HeadReader::default();
    let cfg = &server.config;
    loop {
        let started = Instant::now();
        let request =
            match reader.read(stream, cfg.idle_timeout, cfg.head_timeout, &server.stopping) {
                Ok(r) => r,
                Err(HeadError::Gone) => return,
                Err(e) => {
                    let (status, why) = match e {
                        HeadError::TooLarge => (
                            431,
                            format!("request head larger than {} bytes", http::MAX_HEAD),
                        ),
                        HeadError::Slow => (
                            408,
                            format!(
                                "request head not complete within {} s",
                                cfg.head_timeout.as_secs()
                            ),
                        ),
                        HeadError::Malformed(m) => (400, format!("malformed request head: {m}")),
                        HeadError::Gone => unreachable!(),
                    };
                    let body = format!("cloudimg: {why}\n");
                    let head = Head::new(status)
                        .field("Content-Type", "text/plain; charset=utf-8")
                        .field("Content-Length", body.len());
                    let mut bytes = head.render(true);
                    bytes.extend_from_slice(body.as_bytes());
                    let _ = http::send_all(stream, &bytes, false, Duration::from_secs(1));
                    eprintln!(
                        "{peer} - - {status} 0 {:.3}s ({why})",
                        started.elapsed().as_secs_f64()
                    );
                    return;
                }
            };
        let started = Instant::now();
        let ex = Exchange {
            server,
            sock: stream,
            slot,
            req: &request,
            head_only: request.method == "HEAD",
        };
        let mut outcome = handle(&ex);
        if slot.cut.load(Ordering::SeqCst) {
            outcome.close = true;
            let why = if server.hard_stop.load(Ordering::SeqCst) {
                "server stopping"
            } else {
                "send timeout: the client stopped reading"
            };
            outcome.note = Some(match outcome.note {
                Some(n) => format!("{why}; {n}"),
                None => why.to_owned(),
            });
        }
        eprintln!(
            "{peer} {} {} {} {} {:.3}s{}",
            clean(&request.method),
            clean(&request.target),
            outcome.status,
            outcome.bytes,
            started.elapsed().as_secs_f64(),
            outcome
                .note
                .as_deref()
                .map(|n| format!(" ({})", clean(n)))
                .unwrap_or_default()
        );
        if outcome.close || ex.closing() {
            return;
        }
    }
}

fn handle(ex: &Exchange<'_>) -> Outcome {
    let req = ex.req;
    let v2 = req.target.starts_with("/v2");
    let fail = |fail: Fail| {
        if v2 {
            ex.fail_json(fail)
        } else {
            ex.fail_text(fail)
        }
    };
    if req.method != "GET" && req.method != "HEAD" {
        let mut out = fail(Fail::new(
            405,
            "UNSUPPORTED",
            format!("{} is not served here: read-only (GET, HEAD)", req.method),
        ));
        out.close |= req.has_body();
        return out;
    }
    let route = match names::route(&req.target) {
        Ok(r) => r,
        Err(why) => return fail(Fail::new(400, "NAME_INVALID", why)),
    };
    if req.has_body() {
        let mut out = ex.fail_text(Fail::new(400, "UNSUPPORTED", "GET and HEAD take no body"));
        out.close = true;
        return out;
    }
    match route {
        Route::Disk { name, selector } => dl::disk(ex, &name, &selector),
        Route::V2Base => v2::base(ex),
        Route::Manifest { name, reference } => v2::manifest(ex, &name, &reference),
        Route::Blob { name, digest } => v2::blob(ex, &name, &digest),
        Route::Tags { name } => v2::tags(ex, &name),
        Route::V2Other => ex.fail_json(Fail::new(404, "UNSUPPORTED", "no such endpoint")),
        Route::Unknown => ex.fail_text(Fail::new(
            404,
            "UNSUPPORTED",
            "nothing here: disks are under /dl/NAME, the registry view under /v2/",
        )),
    }
}

/// One request on one connection, and the means to answer it.
pub struct Exchange<'a> {
    server: &'a Server,
    sock: &'a TcpStream,
    slot: &'a Slot,
    req: &'a Request,
    head_only: bool,
}

/// What a request asks of a body, given its validators.
enum Ask {
    NotModified,
    Unsatisfiable,
    Send { status: u16, start: u64, len: u64 },
}

impl Exchange<'_> {
    /// Whether this response ends the connection.
    fn closing(&self) -> bool {
        !self.req.keep_alive() || self.server.stopping.load(Ordering::SeqCst)
    }

    /// `If-None-Match`, `If-Range` and `Range` against a body of `total`
    /// bytes.
    fn ask(&self, total: u64, etag: &str, last_modified: &str) -> Ask {
        if let Some(list) = self.req.header("if-none-match")
            && http::none_match(list, etag)
        {
            return Ask::NotModified;
        }
        let range = match self.req.header("if-range") {
            Some(v) if !http::if_range_holds(v, etag, last_modified) => None,
            _ => self.req.header("range"),
        };
        match http::parse_range(range, total) {
            Ranged::Whole => Ask::Send {
                status: 200,
                start: 0,
                len: total,
            },
            Ranged::Part { start, len } => Ask::Send {
                status: 206,
                start,
                len,
            },
            Ranged::Unsatisfiable => Ask::Unsatisfiable,
        }
    }

    fn send_head(&self, head: &Head, more: bool) -> std::io::Result<()> {
        let closing = self.closing();
        let mut bytes = head.render(closing);
        if !closing && self.req.minor == 0 {
            // An HTTP/1.0 client that asked to keep the connection is told so.
            let at = bytes.len() - 2;
            bytes.splice(at..at, *b"Connection: keep-alive\r\n");
        }
        http::send_all(self.sock, &bytes, more, self.server.config.send_timeout)
    }

    /// A response with a small body from memory (or none, for `HEAD` and
    /// `304`).
    fn reply(&self, head: Head, content_type: &str, body: &[u8]) -> Outcome {
        let status = head.status();
        let head = if status == 304 {
            head
        } else {
            head.field("Content-Type", content_type)
                .field("Content-Length", body.len())
        };
        let send_body = !self.head_only && status != 304 && !body.is_empty();
        let sent = self.send_head(&head, send_body).and_then(|()| {
            if send_body {
                http::send_all(self.sock, body, false, self.server.config.send_timeout)
            } else {
                Ok(())
            }
        });
        Outcome {
            status,
            bytes: if send_body { body.len() as u64 } else { 0 },
            note: sent.err().map(|e| format!("sending: {e}")),
            close: false,
        }
        .closing_on_error()
    }

    /// A plain-text error: one `cloudimg: …` line.
    fn fail_text(&self, fail: Fail) -> Outcome {
        let body = format!("cloudimg: {}\n", fail.message);
        let mut head = Head::new(fail.status);
        if fail.status == 405 {
            head = head.field("Allow", "GET, HEAD");
        }
        if let Some(s) = fail.retry {
            head = head.field("Retry-After", s);
        }
        let mut out = self.reply(head, "text/plain; charset=utf-8", body.as_bytes());
        out.note.get_or_insert(fail.message);
        out
    }

    /// An error in the distribution spec's JSON form.
    fn fail_json(&self, fail: Fail) -> Outcome {
        let body = serde_json::json!({
            "errors": [{"code": fail.code, "message": fail.message, "detail": {}}]
        })
        .to_string();
        let mut head =
            Head::new(fail.status).field("Docker-Distribution-API-Version", "registry/2.0");
        if fail.status == 405 {
            head = head.field("Allow", "GET, HEAD");
        }
        if let Some(s) = fail.retry {
            head = head.field("Retry-After", s);
        }
        let mut out = self.reply(head, "application/json", body.as_bytes());
        out.note.get_or_insert(fail.message);
        out
    }

    /// A head, then (unless `HEAD`) a body from blob files. A body that
    /// fails ends the connection before its `Content-Length` is met.
    fn body(&self, head: Head, body: Body) -> Outcome {
        let status = head.status();
        let server = self.server;
        let arm = || {
            let deadline = server.now_ms() + server.config.send_timeout.as_millis() as u64;
            self.slot.deadline.store(deadline, Ordering::SeqCst);
        };
        arm();
        let more = !self.head_only && body.len() > 0;
        let hashing = body.hashing();
        let mut outcome = match self.send_head(&head, more) {
            Err(e) => Outcome {
                status,
                bytes: 0,
                note: Some(format!("sending the head: {e}")),
                close: true,
            },
            Ok(()) if self.head_only => Outcome {
                status,
                bytes: 0,
                note: None,
                close: false,
            },
            Ok(()) => match body.send(&server.env(), self.sock, &arm) {
                Ok(n) => Outcome {
                    status,
                    bytes: n,
                    note: None,
                    close: false,
                },
                Err((n, e)) => Outcome {
                    status,
                    bytes: n,
                    note: Some(format!("aborted before Content-Length: {e}")),
                    close: true,
                },
            },
        };
        self.slot.deadline.store(0, Ordering::SeqCst);
        if hashing > 0 {
            let hashed = format!(
                "hashed {hashing} blob{}",
                if hashing == 1 { "" } else { "s" }
            );
            outcome.note = Some(match outcome.note {
                Some(n) => format!("{hashed}; {n}"),
                None => hashed,
            });
        }
        outcome
    }
}

impl Outcome {
    fn closing_on_error(mut self) -> Outcome {
        self.close |= self.note.is_some();
        self
    }
}
