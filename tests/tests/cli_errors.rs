//! Bad input to `meshd init` and offline `meshctl`: one `error: ` line, a failure status, nothing changed.
//!
//! No daemon and no root: meshctl opens the state dir itself when no daemon runs on it.

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Command, Output};

use meshd_e2e::{describe, meshctl, output, product_bin, run_json, run_ok};
use serde_json::Value;

/// Every file directly in `dir` (name -> bytes) but lock files; empty when `dir` does not exist.
fn snapshot(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let Ok(entries) = fs::read_dir(dir) else {
        return BTreeMap::new();
    };
    entries
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .filter(|e| !e.file_name().to_string_lossy().ends_with(".lock"))
        .map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            (name, fs::read(e.path()).unwrap_or_default())
        })
        .collect()
}

/// Runs `cmd`, which must fail with one `error: ` line mentioning one of `mentions`, leaving `dir` as it was.
fn assert_refused(cmd: &mut Command, dir: &Path, mentions: &[&str]) {
    let before = snapshot(dir);
    let existed = dir.exists();
    let out = output(cmd);
    check_refusal(cmd, &out, mentions);
    assert_eq!(dir.exists(), existed, "{cmd:?} created or removed {}", dir.display());
    assert_unchanged(cmd, dir, &before);
}

/// Checks a failed run: status 1 (2 for usage errors), one stderr line starting `error: ` naming the problem.
fn check_refusal(cmd: &Command, out: &Output, mentions: &[&str]) {
    assert!(
        matches!(out.status.code(), Some(1) | Some(2)),
        "{cmd:?} should fail with status 1 (or 2 for a usage error): {}",
        describe(out)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.trim_end().lines().collect();
    assert!(
        lines.len() == 1 && lines[0].starts_with("error: "),
        "{cmd:?} should print exactly one line starting `error: ` on stderr: {}",
        describe(out)
    );
    assert!(!lines[0].contains("(\""), "{cmd:?}: the error shows program internals (Debug formatting): {}", lines[0]);
    let line = lines[0].to_lowercase();
    assert!(
        mentions.iter().any(|m| line.contains(&m.to_lowercase())),
        "{cmd:?}: the error should name the problem (one of {mentions:?}): {}",
        lines[0]
    );
}

/// Asserts that every file in `dir` is as in `before`.
fn assert_unchanged(cmd: &Command, dir: &Path, before: &BTreeMap<String, Vec<u8>>) {
    let after = snapshot(dir);
    let changed: Vec<&String> = before.keys().chain(after.keys()).filter(|k| before.get(*k) != after.get(*k)).collect();
    assert!(changed.is_empty(), "{cmd:?} changed {changed:?} in {}", dir.display());
}

/// `meshd init` arguments for network `home`, hub `hub`, with the given extra flags.
fn init_cmd(dir: &Path, extra: &[&str]) -> Command {
    let mut cmd = Command::new(product_bin("meshd"));
    cmd.args(["init", "--network", "home", "--name", "hub", "--endpoint", "192.0.2.1:51820"])
        .arg("--state-dir")
        .arg(dir)
        .args(["--interface", "meshe2e0"])
        .args(extra);
    cmd
}

/// A fresh state dir made by `meshd init` with `extra` flags.
fn init(extra: &[&str]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    run_ok(&mut init_cmd(dir.path(), extra));
    dir
}

/// A fresh state dir with a service `svc` on the hub.
fn init_with_service(extra: &[&str]) -> tempfile::TempDir {
    let dir = init(extra);
    run_ok(meshctl(dir.path()).args(["service", "add", "svc", "--node", "hub", "--target", "127.0.0.1:8080"]));
    dir
}

/// The IPv4 address in a listing entry's `key` (`ip`, `ip/len` or `ip:port`).
fn v4(entry: &Value, key: &str) -> Ipv4Addr {
    let text = entry[key].as_str().unwrap_or_else(|| panic!("no {key:?} in {entry}"));
    let ip = text.split(['/', ':']).next().unwrap();
    ip.parse().unwrap_or_else(|e| panic!("{key} {text:?} is not IPv4: {e}"))
}

#[test]
fn init_rejects_bad_cidr_endpoint_and_names() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for (extra, mention) in [
        (vec!["--cidr", "10.0.0.0/33"], "10.0.0.0/33"),
        (vec!["--cidr", "banana"], "banana"),
        // WireGuard over IPv6 needs 1280; more than jumbo frames is a typo.
        (vec!["--mtu", "1279"], "MTU 1279 is not a number from 1280 to 9000"),
        (vec!["--mtu", "9001"], "MTU 9001 is not a number from 1280 to 9000"),
        (vec!["--mtu", "big"], "MTU big is not a number from 1280 to 9000"),
        // Where meshd's own listeners on mesh addresses are (the join service would take it from them).
        (vec!["--listen-port", "1021"], "port 1021 is meshd's own"),
        (vec!["--listen-port", "0"], "port \"0\" is out of range"),
    ] {
        assert_refused(&mut init_cmd(d, &extra), d, &[mention]);
    }
    for (endpoint, mention) in [
        ("nocolon", "nocolon"),
        ("1.2.3.4:70000", "70000"),
        // Endpoints no phone can reach go into no QR code.
        ("0.0.0.0:51820", "unspecified"),
        ("127.0.0.1:51820", "loopback"),
        ("[::1]:51820", "loopback"),
        ("239.1.2.3:51820", "multicast"),
        ("255.255.255.255:51820", "broadcast"),
        ("localhost:51820", "localhost"),
    ] {
        let mut cmd = Command::new(product_bin("meshd"));
        cmd.args(["init", "--network", "home", "--name", "hub", "--endpoint", endpoint]).arg("--state-dir").arg(d);
        assert_refused(&mut cmd, d, &[mention]);
    }
    let long = "a".repeat(64);
    for (flag, name) in
        [("--network", "bad_name!"), ("--network", long.as_str()), ("--name", "-lead"), ("--name", "bad_name!")]
    {
        let mut cmd = Command::new(product_bin("meshd"));
        let other = if flag == "--network" { "--name" } else { "--network" };
        cmd.args(["init", &format!("{flag}={name}"), other, "ok", "--endpoint", "192.0.2.1:51820"])
            .arg("--state-dir")
            .arg(d);
        assert_refused(&mut cmd, d, &[name]);
    }
    assert!(snapshot(d).is_empty(), "failed inits left files in {}", d.display());
}

