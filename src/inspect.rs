//! `inspect`: what a source holds, as text for people or JSON for scripts.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use crate::digest::Digest;
use crate::manifest::{Descriptor, DiskPlan, Kind, disk_plan};
use crate::source::{IndexChoice, Resolved};

/// Everything `inspect` shows about one resolved manifest. `--json` spells
/// the fields as OCI does (`mediaType`, `artifactType`, `digest`, `size`,
/// `annotations`).
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    /// The reference as given.
    pub reference: String,
    /// The image indexes the reference led through, outermost first, each
    /// with every entry it offers and the one chosen.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub index: Vec<IndexChoice>,
    /// The manifest's digest (verified).
    pub digest: Digest,
    /// The manifest's size in bytes.
    pub size: u64,
    /// The manifest's media type, when it says.
    pub media_type: Option<String>,
    /// The manifest's artifactType.
    pub artifact_type: Option<String>,
    /// The manifest's config descriptor.
    pub config: Option<Descriptor>,
    /// What the manifest describes.
    pub kind: Kind,
    /// The manifest's annotations.
    pub annotations: BTreeMap<String, String>,
    /// The disk plan, when the manifest is a usable cloud image.
    pub plan: Option<DiskPlan>,
    /// Why there is no plan, otherwise.
    pub plan_error: Option<String>,
}

impl Report {
    /// The report on `resolved`: its plan, or why it has none.
    pub fn new(resolved: &Resolved) -> Report {
        let m = &resolved.manifest;
        let (plan, plan_error) = match disk_plan(m) {
            Ok(p) => (Some(p), None),
            Err(e) => (None, Some(e.to_string())),
        };
        Report {
            reference: resolved.reference.clone(),
            index: resolved.index.clone(),
            digest: resolved.digest.clone(),
            size: resolved.bytes.len() as u64,
            media_type: m.media_type.clone(),
            artifact_type: m.artifact_type.clone(),
            config: m.config.clone(),
            kind: m.kind(),
            annotations: m.annotations.clone(),
            plan,
            plan_error,
        }
    }

    /// `inspect --json`.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a report always serializes")
    }

    /// `inspect`'s text, with whatever the manifest says escaped.
    pub fn to_text(&self) -> String {
        let mut s = String::new();
        let none = "-";
        let _ = writeln!(s, "reference:      {}", clean(&self.reference));
        for ix in &self.index {
            let chosen = ix
                .platform
                .as_ref()
                .map_or("its only entry".to_owned(), |p| p.spelled());
            let _ = writeln!(
                s,
                "index:          {} ({}, {} bytes), chose {}",
                ix.digest,
                clean(ix.media_type.as_deref().unwrap_or(none)),
                ix.size,
                clean(&chosen)
            );
            for d in &ix.manifests {
                let platform = d
                    .platform
                    .as_ref()
                    .map_or("(no platform)".to_owned(), |p| p.spelled());
                let mark = if d.digest == ix.chosen {
                    "  <- chosen"
                } else {
                    ""
                };
                let _ = writeln!(
                    s,
                    "  {:<20} {}  {}{mark}",
                    clean(&platform),
                    clean(&d.digest),
                    clean(if d.media_type.is_empty() {
                        none
                    } else {
                        &d.media_type
                    })
                );
            }
        }
        let _ = writeln!(s, "digest:         {}", self.digest);
        let _ = writeln!(s, "size:           {} bytes", self.size);
        let _ = writeln!(
            s,
            "media type:     {}",
            clean(self.media_type.as_deref().unwrap_or(none))
        );
        let _ = writeln!(
            s,
            "artifact type:  {}",
            clean(self.artifact_type.as_deref().unwrap_or(none))
        );
        let _ = writeln!(
            s,
            "config type:    {}",
            clean(self.config.as_ref().map_or(none, |c| &c.media_type))
        );
        let _ = writeln!(s, "kind:           {}", self.kind);
        if !self.annotations.is_empty() {
            let _ = writeln!(s, "annotations:");
            for (k, v) in &self.annotations {
                let _ = writeln!(s, "  {} = {}", clean(k), clean(v));
            }
        }
        match (&self.plan, &self.plan_error) {
            (Some(plan), _) => {
                let _ = writeln!(
                    s,
                    "disk:           {}, {} layer(s), {} bytes ({})",
                    plan.format,
                    plan.layers.len(),
                    plan.total,
                    human(plan.total)
                );
                for (i, l) in plan.layers.iter().enumerate() {
                    let title = if l.title.is_empty() {
                        "(no title)"
                    } else {
                        &l.title
                    };
                    let _ = writeln!(
                        s,
                        "  {i:>3}  {}  {}  {} bytes  {}",
                        clean(title),
                        clean(&l.media_type),
                        l.size,
                        l.digest
                    );
                }
                if !plan.skipped.is_empty() {
                    let _ = writeln!(s, "skipped:");
                    for l in &plan.skipped {
                        let title = if l.title.is_empty() {
                            "(no title)"
                        } else {
                            &l.title
                        };
                        let _ = writeln!(
                            s,
                            "       {}  {} bytes  {}",
                            clean(title),
                            l.size,
                            clean(&l.reason)
                        );
                    }
                }
            }
            (None, Some(e)) => {
                let _ = writeln!(s, "disk:           none: {}", clean(e));
            }
            (None, None) => {}
        }
        s
    }
}

