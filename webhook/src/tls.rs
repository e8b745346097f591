//! The serving certificate, swappable while the server runs: the controller
//! rotates it in a Secret, and new handshakes pick up the new one without a
//! restart or a dropped connection.

use std::fmt;
use std::sync::{Arc, RwLock};

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::Error;

#[derive(Default)]
pub struct CertStore {
    current: RwLock<Option<(Arc<CertifiedKey>, Vec<u8>)>>,
}

impl fmt::Debug for CertStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertStore")
            .field("loaded", &self.is_loaded())
            .finish()
    }
}

impl CertStore {
    pub fn is_loaded(&self) -> bool {
        self.current.read().expect("not poisoned").is_some()
    }

    /// Installs a PEM chain and key; true if it differs from what was served.
    pub fn set_pem(&self, cert_pem: &[u8], key_pem: &[u8]) -> Result<bool, Error> {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
            .collect::<Result<_, _>>()
            .map_err(|e| Error::Certificate(format!("tls.crt is not PEM certificates: {e}")))?;
        if certs.is_empty() {
            return Err(Error::Certificate("tls.crt holds no certificate".into()));
        }
        let key = PrivateKeyDer::from_pem_slice(key_pem)
            .map_err(|e| Error::Certificate(format!("tls.key is not a PEM private key: {e}")))?;
        let signer = rustls::crypto::ring::sign::any_supported_type(&key)
            .map_err(|e| Error::Certificate(format!("tls.key is not a usable key: {e}")))?;
        let ck = CertifiedKey::new(certs, signer);
        let mut cur = self.current.write().expect("not poisoned");
        if cur.as_ref().is_some_and(|(_, pem)| pem == cert_pem) {
            return Ok(false);
        }
        *cur = Some((Arc::new(ck), cert_pem.to_vec()));
        Ok(true)
    }

    pub fn server_config(self: &Arc<Self>) -> rustls::ServerConfig {
        let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("ring supports the default versions")
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(Resolver(self.clone())));
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        cfg
    }
}

#[derive(Debug)]
struct Resolver(Arc<CertStore>);

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0
            .current
            .read()
            .expect("not poisoned")
            .as_ref()
            .map(|(k, _)| k.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pem() -> (String, String) {
        let c = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        (c.cert.pem(), c.signing_key.serialize_pem())
    }

    #[test]
    fn swaps_only_on_change_and_names_bad_input() {
        let s = CertStore::default();
        assert!(!s.is_loaded());
        let (c, k) = pem();
        assert!(s.set_pem(c.as_bytes(), k.as_bytes()).unwrap());
        assert!(!s.set_pem(c.as_bytes(), k.as_bytes()).unwrap());
        let (c2, k2) = pem();
        assert!(s.set_pem(c2.as_bytes(), k2.as_bytes()).unwrap());
        let e = s.set_pem(b"junk", k.as_bytes()).unwrap_err().to_string();
        assert!(e.contains("tls.crt"), "{e}");
        let e = s.set_pem(c.as_bytes(), b"junk").unwrap_err().to_string();
        assert!(e.contains("tls.key"), "{e}");
        assert!(s.is_loaded());
    }
}
