//! Blobs that repeat in a plan — the all-zero parts of a raw disk share one
//! digest — are fetched once.
//!
//! When a network blob (a stream) will be needed again later in the plan,
//! its bytes are also written, as they are delivered, into a *spill*: a
//! private file of ours without a name (`O_TMPFILE`, mode 0600; where the
//! file system cannot make one, a random name removed at once), zero blocks
//! left as holes. Once that first occurrence is complete and its digest
//! verified, every later occurrence is the spill file as a [`Blob::File`]
//! — so it takes the route any file blob takes (`route::choose`): a kernel
//! copy (a reflink on the same file system) under a read lease with the
//! hashing threads beside it, or the buffered route. Either way it is hashed
//! again as it is delivered, like every other blob.
//!
//! Why not copy from the output file itself: stdout may be a file that
//! others have open, and a file we hold open for writing cannot be leased —
//! its bytes could change between our hashing and the copy. The spill is
//! reachable by no one else, and is hashed again all the same.
//!
//! A spill that cannot be made or written (a read-only or full directory)
//! is dropped: the later occurrences are then fetched like any other blob.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use rustix::fs::{Mode, OFlags};

use crate::digest::Digest;
use crate::holes::is_zero;
use crate::manifest::DiskPlan;
use crate::source::Blob;

/// Bytes compared for zeros at a time: a file system block.
const BLOCK: usize = 4096;

/// The spills of one stream.
pub struct Repeats {
    dir: Option<PathBuf>,
    /// For each slot, the first slot of the plan with the same digest and
    /// size, when that is an earlier one.
    first: Vec<Option<usize>>,
    /// Spills being written, by the slot they are written for.
    writing: HashMap<usize, Spill>,
    /// Complete, verified spills, by the slot they were written for.
    done: HashMap<usize, File>,
}

/// A spill being written: the file, and whether every write so far landed.
pub struct Spill {
    file: File,
    ok: bool,
}

impl Repeats {
    /// The repeats of `plan`; spills are made in `dir` (`None`: none).
    pub fn new(plan: &DiskPlan, dir: Option<PathBuf>) -> Repeats {
        let mut seen: HashMap<(&Digest, u64), usize> = HashMap::new();
        let first = plan
            .layers
            .iter()
            .enumerate()
            .map(|(slot, l)| {
                let at = *seen.entry((&l.digest, l.size)).or_insert(slot);
                (at < slot).then_some(at)
            })
            .collect();
        Repeats {
            dir,
            first,
            writing: HashMap::new(),
            done: HashMap::new(),
        }
    }

    /// Whether slot `slot` will be needed again later in the plan.
    fn needed_again(&self, slot: usize) -> bool {
        self.first.contains(&Some(slot))
    }

    /// Start a spill for `slot` if it is a stream needed again; false when
    /// none was started.
    pub fn start(&mut self, slot: usize, blob: &Blob) -> bool {
        if !matches!(blob, Blob::Stream(_)) || !self.needed_again(slot) {
            return false;
        }
        let Some(file) = self.dir.as_deref().and_then(private_file) else {
            return false;
        };
        self.writing.insert(slot, Spill { file, ok: true });
        true
    }

    /// The earlier slot whose spill will serve `slot`: one that is being
    /// written or is done.
    pub fn served_by(&self, slot: usize) -> Option<usize> {
        let first = self.first.get(slot).copied().flatten()?;
        (self.writing.contains_key(&first) || self.done.contains_key(&first)).then_some(first)
    }

    /// The spill being written for `slot`, if any.
    pub fn writing(&mut self, slot: usize) -> Option<&mut Spill> {
        self.writing.get_mut(&slot)
    }

    /// `slot` was delivered whole and verified: its spill, if every write
    /// landed, serves the later occurrences.
    pub fn finished(&mut self, slot: usize, size: u64) {
        if let Some(spill) = self.writing.remove(&slot)
            && spill.ok
            && spill.file.set_len(size).is_ok()
            && let Some(file) = reopen_read_only(spill.file)
        {
            self.done.insert(slot, file);
        }
    }

    /// The blob of a later occurrence of `first`, from its spill; `None`
    /// when the spill did not come to be (fetch it again).
    pub fn blob(&self, first: usize, size: u64) -> Option<Blob> {
        let file = self.done.get(&first)?.try_clone().ok()?;
        Some(Blob::File {
            file,
            offset: 0,
            len: size,
        })
    }
}

