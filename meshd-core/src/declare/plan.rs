//! Planning: the network as it stands ([`Current`], from the admin API's replies) against a
//! [`Declaration`] gives a [`Plan`], the [`Step`]s in a safe order and what must wait for a node to join.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::Serialize;

use super::{Declaration, DeclareError, DeviceSpec, HttpsSpec, Kind, NodeSpec, ServiceSpec, Step, TorSpec, list};
use crate::input::Label;
use crate::model::{AccessRule, InviteView, Role};
use crate::wire::admin::StatusView;

/// The network as it stands, as the admin API describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Current {
    /// The hub's name.
    pub hub: Label,
    /// The network's MTU.
    pub mtu: u16,
    /// The mesh's DNS domain (`mesh.internal`).
    pub domain: String,
    /// Joined nodes other than the hub.
    pub members: Vec<NodeSpec>,
    /// Pending, unexpired invites.
    pub invites: BTreeMap<Label, Role>,
    /// The services.
    pub services: Vec<ServiceSpec>,
    /// The devices and their grants.
    pub devices: Vec<DeviceSpec>,
    /// The access rules.
    pub rules: BTreeSet<AccessRule>,
}

impl Current {
    /// The network from the replies to `Status`, `NodeInvites` and `AccessList`.
    pub fn from_views(
        status: &StatusView,
        invites: &[InviteView],
        rules: &[AccessRule],
    ) -> Result<Current, DeclareError> {
        let hub = status.nodes.iter().find(|n| n.role == Role::Hub).ok_or(DeclareError::NoHub)?;
        let members = (status.nodes.iter().filter(|n| n.role != Role::Hub))
            .map(|n| {
                let endpoint = (n.endpoint.as_deref().map(str::parse).transpose())
                    .map_err(|_| DeclareError::UnreadableNode(n.name.clone()))?;
                Ok(NodeSpec { name: n.name.clone(), role: n.role, disabled: n.disabled, endpoint, mtu: Some(n.mtu) })
            })
            .collect::<Result<_, DeclareError>>()?;
        let services = status
            .services
            .iter()
            .map(|s| {
                let target = s.target.parse().map_err(|_| DeclareError::UnreadableService(s.name.clone(), "target"))?;
                let port = (s.mesh_address.rsplit_once(':').and_then(|(_, port)| port.parse().ok()))
                    .ok_or_else(|| DeclareError::UnreadableService(s.name.clone(), "mesh address"))?;
                let mut https: Vec<HttpsSpec> = (s.https.iter())
                    .map(|u| HttpsSpec { hostname: u.hostname.clone(), relay: u.relay.clone(), tls: u.tls })
                    .collect();
                https.sort();
                Ok(ServiceSpec {
                    name: s.name.clone(),
                    node: s.node.clone(),
                    target,
                    port,
                    protocol: s.protocol,
                    https,
                    tor: s.tor.as_ref().map(|t| TorSpec {
                        port: Some(t.port),
                        clients: t.clients.iter().cloned().collect(),
                        authorized_only: t.authorized_only,
                    }),
                })
            })
            .collect::<Result<_, DeclareError>>()?;
        Ok(Current {
            hub: hub.name.clone(),
            mtu: status.network.mtu,
            domain: status.network.domain.clone(),
            members,
            invites: invites.iter().map(|i| (i.name.clone(), i.role)).collect(),
            services,
            devices: (status.devices.iter())
                .map(|d| DeviceSpec { name: d.name.clone(), allow: d.allow.iter().cloned().collect() })
                .collect(),
            rules: rules.iter().cloned().collect(),
        })
    }

    fn member(&self, name: &Label) -> Option<&NodeSpec> {
        self.members.iter().find(|m| &m.name == name)
    }

    /// Whether `name` is a node that is in the mesh now (the hub or a joined member).
    fn joined(&self, name: &Label) -> bool {
        name == &self.hub || self.member(name).is_some()
    }

    /// What holds `name` in the network now, if anything.
    fn kind_of(&self, name: &Label) -> Option<Kind> {
        if self.joined(name) {
            Some(Kind::Node)
        } else if self.invites.contains_key(name) {
            Some(Kind::PendingInvite)
        } else if self.services.iter().any(|s| &s.name == name) {
            Some(Kind::Service)
        } else if self.devices.iter().any(|d| &d.name == name) {
            Some(Kind::Device)
        } else {
            None
        }
    }
}

/// Part of the file that cannot take effect yet; applying again later picks it up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "what", rename_all = "snake_case")]
pub enum Waiting {
    /// A service on a node that has not joined.
    Service {
        /// The service.
        name: Label,
        /// Its node.
        node: Label,
    },
    /// A device none of whose services can exist yet: it is neither added nor changed.
    Device {
        /// The device.
        name: Label,
        /// The services it is allowed, none of them on a joined node.
        services: Vec<Label>,
    },
    /// A device that gets its other services now, and these once their nodes join.
    Grants {
        /// The device.
        name: Label,
        /// The services it gets later.
        services: Vec<Label>,
    },
    /// A rule naming a node that has not joined.
    Rule {
        /// The rule's source.
        from: Label,
        /// The rule's target.
        to: Label,
        /// The one of them that has not joined (the first, if neither has).
        node: Label,
    },
    /// A disabled node that is not a member is not invited.
    DisabledNode {
        /// The node.
        name: Label,
    },
    /// A public name whose relay has not joined.
    PublicName {
        /// The name.
        hostname: crate::input::PublicName,
        /// Its relay.
        relay: Label,
    },
    /// Onion service clients that are devices waiting themselves (none of their services can exist yet).
    TorClients {
        /// The service.
        service: Label,
        /// The waiting devices.
        devices: Vec<Label>,
    },
}

