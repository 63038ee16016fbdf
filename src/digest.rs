//! Content digests: parsing `alg:hex` strictly, and hashing bytes to check one.
//!
//! A digest doubles as a path component in an image layout (`blobs/ALG/HEX`),
//! so parsing is the gate that keeps `sha256:../../x` from ever reaching the
//! file system: only the two algorithms below with exactly their length of
//! lowercase hex pass.

use std::fmt;
use std::str::FromStr;

use sha2::{Digest as _, Sha256, Sha512};

use crate::error::{Error, Result};

/// A digest algorithm this tool can verify.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Algorithm {
    /// `sha256:` + 64 lowercase hex digits.
    Sha256,
    /// `sha512:` + 128 lowercase hex digits.
    Sha512,
}

impl Algorithm {
    /// The name as it appears before the colon, and as the layout's directory.
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Sha256 => "sha256",
            Algorithm::Sha512 => "sha512",
        }
    }

    fn hex_len(self) -> usize {
        match self {
            Algorithm::Sha256 => 64,
            Algorithm::Sha512 => 128,
        }
    }
}

/// A validated `algorithm:hex` digest.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Digest {
    alg: Algorithm,
    hex: String,
}

impl Digest {
    /// The algorithm part.
    pub fn algorithm(&self) -> Algorithm {
        self.alg
    }

    /// The lowercase hex part; safe to use as a file name.
    pub fn hex(&self) -> &str {
        &self.hex
    }

    /// The digest of `bytes` under `alg`.
    pub fn of(alg: Algorithm, bytes: &[u8]) -> Digest {
        let mut h = Hasher::new(alg);
        h.update(bytes);
        h.finish()
    }
}

impl FromStr for Digest {
    type Err = Error;

    fn from_str(s: &str) -> Result<Digest> {
        let (alg, hex) = s
            .split_once(':')
            .ok_or_else(|| Error::Digest(format!("{s:?} has no algorithm prefix")))?;
        let alg = match alg {
            "sha256" => Algorithm::Sha256,
            "sha512" => Algorithm::Sha512,
            other => {
                return Err(Error::Digest(format!(
                    "{s:?}: unsupported algorithm {other:?} (sha256 or sha512)"
                )));
            }
        };
        let well_formed = hex.len() == alg.hex_len()
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if !well_formed {
            return Err(Error::Digest(format!(
                "{s:?}: expected {} lowercase hex digits after {}:",
                alg.hex_len(),
                alg.name()
            )));
        }
        Ok(Digest {
            alg,
            hex: hex.to_owned(),
        })
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.alg.name(), self.hex)
    }
}

impl serde::Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Incremental hashing for either algorithm (SHA-NI is picked at run time by `sha2`).
#[derive(Clone)]
pub enum Hasher {
    /// SHA-256 in progress.
    Sha256(Sha256),
    /// SHA-512 in progress.
    Sha512(Sha512),
}

impl Hasher {
    /// A hasher for `alg`, with nothing hashed yet.
    pub fn new(alg: Algorithm) -> Hasher {
        match alg {
            Algorithm::Sha256 => Hasher::Sha256(Sha256::new()),
            Algorithm::Sha512 => Hasher::Sha512(Sha512::new()),
        }
    }

    /// Hash `bytes` next.
    pub fn update(&mut self, bytes: &[u8]) {
        match self {
            Hasher::Sha256(h) => h.update(bytes),
            Hasher::Sha512(h) => h.update(bytes),
        }
    }

    /// The digest of everything hashed.
    pub fn finish(self) -> Digest {
        let (alg, bytes) = match self {
            Hasher::Sha256(h) => (Algorithm::Sha256, h.finalize().to_vec()),
            Hasher::Sha512(h) => (Algorithm::Sha512, h.finalize().to_vec()),
        };
        Digest {
            alg,
            hex: to_hex(&bytes),
        }
    }
}

fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 15)] as char);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    const EMPTY_SHA256: &str =
        "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn parses_well_formed_digests() {
        let d: Digest = EMPTY_SHA256.parse().unwrap();
        assert_eq!(d.algorithm(), Algorithm::Sha256);
        assert_eq!(d.to_string(), EMPTY_SHA256);
        let long = format!("sha512:{}", "ab".repeat(64));
        assert_eq!(
            long.parse::<Digest>().unwrap().algorithm(),
            Algorithm::Sha512
        );
    }

    #[test]
    fn refuses_malformed_digests() {
        let bad = [
            "",
            "sha256",
            "sha256:",
            "sha256:../../etc/passwd",
            &format!("sha256:{}", "A".repeat(64)),
            &format!("sha256:{}", "a".repeat(63)),
            &format!("sha256:{}", "a".repeat(65)),
            &format!("sha256:{}/", "a".repeat(63)),
            &format!("md5:{}", "a".repeat(32)),
            &format!("SHA256:{}", "a".repeat(64)),
            &format!("sha512:{}", "a".repeat(64)),
            &format!(" sha256:{}", "a".repeat(64)),
        ];
        for s in bad {
            assert!(s.parse::<Digest>().is_err(), "{s:?} must be refused");
        }
    }

    #[test]
    fn hashes_known_vectors() {
        assert_eq!(Digest::of(Algorithm::Sha256, b"").to_string(), EMPTY_SHA256);
        assert_eq!(
            Digest::of(Algorithm::Sha256, b"{}").to_string(),
            "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
        );
        assert!(
            Digest::of(Algorithm::Sha512, b"abc")
                .hex()
                .starts_with("ddaf35a193617aba")
        );
    }

    #[test]
    fn incremental_equals_one_shot() {
        let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7) as u8).collect();
        let mut h = Hasher::new(Algorithm::Sha256);
        for chunk in data.chunks(777) {
            h.update(chunk);
        }
        assert_eq!(h.finish(), Digest::of(Algorithm::Sha256, &data));
    }
}
