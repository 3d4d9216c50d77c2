//! One step of a plan: a change to the network, its line in the printed plan (`+` adds, `~` changes,
//! `-` takes away) and the admin requests that carry it out.

use std::fmt;

use serde::Serialize;

use super::{list, role_name};
use crate::input::{HostPort, Label, PublicName};
use crate::keys::PublicKey;
use crate::model::{OnionClient, Protocol, Role};
use crate::relay::route::TlsMode;
use crate::tor::client::ClientPublicKey;
use crate::wire::admin::{EndpointChange, Request};

/// One change to the network, carried out by one or two admin requests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Step {
    /// Invite a node that is neither a member nor invited.
    InviteNode {
        /// The node.
        name: Label,
        /// Its role.
        role: Role,
    },
    /// A pending invite for another role is cancelled and issued again: the old token stops working.
    ReinviteNode {
        /// The node.
        name: Label,
        /// The role it is invited with now.
        role: Role,
        /// The role of the cancelled invite.
        was: Role,
    },
    /// Set the network's MTU (of the hosts without their own, and of new devices' configs).
    UpdateNetwork {
        /// The MTU now declared, bytes.
        mtu: u16,
        /// The MTU it had.
        was_mtu: u16,
    },
    /// Change where a member is reached, or its interface's MTU: every host follows.
    UpdateNode {
        /// The node.
        name: Label,
        /// The endpoint now declared, when it changes.
        #[serde(skip_serializing_if = "Option::is_none")]
        endpoint: Option<HostPort>,
        /// The endpoint it had (`None`: none, or it does not change).
        #[serde(skip_serializing_if = "Option::is_none")]
        was_endpoint: Option<HostPort>,
        /// The MTU now declared, when it changes.
        #[serde(skip_serializing_if = "Option::is_none")]
        mtu: Option<u16>,
        /// The MTU it had, when it changes.
        #[serde(skip_serializing_if = "Option::is_none")]
        was_mtu: Option<u16>,
    },
    /// Enable a disabled member.
    EnableNode {
        /// The node.
        name: Label,
    },
    /// Add a service that the network does not have.
    AddService {
        /// The service.
        name: Label,
        /// The node it runs on.
        node: Label,
        /// Where that node forwards it to.
        target: HostPort,
        /// Its port on its mesh address.
        port: u16,
        /// TCP or UDP.
        protocol: Protocol,
    },
    /// Removed and added again on another node: it gets a new address, and its devices their grants back
    /// (a later [`Step::AllowDevice`]).
    MoveService {
        /// The service.
        name: Label,
        /// The node it moves to.
        node: Label,
        /// The node it was on.
        was_node: Label,
        /// Where the new node forwards it to.
        target: HostPort,
        /// Its port on its new mesh address.
        port: u16,
        /// TCP or UDP.
        protocol: Protocol,
    },
    /// Target, port or protocol changed in place: the service keeps its addresses and grants.
    UpdateService {
        /// The service.
        name: Label,
        /// The target now declared.
        target: HostPort,
        /// The mesh port now declared.
        port: u16,
        /// The protocol now declared.
        protocol: Protocol,
        /// The target it had.
        was_target: HostPort,
        /// The mesh port it had.
        was_port: u16,
        /// The protocol it had.
        was_protocol: Protocol,
    },
    /// Serve a service on a public name through a relay.
    Expose {
        /// The service.
        service: Label,
        /// The public name.
        hostname: PublicName,
        /// The relay.
        relay: Label,
        /// Where TLS ends.
        tls: TlsMode,
    },
    /// Stop serving a service on a public name (it goes, or comes back with another relay or mode).
    Unexpose {
        /// The service.
        service: Label,
        /// The public name.
        hostname: PublicName,
    },
    /// Serve a service as an onion service, or add clients to it or change its port. Each new client's key
    /// pair is made when the step is carried out; its private half is handed out once the service's node has
    /// reported the address.
    ExposeTor {
        /// The service.
        service: Label,
        /// The port at the `.onion` address, when it is set or changes (`None`: the one it has, else the
        /// service's mesh port).
        #[serde(skip_serializing_if = "Option::is_none")]
        port: Option<u16>,
        /// The devices to authorize now.
        clients: Vec<Label>,
        /// The port it had, when it changes.
        #[serde(skip_serializing_if = "Option::is_none")]
        was_port: Option<u16>,
    },
    /// Stop serving a service as an onion service (`clients` empty), or take clients off it.
    UnexposeTor {
        /// The service.
        service: Label,
        /// The devices taken off; empty: the whole onion service.
        clients: Vec<Label>,
    },
    /// An onion service for authorized clients only becomes open to anyone with its address: unexposed and
    /// exposed again without clients (its node keeps the key, so the address stays).
    OpenTor {
        /// The service.
        service: Label,
        /// The port at the `.onion` address.
        port: Option<u16>,
    },
    /// Add a device (its key pair is made when the step is carried out).
    AddDevice {
        /// The device.
        name: Label,
        /// The services it may reach (those that can exist now).
        allow: Vec<Label>,
    },
    /// Replace a device's grants.
    AllowDevice {
        /// The device.
        name: Label,
        /// The services it may reach from now on.
        allow: Vec<Label>,
        /// The services it could reach (equal to `allow` when a service it reaches moves).
        was: Vec<Label>,
    },
    /// Add an access rule.
    AllowAccess {
        /// The node that may reach `to`.
        from: Label,
        /// The node reached.
        to: Label,
    },
    /// Remove an access rule.
    RevokeAccess {
        /// The rule's source.
        from: Label,
        /// The rule's target.
        to: Label,
    },
    /// Remove a device that the file does not have.
    RemoveDevice {
        /// The device.
        name: Label,
    },
    /// Remove a service that the file does not have, or that waits for its node elsewhere.
    RemoveService {
        /// The service.
        name: Label,
    },
    /// Disable a member that the file disables.
    DisableNode {
        /// The node.
        name: Label,
    },
    /// Remove a member that the file does not have.
    RemoveNode {
        /// The node.
        name: Label,
    },
    /// Cancel the pending invite of a node that the file does not have.
    UninviteNode {
        /// The node.
        name: Label,
    },
}

