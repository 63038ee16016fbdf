//! An OCI registry over HTTP(S), through the distribution API: manifests
//! (resolving an image index to the host's platform), and blobs as resumable,
//! optionally parallel, streams.

pub mod auth;
pub mod blob;
pub mod client;
pub mod tls;

use std::io::Read;
use std::sync::Arc;
use std::time::Duration;

use self::auth::{CredentialStore, Credentials, Secret};
use self::blob::{BlobFetch, BlobUrl, MirrorUse, Parallel, Resumable, note};
use self::client::{BodyKind, Client, ClientOptions, Origin, body_error_text, is_loopback, redact};
use super::{Blob, BlobSource, Resolved};
use crate::digest::{Algorithm, Digest};
use crate::error::{Error, Result};
use crate::manifest::{DiskLayer, MAX_MANIFEST_BYTES, Manifest, Platform};
use crate::reference::Reference;

/// Where epoch-style names (no host) live.
pub const ENV_SERVER: &str = "EPOCH_SERVER";
pub const DEFAULT_SERVER: &str = "http://127.0.0.1:8080";
/// A bearer token for `EPOCH_SERVER` only.
pub const ENV_TOKEN: &str = "EPOCH_REGISTRY_TOKEN";

const ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, \
application/vnd.oci.image.index.v1+json, \
application/vnd.docker.distribution.manifest.v2+json, \
application/vnd.docker.distribution.manifest.list.v2+json";

/// Registry settings from the command line and the environment.
#[derive(Clone, Debug)]
pub struct RegistryOptions {
    /// Plain http even for non-loopback hosts.
    pub plain_http: bool,
    /// `--username` and the password read from stdin.
    pub credentials: Option<Credentials>,
    /// Mirrors tried in order before the registry, for blobs and by-digest
    /// manifests (base URLs speaking the same /v2 API).
    pub mirrors: Vec<String>,
    pub retries: u32,
    pub stall_timeout: Duration,
    /// Concurrent range requests per blob (1 = a single stream). `None`:
    /// four, or one for a loopback registry — parallel ranges exist to get
    /// past per-connection rate caps of remote object stores and CDNs; on
    /// loopback there are none and the extra streams only cost CPU.
    pub connections: Option<usize>,
    /// Bytes per range request. At most `connections + 2` chunks are held in
    /// memory (24 MiB with the defaults).
    pub chunk_size: u64,
}

