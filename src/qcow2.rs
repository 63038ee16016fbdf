//! A raw disk as a qcow2 image, written front to back in one pass.
//!
//! cocoon's import takes a qcow2 (version 3, `compat 1.1`, no backing file)
//! on stdin, and a stream cannot be seeked back into. So every piece of
//! metadata is laid out before the first data byte, from the disk's size and
//! the map of which clusters hold data:
//!
//! ```text
//! cluster 0                header (104 bytes), no extensions
//! 1 ..                     refcount table
//! ..                       refcount blocks (16-bit refcounts, every used cluster 1)
//! ..                       L1 table
//! ..                       L2 tables, only for L1 entries that map data
//! ..                       data clusters: the allocated guest clusters, in disk order
//! ```
//!
//! The data clusters are the disk's own bytes in disk order, so a run of
//! allocated clusters is one byte range of the disk — one range of a blob
//! file or more, moved by the kernel like any other. Only the metadata in
//! front and the zeros that fill the last, partial cluster come from user
//! space. Clusters that are all zeros are left unallocated (they read as
//! zeros); which ones those are is found before the header is written (see
//! `scan`). Clusters are 64 KiB; data and metadata clusters have a
//! refcount of one, so every L1 and L2 entry carries the "copied" flag.
//!
//! Written from the specification (qemu's `docs/interop/qcow2.txt`).

mod scan;
mod sniff;

use std::fs::File;

pub use scan::nonzero_clusters;
pub use sniff::check_start;

use crate::error::{Error, Result};
use crate::manifest::DiskPlan;
use crate::zerocopy::Range;

/// The first four bytes of every qcow2 image.
pub const MAGIC: [u8; 4] = *b"QFI\xfb";
/// log2 of the cluster size.
pub const CLUSTER_BITS: u32 = 16;
/// The cluster size: 64 KiB, qemu's default.
pub const CLUSTER: u64 = 1 << CLUSTER_BITS;
/// Refcounts are 16 bits wide (`refcount_order` 4).
const REFCOUNT_ORDER: u32 = 4;
/// Refcounts in one refcount block.
const REFCOUNTS_PER_BLOCK: u64 = CLUSTER * 8 / (1 << REFCOUNT_ORDER);
/// Entries in one L2 table (and per cluster of the L1 and refcount tables).
const ENTRIES_PER_CLUSTER: u64 = CLUSTER / 8;
/// L1/L2 entry flag: the cluster's refcount is exactly one.
const COPIED: u64 = 1 << 63;
/// Length of the version 3 header, without optional fields.
const HEADER_LEN: usize = 104;
/// The largest disk this writer lays out: qemu's L1 table limit (32 MiB of
/// entries) with 64 KiB clusters.
pub const MAX_SIZE: u64 = (32 << 20) / 8 * ENTRIES_PER_CLUSTER * CLUSTER;

/// Refuse a disk too large to lay out.
pub fn check_size(size: u64) -> Result<()> {
    if size > MAX_SIZE {
        return Err(Error::Other(format!(
            "a disk of {size} bytes is too large for a qcow2 image with 64 KiB clusters \
             (at most {MAX_SIZE})"
        )));
    }
    Ok(())
}

/// Clusters needed for `bytes`.
fn clusters(bytes: u64) -> u64 {
    bytes.div_ceil(CLUSTER)
}

/// Which guest clusters hold data: one bit per 64 KiB of disk (2 MiB of
/// memory per TiB).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterMap {
    bits: Vec<u64>,
    len: u64,
}

impl ClusterMap {
    /// A map of `len` clusters, none of them holding data.
    pub fn empty(len: u64) -> ClusterMap {
        let words = usize::try_from(len.div_ceil(64)).expect("a map that fits in memory");
        ClusterMap {
            bits: vec![0; words],
            len,
        }
    }

    /// How many clusters the map covers.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the map covers no cluster.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Mark `cluster` as holding data.
    pub fn set(&mut self, cluster: u64) {
        debug_assert!(cluster < self.len);
        self.bits[(cluster / 64) as usize] |= 1 << (cluster % 64);
    }

    /// Mark clusters `from..to` as holding data.
    pub fn set_range(&mut self, from: u64, to: u64) {
        for c in from..to.min(self.len) {
            self.set(c);
        }
    }

    /// Whether `cluster` holds data.
    pub fn get(&self, cluster: u64) -> bool {
        cluster < self.len && self.bits[(cluster / 64) as usize] & (1 << (cluster % 64)) != 0
    }

