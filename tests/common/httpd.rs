//! A small, scriptable HTTP/1.1 server for tests of the HTTP client.
//!
//! A real registry behaves well; this server misbehaves on demand. Each test
//! hands [`Server::start`] a handler that looks at the request (and at how
//! many times the same method and path were asked for before) and returns a
//! [`Reply`]: a complete response, a blob with optional faults (ignoring
//! Range, cutting the connection mid-body, stalling, lying about the length),
//! or a connection closed without an answer.
//!
//! Connections are persistent: the server keeps reading requests from a
//! connection until the client closes it, the request asks for
//! `Connection: close`, or the reply ends the connection. Responses always
//! carry a `Content-Length` (unless a test deliberately sends a wrong one) and
//! are never chunked. Every request is logged before it is answered, so
//! [`Server::requests`] shows what the client sent even when the reply was a
//! cut connection.
//!
//! One thread accepts connections and one thread serves each connection.
//! Write errors (a client that gave up early) simply end that connection.
//!
//! [`Server::start_tls`] serves HTTPS and plain HTTP on the same port: the
//! first byte of a connection decides (a TLS handshake starts with 0x16), and
//! [`Request::tls`] tells the handler which one a request came over — two
//! origins, `https://127.0.0.1:P` and `http://127.0.0.1:P`, on one port.
//! [`Server::start_at`] binds another local address than 127.0.0.1.

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use rustls::{ServerConfig, ServerConnection, StreamOwned};

/// Longest request line or header line the server accepts.
const MAX_LINE: u64 = 64 * 1024;
/// Most header lines the server accepts in one request.
const MAX_HEADERS: usize = 200;
/// Largest request body the server accepts.
const MAX_BODY: u64 = 64 * 1024 * 1024;

/// One request as the server received it.
#[derive(Clone, Debug)]
pub struct Request {
    pub method: String,
    /// The request target as sent, path plus query, e.g.
    /// "/v2/a/blobs/sha256:..?ns=x".
    pub target: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// Whether it came over TLS (only ever on a [`Server::start_tls`] port).
    pub tls: bool,
}

impl Request {
    /// Case-insensitive header lookup; the first header of that name wins.
    pub fn header(&self, name: &str) -> Option<&str> {
        find_header(&self.headers, name)
    }

    /// The target without the query string.
    pub fn path(&self) -> &str {
        match self.target.split_once('?') {
            Some((path, _)) => path,
            None => &self.target,
        }
    }

    /// A `Range: bytes=N-` or `bytes=N-M` header parsed to `(N, Option<M>)`.
    ///
    /// Anything else (no header, suffix ranges `bytes=-N`, several ranges,
    /// `M < N`, garbage) is `None`: a server ignores a Range it cannot honour.
    pub fn range(&self) -> Option<(u64, Option<u64>)> {
        let spec = self.header("range")?.trim().strip_prefix("bytes=")?;
        let (first, last) = spec.split_once('-')?;
        let first: u64 = first.trim().parse().ok()?;
        let last = last.trim();
        if last.is_empty() {
            return Some((first, None));
        }
        let last: u64 = last.parse().ok()?;
        (last >= first).then_some((first, Some(last)))
    }
}

