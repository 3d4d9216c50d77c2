//! Public names over HTTPS (`meshctl expose`), this host's part of them as its plan says
//! (`meshd_core::plan::public`): on the relay, the public HTTP and HTTPS listeners ([`listen`]); where TLS ends,
//! the certificates ([`certs`]) and the ACME client that obtains and renews them ([`acme`]), and the HTTP
//! proxy to the service over the mesh ([`forward`]); on a node with passthrough names, the terminator the relay
//! passes their TLS streams to.

#[cfg(feature = "relay")]
pub mod acme;
#[cfg(feature = "relay")]
pub mod certs;
#[cfg(feature = "relay")]
pub mod forward;
#[cfg(feature = "relay")]
pub mod listen;
#[cfg(feature = "relay")]
mod public;
#[cfg(not(feature = "relay"))]
#[path = "without.rs"]
mod public;

use std::path::PathBuf;

pub use public::Public;

/// Let's Encrypt's production directory: the default of `--acme-directory`.
pub const LETS_ENCRYPT: &str = "https://acme-v02.api.letsencrypt.org/directory";

/// How this host talks to its CA (`meshd run --acme-*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcmeOptions {
    /// The CA's directory URL.
    pub directory: String,
    /// A PEM file of an extra root to trust for the CA's own HTTPS (a test CA such as Pebble).
    pub ca_root: Option<PathBuf>,
    /// A contact address for the account (`mailto:` is added), for the CA's expiry and policy mail.
    pub contact: Option<String>,
}

/// The public ports and CA of `meshd run` (`--http-port`, `--https-port`, `--acme-*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicOptions {
    /// The relay's HTTP port: ACME HTTP-01 validations and redirects to HTTPS.
    pub http_port: u16,
    /// The relay's HTTPS port.
    pub https_port: u16,
    /// The CA.
    pub acme: AcmeOptions,
}
