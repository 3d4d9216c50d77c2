//! Issue 13's acceptance tests: services served as Tor onion services by their node's own supervised `tor`.
//!
//! `meshd_keys_are_what_tor_reads`: the address `meshd` computes from the key it wrote equals the
//! `hostname` that Debian's tor derives from that key (tor runs with `DisableNetwork 1`); the address stays
//! across restarts and re-exposure; bad input changes nothing.
//!
//! `onion_round_trip_with_client_authorization`: a private Tor network offline in one namespace (three
//! directory authorities, three relays, client tors), the hub's supervised tor part of it through
//! `--tor-config`. Only a client holding a handed-out key reaches the service; the supervised tor comes back
//! after a SIGKILL; a client taken off is refused by a fresh client tor while the other client still gets in.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use meshd_e2e::{
    MeshHost, Netns, Proc, TorNetwork, assert_refused, children_named, describe, files_under, meshctl, output,
    product_bin, require_root, router, run_json, run_ok, uplink, wait_until,
};
use serde_json::Value;

const WEB_TARGET: &str = "127.0.0.1:18080";
const BODY: &str = "wallet served over an onion service\n";

/// The service `name` of `meshctl service list --json`.
fn service(state: &Path, name: &str) -> Value {
    let list = run_json(meshctl(state).args(["service", "list", "--json"]));
    list.as_array().expect("a JSON array").iter().find(|s| s["name"] == name).cloned().expect("the service is listed")
}

/// The onion address `service list` shows for `name`, once its node has reported it.
fn onion_address(state: &Path, name: &str) -> String {
    let mut address = None;
    let reported = wait_until(Duration::from_secs(30), || {
        address = service(state, name)["tor"]["address"].as_str().map(str::to_string);
        address.is_some()
    });
    assert!(reported, "no onion address reported for {name}: {}", service(state, name));
    address.unwrap()
}

/// PIDs of the `tor` processes whose parent is `parent`.
fn tor_children(parent: u32) -> Vec<u32> {
    children_named(parent, "tor")
}

/// A `--tor-config` file in `dir` that keeps tor offline (it still writes its keys and `hostname`).
fn offline_torrc(dir: &Path) -> PathBuf {
    let path = dir.join("offline.torrc");
    fs::write(&path, "DisableNetwork 1\n").unwrap();
    path
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).permissions().mode() & 0o777
}

/// A fake `tor` that reports `version` (e.g. `0.3.4.1`) and does nothing else.
fn fake_tor(dir: &Path, version: &str) -> PathBuf {
    let path = dir.join(format!("tor-{version}"));
    fs::write(&path, format!("#!/bin/sh\necho 'Tor version {version}.'\n")).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
    path
}

