//! Issue 10, point 9: a member whose state directory is full or read-only.
//!
//! The member's state directory is a small tmpfs. Full when a key rotation is asked for: no empty or cut
//! `private.key.next` is left, the member keeps working with its old key, and once space is freed the
//! rotation completes by itself within the retry time. A damaged `private.key.next` (empty, or text that
//! is no key) is discarded at start with a log line instead of stopping the member. Read-only (as a
//! remounted SD card): the member starts from its cache, the mesh works, and its log says once what it
//! cannot save; a second daemon on it is still refused; one restarted before it could save the new key
//! the network confirmed runs on that key and saves it once the directory is writable again. A hub on a
//! read-only directory refuses to start and names the directory.
use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use meshd_e2e::{
    MeshHost, Proc, Tmpfs, describe, meshctl, output, product_bin, require_root, run_json, run_ok, veth, wait_until,
    wg_pubkey, write_private,
};
use serde_json::Value;

/// A hub and a member on one link (`subnet`.1 and .2), the member's state directory a tmpfs of `size`.
struct Mesh {
    // Fields drop in order: the daemons go before the tmpfs they use.
    _hub_daemon: Proc,
    member: MeshHost,
    hub: MeshHost,
    disk: Tmpfs,
}

impl Mesh {
    /// The hub running and the member joined (not running yet).
    fn new(root: &Path, subnet: &str, size: &str) -> Mesh {
        let hub = MeshHost::new("hub", root, "sd");
        let member = MeshHost::new("member", root, "sd");
        veth(&hub.ns, &member.ns, &format!("{subnet}.1/24"), &format!("{subnet}.2/24"));
        let disk = Tmpfs::mount(&member.state, size);
        hub.init_hub(&format!("{subnet}.1:51820"), &[]);
        let hub_daemon = hub.run_hub(&root.join("hub.log"));
        let token = run_ok(meshctl(&hub.state).args(["node", "invite", "member"])).trim().to_owned();
        let out = member.join(&token, &member.state, Some(&format!("{subnet}.2:51820")));
        assert!(out.status.success(), "member join: {}", describe(&out));
        Mesh { _hub_daemon: hub_daemon, member, hub, disk }
    }

    /// `meshd run` of the member, once its log says it is ready.
    fn run_member(&self, log: &Path) -> Proc {
        let mut daemon = self.member.run_daemon(log);
        let ready = wait_until(Duration::from_secs(60), || {
            daemon.assert_running("starting up");
            daemon.log_text().contains("meshd ready (member)")
        });
        assert!(ready, "the member did not become ready:\n{}", daemon.log_text());
        daemon
    }

    /// The member's node record on the hub.
    fn member_node(&self) -> Value {
        let nodes = run_json(meshctl(&self.hub.state).args(["node", "list", "--json"]));
        nodes.as_array().unwrap().iter().find(|n| n["name"] == "member").expect("the member").clone()
    }

    fn hub_address(&self) -> String {
        let nodes = run_json(meshctl(&self.hub.state).args(["node", "list", "--json"]));
        let hub = nodes.as_array().unwrap().iter().find(|n| n["name"] == "hub").expect("the hub");
        hub["address"].as_str().unwrap().to_owned()
    }

    /// The member's peer keys on the hub's interface, as `wg` shows them.
    fn hub_peers(&self) -> String {
        self.hub.ns.run(&["wg", "show", &self.hub.ifname, "peers"])
    }

    /// The member pings the hub through the tunnel within 15 s.
    fn assert_member_reaches_hub(&self, when: &str) {
        let hub_v4 = self.hub_address();
        assert!(wait_until(Duration::from_secs(15), || self.member.pings(&hub_v4)), "member -> hub {when}");
    }
}

/// The names in `dir`, sorted.
fn names_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> =
        fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    names
}

/// Lines of `log` at WARN level that contain `text`.
fn warnings(log: &str, text: &str) -> usize {
    log.lines().filter(|l| l.contains(" WARN ") && l.contains(text)).count()
}

