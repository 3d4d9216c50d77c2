//! Issue 14: each plain example (`examples/*/network.toml`) applied for real, unchanged, on hosts built as
//! network namespaces, and checked the way its user would.
//!
//! - phone: the home node runs as the NixOS module runs it: an unprivileged user with CAP_NET_ADMIN and
//!   CAP_NET_BIND_SERVICE only, its own /run directories, a `Type=notify` readiness message; the two services sit
//!   in their own network namespaces on 169.254.1.0/24, as nix-bitcoin's netns-isolation puts them. The phone and
//!   the laptop reach exactly their services, by name, from the configs apply wrote; the node restarts after
//!   SIGKILL into the same working mesh.
//! - staking: four hosts (one behind NAT) join with the tokens apply printed, find each other by the names of
//!   the file (`consensus.stake.example`), and the access rules hold; the mesh works without the controller.
//! - merchant: BTCPay at home behind NAT, served through the VPS on both names of the file, one with TLS ended on
//!   the VPS and one passed through to home, with certificates from Pebble; the web shop reaches it privately.

use std::fs;
use std::io::Read;
use std::net::SocketAddr;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use meshd_e2e::{
    Dns, MeshHost, Netns, Pebble, Phone, Proc, add_address, children_named, describe, meshctl, nat_router, output,
    product_bin, repo_root, require_root, router, run_ok, unique_ifname, uplink, veth, wait_until,
};

/// The uid the phone example's node runs as (no account needed: only the number matters to the kernel).
const MESHD_UID: u32 = 64514;

/// A static page served over HTTP by `python3 -m http.server` in `ns` on `addr:port`, saying `text`.
fn web_page(ns: &Netns, dir: &Path, addr: &str, port: u16, text: &str) -> Proc {
    let root = dir.join(format!("www-{addr}-{port}"));
    fs::create_dir_all(&root).unwrap();
    fs::write(root.join("index.html"), text).unwrap();
    let port = port.to_string();
    ns.spawn(&["python3", "-m", "http.server", &port, "--bind", addr, "--directory", root.to_str().unwrap()])
}

/// A command run as `MESHD_UID` in `ns`, with only the capabilities the hardened unit grants (or none), no new
/// privileges, and, like the unit's RuntimeDirectory= and a distribution's 0666 /dev/net/tun, its own
/// /run/wireguard, /run/meshd and TUN device node (bind-mounted in a mount namespace of its own).
fn as_meshd_user(ns: &Netns, dirs: &UserDirs, caps: bool, argv: &[&str]) -> Command {
    let set = if caps { "-all,+net_admin,+net_bind_service" } else { "-all" };
    let setpriv = format!(
        "setpriv --reuid={MESHD_UID} --regid={MESHD_UID} --clear-groups --inh-caps={set} --ambient-caps={set} \
         --bounding-set={set} --no-new-privs"
    );
    let script = format!(
        "mount --bind {wg} /run/wireguard && mount --bind {run} /run/meshd && mount --bind {tun} /dev/net/tun && \
         exec {setpriv} \"$@\"",
        wg = dirs.wireguard.display(),
        run = dirs.run.display(),
        tun = dirs.tun.display(),
    );
    let mut cmd = ns.command("unshare");
    cmd.args(["-m", "sh", "-c", &script, "sh"]).args(argv);
    cmd
}

/// The directories and device node of the unprivileged node, owned by `MESHD_UID`.
struct UserDirs {
    state: PathBuf,
    wireguard: PathBuf,
    run: PathBuf,
    tun: PathBuf,
    out: PathBuf,
}

impl UserDirs {
    fn new(root: &Path) -> UserDirs {
        // The test's directory must be traversable by the node's user; nothing in it is writable by others.
        fs::set_permissions(root, fs::Permissions::from_mode(0o711)).unwrap();
        let dirs = UserDirs {
            state: root.join("state"),
            wireguard: root.join("run-wireguard"),
            run: root.join("run-meshd"),
            tun: root.join("tun"),
            out: root.join("handout"),
        };
        for dir in [&dirs.state, &dirs.wireguard, &dirs.run, &dirs.out] {
            fs::create_dir(dir).unwrap();
            fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).unwrap();
        }
        // A TUN device node of the test's own (the machine's /dev/net/tun is left alone), for the user alone.
        run_ok(Command::new("mknod").args(["-m", "0600"]).arg(&dirs.tun).args(["c", "10", "200"]));
        for path in [&dirs.state, &dirs.wireguard, &dirs.run, &dirs.out, &dirs.tun] {
            std::os::unix::fs::chown(path, Some(MESHD_UID), Some(MESHD_UID)).unwrap();
        }
        fs::create_dir_all("/run/wireguard").unwrap();
        fs::create_dir_all("/run/meshd").unwrap();
        dirs
    }
}

impl UserDirs {
    /// `meshd init` of network `home` with hub `node` reached at `endpoint`, as the unit's ExecStartPre runs it: as
    /// meshd's user, in `ns`.
    fn init_network(&self, ns: &Netns, endpoint: &str) {
        let meshd = product_bin("meshd");
        let argv = [meshd.to_str().unwrap(), "init", "--network", "home", "--name", "node", "--endpoint", endpoint];
        run_ok(as_meshd_user(ns, self, true, &argv).arg("--state-dir").arg(&self.state));
    }
}

/// Adds `accounts` (name, uid; a group of the same) to the passwd and group files `ip netns exec` mounts over
/// /etc in `ns`: the users the module's scripts name.
fn add_accounts(ns: &Netns, accounts: &[(&str, u32)]) {
    fs::create_dir_all(ns.etc_dir()).unwrap();
    for file in ["passwd", "group"] {
        let mut text = fs::read_to_string(Path::new("/etc").join(file)).unwrap();
        for (name, id) in accounts {
            text += &match file {
                "passwd" => format!("{name}:x:{id}:{id}::/var/lib/{name}:/usr/sbin/nologin\n"),
                _ => format!("{name}:x:{id}:\n"),
            };
        }
        fs::write(ns.etc_dir().join(file), text).unwrap();
    }
}