#[test]
fn meshd_keys_are_what_tor_reads() {
    if !require_root() {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let hub = MeshHost::new("hub", root.path(), "onk");
    hub.init_hub("10.250.0.1:51820", &[]);
    let offline = offline_torrc(root.path());
    let offline = offline.to_str().unwrap();

    // A tor that is missing or too old is refused when the daemon starts, in one line.
    for (binary, mentions) in [
        (root.path().join("no-such-tor"), vec!["--tor-binary", "no tor at"]),
        (fake_tor(root.path(), "0.3.4.1"), vec!["--tor-binary", "0.3.4.1", "0.3.5.7"]),
    ] {
        let mut run = Command::new(product_bin("meshd"));
        run.args(["run", "--wireguard", "userspace", "--tor-binary"]).arg(&binary).arg("--state-dir").arg(&hub.state);
        let out = output(&mut run);
        assert_refused(&out, &mentions.iter().map(|s| &**s).collect::<Vec<_>>());
    }

    // One that never answers `--version` is given up on (and killed with what it started); a --tor-config file
    // that other users may write, or a FIFO, is refused (its lines would run root's tor).
    let hanging = root.path().join("tor-hangs");
    fs::write(&hanging, "#!/bin/sh\nsleep 1000\n").unwrap();
    fs::set_permissions(&hanging, fs::Permissions::from_mode(0o755)).unwrap();
    let shared = root.path().join("shared.torrc");
    fs::write(&shared, "DisableNetwork 1\n").unwrap();
    fs::set_permissions(&shared, fs::Permissions::from_mode(0o666)).unwrap();
    let fifo = root.path().join("fifo.torrc");
    run_ok(Command::new("mkfifo").arg(&fifo));
    for (flag, path, mentions) in [
        ("--tor-binary", &hanging, vec!["no answer within 5 s"]),
        ("--tor-config", &shared, vec!["other users", "666"]),
        ("--tor-config", &fifo, vec!["not a regular file"]),
    ] {
        let started = Instant::now();
        let mut run = Command::new(product_bin("meshd"));
        run.args(["run", "--wireguard", "userspace", flag]).arg(path).arg("--state-dir").arg(&hub.state);
        assert_refused(&output(&mut run), &mentions);
        assert!(started.elapsed() < Duration::from_secs(10), "{flag} {} took {:?}", path.display(), started.elapsed());
    }
    let sleeping = String::from_utf8_lossy(&output(Command::new("pgrep").args(["-c", "-f", "sleep 1000"])).stdout)
        .trim()
        .to_string();
    assert_eq!(sleeping, "0", "the hanging tor's child was left behind");

    let log = root.path().join("hub.log");
    let mut daemon = hub.run_hub_with(&log, &["--tor-config", offline]);
    run_ok(meshctl(&hub.state).args(["service", "add", "web", "--node", "hub", "--target", WEB_TARGET]));
    run_ok(meshctl(&hub.state).args(["device", "add", "phone", "--allow", "web", "--conf", "-"]));

    // Bad input: refused in one line, nothing stored, no file written.
    let tor_dir = hub.state.join("tor");
    // Exit status 2 for what the command line cannot be (meshd's and meshctl's usage errors), 1 for the rest.
    for (args, code, mentions) in [
        (vec!["expose", "web", "--tor", "--port", "70000"], 2, vec!["70000", "out of range"]),
        (vec!["expose", "web", "--tor", "--port", "0"], 2, vec!["\"0\" is out of range"]),
        (vec!["expose", "web", "--out-dir", "/tmp"], 2, vec!["not provided", "--tor"]),
        (
            vec!["expose", "web", "--https", "web.shop.example", "--relay", "hub", "--client", "phone"],
            2,
            vec!["--client"],
        ),
        (vec!["expose", "web", "--tor", "--client", "ghost"], 1, vec!["ghost"]),
        (vec!["expose", "nothing", "--tor"], 1, vec!["nothing"]),
        (vec!["unexpose", "web", "--tor"], 1, vec!["web", "not an onion service"]),
    ] {
        let out = output(meshctl(&hub.state).args(&args));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{args:?}: {}", describe(&out));
        assert_eq!(stderr.lines().count(), 1, "{args:?}: one line: {stderr}");
        assert!(stderr.starts_with("error: ") && mentions.iter().all(|m| stderr.contains(m)), "{args:?}: {stderr}");
        assert_eq!(service(&hub.state, "web")["tor"], Value::Null, "{args:?} changed the service");
        assert!(!tor_dir.exists(), "{args:?} wrote {}", tor_dir.display());
    }

    run_ok(meshctl(&hub.state).args(["expose", "web", "--tor", "--port", "80"]));
    let address = onion_address(&hub.state, "web");
    assert!(address.ends_with(".onion") && address.len() == 62, "not a v3 onion address: {address}");
    let web = service(&hub.state, "web");
    assert_eq!(web["tor"]["port"], 80, "{web}");
    assert_eq!(web["tor"]["authorized_only"], false, "{web}");
    let table = run_ok(meshctl(&hub.state).args(["service", "list"]));
    assert!(table.contains(&format!("http://{address}/")) && table.contains("anyone with the address"), "{table}");
    let with_qr = run_ok(meshctl(&hub.state).args(["service", "list", "--qr"]));
    let qr_lines = with_qr.lines().skip_while(|l| !l.starts_with(&format!("web (http://{address}/):"))).skip(1);
    assert!(qr_lines.take_while(|l| !l.is_empty()).filter(|l| l.contains('\u{2580}')).count() > 10, "{with_qr}");

    // The supervised tor, offline, derives the hostname from the key meshd wrote.
    let service_dir = tor_dir.join("onion/web");
    let hostname = service_dir.join("hostname");
    let written = wait_until(Duration::from_secs(20), || hostname.exists());
    assert!(written, "tor wrote no hostname in {}; meshd's log:\n{}", service_dir.display(), daemon.log_text());
    assert_eq!(fs::read_to_string(&hostname).unwrap().trim(), address, "tor derives another address");
    assert_eq!(tor_children(daemon.pid()).len(), 1, "meshd supervises one tor");
    for dir in [&tor_dir, &tor_dir.join("data"), &tor_dir.join("onion"), &service_dir] {
        assert_eq!(mode(dir), 0o700, "{}", dir.display());
    }
    let secret = service_dir.join("hs_ed25519_secret_key");
    for file in [&secret, &service_dir.join("hs_ed25519_public_key"), &tor_dir.join("torrc")] {
        assert_eq!(mode(file), 0o600, "{}", file.display());
    }
    let secret_bytes = fs::read(&secret).unwrap();
    assert_eq!(secret_bytes.len(), 96);
    assert!(secret_bytes.starts_with(b"== ed25519v1-secret: type0 =="));
    let torrc = fs::read_to_string(tor_dir.join("torrc")).unwrap();
    assert!(torrc.contains("HiddenServicePoWDefensesEnabled 1"), "tor 0.4.9 has PoW; torrc:\n{torrc}");
    assert!(torrc.contains("DisableNetwork 1"), "--tor-config lines are appended; torrc:\n{torrc}");
    assert!(!log.exists() || !fs::read_to_string(&log).unwrap().contains("ed25519v1-secret"));

    // The same address after a restart of meshd, and after being taken off Tor and served again.
    daemon.stop(Duration::from_secs(10));
    let mut daemon = hub.run_hub_with(&log, &["--tor-config", offline]);
    assert_eq!(onion_address(&hub.state, "web"), address);
    run_ok(meshctl(&hub.state).args(["unexpose", "web", "--tor"]));
    assert_eq!(service(&hub.state, "web")["tor"], Value::Null);
    let stopped = wait_until(Duration::from_secs(15), || tor_children(daemon.pid()).is_empty());
    assert!(stopped, "tor still runs with nothing to serve");
    run_ok(meshctl(&hub.state).args(["expose", "web", "--tor"]));
    assert_eq!(onion_address(&hub.state, "web"), address, "serving it again changed its address");
    assert_eq!(fs::read(&secret).unwrap(), secret_bytes, "the key was rewritten");

    // The same through a declaration file: a client added, its line written once the address is known.
    let file = root.path().join("network.toml");
    let declare = |tor: &str| {
        let text = format!(
            "[[service]]\nname = \"web\"\nnode = \"hub\"\ntarget = \"{WEB_TARGET}\"\n{tor}\n\
             [[device]]\nname = \"phone\"\nallow = [\"web\"]\n"
        );
        fs::write(&file, text).unwrap();
    };
    let keys = root.path().join("keys");
    fs::create_dir(&keys).unwrap();
    let apply = || run_ok(meshctl(&hub.state).arg("apply").arg(&file).arg("--out-dir").arg(&keys));
    declare("tor = { port = 80, clients = [\"phone\"] }");
    let applied = apply();
    assert!(applied.contains("+ expose web over Tor: port 18080 -> 80, clients phone"), "{applied}");
    let line_file = keys.join("phone.web.auth_private");
    assert!(applied.contains(&line_file.display().to_string()), "{applied}");
    assert_eq!(mode(&line_file), 0o600);
    let line = fs::read_to_string(&line_file).unwrap();
    let prefix = format!("{}:descriptor:x25519:", address.trim_end_matches(".onion"));
    assert!(line.starts_with(&prefix) && line.trim().len() == prefix.len() + 52, "{line}");
    let scanned =
        run_ok(Command::new("zbarimg").args(["--raw", "-q", "-Sbinary"]).arg(keys.join("phone.web.auth_private.png")));
    assert_eq!(scanned.trim(), line.trim());
    let client_file = service_dir.join("authorized_clients/phone.auth");
    let listed = wait_until(Duration::from_secs(10), || client_file.exists());
    assert!(listed, "the service's node did not list the client");
    assert!(
        !fs::read_to_string(&client_file).unwrap().contains(&line[prefix.len()..]),
        "the private key reached the node"
    );
    assert_eq!(service(&hub.state, "web")["tor"]["clients"], serde_json::json!(["phone"]));
    assert!(apply().contains("no changes"), "a second apply changes nothing");
    // A line file in the way is refused before anything changes.
    declare("tor = { port = 80, clients = [\"phone\"] }");
    run_ok(meshctl(&hub.state).args(["unexpose", "web", "--tor", "--client", "phone"]));
    let out = output(meshctl(&hub.state).arg("apply").arg(&file).arg("--out-dir").arg(&keys));
    assert_refused(&out, &["phone.web.auth_private"]);
    assert_eq!(
        service(&hub.state, "web")["tor"]["clients"],
        serde_json::json!([]),
        "a refused apply changed the network"
    );
    declare("");
    let applied = apply();
    assert!(applied.contains("- unexpose web from Tor"), "{applied}");
    assert_eq!(service(&hub.state, "web")["tor"], Value::Null);

    // With --json, standard output is the service record alone; the line goes to standard error. A key file in
    // the way is refused before anything changes.
    let out = output(
        meshctl(&hub.state).args(["--json", "expose", "web", "--tor", "--client", "phone", "--out-dir"]).arg(&keys),
    );
    assert!(out.status.success(), "{}", describe(&out));
    let record: Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}", describe(&out)));
    assert_eq!(record["tor"]["clients"], serde_json::json!(["phone"]));
    let line = fs::read_to_string(keys.join("phone.auth_private")).unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains(line.trim()), "{}", describe(&out));
    run_ok(meshctl(&hub.state).args(["unexpose", "web", "--tor", "--client", "phone"]));
    let again =
        output(meshctl(&hub.state).args(["expose", "web", "--tor", "--client", "phone", "--out-dir"]).arg(&keys));
    assert_refused(&again, &["phone.auth_private"]);
    assert_eq!(service(&hub.state, "web")["tor"]["clients"], serde_json::json!([]));
    assert_eq!(fs::read_to_string(keys.join("phone.auth_private")).unwrap(), line, "the old line was replaced");
    run_ok(meshctl(&hub.state).args(["unexpose", "web", "--tor"]));

    // A tor that exits at start (a bad --tor-config line): meshd keeps serving the mesh and says why.
    daemon.stop(Duration::from_secs(10));
    let bad = root.path().join("bad.torrc");
    fs::write(&bad, "NoSuchOption 1\n").unwrap();
    let mut daemon = hub.run_hub_with(&log, &["--tor-config", bad.to_str().unwrap()]);
    run_ok(meshctl(&hub.state).args(["expose", "web", "--tor"]));
    let mut error = String::new();
    let told = wait_until(Duration::from_secs(20), || {
        error = service(&hub.state, "web")["tor"]["error"].as_str().unwrap_or_default().to_string();
        !error.is_empty()
    });
    assert!(told && error.contains("tor exited") && error.contains("NoSuchOption"), "{error:?}");
    let table = run_ok(meshctl(&hub.state).args(["service", "list"]));
    assert!(table.contains("cannot serve: tor exited"), "{table}");
    daemon.assert_running("serving");
}

