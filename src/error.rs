//! The one error type of the library.
//!
//! Every variant renders as a single line that names what went wrong and
//! where, because the binary prints exactly one `cloudimg: …` line per failure.

use std::fmt;
use std::io;

/// Result alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// How a network failure came about, as far as it decides whether the
/// other end is worth asking again: a mirror that cannot be reached or
/// stops answering is not asked again in the run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NetFault {
    /// No connection: refused, unreachable, no such host, no TCP or TLS
    /// handshake in time, or no TLS at all where TLS was asked for.
    Unreachable,
    /// Connected, then nothing (or too little) arrived within the stall
    /// timeout.
    Stalled,
    /// Anything else: a connection closed or reset, a protocol error.
    Lost,
}

/// Everything that can go wrong while resolving, streaming or importing an image.
#[derive(Debug)]
pub enum Error {
    /// A SOURCE string that does not parse.
    Reference(String),
    /// A digest string that is not `sha256:` + 64 hex or `sha512:` + 128 hex.
    Digest(String),
    /// A manifest or index that cannot be used (malformed, oversized, wrong kind…).
    Manifest(String),
    /// Something requested that the source does not hold (tag, blob, manifest).
    NotFound(String),
    /// A blob whose bytes are not what its descriptor promises.
    Integrity(String),
    /// The consumer stopped reading (EPIPE).
    BrokenPipe(String),
    /// The run was stopped by a signal; the number is the signal.
    Interrupted(i32),
    /// The `cocoon image import` child failed.
    Child(String),
    /// An operating-system error, with what we were doing at the time.
    Io {
        /// What was being attempted.
        context: String,
        /// What the system said.
        source: io::Error,
    },
    /// A server answered a request with a status that ends it (404 is
    /// [`Error::NotFound`]).
    Http {
        /// The URL asked, fit for display (see the registry's `redact`).
        url: String,
        /// The status code.
        status: u16,
        /// What the status means here, when there is more to say than its
        /// reason phrase (`again after authenticating: access refused`).
        detail: Option<String>,
        /// Retries spent on the request before giving up.
        retries: u32,
    },
    /// The network failed: no connection, a connection lost, a stall.
    Network {
        /// What was being done (`GET URL`, `connection lost at byte N`).
        what: String,
        /// What went wrong.
        cause: String,
        /// Whether the other end was reached at all, and answered.
        fault: NetFault,
        /// Retries spent before giving up.
        retries: u32,
    },
    /// A command line that cannot work: an unknown or missing argument, a
    /// flag value out of range (exit status 2).
    Usage(String),
    /// A setting from the environment or a configuration file that cannot
    /// be used (`CLOUDIMG_MIRRORS`, `EPOCH_CA_CERT`, the docker config…).
    Config(String),
    /// Another error, with what was being done when it happened: shown as
    /// `context: error`. Made by [`Error::context`].
    Context {
        /// What was being done, or which thing it was about.
        context: String,
        /// The error itself.
        error: Box<Error>,
    },
    /// Anything else worth one clear line (a refused output, a server
    /// answer that makes no sense…).
    Other(String),
}

/// How a blob's size was found to differ from what its descriptor says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SizeSeen {
    /// Its bytes ended after this many.
    EndedAfter(u64),
    /// Its bytes went on past the size.
    GoesOn,
    /// Its file has this many bytes.
    File(u64),
    /// The server says it has this many bytes (`Content-Length`,
    /// `Content-Range`).
    Server(u64),
}

impl Error {
    /// An I/O error annotated with what was being attempted.
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        if source.kind() == io::ErrorKind::BrokenPipe {
            return Error::BrokenPipe(context.into());
        }
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// `what: self` — the one way context is added to an error. A signal
    /// is told as it is: "interrupted by SIGINT" needs no context.
    pub fn context(self, what: impl Into<String>) -> Self {
        match self {
            e @ Error::Interrupted(_) => e,
            e => Error::Context {
                context: what.into(),
                error: Box::new(e),
            },
        }
    }

