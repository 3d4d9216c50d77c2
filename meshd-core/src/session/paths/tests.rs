//! The watch over paths, driven by readings of a modelled interface on a fake clock: names that move,
//! addresses that lead nowhere, peers that go away and come back; and seeded schedules of all of them.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;
use crate::fixtures::named_key;

/// How often the daemon reads the interface.
const READING: Duration = Duration::from_secs(2);

/// The mesh of these tests.
fn mesh() -> Vec<ipnet::IpNet> {
    vec!["10.77.0.0/16".parse().expect("a net"), "fd00:1:2::/64".parse().expect("a net")]
}

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("a socket address")
}

fn plan(name: &str, endpoint: Option<&str>, path: PathRole) -> PeerPlan {
    PeerPlan {
        name: name.parse().expect("a name"),
        preshared_key: None,
        endpoint: endpoint.map(|e| e.parse().expect("an endpoint")),
        allowed_ips: vec!["10.77.0.9/32".parse().expect("a net")],
        persistent_keepalive: Some(NODE_KEEPALIVE_SECS),
        path,
    }
}

/// One peer as the modelled interface and the world around it have it.
#[derive(Debug)]
struct Peer {
    /// What its name resolves to now.
    records: Vec<SocketAddr>,
    /// Where it answers now.
    answers: BTreeSet<SocketAddr>,
    /// Where the interface sends to it.
    endpoint: Option<SocketAddr>,
    routes: bool,
    rx_bytes: u64,
    /// Its own keepalive phase: it sends every 25 s from here while the path works.
    phase: Duration,
    /// The interface was reset and will handshake at once if the path works.
    fresh: bool,
}

/// A host's interface and its peers over time, read every [`READING`] into a [`Paths`].
struct World {
    start: Instant,
    now: Instant,
    paths: Paths,
    peers: BTreeMap<PublicKey, Peer>,
    plans: BTreeMap<PublicKey, PeerPlan>,
    resets: usize,
}

impl World {
    fn new(plans: Vec<(PublicKey, PeerPlan, Vec<SocketAddr>)>) -> World {
        let start = Instant::now();
        let mut peers = BTreeMap::new();
        let mut by_key = BTreeMap::new();
        for (i, (key, plan, records)) in plans.into_iter().enumerate() {
            let first = plan
                .endpoint
                .as_ref()
                .and_then(|e| e.ip().map(|ip| SocketAddr::new(ip, e.port())).or_else(|| records.first().copied()));
            let answers = records.iter().copied().collect();
            peers.insert(
                key.clone(),
                Peer {
                    records,
                    answers,
                    endpoint: first,
                    routes: true,
                    rx_bytes: 0,
                    phase: Duration::from_secs(3 + 7 * i as u64 % 20),
                    fresh: true,
                },
            );
            by_key.insert(key, plan);
        }
        let mut paths = Paths::new(mesh());
        paths.set_peers(&by_key, start);
        World { start, now: start, paths, peers, plans: by_key, resets: 0 }
    }

    fn peer(&self, key: &PublicKey) -> &Peer {
        &self.peers[key]
    }

    fn peer_mut(&mut self, key: &PublicKey) -> &mut Peer {
        self.peers.get_mut(key).expect("a peer of the world")
    }

    /// Run for `span`, one reading every [`READING`], carrying out every effect at once.
    fn run(&mut self, span: Duration) {
        let end = self.now + span;
        while self.now < end {
            self.now += READING;
            let elapsed = self.now - self.start;
            for peer in self.peers.values_mut() {
                let works = peer.endpoint.is_some_and(|e| peer.answers.contains(&e));
                let keepalive = (elapsed + Duration::from_secs(25) - peer.phase).as_secs() % 25 < READING.as_secs();
                if works && (keepalive || std::mem::take(&mut peer.fresh)) {
                    peer.rx_bytes += 32;
                }
            }
            let readings = self
                .peers
                .iter()
                .map(|(k, p)| (k.clone(), Reading { rx_bytes: p.rx_bytes, last_handshake: None, endpoint: p.endpoint }))
                .collect();
            self.paths.handle_readings(&readings, self.now);
            self.carry_out();
        }
    }