    /// How many clusters hold data.
    pub fn count(&self) -> u64 {
        self.bits.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Whether any of clusters `from..to` holds data.
    fn any(&self, from: u64, to: u64) -> bool {
        (from..to.min(self.len)).any(|c| self.get(c))
    }

    /// The runs of clusters holding data within `from..to`, as
    /// `(first, end)` pairs, in order.
    pub fn runs(&self, from: u64, to: u64) -> Vec<(u64, u64)> {
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for c in from..to.min(self.len) {
            if !self.get(c) {
                continue;
            }
            match runs.last_mut() {
                Some((_, end)) if *end == c => *end = c + 1,
                _ => runs.push((c, c + 1)),
            }
        }
        runs
    }
}

/// Where every part of the image goes, in clusters.
#[derive(Clone, Debug)]
pub struct Layout {
    /// The raw disk's size in bytes.
    size: u64,
    map: ClusterMap,
    allocated: u64,
    l1_entries: u64,
    l1_clusters: u64,
    l2_tables: u64,
    refcount_table_clusters: u64,
    refcount_blocks: u64,
}

impl Layout {
    /// Lay out a disk of `size` bytes whose data clusters are `map`.
    pub fn new(size: u64, map: ClusterMap) -> Result<Layout> {
        check_size(size)?;
        assert_eq!(map.len(), clusters(size), "one bit per cluster of the disk");
        let l1_entries = map.len().div_ceil(ENTRIES_PER_CLUSTER);
        let l2_tables = (0..l1_entries)
            .filter(|e| map.any(e * ENTRIES_PER_CLUSTER, (e + 1) * ENTRIES_PER_CLUSTER))
            .count() as u64;
        let mut layout = Layout {
            size,
            allocated: map.count(),
            map,
            l1_entries,
            l1_clusters: clusters(l1_entries * 8),
            l2_tables,
            refcount_table_clusters: 1,
            refcount_blocks: 1,
        };
        // The refcount structures count themselves: grow them until they
        // cover every cluster of the image, themselves included.
        loop {
            let blocks = layout.clusters().div_ceil(REFCOUNTS_PER_BLOCK);
            let table = blocks.div_ceil(ENTRIES_PER_CLUSTER);
            if (blocks, table) == (layout.refcount_blocks, layout.refcount_table_clusters) {
                return Ok(layout);
            }
            layout.refcount_blocks = blocks;
            layout.refcount_table_clusters = table;
        }
    }

    /// A disk whose every cluster is allocated: what a stream read once
    /// (from a registry) becomes.
    pub fn dense(size: u64) -> Result<Layout> {
        let mut map = ClusterMap::empty(clusters(size));
        map.set_range(0, map.len());
        Layout::new(size, map)
    }

    fn refcount_table_at(&self) -> u64 {
        1
    }

    fn refcount_blocks_at(&self) -> u64 {
        self.refcount_table_at() + self.refcount_table_clusters
    }

    fn l1_at(&self) -> u64 {
        self.refcount_blocks_at() + self.refcount_blocks
    }

    fn l2_at(&self) -> u64 {
        self.l1_at() + self.l1_clusters
    }

    fn data_at(&self) -> u64 {
        self.l2_at() + self.l2_tables
    }

    /// Clusters in the image file.
    fn clusters(&self) -> u64 {
        self.data_at() + self.allocated
    }

    /// The guest's disk size: the raw size rounded up to whole 512-byte
    /// sectors (as qemu sees a raw file; the rounding reads as zeros).
    pub fn virtual_size(&self) -> u64 {
        self.size.div_ceil(512) * 512
    }

    /// Length of the image file.
    pub fn file_len(&self) -> u64 {
        self.clusters() * CLUSTER
    }

    /// Length of the metadata written before the first data byte.
    pub fn prefix_len(&self) -> u64 {
        self.data_at() * CLUSTER
    }

    /// Zeros after the last data byte, to the end of its cluster.
    pub fn tail_len(&self) -> u64 {
        let partial = self.size % CLUSTER;
        if partial != 0 && self.map.get(self.map.len() - 1) {
            CLUSTER - partial
        } else {
            0
        }
    }

    /// The byte ranges of the disk that are delivered, in order: the
    /// allocated clusters, cut at the disk's end.
    pub fn data_ranges(&self, from: u64, to: u64) -> Vec<Range> {
        let first = from / CLUSTER;
        let last = clusters(to.min(self.size));
        self.map
            .runs(first, last)
            .into_iter()
            .map(|(a, b)| {
                let start = (a * CLUSTER).max(from);
                let end = (b * CLUSTER).min(to).min(self.size);
                Range {
                    offset: start,
                    len: end - start,
                }
            })
            .filter(|r| r.len > 0)
            .collect()
    }

