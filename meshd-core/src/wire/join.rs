//! The join service's exchanges, over TLS pinned to the fingerprint in the token (see
//! [`crate::wire::invite`]): a host redeeming an invite ([`JoinRequest`]), answered with the network's
//! state, which the member then keeps as its [`MemberState`]; and a member without a working sync
//! session asking where its key stands ([`StandingRequest`]), answered with a [`Standing`].

use serde::{Deserialize, Serialize};

use crate::input::{HostPort, InterfaceName, Label};
use crate::keys::PublicKey;
use crate::model::SharedState;
use crate::wire::invite::InviteSecret;

/// What a joining host sends, over TLS, with the token's id and secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinRequest {
    /// The invite's id, from the token.
    pub id: String,
    /// The invite's secret, from the token.
    pub secret: InviteSecret,
    /// The host's own public key; its private key never leaves it.
    pub public_key: PublicKey,
    /// Where other hosts reach it, if anywhere (none: behind NAT).
    pub endpoint: Option<HostPort>,
    /// UDP port its WireGuard interface listens on.
    pub listen_port: u16,
    /// Name of its WireGuard interface (a name Linux would refuse, or that could break out of a command
    /// or rule, fails to deserialise).
    pub interface: InterfaceName,
    /// Its interface's own MTU (`meshd join --mtu`); `None`, and from older hosts: the network's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u16>,
}

/// What a member asks the join service when it cannot reach the hub's sync service: where the keys it
/// may be known by stand (its key, and the other key of a key rotation under way). Each key is proven
/// ([`crate::wire::auth::standing_proof`], bound to the TLS session): only the holder of a key learns where
/// it stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StandingRequest {
    /// The public keys asked about (one or two).
    pub standing: Vec<PublicKey>,
    /// One proof per key, in the same order (lowercase hex).
    #[serde(default)]
    pub proofs: Vec<String>,
}

/// Where a member's key stands in the network; declared from the standing that says most to the one
/// that says least (see [`Standing::best`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Standing {
    /// A node of the network, enabled.
    Member,
    /// A node of the network, disabled by the operator (`meshctl node disable`).
    Disabled,
    /// The key of a node that was removed (`meshctl node remove`).
    Removed,
    /// The controller does not know the key (not one of a node it has or has removed).
    Unknown,
}

impl Standing {
    /// The standing of a member known by any of several keys: the one that says most (member, then
    /// disabled, then removed, then unknown).
    pub fn best(standings: impl IntoIterator<Item = Standing>) -> Standing {
        standings.into_iter().min_by_key(|s| *s as u8).unwrap_or(Standing::Unknown)
    }
}

/// What the join service is asked: a join (an invite's redemption), or a member's standing. Both are
/// sent as they are, without a tag (joining hosts of every version send what they always sent); a
/// request with a `standing` field is a standing question, any other a join, so a malformed join is
/// refused with what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum ToJoinService {
    /// A host redeems its invite.
    Join(JoinRequest),
    /// A member asks where its key stands.
    Standing(StandingRequest),
}

impl<'de> Deserialize<'de> for ToJoinService {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<ToJoinService, D::Error> {
        use serde::de::Error;
        let value = serde_json::Value::deserialize(deserializer)?;
        if value.get("standing").is_some() {
            StandingRequest::deserialize(value).map(ToJoinService::Standing).map_err(D::Error::custom)
        } else {
            JoinRequest::deserialize(value).map(ToJoinService::Join).map_err(D::Error::custom)
        }
    }
}

/// The controller's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JoinReply {
    /// The host is a member now: its name and the network's state.
    Joined(Box<MemberState>),
    /// Why the request was refused (the invite not redeemed, the request malformed), for the operator.
    Refused(String),
    /// The answer to a [`StandingRequest`].
    Standing(Standing),
}

/// How a member reaches the controller's join service outside the mesh: the join address and the
/// fingerprint of the join certificate, from the token it joined with. An answer is trusted only
/// from the server that proves this certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HubContact {
    /// Where the join service listens (TCP).
    pub join: HostPort,
    /// Lowercase hex SHA-256 of the join certificate.
    pub fingerprint: String,
}

/// What a member host knows of the network (cached in its state directory): its own name and the
/// last state the controller sent it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberState {
    /// This host's name.
    pub me: Label,
    /// The network's state, as last sent.
    pub state: SharedState,
    /// The controller's join service, from the token (`meshd join` records it; the controller's join
    /// reply leaves it out). Absent for members that joined before meshd kept it: they do not ask for
    /// their standing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hub: Option<HubContact>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::named_key;

    #[test]
    fn joins_and_standing_requests_are_told_apart_and_old_joins_still_read() {
        let join = r#"{"id":"ab","secret":"00112233445566778899aabbccddeeff","public_key":"KEY","endpoint":null,"listen_port":51820,"interface":"meshd0"}"#;
        let key = named_key("KEY");
        let join = join.replace("KEY", key.as_str());
        assert!(matches!(serde_json::from_str::<ToJoinService>(&join), Ok(ToJoinService::Join(_))));
        // Issue 11, point 5: an interface name that could break out of a command or rule is no join.
        let injected = join.replace(r#""meshd0""#, r#""x\"; flush ruleset""#);
        let e = serde_json::from_str::<JoinRequest>(&injected).unwrap_err().to_string();
        assert!(e.contains("interface name") && e.contains("flush ruleset"), "{e}");
        assert!(serde_json::from_str::<ToJoinService>(&injected).is_err());
        let standing = ToJoinService::Standing(StandingRequest { standing: vec![key], proofs: vec!["00".into()] });
        let text = serde_json::to_string(&standing).unwrap();
        assert_eq!(serde_json::from_str::<ToJoinService>(&text).unwrap(), standing);
        assert!(serde_json::from_str::<ToJoinService>(r#"{"standing":"nope"}"#).is_err());
        let missing = serde_json::from_str::<ToJoinService>(r#"{"id":"ab"}"#).unwrap_err().to_string();
        assert!(missing.contains("missing field `secret`"), "a malformed join says what is wrong: {missing}");
        let reply = serde_json::to_string(&JoinReply::Standing(Standing::Removed)).unwrap();
        assert_eq!(reply, r#"{"standing":"removed"}"#);
    }

    #[test]
    fn the_best_standing_of_two_keys() {
        use Standing::*;
        assert_eq!(Standing::best([Unknown, Member]), Member);
        assert_eq!(Standing::best([Removed, Disabled]), Disabled);
        assert_eq!(Standing::best([Unknown, Removed]), Removed);
        assert_eq!(Standing::best([]), Unknown);
    }
}
