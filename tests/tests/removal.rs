//! Issue 10, point 7: a removed host hears of it, and one interface has one daemon.
//!
//! A hub and two members (`vps1`, `vps2`), each member on its own link to the hub. A second daemon on
//! vps1's interface (`meshd join --interface` into a new state directory, `meshd run` on a copy of its
//! state) is refused in one line naming the interface, and the first keeps passing traffic (another
//! namespace may use the name: interface names are per namespace). vps1 is
//! removed while it runs: within seconds its daemon exits with the reason in its log and its interface
//! and rules are gone (before the fix it ran on, retrying handshakes, with nothing in its log). vps2 is
//! disabled: its log says so and it keeps running; enabled again, it is back. Then vps2 is stopped,
//! removed while it is down, and started again: it hears of it at its first contact and exits.
use std::fs;
use std::time::{Duration, Instant};

use meshd_e2e::{
    MeshHost, Proc, assert_error_line, describe, meshctl, output, product_bin, require_root, run_json, run_ok, veth,
    wait_until,
};

type Host = MeshHost;

/// The mesh IPv4 address of node `name`.
fn address(hub: &Host, name: &str) -> String {
    let nodes = run_json(meshctl(&hub.state).args(["node", "list", "--json"]));
    let node = nodes.as_array().unwrap().iter().find(|n| n["name"] == name).unwrap_or_else(|| panic!("{name}"));
    node["address"].as_str().unwrap().to_owned()
}

/// The nftables table meshd keeps for `host`'s interface, if any.
fn has_rules(host: &Host) -> bool {
    let table = format!("meshd_{}", host.ifname.replace(|c: char| !c.is_ascii_alphanumeric(), "_"));
    host.ns.run(&["nft", "list", "tables"]).contains(&table)
}

fn has_interface(host: &Host) -> bool {
    host.ns.exec(&["ip", "link", "show", &host.ifname]).status.success()
}

/// Waits up to `timeout` for `daemon` to exit; returns its exit code and how long it took.
fn exits_within(daemon: &mut Proc, timeout: Duration) -> Option<(Option<i32>, Duration)> {
    let started = Instant::now();
    let exited = wait_until(timeout, || !daemon.is_running());
    exited.then(|| (daemon.stop(Duration::from_secs(1)).code(), started.elapsed()))
}

