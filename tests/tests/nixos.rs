//! Issue 14: the NixOS module (`nixos/module.nix`), evaluated with the real nixpkgs `lib` and stand-ins for the
//! NixOS options it sets (`tests/nix/eval.nix`). For each example: the module renders the declaration file and
//! the units; the declaration goes to `meshctl apply --dry-run` on a fresh controller made with the unit's own
//! `meshd init` arguments, and plans exactly what the example's plain file plans (applying one, then the other,
//! changes nothing the second time). Bad values are refused at evaluation with the option's name. Every `.nix`
//! file parses. The plain systemd unit has the module's hardening, passes `systemd-analyze verify`, and its
//! `systemd-analyze security` exposure stays as recorded in docs/DESIGN.md.
//!
//! Needs `nix-instantiate` (Debian's nix-bin) and nixpkgs' lib (`../shared/nixpkgs-lib` or
//! `$MESHD_NIXPKGS_LIB`); no root.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use meshd_e2e::{
    describe, evaluate, exec_args, nix_instantiate, nixpkgs_lib, output, product_bin, repo_root, run_json, run_ok,
};
use serde_json::Value;

/// The controllers of the three examples: their NixOS configuration and the plain declaration file.
const CONTROLLERS: [(&str, &str); 3] = [
    ("examples/phone/configuration.nix", "examples/phone/network.toml"),
    ("examples/merchant/vps.nix", "examples/merchant/network.toml"),
    ("examples/staking/execution.nix", "examples/staking/network.toml"),
];

/// The members of the examples.
const MEMBERS: [&str; 4] = [
    "examples/merchant/home.nix",
    "examples/staking/consensus.nix",
    "examples/staking/validator.nix",
    "examples/staking/monitor.nix",
];

fn eval_ok(lib: &Path, file: &str) -> Value {
    evaluate(lib, &repo_root().join(file)).unwrap_or_else(|e| panic!("{file} does not evaluate:\n{e}"))
}

/// The `meshd` arguments of the unit's setup script (`meshd init ...` or `meshd join ...`), without the state dir.
fn setup_args(unit: &Value) -> Vec<String> {
    let script = unit["scripts"][0].as_str().expect("a setup script");
    let line = script.lines().find(|l| l.starts_with("exec ")).unwrap_or_else(|| panic!("no exec line in:\n{script}"));
    let words: Vec<&str> = line.split_whitespace().collect();
    let start = words.iter().position(|w| *w == "init" || *w == "join").expect("init or join");
    let end = words.iter().position(|w| *w == "--state-dir").expect("--state-dir");
    words[start..end].iter().map(|w| w.to_string()).collect()
}

/// The unit's `[Service]` lines as a set.
fn service_lines(unit: &Value) -> BTreeSet<String> {
    unit["service"].as_array().expect("service lines").iter().map(|l| l.as_str().unwrap().to_owned()).collect()
}

/// The plan of `meshctl apply FILE --dry-run --json` on `state`, as a sorted list of its changes and waits.
fn dry_run(state: &Path, file: &Path) -> (Vec<String>, Vec<String>) {
    let plan = run_json(
        Command::new(product_bin("meshctl"))
            .arg("--state-dir")
            .arg(state)
            .arg("apply")
            .arg(file)
            .args(["--dry-run", "--json"]),
    );
    assert_eq!(plan["dry_run"], true);
    let sorted = |v: &Value| -> Vec<String> {
        let mut all: Vec<String> = v.as_array().unwrap().iter().map(Value::to_string).collect();
        all.sort();
        all
    };
    (sorted(&plan["changes"]), sorted(&plan["waiting"]))
}

fn ops(changes: &[String]) -> Vec<(String, String)> {
    let mut ops: Vec<(String, String)> = changes
        .iter()
        .map(|c| {
            let v: Value = serde_json::from_str(c).unwrap();
            let name = ["name", "service", "device", "to"].iter().find_map(|k| v[*k].as_str()).unwrap_or("").to_owned();
            (v["op"].as_str().unwrap().to_owned(), name)
        })
        .collect();
    ops.sort();
    ops
}

fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = list.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect();
    v.sort();
    v
}

#[test]
fn each_example_renders_a_declaration_that_plans_what_its_plain_file_plans() {
    let Some(lib) = nixpkgs_lib() else { return };
    let meshd_run_help = run_ok(Command::new(product_bin("meshd")).args(["run", "--help"]));
    for (config, plain) in CONTROLLERS {
        let evaluated = eval_ok(&lib, config);
        let unit = &evaluated["unit"];

        // The unit's own `meshd init` arguments make the controller: the flags it renders are meshd's.
        let args = setup_args(unit);
        assert_eq!(args[0], "init", "{config}: {args:?}");
        let state = tempfile::tempdir().unwrap();
        run_ok(Command::new(product_bin("meshd")).args(&args).arg("--state-dir").arg(state.path()));
        let exec = exec_args(unit["exec"].as_str().unwrap());
        assert_eq!(exec[1], "run", "{config}: {exec:?}");
        for flag in exec.iter().filter(|w| w.starts_with("--")).map(|w| w.split('=').next().unwrap()) {
            assert!(meshd_run_help.contains(&format!("{flag} ")), "{config}: `meshd run` has no {flag}: {exec:?}");
        }

        let rendered = state.path().join("rendered.toml");
        fs::write(&rendered, evaluated["declaration"].as_str().unwrap()).unwrap();
        let from_nix = dry_run(state.path(), &rendered);
        let from_plain = dry_run(state.path(), &repo_root().join(plain));
        assert_eq!(from_nix, from_plain, "{config} and {plain} declare different networks");

        let expected: &[(&str, &str)] = match config {
            "examples/phone/configuration.nix" => &[
                ("add_service", "wallet"),
                ("add_service", "electrs"),
                ("add_device", "alice-phone"),
                ("add_device", "laptop"),
            ],
            "examples/merchant/vps.nix" => &[("invite_node", "home")],
            _ => &[
                ("invite_node", "consensus"),
                ("invite_node", "validator"),
                ("invite_node", "monitor"),
                ("add_service", "engine-api"),
            ],
        };
        assert_eq!(ops(&from_nix.0), pairs(expected), "{config}: the plan");
        if config.contains("merchant") {
            // BTCPay's node has not joined: its service, names and the webshop's grant wait for it.
            let waiting = from_nix.1.join("\n");
            assert!(waiting.contains("btcpay") && waiting.contains("webshop"), "{config}: {waiting}");
        }

        // Applying the rendered file for real, then the plain one: nothing left to change.
        let out_dir = tempfile::tempdir().unwrap();
        run_ok(
            Command::new(product_bin("meshctl"))
                .arg("--state-dir")
                .arg(state.path())
                .arg("apply")
                .arg(&rendered)
                .arg("--out-dir")
                .arg(out_dir.path()),
        );
        let again = run_ok(
            Command::new(product_bin("meshctl"))
                .arg("--state-dir")
                .arg(state.path())
                .arg("apply")
                .arg(repo_root().join(plain))
                .arg("--out-dir")
                .arg(out_dir.path()),
        );
        assert!(again.contains("no changes"), "{config}: the plain file after the rendered one: {again}");
    }
}

