//! `cloudimg pull` into the cocoon stand-in (tests/cocoon-standin.sh — a
//! stand-in, since cocoon cannot be installed here): byte-identical imports,
//! and no commit whenever the stream fails.

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::*;
use tempfile::TempDir;

struct Setup {
    _tmp: TempDir,
    layout: LayoutDir,
    image: Image,
    store: std::path::PathBuf,
}

fn setup() -> Setup {
    let tmp = TempDir::new().unwrap();
    let layout = LayoutDir::new(&tmp.path().join("win11"));
    let image = Image::split(&data(4 * 1_048_576 + 777, 9), 1_048_576);
    layout.put_image(Some("25h2"), &image);
    let store = tmp.path().join("store");
    std::fs::create_dir(&store).unwrap();
    Setup {
        _tmp: tmp,
        layout,
        image,
        store,
    }
}

fn pull_cmd(s: &Setup, args: &[&str]) -> Command {
    let mut c = bin();
    c.arg("pull")
        .args(args)
        .env("EPOCH_COCOON_BINARY", standin())
        .env("COCOON_STANDIN_DIR", &s.store)
        .stdin(Stdio::null());
    c
}

fn committed(store: &Path) -> Vec<String> {
    names(store)
        .into_keys()
        .filter(|n| !n.starts_with('.'))
        .collect()
}

#[test]
fn pull_delivers_identical_bytes_under_the_default_name() {
    let s = setup();
    let out: Output = pull_cmd(&s, &["-q", &s.layout.source("25h2")])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The default name is the layout directory's base name.
    assert_eq!(committed(&s.store), vec!["win11".to_owned()]);
    assert!(std::fs::read(s.store.join("win11")).unwrap() == expected_disk(&s.image));
    // cocoon's own output reaches our stderr, not our stdout.
    assert!(out.stdout.is_empty());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cocoon-standin: imported win11"));
}

#[test]
fn pull_honours_name() {
    let s = setup();
    let out = pull_cmd(&s, &["-q", "--name", "myimg", &s.layout.source("25h2")])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(committed(&s.store), vec!["myimg".to_owned()]);
}

#[test]
fn corrupted_last_part_commits_nothing() {
    let s = setup();
    let last = s
        .image
        .layers
        .iter()
        .filter(|l| l.media_type == QCOW2_PART)
        .max_by_key(|l| l.title.clone())
        .unwrap();
    let path = s.layout.blob_path(&sha256(&last.data));
    let mut bytes = std::fs::read(&path).unwrap();
    *bytes.last_mut().unwrap() ^= 1;
    std::fs::write(&path, &bytes).unwrap();
    let out = pull_cmd(&s, &["-q", &s.layout.source("25h2")])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("digest mismatch"), "{err}");
    assert!(
        committed(&s.store).is_empty(),
        "committed: {:?}",
        names(&s.store)
    );
}

#[test]
fn bad_manifest_does_not_even_start_cocoon() {
    let s = setup();
    let out = pull_cmd(&s, &["-q", &s.layout.source("nope")])
        .output()
        .unwrap();
    failure(&out);
    assert!(names(&s.store).is_empty());
}

#[test]
fn missing_cocoon_binary_is_one_clear_line() {
    let s = setup();
    let out = pull_cmd(&s, &["-q", &s.layout.source("25h2")])
        .env("EPOCH_COCOON_BINARY", "/nonexistent/cocoon")
        .output()
        .unwrap();
    let line = failure(&out);
    assert!(
        line.contains("/nonexistent/cocoon") && line.contains("EPOCH_COCOON_BINARY"),
        "{line}"
    );
}

#[test]
fn cocoon_failing_early_is_reported_as_its_exit() {
    let s = setup();
    let out = pull_cmd(&s, &["-q", &s.layout.source("25h2")])
        .env("COCOON_STANDIN_FAIL", "1")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("exit status 3"), "{err}");
    assert!(committed(&s.store).is_empty());
}

#[test]
fn sigterm_during_pull_kills_cocoon_and_commits_nothing() {
    let s = setup();
    // The stand-in sleeps before reading, so the pipe fills and we block in
    // splice when the signal arrives.
    let child = pull_cmd(&s, &["-q", &s.layout.source("25h2")])
        .env("COCOON_STANDIN_DELAY", "3")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(700));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(143), "{err}");
    assert!(err.contains("SIGTERM"), "{err}");
    // Give a surviving stand-in time to (wrongly) commit before looking.
    std::thread::sleep(Duration::from_millis(3500));
    assert!(
        committed(&s.store).is_empty(),
        "committed: {:?}",
        names(&s.store)
    );
}

#[test]
fn wrapped_cocoons_import_identical_bytes() {
    // A wrapper that runs the importer as its child, and one that runs it in
    // a session of its own: the guardian holds a second write end of the
    // pipe, and must let go of it once the stream is complete.
    for wrap in ["child", "setsid"] {
        let s = setup();
        let out = pull_cmd(&s, &["-q", &s.layout.source("25h2")])
            .env("COCOON_STANDIN_WRAP", wrap)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{wrap}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(committed(&s.store), vec!["win11".to_owned()], "{wrap}");
        assert!(std::fs::read(s.store.join("win11")).unwrap() == expected_disk(&s.image));
    }
}