/// A static HTTP server on [`WEB_TARGET`] in `ns`, serving [`BODY`] as its index page.
fn web_server(ns: &Netns, dir: &Path) -> Proc {
    fs::create_dir_all(dir).unwrap();
    fs::write(dir.join("index.html"), BODY).unwrap();
    let (ip, port) = WEB_TARGET.split_once(':').unwrap();
    let server =
        ns.spawn(&["/usr/bin/python3", "-m", "http.server", port, "--bind", ip, "--directory", dir.to_str().unwrap()]);
    let up = wait_until(Duration::from_secs(30), || ns.http_get(&format!("http://{WEB_TARGET}/"), 2).is_some());
    assert!(up, "the web server did not start");
    server
}

/// Fetch `url` (expecting [`BODY`]) through fresh client tors holding `auth_private`, one after another (each
/// tries for 30 s) until one does or `timeout` passes: a descriptor only just published, or one a client
/// cached before, must not decide the outcome. Returns how many tors it took.
fn fetch_with_fresh_tors(
    network: &mut TorNetwork,
    ns: &Netns,
    auth_private: &str,
    url: &str,
    timeout: Duration,
) -> Option<u32> {
    let mut attempts = 0;
    let fetched = wait_until(timeout, || {
        attempts += 1;
        let mut client = network.client(ns, &[("client", auth_private)]);
        client.get_within(ns, url, Duration::from_secs(30)).as_deref() == Some(BODY)
    });
    fetched.then_some(attempts)
}