/// What to answer.
#[derive(Clone, Debug)]
pub enum Reply {
    /// A complete response with `Content-Length = body.len()`. If `headers`
    /// hold a Content-Length, that one is sent instead, and the body is cut
    /// or the connection closed as for a `Blob`'s `declared_len`.
    Full {
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    },
    /// Serve `data` as a blob.
    ///
    /// * `honour_range`: if set and the request has a usable Range header,
    ///   answer 206 with the requested slice and
    ///   `Content-Range: bytes START-END/TOTAL` (416 if START is past the
    ///   end); otherwise 200 with everything.
    /// * `cut_after`: after this many body bytes, shut the connection down
    ///   and drop it: a connection lost mid-blob.
    /// * `stall_after`: after this many body bytes, send nothing for the
    ///   duration while holding the connection open, then close it.
    /// * `reset`: end a `cut_after` connection with a TCP reset (RST, the
    ///   client sees `ECONNRESET`) instead of an orderly close (FIN, EOF).
    /// * `declared_len`: send this `Content-Length` instead of the true one.
    ///   If it is larger than the body, the whole body is sent and the
    ///   connection closed (the client sees a short body); if smaller, only
    ///   that many bytes are sent and the connection stays usable.
    /// * `headers`: extra response headers (e.g. `Docker-Content-Digest`);
    ///   a Content-Length among them is sent as written, as for `Full`.
    ///
    /// If both `cut_after` and `stall_after` are set, whichever comes first
    /// applies. A threshold at or past the end of the body takes effect
    /// after the whole body (for HEAD, right after the headers).
    Blob {
        data: Arc<Vec<u8>>,
        honour_range: bool,
        cut_after: Option<u64>,
        stall_after: Option<(u64, Duration)>,
        reset: bool,
        declared_len: Option<u64>,
        headers: Vec<(String, String)>,
    },
    /// Close the connection without answering.
    Close,
    /// Raw bytes on the wire, for what no well-formed reply does: `head` at
    /// once, then `tail` in pieces of `piece` bytes with `every` between
    /// them — the whole tail over and over when `repeat` — until the client
    /// goes away (or two minutes have passed); then the connection closes.
    Raw {
        head: Vec<u8>,
        tail: Vec<u8>,
        piece: usize,
        every: Duration,
        repeat: bool,
    },
}

impl Reply {
    /// An empty response with this status.
    pub fn status(status: u16) -> Reply {
        Reply::Full {
            status,
            headers: Vec::new(),
            body: Vec::new(),
        }
    }

    /// A JSON body with `Content-Type: application/json`.
    pub fn json(status: u16, value: &serde_json::Value) -> Reply {
        let body = serde_json::to_vec(value).expect("serialize JSON reply");
        Reply::bytes(status, "application/json", body)
    }

    /// A body with the given `Content-Type`.
    pub fn bytes(status: u16, content_type: &str, body: Vec<u8>) -> Reply {
        Reply::Full {
            status,
            headers: vec![("Content-Type".to_owned(), content_type.to_owned())],
            body,
        }
    }

    /// A redirect (301, 302, 303, 307, 308) to `location`, with no body.
    pub fn redirect(status: u16, location: &str) -> Reply {
        Reply::status(status).header("Location", location)
    }

    /// A well-behaved blob: Range honoured, no faults, no extra headers.
    pub fn blob(data: Arc<Vec<u8>>) -> Reply {
        Reply::Blob {
            data,
            honour_range: true,
            cut_after: None,
            stall_after: None,
            reset: false,
            declared_len: None,
            headers: Vec::new(),
        }
    }

    /// Blob only: ignore any Range header and always answer 200 in full.
    pub fn no_range(mut self) -> Reply {
        *self.blob_field("no_range").0 = false;
        self
    }

    /// Blob only: close the connection after `n` body bytes.
    pub fn cut_after(mut self, n: u64) -> Reply {
        *self.blob_field("cut_after").1 = Some(n);
        self
    }

    /// Blob only: reset the connection (RST) after `n` body bytes: a
    /// connection torn down by a crashing peer or a middlebox.
    pub fn reset_after(mut self, n: u64) -> Reply {
        *self.blob_field("reset_after").1 = Some(n);
        *self.blob_field("reset_after").4 = true;
        self
    }

    /// Blob only: after `n` body bytes, go silent for `pause`, then close.
    pub fn stall_after(mut self, n: u64, pause: Duration) -> Reply {
        *self.blob_field("stall_after").2 = Some((n, pause));
        self
    }

    /// Blob only: send `Content-Length: n` whatever the body's real length.
    pub fn declared_len(mut self, n: u64) -> Reply {
        *self.blob_field("declared_len").3 = Some(n);
        self
    }

