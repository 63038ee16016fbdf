//! The transfer decision, in one place: which way a blob's bytes take into
//! the sink.
//!
//! [`choose`] looks at the sink, the blob and the run's policy and answers
//! with a [`Route`]: either the kernel moves a file range (a list of
//! syscalls, best first, that [`crate::zerocopy::Copier`] walks down when one
//! is refused), or the bytes pass through a buffer of ours, which is hashed
//! as it is written (and can leave holes for zero blocks).
//!
//! A kernel route is verified by hashing threads that read the same range
//! beside the copy. That is only sound while nobody can change the file in
//! between, so a verified file blob takes a kernel route only when it holds
//! a read lease ([`crate::lease`]); otherwise its bytes are hashed exactly
//! as they are written.

use crate::sink::{Sink, SinkKind};

/// One way of moving a file range into the sink.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Strategy {
    /// `splice` from the file into the sink (a pipe).
    Splice,
    /// `copy_file_range` (a reflink where the file system can).
    CopyFileRange,
    /// `sendfile` (sockets, and files when copy_file_range is refused).
    Sendfile,
    /// `splice` into a pipe of our own, then out of it into the sink.
    SpliceViaPipe,
    /// `pread` and `write` through a buffer: the portable last resort.
    ReadWrite,
}

/// How a blob reaches the sink.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// The kernel moves the file range, trying these strategies in order
    /// (each starts from the byte the previous one reached). Hashed beside
    /// the copy, from the page cache.
    Kernel(&'static [Strategy]),
    /// Read into a buffer, hash that buffer, write it; with `holes`, zero
    /// blocks are skipped with `lseek` instead of written.
    Buffered { holes: bool },
}

/// Whether zero blocks of a raw disk become holes in a regular-file output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sparse {
    /// Never: every byte is written.
    Never,
    /// Holes, except for blobs on the output's own file system: there an
    /// in-kernel copy (a reflink where possible) costs no new space and less
    /// time than reading and scanning.
    Auto,
    /// Holes for every zero block, whatever the source.
    Always,
}

/// What kind of blob is to be moved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlobKind {
    /// A byte stream (a network body): only user space can move it.
    Stream,
    /// A byte range of a file.
    File {
        /// The file lives on the output's file system.
        same_fs: bool,
        /// A read lease is held on it: nobody can write it unnoticed.
        leased: bool,
    },
}

/// The run-wide facts the decision depends on.
#[derive(Clone, Copy, Debug)]
pub struct Policy {
    pub sink: SinkKind,
    /// Sparse mode in effect: `Never` where the sink cannot hold holes.
    pub sparse: Sparse,
    /// The kernel paths may be used (`CLOUDIMG_IO=readwrite` says no).
    pub kernel: bool,
    /// Digests are checked.
    pub verify: bool,
}

impl Policy {
    /// The policy for streaming into `sink`. `sparse` is the mode asked for,
    /// already narrowed to what the disk's format allows.
    pub fn new(sink: &Sink<'_>, sparse: Sparse, kernel: bool, verify: bool) -> Policy {
        Policy {
            sink: sink.kind(),
            sparse: if sink.can_hold_holes() {
                sparse
            } else {
                Sparse::Never
            },
            kernel,
            verify,
        }
    }
}

/// The route of one blob.
pub fn choose(policy: &Policy, blob: BlobKind) -> Route {
    let holes = policy.sparse != Sparse::Never;
    let BlobKind::File { same_fs, leased } = blob else {
        return Route::Buffered { holes };
    };
    let scan = match policy.sparse {
        Sparse::Never => false,
        Sparse::Auto => !same_fs,
        Sparse::Always => true,
    };
    // A verified blob into a pipe goes through a buffer, leased or not: its
    // reader may pass page references on, so it gets a copy either way, and
    // the buffer the copy went through is the one hashed — one read of the
    // blob instead of a copy and a second read by the hashing threads
    // (measured faster on two cores; see BENCHMARKS.md).
    if !policy.kernel || scan || (policy.verify && (!leased || policy.sink == SinkKind::Pipe)) {
        return Route::Buffered { holes };
    }
    if policy.verify && passes_pages_on(policy.sink) {
        // Copied under the lease, hashed beside the copy by the hashing
        // threads (in parallel across parts): what enters the sink is a copy
        // of what they read, never a reference to the file's pages.
        return Route::Kernel(&[Strategy::ReadWrite]);
    }
    Route::Kernel(strategies(policy.sink))
}

