//! The HTTP side of the registry source: one blocking `GET` that follows
//! redirects, answers auth challenges and retries what is worth retrying.
//!
//! Redirects are followed here, not by ureq, so that the `Authorization`
//! header is decided per hop by the hop's origin: a token or password is only
//! ever sent to the origin it belongs to, never to the object store or CDN a
//! registry redirects blob downloads to.

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ureq::http::{HeaderMap, StatusCode, Uri};

use super::auth::{Challenge, CredentialStore, Secret, TokenResponse, parse_challenge};
use super::tls;
use crate::error::{Error, NetFault, Result};
use crate::signals;

const MAX_REDIRECTS: usize = 10;
/// ureq's receive buffer per connection.
const INPUT_BUFFER: usize = 512 << 10;
const MAX_TOKEN_BYTES: u64 = 1 << 20;
const BACKOFF_BASE: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(8);
const RETRY_AFTER_MAX: Duration = Duration::from_secs(60);

/// Scheme, host and port: what a credential is bound to. Two origins are
/// the same only when all three are (`https://h` and `http://h` are not,
/// nor are `http://h` and `http://h:8080`); the host is compared without
/// case, and a URL's user name and password are no part of it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Origin {
    pub scheme: String,
    /// Lower case, without IPv6 brackets.
    host: String,
    pub port: u16,
}

impl Origin {
    pub fn of(url: &str) -> Result<Origin> {
        let uri: Uri = url
            .parse()
            .map_err(|_| Error::Other(format!("bad URL {}", redact(url))))?;
        let scheme = uri
            .scheme_str()
            .filter(|s| *s == "http" || *s == "https")
            .ok_or_else(|| Error::Other(format!("{}: only http and https", redact(url))))?
            .to_owned();
        let authority = uri
            .authority()
            .filter(|a| !a.host().is_empty())
            .ok_or_else(|| Error::Other(format!("{}: no host", redact(url))))?;
        let host = authority.host();
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host)
            .to_ascii_lowercase();
        let port = authority.port_u16().unwrap_or(default_port(&scheme));
        Ok(Origin { scheme, host, port })
    }

    /// The host without a port, without IPv6 brackets.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// `host[:port]` as registries are named (docker config keys, a
    /// mirror's `?ns=`): the port only when it is not the scheme's default.
    pub fn authority(&self) -> String {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        if self.port == default_port(&self.scheme) {
            host
        } else {
            format!("{host}:{}", self.port)
        }
    }
}

fn default_port(scheme: &str) -> u16 {
    if scheme == "https" { 443 } else { 80 }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}", self.scheme, self.authority())
    }
}

/// A URL fit for a message: without its query string, which can carry
/// signatures (presigned object-store URLs), and with any user name and
/// password in it replaced by `***`. Every URL in an error goes through
/// this one function.
pub fn redact(url: &str) -> String {
    let base = match url.split_once('?') {
        Some((base, _)) => format!("{base}?…"),
        None => url.to_owned(),
    };
    // Userinfo sits between "scheme://" and the first '@' before the path.
    let (scheme, rest) = match base.split_once("://") {
        Some((s, r)) => (Some(s), r),
        None => (None, base.as_str()),
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => {
            let rest = &rest[at + 1..];
            match scheme {
                Some(s) => format!("{s}://***@{rest}"),
                None => format!("***@{rest}"),
            }
        }
        None => base,
    }
}

/// Whether `url` carries a user name or password (`scheme://user:pw@host`).
fn has_userinfo(url: &str) -> bool {
    url.parse::<Uri>()
        .ok()
        .and_then(|u| u.authority().map(|a| a.as_str().contains('@')))
        .unwrap_or(false)
}

/// True for `localhost`, `127.0.0.0/8` and `::1`.
pub fn is_loopback(host: &str) -> bool {
    let h = host.trim_start_matches('[').trim_end_matches(']');
    h.eq_ignore_ascii_case("localhost")
        || h.parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Whether a password (Basic credentials, or credentials for a token realm)
/// may travel to `to`: over https always; over plain http only to loopback,
/// or when the user asked for plain http with `--plain-http`.
pub fn may_carry_credentials(to: &Origin, plain_http: bool) -> bool {
    to.scheme == "https" || plain_http || is_loopback(to.host())
}

/// What a response body is, which decides how long it may take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyKind {
    /// A manifest or a token: small, so the whole body must arrive within the
    /// stall timeout.
    Document,
    /// A blob, which may take hours: bounded by its rate instead (see
    /// [`blob`](super::blob)), and by the stall timeout per read.
    Blob,
}

