//! A real OCI registry for integration tests: Debian's `docker-registry`
//! (CNCF distribution 2.8) running on a loopback port with throwaway storage,
//! plus helpers that push blobs, manifests and indexes through the registry's
//! HTTP upload API.
//!
//! The HTTP client here is deliberately tiny: one request per connection,
//! `Connection: close`, responses read to EOF. That is all a test needs and it
//! keeps the fixture free of extra dependencies.
//!
//! Behaviour of docker-registry 2.8 (filesystem storage) worth knowing:
//! - the upload `Location` is an absolute URL built from the request's `Host`
//!   and already carries a `_state` query parameter;
//! - manifests come back only for an `Accept` naming their OCI media type
//!   (no `Accept`, or `*/*`, gets 404 `MANIFEST_UNKNOWN`);
//! - an index is rejected (400 `MANIFEST_BLOB_UNKNOWN`) unless every child
//!   manifest is already in the repository;
//! - blobs are served directly (no redirect) and `Range` gets 206 with
//!   `Content-Range`; an unsatisfiable range gets 416 whose `Content-Length`
//!   is wrong (see `parse_response`);
//! - bodies without a preset length, such as large tag lists, are chunked.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use tempfile::TempDir;

const BINARY: &str = "docker-registry";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";

/// How long to wait for a freshly started registry to answer `GET /v2/`.
const START_TIMEOUT: Duration = Duration::from_secs(15);
/// How many fresh ports to try when the one we picked was taken meanwhile.
const START_ATTEMPTS: usize = 5;
/// Socket read/write timeout, so a wedged registry fails a test instead of hanging it.
const IO_TIMEOUT: Duration = Duration::from_secs(60);
/// Timeout for one readiness probe. Short, because whatever holds the port
/// (if the registry lost the race for it) may accept and never answer.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// A running `docker-registry`, killed when dropped.
pub struct Registry {
    child: Child,
    port: u16,
    /// Holds the config, the storage root and the log; removed on drop.
    dir: TempDir,
}

/// A parsed HTTP response.
struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Response {
    /// The first header named `name`, compared case-insensitively.
    fn header(&self, name: &str) -> Option<&str> {
        header(&self.headers, name)
    }
}

