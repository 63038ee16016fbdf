//! Which clusters of a disk hold data, found in its blob files before the
//! image's metadata is written.
//!
//! Holes of a sparse blob file (`SEEK_DATA`/`SEEK_HOLE`) are zeros without
//! a read. Data extents are read once, and a cluster is read no further than
//! its first block with a non-zero byte: a disk full of data costs one 4 KiB
//! read per 64 KiB cluster. After a cluster of zeros, reads take a window of
//! 16 clusters at a time until one holds data, so long runs of written
//! zeros cost few calls.
//!
//! The map is only as good as the file stays unchanged after the scan. The
//! stream sees to that: a blob on a kernel route is leased before it is
//! scanned (a write would break the lease and fail the stream), and a blob
//! on a buffered route has every byte it does not write checked for zeros
//! as it is hashed.

use std::fs::File;

use rustix::fs::SeekFrom;
use rustix::io::Errno;

use super::{CLUSTER, ClusterMap};
use crate::error::{Error, Result};
use crate::holes::is_zero;
use crate::signals;
use crate::zerocopy::pread;

/// The first read of a cluster: one file-system block.
const PROBE: u64 = 4096;
/// A read through a run of zeros: 16 clusters.
const WINDOW: u64 = 16 * CLUSTER;

/// Mark in `map` every cluster with a non-zero byte among the `len` bytes
/// of `file` from `offset`, which sit at `disk_start` on the disk. A file
/// that ends early has its missing part marked as data (the copy reports
/// the truncation).
pub fn nonzero_clusters(
    file: &File,
    offset: u64,
    len: u64,
    disk_start: u64,
    map: &mut ClusterMap,
) -> Result<()> {
    let mut buf = vec![0u8; WINDOW as usize];
    let end = offset + len;
    let eof = file
        .metadata()
        .map_err(|e| Error::io("scanning a blob for zero clusters", e))?
        .len();
    if eof < end {
        let missing = disk_start + (eof.max(offset) - offset);
        map.set_range(missing / CLUSTER, (disk_start + len).div_ceil(CLUSTER));
    }
    // The last cluster read held only zeros: read whole windows.
    let mut in_zeros = false;
    for (from, to) in data_extents(file, offset, end)? {
        let mut at = from;
        while at < to {
            signals::check()?;
            let disk = disk_start + (at - offset);
            let cluster = disk / CLUSTER;
            if in_zeros {
                // A window ends at a cluster boundary of the disk.
                let window_end = to.min(at + WINDOW - disk % CLUSTER);
                let window = &mut buf[..(window_end - at) as usize];
                if !read_exact_at(file, window, at)? {
                    // The file ended early: the rest is data (for the copy
                    // to find short).
                    map.set_range(cluster, (disk_start + len).div_ceil(CLUSTER));
                    return Ok(());
                }
                let mut piece_at = at;
                in_zeros = true;
                while piece_at < window_end {
                    let piece_disk = disk_start + (piece_at - offset);
                    let piece_end = window_end.min(piece_at + CLUSTER - piece_disk % CLUSTER);
                    let piece = &window[(piece_at - at) as usize..(piece_end - at) as usize];
                    if !is_zero(piece) {
                        map.set(piece_disk / CLUSTER);
                        in_zeros = false;
                    }
                    piece_at = piece_end;
                }
                at = window_end;
            } else {
                let piece_end = to.min(at + (CLUSTER - disk % CLUSTER));
                if map.get(cluster) {
                    // Data already seen in this cluster (in the blob before).
                } else if zeros(file, at, piece_end - at, &mut buf)? {
                    in_zeros = true;
                } else {
                    map.set(cluster);
                }
                at = piece_end;
            }
        }
    }
    Ok(())
}

