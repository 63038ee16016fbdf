//! The registry fixture works: a real `docker-registry` starts, accepts
//! images and indexes pushed through its upload API, and serves them back.

mod common;

use common::registry::Registry;
use common::*;
use serde_json::Value;

const MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const INDEX: &str = "application/vnd.oci.image.index.v1+json";

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

#[test]
fn pushed_image_comes_back_by_tag() {
    let reg = Registry::start();
    assert_eq!(reg.url(), format!("http://{}", reg.host()));

    let image = Image::split(&data(3_000_000, 7), 1_000_000);
    let (digest, size) = reg.push_image("test/img", "v1", &image);
    let pushed = serde_json::to_vec(&image.manifest_json()).unwrap();
    assert_eq!(size, pushed.len());
    assert_eq!(digest, sha256(&pushed));

    let (status, headers, body) = reg.get("/v2/test/img/manifests/v1", &[("Accept", MANIFEST)]);
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert!(body == pushed, "manifest bytes differ from what was pushed");
    assert_eq!(header(&headers, "Docker-Content-Digest"), Some(&*digest));
    assert_eq!(header(&headers, "Content-Type"), Some(MANIFEST));

    // Every layer is retrievable whole, by digest.
    for layer in &image.layers {
        let d = sha256(&layer.data);
        let (status, _, body) = reg.get(&format!("/v2/test/img/blobs/{d}"), &[]);
        assert_eq!(status, 200);
        assert!(body == layer.data, "blob {d} differs");
    }
}

#[test]
fn blob_range_request_is_served_directly() {
    let reg = Registry::start();
    let bytes = data(1_000_000, 3);
    let digest = reg.push_blob("test/blob", &bytes);
    assert_eq!(digest, sha256(&bytes));

    // With filesystem storage the registry serves the blob itself (no
    // redirect) and honours Range with a partial response.
    let (status, headers, body) = reg.get(
        &format!("/v2/test/blob/blobs/{digest}"),
        &[("Range", "bytes=100-")],
    );
    assert_eq!(status, 206, "headers: {headers:?}");
    assert_eq!(
        header(&headers, "Content-Range"),
        Some(&*format!("bytes 100-{}/{}", bytes.len() - 1, bytes.len()))
    );
    assert!(body == bytes[100..], "ranged body differs");
}

#[test]
fn pushed_index_comes_back_by_tag() {
    let reg = Registry::start();
    let amd64 = Image::split(&data(200_000, 21), 100_000);
    let arm64 = Image::split(&data(200_000, 22), 100_000);
    let (d1, s1) = reg.push_image("test/multi", "amd64", &amd64);
    let (d2, s2) = reg.push_image("test/multi", "arm64", &arm64);
    let children = [
        (d1.clone(), s1, "linux", "amd64"),
        (d2.clone(), s2, "linux", "arm64"),
    ];
    let index_digest = reg.push_index("test/multi", "latest", &children);

    let (status, headers, body) = reg.get("/v2/test/multi/manifests/latest", &[("Accept", INDEX)]);
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(header(&headers, "Content-Type"), Some(INDEX));
    assert_eq!(
        header(&headers, "Docker-Content-Digest"),
        Some(&*index_digest)
    );
    assert_eq!(sha256(&body), index_digest);

    let index: Value = serde_json::from_slice(&body).unwrap();
    let entries = index["manifests"].as_array().unwrap();
    assert_eq!(entries.len(), 2);
    for (entry, (digest, size, os, arch)) in entries.iter().zip(&children) {
        assert_eq!(entry["digest"], **digest);
        assert_eq!(entry["size"], *size);
        assert_eq!(entry["mediaType"], MANIFEST);
        assert_eq!(entry["platform"]["os"], *os);
        assert_eq!(entry["platform"]["architecture"], *arch);
    }

    // A child is also reachable by digest through the same repository.
    let (status, _, body) = reg.get(
        &format!("/v2/test/multi/manifests/{d2}"),
        &[("Accept", MANIFEST)],
    );
    assert_eq!(status, 200);
    assert_eq!(sha256(&body), d2);
}

#[test]
fn blob_range_past_the_end_is_416() {
    let reg = Registry::start();
    let bytes = data(1_000, 4);
    let digest = reg.push_blob("test/blob", &bytes);
    let (status, headers, _) = reg.get(
        &format!("/v2/test/blob/blobs/{digest}"),
        &[("Range", "bytes=5000-")],
    );
    assert_eq!(status, 416, "headers: {headers:?}");
    assert_eq!(header(&headers, "Content-Range"), Some("bytes */1000"));
}
