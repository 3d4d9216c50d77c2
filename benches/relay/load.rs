//! The load: `wrk` from the shop (2 threads, 64 connections, `--latency`), keep-alive or with a new connection per
//! request, its figures parsed; and a check, from the shop's own TCP and IP counters, of how many connections a
//! workload really opened and whether each carried a whole certificate chain (a full handshake, not a resumption).

use std::fmt;

use meshd_e2e::Netns;

use crate::cpu;
use crate::network::net_counters;

/// wrk's threads (the machine has 2 cores, which the proxies and backends share).
const THREADS: u32 = 2;
/// wrk's open connections.
const CONNECTIONS: u32 = 64;

/// How requests use connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    /// Every connection carries requests one after the other.
    KeepAlive,
    /// `Connection: close`: the server closes after each answer, wrk connects again (a TLS handshake per request).
    NewConnection,
}

impl Workload {
    /// Both, in the order they are measured.
    pub const ALL: [Workload; 2] = [Workload::KeepAlive, Workload::NewConnection];

    /// wrk's extra arguments.
    fn args(self) -> &'static [&'static str] {
        match self {
            Workload::KeepAlive => &[],
            Workload::NewConnection => &["-H", "Connection: close"],
        }
    }
}

impl fmt::Display for Workload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Workload::KeepAlive => "keep-alive",
            Workload::NewConnection => "new connection",
        })
    }
}

/// What one wrk run measured.
#[derive(Debug, Clone, Copy, Default)]
pub struct Figures {
    /// Requests per second.
    pub rps: f64,
    /// Median latency, ms.
    pub p50_ms: f64,
    /// 99th percentile latency, ms.
    pub p99_ms: f64,
    /// Requests completed.
    pub requests: u64,
    /// Socket errors (connect, read, write, timeout).
    pub errors: u64,
    /// Answers other than 2xx or 3xx.
    pub non_2xx: u64,
    /// CPU time of the servers' namespaces per request, µs.
    pub server_cpu_us: f64,
    /// CPU time of wrk per request, µs.
    pub client_cpu_us: f64,
}

/// Run wrk from `shop` against `url` for `seconds`, after `warm_up` seconds of the same load (not counted), with the
/// CPU time of the processes in `servers` and of wrk.
pub fn wrk(shop: &Netns, servers: &[&Netns], url: &str, workload: Workload, seconds: u32, warm_up: u32) -> Figures {
    if warm_up > 0 {
        run(shop, url, workload, warm_up);
    }
    let servers_before = cpu::servers(servers);
    let client_before = cpu::children();
    let text = run(shop, url, workload, seconds);
    let client = cpu::children() - client_before;
    let server = cpu::servers(servers) - servers_before;
    let mut figures = parse(&text).unwrap_or_else(|| panic!("wrk's output for {url} could not be read:\n{text}"));
    let per_request = |seconds: f64| seconds * 1e6 / figures.requests.max(1) as f64;
    (figures.server_cpu_us, figures.client_cpu_us) = (per_request(server), per_request(client));
    figures
}

/// One wrk run: its standard output.
fn run(shop: &Netns, url: &str, workload: Workload, seconds: u32) -> String {
    let (threads, connections, duration) =
        (format!("-t{THREADS}"), format!("-c{CONNECTIONS}"), format!("-d{seconds}s"));
    let mut argv = vec!["wrk", &threads, &connections, &duration, "--latency"];
    argv.extend_from_slice(workload.args());
    argv.push(url);
    let out = shop.exec(&argv);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "wrk {url} failed: {text}{}", String::from_utf8_lossy(&out.stderr));
    text
}

/// The figures of wrk's `--latency` report.
fn parse(text: &str) -> Option<Figures> {
    let mut figures = Figures::default();
    let (mut p50, mut p99, mut rps) = (None, None, None);
    for line in text.lines().map(str::trim) {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["50%", value] => p50 = milliseconds(value),
            ["99%", value] => p99 = milliseconds(value),
            ["Requests/sec:", value] => rps = value.parse().ok(),
            [count, "requests", "in", ..] => figures.requests = count.parse().ok()?,
            ["Non-2xx", "or", "3xx", "responses:", count] => figures.non_2xx = count.parse().ok()?,
            ["Socket", "errors:", rest @ ..] => {
                figures.errors = rest.iter().filter_map(|w| w.trim_end_matches(',').parse::<u64>().ok()).sum();
            }
            _ => {}
        }
    }
    figures.p50_ms = p50?;
    figures.p99_ms = p99?;
    figures.rps = rps?;
    Some(figures)
}

/// A wrk duration (`850.00us`, `12.34ms`, `1.02s`, `1.00m`) in milliseconds.
fn milliseconds(value: &str) -> Option<f64> {
    let split = value.find(|c: char| c.is_ascii_alphabetic())?;
    let (number, unit) = value.split_at(split);
    let number: f64 = number.parse().ok()?;
    let factor = match unit {
        "us" => 0.001,
        "ms" => 1.0,
        "s" => 1000.0,
        "m" => 60_000.0,
        _ => return None,
    };
    Some(number * factor)
}

/// What a short run did, seen from the shop's counters.
#[derive(Debug, Clone, Copy)]
pub struct Connections {
    /// Requests wrk completed.
    pub requests: u64,
    /// TCP connections the shop opened.
    pub opened: u64,
    /// Bytes the shop received per connection (IP payload and headers).
    pub bytes_in_per_connection: u64,
}

/// Run `workload` for `seconds` against `url` and count the shop's TCP connections and received bytes.
pub fn connections(shop: &Netns, url: &str, workload: Workload, seconds: u32) -> Connections {
    let before = (counter(shop, "snmp", "Tcp", "ActiveOpens"), counter(shop, "netstat", "IpExt", "InOctets"));
    let text = run(shop, url, workload, seconds);
    let after = (counter(shop, "snmp", "Tcp", "ActiveOpens"), counter(shop, "netstat", "IpExt", "InOctets"));
    let requests = parse(&text).map_or(0, |f| f.requests);
    let opened = after.0 - before.0;
    Connections { requests, opened, bytes_in_per_connection: (after.1 - before.1) / opened.max(1) }
}

/// One counter of `/proc/net/FILE` in `ns` (a header line `Group: names...` followed by `Group: values...`).
fn counter(ns: &Netns, file: &str, group: &str, name: &str) -> u64 {
    let text = net_counters(ns, file);
    let prefix = format!("{group}:");
    let lines: Vec<&str> = text.lines().filter(|l| l.starts_with(&prefix)).collect();
    let [names, values] = lines.as_slice() else { panic!("/proc/net/{file} has no {group} pair:\n{text}") };
    let at = names.split_whitespace().position(|n| n == name).unwrap_or_else(|| panic!("no {group} {name}"));
    values.split_whitespace().nth(at).and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("{group} {name}"))
}
