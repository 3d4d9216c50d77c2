//! Client authorization (rend-spec-v3 section 2.5.1.2; tor(1), "CLIENT AUTHORIZATION"): the service's
//! descriptor is encrypted to a list of x25519 public keys, so only a client holding one of the private
//! keys can read where to connect. The key pair is made where the client's line is handed out (`meshctl`);
//! only the public half reaches the controller and the service's node.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use x25519_dalek::{PublicKey, StaticSecret};

use super::BASE32;
use super::onion::OnionAddress;

/// The most clients one service authorizes. tor encrypts the descriptor's inner layer to each client in an
/// `auth-client` line (about 70 bytes), pads their number to a multiple of 16, pads the layer to a multiple of
/// 10 000 bytes and refuses descriptors over 50 000 bytes after base64 (rend-spec-v3 sections 2.5.1.2 and
/// 2.5.2; tor's `HS_DESC_MAX_LEN`). With the default three introduction points and proof-of-work parameters,
/// 320 clients fit in a 30 000-byte layer with room to spare; more would make tor fail to publish.
pub const MAX_CLIENTS: usize = 320;

/// A client's x25519 private key; its `Debug` never shows the key.
#[derive(Clone)]
pub struct ClientKey(StaticSecret);

impl fmt::Debug for ClientKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ClientKey({})", self.public_key())
    }
}

impl ClientKey {
    /// A new random key.
    pub fn generate() -> ClientKey {
        ClientKey(StaticSecret::random())
    }

    /// The public half, which the service's node lists.
    pub fn public_key(&self) -> ClientPublicKey {
        ClientPublicKey(PublicKey::from(&self.0).to_bytes())
    }

    /// The line a client imports for the service at `address`: the contents of a tor client's
    /// `ClientOnionAuthDir/NAME.auth_private`, what Orbot and Tor Browser take:
    /// `<56 characters>:descriptor:x25519:<52 base32 characters of the private key>`.
    pub fn auth_private_line(&self, address: &OnionAddress) -> String {
        format!("{}:descriptor:x25519:{}", address.without_suffix(), BASE32.encode(&self.0.to_bytes()))
    }
}

/// A client's x25519 public key, as 52 upper-case base32 characters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ClientPublicKey([u8; 32]);

/// Text that is not a base32 x25519 public key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a client authorization key (expected 52 base32 characters encoding 32 bytes)")]
pub struct ClientKeyError;

impl ClientPublicKey {
    /// The contents of the service's `authorized_clients/NAME.auth`: `descriptor:x25519:<key>`.
    pub fn auth_line(&self) -> String {
        format!("descriptor:x25519:{self}\n")
    }
}

impl fmt::Display for ClientPublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&BASE32.encode(&self.0))
    }
}

impl FromStr for ClientPublicKey {
    type Err = ClientKeyError;
    fn from_str(s: &str) -> Result<ClientPublicKey, ClientKeyError> {
        let bytes = BASE32.decode(s.trim().to_ascii_uppercase().as_bytes()).map_err(|_| ClientKeyError)?;
        Ok(ClientPublicKey(bytes.try_into().map_err(|_| ClientKeyError)?))
    }
}

impl TryFrom<String> for ClientPublicKey {
    type Error = ClientKeyError;
    fn try_from(s: String) -> Result<ClientPublicKey, ClientKeyError> {
        s.parse()
    }
}

impl From<ClientPublicKey> for String {
    fn from(key: ClientPublicKey) -> String {
        key.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tor::onion::OnionKey;

    #[test]
    fn the_client_line_holds_the_address_and_the_private_key_the_public_one_belongs_to() {
        let key = ClientKey::generate();
        let address = OnionKey::from_seed([3; 32]).address();
        let line = key.auth_private_line(&address);
        let parts: Vec<&str> = line.split(':').collect();
        assert_eq!(parts.len(), 4, "{line}");
        assert_eq!((parts[0], parts[1], parts[2]), (address.without_suffix(), "descriptor", "x25519"));
        let secret: [u8; 32] = BASE32.decode(parts[3].as_bytes()).unwrap().try_into().unwrap();
        assert_eq!(ClientPublicKey(PublicKey::from(&StaticSecret::from(secret)).to_bytes()), key.public_key());
        assert!(!format!("{key:?}").contains(parts[3]), "Debug shows no private key");
        let public = key.public_key();
        assert_eq!(public.to_string().len(), 52);
        assert_eq!(public.auth_line(), format!("descriptor:x25519:{public}\n"));
        assert_eq!(public.to_string().to_lowercase().parse::<ClientPublicKey>(), Ok(public));
        assert_eq!("AAAA".parse::<ClientPublicKey>(), Err(ClientKeyError));
        assert_eq!(format!("{}1", public).parse::<ClientPublicKey>(), Err(ClientKeyError));
    }
}
