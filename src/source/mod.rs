//! Where blobs come from. A source resolves its reference to one manifest and
//! hands out the disk layers' blobs in the richest form it has, so that the
//! sink can pick the cheapest syscall for the pair (see [`Blob`]).

pub(crate) mod archive;
pub(crate) mod layout;
pub(crate) mod registry;

pub use layout::select_manifest;
pub use registry::RegistryOptions;
pub use registry::auth::{Challenge, Credentials, Secret, parse_challenge};

use std::fs::File;
use std::io::Read;

use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::manifest::{Descriptor, DiskLayer, Manifest, Platform};
use crate::reference::Reference;

/// A blob as a source can give it.
pub enum Blob {
    /// A byte range of an open file: local layouts, caches. The kernel can
    /// move it (splice, copy_file_range, sendfile) and a helper thread can
    /// hash it from the page cache while it moves.
    File {
        /// The open file.
        file: File,
        /// Where the blob starts in it.
        offset: u64,
        /// The blob's size.
        len: u64,
    },
    /// A byte stream, e.g. a network body; hashed inline as it passes.
    Stream(Box<dyn Read + Send>),
}

/// A manifest as resolved from a reference, with its verified digest.
#[derive(Clone, Debug)]
pub struct Resolved {
    /// The reference as given, for display.
    pub reference: String,
    /// The manifest's bytes as they were received: what the digest covers.
    /// Kept whole because parsing and writing the manifest again would not
    /// give them back, so whatever serves or stores the manifest (a
    /// registry view of the image) must hand out these very bytes.
    pub bytes: Vec<u8>,
    /// The digest of `bytes`, checked against what pointed at them.
    pub digest: Digest,
    /// The parsed manifest.
    pub manifest: Manifest,
    /// When the reference named an image index: the index, and which of its
    /// manifests was chosen — one per level when indexes nest, outermost first.
    pub index: Vec<IndexChoice>,
}

/// The image index a manifest was chosen from.
#[derive(Clone, Debug, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct IndexChoice {
    /// The index's bytes as received (what its digest covers).
    #[serde(skip)]
    pub bytes: Vec<u8>,
    /// The index's digest.
    pub digest: Digest,
    /// The index's media type, when it says.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    /// The index's size in bytes.
    pub size: u64,
    /// Every entry the index offers, in its order.
    pub manifests: Vec<Descriptor>,
    /// The digest of the entry chosen.
    pub chosen: String,
    /// The platform of the entry chosen (none for a lone entry without one).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
}

/// How deep image indexes may nest (an index of indexes of manifests is 2).
pub const MAX_INDEX_DEPTH: usize = 4;

/// Resolve `top` through image indexes down to a manifest: at each level
/// the entry for `wanted` (see [`choose_platform`]) is fetched with `fetch`,
/// which verifies it against its descriptor. Up to [`MAX_INDEX_DEPTH`] levels.
pub fn resolve_index(
    mut top: Resolved,
    wanted: Option<&Platform>,
    mut fetch: impl FnMut(&Descriptor) -> Result<(Vec<u8>, Digest)>,
) -> Result<Resolved> {
    let mut chain = Vec::new();
    while top.manifest.kind() == crate::manifest::Kind::ImageIndex {
        if chain.len() == MAX_INDEX_DEPTH {
            return Err(Error::Manifest(format!(
                "image indexes nest more than {MAX_INDEX_DEPTH} deep"
            )));
        }
        let child = choose_platform(&top.manifest, wanted)?;
        let (bytes, digest) = fetch(&child)?;
        let manifest = Manifest::parse(&bytes)?;
        chain.push(IndexChoice {
            size: top.bytes.len() as u64,
            bytes: top.bytes,
            digest: top.digest,
            media_type: top.manifest.media_type,
            manifests: top.manifest.manifests,
            chosen: child.digest,
            platform: child.platform,
        });
        top = Resolved {
            reference: top.reference,
            bytes,
            digest,
            manifest,
            index: Vec::new(),
        };
    }
    top.index = chain;
    Ok(top)
}

/// How sources are opened.
#[derive(Clone, Debug, Default)]
pub struct SourceOptions {
    /// The platform to pick from an image index (default: linux and this
    /// machine's architecture).
    pub platform: Option<Platform>,
    /// How registries are reached.
    pub registry: RegistryOptions,
}

/// This machine's architecture in OCI's (Go's) spelling.
pub fn host_architecture() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" if cfg!(target_endian = "little") => "ppc64le",
        "powerpc64" => "ppc64",
        other => other,
    }
}

/// Parse `os/arch[/variant]`.
pub fn parse_platform(s: &str) -> Result<Platform> {
    let mut parts = s.split('/');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(os), Some(arch), variant, None) if !os.is_empty() && !arch.is_empty() => {
            Ok(Platform {
                os: os.to_owned(),
                architecture: arch.to_owned(),
                variant: variant.filter(|v| !v.is_empty()).map(str::to_owned),
            })
        }
        _ => Err(Error::Usage(format!(
            "--platform {s:?}: expected OS/ARCH or OS/ARCH/VARIANT, e.g. linux/arm64"
        ))),
    }
}

