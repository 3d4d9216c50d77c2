//! The certificates this host serves for public names, and the answers to the CA's validations of them: the
//! TLS-ALPN-01 certificate of a name being validated (RFC 8737) and the key authorizations of HTTP-01 tokens
//! (RFC 8555 section 8.3). The ACME worker (`super::acme`) fills it; the listeners read it at every handshake,
//! so a renewed certificate is served from the next connection on, without a restart.

use std::collections::HashMap;
use std::sync::{Arc, PoisonError, RwLock};

use rustls::crypto::ring::sign::any_supported_type;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{CipherSuite, ServerConfig};

use meshd_core::relay::route::ACME_TLS_ALPN;

/// Why a certificate and key could not be used.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// The chain held no certificate, or did not parse as PEM.
    #[error("the certificate chain is not PEM or holds no certificate")]
    Chain,
    /// The key did not parse as PEM, or is of a type rustls cannot sign with.
    #[error("the private key is not a PEM key rustls can sign with")]
    Key,
}

/// A certificate chain (PEM, leaf first) and its private key (PEM) as rustls serves them.
pub fn certified_key(chain_pem: &str, key_pem: &str) -> Result<CertifiedKey, CertError> {
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(chain_pem.as_bytes()).collect::<Result<_, _>>().map_err(|_| CertError::Chain)?;
    if chain.is_empty() {
        return Err(CertError::Chain);
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|_| CertError::Key)?;
    let key = any_supported_type(&key).map_err(|_| CertError::Key)?;
    Ok(CertifiedKey::new(chain, key))
}

/// What the TLS listeners serve, by server name (lowercase).
#[derive(Debug, Default)]
pub struct Certificates {
    served: RwLock<HashMap<String, Arc<CertifiedKey>>>,
    challenges: RwLock<HashMap<String, Arc<CertifiedKey>>>,
    tokens: RwLock<HashMap<String, String>>,
}

impl Certificates {
    /// Serve `key` for `name` from the next handshake on.
    pub fn serve(&self, name: &str, key: CertifiedKey) {
        self.served.write().unwrap_or_else(PoisonError::into_inner).insert(name.to_owned(), Arc::new(key));
    }

    /// Serve nothing for `name` any more.
    pub fn withdraw(&self, name: &str) {
        self.served.write().unwrap_or_else(PoisonError::into_inner).remove(name);
    }

    /// Answer TLS-ALPN-01 validations of `name` with `key` (`None`: stop answering).
    pub fn set_challenge(&self, name: &str, key: Option<CertifiedKey>) {
        let mut challenges = self.challenges.write().unwrap_or_else(PoisonError::into_inner);
        match key {
            Some(key) => challenges.insert(name.to_owned(), Arc::new(key)),
            None => challenges.remove(name),
        };
    }

    /// Answer HTTP-01 validations of `token` with `key_authorization` (`None`: stop answering).
    pub fn set_token(&self, token: &str, key_authorization: Option<String>) {
        let mut tokens = self.tokens.write().unwrap_or_else(PoisonError::into_inner);
        match key_authorization {
            Some(answer) => tokens.insert(token.to_owned(), answer),
            None => tokens.remove(token),
        };
    }

    /// The key authorization of an HTTP-01 `token` being validated.
    pub fn key_authorization(&self, token: &str) -> Option<String> {
        self.tokens.read().unwrap_or_else(PoisonError::into_inner).get(token).cloned()
    }

    /// The TLS configuration of served names: their certificates by SNI (read at every handshake, so a renewed
    /// one is served from the next), HTTP/2 and HTTP/1.1 by ALPN, and session tickets (RFC 8446 section 4.6.1,
    /// keys rotated every 6 hours by rustls's ticketer) so that clients resume instead of a full handshake. Made
    /// once per listener set: a configuration made per connection would resume nothing.
    ///
    /// Cipher suites: the server's order, AES-128-GCM with SHA-256 first (Go's crypto/tls, so Caddy, puts it first
    /// too), then rustls's order. Clients such as OpenSSL and rustls list AES-256-GCM with SHA-384 first; following
    /// them made the TLS 1.3 key schedule and transcript run on SHA-384, a tenth of a full handshake's CPU here
    /// (docs/PERFORMANCE.md), for no security a public web name needs. Unlike Go, a client that lists ChaCha20 first
    /// (one without AES instructions) gets AES-128-GCM too: all it costs is that client's record encryption.
    ///
    /// One session ticket per handshake, as Go's crypto/tls (so Caddy): a client spends one per connection and gets
    /// a new one from each resumed connection; rustls's default second ticket, encrypted and sent on every full
    /// handshake, only serves a client that opens a second connection before the first has come back.
    ///
    /// Errors: rustls finds the provider inconsistent (it is ring's own, reordered).
    pub fn server_config(self: &Arc<Self>) -> Result<Arc<ServerConfig>, rustls::Error> {
        let mut provider = rustls::crypto::ring::default_provider();
        provider.cipher_suites.sort_by_key(|suite| suite.suite() != CipherSuite::TLS13_AES_128_GCM_SHA256);
        let mut config = ServerConfig::builder_with_provider(Arc::new(provider))
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(ByName { certs: self.clone(), challenge: false }));
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        config.ignore_client_order = true;
        config.send_tls13_tickets = 1;
        match rustls::crypto::ring::Ticketer::new() {
            Ok(ticketer) => config.ticketer = ticketer,
            Err(e) => tracing::warn!(error = %e, "no session tickets: clients make a full handshake every time"),
        }
        Ok(Arc::new(config))
    }

    /// The TLS configuration of TLS-ALPN-01 validations: the challenge certificate by SNI, ALPN `acme-tls/1`
    /// only (RFC 8737 section 3). rustls's `with_single_cert` refuses such a certificate (its acmeIdentifier
    /// extension is critical), so it is served through a resolver.
    pub fn challenge_config(self: &Arc<Self>) -> Arc<ServerConfig> {
        let mut config = ServerConfig::builder()
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(ByName { certs: self.clone(), challenge: true }));
        config.alpn_protocols = vec![ACME_TLS_ALPN.to_vec()];
        Arc::new(config)
    }
}