/// Waits for `READY=1` on the notification socket, as systemd does for `Type=notify`.
fn wait_ready(notify: &UnixDatagram, daemon: &mut Proc) {
    notify.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    let mut buf = [0u8; 512];
    for _ in 0..120 {
        daemon.assert_running("starting as the unprivileged user");
        if let Ok(n) = notify.recv(&mut buf) {
            let message = String::from_utf8_lossy(&buf[..n]).into_owned();
            if message.lines().any(|l| l == "READY=1") {
                return;
            }
        }
    }
    panic!("no READY=1 within 60 s; log:\n{}", daemon.log_text());
}

fn proc_status(pid: u32, key: &str) -> String {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status.lines().find_map(|l| l.strip_prefix(&format!("{key}:"))).unwrap_or_default().trim().to_owned()
}

#[test]
fn phone_example_runs_as_an_unprivileged_user_and_each_device_reaches_exactly_its_services() {
    if !require_root() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let dirs = UserDirs::new(root);
    let node = Netns::new("node");
    let phone_ns = Netns::new("phone");
    let laptop_ns = Netns::new("laptop");
    veth(&node, &phone_ns, "172.31.140.1/24", "172.31.140.2/24");
    veth(&node, &laptop_ns, "172.31.141.1/24", "172.31.141.2/24");
    // The laptop reaches the node's endpoint (172.31.140.1) through its own link.
    laptop_ns.ip(&["route", "add", "default", "via", "172.31.141.1"]);

    // nix-bitcoin's netns-isolation: a bridge on the node (169.254.1.10), each service in a namespace of its own.
    node.ip(&["link", "add", "nb-br", "type", "bridge"]);
    node.ip(&["addr", "add", "169.254.1.10/24", "dev", "nb-br"]);
    node.ip(&["link", "set", "nb-br", "up"]);
    let mut services = Vec::new();
    for (name, addr, port) in [("wallet", "169.254.1.17", 9737), ("electrs", "169.254.1.14", 50001)] {
        let ns = Netns::new(name);
        let (host_end, service_end) = (unique_ifname("nb"), unique_ifname("ns"));
        node.ip(&["link", "add", &host_end, "type", "veth", "peer", "name", &service_end, "netns", ns.name()]);
        node.ip(&["link", "set", &host_end, "master", "nb-br", "up"]);
        add_address(&ns, &service_end, &format!("{addr}/24"));
        ns.ip(&["link", "set", &service_end, "up"]);
        services.push((web_page(&ns, root, addr, port, &format!("this is {name}")), ns));
    }

    // `meshd init` as the unit's ExecStartPre runs it: as meshd's user. The network of the example's header.
    dirs.init_network(&node, "172.31.140.1:51820");

    // tor offline (it still starts, makes its files and runs): for the check of what it inherits.
    let offline = root.join("offline.torrc");
    fs::write(&offline, "DisableNetwork 1\n").unwrap();
    let notify_path = root.join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    fs::set_permissions(&notify_path, fs::Permissions::from_mode(0o777)).unwrap();
    let start = |log: &str| -> Proc {
        let mut cmd = as_meshd_user(
            &node,
            &dirs,
            true,
            &[
                product_bin("meshd").to_str().unwrap(),
                "run",
                "--wireguard",
                "userspace",
                "--state-dir",
                dirs.state.to_str().unwrap(),
                "--tor-config",
                offline.to_str().unwrap(),
            ],
        );
        cmd.env("NOTIFY_SOCKET", &notify_path).env("RUST_LOG", "info,meshd=debug");
        // ip, unshare, sh and setpriv all exec: the PID is meshd's.
        Proc::spawn_logged(cmd, "meshd run as the meshd user", &root.join(log))
    };
    let mut daemon = start("node.log");
    wait_ready(&notify, &mut daemon);
    assert!(UnixStream::connect(dirs.state.join("meshd.sock")).is_ok(), "ready means the admin socket answers");
    assert_eq!(proc_status(daemon.pid(), "Uid").split_whitespace().next(), Some(MESHD_UID.to_string().as_str()));
    // CAP_NET_ADMIN (12) and CAP_NET_BIND_SERVICE (10) and nothing else.
    assert_eq!(proc_status(daemon.pid(), "CapEff"), "0000000000001400");

    let info = run_ok(&mut as_meshd_user(
        &node,
        &dirs,
        false,
        &[product_bin("meshd").to_str().unwrap(), "info", "--state-dir", dirs.state.to_str().unwrap()],
    ));
    for line in ["network home", "domain home.internal", "name node", "role hub", "address 10.77.0.1"] {
        assert!(info.lines().any(|l| l == line), "meshd info lacks {line:?}: {info}");
    }

    // The example's plain file, applied as meshd-apply.service does: as meshd's user, through the socket.
    let example = repo_root().join("examples/phone/network.toml");
    let applied = run_ok(&mut as_meshd_user(
        &node,
        &dirs,
        false,
        &[
            product_bin("meshctl").to_str().unwrap(),
            "--state-dir",
            dirs.state.to_str().unwrap(),
            "apply",
            example.to_str().unwrap(),
            "--out-dir",
            dirs.out.to_str().unwrap(),
        ],
    ));
    assert!(applied.contains("applied 4 of 4 changes"), "{applied}");
    for device in ["alice-phone", "laptop"] {
        let conf = fs::metadata(dirs.out.join(format!("{device}.conf"))).unwrap();
        assert_eq!((conf.uid(), conf.mode() & 0o777), (MESHD_UID, 0o600), "{device}.conf");
    }
    let phone_conf = fs::read_to_string(dirs.out.join("alice-phone.conf")).unwrap();
    let laptop_conf = fs::read_to_string(dirs.out.join("laptop.conf")).unwrap();
    assert!(laptop_conf.contains("DNS = 10.77.0.1\n"), "the laptop's dns list: {laptop_conf}");

    let phone = Phone::up(&phone_ns, &unique_ifname("ph"), &phone_conf);
    let laptop = Phone::up(&laptop_ns, &unique_ifname("lp"), &laptop_conf);
    let wallet = "http://wallet.home.internal:9737/";
    let electrs = "http://electrs.home.internal:50001/";
    let reached = |ns: &Netns, url: &str| ns.http_get(url, 2).is_some_and(|body| body.starts_with("this is"));
    assert!(
        wait_until(Duration::from_secs(20), || reached(&phone_ns, wallet)),
        "the phone reaches the wallet by name; node log:\n{}",
        daemon.log_text()
    );
    assert_eq!(phone_ns.http_get(electrs, 3).as_deref(), Some("this is electrs"));
    assert!(wait_until(Duration::from_secs(20), || reached(&laptop_ns, electrs)), "the laptop reaches electrs");
    assert_eq!(laptop_ns.http_get(wallet, 3), None, "the laptop was not allowed the wallet");
    // Nothing else of the node answers the phone: not the bridge's address behind it.
    assert_eq!(phone_ns.http_get("http://169.254.1.17:9737/", 2), None);

    // meshd's own tor runs as meshd's user with none of its capabilities (the ambient set is not handed on).
    let meshctl_as_meshd = |args: &[&str]| -> String {
        let mut argv = vec![product_bin("meshctl").to_str().unwrap().to_owned(), "--state-dir".into()];
        argv.push(dirs.state.to_str().unwrap().to_owned());
        argv.extend(args.iter().map(|a| a.to_string()));
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        run_ok(&mut as_meshd_user(&node, &dirs, false, &argv))
    };
    meshctl_as_meshd(&["expose", "wallet", "--tor"]);
    let mut tor = None;
    assert!(
        wait_until(Duration::from_secs(15), || {
            tor = children_named(daemon.pid(), "tor").first().copied();
            tor.is_some()
        }),
        "meshd did not start its tor; log:\n{}",
        daemon.log_text()
    );
    let tor = tor.unwrap();
    assert_eq!(proc_status(tor, "Uid").split_whitespace().next(), Some(MESHD_UID.to_string().as_str()));
    for set in ["CapEff", "CapPrm", "CapAmb"] {
        assert_eq!(proc_status(tor, set), "0000000000000000", "tor's {set}");
    }
    meshctl_as_meshd(&["unexpose", "wallet", "--tor"]);

    // A crash, and the unit's restart: the same mesh, without a new config.
    daemon.kill_hard();
    let mut daemon = start("node-restarted.log");
    wait_ready(&notify, &mut daemon);
    assert!(
        wait_until(Duration::from_secs(20), || reached(&phone_ns, wallet)),
        "after a restart the phone reaches the wallet again; log:\n{}",
        daemon.log_text()
    );
    let status = daemon.stop(Duration::from_secs(10));
    assert!(status.success(), "SIGTERM stops it cleanly: {status}; log:\n{}", daemon.log_text());
    // Root's meshctl with meshd stopped works on no database of another user's, and leaves no file of its own
    // there (a root-owned lock file would keep meshd from starting).
    let refused = output(meshctl(&dirs.state).args(["service", "list"]));
    assert!(
        !refused.status.success()
            && String::from_utf8_lossy(&refused.stderr).contains(&format!("owned by uid {MESHD_UID}")),
        "{}",
        describe(&refused)
    );
    // Everything in the state directory is the user's: nothing root would have to take back.
    for entry in fs::read_dir(&dirs.state).unwrap() {
        let entry = entry.unwrap();
        assert_eq!(entry.metadata().unwrap().uid(), MESHD_UID, "{} is not meshd's", entry.path().display());
    }
    // Started again and stopped the moment it is ready (a restart right after a start): it shuts down cleanly.
    let mut daemon = start("node-again.log");
    wait_ready(&notify, &mut daemon);
    let status = daemon.stop(Duration::from_secs(10));
    assert!(status.success(), "{status}; log:\n{}", daemon.log_text());
    assert!(daemon.log_text().contains("shutting down"), "{}", daemon.log_text());
    drop((phone, laptop, services));
}