/// Pick the manifest of an image index for `wanted` (default: linux on this
/// machine's architecture). A variant is only compared when one is asked for.
/// An index of one entry that names no platform (as tools write an index
/// around a single artifact, or around a nested index) gives that entry.
pub fn choose_platform(index: &Manifest, wanted: Option<&Platform>) -> Result<Descriptor> {
    if let [only] = index.manifests.as_slice()
        && only.platform.is_none()
    {
        return Ok(only.clone());
    }
    let default = Platform {
        os: "linux".to_owned(),
        architecture: host_architecture().to_owned(),
        variant: None,
    };
    let want = wanted.unwrap_or(&default);
    let matches = |p: &Platform| {
        p.os == want.os
            && p.architecture == want.architecture
            && (want.variant.is_none() || p.variant == want.variant)
    };
    index
        .manifests
        .iter()
        .find(|d| d.platform.as_ref().is_some_and(matches))
        .cloned()
        .ok_or_else(|| {
            let have: Vec<String> = index
                .manifests
                .iter()
                .map(|d| {
                    d.platform
                        .as_ref()
                        .map_or("no platform".to_owned(), Platform::spelled)
                })
                .collect();
            Error::NotFound(format!(
                "the image index has no manifest for {}/{} (it has: {})",
                want.os,
                want.architecture,
                if have.is_empty() {
                    "no platforms".to_owned()
                } else {
                    have.join(", ")
                }
            ))
        })
}

/// Check that manifest `bytes` hash to `want`; `why` says where `want`
/// came from when that is not plain. The one wording of a manifest whose
/// bytes are not what pointed at them.
pub(crate) fn check_manifest_digest(bytes: &[u8], want: &Digest, why: Option<&str>) -> Result<()> {
    let actual = Digest::of(want.algorithm(), bytes);
    if actual == *want {
        return Ok(());
    }
    let why = why.map(|w| format!(" ({w})")).unwrap_or_default();
    Err(Error::Integrity(format!(
        "manifest digest mismatch: expected {want}{why}, actual {actual}"
    )))
}

/// The Go reference's `BlobReader`, grown up: resolve a manifest, open blobs.
pub trait BlobSource: Send + Sync {
    /// Resolve the source's reference to a manifest, verifying its digest.
    fn resolve(&self) -> Result<Resolved>;

    /// Open the blob of a disk layer. A `File` blob must already be known to
    /// be exactly `layer.size` bytes; a `Stream` blob is size-checked by the
    /// stream as it is read.
    fn open_blob(&self, layer: &DiskLayer) -> Result<Blob>;

    /// Open a blob from byte `from` on: its last `layer.size - from` bytes
    /// (a partial copy being continued). `layer` may describe any blob of
    /// the image, a config or a layer that is no disk. The default opens
    /// the whole blob and skips to `from`: a file blob by its offset, a
    /// stream by reading forward.
    fn open_blob_from(&self, layer: &DiskLayer, from: u64) -> Result<Blob> {
        let from = from.min(layer.size);
        match self.open_blob(layer)? {
            Blob::File { file, offset, len } => Ok(Blob::File {
                file,
                offset: offset + from,
                len: len - from,
            }),
            Blob::Stream(mut body) => {
                let skipped = std::io::copy(&mut (&mut body).take(from), &mut std::io::sink())
                    .map_err(|e| Error::from_read(&layer.label(), e))?;
                if skipped < from {
                    return Err(Error::truncated(&layer.label(), skipped, layer.size));
                }
                Ok(Blob::Stream(body))
            }
        }
    }

    /// How many blobs the stream may hold open ahead of the one it copies.
    /// A local layout says "all": opening is free, every missing or mis-sized
    /// blob is found before the first byte is written, and hashing can run
    /// ahead. A network source says one: the next request is in flight.
    fn open_ahead(&self) -> usize {
        1
    }

    /// A failed stream's error, with what the source knows of where the
    /// failing bytes came from (a registry names the mirror that served a
    /// blob whose digest did not match).
    fn explain(&self, e: Error) -> Error {
        e
    }
}

/// Open the source a reference names.
pub fn open(reference: &Reference, opts: &SourceOptions) -> Result<Box<dyn BlobSource>> {
    match reference {
        Reference::Layout { dir, selector } => Ok(Box::new(layout::Layout::open(
            dir,
            selector.clone(),
            reference.to_string(),
            opts.platform.clone(),
        )?)),
        Reference::Archive { file, selector } => Ok(Box::new(layout::Layout::open_archive(
            file,
            selector.clone(),
            reference.to_string(),
            opts.platform.clone(),
        )?)),
        Reference::Registry(name) => Ok(Box::new(registry::Registry::open(
            name,
            opts.platform.clone(),
            &opts.registry,
        )?)),
    }
}
