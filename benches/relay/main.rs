//! The public HTTPS relay (issue 12) under load, against references, in one run on one machine; the figures are
//! recorded in docs/PERFORMANCE.md, "Public HTTPS relay (issue 12)". Everything runs in network namespaces
//! (see [`network`]); the load generator is a rustls client on one core in the shop's namespace ([`load`]):
//!
//! 1. **terminator alone**: meshd's TLS-terminating proxy on the relay for a service on the relay itself against
//!    Caddy on the relay (same certificate and key) proxying to the same nginx; the nginx alone is the ceiling.
//! 2. **end to end**: the relay terminating TLS for the service on the home node (behind NAT, over the mesh)
//!    against Caddy on the relay proxying to the same service's mesh address over the same tunnel.
//! 3. **passthrough**: the relay passing TLS through to the home node's terminator (meshd, which proxies to the
//!    service's target, nginx, directly) against nginx's `stream` SNI proxy on the relay
//!    passing it over the same tunnel to Caddy on the home node's mesh address, which proxies to nginx directly.
//!
//! Each in three workloads: keep-alive, a new connection per request resuming the TLS session (meshd and Caddy both
//! offer session tickets), and a new connection per request with a full TLS handshake (the client keeps no session);
//! the client counts which handshake each connection made, [`cpu`] what each side spent. The client runs on the first
//! core, every server process (meshd with its WireGuard, Caddy, nginx) on the second.
//!
//! Run (root; packages `caddy nginx libnginx-mod-stream pebble dnsmasq-base`, release binaries; cargo runs the
//! bench in `tests/`, so give an absolute directory):
//! `cargo build --release -p meshd -p meshctl && MESHD_BIN_DIR=$PWD/target/release cargo bench -p meshd-e2e --bench
//! relay [-- --seconds 10 --only terminator,e2e,passthrough --workloads keep-alive,resumed,full --profile DIR]`;
//! `--profile DIR` records the whole machine
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

/// Seconds of load before each measured run, not counted.
const WARM_UP: u32 = 1;

/// What to run: the command line.
struct Options {
    seconds: u32,
    sections: Vec<String>,
    workloads: Vec<Workload>,
    profile: Option<PathBuf>,
}