impl fmt::Display for Waiting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Waiting::Service { name, node } => write!(f, "! service {name} waits for node {node} to join"),
            Waiting::Device { name, services } => {
                write!(f, "! device {name} waits: none of its services ({}) is on a joined node", list(services))
            }
            Waiting::Grants { name, services } => {
                let nodes = if services.len() == 1 { "its node joins" } else { "their nodes join" };
                write!(f, "! device {name} gets {} once {nodes}", list(services))
            }
            Waiting::Rule { from, to, node } => write!(f, "! allow {from} -> {to} waits for node {node} to join"),
            Waiting::DisabledNode { name } => write!(f, "! node {name} is disabled and not a member: not invited"),
            Waiting::PublicName { hostname, relay } => {
                write!(f, "! https://{hostname}/ waits for relay {relay} to join")
            }
            Waiting::TorClients { service, devices } => {
                write!(f, "! Tor clients {} of {service} wait for their devices", list(devices))
            }
        }
    }
}

/// What makes the network match a declaration: the steps in a safe order, and what must wait.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct Plan {
    /// The changes, in the order they are to be made.
    pub steps: Vec<Step>,
    /// What waits for a node to join.
    pub waiting: Vec<Waiting>,
}

/// The steps that make `current` match `desired`. Things others depend on come first (invites,
/// enables, services, devices, rules), removals last (rules, devices, services, then nodes), so no step
/// refers to something that is not there yet or already gone. Services, devices and rules that need a
/// node which has not joined wait (see [`Waiting`]).
pub fn plan(desired: &Declaration, current: &Current) -> Result<Plan, DeclareError> {
    check_against(desired, current)?;
    let mut plan = Plan::default();
    if let Some(mtu) = desired.mtu.filter(|m| *m != current.mtu) {
        plan.steps.push(Step::UpdateNetwork { mtu, was_mtu: current.mtu });
    }
    let disables = plan_nodes(desired, current, &mut plan);
    let services = plan_services(desired, current, &mut plan);
    plan_public(desired, current, &services, &mut plan);
    plan_devices(desired, current, &services, &mut plan);
    plan_tor(desired, current, &services, &mut plan);
    plan_rules(desired, current, &mut plan);
    plan_removals(desired, current, &services, disables, &mut plan);
    Ok(plan)
}

/// Invites, re-invites and enables; the disables it returns go with the removals.
fn plan_nodes(desired: &Declaration, current: &Current, plan: &mut Plan) -> Vec<Step> {
    let mut disables = Vec::new();
    for node in &desired.nodes {
        let name = node.name.clone();
        if let Some(member) = current.member(&node.name) {
            let endpoint = node.endpoint.clone().filter(|e| member.endpoint.as_ref() != Some(e));
            let mtu = node.mtu.filter(|m| member.mtu != Some(*m));
            if endpoint.is_some() || mtu.is_some() {
                let was_endpoint = endpoint.as_ref().and(member.endpoint.clone());
                let was_mtu = mtu.and(member.mtu);
                plan.steps.push(Step::UpdateNode { name: name.clone(), endpoint, was_endpoint, mtu, was_mtu });
            }
            match (member.disabled, node.disabled) {
                (true, false) => plan.steps.push(Step::EnableNode { name }),
                (false, true) => disables.push(Step::DisableNode { name }),
                _ => {}
            }
        } else if let Some(&was) = current.invites.get(&node.name) {
            if was != node.role {
                plan.steps.push(Step::ReinviteNode { name, role: node.role, was });
            }
        } else if node.disabled {
            plan.waiting.push(Waiting::DisabledNode { name });
        } else {
            plan.steps.push(Step::InviteNode { name, role: node.role });
        }
    }
    disables
}

/// Declared services that can exist now (their node has joined), and those of them that move node.
#[derive(Default)]
struct ReadyServices<'a> {
    ready: BTreeSet<&'a Label>,
    moved: BTreeSet<&'a Label>,
}

fn plan_services<'a>(desired: &'a Declaration, current: &Current, plan: &mut Plan) -> ReadyServices<'a> {
    let mut services = ReadyServices::default();
    for service in &desired.services {
        if !current.joined(&service.node) {
            plan.waiting.push(Waiting::Service { name: service.name.clone(), node: service.node.clone() });
            continue;
        }
        services.ready.insert(&service.name);
        let (name, node, target, port, protocol) =
            (service.name.clone(), service.node.clone(), service.target.clone(), service.port, service.protocol);
        match current.services.iter().find(|s| s.name == service.name) {
            None => plan.steps.push(Step::AddService { name, node, target, port, protocol }),
            Some(now) if now.node != service.node => {
                services.moved.insert(&service.name);
                plan.steps.push(Step::MoveService { name, node, was_node: now.node.clone(), target, port, protocol });
            }
            Some(now) if now.target != service.target || now.port != service.port || now.protocol != protocol => {
                let (was_target, was_port, was_protocol) = (now.target.clone(), now.port, now.protocol);
                plan.steps.push(Step::UpdateService {
                    name,
                    target,
                    port,
                    protocol,
                    was_target,
                    was_port,
                    was_protocol,
                });
            }
            Some(_) => {}
        }
    }
    services
}

