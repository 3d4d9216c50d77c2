//! Offline `meshctl device add` on a fresh state dir: what it hands out, how, and what it keeps.
//!
//! No daemon and no root; needs `wg` (wireguard-tools) and `zbarimg` (zbar-tools).

use std::fs;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use meshd_e2e::{WgQuick, assert_key_not_stored, init_network, meshctl, run_json, run_ok, wg_pubkey};
use serde_json::Value;

/// A state dir for network `home` with hub `hub` (endpoint 192.0.2.1:51820) and a service `svc`.
fn state_with_service() -> tempfile::TempDir {
    let dir = init_network(&[]);
    run_ok(meshctl(dir.path()).args(["service", "add", "svc", "--node", "hub", "--target", "127.0.0.1:8080"]));
    dir
}

/// An address without its `/prefix`.
fn bare(addr: &str) -> &str {
    addr.split('/').next().unwrap()
}

/// The hub's entry of `meshctl node list --json`.
fn hub(state: &Path) -> Value {
    let nodes = run_json(meshctl(state).args(["node", "list", "--json"]));
    nodes
        .as_array()
        .and_then(|n| n.iter().find(|n| n["name"] == "hub"))
        .cloned()
        .unwrap_or_else(|| panic!("no hub in {nodes}"))
}

/// Mode bits of a file.
fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).permissions().mode() & 0o777
}

#[test]
fn device_add_prints_a_config_and_keeps_no_private_key() {
    let state = state_with_service();
    let d = state.path();
    let text = run_ok(meshctl(d).args(["device", "add", "phone", "--allow", "svc"]));
    let conf = WgQuick::parse(&text);
    let hub = hub(d);

    assert_eq!(conf.peers.len(), 1, "{text}");
    let peer = &conf.peers[0];
    assert_eq!(Some(peer.public_key.as_str()), hub["public_key"].as_str(), "peer is the hub");
    assert_eq!(peer.endpoint.as_deref(), Some("192.0.2.1:51820"));
    assert_eq!(peer.persistent_keepalive, Some(25));
    assert!(peer.preshared_key.is_some(), "no PresharedKey: {text}");
    assert!(!peer.allowed_ips.iter().any(|a| a.ends_with("/0")), "AllowedIPs must stay inside the mesh: {text}");

    // Addresses: v4 from 10.77.0.0/16 (hub = .1), v6 = <the network's ULA /48>::<same n>.
    let hub_v4: Ipv4Addr = bare(hub["address"].as_str().unwrap()).parse().unwrap();
    let hub_v6: Ipv6Addr = bare(hub["address_v6"].as_str().unwrap()).parse().unwrap();
    assert_eq!(hub_v4, Ipv4Addr::new(10, 77, 0, 1));
    assert_eq!(u128::from(hub_v6) & 0xffff_ffff, 1, "hub v6 {hub_v6} is not <prefix>::1");
    assert_eq!(hub_v6.segments()[0] >> 8, 0xfd, "hub v6 {hub_v6} is not a ULA (fd00::/8)");
    let v4: Ipv4Addr =
        conf.addresses.iter().find_map(|a| bare(a).parse().ok()).unwrap_or_else(|| panic!("no IPv4 Address: {text}"));
    let v6: Ipv6Addr =
        conf.addresses.iter().find_map(|a| bare(a).parse().ok()).unwrap_or_else(|| panic!("no IPv6 Address: {text}"));
    let n = u32::from(v4) - u32::from(Ipv4Addr::new(10, 77, 0, 0));
    assert!((2..65535).contains(&n), "device v4 {v4} outside the pool");
    assert_eq!(u128::from(v6) >> 80, u128::from(hub_v6) >> 80, "{v6} not in the hub's /48");
    assert_eq!(u128::from(v6) & ((1 << 80) - 1), u128::from(n), "{v6} is not <prefix>::{n}");

    // The listing matches the handed-out key; the private key itself is nowhere in the state.
    let devices = run_json(meshctl(d).args(["device", "list", "--json"]));
    let phone = &devices[0];
    assert_eq!(phone["name"], "phone");
    assert_eq!(phone["public_key"].as_str(), Some(wg_pubkey(&conf.private_key).as_str()));
    assert_eq!(phone["address"].as_str().map(bare), Some(v4.to_string().as_str()));
    assert_eq!(phone["allow"], serde_json::json!(["svc"]));
    assert!(phone["last_handshake"].is_null(), "never connected: {phone}");
    // Without a daemon, when the phone last shook hands is not known: the table says so, not "never".
    let table = run_ok(meshctl(d).args(["device", "list"]));
    let row = table.lines().find(|l| l.starts_with("phone ")).unwrap_or_else(|| panic!("{table}"));
    assert!(row.trim_end().ends_with(" unknown"), "{table}");
    assert_key_not_stored(d, &conf.private_key);
}

#[test]
fn device_files_are_private_and_the_qr_holds_the_config() {
    let state = state_with_service();
    let d = state.path();
    let out = tempfile::tempdir().unwrap();
    let (conf_path, png, svg) =
        (out.path().join("laptop.conf"), out.path().join("laptop.png"), out.path().join("laptop.svg"));
    let record = run_json(
        meshctl(d)
            .args(["device", "add", "laptop", "--allow", "svc", "--json", "--conf"])
            .arg(&conf_path)
            .arg("--qr-png")
            .arg(&png)
            .arg("--qr-svg")
            .arg(&svg),
    );
    for file in [&conf_path, &png, &svg] {
        assert_eq!(mode(file), 0o600, "{} is not 0600", file.display());
    }
    let text = fs::read_to_string(&conf_path).unwrap();
    let conf = WgQuick::parse(&text);
    assert!(!conf.private_key.is_empty(), "no PrivateKey in {text}");
    let decoded = run_ok(Command::new("zbarimg").args(["--raw", "-q", "-Sbinary"]).arg(&png));
    assert_eq!(decoded, text, "the PNG QR code does not hold the config file's text");
    let svg_text = fs::read_to_string(&svg).unwrap();
    assert!(svg_text.contains("<svg"), "not an SVG: {}", &svg_text[..svg_text.len().min(200)]);

    assert_eq!(record["name"], "laptop", "--json prints the device record: {record}");
    assert_eq!(record["public_key"].as_str(), Some(wg_pubkey(&conf.private_key).as_str()));
    assert!(!record.to_string().contains(&conf.private_key), "--json printed the private key: {record}");
    assert_key_not_stored(d, &conf.private_key);
}