/// The tokens `meshctl apply` printed, by node name (`NAME TOKEN` lines).
fn tokens(applied: &str) -> Vec<(String, String)> {
    applied
        .lines()
        .filter_map(|l| l.split_once(' '))
        .filter(|(_, token)| token.starts_with("meshd-invite:"))
        .map(|(name, token)| (name.to_owned(), token.to_owned()))
        .collect()
}

/// Writes `/etc/netns/NS/hosts` for each host (the names of the example's endpoints) and a resolv.conf naming
/// `dns` (the host's own mesh DNS, once known).
fn hosts_file(ns: &Netns, names: &str) {
    fs::create_dir_all(ns.etc_dir()).unwrap();
    fs::write(ns.etc_dir().join("hosts"), format!("127.0.0.1 localhost\n::1 localhost\n{names}")).unwrap();
}

/// `meshd info`'s `address` of a host.
fn mesh_address(host: &MeshHost) -> String {
    let info = run_ok(Command::new(product_bin("meshd")).arg("info").arg("--state-dir").arg(&host.state));
    info.lines().find_map(|l| l.strip_prefix("address ")).expect("an address").to_owned()
}

#[test]
fn staking_example_links_four_hosts_by_name_under_its_access_rules() {
    if !require_root() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let internet = router("inet");
    let home_router = router("home");
    let execution = MeshHost::new("execution", root, "st");
    let consensus = MeshHost::new("consensus", root, "st");
    let monitor = MeshHost::new("monitor", root, "st");
    let validator = MeshHost::new("validator", root, "st");
    uplink(&internet, &execution.ns, "172.31.150");
    uplink(&internet, &consensus.ns, "172.31.151");
    uplink(&internet, &monitor.ns, "172.31.152");
    uplink(&internet, &home_router, "172.31.153");
    let (lan, _) = uplink(&home_router, &validator.ns, "192.168.150");
    nat_router(&home_router, &[("192.168.150.0/24", &lan)]);
    // The DNS names of the example's endpoints, as every host's resolver knows them.
    let names = "172.31.150.2 execution.stake.example\n172.31.151.2 consensus.stake.example\n\
                 172.31.152.2 monitor.stake.example\n";
    for host in [&execution, &consensus, &monitor, &validator] {
        hosts_file(&host.ns, names);
    }

    // The execution host: `meshd init` as in the example's header (inside its namespace, where the names resolve).
    run_ok(execution.ns.command(product_bin("meshd")).args([
        "init",
        "--network",
        "stake",
        "--name",
        "execution",
        "--endpoint",
        "execution.stake.example:51820",
        "--cidr",
        "10.88.0.0/16",
        "--interface",
        &execution.ifname,
        "--state-dir",
        execution.state.to_str().unwrap(),
    ]));
    let mut hub = execution.run_hub(&root.join("execution.log"));
    let file = repo_root().join("examples/staking/network.toml");
    let out_dir = root.join("handout");
    fs::create_dir(&out_dir).unwrap();
    let apply = || run_ok(meshctl(&execution.state).arg("apply").arg(&file).arg("--out-dir").arg(&out_dir));
    let first = apply();
    let issued = tokens(&first);
    let mut issued_names: Vec<&str> = issued.iter().map(|(n, _)| n.as_str()).collect();
    issued_names.sort();
    assert_eq!(issued_names, ["consensus", "monitor", "validator"], "{first}");

    let mut daemons = vec![];
    for (host, endpoint) in [
        (&consensus, Some("consensus.stake.example:51820")),
        (&monitor, Some("monitor.stake.example:51820")),
        (&validator, None),
    ] {
        let token = &issued.iter().find(|(n, _)| n == host.name).unwrap().1;
        let joined = host.join(token, &host.state, endpoint);
        assert!(joined.status.success(), "{} joins: {}", host.name, describe(&joined));
        daemons.push(host.run_daemon(&root.join(format!("{}.log", host.name))));
    }
    // The second apply carries out what waited for the joins: the services on the members and the rules.
    let second = apply();
    assert!(second.contains("validator-metrics") && second.contains("applied"), "{second}");
    assert!(apply().contains("no changes"), "the example is now the network");

    let _pages = [
        web_page(&execution.ns, root, "127.0.0.1", 8551, "engine api"),
        web_page(&consensus.ns, root, "127.0.0.1", 5052, "beacon api"),
        web_page(&validator.ns, root, "127.0.0.1", 5064, "validator metrics"),
    ];
    // Each host's resolver points at its own mesh DNS, as the module's resolver step sets it.
    for host in [&execution, &consensus, &monitor, &validator] {
        host.ns.set_resolv_conf(&format!("nameserver {}\n", mesh_address(host)));
    }
    let url = |service: &str, port: u16| format!("http://{service}.stake.internal:{port}/");
    let reaches = |host: &MeshHost, service: &str, port: u16| -> bool {
        wait_until(Duration::from_secs(15), || host.ns.http_get(&url(service, port), 2).is_some())
    };
    let refused = |host: &MeshHost, service: &str, port: u16| host.ns.http_get(&url(service, port), 3).is_none();
    assert!(reaches(&validator, "beacon-api", 5052), "the validator (behind NAT) reaches its beacon node by name");
    assert!(reaches(&consensus, "engine-api", 8551), "the beacon node reaches the engine API");
    assert!(reaches(&monitor, "validator-metrics", 5064), "monitoring reaches the validator");
    assert!(reaches(&execution, "beacon-api", 5052), "the execution host is in the beacon node's rule");
    assert!(refused(&consensus, "validator-metrics", 5064), "only monitoring reaches the validator");
    assert!(refused(&execution, "validator-metrics", 5064), "only monitoring reaches the validator");

    // Without the controller: names and tunnels stay.
    let status = hub.stop(Duration::from_secs(10));
    assert!(status.success(), "{status}");
    assert!(reaches(&validator, "beacon-api", 5052), "the mesh works without its controller");
    assert!(reaches(&monitor, "validator-metrics", 5064));
    assert!(refused(&consensus, "validator-metrics", 5064));
    for daemon in &mut daemons {
        daemon.assert_running("the controller is away");
    }
}

