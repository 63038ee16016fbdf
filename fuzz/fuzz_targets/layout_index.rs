//! A layout's `index.json` → `select_manifest` (tag, digest, default), then
//! `choose_platform` when the same bytes are read as an image index.
//!
//! Input: a selector line (empty = default, `:TAG`, `@DIGEST`), a platform
//! line (empty = this machine's default, else `OS/ARCH[/VARIANT]`), then the
//! `index.json` bytes.
//!
//! Checked against an independent reading of the index: a tag selects the
//! entry carrying that name (`ref.name` or containerd's image name) when all
//! entries carrying it share one digest (the first of them), and fails when
//! they have several; the default does the same for `latest`, else takes the
//! only digest listed; a digest always resolves — to the first listed entry
//! with that digest, else to an unlisted descriptor of unknown size; errors
//! happen exactly when the oracle finds nothing, and print. `choose_platform`
//! takes a lone entry without platform, else the first that matches.

#![no_main]

use cloudimg::digest::Digest;
use cloudimg::manifest::{
    ANNOTATION_CONTAINERD_NAME, ANNOTATION_REF_NAME, Descriptor, Manifest, Platform,
};
use cloudimg::reference::Selector;
use cloudimg::source::{choose_platform, host_architecture, parse_platform, select_manifest};
use libfuzzer_sys::fuzz_target;

const REFERENCE: &str = "oci:fuzz";

fuzz_target!(|data: &[u8]| {
    let mut parts = data.splitn(3, |&b| b == b'\n');
    let (Some(sel), Some(plat), Some(json)) = (parts.next(), parts.next(), parts.next()) else {
        return;
    };
    let Ok(sel) = std::str::from_utf8(sel) else {
        return;
    };
    let selector = if sel.is_empty() {
        Selector::Default
    } else if let Some(tag) = sel.strip_prefix(':') {
        Selector::Tag(tag.to_owned())
    } else if let Some(d) = sel.strip_prefix('@') {
        match d.parse::<Digest>() {
            Ok(d) => Selector::Digest(d),
            Err(_) => return,
        }
    } else {
        return;
    };

    let index: Option<Manifest> = serde_json::from_slice(json).ok();
    let got = select_manifest(json, &selector, REFERENCE);
    let want = index.as_ref().map(|ix| expected(ix, &selector));
    match (&got, &want) {
        (Ok(d), Some(Some(w))) => assert_eq!(d, w),
        (Err(e), None | Some(None)) => {
            let msg = e.to_string();
            if index.is_some() {
                assert!(msg.contains(REFERENCE), "{msg}");
            }
        }
        _ => panic!("select_manifest {got:?}, oracle {want:?}"),
    }

    let Some(index) = index else {
        return;
    };
    let platform = match std::str::from_utf8(plat) {
        Ok("") => None,
        Ok(p) => match parse_platform(p) {
            Ok(p) => Some(p),
            Err(e) => {
                assert!(!e.to_string().is_empty());
                return;
            }
        },
        Err(_) => return,
    };
    let default = Platform {
        os: "linux".to_owned(),
        architecture: host_architecture().to_owned(),
        variant: None,
    };
    let want = platform.as_ref().unwrap_or(&default);
    let matches = |p: &Platform| {
        p.os == want.os
            && p.architecture == want.architecture
            && (want.variant.is_none() || p.variant == want.variant)
    };
    let first = match index.manifests.as_slice() {
        [only] if only.platform.is_none() => Some(only),
        all => all
            .iter()
            .find(|d| d.platform.as_ref().is_some_and(matches)),
    };
    match choose_platform(&index, platform.as_ref()) {
        Ok(d) => assert_eq!(Some(&d), first),
        Err(e) => {
            assert!(first.is_none());
            assert!(!e.to_string().is_empty());
        }
    }
});

/// What the selector must pick, read independently of `select_manifest`.
fn expected(index: &Manifest, selector: &Selector) -> Option<Descriptor> {
    // The first entry of each digest among `hits`; one digest or none.
    let one = |hits: Vec<&Descriptor>| {
        let first = hits.first().copied()?;
        hits.iter()
            .all(|d| d.digest == first.digest)
            .then(|| first.clone())
    };
    let named = |tag: &str| -> Vec<&Descriptor> {
        index
            .manifests
            .iter()
            .filter(|d| {
                [ANNOTATION_REF_NAME, ANNOTATION_CONTAINERD_NAME]
                    .iter()
                    .any(|k| d.annotations.get(*k).map(String::as_str) == Some(tag))
            })
            .collect()
    };
    match selector {
        Selector::Tag(t) => one(named(t)),
        Selector::Default => {
            let latest = named("latest");
            if latest.is_empty() {
                one(index.manifests.iter().collect())
            } else {
                one(latest)
            }
        }
        Selector::Digest(d) => Some(
            index
                .manifests
                .iter()
                .find(|m| m.digest == d.to_string())
                .cloned()
                .unwrap_or(Descriptor {
                    digest: d.to_string(),
                    size: u64::MAX,
                    ..Descriptor::default()
                }),
        ),
    }
}
