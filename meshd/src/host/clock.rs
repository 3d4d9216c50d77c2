//! Reading the host's clocks into a [`Stamp`] (the rules that compare stamps are pure, in
//! [`meshd_core::clock`]): `CLOCK_REALTIME`, `CLOCK_BOOTTIME` and the kernel's boot id. This module is the
//! daemon's and the controller's only contact with the host's time, and where the daemon waits for a state
//! machine's timeout.

use std::time::{SystemTime, UNIX_EPOCH};

use meshd_core::clock::Stamp;

/// Where the kernel tells which boot this is (random per boot, `proc(5)`).
const BOOT_ID: &str = "/proc/sys/kernel/random/boot_id";

/// Now, read from the host. A clock that cannot be read gives 0 and an unreadable boot id an empty
/// one, for which [`meshd_core::clock::seconds_between`] then goes by the wall clock alone.
pub fn now() -> Stamp {
    let wall = wall_now();
    let boot = std::fs::read_to_string(BOOT_ID).map(|s| s.trim().to_owned()).unwrap_or_default();
    Stamp { wall, boot, uptime: boot_time_secs() }
}

/// The wall clock now, unix seconds (0 for a clock set before 1970). For records and displays; a wait
/// is measured with [`Stamp`]s.
pub fn wall_now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

fn boot_time_secs() -> i64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime(2) writes one timespec to a valid pointer; CLOCK_BOOTTIME exists on Linux.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    if rc == 0 { ts.tv_sec } else { 0 }
}

/// Wait until `deadline` (a state machine's `poll_timeout`), or forever without one.
pub async fn sleep_until(deadline: Option<std::time::Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use meshd_core::clock::seconds_between;

    use super::*;

    #[test]
    fn the_host_clocks_read_sensibly() {
        let a = now();
        let b = now();
        assert!(a.wall > 1_600_000_000, "{a:?}");
        assert_eq!(a.boot.len(), 36, "a boot id is a UUID: {a:?}");
        assert!(a.uptime > 0 && b.uptime >= a.uptime);
        assert!((0..=1).contains(&seconds_between(&a, &b)));
    }
}