    /// Add a response header (Full and Blob).
    pub fn header(mut self, name: &str, value: &str) -> Reply {
        match &mut self {
            Reply::Full { headers, .. } | Reply::Blob { headers, .. } => {
                headers.push((name.to_owned(), value.to_owned()))
            }
            Reply::Close | Reply::Raw { .. } => panic!("Reply::header on a Close or Raw reply"),
        }
        self
    }

    /// Mutable access to a Blob's fault settings, for the builder methods.
    /// Using a Blob-only builder on another variant is a bug in the test.
    #[allow(clippy::type_complexity)]
    fn blob_field(
        &mut self,
        method: &str,
    ) -> (
        &mut bool,
        &mut Option<u64>,
        &mut Option<(u64, Duration)>,
        &mut Option<u64>,
        &mut bool,
    ) {
        match self {
            Reply::Blob {
                honour_range,
                cut_after,
                stall_after,
                declared_len,
                reset,
                ..
            } => (honour_range, cut_after, stall_after, declared_len, reset),
            _ => panic!("Reply::{method} only applies to Reply::Blob"),
        }
    }
}

/// The handler a test supplies: request and repeat count in, reply out.
type Handler = dyn Fn(&Request, usize) -> Reply + Send + Sync;

/// State shared by the accept thread, the connection threads and the test.
struct Shared {
    handler: Box<Handler>,
    /// Set by `Drop`: the accept loop exits at the next connection.
    stopping: AtomicBool,
    log: Mutex<Log>,
    /// Open connections by id, so `Drop` can shut them down.
    connections: Mutex<HashMap<u64, TcpStream>>,
    /// Set for a server that also speaks TLS.
    tls: Option<Arc<ServerConfig>>,
    /// Response body bytes written so far (Blob and Full replies).
    body_bytes: AtomicU64,
}

#[derive(Default)]
struct Log {
    requests: Vec<Request>,
    /// How many requests each (method, path) has had so far.
    seen: HashMap<(String, String), usize>,
}

/// Lock a mutex, carrying on if a panicking handler poisoned it.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A running test server; dropping it stops it.
pub struct Server {
    addr: SocketAddr,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

impl Server {
    /// Bind 127.0.0.1 on a free port and serve in background threads.
    ///
    /// `handler(request, n)` decides each reply; `n` is how many earlier
    /// requests had the same method and path (query ignored), 0 for the
    /// first, so a test can say "503 twice, then the blob".
    pub fn start<F>(handler: F) -> Server
    where
        F: Fn(&Request, usize) -> Reply + Send + Sync + 'static,
    {
        Server::launch(IpAddr::V4(Ipv4Addr::LOCALHOST), None, handler)
    }

    /// Like [`start`](Server::start), on a free port of another local
    /// address (e.g. one that is not loopback).
    pub fn start_at<F>(ip: IpAddr, handler: F) -> Server
    where
        F: Fn(&Request, usize) -> Reply + Send + Sync + 'static,
    {
        Server::launch(ip, None, handler)
    }

    /// Like [`start`](Server::start), answering HTTPS (with `config`'s
    /// certificate) and plain HTTP on the same port.
    pub fn start_tls<F>(config: Arc<ServerConfig>, handler: F) -> Server
    where
        F: Fn(&Request, usize) -> Reply + Send + Sync + 'static,
    {
        Server::launch(IpAddr::V4(Ipv4Addr::LOCALHOST), Some(config), handler)
    }

