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

/// Run a real tool; it must be installed (CI installs it).
fn tool(name: &str, args: &[&str], package: &str) {
    let out = Command::new(name)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{name} must be installed (Debian: {package}): {e}"));
    assert!(
        out.status.success(),
        "{name} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

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
