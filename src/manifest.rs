//! The OCI manifest model, the kind of artifact a manifest describes, and the
//! disk plan: which layers make up the disk, in which order.

use std::collections::BTreeMap;
use std::fmt;
use std::io::{self, Read};

use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::error::{Error, Result};

/// Largest manifest or index we accept, from a layout or a registry.
pub const MAX_MANIFEST_BYTES: u64 = 4 << 20;

/// Read a manifest or index from `r`: at most [`MAX_MANIFEST_BYTES`], a
/// longer one refused naming `what`. A failed read is worded by `failed`.
pub(crate) fn read_capped(
    r: impl Read,
    what: &str,
    failed: impl FnOnce(io::Error) -> Error,
) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    r.take(MAX_MANIFEST_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(failed)?;
    if bytes.len() as u64 > MAX_MANIFEST_BYTES {
        return Err(too_large(what, None));
    }
    Ok(bytes)
}

/// A manifest or index past [`MAX_MANIFEST_BYTES`]: `len` bytes, when known.
pub(crate) fn too_large(what: &str, len: Option<u64>) -> Error {
    Error::Manifest(match len {
        Some(len) => {
            format!("{what} is {len} bytes, more than the {MAX_MANIFEST_BYTES} byte limit")
        }
        None => format!("{what} is larger than the {MAX_MANIFEST_BYTES} byte limit"),
    })
}

/// An OCI image manifest.
pub const MEDIA_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// An OCI image index.
pub const MEDIA_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// A Docker image manifest, schema 2.
pub const MEDIA_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// A Docker manifest list (the index of Docker's schema 2).
pub const MEDIA_DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// An OCI container image's config: the manifest is a container image.
pub const MEDIA_OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// A Docker container image's config.
pub const MEDIA_DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
/// The empty config that artifacts carry.
pub const MEDIA_OCI_EMPTY: &str = "application/vnd.oci.empty.v1+json";

/// The artifactType of a cloud image (a VM disk).
pub const ARTIFACT_OS_IMAGE: &str = "application/vnd.cocoonstack.os-image.v1+json";
/// The legacy artifactType of a Windows cloud image.
pub const ARTIFACT_WINDOWS_IMAGE: &str = "application/vnd.cocoonstack.windows-image.v1+json";
/// The artifactType of a VM snapshot (not a disk cloudimg streams).
pub const ARTIFACT_SNAPSHOT: &str = "application/vnd.cocoonstack.snapshot.v1+json";

/// The annotation that names a layer's file (set by oras to the file name).
pub const ANNOTATION_TITLE: &str = "org.opencontainers.image.title";
/// The annotation that carries the tag in an image layout's `index.json`.
pub const ANNOTATION_REF_NAME: &str = "org.opencontainers.image.ref.name";
/// containerd's name of an image in an exported layout's `index.json`.
pub const ANNOTATION_CONTAINERD_NAME: &str = "io.containerd.image.name";

/// The eight disk layer media types and the disk format each carries.
pub const DISK_MEDIA_TYPES: [(&str, Format); 8] = [
    ("application/vnd.cocoonstack.disk.qcow2", Format::Qcow2),
    ("application/vnd.cocoonstack.disk.qcow2.part", Format::Qcow2),
    ("application/vnd.cocoonstack.disk.raw", Format::Raw),
    ("application/vnd.cocoonstack.disk.raw.part", Format::Raw),
    (
        "application/vnd.cocoonstack.windows.disk.qcow2",
        Format::Qcow2,
    ),
    (
        "application/vnd.cocoonstack.windows.disk.qcow2.part",
        Format::Qcow2,
    ),
    ("application/vnd.cocoonstack.windows.disk.raw", Format::Raw),
    (
        "application/vnd.cocoonstack.windows.disk.raw.part",
        Format::Raw,
    ),
];

