//! Issue 11, point 6: other users on the host cannot take the tunnel or read its key.
//!
//! A hub runs the embedded userspace WireGuard in a namespace; an unprivileged process there (uid 65534
//! through `setpriv`) plays the other user. It tries to bind the WireGuard UDP port beside meshd, with
//! `SO_REUSEADDR` and `SO_REUSEPORT`, on `0.0.0.0`, the hub's address and `[::]` (before the fix, the
//! device's own `SO_REUSEADDR` let it, and it received the phone's packets: the phone lost access until
//! it exited); every bind is refused and a phone keeps reaching its service while the process runs. With
//! meshd started under `umask 000`, it tries the UAPI socket, which answers `get=1` with the private
//! key (before the fix it was world-writable and did): refused, and the socket is 0600.
//!
//! The same user listens on a service's port on every address (`0.0.0.0:PORT`, TCP and UDP) before meshd
//! starts: before the fix meshd's forwarder could not bind the service's mesh address, meshd exited at
//! start (and, with the user's listener started later, the kernel handed the phone's connections to it);
//! now the forwarder listens on a port only root can bind and the rules send the service's port there.
//! Holding the WireGuard or join port while meshd is stopped gets a one-line refusal naming the holder
//! (not boringtun's panics), and meshd holds no UDP socket but its listen port's.
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use meshd_e2e::{
    MeshHost, Phone, Proc, WG_SOCKET_DIR, describe, meshctl, output, product_bin, require_root, run_json, run_ok,
    unique_ifname, veth, wait_until,
};

/// What the other user runs: bind `port` on each address given (IPv6 both v6-only and dual-stack), with
/// `SO_REUSEADDR` and `SO_REUSEPORT`; print each outcome, then `ready`; then receive on whatever it
/// bound for `hold` seconds and print how many packets it took.
const BIND_PORT: &str = r#"
import socket, sys, time
port, hold, addrs = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3:]
held = []
for addr in addrs:
    v6 = ":" in addr
    for v6only in ([1, 0] if v6 else [None]):
        s = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if v6only is not None:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, v6only)
        try:
            s.bind((addr, port))
            s.setblocking(False)
            held.append(s)
            print(f"{addr} v6only={v6only}: bound", flush=True)
        except OSError as e:
            print(f"{addr} v6only={v6only}: refused errno {e.errno}", flush=True)
print("ready", flush=True)
got, deadline = 0, time.time() + hold
while time.time() < deadline:
    for s in held:
        try:
            s.recv(4096)
            got += 1
        except BlockingIOError:
            pass
    time.sleep(0.005)
print(f"received {got}", flush=True)
"#;

/// What the other user runs against a UAPI socket: `get=1`, and whether the answer held a private key.
const ASK_KEY: &str = r#"
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    s.connect(sys.argv[1])
    s.sendall(b"get=1\n\n")
    data = b""
    while True:
        chunk = s.recv(65536)
        if not chunk or b"errno=" in data + chunk:
            data += chunk
            break
        data += chunk
    print("answered; private key: " + str(b"private_key=" in data), flush=True)
except OSError as e:
    print(f"refused errno {e.errno}", flush=True)
"#;

