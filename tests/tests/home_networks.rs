//! Issue 10: the mesh heals itself on the networks people have at home, over namespaces that stand for
//! them (`../shared/TESTBED.md`, "Real home networks in namespaces"):
//! - the hub on a dynamic IP behind a DDNS name (the name stands as each namespace's hosts file, rewritten
//!   when the hub's address moves), with a member behind NAT;
//! - a public member on a DDNS name that moves, talking directly to a member behind NAT;
//! - a relay whose uplink goes down between two members behind NAT;
//! - a member whose clock ran ahead, corrected and restarted;
//! - a dual-stack hub whose router drops inbound IPv6 UDP.
//!
//! Recovery times are printed (`--nocapture`) and recorded in docs/PERFORMANCE.md.

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use meshd_e2e::{
    MeshHost, Netns, Proc, meshctl, nat_router, product_bin, require_root, router, run_json, run_ok, uplink, wait_until,
};
use serde_json::Value;

/// "Back within about a minute": the limit every recovery here is held to.
const RECOVERY: Duration = Duration::from_secs(75);

/// The internet: a router namespace that forwards both families.
fn internet() -> Netns {
    let internet = router("inet");
    internet.run(&["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"]);
    internet
}

/// The namespace's hosts file: how its programs resolve the dynamic names of this test.
fn set_hosts(ns: &Netns, text: &str) {
    fs::create_dir_all(ns.etc_dir()).unwrap();
    fs::write(ns.etc_dir().join("hosts"), format!("127.0.0.1 localhost\n{text}")).unwrap();
}

/// `meshd init` on the hub with `endpoint`; its daemon, ready.
fn start_hub(hub: &MeshHost, endpoint: &str, root: &Path) -> Proc {
    hub.init_hub(endpoint, &[]);
    hub.run_hub(&root.join("hub.log"))
}

/// Join `host` (with `endpoint`, or behind NAT) and start its daemon.
fn join(hub: &MeshHost, host: &MeshHost, endpoint: Option<&str>, role: Option<&str>, root: &Path) -> Proc {
    let mut invite = meshctl(&hub.state);
    invite.args(["node", "invite", host.name, "--expires", "10m"]);
    if let Some(role) = role {
        invite.args(["--role", role]);
    }
    let token = run_ok(&mut invite).trim().to_owned();
    let out = host.join(&token, &host.state, endpoint);
    assert!(out.status.success(), "{} joins: {}", host.name, String::from_utf8_lossy(&out.stderr));
    host.run_daemon(&root.join(format!("{}.log", host.name)))
}

fn nodes(hub: &MeshHost) -> Value {
    run_json(meshctl(&hub.state).args(["node", "list", "--json"]))
}

/// A node's mesh IPv4 address.
fn address(hub: &MeshHost, name: &str) -> String {
    let nodes = nodes(hub);
    let node = nodes.as_array().unwrap().iter().find(|n| n["name"] == name).unwrap();
    node["address"].as_str().unwrap().to_owned()
}

/// How long until `from` pings `to`, if within `limit`.
fn pings_within(from: &MeshHost, to: &str, limit: Duration) -> Option<Duration> {
    let start = Instant::now();
    wait_until(limit, || from.pings(to)).then(|| start.elapsed())
}

/// The peer line of `key` in `wg show IF dump` on `host`: endpoint and allowed IPs.
fn wg_peer(host: &MeshHost, key: &str) -> Option<(String, String)> {
    let dump = host.ns.run(&["wg", "show", &host.ifname, "dump"]);
    dump.lines()
        .skip(1)
        .map(|l| l.split('\t').collect::<Vec<_>>())
        .find(|f| f[0] == key)
        .map(|f| (f[2].into(), f[3].into()))
}

fn public_key(hub: &MeshHost, name: &str) -> String {
    let nodes = nodes(hub);
    let node = nodes.as_array().unwrap().iter().find(|n| n["name"] == name).unwrap();
    node["public_key"].as_str().unwrap().to_owned()
}

/// Move `host`'s public address on `dev` from `.2` to `.3` of `172.31.<net>.0/24`.
fn move_address(host: &MeshHost, dev: &str, net: u8) {
    host.ns.ip(&["addr", "del", &format!("172.31.{net}.2/24"), "dev", dev]);
    host.ns.ip(&["addr", "add", &format!("172.31.{net}.3/24"), "dev", dev]);
    host.ns.ip(&["route", "replace", "default", "via", &format!("172.31.{net}.1")]);
}

