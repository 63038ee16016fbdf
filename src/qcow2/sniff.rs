//! The first bytes of a disk against its declared format, checked before
//! cocoon starts: cocoon tells a qcow2 from anything else by its magic, so
//! a qcow2 image whose first part does not start with `QFI\xfb` (a part
//! mislabelled, or the parts sorted wrongly) would be taken for a tar and
//! fail only after the whole disk went through; a raw image that starts
//! with the magic is a qcow2 labelled raw.
//!
//! The first layer's blob is opened for the look and handed on to the
//! stream, with the bytes read from a network body put back in front: no
//! byte is fetched twice, and the digest still covers every byte.

use std::io::{Cursor, ErrorKind, Read};
use std::sync::Mutex;

use rustix::io::Errno;

use super::{MAGIC, no_raw_from_qcow2};
use crate::error::{Error, Result};
use crate::manifest::{DiskLayer, DiskPlan, Format};
use crate::signals;
use crate::source::{Blob, BlobSource, Resolved};
use crate::zerocopy::pread;

/// Check that the disk of `plan` starts as its format says, and that
/// `output` (the format asked for, `None`: the image's own) can be made of
/// it. Returns the source to stream from: `source`, with the first layer's
/// blob already open.
pub fn check_start<'a>(
    plan: &DiskPlan,
    source: &'a dyn BlobSource,
    output: Option<Format>,
) -> Result<Box<dyn BlobSource + 'a>> {
    if plan.format == Format::Qcow2 && output == Some(Format::Raw) {
        return Err(no_raw_from_qcow2());
    }
    let Some(first) = plan.layers.first() else {
        return Err(Error::Manifest("cloud image has no disk layers".to_owned()));
    };
    let (head, blob) = peek(first, source.open_blob(first)?)?;
    let magic = head.as_slice() == MAGIC;
    match plan.format {
        Format::Qcow2 if !magic => Err(Error::Manifest(format!(
            "{}, the first part of a qcow2 disk, does not start with the qcow2 magic \
             QFI\\xfb (it starts with {}): the image's layers are mislabelled or sorted wrongly",
            first.name(),
            shown(&head)
        ))),
        Format::Raw if magic => Err(Error::Manifest(format!(
            "{}, the first part of a raw disk, starts with the qcow2 magic QFI\\xfb: \
             the image is a qcow2 disk labelled raw",
            first.name()
        ))),
        _ => Ok(Box::new(Peeked {
            inner: source,
            index: first.index,
            blob: Mutex::new(Some(blob)),
        })),
    }
}

/// Read the first bytes of `blob` (up to the magic's length) without
/// losing them.
fn peek(layer: &DiskLayer, blob: Blob) -> Result<(Vec<u8>, Blob)> {
    let want = MAGIC
        .len()
        .min(usize::try_from(layer.size).unwrap_or(MAGIC.len()));
    let mut head = vec![0u8; want];
    let mut got = 0;
    let label = layer.label();
    match blob {
        Blob::File { file, offset, len } => {
            while got < want {
                match pread(&file, &mut head[got..], offset + got as u64) {
                    Ok(0) => break,
                    Ok(n) => got += n,
                    Err(Errno::INTR) => signals::check()?,
                    Err(e) => return Err(Error::io(format!("{label}: reading"), e.into())),
                }
            }
            head.truncate(got);
            Ok((head, Blob::File { file, offset, len }))
        }
        Blob::Stream(mut body) => {
            while got < want {
                match body.read(&mut head[got..]) {
                    Ok(0) => break,
                    Ok(n) => got += n,
                    Err(e) if e.kind() == ErrorKind::Interrupted => signals::check()?,
                    Err(e) => return Err(Error::from_read(&label, e)),
                }
            }
            head.truncate(got);
            let body = Cursor::new(head.clone()).chain(body);
            Ok((head, Blob::Stream(Box::new(body))))
        }
    }
}

