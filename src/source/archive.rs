//! An OCI image layout inside an uncompressed tar file (`oci-archive:`, as
//! `skopeo copy … oci-archive:FILE` and `ctr images export` write it), read in
//! place: the tar's headers are read once, and every file of the layout is a
//! byte range of the tar file. Blobs so stay file ranges, which the kernel
//! moves without a copy through user space, and which are leased and hashed
//! like the blobs of a layout directory.
//!
//! Formats read: POSIX ustar (with its name prefix), pax extended headers
//! (`path`, `size`), GNU long names (`L`) and GNU base-256 sizes. Only regular
//! files are indexed; when a name repeats, the last entry wins, as unpacking
//! the tar would have it.

use std::collections::HashMap;
use std::fs::File;
use std::path::Path;

use crate::error::{Error, Result};
use crate::zerocopy::pread;

const BLOCK: u64 = 512;
/// Largest pax header or GNU long name read: these hold one name each.
const MAX_META: u64 = 1 << 20;

/// Where a file of the archive lies in it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    /// The first byte of the file's content in the tar file.
    pub offset: u64,
    /// The file's size.
    pub len: u64,
}

/// The regular files of a tar archive, by name.
#[derive(Debug)]
pub struct Archive {
    entries: HashMap<String, Entry>,
}

impl Archive {
    /// Read the headers of the tar archive `file` (of `file_len` bytes);
    /// `path` names it in errors.
    pub fn index(file: &File, file_len: u64, path: &Path) -> Result<Archive> {
        let shown = path.display();
        let bad =
            |why: String| Error::Manifest(format!("{shown}: not a usable tar archive: {why}"));
        let mut entries = HashMap::new();
        let mut pos = 0u64;
        let mut long_name: Option<String> = None;
        let mut pax_path: Option<String> = None;
        let mut pax_size: Option<u64> = None;
        let mut header = [0u8; BLOCK as usize];
        loop {
            if pos + BLOCK > file_len {
                if pos == file_len && pos > 0 {
                    break; // no end-of-archive blocks: tolerated, as tar does
                }
                return Err(bad(format!("ends inside a header at byte {pos}")));
            }
            read_exact_at(file, &mut header, pos, &shown.to_string())?;
            if header.iter().all(|&b| b == 0) {
                break;
            }
            if !checksum_ok(&header) {
                return Err(bad(format!("bad header checksum at byte {pos}")));
            }
            let size = match pax_size.take() {
                Some(n) => n,
                None => number(&header[124..136])
                    .ok_or_else(|| bad(format!("bad size field at byte {pos}")))?,
            };
            let data = pos + BLOCK;
            let end = data
                .checked_add(size)
                .filter(|&e| e <= file_len)
                .ok_or_else(|| bad(format!("an entry at byte {pos} runs past the end")))?;
            let next = end.div_ceil(BLOCK) * BLOCK;
            let kind = header[156];
            match kind {
                b'x' | b'L' => {
                    if size > MAX_META {
                        return Err(bad(format!("a {size} byte name header at byte {pos}")));
                    }
                    let mut meta = vec![0u8; size as usize];
                    read_exact_at(file, &mut meta, data, &shown.to_string())?;
                    if kind == b'L' {
                        let name = meta.split(|&b| b == 0).next().unwrap_or_default();
                        long_name = Some(String::from_utf8_lossy(name).into_owned());
                    } else {
                        let (path, size) = pax_records(&meta)
                            .ok_or_else(|| bad(format!("bad pax header at byte {pos}")))?;
                        pax_path = path.or(pax_path);
                        pax_size = size.or(pax_size);
                    }
                }
                // Global pax headers and GNU long link names: nothing here.
                b'g' | b'K' => {}
                _ => {
                    let name = pax_path
                        .take()
                        .or_else(|| long_name.take())
                        .unwrap_or_else(|| header_name(&header));
                    pax_size = None;
                    if matches!(kind, b'0' | 0 | b'7') {
                        entries.insert(
                            normalize(&name),
                            Entry {
                                offset: data,
                                len: size,
                            },
                        );
                    }
                }
            }
            pos = next;
        }
        Ok(Archive { entries })
    }

    /// The regular file named `name` (relative to the layout's root).
    pub fn get(&self, name: &str) -> Option<Entry> {
        self.entries.get(name).copied()
    }
}

fn read_exact_at(file: &File, buf: &mut [u8], offset: u64, shown: &str) -> Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match pread(file, &mut buf[done..], offset + done as u64) {
            Ok(0) => {
                return Err(Error::Manifest(format!(
                    "{shown}: the archive ended while its headers were read"
                )));
            }
            Ok(n) => done += n,
            Err(e) => return Err(Error::io(format!("reading {shown}"), e.into())),
        }
    }
    Ok(())
}