#[test]
fn the_units_are_hardened_and_carry_no_secret() {
    let Some(lib) = nixpkgs_lib() else { return };
    let hardening = [
        "User=meshd",
        "Group=meshd",
        "StateDirectory=meshd",
        "StateDirectoryMode=0700",
        "UMask=0077",
        "NoNewPrivileges=true",
        "ProtectSystem=strict",
        "ProtectHome=true",
        "PrivateTmp=true",
        "RestrictAddressFamilies=AF_NETLINK",
        "SystemCallFilter=@system-service",
        "LimitNOFILE=65536",
        "AmbientCapabilities=CAP_NET_ADMIN",
        "AmbientCapabilities=CAP_NET_BIND_SERVICE",
        "CapabilityBoundingSet=CAP_NET_ADMIN",
        "CapabilityBoundingSet=CAP_NET_BIND_SERVICE",
        "Type=notify",
    ];
    for (config, _) in CONTROLLERS {
        let evaluated = eval_ok(&lib, config);
        let lines = service_lines(&evaluated["unit"]);
        for line in hardening {
            assert!(lines.contains(line), "{config}: meshd.service lacks {line}: {lines:#?}");
        }
        assert_eq!(evaluated["users"], serde_json::json!(["meshd"]), "{config}: a dedicated user");
        assert_eq!(evaluated["firewall"]["allowedUDPPorts"], serde_json::json!([51820]), "{config}");
        // The apply unit: no capability, local sockets only, the file from the store, tokens into a private file.
        let apply = &evaluated["applyUnit"];
        let apply_lines = service_lines(apply);
        for line in ["User=meshd", "CapabilityBoundingSet=", "RestrictAddressFamilies=AF_UNIX", "UMask=0077"] {
            assert!(apply_lines.contains(line), "{config}: meshd-apply.service lacks {line}: {apply_lines:#?}");
        }
        let script = apply["script"].as_str().unwrap();
        assert!(script.contains("umask 077") && script.contains("last-apply.txt"), "{script}");
        assert_eq!(apply["after"], serde_json::json!(["meshd.service"]), "applied once meshd is ready");
        assert_eq!(evaluated["joinUnit"], Value::Null, "{config}: the controller joins nothing");
    }
    let relay = eval_ok(&lib, "examples/merchant/vps.nix");
    assert_eq!(relay["firewall"]["allowedTCPPorts"], serde_json::json!([51820, 80, 443]), "join port and public names");

    for config in MEMBERS {
        let evaluated = eval_ok(&lib, config);
        let unit = &evaluated["unit"];
        // The join is a unit of its own, run only until the host has joined (the spent token may then go).
        let join = &evaluated["joinUnit"];
        let lines = service_lines(join);
        assert!(lines.contains("LoadCredential=token:/run/secrets/meshd-token"), "{config}: {lines:#?}");
        assert!(lines.contains("User=meshd") && lines.contains("CapabilityBoundingSet="), "{config}: {lines:#?}");
        assert_eq!(join["unitConfig"]["ConditionPathExists"], "!/var/lib/meshd/member.json", "{config}");
        assert_eq!(join["before"], serde_json::json!(["meshd.service"]), "{config}");
        let args = setup_args(&serde_json::json!({ "scripts": [join["script"]] }));
        assert_eq!(args[..2], ["join", "-"], "{config}: the token comes on stdin");
        let script = join["script"].as_str().unwrap();
        assert!(script.contains("< \"$CREDENTIALS_DIRECTORY/token\""), "{config}: {script}");
        assert!(
            !service_lines(unit).iter().any(|l| l.starts_with("LoadCredential")),
            "{config}: meshd itself has no token"
        );
        assert!(!unit["exec"].as_str().unwrap().contains("secrets"), "{config}: no secret path on the command line");
        assert_eq!(evaluated["applyUnit"], Value::Null, "{config}: members declare nothing");
        assert_eq!(evaluated["firewall"]["allowedTCPPorts"], serde_json::json!([]), "{config}");
        assert_eq!(evaluated["declaration"].as_str().unwrap().lines().filter(|l| l.starts_with('[')).count(), 0);
    }
    let validator = eval_ok(&lib, "examples/staking/validator.nix");
    let lines = service_lines(&validator["unit"]);
    assert!(lines.iter().any(|l| l.starts_with("ExecStartPost=+")), "resolved is on: the resolver is set: {lines:#?}");
    let scripts = validator["unit"]["scripts"].as_array().unwrap();
    let resolver =
        scripts.iter().filter_map(Value::as_str).find(|s| s.contains("resolvectl")).expect("a resolver script");
    assert!(resolver.contains("runuser -u meshd") && resolver.contains("resolvectl domain meshd0"), "{resolver}");
    let home = eval_ok(&lib, "examples/merchant/home.nix");
    assert!(!service_lines(&home["unit"]).iter().any(|l| l.starts_with("ExecStartPost")), "resolved is off there");
}