fn options() -> Options {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
    let mut options = Options {
        seconds: 10,
        sections: ["terminator", "e2e", "passthrough"].map(String::from).to_vec(),
        workloads: Workload::ALL.to_vec(),
        profile: None,
    };
    let mut rest = args.iter();
    while let Some(arg) = rest.next() {
        let mut value = || rest.next().cloned().unwrap_or_else(|| fail(&format!("{arg} needs a value")));
        match arg.as_str() {
            "--seconds" => options.seconds = value().parse().unwrap_or_else(|e| fail(&format!("--seconds: {e}"))),
            "--only" => options.sections = value().split(',').map(str::to_owned).collect(),
            "--profile" => options.profile = Some(PathBuf::from(value())),
            "--workloads" => {
                options.workloads = value()
                    .split(',')
                    .map(|w| w.parse().unwrap_or_else(|e| fail(&format!("--workloads: {e}"))))
                    .collect();
            }
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
    load: load::Target,
}

impl Target {
    /// `https://NAME:PORT/` on the relay, answered with the certificate chain of the PEM file `chain`.
    fn https(label: &'static str, name: &str, port: u16, chain: &Path) -> Target {
        let addr = format!("{RELAY_IP}:{port}").parse().expect("the relay's address");
        Target { label, load: load::Target { addr, host: name.to_owned(), tls: Some(load::leaf(chain)) } }
    }

    /// Whether perf records this run (meshd's).
    fn meshd(&self) -> bool {
        self.label == "meshd"
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
    for tool in ["caddy", "nginx", "pebble", "dnsmasq"] {
        let found = Command::new("sh").args(["-c", &format!("command -v {tool} || test -x /usr/sbin/{tool}")]).output();
        if !found.is_ok_and(|o| o.status.success()) {
            fail(&format!("{tool} is missing (apt-get install caddy nginx libnginx-mod-stream pebble dnsmasq-base)"));
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
    let _relay_caddy = reference::caddy(&net.relay.ns, &root.join("relay-caddy"), &relay_sites);
    // Caddy cannot choose the source address of its upstream connections (2.6), and from the service's own node
    // the kernel picks the service's address, which its forwarder refuses: it goes to the backend directly.
    let home_backend = format!("127.0.0.1:{HOME_BACKEND_PORT}");
    let attic_site = [site(format!("{PASS}:9443"), Some(net.attic_mesh.clone()), &pass_crt, &pass_key, &home_backend)];
    let _attic_caddy = reference::caddy(&net.attic.ns, &root.join("attic-caddy"), &attic_site);
    let sni_proxy: Option<Proc> = reference::has_stream_module().then(|| {
        let to_caddy = format!("{}:9443", net.attic_mesh);
        reference::nginx_sni_proxy(
            &net.relay.ns,
            &root.join("sni-proxy"),
            &format!("{RELAY_IP}:8445"),
            &[(PASS, &to_caddy)],
        )
    });
    for (name, port) in [(TERM, 8443), (HOME, 8444)] {
        net.wait_served(name, port, std::time::Duration::from_secs(20));
    }
    if sni_proxy.is_some() {
        net.wait_served(PASS, 8445, std::time::Duration::from_secs(20));
    }

    // The proxies, their backends and meshd's WireGuard on one core, the client on the other: whichever proxy is
    // measured is the bottleneck, not the client (on shared cores the two took turns).
    cpu::pin(&[net.relay.ns.name().to_owned(), net.attic.ns.name().to_owned()]);

    let mut sections = Vec::new();
    let wanted = |s: &str| options.sections.iter().any(|x| x == s);
    if wanted("terminator") {
        let nginx = load::Target {
            addr: format!("{RELAY_IP}:{RELAY_BACKEND_PORT}").parse().expect("nginx's address"),
            host: RELAY_IP.to_owned(),
            tls: None,
        };
        let targets = [
            Target { label: "nginx alone (plain HTTP)", load: nginx },
            Target::https("meshd", TERM, 443, &term_crt),
            Target::https("Caddy", TERM, 8443, &term_crt),
        ];
        sections.push(measure("terminator alone", &targets, &net, &options));
    }
    if wanted("e2e") {
        let targets = [Target::https("meshd", HOME, 443, &home_crt), Target::https("Caddy", HOME, 8444, &home_crt)];
        sections.push(measure("end to end", &targets, &net, &options));
    }
    if wanted("passthrough") {
        if sni_proxy.is_some() {
            let targets = [
                Target::https("meshd", PASS, 443, &pass_crt),
                Target::https("nginx stream + Caddy", PASS, 8445, &pass_crt),
            ];
            sections.push(measure("passthrough", &targets, &net, &options));
        } else {
            println!("passthrough skipped: nginx's stream module is not installed (libnginx-mod-stream)");
        }
    }
    for section in &sections {
        print_section(section);
    }
    println!("\npeak resident memory (VmHWM) after the runs:");
    for host in [&net.relay, &net.attic] {
        let each: Vec<String> = cpu::peak_rss(host.ns.name())
            .iter()
            .map(|(name, kib)| format!("{name} {:.1} MiB", *kib as f64 / 1024.0))
            .collect();
        println!("  {}: {}", host.name, each.join(", "));
    }
}

/// Every workload against every target, in that order, each after a warm-up.
fn measure(title: &'static str, targets: &[Target], net: &Network, options: &Options) -> Section {
    let mut rows = Vec::new();
    for &workload in &options.workloads {
        for target in targets {
            if workload != Workload::KeepAlive && target.load.tls.is_none() {
                continue;
            }
            let perf = options.profile.as_ref().filter(|_| target.meshd()).map(|dir| {
                let file = dir.join(format!(
                    "{}-{}.perf.data",
                    title.replace(' ', "-"),
                    workload.to_string().replace([' ', ','], "-")
                ));
                record(&file, options.seconds + WARM_UP)
            });
            let servers = [&net.relay.ns, &net.attic.ns];
            let run = (options.seconds, WARM_UP);
            let figures = load::run(&net.shop, &servers, &target.load, workload, run, reference::BODY);
            if let Some(mut perf) = perf {
                perf.stop(std::time::Duration::from_secs(30));
            }
            let f = &figures;
            println!(
                "{title}, {workload}, {}: {:.0} req/s, p50 {:.2} ms, p99 {:.2} ms, {} requests, {} errors, {} not \
                 200, TLS handshakes {} full / {} resumed, CPU per request: servers {:.0} µs, client {:.0} µs",
                target.label,
                f.rps,
                f.p50_ms,
                f.p99_ms,
                f.requests,
                f.errors,
                f.non_200,
                f.full,
                f.resumed,
                f.server_cpu_us,
                f.client_cpu_us
            );
            if workload == Workload::Full {
                assert_eq!(
                    f.resumed, 0,
                    "{title}, {}: the client resumed a session in the full-handshake run",
                    target.label
                );
            }
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
        "| workload | target | req/s | p50 (ms) | p99 (ms) | errors / not 200 | TLS full / resumed | servers' CPU per \
         request (µs) | client's CPU per request (µs) |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|");
    for (workload, label, f) in &section.rows {
        println!(
            "| {workload} | {label} | {:.0} | {:.2} | {:.2} | {} / {} | {} / {} | {:.0} | {:.0} |",
            f.rps, f.p50_ms, f.p99_ms, f.errors, f.non_200, f.full, f.resumed, f.server_cpu_us, f.client_cpu_us
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
