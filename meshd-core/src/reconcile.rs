//! Reconcile as data: the ordered host steps that turn one host plan into the next, and the peer
//! decisions the WireGuard backends carry out (which peers change, where a changed peer starts sending).
//! The daemon's executor (`meshd::runtime::apply`) carries out the steps, one host edge per kind.
//!
//! The order is the contract the host relies on: the access rules are in place before the interface
//! comes up (they match it by name); addresses are added before peers that route to them; within the
//! peers, withdrawn ones go first, so a removed device loses access before anything else happens;
//! addresses are removed last, once nothing routes to them.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use ipnet::IpNet;

use crate::keys::PublicKey;
use crate::plan::dns::DnsRecords;
use crate::plan::{HostPlan, OnionPlan, PeerPlan, PublicPlan, ServicePlan, nftables};
use crate::session::paths::Reading;

/// One thing to do on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostStep {
    /// Load the access rules: this `nft -f` script replaces the interface's table.
    LoadRules(String),
    /// Create the interface with its key, port, MTU, addresses and peers (at start).
    CreateInterface,
    /// Let the kernel route packets that arrive on the interface (this host routes: hub, relay).
    EnableForwarding,
    /// Set the running interface's MTU, bytes (`ip link set dev IF mtu N`).
    SetMtu(u16),
    /// Add these addresses to the interface.
    AddAddresses(Vec<IpNet>),
    /// Withdraw, replace and add these peers, touching no other.
    ChangePeers(PeerDiff),
    /// Run exactly these service forwarders (starting, stopping or rebinding only what changed).
    RunForwarders(Vec<ServicePlan>),
    /// Start the mesh DNS server with the plan's records (at start).
    StartDns,
    /// Serve these records from the running mesh DNS server.
    UpdateDns(DnsRecords),
    /// Serve exactly these public names (relay) and terminate TLS for these (starting, stopping or
    /// changing only what differs; certificates are kept).
    ServePublic(PublicPlan),
    /// Serve exactly these onion services (keys made where missing, clients listed, tor started, reloaded
    /// or stopped).
    ServeOnions(OnionPlan),
    /// Remove these addresses from the interface.
    RemoveAddresses(Vec<IpNet>),
}

/// The steps that bring a host up from nothing to `plan`: rules, interface, forwarding (a routing
/// host), forwarders, DNS.
pub fn bring_up(plan: &HostPlan) -> Vec<HostStep> {
    let mut steps = vec![HostStep::LoadRules(nftables::render(plan)), HostStep::CreateInterface];
    if plan.access.routes {
        steps.push(HostStep::EnableForwarding);
    }
    steps.push(HostStep::RunForwarders(plan.services.clone()));
    steps.push(HostStep::StartDns);
    if !plan.public.is_empty() {
        steps.push(HostStep::ServePublic(plan.public.clone()));
    }
    if !plan.onions.is_empty() {
        steps.push(HostStep::ServeOnions(plan.onions.clone()));
    }
    steps
}

/// The steps that turn a running `old` into `new`, touching only what changed; none when the plans
/// are equal.
pub fn steps(old: &HostPlan, new: &HostPlan) -> Vec<HostStep> {
    if old == new {
        return Vec::new();
    }
    let mut steps = Vec::new();
    if new.mtu != old.mtu {
        steps.push(HostStep::SetMtu(new.mtu));
    }
    let (add, remove) = diff_addresses(&old.addresses, &new.addresses);
    if !add.is_empty() {
        steps.push(HostStep::AddAddresses(add));
    }
    let peers = diff_peers(&old.peers, &new.peers);
    if !peers.is_empty() {
        steps.push(HostStep::ChangePeers(peers));
    }
    steps.push(HostStep::LoadRules(nftables::render(new)));
    if new.access.routes && !old.access.routes {
        // This host became the relay (the one before it left or was disabled).
        steps.push(HostStep::EnableForwarding);
    }
    if new.services != old.services {
        steps.push(HostStep::RunForwarders(new.services.clone()));
    }
    if new.dns.records != old.dns.records {
        steps.push(HostStep::UpdateDns(new.dns.records.clone()));
    }
    if new.public != old.public {
        steps.push(HostStep::ServePublic(new.public.clone()));
    }
    if new.onions != old.onions {
        steps.push(HostStep::ServeOnions(new.onions.clone()));
    }
    if !remove.is_empty() {
        steps.push(HostStep::RemoveAddresses(remove));
    }
    steps
}

