//! The network as the controller knows it: what is stored, and the views of it that travel to `meshctl`.
//!
//! Secrets stay out of the view types, so nothing that is printed or sent over the admin socket can
//! carry a preshared key.

use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};

use crate::acme::renewal::Status;
use crate::clock::{self, Stamp};
use crate::input::{HostPort, InterfaceName, Label, PublicName};
use crate::ipam::Pool;
use crate::keys::{PresharedKey, PublicKey};
use crate::relay::route::TlsMode;
use crate::tor::client::ClientPublicKey;
use crate::tor::onion::OnionAddress;

/// Persistent keepalive handed to roaming devices: they sit behind NAT and must keep the hub's
/// session fresh so it can reach them.
pub const DEVICE_KEEPALIVE_SECS: u16 = 25;

/// Persistent keepalive between hosts: a host behind NAT stays reachable, and a restarted host renews
/// its sessions at once.
pub const NODE_KEEPALIVE_SECS: u16 = 25;

/// TCP port of the hub's sync service, on its mesh addresses only (members reach it through their tunnel,
/// which is what authenticates them).
pub const SYNC_PORT: u16 = 51871;

/// Default MTU of the mesh interfaces: 1500 minus WireGuard's worst-case overhead (an IPv6 underlay: 40 bytes
/// IPv6 header, 8 UDP, 32 WireGuard). A network sets its own at `meshd init --mtu`, a host at `meshd join --mtu`.
pub const MESH_MTU: u16 = 1420;

/// The default of [`Network::mtu`] (states and databases from before MTUs could be set).
fn default_mtu() -> u16 {
    MESH_MTU
}

/// The network and its address ranges.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Network {
    /// The network's name (in tokens and messages).
    pub name: Label,
    /// DNS domain of its names (`<name>.<domain>`), lowercase, without the final dot.
    pub domain: String,
    /// IPv4 range of its addresses.
    pub cidr: Ipv4Net,
    /// Its random RFC 4193 unique local /48; hosts are numbered in its first /64.
    pub ula: Ipv6Net,
    /// MTU of every mesh interface without its own ([`Node::mtu`]) and of the devices' configs, bytes.
    #[serde(default = "default_mtu")]
    pub mtu: u16,
}

impl Network {
    /// The address pool of this network.
    pub fn pool(&self) -> Pool {
        Pool::new(self.cidr, self.ula)
    }

    /// `name.domain`.
    pub fn fqdn(&self, name: &Label) -> String {
        format!("{name}.{}", self.domain)
    }
}

/// What a node does in the mesh.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// The controller host: every roaming device peers with it.
    Hub,
    /// A mesh member.
    Node,
    /// A mesh member with a public endpoint meant to carry traffic for members behind NAT.
    Relay,
}

/// A host that runs `meshd`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    /// The node's name.
    pub name: Label,
    /// Its WireGuard public key, standard base64 (44 characters).
    pub public_key: PublicKey,
    /// Host index in the network's [`Pool`]: one IPv4 and one IPv6 address.
    pub index: u32,
    /// Where other hosts reach it (`HOST:PORT`); `None` behind NAT: it is reached through the hub.
    pub endpoint: Option<HostPort>,
    /// UDP port its WireGuard interface listens on.
    pub listen_port: u16,
    /// Name of its WireGuard interface, e.g. `meshd0`.
    pub interface: InterfaceName,
    /// What it does in the mesh.
    pub role: Role,
    /// A disabled node keeps its name and addresses but is nobody's peer until enabled again.
    #[serde(default)]
    pub disabled: bool,
    /// The operator asked for a new key: the host makes one itself on its next contact.
    #[serde(default)]
    pub rotate_key: bool,
    /// Its interface's own MTU, bytes (a host behind a smaller path); `None`: the network's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u16>,
}

impl Node {
    /// Whether the node takes part in the mesh now.
    pub fn active(&self) -> bool {
        !self.disabled
    }

    /// The MTU of its interface in `network`, bytes: its own, else the network's.
    pub fn mtu_in(&self, network: &Network) -> u16 {
        self.mtu.unwrap_or(network.mtu)
    }
}

