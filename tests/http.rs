//! The registry client against a scripted in-test HTTP server, for what a
//! real registry will not do on demand: auth challenges, cross-origin
//! redirects, 429/503, cut and stalled connections, servers that ignore
//! Range, bodies of the wrong length or content.

mod common;

use std::collections::HashMap;
use std::io::Write;
use std::process::{Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::httpd::{Reply, Request, Server};
use common::*;

/// A test image of three parts, big enough for several range chunks each.
struct Fixture {
    image: Image,
    manifest: Vec<u8>,
    manifest_digest: String,
    blobs: HashMap<String, Arc<Vec<u8>>>,
}

const CHUNK: &str = "65536";

fn fixture() -> Fixture {
    let disk = data(3 * 300_001, 21);
    let image = Image::split(&disk, 300_001);
    let manifest = serde_json::to_vec(&image.manifest_json()).unwrap();
    let mut blobs = HashMap::new();
    blobs.insert(sha256(b"{}"), Arc::new(b"{}".to_vec()));
    for l in &image.layers {
        blobs.insert(sha256(&l.data), Arc::new(l.data.clone()));
    }
    Fixture {
        manifest_digest: sha256(&manifest),
        image,
        manifest,
        blobs,
    }
}

impl Fixture {
    /// Answer like a registry for repository `img`: the manifest under any
    /// tag, blobs by digest (served through `blob`, which may add faults).
    fn serve(&self, req: &Request, blob: impl Fn(Arc<Vec<u8>>) -> Reply) -> Reply {
        let path = req.path();
        if path == "/v2/" {
            return Reply::status(200);
        }
        if path.starts_with("/v2/img/manifests/") {
            return Reply::bytes(
                200,
                "application/vnd.oci.image.manifest.v1+json",
                self.manifest.clone(),
            )
            .header("Docker-Content-Digest", &self.manifest_digest);
        }
        if let Some(d) = path.strip_prefix("/v2/img/blobs/")
            && let Some(b) = self.blobs.get(d)
        {
            return blob(Arc::clone(b));
        }
        Reply::status(404)
    }

    fn disk(&self) -> Vec<u8> {
        expected_disk(&self.image)
    }

    /// The last part in stream order.
    fn last_digest(&self) -> String {
        let last = self
            .image
            .layers
            .iter()
            .filter(|l| l.media_type == QCOW2_PART)
            .max_by_key(|l| l.title.clone())
            .unwrap();
        sha256(&last.data)
    }
}

/// `cloudimg get` from the server; with four range connections unless the
/// test says otherwise (a loopback registry would get one by default).
fn get(server: &Server, extra: &[&str]) -> Output {
    let source = format!("{}/img:v1", server.host());
    let mut args = vec!["get", "-q", &source];
    args.extend_from_slice(extra);
    if !extra.contains(&"--connections") {
        args.extend_from_slice(&["--connections", "4"]);
    }
    bin()
        .args(&args)
        .env("CLOUDIMG_CHUNK_SIZE", CHUNK)
        .env("DOCKER_CONFIG", "/nonexistent")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn assert_ok(out: &Output, want: &[u8]) {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.stdout == want,
        "output differs ({} bytes)",
        out.stdout.len()
    );
}

#[test]
fn plain_registry_single_and_parallel() {
    let f = Arc::new(fixture());
    let g = Arc::clone(&f);
    let server = Server::start(move |req, _| g.serve(req, Reply::blob));
    assert_ok(&get(&server, &["--connections", "1"]), &f.disk());
    let before = server.requests().len();
    // A loopback registry gets one stream by default.
    let out = bin()
        .args(["get", "-q", &format!("{}/img:v1", server.host())])
        .env("CLOUDIMG_CHUNK_SIZE", CHUNK)
        .output()
        .unwrap();
    assert_ok(&out, &f.disk());
    assert!(
        server.requests()[before..]
            .iter()
            .all(|r| r.header("range").is_none()),
        "default on loopback is a single stream"
    );
    assert_ok(&get(&server, &["--connections", "4"]), &f.disk());
    // The parallel run asked for ranges of the chunk size.
    let ranged = server
        .requests()
        .iter()
        .filter(|r| {
            r.header("range")
                .is_some_and(|v| v.ends_with(&format!("-{}", 65536 * 2 - 1)))
        })
        .count();
    assert!(ranged > 0, "no chunked range requests seen");
}

#[test]
fn bearer_challenge_anonymous_token_is_fetched_once_and_used() {
    let f = Arc::new(fixture());
    let g = Arc::clone(&f);
    let server = Server::start(move |req, _| {
        if req.path() == "/token" {
            assert!(
                req.target.contains("scope=repository%3Aimg%3Apull"),
                "{}",
                req.target
            );
            return Reply::json(200, &serde_json::json!({"token": "tok-123"}));
        }
        if req.header("authorization") != Some("Bearer tok-123") {
            let realm = format!(
                "Bearer realm=\"http://{}/token\",service=\"test\",scope=\"repository:img:pull\"",
                req.header("host").unwrap()
            );
            return Reply::status(401).header("WWW-Authenticate", &realm);
        }
        g.serve(req, Reply::blob)
    });
    assert_ok(&get(&server, &[]), &f.disk());
    let tokens = server
        .requests()
        .iter()
        .filter(|r| r.path() == "/token")
        .count();
    assert_eq!(tokens, 1, "the token is cached for the run");
}

fn basic_protected(f: Arc<Fixture>) -> Server {
    Server::start(move |req, _| {
        if req.path() == "/token" {
            // base64("alice:s3cret")
            return match req.header("authorization") {
                Some("Basic YWxpY2U6czNjcmV0") => {
                    Reply::json(200, &serde_json::json!({"access_token": "tok-alice"}))
                }
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
        f.serve(req, Reply::blob)
    })
}

/// `cloudimg get` as alice, with `password` written to its stdin.
fn get_as_alice(server: &Server, password: &[u8]) -> Output {
    let mut child = bin()
        .args(["get", "-q", &format!("{}/img:v1", server.host())])
        .args(["--username", "alice", "--password-stdin"])
        .env("DOCKER_CONFIG", "/nonexistent")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(password).unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn bearer_with_basic_credentials_from_password_stdin() {
    let f = Arc::new(fixture());
    let server = basic_protected(Arc::clone(&f));
    assert_ok(&get_as_alice(&server, b"s3cret\n"), &f.disk());

    // Wrong password: one clear line, and the password is not in it.
    let line = failure(&get_as_alice(&server, b"wrong-pass\n"));
    assert!(
        line.contains("refused") && !line.contains("wrong-pass"),
        "{line}"
    );
}

#[test]
fn credentials_from_docker_config() {
    let f = Arc::new(fixture());
    let server = basic_protected(Arc::clone(&f));
    let dir = tempfile::TempDir::new().unwrap();
    std::fs::write(
        dir.path().join("config.json"),
        format!(
            r#"{{"auths":{{"{}":{{"auth":"YWxpY2U6czNjcmV0"}}}}}}"#,
            server.host()
        ),
    )
    .unwrap();
    let out = bin()
        .args(["get", "-q", &format!("{}/img:v1", server.host())])
        .env("DOCKER_CONFIG", dir.path())
        .output()
        .unwrap();
    assert_ok(&out, &f.disk());
}

#[test]
fn cross_origin_redirect_carries_no_authorization() {
    let f = Arc::new(fixture());
    let g = Arc::clone(&f);
    // The object store: serves blobs by digest at /store/DIGEST.
    let store = Server::start(move |req, _| {
        let d = req.path().trim_start_matches("/store/");
        match g.blobs.get(d) {
            Some(b) => Reply::blob(Arc::clone(b)),
            None => Reply::status(404),
        }
    });
    let store_url = store.url();
    let h = Arc::clone(&f);
    let registry = Server::start(move |req, _| {
        if req.header("authorization") != Some("Bearer epoch-secret") {
            return Reply::status(401);
        }
        if let Some(d) = req.path().strip_prefix("/v2/img/blobs/") {
            return Reply::redirect(307, &format!("{store_url}/store/{d}?X-Signature=abc"));
        }
        h.serve(req, Reply::blob)
    });
    // An epoch-style name: relative to EPOCH_SERVER, with its token.
    let out = bin()
        .args(["get", "-q", "img:v1"])
        .env("EPOCH_SERVER", registry.url())
        .env("EPOCH_REGISTRY_TOKEN", "epoch-secret")
        .env("CLOUDIMG_CHUNK_SIZE", CHUNK)
        .output()
        .unwrap();
    assert_ok(&out, &f.disk());
    let seen = store.requests();
    assert!(!seen.is_empty());
    for r in &seen {
        assert_eq!(
            r.header("authorization"),
            None,
            "credentials leaked to {}",
            r.target
        );
    }
}

#[test]
fn redirect_loop_is_one_clear_line() {
    let server = Server::start(move |req, _| {
        let n: u32 = req.path().trim_start_matches("/hop/").parse().unwrap_or(0);
        Reply::redirect(302, &format!("/hop/{}", n + 1))
    });
    let line = failure(&get(&server, &[]));
    assert!(line.contains("redirect"), "{line}");
}

#[test]
fn rate_limits_and_server_errors_are_retried() {
    let f = Arc::new(fixture());
    let g = Arc::clone(&f);
    let server = Server::start(move |req, n| {
        if req.path().starts_with("/v2/img/manifests/") && n == 0 {
            return Reply::status(429).header("Retry-After", "1");
        }
        if req.path().starts_with("/v2/img/blobs/") && n < 2 {
            return Reply::status(503);
        }
        g.serve(req, Reply::blob)
    });
    let started = std::time::Instant::now();
    assert_ok(&get(&server, &["--connections", "1"]), &f.disk());
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "Retry-After: 1 was not honoured"
    );
}

#[test]
fn a_storm_beyond_the_retry_budget_fails_cleanly() {
    let server = Server::start(|_, _| Reply::status(503));
    let line = failure(&get(&server, &["--retries", "2"]));
    assert!(line.contains("503") && line.contains("2 retries"), "{line}");
    assert_eq!(server.requests().len(), 3);
}

#[test]
fn connections_cut_mid_blob_resume_to_identical_output() {
    for connections in ["1", "4"] {
        let f = Arc::new(fixture());
        let g = Arc::clone(&f);
        // Each blob's first three responses are cut at different depths.
        let server = Server::start(move |req, n| {
            g.serve(req, |b| match n {
                0 => Reply::blob(b).cut_after(1000),
                1 => Reply::blob(b).cut_after(40_000),
                2 => Reply::blob(b).cut_after(1),
                _ => Reply::blob(b),
            })
        });
        assert_ok(&get(&server, &["--connections", connections]), &f.disk());
        let resumed = server.requests().iter().any(|r| {
            r.header("range")
                .is_some_and(|v| !v.starts_with("bytes=0-"))
        });
        assert!(resumed, "no resume request with connections={connections}");
    }
}

#[test]
fn a_server_ignoring_range_is_read_forward() {
    let f = Arc::new(fixture());
    let g = Arc::clone(&f);
    let server = Server::start(move |req, n| {
        g.serve(req, |b| match n {
            0 => Reply::blob(b).no_range().cut_after(123_457),
            _ => Reply::blob(b).no_range(),
        })
    });
    // Parallel mode degrades to one stream; resumes skip forward.
    assert_ok(&get(&server, &[]), &f.disk());
}

#[test]
fn bodies_longer_or_shorter_than_the_size_fail() {
    for (delta, how) in [(1i64, "oversized"), (-1, "truncated")] {
        let f = Arc::new(fixture());
        let last = f.last_digest();
        let g = Arc::clone(&f);
        let server = Server::start(move |req, _| {
            g.serve(req, |b| {
                if req.path().ends_with(&last) {
                    let mut v = (*b).clone();
                    if delta > 0 {
                        v.push(7);
                    } else {
                        v.pop();
                    }
                    Reply::blob(Arc::new(v))
                } else {
                    Reply::blob(b)
                }
            })
        });
        for c in ["1", "4"] {
            let line = failure(&get(&server, &["--connections", c, "--retries", "1"]));
            assert!(line.contains(how), "{how} with {c} connections: {line}");
        }
    }
}

#[test]
fn a_lying_content_length_fails() {
    let f = Arc::new(fixture());
    let last = f.last_digest();
    let g = Arc::clone(&f);
    let server = Server::start(move |req, _| {
        g.serve(req, |b| {
            let len = b.len() as u64;
            if req.path().ends_with(&last) {
                Reply::blob(b).no_range().declared_len(len + 10)
            } else {
                Reply::blob(b)
            }
        })
    });
    let line = failure(&get(&server, &["--connections", "1", "--retries", "1"]));
    assert!(line.contains("oversized"), "{line}");
}

#[test]
fn wrong_content_fails_the_digest_check() {
    let f = Arc::new(fixture());
    let last = f.last_digest();
    let g = Arc::clone(&f);
    let server = Server::start(move |req, _| {
        g.serve(req, |b| {
            if req.path().ends_with(&last) {
                let mut v = (*b).clone();
                v[1234] ^= 0x20;
                Reply::blob(Arc::new(v))
            } else {
                Reply::blob(b)
            }
        })
    });
    let line = failure(&get(&server, &[]));
    assert!(
        line.contains("digest mismatch") && line.contains(&f.last_digest()),
        "{line}"
    );
}

#[test]
fn a_stalled_body_is_resumed_after_the_stall_timeout() {
    let f = Arc::new(fixture());
    let g = Arc::clone(&f);
    let server = Server::start(move |req, n| {
        g.serve(req, |b| match n {
            0 => Reply::blob(b).stall_after(5000, Duration::from_secs(4)),
            _ => Reply::blob(b),
        })
    });
    let out = get(&server, &["--connections", "1", "--stall-timeout", "1"]);
    assert_ok(&out, &f.disk());
}

#[test]
fn a_server_that_always_stalls_fails_cleanly() {
    let f = Arc::new(fixture());
    let g = Arc::clone(&f);
    let server = Server::start(move |req, _| {
        g.serve(req, |b| {
            Reply::blob(b).stall_after(100, Duration::from_secs(3))
        })
    });
    let started = std::time::Instant::now();
    let line = failure(&get(
        &server,
        &[
            "--connections",
            "1",
            "--stall-timeout",
            "1",
            "--retries",
            "1",
        ],
    ));
    assert!(line.contains("gave up"), "{line}");
    assert!(started.elapsed() < Duration::from_secs(15));
}

#[test]
fn a_mirror_is_tried_first_and_the_registry_is_the_fallback() {
    let f = Arc::new(fixture());
    let g = Arc::clone(&f);
    let hits = Arc::new(Mutex::new(0usize));
    let h = Arc::clone(&hits);
    // A mirror that has only some blobs.
    let mirror = Server::start(move |req, _| {
        let d = req.path().rsplit('/').next().unwrap().to_owned();
        assert!(req.target.contains("?ns="), "{}", req.target);
        match g.blobs.get(&d) {
            Some(b) if d.as_bytes()[7] % 2 == 0 => {
                *h.lock().unwrap() += 1;
                Reply::blob(Arc::clone(b))
            }
            _ => Reply::status(404),
        }
    });
    let k = Arc::clone(&f);
    let registry = Server::start(move |req, _| k.serve(req, Reply::blob));
    let out = get(&registry, &["--mirror", &mirror.url()]);
    assert_ok(&out, &f.disk());
    assert!(!mirror.requests().is_empty());
}

#[test]
fn pull_failing_mid_stream_commits_nothing() {
    let f = Arc::new(fixture());
    let last = f.last_digest();
    let g = Arc::clone(&f);
    let server = Server::start(move |req, _| {
        g.serve(req, |b| {
            if req.path().ends_with(&last) {
                // Always cut half-way: resumes cannot complete it either.
                let half = b.len() as u64 / 2;
                Reply::blob(b).cut_after(half).no_range()
            } else {
                Reply::blob(b)
            }
        })
    });
    let store = tempfile::TempDir::new().unwrap();
    let out = bin()
        .args([
            "pull",
            "-q",
            "--retries",
            "1",
            &format!("{}/img:v1", server.host()),
        ])
        .env("EPOCH_COCOON_BINARY", standin())
        .env("COCOON_STANDIN_DIR", store.path())
        .env("CLOUDIMG_CHUNK_SIZE", CHUNK)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    failure(&out);
    let committed: Vec<String> = names(store.path())
        .into_keys()
        .filter(|n| !n.starts_with('.'))
        .collect();
    assert!(committed.is_empty(), "committed {committed:?}");
}

#[test]
fn a_blob_missing_from_the_registry_fails_naming_the_layer() {
    let f = Arc::new(fixture());
    let last = f.last_digest();
    let g = Arc::clone(&f);
    let server = Server::start(move |req, _| {
        if req.path().ends_with(&last) {
            return Reply::status(404);
        }
        g.serve(req, Reply::blob)
    });
    let line = failure(&get(&server, &[]));
    assert!(
        line.contains("not found") && line.contains(&f.last_digest()),
        "{line}"
    );
    assert!(line.contains("disk.02.qcow2.part"), "{line}");
}
