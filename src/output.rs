//! `-o FILE`: nothing half-written under the final name, and nothing replaced
//! that is not a regular file.
//!
//! FILE is resolved first ([`Target::resolve`], before anything is fetched),
//! following symlinks to what they name:
//!
//! - A regular file, or a name not taken yet: the disk is written into a new
//!   file in the directory of the real target (a link's target, not the
//!   link), so that the rename is atomic and copy_file_range can reflink; it
//!   is synced and renamed over the target only when complete and verified.
//!   While it is written the new file has no name (`O_TMPFILE`), so even a
//!   run killed by SIGKILL or a power cut leaves nothing behind; where the
//!   file system cannot do that, or `/proc` is missing, it is named
//!   `.FILE.cloudimg-RANDOM.tmp` (16 random hex digits, a new draw when the
//!   name is taken) and removed on failure or signal. Only a regular file is
//!   ever renamed over.
//! - A block or character device, a pipe or a FIFO: written in place (it
//!   cannot be renamed or truncated). Opening a FIFO waits for its reader; a
//!   signal ends the wait. A terminal is refused.
//! - A unix socket: connected to (`SOCK_STREAM`) and written into.
//! - A directory, a name ending in `/`, a directory that does not exist or
//!   cannot be written: refused.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::IsTerminal;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use rustix::fs::{AtFlags, CWD, FileType, Mode, OFlags};
use rustix::io::Errno;

use crate::error::{Error, Result};
use crate::signals;

/// Where `-o FILE` leads, decided before anything is fetched.
#[derive(Debug)]
pub struct Target {
    /// FILE as the user gave it, for messages.
    shown: String,
    kind: TargetKind,
}

#[derive(Debug)]
enum TargetKind {
    /// A device, pipe or FIFO (or a link to one): opened and written in place.
    InPlace(PathBuf),
    /// A unix socket: connected to.
    Socket(PathBuf),
    /// A regular file or a free name: a new file in `dir` becomes `dir/name`.
    Staged { dir: PathBuf, name: OsString },
}

/// Symlinks followed at most, as the kernel's own limit.
const MAX_LINKS: usize = 40;

impl Target {
    /// The directory a regular file is staged in (`None` for a device, a
    /// FIFO or a socket).
    pub fn staging_dir(&self) -> Option<&Path> {
        match &self.kind {
            TargetKind::Staged { dir, .. } => Some(dir),
            _ => None,
        }
    }

