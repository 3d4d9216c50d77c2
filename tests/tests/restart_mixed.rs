//! Issue 8, point 1: a host restarted comes back to the same working mesh, whatever mix of peers it has.
//!
//! A hub with six devices (one of them a real phone) and three members: vps1 with an endpoint, the attic
//! behind NAT, and `ghost`, which joined but never ran. The hub is restarted with SIGTERM: the members
//! and the phone reach it again within seconds, and `wg` shows every peer with exactly its own fields
//! (before the fix, the members' peers carried a device's preshared key and never-seen devices a
//! member's endpoint, and the members never came back). Then vps1 is restarted, twice, the second time
//! seconds after its start: what it remembers of where peers are holds no other peer's endpoint, and
//! the attic behind NAT reaches it again at once.
use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use meshd_e2e::{
    MeshHost, Netns, Phone, meshctl, nat_router, product_bin, require_root, router, run_json, run_ok, unique_ifname,
    uplink, wait_until,
};
use serde_json::Value;

/// A mesh host of the test, with the `wg show IF dump` reader the checks below use.
type Host = MeshHost;

/// `wg show IF dump` of `host`: per peer, its (public key, preshared key, endpoint) as `wg` prints them.
fn dump(host: &Host) -> Vec<(String, String, String)> {
    let text = host.ns.run(&["wg", "show", &host.ifname, "dump"]);
    text.lines()
        .skip(1)
        .map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            (f[0].to_owned(), f[1].to_owned(), f[2].to_owned())
        })
        .collect()
}

/// `meshd join` that must succeed.
fn joined(host: &Host, token: &str, state: &Path, ifname: &str, endpoint: Option<&str>) {
    let out = host.join_as(token, state, ifname, endpoint);
    assert!(out.status.success(), "{} join: {}", host.name, String::from_utf8_lossy(&out.stderr));
}

fn key_of(list: &Value, name: &str) -> String {
    let item = list.as_array().unwrap().iter().find(|n| n["name"] == name).unwrap_or_else(|| panic!("{name}"));
    item["public_key"].as_str().unwrap().to_owned()
}

/// Every peer of the hub has exactly its own fields: nodes no preshared key, devices their own, and no
/// device that never connected holds an endpoint.
fn assert_hub_peers(hub: &Host, phone_key: &str) {
    let nodes = run_json(meshctl(&hub.state).args(["node", "list", "--json"]));
    let devices = run_json(meshctl(&hub.state).args(["device", "list", "--json"]));
    let dump = dump(hub);
    assert_eq!(dump.len(), 3 + 6, "{dump:?}");
    for (key, psk, endpoint) in &dump {
        let node = nodes.as_array().unwrap().iter().find(|n| n["public_key"] == key.as_str());
        if let Some(node) = node {
            assert_eq!(psk, "(none)", "node {} has a preshared key on the hub", node["name"]);
        } else {
            assert!(devices.as_array().unwrap().iter().any(|d| d["public_key"] == key.as_str()), "unknown peer {key}");
            assert_ne!(psk, "(none)", "device {key} lost its preshared key");
            if key != phone_key {
                assert_eq!(endpoint, "(none)", "device {key}, never connected, has an endpoint");
            }
        }
    }
    let psks: Vec<&String> = dump.iter().map(|(_, psk, _)| psk).filter(|p| *p != "(none)").collect();
    let unique: std::collections::BTreeSet<&&String> = psks.iter().collect();
    assert_eq!(unique.len(), psks.len(), "two peers share a preshared key");
}

