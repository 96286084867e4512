//! TLS for `https` checks (rustls on ring): the system's trust store or a CA file, or,
//! opted out, no certificate verification at all (self-signed servers behind the
//! director; the handshake's signatures are still checked).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use super::spec::TlsSpec;
use crate::config::{Config, ConfigError};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading CA certificates from {path}: {reason}")]
    CaFile { path: PathBuf, reason: String },
    #[error("the system's trust store holds no usable certificate ({0})")]
    NoSystemRoots(String),
    #[error("TLS setup: {0}")]
    Rustls(#[from] rustls::Error),
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

/// Builds the client configuration of `spec`, reading its CA file (or the system's
/// roots) now.
pub fn build(spec: &TlsSpec) -> Result<Arc<ClientConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let algorithms = provider.signature_verification_algorithms;
    let builder = ClientConfig::builder_with_provider(provider).with_safe_default_protocol_versions()?;
    let config = if spec.verify {
        let roots = match &spec.ca_file {
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
    Ok(Arc::new(config))
}

/// Client configurations by spec: built by [`prepare`] when a config is loaded, so that
/// checks share one per spec and a handshake never reads a file.
fn cache() -> &'static Mutex<HashMap<TlsSpec, Arc<ClientConfig>>> {
    static CACHE: OnceLock<Mutex<HashMap<TlsSpec, Arc<ClientConfig>>>> = OnceLock::new();
    CACHE.get_or_init(Default::default)
}

/// Builds the TLS settings of every `https` check of `config` afresh (a rotated CA file is
/// read again) and, only if all of them build, makes them the ones checks use. Errors name
/// the check's place in the file, as the config's own errors do.
pub fn prepare(config: &Config) -> Result<(), ConfigError> {
    let mut built: HashMap<TlsSpec, Result<Arc<ClientConfig>, String>> = HashMap::new();
    let mut errors = Vec::new();
    for source in &config.tls_sources {
        let result = built
            .entry(source.spec.clone())
            .or_insert_with(|| build(&source.spec).map_err(|e| e.to_string()));
        if let Err(message) = result {
            errors.push(source.at.error(message.clone()));
        }
    }
    if !errors.is_empty() {
        return Err(ConfigError::from_many(errors));
    }
    let mut cache = cache().lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    cache.extend(built.into_iter().filter_map(|(spec, r)| Some((spec, r.ok()?))));
    Ok(())
}

/// The configuration of `spec`: prepared, or built now (a check made without a config).
pub fn client_config(spec: &TlsSpec) -> Result<Arc<ClientConfig>, TlsError> {
    if let Some(config) = cache().lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(spec) {
        return Ok(config.clone());
    }
    let config = build(spec)?;
    cache().lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(spec.clone(), config.clone());
    Ok(config)
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
