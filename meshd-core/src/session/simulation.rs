//! Simulation: a hub and several members, the real state machines of this module, over an in-memory
//! network on a fake clock; no root, no sockets, no threads. A stand-in controller holds the network's
//! state and makes the decisions the hub's loop asks of it (is this key free, switch to it). Hosts
//! join, the network changes, connections drop with what was in flight, members reconnect and restart,
//! the hub restarts (its journal lost) and goes away for longer than a rotation waits, and key
//! rotations go wrong: an offer lost with its connection, a confirmation lost, a switch that never
//! reaches the hub, a member restarted halfway, a new key that cannot be saved (a full state
//! directory) until space is freed. Each seed is one schedule of events (the keys made are
//! random, and play no part in it); at the end every member must hold the controller's state, have
//! applied the plan the planner makes of it, and use the key the network knows it by.
//!
//! Cryptokey routing is modelled: a member reaches the hub only while the hub has it as an active peer
//! with the key its interface uses; a member the hub drops hears nothing more through the mesh. The
//! controller's join service, outside the mesh, answers whoever asks where a key stands while the hub
//! is up: that is how a removed member learns it.

use std::collections::{BTreeMap, VecDeque};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::hub::{self, HubSession, Journal};
use super::member::{self, Member};
use crate::fixtures::{label, node, sample_state};
use crate::keys::{PrivateKey, PublicKey};
use crate::model::{AccessRule, Protocol, Role, Service, SharedState};
use crate::plan::{HostPlan, plan_host};
use crate::wire::join::{HubContact, MemberState, Standing};
use crate::wire::sync::{ToHub, ToMember, line};

const TICK: Duration = Duration::from_millis(50);
const RECONNECT: Duration = Duration::from_millis(700);

/// A connection between a member and the hub, and the hub's session on it.
struct Link {
    to_member: VecDeque<Arc<str>>,
    to_hub: VecDeque<String>,
    session: HubSession,
    /// The session receives published changes (after its catch-up).
    subscribed: bool,
}

/// A member host: its state machine, and what its daemon would hold on the host.
struct Host {
    member: Member,
    /// Its mesh address (IPv4), what the hub knows a session's node by.
    addr: IpAddr,
    /// The key the interface uses.
    interface_key: PrivateKey,
    /// `private.key` and the saved next key of a rotation.
    key_file: PrivateKey,
    next_key_file: Option<PrivateKey>,
    /// `member.json`.
    cache: MemberState,
    /// Its state directory is full: neither a new key nor the cache can be saved.
    disk_full: bool,
    /// The plan the last reconcile applied.
    applied: Option<HostPlan>,
    /// The public key it joined with.
    joined_with: PublicKey,
    link: Option<Link>,
    reconnect_at: Instant,
    stopped: bool,
}

/// What goes wrong on purpose, once, at a rotation.
#[derive(Default)]
struct Faults {
    /// Drop this member's connection right after the hub switched its key (the confirmation is lost).
    drop_after_switch: Option<String>,
    /// Drop this member's connection while its switch message is unread (the hub never switches).
    drop_before_switch: Option<String>,
    /// Drop this member's connection while its key offer is unread (the offer is lost).
    drop_before_offer: Option<String>,
    /// Take the hub away for this long right after it switched a member's key.
    outage_after_switch: Option<Duration>,
}

struct World {
    now: Instant,
    /// The controller's state of the network.
    network: SharedState,
    journal: Journal,
    hosts: BTreeMap<String, Host>,
    rng: u64,
    /// Chance per tick and connection of a drop, in 1/1000.
    drop_per_mille: u64,
    faults: Faults,
    drops: usize,
    /// The hub is down until then; it comes back restarted.
    hub_down_until: Option<Instant>,
    /// The keys of removed nodes, as the controller's database keeps them.
    removed_keys: Vec<PublicKey>,
}

impl World {
    /// A network of the hub alone.
    fn new(seed: u64) -> World {
        let mut network = sample_state();
        network.nodes.truncate(1);
        network.services.clear();
        network.devices.clear();
        let now = Instant::now();
        World {
            now,
            journal: Journal::new(network.clone()),
            network,
            hosts: BTreeMap::new(),
            rng: seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1,
            drop_per_mille: 0,
            faults: Faults::default(),
            drops: 0,
            hub_down_until: None,
            removed_keys: Vec::new(),
        }
    }

