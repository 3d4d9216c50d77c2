//! Declared networks: a TOML file names the member nodes, services, devices and access rules a network
//! should have, and [`plan()`] works out the steps that make the stored network match it.
//!
//! Pure: text and the network as read through the admin API go in, a plan of admin requests comes out.
//! `meshctl apply` reads the network, prints the plan and sends its requests.
//!
//! - `file`: the declaration file's format, parsed and checked into a [`Declaration`];
//! - `plan`: the network as it stands ([`Current`]) and the [`Plan`] from it to a declaration;
//! - `step`: one [`Step`] of a plan, its line in the printed plan and its admin requests.
//!
//! This module holds what they share: the specs of nodes, services and devices, and the errors.

mod file;
mod plan;
mod step;

use std::collections::BTreeSet;
use std::fmt;

use crate::input::{HostPort, Label, PublicName};
use crate::model::{Protocol, Role};
use crate::relay::route::TlsMode;

pub use file::Declaration;
pub use plan::{Current, Plan, Waiting, plan};
pub use step::Step;

/// Why a declaration was refused, or cannot be planned against the network; the message names the entry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeclareError {
    /// Not TOML, or not the file's shape (an unknown table or key, a bad name, target, port or resolver).
    #[error("line {line}, column {column}: {message}")]
    Syntax {
        /// 1-based line of the offending text.
        line: usize,
        /// 1-based column, in characters.
        column: usize,
        /// The TOML parser's message, on one line.
        message: String,
    },
    #[error("\"{0}\" is the hub's name; the hub is implicit, declare members, services and devices under other names")]
    /// A node, service or device declared under the hub's name.
    HubName(Label),
    #[error(
        "\"{name}\" is declared twice (as a {first} and as a {second}); nodes, services and devices share one namespace"
    )]
    /// One name declared twice.
    Duplicate {
        /// The name.
        name: Label,
        /// What it was declared as first.
        first: Kind,
        /// What it was declared as again.
        second: Kind,
    },
    #[error("node \"{0}\": role \"hub\" is not allowed; the network has one hub, the controller (use node or relay)")]
    /// A node declared with `role = "hub"`.
    HubRole(Label),
    #[error("node \"{node}\": role \"{role}\" is neither node nor relay")]
    /// A node whose `role` is neither `node` nor `relay`.
    UnknownRole {
        /// The node.
        node: Label,
        /// The role as written.
        role: String,
    },
    #[error("service \"{service}\" is on node \"{node}\", which is neither the hub nor a declared node")]
    /// A service on a node that is neither the hub nor declared.
    UndeclaredNode {
        /// The service.
        service: Label,
        /// The node it names.
        node: Label,
    },
    #[error("service \"{0}\" is UDP: only a TCP service speaking HTTP can have https names")]
    /// A UDP service with public names.
    HttpsOverUdp(Label),
    #[error(
        "service \"{service}\" is served through \"{relay}\", which is neither the hub nor a node declared with role = \"relay\""
    )]
    /// A public name's relay that is neither the hub nor a node of role relay in the file.
    UndeclaredRelay {
        /// The service.
        service: Label,
        /// The relay named.
        relay: Label,
    },
    #[error("{hostname} is under the mesh's own domain {domain}: a public name must be one the CA can validate")]
    /// A public name the mesh's own DNS answers.
    PublicNameInMesh {
        /// The name.
        hostname: PublicName,
        /// The mesh's domain.
        domain: String,
    },
    #[error("{0} is declared twice: a public name belongs to one service")]
    /// A public name under two services, or twice under one.
    PublicNameTwice(PublicName),
    #[error("service \"{0}\" is UDP: Tor carries only TCP, it cannot be served as an onion service")]
    /// A UDP service with `tor`.
    TorOverUdp(Label),
    #[error("service \"{service}\": Tor client \"{device}\" is not a declared device")]
    /// An onion service client that is not a declared device.
    UndeclaredTorClient {
        /// The service.
        service: Label,
        /// The name in its `tor.clients`.
        device: Label,
    },
    #[error(
        "service \"{0}\": tor.clients = [] names no client: leave `clients` out for an onion service anyone with the \
         address may reach, or use tor = false for none"
    )]
    /// `tor = { clients = [] }`: neither open to all nor for anyone, so refused.
    NoTorClients(Label),
    #[error("service \"{service}\": Tor client \"{device}\" is named twice")]
    /// A device twice in one service's `tor.clients`.
    TorClientTwice {
        /// The service.
        service: Label,
        /// The device.
        device: Label,
    },
    #[error("service \"{service}\": {count} Tor clients, more than the {max} an onion service descriptor can hold")]
    /// More onion service clients than a descriptor holds ([`crate::tor::client::MAX_CLIENTS`]).
    TooManyTorClients {
        /// The service.
        service: Label,
        /// How many were declared.
        count: usize,
        /// The limit.
        max: usize,
    },
    #[error("service \"{0}\": port 0 is out of range (1-65535)")]
    /// A service whose mesh port (`port`, else the target's) is 0.
    PortZero(Label),
    #[error("device \"{device}\" allows \"{service}\", which is not a declared service")]
    /// A device allowed a name that is not a declared service.
    UndeclaredService {
        /// The device.
        device: Label,
        /// The name in its `allow`.
        service: Label,
    },
    #[error("device \"{0}\" allows nothing: name at least one service in `allow`")]
    /// A device with an empty `allow`.
    NothingAllowed(Label),
    #[error("access rule to \"{to}\" names \"{node}\", which is neither the hub nor a declared node")]
    /// An access rule naming a node that is neither the hub nor declared.
    RuleUndeclaredNode {
        /// The rule's `to`.
        to: Label,
        /// The unknown node (in `from` or `to`).
        node: Label,
    },
    #[error("access rule to \"{0}\" has an empty `from`")]
    /// An access rule (to the node given) with an empty `from`.
    RuleWithoutSources(Label),
    #[error("access rule from \"{0}\" to itself: a node always reaches itself")]
    /// An access rule from a node to itself.
    RuleToSelf(Label),
    #[error(
        "node \"{name}\" joined as a {} and the file makes it a {}: a member keeps its role (take it out of the file \
         and apply, then declare it again and join the host anew)",
        role_name(*joined),
        role_name(*declared)
    )]
    /// A joined member declared with another role: roles change only by leaving and joining again.
    RoleChange {
        /// The member.
        name: Label,
        /// The role it joined with.
        joined: Role,
        /// The role the file gives it.
        declared: Role,
    },
    #[error(
        "\"{name}\" is a {now} in the network and a {declared} in the file: take it out of the file and apply, \
         then declare it again"
    )]
    /// A name that is one kind of thing in the network and another in the file.
    KindChange {
        /// The name.
        name: Label,
        /// What it is in the network.
        now: Kind,
        /// What the file declares it as.
        declared: Kind,
    },
    /// The network as read has no node with the hub role.
    #[error("the network has no hub node")]
    NoHub,
    #[error("the controller described node \"{0}\" with an unreadable endpoint")]
    /// The controller's view of a node (named) has an endpoint that does not parse.
    UnreadableNode(Label),
    #[error("the controller described service \"{0}\" with an unreadable {1}")]
    /// The controller's view of a service (named) has a field (named) that does not parse.
    UnreadableService(Label, &'static str),
}

