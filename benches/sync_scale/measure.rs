//! Clocks, memory and limits of the benchmark processes.

use super::*;

pub(crate) fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec, and the clock ids used here exist on Linux.
    let rc = unsafe { libc::clock_gettime(clock, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime({clock})");
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// CLOCK_MONOTONIC, which both processes share.
pub(crate) fn mono_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC)
}

pub(crate) fn ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

/// TCP counters of the network namespace (so of anything else running in it too): listen queue
/// overflows (connections dropped before `accept`) and retransmitted segments.
pub(crate) fn tcp_counters() -> Result<(u64, u64)> {
    Ok((counter("/proc/net/netstat", "TcpExt:", "ListenOverflows")?, counter("/proc/net/snmp", "Tcp:", "RetransSegs")?))
}

/// A counter of a /proc/net file made of (names, values) line pairs starting with `group`.
pub(crate) fn counter(file: &str, group: &str, name: &str) -> Result<u64> {
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
pub(crate) fn memory() -> Result<(u64, u64)> {
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
pub(crate) fn raise_nofile(need: usize) -> Result<()> {
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
