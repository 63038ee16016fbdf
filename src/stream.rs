//! The Go reference's Stream: concatenate a cloud image's disk layers into a
//! sink, each blob exactly its size and, unless told otherwise, verified
//! against its digest. The stream is complete only when every verdict is in
//! and the consumer can no longer see a byte that was not hashed.
//!
//! Each blob opened gets its [`Route`] from [`route::choose`]: a kernel
//! route ([`Copier`], hashed beside the copy by the [`Verifier`] under a
//! read lease) or a buffered one ([`Buffered`], hashed as written).
//!
//! A raw disk asked for as qcow2 is framed by a [`Qcow2Frame`]: its
//! metadata goes first, each blob then delivers only the ranges that hold
//! data (the rest is hashed all the same, and checked for zeros where it
//! passes through a buffer), and zeros fill the last cluster.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{ErrorKind, Read};
use std::os::fd::BorrowedFd;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::Arc;

use rustix::io::Errno;

use crate::error::{Error, Result};
use crate::holes::{HoleWriter, is_zero};
use crate::lease::{self, Leases};
use crate::manifest::{DiskLayer, DiskPlan, Format};
use crate::progress::Progress;
use crate::qcow2::{self, FileBlob, Qcow2Frame};
use crate::repeat::{Repeats, Spill};
use crate::route::{self, BlobKind, Policy, Route, Sparse};
use crate::signals;
use crate::sink::Sink;
use crate::source::{Blob, BlobSource};
use crate::verify::{self, Job, StreamHasher, Verifier};
use crate::zerocopy::{BUF_SIZE, Copier, FileRange, Range, Tick, write_all};

/// How to stream.
#[derive(Clone, Debug)]
pub struct Options {
    /// Check every blob's digest (sizes are always enforced).
    pub verify: bool,
    /// Hashing threads for blobs on a kernel route.
    pub hash_threads: usize,
    /// Zero blocks as holes in a regular-file output. `Auto` applies to raw
    /// disks only (a qcow2's zeros are rare and its layout is its own).
    pub sparse: Sparse,
    /// Let the kernel move file blobs (`CLOUDIMG_IO=readwrite` turns this
    /// off, for tests and benchmarks of the portable path).
    pub kernel_copy: bool,
    /// The disk format to deliver (`None`: the image's own). A raw disk
    /// can be delivered as qcow2; a qcow2 disk only as itself.
    pub format: Option<Format>,
    /// Where a network blob whose digest repeats later in the plan is kept,
    /// in a private file without a name, so that it is fetched once (see
    /// [`crate::repeat`]); `None`: fetched at every occurrence. Best on the
    /// output's file system, where the copies can be reflinks.
    pub spill_dir: Option<PathBuf>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            verify: true,
            hash_threads: verify::default_threads(),
            sparse: Sparse::Auto,
            kernel_copy: true,
            format: None,
            spill_dir: None,
        }
    }
}

/// A blob of the plan, queued: open, or a later occurrence of an earlier
/// slot's digest, to be served from that slot's spill once it is complete.
enum Queued {
    Open(Planned),
    Later { first: usize },
}

/// An open blob and the way it will take.
struct Planned {
    blob: Opened,
    route: Route,
    leased: bool,
}

/// A [`Blob`] once opened for the stream: a file is shared with the hashing
/// thread (no second fd per layer) and, leased, kept until the end.
enum Opened {
    File {
        file: Arc<File>,
        offset: u64,
        len: u64,
    },
    Stream(Box<dyn Read + Send>),
}