    /// The error under every added context.
    pub fn root(&self) -> &Error {
        match self {
            Error::Context { error, .. } => error.root(),
            e => e,
        }
    }

    /// A failed request that was retried `retries` times: the error says
    /// it gave up.
    pub(crate) fn gave_up_after(mut self, retries: u32) -> Self {
        let mut e = &mut self;
        while let Error::Context { error, .. } = e {
            e = error;
        }
        if let Error::Http { retries: r, .. } | Error::Network { retries: r, .. } = e {
            *r = retries;
        }
        self
    }

    /// A blob whose size is not `size`, as `seen`; `label` names it. The
    /// one wording of every truncated or oversized blob.
    pub(crate) fn blob_size(label: &str, size: u64, seen: SizeSeen) -> Self {
        let how = |actual: u64| {
            if actual < size {
                "truncated"
            } else {
                "oversized"
            }
        };
        let (how, detail) = match seen {
            SizeSeen::EndedAfter(got) => {
                ("truncated", format!("ended after {got} of {size} bytes"))
            }
            SizeSeen::GoesOn => ("oversized", format!("more than the expected {size} bytes")),
            SizeSeen::File(len) => (
                how(len),
                format!("expected {size} bytes, actual {len} bytes"),
            ),
            SizeSeen::Server(len) => (
                how(len),
                format!("the server has {len} bytes, the manifest says {size}"),
            ),
        };
        Error::Integrity(format!("{label}: blob is {how}: {detail}"))
    }

    /// A blob that ended after `got` of its `size` bytes.
    pub(crate) fn truncated(label: &str, got: u64, size: u64) -> Self {
        Error::blob_size(label, size, SizeSeen::EndedAfter(got))
    }

    /// A blob that goes on past its `size` bytes.
    pub(crate) fn oversized(label: &str, size: u64) -> Self {
        Error::blob_size(label, size, SizeSeen::GoesOn)
    }

    /// A read error of a blob read through `io::Read`. Sources that speak
    /// `io::Read` carry this crate's own errors (which name the layer
    /// already) inside `io::Error` (see the `From` impl below); those come
    /// back out unchanged. Other I/O errors get the layer's label.
    pub(crate) fn from_read(label: &str, e: io::Error) -> Self {
        match e.get_ref().is_some_and(|inner| inner.is::<Error>()) {
            true => *e
                .into_inner()
                .and_then(|inner| inner.downcast::<Error>().ok())
                .expect("checked above"),
            false => Error::io(format!("{label}: reading"), e),
        }
    }

    /// The process exit status a script sees for this error.
    pub fn exit_code(&self) -> i32 {
        match self.root() {
            Error::Interrupted(sig) => 128 + sig,
            Error::Usage(_) => 2,
            _ => 1,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Reference(m) => write!(f, "bad source reference: {m}"),
            Error::Digest(m) => write!(f, "bad digest: {m}"),
            Error::Manifest(m) => write!(f, "{m}"),
            Error::NotFound(m) => write!(f, "not found: {m}"),
            Error::Integrity(m) => write!(f, "{m}"),
            Error::BrokenPipe(m) => write!(f, "{m}: output closed by the reader (broken pipe)"),
            Error::Interrupted(sig) => write!(f, "interrupted by {}", signal_name(*sig)),
            Error::Child(m) => write!(f, "{m}"),
            Error::Io { context, source } => write!(f, "{context}: {source}"),
            Error::Http {
                url,
                status,
                detail,
                retries,
            } => {
                write!(f, "GET {url}: HTTP {status}")?;
                if let Some(reason) = reason_phrase(*status) {
                    write!(f, " {reason}")?;
                }
                if let Some(detail) = detail {
                    write!(f, " {detail}")?;
                }
                gave_up(f, *retries)
            }
            Error::Network {
                what,
                cause,
                retries,
                ..
            } => {
                write!(f, "{what}: {cause}")?;
                gave_up(f, *retries)
            }
            Error::Usage(m) | Error::Config(m) | Error::Other(m) => write!(f, "{m}"),
            Error::Context { context, error } => write!(f, "{context}: {error}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io { source, .. } => Some(source),
            Error::Context { error, .. } => Some(&**error),
            _ => None,
        }
    }
}

/// Carries this crate's error through `io::Read`; `Error::from_read` takes
/// it back out.
impl From<Error> for io::Error {
    fn from(e: Error) -> io::Error {
        io::Error::other(e)
    }
}

/// `(gave up after N retries)`, when any were spent.
fn gave_up(f: &mut fmt::Formatter<'_>, retries: u32) -> fmt::Result {
    match retries {
        0 => Ok(()),
        n => write!(f, " (gave up after {n} retries)"),
    }
}

/// The reason phrase of a status code (`Too Many Requests`).
fn reason_phrase(status: u16) -> Option<&'static str> {
    ureq::http::StatusCode::from_u16(status)
        .ok()?
        .canonical_reason()
}

