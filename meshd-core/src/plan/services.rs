//! A host's service forwarders, and the device flows to services that it passes: its own services,
//! and on the hub, which routes devices to services on other nodes, those too.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;

use super::access::Grant;
use super::{HostView, PRIVILEGED_PORT};
use crate::input::{HostPort, Label};
use crate::model::{Protocol, Service};

/// A service forwarder: serves the service's mesh addresses, admits only `allowed` sources.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePlan {
    /// The service's name.
    pub name: Label,
    /// Its mesh addresses and port: what clients connect to.
    pub listen: Vec<SocketAddr>,
    /// Where it forwards to, on the host.
    pub target: HostPort,
    /// The sources it admits: granted devices and admitted nodes.
    pub allowed: BTreeSet<IpAddr>,
    /// What it forwards: TCP connections or UDP datagrams.
    pub protocol: Protocol,
}

impl ServicePlan {
    /// The addresses the forwarder binds: each mesh address of the service on [`PRIVILEGED_PORT`].
    pub fn bound(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        self.listen.iter().map(|addr| SocketAddr::new(addr.ip(), PRIVILEGED_PORT))
    }
}

/// What the host serves: its forwarders, the device flows it passes, and the service addresses it
/// takes on.
pub(super) struct Served {
    pub(super) services: Vec<ServicePlan>,
    pub(super) grants: BTreeSet<Grant>,
    pub(super) addresses: Vec<IpNet>,
}

/// The relays that proxy `service`'s public names to it (terminate mode: [`super::public`]), by their mesh
/// IPv4 address: its forwarder takes their connections whatever access rules say of them.
fn relays<'a>(view: &'a HostView<'_>, service: &'a Service) -> impl Iterator<Item = IpAddr> + 'a {
    view.s
        .exposures
        .iter()
        .filter(move |e| e.service == service.name && e.tls == crate::relay::route::TlsMode::Terminate)
        .filter_map(move |e| view.active.iter().find(|n| n.name == e.relay))
        .map(|relay| IpAddr::V4(view.pool.v4_of(relay.index)))
}

/// The services of the host of `view`; `admitted` are the node addresses it admits.
pub(super) fn plan(view: &HostView<'_>, admitted: &BTreeSet<IpAddr>) -> Served {
    let (s, node) = (view.s, view.node);
    let device_addrs = |service: &Service| -> Vec<IpAddr> {
        s.devices.iter().filter(|d| d.allow.contains(&service.name)).flat_map(|d| view.host_addrs(d.index)).collect()
    };
    let service_addrs = |service: &Service| view.host_addrs(service.index).map(|ip| SocketAddr::new(ip, service.port));
    let hosted_here = |service: &Service| {
        service.node == node.name && node.active() || view.is_hub && view.active.iter().any(|n| n.name == service.node)
    };
    let mut served = Served { services: Vec::new(), grants: BTreeSet::new(), addresses: Vec::new() };
    for service in s.services.iter().filter(|v| hosted_here(v)) {
        let allowed = device_addrs(service);
        for dst in service_addrs(service) {
            let same_family = allowed.iter().filter(|src| src.is_ipv4() == dst.is_ipv4());
            served.grants.extend(same_family.map(|&source| Grant { source, service: dst, protocol: service.protocol }));
        }
        if service.node == node.name {
            served.addresses.extend(view.host_nets(service.index));
            served.services.push(ServicePlan {
                name: service.name.clone(),
                listen: service_addrs(service).to_vec(),
                target: service.target.clone(),
                allowed: allowed.into_iter().chain(admitted.iter().copied()).chain(relays(view, service)).collect(),
                protocol: service.protocol,
            });
        }
    }
    served
}
