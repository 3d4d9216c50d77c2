//! Issue 10, point 6: endpoints change after the fact. `meshctl node update NAME --endpoint HOST:PORT` moves
//! a member (a new static IP) and the hub (a VPS migration): every other host's interface follows within a
//! second or two and traffic flows; a new hub endpoint names the devices whose config still has the old one;
//! bad input is one line and changes nothing; `meshctl apply` with `endpoint = ...` moves a member once.
//!
//! Namespaces: `router` stands for the internet; `hub`, `vps` and `other` each have a public address on a
//! link of their own (172.31.24{0,1,2}.2), so moving an address is adding a new one and deleting the old.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use meshd_e2e::{MeshHost, meshctl, output, product_bin, require_root, router, run_json, run_ok, uplink, wait_until};
use serde_json::Value;

/// The endpoint `host`'s interface holds for the peer with `key`, as `wg show` prints it.
fn endpoint_of(host: &MeshHost, key: &str) -> Option<String> {
    let text = host.ns.run(&["wg", "show", &host.ifname, "endpoints"]);
    text.lines().find_map(|line| {
        let (peer, endpoint) = line.split_once('\t')?;
        (peer == key).then(|| endpoint.trim().to_string())
    })
}

fn node<'a>(nodes: &'a Value, name: &str) -> &'a Value {
    nodes.as_array().unwrap().iter().find(|n| n["name"] == name).unwrap_or_else(|| panic!("{name} in {nodes}"))
}

/// Moves `host`'s public address on `uplink` from `old` to `new` (same /24), as a new static IP does.
fn move_address(host: &MeshHost, uplink: &str, old: &str, new: &str) {
    host.ns.ip(&["addr", "add", &format!("{new}/24"), "dev", uplink]);
    host.ns.ip(&["addr", "del", &format!("{old}/24"), "dev", uplink]);
    let gateway = format!("{}.1", old.rsplit_once('.').unwrap().0);
    host.ns.ip(&["route", "replace", "default", "via", &gateway]);
}

/// Waits (up to 2 s) until every host in `hosts` holds `endpoint` for the peer `key`; returns how long it took.
fn followed(hosts: &[&MeshHost], key: &str, endpoint: &str) -> Duration {
    let started = Instant::now();
    for host in hosts {
        let ok = wait_until(Duration::from_secs(2), || endpoint_of(host, key).as_deref() == Some(endpoint));
        assert!(ok, "{} still holds {:?} for the peer, not {endpoint}", host.name, endpoint_of(host, key));
    }
    started.elapsed()
}

/// A refused `meshctl` call: exit status `status`, one `error:` line containing `why`.
fn assert_refused(state: &Path, args: &[&str], status: i32, why: &str) {
    let out = output(meshctl(state).args(args));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(status), "{args:?}: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "{args:?}: one line: {stderr}");
    assert!(stderr.starts_with("error: ") && stderr.contains(why), "{args:?}: expected {why:?}: {stderr}");
}

