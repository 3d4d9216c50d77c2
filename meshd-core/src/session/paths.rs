//! The paths to a host's peers, watched: which peer still answers, where to send to a peer whose
//! endpoint is a DNS name (every address it resolves to, both families, in turn), when to renew a
//! session from this side, and when to route around a silent peer through the hub.
//!
//! WireGuard itself never resolves a name again, never tries a second address, and never lets go of a
//! route to a peer that stopped answering; a responder that refuses a restarted peer's handshakes
//! (their timestamps are older than the last it accepted, as after a clock set back) never starts one
//! itself. So every host runs a [`Paths`]: the daemon reads the interface every few seconds
//! ([`Paths::handle_readings`], with each peer's received bytes and last handshake: every host sends
//! keepalives to every other host every [`crate::model::NODE_KEEPALIVE_SECS`], so a working path
//! receives at least that often) and carries out the [`Effect`]s.
//!
//! A peer heard from within [`SILENT_AFTER`] is alive. One that falls silent (or was never heard from
//! that long after it was set up):
//! - [`PathRole::Fallback`] peers (direct peers and the relay, on a member) lose their routes, so the hub's
//!   peer entry (the whole mesh range) carries their traffic, until they answer again;
//! - its session is renewed from this side ([`Effect::Reset`]: a fresh handshake with this side's
//!   timestamp, and the peer's old timestamps forgotten);
//! - a name endpoint is resolved again;
//!
//! and all of it is retried with backoff ([`RETRY_MIN`] to [`RETRY_MAX`]) while the silence lasts. A name
//! is also resolved again when its records expire (their TTL, at least [`TTL_MIN`], at most
//! [`TTL_MAX`]). A peer not heard from within [`ADDRESS_WAIT`] of being sent to at one of its name's
//! addresses is sent to at the next one, so a name with an AAAA record that leads nowhere (a home router
//! that blocks inbound IPv6) still gets a tunnel over IPv4, and the other way round.
//!
//! Devices are not watched: phones sleep and roam at will, and the hub has no route around them.

use std::collections::{BTreeMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use ipnet::IpNet;
use tracing::{debug, info, warn};

use crate::input::{HostPort, Label};
use crate::keys::PublicKey;
use crate::model::NODE_KEEPALIVE_SECS;
use crate::plan::{PathRole, PeerPlan};

/// How long a watched peer may go unheard before it counts as silent: a keepalive interval and 15 s
/// for a lost keepalive's successor and the time between two readings.
pub const SILENT_AFTER: Duration = Duration::from_secs(NODE_KEEPALIVE_SECS as u64 + 15);

/// How long to wait for an answer at one address of a name before trying the next: two handshake
/// attempts (WireGuard retries every 5 s) and a reading.
pub const ADDRESS_WAIT: Duration = Duration::from_secs(12);

/// The first retry of a silent peer (resolve, renew) comes this long after it fell silent; each
/// following one twice as long after the last, up to [`RETRY_MAX`].
pub const RETRY_MIN: Duration = Duration::from_secs(20);

/// The longest wait between two retries of a silent peer.
pub const RETRY_MAX: Duration = Duration::from_secs(300);

/// A name is not resolved again sooner than this after its last resolution, whatever its TTL.
pub const TTL_MIN: Duration = Duration::from_secs(30);

/// A name is resolved again at least this often, whatever its TTL (a hosts-file entry has none).
pub const TTL_MAX: Duration = Duration::from_secs(3600);

/// Persistent keepalive of a peer routed around, seconds: with no session and no route, its keepalives
/// are the handshake attempts that notice it is back (and the only ones, as nothing is routed to it),
/// so they come often enough to try an address within [`ADDRESS_WAIT`].
pub const PROBE_KEEPALIVE_SECS: u16 = 5;

/// What the interface says of one peer at one reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Reading {
    /// Bytes received from the peer since it was configured (WireGuard's `rx_bytes`); a peer that was
    /// reconfigured starts again from 0.
    pub rx_bytes: u64,
    /// Unix seconds of its last completed handshake, if any.
    pub last_handshake: Option<u64>,
    /// Where the interface sends to it now (configured or learned), if anywhere.
    pub endpoint: Option<SocketAddr>,
}

/// The addresses a name resolved to, and for how long they hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// Every address, both families, with the endpoint's port, in the order to try them.
    pub addrs: Vec<SocketAddr>,
    /// The records' time to live (the shortest of them).
    pub ttl: Duration,
}

