//! The scriptable test server in `common::httpd`, checked with a raw
//! `TcpStream` client so that what goes over the wire is exactly what the
//! assertions see.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::httpd::{Reply, Request, Server};
use serde_json::json;

/// A response as read off the wire.
#[derive(Debug)]
struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// The Content-Length the server announced.
    length: Option<u64>,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A minimal HTTP/1.1 client on one persistent connection.
struct Client {
    reader: BufReader<TcpStream>,
}

impl Client {
    fn connect(server: &Server) -> Client {
        let stream = TcpStream::connect(server.host()).unwrap();
        // A bug in the server should fail a test, not hang it.
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        Client {
            reader: BufReader::new(stream),
        }
    }

    fn send(&mut self, method: &str, target: &str, headers: &[(&str, &str)], body: &[u8]) {
        let mut req = format!("{method} {target} HTTP/1.1\r\nHost: test\r\n");
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        if !body.is_empty() {
            req.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        req.push_str("\r\n");
        let mut stream = self.reader.get_ref();
        stream.write_all(req.as_bytes()).unwrap();
        stream.write_all(body).unwrap();
    }

    /// Read status line and headers; `None` if the connection closed first.
    fn head(&mut self) -> Option<Response> {
        let mut line = String::new();
        if self.reader.read_line(&mut line).unwrap() == 0 {
            return None;
        }
        let status = line.split_whitespace().nth(1).unwrap().parse().unwrap();
        let mut headers = Vec::new();
        loop {
            line.clear();
            self.reader.read_line(&mut line).unwrap();
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            let (k, v) = line.split_once(':').unwrap();
            headers.push((k.trim().to_owned(), v.trim().to_owned()));
        }
        let length = headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
            .map(|(_, v)| v.parse().unwrap());
        Some(Response {
            status,
            headers,
            body: Vec::new(),
            length,
        })
    }

    /// Read a whole response: the body up to Content-Length, or less if the
    /// server closes the connection first.
    fn response(&mut self) -> Response {
        let mut resp = self.head().expect("connection closed before a response");
        let length = resp.length.expect("response without Content-Length");
        self.reader
            .by_ref()
            .take(length)
            .read_to_end(&mut resp.body)
            .unwrap();
        resp
    }

    /// Whether the server has closed the connection (nothing more to read).
    fn closed(&mut self) -> bool {
        let mut byte = [0u8; 1];
        self.reader.read(&mut byte).unwrap() == 0
    }

    /// One request, one response.
    fn exchange(&mut self, method: &str, target: &str, headers: &[(&str, &str)]) -> Response {
        self.send(method, target, headers, b"");
        self.response()
    }
}

/// GET on a fresh connection.
fn get(server: &Server, target: &str, headers: &[(&str, &str)]) -> Response {
    Client::connect(server).exchange("GET", target, headers)
}

fn blob_data() -> Arc<Vec<u8>> {
    Arc::new(common::data(10_000, 7))
}

#[test]
fn full_reply_is_sent_with_its_length_and_headers() {
    let server = Server::start(|_, _| {
        Reply::json(200, &json!({"tags": ["a", "b"]})).header("X-Test", "yes")
    });
    let resp = get(&server, "/v2/x/tags/list", &[]);
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("content-type"), Some("application/json"));
    assert_eq!(resp.header("x-test"), Some("yes"));
    assert_eq!(resp.length, Some(resp.body.len() as u64));
    let value: serde_json::Value = serde_json::from_slice(&resp.body).unwrap();
    assert_eq!(value, json!({"tags": ["a", "b"]}));
    assert!(server.url().starts_with("http://127.0.0.1:"));
    assert_eq!(server.url(), format!("http://{}", server.host()));
}

#[test]
fn redirect_and_plain_status() {
    let server = Server::start(|req, _| match req.path() {
        "/old" => Reply::redirect(307, "/new"),
        _ => Reply::status(404),
    });
    let resp = get(&server, "/old", &[]);
    assert_eq!(resp.status, 307);
    assert_eq!(resp.header("location"), Some("/new"));
    assert_eq!(resp.length, Some(0));
    let resp = get(&server, "/new", &[]);
    assert_eq!(resp.status, 404);
    assert_eq!(resp.length, Some(0));
}

