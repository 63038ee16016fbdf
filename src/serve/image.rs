//! A layout under the root, read the way `oci:DIR` reads one (the same
//! `index.json` lookup, digest-checked manifests, an index resolved to this
//! machine's platform), but with every file opened beneath the root.

use std::fs::File;
use std::io::{self, Read};
use std::time::SystemTime;

use super::names::Root;
use crate::digest::Digest;
use crate::manifest::{Descriptor, Kind, MAX_MANIFEST_BYTES, Manifest};
use crate::reference::Selector;
use crate::source::choose_platform;
use crate::source::layout::select_manifest;

/// Why a request cannot be answered with content: its status, the
/// distribution API's error code, and one line.
#[derive(Debug)]
pub struct Fail {
    pub status: u16,
    pub code: &'static str,
    pub message: String,
    /// Seconds for `Retry-After`.
    pub retry: Option<u32>,
}

impl Fail {
    pub fn new(status: u16, code: &'static str, message: impl Into<String>) -> Fail {
        Fail {
            status,
            code,
            message: message.into(),
            retry: None,
        }
    }

    pub fn internal(message: impl Into<String>) -> Fail {
        Fail::new(500, "UNKNOWN", message)
    }
}

/// A manifest read from a layout.
pub struct Found {
    pub bytes: Vec<u8>,
    pub digest: Digest,
    pub manifest: Manifest,
    /// The blob's modification time (`Last-Modified`).
    pub modified: SystemTime,
    /// The media type to send it with.
    pub media_type: String,
}

/// `index.json` of layout `name`.
pub fn index_json(root: &Root, name: &str) -> Result<Vec<u8>, Fail> {
    if !root.is_layout(name) {
        return Err(Fail::new(
            404,
            "NAME_UNKNOWN",
            format!("no image {name:?} here"),
        ));
    }
    let file = root
        .open_file(&format!("{name}/index.json"))
        .map_err(|e| Fail::internal(format!("{name}: index.json: {e}")))?;
    read_capped(file).map_err(|e| Fail::internal(format!("{name}: index.json: {e}")))
}

/// The relative path of a blob of layout `name`.
pub fn blob_path(name: &str, digest: &Digest) -> String {
    format!(
        "{name}/blobs/{}/{}",
        digest.algorithm().name(),
        digest.hex()
    )
}

/// Open a blob of layout `name`. `Ok(None)` when it is not there.
pub fn open_blob(root: &Root, name: &str, digest: &Digest) -> Result<Option<File>, Fail> {
    match root.open_file(&blob_path(name, digest)) {
        Ok(f) => Ok(Some(f)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Fail::internal(format!("{name}: blob {digest}: {e}"))),
    }
}

/// Read the manifest `desc` points at, checking its digest (and size, when
/// the descriptor knows it).
pub fn read_manifest(root: &Root, name: &str, desc: &Descriptor) -> Result<Found, Fail> {
    let digest: Digest = desc
        .digest
        .parse()
        .map_err(|e| Fail::internal(format!("{name}: index.json: {e}")))?;
    let unknown = || {
        Fail::new(
            404,
            "MANIFEST_UNKNOWN",
            format!("{name}: no manifest {digest}"),
        )
    };
    let file = open_blob(root, name, &digest)?.ok_or_else(unknown)?;
    let modified = file
        .metadata()
        .and_then(|m| m.modified())
        .unwrap_or(SystemTime::UNIX_EPOCH);
    let bytes = read_capped(file).map_err(|e| Fail::internal(format!("{name}: {e}")))?;
    if desc.size != u64::MAX && bytes.len() as u64 != desc.size {
        return Err(Fail::internal(format!(
            "{name}: manifest {digest} is {} bytes, the index says {}",
            bytes.len(),
            desc.size
        )));
    }
    let actual = Digest::of(digest.algorithm(), &bytes);
    if actual != digest {
        return Err(Fail::internal(format!(
            "{name}: manifest {digest} is damaged on the server (it hashes to {actual})"
        )));
    }
    let manifest = Manifest::parse(&bytes).map_err(|e| Fail::internal(format!("{name}: {e}")))?;
    let media_type = manifest
        .media_type
        .clone()
        .or_else(|| (!desc.media_type.is_empty()).then(|| desc.media_type.clone()))
        .unwrap_or_else(|| crate::manifest::MEDIA_OCI_MANIFEST.to_owned());
    Ok(Found {
        bytes,
        digest,
        manifest,
        modified,
        media_type,
    })
}

/// The manifest `selector` names in layout `name`, as stored (an index
/// stays an index).
pub fn lookup(root: &Root, name: &str, selector: &Selector) -> Result<Found, Fail> {
    let index = index_json(root, name)?;
    let desc = select_manifest(&index, selector, name).map_err(|e| match e {
        // A name that names no manifest, or several.
        crate::Error::NotFound(m) | crate::Error::Reference(m) => {
            Fail::new(404, "MANIFEST_UNKNOWN", m)
        }
        other => Fail::internal(format!("{name}: {other}")),
    })?;
    read_manifest(root, name, &desc)
}

/// The image manifest `selector` names, an index resolved to this machine's
/// platform.
pub fn resolve(root: &Root, name: &str, selector: &Selector) -> Result<Found, Fail> {
    let found = lookup(root, name, selector)?;
    if found.manifest.kind() != Kind::ImageIndex {
        return Ok(found);
    }
    let child = choose_platform(&found.manifest, None)
        .map_err(|e| Fail::new(404, "MANIFEST_UNKNOWN", format!("{name}: {e}")))?;
    read_manifest(root, name, &child)
}

/// The tags of layout `name`, in `index.json` order.
pub fn tags(root: &Root, name: &str) -> Result<Vec<String>, Fail> {
    let bytes = index_json(root, name)?;
    let index = Manifest::parse(&bytes).map_err(|e| Fail::internal(format!("{name}: {e}")))?;
    let mut tags: Vec<String> = index
        .manifests
        .iter()
        .filter_map(|d| d.annotations.get(crate::manifest::ANNOTATION_REF_NAME))
        .cloned()
        .collect();
    tags.dedup();
    Ok(tags)
}

fn read_capped(file: File) -> io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    file.take(MAX_MANIFEST_BYTES + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_MANIFEST_BYTES {
        return Err(io::Error::other(format!(
            "larger than the {MAX_MANIFEST_BYTES} byte limit"
        )));
    }
    Ok(bytes)
}