/// Stream the layers of `plan`, in order, into `sink`.
pub fn stream_plan(
    plan: &DiskPlan,
    source: &dyn BlobSource,
    sink: &Sink<'_>,
    opts: &Options,
    progress: &mut Progress,
) -> Result<()> {
    let output = opts.format.unwrap_or(plan.format);
    let mut frame = match (plan.format, output) {
        (Format::Raw, Format::Qcow2) => Some(Qcow2Frame::new(plan)?),
        (Format::Qcow2, Format::Raw) => return Err(qcow2::no_raw_from_qcow2()),
        _ => None,
    };
    let sparse = match (opts.sparse, output) {
        (Sparse::Auto, Format::Qcow2) => Sparse::Never,
        (mode, _) => mode,
    };
    let policy = Policy::new(sink, sparse, opts.kernel_copy, opts.verify);
    let mut verifier = Verifier::new(opts.hash_threads);
    let mut copier = Copier::new(sink);
    let mut buffered = Buffered::new(sink.fd(), policy.sparse != Sparse::Never, opts.verify);
    let mut leases = Leases::default();
    let ahead = source.open_ahead().max(1);
    let mut opened: VecDeque<Queued> = VecDeque::new();
    let mut repeats = Repeats::new(plan, opts.spill_dir.clone());

    for (slot, layer) in plan.layers.iter().enumerate() {
        // Keep this blob and up to `ahead` more open; hash kernel-route
        // blobs as soon as they are open. A digest seen before in the plan
        // is not fetched again: it waits for the earlier one's spill.
        let mut next = slot + opened.len();
        while next < plan.layers.len() && next <= slot.saturating_add(ahead) {
            let l = &plan.layers[next];
            let queued = match repeats.served_by(next) {
                Some(first) => Queued::Later { first },
                None => {
                    let blob = source.open_blob(l)?;
                    repeats.start(next, &blob);
                    let planned = plan_blob(blob, &policy, sink);
                    hash_beside(&mut verifier, opts.verify, next, l, &planned)?;
                    Queued::Open(planned)
                }
            };
            opened.push_back(queued);
            next += 1;
        }
        if let (0, Some(frame)) = (slot, frame.as_mut()) {
            frame_head(frame, &opened, &mut buffered, progress)?;
        }
        signals::check()?;
        let planned = match opened.pop_front().expect("the current blob is open") {
            Queued::Open(planned) => planned,
            Queued::Later { first } => {
                let blob = match repeats.blob(first, layer.size) {
                    Some(blob) => blob,
                    None => source.open_blob(layer)?,
                };
                let planned = plan_blob(blob, &policy, sink);
                hash_beside(&mut verifier, opts.verify, slot, layer, &planned)?;
                planned
            }
        };
        let Planned {
            blob,
            route,
            leased,
        } = planned;
        let label = layer.label();
        // With a frame, the ranges of the blob that are delivered.
        let keep = frame.as_ref().map(|f| f.keep(slot));
        match (blob, route) {
            (Opened::File { file, offset, len }, Route::Kernel(strategies)) => {
                {
                    let lease = leased.then_some((&*file, label.as_str()));
                    let mut tick = ticker(progress, &verifier, lease);
                    let whole = [Range { offset: 0, len }];
                    for r in keep.as_deref().unwrap_or(&whole) {
                        let range = Range {
                            offset: offset + r.offset,
                            len: r.len,
                        };
                        copier.copy_range(&file, range, strategies, &label, &mut tick)?;
                    }
                }
                if leased {
                    leases.keep(file, label);
                }
            }
            (Opened::File { file, offset, len }, Route::Buffered { .. }) => {
                let mut range = FileRange::new(&file, Range { offset, len });
                let mut tick = ticker(progress, &verifier, None);
                buffered.run(&mut range, layer, &label, keep.as_deref(), None, &mut tick)?;
            }
            (Opened::Stream(mut body), _) => {
                let mut tick = ticker(progress, &verifier, None);
                let spill = repeats.writing(slot);
                buffered.run(&mut *body, layer, &label, keep.as_deref(), spill, &mut tick)?;
                repeats.finished(slot, layer.size);
            }
        }
    }
    if let Some(frame) = &frame {
        let tail = frame.tail();
        buffered.put(&tail)?;
        progress.advance(tail.len() as u64);
    }
    buffered.finish()?;
    verifier.finish()?;
    leases.release(sink)?;
    signals::check()
}

