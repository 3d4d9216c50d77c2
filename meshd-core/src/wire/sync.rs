//! The sync protocol's messages and the state arithmetic both ends share: what a member and the hub
//! send each other (JSON lines), the changes between two states, applying them, and the digest that
//! says which state a member has. The transport (one TCP stream per member inside the mesh) is the
//! daemon's `links::sync`; the decisions of each end are [`crate::session`].

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::acme::renewal::Status;
use crate::input::{Label, PublicName};
use crate::keys::PublicKey;
use crate::model::{AccessRule, DeviceGrants, Exposure, Network, Node, OnionService, Service, SharedState};
use crate::tor::onion::OnionAddress;

/// One change to the shared state. Items are replaced whole, by name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "change", content = "value", rename_all = "snake_case")]
pub enum Change {
    /// The network's settings (name, domain, ranges).
    Network(Network),
    /// A node added or changed.
    Node(Node),
    /// A node removed, by name.
    NodeGone(Label),
    /// A service added or changed.
    Service(Service),
    /// A service removed, by name.
    ServiceGone(Label),
    /// A device's grants added or changed (members never see device keys).
    Device(DeviceGrants),
    /// A device removed, by name.
    DeviceGone(Label),
    /// The access rules, all of them.
    Rules(Vec<AccessRule>),
    /// The public names, all of them (a member from before public names cannot read this change: members are
    /// upgraded before a name is exposed).
    Exposures(Vec<Exposure>),
    /// The onion services, all of them (members are upgraded before a service is exposed over Tor, as for
    /// public names).
    Onions(Vec<OnionService>),
}

/// What a member sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "msg", rename_all = "snake_case")]
pub enum ToHub {
    /// (Re)start: the digest of the state the member has.
    Hello {
        /// [`digest`] of the member's copy.
        digest: String,
    },
    /// The key the member made after being asked to rotate (its private half stays on the member).
    NewKey {
        /// The new public key.
        public_key: PublicKey,
    },
    /// The member is switching to the accepted key now.
    Switch,
    /// The state of the certificates this member holds (its passthrough names; a relay's terminated ones),
    /// all of them, sent when one changes and after connecting; `service list` on the hub shows them.
    Certificates {
        /// By public name.
        certificates: BTreeMap<PublicName, Status>,
    },
    /// The onion services this member serves, all of them, sent when one changes and after connecting;
    /// `service list` on the hub shows them.
    Onions {
        /// By service.
        onions: BTreeMap<Label, OnionReport>,
    },
}

/// Where one of a member's onion services stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnionReport {
    /// Its key is in place: this is its address.
    Address(OnionAddress),
    /// It cannot be served (no `tor`, one too old, a key that cannot be written), in one line.
    Error(String),
}

/// What the hub sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "msg", rename_all = "snake_case")]
pub enum ToMember {
    /// The whole state (a member whose digest the hub does not know).
    State {
        /// [`digest`] of `state`.
        digest: String,
        /// The network as members see it (boxed: it is most of the message's size).
        state: Box<SharedState>,
    },
    /// The changes from the state of digest `from` to the state of digest `to`.
    Changes {
        /// The digest the member must have for these to apply.
        from: String,
        /// The digest after them.
        to: String,
        /// What changed, in order.
        changes: Vec<Change>,
    },
    /// The new key is valid and free; switch to it and say so.
    KeyAccepted,
    /// A message refused.
    Refused {
        /// Why, in one line.
        reason: String,
    },
}

/// Content digest of a state: hex SHA-256 of its JSON.
pub fn digest(state: &SharedState) -> String {
    let json = serde_json::to_vec(state).expect("the shared state serialises");
    hex::encode(Sha256::digest(&json))
}

/// The changes that turn `old` into `new`.
pub fn changes(old: &SharedState, new: &SharedState) -> Vec<Change> {
    let mut out = Vec::new();
    if old.network != new.network {
        out.push(Change::Network(new.network.clone()));
    }
    diff_named(&old.nodes, &new.nodes, |n| &n.name, Change::Node, Change::NodeGone, &mut out);
    diff_named(&old.services, &new.services, |v| &v.name, Change::Service, Change::ServiceGone, &mut out);
    diff_named(&old.devices, &new.devices, |d| &d.name, Change::Device, Change::DeviceGone, &mut out);
    if old.rules != new.rules {
        out.push(Change::Rules(new.rules.clone()));
    }
    if old.exposures != new.exposures {
        out.push(Change::Exposures(new.exposures.clone()));
    }
    if old.onions != new.onions {
        out.push(Change::Onions(new.onions.clone()));
    }
    out
}

fn diff_named<T: Clone + PartialEq>(
    old: &[T],
    new: &[T],
    name: impl Fn(&T) -> &Label,
    upsert: impl Fn(T) -> Change,
    gone: impl Fn(Label) -> Change,
    out: &mut Vec<Change>,
) {
    let before: HashMap<&Label, &T> = old.iter().map(|t| (name(t), t)).collect();
    let after: HashSet<&Label> = new.iter().map(&name).collect();
    out.extend(old.iter().filter(|t| !after.contains(name(t))).map(|t| gone(name(t).clone())));
    out.extend(new.iter().filter(|t| before.get(name(t)) != Some(t)).map(|t| upsert(t.clone())));
}

