//! Offline `meshctl` commands that change nodes, access rules, device grants and services in place.
//!
//! No daemon and no root. Without a daemon no host can join, so the only member is the hub: what needs
//! a joined member (disabling one, rules between two) is refused here with the controller's reason,
//! and exercised on joined members by meshctl's own tests.

use std::fs;
use std::path::Path;

use meshd_e2e::{describe, init_network, meshctl, output, run_json, run_ok};
use serde_json::{Value, json};

/// A state dir for network `home` (hub `hub`) with services `svc` (127.0.0.1:8080) and `web`
/// (127.0.0.1:80) on the hub, and a pending invite for `vps`.
fn network() -> tempfile::TempDir {
    let dir = init_network(&[]);
    let d = dir.path();
    run_ok(meshctl(d).args(["service", "add", "svc", "--node", "hub", "--target", "127.0.0.1:8080"]));
    run_ok(meshctl(d).args(["service", "add", "web", "--node", "hub", "--target", "127.0.0.1:80"]));
    run_ok(meshctl(d).args(["node", "invite", "vps"]));
    dir
}

/// Runs meshctl with `args`, which must fail with one `error: ` line containing `mention` and leave the
/// database as it was.
fn assert_refused(state: &Path, args: &[&str], mention: &str) {
    let db = fs::read(state.join("meshd.db")).unwrap();
    let mut cmd = meshctl(state);
    cmd.args(args);
    let out = output(&mut cmd);
    assert_eq!(out.status.code(), Some(1), "{args:?}: {}", describe(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.trim_end().lines().collect();
    assert!(lines.len() == 1 && lines[0].starts_with("error: "), "{args:?}: {}", describe(&out));
    assert!(lines[0].contains(mention), "{args:?}: the error should mention {mention:?}: {}", lines[0]);
    assert!(fs::read(state.join("meshd.db")).unwrap() == db, "{args:?} changed meshd.db");
}

fn service(state: &Path, name: &str) -> Value {
    let list = run_json(meshctl(state).args(["service", "list", "--json"]));
    list.as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == name)
        .cloned()
        .unwrap_or_else(|| panic!("no {name} in {list}"))
}

#[test]
fn node_list_shows_each_nodes_state() {
    let dir = network();
    let d = dir.path();
    let table = run_ok(meshctl(d).args(["node", "list"]));
    let mut lines = table.lines();
    let header: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(header, ["NODE", "ROLE", "ADDRESS", "ADDRESS6", "ENDPOINT", "STATE", "LAST", "HEARD"], "{table}");
    let hub: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!((hub[0], hub[1], hub[4], hub[5]), ("hub", "hub", "192.0.2.1:51820", "active"), "{table}");
    assert_eq!(hub[6], "-", "the hub does not hear from itself: {table}");
    let nodes = run_json(meshctl(d).args(["node", "list", "--json"]));
    assert_eq!((nodes[0]["disabled"].clone(), nodes[0]["rotate_key"].clone()), (json!(false), json!(false)));
}

#[test]
fn node_changes_are_refused_for_the_hub_and_for_nodes_that_have_not_joined() {
    let dir = network();
    let d = dir.path();
    assert_refused(d, &["node", "disable", "hub"], "\"hub\" is the hub; it cannot be disabled");
    assert_refused(d, &["node", "rotate", "hub"], "\"hub\" is the hub");
    for command in ["disable", "enable", "rotate"] {
        assert_refused(d, &["node", command, "vps"], "no node named \"vps\"");
        assert_refused(d, &["node", command, "ghost"], "no node named \"ghost\"");
    }
    let nodes = run_json(meshctl(d).args(["node", "list", "--json"]));
    assert_eq!(nodes.as_array().map(Vec::len), Some(1));
    assert_eq!(nodes[0]["disabled"], json!(false));
}

#[test]
fn access_rules_name_joined_nodes_only() {
    let dir = network();
    let d = dir.path();
    assert_eq!(run_json(meshctl(d).args(["access", "list", "--json"])), json!([]));
    let text = run_ok(meshctl(d).args(["access", "list"]));
    assert_eq!(text.trim(), "no access rules: every node reaches every node");
    assert_refused(d, &["access", "allow", "hub", "vps"], "no node named \"vps\"");
    assert_refused(d, &["access", "allow", "ghost", "hub"], "no node named \"ghost\"");
    assert_refused(d, &["access", "allow", "hub", "hub"], "to itself");
    assert_refused(d, &["access", "revoke", "hub", "vps"], "no rule lets \"hub\" reach \"vps\"");
    assert_eq!(run_json(meshctl(d).args(["access", "list", "--json"])), json!([]));
}

#[test]
fn device_update_replaces_grants_and_keeps_the_device() {
    let dir = network();
    let d = dir.path();
    run_ok(meshctl(d).args(["device", "add", "phone", "--allow", "svc"]));
    let before = run_json(meshctl(d).args(["device", "list", "--json"]))[0].clone();

    let text = run_ok(meshctl(d).args(["device", "update", "phone", "--allow", "web,svc"]));
    assert_eq!(text.trim(), "device phone: may reach svc,web");
    let after = run_json(meshctl(d).args(["device", "list", "--json"]))[0].clone();
    assert_eq!(after["allow"], json!(["svc", "web"]));
    for kept in ["public_key", "address", "address_v6"] {
        assert_eq!(after[kept], before[kept], "{kept} changed");
    }
    assert_eq!(service(d, "web")["devices"], json!(["phone"]));

    let record = run_json(meshctl(d).args(["device", "update", "phone", "--allow", "web", "--json"]));
    assert_eq!((record["name"].clone(), record["allow"].clone()), (json!("phone"), json!(["web"])), "{record}");
    assert_eq!(service(d, "svc")["devices"], json!([]));

    assert_refused(d, &["device", "update", "phone", "--allow", "web,nosuch"], "no service named \"nosuch\"");
    assert_refused(d, &["device", "update", "ghost", "--allow", "web"], "no device named \"ghost\"");
    let out = output(meshctl(d).args(["device", "update", "phone", "--allow", "Bad_Name"]));
    assert_eq!(out.status.code(), Some(2), "a bad name is a usage error: {}", describe(&out));
    assert_eq!(run_json(meshctl(d).args(["device", "list", "--json"]))[0]["allow"], json!(["web"]));
}

#[test]
fn service_update_changes_target_and_port_and_keeps_address_and_grants() {
    let dir = network();
    let d = dir.path();
    run_ok(meshctl(d).args(["device", "add", "phone", "--allow", "svc"]));
    let before = service(d, "svc");
    let ip = before["mesh_address"].as_str().unwrap().split(':').next().unwrap().to_owned();

    let text = run_ok(meshctl(d).args(["service", "update", "svc", "--target", "127.0.0.1:9090"]));
    assert_eq!(text.trim(), format!("service svc on hub: {ip}:9090 (svc.home.internal) -> 127.0.0.1:9090"));
    let after = service(d, "svc");
    assert_eq!(after["target"], "127.0.0.1:9090");
    assert_eq!(after["mesh_address"], format!("{ip}:9090"), "the port follows the target by default");
    assert_eq!(after["devices"], json!(["phone"]));

    let record =
        run_json(meshctl(d).args(["service", "update", "svc", "--target", "localhost:9091", "--port", "80", "--json"]));
    assert_eq!(
        (record["target"].clone(), record["mesh_address"].clone()),
        (json!("localhost:9091"), json!(format!("{ip}:80")))
    );
    assert_eq!(
        service(d, "svc")["mesh_address_v6"],
        before["mesh_address_v6"].as_str().unwrap().replace(":8080", ":80")
    );

    assert_refused(d, &["service", "update", "ghost", "--target", "127.0.0.1:1"], "no service named \"ghost\"");
    for (target, mention) in [("nocolon", "nocolon"), ("1.2.3.4:70000", "70000")] {
        let out = output(meshctl(d).args(["service", "update", "svc", "--target", target]));
        assert!(!out.status.success(), "{target} was accepted: {}", describe(&out));
        assert!(String::from_utf8_lossy(&out.stderr).contains(mention), "{}", describe(&out));
    }
    assert_eq!(service(d, "svc")["target"], "localhost:9091");
}
