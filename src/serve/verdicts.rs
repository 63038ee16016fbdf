//! The verdict cache: which blob files are known to hash to their digest.
//!
//! A verdict belongs to a file *identity* — device, inode, size, mtime and
//! ctime — so that a 40 GiB image is hashed once, not once per Range request,
//! and again only when its file changes: a write changes mtime and ctime (the
//! latter cannot be set back by anyone), a replacement changes the inode.
//!
//! Timestamps have a granularity (a clock tick on most file systems, up to
//! two seconds on some), so a write in the same tick as the one before it
//! could leave the identity unchanged. A verdict is therefore only
//! remembered for a file whose ctime is at least [`SETTLED`] older than the
//! moment its hashing began (as git does with its racy index entries); a
//! younger file is hashed again by the next response that needs it.
//!
//! Good verdicts are kept across restarts in a small state file (by default
//! `ROOT/.cloudimg-serve-verdicts`, which no NAME can reach), rewritten
//! atomically. It is trusted only when it is ours and writable by nobody
//! else, and each entry only while the file still has exactly that identity.
//! Bad verdicts are kept in memory, so that a damaged image is refused at
//! once instead of re-hashed per request.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::digest::{Digest, Hasher};
use crate::error::{Error, Result};

/// How much older than its hashing a file's last change must be for the
/// verdict to be remembered.
pub const SETTLED: Duration = Duration::from_secs(2);
const HEADER: &str = "cloudimg-serve-verdicts 1";
/// Bytes hashed per read.
const WINDOW: usize = 1 << 20;

