//! Interoperability with the OCI tools users already have: layouts, archives
//! and references as skopeo, umoci, containerd and the ORAS SDK write them.
//! Real tools are used where they are installed in CI (skopeo and umoci are
//! Debian packages, see `.ci/run`); shapes of tools that cannot be installed
//! here (containerd's `ctr images export`, the ORAS Python SDK) are written by
//! hand, and each such fixture says so.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};

use common::*;
use serde_json::{Value, json};
use tempfile::TempDir;

fn skopeo(args: &[&str]) {
    // No policy file is needed to copy between local layouts with this one.
    let mut all = vec!["--insecure-policy"];
    all.extend_from_slice(args);
    tool("skopeo", &all, "skopeo");
}

fn ok(out: &std::process::Output) -> &[u8] {
    assert!(
        out.status.success(),
        "exit {:?}: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    &out.stdout
}

/// A small split cloud image in a layout at `dir`, tagged `tag`.
fn cloud_layout(dir: &Path, tag: &str, seed: u64) -> (LayoutDir, Image, String) {
    let layout = LayoutDir::new(dir);
    let image = Image::split(&data(5000, seed), 1500);
    let digest = layout.put_image(Some(tag), &image);
    (layout, image, digest)
}

fn index_json(dir: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(dir.join("index.json")).unwrap()).unwrap()
}

// ---- 2. oci:PATH[:REF] splits at the first colon, as skopeo does ----

#[test]
fn skopeo_full_names_are_selectable_refs() {
    let tmp = TempDir::new().unwrap();
    let (src, image, _) = cloud_layout(&tmp.path().join("src"), "v1", 1);
    let dst = tmp.path().join("dst");
    let name = "127.0.0.1:5101/team/img:v1";
    // skopeo writes the whole name as org.opencontainers.image.ref.name.
    skopeo(&[
        "copy",
        &src.source("v1"),
        &format!("oci:{}:{name}", dst.display()),
    ]);
    assert_eq!(
        index_json(&dst)["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"],
        name
    );
    let out = run(&["get", "-q", &format!("oci:{}:{name}", dst.display())]);
    assert!(ok(&out) == expected_disk(&image));
    // A tag with slashes and no colon.
    skopeo(&[
        "copy",
        &src.source("v1"),
        &format!("oci:{}:team/img", dst.display()),
    ]);
    let out = run(&["get", "-q", &format!("oci:{}:team/img", dst.display())]);
    assert!(ok(&out) == expected_disk(&image));
    // And what skopeo reads back under the same spelling is the same manifest.
    let ours = run(&[
        "inspect",
        "--json",
        &format!("oci:{}:{name}", dst.display()),
    ]);
    let ours: Value = serde_json::from_slice(ok(&ours)).unwrap();
    let theirs = Command::new("skopeo")
        .args(["inspect", "--raw", &format!("oci:{}:{name}", dst.display())])
        .output()
        .unwrap();
    assert!(theirs.status.success());
    assert_eq!(ours["digest"], sha256(&theirs.stdout));
    assert_eq!(ours["size"], theirs.stdout.len());
}

#[test]
fn a_directory_with_a_colon_is_reached_by_symlink_or_relative_path() {
    let tmp = TempDir::new().unwrap();
    let colon = tmp.path().join("a:b");
    let (_layout, image, _) = cloud_layout(&colon, "v1", 2);
    // Spelled with the colon, PATH is ".../a" and the ref "b:v1": the error
    // says that ".../a:b:v1" is there after all, and how to reach it.
    let line = failure(&run(&["get", "-q", &format!("oci:{}:v1", colon.display())]));
    assert!(
        line.contains("exists") && line.contains("first colon") && line.contains("symlink"),
        "{line}"
    );
    // Through a symlink.
    let link = tmp.path().join("ab");
    std::os::unix::fs::symlink(&colon, &link).unwrap();
    let out = run(&["get", "-q", &format!("oci:{}:v1", link.display())]);
    assert!(ok(&out) == expected_disk(&image));
    // By a relative path from inside it.
    let out = bin()
        .args(["get", "-q", "oci:.:v1"])
        .current_dir(&colon)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(ok(&out) == expected_disk(&image));
    // A layout one level below the colon: relative to the colon directory.
    let (_inner, image2, _) = cloud_layout(&tmp.path().join("c:d/img"), "v2", 3);
    let out = bin()
        .args(["get", "-q", "oci:img:v2"])
        .current_dir(tmp.path().join("c:d"))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(ok(&out) == expected_disk(&image2));
    // --help says how.
    let help = run(&["--help"]);
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(
        help.contains("first colon") && help.contains("symlink"),
        "{help}"
    );
}

// ---- 5. a tag on several manifests; containerd's image name ----

/// The shape `ctr images export` writes, by hand (containerd cannot run
/// here): the image's index and its manifest both listed in index.json, both
/// named by the tag and by containerd's full image name.
fn ctr_shaped_export(dir: &Path, image: &Image) -> (LayoutDir, String, String) {
    let layout = LayoutDir::new(dir);
    let manifest = layout.put_image(None, image);
    let manifest_size = std::fs::metadata(layout.blob_path(&manifest))
        .unwrap()
        .len();
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest,
            "size": manifest_size,
            "platform": {"os": "linux", "architecture": "amd64"},
        }],
    }))
    .unwrap();
    let index_digest = layout.put_blob(&index);
    let names = json!({
        "io.containerd.image.name": "docker.io/team/img:v1",
        "org.opencontainers.image.ref.name": "v1",
    });
    let entries = json!([
        {"mediaType": "application/vnd.oci.image.index.v1+json", "digest": index_digest,
         "size": index.len(), "annotations": names},
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": manifest,
         "size": manifest_size, "annotations": names},
    ]);
    std::fs::write(
        dir.join("index.json"),
        serde_json::to_vec(&json!({"schemaVersion": 2, "manifests": entries})).unwrap(),
    )
    .unwrap();
    (layout, index_digest, manifest)
}

