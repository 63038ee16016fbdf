//! `GET|HEAD /dl/NAME[:TAG|@DIGEST]`: the assembled disk, exactly as
//! `cloudimg get` writes it, with `Content-Length`, `ETag` (the manifest
//! digest), `Last-Modified`, `Range` and a file name.

use super::body::{self, Blob, Want, pieces};
use super::http::{Head, http_date};
use super::image::{self, Fail};
use super::{Ask, Exchange, Outcome};
use crate::manifest::{Kind, disk_plan};
use crate::reference::Selector;

pub fn disk(ex: &Exchange<'_>, name: &str, selector: &Selector) -> Outcome {
    match answer(ex, name, selector) {
        Ok(out) => out,
        Err(fail) => ex.fail_text(fail),
    }
}

fn answer(ex: &Exchange<'_>, name: &str, selector: &Selector) -> Result<Outcome, Fail> {
    let root = &ex.server.root;
    let found = image::resolve(root, name, selector)?;
    let plan = disk_plan(&found.manifest).map_err(|e| {
        let hint = match found.manifest.kind() {
            Kind::ContainerImage => format!(
                "{name} is a container image, not a disk: pull it with an OCI client \
                 (docker://HOST/{name} through /v2/)"
            ),
            _ => format!("{name} is not a downloadable disk: {e}"),
        };
        Fail::new(405, "UNSUPPORTED", hint)
    })?;
    let etag = format!("\"{}\"", found.digest);
    let last_modified = http_date(found.modified);
    let total = plan.total;
    let base = |status| {
        Head::new(status)
            .field("ETag", &etag)
            .field("Last-Modified", &last_modified)
            .field("Accept-Ranges", "bytes")
    };
    let (status, start, len) = match ex.ask(total, &etag, &last_modified) {
        Ask::NotModified => return Ok(ex.reply(base(304), "", b"")),
        Ask::Unsatisfiable => {
            let head = base(416).field("Content-Range", format!("bytes */{total}"));
            let body = format!("cloudimg: the disk is {total} bytes; the range is outside it\n");
            return Ok(ex.reply(head, "text/plain; charset=utf-8", body.as_bytes()));
        }
        Ask::Send { status, start, len } => (status, start, len),
    };
    let want = match (ex.head_only, status) {
        (true, _) => Want::Head,
        (false, 200) => Want::Whole,
        _ => Want::Part,
    };
    let sizes: Vec<u64> = plan.layers.iter().map(|l| l.size).collect();
    let mut blobs = Vec::new();
    for (i, range) in pieces(&sizes, start, len) {
        let layer = &plan.layers[i];
        let label = layer.label();
        let file = image::open_blob(root, name, &layer.digest)?.ok_or_else(|| {
            Fail::internal(format!("{label}: the blob is missing from the layout"))
        })?;
        let size = file
            .metadata()
            .map_err(|e| Fail::internal(format!("{label}: {e}")))?
            .len();
        if size != layer.size {
            let how = if size < layer.size {
                "truncated"
            } else {
                "oversized"
            };
            return Err(Fail::internal(format!(
                "{label}: the blob is {how} on the server: {size} bytes, the manifest says {}",
                layer.size
            )));
        }
        let blob = Blob {
            file,
            digest: layer.digest.clone(),
            size,
            label,
        };
        blobs.push((blob, range));
    }
    let body = body::prepare(&ex.server.env(), blobs, want)?;
    let file_name = format!(
        "{}.{}",
        name.rsplit('/').next().unwrap_or(name),
        plan.format
    );
    let mut head = base(status)
        .field("Content-Type", "application/octet-stream")
        .field("Content-Length", len)
        .field(
            "Content-Disposition",
            format!("attachment; filename=\"{file_name}\""),
        );
    if status == 206 {
        head = head.field(
            "Content-Range",
            format!("bytes {start}-{}/{total}", start + len - 1),
        );
    }
    Ok(ex.body(head, body))
}
