//! How a member host proves to the controller that it is the node it claims to be, and the hub proves
//! it is the hub: by its WireGuard private key, which only meshd on that host holds. The source address
//! of a connection proves nothing more than that it came through the host's tunnel: any process on the
//! host (an unprivileged user's too) can send through it.
//!
//! **Sync sessions** open with a mutual handshake over the connection, before anything else is sent:
//!
//! 1. hub → member: [`Challenge`], a fresh X25519 public key `E_h` made for this connection;
//! 2. member → hub: [`MemberProof`], its static public key `S_m`, a fresh key `E_m`, and a proof;
//! 3. hub → member: [`HubAnswer::Proven`] with the hub's proof, or [`HubAnswer::Refused`]; the state
//!    follows only after the hub's proof.
//!
//! Both ends compute three X25519 agreements, `es = DH(E_h, S_m)`, `se = DH(S_h, E_m)` and
//! `ee = DH(E_h, E_m)` (from their own private halves), and from them and the four public keys a
//! session key `k = HMAC-SHA256("meshd sync auth v1", S_h ‖ S_m ‖ E_h ‖ E_m ‖ es ‖ se ‖ ee)`. The member's
//! proof is `HMAC-SHA256(k, "member")`, the hub's `HMAC-SHA256(k, "hub")`. Only the holder of the member's
//! private key computes `es`, only the hub's `se`; the fresh keys make a recorded proof worthless on
//! another connection. (This is the pattern of Noise's KK handshake, reduced to authentication: the
//! stream itself is already encrypted by WireGuard.)
//!
//! **Standing questions** travel over TLS to the join service, pinned to its certificate: the member
//! proves each key it asks about with `HMAC-SHA256(DH(S_m, S_h)-derived key, binding)`, where the
//! binding is keying material exported from that TLS session (RFC 5705), fresh per connection.

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::keys::{PrivateKey, PublicKey};

type HmacSha256 = Hmac<Sha256>;

/// Label of the TLS keying material (RFC 5705) that binds a standing proof to its connection.
pub const STANDING_EXPORTER_LABEL: &[u8] = b"EXPORTER-meshd-standing";

/// The hub's first line on a sync connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Challenge {
    /// The hub's key for this connection only.
    pub challenge: PublicKey,
}

/// The member's first line: who it is and its proof.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberProof {
    /// The member's WireGuard public key (the one its interface uses).
    pub public_key: PublicKey,
    /// The member's key for this connection only.
    pub ephemeral: PublicKey,
    /// Lowercase hex HMAC-SHA256 (64 characters).
    pub proof: String,
}

/// The hub's answer to a [`MemberProof`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "msg", rename_all = "snake_case")]
pub enum HubAnswer {
    /// The member is who it says; this is the hub's own proof.
    Proven {
        /// Lowercase hex HMAC-SHA256.
        proof: String,
    },
    /// Not proven; the connection ends.
    Refused {
        /// Why, in one line.
        reason: String,
    },
}

/// Why a handshake failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// A public key in the handshake is a low-order point (no secret agreement is possible with it).
    #[error("a key of the handshake is not usable (a low-order point)")]
    WeakKey,
    /// The proof does not match.
    #[error("the proof does not match the key")]
    BadProof,
}

/// The session key of one sync handshake; both ends compute the same one.
pub struct Handshake {
    key: [u8; 32],
}

impl Handshake {
    /// The member's side: its static key `own`, its fresh key `ephemeral`, the hub's static key `hub`
    /// and the hub's [`Challenge`].
    pub fn member(
        own: &PrivateKey,
        ephemeral: &PrivateKey,
        hub: &PublicKey,
        challenge: &PublicKey,
    ) -> Result<Handshake, AuthError> {
        let es = own.agree(challenge).ok_or(AuthError::WeakKey)?;
        let se = ephemeral.agree(hub).ok_or(AuthError::WeakKey)?;
        let ee = ephemeral.agree(challenge).ok_or(AuthError::WeakKey)?;
        Ok(Handshake::derive([hub, &own.public_key(), challenge, &ephemeral.public_key()], [es, se, ee]))
    }