/// Resolves the certificate of the ClientHello's server name: the served one, or (`challenge`) the TLS-ALPN-01 one.
#[derive(Debug)]
struct ByName {
    certs: Arc<Certificates>,
    challenge: bool,
}

impl ResolvesServerCert for ByName {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let name = hello.server_name()?.to_ascii_lowercase();
        let keys = if self.challenge { &self.certs.challenges } else { &self.certs.served };
        keys.read().unwrap_or_else(PoisonError::into_inner).get(&name).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chain_and_key_from_pem_are_served_and_garbage_is_refused() {
        let cert = rcgen::generate_simple_self_signed(vec!["pay.shop.example".into()]).unwrap();
        let (chain, key) = (cert.cert.pem(), cert.signing_key.serialize_pem());
        assert!(certified_key(&chain, &key).is_ok());
        assert!(matches!(certified_key("", &key), Err(CertError::Chain)));
        assert!(matches!(
            certified_key(&chain, "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"),
            Err(CertError::Key)
        ));
        let store = Certificates::default();
        store.set_token("tok", Some("tok.thumb".into()));
        assert_eq!(store.key_authorization("tok").as_deref(), Some("tok.thumb"));
        store.set_token("tok", None);
        assert_eq!(store.key_authorization("tok"), None);
    }

    /// A client that lists AES-256-GCM with SHA-384 first (rustls's and OpenSSL's default order) gets AES-128-GCM
    /// with SHA-256, the server's choice; one that offers only AES-256 still gets it.
    #[test]
    fn the_server_chooses_aes_128_gcm_whatever_the_clients_order() {
        use rustls::crypto::ring::cipher_suite::TLS13_AES_256_GCM_SHA384;
        use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConnection};

        let cert = rcgen::generate_simple_self_signed(vec!["pay.shop.example".into()]).unwrap();
        let store = Arc::new(Certificates::default());
        store.serve("pay.shop.example", certified_key(&cert.cert.pem(), &cert.signing_key.serialize_pem()).unwrap());
        let server_config = store.server_config().unwrap();
        let mut roots = RootCertStore::empty();
        roots.add(cert.cert.der().clone()).unwrap();
        let negotiated = |suites: Option<Vec<rustls::SupportedCipherSuite>>| {
            let mut provider = rustls::crypto::ring::default_provider();
            if let Some(suites) = suites {
                provider.cipher_suites = suites;
            }
            assert_eq!(provider.cipher_suites[0].suite(), CipherSuite::TLS13_AES_256_GCM_SHA384);
            let config = ClientConfig::builder_with_provider(Arc::new(provider))
                .with_protocol_versions(&[&rustls::version::TLS13])
                .unwrap()
                .with_root_certificates(roots.clone())
                .with_no_client_auth();
            let name = "pay.shop.example".try_into().unwrap();
            let mut client = ClientConnection::new(Arc::new(config), name).unwrap();
            let mut server = ServerConnection::new(server_config.clone()).unwrap();
            while client.is_handshaking() || server.is_handshaking() {
                let mut wire = Vec::new();
                client.write_tls(&mut wire).unwrap();
                server.read_tls(&mut wire.as_slice()).unwrap();
                server.process_new_packets().unwrap();
                wire.clear();
                server.write_tls(&mut wire).unwrap();
                client.read_tls(&mut wire.as_slice()).unwrap();
                client.process_new_packets().unwrap();
            }
            server.negotiated_cipher_suite().unwrap().suite()
        };
        assert_eq!(negotiated(None), CipherSuite::TLS13_AES_128_GCM_SHA256);
        assert_eq!(negotiated(Some(vec![TLS13_AES_256_GCM_SHA384])), CipherSuite::TLS13_AES_256_GCM_SHA384);
    }
}
