//! SOURCE strings → `Reference::parse`.
//!
//! What holds for every accepted string:
//! - `Display` gives the input back byte for byte, and that re-parses to the
//!   same reference (parse and display are exact inverses on what parses);
//! - digests are valid and re-parse; tags pass `check_tag`; a layout DIR is
//!   non-empty; a registry repository is 1..=255 bytes of non-empty components;
//! - any layout DIR that parsed can be addressed by digest (`oci:DIR@DIGEST`);
//!   a DIR that parsed without a digest can also be addressed by tag through
//!   the documented escape `oci:DIR/:TAG`. (Not `oci:DIR:TAG` in general: a
//!   DIR like `img@v2` makes `oci:img@v2:latest` read as a digest.)
//! - a registry reference keeps its host and repository when its tag or
//!   digest is replaced — except the epoch-style repository `oci` with a tag,
//!   which is spelled `oci:TAG`, a layout.

#![no_main]

use std::path::PathBuf;

use cloudimg::digest::Digest;
use cloudimg::reference::{Reference, RegistryRef, Selector, check_tag};
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
    assert_eq!(shown, s, "Display gives the input back");
    assert_eq!(Reference::parse(&shown).expect("Display re-parses"), r);
    let digest: Digest = DIGEST.parse().unwrap();

    match &r {
        Reference::Layout { dir, selector } => {
            let dir_s = dir.to_str().expect("a dir parsed from a str is UTF-8");
            assert!(!dir_s.is_empty());
            match selector {
                Selector::Default => {}
                Selector::Tag(t) => check_tag(t).expect("a parsed tag is valid"),
                Selector::Digest(d) => {
                    assert_eq!(d.to_string().parse::<Digest>().expect("re-parses"), *d)
                }
            }
            let by_digest = Reference::parse(&format!("oci:{dir_s}@{digest}"))
                .expect("any parsed DIR is addressable by digest");
            assert_eq!(
                by_digest,
                Reference::Layout {
                    dir: dir.clone(),
                    selector: Selector::Digest(digest.clone()),
                }
            );
            if !matches!(selector, Selector::Digest(_)) {
                let by_tag = Reference::parse(&format!("oci:{dir_s}/:latest"))
                    .expect("DIR/:TAG addresses any DIR parsed without a digest");
                assert_eq!(
                    by_tag,
                    Reference::Layout {
                        dir: PathBuf::from(format!("{dir_s}/")),
                        selector: Selector::Tag("latest".to_owned()),
                    }
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
                if host.is_none() && repository == "oci" && tag.is_some() {
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