/// A BTCPay stand-in: answers every request with the X-Forwarded-For it got.
const BTCPAY: &str = r#"
import sys
from http.server import ThreadingHTTPServer, BaseHTTPRequestHandler
class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        body = ("btcpay for %s" % self.headers.get("X-Forwarded-For", "-")).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
ThreadingHTTPServer(("127.0.0.1", 23000), Handler).serve_forever()
"#;

#[test]
fn merchant_example_serves_btcpay_on_both_names_and_privately_to_the_shop() {
    if !require_root() {
        return;
    }
    const VPS_IP: &str = "172.31.160.2";
    const CA_IP: &str = "172.31.161.2";
    const SHOP_IP: &str = "172.31.162.2";
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let internet = router("inet");
    let home_router = router("home");
    let vps = MeshHost::new("vps", root, "mc");
    let home = MeshHost::new("home", root, "mc");
    let ca = Netns::new("ca");
    let shop = Netns::new("shop");
    uplink(&internet, &vps.ns, "172.31.160");
    uplink(&internet, &ca, "172.31.161");
    uplink(&internet, &shop, "172.31.162");
    uplink(&internet, &home_router, "172.31.163");
    let (lan, _) = uplink(&home_router, &home.ns, "192.168.160");
    nat_router(&home_router, &[("192.168.160.0/24", &lan)]);

    let names = ["pay.shop.example", "admin.shop.example"];
    let dns_addr: SocketAddr = format!("{CA_IP}:5353").parse().unwrap();
    let _dns = Dns::start(&ca, dns_addr, &names.map(|n| (n, VPS_IP)), root);
    let pebble = Pebble::start(&ca, CA_IP, 80, 443, dns_addr, root);
    // The root that signs what Pebble issues (written to issuing_root_path): the only one the shop trusts.
    pebble.issuing_root_pem();
    let ca_root = pebble.listener_ca_pem_path().display().to_string();
    let directory = pebble.directory_url();
    let acme = ["--acme-directory", &directory, "--acme-ca-root", &ca_root, "--acme-contact", "ops@shop.example"];

    // The VPS: controller, hub and relay, as in the example's header (its public address for a name).
    run_ok(Command::new(product_bin("meshd")).args([
        "init",
        "--network",
        "shop",
        "--name",
        "vps",
        "--endpoint",
        &format!("{VPS_IP}:51820"),
        "--interface",
        &vps.ifname,
        "--state-dir",
        vps.state.to_str().unwrap(),
    ]));
    let vps_daemon = vps.run_hub_with(&root.join("vps.log"), &acme);
    let file = repo_root().join("examples/merchant/network.toml");
    let out_dir = root.join("handout");
    fs::create_dir(&out_dir).unwrap();
    let apply = || run_ok(meshctl(&vps.state).arg("apply").arg(&file).arg("--out-dir").arg(&out_dir));
    let first = apply();
    let issued = tokens(&first);
    assert_eq!(issued.len(), 1, "{first}");
    let joined = home.join(&issued[0].1, &home.state, None);
    assert!(joined.status.success(), "home joins: {}", describe(&joined));
    let home_daemon = home.run_daemon_with(&root.join("home.log"), &acme);
    let script = root.join("btcpay.py");
    fs::write(&script, BTCPAY).unwrap();
    let _btcpay = home.ns.spawn(&["python3", script.to_str().unwrap()]);
    let second = apply();
    assert!(second.contains("pay.shop.example") && second.contains("admin.shop.example"), "{second}");
    assert!(apply().contains("no changes"));

    let fetch = |name: &str| -> Result<String, String> {
        let mut cmd = shop.command("curl");
        cmd.args(["-sS", "--max-time", "5", "--cacert"]).arg(pebble.issuing_root_path());
        cmd.args(["--resolve", &format!("{name}:443:{VPS_IP}"), &format!("https://{name}/")]);
        let out = output(&mut cmd);
        if out.status.success() { Ok(String::from_utf8_lossy(&out.stdout).into_owned()) } else { Err(describe(&out)) }
    };
    for name in names {
        let mut last = Err(String::new());
        let served = wait_until(Duration::from_secs(90), || {
            last = fetch(name);
            last.is_ok()
        });
        assert!(
            served,
            "https://{name}/ is not served: {last:?}\nvps:\n{}\nhome:\n{}",
            vps_daemon.log_text(),
            home_daemon.log_text()
        );
        assert_eq!(last.unwrap(), format!("btcpay for {SHOP_IP}"), "BTCPay sees the shop's address on {name}");
    }
    // Terminate mode: the VPS holds pay's key; passthrough: only home holds admin's.
    let kept = |host: &MeshHost, name: &str| host.state.join("acme").join(format!("{name}.json")).exists();
    assert!(kept(&vps, "pay.shop.example") && !kept(&vps, "admin.shop.example"), "the VPS holds no passthrough key");
    assert!(kept(&home, "admin.shop.example") && !kept(&home, "pay.shop.example"));
    // The home address appears nowhere the shop can see: the names resolve to the VPS, home is behind NAT.
    assert!(shop.exec(&["ping", "-c1", "-W1", "192.168.160.2"]).status.code() != Some(0));

    // The web shop's server, over WireGuard only, with the config apply wrote for it.
    let mut conf = String::new();
    fs::File::open(out_dir.join("webshop.conf")).unwrap().read_to_string(&mut conf).unwrap();
    let _webshop = Phone::up(&shop, &unique_ifname("ws"), &conf);
    let private = "http://btcpay.shop.internal:23000/";
    assert!(
        wait_until(Duration::from_secs(20), || shop.http_get(private, 2).is_some_and(|b| b.starts_with("btcpay for"))),
        "the web shop reaches BTCPay privately; vps log:\n{}",
        vps_daemon.log_text()
    );
}