#[test]
fn node_update_refuses_bad_endpoints_mtus_and_the_hub_without_an_endpoint() {
    let dir = init(&[]);
    let d = dir.path();
    for (args, mention) in [
        (vec!["hub", "--no-endpoint"], "\"hub\" is the hub"),
        (vec!["ghost", "--endpoint", "192.0.2.9:51820"], "no node named \"ghost\""),
        (vec!["hub", "--endpoint", "nocolon"], "nocolon"),
        (vec!["hub", "--endpoint", "127.0.0.1:51820"], "loopback"),
        (vec!["hub", "--endpoint", "[::]:51820"], "unspecified"),
        (vec!["hub", "--mtu", "1279"], "MTU 1279 is not a number from 1280 to 9000"),
        (vec!["hub"], "nothing to change"),
        (vec!["hub", "--endpoint", "192.0.2.9:51820", "--no-endpoint"], "cannot be used with"),
    ] {
        assert_refused(meshctl(d).args(["node", "update"]).args(&args), d, &[mention]);
    }
    let moved =
        run_ok(meshctl(d).args(["node", "update", "hub", "--endpoint", "hub.example.net:51820", "--mtu", "1340"]));
    assert_eq!(moved.trim(), "node hub: endpoint hub.example.net:51820, mtu 1340");
}

#[test]
fn init_twice_is_refused() {
    let dir = init(&[]);
    assert_refused(&mut init_cmd(dir.path(), &[]), dir.path(), &["already", "exist", "initiali"]);
    let mut other = init_cmd(dir.path(), &["--cidr", "10.5.0.0/16"]);
    assert_refused(&mut other, dir.path(), &["already", "exist", "initiali"]);
}

