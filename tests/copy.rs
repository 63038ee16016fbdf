//! `cloudimg copy` into layouts it writes, and `--cache` for `get` and
//! `pull`: faithful copies that skopeo reads back, resumes that fetch only
//! the missing bytes (after a cut connection and after SIGKILL), concurrent
//! writers that lose no tag, and a cache that is read instead of the
//! registry, refetches what was damaged, and keeps nothing of a failed run.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::httpd::{Reply, Request, Server};
use common::registry::Registry;
use common::*;
use serde_json::Value;
use tempfile::TempDir;

fn cmd(args: &[&str]) -> Command {
    let mut c = bin();
    c.args(args)
        .env("DOCKER_CONFIG", "/nonexistent")
        .env("CLOUDIMG_CHUNK_SIZE", "65536")
        .env_remove("CLOUDIMG_CACHE")
        .stdin(Stdio::null());
    c
}

fn go(args: &[&str]) -> Output {
    cmd(args).output().unwrap()
}

fn ok(out: &Output) -> &[u8] {
    assert!(
        out.status.success(),
        "exit {:?}: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    &out.stdout
}

fn index_json(dir: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(dir.join("index.json")).unwrap()).unwrap()
}

fn tags(dir: &Path) -> Vec<String> {
    let mut t: Vec<String> = index_json(dir)["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["annotations"]["org.opencontainers.image.ref.name"].as_str())
        .map(str::to_owned)
        .collect();
    t.sort();
    t
}

/// An image of four parts and a checksum layer that is no disk, as epoch
/// publishes them.
fn image_with_sums(seed: u64) -> Image {
    let image = Image::split(&data(3 * 250_001 + 17, seed), 250_001);
    assert!(image.layers.iter().any(|l| l.media_type != QCOW2_PART));
    image
}

#[test]
fn a_copy_from_the_registry_is_faithful_and_skopeo_reads_it_back() {
    let reg = Registry::start();
    let image = image_with_sums(1);
    let (digest, _) = reg.push_image("team/img", "v1", &image);
    let tmp = TempDir::new().unwrap();
    let dir = tmp.path().join("copy");
    let src = format!("{}/team/img:v1", reg.host());
    let out = go(&["copy", &src, &format!("oci:{}", dir.display())]);
    ok(&out);
    let said = String::from_utf8_lossy(&out.stderr);
    let blobs = image.layers.len() + 1;
    assert!(said.contains(&format!("copied {blobs} blobs")), "{said}");
    // The same disk, from the copy and from the registry.
    let local = go(&["get", "-q", &format!("oci:{}:v1", dir.display())]);
    let remote = go(&["get", "-q", &src]);
    assert!(ok(&local) == ok(&remote) && ok(&local) == expected_disk(&image));
    assert_eq!(tags(&dir), ["v1"]);
    // skopeo reads the copy: the manifest is the registry's, byte for byte.
    let raw = tool(
        "skopeo",
        &["inspect", "--raw", &format!("oci:{}:v1", dir.display())],
        "skopeo",
    );
    assert_eq!(sha256(&raw), digest);
    // And copies it back into a registry, unchanged.
    tool(
        "skopeo",
        &[
            "--insecure-policy",
            "copy",
            "--dest-tls-verify=false",
            &format!("oci:{}:v1", dir.display()),
            &format!("docker://{}/back/img:v1", reg.host()),
        ],
        "skopeo",
    );
    let back = tool(
        "skopeo",
        &[
            "inspect",
            "--raw",
            "--tls-verify=false",
            &format!("docker://{}/back/img:v1", reg.host()),
        ],
        "skopeo",
    );
    assert_eq!(sha256(&back), digest);
    let again = go(&["get", "-q", &format!("{}/back/img:v1", reg.host())]);
    assert!(ok(&again) == expected_disk(&image));
    // A second copy finds every blob there (hashed) and fetches none.
    let out = go(&["copy", &src, &format!("oci:{}:v2", dir.display())]);
    ok(&out);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("copied 0 blobs") && said.contains(&format!("{blobs} already there")),
        "{said}"
    );
    assert_eq!(tags(&dir), ["v1", "v2"]);
}

