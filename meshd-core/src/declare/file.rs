//! The declaration file: TOML with `[[node]]`, `[[service]]`, `[[device]]` and `[[access]]` tables
//! (docs/CLI.md, "Declaration files"), parsed and checked into a [`Declaration`]. Names, targets and resolvers are checked
//! while parsing, so their errors carry a line and column; the rest (duplicates, dangling references)
//! after it.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::Deserialize;

use super::{DeclareError, DeviceSpec, HttpsSpec, Kind, NodeSpec, ServiceSpec, TorSpec};
use crate::handout::DeviceDns;
use crate::input::{HostPort, Label};
use crate::model::{AccessRule, Protocol, Role};

/// A validated declaration file. The hub is implicit: it is never declared and never changed.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Declaration {
    /// The network's MTU (`mtu` at the top of the file); `None` leaves it as it is.
    pub mtu: Option<u16>,
    /// The member nodes (`[[node]]`), in file order.
    pub nodes: Vec<NodeSpec>,
    /// The services (`[[service]]`), in file order, each with its mesh port resolved.
    pub services: Vec<ServiceSpec>,
    /// The devices (`[[device]]`), in file order.
    pub devices: Vec<DeviceSpec>,
    /// The access rules (`[[access]]`), one per source node.
    pub rules: BTreeSet<AccessRule>,
    /// The resolvers the config of a new device names, for devices that do not take the hub's (`dns`
    /// in the file). Not stored: it shapes only the config written when the device is added.
    pub device_dns: BTreeMap<Label, DeviceDns>,
}

/// The file as written; names and targets are checked while parsing, so their errors carry a line.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileEntries {
    #[serde(default, deserialize_with = "mtu")]
    mtu: Option<u16>,
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
    #[serde(default, deserialize_with = "endpoint")]
    endpoint: Option<HostPort>,
    #[serde(default, deserialize_with = "mtu")]
    mtu: Option<u16>,
}

/// An `mtu`: [`crate::input::MIN_MTU`] to [`crate::input::MAX_MTU`], checked while parsing (so the error has a line).
fn mtu<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Option<u16>, D::Error> {
    let value = i64::deserialize(deserializer)?;
    crate::input::parse_mtu(&value.to_string()).map(Some).map_err(|e| serde::de::Error::custom(format!("mtu: {e}")))
}

/// A node's `endpoint`: a `HOST:PORT` other hosts can reach, checked while parsing (so the error has a line).
fn endpoint<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Option<HostPort>, D::Error> {
    let text = String::deserialize(deserializer)?;
    crate::input::parse_endpoint(&text).map(Some).map_err(|e| serde::de::Error::custom(format!("endpoint: {e}")))
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
    #[serde(default)]
    https: Vec<HttpsSpec>,
    #[serde(default)]
    tor: Option<TorEntry>,
}

/// `tor = true` (an onion service anyone with the address may reach), `tor = false` (none, as when
/// absent), or `tor = { port = N, clients = ["DEVICE", ...] }` (both optional).
struct TorEntry(Option<TorTable>);

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct TorTable {
    #[serde(default, deserialize_with = "tor_port")]
    port: Option<u16>,
    #[serde(default)]
    clients: Option<Vec<Label>>,
}

