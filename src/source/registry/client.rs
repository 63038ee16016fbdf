//! The HTTP side of the registry source: one blocking `GET` that follows
//! redirects, answers auth challenges and retries what is worth retrying.
//!
//! Redirects are followed here, not by ureq, so that the `Authorization`
//! header is decided per hop by the hop's origin: a token or password is only
//! ever sent to the origin it belongs to, never to the object store or CDN a
//! registry redirects blob downloads to.

use std::collections::HashMap;
use std::fmt;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ureq::http::{HeaderMap, StatusCode, Uri};

use super::auth::{Challenge, CredentialStore, Secret, TokenResponse, parse_challenge};
use super::tls;
use crate::error::{Error, Result};
use crate::signals;

const MAX_REDIRECTS: usize = 10;
/// ureq's receive buffer per connection.
const INPUT_BUFFER: usize = 512 << 10;
const MAX_TOKEN_BYTES: u64 = 1 << 20;
const BACKOFF_BASE: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(8);
const RETRY_AFTER_MAX: Duration = Duration::from_secs(60);

/// Scheme, host and port: what a credential is bound to.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Origin {
    pub scheme: String,
    /// `host[:port]` as written in the URL.
    pub authority: String,
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
            .ok_or_else(|| Error::Other(format!("{}: no host", redact(url))))?;
        let port = authority
            .port_u16()
            .unwrap_or(if scheme == "https" { 443 } else { 80 });
        Ok(Origin {
            authority: authority.as_str().to_owned(),
            scheme,
            port,
        })
    }

    /// The host without a port, without IPv6 brackets.
    pub fn host(&self) -> &str {
        let a = self.authority.as_str();
        let a = a.rsplit_once('@').map_or(a, |(_, h)| h);
        if let Some(v6) = a.strip_prefix('[') {
            return v6.split(']').next().unwrap_or(v6);
        }
        a.rsplit_once(':').map_or(a, |(h, _)| h)
    }

    fn same(&self, other: &Origin) -> bool {
        self.scheme == other.scheme && self.host() == other.host() && self.port == other.port
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}", self.scheme, self.authority)
    }
}

/// A URL without its query string, which can carry signatures (presigned
/// object-store URLs) and must not end up in error messages.
pub fn redact(url: &str) -> String {
    match url.split_once('?') {
        Some((base, _)) => format!("{base}?…"),
        None => url.to_owned(),
    }
}

