//! Admission of connections from peers meshd does not trust (devices through the forwarders, anyone on
//! the join port, members on the sync port), so that no flood takes the file descriptors that the admin
//! socket and the work of a revocation (the database, `nft`, the interface's control socket, the sync
//! push to members) need.
//!
//! At start the daemon raises its soft open-file limit to the hard one ([`raise_open_file_limit`]).
//! Of that limit a [`RESERVE`] (at least [`RESERVE_MIN`] descriptors, or a quarter of the limit) is kept
//! for meshd's own work; the rest is one process-wide [`Budget`] that every listener of untrusted
//! connections draws from. Each listener has a [`Gate`] with its own caps (connections per source,
//! connections in total); a connection holds a [`Permit`] for as long as it lives, and dropping the
//! permit gives its descriptors back. A connection over a cap is closed at once, and refusals are
//! reported as one aggregated warning per [`REPORT_EVERY`] per listener, never one line each.

use std::collections::HashMap;
use std::io;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tracing::{debug, warn};

/// Descriptors always kept out of the budget for untrusted connections, whatever the limit.
pub const RESERVE_MIN: usize = 256;
/// The share of the open-file limit kept out of the budget when that is more than [`RESERVE_MIN`]: the
/// limit divided by this.
pub const RESERVE: usize = 4;
/// Refusals of one listener are reported at most once per this period, with their count.
pub const REPORT_EVERY: Duration = Duration::from_secs(60);
/// The budget used when the limit is unlimited or unreadable: more than any listener needs here.
const BUDGET_CEILING: usize = 1 << 20;

/// Raise the soft `RLIMIT_NOFILE` to the hard limit, as a service started with systemd's soft limit of
/// 1024 needs; returns the soft limit before and after.
pub fn raise_open_file_limit() -> io::Result<(u64, u64)> {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes the struct we own; no other precondition.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let before = limit.rlim_cur;
    if limit.rlim_cur < limit.rlim_max {
        limit.rlim_cur = limit.rlim_max;
        // SAFETY: setrlimit reads the struct we own; raising the soft limit up to the hard one is allowed.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok((before, limit.rlim_cur))
}

/// The current soft open-file limit, if it can be read and is finite.
fn open_file_limit() -> Option<usize> {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes the struct we own; no other precondition.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 || limit.rlim_cur == libc::RLIM_INFINITY {
        return None;
    }
    usize::try_from(limit.rlim_cur).ok()
}

/// Descriptors for untrusted connections out of an open-file limit of `limit`: the limit less the reserve.
pub fn budget_for(limit: usize) -> usize {
    limit.saturating_sub((limit / RESERVE).max(RESERVE_MIN))
}

/// Descriptors that untrusted connections may hold at once, shared by every [`Gate`] that draws on it.
#[derive(Debug)]
pub struct Budget {
    limit: usize,
    used: AtomicUsize,
}

impl Budget {
    /// A budget of `limit` descriptors.
    pub fn new(limit: usize) -> Arc<Budget> {
        Arc::new(Budget { limit, used: AtomicUsize::new(0) })
    }

    /// The process's budget, sized from the open-file limit when first used (after the daemon raised it).
    pub fn process() -> Arc<Budget> {
        static PROCESS: LazyLock<Arc<Budget>> = LazyLock::new(|| {
            let limit = open_file_limit();
            let budget = limit.map_or(BUDGET_CEILING, |l| budget_for(l).min(BUDGET_CEILING));
            debug!(open_file_limit = ?limit, budget, "descriptors for untrusted connections");
            Budget::new(budget)
        });
        PROCESS.clone()
    }

    /// Take `n` descriptors if that stays within the budget.
    fn take(&self, n: usize) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(n).filter(|&after| after <= self.limit)
            })
            .is_ok()
    }

    fn give_back(&self, n: usize) {
        self.used.fetch_sub(n, Ordering::AcqRel);
    }
}

