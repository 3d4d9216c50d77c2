//! Issue 11, point 5: root never acts on what an unprivileged user planted.
//!
//! The README's flow prepares the state directory without root, then runs `sudo meshd run` on it. Here
//! the directory is made as the README's first step leaves it (owned by the user, uid 65534), and that
//! user plants links to a file of root's under the names meshd's temporary files and lock had. `meshd
//! run` as root refuses it in one line that names the directory and says how to fix it, and touches
//! nothing (before the fix it started on it); each step of the fix it names is then taken, until the
//! hub runs. A database edited (by whoever could write it) to carry nftables rules in a node's interface
//! name is refused when read, in one line naming the column: no table is loaded and the host's ruleset
//! is as it was (before the fix, the name was spliced into the script root loads).
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use meshd_e2e::{
    MeshHost, Proc, assert_error_line, describe, meshctl, output, product_bin, require_root, run_json, run_ok,
    wait_until,
};

/// `meshd run` (userspace WireGuard) on `state` inside `host`'s namespace, to completion: it is expected
/// to refuse at once.
fn run_refused(host: &MeshHost, state: &Path) -> std::process::Output {
    let mut cmd = host.ns.command("timeout");
    cmd.args(["20", product_bin("meshd").to_str().unwrap(), "run", "--wireguard", "userspace", "--state-dir"]);
    output(cmd.arg(state))
}

/// `chown -R uid:uid path`.
fn chown_tree(path: &Path, uid: u32) {
    run_ok(Command::new("chown").arg("-R").arg(format!("{uid}:{uid}")).arg(path));
}

#[test]
fn a_state_directory_another_user_prepared_is_refused_until_root_owns_it() {
    if !require_root() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o755)).unwrap();
    // The user's working directory and the state the README's first step leaves there.
    let home = tmp.path().join("home");
    fs::create_dir(&home).unwrap();
    let hub = MeshHost::new("hub", &home, "ps");
    hub.ns.ip(&["link", "set", "lo", "up"]);
    hub.init_hub("192.0.2.1:51820", &[]);
    chown_tree(&home, 65534);
    // A file of root's, and the user's links to it under every name meshd once wrote through.
    let roots = tmp.path().join("roots-file");
    fs::write(&roots, "root's own\n").unwrap();
    fs::set_permissions(&roots, fs::Permissions::from_mode(0o600)).unwrap();
    let planted = [".peer-endpoints.json.tmp", ".member.json.tmp", ".private.key.next.tmp", "meshd.lock"];
    for name in planted {
        let mut ln = Command::new("setpriv");
        ln.args(["--reuid=65534", "--regid=65534", "--clear-groups", "ln", "-s"]).arg(&roots).arg(hub.state.join(name));
        run_ok(&mut ln);
    }
    // And a FIFO where the hub reads at start (where its peers were last seen): an open of it would block.
    let mut fifo = Command::new("setpriv");
    fifo.args(["--reuid=65534", "--regid=65534", "--clear-groups", "mkfifo", "-m", "600"]);
    run_ok(fifo.arg(hub.state.join("peer-endpoints.json")));

    // As the README's next step was: refused, naming the user's directory above it and the whole fix.
    let out = run_refused(&hub, &hub.state);
    assert_error_line(&out, &[&home.display().to_string(), "is owned by uid 65534", "sudo cp -RT", "/var/lib/meshd"]);
    assert_eq!(fs::read_to_string(&roots).unwrap(), "root's own\n", "root's file was written through a link");
    assert_eq!(fs::metadata(&roots).unwrap().mode() & 0o777, 0o600);
    assert!(!hub.ns.exec(&["ip", "link", "show", &hub.ifname]).status.success(), "an interface was made");

    // Moved where only root can change it (as /var/lib/meshd), but still the user's: refused, with a copy.
    let moved = tmp.path().join("var-lib-meshd");
    run_ok(Command::new("mv").arg("-T").arg(&hub.state).arg(&moved));
    let out = run_refused(&hub, &moved);
    let shown = moved.display().to_string();
    let fix = format!(
        "`sudo cp -RT {shown} {shown}.new && sudo chown -R root: {shown}.new && sudo rm -rf {shown} && sudo mv -T \
         {shown}.new {shown}`"
    );
    assert_error_line(&out, &[&shown, "is owned by uid 65534, not by root who runs meshd", &fix]);

    // The fix it names (root already). The links are still there, copied as links: each is refused by
    // name, and not followed.
    let fix = fix.trim_matches('`').replace("sudo ", "");
    run_ok(Command::new("sh").args(["-c", &fix]));
    let out = run_refused(&hub, &moved);
    assert_error_line(&out, &["is a symbolic link", "remove it"]);
    for name in planted {
        fs::remove_file(moved.join(name)).unwrap();
    }
    // The copy made the FIFO again, root's own: refused at once, not a start that hangs.
    let started = std::time::Instant::now();
    let out = run_refused(&hub, &moved);
    assert_error_line(&out, &["peer-endpoints.json is a FIFO, not a file", "remove it"]);
    assert!(started.elapsed() < Duration::from_secs(10), "took {:?}", started.elapsed());
    fs::remove_file(moved.join("peer-endpoints.json")).unwrap();
    // Writable by others, it could be planted in again.
    fs::set_permissions(&moved, fs::Permissions::from_mode(0o777)).unwrap();
    let out = run_refused(&hub, &moved);
    assert_error_line(&out, &[&shown, "is writable by other users (mode 777)", "chmod go-w"]);
    fs::set_permissions(&moved, fs::Permissions::from_mode(0o700)).unwrap();
    assert_eq!(fs::read_to_string(&roots).unwrap(), "root's own\n");

    // Now root's own, where only root can change it: the hub runs.
    let mut cmd = hub.ns.command(product_bin("meshd"));
    cmd.args(["run", "--wireguard", "userspace", "--state-dir"]).arg(&moved);
    let mut daemon = Proc::spawn_logged(cmd, "meshd run", &tmp.path().join("hub.log"));
    let ready = wait_until(Duration::from_secs(60), || {
        daemon.assert_running("starting on a state directory root owns");
        std::os::unix::net::UnixStream::connect(moved.join("meshd.sock")).is_ok()
    });
    assert!(ready, "the hub did not come up:\n{}", daemon.log_text());
    let nodes = run_json(meshctl(&moved).args(["node", "list", "--json"]));
    assert_eq!(nodes[0]["name"], "hub", "{nodes}");
    assert_eq!(fs::read_to_string(&roots).unwrap(), "root's own\n");
}

