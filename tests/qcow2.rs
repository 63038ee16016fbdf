//! qcow2 out of `cloudimg get`: a real qcow2 disk, split into parts like the
//! publisher splits it, comes back as a disk that `qemu-img check` accepts
//! and that holds the same guest data; and raw disks of several shapes,
//! asked for with `--format qcow2`, become qcow2 images that `qemu-img
//! check` finds without errors or leaks and `qemu-img compare` finds equal
//! to the raw disk — from a layout (zero clusters left out) and from a real
//! registry (every cluster allocated).

mod common;

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Stdio};

use common::registry::Registry;
use common::*;
use tempfile::TempDir;

const RAW_PART: &str = "application/vnd.cocoonstack.disk.raw.part";
const CLUSTER: usize = 64 << 10;
const MIB: usize = 1 << 20;

fn qemu_img(args: &[&str]) -> std::process::Output {
    Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img must be installed (Debian: qemu-utils)")
}

#[test]
fn reassembled_qcow2_passes_qemu_img_check() {
    let tmp = TempDir::new().unwrap();
    let p = |n: &str| tmp.path().join(n).to_str().unwrap().to_owned();
    // Guest data: 6 MiB of noise at the start, 3 MiB more at 20 MiB, a hole between.
    let mut raw = data(6 << 20, 11);
    raw.resize(20 << 20, 0);
    raw.extend(data(3 << 20, 12));
    std::fs::write(p("guest.raw"), &raw).unwrap();
    let out = qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        &p("guest.raw"),
        &p("disk.qcow2"),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let qcow2 = std::fs::read(p("disk.qcow2")).unwrap();
    assert_eq!(&qcow2[..4], b"QFI\xfb");

    let layout = LayoutDir::new(&tmp.path().join("layout"));
    layout.put_image(Some("v1"), &Image::split(&qcow2, 1_900_000));

    let out = run(&["get", "-q", &layout.source("v1"), "-o", &p("out.qcow2")]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let check = qemu_img(&["check", &p("out.qcow2")]);
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );
    let compare = qemu_img(&[
        "compare",
        "-f",
        "raw",
        "-F",
        "qcow2",
        &p("guest.raw"),
        &p("out.qcow2"),
    ]);
    assert!(
        compare.status.success(),
        "{}",
        String::from_utf8_lossy(&compare.stdout)
    );
}

/// A raw disk split into `disk.NN.raw.part` layers of `part` bytes.
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

/// A raw disk shape: its name, its bytes and the part size it is split at.
struct Shape {
    name: &'static str,
    disk: Vec<u8>,
    part: usize,
}

/// `len` zeros with `noise` written at each offset in `at`.
fn zeros_with(len: usize, at: &[(usize, usize)], seed: u64) -> Vec<u8> {
    let mut disk = vec![0u8; len];
    for (i, &(off, n)) in at.iter().enumerate() {
        disk[off..off + n].copy_from_slice(&noise(n, seed + i as u64));
    }
    disk
}

fn shapes() -> Vec<Shape> {
    vec![
        Shape {
            name: "all data, size not a multiple of the cluster",
            disk: noise(3 * MIB + 12_345, 1),
            part: 1_000_000,
        },
        Shape {
            name: "mostly zeros",
            disk: zeros_with(
                16 * MIB,
                &[(5, 4096), (2 * MIB, 100), (9 * MIB + 60_000, 10_000)],
                2,
            ),
            part: 3 * MIB + 5,
        },
        Shape {
            name: "zeros at the start",
            disk: zeros_with(3 * MIB + 100, &[(MIB + 3, 2 * MIB + 97)], 3),
            part: MIB,
        },
        Shape {
            name: "zeros at the end, size not a multiple of the cluster",
            disk: zeros_with(3 * MIB + 777, &[(0, MIB + 10)], 4),
            part: 2 * MIB,
        },
        Shape {
            name: "zeros across a part boundary",
            disk: {
                let mut d = noise(4 * MIB, 5);
                d[700_000..1_600_000].fill(0);
                d
            },
            part: 1_000_000,
        },
        Shape {
            name: "all zeros",
            disk: vec![0u8; 2 * MIB + 1],
            part: MIB,
        },
    ]
}

