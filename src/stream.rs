//! The seed's Stream / StreamParsed: concatenate a cloud image's disk layers
//! into a sink, each blob exactly its size and, unless told otherwise,
//! verified against its digest. The stream is complete only when every
//! verdict is in.

use std::collections::VecDeque;
use std::io::{ErrorKind, Read};

use crate::error::{Error, Result};
use crate::manifest::{DiskLayer, DiskPlan, Format, Manifest, disk_plan};
use crate::progress::Progress;
use crate::signals;
use crate::sink::Sink;
use crate::source::{Blob, BlobSource};
use crate::verify::{self, Job, StreamHasher, Verifier};
use crate::zerocopy::{Copier, Sparse, Tick};

/// Buffer for stream blobs (network bodies).
const STREAM_BUF: usize = 1 << 20;

/// How to stream.
#[derive(Clone, Debug)]
pub struct Options {
    /// Check every blob's digest (sizes are always enforced).
    pub verify: bool,
    /// Hashing threads for file-range blobs.
    pub hash_threads: usize,
    /// Zero blocks as holes in a regular-file output. `Auto` applies to raw
    /// disks only (a qcow2's zeros are rare and its layout is its own).
    pub sparse: Sparse,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            verify: true,
            hash_threads: verify::default_threads(),
            sparse: Sparse::Auto,
        }
    }
}

/// Resolve the source's manifest and stream its disk into `sink`.
pub fn stream(
    source: &dyn BlobSource,
    sink: &Sink<'_>,
    opts: &Options,
    progress: &mut Progress,
) -> Result<DiskPlan> {
    let resolved = source.resolve()?;
    stream_parsed(&resolved.manifest, source, sink, opts, progress)
}

/// Stream an already parsed manifest's disk into `sink`.
pub fn stream_parsed(
    manifest: &Manifest,
    source: &dyn BlobSource,
    sink: &Sink<'_>,
    opts: &Options,
    progress: &mut Progress,
) -> Result<DiskPlan> {
    let plan = disk_plan(manifest)?;
    stream_plan(&plan, source, sink, opts, progress)?;
    Ok(plan)
}

/// Stream the layers of `plan`, in order, into `sink`.
pub fn stream_plan(
    plan: &DiskPlan,
    source: &dyn BlobSource,
    sink: &Sink<'_>,
    opts: &Options,
    progress: &mut Progress,
) -> Result<()> {
    let mut verifier = Verifier::new(opts.hash_threads);
    let mut copier = Copier::new(sink);
    copier.set_sparse(match (opts.sparse, plan.format) {
        (Sparse::Auto, Format::Qcow2) => Sparse::Never,
        (mode, _) => mode,
    })?;
    let ahead = source.open_ahead().max(1);
    let mut opened: VecDeque<Blob> = VecDeque::new();
    let mut buf = Vec::new();
    let mut stream_hasher: Option<StreamHasher> = None;

    for (slot, layer) in plan.layers.iter().enumerate() {
        // Keep this blob and up to `ahead` more open; hash file blobs as
        // soon as they are open.
        let mut next = slot + opened.len();
        while next < plan.layers.len() && next <= slot.saturating_add(ahead) {
            let l = &plan.layers[next];
            let blob = source.open_blob(l)?;
            if opts.verify
                && let Blob::File { file, offset, len } = &blob
            {
                let file = file
                    .try_clone()
                    .map_err(|e| Error::io(format!("{}: duplicating fd", l.name()), e))?;
                verifier.submit(Job {
                    slot: next,
                    file,
                    offset: *offset,
                    len: *len,
                    expected: l.digest.clone(),
                    name: layer_label(l),
                })?;
            }
            opened.push_back(blob);
            next += 1;
        }
        signals::check()?;
        let blob = opened.pop_front().expect("the current blob is open");
        let label = layer_label(layer);
        let mut tick = |n: u64| -> Result<()> {
            progress.advance(n);
            signals::check()?;
            match verifier.failed() {
                true => Err(verifier.first_error().expect("a failure was flagged")),
                false => Ok(()),
            }
        };
        match blob {
            Blob::File { file, offset, len } => {
                copier.copy_range(&file, offset, len, &label, &mut tick)?;
            }
            Blob::Stream(mut body) => {
                let mut hasher = match (&mut stream_hasher, opts.verify) {
                    (Some(h), true) => Some(h),
                    (slot, true) => Some(slot.insert(StreamHasher::new(STREAM_BUF)?)),
                    (_, false) => None,
                };
                if let Some(h) = hasher.as_deref_mut() {
                    h.start(layer.digest.algorithm())?;
                }
                let mut pass = StreamPass {
                    label: &label,
                    size: layer.size,
                    copier: &mut copier,
                    buf: &mut buf,
                    tick: &mut tick,
                };
                pass.run(&mut *body, hasher.as_deref_mut())?;
                if let Some(h) = hasher {
                    verify::check(&label, &layer.digest, &h.finish()?)?;
                }
            }
        }
    }
    copier.finish()?;
    verifier.finish()?;
    signals::check()
}

