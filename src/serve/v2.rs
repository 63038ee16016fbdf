//! A read-only OCI distribution view of the layouts under the root, so that
//! registry clients can read them and other hosts can use this one as a
//! mirror: `/v2/`, manifests by tag or digest, blobs (with `Range`), tags.
//! Errors come in the spec's JSON form.

use super::body::{self, Blob, Want};
use super::http::{Head, http_date};
use super::image::{self, Fail};
use super::{Ask, Exchange, Outcome};
use crate::digest::Digest;
use crate::manifest::Descriptor;
use crate::reference::Selector;
use crate::zerocopy::Range;

const API: (&str, &str) = ("Docker-Distribution-API-Version", "registry/2.0");

fn head(status: u16) -> Head {
    Head::new(status).field(API.0, API.1)
}

pub fn base(ex: &Exchange<'_>) -> Outcome {
    ex.reply(head(200), "application/json", b"{}")
}

fn answered(ex: &Exchange<'_>, r: Result<Outcome, Fail>) -> Outcome {
    r.unwrap_or_else(|fail| ex.fail_json(fail))
}

fn known_name(ex: &Exchange<'_>, name: &str) -> Result<(), Fail> {
    if ex.server.root.is_layout(name) {
        Ok(())
    } else {
        Err(Fail::new(
            404,
            "NAME_UNKNOWN",
            format!("repository {name:?} is not known here"),
        ))
    }
}

pub fn manifest(ex: &Exchange<'_>, name: &str, reference: &Selector) -> Outcome {
    answered(
        ex,
        (|| {
            known_name(ex, name)?;
            let root = &ex.server.root;
            let found = match reference {
                Selector::Digest(d) => {
                    let desc = Descriptor {
                        digest: d.to_string(),
                        size: u64::MAX,
                        ..Descriptor::default()
                    };
                    image::read_manifest(root, name, &desc)?
                }
                other => image::lookup(root, name, other)?,
            };
            let etag = format!("\"{}\"", found.digest);
            if let Some(list) = ex.req.header("if-none-match")
                && super::http::none_match(list, &etag)
            {
                return Ok(ex.reply(head(304).field("ETag", &etag), "", b""));
            }
            let h = head(200)
                .field("Docker-Content-Digest", &found.digest)
                .field("ETag", &etag)
                .field("Last-Modified", http_date(found.modified));
            Ok(ex.reply(h, &found.media_type, &found.bytes))
        })(),
    )
}

pub fn blob(ex: &Exchange<'_>, name: &str, digest: &Digest) -> Outcome {
    answered(
        ex,
        (|| {
            known_name(ex, name)?;
            let unknown = || Fail::new(404, "BLOB_UNKNOWN", format!("{name}: no blob {digest}"));
            let file = image::open_blob(&ex.server.root, name, digest)?.ok_or_else(unknown)?;
            let meta = file
                .metadata()
                .map_err(|e| Fail::internal(format!("blob {digest}: {e}")))?;
            let total = meta.len();
            let etag = format!("\"{digest}\"");
            let last_modified = http_date(meta.modified().unwrap_or(std::time::UNIX_EPOCH));
            let base = |status| {
                head(status)
                    .field("Docker-Content-Digest", digest)
                    .field("ETag", &etag)
                    .field("Last-Modified", &last_modified)
                    .field("Accept-Ranges", "bytes")
            };
            let (status, start, len) = match ex.ask(total, &etag, &last_modified) {
                Ask::NotModified => return Ok(ex.reply(base(304), "", b"")),
                Ask::Unsatisfiable => {
                    let h = base(416).field("Content-Range", format!("bytes */{total}"));
                    return Ok(ex.reply(h, "application/octet-stream", b""));
                }
                Ask::Send { status, start, len } => (status, start, len),
            };
            let want = match (ex.head_only, status) {
                (true, _) => Want::Head,
                (false, 200) => Want::Whole,
                _ => Want::Part,
            };
            let blob = Blob {
                file,
                digest: digest.clone(),
                size: total,
                label: format!("{name}: blob {digest}"),
            };
            let body = body::prepare(
                &ex.server.env(),
                vec![(blob, Range { offset: start, len })],
                want,
            )?;
            let mut h = base(status)
                .field("Content-Type", "application/octet-stream")
                .field("Content-Length", len);
            if status == 206 {
                h = h.field(
                    "Content-Range",
                    format!("bytes {start}-{}/{total}", start + len - 1),
                );
            }
            Ok(ex.body(h, body))
        })(),
    )
}

pub fn tags(ex: &Exchange<'_>, name: &str) -> Outcome {
    answered(
        ex,
        (|| {
            known_name(ex, name)?;
            let tags = image::tags(&ex.server.root, name)?;
            let body = serde_json::json!({"name": name, "tags": tags}).to_string();
            Ok(ex.reply(head(200), "application/json", body.as_bytes()))
        })(),
    )
}
