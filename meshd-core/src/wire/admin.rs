//! The admin protocol between `meshctl` and the controller: one JSON request per line, one JSON reply
//! per line, over the root-only unix socket in the state directory (or in-process when no daemon runs).

use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::input::{HostPort, Label, PublicName};
use crate::keys::{PresharedKey, PublicKey};
use crate::model::{
    AccessRule, DeviceView, InviteView, NetworkView, NodeView, OnionClient, Protocol, Role, ServiceView,
};
use crate::relay::route::TlsMode;

/// What `meshctl` asks of the controller.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// The network, its nodes, devices and services: [`Reply::Status`].
    Status,
    /// Every node: [`Reply::Nodes`].
    NodeList,
    /// Invite a new host under `name`; the reply carries the one-time token.
    NodeInvite {
        /// The name the host gets.
        name: Label,
        /// [`Role::Node`] or [`Role::Relay`].
        role: Role,
        /// Lifetime in seconds, 1 to [`crate::wire::invite::MAX_EXPIRY`].
        expires_secs: u64,
    },
    /// Unredeemed, unexpired invites.
    NodeInvites,
    /// Cancel the pending invite for `name`.
    NodeUninvite {
        /// The invited name.
        name: Label,
    },
    /// Remove a member node: the hub drops it as a peer at once.
    NodeRemove {
        /// The node.
        name: Label,
    },
    /// Keep a node (name, addresses) but take it out of the mesh: no host keeps it as a peer.
    NodeDisable {
        /// The node.
        name: Label,
    },
    /// Put a disabled node back into the mesh.
    NodeEnable {
        /// The node.
        name: Label,
    },
    /// Ask a member host for a new key; it makes the key itself on its next contact.
    NodeRotate {
        /// The node.
        name: Label,
    },
    /// Change where a node (the hub included) is reached: [`Reply::NodeUpdated`]. Every host gets the change
    /// through the sync; devices carry the hub's endpoint in their config.
    NodeUpdate {
        /// The node.
        name: Label,
        /// Its new endpoint, or none (behind NAT; refused for the hub); unchanged when `None`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        endpoint: Option<EndpointChange>,
        /// Its interface's own MTU from now on, bytes; unchanged when `None`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        mtu: Option<u16>,
    },
    /// Set the network's MTU (of every host without its own, and of devices' configs): [`Reply::NetworkUpdated`].
    NetworkUpdate {
        /// Bytes, [`crate::input::MIN_MTU`] to [`crate::input::MAX_MTU`].
        mtu: u16,
    },
    /// Let node `from` reach node `to`; once a node is the `to` of a rule, only its rules' sources reach it.
    AccessAllow {
        /// The node that may reach `to`.
        from: Label,
        /// The node reached.
        to: Label,
    },
    /// Take a rule away.
    AccessRevoke {
        /// The rule's source.
        from: Label,
        /// The rule's target.
        to: Label,
    },
    /// Every access rule: [`Reply::Rules`].
    AccessList,
    /// Add a service on a node, with its own mesh address: [`Reply::Service`].
    ServiceAdd {
        /// The service's name.
        name: Label,
        /// The node that runs it.
        node: Label,
        /// Where that node forwards it to.
        target: HostPort,
        /// Port on its mesh address; the target's port when `None`.
        port: Option<u16>,
        /// TCP unless asked for (and in requests of a `meshctl` from before UDP services).
        #[serde(default)]
        protocol: Protocol,
    },
    /// Every service: [`Reply::Services`].
    ServiceList,
    /// Serve a TCP service speaking HTTP on a public name over HTTPS through a relay: [`Reply::Service`].
    Expose {
        /// The service.
        service: Label,
        /// The public name.
        hostname: PublicName,
        /// The hub or a node of role relay, with an endpoint: where the name's DNS points.
        relay: Label,
        /// Where TLS ends.
        tls: TlsMode,
    },
    /// Stop serving a service's public name: [`Reply::Service`].
    Unexpose {
        /// The service.
        service: Label,
        /// The public name.
        hostname: PublicName,
    },
    /// Serve a TCP service as a Tor onion service from its node, or change the one it has: [`Reply::Service`].
    /// The client keys are made by `meshctl`; only their public halves reach the controller.
    ExposeTor {
        /// The service.
        service: Label,
        /// The port at the `.onion` address; `None` keeps the one it has, or takes the service's mesh port.
        port: Option<u16>,
        /// Devices to authorize, each with the public half of a new client key; from then on only
        /// authorized clients can find the service.
        clients: Vec<OnionClient>,
    },
    /// Stop serving a service as an onion service, or (with `clients`) take those devices off its clients and
    /// have its node publish a descriptor without them: [`Reply::Service`].
    UnexposeTor {
        /// The service.
        service: Label,
        /// The devices to take off; empty: the whole onion service.
        clients: Vec<Label>,
    },
    /// Remove a service; devices lose their grants to it.
    ServiceRemove {
        /// The service.
        name: Label,
    },
    /// The device's key pair is made by `meshctl`; only the public key reaches the controller.
    DeviceAdd {
        /// The device's name.
        name: Label,
        /// The services it may reach (at least one).
        allow: Vec<Label>,
        /// Its WireGuard public key.
        public_key: PublicKey,
        /// The hand-out a [`Request::Preview`] of this request gave and the caller has already written
        /// out: the device gets its preshared key, and the request is refused unless it gives exactly
        /// this hand-out again (the network may have changed meanwhile). `None`: a new preshared key.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        expect: Option<Box<DeviceHandout>>,
    },
    /// Every device: [`Reply::Devices`].
    DeviceList,
    /// Remove a device: the hub drops it as a peer at once.
    DeviceRemove {
        /// The device.
        name: Label,
    },
    /// Replace the services a device may reach.
    DeviceAllow {
        /// The device.
        name: Label,
        /// The services it may reach from now on (at least one).
        allow: Vec<Label>,
    },
    /// Change where a service points and the port it is offered on; its addresses and grants stay. The
    /// protocol changes only when one is given.
    ServiceUpdate {
        /// The service.
        name: Label,
        /// Where its node forwards it to from now on.
        target: HostPort,
        /// Port on its mesh address; the target's port when `None`.
        port: Option<u16>,
        /// The protocol from now on; unchanged when `None`.
        #[serde(default)]
        protocol: Option<Protocol>,
    },
    /// Replace a device's keys (made by `meshctl`, public half only here) and preshared key; the old
    /// key stops working at once, the device keeps its addresses and grants.
    DeviceRotate {
        /// The device.
        name: Label,
        /// Its new WireGuard public key.
        public_key: PublicKey,
        /// As for [`Request::DeviceAdd`]: the previewed hand-out the caller has already written out.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        expect: Option<Box<DeviceHandout>>,
    },
    /// Several requests carried out in one transaction: all of them, or (on the first refusal) none.
    /// Replies come in the same order. Batches do not nest.
    Batch {
        /// The requests, in order.
        requests: Vec<Request>,
    },
    /// Carry `request` (a batch too) out in a transaction that is then rolled back: the reply it would
    /// get now, with nothing changed. `meshctl` previews a device's hand-out to write its config out
    /// before the change is made. Previews do not nest and are not part of a batch.
    Preview {
        /// The request to preview.
        request: Box<Request>,
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
                | Request::NodeUpdate { .. }
                | Request::NetworkUpdate { .. }
                | Request::AccessAllow { .. }
                | Request::AccessRevoke { .. }
                | Request::DeviceAllow { .. }
                | Request::ServiceUpdate { .. }
                | Request::Expose { .. }
                | Request::Unexpose { .. }
                | Request::ExposeTor { .. }
                | Request::UnexposeTor { .. }
        )
    }
}