#[test]
fn a_rotation_on_a_full_state_dir_waits_for_space_and_completes_by_itself() {
    if !require_root() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let mesh = Mesh::new(root, "172.31.161", "1m");
    let member_log = root.join("member.log");
    let mut member_daemon = mesh.run_member(&member_log);
    mesh.assert_member_reaches_hub("at start");
    let old_key = mesh.member_node()["public_key"].as_str().unwrap().to_owned();

    // The disk is full when the operator asks for a new key.
    let filler = mesh.disk.fill();
    let before = names_in(&mesh.member.state);
    run_ok(meshctl(&mesh.hub.state).args(["node", "rotate", "member"]));
    let asked = wait_until(Duration::from_secs(10), || {
        member_daemon.assert_running("its disk is full");
        member_daemon.log_text().contains("asked for a new key")
    });
    assert!(asked, "the member did not hear of the rotation:\n{}", member_daemon.log_text());
    std::thread::sleep(Duration::from_millis(500)); // it tries to save the new key at once
    assert_eq!(names_in(&mesh.member.state), before, "no new file, empty or not, in the full state directory");
    assert!(!mesh.member.state.join("private.key.next").exists());
    let text = member_daemon.log_text();
    assert!(text.contains("rotation postponed"), "the member says the rotation waits:\n{text}");
    // It keeps working with its old key; the network still asks for a new one.
    mesh.assert_member_reaches_hub("with a full disk");
    assert!(mesh.hub_peers().contains(&old_key), "the hub still has the old key");
    assert_eq!(mesh.member_node()["rotate_key"], true);

    // Space is freed: the rotation completes within the retry time, nobody asking again.
    fs::remove_file(&filler).unwrap();
    let freed = Instant::now();
    let rotated = wait_until(Duration::from_secs(45), || {
        member_daemon.assert_running("space was freed");
        let node = mesh.member_node();
        let key = node["public_key"].as_str().unwrap().to_owned();
        node["rotate_key"] == false && key != old_key && mesh.hub_peers().contains(&key)
    });
    assert!(rotated, "the rotation did not complete {:?} after space was freed", freed.elapsed());
    eprintln!("rotation completed {:?} after space was freed", freed.elapsed());
    let new_key = mesh.member_node()["public_key"].as_str().unwrap().to_owned();
    assert!(!mesh.hub_peers().contains(&old_key), "the hub dropped the old key");
    mesh.assert_member_reaches_hub("with the new key");
    let saved = wait_until(Duration::from_secs(5), || {
        fs::read_to_string(mesh.member.state.join("private.key")).is_ok_and(|k| wg_pubkey(&k) == new_key)
    });
    assert!(saved, "the member's private.key is the new key");
    assert!(!mesh.member.state.join("private.key.next").exists());
    assert_eq!(warnings(&member_daemon.log_text(), "rotation postponed"), 1, "warned once, retried quietly");
}

#[test]
fn a_damaged_pending_key_is_discarded_at_start_with_a_log_line() {
    if !require_root() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let mesh = Mesh::new(root, "172.31.162", "1m");
    let next = mesh.member.state.join("private.key.next");
    for (round, damaged) in [("empty", ""), ("text", "this is not a key, just some text\n")] {
        write_private(&next, damaged);
        let log = root.join(format!("member-{round}.log"));
        let mut daemon = mesh.run_member(&log);
        let text = daemon.log_text();
        assert_eq!(warnings(&text, "discarding a damaged pending key"), 1, "{round}: {text}");
        assert!(text.contains("private.key.next"), "the log names the file: {text}");
        assert!(!next.exists(), "{round}: the damaged file is removed");
        mesh.assert_member_reaches_hub(round);
        let status = daemon.stop(Duration::from_secs(10));
        assert!(status.success(), "SIGTERM: {status:?}");
    }
}