#[test]
fn bad_destinations_fail_in_one_line_and_change_nothing() {
    let tmp = TempDir::new().unwrap();
    let layout = LayoutDir::new(&tmp.path().join("src"));
    let image = Image::split(&data(100_000, 2), 40_000);
    layout.put_image(Some("v1"), &image);
    let src = layout.source("v1");
    // A directory with other things in it.
    let other = tmp.path().join("other");
    std::fs::create_dir(&other).unwrap();
    std::fs::write(other.join("notes"), b"mine").unwrap();
    let line = failure(&go(&["copy", &src, &format!("oci:{}", other.display())]));
    assert!(line.contains("not an OCI image layout"), "{line}");
    assert_eq!(names(&other).into_keys().collect::<Vec<_>>(), ["notes"]);
    // A digest as the destination, or no layout at all: usage errors.
    let out = go(&[
        "copy",
        &src,
        &format!("oci:{}@sha256:{}", other.display(), "a".repeat(64)),
    ]);
    assert_eq!(out.status.code(), Some(2));
    let out = go(&["copy", &src, "registry.example/img:v1"]);
    assert_eq!(out.status.code(), Some(2));
    // Another kind of image: refused before the layout is made.
    let container = LayoutDir::new(&tmp.path().join("container"));
    let config =
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
    let config_digest = container.put_blob(config);
    let layer_digest = container.put_blob(b"not a disk");
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": config_digest, "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": layer_digest, "size": 10}],
    });
    container.put_manifest_bytes(
        Some("v1"),
        &serde_json::to_vec(&manifest).unwrap(),
        "application/vnd.oci.image.manifest.v1+json",
    );
    let fresh = tmp.path().join("fresh");
    let line = failure(&go(&[
        "copy",
        &container.source("v1"),
        &format!("oci:{}", fresh.display()),
    ]));
    assert!(line.contains("not a cloud image"), "{line}");
    assert!(!fresh.exists());
}

/// A scripted registry for repository `img`: the manifest under any tag,
/// blobs by digest through `blob` (which may add faults), and a count of
/// blob requests per digest.
struct Scripted {
    image: Image,
    manifest: Vec<u8>,
    digest: String,
    blobs: HashMap<String, Arc<Vec<u8>>>,
    asked: Mutex<HashMap<String, usize>>,
}

impl Scripted {
    fn new(image: Image) -> Arc<Scripted> {
        let manifest = serde_json::to_vec(&image.manifest_json()).unwrap();
        let mut blobs = HashMap::new();
        blobs.insert(sha256(b"{}"), Arc::new(b"{}".to_vec()));
        for l in &image.layers {
            blobs.insert(sha256(&l.data), Arc::new(l.data.clone()));
        }
        Arc::new(Scripted {
            digest: sha256(&manifest),
            image,
            manifest,
            blobs,
            asked: Mutex::new(HashMap::new()),
        })
    }

    fn serve(&self, req: &Request, blob: impl Fn(&str, Arc<Vec<u8>>) -> Reply) -> Reply {
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
            .header("Docker-Content-Digest", &self.digest);
        }
        if let Some(d) = path.strip_prefix("/v2/img/blobs/")
            && let Some(b) = self.blobs.get(d)
        {
            *self.asked.lock().unwrap().entry(d.to_owned()).or_default() += 1;
            return blob(d, Arc::clone(b));
        }
        Reply::status(404)
    }

    fn blob_requests(&self) -> usize {
        self.asked.lock().unwrap().values().sum()
    }

    fn asked_for(&self, digest: &str) -> usize {
        self.asked.lock().unwrap().get(digest).copied().unwrap_or(0)
    }

    /// The `i`th disk part, in the manifest's order.
    fn layer(&self, i: usize) -> (String, usize) {
        let l = self
            .image
            .layers
            .iter()
            .filter(|l| l.media_type == QCOW2_PART)
            .nth(i)
            .unwrap();
        (sha256(&l.data), l.data.len())
    }
}

/// The `Range` start of every request for blob `digest` among `requests`.
fn range_starts(requests: &[Request], digest: &str) -> Vec<u64> {
    requests
        .iter()
        .filter(|r| r.path().ends_with(digest))
        .map(|r| r.range().map_or(0, |(start, _)| start))
        .collect()
}

fn partial_len(dir: &Path, digest: &str) -> Option<u64> {
    let hex = digest.strip_prefix("sha256:").unwrap();
    std::fs::metadata(dir.join(".cloudimg/partial").join(format!("sha256-{hex}")))
        .ok()
        .map(|m| m.len())
}

