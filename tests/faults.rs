//! The fault matrix of docs/RELIABILITY.md: damaged blobs, misbehaving
//! registries and token realms, hostile manifests and references, a full
//! disk, a reader or a cocoon that goes away, and signals.
//!
//! Every case ends either with byte-identical output, or with exit status 1
//! (128+N after signal N) and one `cloudimg: …` line on stderr, nothing
//! committed by the cocoon stand-in and nothing under the final `-o` name.

mod common;

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::httpd::{Reply, Request, Server};
use common::registry::Registry;
use common::*;
use nix::sys::signal::Signal;
use serde_json::{Value, json};
use tempfile::TempDir;

/// Bytes per range request: small, so that parallel ranges are exercised on
/// blobs of a few hundred KiB.
const CHUNK: &str = "65536";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const MIB: usize = 1 << 20;

// ---------------------------------------------------------------------------
// Running the binary and checking the three outcomes.

/// The binary with `args`, no docker credentials, small range chunks and the
/// extra environment `env`.
fn cmd(args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut c = bin();
    c.args(args)
        .env("DOCKER_CONFIG", "/nonexistent")
        .env("CLOUDIMG_CHUNK_SIZE", CHUNK)
        .stdin(Stdio::null());
    for (k, v) in env {
        c.env(k, v);
    }
    c
}

/// Images the stand-in committed (its temporary files start with a dot).
fn committed(store: &Path) -> Vec<String> {
    names(store)
        .into_keys()
        .filter(|n| !n.starts_with('.'))
        .collect()
}

/// `get -q -o DIR/disk.img SOURCE ARGS…` must fail with one line and leave
/// DIR empty: no file under the final name, no temporary file.
fn get_fails(source: &str, args: &[&str], env: &[(&str, &str)]) -> String {
    let out_dir = TempDir::new().unwrap();
    let target = out_dir.path().join("disk.img");
    let mut all = vec!["get", "-q", source, "-o", target.to_str().unwrap()];
    all.extend_from_slice(args);
    let out = cmd(&all, env).output().unwrap();
    let line = failure(&out);
    println!("get -o: {line}");
    assert!(out.stdout.is_empty(), "{line}");
    assert!(
        names(out_dir.path()).is_empty(),
        "left under the output directory: {:?} ({line})",
        names(out_dir.path())
    );
    line
}

/// `pull -q SOURCE ARGS…` into the stand-in must fail with one line and
/// commit nothing.
fn pull_fails(source: &str, args: &[&str], env: &[(&str, &str)]) -> String {
    let store = TempDir::new().unwrap();
    let mut all = vec!["pull", "-q", source];
    all.extend_from_slice(args);
    let out = cmd(&all, env)
        .env("EPOCH_COCOON_BINARY", standin())
        .env("COCOON_STANDIN_DIR", store.path())
        .output()
        .unwrap();
    let line = failure(&out);
    println!("pull: {line}");
    assert!(
        committed(store.path()).is_empty(),
        "the stand-in committed {:?} ({line})",
        committed(store.path())
    );
    line
}

/// Both `get -o` and `pull` fail cleanly, each line naming every needle.
fn fails_everywhere(source: &str, args: &[&str], env: &[(&str, &str)], needles: &[&str]) {
    for line in [get_fails(source, args, env), pull_fails(source, args, env)] {
        for n in needles {
            assert!(line.contains(n), "{n:?} missing from: {line}");
        }
    }
}

/// `get -q SOURCE ARGS…` through a pipe must give exactly `want`.
fn get_ok(source: &str, args: &[&str], env: &[(&str, &str)], want: &[u8]) -> Output {
    let mut all = vec!["get", "-q", source];
    all.extend_from_slice(args);
    let out = cmd(&all, env).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.stdout == want,
        "output differs ({} bytes, want {})",
        out.stdout.len(),
        want.len()
    );
    out
}

/// Wait for `child`, killing it and failing the test after `limit`.
fn wait_for(child: &mut Child, limit: Duration) -> ExitStatus {
    let end = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > end {
            let _ = child.kill();
            let _ = child.wait();
            panic!("cloudimg still running after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn stderr_of(child: &mut Child) -> String {
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    err
}

fn signal(child: &Child, sig: Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), sig).unwrap();
}

/// Live (not zombie) processes in process group `pgid`.
fn group_members(pgid: i32) -> Vec<i32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // "PID (COMM) STATE PPID PGRP …"; COMM may hold spaces and parens.
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        if fields.len() > 2 && fields[0] != "Z" && fields[2].parse() == Ok(pgid) {
            found.push(pid);
        }
    }
    found
}

/// The stand-in's process group must be gone (a SIGKILLed process may take
/// a moment to finish exiting).
fn assert_group_gone(pgid: i32) {
    let end = Instant::now() + Duration::from_secs(3);
    while !group_members(pgid).is_empty() {
        assert!(
            Instant::now() < end,
            "cocoon's process group {pgid} is still alive: {:?}",
            group_members(pgid)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Poll until `pred` holds, for at most `limit`.
fn wait_until(limit: Duration, what: &str, mut pred: impl FnMut() -> bool) {
    let end = Instant::now() + limit;
    while !pred() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

// ---------------------------------------------------------------------------
// Images, layouts and a scripted registry.

/// Six parts of 200_003 bytes (each more than two range chunks), plus a
/// SHA256SUMS text layer, listed in a shuffled order.
fn six_parts(seed: u64) -> Image {
    Image::split(&data(6 * 200_003, seed), 200_003)
}

/// The disk layer titled `disk.NN.qcow2.part`.
fn part(image: &Image, n: usize) -> &Layer {
    let title = format!("disk.{n:02}.qcow2.part");
    image
        .layers
        .iter()
        .find(|l| l.title.as_deref() == Some(title.as_str()))
        .unwrap()
}

/// Which part a damage test hits, in stream order.
const POSITIONS: [(&str, usize); 3] = [("first", 0), ("middle", 2), ("last", 5)];

#[derive(Clone, Copy, Debug)]
enum Damage {
    /// One byte short.
    Truncate,
    /// One byte too many.
    Extend,
    /// Same size, one bit flipped in the middle.
    Corrupt,
}

impl Damage {
    fn apply(self, bytes: &mut Vec<u8>) {
        match self {
            Damage::Truncate => {
                bytes.pop();
            }
            Damage::Extend => bytes.push(0),
            Damage::Corrupt => {
                let mid = bytes.len() / 2;
                bytes[mid] ^= 0x10;
            }
        }
    }

    /// What the error line must say.
    fn says(self) -> &'static str {
        match self {
            Damage::Truncate => "truncated",
            Damage::Extend => "oversized",
            Damage::Corrupt => "digest mismatch",
        }
    }

    fn damage_file(self, path: &Path) {
        let mut bytes = std::fs::read(path).unwrap();
        self.apply(&mut bytes);
        std::fs::write(path, &bytes).unwrap();
    }
}

/// A layout in a fresh directory holding `image`'s blobs, with `manifest`
/// (raw bytes) tagged `latest`.
fn layout_with(image: &Image, manifest: &[u8]) -> (TempDir, LayoutDir) {
    let tmp = TempDir::new().unwrap();
    let layout = LayoutDir::new(&tmp.path().join("img"));
    layout.put_blob(b"{}");
    for l in &image.layers {
        layout.put_blob(&l.data);
    }
    layout.put_manifest_bytes(Some("latest"), manifest, OCI_MANIFEST);
    (tmp, layout)
}

fn manifest_bytes(image: &Image) -> Vec<u8> {
    serde_json::to_vec(&image.manifest_json()).unwrap()
}

/// A registry for repository `img` as the scripted server sees it: one
/// manifest (served for any tag or digest, with its Docker-Content-Digest)
/// and blobs by digest.
struct Site {
    manifest: Vec<u8>,
    blobs: HashMap<String, Arc<Vec<u8>>>,
}

impl Site {
    fn new(image: &Image) -> Site {
        Site::raw(image, manifest_bytes(image))
    }

    /// `image`'s blobs, with `manifest` as the manifest, whatever it says.
    fn raw(image: &Image, manifest: Vec<u8>) -> Site {
        let mut blobs = HashMap::new();
        blobs.insert(sha256(b"{}"), Arc::new(b"{}".to_vec()));
        for l in &image.layers {
            blobs.insert(sha256(&l.data), Arc::new(l.data.clone()));
        }
        Site { manifest, blobs }
    }

    fn serve(&self, req: &Request, blob: impl Fn(Arc<Vec<u8>>) -> Reply) -> Reply {
        let path = req.path();
        if path == "/v2/" {
            return Reply::status(200);
        }
        if path.starts_with("/v2/img/manifests/") {
            return Reply::bytes(200, OCI_MANIFEST, self.manifest.clone())
                .header("Docker-Content-Digest", &sha256(&self.manifest));
        }
        if let Some(d) = path.strip_prefix("/v2/img/blobs/")
            && let Some(b) = self.blobs.get(d)
        {
            return blob(Arc::clone(b));
        }
        Reply::status(404)
    }

    /// A well-behaved server for this site.
    fn start(self) -> Server {
        Server::start(move |req, _| self.serve(req, Reply::blob))
    }
}

/// `HOST:PORT/img:v1` on a scripted server.
fn source_of(server: &Server) -> String {
    format!("{}/img:v1", server.host())
}

fn blob_requests(server: &Server) -> usize {
    server
        .requests()
        .iter()
        .filter(|r| r.path().contains("/blobs/"))
        .count()
}

// ---------------------------------------------------------------------------
// Damaged blobs: truncated, oversized, corrupted — first, middle, last part.

fn layout_damage(damage: Damage) {
    for (at, n) in POSITIONS {
        let image = six_parts(10 + n as u64);
        let (_tmp, layout) = layout_with(&image, &manifest_bytes(&image));
        let victim = part(&image, n);
        damage.damage_file(&layout.blob_path(&sha256(&victim.data)));
        let title = victim.title.clone().unwrap();
        let src = layout.source("latest");
        for line in [get_fails(&src, &[], &[]), pull_fails(&src, &[], &[])] {
            assert!(
                line.contains(&title) && line.contains(damage.says()),
                "{damage:?} {at} part: {line}"
            );
        }
    }
}

#[test]
fn layout_part_truncated_first_middle_last() {
    layout_damage(Damage::Truncate);
}

#[test]
fn layout_part_oversized_first_middle_last() {
    layout_damage(Damage::Extend);
}

#[test]
fn layout_part_corrupted_first_middle_last() {
    layout_damage(Damage::Corrupt);
}

/// The same damage in a real registry's storage: the registry serves the
/// damaged file, with its size as Content-Length and Content-Range total.
fn registry_damage(damage: Damage) {
    let reg = Registry::start();
    for (at, n) in POSITIONS {
        let image = six_parts(20 + n as u64);
        let repo = format!("img-{at}");
        reg.push_image(&repo, "v1", &image);
        let victim = part(&image, n);
        damage.damage_file(&reg.blob_file(&sha256(&victim.data)));
        let title = victim.title.clone().unwrap();
        let src = format!("{}/{repo}:v1", reg.host());
        for connections in ["1", "4"] {
            let args = ["--connections", connections, "--retries", "1"];
            for line in [get_fails(&src, &args, &[]), pull_fails(&src, &args, &[])] {
                assert!(
                    line.contains(&title) && line.contains(damage.says()),
                    "{damage:?} {at} part, {connections} connections: {line}"
                );
            }
        }
    }
}

#[test]
fn registry_part_truncated_first_middle_last() {
    registry_damage(Damage::Truncate);
}

#[test]
fn registry_part_oversized_first_middle_last() {
    registry_damage(Damage::Extend);
}

#[test]
fn registry_part_corrupted_first_middle_last() {
    registry_damage(Damage::Corrupt);
}

// ---------------------------------------------------------------------------
// The network: resets, storms, stalls.

#[test]
fn connection_resets_at_several_offsets_resume_to_identical_output() {
    let image = Image::split(&data(3 * 300_001, 30), 300_001);
    let want = expected_disk(&image);
    for connections in ["1", "4"] {
        let site = Site::new(&image);
        // Each blob's connection is reset (RST, not FIN) once, at its own
        // absolute offset: at the first byte, inside the second range chunk,
        // and two bytes before the end.
        let offsets: HashMap<String, u64> = image
            .layers
            .iter()
            .filter(|l| l.media_type == QCOW2_PART)
            .zip([1u64, 100_000, 299_999])
            .map(|(l, at)| (sha256(&l.data), at))
            .collect();
        let done = Mutex::new(Vec::<String>::new());
        let server = Server::start(move |req, _| {
            site.serve(req, |b| {
                let digest = req.path().rsplit('/').next().unwrap().to_owned();
                let (start, end) = match req.range() {
                    Some((s, e)) => (s, e.unwrap_or(b.len() as u64 - 1)),
                    None => (0, b.len() as u64 - 1),
                };
                let mut done = done.lock().unwrap();
                match offsets.get(&digest) {
                    Some(&at) if (start..=end).contains(&at) && !done.contains(&digest) => {
                        done.push(digest);
                        Reply::blob(b).reset_after(at - start)
                    }
                    _ => Reply::blob(b),
                }
            })
        });
        get_ok(
            &source_of(&server),
            &["--connections", connections],
            &[],
            &want,
        );
        let resumed = server.requests().iter().any(|r| {
            r.range()
                .is_some_and(|(s, _)| s % 65536 != 0 || connections == "1" && s > 0)
        });
        assert!(
            resumed,
            "no resume after a reset ({connections} connections)"
        );
    }
}

#[test]
fn connection_resets_beyond_the_retry_budget_fail_cleanly() {
    let image = Image::split(&data(3 * 300_001, 31), 300_001);
    let site = Site::new(&image);
    // Every response is reset after a trickle: no progress refills the budget.
    let server = Server::start(move |req, _| site.serve(req, |b| Reply::blob(b).reset_after(1000)));
    for connections in ["1", "4"] {
        let args = ["--connections", connections, "--retries", "1"];
        fails_everywhere(
            &source_of(&server),
            &args,
            &[],
            &[
                "connection lost",
                "gave up after 1 retries",
                "disk.00.qcow2.part",
            ],
        );
    }
}

#[test]
fn rate_limit_storm_beyond_the_retry_budget_is_bounded() {
    let image = Image::split(&data(3 * 300_001, 32), 300_001);
    let site = Site::new(&image);
    let server = Server::start(move |req, _| {
        if req.path().contains("/blobs/") {
            return Reply::status(429).header("Retry-After", "0");
        }
        site.serve(req, Reply::blob)
    });
    fails_everywhere(
        &source_of(&server),
        &["--retries", "2"],
        &[],
        &["429", "gave up after 2 retries", "disk.00.qcow2.part"],
    );
    // Two runs, each: one request and two retries for the first blob, then stop.
    assert_eq!(blob_requests(&server), 2 * 3);

    // On the manifest, with Retry-After honoured between the tries.
    let server = Server::start(|_, _| Reply::status(429).header("Retry-After", "1"));
    let started = Instant::now();
    let line = get_fails(&source_of(&server), &["--retries", "1"], &[]);
    assert!(
        line.contains("429") && line.contains("gave up after 1 retries"),
        "{line}"
    );
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "Retry-After: 1 ignored"
    );
    assert_eq!(server.requests().len(), 2);
}

#[test]
fn server_error_storm_mid_blob_fails_cleanly() {
    let image = Image::split(&data(3 * 300_001, 33), 300_001);
    let last = sha256(&part(&image, 2).data);
    let site = Site::new(&image);
    // The last part starts well, its connection is cut half-way, and from
    // then on the server answers only 5xx: a request from byte 0 (the whole
    // blob, or the first range) is cut at 150_000; a resume or any later
    // range gets 500, 502, 503 or 504.
    let server = Server::start(move |req, n| {
        site.serve(req, |b| {
            if !req.path().ends_with(&last) {
                return Reply::blob(b);
            }
            match req.range() {
                None | Some((0, _)) => Reply::blob(b).cut_after(150_000),
                Some(_) => Reply::status([500, 502, 503, 504][n % 4]),
            }
        })
    });
    for connections in ["1", "4"] {
        fails_everywhere(
            &source_of(&server),
            &["--connections", connections, "--retries", "1"],
            &[],
            &["HTTP 50", "gave up after 1 retries", "disk.02.qcow2.part"],
        );
    }
}

#[test]
fn a_server_that_never_answers_fails_after_the_stall_timeout() {
    let server = Server::start(|_, _| {
        std::thread::sleep(Duration::from_secs(4));
        Reply::status(503)
    });
    let started = Instant::now();
    let line = get_fails(
        &source_of(&server),
        &["--stall-timeout", "1", "--retries", "1"],
        &[],
    );
    assert!(
        line.contains("manifests/v1: stalled") && line.contains("gave up after 1 retries"),
        "{line}"
    );
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(6),
        "two stalls of 1 s took {took:?}"
    );
    assert_eq!(server.requests().len(), 2);
}

#[test]
fn a_range_request_stalled_in_parallel_mode_is_resumed() {
    let image = Image::split(&data(3 * 300_001, 34), 300_001);
    let want = expected_disk(&image);
    let middle = sha256(&part(&image, 1).data);
    let site = Site::new(&image);
    // The middle part's third request (a range after the probe) goes silent
    // after 1000 bytes.
    let server = Server::start(move |req, n| {
        site.serve(req, |b| match n {
            2 if req.path().ends_with(&middle) => {
                Reply::blob(b).stall_after(1000, Duration::from_secs(5))
            }
            _ => Reply::blob(b),
        })
    });
    let started = Instant::now();
    get_ok(
        &source_of(&server),
        &["--connections", "4", "--stall-timeout", "1"],
        &[],
        &want,
    );
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "one stall of 1 s took {:?}",
        started.elapsed()
    );
    // The stalled range was resumed from the byte it reached.
    let resumed = server
        .requests()
        .iter()
        .any(|r| r.range().is_some_and(|(s, _)| s % 65536 == 1000));
    assert!(resumed, "no resume from the stalled range");
}

