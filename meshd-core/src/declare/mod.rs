//! Declared networks: a TOML file names the member nodes, services, devices and access rules a network
//! should have, and [`plan`] works out the steps that make the stored network match it.
//!
//! Pure: text and the network as read through the admin API go in, a plan of admin requests comes out.
//! `meshctl apply` reads the network, prints the plan and sends its requests.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::handout::DeviceDns;
use crate::input::{HostPort, Label};
use crate::model::{AccessRule, InviteView, Protocol, Role};
use crate::wire::admin::{Request, StatusView};

/// Why a declaration was refused, or cannot be planned against the network; the message names the entry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeclareError {
    #[error("line {line}, column {column}: {message}")]
    Syntax { line: usize, column: usize, message: String },
    #[error("\"{0}\" is the hub's name; the hub is implicit, declare members, services and devices under other names")]
    HubName(Label),
    #[error(
        "\"{name}\" is declared twice (as a {first} and as a {second}); nodes, services and devices share one namespace"
    )]
    Duplicate { name: Label, first: Kind, second: Kind },
    #[error("node \"{0}\": role \"hub\" is not allowed; the network has one hub, the controller (use node or relay)")]
    HubRole(Label),
    #[error("node \"{node}\": role \"{role}\" is neither node nor relay")]
    UnknownRole { node: Label, role: String },
    #[error("service \"{service}\" is on node \"{node}\", which is neither the hub nor a declared node")]
    UndeclaredNode { service: Label, node: Label },
    #[error("service \"{0}\": port 0 is out of range (1-65535)")]
    PortZero(Label),
    #[error("device \"{device}\" allows \"{service}\", which is not a declared service")]
    UndeclaredService { device: Label, service: Label },
    #[error("device \"{0}\" allows nothing: name at least one service in `allow`")]
    NothingAllowed(Label),
    #[error("access rule to \"{to}\" names \"{node}\", which is neither the hub nor a declared node")]
    RuleUndeclaredNode { to: Label, node: Label },
    #[error("access rule to \"{0}\" has an empty `from`")]
    RuleWithoutSources(Label),
    #[error("access rule from \"{0}\" to itself: a node always reaches itself")]
    RuleToSelf(Label),
    #[error(
        "node \"{name}\" joined as a {} and the file makes it a {}: a member keeps its role (take it out of the file \
         and apply, then declare it again and join the host anew)",
        role_name(*joined),
        role_name(*declared)
    )]
    RoleChange { name: Label, joined: Role, declared: Role },
    #[error(
        "\"{name}\" is a {now} in the network and a {declared} in the file: take it out of the file and apply, \
         then declare it again"
    )]
    KindChange { name: Label, now: Kind, declared: Kind },
    #[error("the network has no hub node")]
    NoHub,
    #[error("the controller described service \"{0}\" with an unreadable {1}")]
    UnreadableService(Label, &'static str),
}

/// What a name belongs to: nodes, services and devices share the DNS namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Node,
    /// A node invited but not joined yet.
    PendingInvite,
    Service,
    Device,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Node => "node",
            Kind::PendingInvite => "pending invite",
            Kind::Service => "service",
            Kind::Device => "device",
        })
    }
}

/// A member node: as declared, or as it stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSpec {
    pub name: Label,
    pub role: Role,
    pub disabled: bool,
}

/// A service: as declared (port resolved), or as it stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceSpec {
    pub name: Label,
    pub node: Label,
    pub target: HostPort,
    /// Port on the service's mesh address.
    pub port: u16,
    /// `protocol = "udp"` in the file; TCP when absent.
    pub protocol: Protocol,
}

/// A device and the services it may reach: as declared, or as it stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSpec {
    pub name: Label,
    pub allow: BTreeSet<Label>,
}

/// A validated declaration file. The hub is implicit: it is never declared and never changed.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Declaration {
    pub nodes: Vec<NodeSpec>,
    pub services: Vec<ServiceSpec>,
    pub devices: Vec<DeviceSpec>,
    pub rules: BTreeSet<AccessRule>,
    /// The resolvers the config of a new device names, for devices that do not take the hub's (`dns`
    /// in the file). Not stored: it shapes only the config written when the device is added.
    pub device_dns: BTreeMap<Label, DeviceDns>,
}

