//! A response body: a byte range of a sequence of blob files (the disk
//! layers, or one blob), moved into the socket by the kernel, and never sent
//! as good unless every byte of it is known to be the bytes that were hashed.
//!
//! Before the head is sent ([`prepare`]), each blob the range touches is
//! leased ([`crate::lease`]) and its identity taken ([`Identity`]). A blob
//! with a good verdict for that identity is ready. One without is hashed
//! first — except in a whole-body `GET` of a leased blob, which streams while
//! hashing threads read the same file beside the copy. A blob with a bad
//! verdict fails the request with `500` before anything is sent.
//!
//! While sending ([`Body::send`]) the lease is checked after every chunk. The
//! last [`TAIL`] bytes of the body are held back: they are read into a
//! buffer, then every beside-the-copy verdict is awaited, the socket is
//! waited on until it has no unacknowledged bytes (until then the kernel
//! still reads the file's pages for retransmissions), every lease is checked
//! once more, and only then is the buffer sent. Any failure closes the
//! connection before `Content-Length` is met, so no client sees a clean end
//! of a body that was not vouched for.
//!
//! A blob that cannot be leased (we neither own it nor have `CAP_LEASE`, or
//! its file system has no leases) is hashed before it is sent, never beside,
//! and its identity is compared again before the tail goes out: a write
//! changes its ctime. That comparison is only sound for a file whose ctime
//! is older than the timestamp granularity, so an unleasable blob changed
//! in the last [`super::verdicts::SETTLED`] gets `503` with `Retry-After`.
//! (A writer holding a shared writable mapping since before the verdict
//! could still change such a file unseen; leases close that gap, which is
//! why they are preferred.)

use std::fs::File;
use std::net::TcpStream;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::SystemTime;

use super::image::Fail;
use super::verdicts::{Identity, Verdict, Verdicts, hash_file};
use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::lease;
use crate::route::{self, BlobKind, Route, Strategy};
use crate::sink::{Sink, SinkKind};
use crate::verify::{self, Job, Verifier};
use crate::zerocopy::{Copier, Range, pread, write_all};

/// Bytes held back at the end of every body until it is vouched for.
pub const TAIL: u64 = 16 << 10;

/// A blob file a response may send from.
pub struct Blob {
    pub file: File,
    pub digest: Digest,
    pub size: u64,
    /// How logs and errors name it (`layer "disk.00.qcow2.part" (sha256:…)`).
    pub label: String,
}

/// How the body is asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Want {
    /// `HEAD`: nothing is sent, nothing is hashed.
    Head,
    /// A part of the body: every blob is hashed before the head is sent.
    Part,
    /// The whole body with `GET`: unverified leased blobs hash beside the copy.
    Whole,
}

/// What the server lends a body.
pub struct Env<'a> {
    pub verify: bool,
    /// Kernel copies (`CLOUDIMG_IO=readwrite` turns them off).
    pub kernel: bool,
    pub verdicts: &'a Verdicts,
    /// Set when the server stops for good: hashing ends.
    pub stop: &'a AtomicBool,
}

struct Part {
    file: Arc<File>,
    digest: Digest,
    label: String,
    /// The identity the verdict is about (`None` unverified).
    id: Option<Identity>,
    leased: bool,
    /// Hashed beside the copy.
    beside: bool,
    /// Hashed by this response before its head.
    hashed: bool,
    /// The range of the file sent.
    range: Range,
}

/// A body ready to be sent.
pub struct Body {
    parts: Vec<Part>,
    len: u64,
}

/// The pieces of a concatenation of blobs of `sizes` that the byte range
/// `start..start + len` covers: (blob index, offset in the blob, length).
pub fn pieces(sizes: &[u64], start: u64, len: u64) -> Vec<(usize, Range)> {
    let end = start + len;
    let mut at = 0u64;
    let mut out = Vec::new();
    for (i, &size) in sizes.iter().enumerate() {
        let (from, to) = (start.max(at), end.min(at + size));
        if from < to {
            out.push((
                i,
                Range {
                    offset: from - at,
                    len: to - from,
                },
            ));
        }
        at += size;
    }
    out
}