// ---------------------------------------------------------------------------
// Auth and redirects.

#[test]
fn a_registry_refusing_its_own_token_fails_with_bounded_requests() {
    let server = Server::start(|req, _| {
        if req.path() == "/token" {
            return Reply::json(200, &json!({"token": "tok-1"}));
        }
        let realm = format!(
            "Bearer realm=\"http://{}/token\",service=\"test\"",
            req.header("host").unwrap()
        );
        Reply::status(401).header("WWW-Authenticate", &realm)
    });
    let line = get_fails(&source_of(&server), &[], &[]);
    assert!(
        line.contains("HTTP 401 Unauthorized again after authenticating"),
        "{line}"
    );
    let seen = server.requests();
    let tokens = seen.iter().filter(|r| r.path() == "/token").count();
    let manifests = seen.len() - tokens;
    assert_eq!((tokens, manifests), (1, 2), "one token, one retry with it");
    let retry = seen.iter().filter(|r| r.path() != "/token").nth(1).unwrap();
    assert_eq!(retry.header("authorization"), Some("Bearer tok-1"));
}

/// A registry whose Bearer challenge points at `realm`.
fn challenging(realm: String) -> Server {
    Server::start(move |_, _| {
        Reply::status(401).header(
            "WWW-Authenticate",
            &format!("Bearer realm=\"{realm}\",service=\"test\""),
        )
    })
}

#[test]
fn a_token_realm_refusing_connections_fails_cleanly() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let realm = format!("http://{}/token", closed.local_addr().unwrap());
    drop(closed);
    let server = challenging(realm);
    let line = get_fails(&source_of(&server), &["--retries", "1"], &[]);
    assert!(
        line.contains("token realm http://127.0.0.1:") && line.contains("Connection refused"),
        "{line}"
    );
    assert_eq!(server.requests().len(), 2, "one challenge per try");
}

#[test]
fn a_token_realm_answering_500_fails_cleanly() {
    let realm_server = Server::start(|_, _| Reply::status(500));
    let server = challenging(format!("{}/token", realm_server.url()));
    let line = get_fails(&source_of(&server), &["--retries", "1"], &[]);
    assert!(
        line.contains("token realm http://127.0.0.1:") && line.contains("HTTP 500"),
        "{line}"
    );
    assert_eq!(realm_server.requests().len(), 2);
}

#[test]
fn a_cross_origin_redirect_after_a_challenge_leaks_no_credentials() {
    let image = Image::split(&data(3 * 300_001, 35), 300_001);
    let want = expected_disk(&image);
    let site = Arc::new(Site::new(&image));
    let store_site = Arc::clone(&site);
    // The object store: blobs at /store/DIGEST, for anyone.
    let store = Server::start(move |req, _| {
        match store_site
            .blobs
            .get(req.path().trim_start_matches("/store/"))
        {
            Some(b) => Reply::blob(Arc::clone(b)),
            None => Reply::status(404),
        }
    });
    let store_url = store.url();
    // The registry: basic credentials buy a token; blobs redirect to the store.
    let registry = Server::start(move |req, _| {
        if req.path() == "/token" {
            return match req.header("authorization") {
                Some("Basic YWxpY2U6czNjcmV0") => Reply::json(200, &json!({"token": "tok-alice"})),
                _ => Reply::status(401),
            };
        }
        if req.header("authorization") != Some("Bearer tok-alice") {
            let realm = format!(
                "Bearer realm=\"http://{}/token\",service=\"test\"",
                req.header("host").unwrap()
            );
            return Reply::status(401).header("WWW-Authenticate", &realm);
        }
        if let Some(d) = req.path().strip_prefix("/v2/img/blobs/") {
            return Reply::redirect(307, &format!("{store_url}/store/{d}?X-Signature=s"));
        }
        site.serve(req, Reply::blob)
    });
    let mut child = cmd(
        &[
            "get",
            "-q",
            &source_of(&registry),
            "--username",
            "alice",
            "--password-stdin",
        ],
        &[],
    )
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), b"s3cret\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.stdout == want);
    // The registry did get the token; the store never saw any credential.
    assert!(
        registry
            .requests()
            .iter()
            .any(|r| r.path().contains("/blobs/") && r.header("authorization").is_some())
    );
    let at_store = store.requests();
    assert!(at_store.len() >= 3, "every blob came from the store");
    for r in &at_store {
        assert!(
            r.headers
                .iter()
                .all(|(k, v)| !k.eq_ignore_ascii_case("authorization")
                    && !v.contains("tok-alice")
                    && !v.contains("YWxpY2U6czNjcmV0")),
            "credentials reached the other origin: {:?}",
            r.headers
        );
    }
}

#[test]
fn a_redirect_loop_between_origins_is_bounded() {
    let image = Image::split(&data(3 * 300_001, 36), 300_001);
    let site = Site::new(&image);
    let hops = Arc::new(Mutex::new(0usize));
    let back = Arc::new(Mutex::new(String::new()));
    let (h, b) = (Arc::clone(&hops), Arc::clone(&back));
    // The other origin sends every request straight back.
    let mirror = Server::start(move |req, _| {
        *h.lock().unwrap() += 1;
        Reply::redirect(302, &format!("{}{}", b.lock().unwrap(), req.target))
    });
    let mirror_url = mirror.url();
    let registry = Server::start(move |req, _| {
        if req.path().contains("/blobs/") {
            return Reply::redirect(307, &format!("{mirror_url}{}", req.target));
        }
        site.serve(req, Reply::blob)
    });
    *back.lock().unwrap() = registry.url();
    fails_everywhere(
        &source_of(&registry),
        &[],
        &[],
        &["more than 10 redirects", "disk.00.qcow2.part"],
    );
    // Two runs; each follows at most ten hops, five of them on each side.
    let at_mirror = *hops.lock().unwrap();
    assert!(
        (2..=2 * 6).contains(&at_mirror),
        "{at_mirror} hops at the mirror"
    );
    assert!(blob_requests(&registry) <= 2 * 6);
}

// ---------------------------------------------------------------------------
// Hostile manifests.

/// Pad a JSON document with trailing spaces to exactly `len` bytes.
fn padded(mut json: Vec<u8>, len: usize) -> Vec<u8> {
    assert!(json.len() <= len);
    json.resize(len, b' ');
    json
}

#[test]
fn layout_manifest_and_index_over_4_mib_are_refused() {
    let image = six_parts(40);
    let want = expected_disk(&image);
    // Exactly 4 MiB is still a manifest…
    let (_t, layout) = layout_with(&image, &padded(manifest_bytes(&image), 4 * MIB));
    get_ok(&layout.source("latest"), &[], &[], &want);
    // …one byte more is not.
    let (_t, layout) = layout_with(&image, &padded(manifest_bytes(&image), 4 * MIB + 1));
    fails_everywhere(
        &layout.source("latest"),
        &[],
        &[],
        &["manifest is larger than the 4194304 byte limit"],
    );
    // Nor is an index.json of more than 4 MiB.
    let (_t, layout) = layout_with(&image, &manifest_bytes(&image));
    let path = layout.dir.join("index.json");
    let mut index: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    index["annotations"] = json!({"padding": "x".repeat(4 * MIB)});
    std::fs::write(&path, serde_json::to_vec(&index).unwrap()).unwrap();
    fails_everywhere(
        &layout.source("latest"),
        &[],
        &[],
        &["index.json is larger than the 4194304 byte limit"],
    );
}

#[test]
fn registry_manifest_over_4_mib_is_refused() {
    let image = six_parts(41);
    // The scripted server: exactly 4 MiB passes, one byte more is refused.
    let server = Site::raw(&image, padded(manifest_bytes(&image), 4 * MIB)).start();
    get_ok(&source_of(&server), &[], &[], &expected_disk(&image));
    let server = Site::raw(&image, padded(manifest_bytes(&image), 4 * MIB + 1)).start();
    fails_everywhere(
        &source_of(&server),
        &[],
        &[],
        &["4194305 bytes, more than the 4194304 byte limit"],
    );
    assert_eq!(blob_requests(&server), 0);
    // (A real docker-registry refuses to store a manifest over 4 MiB in the
    // first place: "http: request body too large".)
}

/// Serve `manifest` for `image` from a layout and from the scripted
/// registry; both must fail cleanly naming every needle, and the registry
/// must not be asked for a blob.
fn manifest_refused_everywhere(image: &Image, manifest: Vec<u8>, needles: &[&str]) {
    let (_t, layout) = layout_with(image, &manifest);
    fails_everywhere(&layout.source("latest"), &[], &[], needles);
    let server = Site::raw(image, manifest).start();
    fails_everywhere(&source_of(&server), &[], &[], needles);
    assert_eq!(blob_requests(&server), 0, "a blob was fetched");
}

#[test]
fn malformed_manifest_json_is_refused() {
    let image = six_parts(42);
    let good = manifest_bytes(&image);
    for bad in [
        good[..good.len() / 2].to_vec(),
        b"not json".to_vec(),
        b"".to_vec(),
        [&good[..], b"}"].concat(),
    ] {
        manifest_refused_everywhere(&image, bad, &["malformed manifest"]);
    }
}

/// A change made to a manifest's JSON.
type Edit = fn(&mut Value);

#[test]
fn manifest_fields_of_the_wrong_json_type_are_refused() {
    let image = six_parts(43);
    let edits: [(&str, Edit); 8] = [
        ("size as a string", |m| {
            m["layers"][0]["size"] = json!("200003")
        }),
        ("layers as an object", |m| {
            m["layers"] = json!({"a": m["layers"][0].clone()})
        }),
        ("digest as a number", |m| {
            m["layers"][0]["digest"] = json!(12345)
        }),
        ("annotations as a list", |m| {
            m["layers"][0]["annotations"] = json!(["org.opencontainers.image.title"])
        }),
        ("config as a string", |m| m["config"] = json!("{}")),
        ("mediaType as a number", |m| m["mediaType"] = json!(2)),
        ("schemaVersion as a string", |m| {
            m["schemaVersion"] = json!("2")
        }),
        ("the document as a list", |m| *m = json!([m.clone()])),
    ];
    for (what, edit) in edits {
        let mut m = image.manifest_json();
        edit(&mut m);
        // Shown with the failure, should this case fail.
        println!("case: {what}");
        let bytes = serde_json::to_vec(&m).unwrap();
        manifest_refused_everywhere(&image, bytes, &["malformed manifest", "invalid type"]);
    }
}

#[test]
fn negative_sizes_are_refused() {
    let image = six_parts(44);
    for size in [json!(-1), json!(i64::MIN), json!(-0.5)] {
        let mut m = image.manifest_json();
        m["layers"][0]["size"] = size.clone();
        manifest_refused_everywhere(
            &image,
            serde_json::to_vec(&m).unwrap(),
            &["malformed manifest"],
        );
        let mut m = image.manifest_json();
        m["config"]["size"] = size;
        manifest_refused_everywhere(
            &image,
            serde_json::to_vec(&m).unwrap(),
            &["malformed manifest"],
        );
    }
}

/// The manifest with the disk part `n`'s size set to `size`.
fn with_part_size(image: &Image, n: usize, size: Value) -> Vec<u8> {
    let digest = sha256(&part(image, n).data);
    let mut m = image.manifest_json();
    for l in m["layers"].as_array_mut().unwrap() {
        if l["digest"] == digest.as_str() {
            l["size"] = size.clone();
        }
    }
    serde_json::to_vec(&m).unwrap()
}

