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
//!
//! A listener open to strangers (the join service) admits with [`Gate::admit_evicting`]: until the
//! connection has shown it is a client of the service (its request), it may be evicted by a newer
//! one, so that a flood at the caps closes its own connections rather than keeping everyone else out.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;
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
    /// A listener open to the internet: IPv6 sources count by /64, as one internet host usually holds a whole
    /// /64, and loopback sources as one, as the host's own processes may write from any of 127.0.0.0/8 (one
    /// local user would otherwise fill the total). Mesh addresses are counted one by one.
    pub internet: bool,
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
    /// The number of the last connection admitted.
    last: u64,
    /// Connections a newer one may evict, oldest first.
    evictable: VecDeque<Evictable>,
    /// Evicted connections whose permits are still held: their places were already given to others.
    evicted: HashSet<u64>,
}

/// A connection that may still be evicted; dropping `close` tells its task to close it.
#[derive(Debug)]
struct Evictable {
    id: u64,
    source: IpAddr,
    close: oneshot::Sender<()>,
}

/// Why a connection was turned away, as counted in a listener's aggregated report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TurnedAway {
    /// Its source, the listener or the process was at its cap.
    OverCaps,
    /// A newer connection took its place before it sent its request.
    Evicted,
    /// It came from a source port that any local user may bind, where the listener needs a privileged one.
    UnprivilegedPort,
}

/// Connections turned away since the last report, by reason.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Tally {
    /// Over the caps.
    refused: u64,
    /// Evicted before their request.
    evicted: u64,
    /// From an unprivileged source port.
    unprivileged_port: u64,
}

#[derive(Debug, Default)]
struct Refused {
    tally: Tally,
    reported: Option<Instant>,
}

/// One admitted connection; dropping it frees its place and its descriptors.
#[derive(Debug)]
pub struct Permit {
    gate: Arc<Gate>,
    source: IpAddr,
    id: u64,
}

/// The eviction of a connection kept evictable ([`Pending::into_parts`]).
#[derive(Debug)]
pub struct Eviction(oneshot::Receiver<()>);

impl Eviction {
    /// Resolves once a newer connection has taken this one's place: the connection is to be closed.
    pub async fn wait(&mut self) {
        let _ = (&mut self.0).await;
    }
}

/// A connection admitted by [`Gate::admit_evicting`] that has not yet shown it is a client of the service:
/// a newer connection may evict it until it [settles](Pending::settle).
#[derive(Debug)]
pub struct Pending {
    permit: Permit,
    evicted: oneshot::Receiver<()>,
}

impl Pending {
    /// Resolves once a newer connection has taken this one's place: the connection is to be closed.
    pub async fn evicted(&mut self) {
        // Never sent: the sender is dropped when the connection is evicted.
        let _ = (&mut self.evicted).await;
    }

    /// The connection stays evictable for its whole life (a listener open to the internet whose connections, once
    /// in, could otherwise be held idle by a few sources until the caps are full): its permit, to be held as long as
    /// anything of the connection lives, and what resolves once it is evicted.
    pub fn into_parts(self) -> (Permit, Eviction) {
        (self.permit, Eviction(self.evicted))
    }