#[test]
fn a_copy_cut_off_mid_blob_continues_where_it_stopped() {
    // One disk part of 3 MB: the first answer for it is cut after 1 MB.
    let s = Scripted::new(Image::split(&data(3_000_000, 3), 3_000_000));
    let (part, size) = s.layer(0);
    let cut = 1_000_000u64;
    let t = Arc::clone(&s);
    let server = Server::start(move |req, n| {
        t.serve(req, |_, b| match n {
            0 => Reply::blob(b).cut_after(cut),
            _ => Reply::blob(b),
        })
    });
    let tmp = TempDir::new().unwrap();
    let dir = tmp.path().join("l");
    let src = format!("{}/img:v1", server.host());
    let dest = format!("oci:{}", dir.display());
    let line = failure(&go(&["copy", "-q", "--retries", "0", &src, &dest]));
    assert!(
        line.contains("connection") || line.contains("ended"),
        "{line}"
    );
    assert_eq!(partial_len(&dir, &part), Some(cut));
    assert!(tags(&dir).is_empty());
    assert!(!dir.join("blobs/sha256").join(&part[7..]).exists());
    // Again, with parallel range requests: from byte `cut` on, only.
    let before = server.requests().len();
    let out = go(&["copy", "--connections", "4", &src, &dest]);
    ok(&out);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains(&format!("{cut} bytes continued")), "{said}");
    let starts = range_starts(&server.requests()[before..], &part);
    assert_eq!(starts.iter().min(), Some(&cut), "{starts:?}");
    let fetched: u64 = server.requests()[before..]
        .iter()
        .filter(|r| r.path().ends_with(&part))
        .map(|r| match r.range() {
            Some((a, Some(b))) => b + 1 - a,
            Some((a, None)) => size as u64 - a,
            None => size as u64,
        })
        .sum();
    assert_eq!(fetched, size as u64 - cut);
    let got = go(&["get", "-q", &format!("{dest}:v1")]);
    assert!(ok(&got) == expected_disk(&s.image));
    assert_eq!(partial_len(&dir, &part), None);
}