    fn random(&mut self, below: u64) -> u64 {
        // xorshift64: a reproducible schedule per seed.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng % below
    }

    /// The controller changed the network: the hub publishes, every live session sends the change,
    /// and a session whose node left is closed (with what it had not delivered: the hub took the peer
    /// away first).
    fn publish(&mut self) {
        let Some(change) = self.journal.publish(self.network.clone()) else { return };
        let journal = &self.journal;
        for host in self.hosts.values_mut() {
            let Some(link) = &mut host.link else { continue };
            if link.subscribed {
                link.to_member.push_back(change.clone());
            }
            let still = journal.member(host.addr) == Some(link.session.node());
            link.session.handle_published(still);
        }
        self.hub_effects();
    }

    /// A host joins with a fresh key and the state of the moment.
    fn join(&mut self, name: &str) {
        let index = self.network.nodes.iter().map(|n| n.index).max().unwrap_or(0) + 1;
        let key = PrivateKey::generate();
        let mut joined = node(name, index);
        joined.public_key = key.public_key();
        self.network.nodes.push(joined);
        self.publish();
        let hub = HubContact { join: "203.0.113.5:51820".parse().expect("an endpoint"), fingerprint: "ab".repeat(32) };
        let cache = MemberState { me: label(name), state: self.network.clone(), hub: Some(hub) };
        let addr = IpAddr::V4(self.network.network.pool().v4_of(index));
        let host = Host {
            member: Member::new(cache.clone(), key.clone(), None, self.now),
            addr,
            interface_key: key.clone(),
            key_file: key.clone(),
            next_key_file: None,
            cache,
            disk_full: false,
            applied: None,
            joined_with: key.public_key(),
            link: None,
            reconnect_at: self.now,
            stopped: false,
        };
        self.hosts.insert(name.to_owned(), host);
    }

    /// The hub is up and its interface has `name` as an active peer with the key its interface uses.
    fn reachable(&self, name: &str) -> bool {
        let host = &self.hosts[name];
        if self.hub_down_until.is_some() {
            return false;
        }
        self.network
            .nodes
            .iter()
            .any(|n| n.name.as_str() == name && n.active() && n.public_key == host.interface_key.public_key())
            && self.journal.member(host.addr).is_some_and(|n| n.as_str() == name)
    }

    fn drop_link(&mut self, name: &str) {
        let now = self.now;
        let host = self.hosts.get_mut(name).expect("a host");
        if host.link.take().is_some() {
            self.drops += 1;
            host.member.handle_disconnected(now);
        }
        host.reconnect_at = now + RECONNECT;
        self.member_effects(name);
    }

    /// The hub goes away for `duration` and comes back restarted.
    fn hub_outage(&mut self, duration: Duration) {
        self.restart_hub();
        self.hub_down_until = Some(self.now + duration);
    }

    /// Member `name` restarts from what it has on disk: its cached state, `private.key` and the next key
    /// of a rotation under way.
    fn restart_member(&mut self, name: &str) {
        self.drop_link(name);
        let now = self.now;
        let host = self.hosts.get_mut(name).expect("a host");
        host.member = Member::new(host.cache.clone(), host.key_file.clone(), host.next_key_file.clone(), now);
        host.interface_key = host.member.interface_key().clone();
        self.member_effects(name);
    }

    fn restart_hub(&mut self) {
        let names: Vec<String> = self.hosts.keys().cloned().collect();
        for name in names {
            self.drop_link(&name);
        }
        self.journal = Journal::new(self.network.clone());
    }

    fn step(&mut self) {
        self.now += TICK;
        if self.hub_down_until.is_some_and(|until| until <= self.now) {
            self.hub_down_until = None;
        }
        let names: Vec<String> = self.hosts.keys().cloned().collect();
        for name in &names {
            if self.hosts[name].stopped {
                continue;
            }
            self.connect_if_due(name);
            if self.hosts[name].link.is_some() && self.drop_per_mille > 0 && self.random(1000) < self.drop_per_mille {
                self.drop_link(name);
            }
            self.hub_reads(name);
            self.member_reads(name);
            let now = self.now;
            let host = self.hosts.get_mut(name).expect("a host");
            if host.member.poll_timeout().is_some_and(|at| at <= now) {
                host.member.handle_timeout(now);
            }
            if let Some(link) = &mut host.link
                && link.session.poll_timeout().is_some_and(|at| at <= now)
            {
                link.session.handle_timeout(now);
            }
            self.member_effects(name);
        }
        self.hub_effects();
    }

