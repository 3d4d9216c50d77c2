//! WireGuard keys: x25519 key pairs and preshared keys, in the standard base64 form `wg` uses.

use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use x25519_dalek::{PublicKey, StaticSecret};

/// A key that is not 32 bytes of standard base64.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a WireGuard key (expected 44 characters of base64 encoding 32 bytes)")]
pub struct KeyError;

/// A private key; its `Debug` never shows the key.
#[derive(Clone)]
pub struct PrivateKey(StaticSecret);

impl PrivateKey {
    /// A new random private key.
    pub fn generate() -> PrivateKey {
        PrivateKey(StaticSecret::random())
    }

    /// Parse base64 (as written by `wg genkey`); surrounding whitespace is ignored.
    pub fn from_base64(text: &str) -> Result<PrivateKey, KeyError> {
        Ok(PrivateKey(StaticSecret::from(decode32(text)?)))
    }

    /// The key in base64, for a config file handed out once or a 0600 key file.
    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.0.to_bytes())
    }

    /// Lowercase hex, as WireGuard's UAPI wants it.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0.to_bytes())
    }

    /// The matching public key.
    pub fn public_key(&self) -> String {
        STANDARD.encode(PublicKey::from(&self.0).as_bytes())
    }
}

/// Two private keys are the same key when their public halves are.
impl PartialEq for PrivateKey {
    fn eq(&self, other: &PrivateKey) -> bool {
        self.public_key() == other.public_key()
    }
}

impl Eq for PrivateKey {}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PrivateKey(<redacted>)")
    }
}

/// A new random preshared key in base64.
pub fn generate_preshared_key() -> String {
    STANDARD.encode(rand::random::<[u8; 32]>())
}

/// Check that `text` is a base64 WireGuard key and return it normalised (trimmed).
pub fn parse_public_key(text: &str) -> Result<String, KeyError> {
    decode32(text).map(|bytes| STANDARD.encode(bytes))
}

/// Check that `text` is a base64 preshared key (32 bytes) and return it normalised.
pub fn parse_preshared_key(text: &str) -> Result<String, KeyError> {
    parse_public_key(text)
}

fn decode32(text: &str) -> Result<[u8; 32], KeyError> {
    let bytes = STANDARD.decode(text.trim()).map_err(|_| KeyError)?;
    bytes.try_into().map_err(|_| KeyError)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_wireguard_test_vector() {
        // RFC 7748 section 6.1 (Alice's key pair), the same curve `wg pubkey` uses.
        let private = hex32("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a");
        let public = hex32("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a");
        let key = PrivateKey::from_base64(&STANDARD.encode(private)).unwrap();
        assert_eq!(key.public_key(), STANDARD.encode(public));
    }

    #[test]
    fn round_trips_and_redacts() {
        let key = PrivateKey::generate();
        let again = PrivateKey::from_base64(&key.to_base64()).unwrap();
        assert_eq!(key.public_key(), again.public_key());
        assert_eq!(key.to_base64().len(), 44);
        assert!(!format!("{key:?}").contains(&key.to_base64()));
        assert_eq!(hex32(&key.to_hex()), key.0.to_bytes());
        assert_ne!(generate_preshared_key(), generate_preshared_key());
    }

    #[test]
    fn rejects_malformed_keys() {
        assert_eq!(parse_public_key("short"), Err(KeyError));
        assert_eq!(parse_public_key(&STANDARD.encode([0u8; 31])), Err(KeyError));
        assert!(parse_public_key(&format!(" {} \n", STANDARD.encode([7u8; 32]))).is_ok());
    }

    fn hex32(s: &str) -> [u8; 32] {
        let v: Vec<u8> = (0..32).map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap()).collect();
        v.try_into().unwrap()
    }
}