    fn launch<F>(ip: IpAddr, tls: Option<Arc<ServerConfig>>, handler: F) -> Server
    where
        F: Fn(&Request, usize) -> Reply + Send + Sync + 'static,
    {
        let listener = TcpListener::bind((ip, 0)).expect("bind test server");
        let addr = listener.local_addr().expect("test server address");
        let shared = Arc::new(Shared {
            handler: Box::new(handler),
            stopping: AtomicBool::new(false),
            log: Mutex::new(Log::default()),
            connections: Mutex::new(HashMap::new()),
            tls,
            body_bytes: AtomicU64::new(0),
        });
        let acceptor = {
            let shared = Arc::clone(&shared);
            thread::Builder::new()
                .name(format!("httpd-accept-{}", addr.port()))
                .spawn(move || accept_loop(listener, shared))
                .expect("spawn accept thread")
        };
        Server {
            addr,
            shared,
            acceptor: Some(acceptor),
        }
    }

    /// "http://127.0.0.1:PORT"
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// "https://127.0.0.1:PORT" (a [`start_tls`](Server::start_tls) server)
    pub fn https_url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// "127.0.0.1:PORT"
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// Every request received so far, in arrival order.
    pub fn requests(&self) -> Vec<Request> {
        lock(&self.shared.log).requests.clone()
    }

    /// Response body bytes written to clients so far (for Blob and Full
    /// replies; a client that hung up may not have read all of them).
    pub fn body_bytes(&self) -> u64 {
        self.shared.body_bytes.load(Ordering::SeqCst)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // Wake the accept loop with a connection of our own; it sees the
        // flag and returns, closing the listener. If even that connect
        // fails, leave the thread be rather than risk waiting forever.
        self.shared.stopping.store(true, Ordering::SeqCst);
        let woke = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1)).is_ok();
        if let Some(acceptor) = self.acceptor.take()
            && woke
        {
            let _ = acceptor.join();
        }
        // Cut the connections still open: their clients see EOF, and their
        // threads wake from reads and exit (a stalled one exits after its
        // pause).
        for (_, stream) in lock(&self.shared.connections).drain() {
            let _ = stream.shutdown(Shutdown::Both);
        }
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let mut next_id = 0u64;
    for stream in listener.incoming() {
        if shared.stopping.load(Ordering::SeqCst) {
            return;
        }
        let Ok(stream) = stream else {
            // Transient (e.g. out of descriptors): don't spin.
            thread::sleep(Duration::from_millis(10));
            continue;
        };
        let id = next_id;
        next_id += 1;
        if let Ok(clone) = stream.try_clone() {
            lock(&shared.connections).insert(id, clone);
        }
        let for_thread = Arc::clone(&shared);
        let spawned = thread::Builder::new()
            .name(format!("httpd-conn-{id}"))
            .spawn(move || {
                serve_connection(stream, &for_thread);
                lock(&for_thread.connections).remove(&id);
            });
        if spawned.is_err() {
            // The stream went down with the closure; forget its clone too.
            lock(&shared.connections).remove(&id);
        }
    }
}

/// One accepted connection: plain, or TLS over it.
enum Conn {
    Plain(TcpStream),
    Tls(Box<StreamOwned<ServerConnection, TcpStream>>),
}

impl Conn {
    /// Plain, or TLS when the server speaks it and the client's first byte
    /// starts a TLS handshake.
    fn accept(stream: TcpStream, tls: Option<&Arc<ServerConfig>>) -> io::Result<Conn> {
        let Some(config) = tls else {
            return Ok(Conn::Plain(stream));
        };
        let mut first = [0u8; 1];
        if stream.peek(&mut first)? == 1 && first[0] == 0x16 {
            let session = ServerConnection::new(Arc::clone(config)).map_err(io::Error::other)?;
            return Ok(Conn::Tls(Box::new(StreamOwned::new(session, stream))));
        }
        Ok(Conn::Plain(stream))
    }

    fn tcp(&self) -> &TcpStream {
        match self {
            Conn::Plain(s) => s,
            Conn::Tls(t) => &t.sock,
        }
    }

    fn is_tls(&self) -> bool {
        matches!(self, Conn::Tls(_))
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Plain(s) => s.read(buf),
            Conn::Tls(t) => t.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Conn::Plain(s) => s.write(buf),
            Conn::Tls(t) => t.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Conn::Plain(s) => s.flush(),
            Conn::Tls(t) => t.flush(),
        }
    }
}

