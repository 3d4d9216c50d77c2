//! Invites: the one-time token a new host redeems to join the network, and its parts.
//!
//! A token is `meshd-invite:` followed by base64url JSON carrying what the joining host needs to find
//! and authenticate the controller (its join address and the SHA-256 fingerprint of its TLS
//! certificate), the network's IPv4 range (so the joining host can refuse a range it already routes
//! before it spends the token) and the invite's id and 128-bit secret. The controller stores only a
//! hash of the secret. Tokens from before the range was carried still read (without it).

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::input::HostPort;

const PREFIX: &str = "meshd-invite:";

/// Default lifetime of an invite.
pub const DEFAULT_EXPIRY: Duration = Duration::from_secs(3600);

/// Longest lifetime an invite may be given.
pub const MAX_EXPIRY: Duration = Duration::from_secs(30 * 24 * 3600);

/// A token that cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Not `meshd-invite:` and base64url JSON of a token with hex id, secret and fingerprint.
    #[error("not a meshd invite token (it starts with \"meshd-invite:\"; was it cut when copied?)")]
    Malformed,
    /// A token format version this meshd does not know (it knows 1).
    #[error("this invite token comes from a newer meshd (version {0})")]
    Version(u32),
}

/// An invite token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Token {
    /// Format version.
    pub v: u32,
    /// Name of the network, for messages.
    pub network: String,
    /// Where the controller's join service listens (TCP).
    pub join: HostPort,
    /// The network's IPv4 range; absent in tokens of a controller from before it was carried.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cidr: Option<Ipv4Net>,
    /// Lowercase hex SHA-256 of the controller's join certificate.
    pub fingerprint: String,
    /// Invite id (hex).
    pub id: String,
    /// The secret (hex, 128 bits).
    pub secret: InviteSecret,
}

/// An invite's secret: 128 random bits as 32 lowercase hex digits. Its `Debug` never shows it (a token
/// or a join request logged at debug level must not hand out the invite).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct InviteSecret(String);

impl InviteSecret {
    /// A new random secret.
    pub fn generate() -> InviteSecret {
        InviteSecret(hex::encode(rand::random::<[u8; 16]>()))
    }

    /// The secret as hex, for the token's text form and for hashing.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for InviteSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("InviteSecret(<redacted>)")
    }
}

impl std::str::FromStr for InviteSecret {
    type Err = TokenError;

    /// 32 hex digits; anything else is [`TokenError::Malformed`].
    fn from_str(text: &str) -> Result<InviteSecret, TokenError> {
        match is_hex(text, 32) {
            true => Ok(InviteSecret(text.to_owned())),
            false => Err(TokenError::Malformed),
        }
    }
}

/// `text` is `len` hex digits.
fn is_hex(text: &str, len: usize) -> bool {
    text.len() == len && text.bytes().all(|b| b.is_ascii_hexdigit())
}

impl Token {
    /// The one-line text form.
    pub fn encode(&self) -> String {
        let json = serde_json::to_vec(self).expect("a token always serialises");
        format!("{PREFIX}{}", URL_SAFE_NO_PAD.encode(json))
    }

    /// Read a token, tolerating surrounding whitespace.
    pub fn decode(text: &str) -> Result<Token, TokenError> {
        let body = text.trim().strip_prefix(PREFIX).ok_or(TokenError::Malformed)?;
        let json = URL_SAFE_NO_PAD.decode(body).map_err(|_| TokenError::Malformed)?;
        let token: Token = serde_json::from_slice(&json).map_err(|_| TokenError::Malformed)?;
        if token.v != 1 {
            return Err(TokenError::Version(token.v));
        }
        if !is_hex(&token.id, 32) || !is_hex(token.secret.as_str(), 32) || !is_hex(&token.fingerprint, 64) {
            return Err(TokenError::Malformed);
        }
        Ok(token)
    }
}