/// Lay out the qcow2 image once the first blobs are open (all of a
/// layout's) and write its metadata, before any byte of the disk.
fn frame_head(
    frame: &mut Qcow2Frame,
    opened: &VecDeque<Queued>,
    out: &mut Buffered<'_>,
    progress: &mut Progress,
) -> Result<()> {
    let files: Vec<FileBlob<'_>> = opened
        .iter()
        .enumerate()
        .filter_map(|(slot, q)| match q {
            Queued::Open(Planned {
                blob: Opened::File { file, offset, .. },
                ..
            }) => Some(FileBlob {
                slot,
                file,
                offset: *offset,
            }),
            // Streams, and repeats of streams: every cluster holds data.
            _ => None,
        })
        .collect();
    progress.set_total(frame.plan(&files)?);
    frame.head(&mut |bytes| {
        out.put(bytes)?;
        progress.advance(bytes.len() as u64);
        signals::check()
    })
}

/// Queue a verified file blob on a kernel route with the hashing threads.
fn hash_beside(
    verifier: &mut Verifier,
    verify: bool,
    slot: usize,
    layer: &DiskLayer,
    planned: &Planned,
) -> Result<()> {
    if let (true, Opened::File { file, offset, len }, Route::Kernel(_)) =
        (verify, &planned.blob, planned.route)
    {
        verifier.submit(Job {
            slot,
            file: Arc::clone(file),
            offset: *offset,
            len: *len,
            expected: layer.digest.clone(),
            name: layer.label(),
        })?;
    }
    Ok(())
}

/// Decide an opened blob's route; a file blob on its way to a kernel route
/// is leased first.
fn plan_blob(blob: Blob, policy: &Policy, sink: &Sink<'_>) -> Planned {
    let (blob, kind, leased) = match blob {
        Blob::Stream(body) => (Opened::Stream(body), BlobKind::Stream, false),
        Blob::File { file, offset, len } => {
            let same_fs = file
                .metadata()
                .is_ok_and(|m| sink.same_file_system(m.dev()));
            // Lease only a blob that a lease would put on a kernel route:
            // a lease makes every writer that opens the file wait.
            let would_lease = BlobKind::File {
                same_fs,
                leased: true,
            };
            let leased = policy.verify
                && matches!(route::choose(policy, would_lease), Route::Kernel(_))
                && lease::take(&file);
            let file = Arc::new(file);
            let opened = Opened::File { file, offset, len };
            (opened, BlobKind::File { same_fs, leased }, leased)
        }
    };
    Planned {
        blob,
        route: route::choose(policy, kind),
        leased,
    }
}

/// The check after every chunk: progress, signals, a failed verdict
/// elsewhere, and the lease of the blob being moved.
fn ticker<'a>(
    progress: &'a mut Progress,
    verifier: &'a Verifier,
    lease: Option<(&'a File, &'a str)>,
) -> impl FnMut(u64) -> Result<()> + 'a {
    move |n| {
        progress.advance(n);
        signals::check()?;
        if verifier.failed() {
            return Err(verifier.first_error().expect("a failure was flagged"));
        }
        match lease {
            Some((file, label)) => lease::ensure_held(file, label),
            None => Ok(()),
        }
    }
}

/// The buffered route: read a blob into buffers, write each, then hand the
/// very buffer written to the hashing thread — so hashing overlaps the next
/// read and write, and the digest covers exactly the bytes delivered.
struct Buffered<'fd> {
    out: BorrowedFd<'fd>,
    holes: Option<HoleWriter<'fd>>,
    verify: bool,
    /// Started with the first blob that needs it.
    hasher: Option<StreamHasher>,
    /// The one buffer of an unverified run.
    buf: Vec<u8>,
}

impl<'fd> Buffered<'fd> {
    fn new(out: BorrowedFd<'fd>, holes: bool, verify: bool) -> Self {
        Buffered {
            out,
            holes: holes.then(|| HoleWriter::new(out)),
            verify,
            hasher: None,
            buf: Vec::new(),
        }
    }

