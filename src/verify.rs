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
    pub file: Arc<File>,
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
        let verdict = match hash_range(&job, &shared.cancel) {
            Ok(Some(actual)) => check(&job.name, &job.expected, &actual),
            Ok(None) => continue, // cancelled
            Err(e) => Err(e),
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
fn hash_range(job: &Job, cancel: &AtomicBool) -> Result<Option<Digest>> {
    let Job {
        file,
        offset,
        len,
        expected,
        name,
        ..
    } = job;
    let (offset, len) = (*offset, *len);
    let mut hasher = Hasher::new(expected.algorithm());
    let mut buf = vec![0u8; usize::try_from(len).map_or(WINDOW, |l| l.min(WINDOW))];
    let mut done = 0u64;
    while done < len {
        if cancel.load(Ordering::Relaxed) {
            return Ok(None);
        }
        let n = usize::try_from(len - done).map_or(WINDOW, |l| l.min(WINDOW));
        let got = match file.read_at(&mut buf[..n], offset + done) {
            Ok(0) => return Err(Error::truncated(name, done, len)),
            Ok(got) => got,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(Error::io(format!("{name}: hashing"), e)),
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

/// Buffers in flight between the copy and the hashing thread of a stream.
const STREAM_POOL: usize = 4;

enum StreamMsg {
    Start(crate::digest::Algorithm),
    Data(Vec<u8>, usize),
    Finish,
}

/// Hashes a stream blob on a thread of its own, in order, while the main
/// thread goes on reading and writing: a buffer is handed over after it has
/// been written, and comes back for reuse once hashed. At most
/// [`STREAM_POOL`] buffers exist.
pub struct StreamHasher {
    to_hasher: Option<std::sync::mpsc::SyncSender<StreamMsg>>,
    free: std::sync::mpsc::Receiver<Vec<u8>>,
    verdicts: std::sync::mpsc::Receiver<Digest>,
    allocated: usize,
    buf_size: usize,
    handle: Option<JoinHandle<()>>,
}

impl StreamHasher {
    pub fn new(buf_size: usize) -> Result<StreamHasher> {
        let (to_hasher, inbox) = std::sync::mpsc::sync_channel::<StreamMsg>(STREAM_POOL + 2);
        let (give_back, free) = std::sync::mpsc::channel::<Vec<u8>>();
        let (verdict, verdicts) = std::sync::mpsc::channel::<Digest>();
        let handle = std::thread::Builder::new()
            .name("cloudimg-hash-stream".to_owned())
            .spawn(move || {
                signals::block_in_this_thread();
                let mut hasher = None;
                for msg in inbox {
                    match msg {
                        StreamMsg::Start(alg) => hasher = Some(Hasher::new(alg)),
                        StreamMsg::Data(buf, len) => {
                            if let Some(h) = hasher.as_mut() {
                                h.update(&buf[..len]);
                            }
                            let _ = give_back.send(buf);
                        }
                        StreamMsg::Finish => {
                            if let Some(h) = hasher.take() {
                                let _ = verdict.send(h.finish());
                            }
                        }
                    }
                }
            })
            .map_err(|e| Error::io("starting a hashing thread", e))?;
        Ok(StreamHasher {
            to_hasher: Some(to_hasher),
            free,
            verdicts,
            allocated: 0,
            buf_size,
            handle: Some(handle),
        })
    }

    fn send(&self, msg: StreamMsg) -> Result<()> {
        self.to_hasher
            .as_ref()
            .and_then(|t| t.send(msg).ok())
            .ok_or_else(|| Error::Other("the hashing thread stopped".to_owned()))
    }

    /// Begin a blob hashed with `alg`.
    pub fn start(&self, alg: crate::digest::Algorithm) -> Result<()> {
        self.send(StreamMsg::Start(alg))
    }

    /// A buffer to read into: a new one while the pool is not full, else the
    /// next one the hasher is done with.
    pub fn buffer(&mut self) -> Result<Vec<u8>> {
        if let Ok(buf) = self.free.try_recv() {
            return Ok(buf);
        }
        if self.allocated < STREAM_POOL {
            self.allocated += 1;
            return Ok(vec![0; self.buf_size]);
        }
        self.free
            .recv()
            .map_err(|_| Error::Other("the hashing thread stopped".to_owned()))
    }

    /// Hand over the first `len` bytes of `buf` (already written out).
    pub fn feed(&self, buf: Vec<u8>, len: usize) -> Result<()> {
        self.send(StreamMsg::Data(buf, len))
    }

    /// The digest of everything fed since [`start`](StreamHasher::start).
    pub fn finish(&self) -> Result<Digest> {
        self.send(StreamMsg::Finish)?;
        self.verdicts
            .recv()
            .map_err(|_| Error::Other("the hashing thread stopped".to_owned()))
    }
}

impl Drop for StreamHasher {
    fn drop(&mut self) {
        drop(self.to_hasher.take());
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}
