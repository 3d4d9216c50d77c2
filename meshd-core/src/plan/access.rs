//! A host's access rules: which nodes it admits (every active node, unless access rules name this host),
//! which device flows it passes, and on a routing host (hub, relay) which members it routes between.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;

use super::HostView;
use crate::input::Label;
use crate::model::{Node, Protocol};

/// The access rules of a host (default deny on the mesh interface).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AccessPlan {
    /// Node addresses admitted to this host and its services: every active node, or, once access rules
    /// name this host, only the nodes they let in.
    pub nodes: BTreeSet<IpAddr>,
    /// Device flows admitted: local services, and on the hub, which routes devices to services on other
    /// nodes, those too.
    pub grants: BTreeSet<Grant>,
    /// On hosts that route (the hub, the relay): every active node's addresses. They route between them
    /// (each receiving host applies its own rules); the hub also lets them all reach its sync service,
    /// whatever its own rules say.
    pub members: BTreeSet<IpAddr>,
    /// On hosts that route: every device's addresses. Nothing but the replies to flows a device started
    /// reaches a device (the stock WireGuard apps filter nothing themselves).
    pub devices: BTreeSet<IpAddr>,
    /// Whether this host routes between its peers (the hub does, and the relay between hosts behind NAT).
    pub routes: bool,
    /// The mesh ranges (IPv4, IPv6): their addresses answer only on the mesh interface (and loopback).
    pub mesh: Vec<IpNet>,
}

/// A flow a device is granted: from its address to a service's address and port, over the service's protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Grant {
    /// The device's address (v4 or v6, the family of `service`).
    pub source: IpAddr,
    /// The service's mesh address and port.
    pub service: SocketAddr,
    /// The service's protocol.
    pub protocol: Protocol,
}

/// The node addresses admitted to the host of `view` and its services: all active nodes, unless access
/// rules name this host; then the nodes they let in (and the host itself).
pub(super) fn admitted_nodes(view: &HostView<'_>) -> BTreeSet<IpAddr> {
    let rules_to_me: Vec<&Label> = view.s.rules.iter().filter(|r| r.to == view.node.name).map(|r| &r.from).collect();
    let admitted = |n: &&&Node| rules_to_me.is_empty() || rules_to_me.contains(&&n.name) || n.name == view.node.name;
    view.active.iter().filter(admitted).flat_map(|n| view.host_addrs(n.index)).collect()
}

/// The access plan of the host of `view`, from its admitted nodes and device grants.
pub(super) fn plan(view: &HostView<'_>, nodes: BTreeSet<IpAddr>, grants: BTreeSet<Grant>) -> AccessPlan {
    let routes = view.is_hub || view.relay.is_some_and(|r| r.name == view.node.name);
    let (members, devices) = if routes {
        (
            view.active.iter().flat_map(|n| view.host_addrs(n.index)).collect(),
            view.s.devices.iter().flat_map(|d| view.host_addrs(d.index)).collect(),
        )
    } else {
        Default::default()
    };
    AccessPlan { nodes, grants, members, devices, routes, mesh: view.mesh().to_vec() }
}
