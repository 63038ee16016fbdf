//! `get`, `inspect` and `pull` against a real OCI registry: Debian's
//! `docker-registry` (CNCF distribution), started per test on a free loopback
//! port, with fixtures pushed through its upload API.

mod common;

use std::process::{Output, Stdio};

use common::registry::Registry;
use common::*;
use serde_json::Value;

fn run_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = bin();
    c.args(args)
        .env("DOCKER_CONFIG", "/nonexistent")
        .env("CLOUDIMG_CHUNK_SIZE", "65536")
        .stdin(Stdio::null());
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

fn ok(out: &Output) -> &[u8] {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    &out.stdout
}

fn image(seed: u64) -> Image {
    Image::split(&data(5 * 200_003 + 99, seed), 200_003)
}

#[test]
fn get_by_tag_single_and_parallel() {
    let reg = Registry::start();
    let img = image(31);
    reg.push_image("windows/win11", "25h2", &img);
    let source = format!("{}/windows/win11:25h2", reg.host());
    for c in ["1", "4"] {
        let out = run_env(&["get", "-q", "--connections", c, &source], &[]);
        assert!(ok(&out) == expected_disk(&img), "connections {c}");
    }
}

#[test]
fn digest_pinned_references() {
    let reg = Registry::start();
    let img = image(32);
    let (digest, _) = reg.push_image("img", "v1", &img);
    let pinned = format!("{}/img@{digest}", reg.host());
    assert!(ok(&run_env(&["get", "-q", &pinned], &[])) == expected_disk(&img));
    // Tag and digest together: the digest pins.
    let both = format!("{}/img:v1@{digest}", reg.host());
    assert!(ok(&run_env(&["get", "-q", &both], &[])) == expected_disk(&img));
    // A digest the registry does not have.
    let wrong = format!("{}/img@sha256:{}", reg.host(), "1".repeat(64));
    let line = failure(&run_env(&["get", "-q", &wrong], &[]));
    assert!(line.contains("no such manifest"), "{line}");
}

#[test]
fn epoch_style_names_go_to_epoch_server_and_pull_uses_the_last_component() {
    let reg = Registry::start();
    let img = image(33);
    reg.push_image("windows/win11", "25h2", &img);
    let store = tempfile::TempDir::new().unwrap();
    let standin = standin();
    let out = run_env(
        &["pull", "-q", "windows/win11:25h2"],
        &[
            ("EPOCH_SERVER", &reg.url()),
            ("EPOCH_COCOON_BINARY", standin.to_str().unwrap()),
            ("COCOON_STANDIN_DIR", store.path().to_str().unwrap()),
        ],
    );
    ok(&out);
    assert!(std::fs::read(store.path().join("win11")).unwrap() == expected_disk(&img));
}

#[test]
fn index_resolves_to_the_requested_platform() {
    let reg = Registry::start();
    let amd = image(34);
    let arm = image(35);
    let (amd_d, amd_n) = reg.push_image("multi", "amd64-only", &amd);
    let (arm_d, arm_n) = reg.push_image("multi", "arm64-only", &arm);
    let index = reg.push_index(
        "multi",
        "v1",
        &[
            (arm_d.clone(), arm_n, "linux", "arm64"),
            (amd_d.clone(), amd_n, "linux", "amd64"),
        ],
    );
    let source = format!("{}/multi:v1", reg.host());
    let out = run_env(&["get", "-q", "--platform", "linux/arm64", &source], &[]);
    assert!(ok(&out) == expected_disk(&arm));
    let out = run_env(&["get", "-q", "--platform", "linux/amd64", &source], &[]);
    assert!(ok(&out) == expected_disk(&amd));

    let out = run_env(
        &["inspect", "--json", "--platform", "linux/arm64", &source],
        &[],
    );
    let r: Value = serde_json::from_slice(ok(&out)).unwrap();
    assert_eq!(r["index"][0]["digest"], index.as_str());
    assert_eq!(r["index"][0]["platform"]["architecture"], "arm64");
    assert_eq!(r["digest"], arm_d.as_str());
    assert_eq!(r["kind"], "cloud-image");

    let line = failure(&run_env(
        &["get", "-q", "--platform", "linux/s390x", &source],
        &[],
    ));
    assert!(
        line.contains("linux/s390x") && line.contains("linux/arm64"),
        "{line}"
    );
}

#[test]
fn inspect_and_missing_things() {
    let reg = Registry::start();
    let img = image(36);
    let (digest, _) = reg.push_image("img", "v1", &img);
    let out = run_env(&["inspect", &format!("{}/img:v1", reg.host())], &[]);
    let text = String::from_utf8(ok(&out).to_vec()).unwrap();
    assert!(
        text.contains(&digest) && text.contains("cloud-image"),
        "{text}"
    );

    let line = failure(&run_env(
        &["get", "-q", &format!("{}/img:nope", reg.host())],
        &[],
    ));
    assert!(
        line.contains("img:nope") && line.contains("no such manifest"),
        "{line}"
    );
    let line = failure(&run_env(
        &["get", "-q", &format!("{}/other:v1", reg.host())],
        &[],
    ));
    assert!(line.contains("no such manifest"), "{line}");
}