#[test]
fn a_hub_with_devices_and_members_and_a_member_restarted_come_back_whole() {
    if !require_root() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let router = router("rrouter");
    let hub = Host::new("hub", root, "mr");
    let vps1 = Host::new("vps1", root, "mr");
    let attic = Host::new("attic", root, "mr");
    let phone_ns = Netns::new("rphone");

    for (i, ns) in [&hub.ns, &vps1.ns, &phone_ns].into_iter().enumerate() {
        uplink(&router, ns, &format!("172.31.24{i}"));
    }
    let (to_attic, _) = uplink(&router, &attic.ns, "192.168.79");
    nat_router(&router, &[("192.168.79.0/24", to_attic.as_str())]);

    // The hub: a wallet, five devices that never connect and a phone, all added before it runs.
    let mut init = Command::new(product_bin("meshd"));
    init.args(["init", "--network", "home", "--name", "hub", "--endpoint", "172.31.240.2:51820"]);
    run_ok(init.args(["--interface", &hub.ifname, "--state-dir"]).arg(&hub.state));
    run_ok(meshctl(&hub.state).args(["service", "add", "wallet", "--node", "hub", "--target", "127.0.0.1:9737"]));
    let _wallet = hub.ns.spawn_logged(
        &["python3", "-m", "http.server", "9737", "--bind", "127.0.0.1", "--directory", "/proc/self"],
        &root.join("wallet.log"),
    );
    for name in ["tablet", "laptop"] {
        run_ok(meshctl(&hub.state).args(["device", "add", name, "--allow", "wallet"]));
    }
    let conf = root.join("phone.conf");
    run_ok(meshctl(&hub.state).args(["device", "add", "phone", "--allow", "wallet", "--conf"]).arg(&conf));
    for name in ["tv", "watch", "car"] {
        run_ok(meshctl(&hub.state).args(["device", "add", name, "--allow", "wallet"]));
    }
    let mut hub_daemon = hub.run_hub(&root.join("hub.log"));

    let invite = |name: &str| run_ok(meshctl(&hub.state).args(["node", "invite", name])).trim().to_owned();
    joined(&vps1, &invite("vps1"), &vps1.state, &vps1.ifname, Some("172.31.241.2:51820"));
    joined(&attic, &invite("attic"), &attic.state, &attic.ifname, None);
    // Joined, never run: a peer that nobody ever sees.
    joined(&vps1, &invite("ghost"), &root.join("ghost"), &unique_ifname("mg"), None);
    let mut vps1_daemon = vps1.run_daemon(&root.join("vps1.log"));
    let _attic_daemon = attic.run_daemon(&root.join("attic.log"));

    let nodes = run_json(meshctl(&hub.state).args(["node", "list", "--json"]));
    let addr = |name: &str| {
        let n = nodes.as_array().unwrap().iter().find(|n| n["name"] == name).unwrap();
        n["address"].as_str().unwrap().to_owned()
    };
    let (hub_v4, vps1_v4) = (addr("hub"), addr("vps1"));
    let services = run_json(meshctl(&hub.state).args(["service", "list", "--json"]));
    let wallet_url = format!("http://{}/", services[0]["mesh_address"].as_str().unwrap());
    let _phone = Phone::up(&phone_ns, &unique_ifname("rp"), &fs::read_to_string(&conf).unwrap());
    let phone_reaches = || phone_ns.http_get_within(&wallet_url, Duration::from_millis(500)).is_some();

    assert!(wait_until(Duration::from_secs(15), || vps1.pings(&hub_v4)), "vps1 -> hub");
    assert!(wait_until(Duration::from_secs(15), || attic.pings(&hub_v4)), "attic -> hub");
    assert!(wait_until(Duration::from_secs(15), || attic.pings(&vps1_v4)), "attic -> vps1");
    assert!(wait_until(Duration::from_secs(15), phone_reaches), "the phone reaches the wallet");
    let devices = run_json(meshctl(&hub.state).args(["device", "list", "--json"]));
    let phone_key = key_of(&devices, "phone");
    assert_hub_peers(&hub, &phone_key);

    // The hub restarted once it has seen everyone (it saves where peers are every 2 s): everyone is back
    // within seconds, and every peer has its own fields.
    let hub_saved = hub.state.join("peer-endpoints.json");
    let seen_all = wait_until(Duration::from_secs(5), || {
        let text = fs::read_to_string(&hub_saved).unwrap_or_default();
        [key_of(&nodes, "vps1"), key_of(&nodes, "attic"), phone_key.clone()].iter().all(|k| text.contains(k.as_str()))
    });
    assert!(seen_all, "the hub did not save where vps1, the attic and the phone are");
    let status = hub_daemon.stop(Duration::from_secs(10));
    assert!(status.success(), "SIGTERM: {status:?}");
    let mut hub_daemon = hub.run_daemon(&root.join("hub-restarted.log"));
    let restarted = Instant::now();
    let mut missing = Vec::new();
    let back = wait_until(Duration::from_secs(10), || {
        hub_daemon.assert_running("restarting");
        missing = [("vps1", vps1.pings(&hub_v4)), ("attic", attic.pings(&hub_v4)), ("phone", phone_reaches())]
            .into_iter()
            .filter_map(|(name, ok)| (!ok).then_some(name))
            .collect();
        missing.is_empty()
    });
    assert!(back, "{missing:?} not back {:?} after the hub restarted", restarted.elapsed());
    eprintln!("hub restarted: members and phone back after {:?}", restarted.elapsed());
    assert_hub_peers(&hub, &phone_key);

    // vps1 remembers only where peers really were: the attic at the router's NAT address, the hub at
    // its endpoint, and no entry for ghost (never seen) or any other peer at someone else's address.
    let saved = vps1.state.join("peer-endpoints.json");
    let remembered = |text: &str| -> Vec<(String, String)> {
        let json: Value = serde_json::from_str(text).unwrap();
        json.as_object().unwrap().iter().map(|(k, v)| (k.clone(), v.as_str().unwrap().to_owned())).collect()
    };
    let check_saved = || {
        let entries = remembered(&fs::read_to_string(&saved).unwrap());
        let ghost = key_of(&nodes, "ghost");
        assert!(entries.iter().all(|(k, _)| *k != ghost), "ghost (never ran) remembered: {entries:?}");
        let attic_at = entries.iter().find(|(k, _)| *k == key_of(&nodes, "attic")).map(|(_, e)| e.clone());
        assert!(attic_at.as_deref().is_some_and(|e| e.starts_with("172.31.241.1:")), "attic at {attic_at:?}");
        let hub_at = entries.iter().find(|(k, _)| *k == key_of(&nodes, "hub")).map(|(_, e)| e.clone());
        assert_eq!(hub_at.as_deref(), Some("172.31.240.2:51820"), "{entries:?}");
    };
    assert!(wait_until(Duration::from_secs(12), || saved.exists()), "vps1 saved its peers' endpoints");
    check_saved();

    for (round, uptime) in [(1, Duration::ZERO), (2, Duration::from_secs(2))] {
        std::thread::sleep(uptime);
        let status = vps1_daemon.stop(Duration::from_secs(10));
        assert!(status.success(), "SIGTERM of vps1: {status:?}");
        vps1_daemon = vps1.run_daemon(&root.join(format!("vps1-{round}.log")));
        let restarted = Instant::now();
        let back = wait_until(Duration::from_secs(8), || {
            vps1_daemon.assert_running("restarting");
            attic.pings(&vps1_v4) && vps1.pings(&hub_v4)
        });
        assert!(back, "attic -> vps1 not back {:?} after restart {round}", restarted.elapsed());
        eprintln!("vps1 restart {round}: reached from behind NAT after {:?}", restarted.elapsed());
        check_saved();
    }
}
