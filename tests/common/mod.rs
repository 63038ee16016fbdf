//! Test support: OCI image layouts written the way `oras` and `skopeo` write
//! them, a runner for the built binary, deterministic incompressible data,
//! and (in `httpd`) a scriptable HTTP server.

#![allow(dead_code)]

pub mod httpd;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use cloudimg::digest::{Algorithm, Digest};
use serde_json::{Value, json};

pub mod registry;
pub mod tls;

pub const QCOW2_PART: &str = "application/vnd.cocoonstack.disk.qcow2.part";
pub const RAW: &str = "application/vnd.cocoonstack.disk.raw";
pub const OS_IMAGE: &str = "application/vnd.cocoonstack.os-image.v1+json";
pub const SNAPSHOT: &str = "application/vnd.cocoonstack.snapshot.v1+json";
pub const EMPTY_CONFIG: &str = "application/vnd.oci.empty.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";

/// The qcow2 magic: `pull` checks that a qcow2 disk starts with it.
pub const QCOW2_MAGIC: &[u8; 4] = b"QFI\xfb";

/// Deterministic pseudo-random bytes (xorshift), distinct per seed, that
/// start with the qcow2 magic (when there is room for it): test images are
/// labelled qcow2 and made of these bytes, and `pull` checks a qcow2 disk's
/// first bytes before it starts cocoon. [`noise`] has no magic.
pub fn data(len: usize, seed: u64) -> Vec<u8> {
    let mut out = noise(len, seed);
    if len >= QCOW2_MAGIC.len() {
        out[..QCOW2_MAGIC.len()].copy_from_slice(QCOW2_MAGIC);
    }
    out
}

/// Deterministic pseudo-random bytes (xorshift), distinct per seed.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

pub fn sha256(bytes: &[u8]) -> String {
    Digest::of(Algorithm::Sha256, bytes).to_string()
}

/// One layer of a test image.
#[derive(Clone)]
pub struct Layer {
    pub media_type: String,
    pub title: Option<String>,
    pub data: Vec<u8>,
}

impl Layer {
    pub fn new(media_type: &str, title: &str, data: Vec<u8>) -> Layer {
        Layer {
            media_type: media_type.to_owned(),
            title: Some(title.to_owned()),
            data,
        }
    }
}

/// A test image: a manifest and its layers.
#[derive(Clone)]
pub struct Image {
    pub artifact_type: Option<String>,
    pub config_media_type: String,
    pub layers: Vec<Layer>,
}

impl Image {
    /// A cloud image split the publisher's way: `disk.NN.qcow2.part` parts
    /// plus a SHA256SUMS text layer, listed in a shuffled order.
    pub fn split(disk: &[u8], part: usize) -> Image {
        let mut layers: Vec<Layer> = disk
            .chunks(part)
            .enumerate()
            .map(|(i, c)| Layer::new(QCOW2_PART, &format!("disk.{i:02}.qcow2.part"), c.to_vec()))
            .collect();
        let sums: String = layers
            .iter()
            .map(|l| {
                format!(
                    "{}  {}\n",
                    &sha256(&l.data)[7..],
                    l.title.as_deref().unwrap()
                )
            })
            .collect();
        layers.reverse();
        layers.insert(1, Layer::new("text/plain", "SHA256SUMS", sums.into_bytes()));
        Image {
            artifact_type: Some(OS_IMAGE.to_owned()),
            config_media_type: EMPTY_CONFIG.to_owned(),
            layers,
        }
    }

    pub fn manifest_json(&self) -> Value {
        let config = b"{}";
        let layers: Vec<Value> = self
            .layers
            .iter()
            .map(|l| {
                let mut d = json!({
                    "mediaType": l.media_type,
                    "digest": sha256(&l.data),
                    "size": l.data.len(),
                });
                if let Some(t) = &l.title {
                    d["annotations"] = json!({"org.opencontainers.image.title": t});
                }
                d
            })
            .collect();
        let mut m = json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": self.config_media_type, "digest": sha256(config), "size": 2},
            "layers": layers,
            "annotations": {"cocoonstack.disk.format": "qcow2"},
        });
        if let Some(a) = &self.artifact_type {
            m["artifactType"] = json!(a);
        }
        m
    }
}