    /// Move exactly `layer.size` bytes of `body` into the sink and check
    /// them; more or fewer bytes than the size is an error. With `keep`,
    /// only those ranges of the blob are written, and every other byte must
    /// be zero (it is hashed all the same). With `spill`, every byte also
    /// goes there, from the very buffer that is hashed.
    fn run(
        &mut self,
        body: &mut dyn Read,
        layer: &DiskLayer,
        label: &str,
        keep: Option<&[Range]>,
        mut spill: Option<&mut Spill>,
        tick: Tick<'_>,
    ) -> Result<()> {
        if self.verify && self.hasher.is_none() {
            self.hasher = Some(StreamHasher::new(BUF_SIZE)?);
        }
        let hasher = self.hasher.as_mut().filter(|_| self.verify);
        if let Some(h) = &hasher {
            h.start(layer.digest.algorithm())?;
        }
        let size = layer.size;
        let mut left = size;
        let mut hasher = hasher;
        let mut next_kept = 0;
        while left > 0 {
            let mut buf = match hasher.as_deref_mut() {
                Some(h) => h.buffer()?,
                None => std::mem::take(&mut self.buf),
            };
            buf.resize(BUF_SIZE, 0);
            let want = usize::try_from(left).map_or(BUF_SIZE, |l| l.min(BUF_SIZE));
            // Fill the buffer (a network body hands out what one receive
            // brought): fewer, larger writes and hand-overs to the hasher.
            let mut n = 0;
            while n < want {
                match body.read(&mut buf[n..want]) {
                    Ok(0) if n > 0 => break,
                    Ok(0) => return Err(Error::truncated(label, size - left, size)),
                    Ok(k) => n += k,
                    Err(e) if e.kind() == ErrorKind::Interrupted => signals::check()?,
                    Err(e) => return Err(Error::from_read(label, e)),
                }
            }
            let (out, holes) = (self.out, &mut self.holes);
            let mut put = |bytes: &[u8]| put(out, holes, bytes);
            let written = match keep {
                None => put(&buf[..n]).map(|()| n as u64)?,
                Some(keep) => {
                    let at = size - left;
                    put_kept(&buf[..n], at, keep, &mut next_kept, label, &mut put)?
                }
            };
            if let Some(spill) = spill.as_deref_mut() {
                spill.write(size - left, &buf[..n]);
            }
            left -= n as u64;
            match hasher.as_deref_mut() {
                Some(h) => h.feed(buf, n)?,
                None => self.buf = buf,
            }
            tick(written)?;
        }
        // One more read must find the end: a longer body is not the blob.
        let mut probe = [0u8; 1];
        loop {
            match body.read(&mut probe) {
                Ok(0) => break,
                Ok(_) => return Err(Error::oversized(label, size)),
                Err(e) if e.kind() == ErrorKind::Interrupted => signals::check()?,
                Err(e) => return Err(Error::from_read(label, e)),
            }
        }
        match hasher {
            Some(h) => verify::check(label, &layer.digest, &h.finish()?),
            None => Ok(()),
        }
    }

    /// Write bytes of our own (a frame's metadata or padding).
    fn put(&mut self, bytes: &[u8]) -> Result<()> {
        put(self.out, &mut self.holes, bytes)
    }

    /// A file that ends in a hole gets its length.
    fn finish(&mut self) -> Result<()> {
        match self.holes.as_mut() {
            Some(h) => h
                .finish()
                .map_err(|e| Error::io("finishing the output", e.into())),
            None => Ok(()),
        }
    }
}

/// Write `bytes` into the sink, leaving holes for zero blocks when asked to.
fn put(out: BorrowedFd<'_>, holes: &mut Option<HoleWriter<'_>>, bytes: &[u8]) -> Result<()> {
    match holes.as_mut() {
        Some(h) => h.write(bytes),
        None => write_all(out, bytes),
    }
    .map_err(output_error)
}

/// Write the parts of `chunk` (the blob's bytes from `at`) that lie in the
/// `keep` ranges; the parts between them must be zeros, as they were when
/// the image was laid out. `next` is the first range not yet passed.
/// Returns the bytes written.
fn put_kept(
    chunk: &[u8],
    at: u64,
    keep: &[Range],
    next: &mut usize,
    label: &str,
    put: &mut dyn FnMut(&[u8]) -> Result<()>,
) -> Result<u64> {
    let end = at + chunk.len() as u64;
    let slice = |from: u64, to: u64| &chunk[(from - at) as usize..(to - at) as usize];
    let mut pos = at;
    let mut written = 0;
    while pos < end {
        while keep.get(*next).is_some_and(|r| r.offset + r.len <= pos) {
            *next += 1;
        }
        let (from, to) = match keep.get(*next) {
            Some(r) => (r.offset.clamp(pos, end), (r.offset + r.len).min(end)),
            None => (end, end),
        };
        if !is_zero(slice(pos, from)) {
            return Err(Error::Integrity(format!(
                "{label}: the blob changed while it was streamed (bytes that were zeros when \
                 the image was laid out hold data now); the output cannot be vouched for"
            )));
        }
        if from < to {
            put(slice(from, to))?;
            written += to - from;
        }
        pos = to.max(from);
    }
    Ok(written)
}

