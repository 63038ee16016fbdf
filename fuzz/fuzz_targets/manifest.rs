//! Manifest bytes → `Manifest::parse` → `classify` → `disk_plan` → the
//! `inspect` report.
//!
//! Besides "never panics", every plan that comes back must be one the stream
//! can trust: at least one layer, disk media types of one format only, sorted
//! by title bytes with manifest order kept for equal titles, a total that is
//! the sum of the sizes, and digests that re-parse (they become file names).
//! Whether a plan comes back at all is checked against an independent oracle.

#![no_main]

use cloudimg::Report;
use cloudimg::digest::{Algorithm, Digest};
use cloudimg::manifest::{DiskPlan, Kind, Manifest, classify, disk_format, disk_plan};
use cloudimg::source::Resolved;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let m = match Manifest::parse(data) {
        Ok(m) => m,
        Err(e) => {
            assert!(!e.to_string().is_empty());
            return;
        }
    };
    let kind = classify(&m);
    assert_eq!(kind, m.kind());

    // The model survives its own serialization (inspect --json, tooling).
    let json = serde_json::to_vec(&m).expect("a manifest serializes");
    let again = Manifest::parse(&json).expect("a serialized manifest parses");
    assert_eq!(again, m, "serialize/parse round trip");

    let plan = disk_plan(&m);
    assert_eq!(plan.is_ok(), oracle(&m, kind), "oracle disagrees: {plan:?}");
    match &plan {
        Ok(plan) => check_plan(&m, kind, plan),
        Err(e) => assert!(!e.to_string().is_empty()),
    }

    let resolved = Resolved {
        reference: "oci:fuzz".to_owned(),
        bytes: data.to_vec(),
        digest: Digest::of(Algorithm::Sha256, data),
        manifest: m,
        index: Vec::new(),
    };
    let report = Report::new(&resolved);
    assert_eq!(report.plan.is_some(), plan.is_ok());
    let _ = report.to_text();
    let _ = report.to_json();
});

/// Whether `disk_plan` must succeed, computed independently: a cloud image
/// whose disk layers exist, all have valid digests, share one format, and
/// whose sizes add up within 64 bits.
fn oracle(m: &Manifest, kind: Kind) -> bool {
    if kind != Kind::CloudImage {
        return false;
    }
    let disk: Vec<_> = m
        .layers
        .iter()
        .filter_map(|l| disk_format(&l.media_type).map(|f| (l, f)))
        .collect();
    let Some(&(_, first)) = disk.first() else {
        return false;
    };
    let digests_ok = disk.iter().all(|(l, _)| l.digest.parse::<Digest>().is_ok());
    let one_format = disk.iter().all(|&(_, f)| f == first);
    let sum: u128 = disk.iter().map(|(l, _)| u128::from(l.size)).sum();
    digests_ok && one_format && sum <= u128::from(u64::MAX)
}

fn check_plan(m: &Manifest, kind: Kind, plan: &DiskPlan) {
    assert_eq!(kind, Kind::CloudImage);
    assert!(!plan.layers.is_empty(), "a plan has at least one layer");
    assert_eq!(
        plan.layers.len() + plan.skipped.len(),
        m.layers.len(),
        "every layer is either in the plan or skipped"
    );
    let mut seen = vec![false; m.layers.len()];
    for l in &plan.layers {
        let src = &m.layers[l.index];
        assert!(!seen[l.index], "layer #{} planned twice", l.index);
        seen[l.index] = true;
        assert_eq!(disk_format(&l.media_type), Some(plan.format));
        assert_eq!(l.media_type, src.media_type);
        assert_eq!(l.title, src.title().unwrap_or_default());
        assert_eq!(l.size, src.size);
        assert_eq!(l.digest.to_string(), src.digest);
        let reparsed: Digest = l.digest.to_string().parse().expect("digest re-parses");
        assert_eq!(reparsed, l.digest);
        assert!(!l.digest.hex().contains(['/', '.', '\0']));
        assert!(!l.name().is_empty());
    }
    for s in &plan.skipped {
        assert_eq!(disk_format(&s.media_type), None, "skipped a disk layer");
    }
    for w in plan.layers.windows(2) {
        let (a, b) = (&w[0], &w[1]);
        let order = a.title.as_bytes().cmp(b.title.as_bytes());
        assert!(
            order.is_lt() || (order.is_eq() && a.index < b.index),
            "plan not sorted by title bytes, stably: #{} {:?} before #{} {:?}",
            a.index,
            a.title,
            b.index,
            b.title
        );
    }
    let sum: u128 = plan.layers.iter().map(|l| u128::from(l.size)).sum();
    assert_eq!(u128::from(plan.total), sum, "total is the sum of sizes");
}