#[test]
fn a_copy_killed_with_sigkill_continues_where_it_stopped() {
    let s = Scripted::new(Image::split(&data(4_000_000, 4), 4_000_000));
    let (part, size) = s.layer(0);
    // Bytes go to the file a buffer (1 MiB) at a time: two are written
    // before the stall.
    let stall_at = 2_500_000u64;
    let written = 2 << 20;
    let stalling = Arc::new(AtomicBool::new(true));
    let (t, st, big) = (Arc::clone(&s), Arc::clone(&stalling), part.clone());
    let server = Server::start(move |req, _| {
        t.serve(req, |d, b| {
            if d == big && st.load(Ordering::SeqCst) {
                Reply::blob(b).stall_after(stall_at, Duration::from_secs(30))
            } else {
                Reply::blob(b)
            }
        })
    });
    let tmp = TempDir::new().unwrap();
    let dir = tmp.path().join("l");
    let src = format!("{}/img:v1", server.host());
    let dest = format!("oci:{}:v1", dir.display());
    let mut child = cmd(&["copy", "-q", &src, &dest])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while partial_len(&dir, &part) != Some(written) {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "no partial copy: {:?}",
            partial_len(&dir, &part)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    stalling.store(false, Ordering::SeqCst);
    let before = server.requests().len();
    ok(&go(&["copy", "-q", &src, &dest]));
    let later = range_starts(&server.requests()[before..], &part);
    assert_eq!(later, [written]);
    assert!(size as u64 > stall_at);
    let got = go(&["get", "-q", &dest]);
    assert!(ok(&got) == expected_disk(&s.image));
}

#[test]
fn a_partial_copy_that_was_tampered_with_is_caught_and_removed() {
    let s = Scripted::new(Image::split(&data(1_500_000, 5), 1_500_000));
    let (part, _) = s.layer(0);
    let t = Arc::clone(&s);
    let server = Server::start(move |req, n| {
        t.serve(req, |_, b| match n {
            0 => Reply::blob(b).cut_after(600_000),
            _ => Reply::blob(b),
        })
    });
    let tmp = TempDir::new().unwrap();
    let dir = tmp.path().join("l");
    let src = format!("{}/img:v1", server.host());
    let dest = format!("oci:{}:v1", dir.display());
    failure(&go(&["copy", "-q", "--retries", "0", &src, &dest]));
    let hex = &part[7..];
    let partial = dir.join(".cloudimg/partial").join(format!("sha256-{hex}"));
    let mut bytes = std::fs::read(&partial).unwrap();
    bytes[1234] ^= 0x55;
    std::fs::write(&partial, &bytes).unwrap();
    let line = failure(&go(&["copy", "-q", &src, &dest]));
    assert!(
        line.contains("digest mismatch") && line.contains("partial copy"),
        "{line}"
    );
    assert!(!partial.exists() && !dir.join("blobs/sha256").join(hex).exists());
    // The next run starts that blob afresh.
    ok(&go(&["copy", "-q", &src, &dest]));
    assert!(ok(&go(&["get", "-q", &dest])) == expected_disk(&s.image));
}

#[test]
fn concurrent_copies_into_one_layout_keep_every_tag() {
    let tmp = TempDir::new().unwrap();
    let layout = LayoutDir::new(&tmp.path().join("src"));
    let names: Vec<String> = (0..6).map(|i| format!("t{i}")).collect();
    for (i, t) in names.iter().enumerate() {
        // Images that share a part, so the writers meet on blobs too.
        let mut image = Image::split(&data(300_000, 100 + i as u64), 100_000);
        image
            .layers
            .push(Layer::new(QCOW2_PART, "zz-shared", data(200_000, 7)));
        layout.put_image(Some(t), &image);
    }
    let dst = tmp.path().join("dst");
    for round in 0..3 {
        let children: Vec<_> = names
            .iter()
            .map(|t| {
                cmd(&[
                    "copy",
                    "-q",
                    &layout.source(t),
                    &format!("oci:{}:{t}-{round}", dst.display()),
                ])
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
            })
            .collect();
        for c in children {
            ok(&c.wait_with_output().unwrap());
        }
    }
    let mut want: Vec<String> = (0..3)
        .flat_map(|r| names.iter().map(move |t| format!("{t}-{r}")))
        .collect();
    want.sort();
    assert_eq!(tags(&dst), want);
    for t in &names {
        let a = go(&["get", "-q", &layout.source(t)]);
        let b = go(&["get", "-q", &format!("oci:{}:{t}-2", dst.display())]);
        assert!(ok(&a) == ok(&b));
    }
    assert_eq!(names_in(&dst.join(".cloudimg/partial")), 0);
}

fn names_in(dir: &Path) -> usize {
    std::fs::read_dir(dir).unwrap().count()
}

fn cached_get(server: &Server, cache: &Path, extra: &[&str]) -> Output {
    let src = format!("{}/img:v1", server.host());
    let cache = cache.display().to_string();
    let mut args = vec!["get", "-q", "--cache", &cache, &src];
    args.extend_from_slice(extra);
    go(&args)
}

#[test]
fn the_cache_is_filled_once_and_then_read_instead_of_the_registry() {
    let s = Scripted::new(image_with_sums(6));
    let t = Arc::clone(&s);
    let server = Server::start(move |req, _| t.serve(req, |_, b| Reply::blob(b)));
    let tmp = TempDir::new().unwrap();
    let cache = tmp.path().join("cache");
    let first = cached_get(&server, &cache, &[]);
    assert!(ok(&first) == expected_disk(&s.image));
    // Every blob was asked for once: disk parts by the stream, the config
    // and the checksum layer to complete the cached image.
    assert_eq!(s.blob_requests(), s.blobs.len());
    let full_name = format!("{}/img:v1", server.host());
    assert_eq!(tags(&cache), std::slice::from_ref(&full_name));
    let second = cached_get(&server, &cache, &[]);
    assert!(ok(&second) == expected_disk(&s.image));
    assert_eq!(
        s.blob_requests(),
        s.blobs.len(),
        "the second run fetched blobs"
    );
    // The cache is a layout like any other.
    let local = go(&["get", "-q", &format!("oci:{}:{full_name}", cache.display())]);
    assert!(ok(&local) == expected_disk(&s.image));
    // A digest-pinned reference needs no registry at all.
    let pinned = format!("{}/img@{}", server.host(), s.digest);
    drop(server);
    let out = go(&["get", "-q", "--cache", cache.to_str().unwrap(), &pinned]);
    assert!(ok(&out) == expected_disk(&s.image));
    // The environment names the cache as well.
    let out = cmd(&["get", "-q", &pinned])
        .env("CLOUDIMG_CACHE", &cache)
        .output()
        .unwrap();
    assert!(ok(&out) == expected_disk(&s.image));
}

#[test]
fn a_damaged_cached_blob_is_removed_and_fetched_again() {
    let s = Scripted::new(image_with_sums(7));
    let t = Arc::clone(&s);
    let server = Server::start(move |req, _| t.serve(req, |_, b| Reply::blob(b)));
    let tmp = TempDir::new().unwrap();
    let cache = tmp.path().join("cache");
    ok(&cached_get(&server, &cache, &[]));
    let (part, _) = s.layer(1);
    let file = cache.join("blobs/sha256").join(&part[7..]);
    let damage = |file: &Path| {
        let mut bytes = std::fs::read(file).unwrap();
        bytes[77] ^= 1;
        std::fs::write(file, &bytes).unwrap();
    };
    // Into a file: nothing was delivered yet, so the run starts over.
    damage(&file);
    let out_file = tmp.path().join("disk.qcow2");
    let out = cached_get(&server, &cache, &["-o", out_file.to_str().unwrap()]);
    ok(&out);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("removed from the cache") && said.contains("starting over"),
        "{said}"
    );
    assert!(std::fs::read(&out_file).unwrap() == expected_disk(&s.image));
    assert_eq!(s.asked_for(&part), 2);
    assert_eq!(sha256(&std::fs::read(&file).unwrap()), part);
    // Into a pipe, bytes went out: the run fails, and the next one is whole.
    damage(&file);
    let line = failure(&cached_get(&server, &cache, &[]));
    assert!(
        line.contains("digest mismatch") && line.contains("removed from the cache"),
        "{line}"
    );
    assert!(!file.exists());
    assert!(ok(&cached_get(&server, &cache, &[])) == expected_disk(&s.image));
    assert_eq!(s.asked_for(&part), 3);
}