/// A roaming peer (a phone or laptop with the stock WireGuard app).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    /// The device's name.
    pub name: Label,
    /// Its keys: known on the controller's host only (members are never told them).
    pub keys: Option<DeviceKeys>,
    /// Host index in the network's [`Pool`]: one IPv4 and one IPv6 address.
    pub index: u32,
    /// Services this device may reach.
    pub allow: Vec<Label>,
}

/// A device's keys, as the controller's host holds them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceKeys {
    /// The device's WireGuard public key; the private key stays with the device.
    pub public_key: PublicKey,
    /// Secret: goes to the hub's interface, never into a view.
    pub preshared_key: PresharedKey,
}

/// What the hosts know of a device: its address and grants, never its keys.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceGrants {
    /// The device's name.
    pub name: Label,
    /// Host index in the network's [`Pool`]: one IPv4 and one IPv6 address.
    pub index: u32,
    /// Services this device may reach.
    pub allow: Vec<Label>,
}

/// `from` may reach `to`. A node named as `to` by any rule admits only the nodes its rules name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct AccessRule {
    /// The node that may reach `to`.
    pub from: Label,
    /// The node reached.
    pub to: Label,
}

/// The transport a service speaks; its forwarder and access rules are for that protocol only.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// Streams: one relayed connection per client connection (the default).
    #[default]
    Tcp,
    /// Datagrams: one relayed session per client address and port.
    Udp,
}

impl Protocol {
    /// `tcp` or `udp`, as in the CLI, the declaration file and nftables.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

impl std::str::FromStr for Protocol {
    type Err = crate::input::InputError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "tcp" => Ok(Protocol::Tcp),
            "udp" => Ok(Protocol::Udp),
            _ => Err(crate::input::InputError::Protocol(s.to_owned())),
        }
    }
}

/// A TCP or UDP service on a node, exposed to the mesh on its own mesh address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Service {
    /// The service's name.
    pub name: Label,
    /// The node that runs it.
    pub node: Label,
    /// Where that node forwards its connections or datagrams to.
    pub target: HostPort,
    /// Port on the service's mesh address.
    pub port: u16,
    /// Host index in the network's [`Pool`]: one IPv4 and one IPv6 address.
    pub index: u32,
    /// Absent in states cached before UDP services existed: those were all TCP.
    #[serde(default)]
    pub protocol: Protocol,
}

/// A service served on a public name over HTTPS through a relay (`meshctl expose`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Exposure {
    /// The public name (the certificate's, the SNI and `Host` clients send).
    pub hostname: PublicName,
    /// The service, a TCP one speaking HTTP.
    pub service: Label,
    /// The node whose public address the name points at: the hub or a node of role relay.
    pub relay: Label,
    /// Where TLS ends: on the relay, or passed through to the service's node.
    pub tls: TlsMode,
}

/// A service served as a Tor onion service by its node (`meshctl expose SERVICE --tor`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct OnionService {
    /// The service, a TCP one.
    pub service: Label,
    /// The port clients connect to at the `.onion` address (the virtual port of `HiddenServicePort`).
    pub port: u16,
    /// Only authorized clients may find it: set once a client is authorized and kept while it is served, so
    /// that removing the last client (or its device) leaves it unreachable rather than open to anyone.
    pub authorized_only: bool,
    /// The clients authorized to find it, by device name.
    pub clients: Vec<OnionClient>,
}

/// A device authorized to find an onion service (client authorization, rend-spec-v3 section 2.5.1.2).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct OnionClient {
    /// The device.
    pub device: Label,
    /// The public half of its x25519 key (the private half was handed out once and never stored).
    pub public_key: ClientPublicKey,
}

/// Everything the controller stores about one network: the input of every desired-state computation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// The network's identity and ranges.
    pub network: Network,
    /// Every node, the hub included, by index.
    pub nodes: Vec<Node>,
    /// Every device, by index.
    pub devices: Vec<Device>,
    /// Every service, by index.
    pub services: Vec<Service>,
    /// Every access rule, sorted.
    pub rules: Vec<AccessRule>,
    /// Every public name, sorted by name.
    pub exposures: Vec<Exposure>,
    /// Every onion service, sorted by service.
    pub onions: Vec<OnionService>,
}