    fn connect_if_due(&mut self, name: &str) {
        let host = &self.hosts[name];
        if host.link.is_some() || host.reconnect_at > self.now || !self.reachable(name) {
            return;
        }
        let now = self.now;
        let host = self.hosts.get_mut(name).expect("a host");
        let mut link = Link {
            to_member: VecDeque::new(),
            to_hub: VecDeque::new(),
            session: HubSession::new(label(name), now),
            subscribed: false,
        };
        link.to_hub.push_back(line_to_hub(&ToHub::Hello { digest: host.member.digest().to_owned() }));
        host.link = Some(link);
        host.member.handle_connected(now);
        self.member_effects(name);
    }

    fn hub_reads(&mut self, name: &str) {
        loop {
            let host = self.hosts.get_mut(name).expect("a host");
            let Some(link) = &mut host.link else { return };
            let Some(text) = link.to_hub.pop_front() else { return };
            if text.contains("\"switch\"") && self.faults.drop_before_switch.as_deref() == Some(name) {
                self.faults.drop_before_switch = None;
                self.drop_link(name);
                return;
            }
            if text.contains("\"new_key\"") && self.faults.drop_before_offer.as_deref() == Some(name) {
                self.faults.drop_before_offer = None;
                self.drop_link(name);
                return;
            }
            link.session.handle_line(text.trim_end());
            self.session_effects(name);
        }
    }

    /// Carry out what the hub's session of `name` asks for.
    fn session_effects(&mut self, name: &str) {
        loop {
            let host = self.hosts.get_mut(name).expect("a host");
            let Some(link) = &mut host.link else { return };
            let Some(effect) = link.session.poll_effect() else { return };
            match effect {
                hub::Effect::CatchUp { digest } => {
                    link.to_member.extend(self.journal.catch_up(&digest));
                    link.subscribed = true;
                }
                hub::Effect::Send(message) => link.to_member.push_back(line(&message)),
                // The simulated members hold no certificate.
                hub::Effect::Certificates(_) | hub::Effect::Onions(_) => {}
                hub::Effect::CheckKey { public_key } => {
                    let verdict = check_key(&self.network, name, &public_key);
                    link.session.handle_key_verdict(verdict);
                }
                hub::Effect::SwitchKey { public_key } => {
                    if check_key(&self.network, name, &public_key).is_ok() {
                        let n = self.network.nodes.iter_mut().find(|n| n.name.as_str() == name).expect("a node");
                        n.public_key = public_key;
                        n.rotate_key = false;
                        self.publish();
                        if self.faults.drop_after_switch.as_deref() == Some(name) {
                            self.faults.drop_after_switch = None;
                            self.drop_link(name);
                            if let Some(outage) = self.faults.outage_after_switch.take() {
                                self.hub_outage(outage);
                            }
                        }
                    }
                }
                hub::Effect::Close(_) => {
                    self.drop_link(name);
                    return;
                }
            }
        }
    }

    fn hub_effects(&mut self) {
        let names: Vec<String> = self.hosts.keys().cloned().collect();
        for name in names {
            self.session_effects(&name);
        }
    }

    fn member_reads(&mut self, name: &str) {
        loop {
            let host = self.hosts.get_mut(name).expect("a host");
            let Some(link) = &mut host.link else { return };
            let Some(text) = link.to_member.pop_front() else { return };
            let message: ToMember = serde_json::from_str(&text).expect("the hub sends valid lines");
            host.member.handle_message(message);
            self.member_effects(name);
        }
    }