#[test]
fn a_member_and_the_hub_move_and_every_host_follows() {
    if !require_root() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let router = router("router");
    let hub = MeshHost::new("hub", root, "eu");
    let vps = MeshHost::new("vps", root, "eu");
    let other = MeshHost::new("other", root, "eu");
    let mut uplinks = Vec::new();
    for (i, host) in [&hub, &vps, &other].into_iter().enumerate() {
        let (_, uplink) = uplink(&router, &host.ns, &format!("172.31.24{i}"));
        // Deleting the first address of a subnet would take the new one (and the routes) with it.
        host.ns.run(&["sysctl", "-qw", &format!("net.ipv4.conf.{uplink}.promote_secondaries=1")]);
        uplinks.push(uplink);
    }

    let mut init = Command::new(product_bin("meshd"));
    init.args(["init", "--network", "home", "--name", "hub", "--endpoint", "172.31.240.2:51820"]);
    run_ok(init.args(["--interface", &hub.ifname]).arg("--state-dir").arg(&hub.state));
    run_ok(meshctl(&hub.state).args(["service", "add", "wallet", "--node", "hub", "--target", "127.0.0.1:9737"]));
    let conf = root.join("phone.conf");
    run_ok(meshctl(&hub.state).args(["device", "add", "phone", "--allow", "wallet", "--conf"]).arg(&conf));
    let mut hub_daemon = hub.run_hub(&root.join("hub.log"));
    for (host, endpoint) in [(&vps, "172.31.241.2:51820"), (&other, "172.31.242.2:51820")] {
        let token = run_ok(meshctl(&hub.state).args(["node", "invite", host.name]));
        let out = host.join(token.trim(), &host.state, Some(endpoint));
        assert!(out.status.success(), "{} join: {}", host.name, String::from_utf8_lossy(&out.stderr));
    }
    let _daemons = [&vps, &other].map(|h| h.run_daemon(&root.join(format!("{}.log", h.name))));
    let nodes = run_json(meshctl(&hub.state).args(["node", "list", "--json"]));
    let key = |name: &str| node(&nodes, name)["public_key"].as_str().unwrap().to_string();
    let mesh = |name: &str| node(&nodes, name)["address"].as_str().unwrap().to_string();
    let (hub_key, vps_key) = (key("hub"), key("vps"));
    assert!(wait_until(Duration::from_secs(20), || other.pings(&mesh("vps"))), "other -> vps before the move");
    assert!(wait_until(Duration::from_secs(5), || vps.pings(&mesh("hub"))), "vps -> hub before the move");

    // Bad input: one line, non-zero, nothing changed.
    let before = run_json(meshctl(&hub.state).args(["node", "list", "--json"]));
    assert_refused(&hub.state, &["node", "update", "vps", "--endpoint", "nocolon"], 2, "is not HOST:PORT");
    assert_refused(&hub.state, &["node", "update", "vps", "--endpoint", "127.0.0.1:51820"], 2, "loopback");
    assert_refused(&hub.state, &["node", "update", "vps", "--endpoint", "[fe80::1]:51820"], 2, "link-local");
    assert_refused(&hub.state, &["node", "update", "ghost", "--endpoint", "172.31.241.9:51820"], 1, "no node named");
    assert_refused(&hub.state, &["node", "update", "hub", "--no-endpoint"], 1, "is the hub");
    assert_refused(&hub.state, &["node", "update", "vps"], 1, "nothing to change");
    assert_refused(
        &hub.state,
        &["node", "update", "vps", "--mtu", "1279"],
        2,
        "MTU 1279 is not a number from 1280 to 9000",
    );
    assert_eq!(run_json(meshctl(&hub.state).args(["node", "list", "--json"])), before, "a refusal changed nothing");

    // The member gets a new static IP: the old one is gone, other hosts follow the update.
    move_address(&vps, &uplinks[1], "172.31.241.2", "172.31.241.3");
    let moved = run_ok(meshctl(&hub.state).args(["node", "update", "vps", "--endpoint", "172.31.241.3:51820"]));
    assert_eq!(moved.trim(), "node vps: endpoint 172.31.241.3:51820, mtu 1420");
    let took = followed(&[&hub, &other], &vps_key, "172.31.241.3:51820");
    eprintln!("member moved: hub and other hold its new endpoint {took:?} after meshctl returned");
    assert!(wait_until(Duration::from_secs(2), || other.pings(&mesh("vps"))), "other -> vps after the move");
    let listed = run_json(meshctl(&hub.state).args(["node", "list", "--json"]));
    assert_eq!(node(&listed, "vps")["endpoint"], "172.31.241.3:51820");

    // The hub migrates: members follow, and meshctl names the device whose config has the old endpoint.
    hub.ns.ip(&["addr", "add", "172.31.240.3/24", "dev", &uplinks[0]]);
    let out = output(meshctl(&hub.state).args(["--json", "node", "update", "hub", "--endpoint", "172.31.240.3:51820"]));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let updated: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(updated["node"]["endpoint"], "172.31.240.3:51820");
    assert_eq!(updated["devices_with_old_endpoint"], serde_json::json!(["phone"]));
    let warning = String::from_utf8_lossy(&out.stderr);
    assert!(warning.contains("phone") && warning.contains("meshctl device rotate"), "{warning}");
    hub.ns.ip(&["addr", "del", "172.31.240.2/24", "dev", &uplinks[0]]);
    hub.ns.ip(&["route", "replace", "default", "via", "172.31.240.1"]);
    let took = followed(&[&vps, &other], &hub_key, "172.31.240.3:51820");
    eprintln!("hub moved: both members hold its new endpoint {took:?} after meshctl returned");
    for member in [&vps, &other] {
        assert!(wait_until(Duration::from_secs(2), || member.pings(&mesh("hub"))), "{} -> hub", member.name);
    }
    // A device handed out now carries the new endpoint; the same endpoint again names no device.
    let rotated = run_ok(meshctl(&hub.state).args(["device", "rotate", "phone", "--conf", "-"]));
    assert!(rotated.contains("Endpoint = 172.31.240.3:51820"), "{rotated}");
    let again =
        run_json(meshctl(&hub.state).args(["--json", "node", "update", "hub", "--endpoint", "172.31.240.3:51820"]));
    assert_eq!(again["devices_with_old_endpoint"], serde_json::json!([]));

    // The declaration file moves the member back; a second apply changes nothing.
    move_address(&vps, &uplinks[1], "172.31.241.3", "172.31.241.2");
    let file = root.join("network.toml");
    std::fs::write(
        &file,
        "[[node]]\nname = \"vps\"\nendpoint = \"172.31.241.2:51820\"\n\n[[node]]\nname = \"other\"\n\n\
         [[service]]\nname = \"wallet\"\nnode = \"hub\"\ntarget = \"127.0.0.1:9737\"\n\n\
         [[device]]\nname = \"phone\"\nallow = [\"wallet\"]\n",
    )
    .unwrap();
    let applied = run_ok(meshctl(&hub.state).arg("apply").arg(&file));
    assert!(applied.contains("~ node vps: endpoint 172.31.241.3:51820 -> 172.31.241.2:51820"), "{applied}");
    followed(&[&hub, &other], &vps_key, "172.31.241.2:51820");
    assert!(wait_until(Duration::from_secs(2), || other.pings(&mesh("vps"))), "other -> vps after apply");
    let second = run_ok(meshctl(&hub.state).arg("apply").arg(&file));
    assert_eq!(second.trim(), "no changes");
    hub_daemon.assert_running("after the moves");
}