impl Default for RegistryOptions {
    fn default() -> Self {
        RegistryOptions {
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
    repository: String,
    tag: Option<String>,
    digest: Option<Digest>,
    platform: Option<Platform>,
    reference: String,
    opts: RegistryOptions,
    /// Range requests per blob, the default resolved.
    connections: usize,
    /// Which blobs mirrors served.
    mirror_use: Arc<MirrorUse>,
}

impl Registry {
    pub fn open(
        reference: &Reference,
        platform: Option<Platform>,
        opts: &RegistryOptions,
    ) -> Result<Registry> {
        let Reference::Registry {
            host,
            repository,
            tag,
            digest,
        } = reference
        else {
            unreachable!("a registry source is opened from a registry reference");
        };
        let mut static_token = None;
        let base = match host {
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
                let server = std::env::var(ENV_SERVER)
                    .ok()
                    .filter(|s| !s.is_empty())
                    .unwrap_or_else(|| DEFAULT_SERVER.to_owned());
                let server = server.trim_end_matches('/').to_owned();
                let origin = Origin::of(&server).map_err(|_| {
                    Error::Other(format!("{ENV_SERVER}={} is not a URL", redact(&server)))
                })?;
                if let Some(token) = std::env::var(ENV_TOKEN).ok().filter(|t| !t.is_empty()) {
                    static_token = Some((origin, Secret::new(token)));
                }
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
        let credentials = CredentialStore::for_registry(registry_origin, opts.credentials.clone());
        let client = Client::new(ClientOptions {
            retries: opts.retries,
            stall_timeout: opts.stall_timeout,
            credentials,
            static_token,
            plain_http: opts.plain_http,
        })?;
        Ok(Registry {
            client: Arc::new(client),
            base,
            namespace,
            repository: repository.clone(),
            tag: tag.clone(),
            digest: digest.clone(),
            platform,
            reference: reference.to_string(),
            opts: opts.clone(),
            connections,
            mirror_use: Arc::default(),
        })
    }

    fn scope(&self) -> String {
        format!("repository:{}:pull", self.repository)
    }

    /// Where to ask for a blob or manifest: the mirrors in order, then the
    /// registry.
    fn sources(&self, kind: &str, reference: &str) -> Vec<BlobUrl> {
        let mut sources: Vec<BlobUrl> = self
            .opts
            .mirrors
            .iter()
            .map(|m| {
                let base = m.trim_end_matches('/');
                BlobUrl {
                    url: format!(
                        "{base}/v2/{}/{kind}/{reference}?ns={}",
                        self.repository, self.namespace
                    ),
                    mirror: Some(base.to_owned()),
                }
            })
            .collect();
        sources.push(BlobUrl {
            url: format!("{}/v2/{}/{kind}/{reference}", self.base, self.repository),
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
        let headers = [("Accept", ACCEPT.to_owned())];
        let mut last = None;
        let n = sources.len();
        for (i, source) in sources.iter().enumerate() {
            let tries = if i + 1 == n { self.client.retries() } else { 0 };
            match self.manifest_from(&source.url, &headers, pinned, tries) {
                Ok(found) => return Ok(found),
                Err(e @ Error::Interrupted(_)) => return Err(e),
                Err(e) => {
                    if let Some(m) = &source.mirror
                        && !matches!(e, Error::NotFound(_))
                    {
                        note(&format!(
                            "mirror {}: {e}; trying the next source",
                            redact(m)
                        ));
                    }
                    last = Some(e);
                }
            }
        }
        Err(last.expect("the registry URL is always tried"))
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
        if let Some(len) = resp
            .header("content-length")
            .and_then(|v| v.parse::<u64>().ok())
            && len > MAX_MANIFEST_BYTES
        {
            return Err(Error::Manifest(format!(
                "manifest from {} is {len} bytes, more than the {MAX_MANIFEST_BYTES} byte limit",
                redact(url)
            )));
        }
        let claimed = resp
            .header("docker-content-digest")
            .map(|d| {
                d.parse::<Digest>().map_err(|e| {
                    Error::Manifest(format!("registry sent a bad Docker-Content-Digest: {e}"))
                })
            })
            .transpose()?;
        let mut bytes = Vec::new();
        resp.body
            .into_reader()
            .take(MAX_MANIFEST_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| {
                Error::Other(format!(
                    "reading manifest from {}: {}",
                    redact(url),
                    body_error_text(&e)
                ))
            })?;
        if bytes.len() as u64 > MAX_MANIFEST_BYTES {
            return Err(Error::Manifest(format!(
                "manifest from {} is larger than the {MAX_MANIFEST_BYTES} byte limit",
                redact(url)
            )));
        }
        let alg = pinned
            .or(claimed.as_ref())
            .map_or(Algorithm::Sha256, Digest::algorithm);
        let actual = Digest::of(alg, &bytes);
        if let Some(want) = pinned
            && *want != actual
        {
            return Err(Error::Integrity(format!(
                "manifest digest mismatch: asked for {want}, the manifest sent is {actual}"
            )));
        }
        if let Some(claim) = claimed {
            let check = if claim.algorithm() == alg {
                actual.clone()
            } else {
                Digest::of(claim.algorithm(), &bytes)
            };
            if claim != check {
                return Err(Error::Integrity(format!(
                    "manifest digest mismatch: Docker-Content-Digest says {claim}, the bytes are {check}"
                )));
            }
        }
        Ok((bytes, actual))
    }
}

impl BlobSource for Registry {
    fn resolve(&self) -> Result<Resolved> {
        let reference = match (&self.digest, &self.tag) {
            (Some(d), _) => d.to_string(),
            (None, Some(t)) => t.clone(),
            (None, None) => "latest".to_owned(),
        };
        let (bytes, digest) = self.fetch_manifest(&reference, self.digest.as_ref())?;
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
        let digest = layer.digest.to_string();
        let fetch = Arc::new(BlobFetch {
            client: Arc::clone(&self.client),
            sources: self.sources("blobs", &digest),
            scope: self.scope(),
            size: layer.size,
            label: format!("{} ({})", layer.name(), layer.digest),
            digest,
            mirror_use: Arc::clone(&self.mirror_use),
            failed: std::sync::Mutex::new(Vec::new()),
        });
        if layer.size == 0 {
            return Ok(Blob::Stream(Box::new(std::io::empty())));
        }
        let parallel = self.connections > 1 && layer.size > self.opts.chunk_size.saturating_mul(2);
        if parallel {
            return Ok(
                match Parallel::open(fetch, self.opts.chunk_size, self.connections)? {
                    Ok(p) => Blob::Stream(Box::new(p)),
                    Err(single) => Blob::Stream(Box::new(single)),
                },
            );
        }
        Ok(Blob::Stream(Box::new(Resumable::open(fetch)?)))
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