/// Bytes in binary units, for people.
pub fn human(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.2} {}", UNITS[u])
    }
}

/// Text from a manifest, made safe for a terminal: characters that act
/// instead of showing — control characters (newlines, escape sequences),
/// Unicode format characters (bidirectional overrides such as U+202E,
/// zero-width ones such as U+200B) and the line and paragraph separators —
/// are shown escaped (`\u{202e}`).
pub fn clean(s: &str) -> std::borrow::Cow<'_, str> {
    if !s.chars().any(acts) {
        return std::borrow::Cow::Borrowed(s);
    }
    std::borrow::Cow::Owned(
        s.chars()
            .map(|c| {
                if acts(c) {
                    c.escape_default().to_string()
                } else {
                    c.to_string()
                }
            })
            .collect(),
    )
}

/// Unicode's format characters (general category Cf), as ranges.
const FORMAT: [(char, char); 21] = [
    ('\u{00AD}', '\u{00AD}'),
    ('\u{0600}', '\u{0605}'),
    ('\u{061C}', '\u{061C}'),
    ('\u{06DD}', '\u{06DD}'),
    ('\u{070F}', '\u{070F}'),
    ('\u{0890}', '\u{0891}'),
    ('\u{08E2}', '\u{08E2}'),
    ('\u{180E}', '\u{180E}'),
    ('\u{200B}', '\u{200F}'),
    ('\u{202A}', '\u{202E}'),
    ('\u{2060}', '\u{206F}'),
    ('\u{FEFF}', '\u{FEFF}'),
    ('\u{FFF9}', '\u{FFFB}'),
    ('\u{110BD}', '\u{110BD}'),
    ('\u{110CD}', '\u{110CD}'),
    ('\u{13430}', '\u{1343F}'),
    ('\u{1BCA0}', '\u{1BCA3}'),
    ('\u{1D173}', '\u{1D17A}'),
    ('\u{E0001}', '\u{E0001}'),
    ('\u{E0020}', '\u{E007F}'),
    // Not Cf, but line breaks to some terminals: LINE and PARAGRAPH SEPARATOR.
    ('\u{2028}', '\u{2029}'),
];

/// Whether `c` acts on a terminal instead of showing.
fn acts(c: char) -> bool {
    c.is_control() || FORMAT.iter().any(|&(lo, hi)| (lo..=hi).contains(&c))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(clean("plain title"), "plain title");
        assert_eq!(clean("a\nb\x1b[2J"), "a\\nb\\u{1b}[2J");
    }

    #[test]
    fn format_characters_are_escaped() {
        assert_eq!(clean("evil\u{202e}gpj.exe"), "evil\\u{202e}gpj.exe");
        assert_eq!(
            clean("a\u{200b}b\u{feff}\u{2066}\u{2028}"),
            "a\\u{200b}b\\u{feff}\\u{2066}\\u{2028}"
        );
        assert_eq!(clean("tag\u{e0041}"), "tag\\u{e0041}");
        // Letters of any script stay as they are.
        assert_eq!(
            clean("Ubuntu 24.04 — Ωmega ☃ 日本"),
            "Ubuntu 24.04 — Ωmega ☃ 日本"
        );
    }
}