/// How errors name a layer: its title and digest.
fn layer_label(layer: &DiskLayer) -> String {
    format!("{} ({})", layer.name(), layer.digest)
}

/// One stream blob on its way into the sink.
struct StreamPass<'a, 's, 'fd> {
    label: &'a str,
    size: u64,
    copier: &'a mut Copier<'s, 'fd>,
    buf: &'a mut Vec<u8>,
    tick: Tick<'a>,
}

impl StreamPass<'_, '_, '_> {
    /// Copy exactly `size` bytes of `body` into the sink. With a hasher, each
    /// buffer goes to the hashing thread once written, so hashing overlaps
    /// the next read and write; more or fewer bytes than `size` is an error.
    fn run(&mut self, body: &mut dyn Read, mut hasher: Option<&mut StreamHasher>) -> Result<()> {
        let label = self.label;
        let mut left = self.size;
        while left > 0 {
            let mut buf = match hasher.as_deref_mut() {
                Some(h) => h.buffer()?,
                None => std::mem::take(self.buf),
            };
            buf.resize(STREAM_BUF, 0);
            let want = usize::try_from(left).map_or(STREAM_BUF, |l| l.min(STREAM_BUF));
            // Fill the buffer (a network body hands out what one receive
            // brought): fewer, larger writes and hand-overs to the hasher.
            let mut n = 0;
            while n < want {
                match body.read(&mut buf[n..want]) {
                    Ok(0) if n > 0 => break,
                    Ok(0) => {
                        return Err(Error::Integrity(format!(
                            "{label}: blob is truncated: ended after {} of {} bytes",
                            self.size - left,
                            self.size
                        )));
                    }
                    Ok(k) => n += k,
                    Err(e) if e.kind() == ErrorKind::Interrupted => {
                        signals::check()?;
                    }
                    Err(e) => return Err(read_error(label, e)),
                }
            }
            if n > 0 {
                self.copier.write_bytes(&buf[..n])?;
                left -= n as u64;
            }
            match hasher.as_deref_mut() {
                Some(h) => h.feed(buf, n)?,
                None => *self.buf = buf,
            }
            if n > 0 {
                (self.tick)(n as u64)?;
            }
        }
        // One more read must find the end: a longer body is not the blob.
        let mut probe = [0u8; 1];
        loop {
            match body.read(&mut probe) {
                Ok(0) => return Ok(()),
                Ok(_) => {
                    return Err(Error::Integrity(format!(
                        "{label}: blob is oversized: more than the expected {} bytes",
                        self.size
                    )));
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => signals::check()?,
                Err(e) => return Err(read_error(label, e)),
            }
        }
    }
}

/// A read error of a stream blob. Sources that speak `io::Read` carry this
/// crate's own errors (which name the layer already) inside `io::Error`;
/// those come back out unchanged. Other I/O errors get the layer's label.
fn read_error(label: &str, e: std::io::Error) -> Error {
    if e.get_ref().is_some_and(|inner| inner.is::<Error>()) {
        let inner = e
            .into_inner()
            .expect("checked above")
            .downcast::<Error>()
            .expect("checked above");
        return *inner;
    }
    Error::io(format!("{label}: reading"), e)
}