/// The caps of one listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caps {
    /// Most connections of one source at a time.
    pub per_source: usize,
    /// Most connections at a time over all sources.
    pub total: usize,
    /// Descriptors one connection holds (2 for a forwarded connection: the client's and the target's).
    pub descriptors: usize,
    /// Count IPv6 sources by /64, as one internet host usually holds a whole /64; for listeners open to
    /// the internet. Mesh addresses are counted one by one.
    pub ipv6_by_64: bool,
}

/// Admission to one listener: its caps, its open connections by source, and its refusals not yet reported.
#[derive(Debug)]
pub struct Gate {
    name: &'static str,
    caps: Caps,
    budget: Arc<Budget>,
    open: Mutex<Open>,
    refused: Mutex<Refused>,
}

#[derive(Debug, Default)]
struct Open {
    total: usize,
    by_source: HashMap<IpAddr, usize>,
}

#[derive(Debug, Default)]
struct Refused {
    count: u64,
    reported: Option<Instant>,
}

/// One admitted connection; dropping it frees its place and its descriptors.
#[derive(Debug)]
pub struct Permit {
    gate: Arc<Gate>,
    source: IpAddr,
}

impl Gate {
    /// A gate named `name` (as its refusals are reported) drawing on the process's [`Budget`].
    pub fn new(name: &'static str, caps: Caps) -> Arc<Gate> {
        Gate::with_budget(name, caps, Budget::process())
    }

    /// A gate drawing on `budget`.
    pub fn with_budget(name: &'static str, caps: Caps, budget: Arc<Budget>) -> Arc<Gate> {
        Arc::new(Gate { name, caps, budget, open: Mutex::default(), refused: Mutex::default() })
    }

    /// A permit for a connection from `peer`, or none (the refusal counted and reported in aggregate)
    /// when the source, this listener or the process is at its cap.
    pub fn admit(self: &Arc<Self>, peer: IpAddr) -> Option<Permit> {
        let source = self.source(peer);
        let admitted = {
            let mut open = lock(&self.open);
            let of_source = open.by_source.get(&source).copied().unwrap_or(0);
            let fits = of_source < self.caps.per_source && open.total < self.caps.total;
            if fits && self.budget.take(self.caps.descriptors) {
                open.total += 1;
                open.by_source.insert(source, of_source + 1);
                true
            } else {
                false
            }
        };
        if admitted {
            return Some(Permit { gate: self.clone(), source });
        }
        if let Some(count) = self.note_refusal(Instant::now()) {
            warn!(
                listener = self.name,
                refused = count,
                per_source = self.caps.per_source,
                total = self.caps.total,
                "connections refused: over the connection limits (reported at most once a minute)"
            );
        }
        None
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        lock(&self.open).total
    }

    /// Count a refusal at `now`; returns the count to report when a report is due.
    fn note_refusal(&self, now: Instant) -> Option<u64> {
        let mut refused = lock(&self.refused);
        refused.count += 1;
        let due = refused.reported.is_none_or(|at| now.duration_since(at) >= REPORT_EVERY);
        due.then(|| {
            refused.reported = Some(now);
            std::mem::take(&mut refused.count)
        })
    }

    /// The key `peer` is counted under.
    fn source(&self, peer: IpAddr) -> IpAddr {
        match peer.to_canonical() {
            IpAddr::V6(v6) if self.caps.ipv6_by_64 => {
                let bits = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(bits.into())
            }
            other => other,
        }
    }

    fn release(&self, source: IpAddr) {
        let mut open = lock(&self.open);
        open.total = open.total.saturating_sub(1);
        if let Some(count) = open.by_source.get_mut(&source) {
            *count -= 1;
            if *count == 0 {
                open.by_source.remove(&source);
            }
        }
        self.budget.give_back(self.caps.descriptors);
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.gate.release(self.source);
    }
}