/// True for `localhost`, `127.0.0.0/8` and `::1`.
pub fn is_loopback(host: &str) -> bool {
    let h = host.trim_start_matches('[').trim_end_matches(']');
    h == "localhost"
        || h.parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Settings for the client.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// How many times a failed request is retried.
    pub retries: u32,
    /// No byte for this long is a stall: the read fails (and is resumed).
    pub stall_timeout: Duration,
    pub credentials: CredentialStore,
    /// A bearer token sent, unasked, to this origin only.
    pub static_token: Option<(Origin, Secret)>,
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
    /// Reword the message of an `Error::Other`, keeping the verdict.
    fn map(self, f: impl FnOnce(String) -> String) -> Failure {
        let reword = |e| match e {
            Error::Other(m) => Error::Other(f(m)),
            e => e,
        };
        match self {
            Failure::Transient { error, retry_after } => Failure::Transient {
                error: reword(error),
                retry_after,
            },
            Failure::Fatal(e) => Failure::Fatal(reword(e)),
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
            .user_agent(concat!("cloudimg/", env!("CARGO_PKG_VERSION")))
            // Large receives: a blob body is read in big pieces.
            .input_buffer_size(INPUT_BUFFER)
            .tls_config(tls::config()?)
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

    /// `GET url`, following redirects, answering auth challenges and retrying
    /// transient failures with exponential backoff and jitter. `scope` is the
    /// token scope for the repository (`repository:NAME:pull`). Only 2xx
    /// responses are returned.
    pub fn get(&self, url: &str, headers: &[(&str, String)], scope: &str) -> Result<Response> {
        self.get_tries(url, headers, scope, self.opts.retries)
    }

    /// [`get`](Client::get) with its own retry budget (mirrors get none).
    pub fn get_tries(
        &self,
        url: &str,
        headers: &[(&str, String)],
        scope: &str,
        retries: u32,
    ) -> Result<Response> {
        let mut attempt = 0u32;
        loop {
            match self.get_once(url, headers, scope) {
                Ok(r) => return Ok(r),
                Err(Failure::Fatal(e)) => return Err(e),
                Err(Failure::Transient { error, retry_after }) => {
                    if attempt >= retries {
                        return Err(match error {
                            Error::Other(m) if retries > 0 => {
                                Error::Other(format!("{m} (gave up after {retries} retries)"))
                            }
                            e => e,
                        });
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
    ) -> std::result::Result<Response, Failure> {
        let mut url = url.to_owned();
        let mut challenged: Vec<Origin> = Vec::new();
        let mut hops = 0;
        loop {
            let origin = Origin::of(&url).map_err(Failure::Fatal)?;
            let mut req = self.agent.get(&url);
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
            if status.is_redirection() {
                let location = header("location").ok_or_else(|| {
                    Failure::Fatal(Error::Other(format!(
                        "GET {}: HTTP {status} without a Location",
                        redact(&url)
                    )))
                })?;
                hops += 1;
                if hops > MAX_REDIRECTS {
                    return Err(Failure::Fatal(Error::Other(format!(
                        "GET {}: more than {MAX_REDIRECTS} redirects (a redirect loop?)",
                        redact(&url)
                    ))));
                }
                url = resolve_location(&url, location).map_err(Failure::Fatal)?;
                continue;
            }
            if status == StatusCode::UNAUTHORIZED && challenged.contains(&origin) {
                return Err(Failure::Fatal(Error::Other(format!(
                    "GET {}: HTTP 401 Unauthorized again after authenticating: access refused",
                    redact(&url)
                ))));
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
                        return Err(Failure::Fatal(Error::Other(format!(
                            "GET {}: HTTP 401 with no usable WWW-Authenticate challenge",
                            redact(&url)
                        ))));
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
            && o.same(origin)
        {
            return Some(Secret::new(format!("Bearer {}", token.expose())));
        }
        let tokens = self.tokens.lock().expect("token cache");
        tokens.get(&(origin.clone(), scope.to_owned())).cloned()
    }

    /// Answer a challenge from `origin`: fetch a bearer token from the realm
    /// (with basic credentials when the user has some for this origin), or
    /// use basic credentials directly.
    fn answer(
        &self,
        origin: &Origin,
        challenge: Challenge,
        scope: &str,
    ) -> std::result::Result<(), Failure> {
        let creds = self
            .opts
            .credentials
            .lookup(&origin.authority)
            .map_err(Failure::Fatal)?;
        let header = match challenge {
            Challenge::Basic => match creds {
                Some(c) => c.basic_header(),
                None => {
                    return Err(Failure::Fatal(Error::Other(format!(
                        "{origin} asks for a user name and password; use --username with \
                         --password-stdin, or docker login"
                    ))));
                }
            },
            Challenge::Bearer {
                realm,
                service,
                scope: wanted,
            } => {
                let realm_origin = Origin::of(&realm).map_err(Failure::Fatal)?;
                if creds.is_some()
                    && realm_origin.scheme != "https"
                    && !is_loopback(realm_origin.host())
                {
                    return Err(Failure::Fatal(Error::Other(format!(
                        "token realm {realm_origin} is plain http; refusing to send credentials there"
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
                let mut req = self.agent.get(&token_url);
                if let Some(c) = &creds {
                    req = req.header("Authorization", c.basic_header().expose());
                }
                let in_realm = |f: Failure| f.map(|m| format!("token realm {realm_origin}: {m}"));
                let resp = req
                    .call()
                    .map_err(|e| in_realm(transport_failure(&token_url, e)))?;
                let status = resp.status();
                if !status.is_success() {
                    let what =
                        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
                            Failure::Fatal(Error::Other(format!(
                                "token realm {realm_origin} refused the request (HTTP {status}){}",
                                if creds.is_some() {
                                    ": check the credentials"
                                } else {
                                    "; credentials may be needed"
                                }
                            )))
                        } else {
                            in_realm(status_failure(&token_url, status, None))
                        };
                    return Err(what);
                }
                let body = resp
                    .into_body()
                    .with_config()
                    .limit(MAX_TOKEN_BYTES)
                    .read_to_vec()
                    .map_err(|e| in_realm(transport_failure(&token_url, e)))?;
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

fn status_failure(url: &str, status: StatusCode, retry_after: Option<Duration>) -> Failure {
    let error = match status {
        StatusCode::NOT_FOUND => Error::NotFound(format!("GET {}: HTTP 404", redact(url))),
        s => Error::Other(format!("GET {}: HTTP {s}", redact(url))),
    };
    let transient = matches!(status.as_u16(), 408 | 429 | 500 | 502 | 503 | 504);
    if transient {
        Failure::Transient { error, retry_after }
    } else {
        Failure::Fatal(error)
    }
}

fn transport_failure(url: &str, e: ureq::Error) -> Failure {
    let error = Error::Other(match e {
        ureq::Error::Timeout(ureq::Timeout::PerRead) => format!(
            "GET {}: stalled: nothing received within the stall timeout",
            redact(url)
        ),
        _ => format!("GET {}: {e}", redact(url)),
    });
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
        assert!(
            Origin::of("https://a.example/")
                .unwrap()
                .same(&Origin::of("https://a.example:443/x").unwrap())
        );
        assert!(
            !Origin::of("https://a.example/")
                .unwrap()
                .same(&Origin::of("http://a.example/").unwrap())
        );
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
    fn redaction_drops_queries() {
        assert_eq!(redact("https://s3/x?X-Amz-Signature=abc"), "https://s3/x?…");
        assert_eq!(redact("https://s3/x"), "https://s3/x");
    }
}