/// A new random invite id and secret, 128 bits each, as hex.
pub fn new_id_and_secret() -> (String, InviteSecret) {
    (hex::encode(rand::random::<[u8; 16]>()), InviteSecret::generate())
}

/// What the controller stores of a secret.
pub fn hash_secret(secret: &InviteSecret) -> String {
    hex::encode(Sha256::digest(secret.0.as_bytes()))
}

/// Compare two hashes without an early exit, so timing does not tell how much of a guess was right.
pub fn hashes_equal(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A lifetime such as `90s`, `30m`, `1h` or `2d`; at least a second, at most [`MAX_EXPIRY`].
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let bad = || format!("{text:?} is not a duration such as 90s, 30m, 1h or 2d (at most 30d)");
    let split = text.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().map_err(|_| bad())?;
    let unit_secs = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(bad()),
    };
    let duration = Duration::from_secs(number.checked_mul(unit_secs).ok_or_else(bad)?);
    if duration.is_zero() || duration > MAX_EXPIRY {
        return Err(bad());
    }
    Ok(duration)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token() -> Token {
        let (id, secret) = new_id_and_secret();
        Token {
            v: 1,
            network: "home".into(),
            join: "hub.example.net:51820".parse().unwrap(),
            cidr: Some("10.77.0.0/16".parse().unwrap()),
            fingerprint: "ab".repeat(32),
            id,
            secret,
        }
    }

    #[test]
    fn tokens_round_trip_as_one_line() {
        let t = token();
        let text = t.encode();
        assert!(text.starts_with("meshd-invite:") && !text.contains(char::is_whitespace), "{text}");
        assert_eq!(Token::decode(&format!("  {text}\n")).unwrap(), t);
        assert_eq!(t.secret.as_str().len(), 32, "128 bits of secret");
        assert!(!format!("{t:?}").contains(t.secret.as_str()), "a token's Debug never shows its secret");
    }

    #[test]
    fn tokens_without_the_network_range_still_read() {
        let mut old = token();
        old.cidr = None;
        let text = old.encode();
        let json = URL_SAFE_NO_PAD.decode(text.strip_prefix(PREFIX).unwrap()).unwrap();
        assert!(!String::from_utf8(json).unwrap().contains("cidr"), "written as an older controller wrote it");
        assert_eq!(Token::decode(&text), Ok(old));
    }

    #[test]
    fn damaged_tokens_are_refused() {
        let text = token().encode();
        assert_eq!(Token::decode(&text[..text.len() - 5]), Err(TokenError::Malformed));
        assert_eq!(Token::decode(&text.replace("meshd-invite:", "")), Err(TokenError::Malformed));
        assert_eq!(Token::decode("meshd-invite:!!!"), Err(TokenError::Malformed));
        let mut short = token();
        short.secret = InviteSecret(short.secret.as_str()[..8].to_owned());
        assert_eq!(Token::decode(&short.encode()), Err(TokenError::Malformed));
        let mut newer = token();
        newer.v = 2;
        assert_eq!(Token::decode(&newer.encode()), Err(TokenError::Version(2)));
    }

    #[test]
    fn secrets_are_random_and_hashed() {
        let (id1, s1) = new_id_and_secret();
        let (id2, s2) = new_id_and_secret();
        assert_ne!((id1, &s1), (id2, &s2));
        assert_eq!(hash_secret(&s1).len(), 64);
        assert!(hashes_equal(&hash_secret(&s1), &hash_secret(&s1)));
        assert!(!hashes_equal(&hash_secret(&s1), &hash_secret(&s2)));
        assert_eq!("0".repeat(32).parse::<InviteSecret>().map(|s| s.as_str().len()), Ok(32));
        assert!("xyz".parse::<InviteSecret>().is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("30m"), Ok(Duration::from_secs(1800)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("2d"), Ok(Duration::from_secs(172_800)));
        for bad in ["", "h", "10", "0s", "1w", "-5m", "31d", "99999999999999999999s", "1.5h"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}