/// An OCI image layout directory being written by a test.
pub struct LayoutDir {
    pub dir: PathBuf,
}

impl LayoutDir {
    pub fn new(dir: &Path) -> LayoutDir {
        std::fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
        std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
        if !dir.join("index.json").exists() {
            std::fs::write(
                dir.join("index.json"),
                br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[]}"#,
            )
            .unwrap();
        }
        LayoutDir {
            dir: dir.to_owned(),
        }
    }

    pub fn blob_path(&self, digest: &str) -> PathBuf {
        let (alg, hex) = digest.split_once(':').unwrap();
        self.dir.join("blobs").join(alg).join(hex)
    }

    pub fn put_blob(&self, bytes: &[u8]) -> String {
        let d = sha256(bytes);
        std::fs::write(self.blob_path(&d), bytes).unwrap();
        d
    }

    /// Write raw manifest bytes and tag them; returns the manifest digest.
    pub fn put_manifest_bytes(&self, tag: Option<&str>, bytes: &[u8], media_type: &str) -> String {
        let digest = self.put_blob(bytes);
        let mut index: Value =
            serde_json::from_slice(&std::fs::read(self.dir.join("index.json")).unwrap()).unwrap();
        let mut entry = json!({"mediaType": media_type, "digest": digest, "size": bytes.len()});
        if let Some(t) = tag {
            entry["annotations"] = json!({"org.opencontainers.image.ref.name": t});
        }
        index["manifests"].as_array_mut().unwrap().push(entry);
        std::fs::write(
            self.dir.join("index.json"),
            serde_json::to_vec(&index).unwrap(),
        )
        .unwrap();
        digest
    }

    /// Write an image's blobs and manifest, tagged; returns the manifest digest.
    pub fn put_image(&self, tag: Option<&str>, image: &Image) -> String {
        self.put_blob(b"{}");
        for l in &image.layers {
            self.put_blob(&l.data);
        }
        let bytes = serde_json::to_vec_pretty(&image.manifest_json()).unwrap();
        self.put_manifest_bytes(tag, &bytes, "application/vnd.oci.image.manifest.v1+json")
    }

    /// `oci:DIR:TAG`
    pub fn source(&self, tag: &str) -> String {
        format!("oci:{}:{tag}", self.dir.display())
    }
}

/// The assembled disk an image should produce: disk layers sorted by title.
pub fn expected_disk(image: &Image) -> Vec<u8> {
    let mut disk: Vec<&Layer> = image
        .layers
        .iter()
        .filter(|l| l.media_type.contains(".disk."))
        .collect();
    disk.sort_by(|a, b| a.title.cmp(&b.title));
    disk.iter().flat_map(|l| l.data.iter().copied()).collect()
}

pub fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_cloudimg"));
    c.env_remove("CLOUDIMG_IO")
        .env_remove("EPOCH_COCOON_BINARY")
        .env_remove("REGISTRY_AUTH_FILE");
    c
}

/// Run the binary with stdout captured through a pipe.
pub fn run(args: &[&str]) -> Output {
    bin()
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run cloudimg")
}

/// The one error line, asserting the failure shape: exit 1, one `cloudimg:` line.
pub fn failure(out: &Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "expected exit 1, stderr: {err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "expected one line, got: {err}");
    assert!(lines[0].starts_with("cloudimg: "), "{err}");
    lines[0].to_owned()
}

/// The cocoon stand-in script shipped in tests/.
pub fn standin() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/cocoon-standin.sh")
}

/// The names of the files in `dir`.
pub fn names(dir: &Path) -> BTreeMap<String, u64> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                e.metadata().unwrap().len(),
            )
        })
        .collect()
}

/// Run a real tool, which must be installed (CI installs its Debian
/// `package`) and succeed; its stdout.
pub fn tool(name: &str, args: &[&str], package: &str) -> Vec<u8> {
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
    out.stdout
}
