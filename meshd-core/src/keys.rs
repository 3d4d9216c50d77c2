//! WireGuard keys (the WireGuard paper, section 5.4: Curve25519 key pairs and 32-byte preshared keys),
//! in the standard base64 form `wg` uses: 44 characters for 32 bytes. Public and preshared keys are types
//! of their own, so a key cannot be mixed up with a name, and a preshared key never shows in a log.

use std::fmt;
use std::str::FromStr;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Serialize};
use x25519_dalek::StaticSecret;

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
    pub fn public_key(&self) -> PublicKey {
        PublicKey(STANDARD.encode(x25519_dalek::PublicKey::from(&self.0).as_bytes()))
    }

    /// The X25519 shared secret with `peer` (RFC 7748, section 6.1); `None` when `peer` is a low-order
    /// point, whose result (all zeros) anyone could compute.
    pub fn agree(&self, peer: &PublicKey) -> Option<[u8; 32]> {
        let peer = x25519_dalek::PublicKey::from(decode32(peer.as_str()).ok()?);
        let shared = self.0.diffie_hellman(&peer);
        shared.was_contributory().then(|| shared.to_bytes())
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

/// A WireGuard public key, in base64 (always valid: made by [`PublicKey::parse`] or from a private key).
/// It is serialised as its base64 text, and checked when read back.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PublicKey(String);

impl PublicKey {
    /// Parse base64 encoding 32 bytes (surrounding whitespace ignored), normalised.
    pub fn parse(text: &str) -> Result<PublicKey, KeyError> {
        decode32(text).map(|bytes| PublicKey(STANDARD.encode(bytes)))
    }

    /// The key in base64.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.0)
    }
}

impl FromStr for PublicKey {
    type Err = KeyError;

    fn from_str(text: &str) -> Result<PublicKey, KeyError> {
        PublicKey::parse(text)
    }
}

impl TryFrom<String> for PublicKey {
    type Error = KeyError;

    fn try_from(text: String) -> Result<PublicKey, KeyError> {
        PublicKey::parse(&text)
    }
}

impl From<PublicKey> for String {
    fn from(key: PublicKey) -> String {
        key.0
    }
}

/// A WireGuard preshared key (32 random bytes, mixed into the handshake), in base64. Its `Debug` never
/// shows the key; it is serialised as its base64 text (the database and hand-outs hold it), and checked
/// when read back.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PresharedKey(String);

impl PresharedKey {
    /// A new random preshared key.
    pub fn generate() -> PresharedKey {
        PresharedKey(STANDARD.encode(rand::random::<[u8; 32]>()))
    }

    /// Parse base64 encoding 32 bytes (surrounding whitespace ignored), normalised.
    pub fn parse(text: &str) -> Result<PresharedKey, KeyError> {
        decode32(text).map(|bytes| PresharedKey(STANDARD.encode(bytes)))
    }

    /// The key in base64, for a config handed out once or the 0600 database.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for PresharedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PresharedKey(<redacted>)")
    }
}

impl FromStr for PresharedKey {
    type Err = KeyError;

    fn from_str(text: &str) -> Result<PresharedKey, KeyError> {
        PresharedKey::parse(text)
    }
}

impl TryFrom<String> for PresharedKey {
    type Error = KeyError;

    fn try_from(text: String) -> Result<PresharedKey, KeyError> {
        PresharedKey::parse(&text)
    }
}

impl From<PresharedKey> for String {
    fn from(key: PresharedKey) -> String {
        key.0
    }
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
        assert_eq!(key.public_key().as_str(), STANDARD.encode(public));
    }

    #[test]
    fn round_trips_and_redacts() {
        let key = PrivateKey::generate();
        let again = PrivateKey::from_base64(&key.to_base64()).unwrap();
        assert_eq!(key.public_key(), again.public_key());
        assert_eq!(key.to_base64().len(), 44);
        assert!(!format!("{key:?}").contains(&key.to_base64()));
        assert_eq!(hex32(&key.to_hex()), key.0.to_bytes());
        let psk = PresharedKey::generate();
        assert_ne!(psk, PresharedKey::generate());
        assert_eq!(PresharedKey::parse(psk.as_str()), Ok(psk.clone()));
        assert!(!format!("{psk:?}").contains(psk.as_str()), "a preshared key never shows in Debug");
    }

    #[test]
    fn rejects_malformed_keys() {
        assert_eq!(PublicKey::parse("short"), Err(KeyError));
        assert_eq!(PublicKey::parse(&STANDARD.encode([0u8; 31])), Err(KeyError));
        assert_eq!(PresharedKey::parse("short"), Err(KeyError));
        let padded = PublicKey::parse(&format!(" {} \n", STANDARD.encode([7u8; 32]))).unwrap();
        assert_eq!(padded.as_str(), STANDARD.encode([7u8; 32]), "normalised");
        // Read back checked: a damaged cache or message cannot carry a bad key in.
        assert!(serde_json::from_str::<PublicKey>("\"KEY1\"").is_err());
        assert_eq!(serde_json::from_value::<PublicKey>(serde_json::to_value(&padded).unwrap()).unwrap(), padded);
    }

    fn hex32(s: &str) -> [u8; 32] {
        let v: Vec<u8> = (0..32).map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap()).collect();
        v.try_into().unwrap()
    }
}
