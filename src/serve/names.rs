//! Request paths → what they name, and names → files under the root.
//!
//! A path is percent-decoded once and then checked: a NAME is one or more
//! `/`-separated components of ASCII letters, digits, `.`, `_` and `-`, each
//! starting with a letter or digit (so no `.`, `..`, hidden entry, empty
//! component or NUL ever reaches the file system). Files are then opened
//! with `openat2(RESOLVE_BENEATH)` relative to the root directory, so that a
//! symbolic link inside the root cannot lead out of it, whatever it is
//! changed to while we look.

use std::fs::File;
use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use rustix::fs::{Mode, OFlags, ResolveFlags};

use super::http::percent_decode;
use crate::digest::Digest;
use crate::reference::Selector;

/// What a request path asks for.
#[derive(Debug, PartialEq)]
pub enum Route {
    /// `/dl/NAME[:TAG|@DIGEST]`: the assembled disk.
    Disk { name: String, selector: Selector },
    /// `/v2/`: the distribution API's version check.
    V2Base,
    /// `/v2/NAME/manifests/REF`.
    Manifest { name: String, reference: Selector },
    /// `/v2/NAME/blobs/DIGEST`.
    Blob { name: String, digest: Digest },
    /// `/v2/NAME/tags/list`.
    Tags { name: String },
    /// Any other `/v2/…` path.
    V2Other,
    /// Neither `/dl/` nor `/v2/`.
    Unknown,
}

/// The route of a request target, or why it is malformed (`400`). The query
/// string is ignored (mirrors add `?ns=HOST`).
pub fn route(target: &str) -> Result<Route, String> {
    let path = target.split_once('?').map_or(target, |(p, _)| p);
    if !path.starts_with('/') {
        return Err("the request target must be an absolute path".into());
    }
    let decoded = percent_decode(path).ok_or("malformed percent-escape in the path")?;
    let path = String::from_utf8(decoded).map_err(|_| "the path is not UTF-8")?;
    if path.chars().any(char::is_control) {
        return Err("control characters (NUL included) in the path".into());
    }
    if let Some(rest) = path.strip_prefix("/dl/") {
        let (name, selector) = split_reference(rest)?;
        return Ok(Route::Disk { name, selector });
    }
    if path == "/v2" || path == "/v2/" {
        return Ok(Route::V2Base);
    }
    let Some(rest) = path.strip_prefix("/v2/") else {
        return Ok(Route::Unknown);
    };
    if let Some(name) = rest.strip_suffix("/tags/list") {
        check_name(name)?;
        return Ok(Route::Tags { name: name.into() });
    }
    if let Some((name, reference)) = rest.rsplit_once("/manifests/") {
        check_name(name)?;
        let reference = if reference.contains(':') {
            Selector::Digest(reference.parse().map_err(|e| format!("{e}"))?)
        } else {
            check_tag(reference)?;
            Selector::Tag(reference.into())
        };
        return Ok(Route::Manifest {
            name: name.into(),
            reference,
        });
    }
    if let Some((name, digest)) = rest.rsplit_once("/blobs/") {
        check_name(name)?;
        let digest = digest.parse().map_err(|e| format!("{e}"))?;
        return Ok(Route::Blob {
            name: name.into(),
            digest,
        });
    }
    Ok(Route::V2Other)
}

/// `NAME`, `NAME:TAG` or `NAME@DIGEST` (a NAME holds neither `:` nor `@`).
fn split_reference(s: &str) -> Result<(String, Selector), String> {
    let (name, selector) = match s.find([':', '@']) {
        None => (s, Selector::Default),
        Some(i) if s.as_bytes()[i] == b'@' => (
            &s[..i],
            Selector::Digest(s[i + 1..].parse().map_err(|e| format!("{e}"))?),
        ),
        Some(i) => {
            check_tag(&s[i + 1..])?;
            (&s[..i], Selector::Tag(s[i + 1..].into()))
        }
    };
    check_name(name)?;
    Ok((name.into(), selector))
}

/// A NAME: see the module doc.
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 255 {
        return Err("the image name is empty or longer than 255 bytes".into());
    }
    for part in name.split('/') {
        let Some(first) = part.bytes().next() else {
            return Err("empty path component in the image name".into());
        };
        if !first.is_ascii_alphanumeric() {
            return Err(format!(
                "name component {part:?} must start with a letter or digit"
            ));
        }
        if !part
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        {
            return Err(format!(
                "name component {part:?} may hold only letters, digits, '.', '_' and '-'"
            ));
        }
    }
    Ok(())
}

/// A tag as the distribution spec has it: `[A-Za-z0-9_][A-Za-z0-9._-]{0,127}`.
fn check_tag(tag: &str) -> Result<(), String> {
    let ok = matches!(tag.bytes().next(), Some(b) if b.is_ascii_alphanumeric() || b == b'_')
        && tag.len() <= 128
        && tag
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(format!("{tag:?} is not a valid tag"))
    }
}