impl<'de> Deserialize<'de> for TorEntry {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<TorEntry, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = TorEntry;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("true, false or a table { port = N, clients = [...] }")
            }
            fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<TorEntry, E> {
                Ok(TorEntry(v.then(TorTable::default)))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<TorEntry, A::Error> {
                TorTable::deserialize(serde::de::value::MapAccessDeserializer::new(map)).map(|t| TorEntry(Some(t)))
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

/// A `tor.port`: 1 to 65535, checked while parsing (so the error has a line).
fn tor_port<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Option<u16>, D::Error> {
    let value = i64::deserialize(deserializer)?;
    crate::input::parse_port(&value.to_string())
        .map(Some)
        .map_err(|e| serde::de::Error::custom(format!("tor port: {e}")))
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

        let mut declaration = Declaration { mtu: file.mtu, ..Declaration::default() };
        for entry in &file.node {
            let role = match entry.role.as_deref() {
                None | Some("node") => Role::Node,
                Some("relay") => Role::Relay,
                Some("hub") => return Err(DeclareError::HubRole(entry.name.clone())),
                Some(other) => return Err(DeclareError::UnknownRole { node: entry.name.clone(), role: other.into() }),
            };
            let (name, disabled, endpoint) = (entry.name.clone(), entry.disabled, entry.endpoint.clone());
            declaration.nodes.push(NodeSpec { name, role, disabled, endpoint, mtu: entry.mtu });
        }
        let mut hostnames = BTreeSet::new();
        for entry in file.service {
            if !is_node(&entry.node) {
                return Err(DeclareError::UndeclaredNode { service: entry.name, node: entry.node });
            }
            let port = entry.port.unwrap_or(entry.target.port());
            if port == 0 {
                return Err(DeclareError::PortZero(entry.name));
            }
            if !entry.https.is_empty() && entry.protocol != Protocol::Tcp {
                return Err(DeclareError::HttpsOverUdp(entry.name));
            }
            for https in &entry.https {
                let relay = &https.relay;
                let is_relay =
                    relay == hub || declaration.nodes.iter().any(|n| &n.name == relay && n.role == Role::Relay);
                if !is_relay {
                    return Err(DeclareError::UndeclaredRelay { service: entry.name, relay: relay.clone() });
                }
                if !hostnames.insert(https.hostname.clone()) {
                    return Err(DeclareError::PublicNameTwice(https.hostname.clone()));
                }
            }
            let tor = match entry.tor.and_then(|TorEntry(table)| table) {
                None => None,
                Some(_) if entry.protocol != Protocol::Tcp => return Err(DeclareError::TorOverUdp(entry.name)),
                Some(table) => {
                    let listed = match table.clients {
                        Some(listed) if listed.is_empty() => return Err(DeclareError::NoTorClients(entry.name)),
                        listed => listed.unwrap_or_default(),
                    };
                    let clients: BTreeSet<Label> = listed.iter().cloned().collect();
                    if clients.len() < listed.len() {
                        let twice = listed.iter().find(|d| listed.iter().filter(|o| o == d).count() > 1);
                        let device = twice.cloned().unwrap_or_else(|| entry.name.clone());
                        return Err(DeclareError::TorClientTwice { service: entry.name, device });
                    }
                    if clients.len() > crate::tor::client::MAX_CLIENTS {
                        let (count, max) = (clients.len(), crate::tor::client::MAX_CLIENTS);
                        return Err(DeclareError::TooManyTorClients { service: entry.name, count, max });
                    }
                    let authorized_only = !clients.is_empty();
                    Some(TorSpec { port: table.port, clients, authorized_only })
                }
            };
            let (name, node, target, protocol) = (entry.name, entry.node, entry.target, entry.protocol);
            let mut https = entry.https;
            https.sort();
            declaration.services.push(ServiceSpec { name, node, target, port, protocol, https, tor });
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
        for service in &declaration.services {
            let clients = service.tor.iter().flat_map(|t| &t.clients);
            if let Some(device) = clients.into_iter().find(|c| names.get(*c) != Some(&Kind::Device)) {
                return Err(DeclareError::UndeclaredTorClient {
                    service: service.name.clone(),
                    device: device.clone(),
                });
            }
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

#[cfg(test)]
mod tests {
    use super::super::tests::{labels, parse, rule};
    use super::*;
    use crate::fixtures::{SAMPLE_DECLARATION as EXAMPLE, label};

    #[test]
    fn parses_nodes_services_devices_and_rules() {
        let d = parse(EXAMPLE).unwrap();
        let node =
            |name: &str, role, disabled| NodeSpec { name: label(name), role, disabled, endpoint: None, mtu: None };
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
            ("[[node]]\nname = \"a\"\nendpoint = \"nocolon\"\n", 3, "endpoint: \"nocolon\" is not HOST:PORT"),
            ("[[node]]\nname = \"a\"\nendpoint = \"127.0.0.1:51820\"\n", 3, "loopback"),
            ("[[node]]\nname = \"a\"\nendpoint = 51820\n", 3, "a string"),
            ("mtu = 1200\n[[node]]\nname = \"a\"\n", 1, "mtu: MTU 1200 is not a number from 1280 to 9000"),
            ("[[node]]\nname = \"a\"\nmtu = 70000\n", 3, "MTU 70000 is not a number from 1280 to 9000"),
            ("[[node]]\nname = \"a\"\nmtu = \"1400\"\n", 3, "expected i64"),
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
}