impl Step {
    /// The admin requests that carry the step out, in order. Invites last `invite_secs`; a new device's
    /// key pair is made by `device_key`, which returns the public half (the caller keeps the private one);
    /// a new onion service client's by `client_key(service, device)`, likewise.
    pub fn requests(
        &self,
        invite_secs: u64,
        device_key: impl FnOnce() -> PublicKey,
        mut client_key: impl FnMut(&Label, &Label) -> ClientPublicKey,
    ) -> Vec<Request> {
        let invite =
            |name: &Label, role: Role| Request::NodeInvite { name: name.clone(), role, expires_secs: invite_secs };
        match self {
            Step::InviteNode { name, role } => vec![invite(name, *role)],
            Step::ReinviteNode { name, role, .. } => {
                vec![Request::NodeUninvite { name: name.clone() }, invite(name, *role)]
            }
            Step::UpdateNetwork { mtu, .. } => vec![Request::NetworkUpdate { mtu: *mtu }],
            Step::UpdateNode { name, endpoint, mtu, .. } => vec![Request::NodeUpdate {
                name: name.clone(),
                endpoint: endpoint.clone().map(EndpointChange::Set),
                mtu: *mtu,
            }],
            Step::EnableNode { name } => vec![Request::NodeEnable { name: name.clone() }],
            Step::AddService { name, node, target, port, protocol } => vec![Request::ServiceAdd {
                name: name.clone(),
                node: node.clone(),
                target: target.clone(),
                port: Some(*port),
                protocol: *protocol,
            }],
            Step::MoveService { name, node, target, port, protocol, .. } => vec![
                Request::ServiceRemove { name: name.clone() },
                Request::ServiceAdd {
                    name: name.clone(),
                    node: node.clone(),
                    target: target.clone(),
                    port: Some(*port),
                    protocol: *protocol,
                },
            ],
            Step::UpdateService { name, target, port, protocol, .. } => vec![Request::ServiceUpdate {
                name: name.clone(),
                target: target.clone(),
                port: Some(*port),
                protocol: Some(*protocol),
            }],
            Step::Expose { service, hostname, relay, tls } => vec![Request::Expose {
                service: service.clone(),
                hostname: hostname.clone(),
                relay: relay.clone(),
                tls: *tls,
            }],
            Step::Unexpose { service, hostname } => {
                vec![Request::Unexpose { service: service.clone(), hostname: hostname.clone() }]
            }
            Step::ExposeTor { service, port, clients, .. } => vec![Request::ExposeTor {
                service: service.clone(),
                port: *port,
                clients: (clients.iter())
                    .map(|device| OnionClient { device: device.clone(), public_key: client_key(service, device) })
                    .collect(),
            }],
            Step::UnexposeTor { service, clients } => {
                vec![Request::UnexposeTor { service: service.clone(), clients: clients.clone() }]
            }
            Step::OpenTor { service, port } => vec![
                Request::UnexposeTor { service: service.clone(), clients: Vec::new() },
                Request::ExposeTor { service: service.clone(), port: *port, clients: Vec::new() },
            ],
            Step::AddDevice { name, allow } => {
                vec![Request::DeviceAdd {
                    name: name.clone(),
                    allow: allow.clone(),
                    public_key: device_key(),
                    expect: None,
                }]
            }
            Step::AllowDevice { name, allow, .. } => {
                vec![Request::DeviceAllow { name: name.clone(), allow: allow.clone() }]
            }
            Step::AllowAccess { from, to } => vec![Request::AccessAllow { from: from.clone(), to: to.clone() }],
            Step::RevokeAccess { from, to } => vec![Request::AccessRevoke { from: from.clone(), to: to.clone() }],
            Step::RemoveDevice { name } => vec![Request::DeviceRemove { name: name.clone() }],
            Step::RemoveService { name } => vec![Request::ServiceRemove { name: name.clone() }],
            Step::DisableNode { name } => vec![Request::NodeDisable { name: name.clone() }],
            Step::RemoveNode { name } => vec![Request::NodeRemove { name: name.clone() }],
            Step::UninviteNode { name } => vec![Request::NodeUninvite { name: name.clone() }],
        }
    }
}

