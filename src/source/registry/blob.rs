//! Blob bodies from a registry, as `Read`ers that survive the network:
//!
//! - [`Resumable`]: one stream that, when the connection is lost or stalls,
//!   reconnects at the byte reached with `Range: bytes=N-`. A `206` continues
//!   the same bytes; a `200` (a server that ignores Range) is read forward N
//!   bytes and then continues. The caller's hash sees every byte once.
//! - [`Parallel`]: a blob fetched as N concurrent range requests of one chunk
//!   each into bounded, in-order buffers (at most `N + 3` chunks in memory:
//!   workers stay within `N + 2` chunks of the reader, which holds one more),
//!   for object stores and CDNs that cap each connection's rate. Each chunk
//!   resumes on its own. The caller still reads (and hashes) in order. A
//!   server that answers a range request past byte 0 with the whole blob (a
//!   `200`) would have every chunk read forward from byte 0 — quadratic — so
//!   the first such answer turns the rest of the blob into one stream.
//!
//! Mirrors come first in a [`BlobFetch`]'s sources and the registry last
//! (see [`super::mirrors`]).

use std::collections::BTreeMap;
use std::io::{self, Read};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use ureq::http::StatusCode;

use super::client::{BodyKind, Client, Response, backoff, body_fault, pause, redact};
use super::mirrors::{MirrorUse, SourceUrl, ask_in_turn, mirror_failed};
use crate::error::{Error, Result, SizeSeen};
use crate::signals;

/// Bytes a connection must deliver before its failure stops counting.
const REFILL_AFTER: u64 = 1 << 20;

/// Where a blob can be fetched, and what it must be.
pub struct BlobFetch {
    pub client: Arc<Client>,
    /// Where to ask, in order: mirrors first, the registry last.
    pub sources: Vec<SourceUrl>,
    pub scope: String,
    pub size: u64,
    /// The blob's digest, as the manifest gives it.
    pub digest: String,
    /// How errors name the blob.
    pub label: String,
    /// The run's record of blobs served by mirrors.
    pub mirror_use: Arc<MirrorUse>,
    /// Sources (by index) that gave a wrong answer for this blob.
    pub failed: Mutex<Vec<usize>>,
}

/// A URL that answered before (after redirects), and which source it is.
#[derive(Clone)]
struct Answered {
    url: String,
    source: usize,
}

/// An open response for `[pos, end)` of a blob, or the whole of it.
struct Opened {
    body: ureq::BodyReader<'static>,
    /// Bytes to throw away first (the server ignored our Range).
    skip: u64,
    /// Where it came from, for follow-up range requests.
    from: Answered,
    /// A 206: the server honoured the Range.
    partial: bool,
}

impl BlobFetch {
    /// Open the blob at `pos`; `end` bounds a chunk request (`None`: to the
    /// end). `prefer` is a URL that answered before (after redirects).
    fn open(&self, pos: u64, end: Option<u64>, prefer: Option<&Answered>) -> Result<Opened> {
        let range = match (pos, end) {
            (0, None) => None,
            (p, None) => Some(format!("bytes={p}-")),
            (p, Some(e)) => Some(format!("bytes={p}-{}", e - 1)),
        };
        let headers: Vec<(&str, String)> = range.iter().map(|r| ("Range", r.clone())).collect();
        let candidates: Vec<Answered> = {
            let failed = self.failed.lock().expect("failed sources");
            prefer
                .cloned()
                .into_iter()
                .chain(self.sources.iter().enumerate().map(|(i, s)| Answered {
                    url: s.url.clone(),
                    source: i,
                }))
                .filter(|c| !failed.contains(&c.source) && !self.is_dead(c.source))
                .collect()
        };
        let mirror = |c: &Answered| self.sources[c.source].mirror.as_deref();
        ask_in_turn(
            &candidates,
            self.client.retries(),
            |candidate, tries| {
                let mut opened = self
                    .client
                    .get_tries(&candidate.url, &headers, &self.scope, tries, BodyKind::Blob)
                    .map_err(|e| e.context(&self.label))
                    .and_then(|resp| self.accept(resp, pos, mirror(candidate).is_some()))?;
                if let Some(m) = mirror(candidate) {
                    self.mirror_use.record(&self.digest, m);
                }
                opened.from.source = candidate.source;
                Ok(opened)
            },
            |candidate, e| {
                if mirror(candidate).is_some() {
                    self.strike(candidate.source, e);
                }
            },
        )
    }

