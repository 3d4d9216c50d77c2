//! Issue 2's acceptance test: a phone set up only from the QR code reaches exactly what it was allowed.
//!
//! Hosts are namespaces: `node` runs `meshd run --wireguard userspace`; `svc` (a nix-bitcoin style
//! service namespace on a link-local veth) runs two HTTP services and the node's upstream DNS; `phone`
//! reaches the node's endpoint over a second veth standing for the internet.

use std::fs;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use meshd_e2e::{
    Netns, Phone, Proc, WgQuick, assert_key_not_stored, describe, meshctl, output, product_bin, require_root, run_json,
    run_ok, udp_echoed, udp_received, unique_ifname, veth, wait_until, write_private,
};
use serde_json::Value;

const NODE_SVC: &str = "169.254.1.1/24";
const SVC_ADDR: &str = "169.254.1.17";
const WALLET_TARGET: &str = "169.254.1.17:9737";
const EXPLORER_TARGET: &str = "169.254.1.17:3002";
const NODE_WAN: &str = "172.31.200.1";
const PHONE_WAN: &str = "172.31.200.2/24";
const ENDPOINT: &str = "172.31.200.1:51820";
/// What the svc namespace's DNS (the node's upstream) answers for `outside.test`.
const OUTSIDE_ANSWER: &str = "192.0.2.55";
/// The mesh range `meshd init` uses by default.
const MESH_V4_BASE: [u8; 2] = [10, 77];

/// A string field of a JSON object, panicking with the object when it is missing.
fn text<'a>(obj: &'a Value, key: &str) -> &'a str {
    obj[key].as_str().unwrap_or_else(|| panic!("no string {key:?} in {obj}"))
}

/// The object named `name` in a JSON array of objects with a `name` field.
fn named<'a>(list: &'a Value, name: &str) -> &'a Value {
    list.as_array()
        .unwrap_or_else(|| panic!("not a JSON array: {list}"))
        .iter()
        .find(|o| o["name"] == name)
        .unwrap_or_else(|| panic!("no {name:?} in {list}"))
}

/// An address without its `/prefix`, if the product printed one.
fn bare(addr: &str) -> &str {
    addr.split('/').next().unwrap_or(addr)
}

/// Whether an AllowedIPs entry lies inside the mesh: the IPv4 range or a ULA /48 (fd00::/8).
fn inside_mesh(cidr: &str) -> bool {
    let (ip, len) = cidr.split_once('/').unwrap_or((cidr, "128"));
    let len: u8 = len.parse().unwrap_or(0);
    if let Ok(v4) = ip.parse::<Ipv4Addr>() {
        return len >= 16 && v4.octets()[..2] == MESH_V4_BASE;
    }
    ip.to_ascii_lowercase().starts_with("fd") && len >= 48
}

/// `dig +short` from a namespace: the answer lines, or None when the query failed.
fn dig(ns: &Netns, server: &str, name: &str) -> Option<Vec<String>> {
    let out = ns.exec(&["dig", "+short", "+time=2", "+tries=1", &format!("@{server}"), name]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    (out.status.success() && !stdout.contains(";;")).then(|| stdout.lines().map(|l| l.trim().to_string()).collect())
}

/// Starts a static HTTP server serving `body` as its index page.
fn http_server(ns: &Netns, root: &Path, bind: &str, port: u16, body: &str) -> Proc {
    fs::create_dir_all(root).unwrap();
    fs::write(root.join("index.html"), body).unwrap();
    ns.spawn(&[
        "python3",
        "-m",
        "http.server",
        &port.to_string(),
        "--bind",
        bind,
        "--directory",
        root.to_str().unwrap(),
    ])
}

/// `meshd init` of network `home` with hub `hub` at [`ENDPOINT`], run on `node` (it checks the node's
/// own routes), state in `state_dir`; returns the hub's interface name (from `prefix`, unique).
fn init_hub(node: &Netns, state_dir: &Path, prefix: &str) -> String {
    let hub_if = unique_ifname(prefix);
    let mut init = node.command(product_bin("meshd"));
    init.args(["init", "--network", "home", "--name", "hub", "--endpoint", ENDPOINT, "--interface", &hub_if]);
    run_ok(init.arg("--state-dir").arg(state_dir));
    hub_if
}

/// Seconds since the Unix epoch.
fn now_secs() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
}

