//! Live updates at scale: how long one change takes to reach N member hosts, and what it costs the
//! controller. The figures are recorded in docs/PERFORMANCE.md, "Live updates at scale (sync)".
//!
//! One binary in three roles (it runs itself):
//! - the driver (no role argument) runs one controller process per host count and prints the tables;
//! - `controller` serves a `sync::Publisher` over a state of N member nodes on 127.0.0.1, publishes
//!   changes and measures; the process holds nothing else, so its CPU time and memory are the controller's;
//! - `clients` runs N light members in one process, each a TCP session from its own mesh address: the
//!   network is 127.0.0.0/8, so member index `i` is 127.0.0.0 + i, and Linux routes all of it to `lo`.
//!
//! Every member parses every `Changes` line and checks that it follows the previous one; FULL_MEMBERS
//! of them also keep a whole copy of the state, apply each change with `sync::apply` and finally check
//! their copy's digest against the controller's (a copy for every member would need N copies of an
//! N-node state, an estimated 30 GB at 10,000).
//!
//! Run: `cargo bench -p meshd-e2e --bench sync_scale [-- --hosts 100,1000,10000 --changes 20 --no-reference]`
//! (needs a hard limit of open files above the largest host count: each process holds one socket per member).

use std::io::{BufRead as _, Write as _};
use std::net::SocketAddr;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, mpsc as std_mpsc};
use std::time::Duration;

use meshd::links::sync::Publisher;
use meshd_core::input::Label;
use meshd_core::model::{AccessRule, DeviceGrants, Network, Node, Protocol, Role, Service, SharedState};
use meshd_core::wire::sync::{self, ToHub, ToMember};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpSocket;
use tokio::net::tcp::OwnedReadHalf;
use tokio::sync::{Semaphore, broadcast, mpsc};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

const DEFAULT_HOSTS: [usize; 3] = [100, 1_000, 10_000];
const DEFAULT_CHANGES: usize = 20;
/// Members that keep a whole copy of the state and apply every change to it.
const FULL_MEMBERS: usize = 16;
/// Connections being opened at once (below the listener's backlog of 1024).
const CONNECTING: usize = 256;
/// Longest wait for the clients to report a step.
const STEP_TIMEOUT: Duration = Duration::from_secs(600);
/// Runs of each single-shot timing (serialising, digesting), of which the median is kept.
const REPEATS: usize = 5;
/// Worker threads of each process's runtime (the machine the figures were taken on has 2 cores).
const WORKERS: usize = 2;

fn main() {
    // `cargo bench` passes `--bench`.
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
    let result = match args.first().map(String::as_str) {
        Some("controller") => controller(&args[1..]),
        Some("clients") => clients(&args[1..]),
        _ => driver(&args),
    };
    if let Err(e) = result {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn flag<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).map(String::as_str)
}

fn number(args: &[String], name: &str, default: usize) -> Result<usize> {
    match flag(args, name) {
        Some(text) => Ok(text.replace('_', "").parse().map_err(|e| format!("{name} {text:?}: {e}"))?),
        None => Ok(default),
    }
}

fn required<'a>(args: &'a [String], name: &str) -> Result<&'a str> {
    Ok(flag(args, name).ok_or_else(|| format!("{name} is missing"))?)
}

// ---------------------------------------------------------------------------------------------------
// Driver

