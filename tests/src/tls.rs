//! Certificates made by the test itself for a TLS `redis-server`: a CA, a server
//! certificate for `127.0.0.1` and `localhost`, a client certificate, and a second CA that
//! signed neither, all as PEM files in a temp dir.

use std::io;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

/// PEM files for a TLS server and its clients, removed on drop.
#[derive(Debug)]
pub struct TestCertificates {
    dir: tempfile::TempDir,
}

impl TestCertificates {
    /// Generates fresh certificates and writes them into a new temp dir.
    ///
    /// # Errors
    ///
    /// When a certificate cannot be made or a file cannot be written.
    pub fn generate() -> io::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("slim-bus-certs-")
            .tempdir()?;
        let ca = certificate_authority("slim-bus test CA")?;
        let other_ca = certificate_authority("another CA")?;
        let server = leaf(
            &ca,
            "redis-server",
            &["127.0.0.1", "localhost"],
            ExtendedKeyUsagePurpose::ServerAuth,
        )?;
        let client = leaf(&ca, "slim-bus", &[], ExtendedKeyUsagePurpose::ClientAuth)?;
        let stranger = leaf(
            &other_ca,
            "slim-bus",
            &[],
            ExtendedKeyUsagePurpose::ClientAuth,
        )?;
        let files = [
            ("ca.pem", ca.pem()),
            ("other-ca.pem", other_ca.pem()),
            ("server.pem", server.0),
            ("server.key", server.1),
            ("client.pem", client.0),
            ("client.key", client.1),
            ("stranger.pem", stranger.0),
            ("stranger.key", stranger.1),
        ];
        for (name, pem) in files {
            std::fs::write(dir.path().join(name), pem)?;
        }
        Ok(TestCertificates { dir })
    }

    /// The CA that signed the server and client certificates.
    pub fn ca(&self) -> PathBuf {
        self.path("ca.pem")
    }

    /// A CA that signed neither: trusting it instead fails verification.
    pub fn other_ca(&self) -> PathBuf {
        self.path("other-ca.pem")
    }

    /// The server's certificate, for `--tls-cert-file`.
    pub fn server_cert(&self) -> PathBuf {
        self.path("server.pem")
    }

    /// The server's key, for `--tls-key-file`.
    pub fn server_key(&self) -> PathBuf {
        self.path("server.key")
    }

    /// A client certificate the server accepts (signed by [`ca`](Self::ca)).
    pub fn client_cert(&self) -> PathBuf {
        self.path("client.pem")
    }

    /// The key of [`client_cert`](Self::client_cert).
    pub fn client_key(&self) -> PathBuf {
        self.path("client.key")
    }

    /// A client certificate signed by [`other_ca`](Self::other_ca), which the server
    /// rejects.
    pub fn stranger_cert(&self) -> PathBuf {
        self.path("stranger.pem")
    }

    /// The key of [`stranger_cert`](Self::stranger_cert).
    pub fn stranger_key(&self) -> PathBuf {
        self.path("stranger.key")
    }

    /// The dir holding the files.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

fn certificate_authority(name: &str) -> io::Result<CertifiedIssuer<'static, KeyPair>> {
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(other)?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    CertifiedIssuer::self_signed(params, KeyPair::generate().map_err(other)?).map_err(other)
}

/// A certificate and its key, both PEM, signed by `issuer`.
fn leaf(
    issuer: &CertifiedIssuer<'static, KeyPair>,
    name: &str,
    names: &[&str],
    usage: ExtendedKeyUsagePurpose,
) -> io::Result<(String, String)> {
    let names: Vec<String> = names.iter().map(|name| (*name).to_owned()).collect();
    let mut params = CertificateParams::new(names).map_err(other)?;
    params.distinguished_name.push(DnType::CommonName, name);
    params.extended_key_usages = vec![usage];
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    let key = KeyPair::generate().map_err(other)?;
    let cert = params.signed_by(&key, issuer).map_err(other)?;
    Ok((cert.pem(), key.serialize_pem()))
}

fn other(error: rcgen::Error) -> io::Error {
    io::Error::other(format!("cannot make a test certificate: {error}"))
}
