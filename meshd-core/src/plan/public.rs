//! A host's part in serving public names over HTTPS (`meshctl expose`): on the relay, which names its public
//! ports serve and where each one's traffic goes over the mesh; on every host where TLS ends (the relay in
//! terminate mode, the service's node in passthrough mode), which certificates it obtains and which service
//! each name's requests go to; and the flows the mesh must let through for that.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;

use super::{Grant, HostView};
use crate::input::{Label, PublicName};
use crate::model::{Exposure, Node, Protocol, Service};
use crate::relay::route::{Route, TlsMode};

/// The port a node's passthrough terminator listens on, on its mesh addresses: the relay sends it the TLS
/// streams of the node's passthrough names, each after a PROXY v2 header. Below 1024 like
/// [`super::PRIVILEGED_PORT`] (only root binds it) and the next one (RFC 4727 section 7.2: experiments).
pub const PASSTHROUGH_PORT: u16 = super::PRIVILEGED_PORT + 1;

/// What this host does for public names; empty on most hosts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PublicPlan {
    /// On the relay: every name its public HTTP and HTTPS ports serve, with where it goes over the mesh.
    pub routes: BTreeMap<PublicName, Route>,
    /// The names whose TLS ends on this host, each with where its requests go (plain HTTP): the service's target
    /// itself when the service runs on this host with an IP target (no second proxy in between), else the
    /// service's mesh address and port, over the tunnel. This host obtains and renews their certificates.
    pub terminated: BTreeMap<PublicName, SocketAddr>,
    /// On a node with passthrough names: the relays' mesh addresses, the only sources its terminator on
    /// [`PASSTHROUGH_PORT`] takes (and trusts for the PROXY header's client address).
    pub passthrough_from: BTreeSet<IpAddr>,
    /// The host's own mesh addresses: its connections to upstreams in the mesh leave from these (IPv4, IPv6),
    /// and the passthrough terminator listens on them.
    pub mesh: Vec<IpAddr>,
    /// The mesh ranges: an upstream in them is reached from [`PublicPlan::mesh`], any other one (a local
    /// service's target) as the host reaches it.
    pub ranges: Vec<IpNet>,
}

impl PublicPlan {
    /// Whether this host has nothing to do for public names.
    pub fn is_empty(&self) -> bool {
        self.routes.is_empty() && self.terminated.is_empty()
    }

    /// Where the passthrough terminator listens, when this host has passthrough names.
    pub fn passthrough_listen(&self) -> Vec<SocketAddr> {
        if self.passthrough_from.is_empty() {
            return Vec::new();
        }
        self.mesh.iter().map(|&ip| SocketAddr::new(ip, PASSTHROUGH_PORT)).collect()
    }
}

/// The public plan of the host of `view`, and the flows its access rules must let in for it (the relay's
/// connections to this host's exposed services and terminator).
pub(super) fn plan(view: &HostView<'_>) -> (PublicPlan, BTreeSet<Grant>) {
    let me = &view.node.name;
    let mut plan = PublicPlan {
        mesh: view.host_addrs(view.node.index).to_vec(),
        ranges: view.mesh().to_vec(),
        ..PublicPlan::default()
    };
    let mut grants = BTreeSet::new();
    for exposure in &view.s.exposures {
        let Some((service, node, relay)) = parts(view, exposure) else { continue };
        let service_addr = SocketAddr::new(IpAddr::V4(view.pool.v4_of(service.index)), service.port);
        let terminator = SocketAddr::new(IpAddr::V4(view.pool.v4_of(node.index)), PASSTHROUGH_PORT);
        if relay.name == *me {
            let upstream = match exposure.tls {
                TlsMode::Terminate => service_addr,
                TlsMode::Passthrough => terminator,
            };
            plan.routes.insert(exposure.hostname.clone(), Route { tls: exposure.tls, upstream });
        }
        let tls_here = match exposure.tls {
            TlsMode::Terminate => relay.name == *me,
            TlsMode::Passthrough => node.name == *me,
        };
        if tls_here {
            let direct =
                service.target.ip().filter(|_| node.name == *me).map(|ip| SocketAddr::new(ip, service.target.port()));
            plan.terminated.insert(exposure.hostname.clone(), direct.unwrap_or(service_addr));
        }
        if node.name != *me {
            continue;
        }
        // This host runs the service: the relay (terminate) or this host's own terminator (passthrough)
        // reaches it; in passthrough the relay reaches the terminator.
        let relay_v4 = IpAddr::V4(view.pool.v4_of(relay.index));
        match exposure.tls {
            TlsMode::Terminate => {
                grants.insert(Grant { source: relay_v4, service: service_addr, protocol: Protocol::Tcp });
            }
            TlsMode::Passthrough => {
                plan.passthrough_from.insert(relay_v4);
                grants.insert(Grant { source: relay_v4, service: terminator, protocol: Protocol::Tcp });
            }
        }
    }
    (plan, grants)
}

/// The exposure's service, the service's node and the relay, when all are active in this host's view: a
/// name whose relay or node is disabled or gone is served by no one.
fn parts<'a>(view: &HostView<'a>, exposure: &Exposure) -> Option<(&'a Service, &'a Node, &'a Node)> {
    let service = view.s.services.iter().find(|s| s.name == exposure.service && s.protocol == Protocol::Tcp)?;
    let active = |name: &Label| view.active.iter().find(|n| n.name == *name).copied();
    Some((service, active(&service.node)?, active(&exposure.relay)?))
}