fn driver(args: &[String]) -> Result<()> {
    let mut rest = args.iter();
    while let Some(arg) = rest.next() {
        match arg.as_str() {
            "--hosts" | "--changes" => {
                rest.next();
            }
            "--no-reference" => {}
            _ => return Err(format!("unknown argument {arg:?} (see the header of benches/sync_scale.rs)").into()),
        }
    }
    let hosts: Vec<usize> = match flag(args, "--hosts") {
        Some(list) => list
            .split(',')
            .map(|n| n.trim().replace('_', "").parse::<usize>().map_err(|e| format!("--hosts {n:?}: {e}")))
            .collect::<std::result::Result<_, _>>()?,
        None => DEFAULT_HOSTS.to_vec(),
    };
    let changes = number(args, "--changes", DEFAULT_CHANGES)?;
    let reference = !args.iter().any(|a| a == "--no-reference");
    let exe = std::env::current_exe()?;
    let mut rows = Vec::new();
    for n in hosts {
        eprintln!("sync_scale: {n} hosts, {changes} changes");
        let mut command = Command::new(&exe);
        command.args(["controller", "--hosts", &n.to_string(), "--changes", &changes.to_string()]);
        if !reference {
            command.arg("--no-reference");
        }
        let out = command.stderr(Stdio::inherit()).output()?;
        if !out.status.success() {
            return Err(format!("the controller for {n} hosts failed ({})", out.status).into());
        }
        rows.push(serde_json::from_slice::<Value>(&out.stdout)?);
    }
    print_tables(&rows, changes, reference);
    Ok(())
}

fn print_tables(rows: &[Value], changes: usize, reference: bool) {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("model name").map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned()))
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!("Machine: {cores} cores ({cpu}), kernel {}; {changes} changes per host count.", kernel.trim());

    println!("\nDelivery of one change (median and max of {changes}), from the call of `publish()`:\n");
    header(&[
        "hosts",
        "to all, median (ms)",
        "to all, max (ms)",
        "to the first, median (ms)",
        "publish() CPU, median (ms)",
        "controller process CPU per change, median (ms)",
        "client process CPU per change, median (ms)",
        "controller RSS: no clients / connected / peak (MB)",
    ]);
    for r in rows {
        let rss = format!("{:.1} / {:.1} / {:.1}", mb(&r["rss_idle_kb"]), mb(&r["rss_connected_kb"]), mb(&r["hwm_kb"]));
        row(&[
            r["hosts"].to_string(),
            format!("{:.1}", median(&r["deliver_ms"])),
            format!("{:.1}", max(&r["deliver_ms"])),
            format!("{:.2}", median(&r["first_ms"])),
            format!("{:.2}", median(&r["publish_cpu_ms"])),
            format!("{:.1}", median(&r["process_cpu_ms"])),
            format!("{:.1}", median(&r["client_cpu_ms"])),
            rss,
        ]);
    }

    println!("\nWhere `publish()`'s time goes (each part timed alone, median of {REPEATS}), and setup:\n");
    header(&[
        "hosts",
        "publish() wall, median (ms)",
        "digest() (ms)",
        "changes() (ms)",
        "state.clone() by the caller (ms)",
        "RSS per connected member (KB)",
        "N members connect and subscribe (ms)",
        "listen queue overflows while connecting",
        "TCP retransmits during the changes",
    ]);
    for r in rows {
        row(&[
            r["hosts"].to_string(),
            format!("{:.2}", median(&r["publish_wall_ms"])),
            format!("{:.2}", f(&r["digest_ms"])),
            format!("{:.2}", f(&r["changes_ms"])),
            format!("{:.2}", f(&r["clone_ms"])),
            format!("{:.1}", (f(&r["rss_connected_kb"]) - f(&r["rss_idle_kb"])) / f(&r["hosts"])),
            format!("{:.0}", f(&r["connect_ms"])),
            r["connect_listen_overflows"].to_string(),
            r["changes_retransmits"].to_string(),
        ]);
    }

    println!("\nSizes, and the whole state instead of the changes:\n");
    let mut columns = vec![
        "hosts",
        "state JSON (KB)",
        "Changes line, median (bytes)",
        "sent per change to all members (KB)",
        "whole state to all members at once (ms)",
        "controller CPU for it (ms)",
        "controller peak RSS after it (MB)",
        "TCP retransmits during it",
    ];
    if reference {
        columns.extend(["serialise the whole state once (ms)", "serialise it once per member, N times (ms)"]);
    }
    header(&columns);
    for r in rows {
        let line = median(&r["change_line_bytes"]);
        let mut cells = vec![
            r["hosts"].to_string(),
            format!("{:.0}", f(&r["state_bytes"]) / 1024.0),
            format!("{line:.0}"),
            format!("{:.0}", line * f(&r["hosts"]) / 1024.0),
            format!("{:.0}", f(&r["resync_ms"])),
            format!("{:.0}", f(&r["resync_cpu_ms"])),
            format!("{:.1}", mb(&r["hwm_resync_kb"])),
            r["resync_retransmits"].to_string(),
        ];
        if reference {
            cells.extend([format!("{:.2}", f(&r["serialise_once_ms"])), format!("{:.0}", f(&r["serialise_each_ms"]))]);
        }
        row(&cells);
    }
}