/// The network as it stands, as the admin API describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Current {
    pub hub: Label,
    /// Joined nodes other than the hub.
    pub members: Vec<NodeSpec>,
    /// Pending, unexpired invites.
    pub invites: BTreeMap<Label, Role>,
    pub services: Vec<ServiceSpec>,
    pub devices: Vec<DeviceSpec>,
    pub rules: BTreeSet<AccessRule>,
}

/// The file as written; names and targets are checked while parsing, so their errors carry a line.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileEntries {
    #[serde(default)]
    node: Vec<NodeEntry>,
    #[serde(default)]
    service: Vec<ServiceEntry>,
    #[serde(default)]
    device: Vec<DeviceEntry>,
    #[serde(default)]
    access: Vec<AccessEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NodeEntry {
    name: Label,
    /// Checked by hand, so that "hub" gets its own message.
    role: Option<String>,
    #[serde(default)]
    disabled: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ServiceEntry {
    name: Label,
    node: Label,
    target: HostPort,
    port: Option<u16>,
    #[serde(default)]
    protocol: Protocol,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DeviceEntry {
    name: Label,
    allow: Vec<Label>,
    #[serde(default)]
    dns: Option<DnsEntry>,
}

/// `dns = true` (the hub's, the default), `dns = false` (no DNS line) or `dns = ["IP", ...]`.
struct DnsEntry(DeviceDns);

impl<'de> Deserialize<'de> for DnsEntry {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<DnsEntry, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = DnsEntry;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("true, false or a list of IP addresses")
            }
            fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<DnsEntry, E> {
                Ok(DnsEntry(if v { DeviceDns::Hub } else { DeviceDns::Omit }))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<DnsEntry, A::Error> {
                let mut servers = Vec::new();
                while let Some(item) = seq.next_element::<String>()? {
                    let server = crate::input::parse_resolver(&item)
                        .map_err(|e| serde::de::Error::custom(format!("dns: {e}")))?;
                    servers.push(server);
                }
                if servers.is_empty() {
                    return Err(serde::de::Error::custom("dns = [] names no resolver: use dns = false for none"));
                }
                Ok(DnsEntry(DeviceDns::servers(servers)))
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AccessEntry {
    from: Vec<Label>,
    to: Label,
}

impl Declaration {
    /// Parse and check a declaration for the network whose hub is named `hub`.
    pub fn parse(text: &str, hub: &Label) -> Result<Declaration, DeclareError> {
        let file: FileEntries = toml::from_str(text).map_err(|e| syntax_error(text, &e))?;
        let mut names: BTreeMap<Label, Kind> = BTreeMap::new();
        let declared = (file.node.iter().map(|n| (&n.name, Kind::Node)))
            .chain(file.service.iter().map(|s| (&s.name, Kind::Service)))
            .chain(file.device.iter().map(|d| (&d.name, Kind::Device)));
        for (name, kind) in declared {
            if name == hub {
                return Err(DeclareError::HubName(name.clone()));
            }
            if let Some(first) = names.insert(name.clone(), kind) {
                return Err(DeclareError::Duplicate { name: name.clone(), first, second: kind });
            }
        }
        let is_node = |name: &Label| name == hub || names.get(name) == Some(&Kind::Node);

        let mut declaration = Declaration::default();
        for entry in &file.node {
            let role = match entry.role.as_deref() {
                None | Some("node") => Role::Node,
                Some("relay") => Role::Relay,
                Some("hub") => return Err(DeclareError::HubRole(entry.name.clone())),
                Some(other) => return Err(DeclareError::UnknownRole { node: entry.name.clone(), role: other.into() }),
            };
            declaration.nodes.push(NodeSpec { name: entry.name.clone(), role, disabled: entry.disabled });
        }
        for entry in file.service {
            if !is_node(&entry.node) {
                return Err(DeclareError::UndeclaredNode { service: entry.name, node: entry.node });
            }
            let port = entry.port.unwrap_or(entry.target.port());
            if port == 0 {
                return Err(DeclareError::PortZero(entry.name));
            }
            let (name, node, target, protocol) = (entry.name, entry.node, entry.target, entry.protocol);
            declaration.services.push(ServiceSpec { name, node, target, port, protocol });
        }
        for entry in file.device {
            if let Some(service) = entry.allow.iter().find(|a| names.get(a) != Some(&Kind::Service)) {
                return Err(DeclareError::UndeclaredService { device: entry.name.clone(), service: service.clone() });
            }
            if entry.allow.is_empty() {
                return Err(DeclareError::NothingAllowed(entry.name));
            }
            if let Some(DnsEntry(dns)) = entry.dns
                && dns != DeviceDns::Hub
            {
                declaration.device_dns.insert(entry.name.clone(), dns);
            }
            declaration.devices.push(DeviceSpec { name: entry.name, allow: entry.allow.into_iter().collect() });
        }
        for entry in file.access {
            if entry.from.is_empty() {
                return Err(DeclareError::RuleWithoutSources(entry.to));
            }
            if let Some(node) = entry.from.iter().chain([&entry.to]).find(|n| !is_node(n)) {
                return Err(DeclareError::RuleUndeclaredNode { to: entry.to.clone(), node: node.clone() });
            }
            for from in entry.from {
                if from == entry.to {
                    return Err(DeclareError::RuleToSelf(from));
                }
                declaration.rules.insert(AccessRule { from, to: entry.to.clone() });
            }
        }
        Ok(declaration)
    }
}

/// A TOML error as one line with its position (toml's own rendering spans several lines).
fn syntax_error(text: &str, error: &toml::de::Error) -> DeclareError {
    let start = error.span().map_or(0, |span| span.start.min(text.len()));
    let before = text.get(..start).unwrap_or("");
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().unwrap_or("").chars().count() + 1;
    DeclareError::Syntax { line, column, message: error.message().trim().replace('\n', " ") }
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
            .map(|n| NodeSpec { name: n.name.clone(), role: n.role, disabled: n.disabled })
            .collect();
        let services = status
            .services
            .iter()
            .map(|s| {
                let target = s.target.parse().map_err(|_| DeclareError::UnreadableService(s.name.clone(), "target"))?;
                let port = (s.mesh_address.rsplit_once(':').and_then(|(_, port)| port.parse().ok()))
                    .ok_or_else(|| DeclareError::UnreadableService(s.name.clone(), "mesh address"))?;
                Ok(ServiceSpec { name: s.name.clone(), node: s.node.clone(), target, port, protocol: s.protocol })
            })
            .collect::<Result<_, DeclareError>>()?;
        Ok(Current {
            hub: hub.name.clone(),
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

/// One change to the network, carried out by one or two admin requests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Step {
    InviteNode {
        name: Label,
        role: Role,
    },
    /// A pending invite for another role is cancelled and issued again: the old token stops working.
    ReinviteNode {
        name: Label,
        role: Role,
        was: Role,
    },
    EnableNode {
        name: Label,
    },
    AddService {
        name: Label,
        node: Label,
        target: HostPort,
        port: u16,
        protocol: Protocol,
    },
    /// Removed and added again on another node: it gets a new address, and its devices their grants back
    /// (a later [`Step::AllowDevice`]).
    MoveService {
        name: Label,
        node: Label,
        was_node: Label,
        target: HostPort,
        port: u16,
        protocol: Protocol,
    },
    /// Target, port or protocol changed in place: the service keeps its addresses and grants.
    UpdateService {
        name: Label,
        target: HostPort,
        port: u16,
        protocol: Protocol,
        was_target: HostPort,
        was_port: u16,
        was_protocol: Protocol,
    },
    AddDevice {
        name: Label,
        allow: Vec<Label>,
    },
    AllowDevice {
        name: Label,
        allow: Vec<Label>,
        was: Vec<Label>,
    },
    AllowAccess {
        from: Label,
        to: Label,
    },
    RevokeAccess {
        from: Label,
        to: Label,
    },
    RemoveDevice {
        name: Label,
    },
    RemoveService {
        name: Label,
    },
    DisableNode {
        name: Label,
    },
    RemoveNode {
        name: Label,
    },
    UninviteNode {
        name: Label,
    },
}

impl Step {
    /// The admin requests that carry the step out, in order. Invites last `invite_secs`; a new device's
    /// key pair is made by `device_key`, which returns the public half (the caller keeps the private one).
    pub fn requests(&self, invite_secs: u64, device_key: impl FnOnce() -> String) -> Vec<Request> {
        let invite =
            |name: &Label, role: Role| Request::NodeInvite { name: name.clone(), role, expires_secs: invite_secs };
        match self {
            Step::InviteNode { name, role } => vec![invite(name, *role)],
            Step::ReinviteNode { name, role, .. } => {
                vec![Request::NodeUninvite { name: name.clone() }, invite(name, *role)]
            }
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

/// Part of the file that cannot take effect yet; applying again later picks it up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "what", rename_all = "snake_case")]
pub enum Waiting {
    /// A service on a node that has not joined.
    Service { name: Label, node: Label },
    /// A device none of whose services can exist yet: it is neither added nor changed.
    Device { name: Label, services: Vec<Label> },
    /// A device that gets its other services now, and these once their nodes join.
    Grants { name: Label, services: Vec<Label> },
    /// A rule naming a node that has not joined.
    Rule { from: Label, to: Label, node: Label },
    /// A disabled node that is not a member is not invited.
    DisabledNode { name: Label },
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
        }
    }
}

/// What makes the network match a declaration: the steps in a safe order, and what must wait.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct Plan {
    pub steps: Vec<Step>,
    pub waiting: Vec<Waiting>,
}

/// The steps that make `current` match `desired`. Things others depend on come first (invites,
/// enables, services, devices, rules), removals last (rules, devices, services, then nodes), so no step
/// refers to something that is not there yet or already gone. Services, devices and rules that need a
/// node which has not joined wait (see [`Waiting`]).
pub fn plan(desired: &Declaration, current: &Current) -> Result<Plan, DeclareError> {
    check_against(desired, current)?;
    let mut plan = Plan::default();
    let disables = plan_nodes(desired, current, &mut plan);
    let services = plan_services(desired, current, &mut plan);
    plan_devices(desired, current, &services, &mut plan);
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

/// Refuse what the API cannot do in place: a member changing role, a name moving between kinds.
fn check_against(desired: &Declaration, current: &Current) -> Result<(), DeclareError> {
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

fn role_name(role: Role) -> &'static str {
    match role {
        Role::Hub => "hub",
        Role::Node => "node",
        Role::Relay => "relay",
    }
}

/// `, udp` after a UDP service's port in plan lines; nothing for TCP, the default.
fn udp_suffix(protocol: Protocol) -> &'static str {
    match protocol {
        Protocol::Tcp => "",
        Protocol::Udp => ", udp",
    }
}

fn list(labels: &[Label]) -> String {
    labels.iter().map(Label::as_str).collect::<Vec<_>>().join(",")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{SAMPLE_DECLARATION as EXAMPLE, label};

    fn labels(names: &[&str]) -> Vec<Label> {
        names.iter().map(|n| label(n)).collect()
    }

    fn rule(from: &str, to: &str) -> AccessRule {
        AccessRule { from: label(from), to: label(to) }
    }

    fn parse(text: &str) -> Result<Declaration, DeclareError> {
        Declaration::parse(text, &label("hub"))
    }

    #[test]
    fn parses_nodes_services_devices_and_rules() {
        let d = parse(EXAMPLE).unwrap();
        let node = |name: &str, role, disabled| NodeSpec { name: label(name), role, disabled };
        assert_eq!(
            d.nodes,
            [
                node("vps1", Role::Node, false),
                node("validator", Role::Relay, true),
                node("consensus", Role::Node, false)
            ]
        );
        assert_eq!(d.services.len(), 2);
        assert_eq!(d.services[0].port, 9737, "the port defaults to the target's");
        assert_eq!((d.services[1].node.as_str(), d.services[1].port), ("consensus", 80));
        assert_eq!(d.services[1].target.to_string(), "[fd00::5]:5052");
        assert_eq!(
            d.devices,
            [DeviceSpec { name: label("phone"), allow: labels(&["beacon", "wallet"]).into_iter().collect() }]
        );
        assert_eq!(d.rules, [rule("consensus", "validator"), rule("hub", "validator")].into_iter().collect());
        assert_eq!(parse("").unwrap(), Declaration::default(), "an empty file declares an empty network");
    }

    #[test]
    fn devices_may_leave_dns_out_or_name_their_resolvers() {
        let service = "[[service]]\nname = \"w\"\nnode = \"hub\"\ntarget = \"127.0.0.1:1\"\n";
        let device = |name: &str, dns: &str| format!("[[device]]\nname = \"{name}\"\nallow = [\"w\"]\n{dns}\n");
        let text = [
            service.to_owned(),
            device("router", "dns = false"),
            device("laptop", "dns = [\"192.168.1.1\", \"2001:db8::53\"]"),
            device("phone", "dns = true"),
            device("tablet", ""),
        ]
        .concat();
        let declared = parse(&text).unwrap();
        let servers = vec!["192.168.1.1".parse().unwrap(), "2001:db8::53".parse().unwrap()];
        assert_eq!(
            declared.device_dns,
            BTreeMap::from([(label("router"), DeviceDns::Omit), (label("laptop"), DeviceDns::Servers(servers))])
        );
    }

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
            step.requests(60, || unreachable!("no device")).as_slice(),
            [Request::ServiceUpdate { protocol: Some(Protocol::Udp), .. }]
        ));
        let json = serde_json::to_value(step).unwrap();
        assert_eq!((json["protocol"].as_str(), json["was_protocol"].as_str()), (Some("udp"), Some("tcp")));
    }

    #[test]
    fn syntax_errors_name_line_and_column() {
        let cases = [
            ("[[node]\nname = \"a\"\n", 1, "unclosed array table"),
            ("[[node]]\nname = \"a\"\nname = \"b\"\n", 3, "duplicate key"),
            ("[[node]]\nname = \"a\"\nnmae = \"b\"\n", 3, "unknown field `nmae`"),
            ("[[nodes]]\nname = \"a\"\n", 1, "unknown field `nodes`"),
            ("[[node]]\nname = \"Bad_Name\"\n", 2, "\"Bad_Name\" is not a valid name"),
            ("[[service]]\nname = \"s\"\nnode = \"hub\"\ntarget = \"nocolon\"\n", 4, "is not HOST:PORT"),
            ("[[service]]\nname = \"s\"\nnode = \"hub\"\ntarget = \"1.2.3.4:80\"\nport = 70000\n", 5, "70000"),
            ("[[service]]\nname = \"s\"\nnode = \"hub\"\n", 1, "missing field `target`"),
            ("[[device]]\nname = \"p\"\nallow = \"wallet\"\n", 3, "expected a sequence"),
            (
                "[[service]]\nname = \"s\"\nnode = \"hub\"\ntarget = \"1.2.3.4:53\"\nprotocol = \"sctp\"\n",
                5,
                "unknown variant `sctp`, expected `tcp` or `udp`",
            ),
            ("[[access]]\nfrom = [\"a\"]\nto = \"b\"\nextra = 1\n", 4, "unknown field `extra`"),
            ("[[device]]\nname = \"p\"\nallow = [\"w\"]\ndns = \"yes\"\n", 4, "true, false or a list of IP addresses"),
            (
                "[[device]]\nname = \"p\"\nallow = [\"w\"]\ndns = [\"1.2.3\"]\n",
                4,
                "\"1.2.3\" cannot be a device's resolver: not an IP address",
            ),
            ("[[device]]\nname = \"p\"\nallow = [\"w\"]\ndns = [\"0.0.0.0\"]\n", 4, "unspecified"),
            ("[[device]]\nname = \"p\"\nallow = [\"w\"]\ndns = []\n", 4, "use dns = false"),
        ];
        for (text, line, message) in cases {
            match parse(text) {
                Err(DeclareError::Syntax { line: l, message: m, .. }) => {
                    assert_eq!(l, line, "{text:?}: {m}");
                    assert!(m.contains(message), "{text:?}: {m}");
                    assert!(!m.contains('\n'), "one line: {m:?}");
                }
                other => panic!("{text:?}: {other:?}"),
            }
        }
        let Err(DeclareError::Syntax { column, .. }) = parse("[[node]]\nname = \"a\"\n  nmae = \"b\"\n") else {
            panic!()
        };
        assert_eq!(column, 3);
    }

    #[test]
    fn refuses_inconsistent_declarations() {
        let node = |name: &str| format!("[[node]]\nname = \"{name}\"\n");
        let service = |name: &str, on: &str| {
            format!("[[service]]\nname = \"{name}\"\nnode = \"{on}\"\ntarget = \"127.0.0.1:80\"\n")
        };
        let device = |name: &str, allow: &str| format!("[[device]]\nname = \"{name}\"\nallow = [{allow}]\n");
        let access = |from: &str, to: &str| format!("[[access]]\nfrom = [{from}]\nto = \"{to}\"\n");
        let cases = [
            (node("hub"), DeclareError::HubName(label("hub"))),
            (service("hub", "hub"), DeclareError::HubName(label("hub"))),
            (device("hub", "\"hub\""), DeclareError::HubName(label("hub"))),
            (
                node("a") + &service("a", "hub"),
                DeclareError::Duplicate { name: label("a"), first: Kind::Node, second: Kind::Service },
            ),
            (
                service("s", "hub") + &device("p", "\"s\"") + &device("p", "\"s\""),
                DeclareError::Duplicate { name: label("p"), first: Kind::Device, second: Kind::Device },
            ),
            (node("a") + "role = \"hub\"\n", DeclareError::HubRole(label("a"))),
            (node("a") + "role = \"boss\"\n", DeclareError::UnknownRole { node: label("a"), role: "boss".into() }),
            (service("s", "vps9"), DeclareError::UndeclaredNode { service: label("s"), node: label("vps9") }),
            (
                service("s", "hub") + &service("t", "s"),
                DeclareError::UndeclaredNode { service: label("t"), node: label("s") },
            ),
            (service("s", "hub") + "port = 0\n", DeclareError::PortZero(label("s"))),
            (device("p", "\"nope\""), DeclareError::UndeclaredService { device: label("p"), service: label("nope") }),
            (
                node("a") + &device("p", "\"a\""),
                DeclareError::UndeclaredService { device: label("p"), service: label("a") },
            ),
            (device("p", ""), DeclareError::NothingAllowed(label("p"))),
            (
                node("a") + &access("\"ghost\"", "a"),
                DeclareError::RuleUndeclaredNode { to: label("a"), node: label("ghost") },
            ),
            (
                node("a") + &access("\"a\"", "ghost"),
                DeclareError::RuleUndeclaredNode { to: label("ghost"), node: label("ghost") },
            ),
            (
                service("s", "hub") + &access("\"hub\"", "s"),
                DeclareError::RuleUndeclaredNode { to: label("s"), node: label("s") },
            ),
            (node("a") + &access("\"hub\", \"a\"", "a"), DeclareError::RuleToSelf(label("a"))),
            (node("a") + &access("", "a"), DeclareError::RuleWithoutSources(label("a"))),
        ];
        for (text, expected) in cases {
            assert_eq!(parse(&text), Err(expected), "{text}");
        }
    }

    proptest::proptest! {
        /// Any mix of the file's tables and keys, valid or not, is parsed or refused, never a panic.
        #[test]
        fn parsing_never_panics(text in "(\\[\\[(node|service|device|access)\\]\\]\n|(name|role|disabled|node|target|port|protocol|allow|from|to) = (\"[a-z0-9.:_\\[\\]-]{0,12}\"|[0-9]{1,6}|\\[\"[a-z]{1,3}\"\\])\n|.{0,8}){0,12}") {
            let _ = parse(&text);
        }
    }

    /// The network with only its hub.
    fn empty_network() -> Current {
        Current {
            hub: label("hub"),
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
        }
    }

    fn device(name: &str, allow: &[&str]) -> DeviceSpec {
        DeviceSpec { name: label(name), allow: labels(allow).into_iter().collect() }
    }

    fn member(name: &str, role: Role, disabled: bool) -> NodeSpec {
        NodeSpec { name: label(name), role, disabled }
    }

    fn lines(plan: &Plan) -> Vec<String> {
        plan.steps.iter().map(ToString::to_string).chain(plan.waiting.iter().map(ToString::to_string)).collect()
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
            move_beacon.requests(60, || unreachable!("no device")),
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
            reinvite.requests(60, || unreachable!("no device")),
            [
                Request::NodeUninvite { name: label("vps") },
                Request::NodeInvite { name: label("vps"), role: Role::Relay, expires_secs: 60 },
            ]
        );
        let add = Step::AddDevice { name: label("phone"), allow: labels(&["wallet"]) };
        assert_eq!(
            add.requests(60, || "KEY".into()),
            [Request::DeviceAdd {
                name: label("phone"),
                allow: labels(&["wallet"]),
                public_key: "KEY".into(),
                expect: None
            }]
        );
        let json = serde_json::to_value(Step::InviteNode { name: label("vps"), role: Role::Relay }).unwrap();
        assert_eq!(json, serde_json::json!({"op": "invite_node", "name": "vps", "role": "relay"}));
    }
}