/// What every host of the network is told: the controller's snapshot without any secret. Members
/// plan their own interface from it, exactly as the hub plans its own from the full snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SharedState {
    /// The network's identity and ranges.
    pub network: Network,
    /// Every node, the hub included.
    pub nodes: Vec<Node>,
    /// Every service.
    pub services: Vec<Service>,
    /// Every device, without its keys.
    pub devices: Vec<DeviceGrants>,
    /// Every access rule.
    pub rules: Vec<AccessRule>,
    /// Every public name; absent in states of a hub from before public names, and left out when there is none
    /// (so the digest of a network without public names is what members from before them compute).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exposures: Vec<Exposure>,
    /// Every onion service; left out when there is none, like [`SharedState::exposures`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub onions: Vec<OnionService>,
}

/// The first address index of `items` outside `network`'s range: a damaged database or cached file
/// (meshd never stores one), which must not be planned from.
fn check_indexes<'a>(
    network: &Network,
    nodes: &'a [Node],
    services: &'a [Service],
    devices: impl Iterator<Item = (&'a Label, u32)>,
) -> Result<(), String> {
    let max = network.pool().max_index();
    let mut items =
        nodes.iter().map(|n| (&n.name, n.index)).chain(services.iter().map(|v| (&v.name, v.index))).chain(devices);
    match items.find(|(_, index)| !(1..=max).contains(index)) {
        Some((name, index)) => Err(format!("{name} has address index {index}, outside {} (1 to {max})", network.cidr)),
        None => Ok(()),
    }
}

impl SharedState {
    /// The hub node.
    pub fn hub(&self) -> Option<&Node> {
        hub_of(&self.nodes)
    }

    /// Every node, service and device has an address index within the network's range, and every node
    /// a listen port (interface names are checked when read: [`crate::input::InterfaceName`]).
    pub fn check(&self) -> Result<(), String> {
        if let Some(node) = self.nodes.iter().find(|n| n.listen_port == 0) {
            return Err(format!("node {} listens on port 0", node.name));
        }
        check_indexes(&self.network, &self.nodes, &self.services, self.devices.iter().map(|d| (&d.name, d.index)))
    }

    /// The state as a snapshot a member can plan from: devices without keys (members never peer
    /// with devices; they only admit them to their services).
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            network: self.network.clone(),
            nodes: self.nodes.clone(),
            devices: self
                .devices
                .iter()
                .map(|d| Device { name: d.name.clone(), keys: None, index: d.index, allow: d.allow.clone() })
                .collect(),
            services: self.services.clone(),
            rules: self.rules.clone(),
            exposures: self.exposures.clone(),
            onions: self.onions.clone(),
        }
    }
}

impl Snapshot {
    /// Every node, service and device has an address index within the network's range.
    pub fn check(&self) -> Result<(), String> {
        check_indexes(&self.network, &self.nodes, &self.services, self.devices.iter().map(|d| (&d.name, d.index)))
    }

    /// What the hosts are told of this network.
    pub fn shared(&self) -> SharedState {
        SharedState {
            network: self.network.clone(),
            nodes: self.nodes.clone(),
            services: self.services.clone(),
            devices: self
                .devices
                .iter()
                .map(|d| DeviceGrants { name: d.name.clone(), index: d.index, allow: d.allow.clone() })
                .collect(),
            rules: self.rules.clone(),
            exposures: self.exposures.clone(),
            onions: self.onions.clone(),
        }
    }

    /// The hub node.
    pub fn hub(&self) -> Option<&Node> {
        hub_of(&self.nodes)
    }

    /// The view of a node.
    pub fn node_view(&self, node: &Node) -> NodeView {
        let pool = self.network.pool();
        NodeView {
            name: node.name.clone(),
            public_key: node.public_key.clone(),
            address: pool.v4_of(node.index),
            address_v6: pool.v6_of(node.index),
            endpoint: node.endpoint.as_ref().map(ToString::to_string),
            role: node.role,
            dns_name: self.network.fqdn(&node.name),
            disabled: node.disabled,
            rotate_key: node.rotate_key,
            last_heard: None,
            mtu: node.mtu_in(&self.network),
        }
    }

