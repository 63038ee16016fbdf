//! A real qcow2 disk, split into parts like the publisher splits it, comes
//! back out of `cloudimg get` as a disk that `qemu-img check` accepts and that
//! holds the same guest data.

mod common;

use std::process::Command;

use common::*;
use tempfile::TempDir;

fn qemu_img(args: &[&str]) -> std::process::Output {
    Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img must be installed (Debian: qemu-utils)")
}

#[test]
fn reassembled_qcow2_passes_qemu_img_check() {
    let tmp = TempDir::new().unwrap();
    let p = |n: &str| tmp.path().join(n).to_str().unwrap().to_owned();
    // Guest data: 6 MiB of noise at the start, 3 MiB more at 20 MiB, a hole between.
    let mut raw = data(6 << 20, 11);
    raw.resize(20 << 20, 0);
    raw.extend(data(3 << 20, 12));
    std::fs::write(p("guest.raw"), &raw).unwrap();
    let out = qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        &p("guest.raw"),
        &p("disk.qcow2"),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let qcow2 = std::fs::read(p("disk.qcow2")).unwrap();
    assert_eq!(&qcow2[..4], b"QFI\xfb");

    let layout = LayoutDir::new(&tmp.path().join("layout"));
    layout.put_image(Some("v1"), &Image::split(&qcow2, 1_900_000));

    let out = run(&["get", "-q", &layout.source("v1"), "-o", &p("out.qcow2")]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let check = qemu_img(&["check", &p("out.qcow2")]);
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );
    let compare = qemu_img(&[
        "compare",
        "-f",
        "raw",
        "-F",
        "qcow2",
        &p("guest.raw"),
        &p("out.qcow2"),
    ]);
    assert!(
        compare.status.success(),
        "{}",
        String::from_utf8_lossy(&compare.stdout)
    );
}