#[test]
fn onion_round_trip_with_client_authorization() {
    if !require_root() {
        return;
    }
    let started = Instant::now();
    let root = tempfile::tempdir().unwrap();
    let hub = MeshHost::new("hub", root.path(), "ont");
    let ns = &hub.ns;
    let mut network = TorNetwork::start(ns, &root.path().join("tornet"));
    let _web = web_server(ns, &root.path().join("www"));
    hub.init_hub("10.250.1.1:51820", &[]);
    let test_network = root.path().join("test-network.torrc");
    fs::write(&test_network, network.config_lines()).unwrap();
    let log = root.path().join("hub.log");
    let daemon = hub.run_hub_with(&log, &["--tor-config", test_network.to_str().unwrap()]);
    run_ok(meshctl(&hub.state).args(["service", "add", "wallet", "--node", "hub", "--target", WEB_TARGET]));
    for device in ["phone", "laptop", "tablet"] {
        run_ok(meshctl(&hub.state).args(["device", "add", device, "--allow", "wallet", "--conf", "-"]));
    }

    // Expose with two clients; each key handed out once, as a file and a QR code.
    let keys = root.path().join("keys");
    // A directory that is not there is refused before anything changes.
    let refused =
        output(meshctl(&hub.state).args(["expose", "wallet", "--tor", "--client", "phone", "--out-dir"]).arg(&keys));
    assert_refused(&refused, &["is not a directory"]);
    assert_eq!(service(&hub.state, "wallet")["tor"], Value::Null);
    fs::create_dir(&keys).unwrap();
    let out = run_ok(
        meshctl(&hub.state)
            .args(["expose", "wallet", "--tor", "--port", "80"])
            .args(["--client", "phone", "--client", "laptop", "--client", "tablet", "--out-dir"])
            .arg(&keys),
    );
    let address = onion_address(&hub.state, "wallet");
    let wallet = service(&hub.state, "wallet");
    assert_eq!(wallet["tor"]["clients"], serde_json::json!(["laptop", "phone", "tablet"]), "{wallet}");
    assert_eq!(wallet["tor"]["authorized_only"], true, "{wallet}");
    let mut lines = Vec::new();
    for device in ["phone", "laptop", "tablet"] {
        let file = keys.join(format!("{device}.auth_private"));
        assert_eq!(mode(&file), 0o600);
        let line = fs::read_to_string(&file).unwrap().trim().to_string();
        let prefix = format!("{}:descriptor:x25519:", address.trim_end_matches(".onion"));
        assert!(line.starts_with(&prefix) && line.len() == prefix.len() + 52, "not a client auth line: {line}");
        let png = keys.join(format!("{device}.auth_private.png"));
        let scanned = run_ok(Command::new("zbarimg").args(["--raw", "-q", "-Sbinary"]).arg(&png));
        assert_eq!(scanned.trim(), line, "the QR code holds another line");
        assert!(!fs::read_to_string(&log).unwrap().contains(&line[prefix.len()..]), "a client key was logged");
        // Handed out once: no file of the hub holds the private key (the database keeps the public half only).
        let secret = &line[prefix.len()..];
        for file in files_under(&hub.state) {
            let bytes = fs::read(&file).unwrap_or_default();
            assert!(
                !String::from_utf8_lossy(&bytes).contains(secret),
                "{} holds a client's private key",
                file.display()
            );
        }
        lines.push(line);
    }
    assert!(lines.iter().all(|l| out.contains(l.as_str())), "the lines are printed once too: {out}");
    let url = format!("http://{address}/");

    // With its key, the phone's tor reaches the service; without one, a tor finds the descriptor but cannot
    // read it.
    let attempts = fetch_with_fresh_tors(&mut network, ns, &lines[0], &url, Duration::from_secs(120));
    assert!(
        attempts.is_some(),
        "the phone did not reach the service; meshd's log:\n{}",
        fs::read_to_string(&log).unwrap()
    );
    eprintln!("first onion fetch after {:?} ({attempts:?} fresh tors)", started.elapsed());
    let mut stranger = network.client(ns, &[]);
    assert_eq!(stranger.get(ns, &url, Duration::from_secs(20)), None, "a tor without a key reached the service");
    assert!(stranger.log_text().to_lowercase().contains("client authorization"), "{}", stranger.log_text());
    drop(stranger);

    // meshd brings its tor back after a crash, and the phone gets in again.
    let before = tor_children(daemon.pid());
    assert_eq!(before.len(), 1, "meshd supervises one tor");
    // SAFETY: kill(2) on the PID of the tor meshd started, read from /proc just now.
    unsafe { libc::kill(before[0] as libc::pid_t, libc::SIGKILL) };
    let restarted = wait_until(Duration::from_secs(30), || {
        let now = tor_children(daemon.pid());
        now.len() == 1 && now != before
    });
    assert!(restarted, "meshd did not start tor again");
    // A tor that cached the old descriptor asks the directories again only after its introductions fail, and
    // each directory once per 15 minutes (tor's client rule): a fresh tor shows the service back.
    let attempts = fetch_with_fresh_tors(&mut network, ns, &lines[0], &url, Duration::from_secs(120));
    assert!(attempts.is_some(), "the phone did not get in after tor came back");

    // Take the phone off: a new descriptor without it. A fresh tor with the laptop's key gets in, one with the
    // phone's key finds the descriptor and cannot read it.
    // tor numbers descriptors by the second they are uploaded in: a reload in the very second of the restarted
    // tor's own first upload (which meshd does not see) is kept out by the directories. Seen once here, two
    // seconds after the restart; DESIGN.md says so. Revocation is checked on a settled service.
    std::thread::sleep(Duration::from_secs(10));
    let serving = tor_children(daemon.pid());
    // Two clients taken off within a second: both descriptors must reach the directories (tor numbers them by
    // the second; meshd spaces its reloads).
    run_ok(meshctl(&hub.state).args(["unexpose", "wallet", "--tor", "--client", "phone"]));
    run_ok(meshctl(&hub.state).args(["unexpose", "wallet", "--tor", "--client", "tablet"]));
    let wallet = service(&hub.state, "wallet");
    assert_eq!(wallet["tor"]["clients"], serde_json::json!(["laptop"]), "{wallet}");
    let authorized = hub.state.join("tor/onion/wallet/authorized_clients");
    let gone = wait_until(Duration::from_secs(10), || {
        !authorized.join("phone.auth").exists() && !authorized.join("tablet.auth").exists()
    });
    assert!(gone && authorized.join("laptop.auth").exists(), "the service's client list was not rewritten");
    assert_eq!(tor_children(daemon.pid()), serving, "tor was restarted rather than reloaded");
    // Until the service's tor has published the new descriptor (new introduction points first: seconds), the
    // directories still hand out the old one; a fresh tor with the phone's key must be refused within a minute.
    let unexposed = Instant::now();
    let mut attempts = 0;
    let refused = wait_until(Duration::from_secs(90), || {
        attempts += 1;
        let mut revoked = network.client(ns, &[("tablet", &lines[2])]);
        revoked.get(ns, &url, Duration::from_secs(20)).is_none()
            && revoked.log_text().to_lowercase().contains("client authorization")
    });
    assert!(refused, "a fresh tor with the key removed second still gets in after 90 s ({attempts} tries)");
    eprintln!("the tablet removed second refused {:?} after the unexpose ({attempts} fresh tors)", unexposed.elapsed());
    let mut revoked = network.client(ns, &[("phone", &lines[0])]);
    assert_eq!(revoked.get(ns, &url, Duration::from_secs(20)), None, "the removed phone still gets in");
    assert!(revoked.log_text().to_lowercase().contains("client authorization"), "{}", revoked.log_text());
    let attempts = fetch_with_fresh_tors(&mut network, ns, &lines[1], &url, Duration::from_secs(60));
    assert!(attempts.is_some(), "the laptop lost access with the phone");

    // Removing the device takes it off too: with no client left, the service is not served.
    run_ok(meshctl(&hub.state).args(["device", "remove", "laptop"]));
    let wallet = service(&hub.state, "wallet");
    assert_eq!(wallet["tor"]["clients"], serde_json::json!([]), "{wallet}");
    let stopped = wait_until(Duration::from_secs(15), || tor_children(daemon.pid()).is_empty());
    assert!(stopped, "tor still serves a service nobody may find");
    network.assert_running();
    eprintln!("onion round trip done after {:?}", started.elapsed());
}

