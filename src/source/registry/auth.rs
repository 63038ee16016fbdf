//! Registry authentication: `WWW-Authenticate` challenges, credentials from
//! the command line, the docker config or the containers auth files, and the
//! tokens they buy.
//!
//! Secrets live in [`Secret`], whose `Debug` and `Display` print `***`, so no
//! error message or debug print can leak one.

use std::collections::BTreeMap;
use std::fmt;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::Deserialize;

use super::client::Origin;
use crate::error::{Error, Result};

/// A string that must never be printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Keep `s` as a secret.
    pub fn new(s: impl Into<String>) -> Secret {
        Secret(s.into())
    }

    /// The secret itself, for building a header. Never format this.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// A user name and password for a registry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Credentials {
    /// The user name.
    pub username: String,
    /// The password (or an identity token).
    pub password: Secret,
}

impl Credentials {
    /// The value of an `Authorization: Basic …` header.
    pub fn basic_header(&self) -> Secret {
        let raw = format!("{}:{}", self.username, self.password.expose());
        Secret(format!("Basic {}", BASE64.encode(raw)))
    }
}

/// A parsed `WWW-Authenticate` challenge.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Challenge {
    /// Fetch a token from `realm` and send it as `Authorization: Bearer`.
    Bearer {
        /// The token URL.
        realm: String,
        /// The `service` to ask the token for.
        service: Option<String>,
        /// The `scope` to ask the token for (else the repository's pull scope).
        scope: Option<String>,
    },
    /// Send the user name and password (`Authorization: Basic`).
    Basic,
}

/// Parse a `WWW-Authenticate` header value: a scheme, then `key=value` or
/// `key="quoted value"` pairs separated by commas. Unknown schemes and a
/// Bearer challenge without a realm (or with an empty one: there is no token
/// URL to ask) are `None`.
pub fn parse_challenge(header: &str) -> Option<Challenge> {
    let header = header.trim();
    let (scheme, rest) = match header.find(char::is_whitespace) {
        Some(i) => (&header[..i], header[i..].trim_start()),
        None => (header, ""),
    };
    if scheme.eq_ignore_ascii_case("basic") {
        return Some(Challenge::Basic);
    }
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let params = parse_params(rest)?;
    Some(Challenge::Bearer {
        realm: params
            .get("realm")
            .filter(|r| !r.trim().is_empty())?
            .clone(),
        service: params.get("service").cloned(),
        scope: params.get("scope").cloned(),
    })
}

fn parse_params(mut s: &str) -> Option<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    loop {
        s = s.trim_start_matches(|c: char| c == ',' || c.is_whitespace());
        if s.is_empty() {
            return Some(out);
        }
        let eq = s.find('=')?;
        let key = s[..eq].trim().to_ascii_lowercase();
        if key.is_empty() || key.contains(|c: char| c.is_whitespace() || c == ',') {
            return None;
        }
        s = s[eq + 1..].trim_start();
        let value = if let Some(quoted) = s.strip_prefix('"') {
            let mut v = String::new();
            let mut chars = quoted.char_indices();
            let end = loop {
                match chars.next()? {
                    (i, '"') => break i,
                    (_, '\\') => v.push(chars.next()?.1),
                    (_, c) => v.push(c),
                }
            };
            s = &quoted[end + 1..];
            v
        } else {
            let end = s.find(',').unwrap_or(s.len());
            let v = s[..end].trim().to_owned();
            s = &s[end..];
            v
        };
        out.insert(key, value);
    }
}

/// The JSON a token realm answers with.
#[derive(Deserialize)]
pub struct TokenResponse {
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    access_token: Option<String>,
}

impl TokenResponse {
    pub fn into_token(self) -> Option<Secret> {
        self.token
            .or(self.access_token)
            .filter(|t| !t.is_empty())
            .map(Secret)
    }
}

