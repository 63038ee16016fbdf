//! `cloudimg pull` into a faithful stand-in for cocoon's import
//! (tests/cocoon-import-standin.sh — a stand-in, since cocoon cannot be
//! built here — which keeps a compat 1.1 qcow2, converts other qcow2s and
//! reads anything else as a tar): a raw image arrives as a qcow2 equal to the
//! raw disk; `--format raw` is refused as cocoon refuses a raw disk; a disk
//! whose first bytes do not match its format fails before cocoon starts.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use common::registry::Registry;
use common::*;
use tempfile::TempDir;

const RAW_PART: &str = "application/vnd.cocoonstack.disk.raw.part";
const MIB: usize = 1 << 20;

fn import_standin() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/cocoon-import-standin.sh")
}

/// A raw disk split into `disk.NN.raw.part` layers.
fn raw_image(disk: &[u8], part: usize) -> Image {
    let mut image = Image::split(disk, part);
    for l in &mut image.layers {
        if l.media_type == QCOW2_PART {
            l.media_type = RAW_PART.to_owned();
            l.title = l
                .title
                .as_ref()
                .map(|t| t.replace(".qcow2.part", ".raw.part"));
        }
    }
    image
}

/// A raw disk with zeros at the start, data, a long run of zeros and data
/// at the end, not a multiple of the cluster size.
fn raw_disk() -> Vec<u8> {
    let mut disk = vec![0u8; 6 * MIB + 333];
    disk[MIB..2 * MIB].copy_from_slice(&noise(MIB, 1));
    disk[6 * MIB - 1000..].copy_from_slice(&noise(1333, 2));
    disk
}

struct Store {
    _tmp: TempDir,
    dir: PathBuf,
    pidfile: PathBuf,
}

impl Store {
    fn new() -> Store {
        let tmp = TempDir::new().unwrap();
        let dir = tmp.path().join("store");
        std::fs::create_dir(&dir).unwrap();
        let pidfile = tmp.path().join("cocoon.pid");
        Store {
            dir,
            pidfile,
            _tmp: tmp,
        }
    }