/// The tor user's uid in the system-tor test.
const TOR_UID: u32 = 64516;

/// Runs `argv` in `ns` in a mount namespace of its own where /var/lib is empty but for `binds` (mount point
/// under /var/lib, directory of the test's), as the NixOS paths the module's scripts name.
fn with_var_lib(ns: &Netns, binds: &[(&str, &Path)], argv: &[&str]) -> Command {
    let mut script = String::from("mount -t tmpfs -o mode=0755 tmpfs /var/lib");
    for (point, dir) in binds {
        script += &format!(" && mkdir /var/lib/{point} && mount --bind {} /var/lib/{point}", dir.display());
    }
    script += " && exec \"$@\"";
    let mut cmd = ns.command("unshare");
    cmd.args(["-m", "sh", "-c", &script, "sh"]).args(argv);
    cmd
}

#[test]
fn onion_services_are_served_by_the_system_tor_from_the_keys_meshd_keeps() {
    if !require_root() {
        return;
    }
    let Some(lib) = meshd_e2e::nixpkgs_lib() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let dirs = UserDirs::new(root);
    let node = Netns::new("node");
    add_accounts(&node, &[("meshd", MESHD_UID), ("tor", TOR_UID)]);
    let tor_home = root.join("var-lib-tor");
    fs::create_dir(&tor_home).unwrap();
    fs::set_permissions(&tor_home, fs::Permissions::from_mode(0o700)).unwrap();
    std::os::unix::fs::chown(&tor_home, Some(TOR_UID), Some(TOR_UID)).unwrap();

    // The module with tor.backend = "system": meshd's flag and the hand-over script, as rendered.
    let config = root.join("system-tor.nix");
    fs::write(
        &config,
        format!(
            "{{ imports = [ {} ]; services.meshd.tor.backend = \"system\"; }}\n",
            repo_root().join("examples/phone/configuration.nix").display()
        ),
    )
    .unwrap();
    let evaluated = meshd_e2e::evaluate(&lib, &config).unwrap_or_else(|e| panic!("{e}"));
    let exec = meshd_e2e::exec_args(evaluated["unit"]["exec"].as_str().unwrap());
    let at = exec.iter().position(|a| a == "--tor-external").expect("meshd is told of the other tor");
    let external = exec[at + 1].as_str();
    assert!(!exec.iter().any(|a| a == "--tor-binary"), "{exec:?}");
    assert_eq!(evaluated["tor"]["settings"]["%include"], "/var/lib/tor/meshd/services.torrc");
    assert_eq!(evaluated["tor"]["enable"], true);
    assert_eq!(evaluated["tor"]["path"]["pathConfig"]["PathChanged"], "/var/lib/meshd/tor/services.torrc");
    assert_eq!(
        evaluated["tor"]["unit"]["before"],
        serde_json::json!(["tor.service"]),
        "the file exists before tor starts"
    );
    let hand_over = root.join("hand-over.sh");
    fs::write(&hand_over, evaluated["tor"]["script"].as_str().unwrap()).unwrap();
    let run_hand_over = || {
        let state = dirs.state.as_path();
        run_ok(&mut with_var_lib(
            &node,
            &[("meshd", state), ("tor", &tor_home)],
            &["bash", hand_over.to_str().unwrap()],
        ));
    };

    let mut network = meshd_e2e::TorNetwork::start(&node, &root.join("tornet"));
    let _page = web_page(&node, root, "127.0.0.1", 18081, "wallet over the system's tor");
    let meshd = product_bin("meshd");
    let meshctl_bin = product_bin("meshctl");
    let state = dirs.state.to_str().unwrap();
    dirs.init_network(&node, "10.250.2.1:51820");
    let mut cmd = as_meshd_user(
        &node,
        &dirs,
        true,
        &[meshd.to_str().unwrap(), "run", "--wireguard", "userspace", "--state-dir", state, "--tor-external", external],
    );
    cmd.env("RUST_LOG", "info,meshd=debug");
    let mut daemon = Proc::spawn_logged(cmd, "meshd run --tor-external", &root.join("node.log"));
    assert!(
        wait_until(Duration::from_secs(30), || UnixStream::connect(dirs.state.join("meshd.sock")).is_ok()),
        "meshd did not start: {}",
        daemon.log_text()
    );
    let meshctl = |args: &[&str]| -> String {
        let mut argv = vec![meshctl_bin.to_str().unwrap(), "--state-dir", state];
        argv.extend_from_slice(args);
        run_ok(&mut as_meshd_user(&node, &dirs, false, &argv))
    };
    meshctl(&["service", "add", "wallet", "--node", "node", "--target", "127.0.0.1:18081"]);
    for device in ["phone", "laptop"] {
        meshctl(&["device", "add", device, "--allow", "wallet", "--conf", "-"]);
    }
    let out = dirs.out.to_str().unwrap();
    meshctl(&[
        "expose",
        "wallet",
        "--tor",
        "--port",
        "80",
        "--client",
        "phone",
        "--client",
        "laptop",
        "--out-dir",
        out,
    ]);
    let line =
        |device: &str| fs::read_to_string(dirs.out.join(format!("{device}.auth_private"))).unwrap().trim().to_owned();
    let (phone, laptop) = (line("phone"), line("laptop"));
    let address = format!("{}.onion", phone.split(':').next().unwrap());

    // meshd runs no tor: it wrote the lines for the system's.
    let services = fs::read_to_string(dirs.state.join("tor/services.torrc")).unwrap();
    assert!(
        services
            .contains("HiddenServiceDir \"/var/lib/tor/meshd/onion/wallet\"\nHiddenServicePort 80 127.0.0.1:18081\n"),
        "{services}"
    );
    assert!(!dirs.state.join("tor/torrc").exists() && !dirs.state.join("tor/data").exists());
    daemon.assert_running("serving through the system's tor");

    run_hand_over();
    let copied = tor_home.join("meshd/onion/wallet");
    let key = fs::metadata(copied.join("hs_ed25519_secret_key")).unwrap();
    assert_eq!((key.uid(), key.mode() & 0o777), (TOR_UID, 0o600), "the key is tor's and private");
    assert!(
        copied.join("authorized_clients/phone.auth").is_file()
            && copied.join("authorized_clients/laptop.auth").is_file()
    );
    // A link planted in meshd's directory is not handed over (the copy is made of files and directories only).
    std::os::unix::fs::symlink("/etc/shadow", dirs.state.join("tor/onion/wallet/authorized_clients/evil.auth"))
        .unwrap();
    run_hand_over();
    assert!(!copied.join("authorized_clients/evil.auth").exists(), "a link reached tor's directory");
    fs::remove_file(dirs.state.join("tor/onion/wallet/authorized_clients/evil.auth")).unwrap();
    // Nor does root follow one that tor's user planted in its own directory (root only starts the copies).
    let etc_like = root.join("not-tors");
    fs::create_dir(&etc_like).unwrap();
    fs::rename(tor_home.join("meshd"), tor_home.join("meshd.real")).unwrap();
    std::os::unix::fs::symlink(&etc_like, tor_home.join("meshd")).unwrap();
    let _ = output(&mut with_var_lib(
        &node,
        &[("meshd", dirs.state.as_path()), ("tor", &tor_home)],
        &["bash", hand_over.to_str().unwrap()],
    ));
    let etc_like_meta = fs::metadata(&etc_like).unwrap();
    assert_eq!((etc_like_meta.uid(), etc_like_meta.mode() & 0o777), (0, 0o755), "root changed what tor's link named");
    assert_eq!(fs::read_dir(&etc_like).unwrap().count(), 0, "root wrote through tor's link");
    fs::remove_file(tor_home.join("meshd")).unwrap();
    fs::rename(tor_home.join("meshd.real"), tor_home.join("meshd")).unwrap();

    // meshd's user cannot configure the system's tor through services.torrc (a SOCKS or control port, a service
    // directory elsewhere), wedge the hand-over with a directory it may not enter, nor have tor fill the disk
    // with a sparse file, nor keep tor from starting (a service without a port, an address tor cannot parse): only
    // what meshd writes, and files of at most 16 KiB, reach tor.
    let meshds = |path: &Path| std::os::unix::fs::chown(path, Some(MESHD_UID), Some(MESHD_UID)).unwrap();
    let services_torrc = dirs.state.join("tor/services.torrc");
    let honest = fs::read_to_string(&services_torrc).unwrap();
    fs::write(
        &services_torrc,
        format!(
            "{honest}SocksPort 0.0.0.0:9050\nControlPort 9051\nHiddenServiceDir \"/var/lib/tor/onion/bitcoind\"\n\
             HiddenServicePort 8333 127.0.0.1:8333\nHiddenServiceDir \"/var/lib/tor/meshd/onion/wallet\"\n\
             HiddenServiceDir \"/var/lib/tor/meshd/onion/ghost\"\nHiddenServicePort 80 999.1.1.1:80\n"
        ),
    )
    .unwrap();
    // A key tor could not load is left out (tor makes that service a new one rather than refusing to start).
    let forged = dirs.state.join("tor/onion/forged");
    fs::create_dir(&forged).unwrap();
    fs::write(forged.join("hs_ed25519_secret_key"), "not a key").unwrap();
    for path in [&forged, &forged.join("hs_ed25519_secret_key")] {
        meshds(path);
    }
    let junk = dirs.state.join("tor/onion/wallet/junk");
    fs::create_dir(&junk).unwrap();
    fs::write(junk.join("key"), "x").unwrap();
    let sparse = fs::File::create(junk.join("sparse")).unwrap();
    sparse.set_len(1 << 30).unwrap();
    for path in [&junk, &junk.join("key"), &junk.join("sparse")] {
        meshds(path);
    }
    fs::set_permissions(&junk, fs::Permissions::from_mode(0o500)).unwrap();
    let handed = output(&mut with_var_lib(
        &node,
        &[("meshd", dirs.state.as_path()), ("tor", &tor_home)],
        &["bash", hand_over.to_str().unwrap()],
    ));
    assert!(handed.status.success(), "{}", describe(&handed));
    assert!(
        String::from_utf8_lossy(&handed.stderr).contains("6 lines of services.torrc were not handed over"),
        "{}",
        describe(&handed)
    );
    let given = fs::read_to_string(tor_home.join("meshd/services.torrc")).unwrap();
    assert_eq!(
        given.trim(),
        honest.lines().filter(|l| !l.starts_with('#')).collect::<Vec<_>>().join("\n").trim(),
        "tor got more than meshd's lines"
    );
    assert!(!tor_home.join("meshd/onion/wallet/junk/sparse").exists(), "a 1 GiB sparse file was handed over");
    assert!(tor_home.join("meshd/onion/wallet/junk/key").is_file());
    assert!(
        tor_home.join("meshd/onion/forged").is_dir()
            && !tor_home.join("meshd/onion/forged/hs_ed25519_secret_key").exists()
    );
    assert!(copied.join("hs_ed25519_secret_key").is_file(), "a real key is handed over");
    fs::remove_dir_all(&forged).unwrap();
    // Handed over again with the read-only directory in tor's copy: the copy is replaced, not wedged.
    fs::write(&services_torrc, &honest).unwrap();
    run_hand_over();
    fs::set_permissions(&junk, fs::Permissions::from_mode(0o700)).unwrap();
    fs::remove_dir_all(&junk).unwrap();
    run_hand_over();
    assert!(!tor_home.join("meshd/onion/wallet/junk").exists() && copied.join("hs_ed25519_secret_key").is_file());

    // The system's tor: its own configuration, part of the test network, including meshd's file.
    let torrc = tor_home.join("torrc");
    fs::write(
        &torrc,
        format!(
            "{}DataDirectory /var/lib/tor/data\nSocksPort 0\nLog notice stdout\n%include /var/lib/tor/meshd/services.torrc\n",
            network.config_lines()
        ),
    )
    .unwrap();
    std::os::unix::fs::chown(&torrc, Some(TOR_UID), Some(TOR_UID)).unwrap();
    let tor_uid = TOR_UID.to_string();
    let system_tor_cmd = with_var_lib(
        &node,
        &[("tor", &tor_home)],
        &[
            "setpriv",
            &format!("--reuid={tor_uid}"),
            &format!("--regid={tor_uid}"),
            "--clear-groups",
            "tor",
            "-f",
            "/var/lib/tor/torrc",
        ],
    );
    let mut system_tor = Proc::spawn_logged(system_tor_cmd, "the system's tor", &root.join("system-tor.log"));

    let url = format!("http://{address}/");
    let fetch = |network: &mut meshd_e2e::TorNetwork, key: &str| -> bool {
        let mut client = network.client(&node, &[("client", key)]);
        client.get_within(&node, &url, Duration::from_secs(30)).is_some_and(|b| b.contains("wallet over"))
    };
    assert!(
        wait_until(Duration::from_secs(150), || fetch(&mut network, &phone)),
        "the phone did not reach the service through the system's tor; its log:\n{}",
        system_tor.log_text()
    );

    // The phone taken off: meshd rewrites its files, the path unit's hand-over copies them, tor reloads. On a
    // settled service (tor numbers descriptors by the second: a reload within the second of its first upload is
    // kept out by the directories; docs/DESIGN.md, "Onion services").
    std::thread::sleep(Duration::from_secs(10));
    meshctl(&["unexpose", "wallet", "--tor", "--client", "phone"]);
    run_hand_over();
    assert!(!copied.join("authorized_clients/phone.auth").exists());
    // SAFETY: kill(2) by the PID of the tor this test started (ip, unshare, sh and setpriv exec it).
    unsafe { libc::kill(system_tor.pid() as libc::pid_t, libc::SIGHUP) };
    let mut last = String::new();
    let refused = wait_until(Duration::from_secs(120), || {
        let mut client = network.client(&node, &[("client", &phone)]);
        let got = client.get_within(&node, &url, Duration::from_secs(20));
        last = format!("got {got:?}; the client's log:\n{}", client.log_text());
        got.is_none() && client.log_text().to_lowercase().contains("client authorization")
    });
    assert!(
        refused,
        "the phone is not refused after it was taken off: {last}\nthe system's tor:\n{}",
        system_tor.log_text()
    );
    assert!(wait_until(Duration::from_secs(90), || fetch(&mut network, &laptop)), "the laptop lost access");
    system_tor.assert_running("after the reload");
    daemon.assert_running("throughout");
}