#[test]
fn a_tag_on_several_manifests_lists_them_and_asks_for_a_digest() {
    let tmp = TempDir::new().unwrap();
    let image = Image::split(&data(4000, 4), 1000);
    let dir = tmp.path().join("export");
    let (_layout, index, manifest) = ctr_shaped_export(&dir, &image);
    for src in [
        format!("oci:{}:v1", dir.display()),
        format!("oci:{}:docker.io/team/img:v1", dir.display()),
    ] {
        let line = failure(&run(&["get", "-q", &src]));
        assert!(
            line.contains(&index)
                && line.contains(&manifest)
                && line.contains("application/vnd.oci.image.index.v1+json")
                && line.contains("application/vnd.oci.image.manifest.v1+json")
                && line.contains(&format!("oci:{}@DIGEST", dir.display())),
            "{line}"
        );
        assert!(!failure(&run(&["inspect", &src])).is_empty());
    }
    // Either candidate, picked by digest, gives the disk.
    for d in [&index, &manifest] {
        let out = run(&["get", "-q", &format!("oci:{}@{d}", dir.display())]);
        assert!(ok(&out) == expected_disk(&image));
    }
}

#[test]
fn containerd_image_names_select_manifests() {
    let tmp = TempDir::new().unwrap();
    let image = Image::split(&data(4000, 5), 1000);
    // Hand-written, as ctr names an image: only io.containerd.image.name.
    let layout = LayoutDir::new(&tmp.path().join("l"));
    let digest = layout.put_image(None, &image);
    let mut idx = index_json(&layout.dir);
    idx["manifests"][0]["annotations"] =
        json!({"io.containerd.image.name": "docker.io/team/img:v1"});
    std::fs::write(layout.dir.join("index.json"), idx.to_string()).unwrap();
    let src = format!("oci:{}:docker.io/team/img:v1", layout.dir.display());
    let out = run(&["get", "-q", &src]);
    assert!(ok(&out) == expected_disk(&image));
    // The same manifest listed twice under one name is one candidate.
    let mut idx = index_json(&layout.dir);
    let entry = idx["manifests"][0].clone();
    idx["manifests"].as_array_mut().unwrap().push(entry);
    std::fs::write(layout.dir.join("index.json"), idx.to_string()).unwrap();
    let out = run(&["inspect", "--json", &src]);
    let r: Value = serde_json::from_slice(ok(&out)).unwrap();
    assert_eq!(r["digest"], digest.as_str());
    // An unknown name lists the names there are.
    let line = failure(&run(&[
        "get",
        &format!("oci:{}:nope", layout.dir.display()),
    ]));
    assert!(line.contains("docker.io/team/img:v1"), "{line}");
}

// ---- 4. classification beyond epoch's, still safe; indexes as tools write them ----

/// The OCI 1.0 artifact convention, as older oras releases and the ORAS
/// Python SDK write it (written by hand: the SDK is not installable here):
/// no artifactType, the type in config.mediaType.
#[test]
fn oci_1_0_artifacts_with_the_type_in_the_config_are_cloud_images() {
    let tmp = TempDir::new().unwrap();
    let layout = LayoutDir::new(&tmp.path().join("l"));
    let mut image = Image::split(&data(4000, 6), 1500);
    image.artifact_type = None;
    image.config_media_type = OS_IMAGE.to_owned();
    layout.put_image(Some("v1"), &image);
    let out = run(&["get", "-q", &layout.source("v1")]);
    assert!(ok(&out) == expected_disk(&image));
    let out = run(&["inspect", &layout.source("v1")]);
    let text = String::from_utf8_lossy(ok(&out)).into_owned();
    assert!(
        text.contains(&format!("config type:    {OS_IMAGE}")),
        "{text}"
    );
    assert!(text.contains("kind:           cloud-image"), "{text}");
    // The windows-image type too; another artifactType still decides.
    let mut win = image.clone();
    win.config_media_type = "application/vnd.cocoonstack.windows-image.v1+json".to_owned();
    layout.put_image(Some("win"), &win);
    assert!(ok(&run(&["get", "-q", &layout.source("win")])) == expected_disk(&image));
    let mut other = image.clone();
    other.artifact_type = Some("application/x-other".to_owned());
    layout.put_image(Some("other"), &other);
    let line = failure(&run(&["get", "-q", &layout.source("other")]));
    assert!(line.contains("is an unknown kind of artifact"), "{line}");
}

#[test]
fn umoci_container_images_are_named_as_such() {
    let tmp = TempDir::new().unwrap();
    let dir = tmp.path().join("um");
    let d = dir.to_str().unwrap();
    tool("umoci", &["init", "--layout", d], "umoci");
    tool("umoci", &["new", "--image", &format!("{d}:v1")], "umoci");
    let line = failure(&run(&["get", "-q", &format!("oci:{d}:v1")]));
    assert!(line.contains("is a container image"), "{line}");
    let out = run(&["inspect", &format!("oci:{d}:v1")]);
    let text = String::from_utf8_lossy(ok(&out)).into_owned();
    assert!(
        text.contains("config type:    application/vnd.oci.image.config.v1+json"),
        "{text}"
    );
}

/// Puts an index of `entries` (descriptor JSON) into the layout's blobs.
fn put_index(layout: &LayoutDir, entries: Value, media_type: bool) -> (String, usize) {
    let mut ix = json!({"schemaVersion": 2, "manifests": entries});
    if media_type {
        ix["mediaType"] = json!("application/vnd.oci.image.index.v1+json");
    }
    let bytes = serde_json::to_vec(&ix).unwrap();
    (layout.put_blob(&bytes), bytes.len())
}

fn manifest_entry(layout: &LayoutDir, digest: &str, platform: Option<(&str, &str)>) -> Value {
    let size = std::fs::metadata(layout.blob_path(digest)).unwrap().len();
    let mut e = json!({"mediaType": "application/vnd.oci.image.manifest.v1+json",
                       "digest": digest, "size": size});
    if let Some((os, arch)) = platform {
        e["platform"] = json!({"os": os, "architecture": arch});
    }
    e
}