/// Settings for the client.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// How many times a failed request is retried.
    pub retries: u32,
    /// The stall bound: no byte for this long fails a read; the response
    /// headers (1xx answers included), and a manifest's or token's whole
    /// body, must each arrive within it; a blob body must keep up
    /// [`MIN_RATE`] over windows of it.
    pub stall_timeout: Duration,
    /// Credentials for the registry's origin (and no other).
    pub credentials: CredentialStore,
    /// A bearer token sent, unasked, to this origin only.
    pub static_token: Option<(Origin, Secret)>,
    /// `--plain-http`: passwords may go over plain http off loopback too.
    pub plain_http: bool,
    /// An extra PEM CA bundle to trust.
    pub ca_cert: Option<PathBuf>,
}

/// A successful response.
pub struct Response {
    pub status: StatusCode,
    pub headers: HeaderMap,
    /// The URL that answered, after redirects.
    pub url: String,
    pub body: ureq::Body,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// Why one attempt failed, and whether another is worth it.
enum Failure {
    Transient {
        error: Error,
        retry_after: Option<Duration>,
    },
    Fatal(Error),
}

impl Failure {
    /// The same verdict, with context added to the error.
    fn context(self, what: &str) -> Failure {
        match self {
            Failure::Transient { error, retry_after } => Failure::Transient {
                error: error.context(what),
                retry_after,
            },
            Failure::Fatal(e) => Failure::Fatal(e.context(what)),
        }
    }
}

/// The blocking HTTP client of the registry source.
pub struct Client {
    agent: ureq::Agent,
    opts: ClientOptions,
    /// `Authorization` values per (origin, scope) bought with a challenge.
    tokens: Mutex<HashMap<(Origin, String), Secret>>,
}

impl Client {
    pub fn new(opts: ClientOptions) -> Result<Client> {
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(0)
            .max_redirects_will_error(false)
            .timeout_connect(Some(Duration::from_secs(30)))
            .timeout_per_read(Some(opts.stall_timeout))
            .timeout_per_write(Some(opts.stall_timeout))
            // In total, not per byte: a header a byte at a time, or endless
            // `103 Early Hints`, must not hold a run forever.
            .timeout_recv_response(Some(opts.stall_timeout))
            .user_agent(concat!("cloudimg/", env!("CARGO_PKG_VERSION")))
            // Large receives: a blob body is read in big pieces.
            .input_buffer_size(INPUT_BUFFER)
            .tls_config(tls::config(opts.ca_cert.as_deref())?)
            .build();
        Ok(Client {
            agent: config.into(),
            opts,
            tokens: Mutex::new(HashMap::new()),
        })
    }

    pub fn retries(&self) -> u32 {
        self.opts.retries
    }

    pub fn stall_timeout(&self) -> Duration {
        self.opts.stall_timeout
    }

    /// `GET url`, following redirects, answering auth challenges and retrying
    /// transient failures with exponential backoff and jitter, `retries`
    /// times (mirrors get none). `scope` is the token scope for the
    /// repository (`repository:NAME:pull`). Only 2xx responses are returned.
    pub fn get_tries(
        &self,
        url: &str,
        headers: &[(&str, String)],
        scope: &str,
        retries: u32,
        body: BodyKind,
    ) -> Result<Response> {
        let mut attempt = 0u32;
        loop {
            match self.get_once(url, headers, scope, body) {
                Ok(r) => return Ok(r),
                Err(Failure::Fatal(e)) => return Err(e),
                Err(Failure::Transient { error, retry_after }) => {
                    if attempt >= retries {
                        return Err(error.gave_up_after(retries));
                    }
                    pause(backoff(attempt, retry_after))?;
                    attempt += 1;
                }
            }
        }
    }