    /// The connection showed it is a client of the service: from now on no newer connection evicts it. None
    /// when it was evicted meanwhile (its place is another's: close it).
    pub fn settle(self) -> Option<Permit> {
        let mut open = lock(&self.permit.gate.open);
        if open.evicted.contains(&self.permit.id) {
            return None;
        }
        open.evictable.retain(|e| e.id != self.permit.id);
        drop(open);
        Some(self.permit)
    }
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
            self.take_place(&mut open, source)
        };
        match admitted {
            Some(id) => Some(Permit { gate: self.clone(), source, id }),
            None => {
                self.turn_away(TurnedAway::OverCaps);
                None
            }
        }
    }

    /// Like [`Gate::admit`], for a listener open to strangers: when `peer`'s source is at its cap, its own
    /// oldest pending connection is evicted; when the listener or the process is, the oldest pending
    /// connection of the source holding the most pending ones is ([`victim`]). Only a listener whose
    /// connections settle soon may use this; settled connections are never evicted, so once they fill the
    /// caps a new one is refused as by [`Gate::admit`].
    pub fn admit_evicting(self: &Arc<Self>, peer: IpAddr) -> Option<Pending> {
        let source = self.source(peer);
        let (admitted, evicted) = {
            let mut open = lock(&self.open);
            let mut evicted = 0;
            let at_cap = open.by_source.get(&source).is_some_and(|&n| n >= self.caps.per_source);
            let own_oldest = at_cap.then(|| open.evictable.iter().position(|e| e.source == source)).flatten();
            if let Some(oldest) = own_oldest {
                self.evict(&mut open, oldest);
                evicted += 1;
            }
            let mut admitted = self.take_place(&mut open, source);
            if admitted.is_none() && open.by_source.get(&source).is_none_or(|&n| n < self.caps.per_source) {
                let sources: Vec<IpAddr> = open.evictable.iter().map(|e| e.source).collect();
                if let Some(at) = victim(&sources) {
                    self.evict(&mut open, at);
                    evicted += 1;
                    admitted = self.take_place(&mut open, source);
                }
            }
            let admitted = admitted.map(|id| {
                let (close, closed) = oneshot::channel();
                open.evictable.push_back(Evictable { id, source, close });
                (id, closed)
            });
            (admitted, evicted)
        };
        for _ in 0..evicted {
            self.turn_away(TurnedAway::Evicted);
        }
        match admitted {
            Some((id, evicted)) => Some(Pending { permit: Permit { gate: self.clone(), source, id }, evicted }),
            None => {
                self.turn_away(TurnedAway::OverCaps);
                None
            }
        }
    }

    /// Count a connection turned away for `why` (closed by the caller), reported in aggregate with the
    /// listener's other refusals.
    pub fn turn_away(&self, why: TurnedAway) {
        if let Some(tally) = self.note_refusal(why, Instant::now()) {
            warn!(
                listener = self.name,
                refused = tally.refused,
                evicted = tally.evicted,
                unprivileged_port = tally.unprivileged_port,
                per_source = self.caps.per_source,
                total = self.caps.total,
                "connections refused: over the connection limits, evicted by newer ones before their \
                 request, or from an unprivileged source port (reported at most once a minute)"
            );
        }
    }

    /// A place for one more connection of `source` within the caps and the budget: its number, or None.
    fn take_place(&self, open: &mut Open, source: IpAddr) -> Option<u64> {
        let of_source = open.by_source.get(&source).copied().unwrap_or(0);
        let fits = of_source < self.caps.per_source && open.total < self.caps.total;
        if !(fits && self.budget.take(self.caps.descriptors)) {
            return None;
        }
        open.total += 1;
        open.by_source.insert(source, of_source + 1);
        open.last += 1;
        Some(open.last)
    }

    /// Evict the pending connection at `at` of the queue: its place and descriptors are free at once (its
    /// task closes it when woken; its permit then gives nothing back a second time).
    fn evict(&self, open: &mut Open, at: usize) {
        let Some(Evictable { id, source, close }) = open.evictable.remove(at) else { return };
        drop(close);
        open.evicted.insert(id);
        self.free_place(open, source);
    }

    fn free_place(&self, open: &mut Open, source: IpAddr) {
        open.total = open.total.saturating_sub(1);
        if let Some(count) = open.by_source.get_mut(&source) {
            *count -= 1;
            if *count == 0 {
                open.by_source.remove(&source);
            }
        }
        self.budget.give_back(self.caps.descriptors);
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        lock(&self.open).total
    }

    /// Count a connection turned away for `why` at `now`; returns the tally to report when a report is due.
    fn note_refusal(&self, why: TurnedAway, now: Instant) -> Option<Tally> {
        let mut refused = lock(&self.refused);
        let count = match why {
            TurnedAway::OverCaps => &mut refused.tally.refused,
            TurnedAway::Evicted => &mut refused.tally.evicted,
            TurnedAway::UnprivilegedPort => &mut refused.tally.unprivileged_port,
        };
        *count += 1;
        let due = refused.reported.is_none_or(|at| now.duration_since(at) >= REPORT_EVERY);
        due.then(|| {
            refused.reported = Some(now);
            std::mem::take(&mut refused.tally)
        })
    }

    /// The key `peer` is counted under.
    /// The source a connection from `peer` counts against: its address; on a listener open to the internet
    /// ([`Caps::internet`]), an IPv6 address as its /64 and any loopback address as one.
    fn source(&self, peer: IpAddr) -> IpAddr {
        match peer.to_canonical() {
            loopback if self.caps.internet && loopback.is_loopback() => IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
            IpAddr::V6(v6) if self.caps.internet => {
                let bits = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(bits.into())
            }
            other => other,
        }
    }

    fn release(&self, source: IpAddr, id: u64) {
        let mut open = lock(&self.open);
        if open.evicted.remove(&id) {
            return;
        }
        if !open.evictable.is_empty() {
            open.evictable.retain(|e| e.id != id);
        }
        self.free_place(&mut open, source);
    }
}

