//! `cloudimg get` and `inspect` on OCI layouts the tests write: every sink
//! kind, every integrity failure, every kind of bad input.

mod common;

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::net::UnixStream;
use std::process::Stdio;

use common::*;
use serde_json::Value;
use tempfile::TempDir;

/// A layout with a five-part image whose parts are not page-aligned.
fn fixture() -> (TempDir, LayoutDir, Image) {
    let tmp = TempDir::new().unwrap();
    let layout = LayoutDir::new(&tmp.path().join("img"));
    let image = Image::split(&data(5 * 1_000_003 + 12_345, 1), 1_000_003);
    layout.put_image(Some("latest"), &image);
    (tmp, layout, image)
}

#[test]
fn pipe_sink_is_byte_identical() {
    let (_tmp, layout, image) = fixture();
    let out = run(&["get", "-q", &layout.source("latest")]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.stdout == expected_disk(&image), "pipe output differs");
    assert!(out.stderr.is_empty(), "-q must be silent");
}

#[test]
fn regular_file_sink_is_byte_identical() {
    let (tmp, layout, image) = fixture();
    let path = tmp.path().join("stdout.bin");
    let status = bin()
        .args(["get", &layout.source("latest")])
        .stdout(File::create(&path).unwrap())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert!(status.status.success());
    assert!(std::fs::read(&path).unwrap() == expected_disk(&image));
    // The summary line goes to stderr, and only there.
    let err = String::from_utf8_lossy(&status.stderr);
    assert!(err.starts_with("cloudimg: wrote (verified)"), "{err}");
}