/// Whether `len` bytes (at most a cluster) of `file` from `at` are all
/// zeros: the first block is read first, the rest only when it is zero.
fn zeros(file: &File, at: u64, len: u64, buf: &mut [u8]) -> Result<bool> {
    let probe = len.min(PROBE);
    for (from, n) in [(at, probe), (at + probe, len - probe)] {
        if n == 0 {
            continue;
        }
        let piece = &mut buf[..n as usize];
        if !read_exact_at(file, piece, from)? || !is_zero(piece) {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Fill `buf` from `at`; `false` when the file ends first.
fn read_exact_at(file: &File, buf: &mut [u8], at: u64) -> Result<bool> {
    let mut done = 0;
    while done < buf.len() {
        match pread(file, &mut buf[done..], at + done as u64) {
            Ok(0) => return Ok(false),
            Ok(n) => done += n,
            Err(Errno::INTR) => signals::check()?,
            Err(e) => return Err(Error::io("scanning a blob for zero clusters", e.into())),
        }
    }
    Ok(true)
}

/// The data extents of `file` within `from..to`, as the file system tells
/// them; the whole range where it cannot say.
fn data_extents(file: &File, from: u64, to: u64) -> Result<Vec<(u64, u64)>> {
    let mut extents = Vec::new();
    let mut at = from;
    while at < to {
        let data = match rustix::fs::seek(file, SeekFrom::Data(at)) {
            Ok(d) => d,
            // No data after `at`: the rest is a hole (or past the end).
            Err(Errno::NXIO) => break,
            Err(_) => return Ok(vec![(from, to)]),
        };
        if data >= to {
            break;
        }
        let hole = match rustix::fs::seek(file, SeekFrom::Hole(data)) {
            Ok(h) => h.min(to),
            Err(_) => to,
        };
        extents.push((data, hole));
        at = hole;
    }
    Ok(extents)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    fn file_with(len: u64, writes: &[(u64, &[u8])]) -> (tempfile::TempDir, File) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blob");
        let f = File::create(&path).unwrap();
        f.set_len(len).unwrap();
        for (at, bytes) in writes {
            f.write_all_at(bytes, *at).unwrap();
        }
        (dir, File::open(&path).unwrap())
    }

    fn set(map: &ClusterMap) -> Vec<u64> {
        (0..map.len()).filter(|&c| map.get(c)).collect()
    }

    #[test]
    fn holes_and_written_zeros_are_both_zero_clusters() {
        let c = CLUSTER;
        // A hole, written zeros, one byte at the end of a cluster, a byte
        // in the second block of another (past the first probe).
        let zeros = vec![0u8; 2 * c as usize];
        let (_d, f) = file_with(
            10 * c,
            &[(2 * c, &zeros), (5 * c - 1, &[7]), (7 * c + 5000, &[1])],
        );
        let mut map = ClusterMap::empty(10);
        nonzero_clusters(&f, 0, 10 * c, 0, &mut map).unwrap();
        assert_eq!(set(&map), vec![4, 7]);
    }

    #[test]
    fn a_blob_is_placed_at_its_disk_offset_and_cut_at_cluster_boundaries() {
        // A blob of 1.5 clusters at disk offset 0.75 clusters: its bytes
        // fall into disk clusters 0, 1 and 2; only the byte near its end
        // (disk cluster 2) is set. A range of a larger file is honoured.
        let c = CLUSTER;
        let len = c + c / 2;
        let (_d, f) = file_with(
            100 + len + 50,
            &[(100 + len - 1, &[9]), (100 + len + 3, &[9])],
        );
        let mut map = ClusterMap::empty(3);
        nonzero_clusters(&f, 100, len, 3 * c / 4, &mut map).unwrap();
        assert_eq!(set(&map), vec![2]);
    }

    #[test]
    fn runs_of_written_zeros_are_read_in_windows_and_data_in_them_is_seen() {
        // Written zeros (no holes): a run long enough for windows, data in
        // the middle of a window, at a window's last byte, and in the
        // cluster right after a window; a blob that starts mid-cluster.
        let c = CLUSTER;
        let len = 64 * c + 1000;
        let zeros = vec![0u8; len as usize];
        let (_d, f) = file_with(
            len,
            &[
                (0, &zeros),
                (20 * c + 7, &[1]),
                (2 * c + WINDOW - 1, &[2]),
                (40 * c, &[3]),
                (len - 1, &[4]),
            ],
        );
        let start = c / 2;
        let mut map = ClusterMap::empty((start + len).div_ceil(c));
        nonzero_clusters(&f, 0, len, start, &mut map).unwrap();
        let want: Vec<u64> = [20 * c + 7, 2 * c + WINDOW - 1, 40 * c, len - 1]
            .iter()
            .map(|at| (start + at) / c)
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        assert_eq!(set(&map), want);
    }

    #[test]
    fn the_map_is_what_a_byte_by_byte_look_finds() {
        // Pseudo-random layouts: holes, written zeros and single bytes of
        // data, a blob at a pseudo-random disk offset; the scan agrees with
        // a plain look at every byte.
        let c = CLUSTER;
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        for round in 0..20 {
            let len = 30 * c + next(c);
            let start = next(3 * c);
            let mut bytes = vec![0u8; len as usize];
            let mut writes: Vec<(u64, Vec<u8>)> = Vec::new();
            // Written zeros over a stretch, so both holes and zeros occur.
            let z = next(len / 2);
            writes.push((z, vec![0u8; (len / 3) as usize]));
            for _ in 0..next(12) {
                let at = next(len);
                bytes[at as usize] = 1 + next(200) as u8;
                writes.push((at, vec![bytes[at as usize]]));
            }
            let refs: Vec<(u64, &[u8])> = writes.iter().map(|(a, b)| (*a, &b[..])).collect();
            let (_d, f) = file_with(len, &refs);
            let mut map = ClusterMap::empty((start + len).div_ceil(c));
            nonzero_clusters(&f, 0, len, start, &mut map).unwrap();
            let want: Vec<u64> = (0..map.len())
                .filter(|&k| {
                    let from = (k * c).saturating_sub(start).min(len);
                    let to = ((k + 1) * c).saturating_sub(start).min(len);
                    bytes[from as usize..to as usize].iter().any(|&b| b != 0)
                })
                .collect();
            assert_eq!(set(&map), want, "round {round}");
        }
    }

    #[test]
    fn a_file_shorter_than_its_range_counts_as_data() {
        let (_d, f) = file_with(CLUSTER / 2, &[]);
        let mut map = ClusterMap::empty(2);
        nonzero_clusters(&f, 0, 2 * CLUSTER, 0, &mut map).unwrap();
        assert_eq!(set(&map), vec![0, 1]);
    }
}
