//! HTTP/1.1 as `serve` speaks it: request heads read under a size limit and
//! two deadlines and parsed by `httparse`; byte ranges; entity-tag
//! validators; response heads; HTTP dates; percent-decoding.

use std::fmt::Write as _;
use std::io::{self, Read};
use std::net::TcpStream;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rustix::event::{PollFd, PollFlags, Timespec};
use rustix::io::Errno;
use rustix::net::SendFlags;

/// Largest request head accepted (request line and headers); past it, `431`.
pub const MAX_HEAD: usize = 16 << 10;
/// Most header fields in a request head.
const MAX_HEADERS: usize = 64;
/// How often a wait for bytes looks at the stop flag.
const SLICE: Duration = Duration::from_millis(200);

/// A parsed request head.
#[derive(Debug)]
pub struct Request {
    pub method: String,
    /// The request target as sent (not decoded).
    pub target: String,
    /// `1` for HTTP/1.1, `0` for HTTP/1.0.
    pub minor: u8,
    headers: Vec<(String, Vec<u8>)>,
}

impl Request {
    /// The first field called `name`, as text with surrounding blanks cut.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .and_then(|(_, v)| std::str::from_utf8(v).ok())
            .map(str::trim)
    }

    /// Whether the connection may carry another request after this one.
    pub fn keep_alive(&self) -> bool {
        let tokens = self.header("connection").unwrap_or("").to_ascii_lowercase();
        let has = |t: &str| tokens.split(',').any(|x| x.trim() == t);
        if self.minor >= 1 {
            !has("close")
        } else {
            has("keep-alive")
        }
    }

    /// Whether a body follows the head (GET and HEAD have none; a request
    /// that sends one is answered and its connection closed).
    pub fn has_body(&self) -> bool {
        self.header("transfer-encoding").is_some()
            || self
                .header("content-length")
                .is_some_and(|v| v.parse::<u64>() != Ok(0))
    }
}

/// Why no request head was read.
#[derive(Debug)]
pub enum HeadError {
    /// The peer closed, or sent nothing before the idle timeout, or the
    /// server is stopping: leave quietly.
    Gone,
    /// The head did not arrive whole within the head timeout (`408`).
    Slow,
    /// Longer than [`MAX_HEAD`] or too many fields (`431`).
    TooLarge,
    /// Not HTTP/1.x (`400`).
    Malformed(String),
}

/// Reads request heads from one connection, keeping whatever follows a head
/// (a pipelined request) for the next call.
pub struct HeadReader {
    buf: Vec<u8>,
    filled: usize,
}

impl Default for HeadReader {
    fn default() -> Self {
        HeadReader {
            buf: vec![0; MAX_HEAD],
            filled: 0,
        }
    }
}

impl HeadReader {
    /// The next request head from `sock` (non-blocking). Waits up to `idle`
    /// for its first byte and `whole` from there for the rest; `stop` ends a
    /// wait for a first byte.
    pub fn read(
        &mut self,
        sock: &TcpStream,
        idle: Duration,
        whole: Duration,
        stop: &AtomicBool,
    ) -> Result<Request, HeadError> {
        let mut deadline = Instant::now() + if self.filled == 0 { idle } else { whole };
        loop {
            if self.filled > 0 {
                match parse(&self.buf[..self.filled])? {
                    Some((request, used)) => {
                        self.buf.copy_within(used..self.filled, 0);
                        self.filled -= used;
                        return Ok(request);
                    }
                    None if self.filled == self.buf.len() => return Err(HeadError::TooLarge),
                    None => {}
                }
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(if self.filled == 0 {
                    HeadError::Gone
                } else {
                    HeadError::Slow
                });
            }
            if self.filled == 0 && stop.load(Ordering::Relaxed) {
                return Err(HeadError::Gone);
            }
            if !wait(sock, PollFlags::IN, (deadline - now).min(SLICE)) {
                continue;
            }
            let was_empty = self.filled == 0;
            match (&*sock).read(&mut self.buf[self.filled..]) {
                Ok(0) if was_empty => return Err(HeadError::Gone),
                Ok(0) => return Err(HeadError::Malformed("closed inside a request head".into())),
                Ok(n) => {
                    self.filled += n;
                    if was_empty {
                        deadline = Instant::now() + whole;
                    }
                }
                Err(e) if retry(&e) => {}
                Err(_) => return Err(HeadError::Gone),
            }
        }
    }
}

fn retry(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
    )
}

/// Parse a complete head at the start of `bytes`: the request and the bytes
/// it took, or `None` when more are needed.
fn parse(bytes: &[u8]) -> Result<Option<(Request, usize)>, HeadError> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut fields);
    match req.parse(bytes) {
        Ok(httparse::Status::Complete(used)) => Ok(Some((
            Request {
                method: req.method.unwrap_or_default().to_owned(),
                target: req.path.unwrap_or_default().to_owned(),
                minor: req.version.unwrap_or(1),
                headers: req
                    .headers
                    .iter()
                    .map(|h| (h.name.to_owned(), h.value.to_owned()))
                    .collect(),
            },
            used,
        ))),
        Ok(httparse::Status::Partial) => Ok(None),
        Err(httparse::Error::TooManyHeaders) => Err(HeadError::TooLarge),
        Err(e) => Err(HeadError::Malformed(e.to_string())),
    }
}

