//! An OCI registry over HTTP(S), through the distribution API: manifests
//! (resolving an image index to the host's platform), and blobs as resumable,
//! optionally parallel, streams.

pub mod auth;
pub mod blob;
pub mod client;
pub mod mirrors;
pub mod tls;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use self::auth::{CredentialStore, Credentials, Secret};
use self::blob::{BlobFetch, Parallel, Resumable};
use self::client::{
    BodyKind, Client, ClientOptions, Origin, body_error_text, body_fault, is_loopback, redact,
};
use self::mirrors::{MirrorUse, SourceUrl, ask_in_turn, mirror_failed};
use super::{Blob, BlobSource, Resolved, check_manifest_digest};
use crate::digest::{Algorithm, Digest};
use crate::error::{Error, Result};
use crate::manifest::{DiskLayer, MAX_MANIFEST_BYTES, Manifest, Platform, read_capped, too_large};
use crate::reference::RegistryRef;

/// The environment variable naming where epoch-style names (no host) live.
pub const ENV_SERVER: &str = "EPOCH_SERVER";
/// Where epoch-style names live when `EPOCH_SERVER` is not set.
pub const DEFAULT_SERVER: &str = "http://127.0.0.1:8080";

const ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, \
application/vnd.oci.image.index.v1+json, \
application/vnd.docker.distribution.manifest.v2+json, \
application/vnd.docker.distribution.manifest.list.v2+json";

/// Registry settings from the command line and the environment (which the
/// command line reads; the library reads none of it).
#[derive(Clone, Debug)]
pub struct RegistryOptions {
    /// The base URL of epoch-style names (`EPOCH_SERVER`; default
    /// `http://127.0.0.1:8080`).
    pub epoch_server: Option<String>,
    /// A bearer token sent to the `epoch_server` origin only
    /// (`EPOCH_REGISTRY_TOKEN`).
    pub epoch_token: Option<Secret>,
    /// An extra PEM CA bundle trusted for HTTPS (`EPOCH_CA_CERT`).
    pub ca_cert: Option<PathBuf>,
    /// The directory of the docker `config.json` consulted for credentials
    /// (`$DOCKER_CONFIG`, else `~/.docker`).
    pub docker_config: Option<PathBuf>,
    /// The containers auth files consulted after the docker config, in
    /// order (`$REGISTRY_AUTH_FILE`, `$XDG_RUNTIME_DIR/containers/auth.json`,
    /// `~/.config/containers/auth.json`).
    pub auth_files: Vec<PathBuf>,
    /// Plain http even for non-loopback hosts.
    pub plain_http: bool,
    /// `--username` and the password read from stdin.
    pub credentials: Option<Credentials>,
    /// Mirrors tried in order before the registry, for blobs and by-digest
    /// manifests (base URLs speaking the same /v2 API).
    pub mirrors: Vec<String>,
    /// Retries of a failed request or lost connection.
    pub retries: u32,
    /// The stall bound (see `ClientOptions::stall_timeout`).
    pub stall_timeout: Duration,
    /// Concurrent range requests per blob (1 = a single stream). `None`:
    /// four, or one for a loopback registry — parallel ranges exist to get
    /// past per-connection rate caps of remote object stores and CDNs; on
    /// loopback there are none and the extra streams only cost CPU.
    pub connections: Option<usize>,
    /// Bytes per range request. At most `connections + 3` chunks are held in
    /// memory (28 MiB with the defaults).
    pub chunk_size: u64,
}

impl Default for RegistryOptions {
    fn default() -> Self {
        RegistryOptions {
            epoch_server: None,
            epoch_token: None,
            ca_cert: None,
            docker_config: None,
            auth_files: Vec::new(),
            plain_http: false,
            credentials: None,
            mirrors: Vec::new(),
            retries: 5,
            stall_timeout: Duration::from_secs(60),
            connections: None,
            chunk_size: 4 << 20,
        }
    }
}

/// A repository in a registry, with the reference into it.
pub struct Registry {
    client: Arc<Client>,
    /// `scheme://authority` of the registry.
    base: String,
    /// The registry's authority, as mirrors want it in `?ns=`.
    namespace: String,
    name: RegistryRef,
    platform: Option<Platform>,
    reference: String,
    opts: RegistryOptions,
    /// Range requests per blob, the default resolved.
    connections: usize,
    /// Which blobs mirrors served.
    mirror_use: Arc<MirrorUse>,
}