/// A lock that a panicked holder cannot poison for everyone else (the counts stay consistent: every
/// update is one step).
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("address")
    }

    fn caps(per_source: usize, total: usize) -> Caps {
        Caps { per_source, total, descriptors: 1, ipv6_by_64: false }
    }

    #[test]
    fn per_source_and_total_caps_hold_and_permits_give_their_place_back() {
        let gate = Gate::with_budget("test", caps(2, 3), Budget::new(100));
        let a1 = gate.admit(ip("10.0.0.1")).expect("first of a");
        let _a2 = gate.admit(ip("10.0.0.1")).expect("second of a");
        assert!(gate.admit(ip("10.0.0.1")).is_none(), "a third from one source is over its cap");
        let _b1 = gate.admit(ip("10.0.0.2")).expect("another source");
        assert!(gate.admit(ip("10.0.0.3")).is_none(), "the total is reached");
        assert_eq!(gate.open(), 3);
        drop(a1);
        assert_eq!(gate.open(), 2);
        assert!(gate.admit(ip("10.0.0.1")).is_some(), "a freed place is usable again");
    }

    #[test]
    fn gates_share_one_budget_of_descriptors() {
        let budget = Budget::new(5);
        let forwards = Gate::with_budget("forwards", Caps { descriptors: 2, ..caps(10, 10) }, budget.clone());
        let joins = Gate::with_budget("joins", caps(10, 10), budget);
        let held: Vec<Permit> = (0..2).filter_map(|_| forwards.admit(ip("10.0.0.1"))).collect();
        assert_eq!(held.len(), 2, "four descriptors of five");
        assert!(forwards.admit(ip("10.0.0.2")).is_none(), "two more would exceed the budget");
        let join = joins.admit(ip("192.0.2.1")).expect("the last descriptor");
        assert!(joins.admit(ip("192.0.2.2")).is_none());
        drop(held);
        drop(join);
        assert!(forwards.admit(ip("10.0.0.2")).is_some(), "all given back");
    }

    #[test]
    fn an_ipv6_internet_host_counts_as_its_64_and_mapped_ipv4_as_ipv4() {
        let gate = Gate::with_budget("joins", Caps { ipv6_by_64: true, ..caps(1, 10) }, Budget::new(100));
        let _first = gate.admit(ip("2001:db8:1:2::1")).expect("first");
        assert!(gate.admit(ip("2001:db8:1:2:ffff::9")).is_none(), "same /64");
        assert!(gate.admit(ip("2001:db8:1:3::1")).is_some(), "another /64");
        let _v4 = gate.admit(ip("192.0.2.7")).expect("IPv4");
        assert!(gate.admit(ip("::ffff:192.0.2.7")).is_none(), "the same host over a dual-stack socket");

        let mesh = Gate::with_budget("forwards", caps(1, 10), Budget::new(100));
        let _phone = mesh.admit(ip("fd00::2")).expect("one mesh address");
        assert!(mesh.admit(ip("fd00::3")).is_some(), "mesh addresses are counted one by one");
    }

    #[test]
    fn refusals_are_reported_once_per_period_with_their_count() {
        let gate = Gate::with_budget("test", caps(1, 1), Budget::new(100));
        let start = Instant::now();
        assert_eq!(gate.note_refusal(start), Some(1), "the first refusal is reported at once");
        for i in 1..1000 {
            assert_eq!(gate.note_refusal(start + Duration::from_millis(i)), None);
        }
        assert_eq!(gate.note_refusal(start + REPORT_EVERY), Some(1000));
        assert_eq!(gate.note_refusal(start + REPORT_EVERY + Duration::from_secs(1)), None);
    }

    #[test]
    fn the_reserve_is_a_quarter_of_the_limit_and_at_least_256() {
        assert_eq!(budget_for(1024), 768);
        assert_eq!(budget_for(524_288), 393_216);
        assert_eq!(budget_for(200), 0);
    }

    #[test]
    fn the_soft_limit_is_raised_to_the_hard_one() {
        let (_, now) = raise_open_file_limit().expect("raise");
        let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: as in raise_open_file_limit.
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) }, 0);
        assert_eq!(now, limit.rlim_max);
        assert_eq!(limit.rlim_cur, limit.rlim_max);
    }
}
