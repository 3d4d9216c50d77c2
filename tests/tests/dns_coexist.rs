//! Issue 8, point 7: a hub next to another DNS server (dnsmasq here, as Pi-hole runs it) that holds port 53
//! on every address. Without `--dns-port` the hub refuses to start with one line naming the cause and the
//! way out; with `meshd run --dns-port 5353` and the one forwarding line from the docs in dnsmasq, a phone
//! whose config says `DNS = <hub>` resolves mesh names (answered by meshd through dnsmasq) and every other
//! name (answered by dnsmasq), and reaches its service by name.
use std::fs;
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::Duration;

use meshd_e2e::{
    Netns, Phone, Proc, UapiCleanup, meshctl, output, product_bin, require_root, run_json, run_ok, unique_ifname, veth,
    wait_until,
};

#[test]
fn a_hub_runs_next_to_dnsmasq_on_port_53() {
    if !require_root() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let hub = Netns::new("dnshub");
    let phone_ns = Netns::new("dnsphone");
    veth(&hub, &phone_ns, "172.31.250.1/24", "172.31.250.2/24");
    let ifname = unique_ifname("md");
    let _uapi = UapiCleanup(ifname.clone());

    let state = root.join("hub");
    let mut init = Command::new(product_bin("meshd"));
    init.args(["init", "--network", "home", "--name", "hub", "--endpoint", "172.31.250.1:51820"]);
    run_ok(init.args(["--interface", &ifname, "--state-dir"]).arg(&state));
    run_ok(meshctl(&state).args(["service", "add", "wallet", "--node", "hub", "--target", "127.0.0.1:9737"]));
    let conf = root.join("phone.conf");
    run_ok(meshctl(&state).args(["device", "add", "phone", "--allow", "wallet", "--conf"]).arg(&conf));
    let nodes = run_json(meshctl(&state).args(["node", "list", "--json"]));
    let hub_v4 = nodes[0]["address"].as_str().unwrap().to_owned();
    let _wallet = hub.spawn_logged(
        &["python3", "-m", "http.server", "9737", "--bind", "127.0.0.1", "--directory", "/proc/self"],
        &root.join("wallet.log"),
    );

    // dnsmasq on port 53 of every address, with the forwarding line the docs give, and a name of its own.
    let forward = format!("--server=/home.internal/{hub_v4}#5353");
    let reverse = "--server=/77.10.in-addr.arpa/10.77.0.1#5353".to_owned();
    let mut dnsmasq = hub.spawn_logged(
        &[
            "dnsmasq",
            "--keep-in-foreground",
            "--log-facility=-",
            "--no-resolv",
            "--no-hosts",
            "--conf-file=/dev/null",
            "--pid-file=",
            "--user=root",
            "--address=/shop.example/192.0.2.80",
            &forward,
            &reverse,
        ],
        &root.join("dnsmasq.log"),
    );
    let listening = wait_until(Duration::from_secs(5), || {
        dnsmasq.assert_running("starting");
        String::from_utf8_lossy(&hub.exec(&["ss", "-Hlun"]).stdout).contains("0.0.0.0:53")
    });
    assert!(listening, "dnsmasq is not on port 53");

    // Without --dns-port: one line, the cause and the way out; nothing left running or installed.
    let mut refused = hub.command(product_bin("meshd"));
    refused.args(["run", "--wireguard", "userspace", "--state-dir"]).arg(&state).env("RUST_LOG", "off");
    let out = output(&mut refused);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the hub started without its DNS");
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    assert!(stderr.starts_with("error: port 53 on the mesh address 10.77.0.1 is taken"), "{stderr}");
    assert!(stderr.contains("another DNS server") && stderr.contains("--dns-port"), "{stderr}");
    assert_eq!(stderr.matches("is taken").count(), 1, "the message repeats itself: {stderr}");
    assert!(!hub.ip(&["link", "show"]).contains(&ifname), "interface left behind");
    assert!(!hub.run(&["nft", "list", "tables"]).contains("meshd"), "access rules left behind");

    // A --dns-port that meshd itself uses (WireGuard and joins, live updates) is refused up front.
    for port in ["51820", "51871"] {
        let mut clash = hub.command(product_bin("meshd"));
        clash.args(["run", "--wireguard", "userspace", "--dns-port", port, "--state-dir"]).arg(&state);
        let out = output(clash.env("RUST_LOG", "off"));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && stderr.lines().count() == 1, "{stderr}");
        assert!(stderr.contains(&format!("--dns-port {port}: meshd itself uses that port")), "{stderr}");
    }

    // With --dns-port 5353: up, next to dnsmasq.
    let mut cmd = hub.command(product_bin("meshd"));
    cmd.args(["run", "--wireguard", "userspace", "--dns-port", "5353", "--state-dir"]).arg(&state);
    cmd.env("RUST_LOG", "info");
    let mut daemon = Proc::spawn_logged(cmd, "meshd run", &root.join("hub.log"));
    let ready = wait_until(Duration::from_secs(30), || {
        daemon.assert_running("starting next to dnsmasq");
        UnixStream::connect(state.join("meshd.sock")).is_ok()
    });
    assert!(ready, "the hub did not start with --dns-port");
    let answer = |ns: &Netns, server: &str, port: &str, name: &str| {
        let out = ns.exec(&["dig", "+short", "+time=1", "+tries=2", "-p", port, &format!("@{server}"), name]);
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    let services = run_json(meshctl(&state).args(["service", "list", "--json"]));
    let wallet = services[0]["mesh_address"].as_str().unwrap().rsplit_once(':').unwrap().0.to_owned();
    assert_eq!(answer(&hub, &hub_v4, "5353", "wallet.home.internal"), wallet, "meshd on port 5353");

    // The phone, set up from its config only: DNS = the hub, port 53, now answered by dnsmasq.
    let _phone = Phone::up(&phone_ns, &unique_ifname("dp"), &fs::read_to_string(&conf).unwrap());
    let resolves =
        wait_until(Duration::from_secs(10), || answer(&phone_ns, &hub_v4, "53", "wallet.home.internal") == wallet);
    assert!(resolves, "the phone does not resolve wallet.home.internal through the hub's port 53");
    assert_eq!(answer(&phone_ns, &hub_v4, "53", "shop.example"), "192.0.2.80", "other names, from dnsmasq");
    let ptr = phone_ns.exec(&["dig", "+short", "+time=1", "+tries=2", &format!("@{hub_v4}"), "-x", &wallet]);
    assert_eq!(String::from_utf8_lossy(&ptr.stdout).trim(), "wallet.home.internal.", "reverse name via dnsmasq");
    let body = phone_ns.http_get("http://wallet.home.internal:9737/", 5);
    assert!(body.is_some(), "the phone does not reach the wallet by name");
    let status = daemon.stop(Duration::from_secs(10));
    assert!(status.success(), "SIGTERM: {status:?}");
}
