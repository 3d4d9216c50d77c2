//! The public HTTPS relay (issue 12) under load, against references, in one run on one machine; the figures are
//! recorded in docs/PERFORMANCE.md, "Public HTTPS relay (issue 12)". Everything runs in network namespaces
//! (see [`network`]); the load generator is `wrk` in the shop's namespace ([`load`]):
//!
//! 1. **terminator alone**: meshd's TLS-terminating proxy on the relay for a service on the relay itself against
//!    Caddy on the relay (same certificate and key) proxying to the same nginx; the nginx alone is the ceiling.
//! 2. **end to end**: the relay terminating TLS for the service on the home node (behind NAT, over the mesh)
//!    against Caddy on the relay proxying to the same service's mesh address over the same tunnel.
//! 3. **passthrough**: the relay passing TLS through to the home node's terminator (meshd, which proxies to the
//!    service's target, nginx, directly) against nginx's `stream` SNI proxy on the relay
//!    passing it over the same tunnel to Caddy on the home node's mesh address, which proxies to nginx directly.
//!
//! Each in two workloads, keep-alive and a new connection per request. wrk resumes TLS sessions, and meshd and Caddy
//! both offer session tickets, so the new-connection workload also runs against a Caddy with tickets off (a full
//! handshake per request on its side). [`check_handshakes`] shows which server resumed; [`cpu`] what each side spent.
//!
//! Run (root; packages `wrk caddy nginx libnginx-mod-stream pebble dnsmasq-base`, release binaries; cargo runs the
//! bench in `tests/`, so give an absolute directory):
//! `cargo build --release -p meshd -p meshctl && MESHD_BIN_DIR=$PWD/target/release cargo bench -p meshd-e2e --bench
//! relay [-- --seconds 10 --only terminator,e2e,passthrough --profile DIR]`; `--profile DIR` records the whole machine
//! with `perf record -a -g` during each of meshd's runs (the figures of such a run are perf's too: do not record them).

mod cpu;
mod load;
mod network;
mod reference;

use std::path::{Path, PathBuf};
use std::process::Command;

use load::{Figures, Workload};
use meshd_e2e::{Proc, require_root};
use network::{HOME, HOME_BACKEND_PORT, Network, PASS, RELAY_BACKEND_PORT, RELAY_IP, TERM};
use reference::CaddySite;

/// Seconds of load before each measured run, not counted (wrk counts whole seconds).
const WARM_UP: u32 = 1;

/// The reference without TLS resumption (so with a full handshake per new connection, as meshd).
const FULL: &str = "Caddy, session tickets off";

/// What to run: the command line.
struct Options {
    seconds: u32,
    sections: Vec<String>,
    profile: Option<PathBuf>,
}

fn options() -> Options {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
    let mut options = Options {
        seconds: 10,
        sections: ["terminator", "e2e", "passthrough"].map(String::from).to_vec(),
        profile: None,
    };
    let mut rest = args.iter();
    while let Some(arg) = rest.next() {
        let mut value = || rest.next().cloned().unwrap_or_else(|| fail(&format!("{arg} needs a value")));
        match arg.as_str() {
            "--seconds" => options.seconds = value().parse().unwrap_or_else(|e| fail(&format!("--seconds: {e}"))),
            "--only" => options.sections = value().split(',').map(str::to_owned).collect(),
            "--profile" => options.profile = Some(PathBuf::from(value())),
            _ => fail(&format!("unknown argument {arg:?} (see the header of benches/relay/main.rs)")),
        }
    }
    options
}

fn fail(message: &str) -> ! {
    eprintln!("error: {message}");
    std::process::exit(2)
}

/// One measured target of a section.
struct Target {
    label: &'static str,
    url: String,
    /// Whether perf records this run (meshd's).
    meshd: bool,
    /// The one workload it is measured in (None: both).
    only: Option<Workload>,
}

impl Target {
    fn new(label: &'static str, url: String) -> Target {
        Target { label, url, meshd: label == "meshd", only: None }
    }
}

