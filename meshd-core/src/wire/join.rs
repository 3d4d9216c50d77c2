//! The join exchange: what a host redeeming an invite sends the controller's join service (over TLS
//! pinned to the fingerprint in the token, see [`crate::wire::invite`]), and the answer: the network's
//! state, which the member then keeps as its [`MemberState`].

use serde::{Deserialize, Serialize};

use crate::input::{HostPort, Label};
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
    /// Name of its WireGuard interface.
    pub interface: String,
    /// Its interface's own MTU (`meshd join --mtu`); `None`, and from older hosts: the network's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u16>,
}

/// The controller's answer to a join.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JoinReply {
    /// The host is a member now: its name and the network's state.
    Joined(Box<MemberState>),
    /// Why the invite was not redeemed, for the operator.
    Refused(String),
}

/// What a member host knows of the network (cached in its state directory): its own name and the
/// last state the controller sent it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberState {
    /// This host's name.
    pub me: Label,
    /// The network's state, as last sent.
    pub state: SharedState,
}
