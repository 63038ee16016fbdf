//! SOURCE strings → `Reference::parse`.
//!
//! What holds for every accepted string:
//! - `Display` gives the input back byte for byte, and that re-parses to the
//!   same reference (parse and display are exact inverses on what parses);
//!   (`docker://` aside, which is accepted and dropped);
//! - digests are valid and re-parse; registry tags pass `check_tag`, layout
//!   refs `check_ref_name`; a layout DIR is non-empty and holds no colon (it
//!   ends at the first one, as in skopeo);
//! - any layout DIR that parsed can be addressed by digest (`oci:DIR@DIGEST`);
//!   a DIR that parsed without a digest can also be addressed by tag,
//!   `oci:DIR:TAG` — unless it ends in `@sha256` or `@sha512`, which makes
//!   what follows the colon a digest;
//! - a registry reference keeps its host and repository when its tag or
//!   digest is replaced — except the epoch-style repositories `oci` and
//!   `oci-archive` with a tag, which spell a layout or an archive.

#![no_main]

use std::path::PathBuf;

use cloudimg::digest::Digest;
use cloudimg::reference::{Reference, RegistryRef, Selector, check_ref_name, check_tag};
use libfuzzer_sys::fuzz_target;

const DIGEST: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let r = match Reference::parse(s) {
        Ok(r) => r,
        Err(e) => {
            assert!(!e.to_string().is_empty());
            return;
        }
    };
    let shown = r.to_string();
    assert_eq!(
        shown,
        s.strip_prefix("docker://").unwrap_or(s),
        "Display gives the input back"
    );
    assert_eq!(Reference::parse(&shown).expect("Display re-parses"), r);
    let digest: Digest = DIGEST.parse().unwrap();

    match &r {
        Reference::Layout { dir, selector }
        | Reference::Archive {
            file: dir,
            selector,
        } => {
            let layout = matches!(r, Reference::Layout { .. });
            let scheme = if layout { "oci" } else { "oci-archive" };
            let make = |dir: PathBuf, selector: Selector| {
                if layout {
                    Reference::Layout { dir, selector }
                } else {
                    Reference::Archive {
                        file: dir,
                        selector,
                    }
                }
            };
            let dir_s = dir.to_str().expect("a dir parsed from a str is UTF-8");
            assert!(!dir_s.is_empty() && !dir_s.contains(':'));
            match selector {
                Selector::Default => {}
                Selector::Tag(t) => check_ref_name(t).expect("a parsed ref is valid"),
                Selector::Digest(d) => {
                    assert_eq!(d.to_string().parse::<Digest>().expect("re-parses"), *d)
                }
            }
            let by_digest = Reference::parse(&format!("{scheme}:{dir_s}@{digest}"))
                .expect("any parsed DIR is addressable by digest");
            assert_eq!(
                by_digest,
                make(dir.clone(), Selector::Digest(digest.clone()))
            );
            if !matches!(selector, Selector::Digest(_))
                && !dir_s.ends_with("@sha256")
                && !dir_s.ends_with("@sha512")
            {
                let by_tag = Reference::parse(&format!("{scheme}:{dir_s}:a/b:latest"))
                    .expect("DIR:REF addresses any DIR parsed without a digest");
                assert_eq!(
                    by_tag,
                    make(dir.clone(), Selector::Tag("a/b:latest".to_owned()))
                );
            }
        }
        Reference::Registry(RegistryRef {
            host,
            repository,
            tag,
            digest: pinned,
        }) => {
            assert!(!repository.is_empty() && repository.len() <= 255);
            assert!(repository.split('/').all(|c| !c.is_empty()));
            if let Some(h) = host {
                assert!(h.contains('.') || h.contains(':') || h == "localhost");
            }
            if let Some(t) = tag {
                check_tag(t).expect("a parsed tag is valid");
            }
            if let Some(d) = pinned {
                assert_eq!(d.to_string().parse::<Digest>().expect("re-parses"), *d);
            }
            assert!(!r.default_name().is_empty());
            for (tag, pinned) in [
                (Some("v1"), None),
                (None, Some(digest.clone())),
                (Some("v1"), Some(digest.clone())),
                (None, None),
            ] {
                // `oci:TAG` is a layout: an epoch-style repository named
                // `oci` cannot carry a tag (the transport prefix wins).
                if host.is_none()
                    && (repository == "oci" || repository == "oci-archive")
                    && tag.is_some()
                {
                    continue;
                }
                let other = Reference::Registry(RegistryRef {
                    host: host.clone(),
                    repository: repository.clone(),
                    tag: tag.map(str::to_owned),
                    digest: pinned,
                });
                assert_eq!(
                    Reference::parse(&other.to_string()).expect("re-tagged re-parses"),
                    other
                );
            }
        }
    }
});