    /// Carry out what member `name` asks for, as its daemon would.
    fn member_effects(&mut self, name: &str) {
        let now = self.now;
        let host = self.hosts.get_mut(name).expect("a host");
        while let Some(effect) = host.member.poll_effect() {
            match effect {
                member::Effect::Send(message) => host.send(message, false, now),
                member::Effect::SendAcknowledged(message) => host.send(message, true, now),
                member::Effect::OfferKey(_) if host.disk_full => host.member.handle_offer_failed(now),
                member::Effect::OfferKey(key) => {
                    let public_key = key.public_key();
                    host.next_key_file = Some(key);
                    if host.link.is_none() {
                        host.member.handle_offer_failed(now);
                    }
                    host.send(ToHub::NewKey { public_key }, false, now);
                }
                member::Effect::UseKey(key) => {
                    host.interface_key = key;
                    host.member.handle_key_used(true, now);
                }
                member::Effect::DiscardNextKey => host.next_key_file = None,
                member::Effect::PromoteNextKey => {
                    host.key_file = host.next_key_file.take().expect("a confirmed key was saved first");
                    host.member.handle_promoted(true, now);
                }
                member::Effect::CacheState if host.disk_full => {}
                member::Effect::CacheState => host.cache = host.member.member_state().clone(),
                member::Effect::Reconcile => {
                    let state = &host.member.member_state().state;
                    host.applied = Some(plan_host(&state.snapshot(), name).expect("a member plans itself"));
                }
                member::Effect::OpenKnownTunnels => {}
                member::Effect::AskStanding(keys) => {
                    let answer =
                        self.hub_down_until.is_none().then(|| standing(&self.network, &self.removed_keys, &keys));
                    host.member.handle_standing(answer, now);
                }
                member::Effect::Removed { .. } => host.stopped = true,
            }
        }
    }

    fn run(&mut self, duration: Duration) {
        let until = self.now + duration;
        while self.now < until {
            self.step();
        }
    }

    fn change(&mut self, f: impl FnOnce(&mut SharedState)) {
        f(&mut self.network);
        self.publish();
    }

    /// The controller removes member `name`, keeping its key as a removed node's.
    fn remove(&mut self, name: &str) {
        let gone = label(name);
        let key = self.network.nodes.iter().find(|n| n.name == gone).map(|n| n.public_key.clone());
        self.removed_keys.extend(key);
        self.change(|s| {
            s.services.retain(|v| v.node != gone);
            s.rules.retain(|r| r.from != gone && r.to != gone);
            s.nodes.retain(|n| n.name != gone);
        });
    }
}

/// What the controller's join service answers about `keys`.
fn standing(network: &SharedState, removed: &[PublicKey], keys: &[PublicKey]) -> Standing {
    Standing::best(keys.iter().map(|key| match network.nodes.iter().find(|n| &n.public_key == key) {
        Some(node) if node.disabled => Standing::Disabled,
        Some(_) => Standing::Member,
        None if removed.contains(key) => Standing::Removed,
        None => Standing::Unknown,
    }))
}

impl Host {
    /// What the daemon's sync client does: a message goes out in the current session, or nowhere.
    fn send(&mut self, message: ToHub, acknowledged: bool, now: Instant) {
        let sent = match &mut self.link {
            Some(link) => {
                link.to_hub.push_back(line_to_hub(&message));
                true
            }
            None => false,
        };
        if acknowledged {
            self.member.handle_acknowledged(sent, now);
        }
    }
}

fn line_to_hub(message: &ToHub) -> String {
    serde_json::to_string(message).expect("messages serialise") + "\n"
}

/// The controller's check of an offered key: the node was asked for one and no other node has it.
fn check_key(network: &SharedState, name: &str, public_key: &PublicKey) -> Result<(), String> {
    let asked = network.nodes.iter().any(|n| n.name.as_str() == name && n.rotate_key);
    if !asked {
        return Err(format!("node {name} was not asked for a new key"));
    }
    if network.nodes.iter().any(|n| &n.public_key == public_key) {
        return Err("the key is in use".into());
    }
    Ok(())
}

fn service(name: &str, on: &str, port: u16, index: u32) -> Service {
    Service {
        name: label(name),
        node: label(on),
        target: format!("127.0.0.1:{port}").parse().expect("a target"),
        port,
        index,
        protocol: if port.is_multiple_of(2) { Protocol::Tcp } else { Protocol::Udp },
    }
}