/// The changes that turn one host's peers into another's: only what differs is touched, so untouched
/// peers keep their sessions.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerDiff {
    /// New peers, by public key.
    pub add: Vec<(PublicKey, PeerPlan)>,
    /// Peers whose settings changed (the embedded WireGuard can only replace these, not edit them).
    pub update: Vec<(PublicKey, PeerPlan)>,
    /// Public keys of peers to withdraw.
    pub remove: Vec<PublicKey>,
}

impl PeerDiff {
    /// True when nothing changes.
    pub fn is_empty(&self) -> bool {
        self.add.is_empty() && self.update.is_empty() && self.remove.is_empty()
    }
}

/// Peers to add, to update and to remove to go from `old` to `new`.
pub fn diff_peers(old: &BTreeMap<PublicKey, PeerPlan>, new: &BTreeMap<PublicKey, PeerPlan>) -> PeerDiff {
    let pick = |keep: &dyn Fn(Option<&PeerPlan>, &PeerPlan) -> bool| {
        new.iter().filter(|(k, p)| keep(old.get(*k), p)).map(|(k, p)| (k.clone(), p.clone())).collect()
    };
    PeerDiff {
        add: pick(&|before, _| before.is_none()),
        update: pick(&|before, now| before.is_some_and(|b| b != now)),
        remove: old.keys().filter(|k| !new.contains_key(*k)).cloned().collect(),
    }
}

/// Addresses to add and to remove to go from `old` to `new`.
pub fn diff_addresses(old: &BTreeSet<IpNet>, new: &BTreeSet<IpNet>) -> (Vec<IpNet>, Vec<IpNet>) {
    (new.difference(old).copied().collect(), old.difference(new).copied().collect())
}

/// Where peers were last seen, by public key: what a restarted host starts from.
pub type PeerEndpoints = BTreeMap<PublicKey, SocketAddr>;

/// What to remember of where the interface's peers are: the endpoint of each peer that completed a
/// handshake and sent data over the session it made (one it really used), else what was remembered
/// before. An endpoint the interface merely holds is never taken as a sighting: it may be configured,
/// remembered, or (as boringtun's multi-peer `set` once did) another peer's; nor is one a handshake
/// alone moved it to, which a replayed initiation can do after a peer was configured afresh (its
/// replay memory gone), but whose session the replayer cannot use. Peers no longer on the interface
/// are forgotten.
pub fn endpoints_to_remember(saved: &PeerEndpoints, readings: &BTreeMap<PublicKey, Reading>) -> PeerEndpoints {
    readings
        .iter()
        .filter_map(|(key, reading)| {
            let handshaken = reading.last_handshake.is_some() && reading.rx_bytes > 0;
            let seen = reading.endpoint.filter(|_| handshaken).or_else(|| saved.get(key).copied())?;
            Some((key.clone(), seen))
        })
        .collect()
}

/// How a peer came to be configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerChange {
    /// A new peer (perhaps one removed before, like a node disabled and enabled again).
    Added,
    /// A peer whose settings changed, which the backend edits in place (kernel WireGuard, which keeps
    /// what it learned).
    EditedInPlace,
    /// A peer whose settings changed, which the backend removes and adds again (boringtun refuses to
    /// edit a peer in place), forgetting what it learned.
    Replaced,
}

/// Where a changed peer starts, and whether this side can open a tunnel to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerStart {
    /// The endpoint to configure when the plan names none: `None` leaves it to the plan or the backend.
    pub endpoint: Option<SocketAddr>,
    /// The peer has an endpoint (configured, kept, carried over or remembered): a handshake from this
    /// side can reach it.
    pub reachable: bool,
}

