//! SOURCE strings: where an image comes from.
//!
//! - `oci:PATH[:REF]` and `oci:PATH@ALG:HEX` — an OCI image layout directory,
//!   split as skopeo and containers/image split it: PATH ends at the **first**
//!   colon, and everything after it is the ref name, so a ref may hold colons
//!   and slashes (`oci:./l:127.0.0.1:5000/team/img:v1`, as skopeo writes full
//!   names into `org.opencontainers.image.ref.name`). A ref must follow the
//!   image spec's ref grammar, so `..` or `./x` is refused, never read as a
//!   path. A directory whose name holds a colon is reached through a symlink
//!   or by a relative path from inside it.
//! - `oci-archive:FILE[:REF]` and `oci-archive:FILE@ALG:HEX` — the same, in a
//!   tar of a layout (what `skopeo copy … oci-archive:` writes), read in place.
//! - `docker://REF` — skopeo's spelling of a registry reference.
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
    /// An OCI image layout in an uncompressed tar file (`oci-archive:`).
    Archive {
        /// The tar file.
        file: PathBuf,
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
        if let Some(rest) = s.strip_prefix("oci:") {
            let (dir, selector) = parse_path_ref("oci", rest)?;
            return Ok(Reference::Layout { dir, selector });
        }
        if let Some(rest) = s.strip_prefix("oci-archive:") {
            let (file, selector) = parse_path_ref("oci-archive", rest)?;
            return Ok(Reference::Archive { file, selector });
        }
        if let Some(docker) = s.strip_prefix("docker://") {
            // skopeo's spelling of a registry reference.
            return parse_registry(docker);
        }
        // A path where a registry reference was expected: say which form
        // reads it, rather than asking a registry.
        let path_like = s.starts_with(['/', '~']) || s.starts_with("./") || s.starts_with("../");
        let local = Path::new(s).join("oci-layout").is_file()
            || (s.ends_with(".tar") && Path::new(s).is_file());
        if path_like || local {
            return Err(Error::Reference(format!(
                "{s:?} is a path, not a registry reference: {}",
                local_layout_hint(s)
            )));
        }
        parse_registry(s)
    }

    /// The image name cocoon gets by default: the last path component of the
    /// repository (`windows/win11:25h2` → `win11`), or the layout DIR's base name.
    pub fn default_name(&self) -> String {
        match self {
            Reference::Layout { dir, .. } => base_name(dir),
            Reference::Archive { file, .. } => archive_name(file),
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
            Reference::Archive { file, selector } => {
                write!(f, "oci-archive:{}{selector}", file.display())
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

/// What a SOURCE that is a path should have said.
fn local_layout_hint(s: &str) -> String {
    let path = Path::new(s);
    if path.join("oci-layout").is_file() {
        format!("for the layout directory, say oci:{s}")
    } else if path.is_file() {
        format!("for a tar of a layout, say oci-archive:{s}")
    } else if path.is_dir() {
        "the directory is not an OCI image layout (no oci-layout file)".to_owned()
    } else {
        "layouts are read as oci:DIR, tars of layouts as oci-archive:FILE".to_owned()
    }
}

/// An archive's base name without its `.tar` (`/srv/win11.tar` → `win11`).
fn archive_name(file: &Path) -> String {
    let name = base_name(file);
    match name.strip_suffix(".tar") {
        Some(stem) if !stem.is_empty() => stem.to_owned(),
        _ => name,
    }
}

/// `PATH[:REF]` or `PATH@ALG:HEX` after `oci:` / `oci-archive:`. PATH ends
/// at the first colon (skopeo's rule) — unless the text before that colon
/// ends in `@sha256` or `@sha512`, which makes the rest a digest.
fn parse_path_ref(scheme: &str, rest: &str) -> Result<(PathBuf, Selector)> {
    let (path, selector) = match rest.split_once(':') {
        None => (rest, Selector::Default),
        Some((head, tail)) => match head.rsplit_once('@') {
            Some((path, alg)) if matches!(alg, "sha256" | "sha512") => {
                (path, Selector::Digest(format!("{alg}:{tail}").parse()?))
            }
            _ => {
                check_ref_name(tail)?;
                (head, Selector::Tag(tail.to_owned()))
            }
        },
    };
    if path.is_empty() {
        let what = if scheme == "oci" { "DIR" } else { "FILE" };
        return Err(Error::Reference(format!(
            "{scheme}:{rest}: no path given ({scheme}:{what}[:REF] or {scheme}:{what}@sha256:HEX)"
        )));
    }
    Ok((PathBuf::from(path), selector))
}

/// A ref name in a layout, in the image spec's grammar for
/// `org.opencontainers.image.ref.name`: components of letters and digits
/// joined by one of `-._:@+` or by `--`, separated by `/`. So `..`, `./x`
/// or a leading `/` never pass, and the name is safe to print.
pub fn check_ref_name(name: &str) -> Result<()> {
    let component_ok = |c: &str| {
        let b = c.as_bytes();
        let mut ok = !b.is_empty() && b[0].is_ascii_alphanumeric();
        let mut i = 0;
        while ok && i < b.len() {
            if b[i].is_ascii_alphanumeric() {
                i += 1;
                continue;
            }
            let start = i;
            while i < b.len() && !b[i].is_ascii_alphanumeric() {
                i += 1;
            }
            let sep = &c[start..i];
            ok = i < b.len() && (sep == "--" || (sep.len() == 1 && "-._:@+".contains(sep)));
        }
        ok
    };
    if name.len() <= 512 && name.split('/').all(component_ok) {
        Ok(())
    } else {
        Err(Error::Reference(format!(
            "{name:?} is not a valid tag (a ref name: letters and digits joined by one of \
             -._:@+ or --, in components separated by /)"
        )))
    }
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
            // PATH ends at the first colon (skopeo's rule): the rest is the
            // ref, colons and slashes included.
            ("oci:/srv/a:b:latest", layout("/srv/a", t("b:latest"))),
            (
                "oci:./l:127.0.0.1:5101/team/img:v1",
                layout("./l", t("127.0.0.1:5101/team/img:v1")),
            ),
            (
                "oci:img:docker.io/library/x:1.0",
                layout("img", t("docker.io/library/x:1.0")),
            ),
            ("oci:img:a--b_c+d@e", layout("img", t("a--b_c+d@e"))),
            (&format!("oci:/srv/a@sha256:{HEX}"), layout("/srv/a", d())),
            // An @ inside DIR that does not introduce a digest.
            ("oci:/srv/u@host/img:v1", layout("/srv/u@host/img", t("v1"))),
            ("oci:/srv/img@v2:latest", layout("/srv/img@v2", t("latest"))),
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
            "oci:img:a/../b",
            "oci:img:/abs",
            "oci:img:a//b",
            "oci:img:a-",
            "oci:img:a...b",
            "oci-archive:",
            "oci-archive::x",
            &format!("oci:img@sha512:{HEX}"),
        ] {
            assert!(Reference::parse(s).is_err(), "{s} must be refused");
        }
    }

    #[test]
    fn archive_and_docker_references() {
        assert_eq!(
            Reference::parse("oci-archive:/srv/w.tar:a:b").unwrap(),
            Reference::Archive {
                file: PathBuf::from("/srv/w.tar"),
                selector: Selector::Tag("a:b".to_owned()),
            }
        );
        assert_eq!(
            Reference::parse("docker://ghcr.io/org/img:v1").unwrap(),
            Reference::parse("ghcr.io/org/img:v1").unwrap()
        );
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
        assert_eq!(name("oci:/srv/a:b:latest"), "a");
        assert_eq!(name("oci-archive:/srv/win11.tar:25h2"), "win11");
        assert_eq!(name("oci-archive:/srv/win11"), "win11");
        assert_eq!(name("docker://ghcr.io/org/ubuntu:24.04"), "ubuntu");
    }

    #[test]
    fn display_round_trips() {
        for s in [
            "oci:/srv/img:25h2",
            "oci:/srv/img:127.0.0.1:5000/a/b:v1",
            "oci-archive:/srv/img.tar:25h2",
            "windows/win11:25h2",
            "localhost:5000/a/b:v1",
        ] {
            assert_eq!(Reference::parse(s).unwrap().to_string(), s);
        }
    }
}