    /// The hub's side: its static key `own`, its fresh key `challenge` (sent in the [`Challenge`]), and
    /// the member's static and fresh public keys from its [`MemberProof`].
    pub fn hub(
        own: &PrivateKey,
        challenge: &PrivateKey,
        member: &PublicKey,
        ephemeral: &PublicKey,
    ) -> Result<Handshake, AuthError> {
        let es = challenge.agree(member).ok_or(AuthError::WeakKey)?;
        let se = own.agree(ephemeral).ok_or(AuthError::WeakKey)?;
        let ee = challenge.agree(ephemeral).ok_or(AuthError::WeakKey)?;
        Ok(Handshake::derive([&own.public_key(), member, &challenge.public_key(), ephemeral], [es, se, ee]))
    }

    fn derive(keys: [&PublicKey; 4], agreements: [[u8; 32]; 3]) -> Handshake {
        let mut mac = HmacSha256::new_from_slice(b"meshd sync auth v1").expect("HMAC takes any key length");
        for key in keys {
            mac.update(key.as_str().as_bytes());
        }
        for agreement in &agreements {
            mac.update(agreement);
        }
        Handshake { key: mac.finalize().into_bytes().into() }
    }

    /// The member's proof.
    pub fn member_proof(&self) -> String {
        self.proof(b"member")
    }

    /// The hub's proof.
    pub fn hub_proof(&self) -> String {
        self.proof(b"hub")
    }

    /// Check the member's proof (in constant time).
    pub fn verify_member(&self, proof: &str) -> Result<(), AuthError> {
        self.verify(b"member", proof)
    }

    /// Check the hub's proof (in constant time).
    pub fn verify_hub(&self, proof: &str) -> Result<(), AuthError> {
        self.verify(b"hub", proof)
    }

    fn mac(&self, side: &[u8]) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(&self.key).expect("HMAC takes any key length");
        mac.update(side);
        mac
    }

    fn proof(&self, side: &[u8]) -> String {
        hex::encode(self.mac(side).finalize().into_bytes())
    }

    fn verify(&self, side: &[u8], proof: &str) -> Result<(), AuthError> {
        let bytes = hex::decode(proof).map_err(|_| AuthError::BadProof)?;
        self.mac(side).verify_slice(&bytes).map_err(|_| AuthError::BadProof)
    }
}

/// A member's proof that it holds the private key of the key it asks the standing of: made with its
/// private key `own` and the hub's public key `hub`, bound to the TLS session by `binding` (keying material
/// exported with [`STANDING_EXPORTER_LABEL`]). Lowercase hex.
pub fn standing_proof(own: &PrivateKey, hub: &PublicKey, binding: &[u8]) -> Result<String, AuthError> {
    let mac = standing_mac(own, hub, &own.public_key(), hub, binding)?;
    Ok(hex::encode(mac.finalize().into_bytes()))
}

/// Check a [`standing_proof`] for `member` at the hub (private key `own`).
pub fn verify_standing(own: &PrivateKey, member: &PublicKey, binding: &[u8], proof: &str) -> Result<(), AuthError> {
    let mac = standing_mac(own, member, member, &own.public_key(), binding)?;
    let bytes = hex::decode(proof).map_err(|_| AuthError::BadProof)?;
    mac.verify_slice(&bytes).map_err(|_| AuthError::BadProof)
}