/// The header's checksum: the sum of its bytes with the checksum field
/// counted as spaces (unsigned; some old writers summed signed bytes).
fn checksum_ok(h: &[u8; BLOCK as usize]) -> bool {
    let Some(want) = number(&h[148..156]) else {
        return false;
    };
    let field = 148..156;
    let unsigned: u64 = h
        .iter()
        .enumerate()
        .map(|(i, &b)| if field.contains(&i) { 32 } else { u64::from(b) })
        .sum();
    let signed: i64 = h
        .iter()
        .enumerate()
        .map(|(i, &b)| {
            if field.contains(&i) {
                32
            } else {
                i64::from(b as i8)
            }
        })
        .sum();
    want == unsigned || i64::try_from(want).is_ok_and(|w| w == signed)
}

/// A numeric header field: octal digits (space or NUL padded), or GNU's
/// base-256 (the high bit of the first byte set) for values past octal's reach.
fn number(field: &[u8]) -> Option<u64> {
    if field.first().is_some_and(|&b| b & 0x80 != 0) {
        if field[0] & 0x40 != 0 {
            return None; // negative
        }
        let mut n: u64 = u64::from(field[0] & 0x3f);
        for &b in &field[1..] {
            n = n.checked_mul(256)?.checked_add(u64::from(b))?;
        }
        return Some(n);
    }
    let text = std::str::from_utf8(field).ok()?;
    let digits = text.trim_matches(|c| c == ' ' || c == '\0');
    if digits.is_empty() {
        return Some(0);
    }
    u64::from_str_radix(digits, 8).ok()
}

/// The name of a ustar header: its prefix and name fields.
fn header_name(h: &[u8; BLOCK as usize]) -> String {
    let field = |r: std::ops::Range<usize>| {
        let f = &h[r];
        let end = f.iter().position(|&b| b == 0).unwrap_or(f.len());
        String::from_utf8_lossy(&f[..end]).into_owned()
    };
    let name = field(0..100);
    // POSIX ustar (not GNU's "ustar  ", which uses those bytes otherwise).
    if &h[257..263] == b"ustar\0" {
        let prefix = field(345..500);
        if !prefix.is_empty() {
            return format!("{prefix}/{name}");
        }
    }
    name
}

/// The `path` and `size` records of a pax extended header.
#[allow(clippy::type_complexity)]
fn pax_records(mut meta: &[u8]) -> Option<(Option<String>, Option<u64>)> {
    let (mut path, mut size) = (None, None);
    while !meta.is_empty() {
        let space = meta.iter().position(|&b| b == b' ')?;
        let len: usize = std::str::from_utf8(&meta[..space]).ok()?.parse().ok()?;
        if len <= space + 1 || len > meta.len() || meta[len - 1] != b'\n' {
            return None;
        }
        let record = &meta[space + 1..len - 1];
        let eq = record.iter().position(|&b| b == b'=')?;
        let (key, value) = (&record[..eq], &record[eq + 1..]);
        match key {
            b"path" => path = Some(String::from_utf8_lossy(value).into_owned()),
            b"size" => size = Some(std::str::from_utf8(value).ok()?.parse().ok()?),
            _ => {}
        }
        meta = &meta[len..];
    }
    Some((path, size))
}

/// A member name as a layout path: no leading `./` or `/`.
fn normalize(name: &str) -> String {
    let mut n = name;
    loop {
        if let Some(rest) = n.strip_prefix("./") {
            n = rest;
        } else if let Some(rest) = n.strip_prefix('/') {
            n = rest;
        } else {
            return n.to_owned();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_octal_and_base256() {
        assert_eq!(number(b"00000001750\0"), Some(1000));
        assert_eq!(number(b"     17 "), Some(15));
        assert_eq!(number(b"\0\0\0\0"), Some(0));
        let mut big = [0u8; 12];
        big[0] = 0x80;
        big[7] = 0x02; // 2 << 32
        assert_eq!(number(&big), Some(2 << 32));
        assert_eq!(number(b"12x"), None);
    }

    #[test]
    fn pax_records_parse() {
        let meta = b"30 path=blobs/sha256/abcdef01\n11 size=99\n";
        assert_eq!(
            pax_records(meta),
            Some((Some("blobs/sha256/abcdef01".to_owned()), Some(99)))
        );
        assert_eq!(pax_records(b"5 x=1"), None);
    }

    #[test]
    fn names_normalize() {
        assert_eq!(normalize("./index.json"), "index.json");
        assert_eq!(normalize("/blobs/sha256/x"), "blobs/sha256/x");
    }
}