/// A configuration of the module in a file of its own: `body` goes inside `services.meshd`.
fn config_file(dir: &Path, name: &str, body: &str) -> PathBuf {
    let path = dir.join(format!("{name}.nix"));
    fs::write(&path, format!("{{ networking.hostName = \"node\"; services.meshd = {{ enable = true; {body} }}; }}\n"))
        .unwrap();
    path
}

#[test]
fn bad_values_are_refused_at_evaluation_with_the_option_name() {
    let Some(lib) = nixpkgs_lib() else { return };
    let dir = tempfile::tempdir().unwrap();
    let controller = r#"role = "controller"; network = "home"; endpoint = "node.example.net:51820";"#;
    let cases: &[(&str, String, &[&str])] = &[
        (
            "port",
            format!(
                r#"{controller} services.wallet = {{ target = "127.0.0.1:9737"; port = 70000; expose.wireguard.allow = [ "phone" ]; }};"#
            ),
            &["services.meshd.services.wallet.port", "between 1 and 65535"],
        ),
        ("cidr", format!(r#"{controller} cidr = "10.77.0.0/33";"#), &["services.meshd.cidr", "CIDR"]),
        ("cidr-text", format!(r#"{controller} cidr = "10.777.0.0/16";"#), &["services.meshd.cidr"]),
        (
            "tls",
            format!(
                r#"{controller} services.btcpay = {{ target = "127.0.0.1:23000"; expose.https = {{ hostname = "pay.shop.example"; relay = "node"; tls = "sideways"; }}; }};"#
            ),
            &["services.meshd.services.btcpay.expose.https", "tls", "\"terminate\", \"passthrough\""],
        ),
        (
            "target",
            format!(
                r#"{controller} services.wallet = {{ target = "127.0.0.1"; expose.wireguard.allow = [ "phone" ]; }};"#
            ),
            &["services.meshd.services.wallet.target", "HOST:PORT"],
        ),
        (
            "endpoint",
            r#"role = "controller"; network = "home"; endpoint = "node.example.net";"#.into(),
            &["services.meshd.endpoint"],
        ),
        (
            "role",
            r#"role = "hub"; network = "home"; endpoint = "node.example.net:51820";"#.into(),
            &["services.meshd.role"],
        ),
        ("mtu", format!("{controller} mtu = 1000;"), &["services.meshd.mtu", "1280"]),
        ("listen-port", format!("{controller} listenPort = 0;"), &["services.meshd.listenPort"]),
        ("interface", format!(r#"{controller} interface = "mesh interface 0";"#), &["services.meshd.interface"]),
        (
            "device-name",
            format!(
                r#"{controller} services.wallet = {{ target = "127.0.0.1:9737"; expose.wireguard.allow = [ "alice phone" ]; }};"#
            ),
            &["services.meshd.services.wallet.expose.wireguard.allow", "DNS label"],
        ),
        (
            "service-name",
            format!(
                r#"{controller} services."my wallet" = {{ target = "127.0.0.1:9737"; expose.wireguard.allow = [ "phone" ]; }};"#
            ),
            &["services.meshd.services.\"my wallet\"", "DNS label"],
        ),
        (
            "undeclared-node",
            format!(
                r#"{controller} services.beacon = {{ node = "beacon"; target = "127.0.0.1:5052"; expose.wireguard.allow = [ "phone" ]; }};"#
            ),
            &["services.meshd.services.beacon.node", "beacon"],
        ),
        (
            "tor-client",
            format!(
                r#"{controller} services.wallet = {{ target = "127.0.0.1:9737"; expose.wireguard.allow = [ "phone" ]; expose.tor = {{ enable = true; clients = [ "tablet" ]; }}; }};"#
            ),
            &["services.meshd.services.wallet.expose.tor.clients", "tablet"],
        ),
        (
            "udp-https",
            format!(
                r#"{controller} services.dns = {{ target = "127.0.0.1:53"; protocol = "udp"; expose.https = {{ hostname = "dns.example.org"; relay = "node"; }}; }};"#
            ),
            &["services.meshd.services.dns.expose", "UDP"],
        ),
        (
            "access",
            format!(r#"{controller} nodes.beacon = {{ }}; access.beacon.from = [ "ghost" ];"#),
            &["services.meshd.access.beacon.from", "ghost"],
        ),
        ("token-missing", r#"role = "member";"#.into(), &["services.meshd.tokenFile"]),
        (
            "token-path",
            r#"role = "member"; tokenFile = ./token;"#.into(),
            &["services.meshd.tokenFile", "outside the Nix store"],
        ),
        (
            "token-in-store",
            r#"role = "member"; tokenFile = "/nix/store/00000000000000000000000000000000-token";"#.into(),
            &["services.meshd.tokenFile", "outside the Nix store"],
        ),
        (
            "member-declares",
            r#"role = "member"; tokenFile = "/run/secrets/t"; services.wallet.target = "127.0.0.1:1";"#.into(),
            &["controller only"],
        ),
        ("duration", format!(r#"{controller} inviteExpires = "forever";"#), &["services.meshd.inviteExpires"]),
        ("cidr-host-bits", format!(r#"{controller} cidr = "10.77.0.1/16";"#), &["services.meshd.cidr", "no host bits"]),
        (
            "dns-list",
            format!(
                r#"{controller} services.w = {{ target = "127.0.0.1:1"; expose.wireguard.allow = [ "p" ]; }}; devices.p.dns = [ ":" ];"#
            ),
            &["services.meshd.devices.p.dns"],
        ),
        (
            "ipv6-target",
            format!(r#"{controller} services.w = {{ target = "[:1]:9737"; expose.wireguard.allow = [ "p" ]; }};"#),
            &["services.meshd.services.w.target"],
        ),
        (
            "port-1021",
            r#"role = "controller"; network = "home"; endpoint = "node.example.net:1021";"#.into(),
            &["services.meshd.listenPort", "1021", "the endpoint's port"],
        ),
        (
            "dns-port",
            format!("{controller} dnsPort = 51820;"),
            &["services.meshd.listenPort", "services.meshd.dnsPort", "51820"],
        ),
        (
            "https-twice",
            format!(
                r#"{controller} services.a = {{ target = "127.0.0.1:1"; expose.https = {{ hostname = "pay.shop.example"; relay = "node"; }}; }}; services.b = {{ target = "127.0.0.1:2"; expose.https = {{ hostname = "Pay.shop.example"; relay = "node"; }}; }};"#
            ),
            &["pay.shop.example", "more than one expose.https"],
        ),
        (
            "tor-clients-off",
            format!(
                r#"{controller} services.w = {{ target = "127.0.0.1:1"; expose.wireguard.allow = [ "p" ]; expose.tor.clients = [ "p" ]; }};"#
            ),
            &["services.meshd.services.w.expose.tor", "enable = true"],
        ),
        (
            "tor-config-system",
            format!(r#"{controller} tor.backend = "system"; tor.configFile = "/etc/tor/bridges";"#),
            &["services.meshd.tor.configFile", "services.tor"],
        ),
        (
            "member-network",
            r#"role = "member"; tokenFile = "/run/secrets/t"; network = "home";"#.into(),
            &["controller's"],
        ),
        (
            "member-cidr",
            r#"role = "member"; tokenFile = "/run/secrets/t"; cidr = "10.9.0.0/16";"#.into(),
            &["controller's"],
        ),
        (
            "name-twice",
            format!(r#"{controller} services.w = {{ target = "127.0.0.1:1"; expose.wireguard.allow = [ "Node" ]; }};"#),
            &["node declared twice"],
        ),
    ];
    for (name, body, mentions) in cases {
        let file = config_file(dir.path(), name, body);
        match evaluate(&lib, &file) {
            Ok(v) => panic!("{name}: {body} was accepted: {v}"),
            Err(e) => {
                for m in *mentions {
                    assert!(e.contains(m), "{name}: the error does not mention {m:?}:\n{e}");
                }
            }
        }
    }
    // A host name that is no DNS label, for a controller: named as the cause.
    let path = dir.path().join("hostname.nix");
    fs::write(
        &path,
        format!("{{ networking.hostName = \"my_host\"; services.meshd = {{ enable = true; {controller} }}; }}\n"),
    )
    .unwrap();
    let e = evaluate(&lib, &path).expect_err("my_host as the controller's name");
    assert!(e.contains("networking.hostName") && e.contains("services.meshd.name"), "{e}");

    // And the good values next to them pass (so the refusals above are about the bad value).
    let good = config_file(
        dir.path(),
        "good",
        &format!(
            r#"{controller} cidr = "10.78.0.0/16"; mtu = 1340; services.wallet = {{ target = "[::1]:9737"; port = 9737; expose.wireguard.allow = [ "alice-phone" ]; expose.tor = {{ enable = true; port = 80; clients = [ "alice-phone" ]; }}; }};"#
        ),
    );
    let evaluated = evaluate(&lib, &good).unwrap_or_else(|e| panic!("good values refused:\n{e}"));
    let text = evaluated["declaration"].as_str().unwrap();
    assert!(
        text.contains("mtu = 1340") && text.contains(r#"tor = { clients = ["alice-phone"], port = 80 }"#),
        "{text}"
    );
}

/// Every `.nix` file of the repository, outside build output.
fn nix_files(dir: &Path, found: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if path.is_dir() {
            if !["target", ".git", "fuzz"].contains(&name.as_str()) {
                nix_files(&path, found);
            }
        } else if name.ends_with(".nix") {
            found.push(path);
        }
    }
}

#[test]
fn the_package_is_built_from_the_workspace_alone() {
    let Some(lib) = nixpkgs_lib() else { return };
    let root = repo_root();
    // The source filter of nixos/package.nix, asked about paths of a checkout: a state directory left by the
    // quickstart (keys) or a .git must never be copied into the world-readable store.
    let expr = format!(
        "let lib = import <nixpkgs/lib>; src = (import {}/nixos/package.nix {{ inherit lib; rustPlatform.buildRustPackage = a: a.src; }}); \
         in map (p: src.filter \"{}/${{p}}\" (if lib.hasSuffix \"/\" p then \"directory\" else \"regular\")) [ {} ]",
        root.display(),
        root.display(),
        [
            "Cargo.toml",
            "Cargo.lock",
            "meshd/",
            "meshd/src/main.rs",
            "meshctl/src/main.rs",
            "meshd-core/",
            "tests/src/lib.rs",
            "benches/relay/main.rs",
            "meshd-state/",
            "meshd-state/private.key",
            ".git/",
            "target/",
            "result",
            "examples/",
            "docs/",
            "flake.nix",
            "nixos/",
        ]
        .map(|p| format!("\"{p}\""))
        .join(" ")
    );
    let out = output(nix_instantiate(&lib).args(["--eval", "--strict", "--json", "-E", &expr]));
    assert!(out.status.success(), "{}", describe(&out));
    let kept: Vec<bool> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        kept,
        [true, true, true, true, true, true, true, true, false, false, false, false, false, false, false, false, false],
        "which paths the package's source keeps"
    );
}

#[test]
fn every_nix_file_parses() {
    let Some(lib) = nixpkgs_lib() else { return };
    let mut files = Vec::new();
    nix_files(&repo_root(), &mut files);
    let names: Vec<String> = files.iter().map(|f| f.strip_prefix(repo_root()).unwrap().display().to_string()).collect();
    for required in
        ["flake.nix", "default.nix", "nixos/module.nix", "nixos/package.nix", "examples/phone/configuration.nix"]
    {
        assert!(names.iter().any(|n| n == required), "{required} is missing: {names:?}");
    }
    for file in &files {
        let out = output(nix_instantiate(&lib).arg("--parse").arg(file));
        assert!(out.status.success(), "{} does not parse: {}", file.display(), describe(&out));
    }
    // And a file that does not parse is caught (the check above can fail).
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("broken.nix");
    fs::write(&broken, "{ services.meshd = { enable = true; }\n").unwrap();
    assert!(!output(nix_instantiate(&lib).arg("--parse").arg(&broken)).status.success());
}

/// The plain unit's `[Service]` lines (comments and blank lines left out).
fn plain_unit() -> (String, BTreeSet<String>) {
    let text = fs::read_to_string(repo_root().join("scripts/systemd/meshd.service")).unwrap();
    let service = text.split("[Service]").nth(1).unwrap().split("\n[").next().unwrap();
    let lines =
        service.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).map(str::to_owned).collect();
    (text, lines)
}

#[test]
fn the_plain_unit_is_the_module_unit_and_systemd_accepts_it() {
    let Some(lib) = nixpkgs_lib() else { return };
    let (text, plain) = plain_unit();
    let evaluated = eval_ok(&lib, "examples/phone/configuration.nix");
    // One directive per line in the plain file; the module writes a line per list element.
    let split = |lines: &BTreeSet<String>| -> BTreeSet<String> {
        lines
            .iter()
            .filter(|l| !l.starts_with("Exec") && !l.starts_with("Environment") && !l.starts_with("LoadCredential"))
            .flat_map(|l| {
                let (key, value) = l.split_once('=').unwrap();
                if ["AmbientCapabilities", "CapabilityBoundingSet", "RestrictAddressFamilies"].contains(&key) {
                    value.split_whitespace().map(|v| format!("{key}={v}")).collect::<Vec<_>>()
                } else {
                    vec![l.clone()]
                }
            })
            .collect()
    };
    assert_eq!(split(&plain), split(&service_lines(&evaluated["unit"])), "the plain unit and the module's differ");

    // systemd-analyze verify, with ExecStart pointing at the built meshd.
    let dir = tempfile::tempdir().unwrap();
    let unit = dir.path().join("meshd.service");
    fs::write(&unit, text.replace("/usr/local/bin/meshd", product_bin("meshd").to_str().unwrap())).unwrap();
    let verify = output(Command::new("systemd-analyze").arg("verify").arg(&unit));
    assert!(verify.status.success() && verify.stderr.is_empty(), "systemd-analyze verify: {}", describe(&verify));
    // A unit with an unknown directive is reported (the check above can fail).
    let bad = dir.path().join("bad.service");
    fs::write(&bad, text.replace("ProtectHome=true", "ProtectHome=sometimes")).unwrap();
    let verify = output(Command::new("systemd-analyze").arg("verify").arg(&bad));
    assert!(!verify.stderr.is_empty(), "a bad value passes verify: {}", describe(&verify));

    // The module's own unit, with values that systemd would otherwise expand (`%h`, `$USER`) or split (a quote):
    // systemd reads the ExecStart line without complaint, and as the arguments given.
    let odd = dir.path().join("odd.nix");
    fs::write(
        &odd,
        format!(
            "{{ lib, ... }}: {{ imports = [ {} ]; services.meshd.acme.contact = lib.mkForce \"o%h$USER\\\"x y@shop.example\"; }}\n",
            repo_root().join("examples/merchant/vps.nix").display()
        ),
    )
    .unwrap();
    let evaluated = eval_ok(&lib, odd.to_str().unwrap());
    let exec = evaluated["unit"]["exec"].as_str().unwrap();
    let args = exec_args(exec);
    assert!(args.iter().any(|a| a == "--acme-contact=o%h$USER\"x y@shop.example"), "{exec}");
    let rendered = dir.path().join("rendered.service");
    let meshd = product_bin("meshd");
    let line = exec.replacen(&format!("{:?}", "/usr/bin/meshd"), &format!("{:?}", meshd.to_str().unwrap()), 1);
    fs::write(&rendered, format!("[Service]\nExecStart={line}\n")).unwrap();
    let verify = output(Command::new("systemd-analyze").arg("verify").arg(&rendered));
    assert!(verify.status.success() && verify.stderr.is_empty(), "{line}: {}", describe(&verify));

    // The exposure that docs/DESIGN.md records (systemd 252's scale: 0 safe to 10 exposed).
    let security = output(Command::new("systemd-analyze").args(["security", "--offline=yes"]).arg(&unit));
    let report = String::from_utf8_lossy(&security.stdout);
    let level: f64 = report
        .lines()
        .find_map(|l| l.split("Overall exposure level for meshd.service: ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level: {}", describe(&security)));
    assert!(level <= 2.5, "exposure {level} is above the recorded 2.3:\n{report}");
}
