//! SOURCE strings: where an image comes from.
//!
//! - `oci:DIR[:TAG]` and `oci:DIR@ALG:HEX` — an OCI image layout directory
//!   (skopeo's spelling). The tag is what follows the **last** colon unless that
//!   part contains a `/`; so a DIR with a colon in it is addressed by spelling
//!   the tag out (`oci:/srv/a:b:latest`) or by ending DIR with `/` (`oci:/srv/a:b/`).
//!   A part that starts with a `.` or `..` path component (`oci:DIR:../x`) is
//!   taken as a tag, and refused: it is never read as a path beside DIR.
//! - `[HOST[:PORT]/]REPO[:TAG][@DIGEST]` — a repository in an OCI registry. The
//!   first component is a host when it contains `.` or `:` or is `localhost`;
//!   otherwise the reference is relative to `EPOCH_SERVER`.

use std::fmt;
use std::path::{Path, PathBuf};

use crate::digest::Digest;
use crate::error::{Error, Result};

/// Which manifest of a source is wanted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Selector {
    /// Nothing given: `latest`, or for a layout the only manifest it holds.
    Default,
    /// The manifest with this tag.
    Tag(String),
    /// The manifest with this digest.
    Digest(Digest),
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Selector::Default => Ok(()),
            Selector::Tag(t) => write!(f, ":{t}"),
            Selector::Digest(d) => write!(f, "@{d}"),
        }
    }
}

/// A parsed SOURCE.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reference {
    /// An OCI image layout directory.
    Layout {
        /// The layout directory.
        dir: PathBuf,
        /// Which of its manifests.
        selector: Selector,
    },
    /// A repository in a registry.
    Registry(RegistryRef),
}

/// A repository in a registry, and what is wanted of it. Both a tag and a
/// digest may be given; the digest pins.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegistryRef {
    /// `HOST[:PORT]`; `None` for epoch-style names, relative to `EPOCH_SERVER`.
    pub host: Option<String>,
    /// The repository path (`windows/win11`).
    pub repository: String,
    /// The tag, when given.
    pub tag: Option<String>,
    /// The manifest digest, when given.
    pub digest: Option<Digest>,
}

impl Reference {
    /// Parse a SOURCE string.
    pub fn parse(s: &str) -> Result<Reference> {
        match s.strip_prefix("oci:") {
            Some(rest) => parse_layout(rest),
            None => parse_registry(s),
        }
    }

    /// The image name cocoon gets by default: the last path component of the
    /// repository (`windows/win11:25h2` → `win11`), or the layout DIR's base name.
    pub fn default_name(&self) -> String {
        match self {
            Reference::Layout { dir, .. } => base_name(dir),
            Reference::Registry(r) => r
                .repository
                .rsplit('/')
                .next()
                .unwrap_or(&r.repository)
                .to_owned(),
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reference::Layout { dir, selector } => {
                write!(f, "oci:{}{selector}", dir.display())
            }
            Reference::Registry(r) => fmt::Display::fmt(r, f),
        }
    }
}

impl fmt::Display for RegistryRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(h) = &self.host {
            write!(f, "{h}/")?;
        }
        f.write_str(&self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

fn base_name(dir: &Path) -> String {
    // `Path::file_name` ignores trailing slashes and is None for `.`/`..`;
    // resolve those against the current directory.
    let named = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .filter(|n| !n.is_empty());
    named
        .or_else(|| {
            std::path::absolute(dir)
                .ok()
                .and_then(|p| p.canonicalize().ok())
                .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        })
        .unwrap_or_else(|| "image".to_owned())
}

/// `alg:…` after an `@`: meant as a digest (and then it must be a valid one).
fn looks_like_digest(s: &str) -> bool {
    s.split_once(':').is_some_and(|(alg, _)| {
        !alg.is_empty()
            && alg
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    })
}

/// `./…` or `../…` after the last colon: a tag that tries to name a path
/// (`oci:DIR:../x`), not the rest of a DIR with a colon in it.
fn climbs(after_colon: &str) -> bool {
    matches!(after_colon.split('/').next(), Some("." | ".."))
}

fn parse_layout(rest: &str) -> Result<Reference> {
    let (dir, selector) =
        if let Some((dir, d)) = rest.rsplit_once('@').filter(|(_, d)| looks_like_digest(d)) {
            (dir, Selector::Digest(d.parse()?))
        } else if let Some((dir, tag)) = rest
            .rsplit_once(':')
            .filter(|(_, t)| !t.contains('/') || climbs(t))
        {
            check_tag(tag)?;
            (dir, Selector::Tag(tag.to_owned()))
        } else {
            (rest, Selector::Default)
        };
    if dir.is_empty() {
        return Err(Error::Reference(format!(
            "oci:{rest}: no layout directory given (oci:DIR[:TAG] or oci:DIR@sha256:HEX)"
        )));
    }
    Ok(Reference::Layout {
        dir: PathBuf::from(dir),
        selector,
    })
}

/// A tag as the distribution spec allows it: `[A-Za-z0-9_][A-Za-z0-9._-]{0,127}`.
/// Besides being the grammar, this keeps tags safe to print and to compare.
pub fn check_tag(tag: &str) -> Result<()> {
    let ok = !tag.is_empty()
        && tag.len() <= 128
        && tag
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_')
        && tag
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(Error::Reference(format!(
            "{tag:?} is not a valid tag ([A-Za-z0-9_][A-Za-z0-9._-]{{0,127}})"
        )))
    }
}