#[test]
fn absurd_sizes_fail_cleanly_without_allocating() {
    let image = six_parts(45);
    // (Large, but leaving room for the other parts: no 64-bit overflow.)
    for (n, size) in [
        (5, 1u64 << 63),
        (0, u64::MAX - (1 << 32)),
        (2, (1 << 40) + 3),
    ] {
        let shown = size.to_string();
        let manifest = with_part_size(&image, n, json!(size));
        // A layout compares the blob's size before reading a byte.
        let (_t, layout) = layout_with(&image, &manifest);
        fails_everywhere(
            &layout.source("latest"),
            &[],
            &[],
            &[
                "truncated",
                &format!("expected {shown} bytes, actual 200003 bytes"),
            ],
        );
        // A registry's answer (Content-Length, Content-Range) gives it away.
        let server = Site::raw(&image, manifest).start();
        for connections in ["1", "4"] {
            fails_everywhere(
                &source_of(&server),
                &["--connections", connections],
                &[],
                &[
                    "truncated",
                    &format!("the server has 200003 bytes, the manifest says {shown}"),
                ],
            );
        }
        // inspect just shows it.
        let out = cmd(&["inspect", "--json", &layout.source("latest")], &[])
            .output()
            .unwrap();
        assert!(out.status.success());
        let r: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert!(
            r["plan"]["layers"]
                .as_array()
                .unwrap()
                .iter()
                .any(|l| l["size"] == size)
        );
    }
    // Beyond 64 bits is not a size at all.
    let manifest = with_part_size(
        &image,
        1,
        serde_json::from_str("18446744073709551616").unwrap(),
    );
    manifest_refused_everywhere(&image, manifest, &["malformed manifest"]);
}

#[test]
fn layer_sizes_overflowing_64_bits_are_refused() {
    let image = six_parts(46);
    let mut m = image.manifest_json();
    let mut k = 0;
    for l in m["layers"].as_array_mut().unwrap() {
        if l["mediaType"] == QCOW2_PART && k < 2 {
            l["size"] = json!(1u64 << 63);
            k += 1;
        }
    }
    manifest_refused_everywhere(
        &image,
        serde_json::to_vec(&m).unwrap(),
        &["disk layer sizes overflow 64 bits"],
    );
}

/// Duplicate titles are legal: the stable sort keeps such layers in
/// manifest order, and the output is their concatenation in that order.
#[test]
fn duplicate_titles_stream_in_manifest_order() {
    let (a, b, c, d) = (
        data(200_003, 50),
        data(150_001, 51),
        data(170_007, 52),
        data(140_009, 53),
    );
    let image = Image {
        artifact_type: Some(OS_IMAGE.to_owned()),
        config_media_type: EMPTY_CONFIG.to_owned(),
        layers: vec![
            Layer::new(QCOW2_PART, "part.b", a.clone()),
            Layer::new(QCOW2_PART, "part.a", b.clone()),
            Layer::new("text/plain", "SHA256SUMS", b"sums\n".to_vec()),
            Layer::new(QCOW2_PART, "part.b", c.clone()),
            Layer::new(QCOW2_PART, "part.a", d.clone()),
        ],
    };
    let want = [&b[..], &d, &a, &c].concat();
    // Not what a sort that ignores manifest order could give.
    assert!(want != [&d[..], &b, &a, &c].concat() && want != [&b[..], &d, &c, &a].concat());

    let (_t, layout) = layout_with(&image, &manifest_bytes(&image));
    get_ok(&layout.source("latest"), &[], &[], &want);
    let server = Site::new(&image).start();
    for connections in ["1", "4"] {
        get_ok(
            &source_of(&server),
            &["--connections", connections],
            &[],
            &want,
        );
    }
    // The plan `inspect` shows is that order.
    let out = cmd(&["inspect", "--json", &layout.source("latest")], &[])
        .output()
        .unwrap();
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    let order: Vec<&str> = r["plan"]["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["digest"].as_str().unwrap())
        .collect();
    assert_eq!(order, [sha256(&b), sha256(&d), sha256(&a), sha256(&c)]);

    // And pull delivers the same bytes.
    let store = TempDir::new().unwrap();
    let out = cmd(
        &["pull", "-q", "--name", "dup", &layout.source("latest")],
        &[],
    )
    .env("EPOCH_COCOON_BINARY", standin())
    .env("COCOON_STANDIN_DIR", store.path())
    .output()
    .unwrap();
    assert!(out.status.success());
    assert!(std::fs::read(store.path().join("dup")).unwrap() == want);
}

// ---------------------------------------------------------------------------
// Hostile references and digests.

#[test]
fn tags_that_climb_out_of_the_layout_are_refused() {
    let tmp = TempDir::new().unwrap();
    let image = six_parts(60);
    // Were "img:../x" read as a directory, it would find this layout.
    let decoy = LayoutDir::new(&tmp.path().join("img:..").join("x"));
    decoy.put_image(Some("latest"), &image);
    LayoutDir::new(&tmp.path().join("img")).put_image(Some("latest"), &image);
    let dir = tmp.path().join("img");
    for tag in ["../x", "..", "./x", "../../etc/passwd"] {
        let src = format!("oci:{}:{tag}", dir.display());
        let line = get_fails(&src, &[], &[]);
        assert!(
            line.contains("bad source reference") && line.contains("not a valid tag"),
            "{src}: {line}"
        );
        pull_fails(&src, &[], &[]);
    }
    // Registry tags and repositories too, before any request is made.
    let server = Site::new(&image).start();
    for src in [
        format!("{}/img:../x", server.host()),
        format!("{}/img:..", server.host()),
        format!("{}/../img:v1", server.host()),
        format!("{}/img/..:v1", server.host()),
    ] {
        let line = get_fails(&src, &[], &[]);
        assert!(line.contains("bad source reference"), "{src}: {line}");
    }
    assert!(server.requests().is_empty(), "{:?}", server.requests());
}

#[test]
fn registry_digests_that_traverse_paths_are_refused_before_any_request() {
    let image = six_parts(61);
    // On the command line.
    let server = Site::new(&image).start();
    for digest in ["sha256:../../x", "sha256:..%2f..%2fx", "sha256:/etc/passwd"] {
        let src = format!("{}/img@{digest}", server.host());
        let line = get_fails(&src, &[], &[]);
        assert!(line.contains("bad digest"), "{src}: {line}");
    }
    assert!(server.requests().is_empty());

    // In a disk layer of the manifest.
    let mut m = image.manifest_json();
    m["layers"][0]["digest"] = json!("sha256:../../../v2/other/blobs/x");
    let server = Site::raw(&image, serde_json::to_vec(&m).unwrap()).start();
    fails_everywhere(&source_of(&server), &[], &[], &["bad digest", "../"]);
    assert_eq!(blob_requests(&server), 0);

    // In an index's entry.
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [{
            "mediaType": OCI_MANIFEST,
            "digest": "sha256:../../x",
            "size": 10,
            "platform": {"os": "linux", "architecture": "amd64"},
        }, {
            "mediaType": OCI_MANIFEST,
            "digest": "sha256:../../y",
            "size": 10,
            "platform": {"os": "linux", "architecture": "arm64"},
        }],
    }))
    .unwrap();
    let server = Site::raw(&image, index).start();
    fails_everywhere(&source_of(&server), &[], &[], &["bad digest", "../"]);
    assert_eq!(server.requests().len(), 2, "only the index, once per run");
}

#[test]
fn unknown_digest_algorithms_on_a_disk_layer_are_refused_naming_them() {
    let image = six_parts(62);
    for (alg, hex_len) in [("sha384", 96), ("blake3", 64), ("md5", 32)] {
        let digest = format!("{alg}:{}", "a".repeat(hex_len));
        let mut m = image.manifest_json();
        m["layers"][2]["digest"] = json!(digest);
        manifest_refused_everywhere(
            &image,
            serde_json::to_vec(&m).unwrap(),
            &[&format!("unsupported algorithm \"{alg}\"")],
        );
    }
}

#[test]
fn a_layout_index_without_the_platform_is_refused() {
    let tmp = TempDir::new().unwrap();
    let layout = LayoutDir::new(&tmp.path().join("multi"));
    let image = six_parts(63);
    layout.put_blob(b"{}");
    for l in &image.layers {
        layout.put_blob(&l.data);
    }
    let child = manifest_bytes(&image);
    let child_digest = layout.put_blob(&child);
    let entry = |os: &str, arch: &str| {
        json!({"mediaType": OCI_MANIFEST, "digest": child_digest, "size": child.len(),
               "platform": {"os": os, "architecture": arch}})
    };
    let index = json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [entry("linux", "mips64le"), entry("windows", "amd64")],
    });
    layout.put_manifest_bytes(Some("v1"), &serde_json::to_vec(&index).unwrap(), OCI_INDEX);
    let src = layout.source("v1");
    // This machine's architecture is not there…
    fails_everywhere(
        &src,
        &[],
        &[],
        &[
            "has no manifest for linux/",
            "linux/mips64le, windows/amd64",
        ],
    );
    // …nor the one asked for.
    fails_everywhere(
        &src,
        &["--platform", "linux/riscv64"],
        &[],
        &["no manifest for linux/riscv64"],
    );
    // While a platform it has resolves.
    get_ok(
        &src,
        &["--platform", "linux/mips64le"],
        &[],
        &expected_disk(&image),
    );
}

// ---------------------------------------------------------------------------
// The output: a full disk, a reader that goes away.

/// A small tmpfs, unmounted on drop.
struct SmallFs {
    dir: PathBuf,
    _tmp: TempDir,
}

impl SmallFs {
    /// `None` (after saying why) when mounting is not possible here.
    fn mount(size: &str) -> Option<SmallFs> {
        let tmp = TempDir::new().unwrap();
        let dir = tmp.path().join("small");
        std::fs::create_dir(&dir).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&dir)
            .output();
        match out {
            Ok(o) if o.status.success() => Some(SmallFs { dir, _tmp: tmp }),
            Ok(o) => {
                eprintln!(
                    "skipping: cannot mount a {size} tmpfs ({})",
                    String::from_utf8_lossy(&o.stderr).trim()
                );
                None
            }
            Err(e) => {
                eprintln!("skipping: cannot run mount ({e})");
                None
            }
        }
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.dir)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        }
    }
}

#[test]
fn a_full_disk_leaves_nothing_under_the_output_name() {
    let Some(fs) = SmallFs::mount("4m") else {
        return;
    };
    // 8 MiB of disk into a 4 MiB file system.
    let image = Image::split(&data(8 * MIB, 70), MIB);
    let tmp = TempDir::new().unwrap();
    let layout = LayoutDir::new(&tmp.path().join("img"));
    layout.put_image(Some("latest"), &image);
    let server = Site::new(&image).start();
    let target = fs.dir.join("disk.img");
    let target = target.to_str().unwrap();
    for (how, src, env) in [
        ("layout, kernel copy", layout.source("latest"), vec![]),
        (
            "layout, read/write",
            layout.source("latest"),
            vec![("CLOUDIMG_IO", "readwrite")],
        ),
        ("registry", source_of(&server), vec![]),
    ] {
        let out = cmd(&["get", "-q", &src, "-o", target], &env)
            .output()
            .unwrap();
        let line = failure(&out);
        assert!(line.contains("No space left on device"), "{how}: {line}");
        assert!(
            names(&fs.dir).is_empty(),
            "{how}: left {:?}",
            names(&fs.dir)
        );
    }
    // A cocoon whose store fills up: its exit is reported, nothing committed.
    let out = cmd(
        &["pull", "-q", "--name", "big", &layout.source("latest")],
        &[],
    )
    .env("EPOCH_COCOON_BINARY", standin())
    .env("COCOON_STANDIN_DIR", &fs.dir)
    .output()
    .unwrap();
    // (cocoon's own complaint about the full disk is on stderr too.)
    let line = our_line(&out);
    assert!(
        line.contains("cocoon image import big exited before the image was complete"),
        "{line}"
    );
    assert!(committed(&fs.dir).is_empty());
}

/// Read the first 1000 bytes of `get`'s stdout, then close the pipe: like
/// `cloudimg get … | head -c 1000`.
fn reader_goes_away(src: &str, env: &[(&str, &str)], want: &[u8]) -> String {
    let mut child = cmd(&["get", "-q", src], env)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut head = [0u8; 1000];
    child
        .stdout
        .as_mut()
        .unwrap()
        .read_exact(&mut head)
        .unwrap();
    assert!(head[..] == want[..1000]);
    drop(child.stdout.take());
    let status = wait_for(&mut child, Duration::from_secs(10));
    let err = stderr_of(&mut child);
    let line = failure(&Output {
        status,
        stdout: Vec::new(),
        stderr: err.into_bytes(),
    });
    assert!(line.contains("broken pipe"), "{line}");
    line
}

#[test]
fn a_reader_that_goes_away_is_a_broken_pipe() {
    // Well beyond what a (1 MiB) pipe holds.
    let image = Image::split(&data(6 * MIB, 71), MIB);
    let want = expected_disk(&image);
    let tmp = TempDir::new().unwrap();
    let layout = LayoutDir::new(&tmp.path().join("img"));
    layout.put_image(Some("latest"), &image);
    reader_goes_away(&layout.source("latest"), &[], &want);
    reader_goes_away(
        &layout.source("latest"),
        &[("CLOUDIMG_IO", "readwrite")],
        &want,
    );
    let server = Site::new(&image).start();
    reader_goes_away(&source_of(&server), &[], &want);
}

// ---------------------------------------------------------------------------
// cocoon: missing, broken, quitting, hanging.

/// A 6 MiB image in a layout named `win11`, and an empty store.
fn pull_setup(seed: u64) -> (TempDir, LayoutDir, PathBuf) {
    let tmp = TempDir::new().unwrap();
    let layout = LayoutDir::new(&tmp.path().join("win11"));
    layout.put_image(Some("25h2"), &Image::split(&data(6 * MIB, seed), MIB));
    let store = tmp.path().join("store");
    std::fs::create_dir(&store).unwrap();
    (tmp, layout, store)
}

fn pull_cmd(layout: &LayoutDir, store: &Path, env: &[(&str, &str)]) -> Command {
    let mut c = cmd(&["pull", "-q", &layout.source("25h2")], env);
    c.env("EPOCH_COCOON_BINARY", standin())
        .env("COCOON_STANDIN_DIR", store);
    c
}

/// Our one line among cocoon's own stderr.
fn our_line(out: &Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let ours: Vec<&str> = err.lines().filter(|l| l.starts_with("cloudimg:")).collect();
    assert_eq!(ours.len(), 1, "{err}");
    ours[0].to_owned()
}

#[test]
fn a_cocoon_quitting_mid_stream_is_reported() {
    let (_tmp, layout, store) = pull_setup(80);
    let out = pull_cmd(&layout, &store, &[("COCOON_STANDIN_QUIT_AFTER", "1000")])
        .output()
        .unwrap();
    let line = failure(&out);
    assert!(
        line.contains("cocoon image import win11 exited before the image was complete")
            && line.contains("exit status 0"),
        "{line}"
    );
    assert!(committed(&store).is_empty());
}