    /// Write the metadata — header, refcount table and blocks, L1 and L2
    /// tables — one cluster at a time through `out`.
    pub fn write_prefix(&self, out: &mut dyn FnMut(&[u8]) -> Result<()>) -> Result<()> {
        let mut buf = vec![0u8; CLUSTER as usize];
        let mut emit = |buf: &mut Vec<u8>| -> Result<()> {
            out(buf)?;
            buf.fill(0);
            Ok(())
        };
        self.header(&mut buf);
        emit(&mut buf)?;

        // Refcount table: the offsets of the refcount blocks.
        let blocks = (0..self.refcount_blocks).map(|i| (self.refcount_blocks_at() + i) * CLUSTER);
        write_table(&mut buf, blocks, self.refcount_table_clusters, &mut emit)?;

        // Refcount blocks: 1 for every cluster of the image, 0 beyond.
        let used = self.clusters();
        for block in 0..self.refcount_blocks {
            let first = block * REFCOUNTS_PER_BLOCK;
            let n = used.saturating_sub(first).min(REFCOUNTS_PER_BLOCK) as usize;
            for entry in buf[..n * 2].chunks_exact_mut(2) {
                entry.copy_from_slice(&1u16.to_be_bytes());
            }
            emit(&mut buf)?;
        }

        // L1 table: the offset of each L2 table, 0 where no data is mapped.
        let mut next_l2 = self.l2_at();
        let l1 = (0..self.l1_entries).map(|e| {
            let from = e * ENTRIES_PER_CLUSTER;
            if self.map.any(from, from + ENTRIES_PER_CLUSTER) {
                next_l2 += 1;
                ((next_l2 - 1) * CLUSTER) | COPIED
            } else {
                0
            }
        });
        write_table(&mut buf, l1, self.l1_clusters, &mut emit)?;

        // L2 tables: each allocated guest cluster maps to the next data
        // cluster, in disk order.
        let mut next_data = self.data_at();
        for e in 0..self.l1_entries {
            let from = e * ENTRIES_PER_CLUSTER;
            let to = from + ENTRIES_PER_CLUSTER;
            if !self.map.any(from, to) {
                continue;
            }
            for (j, entry) in buf.chunks_exact_mut(8).enumerate() {
                if self.map.get(from + j as u64) {
                    entry.copy_from_slice(&((next_data * CLUSTER) | COPIED).to_be_bytes());
                    next_data += 1;
                }
            }
            emit(&mut buf)?;
        }
        debug_assert_eq!(next_data, self.clusters());
        Ok(())
    }

    /// The version 3 header into the zeroed first cluster.
    fn header(&self, buf: &mut [u8]) {
        let mut put = |at: usize, bytes: &[u8]| buf[at..at + bytes.len()].copy_from_slice(bytes);
        put(0, &MAGIC);
        put(4, &3u32.to_be_bytes()); // version
        // 8: backing_file_offset, 16: backing_file_size: none.
        put(20, &CLUSTER_BITS.to_be_bytes());
        put(24, &self.virtual_size().to_be_bytes());
        // 32: crypt_method: none.
        let l1_entries = u32::try_from(self.l1_entries).expect("bounded by MAX_SIZE");
        put(36, &l1_entries.to_be_bytes());
        put(40, &(self.l1_at() * CLUSTER).to_be_bytes());
        put(48, &(self.refcount_table_at() * CLUSTER).to_be_bytes());
        let table = u32::try_from(self.refcount_table_clusters).expect("bounded by MAX_SIZE");
        put(56, &table.to_be_bytes());
        // 60: nb_snapshots, 64: snapshots_offset: none. 72, 80, 88:
        // incompatible, compatible and autoclear features: none.
        put(96, &REFCOUNT_ORDER.to_be_bytes());
        put(100, &(HEADER_LEN as u32).to_be_bytes());
        // The zeros after the header end the (empty) list of extensions.
    }
}

/// Write `entries` as big-endian u64s into `clusters` clusters.
fn write_table(
    buf: &mut Vec<u8>,
    entries: impl Iterator<Item = u64>,
    clusters: u64,
    emit: &mut dyn FnMut(&mut Vec<u8>) -> Result<()>,
) -> Result<()> {
    let mut entries = entries.peekable();
    for _ in 0..clusters {
        for slot in buf.chunks_exact_mut(8) {
            match entries.next() {
                Some(v) => slot.copy_from_slice(&v.to_be_bytes()),
                None => break,
            }
        }
        emit(buf)?;
    }
    debug_assert!(entries.peek().is_none(), "the table holds every entry");
    Ok(())
}

/// A blob file open for the stream: what the frame may scan.
pub struct FileBlob<'a> {
    /// The layer's position in the plan.
    pub slot: usize,
    /// The open blob file.
    pub file: &'a File,
    /// Where the blob starts in the file.
    pub offset: u64,
}

