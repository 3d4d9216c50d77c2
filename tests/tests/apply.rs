//! `meshctl apply` on a fresh state dir, offline: the network it builds, the configs and tokens it hands
//! out, idempotence, dry runs, and files it refuses without changing anything.
//!
//! No daemon and no root; needs `wg` (wireguard-tools). Without a daemon no host can join, so only the
//! hub is a member here: services and rules on invited nodes wait (the unit tests of `meshd_core::declare` and
//! of `meshctl` apply files to joined members).

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

use meshd_e2e::{WgQuick, describe, init_network, meshctl, output, run_json, run_ok, wg_pubkey};
use serde_json::{Value, json};

const NETWORK: &str = r#"
[[node]]
name = "vps1"

[[node]]
name = "relay1"
role = "relay"

[[service]]
name = "wallet"
node = "hub"
target = "127.0.0.1:9737"

[[service]]
name = "web"
node = "hub"
target = "127.0.0.1:8080"
port = 80

[[service]]
name = "beacon"
node = "vps1"
target = "127.0.0.1:5052"

[[device]]
name = "phone"
allow = ["wallet", "web"]

[[device]]
name = "laptop"
allow = ["web", "beacon"]

[[access]]
from = ["hub", "relay1"]
to = "vps1"
"#;

/// A state dir, a directory for configs, and the declaration file `net.toml` holding `text`.
struct Setup {
    state: tempfile::TempDir,
    files: tempfile::TempDir,
}

impl Setup {
    fn new(text: &str) -> Setup {
        let setup = Setup { state: init_network(&[]), files: tempfile::tempdir().unwrap() };
        fs::create_dir(setup.out()).unwrap();
        setup.write(text);
        setup
    }

    fn state(&self) -> &Path {
        self.state.path()
    }

    fn out(&self) -> std::path::PathBuf {
        self.files.path().join("out")
    }

    fn file(&self) -> std::path::PathBuf {
        self.files.path().join("net.toml")
    }

    fn write(&self, text: &str) {
        fs::write(self.file(), text).unwrap();
    }

    /// `meshctl apply net.toml --out-dir out`, with `extra` arguments.
    fn apply(&self, extra: &[&str]) -> Command {
        let mut cmd = meshctl(self.state());
        cmd.arg("apply").arg(self.file()).arg("--out-dir").arg(self.out()).args(extra);
        cmd
    }

    fn db(&self) -> Vec<u8> {
        fs::read(self.state().join("meshd.db")).unwrap()
    }

    fn list(&self, what: &str) -> Value {
        run_json(meshctl(self.state()).args([what, "list", "--json"]))
    }

    /// The names in the out dir, temporary files included.
    fn out_files(&self) -> Vec<String> {
        let mut names: Vec<String> =
            fs::read_dir(self.out()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        names.sort();
        names
    }
}

/// `name -> entry` of a JSON listing.
fn by_name(list: &Value) -> BTreeMap<String, Value> {
    let entries = list.as_array().unwrap_or_else(|| panic!("not a list: {list}"));
    entries.iter().map(|e| (e["name"].as_str().unwrap().to_owned(), e.clone())).collect()
}

/// The port of a `mesh_address` (`ip:port`).
fn mesh_port(service: &Value) -> &str {
    service["mesh_address"].as_str().and_then(|a| a.rsplit_once(':')).map(|(_, p)| p).unwrap()
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).permissions().mode() & 0o777
}