#[test]
fn phone_reaches_exactly_its_services_from_the_qr_code() {
    if !require_root() {
        return;
    }
    let started = Instant::now();
    let state = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let state_dir = state.path();
    let work_dir = work.path();

    // Hosts.
    let node = Netns::new("node");
    let svc = Netns::new("svc");
    let phone_ns = Netns::new("phone");
    veth(&node, &svc, NODE_SVC, &format!("{SVC_ADDR}/24"));
    veth(&node, &phone_ns, &format!("{NODE_WAN}/24"), PHONE_WAN);
    // Like a real node with service namespaces: it forwards, and the services route back through it.
    // This is what makes "the phone cannot reach 169.254.1.17 directly" a check of meshd's rules.
    node.run(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    svc.ip(&["route", "add", "default", "via", "169.254.1.1"]);

    // Services and the node's upstream resolver.
    let _wallet = http_server(&svc, &work_dir.join("wallet"), SVC_ADDR, 9737, "wallet-ok");
    let _explorer = http_server(&svc, &work_dir.join("explorer"), SVC_ADDR, 3002, "explorer-ok");
    let _hub_private = http_server(&node, &work_dir.join("hub"), "::", 8088, "hub-private");
    let _dnsmasq = svc.spawn_logged(
        &[
            "dnsmasq",
            "--no-daemon",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--listen-address=169.254.1.17",
            "--bind-interfaces",
            "--address=/outside.test/192.0.2.55",
            &format!("--pid-file={}", work_dir.join("dnsmasq.pid").display()),
            "--log-facility=-",
        ],
        &work_dir.join("dnsmasq.log"),
    );
    node.set_resolv_conf(&format!("nameserver {SVC_ADDR}\n"));
    assert!(
        wait_until(Duration::from_secs(10), || {
            node.http_get(&format!("http://{WALLET_TARGET}/"), 2).as_deref() == Some("wallet-ok")
                && node.http_get(&format!("http://{EXPLORER_TARGET}/"), 2).as_deref() == Some("explorer-ok")
                && dig(&node, SVC_ADDR, "outside.test") == Some(vec![OUTSIDE_ANSWER.into()])
        }),
        "test services in the svc namespace did not come up"
    );

    // 1-2. A network and two services, offline. Init runs on the node: it checks the node's own routes.
    let hub_if = init_hub(&node, state_dir, "mh");
    for (name, target) in [("wallet", WALLET_TARGET), ("explorer", EXPLORER_TARGET)] {
        run_ok(meshctl(state_dir).args(["service", "add", name, "--node", "hub", "--target", target]));
    }

    // 3. The daemon; the admin socket is its readiness signal.
    let daemon_log = work_dir.join("meshd.log");
    let mut daemon_cmd = node.command(product_bin("meshd"));
    daemon_cmd.env("RUST_LOG", "info").args([
        "run",
        "--state-dir",
        state_dir.to_str().unwrap(),
        "--wireguard",
        "userspace",
    ]);
    let _socket_cleanup = SocketCleanup(hub_if.clone()); // dropped after the daemon
    let mut daemon = Proc::spawn_logged(daemon_cmd, "meshd run", &daemon_log);
    let socket = state_dir.join("meshd.sock");
    let ready = wait_until(Duration::from_secs(60), || {
        daemon.assert_running("starting up");
        socket.exists() && output(meshctl(state_dir).args(["status", "--json"])).status.success()
    });
    assert!(ready, "meshd run did not become ready within 60 s");
    let socket_mode = fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(socket_mode, 0o600, "admin socket mode is {socket_mode:o}");
    eprintln!("daemon ready after {:?}", started.elapsed());

    let nodes = run_json(meshctl(state_dir).args(["node", "list", "--json"]));
    let hub = named(&nodes, "hub");
    let hub_key = text(hub, "public_key").to_string();
    let hub_v4 = bare(text(hub, "address")).to_string();
    let hub_v6 = bare(text(hub, "address_v6")).to_string();
    assert_eq!(text(hub, "endpoint"), ENDPOINT);

    // 4. The phone's QR code: the only thing the phone gets.
    let png = work_dir.join("phone1.png");
    run_ok(meshctl(state_dir).args([
        "device",
        "add",
        "phone1",
        "--allow",
        "wallet",
        "--qr-png",
        png.to_str().unwrap(),
    ]));
    let png_mode = fs::metadata(&png).unwrap().permissions().mode() & 0o777;
    assert_eq!(png_mode, 0o600, "QR PNG mode is {png_mode:o}");
    let conf_text = run_ok(Command::new("zbarimg").args(["--raw", "-q", "-Sbinary"]).arg(&png));
    let phone = Phone::up(&phone_ns, &unique_ifname("ph"), &conf_text);
    let conf = &phone.config;
    assert!(conf_text.contains("[Interface]") && conf_text.contains("[Peer]"), "{conf_text}");
    let private_key = base64::engine::general_purpose::STANDARD
        .decode(&conf.private_key)
        .unwrap_or_else(|e| panic!("PrivateKey is not base64 ({e}): {conf_text}"));
    assert_eq!(private_key.len(), 32, "PrivateKey is not 32 bytes");
    assert_eq!(conf.peers.len(), 1, "one peer, the hub: {conf_text}");
    let peer = &conf.peers[0];
    assert_eq!(peer.public_key, hub_key, "the peer is the hub");
    let psk = peer.preshared_key.as_deref().expect("a PresharedKey");
    assert_eq!(
        base64::engine::general_purpose::STANDARD.decode(psk).map(|k| k.len()).ok(),
        Some(32),
        "PresharedKey is not a 32-byte key"
    );
    assert_eq!(peer.persistent_keepalive, Some(25));
    assert_eq!(peer.endpoint.as_deref(), Some(ENDPOINT));
    assert!(!peer.allowed_ips.is_empty(), "no AllowedIPs");
    for cidr in &peer.allowed_ips {
        assert!(inside_mesh(cidr), "AllowedIPs {cidr} reaches beyond the mesh: {conf_text}");
    }
    assert_eq!(conf.addresses.len(), 2, "one v4 and one v6 Address: {conf_text}");
    let dns_servers: Vec<String> = conf.dns_servers.iter().map(|s| s.to_string()).collect();
    assert!(!dns_servers.is_empty(), "no DNS server in {conf_text}");
    for server in &dns_servers {
        assert!(*server == hub_v4 || *server == hub_v6, "DNS {server} is not the hub's mesh address");
    }

    // The controller keeps no copy of the phone's private key, in any form.
    assert_key_not_stored(state_dir, &conf.private_key);
    assert!(!daemon.log_text().contains(&conf.private_key), "meshd logged the phone's private key");

    // 5. Where the services are.
    let services = run_json(meshctl(state_dir).args(["service", "list", "--json"]));
    let wallet = named(&services, "wallet");
    let explorer = named(&services, "explorer");
    assert_eq!(text(wallet, "target"), WALLET_TARGET);
    assert_eq!(text(wallet, "node"), "hub");
    assert_eq!(wallet["devices"], serde_json::json!(["phone1"]));
    assert_eq!(explorer["devices"], serde_json::json!([]));
    let wallet_addr = text(wallet, "mesh_address").to_string();
    let wallet_addr_v6 = text(wallet, "mesh_address_v6").to_string();
    let wallet_dns = text(wallet, "dns_name").to_string();
    let explorer_addr = text(explorer, "mesh_address").to_string();
    let explorer_addr_v6 = text(explorer, "mesh_address_v6").to_string();
    assert_eq!(wallet_dns, "wallet.home.internal");
    let (wallet_ip, wallet_port) = wallet_addr.rsplit_once(':').unwrap();
    assert_eq!(wallet_port, "9737", "the mesh port defaults to the target's");

    // 6. The phone reaches the wallet by mesh address (v4 and v6) and by name...
    let wallet_url = format!("http://{wallet_addr}/");
    let reached =
        wait_until(Duration::from_secs(20), || phone_ns.http_get(&wallet_url, 2).as_deref() == Some("wallet-ok"));
    assert!(reached, "phone cannot reach the wallet at {wallet_url} within 20 s");
    eprintln!("phone reached the wallet after {:?}", started.elapsed());
    let wallet_url_v6 = format!("http://{wallet_addr_v6}/");
    assert_eq!(phone_ns.http_get(&wallet_url_v6, 5).as_deref(), Some("wallet-ok"), "{wallet_url_v6}");
    let by_name = format!("http://{wallet_dns}:{wallet_port}/");
    assert_eq!(phone_ns.http_get(&by_name, 5).as_deref(), Some("wallet-ok"), "{by_name}");

    // ...its mesh DNS answers mesh names and forwards the rest to the node's upstream...
    let dns = &dns_servers[0];
    let answer = dig(&phone_ns, dns, &wallet_dns).expect("mesh DNS answers the wallet's name");
    assert!(answer.iter().any(|a| a == wallet_ip), "{wallet_dns} -> {answer:?}");
    let answer = dig(&phone_ns, dns, "hub.home.internal").expect("mesh DNS answers the hub's name");
    assert!(answer.contains(&hub_v4), "hub.home.internal -> {answer:?}");
    let answer = dig(&phone_ns, dns, "outside.test").expect("mesh DNS forwards other names");
    assert_eq!(answer, [OUTSIDE_ANSWER], "outside.test through the mesh DNS");

    // ...but not the explorer it was not allowed...
    for url in [format!("http://{explorer_addr}/"), format!("http://{explorer_addr_v6}/")] {
        assert_eq!(phone_ns.http_get(&url, 2), None, "phone reached the explorer at {url}");
    }

    // ...nor anything else of the node, which does answer locally...
    for ip in [hub_v4.clone(), format!("[{hub_v6}]")] {
        let url = format!("http://{ip}:8088/");
        assert_eq!(node.http_get(&url, 2).as_deref(), Some("hub-private"), "node itself at {url}");
        assert_eq!(phone_ns.http_get(&url, 2), None, "phone reached the node's {url}");
    }

    // ...whatever it puts in its own AllowedIPs.
    let mut widened = peer.allowed_ips.clone();
    widened.push("169.254.1.0/24".into());
    phone_ns.run(&["wg", "set", &phone.ifname, "peer", &hub_key, "allowed-ips", &widened.join(",")]);
    phone_ns.ip(&["route", "add", "169.254.1.0/24", "dev", &phone.ifname]);
    for target in [WALLET_TARGET, EXPLORER_TARGET] {
        let url = format!("http://{target}/");
        assert_eq!(phone_ns.http_get(&url, 2), None, "phone reached {url} through the tunnel");
    }
    phone_ns.ip(&["route", "del", "169.254.1.0/24", "dev", &phone.ifname]);
    phone_ns.run(&["wg", "set", &phone.ifname, "peer", &hub_key, "allowed-ips", &peer.allowed_ips.join(",")]);
    assert_eq!(phone_ns.http_get(&wallet_url, 5).as_deref(), Some("wallet-ok"), "after the probe");

    // 7. Listings.
    let devices = run_json(meshctl(state_dir).args(["device", "list", "--json"]));
    let phone1 = named(&devices, "phone1");
    let handshake = phone1["last_handshake"]
        .as_i64()
        .unwrap_or_else(|| panic!("phone1 has no last_handshake after traffic: {phone1}"));
    let now = now_secs();
    assert!((now - 600..=now + 5).contains(&handshake), "last_handshake {handshake} is not a recent time (now {now})");
    let addresses: Vec<&str> = conf.addresses.iter().map(|a| bare(a)).collect();
    assert!(addresses.contains(&bare(text(phone1, "address"))), "{phone1} vs {addresses:?}");
    assert!(addresses.contains(&bare(text(phone1, "address_v6"))), "{phone1} vs {addresses:?}");
    assert_eq!(phone1["allow"], serde_json::json!(["wallet"]));
    let phone_pub = phone_ns.run(&["wg", "show", &phone.ifname, "public-key"]);
    assert_eq!(text(phone1, "public_key"), phone_pub.trim());
    let status = run_json(meshctl(state_dir).args(["status", "--json"]));
    assert!(!status["network"].is_null(), "status has no network: {status}");
    named(&status["nodes"], "hub");
    named(&status["devices"], "phone1");
    named(&status["services"], "wallet");
    named(&status["services"], "explorer");

    // Live changes are applied incrementally: a new device and a new service reach the running hub
    // (peer, DNS name, listener) without resetting the phone's session.
    run_ok(meshctl(state_dir).args(["service", "add", "electrs", "--node", "hub", "--target", EXPLORER_TARGET]));
    let laptop = run_json(meshctl(state_dir).args(["device", "add", "laptop1", "--allow", "electrs", "--json"]));
    let hub_peers = node.run(&["wg", "show", &hub_if, "peers"]);
    assert!(hub_peers.contains(text(&laptop, "public_key")), "laptop1 is not a peer of the hub: {hub_peers}");
    let services = run_json(meshctl(state_dir).args(["service", "list", "--json"]));
    let electrs = named(&services, "electrs");
    let electrs_ip = text(electrs, "mesh_address").rsplit_once(':').unwrap().0.to_string();
    let answer = dig(&phone_ns, dns, "electrs.home.internal").expect("mesh DNS answers a service added live");
    assert_eq!(answer, [electrs_ip], "electrs.home.internal");
    assert_eq!(
        phone_ns.http_get(&format!("http://{}/", text(electrs, "mesh_address")), 2),
        None,
        "phone1 reached electrs, which it was not allowed"
    );
    assert_eq!(phone_ns.http_get(&wallet_url, 5).as_deref(), Some("wallet-ok"), "after live changes");
    let devices = run_json(meshctl(state_dir).args(["device", "list", "--json"]));
    assert_eq!(
        named(&devices, "phone1")["last_handshake"].as_i64(),
        Some(handshake),
        "the phone's session was reset by an unrelated change"
    );

    // Rotation: a new config for the same device; the old key stops working within 2 s, the new one
    // reaches the same services from the same addresses.
    let rotated_conf = work_dir.join("phone1-rotated.conf");
    run_ok(meshctl(state_dir).args(["device", "rotate", "phone1", "--conf", rotated_conf.to_str().unwrap()]));
    let rotated_at = Instant::now();
    let rotated = WgQuick::parse(&fs::read_to_string(&rotated_conf).unwrap());
    assert_ne!(rotated.private_key, conf.private_key, "rotation must hand out a new key");
    assert_eq!(rotated.addresses, conf.addresses, "rotation keeps the device's addresses");
    let old_key_cut = wait_until(Duration::from_secs(2), || phone_ns.http_get(&wallet_url, 1).is_none());
    assert!(old_key_cut, "the old key still reached the wallet {:?} after rotation", rotated_at.elapsed());
    let key_file = work_dir.join("rotated.key");
    let psk_file = work_dir.join("rotated.psk");
    write_private(&key_file, &rotated.private_key);
    write_private(&psk_file, rotated.peers[0].preshared_key.as_deref().expect("a PresharedKey"));
    phone_ns.run(&["wg", "set", &phone.ifname, "private-key", key_file.to_str().unwrap()]);
    phone_ns.run(&["wg", "set", &phone.ifname, "peer", &hub_key, "preshared-key", psk_file.to_str().unwrap()]);
    assert!(
        wait_until(Duration::from_secs(10), || phone_ns.http_get(&wallet_url, 2).as_deref() == Some("wallet-ok")),
        "the rotated config does not reach the wallet"
    );

    // A second daemon on the same state dir is refused, and leaves the first one working.
    let mut second_cmd = node.command(product_bin("meshd"));
    second_cmd.args(["run", "--state-dir", state_dir.to_str().unwrap(), "--wireguard", "userspace"]);
    let mut second = Proc::spawn_logged(second_cmd, "second meshd run", &work_dir.join("second.log"));
    let exited = wait_until(Duration::from_secs(15), || !second.is_running());
    assert!(exited, "a second `meshd run` on the same state dir is still running after 15 s");
    let status = second.stop(Duration::ZERO);
    let second_log = second.log_text();
    assert!(!status.success(), "second `meshd run` exited 0: {second_log}");
    assert!(
        second_log.lines().any(|l| l.starts_with("error: ")),
        "second `meshd run` gave no `error: ` line: {second_log}"
    );
    daemon.assert_running("a second daemon was refused");
    assert!(
        wait_until(Duration::from_secs(5), || phone_ns.http_get(&wallet_url, 2).as_deref() == Some("wallet-ok")),
        "the wallet is unreachable after a second `meshd run` was refused"
    );

    // 8. Removal cuts the phone off within 2 s, and for good.
    let out = output(meshctl(state_dir).args(["device", "remove", "phone1"]));
    let removed_at = Instant::now();
    assert!(out.status.success(), "device remove: {}", describe(&out));
    let mut cut_after = None;
    while removed_at.elapsed() <= Duration::from_secs(2) {
        let attempt = removed_at.elapsed();
        if phone_ns.http_get(&wallet_url, 1).is_none() {
            cut_after = Some(attempt);
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let cut_after = cut_after.expect("the phone still reached the wallet 2 s after `device remove`");
    eprintln!("access cut {cut_after:?} after `device remove` returned");
    for _ in 0..3 {
        assert_eq!(phone_ns.http_get(&wallet_url, 1), None, "the removed phone reached the wallet");
        assert_eq!(dig(&phone_ns, dns, &wallet_dns), None, "the removed phone got a DNS answer");
    }
    let devices = run_json(meshctl(state_dir).args(["device", "list", "--json"]));
    let names: Vec<&str> = devices.as_array().unwrap().iter().filter_map(|d| d["name"].as_str()).collect();
    assert_eq!(names, ["laptop1"], "device list after removal");
    daemon.assert_running("the test ended");
    eprintln!("e2e test took {:?}", started.elapsed());
}

/// Removes the hub's UAPI socket file if the daemon left it behind when stopped.
struct SocketCleanup(String);

impl Drop for SocketCleanup {
    fn drop(&mut self) {
        let _ = fs::remove_file(Path::new(meshd_e2e::WG_SOCKET_DIR).join(format!("{}.sock", self.0)));
    }
}

/// `dig +short TYPE NAME @server` from a namespace: the answer lines, or None when the query failed.
fn dig_type(ns: &Netns, server: &str, record: &str, name: &str) -> Option<Vec<String>> {
    let out = ns.exec(&["dig", "+short", "+time=2", "+tries=1", record, &format!("@{server}"), name]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    (out.status.success() && !stdout.contains(";;")).then(|| stdout.lines().map(|l| l.trim().to_string()).collect())
}

/// Whether `socket` gets no echo from `to` in three tries.
fn no_echo(socket: &std::net::UdpSocket, to: SocketAddr) -> bool {
    (0..3).all(|_| !udp_echoed(socket, to, Duration::from_millis(700)))
}

/// Waits up to 2 s for the echo from `to` to stop on `socket`; how long it took.
fn echo_stops_within_2s(socket: &std::net::UdpSocket, to: SocketAddr) -> Option<Duration> {
    let since = Instant::now();
    while since.elapsed() <= Duration::from_secs(2) {
        if !udp_echoed(socket, to, Duration::from_millis(300)) {
            return Some(since.elapsed());
        }
    }
    None
}

/// Issue 8, point 6: a UDP service is forwarded with the same per-device access as a TCP one. The echo
/// server runs in the service namespace; the allowed phone gets its datagrams back over IPv4 and IPv6
/// (from the service's own mesh address, found by name), a phone not allowed gets nothing, a grant
/// withdrawn cuts the phone's open session, and `device remove` ends the echo.
#[test]
fn phone_gets_udp_echoes_only_while_allowed() {
    if !require_root() {
        return;
    }
    let state = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let (state_dir, work_dir) = (state.path(), work.path());

    let node = Netns::new("unode");
    let svc = Netns::new("usvc");
    let phone_ns = Netns::new("uphone");
    let other_ns = Netns::new("uother");
    veth(&node, &svc, NODE_SVC, &format!("{SVC_ADDR}/24"));
    veth(&node, &phone_ns, &format!("{NODE_WAN}/24"), PHONE_WAN);
    veth(&node, &other_ns, "172.31.202.1/24", "172.31.202.2/24");
    other_ns.ip(&["route", "add", "default", "via", "172.31.202.1"]);
    node.run(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    svc.ip(&["route", "add", "default", "via", "169.254.1.1"]);

    // The echo service, and a UDP echo of the node itself on the wallet's port: a TCP grant must not let
    // UDP through to it.
    let echo_server = svc.udp_echo(&format!("{SVC_ADDR}:7007"));
    let _node_private = node.udp_echo("[::]:9737");
    let echo_target: SocketAddr = format!("{SVC_ADDR}:7007").parse().unwrap();
    let node_socket = node.udp_socket("0.0.0.0:0");
    assert!(udp_echoed(&node_socket, echo_target, Duration::from_secs(2)), "the echo service does not answer");

    let hub_if = init_hub(&node, state_dir, "uh");
    let added = run_json(meshctl(state_dir).args([
        "service",
        "add",
        "echo",
        "--node",
        "hub",
        "--target",
        "169.254.1.17:7007",
        "--port",
        "7",
        "--udp",
        "--json",
    ]));
    assert_eq!(text(&added, "protocol"), "udp", "{added}");
    run_ok(meshctl(state_dir).args(["service", "add", "wallet", "--node", "hub", "--target", WALLET_TARGET]));

    let mut daemon_cmd = node.command(product_bin("meshd"));
    daemon_cmd.env("RUST_LOG", "info,meshd::host::forward=debug").args([
        "run",
        "--state-dir",
        state_dir.to_str().unwrap(),
        "--wireguard",
        "userspace",
    ]);
    let _socket_cleanup = SocketCleanup(hub_if.clone());
    let mut daemon = Proc::spawn_logged(daemon_cmd, "meshd run", &work_dir.join("meshd.log"));
    let socket = state_dir.join("meshd.sock");
    let ready = wait_until(Duration::from_secs(60), || {
        daemon.assert_running("starting up");
        socket.exists() && output(meshctl(state_dir).args(["status", "--json"])).status.success()
    });
    assert!(ready, "meshd run did not become ready within 60 s");

    let services = run_json(meshctl(state_dir).args(["service", "list", "--json"]));
    assert_eq!(text(named(&services, "echo"), "protocol"), "udp");
    assert_eq!(text(named(&services, "wallet"), "protocol"), "tcp");
    let table = run_ok(meshctl(state_dir).args(["service", "list"]));
    assert!(table.lines().any(|l| l.starts_with("echo ") && l.trim_end().ends_with(" udp")), "{table}");
    let wallet_v4: SocketAddr = text(named(&services, "wallet"), "mesh_address").parse().unwrap();
    let wallet_v6: SocketAddr = text(named(&services, "wallet"), "mesh_address_v6").parse().unwrap();

    // Two phones: one allowed the echo (and the wallet), one only the wallet.
    let phone_up = |ns: &Netns, name: &str, allow: &str| {
        let conf = work_dir.join(format!("{name}.conf"));
        run_ok(meshctl(state_dir).args(["device", "add", name, "--allow", allow, "--conf", conf.to_str().unwrap()]));
        Phone::up(ns, &unique_ifname("up"), &fs::read_to_string(&conf).unwrap())
    };
    let phone = phone_up(&phone_ns, "phone1", "echo,wallet");
    let other = phone_up(&other_ns, "phone2", "wallet");
    let dns = phone.config.dns_servers[0].to_string();

    // The allowed phone finds the echo by name and gets its datagrams back over v4 and v6, from the
    // service's address.
    let resolve = |ns: &Netns, record: &str| -> Option<String> {
        dig_type(ns, &dns, record, "echo.home.internal").and_then(|answer| answer.into_iter().next())
    };
    let mut echo_v4 = None;
    assert!(
        wait_until(Duration::from_secs(20), || {
            echo_v4 = resolve(&phone_ns, "A");
            echo_v4.is_some()
        }),
        "the phone cannot resolve echo.home.internal through its tunnel"
    );
    let echo_v4: SocketAddr = format!("{}:7", echo_v4.unwrap()).parse().unwrap();
    let echo_v6: SocketAddr = format!("[{}]:7", resolve(&phone_ns, "AAAA").expect("an AAAA record")).parse().unwrap();
    assert_eq!(echo_v4.to_string(), text(named(&services, "echo"), "mesh_address"));
    assert_eq!(echo_v6.to_string(), text(named(&services, "echo"), "mesh_address_v6"));
    let v4 = phone_ns.udp_socket("0.0.0.0:0");
    let v6 = phone_ns.udp_socket("[::]:0");
    assert!(
        wait_until(Duration::from_secs(10), || udp_echoed(&v4, echo_v4, Duration::from_secs(1))),
        "the allowed phone gets no echo from {echo_v4}"
    );
    assert!(udp_echoed(&v6, echo_v6, Duration::from_secs(2)), "the allowed phone gets no echo from {echo_v6}");

    // A TCP grant admits no UDP: the node answers UDP on the wallet's port itself, but not the phone.
    assert!(udp_echoed(&node_socket, wallet_v4, Duration::from_secs(2)), "the node's own echo on {wallet_v4}");
    assert!(no_echo(&v4, wallet_v4) && no_echo(&v6, wallet_v6), "UDP passed a TCP grant");

    // The phone not allowed gets nothing, over either family, though its tunnel works (it resolves).
    assert!(
        wait_until(Duration::from_secs(20), || resolve(&other_ns, "A").is_some()),
        "phone2's tunnel does not come up"
    );
    let other_v4 = other_ns.udp_socket("0.0.0.0:0");
    let other_v6 = other_ns.udp_socket("[::]:0");
    assert!(no_echo(&other_v4, echo_v4) && no_echo(&other_v6, echo_v6), "a phone not allowed got an echo");

    // Granted live, it gets echoes, and what the service sends on the open session unasked. Withdrawn
    // (conntrack still calls the flow established, so this is the forwarder's doing): within 2 s its
    // datagrams get no echo and the session is gone, so the service's pushes reach it no more.
    run_ok(meshctl(state_dir).args(["device", "update", "phone2", "--allow", "echo,wallet"]));
    assert!(udp_echoed(&other_v6, echo_v6, Duration::from_secs(5)), "phone2 over IPv6 after the grant");
    assert!(
        wait_until(Duration::from_secs(5), || udp_echoed(&other_v4, echo_v4, Duration::from_millis(500))),
        "phone2 gets no echo after being granted the service"
    );
    assert!(echo_server.push(b"pushed"), "the echo server saw phone2");
    assert!(udp_received(&other_v4, echo_v4, b"pushed", Duration::from_secs(2)), "a push on the open session");
    run_ok(meshctl(state_dir).args(["device", "update", "phone2", "--allow", "wallet"]));
    let cut = echo_stops_within_2s(&other_v4, echo_v4).expect("phone2 still echoed 2 s after its grant was withdrawn");
    eprintln!("UDP echo stopped {cut:?} after the grant was withdrawn");
    assert!(echo_server.push(b"pushed after"));
    assert!(
        !udp_received(&other_v4, echo_v4, b"pushed after", Duration::from_secs(1)),
        "the session outlived the grant: the service still reaches phone2"
    );
    assert!(no_echo(&other_v4, echo_v4) && no_echo(&other_v6, echo_v6), "echo after the grant was withdrawn");

    // Removal ends the allowed phone's echo too, and for good.
    assert!(udp_echoed(&v4, echo_v4, Duration::from_secs(2)), "phone1 lost its echo before its removal");
    run_ok(meshctl(state_dir).args(["device", "remove", "phone1"]));
    echo_stops_within_2s(&v4, echo_v4).expect("phone1 still echoed 2 s after `device remove`");
    assert!(no_echo(&v4, echo_v4) && no_echo(&v6, echo_v6), "the removed phone got an echo");
    daemon.assert_running("the test ended");
    drop((phone, other));
}