/// Bytes as hex pairs, for the error line.
fn shown(bytes: &[u8]) -> String {
    if bytes.is_empty() {
        return "nothing: it is empty".to_owned();
    }
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// A source whose first disk layer is already open.
struct Peeked<'a> {
    inner: &'a dyn BlobSource,
    /// The manifest position of the layer that is open.
    index: usize,
    blob: Mutex<Option<Blob>>,
}

impl BlobSource for Peeked<'_> {
    fn resolve(&self) -> Result<Resolved> {
        self.inner.resolve()
    }

    fn open_blob(&self, layer: &DiskLayer) -> Result<Blob> {
        if layer.index == self.index
            && let Some(blob) = self.blob.lock().expect("peeked blob").take()
        {
            return Ok(blob);
        }
        self.inner.open_blob(layer)
    }

    fn open_ahead(&self) -> usize {
        self.inner.open_ahead()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest::{Algorithm, Digest};

    struct Bytes(Vec<Vec<u8>>);

    impl BlobSource for Bytes {
        fn resolve(&self) -> Result<Resolved> {
            Err(Error::Other("not used".into()))
        }
        fn open_blob(&self, layer: &DiskLayer) -> Result<Blob> {
            Ok(Blob::Stream(Box::new(Cursor::new(
                self.0[layer.index].clone(),
            ))))
        }
    }

    fn plan(format: Format, parts: &[Vec<u8>]) -> DiskPlan {
        let layers: Vec<DiskLayer> = parts
            .iter()
            .enumerate()
            .map(|(index, p)| DiskLayer {
                title: format!("disk.{index:02}.part"),
                media_type: String::new(),
                size: p.len() as u64,
                digest: Digest::of(Algorithm::Sha256, p),
                index,
            })
            .collect();
        DiskPlan {
            format,
            total: layers.iter().map(|l| l.size).sum(),
            layers,
            skipped: Vec::new(),
        }
    }

    fn read_all(source: &dyn BlobSource, layer: &DiskLayer) -> Vec<u8> {
        let Blob::Stream(mut body) = source.open_blob(layer).unwrap() else {
            panic!("a stream")
        };
        let mut all = Vec::new();
        body.read_to_end(&mut all).unwrap();
        all
    }

    #[test]
    fn a_qcow2_start_passes_and_its_bytes_are_handed_on_whole() {
        let parts = vec![b"QFI\xfb and the rest".to_vec(), b"part two".to_vec()];
        let p = plan(Format::Qcow2, &parts);
        let src = Bytes(parts.clone());
        let peeked = check_start(&p, &src, None).unwrap();
        assert_eq!(read_all(&*peeked, &p.layers[0]), parts[0]);
        assert_eq!(read_all(&*peeked, &p.layers[1]), parts[1]);
    }

    #[test]
    fn a_mislabelled_first_part_is_named() {
        let parts = vec![b"\x1f\x8b\x08\x00".to_vec(), b"QFI\xfb".to_vec()];
        let p = plan(Format::Qcow2, &parts);
        let e = check_start(&p, &Bytes(parts), Some(Format::Qcow2))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("layer \"disk.00.part\""), "{e}");
        assert!(e.contains("1f 8b 08 00"), "{e}");
        let short = vec![b"QF".to_vec()];
        let e = check_start(&plan(Format::Qcow2, &short), &Bytes(short), None)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("51 46"), "{e}");
    }

    #[test]
    fn raw_refuses_the_magic_and_qcow2_refuses_raw_output() {
        let parts = vec![b"QFI\xfb....".to_vec()];
        let e = check_start(&plan(Format::Raw, &parts), &Bytes(parts.clone()), None)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("labelled raw"), "{e}");
        let e = check_start(
            &plan(Format::Qcow2, &parts),
            &Bytes(parts.clone()),
            Some(Format::Raw),
        )
        .err()
        .unwrap()
        .to_string();
        assert!(e.contains("qemu-img convert"), "{e}");
        let raw = vec![vec![0u8; 3]];
        assert!(check_start(&plan(Format::Raw, &raw), &Bytes(raw), None).is_ok());
    }
}