/// Serve requests on one connection until either side ends it.
fn serve_connection(stream: TcpStream, shared: &Shared) {
    // Headers and body go out as separate writes; don't let Nagle's
    // algorithm hold the second one back waiting for an ACK.
    let _ = stream.set_nodelay(true);
    // A modest send queue (instead of the several MiB loopback grows to), so
    // that `body_bytes` stays close to what clients actually received: a
    // client that hangs up on a body costs at most this much more.
    let _ = set_send_buffer(&stream, SEND_BUFFER);
    let Ok(conn) = Conn::accept(stream, shared.tls.as_ref()) else {
        return;
    };
    let tls = conn.is_tls();
    let mut reader = BufReader::new(conn);
    // The loop ends at a clean EOF between requests, and also on a malformed
    // request or an I/O error: in every case this connection is finished.
    while let Ok(Some(mut request)) = read_request(&mut reader) {
        request.tls = tls;
        let n = {
            let mut log = lock(&shared.log);
            let key = (request.method.clone(), request.path().to_owned());
            let seen = log.seen.entry(key).or_insert(0);
            let n = *seen;
            *seen += 1;
            log.requests.push(request.clone());
            n
        };
        let reply = (shared.handler)(&request, n);

        let keep_open = match send_reply(reader.get_mut(), &request, &reply, shared) {
            Ok(keep_open) => keep_open,
            // A reply that resets the connection: no orderly shutdown, the
            // last close (SO_LINGER 0) sends the RST.
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return,
            // A write error means the client went away: just stop.
            Err(_) => false,
        };
        if !keep_open || wants_close(&request.headers) {
            break;
        }
    }
    let _ = reader.get_ref().tcp().shutdown(Shutdown::Both);
}

/// Whether a `Connection` header asks to close after this exchange.
fn wants_close(headers: &[(String, String)]) -> bool {
    find_header(headers, "connection").is_some_and(|v| {
        v.split(',')
            .any(|token| token.trim().eq_ignore_ascii_case("close"))
    })
}

fn find_header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

fn invalid(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_owned())
}

/// Read one CRLF- (or LF-) terminated line without its terminator.
/// `Ok(None)` at EOF before any byte.
fn read_line(reader: &mut impl BufRead) -> io::Result<Option<String>> {
    let mut line = Vec::new();
    reader
        .by_ref()
        .take(MAX_LINE)
        .read_until(b'\n', &mut line)?;
    if line.is_empty() {
        return Ok(None);
    }
    if line.pop() != Some(b'\n') {
        return Err(invalid("line too long or cut short"));
    }
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    Ok(Some(String::from_utf8_lossy(&line).into_owned()))
}

/// Read one request. `Ok(None)` if the client closed the connection cleanly
/// before starting another request.
fn read_request(reader: &mut impl BufRead) -> io::Result<Option<Request>> {
    // Tolerate stray blank lines between requests (RFC 9112 section 2.2).
    let request_line = loop {
        match read_line(reader)? {
            None => return Ok(None),
            Some(line) if line.is_empty() => continue,
            Some(line) => break line,
        }
    };
    let mut parts = request_line.split_whitespace();
    let (Some(method), Some(target), Some(_version)) = (parts.next(), parts.next(), parts.next())
    else {
        return Err(invalid("malformed request line"));
    };
    let (method, target) = (method.to_owned(), target.to_owned());

    let mut headers = Vec::new();
    loop {
        let line = read_line(reader)?.ok_or_else(|| invalid("EOF in headers"))?;
        if line.is_empty() {
            break;
        }
        if headers.len() == MAX_HEADERS {
            return Err(invalid("too many headers"));
        }
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| invalid("header without a colon"))?;
        headers.push((name.trim().to_owned(), value.trim().to_owned()));
    }

    let body = if find_header(&headers, "transfer-encoding").is_some() {
        read_chunked_body(reader)?
    } else if let Some(len) = find_header(&headers, "content-length") {
        let len: u64 = len.parse().map_err(|_| invalid("bad Content-Length"))?;
        if len > MAX_BODY {
            return Err(invalid("request body too large"));
        }
        let mut body = vec![0; len as usize];
        reader.read_exact(&mut body)?;
        body
    } else {
        Vec::new()
    };

    Ok(Some(Request {
        method,
        target,
        headers,
        body,
        tls: false,
    }))
}