/// Make a body of `ranges` of `blobs` (each blob once, in order) ready to
/// send: leases, identities, verdicts, and hashing where it must come first.
pub fn prepare(env: &Env<'_>, blobs: Vec<(Blob, Range)>, want: Want) -> Result<Body, Fail> {
    let mut parts = Vec::with_capacity(blobs.len());
    let mut len = 0;
    for (blob, range) in blobs {
        len += range.len;
        parts.push(prepare_blob(env, blob, range, want)?);
    }
    Ok(Body { parts, len })
}

fn prepare_blob(env: &Env<'_>, blob: Blob, range: Range, want: Want) -> Result<Part, Fail> {
    let Blob {
        file,
        digest,
        size,
        label,
    } = blob;
    let mut part = Part {
        file: Arc::new(file),
        digest,
        label,
        id: None,
        leased: false,
        beside: false,
        hashed: false,
        range,
    };
    if !env.verify {
        return Ok(part);
    }
    part.leased = want != Want::Head && lease::take(&part.file);
    let id =
        Identity::of(&part.file).map_err(|e| Fail::internal(format!("{}: {e}", part.label)))?;
    part.id = Some(id);
    if id.size() != size {
        return Err(Fail::internal(format!(
            "{}: the blob file is {} bytes, the manifest says {size}",
            part.label,
            id.size()
        )));
    }
    let now = SystemTime::now();
    match env.verdicts.lookup(&id, &part.digest) {
        Verdict::Bad(why) => return Err(Fail::internal(why)),
        Verdict::Good | Verdict::Unknown if want == Want::Head => return Ok(part),
        _ if !part.leased && !id.settled(now) => {
            let mut fail = Fail::new(
                503,
                "UNAVAILABLE",
                format!(
                    "{}: the blob file changed moments ago and cannot be leased; retry",
                    part.label
                ),
            );
            fail.retry = Some(super::verdicts::SETTLED.as_secs() as u32);
            return Err(fail);
        }
        Verdict::Good => return Ok(part),
        Verdict::Unknown if want == Want::Whole && part.leased => {
            part.beside = true;
            return Ok(part);
        }
        Verdict::Unknown => {}
    }
    let (file, leased, label, digest) = (&part.file, part.leased, &part.label, &part.digest);
    let mut hashed = false;
    env.verdicts
        .settle(id, digest, env.stop, || {
            hashed = true;
            let began = SystemTime::now();
            let actual = hash_file(file, size, digest, env.stop)?;
            verify::check(label, digest, &actual)?;
            unchanged(file, leased, &id, label)?;
            Ok(began)
        })
        .map_err(|e| Fail::internal(e.to_string()))?;
    part.hashed = hashed;
    Ok(part)
}

/// `Err` when the file is no longer the one its verdict is about: its lease
/// was broken, or (unleased) its identity changed.
fn unchanged(file: &File, leased: bool, id: &Identity, label: &str) -> Result<()> {
    if leased {
        return lease::ensure_held(file, label);
    }
    match Identity::of(file) {
        Ok(now) if now == *id => Ok(()),
        _ => Err(Error::Integrity(format!(
            "{label}: the blob file changed while it was sent; the response cannot be vouched for"
        ))),
    }
}

impl Body {
    pub fn len(&self) -> u64 {
        self.len
    }

    /// How many blobs this response hashes (before its head or beside the
    /// copy): for the log.
    pub fn hashing(&self) -> usize {
        self.parts.iter().filter(|p| p.hashed || p.beside).count()
    }

    /// Send the body into `sock`; `progress` is called after every chunk.
    /// On failure, the bytes sent so far and why: the caller must close the
    /// connection (the tail was never sent, so `Content-Length` is not met).
    pub fn send(
        self,
        env: &Env<'_>,
        sock: &TcpStream,
        progress: &dyn Fn(),
    ) -> std::result::Result<u64, (u64, Error)> {
        let mut sent = 0u64;
        match self.run(env, sock, progress, &mut sent) {
            Ok(()) => Ok(sent),
            Err(e) => Err((sent, e)),
        }
    }