/// Indexes as tools write them, by hand: a single-entry index without a
/// platform around a platform index (oras and buildx write such wrappers),
/// an index without its mediaType field (skopeo leaves it out of
/// index.json), and nesting deeper than cloudimg follows.
#[test]
fn nested_and_single_entry_indexes_resolve_and_inspect_lists_platforms() {
    let tmp = TempDir::new().unwrap();
    let layout = LayoutDir::new(&tmp.path().join("l"));
    let amd = Image::split(&data(3000, 7), 1000);
    let arm = Image::split(&data(3000, 8), 1000);
    let amd_d = layout.put_image(None, &amd);
    let arm_d = layout.put_image(None, &arm);
    // Reset index.json: only what the test puts there.
    std::fs::write(
        layout.dir.join("index.json"),
        r#"{"schemaVersion":2,"manifests":[]}"#,
    )
    .unwrap();
    let (platforms, psize) = put_index(
        &layout,
        json!([
            manifest_entry(&layout, &arm_d, Some(("linux", "arm64"))),
            manifest_entry(&layout, &amd_d, Some(("linux", "amd64"))),
        ]),
        false,
    );
    let (outer, _) = put_index(
        &layout,
        json!([{"mediaType": "application/vnd.oci.image.index.v1+json",
                "digest": platforms, "size": psize}]),
        true,
    );
    let outer_bytes = std::fs::read(layout.blob_path(&outer)).unwrap();
    layout.put_manifest_bytes(
        Some("v1"),
        &outer_bytes,
        "application/vnd.oci.image.index.v1+json",
    );
    for (platform, image, digest) in [("linux/amd64", &amd, &amd_d), ("linux/arm64", &arm, &arm_d)]
    {
        let src = layout.source("v1");
        let out = run(&["get", "-q", &src, "--platform", platform]);
        assert!(ok(&out) == expected_disk(image), "{platform}");
        let out = run(&["inspect", &src, "--platform", platform]);
        let text = String::from_utf8_lossy(ok(&out)).into_owned();
        // Both levels, every platform offered, the chosen one marked.
        assert!(text.contains(&format!("index:          {outer}")), "{text}");
        assert!(
            text.contains(&format!("index:          {platforms}")),
            "{text}"
        );
        assert!(text.contains("chose its only entry"), "{text}");
        assert!(text.contains(&format!("chose {platform}")), "{text}");
        assert!(
            text.contains("linux/arm64") && text.contains("linux/amd64"),
            "{text}"
        );
        assert!(
            text.contains(&format!(
                "{digest}  application/vnd.oci.image.manifest.v1+json  <- chosen"
            )),
            "{text}"
        );
        let out = run(&["inspect", "--json", &src, "--platform", platform]);
        let r: Value = serde_json::from_slice(ok(&out)).unwrap();
        assert_eq!(r["index"].as_array().unwrap().len(), 2);
        assert_eq!(r["index"][1]["chosen"], digest.as_str());
        assert_eq!(r["index"][1]["manifests"].as_array().unwrap().len(), 2);
        assert_eq!(r["digest"], digest.as_str());
        assert_eq!(
            r["size"],
            std::fs::metadata(layout.blob_path(digest)).unwrap().len()
        );
    }
    // A platform the index lacks names what it has.
    let line = failure(&run(&[
        "get",
        "-q",
        &layout.source("v1"),
        "--platform",
        "linux/s390x",
    ]));
    assert!(line.contains("linux/arm64, linux/amd64"), "{line}");
    // Nesting past the limit is refused, not followed forever.
    let mut inner = (outer.clone(), outer_bytes.len());
    for _ in 0..4 {
        inner = put_index(
            &layout,
            json!([{"mediaType": "application/vnd.oci.image.index.v1+json",
                    "digest": inner.0, "size": inner.1}]),
            true,
        );
    }
    let deep = std::fs::read(layout.blob_path(&inner.0)).unwrap();
    layout.put_manifest_bytes(
        Some("deep"),
        &deep,
        "application/vnd.oci.image.index.v1+json",
    );
    let line = failure(&run(&["get", "-q", &layout.source("deep")]));
    assert!(line.contains("nest more than 4 deep"), "{line}");
}

// ---- 3. oci-archive:FILE[:REF], read in place ----

#[test]
fn skopeo_oci_archives_are_read_in_place() {
    let tmp = TempDir::new().unwrap();
    let (src, image, digest) = cloud_layout(&tmp.path().join("src"), "v1", 9);
    let tar = tmp.path().join("img.tar");
    let name = "127.0.0.1:5101/team/img:v1";
    skopeo(&[
        "copy",
        &src.source("v1"),
        &format!("oci-archive:{}:{name}", tar.display()),
    ]);
    let src_ref = format!("oci-archive:{}:{name}", tar.display());
    let out = run(&["get", "-q", &src_ref]);
    assert!(ok(&out) == expected_disk(&image));
    let out = run(&["inspect", "--json", &src_ref]);
    let r: Value = serde_json::from_slice(ok(&out)).unwrap();
    assert_eq!(r["digest"], digest.as_str());
    // By digest, and into a file.
    let dst = tmp.path().join("out.disk");
    ok(&run(&[
        "get",
        "-q",
        &format!("oci-archive:{}@{digest}", tar.display()),
        "-o",
        dst.to_str().unwrap(),
    ]));
    assert!(std::fs::read(&dst).unwrap() == expected_disk(&image));
    // Nothing was unpacked beside the archive.
    assert_eq!(
        names(tmp.path()).keys().cloned().collect::<Vec<_>>(),
        ["img.tar", "out.disk", "src"]
    );
}

#[test]
fn archive_blobs_move_through_the_kernel_as_ranges_of_the_tar() {
    let tmp = TempDir::new().unwrap();
    let layout = LayoutDir::new(&tmp.path().join("src"));
    let image = Image::split(&data(3 << 20, 10), 1 << 20);
    layout.put_image(Some("v1"), &image);
    let tar = tmp.path().join("img.tar");
    skopeo(&[
        "copy",
        &layout.source("v1"),
        &format!("oci-archive:{}:v1", tar.display()),
    ]);
    // Into a file, verified: copy_file_range from an input offset inside
    // the tar. Into a pipe, unverified: splice, likewise. The bytes never
    // pass through a buffer of ours. (A verified blob enters a pipe as a
    // copy: its reader could pass page references on.)
    let reference = format!("oci-archive:{}:v1", tar.display());
    let dst = tmp.path().join("out.disk");
    let cases: [(&str, &[&str]); 2] = [
        ("copy_file_range", &["-o", dst.to_str().unwrap()]),
        ("splice", &["--no-verify"]),
    ];
    for (call, args) in cases {
        let trace_file = tmp.path().join(format!("{call}.trace"));
        let out = Command::new("strace")
            .args(["-f", "-e", &format!("trace={call}"), "-o"])
            .arg(&trace_file)
            .arg(env!("CARGO_BIN_EXE_cloudimg"))
            .args(["get", "-q", &reference])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("strace must be installed (Debian: strace)");
        let got = ok(&out);
        let got = if call == "splice" {
            got.to_vec()
        } else {
            std::fs::read(&dst).unwrap()
        };
        assert!(got == expected_disk(&image), "{call}");
        let trace = std::fs::read_to_string(&trace_file).unwrap();
        let from_offsets = trace
            .lines()
            .filter(|l| l.contains(&format!("{call}(")) && l.contains(", ["))
            .count();
        assert!(from_offsets >= 3, "{call}: {trace}");
    }
}

