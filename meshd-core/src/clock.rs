//! Time as meshd measures waits that must last a real time (an address's cooldown, an invite's
//! lifetime). The wall clock can jump: a host without a real-time clock boots at a wrong time (1970, or
//! the last time saved to disk) and NTP then steps it by months; an operator sets it by hand. The
//! boot-time clock (`CLOCK_BOOTTIME`) counts real seconds since boot, suspend included, and never jumps;
//! the kernel's boot id says which boot it counts from.
//!
//! A [`Stamp`] takes both at a moment; [`seconds_between`] is the pure rule that turns two stamps into
//! elapsed real time. The core never reads a clock: stamps come in as arguments (the daemon's
//! `host::clock` reads them from the host).

/// A moment, on both clocks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stamp {
    /// Wall-clock time, unix seconds (may be wrong, and may jump).
    pub wall: i64,
    /// The kernel's boot id at the time; empty when unknown (a record from before meshd kept it, or a
    /// host whose boot id could not be read).
    pub boot: String,
    /// Seconds since that boot by the boot-time clock.
    pub uptime: i64,
}

impl Stamp {
    /// A stamp known only by its wall-clock time (stored before boot times were kept).
    pub fn wall_only(wall: i64) -> Stamp {
        Stamp { wall, boot: String::new(), uptime: 0 }
    }
}

/// Real seconds from `then` to `now` (both taken on this host), as well as can be known; never negative.
///
/// - Same boot: by the boot-time clock, so a wall clock stepped forward or back changes nothing.
/// - Across a reboot: the wall-clock difference, but at least `now`'s uptime, since `then` came before
///   this boot. So a wall clock set back (a stamp from the "future") cannot stretch a wait beyond the
///   uptime it needs; a wall clock set forward across a reboot can shorten one, and nothing on the
///   host can tell.
/// - A stamp without a boot id (a record from before meshd kept one): the wall-clock difference alone,
///   as before; which boot it came from is unknown, so the uptime bounds nothing.
pub fn seconds_between(then: &Stamp, now: &Stamp) -> i64 {
    let by_wall = now.wall.saturating_sub(then.wall).max(0);
    if then.boot.is_empty() {
        by_wall
    } else if then.boot == now.boot {
        now.uptime.saturating_sub(then.uptime).max(0)
    } else {
        by_wall.max(now.uptime)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stamp(wall: i64, boot: &str, uptime: i64) -> Stamp {
        Stamp { wall, boot: boot.into(), uptime }
    }

    const YEAR: i64 = 365 * 86_400;

    #[test]
    fn within_a_boot_the_boot_time_clock_decides_whatever_the_wall_clock_does() {
        let then = stamp(1_800_000_000, "b1", 100);
        // Ten real seconds later, the wall clock stepped a year forward: ten seconds.
        assert_eq!(seconds_between(&then, &stamp(1_800_000_000 + YEAR, "b1", 110)), 10);
        // ... or a year back: still ten seconds.
        assert_eq!(seconds_between(&then, &stamp(1_800_000_000 - YEAR, "b1", 110)), 10);
    }

    #[test]
    fn across_a_reboot_the_wall_clock_decides_bounded_below_by_the_uptime() {
        let then = stamp(1_800_000_000, "b1", 5_000);
        // Rebooted, clock right: two hours by the wall clock.
        assert_eq!(seconds_between(&then, &stamp(1_800_007_200, "b2", 60)), 7_200);
        // Rebooted with the clock a year behind (no real-time clock): not a year-long wait; what is
        // known is that this boot has lasted 600 s.
        assert_eq!(seconds_between(&then, &stamp(1_800_000_000 - YEAR, "b2", 600)), 600);
        // A record without a boot id: the wall clock alone (it may come from this very boot, so a long
        // uptime must not free an address released a minute ago).
        assert_eq!(seconds_between(&Stamp::wall_only(1_800_000_000), &stamp(1_800_000_060, "b2", 900_000)), 60);
    }

    /// An invite's expiry as listed: the stored time while the wall clock keeps pace (the clocks ticking
    /// over at different instants do not move it), the real time left after a jump.
    #[test]
    fn an_invites_listed_expiry_is_stable_and_follows_real_time_after_a_jump() {
        use crate::model::{Invite, InviteStatus, Role};
        let made = Stamp { wall: 1_000, boot: "b".into(), uptime: 50 };
        let invite = Invite {
            id: "ab".into(),
            name: "vps".parse().expect("a label"),
            role: Role::Node,
            secret_hash: String::new(),
            created: made,
            expires_at: 1_600,
            status: InviteStatus::Pending,
        };
        // 100.4 s later by the wall clock, 99.6 s by uptime: the truncated readings differ by one.
        for (wall, uptime) in [(1_100, 149), (1_100, 150), (1_101, 150)] {
            assert_eq!(invite.expires_at_by(&Stamp { wall, boot: "b".into(), uptime }), 1_600);
        }
        // The wall clock stepped an hour ahead: 500 s of real time are left, from the clock's now.
        assert_eq!(invite.expires_at_by(&Stamp { wall: 4_700, boot: "b".into(), uptime: 150 }), 5_200);
    }
}
