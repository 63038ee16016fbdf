//! Where a blob or a digest-pinned manifest is asked for: the mirrors in
//! order, then the registry.
//!
//! A mirror's wrong answer — an error status, a dropped connection, a size
//! that is not the blob's, an HTML page — is that mirror's failure: it is
//! reported on stderr in one line naming the mirror, the mirror is not asked
//! again for this blob, and the next source is asked. A mirror that cannot
//! be reached (refused, unreachable, no handshake) or stops answering (a
//! stall) is dead: one line says so, and it is not asked again in the run,
//! for any blob or manifest — so a hung mirror costs one stall timeout, not
//! one per part. All of that is known before the first byte of the answer
//! is read. Wrong bytes of the right size only show in the digest, after
//! they were written: that fails the run, and [`MirrorUse`] lets the error
//! name the mirror.

use std::io::{IsTerminal, Write};
use std::sync::Mutex;

use super::client::redact;
use crate::error::{Error, NetFault, Result};

/// One place a blob or manifest can be asked for.
pub struct SourceUrl {
    /// The URL to ask.
    pub url: String,
    /// The mirror's base URL, for a mirror; `None` for the registry.
    pub mirror: Option<String>,
}

/// Ask `candidates` in turn until one answers. Each but the last gets one
/// try (a mirror, or a URL that answered before); the last — the registry,
/// never struck off — gets the whole retry budget, `retries`. A signal ends
/// the round at once; `failed` hears of every other failure. Without an
/// answer, the last failure is the error.
pub fn ask_in_turn<C, T>(
    candidates: &[C],
    retries: u32,
    mut ask: impl FnMut(&C, u32) -> Result<T>,
    mut failed: impl FnMut(&C, &Error),
) -> Result<T> {
    let mut last = None;
    for (i, candidate) in candidates.iter().enumerate() {
        let tries = if i + 1 == candidates.len() {
            retries
        } else {
            0
        };
        match ask(candidate, tries) {
            Ok(answer) => return Ok(answer),
            Err(e @ Error::Interrupted(_)) => return Err(e),
            Err(e) => {
                failed(candidate, &e);
                last = Some(e);
            }
        }
    }
    Err(last.expect("the registry is always a candidate"))
}

/// `mirror` failed with `e`: a mirror that could not be reached or stopped
/// answering is struck off for the run (`used` remembers it), said once;
/// any other failure is said for this blob — unless the mirror just did
/// not have it (a 404 is no fault) or was already struck off.
pub fn mirror_failed(used: &MirrorUse, mirror: &str, e: &Error) {
    let shown = redact(mirror.trim_end_matches('/'));
    if is_dead(e) {
        if used.strike_off(mirror) {
            note(&format!("mirror {shown}: {e}; not asked again in this run"));
        }
        return;
    }
    if !matches!(e.root(), Error::NotFound(_)) && !used.is_dead(mirror) {
        note(&format!("mirror {shown}: {e}; trying the next source"));
    }
}

/// Whether `e` says its source cannot be reached or stopped answering.
fn is_dead(e: &Error) -> bool {
    matches!(
        e.root(),
        Error::Network {
            fault: NetFault::Unreachable | NetFault::Stalled,
            ..
        }
    )
}

/// The run's record of its mirrors: which blobs came (wholly or in part)
/// from which mirror — so that a digest mismatch found after the bytes were
/// written can name the mirror they came from — and which mirrors are dead.
#[derive(Default)]
pub struct MirrorUse {
    /// (digest, mirror base URL)
    served: Mutex<Vec<(String, String)>>,
    /// Mirrors (base URLs) that could not be reached or stopped answering.
    dead: Mutex<Vec<String>>,
}

impl MirrorUse {
    /// Whether `mirror` was struck off for the run.
    pub fn is_dead(&self, mirror: &str) -> bool {
        let mirror = mirror.trim_end_matches('/');
        self.dead
            .lock()
            .expect("dead mirrors")
            .iter()
            .any(|m| m == mirror)
    }

    /// Strike `mirror` off for the run; false when it already was.
    fn strike_off(&self, mirror: &str) -> bool {
        let mirror = mirror.trim_end_matches('/');
        let mut dead = self.dead.lock().expect("dead mirrors");
        if dead.iter().any(|m| m == mirror) {
            return false;
        }
        dead.push(mirror.to_owned());
        true
    }

