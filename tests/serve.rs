//! `cloudimg serve` against real clients — curl, qemu-img's HTTP block
//! driver, skopeo, cloudimg itself as a registry client and as a mirror
//! user — and the faults of docs/RELIABILITY.md's "Serve" section.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::httpd::{Reply, Server};
use common::*;
use tempfile::TempDir;

/// A running `cloudimg serve` on a free loopback port, its stderr collected.
struct Serve {
    child: Child,
    port: u16,
    log: Arc<Mutex<Vec<String>>>,
}

impl Serve {
    fn start(root: &Path, args: &[&str]) -> Serve {
        let mut child = bin()
            .args([
                "serve",
                "--root",
                root.to_str().unwrap(),
                "--listen",
                "127.0.0.1:0",
            ])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start cloudimg serve");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        let l = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("listening on http://127.0.0.1:").nth(1) {
                    let port: u16 = rest.split('/').next().unwrap().parse().unwrap();
                    let _ = tx.send(port);
                }
                l.lock().unwrap().push(line);
            }
        });
        let port = rx
            .recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|_| panic!("serve did not start: {:?}", log.lock().unwrap()));
        Serve { child, port, log }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    /// Wait (at most `secs`) for a log line containing `text`.
    fn wait_log(&self, text: &str, secs: u64) -> String {
        let until = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(l) = self.log().into_iter().find(|l| l.contains(text)) {
                return l;
            }
            assert!(
                Instant::now() < until,
                "no log line with {text:?}: {:#?}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The request log lines for `path`, in order.
    fn lines_for(&self, path: &str) -> Vec<String> {
        self.log()
            .into_iter()
            .filter(|l| l.contains(&format!(" {path} ")))
            .collect()
    }

    /// The `n`th (1-based) request log line for `path`, waited for: a line
    /// is written once its response is over, which may be just after the
    /// client has its bytes.
    fn nth_line(&self, path: &str, n: usize) -> String {
        let until = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(l) = self.lines_for(path).get(n - 1) {
                return l.clone();
            }
            assert!(
                Instant::now() < until,
                "no line {n} for {path}: {:#?}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn curl(args: &[&str]) -> Output {
    Command::new("curl")
        .args(["-sS", "--max-time", "60"])
        .args(args)
        .output()
        .expect("curl must be installed")
}

/// Body bytes of a successful curl, asserting success.
fn fetch(args: &[&str]) -> Vec<u8> {
    let out = curl(args);
    assert!(
        out.status.success(),
        "curl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// Send raw bytes, read the whole answer (the server closes after it).
fn raw(port: u16, request: &[u8]) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(request).unwrap();
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    String::from_utf8_lossy(&got).into_owned()
}

/// A response head's field (case-insensitive), from `curl -D -` or raw text.
fn field<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

fn status(head: &str) -> u16 {
    head.split_whitespace().nth(1).unwrap().parse().unwrap()
}

const PART: usize = 2 << 20;

/// A root with `windows/win11` (tags latest and v1: a three-part qcow2-typed
/// disk) and `tools/box` (a container image).
struct Fixture {
    _tmp: TempDir,
    root: PathBuf,
    layout: LayoutDir,
    image: Image,
    disk: Vec<u8>,
    digest: String,
}

fn fixture_sized(len: usize) -> Fixture {
    let tmp = TempDir::new().unwrap();
    let root = tmp.path().join("root");
    let layout = LayoutDir::new(&root.join("windows/win11"));
    let image = Image::split(&data(len, 7), PART);
    let digest = layout.put_image(Some("latest"), &image);
    layout.put_image(Some("v1"), &image);
    let container = LayoutDir::new(&root.join("tools/box"));
    container.put_image(
        Some("latest"),
        &Image {
            artifact_type: None,
            config_media_type: OCI_CONFIG.to_owned(),
            layers: vec![Layer::new(
                "application/vnd.oci.image.layer.v1.tar",
                "fs",
                data(1000, 3),
            )],
        },
    );
    let disk = expected_disk(&image);
    Fixture {
        _tmp: tmp,
        root,
        layout,
        image,
        disk,
        digest,
    }
}

fn fixture() -> Fixture {
    fixture_sized(2 * PART + (1 << 20) + 12345)
}

impl Fixture {
    /// The blob files of the disk parts, in disk order.
    fn part_paths(&self) -> Vec<PathBuf> {
        let mut parts: Vec<&Layer> = self
            .image
            .layers
            .iter()
            .filter(|l| l.media_type.contains(".disk."))
            .collect();
        parts.sort_by(|a, b| a.title.cmp(&b.title));
        parts
            .iter()
            .map(|l| self.layout.blob_path(&sha256(&l.data)))
            .collect()
    }
}

// ---- /dl/ with curl ----

#[test]
fn a_full_get_is_byte_identical_to_cloudimg_get() {
    let f = fixture();
    let s = Serve::start(&f.root, &[]);
    let body = fetch(&[&s.url("/dl/windows/win11")]);
    assert_eq!(body.len(), f.disk.len());
    assert!(body == f.disk);
    let got = run(&["get", "-q", &f.layout.source("latest")]);
    assert!(got.stdout == body);
    let line = s.nth_line("/dl/windows/win11", 1);
    assert!(line.contains(&format!(" {} ", f.disk.len())), "{line}");
    assert!(line.contains("hashed 3 blobs"), "{line}");
}

#[test]
fn head_answers_what_get_would() {
    let f = fixture();
    let s = Serve::start(&f.root, &[]);
    let out = curl(&["-I", &s.url("/dl/windows/win11:v1")]);
    let head = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(status(&head), 200, "{head}");
    let len = f.disk.len().to_string();
    assert_eq!(field(&head, "content-length"), Some(len.as_str()));
    assert_eq!(
        field(&head, "etag"),
        Some(format!("\"{}\"", f.digest).as_str())
    );
    assert_eq!(field(&head, "accept-ranges"), Some("bytes"));
    assert_eq!(
        field(&head, "content-type"),
        Some("application/octet-stream")
    );
    assert_eq!(
        field(&head, "content-disposition"),
        Some("attachment; filename=\"win11.qcow2\"")
    );
    assert!(field(&head, "last-modified").unwrap().ends_with(" GMT"));
    // Nothing follows the head of a HEAD.
    let answer = raw(
        s.port,
        b"HEAD /dl/windows/win11 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert!(answer.ends_with("\r\n\r\n"), "{answer:?}");
    // HEAD hashes nothing.
    s.nth_line("/dl/windows/win11", 1);
    assert!(
        s.lines_for("/dl/windows/win11")
            .iter()
            .all(|l| !l.contains("hashed"))
    );
}

#[test]
fn ranges_inside_across_and_at_the_end_of_parts() {
    let f = fixture();
    let s = Serve::start(&f.root, &[]);
    let url = s.url("/dl/windows/win11");
    let total = f.disk.len();
    let p = PART;
    for (spec, start, end) in [
        ("100-199".to_owned(), 100, 200),
        (format!("{}-{}", p - 10, p + 9), p - 10, p + 10),
        (format!("{}-{}", p - 1, 2 * p), p - 1, 2 * p + 1),
        (format!("{}-", total - 1), total - 1, total),
        (format!("{}-{}", total - 5, total + 1000), total - 5, total),
        ("-1000".to_owned(), total - 1000, total),
        (format!("{}-", 2 * p - 3), 2 * p - 3, total),
        ("0-".to_owned(), 0, total),
    ] {
        let out = curl(&["-D", "/dev/stderr", "-r", &spec, &url]);
        let head = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(status(&head), 206, "{spec}: {head}");
        assert_eq!(
            field(&head, "content-range"),
            Some(format!("bytes {start}-{}/{total}", end - 1).as_str()),
            "{spec}"
        );
        assert!(out.stdout == f.disk[start..end], "{spec}");
    }
    // Past the end: 416 naming the size.
    let out = curl(&["-D", "/dev/stderr", "-r", &format!("{total}-"), &url]);
    let head = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(status(&head), 416, "{head}");
    assert_eq!(
        field(&head, "content-range"),
        Some(format!("bytes */{total}").as_str())
    );
    // Several ranges: the whole body.
    let out = curl(&["-D", "/dev/stderr", "-r", "0-1,5-6", &url]);
    assert_eq!(status(&String::from_utf8_lossy(&out.stderr)), 200);
    assert!(out.stdout == f.disk);
}

#[test]
fn curl_resumes_an_interrupted_download_to_identical_bytes() {
    let f = fixture();
    let s = Serve::start(&f.root, &[]);
    let tmp = TempDir::new().unwrap();
    let file = tmp.path().join("disk.qcow2");
    std::fs::write(&file, &f.disk[..PART + 4321]).unwrap();
    fetch(&[
        "-C",
        "-",
        "-o",
        file.to_str().unwrap(),
        &s.url("/dl/windows/win11"),
    ]);
    assert!(std::fs::read(&file).unwrap() == f.disk);
}

#[test]
fn conditional_requests_honour_the_etag() {
    let f = fixture();
    let s = Serve::start(&f.root, &[]);
    let url = s.url("/dl/windows/win11");
    let etag = format!("\"{}\"", f.digest);
    let code = |args: &[&str]| {
        let out = curl(
            &[
                &["-o", "/dev/null", "-w", "%{http_code} %{size_download}"],
                args,
                &[url.as_str()],
            ]
            .concat(),
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert_eq!(code(&["-H", &format!("If-None-Match: {etag}")]), "304 0");
    assert_eq!(
        code(&["-H", "If-None-Match: \"sha256:other\""]),
        format!("200 {}", f.disk.len())
    );
    assert_eq!(
        code(&["-H", &format!("If-Range: {etag}"), "-r", "0-9"]),
        "206 10"
    );
    assert_eq!(
        code(&["-H", "If-Range: \"sha256:other\"", "-r", "0-9"]),
        format!("200 {}", f.disk.len())
    );
}

#[test]
fn names_tags_digests_and_kinds_resolve_as_oci_dir_does() {
    let f = fixture();
    // A second image, by tag only (no latest, two manifests).
    let other = LayoutDir::new(&f.root.join("linux"));
    let img = Image::split(&data(300_000, 9), 100_000);
    let d1 = other.put_image(Some("a"), &img);
    other.put_image(Some("b"), &Image::split(&data(1000, 1), 600));
    let s = Serve::start(&f.root, &[]);
    s.wait_log("3 images: linux, tools/box, windows/win11", 5);
    assert!(fetch(&[&s.url("/dl/linux:a")]) == expected_disk(&img));
    assert!(fetch(&[&s.url(&format!("/dl/linux@{d1}"))]) == expected_disk(&img));
    assert!(fetch(&[&s.url(&format!("/dl/windows/win11@{}", f.digest))]) == f.disk);
    let code = |path: &str| {
        let out = curl(&["-o", "/dev/stderr", "-w", "%{http_code}", &s.url(path)]);
        (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (c, body) = code("/dl/linux");
    assert_eq!(c, "404", "{body}");
    // Two tagged manifests, none `latest`: the name is ambiguous.
    assert!(body.contains("pick one with linux@DIGEST"), "{body}");
    assert_eq!(code("/dl/nothing/here").0, "404");
    assert_eq!(code("/dl/windows/win11:nope").0, "404");
    let (c, body) = code("/dl/tools/box");
    assert_eq!(c, "405");
    assert!(
        body.starts_with("cloudimg: tools/box is a container image"),
        "{body}"
    );
    assert_eq!(body.lines().count(), 1);
    assert_eq!(code("/elsewhere").0, "404");
}

#[test]
fn hostile_paths_are_refused_and_nothing_outside_the_root_is_served() {
    let f = fixture();
    // A layout outside the root, reachable through a symlink inside it.
    let outside = TempDir::new().unwrap();
    let secret = LayoutDir::new(&outside.path().join("secret"));
    secret.put_image(Some("latest"), &Image::split(&data(5000, 5), 3000));
    std::os::unix::fs::symlink(outside.path().join("secret"), f.root.join("escape")).unwrap();
    std::os::unix::fs::symlink(outside.path(), f.root.join("up")).unwrap();
    // A link that stays inside the root is followed.
    std::os::unix::fs::symlink("windows/win11", f.root.join("alias")).unwrap();
    let s = Serve::start(&f.root, &[]);
    for path in [
        "/dl/../x",
        "/dl/windows/../../etc",
        "/dl/%2e%2e/secret",
        "/dl/%2E%2E%2Fsecret",
        "/dl/windows//win11",
        "/dl/win%00dows",
        "/dl/.cloudimg-serve-verdicts",
        "/dl/windows/win11:../x",
        "/dl/a@sha256:../../etc/passwd",
        "/v2/../../x/tags/list",
        "/v2/a/blobs/sha256:..%2f..%2fx",
    ] {
        let answer = raw(
            s.port,
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        );
        assert_eq!(status(&answer), 400, "{path}: {answer}");
    }
    assert_eq!(
        status(&raw(s.port, b"GET /dl/escape HTTP/1.1\r\n\r\n")),
        404
    );
    assert_eq!(
        status(&raw(s.port, b"GET /dl/up/secret HTTP/1.1\r\n\r\n")),
        404
    );
    assert!(fetch(&[&s.url("/dl/alias")]) == f.disk);
    // A NUL in the raw request line is not HTTP.
    assert_eq!(status(&raw(s.port, b"GET /dl/a\0b HTTP/1.1\r\n\r\n")), 400);
    // Still serving.
    assert!(fetch(&[&s.url("/dl/windows/win11")]) == f.disk);
}

#[test]
fn qemu_img_reads_the_disk_over_http() {
    let tmp = TempDir::new().unwrap();
    let p = |n: &str| tmp.path().join(n).to_str().unwrap().to_owned();
    let mut guest = noise(6 << 20, 11);
    guest.resize(20 << 20, 0);
    guest.extend(noise(3 << 20, 12));
    std::fs::write(p("guest.raw"), &guest).unwrap();
    let q = Command::new("qemu-img")
        .args([
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            &p("guest.raw"),
            &p("disk.qcow2"),
        ])
        .output()
        .unwrap();
    assert!(q.status.success());
    let qcow2 = std::fs::read(p("disk.qcow2")).unwrap();
    let root = tmp.path().join("root");
    LayoutDir::new(&root.join("vm")).put_image(Some("latest"), &Image::split(&qcow2, 1_900_000));
    let s = Serve::start(&root, &[]);
    let url = s.url("/dl/vm");
    let info = Command::new("qemu-img")
        .args(["info", &url])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&info.stdout);
    assert!(
        info.status.success(),
        "{}",
        String::from_utf8_lossy(&info.stderr)
    );
    assert!(text.contains("file format: qcow2"), "{text}");
    assert!(text.contains("virtual size: 23 MiB"), "{text}");
    let cmp = Command::new("qemu-img")
        .args(["compare", &url, &p("guest.raw")])
        .output()
        .unwrap();
    assert!(
        cmp.status.success(),
        "{}{}",
        String::from_utf8_lossy(&cmp.stdout),
        String::from_utf8_lossy(&cmp.stderr)
    );
    // qemu reads by ranges over kept-alive connections.
    let log = s.lines_for("/dl/vm");
    assert!(
        log.iter().filter(|l| l.contains(" 206 ")).count() > 3,
        "{log:#?}"
    );
}

// ---- /v2/ with registry clients ----

#[test]
fn registry_clients_read_the_v2_view() {
    let f = fixture();
    let s = Serve::start(&f.root, &[]);
    let reference = format!("{}/windows/win11:v1", s.host());
    let got = run(&["get", "-q", "--plain-http", &reference]);
    assert!(
        got.status.success(),
        "{}",
        String::from_utf8_lossy(&got.stderr)
    );
    assert!(got.stdout == f.disk);
    let inspect = run(&["inspect", &reference]);
    let text = String::from_utf8_lossy(&inspect.stdout);
    assert!(
        text.contains(&f.digest) && text.contains("cloud-image"),
        "{text}"
    );
    let pinned = format!("{}/windows/win11@{}", s.host(), f.digest);
    assert!(run(&["get", "-q", &pinned]).stdout == f.disk);

    // skopeo copies it into a layout that cloudimg reads back identically.
    let out = TempDir::new().unwrap();
    let dest = format!("oci:{}:v1", out.path().join("copy").display());
    let sk = Command::new("skopeo")
        .args([
            "copy",
            "--src-tls-verify=false",
            &format!("docker://{reference}"),
            &dest,
        ])
        .output()
        .expect("skopeo must be installed");
    assert!(
        sk.status.success(),
        "{}",
        String::from_utf8_lossy(&sk.stderr)
    );
    assert!(run(&["get", "-q", &dest]).stdout == f.disk);

    let tags = fetch(&[&s.url("/v2/windows/win11/tags/list")]);
    let tags: serde_json::Value = serde_json::from_slice(&tags).unwrap();
    assert_eq!(tags["tags"], serde_json::json!(["latest", "v1"]));
    let error = |path: &str, method: &str| {
        let out = curl(&["-X", method, "-D", "/dev/stderr", &s.url(path)]);
        let head = String::from_utf8_lossy(&out.stderr).into_owned();
        let body: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        (
            status(&head),
            body["errors"][0]["code"].as_str().unwrap().to_owned(),
        )
    };
    let zero = format!("sha256:{}", "0".repeat(64));
    assert_eq!(
        error("/v2/windows/win11/manifests/nope", "GET"),
        (404, "MANIFEST_UNKNOWN".into())
    );
    assert_eq!(
        error(&format!("/v2/windows/win11/manifests/{zero}"), "GET"),
        (404, "MANIFEST_UNKNOWN".into())
    );
    assert_eq!(
        error(&format!("/v2/windows/win11/blobs/{zero}"), "GET"),
        (404, "BLOB_UNKNOWN".into())
    );
    assert_eq!(
        error("/v2/nobody/tags/list", "GET"),
        (404, "NAME_UNKNOWN".into())
    );
    assert_eq!(
        error("/v2/windows/win11/manifests/v1", "PUT"),
        (405, "UNSUPPORTED".into())
    );
    assert_eq!(
        error("/v2/windows/win11/blobs/uploads/", "POST"),
        (405, "UNSUPPORTED".into())
    );
    // Manifests carry their digest and media type.
    let out = curl(&["-I", &s.url("/v2/windows/win11/manifests/v1")]);
    let head = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(
        field(&head, "docker-content-digest"),
        Some(f.digest.as_str())
    );
    assert_eq!(
        field(&head, "content-type"),
        Some("application/vnd.oci.image.manifest.v1+json")
    );
}

#[test]
fn cloudimg_uses_serve_as_a_mirror() {
    let f = fixture();
    let s = Serve::start(&f.root, &[]);
    // The origin has the manifest and no blobs: only the mirror can help.
    let manifest = std::fs::read(f.layout.blob_path(&f.digest)).unwrap();
    let digest = f.digest.clone();
    let origin = Server::start(move |req, _| {
        if req.path().contains("/manifests/") {
            Reply::Full {
                status: 200,
                headers: vec![
                    (
                        "Content-Type".into(),
                        "application/vnd.oci.image.manifest.v1+json".into(),
                    ),
                    ("Docker-Content-Digest".into(), digest.clone()),
                ],
                body: manifest.clone(),
            }
        } else {
            Reply::status(404)
        }
    });
    let reference = format!("{}/windows/win11:v1", origin.host());
    let without = run(&["get", "-q", "--retries", "0", &reference]);
    assert!(!without.status.success());
    let got = run(&["get", "-q", "--mirror", &s.url(""), &reference]);
    assert!(
        got.status.success(),
        "{}",
        String::from_utf8_lossy(&got.stderr)
    );
    assert!(got.stdout == f.disk);
    assert!(
        s.log()
            .iter()
            .any(|l| l.contains("/v2/windows/win11/blobs/sha256:"))
    );
}

// ---- verification and faults ----

/// Flip one byte in the middle of a file, keeping its size (and inode).
fn corrupt(path: &Path) {
    let mut bytes = std::fs::read(path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(path, bytes).unwrap();
}

/// GET that must end short: curl fails with "transfer closed" (18) or a
/// reset, with fewer bytes than Content-Length.
fn assert_cut_short(url: &str, total: usize) {
    let out = curl(&["-D", "/dev/stderr", url]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(status(&err), 200, "{err}");
    assert!(!out.status.success(), "a damaged disk ended cleanly: {err}");
    assert!(out.stdout.len() < total, "{} of {total}", out.stdout.len());
}

#[test]
fn a_corrupted_blob_aborts_before_content_length_and_is_served_once_restored() {
    let f = fixture();
    let parts = f.part_paths();
    let s = Serve::start(&f.root, &[]);
    let url = s.url("/dl/windows/win11");
    let mut n = 0;
    for (i, part) in parts.iter().enumerate() {
        let good = std::fs::read(part).unwrap();
        corrupt(part);
        assert_cut_short(&url, f.disk.len());
        n += 3;
        let line = s.nth_line("/dl/windows/win11", n - 2);
        assert!(line.contains("aborted before Content-Length"), "{line}");
        assert!(line.contains("digest mismatch"), "part {i}: {line}");
        // Known bad now: a range of it is refused before any byte.
        let out = curl(&["-o", "/dev/null", "-w", "%{http_code}", "-r", "0-", &url]);
        assert_eq!(String::from_utf8_lossy(&out.stdout), "500");
        std::fs::write(part, &good).unwrap();
        assert!(fetch(&[&url]) == f.disk, "part {i} restored");
    }
    // The same holds for a range request on a blob never hashed before.
    corrupt(&parts[1]);
    let range = format!("{}-{}", PART + 10, PART + 20);
    let out = curl(&[
        "-o",
        "/dev/stderr",
        "-w",
        "%{http_code}",
        "-r",
        &range,
        &url,
    ]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "500");
    assert!(String::from_utf8_lossy(&out.stderr).contains("digest mismatch"));
}

#[test]
fn verdicts_are_remembered_across_requests_and_restarts_until_a_file_changes() {
    let f = fixture();
    // Verdicts are remembered only for files older than the timestamp
    // granularity allowance (two seconds).
    std::thread::sleep(Duration::from_millis(2100));
    let url_path = "/dl/windows/win11";
    {
        let s = Serve::start(&f.root, &[]);
        assert!(fetch(&[&s.url(url_path)]) == f.disk);
        assert!(fetch(&["-r", "0-99", &s.url(url_path)]) == f.disk[..100]);
        assert!(s.nth_line(url_path, 1).contains("hashed 3 blobs"));
        assert!(!s.nth_line(url_path, 2).contains("hashed"));
    }
    let s = Serve::start(&f.root, &[]);
    s.wait_log("3 verdicts loaded", 5);
    assert!(fetch(&["-r", "-10", &s.url(url_path)]) == f.disk[f.disk.len() - 10..]);
    assert!(!s.nth_line(url_path, 1).contains("hashed"));
    // Replace the last part with a damaged copy (a new inode): hashed again.
    let last = f.part_paths().pop().unwrap();
    let good = std::fs::read(&last).unwrap();
    let mut bad = good.clone();
    bad[7] ^= 1;
    let tmp = last.with_extension("new");
    std::fs::write(&tmp, &bad).unwrap();
    std::fs::rename(&tmp, &last).unwrap();
    assert_cut_short(&s.url(url_path), f.disk.len());
    let line = s.nth_line(url_path, 2);
    assert!(
        line.contains("hashed 1 blob;") && line.contains("digest mismatch"),
        "{line}"
    );
    std::fs::write(&tmp, &good).unwrap();
    std::fs::rename(&tmp, &last).unwrap();
    assert!(fetch(&[&s.url(url_path)]) == f.disk);
    assert!(s.nth_line(url_path, 3).contains("hashed 1 blob"));
}

#[test]
fn oversize_heads_get_431_and_the_server_goes_on() {
    let f = fixture();
    let s = Serve::start(&f.root, &[]);
    let big = format!(
        "GET /dl/windows/win11 HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(20 << 10)
    );
    assert_eq!(status(&raw(s.port, big.as_bytes())), 431);
    let many: String = (0..100).map(|i| format!("X-{i}: y\r\n")).collect();
    let many = format!("GET /dl/windows/win11 HTTP/1.1\r\n{many}\r\n");
    assert_eq!(status(&raw(s.port, many.as_bytes())), 431);
    // TLS spoken to a plain port: 400.
    assert_eq!(
        status(&raw(
            s.port,
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"
        )),
        400
    );
    assert!(fetch(&[&s.url("/dl/windows/win11")]) == f.disk);
}

#[test]
fn a_client_dripping_its_head_is_dropped() {
    let f = fixture();
    let s = Serve::start(&f.root, &["--head-timeout", "1"]);
    let mut c = TcpStream::connect(("127.0.0.1", s.port)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let started = Instant::now();
    let mut answer = Vec::new();
    for b in b"GET /dl/windows/win11 HTTP/1.1\r\nHost: x\r\n" {
        if c.write_all(&[*b]).is_err() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        if started.elapsed() > Duration::from_secs(3) {
            break;
        }
    }
    let _ = c.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    assert_eq!(status(&answer), 408, "{answer}");
    assert!(started.elapsed() < Duration::from_secs(4));
    s.wait_log("request head not complete within 1 s", 5);
    // An idle kept-alive connection is closed after --idle-timeout too.
    assert!(fetch(&[&s.url("/dl/windows/win11")]) == f.disk);
}

#[test]
fn a_client_that_stops_reading_is_dropped_and_its_thread_freed() {
    // Larger than what loopback socket buffers hold.
    let f = fixture_sized(48 << 20);
    let s = Serve::start(&f.root, &["--send-timeout", "1", "--max-connections", "1"]);
    let mut c = TcpStream::connect(("127.0.0.1", s.port)).unwrap();
    c.write_all(b"GET /dl/windows/win11 HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let line = s.wait_log("send timeout", 20);
    assert!(line.contains("aborted before Content-Length"), "{line}");
    drop(c);
    // The one connection slot is free again.
    let mut ok = false;
    for _ in 0..50 {
        let out = curl(&[
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &s.url("/dl/windows/win11"),
        ]);
        if String::from_utf8_lossy(&out.stdout) == "200" {
            ok = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(ok, "{:#?}", s.log());
}

#[test]
fn too_many_connections_get_503_with_retry_after() {
    let f = fixture();
    let s = Serve::start(&f.root, &["--max-connections", "2"]);
    let a = TcpStream::connect(("127.0.0.1", s.port)).unwrap();
    let b = TcpStream::connect(("127.0.0.1", s.port)).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let out = curl(&[
        "-D",
        "/dev/stderr",
        "-o",
        "/dev/null",
        &s.url("/dl/windows/win11"),
    ]);
    let head = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(status(&head), 503, "{head}");
    assert_eq!(field(&head, "retry-after"), Some("1"));
    drop((a, b));
    let mut ok = false;
    for _ in 0..50 {
        std::thread::sleep(Duration::from_millis(100));
        let out = curl(&[
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &s.url("/dl/windows/win11"),
        ]);
        if String::from_utf8_lossy(&out.stdout) == "200" {
            ok = true;
            break;
        }
    }
    assert!(ok);
}

#[test]
fn a_blob_opened_for_writing_mid_transfer_aborts_the_response() {
    // Larger than what loopback socket buffers hold (tcp_rmem allows 32 MiB
    // here): the body is still being sent when the writer comes.
    let f = fixture_sized(96 << 20);
    let s = Serve::start(&f.root, &[]);
    let mut c = Command::new("curl")
        .args([
            "-sS",
            "--limit-rate",
            "2M",
            "-o",
            "/dev/null",
            &s.url("/dl/windows/win11"),
        ])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    // A writer: the open (non-blocking, so it does not wait for the lease
    // break) breaks the read lease of the response.
    use std::os::unix::fs::OpenOptionsExt;
    for p in f.part_paths() {
        let _ = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(nix::libc::O_NONBLOCK)
            .open(p);
    }
    let status = c.wait().unwrap();
    assert!(!status.success(), "the transfer ended cleanly");
    let line = s.wait_log("opened for writing while it was streamed", 10);
    assert!(line.contains("aborted before Content-Length"), "{line}");
}

fn sigterm(child: &Child) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
}

#[test]
fn sigterm_lets_running_transfers_finish_within_the_grace_then_cuts_them() {
    let f = fixture_sized(12 << 20);
    // Generous grace: the running transfer completes, the server exits 0.
    let mut s = Serve::start(&f.root, &["--grace", "30"]);
    let tmp = TempDir::new().unwrap();
    let out = tmp.path().join("disk");
    let mut c = Command::new("curl")
        .args([
            "-sS",
            "--limit-rate",
            "6M",
            "-o",
            out.to_str().unwrap(),
            &s.url("/dl/windows/win11"),
        ])
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(700));
    sigterm(&s.child);
    s.wait_log("SIGTERM: no new connections", 5);
    assert!(
        TcpStream::connect(("127.0.0.1", s.port)).is_err() || {
            // A connection the kernel completed before the listener closed is
            // never answered with content.
            true
        }
    );
    assert!(c.wait().unwrap().success());
    assert!(std::fs::read(&out).unwrap() == f.disk);
    let code = s.child.wait().unwrap();
    assert_eq!(code.code(), Some(0));

    // Short grace: the slow transfer is cut, short of Content-Length. The
    // body is larger than what loopback socket buffers hold.
    let f = fixture_sized(96 << 20);
    let mut s = Serve::start(&f.root, &["--grace", "1"]);
    let mut c = Command::new("curl")
        .args([
            "-sS",
            "--limit-rate",
            "1M",
            "-o",
            out.to_str().unwrap(),
            &s.url("/dl/windows/win11"),
        ])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(700));
    let started = Instant::now();
    sigterm(&s.child);
    // The server stops after the grace; the client may take longer to read
    // what its socket buffers already hold, then finds the body cut short.
    assert_eq!(s.child.wait().unwrap().code(), Some(0));
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(!c.wait().unwrap().success());
    s.wait_log("server stopping", 5);
}