#[test]
fn a_cocoon_that_stops_reading_is_killed_with_its_group() {
    let (tmp, layout, store) = pull_setup(81);
    let pidfile = tmp.path().join("cocoon.pid");
    // It closes its stdin after 1000 bytes and would commit them 30 s later.
    let out = pull_cmd(
        &layout,
        &store,
        &[
            ("COCOON_STANDIN_HANG_AFTER", "1000"),
            ("COCOON_STANDIN_PIDFILE", pidfile.to_str().unwrap()),
        ],
    )
    .output()
    .unwrap();
    let line = failure(&out);
    assert!(
        line.contains("cocoon image import win11 stopped reading before the image was complete"),
        "{line}"
    );
    let pgid: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_group_gone(pgid);
    assert!(committed(&store).is_empty());
}

#[test]
fn a_cocoon_failing_at_the_end_is_reported() {
    let (_tmp, layout, store) = pull_setup(82);
    let out = pull_cmd(&layout, &store, &[("COCOON_STANDIN_EXIT", "4")])
        .output()
        .unwrap();
    let line = our_line(&out);
    assert!(
        line.contains("cocoon image import win11 failed (exit status 4)"),
        "{line}"
    );
    assert!(committed(&store).is_empty());
}

#[test]
fn a_cocoon_that_cannot_be_run_is_one_clear_line() {
    let (tmp, layout, store) = pull_setup(83);
    let not_executable = tmp.path().join("cocoon");
    std::fs::write(&not_executable, "#!/bin/sh\nexit 0\n").unwrap();
    for binary in [not_executable.as_path(), tmp.path()] {
        let out = pull_cmd(&layout, &store, &[])
            .env("EPOCH_COCOON_BINARY", binary)
            .output()
            .unwrap();
        let line = failure(&out);
        assert!(
            line.contains(binary.to_str().unwrap())
                && line.contains("Permission denied")
                && line.contains("EPOCH_COCOON_BINARY"),
            "{line}"
        );
    }
    assert!(names(&store).is_empty());
}

// ---------------------------------------------------------------------------
// Signals.

#[test]
fn sigint_and_sighup_during_pull_kill_the_group_and_commit_nothing() {
    for (sig, code, name) in [
        (Signal::SIGINT, 130, "SIGINT"),
        (Signal::SIGHUP, 129, "SIGHUP"),
    ] {
        let (tmp, layout, store) = pull_setup(90);
        let pidfile = tmp.path().join("cocoon.pid");
        // The stand-in sleeps before reading: the pipe fills and we block.
        let mut child = pull_cmd(
            &layout,
            &store,
            &[
                ("COCOON_STANDIN_DELAY", "30"),
                ("COCOON_STANDIN_PIDFILE", pidfile.to_str().unwrap()),
            ],
        )
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
        wait_until(Duration::from_secs(5), "cocoon to start", || {
            std::fs::read_to_string(&pidfile).is_ok_and(|s| s.ends_with('\n'))
        });
        std::thread::sleep(Duration::from_millis(200));
        signal(&child, sig);
        let status = wait_for(&mut child, Duration::from_secs(5));
        let err = stderr_of(&mut child);
        assert_eq!(status.code(), Some(code), "{err}");
        assert_eq!(err.trim(), format!("cloudimg: interrupted by {name}"));
        let pgid: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert_group_gone(pgid);
        assert!(committed(&store).is_empty());
    }
}

/// `get -o FILE ARGS…` from a registry whose last blob stalls (longer than
/// any test); once the temporary file holds data, send `sig`.
fn signal_during_get_to_a_file(sig: Signal, code: i32, name: &str, args: &[&str]) {
    let image = Image::split(&data(3 * 300_001, 91), 300_001);
    let last = sha256(&part(&image, 2).data);
    let site = Site::new(&image);
    let server = Server::start(move |req, _| {
        site.serve(req, |b| {
            if req.path().ends_with(&last) {
                Reply::blob(b).stall_after(10_000, Duration::from_secs(30))
            } else {
                Reply::blob(b)
            }
        })
    });
    let out_dir = TempDir::new().unwrap();
    let target = out_dir.path().join("disk.img");
    let src = source_of(&server);
    let mut all = vec!["get", "-q", &src, "-o", target.to_str().unwrap()];
    all.extend_from_slice(args);
    let mut child = cmd(&all, &[]).stderr(Stdio::piped()).spawn().unwrap();
    wait_until(Duration::from_secs(5), "the temporary file to fill", || {
        output_written(child.id(), out_dir.path()) >= 600_002
    });
    std::thread::sleep(Duration::from_millis(100));
    let sent = Instant::now();
    signal(&child, sig);
    let status = wait_for(&mut child, Duration::from_secs(10));
    let took = sent.elapsed();
    let err = stderr_of(&mut child);
    assert_eq!(status.code(), Some(code), "{err}");
    assert_eq!(err.trim(), format!("cloudimg: interrupted by {name}"));
    assert!(
        took < Duration::from_secs(5),
        "{name} took {took:?} to take effect ({args:?})"
    );
    assert!(
        names(out_dir.path()).is_empty(),
        "left {:?}",
        names(out_dir.path())
    );
}

/// The size of the largest file process `pid` has open in `dir`: its
/// output, named or not (an `O_TMPFILE` shows as `DIR/#INODE (deleted)`).
fn output_written(pid: u32, dir: &Path) -> u64 {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return 0;
    };
    fds.flatten()
        .filter(|fd| std::fs::read_link(fd.path()).is_ok_and(|to| to.starts_with(dir)))
        .filter_map(|fd| std::fs::metadata(fd.path()).ok())
        .map(|m| m.len())
        .max()
        .unwrap_or(0)
}

#[test]
fn sigint_during_get_to_a_file_leaves_nothing() {
    signal_during_get_to_a_file(Signal::SIGINT, 130, "SIGINT", &["--connections", "1"]);
    signal_during_get_to_a_file(Signal::SIGINT, 130, "SIGINT", &["--connections", "4"]);
}

#[test]
fn sigterm_during_get_to_a_file_leaves_nothing() {
    // With no retries left, the connection the signal cut is a failure of
    // its own; the signal still decides the exit status.
    signal_during_get_to_a_file(
        Signal::SIGTERM,
        143,
        "SIGTERM",
        &["--connections", "1", "--retries", "0"],
    );
}

// ---- Verified bytes under a concurrent writer ----
//
// A local user rewrites 4 KiB in the middle of a layout blob, with other
// bytes and back, every 200 µs while cloudimg streams it. Whatever the run
// ends with, a success must mean the delivered bytes are the image's: either
// the blob was leased (no writer could get in unnoticed) or its bytes were
// hashed exactly as written.

use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};

/// How the hostile writer holds the blob.
#[derive(Clone, Copy, Debug)]
enum Writer {
    /// Opened once for writing before cloudimg starts (no lease possible).
    Holding,
    /// Opened anew for every rewrite (each open breaks a lease).
    Reopening,
}

/// Rewrite 4 KiB at `at` of `path` with other bytes and back until `stop`.
fn rewriter(
    path: PathBuf,
    at: u64,
    how: Writer,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    let original = {
        let mut b = vec![0u8; 4096];
        std::fs::File::open(&path)
            .unwrap()
            .read_exact_at(&mut b, at)
            .unwrap();
        b
    };
    let other: Vec<u8> = original.iter().map(|b| !b).collect();
    let open = {
        let path = path.clone();
        move || std::fs::OpenOptions::new().write(true).open(&path).unwrap()
    };
    let held = matches!(how, Writer::Holding).then(&open);
    std::thread::spawn(move || {
        let mut flip = false;
        while !stop.load(Ordering::Relaxed) {
            let bytes = if flip { &original } else { &other };
            match &held {
                Some(f) => f.write_all_at(bytes, at).unwrap(),
                None => open().write_all_at(bytes, at).unwrap(),
            }
            flip = !flip;
            std::thread::sleep(Duration::from_micros(200));
        }
        // Leave the blob as it was.
        let f = open();
        f.write_all_at(&original, at).unwrap();
    })
}

/// `runs` runs of `get` (through a pipe, or `-o FILE`) of a 64 MiB one-part
/// layout under the rewriter: every success delivers the image's bytes.
/// Returns how many runs succeeded.
fn concurrent_writer(how: Writer, to_file: bool, runs: usize) -> usize {
    let disk = data(64 * MIB, 77);
    let image = Image::split(&disk, disk.len());
    let (_tmp, layout) = layout_with(&image, &manifest_bytes(&image));
    let blob = layout.blob_path(&sha256(&disk));
    let source = layout.source("latest");
    let out_dir = TempDir::new().unwrap();
    let target = out_dir.path().join("disk.img");
    let mut ok = 0;
    for run in 0..runs {
        let stop = Arc::new(AtomicBool::new(false));
        let writer = rewriter(blob.clone(), 32 * MIB as u64, how, Arc::clone(&stop));
        std::thread::sleep(Duration::from_millis(2));
        let mut args = vec!["get", "-q", source.as_str()];
        if to_file {
            args.extend(["-o", target.to_str().unwrap()]);
        }
        let out = cmd(&args, &[]).output().unwrap();
        stop.store(true, Ordering::Relaxed);
        writer.join().unwrap();
        if out.status.success() {
            let got = if to_file {
                std::fs::read(&target).unwrap()
            } else {
                out.stdout
            };
            assert!(
                got == disk,
                "run {run} ({how:?}, to_file={to_file}): exit 0 with bytes that are not the image"
            );
            ok += 1;
        } else {
            let line = failure(&out);
            assert!(
                line.contains("digest mismatch") || line.contains("opened for writing"),
                "run {run}: {line}"
            );
            assert!(!target.exists(), "run {run}: {line}");
        }
        let _ = std::fs::remove_file(&target);
        assert!(names(out_dir.path()).is_empty(), "run {run}: temp left");
    }
    println!("{how:?} to_file={to_file}: {ok} of {runs} runs succeeded");
    ok
}

#[test]
fn a_blob_rewritten_during_get_to_a_file_is_never_reported_verified() {
    concurrent_writer(Writer::Holding, true, 50);
}

#[test]
fn a_blob_rewritten_during_get_to_a_pipe_is_never_reported_verified() {
    concurrent_writer(Writer::Holding, false, 25);
}

#[test]
fn a_writer_opening_a_leased_blob_never_yields_a_verified_wrong_output() {
    concurrent_writer(Writer::Reopening, true, 15);
    concurrent_writer(Writer::Reopening, false, 15);
}

// ---- Page references that outlive the lease ----
//
// A kernel route hands the sink references to the blob's page-cache pages; the
// lease must cover every read of them. Each case below lets cloudimg reach its
// verdict while such references are still unread, then changes the blob's
// bytes in a way that does not break a lease on the file cloudimg opened, and
// reads. A success must still deliver the image.

/// A one-part layout of `len` bytes: the temporary directory, the layout, the
/// disk and its blob file.
fn one_part(len: usize, seed: u64) -> (TempDir, LayoutDir, Vec<u8>, PathBuf) {
    let disk = data(len, seed);
    let image = Image::split(&disk, disk.len());
    let (tmp, layout) = layout_with(&image, &manifest_bytes(&image));
    let blob = layout.blob_path(&sha256(&disk));
    (tmp, layout, disk, blob)
}

/// Overwrite the first 4 KiB of `path` with other bytes.
fn scribble(path: &Path) {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut head = vec![0u8; 4096];
    f.read_exact_at(&mut head, 0).unwrap();
    let other: Vec<u8> = head.iter().map(|b| !b).collect();
    f.write_all_at(&other, 0).unwrap();
}

/// Everything until EOF.
fn read_all(mut r: impl Read) -> Vec<u8> {
    let mut got = Vec::new();
    r.read_to_end(&mut got).unwrap();
    got
}

/// An overlay mount, taken down on drop.
struct Overlay(PathBuf);

impl Overlay {
    /// Mount `lower` under `base/merged`; `None` where mounting is not
    /// allowed (not root, no overlayfs).
    fn mount(base: &Path, lower: &Path) -> Option<Overlay> {
        let [upper, work, merged] = ["upper", "work", "merged"].map(|d| base.join(d));
        for d in [&upper, &work, &merged] {
            std::fs::create_dir_all(d).unwrap();
        }
        let opts = format!(
            "lowerdir={},upperdir={},workdir={}",
            lower.display(),
            upper.display(),
            work.display()
        );
        let ok = Command::new("mount")
            .args(["-t", "overlay", "overlay", "-o", &opts])
            .arg(&merged)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        ok.then_some(Overlay(merged))
    }
}

impl Drop for Overlay {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn a_blob_on_overlayfs_written_through_its_lower_path_is_never_reported_verified() {
    // The kernel grants a lease on the overlay file, but the lower file has
    // an inode of its own: opening that for writing breaks nothing.
    let (tmp, layout, disk, blob) = one_part(512 << 10, 91);
    let mnt = TempDir::new().unwrap();
    let Some(overlay) = Overlay::mount(mnt.path(), tmp.path()) else {
        println!("skipped: cannot mount overlayfs here");
        return;
    };
    let name = layout.dir.file_name().unwrap();
    let source = format!("oci:{}:latest", overlay.0.join(name).display());
    let (r, w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).unwrap();
    let mut child = cmd(&["get", "-q", &source], &[])
        .stdout(Stdio::from(w))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until the whole disk sits in the pipe, unread.
    let end = Instant::now() + Duration::from_secs(20);
    while rustix::io::ioctl_fionread(&r).unwrap() < disk.len() as u64 {
        assert!(Instant::now() < end, "the disk never filled the pipe");
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(100)); // the hashing is done
    scribble(&blob);
    let got = read_all(std::fs::File::from(r));
    let status = wait_for(&mut child, Duration::from_secs(20));
    let err = stderr_of(&mut child);
    assert!(
        !status.success() || got == disk,
        "exit 0 with bytes written through the lower path after hashing ({err})"
    );
    assert!(status.success(), "{err}");
}

#[test]
fn a_verified_blob_sent_to_a_local_socket_is_the_hashed_one_when_read_late() {
    // A peer on this host acknowledges what sits in its receive queue, so the
    // sender's queue is empty while the peer has read nothing yet.
    let (_tmp, layout, disk, blob) = one_part(32 << 10, 92);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let ours = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (peer, _) = listener.accept().unwrap();
    let mut child = cmd(&["get", "-q", &layout.source("latest")], &[])
        .stdout(Stdio::from(std::os::fd::OwnedFd::from(ours)))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = wait_for(&mut child, Duration::from_secs(20));
    let err = stderr_of(&mut child);
    assert!(status.success(), "{err}");
    // cloudimg is gone, and its lease with it: an ordinary write.
    scribble(&blob);
    assert!(
        read_all(peer) == disk,
        "exit 0, and the peer read bytes written after the verdict"
    );
}

#[test]
fn a_consumer_splicing_the_pipe_onward_reads_the_hashed_bytes() {
    // Like `cloudimg get | pv | consumer`: the middle splices cloudimg's pipe
    // into the next one, so cloudimg's pipe is empty while the consumer has
    // read nothing.
    let (_tmp, layout, disk, blob) = one_part(512 << 10, 93);
    let (r, w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).unwrap();
    let (next_r, next_w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).unwrap();
    rustix::pipe::fcntl_setpipe_size(&next_w, 1 << 20).unwrap();
    let mut child = cmd(&["get", "-q", &layout.source("latest")], &[])
        .stdout(Stdio::from(w))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    loop {
        let n = rustix::pipe::splice(
            &r,
            None,
            &next_w,
            None,
            1 << 20,
            rustix::pipe::SpliceFlags::empty(),
        )
        .unwrap();
        if n == 0 {
            break;
        }
    }
    let status = wait_for(&mut child, Duration::from_secs(20));
    let err = stderr_of(&mut child);
    assert!(status.success(), "{err}");
    scribble(&blob);
    drop(next_w);
    assert!(
        read_all(std::fs::File::from(next_r)) == disk,
        "exit 0, and the consumer read bytes written after the verdict"
    );
}

// ---- Outputs, limits and usage ----
//
// `-o` onto FIFOs, sockets, terminals and symlinks; temporary names that a
// killed run or a repeated PID leaves behind; the open-file limit with many
// layers; escaping of what a manifest says; bad flag values and output paths
// that must fail before anything is fetched.

/// A layout with a 3 MiB image in four parts, and the disk it makes.
fn small_layout(seed: u64) -> (TempDir, LayoutDir, Vec<u8>) {
    let tmp = TempDir::new().unwrap();
    let layout = LayoutDir::new(&tmp.path().join("img"));
    let image = Image::split(&data(3 * MIB + 12_345, seed), MIB);
    layout.put_image(Some("latest"), &image);
    (tmp, layout, expected_disk(&image))
}

fn mkfifo(path: &Path) {
    rustix::fs::mknodat(
        rustix::fs::CWD,
        path,
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o600),
        0,
    )
    .unwrap();
}