    fn get_once(
        &self,
        url: &str,
        headers: &[(&str, String)],
        scope: &str,
        body: BodyKind,
    ) -> std::result::Result<Response, Failure> {
        let mut url = url.to_owned();
        let mut challenged: Vec<Origin> = Vec::new();
        let mut hops = 0;
        loop {
            let origin = Origin::of(&url).map_err(Failure::Fatal)?;
            // ureq sends a URL's user name and password as Basic credentials.
            if has_userinfo(&url) && !may_carry_credentials(&origin, self.opts.plain_http) {
                return Err(Failure::Fatal(Error::Other(format!(
                    "{}: refusing to send the user name and password in the URL over plain \
                     http (use https, or --plain-http to allow it)",
                    redact(&url)
                ))));
            }
            let mut req = self.agent.get(&url);
            if body == BodyKind::Document {
                req = req
                    .config()
                    .timeout_recv_body(Some(self.opts.stall_timeout))
                    .build();
            }
            for (k, v) in headers {
                req = req.header(*k, v.as_str());
            }
            if let Some(auth) = self.authorization(&origin, scope) {
                req = req.header("Authorization", auth.expose());
            }
            let resp = req.call().map_err(|e| transport_failure(&url, e))?;
            let status = resp.status();
            let (parts, body) = resp.into_parts();
            let header = |name: &str| parts.headers.get(name).and_then(|v| v.to_str().ok());
            if status.is_success() {
                return Ok(Response {
                    status,
                    headers: parts.headers,
                    url,
                    body,
                });
            }
            let refused = |detail: String| Failure::Fatal(http_error(&url, status, Some(detail)));
            if status.is_redirection() {
                let location =
                    header("location").ok_or_else(|| refused("without a Location".to_owned()))?;
                hops += 1;
                if hops > MAX_REDIRECTS {
                    return Err(refused(format!(
                        "after more than {MAX_REDIRECTS} redirects (a redirect loop?)"
                    )));
                }
                url = resolve_location(&url, location).map_err(Failure::Fatal)?;
                continue;
            }
            if status == StatusCode::UNAUTHORIZED && challenged.contains(&origin) {
                return Err(refused(
                    "again after authenticating: access refused".to_owned(),
                ));
            }
            if status == StatusCode::UNAUTHORIZED {
                let challenge = header("www-authenticate").and_then(parse_challenge);
                challenged.push(origin.clone());
                match challenge {
                    Some(c) => {
                        self.answer(&origin, c, scope)?;
                        continue;
                    }
                    None => {
                        return Err(refused(
                            "with no usable WWW-Authenticate challenge".to_owned(),
                        ));
                    }
                }
            }
            let retry_after = header("retry-after").and_then(parse_retry_after);
            return Err(status_failure(&url, status, retry_after));
        }
    }

    /// What to send to `origin`: the static token where it belongs, else
    /// whatever a challenge from this very origin bought.
    fn authorization(&self, origin: &Origin, scope: &str) -> Option<Secret> {
        if let Some((o, token)) = &self.opts.static_token
            && o == origin
        {
            return Some(Secret::new(format!("Bearer {}", token.expose())));
        }
        let tokens = self.tokens.lock().expect("token cache");
        tokens.get(&(origin.clone(), scope.to_owned())).cloned()
    }

