//! Issue 10, point 4: paths smaller than 1500 bytes. The cellar's uplink is a 1400-byte hop and its router
//! eats ICMP "fragmentation needed", as nested tunnels and some providers do: with WireGuard's default MTU
//! of 1420 (1480-byte datagrams on the wire) bulk transfers to it stall while pings pass. `meshd init --mtu
//! 1340` and `meshd join --mtu 1340` (1400 less WireGuard's 60 bytes over an IPv4 path: 20 IPv4, 8 UDP,
//! 32 WireGuard) make them work, directly and through the hub; the hub clamps the MSS of what it forwards to
//! its own MTU, so hosts with a larger MTU of their own get through it too; `meshctl node update --mtu`
//! changes a running interface.
//!
//! Namespaces: `router` stands for the internet and is the home router (NAT) of `cellar` (behind the
//! 1400-byte hop) and `attic` (a plain 1500-byte link); `hub` has a public address. The attic and the
//! cellar both lack an endpoint, so their traffic goes through the hub.

use std::io::Write;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use meshd_e2e::{
    MeshHost, Proc, meshctl, nat_router, output, product_bin, require_root, router, run_json, run_ok, uplink,
    wait_until,
};
use serde_json::Value;

/// Bytes of each transfer: several megabytes, thousands of full-sized segments.
const TRANSFER: usize = 8 << 20;

/// A TCP server that sends [`TRANSFER`] bytes to every client (each on its own thread: a stalled one
/// blocks no other) and logs the MSS the connection uses (the
/// smaller of the client's announced MSS, as it arrived, and what the server's own MTU allows, less the
/// TCP options every segment carries).
const SERVER: &str = r#"
import socket, sys, threading
def send(c):
    try:
        c.sendall(b"x" * int(sys.argv[2]))
    except OSError:
        pass
    c.close()
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 5001))
s.listen()
print("listening", flush=True)
while True:
    c, _ = s.accept()
    print("mss", c.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG), flush=True)
    threading.Thread(target=send, args=(c,), daemon=True).start()
"#;

/// A client that reads until the server closes and prints how many bytes came; it gives up when nothing
/// arrives for 4 s (a stalled transfer).
const CLIENT: &str = r#"
import socket, sys
c = socket.create_connection((sys.argv[1], 5001), timeout=4)
n = 0
try:
    while True:
        b = c.recv(1 << 16)
        if not b:
            break
        n += len(b)
except socket.timeout:
    pass
print(n)
"#;

fn node<'a>(nodes: &'a Value, name: &str) -> &'a Value {
    nodes.as_array().unwrap().iter().find(|n| n["name"] == name).unwrap_or_else(|| panic!("{name} in {nodes}"))
}

/// `meshd join` behind NAT (no endpoint) with `--mtu`, the token on standard input.
fn join(host: &MeshHost, token: &str, mtu: &str) -> Output {
    let mut cmd = host.ns.command(product_bin("meshd"));
    cmd.args(["join", "-", "--interface", &host.ifname, "--mtu", mtu]).arg("--state-dir").arg(&host.state);
    let mut child =
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("meshd join");
    child.stdin.take().expect("stdin").write_all(token.as_bytes()).expect("token to meshd join");
    child.wait_with_output().expect("meshd join")
}

/// The MTU of `host`'s mesh interface, as `ip link` shows it.
fn interface_mtu(host: &MeshHost) -> u32 {
    let text = host.ns.ip(&["-o", "link", "show", "dev", &host.ifname]);
    let mtu = text.split_whitespace().skip_while(|w| *w != "mtu").nth(1);
    mtu.and_then(|m| m.parse().ok()).unwrap_or_else(|| panic!("no MTU in {text}"))
}

/// A transfer server on `addr` (a mesh address of `host`), ready once it listens.
fn serve(host: &MeshHost, addr: &str, log: &std::path::Path) -> Proc {
    let size = TRANSFER.to_string();
    let mut server = host.ns.spawn_logged(&["/usr/bin/python3", "-c", SERVER, addr, &size], log);
    assert!(wait_until(Duration::from_secs(10), || server.log_text().contains("listening")), "server on {addr}");
    server.assert_running("listening");
    server
}

/// Bytes `host` receives from the server at `addr`, and how long it took.
fn download(host: &MeshHost, addr: &str) -> (usize, Duration) {
    let started = Instant::now();
    let out = host.ns.exec(&["timeout", "60", "/usr/bin/python3", "-c", CLIENT, addr]);
    let text = String::from_utf8_lossy(&out.stdout);
    let bytes = text.trim().parse().unwrap_or_else(|_| panic!("client output {text:?}, {:?}", out.stderr));
    (bytes, started.elapsed())
}

