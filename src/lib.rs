//! cloudimg streams OCI-packaged cloud images — VM disks, often split into
//! parts — out of an OCI image layout, verified, into a file, a pipe, a socket
//! or `cocoon image import`, with the kernel doing the copying.
//!
//! Data flows one way: a [`source`] resolves a reference to a manifest and
//! hands out blobs; [`manifest::disk_plan`] says which blobs make the disk and
//! in which order; [`stream`] moves them into a [`sink::Sink`] through the
//! syscall loops of [`zerocopy`], while [`verify`] hashes beside the copy;
//! [`pull`] wraps the stream around a cocoon child that must never commit a
//! disk that is incomplete or unverified.

pub mod cli;
pub mod digest;
pub mod error;
pub mod fdwait;
pub mod holes;
pub mod inspect;
pub mod lease;
pub mod manifest;
pub mod output;
pub mod progress;
pub mod pull;
pub mod qcow2;
pub mod reference;
pub mod route;
pub mod signals;
pub mod sink;
pub mod source;
pub mod stream;
pub mod verify;
pub mod zerocopy;

pub use error::{Error, Result};