/// Public names: those that go or change relay or mode are unexposed first (a name may move between services),
/// then the new ones exposed. A service that moves lost its names with its old self: they are exposed again.
fn plan_public(desired: &Declaration, current: &Current, services: &ReadyServices<'_>, plan: &mut Plan) {
    let wanted = |service: &Label| desired.services.iter().find(|s| &s.name == service).map(|s| &s.https);
    for now in &current.services {
        if services.moved.contains(&now.name) {
            continue;
        }
        let keep = wanted(&now.name).filter(|_| services.ready.contains(&now.name));
        for https in now.https.iter().filter(|h| !keep.is_some_and(|k| k.contains(h))) {
            plan.steps.push(Step::Unexpose { service: now.name.clone(), hostname: https.hostname.clone() });
        }
    }
    for service in desired.services.iter().filter(|s| services.ready.contains(&s.name)) {
        let had = current.services.iter().find(|s| s.name == service.name && !services.moved.contains(&s.name));
        for https in service.https.iter().filter(|h| !had.is_some_and(|s| s.https.contains(h))) {
            if !current.joined(&https.relay) {
                let (hostname, relay) = (https.hostname.clone(), https.relay.clone());
                plan.waiting.push(Waiting::PublicName { hostname, relay });
                continue;
            }
            plan.steps.push(Step::Expose {
                service: service.name.clone(),
                hostname: https.hostname.clone(),
                relay: https.relay.clone(),
                tls: https.tls,
            });
        }
    }
}

/// New devices and changed grants. A device gets the services that can exist now; one with none of
/// them is left as it is. A service that moves loses its grants, so they are given again.
fn plan_devices(desired: &Declaration, current: &Current, services: &ReadyServices<'_>, plan: &mut Plan) {
    for device in &desired.devices {
        let (grants, waits): (Vec<Label>, Vec<Label>) =
            device.allow.iter().cloned().partition(|a| services.ready.contains(a));
        let name = device.name.clone();
        if grants.is_empty() {
            plan.waiting.push(Waiting::Device { name, services: waits });
            continue;
        }
        if !waits.is_empty() {
            plan.waiting.push(Waiting::Grants { name: name.clone(), services: waits });
        }
        match current.devices.iter().find(|d| d.name == device.name) {
            None => plan.steps.push(Step::AddDevice { name, allow: grants }),
            Some(now) => {
                let was: Vec<Label> = now.allow.iter().cloned().collect();
                if was != grants || was.iter().any(|a| services.moved.contains(a)) {
                    plan.steps.push(Step::AllowDevice { name, allow: grants, was });
                }
            }
        }
    }
}

/// Onion services, after the devices they authorize exist: those that go are unexposed; clients that go are taken
/// off, then new clients and ports added. One that was for authorized clients only and is declared open to all is
/// unexposed and exposed again (its key stays on its node, and so its address). A service that moves lost its onion
/// service with its old self (its new node makes a new key): it is exposed anew.
fn plan_tor(desired: &Declaration, current: &Current, services: &ReadyServices<'_>, plan: &mut Plan) {
    let added: BTreeSet<&Label> = (plan.steps.iter())
        .filter_map(|s| match s {
            Step::AddDevice { name, .. } => Some(name),
            _ => None,
        })
        .collect();
    // Devices the file removes drop off their onion services with them (see plan_removals).
    let staying: BTreeSet<&Label> = desired.devices.iter().map(|d| &d.name).collect();
    let exists = |d: &Label| added.contains(d) || current.devices.iter().any(|c| &c.name == d);
    let mut steps = Vec::new();
    for now in current.services.iter().filter(|s| !services.moved.contains(&s.name)) {
        let want = desired.services.iter().find(|s| s.name == now.name && services.ready.contains(&s.name));
        if now.tor.is_some() && want.is_some_and(|w| w.tor.is_none()) {
            steps.push(Step::UnexposeTor { service: now.name.clone(), clients: Vec::new() });
        }
    }
    for service in desired.services.iter().filter(|s| services.ready.contains(&s.name)) {
        let Some(want) = &service.tor else { continue };
        let had = (current.services.iter())
            .find(|s| s.name == service.name && !services.moved.contains(&s.name))
            .and_then(|s| s.tor.as_ref());
        let (ready, waits): (Vec<&Label>, Vec<&Label>) = want.clients.iter().partition(|d| exists(d));
        if !waits.is_empty() {
            let devices = waits.into_iter().cloned().collect();
            plan.waiting.push(Waiting::TorClients { service: service.name.clone(), devices });
        }
        let service_name = service.name.clone();
        match had {
            // Exposed with none of its clients, it would be open to everyone.
            None if want.authorized_only && ready.is_empty() => {}
            None => {
                let clients = ready.into_iter().cloned().collect();
                steps.push(Step::ExposeTor { service: service_name, port: want.port, clients, was_port: None });
            }
            Some(had) if had.authorized_only && !want.authorized_only => {
                steps.push(Step::OpenTor { service: service_name, port: want.port.or(had.port) });
            }
            Some(had) => {
                let gone: Vec<Label> =
                    had.clients.iter().filter(|c| !want.clients.contains(*c) && staying.contains(c)).cloned().collect();
                if !gone.is_empty() {
                    steps.push(Step::UnexposeTor { service: service_name.clone(), clients: gone });
                }
                let new: Vec<Label> = ready.into_iter().filter(|c| !had.clients.contains(*c)).cloned().collect();
                let port = want.port.filter(|p| had.port != Some(*p));
                if !new.is_empty() || port.is_some() {
                    let was_port = port.and(had.port);
                    steps.push(Step::ExposeTor { service: service_name, port, clients: new, was_port });
                }
            }
        }
    }
    plan.steps.extend(steps);
}