/// A repository path component: lowercase alphanumerics joined by `.`, `_`,
/// `__` or runs of `-`.
fn check_component(c: &str, whole: &str) -> Result<()> {
    let bytes = c.as_bytes();
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let mut ok = !bytes.is_empty() && alnum(bytes[0]) && alnum(bytes[bytes.len() - 1]);
    let mut i = 0;
    while ok && i < bytes.len() {
        if alnum(bytes[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && !alnum(bytes[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|b| b == b'-');
    }
    if ok {
        Ok(())
    } else {
        Err(Error::Reference(format!(
            "{whole:?}: repository component {c:?} must be lowercase letters and digits \
             joined by '.', '_', '__' or '-'"
        )))
    }
}

fn parse_registry(s: &str) -> Result<Reference> {
    if s.is_empty() {
        return Err(Error::Reference("empty source".to_owned()));
    }
    let (name_tag, digest) = match s.split_once('@') {
        Some((n, d)) => (n, Some(d.parse::<Digest>()?)),
        None => (s, None),
    };
    let slash = name_tag.rfind('/').map_or(0, |i| i + 1);
    let (name, tag) = match name_tag[slash..].rsplit_once(':') {
        Some((_, t)) => {
            check_tag(t)?;
            (
                &name_tag[..name_tag.len() - t.len() - 1],
                Some(t.to_owned()),
            )
        }
        None => (name_tag, None),
    };
    let (host, repository) = match name.split_once('/') {
        Some((first, rest))
            if first.contains('.') || first.contains(':') || first == "localhost" =>
        {
            check_host(first, s)?;
            (Some(first.to_owned()), rest)
        }
        _ => (None, name),
    };
    if repository.is_empty() {
        return Err(Error::Reference(format!("{s:?}: no repository name")));
    }
    if repository.len() > 255 {
        return Err(Error::Reference(format!("{s:?}: repository name too long")));
    }
    for c in repository.split('/') {
        check_component(c, s)?;
    }
    Ok(Reference::Registry(RegistryRef {
        host,
        repository: repository.to_owned(),
        tag,
        digest,
    }))
}

/// A host, optionally with a port: DNS-ish letters, digits, `.` and `-`, or a
/// bracketed IPv6 literal.
fn check_host(h: &str, whole: &str) -> Result<()> {
    let (name, port) =
        if let Some(rest) = h.strip_prefix('[') {
            let (v6, after) = rest
                .split_once(']')
                .ok_or_else(|| Error::Reference(format!("{whole:?}: unclosed '[' in host")))?;
            if v6.parse::<std::net::Ipv6Addr>().is_err() {
                return Err(Error::Reference(format!("{whole:?}: bad IPv6 host {v6:?}")));
            }
            match after {
                "" => ("x", None),
                p => (
                    "x",
                    Some(p.strip_prefix(':').ok_or_else(|| {
                        Error::Reference(format!("{whole:?}: junk after IPv6 host"))
                    })?),
                ),
            }
        } else {
            match h.rsplit_once(':') {
                Some((n, p)) => (n, Some(p)),
                None => (h, None),
            }
        };
    let name_ok = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-');
    let port_ok = port.is_none_or(|p| p.parse::<u16>().is_ok_and(|n| n > 0));
    if name_ok && port_ok {
        Ok(())
    } else {
        Err(Error::Reference(format!(
            "{whole:?}: bad registry host {h:?}"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    fn layout(dir: &str, selector: Selector) -> Reference {
        Reference::Layout {
            dir: PathBuf::from(dir),
            selector,
        }
    }

    fn registry(host: Option<&str>, repo: &str, tag: Option<&str>, digest: bool) -> Reference {
        Reference::Registry(RegistryRef {
            host: host.map(str::to_owned),
            repository: repo.to_owned(),
            tag: tag.map(str::to_owned),
            digest: digest.then(|| format!("sha256:{HEX}").parse().unwrap()),
        })
    }

    #[test]
    fn layout_references() {
        let d = || Selector::Digest(format!("sha256:{HEX}").parse().unwrap());
        let t = |s: &str| Selector::Tag(s.to_owned());
        let cases = [
            ("oci:img", layout("img", Selector::Default)),
            ("oci:/srv/img:25h2", layout("/srv/img", t("25h2"))),
            ("oci:./img:latest", layout("./img", t("latest"))),
            (
                &format!("oci:/srv/img@sha256:{HEX}") as &str,
                layout("/srv/img", d()),
            ),
            // A colon inside DIR: spell the tag, or end DIR with a slash.
            ("oci:/srv/a:b:latest", layout("/srv/a:b", t("latest"))),
            ("oci:/srv/a:b/", layout("/srv/a:b/", Selector::Default)),
            (
                "oci:/srv/a:b/img",
                layout("/srv/a:b/img", Selector::Default),
            ),
            (
                &format!("oci:/srv/a:b@sha256:{HEX}"),
                layout("/srv/a:b", d()),
            ),
            // An @ inside DIR that does not introduce a digest.
            ("oci:/srv/u@host/img:v1", layout("/srv/u@host/img", t("v1"))),
        ];
        for (s, want) in cases {
            assert_eq!(Reference::parse(s).unwrap(), want, "{s}");
        }
    }

    #[test]
    fn bad_layout_references() {
        for s in [
            "oci:",
            "oci::latest",
            "oci:img:",
            "oci:img:bad tag",
            "oci:img@sha256:../../x",
            "oci:img@sha256:ABC",
            "oci:img:-leading-dash",
            "oci:img:../x",
            "oci:/srv/img:../../etc",
            "oci:img:./x",
            "oci:img:..",
        ] {
            assert!(Reference::parse(s).is_err(), "{s} must be refused");
        }
    }

    #[test]
    fn registry_references() {
        let cases = [
            ("win11", registry(None, "win11", None, false)),
            (
                "windows/win11:25h2",
                registry(None, "windows/win11", Some("25h2"), false),
            ),
            (
                "ghcr.io/org/img",
                registry(Some("ghcr.io"), "org/img", None, false),
            ),
            (
                "localhost:5000/a/b:v1",
                registry(Some("localhost:5000"), "a/b", Some("v1"), false),
            ),
            ("localhost/a", registry(Some("localhost"), "a", None, false)),
            (
                &format!("127.0.0.1:5000/x@sha256:{HEX}") as &str,
                registry(Some("127.0.0.1:5000"), "x", None, true),
            ),
            (
                &format!("reg.example:443/x/y:t@sha256:{HEX}"),
                registry(Some("reg.example:443"), "x/y", Some("t"), true),
            ),
            (
                "[::1]:5000/img",
                registry(Some("[::1]:5000"), "img", None, false),
            ),
            (
                "ab-c__d/e--f.g",
                registry(None, "ab-c__d/e--f.g", None, false),
            ),
        ];
        for (s, want) in cases {
            assert_eq!(Reference::parse(s).unwrap(), want, "{s}");
        }
    }

    #[test]
    fn bad_registry_references() {
        for s in [
            "",
            "Upper/case",
            "a//b",
            "a/b:",
            "a/b:t t",
            "a/../b",
            "host:99999/a",
            "a/b@sha256:123",
            "a/b@md5:00",
            "ghcr.io/",
            "-a",
            "a_/b",
            "a___b",
            "[zz]:5000/a",
        ] {
            assert!(Reference::parse(s).is_err(), "{s:?} must be refused");
        }
    }

    #[test]
    fn default_names() {
        let name = |s: &str| Reference::parse(s).unwrap().default_name();
        assert_eq!(name("windows/win11:25h2"), "win11");
        assert_eq!(name("ghcr.io/org/ubuntu:24.04"), "ubuntu");
        assert_eq!(name("oci:/srv/images/win11:25h2"), "win11");
        assert_eq!(name("oci:/srv/images/win11/"), "win11");
        assert_eq!(name("oci:/srv/a:b:latest"), "a:b");
    }

    #[test]
    fn display_round_trips() {
        for s in [
            "oci:/srv/img:25h2",
            "windows/win11:25h2",
            "localhost:5000/a/b:v1",
        ] {
            assert_eq!(Reference::parse(s).unwrap().to_string(), s);
        }
    }
}