/// The qcow2 form of a raw disk, as the stream's frame: the layout is
/// decided once the blobs are open, then the metadata goes first, each blob
/// contributes its allocated clusters and the last cluster is filled.
pub struct Qcow2Frame {
    size: u64,
    /// Where each layer starts on the disk.
    starts: Vec<u64>,
    sizes: Vec<u64>,
    layout: Option<Layout>,
}

impl Qcow2Frame {
    /// The frame for `plan`'s raw disk (refused past qcow2's size limits).
    pub fn new(plan: &DiskPlan) -> Result<Qcow2Frame> {
        check_size(plan.total)?;
        let mut at = 0;
        let starts = plan
            .layers
            .iter()
            .map(|l| {
                at += l.size;
                at - l.size
            })
            .collect();
        Ok(Qcow2Frame {
            size: plan.total,
            starts,
            sizes: plan.layers.iter().map(|l| l.size).collect(),
            layout: None,
        })
    }

    /// Decide the layout. File blobs in `files` are scanned for clusters
    /// that hold data; every cluster that touches any other layer (a
    /// stream: read once, it cannot be looked at before it is written)
    /// counts as data. Returns the image's length.
    pub fn plan(&mut self, files: &[FileBlob<'_>]) -> Result<u64> {
        let mut map = ClusterMap::empty(clusters(self.size));
        let mut scanned = vec![false; self.starts.len()];
        for f in files {
            let (start, len) = (self.starts[f.slot], self.sizes[f.slot]);
            nonzero_clusters(f.file, f.offset, len, start, &mut map)?;
            scanned[f.slot] = true;
        }
        for (slot, _) in scanned.iter().enumerate().filter(|(_, s)| !**s) {
            let (start, len) = (self.starts[slot], self.sizes[slot]);
            if len > 0 {
                map.set_range(start / CLUSTER, clusters(start + len));
            }
        }
        let layout = Layout::new(self.size, map)?;
        let len = layout.file_len();
        self.layout = Some(layout);
        Ok(len)
    }

    fn layout(&self) -> &Layout {
        self.layout.as_ref().expect("plan() comes first")
    }

    /// Write the metadata.
    pub fn head(&self, out: &mut dyn FnMut(&[u8]) -> Result<()>) -> Result<()> {
        self.layout().write_prefix(out)
    }

    /// The byte ranges of layer `slot`, relative to its blob, that are
    /// delivered; every other byte of it reads as zero.
    pub fn keep(&self, slot: usize) -> Vec<Range> {
        let start = self.starts[slot];
        self.layout()
            .data_ranges(start, start + self.sizes[slot])
            .into_iter()
            .map(|r| Range {
                offset: r.offset - start,
                len: r.len,
            })
            .collect()
    }

    /// The zeros that fill the last data cluster.
    pub fn tail(&self) -> Vec<u8> {
        vec![0; self.layout().tail_len() as usize]
    }
}

/// The refusal of `--format raw` for a qcow2 image.
pub fn no_raw_from_qcow2() -> Error {
    Error::Other(
        "the image is a qcow2 disk and --format raw does not convert it; write the qcow2 \
         (--format auto) and convert it with `qemu-img convert -f qcow2 -O raw IN OUT`"
            .to_owned(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The image of `disk` with `map`, written the way the stream writes it.
    fn image(disk: &[u8], map: ClusterMap) -> Vec<u8> {
        let layout = Layout::new(disk.len() as u64, map).unwrap();
        let mut out = Vec::new();
        layout
            .write_prefix(&mut |b| {
                out.extend_from_slice(b);
                Ok(())
            })
            .unwrap();
        assert_eq!(out.len() as u64, layout.prefix_len());
        for r in layout.data_ranges(0, disk.len() as u64) {
            out.extend_from_slice(&disk[r.offset as usize..(r.offset + r.len) as usize]);
        }
        out.resize(out.len() + layout.tail_len() as usize, 0);
        assert_eq!(out.len() as u64, layout.file_len());
        out
    }

    /// The map a scan would give: clusters with a non-zero byte.
    fn map_of(disk: &[u8]) -> ClusterMap {
        let mut map = ClusterMap::empty(clusters(disk.len() as u64));
        for (i, c) in disk.chunks(CLUSTER as usize).enumerate() {
            if c.iter().any(|&b| b != 0) {
                map.set(i as u64);
            }
        }
        map
    }

    fn be64(b: &[u8], at: usize) -> u64 {
        u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
    }

    fn be32(b: &[u8], at: usize) -> u32 {
        u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
    }

    /// Read the guest's disk back out of `img` by the specification's
    /// lookups, checking every refcount on the way: each cluster the
    /// metadata or the data uses has refcount 1, every other 0.
    fn read_back(img: &[u8]) -> Vec<u8> {
        let c = CLUSTER as usize;
        assert_eq!(&img[..4], &MAGIC);
        assert_eq!(be32(img, 4), 3);
        assert_eq!(be32(img, 20), CLUSTER_BITS);
        assert_eq!(be32(img, 96), REFCOUNT_ORDER);
        assert_eq!(be32(img, 100), HEADER_LEN as u32);
        assert_eq!(be64(img, 72), 0, "no incompatible features");
        assert_eq!(be64(img, 8), 0, "no backing file");
        let size = be64(img, 24) as usize;
        let l1_size = be32(img, 36) as usize;
        let l1_at = be64(img, 40) as usize;
        let rt_at = be64(img, 48) as usize;
        let rt_clusters = be32(img, 56) as usize;
        assert_eq!(img.len() % c, 0);
        let mut used = vec![0u32; img.len() / c];
        used[0] += 1;
        (0..rt_clusters).for_each(|i| used[rt_at / c + i] += 1);
        (0..(l1_size * 8).div_ceil(c)).for_each(|i| used[l1_at / c + i] += 1);
        let mut guest = vec![0u8; size];
        for e in 0..l1_size {
            let l1 = be64(img, l1_at + 8 * e);
            if l1 == 0 {
                continue;
            }
            assert_eq!(l1 & COPIED, COPIED);
            let l2_at = (l1 & !COPIED) as usize;
            used[l2_at / c] += 1;
            for j in 0..c / 8 {
                let l2 = be64(img, l2_at + 8 * j);
                if l2 == 0 {
                    continue;
                }
                assert_eq!(l2 & COPIED, COPIED);
                let host = (l2 & !COPIED) as usize;
                used[host / c] += 1;
                let g = (e * c / 8 + j) * c;
                let n = c.min(size - g);
                guest[g..g + n].copy_from_slice(&img[host..host + n]);
            }
        }
        let blocks: Vec<(usize, usize)> = (0..rt_clusters * c / 8)
            .map(|i| (i, be64(img, rt_at + 8 * i) as usize))
            .filter(|&(_, at)| at != 0)
            .collect();
        blocks.iter().for_each(|&(_, at)| used[at / c] += 1);
        let mut counted = vec![0u32; used.len()];
        for (block, at) in blocks {
            for k in 0..c / 2 {
                let rc = u16::from_be_bytes(img[at + 2 * k..][..2].try_into().unwrap());
                match counted.get_mut(block * c / 2 + k) {
                    Some(n) => *n = u32::from(rc),
                    None => assert_eq!(rc, 0, "refcount past the end"),
                }
            }
        }
        assert_eq!(counted, used, "refcounts against the clusters' use");
        guest
    }

    fn noise(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect()
    }

    /// The guest sees the raw disk, padded to whole sectors.
    fn round_trips(disk: &[u8], map: ClusterMap) -> Vec<u8> {
        let img = image(disk, map);
        let guest = read_back(&img);
        assert_eq!(&guest[..disk.len()], disk);
        assert!(guest[disk.len()..].iter().all(|&b| b == 0));
        assert_eq!(guest.len() as u64, (disk.len() as u64).div_ceil(512) * 512);
        img
    }

    #[test]
    fn a_disk_full_of_data_reads_back() {
        let disk = noise(3 * CLUSTER as usize + 12345, 1);
        let img = round_trips(&disk, map_of(&disk));
        assert_eq!(&img[..4], b"QFI\xfb");
    }

    #[test]
    fn zero_clusters_stay_unallocated() {
        // Zeros at the start, in the middle (one cluster and a half) and at
        // the end; the size is not a multiple of the cluster size.
        let c = CLUSTER as usize;
        let mut disk = vec![0u8; 10 * c + 777];
        disk[2 * c..3 * c].copy_from_slice(&noise(c, 2));
        disk[4 * c + c / 2..6 * c].copy_from_slice(&noise(c + c / 2, 3));
        disk[7 * c + 5] = 1;
        let map = map_of(&disk);
        assert_eq!(map.count(), 4);
        let layout = Layout::new(disk.len() as u64, map_of(&disk)).unwrap();
        let img = round_trips(&disk, map);
        assert_eq!(img.len() as u64, layout.prefix_len() + 4 * CLUSTER);
        assert_eq!(layout.tail_len(), 0, "the last cluster is not allocated");
    }

    #[test]
    fn a_partial_last_cluster_is_filled_with_zeros() {
        let disk = noise(2 * CLUSTER as usize + 1000, 4);
        let layout = Layout::new(disk.len() as u64, map_of(&disk)).unwrap();
        assert_eq!(layout.tail_len(), CLUSTER - 1000);
        assert_eq!(layout.virtual_size(), 2 * CLUSTER + 1024);
        round_trips(&disk, map_of(&disk));
    }

    #[test]
    fn an_all_zero_disk_and_an_empty_disk_hold_only_metadata() {
        let disk = vec![0u8; 5 * CLUSTER as usize];
        let img = round_trips(&disk, map_of(&disk));
        // Header, refcount table and block, L1: four clusters.
        assert_eq!(img.len() as u64, 4 * CLUSTER);
        let img = round_trips(&[], ClusterMap::empty(0));
        assert_eq!(img.len() as u64, 3 * CLUSTER);
    }

    #[test]
    fn a_dense_layout_allocates_every_cluster_zero_or_not() {
        let mut disk = noise(4 * CLUSTER as usize, 5);
        disk[..CLUSTER as usize].fill(0);
        let layout = Layout::dense(disk.len() as u64).unwrap();
        assert_eq!(layout.allocated, 4);
        let mut map = ClusterMap::empty(4);
        map.set_range(0, 4);
        round_trips(&disk, map);
    }

    #[test]
    fn tables_grow_with_the_disk() {
        // 20 GiB virtual: 40 L1 entries (an L2 table maps 512 MiB), data
        // under four of them.
        let size = 20u64 << 30;
        let mut map = ClusterMap::empty(clusters(size));
        for c in [0, 8191, 8192, 5 * 8192 + 17, clusters(size) - 1] {
            map.set(c);
        }
        let layout = Layout::new(size, map).unwrap();
        assert_eq!(layout.l1_entries, 40);
        assert_eq!(layout.l2_tables, 4);
        // Dense 5 GiB: 81 920 data clusters need three refcount blocks.
        assert_eq!(Layout::dense(5 << 30).unwrap().refcount_blocks, 3);
        // 5 TiB virtual: an L1 table of two clusters.
        let sparse = Layout::new(5 << 40, ClusterMap::empty(clusters(5 << 40))).unwrap();
        assert_eq!(sparse.l1_clusters, 2);
        // A dense 3 TiB disk: many refcount blocks, and a table for them.
        let big = Layout::dense(3 << 40).unwrap();
        assert!(big.refcount_blocks > 1);
        assert!(big.refcount_blocks * REFCOUNTS_PER_BLOCK >= big.clusters());
        assert!(big.refcount_table_clusters * ENTRIES_PER_CLUSTER >= big.refcount_blocks);
        assert!(check_size(MAX_SIZE + 1).is_err());
    }

    #[test]
    fn runs_coalesce_and_cut_at_the_ends() {
        let mut map = ClusterMap::empty(10);
        for c in [1, 2, 3, 6, 9] {
            map.set(c);
        }
        assert_eq!(map.runs(0, 10), vec![(1, 4), (6, 7), (9, 10)]);
        assert_eq!(map.runs(2, 7), vec![(2, 4), (6, 7)]);
        let size = 9 * CLUSTER + 10;
        let layout = Layout::new(size, map).unwrap();
        let r = layout.data_ranges(2 * CLUSTER + 5, size);
        assert_eq!(
            r,
            vec![
                Range {
                    offset: 2 * CLUSTER + 5,
                    len: 2 * CLUSTER - 5
                },
                Range {
                    offset: 6 * CLUSTER,
                    len: CLUSTER
                },
                Range {
                    offset: 9 * CLUSTER,
                    len: 10
                },
            ]
        );
    }
}