#[test]
fn blob_honours_range() {
    let data = blob_data();
    let server = {
        let data = Arc::clone(&data);
        Server::start(move |_, _| Reply::blob(Arc::clone(&data)))
    };

    let resp = get(&server, "/blob", &[("Range", "bytes=100-199")]);
    assert_eq!(resp.status, 206);
    assert_eq!(resp.header("content-range"), Some("bytes 100-199/10000"));
    assert_eq!(resp.body, &data[100..200]);

    // Open-ended, and an end past the last byte, both stop at the end.
    for range in ["bytes=9000-", "bytes=9000-20000"] {
        let resp = get(&server, "/blob", &[("Range", range)]);
        assert_eq!(resp.status, 206, "{range}");
        assert_eq!(resp.header("content-range"), Some("bytes 9000-9999/10000"));
        assert_eq!(resp.body, &data[9000..]);
    }

    let resp = get(&server, "/blob", &[("Range", "bytes=10000-")]);
    assert_eq!(resp.status, 416);
    assert_eq!(resp.header("content-range"), Some("bytes */10000"));

    let resp = get(&server, "/blob", &[]);
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("content-range"), None);
    assert_eq!(resp.body, *data);
}

#[test]
fn blob_with_no_range_sends_everything() {
    let data = blob_data();
    let server = {
        let data = Arc::clone(&data);
        Server::start(move |_, _| Reply::blob(Arc::clone(&data)).no_range())
    };
    let resp = get(&server, "/blob", &[("Range", "bytes=100-199")]);
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("content-range"), None);
    assert_eq!(resp.length, Some(10_000));
    assert_eq!(resp.body, *data);
}

#[test]
fn requests_share_a_keep_alive_connection() {
    let data = blob_data();
    let server = {
        let data = Arc::clone(&data);
        Server::start(move |req, _| match req.path() {
            "/blob" => Reply::blob(Arc::clone(&data)),
            _ => Reply::bytes(200, "text/plain", b"hello".to_vec()),
        })
    };
    let mut client = Client::connect(&server);
    let first = client.exchange("GET", "/hello", &[]);
    assert_eq!(first.body, b"hello");
    let second = client.exchange("GET", "/blob", &[("Range", "bytes=0-9")]);
    assert_eq!(second.status, 206);
    assert_eq!(second.body, &data[..10]);
    // HEAD: headers only, and the connection stays in step afterwards.
    client.send("HEAD", "/blob", &[], b"");
    let head = client.head().unwrap();
    assert_eq!(head.status, 200);
    assert_eq!(head.length, Some(10_000));
    let third = client.exchange("GET", "/hello", &[]);
    assert_eq!(third.body, b"hello");
    assert_eq!(server.requests().len(), 4);

    // `Connection: close` ends it after the answer.
    let last = client.exchange("GET", "/hello", &[("Connection", "close")]);
    assert_eq!(last.body, b"hello");
    assert!(client.closed());
}

#[test]
fn cut_after_closes_mid_body() {
    let server = Server::start(|_, _| Reply::blob(blob_data()).cut_after(4096));
    let mut client = Client::connect(&server);
    let resp = client.exchange("GET", "/blob", &[]);
    assert_eq!(resp.status, 200);
    assert_eq!(resp.length, Some(10_000));
    assert_eq!(resp.body, &blob_data()[..4096]);
    assert!(client.closed());
}

#[test]
fn reset_after_tears_the_connection_down_with_rst() {
    let server = Server::start(|_, _| Reply::blob(blob_data()).reset_after(4096));
    let mut client = Client::connect(&server);
    client.send("GET", "/blob", &[], b"");
    let resp = client.head().expect("a response head");
    assert_eq!(resp.status, 200);
    assert_eq!(resp.length, Some(10_000));
    // Whatever of the 4096 bytes arrives before the reset, the connection
    // then fails with ECONNRESET: never a clean EOF, never more bytes.
    let mut body = Vec::new();
    let err = client
        .reader
        .read_to_end(&mut body)
        .expect_err("a reset, not an orderly close");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}");
    assert!(body.len() <= 4096 && body[..] == blob_data()[..body.len()]);
}

#[test]
fn stall_after_goes_quiet_then_closes() {
    let pause = Duration::from_millis(200);
    let server = Server::start(move |_, _| Reply::blob(blob_data()).stall_after(10, pause));
    let mut client = Client::connect(&server);
    let started = Instant::now();
    let resp = client.exchange("GET", "/blob", &[]);
    assert!(started.elapsed() >= pause - Duration::from_millis(20));
    assert_eq!(resp.length, Some(10_000));
    assert_eq!(resp.body, &blob_data()[..10]);
    assert!(client.closed());
}