/// A markdown table's header: the first column left-aligned, the others (figures) right-aligned.
fn header(columns: &[&str]) {
    println!("| {} |", columns.join(" | "));
    println!("|------|{}", "-----:|".repeat(columns.len() - 1));
}

fn row(cells: &[String]) {
    println!("| {} |", cells.join(" | "));
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}

fn mb(kb: &Value) -> f64 {
    f(kb) / 1024.0
}

fn figures(values: &Value) -> Vec<f64> {
    values.as_array().map(|a| a.iter().map(f).collect()).unwrap_or_default()
}

fn median(values: &Value) -> f64 {
    median_of(figures(values))
}

fn median_of(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn max(values: &Value) -> f64 {
    figures(values).into_iter().reduce(f64::max).unwrap_or(f64::NAN)
}

// ---------------------------------------------------------------------------------------------------
// Controller

fn controller(args: &[String]) -> Result<()> {
    let hosts = number(args, "--hosts", DEFAULT_HOSTS[0])?;
    let changes = number(args, "--changes", DEFAULT_CHANGES)?;
    let reference = !args.iter().any(|a| a == "--no-reference");
    raise_nofile(hosts + 64)?;

    let mut state = build_state(hosts);
    let mut next_index = state.devices.iter().map(|d| d.index).max().unwrap_or(1) + 1;
    let publisher = Publisher::new(state.clone());
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(WORKERS).enable_all().build()?;
    // The daemon's own listener (backlog 1024), on the hub's address.
    let listener =
        runtime.block_on(async { meshd::host::socket::listen_tcp("127.0.0.1:0".parse().expect("an address")) })?;
    let hub = listener.local_addr()?;
    let (requests, _requests) = mpsc::channel(16);
    runtime.spawn(publisher.clone().serve(listener, requests));
    let (rss_idle_kb, _) = memory()?;

    let tcp_start = tcp_counters()?;
    let spawned = mono_ns();
    let mut clients = Clients::spawn(hub, hosts, changes, &publisher.digest())?;
    let connected = clients.expect(0)?;
    let tcp_connected = tcp_counters()?;
    // A first change, not counted: every session has said hello and subscribed once it is delivered.
    change(&mut state, 0, &mut next_index);
    publisher.publish(state.clone());
    let mut client_cpu = clients.expect(1)?.cpu_ns;
    let (rss_connected_kb, _) = memory()?;

    let mut deliver_ms = Vec::new();
    let mut first_ms = Vec::new();
    let mut publish_wall_ms = Vec::new();
    let mut publish_cpu_ms = Vec::new();
    let mut process_cpu_ms = Vec::new();
    let mut client_cpu_ms = Vec::new();
    let mut change_line_bytes = Vec::new();
    for k in 1..=changes {
        let old = state.clone();
        change(&mut state, k, &mut next_index);
        // The caller's copy, as the controller hands over `snapshot.shared()`: made outside the timing.
        let next = state.clone();
        let from = publisher.digest();
        let (process0, thread0) = (clock_ns(libc::CLOCK_PROCESS_CPUTIME_ID), clock_ns(libc::CLOCK_THREAD_CPUTIME_ID));
        let start = mono_ns();
        let published = publisher.publish(next);
        let wall = mono_ns() - start;
        let thread = clock_ns(libc::CLOCK_THREAD_CPUTIME_ID) - thread0;
        if !published {
            return Err(format!("change {k} changed nothing").into());
        }
        let report = clients.expect(k + 1)?;
        let process = clock_ns(libc::CLOCK_PROCESS_CPUTIME_ID) - process0;
        deliver_ms.push(ms(report.last_ns - start));
        first_ms.push(ms(report.first_ns - start));
        publish_wall_ms.push(ms(wall));
        publish_cpu_ms.push(ms(thread));
        process_cpu_ms.push(ms(process));
        client_cpu_ms.push(ms(report.cpu_ns - client_cpu));
        client_cpu = report.cpu_ns;
        let line = ToMember::Changes { from, to: publisher.digest(), changes: sync::changes(&old, &state) };
        change_line_bytes.push(serde_json::to_string(&line)?.len() + 1);
    }

    clients.command(&format!("verify {}", publisher.digest()))?;
    let verified = clients.expect(changes + 2)?;
    let tcp_changed = tcp_counters()?;
    if verified.bad > 0 {
        return Err(format!("{} members missed a change or hold a copy that differs", verified.bad).into());
    }
    let (_, hwm_kb) = memory()?;

    let process0 = clock_ns(libc::CLOCK_PROCESS_CPUTIME_ID);
    let start = mono_ns();
    clients.command("resync")?;
    let resync = clients.expect(changes + 3)?;
    let resync_cpu = clock_ns(libc::CLOCK_PROCESS_CPUTIME_ID) - process0;
    let (_, hwm_resync_kb) = memory()?;
    let tcp_resynced = tcp_counters()?;
    drop(clients);

    let whole = ToMember::State { digest: publisher.digest(), state: state.clone() };
    let digest_ms = time_median(|| sync::digest(&state).len());
    let changes_ms = time_median(|| sync::changes(&old_state(&state), &state).len());
    let clone_ms = time_median(|| state.clone().nodes.len());
    let mut result = json!({
        "hosts": hosts,
        "connect_ms": ms(connected.last_ns - spawned),
        "connect_listen_overflows": tcp_connected.0 - tcp_start.0,
        "changes_retransmits": tcp_changed.1 - tcp_connected.1,
        "resync_retransmits": tcp_resynced.1 - tcp_changed.1,
        "deliver_ms": deliver_ms,
        "first_ms": first_ms,
        "publish_wall_ms": publish_wall_ms,
        "publish_cpu_ms": publish_cpu_ms,
        "process_cpu_ms": process_cpu_ms,
        "client_cpu_ms": client_cpu_ms,
        "change_line_bytes": change_line_bytes,
        "rss_idle_kb": rss_idle_kb,
        "rss_connected_kb": rss_connected_kb,
        "hwm_kb": hwm_kb,
        "hwm_resync_kb": hwm_resync_kb,
        "resync_ms": ms(resync.last_ns - start),
        "resync_cpu_ms": ms(resync_cpu),
        "state_bytes": serde_json::to_vec(&state)?.len(),
        "full_line_bytes": serde_json::to_vec(&whole)?.len() + 1,
        "digest_ms": digest_ms,
        "changes_ms": changes_ms,
        "clone_ms": clone_ms,
    });
    if reference {
        // What a design that computes and sends each host its own whole map pays per change, at least:
        // the serialisation, once per host.
        result["serialise_once_ms"] = json!(time_median(|| serde_json::to_string(&whole).map_or(0, |s| s.len())));
        let start = mono_ns();
        let bytes: usize = (0..hosts).map(|_| serde_json::to_string(&whole).map_or(0, |s| s.len())).sum();
        result["serialise_each_ms"] = json!(ms(mono_ns() - start));
        result["serialise_each_bytes"] = json!(bytes);
    }
    println!("{result}");
    Ok(())
}

/// The state before a typical change (an endpoint moved), for timing `sync::changes` alone.
fn old_state(state: &SharedState) -> SharedState {
    let mut old = state.clone();
    old.nodes[1].endpoint = Some("192.0.2.1:1".parse().expect("a valid endpoint"));
    old
}

/// Median wall time of `REPEATS` runs of `work`, in ms; its result is consumed so nothing is optimised away.
fn time_median(mut work: impl FnMut() -> usize) -> f64 {
    median_of(
        (0..REPEATS)
            .map(|_| {
                let start = mono_ns();
                std::hint::black_box(work());
                ms(mono_ns() - start)
            })
            .collect(),
    )
}

/// The client process, seen from the controller.
struct Clients {
    child: Child,
    stdin: ChildStdin,
    reports: std_mpsc::Receiver<String>,
}

/// A step every member reached: when the first and the last did (CLOCK_MONOTONIC, ns), the client
/// process's CPU time so far, and how many members found something wrong so far.
struct Report {
    first_ns: u64,
    last_ns: u64,
    cpu_ns: u64,
    bad: u64,
}

impl Clients {
    fn spawn(hub: SocketAddr, hosts: usize, changes: usize, digest: &str) -> Result<Clients> {
        let mut child = Command::new(std::env::current_exe()?)
            .args(["clients", "--hub", &hub.to_string(), "--hosts", &hosts.to_string()])
            .args(["--changes", &changes.to_string(), "--digest", digest])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdin = child.stdin.take().ok_or("no stdin for the clients")?;
        let stdout = child.stdout.take().ok_or("no stdout from the clients")?;
        let (lines, reports) = std_mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines().map_while(std::result::Result::ok) {
                if lines.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Clients { child, stdin, reports })
    }

    fn command(&mut self, command: &str) -> Result<()> {
        writeln!(self.stdin, "{command}")?;
        self.stdin.flush()?;
        Ok(())
    }

    /// Wait for every member to reach `step`.
    fn expect(&self, step: usize) -> Result<Report> {
        let line = self
            .reports
            .recv_timeout(STEP_TIMEOUT)
            .map_err(|_| format!("no report of step {step} from the clients"))?;
        let fields: Vec<&str> = line.split_whitespace().collect();
        match fields.as_slice() {
            ["step", k, first, last, cpu, bad] if k.parse::<usize>()? == step => {
                Ok(Report { first_ns: first.parse()?, last_ns: last.parse()?, cpu_ns: cpu.parse()?, bad: bad.parse()? })
            }
            _ => Err(format!("clients, waiting for step {step}: {line}").into()),
        }
    }
}

impl Drop for Clients {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------------------
// The network

fn label(name: &str) -> Label {
    name.parse().expect("a valid label")
}

fn network() -> Network {
    Network {
        name: label("bench"),
        domain: "bench.internal".into(),
        // Member index i is 127.0.0.0 + i: a loopback address a client can bind to.
        cidr: "127.0.0.0/8".parse().expect("a valid CIDR"),
        ula: "fd00:5ca1:e000::/48".parse().expect("a valid ULA prefix"),
    }
}

fn node(name: &str, index: u32, role: Role) -> Node {
    Node {
        name: label(name),
        // As long as a base64 WireGuard key; the sync protocol does not look inside.
        public_key: format!("{index:0>43}="),
        index,
        // Half the hosts have a public endpoint, the others sit behind NAT.
        endpoint: index
            .is_multiple_of(2)
            .then(|| format!("198.18.{}.{}:51820", index / 256 % 256, index % 256).parse().expect("a valid endpoint")),
        listen_port: 51820,
        interface: "meshd0".into(),
        role,
        disabled: false,
        rotate_key: false,
    }
}

/// A hub (index 1), `hosts` members (indexes 2..=hosts+1), hosts/10 services and as many devices
/// (two grants each), and up to 20 access rules.
fn build_state(hosts: usize) -> SharedState {
    let hosts = u32::try_from(hosts).expect("a host count fits in u32");
    let extra = (hosts / 10).max(1);
    let member = |i: u32| label(&format!("host-{}", 2 + i % hosts));
    SharedState {
        network: network(),
        nodes: std::iter::once(node("hub", 1, Role::Hub))
            .chain((2..=hosts + 1).map(|i| node(&format!("host-{i}"), i, Role::Node)))
            .collect(),
        services: (0..extra)
            .map(|j| Service {
                name: label(&format!("svc-{j}")),
                node: member(j * 7),
                target: format!("127.0.0.1:{}", 8000 + j % 1000).parse().expect("a valid target"),
                port: 8000 + (j % 1000) as u16,
                index: hosts + 2 + j,
                protocol: Protocol::Tcp,
            })
            .collect(),
        devices: (0..extra)
            .map(|j| DeviceGrants {
                name: label(&format!("dev-{j}")),
                index: hosts + 2 + extra + j,
                allow: vec![label(&format!("svc-{j}")), label(&format!("svc-{}", (j + 1) % extra))],
            })
            .collect(),
        rules: (0..extra.min(20)).map(|j| AccessRule { from: member(j), to: member(j + 1) }).collect(),
    }
}

/// Change number `k`, cycling through a device's grants, a new service, a moved endpoint, a new
/// access rule and a new node. Nothing disables or removes a member, whose session would close.
fn change(state: &mut SharedState, k: usize, next_index: &mut u32) {
    let members = state.nodes.len() - 1;
    let mut take = || {
        *next_index += 1;
        *next_index - 1
    };
    match k % 5 {
        0 => {
            let devices = state.devices.len();
            let grants = &mut state.devices[k % devices].allow;
            let first = label("svc-0");
            match grants.iter().position(|s| *s == first) {
                Some(at) => drop(grants.remove(at)),
                None => grants.push(first),
            }
        }
        1 => {
            let owner = state.nodes[1 + k % members].name.clone();
            state.services.push(Service {
                name: label(&format!("added-{k}")),
                node: owner,
                target: "127.0.0.1:9000".parse().expect("a valid target"),
                port: 9000,
                index: take(),
                protocol: Protocol::Tcp,
            });
        }
        2 => {
            let endpoint = format!("192.0.2.{}:{}", k % 250 + 1, 50000 + k).parse().expect("a valid endpoint");
            state.nodes[1 + (k * 7919) % members].endpoint = Some(endpoint);
        }
        3 => {
            let (from, to) =
                (state.nodes[1 + k % members].name.clone(), state.nodes[1 + (k * 31) % members].name.clone());
            state.rules.push(AccessRule { from, to });
        }
        _ => state.nodes.push(node(&format!("joined-{k}"), take(), Role::Node)),
    }
}

// ---------------------------------------------------------------------------------------------------
// Clients

#[derive(Clone)]
enum Order {
    /// Check the last digest received (and a kept copy's digest) against this one.
    Verify(Arc<str>),
    /// Say hello again with an unknown digest: the hub sends the whole state.
    Resync,
}

/// Steps every member reports: 0 connected, 1..=changes+1 each change (1 is the uncounted first),
/// then the verification and the resync.
struct Tracker {
    hosts: usize,
    steps: Vec<Step>,
    bad: AtomicU64,
    out: std_mpsc::Sender<String>,
}

struct Step {
    done: AtomicUsize,
    first: AtomicU64,
    last: AtomicU64,
}

impl Tracker {
    fn record(&self, step: usize) -> Result<()> {
        let now = mono_ns();
        let s = self.steps.get(step).ok_or_else(|| format!("step {step} was not announced"))?;
        s.first.fetch_min(now, SeqCst);
        s.last.fetch_max(now, SeqCst);
        if s.done.fetch_add(1, SeqCst) + 1 == self.hosts {
            let (first, last) = (s.first.load(SeqCst), s.last.load(SeqCst));
            let cpu = clock_ns(libc::CLOCK_PROCESS_CPUTIME_ID);
            let _ = self.out.send(format!("step {step} {first} {last} {cpu} {}", self.bad.load(SeqCst)));
        }
        Ok(())
    }
}

fn clients(args: &[String]) -> Result<()> {
    let hub: SocketAddr = required(args, "--hub")?.parse()?;
    let hosts = number(args, "--hosts", 0)?;
    let changes = number(args, "--changes", 0)?;
    let digest: Arc<str> = required(args, "--digest")?.into();
    raise_nofile(hosts + 64)?;

    let (out, printed) = std_mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in printed {
            println!("{line}");
        }
    });
    let steps = (0..changes + 4)
        .map(|_| Step { done: AtomicUsize::new(0), first: AtomicU64::new(u64::MAX), last: AtomicU64::new(0) })
        .collect();
    let tracker = Arc::new(Tracker { hosts, steps, bad: AtomicU64::new(0), out });
    let (orders, _) = broadcast::channel::<Order>(8);
    let receivers: Vec<_> = (0..hosts).map(|_| orders.subscribe()).collect();
    std::thread::spawn(move || {
        for line in std::io::stdin().lines().map_while(std::result::Result::ok) {
            let order = match line.split_once(' ') {
                Some(("verify", digest)) => Order::Verify(digest.into()),
                _ if line == "resync" => Order::Resync,
                _ => {
                    eprintln!("clients: unknown order {line:?}");
                    continue;
                }
            };
            let _ = orders.send(order);
        }
        // The controller is gone.
        std::process::exit(0);
    });

    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(WORKERS).enable_all().build()?;
    runtime.block_on(async move {
        let gate = Arc::new(Semaphore::new(CONNECTING));
        let stride = (hosts / FULL_MEMBERS).max(1);
        let members: Vec<_> = receivers
            .into_iter()
            .enumerate()
            .map(|(ordinal, orders)| {
                let member = Member {
                    index: u32::try_from(ordinal + 2).expect("a member index fits in u32"),
                    keeps_copy: ordinal.is_multiple_of(stride) && ordinal / stride < FULL_MEMBERS,
                    hub,
                    digest: digest.clone(),
                    tracker: tracker.clone(),
                    gate: gate.clone(),
                };
                tokio::spawn(async move {
                    if let Err(e) = member.follow(orders).await {
                        let _ = member.tracker.out.send(format!("fail member {}: {e}", member.index));
                    }
                })
            })
            .collect();
        for member in members {
            member.await?;
        }
        Ok(())
    })
}

