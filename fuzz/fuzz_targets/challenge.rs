//! `WWW-Authenticate` header values → `parse_challenge`.
//!
//! Never panics; a result's scheme is the header's first token (case
//! insensitive); a Bearer challenge has a non-blank realm (it becomes the
//! token URL); and a challenge written back in canonical form
//! (`Bearer realm="…",service="…",scope="…"`, quotes and backslashes escaped)
//! parses to the same challenge.

#![no_main]

use cloudimg::source::{Challenge, parse_challenge};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let Some(c) = parse_challenge(s) else {
        return;
    };
    let scheme = s.split_whitespace().next().unwrap_or_default();
    match &c {
        Challenge::Basic => assert!(scheme.eq_ignore_ascii_case("basic")),
        Challenge::Bearer { realm, .. } => {
            assert!(scheme.eq_ignore_ascii_case("bearer"));
            assert!(
                !realm.trim().is_empty(),
                "Bearer challenge with an empty realm"
            );
        }
    }
    let canonical = render(&c);
    assert_eq!(
        parse_challenge(&canonical).as_ref(),
        Some(&c),
        "canonical form {canonical:?}"
    );
});

fn quote(v: &str) -> String {
    let mut out = String::from("\"");
    for ch in v.chars() {
        if ch == '"' || ch == '\\' {
            out.push('\\');
        }
        out.push(ch);
    }
    out.push('"');
    out
}

fn render(c: &Challenge) -> String {
    match c {
        Challenge::Basic => "Basic".to_owned(),
        Challenge::Bearer {
            realm,
            service,
            scope,
        } => {
            let mut s = format!("Bearer realm={}", quote(realm));
            if let Some(v) = service {
                s += &format!(",service={}", quote(v));
            }
            if let Some(v) = scope {
                s += &format!(",scope={}", quote(v));
            }
            s
        }
    }
}
