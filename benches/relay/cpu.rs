//! CPU time spent during a run, whoever had the cores: the servers' side (every process in the relay's and the home
//! node's namespaces: meshd with its WireGuard, Caddy, nginx) and the load generator's (wrk, a child of this
//! process). On two shared cores the side that saturates them decides req/s; CPU time per request says what each
//! side costs whatever the other does.

use std::process::Command;

use meshd_e2e::Netns;

/// Clock ticks per second of `/proc/PID/stat` (`getconf CLK_TCK`).
fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as f64 } else { 100.0 }
}

/// CPU seconds (user and system, all threads) of every process now in `namespaces`.
pub fn servers(namespaces: &[&Netns]) -> f64 {
    let mut ticks = 0u64;
    for ns in namespaces {
        let Ok(out) = Command::new("ip").args(["netns", "pids", ns.name()]).output() else { continue };
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
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

/// CPU seconds (user and system) of this process's children that have ended and been waited for.
pub fn children() -> f64 {
    // SAFETY: getrusage fills the struct it is given.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage);
        usage
    };
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    seconds(usage.ru_utime) + seconds(usage.ru_stime)
}