fn file_type(path: &Path) -> std::fs::FileType {
    std::fs::symlink_metadata(path).unwrap().file_type()
}

/// The entry names of `dir`, sorted (symlinks not followed).
fn entries(dir: &Path) -> Vec<String> {
    let mut found: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    found.sort();
    found
}

/// The result of a thread, if it finishes within `limit` (else it is left
/// running: it may be blocked for good, which is the failure being shown).
fn finished_within<T>(handle: std::thread::JoinHandle<T>, limit: Duration) -> Option<T> {
    let end = Instant::now() + limit;
    while !handle.is_finished() {
        if Instant::now() > end {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Some(handle.join().unwrap())
}

/// `get -q SOURCE -o TARGET` must succeed (stdout and stderr captured).
fn get_to(src: &str, target: &Path) -> Output {
    let mut child = cmd(&["get", "-q", src, "-o", target.to_str().unwrap()], &[])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = wait_for(&mut child, Duration::from_secs(20));
    let err = stderr_of(&mut child);
    assert!(status.success(), "-o {}: {err}", target.display());
    Output {
        status,
        stdout: Vec::new(),
        stderr: err.into_bytes(),
    }
}

#[test]
fn output_onto_a_fifo_or_a_link_to_one_is_written_in_place() {
    use std::os::unix::fs::FileTypeExt;
    let (tmp, layout, want) = small_layout(200);
    let src = layout.source("latest");
    let fifo = tmp.path().join("fifo");
    mkfifo(&fifo);
    let links = tmp.path().join("links");
    std::fs::create_dir(&links).unwrap();
    std::os::unix::fs::symlink(&fifo, links.join("out")).unwrap();
    for target in [fifo.clone(), links.join("out")] {
        // Like `cat fifo & cloudimg get … -o fifo`.
        let path = fifo.clone();
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            std::fs::File::open(path)
                .unwrap()
                .read_to_end(&mut got)
                .unwrap();
            got
        });
        get_to(&src, &target);
        let got = finished_within(reader, Duration::from_secs(10))
            .expect("the FIFO's reader never got an end of file");
        assert!(
            got == want,
            "-o {}: the reader got {} bytes, want {}",
            target.display(),
            got.len(),
            want.len()
        );
        assert!(file_type(&fifo).is_fifo(), "the FIFO was replaced");
        assert!(
            file_type(&links.join("out")).is_symlink(),
            "the link was replaced"
        );
        assert_eq!(entries(tmp.path()), ["fifo", "img", "links"]);
        assert_eq!(entries(&links), ["out"]);
    }
}

#[test]
fn output_onto_a_link_to_a_pipe_writes_into_the_pipe() {
    // What `-o /dev/stdout` is: a symlink to /proc/self/fd/1, here a pipe.
    let (tmp, layout, want) = small_layout(201);
    let link = tmp.path().join("stdout");
    std::os::unix::fs::symlink("/proc/self/fd/1", &link).unwrap();
    let out = cmd(
        &[
            "get",
            "-q",
            &layout.source("latest"),
            "-o",
            link.to_str().unwrap(),
        ],
        &[],
    )
    .output()
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.stdout == want,
        "the pipe got {} bytes, want {}",
        out.stdout.len(),
        want.len()
    );
    assert!(file_type(&link).is_symlink(), "the link was replaced");
    assert_eq!(entries(tmp.path()), ["img", "stdout"]);
}

#[test]
fn output_onto_a_unix_socket_path_connects_and_writes_into_it() {
    use std::os::unix::fs::FileTypeExt;
    use std::os::unix::net::UnixListener;
    use std::sync::atomic::{AtomicBool, Ordering};
    let (tmp, layout, want) = small_layout(202);
    let path = tmp.path().join("sock");
    let listener = UnixListener::bind(&path).unwrap();
    listener.set_nonblocking(true).unwrap();
    let done = Arc::new(AtomicBool::new(false));
    let finished = Arc::clone(&done);
    let reader = std::thread::spawn(move || {
        loop {
            match listener.accept() {
                Ok((mut s, _)) => {
                    s.set_nonblocking(false).unwrap();
                    let mut got = Vec::new();
                    s.read_to_end(&mut got).unwrap();
                    return Some(got);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    // A connection made before cloudimg exited is queued.
                    if finished.load(Ordering::SeqCst) {
                        return None;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => panic!("accept: {e}"),
            }
        }
    });
    get_to(&layout.source("latest"), &path);
    done.store(true, Ordering::SeqCst);
    let got = finished_within(reader, Duration::from_secs(10))
        .expect("the socket's reader never got an end of file")
        .expect("nobody connected to the socket");
    assert!(
        got == want,
        "the socket got {} bytes, want {}",
        got.len(),
        want.len()
    );
    assert!(file_type(&path).is_socket(), "the socket was replaced");
    assert_eq!(entries(tmp.path()), ["img", "sock"]);
}

#[test]
fn output_onto_a_terminal_is_refused() {
    use std::os::fd::AsRawFd;
    let (_tmp, layout, _want) = small_layout(203);
    let pty = nix::pty::openpty(None, None).unwrap();
    let slave = std::fs::read_link(format!("/proc/self/fd/{}", pty.slave.as_raw_fd())).unwrap();
    rustix::fs::fcntl_setfl(&pty.master, rustix::fs::OFlags::NONBLOCK).unwrap();
    let mut child = cmd(
        &[
            "get",
            "-q",
            &layout.source("latest"),
            "-o",
            slave.to_str().unwrap(),
        ],
        &[],
    )
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let status = wait_for(&mut child, Duration::from_secs(10));
    let err = stderr_of(&mut child);
    let line = failure(&Output {
        status,
        stdout: Vec::new(),
        stderr: err.into_bytes(),
    });
    assert!(line.contains("terminal"), "{line}");
    let mut buf = [0u8; 4096];
    match rustix::io::read(&pty.master, &mut buf) {
        Err(rustix::io::Errno::AGAIN) => {}
        other => panic!("something reached the terminal: {other:?}"),
    }
}

/// Whether process `pid` is blocked opening a FIFO that has no reader.
fn waiting_for_a_fifo_partner(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/wchan"))
        .is_ok_and(|w| w.contains("partner") || w.contains("fifo"))
}

#[test]
fn a_signal_while_waiting_for_a_fifo_reader_ends_the_run() {
    use std::os::unix::fs::FileTypeExt;
    let (tmp, layout, _want) = small_layout(204);
    let fifo = tmp.path().join("fifo");
    mkfifo(&fifo);
    for (sig, code, name) in [
        (Signal::SIGINT, 130, "SIGINT"),
        (Signal::SIGTERM, 143, "SIGTERM"),
    ] {
        let mut child = cmd(
            &[
                "get",
                "-q",
                &layout.source("latest"),
                "-o",
                fifo.to_str().unwrap(),
            ],
            &[],
        )
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
        // Nobody reads the FIFO: opening it for writing blocks.
        wait_until(
            Duration::from_secs(10),
            "cloudimg to wait for a reader",
            || waiting_for_a_fifo_partner(child.id()),
        );
        signal(&child, sig);
        let status = wait_for(&mut child, Duration::from_secs(5));
        let err = stderr_of(&mut child);
        assert_eq!(status.code(), Some(code), "{err}");
        assert_eq!(err.trim(), format!("cloudimg: interrupted by {name}"));
        assert!(file_type(&fifo).is_fifo(), "the FIFO was replaced");
        assert_eq!(entries(tmp.path()), ["fifo", "img"]);
    }
}

#[test]
fn output_through_a_symlink_writes_the_file_it_names() {
    let (tmp, layout, want) = small_layout(205);
    let src = layout.source("latest");
    let real = tmp.path().join("real");
    let links = tmp.path().join("links");
    std::fs::create_dir(&real).unwrap();
    std::fs::create_dir(&links).unwrap();
    std::fs::write(real.join("disk.img"), b"old contents").unwrap();
    // An absolute link, a relative one, a chain, and one to a file not there yet.
    std::os::unix::fs::symlink(real.join("disk.img"), links.join("abs")).unwrap();
    std::os::unix::fs::symlink("../real/disk.img", links.join("rel")).unwrap();
    std::os::unix::fs::symlink("rel", links.join("chain")).unwrap();
    std::os::unix::fs::symlink("../real/new.img", links.join("new")).unwrap();
    for (link, file) in [
        ("abs", "disk.img"),
        ("rel", "disk.img"),
        ("chain", "disk.img"),
        ("new", "new.img"),
    ] {
        std::fs::write(real.join("disk.img"), b"old contents").unwrap();
        get_to(&src, &links.join(link));
        assert!(
            std::fs::read(real.join(file)).unwrap() == want,
            "-o links/{link}: real/{file} does not hold the disk"
        );
        for l in ["abs", "rel", "chain", "new"] {
            assert!(file_type(&links.join(l)).is_symlink(), "links/{l} replaced");
        }
        assert_eq!(entries(&links), ["abs", "chain", "new", "rel"]);
    }
    assert_eq!(entries(&real), ["disk.img", "new.img"]);
}

#[test]
fn a_temporary_file_left_by_an_earlier_run_with_the_same_pid_does_not_block() {
    // In a container or an initramfs, cloudimg is often PID 1 every time.
    let probe = Command::new("unshare")
        .args(["--pid", "--fork", "true"])
        .status();
    if !probe.is_ok_and(|s| s.success()) {
        eprintln!("skipping: cannot make a PID namespace with unshare");
        return;
    }
    let (tmp, layout, want) = small_layout(206);
    let out = tmp.path().join("out");
    std::fs::create_dir(&out).unwrap();
    // What a run killed by SIGKILL or a power cut left behind.
    for pid in 1..=3 {
        std::fs::write(out.join(format!(".disk.img.cloudimg-{pid}.tmp")), b"stale").unwrap();
    }
    let target = out.join("disk.img");
    for _ in 0..2 {
        let run = Command::new("unshare")
            .args(["--pid", "--fork", "--", env!("CARGO_BIN_EXE_cloudimg")])
            .args(["get", "-q", &layout.source("latest"), "-o"])
            .arg(&target)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(
            run.status.success(),
            "{}",
            String::from_utf8_lossy(&run.stderr)
        );
        assert!(std::fs::read(&target).unwrap() == want);
    }
    // Another run's files are not ours to remove.
    assert_eq!(entries(&out).len(), 4, "{:?}", entries(&out));
}

#[test]
fn a_run_killed_mid_stream_leaves_no_temporary_file() {
    let out_dir = TempDir::new().unwrap();
    let tmpfile = rustix::fs::open(
        out_dir.path(),
        rustix::fs::OFlags::WRONLY | rustix::fs::OFlags::TMPFILE,
        rustix::fs::Mode::from_raw_mode(0o600),
    );
    if tmpfile.is_err() || !Path::new("/proc/self/fd").is_dir() {
        eprintln!("skipping: no O_TMPFILE here (or no /proc), so a named temporary file is used");
        return;
    }
    drop(tmpfile);
    let image = Image::split(&data(3 * 300_001, 210), 300_001);
    let last = sha256(&part(&image, 2).data);
    let stalled = last.clone();
    let site = Site::new(&image);
    let server = Server::start(move |req, _| {
        site.serve(req, |b| {
            if req.path().ends_with(&stalled) {
                Reply::blob(b).stall_after(10_000, Duration::from_secs(30))
            } else {
                Reply::blob(b)
            }
        })
    });
    let target = out_dir.path().join("disk.img");
    let mut child = cmd(
        &[
            "get",
            "-q",
            &source_of(&server),
            "-o",
            target.to_str().unwrap(),
            "--connections",
            "1",
        ],
        &[],
    )
    .spawn()
    .unwrap();
    wait_until(
        Duration::from_secs(10),
        "the last part to be requested",
        || server.requests().iter().any(|r| r.path().ends_with(&last)),
    );
    std::thread::sleep(Duration::from_millis(200));
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        entries(out_dir.path()).is_empty(),
        "SIGKILL left {:?}",
        entries(out_dir.path())
    );
}

/// The binary under `ulimit -n SOFT` with hard limit HARD.
fn with_open_file_limit(mut c: Command, soft: u64, hard: u64) -> Command {
    use std::os::unix::process::CommandExt;
    let limit = rustix::process::Rlimit {
        current: Some(soft),
        maximum: Some(hard),
    };
    // SAFETY: setrlimit is async-signal-safe and touches no memory of ours.
    unsafe {
        c.pre_exec(move || {
            rustix::process::setrlimit(rustix::process::Resource::Nofile, limit)
                .map_err(std::io::Error::from)
        });
    }
    c
}

#[test]
fn many_layers_under_a_low_open_file_limit() {
    // 300 parts, one open file each, against a soft limit of 64.
    let image = Image::split(&data(300 * 1000, 211), 1000);
    let want = expected_disk(&image);
    let tmp = TempDir::new().unwrap();
    let layout = LayoutDir::new(&tmp.path().join("img"));
    layout.put_image(Some("latest"), &image);
    let src = layout.source("latest");
    // The hard limit allows more: cloudimg raises its soft limit.
    let out = with_open_file_limit(cmd(&["get", "-q", &src], &[]), 64, 4096)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.stdout == want, "output differs");
    // It does not: one line that names the limit.
    let out = with_open_file_limit(cmd(&["get", "-q", &src], &[]), 64, 64)
        .output()
        .unwrap();
    let line = failure(&out);
    assert!(
        line.contains("too many open files") && line.contains("limit (RLIMIT_NOFILE) is 64"),
        "{line}"
    );
}