#[test]
fn removed_and_disabled_hosts_hear_of_it_and_an_interface_has_one_daemon() {
    if !require_root() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let hub = Host::new("hub", root, "rm");
    let vps1 = Host::new("vps1", root, "rm");
    let vps2 = Host::new("vps2", root, "rm");
    veth(&hub.ns, &vps1.ns, "172.31.241.1/24", "172.31.241.2/24");
    veth(&hub.ns, &vps2.ns, "172.31.242.1/24", "172.31.242.2/24");
    vps1.ns.ip(&["route", "add", "default", "via", "172.31.241.1"]);
    vps2.ns.ip(&["route", "add", "default", "via", "172.31.242.1"]);

    hub.init_hub("172.31.241.1:51820", &[]);
    let mut hub_daemon = hub.run_hub(&root.join("hub.log"));
    for host in [&vps1, &vps2] {
        let token = run_ok(meshctl(&hub.state).args(["node", "invite", host.name]));
        let out = host.join(token.trim(), &host.state, None);
        assert!(out.status.success(), "{} join: {}", host.name, describe(&out));
    }
    let mut daemon1 = vps1.run_daemon(&root.join("vps1.log"));
    let mut daemon2 = vps2.run_daemon(&root.join("vps2.log"));
    let hub_v4 = address(&hub, "hub");
    for host in [&vps1, &vps2] {
        assert!(wait_until(Duration::from_secs(20), || host.pings(&hub_v4)), "{} -> hub", host.name);
    }

    // A second daemon on vps1's interface: `meshd join` into a new state directory is refused before the
    // token is spent, and `meshd run` on another state directory naming the interface is refused too.
    let token = run_ok(meshctl(&hub.state).args(["node", "invite", "again"]));
    let second = root.join("vps1-again");
    let out = vps1.join(token.trim(), &second, None);
    assert_error_line(&out, &[&vps1.ifname, "another meshd", &vps1.state.display().to_string()]);
    assert!(!second.exists(), "a refused join left {} behind", second.display());
    let invites = run_json(meshctl(&hub.state).args(["node", "invites", "--json"]));
    assert_eq!(invites[0]["name"], "again", "the refused join spent the token: {invites}");
    let copy = root.join("vps1-copy");
    fs::create_dir(&copy).unwrap();
    for file in ["member.json", "private.key"] {
        fs::copy(vps1.state.join(file), copy.join(file)).unwrap();
    }
    let mut run = vps1.ns.command(product_bin("meshd"));
    run.args(["run", "--wireguard", "userspace", "--state-dir"]).arg(&copy);
    let out = output(&mut run);
    assert_error_line(&out, &[&vps1.ifname, "another meshd"]);
    daemon1.assert_running("a second daemon was refused its interface");
    assert!(vps1.pings(&hub_v4), "vps1's daemon stopped passing traffic after the refused second daemon");
    // Interface names are per network namespace: another host (namespace) may join with the same name.
    let other = Host::new("other", root, "rm");
    veth(&hub.ns, &other.ns, "172.31.243.1/24", "172.31.243.2/24");
    other.ns.ip(&["route", "add", "default", "via", "172.31.243.1"]);
    let out = other.join_as(token.trim(), &other.state, &vps1.ifname, None);
    assert!(out.status.success(), "a join naming vps1's interface in another namespace: {}", describe(&out));
    // But the embedded userspace WireGuard's UAPI socket (/var/run/wireguard/NAME.sock) is not per
    // namespace: running it there under that name would take vps1's socket. Refused, vps1 untouched.
    let mut run = other.ns.command(product_bin("meshd"));
    run.args(["run", "--wireguard", "userspace", "--state-dir"]).arg(&other.state);
    let out = output(&mut run);
    assert_error_line(&out, &[&vps1.ifname, "UAPI socket", "another network namespace"]);
    daemon1.assert_running("a userspace daemon in another namespace was refused the interface name");
    assert!(vps1.pings(&hub_v4), "vps1 stopped passing traffic after the refused daemon in another namespace");

    // Removed while it runs: vps1 exits with the reason, its interface and rules gone.
    run_ok(meshctl(&hub.state).args(["node", "remove", "vps1"]));
    let (code, took) = exits_within(&mut daemon1, Duration::from_secs(30))
        .unwrap_or_else(|| panic!("vps1 still runs 30 s after its removal:\n{}", daemon1.log_text()));
    eprintln!("removal: vps1's daemon exited {took:?} after meshctl node remove");
    assert_eq!(code, Some(1), "a removed host exits with an error");
    let log = daemon1.log_text();
    assert!(log.contains("error: this host was removed from network home"), "vps1's log does not say it:\n{log}");
    assert!(!has_interface(&vps1), "vps1's interface is still there");
    assert!(!has_rules(&vps1), "vps1's access rules are still there");

    // Disabled: vps2 says so and keeps running; enabled again, it is back.
    run_ok(meshctl(&hub.state).args(["node", "disable", "vps2"]));
    let disabled = Instant::now();
    let said = wait_until(Duration::from_secs(30), || {
        daemon2.assert_running("disabled");
        daemon2.log_text().contains("this host is disabled in the network")
    });
    assert!(said, "vps2's log does not say it is disabled:\n{}", daemon2.log_text());
    eprintln!("disable: vps2's log said so {:?} after meshctl node disable", disabled.elapsed());
    run_ok(meshctl(&hub.state).args(["node", "enable", "vps2"]));
    assert!(wait_until(Duration::from_secs(15), || vps2.pings(&hub_v4)), "the enabled vps2 is not back");
    daemon2.assert_running("enabled again");

    // Removed while it was stopped: at its first contact after the restart it hears of it and exits.
    assert!(daemon2.stop(Duration::from_secs(10)).success(), "{}", daemon2.log_text());
    run_ok(meshctl(&hub.state).args(["node", "remove", "vps2"]));
    let mut daemon2 = vps2.run_daemon(&root.join("vps2-restarted.log"));
    let (code, took) = exits_within(&mut daemon2, Duration::from_secs(30))
        .unwrap_or_else(|| panic!("vps2, removed while stopped, still runs:\n{}", daemon2.log_text()));
    eprintln!("removal while stopped: vps2's daemon exited {took:?} after it started");
    assert_eq!(code, Some(1));
    let log = daemon2.log_text();
    assert!(log.contains("error: this host was removed from network home"), "vps2's log does not say it:\n{log}");
    assert!(!has_interface(&vps2) && !has_rules(&vps2), "vps2 left its interface or rules behind");
    hub_daemon.assert_running("its members were removed");
}
