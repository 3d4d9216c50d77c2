//! The network of the benchmark: a state of N member nodes, and the changes published to it.

use super::*;

pub(crate) fn label(name: &str) -> Label {
    name.parse().expect("a valid label")
}

pub(crate) fn network() -> Network {
    Network {
        name: label("bench"),
        domain: "bench.internal".into(),
        // Member index i is 127.0.0.0 + i: a loopback address a client can bind to.
        cidr: "127.0.0.0/8".parse().expect("a valid CIDR"),
        ula: "fd00:5ca1:e000::/48".parse().expect("a valid ULA prefix"),
        mtu: 1420,
    }
}

/// The private key of node `index`, which the clients (another process) make the same way: a distinct
/// key per node (its index in the first four bytes of the scalar), so a client can prove it in the sync
/// handshake.
pub(crate) fn private_key(index: u32) -> PrivateKey {
    use base64::Engine as _;
    let mut bytes = [7u8; 32];
    bytes[..4].copy_from_slice(&index.to_le_bytes());
    PrivateKey::from_base64(&base64::engine::general_purpose::STANDARD.encode(bytes)).expect("32 bytes are a key")
}

pub(crate) fn node(name: &str, index: u32, role: Role) -> Node {
    Node {
        name: label(name),
        public_key: private_key(index).public_key(),
        index,
        // Half the hosts have a public endpoint, the others sit behind NAT.
        endpoint: index
            .is_multiple_of(2)
            .then(|| format!("198.18.{}.{}:51820", index / 256 % 256, index % 256).parse().expect("a valid endpoint")),
        listen_port: 51820,
        interface: "meshd0".parse().expect("a valid interface name"),
        role,
        disabled: false,
        rotate_key: false,
        mtu: None,
    }
}

/// A hub (index 1), `hosts` members (indexes 2..=hosts+1), hosts/10 services and as many devices
/// (two grants each), and up to 20 access rules.
pub(crate) fn build_state(hosts: usize) -> SharedState {
    let hosts = u32::try_from(hosts).expect("a host count fits in u32");
    let extra = (hosts / 10).max(1);
    let member = |i: u32| label(&format!("host-{}", 2 + i % hosts));
    SharedState {
        network: network(),
        nodes: std::iter::once(node("hub", 1, Role::Hub))
            .chain((2..=hosts + 1).map(|i| node(&format!("host-{i}"), i, Role::Node)))
            .collect(),
        services: (0..extra)
            .map(|j| Service {
                name: label(&format!("svc-{j}")),
                node: member(j * 7),
                target: format!("127.0.0.1:{}", 8000 + j % 1000).parse().expect("a valid target"),
                port: 8000 + (j % 1000) as u16,
                index: hosts + 2 + j,
                protocol: Protocol::Tcp,
            })
            .collect(),
        devices: (0..extra)
            .map(|j| DeviceGrants {
                name: label(&format!("dev-{j}")),
                index: hosts + 2 + extra + j,
                allow: vec![label(&format!("svc-{j}")), label(&format!("svc-{}", (j + 1) % extra))],
            })
            .collect(),
        rules: (0..extra.min(20)).map(|j| AccessRule { from: member(j), to: member(j + 1) }).collect(),
        exposures: Vec::new(),
        onions: Vec::new(),
    }
}

/// Change number `k`, cycling through a device's grants, a new service, a moved endpoint, a new
/// access rule and a new node. Nothing disables or removes a member, whose session would close.
pub(crate) fn change(state: &mut SharedState, k: usize, next_index: &mut u32) {
    let members = state.nodes.len() - 1;
    let mut take = || {
        *next_index += 1;
        *next_index - 1
    };
    match k % 5 {
        0 => {
            let devices = state.devices.len();
            let grants = &mut state.devices[k % devices].allow;
            let first = label("svc-0");
            match grants.iter().position(|s| *s == first) {
                Some(at) => drop(grants.remove(at)),
                None => grants.push(first),
            }
        }
        1 => {
            let owner = state.nodes[1 + k % members].name.clone();
            state.services.push(Service {
                name: label(&format!("added-{k}")),
                node: owner,
                target: "127.0.0.1:9000".parse().expect("a valid target"),
                port: 9000,
                index: take(),
                protocol: Protocol::Tcp,
            });
        }
        2 => {
            let endpoint = format!("192.0.2.{}:{}", k % 250 + 1, 50000 + k).parse().expect("a valid endpoint");
            state.nodes[1 + (k * 7919) % members].endpoint = Some(endpoint);
        }
        3 => {
            let (from, to) =
                (state.nodes[1 + k % members].name.clone(), state.nodes[1 + (k * 31) % members].name.clone());
            state.rules.push(AccessRule { from, to });
        }
        _ => state.nodes.push(node(&format!("joined-{k}"), take(), Role::Node)),
    }
}