/// The plan's line for the step: `+` adds, `~` changes, `-` takes away.
impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Step::InviteNode { name, role } => write!(f, "+ invite node {name} ({})", role_name(*role)),
            Step::ReinviteNode { name, role, was } => write!(
                f,
                "~ invite node {name} again as {} (was {}; the old token stops working)",
                role_name(*role),
                role_name(*was)
            ),
            Step::UpdateNetwork { mtu, was_mtu } => write!(f, "~ network: mtu {was_mtu} -> {mtu}"),
            Step::UpdateNode { name, endpoint, was_endpoint, mtu, was_mtu } => {
                let mut changes = Vec::new();
                if let Some(endpoint) = endpoint {
                    let was = was_endpoint.as_ref().map_or_else(|| "none".to_owned(), ToString::to_string);
                    changes.push(format!("endpoint {was} -> {endpoint}"));
                }
                if let (Some(mtu), Some(was)) = (mtu, was_mtu) {
                    changes.push(format!("mtu {was} -> {mtu}"));
                }
                write!(f, "~ node {name}: {}", changes.join(", "))
            }
            Step::EnableNode { name } => write!(f, "+ enable node {name}"),
            Step::AddService { name, node, target, port, protocol } => {
                write!(f, "+ add service {name} on {node}: {target}, port {port}{}", udp_suffix(*protocol))
            }
            Step::MoveService { name, node, was_node, target, port, protocol } => write!(
                f,
                "~ service {name}: node {was_node} -> {node} (removed and added again: new address), {target}, port \
                 {port}{}",
                udp_suffix(*protocol)
            ),
            Step::UpdateService { name, target, port, protocol, was_target, was_port, was_protocol } => {
                let mut changes = Vec::new();
                if target != was_target {
                    changes.push(format!("target {was_target} -> {target}"));
                }
                if port != was_port {
                    changes.push(format!("port {was_port} -> {port}"));
                }
                if protocol != was_protocol {
                    changes.push(format!("protocol {was_protocol} -> {protocol}"));
                }
                write!(f, "~ service {name}: {}", changes.join(", "))
            }
            Step::Expose { service, hostname, relay, tls } => {
                write!(f, "+ expose {service} on https://{hostname}/ through {relay} (tls {tls})")
            }
            Step::Unexpose { service, hostname } => write!(f, "- unexpose {service} from https://{hostname}/"),
            Step::ExposeTor { service, port, clients, was_port } => {
                let mut what = Vec::new();
                match (port, was_port) {
                    (Some(port), Some(was)) => what.push(format!("port {was} -> {port}")),
                    (Some(port), None) => what.push(format!("port {port}")),
                    _ => {}
                }
                if !clients.is_empty() {
                    what.push(format!("clients {}", list(clients)));
                }
                match what.is_empty() {
                    true => write!(f, "+ expose {service} over Tor"),
                    false => write!(f, "+ expose {service} over Tor: {}", what.join(", ")),
                }
            }
            Step::UnexposeTor { service, clients } if clients.is_empty() => {
                write!(f, "- unexpose {service} from Tor (its node keeps the key)")
            }
            Step::UnexposeTor { service, clients } => {
                write!(f, "- take Tor clients {} off {service} (a new descriptor without them)", list(clients))
            }
            Step::OpenTor { service, .. } => {
                write!(f, "~ expose {service} over Tor to anyone with the address (was authorized clients only)")
            }
            Step::AddDevice { name, allow } => write!(f, "+ add device {name} (allow {})", list(allow)),
            Step::AllowDevice { name, allow, was } if allow == was => {
                write!(f, "~ device {name}: allow {} again (a service it reaches moves)", list(allow))
            }
            Step::AllowDevice { name, allow, was } => {
                write!(f, "~ device {name}: allow {} -> {}", list(was), list(allow))
            }
            Step::AllowAccess { from, to } => write!(f, "+ allow {from} -> {to}"),
            Step::RevokeAccess { from, to } => write!(f, "- revoke {from} -> {to}"),
            Step::RemoveDevice { name } => write!(f, "- remove device {name}"),
            Step::RemoveService { name } => write!(f, "- remove service {name}"),
            Step::DisableNode { name } => write!(f, "- disable node {name}"),
            Step::RemoveNode { name } => write!(f, "- remove node {name}"),
            Step::UninviteNode { name } => write!(f, "- uninvite node {name}"),
        }
    }
}

