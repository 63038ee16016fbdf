//! An OCI image layout directory: `oci-layout`, `index.json`, `blobs/ALG/HEX`.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use rustix::fs::OFlags;

use super::{Blob, BlobSource, IndexChoice, Resolved, check_manifest_digest, choose_platform};
use crate::digest::Digest;
use crate::error::{Error, Result, SizeSeen};
use crate::manifest::{
    ANNOTATION_REF_NAME, Descriptor, DiskLayer, Kind, MAX_MANIFEST_BYTES, Manifest, Platform,
    read_capped, too_large,
};
use crate::reference::Selector;

/// A local OCI image layout.
pub struct Layout {
    dir: PathBuf,
    selector: Selector,
    reference: String,
    platform: Option<Platform>,
}

impl Layout {
    /// Check that `dir` is a layout; nothing else is read until [`resolve`](BlobSource::resolve).
    pub fn open(
        dir: &Path,
        selector: Selector,
        reference: String,
        platform: Option<Platform>,
    ) -> Result<Layout> {
        let marker = dir.join("oci-layout");
        match std::fs::metadata(&marker) {
            Ok(m) if m.is_file() => {}
            Ok(_) | Err(_) if !dir.is_dir() => {
                return Err(Error::NotFound(format!(
                    "{}: no such layout directory",
                    dir.display()
                )));
            }
            _ => {
                return Err(Error::NotFound(format!(
                    "{} is not an OCI image layout (no oci-layout file)",
                    dir.display()
                )));
            }
        }
        Ok(Layout {
            dir: dir.to_owned(),
            selector,
            reference,
            platform,
        })
    }

    /// `blobs/ALG/HEX` — only ever built from a validated [`Digest`].
    fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.dir
            .join("blobs")
            .join(digest.algorithm().name())
            .join(digest.hex())
    }

    fn open_file(&self, digest: &Digest, what: &str) -> Result<(File, u64)> {
        let path = self.blob_path(digest);
        open_regular(&path).map_err(|e| match e {
            Opened::Io(e) if e.kind() == io::ErrorKind::NotFound => {
                Error::NotFound(format!("{what}: blob {digest} is missing from the layout"))
            }
            Opened::Io(e) if e.raw_os_error() == Some(rustix::io::Errno::MFILE.raw_os_error()) => {
                too_many_open_files(what)
            }
            Opened::Io(e) => Error::io(format!("{what}: opening {}", path.display()), e),
            Opened::NotRegular(kind) => Error::Integrity(format!(
                "{what}: blob {digest} is not a regular file ({kind})"
            )),
        })
    }
}

/// Why [`open_regular`] failed.
enum Opened {
    Io(io::Error),
    /// Not a regular file: what it is instead.
    NotRegular(&'static str),
}

/// Open a layout file for reading, and its length — a regular file only.
/// The open does not block (`O_NONBLOCK`): opening a FIFO for reading
/// otherwise waits for a writer, forever and deaf to signals, since std
/// retries the `EINTR`. The flag is cleared again before the file is used
/// (splice from a file opened with it would not wait for a full pipe).
fn open_regular(path: &Path) -> std::result::Result<(File, u64), Opened> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(OFlags::NONBLOCK.bits() as i32)
        .open(path)
        .map_err(Opened::Io)?;
    let meta = file.metadata().map_err(Opened::Io)?;
    let ft = meta.file_type();
    if !ft.is_file() {
        return Err(Opened::NotRegular(if ft.is_fifo() {
            "a FIFO"
        } else if ft.is_dir() {
            "a directory"
        } else if ft.is_char_device() {
            "a character device"
        } else if ft.is_block_device() {
            "a block device"
        } else if ft.is_socket() {
            "a socket"
        } else {
            "not a file"
        }));
    }
    let flags = rustix::fs::fcntl_getfl(&file).map_err(|e| Opened::Io(e.into()))?;
    rustix::fs::fcntl_setfl(&file, flags - OFlags::NONBLOCK).map_err(|e| Opened::Io(e.into()))?;
    Ok((file, meta.len()))
}

/// A layout keeps every disk blob open from the start (so that a missing or
/// mis-sized one fails before the first byte); with thousands of parts that
/// meets the open-file limit even after `cli` raised it to the hard limit.
fn too_many_open_files(what: &str) -> Error {
    let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    let shown = limit
        .current
        .map_or_else(|| "unlimited".to_owned(), |n| n.to_string());
    Error::Other(format!(
        "{what}: too many open files: the open-file limit (RLIMIT_NOFILE) is {shown}, and a \
layout keeps one file open per layer; raise the hard limit (ulimit -Hn)"
    ))
}