/// The endpoint decision for a peer of a [`PeerDiff`]: `configured` says whether its plan names an
/// endpoint; `learned` is where the interface saw it before the change; `last_seen` where it was when it
/// was last removed. A peer behind NAT has no configured endpoint, so what this side knows of it is all
/// it has to open the tunnel itself.
pub fn peer_start(
    change: PeerChange,
    configured: bool,
    learned: Option<SocketAddr>,
    last_seen: Option<SocketAddr>,
) -> PeerStart {
    let (carried, known) = match change {
        PeerChange::Added => (last_seen, last_seen),
        // The kernel keeps a learned endpoint across an update: nothing to configure.
        PeerChange::EditedInPlace => (None, learned),
        PeerChange::Replaced => (learned, learned),
    };
    PeerStart { endpoint: if configured { None } else { carried }, reachable: configured || known.is_some() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{named_key, sample_host_plan, with_udp_echo};

    fn peer(name: &str, last: u8) -> (PublicKey, PeerPlan) {
        let plan = PeerPlan {
            name: name.parse().expect("a name"),
            preshared_key: None,
            endpoint: None,
            allowed_ips: vec![format!("10.77.0.{last}/32").parse().expect("a net")],
            persistent_keepalive: Some(25),
            path: crate::plan::PathRole::Fallback,
        };
        (named_key(&format!("KEY{last}")), plan)
    }

    fn position(steps: &[HostStep], f: impl Fn(&HostStep) -> bool) -> usize {
        steps.iter().position(f).unwrap_or_else(|| panic!("missing step in {steps:#?}"))
    }

    #[test]
    fn rules_are_in_place_before_the_interface_comes_up() {
        let plan = sample_host_plan(&["10.77.0.4"], true);
        let steps = bring_up(&plan);
        assert_eq!(steps[0], HostStep::LoadRules(nftables::render(&plan)));
        assert_eq!(steps[1], HostStep::CreateInterface);
        assert_eq!(steps[2], HostStep::EnableForwarding, "the hub routes");
        assert_eq!(steps[3..], [HostStep::RunForwarders(plan.services.clone()), HostStep::StartDns]);
        let member = sample_host_plan(&["10.77.0.4"], false);
        assert!(!bring_up(&member).contains(&HostStep::EnableForwarding), "a member does not route");
    }

    #[test]
    fn addresses_come_before_peers_withdrawn_peers_first_and_old_addresses_last() {
        let mut old = sample_host_plan(&["10.77.0.4"], true);
        old.addresses =
            BTreeSet::from(["10.77.0.1/16".parse().expect("a net"), "10.77.0.9/32".parse().expect("a net")]);
        old.peers = BTreeMap::from([peer("gone", 4), peer("kept", 5)]);
        let mut new = with_udp_echo(old.clone());
        new.addresses =
            BTreeSet::from(["10.77.0.1/16".parse().expect("a net"), "10.77.0.3/32".parse().expect("a net")]);
        new.peers = BTreeMap::from([peer("kept", 5), peer("new", 6)]);
        new.dns.records.insert("echo.home.internal".into(), vec!["10.77.0.3".parse().expect("an address")]);

        let steps = steps(&old, &new);
        let add = position(
            &steps,
            |s| matches!(s, HostStep::AddAddresses(a) if a == &["10.77.0.3/32".parse::<IpNet>().expect("a net")]),
        );
        let peers = position(&steps, |s| matches!(s, HostStep::ChangePeers(_)));
        let rules = position(&steps, |s| matches!(s, HostStep::LoadRules(_)));
        let forwarders = position(&steps, |s| matches!(s, HostStep::RunForwarders(v) if v.len() == 2));
        let dns = position(&steps, |s| matches!(s, HostStep::UpdateDns(_)));
        let remove = position(
            &steps,
            |s| matches!(s, HostStep::RemoveAddresses(a) if a == &["10.77.0.9/32".parse::<IpNet>().expect("a net")]),
        );
        assert!(add < peers && peers < rules && rules < forwarders && forwarders < dns && dns < remove, "{steps:#?}");
        let HostStep::ChangePeers(diff) = &steps[peers] else { unreachable!() };
        assert_eq!(diff.remove, [named_key("KEY4")]);
        assert_eq!(diff.add.iter().map(|(k, _)| k.clone()).collect::<Vec<_>>(), [named_key("KEY6")]);
        assert!(diff.update.is_empty(), "an unchanged peer is not touched");
        assert!(!steps.contains(&HostStep::EnableForwarding), "already routing");
    }

    #[test]
    fn a_new_mtu_is_set_on_the_running_interface_and_the_mss_clamp_follows() {
        let plan = sample_host_plan(&["10.77.0.4"], true);
        let mut smaller = plan.clone();
        smaller.mtu = 1340;
        let rules = nftables::render(&smaller);
        assert!(rules.contains("maxseg size set 1300"), "{rules}");
        assert_eq!(steps(&plan, &smaller), [HostStep::SetMtu(1340), HostStep::LoadRules(rules)]);
    }

    #[test]
    fn an_unchanged_plan_takes_no_step_and_a_new_relay_turns_forwarding_on() {
        let plan = sample_host_plan(&["10.77.0.4"], false);
        assert!(steps(&plan, &plan).is_empty());
        let mut relay = plan.clone();
        relay.access.routes = true;
        assert_eq!(steps(&plan, &relay), [HostStep::LoadRules(nftables::render(&relay)), HostStep::EnableForwarding]);
    }

    #[test]
    fn a_changed_peer_keeps_where_it_was_seen() {
        let at = |s: &str| Some(s.parse::<SocketAddr>().expect("an address"));
        let seen = at("198.51.100.7:51820");
        // boringtun forgets the learned endpoint with the peer: carried over.
        assert_eq!(peer_start(PeerChange::Replaced, false, seen, None), PeerStart { endpoint: seen, reachable: true });
        // The kernel keeps it: nothing to set, still reachable.
        assert_eq!(
            peer_start(PeerChange::EditedInPlace, false, seen, None),
            PeerStart { endpoint: None, reachable: true }
        );
        // A peer back after a removal starts from where it was last seen.
        assert_eq!(peer_start(PeerChange::Added, false, None, seen), PeerStart { endpoint: seen, reachable: true });
        // A configured endpoint wins; a peer never seen and not configured waits for its own handshake.
        assert_eq!(peer_start(PeerChange::Replaced, true, seen, None), PeerStart { endpoint: None, reachable: true });
        assert_eq!(peer_start(PeerChange::Added, false, seen, None), PeerStart { endpoint: None, reachable: false });
    }

    fn at(s: &str) -> Option<SocketAddr> {
        Some(s.parse().unwrap())
    }

    #[test]
    fn only_endpoints_confirmed_by_a_handshake_are_remembered() {
        let saved = PeerEndpoints::from([(named_key("natted"), at("192.0.2.9:4000").unwrap())]);
        let reading = |endpoint: &str, handshaken: bool| Reading {
            rx_bytes: if handshaken { 96 } else { 0 },
            last_handshake: handshaken.then_some(1_790_000_000),
            endpoint: at(endpoint),
        };
        let states = BTreeMap::from([
            // Handshaken: where it really is now.
            (named_key("roamed"), reading("198.51.100.2:51820", true)),
            // A handshake and nothing over its session (a replayed initiation answered): not a sighting.
            (
                named_key("replayed"),
                Reading { rx_bytes: 0, last_handshake: Some(1_790_000_000), endpoint: at("203.0.113.66:4040") },
            ),
            // Holds another peer's endpoint but never answered from there: not a sighting.
            (named_key("never-ran"), reading("198.51.100.2:51820", false)),
            // Not seen since the restart: what was remembered stays.
            (named_key("natted"), reading("198.51.100.2:51820", false)),
            (named_key("quiet"), Reading::default()),
        ]);
        let remembered = endpoints_to_remember(&saved, &states);
        assert_eq!(
            remembered,
            PeerEndpoints::from([
                (named_key("roamed"), at("198.51.100.2:51820").unwrap()),
                (named_key("natted"), at("192.0.2.9:4000").unwrap()),
            ])
        );
    }

    #[test]
    fn peers_gone_from_the_interface_are_forgotten() {
        let saved = PeerEndpoints::from([(named_key("gone"), at("192.0.2.9:4000").unwrap())]);
        assert!(endpoints_to_remember(&saved, &BTreeMap::new()).is_empty());
    }
}