    fn is_mirror(&self, source: usize) -> bool {
        self.sources.get(source).is_some_and(|s| s.mirror.is_some())
    }

    /// A mirror struck off for the run (see [`mirror_failed`]).
    fn is_dead(&self, source: usize) -> bool {
        self.sources[source]
            .mirror
            .as_deref()
            .is_some_and(|m| self.mirror_use.is_dead(m))
    }

    /// A mirror answered wrongly: not asked again for this blob — nor in
    /// the run, when it could not be reached or stopped answering — and
    /// said so once (not having the blob, a 404, is no fault and is not
    /// said).
    fn strike(&self, source: usize, e: &Error) {
        let mut failed = self.failed.lock().expect("failed sources");
        if failed.contains(&source) {
            return;
        }
        failed.push(source);
        drop(failed);
        if let Some(mirror) = &self.sources[source].mirror {
            mirror_failed(&self.mirror_use, mirror, e);
        }
    }

    /// Check a response against what was asked for. A mirror's HTML page
    /// (a captive portal, an error page) is refused whatever its length.
    fn accept(&self, resp: Response, pos: u64, mirror: bool) -> Result<Opened> {
        let label = &self.label;
        if mirror
            && let Some(kind) = resp.header("content-type")
            && kind.trim().to_ascii_lowercase().starts_with("text/html")
        {
            return Err(Error::Other(format!(
                "{label}: answered with an HTML page (Content-Type: {kind}), not the blob"
            )));
        }
        let length: Option<u64> = resp.header("content-length").and_then(|v| v.parse().ok());
        let skip = if resp.status == StatusCode::PARTIAL_CONTENT {
            let (start, total) = resp
                .header("content-range")
                .and_then(parse_content_range)
                .ok_or_else(|| {
                    Error::Other(format!(
                        "{label}: 206 without a usable Content-Range from {}",
                        redact(&resp.url)
                    ))
                })?;
            if start != pos {
                return Err(Error::Other(format!(
                    "{label}: asked for bytes from {pos}, the server sent from {start}"
                )));
            }
            if let Some(total) = total
                && total != self.size
            {
                return Err(Error::blob_size(label, self.size, SizeSeen::Server(total)));
            }
            0
        } else {
            // 200: the whole blob, whatever we asked for.
            if let Some(len) = length
                && len != self.size
            {
                return Err(Error::blob_size(label, self.size, SizeSeen::Server(len)));
            }
            pos
        };
        Ok(Opened {
            partial: resp.status == StatusCode::PARTIAL_CONTENT,
            from: Answered {
                url: resp.url.clone(),
                source: usize::MAX,
            },
            body: resp.body.into_reader(),
            skip,
        })
    }
}

/// `bytes START-END/TOTAL` (TOTAL may be `*`).
fn parse_content_range(v: &str) -> Option<(u64, Option<u64>)> {
    let rest = v.trim().strip_prefix("bytes")?.trim_start();
    let (span, total) = rest.split_once('/')?;
    let (start, _) = span.split_once('-')?;
    let total = match total.trim() {
        "*" => None,
        t => Some(t.parse().ok()?),
    };
    Some((start.trim().parse().ok()?, total))
}

