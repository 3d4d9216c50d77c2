//! Every peer meshd configures on the embedded (userspace) WireGuard device reads back, field by field,
//! as planned: devices with their own preshared keys, nodes without, with and without endpoints, in
//! whatever order their keys sort. boringtun's UAPI `set` carries one peer's endpoint, preshared key and
//! keepalive over to the next peer of the same message; this is the regression test for the workaround.
//!
//! The interface is created in a namespace of the test's own: the test thread enters it (`setns`), so
//! the TUN device, boringtun's threads and the `ip` commands all live there.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;

use meshd::controller::fixtures::{invite, join_request, label, new_network};
use meshd::host::wg::{Backend, Interface};
use meshd_core::keys::{PrivateKey, PublicKey};
use meshd_core::plan::{self, HostPlan};
use meshd_core::reconcile::{PeerDiff, PeerEndpoints};
use meshd_core::wire::admin::{Reply, Request};
use meshd_e2e::{Netns, require_root, unique_ifname};

/// One peer as `wg show IF dump` prints it.
#[derive(Debug, PartialEq, Eq)]
struct Dumped {
    preshared_key: Option<String>,
    endpoint: Option<String>,
    allowed_ips: BTreeSet<String>,
    keepalive: Option<u16>,
}

/// `wg show IF dump`, read by Debian's `wg` (not by the library meshd configures it with).
fn dump(ns: &Netns, ifname: &str) -> BTreeMap<String, Dumped> {
    let text = ns.run(&["wg", "show", ifname, "dump"]);
    let none = |s: &str| (s != "(none)" && s != "off").then(|| s.to_owned());
    text.lines()
        .skip(1) // the interface's own line
        .map(|line| {
            let f: Vec<&str> = line.split('\t').collect();
            assert_eq!(f.len(), 8, "unexpected dump line {line:?}");
            let allowed_ips =
                if f[3] == "(none)" { BTreeSet::new() } else { f[3].split(',').map(str::to_owned).collect() };
            let peer = Dumped {
                preshared_key: none(f[1]),
                endpoint: none(f[2]),
                allowed_ips,
                keepalive: none(f[7]).map(|k| k.parse().unwrap()),
            };
            (f[0].to_owned(), peer)
        })
        .collect()
}

/// What `wg` should show for `plan`, given where peers without an endpoint were last seen.
fn expected(plan: &HostPlan, last_seen: &PeerEndpoints) -> BTreeMap<String, Dumped> {
    plan.peers
        .iter()
        .map(|(key, p)| {
            let endpoint =
                p.endpoint.as_ref().map(ToString::to_string).or_else(|| last_seen.get(key).map(|e| e.to_string()));
            let peer = Dumped {
                preshared_key: p.preshared_key.as_ref().map(|k| k.as_str().to_owned()),
                endpoint,
                allowed_ips: p.allowed_ips.iter().map(ToString::to_string).collect(),
                keepalive: p.persistent_keepalive,
            };
            (key.to_string(), peer)
        })
        .collect()
}

/// A hub with three devices (each its own preshared key) and four nodes: two with endpoints of their
/// own, two behind NAT (no endpoint), one of which was seen before.
fn mixed_network(dir: &Path) -> (HostPlan, PeerEndpoints) {
    let mut c = new_network(dir, "10.77.0.0/16");
    c.handle(Request::ServiceAdd {
        name: label("wallet"),
        node: label("hub"),
        target: "127.0.0.1:9737".parse().unwrap(),
        port: None,
        protocol: Default::default(),
    })
    .unwrap();
    for (i, name) in ["vps1", "phone", "attic", "tablet", "vps2", "laptop", "cellar"].iter().enumerate() {
        if ["phone", "tablet", "laptop"].contains(name) {
            let reply = c
                .handle(Request::DeviceAdd {
                    name: label(name),
                    allow: vec![label("wallet")],
                    public_key: PrivateKey::generate().public_key(),
                    expect: None,
                })
                .unwrap();
            assert!(matches!(reply, Reply::DeviceHandout(_)));
        } else {
            let mut join = join_request(&invite(&mut c, name, 600));
            join.endpoint = name.starts_with("vps").then(|| format!("198.51.100.{}:51820", 10 + i).parse().unwrap());
            c.redeem(&join).unwrap();
        }
    }
    let snapshot = c.snapshot().unwrap();
    let mut plan = plan::plan_host(&snapshot, "hub").unwrap();
    plan.interface = unique_ifname("mp");
    let attic = snapshot.nodes.iter().find(|n| n.name.to_string() == "attic").unwrap();
    let last_seen = PeerEndpoints::from([(attic.public_key.clone(), "192.0.2.44:40404".parse().unwrap())]);
    (plan, last_seen)
}

/// Runs `f` on a thread that has entered `ns`.
fn in_namespace<T: Send>(ns: &Netns, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let file = File::open(Path::new("/var/run/netns").join(ns.name())).unwrap();
                // SAFETY: setns(2) on a namespace file we hold open; it changes only this thread.
                let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
                f()
            })
            .join()
            .unwrap()
    })
}

#[test]
fn every_peer_of_a_mixed_set_reads_back_with_exactly_its_own_fields() {
    if !require_root() {
        return;
    }
    let ns = Netns::new("peers");
    let dir = tempfile::tempdir().unwrap();
    let (plan, last_seen) = mixed_network(dir.path());
    assert_eq!(plan.peers.len(), 7);
    assert_eq!(plan.peers.values().filter(|p| p.preshared_key.is_some()).count(), 3);
    assert_eq!(plan.peers.values().filter(|p| p.endpoint.is_some()).count(), 2);
    let want = expected(&plan, &last_seen);

    in_namespace(&ns, || {
        let interface = Interface::create(Backend::Userspace, &plan, &PrivateKey::generate(), &last_seen).unwrap();
        assert_eq!(dump(&ns, &plan.interface), want, "after start");

        // The same peers taken away and given back through a diff, in reverse key order, with one of
        // each kind replaced: the paths reconcile and rotations take.
        let keys: Vec<PublicKey> = plan.peers.keys().cloned().collect();
        let remove = PeerDiff { add: Vec::new(), update: Vec::new(), remove: keys.clone() };
        interface.apply_peers(&remove).unwrap();
        assert!(dump(&ns, &plan.interface).is_empty());
        let add = PeerDiff {
            add: plan.peers.iter().rev().map(|(k, p)| (k.clone(), p.clone())).collect(),
            update: Vec::new(),
            remove: Vec::new(),
        };
        interface.apply_peers(&add).unwrap();
        // Removed peers are remembered where they were: attic comes back at its last-seen endpoint.
        assert_eq!(dump(&ns, &plan.interface), want, "after re-adding in reverse order");
        let update = PeerDiff {
            add: Vec::new(),
            update: plan.peers.iter().rev().map(|(k, p)| (k.clone(), p.clone())).collect(),
            remove: Vec::new(),
        };
        interface.apply_peers(&update).unwrap();
        assert_eq!(dump(&ns, &plan.interface), want, "after replacing every peer");
        drop(interface);
    });
    let links = ns.ip(&["link", "show"]);
    assert!(!links.contains(&plan.interface), "interface left behind: {links}");
}