/// What the other user runs on meshd's ports: listen on TCP and UDP `PORT...` on `0.0.0.0` and `[::]`
/// (with `SO_REUSEADDR`), print `ready`, then answer every connection and datagram with `squatter` and
/// print a line for each.
const SQUAT_SERVICE: &str = r#"
import select, socket, sys
socks = []
for port, family, addr in ((int(p), f, a) for p in sys.argv[1:] for f, a in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::"))):
    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        s = socket.socket(family, kind)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind((addr, port))
        if kind == socket.SOCK_STREAM:
            s.listen(64)
        socks.append(s)
print("ready", flush=True)
while True:
    for s in select.select(socks, [], [])[0]:
        if s.type == socket.SOCK_STREAM:
            conn, peer = s.accept()
            print(f"connection from {peer[0]}", flush=True)
            conn.sendall(b"squatter\n")
            conn.close()
        else:
            data, peer = s.recvfrom(4096)
            print(f"datagram from {peer[0]}", flush=True)
            s.sendto(b"squatter", peer)
"#;

/// `/usr/bin/python3 -c SCRIPT ARGS` as uid and gid 65534 inside `host`'s namespace.
fn as_nobody(host: &MeshHost, script: &str, args: &[&str]) -> Command {
    let mut cmd = host.ns.command("setpriv");
    cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3", "-c", script]).args(args);
    cmd
}

#[test]
fn another_user_cannot_bind_the_wireguard_port_and_the_phone_keeps_its_access() {
    if !require_root() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let hub = MeshHost::new("hub", root, "lu");
    let phone_ns = meshd_e2e::Netns::new("phone");
    veth(&hub.ns, &phone_ns, "172.31.246.1/24", "172.31.246.2/24");
    hub.init_hub("172.31.246.1:51820", &[]);
    run_ok(meshctl(&hub.state).args(["service", "add", "wallet", "--node", "hub", "--target", "127.0.0.1:9737"]));
    let conf = root.join("phone.conf");
    run_ok(meshctl(&hub.state).args(["device", "add", "phone", "--allow", "wallet", "--conf"]).arg(&conf));
    let _wallet =
        hub.ns.spawn(&["python3", "-m", "http.server", "9737", "--bind", "127.0.0.1", "--directory", "/proc/self"]);
    let _hub_daemon = hub.run_hub(&root.join("hub.log"));
    let services = run_json(meshctl(&hub.state).args(["service", "list", "--json"]));
    let wallet_url = format!("http://{}/", services[0]["mesh_address"].as_str().unwrap());
    let _phone = Phone::up(&phone_ns, &unique_ifname("lp"), &fs::read_to_string(&conf).unwrap());
    let phone_reaches = || phone_ns.http_get_within(&wallet_url, Duration::from_millis(800)).is_some();
    assert!(wait_until(Duration::from_secs(30), phone_reaches), "the phone never reached the wallet");

    // The other user tries the port on every address, holding what it gets for 8 s.
    let log = root.join("nobody.log");
    let mut attacker = Proc::spawn_logged(
        as_nobody(&hub, BIND_PORT, &["51820", "8", "0.0.0.0", "172.31.246.1", "::"]),
        "the other user's bind",
        &log,
    );
    assert!(wait_until(Duration::from_secs(10), || fs::read_to_string(&log).unwrap_or_default().contains("ready")));
    let said = fs::read_to_string(&log).unwrap();
    // While it runs, the phone keeps its access: fresh connections through the tunnel for 6 s.
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(6) {
        assert!(phone_reaches(), "the phone lost access while another user's socket was up:\n{said}");
        std::thread::sleep(Duration::from_millis(300));
    }
    let outcomes: Vec<&str> = said.lines().filter(|l| l.contains(": ")).collect();
    assert_eq!(outcomes.len(), 4, "{said}");
    for line in &outcomes {
        assert!(line.ends_with("refused errno 98"), "another user bound the WireGuard port: {line}\n{said}");
    }
    assert!(wait_until(Duration::from_secs(10), || !attacker.is_running()));
    let said = attacker.log_text();
    assert!(said.contains("received 0"), "{said}");
}

#[test]
fn the_uapi_socket_is_private_whatever_the_umask() {
    if !require_root() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let hub = MeshHost::new("hub", root, "lk");
    hub.ns.ip(&["link", "set", "lo", "up"]);
    hub.init_hub("192.0.2.1:51820", &[]);
    // Started as a careless service manager or shell might: everything it makes open to all.
    let mut cmd = hub.ns.command("sh");
    cmd.args(["-c", "umask 000; exec \"$0\" run --wireguard userspace --state-dir \"$1\""])
        .arg(product_bin("meshd"))
        .arg(&hub.state);
    let mut daemon = Proc::spawn_logged(cmd, "meshd run under umask 000", &root.join("hub.log"));
    let uapi = Path::new(WG_SOCKET_DIR).join(format!("{}.sock", hub.ifname));
    let ready = wait_until(Duration::from_secs(60), || {
        daemon.assert_running("starting up under umask 000");
        hub.state.join("meshd.sock").exists() && uapi.exists()
    });
    assert!(ready, "the hub did not come up:\n{}", daemon.log_text());

    let out = output(&mut as_nobody(&hub, ASK_KEY, &[uapi.to_str().unwrap()]));
    let said = String::from_utf8_lossy(&out.stdout);
    assert_eq!(said.trim(), "refused errno 13", "another user asked the UAPI socket for the key: {}", describe(&out));
    let mode = fs::metadata(&uapi).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "UAPI socket {} has mode {mode:o}", uapi.display());
    let dir_mode = fs::metadata(WG_SOCKET_DIR).unwrap().permissions().mode();
    assert_eq!(dir_mode & 0o022, 0, "{WG_SOCKET_DIR} is writable by others ({dir_mode:o})");
    let admin_mode = fs::metadata(hub.state.join("meshd.sock")).unwrap().permissions().mode() & 0o777;
    assert_eq!(admin_mode, 0o600, "the admin socket has mode {admin_mode:o}");
    // meshd itself still configures its device (its own calls work), and the hub still serves.
    let nodes = run_json(meshctl(&hub.state).args(["node", "list", "--json"]));
    assert_eq!(nodes[0]["name"], "hub");
    daemon.assert_running("another user was refused the UAPI socket");
}