    fn carry_out(&mut self) {
        while let Some(effect) = self.paths.poll_effect() {
            match effect {
                Effect::Resolve { key, endpoint } => {
                    let addrs: Vec<SocketAddr> = self.peers[&key].records.clone();
                    assert!(addrs.iter().all(|a| a.port() == endpoint.port()));
                    let resolved = Ok(Resolved { addrs, ttl: Duration::from_secs(60) });
                    self.paths.handle_resolved(&key, resolved, self.now);
                }
                Effect::Reset { key, endpoint, routes } => {
                    self.resets += 1;
                    assert!(
                        routes || self.plans[&key].path == PathRole::Fallback,
                        "only a fallback peer loses its routes: {:?}",
                        self.plans[&key]
                    );
                    let peer = self.peer_mut(&key);
                    peer.rx_bytes = 0;
                    peer.routes = routes;
                    peer.fresh = true;
                    if let Some(endpoint) = endpoint {
                        peer.endpoint = Some(endpoint);
                    }
                }
            }
        }
    }

    /// The peer answers at its in-use endpoint and has its routes.
    fn settled(&self, key: &PublicKey) -> bool {
        let peer = self.peer(key);
        peer.routes
            && peer.endpoint.is_some_and(|e| peer.answers.contains(&e))
            && self.paths.heard_recently(key, self.now)
    }
}

impl Paths {
    fn heard_recently(&self, key: &PublicKey, now: Instant) -> bool {
        self.paths.get(key).is_some_and(|p| p.alive(now))
    }

    /// Whether the routes of `key` are taken away for now.
    fn is_routed_around(&self, key: &PublicKey) -> bool {
        self.paths.get(key).is_some_and(|p| p.withdrawn)
    }
}

/// Run until `done` holds (checked at each reading), at most `limit`; how long it took.
fn until(world: &mut World, limit: Duration, done: impl Fn(&World) -> bool) -> Option<Duration> {
    let start = world.now;
    while world.now - start <= limit {
        if done(world) {
            return Some(world.now - start);
        }
        world.run(READING);
    }
    None
}

#[test]
fn a_name_that_moves_is_followed_and_the_peer_routed_through_the_hub_meanwhile() {
    let vps = named_key("VPS");
    let mut world = World::new(vec![(
        vps.clone(),
        plan("vps", Some("vps.dyn.example:51820"), PathRole::Fallback),
        vec![addr("198.51.100.7:51820")],
    )]);
    world.run(Duration::from_secs(60));
    assert!(world.settled(&vps), "a working path stays as it is: {:?}", world.peer(&vps));
    let resets = world.resets;
    assert_eq!(resets, 0, "nothing to renew on a working path");

    // The ISP gives the VPS a new address; its DDNS name follows at once.
    let peer = world.peer_mut(&vps);
    peer.records = vec![addr("203.0.113.44:51820")];
    peer.answers = peer.records.iter().copied().collect();
    let routed_around = until(&mut world, Duration::from_secs(60), |w| !w.peer(&vps).routes).expect("routed around");
    assert!(routed_around <= SILENT_AFTER + READING * 2, "routed through the hub after {routed_around:?}");
    let back = until(&mut world, Duration::from_secs(60), |w| w.settled(&vps)).expect("back on the new address");
    assert!(routed_around + back <= Duration::from_secs(75), "direct again after {:?}", routed_around + back);
    assert_eq!(world.peer(&vps).endpoint, Some(addr("203.0.113.44:51820")));
    world.run(Duration::from_secs(120));
    assert!(world.settled(&vps), "and stays there");
}

