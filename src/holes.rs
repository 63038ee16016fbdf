//! Writing with holes: zero blocks of a raw disk are skipped with `lseek`
//! instead of written, so a mostly empty disk takes little space. Blocks are
//! aligned to the output offset (a file-system block each), and the file
//! gets its full length at the end should it end in a hole.

use std::os::fd::BorrowedFd;

use rustix::fs::SeekFrom;
use rustix::io::Errno;

use crate::zerocopy::write_all;

/// The granularity of holes: a file-system block.
pub const HOLE_BLOCK: usize = 4096;

/// Writes byte slices into a regular file positioned at its end, leaving
/// holes for zero blocks.
pub struct HoleWriter<'fd> {
    out: BorrowedFd<'fd>,
    /// The last run written was skipped: the file must be given its length.
    trailing_hole: bool,
}

impl<'fd> HoleWriter<'fd> {
    pub fn new(out: BorrowedFd<'fd>) -> Self {
        HoleWriter {
            out,
            trailing_hole: false,
        }
    }

    /// Write `bytes` at the current position: one `write` per run of data,
    /// one `lseek` per run of zero blocks.
    pub fn write(&mut self, bytes: &[u8]) -> Result<(), Errno> {
        if bytes.is_empty() {
            return Ok(());
        }
        // The position is asked for, not remembered: a kernel route may have
        // moved it since the last call.
        let pos = rustix::fs::seek(self.out, SeekFrom::Current(0))?;
        let mut run_start = 0usize;
        let mut run_zero = false;
        let mut at = 0usize;
        // The first block ends at the next block boundary of the output.
        let mut end = (HOLE_BLOCK - (pos % HOLE_BLOCK as u64) as usize).min(bytes.len());
        while at < bytes.len() {
            let zero = end - at == HOLE_BLOCK && is_zero(&bytes[at..end]);
            if at > 0 && zero != run_zero {
                self.flush(&bytes[run_start..at], run_zero)?;
                run_start = at;
            }
            run_zero = zero;
            at = end;
            end = (at + HOLE_BLOCK).min(bytes.len());
        }
        self.flush(&bytes[run_start..], run_zero)?;
        self.trailing_hole = run_zero;
        Ok(())
    }

    fn flush(&self, run: &[u8], zero: bool) -> Result<(), Errno> {
        if zero {
            rustix::fs::seek(self.out, SeekFrom::Current(run.len() as i64))?;
            Ok(())
        } else {
            write_all(self.out, run)
        }
    }

    /// A file that ends in a hole gets its full length.
    pub fn finish(&mut self) -> Result<(), Errno> {
        if self.trailing_hole {
            let pos = rustix::fs::seek(self.out, SeekFrom::Current(0))?;
            rustix::fs::ftruncate(self.out, pos)?;
            self.trailing_hole = false;
        }
        Ok(())
    }
}

/// Whether a block is all zeros, a machine word at a time.
pub fn is_zero(block: &[u8]) -> bool {
    // SAFETY: any bit pattern is a valid u128; align_to splits off the
    // unaligned ends as bytes.
    let (head, words, tail) = unsafe { block.align_to::<u128>() };
    head.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek};
    use std::os::fd::AsFd;
    use std::os::unix::fs::MetadataExt;

    fn written(chunks: &[&[u8]], start: u64) -> (Vec<u8>, u64) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out");
        let mut f = std::fs::File::create_new(&path).unwrap();
        f.set_len(start).unwrap();
        f.seek(std::io::SeekFrom::Start(start)).unwrap();
        let mut w = HoleWriter::new(f.as_fd());
        for c in chunks {
            w.write(c).unwrap();
        }
        w.finish().unwrap();
        let blocks = f.metadata().unwrap().blocks();
        let mut back = Vec::new();
        std::fs::File::open(&path)
            .unwrap()
            .read_to_end(&mut back)
            .unwrap();
        (back, blocks)
    }

    #[test]
    fn zero_blocks_read_back_as_zeros_and_take_no_space() {
        let mut data = vec![0u8; 64 * HOLE_BLOCK];
        data[5 * HOLE_BLOCK + 7] = 1; // one block of data amid zeros
        let (back, blocks) = written(&[&data], 0);
        assert_eq!(back, data);
        // 512-byte units: one 4 KiB block, not 64.
        assert!(blocks <= 16, "{blocks} blocks allocated");
    }

    #[test]
    fn a_trailing_hole_still_gives_the_file_its_length() {
        let mut data = vec![0u8; 8 * HOLE_BLOCK];
        data[0] = 9;
        let (back, _) = written(&[&data[..3000], &data[3000..]], 0);
        assert_eq!(back.len(), data.len());
        assert_eq!(back, data);
    }

    #[test]
    fn blocks_are_aligned_to_the_output_offset() {
        // Starting 100 bytes into a block: the first partial block is data
        // (written, even if zero), the rest follows output alignment.
        let mut data = vec![0u8; 4 * HOLE_BLOCK];
        data[HOLE_BLOCK * 2] = 3;
        let (back, _) = written(&[&data], 100);
        assert_eq!(&back[100..], &data[..]);
        assert!(back[..100].iter().all(|&b| b == 0));
    }

    #[test]
    fn is_zero_sees_a_single_set_byte_anywhere() {
        let mut b = vec![0u8; HOLE_BLOCK + 3];
        assert!(is_zero(&b[1..]));
        for i in [0, 1, 15, 16, 2048, HOLE_BLOCK + 2] {
            b[i] = 1;
            assert!(!is_zero(&b), "byte {i}");
            b[i] = 0;
        }
    }
}