/// The registry's credentials, and the one origin they belong to.
#[derive(Clone, Debug, Default)]
pub struct CredentialStore {
    /// The registry's origin (scheme, host, port): no other origin is ever
    /// given these credentials.
    pub origin: Option<Origin>,
    /// The repository asked for, so that an auth file's entry for
    /// `HOST/NAMESPACE` applies to the repositories under it only.
    pub repository: Option<String>,
    /// `--username` + `--password-stdin`.
    pub explicit: Option<Credentials>,
    /// The docker config directory (`$DOCKER_CONFIG`, else `~/.docker`),
    /// consulted under the registry's `host[:port]`.
    pub docker_config_dir: Option<PathBuf>,
    /// The containers auth files (podman, buildah, skopeo), in the order
    /// they are consulted, after the docker config.
    pub auth_files: Vec<PathBuf>,
}

/// The most a credentials file (a docker config, an auth file) may hold.
pub const MAX_AUTH_FILE_BYTES: u64 = 4 << 20;

/// A docker `config.json`, or a containers `auth.json` (the same format,
/// without the helpers).
#[derive(Deserialize, Default)]
struct AuthConfig {
    #[serde(default)]
    auths: BTreeMap<String, AuthEntry>,
    #[serde(default, rename = "credsStore")]
    creds_store: Option<String>,
    #[serde(default, rename = "credHelpers")]
    cred_helpers: BTreeMap<String, String>,
}

/// One entry under `auths`: `auth` (base64 of `user:password`), or plain
/// `username` and `password`.
#[derive(Deserialize, Default)]
struct AuthEntry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
}

impl AuthEntry {
    /// The credentials this entry holds, if any (an entry with an empty
    /// `auth` and no user name holds none).
    fn credentials(&self, path: &Path, key: &str) -> Result<Option<Credentials>> {
        if let Some(encoded) = self
            .auth
            .as_deref()
            .map(str::trim)
            .filter(|a| !a.is_empty())
        {
            let bad = || {
                Error::Config(format!(
                    "{}: auths.{key}.auth is not base64 of user:password",
                    path.display()
                ))
            };
            let decoded = BASE64
                .decode(encoded)
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
                .ok_or_else(bad)?;
            let (user, pass) = decoded.split_once(':').ok_or_else(bad)?;
            return Ok(Some(Credentials {
                username: user.to_owned(),
                password: Secret(pass.to_owned()),
            }));
        }
        match (&self.username, &self.password) {
            (Some(user), Some(pass)) if !user.is_empty() => Ok(Some(Credentials {
                username: user.clone(),
                password: Secret(pass.clone()),
            })),
            _ => Ok(None),
        }
    }
}

#[derive(Deserialize)]
struct HelperAnswer {
    #[serde(rename = "Username")]
    username: String,
    #[serde(rename = "Secret")]
    secret: String,
}

/// `https://index.docker.io/v1/` → `index.docker.io`; `host:5000` stays.
fn normalize_host(key: &str) -> &str {
    let k = strip_scheme(key);
    k.split('/').next().unwrap_or(k)
}

fn strip_scheme(key: &str) -> &str {
    key.strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key)
}

/// How well an auth file's key names `host` and `repository`: `Some(n)`
/// for `host` followed by `n` leading components of the repository
/// (`reg.example` → 0, `reg.example/team` → 1 for `team/app`), `None` when
/// it names another registry or another namespace.
fn key_match(key: &str, host: &str, repository: Option<&str>) -> Option<usize> {
    let key = strip_scheme(key).trim_end_matches('/');
    let (key_host, namespace) = match key.split_once('/') {
        Some((h, ns)) => (h, Some(ns)),
        None => (key, None),
    };
    if !key_host.eq_ignore_ascii_case(host) {
        return None;
    }
    let Some(namespace) = namespace else {
        return Some(0);
    };
    let repository = repository?;
    let wanted: Vec<&str> = namespace.split('/').collect();
    let have: Vec<&str> = repository.split('/').collect();
    (wanted.len() <= have.len() && wanted[..] == have[..wanted.len()]).then_some(wanted.len())
}