#[test]
fn gnu_and_pax_tars_of_a_layout_read_and_damage_is_caught() {
    let tmp = TempDir::new().unwrap();
    let (layout, image, digest) = cloud_layout(&tmp.path().join("l"), "v1", 11);
    // GNU tar writes "./" names, GNU or pax headers.
    for format in ["gnu", "posix", "ustar"] {
        let tar = tmp.path().join(format!("{format}.tar"));
        tool(
            "tar",
            &[
                "-C",
                layout.dir.to_str().unwrap(),
                &format!("--format={format}"),
                "-cf",
                tar.to_str().unwrap(),
                ".",
            ],
            "tar",
        );
        let out = run(&["get", "-q", &format!("oci-archive:{}:v1", tar.display())]);
        assert!(ok(&out) == expected_disk(&image), "{format}");
    }
    // A blob damaged inside the tar fails its digest, naming the layer.
    let tar = tmp.path().join("posix.tar");
    let mut bytes = std::fs::read(&tar).unwrap();
    let part = &image.layers[0].data;
    let at = bytes
        .windows(64)
        .position(|w| w == &part[..64])
        .expect("the part is in the tar");
    bytes[at + 100] ^= 1;
    std::fs::write(&tar, &bytes).unwrap();
    let line = failure(&run(&[
        "get",
        "-q",
        &format!("oci-archive:{}:v1", tar.display()),
    ]));
    assert!(line.contains("digest mismatch"), "{line}");
    // A truncated tar, a file that is no tar, a directory, a layout given
    // as oci-archive: each one clear line.
    let gnu = std::fs::read(tmp.path().join("gnu.tar")).unwrap();
    let inside = gnu
        .windows(64)
        .position(|w| w == &part[..64])
        .expect("the part is in the tar");
    std::fs::write(tmp.path().join("cut.tar"), &gnu[..inside + 10]).unwrap();
    let line = failure(&run(&[
        "inspect",
        &format!("oci-archive:{}:v1", tmp.path().join("cut.tar").display()),
    ]));
    assert!(line.contains("runs past the end"), "{line}");
    std::fs::write(tmp.path().join("junk.tar"), vec![b'x'; 2048]).unwrap();
    let line = failure(&run(&[
        "inspect",
        &format!("oci-archive:{}", tmp.path().join("junk.tar").display()),
    ]));
    assert!(line.contains("not a usable tar archive"), "{line}");
    let line = failure(&run(&[
        "inspect",
        &format!("oci-archive:{}", layout.dir.display()),
    ]));
    assert!(line.contains("oci:DIR"), "{line}");
    let line = failure(&run(&[
        "inspect",
        &format!("oci:{}", tmp.path().join("gnu.tar").display()),
    ]));
    assert!(line.contains("oci-archive:FILE"), "{line}");
    let _ = digest;
}

// ---- 1. every example of --help and of README's usage block runs ----

/// The example command lines of `cloudimg --help` and of README's usage block.
fn documented_examples() -> Vec<String> {
    let help = run(&["--help"]);
    let help = String::from_utf8(ok(&help).to_vec()).unwrap();
    let mut lines: Vec<String> = help
        .lines()
        .skip_while(|l| !l.starts_with("Examples:"))
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .map(|l| l.trim().to_owned())
        .collect();
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let usage = &readme[readme.find("## Usage").unwrap()..];
    let block = &usage[usage.find("```sh\n").unwrap() + 6..];
    let block = &block[..block.find("```").unwrap()];
    lines.extend(block.lines().map(str::to_owned));
    lines
}

