//! An OCI image layout: `oci-layout`, `index.json`, `blobs/ALG/HEX` — in a
//! directory (`oci:`), or in a tar file read in place (`oci-archive:`, see
//! [`super::archive`]).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use rustix::fs::OFlags;

use super::archive::Archive;
use super::{Blob, BlobSource, Resolved, check_manifest_digest, resolve_index};
use crate::digest::Digest;
use crate::error::{Error, Result, SizeSeen};
use crate::manifest::{
    ANNOTATION_CONTAINERD_NAME, ANNOTATION_REF_NAME, Descriptor, DiskLayer, MAX_MANIFEST_BYTES,
    Manifest, Platform, read_capped, too_large,
};
use crate::reference::Selector;
use crate::zerocopy::{FileRange, Range};

/// Where a layout's files are.
enum Root {
    /// A directory.
    Dir(PathBuf),
    /// An uncompressed tar file: each of the layout's files is a byte range
    /// of it.
    Archive {
        path: PathBuf,
        file: File,
        archive: Archive,
    },
}

/// A local OCI image layout.
pub struct Layout {
    root: Root,
    selector: Selector,
    reference: String,
    platform: Option<Platform>,
}

/// When `oci:PATH:REF` failed and `PATH:REF`, or `PATH:` and part of REF up
/// to a later colon, exists after all: the reference meant a path with a
/// colon in it, which the first-colon rule cut short.
fn colon_hint(path: &Path, selector: &Selector) -> String {
    let Selector::Tag(rest) = selector else {
        return String::new();
    };
    let shown = path.to_string_lossy();
    let whole = format!("{shown}:{rest}");
    let base = shown.len();
    let found = (base + 1..=whole.len())
        .rev()
        .filter(|&i| i == whole.len() || whole.as_bytes()[i] == b':')
        .map(|i| &whole[..i])
        .find(|p| std::fs::symlink_metadata(p).is_ok());
    let Some(found) = found else {
        return String::new();
    };
    format!(
        "; note that {found} exists, but PATH ends at the first colon (as in skopeo): reach a \
name with a colon in it through a symlink, or by a relative path from below the colon"
    )
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
                let hint = colon_hint(dir, &selector);
                let also = if hint.is_empty() && dir.is_file() {
                    " (a tar of a layout is read as oci-archive:FILE)"
                } else {
                    ""
                };
                return Err(Error::NotFound(format!(
                    "{}: no such layout directory{also}{hint}",
                    dir.display()
                )));
            }
            _ => {
                return Err(Error::NotFound(format!(
                    "{} is not an OCI image layout (no oci-layout file){}",
                    dir.display(),
                    colon_hint(dir, &selector)
                )));
            }
        }
        Ok(Layout {
            root: Root::Dir(dir.to_owned()),
            selector,
            reference,
            platform,
        })
    }

    /// Read the headers of the tar file `path` and check that it holds a
    /// layout; its files are read in place.
    pub fn open_archive(
        path: &Path,
        selector: Selector,
        reference: String,
        platform: Option<Platform>,
    ) -> Result<Layout> {
        let (file, len) = open_regular(path).map_err(|e| match e {
            Opened::Io(e) if e.kind() == io::ErrorKind::NotFound => Error::NotFound(format!(
                "{}: no such archive{}",
                path.display(),
                colon_hint(path, &selector)
            )),
            Opened::Io(e) => Error::io(format!("opening {}", path.display()), e),
            Opened::NotRegular("a directory") => Error::NotFound(format!(
                "{} is a directory: a layout directory is read as oci:DIR",
                path.display()
            )),
            Opened::NotRegular(kind) => {
                Error::Manifest(format!("{} is not a regular file ({kind})", path.display()))
            }
        })?;
        let archive = Archive::index(&file, len, path)?;
        if archive.get("oci-layout").is_none() {
            return Err(Error::NotFound(format!(
                "{} is not an OCI image layout archive (no oci-layout file in it)",
                path.display()
            )));
        }
        Ok(Layout {
            root: Root::Archive {
                path: path.to_owned(),
                file,
                archive,
            },
            selector,
            reference,
            platform,
        })
    }

    /// Open a file of the layout by its name relative to the root: the file,
    /// where its content starts in it, and its length.
    fn open_entry(&self, name: &str) -> std::result::Result<(File, u64, u64), Opened> {
        match &self.root {
            Root::Dir(dir) => open_regular(&dir.join(name)).map(|(f, len)| (f, 0, len)),
            Root::Archive { file, archive, .. } => {
                let entry = archive
                    .get(name)
                    .ok_or_else(|| Opened::Io(io::ErrorKind::NotFound.into()))?;
                // The same open file for every blob: offsets are explicit
                // everywhere, and a lease on it covers them all.
                let file = file.try_clone().map_err(Opened::Io)?;
                Ok((file, entry.offset, entry.len))
            }
        }
    }

    /// How errors name a file of the layout.
    fn shown(&self, name: &str) -> String {
        match &self.root {
            Root::Dir(dir) => dir.join(name).display().to_string(),
            Root::Archive { path, .. } => format!("{} in {}", name, path.display()),
        }
    }

    /// A blob, only ever named from a validated [`Digest`]: its file, offset, length.
    fn open_file(&self, digest: &Digest, what: &str) -> Result<(File, u64, u64)> {
        let name = format!("blobs/{}/{}", digest.algorithm().name(), digest.hex());
        self.open_entry(&name).map_err(|e| match e {
            Opened::Io(e) if e.kind() == io::ErrorKind::NotFound => {
                Error::NotFound(format!("{what}: blob {digest} is missing from the layout"))
            }
            Opened::Io(e) if e.raw_os_error() == Some(rustix::io::Errno::MFILE.raw_os_error()) => {
                too_many_open_files(what)
            }
            Opened::Io(e) => Error::io(format!("{what}: opening {}", self.shown(&name)), e),
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

/// The names an `index.json` entry answers to: the image spec's ref name
/// and containerd's image name (`ctr images export` writes both).
fn ref_names(d: &Descriptor) -> impl Iterator<Item = &str> {
    [ANNOTATION_REF_NAME, ANNOTATION_CONTAINERD_NAME]
        .into_iter()
        .filter_map(|k| d.annotations.get(k).map(String::as_str))
}

/// Parse a layout's `index.json` and pick the entry `selector` names: the
/// manifest whose ref name (`org.opencontainers.image.ref.name`, or
/// containerd's `io.containerd.image.name`) is the tag; for
/// [`Selector::Default`] the one tagged `latest`, else the only manifest; for a
/// digest the entry with that digest, or — when `index.json` does not list it —
/// a descriptor of unknown size (`u64::MAX`) for that digest, since a layout may
/// hold manifest blobs it does not list. A tag that names entries of more
/// than one digest is an error that lists them: never a silent first pick.
/// `reference` names the source in errors.
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
        distinct(
            index
                .manifests
                .iter()
                .filter(|d| ref_names(d).any(|n| n == tag)),
        )
    };
    let (wanted, found) = match selector {
        Selector::Tag(t) => (format!("tag {t:?}"), tagged(t)),
        Selector::Default => match tagged("latest") {
            hits if !hits.is_empty() => ("tag \"latest\"".to_owned(), hits),
            _ => ("no tag given".to_owned(), distinct(index.manifests.iter())),
        },
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
    let at = reference
        .rsplit_once(['@'])
        .map_or(reference, |(base, _)| base);
    let base = match selector {
        Selector::Tag(t) => at.strip_suffix(&format!(":{t}")).unwrap_or(at),
        _ => at,
    };
    match found.as_slice() {
        [one] => Ok((*one).clone()),
        [] => {
            let mut tags: Vec<&str> = index.manifests.iter().flat_map(ref_names).collect();
            tags.dedup();
            let wanted = match selector {
                Selector::Tag(_) => wanted,
                _ => "no tag given and no \"latest\"".to_owned(),
            };
            Err(Error::NotFound(format!(
                "{reference}: {wanted} (tags in the layout: {})",
                if tags.is_empty() {
                    "none".to_owned()
                } else {
                    tags.join(", ")
                }
            )))
        }
        many => {
            let listed: Vec<String> = many
                .iter()
                .map(|d| {
                    let media = if d.media_type.is_empty() {
                        "no media type"
                    } else {
                        &d.media_type
                    };
                    format!("{} ({media})", d.digest)
                })
                .collect();
            // The reference is what is ambiguous, not any manifest.
            Err(Error::Reference(format!(
                "{reference}: {wanted} matches {} manifests: {}; pick one with {base}@DIGEST",
                many.len(),
                listed.join(", ")
            )))
        }
    }
}

/// Entries of one digest are one candidate (a manifest listed twice).
fn distinct<'a>(hits: impl Iterator<Item = &'a Descriptor>) -> Vec<&'a Descriptor> {
    let mut out: Vec<&Descriptor> = Vec::new();
    for d in hits {
        if !out.iter().any(|o| o.digest == d.digest) {
            out.push(d);
        }
    }
    out
}

