//! The bench's network, as in `tests/tests/public_https.rs`: the internet (a router), the relay (hub, public),
//! the home node `attic` behind a NAT router with no inbound, the CA (Pebble and its DNS server) and the shop
//! that runs the load generator. meshd serves three public names, each with its certificate from Pebble:
//!
//! - [`TERM`]: TLS terminated on the relay for the service `local` on the relay itself (the terminator alone);
//! - [`HOME`]: TLS terminated on the relay for the service `homet` on the home node (end to end, over the mesh);
//! - [`PASS`]: TLS passed through the relay to the home node's terminator for the service `homep`.
//!
//! Both services on the home node target the same nginx; the relay's nginx is the terminator's backend.

use std::fs;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use meshd_e2e::{
    Dns, MeshHost, Netns, Pebble, Proc, meshctl, nat_router, product_bin, router, run_json, run_ok, uplink, wait_until,
};
use serde_json::Value;

use crate::reference;

/// The relay's public address.
pub const RELAY_IP: &str = "172.31.80.2";
/// The CA's address (Pebble and its DNS server).
const CA_IP: &str = "172.31.81.2";

/// The name whose TLS the relay terminates for a service on the relay itself.
pub const TERM: &str = "term.shop.test";
/// The name whose TLS the relay terminates for a service on the home node.
pub const HOME: &str = "home.shop.test";
/// The name whose TLS the relay passes through to the home node.
pub const PASS: &str = "pass.shop.test";

/// The relay's backend (nginx on the relay, on loopback and its public address: the ceiling is measured there).
pub const RELAY_BACKEND_PORT: u16 = 8081;
/// The home node's backend (nginx on its loopback).
pub const HOME_BACKEND_PORT: u16 = 8082;

/// Everything the bench made; processes end before the namespaces they run in (fields drop in order).
pub struct Network {
    _relay_daemon: Proc,
    _attic_daemon: Proc,
    _backends: [Proc; 2],
    _pebble: Pebble,
    _dns: Dns,
    /// The relay (hub).
    pub relay: MeshHost,
    /// The home node, behind NAT.
    pub attic: MeshHost,
    /// The load generator's host, with the public names in its `/etc/hosts`.
    pub shop: Netns,
    _ca: Netns,
    _home_router: Netns,
    _internet: Netns,
    /// Pebble's issuing root (PEM file), the only root the shop trusts.
    pub root_ca: PathBuf,
    /// Where the service `homet` on the home node is reached over the mesh (`IPv4:PORT`).
    pub home_service: String,
    /// The home node's mesh address.
    pub attic_mesh: String,
}