/// An OCI content descriptor. The digest stays a string here: a skipped layer
/// with an exotic digest must not make the whole manifest unreadable; digests
/// of layers that are used are validated when the plan is built.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    /// The media type of what it points at.
    #[serde(default)]
    pub media_type: String,
    /// `alg:hex`, as written; parsed (and so validated) only where used.
    pub digest: String,
    /// Size in bytes of what it points at.
    pub size: u64,
    /// The artifactType of the manifest it points at (index entries).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    /// Annotations, e.g. the title of a layer or the tag of an index entry.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// The platform of an index entry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
}

impl Descriptor {
    /// The title annotation, if any.
    pub fn title(&self) -> Option<&str> {
        self.annotations.get(ANNOTATION_TITLE).map(String::as_str)
    }
}

/// The platform of an index entry.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
pub struct Platform {
    /// `linux`, `windows`, …
    #[serde(default)]
    pub os: String,
    /// In Go's spelling: `amd64`, `arm64`, …
    #[serde(default)]
    pub architecture: String,
    /// E.g. `v8` for arm64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

impl Platform {
    /// `os/arch[/variant]`.
    pub fn spelled(&self) -> String {
        match &self.variant {
            Some(v) => format!("{}/{}/{v}", self.os, self.architecture),
            None => format!("{}/{}", self.os, self.architecture),
        }
    }
}

/// An image manifest or an image index: the fields of both, all optional, so
/// that classification can look at whatever arrived.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    /// 2 for every manifest and index this crate reads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema_version: Option<u32>,
    /// The manifest's own media type, when it says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    /// What the artifact is (a cloud image, a snapshot, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    /// The config blob (a manifest).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<Descriptor>,
    /// The layers (a manifest).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub layers: Vec<Descriptor>,
    /// The manifests (an index).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub manifests: Vec<Descriptor>,
    /// The manifest's annotations.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

impl Manifest {
    /// Parse manifest bytes, refusing oversized input.
    pub fn parse(bytes: &[u8]) -> Result<Manifest> {
        if bytes.len() as u64 > MAX_MANIFEST_BYTES {
            return Err(too_large("manifest", Some(bytes.len() as u64)));
        }
        serde_json::from_slice(bytes)
            .map_err(|e| Error::Manifest(format!("malformed manifest: {e}")))
    }

    /// What this manifest describes.
    pub fn kind(&self) -> Kind {
        classify(self)
    }
}

/// What a manifest describes, per the classification table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// A VM disk: what cloudimg streams.
    CloudImage,
    /// A VM snapshot.
    Snapshot,
    /// A container image (a config of the OCI or Docker type).
    ContainerImage,
    /// An image index, to be resolved to one of its manifests.
    ImageIndex,
    /// Anything else.
    Unknown,
}

impl Kind {
    /// The kebab-case name `inspect` shows.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::CloudImage => "cloud-image",
            Kind::Snapshot => "snapshot",
            Kind::ContainerImage => "container-image",
            Kind::ImageIndex => "image-index",
            Kind::Unknown => "unknown",
        }
    }
}

