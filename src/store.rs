//! An OCI image layout that cloudimg writes into: `copy` fills one, and
//! `--cache` fills one while it streams and reads it back later. Nothing
//! appears under a final name before it is whole and checked:
//!
//! - A blob is written into `.cloudimg/partial/ALG-HEX` while an exclusive
//!   `flock` on that file is held, checked for its size and digest, synced,
//!   and renamed into `blobs/ALG/HEX` (the directory synced too). A partial
//!   file outlives an interrupted run, so the next one continues it.
//! - `index.json` is written into a temporary file beside it and renamed
//!   over it while an exclusive `flock` on `.cloudimg/lock` is held, so two
//!   writers into one layout lose no tag; a tag names one entry (re-tagging
//!   replaces it).
//!
//! Every path is built from a validated [`Digest`], never from a string a
//! manifest or a server chose.

use std::fs::{File, OpenOptions};
use std::io::{self, ErrorKind, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use rustix::fs::{FlockOperation, OFlags};
use rustix::io::Errno;

use crate::digest::{Digest, Hasher};
use crate::error::{Error, Result, SizeSeen};
use crate::manifest::{ANNOTATION_REF_NAME, Descriptor, MAX_MANIFEST_BYTES};
use crate::signals;
use crate::zerocopy::{FileRange, Range};

/// What `oci-layout` holds in a layout this module starts.
const LAYOUT_MARKER: &[u8] = b"{\"imageLayoutVersion\":\"1.0.0\"}";
/// The directory of cloudimg's own files in a layout: the lock, the
/// partial blobs.
const OWN_DIR: &str = ".cloudimg";

/// A layout opened for writing.
pub struct Store {
    dir: PathBuf,
}

/// Whether a name in a layout directory is one this module writes before
/// the layout is whole: its own directory, the index, temporary files.
fn ours(name: &str) -> bool {
    name == OWN_DIR
        || name == "index.json"
        || name == "blobs"
        || (name.starts_with('.') && name.contains(".cloudimg-"))
}

/// How a store's files are named in errors.
fn shown(p: &Path) -> String {
    p.display().to_string()
}

impl Store {
    /// Open the layout at `dir` for writing, starting one when `dir` is
    /// missing (with its parents) or an empty directory. A directory that
    /// holds other things and no `oci-layout` is refused: nothing is written
    /// into it.
    pub fn open(dir: &Path) -> Result<Store> {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::io(format!("creating {}", shown(dir)), e))?;
        let meta = std::fs::metadata(dir).map_err(|e| Error::io(shown(dir), e))?;
        if !meta.is_dir() {
            return Err(Error::Other(format!(
                "{} is not a directory: a layout is a directory",
                shown(dir)
            )));
        }
        let store = Store {
            dir: dir.to_owned(),
        };
        let marker = dir.join("oci-layout");
        match std::fs::symlink_metadata(&marker) {
            Ok(m) if m.is_file() => {}
            Ok(_) => {
                return Err(Error::Other(format!(
                    "{} is not a regular file: not a usable layout",
                    shown(&marker)
                )));
            }
            Err(e) if e.kind() == ErrorKind::NotFound => {
                // Empty, or holding only what another cloudimg starting
                // this layout has put there so far (it holds the lock).
                let foreign = std::fs::read_dir(dir)
                    .map_err(|e| Error::io(format!("reading {}", shown(dir)), e))?
                    .filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .find(|name| !ours(name));
                if let Some(name) = foreign {
                    return Err(Error::Other(format!(
                        "{} is not an OCI image layout (no oci-layout file) and not empty \
                         (it holds {name:?}): refusing to write into it",
                        shown(dir)
                    )));
                }
                store.make_own_dirs()?;
                let _lock = store.lock()?;
                if !marker.is_file() {
                    if !dir.join("index.json").is_file() {
                        store.replace_file(
                            "index.json",
                            b"{\"schemaVersion\":2,\"manifests\":[]}\n",
                        )?;
                    }
                    // The marker last: a layout is one once it has its index.
                    store.replace_file("oci-layout", LAYOUT_MARKER)?;
                }
                return Ok(store);
            }
            Err(e) => return Err(Error::io(shown(&marker), e)),
        }
        store.make_own_dirs()?;
        Ok(store)
    }

    /// The layout's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn make_own_dirs(&self) -> Result<()> {
        for d in [OWN_DIR, ".cloudimg/partial", "blobs", "blobs/sha256"] {
            real_dir(&self.dir.join(d))?;
        }
        Ok(())
    }

    fn alg_dir(&self, d: &Digest) -> PathBuf {
        self.dir.join("blobs").join(d.algorithm().name())
    }

    /// Where a blob lives under its final name.
    pub fn blob_path(&self, d: &Digest) -> PathBuf {
        self.alg_dir(d).join(d.hex())
    }

    fn partial_path(&self, d: &Digest) -> PathBuf {
        self.dir
            .join(OWN_DIR)
            .join("partial")
            .join(format!("{}-{}", d.algorithm().name(), d.hex()))
    }

    /// The blob under its final name, opened, when it is there as a regular
    /// file of `size` bytes. Anything else there (a wrong size, not a
    /// file) is removed as damage, and `None` returned.
    pub fn present(&self, d: &Digest, size: u64) -> Result<Option<File>> {
        let path = self.blob_path(d);
        let file = match OpenOptions::new()
            .read(true)
            .custom_flags((OFlags::NONBLOCK | OFlags::NOFOLLOW).bits() as i32)
            .open(&path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(e) if e.raw_os_error() == Some(Errno::LOOP.raw_os_error()) => {
                self.remove(d)?;
                return Ok(None);
            }
            Err(e) => return Err(Error::io(format!("opening {}", shown(&path)), e)),
        };
        let meta = file.metadata().map_err(|e| Error::io(shown(&path), e))?;
        let ft = meta.file_type();
        if !ft.is_file() || meta.len() != size {
            drop(file);
            self.remove(d)?;
            return Ok(None);
        }
        let flags =
            rustix::fs::fcntl_getfl(&file).map_err(|e| Error::io(shown(&path), e.into()))?;
        rustix::fs::fcntl_setfl(&file, flags - OFlags::NONBLOCK)
            .map_err(|e| Error::io(shown(&path), e.into()))?;
        Ok(Some(file))
    }

    /// Whether the blob is there and holds what its digest says, hashed
    /// now. A damaged one is removed (and `false` returned).
    pub fn check_present(&self, d: &Digest, size: u64) -> Result<bool> {
        let Some(file) = self.present(d, size)? else {
            return Ok(false);
        };
        let actual = hash_prefix(&file, size, d.algorithm(), &shown(&self.blob_path(d)))?;
        if actual != *d {
            drop(file);
            self.remove(d)?;
            return Ok(false);
        }
        Ok(true)
    }

    /// Remove a blob from under its final name (damage found in it).
    pub fn remove(&self, d: &Digest) -> Result<()> {
        let path = self.blob_path(d);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io(format!("removing {}", shown(&path)), e)),
        }
    }

    /// Start writing the blob `d` of `size` bytes, or go on with the
    /// partial copy an earlier run left (`resume`; else it is emptied).
    /// With `wait`, waits while another process writes the same blob;
    /// without, answers `None` then.
    pub fn begin(
        &self,
        d: &Digest,
        size: u64,
        resume: bool,
        wait: bool,
    ) -> Result<Option<Partial>> {
        let path = self.partial_path(d);
        let io = |what: &str, e: io::Error| Error::io(format!("{what} {}", shown(&path)), e);
        let file = loop {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o644)
                .custom_flags((OFlags::NONBLOCK | OFlags::NOFOLLOW).bits() as i32)
                .open(&path)
                .map_err(|e| io("opening", e))?;
            let meta = file.metadata().map_err(|e| io("reading", e))?;
            if !meta.file_type().is_file() {
                return Err(Error::Other(format!(
                    "{} is not a regular file",
                    shown(&path)
                )));
            }
            let flags = rustix::fs::fcntl_getfl(&file).map_err(|e| io("reading", e.into()))?;
            rustix::fs::fcntl_setfl(&file, flags - OFlags::NONBLOCK)
                .map_err(|e| io("reading", e.into()))?;
            if !flock(&file, wait).map_err(|e| io("locking", e))? {
                return Ok(None);
            }
            // The holder before us may have renamed the file into blobs/
            // (or removed it) while we waited: the lock is ours only if the
            // name still leads to the file we locked.
            let now = std::fs::symlink_metadata(&path);
            if !now.is_ok_and(|n| n.dev() == meta.dev() && n.ino() == meta.ino()) {
                continue;
            }
            // A file someone else owns, or that has another name (a hard
            // link planted to a file of theirs), is never written into: its
            // name is removed and a file of our own made.
            let meta = file.metadata().map_err(|e| io("reading", e))?;
            if meta.nlink() != 1 || meta.uid() != rustix::process::geteuid().as_raw() {
                std::fs::remove_file(&path).map_err(|e| io("removing", e))?;
                continue;
            }
            break file;
        };
        // Locked: the length is now ours to read and change.
        let mut written = file.metadata().map_err(|e| io("reading", e))?.len();
        if !resume || written > size {
            file.set_len(0).map_err(|e| io("emptying", e))?;
            written = 0;
        }
        Ok(Some(Partial {
            file,
            path,
            final_dir: self.alg_dir(d),
            final_path: self.blob_path(d),
            digest: d.clone(),
            size,
            written,
        }))
    }

    /// Store small bytes (a manifest, an index) under their digest, unless
    /// they are there already.
    pub fn put_bytes(&self, d: &Digest, bytes: &[u8]) -> Result<()> {
        crate::source::check_manifest_digest(bytes, d, None)?;
        if self.present(d, bytes.len() as u64)?.is_some() {
            return Ok(());
        }
        let Some(mut part) = self.begin(d, bytes.len() as u64, false, true)? else {
            unreachable!("begin waits for the lock");
        };
        part.write(bytes)?;
        part.commit()
    }

    /// Take the layout's lock: held while `index.json` is read and replaced.
    fn lock(&self) -> Result<File> {
        let path = self.dir.join(OWN_DIR).join("lock");
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o644)
            .custom_flags((OFlags::NOFOLLOW | OFlags::CLOEXEC).bits() as i32)
            .open(&path)
            .map_err(|e| Error::io(format!("opening {}", shown(&path)), e))?;
        flock(&file, true).map_err(|e| Error::io(format!("locking {}", shown(&path)), e))?;
        Ok(file)
    }

    /// Write `bytes` into a new file beside `name` and rename it over.
    fn replace_file(&self, name: &str, bytes: &[u8]) -> Result<()> {
        let path = self.dir.join(name);
        let temp = self
            .dir
            .join(format!(".{name}.cloudimg-{}.tmp", std::process::id()));
        let result = (|| {
            let mut f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o644)
                .custom_flags(OFlags::NOFOLLOW.bits() as i32)
                .open(&temp)?;
            f.write_all(bytes)?;
            f.sync_all()?;
            std::fs::rename(&temp, &path)?;
            sync_dir(&self.dir)
        })();
        result.map_err(|e| {
            let _ = std::fs::remove_file(&temp);
            Error::io(format!("writing {}", shown(&path)), e)
        })
    }

    /// List `desc` in `index.json`, tagged `tag` when given: an entry that
    /// had the tag loses it (the entry goes when nothing else names it), and
    /// an untagged entry of the same digest is not listed twice. Other
    /// entries and fields are kept as they were.
    pub fn tag(&self, tag: Option<&str>, desc: &Descriptor) -> Result<()> {
        let _lock = self.lock()?;
        let path = self.dir.join("index.json");
        let opened = OpenOptions::new()
            .read(true)
            .custom_flags((OFlags::NONBLOCK | OFlags::NOFOLLOW).bits() as i32)
            .open(&path);
        let mut index: serde_json::Value = match opened {
            Ok(f) => {
                if !f.metadata().is_ok_and(|m| m.file_type().is_file()) {
                    return Err(Error::Manifest(format!(
                        "{} is not a regular file",
                        shown(&path)
                    )));
                }
                let mut bytes = Vec::new();
                f.take(MAX_MANIFEST_BYTES + 1)
                    .read_to_end(&mut bytes)
                    .map_err(|e| Error::io(format!("reading {}", shown(&path)), e))?;
                if bytes.len() as u64 > MAX_MANIFEST_BYTES {
                    return Err(crate::manifest::too_large("index.json", None));
                }
                serde_json::from_slice(&bytes)
                    .map_err(|e| Error::Manifest(format!("{}: malformed: {e}", shown(&path))))?
            }
            Err(e) if e.kind() == ErrorKind::NotFound => {
                serde_json::json!({"schemaVersion": 2, "manifests": []})
            }
            Err(e) => return Err(Error::io(format!("opening {}", shown(&path)), e)),
        };
        let Some(obj) = index.as_object_mut() else {
            return Err(Error::Manifest(format!(
                "{}: not a JSON object",
                shown(&path)
            )));
        };
        let entries = obj
            .entry("manifests")
            .or_insert_with(|| serde_json::Value::Array(Vec::new()));
        let Some(list) = entries.as_array_mut() else {
            return Err(Error::Manifest(format!(
                "{}: \"manifests\" is not a list",
                shown(&path)
            )));
        };
        let name_of = |e: &serde_json::Value| {
            e.pointer(&format!(
                "/annotations/{}",
                ANNOTATION_REF_NAME.replace('~', "~0").replace('/', "~1")
            ))
            .and_then(|v| v.as_str())
            .map(str::to_owned)
        };
        list.retain(|e| {
            let name = name_of(e);
            match tag {
                Some(t) => name.as_deref() != Some(t),
                None => {
                    name.is_some() || e.get("digest").and_then(|v| v.as_str()) != Some(&desc.digest)
                }
            }
        });
        let mut entry = desc.clone();
        entry.annotations.remove(ANNOTATION_REF_NAME);
        if let Some(t) = tag {
            entry
                .annotations
                .insert(ANNOTATION_REF_NAME.to_owned(), t.to_owned());
        }
        list.push(serde_json::to_value(&entry).map_err(|e| Error::Other(e.to_string()))?);
        let mut bytes = serde_json::to_vec(&index).map_err(|e| Error::Other(e.to_string()))?;
        bytes.push(b'\n');
        self.replace_file("index.json", &bytes)
    }
}