impl Spill {
    /// Write `bytes`, the blob's bytes from `at`, leaving zero blocks as
    /// holes. A failed write spoils the spill, not the stream.
    pub fn write(&mut self, at: u64, bytes: &[u8]) {
        if !self.ok {
            return;
        }
        let mut pos = 0;
        while pos < bytes.len() {
            // Skip zero blocks, then write the run of blocks that are not.
            let mut start = pos;
            while start < bytes.len() && is_zero(&bytes[start..(start + BLOCK).min(bytes.len())]) {
                start = (start + BLOCK).min(bytes.len());
            }
            let mut end = start;
            while end < bytes.len() && !is_zero(&bytes[end..(end + BLOCK).min(bytes.len())]) {
                end = (end + BLOCK).min(bytes.len());
            }
            if start < end && !pwrite_all(&self.file, at + start as u64, &bytes[start..end]) {
                self.ok = false;
                return;
            }
            pos = end;
        }
    }
}

fn pwrite_all(file: &File, mut at: u64, mut bytes: &[u8]) -> bool {
    while !bytes.is_empty() {
        match rustix::io::pwrite(file.as_fd(), bytes, at) {
            Ok(0) => return false,
            Ok(n) => {
                bytes = &bytes[n..];
                at += n as u64;
            }
            Err(rustix::io::Errno::INTR) => {}
            Err(_) => return false,
        }
    }
    true
}

/// A file in `dir` that nobody else can reach: without a name, or under a
/// random name removed at once; readable and writable by us only.
fn private_file(dir: &Path) -> Option<File> {
    let mode = Mode::from_raw_mode(0o600);
    if let Ok(fd) = rustix::fs::open(dir, OFlags::RDWR | OFlags::TMPFILE | OFlags::CLOEXEC, mode) {
        return Some(File::from(fd));
    }
    for _ in 0..16 {
        let mut raw = [0u8; 8];
        rustix::rand::getrandom(&mut raw, rustix::rand::GetRandomFlags::empty()).ok()?;
        let path = dir.join(format!(
            ".cloudimg-repeat-{:016x}.tmp",
            u64::from_ne_bytes(raw)
        ));
        let flags =
            OFlags::RDWR | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        match rustix::fs::open(&path, flags, mode) {
            Ok(fd) => {
                let file = File::from(fd);
                return rustix::fs::unlink(&path).is_ok().then_some(file);
            }
            Err(rustix::io::Errno::EXIST) => {}
            Err(_) => return None,
        }
    }
    None
}

/// The spill opened read-only, its writable descriptor closed: a file with
/// no writer can be leased, and so take a kernel route. Without `/proc`
/// the writable one is kept (the blob then takes the buffered route).
fn reopen_read_only(file: File) -> Option<File> {
    let path = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&file));
    match rustix::fs::open(
        path.as_str(),
        OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
    ) {
        Ok(fd) => Some(File::from(fd)),
        Err(_) => Some(file),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn a_spill_keeps_the_bytes_with_holes_for_zeros() {
        let dir = tempfile::TempDir::new().unwrap();
        let file = private_file(dir.path()).expect("a private file");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "no name");
        let mut bytes = vec![0u8; 3 * BLOCK + 100];
        bytes[BLOCK + 7] = 1;
        bytes[3 * BLOCK + 99] = 2;
        let mut spill = Spill {
            file: file.try_clone().unwrap(),
            ok: true,
        };
        spill.write(0, &bytes[..2 * BLOCK]);
        spill.write(2 * BLOCK as u64, &bytes[2 * BLOCK..]);
        assert!(spill.ok);
        file.set_len(bytes.len() as u64).unwrap();
        let mut back = vec![9u8; bytes.len()];
        file.read_exact_at(&mut back, 0).unwrap();
        assert!(back == bytes);
        // Zero blocks were left as holes.
        use std::os::unix::fs::MetadataExt;
        assert!(file.metadata().unwrap().blocks() * 512 < bytes.len() as u64);
        // Read-only now, the writable descriptor gone.
        let ro = reopen_read_only(file).unwrap();
        assert!(ro.write_at(b"x", 0).is_err());
    }
}