impl Registry {
    /// Start a registry on a free loopback port and wait until it serves `/v2/`.
    pub fn start() -> Registry {
        let binary = find_binary().unwrap_or_else(|| {
            panic!(
                "`{BINARY}` not found in PATH; install the Debian package: \
                 apt-get install -y docker-registry"
            )
        });
        let dir = TempDir::new().expect("create registry temp dir");
        let log = dir.path().join("registry.log");
        for attempt in 1..=START_ATTEMPTS {
            let port = free_port();
            let mut child = spawn(&binary, dir.path(), port);
            match wait_ready(&mut child, port) {
                Ok(()) => return Registry { child, port, dir },
                Err(why) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    let text = read_log(&log);
                    // Someone may have grabbed the port between our probe and
                    // the registry's bind; if so, try again on another port.
                    if attempt < START_ATTEMPTS && text.contains("address already in use") {
                        continue;
                    }
                    panic!("{BINARY} did not start on port {port} ({why}); its log:\n{text}");
                }
            }
        }
        unreachable!("the last attempt either returns or panics")
    }

    /// `127.0.0.1:PORT`
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.host())
    }

    /// Upload `bytes` as a blob of `repo` in two steps (start an upload
    /// session, then finish it with the whole content); returns its digest.
    pub fn push_blob(&self, repo: &str, bytes: &[u8]) -> String {
        let digest = super::sha256(bytes);
        let start = self.request("POST", &format!("/v2/{repo}/blobs/uploads/"), &[], &[]);
        assert_eq!(
            start.status,
            202,
            "POST blob upload to {repo}: {}",
            String::from_utf8_lossy(&start.body)
        );
        let location = start
            .header("Location")
            .expect("upload response has no Location header");
        // The session URL may be absolute or relative and usually carries a
        // `_state` query parameter already, so the digest may need `&` or `?`.
        let path = self.path_of(location);
        let sep = if path.contains('?') { '&' } else { '?' };
        let finish = self.request(
            "PUT",
            &format!("{path}{sep}digest={digest}"),
            &[("Content-Type", "application/octet-stream")],
            bytes,
        );
        assert_eq!(
            finish.status,
            201,
            "PUT blob {digest} to {repo}: {}",
            String::from_utf8_lossy(&finish.body)
        );
        digest
    }

    /// Put manifest `bytes` (of `media_type`) at `repo:reference`; returns its digest.
    pub fn push_manifest(
        &self,
        repo: &str,
        reference: &str,
        media_type: &str,
        bytes: &[u8],
    ) -> String {
        let digest = super::sha256(bytes);
        let resp = self.request(
            "PUT",
            &format!("/v2/{repo}/manifests/{reference}"),
            &[("Content-Type", media_type)],
            bytes,
        );
        assert_eq!(
            resp.status,
            201,
            "PUT manifest {repo}:{reference}: {}",
            String::from_utf8_lossy(&resp.body)
        );
        if let Some(d) = resp.header("Docker-Content-Digest") {
            assert_eq!(d, digest, "registry computed a different manifest digest");
        }
        digest
    }

    /// Push `image` (empty config, every layer, then the manifest) as
    /// `repo:tag`; returns the manifest's digest and size.
    pub fn push_image(&self, repo: &str, tag: &str, image: &super::Image) -> (String, usize) {
        self.push_blob(repo, b"{}");
        for layer in &image.layers {
            self.push_blob(repo, &layer.data);
        }
        let bytes = serde_json::to_vec(&image.manifest_json()).expect("serialize manifest");
        let digest = self.push_manifest(repo, tag, OCI_MANIFEST, &bytes);
        (digest, bytes.len())
    }

    /// Push an image index as `repo:tag` listing already-pushed manifests,
    /// each given as (digest, size, os, architecture); returns its digest.
    pub fn push_index(
        &self,
        repo: &str,
        tag: &str,
        children: &[(String, usize, &str, &str)],
    ) -> String {
        let manifests: Vec<_> = children
            .iter()
            .map(|(digest, size, os, arch)| {
                json!({
                    "mediaType": OCI_MANIFEST,
                    "digest": digest,
                    "size": size,
                    "platform": {"os": os, "architecture": arch},
                })
            })
            .collect();
        let index = json!({
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": manifests,
        });
        let bytes = serde_json::to_vec(&index).expect("serialize index");
        self.push_manifest(repo, tag, OCI_INDEX, &bytes)
    }

    /// `GET path` with extra `headers`; returns status, response headers and body.
    ///
    /// Manifest GETs need an `Accept` header naming the stored media type:
    /// without one (or with only `*/*`) docker-registry 2.8 answers 404
    /// `MANIFEST_UNKNOWN` for OCI manifests and indexes.
    pub fn get(
        &self,
        path: &str,
        headers: &[(&str, &str)],
    ) -> (u16, Vec<(String, String)>, Vec<u8>) {
        let r = self.request("GET", path, headers, &[]);
        (r.status, r.headers, r.body)
    }

    /// Where the registry stores the content of blob `digest` (filesystem
    /// storage: `docker/registry/v2/blobs/ALG/XX/HEX/data`). A test may
    /// rewrite it to make the registry serve a truncated, oversized or
    /// corrupted blob: the registry serves whatever the file holds, with the
    /// file's size as the length.
    pub fn blob_file(&self, digest: &str) -> PathBuf {
        let (alg, hex) = digest.split_once(':').expect("ALG:HEX digest");
        self.dir
            .path()
            .join("storage/docker/registry/v2/blobs")
            .join(alg)
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }

    /// The registry's log so far (its stdout and stderr).
    fn log(&self) -> String {
        read_log(&self.dir.path().join("registry.log"))
    }

    /// Turn a Location header into a request target on this registry.
    fn path_of(&self, location: &str) -> String {
        if location.starts_with('/') {
            return location.to_owned();
        }
        let rest = location
            .strip_prefix("http://")
            .unwrap_or_else(|| panic!("unexpected Location {location:?}"));
        let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        assert_eq!(
            authority,
            self.host(),
            "Location points elsewhere: {location}"
        );
        if path.is_empty() { "/" } else { path }.to_owned()
    }

    /// Send one request and panic on transport errors.
    fn request(&self, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Response {
        http(self.port, IO_TIMEOUT, method, path, headers, body)
            .unwrap_or_else(|e| panic!("{method} {path}: {e}\nregistry log:\n{}", self.log()))
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The first `docker-registry` executable on PATH.
fn find_binary() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(BINARY))
        .find(|p| p.is_file())
}

/// A port that was free a moment ago: bind port 0, note the port, release it.
fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local addr").port()
}