/// Parse a layout's `index.json` and pick the entry `selector` names: the
/// manifest tagged with the tag (`org.opencontainers.image.ref.name`); for
/// [`Selector::Default`] the one tagged `latest`, else the only manifest; for a
/// digest the entry with that digest, or — when `index.json` does not list it —
/// a descriptor of unknown size (`u64::MAX`) for that digest, since a layout may
/// hold manifest blobs it does not list. `reference` names the source in errors.
pub fn select_manifest(
    index_json: &[u8],
    selector: &Selector,
    reference: &str,
) -> Result<Descriptor> {
    if index_json.len() as u64 > MAX_MANIFEST_BYTES {
        return Err(too_large("index.json", None));
    }
    let index: Manifest = serde_json::from_slice(index_json)
        .map_err(|e| Error::Manifest(format!("malformed index.json: {e}")))?;
    let tagged = |tag: &str| {
        index
            .manifests
            .iter()
            .find(|d| d.annotations.get(ANNOTATION_REF_NAME).map(String::as_str) == Some(tag))
    };
    let found = match selector {
        Selector::Tag(t) => tagged(t),
        Selector::Default => tagged("latest").or(match index.manifests.as_slice() {
            [only] => Some(only),
            _ => None,
        }),
        Selector::Digest(d) => {
            let want = d.to_string();
            let hit = index.manifests.iter().find(|m| m.digest == want).cloned();
            // A digest not listed in index.json may still name a manifest
            // blob of the layout (skopeo allows this); its size is unknown.
            return Ok(hit.unwrap_or(Descriptor {
                digest: want,
                size: u64::MAX,
                ..Descriptor::default()
            }));
        }
    };
    found.cloned().ok_or_else(|| {
        let tags: Vec<&str> = index
            .manifests
            .iter()
            .filter_map(|d| d.annotations.get(ANNOTATION_REF_NAME).map(String::as_str))
            .collect();
        let wanted = match selector {
            Selector::Tag(t) => format!("tag {t:?}"),
            _ => format!(
                "no tag given, no \"latest\", and {} manifests",
                index.manifests.len()
            ),
        };
        Error::NotFound(format!(
            "{reference}: {wanted} (tags in the layout: {})",
            if tags.is_empty() {
                "none".to_owned()
            } else {
                tags.join(", ")
            }
        ))
    })
}

impl Layout {
    /// Read and verify the manifest (or index) a descriptor points at.
    fn read_manifest(&self, desc: &Descriptor) -> Result<(Vec<u8>, Digest)> {
        let digest: Digest = desc
            .digest
            .parse()
            .map_err(|e| Error::Manifest(format!("index entry for {}: {e}", self.reference)))?;
        let (file, len) = self.open_file(&digest, "manifest")?;
        if desc.size != u64::MAX && len != desc.size {
            return Err(Error::Integrity(format!(
                "manifest {digest}: size mismatch: the index says {} bytes, blob has {len}",
                desc.size
            )));
        }
        let bytes = read_capped(file, "manifest", |e| Error::io("reading manifest", e))?;
        check_manifest_digest(&bytes, &digest, None)?;
        Ok((bytes, digest))
    }
}

impl BlobSource for Layout {
    fn resolve(&self) -> Result<Resolved> {
        let index_path = self.dir.join("index.json");
        let (index_file, _) = open_regular(&index_path).map_err(|e| match e {
            Opened::Io(e) => Error::io(format!("opening {}", index_path.display()), e),
            Opened::NotRegular(kind) => Error::Manifest(format!(
                "{} is not a regular file ({kind})",
                index_path.display()
            )),
        })?;
        let index_bytes = read_capped(index_file, "index.json", |e| {
            Error::io("reading index.json", e)
        })?;
        let desc = select_manifest(&index_bytes, &self.selector, &self.reference)?;
        let (bytes, digest) = self.read_manifest(&desc)?;
        let manifest = Manifest::parse(&bytes)?;
        if manifest.kind() != Kind::ImageIndex {
            return Ok(Resolved {
                reference: self.reference.clone(),
                bytes,
                digest,
                manifest,
                index: None,
            });
        }
        // A tag naming an image index: pick the platform's manifest.
        let child = choose_platform(&manifest, self.platform.as_ref())?;
        let (child_bytes, child_digest) = self.read_manifest(&child)?;
        Ok(Resolved {
            reference: self.reference.clone(),
            manifest: Manifest::parse(&child_bytes)?,
            bytes: child_bytes,
            digest: child_digest,
            index: Some(IndexChoice {
                digest,
                media_type: manifest.media_type.clone(),
                platform: child.platform.clone().unwrap_or_default(),
            }),
        })
    }

    fn open_blob(&self, layer: &DiskLayer) -> Result<Blob> {
        let what = layer.label();
        let (file, len) = self.open_file(&layer.digest, &what)?;
        if len != layer.size {
            return Err(Error::blob_size(&what, layer.size, SizeSeen::File(len)));
        }
        Ok(Blob::File {
            file,
            offset: 0,
            len,
        })
    }

    fn open_ahead(&self) -> usize {
        usize::MAX
    }
}