#[test]
fn declared_len_lies_about_the_length() {
    let server = Server::start(|req, _| match req.path() {
        "/long" => Reply::blob(blob_data()).declared_len(12_000),
        "/short" => Reply::blob(blob_data()).declared_len(3_000),
        _ => Reply::status(200),
    });

    // Longer than the data: all of it, then the connection closes.
    let mut client = Client::connect(&server);
    let resp = client.exchange("GET", "/long", &[]);
    assert_eq!(resp.length, Some(12_000));
    assert_eq!(resp.body, *blob_data());
    assert!(client.closed());

    // Shorter: exactly the declared bytes, and the connection still works.
    let mut client = Client::connect(&server);
    let resp = client.exchange("GET", "/short", &[]);
    assert_eq!(resp.length, Some(3_000));
    assert_eq!(resp.body, &blob_data()[..3_000]);
    assert_eq!(client.exchange("GET", "/ok", &[]).status, 200);
}

#[test]
fn close_reply_answers_nothing_but_is_logged() {
    let server = Server::start(|_, _| Reply::Close);
    let mut client = Client::connect(&server);
    client.send("GET", "/gone", &[], b"");
    assert!(client.head().is_none());
    let log = server.requests();
    assert_eq!(log.len(), 1);
    assert_eq!(log[0].target, "/gone");
}

#[test]
fn counter_counts_per_method_and_path() {
    let server = Server::start(|_, n| {
        if n == 0 {
            Reply::status(503)
        } else {
            Reply::bytes(200, "text/plain", format!("try {n}").into_bytes())
        }
    });
    let mut client = Client::connect(&server);
    assert_eq!(client.exchange("GET", "/a?x=1", &[]).status, 503);
    // The query doesn't matter: same path, so this is the second.
    let resp = client.exchange("GET", "/a?x=2", &[]);
    assert_eq!((resp.status, resp.body.as_slice()), (200, &b"try 1"[..]));
    // Another path, or another method, counts from zero.
    assert_eq!(client.exchange("GET", "/b", &[]).status, 503);
    client.send("HEAD", "/a", &[], b"");
    assert_eq!(client.head().unwrap().status, 503);
    assert_eq!(client.exchange("GET", "/a", &[]).body, b"try 2");
}

#[test]
fn log_records_requests_as_sent() {
    let server = Server::start(|_, _| Reply::status(204));
    let mut client = Client::connect(&server);
    client.exchange(
        "GET",
        "/v2/a/blobs/sha256:00?ns=x",
        &[("Authorization", "Bearer t0k3n"), ("Range", "bytes=5-")],
    );
    client.send(
        "POST",
        "/token",
        &[("Content-Type", "text/plain")],
        b"scope=x",
    );
    assert_eq!(client.response().status, 204);

    let log: Vec<Request> = server.requests();
    assert_eq!(log.len(), 2);
    assert_eq!(log[0].method, "GET");
    assert_eq!(log[0].target, "/v2/a/blobs/sha256:00?ns=x");
    assert_eq!(log[0].path(), "/v2/a/blobs/sha256:00");
    assert_eq!(log[0].header("authorization"), Some("Bearer t0k3n"));
    assert_eq!(log[0].header("AUTHORIZATION"), Some("Bearer t0k3n"));
    assert_eq!(log[0].header("x-missing"), None);
    assert_eq!(log[0].range(), Some((5, None)));
    assert!(log[0].body.is_empty());
    assert_eq!(log[1].method, "POST");
    assert_eq!(log[1].body, b"scope=x");
    assert_eq!(log[1].range(), None);
}

#[test]
fn range_header_parsing() {
    let with = |value: &str| Request {
        method: "GET".into(),
        target: "/".into(),
        headers: vec![("Range".into(), value.into())],
        body: Vec::new(),
        tls: false,
    };
    assert_eq!(with("bytes=0-0").range(), Some((0, Some(0))));
    assert_eq!(with("bytes=7-").range(), Some((7, None)));
    assert_eq!(with("bytes=9-3").range(), None);
    assert_eq!(with("bytes=-500").range(), None);
    assert_eq!(with("bytes=0-1,5-6").range(), None);
    assert_eq!(with("items=0-1").range(), None);
}

#[test]
fn drop_stops_the_server_and_its_connections() {
    let server = Server::start(|_, _| Reply::status(200));
    let host = server.host();
    let mut client = Client::connect(&server);
    assert_eq!(client.exchange("GET", "/", &[]).status, 200);
    let started = Instant::now();
    drop(server);
    assert!(started.elapsed() < Duration::from_secs(1));
    // The idle keep-alive connection is closed, and nothing listens.
    assert!(client.closed());
    assert!(TcpStream::connect(host).is_err());
}
