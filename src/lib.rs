#![warn(missing_docs)]
//! cloudimg streams OCI-packaged cloud images — VM disks, often split into
//! parts — out of an OCI registry or image layout, verified, into a file, a pipe, a socket
//! or `cocoon image import`, with the kernel doing the copying.
//!
//! Data flows one way: [`source::open`] turns a [`Reference`] into a
//! [`BlobSource`], which resolves it to a manifest and hands out blobs;
//! [`disk_plan`] says which blobs make the disk and in which order;
//! [`stream_plan`] moves them into a [`Sink`], the kernel doing the copying
//! where it can and hashing threads checking beside it; a [`Puller`] wraps
//! the stream around a cocoon child that must never commit a disk that is
//! incomplete or unverified. [`cli::run`] is the command line.
//!
//! ```no_run
//! use std::os::fd::AsFd;
//! use cloudimg::{Options, Progress, Reference, Sink, SourceOptions, disk_plan, stream_plan};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let reference = Reference::parse("oci:./win11:25h2")?;
//! let source = cloudimg::source::open(&reference, &SourceOptions::default())?;
//! let plan = disk_plan(&source.resolve()?.manifest)?;
//! let out = std::fs::File::create("win11.qcow2")?;
//! let sink = Sink::new(out.as_fd())?;
//! let mut progress = Progress::new(plan.total, true);
//! stream_plan(&plan, &*source, &sink, &Options::default(), &mut progress)?;
//! # Ok(())
//! # }
//! ```

pub(crate) mod cache;
pub mod cli;
pub(crate) mod copy;
pub mod digest;
pub(crate) mod error;
pub(crate) mod fdwait;
pub(crate) mod guardian;
pub(crate) mod holes;
pub(crate) mod inspect;
pub(crate) mod lease;
pub mod manifest;
pub(crate) mod output;
pub(crate) mod progress;
pub(crate) mod pull;
pub mod qcow2;
pub mod reference;
pub(crate) mod repeat;
pub(crate) mod route;
pub(crate) mod serve;
pub(crate) mod signals;
pub(crate) mod sink;
pub mod source;
pub(crate) mod store;
pub(crate) mod stream;
pub(crate) mod verify;
pub(crate) mod zerocopy;

pub use cache::Cached;
pub use copy::{Copied, copy_image};
pub use digest::{Algorithm, Digest};
pub use error::{Error, NetFault, Result};
pub use inspect::Report;
pub use manifest::{DiskLayer, DiskPlan, Manifest, disk_plan};
pub use progress::Progress;
pub use pull::{CocoonRunner, ExecCocoon, Import, Puller};
pub use reference::{Reference, RegistryRef, Selector};
pub use route::Sparse;
pub use sink::Sink;
pub use source::{Blob, BlobSource, Resolved, SourceOptions};
pub use store::{Partial, Store};
pub use stream::{Options, stream_plan};