#[test]
fn every_help_and_readme_example_runs() {
    let tmp = TempDir::new().unwrap();
    let cwd = tmp.path();
    // A real (empty) qcow2, split the publisher's way: ./win11, tag 25h2.
    let qcow2 = cwd.join("d.qcow2");
    tool(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            qcow2.to_str().unwrap(),
            "16M",
        ],
        "qemu-utils",
    );
    let disk = std::fs::read(&qcow2).unwrap();
    std::fs::remove_file(&qcow2).unwrap();
    let win11 = Image::split(&disk, 70_000);
    let win11_layout = LayoutDir::new(&cwd.join("win11"));
    win11_layout.put_image(Some("25h2"), &win11);
    // A raw disk: ./debian, tag 12.
    let raw = noise(300_000, 21);
    let mut debian = Image::split(&raw, 100_000);
    for l in &mut debian.layers {
        if l.media_type == QCOW2_PART {
            l.media_type = "application/vnd.cocoonstack.disk.raw.part".to_owned();
        }
    }
    LayoutDir::new(&cwd.join("debian")).put_image(Some("12"), &debian);
    skopeo(&[
        "copy",
        &format!("oci:{}:25h2", cwd.join("win11").display()),
        &format!("oci-archive:{}:25h2", cwd.join("win11.tar").display()),
    ]);
    // The registry examples: a local registry stands for every host.
    let reg = common::registry::Registry::start();
    reg.push_image("windows/win11", "25h2", &win11);
    let (img_digest, _) = reg.push_image("img", "v1", &win11);
    let arm = Image::split(&disk, 50_000);
    let amd = Image::split(&data(1000, 22), 500);
    for repo in ["org/ubuntu", "org/img"] {
        let a = reg.push_image(repo, "arm64", &arm);
        let b = reg.push_image(repo, "amd64", &amd);
        let tag = if repo == "org/ubuntu" { "24.04" } else { "v1" };
        reg.push_index(
            repo,
            tag,
            &[(a.0, a.1, "linux", "arm64"), (b.0, b.1, "linux", "amd64")],
        );
    }
    let bin_dir = cwd.join("bin");
    std::fs::create_dir(&bin_dir).unwrap();
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_cloudimg"), bin_dir.join("cloudimg")).unwrap();
    let store = cwd.join("store");
    std::fs::create_dir(&store).unwrap();

    let examples = documented_examples();
    assert!(examples.len() >= 20, "{examples:?}");
    for line in &examples {
        assert!(
            !line.contains("/dev/stdin") && !line.contains("qemu-img dd"),
            "{line}"
        );
        // Placeholders: the registry host, the digest, the device, the remote host.
        let cmd = line
            .replace("ghcr.io", &reg.host())
            .replace("localhost:5000", &reg.host())
            .replace("sha256:…", &img_digest)
            .replace("/dev/sdX", "sdX")
            .replace("ssh host ", "sh -c ");
        let out = Command::new("sh")
            .args(["-c", &cmd])
            .current_dir(cwd)
            .env(
                "PATH",
                format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap()),
            )
            .env("EPOCH_SERVER", reg.url())
            .env("EPOCH_COCOON_BINARY", standin())
            .env("COCOON_STANDIN_DIR", &store)
            .env("DOCKER_CONFIG", "/nonexistent")
            .env_remove("CLOUDIMG_IO")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{line}\n  ran as: {cmd}\n  {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // What they made is what they promise.
    let disk_of = |name: &str| std::fs::read(cwd.join(name)).unwrap();
    assert!(disk_of("win11.qcow2") == disk);
    assert!(disk_of("disk.qcow2") == disk);
    assert!(disk_of("sdX") == raw);
    assert!(disk_of("img.qcow2") == disk, "the arm64 entry was chosen");
    assert!(disk_of("ubuntu.qcow2") == disk);
    assert_eq!(disk_of("win11.raw").len(), 16 << 20);
    assert!(
        disk_of("debian.qcow2").starts_with(b"QFI\xfb"),
        "a raw disk as a qcow2"
    );
    for name in ["win11", "win11-test"] {
        assert!(std::fs::read(store.join(name)).unwrap() == disk, "{name}");
    }
    // The copies and the cache are layouts that give the same disks back.
    for (source, want) in [
        ("oci:./images:ubuntu", &disk),
        ("oci:./usb/images:win11-25h2", &disk),
        (
            &format!("oci:./cache:{}/windows/win11:25h2", reg.host()),
            &disk,
        ),
    ] {
        let out = bin()
            .args(["get", "-q", source])
            .current_dir(cwd)
            .output()
            .unwrap();
        assert!(ok(&out) == want.as_slice(), "{source}");
    }
}

// ---- 9. hints where users stumble ----

#[test]
fn docker_prefix_paths_and_version() {
    let tmp = TempDir::new().unwrap();
    let (layout, image, _) = cloud_layout(&tmp.path().join("l"), "v1", 23);
    // docker://REF as skopeo spells it.
    let reg = common::registry::Registry::start();
    reg.push_image("team/img", "v1", &image);
    let out = bin()
        .args(["get", "-q", &format!("docker://{}/team/img:v1", reg.host())])
        .env("DOCKER_CONFIG", "/nonexistent")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(ok(&out) == expected_disk(&image));
    // A bare path to a layout, or to a tar, is pointed to the right form;
    // no registry is asked.
    let dir = layout.dir.display().to_string();
    let line = failure(&run(&["get", "-q", &dir]));
    assert!(line.contains(&format!("say oci:{dir}")), "{line}");
    let tar = tmp.path().join("l.tar");
    std::fs::write(&tar, b"").unwrap();
    let out = bin()
        .args(["inspect", "l.tar"])
        .current_dir(tmp.path())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let line = failure(&out);
    assert!(line.contains("say oci-archive:l.tar"), "{line}");
    let out = bin()
        .args(["inspect", "l"])
        .current_dir(tmp.path())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(failure(&out).contains("say oci:l"));
    // --version: the version and what the build reads.
    let out = run(&["--version"]);
    let text = String::from_utf8_lossy(ok(&out)).into_owned();
    assert!(
        text.starts_with(&format!("cloudimg {}\n", env!("CARGO_PKG_VERSION")))
            && text.contains("oci-archive:")
            && text.contains("rustls"),
        "{text}"
    );
}

// ---- 10. inspect --json speaks OCI's field names ----

#[test]
fn inspect_json_uses_oci_field_names() {
    let tmp = TempDir::new().unwrap();
    let (layout, image, digest) = cloud_layout(&tmp.path().join("l"), "v1", 24);
    let out = run(&["inspect", "--json", &layout.source("v1")]);
    let r: Value = serde_json::from_slice(ok(&out)).unwrap();
    assert_eq!(r["digest"], digest.as_str());
    assert_eq!(r["mediaType"], "application/vnd.oci.image.manifest.v1+json");
    assert_eq!(r["artifactType"], OS_IMAGE);
    assert_eq!(r["config"]["mediaType"], EMPTY_CONFIG);
    assert_eq!(r["annotations"]["cocoonstack.disk.format"], "qcow2");
    assert_eq!(
        r["size"],
        std::fs::metadata(layout.blob_path(&digest)).unwrap().len()
    );
    let first = &r["plan"]["layers"][0];
    assert_eq!(first["mediaType"], QCOW2_PART);
    assert!(first["digest"].is_string() && first["size"].is_u64());
    assert_eq!(r["plan"]["skipped"][0]["mediaType"], "text/plain");
    let text = serde_json::to_string(&r).unwrap();
    assert!(
        !text.contains("media_type") && !text.contains("artifact_type"),
        "{text}"
    );
    let _ = image;
}

// ---- 6. credentials where podman, buildah and skopeo keep them ----

