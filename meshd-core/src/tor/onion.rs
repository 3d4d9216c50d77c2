//! An onion service's identity: an ed25519 key pair (rend-spec-v3 section 1.9, "the identity key"), kept in
//! the files the C tor reads from a `HiddenServiceDir`, and the address derived from its public half
//! (rend-spec-v3 section 6, "Encoding onion addresses"). The files hold the expanded secret key only (not
//! the seed), exactly as tor writes them, so another implementation that imports C tor keys (arti) keeps
//! the address.

use std::fmt;
use std::str::FromStr;

use curve25519_dalek::EdwardsPoint;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha512};
use sha3::Sha3_256;

use super::BASE32;

/// The secret key's file name in a `HiddenServiceDir`.
pub const SECRET_KEY_FILE: &str = "hs_ed25519_secret_key";
/// The public key's file name in a `HiddenServiceDir`.
pub const PUBLIC_KEY_FILE: &str = "hs_ed25519_public_key";
/// The file tor writes the address to, `<56 characters>.onion` and a newline.
pub const HOSTNAME_FILE: &str = "hostname";
/// The directory of the authorized clients' public keys, one `NAME.auth` file each.
pub const AUTHORIZED_CLIENTS_DIR: &str = "authorized_clients";

/// The secret key file's 32-byte header (tor's `crypto_format.c`, `crypto_write_tagged_contents_to_file`:
/// `== TAG: type0 ==`, NUL-padded to 32 bytes).
const SECRET_HEADER: &[u8] = b"== ed25519v1-secret: type0 ==";
/// The public key file's header, padded the same way.
const PUBLIC_HEADER: &[u8] = b"== ed25519v1-public: type0 ==";
const HEADER_LEN: usize = 32;
/// The onion address version this module makes (rend-spec-v3 section 6).
const VERSION: u8 = 3;

/// A secret key file that is not one tor wrote or would read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OnionKeyError {
    /// Not 96 bytes.
    #[error("an onion service secret key file is 96 bytes, this one is {0}")]
    Length(usize),
    /// Another header (another key type, or not a key file).
    #[error("not an ed25519 onion service secret key (the header is not \"== ed25519v1-secret: type0 ==\")")]
    Header,
    /// The scalar is not clamped as every ed25519 expanded key is.
    #[error("the secret key is damaged (its scalar is not a clamped ed25519 scalar)")]
    Scalar,
}

/// An onion service's expanded ed25519 secret key: a clamped scalar and the 32-byte nonce prefix (the two
/// halves of SHA-512 of a random seed, RFC 8032 section 5.1.5). Its `Debug` never shows the key.
#[derive(Clone, PartialEq, Eq)]
pub struct OnionKey([u8; 64]);

impl fmt::Debug for OnionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "OnionKey({})", self.address())
    }
}

impl OnionKey {
    /// A new random key.
    pub fn generate() -> OnionKey {
        OnionKey::from_seed(rand::random())
    }

    /// The key of the 32-byte ed25519 seed `seed` (RFC 8032 section 5.1.5: SHA-512, the first half clamped).
    pub fn from_seed(seed: [u8; 32]) -> OnionKey {
        let mut expanded: [u8; 64] = Sha512::digest(seed).into();
        expanded[0] &= 248;
        expanded[31] &= 127;
        expanded[31] |= 64;
        OnionKey(expanded)
    }

    /// Read the contents of a [`SECRET_KEY_FILE`]. Errors: [`OnionKeyError`].
    pub fn from_secret_file(bytes: &[u8]) -> Result<OnionKey, OnionKeyError> {
        if bytes.len() != HEADER_LEN + 64 {
            return Err(OnionKeyError::Length(bytes.len()));
        }
        if bytes[..HEADER_LEN] != header(SECRET_HEADER) {
            return Err(OnionKeyError::Header);
        }
        let mut expanded = [0u8; 64];
        expanded.copy_from_slice(&bytes[HEADER_LEN..]);
        if expanded[0] & 7 != 0 || expanded[31] & 192 != 64 {
            return Err(OnionKeyError::Scalar);
        }
        Ok(OnionKey(expanded))
    }

    /// The contents of its [`SECRET_KEY_FILE`]: the header and the 64-byte expanded key (96 bytes; 0600).
    pub fn secret_file(&self) -> Vec<u8> {
        [&header(SECRET_HEADER)[..], &self.0].concat()
    }

    /// The contents of its [`PUBLIC_KEY_FILE`]: the header and the 32-byte public key (64 bytes).
    pub fn public_file(&self) -> Vec<u8> {
        [&header(PUBLIC_HEADER)[..], &self.public_key()].concat()
    }

    /// The ed25519 public key: the clamped scalar times the base point, compressed (RFC 8032 section 5.1.5).
    pub fn public_key(&self) -> [u8; 32] {
        let mut scalar = [0u8; 32];
        scalar.copy_from_slice(&self.0[..32]);
        EdwardsPoint::mul_base_clamped(scalar).compress().to_bytes()
    }

    /// The service's address.
    pub fn address(&self) -> OnionAddress {
        OnionAddress::of(&self.public_key())
    }
}

fn header(tag: &[u8]) -> [u8; HEADER_LEN] {
    let mut padded = [0u8; HEADER_LEN];
    padded[..tag.len()].copy_from_slice(tag);
    padded
}

