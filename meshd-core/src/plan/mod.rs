//! From the stored network to what one host must look like: its interface, peers ([`peers`]), access
//! rules ([`access`]), service forwarders ([`services`]), mesh DNS ([`dns`]), public names ([`public`]), onion
//! services ([`onion`]) and, on the hub, the sync service. [`nftables`] renders the access rules as text; [`crate::reconcile`] turns two plans into
//! the steps between them.
//!
//! No I/O here, so every rule about who reaches what is testable without root.

pub mod access;
pub mod dns;
pub mod nftables;
pub mod onion;
pub mod peers;
pub mod public;
pub mod services;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;

use crate::ipam::Pool;
use crate::keys::PublicKey;
use crate::model::{Node, Role, SYNC_PORT, Snapshot};
pub use access::{AccessPlan, Grant};
pub use dns::DnsPlan;
pub use onion::OnionPlan;
pub use peers::{PathRole, PeerPlan};
pub use public::PublicPlan;
pub use services::ServicePlan;

/// The desired state of one host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPlan {
    /// The WireGuard interface's name.
    pub interface: String,
    /// Its UDP port (and the join service's TCP port on the hub).
    pub listen_port: u16,
    /// Its MTU, bytes.
    pub mtu: u16,
    /// Addresses of the interface: the host's own (with the mesh prefix, which routes the mesh through
    /// it) and one host address per local service.
    pub addresses: BTreeSet<IpNet>,
    /// WireGuard peers by public key.
    pub peers: BTreeMap<PublicKey, PeerPlan>,
    /// Forwarders for the services this host serves (to the devices granted them, and to the nodes
    /// admitted to this host).
    pub services: Vec<ServicePlan>,
    /// Mesh DNS: on every host, so names resolve from the host's own copy of the network even while
    /// the controller is away.
    pub dns: DnsPlan,
    /// The sync service, on the hub only.
    pub sync: Option<SyncPlan>,
    /// Who may reach what through this host.
    pub access: AccessPlan,
    /// Public names this host serves (the relay) or terminates TLS for.
    pub public: PublicPlan,
    /// The onion services of the services this host runs.
    pub onions: OnionPlan,
}

/// The port meshd's own listeners on mesh addresses bind (a service's forwarder, the hub's sync service): the
/// host's access rules translate the port clients write to (the service's, [`SYNC_PORT`]) to it (nftables
/// `dnat`), so clients see no difference. A port below 1024, which only root (`CAP_NET_BIND_SERVICE`) can
/// bind: were meshd to listen on the clients' port, any other user on the host who bound `0.0.0.0:PORT` first
/// would make meshd's bind fail and be handed the clients' connections by the kernel. 1021 is set aside for
/// experiments (RFC 4727 section 7.2): no well-known service listens there. Every listener has mesh addresses
/// of its own, so the one port serves them all.
pub const PRIVILEGED_PORT: u16 = 1021;

/// The hub's sync service, which pushes the network's state to the members.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncPlan {
    /// The hub's mesh addresses, port [`SYNC_PORT`]: what members connect to.
    pub listen: Vec<SocketAddr>,
}

impl SyncPlan {
    /// The addresses the sync service binds: the hub's mesh addresses on [`PRIVILEGED_PORT`].
    pub fn bound(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        self.listen.iter().map(|addr| SocketAddr::new(addr.ip(), PRIVILEGED_PORT))
    }
}

/// Why no plan could be made for a host.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    /// The host is no node of the network.
    #[error("node {0:?} is not part of the network")]
    UnknownNode(String),
}

/// One host's view of the network: what every part of its plan is made from.
struct HostView<'a> {
    s: &'a Snapshot,
    node: &'a Node,
    pool: Pool,
    /// The nodes this host deals with: every active node; a disabled host is nobody's peer and keeps
    /// only the hub, whose tunnel (refused while disabled) it keeps trying, so that it hears of being
    /// enabled again.
    active: Vec<&'a Node>,
    is_hub: bool,
    /// The relay: the active node of role relay with an endpoint (the lowest address if several).
    relay: Option<&'a Node>,
}

