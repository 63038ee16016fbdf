//! The one error type of the library.
//!
//! Every variant renders as a single line that names what went wrong and
//! where, because the binary prints exactly one `cloudimg: …` line per failure.

use std::fmt;
use std::io;

/// Result alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

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
    /// Anything else worth one clear line (bad option combination, terminal output…).
    Other(String),
}

impl Error {
    /// An I/O error annotated with what was being attempted.
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        if source.kind() == io::ErrorKind::BrokenPipe {
            return Error::BrokenPipe(context.into());
        }
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// A blob that ended after `got` of its `size` bytes.
    pub fn truncated(label: &str, got: u64, size: u64) -> Self {
        Error::Integrity(format!(
            "{label}: blob is truncated: ended after {got} of {size} bytes"
        ))
    }

    /// A blob that goes on past its `size` bytes.
    pub fn oversized(label: &str, size: u64) -> Self {
        Error::Integrity(format!(
            "{label}: blob is oversized: more than the expected {size} bytes"
        ))
    }

    /// A read error of a blob read through `io::Read`. Sources that speak
    /// `io::Read` carry this crate's own errors (which name the layer
    /// already) inside `io::Error` (see the `From` impl below); those come
    /// back out unchanged. Other I/O errors get the layer's label.
    pub fn from_read(label: &str, e: io::Error) -> Self {
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
        match self {
            Error::Interrupted(sig) => 128 + sig,
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
            Error::Other(m) => write!(f, "{m}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// Carries this crate's error through `io::Read`; [`Error::from_read`]
/// takes it back out.
impl From<Error> for io::Error {
    fn from(e: Error) -> io::Error {
        io::Error::other(e)
    }
}

fn signal_name(sig: i32) -> String {
    match sig {
        2 => "SIGINT".into(),
        15 => "SIGTERM".into(),
        1 => "SIGHUP".into(),
        n => format!("signal {n}"),
    }
}
