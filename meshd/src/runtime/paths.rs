//! The paths to this host's peers, watched ([`meshd_core::session::paths::Paths`]): a task that reads
//! the interface every [`READING_INTERVAL`], remembers where peers were seen (for a restart), tells the
//! watch what it read, and carries out what the watch decides: resolve a name, configure a peer afresh
//! (another address, its routes taken away or given back, a new session).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ipnet::IpNet;
use tokio::sync::{mpsc, watch};
use tracing::{debug, warn};

use super::apply::{on_interface, open_tunnels};
use crate::host::clock::wall_now;
use crate::host::resolve::resolve;
use crate::host::statedir::StateDir;
use crate::host::wg::Interface;
use meshd_core::keys::PublicKey;
use meshd_core::plan::PeerPlan;
use meshd_core::reconcile::{PeerEndpoints, endpoints_to_remember};
use meshd_core::session::paths::{Effect, Paths, Reading, Resolved};

/// How often the interface is read: the watch's decisions come at readings, and where peers were seen
/// is saved when it changed, so a host restarted seconds after a peer first reached it still knows
/// where that peer is. Not at shutdown: the embedded device stops on SIGTERM by itself, and a read cut
/// short would save a partial list.
const READING_INTERVAL: Duration = Duration::from_secs(2);

/// Unix seconds at which each peer was last heard from, by public key.
pub(super) type LastHeard = BTreeMap<PublicKey, u64>;

/// The task watching the paths of one interface.
pub(super) struct PathKeeper {
    task: tokio::task::JoinHandle<()>,
    peers: watch::Sender<BTreeMap<PublicKey, PeerPlan>>,
    heard: watch::Receiver<LastHeard>,
}

impl PathKeeper {
    /// Start watching `interface`, whose peers are `peers`, having remembered `saved` (where peers were
    /// seen before a restart), in a mesh of the ranges `mesh`.
    pub(super) fn start(
        state: &StateDir,
        interface: Arc<Mutex<Interface>>,
        saved: PeerEndpoints,
        peers: BTreeMap<PublicKey, PeerPlan>,
        mesh: Vec<IpNet>,
    ) -> PathKeeper {
        let (peers_tx, peers_rx) = watch::channel(peers);
        let (heard_tx, heard) = watch::channel(LastHeard::new());
        let task = tokio::spawn(keep(state.clone(), interface, saved, peers_rx, heard_tx, mesh));
        PathKeeper { task, peers: peers_tx, heard }
    }

    /// The interface's peers are now `peers` (after a change was applied).
    pub(super) fn set_peers(&self, peers: &BTreeMap<PublicKey, PeerPlan>) {
        self.peers.send_replace(peers.clone());
    }

    /// When each peer was last heard from (or last completed a handshake), unix seconds.
    pub(super) fn last_heard(&self) -> LastHeard {
        self.heard.borrow().clone()
    }

    /// Stop, releasing the interface.
    pub(super) async fn finish(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}

async fn keep(
    state: StateDir,
    interface: Arc<Mutex<Interface>>,
    mut saved: PeerEndpoints,
    mut peers_rx: watch::Receiver<BTreeMap<PublicKey, PeerPlan>>,
    heard_tx: watch::Sender<LastHeard>,
    mesh: Vec<IpNet>,
) {
    let mut plans = peers_rx.borrow_and_update().clone();
    let mut paths = Paths::new(mesh);
    paths.set_peers(&plans, Instant::now());
    let (resolved_tx, mut resolved_rx) = mpsc::channel::<(PublicKey, Result<Resolved, String>)>(16);
    let mut tick = tokio::time::interval(READING_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let readings = match on_interface(&interface, Interface::readings).await {
                    Ok(readings) => readings,
                    Err(e) => {
                        debug!(error = format!("{e:#}"), "reading the interface");
                        continue;
                    }
                };
                saved = remember(&state, saved, &readings).await;
                let now = Instant::now();
                paths.handle_readings(&readings, now);
                heard_tx.send_replace(last_heard(&paths, &readings, now));
            }
            changed = peers_rx.changed() => {
                if changed.is_err() {
                    return;
                }
                plans = peers_rx.borrow_and_update().clone();
                paths.set_peers(&plans, Instant::now());
            }
            Some((key, resolved)) = resolved_rx.recv() => paths.handle_resolved(&key, resolved, Instant::now()),
        }
        while let Some(effect) = paths.poll_effect() {
            match effect {
                Effect::Resolve { key, endpoint } => {
                    let tx = resolved_tx.clone();
                    tokio::spawn(async move {
                        let _ = tx.send((key, resolve(&endpoint).await)).await;
                    });
                }
                Effect::Reset { key, endpoint, routes } => {
                    let Some(plan) = plans.get(&key).cloned() else { continue };
                    let peer = plan.clone();
                    let reset = on_interface(&interface, move |i| i.reset_peer(&key, &peer, endpoint, routes)).await;
                    match reset {
                        // Something to send starts the handshake at once rather than at the next keepalive.
                        Ok(()) if routes => open_tunnels([&plan]),
                        Ok(()) => {}
                        Err(e) => warn!(peer = %plan.name, error = format!("{e:#}"), "configuring the peer afresh"),
                    }
                }
            }
        }
    }
}

/// Save where peers were seen if it changed; what is remembered now.
async fn remember(state: &StateDir, saved: PeerEndpoints, readings: &BTreeMap<PublicKey, Reading>) -> PeerEndpoints {
    let now = endpoints_to_remember(&saved, readings);
    if now == saved {
        return saved;
    }
    let (state, write) = (state.clone(), now.clone());
    let written = tokio::task::spawn_blocking(move || {
        let written = state.write_peer_endpoints(&write);
        state.log_save(&state.peer_endpoints(), "where peers were last seen", &written);
        written.is_ok()
    });
    match written.await {
        Ok(true) => now,
        Ok(false) => saved,
        Err(e) => {
            warn!(error = %e, "saving peer endpoints");
            saved
        }
    }
}

/// When each peer was last heard from, unix seconds: the later of what the watch saw and the peer's
/// last handshake.
fn last_heard(paths: &Paths, readings: &BTreeMap<PublicKey, Reading>, now: Instant) -> LastHeard {
    let wall = wall_now().max(0) as u64;
    let mut heard: LastHeard = readings.iter().filter_map(|(k, r)| Some((k.clone(), r.last_handshake?))).collect();
    for (key, at) in paths.heard() {
        let secs = wall.saturating_sub(now.saturating_duration_since(at).as_secs());
        let entry = heard.entry(key.clone()).or_insert(secs);
        *entry = (*entry).max(secs);
    }
    heard
}