#[test]
fn a_hub_on_a_dynamic_ip_is_followed_by_its_name() {
    if !require_root() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let router = internet();
    let hub = MeshHost::new("hub", root, "hn");
    let attic = MeshHost::new("attic", root, "hn");
    let (_, hub_if) = uplink(&router, &hub.ns, "172.31.60");
    let (attic_lan, _) = uplink(&router, &attic.ns, "192.168.60");
    nat_router(&router, &[("192.168.60.0/24", &attic_lan)]);
    set_hosts(&attic.ns, "172.31.60.2 hub.dyn.test\n");

    let _hub_daemon = start_hub(&hub, "hub.dyn.test:51820", root);
    let mut attic_daemon = join(&hub, &attic, None, None, root);
    let hub_ip = address(&hub, "hub");
    assert!(pings_within(&attic, &hub_ip, Duration::from_secs(30)).is_some(), "the attic reaches the hub");

    // The ISP gives the hub a new address; its DDNS name follows at once.
    move_address(&hub, &hub_if, 60);
    set_hosts(&attic.ns, "172.31.60.3 hub.dyn.test\n");
    let moved = Instant::now();
    let back = pings_within(&attic, &hub_ip, RECOVERY);
    attic_daemon.assert_running("following the hub's name");
    let back = back.unwrap_or_else(|| panic!("the attic lost the hub for good:\n{}", attic_daemon.log_text()));
    eprintln!("hub moved: the attic reaches it again after {:.1} s", back.as_secs_f64());
    let hub_key = public_key(&hub, "hub");
    let (endpoint, _) = wg_peer(&attic, &hub_key).unwrap();
    assert_eq!(endpoint, "172.31.60.3:51820", "the attic sends to the hub's new address");
    // The sync session is back too: a change reaches the attic.
    run_ok(meshctl(&hub.state).args(["service", "add", "beacon", "--node", "attic", "--target", "127.0.0.1:5052"]));
    let synced = wait_until(RECOVERY.saturating_sub(moved.elapsed()).max(Duration::from_secs(20)), || {
        fs::read_to_string(attic.state.join("member.json")).is_ok_and(|s| s.contains("beacon"))
    });
    assert!(synced, "the attic's sync session did not come back:\n{}", attic_daemon.log_text());
}

#[test]
fn a_member_on_a_ddns_name_is_followed_and_reached_through_the_hub_meanwhile() {
    if !require_root() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let router = internet();
    let hub = MeshHost::new("hub", root, "hd");
    let vps = MeshHost::new("vps", root, "hd");
    let attic = MeshHost::new("attic", root, "hd");
    uplink(&router, &hub.ns, "172.31.61");
    let (_, vps_if) = uplink(&router, &vps.ns, "172.31.62");
    let (attic_lan, _) = uplink(&router, &attic.ns, "192.168.61");
    nat_router(&router, &[("192.168.61.0/24", &attic_lan)]);
    for host in [&hub, &vps, &attic] {
        set_hosts(&host.ns, "172.31.62.2 vps.dyn.test\n");
    }

    let _hub_daemon = start_hub(&hub, "172.31.61.2:51820", root);
    let _vps_daemon = join(&hub, &vps, Some("vps.dyn.test:51820"), None, root);
    let mut attic_daemon = join(&hub, &attic, None, None, root);
    let vps_ip = address(&hub, "vps");
    let vps_key = public_key(&hub, "vps");
    assert!(pings_within(&attic, &vps_ip, Duration::from_secs(30)).is_some(), "the attic reaches the vps");
    let (endpoint, _) = wg_peer(&attic, &vps_key).unwrap();
    assert_eq!(endpoint, "172.31.62.2:51820", "directly");

    move_address(&vps, &vps_if, 62);
    for host in [&hub, &vps, &attic] {
        set_hosts(&host.ns, "172.31.62.3 vps.dyn.test\n");
    }
    let back = pings_within(&attic, &vps_ip, RECOVERY);
    let back = back.unwrap_or_else(|| panic!("the attic lost the vps:\n{}", attic_daemon.log_text()));
    eprintln!("vps moved: the attic reaches it again after {:.1} s", back.as_secs_f64());
    let moved = Instant::now() - back;
    let direct = wait_until(Duration::from_secs(60), || {
        wg_peer(&attic, &vps_key).is_some_and(|(e, ips)| e == "172.31.62.3:51820" && ips.contains(&vps_ip))
    });
    eprintln!("vps moved: the attic talks to it directly again after {:.1} s", moved.elapsed().as_secs_f64());
    attic_daemon.assert_running("following the vps's name");
    assert!(direct, "not direct again: {:?}\n{}", wg_peer(&attic, &vps_key), attic_daemon.log_text());
    assert!(pings_within(&attic, &vps_ip, Duration::from_secs(10)).is_some(), "directly");
}