/// Wait up to `timeout` until `sock` is ready for `events` (or has an error
/// or hang-up to report, which the next call then returns).
pub fn wait(sock: &impl AsFd, events: PollFlags, timeout: Duration) -> bool {
    let mut fds = [PollFd::new(sock, events)];
    let ts = Timespec {
        tv_sec: timeout.as_secs() as i64,
        tv_nsec: i64::from(timeout.subsec_nanos()),
    };
    matches!(rustix::event::poll(&mut fds, Some(&ts)), Ok(n) if n > 0)
}

/// Send all of `bytes` on a non-blocking socket, waiting at most `timeout`
/// for room each time it is full. `more`: a body follows at once (the head
/// then shares a packet with its first bytes).
pub fn send_all(
    sock: &TcpStream,
    mut bytes: &[u8],
    more: bool,
    timeout: Duration,
) -> io::Result<()> {
    let flags = if more {
        SendFlags::MORE | SendFlags::NOSIGNAL
    } else {
        SendFlags::NOSIGNAL
    };
    while !bytes.is_empty() {
        match rustix::net::send(sock, bytes, flags) {
            Ok(n) => bytes = &bytes[n..],
            Err(Errno::INTR) => {}
            Err(Errno::AGAIN) => {
                if !wait(sock, PollFlags::OUT, timeout) {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the client took nothing within the send timeout",
                    ));
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// What a `Range` header asks of a body of `total` bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ranged {
    /// No usable range (none, another unit, malformed, several): the whole body.
    Whole,
    /// `len` bytes from `start`: `206`.
    Part { start: u64, len: u64 },
    /// Nothing of the body is in the range: `416`.
    Unsatisfiable,
}

/// Interpret a `Range` header: `bytes=A-B`, `bytes=A-`, `bytes=-N`. Several
/// ranges get the whole body (allowed by RFC 9110); a malformed one is
/// ignored, as the RFC asks.
pub fn parse_range(header: Option<&str>, total: u64) -> Ranged {
    let Some(h) = header else {
        return Ranged::Whole;
    };
    let Some((unit, spec)) = h.split_once('=') else {
        return Ranged::Whole;
    };
    if !unit.trim().eq_ignore_ascii_case("bytes") || spec.contains(',') {
        return Ranged::Whole;
    }
    let Some((a, b)) = spec.trim().split_once('-') else {
        return Ranged::Whole;
    };
    let (a, b) = (a.trim(), b.trim());
    let number = |s: &str| -> Option<u64> {
        (!s.is_empty() && s.bytes().all(|c| c.is_ascii_digit()))
            .then(|| s.parse::<u64>().unwrap_or(u64::MAX))
    };
    match (a.is_empty(), number(a), number(b)) {
        // -N: the last N bytes.
        (true, _, Some(n)) => {
            if n == 0 || total == 0 {
                Ranged::Unsatisfiable
            } else {
                let len = n.min(total);
                Ranged::Part {
                    start: total - len,
                    len,
                }
            }
        }
        (false, Some(start), end) if b.is_empty() || end.is_some() => {
            if end.is_some_and(|e| e < start) {
                return Ranged::Whole;
            }
            if start >= total {
                return Ranged::Unsatisfiable;
            }
            let last = end.unwrap_or(u64::MAX).min(total - 1);
            Ranged::Part {
                start,
                len: last - start + 1,
            }
        }
        _ => Ranged::Whole,
    }
}

/// `If-None-Match`: whether `list` (`*` or entity tags) names `etag`, by the
/// weak comparison the RFC prescribes for it.
pub fn none_match(list: &str, etag: &str) -> bool {
    let bare = |t: &str| t.trim().trim_start_matches("W/").to_owned();
    list.trim() == "*" || list.split(',').any(|t| bare(t) == bare(etag))
}

/// `If-Range`: the range applies only when the validator is our strong
/// entity tag or exactly our `Last-Modified` date.
pub fn if_range_holds(value: &str, etag: &str, last_modified: &str) -> bool {
    let v = value.trim();
    v == etag || v == last_modified
}

/// A response head under construction.
pub struct Head {
    status: u16,
    fields: String,
}

impl Head {
    pub fn new(status: u16) -> Head {
        let mut fields = String::new();
        let _ = write!(
            fields,
            "Date: {}\r\nServer: cloudimg\r\n",
            http_date(SystemTime::now())
        );
        Head { status, fields }
    }

    pub fn status(&self) -> u16 {
        self.status
    }

    pub fn field(mut self, name: &str, value: impl std::fmt::Display) -> Head {
        let _ = write!(self.fields, "{name}: {value}\r\n");
        self
    }

    /// The head's bytes; `close` adds `Connection: close`.
    pub fn render(&self, close: bool) -> Vec<u8> {
        let mut s = format!("HTTP/1.1 {} {}\r\n", self.status, reason(self.status));
        s.push_str(&self.fields);
        if close {
            s.push_str("Connection: close\r\n");
        }
        s.push_str("\r\n");
        s.into_bytes()
    }
}

pub fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        206 => "Partial Content",
        304 => "Not Modified",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        416 => "Range Not Satisfiable",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

/// An IMF-fixdate: `Sun, 06 Nov 1994 08:49:37 GMT`.
pub fn http_date(t: SystemTime) -> String {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, d) = civil(days);
    const WEEKDAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    format!(
        "{}, {:02} {} {} {:02}:{:02}:{:02} GMT",
        WEEKDAYS[days.rem_euclid(7) as usize],
        d,
        MONTHS[(m - 1) as usize],
        y,
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Year, month (1–12) and day of a count of days since 1970-01-01, in the
/// proleptic Gregorian calendar (the era arithmetic of H. Hinnant's
/// `civil_from_days`).
fn civil(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// Decode `%XX` escapes; `None` for a malformed escape.
pub fn percent_decode(s: &str) -> Option<Vec<u8>> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            let hex = std::str::from_utf8(hex).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        let t = 1000;
        let part = |start, len| Ranged::Part { start, len };
        assert_eq!(parse_range(None, t), Ranged::Whole);
        assert_eq!(parse_range(Some("bytes=0-99"), t), part(0, 100));
        assert_eq!(parse_range(Some("bytes=990-"), t), part(990, 10));
        assert_eq!(parse_range(Some("bytes=990-5000"), t), part(990, 10));
        assert_eq!(parse_range(Some("bytes=-10"), t), part(990, 10));
        assert_eq!(parse_range(Some("bytes=-5000"), t), part(0, 1000));
        assert_eq!(parse_range(Some("bytes=999-999"), t), part(999, 1));
        assert_eq!(parse_range(Some("bytes=1000-"), t), Ranged::Unsatisfiable);
        assert_eq!(parse_range(Some("bytes=-0"), t), Ranged::Unsatisfiable);
        assert_eq!(
            parse_range(Some("bytes=99999999999999999999999-"), t),
            Ranged::Unsatisfiable
        );
        assert_eq!(parse_range(Some("bytes=5-1"), t), Ranged::Whole);
        assert_eq!(parse_range(Some("bytes=0-1,5-6"), t), Ranged::Whole);
        assert_eq!(parse_range(Some("items=0-1"), t), Ranged::Whole);
        assert_eq!(parse_range(Some("bytes=a-b"), t), Ranged::Whole);
        assert_eq!(parse_range(Some("bytes=-"), t), Ranged::Whole);
        assert_eq!(parse_range(Some("bytes=0-"), 0), Ranged::Unsatisfiable);
    }

    #[test]
    fn validators() {
        let etag = "\"sha256:ab\"";
        assert!(none_match("\"sha256:ab\"", etag));
        assert!(none_match("W/\"sha256:ab\", \"x\"", etag));
        assert!(none_match("*", etag));
        assert!(!none_match("\"sha256:cd\"", etag));
        let lm = "Sun, 06 Nov 1994 08:49:37 GMT";
        assert!(if_range_holds(etag, etag, lm));
        assert!(if_range_holds(lm, etag, lm));
        assert!(!if_range_holds("W/\"sha256:ab\"", etag, lm));
        assert!(!if_range_holds("\"other\"", etag, lm));
    }

    #[test]
    fn dates() {
        let t = UNIX_EPOCH + Duration::from_secs(784_111_777);
        assert_eq!(http_date(t), "Sun, 06 Nov 1994 08:49:37 GMT");
        assert_eq!(http_date(UNIX_EPOCH), "Thu, 01 Jan 1970 00:00:00 GMT");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(http_date(leap), "Tue, 29 Feb 2000 00:00:00 GMT");
    }

    #[test]
    fn heads_parse_and_refuse() {
        let (r, used) = parse(b"GET /dl/x HTTP/1.1\r\nHost: a\r\nRange: bytes=0-1\r\n\r\nGET")
            .unwrap()
            .unwrap();
        assert_eq!(used, 49);
        assert_eq!(r.method, "GET");
        assert_eq!(r.header("range"), Some("bytes=0-1"));
        assert!(r.keep_alive());
        assert!(parse(b"GET /x HTTP/1.1\r\nHost").unwrap().is_none());
        assert!(matches!(
            parse(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"),
            Err(HeadError::Malformed(_))
        ));
        let many: String = (0..80).map(|i| format!("X-{i}: y\r\n")).collect();
        let head = format!("GET / HTTP/1.1\r\n{many}\r\n");
        assert!(matches!(parse(head.as_bytes()), Err(HeadError::TooLarge)));
        let (r, _) = parse(b"GET / HTTP/1.0\r\n\r\n").unwrap().unwrap();
        assert!(!r.keep_alive());
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a%2e%2E/b").unwrap(), b"a../b");
        assert_eq!(percent_decode("%00").unwrap(), b"\0");
        assert!(percent_decode("%2").is_none());
        assert!(percent_decode("%zz").is_none());
    }
}