impl Network {
    /// The whole network up, every name served by meshd (checked from the shop).
    pub fn new(root: &Path) -> Network {
        let internet = router("inet");
        let home_router = router("home");
        let relay = MeshHost::new("relay", root, "rb");
        let attic = MeshHost::new("attic", root, "rb");
        let ca = Netns::new("ca");
        let shop = Netns::new("shop");
        uplink(&internet, &relay.ns, "172.31.80");
        uplink(&internet, &ca, "172.31.81");
        uplink(&internet, &shop, "172.31.82");
        uplink(&internet, &home_router, "172.31.83");
        let (home_lan, _) = uplink(&home_router, &attic.ns, "192.168.80");
        nat_router(&home_router, &[("192.168.80.0/24", &home_lan)]);

        let dns_addr = format!("{CA_IP}:5353").parse().expect("a socket address");
        let names = [(TERM, RELAY_IP), (HOME, RELAY_IP), (PASS, RELAY_IP)];
        let dns = Dns::start(&ca, dns_addr, &names, root);
        let pebble = Pebble::start(&ca, CA_IP, 80, 443, dns_addr, root);
        pebble.issuing_root_pem();
        // curl in the shop resolves the names from its own /etc/hosts (bind-mounted by `ip netns exec`).
        fs::create_dir_all(shop.etc_dir()).expect("create /etc/netns/<shop>");
        let hosts = format!("127.0.0.1 localhost\n{RELAY_IP} {TERM} {HOME} {PASS}\n");
        fs::write(shop.etc_dir().join("hosts"), hosts).expect("write the shop's hosts file");

        let backends = [
            reference::nginx_backend(
                &relay.ns,
                &root.join("relay-nginx"),
                &[format!("127.0.0.1:{RELAY_BACKEND_PORT}"), format!("{RELAY_IP}:{RELAY_BACKEND_PORT}")],
            ),
            reference::nginx_backend(&attic.ns, &root.join("attic-nginx"), &[format!("127.0.0.1:{HOME_BACKEND_PORT}")]),
        ];

        relay.init_hub(&format!("{RELAY_IP}:51820"), &[]);
        let relay_daemon = run_daemon(&relay, &pebble, root);
        let ready = wait_until(Duration::from_secs(60), || UnixStream::connect(relay.state.join("meshd.sock")).is_ok());
        assert!(ready, "the relay did not become ready:\n{}", relay_daemon.log_text());
        let token = run_ok(meshctl(&relay.state).args(["node", "invite", "attic", "--expires", "10m"]));
        let joined = attic.join(token.trim(), &attic.state, None);
        assert!(joined.status.success(), "attic joins: {}", String::from_utf8_lossy(&joined.stderr));
        let attic_daemon = run_daemon(&attic, &pebble, root);

        let relay_target = format!("127.0.0.1:{RELAY_BACKEND_PORT}");
        let home_target = format!("127.0.0.1:{HOME_BACKEND_PORT}");
        for (service, node, target) in
            [("local", "relay", &relay_target), ("homet", "attic", &home_target), ("homep", "attic", &home_target)]
        {
            run_ok(meshctl(&relay.state).args(["service", "add", service, "--node", node, "--target", target]));
        }
        for (service, name, tls) in
            [("local", TERM, "terminate"), ("homet", HOME, "terminate"), ("homep", PASS, "passthrough")]
        {
            run_ok(meshctl(&relay.state).args(["expose", service, "--https", name, "--relay", "relay", "--tls", tls]));
        }

        let services = run_json(meshctl(&relay.state).args(["service", "list", "--json"]));
        let mesh_address = |name: &str| -> String {
            let service = services.as_array().into_iter().flatten().find(|s| s["name"] == name);
            service.and_then(|s| s["mesh_address"].as_str()).unwrap_or_else(|| panic!("no {name}: {services}")).into()
        };
        let nodes = run_json(meshctl(&relay.state).args(["node", "list", "--json"]));
        let attic_mesh = nodes
            .as_array()
            .into_iter()
            .flatten()
            .find(|n| n["name"] == "attic")
            .and_then(|n| n["address"].as_str())
            .unwrap_or_else(|| panic!("attic's mesh address: {nodes}"))
            .to_string();
        let network = Network {
            home_service: mesh_address("homet"),
            attic_mesh,
            _relay_daemon: relay_daemon,
            _attic_daemon: attic_daemon,
            _backends: backends,
            root_ca: pebble.issuing_root_path(),
            _pebble: pebble,
            _dns: dns,
            relay,
            attic,
            shop,
            _ca: ca,
            _home_router: home_router,
            _internet: internet,
        };
        for name in [TERM, HOME, PASS] {
            network.wait_served(name, 443, Duration::from_secs(90));
        }
        network
    }

    /// Wait until the shop gets nginx's page on `https://NAME:PORT/` (trusting only Pebble's root).
    pub fn wait_served(&self, name: &str, port: u16, within: Duration) {
        let url = format!("https://{name}:{port}/");
        let mut last = String::new();
        let served = wait_until(within, || {
            let out = self
                .shop
                .command("curl")
                .args(["-sSf", "--max-time", "3", "--cacert"])
                .arg(&self.root_ca)
                .arg(&url)
                .output()
                .expect("curl");
            last = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
            out.status.success() && last.starts_with(reference::BODY.trim_end())
        });
        assert!(served, "{url} was not served within {within:?}; last answer: {last}");
    }

    /// The certificate chain and key (PEM) that `host` got from Pebble for `name`, written as
    /// `dir/NAME.crt` and `dir/NAME.key` for the references; the paths.
    pub fn certificate_files(host: &MeshHost, name: &str, dir: &Path) -> (PathBuf, PathBuf) {
        let kept = host.state.join("acme").join(format!("{name}.json"));
        let text = fs::read_to_string(&kept).unwrap_or_else(|e| panic!("{}: {e}", kept.display()));
        let held: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", kept.display()));
        let pem = |field: &str| -> String {
            held["certificate"][field]
                .as_str()
                .unwrap_or_else(|| panic!("{} has no certificate.{field}", kept.display()))
                .into()
        };
        let (crt, key) = (dir.join(format!("{name}.crt")), dir.join(format!("{name}.key")));
        fs::write(&crt, pem("chain_pem")).expect("write the certificate chain");
        meshd_e2e::write_private(&key, &pem("key_pem"));
        (crt, key)
    }
}

/// `meshd run` on `host` as a service runs it (meshd's default log level: no per-connection debug lines), Pebble
/// as its CA, on the default public ports 80 and 443.
fn run_daemon(host: &MeshHost, pebble: &Pebble, root: &Path) -> Proc {
    let mut cmd = host.ns.command(product_bin("meshd"));
    cmd.env_remove("RUST_LOG").args(["run", "--wireguard", "userspace", "--state-dir"]).arg(&host.state);
    cmd.args(["--acme-directory", &pebble.directory_url(), "--acme-ca-root"]).arg(pebble.listener_ca_pem_path());
    Proc::spawn_logged(cmd, &format!("meshd run on {}", host.name), &root.join(format!("{}.log", host.name)))
}