#[test]
fn a_relay_that_dies_is_routed_around_and_shows_in_node_list() {
    if !require_root() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let router = internet();
    let hub = MeshHost::new("hub", root, "hr");
    let relay = MeshHost::new("relay", root, "hr");
    let attic = MeshHost::new("attic", root, "hr");
    let cellar = MeshHost::new("cellar", root, "hr");
    uplink(&router, &hub.ns, "172.31.63");
    let (_, relay_if) = uplink(&router, &relay.ns, "172.31.64");
    let (attic_lan, _) = uplink(&router, &attic.ns, "192.168.63");
    let (cellar_lan, _) = uplink(&router, &cellar.ns, "192.168.64");
    nat_router(&router, &[("192.168.63.0/24", &attic_lan), ("192.168.64.0/24", &cellar_lan)]);

    let _hub_daemon = start_hub(&hub, "172.31.63.2:51820", root);
    let _relay_daemon = join(&hub, &relay, Some("172.31.64.2:51820"), Some("relay"), root);
    let attic_daemon = join(&hub, &attic, None, None, root);
    let _cellar_daemon = join(&hub, &cellar, None, None, root);
    let cellar_ip = address(&hub, "cellar");
    let relay_key = public_key(&hub, "relay");
    assert!(pings_within(&attic, &cellar_ip, Duration::from_secs(30)).is_some(), "attic and cellar meet");
    let (_, through_relay) = wg_peer(&attic, &relay_key).unwrap();
    assert!(through_relay.contains(&cellar_ip), "through the relay: {through_relay}");

    // The relay's VPS loses its uplink.
    relay.ns.ip(&["link", "set", &relay_if, "down"]);
    let lost = Instant::now();
    let back = pings_within(&attic, &cellar_ip, RECOVERY);
    let back = back.unwrap_or_else(|| panic!("attic and cellar stay cut off:\n{}", attic_daemon.log_text()));
    eprintln!("relay down: attic reaches the cellar through the hub after {:.1} s", back.as_secs_f64());
    assert_eq!(wg_peer(&attic, &relay_key).unwrap().1, "(none)", "the relay's routes are taken away");
    assert!(attic_daemon.log_text().contains("peer does not answer"), "the attic says so");

    // The hub says when it last heard from each host.
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let heard = |name: &str| {
        let nodes = nodes(&hub);
        nodes.as_array().unwrap().iter().find(|n| n["name"] == name).unwrap()["last_heard"].as_u64()
    };
    let relay_heard = heard("relay").expect("the relay was heard from before");
    assert!(
        now - relay_heard >= lost.elapsed().as_secs().saturating_sub(5),
        "relay last heard {relay_heard}, now {now}"
    );
    assert!(now - heard("attic").expect("attic heard") < 30, "the attic is heard from");
    let table = run_ok(meshctl(&hub.state).args(["node", "list"]));
    assert!(table.lines().next().unwrap().ends_with("LAST HEARD"), "{table}");
    let relay_row = table.lines().find(|l| l.starts_with("relay ")).unwrap();
    assert!(relay_row.ends_with("s ago"), "{relay_row}");

    // The relay comes back, and carries the traffic again.
    relay.ns.ip(&["link", "set", &relay_if, "up"]);
    relay.ns.ip(&["route", "replace", "default", "via", "172.31.64.1"]);
    let up = Instant::now();
    let again = wait_until(Duration::from_secs(120), || {
        wg_peer(&attic, &relay_key).is_some_and(|(_, ips)| ips.contains(&cellar_ip))
    });
    eprintln!("relay back: the attic routes through it again after {:.1} s", up.elapsed().as_secs_f64());
    assert!(again, "the relay is not used again:\n{}", attic_daemon.log_text());
    assert!(pings_within(&attic, &cellar_ip, Duration::from_secs(20)).is_some());
}