    /// Answer a challenge from `origin`: fetch a bearer token from the realm
    /// (with basic credentials when the user has some for this origin), or
    /// use basic credentials directly. Credentials are the registry
    /// origin's only: a challenge from any other origin — the same host
    /// over plain http, another port, a host a redirect led to — is
    /// answered anonymously or not at all.
    fn answer(
        &self,
        origin: &Origin,
        challenge: Challenge,
        scope: &str,
    ) -> std::result::Result<(), Failure> {
        let creds = self
            .opts
            .credentials
            .lookup(origin)
            .map_err(Failure::Fatal)?;
        let plain_http = self.opts.plain_http;
        let header = match challenge {
            Challenge::Basic => match creds {
                Some(_) if !may_carry_credentials(origin, plain_http) => {
                    return Err(Failure::Fatal(Error::Other(format!(
                        "{origin} asks for the password over plain http; refusing to send \
                         it (use https, or --plain-http to allow it)"
                    ))));
                }
                Some(c) => c.basic_header(),
                None => {
                    let hint = match &self.opts.credentials.origin {
                        Some(registry) if registry != origin => format!(
                            "credentials are only ever sent to the registry's origin, {registry}"
                        ),
                        _ => "use --username with --password-stdin, or docker login".to_owned(),
                    };
                    return Err(Failure::Fatal(Error::Other(format!(
                        "{origin} asks for a user name and password; {hint}"
                    ))));
                }
            },
            Challenge::Bearer {
                realm,
                service,
                scope: wanted,
            } => {
                let realm_origin = Origin::of(&realm).map_err(Failure::Fatal)?;
                if creds.is_some() && !may_carry_credentials(&realm_origin, plain_http) {
                    return Err(Failure::Fatal(Error::Other(format!(
                        "token realm {realm_origin} is plain http; refusing to send credentials \
                         there (use --plain-http to allow it)"
                    ))));
                }
                let mut query = Vec::new();
                if let Some(s) = service {
                    query.push(format!("service={}", encode(&s)));
                }
                query.push(format!(
                    "scope={}",
                    encode(wanted.as_deref().unwrap_or(scope))
                ));
                let sep = if realm.contains('?') { '&' } else { '?' };
                let token_url = format!("{realm}{sep}{}", query.join("&"));
                let mut req = self
                    .agent
                    .get(&token_url)
                    .config()
                    .timeout_recv_body(Some(self.opts.stall_timeout))
                    .build();
                if let Some(c) = &creds {
                    req = req.header("Authorization", c.basic_header().expose());
                }
                let in_realm = format!("token realm {realm_origin}");
                let resp = req
                    .call()
                    .map_err(|e| transport_failure(&token_url, e).context(&in_realm))?;
                let status = resp.status();
                if !status.is_success() {
                    let failure =
                        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
                            let hint = if creds.is_some() {
                                "(refused: check the credentials)"
                            } else {
                                "(refused: credentials may be needed)"
                            };
                            Failure::Fatal(http_error(&token_url, status, Some(hint.to_owned())))
                        } else {
                            status_failure(&token_url, status, None)
                        };
                    return Err(failure.context(&in_realm));
                }
                let body = resp
                    .into_body()
                    .with_config()
                    .limit(MAX_TOKEN_BYTES)
                    .read_to_vec()
                    .map_err(|e| transport_failure(&token_url, e).context(&in_realm))?;
                let token = serde_json::from_slice::<TokenResponse>(&body)
                    .ok()
                    .and_then(TokenResponse::into_token)
                    .ok_or_else(|| {
                        Failure::Fatal(Error::Other(format!(
                            "token realm {realm_origin} answered without a token"
                        )))
                    })?;
                Secret::new(format!("Bearer {}", token.expose()))
            }
        };
        self.tokens
            .lock()
            .expect("token cache")
            .insert((origin.clone(), scope.to_owned()), header);
        Ok(())
    }
}

/// Percent-encode a query value.
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Resolve a `Location` header against the URL that sent it.
fn resolve_location(base: &str, location: &str) -> Result<String> {
    if location.starts_with("http://") || location.starts_with("https://") {
        return Ok(location.to_owned());
    }
    let origin = Origin::of(base)?;
    if let Some(rest) = location.strip_prefix("//") {
        return Ok(format!("{}://{rest}", origin.scheme));
    }
    if location.starts_with('/') {
        return Ok(format!("{origin}{location}"));
    }
    let path = base
        .split_once("://")
        .and_then(|(_, r)| r.find('/').map(|i| &r[i..]))
        .unwrap_or("/");
    let path = path.split('?').next().unwrap_or("/");
    let dir = &path[..path.rfind('/').map_or(0, |i| i + 1)];
    Ok(format!("{origin}{dir}{location}"))
}

fn parse_retry_after(v: &str) -> Option<Duration> {
    v.trim()
        .parse::<u64>()
        .ok()
        .map(|s| Duration::from_secs(s).min(RETRY_AFTER_MAX))
}

/// `GET url` answered with `status`.
fn http_error(url: &str, status: StatusCode, detail: Option<String>) -> Error {
    Error::Http {
        url: redact(url),
        status: status.as_u16(),
        detail,
        retries: 0,
    }
}

fn status_failure(url: &str, status: StatusCode, retry_after: Option<Duration>) -> Failure {
    let error = match status {
        StatusCode::NOT_FOUND => Error::NotFound(format!("GET {}: HTTP 404", redact(url))),
        s => http_error(url, s, None),
    };
    let transient = matches!(status.as_u16(), 408 | 429 | 500 | 502 | 503 | 504);
    if transient {
        Failure::Transient { error, retry_after }
    } else {
        Failure::Fatal(error)
    }
}

/// What a timeout of ureq's means, in this client's terms.
fn timeout_text(t: ureq::Timeout) -> String {
    match t {
        ureq::Timeout::PerRead => "stalled: nothing received within the stall timeout".into(),
        ureq::Timeout::RecvResponse => {
            "stalled: no complete response headers within the stall timeout".into()
        }
        ureq::Timeout::RecvBody => {
            "stalled: the whole body did not arrive within the stall timeout".into()
        }
        t => format!("timeout: {t}"),
    }
}

/// An I/O error of a response body, in this client's terms.
pub fn body_error_text(e: &std::io::Error) -> String {
    match e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<ureq::Error>())
    {
        Some(ureq::Error::Timeout(t)) => timeout_text(*t),
        _ => e.to_string(),
    }
}