/// A new endpoint for a node, or none.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EndpointChange {
    /// Other hosts (and, for the hub, devices) reach it at this `HOST:PORT` from now on.
    Set(HostPort),
    /// It has no endpoint any more (behind NAT): it opens its tunnels itself.
    Clear,
}

/// The controller's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "data", rename_all = "snake_case")]
pub enum Reply {
    /// To [`Request::Status`].
    Status(StatusView),
    /// To [`Request::NodeList`], by index.
    Nodes(Vec<NodeView>),
    /// To [`Request::ServiceList`], by index.
    Services(Vec<ServiceView>),
    /// The service as it is after [`Request::ServiceAdd`] or [`Request::ServiceUpdate`].
    Service(ServiceView),
    /// To [`Request::DeviceList`], by index.
    Devices(Vec<DeviceView>),
    /// A device's config to hand out, after `DeviceAdd` or `DeviceRotate`.
    DeviceHandout(Box<DeviceHandout>),
    /// A node, device or service was removed, or an invite cancelled.
    Removed,
    /// To [`Request::NodeInvite`].
    Invite(InviteIssued),
    /// To [`Request::NodeInvites`], oldest first.
    Invites(Vec<InviteView>),
    /// To [`Request::AccessList`], sorted.
    Rules(Vec<AccessRule>),
    /// To [`Request::NodeUpdate`].
    NodeUpdated(NodeUpdated),
    /// To [`Request::NetworkUpdate`].
    NetworkUpdated(NetworkUpdated),
    /// A change without anything to show.
    Done,
    /// The replies to a batch, in order.
    Batch(Vec<Reply>),
}

