//! `meshd run`: brings this host's part of the network up and keeps it matching the network's state.
//!
//! - `hub`: the controller's host. Requests enter there (admin socket, joins, members' sessions),
//!   change the network through the controller, and each change is applied here and published.
//! - `member`: a member host, following the hub's live updates.
//! - `apply`: the one executor of host steps; every change to the host goes through it.
//! - `paths`: the watch over the paths to this host's peers (liveness, names, routes around).

mod apply;
mod hub;
mod member;
mod paths;
mod rules;

use std::path::Path;

use anyhow::{Context, anyhow};
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::controller::Controller;
use crate::controller::store::StoreError;
use crate::host::owner::{self, InterfaceLock};
use crate::host::statedir::{StateDir, StateDirError};
use crate::host::wg::Backend;
use apply::{Host, plan_host};
use meshd_core::keys::PrivateKey;
use meshd_core::model::{SYNC_PORT, Snapshot};
use meshd_core::plan::PRIVILEGED_PORT;
use meshd_core::session::member::Member;

/// How `meshd run` runs this host.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Which WireGuard implementation to use.
    pub backend: Backend,
    /// The port the mesh DNS listens on, on the host's mesh addresses: 53 unless another DNS server
    /// holds port 53 on every address and forwards the mesh domain here.
    pub dns_port: u16,
    /// The public ports and the CA, for public names this host serves or terminates TLS for.
    pub public: crate::relay::PublicOptions,
    /// The tor that serves this host's onion services.
    pub tor: crate::host::tor::TorOptions,
}

/// Run the daemon on `state` until SIGINT or SIGTERM: the controller and hub where the network's
/// database is, a member host where `meshd join` left its membership. A member runs from a read-only
/// state directory too (saying once what it cannot save); the controller refuses one.
pub async fn run(state: &StateDir, options: RunOptions) -> anyhow::Result<()> {
    state.check_private()?;
    options.tor.check()?;
    let lock = state.lock_daemon()?;
    let mut signals = Signals::install()?;
    // The hub's sync service trusts source ports below 1024 to be meshd's (links::sync).
    crate::links::sync::warn_if_ports_unprotected();
    if state.db().exists() {
        if lock.read_only() {
            return Err(StateDirError::ReadOnly(state.root().to_path_buf()).into());
        }
        let mut controller = Controller::open(&state.db())?;
        let snapshot = controller.snapshot()?;
        let key = state.read_private_key()?;
        let (_owner, mut host) = start_host(state, options.clone(), &snapshot, &key).await?;
        let result = hub::serve(state, &mut controller, &mut host, &snapshot, &mut signals).await;
        host.shut_down().await;
        result
    } else if state.member_state().exists() {
        if lock.read_only() {
            state.warn_read_only_member();
        }
        let cached = state.read_member_state()?;
        let (key, next) = (state.read_private_key()?, pending_key(state)?);
        // The member's state machine decides which key the interface starts with (a rotation may have
        // been under way).
        let member = Member::new(cached, key, next, std::time::Instant::now());
        let snapshot = member.member_state().state.snapshot();
        let (_owner, mut host) = start_host(state, options.clone(), &snapshot, member.interface_key()).await?;
        info!(node = %host.name, network = %snapshot.network.name, "meshd ready (member)");
        crate::host::systemd::ready();
        let result = member::follow_controller(state, member, &mut host, &mut signals).await;
        host.shut_down().await;
        result
    } else {
        Err(StoreError::NotInitialized(state.root().to_path_buf()).into())
    }
}

/// The key of a rotation that was under way (`private.key.next`), if any. One that is empty, cut or not
/// a key was never offered (it is complete before it is): it is discarded with a warning, and a rotation
/// the network still asks for starts over.
fn pending_key(state: &StateDir) -> Result<Option<PrivateKey>, StateDirError> {
    match state.read_next_private_key() {
        Err(StateDirError::BadKey(path)) => {
            warn!(path = %path.display(), "discarding a damaged pending key; a rotation still asked for starts over");
            if let Err(e) = state.discard_next_private_key() {
                warn!(error = %e, "cannot remove the damaged pending key; it is ignored");
            }
            Ok(None)
        }
        read => read,
    }
}

/// Take the interface (refused while another meshd runs it), then bring this host's part of the
/// network up: access rules, interface, forwarders, DNS. The interface is this daemon's while the lock
/// returned is held.
async fn start_host(
    state: &StateDir,
    options: RunOptions,
    snapshot: &Snapshot,
    key: &PrivateKey,
) -> anyhow::Result<(InterfaceLock, Host)> {
    let me = key.public_key();
    let name = snapshot.nodes.iter().find(|n| n.public_key == me).map(|n| n.name.to_string()).ok_or_else(|| {
        anyhow!(
            "{}: the private key belongs to no node of network {}",
            state.private_key().display(),
            snapshot.network.name
        )
    })?;
    let plan = plan_host(snapshot, &name, options.dns_port)?;
    if options.dns_port == plan.listen_port || options.dns_port == SYNC_PORT || options.dns_port == PRIVILEGED_PORT {
        return Err(anyhow!(
            "--dns-port {}: meshd itself uses that port (WireGuard and joins on {}, live updates on {SYNC_PORT}, its listeners on mesh addresses on {PRIVILEGED_PORT}); choose another, e.g. 5353",
            options.dns_port,
            plan.listen_port
        ));
    }
    let owner = InterfaceLock::take(Path::new(owner::RUN_DIR), &plan.interface, state.root())
        .map_err(|e| anyhow!("{e}; stop that one first"))?;
    let host = Host::new(state, name, plan, key, &options)?.bring_up().await?;
    Ok((owner, host))
}

/// SIGTERM and SIGINT, caught from the start of `meshd run`: one that comes while the host starts up, or just
/// after it told systemd it is ready, shuts it down cleanly once it is up, rather than killing it with its
/// interface and rules in place.
pub(crate) struct Signals {
    term: Signal,
    int: Signal,
}

impl Signals {
    /// Install the handlers. Errors: the runtime cannot register them.
    fn install() -> anyhow::Result<Signals> {
        Ok(Signals {
            term: signal(SignalKind::terminate()).context("installing SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("installing SIGINT handler")?,
        })
    }
}

async fn wait_for_signal(mut stopped: watch::Receiver<bool>, signals: &mut Signals) -> anyhow::Result<()> {
    tokio::select! {
        _ = signals.term.recv() => {}
        _ = signals.int.recv() => {}
        _ = stopped.wait_for(|s| *s) => info!("the WireGuard device stopped"),
    }
    info!("shutting down");
    Ok(())
}