/// One stream over `[start, end)` of a blob (or to its end) that resumes
/// where it broke off.
pub struct Resumable {
    fetch: Arc<BlobFetch>,
    pos: u64,
    /// `None`: read to the end of the body (so an oversized body shows).
    end: Option<u64>,
    current: Option<Opened>,
    /// Failures counted against the retry budget.
    failures: u32,
    /// Bytes delivered since the last failure.
    progress: u64,
    /// What answered last.
    url: Option<Answered>,
    /// A chunk request past byte 0 was answered with the whole blob: the
    /// chunk is abandoned (reading forward to it would cost more than it
    /// brings) and the error says so; the answer is kept in `whole`, for
    /// the rest of the blob to be read from as one stream.
    range_ignored: bool,
    whole: Option<Opened>,
    /// The current connection's rate.
    pace: Pace,
}

/// The slowest a blob body may arrive: fewer bytes than this per second,
/// averaged over a window of the stall timeout, and the connection counts
/// as stalled (it is dropped and resumed). Only time spent waiting in reads
/// counts, so a slow consumer (a full pipe) is never blamed on the server.
pub const MIN_RATE: u64 = 1024;

/// A connection's rate over windows of the stall timeout.
struct Pace {
    window: Duration,
    waited: Duration,
    got: u64,
}

impl Pace {
    fn new(window: Duration) -> Pace {
        Pace {
            window,
            waited: Duration::ZERO,
            got: 0,
        }
    }

    /// Count one read that waited `took` and brought `n` bytes; a window
    /// that ends below the minimum rate is an error, saying so.
    fn account(&mut self, took: Duration, n: u64) -> std::result::Result<(), String> {
        self.waited += took;
        self.got += n;
        if self.waited < self.window {
            return Ok(());
        }
        let floor = (MIN_RATE as f64 * self.waited.as_secs_f64()) as u64;
        let (got, waited) = (self.got, self.waited);
        self.waited = Duration::ZERO;
        self.got = 0;
        if got < floor {
            return Err(format!(
                "too slow: {got} bytes in {:.1} s, below {MIN_RATE} bytes/s",
                waited.as_secs_f64()
            ));
        }
        Ok(())
    }
}

impl Resumable {
    /// A stream from `pos` to `end` (or the body's end), continuing `current`
    /// when a response is already open, else opened on the first read.
    fn new(
        fetch: Arc<BlobFetch>,
        pos: u64,
        end: Option<u64>,
        current: Option<Opened>,
        url: Option<Answered>,
    ) -> Resumable {
        Resumable {
            url: current.as_ref().map(|o| o.from.clone()).or(url),
            pace: Pace::new(fetch.client.stall_timeout()),
            fetch,
            pos,
            end,
            current,
            failures: 0,
            progress: 0,
            range_ignored: false,
            whole: None,
        }
    }

    /// Open the blob from byte `pos` (0: the whole blob) to its end now, so
    /// that errors such as 404 surface at once. Past byte 0 this is a Range
    /// request; a server that ignores it is read forward to `pos`.
    pub fn open_at(fetch: Arc<BlobFetch>, pos: u64) -> Result<Resumable> {
        let opened = fetch.open(pos, None, None)?;
        Ok(Resumable::new(fetch, pos, None, Some(opened), None))
    }