/// Make the directory `p` unless it is there — as a directory, not a
/// symlink: nothing of a layout is written outside it through a link that
/// someone planted in it.
fn real_dir(p: &Path) -> Result<()> {
    match std::fs::create_dir(p) {
        Ok(()) => return Ok(()),
        Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
        Err(e) => return Err(Error::io(format!("creating {}", shown(p)), e)),
    }
    match std::fs::symlink_metadata(p) {
        Ok(m) if m.file_type().is_dir() => Ok(()),
        Ok(_) => Err(Error::Other(format!(
            "{} is not a directory (a symlink, or a file): refusing to write through it",
            shown(p)
        ))),
        Err(e) => Err(Error::io(shown(p), e)),
    }
}

/// `flock(LOCK_EX)`, waiting or not; `Ok(false)`: held by another (not
/// waiting). A wait ends with the signal that interrupts it.
fn flock(file: &File, wait: bool) -> io::Result<bool> {
    let op = if wait {
        FlockOperation::LockExclusive
    } else {
        FlockOperation::NonBlockingLockExclusive
    };
    loop {
        match rustix::fs::flock(file.as_fd(), op) {
            Ok(()) => return Ok(true),
            Err(Errno::WOULDBLOCK) if !wait => return Ok(false),
            Err(Errno::INTR) if signals::pending().is_none() => {}
            Err(e) => return Err(e.into()),
        }
    }
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Hash `len` bytes of `file` from its start with `alg`.
fn hash_prefix(file: &File, len: u64, alg: crate::digest::Algorithm, what: &str) -> Result<Digest> {
    let mut hasher = Hasher::new(alg);
    let mut range = FileRange::new(file, Range { offset: 0, len });
    let mut buf = vec![0u8; crate::zerocopy::BUF_SIZE];
    let mut done = 0u64;
    loop {
        signals::check()?;
        let n = match range.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(Error::io(format!("reading {what}"), e)),
        };
        hasher.update(&buf[..n]);
        done += n as u64;
    }
    if done != len {
        return Err(Error::blob_size(what, len, SizeSeen::File(done)));
    }
    Ok(hasher.finish())
}

