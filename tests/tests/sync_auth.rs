//! Issue 11, point 1: only meshd on a host can act as that host towards the controller.
//!
//! A hub and a member `vps`. On vps, an unprivileged process (uid 65534, via `setpriv`) opens the sync
//! stream to the hub: its packets leave through vps's tunnel with vps's mesh address, as meshd's do. It
//! says hello as a member would, and answers the hub's challenge claiming vps's key with a proof it cannot
//! make. It gets no state. While the operator rotates vps's key it keeps offering its own key: vps ends
//! up with the key its own meshd made, and keeps its place in the mesh.

use std::fs;
use std::time::Duration;

use meshd_e2e::{MeshHost, describe, meshctl, require_root, run_json, run_ok, veth, wait_until};

/// The attacker: connects to the hub's sync service every half second for `rounds` rounds, says hello
/// (with and without answering the challenge), offers its own key, and prints everything it received.
const ATTACKER: &str = r#"
import base64, json, os, socket, sys, time
hub, port, claimed, rounds = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
mine = base64.b64encode(os.urandom(32)).decode()
print("key", mine, flush=True)
for i in range(rounds):
    try:
        s = socket.create_connection((hub, port), timeout=2)
        s.settimeout(1.5)
        lines = [json.dumps({"msg": "hello", "digest": "stale"})]
        if i % 2:
            lines = [json.dumps({"public_key": claimed, "ephemeral": mine, "proof": "00" * 32}),
                     json.dumps({"msg": "hello", "digest": "stale"})]
        lines.append(json.dumps({"msg": "new_key", "public_key": mine}))
        lines.append(json.dumps({"msg": "switch"}))
        s.sendall(("\n".join(lines) + "\n").encode())
        got = b""
        while True:
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                break
            if not chunk:
                break
            got += chunk
        print("got", got.decode(errors="replace").replace("\n", " | "), flush=True)
        s.close()
    except OSError as e:
        print("error", e, flush=True)
    time.sleep(0.5)
print("done", flush=True)
"#;

/// Asks the join service (TLS, certificate not checked) where a key stands, without proving it; prints
/// the answer.
const ASK_STANDING: &str = r#"
import json, socket, ssl, sys
context = ssl.create_default_context()
context.check_hostname = False
context.verify_mode = ssl.CERT_NONE
try:
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3) as raw:
        with context.wrap_socket(raw, server_hostname="meshd") as tls:
            tls.sendall((json.dumps({"standing": [sys.argv[3]]}) + "\n").encode())
            print("answer", tls.recv(4096).decode(errors="replace").strip(), flush=True)
except (OSError, ssl.SSLError) as e:
    print("error", e, flush=True)
"#;