/// Read a credentials file whole; `None` when it does not exist. Only a
/// regular file of at most [`MAX_AUTH_FILE_BYTES`] is read: a FIFO would
/// hold the run until someone writes to it and a device might never end,
/// so anything else is refused in one line naming the file. It is opened
/// without blocking (a FIFO's open would wait for a writer) and checked by
/// the descriptor, so it cannot be swapped between the check and the read.
fn read_auth_file(path: &Path) -> Result<Option<Vec<u8>>> {
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let flags = rustix::fs::OFlags::NONBLOCK | rustix::fs::OFlags::NOCTTY;
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(flags.bits() as i32)
        .open(path)
    {
        Ok(f) => f,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
            ) =>
        {
            return Ok(None);
        }
        Err(e) => return Err(Error::io(format!("reading {}", path.display()), e)),
    };
    let reading = || format!("reading {}", path.display());
    let meta = file.metadata().map_err(|e| Error::io(reading(), e))?;
    let kind = meta.file_type();
    if !kind.is_file() {
        let what = if kind.is_fifo() {
            "a FIFO"
        } else if kind.is_dir() {
            "a directory"
        } else if kind.is_char_device() || kind.is_block_device() {
            "a device"
        } else if kind.is_socket() {
            "a socket"
        } else {
            "not a regular file"
        };
        return Err(Error::Config(format!(
            "{}: is {what}; credentials are read from regular files only",
            path.display()
        )));
    }
    let too_large = || {
        Error::Config(format!(
            "{}: larger than the {MAX_AUTH_FILE_BYTES} byte limit of a credentials file",
            path.display()
        ))
    };
    if meta.len() > MAX_AUTH_FILE_BYTES {
        return Err(too_large());
    }
    let mut bytes = Vec::new();
    file.take(MAX_AUTH_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| Error::io(reading(), e))?;
    if bytes.len() as u64 > MAX_AUTH_FILE_BYTES {
        return Err(too_large());
    }
    Ok(Some(bytes))
}

/// Parse a credentials file. A parse error says where, never what: serde's
/// message can quote the value it stumbled on, and that may be a password.
fn parse_auth_config(path: &Path, bytes: &[u8], what: &str) -> Result<AuthConfig> {
    serde_json::from_slice(bytes).map_err(|e| {
        let why = match e.classify() {
            serde_json::error::Category::Data => "a field of the wrong type",
            serde_json::error::Category::Eof => "cut short",
            _ => "malformed JSON",
        };
        Error::Config(format!(
            "{}: not {what} ({why} at line {}, column {})",
            path.display(),
            e.line(),
            e.column()
        ))
    })
}

impl CredentialStore {
    /// Credentials for a request to `origin`, if the user has any: only
    /// when `origin` is the registry's own (same scheme, host and port).
    /// The first source that has some wins: the command line, the docker
    /// config (its helpers, then `auths`), then the auth files in order.
    pub fn lookup(&self, origin: &Origin) -> Result<Option<Credentials>> {
        if self.origin.as_ref() != Some(origin) {
            return Ok(None);
        }
        if let Some(c) = &self.explicit {
            return Ok(Some(c.clone()));
        }
        let host = origin.authority();
        if let Some(c) = self.in_docker_config(&host)? {
            return Ok(Some(c));
        }
        for path in &self.auth_files {
            if let Some(c) = self.in_auth_file(path, &host)? {
                return Ok(Some(c));
            }
        }
        Ok(None)
    }

    /// `auths.HOST` (or a credential helper) of the docker config, for
    /// `host` (`name[:port]`).
    fn in_docker_config(&self, host: &str) -> Result<Option<Credentials>> {
        let Some(dir) = &self.docker_config_dir else {
            return Ok(None);
        };
        let path = dir.join("config.json");
        let Some(bytes) = read_auth_file(&path)? else {
            return Ok(None);
        };
        let config = parse_auth_config(&path, &bytes, "a docker config")?;
        let helper = config
            .cred_helpers
            .get(host)
            .or(config.creds_store.as_ref());
        if let Some(helper) = helper
            && let Some(c) = run_helper(helper, host)?
        {
            return Ok(Some(c));
        }
        match config.auths.iter().find(|(k, _)| normalize_host(k) == host) {
            Some((_, entry)) => entry.credentials(&path, host),
            None => Ok(None),
        }
    }