#[test]
fn every_address_of_a_name_is_tried_until_one_answers() {
    let hub = named_key("HUB");
    let (v6, v4) = (addr("[2001:db8::1]:51820"), addr("192.0.2.1:51820"));
    let mut world =
        World::new(vec![(hub.clone(), plan("hub", Some("hub.example:51820"), PathRole::LastResort), vec![v6, v4])]);
    // The home router drops inbound IPv6 UDP: only the IPv4 address answers.
    world.peer_mut(&hub).answers = BTreeSet::from([v4]);
    let took = until(&mut world, Duration::from_secs(60), |w| w.settled(&hub)).expect("a tunnel over IPv4");
    assert!(took <= ADDRESS_WAIT + READING * 2, "took {took:?}");
    assert_eq!(world.peer(&hub).endpoint, Some(v4));
    world.run(Duration::from_secs(300));
    assert!(world.settled(&hub));
    assert_eq!(world.peer(&hub).endpoint, Some(v4), "an address that answers is kept");
}

#[test]
fn a_dead_relay_is_routed_around_and_used_again_when_it_is_back() {
    let relay = named_key("RELAY");
    let there = addr("198.51.100.9:51820");
    let mut world =
        World::new(vec![(relay.clone(), plan("relay", Some("198.51.100.9:51820"), PathRole::Fallback), vec![there])]);
    world.run(Duration::from_secs(40));
    assert!(world.settled(&relay));
    world.peer_mut(&relay).answers.clear();
    let routed_around = until(&mut world, Duration::from_secs(90), |w| !w.peer(&relay).routes).expect("routed around");
    assert!(routed_around <= SILENT_AFTER + READING * 2, "after {routed_around:?}");
    assert!(world.paths.is_routed_around(&relay));
    // While it stays away, retries back off: a handful over ten minutes, not one per reading.
    let before = world.resets;
    world.run(Duration::from_secs(600));
    let retries = world.resets - before;
    assert!((3..=8).contains(&retries), "{retries} retries in 10 minutes");
    assert!(!world.peer(&relay).routes);

    world.peer_mut(&relay).answers.insert(there);
    let back = until(&mut world, RETRY_MAX + Duration::from_secs(30), |w| w.settled(&relay)).expect("used again");
    assert!(back <= RETRY_MAX + Duration::from_secs(NODE_KEEPALIVE_SECS.into()), "after {back:?}");
    assert!(!world.paths.is_routed_around(&relay));
}

#[test]
fn a_silent_hub_is_renewed_but_never_routed_around() {
    let hub = named_key("HUB");
    let at = addr("192.0.2.1:51820");
    let mut world =
        World::new(vec![(hub.clone(), plan("hub", Some("192.0.2.1:51820"), PathRole::LastResort), vec![at])]);
    world.run(Duration::from_secs(30));
    world.peer_mut(&hub).answers.clear();
    let renewed = until(&mut world, Duration::from_secs(90), |w| w.resets > 0).expect("renewed");
    assert!(renewed <= SILENT_AFTER + READING * 2, "renewed after {renewed:?}");
    assert!(world.peer(&hub).routes, "the hub keeps its routes: there is nothing to fall back to");
    world.peer_mut(&hub).answers.insert(at);
    assert!(until(&mut world, RETRY_MAX, |w| w.settled(&hub)).is_some());
}

#[test]
fn a_peer_behind_nat_is_watched_without_an_endpoint_and_devices_are_not_watched() {
    let (attic, phone) = (named_key("ATTIC"), named_key("PHONE"));
    let mut plans = BTreeMap::new();
    plans.insert(attic.clone(), plan("attic", None, PathRole::LastResort));
    plans.insert(phone.clone(), plan("phone", None, PathRole::Device));
    let start = Instant::now();
    let mut paths = Paths::new(mesh());
    paths.set_peers(&plans, start);
    let reading = |rx| Reading { rx_bytes: rx, last_handshake: None, endpoint: Some(addr("192.0.2.50:40000")) };
    let readings = BTreeMap::from([(attic.clone(), reading(0)), (phone.clone(), reading(0))]);
    paths.handle_readings(&readings, start + SILENT_AFTER);
    assert_eq!(paths.poll_effect(), Some(Effect::Reset { key: attic.clone(), endpoint: None, routes: true }));
    assert_eq!(paths.poll_effect(), None, "no resolution without a name, nothing for the phone");
    assert_eq!(paths.heard().count(), 0);
    let readings = BTreeMap::from([(attic.clone(), reading(64)), (phone.clone(), reading(64))]);
    paths.handle_readings(&readings, start + SILENT_AFTER + READING);
    assert_eq!(paths.heard().map(|(k, _)| k.clone()).collect::<Vec<_>>(), [attic]);
}