/// What the daemon must do for the paths.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Resolve `endpoint` (both families) and report with [`Paths::handle_resolved`].
    Resolve {
        /// The peer.
        key: PublicKey,
        /// Its endpoint, a name.
        endpoint: HostPort,
    },
    /// Configure the peer afresh as its plan says (a new session, started from this side), sending to
    /// `endpoint` (or where the interface sends to it now, if `None`), with its allowed IPs when
    /// `routes`, else with none and a keepalive of [`PROBE_KEEPALIVE_SECS`]: its traffic then goes
    /// through the hub, and its handshakes probe the path.
    Reset {
        /// The peer.
        key: PublicKey,
        /// Where to send to it from now on, if that changes.
        endpoint: Option<SocketAddr>,
        /// Whether its allowed IPs are routed to it.
        routes: bool,
    },
}

/// One watched peer.
#[derive(Debug)]
struct Path {
    name: Label,
    endpoint: Option<HostPort>,
    role: PathRole,
    /// The last reading's counters, to see them grow.
    rx_bytes: Option<u64>,
    last_handshake: Option<u64>,
    /// Where the interface sent to it at the last reading.
    in_use: Option<SocketAddr>,
    /// Where it was last heard from: kept among the addresses to try whatever its name says next (an
    /// answer of the resolver is not authenticated; a handshake is).
    confirmed: Option<SocketAddr>,
    /// When it was last heard from.
    heard: Option<Instant>,
    /// When it was set up, or last sent to at a new address: the start of the wait for an answer.
    since: Instant,
    /// A silence is under way.
    silent: bool,
    /// Its routes are taken away (it is silent and has [`PathRole::Fallback`]).
    withdrawn: bool,
    /// The addresses of its name, from the last resolution.
    addrs: Vec<SocketAddr>,
    /// Addresses tried in a row without an answer.
    tried: usize,
    /// A resolution is under way.
    resolving: bool,
    /// When to resolve its name again.
    resolve_at: Option<Instant>,
    /// When to retry while silent, and the wait before that retry.
    retry_at: Option<Instant>,
    backoff: Duration,
}

impl Path {
    fn new(plan: &PeerPlan, now: Instant) -> Path {
        let name_endpoint = plan.endpoint.as_ref().filter(|e| e.ip().is_none()).is_some();
        Path {
            name: plan.name.clone(),
            endpoint: plan.endpoint.clone(),
            role: plan.path,
            rx_bytes: None,
            last_handshake: None,
            in_use: None,
            confirmed: None,
            heard: None,
            since: now,
            silent: false,
            withdrawn: false,
            addrs: Vec::new(),
            tried: 0,
            resolving: false,
            // A name is resolved at once: the interface took only the first address the system gave.
            resolve_at: name_endpoint.then_some(now),
            retry_at: None,
            backoff: RETRY_MIN,
        }
    }

    /// Whether the plan's changes for this peer concern the watch.
    fn same_watch(&self, plan: &PeerPlan) -> bool {
        self.endpoint == plan.endpoint && self.role == plan.path
    }

    fn is_name(&self) -> bool {
        self.endpoint.as_ref().is_some_and(|e| e.ip().is_none())
    }

    fn alive(&self, now: Instant) -> bool {
        self.heard.is_some_and(|h| now.saturating_duration_since(h) < SILENT_AFTER)
    }

    /// Take in one reading; true if the peer was heard from since the last one.
    fn read(&mut self, reading: &Reading, now: Instant) -> bool {
        let grew = self.rx_bytes.is_some_and(|before| reading.rx_bytes > before);
        let shook = reading.last_handshake.is_some_and(|t| self.last_handshake.is_some_and(|before| t > before));
        // Counters start at zero when the peer is configured: at the first reading, bytes received mean
        // it was heard from since (a handshake from before proves nothing about the path now).
        let first = self.rx_bytes.is_none() && reading.rx_bytes > 0;
        self.rx_bytes = Some(reading.rx_bytes);
        self.last_handshake = reading.last_handshake.or(self.last_handshake);
        self.in_use = reading.endpoint;
        let heard = grew || shook || first;
        if heard {
            self.heard = Some(now);
            self.tried = 0;
            self.confirmed = reading.endpoint.or(self.confirmed);
        }
        heard
    }
}

/// The watch over a host's paths to its peers. See the module documentation.
#[derive(Debug, Default)]
pub struct Paths {
    paths: BTreeMap<PublicKey, Path>,
    /// The mesh's own ranges: no endpoint lies inside them.
    mesh: Vec<IpNet>,
    effects: VecDeque<Effect>,
}