/// Decode a chunked request body (for completeness: keeps the connection in
/// step should a client ever stream an upload).
fn read_chunked_body(reader: &mut impl BufRead) -> io::Result<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let line = read_line(reader)?.ok_or_else(|| invalid("EOF in chunked body"))?;
        let size = line.split(';').next().unwrap_or("").trim();
        let size = u64::from_str_radix(size, 16).map_err(|_| invalid("bad chunk size"))?;
        if size == 0 {
            // Skip trailers up to the blank line that ends the body.
            while !read_line(reader)?
                .ok_or_else(|| invalid("EOF in trailers"))?
                .is_empty()
            {}
            return Ok(body);
        }
        if body.len() as u64 + size > MAX_BODY {
            return Err(invalid("request body too large"));
        }
        let start = body.len();
        body.resize(start + size as usize, 0);
        reader.read_exact(&mut body[start..])?;
        if !read_line(reader)?
            .ok_or_else(|| invalid("EOF after chunk"))?
            .is_empty()
        {
            return Err(invalid("chunk not followed by CRLF"));
        }
    }
}

/// The body faults a reply asks for.
#[derive(Default)]
struct Faults {
    /// Content-Length to announce instead of the body's true length.
    declared_len: Option<u64>,
    cut_after: Option<u64>,
    stall_after: Option<(u64, Duration)>,
    /// End a cut with RST instead of FIN.
    reset: bool,
}

/// Write the reply. Returns whether the connection may serve another request.
fn send_reply(
    stream: &mut Conn,
    request: &Request,
    reply: &Reply,
    shared: &Shared,
) -> io::Result<bool> {
    match reply {
        Reply::Close => Ok(false),
        Reply::Raw {
            head,
            tail,
            piece,
            every,
            repeat,
        } => {
            stream.write_all(head)?;
            stream.flush()?;
            let end = Instant::now() + Duration::from_secs(120);
            loop {
                for p in tail.chunks((*piece).max(1)) {
                    if Instant::now() > end {
                        return Ok(false);
                    }
                    stream.write_all(p)?;
                    stream.flush()?;
                    thread::sleep(*every);
                }
                if !*repeat {
                    return Ok(false);
                }
            }
        }
        Reply::Full {
            status,
            headers,
            body,
        } => send_response(
            stream,
            request,
            *status,
            headers,
            body,
            &Faults::default(),
            shared,
        ),
        Reply::Blob {
            data,
            honour_range,
            cut_after,
            stall_after,
            reset,
            declared_len,
            headers,
        } => {
            let total = data.len() as u64;
            let mut headers = headers.clone();
            if find_header(&headers, "content-type").is_none() {
                headers.push(("Content-Type".into(), "application/octet-stream".into()));
            }
            let (status, body) = match request.range().filter(|_| *honour_range) {
                None => (200, &data[..]),
                Some((start, _)) if start >= total => {
                    headers.push(("Content-Range".into(), format!("bytes */{total}")));
                    (416, &[][..])
                }
                Some((start, end)) => {
                    let end = end.map_or(total - 1, |e| e.min(total - 1));
                    headers.push((
                        "Content-Range".into(),
                        format!("bytes {start}-{end}/{total}"),
                    ));
                    (206, &data[start as usize..=end as usize])
                }
            };
            let faults = Faults {
                declared_len: *declared_len,
                cut_after: *cut_after,
                stall_after: *stall_after,
                reset: *reset,
            };
            send_response(stream, request, status, &headers, body, &faults, shared)
        }
    }
}