#[test]
fn a_member_on_a_read_only_state_dir_runs_from_its_cache_and_says_what_it_cannot_save() {
    if !require_root() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let mesh = Mesh::new(root, "172.31.163", "1m");
    // Joined, never run (so no lock file either), then the card is remounted read-only.
    mesh.disk.remount(true);
    let log = root.join("member.log");
    let mut daemon = mesh.run_member(&log);
    mesh.assert_member_reaches_hub("from a read-only state directory");

    // A second daemon on the same directory is refused, as on a writable one.
    let second =
        output(mesh.member.ns.command(product_bin("meshd")).args(["run", "--state-dir"]).arg(&mesh.member.state));
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success() && stderr.contains("another meshd is already running"), "{}", describe(&second));

    // A change of the network reaches it and cannot be cached: it was told once, not at every change.
    run_ok(meshctl(&mesh.hub.state).args([
        "service",
        "add",
        "wallet",
        "--node",
        "member",
        "--target",
        "127.0.0.1:9737",
    ]));
    let wallet = run_json(meshctl(&mesh.hub.state).args(["service", "list", "--json"]))[0]["mesh_address"]
        .as_str()
        .unwrap()
        .split(':')
        .next()
        .unwrap()
        .to_owned();
    let applied = wait_until(Duration::from_secs(5), || {
        mesh.member.ns.run(&["ip", "-4", "addr", "show", "dev", &mesh.member.ifname]).contains(&wallet)
    });
    assert!(applied, "the member applied the new service's address {wallet}");
    std::thread::sleep(Duration::from_secs(3)); // a save of where peers were seen, every 2 s
    daemon.assert_running("on a read-only state directory");
    let text = daemon.log_text();
    let said = text.lines().filter(|l| l.contains(" WARN ") && l.contains("read-only")).collect::<Vec<_>>();
    assert_eq!(said.len(), 1, "one warning about the read-only directory: {text}");
    for what in ["member.json", "peer-endpoints.json", "private.key.next", &mesh.member.state.display().to_string()] {
        assert!(said[0].contains(what), "the warning names {what}: {}", said[0]);
    }
    assert_eq!(warnings(&text, "trying again later"), 0, "no warning at each failed save: {text}");
}

#[test]
fn a_hub_on_a_read_only_state_dir_refuses_to_start_naming_it() {
    if !require_root() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let hub = MeshHost::new("hub", tmp.path(), "sd");
    let disk = Tmpfs::mount(&hub.state, "4m");
    let mut init = Command::new(product_bin("meshd"));
    init.args(["init", "--network", "home", "--name", "hub", "--endpoint", "192.0.2.1:51820"]);
    run_ok(init.args(["--interface", &hub.ifname, "--state-dir"]).arg(&hub.state));
    disk.remount(true);
    let out = output(hub.ns.command(product_bin("meshd")).args(["run", "--state-dir"]).arg(&hub.state));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{}", describe(&out));
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    let dir = hub.state.display().to_string();
    assert!(stderr.starts_with("error: ") && stderr.contains(&format!("{dir} is read-only")), "{stderr}");
    assert!(stderr.contains("remount it read-write"), "{stderr}");
    let links = hub.ns.ip(&["link", "show"]);
    assert!(!links.contains(&hub.ifname), "no interface made: {links}");
}

#[test]
fn a_member_restarted_read_only_before_saving_its_confirmed_new_key_runs_on_it() {
    if !require_root() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let mesh = Mesh::new(root, "172.31.164", "1m");
    let old_private = fs::read_to_string(mesh.member.state.join("private.key")).unwrap();
    let mut daemon = mesh.run_member(&root.join("member.log"));
    run_ok(meshctl(&mesh.hub.state).args(["node", "rotate", "member"]));
    let rotated = wait_until(Duration::from_secs(15), || mesh.member_node()["rotate_key"] == false);
    assert!(rotated, "the rotation did not complete:\n{}", daemon.log_text());
    let new_key = mesh.member_node()["public_key"].as_str().unwrap().to_owned();
    assert!(wait_until(Duration::from_secs(5), || !mesh.member.state.join("private.key.next").exists()));
    assert!(daemon.stop(Duration::from_secs(10)).success());
    // As if the power went between the network's confirmation and the rename, and the card then came
    // back read-only: the confirmed key is still `private.key.next`, `private.key` the old one.
    fs::rename(mesh.member.state.join("private.key"), mesh.member.state.join("private.key.next")).unwrap();
    write_private(&mesh.member.state.join("private.key"), &old_private);
    mesh.disk.remount(true);
    let mut daemon = mesh.run_member(&root.join("member-read-only.log"));
    assert!(mesh.hub_peers().contains(&new_key), "the hub has the new key");
    mesh.assert_member_reaches_hub("on the confirmed key from a read-only state directory");
    daemon.assert_running("unable to save its confirmed key");
    let text = daemon.log_text();
    assert_eq!(warnings(&text, "could not be saved as this host's key yet"), 1, "{text}");
    // Writable again: the key is saved within the retry time.
    mesh.disk.remount_writable_for(daemon.pid());
    let saved = wait_until(Duration::from_secs(40), || {
        fs::read_to_string(mesh.member.state.join("private.key")).is_ok_and(|k| wg_pubkey(&k) == new_key)
    });
    assert!(saved, "private.key is not the new key:\n{}", daemon.log_text());
    assert!(!mesh.member.state.join("private.key.next").exists());
}