    /// The view of a device; `last_handshake` is filled in by the daemon that sees the interface.
    pub fn device_view(&self, device: &Device) -> DeviceView {
        let pool = self.network.pool();
        DeviceView {
            name: device.name.clone(),
            public_key: device.keys.as_ref().map(|k| k.public_key.clone()),
            address: pool.v4_of(device.index),
            address_v6: pool.v6_of(device.index),
            allow: device.allow.clone(),
            dns_name: self.network.fqdn(&device.name),
            last_handshake: None,
        }
    }

    /// The view of a service.
    pub fn service_view(&self, service: &Service) -> ServiceView {
        let pool = self.network.pool();
        ServiceView {
            name: service.name.clone(),
            node: service.node.clone(),
            protocol: service.protocol,
            target: service.target.to_string(),
            mesh_address: format!("{}:{}", pool.v4_of(service.index), service.port),
            mesh_address_v6: format!("[{}]:{}", pool.v6_of(service.index), service.port),
            dns_name: self.network.fqdn(&service.name),
            devices: self.devices.iter().filter(|d| d.allow.contains(&service.name)).map(|d| d.name.clone()).collect(),
            https: self
                .exposures
                .iter()
                .filter(|e| e.service == service.name)
                .map(|e| PublicUrl {
                    url: format!("https://{}/", e.hostname),
                    hostname: e.hostname.clone(),
                    relay: e.relay.clone(),
                    tls: e.tls,
                    certificate: None,
                })
                .collect(),
            tor: self.onions.iter().find(|o| o.service == service.name).map(|o| OnionView {
                port: o.port,
                authorized_only: o.authorized_only,
                address: None,
                clients: o.clients.iter().map(|c| c.device.clone()).collect(),
                error: None,
            }),
        }
    }
}

/// The node of role hub among `nodes`.
fn hub_of(nodes: &[Node]) -> Option<&Node> {
    nodes.iter().find(|n| n.role == Role::Hub)
}

/// A node as `meshctl node list` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeView {
    /// The node's name.
    pub name: Label,
    /// Its WireGuard public key, standard base64.
    pub public_key: PublicKey,
    /// Its mesh IPv4 address.
    pub address: Ipv4Addr,
    /// Its mesh IPv6 address.
    pub address_v6: Ipv6Addr,
    /// `HOST:PORT` where other hosts reach it, if anywhere.
    pub endpoint: Option<String>,
    /// What it does in the mesh.
    pub role: Role,
    /// `<name>.<domain>`.
    pub dns_name: String,
    /// Kept out of the mesh until enabled.
    pub disabled: bool,
    /// A new key was asked for and the host has not made it yet.
    pub rotate_key: bool,
    /// Unix seconds at which the hub last heard from the node (a packet through its tunnel, or a
    /// handshake), as the running hub saw it; `None` for the hub itself, a node never heard from since
    /// the hub started, or with the hub's daemon not running.
    #[serde(default)]
    pub last_heard: Option<u64>,
    /// Its interface's MTU, bytes (its own, else the network's); absent from controllers before MTUs.
    #[serde(default = "default_mtu")]
    pub mtu: u16,
}

/// A device as `meshctl device list` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceView {
    /// The device's name.
    pub name: Label,
    /// Its WireGuard public key (always known where views are made: on the controller's host).
    pub public_key: Option<PublicKey>,
    /// Its mesh IPv4 address.
    pub address: Ipv4Addr,
    /// Its mesh IPv6 address.
    pub address_v6: Ipv6Addr,
    /// Services it may reach.
    pub allow: Vec<Label>,
    /// `<name>.<domain>`.
    pub dns_name: String,
    /// Unix seconds of the last WireGuard handshake seen by the hub, if any.
    pub last_handshake: Option<u64>,
}

/// A service as `meshctl service list` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceView {
    /// The service's name.
    pub name: Label,
    /// The node that runs it.
    pub node: Label,
    /// `tcp` or `udp`; absent in replies of a controller from before UDP services (all TCP).
    #[serde(default)]
    pub protocol: Protocol,
    /// Where its node forwards it to, `HOST:PORT`.
    pub target: String,
    /// `IPv4:PORT` where the mesh reaches it.
    pub mesh_address: String,
    /// `[IPv6]:PORT` where the mesh reaches it.
    pub mesh_address_v6: String,
    /// `<name>.<domain>`.
    pub dns_name: String,
    /// Devices allowed to reach it.
    pub devices: Vec<Label>,
    /// Its public names; absent in replies of a controller from before public names.
    #[serde(default)]
    pub https: Vec<PublicUrl>,
    /// Its onion service, if exposed over Tor; absent in replies of a controller from before onion services.
    #[serde(default)]
    pub tor: Option<OnionView>,
}