#[test]
fn format_characters_from_a_manifest_are_escaped() {
    let mut image = Image::split(&data(3000, 212), 1000);
    for l in &mut image.layers {
        match l.title.as_deref() {
            Some("disk.00.qcow2.part") => l.title = Some("disk.00\u{202e}2wocq.part".into()),
            Some("disk.01.qcow2.part") => l.title = Some("disk.01\u{200b}.qcow2.part".into()),
            _ => {}
        }
    }
    let tmp = TempDir::new().unwrap();
    let layout = LayoutDir::new(&tmp.path().join("img"));
    layout.put_image(Some("latest"), &image);
    let src = layout.source("latest");
    let out = cmd(&["inspect", &src], &[]).output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        !text.contains('\u{202e}') && !text.contains('\u{200b}'),
        "{text:?}"
    );
    assert!(
        text.contains("\\u{202e}") && text.contains("\\u{200b}"),
        "{text}"
    );
    // An error line naming the part.
    let first = image
        .layers
        .iter()
        .find(|l| l.title.as_deref().is_some_and(|t| t.starts_with("disk.00")))
        .unwrap();
    Damage::Truncate.damage_file(&layout.blob_path(&sha256(&first.data)));
    let line = get_fails(&src, &[], &[]);
    assert!(
        !line.contains('\u{202e}') && line.contains("disk.00\\u{202e}2wocq.part"),
        "{line:?}"
    );
}

#[test]
fn bad_flag_values_are_usage_errors() {
    let (_tmp, layout, _want) = small_layout(213);
    let src = layout.source("latest");
    for args in [
        vec!["get", "--sparse", "bogus", &src],
        vec!["get", "--connections", "0", &src],
        vec!["inspect", "--connections", "0", &src],
        vec!["get", "--stall-timeout", "0", &src],
        vec!["get", "--username", "user", &src],
        vec!["pull", "--password-stdin", &src],
        vec!["get", "--mirror", "ftp://mirror", &src],
        vec!["get", "--platform", "linux", &src],
    ] {
        let out = cmd(&args, &[]).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(err.starts_with("cloudimg: "), "{args:?}: {err}");
        assert!(out.stdout.is_empty(), "{args:?}");
    }
}

#[test]
fn an_unusable_output_path_fails_before_any_request() {
    let server = Site::new(&six_parts(214)).start();
    let src = source_of(&server);
    let tmp = TempDir::new().unwrap();
    let dir = tmp.path().join("adir");
    std::fs::create_dir(&dir).unwrap();
    let base = tmp.path().display().to_string();
    for target in [
        format!("{base}/newname/"),
        format!("{base}/missing/disk.img"),
        format!("{base}/adir"),
        format!("{base}/adir/"),
        String::new(),
    ] {
        let out = cmd(&["get", "-q", &src, "-o", &target], &[])
            .output()
            .unwrap();
        let line = failure(&out);
        assert!(
            server.requests().is_empty(),
            "-o {target:?}: {} requests before failing with: {line}",
            server.requests().len()
        );
        assert_eq!(entries(tmp.path()), ["adir"], "-o {target:?}");
        assert!(entries(&dir).is_empty(), "-o {target:?}");
    }
}

#[test]
fn a_nonblocking_stdout_pipe_is_waited_for() {
    let (_tmp, layout, want) = small_layout(215);
    let (read, write) = rustix::pipe::pipe().unwrap();
    rustix::fs::fcntl_setfl(&write, rustix::fs::OFlags::NONBLOCK).unwrap();
    let mut child = cmd(&["get", "-q", &layout.source("latest")], &[])
        .stdout(Stdio::from(write))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Read nothing for a while: the pipe fills and a write finds it full.
    std::thread::sleep(Duration::from_millis(300));
    let mut got = Vec::new();
    std::fs::File::from(read).read_to_end(&mut got).unwrap();
    let status = wait_for(&mut child, Duration::from_secs(20));
    let err = stderr_of(&mut child);
    assert!(status.success(), "{err}");
    assert!(got == want, "got {} bytes, want {}", got.len(), want.len());
}

// ---- Registry: credentials, bounded reads, mirrors ----

/// `cmd(args, env)` with `password` on its stdin; its output.
fn run_with_password(args: &[&str], env: &[(&str, &str)], password: &str) -> Output {
    let mut child = cmd(args, env)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), password.as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

/// base64("alice:hunter2")
const ALICE_BASIC: &str = "Basic YWxpY2U6aHVudGVyMg==";

/// A docker config directory whose `auths` give alice:hunter2 to `key`.
fn docker_config_for(key: &str) -> TempDir {
    let dir = TempDir::new().unwrap();
    std::fs::write(
        dir.path().join("config.json"),
        format!(r#"{{"auths":{{"{key}":{{"auth":"YWxpY2U6aHVudGVyMg=="}}}}}}"#),
    )
    .unwrap();
    dir
}

/// Whether any header of `r` carries alice's password in any form.
fn carries_password(r: &Request) -> bool {
    r.headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("authorization") || v.contains("YWxpY2U6aHVudGVyMg"))
}

#[test]
fn credentials_for_an_https_registry_never_reach_its_plain_http_twin() {
    let ca = common::tls::test_ca();
    let ca_pem = ca.ca_pem.to_str().unwrap();
    // The token realm the plain-http side may point at (anonymous tokens).
    let realm = Server::start(|_, _| Reply::json(200, &json!({"token": "anon"})));
    let realm_url = format!("{}/token", realm.url());
    for bearer in [false, true] {
        for from_docker_config in [false, true] {
            let realm_url = realm_url.clone();
            // One port, two origins: over TLS the registry asks for the
            // password and, once given it, redirects to http on the same
            // host and port, where a challenge asks again.
            let server = Server::start_tls(Arc::clone(&ca.server), move |req, _| {
                let host = req.header("host").unwrap().to_owned();
                if req.tls {
                    return match req.header("authorization") {
                        Some(ALICE_BASIC) => {
                            Reply::redirect(307, &format!("http://{host}{}", req.target))
                        }
                        _ => Reply::status(401).header("WWW-Authenticate", "Basic realm=\"x\""),
                    };
                }
                let challenge = if bearer {
                    format!("Bearer realm=\"{realm_url}\",service=\"twin\"")
                } else {
                    "Basic realm=\"x\"".to_owned()
                };
                Reply::status(401).header("WWW-Authenticate", &challenge)
            });
            let docker = docker_config_for(&server.host());
            let https = server.https_url();
            let mut env = vec![("EPOCH_SERVER", https.as_str()), ("EPOCH_CA_CERT", ca_pem)];
            let out = if from_docker_config {
                env.push(("DOCKER_CONFIG", docker.path().to_str().unwrap()));
                cmd(&["inspect", "r:v1"], &env).output().unwrap()
            } else {
                run_with_password(
                    &["inspect", "r:v1", "--username", "alice", "--password-stdin"],
                    &env,
                    "hunter2\n",
                )
            };
            let line = failure(&out);
            let case = format!("bearer={bearer} docker_config={from_docker_config}: {line}");
            println!("{case}");
            let seen = server.requests();
            // The https origin got the password (that is whose it is)...
            assert!(
                seen.iter()
                    .any(|r| r.tls && r.header("authorization") == Some(ALICE_BASIC)),
                "{case}"
            );
            // ...and the plain-http origin was reached, but never with it.
            let plain: Vec<&Request> = seen.iter().filter(|r| !r.tls).collect();
            assert!(!plain.is_empty(), "the redirect was not followed: {case}");
            for r in plain {
                assert!(
                    !r.headers
                        .iter()
                        .any(|(_, v)| v.contains("YWxpY2U6aHVudGVyMg")),
                    "the password went over plain http: {:?} ({case})",
                    r.headers
                );
            }
            assert!(!line.contains("hunter2"), "{case}");
        }
    }
    // Only the anonymous kind of token was ever asked for.
    for r in realm.requests() {
        assert!(!carries_password(&r), "the realm got {:?}", r.headers);
    }
}

/// A local address that is not loopback (the one the default route would
/// leave from), or `None` on a machine without one.
fn non_loopback_address() -> Option<std::net::IpAddr> {
    for probe in ["192.0.2.1:9", "10.255.255.1:9", "8.8.8.8:53"] {
        let Ok(s) = std::net::UdpSocket::bind("0.0.0.0:0") else {
            continue;
        };
        // Connecting a UDP socket sends nothing; it only picks a route.
        if s.connect(probe).is_ok()
            && let Ok(a) = s.local_addr()
            && !a.ip().is_loopback()
            && !a.ip().is_unspecified()
            && std::net::TcpListener::bind((a.ip(), 0)).is_ok()
        {
            return Some(a.ip());
        }
    }
    None
}