/// A registry (scripted: Debian's docker-registry wants bcrypt for its
/// htpasswd) that answers only `Authorization: Basic` of alice:s3cret, as
/// distribution's htpasswd mode does: `401` with a Basic challenge.
fn basic_registry(image: &Image) -> common::httpd::Server {
    use common::httpd::{Reply, Server};
    use std::collections::HashMap;
    use std::sync::Arc;
    let manifest = serde_json::to_vec(&image.manifest_json()).unwrap();
    let mut blobs: HashMap<String, Arc<Vec<u8>>> = HashMap::new();
    blobs.insert(sha256(b"{}"), Arc::new(b"{}".to_vec()));
    for l in &image.layers {
        blobs.insert(sha256(&l.data), Arc::new(l.data.clone()));
    }
    Server::start(move |req, _| {
        // base64("alice:s3cret")
        if req.header("authorization") != Some("Basic YWxpY2U6czNjcmV0") {
            return Reply::status(401).header("WWW-Authenticate", "Basic realm=\"Registry Realm\"");
        }
        let path = req.path();
        if path.starts_with("/v2/team/img/manifests/") {
            return Reply::bytes(
                200,
                "application/vnd.oci.image.manifest.v1+json",
                manifest.clone(),
            );
        }
        match path
            .strip_prefix("/v2/team/img/blobs/")
            .and_then(|d| blobs.get(d))
        {
            Some(b) => Reply::blob(Arc::clone(b)),
            None => Reply::status(404),
        }
    })
}

/// The homes of credentials: a docker config directory, `XDG_RUNTIME_DIR`
/// and `HOME`, all empty at first.
struct CredentialHomes {
    _tmp: TempDir,
    docker: std::path::PathBuf,
    xdg: std::path::PathBuf,
    home: std::path::PathBuf,
}

impl CredentialHomes {
    fn new() -> CredentialHomes {
        let tmp = TempDir::new().unwrap();
        let [docker, xdg, home] = ["docker", "xdg", "home"].map(|d| tmp.path().join(d));
        for d in [&docker, &xdg, &home] {
            std::fs::create_dir(d).unwrap();
        }
        CredentialHomes {
            _tmp: tmp,
            docker,
            xdg,
            home,
        }
    }

    fn write(&self, path: &Path, json: &Value) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, serde_json::to_vec(json).unwrap()).unwrap();
    }

    fn xdg_file(&self) -> std::path::PathBuf {
        self.xdg.join("containers/auth.json")
    }

    fn home_file(&self) -> std::path::PathBuf {
        self.home.join(".config/containers/auth.json")
    }

    /// `cloudimg get` of `source` with these homes (and `REGISTRY_AUTH_FILE`
    /// when given), ended after 20 s should it hang.
    fn get(&self, source: &str, auth_file: Option<&Path>) -> std::process::Output {
        let mut cmd = bin();
        cmd.args(["get", "-q", source])
            .env("DOCKER_CONFIG", &self.docker)
            .env("XDG_RUNTIME_DIR", &self.xdg)
            .env("HOME", &self.home)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(f) = auth_file {
            cmd.env("REGISTRY_AUTH_FILE", f);
        }
        let child = cmd.spawn().unwrap();
        let pid = child.id();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            if rx.recv_timeout(std::time::Duration::from_secs(20)).is_err() {
                let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            }
        });
        let out = child.wait_with_output().unwrap();
        let _ = tx.send(());
        out
    }
}

fn auths(host: &str, entry: Value) -> Value {
    json!({ "auths": { host: entry } })
}

#[test]
fn credentials_from_the_containers_auth_files_in_order() {
    let image = Image::split(&data(5000, 61), 1500);
    let want = expected_disk(&image);
    let server = basic_registry(&image);
    let host = server.host();
    let source = format!("{host}/team/img:v1");
    let right = json!({ "auth": "YWxpY2U6czNjcmV0" });
    let wrong = json!({ "username": "alice", "password": "wr0ng-pass" });

    // Without credentials: the Basic challenge cannot be answered.
    let h = CredentialHomes::new();
    let line = failure(&h.get(&source, None));
    assert!(line.contains("asks for a user name and password"), "{line}");

    // Each place alone: REGISTRY_AUTH_FILE (plain username and password),
    // $XDG_RUNTIME_DIR/containers/auth.json, ~/.config/containers/auth.json.
    let h = CredentialHomes::new();
    let file = h.home.join("my-auth.json");
    h.write(
        &file,
        &auths(&host, json!({ "username": "alice", "password": "s3cret" })),
    );
    assert!(ok(&h.get(&source, Some(&file))) == want);
    let h = CredentialHomes::new();
    h.write(&h.xdg_file(), &auths(&host, right.clone()));
    assert!(ok(&h.get(&source, None)) == want);
    let h = CredentialHomes::new();
    h.write(
        &h.home_file(),
        &auths(&format!("http://{host}"), right.clone()),
    );
    assert!(ok(&h.get(&source, None)) == want);

    // The order: docker's config first, then REGISTRY_AUTH_FILE, then
    // XDG_RUNTIME_DIR's, then HOME's. The first that names the registry
    // wins, so a wrong password ahead of a right one fails.
    let h = CredentialHomes::new();
    h.write(&h.docker.join("config.json"), &auths(&host, wrong.clone()));
    h.write(&h.xdg_file(), &auths(&host, right.clone()));
    let line = failure(&h.get(&source, None));
    assert!(
        line.contains("401") && !line.contains("wr0ng-pass"),
        "{line}"
    );
    let h = CredentialHomes::new();
    let file = h.home.join("my-auth.json");
    h.write(&file, &auths(&host, right.clone()));
    h.write(&h.xdg_file(), &auths(&host, wrong.clone()));
    assert!(ok(&h.get(&source, Some(&file))) == want);
    let h = CredentialHomes::new();
    h.write(&h.xdg_file(), &auths(&host, wrong.clone()));
    h.write(&h.home_file(), &auths(&host, right.clone()));
    failure(&h.get(&source, None));
    // A file that does not name the registry is passed over.
    let h = CredentialHomes::new();
    h.write(&h.xdg_file(), &auths("other.example:5000", wrong.clone()));
    h.write(&h.home_file(), &auths(&host, right.clone()));
    assert!(ok(&h.get(&source, None)) == want);

    // Namespaced keys, as podman writes them for `podman login HOST/NS`:
    // the longest namespace the repository lies in; another one never.
    let h = CredentialHomes::new();
    h.write(
        &h.xdg_file(),
        &json!({ "auths": {
            host.clone(): wrong.clone(),
            format!("{host}/team"): right.clone(),
            format!("{host}/team/img/x"): wrong.clone(),
        }}),
    );
    assert!(ok(&h.get(&source, None)) == want);
    let h = CredentialHomes::new();
    h.write(
        &h.xdg_file(),
        &auths(&format!("{host}/other"), right.clone()),
    );
    failure(&h.get(&source, None));

    // Credentials belong to their origin: the same file for this host on
    // another port gives nothing here.
    let h = CredentialHomes::new();
    h.write(&h.xdg_file(), &auths("127.0.0.1:1", right.clone()));
    failure(&h.get(&source, None));
}