fn standing_mac(
    own: &PrivateKey,
    peer: &PublicKey,
    member: &PublicKey,
    hub: &PublicKey,
    binding: &[u8],
) -> Result<HmacSha256, AuthError> {
    let shared = own.agree(peer).ok_or(AuthError::WeakKey)?;
    let mut kdf = HmacSha256::new_from_slice(b"meshd standing v1").expect("HMAC takes any key length");
    kdf.update(hub.as_str().as_bytes());
    kdf.update(member.as_str().as_bytes());
    kdf.update(&shared);
    let key = kdf.finalize().into_bytes();
    let mut mac = HmacSha256::new_from_slice(&key).expect("HMAC takes any key length");
    mac.update(binding);
    Ok(mac)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Ends {
        hub: PrivateKey,
        member: PrivateKey,
        challenge: PrivateKey,
        ephemeral: PrivateKey,
    }

    fn ends() -> Ends {
        Ends {
            hub: PrivateKey::generate(),
            member: PrivateKey::generate(),
            challenge: PrivateKey::generate(),
            ephemeral: PrivateKey::generate(),
        }
    }

    fn member_side(e: &Ends) -> Handshake {
        Handshake::member(&e.member, &e.ephemeral, &e.hub.public_key(), &e.challenge.public_key()).unwrap()
    }

    fn hub_side(e: &Ends, member: &PublicKey) -> Handshake {
        Handshake::hub(&e.hub, &e.challenge, member, &e.ephemeral.public_key()).unwrap()
    }

    #[test]
    fn both_ends_prove_themselves_to_each_other() {
        let e = ends();
        let (m, h) = (member_side(&e), hub_side(&e, &e.member.public_key()));
        assert_eq!(h.verify_member(&m.member_proof()), Ok(()));
        assert_eq!(m.verify_hub(&h.hub_proof()), Ok(()));
        assert_ne!(m.member_proof(), m.hub_proof(), "one end's proof is not the other's");
        assert_eq!(m.member_proof().len(), 64);
    }

    /// A process that does not hold the member's private key cannot prove it, whatever it claims.
    #[test]
    fn another_key_does_not_pass_for_the_members() {
        let e = ends();
        let impostor = Ends { member: PrivateKey::generate(), ..ends() };
        let forged = Handshake::member(&impostor.member, &e.ephemeral, &e.hub.public_key(), &e.challenge.public_key())
            .unwrap()
            .member_proof();
        assert_eq!(hub_side(&e, &e.member.public_key()).verify_member(&forged), Err(AuthError::BadProof));
    }

    /// A proof recorded on one connection is worthless on the next (a new challenge).
    #[test]
    fn a_recorded_proof_does_not_pass_a_new_challenge() {
        let e = ends();
        let recorded = member_side(&e).member_proof();
        let next = Ends { challenge: PrivateKey::generate(), ..e };
        assert_eq!(hub_side(&next, &next.member.public_key()).verify_member(&recorded), Err(AuthError::BadProof));
    }

    /// Someone answering in the hub's place (a local user who bound the hub's port first) cannot prove it.
    #[test]
    fn a_fake_hub_cannot_prove_itself() {
        let e = ends();
        let fake = Ends { hub: PrivateKey::generate(), ..ends() };
        let answer = Handshake::hub(&fake.hub, &e.challenge, &e.member.public_key(), &e.ephemeral.public_key())
            .unwrap()
            .hub_proof();
        assert_eq!(member_side(&e).verify_hub(&answer), Err(AuthError::BadProof));
    }

    #[test]
    fn garbage_proofs_and_low_order_keys_are_refused() {
        let e = ends();
        let h = hub_side(&e, &e.member.public_key());
        for proof in ["", "zz", "00", &"0".repeat(64), &"a".repeat(1000)] {
            assert_eq!(h.verify_member(proof), Err(AuthError::BadProof), "{proof:?}");
        }
        // The identity point: every agreement with it is zero.
        let zero = PublicKey::parse("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=").unwrap();
        assert!(matches!(
            Handshake::hub(&e.hub, &e.challenge, &zero, &e.ephemeral.public_key()),
            Err(AuthError::WeakKey)
        ));
        assert!(matches!(
            Handshake::member(&e.member, &e.ephemeral, &e.hub.public_key(), &zero),
            Err(AuthError::WeakKey)
        ));
        assert_eq!(standing_proof(&e.member, &zero, b"x"), Err(AuthError::WeakKey));
    }

    #[test]
    fn a_standing_proof_holds_for_its_key_and_its_connection_only() {
        let e = ends();
        let proof = standing_proof(&e.member, &e.hub.public_key(), b"binding").unwrap();
        assert_eq!(verify_standing(&e.hub, &e.member.public_key(), b"binding", &proof), Ok(()));
        assert_eq!(verify_standing(&e.hub, &e.member.public_key(), b"another", &proof), Err(AuthError::BadProof));
        let other = PrivateKey::generate().public_key();
        assert_eq!(verify_standing(&e.hub, &other, b"binding", &proof), Err(AuthError::BadProof));
    }

    #[test]
    fn handshake_lines_read_back() {
        let answer = HubAnswer::Refused { reason: "no".into() };
        let text = serde_json::to_string(&answer).unwrap();
        assert_eq!(text, r#"{"msg":"refused","reason":"no"}"#);
        assert_eq!(serde_json::from_str::<HubAnswer>(&text).unwrap(), answer);
        let challenge = Challenge { challenge: PrivateKey::generate().public_key() };
        let text = serde_json::to_string(&challenge).unwrap();
        assert_eq!(serde_json::from_str::<Challenge>(&text).unwrap(), challenge);
    }
}