#[test]
fn another_users_listener_on_a_service_port_gets_none_of_its_clients() {
    if !require_root() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let hub = MeshHost::new("hub", root, "ls");
    let phone_ns = meshd_e2e::Netns::new("phone");
    veth(&hub.ns, &phone_ns, "172.31.247.1/24", "172.31.247.2/24");
    hub.ns.ip(&["link", "set", "lo", "up"]);
    hub.init_hub("172.31.247.1:51820", &[]);
    // The services' own ports on the mesh (7001 TCP, 7001 UDP) are free on the host for anyone to bind:
    // their targets listen elsewhere.
    let add = |name: &str, target: &str, udp: bool| {
        let mut cmd = meshctl(&hub.state);
        cmd.args(["service", "add", name, "--node", "hub", "--target", target, "--port", "7001"]);
        run_ok(if udp { cmd.arg("--udp") } else { &mut cmd });
    };
    add("bank", "127.0.0.1:9737", false);
    add("ping", "127.0.0.1:9738", true);
    let conf = root.join("phone.conf");
    run_ok(meshctl(&hub.state).args(["device", "add", "phone", "--allow", "bank,ping", "--conf"]).arg(&conf));
    let _bank =
        hub.ns.spawn(&["python3", "-m", "http.server", "9737", "--bind", "127.0.0.1", "--directory", "/proc/self"]);
    let _ping = hub.ns.udp_echo("127.0.0.1:9738");

    // The other user takes port 7001 and the sync service's port everywhere while meshd is stopped.
    let squat_log = root.join("squatter.log");
    let squat = as_nobody(&hub, SQUAT_SERVICE, &["7001", "51871"]);
    let _squatter = Proc::spawn_logged(squat, "the other user's listener", &squat_log);
    assert!(wait_until(Duration::from_secs(10), || fs::read_to_string(&squat_log)
        .unwrap_or_default()
        .contains("ready")));

    let log = root.join("hub.log");
    let mut daemon = hub.run_hub(&log);
    let services = run_json(meshctl(&hub.state).args(["service", "list", "--json"]));
    let address = |name: &str, key: &str| -> std::net::SocketAddr {
        let service = services.as_array().unwrap().iter().find(|s| s["name"] == name).unwrap();
        service[key].as_str().unwrap().parse().unwrap()
    };
    let nodes = run_json(meshctl(&hub.state).args(["node", "list", "--json"]));
    let hub_ip = nodes[0]["address"].as_str().unwrap().to_owned();
    let phone = Phone::up(&phone_ns, &unique_ifname("ls"), &fs::read_to_string(&conf).unwrap());
    let v4 = phone_ns.udp_socket("0.0.0.0:0");
    let v6 = phone_ns.udp_socket("[::]:0");
    let squatted = || fs::read_to_string(&squat_log).unwrap_or_default().lines().filter(|l| l != &"ready").count();
    let mut check = |when: &str| {
        for key in ["mesh_address", "mesh_address_v6"] {
            let url = format!("http://{}/", address("bank", key));
            let mut page = None;
            let reached = wait_until(Duration::from_secs(30), || {
                page = phone_ns.http_get_within(&url, Duration::from_millis(800));
                page.is_some()
            });
            assert!(reached, "{when}: the phone never reached bank at {url}:\n{}", daemon.log_text());
            assert!(page.unwrap().contains("status"), "{when}: {url} did not answer with bank's page");
            let socket = if key == "mesh_address" { &v4 } else { &v6 };
            let echoed = wait_until(Duration::from_secs(10), || {
                meshd_e2e::udp_echoed(socket, address("ping", key), Duration::from_millis(500))
            });
            assert!(echoed, "{when}: the phone got no echo from ping at {}", address("ping", key));
        }
        // The host's own processes writing to the service's address are sent to meshd's forwarder too, and
        // to the hub's sync service (which closes at once on a caller that is no member: the host itself).
        let local = format!("http://{}/", address("bank", "mesh_address"));
        let _ = hub.ns.http_get_within(&local, Duration::from_millis(800));
        let sync = format!("exec 3<>/dev/tcp/{hub_ip}/51871 && timeout 2 cat <&3");
        let out = hub.ns.exec(&["bash", "-c", &sync]);
        assert!(out.status.success(), "{when}: the sync port took no connection: {}", describe(&out));
        assert!(!String::from_utf8_lossy(&out.stdout).contains("squatter"), "{when}: {}", describe(&out));
        assert_eq!(
            squatted(),
            0,
            "{when}: the other user's listener got clients:\n{}",
            fs::read_to_string(&squat_log).unwrap()
        );
        daemon.assert_running(when);
    };
    check("started beside another user's listener");
    // A restart with the listener still there: meshd comes back and keeps the service.
    daemon.stop(Duration::from_secs(10));
    let mut daemon = hub.run_hub(&log);
    let mut check_again = |when: &str| {
        let url = format!("http://{}/", address("bank", "mesh_address"));
        assert!(
            wait_until(Duration::from_secs(30), || phone_ns
                .http_get_within(&url, Duration::from_millis(800))
                .is_some()),
            "{when}: the phone never reached bank again:\n{}",
            daemon.log_text()
        );
        assert_eq!(squatted(), 0, "{when}: {}", fs::read_to_string(&squat_log).unwrap());
        daemon.assert_running(when);
    };
    check_again("restarted beside another user's listener");
    drop(phone);
}