/// `qemu-img check` (no errors, no leaks), `qemu-img compare` against the
/// raw disk, and the header cocoon keeps as it is: compat 1.1, no backing
/// file.
fn assert_valid_qcow2(raw: &Path, qcow2: &Path, what: &str) {
    let q = qcow2.to_str().unwrap();
    let check = qemu_img(&["check", "-f", "qcow2", q]);
    let text = String::from_utf8_lossy(&check.stdout).into_owned()
        + &String::from_utf8_lossy(&check.stderr);
    assert!(
        check.status.success() && text.contains("No errors were found") && !text.contains("leak"),
        "{what}: {text}"
    );
    let compare = qemu_img(&[
        "compare",
        "-f",
        "raw",
        "-F",
        "qcow2",
        raw.to_str().unwrap(),
        q,
    ]);
    assert!(
        compare.status.success(),
        "{what}: {}{}",
        String::from_utf8_lossy(&compare.stdout),
        String::from_utf8_lossy(&compare.stderr)
    );
    let info = qemu_img(&["info", "--output=json", "-f", "qcow2", q]);
    let info = String::from_utf8_lossy(&info.stdout);
    assert!(info.contains("\"compat\": \"1.1\""), "{what}: {info}");
    assert!(!info.contains("backing-filename"), "{what}: {info}");
}