impl Paths {
    /// A watch over no peer yet, in a mesh of the ranges `mesh` (IPv4 and IPv6).
    pub fn new(mesh: Vec<IpNet>) -> Paths {
        Paths { mesh, ..Paths::default() }
    }

    /// The host's peers are now `peers` (its plan's): watch the new ones, forget the gone ones. A peer
    /// whose endpoint or role changed is watched afresh; if it was routed around, it gets its routes
    /// back (the plan's change configured it anew).
    pub fn set_peers(&mut self, peers: &BTreeMap<PublicKey, PeerPlan>, now: Instant) {
        self.paths.retain(|key, _| peers.get(key).is_some_and(|p| p.path != PathRole::Device));
        for (key, plan) in peers.iter().filter(|(_, p)| p.path != PathRole::Device) {
            match self.paths.get(key) {
                Some(path) if path.same_watch(plan) => {}
                Some(path) => {
                    if path.withdrawn {
                        self.effects.push_back(Effect::Reset { key: key.clone(), endpoint: None, routes: true });
                    }
                    self.paths.insert(key.clone(), Path::new(plan, now));
                }
                None => {
                    self.paths.insert(key.clone(), Path::new(plan, now));
                }
            }
        }
    }

    /// A reading of the interface at `now`: every watched peer's counters and endpoint. Decides, for each
    /// peer, what its silence or its answer calls for.
    pub fn handle_readings(&mut self, readings: &BTreeMap<PublicKey, Reading>, now: Instant) {
        for (key, path) in &mut self.paths {
            let Some(reading) = readings.get(key) else { continue };
            let heard = path.read(reading, now);
            let effects = &mut self.effects;
            if heard && path.silent {
                info!(peer = %path.name, "peer answers again");
                path.silent = false;
                path.retry_at = None;
                path.backoff = RETRY_MIN;
                if path.withdrawn {
                    path.withdrawn = false;
                    effects.push_back(Effect::Reset { key: key.clone(), endpoint: None, routes: true });
                }
            }
            let waited = now.saturating_duration_since(path.heard.map_or(path.since, |h| h.max(path.since)));
            if !path.silent && !path.alive(now) && waited >= SILENT_AFTER {
                path.silent = true;
                let routed_around = path.role == PathRole::Fallback;
                warn!(
                    peer = %path.name,
                    silent_secs = waited.as_secs(),
                    endpoint = ?path.in_use,
                    "peer does not answer: renewing the session{}",
                    if routed_around { ", routing through the hub meanwhile" } else { "" }
                );
                path.withdrawn = routed_around;
                Self::retry(key, path, effects, now);
            } else if path.silent && path.retry_at.is_some_and(|at| at <= now) {
                Self::retry(key, path, effects, now);
            }
            Self::next_address(key, path, effects, now);
            if path.resolve_at.is_some_and(|at| at <= now) && !path.resolving {
                Self::resolve(key, path, effects);
            }
        }
    }

    /// The addresses `endpoint` of `key` resolved to at `now` (or why not). Addresses no peer can be
    /// at (loopback, unspecified, multicast, link-local, inside the mesh) are dropped; where the peer was
    /// last heard from is kept, last. If the peer is not heard from where the interface sends to it now
    /// and that is none of them, it is sent to the first.
    pub fn handle_resolved(&mut self, key: &PublicKey, resolved: Result<Resolved, String>, now: Instant) {
        let Some(path) = self.paths.get_mut(key) else { return };
        path.resolving = false;
        let mesh = &self.mesh;
        let resolved = resolved.map(|mut r| {
            r.addrs.retain(|a| usable(a, mesh));
            r
        });
        match resolved {
            Ok(resolved) if !resolved.addrs.is_empty() => {
                path.resolve_at = Some(now + resolved.ttl.clamp(TTL_MIN, TTL_MAX));
                debug!(peer = %path.name, addrs = ?resolved.addrs, ttl = resolved.ttl.as_secs(), "endpoint resolved");
                let moved = path.in_use.is_none_or(|a| !resolved.addrs.contains(&a));
                path.addrs = resolved.addrs;
                if let Some(confirmed) = path.confirmed.filter(|c| !path.addrs.contains(c)) {
                    path.addrs.push(confirmed);
                }
                if moved && !path.alive(now) {
                    let to = path.addrs[0];
                    info!(peer = %path.name, from = ?path.in_use, %to, "endpoint name points elsewhere now");
                    Self::send_to(key, path, &mut self.effects, to, now);
                }
            }
            Ok(_) => {
                warn!(peer = %path.name, "endpoint name has no address");
                path.resolve_at = Some(now + RETRY_MIN);
            }
            Err(e) => {
                warn!(peer = %path.name, error = %e, "resolving the endpoint failed");
                path.resolve_at = Some(now + RETRY_MIN);
            }
        }
    }

