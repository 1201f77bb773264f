//! TLS for `rediss://` URLs: the PEM files of the config, read once, as the rustls
//! config of the bus's own connections and as the certificates of its redis-rs client.
//!
//! Both kinds of connection trust the same roots: the CA of `tls_ca_cert`, else the
//! system's (through `rustls-native-certs`, as redis-rs does with its `tls-rustls`
//! feature), so that a CA an operator installed on the host works on every connection.

use std::path::Path;
use std::sync::Arc;

use redis::{ClientTlsConfig, TlsCertificates};
use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsConnector;

use crate::config::EventBusConfig;
use crate::error::{Error, Result};

/// The TLS settings of a bus, for both kinds of connection it opens.
#[derive(Clone)]
pub(crate) struct Tls {
    /// For the connections that read and publish (see [`crate::broker::resp`]).
    pub(crate) connector: TlsConnector,
    /// The same PEM files, for the redis-rs client of every other command.
    pub(crate) certificates: TlsCertificates,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls").finish_non_exhaustive()
    }
}

impl Tls {
    /// Reads and checks the PEM files `config` names.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] naming the setting and the path of a file that is missing,
    /// unreadable or holds no certificate or key, a client certificate without its key
    /// (or the other way round), and a key that does not match its certificate.
    pub(crate) fn load(config: &EventBusConfig) -> Result<Tls> {
        let crypto = Arc::new(rustls::crypto::ring::default_provider());
        // redis-rs builds its rustls config with the process's default provider, which
        // is ambiguous when the application also enables another one; ring is installed
        // only when no default exists, so an application's own choice stands.
        if rustls::crypto::CryptoProvider::get_default().is_none() {
            let _ = rustls::crypto::ring::default_provider().install_default();
        }

        let (roots, root_pem) = match &config.tls_ca_cert {
            Some(path) => {
                let pem = read("tls_ca_cert", path)?;
                let mut roots = RootCertStore::empty();
                for cert in certificates("tls_ca_cert", path, &pem)? {
                    roots.add(cert).map_err(|e| {
                        invalid("tls_ca_cert", path, format!("is not a CA certificate: {e}"))
                    })?;
                }
                (roots, Some(pem))
            }
            None => (system_roots()?, None),
        };

        let builder = rustls::ClientConfig::builder_with_provider(crypto)
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::Internal {
                detail: format!("rustls refuses its own protocol versions: {e}"),
            })?
            .with_root_certificates(roots);
        let (client_config, client_tls) = match (&config.tls_client_cert, &config.tls_client_key) {
            (None, None) => (builder.with_no_client_auth(), None),
            (Some(_), None) => {
                return Err(Error::config(
                    "tls_client_key",
                    "must be set with tls_client_cert: a client certificate needs its key",
                ));
            }
            (None, Some(_)) => {
                return Err(Error::config(
                    "tls_client_cert",
                    "must be set with tls_client_key: a client key needs its certificate",
                ));
            }
            (Some(cert_path), Some(key_path)) => {
                let cert_pem = read("tls_client_cert", cert_path)?;
                let chain = certificates("tls_client_cert", cert_path, &cert_pem)?;
                let key_pem = read("tls_client_key", key_path)?;
                // The PEM parser's error names the PEM section, never the key's bytes.
                let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
                    invalid(
                        "tls_client_key",
                        key_path,
                        format!("holds no private key in PEM: {e}"),
                    )
                })?;
                let client_config = builder.with_client_auth_cert(chain, key).map_err(|e| {
                    invalid(
                        "tls_client_key",
                        key_path,
                        format!(
                            "is not a key rustls can use with the certificate of tls_client_cert: {e}"
                        ),
                    )
                })?;
                let client_tls = ClientTlsConfig {
                    client_cert: cert_pem,
                    client_key: key_pem,
                };
                (client_config, Some(client_tls))
            }
        };
        Ok(Tls {
            connector: TlsConnector::from(Arc::new(client_config)),
            certificates: TlsCertificates {
                client_tls,
                root_cert: root_pem,
            },
        })
    }
}

/// Fails naming the first TLS setting that is set, for a URL without TLS: the settings
/// would be ignored, and a server that wants TLS would not get it.
pub(crate) fn reject_without_tls(config: &EventBusConfig) -> Result<()> {
    let settings = [
        ("tls_ca_cert", &config.tls_ca_cert),
        ("tls_client_cert", &config.tls_client_cert),
        ("tls_client_key", &config.tls_client_key),
    ];
    match settings.into_iter().find(|(_, path)| path.is_some()) {
        Some((setting, _)) => Err(Error::config(
            setting,
            "is set, but the URL does not use TLS: write it rediss://",
        )),
        None => Ok(()),
    }
}

fn read(setting: &'static str, path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| invalid(setting, path, format!("cannot be read: {e}")))
}

fn certificates(
    setting: &'static str,
    path: &Path,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| invalid(setting, path, format!("is not valid PEM: {e}")))?;
    if certs.is_empty() {
        return Err(invalid(
            setting,
            path,
            "holds no PEM certificate".to_owned(),
        ));
    }
    Ok(certs)
}

fn invalid(setting: &'static str, path: &Path, reason: String) -> Error {
    Error::config(setting, format!("`{}` {reason}", path.display()))
}

/// The system's root certificates. A file among them that does not load fails the
/// build, as it fails every connection of redis-rs.
fn system_roots() -> Result<RootCertStore> {
    let loaded = rustls_native_certs::load_native_certs();
    if let Some(error) = loaded.errors.first() {
        return Err(Error::config(
            "tls_ca_cert",
            format!(
                "is not set, and the system's root certificates do not load ({error}): set it to the CA's PEM file"
            ),
        ));
    }
    let mut roots = RootCertStore::empty();
    let (_, ignored) = roots.add_parsable_certificates(loaded.certs);
    if ignored > 0 {
        tracing::debug!(
            ignored,
            "system root certificates rustls cannot use were skipped"
        );
    }
    if roots.is_empty() {
        return Err(Error::config(
            "tls_ca_cert",
            "is not set, and the system has no root certificates: set it to the CA's PEM file",
        ));
    }
    Ok(roots)
}