#[test]
fn a_members_onion_service_is_its_own_and_reported_to_the_hub() {
    if !require_root() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let router = router("router");
    let hub = MeshHost::new("hub", root, "onm");
    let home = MeshHost::new("home", root, "onm");
    for (i, host) in [&hub, &home].into_iter().enumerate() {
        uplink(&router, &host.ns, &format!("172.31.23{i}"));
    }
    hub.init_hub("172.31.230.2:51820", &[]);
    let _hub_daemon = hub.run_hub(&root.join("hub.log"));
    let token = run_ok(meshctl(&hub.state).args(["node", "invite", "home"]));
    let joined = home.join(token.trim(), &home.state, Some("172.31.231.2:51820"));
    assert!(joined.status.success(), "join: {}", describe(&joined));
    let offline = offline_torrc(root);
    let home_log = root.join("home.log");
    let mut home_daemon = home.run_daemon_with(&home_log, &["--tor-config", offline.to_str().unwrap()]);
    run_ok(meshctl(&hub.state).args(["service", "add", "btcpay", "--node", "home", "--target", WEB_TARGET]));
    run_ok(meshctl(&hub.state).args(["device", "add", "phone", "--allow", "btcpay", "--conf", "-"]));

    // The member makes the key and runs tor; the hub's list shows what the member reported, which is what tor
    // derives from the member's key. The hub runs no tor: nothing of its own is served over Tor.
    let out = run_ok(meshctl(&hub.state).args(["expose", "btcpay", "--tor", "--client", "phone"]));
    let address = onion_address(&hub.state, "btcpay");
    assert!(out.contains(address.trim_end_matches(".onion")), "the client line: {out}");
    let hostname = home.state.join("tor/onion/btcpay/hostname");
    let written = wait_until(Duration::from_secs(20), || hostname.exists());
    assert!(written, "no tor on the member wrote {}; its log:\n{}", hostname.display(), home_daemon.log_text());
    assert_eq!(fs::read_to_string(&hostname).unwrap().trim(), address);
    assert!(!hub.state.join("tor").exists(), "the hub wrote Tor files for a member's service");
    assert!(home.state.join("tor/onion/btcpay/authorized_clients/phone.auth").exists());

    // A restarted member keeps the address (SIGKILL: its tor exits by itself, as meshd's owned child).
    let tor = tor_children(home_daemon.pid());
    assert_eq!(tor.len(), 1, "the member supervises one tor");
    home_daemon.kill_hard();
    let gone = wait_until(Duration::from_secs(30), || !Path::new(&format!("/proc/{}", tor[0])).exists());
    assert!(gone, "the member's tor outlived its meshd");
    let home_daemon = home.run_daemon_with(&home_log, &["--tor-config", offline.to_str().unwrap()]);
    let restarted = wait_until(Duration::from_secs(30), || tor_children(home_daemon.pid()).len() == 1);
    assert!(restarted, "the restarted member did not start tor again");
    assert_eq!(onion_address(&hub.state, "btcpay"), address);

    // A member whose tor is too old says so, and the hub shows it; adding a client then fails and changes nothing.
    drop(home_daemon);
    // The `tor` on its PATH is an old one until `upgraded` exists, then Debian's.
    let fake_bin = root.join("bin");
    fs::create_dir(&fake_bin).unwrap();
    let upgraded = root.join("upgraded");
    let script = format!(
        "#!/bin/sh\nif [ -e {} ]; then exec /usr/bin/tor \"$@\"; fi\necho 'Tor version 0.3.0.1.'\n",
        upgraded.display()
    );
    fs::write(fake_bin.join("tor"), script).unwrap();
    fs::set_permissions(fake_bin.join("tor"), fs::Permissions::from_mode(0o755)).unwrap();
    let mut run = home.ns.command(product_bin("meshd"));
    run.env("PATH", format!("{}:{}", fake_bin.display(), std::env::var("PATH").unwrap()));
    run.args(["run", "--wireguard", "userspace", "--tor-config"]).arg(&offline).arg("--state-dir").arg(&home.state);
    let mut old_tor = Proc::spawn_logged(run, "meshd run on home (old tor on PATH)", &home_log);
    let mut error = None;
    let reported = wait_until(Duration::from_secs(30), || {
        error = service(&hub.state, "btcpay")["tor"]["error"].as_str().map(str::to_string);
        error.is_some()
    });
    assert!(reported, "the member reported no error: {}", service(&hub.state, "btcpay"));
    assert!(error.as_deref().unwrap_or_default().contains("0.3.0.1"), "{error:?}");
    let table = run_ok(meshctl(&hub.state).args(["service", "list"]));
    assert!(table.contains("cannot serve") && table.contains("0.3.0.1"), "{table}");
    let before = service(&hub.state, "btcpay");
    let refused = output(meshctl(&hub.state).args(["expose", "btcpay", "--tor", "--client", "phone2"]));
    assert_refused(&refused, &["phone2"]);
    run_ok(meshctl(&hub.state).args(["device", "add", "phone2", "--allow", "btcpay", "--conf", "-"]));
    let refused = output(meshctl(&hub.state).args(["expose", "btcpay", "--tor", "--client", "phone2"]));
    assert_refused(&refused, &["cannot serve btcpay over Tor", "0.3.0.1", "nothing was changed"]);
    assert_eq!(service(&hub.state, "btcpay")["tor"], before["tor"], "a failed expose changed the onion service");
    assert_eq!(fs::read_to_string(&hostname).unwrap().trim(), address, "the key stays");
    // The mesh does not wait for tor: the member is up and in touch with the hub all along.
    old_tor.assert_running("without a usable tor");
    let nodes = run_json(meshctl(&hub.state).args(["node", "list", "--json"]));
    let home_ip = nodes.as_array().unwrap().iter().find(|n| n["name"] == "home").unwrap()["address"].clone();
    assert!(hub.pings(home_ip.as_str().unwrap()), "the member's mesh is down");

    // tor upgraded: the member serves it again by itself within seconds, with the same address.
    fs::write(&upgraded, "").unwrap();
    assert_eq!(onion_address(&hub.state, "btcpay"), address);
    assert_eq!(service(&hub.state, "btcpay")["tor"]["error"], Value::Null);
    let out = run_ok(meshctl(&hub.state).args(["expose", "btcpay", "--tor", "--client", "phone2"]));
    assert!(out.contains(address.trim_end_matches(".onion")), "{out}");
}