impl Kind {
    /// The kind in a sentence, with its article: "a cloud image", "an image
    /// index", "an unknown kind of artifact".
    pub fn with_article(self) -> &'static str {
        match self {
            Kind::CloudImage => "a cloud image",
            Kind::Snapshot => "a snapshot",
            Kind::ContainerImage => "a container image",
            Kind::ImageIndex => "an image index",
            Kind::Unknown => "an unknown kind of artifact",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Classify a manifest; the first matching row of the table wins:
///
/// 1. an index media type (OCI index, Docker manifest list) → image index,
///    whatever else the document says; so is a document with no media type,
///    no config and no layers that lists manifests;
/// 2. `artifactType` os-image or windows-image → cloud image; snapshot →
///    snapshot; any other `artifactType` → unknown;
/// 3. no `artifactType`, and the config's media type is the os-image or
///    windows-image type → cloud image (the OCI 1.0 artifact convention,
///    which older oras releases and the ORAS SDK write); snapshot → snapshot;
/// 4. an OCI or Docker container config → container image;
/// 5. anything else → unknown.
pub fn classify(m: &Manifest) -> Kind {
    if let Some(MEDIA_OCI_INDEX | MEDIA_DOCKER_LIST) = m.media_type.as_deref() {
        return Kind::ImageIndex;
    }
    if m.media_type.is_none()
        && m.config.is_none()
        && m.layers.is_empty()
        && !m.manifests.is_empty()
    {
        return Kind::ImageIndex;
    }
    let by_type = |t: &str| match t {
        ARTIFACT_OS_IMAGE | ARTIFACT_WINDOWS_IMAGE => Some(Kind::CloudImage),
        ARTIFACT_SNAPSHOT => Some(Kind::Snapshot),
        _ => None,
    };
    let config = m.config.as_ref().map(|c| &*c.media_type);
    match m.artifact_type.as_deref() {
        Some(t) => return by_type(t).unwrap_or(Kind::Unknown),
        None => {
            if let Some(kind) = config.and_then(by_type) {
                return kind;
            }
        }
    }
    match config {
        Some(MEDIA_OCI_CONFIG | MEDIA_DOCKER_CONFIG) => Kind::ContainerImage,
        _ => Kind::Unknown,
    }
}

/// The on-disk format a disk layer carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// A qcow2 image (split or whole).
    Qcow2,
    /// A raw disk image.
    Raw,
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Format::Qcow2 => "qcow2",
            Format::Raw => "raw",
        })
    }
}

/// The disk format of a layer media type, or `None` when it is not a disk layer.
pub fn disk_format(media_type: &str) -> Option<Format> {
    DISK_MEDIA_TYPES
        .iter()
        .find(|(m, _)| *m == media_type)
        .map(|&(_, f)| f)
}

/// One layer of the disk, in stream order.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DiskLayer {
    /// The title annotation, empty when missing.
    pub title: String,
    /// One of the eight disk media types.
    pub media_type: String,
    /// Size in bytes, as the manifest says.
    pub size: u64,
    /// The digest the blob must have.
    pub digest: Digest,
    /// Position in the manifest's `layers`.
    #[serde(skip)]
    pub index: usize,
}

impl DiskLayer {
    /// How errors name this layer: its title, else its position.
    pub fn name(&self) -> String {
        if self.title.is_empty() {
            format!("layer #{}", self.index)
        } else {
            format!("layer {:?}", self.title)
        }
    }

    /// How errors about its bytes name this layer: its name and digest.
    pub fn label(&self) -> String {
        format!("{} ({})", self.name(), self.digest)
    }
}

/// A layer that is not part of the disk, and why.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Skipped {
    /// The title annotation, empty when missing.
    pub title: String,
    /// Its media type.
    pub media_type: String,
    /// Its size in bytes.
    pub size: u64,
    /// Why it is not part of the disk.
    pub reason: String,
}

/// The disk layers in reassembly order, plus what was left out.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DiskPlan {
    /// The format every disk layer shares.
    pub format: Format,
    /// The disk layers in stream order.
    pub layers: Vec<DiskLayer>,
    /// The layers left out, with the reason.
    pub skipped: Vec<Skipped>,
    /// The disk's size: the sum of the disk layers.
    pub total: u64,
}