/// The rules whose nodes have joined become exactly the network's rules: allows, then revokes.
fn plan_rules(desired: &Declaration, current: &Current, plan: &mut Plan) {
    let mut rules = BTreeSet::new();
    for rule in &desired.rules {
        match [&rule.from, &rule.to].into_iter().find(|n| !current.joined(n)) {
            Some(node) => {
                plan.waiting.push(Waiting::Rule { from: rule.from.clone(), to: rule.to.clone(), node: node.clone() })
            }
            None => {
                rules.insert(rule);
            }
        }
    }
    let allow = rules.iter().filter(|r| !current.rules.contains(r));
    plan.steps.extend(allow.map(|r| Step::AllowAccess { from: r.from.clone(), to: r.to.clone() }));
    let revoke = current.rules.iter().filter(|r| !rules.contains(r));
    plan.steps.extend(revoke.map(|r| Step::RevokeAccess { from: r.from.clone(), to: r.to.clone() }));
}

/// Devices, then services, then nodes: each goes before what it depends on.
fn plan_removals(
    desired: &Declaration,
    current: &Current,
    services: &ReadyServices<'_>,
    disables: Vec<Step>,
    plan: &mut Plan,
) {
    let devices: BTreeSet<&Label> = desired.devices.iter().map(|d| &d.name).collect();
    let gone_devices = current.devices.iter().filter(|d| !devices.contains(&d.name));
    plan.steps.extend(gone_devices.map(|d| Step::RemoveDevice { name: d.name.clone() }));
    // A declared service that waits for its node does not stay elsewhere meanwhile.
    let gone_services = current.services.iter().filter(|s| !services.ready.contains(&s.name));
    plan.steps.extend(gone_services.map(|s| Step::RemoveService { name: s.name.clone() }));
    plan.steps.extend(disables);
    let nodes: BTreeSet<&Label> = desired.nodes.iter().map(|n| &n.name).collect();
    let gone_members = current.members.iter().filter(|m| !nodes.contains(&m.name));
    plan.steps.extend(gone_members.map(|m| Step::RemoveNode { name: m.name.clone() }));
    let gone_invites = current.invites.keys().filter(|name| !nodes.contains(name));
    plan.steps.extend(gone_invites.map(|name| Step::UninviteNode { name: name.clone() }));
}