fn signal_name(sig: i32) -> String {
    match sig {
        2 => "SIGINT".into(),
        15 => "SIGTERM".into(),
        1 => "SIGHUP".into(),
        n => format!("signal {n}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn context_is_a_prefix_and_signals_stay_bare() {
        let e = Error::NotFound("GET u: HTTP 404".into()).context("layer \"a\"");
        assert_eq!(e.to_string(), "layer \"a\": not found: GET u: HTTP 404");
        assert!(matches!(e.root(), Error::NotFound(_)));
        let e = Error::Interrupted(2).context("x").context("y");
        assert_eq!(e.to_string(), "interrupted by SIGINT");
        assert_eq!(e.exit_code(), 130);
        assert_eq!(Error::Usage("u".into()).context("c").exit_code(), 2);
        assert_eq!(Error::Config("c".into()).exit_code(), 1);
    }

    #[test]
    fn requests_say_their_status_and_the_retries_spent() {
        let e = Error::Http {
            url: "http://r/v2/x".into(),
            status: 429,
            detail: None,
            retries: 0,
        };
        assert_eq!(
            e.to_string(),
            "GET http://r/v2/x: HTTP 429 Too Many Requests"
        );
        let e = e.context("token realm http://r").gave_up_after(2);
        assert_eq!(
            e.to_string(),
            "token realm http://r: GET http://r/v2/x: HTTP 429 Too Many Requests \
             (gave up after 2 retries)"
        );
        let e = Error::Network {
            what: "connection lost at byte 7".into(),
            cause: "reset".into(),
            fault: NetFault::Lost,
            retries: 1,
        };
        assert_eq!(
            e.to_string(),
            "connection lost at byte 7: reset (gave up after 1 retries)"
        );
    }

    #[test]
    fn every_wrong_size_is_truncated_or_oversized() {
        let cases = [
            (
                SizeSeen::EndedAfter(3),
                "x: blob is truncated: ended after 3 of 5 bytes",
            ),
            (
                SizeSeen::GoesOn,
                "x: blob is oversized: more than the expected 5 bytes",
            ),
            (
                SizeSeen::File(4),
                "x: blob is truncated: expected 5 bytes, actual 4 bytes",
            ),
            (
                SizeSeen::File(6),
                "x: blob is oversized: expected 5 bytes, actual 6 bytes",
            ),
            (
                SizeSeen::Server(4),
                "x: blob is truncated: the server has 4 bytes, the manifest says 5",
            ),
            (
                SizeSeen::Server(9),
                "x: blob is oversized: the server has 9 bytes, the manifest says 5",
            ),
        ];
        for (seen, want) in cases {
            let e = Error::blob_size("x", 5, seen);
            assert!(matches!(e, Error::Integrity(_)));
            assert_eq!(e.to_string(), want);
        }
    }

    #[test]
    fn errors_come_back_out_of_io_read_unchanged() {
        let io: io::Error = Error::truncated("x", 1, 2).into();
        let e = Error::from_read("y", io);
        assert_eq!(
            e.to_string(),
            "x: blob is truncated: ended after 1 of 2 bytes"
        );
        let e = Error::from_read("y", io::Error::from(io::ErrorKind::UnexpectedEof));
        assert!(e.to_string().starts_with("y: reading: "), "{e}");
    }
}