struct Member {
    index: u32,
    keeps_copy: bool,
    hub: SocketAddr,
    digest: Arc<str>,
    tracker: Arc<Tracker>,
    gate: Arc<Semaphore>,
}

impl Member {
    async fn follow(&self, mut orders: broadcast::Receiver<Order>) -> Result<()> {
        let address = network().pool().v4_of(self.index);
        let permit = self.gate.acquire().await?;
        let socket = TcpSocket::new_v4()?;
        socket.bind(SocketAddr::new(address.into(), 0))?;
        let stream = socket.connect(self.hub).await?;
        stream.set_nodelay(true)?;
        let (read, mut write) = stream.into_split();
        let mut reader = BufReader::new(read);
        let mut line = Vec::new();
        let mut copy = None;
        let mut last = self.digest.to_string();
        if self.keeps_copy {
            write.write_all(hello("stale").as_bytes()).await?;
            let (digest, state) = read_state(&mut reader, &mut line).await?;
            (last, copy) = (digest, Some(state));
        } else {
            write.write_all(hello(&last).as_bytes()).await?;
        }
        drop(permit);
        self.tracker.record(0)?;
        let mut step = 0;
        loop {
            tokio::select! {
                read = reader.read_until(b'\n', &mut line) => {
                    if read? == 0 || !line.ends_with(b"\n") {
                        return Err("the hub closed the session".into());
                    }
                    let ToMember::Changes { from, to, changes } = serde_json::from_slice(&line)? else {
                        return Err(format!("expected changes: {}", String::from_utf8_lossy(&line)).into());
                    };
                    line.clear();
                    if from != last {
                        self.tracker.bad.fetch_add(1, SeqCst);
                    }
                    if let Some(copy) = copy.as_mut() {
                        sync::apply(copy, &changes);
                    }
                    last = to;
                    step += 1;
                    self.tracker.record(step)?;
                }
                order = orders.recv() => match order? {
                    Order::Verify(expected) => {
                        let copy_ok = copy.as_ref().is_none_or(|c: &SharedState| sync::digest(c) == *expected);
                        if last != *expected || !copy_ok {
                            self.tracker.bad.fetch_add(1, SeqCst);
                        }
                        self.tracker.record(self.tracker.steps.len() - 2)?;
                    }
                    Order::Resync => {
                        write.write_all(hello("stale").as_bytes()).await?;
                        if let Some(copy) = copy.as_mut() {
                            (last, *copy) = read_state(&mut reader, &mut line).await?;
                        } else {
                            skip_state(&mut reader).await?;
                        }
                        self.tracker.record(self.tracker.steps.len() - 1)?;
                    }
                },
            }
        }
    }
}