/// What a name belongs to: nodes, services and devices share the DNS namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A joined node, or a node in the file.
    Node,
    /// A node invited but not joined yet.
    PendingInvite,
    /// A service.
    Service,
    /// A roaming device.
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
    /// The node's name.
    pub name: Label,
    /// [`Role::Node`] or [`Role::Relay`] (the hub is never declared).
    pub role: Role,
    /// Kept out of the mesh, with its name and addresses.
    pub disabled: bool,
    /// Where other hosts reach it. Declared: `None` leaves a member's endpoint as it is (it is set when the
    /// host joins); as it stands: `None` when it has none.
    pub endpoint: Option<HostPort>,
    /// Its interface's MTU, bytes. Declared: `None` leaves it as it is; as it stands: always known (its own,
    /// else the network's).
    pub mtu: Option<u16>,
}

/// A service: as declared (port resolved), or as it stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceSpec {
    /// The service's name.
    pub name: Label,
    /// The node it runs on.
    pub node: Label,
    /// Where that node forwards it to.
    pub target: HostPort,
    /// Port on the service's mesh address.
    pub port: u16,
    /// `protocol = "udp"` in the file; TCP when absent.
    pub protocol: Protocol,
    /// Its public names (`https = [...]`), sorted by name.
    pub https: Vec<HttpsSpec>,
    /// Its onion service (`tor = ...`), if it is served over Tor.
    pub tor: Option<TorSpec>,
}

/// A service's onion service (`meshctl expose --tor`): as declared, or as it stands.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TorSpec {
    /// The port at the `.onion` address. Declared: `None` keeps the one it has (else the service's mesh
    /// port); as it stands: always known.
    pub port: Option<u16>,
    /// The devices authorized to find it (client authorization); with none declared, anyone with the
    /// address may.
    pub clients: BTreeSet<Label>,
    /// Only authorized clients may find it. Declared: whether `clients` is not empty; as it stands: also
    /// after its last client was taken off (then nobody can).
    pub authorized_only: bool,
}

/// A service's public name (`meshctl expose`): as declared, or as it stands.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpsSpec {
    /// The public name.
    pub hostname: PublicName,
    /// The relay it is served through.
    pub relay: Label,
    /// Where TLS ends; `terminate` when absent.
    #[serde(default)]
    pub tls: TlsMode,
}

/// A device and the services it may reach: as declared, or as it stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSpec {
    /// The device's name.
    pub name: Label,
    /// The services it may reach.
    pub allow: BTreeSet<Label>,
}

/// A role as the file and the plan spell it.
fn role_name(role: Role) -> &'static str {
    match role {
        Role::Hub => "hub",
        Role::Node => "node",
        Role::Relay => "relay",
    }
}

/// Labels as the plan prints them: comma-separated, no spaces.
fn list(labels: &[Label]) -> String {
    labels.iter().map(Label::as_str).collect::<Vec<_>>().join(",")
}

#[cfg(test)]
mod tests {
    //! Helpers for the tests of `file` and `plan`.
    use super::*;
    use crate::fixtures::label;
    use crate::model::AccessRule;

    pub(super) fn labels(names: &[&str]) -> Vec<Label> {
        names.iter().map(|n| label(n)).collect()
    }

    pub(super) fn rule(from: &str, to: &str) -> AccessRule {
        AccessRule { from: label(from), to: label(to) }
    }

    /// Parse with `hub` as the hub's name.
    pub(super) fn parse(text: &str) -> Result<Declaration, DeclareError> {
        Declaration::parse(text, &label("hub"))
    }
}
