//! Registry authentication: `WWW-Authenticate` challenges, credentials from
//! the command line or the docker config, and the tokens they buy.
//!
//! Secrets live in [`Secret`], whose `Debug` and `Display` print `***`, so no
//! error message or debug print can leak one.

use std::collections::BTreeMap;
use std::fmt;
use std::io::Write;
use std::path::PathBuf;
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
    /// `--username` + `--password-stdin`.
    pub explicit: Option<Credentials>,
    /// The docker config directory (`$DOCKER_CONFIG`, else `~/.docker`),
    /// consulted under the registry's `host[:port]`.
    pub docker_config_dir: Option<PathBuf>,
}

#[derive(Deserialize, Default)]
struct DockerConfig {
    #[serde(default)]
    auths: BTreeMap<String, DockerAuth>,
    #[serde(default, rename = "credsStore")]
    creds_store: Option<String>,
    #[serde(default, rename = "credHelpers")]
    cred_helpers: BTreeMap<String, String>,
}

#[derive(Deserialize, Default)]
struct DockerAuth {
    #[serde(default)]
    auth: Option<String>,
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
    let k = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    k.split('/').next().unwrap_or(k)
}

impl CredentialStore {
    /// Credentials for a request to `origin`, if the user has any: only
    /// when `origin` is the registry's own (same scheme, host and port).
    pub fn lookup(&self, origin: &Origin) -> Result<Option<Credentials>> {
        if self.origin.as_ref() != Some(origin) {
            return Ok(None);
        }
        if let Some(c) = &self.explicit {
            return Ok(Some(c.clone()));
        }
        self.in_docker_config(&origin.authority())
    }

    /// `auths.HOST` (or a credential helper) of the docker config, for
    /// `host` (`name[:port]`).
    fn in_docker_config(&self, host: &str) -> Result<Option<Credentials>> {
        let Some(dir) = &self.docker_config_dir else {
            return Ok(None);
        };
        let path = dir.join("config.json");
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(format!("reading {}", path.display()), e)),
        };
        let config: DockerConfig = serde_json::from_slice(&bytes)
            .map_err(|e| Error::Config(format!("{}: not a docker config: {e}", path.display())))?;
        let helper = config
            .cred_helpers
            .get(host)
            .or(config.creds_store.as_ref());
        if let Some(helper) = helper
            && let Some(c) = run_helper(helper, host)?
        {
            return Ok(Some(c));
        }
        let entry = config
            .auths
            .iter()
            .find(|(k, _)| normalize_host(k) == host)
            .and_then(|(_, a)| a.auth.as_deref());
        let Some(encoded) = entry else {
            return Ok(None);
        };
        let decoded = BASE64
            .decode(encoded.trim())
            .ok()
            .and_then(|b| String::from_utf8(b).ok())
            .ok_or_else(|| {
                Error::Config(format!(
                    "{}: auths.{host}.auth is not base64 of user:password",
                    path.display()
                ))
            })?;
        let (user, pass) = decoded.split_once(':').ok_or_else(|| {
            Error::Config(format!(
                "{}: auths.{host}.auth is not base64 of user:password",
                path.display()
            ))
        })?;
        Ok(Some(Credentials {
            username: user.to_owned(),
            password: Secret(pass.to_owned()),
        }))
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
    fn explicit_credentials_are_the_registry_origins_only() {
        let registry = Origin::of("https://127.0.0.1/").unwrap();
        let store = CredentialStore {
            origin: Some(registry.clone()),
            explicit: Some(Credentials {
                username: "alice".into(),
                password: Secret::new("hunter2"),
            }),
            docker_config_dir: None,
        };
        assert!(store.lookup(&registry).unwrap().is_some());
        let twin = Origin::of("http://127.0.0.1/").unwrap();
        assert_eq!(store.lookup(&twin).unwrap(), None);
    }
}