/// What the other user runs to hold a port while meshd is stopped: bind UDP `0.0.0.0:PORT` (`udp`; with
/// `SO_REUSEADDR`, as boringtun's own sockets, `udp-reuse`) or listen on TCP `[::]:PORT`, print `held`, and
/// sleep.
const HOLD_PORT: &str = r#"
import socket, sys, time
transport, port = sys.argv[1], int(sys.argv[2])
if transport.startswith("udp"):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, transport == "udp-reuse")
    s.bind(("0.0.0.0", port))
else:
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.bind(("::", port))
    s.listen(16)
print("held", flush=True)
time.sleep(120)
"#;

/// Another user binds the WireGuard UDP port (or the join TCP port) while meshd is stopped. Before the
/// fix, `meshd run` printed boringtun threads' panics ("Not connected") and `Input/output error: write
/// configuration error` for the UDP port, and a bare `Address already in use` for the TCP one. Now it
/// exits at once with one line that names the port and the holder (uid and pid); once the port is free
/// again it starts.
#[test]
fn a_port_another_user_holds_while_meshd_is_stopped_is_refused_in_one_line_naming_the_holder() {
    if !require_root() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let hub = MeshHost::new("hub", root, "lh");
    hub.ns.ip(&["link", "set", "lo", "up"]);
    hub.init_hub("192.0.2.1:51820", &[]);

    for (transport, expected) in [
        ("udp", "WireGuard UDP port 51820 is held by another process (uid 65534, pid "),
        ("udp-reuse", "WireGuard UDP port 51820 is held by another process (uid 65534, pid "),
        ("tcp", "join service on TCP [::]:51820: the port is held by another process (uid 65534, pid "),
    ] {
        let log = root.join(format!("hold-{transport}.log"));
        let holder = Proc::spawn_logged(as_nobody(&hub, HOLD_PORT, &[transport, "51820"]), "the other user", &log);
        assert!(wait_until(Duration::from_secs(10), || fs::read_to_string(&log).unwrap_or_default().contains("held")));

        let mut run = hub.ns.command("timeout");
        run.args(["20"]).arg(product_bin("meshd")).args(["run", "--wireguard", "userspace", "--state-dir"]);
        let started = Instant::now();
        let out = output(run.arg(&hub.state));
        let took = started.elapsed();
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(
            !out.status.success() && out.status.code() != Some(124),
            "meshd run with {transport} 51820 held: {}",
            describe(&out)
        );
        assert!(took < Duration::from_secs(10), "meshd run took {took:?} to refuse: {}", describe(&out));
        assert!(
            !stdout.contains("panicked") && !stderr.contains("panicked"),
            "a panic was printed: {}",
            describe(&out)
        );
        let line = format!("error: {expected}{}): stop it and start meshd again", holder.pid());
        let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error")).collect();
        assert_eq!(errors, [line.as_str()], "{}", describe(&out));
        drop(holder);
    }

    // The port free again, meshd starts (and serves).
    let _daemon = hub.run_hub(&root.join("hub.log"));
    let nodes = run_json(meshctl(&hub.state).args(["node", "list", "--json"]));
    assert_eq!(nodes[0]["name"], "hub");
}

