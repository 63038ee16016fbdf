//! Which certificate authorities HTTPS trusts: Mozilla's roots bundled in the
//! binary (so it works in an initramfs with no /etc/ssl), the system store
//! when there is one, and `EPOCH_CA_CERT` (a PEM file) for a private CA.

use std::path::Path;
use std::sync::Arc;

use ureq::tls::{Certificate, PemItem, RootCerts, TlsConfig};

use crate::error::{Error, Result};

/// The environment variable naming an extra PEM CA bundle.
pub const ENV_CA_CERT: &str = "EPOCH_CA_CERT";

/// System bundles, first found wins (Debian/Ubuntu/Alpine, then Fedora/RHEL).
const SYSTEM_BUNDLES: [&str; 2] = [
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
];

fn pem_certs(bytes: &[u8]) -> impl Iterator<Item = Certificate<'static>> + '_ {
    ureq::tls::parse_pem(bytes).filter_map(|item| match item {
        Ok(PemItem::Certificate(c)) => Some(c),
        _ => None,
    })
}

/// The TLS settings for the registry client; `ca_cert` is an extra PEM
/// bundle (`EPOCH_CA_CERT`).
pub fn config(ca_cert: Option<&Path>) -> Result<TlsConfig> {
    let mut roots: Vec<Certificate<'static>> = webpki_root_certs::TLS_SERVER_ROOT_CERTS
        .iter()
        .map(|der| Certificate::from_der(der.as_ref()))
        .collect();
    if let Some(bundle) = SYSTEM_BUNDLES.iter().find_map(|p| std::fs::read(p).ok()) {
        roots.extend(pem_certs(&bundle));
    }
    if let Some(path) = ca_cert {
        let shown = path.display();
        let bytes =
            std::fs::read(path).map_err(|e| Error::io(format!("{ENV_CA_CERT}={shown}"), e))?;
        let before = roots.len();
        roots.extend(pem_certs(&bytes));
        if roots.len() == before {
            return Err(Error::Config(format!(
                "{ENV_CA_CERT}={shown} holds no PEM certificate"
            )));
        }
    }
    Ok(TlsConfig::builder()
        .root_certs(RootCerts::Specific(Arc::new(roots)))
        .build())
}