#[test]
fn output_file_option_is_byte_identical_and_replaces_target() {
    let (tmp, layout, image) = fixture();
    let path = tmp.path().join("disk.qcow2");
    std::fs::write(&path, b"old contents").unwrap();
    let out = run(&[
        "get",
        "-q",
        &layout.source("latest"),
        "-o",
        path.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(std::fs::read(&path).unwrap() == expected_disk(&image));
    assert_eq!(names(tmp.path()).len(), 2, "no temporary file may remain");
}

#[test]
fn unix_socket_sink_is_byte_identical() {
    let (_tmp, layout, image) = fixture();
    let (ours, theirs) = UnixStream::pair().unwrap();
    let reader = std::thread::spawn(move || {
        let mut got = Vec::new();
        (&ours).read_to_end(&mut got).unwrap();
        got
    });
    let status = bin()
        .args(["get", "-q", &layout.source("latest")])
        .stdout(Stdio::from(std::os::fd::OwnedFd::from(theirs)))
        .status()
        .unwrap();
    assert!(status.success());
    assert!(reader.join().unwrap() == expected_disk(&image));
}

#[test]
fn append_mode_file_falls_back_and_is_byte_identical() {
    // splice into an O_APPEND file is refused by the kernel (EINVAL), so this
    // exercises the fallback from splice-through-a-pipe to read/write.
    let (tmp, layout, image) = fixture();
    let path = tmp.path().join("appended.bin");
    std::fs::write(&path, b"HEAD").unwrap();
    let file = OpenOptions::new().append(true).open(&path).unwrap();
    let status = bin()
        .args(["get", "-q", &layout.source("latest")])
        .stdout(file)
        .status()
        .unwrap();
    assert!(status.success());
    let mut want = b"HEAD".to_vec();
    want.extend(expected_disk(&image));
    assert!(std::fs::read(&path).unwrap() == want);
}

#[test]
fn forced_read_write_path_is_byte_identical_on_every_sink() {
    let (tmp, layout, image) = fixture();
    let want = expected_disk(&image);
    let out = bin()
        .env("CLOUDIMG_IO", "readwrite")
        .args(["get", "-q", &layout.source("latest")])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(out.stdout == want, "pipe");
    let path = tmp.path().join("rw.bin");
    let status = bin()
        .env("CLOUDIMG_IO", "readwrite")
        .args(["get", "-q", &layout.source("latest")])
        .stdout(File::create(&path).unwrap())
        .status()
        .unwrap();
    assert!(status.success());
    assert!(std::fs::read(&path).unwrap() == want, "file");
}

#[test]
fn no_verify_still_streams_identically() {
    let (_tmp, layout, image) = fixture();
    let out = run(&["get", "--no-verify", &layout.source("latest")]);
    assert!(out.status.success());
    assert!(out.stdout == expected_disk(&image));
    assert!(String::from_utf8_lossy(&out.stderr).contains("NOT verified"));
}

/// The title of the last part in stream order, and its blob path.
fn last_part(layout: &LayoutDir, image: &Image) -> (String, std::path::PathBuf) {
    let last = image
        .layers
        .iter()
        .filter(|l| l.media_type == QCOW2_PART)
        .max_by_key(|l| l.title.clone())
        .unwrap();
    (
        last.title.clone().unwrap(),
        layout.blob_path(&sha256(&last.data)),
    )
}

#[test]
fn corrupted_blob_of_same_size_fails_naming_layer_and_digests() {
    let (_tmp, layout, image) = fixture();
    let (title, path) = last_part(&layout, &image);
    let mut bytes = std::fs::read(&path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    let expected = sha256(&std::fs::read(&path).unwrap());
    std::fs::write(&path, &bytes).unwrap();
    let line = failure(&run(&["get", "-q", &layout.source("latest")]));
    assert!(line.contains(&title), "{line}");
    assert!(line.contains("digest mismatch"), "{line}");
    assert!(line.contains(&format!("expected {expected}")), "{line}");
    assert!(
        line.contains(&format!("actual {}", sha256(&bytes))),
        "{line}"
    );
}

#[test]
fn corrupted_first_part_fails_too() {
    let (_tmp, layout, image) = fixture();
    let first = image
        .layers
        .iter()
        .filter(|l| l.media_type == QCOW2_PART)
        .min_by_key(|l| l.title.clone())
        .unwrap();
    let path = layout.blob_path(&sha256(&first.data));
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[0] ^= 1;
    std::fs::write(&path, &bytes).unwrap();
    let line = failure(&run(&["get", "-q", &layout.source("latest")]));
    assert!(
        line.contains("disk.00.qcow2.part") && line.contains("digest mismatch"),
        "{line}"
    );
}

#[test]
fn truncated_and_oversized_blobs_fail_before_any_byte() {
    for (how, change) in [("truncated", -1i64), ("oversized", 1)] {
        let (_tmp, layout, image) = fixture();
        let (title, path) = last_part(&layout, &image);
        let mut bytes = std::fs::read(&path).unwrap();
        if change < 0 {
            bytes.pop();
        } else {
            bytes.push(0);
        }
        std::fs::write(&path, &bytes).unwrap();
        let out = run(&["get", "-q", &layout.source("latest")]);
        let line = failure(&out);
        assert!(line.contains(&title) && line.contains(how), "{line}");
        assert!(
            out.stdout.is_empty(),
            "{how}: sizes are checked before streaming"
        );
    }
}

#[test]
fn output_file_is_absent_after_failure() {
    let (tmp, layout, image) = fixture();
    let (_, path) = last_part(&layout, &image);
    let mut bytes = std::fs::read(&path).unwrap();
    *bytes.last_mut().unwrap() ^= 0xff;
    std::fs::write(&path, &bytes).unwrap();
    let out_dir = tmp.path().join("out");
    std::fs::create_dir(&out_dir).unwrap();
    let target = out_dir.join("disk.qcow2");
    failure(&run(&[
        "get",
        "-q",
        &layout.source("latest"),
        "-o",
        target.to_str().unwrap(),
    ]));
    assert!(
        names(&out_dir).is_empty(),
        "left behind: {:?}",
        names(&out_dir)
    );
}

#[test]
fn other_kinds_are_refused_naming_the_kind() {
    let tmp = TempDir::new().unwrap();
    let layout = LayoutDir::new(&tmp.path().join("img"));
    let mut container = Image::split(&data(1000, 2), 400);
    container.artifact_type = None;
    container.config_media_type = OCI_CONFIG.to_owned();
    layout.put_image(Some("container"), &container);
    let mut snapshot = Image::split(&data(1000, 3), 400);
    snapshot.artifact_type = Some(SNAPSHOT.to_owned());
    layout.put_image(Some("snapshot"), &snapshot);
    for kind in ["container", "snapshot"] {
        let line = failure(&run(&["get", "-q", &layout.source(kind)]));
        let name = if kind == "container" {
            "container-image"
        } else {
            "snapshot"
        };
        assert!(
            line.contains("not a cloud image") && line.contains(name),
            "{line}"
        );
    }
    // inspect still describes them, and says why there is no disk.
    let out = run(&["inspect", "--json", &layout.source("snapshot")]);
    assert!(out.status.success());
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["kind"], "snapshot");
    assert!(report["plan"].is_null());
}

#[test]
fn missing_tag_blob_and_layout_fail_cleanly() {
    let (tmp, layout, image) = fixture();
    let line = failure(&run(&["get", "-q", &layout.source("nope")]));
    assert!(
        line.contains("\"nope\"") && line.contains("latest"),
        "{line}"
    );

    let (title, path) = last_part(&layout, &image);
    std::fs::remove_file(&path).unwrap();
    let line = failure(&run(&["get", "-q", &layout.source("latest")]));
    assert!(line.contains(&title) && line.contains("missing"), "{line}");

    let nowhere = tmp.path().join("nowhere");
    let line = failure(&run(&["get", "-q", &format!("oci:{}", nowhere.display())]));
    assert!(line.contains("no such layout"), "{line}");
}

#[test]
fn bad_digest_forms_are_refused_before_any_path_is_built() {
    let tmp = TempDir::new().unwrap();
    let layout = LayoutDir::new(&tmp.path().join("img"));
    // A file the traversal would reach if the digest were used as a path.
    std::fs::write(tmp.path().join("secret"), b"do not read").unwrap();
    let mut m = Image::split(&data(100, 4), 60).manifest_json();
    m["layers"][0]["digest"] = "sha256:../../../secret".into();
    let bytes = serde_json::to_vec(&m).unwrap();
    layout.put_manifest_bytes(
        Some("evil"),
        &bytes,
        "application/vnd.oci.image.manifest.v1+json",
    );
    let line = failure(&run(&["get", "-q", &layout.source("evil")]));
    assert!(
        line.contains("bad digest") && line.contains("../"),
        "{line}"
    );

    // In index.json too.
    let index = tmp.path().join("img/index.json");
    let mut idx: Value = serde_json::from_slice(&std::fs::read(&index).unwrap()).unwrap();
    idx["manifests"][0]["digest"] = "sha256:../../secret".into();
    std::fs::write(&index, serde_json::to_vec(&idx).unwrap()).unwrap();
    let line = failure(&run(&["inspect", &layout.source("evil")]));
    assert!(line.contains("bad digest"), "{line}");

    // And on the command line.
    let out = run(&[
        "get",
        &format!("oci:{}@sha256:../../x", layout.dir.display()),
    ]);
    assert!(failure(&out).contains("bad digest"));
}

#[test]
fn manifest_digest_is_verified() {
    let (_tmp, layout, _image) = fixture();
    let index = layout.dir.join("index.json");
    let idx: Value = serde_json::from_slice(&std::fs::read(&index).unwrap()).unwrap();
    let digest = idx["manifests"][0]["digest"].as_str().unwrap().to_owned();
    let path = layout.blob_path(&digest);
    let mut bytes = std::fs::read(&path).unwrap();
    let n = bytes.len();
    bytes[n - 1] = b' '; // same size, still JSON-ish, different digest
    std::fs::write(&path, &bytes).unwrap();
    let line = failure(&run(&["inspect", &layout.source("latest")]));
    assert!(line.contains("manifest digest mismatch"), "{line}");
}

#[test]
fn digest_pinned_and_default_references() {
    let (_tmp, layout, image) = fixture();
    let idx: Value =
        serde_json::from_slice(&std::fs::read(layout.dir.join("index.json")).unwrap()).unwrap();
    let digest = idx["manifests"][0]["digest"].as_str().unwrap().to_owned();
    let pinned = format!("oci:{}@{digest}", layout.dir.display());
    let out = run(&["get", "-q", &pinned]);
    assert!(out.status.success());
    assert!(out.stdout == expected_disk(&image));
    // No tag: "latest".
    let out = run(&["get", "-q", &format!("oci:{}", layout.dir.display())]);
    assert!(out.stdout == expected_disk(&image));
    // A digest the layout does not hold.
    let wrong = format!("oci:{}@sha256:{}", layout.dir.display(), "0".repeat(64));
    assert!(failure(&run(&["get", "-q", &wrong])).contains("missing"));
}

#[test]
fn untagged_single_manifest_and_dir_with_colon() {
    let tmp = TempDir::new().unwrap();
    let dir = tmp.path().join("a:b");
    let layout = LayoutDir::new(&dir);
    let image = Image::split(&data(3000, 5), 1000);
    layout.put_image(None, &image);
    // The only manifest is picked when no tag is given. PATH ends at the
    // first colon (skopeo's rule), so the colon in DIR is reached through a
    // symlink; the error for the colon spelling says so.
    let line = failure(&run(&["get", "-q", &format!("oci:{}", dir.display())]));
    assert!(
        line.contains("exists") && line.contains("symlink"),
        "{line}"
    );
    let link = tmp.path().join("ab");
    std::os::unix::fs::symlink(&dir, &link).unwrap();
    let out = run(&["get", "-q", &format!("oci:{}", link.display())]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.stdout == expected_disk(&image));
}

#[test]
fn inspect_shows_plan_in_stream_order_and_skipped_layers() {
    let (_tmp, layout, image) = fixture();
    let out = run(&["inspect", "--json", &layout.source("latest")]);
    assert!(out.status.success());
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["kind"], "cloud-image");
    assert_eq!(r["artifactType"], OS_IMAGE);
    assert_eq!(r["annotations"]["cocoonstack.disk.format"], "qcow2");
    let titles: Vec<&str> = r["plan"]["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["title"].as_str().unwrap())
        .collect();
    let mut sorted = titles.clone();
    sorted.sort();
    assert_eq!(titles, sorted);
    assert_eq!(titles.len(), 6);
    assert_eq!(r["plan"]["skipped"][0]["title"], "SHA256SUMS");
    assert_eq!(r["plan"]["total"], expected_disk(&image).len());
    let text = run(&["inspect", &layout.source("latest")]);
    let text = String::from_utf8(text.stdout).unwrap();
    assert!(text.contains("kind:           cloud-image"), "{text}");
    assert!(text.contains("SHA256SUMS"), "{text}");
}

#[test]
fn usage_errors_exit_2_and_help_exits_0() {
    let out = run(&["get"]);
    assert_eq!(out.status.code(), Some(2));
    let out = run(&["frobnicate"]);
    assert_eq!(out.status.code(), Some(2));
    let out = run(&["--help"]);
    assert_eq!(out.status.code(), Some(0));
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("get") && help.contains("pull") && help.contains("inspect"));
}

#[test]
fn bad_reference_is_one_clear_line() {
    let line = failure(&run(&["get", "oci:"]));
    assert!(line.contains("bad source reference"), "{line}");
}

#[test]
fn terminal_stdout_is_refused_and_terminal_stderr_gets_progress() {
    let (tmp, layout, _image) = fixture();
    let pty = nix::pty::openpty(None, None).unwrap();
    let tty = || Stdio::from(pty.slave.try_clone().unwrap());
    // Binary data to a terminal: refused, and nothing written there.
    let out = bin()
        .args(["get", &layout.source("latest")])
        .stdout(tty())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let line = failure(&out);
    assert!(line.contains("terminal"), "{line}");

    // Progress is drawn on a terminal stderr, then the summary line.
    let target = tmp.path().join("disk.out");
    let status = bin()
        .args([
            "get",
            &layout.source("latest"),
            "-o",
            target.to_str().unwrap(),
        ])
        .stdout(Stdio::null())
        .stderr(tty())
        .status()
        .unwrap();
    assert!(status.success());
    drop(pty.slave);
    let mut shown = Vec::new();
    let mut master = File::from(pty.master);
    let mut chunk = [0u8; 4096];
    // Reading the master ends with EIO once no slave is open.
    while let Ok(n) = master.read(&mut chunk) {
        if n == 0 {
            break;
        }
        shown.extend_from_slice(&chunk[..n]);
    }
    let shown = String::from_utf8_lossy(&shown);
    assert!(
        shown.contains("GiB/s  ETA"),
        "no live progress line: {shown}"
    );
    assert!(shown.contains("cloudimg: wrote (verified)"), "{shown}");
}

#[test]
fn sigint_while_blocked_on_a_full_pipe_exits_130() {
    let (_tmp, layout, _image) = fixture();
    // Nobody reads our stdout pipe, so the copy blocks once the pipe is full.
    let mut child = bin()
        .args(["get", "-q", &layout.source("latest")])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let status = child.wait().unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert_eq!(status.code(), Some(130), "{err}");
    assert_eq!(err.trim(), "cloudimg: interrupted by SIGINT");
}

/// A raw disk that is mostly zeros: 64 KiB of noise every MiB, 8 MiB in all,
/// split into parts whose boundaries are not block-aligned.
fn sparse_fixture() -> (TempDir, LayoutDir, Image, usize) {
    let tmp = TempDir::new().unwrap();
    let layout = LayoutDir::new(&tmp.path().join("img"));
    let mut disk = vec![0u8; 8 << 20];
    for (i, mb) in disk.chunks_mut(1 << 20).enumerate() {
        mb[4096..4096 + (64 << 10)].copy_from_slice(&data(64 << 10, 100 + i as u64));
    }
    disk[(8 << 20) - 1] = 0; // ends in a hole
    let mut image = Image::split(&disk, 3_000_001);
    for l in &mut image.layers {
        if l.media_type == QCOW2_PART {
            l.media_type = "application/vnd.cocoonstack.disk.raw.part".to_owned();
        }
    }
    layout.put_image(Some("v1"), &image);
    (tmp, layout, image, 8 * (64 << 10))
}

#[test]
fn sparse_always_makes_holes_and_keeps_the_bytes() {
    use std::os::unix::fs::MetadataExt;
    let (tmp, layout, image, data_bytes) = sparse_fixture();
    for mode in ["always", "never"] {
        let target = tmp.path().join(format!("disk-{mode}.raw"));
        let out = run(&[
            "get",
            "-q",
            "--sparse",
            mode,
            &layout.source("v1"),
            "-o",
            target.to_str().unwrap(),
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            std::fs::read(&target).unwrap() == expected_disk(&image),
            "{mode}"
        );
        let allocated = std::fs::metadata(&target).unwrap().blocks() * 512;
        if mode == "always" {
            assert!(
                allocated <= (data_bytes as u64) * 11 / 10 + (64 << 10),
                "allocated {allocated} for {data_bytes} bytes of data"
            );
        } else {
            assert!(allocated >= 8 << 20, "never: allocated only {allocated}");
        }
    }
    // A bad mode is a usage error: exit 2, one line.
    let out = run(&[
        "get",
        "--sparse",
        "maybe",
        &layout.source("v1"),
        "-o",
        "/dev/null",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.trim().starts_with("cloudimg: --sparse") && err.lines().count() == 1,
        "{err}"
    );
}