#[test]
fn another_process_on_a_member_gets_no_state_and_cannot_take_its_key() {
    if !require_root() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let hub = MeshHost::new("hub", root, "sa");
    let vps = MeshHost::new("vps", root, "sa");
    veth(&hub.ns, &vps.ns, "172.31.215.1/24", "172.31.215.2/24");
    vps.ns.ip(&["route", "add", "default", "via", "172.31.215.1"]);
    hub.init_hub("172.31.215.1:51820", &[]);
    run_ok(meshctl(&hub.state).args(["service", "add", "secret", "--node", "hub", "--target", "127.0.0.1:9999"]));
    let mut hub_daemon = hub.run_hub(&root.join("hub.log"));
    let token = run_ok(meshctl(&hub.state).args(["node", "invite", "vps"]));
    let out = vps.join(token.trim(), &vps.state, None);
    assert!(out.status.success(), "vps join: {}", describe(&out));
    let mut vps_daemon = vps.run_daemon(&root.join("vps.log"));
    let nodes = run_json(meshctl(&hub.state).args(["node", "list", "--json"]));
    let key_of = |nodes: &serde_json::Value, name: &str| {
        let node = nodes.as_array().unwrap().iter().find(|n| n["name"] == name).unwrap();
        node["public_key"].as_str().unwrap().to_owned()
    };
    let hub_v4 =
        nodes.as_array().unwrap().iter().find(|n| n["name"] == "hub").unwrap()["address"].as_str().unwrap().to_owned();
    let old_key = key_of(&nodes, "vps");
    assert!(wait_until(Duration::from_secs(20), || vps.pings(&hub_v4)), "vps -> hub");
    assert!(
        wait_until(Duration::from_secs(10), || vps_daemon.log_text().contains("connected to the controller")),
        "vps has no sync session:\n{}",
        vps_daemon.log_text()
    );

    // The attack, first without a rotation under way, then while the operator rotates vps's key.
    let attacker_log = root.join("attacker.log");
    let mut attacker = vps.ns.command("setpriv");
    attacker.args(["--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3", "-c", ATTACKER]);
    attacker.args([hub_v4.as_str(), "51871", old_key.as_str(), "16"]);
    let mut attacker = meshd_e2e::Proc::spawn_logged(attacker, "attacker on vps", &attacker_log);
    std::thread::sleep(Duration::from_secs(3));
    run_ok(meshctl(&hub.state).args(["node", "rotate", "vps"]));
    let rotated = wait_until(Duration::from_secs(30), || {
        let nodes = run_json(meshctl(&hub.state).args(["node", "list", "--json"]));
        key_of(&nodes, "vps") != old_key
    });
    assert!(rotated, "vps did not rotate its key:\n{}", vps_daemon.log_text());
    assert!(wait_until(Duration::from_secs(30), || !attacker.is_running()), "the attacker did not finish");
    let seen = fs::read_to_string(&attacker_log).unwrap();
    assert!(seen.contains("done"), "{seen}");
    let rounds = seen.lines().filter(|l| l.starts_with("got ")).count();
    assert!(rounds >= 8, "the attacker reached the hub only {rounds} times:\n{seen}");
    // Nothing of the state: no node, service or digest; only the challenge and a refusal.
    let received: String = seen.lines().filter(|l| l.starts_with("got ")).collect();
    for secret in ["\"state\"", "\"nodes\"", "secret", "\"changes\"", "key_accepted", &old_key] {
        assert!(!received.contains(secret), "the attacker received {secret}:\n{received}");
    }
    assert!(received.contains("\"challenge\"") && received.contains("refused"), "{seen}");

    // vps has the key its own meshd made, and its place in the mesh.
    let attacker_key = seen.lines().find_map(|l| l.strip_prefix("key ")).unwrap().trim().to_owned();
    let nodes = run_json(meshctl(&hub.state).args(["node", "list", "--json"]));
    let new_key = key_of(&nodes, "vps");
    assert_ne!(new_key, attacker_key, "the attacker's key became vps's");
    let own = fs::read_to_string(vps.state.join("private.key")).unwrap();
    assert_eq!(meshd_e2e::wg_pubkey(own.trim()), new_key, "vps's key is not the one its meshd made");
    assert!(wait_until(Duration::from_secs(20), || vps.pings(&hub_v4)), "vps lost the hub after the rotation");
    let node = nodes.as_array().unwrap().iter().find(|n| n["name"] == "vps").unwrap().clone();
    assert_eq!(node["rotate_key"], false, "{node}");
    let log = hub_daemon.log_text();
    assert!(log.contains("did not prove the node's key"), "the hub did not say so:\n{log}");

    // The standing question (asked by members that lost their sync session) tells nothing about a key
    // to whoever cannot prove it.
    let mut ask = vps.ns.command("setpriv");
    ask.args(["--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3", "-c", ASK_STANDING]);
    let answer = run_ok(ask.args(["172.31.215.1", "51820", new_key.as_str()]));
    assert!(!answer.contains("\"standing\""), "an unproven standing question was answered: {answer}");
    assert!(!answer.contains("member"), "{answer}");
    eprintln!("unproven standing question: {}", answer.trim());
    hub_daemon.assert_running("after the attack");
    vps_daemon.assert_running("after the attack");
}