#[test]
fn service_add_rejects_bad_targets_and_unknown_nodes() {
    let dir = init(&[]);
    let d = dir.path();
    for (target, mention) in
        [("1.2.3.4:70000", "70000"), ("nocolon", "nocolon"), ("1.2.3.4:0", "1.2.3.4:0"), ("1.2.3.4:", "1.2.3.4:")]
    {
        let mut cmd = meshctl(d);
        cmd.args(["service", "add", "web", "--node", "hub", "--target", target]);
        assert_refused(&mut cmd, d, &[mention, "port"]);
    }
    let mut cmd = meshctl(d);
    cmd.args(["service", "add", "web", "--node", "nosuch", "--target", "127.0.0.1:80"]);
    assert_refused(&mut cmd, d, &["nosuch"]);
    let services = run_json(meshctl(d).args(["service", "list", "--json"]));
    assert_eq!(services, serde_json::json!([]), "refused services were stored");
}

#[test]
fn names_must_be_dns_labels() {
    let dir = init_with_service(&[]);
    let d = dir.path();
    let long = "a".repeat(64);
    for name in ["bad_name!", long.as_str(), "UPPER.dot", ""] {
        let mut cmd = meshctl(d);
        cmd.args(["device", "add", "--allow", "svc", "--", name]);
        assert_refused(&mut cmd, d, &[name, "name"]);
        let mut cmd = meshctl(d);
        cmd.args(["service", "add", "--node", "hub", "--target", "127.0.0.1:81", "--", name]);
        assert_refused(&mut cmd, d, &[name, "name"]);
    }
    let mut cmd = meshctl(d);
    cmd.args(["device", "add", "--allow", "svc", "--", "-lead"]);
    assert_refused(&mut cmd, d, &["-lead"]);
    // The longest DNS label is fine.
    let max = "b".repeat(63);
    run_ok(meshctl(d).args(["device", "add", &max, "--allow", "svc"]));
    let devices = run_json(meshctl(d).args(["device", "list", "--json"]));
    assert_eq!(devices.as_array().map(Vec::len), Some(1), "{devices}");
    assert_eq!(devices[0]["name"], max);
}

#[test]
fn names_are_case_insensitive_as_in_dns() {
    let mut init = Command::new(product_bin("meshd"));
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    init.args(["init", "--network", "Home", "--name", "Hub", "--endpoint", "Node.DynDNS.Example:51820"]);
    run_ok(init.args(["--domain", "Home.Internal"]).arg("--state-dir").arg(d));
    run_ok(meshctl(d).args(["service", "add", "Wallet", "--node", "HUB", "--target", "127.0.0.1:9737"]));
    run_ok(meshctl(d).args(["device", "add", "Alice-Phone", "--allow", "WALLET"]));
    let mut cmd = meshctl(d);
    cmd.args(["device", "add", "alice-phone", "--allow", "wallet"]);
    assert_refused(&mut cmd, d, &["already used"]);
    let services = run_json(meshctl(d).args(["service", "list", "--json"]));
    assert_eq!(services[0]["dns_name"], "wallet.home.internal");
    let devices = run_json(meshctl(d).args(["device", "list", "--json"]));
    assert_eq!(devices[0]["name"], "alice-phone");
    let status = run_json(meshctl(d).args(["status", "--json"]));
    assert_eq!(status["nodes"][0]["endpoint"], "node.dyndns.example:51820", "{status}");
}

#[test]
fn names_longer_than_dns_allows_are_refused_when_created() {
    // A 191-character domain: a 63-character name under it would be 255 characters, over DNS's 253.
    let domain = ["d".repeat(63), "e".repeat(63), "f".repeat(63)].join(".");
    let dir = init(&["--domain", &domain]);
    let d = dir.path();
    let long = "a".repeat(63);
    let mut cmd = meshctl(d);
    cmd.args(["service", "add", &long, "--node", "hub", "--target", "127.0.0.1:9090"]);
    assert_refused(&mut cmd, d, &["253"]);
    run_ok(meshctl(d).args(["service", "add", "svc", "--node", "hub", "--target", "127.0.0.1:9090"]));
    let mut cmd = meshctl(d);
    cmd.args(["device", "add", &long, "--allow", "svc"]);
    assert_refused(&mut cmd, d, &["253"]);
    let mut cmd = meshctl(d);
    cmd.args(["node", "invite", &long]);
    assert_refused(&mut cmd, d, &["253"]);
    // The longest name that fits is fine.
    run_ok(meshctl(d).args(["device", "add", &"b".repeat(61), "--allow", "svc"]));
}