#[test]
fn no_password_goes_over_plain_http_off_loopback_without_plain_http() {
    let Some(ip) = non_loopback_address() else {
        println!("skipped: this machine has no address off loopback");
        return;
    };
    let image = six_parts(120);
    let site = Site::new(&image);
    // A registry off loopback over plain http, asking for a password.
    let server = Server::start_at(ip, move |req, _| {
        if req.header("authorization") != Some(ALICE_BASIC) {
            return Reply::status(401).header("WWW-Authenticate", "Basic realm=\"x\"");
        }
        site.serve(req, Reply::blob)
    });
    let epoch = server.url();
    let env = [("EPOCH_SERVER", epoch.as_str())];
    let line = failure(&run_with_password(
        &[
            "inspect",
            "img:v1",
            "--username",
            "alice",
            "--password-stdin",
        ],
        &env,
        "hunter2\n",
    ));
    assert!(
        line.contains("plain http") && line.contains("--plain-http"),
        "{line}"
    );
    assert!(
        server.requests().iter().all(|r| !carries_password(r)),
        "the password went over plain http: {line}"
    );
    // The same from the docker config.
    let docker = docker_config_for(&server.host());
    let line = failure(
        &cmd(
            &["inspect", "img:v1"],
            &[
                ("EPOCH_SERVER", &epoch),
                ("DOCKER_CONFIG", docker.path().to_str().unwrap()),
            ],
        )
        .output()
        .unwrap(),
    );
    assert!(line.contains("plain http"), "{line}");
    assert!(server.requests().iter().all(|r| !carries_password(r)));
    // A token realm off loopback over plain http, for a loopback registry.
    let realm = Server::start_at(ip, |_, _| Reply::json(200, &json!({"token": "t"})));
    let realm_url = format!("{}/token", realm.url());
    let registry = challenging(realm_url);
    let line = failure(&run_with_password(
        &[
            "inspect",
            &source_of(&registry),
            "--username",
            "alice",
            "--password-stdin",
        ],
        &[],
        "hunter2\n",
    ));
    assert!(line.contains("plain http"), "{line}");
    assert!(realm.requests().is_empty(), "the realm was asked: {line}");
    // With --plain-http the user has accepted plain http: the password goes.
    let out = run_with_password(
        &[
            "inspect",
            "img:v1",
            "--username",
            "alice",
            "--password-stdin",
            "--plain-http",
        ],
        &env,
        "hunter2\n",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A loopback port nobody listens on.
fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

#[test]
fn user_names_and_passwords_in_urls_are_never_printed() {
    let closed = closed_port();
    let with_userinfo = format!("http://user:tok3n@127.0.0.1:{closed}");
    let check = |line: &str| {
        assert!(!line.contains("tok3n") && !line.contains("user:"), "{line}");
    };
    // EPOCH_SERVER with userinfo, unreachable.
    let line = failure(
        &cmd(
            &["inspect", "img:v1", "--retries", "0"],
            &[("EPOCH_SERVER", &with_userinfo)],
        )
        .output()
        .unwrap(),
    );
    assert!(
        line.contains(&format!(
            "http://***@127.0.0.1:{closed}/v2/img/manifests/v1"
        )),
        "{line}"
    );
    check(&line);
    // EPOCH_SERVER that is no URL at all.
    let line = failure(
        &cmd(
            &["inspect", "img:v1"],
            &[("EPOCH_SERVER", "http://user:tok3n@")],
        )
        .output()
        .unwrap(),
    );
    check(&line);
    // A mirror URL that is refused: a usage error (exit 2), one line.
    let out = cmd(
        &[
            "inspect",
            "img:v1",
            "--mirror",
            "ftp://user:tok3n@m.example/",
        ],
        &[],
    )
    .output()
    .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(err.lines().count(), 1, "{err}");
    check(err.trim_end());
    // The same from the environment: exit 1.
    let out = cmd(
        &["inspect", "img:v1"],
        &[("CLOUDIMG_MIRRORS", "ftp://user:tok3n@m.example/")],
    )
    .output()
    .unwrap();
    check(&failure(&out));
    // A registry that redirects blobs to a URL with userinfo, unreachable.
    let image = six_parts(121);
    let site = Site::new(&image);
    let target = with_userinfo.clone();
    let server = Server::start(move |req, _| {
        if req.path().contains("/blobs/") {
            return Reply::redirect(307, &format!("{target}/store?X-Signature=s3cr3t"));
        }
        site.serve(req, Reply::blob)
    });
    let line = get_fails(&source_of(&server), &["--retries", "0"], &[]);
    assert!(
        line.contains("***@127.0.0.1") && !line.contains("s3cr3t"),
        "{line}"
    );
    check(&line);
}

/// What a broken mirror answers for every blob and manifest.
#[derive(Clone, Copy, Debug)]
enum BadMirror {
    /// 200 with an HTML page (a captive portal, an error page): wrong size.
    HtmlPage,
    /// 200 with an HTML page padded to the blob's own length.
    HtmlOfTheRightLength,
    /// 500.
    ServerError,
    /// The connection closed without an answer.
    Hangs,
    /// 206 claiming another total size.
    WrongContentRange,
}

fn bad_mirror(how: BadMirror, site: Arc<Site>) -> Server {
    Server::start(move |req, _| {
        let len = req
            .path()
            .rsplit('/')
            .next()
            .and_then(|d| site.blobs.get(d))
            .map_or(site.manifest.len(), |b| b.len());
        let page = b"<html><body>Please log in to the hotel network</body></html>".to_vec();
        match how {
            BadMirror::HtmlPage => Reply::bytes(200, "text/html", page),
            BadMirror::HtmlOfTheRightLength => {
                let mut page = page;
                page.resize(len, b' ');
                Reply::bytes(200, "text/html; charset=utf-8", page)
            }
            BadMirror::ServerError => Reply::status(500),
            BadMirror::Hangs => Reply::Close,
            BadMirror::WrongContentRange => Reply::Full {
                status: 206,
                headers: vec![("Content-Range".into(), format!("bytes 0-9/{}", len + 1))],
                body: vec![0; 10],
            },
        }
    })
}

#[test]
fn a_mirror_with_a_wrong_answer_is_skipped_for_the_next_source() {
    let image = six_parts(130);
    let want = expected_disk(&image);
    let site = Arc::new(Site::new(&image));
    let manifest_digest = sha256(&site.manifest);
    let origin_site = Arc::clone(&site);
    let registry = Server::start(move |req, _| origin_site.serve(req, Reply::blob));
    for how in [
        BadMirror::HtmlPage,
        BadMirror::HtmlOfTheRightLength,
        BadMirror::ServerError,
        BadMirror::Hangs,
        BadMirror::WrongContentRange,
    ] {
        for connections in ["1", "4"] {
            let mirror = bad_mirror(how, Arc::clone(&site));
            let before = blob_requests(&registry);
            // A digest-pinned reference, so that the manifest is asked of
            // the mirror too.
            let src = format!("{}/img@{manifest_digest}", registry.host());
            let args = ["--mirror", &mirror.url(), "--connections", connections];
            let out = get_ok(&src, &args, &[], &want);
            let err = String::from_utf8_lossy(&out.stderr).into_owned();
            let case = format!("{how:?}, {connections} connection(s): {err}");
            println!("{case}");
            // Each wrong answer is one line naming the mirror; the registry
            // served every part.
            let lines: Vec<&str> = err.lines().collect();
            assert!(!lines.is_empty(), "nothing said about the mirror: {case}");
            assert!(
                lines.len() <= 7,
                "one line per blob and manifest at most: {case}"
            );
            for l in &lines {
                assert!(
                    l.starts_with(&format!("cloudimg: mirror {}", mirror.url())),
                    "{case}"
                );
            }
            assert!(blob_requests(&registry) - before >= 6, "{case}");
        }
    }
}

#[test]
fn a_bad_mirror_is_followed_by_the_next_mirror_before_the_registry() {
    let image = six_parts(131);
    let want = expected_disk(&image);
    let site = Arc::new(Site::new(&image));
    let bad = bad_mirror(BadMirror::HtmlPage, Arc::clone(&site));
    let good_site = Arc::clone(&site);
    let good = Server::start(move |req, _| good_site.serve(req, Reply::blob));
    let origin_site = Arc::clone(&site);
    let registry = Server::start(move |req, _| origin_site.serve(req, Reply::blob));
    for connections in ["1", "4"] {
        let args = [
            "--mirror",
            &bad.url(),
            "--mirror",
            &good.url(),
            "--connections",
            connections,
        ];
        let out = get_ok(&source_of(&registry), &args, &[], &want);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(&format!("cloudimg: mirror {}", bad.url())),
            "{err}"
        );
    }
    assert_eq!(
        blob_requests(&registry),
        0,
        "the second mirror served every part"
    );
}

#[test]
fn a_mirror_sending_wrong_bytes_of_the_right_length_fails_naming_the_mirror() {
    let image = six_parts(132);
    let site = Arc::new(Site::new(&image));
    let zero_site = Arc::clone(&site);
    // The right length, its second half zeros: the size is right (and the
    // disk's first bytes too, which pull checks before cocoon starts), so
    // the bytes flow; only the digest, at the end, shows they are wrong.
    let mirror = Server::start(move |req, _| {
        let d = req.path().rsplit('/').next().unwrap();
        match zero_site.blobs.get(d) {
            Some(b) => {
                let mut wrong = b.to_vec();
                let half = wrong.len() / 2;
                wrong[half..].fill(0);
                Reply::blob(Arc::new(wrong))
            }
            None => Reply::status(404),
        }
    });
    let origin_site = Arc::clone(&site);
    let registry = Server::start(move |req, _| origin_site.serve(req, Reply::blob));
    for connections in ["1", "4"] {
        fails_everywhere(
            &source_of(&registry),
            &["--mirror", &mirror.url(), "--connections", connections],
            &[],
            &[
                "digest mismatch",
                "disk.00.qcow2.part",
                &format!("mirror {}", mirror.url()),
            ],
        );
    }
}

#[test]
fn a_mirror_dropping_the_connection_mid_blob_hands_over_to_the_registry() {
    let image = six_parts(133);
    let want = expected_disk(&image);
    let site = Arc::new(Site::new(&image));
    let cut_site = Arc::clone(&site);
    let mirror =
        Server::start(move |req, _| cut_site.serve(req, |b| Reply::blob(b).cut_after(1000)));
    let origin_site = Arc::clone(&site);
    let registry = Server::start(move |req, _| origin_site.serve(req, Reply::blob));
    for connections in ["1", "4"] {
        // No retries: handing over must not cost any.
        let args = [
            "--mirror",
            &mirror.url(),
            "--connections",
            connections,
            "--retries",
            "0",
        ];
        let out = get_ok(&source_of(&registry), &args, &[], &want);
        let err = String::from_utf8_lossy(&out.stderr);
        let lines: Vec<&str> = err.lines().collect();
        assert!(!lines.is_empty() && lines.len() <= 6, "{err}");
        for l in lines {
            assert!(
                l.starts_with(&format!("cloudimg: mirror {}", mirror.url()))
                    && l.contains("connection lost"),
                "{err}"
            );
        }
    }
    // The registry continued each part where the mirror broke off.
    assert!(
        registry
            .requests()
            .iter()
            .any(|r| r.range().is_some_and(|(s, _)| s % 65536 == 1000)),
        "no part continued from the byte the mirror reached"
    );
}

#[test]
fn a_server_honouring_range_only_at_offset_zero_is_not_read_quadratically() {
    // One 8 MiB part: 128 range chunks of 64 KiB.
    let image = Image::split(&data(8 * MIB, 140), 8 * MIB);
    let want = expected_disk(&image);
    let site = Site::new(&image);
    // 206 for a range from byte 0; the whole blob (200) for any other.
    let server = Server::start(move |req, _| {
        site.serve(req, |b| match req.range() {
            Some((start, _)) if start > 0 => Reply::blob(b).no_range(),
            _ => Reply::blob(b),
        })
    });
    get_ok(&source_of(&server), &["--connections", "4"], &[], &want);
    let served = server.body_bytes();
    println!("{served} body bytes served for an {} byte blob", 8 * MIB);
    assert!(
        served < 3 * 8 * MIB as u64,
        "{served} bytes served for an 8 MiB blob"
    );
    // Parallel ranges were tried, and given up after the first whole-blob
    // answers (those already in flight), not asked chunk by chunk.
    let ranged_past_zero = server
        .requests()
        .iter()
        .filter(|r| r.range().is_some_and(|(s, _)| s > 0))
        .count();
    assert!(
        (1..=4 + 2).contains(&ranged_past_zero),
        "{ranged_past_zero} range requests"
    );
}

/// Run `cmd(args, env)`; it must fail (one line) before `limit` is up.
fn fails_within(args: &[&str], env: &[(&str, &str)], limit: Duration) -> String {
    let started = Instant::now();
    let mut child = cmd(args, env)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = wait_for(&mut child, limit);
    let err = stderr_of(&mut child);
    assert_eq!(status.code(), Some(1), "{err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(lines[0].starts_with("cloudimg: "), "{err}");
    println!("{:?}: {}", started.elapsed(), lines[0]);
    lines[0].to_owned()
}

/// Headers that never end: a header byte every 300 ms.
fn endless_headers() -> Reply {
    Reply::Raw {
        head: b"HTTP/1.1 200 OK\r\n".to_vec(),
        tail: b"X-Slow: 1\r\n".to_vec(),
        piece: 1,
        every: Duration::from_millis(300),
        repeat: true,
    }
}

/// A `103 Early Hints` every 500 ms, and never a final answer.
fn endless_early_hints() -> Reply {
    Reply::Raw {
        head: Vec::new(),
        tail: b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n".to_vec(),
        piece: 1 << 10,
        every: Duration::from_millis(500),
        repeat: true,
    }
}

/// `body` with the headers of `status`, its first `fast` bytes at once and
/// the rest a byte every 200 ms.
fn trickled(status: &str, extra: &str, body: &[u8], fast: usize) -> Reply {
    let mut head = format!(
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\n{extra}\r\n",
        body.len()
    )
    .into_bytes();
    head.extend_from_slice(&body[..fast]);
    Reply::Raw {
        head,
        tail: body[fast..].to_vec(),
        piece: 1,
        every: Duration::from_millis(200),
        repeat: false,
    }
}

/// A blob answer to `req` (206 for a range, else 200) that trickles after
/// 1000 bytes.
fn trickled_blob(req: &Request, data: &[u8]) -> Reply {
    match req.range() {
        Some((start, end)) => {
            let end = end.map_or(data.len() - 1, |e| (e as usize).min(data.len() - 1));
            let range = format!("Content-Range: bytes {start}-{end}/{}\r\n", data.len());
            trickled(
                "206 Partial Content",
                &range,
                &data[start as usize..=end],
                1000,
            )
        }
        None => trickled("200 OK", "", data, 1000),
    }
}

#[test]
fn headers_that_never_end_are_bounded_by_the_stall_timeout() {
    let stall = ["--stall-timeout", "2", "--retries", "0"];
    for (what, reply) in [
        ("a header byte every 300 ms", endless_headers()),
        ("103 Early Hints every 500 ms", endless_early_hints()),
    ] {
        // From the registry itself.
        let r = reply.clone();
        let server = Server::start(move |_, _| r.clone());
        let src = source_of(&server);
        let mut args = vec!["inspect", &src];
        args.extend_from_slice(&stall);
        let line = fails_within(&args, &[], Duration::from_secs(20));
        assert!(
            line.contains("stalled") && line.contains("headers"),
            "{what}: {line}"
        );
        // From a token realm.
        let r = reply.clone();
        let realm = Server::start(move |_, _| r.clone());
        let registry = challenging(format!("{}/token", realm.url()));
        let src = source_of(&registry);
        let mut args = vec!["inspect", &src];
        args.extend_from_slice(&stall);
        let line = fails_within(&args, &[], Duration::from_secs(20));
        assert!(
            line.contains("token realm") && line.contains("stalled"),
            "{what}: {line}"
        );
    }
}

#[test]
fn manifest_and_token_bodies_that_trickle_are_bounded_by_the_stall_timeout() {
    let stall = ["--stall-timeout", "2", "--retries", "0"];
    let image = six_parts(150);
    let manifest = manifest_bytes(&image);
    let server = Server::start(move |_, _| {
        trickled(
            "200 OK",
            "Content-Type: application/vnd.oci.image.manifest.v1+json\r\n",
            &manifest,
            10,
        )
    });
    let src = source_of(&server);
    let mut args = vec!["inspect", &src];
    args.extend_from_slice(&stall);
    let line = fails_within(&args, &[], Duration::from_secs(20));
    assert!(
        line.contains("manifest") && line.contains("stalled"),
        "{line}"
    );
    let token = br#"{"token":"a-token-that-takes-its-time-to-arrive"}"#;
    let realm = Server::start(move |_, _| trickled("200 OK", "", token, 5));
    let registry = challenging(format!("{}/token", realm.url()));
    let src = source_of(&registry);
    let mut args = vec!["inspect", &src];
    args.extend_from_slice(&stall);
    let line = fails_within(&args, &[], Duration::from_secs(20));
    assert!(
        line.contains("token realm") && line.contains("stalled"),
        "{line}"
    );
}

#[test]
fn a_blob_body_below_the_minimum_rate_is_resumed_and_then_fails_in_bounded_time() {
    let image = six_parts(151);
    let want = expected_disk(&image);
    let last = sha256(&part(&image, 5).data);
    let site = Arc::new(Site::new(&image));
    for connections in ["1", "4"] {
        // Once: the last part trickles after 1000 bytes (of its first range).
        let once_site = Arc::clone(&site);
        let once_last = last.clone();
        let server = Server::start(move |req, n| {
            once_site.serve(req, |b| {
                if req.path().ends_with(&once_last) && n == 0 {
                    trickled_blob(req, &b)
                } else {
                    Reply::blob(b)
                }
            })
        });
        let started = Instant::now();
        let out_dir = TempDir::new().unwrap();
        let target = out_dir.path().join("disk.img");
        let src = source_of(&server);
        let args = [
            "get",
            "-q",
            &src,
            "-o",
            target.to_str().unwrap(),
            "--stall-timeout",
            "2",
            "--connections",
            connections,
        ];
        let mut child = cmd(&args, &[]).stderr(Stdio::piped()).spawn().unwrap();
        let status = wait_for(&mut child, Duration::from_secs(20));
        assert!(status.success(), "{}", stderr_of(&mut child));
        assert!(std::fs::read(&target).unwrap() == want, "output differs");
        println!(
            "{connections} connection(s): resumed after {:?}",
            started.elapsed()
        );
        // The trickling request was given up and its range resumed.
        let resumed = server.requests().iter().any(|r| {
            r.path().ends_with(&last) && r.range().is_some_and(|(s, _)| s % 65536 >= 1000)
        });
        assert!(resumed, "no resume of the trickling part");
    }
    // Always trickling: the retry budget runs out, in bounded time.
    let always_site = Arc::clone(&site);
    let always = Server::start(move |req, _| {
        always_site.serve(req, |b| {
            if req.path().ends_with(&last) {
                trickled_blob(req, &b)
            } else {
                Reply::blob(b)
            }
        })
    });
    for connections in ["1", "4"] {
        let out_dir = TempDir::new().unwrap();
        let target = out_dir.path().join("disk.img");
        let src = source_of(&always);
        let args = [
            "get",
            "-q",
            &src,
            "-o",
            target.to_str().unwrap(),
            "--stall-timeout",
            "2",
            "--retries",
            "1",
            "--connections",
            connections,
        ];
        let line = fails_within(&args, &[], Duration::from_secs(30));
        assert!(
            line.contains("disk.05.qcow2.part") && line.contains("too slow"),
            "{line}"
        );
        assert!(names(out_dir.path()).is_empty());
    }
}

// ---- Signals and the cocoon child ----

/// Read a pid (or process group) a stand-in wrote to `file`.
fn pid_in(file: &Path) -> i32 {
    std::fs::read_to_string(file)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// Whether process `pid` is alive (not gone, not a zombie).
fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let (_, rest) = s.rsplit_once(')')?;
            rest.split_whitespace().next().map(|state| state != "Z")
        })
        .unwrap_or(false)
}

/// Send the raw signal number `sig` (also real-time ones) to `child`.
fn signal_raw(child: &Child, sig: i32) {
    // SAFETY: kill(2) with a pid we spawned and have not reaped.
    assert_eq!(unsafe { nix::libc::kill(child.id() as i32, sig) }, 0);
}

/// The lines of our own among everything on stderr (cocoon writes there too).
fn our_lines(err: &str) -> Vec<&str> {
    err.lines().filter(|l| l.starts_with("cloudimg:")).collect()
}