/// Build the disk plan of a cloud image: the eight disk media types only,
/// stable byte-wise sort by title (missing = empty). Refuses other kinds,
/// zero disk layers, and a mix of qcow2 and raw layers.
pub fn disk_plan(m: &Manifest) -> Result<DiskPlan> {
    let kind = classify(m);
    if kind != Kind::CloudImage {
        return Err(Error::Manifest(format!(
            "not a cloud image: the manifest is {} ({kind}{})",
            kind.with_article(),
            match (&m.artifact_type, &m.config) {
                (Some(t), _) => format!(", artifactType {t}"),
                (None, Some(c)) => format!(", config {}", c.media_type),
                (None, None) => String::new(),
            }
        )));
    }
    let mut layers = Vec::new();
    let mut skipped = Vec::new();
    let mut formats = Vec::new();
    for (index, l) in m.layers.iter().enumerate() {
        let title = l.title().unwrap_or_default().to_owned();
        let Some(format) = disk_format(&l.media_type) else {
            skipped.push(Skipped {
                title,
                media_type: l.media_type.clone(),
                size: l.size,
                reason: format!("not a disk media type ({})", l.media_type),
            });
            continue;
        };
        let digest = l
            .digest
            .parse::<Digest>()
            .map_err(|e| Error::Manifest(format!("disk layer {title:?} (#{index}) has a {e}")))?;
        if !formats.contains(&format) {
            formats.push(format);
        }
        layers.push(DiskLayer {
            title,
            media_type: l.media_type.clone(),
            size: l.size,
            digest,
            index,
        });
    }
    // `sort_by` is stable: equal (or missing) titles keep manifest order.
    layers.sort_by(|a, b| a.title.as_bytes().cmp(b.title.as_bytes()));
    let format = match formats.as_slice() {
        [] => {
            return Err(Error::Manifest("cloud image has no disk layers".to_owned()));
        }
        [one] => *one,
        _ => {
            return Err(Error::Manifest(
                "cloud image mixes qcow2 and raw disk layers; refusing to concatenate them"
                    .to_owned(),
            ));
        }
    };
    let total = layers
        .iter()
        .try_fold(0u64, |acc, l| acc.checked_add(l.size))
        .ok_or_else(|| Error::Manifest("disk layer sizes overflow 64 bits".to_owned()))?;
    Ok(DiskPlan {
        format,
        layers,
        skipped,
        total,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(n: u8) -> String {
        format!("sha256:{}", format!("{n:02x}").repeat(32))
    }

    fn layer(media_type: &str, title: Option<&str>, n: u8) -> Descriptor {
        let mut annotations = BTreeMap::new();
        if let Some(t) = title {
            annotations.insert(ANNOTATION_TITLE.to_owned(), t.to_owned());
        }
        Descriptor {
            media_type: media_type.to_owned(),
            digest: digest(n),
            size: u64::from(n) * 10,
            annotations,
            ..Descriptor::default()
        }
    }

    fn cloud(layers: Vec<Descriptor>) -> Manifest {
        Manifest {
            schema_version: Some(2),
            media_type: Some(MEDIA_OCI_MANIFEST.to_owned()),
            artifact_type: Some(ARTIFACT_OS_IMAGE.to_owned()),
            config: Some(Descriptor {
                media_type: MEDIA_OCI_EMPTY.to_owned(),
                digest: digest(0),
                size: 2,
                ..Descriptor::default()
            }),
            layers,
            ..Manifest::default()
        }
    }

    #[test]
    fn classification_table() {
        let with = |artifact: Option<&str>, config: Option<&str>, media: Option<&str>| Manifest {
            artifact_type: artifact.map(str::to_owned),
            config: config.map(|c| Descriptor {
                media_type: c.to_owned(),
                ..Descriptor::default()
            }),
            media_type: media.map(str::to_owned),
            ..Manifest::default()
        };
        let cases = [
            (with(Some(ARTIFACT_OS_IMAGE), None, None), Kind::CloudImage),
            (
                with(Some(ARTIFACT_WINDOWS_IMAGE), None, None),
                Kind::CloudImage,
            ),
            (with(Some(ARTIFACT_SNAPSHOT), None, None), Kind::Snapshot),
            // artifactType wins over a container config (first match wins).
            (
                with(Some(ARTIFACT_OS_IMAGE), Some(MEDIA_OCI_CONFIG), None),
                Kind::CloudImage,
            ),
            (
                with(None, Some(MEDIA_OCI_CONFIG), None),
                Kind::ContainerImage,
            ),
            (
                with(None, Some(MEDIA_DOCKER_CONFIG), None),
                Kind::ContainerImage,
            ),
            // An index media type wins over everything else.
            (
                with(None, Some(MEDIA_DOCKER_CONFIG), Some(MEDIA_OCI_INDEX)),
                Kind::ImageIndex,
            ),
            (
                with(Some(ARTIFACT_OS_IMAGE), None, Some(MEDIA_OCI_INDEX)),
                Kind::ImageIndex,
            ),
            // The OCI 1.0 artifact convention: the type in config.mediaType.
            (
                with(None, Some(ARTIFACT_OS_IMAGE), Some(MEDIA_OCI_MANIFEST)),
                Kind::CloudImage,
            ),
            (
                with(None, Some(ARTIFACT_WINDOWS_IMAGE), None),
                Kind::CloudImage,
            ),
            (with(None, Some(ARTIFACT_SNAPSHOT), None), Kind::Snapshot),
            // ... but an artifactType, when given, decides.
            (
                with(Some("application/x-other"), Some(ARTIFACT_OS_IMAGE), None),
                Kind::Unknown,
            ),
            (
                with(Some(ARTIFACT_SNAPSHOT), Some(ARTIFACT_OS_IMAGE), None),
                Kind::Snapshot,
            ),
            (with(None, None, Some(MEDIA_OCI_INDEX)), Kind::ImageIndex),
            (with(None, None, Some(MEDIA_DOCKER_LIST)), Kind::ImageIndex),
            (with(None, None, Some(MEDIA_OCI_MANIFEST)), Kind::Unknown),
            (
                with(Some("application/x-other"), Some(MEDIA_OCI_EMPTY), None),
                Kind::Unknown,
            ),
            (Manifest::default(), Kind::Unknown),
        ];
        for (i, (m, want)) in cases.iter().enumerate() {
            assert_eq!(classify(m), *want, "case {i}");
        }
        // An index that does not name its media type, as skopeo writes
        // index.json.
        let bare = Manifest {
            manifests: vec![Descriptor::default()],
            ..Manifest::default()
        };
        assert_eq!(classify(&bare), Kind::ImageIndex);
    }

    #[test]
    fn all_eight_disk_types_are_disk_layers() {
        for (media, format) in DISK_MEDIA_TYPES {
            let plan = disk_plan(&cloud(vec![layer(media, Some("d"), 1)])).unwrap();
            assert_eq!(plan.layers.len(), 1, "{media}");
            assert_eq!(plan.format, format, "{media}");
        }
    }

    #[test]
    fn non_disk_layers_are_skipped_with_reason() {
        let others = [
            "text/plain",
            "application/vnd.cocoonstack.disk.vmdk",
            "application/vnd.cocoonstack.disk.qcow2.part+gzip",
            "application/vnd.oci.image.layer.v1.tar",
            "",
        ];
        let mut layers = vec![layer(DISK_MEDIA_TYPES[0].0, Some("disk"), 1)];
        layers.extend(others.iter().map(|m| layer(m, Some("x"), 2)));
        let plan = disk_plan(&cloud(layers)).unwrap();
        assert_eq!(plan.layers.len(), 1);
        assert_eq!(plan.skipped.len(), others.len());
        assert!(plan.skipped[0].reason.contains("text/plain"));
    }

    #[test]
    fn sort_is_bytewise_and_stable() {
        let part = "application/vnd.cocoonstack.disk.qcow2.part";
        let m = cloud(vec![
            layer(part, Some("d.01.qcow2.part"), 1),
            layer(part, Some("b"), 2),
            layer(part, None, 3),
            layer(part, Some("B"), 4),
            layer(part, Some("b"), 5),
            layer(part, Some(""), 6),
            layer(part, Some("d.00.qcow2.part"), 7),
            layer(part, None, 8),
        ]);
        let plan = disk_plan(&m).unwrap();
        let order: Vec<usize> = plan.layers.iter().map(|l| l.index).collect();
        // Missing and empty titles sort first in manifest order; "B" < "b"
        // byte-wise; the two "b" layers keep manifest order.
        assert_eq!(order, vec![2, 5, 7, 3, 1, 4, 6, 0]);
        assert_eq!(plan.total, (1..=8).map(|n| n * 10).sum::<u64>());
    }

    #[test]
    fn refuses_other_kinds_naming_them() {
        let mut m = cloud(vec![layer(DISK_MEDIA_TYPES[0].0, None, 1)]);
        m.artifact_type = Some(ARTIFACT_SNAPSHOT.to_owned());
        let e = disk_plan(&m).unwrap_err().to_string();
        assert!(e.contains("snapshot"), "{e}");
        m.artifact_type = None;
        m.config.as_mut().unwrap().media_type = MEDIA_OCI_CONFIG.to_owned();
        let e = disk_plan(&m).unwrap_err().to_string();
        assert!(e.contains("is a container image"), "{e}");
        m.config.as_mut().unwrap().media_type = MEDIA_OCI_EMPTY.to_owned();
        let e = disk_plan(&m).unwrap_err().to_string();
        assert!(e.contains("is an unknown kind of artifact"), "{e}");
        m.media_type = Some(MEDIA_OCI_INDEX.to_owned());
        let e = disk_plan(&m).unwrap_err().to_string();
        assert!(e.contains("is an image index"), "{e}");
    }

    #[test]
    fn refuses_zero_disk_layers() {
        let e = disk_plan(&cloud(vec![layer("text/plain", Some("SHA256SUMS"), 1)]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("no disk layers"), "{e}");
    }

    #[test]
    fn refuses_mixed_formats() {
        let e = disk_plan(&cloud(vec![
            layer("application/vnd.cocoonstack.disk.qcow2.part", Some("a"), 1),
            layer("application/vnd.cocoonstack.windows.disk.raw", Some("b"), 2),
        ]))
        .unwrap_err()
        .to_string();
        assert!(e.contains("mixes qcow2 and raw"), "{e}");
    }

    #[test]
    fn refuses_bad_digest_in_disk_layer_but_not_in_skipped() {
        let mut bad = layer(DISK_MEDIA_TYPES[1].0, Some("a"), 1);
        bad.digest = "sha256:../../etc/passwd".to_owned();
        assert!(disk_plan(&cloud(vec![bad])).is_err());
        let mut odd = layer("text/plain", Some("SHA256SUMS"), 1);
        odd.digest = "blake3:whatever".to_owned();
        let plan = disk_plan(&cloud(vec![layer(DISK_MEDIA_TYPES[1].0, None, 2), odd])).unwrap();
        assert_eq!(plan.skipped.len(), 1);
    }

    #[test]
    fn parses_a_real_shaped_manifest_and_caps_size() {
        let json = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json",
          "artifactType":"application/vnd.cocoonstack.os-image.v1+json",
          "config":{"mediaType":"application/vnd.oci.empty.v1+json","digest":"sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a","size":2},
          "layers":[{"mediaType":"text/plain","digest":"sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a","size":2}],
          "annotations":{"cocoonstack.disk.format":"qcow2"},"extra":true}"#;
        let m = Manifest::parse(json).unwrap();
        assert_eq!(m.kind(), Kind::CloudImage);
        assert_eq!(m.annotations["cocoonstack.disk.format"], "qcow2");
        assert!(Manifest::parse(b"{\"layers\":[{\"size\":-1,\"digest\":\"x\"}]}").is_err());
        assert!(Manifest::parse(b"not json").is_err());
        let huge = vec![b' '; (MAX_MANIFEST_BYTES + 1) as usize];
        assert!(
            Manifest::parse(&huge)
                .unwrap_err()
                .to_string()
                .contains("limit")
        );
    }
}