#[test]
fn duplicate_names_are_refused() {
    let dir = init_with_service(&[]);
    let d = dir.path();
    let mut cmd = meshctl(d);
    cmd.args(["service", "add", "svc", "--node", "hub", "--target", "127.0.0.1:9090"]);
    assert_refused(&mut cmd, d, &["svc"]);
    run_ok(meshctl(d).args(["device", "add", "phone", "--allow", "svc"]));
    let mut cmd = meshctl(d);
    cmd.args(["device", "add", "phone", "--allow", "svc"]);
    assert_refused(&mut cmd, d, &["phone"]);
}

#[test]
fn unknown_service_in_allow_is_refused() {
    let dir = init_with_service(&[]);
    let d = dir.path();
    for allow in ["nosuch", "svc,nosuch"] {
        let mut cmd = meshctl(d);
        cmd.args(["device", "add", "phone", "--allow", allow]);
        assert_refused(&mut cmd, d, &["nosuch"]);
    }
    let devices = run_json(meshctl(d).args(["device", "list", "--json"]));
    assert_eq!(devices, serde_json::json!([]), "a refused device was stored");
}

#[test]
fn missing_state_dir_is_refused_and_not_created() {
    let parent = tempfile::tempdir().unwrap();
    let missing = parent.path().join("missing");
    for args in [vec!["service", "list"], vec!["device", "add", "phone", "--allow", "svc"], vec!["status", "--json"]] {
        let mut cmd = meshctl(&missing);
        cmd.args(&args);
        assert_refused(&mut cmd, &missing, &[missing.to_str().unwrap(), "state", "init"]);
    }
}