/// Refuse what the API cannot do in place or would refuse: a member changing role, a name moving between kinds, a
/// public name under the mesh's own domain.
fn check_against(desired: &Declaration, current: &Current) -> Result<(), DeclareError> {
    let mut public = desired.services.iter().flat_map(|s| &s.https).map(|h| &h.hostname);
    if let Some(hostname) = public.find(|h| h.is_within(&current.domain)) {
        return Err(DeclareError::PublicNameInMesh { hostname: hostname.clone(), domain: current.domain.clone() });
    }
    for node in &desired.nodes {
        if let Some(member) = current.member(&node.name)
            && member.role != node.role
        {
            return Err(DeclareError::RoleChange { name: node.name.clone(), joined: member.role, declared: node.role });
        }
    }
    let declared = (desired.nodes.iter().map(|n| (&n.name, Kind::Node)))
        .chain(desired.services.iter().map(|s| (&s.name, Kind::Service)))
        .chain(desired.devices.iter().map(|d| (&d.name, Kind::Device)));
    for (name, kind) in declared {
        match current.kind_of(name) {
            Some(Kind::PendingInvite) if kind == Kind::Node => {}
            Some(now) if now != kind => {
                return Err(DeclareError::KindChange { name: name.clone(), now, declared: kind });
            }
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::tests::{labels, parse, rule};
    use super::*;
    use crate::fixtures::{SAMPLE_DECLARATION as EXAMPLE, label};
    use crate::model::Protocol;
    use crate::relay::route::TlsMode;
    use crate::wire::admin::{EndpointChange, Request};

    #[test]
    fn a_service_is_tcp_unless_the_file_says_udp() {
        let text = "[[service]]\nname = \"echo\"\nnode = \"hub\"\ntarget = \"127.0.0.1:7\"\nprotocol = \"udp\"\n\
                    [[service]]\nname = \"web\"\nnode = \"hub\"\ntarget = \"127.0.0.1:80\"\nprotocol = \"tcp\"\n";
        let d = parse(text).unwrap();
        assert_eq!(d.services.iter().map(|s| s.protocol).collect::<Vec<_>>(), [Protocol::Udp, Protocol::Tcp]);
        assert!(parse(EXAMPLE).unwrap().services.iter().all(|s| s.protocol == Protocol::Tcp), "the default");

        // Added as UDP; switching the protocol is an update in place (addresses and grants stay).
        let plan_lines = |network: &Current| lines(&plan(&d, network).unwrap());
        assert_eq!(
            plan_lines(&empty_network()),
            ["+ add service echo on hub: 127.0.0.1:7, port 7, udp", "+ add service web on hub: 127.0.0.1:80, port 80"]
        );
        let mut network = empty_network();
        network.services = vec![service("echo", "hub", "127.0.0.1:7", 7), service("web", "hub", "127.0.0.1:80", 80)];
        assert_eq!(plan_lines(&network), ["~ service echo: protocol tcp -> udp"]);
        let step = &plan(&d, &network).unwrap().steps[0];
        assert!(matches!(
            step.requests(60, || unreachable!("no device"), |_, _| unreachable!("no client")).as_slice(),
            [Request::ServiceUpdate { protocol: Some(Protocol::Udp), .. }]
        ));
        let json = serde_json::to_value(step).unwrap();
        assert_eq!((json["protocol"].as_str(), json["was_protocol"].as_str()), (Some("udp"), Some("tcp")));
    }

    /// The network with only its hub.
    fn empty_network() -> Current {
        Current {
            hub: label("hub"),
            mtu: 1420,
            domain: "mesh.internal".into(),
            members: Vec::new(),
            invites: BTreeMap::new(),
            services: Vec::new(),
            devices: Vec::new(),
            rules: BTreeSet::new(),
        }
    }

    fn service(name: &str, node: &str, target: &str, port: u16) -> ServiceSpec {
        ServiceSpec {
            name: label(name),
            node: label(node),
            target: target.parse().unwrap(),
            port,
            protocol: Protocol::Tcp,
            https: vec![],
            tor: None,
        }
    }

    fn device(name: &str, allow: &[&str]) -> DeviceSpec {
        DeviceSpec { name: label(name), allow: labels(allow).into_iter().collect() }
    }

    fn member(name: &str, role: Role, disabled: bool) -> NodeSpec {
        NodeSpec { name: label(name), role, disabled, endpoint: None, mtu: Some(1420) }
    }

    fn lines(plan: &Plan) -> Vec<String> {
        plan.steps.iter().map(ToString::to_string).chain(plan.waiting.iter().map(ToString::to_string)).collect()
    }

    #[test]
    fn onion_services_follow_the_file() {
        let file = |tor: &str| {
            parse(&format!(
                "[[service]]\nname = \"wallet\"\nnode = \"hub\"\ntarget = \"127.0.0.1:9737\"\n{tor}\n\
                 [[device]]\nname = \"phone\"\nallow = [\"wallet\"]\n[[device]]\nname = \"laptop\"\nallow = [\"wallet\"]\n"
            ))
        };
        let onion = |port: u16, clients: &[&str], authorized_only: bool| TorSpec {
            port: Some(port),
            clients: labels(clients).into_iter().collect(),
            authorized_only,
        };
        let mut network = empty_network();
        network.services = vec![service("wallet", "hub", "127.0.0.1:9737", 9737)];
        network.devices = vec![device("phone", &["wallet"]), device("laptop", &["wallet"])];
        let steps = |tor: &str, network: &Current| lines(&plan(&file(tor).unwrap(), network).unwrap());

        // New: exposed with its clients, after the devices exist.
        assert_eq!(steps("tor = true", &network), ["+ expose wallet over Tor"]);
        assert_eq!(
            steps("tor = { port = 80, clients = [\"phone\"] }", &network),
            ["+ expose wallet over Tor: port 80, clients phone"]
        );
        let mut fresh = empty_network();
        fresh.services = network.services.clone();
        assert_eq!(
            steps("tor = { clients = [\"phone\"] }", &fresh),
            [
                "+ add device phone (allow wallet)",
                "+ add device laptop (allow wallet)",
                "+ expose wallet over Tor: clients phone"
            ]
        );

        // As it stands: nothing to do; clients and port follow the file.
        network.services[0].tor = Some(onion(80, &["phone"], true));
        assert_eq!(steps("tor = { port = 80, clients = [\"phone\"] }", &network), Vec::<String>::new());
        assert_eq!(steps("tor = { clients = [\"phone\"] }", &network), Vec::<String>::new(), "the port stays");
        assert_eq!(
            steps("tor = { port = 8080, clients = [\"laptop\"] }", &network),
            [
                "- take Tor clients phone off wallet (a new descriptor without them)",
                "+ expose wallet over Tor: port 80 -> 8080, clients laptop"
            ]
        );
        let open = plan(&file("tor = { port = 80 }").unwrap(), &network).unwrap();
        assert_eq!(lines(&open), ["~ expose wallet over Tor to anyone with the address (was authorized clients only)"]);
        assert_eq!(
            open.steps[0].requests(60, || unreachable!("no device"), |_, _| unreachable!("no client")),
            [
                Request::UnexposeTor { service: label("wallet"), clients: vec![] },
                Request::ExposeTor { service: label("wallet"), port: Some(80), clients: vec![] },
            ]
        );
        assert_eq!(steps("", &network), ["- unexpose wallet from Tor (its node keeps the key)"]);
        assert_eq!(steps("tor = false", &network), ["- unexpose wallet from Tor (its node keeps the key)"]);

        // A device the file removes leaves with its grants: no step of its own.
        let without_phone = parse(
            "[[service]]\nname = \"wallet\"\nnode = \"hub\"\ntarget = \"127.0.0.1:9737\"\ntor = { clients = [\"laptop\"] }\n\
             [[device]]\nname = \"laptop\"\nallow = [\"wallet\"]\n",
        )
        .unwrap();
        assert_eq!(
            lines(&plan(&without_phone, &network).unwrap()),
            ["+ expose wallet over Tor: clients laptop", "- remove device phone"]
        );

        // Clients only, none of whom exist yet: not exposed (it would be open to all), it waits.
        let mut later = empty_network();
        later.services = network.services.clone();
        later.services[0].tor = None;
        let waiting = parse(
            "[[service]]\nname = \"wallet\"\nnode = \"hub\"\ntarget = \"127.0.0.1:9737\"\ntor = { clients = [\"phone\"] }\n\
             [[service]]\nname = \"beacon\"\nnode = \"consensus\"\ntarget = \"127.0.0.1:5052\"\n\
             [[node]]\nname = \"consensus\"\n[[device]]\nname = \"phone\"\nallow = [\"beacon\"]\n",
        )
        .unwrap();
        let planned = lines(&plan(&waiting, &later).unwrap());
        assert!(!planned.iter().any(|l| l.contains("expose wallet")), "{planned:?}");
        assert!(planned.contains(&"! Tor clients phone of wallet wait for their devices".to_string()), "{planned:?}");

        // Refused: a client that is not a device, UDP, a port out of range, unknown keys.
        assert_eq!(
            file("tor = { clients = [\"tablet\"] }"),
            Err(DeclareError::UndeclaredTorClient { service: label("wallet"), device: label("tablet") })
        );
        assert_eq!(file("tor = { clients = [] }"), Err(DeclareError::NoTorClients(label("wallet"))));
        assert_eq!(
            file("tor = { clients = [\"phone\", \"laptop\", \"phone\"] }"),
            Err(DeclareError::TorClientTwice { service: label("wallet"), device: label("phone") })
        );
        let udp =
            "[[service]]\nname = \"dns\"\nnode = \"hub\"\ntarget = \"127.0.0.1:53\"\nprotocol = \"udp\"\ntor = true\n";
        assert_eq!(parse(udp), Err(DeclareError::TorOverUdp(label("dns"))));
        for bad in ["tor = { port = 70000 }", "tor = { port = 0 }", "tor = { ports = 80 }", "tor = \"yes\""] {
            let error = file(bad).unwrap_err();
            assert!(matches!(error, DeclareError::Syntax { line: 5, .. }), "{bad}: {error}");
        }
        assert!(file("tor = { port = 70000 }").unwrap_err().to_string().contains("70000"));
        let max = crate::tor::client::MAX_CLIENTS;
        let names: Vec<String> = (0..=max).map(|i| format!("d{i}")).collect();
        let many = format!(
            "[[service]]\nname = \"wallet\"\nnode = \"hub\"\ntarget = \"127.0.0.1:9737\"\ntor = {{ clients = {names:?} }}\n{}",
            names.iter().map(|n| format!("[[device]]\nname = \"{n}\"\nallow = [\"wallet\"]\n")).collect::<String>()
        );
        assert_eq!(
            parse(&many),
            Err(DeclareError::TooManyTorClients { service: label("wallet"), count: max + 1, max })
        );
    }

    #[test]
    fn plans_a_new_network_with_waits_for_nodes_that_have_not_joined() {
        let plan = plan(&parse(EXAMPLE).unwrap(), &empty_network()).unwrap();
        assert_eq!(
            lines(&plan),
            [
                "+ invite node vps1 (node)",
                "+ invite node consensus (node)",
                "+ add service wallet on hub: 127.0.0.1:9737, port 9737",
                "+ add device phone (allow wallet)",
                "! node validator is disabled and not a member: not invited",
                "! service beacon waits for node consensus to join",
                "! device phone gets beacon once its node joins",
                "! allow consensus -> validator waits for node consensus to join",
                "! allow hub -> validator waits for node validator to join",
            ]
        );
    }

    /// The example's network once consensus and validator have joined (validator disabled).
    fn example_network() -> Current {
        Current {
            hub: label("hub"),
            mtu: 1420,
            domain: "mesh.internal".into(),
            members: vec![member("validator", Role::Relay, true), member("consensus", Role::Node, false)],
            invites: [(label("vps1"), Role::Node)].into_iter().collect(),
            services: vec![
                service("wallet", "hub", "127.0.0.1:9737", 9737),
                service("beacon", "consensus", "[fd00::5]:5052", 80),
            ],
            devices: vec![device("phone", &["beacon", "wallet"])],
            rules: [rule("consensus", "validator"), rule("hub", "validator")].into_iter().collect(),
        }
    }

    #[test]
    fn public_names_are_exposed_moved_and_unexposed_and_wait_for_their_relay() {
        let https = |hostname: &str, relay: &str, tls| HttpsSpec {
            hostname: hostname.parse().unwrap(),
            relay: label(relay),
            tls,
        };
        let mut network = example_network();
        network.services[0].https = vec![
            https("old.shop.example", "hub", TlsMode::Terminate),
            https("pay.shop.example", "hub", TlsMode::Terminate),
        ];
        let file = format!(
            "{EXAMPLE}\n{}",
            r#"[[service]]
name = "btcpay"
node = "hub"
target = "127.0.0.1:23000"
https = [{ hostname = "pay.shop.example", relay = "hub", tls = "passthrough" }, { hostname = "shop.example", relay = "validator" }, { hostname = "later.shop.example", relay = "edge" }]

[[node]]
name = "edge"
role = "relay"
"#
        );
        let plan = plan(&parse(&file).unwrap(), &network).unwrap();
        assert_eq!(
            lines(&plan).into_iter().filter(|l| l.contains("https://")).collect::<Vec<_>>(),
            [
                "- unexpose wallet from https://old.shop.example/",
                "- unexpose wallet from https://pay.shop.example/",
                "+ expose btcpay on https://pay.shop.example/ through hub (tls passthrough)",
                "+ expose btcpay on https://shop.example/ through validator (tls terminate)",
                "! https://later.shop.example/ waits for relay edge to join",
            ],
            "a name moving between services is taken off the old one first"
        );
        let add = plan.steps.iter().position(|s| matches!(s, Step::AddService { .. })).unwrap();
        let expose = plan.steps.iter().position(|s| matches!(s, Step::Expose { .. })).unwrap();
        assert!(add < expose, "the service exists before its name is exposed");

        let twice = format!(
            "{file}\n[[service]]\nname = \"copy\"\nnode = \"hub\"\ntarget = \"127.0.0.1:1\"\nhttps = [{{ hostname = \"shop.example\", relay = \"hub\" }}]\n"
        );
        assert_eq!(parse(&twice).unwrap_err(), DeclareError::PublicNameTwice("shop.example".parse().unwrap()));
        let udp = "[[service]]\nname = \"dns\"\nnode = \"hub\"\ntarget = \"127.0.0.1:53\"\nprotocol = \"udp\"\nhttps = [{ hostname = \"dns.example\", relay = \"hub\" }]\n";
        assert_eq!(parse(udp).unwrap_err(), DeclareError::HttpsOverUdp(label("dns")));
        let not_relay = file.replace("relay = \"edge\"", "relay = \"vps1\"");
        assert_eq!(
            parse(&not_relay).unwrap_err(),
            DeclareError::UndeclaredRelay { service: label("btcpay"), relay: label("vps1") },
            "a plain node is no relay"
        );
    }

    /// What the controller would refuse, the plan refuses first, so that `apply --dry-run` says it.
    #[test]
    fn a_public_name_under_the_mesh_domain_is_refused_by_the_plan() {
        let service = |hostname: &str| {
            format!(
                "{EXAMPLE}\n[[service]]\nname = \"btcpay\"\nnode = \"hub\"\ntarget = \"127.0.0.1:23000\"\nhttps = [{{ \
                 hostname = \"{hostname}\", relay = \"hub\" }}]\n"
            )
        };
        for inside in ["pay.mesh.internal", "mesh.internal", "PAY.Mesh.Internal."] {
            assert_eq!(
                plan(&parse(&service(inside)).unwrap(), &example_network()).unwrap_err(),
                DeclareError::PublicNameInMesh { hostname: inside.parse().unwrap(), domain: "mesh.internal".into() },
                "{inside}"
            );
        }
        for outside in ["paymesh.internal", "mesh.internal.example"] {
            assert!(plan(&parse(&service(outside)).unwrap(), &example_network()).is_ok(), "{outside}");
        }
    }

    #[test]
    fn a_matching_network_needs_no_steps() {
        assert_eq!(plan(&parse(EXAMPLE).unwrap(), &example_network()).unwrap(), Plan::default());
    }

    #[test]
    fn plans_changes_and_removals_in_a_safe_order() {
        let mut network = example_network();
        network.members.push(member("old", Role::Node, false));
        network.members[0].disabled = false; // validator: the file disables it
        network.invites.insert(label("attic"), Role::Node);
        network.invites.insert(label("vps1"), Role::Relay);
        network.services[0] = service("wallet", "hub", "127.0.0.1:9738", 9738);
        network.services[1] = service("beacon", "hub", "[fd00::5]:5052", 80);
        network.services.push(service("junk", "old", "127.0.0.1:1", 1));
        network.devices.push(device("old-phone", &["junk"]));
        network.rules.remove(&rule("hub", "validator"));
        network.rules.insert(rule("old", "consensus"));

        let plan = plan(&parse(EXAMPLE).unwrap(), &network).unwrap();
        assert_eq!(
            lines(&plan),
            [
                "~ invite node vps1 again as node (was relay; the old token stops working)",
                "~ service wallet: target 127.0.0.1:9738 -> 127.0.0.1:9737, port 9738 -> 9737",
                "~ service beacon: node hub -> consensus (removed and added again: new address), [fd00::5]:5052, port 80",
                "~ device phone: allow beacon,wallet again (a service it reaches moves)",
                "+ allow hub -> validator",
                "- revoke old -> consensus",
                "- remove device old-phone",
                "- remove service junk",
                "- disable node validator",
                "- remove node old",
                "- uninvite node attic",
            ]
        );
        let position = |wanted: fn(&Step) -> bool| plan.steps.iter().position(wanted).unwrap();
        assert!(
            position(|s| matches!(s, Step::MoveService { .. })) < position(|s| matches!(s, Step::AllowDevice { .. }))
        );
        assert!(
            position(|s| matches!(s, Step::RemoveService { .. })) < position(|s| matches!(s, Step::RemoveNode { .. }))
        );
        assert!(
            position(|s| matches!(s, Step::RevokeAccess { .. })) < position(|s| matches!(s, Step::RemoveNode { .. }))
        );
    }

    #[test]
    fn enables_changes_grants_and_ports() {
        let mut network = example_network();
        network.members[1].disabled = true;
        network.services[0].port = 1234;
        network.devices[0] = device("phone", &["wallet"]);
        let text = EXAMPLE.replace(
            "name = \"validator\"\nrole = \"relay\"\ndisabled = true",
            "name = \"validator\"\nrole = \"relay\"",
        );
        let plan = plan(&parse(&text).unwrap(), &network).unwrap();
        assert_eq!(
            lines(&plan),
            [
                "+ enable node validator",
                "+ enable node consensus",
                "~ service wallet: port 1234 -> 9737",
                "~ device phone: allow wallet -> beacon,wallet",
            ]
        );
    }

    #[test]
    fn a_declared_endpoint_moves_a_member_once_and_an_absent_one_leaves_it() {
        let mut network = example_network();
        network.members[1].endpoint = Some("198.51.100.7:51820".parse().unwrap());
        assert_eq!(plan(&parse(EXAMPLE).unwrap(), &network).unwrap(), Plan::default(), "no endpoint declared");
        let text =
            EXAMPLE.replace("name = \"consensus\"", "name = \"consensus\"\nendpoint = \"consensus.example.net:51821\"");
        let declared = parse(&text).unwrap();
        let moved = plan(&declared, &network).unwrap();
        assert_eq!(lines(&moved), ["~ node consensus: endpoint 198.51.100.7:51820 -> consensus.example.net:51821"]);
        assert_eq!(
            moved.steps[0].requests(60, || unreachable!("no device"), |_, _| unreachable!("no client")),
            [Request::NodeUpdate {
                name: label("consensus"),
                endpoint: Some(EndpointChange::Set("consensus.example.net:51821".parse().unwrap())),
                mtu: None,
            }]
        );
        network.members[1].endpoint = None;
        assert_eq!(
            lines(&plan(&declared, &network).unwrap()),
            ["~ node consensus: endpoint none -> consensus.example.net:51821"]
        );
        network.members[1].endpoint = Some("consensus.example.net:51821".parse().unwrap());
        assert_eq!(plan(&declared, &network).unwrap(), Plan::default(), "applied: nothing left to do");
    }

    #[test]
    fn declared_mtus_set_the_network_s_and_a_member_s_once() {
        let text =
            format!("mtu = 1340\n{}", EXAMPLE.replace("name = \"consensus\"", "name = \"consensus\"\nmtu = 1420"));
        let declared = parse(&text).unwrap();
        let mut network = example_network();
        let moved = plan(&declared, &network).unwrap();
        assert_eq!(lines(&moved), ["~ network: mtu 1420 -> 1340"], "consensus already has 1420");
        assert_eq!(
            moved.steps[0].requests(60, || unreachable!("no device"), |_, _| unreachable!("no client")),
            [Request::NetworkUpdate { mtu: 1340 }]
        );
        network.mtu = 1340;
        network.members[1].mtu = Some(1340);
        let step = plan(&declared, &network).unwrap();
        assert_eq!(lines(&step), ["~ node consensus: mtu 1340 -> 1420"]);
        assert_eq!(
            step.steps[0].requests(60, || unreachable!("no device"), |_, _| unreachable!("no client")),
            [Request::NodeUpdate { name: label("consensus"), endpoint: None, mtu: Some(1420) }]
        );
        let json = serde_json::to_value(&step.steps[0]).unwrap();
        assert_eq!(json, serde_json::json!({"op": "update_node", "name": "consensus", "mtu": 1420, "was_mtu": 1340}));
        network.members[1].mtu = Some(1420);
        assert_eq!(plan(&declared, &network).unwrap(), Plan::default(), "applied: nothing left to do");
    }

    #[test]
    fn refuses_role_changes_of_members_and_names_changing_kind() {
        let mut network = example_network();
        network.members[1].role = Role::Relay;
        let refused = plan(&parse(EXAMPLE).unwrap(), &network).unwrap_err();
        assert_eq!(
            refused,
            DeclareError::RoleChange { name: label("consensus"), joined: Role::Relay, declared: Role::Node }
        );
        assert!(refused.to_string().starts_with("node \"consensus\" joined as a relay and the file makes it a node"));
        let mut network = example_network();
        network.devices.push(device("vps1", &["wallet"]));
        network.invites.clear();
        assert_eq!(
            plan(&parse(EXAMPLE).unwrap(), &network),
            Err(DeclareError::KindChange { name: label("vps1"), now: Kind::Device, declared: Kind::Node })
        );
        let mut network = example_network();
        network.invites.insert(label("phone"), Role::Node);
        network.devices.clear();
        assert_eq!(
            plan(&parse(EXAMPLE).unwrap(), &network),
            Err(DeclareError::KindChange { name: label("phone"), now: Kind::PendingInvite, declared: Kind::Device })
        );
    }

    #[test]
    fn a_service_waiting_for_its_node_does_not_stay_elsewhere() {
        let mut network = empty_network();
        network.services.push(service("beacon", "hub", "127.0.0.1:5052", 5052));
        network.devices.push(device("phone", &["beacon"]));
        let text = "[[node]]\nname = \"vps\"\n[[service]]\nname = \"beacon\"\nnode = \"vps\"\ntarget = \"127.0.0.1:5052\"\n\
                    [[device]]\nname = \"phone\"\nallow = [\"beacon\"]\n";
        let plan = plan(&parse(text).unwrap(), &network).unwrap();
        assert_eq!(
            lines(&plan),
            [
                "+ invite node vps (node)",
                "- remove service beacon",
                "! service beacon waits for node vps to join",
                "! device phone waits: none of its services (beacon) is on a joined node",
            ]
        );
    }
}