/// The MSS values the server logged, in order.
fn logged_mss(server: &Proc) -> Vec<u32> {
    server.log_text().lines().filter_map(|l| l.strip_prefix("mss ")).filter_map(|m| m.parse().ok()).collect()
}

#[test]
fn bulk_transfers_cross_a_small_path_that_eats_icmp_directly_and_through_the_hub() {
    if !require_root() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let router = router("router");
    let hub = MeshHost::new("hub", root, "pm");
    let cellar = MeshHost::new("cellar", root, "pm");
    let attic = MeshHost::new("attic", root, "pm");
    uplink(&router, &hub.ns, "172.31.250");
    let (to_cellar, cellar_uplink) = uplink(&router, &cellar.ns, "192.168.250");
    let (to_attic, _) = uplink(&router, &attic.ns, "192.168.251");
    nat_router(&router, &[("192.168.250.0/24", to_cellar.as_str()), ("192.168.251.0/24", to_attic.as_str())]);
    // The small hop, and a router that eats the ICMP that would tell senders about it.
    router.ip(&["link", "set", "dev", &to_cellar, "mtu", "1400"]);
    cellar.ns.ip(&["link", "set", "dev", &cellar_uplink, "mtu", "1400"]);
    let blackhole = "table inet pmtu_blackhole {\n  chain forward {\n    type filter hook forward priority -10;\n    \
                     icmp type destination-unreachable icmp code frag-needed drop\n  }\n  chain output {\n    \
                     type filter hook output priority -10;\n    \
                     icmp type destination-unreachable icmp code frag-needed drop\n  }\n}\n";
    let mut nft = router.command("nft").args(["-f", "-"]).stdin(Stdio::piped()).spawn().unwrap();
    nft.stdin.take().unwrap().write_all(blackhole.as_bytes()).unwrap();
    assert!(nft.wait().unwrap().success(), "router rules:\n{blackhole}");

    // A network whose MTU fits the small path; the cellar says so too; the attic's own path is clean.
    let mut init = Command::new(product_bin("meshd"));
    init.args(["init", "--network", "home", "--name", "hub", "--endpoint", "172.31.250.2:51820", "--mtu", "1340"]);
    let created = run_ok(init.args(["--interface", &hub.ifname]).arg("--state-dir").arg(&hub.state));
    assert!(created.contains("MTU 1340"), "{created}");
    // A phone behind the same path gets the network's MTU in its config.
    run_ok(meshctl(&hub.state).args(["service", "add", "wallet", "--node", "hub", "--target", "127.0.0.1:9737"]));
    let config = run_ok(meshctl(&hub.state).args(["device", "add", "phone", "--allow", "wallet", "--conf", "-"]));
    assert!(config.contains("\nMTU = 1340\n"), "{config}");
    let mut hub_daemon = hub.run_hub(&root.join("hub.log"));
    for (host, mtu) in [(&cellar, "1340"), (&attic, "1420")] {
        let token = run_ok(meshctl(&hub.state).args(["node", "invite", host.name]));
        let out = join(host, token.trim(), mtu);
        assert!(out.status.success(), "{} join: {}", host.name, String::from_utf8_lossy(&out.stderr));
    }
    let _daemons = [&cellar, &attic].map(|h| h.run_daemon(&root.join(format!("{}.log", h.name))));
    let nodes = run_json(meshctl(&hub.state).args(["node", "list", "--json"]));
    let mesh = |name: &str| node(&nodes, name)["address"].as_str().unwrap().to_string();
    let mtus: Vec<u64> = ["hub", "cellar", "attic"].iter().map(|n| node(&nodes, n)["mtu"].as_u64().unwrap()).collect();
    assert_eq!(mtus, [1340, 1340, 1420]);
    assert_eq!(run_json(meshctl(&hub.state).args(["status", "--json"]))["network"]["mtu"], 1340);
    for from in [&cellar, &attic] {
        assert!(wait_until(Duration::from_secs(20), || from.pings(&mesh("hub"))), "{} -> hub", from.name);
    }
    assert!(wait_until(Duration::from_secs(10), || attic.pings(&mesh("cellar"))), "attic -> cellar via the hub");
    for (host, mtu) in [(&hub, 1340), (&cellar, 1340), (&attic, 1420)] {
        assert_eq!(interface_mtu(host), mtu, "{}'s interface", host.name);
    }

    // Directly: the hub's full-sized packets cross the small hop.
    let hub_server = serve(&hub, &mesh("hub"), &root.join("hub-server.log"));
    let (bytes, took) = download(&cellar, &mesh("hub"));
    assert_eq!(bytes, TRANSFER, "hub -> cellar over the 1400-byte hop ({took:?})");
    eprintln!("hub -> cellar: {} MiB in {took:?} at MTU 1340", TRANSFER >> 20);

    // Through the hub, from the attic (MTU 1420 of its own): the cellar's MSS keeps it small.
    let attic_server = serve(&attic, &mesh("attic"), &root.join("attic-server.log"));
    let (bytes, took) = download(&cellar, &mesh("attic"));
    assert_eq!(bytes, TRANSFER, "attic -> hub -> cellar ({took:?})");
    eprintln!("attic -> hub -> cellar: {} MiB in {took:?}", TRANSFER >> 20);

    // The cellar's operator gives it a larger MTU of its own: its interface follows at once. Both ends now
    // announce 1380 bytes; the hub, which forwards between them out of its 1340-byte interface, clamps
    // what the connection uses to 1300 (1340 less 40), and the transfer goes through.
    run_ok(meshctl(&hub.state).args(["node", "update", "cellar", "--mtu", "1420"]));
    assert!(wait_until(Duration::from_secs(2), || interface_mtu(&cellar) == 1420), "the cellar's interface MTU");
    let (bytes, took) = download(&cellar, &mesh("attic"));
    assert_eq!(bytes, TRANSFER, "attic -> hub -> cellar with both ends at 1420 ({took:?})");
    // The socket reports the MSS less the 12 bytes of TCP timestamps each segment carries: 1300 is 1288.
    assert_eq!(logged_mss(&attic_server).last(), Some(&1288), "the hub clamps the MSS to its MTU");
    let (bytes, _) = download(&cellar, &mesh("hub"));
    assert_eq!(bytes, TRANSFER, "hub -> cellar: the hub's own MTU still fits the path");

    // Without a fitting MTU, the path eats full-sized packets: with the hub at the default 1420 too,
    // the transfer to the cellar stalls while pings pass.
    run_ok(meshctl(&hub.state).args(["node", "update", "hub", "--mtu", "1420"]));
    assert!(wait_until(Duration::from_secs(2), || interface_mtu(&hub) == 1420), "the hub's interface MTU");
    let (bytes, took) = download(&cellar, &mesh("hub"));
    assert!(bytes < TRANSFER, "at MTU 1420 the transfer should stall, but {bytes} bytes came in {took:?}");
    assert!(cellar.pings(&mesh("hub")), "pings pass all the while");
    eprintln!("at MTU 1420: {bytes} of {TRANSFER} bytes before the transfer stalled");
    assert_eq!(logged_mss(&hub_server).last(), Some(&1368), "1380 less 12 bytes of timestamps");

    // The declaration file sets MTUs too: the network's, and the cellar's own back to what fits its path;
    // the transfer goes through again. A second apply changes nothing.
    let file = root.join("network.toml");
    let declared = "mtu = 1320\n\n[[node]]\nname = \"cellar\"\nmtu = 1340\n\n[[node]]\nname = \"attic\"\n\n\
                    [[service]]\nname = \"wallet\"\nnode = \"hub\"\ntarget = \"127.0.0.1:9737\"\n\n\
                    [[device]]\nname = \"phone\"\nallow = [\"wallet\"]\n";
    std::fs::write(&file, declared).unwrap();
    let out = output(meshctl(&hub.state).arg("apply").arg(&file));
    let (applied, warning) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{applied}{warning}");
    assert!(
        applied.contains("~ network: mtu 1340 -> 1320") && applied.contains("~ node cellar: mtu 1420 -> 1340"),
        "{applied}"
    );
    assert!(warning.contains("the config of these devices has the network's old MTU: phone"), "{warning}");
    assert!(wait_until(Duration::from_secs(2), || interface_mtu(&cellar) == 1340), "the cellar's interface MTU");
    assert_eq!(run_json(meshctl(&hub.state).args(["status", "--json"]))["network"]["mtu"], 1320);
    let (bytes, took) = download(&cellar, &mesh("hub"));
    assert_eq!(bytes, TRANSFER, "hub (1420) -> cellar (1340): the cellar's MSS fits the path ({took:?})");
    assert_eq!(run_ok(meshctl(&hub.state).arg("apply").arg(&file)).trim(), "no changes");
    hub_daemon.assert_running("after the changes");
}