/// `, udp` after a UDP service's port in plan lines; nothing for TCP, the default.
fn udp_suffix(protocol: Protocol) -> &'static str {
    match protocol {
        Protocol::Tcp => "",
        Protocol::Udp => ", udp",
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::labels;
    use super::*;
    use crate::fixtures::label;
    use crate::fixtures::named_key;

    #[test]
    fn steps_become_the_matching_requests() {
        let move_beacon = Step::MoveService {
            name: label("beacon"),
            node: label("vps"),
            was_node: label("hub"),
            target: "127.0.0.1:5052".parse().unwrap(),
            port: 80,
            protocol: Protocol::Udp,
        };
        assert_eq!(
            move_beacon.requests(60, || unreachable!("no device"), |_, _| unreachable!("no client")),
            [
                Request::ServiceRemove { name: label("beacon") },
                Request::ServiceAdd {
                    name: label("beacon"),
                    node: label("vps"),
                    target: "127.0.0.1:5052".parse().unwrap(),
                    port: Some(80),
                    protocol: Protocol::Udp,
                },
            ]
        );
        let reinvite = Step::ReinviteNode { name: label("vps"), role: Role::Relay, was: Role::Node };
        assert_eq!(
            reinvite.requests(60, || unreachable!("no device"), |_, _| unreachable!("no client")),
            [
                Request::NodeUninvite { name: label("vps") },
                Request::NodeInvite { name: label("vps"), role: Role::Relay, expires_secs: 60 },
            ]
        );
        let add = Step::AddDevice { name: label("phone"), allow: labels(&["wallet"]) };
        assert_eq!(
            add.requests(60, || named_key("KEY"), |_, _| unreachable!("no client")),
            [Request::DeviceAdd {
                name: label("phone"),
                allow: labels(&["wallet"]),
                public_key: named_key("KEY"),
                expect: None
            }]
        );
        let json = serde_json::to_value(Step::InviteNode { name: label("vps"), role: Role::Relay }).unwrap();
        assert_eq!(json, serde_json::json!({"op": "invite_node", "name": "vps", "role": "relay"}));
    }
}