/// Whether a sink may carry the blob's page-cache pages, by reference,
/// beyond what we can see — so that no lease we hold can cover every read of
/// them. Files and devices copy (a reflink shares extents copy-on-write). A
/// pipe holds references (splice), and its reader may splice or tee them on
/// into another pipe (`| pv |`), past any check of ours that the pipe is
/// empty. A socket queues references (sendfile), and a peer on this host
/// (loopback, a veth into a container, a tap into a VM) acknowledges them as
/// soon as they sit in its receive queue, unread. A verified blob goes into
/// either as a copy.
fn passes_pages_on(sink: SinkKind) -> bool {
    matches!(sink, SinkKind::Pipe | SinkKind::Socket)
}

/// The kernel strategies for a sink, best first; each list ends in the
/// portable read/write.
pub fn strategies(sink: SinkKind) -> &'static [Strategy] {
    use Strategy::*;
    match sink {
        SinkKind::Pipe => &[Splice, ReadWrite],
        SinkKind::File => &[CopyFileRange, Sendfile, ReadWrite],
        SinkKind::Socket => &[Sendfile, ReadWrite],
        SinkKind::Other => &[SpliceViaPipe, ReadWrite],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(sink: SinkKind, sparse: Sparse, kernel: bool, verify: bool) -> Policy {
        Policy {
            sink,
            sparse,
            kernel,
            verify,
        }
    }

    const LEASED: BlobKind = BlobKind::File {
        same_fs: false,
        leased: true,
    };

    #[test]
    fn leased_files_take_the_kernel_route_of_their_sink() {
        for sink in [SinkKind::File, SinkKind::Other] {
            let p = policy(sink, Sparse::Never, true, true);
            assert_eq!(choose(&p, LEASED), Route::Kernel(strategies(sink)));
        }
        // Unverified, pipes and sockets get splice and sendfile too.
        for sink in [SinkKind::Pipe, SinkKind::Socket] {
            let p = policy(sink, Sparse::Never, true, false);
            assert_eq!(choose(&p, LEASED), Route::Kernel(strategies(sink)));
        }
        for sink in [
            SinkKind::Pipe,
            SinkKind::File,
            SinkKind::Socket,
            SinkKind::Other,
        ] {
            assert_eq!(strategies(sink).last(), Some(&Strategy::ReadWrite));
        }
        assert_eq!(strategies(SinkKind::Pipe)[0], Strategy::Splice);
        assert_eq!(strategies(SinkKind::File)[0], Strategy::CopyFileRange);
        assert_eq!(strategies(SinkKind::Socket)[0], Strategy::Sendfile);
        assert_eq!(strategies(SinkKind::Other)[0], Strategy::SpliceViaPipe);
    }

    #[test]
    fn a_verified_file_without_a_lease_is_hashed_as_written() {
        let unleased = BlobKind::File {
            same_fs: false,
            leased: false,
        };
        let p = policy(SinkKind::Pipe, Sparse::Never, true, true);
        assert_eq!(choose(&p, unleased), Route::Buffered { holes: false });
        // Unverified, there is nothing to keep consistent.
        let p = policy(SinkKind::Pipe, Sparse::Never, true, false);
        assert!(matches!(choose(&p, unleased), Route::Kernel(_)));
    }

    #[test]
    fn a_verified_leased_blob_enters_a_pipe_or_socket_as_a_copy() {
        // A pipe's reader may splice the references on; a local peer
        // acknowledges them unread. Copied under the lease, hashed beside.
        let p = policy(SinkKind::Socket, Sparse::Never, true, true);
        assert_eq!(choose(&p, LEASED), Route::Kernel(&[Strategy::ReadWrite]));
        // Into a pipe, through the buffer that is hashed: one read.
        let p = policy(SinkKind::Pipe, Sparse::Never, true, true);
        assert_eq!(choose(&p, LEASED), Route::Buffered { holes: false });
    }

    #[test]
    fn streams_and_forced_read_write_go_through_a_buffer() {
        let p = policy(SinkKind::Pipe, Sparse::Never, true, true);
        assert_eq!(
            choose(&p, BlobKind::Stream),
            Route::Buffered { holes: false }
        );
        let p = policy(SinkKind::File, Sparse::Never, false, true);
        assert_eq!(choose(&p, LEASED), Route::Buffered { holes: false });
    }

    #[test]
    fn sparse_auto_scans_other_file_systems_and_reflinks_its_own() {
        let p = policy(SinkKind::File, Sparse::Auto, true, true);
        assert_eq!(choose(&p, LEASED), Route::Buffered { holes: true });
        let same = BlobKind::File {
            same_fs: true,
            leased: true,
        };
        assert_eq!(choose(&p, same), Route::Kernel(strategies(SinkKind::File)));
        let p = policy(SinkKind::File, Sparse::Always, true, true);
        assert_eq!(choose(&p, same), Route::Buffered { holes: true });
        assert_eq!(
            choose(&p, BlobKind::Stream),
            Route::Buffered { holes: true }
        );
    }
}