#[test]
fn a_changed_plan_gives_a_routed_around_peer_its_routes_back() {
    let vps = named_key("VPS");
    let mut plans = BTreeMap::from([(vps.clone(), plan("vps", Some("198.51.100.7:51820"), PathRole::Fallback))]);
    let start = Instant::now();
    let mut paths = Paths::new(mesh());
    paths.set_peers(&plans, start);
    let silent = BTreeMap::from([(vps.clone(), Reading::default())]);
    paths.handle_readings(&silent, start + SILENT_AFTER);
    assert_eq!(paths.poll_effect(), Some(Effect::Reset { key: vps.clone(), endpoint: None, routes: false }));
    plans.get_mut(&vps).expect("vps").endpoint = Some("198.51.100.8:51820".parse().expect("an endpoint"));
    paths.set_peers(&plans, start + SILENT_AFTER + READING);
    assert_eq!(paths.poll_effect(), Some(Effect::Reset { key: vps.clone(), endpoint: None, routes: true }));
    assert!(!paths.is_routed_around(&vps), "watched afresh from the new endpoint");
    plans.clear();
    paths.set_peers(&plans, start + SILENT_AFTER * 2);
    assert_eq!(paths.heard().count(), 0);
    assert!(!paths.is_routed_around(&vps));
}

#[test]
fn a_failed_resolution_is_retried_and_the_ttl_is_respected() {
    let hub = named_key("HUB");
    let plans = BTreeMap::from([(hub.clone(), plan("hub", Some("hub.example:51820"), PathRole::LastResort))]);
    let start = Instant::now();
    let mut paths = Paths::new(mesh());
    paths.set_peers(&plans, start);
    let alive = |rx| BTreeMap::from([(hub.clone(), Reading { rx_bytes: rx, ..Reading::default() })]);
    paths.handle_readings(&alive(10), start);
    let resolve = Effect::Resolve { key: hub.clone(), endpoint: "hub.example:51820".parse().expect("an endpoint") };
    assert_eq!(paths.poll_effect(), Some(resolve.clone()), "a name is resolved at once");
    paths.handle_resolved(&hub, Err("no answer".into()), start);
    paths.handle_readings(&alive(20), start + RETRY_MIN - Duration::from_secs(1));
    assert_eq!(paths.poll_effect(), None);
    paths.handle_readings(&alive(30), start + RETRY_MIN);
    assert_eq!(paths.poll_effect(), Some(resolve.clone()), "retried");
    let resolved = Resolved { addrs: vec![addr("192.0.2.1:51820")], ttl: Duration::from_secs(120) };
    paths.handle_resolved(&hub, Ok(resolved), start + RETRY_MIN);
    assert_eq!(paths.poll_effect(), None, "the peer answers: nothing to change");
    paths.handle_readings(&alive(40), start + RETRY_MIN + Duration::from_secs(119));
    assert_eq!(paths.poll_effect(), None, "the records hold for their TTL");
    paths.handle_readings(&alive(50), start + RETRY_MIN + Duration::from_secs(120));
    assert_eq!(paths.poll_effect(), Some(resolve), "and are looked up again when it ends");
}