fn succeeded(out: &std::process::Output, what: &str) {
    assert!(
        out.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Clusters of `disk` with a non-zero byte.
fn data_clusters(disk: &[u8]) -> u64 {
    disk.chunks(CLUSTER)
        .filter(|c| c.iter().any(|&b| b != 0))
        .count() as u64
}

#[test]
fn raw_shapes_from_a_layout_become_valid_qcow2_without_their_zero_clusters() {
    let tmp = TempDir::new().unwrap();
    let p = |n: &str| tmp.path().join(n);
    for (i, shape) in shapes().iter().enumerate() {
        let what = shape.name;
        let raw = p(&format!("disk{i}.raw"));
        std::fs::write(&raw, &shape.disk).unwrap();
        let layout = LayoutDir::new(&p(&format!("layout{i}")));
        layout.put_image(Some("v1"), &raw_image(&shape.disk, shape.part));
        let source = layout.source("v1");

        let out_file = p(&format!("out{i}.qcow2"));
        let out = run(&[
            "get",
            "-q",
            "--format",
            "qcow2",
            &source,
            "-o",
            out_file.to_str().unwrap(),
        ]);
        succeeded(&out, what);
        assert_valid_qcow2(&raw, &out_file, what);
        let image = std::fs::read(&out_file).unwrap();
        assert_eq!(&image[..4], QCOW2_MAGIC, "{what}");

        // Zero clusters take no room: the image is its metadata (a few
        // clusters for disks this small) and the clusters that hold data.
        let meta = image.len() as u64 - data_clusters(&shape.disk) * CLUSTER as u64;
        assert!(
            meta <= 8 * CLUSTER as u64,
            "{what}: {meta} bytes beyond the data clusters"
        );
        // qemu-img's own conversion of the raw disk takes no fewer clusters
        // (it ends its file with its last table, not with a whole cluster).
        let theirs = p(&format!("theirs{i}.qcow2"));
        let conv = qemu_img(&[
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            raw.to_str().unwrap(),
            theirs.to_str().unwrap(),
        ]);
        succeeded(&conv, what);
        let their_len = std::fs::metadata(&theirs).unwrap().len();
        let their_clusters = their_len.div_ceil(CLUSTER as u64);
        assert!(
            image.len() as u64 <= their_clusters * CLUSTER as u64,
            "{what}: {} bytes, qemu-img's {their_len}",
            image.len()
        );
        // The same bytes through a pipe (splice), through the portable
        // read/write path, and unverified.
        let piped = run(&["get", "-q", "--format", "qcow2", &source]);
        succeeded(&piped, what);
        assert!(piped.stdout == image, "{what}: through a pipe");
        let rw = bin()
            .args(["get", "-q", "--format", "qcow2", &source])
            .env("CLOUDIMG_IO", "readwrite")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        succeeded(&rw, what);
        assert!(rw.stdout == image, "{what}: read/write path");
        let unverified = run(&["get", "-q", "--no-verify", "--format", "qcow2", &source]);
        succeeded(&unverified, what);
        assert!(unverified.stdout == image, "{what}: --no-verify");
        // auto and raw keep the raw bytes.
        for format in ["auto", "raw"] {
            let out = run(&["get", "-q", "--format", format, &source]);
            succeeded(&out, what);
            assert!(out.stdout == shape.disk, "{what}: --format {format}");
        }
    }
}

#[test]
fn raw_shapes_from_a_registry_become_valid_qcow2_with_every_cluster_allocated() {
    let tmp = TempDir::new().unwrap();
    let reg = Registry::start();
    for (i, shape) in shapes().iter().enumerate() {
        let what = shape.name;
        let raw = tmp.path().join(format!("disk{i}.raw"));
        std::fs::write(&raw, &shape.disk).unwrap();
        reg.push_image(
            &format!("raw{i}"),
            "v1",
            &raw_image(&shape.disk, shape.part),
        );
        let source = format!("{}/raw{i}:v1", reg.host());
        for connections in ["1", "3"] {
            let out_file = tmp.path().join(format!("out{i}-{connections}.qcow2"));
            let out = bin()
                .args([
                    "get",
                    "-q",
                    "--format",
                    "qcow2",
                    "--connections",
                    connections,
                ])
                .args([source.as_str(), "-o", out_file.to_str().unwrap()])
                .env("DOCKER_CONFIG", "/nonexistent")
                .env("CLOUDIMG_CHUNK_SIZE", "65536")
                .stdin(Stdio::null())
                .output()
                .unwrap();
            succeeded(&out, what);
            assert_valid_qcow2(&raw, &out_file, what);
            // Read once, as it arrives: every cluster is allocated.
            let len = std::fs::metadata(&out_file).unwrap().len();
            let clusters = shape.disk.len().div_ceil(CLUSTER) as u64;
            assert!(len >= clusters * CLUSTER as u64, "{what}: {len} bytes");
            assert!(
                len <= (clusters + 8) * CLUSTER as u64,
                "{what}: {len} bytes"
            );
        }
    }
}

#[test]
fn a_sparse_disk_above_4_gib_from_a_layout() {
    // 5 GiB and 777 bytes in two sparse blob files. Data at the start,
    // across 4 GiB (where 32-bit offsets wrap), across the part boundary
    // and at the very end.
    let tmp = TempDir::new().unwrap();
    let size: u64 = (5 << 30) + 777;
    let split: u64 = (3 << 30) + 5;
    let writes: [(u64, usize); 4] = [
        (0, 3 * CLUSTER),
        ((4 << 30) - 10_000, 20_000),
        (split - 1000, 5000),
        (size - 100, 100),
    ];
    let raw = tmp.path().join("disk.raw");
    let sparse = |path: &Path, from: u64, len: u64| {
        let f = std::fs::File::create(path).unwrap();
        f.set_len(len).unwrap();
        for (i, &(at, n)) in writes.iter().enumerate() {
            let bytes = noise(n, 40 + i as u64);
            let (a, b) = (at.max(from), (at + n as u64).min(from + len));
            if a < b {
                let slice = &bytes[(a - at) as usize..(b - at) as usize];
                f.write_all_at(slice, a - from).unwrap();
            }
        }
    };
    sparse(&raw, 0, size);
    let layout = LayoutDir::new(&tmp.path().join("layout"));
    let mut layers = Vec::new();
    for (i, (from, len)) in [(0, split), (split, size - split)].into_iter().enumerate() {
        let part = tmp.path().join(format!("part{i}"));
        sparse(&part, from, len);
        // Unoptimized sha2 would take minutes over 5 GiB: debug builds run
        // unverified with stand-in digests (the layout of the image is what
        // this test is about); `cargo test --release` verifies real ones.
        let digest = if cfg!(debug_assertions) {
            format!("sha256:{i:064x}")
        } else {
            let sum = Command::new("sha256sum").arg(&part).output().unwrap();
            format!("sha256:{}", &String::from_utf8_lossy(&sum.stdout)[..64])
        };
        std::fs::rename(&part, layout.blob_path(&digest)).unwrap();
        layers.push(serde_json::json!({
            "mediaType": RAW_PART, "digest": digest, "size": len,
            "annotations": {"org.opencontainers.image.title": format!("disk.{i:02}.raw.part")},
        }));
    }
    let config = layout.put_blob(b"{}");
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "artifactType": OS_IMAGE,
        "config": {"mediaType": EMPTY_CONFIG, "digest": config, "size": 2},
        "layers": layers,
    });
    layout.put_manifest_bytes(
        Some("v1"),
        &serde_json::to_vec(&manifest).unwrap(),
        "application/vnd.oci.image.manifest.v1+json",
    );
    let out_file = tmp.path().join("out.qcow2");
    let mut args = vec!["get", "-q", "--format", "qcow2"];
    if cfg!(debug_assertions) {
        args.push("--no-verify");
    }
    let source = layout.source("v1");
    args.extend([source.as_str(), "-o", out_file.to_str().unwrap()]);
    let out = run(&args);
    succeeded(&out, "5 GiB");
    assert_valid_qcow2(&raw, &out_file, "5 GiB");
    // Data in 8 clusters (3 at the start, 2 across 4 GiB, 2 across the part
    // boundary, 1 at the end); metadata: header, refcount table and block,
    // L1, and the 6 L2 tables that map them.
    let len = std::fs::metadata(&out_file).unwrap().len();
    assert_eq!(len, 18 * CLUSTER as u64);
}