    fn pull(&self, args: &[&str]) -> Output {
        bin()
            .arg("pull")
            .args(args)
            .env("EPOCH_COCOON_BINARY", import_standin())
            .env("COCOON_STANDIN_DIR", &self.dir)
            .env("COCOON_STANDIN_PIDFILE", &self.pidfile)
            .env("DOCKER_CONFIG", "/nonexistent")
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// The names committed (links to blobs), without temporary files.
    fn committed(&self) -> Vec<String> {
        names(&self.dir)
            .into_keys()
            .filter(|n| !n.starts_with('.'))
            .collect()
    }

    fn cocoon_started(&self) -> bool {
        self.pidfile.exists()
    }
}

fn qemu_img(args: &[&str]) -> (bool, String) {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img must be installed (Debian: qemu-utils)");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

/// The image committed as `name` is a valid qcow2 equal to `raw`.
fn assert_imported_equal(store: &Store, name: &str, raw: &[u8]) {
    let image = store.dir.join(name);
    let (ok, text) = qemu_img(&["check", "-f", "qcow2", image.to_str().unwrap()]);
    assert!(ok && text.contains("No errors were found"), "{text}");
    let raw_path = store.dir.join(".raw-for-compare");
    std::fs::write(&raw_path, raw).unwrap();
    let (ok, text) = qemu_img(&[
        "compare",
        "-f",
        "raw",
        "-F",
        "qcow2",
        raw_path.to_str().unwrap(),
        image.to_str().unwrap(),
    ]);
    std::fs::remove_file(&raw_path).unwrap();
    assert!(ok, "{text}");
}

fn succeeded(out: &Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{err}");
    err
}

#[test]
fn a_raw_image_from_a_layout_is_imported_as_a_qcow2_equal_to_the_disk() {
    let disk = raw_disk();
    let tmp = TempDir::new().unwrap();
    let layout = LayoutDir::new(&tmp.path().join("ubuntu"));
    layout.put_image(Some("24.04"), &raw_image(&disk, 2 * MIB + 7));
    let store = Store::new();
    let err = succeeded(&store.pull(&["-q", &layout.source("24.04")]));
    assert!(err.contains("imported ubuntu"), "{err}");
    // Kept as it is: cocoon's fast path for a compat 1.1 qcow2.
    assert!(err.contains("kept as is: yes"), "{err}");
    assert_eq!(store.committed(), vec!["ubuntu".to_owned()]);
    assert_imported_equal(&store, "ubuntu", &disk);
    // Zero clusters were left out: far less than the disk.
    let len = std::fs::metadata(store.dir.join("ubuntu")).unwrap().len();
    assert!(len < 2 * MIB as u64, "{len} bytes");
}

#[test]
fn a_raw_image_from_a_registry_is_imported_as_a_qcow2_equal_to_the_disk() {
    let disk = raw_disk();
    let reg = Registry::start();
    reg.push_image("linux/ubuntu", "24.04", &raw_image(&disk, 2 * MIB + 7));
    let store = Store::new();
    let source = format!("{}/linux/ubuntu:24.04", reg.host());
    let err = succeeded(&store.pull(&["-q", &source]));
    assert!(err.contains("kept as is: yes"), "{err}");
    assert_eq!(store.committed(), vec!["ubuntu".to_owned()]);
    assert_imported_equal(&store, "ubuntu", &disk);
}

#[test]
fn pull_format_raw_sends_the_raw_bytes_which_cocoon_refuses() {
    let disk = raw_disk();
    let tmp = TempDir::new().unwrap();
    let layout = LayoutDir::new(&tmp.path().join("img"));
    layout.put_image(Some("v1"), &raw_image(&disk, 2 * MIB + 7));
    let store = Store::new();
    let out = store.pull(&["-q", "--format", "raw", &layout.source("v1")]);
    // cocoon's own complaint, then ours.
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 2, "{err}");
    assert!(lines[0].contains("not a qcow2 image"), "{err}");
    assert!(
        lines[1].starts_with("cloudimg: cocoon image import img failed"),
        "{err}"
    );
    assert!(store.cocoon_started());
    assert!(store.committed().is_empty(), "{:?}", store.committed());
    // An unknown --format is a usage error.
    let out = store.pull(&["--format", "auto", &layout.source("v1")]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn a_real_qcow2_image_is_imported_byte_for_byte() {
    let tmp = TempDir::new().unwrap();
    let p = |n: &str| tmp.path().join(n).to_str().unwrap().to_owned();
    let mut guest = noise(3 * MIB, 11);
    guest.resize(8 * MIB, 0);
    std::fs::write(p("guest.raw"), &guest).unwrap();
    let (ok, text) = qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        &p("guest.raw"),
        &p("disk.qcow2"),
    ]);
    assert!(ok, "{text}");
    let qcow2 = std::fs::read(p("disk.qcow2")).unwrap();
    let layout = LayoutDir::new(&tmp.path().join("win11"));
    layout.put_image(Some("25h2"), &Image::split(&qcow2, 300_001));
    let store = Store::new();
    succeeded(&store.pull(&["-q", &layout.source("25h2")]));
    assert!(std::fs::read(store.dir.join("win11")).unwrap() == qcow2);
    // Asking for raw bytes of a qcow2 image is refused before cocoon starts.
    let store = Store::new();
    let line = failure(&store.pull(&["-q", "--format", "raw", &layout.source("25h2")]));
    assert!(line.contains("qemu-img convert"), "{line}");
    assert!(!store.cocoon_started());
}

#[test]
fn a_mislabelled_first_part_fails_before_cocoon_starts_naming_it() {
    // The second part of a qcow2 was published with a title that sorts
    // first: the disk would start in the middle.
    let tmp = TempDir::new().unwrap();
    let mut image = Image::split(&data(3 * 100_000, 12), 100_000);
    for l in &mut image.layers {
        if l.title.as_deref() == Some("disk.01.qcow2.part") {
            l.title = Some("disk.0.qcow2.part".to_owned());
        }
    }
    let layout = LayoutDir::new(&tmp.path().join("img"));
    layout.put_image(Some("v1"), &image);
    let store = Store::new();
    let line = failure(&store.pull(&["-q", &layout.source("v1")]));
    assert!(line.contains("layer \"disk.0.qcow2.part\""), "{line}");
    assert!(
        line.contains("does not start with the qcow2 magic"),
        "{line}"
    );
    assert!(!store.cocoon_started(), "cocoon was started: {line}");
    assert!(store.committed().is_empty());

    // The same from a registry.
    let reg = Registry::start();
    reg.push_image("img", "v1", &image);
    let store = Store::new();
    let line = failure(&store.pull(&["-q", &format!("{}/img:v1", reg.host())]));
    assert!(line.contains("layer \"disk.0.qcow2.part\""), "{line}");
    assert!(!store.cocoon_started(), "cocoon was started: {line}");

    // A qcow2 labelled raw.
    let qcow2_as_raw = raw_image(&data(200_000, 13), 100_000);
    let layout = LayoutDir::new(&tmp.path().join("raw"));
    layout.put_image(Some("v1"), &qcow2_as_raw);
    let store = Store::new();
    let line = failure(&store.pull(&["-q", &layout.source("v1")]));
    assert!(line.contains("layer \"disk.00.raw.part\""), "{line}");
    assert!(line.contains("labelled raw"), "{line}");
    assert!(!store.cocoon_started(), "cocoon was started: {line}");
}

#[test]
fn a_raw_image_with_a_corrupted_last_part_commits_nothing() {
    let disk = raw_disk();
    let tmp = TempDir::new().unwrap();
    let layout = LayoutDir::new(&tmp.path().join("img"));
    let image = raw_image(&disk, 2 * MIB + 7);
    layout.put_image(Some("v1"), &image);
    // Corrupt the last part in place (same size): its digest fails.
    let last = image
        .layers
        .iter()
        .find(|l| l.title.as_deref() == Some("disk.02.raw.part"))
        .unwrap();
    let path = layout.blob_path(&sha256(&last.data));
    let mut bytes = std::fs::read(&path).unwrap();
    let n = bytes.len();
    bytes[n - 5] ^= 0x40;
    std::fs::write(&path, &bytes).unwrap();
    let store = Store::new();
    let line = failure(&store.pull(&["-q", &layout.source("v1")]));
    assert!(line.contains("disk.02.raw.part"), "{line}");
    assert!(line.contains("digest mismatch"), "{line}");
    assert!(store.committed().is_empty(), "{:?}", store.committed());
}
