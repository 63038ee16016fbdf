//! Where blobs come from. A source resolves its reference to one manifest and
//! hands out the disk layers' blobs in the richest form it has, so that the
//! sink can pick the cheapest syscall for the pair (see [`Blob`]).

pub mod layout;

use std::fs::File;
use std::io::Read;

use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::manifest::{DiskLayer, Manifest};
use crate::reference::Reference;

/// A blob as a source can give it.
pub enum Blob {
    /// A byte range of an open file: local layouts, caches. The kernel can
    /// move it (splice, copy_file_range, sendfile) and a helper thread can
    /// hash it from the page cache while it moves.
    File { file: File, offset: u64, len: u64 },
    /// A byte stream, e.g. a network body; hashed inline as it passes.
    Stream(Box<dyn Read + Send>),
}

/// A manifest as resolved from a reference, with its verified digest.
#[derive(Clone, Debug)]
pub struct Resolved {
    /// The reference as given, for display.
    pub reference: String,
    /// The manifest's raw bytes (what the digest covers).
    pub bytes: Vec<u8>,
    /// The digest of `bytes`, checked against what pointed at them.
    pub digest: Digest,
    /// The parsed manifest.
    pub manifest: Manifest,
}

/// The seed's `BlobReader`, grown up: resolve a manifest, open blobs.
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
}

/// Open the source a reference names.
pub fn open(reference: &Reference) -> Result<Box<dyn BlobSource>> {
    match reference {
        Reference::Layout { dir, selector } => Ok(Box::new(layout::Layout::open(
            dir,
            selector.clone(),
            reference.to_string(),
        )?)),
        Reference::Registry { .. } => Err(Error::Other(format!(
            "{reference}: registry sources are not supported by this build yet; \
             use an OCI layout (oci:DIR[:TAG])"
        ))),
    }
}