    /// The entry of a containers auth file for `host`: the one naming the
    /// longest namespace the repository lies in (`HOST/team` before
    /// `HOST`), as podman and skopeo choose.
    fn in_auth_file(&self, path: &Path, host: &str) -> Result<Option<Credentials>> {
        let Some(bytes) = read_auth_file(path)? else {
            return Ok(None);
        };
        let config = parse_auth_config(path, &bytes, "a containers auth file")?;
        let best = config
            .auths
            .iter()
            .filter_map(|(k, entry)| {
                key_match(k, host, self.repository.as_deref()).map(|n| (n, k, entry))
            })
            .max_by_key(|(n, _, _)| *n);
        match best {
            Some((_, key, entry)) => entry.credentials(path, strip_scheme(key)),
            None => Ok(None),
        }
    }
}

/// Ask `docker-credential-NAME get` for `host`'s credentials.
fn run_helper(name: &str, host: &str) -> Result<Option<Credentials>> {
    if name.is_empty() || name.contains('/') {
        return Err(Error::Config(format!(
            "docker config names an unusable credential helper {name:?}"
        )));
    }
    let program = format!("docker-credential-{name}");
    let mut child = match Command::new(&program)
        .arg("get")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            return Err(Error::Config(format!(
                "docker config names credential helper {program}, which cannot be run: {e}"
            )));
        }
    };
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(host.as_bytes());
    }
    // A helper may take its time (an unlock prompt, a hung keyring): a
    // signal ends the wait, and the helper.
    let (status, stdout) = crate::signals::child_output(child, &program)?;
    if !status.success() {
        // Helpers exit non-zero for "no credentials for this host".
        return Ok(None);
    }
    let answer: HelperAnswer = serde_json::from_slice(&stdout)
        .map_err(|_| Error::Config(format!("{program} answered something that is not JSON")))?;
    Ok(Some(Credentials {
        username: answer.username,
        password: Secret(answer.secret),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_bearer_challenges() {
        let c = parse_challenge(
            r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull""#,
        )
        .unwrap();
        assert_eq!(
            c,
            Challenge::Bearer {
                realm: "https://auth.example/token".into(),
                service: Some("registry.example".into()),
                scope: Some("repository:a/b:pull".into()),
            }
        );
        // Case, spacing, unquoted values, escapes, commas inside quotes.
        let c = parse_challenge(
            r#"bearer  Realm=https://a/t , scope="repository:x:pull,push", service="s\"q""#,
        )
        .unwrap();
        assert_eq!(
            c,
            Challenge::Bearer {
                realm: "https://a/t".into(),
                service: Some("s\"q".into()),
                scope: Some("repository:x:pull,push".into()),
            }
        );
    }

    #[test]
    fn other_challenges() {
        assert_eq!(parse_challenge("Basic realm=\"x\""), Some(Challenge::Basic));
        assert_eq!(parse_challenge("Negotiate abc"), None);
        assert_eq!(parse_challenge("Bearer service=\"x\""), None, "no realm");
        // Found by fuzzing: an empty realm used to give a Bearer challenge
        // without a token URL, which then failed as a "bad URL ".
        assert_eq!(
            parse_challenge(r#"Bearer realm=,scope="repository:x:pull""#),
            None,
            "empty realm"
        );
        assert_eq!(parse_challenge(r#"Bearer realm="""#), None, "empty realm");
        assert_eq!(parse_challenge(r#"Bearer realm=" ""#), None, "blank realm");
        assert_eq!(parse_challenge("Bearer realm=\"unterminated"), None);
        assert_eq!(parse_challenge(""), None);
    }

    #[test]
    fn secrets_never_print() {
        let c = Credentials {
            username: "u".into(),
            password: Secret::new("hunter2"),
        };
        assert!(!format!("{c:?}").contains("hunter2"));
        assert!(!format!("{}", c.basic_header()).contains("aHVudGVy"));
        assert_eq!(c.basic_header().expose(), "Basic dTpodW50ZXIy");
    }

    #[test]
    fn docker_config_auths() {
        let dir = tempfile::TempDir::new().unwrap();
        std::fs::write(
            dir.path().join("config.json"),
            format!(
                r#"{{"auths":{{"https://reg.example:5000/v1/":{{"auth":"{}"}}}}}}"#,
                BASE64.encode("alice:s3cret:with:colons")
            ),
        )
        .unwrap();
        let registry = Origin::of("https://reg.example:5000/").unwrap();
        let store = CredentialStore {
            origin: Some(registry.clone()),
            explicit: None,
            docker_config_dir: Some(dir.path().to_owned()),
            ..CredentialStore::default()
        };
        let c = store.lookup(&registry).unwrap().unwrap();
        assert_eq!(c.username, "alice");
        assert_eq!(c.password.expose(), "s3cret:with:colons");
        // Not for the same host and port over plain http, nor elsewhere.
        for other in [
            "http://reg.example:5000/",
            "https://reg.example/",
            "https://other.example:5000/",
        ] {
            let o = Origin::of(other).unwrap();
            assert_eq!(store.lookup(&o).unwrap(), None, "{other}");
        }
    }

    #[test]
    fn auth_file_keys_match_the_host_then_the_longest_namespace() {
        let m = |k: &str, repo: Option<&str>| key_match(k, "reg.example:5000", repo);
        assert_eq!(m("reg.example:5000", Some("team/app")), Some(0));
        assert_eq!(m("https://reg.example:5000/", Some("team/app")), Some(0));
        assert_eq!(m("reg.example:5000/team", Some("team/app")), Some(1));
        assert_eq!(m("reg.example:5000/team/app", Some("team/app")), Some(2));
        assert_eq!(m("reg.example:5000/team/app/x", Some("team/app")), None);
        assert_eq!(m("reg.example:5000/tea", Some("team/app")), None);
        assert_eq!(m("reg.example:5000/team", None), None);
        assert_eq!(m("reg.example", Some("team/app")), None);
        assert_eq!(m("other.example:5000", Some("team/app")), None);
    }

    #[test]
    fn auth_files_after_the_docker_config_with_plain_user_names() {
        let dir = tempfile::TempDir::new().unwrap();
        let first = dir.path().join("first.json");
        let second = dir.path().join("second.json");
        std::fs::write(&first, r#"{"auths":{"other.example":{"auth":"eDp5"}}}"#).unwrap();
        std::fs::write(
            &second,
            r#"{"auths":{"reg.example/team":{"username":"bob","password":"pw"},
                "reg.example":{"auth":"eDp5"}}}"#,
        )
        .unwrap();
        let registry = Origin::of("https://reg.example/").unwrap();
        let store = CredentialStore {
            origin: Some(registry.clone()),
            repository: Some("team/app".into()),
            auth_files: vec![dir.path().join("missing.json"), first, second],
            docker_config_dir: Some(dir.path().join("no-docker")),
            ..CredentialStore::default()
        };
        let c = store.lookup(&registry).unwrap().unwrap();
        assert_eq!((c.username.as_str(), c.password.expose()), ("bob", "pw"));
        let other = Origin::of("http://reg.example/").unwrap();
        assert_eq!(store.lookup(&other).unwrap(), None);
    }

    #[test]
    fn explicit_credentials_are_the_registry_origins_only() {
        let registry = Origin::of("https://127.0.0.1/").unwrap();
        let store = CredentialStore {
            origin: Some(registry.clone()),
            explicit: Some(Credentials {
                username: "alice".into(),
                password: Secret::new("hunter2"),
            }),
            ..CredentialStore::default()
        };
        assert!(store.lookup(&registry).unwrap().is_some());
        let twin = Origin::of("http://127.0.0.1/").unwrap();
        assert_eq!(store.lookup(&twin).unwrap(), None);
    }
}