fn transport_failure(url: &str, e: ureq::Error) -> Failure {
    if url.starts_with("https://") && answered_in_plain_http(&e) {
        // No retry can help: the scheme is wrong, not the network.
        return Failure::Fatal(Error::Network {
            what: format!("GET {}", redact(url)),
            cause: "the server speaks plain http, not TLS (use an http:// URL, or \
                    --plain-http for a registry reference)"
                .to_owned(),
            fault: NetFault::Unreachable,
            retries: 0,
        });
    }
    let fault = net_fault(&e);
    let error = Error::Network {
        what: format!("GET {}", redact(url)),
        cause: match e {
            ureq::Error::Timeout(t) => timeout_text(t),
            _ => e.to_string(),
        },
        fault,
        retries: 0,
    };
    match e {
        ureq::Error::Io(_)
        | ureq::Error::Timeout(_)
        | ureq::Error::ConnectionFailed
        | ureq::Error::Protocol(_) => Failure::Transient {
            error,
            retry_after: None,
        },
        _ => Failure::Fatal(error),
    }
}

/// Whether a TLS handshake failed because the server's first bytes were no
/// TLS record at all — what a plain-http server's `400 Bad Request` to a
/// ClientHello looks like.
fn answered_in_plain_http(e: &ureq::Error) -> bool {
    let ureq::Error::Io(io) = e else {
        return false;
    };
    matches!(
        io.get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>()),
        Some(rustls::Error::InvalidMessage(
            rustls::InvalidMessage::InvalidContentType
        ))
    )
}

/// Whether a failed request reached its server, and whether that answered.
fn net_fault(e: &ureq::Error) -> NetFault {
    use std::io::ErrorKind;
    match e {
        ureq::Error::ConnectionFailed | ureq::Error::HostNotFound => NetFault::Unreachable,
        ureq::Error::Timeout(ureq::Timeout::Resolve | ureq::Timeout::Connect) => {
            NetFault::Unreachable
        }
        ureq::Error::Timeout(_) => NetFault::Stalled,
        ureq::Error::Io(io) => match io.kind() {
            ErrorKind::ConnectionRefused
            | ErrorKind::HostUnreachable
            | ErrorKind::NetworkUnreachable
            | ErrorKind::NetworkDown
            | ErrorKind::AddrNotAvailable => NetFault::Unreachable,
            ErrorKind::TimedOut | ErrorKind::WouldBlock => NetFault::Stalled,
            _ => NetFault::Lost,
        },
        _ => NetFault::Lost,
    }
}

/// Whether a response body's read error is a stall (nothing, or too
/// little, within the stall timeout) or the connection's loss.
pub fn body_fault(e: &std::io::Error) -> NetFault {
    let inner = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<ureq::Error>());
    match inner {
        Some(ureq::Error::Timeout(_)) => NetFault::Stalled,
        Some(other) => net_fault(other),
        None if matches!(
            e.kind(),
            std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock
        ) =>
        {
            NetFault::Stalled
        }
        None => NetFault::Lost,
    }
}

/// The pause before retry `attempt` (0-based): exponential with jitter, or
/// what the server asked for with Retry-After.
pub fn backoff(attempt: u32, retry_after: Option<Duration>) -> Duration {
    if let Some(d) = retry_after {
        return d;
    }
    let exp = BACKOFF_BASE
        .saturating_mul(1u32 << attempt.min(16))
        .min(BACKOFF_MAX);
    // Jitter: between half and all of the exponential delay.
    let half = exp / 2;
    half + Duration::from_nanos(jitter() % (half.as_nanos() as u64 + 1))
}

fn jitter() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(Instant::now().elapsed().as_nanos());
    h.finish()
}