#[test]
fn foreign_state_dirs_are_refused() {
    // Random bytes named meshd.db.
    let random = tempfile::tempdir().unwrap();
    let noise: Vec<u8> = (0..4096u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    fs::write(random.path().join("meshd.db"), noise).unwrap();
    // A real SQLite database of some other program.
    let sqlite = tempfile::tempdir().unwrap();
    {
        let db = rusqlite::Connection::open(sqlite.path().join("meshd.db")).unwrap();
        db.execute_batch(
            "CREATE TABLE photos (id INTEGER PRIMARY KEY, path TEXT); INSERT INTO photos (path) VALUES ('a.jpg');",
        )
        .unwrap();
    }
    // Someone else's files, no database.
    let other = tempfile::tempdir().unwrap();
    fs::write(other.path().join("notes.txt"), "not meshd").unwrap();

    for dir in [random.path(), sqlite.path(), other.path()] {
        for args in [vec!["service", "list", "--json"], vec!["device", "add", "phone", "--allow", "svc"]] {
            let mut cmd = meshctl(dir);
            cmd.args(&args);
            assert_refused(&mut cmd, dir, &["meshd.db", "state", "database", dir.to_str().unwrap()]);
        }
    }
    for dir in [random.path(), sqlite.path()] {
        assert_refused(&mut init_cmd(dir, &[]), dir, &["meshd.db", "exist", "database", dir.to_str().unwrap()]);
    }
}

#[test]
fn exhausted_pool_is_refused() {
    let dir = init_with_service(&["--cidr", "10.9.9.0/29"]);
    let d = dir.path();
    let mut refused_at = None;
    for i in 0..8 {
        let mut cmd = meshctl(d);
        cmd.args(["device", "add", &format!("d{i}"), "--allow", "svc"]);
        let before = snapshot(d);
        let out = output(&mut cmd);
        if out.status.success() {
            continue;
        }
        check_refusal(&cmd, &out, &["pool", "exhausted", "no free", "address", "10.9.9.0/29", "full"]);
        assert_unchanged(&cmd, d, &before);
        refused_at = Some(i);
        break;
    }
    let refused_at = refused_at.expect("a /29 handed out 8 device addresses");
    assert!(refused_at >= 1, "the /29 had no room for even one device");

    let mut used = vec![v4(&run_json(meshctl(d).args(["node", "list", "--json"]))[0], "address")];
    used.push(v4(&run_json(meshctl(d).args(["service", "list", "--json"]))[0], "mesh_address"));
    let devices = run_json(meshctl(d).args(["device", "list", "--json"]));
    used.extend(devices.as_array().unwrap().iter().map(|dev| v4(dev, "address")));
    assert_eq!(devices.as_array().unwrap().len(), refused_at, "{devices}");
    let distinct: HashSet<_> = used.iter().collect();
    assert_eq!(distinct.len(), used.len(), "an address was handed out twice: {used:?}");
    for ip in &used {
        let last = ip.octets()[3];
        assert!(
            ip.octets()[..3] == [10, 9, 9] && (1..=6).contains(&last),
            "{ip} is outside 10.9.9.0/29 or is its network/broadcast address"
        );
    }
}

#[test]
fn concurrent_device_adds_get_distinct_addresses() {
    let dir = init_with_service(&[]);
    let d = dir.path().to_path_buf();
    let workers: Vec<_> = (0..8)
        .map(|i| {
            let d = d.clone();
            std::thread::spawn(move || output(meshctl(&d).args(["device", "add", &format!("d{i}"), "--allow", "svc"])))
        })
        .collect();
    for (i, worker) in workers.into_iter().enumerate() {
        let out = worker.join().unwrap();
        assert!(out.status.success(), "concurrent device add d{i}: {}", describe(&out));
    }
    let devices = run_json(meshctl(&d).args(["device", "list", "--json"]));
    let devices = devices.as_array().expect("device list is an array");
    assert_eq!(devices.len(), 8, "{devices:?}");
    for key in ["address", "address_v6"] {
        let addrs: HashSet<&str> = devices.iter().filter_map(|dev| dev[key].as_str()).collect();
        assert_eq!(addrs.len(), 8, "8 devices but not 8 distinct {key}: {devices:?}");
    }
}

/// `meshd info` (issue 14): the host's place in its network on a controller, one line on a directory holding none,
/// a planted database refused as `meshd run` refuses it; `meshd run --tor-external` refuses what tor could not use.
#[test]
fn meshd_info_and_tor_external_refuse_bad_input_in_one_line() {
    let state = meshd_e2e::init_network(&[]);
    let info = run_ok(Command::new(product_bin("meshd")).arg("info").arg("--state-dir").arg(state.path()));
    for line in
        ["network home", "domain home.internal", "name hub", "role hub", "interface meshd0", "address 10.77.0.1"]
    {
        assert!(info.lines().any(|l| l == line), "{line:?} missing: {info}");
    }
    let json = run_json(Command::new(product_bin("meshd")).args(["info", "--json", "--state-dir"]).arg(state.path()));
    assert_eq!(json["address"], "10.77.0.1");
    assert!(json["address_v6"].as_str().is_some_and(|a| a.ends_with("::1")), "{json}");

    let empty = tempfile::tempdir().unwrap();
    assert_refused(
        Command::new(product_bin("meshd")).arg("info").arg("--state-dir").arg(empty.path()),
        empty.path(),
        &["holds no network"],
    );
    let garbage = tempfile::tempdir().unwrap();
    fs::write(garbage.path().join("member.json"), "{ not json").unwrap();
    fs::set_permissions(garbage.path().join("member.json"), std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .unwrap();
    assert_refused(
        Command::new(product_bin("meshd")).arg("info").arg("--state-dir").arg(garbage.path()),
        garbage.path(),
        &["member.json"],
    );

    assert_refused(
        Command::new(product_bin("meshd"))
            .args(["run", "--tor-external", "tor/onion", "--state-dir"])
            .arg(state.path()),
        state.path(),
        &["--tor-external tor/onion: not an absolute path"],
    );
    assert_refused(
        Command::new(product_bin("meshd"))
            .args(["run", "--tor-external", "/var/lib/tor/meshd/onion", "--tor-binary", "/usr/bin/tor", "--state-dir"])
            .arg(state.path()),
        state.path(),
        &["--tor-binary"],
    );
}