impl Registry {
    /// Reach the registry `name` lives in; nothing is asked of it until
    /// [`resolve`](BlobSource::resolve).
    pub fn open(
        name: &RegistryRef,
        platform: Option<Platform>,
        opts: &RegistryOptions,
    ) -> Result<Registry> {
        let mut static_token = None;
        let base = match &name.host {
            Some(h) => {
                let host_only = Origin::of(&format!("http://{h}/"))?;
                let scheme = if opts.plain_http || is_loopback(host_only.host()) {
                    "http"
                } else {
                    "https"
                };
                format!("{scheme}://{h}")
            }
            None => {
                let server = opts.epoch_server.as_deref().unwrap_or(DEFAULT_SERVER);
                let server = server.trim_end_matches('/').to_owned();
                let origin = Origin::of(&server).map_err(|_| {
                    Error::Config(format!("{ENV_SERVER}={} is not a URL", redact(&server)))
                })?;
                static_token = opts.epoch_token.clone().map(|token| (origin, token));
                server
            }
        };
        let registry_origin = Origin::of(&base)?;
        let connections = opts
            .connections
            .unwrap_or(if is_loopback(registry_origin.host()) {
                1
            } else {
                4
            });
        let namespace = registry_origin.authority();
        let credentials = CredentialStore {
            origin: Some(registry_origin),
            repository: Some(name.repository.clone()),
            explicit: opts.credentials.clone(),
            docker_config_dir: opts.docker_config.clone(),
            auth_files: opts.auth_files.clone(),
        };
        let client = Client::new(ClientOptions {
            retries: opts.retries,
            stall_timeout: opts.stall_timeout,
            credentials,
            static_token,
            plain_http: opts.plain_http,
            ca_cert: opts.ca_cert.clone(),
        })?;
        Ok(Registry {
            client: Arc::new(client),
            base,
            namespace,
            name: name.clone(),
            platform,
            reference: name.to_string(),
            opts: opts.clone(),
            connections,
            mirror_use: Arc::default(),
        })
    }

    fn scope(&self) -> String {
        format!("repository:{}:pull", self.name.repository)
    }

    /// Where to ask for a blob or manifest: the mirrors in order, then the
    /// registry.
    fn sources(&self, kind: &str, reference: &str) -> Vec<SourceUrl> {
        let repository = &self.name.repository;
        let mut sources: Vec<SourceUrl> = self
            .opts
            .mirrors
            .iter()
            .map(|m| {
                let base = m.trim_end_matches('/');
                SourceUrl {
                    url: format!(
                        "{base}/v2/{repository}/{kind}/{reference}?ns={}",
                        self.namespace
                    ),
                    mirror: Some(base.to_owned()),
                }
            })
            .collect();
        sources.push(SourceUrl {
            url: format!("{}/v2/{repository}/{kind}/{reference}", self.base),
            mirror: None,
        });
        sources
    }

    /// Fetch a manifest by tag or digest, verifying what can be verified:
    /// the size cap, the pinned digest, and `Docker-Content-Digest`.
    fn fetch_manifest(
        &self,
        reference: &str,
        pinned: Option<&Digest>,
    ) -> Result<(Vec<u8>, Digest)> {
        let mut sources = self.sources("manifests", reference);
        if pinned.is_none() {
            // A tag is the registry's to say; only a digest can be checked.
            sources.drain(..sources.len() - 1);
        }
        // Mirrors found dead earlier in the run are not asked again.
        sources.retain(|s| {
            s.mirror
                .as_ref()
                .is_none_or(|m| !self.mirror_use.is_dead(m))
        });
        let headers = [("Accept", ACCEPT.to_owned())];
        ask_in_turn(
            &sources,
            self.client.retries(),
            |source, tries| self.manifest_from(&source.url, &headers, pinned, tries),
            |source, e| {
                if let Some(m) = &source.mirror {
                    mirror_failed(&self.mirror_use, m, e);
                }
            },
        )
    }