/// The run failed with status 1 and one `error: ` line on stderr that contains every one of `mentions`.
fn assert_refused(cmd: &Command, out: &Output, mentions: &[&str]) {
    assert_eq!(out.status.code(), Some(1), "{cmd:?}: {}", describe(out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.trim_end().lines().collect();
    assert!(lines.len() == 1 && lines[0].starts_with("error: "), "{cmd:?}: one `error: ` line: {}", describe(out));
    for mention in mentions {
        assert!(lines[0].contains(mention), "{cmd:?}: the error should mention {mention:?}: {}", lines[0]);
    }
}

#[test]
fn apply_builds_the_declared_network_and_hands_out_configs_and_tokens() {
    let s = Setup::new(NETWORK);
    let stdout = run_ok(&mut s.apply(&[]));
    let lines: Vec<&str> = stdout.lines().collect();
    for expected in [
        "+ invite node vps1 (node)",
        "+ invite node relay1 (relay)",
        "+ add service wallet on hub: 127.0.0.1:9737, port 9737",
        "+ add service web on hub: 127.0.0.1:8080, port 80",
        "+ add device phone (allow wallet,web)",
        "+ add device laptop (allow web)",
        "! service beacon waits for node vps1 to join",
        "! device laptop gets beacon once its node joins",
        "! allow hub -> vps1 waits for node vps1 to join",
        "! allow relay1 -> vps1 waits for node relay1 to join",
        "applied 6 of 6 changes",
    ] {
        assert!(lines.contains(&expected), "missing {expected:?} in:\n{stdout}");
    }
    // The tokens come last, one `NAME TOKEN` line per new invite.
    let tokens: BTreeMap<&str, &str> = lines[lines.len() - 2..].iter().filter_map(|l| l.split_once(' ')).collect();
    assert_eq!(tokens.keys().copied().collect::<Vec<_>>(), ["relay1", "vps1"], "{stdout}");
    for token in tokens.values() {
        assert!(token.starts_with("meshd-invite:") && !token.contains(' '), "not a token: {token}");
    }

    let invites = by_name(&run_json(meshctl(s.state()).args(["node", "invites", "--json"])));
    assert_eq!(invites.keys().collect::<Vec<_>>(), ["relay1", "vps1"]);
    assert_eq!((invites["vps1"]["role"].as_str(), invites["relay1"]["role"].as_str()), (Some("node"), Some("relay")));
    assert_eq!(s.list("node").as_array().map(Vec::len), Some(1), "only the hub has joined");

    let services = by_name(&s.list("service"));
    assert_eq!(services.keys().collect::<Vec<_>>(), ["wallet", "web"], "beacon waits for vps1");
    assert_eq!(
        (services["wallet"]["node"].as_str(), services["wallet"]["target"].as_str()),
        (Some("hub"), Some("127.0.0.1:9737"))
    );
    assert_eq!(mesh_port(&services["wallet"]), "9737");
    assert_eq!(services["web"]["target"], "127.0.0.1:8080");
    assert_eq!(mesh_port(&services["web"]), "80");
    let mut web_devices: Vec<&str> =
        services["web"]["devices"].as_array().unwrap().iter().map(|d| d.as_str().unwrap()).collect();
    web_devices.sort();
    assert_eq!(web_devices, ["laptop", "phone"]);

    let devices = by_name(&s.list("device"));
    assert_eq!(devices.keys().collect::<Vec<_>>(), ["laptop", "phone"]);
    assert_eq!(devices["phone"]["allow"], json!(["wallet", "web"]));
    assert_eq!(devices["laptop"]["allow"], json!(["web"]));
    assert_eq!(
        run_json(meshctl(s.state()).args(["access", "list", "--json"])),
        json!([]),
        "rules wait for their nodes"
    );

    assert_eq!(s.out_files(), ["laptop.conf", "phone.conf"], "no temporary file left behind");
    let hub = &s.list("node")[0];
    for name in ["phone", "laptop"] {
        let path = s.out().join(format!("{name}.conf"));
        assert_eq!(mode(&path), 0o600, "{} is not 0600", path.display());
        let text = fs::read_to_string(&path).unwrap();
        let conf = WgQuick::parse(&text);
        assert_eq!(Some(wg_pubkey(&conf.private_key).as_str()), devices[name]["public_key"].as_str(), "{name}: {text}");
        assert_eq!(conf.peers.len(), 1, "{text}");
        assert_eq!(conf.peers[0].public_key.as_str(), hub["public_key"].as_str().unwrap());
        assert_eq!(conf.peers[0].endpoint.as_deref(), Some("192.0.2.1:51820"));
        let address = devices[name]["address"].as_str().unwrap();
        assert!(conf.addresses.iter().any(|a| a.split('/').next() == Some(address)), "{address} not in {text}");
        let said = format!("device {name}: {address}, ");
        let written = format!("; config in {}", path.display());
        assert!(
            lines.iter().any(|l| l.starts_with(&said) && l.ends_with(&written)),
            "{said}...{written} in:\n{stdout}"
        );
    }
}

#[test]
fn applying_the_same_file_again_changes_nothing() {
    let s = Setup::new(NETWORK);
    run_ok(&mut s.apply(&[]));
    let db = s.db();
    let invites = run_json(meshctl(s.state()).args(["node", "invites", "--json"]));
    let stdout = run_ok(&mut s.apply(&[]));
    assert_eq!(stdout.lines().last(), Some("no changes"), "{stdout}");
    assert!(!stdout.lines().any(|l| l.starts_with(['+', '~', '-'])), "{stdout}");
    assert!(s.db() == db, "a second apply changed meshd.db");
    assert_eq!(run_json(meshctl(s.state()).args(["node", "invites", "--json"])), invites, "invites were issued again");
    assert_eq!(s.out_files(), ["laptop.conf", "phone.conf"]);

    let report = run_json(&mut s.apply(&["--json"]));
    assert_eq!((report["changes"].clone(), report["applied"].clone()), (json!([]), json!(0)), "{report}");
    assert_eq!(report["waiting"].as_array().map(Vec::len), Some(4), "{report}");
    assert!(s.db() == db);
}

#[test]
fn a_dry_run_prints_the_plan_and_changes_nothing_then_apply_carries_it_out() {
    let s = Setup::new(NETWORK);
    run_ok(&mut s.apply(&[]));
    let changed = NETWORK
        .replace("127.0.0.1:8080", "127.0.0.1:8081")
        .replace("allow = [\"wallet\", \"web\"]", "allow = [\"web\"]")
        .replace(
            "[[device]]\nname = \"laptop\"\nallow = [\"web\", \"beacon\"]\n",
            "[[device]]\nname = \"tablet\"\nallow = [\"wallet\"]\n",
        )
        .replace("[[node]]\nname = \"relay1\"\nrole = \"relay\"\n", "")
        .replace("from = [\"hub\", \"relay1\"]", "from = [\"hub\"]");
    s.write(&changed);
    let expected = [
        "~ service web: target 127.0.0.1:8080 -> 127.0.0.1:8081",
        "~ device phone: allow wallet,web -> web",
        "+ add device tablet (allow wallet)",
        "- remove device laptop",
        "- uninvite node relay1",
    ];

    let db = s.db();
    let stdout = run_ok(&mut s.apply(&["--dry-run"]));
    let changes: Vec<&str> = stdout.lines().filter(|l| l.starts_with(['+', '~', '-'])).collect();
    assert_eq!(changes, expected, "{stdout}");
    assert_eq!(stdout.lines().last(), Some("dry run: 5 changes, none applied"));
    let report = run_json(&mut s.apply(&["--dry-run", "--json"]));
    let ops: Vec<&str> = report["changes"].as_array().unwrap().iter().map(|c| c["op"].as_str().unwrap()).collect();
    assert_eq!(ops, ["update_service", "allow_device", "add_device", "remove_device", "uninvite_node"]);
    assert_eq!((report["dry_run"].clone(), report["applied"].clone()), (json!(true), json!(0)));
    assert!(s.db() == db, "a dry run changed meshd.db");
    assert_eq!(s.out_files(), ["laptop.conf", "phone.conf"], "a dry run wrote a config");

    let stdout = run_ok(&mut s.apply(&[]));
    let changes: Vec<&str> = stdout.lines().filter(|l| l.starts_with(['+', '~', '-'])).collect();
    assert_eq!(changes, expected, "{stdout}");
    assert!(stdout.contains("applied 5 of 5 changes"), "{stdout}");
    let services = by_name(&s.list("service"));
    assert_eq!(services["web"]["target"], "127.0.0.1:8081");
    assert_eq!(mesh_port(&services["web"]), "80", "an explicit port stays");
    let devices = by_name(&s.list("device"));
    assert_eq!(devices.keys().collect::<Vec<_>>(), ["phone", "tablet"]);
    assert_eq!(devices["phone"]["allow"], json!(["web"]));
    assert_eq!(devices["tablet"]["allow"], json!(["wallet"]));
    let invites = by_name(&run_json(meshctl(s.state()).args(["node", "invites", "--json"])));
    assert_eq!(invites.keys().collect::<Vec<_>>(), ["vps1"]);
    assert_eq!(mode(&s.out().join("tablet.conf")), 0o600);

    let db = s.db();
    assert_eq!(run_ok(&mut s.apply(&[])).lines().last(), Some("no changes"));
    assert!(s.db() == db);
}

#[test]
fn invalid_files_are_refused_with_one_line_and_nothing_changed() {
    let s = Setup::new(NETWORK);
    run_ok(&mut s.apply(&[]));
    let node = |name: &str| format!("[[node]]\nname = \"{name}\"\n");
    let service = |name: &str, on: &str, target: &str| {
        format!("[[service]]\nname = \"{name}\"\nnode = \"{on}\"\ntarget = \"{target}\"\n")
    };
    let device = |name: &str, allow: &str| format!("[[device]]\nname = \"{name}\"\nallow = [{allow}]\n");
    let svc = service("svc", "hub", "127.0.0.1:80");
    let cases: Vec<(String, Vec<&str>)> = vec![
        ("[[node]\nname = \"a\"\n".into(), vec!["line 1", "unclosed"]),
        ("[[node]]\nname = \"a\"\nnmae = \"b\"\n".into(), vec!["line 3", "unknown field `nmae`"]),
        ("[[nodes]]\nname = \"a\"\n".into(), vec!["unknown field `nodes`"]),
        (node("Bad_Name"), vec!["line 2", "Bad_Name", "not a valid name"]),
        (service("svc", "hub", "nocolon"), vec!["line 4", "nocolon", "HOST:PORT"]),
        (service("svc", "hub", "1.2.3.4:70000"), vec!["70000"]),
        (node("dup") + &service("dup", "hub", "127.0.0.1:80"), vec!["\"dup\"", "declared twice"]),
        (svc.clone() + &device("dup", "\"svc\"") + &device("dup", "\"svc\""), vec!["\"dup\"", "declared twice"]),
        (node("hub"), vec!["\"hub\"", "hub's name"]),
        (node("boss") + "role = \"hub\"\n", vec!["boss", "role \"hub\""]),
        (service("svc", "nowhere", "127.0.0.1:80"), vec!["svc", "nowhere", "neither the hub nor a declared node"]),
        (svc.clone() + &device("p", "\"nosuch\""), vec!["\"p\"", "nosuch", "not a declared service"]),
        (svc.clone() + &device("p", ""), vec!["\"p\"", "allows nothing"]),
        (
            node("a") + "[[access]]\nfrom = [\"ghost\"]\nto = \"a\"\n",
            vec!["ghost", "neither the hub nor a declared node"],
        ),
        (node("a") + "[[access]]\nfrom = [\"a\"]\nto = \"a\"\n", vec!["\"a\"", "to itself"]),
        // The network holds a device `phone`: the file cannot make the name a node in one go.
        (node("phone"), vec!["\"phone\"", "is a device in the network and a node in the file"]),
    ];
    let file = s.file();
    let file_name = file.to_str().unwrap();
    for (text, mentions) in cases {
        s.write(&text);
        let db = s.db();
        let mut cmd = s.apply(&[]);
        let out = output(&mut cmd);
        let mut mentions = mentions.clone();
        mentions.push(file_name);
        assert_refused(&cmd, &out, &mentions);
        assert!(out.stdout.is_empty(), "{text}: printed a plan for an invalid file: {}", describe(&out));
        assert!(s.db() == db, "{text}: meshd.db changed");
        assert_eq!(s.out_files(), ["laptop.conf", "phone.conf"], "{text}");
    }

    let missing = s.files.path().join("missing.toml");
    let mut cmd = meshctl(s.state());
    cmd.arg("apply").arg(&missing);
    let out = output(&mut cmd);
    assert_refused(&cmd, &out, &["cannot read", missing.to_str().unwrap()]);
}

#[test]
fn a_config_that_cannot_be_written_stops_the_apply_before_any_change() {
    let s = Setup::new(NETWORK);
    let db = s.db();
    fs::write(s.out().join("laptop.conf"), "someone else's config").unwrap();
    let mut cmd = s.apply(&[]);
    let out = output(&mut cmd);
    assert_refused(&cmd, &out, &["laptop.conf", "exists"]);
    assert_eq!(fs::read_to_string(s.out().join("laptop.conf")).unwrap(), "someone else's config");
    assert!(s.db() == db, "meshd.db changed");
    assert_eq!(s.out_files(), ["laptop.conf"], "no temporary file left behind");

    let missing = s.files.path().join("nowhere");
    let mut cmd = meshctl(s.state());
    cmd.arg("apply").arg(s.file()).arg("--out-dir").arg(&missing);
    let out = output(&mut cmd);
    assert_refused(&cmd, &out, &["nowhere", "not a directory"]);
    assert!(s.db() == db, "meshd.db changed");
    assert_eq!(run_json(meshctl(s.state()).args(["device", "list", "--json"])), json!([]));
}

#[test]
fn a_refused_change_leaves_everything_as_it_was() {
    // A /29 holds the hub and five more: the service and four devices fit, the fifth device does not.
    let s = Setup { state: init_network(&["--cidr", "10.9.9.0/29"]), files: tempfile::tempdir().unwrap() };
    fs::create_dir(s.out()).unwrap();
    let declare = |devices: usize| {
        let mut text =
            "[[node]]\nname = \"vps\"\n[[service]]\nname = \"web\"\nnode = \"hub\"\ntarget = \"127.0.0.1:80\"\n"
                .to_owned();
        for i in 1..=devices {
            text.push_str(&format!("[[device]]\nname = \"d{i}\"\nallow = [\"web\"]\n"));
        }
        s.write(&text);
    };
    declare(5);
    let db = s.db();
    let mut cmd = s.apply(&["--json"]);
    let out = output(&mut cmd);
    assert_refused(&cmd, &out, &["change 7 of 7", "add device d5", "exhausted", "nothing was applied"]);
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((report["applied"].clone(), report["invites"].clone()), (json!(0), json!([])), "{report}");
    // All or nothing: no invite, service or device of the six changes before it, no config file.
    assert!(s.db() == db, "meshd.db changed");
    assert_eq!(s.list("device"), json!([]));
    assert_eq!(s.list("service"), json!([]));
    assert_eq!(run_json(meshctl(s.state()).args(["node", "invites", "--json"])), json!([]));
    assert_eq!(s.out_files(), Vec::<String>::new(), "a config (or its temporary file) was left behind");

    // With a file that fits, the same plan goes through whole.
    declare(4);
    let stdout = run_ok(&mut s.apply(&[]));
    assert!(stdout.contains("applied 6 of 6 changes"), "{stdout}");
    assert_eq!(by_name(&s.list("device")).keys().collect::<Vec<_>>(), ["d1", "d2", "d3", "d4"]);
    assert_eq!(s.out_files(), ["d1.conf", "d2.conf", "d3.conf", "d4.conf"]);
}
