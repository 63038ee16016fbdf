//! Progress on stderr: a live line while stderr is a terminal, and one summary
//! line at the end. Stdout never sees any of it.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

const GIB: f64 = (1u64 << 30) as f64;
const REDRAW: Duration = Duration::from_millis(250);

/// Counts bytes written and reports them.
pub struct Progress {
    total: u64,
    done: u64,
    start: Instant,
    last_draw: Option<Instant>,
    live: bool,
    quiet: bool,
}

impl Progress {
    /// `quiet` silences everything; otherwise the live line is drawn only when
    /// stderr is a terminal, and the summary always.
    pub fn new(total: u64, quiet: bool) -> Progress {
        Progress {
            total,
            done: 0,
            start: Instant::now(),
            last_draw: None,
            live: !quiet && std::io::stderr().is_terminal(),
            quiet,
        }
    }

    /// Set the total once the plan is known.
    pub(crate) fn set_total(&mut self, total: u64) {
        self.total = total;
    }

    /// Bytes recorded so far.
    #[cfg(test)]
    pub fn bytes(&self) -> u64 {
        self.done
    }

    /// Record `n` more bytes written.
    pub(crate) fn advance(&mut self, n: u64) {
        self.done += n;
        if !self.live {
            return;
        }
        let now = Instant::now();
        if self.last_draw.is_some_and(|t| now - t < REDRAW) {
            return;
        }
        self.last_draw = Some(now);
        let secs = (now - self.start).as_secs_f64().max(1e-9);
        let rate = self.done as f64 / secs;
        let eta = if rate > 0.0 && self.total > self.done {
            let s = ((self.total - self.done) as f64 / rate) as u64;
            format!("{}:{:02}", s / 60, s % 60)
        } else {
            "-:--".to_owned()
        };
        let pct = if self.total > 0 {
            self.done as f64 * 100.0 / self.total as f64
        } else {
            100.0
        };
        let _ = write!(
            std::io::stderr(),
            "\r\x1b[K{:.2} / {:.2} GiB  {pct:5.1}%  {:.2} GiB/s  ETA {eta}",
            self.done as f64 / GIB,
            self.total as f64 / GIB,
            rate / GIB,
        );
    }

    /// Clear the live line and, unless quiet, print the summary line.
    pub fn finish(&self, what: &str) {
        if self.live && self.last_draw.is_some() {
            let _ = write!(std::io::stderr(), "\r\x1b[K");
        }
        if self.quiet {
            return;
        }
        let secs = self.start.elapsed().as_secs_f64();
        let _ = writeln!(
            std::io::stderr(),
            "cloudimg: {what} {} bytes ({:.2} GiB) in {secs:.2} s, {:.2} GiB/s",
            self.done,
            self.done as f64 / GIB,
            self.done as f64 / GIB / secs.max(1e-9),
        );
    }

    /// A line about the work (a wait, say), unless quiet.
    pub(crate) fn note(&self, line: &str) {
        if self.quiet {
            return;
        }
        let clear = if self.live { "\r\x1b[K" } else { "" };
        let _ = writeln!(std::io::stderr(), "{clear}cloudimg: {line}");
    }

    /// Clear the live line before an error is printed.
    pub fn abandon(&self) {
        if self.live && self.last_draw.is_some() {
            let _ = write!(std::io::stderr(), "\r\x1b[K");
        }
    }
}