/// A mask of signal numbers from a `/proc/PID/status` line such as `SigCgt:`.
fn signal_mask(pid: i32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with(field)).unwrap();
    u64::from_str_radix(line[field.len()..].trim(), 16).unwrap()
}

/// `pull` into a stand-in that sleeps `delay` seconds before reading and is
/// started as `wrap` (`child`: by a shell that does not exec it). Returns the
/// running cloudimg and cocoon's process group, once cloudimg is blocked on
/// the full pipe.
fn pull_blocked(
    tmp: &Path,
    layout: &LayoutDir,
    store: &Path,
    delay: &str,
    wrap: &str,
) -> (Child, i32) {
    let pidfile = tmp.join("cocoon.pid");
    // Unwrapped, the stand-in itself leads cocoon's process group.
    let group = match wrap {
        "" => pidfile.clone(),
        _ => tmp.join("cocoon.group"),
    };
    let child = pull_cmd(
        layout,
        store,
        &[
            ("COCOON_STANDIN_DELAY", delay),
            ("COCOON_STANDIN_WRAP", wrap),
            ("COCOON_STANDIN_GROUPFILE", group.to_str().unwrap()),
            ("COCOON_STANDIN_PIDFILE", pidfile.to_str().unwrap()),
        ],
    )
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    wait_until(Duration::from_secs(10), "cocoon to start", || {
        std::fs::read_to_string(&pidfile).is_ok_and(|s| s.ends_with('\n'))
            && std::fs::read_to_string(&group).is_ok_and(|s| s.ends_with('\n'))
    });
    std::thread::sleep(Duration::from_millis(300));
    let pgid = pid_in(&group);
    (child, pgid)
}

/// Every catchable signal whose default action ends the process, other than
/// those the kernel raises for a fault of the thread itself.
fn fatal_catchable_signals() -> Vec<(i32, &'static str)> {
    use nix::libc::*;
    vec![
        (SIGQUIT, "SIGQUIT"),
        (SIGUSR1, "SIGUSR1"),
        (SIGUSR2, "SIGUSR2"),
        (SIGALRM, "SIGALRM"),
        (SIGVTALRM, "SIGVTALRM"),
        (SIGPROF, "SIGPROF"),
        (SIGPWR, "SIGPWR"),
        (SIGSTKFLT, "SIGSTKFLT"),
        (SIGXCPU, "SIGXCPU"),
        (SIGXFSZ, "SIGXFSZ"),
        (SIGRTMIN(), "SIGRTMIN"),
        (SIGRTMIN() + 5, "SIGRTMIN+5"),
        (SIGRTMAX(), "SIGRTMAX"),
    ]
}

#[test]
fn every_catchable_fatal_signal_kills_a_cocoon_that_does_not_exec() {
    // cocoon is a shell that runs the importer as its child: PR_SET_PDEATHSIG
    // reaches only the shell, so only the group kill stops the importer from
    // reading what is left in the pipe and committing it.
    std::thread::scope(|scope| {
        for (sig, name) in fatal_catchable_signals() {
            scope.spawn(move || {
                let (tmp, layout, store) = pull_setup(100);
                let (mut child, pgid) = pull_blocked(tmp.path(), &layout, &store, "2", "child");
                signal_raw(&child, sig);
                let status = wait_for(&mut child, Duration::from_secs(10));
                let err = stderr_of(&mut child);
                assert_eq!(status.code(), Some(128 + sig), "{name}: {status:?} {err}");
                assert_eq!(
                    our_lines(&err),
                    vec![format!("cloudimg: interrupted by signal {sig}")],
                    "{name}"
                );
                assert_group_gone(pgid);
                std::thread::sleep(Duration::from_millis(2500));
                assert!(committed(&store).is_empty(), "{name}: {:?}", names(&store));
            });
        }
    });
}

#[test]
fn the_handled_signals_are_caught_and_sigpipe_ignored() {
    let (tmp, layout, store) = pull_setup(101);
    let (mut child, _) = pull_blocked(tmp.path(), &layout, &store, "30", "");
    let pid = child.id() as i32;
    let caught = signal_mask(pid, "SigCgt:");
    let ignored = signal_mask(pid, "SigIgn:");
    signal(&child, Signal::SIGTERM);
    wait_for(&mut child, Duration::from_secs(10));
    let bit = |s: i32| 1u64 << (s - 1);
    for (sig, name) in fatal_catchable_signals().into_iter().chain([
        (nix::libc::SIGINT, "SIGINT"),
        (nix::libc::SIGTERM, "SIGTERM"),
        (nix::libc::SIGHUP, "SIGHUP"),
    ]) {
        assert!(caught & bit(sig) != 0, "{name} is not caught ({caught:x})");
    }
    assert!(
        ignored & bit(nix::libc::SIGPIPE) != 0,
        "SIGPIPE not ignored"
    );
    // SIGIO announces a lease break; the lease check reports it by name.
    assert!(ignored & bit(nix::libc::SIGIO) != 0, "SIGIO not ignored");
    // Faults of the thread itself keep their default action: they cannot be
    // resumed from, and the guardian covers the death they cause. (SIGSEGV
    // and SIGBUS carry std's stack-overflow handler, which falls back to the
    // default action for any other fault.)
    for sig in [
        nix::libc::SIGILL,
        nix::libc::SIGFPE,
        nix::libc::SIGTRAP,
        nix::libc::SIGSYS,
        nix::libc::SIGABRT,
    ] {
        assert!(caught & bit(sig) == 0, "signal {sig} is caught");
    }
}

#[test]
fn sigkill_mid_stream_commits_nothing_through_a_cocoon_that_does_not_exec() {
    for wrap in ["child", ""] {
        let (tmp, layout, store) = pull_setup(102);
        let (mut child, pgid) = pull_blocked(tmp.path(), &layout, &store, "2", wrap);
        signal(&child, Signal::SIGKILL);
        let status = wait_for(&mut child, Duration::from_secs(5));
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(9)
        );
        // Nothing of cloudimg is left to kill the group: the guardian does.
        assert_group_gone(pgid);
        std::thread::sleep(Duration::from_millis(2500));
        assert!(
            committed(&store).is_empty(),
            "{wrap}: committed {:?}",
            names(&store)
        );
    }
}

#[test]
fn a_kernel_raised_sigxfsz_is_a_clear_failure_that_leaves_nothing() {
    let image = Image::split(&data(6 * MIB, 103), MIB);
    let tmp = TempDir::new().unwrap();
    let layout = LayoutDir::new(&tmp.path().join("img"));
    layout.put_image(Some("v1"), &image);
    for io in ["", "readwrite"] {
        let out_dir = TempDir::new().unwrap();
        let target = out_dir.path().join("disk.img");
        let mut c = cmd(
            &[
                "get",
                "-q",
                &layout.source("v1"),
                "-o",
                target.to_str().unwrap(),
            ],
            &[("CLOUDIMG_IO", io)],
        );
        // SAFETY: setrlimit(2) only, between fork and exec.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut c, || {
                let limit = nix::libc::rlimit {
                    rlim_cur: 2 << 20,
                    rlim_max: 2 << 20,
                };
                nix::libc::setrlimit(nix::libc::RLIMIT_FSIZE, &limit);
                Ok(())
            });
        }
        let out = c.output().unwrap();
        let line = failure(&out);
        assert!(line.contains("File too large"), "{io}: {line}");
        assert!(
            names(out_dir.path()).is_empty(),
            "{io}: left {:?}",
            names(out_dir.path())
        );
    }
}

#[test]
fn a_helper_that_leaves_cocoon_s_session_is_killed_too() {
    let (tmp, layout, store) = pull_setup(104);
    let pidfile = tmp.path().join("helper.pid");
    // The importer runs in a session of its own (setsid), out of reach of the
    // group kill; the last part is corrupted, so the pull fails at the end.
    let image = Image::split(&data(6 * MIB, 104), MIB);
    let last = sha256(&part(&image, 5).data);
    let path = layout.blob_path(&last);
    let mut bytes = std::fs::read(&path).unwrap();
    *bytes.last_mut().unwrap() ^= 1;
    std::fs::write(&path, &bytes).unwrap();
    let out = pull_cmd(
        &layout,
        &store,
        &[
            ("COCOON_STANDIN_WRAP", "setsid"),
            ("COCOON_STANDIN_PIDFILE", pidfile.to_str().unwrap()),
        ],
    )
    .output()
    .unwrap();
    let line = failure(&out);
    assert!(line.contains("digest mismatch"), "{line}");
    let helper = pid_in(&pidfile);
    wait_until(Duration::from_secs(3), "the helper to be killed", || {
        !alive(helper)
    });
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        committed(&store).is_empty(),
        "committed {:?}",
        names(&store)
    );
}

#[test]
fn a_signal_ends_the_wait_for_a_cocoon_that_hangs_after_the_end() {
    for (sig, code, name) in [
        (Signal::SIGTERM, 143, "SIGTERM"),
        (Signal::SIGINT, 130, "SIGINT"),
    ] {
        let (tmp, layout, store) = pull_setup(105);
        let pidfile = tmp.path().join("cocoon.pid");
        let mut child = pull_cmd(
            &layout,
            &store,
            &[
                ("COCOON_STANDIN_LINGER", "30"),
                ("COCOON_STANDIN_PIDFILE", pidfile.to_str().unwrap()),
            ],
        )
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
        // The stand-in has read the whole disk: cloudimg waits for it.
        wait_until(Duration::from_secs(10), "the stream to end", || {
            names(&store).values().any(|&len| len == 6 * MIB as u64)
        });
        std::thread::sleep(Duration::from_millis(300));
        signal(&child, sig);
        let status = wait_for(&mut child, Duration::from_secs(5));
        let err = stderr_of(&mut child);
        assert_eq!(status.code(), Some(code), "{err}");
        assert_eq!(
            our_lines(&err),
            vec![format!("cloudimg: interrupted by {name}")]
        );
        assert_group_gone(pid_in(&pidfile));
        assert!(committed(&store).is_empty());
    }
}

#[test]
fn a_signal_ends_the_wait_for_a_credential_helper() {
    let tmp = TempDir::new().unwrap();
    let bin_dir = tmp.path().join("bin");
    std::fs::create_dir(&bin_dir).unwrap();
    let pidfile = tmp.path().join("helper.pid");
    let helper = bin_dir.join("docker-credential-sleepy");
    std::fs::write(
        &helper,
        format!(
            "#!/bin/sh\necho $$ > '{}'\nexec sleep 30\n",
            pidfile.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&helper, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let config = tmp.path().join("docker");
    std::fs::create_dir(&config).unwrap();
    std::fs::write(config.join("config.json"), r#"{"credsStore":"sleepy"}"#).unwrap();
    let server = Server::start(|_, _| {
        Reply::status(401).header("WWW-Authenticate", r#"Basic realm="test""#)
    });
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out_dir = TempDir::new().unwrap();
    let target = out_dir.path().join("disk.img");
    let mut child = cmd(
        &[
            "get",
            "-q",
            &source_of(&server),
            "-o",
            target.to_str().unwrap(),
        ],
        &[("DOCKER_CONFIG", config.to_str().unwrap()), ("PATH", &path)],
    )
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    wait_until(Duration::from_secs(10), "the credential helper", || {
        std::fs::read_to_string(&pidfile).is_ok_and(|s| s.ends_with('\n'))
    });
    std::thread::sleep(Duration::from_millis(200));
    signal(&child, Signal::SIGTERM);
    let status = wait_for(&mut child, Duration::from_secs(5));
    let err = stderr_of(&mut child);
    assert_eq!(status.code(), Some(143), "{err}");
    assert_eq!(err.trim(), "cloudimg: interrupted by SIGTERM");
    let helper = pid_in(&pidfile);
    wait_until(Duration::from_secs(3), "the helper to be killed", || {
        !alive(helper)
    });
    assert!(names(out_dir.path()).is_empty());
}

#[test]
fn a_fifo_in_the_layout_is_refused_at_once() {
    let image = six_parts(106);
    for victim in ["index.json", "manifest", "part"] {
        let tmp = TempDir::new().unwrap();
        let layout = LayoutDir::new(&tmp.path().join("win11"));
        let manifest = layout.put_image(Some("25h2"), &image);
        let path = match victim {
            "index.json" => tmp.path().join("win11/index.json"),
            "manifest" => layout.blob_path(&manifest),
            _ => layout.blob_path(&sha256(&part(&image, 2).data)),
        };
        std::fs::remove_file(&path).unwrap();
        let c_path = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo(3) with a NUL-terminated path.
        assert_eq!(unsafe { nix::libc::mkfifo(c_path.as_ptr(), 0o644) }, 0);
        let store = tmp.path().join("store");
        std::fs::create_dir(&store).unwrap();
        let out_dir = TempDir::new().unwrap();
        let target = out_dir.path().join("disk.img");
        let runs = [
            cmd(
                &[
                    "get",
                    "-q",
                    &layout.source("25h2"),
                    "-o",
                    target.to_str().unwrap(),
                ],
                &[],
            ),
            pull_cmd(&layout, &store, &[]),
        ];
        for mut c in runs {
            let mut child = c.stderr(Stdio::piped()).spawn().unwrap();
            let status = wait_for(&mut child, Duration::from_secs(5));
            let err = stderr_of(&mut child);
            assert_eq!(status.code(), Some(1), "{victim}: {err}");
            assert_eq!(our_lines(&err).len(), 1, "{victim}: {err}");
            assert!(err.contains("not a regular file"), "{victim}: {err}");
        }
        assert!(names(out_dir.path()).is_empty());
        // cocoon may have been started (and killed) before the part was opened.
        assert!(committed(&store).is_empty());
    }
}

#[test]
fn a_cocoon_that_asks_the_terminal_fails_instead_of_stopping() {
    let (_tmp, layout, store) = pull_setup(107);
    // cloudimg runs as a session leader with a terminal, like from a shell.
    let pty = nix::pty::openpty(None, None).unwrap();
    let mut c = pull_cmd(&layout, &store, &[("COCOON_STANDIN_TTY", "1")]);
    c.stdin(Stdio::from(pty.slave)).stderr(Stdio::piped());
    // SAFETY: setsid(2) and ioctl(2) only, between fork and exec.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut c, || {
            nix::unistd::setsid()?;
            if nix::libc::ioctl(0, nix::libc::TIOCSCTTY, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = c.spawn().unwrap();
    drop(c);
    let status = wait_for(&mut child, Duration::from_secs(10));
    let err = stderr_of(&mut child);
    assert_eq!(status.code(), Some(1), "{err}");
    let lines = our_lines(&err);
    assert_eq!(lines.len(), 1, "{err}");
    assert!(
        lines[0].contains("exited before the image was complete (exit status 5)"),
        "{err}"
    );
    assert!(committed(&store).is_empty());
    drop(pty.master);
}