impl<'a> HostView<'a> {
    fn new(s: &'a Snapshot, node: &'a Node) -> HostView<'a> {
        let active: Vec<&Node> = if node.active() {
            s.nodes.iter().filter(|n| n.active()).collect()
        } else {
            s.nodes.iter().filter(|n| n.role == Role::Hub).collect()
        };
        let relay =
            active.iter().filter(|n| n.role == Role::Relay && n.endpoint.is_some()).min_by_key(|n| n.index).copied();
        HostView { s, node, pool: s.network.pool(), active, is_hub: node.role == Role::Hub, relay }
    }

    /// The mesh ranges, IPv4 and IPv6.
    fn mesh(&self) -> [IpNet; 2] {
        [IpNet::V4(self.pool.v4()), IpNet::V6(self.pool.v6())]
    }

    /// The host routes (/32, /128) of address index `i`.
    fn host_nets(&self, i: u32) -> [IpNet; 2] {
        [
            IpNet::new(self.pool.v4_of(i).into(), 32).expect("/32 is valid"),
            IpNet::new(self.pool.v6_of(i).into(), 128).expect("/128 is valid"),
        ]
    }

    /// The addresses of address index `i`.
    fn host_addrs(&self, i: u32) -> [IpAddr; 2] {
        [IpAddr::V4(self.pool.v4_of(i)), IpAddr::V6(self.pool.v6_of(i))]
    }

    /// A node's routes: its own and its services'.
    fn routes_of(&self, n: &Node) -> Vec<IpNet> {
        std::iter::once(n.index)
            .chain(self.s.services.iter().filter(|v| v.node == n.name).map(|v| v.index))
            .flat_map(|i| self.host_nets(i))
            .collect()
    }

    /// This host's own addresses with `port`.
    fn own(&self, port: u16) -> Vec<SocketAddr> {
        self.host_addrs(self.node.index).iter().map(|&ip| SocketAddr::new(ip, port)).collect()
    }
}