/// One schedule: joins, changes under random drops, a hub restart, rotations that go wrong (a
/// confirmation lost and the hub then away for 45 s, a switch lost, an offer lost, a member restarted
/// halfway), a member disabled and one removed; then two quiet minutes.
fn schedule(seed: u64) -> World {
    let mut w = World::new(seed);
    for name in ["alpha", "bravo", "charlie"] {
        w.join(name);
    }
    w.run(Duration::from_secs(2));
    w.drop_per_mille = 15;
    for (round, index) in (0..12u16).zip(101..) {
        let on = ["alpha", "bravo", "charlie"][usize::from(round) % 3];
        w.change(|s| s.services.push(service(&format!("svc{round}"), on, 8000 + round, index)));
        if round % 3 == 0 {
            w.change(|s| s.rules.push(AccessRule { from: label("bravo"), to: label(on) }));
        }
        if round == 4 {
            w.join("delta");
        }
        if round == 5 {
            w.faults.drop_after_switch = Some("bravo".into());
            w.faults.outage_after_switch = Some(Duration::from_secs(45));
            w.change(|s| s.nodes.iter_mut().filter(|n| n.name.as_str() == "bravo").for_each(|n| n.rotate_key = true));
        }
        if round == 6 {
            w.restart_hub();
        }
        if round == 7 {
            w.faults.drop_before_switch = Some("charlie".into());
            w.change(|s| s.nodes.iter_mut().filter(|n| n.name.as_str() == "charlie").for_each(|n| n.rotate_key = true));
        }
        if round == 8 {
            w.restart_member("charlie");
            w.change(|s| s.nodes.iter_mut().filter(|n| n.name.as_str() == "delta").for_each(|n| n.disabled = true));
        }
        if round == 9 {
            w.join("echo");
            w.change(|s| s.services.retain(|v| v.node.as_str() != "alpha" || v.port % 3 != 0));
        }
        if round == 10 {
            w.remove("alpha");
        }
        if round == 11 {
            w.faults.drop_before_offer = Some("delta".into());
            w.change(|s| {
                let delta = s.nodes.iter_mut().find(|n| n.name.as_str() == "delta").expect("delta joined");
                delta.disabled = false;
                delta.rotate_key = true;
            });
        }
        let pause = 200 + w.random(3000);
        w.run(Duration::from_millis(pause));
    }
    w.drop_per_mille = 0;
    // Long enough for the hub to come back and a rotation to try both keys and be offered again.
    w.run(member::ROTATION_CONFIRM * 4);
    w
}

fn assert_converged(w: &World, seed: u64) {
    let snapshot = w.network.snapshot();
    for (name, host) in &w.hosts {
        let known = w.network.nodes.iter().find(|n| n.name.as_str() == name);
        let Some(known) = known else {
            // Removed: the hub dropped it as a peer, and the join service told it so: it stopped.
            assert!(host.link.is_none() && !w.reachable(name), "seed {seed}: removed {name} still connected");
            assert!(host.stopped, "seed {seed}: removed {name} never heard of it");
            continue;
        };
        assert_eq!(host.member.digest(), w.journal.digest(), "seed {seed}: {name} holds another state");
        assert_eq!(host.member.member_state().state, w.network, "seed {seed}: {name}");
        assert_eq!(host.cache.state, w.network, "seed {seed}: {name} cached an older state");
        let planned = plan_host(&snapshot, name).expect("the controller plans every node");
        assert_eq!(host.applied.as_ref(), Some(&planned), "seed {seed}: {name} applied another plan");
        assert_eq!(
            host.interface_key.public_key(),
            known.public_key,
            "seed {seed}: {name} uses a key the network does not know"
        );
        assert_eq!(host.key_file, host.interface_key, "seed {seed}: {name} would restart with another key");
        assert!(host.next_key_file.is_none() && !host.member.is_rotating(), "seed {seed}: {name} is still rotating");
        assert!(!known.rotate_key, "seed {seed}: {name} never rotated");
        assert!(host.link.is_some(), "seed {seed}: {name} is not connected");
    }
}

#[test]
fn members_converge_to_the_planners_view_through_drops_restarts_and_failed_rotations() {
    let mut drops = 0;
    for seed in 1..=40 {
        let w = schedule(seed);
        assert_converged(&w, seed);
        // Both rotations went through in the end, to new keys; the others kept theirs.
        for (name, host) in &w.hosts {
            let rotated = host.key_file.public_key() != host.joined_with;
            assert_eq!(rotated, ["bravo", "charlie", "delta"].contains(&name.as_str()), "seed {seed}: {name}");
        }
        assert_eq!(w.hosts.len(), 5);
        drops += w.drops;
    }
    assert!(drops > 40, "the schedules dropped connections ({drops})");
}