    /// `mirror` served (some of) the blob `digest`.
    pub fn record(&self, digest: &str, mirror: &str) {
        let mirror = mirror.trim_end_matches('/');
        let mut served = self.served.lock().expect("mirror use");
        if !served.iter().any(|(d, m)| d == digest && m == mirror) {
            served.push((digest.to_owned(), mirror.to_owned()));
        }
    }

    /// An integrity error about a blob that mirrors served, with the
    /// mirrors named; any other error as it is.
    pub fn explain(&self, e: Error) -> Error {
        let Error::Integrity(message) = e else {
            return e;
        };
        let served = self.served.lock().expect("mirror use");
        let mirrors: Vec<String> = served
            .iter()
            .filter(|(d, _)| message.contains(d.as_str()))
            .map(|(_, m)| format!("mirror {}", redact(m)))
            .collect();
        if mirrors.is_empty() {
            return Error::Integrity(message);
        }
        Error::Integrity(format!(
            "{message} (bytes of it came from {})",
            mirrors.join(" and ")
        ))
    }
}

/// A note on stderr that does not end the run, e.g. a mirror skipped. One
/// write, so that notes from parallel workers do not interleave; on a
/// terminal the progress line is cleared first.
fn note(line: &str) {
    let clear = if std::io::stderr().is_terminal() {
        "\r\x1b[K"
    } else {
        ""
    };
    let _ = std::io::stderr()
        .lock()
        .write_all(format!("{clear}cloudimg: {line}\n").as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integrity_errors_name_the_mirrors_that_served_the_blob() {
        let used = MirrorUse::default();
        used.record("sha256:aa", "http://m1:5000/");
        used.record("sha256:aa", "http://u:p@m2");
        used.record("sha256:bb", "http://m3");
        let e = used.explain(Error::Integrity("x (sha256:aa): digest mismatch".into()));
        assert_eq!(
            e.to_string(),
            "x (sha256:aa): digest mismatch (bytes of it came from mirror http://m1:5000 \
             and mirror http://***@m2)"
        );
        let e = used.explain(Error::Integrity("x (sha256:cc): digest mismatch".into()));
        assert_eq!(e.to_string(), "x (sha256:cc): digest mismatch");
        let e = used.explain(Error::Other("x (sha256:aa): gone".into()));
        assert_eq!(e.to_string(), "x (sha256:aa): gone");
    }

    #[test]
    fn dead_mirrors_are_struck_off_for_the_run_once() {
        let network = |fault| Error::Network {
            what: "GET http://m/v2/x".into(),
            cause: "x".into(),
            fault,
            retries: 0,
        };
        let used = MirrorUse::default();
        mirror_failed(&used, "http://m1/", &network(NetFault::Lost));
        mirror_failed(&used, "http://m1/", &Error::NotFound("404".into()));
        assert!(!used.is_dead("http://m1"), "a drop or a 404 is this blob's");
        mirror_failed(
            &used,
            "http://m1/",
            &network(NetFault::Stalled).context("part"),
        );
        assert!(used.is_dead("http://m1") && used.is_dead("http://m1/"));
        assert!(!used.strike_off("http://m1"), "struck off once");
        mirror_failed(&used, "http://m2", &network(NetFault::Unreachable));
        assert!(used.is_dead("http://m2/"));
        assert!(!used.is_dead("http://m3"));
    }

    #[test]
    fn candidates_are_asked_in_turn_the_last_with_the_retry_budget() {
        let candidates = ["m1", "m2", "registry"];
        let mut asked = Vec::new();
        let mut failed = Vec::new();
        let r: Result<&str> = ask_in_turn(
            &candidates,
            5,
            |c, tries| {
                asked.push((*c, tries));
                Err(Error::Other(format!("{c} failed")))
            },
            |c, e| failed.push(format!("{c}: {e}")),
        );
        assert_eq!(r.unwrap_err().to_string(), "registry failed");
        assert_eq!(asked, [("m1", 0), ("m2", 0), ("registry", 5)]);
        assert_eq!(failed.len(), 3);
        // The first answer ends the round; a signal ends it too.
        let r = ask_in_turn(&candidates, 5, |c, _| Ok(*c), |_, _| panic!());
        assert_eq!(r.unwrap(), "m1");
        let mut asked = 0;
        let r: Result<()> = ask_in_turn(
            &candidates,
            5,
            |_, _| {
                asked += 1;
                Err(Error::Interrupted(2))
            },
            |_, _| panic!("a signal is no mirror's failure"),
        );
        assert!(matches!(r, Err(Error::Interrupted(2))));
        assert_eq!(asked, 1);
    }
}