/// What identifies the contents of a file without reading it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Identity {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Identity {
    pub fn of(file: &File) -> std::io::Result<Identity> {
        let m = file.metadata()?;
        Ok(Identity {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Whether the file last changed at least [`SETTLED`] before `when`.
    pub fn settled(&self, when: SystemTime) -> bool {
        let ctime = UNIX_EPOCH
            + Duration::new(
                self.ctime.0.max(0) as u64,
                self.ctime.1.clamp(0, 999_999_999) as u32,
            );
        ctime + SETTLED <= when
    }

    fn line(&self, digest: &Digest) -> String {
        format!(
            "{digest} {} {} {} {} {} {} {}\n",
            self.dev, self.ino, self.size, self.mtime.0, self.mtime.1, self.ctime.0, self.ctime.1
        )
    }

    fn parse_line(line: &str) -> Option<(Identity, Digest)> {
        let mut f = line.split(' ');
        let digest = f.next()?.parse().ok()?;
        let mut n = || f.next()?.parse::<i64>().ok();
        let id = Identity {
            dev: n()? as u64,
            ino: n()? as u64,
            size: n()? as u64,
            mtime: (n()?, n()?),
            ctime: (n()?, n()?),
        };
        Some((id, digest))
    }
}

/// What is known of a blob file.
#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    Good,
    Bad(String),
    Unknown,
}

#[derive(Default)]
struct State {
    good: HashMap<Identity, Digest>,
    bad: HashMap<(Identity, Digest), String>,
    /// Files being hashed right now: others wait instead of hashing too.
    hashing: HashSet<Identity>,
}

/// The verdicts of one server.
pub struct Verdicts {
    state: Mutex<State>,
    done: Condvar,
    file: Option<PathBuf>,
    /// Held while the state file is rewritten, so that an older snapshot
    /// never replaces a newer one.
    writing: Mutex<()>,
}

impl Verdicts {
    /// Load the state file (if any, and if trustworthy). Returns the cache
    /// and a line for the log about the file.
    pub fn load(file: Option<PathBuf>) -> (Verdicts, String) {
        let mut state = State::default();
        let note = match &file {
            None => "verdicts are kept in memory only".to_owned(),
            Some(path) => match read_state(path) {
                Ok(entries) => {
                    let n = entries.len();
                    state.good.extend(entries);
                    format!("{n} verdicts loaded from {}", path.display())
                }
                Err(e) => format!("verdicts: {e}; starting empty"),
            },
        };
        (
            Verdicts {
                state: Mutex::new(state),
                done: Condvar::new(),
                file,
                writing: Mutex::new(()),
            },
            note,
        )
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn lookup(&self, id: &Identity, digest: &Digest) -> Verdict {
        let s = self.lock();
        if s.good.get(id) == Some(digest) {
            return Verdict::Good;
        }
        match s.bad.get(&(*id, digest.clone())) {
            Some(why) => Verdict::Bad(why.clone()),
            None => Verdict::Unknown,
        }
    }

    /// Remember that the file `id` hashed to `digest`, when hashing began at
    /// `began`. Not remembered when the file had changed too recently.
    pub fn good(&self, id: Identity, digest: &Digest, began: SystemTime) {
        if !id.settled(began) {
            return;
        }
        if self.lock().good.insert(id, digest.clone()).as_ref() == Some(digest) {
            return;
        }
        let Some(path) = &self.file else { return };
        let _writing = self.writing.lock().unwrap_or_else(|e| e.into_inner());
        let snapshot: String = self.lock().good.iter().map(|(id, d)| id.line(d)).collect();
        if let Err(e) = write_state(path, &snapshot) {
            eprintln!(
                "cloudimg serve: verdicts not saved to {}: {e}",
                path.display()
            );
        }
    }

    pub fn bad(&self, id: Identity, digest: &Digest, why: &str) {
        self.lock().bad.insert((id, digest.clone()), why.to_owned());
    }

    /// Make sure the file `id` has a verdict for `digest`, running `hash`
    /// (which returns when it began and its verdict) unless another response
    /// is already hashing the same file — then wait for that one's verdict.
    pub fn settle(
        &self,
        id: Identity,
        digest: &Digest,
        stop: &AtomicBool,
        hash: impl FnOnce() -> Result<SystemTime>,
    ) -> Result<()> {
        let mut s = self.lock();
        loop {
            if s.good.get(&id) == Some(digest) {
                return Ok(());
            }
            if let Some(why) = s.bad.get(&(id, digest.clone())) {
                return Err(Error::Integrity(why.clone()));
            }
            if !s.hashing.contains(&id) {
                break;
            }
            if stop.load(Ordering::Relaxed) {
                return Err(Error::Other("the server is stopping".into()));
            }
            s = self
                .done
                .wait_timeout(s, Duration::from_millis(200))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        s.hashing.insert(id);
        drop(s);
        let outcome = hash();
        match &outcome {
            Ok(began) => self.good(id, digest, *began),
            Err(e @ Error::Integrity(_)) => self.bad(id, digest, &e.to_string()),
            Err(_) => {}
        }
        self.lock().hashing.remove(&id);
        self.done.notify_all();
        outcome.map(|_| ())
    }
}

/// Hash `len` bytes of `file` from its start; `stop` cancels.
pub fn hash_file(file: &File, len: u64, digest: &Digest, stop: &AtomicBool) -> Result<Digest> {
    let mut hasher = Hasher::new(digest.algorithm());
    let mut buf = vec![0u8; usize::try_from(len).map_or(WINDOW, |l| l.clamp(1, WINDOW))];
    let mut done = 0u64;
    while done < len {
        if stop.load(Ordering::Relaxed) {
            return Err(Error::Other("the server is stopping".into()));
        }
        let n = usize::try_from(len - done).map_or(WINDOW, |l| l.min(WINDOW));
        match file.read_at(&mut buf[..n], done) {
            Ok(0) => return Err(Error::truncated("blob", done, len)),
            Ok(got) => {
                hasher.update(&buf[..got]);
                done += got as u64;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::io("hashing a blob", e)),
        }
    }
    Ok(hasher.finish())
}

/// The entries of a state file that is ours and writable by us only.
fn read_state(path: &Path) -> std::result::Result<Vec<(Identity, Digest)>, String> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    let meta = file.metadata().map_err(|e| e.to_string())?;
    if !meta.is_file()
        || meta.uid() != rustix::process::geteuid().as_raw()
        || meta.permissions().mode() & 0o022 != 0
    {
        return Err(format!(
            "{} is not a file of ours that only we can write; ignored",
            path.display()
        ));
    }
    let text = std::io::read_to_string(std::io::Read::take(file, 64 << 20))
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let mut lines = text.lines();
    if lines.next() != Some(HEADER) {
        return Err(format!("{} is not a verdict file", path.display()));
    }
    Ok(lines.filter_map(Identity::parse_line).collect())
}

/// Replace the state file with `entries`: a new file (mode 0600) renamed
/// over the old one.
fn write_state(path: &Path, entries: &str) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".cloudimg-serve-verdicts.{}.{}.tmp",
        std::process::id(),
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    ));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(format!("{HEADER}\n{entries}").as_bytes())?;
        f.sync_data()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_round_trip_and_settle() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blob");
        std::fs::write(&path, b"bytes").unwrap();
        let id = Identity::of(&File::open(&path).unwrap()).unwrap();
        let d = Digest::of(crate::digest::Algorithm::Sha256, b"bytes");
        assert_eq!(Identity::parse_line(id.line(&d).trim_end()), Some((id, d)));
        assert!(!id.settled(SystemTime::now()));
        assert!(id.settled(SystemTime::now() + SETTLED));
    }

    #[test]
    fn verdicts_persist_only_when_settled_and_trusted() {
        let dir = tempfile::tempdir().unwrap();
        let blob = dir.path().join("blob");
        std::fs::write(&blob, b"bytes").unwrap();
        let id = Identity::of(&File::open(&blob).unwrap()).unwrap();
        let d = Digest::of(crate::digest::Algorithm::Sha256, b"bytes");
        let state = dir.path().join("state");
        let (v, _) = Verdicts::load(Some(state.clone()));
        v.good(id, &d, SystemTime::now());
        assert_eq!(
            v.lookup(&id, &d),
            Verdict::Unknown,
            "a fresh file was remembered"
        );
        v.good(id, &d, SystemTime::now() + SETTLED);
        assert_eq!(v.lookup(&id, &d), Verdict::Good);
        let (again, note) = Verdicts::load(Some(state.clone()));
        assert!(note.contains("1 verdicts loaded"), "{note}");
        assert_eq!(again.lookup(&id, &d), Verdict::Good);
        // Writable by others: not trusted.
        std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o666)).unwrap();
        let (untrusted, note) = Verdicts::load(Some(state));
        assert!(note.contains("ignored"), "{note}");
        assert_eq!(untrusted.lookup(&id, &d), Verdict::Unknown);
    }
}