/// A service's onion service as `meshctl service list` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OnionView {
    /// The port at the `.onion` address.
    pub port: u16,
    /// The address, as the service's node last reported it; `None` until it has (it makes the key when it
    /// learns of the exposure), or after an error.
    pub address: Option<OnionAddress>,
    /// Only authorized clients may find it (with none left, nobody can).
    pub authorized_only: bool,
    /// The devices authorized to find it.
    pub clients: Vec<Label>,
    /// Why the node cannot serve it (no `tor`, one too old), as it last reported.
    pub error: Option<String>,
}

/// A service's public name as `meshctl service list` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublicUrl {
    /// `https://NAME/` (the port is the relay's `--https-port`, 443 unless changed).
    pub url: String,
    /// The name.
    pub hostname: PublicName,
    /// The relay whose public address serves it.
    pub relay: Label,
    /// Where TLS ends.
    pub tls: TlsMode,
    /// The certificate's state as its holder (the relay in terminate mode, the service's node in
    /// passthrough) last reported it; `None` when it has not (the holder is another host that has not
    /// reported since the hub started).
    pub certificate: Option<CertificateReport>,
}

/// A certificate's state, as reported by the host that holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertificateReport {
    /// The host that holds it.
    pub holder: Label,
    /// The state: pending, valid until, expired, with the last error.
    #[serde(flatten)]
    pub status: Status,
}

/// The network as `meshctl status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkView {
    /// The network's name.
    pub name: Label,
    /// Its DNS domain.
    pub domain: String,
    /// Its IPv4 range.
    pub cidr: Ipv4Net,
    /// The IPv6 /64 its hosts are numbered in.
    pub cidr_v6: Ipv6Net,
    /// MTU of the hosts without their own and of the devices, bytes; absent from controllers before MTUs.
    #[serde(default = "default_mtu")]
    pub mtu: u16,
}

/// Where an invite stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InviteStatus {
    /// Not redeemed or cancelled yet (it may have expired).
    Pending,
    /// A host joined with it.
    Redeemed,
    /// Cancelled by the operator, or expired and replaced by a new invite for the name.
    Cancelled,
}

/// An invite as stored: the secret only as its hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invite {
    /// Its id, 128 bits as hex (also in the token).
    pub id: String,
    /// The name the joining host gets.
    pub name: Label,
    /// The role it gets ([`Role::Node`] or [`Role::Relay`]).
    pub role: Role,
    /// Hex SHA-256 of the token's secret ([`crate::wire::invite::hash_secret`]).
    pub secret_hash: String,
    /// When it was made.
    pub created: Stamp,
    /// Unix seconds, by the wall clock when it was made: `created.wall` + its lifetime.
    pub expires_at: i64,
    /// Where it stands.
    pub status: InviteStatus,
}

impl Invite {
    /// Real seconds left of its lifetime at `now` (zero or less: expired that long ago), measured with
    /// [`clock::seconds_between`] so that a wall clock stepped forward or back neither cuts an invite
    /// short nor stretches it.
    pub fn seconds_left(&self, now: &Stamp) -> i64 {
        let lifetime = self.expires_at.saturating_sub(self.created.wall);
        lifetime.saturating_sub(clock::seconds_between(&self.created, now))
    }

    /// When it expires, unix seconds by the wall clock at `now`: the stored time while the wall clock has
    /// kept pace with real time since it was made (within a second: the two clocks tick over at different
    /// instants, which must not make two listings differ), else `now` plus the real time left.
    pub fn expires_at_by(&self, now: &Stamp) -> i64 {
        let drift = now.wall.saturating_sub(self.created.wall) - clock::seconds_between(&self.created, now);
        if drift.abs() <= 1 { self.expires_at } else { now.wall.saturating_add(self.seconds_left(now)) }
    }
}

/// An unredeemed invite as `meshctl node invites` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InviteView {
    /// The name the joining host gets.
    pub name: Label,
    /// The role it gets.
    pub role: Role,
    /// Unix seconds.
    pub expires_at: i64,
}