/// Seeded schedules: a host with the hub (a name with two addresses), a relay and a direct peer on a
/// name; paths fail and come back, names move, at random. Whatever happened, once the world holds still
/// with every peer answering somewhere its name leads, every peer is reached there, with its routes,
/// within a retry and a keepalive; and only fallback peers ever lose their routes (checked at each
/// effect).
#[test]
fn seeded_schedules_always_settle() {
    for seed in 0..40u64 {
        let mut rng = StdRng::seed_from_u64(seed);
        let (hub, relay, vps) = (named_key("HUB"), named_key("RELAY"), named_key("VPS"));
        let hub_addrs = vec![addr("[2001:db8::1]:51820"), addr("192.0.2.1:51820")];
        let mut world = World::new(vec![
            (hub.clone(), plan("hub", Some("hub.example:51820"), PathRole::LastResort), hub_addrs),
            (
                relay.clone(),
                plan("relay", Some("198.51.100.9:51820"), PathRole::Fallback),
                vec![addr("198.51.100.9:51820")],
            ),
            (
                vps.clone(),
                plan("vps", Some("vps.dyn.example:51820"), PathRole::Fallback),
                vec![addr("203.0.113.1:51820")],
            ),
        ]);
        for step in 0..12 {
            let keys = [&hub, &relay, &vps];
            let key = keys[rng.random_range(0..keys.len())].clone();
            let peer = world.peer_mut(&key);
            match rng.random_range(0..4) {
                // The path fails.
                0 => peer.answers.clear(),
                // It comes back where the name leads.
                1 => peer.answers = peer.records.iter().copied().collect(),
                // The name moves (the relay's endpoint is an address: it only fails or comes back).
                2 if key != relay => {
                    let to = addr(&format!("203.0.113.{}:51820", 100 + (seed * 12 + step) % 150));
                    peer.records = vec![to];
                    peer.answers = BTreeSet::from([to]);
                }
                // Only one of the addresses answers.
                _ => {
                    let one = peer.records[rng.random_range(0..peer.records.len())];
                    peer.answers = BTreeSet::from([one]);
                }
            }
            world.run(Duration::from_secs(rng.random_range(2..240)));
        }
        for peer in world.peers.values_mut() {
            if peer.answers.is_empty() {
                peer.answers = peer.records.iter().copied().collect();
            }
        }
        let limit = RETRY_MAX + SILENT_AFTER + ADDRESS_WAIT * 2;
        let took = until(&mut world, limit, |w| [&hub, &relay, &vps].iter().all(|k| w.settled(k)));
        assert!(took.is_some(), "seed {seed}: not settled after {limit:?}: {:?}", world.peers);
    }
}

#[test]
fn an_answer_no_peer_can_be_at_is_dropped_and_the_last_confirmed_address_kept() {
    let hub = named_key("HUB");
    let there = addr("192.0.2.1:51820");
    let plans = BTreeMap::from([(hub.clone(), plan("hub", Some("hub.example:51820"), PathRole::LastResort))]);
    let start = Instant::now();
    let mut paths = Paths::new(mesh());
    paths.set_peers(&plans, start);
    let reading =
        |rx| BTreeMap::from([(hub.clone(), Reading { rx_bytes: rx, last_handshake: None, endpoint: Some(there) })]);
    paths.handle_readings(&reading(64), start);
    assert!(matches!(paths.poll_effect(), Some(Effect::Resolve { .. })));
    // A spoofed answer during an outage: the mesh's own addresses, loopback, and an attacker's address.
    let spoofed =
        ["10.77.0.1:51820", "[fd00:1:2::1]:51820", "127.0.0.1:51820", "[::ffff:127.0.0.1]:51820", "198.18.0.77:51820"];
    let answer = Resolved { addrs: spoofed.iter().map(|a| addr(a)).collect(), ttl: Duration::from_secs(3600) };
    let silent = start + SILENT_AFTER;
    paths.handle_readings(&reading(64), silent);
    while paths.poll_effect().is_some() {}
    paths.handle_resolved(&hub, Ok(answer), silent);
    assert_eq!(
        paths.poll_effect(),
        Some(Effect::Reset { key: hub.clone(), endpoint: Some(addr("198.18.0.77:51820")), routes: true }),
        "the one usable answer is tried"
    );
    // It does not answer there: the address it was last heard at comes next, within one wait.
    let moved = BTreeMap::from([(
        hub.clone(),
        Reading { rx_bytes: 0, last_handshake: None, endpoint: Some(addr("198.18.0.77:51820")) },
    )]);
    paths.handle_readings(&moved, silent + ADDRESS_WAIT);
    assert_eq!(paths.poll_effect(), Some(Effect::Reset { key: hub.clone(), endpoint: Some(there), routes: true }));
}
