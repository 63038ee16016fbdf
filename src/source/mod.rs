//! Where blobs come from. A source resolves its reference to one manifest and
//! hands out the disk layers' blobs in the richest form it has, so that the
//! sink can pick the cheapest syscall for the pair (see [`Blob`]).

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
    /// manifests was chosen.
    pub index: Option<IndexChoice>,
}

/// The image index a manifest was chosen from.
#[derive(Clone, Debug, serde::Serialize)]
pub struct IndexChoice {
    /// The index's digest.
    pub digest: Digest,
    /// The index's media type, when it says.
    pub media_type: Option<String>,
    /// The platform whose manifest was chosen.
    pub platform: Platform,
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
pub fn choose_platform(index: &Manifest, wanted: Option<&Platform>) -> Result<Descriptor> {
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
                .filter_map(|d| d.platform.as_ref())
                .map(|p| format!("{}/{}", p.os, p.architecture))
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
        Reference::Registry(name) => Ok(Box::new(registry::Registry::open(
            name,
            opts.platform.clone(),
            &opts.registry,
        )?)),
    }
}