/// What `host` must look like for the network in `s`.
///
/// Topology: the hub peers with every active node and every device. Two members peer directly when at
/// least one of them has an endpoint (the other, if behind NAT, keeps the tunnel open with keepalives).
/// Two members that both lack one reach each other through the relay (the active node of role relay
/// with an endpoint, the lowest address if several), whose peer entry on each of them also covers the
/// others behind NAT; so they keep reaching each other while the hub is down. Without a relay they go
/// through the hub, whose peer entry on each member covers the whole mesh range (WireGuard picks the
/// most specific AllowedIPs, so direct peers and the relay win).
pub fn plan_host(s: &Snapshot, host: &str) -> Result<HostPlan, PlanError> {
    let node =
        s.nodes.iter().find(|n| n.name.as_str() == host).ok_or_else(|| PlanError::UnknownNode(host.to_owned()))?;
    let view = HostView::new(s, node);
    let mut addresses = BTreeSet::from([
        IpNet::new(view.pool.v4_of(node.index).into(), view.pool.v4().prefix_len()).expect("the mesh prefix is valid"),
        IpNet::new(view.pool.v6_of(node.index).into(), view.pool.v6().prefix_len()).expect("the mesh prefix is valid"),
    ]);
    let admitted = access::admitted_nodes(&view);
    let mut served = services::plan(&view, &admitted);
    addresses.extend(served.addresses);
    let (public, public_grants) = public::plan(&view);
    served.grants.extend(public_grants);
    Ok(HostPlan {
        interface: node.interface.to_string(),
        listen_port: node.listen_port,
        mtu: node.mtu_in(&s.network),
        addresses,
        peers: peers::plan(&view),
        services: served.services,
        dns: dns::plan(&view),
        sync: view.is_hub.then(|| SyncPlan { listen: view.own(SYNC_PORT) }),
        access: access::plan(&view, admitted, served.grants),
        public,
        onions: onion::plan(&view),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{named_key, preshared_key};
    use crate::model::DeviceKeys;

    /// The public keys standing for `names`.
    fn keys(names: &[&str]) -> BTreeSet<PublicKey> {
        names.iter().map(|n| named_key(n)).collect()
    }
    use crate::input::Label;
    use crate::model::{AccessRule, Device, Network, Node, Protocol, Service};
    use crate::reconcile::{diff_addresses, diff_peers};

    fn label(s: &str) -> Label {
        s.parse().unwrap()
    }

    fn snapshot() -> Snapshot {
        Snapshot {
            network: Network {
                name: label("home"),
                domain: "home.internal".into(),
                cidr: "10.77.0.0/16".parse().unwrap(),
                ula: "fd00:1:2::/48".parse().unwrap(),
                mtu: 1420,
            },
            nodes: vec![Node {
                name: label("hub"),
                public_key: named_key("HUB"),
                index: 1,
                endpoint: Some("203.0.113.5:51820".parse().unwrap()),
                listen_port: 51820,
                interface: "meshd0".parse().unwrap(),
                role: Role::Hub,
                disabled: false,
                rotate_key: false,
                mtu: None,
            }],
            devices: vec![
                Device {
                    name: label("phone"),
                    keys: Some(DeviceKeys { public_key: named_key("PHONE"), preshared_key: preshared_key(1) }),
                    index: 4,
                    allow: vec![label("wallet")],
                },
                Device {
                    name: label("laptop"),
                    keys: Some(DeviceKeys { public_key: named_key("LAPTOP"), preshared_key: preshared_key(2) }),
                    index: 5,
                    allow: vec![label("explorer")],
                },
            ],
            services: vec![
                Service {
                    name: label("wallet"),
                    node: label("hub"),
                    target: "169.254.1.17:9737".parse().unwrap(),
                    port: 9737,
                    index: 2,
                    protocol: Protocol::Tcp,
                },
                Service {
                    name: label("explorer"),
                    node: label("hub"),
                    target: "127.0.0.1:3002".parse().unwrap(),
                    port: 80,
                    index: 3,
                    protocol: Protocol::Tcp,
                },
            ],
            rules: vec![],
            exposures: vec![],
            onions: vec![],
        }
    }

    #[test]
    fn hub_plan_has_every_device_as_a_host_route_peer() {
        let plan = plan_host(&snapshot(), "hub").unwrap();
        let phone = &plan.peers[&named_key("PHONE")];
        assert_eq!(
            phone.allowed_ips,
            vec!["10.77.0.4/32".parse().unwrap(), "fd00:1:2::4/128".parse::<IpNet>().unwrap()]
        );
        assert_eq!(phone.preshared_key, Some(preshared_key(1)));
        let addrs: Vec<String> = plan.addresses.iter().map(ToString::to_string).collect();
        assert_eq!(
            addrs,
            ["10.77.0.1/16", "10.77.0.2/32", "10.77.0.3/32", "fd00:1:2::1/64", "fd00:1:2::2/128", "fd00:1:2::3/128"]
        );
    }

    #[test]
    fn each_service_admits_its_devices_and_the_admitted_nodes() {
        let plan = plan_host(&snapshot(), "hub").unwrap();
        let wallet = plan.services.iter().find(|v| v.name.as_str() == "wallet").unwrap();
        let allowed: Vec<String> = wallet.allowed.iter().map(ToString::to_string).collect();
        assert_eq!(allowed, ["10.77.0.1", "10.77.0.4", "fd00:1:2::1", "fd00:1:2::4"], "the hub itself and the phone");
        assert_eq!(wallet.listen[0].to_string(), "10.77.0.2:9737");
        let explorer = plan.services.iter().find(|v| v.name.as_str() == "explorer").unwrap();
        assert_eq!(explorer.listen[1].to_string(), "[fd00:1:2::3]:80");
        assert!(!explorer.allowed.contains(&"10.77.0.4".parse().unwrap()));
    }

    #[test]
    fn a_udp_service_grants_and_forwards_udp_only() {
        let mut s = with_members();
        s.services.iter_mut().find(|v| v.name.as_str() == "beacon").unwrap().protocol = Protocol::Udp;
        for host in ["hub", "attic"] {
            let grants = plan_host(&s, host).unwrap().access.grants;
            let beacon: Vec<&Grant> = grants.iter().filter(|g| g.service.port() == 5052).collect();
            assert_eq!(beacon.len(), 2, "the phone, over v4 and v6, on {host}: {grants:?}");
            assert!(beacon.iter().all(|g| g.protocol == Protocol::Udp), "{host}: {beacon:?}");
            assert!(grants.iter().filter(|g| g.service.port() != 5052).all(|g| g.protocol == Protocol::Tcp));
        }
        let attic = plan_host(&s, "attic").unwrap();
        let beacon = attic.services.iter().find(|v| v.name.as_str() == "beacon").unwrap();
        assert_eq!(beacon.protocol, Protocol::Udp);
        assert!(beacon.allowed.contains(&"fd00:1:2::4".parse().unwrap()));
    }

    #[test]
    fn dns_names_every_node_device_and_service() {
        let dns = plan_host(&snapshot(), "hub").unwrap().dns;
        assert_eq!(
            dns.records["wallet.home.internal"],
            vec!["10.77.0.2".parse::<IpAddr>().unwrap(), "fd00:1:2::2".parse().unwrap()]
        );
        assert_eq!(
            dns.records.keys().cloned().collect::<Vec<_>>(),
            [
                "explorer.home.internal",
                "hub.home.internal",
                "laptop.home.internal",
                "phone.home.internal",
                "wallet.home.internal"
            ]
        );
        assert_eq!(dns.listen[0].to_string(), "10.77.0.1:53");
    }

    #[test]
    fn diff_touches_only_what_changed() {
        let s = snapshot();
        let before = plan_host(&s, "hub").unwrap();
        let mut changed = s.clone();
        changed.devices.retain(|d| d.name.as_str() != "laptop");
        changed.devices.push(Device {
            name: label("tablet"),
            keys: Some(DeviceKeys { public_key: named_key("TABLET"), preshared_key: preshared_key(3) }),
            index: 6,
            allow: vec![],
        });
        let after = plan_host(&changed, "hub").unwrap();
        let diff = diff_peers(&before.peers, &after.peers);
        assert_eq!(diff.remove, vec![named_key("LAPTOP")]);
        assert_eq!(diff.add.iter().map(|(k, _)| k.clone()).collect::<Vec<_>>(), [named_key("TABLET")]);
        assert!(diff.update.is_empty());
        assert!(diff_peers(&after.peers, &after.peers).is_empty());

        changed.services.retain(|v| v.name.as_str() != "explorer");
        let (add, remove) = diff_addresses(&before.addresses, &plan_host(&changed, "hub").unwrap().addresses);
        assert!(add.is_empty());
        assert_eq!(remove.iter().map(ToString::to_string).collect::<Vec<_>>(), ["10.77.0.3/32", "fd00:1:2::3/128"]);
    }

    fn with_members() -> Snapshot {
        let mut s = snapshot();
        let member = |name: &str, key: &str, index: u32, endpoint: Option<&str>| Node {
            name: label(name),
            public_key: named_key(key),
            index,
            endpoint: endpoint.map(|e| e.parse().unwrap()),
            listen_port: 51820,
            interface: "meshd0".parse().unwrap(),
            role: Role::Node,
            disabled: false,
            rotate_key: false,
            mtu: None,
        };
        s.nodes.push(member("vps", "VPS", 7, Some("198.51.100.7:51820")));
        s.nodes.push(member("attic", "ATTIC", 8, None));
        s.nodes.push(member("cellar", "CELLAR", 10, None));
        s.services.push(Service {
            name: label("beacon"),
            node: label("attic"),
            target: "127.0.0.1:5052".parse().unwrap(),
            port: 5052,
            index: 9,
            protocol: Protocol::Tcp,
        });
        s.devices[0].allow.push(label("beacon"));
        s
    }

    #[test]
    fn a_public_name_is_routed_on_its_relay_terminated_where_its_mode_says_and_let_through_to_the_service() {
        use crate::model::Exposure;
        use crate::relay::route::{Route, TlsMode};
        let mut s = with_members();
        let exposure = |name: &str, relay: &str, tls| Exposure {
            hostname: name.parse().unwrap(),
            service: label("beacon"),
            relay: label(relay),
            tls,
        };
        s.exposures = vec![
            exposure("pay.shop.example", "hub", TlsMode::Terminate),
            exposure("store.shop.example", "vps", TlsMode::Passthrough),
        ];
        let (pay, store) = ("pay.shop.example".parse().unwrap(), "store.shop.example".parse().unwrap());
        let beacon: SocketAddr = "10.77.0.9:5052".parse().unwrap();

        let hub = plan_host(&s, "hub").unwrap().public;
        assert_eq!(hub.routes, BTreeMap::from([(pay, Route { tls: TlsMode::Terminate, upstream: beacon })]));
        assert_eq!(hub.terminated.keys().map(ToString::to_string).collect::<Vec<_>>(), ["pay.shop.example"]);
        assert_eq!(hub.terminated.values().collect::<Vec<_>>(), [&beacon], "a service elsewhere: over the mesh");
        let vps = plan_host(&s, "vps").unwrap().public;
        let terminator = "10.77.0.8:1022".parse().unwrap();
        assert_eq!(
            vps.routes,
            BTreeMap::from([(store, Route { tls: TlsMode::Passthrough, upstream: terminator })]),
            "the relay passes the stream to the node's terminator"
        );
        assert!(vps.terminated.is_empty(), "a passthrough relay holds no certificate");

        let attic = plan_host(&s, "attic").unwrap();
        assert!(attic.public.routes.is_empty());
        assert_eq!(attic.public.terminated.keys().map(ToString::to_string).collect::<Vec<_>>(), ["store.shop.example"]);
        let target: SocketAddr = "127.0.0.1:5052".parse().unwrap();
        assert_eq!(
            attic.public.terminated.values().collect::<Vec<_>>(),
            [&target],
            "a local service: its target, directly"
        );
        assert_eq!(attic.public.passthrough_from, BTreeSet::from(["10.77.0.7".parse().unwrap()]));
        assert_eq!(
            attic.public.passthrough_listen(),
            ["10.77.0.8:1022".parse().unwrap(), "[fd00:1:2::8]:1022".parse().unwrap()]
        );
        let rules = nftables::render(&attic);
        assert!(rules.contains("10.77.0.1 . 10.77.0.9 . tcp . 1021"), "the hub reaches the service: {rules}");
        assert!(rules.contains("10.77.0.7 . 10.77.0.8 . tcp . 1022"), "the relay reaches the terminator: {rules}");

        s.nodes.iter_mut().find(|n| n.name.as_str() == "vps").unwrap().disabled = true;
        assert!(plan_host(&s, "attic").unwrap().public.passthrough_from.is_empty(), "a disabled relay serves nothing");
        assert!(plan_host(&s, "hub").unwrap().public.routes.len() == 1);
    }

    #[test]
    fn a_host_takes_its_own_mtu_else_the_network_s() {
        let mut s = with_members();
        s.network.mtu = 1340;
        s.nodes[2].mtu = Some(1420);
        assert_eq!(plan_host(&s, "hub").unwrap().mtu, 1340);
        assert_eq!(plan_host(&s, "vps").unwrap().mtu, 1340);
        assert_eq!(plan_host(&s, "attic").unwrap().mtu, 1420);
    }

    #[test]
    fn the_hub_peers_with_members_and_routes_to_their_services() {
        let plan = plan_host(&with_members(), "hub").unwrap();
        let attic = &plan.peers[&named_key("ATTIC")];
        assert_eq!(attic.endpoint, None, "behind NAT: the member keeps the tunnel open");
        assert_eq!(
            (attic.persistent_keepalive, attic.path),
            (Some(25), PathRole::LastResort),
            "the hub keeps its tunnels to nodes warm too, and never routes around one"
        );
        let phone = &plan.peers[&named_key("PHONE")];
        assert_eq!((phone.persistent_keepalive, phone.path), (None, PathRole::Device), "phones are left to sleep");
        let ips: Vec<String> = attic.allowed_ips.iter().map(ToString::to_string).collect();
        assert_eq!(ips, ["10.77.0.8/32", "fd00:1:2::8/128", "10.77.0.9/32", "fd00:1:2::9/128"]);
        assert_eq!(plan.peers[&named_key("VPS")].endpoint, Some("198.51.100.7:51820".parse().unwrap()));
        assert!(plan.access.routes);
        let beacon: SocketAddr = "10.77.0.9:5052".parse().unwrap();
        let phone = Grant { source: "10.77.0.4".parse().unwrap(), service: beacon, protocol: Protocol::Tcp };
        assert!(plan.access.grants.contains(&phone), "routed grant for the phone");
        assert!(!plan.services.iter().any(|v| v.name.as_str() == "beacon"), "the hub does not serve it itself");
        assert_eq!(plan.access.nodes.len(), 8, "four nodes, two addresses each");
    }

    fn nets(ips: &[IpNet]) -> Vec<String> {
        ips.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn hosts_behind_nat_reach_each_other_through_the_relay() {
        let mut s = with_members();
        let mut relay = s.nodes.iter().find(|n| n.name.as_str() == "vps").unwrap().clone();
        relay.name = label("relay");
        relay.public_key = named_key("RELAY");
        relay.index = 11;
        relay.role = Role::Relay;
        s.nodes.push(relay);

        let attic = plan_host(&s, "attic").unwrap();
        assert_eq!(attic.peers.keys().cloned().collect::<BTreeSet<_>>(), keys(&["HUB", "RELAY", "VPS"]));
        assert_eq!(
            nets(&attic.peers[&named_key("RELAY")].allowed_ips),
            ["10.77.0.11/32", "fd00:1:2::b/128", "10.77.0.10/32", "fd00:1:2::a/128"],
            "the relay carries the attic's traffic to the cellar"
        );
        let cellar = plan_host(&s, "cellar").unwrap();
        assert_eq!(
            nets(&cellar.peers[&named_key("RELAY")].allowed_ips),
            ["10.77.0.11/32", "fd00:1:2::b/128", "10.77.0.8/32", "fd00:1:2::8/128", "10.77.0.9/32", "fd00:1:2::9/128"],
            "and the cellar's to the attic and its service"
        );
        assert_eq!(
            nets(&plan_host(&s, "vps").unwrap().peers[&named_key("RELAY")].allowed_ips),
            ["10.77.0.11/32", "fd00:1:2::b/128"]
        );

        let relay = plan_host(&s, "relay").unwrap();
        assert!(relay.access.routes && relay.sync.is_none());
        assert!(relay.access.members.contains(&"10.77.0.8".parse().unwrap()));
        assert!(!plan_host(&s, "vps").unwrap().access.routes);

        // A relay without an endpoint is a plain node (behind NAT itself: reached through the hub).
        let mut unreachable = s.clone();
        unreachable.nodes.iter_mut().find(|n| n.name.as_str() == "relay").unwrap().endpoint = None;
        let attic = plan_host(&unreachable, "attic").unwrap();
        assert_eq!(attic.peers.keys().cloned().collect::<BTreeSet<_>>(), keys(&["HUB", "VPS"]));
        assert!(!plan_host(&unreachable, "relay").unwrap().access.routes);

        // A disabled relay relays nothing: the hub takes over.
        s.nodes.iter_mut().find(|n| n.name.as_str() == "relay").unwrap().disabled = true;
        let attic = plan_host(&s, "attic").unwrap();
        assert!(!attic.peers.contains_key(&named_key("RELAY")));
        assert!(!plan_host(&s, "relay").unwrap().access.routes);
    }

    #[test]
    fn members_peer_directly_when_one_side_has_an_endpoint() {
        let s = with_members();
        let attic = plan_host(&s, "attic").unwrap();
        assert_eq!(
            attic.peers.keys().cloned().collect::<BTreeSet<_>>(),
            keys(&["HUB", "VPS"]),
            "cellar is behind NAT too: via the hub"
        );
        let hub = &attic.peers[&named_key("HUB")];
        assert_eq!(nets(&hub.allowed_ips), ["10.77.0.0/16", "fd00:1:2::/64"], "the hub covers the rest of the mesh");
        assert_eq!((hub.persistent_keepalive, hub.path), (Some(25), PathRole::LastResort));
        assert_eq!(hub.endpoint, Some("203.0.113.5:51820".parse().unwrap()));
        let vps = &attic.peers[&named_key("VPS")];
        assert_eq!(nets(&vps.allowed_ips), ["10.77.0.7/32", "fd00:1:2::7/128"]);
        assert_eq!((vps.endpoint.is_some(), vps.persistent_keepalive), (true, Some(25)));
        assert_eq!(vps.path, PathRole::Fallback, "a silent direct peer is reached through the hub");

        let vps = plan_host(&s, "vps").unwrap();
        assert_eq!(vps.peers.keys().cloned().collect::<BTreeSet<_>>(), keys(&["ATTIC", "CELLAR", "HUB"]));
        let attic = &vps.peers[&named_key("ATTIC")];
        assert_eq!(attic.endpoint, None, "behind NAT: attic opens the tunnel");
        assert_eq!(nets(&attic.allowed_ips), ["10.77.0.8/32", "fd00:1:2::8/128", "10.77.0.9/32", "fd00:1:2::9/128"]);
        assert!(!vps.access.routes && vps.sync.is_none());
        assert!(vps.dns.clients.is_empty(), "a member's DNS serves the host itself, not the mesh");
        assert_eq!(vps.dns.records, plan_host(&s, "hub").unwrap().dns.records, "every host serves the same names");
    }

    #[test]
    fn a_member_admits_nodes_and_the_devices_granted_its_services() {
        let plan = plan_host(&with_members(), "attic").unwrap();
        let beacon = plan.services.iter().find(|v| v.name.as_str() == "beacon").expect("the member serves beacon");
        assert!(beacon.allowed.contains(&"10.77.0.4".parse().unwrap()));
        assert!(
            plan.access.grants.iter().all(|g| g.service.port() == 5052),
            "only grants to its own services: {:?}",
            plan.access.grants
        );
        assert_eq!(plan.access.nodes.len(), 8, "four nodes, two addresses each");
        assert!(plan.access.members.is_empty());
    }

    #[test]
    fn access_rules_restrict_the_receiving_host_only() {
        let mut s = with_members();
        s.rules.push(AccessRule { from: label("attic"), to: label("vps") });
        let vps = plan_host(&s, "vps").unwrap();
        let admitted: Vec<String> = vps.access.nodes.iter().map(ToString::to_string).collect();
        assert_eq!(admitted, ["10.77.0.7", "10.77.0.8", "fd00:1:2::7", "fd00:1:2::8"], "itself and attic only");
        assert_eq!(vps.peers.len(), 3, "rules do not change who peers with whom");
        let attic = plan_host(&s, "attic").unwrap();
        assert_eq!(attic.access.nodes.len(), 8, "attic has no rule: every node reaches it");
        let hub = plan_host(&s, "hub").unwrap();
        assert_eq!(hub.access.members.len(), 8, "the hub routes for and syncs every node");
        assert_eq!(hub.sync.unwrap().listen[0].to_string(), "10.77.0.1:51871");
    }

    #[test]
    fn a_disabled_node_is_nobodys_peer() {
        let mut s = with_members();
        s.nodes[1].disabled = true;
        for host in ["hub", "attic", "cellar"] {
            let plan = plan_host(&s, host).unwrap();
            assert!(!plan.peers.contains_key(&named_key("VPS")), "{host} still peers with the disabled node");
            assert!(!plan.access.nodes.contains(&"10.77.0.7".parse().unwrap()));
        }
        assert!(!plan_host(&s, "hub").unwrap().dns.records.contains_key("vps.home.internal"));
        let vps = plan_host(&s, "vps").unwrap();
        assert_eq!(
            vps.peers.keys().cloned().collect::<BTreeSet<_>>(),
            keys(&["HUB"]),
            "only the hub, to hear of being enabled"
        );
        assert!(vps.services.is_empty());
    }

    #[test]
    fn a_changed_peer_is_an_update() {
        let before = plan_host(&with_members(), "hub").unwrap();
        let mut moved = with_members();
        moved.nodes[1].endpoint = Some("198.51.100.99:51820".parse().unwrap());
        let diff = diff_peers(&before.peers, &plan_host(&moved, "hub").unwrap().peers);
        assert!(diff.add.is_empty() && diff.remove.is_empty());
        assert_eq!(diff.update.iter().map(|(k, _)| k.clone()).collect::<Vec<_>>(), [named_key("VPS")]);
    }

    #[test]
    fn unknown_host_is_an_error() {
        assert_eq!(plan_host(&snapshot(), "ghost"), Err(PlanError::UnknownNode("ghost".into())));
    }
}