#[test]
fn a_failed_run_leaves_nothing_in_the_cache() {
    let s = Scripted::new(image_with_sums(8));
    let (bad, _) = s.layer(2);
    let t = Arc::clone(&s);
    let wrong = bad.clone();
    let server = Server::start(move |req, _| {
        t.serve(req, |d, b| {
            if d == wrong {
                let mut evil = b.as_ref().clone();
                evil[10] ^= 1;
                Reply::blob(Arc::new(evil))
            } else {
                Reply::blob(b)
            }
        })
    });
    let tmp = TempDir::new().unwrap();
    let cache = tmp.path().join("cache");
    let line = failure(&cached_get(&server, &cache, &[]));
    assert!(line.contains("digest mismatch"), "{line}");
    assert!(tags(&cache).is_empty());
    // Nothing at all under a final name: the good parts streamed before
    // the bad one are kept only once the whole stream is good.
    let blobs = cache.join("blobs/sha256");
    assert!(!blobs.exists() || names_in(&blobs) == 0);
}

#[test]
fn pull_with_a_cache_imports_from_it_the_second_time() {
    let s = Scripted::new(Image::split(&data(3 * 400_000, 9), 400_000));
    let t = Arc::clone(&s);
    let server = Server::start(move |req, _| t.serve(req, |_, b| Reply::blob(b)));
    let tmp = TempDir::new().unwrap();
    let cache = tmp.path().join("cache");
    let store = tmp.path().join("store");
    std::fs::create_dir(&store).unwrap();
    let src = format!("{}/img:v1", server.host());
    for (round, name) in ["first", "second"].iter().enumerate() {
        let out = cmd(&[
            "pull",
            "-q",
            "--cache",
            cache.to_str().unwrap(),
            "--name",
            name,
            &src,
        ])
        .env("EPOCH_COCOON_BINARY", standin())
        .env("COCOON_STANDIN_DIR", &store)
        .output()
        .unwrap();
        ok(&out);
        assert!(std::fs::read(store.join(name)).unwrap() == expected_disk(&s.image));
        assert_eq!(s.blob_requests(), s.blobs.len(), "round {round}");
    }
}

/// A small tmpfs, unmounted when dropped; `None` where mounting is not
/// allowed (the test then says so and checks nothing).
struct Mount(std::path::PathBuf);

