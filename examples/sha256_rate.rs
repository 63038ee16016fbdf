//! How fast the `sha2` crate (the hasher cloudimg verifies with) hashes on one
//! thread: a 1 MiB buffer of pseudo-random bytes hashed again and again for at
//! least SECONDS (default 2) after a short warm-up. Prints bytes per second.
//! `scripts/bench.sh` uses it for the hashing bound of the verified scenarios.
//!
//!     cargo run --release --example sha256_rate [SECONDS]

use sha2::{Digest, Sha256};
use std::time::{Duration, Instant};

fn main() {
    let secs: f64 = match std::env::args().nth(1) {
        None => 2.0,
        Some(a) => match a.parse() {
            Ok(v) if v > 0.0 => v,
            _ => {
                eprintln!("usage: sha256_rate [SECONDS]");
                std::process::exit(2);
            }
        },
    };
    // xorshift: incompressible enough for a hash, no extra dependency.
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    let buf: Vec<u8> = (0..1 << 20)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect();
    let mut hasher = Sha256::new();
    for _ in 0..64 {
        hasher.update(&buf);
    }
    let limit = Duration::from_secs_f64(secs);
    let start = Instant::now();
    let mut bytes = 0u64;
    while start.elapsed() < limit {
        for _ in 0..16 {
            hasher.update(&buf);
        }
        bytes += 16 << 20;
    }
    let elapsed = start.elapsed().as_secs_f64();
    std::hint::black_box(hasher.finalize());
    println!("{:.0}", bytes as f64 / elapsed);
}
