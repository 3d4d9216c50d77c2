//! Samples for tests, in this crate and (with the `test-support` feature) in the daemon's: a small
//! network's shared state and host plans for the planner's consumers (nftables text, the loaded
//! ruleset).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use crate::input::Label;
use crate::keys::{PresharedKey, PublicKey};
use crate::model::{DeviceGrants, Network, Node, Protocol, Role, Service, SharedState};
use crate::plan::{AccessPlan, DnsPlan, Grant, HostPlan, PublicPlan, ServicePlan, SyncPlan};

/// A name from a literal (panics on a bad one: for tests).
pub fn label(s: &str) -> Label {
    s.parse().expect("a valid sample name")
}

/// A valid public key made from `n` (32 bytes of it), for samples.
pub fn public_key(n: u32) -> PublicKey {
    use base64::Engine as _;
    let bytes = [u8::try_from(n % 256).unwrap_or(0); 32];
    PublicKey::parse(&base64::engine::general_purpose::STANDARD.encode(bytes)).expect("32 bytes are a key")
}

/// A valid public key standing for `name` (the SHA-256 of it), for samples that name their keys.
pub fn named_key(name: &str) -> PublicKey {
    use base64::Engine as _;
    use sha2::Digest as _;
    let digest = sha2::Sha256::digest(name.as_bytes());
    PublicKey::parse(&base64::engine::general_purpose::STANDARD.encode(digest)).expect("32 bytes are a key")
}

/// A valid preshared key made from `n`, for samples.
pub fn preshared_key(n: u8) -> PresharedKey {
    use base64::Engine as _;
    PresharedKey::parse(&base64::engine::general_purpose::STANDARD.encode([n; 32])).expect("32 bytes are a key")
}

/// A node with sample key [`public_key`]`(index)`; index 1 is the hub.
pub fn node(name: &str, index: u32) -> Node {
    Node {
        name: label(name),
        public_key: public_key(index),
        index,
        endpoint: None,
        listen_port: 51820,
        interface: "meshd0".parse().expect("a valid sample interface"),
        role: if index == 1 { Role::Hub } else { Role::Node },
        disabled: false,
        rotate_key: false,
        mtu: None,
    }
}

/// A network `home` (10.77.0.0/16) with hub, vps and attic, a TCP service `beacon` on attic and a
/// device `phone` allowed to it.
pub fn sample_state() -> SharedState {
    SharedState {
        network: Network {
            name: label("home"),
            domain: "home.internal".into(),
            cidr: "10.77.0.0/16".parse().expect("sample value"),
            ula: "fd00:1:2::/48".parse().expect("sample value"),
            mtu: 1420,
        },
        nodes: vec![node("hub", 1), node("vps", 2), node("attic", 3)],
        services: vec![Service {
            name: label("beacon"),
            node: label("attic"),
            target: "127.0.0.1:5052".parse().expect("sample value"),
            port: 5052,
            index: 4,
            protocol: Protocol::Tcp,
        }],
        devices: vec![DeviceGrants { name: label("phone"), index: 5, allow: vec![label("beacon")] }],
        rules: vec![],
        exposures: vec![],
        onions: vec![],
    }
}

/// A host plan with one TCP service (`wallet`, on 10.77.0.2 and fd00::2 port 9737) that the sources in
/// `allowed` may reach; `routes` makes it the hub's (routing, sync listener, members known).
pub fn sample_host_plan(allowed: &[&str], routes: bool) -> HostPlan {
    let wallet: Vec<std::net::SocketAddr> =
        vec!["10.77.0.2:9737".parse().expect("sample address"), "[fd00::2]:9737".parse().expect("sample address")];
    let allowed: BTreeSet<IpAddr> = allowed.iter().map(|a| a.parse().expect("sample address")).collect();
    HostPlan {
        interface: "wg-home.1".parse().expect("a valid sample interface"),
        listen_port: 51820,
        mtu: 1420,
        addresses: BTreeSet::new(),
        peers: BTreeMap::new(),
        services: vec![ServicePlan {
            name: "wallet".parse().expect("sample address"),
            listen: wallet.clone(),
            target: "127.0.0.1:9737".parse().expect("sample address"),
            allowed: allowed.clone(),
            protocol: Protocol::Tcp,
        }],
        sync: routes.then(|| SyncPlan { listen: vec!["10.77.0.1:51871".parse().expect("sample address")] }),
        dns: DnsPlan {
            listen: vec![
                "10.77.0.1:53".parse().expect("sample address"),
                "[fd00::1]:53".parse().expect("sample address"),
            ],
            domain: "home.internal".into(),
            records: BTreeMap::new(),
            reverse: vec![
                "10.77.0.0/16".parse().expect("sample address"),
                "fd00::/64".parse().expect("sample address"),
            ],
            clients: vec![
                "10.77.0.0/16".parse().expect("sample address"),
                "fd00::/64".parse().expect("sample address"),
            ],
        },
        access: AccessPlan {
            nodes: ["10.77.0.1", "fd00::1", "10.77.0.5", "fd00::5"]
                .iter()
                .map(|a| a.parse().expect("sample address"))
                .collect(),
            grants: allowed
                .iter()
                .flat_map(|&source| {
                    let same_family = wallet.iter().filter(move |dst| dst.is_ipv4() == source.is_ipv4());
                    same_family.map(move |&service| Grant { source, service, protocol: Protocol::Tcp })
                })
                .collect(),
            members: if routes {
                ["10.77.0.1", "fd00::1", "10.77.0.5", "fd00::5", "10.77.0.6"]
                    .iter()
                    .map(|a| a.parse().expect("sample address"))
                    .collect()
            } else {
                BTreeSet::new()
            },
            devices: if routes {
                ["10.77.0.4", "fd00::4", "10.77.0.7"].iter().map(|a| a.parse().expect("sample address")).collect()
            } else {
                BTreeSet::new()
            },
            routes,
            mesh: vec!["10.77.0.0/16".parse().expect("sample range"), "fd00::/64".parse().expect("sample range")],
        },
        public: PublicPlan::default(),
        onions: Default::default(),
    }
}

/// `plan` with a UDP service (`echo`, 10.77.0.3:7) granted to 10.77.0.4.
pub fn with_udp_echo(mut plan: HostPlan) -> HostPlan {
    let echo: std::net::SocketAddr = "10.77.0.3:7".parse().expect("sample address");
    let source = "10.77.0.4".parse().expect("sample address");
    plan.access.grants.insert(Grant { source, service: echo, protocol: Protocol::Udp });
    plan.services.push(ServicePlan {
        name: "echo".parse().expect("sample address"),
        listen: vec![echo],
        target: "127.0.0.1:7".parse().expect("sample address"),
        allowed: BTreeSet::from([source]),
        protocol: Protocol::Udp,
    });
    plan
}

/// A declaration file with nodes, services, a device and rules (see `declare`).
pub const SAMPLE_DECLARATION: &str = r#"
[[node]]
name = "vps1"

[[node]]
name = "validator"
role = "relay"
disabled = true

[[node]]
name = "consensus"

[[service]]
name = "wallet"
node = "hub"
target = "127.0.0.1:9737"

[[service]]
name = "beacon"
node = "consensus"
target = "[fd00::5]:5052"
port = 80

[[device]]
name = "phone"
allow = ["wallet", "beacon", "wallet"]

[[access]]
from = ["consensus", "hub"]
to = "validator"
"#;