    /// Read the next bytes, reconnecting as needed.
    fn read_some(&mut self, buf: &mut [u8]) -> Result<usize> {
        let want = match self.end {
            Some(end) if self.pos >= end => return Ok(0),
            Some(end) => buf
                .len()
                .min(usize::try_from(end - self.pos).unwrap_or(usize::MAX)),
            None => buf.len(),
        };
        loop {
            signals::check()?;
            if self.current.is_none() {
                match self.fetch.open(self.pos, self.end, self.url.as_ref()) {
                    Ok(o) if self.end.is_some() && !o.partial && self.pos > 0 => {
                        self.range_ignored = true;
                        self.whole = Some(o);
                        return Err(Error::Other(format!(
                            "{}: the server answered a range request from byte {} with \
                             the whole blob",
                            self.fetch.label, self.pos
                        )));
                    }
                    Ok(o) => {
                        self.url = Some(o.from.clone());
                        self.current = Some(o);
                        self.pace = Pace::new(self.fetch.client.stall_timeout());
                    }
                    Err(e) => return Err(e),
                }
            }
            let opened = self.current.as_mut().expect("opened above");
            // The server ignored Range: read forward to where we were first.
            let skipping = opened.skip > 0;
            let n = if skipping {
                opened.skip.min(buf.len() as u64) as usize
            } else {
                want
            };
            let started = Instant::now();
            let outcome = opened.body.read(&mut buf[..n]);
            let slow = match &outcome {
                Ok(k) => self.pace.account(started.elapsed(), *k as u64).err(),
                Err(_) => None,
            };
            let outcome = match (outcome, skipping) {
                (Ok(0), true) => Err(io::Error::from(io::ErrorKind::UnexpectedEof)),
                (Ok(k), true) => {
                    if let Some(current) = self.current.as_mut() {
                        current.skip -= k as u64;
                    }
                    if let Some(slow) = slow {
                        self.broken(io::Error::new(io::ErrorKind::TimedOut, slow))?;
                    }
                    continue;
                }
                (outcome, _) => outcome,
            };
            if let (Ok(k), Some(slow)) = (&outcome, slow) {
                // Hand out what came; the connection is dropped and resumed
                // from after it.
                let k = *k;
                self.pos += k as u64;
                self.progress += k as u64;
                self.broken(io::Error::new(io::ErrorKind::TimedOut, slow))?;
                if k > 0 {
                    return Ok(k);
                }
                continue;
            }
            match outcome {
                Ok(0) if self.end.is_none() && self.pos >= self.fetch.size => return Ok(0),
                Ok(0) => self.broken(io::Error::from(io::ErrorKind::UnexpectedEof))?,
                Ok(n) => {
                    self.pos += n as u64;
                    self.progress += n as u64;
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => self.broken(e)?,
            }
        }
    }

    /// The connection broke at `pos`: drop it and, budget allowing, pause
    /// before the next attempt reconnects. A connection that moved a good
    /// amount of data before breaking refills the budget; one that keeps
    /// breaking after a trickle does not.
    fn broken(&mut self, e: io::Error) -> Result<()> {
        self.current = None;
        // A mirror that drops or stalls the connection is struck off for
        // this blob; the next source continues from the byte reached, at
        // no cost to the retry budget.
        if let Some(from) = self.url.take_if(|a| self.fetch.is_mirror(a.source)) {
            let e = connection_lost(self.pos, &e, 0).context(&self.fetch.label);
            self.fetch.strike(from.source, &e);
            return Ok(());
        }
        if self.progress >= REFILL_AFTER {
            self.failures = 0;
        }
        self.progress = 0;
        if self.failures >= self.fetch.client.retries() {
            return Err(connection_lost(self.pos, &e, self.failures).context(&self.fetch.label));
        }
        pause(backoff(self.failures, None))?;
        self.failures += 1;
        Ok(())
    }
}

/// A connection that broke at byte `pos`, after `retries` retries.
fn connection_lost(pos: u64, e: &io::Error, retries: u32) -> Error {
    Error::Network {
        what: format!("connection lost at byte {pos}"),
        cause: e.to_string(),
        fault: body_fault(e),
        retries,
    }
}

impl Read for Resumable {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        Ok(self.read_some(buf)?)
    }
}