/// A blob being written into a store, under an exclusive lock.
pub struct Partial {
    file: File,
    path: PathBuf,
    final_dir: PathBuf,
    final_path: PathBuf,
    digest: Digest,
    size: u64,
    written: u64,
}

impl Partial {
    /// Bytes already in the partial file.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// The partial file, for reading back what is in it.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Append `bytes`; more than the blob's size is an error.
    pub fn write(&mut self, bytes: &[u8]) -> Result<()> {
        if self.written + bytes.len() as u64 > self.size {
            return Err(Error::blob_size(
                &self.digest.to_string(),
                self.size,
                SizeSeen::GoesOn,
            ));
        }
        let mut left = bytes;
        let mut at = self.written;
        while !left.is_empty() {
            match rustix::io::pwrite(&self.file, left, at) {
                Ok(0) => return Err(Error::io(self.what(), ErrorKind::WriteZero.into())),
                Ok(n) => {
                    left = &left[n..];
                    at += n as u64;
                }
                Err(Errno::INTR) if signals::pending().is_none() => {}
                Err(e) => return Err(Error::io(self.what(), e.into())),
            }
        }
        self.written = at;
        Ok(())
    }

    fn what(&self) -> String {
        format!("writing {}", shown(&self.path))
    }

    /// Remove the partial file (its bytes were found wrong, or the blob
    /// was found whole under its final name).
    pub fn discard(self) {
        // Removed while still locked: whoever waits for the lock finds
        // that the name no longer leads to the file and starts afresh.
        let _ = std::fs::remove_file(&self.path);
    }

