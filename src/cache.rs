//! `--cache DIR`: a registry image read from a layout on this host when its
//! blobs are there, and written into that layout while it streams when they
//! are not — so the next run is local.
//!
//! [`Cached`] wraps the registry's [`BlobSource`]. A blob that is in the
//! layout is handed out as a file of it, and the stream verifies it as it
//! verifies any layout's blob. A blob that is not is fetched from the
//! registry, and every byte the stream reads of it is also written into a
//! partial file of the layout ([`Store::begin`]); only after the whole
//! stream succeeded — every digest checked, on the very bytes that were
//! written — does [`Cached::commit`] rename those files into `blobs/`,
//! fetch what the stream did not need (config, layers that are no disk) and
//! list the manifest in `index.json`. A failed stream leaves nothing under
//! a final name. A cached blob whose digest fails is removed from the
//! layout, so that it is fetched again.

use std::io::Read;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::manifest::{DiskLayer, Platform, disk_plan};
use crate::progress::Progress;
use crate::reference::Selector;
use crate::source::layout::Layout;
use crate::source::{Blob, BlobSource, Resolved};
use crate::store::{Partial, Store};

/// A registry source in front of a layout that caches it.
pub struct Cached {
    inner: Box<dyn BlobSource>,
    store: Store,
    /// The digest a digest-pinned reference names: resolved from the layout
    /// without asking the registry, when the layout has it.
    pinned: Option<Digest>,
    platform: Option<Platform>,
    /// The name the image is listed under in the layout's `index.json`.
    tag: Option<String>,
    /// Whether the stream checks digests (when not, [`Cached::commit`]
    /// hashes what it keeps).
    verified: bool,
    /// Every disk blob was in the layout when the image was resolved: the
    /// stream may open them all ahead, as for any layout.
    all_cached: AtomicBool,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    resolved: Option<Resolved>,
    /// Blobs handed out from the layout, with their sizes.
    from_cache: Vec<(Digest, u64)>,
    /// Blobs being written while they stream.
    writing: Vec<(DiskLayer, Slot)>,
    /// A cached blob failed its digest and was removed.
    damaged: bool,
}

/// A partial file shared by the stream's reader and the commit.
type Slot = Arc<Mutex<Option<Partial>>>;

impl Cached {
    /// Put the layout `store` in front of `inner`. `pinned` is the digest of
    /// a digest-pinned reference; `tag` the name the image is listed under.
    pub fn new(
        inner: Box<dyn BlobSource>,
        store: Store,
        pinned: Option<Digest>,
        platform: Option<Platform>,
        tag: Option<String>,
        verified: bool,
    ) -> Cached {
        Cached {
            inner,
            store,
            pinned,
            platform,
            tag,
            verified,
            all_cached: AtomicBool::new(false),
            state: Mutex::new(State::default()),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("cache state")
    }

    /// Whether a blob the stream read from the layout failed its digest
    /// (and was removed): a new run fetches it from the registry.
    pub fn damaged(&self) -> bool {
        self.state().damaged
    }

    /// After a successful stream: keep what was written, fetch the rest of
    /// the image, and list it. Failing here fails nothing that was
    /// delivered; the caller says so.
    pub fn commit(&self) -> Result<()> {
        let (writing, resolved) = {
            let mut st = self.state();
            (std::mem::take(&mut st.writing), st.resolved.clone())
        };
        for (layer, slot) in writing {
            let Some(part) = slot.lock().expect("cache slot").take() else {
                continue;
            };
            if part.written() != layer.size {
                continue;
            }
            if !self.verified {
                let hashed = part.hash()?;
                if let Err(e) = crate::verify::check(&layer.label(), &layer.digest, &hashed) {
                    part.discard();
                    return Err(e);
                }
            }
            part.commit()?;
        }
        let Some(resolved) = resolved else {
            return Ok(());
        };
        // A disk blob that could not be written (a full disk): the image is
        // not listed, and the rest is not fetched for nothing.
        let missing = disk_plan(&resolved.manifest)?
            .layers
            .iter()
            .filter(|l| !self.store.blob_path(&l.digest).is_file())
            .count();
        if missing > 0 {
            return Err(Error::Other(format!(
                "{missing} disk blob(s) could not be written into {}",
                self.store.dir().display()
            )));
        }
        // Disk blobs are in now; the rest (a config, a checksum layer) is
        // small. Present blobs were just verified by the stream.
        let mut quiet = Progress::new(0, true);
        crate::copy::copy_image(
            &*self.inner,
            &resolved,
            &self.store,
            self.tag.as_deref(),
            false,
            &mut quiet,
        )
        .map(|_| ())
    }

    /// The image as the layout has it, for a digest-pinned reference.
    fn resolve_offline(&self, digest: &Digest) -> Option<Resolved> {
        if !self.store.blob_path(digest).is_file() {
            return None;
        }
        let layout = Layout::open(
            self.store.dir(),
            Selector::Digest(digest.clone()),
            self.inner_reference(),
            self.platform.clone(),
        )
        .ok()?;
        let mut resolved = layout.resolve().ok()?;
        resolved.reference = self.inner_reference();
        Some(resolved)
    }

    fn inner_reference(&self) -> String {
        self.tag.clone().unwrap_or_default()
    }
}

impl BlobSource for Cached {
    fn resolve(&self) -> Result<Resolved> {
        let offline = self.pinned.as_ref().and_then(|d| self.resolve_offline(d));
        let resolved = match offline {
            Some(r) => r,
            None => self.inner.resolve()?,
        };
        if let Ok(plan) = disk_plan(&resolved.manifest) {
            // A look at the names only: open_blob opens (and checks) them.
            let all = plan.layers.iter().all(|l| {
                std::fs::symlink_metadata(self.store.blob_path(&l.digest))
                    .is_ok_and(|m| m.file_type().is_file() && m.len() == l.size)
            });
            self.all_cached.store(all, Ordering::Relaxed);
        }
        self.state().resolved = Some(resolved.clone());
        Ok(resolved)
    }