#[test]
fn an_interface_name_edited_into_the_database_loads_nothing_and_leaves_the_firewall_as_it_was() {
    if !require_root() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let hub = MeshHost::new("hub", tmp.path(), "pi");
    hub.ns.ip(&["link", "set", "lo", "up"]);
    hub.init_hub("192.0.2.1:51820", &[]);
    // The host's own firewall, which a `flush ruleset` would take away.
    hub.ns.run(&["nft", "add", "table", "inet", "host_own"]);
    hub.ns.run(&[
        "nft",
        "add",
        "chain",
        "inet",
        "host_own",
        "input",
        "{ type filter hook input priority 0; policy accept; }",
    ]);
    hub.ns.run(&["nft", "add", "rule", "inet", "host_own", "input", "tcp", "dport", "22", "accept"]);
    let before = hub.ns.run(&["nft", "list", "ruleset"]);

    // A name that, spliced into the script root loads, makes every rule that names the interface valid
    // nftables still, with one rule more before it: `iifname != "x" drop`, which cuts the host off from
    // everything but the mesh (SSH included).
    let injected = "x\" drop; iifname \"x";
    let db = rusqlite::Connection::open(hub.state.join("meshd.db")).unwrap();
    db.execute("UPDATE nodes SET interface = ?1 WHERE name = 'hub'", [injected]).unwrap();
    drop(db);

    let out = run_refused(&hub, &hub.state);
    assert_error_line(&out, &["nodes.interface", "drop; iifname", "is invalid"]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let after = hub.ns.run(&["nft", "list", "ruleset"]);
    assert_eq!(after, before, "the host's ruleset changed");
    // meshctl working on the database refuses it the same way.
    let out = output(meshctl(&hub.state).args(["node", "list"]));
    assert_error_line(&out, &["nodes.interface", "drop; iifname"]);
}