    /// The next effect to carry out, if any.
    pub fn poll_effect(&mut self) -> Option<Effect> {
        self.effects.pop_front()
    }

    /// When each watched peer was last heard from, as far as this watch saw.
    pub fn heard(&self) -> impl Iterator<Item = (&PublicKey, Instant)> {
        self.paths.iter().filter_map(|(key, path)| Some((key, path.heard?)))
    }

    /// A silent peer's retry: renew its session (keeping its routes away if they are) at the next
    /// address of its name if it has several (then try the others in turn again), resolve its name
    /// again, and schedule the next retry.
    fn retry(key: &PublicKey, path: &mut Path, effects: &mut VecDeque<Effect>, now: Instant) {
        path.tried = 0;
        match next_of(path) {
            Some(next) if path.addrs.len() > 1 => Self::send_to(key, path, effects, next, now),
            _ => effects.push_back(Effect::Reset { key: key.clone(), endpoint: None, routes: !path.withdrawn }),
        }
        if path.is_name() && !path.resolving {
            Self::resolve(key, path, effects);
        }
        path.retry_at = Some(now + path.backoff);
        path.backoff = (path.backoff * 2).min(RETRY_MAX);
    }

    fn resolve(key: &PublicKey, path: &mut Path, effects: &mut VecDeque<Effect>) {
        let Some(endpoint) = path.endpoint.clone().filter(|e| e.ip().is_none()) else { return };
        path.resolving = true;
        path.resolve_at = None;
        effects.push_back(Effect::Resolve { key: key.clone(), endpoint });
    }

    /// A peer of a name with several addresses, not heard from at the one in use for [`ADDRESS_WAIT`]:
    /// the next address, once round them all (then at each retry).
    fn next_address(key: &PublicKey, path: &mut Path, effects: &mut VecDeque<Effect>, now: Instant) {
        let waited = now.saturating_duration_since(path.since) >= ADDRESS_WAIT;
        if path.addrs.len() < 2 || path.alive(now) || !waited || path.tried + 1 >= path.addrs.len() {
            return;
        }
        if path.heard.is_some_and(|h| h >= path.since) {
            // It answered here and went quiet since: the silence handling, not another address.
            return;
        }
        let Some(next) = next_of(path) else { return };
        info!(peer = %path.name, from = ?path.in_use, to = %next, "no answer at this address: trying the next one");
        path.tried += 1;
        Self::send_to(key, path, effects, next, now);
    }

    fn send_to(key: &PublicKey, path: &mut Path, effects: &mut VecDeque<Effect>, to: SocketAddr, now: Instant) {
        effects.push_back(Effect::Reset { key: key.clone(), endpoint: Some(to), routes: !path.withdrawn });
        path.in_use = Some(to);
        path.since = now;
    }
}

/// Whether a resolver's answer `addr` can be where a peer is: not an address that is no host's
/// (unspecified, multicast, broadcast), this host itself (loopback), unrouted (link-local), nor inside the
/// mesh, which is reached through the tunnels themselves.
fn usable(addr: &SocketAddr, mesh: &[IpNet]) -> bool {
    let ip = match addr.ip() {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    };
    let unusable = match ip {
        IpAddr::V4(v4) => v4.is_link_local() || v4.is_broadcast() || v4.octets()[0] == 0,
        IpAddr::V6(v6) => v6.is_unicast_link_local(),
    };
    !(unusable || ip.is_loopback() || ip.is_unspecified() || ip.is_multicast() || mesh.iter().any(|n| n.contains(&ip)))
}

/// The address of the peer's name after the one in use (the first if none is).
fn next_of(path: &Path) -> Option<SocketAddr> {
    match path.in_use.and_then(|a| path.addrs.iter().position(|x| *x == a)) {
        Some(i) => path.addrs.get((i + 1) % path.addrs.len()).copied(),
        None => path.addrs.first().copied(),
    }
}

#[cfg(test)]
mod tests;