    /// Hash what the partial file holds, for a blob that was written
    /// without hashing on the way.
    pub fn hash(&self) -> Result<Digest> {
        hash_prefix(
            &self.file,
            self.written,
            self.digest.algorithm(),
            &shown(&self.path),
        )
    }

    /// The partial file is whole and its digest was checked: sync it and
    /// rename it into `blobs/`. Fewer bytes than the size is an error (and
    /// the partial file stays, to be continued).
    pub fn commit(self) -> Result<()> {
        if self.written != self.size {
            return Err(Error::blob_size(
                &self.digest.to_string(),
                self.size,
                SizeSeen::EndedAfter(self.written),
            ));
        }
        let io =
            |what: &str, e: io::Error| Error::io(format!("{what} {}", shown(&self.final_path)), e);
        self.file.sync_all().map_err(|e| io("syncing", e))?;
        real_dir(&self.final_dir)?;
        // The name must still lead to the file that was written and
        // checked: one removed and made again by another writer is not it.
        let ours = self.file.metadata().map_err(|e| io("reading", e))?;
        let same = |p: &Path| {
            std::fs::symlink_metadata(p)
                .is_ok_and(|m| m.dev() == ours.dev() && m.ino() == ours.ino())
        };
        let moved = || {
            Error::Other(format!(
                "{} was removed or replaced while it was written",
                shown(&self.path)
            ))
        };
        if !same(&self.path) {
            return Err(moved());
        }
        std::fs::rename(&self.path, &self.final_path).map_err(|e| io("renaming into", e))?;
        if !same(&self.final_path) {
            let _ = std::fs::remove_file(&self.final_path);
            return Err(moved());
        }
        sync_dir(&self.final_dir).map_err(|e| io("syncing the directory of", e))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(bytes: &[u8]) -> Digest {
        Digest::of(crate::digest::Algorithm::Sha256, bytes)
    }

    #[test]
    fn a_new_layout_gets_its_marker_and_an_empty_index() {
        let tmp = tempfile::TempDir::new().unwrap();
        let dir = tmp.path().join("l");
        let store = Store::open(&dir).unwrap();
        assert_eq!(
            std::fs::read(dir.join("oci-layout")).unwrap(),
            LAYOUT_MARKER
        );
        let index: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("index.json")).unwrap()).unwrap();
        assert_eq!(index["manifests"], serde_json::json!([]));
        // Opening again keeps what is there.
        store.tag(Some("v1"), &desc(b"x")).unwrap();
        Store::open(&dir).unwrap();
        assert!(
            std::fs::read_to_string(dir.join("index.json"))
                .unwrap()
                .contains("v1")
        );
    }

    #[test]
    fn a_directory_with_other_things_is_refused_and_left_alone() {
        let tmp = tempfile::TempDir::new().unwrap();
        std::fs::write(tmp.path().join("notes.txt"), b"mine").unwrap();
        let e = Store::open(tmp.path()).err().unwrap().to_string();
        assert!(e.contains("not an OCI image layout"), "{e}");
        let names: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().collect();
        assert_eq!(names.len(), 1);
    }

    #[test]
    fn a_planted_symlink_is_not_written_through() {
        let tmp = tempfile::TempDir::new().unwrap();
        let dir = tmp.path().join("l");
        Store::open(&dir).unwrap();
        let elsewhere = tmp.path().join("elsewhere");
        std::fs::create_dir(&elsewhere).unwrap();
        for own in [".cloudimg/partial", "blobs/sha256", "blobs"] {
            let p = dir.join(own);
            std::fs::rename(&p, tmp.path().join("moved")).unwrap();
            std::os::unix::fs::symlink(&elsewhere, &p).unwrap();
            let e = Store::open(&dir).err().unwrap().to_string();
            assert!(e.contains("not a directory"), "{e}");
            std::fs::remove_file(&p).unwrap();
            std::fs::rename(tmp.path().join("moved"), &p).unwrap();
        }
        // blobs/sha256 replaced by a link after the store was opened.
        let store = Store::open(&dir).unwrap();
        std::fs::remove_dir(dir.join("blobs/sha256")).unwrap();
        std::os::unix::fs::symlink(&elsewhere, dir.join("blobs/sha256")).unwrap();
        let d = digest(b"x");
        let mut part = store.begin(&d, 1, true, true).unwrap().unwrap();
        part.write(b"x").unwrap();
        assert!(part.commit().is_err());
        assert_eq!(std::fs::read_dir(&elsewhere).unwrap().count(), 0);
    }

    #[test]
    fn a_partial_file_removed_while_written_is_not_committed() {
        let tmp = tempfile::TempDir::new().unwrap();
        let store = Store::open(tmp.path()).unwrap();
        let d = digest(b"abc");
        let mut first = store.begin(&d, 3, true, true).unwrap().unwrap();
        first.write(b"abc").unwrap();
        // Someone removes the name; another writer makes it again.
        std::fs::remove_file(&first.path).unwrap();
        let mut second = store.begin(&d, 3, true, true).unwrap().unwrap();
        second.write(b"ab").unwrap();
        let e = first.commit().err().unwrap().to_string();
        assert!(e.contains("removed or replaced"), "{e}");
        assert!(!store.blob_path(&d).exists());
        second.write(b"c").unwrap();
        second.commit().unwrap();
        assert!(store.check_present(&d, 3).unwrap());
    }

    #[test]
    fn a_hard_link_planted_as_a_partial_file_is_not_written_into() {
        let tmp = tempfile::TempDir::new().unwrap();
        let store = Store::open(&tmp.path().join("l")).unwrap();
        let d = digest(b"blob bytes");
        let precious = tmp.path().join("precious");
        std::fs::write(&precious, b"mine").unwrap();
        std::fs::hard_link(&precious, store.partial_path(&d)).unwrap();
        let mut part = store.begin(&d, 10, true, true).unwrap().unwrap();
        assert_eq!(part.written(), 0);
        part.write(b"blob bytes").unwrap();
        part.commit().unwrap();
        assert_eq!(std::fs::read(&precious).unwrap(), b"mine");
        assert_eq!(std::fs::metadata(&precious).unwrap().nlink(), 1);
    }

    #[test]
    fn a_fifo_for_an_index_is_refused_without_waiting() {
        let tmp = tempfile::TempDir::new().unwrap();
        let store = Store::open(tmp.path()).unwrap();
        let index = tmp.path().join("index.json");
        std::fs::remove_file(&index).unwrap();
        let made = std::process::Command::new("mkfifo")
            .arg(&index)
            .status()
            .unwrap();
        assert!(made.success());
        let e = store
            .tag(Some("v1"), &desc(b"x"))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("not a regular file"), "{e}");
    }

    fn desc(bytes: &[u8]) -> Descriptor {
        Descriptor {
            media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            digest: digest(bytes).to_string(),
            size: bytes.len() as u64,
            ..Descriptor::default()
        }
    }

    #[test]
    fn a_blob_appears_only_once_whole_and_a_partial_one_is_continued() {
        let tmp = tempfile::TempDir::new().unwrap();
        let store = Store::open(tmp.path()).unwrap();
        let bytes = b"hello, layout";
        let d = digest(bytes);
        let mut part = store
            .begin(&d, bytes.len() as u64, true, true)
            .unwrap()
            .unwrap();
        part.write(&bytes[..5]).unwrap();
        assert!(store.present(&d, bytes.len() as u64).unwrap().is_none());
        // Too short to commit; the partial file stays.
        assert!(part.commit().is_err());
        let mut part = store
            .begin(&d, bytes.len() as u64, true, true)
            .unwrap()
            .unwrap();
        assert_eq!(part.written(), 5);
        part.write(&bytes[5..]).unwrap();
        assert_eq!(part.hash().unwrap(), d);
        assert!(part.write(b"!").is_err());
        part.commit().unwrap();
        assert!(store.check_present(&d, bytes.len() as u64).unwrap());
        assert!(
            !tmp.path()
                .join(".cloudimg/partial")
                .join(format!("sha256-{}", d.hex()))
                .exists()
        );
    }

    #[test]
    fn a_blob_written_by_another_is_not_begun_twice() {
        let tmp = tempfile::TempDir::new().unwrap();
        let store = Store::open(tmp.path()).unwrap();
        let d = digest(b"x");
        let held = store.begin(&d, 1, true, false).unwrap();
        assert!(held.is_some());
        assert!(store.begin(&d, 1, true, false).unwrap().is_none());
        drop(held);
        assert!(store.begin(&d, 1, true, false).unwrap().is_some());
    }

    #[test]
    fn a_damaged_blob_is_found_and_removed() {
        let tmp = tempfile::TempDir::new().unwrap();
        let store = Store::open(tmp.path()).unwrap();
        let d = digest(b"good");
        store.put_bytes(&d, b"good").unwrap();
        std::fs::write(store.blob_path(&d), b"evil").unwrap();
        assert!(!store.check_present(&d, 4).unwrap());
        assert!(!store.blob_path(&d).exists());
        // A wrong size is damage too, found without hashing.
        store.put_bytes(&d, b"good").unwrap();
        std::fs::write(store.blob_path(&d), b"longer").unwrap();
        assert!(store.present(&d, 4).unwrap().is_none());
    }

    #[test]
    fn retagging_replaces_the_entry_and_keeps_the_others() {
        let tmp = tempfile::TempDir::new().unwrap();
        let store = Store::open(tmp.path()).unwrap();
        store.tag(Some("v1"), &desc(b"one")).unwrap();
        store.tag(Some("v2"), &desc(b"two")).unwrap();
        store.tag(Some("v1"), &desc(b"three")).unwrap();
        store.tag(None, &desc(b"four")).unwrap();
        store.tag(None, &desc(b"four")).unwrap();
        let index: serde_json::Value =
            serde_json::from_slice(&std::fs::read(tmp.path().join("index.json")).unwrap()).unwrap();
        let list = index["manifests"].as_array().unwrap();
        let seen: Vec<(String, String)> = list
            .iter()
            .map(|e| {
                (
                    e["digest"].as_str().unwrap().to_owned(),
                    e["annotations"][ANNOTATION_REF_NAME]
                        .as_str()
                        .unwrap_or("")
                        .to_owned(),
                )
            })
            .collect();
        assert_eq!(
            seen,
            [
                (digest(b"two").to_string(), "v2".to_owned()),
                (digest(b"three").to_string(), "v1".to_owned()),
                (digest(b"four").to_string(), String::new()),
            ]
        );
    }
}