/// In-order delivery of concurrently fetched chunks.
pub struct Parallel {
    shared: Arc<Shared>,
    /// Where chunk 0 starts in the blob (past byte 0 when resuming).
    base: u64,
    chunk: u64,
    chunks: u64,
    connections: usize,
    /// The chunk being handed out, and how much of it has been.
    current: Option<(Vec<u8>, usize)>,
    next: u64,
    started: bool,
    fetch: Arc<BlobFetch>,
    url: Option<Answered>,
    /// After the server ignored a range: the rest of the blob, as one stream.
    single: Option<Resumable>,
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

#[derive(Default)]
struct State {
    done: BTreeMap<u64, Result<Vec<u8>>>,
    /// The next chunk a worker may claim.
    claim: u64,
    /// The chunk the reader waits for; workers stay within a window of it.
    reading: u64,
    spare: Vec<Vec<u8>>,
    cancel: bool,
    /// A range request past byte 0 got the whole blob: no more chunks.
    degraded: bool,
    /// That answer (a body from byte 0), for the reader to go on with.
    whole: Option<Opened>,
}

impl Parallel {
    /// Probe with a request for the first chunk, from byte `base` of the
    /// blob (0, or where a partial copy ends). When the server does not
    /// honour Range (a `200`), the answer is `Err` with a single stream that
    /// goes on reading that very response (forward to `base` first).
    pub fn open(
        fetch: Arc<BlobFetch>,
        base: u64,
        chunk: u64,
        connections: usize,
    ) -> Result<std::result::Result<Parallel, Resumable>> {
        let first_end = base.saturating_add(chunk).min(fetch.size);
        let opened = fetch.open(base, Some(first_end), None)?;
        if opened.partial {
            let chunks = (fetch.size - base).div_ceil(chunk);
            let url = Some(opened.from.clone());
            // The first chunk is read from this response.
            let first = Resumable::new(
                Arc::clone(&fetch),
                base,
                Some(first_end),
                Some(opened),
                None,
            );
            let shared = Arc::new(Shared {
                state: Mutex::new(State {
                    claim: 1,
                    ..State::default()
                }),
                changed: Condvar::new(),
            });
            let p = Parallel {
                shared,
                base,
                chunk,
                chunks,
                connections,
                current: None,
                next: 0,
                started: false,
                fetch,
                url,
                single: None,
            };
            p.spawn_first(first);
            return Ok(Ok(p));
        }
        // A 200: the server sends the whole blob; stream it singly.
        Ok(Err(Resumable::new(fetch, base, None, Some(opened), None)))
    }

    fn spawn_first(&self, mut first: Resumable) {
        let shared = Arc::clone(&self.shared);
        let len = (first.end.unwrap_or(0) - self.base) as usize;
        std::thread::spawn(move || {
            signals::block_in_this_thread();
            let result = fill(&mut first, vec![0; len]);
            deliver(&shared, 0, &mut first, result);
        });
    }

