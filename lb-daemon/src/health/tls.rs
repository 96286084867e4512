//! TLS for `https` checks (rustls on ring): the system's trust store or a CA file, or,
//! opted out, no certificate verification at all (self-signed servers behind the
//! director; the handshake's signatures are still checked).

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading CA certificates from {path}: {reason}")]
    CaFile { path: PathBuf, reason: String },
    #[error("the system's trust store holds no usable certificate ({0})")]
    NoSystemRoots(String),
    #[error("TLS setup: {0}")]
    Rustls(#[from] rustls::Error),
}

/// How an `https` check trusts servers. Built when the config is loaded, so a bad CA file
/// is an error there, and a reload reads it again (a rotated CA takes effect).
#[derive(Clone)]
pub struct Tls {
    pub verify: bool,
    pub ca_file: Option<PathBuf>,
    pub config: Arc<ClientConfig>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls").field("verify", &self.verify).field("ca_file", &self.ca_file).finish()
    }
}

/// Two checks with the same settings are the same check (one probe per server).
impl PartialEq for Tls {
    fn eq(&self, other: &Self) -> bool {
        (self.verify, &self.ca_file) == (other.verify, &other.ca_file)
    }
}

impl Eq for Tls {}

impl std::hash::Hash for Tls {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        (self.verify, &self.ca_file).hash(state);
    }
}

/// The system's roots, read once per process (hundreds of certificates).
fn system_roots() -> Result<Arc<RootCertStore>, TlsError> {
    static ROOTS: OnceLock<Result<Arc<RootCertStore>, String>> = OnceLock::new();
    ROOTS
        .get_or_init(|| {
            let found = rustls_native_certs::load_native_certs();
            let mut store = RootCertStore::empty();
            let (added, _) = store.add_parsable_certificates(found.certs);
            if added == 0 {
                let why: Vec<String> = found.errors.iter().map(ToString::to_string).collect();
                return Err(if why.is_empty() { "none found".into() } else { why.join("; ") });
            }
            Ok(Arc::new(store))
        })
        .clone()
        .map_err(TlsError::NoSystemRoots)
}

fn file_roots(path: &Path) -> Result<Arc<RootCertStore>, TlsError> {
    let err = |reason: String| TlsError::CaFile { path: path.to_owned(), reason };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| err(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(e.to_string()))?;
    if certs.is_empty() {
        return Err(err("no PEM certificate in it".into()));
    }
    let mut store = RootCertStore::empty();
    for c in certs {
        store.add(c).map_err(|e| err(e.to_string()))?;
    }
    Ok(Arc::new(store))
}

impl Tls {
    pub fn new(verify: bool, ca_file: Option<PathBuf>) -> Result<Self, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let algorithms = provider.signature_verification_algorithms;
        let builder = ClientConfig::builder_with_provider(provider).with_safe_default_protocol_versions()?;
        let config = if verify {
            let roots = match &ca_file {
                Some(path) => file_roots(path)?,
                None => system_roots()?,
            };
            builder.with_root_certificates(roots).with_no_client_auth()
        } else {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AnyCertificate(algorithms)))
                .with_no_client_auth()
        };
        Ok(Tls { verify, ca_file, config: Arc::new(config) })
    }
}

/// Accepts any certificate (`tls_verify: false`), but still checks that the server holds
/// the key of the one it sent.
#[derive(Debug)]
struct AnyCertificate(WebPkiSupportedAlgorithms);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_schemes()
    }
}