/// A new invite and its token (shown once).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InviteIssued {
    /// The invite.
    pub invite: InviteView,
    /// The token in its text form ([`crate::wire::invite::Token::encode`]).
    pub token: String,
}

/// A node after [`Request::NodeUpdate`], and the devices whose configs it made stale.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeUpdated {
    /// The node as it is now.
    pub node: NodeView,
    /// Devices whose configs name the hub's endpoint as it was (every device, when the hub's endpoint
    /// changed; none otherwise): they reach the hub again once given a new config (`meshctl device rotate`)
    /// or once the endpoint is edited in their app.
    pub devices_with_old_endpoint: Vec<Label>,
}

/// The network after [`Request::NetworkUpdate`], and the devices whose configs it made stale.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkUpdated {
    /// The network as it is now.
    pub network: NetworkView,
    /// Devices whose configs carry the MTU as it was (every device, when it changed): they take the new
    /// one with a new config (`meshctl device rotate`) or an edit in their app.
    pub devices_with_old_mtu: Vec<Label>,
}

/// A reply or the one-line reason the request was refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Carried out (boxed: a reply is large, the refusals small).
    Ok(Box<Reply>),
    /// Refused, with the reason for the operator; nothing was changed.
    Error(String),
    /// Request `index` (from 0) of a batch was refused, so none of the batch was carried out.
    BatchRefused {
        /// Which request, from 0.
        index: usize,
        /// Why it was refused.
        error: String,
    },
    /// Refused because the network changed since the caller previewed the request (its expected
    /// hand-out differs now); nothing was changed, and previewing again may succeed.
    Stale(String),
}

/// `meshctl status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusView {
    /// The network.
    pub network: NetworkView,
    /// Every node, by index.
    pub nodes: Vec<NodeView>,
    /// Every device, by index.
    pub devices: Vec<DeviceView>,
    /// Every service, by index.
    pub services: Vec<ServiceView>,
}

/// Everything but the private key that a new device's wg-quick config needs; `meshctl` adds the key
/// it generated and renders the config and QR codes. Its `Debug` leaves the preshared key out (requests
/// that carry a hand-out are logged at debug level).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceHandout {
    /// The device as listed.
    pub device: DeviceView,
    /// Its tunnel addresses: its IPv4 /32 and IPv6 /128.
    pub addresses: Vec<IpNet>,
    /// The hub's mesh addresses, as the device's resolvers (`meshctl` may name others instead, see
    /// [`crate::handout::DeviceDns`]).
    pub dns_servers: Vec<IpAddr>,
    /// The network's domain, as search domain.
    pub dns_search: Vec<String>,
    /// Interface MTU: the network's ([`crate::model::Network::mtu`]).
    pub mtu: u16,
    /// The hub's WireGuard public key.
    pub hub_public_key: PublicKey,
    /// The key this device shares with the hub. Secret: its `Debug` is redacted.
    pub preshared_key: PresharedKey,
    /// `HOST:PORT` of the hub as the operator gave it.
    pub endpoint: String,
    /// What the device routes through the hub: the mesh's IPv4 range and IPv6 /64.
    pub allowed_ips: Vec<IpNet>,
    /// Seconds between keepalives ([`crate::model::DEVICE_KEEPALIVE_SECS`]).
    pub persistent_keepalive: u16,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hand_out_never_shows_its_preshared_key_in_debug_output() {
        let secret = "c2VjcmV0LXByZXNoYXJlZC1rZXktMzItYnl0ZXMhISE=";
        let handout = DeviceHandout {
            device: DeviceView {
                name: "phone".parse().unwrap(),
                public_key: Some(crate::fixtures::public_key(3)),
                address: "10.77.0.3".parse().unwrap(),
                address_v6: "fd00::3".parse().unwrap(),
                allow: Vec::new(),
                dns_name: "phone.home.internal".into(),
                last_handshake: None,
            },
            addresses: Vec::new(),
            dns_servers: Vec::new(),
            dns_search: Vec::new(),
            mtu: 1420,
            hub_public_key: crate::fixtures::public_key(1),
            preshared_key: PresharedKey::parse(secret).unwrap(),
            endpoint: "192.0.2.1:51820".into(),
            allowed_ips: Vec::new(),
            persistent_keepalive: 25,
        };
        let request = Request::DeviceRotate {
            name: "phone".parse().unwrap(),
            public_key: crate::fixtures::public_key(3),
            expect: Some(Box::new(handout)),
        };
        assert!(!format!("{request:?}").contains(secret));
        assert!(format!("{request:?}").contains("<redacted>"));
    }
}