/// boringtun listens first on a port the kernel picks and, when meshd sets the listen port, kept the
/// sockets of that first port open (with `SO_REUSEADDR`, so another user could bind beside them) and
/// processing WireGuard packets. Now meshd holds UDP sockets on no wildcard address but the listen port's.
#[test]
fn meshd_holds_no_udp_socket_on_any_port_but_its_listen_port() {
    if !require_root() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let hub = MeshHost::new("hub", root, "lp");
    hub.ns.ip(&["link", "set", "lo", "up"]);
    hub.init_hub("192.0.2.1:51820", &[]);
    let daemon = hub.run_hub(&root.join("hub.log"));
    let sockets = hub.ns.run(&["ss", "-uanpH"]);
    let ours = format!("pid={},", daemon.pid());
    let wildcard: Vec<&str> = sockets
        .lines()
        .filter(|l| l.contains(&ours))
        .filter_map(|l| l.split_whitespace().nth(3))
        .filter(|local| ["0.0.0.0:", "*:", "[::]:"].iter().any(|any| local.starts_with(any)))
        .collect();
    assert!(!wildcard.is_empty(), "no socket of meshd found:\n{sockets}");
    for local in &wildcard {
        assert!(local.ends_with(":51820"), "meshd holds UDP {local} besides its listen port:\n{sockets}");
    }
}