    fn open_blob(&self, layer: &DiskLayer) -> Result<Blob> {
        if let Some(file) = self.store.present(&layer.digest, layer.size)? {
            self.state()
                .from_cache
                .push((layer.digest.clone(), layer.size));
            return Ok(Blob::File {
                file,
                offset: 0,
                len: layer.size,
            });
        }
        let blob = self.inner.open_blob(layer)?;
        let Blob::Stream(body) = blob else {
            return Ok(blob);
        };
        // Another run writing this blob into the layout now: stream it
        // without keeping it. A layout that cannot be written loses the
        // cache, not the stream.
        let part = match self.store.begin(&layer.digest, layer.size, false, false) {
            Ok(Some(p)) => p,
            Ok(None) => return Ok(Blob::Stream(body)),
            Err(e) => {
                warn(&e);
                return Ok(Blob::Stream(body));
            }
        };
        let slot: Slot = Arc::new(Mutex::new(Some(part)));
        self.state()
            .writing
            .push((layer.clone(), Arc::clone(&slot)));
        Ok(Blob::Stream(Box::new(Tee { body, slot })))
    }

    fn open_ahead(&self) -> usize {
        if self.all_cached.load(Ordering::Relaxed) {
            usize::MAX
        } else {
            self.inner.open_ahead()
        }
    }

    fn explain(&self, e: Error) -> Error {
        // Whatever failed, nothing of this attempt is kept: its partial
        // files are let go (a new attempt writes them afresh).
        let (cached, writing) = {
            let mut st = self.state();
            (
                std::mem::take(&mut st.from_cache),
                std::mem::take(&mut st.writing),
            )
        };
        for (_, slot) in writing {
            drop(slot.lock().expect("cache slot").take());
        }
        if !matches!(e.root(), Error::Integrity(_)) {
            return self.inner.explain(e);
        }
        // Which cached blob failed is found by hashing them again, never by
        // reading the message: the names in it come from the manifest.
        let mut damaged = 0;
        for (d, size) in cached {
            match self.store.check_present(&d, size) {
                Ok(true) => {}
                Ok(false) => damaged += 1,
                Err(r) => warn(&r),
            }
        }
        if damaged == 0 {
            return self.inner.explain(e);
        }
        self.state().damaged = true;
        e.context(format!(
            "a blob cached in {} was damaged (removed from the cache)",
            self.store.dir().display()
        ))
    }
}

fn warn(e: &Error) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "cloudimg: cache: {e}");
}

/// A registry body whose bytes are also written into a partial file of the
/// layout, as the stream reads them.
struct Tee {
    body: Box<dyn Read + Send>,
    slot: Slot,
}

impl Read for Tee {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.body.read(buf)?;
        if n > 0 {
            let mut slot = self.slot.lock().expect("cache slot");
            if let Some(part) = slot.as_mut()
                && let Err(e) = part.write(&buf[..n])
            {
                // The disk of the cache is full, say: stop keeping this
                // blob; the stream goes on.
                warn(&e);
                *slot = None;
            }
        }
        Ok(n)
    }
}