/// Write status line, headers and (unless HEAD) body, applying `faults`.
/// Returns whether the connection may serve another request.
fn send_response(
    stream: &mut Conn,
    request: &Request,
    status: u16,
    headers: &[(String, String)],
    body: &[u8],
    faults: &Faults,
    shared: &Shared,
) -> io::Result<bool> {
    let actual = body.len() as u64;
    // The length the client is told. A Content-Length among the test's own
    // headers wins and is sent as written; `None` if it isn't a number.
    let own_length = find_header(headers, "content-length");
    let announced = match own_length {
        Some(value) => value.trim().parse::<u64>().ok(),
        None => Some(faults.declared_len.unwrap_or(actual)),
    };

    let mut head = format!("HTTP/1.1 {status} {}\r\n", reason(status));
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    if own_length.is_none() {
        head.push_str(&format!(
            "Content-Length: {}\r\n",
            announced.unwrap_or(actual)
        ));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())?;

    // How much of the body to send, and whether the connection is still in
    // step with what the client expects afterwards.
    let (mut to_send, mut keep_open) = match announced {
        Some(n) if n <= actual => (n, true),
        // Announced more than there is (or something unparseable): send
        // everything, then close so the client sees a short body rather
        // than waiting forever for the rest.
        _ => (actual, false),
    };
    if request.method.eq_ignore_ascii_case("HEAD") {
        to_send = 0;
    }
    if wants_close(headers) {
        keep_open = false;
    }

    // Faults: stop at the earlier threshold, clamped to the body's end.
    let cut = faults.cut_after.unwrap_or(u64::MAX);
    let stall = faults.stall_after.map_or(u64::MAX, |(n, _)| n);
    let stop = cut.min(stall).min(to_send);
    // In pieces, counted as they go, so that the count stops soon after a
    // client hangs up.
    for piece in body[..stop as usize].chunks(64 << 10) {
        stream.write_all(piece)?;
        shared
            .body_bytes
            .fetch_add(piece.len() as u64, Ordering::SeqCst);
    }
    stream.flush()?;
    match faults.stall_after {
        Some((_, pause)) if stall <= cut => {
            thread::sleep(pause);
            Ok(false)
        }
        _ if faults.cut_after.is_some() && faults.reset => {
            set_linger_zero(stream.tcp())?;
            Err(io::Error::from(io::ErrorKind::ConnectionReset))
        }
        _ if faults.cut_after.is_some() => Ok(false),
        _ => Ok(keep_open),
    }
}

/// The send buffer of a connection (the kernel doubles it).
const SEND_BUFFER: usize = 256 << 10;

fn set_send_buffer(stream: &TcpStream, bytes: usize) -> io::Result<()> {
    use nix::libc;
    use std::os::fd::AsRawFd;
    let size = bytes as libc::c_int;
    // SAFETY: a plain setsockopt on a socket we own, with a pointer to an
    // int that outlives the call.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            (&raw const size).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `SO_LINGER` with a zero timeout: the socket's last close sends a TCP
/// reset instead of a FIN.
fn set_linger_zero(stream: &TcpStream) -> io::Result<()> {
    use nix::libc;
    use std::os::fd::AsRawFd;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a plain setsockopt on a socket we own, with a pointer to a
    // correctly sized `linger` that outlives the call.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Reason phrases for the statuses tests are likely to use.
fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        206 => "Partial Content",
        301 => "Moved Permanently",
        302 => "Found",
        303 => "See Other",
        304 => "Not Modified",
        307 => "Temporary Redirect",
        308 => "Permanent Redirect",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        406 => "Not Acceptable",
        408 => "Request Timeout",
        409 => "Conflict",
        410 => "Gone",
        412 => "Precondition Failed",
        416 => "Range Not Satisfiable",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Status",
    }
}