fn hello(digest: &str) -> String {
    let mut text = serde_json::to_string(&ToHub::Hello { digest: digest.into() }).expect("messages serialise");
    text.push('\n');
    text
}

/// Read and parse a whole-state line, as a member does.
async fn read_state(reader: &mut BufReader<OwnedReadHalf>, line: &mut Vec<u8>) -> Result<(String, SharedState)> {
    line.clear();
    reader.read_until(b'\n', line).await?;
    let parsed = serde_json::from_slice(line);
    line.clear();
    match parsed? {
        ToMember::State { digest, state } => Ok((digest, state)),
        _ => Err("expected the whole state".into()),
    }
}

/// Receive a whole-state line without keeping or parsing it (the members' parsing would only measure
/// the client process).
async fn skip_state(reader: &mut BufReader<OwnedReadHalf>) -> Result<()> {
    const START: &[u8] = b"{\"msg\":\"state\"";
    if !reader.fill_buf().await?.starts_with(START) {
        return Err("expected the whole state".into());
    }
    loop {
        let chunk = reader.fill_buf().await?;
        if chunk.is_empty() {
            return Err("the hub closed the session".into());
        }
        match chunk.iter().position(|&b| b == b'\n') {
            Some(end) => {
                reader.consume(end + 1);
                return Ok(());
            }
            None => {
                let len = chunk.len();
                reader.consume(len);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// Clocks, memory, limits

fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec, and the clock ids used here exist on Linux.
    let rc = unsafe { libc::clock_gettime(clock, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime({clock})");
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// CLOCK_MONOTONIC, which both processes share.
fn mono_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC)
}

fn ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

/// TCP counters of the network namespace (so of anything else running in it too): listen queue
/// overflows (connections dropped before `accept`) and retransmitted segments.
fn tcp_counters() -> Result<(u64, u64)> {
    Ok((counter("/proc/net/netstat", "TcpExt:", "ListenOverflows")?, counter("/proc/net/snmp", "Tcp:", "RetransSegs")?))
}

/// A counter of a /proc/net file made of (names, values) line pairs starting with `group`.
fn counter(file: &str, group: &str, name: &str) -> Result<u64> {
    let text = std::fs::read_to_string(file)?;
    let mut lines = text.lines().filter(|l| l.starts_with(group));
    while let (Some(names), Some(values)) = (lines.next(), lines.next()) {
        if let Some(at) = names.split_whitespace().position(|n| n == name) {
            let value = values.split_whitespace().nth(at).ok_or_else(|| format!("{file}: no value for {name}"))?;
            return Ok(value.parse()?);
        }
    }
    Err(format!("{file}: no counter {name}").into())
}

/// This process's (VmRSS, VmHWM) in KB.
fn memory() -> Result<(u64, u64)> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let field = |name: &str| -> Result<u64> {
        let line = status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .ok_or_else(|| format!("no {name} in /proc/self/status"))?;
        Ok(line.trim().trim_end_matches("kB").trim().parse()?)
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

/// Raise the soft limit of open files to `need` (one socket per member, plus a few).
fn raise_nofile(need: usize) -> Result<()> {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: `limit` is a valid, writable rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    let need = need as libc::rlim_t;
    if limit.rlim_cur >= need {
        return Ok(());
    }
    if limit.rlim_max < need {
        return Err(
            format!("needs {need} open files but the hard limit is {}: raise it (ulimit -Hn)", limit.rlim_max).into()
        );
    }
    limit.rlim_cur = need;
    // SAFETY: `limit` is a valid rlimit within the hard limit.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    Ok(())
}