#[test]
fn planted_links_and_a_broken_service_do_not_bend_the_tor_files() {
    if !require_root() {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let hub = MeshHost::new("hub", root.path(), "onp");
    hub.init_hub("10.250.2.1:51820", &[]);
    // Planted before root took the state directory over: the client list of `web` points at a victim directory.
    let victim = root.path().join("victim");
    fs::create_dir(&victim).unwrap();
    fs::set_permissions(&victim, fs::Permissions::from_mode(0o755)).unwrap();
    fs::write(victim.join("authorized_keys"), "ssh-ed25519 AAAA victim\n").unwrap();
    let web_dir = hub.state.join("tor/onion/web");
    fs::create_dir_all(&web_dir).unwrap();
    std::os::unix::fs::symlink(&victim, web_dir.join("authorized_clients")).unwrap();
    let offline = offline_torrc(root.path());
    fs::create_dir_all(hub.ns.etc_dir()).unwrap();
    let hosts = hub.ns.etc_dir().join("hosts");
    fs::write(&hosts, "127.0.0.1 localhost\n127.0.0.1 dbhost\n").unwrap();
    let log = root.path().join("hub.log");
    let mut daemon = hub.run_hub_with(&log, &["--tor-config", offline.to_str().unwrap()]);
    for (name, target) in
        [("web", WEB_TARGET), ("bad", "nosuchhost.invalid:5432"), ("db", "dbhost:5432"), ("wallet", "127.0.0.1:9737")]
    {
        run_ok(meshctl(&hub.state).args(["service", "add", name, "--node", "hub", "--target", target]));
    }
    for device in ["phone", "tablet"] {
        run_ok(meshctl(&hub.state).args(["device", "add", device, "--allow", "wallet", "--conf", "-"]));
    }

    // The link is refused, not followed: the victim keeps its file and its mode.
    let out = output(meshctl(&hub.state).args(["expose", "web", "--tor", "--client", "phone"]));
    assert_refused(&out, &["symbolic link", "nothing was changed"]);
    assert_eq!(fs::read_dir(&victim).unwrap().count(), 1, "meshd wrote or deleted through the link");
    assert!(victim.join("authorized_keys").exists());
    assert_eq!(mode(&victim), 0o755, "meshd changed the mode through the link");
    assert_eq!(service(&hub.state, "web")["tor"], Value::Null);

    // A service whose target does not resolve is not served and says why; the others are served and follow
    // their changes (a client taken off is taken off on disk at once).
    let out = output(meshctl(&hub.state).args(["expose", "bad", "--tor"]));
    assert_refused(&out, &["nosuchhost.invalid", "nothing was changed"]);
    run_ok(meshctl(&hub.state).args(["expose", "wallet", "--tor", "--client", "phone", "--client", "tablet"]));
    let clients = hub.state.join("tor/onion/wallet/authorized_clients");
    assert!(clients.join("tablet.auth").exists());
    // db is served while its name resolves, then the name goes: wallet must not wait for it.
    run_ok(meshctl(&hub.state).args(["expose", "db", "--tor"]));
    fs::write(&hosts, "127.0.0.1 localhost\n").unwrap();
    run_ok(meshctl(&hub.state).args(["unexpose", "wallet", "--tor", "--client", "tablet"]));
    let db_error = wait_until(Duration::from_secs(10), || {
        service(&hub.state, "db")["tor"]["error"].as_str().is_some_and(|e| e.contains("dbhost"))
    });
    assert!(db_error, "{}", service(&hub.state, "db"));
    let revoked = wait_until(Duration::from_secs(10), || !clients.join("tablet.auth").exists());
    assert!(revoked, "a broken service held up taking a client off another");
    assert!(clients.join("phone.auth").exists());
    let torrc = fs::read_to_string(hub.state.join("tor/torrc")).unwrap();
    assert!(torrc.contains("onion/wallet") && !torrc.contains("onion/db"), "{torrc}");
    daemon.assert_running("serving");
}
