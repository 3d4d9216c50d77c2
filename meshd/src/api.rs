//! The admin protocol between `meshctl` and the controller: one JSON request per line, one JSON reply
//! per line, over the root-only unix socket in the state directory (or in-process when no daemon runs).

use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::input::{HostPort, Label};
use crate::model::{
    AccessRule, DeviceView, InviteView, NetworkView, NodeView, Protocol, Role, ServiceView, SharedState,
};

/// What `meshctl` asks of the controller.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Status,
    NodeList,
    /// Invite a new host under `name`; the reply carries the one-time token.
    NodeInvite {
        name: Label,
        role: Role,
        expires_secs: u64,
    },
    /// Unredeemed, unexpired invites.
    NodeInvites,
    /// Cancel the pending invite for `name`.
    NodeUninvite {
        name: Label,
    },
    /// Remove a member node: the hub drops it as a peer at once.
    NodeRemove {
        name: Label,
    },
    /// Keep a node (name, addresses) but take it out of the mesh: no host keeps it as a peer.
    NodeDisable {
        name: Label,
    },
    NodeEnable {
        name: Label,
    },
    /// Ask a member host for a new key; it makes the key itself on its next contact.
    NodeRotate {
        name: Label,
    },
    /// Let node `from` reach node `to`; once a node is the `to` of a rule, only its rules' sources reach it.
    AccessAllow {
        from: Label,
        to: Label,
    },
    AccessRevoke {
        from: Label,
        to: Label,
    },
    AccessList,
    ServiceAdd {
        name: Label,
        node: Label,
        target: HostPort,
        port: Option<u16>,
        /// TCP unless asked for (and in requests of a `meshctl` from before UDP services).
        #[serde(default)]
        protocol: Protocol,
    },
    ServiceList,
    ServiceRemove {
        name: Label,
    },
    /// The device's key pair is made by `meshctl`; only the public key reaches the controller.
    DeviceAdd {
        name: Label,
        allow: Vec<Label>,
        public_key: String,
    },
    DeviceList,
    DeviceRemove {
        name: Label,
    },
    /// Replace the services a device may reach.
    DeviceAllow {
        name: Label,
        allow: Vec<Label>,
    },
    /// Change where a service points and the port it is offered on; its addresses and grants stay. The
    /// protocol changes only when one is given.
    ServiceUpdate {
        name: Label,
        target: HostPort,
        port: Option<u16>,
        #[serde(default)]
        protocol: Option<Protocol>,
    },
    /// Replace a device's keys (made by `meshctl`, public half only here) and preshared key; the old
    /// key stops working at once, the device keeps its addresses and grants.
    DeviceRotate {
        name: Label,
        public_key: String,
    },
    /// Several requests carried out in one transaction: all of them, or (on the first refusal) none.
    /// Replies come in the same order. Batches do not nest.
    Batch {
        requests: Vec<Request>,
    },
}

impl Request {
    /// Whether the request changes the network (and so the hosts must be reconciled after it).
    pub fn is_change(&self) -> bool {
        if let Request::Batch { requests } = self {
            return requests.iter().any(Request::is_change);
        }
        matches!(
            self,
            Request::ServiceAdd { .. }
                | Request::ServiceRemove { .. }
                | Request::DeviceAdd { .. }
                | Request::DeviceRemove { .. }
                | Request::DeviceRotate { .. }
                | Request::NodeRemove { .. }
                | Request::NodeDisable { .. }
                | Request::NodeEnable { .. }
                | Request::NodeRotate { .. }
                | Request::AccessAllow { .. }
                | Request::AccessRevoke { .. }
                | Request::DeviceAllow { .. }
                | Request::ServiceUpdate { .. }
        )
    }
}

/// The controller's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "data", rename_all = "snake_case")]
pub enum Reply {
    Status(StatusView),
    Nodes(Vec<NodeView>),
    Services(Vec<ServiceView>),
    Service(ServiceView),
    Devices(Vec<DeviceView>),
    /// A device's config to hand out, after `DeviceAdd` or `DeviceRotate`.
    DeviceHandout(Box<DeviceHandout>),
    Removed,
    Invite(InviteIssued),
    Invites(Vec<InviteView>),
    Rules(Vec<AccessRule>),
    Done,
    /// The replies to a batch, in order.
    Batch(Vec<Reply>),
}

/// A new invite and its token (shown once).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InviteIssued {
    pub invite: InviteView,
    pub token: String,
}

/// What a joining host sends, over TLS, with the token's id and secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinRequest {
    pub id: String,
    pub secret: String,
    /// The host's own public key; its private key never leaves it.
    pub public_key: String,
    /// Where other hosts reach it, if anywhere (none: behind NAT).
    pub endpoint: Option<HostPort>,
    pub listen_port: u16,
    pub interface: String,
}

/// The controller's answer to a join.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JoinReply {
    Joined(Box<MemberState>),
    Refused(String),
}

/// What a member host knows of the network (cached in its state directory): its own name and the
/// last state the controller sent it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberState {
    /// This host's name.
    pub me: Label,
    pub state: SharedState,
}

/// A reply or the one-line reason the request was refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Ok(Reply),
    Error(String),
    /// Request `index` (from 0) of a batch was refused, so none of the batch was carried out.
    BatchRefused {
        index: usize,
        error: String,
    },
}

/// `meshctl status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusView {
    pub network: NetworkView,
    pub nodes: Vec<NodeView>,
    pub devices: Vec<DeviceView>,
    pub services: Vec<ServiceView>,
}

/// Everything but the private key that a new device's wg-quick config needs; `meshctl` adds the key
/// it generated and renders the config and QR codes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceHandout {
    pub device: DeviceView,
    pub addresses: Vec<IpNet>,
    pub dns_servers: Vec<IpAddr>,
    pub dns_search: Vec<String>,
    pub mtu: u16,
    pub hub_public_key: String,
    pub preshared_key: String,
    pub endpoint: String,
    pub allowed_ips: Vec<IpNet>,
    pub persistent_keepalive: u16,
}