/// Sleep, waking early (with an error) when a signal arrives.
pub fn pause(d: Duration) -> Result<()> {
    let end = Instant::now() + d;
    loop {
        signals::check()?;
        let now = Instant::now();
        if now >= end {
            return Ok(());
        }
        std::thread::sleep((end - now).min(Duration::from_millis(50)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins() {
        let o = Origin::of("https://reg.example/v2/").unwrap();
        assert_eq!(
            (o.scheme.as_str(), o.host(), o.port),
            ("https", "reg.example", 443)
        );
        let o = Origin::of("http://[::1]:5000/v2/").unwrap();
        assert_eq!((o.host(), o.port), ("::1", 5000));
        assert!(Origin::of("ftp://x/").is_err());
        assert!(Origin::of("http:///x").is_err());
        let o = |u: &str| Origin::of(u).unwrap();
        assert_eq!(o("https://a.example/"), o("https://A.Example:443/x"));
        assert_eq!(o("https://a.example/"), o("https://u:p@a.example/"));
        // Scheme, host and port each make another origin.
        assert_ne!(o("https://a.example/"), o("http://a.example/"));
        assert_ne!(o("https://127.0.0.1:5000/"), o("http://127.0.0.1:5000/"));
        assert_ne!(o("https://127.0.0.1/"), o("http://127.0.0.1/"));
        assert_ne!(o("http://a.example/"), o("http://a.example:8080/"));
        assert_ne!(o("http://a.example/"), o("http://b.example/"));
        // How registries are named, and shown.
        assert_eq!(
            o("https://u:p@Reg.Example:443/v2/").authority(),
            "reg.example"
        );
        assert_eq!(o("http://reg:5000/").authority(), "reg:5000");
        assert_eq!(o("https://[::1]:5000/").authority(), "[::1]:5000");
        assert_eq!(o("http://u:secret@h:9/").to_string(), "http://h:9");
    }

    #[test]
    fn passwords_travel_over_https_or_loopback_or_when_told() {
        let o = |u: &str| Origin::of(u).unwrap();
        for (url, plain_http, ok) in [
            ("https://reg.example/", false, true),
            ("https://10.0.0.1:5000/", false, true),
            ("http://reg.example/", false, false),
            ("http://10.0.0.1:5000/", false, false),
            ("http://reg.example/", true, true),
            ("http://127.0.0.1:8080/", false, true),
            ("http://127.9.9.9/", false, true),
            ("http://localhost/", false, true),
            ("http://[::1]:5000/", false, true),
            ("http://localhost.example/", false, false),
        ] {
            assert_eq!(
                may_carry_credentials(&o(url), plain_http),
                ok,
                "{url} {plain_http}"
            );
        }
    }

    #[test]
    fn locations() {
        let base = "http://r:5000/v2/a/blobs/sha256:x?y=1";
        assert_eq!(
            resolve_location(base, "https://s3/x?sig=1").unwrap(),
            "https://s3/x?sig=1"
        );
        assert_eq!(resolve_location(base, "//cdn/x").unwrap(), "http://cdn/x");
        assert_eq!(
            resolve_location(base, "/v2/b").unwrap(),
            "http://r:5000/v2/b"
        );
        assert_eq!(
            resolve_location(base, "c").unwrap(),
            "http://r:5000/v2/a/blobs/c"
        );
    }

    #[test]
    fn loopback_hosts() {
        for h in ["localhost", "127.0.0.1", "127.1.2.3", "::1", "[::1]"] {
            assert!(is_loopback(h), "{h}");
        }
        for h in ["10.0.0.1", "example.com", "localhost.example"] {
            assert!(!is_loopback(h), "{h}");
        }
    }

    #[test]
    fn backoff_grows_with_jitter_and_honours_retry_after() {
        for attempt in 0..6 {
            let d = backoff(attempt, None);
            let full = BACKOFF_BASE * (1 << attempt);
            let full = full.min(BACKOFF_MAX);
            assert!(d >= full / 2 && d <= full, "attempt {attempt}: {d:?}");
        }
        assert_eq!(
            backoff(3, Some(Duration::from_secs(2))),
            Duration::from_secs(2)
        );
        assert_eq!(parse_retry_after("7"), Some(Duration::from_secs(7)));
        assert_eq!(parse_retry_after("99999"), Some(RETRY_AFTER_MAX));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), None);
    }

    #[test]
    fn redaction_drops_queries_and_userinfo() {
        assert_eq!(redact("https://s3/x?X-Amz-Signature=abc"), "https://s3/x?…");
        assert_eq!(redact("https://s3/x"), "https://s3/x");
        assert_eq!(
            redact("http://user:tok3n@127.0.0.1:9/v2/"),
            "http://***@127.0.0.1:9/v2/"
        );
        assert_eq!(redact("http://tok3n@h"), "http://***@h");
        assert_eq!(redact("https://u:p@h/x?sig=1"), "https://***@h/x?…");
        // An '@' in the path or the query is not userinfo.
        assert_eq!(redact("https://h/a@b"), "https://h/a@b");
        assert_eq!(redact("https://h/x?a=b@c"), "https://h/x?…");
        assert!(has_userinfo("http://u:p@h/"));
        assert!(!has_userinfo("http://h/a@b"));
    }
}