/// A failed write into the sink: a signal, or what the kernel said.
fn output_error(e: Errno) -> Error {
    match e {
        Errno::INTR => signals::check().err().unwrap_or(Error::Interrupted(0)),
        e => Error::io("writing the output", e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest::{Algorithm, Digest};
    use crate::source::Resolved;
    use std::io::Cursor;
    use std::os::fd::AsFd;

    /// A source serving each layer's bytes from memory, as a stream or as a
    /// file, whatever the digest says.
    struct Fake {
        blobs: Vec<Vec<u8>>,
        as_files: bool,
        dir: tempfile::TempDir,
    }

    impl BlobSource for Fake {
        fn resolve(&self) -> Result<Resolved> {
            Err(Error::Other("not used".into()))
        }
        fn open_blob(&self, layer: &DiskLayer) -> Result<Blob> {
            let bytes = self.blobs[layer.index].clone();
            if !self.as_files {
                return Ok(Blob::Stream(Box::new(Cursor::new(bytes))));
            }
            let path = self.dir.path().join(layer.index.to_string());
            std::fs::write(&path, &bytes).unwrap();
            Ok(Blob::File {
                file: File::open(&path).unwrap(),
                offset: 0,
                len: bytes.len() as u64,
            })
        }
    }

    fn bytes(len: usize, salt: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31) ^ salt)
            .collect()
    }

    /// A plan whose layers promise `parts` (size and digest), and a source
    /// that serves `served` instead where given.
    fn setup(parts: &[Vec<u8>], served: &[Vec<u8>], as_files: bool) -> (DiskPlan, Fake) {
        let layers: Vec<DiskLayer> = parts
            .iter()
            .enumerate()
            .map(|(index, p)| DiskLayer {
                title: format!("disk.{index:02}.raw.part"),
                media_type: "application/vnd.cocoonstack.disk.raw.part".into(),
                size: p.len() as u64,
                digest: Digest::of(Algorithm::Sha256, p),
                index,
            })
            .collect();
        let plan = DiskPlan {
            format: Format::Raw,
            total: layers.iter().map(|l| l.size).sum(),
            layers,
            skipped: Vec::new(),
        };
        let fake = Fake {
            blobs: served.to_vec(),
            as_files,
            dir: tempfile::tempdir().unwrap(),
        };
        (plan, fake)
    }

    /// Stream into a fresh regular file; the bytes written and the result.
    fn run(plan: &DiskPlan, fake: &Fake, verify: bool) -> (Vec<u8>, Result<()>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out");
        let out = File::create_new(&path).unwrap();
        let sink = Sink::new(out.as_fd()).unwrap();
        let opts = Options {
            verify,
            sparse: Sparse::Never,
            ..Options::default()
        };
        let mut progress = Progress::new(plan.total, true);
        let r = stream_plan(plan, fake, &sink, &opts, &mut progress);
        (std::fs::read(&path).unwrap(), r)
    }

    #[test]
    fn parts_arrive_whole_and_in_order_from_streams_and_files() {
        let parts = vec![bytes(3 << 20, 1), bytes(5, 2), bytes((1 << 20) + 1, 3)];
        for as_files in [false, true] {
            let (plan, fake) = setup(&parts, &parts, as_files);
            let (out, r) = run(&plan, &fake, true);
            r.unwrap();
            assert_eq!(out, parts.concat(), "as_files={as_files}");
        }
    }

    #[test]
    fn a_short_stream_blob_is_truncated_naming_the_layer() {
        let parts = vec![bytes(1000, 1), bytes(2000, 2)];
        let served = vec![parts[0].clone(), parts[1][..1500].to_vec()];
        let (plan, fake) = setup(&parts, &served, false);
        let e = run(&plan, &fake, true).1.unwrap_err().to_string();
        assert!(e.contains("disk.01.raw.part"), "{e}");
        assert!(
            e.contains("truncated: ended after 1500 of 2000 bytes"),
            "{e}"
        );
    }

    #[test]
    fn a_long_stream_blob_is_oversized() {
        let parts = vec![bytes(1000, 1)];
        let served = vec![bytes(1001, 1)];
        let (plan, fake) = setup(&parts, &served, false);
        let e = run(&plan, &fake, true).1.unwrap_err().to_string();
        assert!(e.contains("oversized"), "{e}");
    }

    #[test]
    fn kept_ranges_are_written_and_the_bytes_between_must_be_zeros() {
        let keep = [Range { offset: 2, len: 3 }, Range { offset: 8, len: 4 }];
        let mut out = Vec::new();
        let mut next = 0;
        // Two chunks of one blob: 0..6 and 6..14, a kept range cut by the
        // chunk boundary.
        let blob = [0, 0, 1, 2, 3, 0, 0, 0, 4, 5, 6, 7, 0, 0];
        for (at, chunk) in [(0u64, &blob[..6]), (6, &blob[6..])] {
            let mut put = |b: &[u8]| {
                out.extend_from_slice(b);
                Ok(())
            };
            put_kept(chunk, at, &keep, &mut next, "blob", &mut put).unwrap();
        }
        assert_eq!(out, [1, 2, 3, 4, 5, 6, 7]);
        // A byte that is no longer zero between kept ranges fails the stream.
        let mut changed = blob;
        changed[6] = 9;
        let mut next = 0;
        let e = put_kept(
            &changed,
            0,
            &keep,
            &mut next,
            "layer \"p\"",
            &mut |_| Ok(()),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("layer \"p\": the blob changed while it was streamed"),
            "{e}"
        );
    }

    #[test]
    fn a_raw_disk_asked_for_as_qcow2_is_framed_on_every_route() {
        // The first part is all zeros: from files it is left out of the
        // image, from streams (read once) it is allocated like the rest.
        let parts = vec![vec![0u8; 100_000], bytes(200_000, 2), bytes(70_000, 3)];
        let mut images = Vec::new();
        for (as_files, kernel) in [(true, true), (true, false), (false, true)] {
            let (plan, fake) = setup(&parts, &parts, as_files);
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("out");
            let out = File::create_new(&path).unwrap();
            let sink = Sink::new(out.as_fd()).unwrap();
            let opts = Options {
                format: Some(Format::Qcow2),
                kernel_copy: kernel,
                ..Options::default()
            };
            let mut progress = Progress::new(plan.total, true);
            stream_plan(&plan, &fake, &sink, &opts, &mut progress).unwrap();
            let image = std::fs::read(&path).unwrap();
            assert_eq!(&image[..4], b"QFI\xfb");
            assert_eq!(progress.bytes(), image.len() as u64);
            images.push(image);
        }
        // Files: 370 000 bytes from cluster 1 on (cluster 0 is zeros):
        // clusters 1..=5, five of them; streams: all six.
        assert!(images[0] == images[1], "kernel and buffered routes differ");
        assert_eq!(images[2].len() - images[0].len(), 65536);
    }

    #[test]
    fn a_wrong_digest_fails_on_every_route_unless_unverified() {
        let parts = vec![bytes(2 << 20, 1), bytes(1 << 20, 2)];
        let mut served = parts.clone();
        served[1][4242] ^= 1;
        for as_files in [false, true] {
            let (plan, fake) = setup(&parts, &served, as_files);
            let e = run(&plan, &fake, true).1.unwrap_err().to_string();
            assert!(e.contains("disk.01.raw.part"), "{e}");
            assert!(e.contains("digest mismatch"), "{e}");
            let (out, r) = run(&plan, &fake, false);
            r.unwrap();
            assert_eq!(out, served.concat());
        }
    }
}
