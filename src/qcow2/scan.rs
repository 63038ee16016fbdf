//! Which clusters of a disk hold data, found in its blob files before the
//! image's metadata is written.
//!
//! Holes of a sparse blob file (`SEEK_DATA`/`SEEK_HOLE`) are zeros without
//! a read. Data extents are read once, a cluster at a time, and a cluster is
//! read no further than its first block with a non-zero byte: a disk full
//! of data costs one 4 KiB read per 64 KiB cluster, a zero cluster one read
//! of all of it.
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
    let mut buf = vec![0u8; CLUSTER as usize];
    let end = offset + len;
    let eof = file
        .metadata()
        .map_err(|e| Error::io("scanning a blob for zero clusters", e))?
        .len();
    if eof < end {
        let missing = disk_start + (eof.max(offset) - offset);
        map.set_range(missing / CLUSTER, (disk_start + len).div_ceil(CLUSTER));
    }
    for (from, to) in data_extents(file, offset, end)? {
        let mut at = from;
        while at < to {
            signals::check()?;
            let disk = disk_start + (at - offset);
            let cluster = disk / CLUSTER;
            let piece_end = to.min(at + (CLUSTER - disk % CLUSTER));
            if !map.get(cluster) && !zeros(file, at, piece_end - at, &mut buf)? {
                map.set(cluster);
            }
            at = piece_end;
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
    fn a_file_shorter_than_its_range_counts_as_data() {
        let (_d, f) = file_with(CLUSTER / 2, &[]);
        let mut map = ClusterMap::empty(2);
        nonzero_clusters(&f, 0, 2 * CLUSTER, 0, &mut map).unwrap();
        assert_eq!(set(&map), vec![0, 1]);
    }
}
