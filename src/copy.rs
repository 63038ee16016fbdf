//! `cloudimg copy`: a cloud image, whole, into a layout this tool writes
//! (see [`crate::store`]): the manifest, the index it was chosen from (if
//! any), the config and every layer — disk or not — so that other OCI
//! tools read the copy as the image it is.
//!
//! Each blob is hashed as it is written (on a thread beside the copy) and
//! lands under its name only when its size and digest are right. A blob
//! already in the layout is hashed once and skipped; one that an earlier,
//! interrupted run left partly written is continued from where it ends,
//! its first bytes hashed again from the file.

use std::io::{ErrorKind, Read};

use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::manifest::{DiskLayer, MEDIA_OCI_MANIFEST, disk_plan};
use crate::progress::Progress;
use crate::signals;
use crate::source::{Blob, BlobSource, Resolved};
use crate::store::Store;
use crate::verify::{self, StreamHasher};
use crate::zerocopy::{BUF_SIZE, FileRange, Range};

/// What a copy did.
#[derive(Debug, Default)]
pub struct Copied {
    /// Blobs fetched (in whole or in part).
    pub fetched: usize,
    /// Bytes fetched from the source.
    pub bytes: u64,
    /// Bytes of blobs continued from an earlier run's partial copy.
    pub resumed: u64,
    /// Blobs found in the layout already, checked and kept.
    pub present: usize,
}

/// Every blob of the manifest `resolved`, config first, each once.
fn blobs_of(resolved: &Resolved) -> Result<Vec<DiskLayer>> {
    let m = &resolved.manifest;
    let mut out: Vec<DiskLayer> = Vec::new();
    let config = m.config.iter().map(|c| (c, "config".to_owned()));
    let layers = m.layers.iter().enumerate().map(|(i, l)| {
        let title = l
            .title()
            .map_or_else(|| format!("layer #{i}"), |t| format!("layer {t:?}"));
        (l, title)
    });
    for (index, (d, name)) in config.chain(layers).enumerate() {
        let digest: Digest = d
            .digest
            .parse()
            .map_err(|e| Error::Manifest(format!("{name}: {e}")))?;
        if out.iter().any(|b| b.digest == digest) {
            continue;
        }
        out.push(DiskLayer {
            title: d.title().unwrap_or_default().to_owned(),
            media_type: d.media_type.clone(),
            size: d.size,
            digest,
            index,
        });
    }
    Ok(out)
}

/// Copy the image `resolved` (from `source`) into `store`, and list it in
/// the layout's `index.json` under `tag` (untagged when `None`): the tag
/// names the manifest itself; an index it was chosen from is stored beside
/// it, so that a reference pinned to the index's digest resolves too.
/// With `hash_present`, a blob the layout has already is hashed before it
/// is kept (a damaged one is fetched again); without, its size is checked.
pub fn copy_image(
    source: &dyn BlobSource,
    resolved: &Resolved,
    store: &Store,
    tag: Option<&str>,
    hash_present: bool,
    progress: &mut Progress,
) -> Result<Copied> {
    // cloudimg copies cloud images: anything else fails before a byte.
    disk_plan(&resolved.manifest)?;
    let blobs = blobs_of(resolved)?;
    let mut copied = Copied::default();
    let mut wanted = Vec::new();
    for b in blobs {
        signals::check()?;
        let kept = if hash_present {
            store.check_present(&b.digest, b.size)?
        } else {
            store.present(&b.digest, b.size)?.is_some()
        };
        if kept {
            copied.present += 1;
        } else {
            wanted.push(b);
        }
    }
    progress.set_total(wanted.iter().map(|b| b.size).sum());
    for b in &wanted {
        let (fetched, resumed) = fetch_blob(source, store, b, progress)?;
        if fetched + resumed > 0 || b.size == 0 {
            copied.fetched += 1;
        } else {
            copied.present += 1;
        }
        copied.bytes += fetched;
        copied.resumed += resumed;
    }
    for index in &resolved.index {
        store.put_bytes(&index.digest, &index.bytes)?;
    }
    store.put_bytes(&resolved.digest, &resolved.bytes)?;
    let m = &resolved.manifest;
    let desc = crate::manifest::Descriptor {
        media_type: m
            .media_type
            .clone()
            .unwrap_or_else(|| MEDIA_OCI_MANIFEST.to_owned()),
        digest: resolved.digest.to_string(),
        size: resolved.bytes.len() as u64,
        artifact_type: m.artifact_type.clone(),
        annotations: Default::default(),
        platform: resolved.index.last().and_then(|i| i.platform.clone()),
    };
    store.tag(tag, &desc)?;
    Ok(copied)
}