/// Which pending connection to evict for a newcomer, given the sources of the pending ones oldest first:
/// the oldest of the source holding the most of them. A flood from a few sources thus evicts its own
/// connections, and a lone client's connection is taken only once every source holds no more than one.
pub fn victim(pending: &[IpAddr]) -> Option<usize> {
    let mut counts: HashMap<IpAddr, usize> = HashMap::new();
    for source in pending {
        *counts.entry(*source).or_default() += 1;
    }
    let most = counts.values().copied().max()?;
    pending.iter().position(|source| counts.get(source) == Some(&most))
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.gate.release(self.source, self.id);
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
        Caps { per_source, total, descriptors: 1, internet: false }
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
        let gate = Gate::with_budget("joins", Caps { internet: true, ..caps(1, 10) }, Budget::new(100));
        let _first = gate.admit(ip("2001:db8:1:2::1")).expect("first");
        assert!(gate.admit(ip("2001:db8:1:2:ffff::9")).is_none(), "same /64");
        assert!(gate.admit(ip("2001:db8:1:3::1")).is_some(), "another /64");
        let _v4 = gate.admit(ip("192.0.2.7")).expect("IPv4");
        assert!(gate.admit(ip("::ffff:192.0.2.7")).is_none(), "the same host over a dual-stack socket");

        let mesh = Gate::with_budget("forwards", caps(1, 10), Budget::new(100));
        let _phone = mesh.admit(ip("fd00::2")).expect("one mesh address");
        assert!(mesh.admit(ip("fd00::3")).is_some(), "mesh addresses are counted one by one");

        // On the internet-facing listener the host's own processes, from whichever loopback address, are one
        // source (the attack run's local user cycled 1,000 of them).
        let _local = gate.admit(ip("127.0.0.1")).expect("a local process");
        for other in ["127.0.0.2", "127.1.2.3", "::1", "::ffff:127.0.0.9"] {
            assert!(gate.admit(ip(other)).is_none(), "{other} counts as the same local source");
        }
    }

    #[test]
    fn refusals_are_reported_once_per_period_with_their_count() {
        let gate = Gate::with_budget("test", caps(1, 1), Budget::new(100));
        let start = Instant::now();
        let one = Tally { refused: 1, ..Tally::default() };
        assert_eq!(gate.note_refusal(TurnedAway::OverCaps, start), Some(one), "the first refusal is reported at once");
        for i in 1..1000 {
            let why = [TurnedAway::OverCaps, TurnedAway::Evicted, TurnedAway::UnprivilegedPort][i % 3];
            assert_eq!(gate.note_refusal(why, start + Duration::from_millis(i as u64)), None);
        }
        let tally = gate.note_refusal(TurnedAway::OverCaps, start + REPORT_EVERY);
        assert_eq!(tally, Some(Tally { refused: 334, evicted: 333, unprivileged_port: 333 }));
        assert_eq!(gate.note_refusal(TurnedAway::Evicted, start + REPORT_EVERY + Duration::from_secs(1)), None);
    }

    /// Whether the pending connection was told to close.
    fn was_evicted(pending: &mut Pending) -> bool {
        matches!(pending.evicted.try_recv(), Err(oneshot::error::TryRecvError::Closed))
    }

    /// Eight sources flooding at their caps fill the listener; a lone client still gets in, the flood's
    /// own oldest connections make room for it, and the flood cannot push it out.
    #[test]
    fn a_flood_at_the_caps_evicts_its_own_pending_connections_not_a_lone_clients() {
        let gate = Gate::with_budget("joins", caps(4, 32), Budget::new(1000));
        let flooders: Vec<IpAddr> = (1..=8).map(|i| ip(&format!("192.0.2.{i}"))).collect();
        let mut flood: Vec<Pending> = Vec::new();
        for round in 0..4 {
            for source in &flooders {
                flood.push(gate.admit_evicting(*source).unwrap_or_else(|| panic!("round {round}")));
            }
        }
        assert_eq!(gate.open(), 32, "the flood fills the listener");
        assert!(!flood.iter_mut().any(was_evicted));

        let mut client = gate.admit_evicting(ip("198.51.100.7")).expect("a lone client at the total cap gets in");
        assert!(was_evicted(&mut flood[0]), "the oldest of the heaviest source made room");
        assert_eq!(gate.open(), 32);

        // The flood goes on, every source reconnecting many times: it only evicts its own connections.
        for _ in 0..50 {
            for source in &flooders {
                flood.push(gate.admit_evicting(*source).expect("a flooder's new connection"));
            }
            assert!(!was_evicted(&mut client), "the flood evicted the lone client");
            assert_eq!(gate.open(), 32);
        }
        let permit = client.settle().expect("the client settles");
        // Settled connections are never evicted: a source holding its cap of them is refused.
        let settled: Vec<Permit> =
            (0..3).map(|_| gate.admit_evicting(ip("198.51.100.7")).unwrap().settle().unwrap()).collect();
        assert!(gate.admit_evicting(ip("198.51.100.7")).is_none(), "four settled: the source's cap");
        drop(flood);
        drop(settled);
        drop(permit);
        assert_eq!(gate.open(), 0, "every place given back once, evicted or not");
    }

    /// A source at its own cap evicts its own oldest pending connection (a client behind the same NAT as a
    /// flood gets in), never another source's.
    #[test]
    fn a_source_at_its_cap_evicts_its_own_oldest_pending_connection() {
        let gate = Gate::with_budget("joins", caps(2, 10), Budget::new(100));
        let mut other = gate.admit_evicting(ip("192.0.2.9")).unwrap();
        let mut first = gate.admit_evicting(ip("192.0.2.1")).unwrap();
        let mut second = gate.admit_evicting(ip("192.0.2.1")).unwrap();
        let third = gate.admit_evicting(ip("192.0.2.1")).expect("evicts its own oldest");
        assert!(was_evicted(&mut first) && !was_evicted(&mut second) && !was_evicted(&mut other));
        assert!(first.settle().is_none(), "an evicted connection cannot settle into a place it lost");
        let _kept = (second.settle().unwrap(), third.settle().unwrap());
        assert!(gate.admit_evicting(ip("192.0.2.1")).is_none(), "nothing pending of its own to evict");
        assert!(!was_evicted(&mut other));
        assert_eq!(gate.open(), 3);
    }

    /// Over a process budget drained by another listener, a pending connection is evicted for a newcomer;
    /// with none pending, the newcomer is refused.
    #[test]
    fn a_drained_budget_evicts_pending_connections_or_refuses() {
        let budget = Budget::new(3);
        let forwards = Gate::with_budget("forwards", caps(10, 10), budget.clone());
        let joins = Gate::with_budget("joins", caps(10, 10), budget);
        let _held = (forwards.admit(ip("10.0.0.2")).unwrap(), forwards.admit(ip("10.0.0.2")).unwrap());
        let mut pending = joins.admit_evicting(ip("192.0.2.1")).unwrap();
        let newer = joins.admit_evicting(ip("192.0.2.2")).expect("the budget's last descriptor changes hands");
        assert!(was_evicted(&mut pending));
        let _settled = newer.settle().unwrap();
        assert!(joins.admit_evicting(ip("192.0.2.3")).is_none());
    }

    #[test]
    fn the_victim_is_the_oldest_of_the_source_with_the_most_pending() {
        let (a, b, c) = (ip("192.0.2.1"), ip("192.0.2.2"), ip("2001:db8::"));
        assert_eq!(victim(&[]), None);
        assert_eq!(victim(&[a, b, b, c, b]), Some(1));
        assert_eq!(victim(&[c, a, b, a, b]), Some(1), "a tie: the source whose oldest is oldest");
        assert_eq!(victim(&[c, a, b]), Some(0), "one each: the oldest of all");
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