/// Apply `changes` to `state`, keeping the controller's order (by address index), so the result has
/// the same digest as the controller's own copy.
pub fn apply(state: &mut SharedState, changes: &[Change]) {
    fn upsert<T>(items: &mut Vec<T>, item: T, name: impl Fn(&T) -> &Label) {
        match items.iter_mut().find(|t| name(t) == name(&item)) {
            Some(slot) => *slot = item,
            None => items.push(item),
        }
    }
    for change in changes {
        match change.clone() {
            Change::Network(n) => state.network = n,
            Change::Node(n) => upsert(&mut state.nodes, n, |n| &n.name),
            Change::NodeGone(name) => state.nodes.retain(|n| n.name != name),
            Change::Service(v) => upsert(&mut state.services, v, |v| &v.name),
            Change::ServiceGone(name) => state.services.retain(|v| v.name != name),
            Change::Device(d) => upsert(&mut state.devices, d, |d| &d.name),
            Change::DeviceGone(name) => state.devices.retain(|d| d.name != name),
            Change::Rules(r) => state.rules = r,
            Change::Exposures(e) => state.exposures = e,
            Change::Onions(o) => state.onions = o,
        }
    }
    state.nodes.sort_by_key(|n| n.index);
    state.services.sort_by_key(|v| v.index);
    state.devices.sort_by_key(|d| d.index);
}

/// `message` as one line of the protocol, newline included.
pub fn line(message: &ToMember) -> Arc<str> {
    let mut text = serde_json::to_string(message).expect("messages serialise");
    text.push('\n');
    text.into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{label, node, sample_state as state};
    use crate::model::Protocol;

    #[test]
    fn applying_the_changes_reproduces_the_new_state_and_its_digest() {
        let old = state();
        let mut new = old.clone();
        new.nodes.retain(|n| n.name.as_str() != "vps");
        new.nodes.push(node("cellar", 6));
        new.nodes[1].endpoint = Some("198.51.100.3:51820".parse().unwrap());
        new.devices[0].allow.clear();
        new.rules.push(AccessRule { from: label("hub"), to: label("attic") });
        new.exposures.push(Exposure {
            hostname: "pay.shop.example".parse().unwrap(),
            service: label("beacon"),
            relay: label("hub"),
            tls: crate::relay::route::TlsMode::Passthrough,
        });
        new.onions.push(OnionService {
            service: label("beacon"),
            port: 80,
            authorized_only: true,
            clients: vec![crate::model::OnionClient {
                device: label("phone"),
                public_key: crate::tor::client::ClientKey::generate().public_key(),
            }],
        });
        new.services.insert(
            0,
            Service {
                name: label("early"),
                node: label("hub"),
                target: "127.0.0.1:1".parse().unwrap(),
                port: 1,
                index: 2,
                protocol: Protocol::Udp,
            },
        );
        new.services.sort_by_key(|v| v.index);
        let diff = changes(&old, &new);
        assert_eq!(diff.len(), 8, "{diff:?}");
        assert!(diff.contains(&Change::NodeGone(label("vps"))));
        assert!(diff.contains(&Change::Exposures(new.exposures.clone())));
        assert!(diff.contains(&Change::Onions(new.onions.clone())));
        let mut copy = old.clone();
        apply(&mut copy, &diff);
        assert_eq!(copy, new);
        assert_eq!(digest(&copy), digest(&new));
        assert_ne!(digest(&old), digest(&new));
        assert!(changes(&new, &copy).is_empty());
    }

    #[test]
    fn a_network_without_public_names_has_the_digest_members_from_before_them_compute() {
        let json = serde_json::to_value(state()).unwrap();
        assert!(json.get("exposures").is_none(), "no public names, no field: {json}");
        let cached: SharedState = serde_json::from_value(json).unwrap();
        assert!(cached.exposures.is_empty());
    }

    #[test]
    fn a_state_cached_before_udp_services_reads_its_services_as_tcp() {
        let mut json = serde_json::to_value(state()).unwrap();
        json["services"][0].as_object_mut().unwrap().remove("protocol");
        let cached: SharedState = serde_json::from_value(json).unwrap();
        assert_eq!(cached.services[0].protocol, Protocol::Tcp);
        assert_eq!(cached, state());
    }

    #[test]
    fn a_state_from_before_mtus_reads_as_the_default_and_a_new_mtu_travels_as_a_change() {
        let mut json = serde_json::to_value(state()).unwrap();
        json["network"].as_object_mut().unwrap().remove("mtu");
        let cached: SharedState = serde_json::from_value(json).unwrap();
        assert_eq!(cached.network.mtu, crate::model::MESH_MTU);
        assert!(cached.nodes.iter().all(|n| n.mtu.is_none()));
        assert!(!serde_json::to_string(&cached.nodes[0]).unwrap().contains("mtu"), "no own MTU, no field");

        let mut new = cached.clone();
        new.network.mtu = 1340;
        new.nodes[1].mtu = Some(1320);
        let diff = changes(&cached, &new);
        assert_eq!(diff.len(), 2, "{diff:?}");
        let mut copy = cached.clone();
        apply(&mut copy, &diff);
        assert_eq!(copy, new);
        // A member from before MTUs reads the new state (unknown fields are ignored).
        let text = serde_json::to_string(&new).unwrap();
        assert!(text.contains("\"mtu\":1340") && text.contains("\"mtu\":1320"), "{text}");
    }

    #[test]
    fn messages_round_trip_as_single_lines() {
        let message =
            ToMember::Changes { from: "a".into(), to: "b".into(), changes: vec![Change::NodeGone(label("vps"))] };
        let text = line(&message);
        assert_eq!(text.matches('\n').count(), 1);
        assert_eq!(serde_json::from_str::<ToMember>(&text).unwrap(), message);
    }
}
