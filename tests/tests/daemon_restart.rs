//! A daemon killed with SIGKILL leaves a stale socket behind: `meshctl` must then work on the state
//! directly, and a restarted `meshd run` must apply what changed meanwhile. SIGTERM tears down cleanly.
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use meshd_e2e::{
    Netns, Proc, UapiCleanup, meshctl, output, product_bin, require_root, run_json, run_ok, unique_ifname, wait_until,
};

fn start(node: &Netns, state: &Path, log: &Path) -> Proc {
    let mut cmd = node.command(product_bin("meshd"));
    cmd.env("RUST_LOG", "info").args(["run", "--wireguard", "userspace", "--state-dir"]).arg(state);
    let mut daemon = Proc::spawn_logged(cmd, "meshd run", log);
    // Readiness is a socket that accepts, not a socket file: a killed daemon leaves its file behind.
    let ready = wait_until(Duration::from_secs(60), || {
        daemon.assert_running("starting up");
        UnixStream::connect(state.join("meshd.sock")).is_ok()
            && output(meshctl(state).args(["status", "--json"])).status.success()
    });
    assert!(ready, "meshd run did not become ready within 60 s");
    daemon
}

#[test]
fn restart_after_sigkill_applies_offline_changes() {
    if !require_root() {
        return;
    }
    let node = Netns::new("restart");
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let ifname = unique_ifname("mr");
    let _uapi = UapiCleanup(ifname.clone());
    let mut init = Command::new(product_bin("meshd"));
    init.args(["init", "--network", "home", "--name", "hub", "--endpoint", "192.0.2.10:51820", "--interface", &ifname]);
    run_ok(init.arg("--state-dir").arg(&state));
    run_ok(meshctl(&state).args(["service", "add", "wallet", "--node", "hub", "--target", "127.0.0.1:9737"]));

    let mut daemon = start(&node, &state, &tmp.path().join("first.log"));
    // SAFETY: kill(2) on our own, not yet reaped child.
    unsafe { libc::kill(daemon.pid() as libc::pid_t, libc::SIGKILL) };
    assert!(!daemon.stop(Duration::from_secs(5)).success());
    assert!(state.join("meshd.sock").exists(), "SIGKILL cannot remove the socket file");

    // With no daemon, the stale socket is ignored and the change goes to the state directly.
    let began = Instant::now();
    let phone = run_json(meshctl(&state).args(["device", "add", "phone", "--allow", "wallet", "--json"]));
    assert!(began.elapsed() < Duration::from_secs(3), "meshctl waited {:?} on a dead daemon", began.elapsed());
    let phone_key = phone["public_key"].as_str().unwrap().to_string();

    let mut daemon = start(&node, &state, &tmp.path().join("second.log"));
    let peers = node.run(&["wg", "show", &ifname, "peers"]);
    assert!(peers.contains(&phone_key), "the device added offline is not a peer after restart: {peers}");
    // The table is named after the interface, with characters nft does not take as '_'.
    let table = format!("meshd_{}", ifname.replace(|c: char| !c.is_ascii_alphanumeric(), "_"));
    let rules = node.run(&["nft", "list", "table", "inet", &table]);
    assert!(rules.contains("@grants_v4"), "{rules}");
    let devices = run_json(meshctl(&state).args(["device", "list", "--json"]));
    assert_eq!(devices[0]["name"], "phone");

    let status = daemon.stop(Duration::from_secs(10));
    assert!(status.success(), "SIGTERM should end meshd cleanly: {status:?}\n{}", daemon.log_text());
    assert!(!state.join("meshd.sock").exists(), "socket left behind after SIGTERM");
    let tables = node.run(&["nft", "list", "tables"]);
    assert!(!tables.contains(&table), "access rules left behind: {tables}");
    let links = node.ip(&["link", "show"]);
    assert!(!links.contains(&ifname), "interface left behind: {links}");
}