impl Mount {
    fn tmpfs(at: &Path, size: &str) -> Option<Mount> {
        std::fs::create_dir_all(at).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Mount(at.to_owned()))
    }

    fn read_only(&self) {
        let s = Command::new("mount")
            .args(["-o", "remount,ro"])
            .arg(&self.0)
            .status()
            .unwrap();
        assert!(s.success());
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn a_full_or_read_only_layout_fails_in_one_line_and_keeps_what_it_had() {
    let tmp = TempDir::new().unwrap();
    let src = LayoutDir::new(&tmp.path().join("src"));
    let small = Image::split(&data(100_000, 11), 50_000);
    let big = Image::split(&data(3_000_000, 12), 1_000_000);
    src.put_image(Some("small"), &small);
    src.put_image(Some("big"), &big);
    let at = tmp.path().join("mnt");
    let Some(mount) = Mount::tmpfs(&at, "1m") else {
        eprintln!("mounting a tmpfs is not allowed here: not checked");
        return;
    };
    let dest = |tag: &str| format!("oci:{}:{tag}", at.display());
    ok(&go(&["copy", "-q", &src.source("small"), &dest("small")]));
    let index_before = std::fs::read(at.join("index.json")).unwrap();
    let blobs_before = names(&at.join("blobs/sha256"));
    let line = failure(&go(&["copy", "-q", &src.source("big"), &dest("big")]));
    assert!(line.contains("No space left"), "{line}");
    assert_eq!(std::fs::read(at.join("index.json")).unwrap(), index_before);
    assert_eq!(names(&at.join("blobs/sha256")), blobs_before);
    // A cache on a full disk loses the cache, not the run.
    let s = Scripted::new(big.clone());
    let t = Arc::clone(&s);
    let server = Server::start(move |req, _| t.serve(req, |_, b| Reply::blob(b)));
    let out = go(&[
        "get",
        "-q",
        "--cache",
        at.to_str().unwrap(),
        &format!("{}/img:v1", server.host()),
    ]);
    assert!(ok(&out) == expected_disk(&big));
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("cloudimg: cache:"), "{said}");
    assert_eq!(std::fs::read(at.join("index.json")).unwrap(), index_before);
    // Read-only: one line, nothing changed.
    for p in std::fs::read_dir(at.join(".cloudimg/partial")).unwrap() {
        std::fs::remove_file(p.unwrap().path()).unwrap();
    }
    mount.read_only();
    let line = failure(&go(&["copy", "-q", &src.source("big"), &dest("big")]));
    assert!(line.contains("Read-only file system"), "{line}");
    assert_eq!(std::fs::read(at.join("index.json")).unwrap(), index_before);
    assert_eq!(names(&at.join("blobs/sha256")), blobs_before);
}

#[test]
fn a_user_and_password_in_the_servers_url_never_reach_the_cache() {
    let s = Scripted::new(Image::split(&data(300_000, 13), 100_000));
    let t = Arc::clone(&s);
    let server = Server::start(move |req, _| t.serve(req, |_, b| Reply::blob(b)));
    let tmp = TempDir::new().unwrap();
    let cache = tmp.path().join("cache");
    let out = cmd(&["get", "-q", "--cache", cache.to_str().unwrap(), "img:v1"])
        .env(
            "EPOCH_SERVER",
            format!("http://alice:s3cret@{}", server.host()),
        )
        .output()
        .unwrap();
    assert!(ok(&out) == expected_disk(&s.image));
    let index = std::fs::read_to_string(cache.join("index.json")).unwrap();
    assert!(
        !index.contains("s3cret") && !index.contains("alice"),
        "{index}"
    );
    assert_eq!(tags(&cache), [format!("{}/img:v1", server.host())]);
}