#[test]
fn a_member_whose_clock_ran_ahead_is_taken_back_after_a_restart() {
    if !require_root() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let router = internet();
    let hub = MeshHost::new("hub", root, "hc");
    let attic = MeshHost::new("attic", root, "hc");
    uplink(&router, &hub.ns, "172.31.65");
    let (attic_lan, _) = uplink(&router, &attic.ns, "192.168.65");
    nat_router(&router, &[("192.168.65.0/24", &attic_lan)]);
    let _hub_daemon = start_hub(&hub, "172.31.65.2:51820", root);
    let token = run_ok(meshctl(&hub.state).args(["node", "invite", "attic", "--expires", "10m"])).trim().to_owned();
    assert!(attic.join(&token, &attic.state, None).status.success());
    let hub_ip = address(&hub, "hub");

    // The attic's clock runs two hours ahead: its handshakes carry timestamps from the future, which the
    // hub takes and remembers.
    let mut ahead = attic.ns.command(product_bin("meshd"));
    ahead.env("RUST_LOG", "info,meshd=debug").env("LD_PRELOAD", meshd_e2e::libfaketime()).env("FAKETIME", "+2h");
    ahead.env("FAKETIME_DONT_FAKE_MONOTONIC", "1");
    ahead.args(["run", "--wireguard", "userspace", "--state-dir"]).arg(&attic.state);
    let mut daemon = Proc::spawn_logged(ahead, "meshd run on attic, clock ahead", &root.join("attic-ahead.log"));
    assert!(pings_within(&attic, &hub_ip, Duration::from_secs(30)).is_some(), "the attic reaches the hub");
    daemon.stop(Duration::from_secs(10));

    // NTP corrects it; the daemon starts again, with handshakes older than the last the hub took.
    let mut daemon = attic.run_daemon(&root.join("attic.log"));
    let back = pings_within(&attic, &hub_ip, RECOVERY);
    daemon.assert_running("after the clock was corrected");
    let back = back.unwrap_or_else(|| panic!("the hub refuses the attic:\n{}", daemon.log_text()));
    eprintln!("clock corrected: the attic reaches the hub again after {:.1} s", back.as_secs_f64());
}

#[test]
fn a_dual_stack_hub_whose_router_drops_inbound_ipv6_udp_is_reached_over_ipv4() {
    if !require_root() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let router = internet();
    let hub = MeshHost::new("hub", root, "h6");
    let attic = MeshHost::new("attic", root, "h6");
    let (router_hub, hub_if) = uplink(&router, &hub.ns, "172.31.66");
    let (attic_lan, attic_if) = uplink(&router, &attic.ns, "192.168.66");
    nat_router(&router, &[("192.168.66.0/24", &attic_lan)]);
    // IPv6 on both links, routed without NAT.
    let v6 = |ns: &Netns, dev: &str, addr: &str| ns.ip(&["addr", "add", addr, "dev", dev, "nodad"]);
    v6(&router, &router_hub, "2001:db8:66::1/64");
    v6(&router, &attic_lan, "2001:db8:67::1/64");
    v6(&hub.ns, &hub_if, "2001:db8:66::2/64");
    v6(&attic.ns, &attic_if, "2001:db8:67::2/64");
    hub.ns.ip(&["-6", "route", "add", "default", "via", "2001:db8:66::1"]);
    attic.ns.ip(&["-6", "route", "add", "default", "via", "2001:db8:67::1"]);
    // The hub's home router forwards IPv6 TCP but drops inbound IPv6 UDP to WireGuard's port.
    router.run(&["nft", "add table inet v6block"]);
    router.run(&["nft", "add chain inet v6block forward { type filter hook forward priority -5; }"]);
    router.run(&["nft", "add rule inet v6block forward ip6 daddr 2001:db8:66::2 udp dport 51820 drop"]);
    let v6_works = wait_until(Duration::from_secs(10), || {
        attic.ns.exec(&["ping", "-c1", "-W1", "2001:db8:66::2"]).status.success()
    });
    assert!(v6_works, "IPv6 works otherwise");
    set_hosts(&attic.ns, "2001:db8:66::2 hub.dyn.test\n172.31.66.2 hub.dyn.test\n");
    let resolved = attic.ns.run(&["getent", "ahosts", "hub.dyn.test"]);
    assert!(resolved.starts_with("2001:db8:66::2"), "the system resolver prefers the AAAA record: {resolved}");

    let _hub_daemon = start_hub(&hub, "hub.dyn.test:51820", root);
    let mut daemon = join(&hub, &attic, None, None, root);
    let hub_ip = address(&hub, "hub");
    let reached = pings_within(&attic, &hub_ip, Duration::from_secs(60));
    daemon.assert_running("dual stack");
    let reached = reached.unwrap_or_else(|| panic!("no tunnel to the hub:\n{}", daemon.log_text()));
    eprintln!("dual stack, IPv6 UDP blocked: the attic reaches the hub after {:.1} s", reached.as_secs_f64());
    let (endpoint, _) = wg_peer(&attic, &public_key(&hub, "hub")).unwrap();
    assert_eq!(endpoint, "172.31.66.2:51820", "over IPv4");
}
