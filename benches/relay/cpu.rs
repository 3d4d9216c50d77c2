//! CPU time spent during a run, whoever had the cores: the servers' side (every process in the relay's and the home
//! node's namespaces: meshd with its WireGuard, Caddy, nginx) and the load generator's thread. On two shared cores
//! the side that saturates them decides req/s; CPU time per request says what each side costs whatever the other
//! does. [`pin`] gives the servers their own core (the client has the other, [`crate::load`]).

use std::process::Command;

/// Clock ticks per second of `/proc/PID/stat` (`getconf CLK_TCK`).
fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as f64 } else { 100.0 }
}

/// The core the servers' processes are pinned to.
pub const SERVER_CORE: usize = 1;

/// The PIDs of the processes now in the namespace `ns` (`ip netns pids`).
fn pids(ns: &str) -> Vec<String> {
    let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() else { return Vec::new() };
    String::from_utf8_lossy(&out.stdout).split_whitespace().map(str::to_owned).collect()
}

/// Pin every thread of every process now in `namespaces` to [`SERVER_CORE`] (`taskset -a -p`); threads they start
/// later inherit it.
pub fn pin(namespaces: &[String]) {
    for pid in namespaces.iter().flat_map(|ns| pids(ns)) {
        let out = Command::new("taskset").args(["-a", "-p", "-c", &SERVER_CORE.to_string(), &pid]).output();
        assert!(out.is_ok_and(|o| o.status.success()), "taskset could not pin PID {pid}");
    }
}

/// CPU seconds (user and system, all threads) of every process now in the namespaces named `namespaces`.
pub fn servers(namespaces: &[String]) -> f64 {
    let mut ticks = 0u64;
    for ns in namespaces {
        for pid in pids(ns) {
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
            // After the command name in parentheses: fields 3.. of proc(5); utime and stime are 14 and 15.
            let Some((_, rest)) = stat.rsplit_once(')') else { continue };
            let fields: Vec<&str> = rest.split_whitespace().collect();
            ticks += fields.get(11).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
            ticks += fields.get(12).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
        }
    }
    ticks as f64 / ticks_per_second()
}

/// CPU seconds (user and system) of the calling thread so far.
pub fn this_thread() -> f64 {
    // SAFETY: getrusage fills the struct it is given.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_THREAD, &mut usage);
        usage
    };
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    seconds(usage.ru_utime) + seconds(usage.ru_stime)
}

/// The peak resident memory (`VmHWM`, KiB) of every process now in the namespace `ns`, with its name, largest first.
pub fn peak_rss(ns: &str) -> Vec<(String, u64)> {
    let mut found: Vec<(String, u64)> = pids(ns)
        .iter()
        .filter_map(|pid| {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
            let field = |key: &str| status.lines().find_map(|l| l.strip_prefix(key)).map(str::trim);
            let kib = field("VmHWM:")?.trim_end_matches("kB").trim().parse().ok()?;
            Some((field("Name:")?.to_owned(), kib))
        })
        .collect();
    found.sort_by_key(|(_, kib)| std::cmp::Reverse(*kib));
    found
}