/// A section's results: for each workload, each target's figures.
struct Section {
    title: &'static str,
    rows: Vec<(Workload, &'static str, Figures)>,
}

fn main() {
    if !require_root() {
        return;
    }
    for tool in ["wrk", "caddy", "nginx", "pebble", "dnsmasq"] {
        let found = Command::new("sh").args(["-c", &format!("command -v {tool} || test -x /usr/sbin/{tool}")]).output();
        if !found.is_ok_and(|o| o.status.success()) {
            fail(&format!(
                "{tool} is missing (apt-get install wrk caddy nginx libnginx-mod-stream pebble dnsmasq-base)"
            ));
        }
    }
    let options = options();
    let tmp = tempfile::tempdir().expect("a temp dir");
    let root = tmp.path();
    let net = Network::new(root);
    let certs = root.join("certs");
    std::fs::create_dir_all(&certs).expect("create the certificates' directory");
    let (term_crt, term_key) = Network::certificate_files(&net.relay, TERM, &certs);
    let (home_crt, home_key) = Network::certificate_files(&net.relay, HOME, &certs);
    let (pass_crt, pass_key) = Network::certificate_files(&net.attic, PASS, &certs);

    let site = |address: String, bind: Option<String>, crt: &Path, key: &Path, upstream: &str| CaddySite {
        address,
        bind,
        crt: crt.to_path_buf(),
        key: key.to_path_buf(),
        upstream: upstream.to_string(),
    };
    let relay_sites = [
        site(format!("{TERM}:8443"), None, &term_crt, &term_key, &format!("127.0.0.1:{RELAY_BACKEND_PORT}")),
        site(format!("{HOME}:8444"), None, &home_crt, &home_key, &net.home_service),
    ];
    let _relay_caddy = reference::caddy(&net.relay.ns, &root.join("relay-caddy"), &relay_sites, true);
    let full_sites = [
        site(format!("{TERM}:8447"), None, &term_crt, &term_key, &format!("127.0.0.1:{RELAY_BACKEND_PORT}")),
        site(format!("{HOME}:8448"), None, &home_crt, &home_key, &net.home_service),
    ];
    let _relay_caddy_full = reference::caddy(&net.relay.ns, &root.join("relay-caddy-full"), &full_sites, false);
    // Caddy cannot choose the source address of its upstream connections (2.6), and from the service's own node
    // the kernel picks the service's address, which its forwarder refuses: it goes to the backend directly.
    let home_backend = format!("127.0.0.1:{HOME_BACKEND_PORT}");
    let attic_site = [site(format!("{PASS}:9443"), Some(net.attic_mesh.clone()), &pass_crt, &pass_key, &home_backend)];
    let _attic_caddy = reference::caddy(&net.attic.ns, &root.join("attic-caddy"), &attic_site, true);
    let sni_proxy: Option<Proc> = reference::has_stream_module().then(|| {
        let to_caddy = format!("{}:9443", net.attic_mesh);
        reference::nginx_sni_proxy(
            &net.relay.ns,
            &root.join("sni-proxy"),
            &format!("{RELAY_IP}:8445"),
            &[(PASS, &to_caddy)],
        )
    });
    for (name, port) in [(TERM, 8443), (HOME, 8444), (TERM, 8447), (HOME, 8448)] {
        net.wait_served(name, port, std::time::Duration::from_secs(20));
    }
    if sni_proxy.is_some() {
        net.wait_served(PASS, 8445, std::time::Duration::from_secs(20));
    }

    check_handshakes(&net, &term_crt);

    let mut sections = Vec::new();
    let wanted = |s: &str| options.sections.iter().any(|x| x == s);
    if wanted("terminator") {
        let targets = [
            Target::new("nginx alone (plain HTTP)", format!("http://{RELAY_IP}:{RELAY_BACKEND_PORT}/")),
            Target::new("meshd", format!("https://{TERM}/")),
            Target::new("Caddy", format!("https://{TERM}:8443/")),
            Target { only: Some(Workload::NewConnection), ..Target::new(FULL, format!("https://{TERM}:8447/")) },
        ];
        sections.push(measure("terminator alone", &targets, &net, &options));
    }
    if wanted("e2e") {
        let targets = [
            Target::new("meshd", format!("https://{HOME}/")),
            Target::new("Caddy", format!("https://{HOME}:8444/")),
            Target { only: Some(Workload::NewConnection), ..Target::new(FULL, format!("https://{HOME}:8448/")) },
        ];
        sections.push(measure("end to end", &targets, &net, &options));
    }
    if wanted("passthrough") {
        if sni_proxy.is_some() {
            let targets = [
                Target::new("meshd", format!("https://{PASS}/")),
                Target::new("nginx stream + Caddy", format!("https://{PASS}:8445/")),
            ];
            sections.push(measure("passthrough", &targets, &net, &options));
        } else {
            println!("passthrough skipped: nginx's stream module is not installed (libnginx-mod-stream)");
        }
    }
    for section in &sections {
        print_section(section);
    }
}

/// Check that the new-connection workload opens a connection per request and that each gets the whole
/// certificate chain (no TLS resumption): two seconds against meshd and Caddy, from the shop's counters.
fn check_handshakes(net: &Network, chain_pem: &Path) {
    let chain = chain_der_len(chain_pem);
    println!("handshake check (2 s, new connection per request): certificate chain {chain} bytes (DER)");
    for (label, url) in [
        ("meshd", format!("https://{TERM}/")),
        ("Caddy", format!("https://{TERM}:8443/")),
        ("Caddy, session tickets off", format!("https://{TERM}:8447/")),
    ] {
        let seen = load::connections(&net.shop, &url, Workload::NewConnection, 2);
        let full = seen.bytes_in_per_connection > chain as u64;
        println!(
            "  {label}: {} requests, {} connections opened, {} bytes received per connection: {}",
            seen.requests,
            seen.opened,
            seen.bytes_in_per_connection,
            if full { "more than the chain (a full handshake each)" } else { "LESS than the chain (resumed?)" }
        );
    }
}

/// The DER length of the certificates in a PEM file.
fn chain_der_len(path: &Path) -> usize {
    use base64::Engine as _;
    let text = std::fs::read_to_string(path).expect("read the chain");
    let mut len = 0;
    for block in text.split("-----END CERTIFICATE-----").filter(|b| b.contains("BEGIN")) {
        let b64: String = block.lines().filter(|l| !l.starts_with("-----") && !l.is_empty()).collect();
        len += base64::engine::general_purpose::STANDARD.decode(b64.trim()).map_or(0, |d| d.len());
    }
    assert!(len > 0, "{} holds no certificate", path.display());
    len
}

/// Every workload against every target, in that order, each after a warm-up.
fn measure(title: &'static str, targets: &[Target], net: &Network, options: &Options) -> Section {
    let mut rows = Vec::new();
    for workload in Workload::ALL {
        for target in targets.iter().filter(|t| t.only.is_none_or(|w| w == workload)) {
            let perf = options.profile.as_ref().filter(|_| target.meshd).map(|dir| {
                let file = dir.join(format!(
                    "{}-{}.perf.data",
                    title.replace(' ', "-"),
                    workload.to_string().replace(' ', "-")
                ));
                record(&file, options.seconds + WARM_UP)
            });
            let servers = [&net.relay.ns, &net.attic.ns];
            let figures = load::wrk(&net.shop, &servers, &target.url, workload, options.seconds, WARM_UP);
            if let Some(mut perf) = perf {
                perf.stop(std::time::Duration::from_secs(30));
            }
            let f = &figures;
            println!(
                "{title}, {workload}, {}: {:.0} req/s, p50 {:.2} ms, p99 {:.2} ms, {} requests, {} socket errors, {} \
                 non-2xx, CPU per request: servers {:.0} µs, wrk {:.0} µs",
                target.label,
                f.rps,
                f.p50_ms,
                f.p99_ms,
                f.requests,
                f.errors,
                f.non_2xx,
                f.server_cpu_us,
                f.client_cpu_us
            );
            rows.push((workload, target.label, figures));
        }
    }
    Section { title, rows }
}

/// `perf record -a -g` of the whole machine for `seconds` into `file`.
fn record(file: &Path, seconds: u32) -> Proc {
    let mut cmd = Command::new("perf");
    cmd.args(["record", "-a", "-g", "-F", "499", "-o"]).arg(file).args(["--", "sleep", &seconds.to_string()]);
    Proc::spawn(cmd, "perf record")
}

/// A section's figures, then meshd against each other target as ratios.
fn print_section(section: &Section) {
    println!("\n### {}\n", section.title);
    println!(
        "| workload | target | req/s | p50 (ms) | p99 (ms) | errors / non-2xx | servers' CPU per request (µs) | wrk's CPU \
         per request (µs) |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|");
    for (workload, label, f) in &section.rows {
        println!(
            "| {workload} | {label} | {:.0} | {:.2} | {:.2} | {} / {} | {:.0} | {:.0} |",
            f.rps, f.p50_ms, f.p99_ms, f.errors, f.non_2xx, f.server_cpu_us, f.client_cpu_us
        );
    }
    println!(
        "\n| workload | meshd against | req/s, meshd / it | p99, meshd / it | servers' CPU per request, meshd / it |"
    );
    println!("|---|---|---:|---:|---:|");
    for workload in Workload::ALL {
        let of = |label: &str| section.rows.iter().find(|(w, l, _)| *w == workload && *l == label).map(|r| r.2);
        let Some(meshd) = of("meshd") else { continue };
        for (_, label, other) in section.rows.iter().filter(|(w, l, _)| *w == workload && *l != "meshd") {
            let (rps, p99, cpu) =
                (meshd.rps / other.rps, meshd.p99_ms / other.p99_ms, meshd.server_cpu_us / other.server_cpu_us);
            println!("| {workload} | {label} | {rps:.2} | {p99:.2} | {cpu:.2} |");
        }
    }
}