    /// Start the other workers, on the first read.
    fn start(&mut self) {
        self.started = true;
        let window = self.connections as u64 + 2;
        // The first chunk's thread ends with that chunk; these take the rest.
        for _ in 0..self.connections {
            let shared = Arc::clone(&self.shared);
            let fetch = Arc::clone(&self.fetch);
            let url = self.url.clone();
            let (base, chunk, chunks) = (self.base, self.chunk, self.chunks);
            std::thread::spawn(move || {
                signals::block_in_this_thread();
                worker(&shared, &fetch, url, (base, chunk, chunks), window);
            });
        }
    }
}

/// Hand chunk `k` to the reader — or, when the server ignored its range,
/// tell the reader to go on with one stream. Whether more chunks may follow.
fn deliver(shared: &Shared, k: u64, r: &mut Resumable, result: Result<Vec<u8>>) -> bool {
    let mut st = shared.state.lock().expect("parallel state");
    let more = result.is_ok();
    if r.range_ignored {
        st.degraded = true;
        if st.whole.is_none() {
            st.whole = r.whole.take();
        }
    } else {
        st.done.insert(k, result);
    }
    shared.changed.notify_all();
    more
}

/// Read exactly the chunk's bytes into `buf`.
fn fill(r: &mut Resumable, mut buf: Vec<u8>) -> Result<Vec<u8>> {
    let mut at = 0;
    while at < buf.len() {
        match r.read_some(&mut buf[at..])? {
            0 => {
                return Err(Error::Other(format!(
                    "{}: range request ended early",
                    r.fetch.label
                )));
            }
            n => at += n,
        }
    }
    Ok(buf)
}

fn worker(
    shared: &Shared,
    fetch: &Arc<BlobFetch>,
    url: Option<Answered>,
    (base, chunk, chunks): (u64, u64, u64),
    window: u64,
) {
    loop {
        let (k, buf) = {
            let mut st = shared.state.lock().expect("parallel state");
            loop {
                if st.cancel || st.degraded || st.claim >= chunks {
                    return;
                }
                if st.claim < st.reading + window {
                    break;
                }
                st = shared.changed.wait(st).expect("parallel state");
            }
            let k = st.claim;
            st.claim += 1;
            (k, st.spare.pop().unwrap_or_default())
        };
        let start = base + k * chunk;
        let end = (start + chunk).min(fetch.size);
        let mut buf = buf;
        buf.resize((end - start) as usize, 0);
        let mut r = Resumable::new(Arc::clone(fetch), start, Some(end), None, url.clone());
        let result = fill(&mut r, buf);
        if !deliver(shared, k, &mut r, result) {
            return;
        }
    }
}

impl Read for Parallel {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        loop {
            if let Some(single) = &mut self.single {
                return single.read(out);
            }
            if let Some((buf, at)) = &mut self.current {
                if *at < buf.len() {
                    let n = (buf.len() - *at).min(out.len());
                    out[..n].copy_from_slice(&buf[*at..*at + n]);
                    *at += n;
                    return Ok(n);
                }
                let (spent, _) = self.current.take().expect("checked above");
                self.shared
                    .state
                    .lock()
                    .expect("parallel state")
                    .spare
                    .push(spent);
            }
            if self.next >= self.chunks {
                return Ok(0);
            }
            if !self.started {
                self.start();
            }
            let mut st = self.shared.state.lock().expect("parallel state");
            let result = loop {
                if let Some(r) = st.done.remove(&self.next) {
                    break r;
                }
                if st.degraded {
                    // The server ignores ranges past byte 0: the rest of the
                    // blob as one stream — the whole-blob answer that showed
                    // it, read forward once to here, not once per chunk; the
                    // chunks in flight are abandoned.
                    st.cancel = true;
                    let pos = self.base + self.next * self.chunk;
                    let whole = st.whole.take().map(|o| Opened { skip: pos, ..o });
                    self.shared.changed.notify_all();
                    drop(st);
                    self.single = Some(Resumable::new(
                        Arc::clone(&self.fetch),
                        pos,
                        None,
                        whole,
                        self.url.clone(),
                    ));
                    return self.read(out);
                }
                if signals::pending().is_some() {
                    return Err(io::Error::from(io::ErrorKind::Interrupted));
                }
                st = self
                    .shared
                    .changed
                    .wait_timeout(st, Duration::from_millis(100))
                    .expect("parallel state")
                    .0;
            };
            self.next += 1;
            st.reading = self.next;
            self.shared.changed.notify_all();
            drop(st);
            match result {
                Ok(buf) => self.current = Some((buf, 0)),
                Err(e) => return Err(e.into()),
            }
        }
    }
}

impl Drop for Parallel {
    fn drop(&mut self) {
        let mut st = self.shared.state.lock().expect("parallel state");
        st.cancel = true;
        self.shared.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pace_fails_a_window_below_the_minimum_rate() {
        let s = Duration::from_secs(1);
        let mut fast = Pace::new(2 * s);
        for _ in 0..10 {
            assert!(fast.account(s, 4096).is_ok());
        }
        // A byte per read, for two seconds of waiting.
        let mut trickle = Pace::new(2 * s);
        assert!(trickle.account(s, 1).is_ok());
        let e = trickle.account(s, 1).unwrap_err();
        assert_eq!(e, "too slow: 2 bytes in 2.0 s, below 1024 bytes/s");
        // Time not spent waiting (a slow consumer) does not count.
        let mut idle = Pace::new(2 * s);
        for _ in 0..1000 {
            assert!(idle.account(Duration::ZERO, 1).is_ok());
        }
    }

    #[test]
    fn content_ranges() {
        assert_eq!(
            parse_content_range("bytes 0-99/1000"),
            Some((0, Some(1000)))
        );
        assert_eq!(parse_content_range("bytes 100-199/*"), Some((100, None)));
        assert_eq!(parse_content_range("bytes */1000"), None);
        assert_eq!(parse_content_range("items 0-1/2"), None);
    }
}
