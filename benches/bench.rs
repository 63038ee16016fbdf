//! `cargo bench`: runs `scripts/bench.sh` (the whole harness: fixtures, peers,
//! interleaved runs, docs/BENCHMARKS.md). Arguments after `--` are passed on,
//! e.g. `cargo bench -- --quick`.

use std::process::Command;

fn main() {
    let root = env!("CARGO_MANIFEST_DIR");
    // cargo passes `--bench`; keep only what the script understands.
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let status = Command::new("bash")
        .arg(format!("{root}/scripts/bench.sh"))
        .args(&args)
        .current_dir(root)
        .status()
        .expect("run scripts/bench.sh");
    std::process::exit(status.code().unwrap_or(1));
}
