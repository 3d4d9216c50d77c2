//! A host's WireGuard peers. The hub peers with every active node and every device. Two members peer
//! directly when at least one of them has an endpoint (the other, if behind NAT, keeps the tunnel open
//! with keepalives). Two members that both lack one reach each other through the relay, whose peer
//! entry on each of them also covers the others behind NAT; without a relay they go through the hub,
//! whose peer entry on each member covers the whole mesh range (WireGuard picks the most specific
//! allowed IPs, so direct peers and the relay win).

use std::collections::BTreeMap;

use ipnet::IpNet;

use super::HostView;
use crate::input::{HostPort, Label};
use crate::keys::{PresharedKey, PublicKey};
use crate::model::{NODE_KEEPALIVE_SECS, Node, Role};

/// One WireGuard peer of a host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerPlan {
    /// The node's or device's name.
    pub name: Label,
    /// The preshared key (devices have one).
    pub preshared_key: Option<PresharedKey>,
    /// Where to send to it, if known; a peer behind NAT has none.
    pub endpoint: Option<HostPort>,
    /// The addresses routed to it (WireGuard's AllowedIPs).
    pub allowed_ips: Vec<IpNet>,
    /// Persistent keepalive, seconds.
    pub persistent_keepalive: Option<u16>,
    /// What this host does when the peer falls silent ([`crate::session::paths`]).
    pub path: PathRole,
}

/// How a host watches the path to a peer ([`crate::session::paths::Paths`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathRole {
    /// A roaming device: it sleeps and roams at will, and is not watched.
    Device,
    /// A host this host cannot route around (the hub on a member; every node on the hub): watched,
    /// its name resolved again and its session renewed from this side when it falls silent.
    LastResort,
    /// A direct peer or the relay on a member: watched like [`PathRole::LastResort`], and while it is
    /// silent its routes go through the hub, whose peer entry covers the whole mesh.
    Fallback,
}

/// The peers of the host of `view`, by public key.
pub(super) fn plan(view: &HostView<'_>) -> BTreeMap<PublicKey, PeerPlan> {
    let node = view.node;
    let behind_nat = |n: &Node| n.endpoint.is_none() && n.role != Role::Hub;
    let mut peers = BTreeMap::new();
    if view.is_hub {
        for (device, keys) in view.s.devices.iter().filter_map(|d| Some((d, d.keys.as_ref()?))) {
            peers.insert(
                keys.public_key.clone(),
                PeerPlan {
                    name: device.name.clone(),
                    preshared_key: Some(keys.preshared_key.clone()),
                    endpoint: None,
                    allowed_ips: view.host_nets(device.index).to_vec(),
                    persistent_keepalive: None,
                    path: PathRole::Device,
                },
            );
        }
    }
    for other in view.active.iter().filter(|n| n.name != node.name) {
        let direct = view.is_hub || other.role == Role::Hub || node.endpoint.is_some() || other.endpoint.is_some();
        if !direct {
            continue;
        }
        let mut allowed_ips = if other.role == Role::Hub { view.mesh().to_vec() } else { view.routes_of(other) };
        if behind_nat(node) && view.relay.is_some_and(|r| r.name == other.name) {
            // The relay carries this host's traffic to the other hosts behind NAT, and theirs to it.
            let nat_peers = view.active.iter().filter(|n| behind_nat(n) && n.name != node.name && n.name != other.name);
            allowed_ips.extend(nat_peers.flat_map(|n| view.routes_of(n)));
        }
        peers.insert(
            other.public_key.clone(),
            PeerPlan {
                name: other.name.clone(),
                preshared_key: None,
                endpoint: other.endpoint.clone(),
                allowed_ips,
                // Every host keeps its tunnels to other hosts warm: through NAT it is the only way in,
                // after a restart it renews sessions at once instead of waiting out a stale one, and a
                // peer that stops sending keepalives is seen to be gone (`session::paths`). The hub does
                // too: towards members it knows an endpoint for, its keepalives are what tells them it is
                // still there, and what starts a handshake from its side once its session is gone.
                persistent_keepalive: Some(NODE_KEEPALIVE_SECS),
                path: if view.is_hub || other.role == Role::Hub { PathRole::LastResort } else { PathRole::Fallback },
            },
        );
    }
    peers
}