/// Write a config for `port` into `dir` and start the registry on it, its
/// output going to `dir/registry.log`.
fn spawn(binary: &Path, dir: &Path, port: u16) -> Child {
    let storage = dir.join("storage");
    let config = dir.join("config.yml");
    // Filesystem storage, no auth, deletes allowed, quiet logs, and no access log.
    let yaml = format!(
        "version: 0.1\n\
         log:\n  level: error\n  accesslog:\n    disabled: true\n\
         storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
         http:\n  addr: 127.0.0.1:{port}\n",
        storage.display()
    );
    std::fs::write(&config, yaml).expect("write registry config");
    // Truncated per attempt, so a retry's log only shows that attempt.
    let log = File::create(dir.join("registry.log")).expect("create registry log");
    let mut cmd = Command::new(binary);
    cmd.arg("serve")
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("clone log handle"))
        .stderr(log);
    // REGISTRY_* variables override the config file; keep the caller's out.
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("REGISTRY_") {
            cmd.env_remove(name);
        }
    }
    cmd.spawn()
        .unwrap_or_else(|e| panic!("start {}: {e}", binary.display()))
}

fn read_log(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// Poll `GET /v2/` until it answers 200; on failure (the process exited or
/// the deadline passed) says why.
fn wait_ready(child: &mut Child, port: u16) -> Result<(), String> {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("exited with {status}"));
        }
        // Connection refused until the registry has bound its port.
        if let Ok(r) = http(port, PROBE_TIMEOUT, "GET", "/v2/", &[], &[])
            && r.status == 200
        {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!("no 200 from /v2/ within {START_TIMEOUT:?}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Send one HTTP/1.1 request to `127.0.0.1:port` on a fresh connection and
/// read the whole response, giving up if the socket stalls for `timeout`.
fn http(
    port: u16,
    timeout: Duration,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<Response> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;

    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())?;
    stream.write_all(body)?;
    stream.flush()?;

    // With `Connection: close` the server ends the stream after the response,
    // so reading to EOF yields exactly one response.
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    parse_response(&raw, method == "HEAD")
}

/// Case-insensitive header lookup.
fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

fn bad(msg: impl Into<String>) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg.into())
}

/// Split a complete raw HTTP/1.1 response into status, headers and body.
fn parse_response(raw: &[u8], head_request: bool) -> std::io::Result<Response> {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| bad("response ended before the end of its headers"))?;
    let head = std::str::from_utf8(&raw[..end]).map_err(|_| bad("non-UTF-8 response head"))?;
    let rest = &raw[end + 4..];

    let mut lines = head.split("\r\n");
    // Status line: `HTTP/1.1 200 OK`.
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| bad(format!("bad status line {status_line:?}")))?;
    let headers = lines
        .map(|l| {
            let (n, v) = l
                .split_once(':')
                .ok_or_else(|| bad(format!("bad header line {l:?}")))?;
            Ok((n.trim().to_owned(), v.trim().to_owned()))
        })
        .collect::<std::io::Result<Vec<_>>>()?;

    // Bodies: none for HEAD/1xx/204/304; else chunked, else Content-Length,
    // else everything up to EOF.
    let body = if head_request || status / 100 == 1 || status == 204 || status == 304 {
        Vec::new()
    } else if header(&headers, "Transfer-Encoding")
        .is_some_and(|te| te.to_ascii_lowercase().contains("chunked"))
    {
        dechunk(rest)?
    } else if let Some(len) = header(&headers, "Content-Length") {
        let len: usize = len
            .parse()
            .map_err(|_| bad(format!("bad Content-Length {len:?}")))?;
        if rest.len() >= len {
            rest[..len].to_vec()
        } else if status >= 400 {
            // docker-registry 2.8 answers an unsatisfiable Range with 416 and
            // a short text body but keeps the blob's full size as
            // Content-Length; for errors, take what was sent before EOF.
            rest.to_vec()
        } else {
            return Err(bad(format!(
                "body truncated: {} of {len} bytes",
                rest.len()
            )));
        }
    } else {
        rest.to_vec()
    };
    Ok(Response {
        status,
        headers,
        body,
    })
}

/// Decode a chunked transfer-encoded body: `SIZE[;ext]\r\nDATA\r\n`…, ending
/// with a zero-size chunk and optional trailers (which are ignored).
fn dechunk(mut raw: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let eol = raw
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or_else(|| bad("chunked body ended inside a chunk size line"))?;
        let line = std::str::from_utf8(&raw[..eol]).map_err(|_| bad("bad chunk size line"))?;
        let size_hex = line.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_hex, 16)
            .map_err(|_| bad(format!("bad chunk size {line:?}")))?;
        raw = &raw[eol + 2..];
        if size == 0 {
            return Ok(body);
        }
        if raw.len() < size + 2 || &raw[size..size + 2] != b"\r\n" {
            return Err(bad("chunked body truncated"));
        }
        body.extend_from_slice(&raw[..size]);
        raw = &raw[size + 2..];
    }
}