#[test]
fn a_rotation_whose_switch_never_reaches_the_hub_goes_back_and_is_offered_again() {
    let mut w = World::new(7);
    w.join("alpha");
    w.run(Duration::from_secs(2));
    let old = w.hosts["alpha"].interface_key.public_key();
    w.faults.drop_before_switch = Some("alpha".into());
    w.change(|s| s.nodes.iter_mut().for_each(|n| n.rotate_key = n.role != Role::Hub));
    w.run(Duration::from_secs(2));
    // The member switched; the hub never heard: the network still knows the old key.
    let host = &w.hosts["alpha"];
    let first = host.interface_key.public_key();
    assert!(host.member.is_rotating() && first != old);
    assert_eq!(w.network.nodes[1].public_key, old);
    w.run(member::ROTATION_CONFIRM - Duration::from_secs(5));
    assert_eq!(w.hosts["alpha"].interface_key.public_key(), first, "still waiting for the confirmation");
    // Then it goes back to the old key and offers another, which goes through.
    w.run(Duration::from_secs(10));
    assert_converged(&w, 7);
    let now = &w.network.nodes[1].public_key;
    assert!(now != &old && now != &first, "a second, new key: {now}");
}

#[test]
fn a_rotation_confirmed_while_the_member_was_away_is_finished_on_reconnect() {
    let mut w = World::new(11);
    w.join("alpha");
    w.run(Duration::from_secs(2));
    let old = w.hosts["alpha"].interface_key.public_key();
    w.faults.drop_after_switch = Some("alpha".into());
    w.change(|s| s.nodes.iter_mut().for_each(|n| n.rotate_key = n.role != Role::Hub));
    w.run(Duration::from_secs(5));
    assert_eq!(w.drops, 1, "the confirmation was lost with the connection");
    assert_converged(&w, 11);
    assert_ne!(w.hosts["alpha"].key_file.public_key(), old);
}

#[test]
fn a_member_removed_while_it_was_away_hears_of_it_when_the_hub_is_back() {
    let mut w = World::new(5);
    w.join("alpha");
    w.join("bravo");
    w.run(Duration::from_secs(2));
    // alpha is stopped (its link gone, no timers run), removed meanwhile, and restarted from its disk
    // while the hub is away: it keeps running, and stops once the hub answers.
    w.drop_link("alpha");
    w.hosts.get_mut("alpha").expect("alpha").stopped = true;
    w.remove("alpha");
    w.hub_outage(Duration::from_secs(40));
    w.hosts.get_mut("alpha").expect("alpha").stopped = false;
    w.restart_member("alpha");
    w.run(Duration::from_secs(35));
    assert!(!w.hosts["alpha"].stopped, "no answer while the hub is away: alpha keeps running");
    w.run(member::STANDING_AGAIN + Duration::from_secs(5));
    assert!(w.hosts["alpha"].stopped, "alpha did not hear it was removed");
    assert!(!w.hosts["bravo"].stopped);
    assert_converged(&w, 5);
}

#[test]
fn a_restarted_hub_sends_every_member_the_whole_state() {
    let mut w = World::new(3);
    w.join("alpha");
    w.join("bravo");
    w.run(Duration::from_secs(2));
    w.restart_hub();
    w.change(|s| s.services.push(service("late", "alpha", 9000, 50)));
    w.run(Duration::from_secs(3));
    assert_converged(&w, 3);
}

#[test]
fn a_rotation_on_a_full_state_directory_waits_and_finishes_once_space_is_freed() {
    let mut w = World::new(5);
    w.join("alpha");
    w.run(Duration::from_secs(2));
    let old = w.hosts["alpha"].interface_key.public_key();
    w.hosts.get_mut("alpha").expect("alpha joined").disk_full = true;
    w.change(|s| s.nodes.iter_mut().for_each(|n| n.rotate_key = n.role != Role::Hub));
    w.run(member::OFFER_RETRY * 2);
    let host = &w.hosts["alpha"];
    assert!(host.next_key_file.is_none() && !host.member.is_rotating(), "nothing saved, nothing offered");
    assert_eq!((host.interface_key.public_key(), &w.network.nodes[1].public_key), (old.clone(), &old));
    // Space is freed: the next retry goes through, with no restart and nothing asked again.
    w.hosts.get_mut("alpha").expect("alpha joined").disk_full = false;
    w.run(member::OFFER_RETRY + Duration::from_secs(2));
    assert_converged(&w, 5);
    assert_ne!(w.network.nodes[1].public_key, old);
}