/// The served directory, held open.
pub struct Root {
    dir: OwnedFd,
    path: PathBuf,
}

impl Root {
    pub fn open(path: &Path) -> io::Result<Root> {
        let dir = rustix::fs::open(
            path,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        Ok(Root {
            dir,
            path: path.to_owned(),
        })
    }

    /// Open `rel` (built from checked names and digests only) for reading,
    /// never outside the root. Only a regular file is accepted: a FIFO would
    /// block the open, a device is nothing we serve.
    pub fn open_file(&self, rel: &str) -> io::Result<File> {
        let fd = rustix::fs::openat2(
            &self.dir,
            rel,
            OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOCTTY | OFlags::NONBLOCK,
            Mode::empty(),
            ResolveFlags::BENEATH | ResolveFlags::NO_MAGICLINKS,
        )?;
        let st = rustix::fs::fstat(&fd)?;
        if rustix::fs::FileType::from_raw_mode(st.st_mode) != rustix::fs::FileType::RegularFile {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a regular file",
            ));
        }
        rustix::fs::fcntl_setfl(&fd, OFlags::empty())?;
        Ok(File::from(fd))
    }

    /// Whether `name` is a layout: `NAME/oci-layout` is a file under the root.
    pub fn is_layout(&self, name: &str) -> bool {
        self.open_file(&format!("{name}/oci-layout")).is_ok()
    }

    /// The layouts under the root (four levels deep at most), for the start
    /// line.
    pub fn names(&self) -> Vec<String> {
        let mut found = Vec::new();
        walk(&self.path, "", 0, &mut found);
        found.retain(|n| check_name(n).is_ok() && self.is_layout(n));
        found.sort();
        found
    }
}

fn walk(dir: &Path, prefix: &str, depth: usize, found: &mut Vec<String>) {
    if depth > 4 {
        return;
    }
    if dir.join("oci-layout").is_file() && !prefix.is_empty() {
        found.push(prefix.to_owned());
        return;
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') || !e.path().is_dir() {
            continue;
        }
        let next = if prefix.is_empty() {
            name
        } else {
            format!("{prefix}/{name}")
        };
        walk(&e.path(), &next, depth + 1, found);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(name: &str, selector: Selector) -> Route {
        Route::Disk {
            name: name.into(),
            selector,
        }
    }

    #[test]
    fn disk_paths() {
        let d = format!("sha256:{}", "a".repeat(64));
        assert_eq!(route("/dl/win11"), Ok(disk("win11", Selector::Default)));
        assert_eq!(
            route("/dl/windows/win11:25h2?x=1"),
            Ok(disk("windows/win11", Selector::Tag("25h2".into())))
        );
        assert_eq!(
            route(&format!("/dl/a@{d}")),
            Ok(disk("a", Selector::Digest(d.parse().unwrap())))
        );
        assert_eq!(
            route("/dl/Win_11.x-y"),
            Ok(disk("Win_11.x-y", Selector::Default))
        );
    }

    #[test]
    fn hostile_paths_are_refused() {
        for bad in [
            "/dl/",
            "/dl/../x",
            "/dl/a/../b",
            "/dl/%2e%2e/x",
            "/dl/%2E%2E",
            "/dl/a//b",
            "/dl/a/",
            "/dl//etc/passwd",
            "/dl/a%00b",
            "/dl/a%2",
            "/dl/.hidden",
            "/dl/a/.git",
            "/dl/a:../x",
            "/dl/a:",
            "/dl/a@sha256:../../x",
            "/dl/a b",
            "/dl/a\\b",
            "/dl/%ff",
            "dl/a",
            "/v2/../x/tags/list",
            "/v2/a/blobs/sha256:zz",
            "/v2/a/manifests/-x",
        ] {
            assert!(route(bad).is_err(), "{bad:?} must be refused");
        }
    }

    #[test]
    fn distribution_paths() {
        let d = format!("sha256:{}", "b".repeat(64));
        assert_eq!(route("/v2/"), Ok(Route::V2Base));
        assert_eq!(
            route("/v2/windows/win11/tags/list"),
            Ok(Route::Tags {
                name: "windows/win11".into()
            })
        );
        assert_eq!(
            route(&format!("/v2/a/b/blobs/{d}?ns=example.com")),
            Ok(Route::Blob {
                name: "a/b".into(),
                digest: d.parse().unwrap()
            })
        );
        assert_eq!(
            route("/v2/a/manifests/v1"),
            Ok(Route::Manifest {
                name: "a".into(),
                reference: Selector::Tag("v1".into())
            })
        );
        assert_eq!(route("/v2/_catalog"), Ok(Route::V2Other));
        assert_eq!(route("/"), Ok(Route::Unknown));
    }
}