#[test]
fn auth_files_that_are_fifos_huge_or_malformed_fail_in_one_line() {
    let image = Image::split(&data(5000, 62), 1500);
    let server = basic_registry(&image);
    let source = format!("{}/team/img:v1", server.host());
    let h = CredentialHomes::new();
    // A FIFO nobody writes to: refused at once, not waited on.
    let fifo = h.home.join("fifo.json");
    mkfifo(&fifo);
    let started = std::time::Instant::now();
    let line = failure(&h.get(&source, Some(&fifo)));
    assert!(
        line.contains("fifo.json") && line.contains("is a FIFO"),
        "{line}"
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
    // A directory, and a character device.
    let line = failure(&h.get(&source, Some(&h.home)));
    assert!(line.contains("is a directory"), "{line}");
    let line = failure(&h.get(&source, Some(Path::new("/dev/zero"))));
    assert!(line.contains("is a device"), "{line}");
    // A huge (sparse) file: refused by its size, nothing read.
    let huge = h.home.join("huge.json");
    std::fs::File::create(&huge)
        .unwrap()
        .set_len(8 << 30)
        .unwrap();
    let line = failure(&h.get(&source, Some(&huge)));
    assert!(
        line.contains("larger than the 4194304 byte limit"),
        "{line}"
    );
    // The same rules for docker's config.json.
    let h2 = CredentialHomes::new();
    mkfifo(&h2.docker.join("config.json"));
    let line = failure(&h2.get(&source, None));
    assert!(line.contains("config.json: is a FIFO"), "{line}");
    // A malformed file says where, never what: a password of the wrong
    // type would be quoted by the JSON parser's own message.
    let bad = h.home.join("bad.json");
    h.write(
        &bad,
        &auths(
            &server.host(),
            json!({ "username": "alice", "password": 987654321 }),
        ),
    );
    let line = failure(&h.get(&source, Some(&bad)));
    assert!(
        line.contains("bad.json: not a containers auth file (a field of the wrong type at line")
            && !line.contains("987654321"),
        "{line}"
    );
}

fn mkfifo(path: &Path) {
    let status = Command::new("mkfifo").arg(path).status().unwrap();
    assert!(status.success());
}

// ---- 7. a dead or hung mirror costs once per run ----

/// Six parts in a real registry, as `team/img:v1`; the image and the
/// manifest digest.
fn six_part_registry(seed: u64) -> (common::registry::Registry, Image, String) {
    let image = Image::split(&data(6 * 200_003, seed), 200_003);
    let reg = common::registry::Registry::start();
    let (digest, _) = reg.push_image("team/img", "v1", &image);
    (reg, image, digest)
}

/// `get` through `mirror`, 64 KiB range chunks, a 1 s stall timeout.
fn get_through_mirror(
    wrapper: Option<(&str, &[&str])>,
    source: &str,
    mirror: &str,
    connections: &str,
) -> std::process::Output {
    let args = [
        "get",
        "-q",
        source,
        "--mirror",
        mirror,
        "--stall-timeout",
        "1",
        "--connections",
        connections,
    ];
    let mut cmd = match wrapper {
        Some((program, before)) => {
            let mut c = Command::new(program);
            c.args(before).arg(env!("CARGO_BIN_EXE_cloudimg"));
            c
        }
        None => bin(),
    };
    cmd.args(args)
        .env("CLOUDIMG_CHUNK_SIZE", "65536")
        .env("DOCKER_CONFIG", "/nonexistent")
        .env_remove("REGISTRY_AUTH_FILE")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// The one stderr line about `mirror`: it was struck off for the run.
fn struck_off_once(out: &std::process::Output, mirror: &str, why: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "one line about the mirror: {err}");
    assert!(
        lines[0].starts_with(&format!("cloudimg: mirror {mirror}: "))
            && lines[0].contains(why)
            && lines[0].ends_with("; not asked again in this run"),
        "{err}"
    );
}

#[test]
fn a_hung_mirror_costs_one_stall_timeout_per_run() {
    use common::httpd::{Reply, Server};
    let (reg, image, digest) = six_part_registry(71);
    let want = expected_disk(&image);
    // Accepts, reads the request, and never answers.
    let hung = Server::start(|_, _| {
        std::thread::sleep(std::time::Duration::from_secs(30));
        Reply::status(503)
    });
    let tagged = format!("{}/team/img:v1", reg.host());
    // Digest-pinned: the manifest is asked of the mirror too.
    let pinned = format!("{}/team/img@{digest}", reg.host());
    let mut runs = 0;
    for source in [&tagged, &pinned] {
        for connections in ["1", "4"] {
            let started = std::time::Instant::now();
            let out = get_through_mirror(None, source, &hung.url(), connections);
            let took = started.elapsed();
            assert!(ok(&out) == want, "{source} {connections}");
            struck_off_once(&out, &hung.url(), "stalled");
            runs += 1;
            // One stall of 1 s, not one per part (six) and manifest.
            assert!(
                took < std::time::Duration::from_secs(4),
                "{source}, {connections} connection(s): {took:?}"
            );
            assert_eq!(hung.requests().len(), runs, "one request per run");
        }
    }
}

#[test]
fn a_mirror_refusing_connections_is_tried_once_per_run() {
    let (reg, image, digest) = six_part_registry(72);
    let want = expected_disk(&image);
    // A loopback port nobody listens on: connections are refused.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mirror = format!("http://127.0.0.1:{port}");
    let tmp = TempDir::new().unwrap();
    let pinned = format!("{}/team/img@{digest}", reg.host());
    for (i, source) in [format!("{}/team/img:v1", reg.host()), pinned]
        .iter()
        .enumerate()
    {
        for connections in ["1", "4"] {
            // Every connect() the run makes, counted by strace.
            let trace = tmp.path().join(format!("{i}-{connections}.trace"));
            let trace_arg = trace.display().to_string();
            let strace = ["-f", "-e", "trace=connect", "-o", trace_arg.as_str()];
            let out = get_through_mirror(Some(("strace", &strace)), source, &mirror, connections);
            assert!(ok(&out) == want, "{source} {connections}");
            struck_off_once(&out, &mirror, "refused");
            let trace = std::fs::read_to_string(&trace).unwrap();
            let attempts = trace
                .lines()
                .filter(|l| l.contains(&format!("sin_port=htons({port})")))
                .count();
            assert_eq!(
                attempts, 1,
                "{source}, {connections} connection(s): {trace}"
            );
        }
    }
}

// ---- 9. talking TLS to a plain-HTTP registry ----

#[test]
fn tls_to_a_plain_http_registry_fails_at_once_with_a_hint() {
    let (reg, _, _) = six_part_registry(91);
    // https:// to a registry that speaks plain http: an EPOCH_SERVER, and
    // a mirror (which is then skipped for the registry).
    let started = std::time::Instant::now();
    let out = bin()
        .args(["get", "-q", "team/img:v1", "--retries", "5"])
        .env("EPOCH_SERVER", format!("https://{}", reg.host()))
        .env("DOCKER_CONFIG", "/nonexistent")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let line = failure(&out);
    println!("{line}");
    assert!(
        line.contains(&format!("https://{}", reg.host()))
            && line.contains("speaks plain http")
            && line.contains("--plain-http")
            && line.contains("http://")
            && !line.contains("gave up"),
        "{line}"
    );
    // No retries: the five would take several seconds of backoff.
    assert!(
        started.elapsed() < std::time::Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    // The same registry named as an https mirror of itself: that mirror is
    // dead for the run, said once with the hint; the registry serves.
    let (reg, image, _) = six_part_registry(92);
    let mirror = format!("https://{}", reg.host());
    let source = format!("{}/team/img:v1", reg.host());
    let out = get_through_mirror(None, &source, &mirror, "1");
    assert!(ok(&out) == expected_disk(&image));
    struck_off_once(&out, &mirror, "speaks plain http, not TLS");
}

// ---- 8. a digest that repeats in the plan is fetched once ----

#[test]
fn a_repeated_part_is_fetched_once() {
    use common::httpd::{Reply, Server};
    use std::collections::HashMap;
    use std::sync::Arc;
    // A raw disk whose parts 1, 2 and 4 are all zeros (one digest), part 3
    // data of the same size; 300 KiB parts, more than two 64 KiB chunks.
    let len = 300 * 1024;
    let zeros = vec![0u8; len];
    let parts = [
        data(len, 81),
        zeros.clone(),
        zeros.clone(),
        data(len, 82),
        zeros.clone(),
    ];
    let image = Image {
        artifact_type: Some(OS_IMAGE.to_owned()),
        config_media_type: EMPTY_CONFIG.to_owned(),
        layers: parts
            .iter()
            .enumerate()
            .map(|(i, p)| Layer::new(RAW, &format!("disk.raw.{i:02}"), p.clone()))
            .collect(),
    };
    let want = expected_disk(&image);
    let zero_digest = sha256(&zeros);
    let data_digest = sha256(&parts[3]);
    let manifest = serde_json::to_vec(&image.manifest_json()).unwrap();
    let mut blobs: HashMap<String, Arc<Vec<u8>>> = HashMap::new();
    for p in &parts {
        blobs.insert(sha256(p), Arc::new(p.clone()));
    }
    let server = Server::start(move |req, _| {
        let path = req.path();
        if path.starts_with("/v2/img/manifests/") {
            return Reply::bytes(
                200,
                "application/vnd.oci.image.manifest.v1+json",
                manifest.clone(),
            );
        }
        match path
            .strip_prefix("/v2/img/blobs/")
            .and_then(|d| blobs.get(d))
        {
            Some(b) => Reply::blob(Arc::clone(b)),
            None => Reply::status(404),
        }
    });
    let source = format!("{}/img:v1", server.host());
    let requests_for = |digest: &str| {
        server
            .requests()
            .iter()
            .filter(|r| r.path().ends_with(digest))
            .count()
    };
    let tmp = TempDir::new().unwrap();
    let mut zero_before = 0;
    let mut data_before = 0;
    for connections in ["1", "4"] {
        for (how, format) in [("pipe", "raw"), ("file", "raw"), ("file", "qcow2")] {
            let file = tmp.path().join(format!("out-{connections}-{format}"));
            let mut cmd = bin();
            cmd.args(["get", "-q", &source, "--connections", connections])
                .args(["--format", format])
                .env("CLOUDIMG_CHUNK_SIZE", "65536")
                .env("DOCKER_CONFIG", "/nonexistent")
                .env("TMPDIR", tmp.path())
                .stdin(Stdio::null());
            if how == "file" {
                cmd.arg("-o").arg(&file);
            }
            let out = cmd.output().unwrap();
            let got = ok(&out).to_vec();
            let case = format!("{how}, {format}, {connections} connection(s)");
            match (how, format) {
                ("pipe", _) => assert!(got == want, "{case}"),
                (_, "raw") => assert!(std::fs::read(&file).unwrap() == want, "{case}"),
                _ => assert!(
                    std::fs::read(&file).unwrap().starts_with(b"QFI\xfb"),
                    "{case}"
                ),
            }
            // The three zero parts cost what the one data part of the same
            // size costs: one fetch.
            let zero = requests_for(&zero_digest) - zero_before;
            let data = requests_for(&data_digest) - data_before;
            assert_eq!(
                zero, data,
                "{case}: zero parts fetched {zero} times, data {data}"
            );
            if connections == "1" {
                assert_eq!(zero, 1, "{case}");
            }
            zero_before += zero;
            data_before += data;
            // Nothing left behind where the repeat was kept.
            let left: Vec<_> = std::fs::read_dir(tmp.path())
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .filter(|n| n.to_string_lossy().contains("cloudimg"))
                .collect();
            assert!(left.is_empty(), "{left:?}");
        }
    }
}