/// The module's start-up scripts for real (in a mount namespace where /var/lib/meshd is the test's directory): the
/// controller's `meshd init`, then the check before every start that what is fixed when a network is made is still
/// what the configuration says (a changed interface or port is refused, naming the option), while a new endpoint
/// is carried out (`meshctl node update`).
#[test]
fn the_unit_makes_the_network_once_and_checks_what_is_fixed_before_each_start() {
    if !require_root() {
        return;
    }
    let Some(lib) = meshd_e2e::nixpkgs_lib() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let state = root.join("state");
    fs::create_dir(&state).unwrap();
    fs::set_permissions(&state, fs::Permissions::from_mode(0o700)).unwrap();
    let ns = Netns::new("unit");
    let serial = std::cell::Cell::new(0);
    let scripts = |extra: &str| -> Vec<PathBuf> {
        serial.set(serial.get() + 1);
        let config = root.join(format!("config-{}.nix", serial.get()));
        fs::write(
            &config,
            format!(
                "{{ networking.hostName = \"node\"; services.meshd = {{ enable = true; role = \"controller\"; \
                 network = \"home\"; {extra} }}; }}\n"
            ),
        )
        .unwrap();
        let evaluated = meshd_e2e::evaluate(&lib, &config).unwrap_or_else(|e| panic!("{e}"));
        let texts = evaluated["unit"]["scripts"].as_array().unwrap().clone();
        texts
            .iter()
            .enumerate()
            .map(|(i, text)| {
                // The fake packages are /usr: point meshd and meshctl at the built ones.
                let text =
                    text.as_str().unwrap().replace("/usr/bin/meshd ", &format!("{} ", product_bin("meshd").display()));
                let text = text.replace("/usr/bin/meshctl ", &format!("{} ", product_bin("meshctl").display()));
                let path = root.join(format!("script-{}-{i}.sh", serial.get()));
                fs::write(&path, text).unwrap();
                path
            })
            .collect()
    };
    let run = |script: &Path| output(&mut with_var_lib(&ns, &[("meshd", &state)], &["bash", script.to_str().unwrap()]));
    let endpoint = r#"endpoint = "node.example.net:51820";"#;
    let as_declared = scripts(endpoint);
    let (setup, check) = (&as_declared[0], &as_declared[1]);
    let made = run(setup);
    assert!(made.status.success() && state.join("meshd.db").exists(), "{}", describe(&made));
    let again = run(setup);
    assert!(again.status.success(), "the network is made once: {}", describe(&again));
    let checked = run(check);
    assert!(checked.status.success(), "{}", describe(&checked));

    let info = || run_ok(Command::new(product_bin("meshd")).arg("info").arg("--state-dir").arg(&state));
    let before = info();
    for (extra, option) in [
        (r#"interface = "mesh1";"#, "services.meshd.interface is mesh1"),
        ("listenPort = 51999;", "services.meshd.listenPort is 51999"),
    ] {
        let changed = scripts(&format!("{endpoint} {extra}"));
        let refused = run(&changed[1]);
        assert!(!refused.status.success(), "{extra} passed the check");
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert!(stderr.contains(option) && stderr.contains("fixed when the network is made"), "{extra}: {stderr}");
        assert_eq!(info(), before, "a refused check changes nothing");
    }
    let moved = scripts(r#"endpoint = "node2.example.net:51820";"#);
    let out = run(&moved[1]);
    assert!(out.status.success(), "{}", describe(&out));
    assert!(info().lines().any(|l| l == "endpoint node2.example.net:51820"), "the hub's endpoint moved: {}", info());
}

/// The resolver step on a host with openresolv (NixOS's resolvconf, without systemd-resolved), run for real with
/// Debian's openresolv in a namespace of its own: the host's resolv.conf gets this host's mesh DNS first and the mesh
/// domain to search, beside what another interface gave it, and loses them again when meshd stops (ExecStopPost).
#[test]
fn the_resolver_step_puts_the_mesh_dns_first_with_openresolv_and_takes_it_back() {
    if !require_root() {
        return;
    }
    let Some(lib) = meshd_e2e::nixpkgs_lib() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let dirs = UserDirs::new(root);
    let ns = Netns::new("rc");
    // The namespace's /etc: the meshd account, its own resolv.conf, and openresolv's state kept in the test's
    // directory (ip netns exec mounts these over /etc).
    let state_dir = root.join("resolvconf-state");
    fs::create_dir(&state_dir).unwrap();
    add_accounts(&ns, &[("meshd", MESHD_UID)]);
    fs::write(ns.etc_dir().join("resolv.conf"), "").unwrap();
    fs::write(
        ns.etc_dir().join("resolvconf.conf"),
        format!("resolv_conf=/etc/resolv.conf\nstate_dir={}\n", state_dir.display()),
    )
    .unwrap();
    let resolvconf =
        ["/usr/sbin/resolvconf", "/sbin/resolvconf"].into_iter().find(|p| Path::new(p).exists()).expect("openresolv");
    // What another interface gave the host, with the metric NixOS's dhcpcd gives (1000 and more; static nameservers
    // go in with 1): the mesh DNS's metric 0 puts it before them.
    let mut lan = ns.command("sh");
    lan.args(["-c", &format!("printf 'nameserver 192.0.2.53\\n' | {resolvconf} -m 1002 -a lan0")]);
    run_ok(&mut lan);

    dirs.init_network(&ns, "192.0.2.1:51820");
    let config = root.join("resolvconf.nix");
    fs::write(
        &config,
        "{ networking.hostName = \"node\"; networking.resolvconf.enable = true; services.meshd = { enable = true; \
         role = \"controller\"; network = \"home\"; endpoint = \"192.0.2.1:51820\"; }; }\n",
    )
    .unwrap();
    let evaluated = meshd_e2e::evaluate(&lib, &config).unwrap_or_else(|e| panic!("{e}"));
    let unit = &evaluated["unit"];
    let script = unit["scripts"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s.as_str())
        .find(|s| s.contains("resolvconf -m 0"))
        .expect("the resolver step");
    // The fake packages are /usr: Debian keeps runuser and resolvconf in sbin, and meshd is the one built here.
    let script = script
        .replace("/usr/bin/runuser", "/usr/sbin/runuser")
        .replace("/usr/bin/resolvconf", resolvconf)
        .replace("/usr/bin/meshd ", &format!("{} ", product_bin("meshd").display()));
    let path = root.join("resolver.sh");
    fs::write(&path, script).unwrap();
    let stop = unit["service"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|l| l.as_str())
        .find_map(|l| l.strip_prefix("ExecStopPost=+"))
        .expect("ExecStopPost");
    let stop: Vec<String> =
        stop.replace("/usr/bin/resolvconf", resolvconf).split_whitespace().map(str::to_owned).collect();

    let ran = output(&mut with_var_lib(&ns, &[("meshd", dirs.state.as_path())], &["bash", path.to_str().unwrap()]));
    assert!(ran.status.success(), "{}", describe(&ran));
    let resolv = fs::read_to_string(ns.etc_dir().join("resolv.conf")).unwrap();
    let nameservers: Vec<&str> = resolv.lines().filter_map(|l| l.strip_prefix("nameserver ")).collect();
    assert_eq!(nameservers, ["10.77.0.1", "192.0.2.53"], "the mesh DNS first, the LAN's kept: {resolv}");
    assert!(resolv.lines().any(|l| l.starts_with("search") && l.contains("home.internal")), "{resolv}");

    let argv: Vec<&str> = stop.iter().map(String::as_str).collect();
    run_ok(ns.command(argv[0]).args(&argv[1..]));
    let resolv = fs::read_to_string(ns.etc_dir().join("resolv.conf")).unwrap();
    assert!(!resolv.contains("10.77.0.1") && resolv.contains("192.0.2.53"), "taken back when meshd stops: {resolv}");
}