#[test]
fn a_bad_registry_blob_named_after_a_cached_one_neither_evicts_it_nor_is_kept() {
    // Part "b" carries the digest of cached part "a" in its title, and the
    // registry corrupts "b" the first time it is asked for it.
    let a = data(200_000, 14);
    let b = data(200_000, 15);
    let a_digest = sha256(&a);
    let mut image = Image::split(&a, 200_000);
    image.layers = vec![
        Layer::new(QCOW2_PART, "a", a.clone()),
        Layer::new(QCOW2_PART, &format!("b {a_digest}"), b.clone()),
    ];
    let s = Scripted::new(image);
    let b_digest = sha256(&b);
    let (t, wrong) = (Arc::clone(&s), b_digest.clone());
    let server = Server::start(move |req, n| {
        t.serve(req, |d, blob| {
            if d == wrong && n == 0 {
                let mut evil = blob.as_ref().clone();
                evil[0] ^= 1;
                Reply::blob(Arc::new(evil))
            } else {
                Reply::blob(blob)
            }
        })
    });
    // "a" is in the cache already (copied there from a layout).
    let tmp = TempDir::new().unwrap();
    let only_a = LayoutDir::new(&tmp.path().join("a"));
    let mut a_image = Image::split(&a, 200_000);
    a_image.layers = vec![Layer::new(QCOW2_PART, "a", a.clone())];
    only_a.put_image(Some("v1"), &a_image);
    let cache = tmp.path().join("cache");
    ok(&go(&[
        "copy",
        "-q",
        &only_a.source("v1"),
        &format!("oci:{}:a", cache.display()),
    ]));
    let out_file = tmp.path().join("disk");
    let line = failure(&cached_get(
        &server,
        &cache,
        &["-o", out_file.to_str().unwrap()],
    ));
    assert!(
        line.contains("digest mismatch") && !line.contains("removed"),
        "{line}"
    );
    let blobs = cache.join("blobs/sha256");
    assert!(
        blobs.join(&a_digest[7..]).exists(),
        "the cached blob was evicted"
    );
    assert!(
        !blobs.join(&b_digest[7..]).exists(),
        "the bad bytes were kept"
    );
    // The registry answers right the next time: whole, and now cached.
    ok(&cached_get(
        &server,
        &cache,
        &["-o", out_file.to_str().unwrap()],
    ));
    assert_eq!(
        sha256(&std::fs::read(blobs.join(&b_digest[7..])).unwrap()),
        b_digest
    );
    assert_eq!(s.asked_for(&a_digest), 0);
}

#[test]
fn a_pipe_reader_sees_its_end_before_the_cache_fetches_the_rest() {
    // The config never comes (until the test ends): the disk is whole, and
    // its reader must not wait for the cache to complete the image.
    let s = Scripted::new(Image::split(&data(300_000, 16), 100_000));
    let release = Arc::new(AtomicBool::new(false));
    let (t, r) = (Arc::clone(&s), Arc::clone(&release));
    let config = sha256(b"{}");
    let server = Server::start(move |req, _| {
        t.serve(req, |d, b| {
            if d == config && !r.load(Ordering::SeqCst) {
                Reply::blob(b).stall_after(0, Duration::from_secs(20))
            } else {
                Reply::blob(b)
            }
        })
    });
    let tmp = TempDir::new().unwrap();
    let cache = tmp.path().join("cache");
    let src = format!("{}/img:v1", server.host());
    let mut child = cmd(&["get", "-q", "--cache", cache.to_str().unwrap(), &src])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut all = Vec::new();
        let _ = std::io::Read::read_to_end(&mut stdout, &mut all);
        let _ = tx.send(all);
    });
    // Ordering, not speed: the end arrives while the config is withheld.
    let got = rx.recv_timeout(Duration::from_secs(15));
    release.store(true, Ordering::SeqCst);
    let _ = child.kill();
    let _ = child.wait();
    assert!(got.expect("no end of file while the cache waited") == expected_disk(&s.image));
}

#[test]
fn waits_for_another_writer_end_on_sigterm() {
    let tmp = TempDir::new().unwrap();
    let layout = LayoutDir::new(&tmp.path().join("src"));
    let image = Image::split(&data(200_000, 17), 100_000);
    layout.put_image(Some("v1"), &image);
    let dst = tmp.path().join("dst");
    ok(&go(&[
        "copy",
        "-q",
        &layout.source("v1"),
        &format!("oci:{}:a", dst.display()),
    ]));
    // Another writer holds the layout's lock (the flock of util-linux).
    let mut holder = Command::new("flock")
        .arg(dst.join(".cloudimg/lock"))
        .args(["sleep", "30"])
        .spawn()
        .expect("flock (util-linux) must be installed");
    std::thread::sleep(Duration::from_millis(300));
    let child = cmd(&[
        "copy",
        "-q",
        &layout.source("v1"),
        &format!("oci:{}:b", dst.display()),
    ])
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let pid = child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let out = child.wait_with_output().unwrap();
    let _ = holder.kill();
    let _ = holder.wait();
    assert_eq!(
        out.status.code(),
        Some(143),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(tags(&dst), ["a"]);
}