    fn run(
        self,
        env: &Env<'_>,
        sock: &TcpStream,
        progress: &dyn Fn(),
        sent: &mut u64,
    ) -> Result<()> {
        let sink = Sink::new(sock.as_fd())?;
        // The one transfer decision: a verified body enters the socket
        // through a buffer (a peer on this host acknowledges page references
        // it has not read yet, so no lease could cover them); `--no-verify`
        // uses sendfile.
        let policy = route::Policy {
            sink: SinkKind::Socket,
            sparse: route::Sparse::Never,
            kernel: env.kernel,
            verify: env.verify,
        };
        let began = SystemTime::now();
        let mut verifier: Option<Verifier> = None;
        for (slot, p) in self.parts.iter().enumerate().filter(|(_, p)| p.beside) {
            let v = verifier.get_or_insert_with(|| Verifier::new(verify::default_threads()));
            v.submit(Job {
                slot,
                file: Arc::clone(&p.file),
                offset: p.range.offset,
                len: p.range.len,
                expected: p.digest.clone(),
                name: p.label.clone(),
            })?;
        }
        let tail = TAIL.min(self.len);
        let body_end = self.len - tail;
        let mut copier = Copier::new(&sink);
        let mut at = 0u64;
        let mut held = Vec::with_capacity(tail as usize);
        for p in &self.parts {
            let Range { offset, len } = p.range;
            let now_len = len.min(body_end.saturating_sub(at));
            if now_len > 0 {
                let lease = p.leased.then_some((&*p.file, p.label.as_str()));
                let verifier = verifier.as_ref();
                let mut tick = |n: u64| -> Result<()> {
                    *sent += n;
                    progress();
                    if let Some(v) = verifier
                        && v.failed()
                    {
                        return Err(v.first_error().expect("a failure was flagged"));
                    }
                    match lease {
                        Some((file, label)) => lease::ensure_held(file, label),
                        None => Ok(()),
                    }
                };
                let range = Range {
                    offset,
                    len: now_len,
                };
                let blob = BlobKind::File {
                    same_fs: false,
                    leased: p.leased,
                };
                let strategies: &[Strategy] = match route::choose(&policy, blob) {
                    Route::Kernel(strategies) => strategies,
                    Route::Buffered { .. } => &[Strategy::ReadWrite],
                };
                copier.copy_range(&p.file, range, strategies, &p.label, &mut tick)?;
            }
            // The held-back part of this piece, read while the lease holds.
            let mut from = offset + now_len;
            let end = offset + len;
            while from < end {
                let mut buf = vec![0u8; (end - from) as usize];
                let got = pread(&p.file, &mut buf, from)
                    .map_err(|e| Error::io(format!("{}: reading", p.label), e.into()))?;
                if got == 0 {
                    return Err(Error::truncated(&p.label, from, end));
                }
                held.extend_from_slice(&buf[..got]);
                from += got as u64;
            }
            at += len;
        }
        if let Some(v) = verifier {
            v.finish()?;
        }
        for p in &self.parts {
            if let Some(id) = &p.id {
                unchanged(&p.file, p.leased, id, &p.label)?;
            }
        }
        for p in self.parts.iter().filter(|p| p.beside) {
            if let Some(id) = p.id {
                env.verdicts.good(id, &p.digest, began);
            }
        }
        write_all(sink.fd(), &held).map_err(|e| Error::io("sending", e.into()))?;
        *sent += held.len() as u64;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_span_part_boundaries() {
        let sizes = [10, 20, 5];
        let r = |offset, len| Range { offset, len };
        assert_eq!(
            pieces(&sizes, 0, 35),
            vec![(0, r(0, 10)), (1, r(0, 20)), (2, r(0, 5))]
        );
        assert_eq!(pieces(&sizes, 8, 4), vec![(0, r(8, 2)), (1, r(0, 2))]);
        assert_eq!(pieces(&sizes, 34, 1), vec![(2, r(4, 1))]);
        assert_eq!(pieces(&sizes, 10, 20), vec![(1, r(0, 20))]);
        assert_eq!(pieces(&[0, 3], 0, 3), vec![(1, r(0, 3))]);
    }
}