/// rend-spec-v3 section 6: `CHECKSUM = SHA3-256(".onion checksum" | PUBKEY | VERSION)[:2]`.
fn checksum(public_key: &[u8; 32]) -> [u8; 2] {
    let digest =
        Sha3_256::new().chain_update(b".onion checksum").chain_update(public_key).chain_update([VERSION]).finalize();
    [digest[0], digest[1]]
}

/// A version 3 onion address, `<56 lower-case base32 characters>.onion` (rend-spec-v3 section 6: the public
/// key, a 2-byte checksum and the version byte 3, in base32).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct OnionAddress(String);

/// Text that is not a version 3 onion address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a version 3 onion address (56 base32 characters and .onion, with a valid checksum)")]
pub struct OnionAddressError(String);

impl OnionAddress {
    /// The address of the service whose identity key is `public_key`.
    pub fn of(public_key: &[u8; 32]) -> OnionAddress {
        let bytes = [&public_key[..], &checksum(public_key), &[VERSION]].concat();
        OnionAddress(format!("{}.onion", BASE32.encode(&bytes).to_ascii_lowercase()))
    }

    /// The 56 characters before `.onion`: what a client's `.auth_private` line starts with.
    pub fn without_suffix(&self) -> &str {
        self.0.trim_end_matches(".onion")
    }

    /// The address as text, with `.onion`.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for OnionAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for OnionAddress {
    type Err = OnionAddressError;

    /// Parse `<56 characters>.onion` (either case; a trailing newline, as in a `hostname` file, is ignored).
    fn from_str(s: &str) -> Result<OnionAddress, OnionAddressError> {
        let bad = || OnionAddressError(s.to_owned());
        let lower = s.trim_end_matches('\n').to_ascii_lowercase();
        let name = lower.strip_suffix(".onion").ok_or_else(bad)?;
        if name.len() != 56 {
            return Err(bad());
        }
        let bytes = BASE32.decode(name.to_ascii_uppercase().as_bytes()).map_err(|_| bad())?;
        let public_key: [u8; 32] = bytes[..32].try_into().map_err(|_| bad())?;
        if bytes[32..] != [&checksum(&public_key)[..], &[VERSION]].concat()[..] {
            return Err(bad());
        }
        Ok(OnionAddress(lower))
    }
}

impl TryFrom<String> for OnionAddress {
    type Error = OnionAddressError;
    fn try_from(s: String) -> Result<OnionAddress, OnionAddressError> {
        s.parse()
    }
}

impl From<OnionAddress> for String {
    fn from(address: OnionAddress) -> String {
        address.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_files_round_trip_and_give_the_address_of_the_public_key() {
        let key = OnionKey::from_seed([7; 32]);
        let file = key.secret_file();
        assert_eq!(file.len(), 96);
        assert_eq!(&file[..29], SECRET_HEADER);
        assert!(file[29..32].iter().all(|&b| b == 0), "the header is NUL-padded to 32 bytes");
        assert_eq!(OnionKey::from_secret_file(&file).unwrap(), key);
        let public = key.public_file();
        assert_eq!((public.len(), &public[..29], &public[32..]), (64, PUBLIC_HEADER, &key.public_key()[..]));
        let address = key.address();
        assert_eq!(address.as_str().len(), 62);
        assert_eq!(address.as_str().parse::<OnionAddress>().unwrap(), address);
        assert_eq!(address.to_string().to_uppercase().parse::<OnionAddress>().unwrap(), address, "either case");
        assert_ne!(OnionKey::generate().address(), OnionKey::generate().address());
    }

    #[test]
    fn a_known_key_has_the_address_tor_gives_it() {
        // What Debian's tor (0.4.9.8 and 0.4.9.11) wrote as `hostname` for a secret key file of the all-zero
        // seed made by hand (SHA-512, clamped, behind the header); the end-to-end test
        // `meshd_keys_are_what_tor_reads` checks fresh keys against tor on every run.
        let key = OnionKey::from_seed([0; 32]);
        assert_eq!(key.address().as_str(), "hnvcppgow2sc2yvdvdicu3ynonsteflxdxrehjr2ybekdc2z3iu63yid.onion");
        let again = OnionKey::from_secret_file(&key.secret_file()).unwrap();
        assert_eq!(again.address(), key.address());
    }

    #[test]
    fn damaged_or_foreign_files_and_addresses_are_refused() {
        let file = OnionKey::from_seed([1; 32]).secret_file();
        assert_eq!(OnionKey::from_secret_file(&file[..95]), Err(OnionKeyError::Length(95)));
        let mut foreign = file.clone();
        foreign[..29].copy_from_slice(PUBLIC_HEADER);
        assert_eq!(OnionKey::from_secret_file(&foreign), Err(OnionKeyError::Header));
        let mut unclamped = file.clone();
        unclamped[32] |= 1;
        assert_eq!(OnionKey::from_secret_file(&unclamped), Err(OnionKeyError::Scalar));
        let address = OnionKey::from_seed([1; 32]).address().to_string();
        let mut flipped = address.clone().into_bytes();
        flipped[3] = if flipped[3] == b'a' { b'b' } else { b'a' };
        for bad in [String::from_utf8(flipped).unwrap(), address.replace(".onion", ".com"), "abc.onion".into()] {
            assert!(bad.parse::<OnionAddress>().is_err(), "{bad}");
        }
    }
}