    /// Follow FILE to what it names and check that it can be written.
    pub fn resolve(path: &Path) -> Result<Target> {
        let shown = path.display().to_string();
        check_file_name(path.as_os_str(), &shown)?;
        let kind = match std::fs::metadata(path) {
            Ok(meta) => {
                let ft = meta.file_type();
                if ft.is_dir() {
                    return Err(Error::Other(format!(
                        "{shown} is a directory; -o wants a file name"
                    )));
                } else if ft.is_file() {
                    let real = std::fs::canonicalize(path)
                        .map_err(|e| Error::io(format!("resolving {shown}"), e))?;
                    staged_at(&real, &shown)?
                } else if ft.is_socket() {
                    TargetKind::Socket(path.to_owned())
                } else {
                    TargetKind::InPlace(path.to_owned())
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                staged_at(&dangling_end(path, &shown)?, &shown)?
            }
            Err(e) => return Err(Error::io(shown, e)),
        };
        Ok(Target { shown, kind })
    }

    /// Open (or create) what the target names. A FIFO without a reader
    /// blocks here until one comes or a signal arrives.
    pub fn open(self) -> Result<Output> {
        let shown = self.shown;
        match self.kind {
            TargetKind::InPlace(path) => {
                let file = open_in_place(&path, &shown)?;
                Ok(Output {
                    file,
                    shown,
                    staged: None,
                })
            }
            TargetKind::Socket(path) => {
                let stream = loop {
                    match UnixStream::connect(&path) {
                        Ok(s) => break s,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => signals::check()?,
                        Err(e) => {
                            return Err(Error::io(format!("connecting to the socket {shown}"), e));
                        }
                    }
                };
                Ok(Output {
                    file: File::from(OwnedFd::from(stream)),
                    shown,
                    staged: None,
                })
            }
            TargetKind::Staged { dir, name } => {
                let dir_fd = rustix::fs::open(
                    &dir,
                    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .map_err(|e| Error::io(format!("opening {}", dir.display()), e.into()))?;
                let (file, temp) = match unnamed(&dir_fd) {
                    Some(file) => (file, None),
                    None => {
                        let (file, temp) = create_named(&dir_fd, &dir, &name)?;
                        (file, Some(temp))
                    }
                };
                Ok(Output {
                    file,
                    shown,
                    staged: Some(Staged {
                        dir_fd,
                        dir,
                        name,
                        temp,
                        committed: false,
                    }),
                })
            }
        }
    }
}

/// FILE must end in a file name: not empty, no trailing `/`, not `.` or `..`.
fn check_file_name(path: &OsStr, shown: &str) -> Result<()> {
    let last = path.as_bytes().rsplit(|&b| b == b'/').next().unwrap_or(b"");
    if path.is_empty() {
        return Err(Error::Other(
            "-o wants a file name, not an empty string".into(),
        ));
    }
    if matches!(last, b"" | b"." | b"..") {
        return Err(Error::Other(format!(
            "-o wants a file name, not {shown:?} (a name ending in '/', '.' or '..' is a directory)"
        )));
    }
    Ok(())
}

/// The path a chain of symlinks ends in, when its end does not exist yet.
fn dangling_end(path: &Path, shown: &str) -> Result<PathBuf> {
    let mut p = path.to_owned();
    for _ in 0..MAX_LINKS {
        match std::fs::symlink_metadata(&p) {
            Ok(m) if m.file_type().is_symlink() => {
                let to = std::fs::read_link(&p)
                    .map_err(|e| Error::io(format!("reading the link {}", p.display()), e))?;
                p = match p.parent() {
                    Some(dir) => dir.join(to),
                    None => to,
                };
            }
            _ => return Ok(p),
        }
    }
    Err(Error::Other(format!(
        "{shown}: more than {MAX_LINKS} symbolic links"
    )))
}

/// A new file in `end`'s (existing, writable) directory becomes `end`.
fn staged_at(end: &Path, shown: &str) -> Result<TargetKind> {
    check_file_name(end.as_os_str(), shown)?;
    let name = end
        .file_name()
        .ok_or_else(|| Error::Other(format!("{shown}: not a file name")))?
        .to_owned();
    let parent = match end.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let dir = std::fs::canonicalize(parent).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => Error::Other(format!(
            "{shown}: the directory {} does not exist",
            parent.display()
        )),
        _ => Error::io(format!("{shown}: resolving {}", parent.display()), e),
    })?;
    if !dir.is_dir() {
        return Err(Error::Other(format!(
            "{shown}: {} is not a directory",
            parent.display()
        )));
    }
    rustix::fs::access(&dir, rustix::fs::Access::WRITE_OK).map_err(|e| {
        Error::io(
            format!("{shown}: cannot create files in {}", dir.display()),
            e.into(),
        )
    })?;
    Ok(TargetKind::Staged { dir, name })
}

/// Open a device, pipe or FIFO for writing. `open` is called directly (the
/// standard library would retry it after `EINTR`), so that a signal ends a
/// FIFO's wait for its reader.
fn open_in_place(path: &Path, shown: &str) -> Result<File> {
    let fd = loop {
        match rustix::fs::open(
            path,
            OFlags::WRONLY | OFlags::NOCTTY | OFlags::CLOEXEC,
            Mode::empty(),
        ) {
            Ok(fd) => break fd,
            Err(Errno::INTR) => signals::check()?,
            Err(e) => return Err(Error::io(format!("opening {shown}"), e.into())),
        }
    };
    let file = File::from(fd);
    if file.is_terminal() {
        return Err(Error::Other(format!(
            "refusing to write a disk image to the terminal {shown}"
        )));
    }
    let st = rustix::fs::fstat(&file).map_err(|e| Error::io(shown, e.into()))?;
    match FileType::from_raw_mode(st.st_mode) {
        FileType::RegularFile | FileType::Directory => Err(Error::Other(format!(
            "{shown} was replaced while it was being opened"
        ))),
        _ => Ok(file),
    }
}