/// Fetch one blob into the store, continuing a partial copy: the bytes
/// fetched, and the bytes that were there already.
fn fetch_blob(
    source: &dyn BlobSource,
    store: &Store,
    blob: &DiskLayer,
    progress: &mut Progress,
) -> Result<(u64, u64)> {
    let label = blob.label();
    let part = match store.begin(&blob.digest, blob.size, true, false)? {
        Some(p) => p,
        None => {
            progress.note(&format!(
                "waiting for another cloudimg writing {label} into {}",
                store.dir().display()
            ));
            store
                .begin(&blob.digest, blob.size, true, true)?
                .expect("begin waits for the lock")
        }
    };
    // Another copy into this layout may have finished it while we waited.
    if store.present(&blob.digest, blob.size)?.is_some() {
        part.discard();
        progress.advance(blob.size);
        return Ok((0, 0));
    }
    let resumed = part.written();
    progress.advance(resumed);
    let mut hasher = StreamHasher::new(BUF_SIZE)?;
    hasher.start(blob.digest.algorithm())?;
    // The bytes an earlier run wrote are hashed from the file again.
    {
        let mut there = FileRange::new(
            part.file(),
            Range {
                offset: 0,
                len: resumed,
            },
        );
        let mut left = resumed;
        while left > 0 {
            let mut buf = hasher.buffer()?;
            buf.resize(BUF_SIZE, 0);
            let (n, failed) = fill(&mut there, &mut buf, left, &label);
            if let Some(e) = failed {
                return Err(e.context("reading the partial copy"));
            }
            if n == 0 {
                return Err(Error::truncated(&label, resumed - left, resumed));
            }
            hasher.feed(buf, n)?;
            left -= n as u64;
        }
    }
    let fetched = blob.size - resumed;
    let file;
    let mut body: Box<dyn Read + Send + '_> = match source.open_blob_from(blob, resumed)? {
        Blob::File {
            file: f,
            offset,
            len,
        } => {
            if len != fetched {
                return Err(Error::blob_size(
                    &label,
                    blob.size,
                    crate::error::SizeSeen::File(resumed + len),
                ));
            }
            file = f;
            Box::new(FileRange::new(&file, Range { offset, len }))
        }
        Blob::Stream(s) => s,
    };
    let mut part = part;
    let mut left = fetched;
    while left > 0 {
        let mut buf = hasher.buffer()?;
        buf.resize(BUF_SIZE, 0);
        let (n, failed) = fill(&mut *body, &mut buf, left, &label);
        part.write(&buf[..n])?;
        if let Some(e) = failed {
            return Err(e);
        }
        if n == 0 {
            return Err(Error::truncated(&label, blob.size - left, blob.size));
        }
        hasher.feed(buf, n)?;
        left -= n as u64;
        progress.advance(n as u64);
        signals::check()?;
    }
    // The body must end where the blob does.
    let mut one = [0u8; 1];
    match body.read(&mut one) {
        Ok(0) => {}
        Ok(_) => return Err(Error::oversized(&label, blob.size)),
        Err(e) => return Err(Error::from_read(&label, e)),
    }
    drop(body);
    let actual = hasher.finish()?;
    if let Err(e) = verify::check(&label, &blob.digest, &actual) {
        part.discard();
        return Err(if resumed > 0 {
            e.context("with the partial copy an earlier run left (removed; run again)")
        } else {
            e
        });
    }
    part.commit()?;
    Ok((fetched, resumed))
}

/// Read up to `left` bytes (at most a buffer) into `buf`: fewer only at the
/// end of `body`, or when it failed — then with the error, after the bytes
/// that came before it (they are kept: a later run continues after them).
fn fill(body: &mut dyn Read, buf: &mut [u8], left: u64, label: &str) -> (usize, Option<Error>) {
    let want = usize::try_from(left).map_or(buf.len(), |l| l.min(buf.len()));
    let mut n = 0;
    while n < want {
        match body.read(&mut buf[n..want]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == ErrorKind::Interrupted => {
                if let Err(e) = signals::check() {
                    return (n, Some(e));
                }
            }
            Err(e) => return (n, Some(Error::from_read(label, e))),
        }
    }
    (n, None)
}