#[test]
fn format_raw_of_a_qcow2_image_is_refused_with_a_hint() {
    let tmp = TempDir::new().unwrap();
    let layout = LayoutDir::new(&tmp.path().join("layout"));
    layout.put_image(Some("v1"), &Image::split(&data(3000, 7), 1000));
    let target = tmp.path().join("out.raw");
    let out = run(&[
        "get",
        "--format",
        "raw",
        &layout.source("v1"),
        "-o",
        target.to_str().unwrap(),
    ]);
    let line = failure(&out);
    assert!(line.contains("qemu-img convert"), "{line}");
    assert!(
        names(tmp.path()).keys().all(|n| n == "layout"),
        "{:?}",
        names(tmp.path())
    );
    // An unknown format is a usage error.
    let out = run(&["get", "--format", "vmdk", &layout.source("v1")]);
    assert_eq!(out.status.code(), Some(2));
}

/// The metadata of `layout` in a file of the image's length (its data
/// clusters are holes: zeros), checked by qemu-img.
fn check_metadata(layout: &cloudimg::qcow2::Layout, what: &str) {
    use std::io::Write;
    let tmp = TempDir::new().unwrap();
    let path = tmp.path().join("disk.qcow2");
    let mut out = std::fs::File::create(&path).unwrap();
    layout
        .write_prefix(&mut |b| {
            out.write_all(b).unwrap();
            Ok(())
        })
        .unwrap();
    out.set_len(layout.file_len()).unwrap();
    let check = qemu_img(&["check", "-f", "qcow2", path.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&check.stdout).into_owned()
        + &String::from_utf8_lossy(&check.stderr);
    assert!(
        check.status.success() && text.contains("No errors were found") && !text.contains("leak"),
        "{what}: {text}"
    );
}

#[test]
fn large_layouts_pass_qemu_img_check() {
    use cloudimg::qcow2::{ClusterMap, Layout};
    let c = CLUSTER as u64;
    // Dense 5 GiB, as from a registry: three refcount blocks.
    check_metadata(&Layout::dense(5 << 30).unwrap(), "dense 5 GiB");
    // 5 TiB virtual with data at both ends: an L1 table of two clusters.
    let size = (5u64 << 40) + 512;
    let clusters = size.div_ceil(c);
    let mut map = ClusterMap::empty(clusters);
    map.set(0);
    map.set(clusters - 1);
    check_metadata(&Layout::new(size, map).unwrap(), "sparse 5 TiB");
}

// A local user flips the one 4 KiB block of data in a cluster between zeros
// and its bytes, every 200 µs — so the zero scan may find the cluster empty
// and leave it out — while `get --format qcow2` streams the blob. A success must still be an image of the original disk
// (the cluster may or may not be allocated, depending on what the scan
// saw): the blob was leased before the scan (a writer breaks the lease), or
// its bytes pass through a buffer where the ones left out are checked for
// zeros as they are hashed.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Flip the 4 KiB at `at` of `path` between zeros and `original` until
/// `stop`, then put `original` back; `hold`: one fd open for writing
/// throughout (no lease can be had), else a new open for every flip (each
/// breaks a lease).
fn flipper(
    path: &Path,
    at: u64,
    original: Vec<u8>,
    hold: bool,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    let path = path.to_owned();
    let open = move || std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    let held = hold.then(&open);
    std::thread::spawn(move || {
        let zeros = vec![0u8; original.len()];
        let mut flip = false;
        while !stop.load(Ordering::Relaxed) {
            let bytes = if flip { &original } else { &zeros };
            match &held {
                Some(f) => f.write_all_at(bytes, at).unwrap(),
                None => open().write_all_at(bytes, at).unwrap(),
            }
            flip = !flip;
            std::thread::sleep(Duration::from_micros(200));
        }
        open().write_all_at(&original, at).unwrap();
    })
}

#[test]
fn a_blob_flipping_between_zeros_and_data_never_yields_a_verified_wrong_image() {
    let tmp = TempDir::new().unwrap();
    // 16 MiB: data, zeros with one 4 KiB block of data amid them, data; one
    // part.
    let block = 8 * MIB + 12_288;
    let disk = zeros_with(
        16 * MIB,
        &[(0, 4 * MIB), (block, 4096), (12 * MIB, 4 * MIB)],
        60,
    );
    let layout = LayoutDir::new(&tmp.path().join("layout"));
    layout.put_image(Some("v1"), &raw_image(&disk, disk.len()));
    let blob = layout.blob_path(&sha256(&disk));
    let source = layout.source("v1");
    let raw = tmp.path().join("disk.raw");
    std::fs::write(&raw, &disk).unwrap();
    let target = tmp.path().join("out.qcow2");
    let piped = tmp.path().join("piped.qcow2");
    let mut ok = 0;
    for hold in [true, false] {
        for to_file in [true, false] {
            for round in 0..8 {
                let what = format!("hold={hold} to_file={to_file} round {round}");
                let stop = Arc::new(AtomicBool::new(false));
                let original = disk[block..block + 4096].to_vec();
                let writer = flipper(&blob, block as u64, original, hold, Arc::clone(&stop));
                std::thread::sleep(Duration::from_millis(2));
                let mut args = vec!["get", "-q", "--format", "qcow2", source.as_str()];
                if to_file {
                    args.extend(["-o", target.to_str().unwrap()]);
                }
                let out = run(&args);
                stop.store(true, Ordering::Relaxed);
                writer.join().unwrap();
                if out.status.success() {
                    if !to_file {
                        std::fs::write(&piped, &out.stdout).unwrap();
                    }
                    let got = if to_file { &target } else { &piped };
                    assert_valid_qcow2(&raw, got, &what);
                    ok += 1;
                } else {
                    let line = failure(&out);
                    assert!(
                        line.contains("digest mismatch")
                            || line.contains("opened for writing")
                            || line.contains("changed while it was streamed"),
                        "{what}: {line}"
                    );
                    assert!(!target.exists(), "{what}: {line}");
                }
                let _ = std::fs::remove_file(&target);
            }
        }
    }
    println!("{ok} of 32 runs succeeded");
}