/// A file without a name in `dir` (`O_TMPFILE`), when the file system can
/// make one and `/proc` is there to give it a name at the end.
fn unnamed(dir: &OwnedFd) -> Option<File> {
    if !Path::new("/proc/self/fd").is_dir() {
        return None;
    }
    rustix::fs::openat(
        dir,
        ".",
        OFlags::WRONLY | OFlags::TMPFILE | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o644),
    )
    .ok()
    .map(File::from)
}

/// Tries at a free temporary name before giving up.
const NAME_TRIES: usize = 16;

/// Create `.NAME.cloudimg-RANDOM.tmp` in `dir`.
fn create_named(dir_fd: &OwnedFd, dir: &Path, name: &OsStr) -> Result<(File, OsString)> {
    for _ in 0..NAME_TRIES {
        let temp = temp_name(name);
        match rustix::fs::openat(
            dir_fd,
            &*temp,
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o644),
        ) {
            Ok(fd) => return Ok((File::from(fd), temp)),
            Err(Errno::EXIST) => {}
            Err(e) => {
                return Err(Error::io(
                    format!("creating {}", dir.join(&temp).display()),
                    e.into(),
                ));
            }
        }
    }
    Err(Error::Other(format!(
        "creating a temporary file in {}: {NAME_TRIES} random names were all taken",
        dir.display()
    )))
}

/// `.NAME.cloudimg-RANDOM.tmp`, NAME cut so that the whole stays within
/// the 255-byte limit of a file name.
fn temp_name(name: &OsStr) -> OsString {
    let name = name.as_bytes();
    let mut temp = b".".to_vec();
    temp.extend_from_slice(&name[..name.len().min(200)]);
    temp.extend_from_slice(format!(".cloudimg-{:016x}.tmp", random()).as_bytes());
    OsString::from_vec(temp)
}

