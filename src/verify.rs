//! Digest verification beside the copy.
//!
//! File-range blobs are hashed by worker threads that read the same range from
//! the page cache a window at a time, while the main thread has the
//! kernel move the bytes. Workers take blobs in stream order, so with several
//! workers several parts hash at once. Memory stays bounded: one window per
//! worker, whatever the disk size. A failed verdict raises a flag that the
//! copy loop checks after every chunk, so a bad part stops the stream early.

use std::collections::VecDeque;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use crate::digest::{Digest, Hasher};
use crate::error::{Error, Result};
use crate::signals;

/// Bytes hashed per read.
const WINDOW: usize = 1 << 20;

/// One blob to hash: `len` bytes of `file` from `offset`.
pub struct Job {
    /// Position in the stream; the first failure in stream order is reported.
    pub slot: usize,
    pub file: File,
    pub offset: u64,
    pub len: u64,
    pub expected: Digest,
    /// How errors name the blob (`layer "x.part"`).
    pub name: String,
}

#[derive(Default)]
struct Queue {
    jobs: VecDeque<Job>,
    closed: bool,
}

#[derive(Default)]
struct Shared {
    queue: Mutex<Queue>,
    ready: Condvar,
    cancel: AtomicBool,
    failed: AtomicBool,
    errors: Mutex<Vec<(usize, Error)>>,
}

/// A pool of hashing threads, started as jobs arrive.
pub struct Verifier {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    max_workers: usize,
}

/// The default number of hashing threads: one per core, at most four.
pub fn default_threads() -> usize {
    std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, 4)
}

impl Verifier {
    pub fn new(max_workers: usize) -> Verifier {
        Verifier {
            shared: Arc::default(),
            workers: Vec::new(),
            max_workers: max_workers.max(1),
        }
    }

    /// Queue a blob for hashing.
    pub fn submit(&mut self, job: Job) -> Result<()> {
        let backlog = {
            let mut q = self.shared.queue.lock().expect("verifier queue");
            q.jobs.push_back(job);
            q.jobs.len()
        };
        self.shared.ready.notify_one();
        if self.workers.len() < self.max_workers && backlog > 0 {
            let shared = Arc::clone(&self.shared);
            let handle = std::thread::Builder::new()
                .name("cloudimg-hash".to_owned())
                .spawn(move || worker(&shared))
                .map_err(|e| Error::io("starting a hashing thread", e))?;
            self.workers.push(handle);
        }
        Ok(())
    }

    /// True once any blob has failed its check.
    pub fn failed(&self) -> bool {
        self.shared.failed.load(Ordering::Relaxed)
    }

    /// The first failure in stream order, if any verdict so far is bad.
    pub fn first_error(&self) -> Option<Error> {
        let mut errors = self.shared.errors.lock().expect("verifier errors");
        errors.sort_by_key(|(slot, _)| *slot);
        (!errors.is_empty()).then(|| errors.remove(0).1)
    }

    /// Wait for every verdict; the first failure in stream order wins.
    pub fn finish(mut self) -> Result<()> {
        self.close();
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
        match self.first_error() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn close(&self) {
        self.shared.queue.lock().expect("verifier queue").closed = true;
        self.shared.ready.notify_all();
    }
}

impl Drop for Verifier {
    /// An abandoned verifier (the stream failed) stops hashing at the next window.
    fn drop(&mut self) {
        self.shared.cancel.store(true, Ordering::Relaxed);
        self.close();
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

fn worker(shared: &Shared) {
    signals::block_in_this_thread();
    loop {
        let job = {
            let mut q = shared.queue.lock().expect("verifier queue");
            loop {
                if shared.cancel.load(Ordering::Relaxed) {
                    return;
                }
                if let Some(job) = q.jobs.pop_front() {
                    break job;
                }
                if q.closed {
                    return;
                }
                q = shared.ready.wait(q).expect("verifier queue");
            }
        };
        let verdict = match hash_range(
            &job.file,
            job.offset,
            job.len,
            &job.expected,
            &shared.cancel,
        ) {
            Ok(Some(actual)) => check(&job.name, &job.expected, &actual),
            Ok(None) => continue, // cancelled
            Err(e) => Err(Error::io(format!("{}: hashing", job.name), e)),
        };
        if let Err(e) = verdict {
            shared.failed.store(true, Ordering::Relaxed);
            shared
                .errors
                .lock()
                .expect("verifier errors")
                .push((job.slot, e));
        }
    }
}

/// Hash `len` bytes of `file` from `offset`, a window at a time, read with
/// `pread` from the page cache. (A mapping would save that copy, but a blob
/// truncated by someone else while mapped raises SIGBUS, and dying on a
/// signal is exactly what must never happen with cocoon on the other end.)
/// `None` if cancelled.
fn hash_range(
    file: &File,
    offset: u64,
    len: u64,
    expected: &Digest,
    cancel: &AtomicBool,
) -> std::io::Result<Option<Digest>> {
    let mut hasher = Hasher::new(expected.algorithm());
    let mut buf = vec![0u8; usize::try_from(len).map_or(WINDOW, |l| l.min(WINDOW))];
    let mut done = 0u64;
    while done < len {
        if cancel.load(Ordering::Relaxed) {
            return Ok(None);
        }
        let n = usize::try_from(len - done).map_or(WINDOW, |l| l.min(WINDOW));
        let got = match file.read_at(&mut buf[..n], offset + done) {
            Ok(0) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("blob ended after {done} of {len} bytes"),
                ));
            }
            Ok(got) => got,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update(&buf[..got]);
        done += got as u64;
    }
    Ok(Some(hasher.finish()))
}

/// The verdict on one blob: `Ok` when `actual` is `expected`.
pub fn check(name: &str, expected: &Digest, actual: &Digest) -> Result<()> {
    if actual == expected {
        Ok(())
    } else {
        Err(Error::Integrity(format!(
            "{name}: digest mismatch: expected {expected}, actual {actual}"
        )))
    }
}