    fn manifest_from(
        &self,
        url: &str,
        headers: &[(&str, String)],
        pinned: Option<&Digest>,
        tries: u32,
    ) -> Result<(Vec<u8>, Digest)> {
        let resp = self
            .client
            .get_tries(url, headers, &self.scope(), tries, BodyKind::Document)
            .map_err(|e| match e {
                Error::NotFound(_) => Error::NotFound(format!(
                    "{}: no such manifest in the registry",
                    self.reference
                )),
                e => e,
            })?;
        let what = format!("manifest from {}", redact(url));
        if let Some(len) = resp
            .header("content-length")
            .and_then(|v| v.parse::<u64>().ok())
            && len > MAX_MANIFEST_BYTES
        {
            return Err(too_large(&what, Some(len)));
        }
        let claimed = resp
            .header("docker-content-digest")
            .map(|d| {
                d.parse::<Digest>().map_err(|e| {
                    Error::Manifest(format!("registry sent a bad Docker-Content-Digest: {e}"))
                })
            })
            .transpose()?;
        let bytes = read_capped(resp.body.into_reader(), &what, |e| Error::Network {
            what: format!("reading {what}"),
            cause: body_error_text(&e),
            fault: body_fault(&e),
            retries: 0,
        })?;
        if let Some(want) = pinned {
            check_manifest_digest(&bytes, want, Some("the digest asked for"))?;
        }
        if let Some(claim) = &claimed {
            check_manifest_digest(&bytes, claim, Some("Docker-Content-Digest"))?;
        }
        let digest = match pinned.or(claimed.as_ref()) {
            Some(checked) => checked.clone(),
            None => Digest::of(Algorithm::Sha256, &bytes),
        };
        Ok((bytes, digest))
    }
}

impl BlobSource for Registry {
    fn resolve(&self) -> Result<Resolved> {
        let reference = match (&self.name.digest, &self.name.tag) {
            (Some(d), _) => d.to_string(),
            (None, Some(t)) => t.clone(),
            (None, None) => "latest".to_owned(),
        };
        let (bytes, digest) = self.fetch_manifest(&reference, self.name.digest.as_ref())?;
        let manifest = Manifest::parse(&bytes)?;
        let top = Resolved {
            reference: self.reference.clone(),
            bytes,
            digest,
            manifest,
            index: Vec::new(),
        };
        super::resolve_index(top, self.platform.as_ref(), |child| {
            let child_digest: Digest = child.digest.parse()?;
            self.fetch_manifest(&child_digest.to_string(), Some(&child_digest))
        })
    }

    fn open_blob(&self, layer: &DiskLayer) -> Result<Blob> {
        self.open_blob_from(layer, 0)
    }

    fn open_blob_from(&self, layer: &DiskLayer, from: u64) -> Result<Blob> {
        let digest = layer.digest.to_string();
        let fetch = Arc::new(BlobFetch {
            client: Arc::clone(&self.client),
            sources: self.sources("blobs", &digest),
            scope: self.scope(),
            size: layer.size,
            label: layer.label(),
            digest,
            mirror_use: Arc::clone(&self.mirror_use),
            failed: std::sync::Mutex::new(Vec::new()),
        });
        if from >= layer.size {
            return Ok(Blob::Stream(Box::new(std::io::empty())));
        }
        let left = layer.size - from;
        let parallel = self.connections > 1 && left > self.opts.chunk_size.saturating_mul(2);
        if parallel {
            return Ok(
                match Parallel::open(fetch, from, self.opts.chunk_size, self.connections)? {
                    Ok(p) => Blob::Stream(Box::new(p)),
                    Err(single) => Blob::Stream(Box::new(single)),
                },
            );
        }
        Ok(Blob::Stream(Box::new(Resumable::open_at(fetch, from)?)))
    }

    fn explain(&self, e: Error) -> Error {
        self.mirror_use.explain(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{
        MEDIA_DOCKER_LIST, MEDIA_DOCKER_MANIFEST, MEDIA_OCI_INDEX, MEDIA_OCI_MANIFEST,
    };

    #[test]
    fn accept_header_lists_all_manifest_types() {
        for m in [
            MEDIA_OCI_MANIFEST,
            MEDIA_OCI_INDEX,
            MEDIA_DOCKER_MANIFEST,
            MEDIA_DOCKER_LIST,
        ] {
            assert!(ACCEPT.contains(m), "{m}");
        }
    }
}