/// 64 bits that differ between runs and calls: the kernel's random bytes
/// (without waiting for its pool at early boot), mixed with the time, the
/// PID and a counter. Only uniqueness matters: a taken name is drawn again.
fn random() -> u64 {
    static CALLS: AtomicU64 = AtomicU64::new(0);
    let mut bytes = [0u8; 8];
    let _ = rustix::rand::getrandom(&mut bytes, rustix::rand::GetRandomFlags::NONBLOCK);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let call = CALLS.fetch_add(1, Ordering::Relaxed);
    u64::from_ne_bytes(bytes)
        ^ nanos.rotate_left(21)
        ^ u64::from(std::process::id()).rotate_left(47)
        ^ call.wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// Where `get -o FILE` writes.
pub struct Output {
    file: File,
    shown: String,
    /// For a file that becomes FILE on [`Output::commit`]; `None` in place.
    staged: Option<Staged>,
}

struct Staged {
    dir_fd: OwnedFd,
    dir: PathBuf,
    /// FILE's name in `dir`.
    name: OsString,
    /// The temporary name the file has in `dir`, if any.
    temp: Option<OsString>,
    committed: bool,
}

impl Output {
    /// Resolve and open `path` at once.
    #[cfg(test)]
    pub fn open(path: &Path) -> Result<Output> {
        Target::resolve(path)?.open()
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    /// The stream is complete and verified: make it durable and give it its name.
    pub fn commit(mut self) -> Result<()> {
        let shown = &self.shown;
        match self.file.sync_data() {
            // Pipes, sockets and most character devices have nothing to sync.
            Err(e) if e.raw_os_error() == Some(Errno::INVAL.raw_os_error()) => {}
            other => other.map_err(|e| Error::io(format!("syncing {shown}"), e))?,
        }
        let Some(st) = &mut self.staged else {
            return Ok(());
        };
        if st.temp.is_none() {
            st.temp = Some(give_name(&self.file, st)?);
        }
        let temp = st.temp.as_deref().unwrap_or_default();
        // Never rename over anything but a regular file (someone may have
        // put a FIFO, a link or a directory there meanwhile).
        match rustix::fs::statat(&st.dir_fd, &*st.name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(s) if FileType::from_raw_mode(s.st_mode) != FileType::RegularFile => {
                return Err(Error::Other(format!(
                    "{shown} is no longer a regular file; not replacing it"
                )));
            }
            Ok(_) | Err(Errno::NOENT) => {}
            Err(e) => return Err(Error::io(shown.clone(), e.into())),
        }
        rustix::fs::renameat(&st.dir_fd, temp, &st.dir_fd, &*st.name)
            .map_err(|e| Error::io(format!("renaming into {shown}"), e.into()))?;
        st.committed = true;
        // Make the rename itself durable.
        let _ = rustix::fs::fsync(&st.dir_fd);
        Ok(())
    }
}

/// Link the unnamed file into its directory under a temporary name: through
/// `/proc/self/fd` (what an unprivileged process may do), else with
/// `AT_EMPTY_PATH` (which needs CAP_DAC_READ_SEARCH).
fn give_name(file: &File, st: &Staged) -> Result<OsString> {
    let proc_path = format!("/proc/self/fd/{}", file.as_raw_fd());
    for _ in 0..NAME_TRIES {
        let temp = temp_name(&st.name);
        let linked = match rustix::fs::linkat(
            CWD,
            &*proc_path,
            &st.dir_fd,
            &*temp,
            AtFlags::SYMLINK_FOLLOW,
        ) {
            Err(e) if e != Errno::EXIST => {
                rustix::fs::linkat(file.as_fd(), "", &st.dir_fd, &*temp, AtFlags::EMPTY_PATH)
            }
            other => other,
        };
        match linked {
            Ok(()) => return Ok(temp),
            Err(Errno::EXIST) => {}
            Err(e) => {
                return Err(Error::io(
                    format!("naming the finished file in {}", st.dir.display()),
                    e.into(),
                ));
            }
        }
    }
    Err(Error::Other(format!(
        "naming the finished file in {}: {NAME_TRIES} random names were all taken",
        st.dir.display()
    )))
}

impl Drop for Output {
    fn drop(&mut self) {
        if let Some(Staged {
            dir_fd,
            temp: Some(temp),
            committed: false,
            ..
        }) = &self.staged
        {
            let _ = rustix::fs::unlinkat(dir_fd, &**temp, AtFlags::empty());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(dir: &Path) -> Vec<String> {
        let mut n: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        n.sort();
        n
    }

    #[test]
    fn temporary_names_are_hidden_random_and_bounded() {
        let a = temp_name(OsStr::new("disk.img"));
        let b = temp_name(OsStr::new("disk.img"));
        assert_ne!(a, b);
        let a = a.to_str().unwrap();
        assert!(
            a.starts_with(".disk.img.cloudimg-") && a.ends_with(".tmp"),
            "{a}"
        );
        assert_eq!(a.len(), ".disk.img.cloudimg-".len() + 16 + ".tmp".len());
        let long = "x".repeat(255);
        assert!(temp_name(OsStr::new(&long)).len() <= 255);
    }

    #[test]
    fn nothing_but_a_regular_file_is_renamed_over() {
        let tmp = tempfile::TempDir::new().unwrap();
        let target = tmp.path().join("disk.img");
        let out = Output::open(&target).unwrap();
        std::io::Write::write_all(&mut out.file(), b"disk").unwrap();
        // Someone puts a directory under the name meanwhile.
        std::fs::create_dir(&target).unwrap();
        let err = out.commit().unwrap_err().to_string();
        assert!(err.contains("no longer a regular file"), "{err}");
        assert!(target.is_dir());
        assert_eq!(names(tmp.path()), ["disk.img"]);
    }

    #[test]
    fn a_finished_file_replaces_the_old_one() {
        let tmp = tempfile::TempDir::new().unwrap();
        let target = tmp.path().join("disk.img");
        std::fs::write(&target, b"old").unwrap();
        let out = Output::open(&target).unwrap();
        std::io::Write::write_all(&mut out.file(), b"new disk").unwrap();
        out.commit().unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"new disk");
        assert_eq!(names(tmp.path()), ["disk.img"]);
    }

    #[test]
    fn file_names_that_are_directories_are_refused() {
        for bad in ["", "x/", "x/.", "x/..", ".", "..", "/"] {
            assert!(check_file_name(OsStr::new(bad), bad).is_err(), "{bad:?}");
        }
        for good in ["x", "dir/x", "/dev/vdb", ".x", "..x"] {
            assert!(check_file_name(OsStr::new(good), good).is_ok(), "{good:?}");
        }
    }
}