impl Layout {
    /// Read and verify the manifest (or index) a descriptor points at.
    fn read_manifest(&self, desc: &Descriptor) -> Result<(Vec<u8>, Digest)> {
        let digest: Digest = desc
            .digest
            .parse()
            .map_err(|e| Error::Manifest(format!("index entry for {}: {e}", self.reference)))?;
        let (file, offset, len) = self.open_file(&digest, "manifest")?;
        if desc.size != u64::MAX && len != desc.size {
            return Err(Error::Integrity(format!(
                "manifest {digest}: size mismatch: the index says {} bytes, blob has {len}",
                desc.size
            )));
        }
        let bytes = read_range_capped(&file, offset, len, "manifest")?;
        check_manifest_digest(&bytes, &digest, None)?;
        Ok((bytes, digest))
    }
}

/// Read the `len` bytes at `offset` of `file` (a file of the layout, or a
/// member of an archive) through the one capped manifest read.
fn read_range_capped(file: &File, offset: u64, len: u64, what: &str) -> Result<Vec<u8>> {
    if len > MAX_MANIFEST_BYTES {
        return Err(too_large(what, None));
    }
    let range = FileRange::new(file, Range { offset, len });
    read_capped(range, what, |e| Error::io(format!("reading {what}"), e))
}

impl BlobSource for Layout {
    fn resolve(&self) -> Result<Resolved> {
        let (index_file, offset, len) = self.open_entry("index.json").map_err(|e| match e {
            Opened::Io(e) if e.kind() == io::ErrorKind::NotFound => {
                Error::NotFound(format!("{} is missing", self.shown("index.json")))
            }
            Opened::Io(e) => Error::io(format!("opening {}", self.shown("index.json")), e),
            Opened::NotRegular(kind) => Error::Manifest(format!(
                "{} is not a regular file ({kind})",
                self.shown("index.json")
            )),
        })?;
        let index_bytes = read_range_capped(&index_file, offset, len, "index.json")?;
        let desc = select_manifest(&index_bytes, &self.selector, &self.reference).map_err(|e| {
            match (e, &self.root) {
                (Error::NotFound(m), Root::Dir(dir)) => {
                    Error::NotFound(m + &colon_hint(dir, &self.selector))
                }
                (Error::NotFound(m), Root::Archive { path, .. }) => {
                    Error::NotFound(m + &colon_hint(path, &self.selector))
                }
                (e, _) => e,
            }
        })?;
        let (bytes, digest) = self.read_manifest(&desc)?;
        let manifest = Manifest::parse(&bytes)?;
        let top = Resolved {
            reference: self.reference.clone(),
            bytes,
            digest,
            manifest,
            index: Vec::new(),
        };
        // A tag naming an image index: pick the platform's manifest.
        resolve_index(top, self.platform.as_ref(), |child| {
            self.read_manifest(child)
        })
    }

    fn open_blob(&self, layer: &DiskLayer) -> Result<Blob> {
        let what = layer.label();
        let (file, offset, len) = self.open_file(&layer.digest, &what)?;
        if len != layer.size {
            return Err(Error::blob_size(&what, layer.size, SizeSeen::File(len)));
        }
        Ok(Blob::File { file, offset, len })
    }

    fn open_ahead(&self) -> usize {
        usize::MAX
    }
}
