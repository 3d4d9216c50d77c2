//! `meshd run`: brings this host's part of the network up and keeps it matching the controller's state.
//!
//! Requests enter through the admin socket, change the store through the controller, and every change
//! is followed by one reconcile: new plan, diff against the running one, apply only the difference.

use std::collections::{BTreeMap, HashSet};
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, anyhow};
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, error, info, warn};

use crate::controller::Controller;
use crate::controller::store::StoreError;
use crate::host::dns::{self, DnsError, MeshDns};
use crate::host::firewall;
use crate::host::forward::Forwarders;
use crate::host::statedir::{PeerEndpoints, StateDir};
use crate::host::wg::{Backend, Interface, WgError};
use crate::links::admin::{self, Call};
use crate::links::join::{self, JoinCall};
use crate::links::sync::{self, FromSession, Outgoing, Publisher, SyncEvent};
use meshd_core::keys::PrivateKey;
use meshd_core::model::{DeviceView, SYNC_PORT, Snapshot};
use meshd_core::plan::dns::DNS_PORT;
use meshd_core::plan::nftables;
use meshd_core::plan::{self, HostPlan, PeerPlan};
use meshd_core::wire::admin::{JoinReply, JoinRequest, MemberState, Outcome, Reply, Request};
use meshd_core::wire::sync::{self as wire_sync, ToHub, ToMember};

/// Where upstream resolvers are read from.
const RESOLV_CONF: &str = "/etc/resolv.conf";

/// Everything this host runs for the mesh.
struct Host {
    name: String,
    /// The port the mesh DNS listens on, on this host's mesh addresses.
    dns_port: u16,
    plan: HostPlan,
    interface: Arc<Mutex<Interface>>,
    forwarders: Forwarders,
    dns: Option<MeshDns>,
    /// Fires when the embedded WireGuard device stops by itself (it takes SIGTERM and SIGINT too).
    stopped: watch::Receiver<bool>,
    endpoints: EndpointKeeper,
}

/// How often where peers were last seen is checked and, when it changed, saved: often enough that a
/// host restarted seconds after a peer first reached it still knows where that peer is (one UAPI read
/// of the peers each time). Not at shutdown: the embedded device stops on SIGTERM by itself, and a read
/// cut short would save a partial list.
const ENDPOINTS_SAVE_INTERVAL: Duration = Duration::from_secs(2);

/// Saves where peers were seen to the state directory, so a restarted host renews tunnels to peers
/// behind NAT itself.
struct EndpointKeeper {
    task: tokio::task::JoinHandle<()>,
}

impl EndpointKeeper {
    fn start(state: &StateDir, interface: Arc<Mutex<Interface>>, mut saved: PeerEndpoints) -> EndpointKeeper {
        let state = state.clone();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(ENDPOINTS_SAVE_INTERVAL);
            tick.tick().await;
            loop {
                tick.tick().await;
                let now = match on_interface(&interface, Interface::endpoint_states).await {
                    Ok(states) => endpoints_to_remember(&saved, &states),
                    Err(e) => {
                        debug!(error = format!("{e:#}"), "reading peer endpoints");
                        continue;
                    }
                };
                if now == saved {
                    continue;
                }
                let (state, write) = (state.clone(), now.clone());
                match tokio::task::spawn_blocking(move || state.write_peer_endpoints(&write)).await {
                    Ok(Ok(())) => saved = now,
                    Ok(Err(e)) => warn!(error = %e, "saving peer endpoints"),
                    Err(e) => warn!(error = %e, "saving peer endpoints"),
                }
            }
        });
        EndpointKeeper { task }
    }

    /// Stop, releasing the interface.
    async fn finish(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}

/// What to remember of where the interface's peers are: the endpoint of each peer that completed a
/// handshake (one it really used), else what was remembered before. An endpoint the interface merely
/// holds is never taken as a sighting: it may be configured, remembered, or (as boringtun's multi-peer
/// `set` once did) another peer's. Peers no longer on the interface are forgotten.
fn endpoints_to_remember(
    saved: &PeerEndpoints,
    states: &BTreeMap<String, (Option<SocketAddr>, bool)>,
) -> PeerEndpoints {
    states
        .iter()
        .filter_map(|(key, (endpoint, handshaken))| {
            let seen = endpoint.filter(|_| *handshaken).or_else(|| saved.get(key).copied())?;
            Some((key.clone(), seen))
        })
        .collect()
}

/// How `meshd run` runs this host.
#[derive(Debug, Clone, Copy)]
pub struct RunOptions {
    /// Which WireGuard implementation to use.
    pub backend: Backend,
    /// The port the mesh DNS listens on, on the host's mesh addresses: 53 unless another DNS server
    /// holds port 53 on every address and forwards the mesh domain here.
    pub dns_port: u16,
}

/// Run the daemon on `state` until SIGINT or SIGTERM: the controller and hub where the network's
/// database is, a member host where `meshd join` left its membership.
pub async fn run(state: &StateDir, options: RunOptions) -> anyhow::Result<()> {
    let _lock = state.lock_daemon()?;
    if state.db().exists() {
        let mut controller = Controller::open(&state.db())?;
        let snapshot = controller.snapshot()?;
        let key = state.read_private_key()?;
        let mut host = start_host(state, options, &snapshot, &key).await?;
        let result = serve(state, &mut controller, &mut host, &snapshot).await;
        shut_down(host).await;
        result
    } else if state.member_state().exists() {
        let member = state.read_member_state()?;
        let key = member_key(state, &member)?;
        let snapshot = member.state.snapshot();
        let mut host = start_host(state, options, &snapshot, &key).await?;
        info!(node = %host.name, network = %member.state.network.name, "meshd ready (member)");
        let result = follow_controller(state, member, key, &mut host).await;
        shut_down(host).await;
        result
    } else {
        Err(StoreError::NotInitialized(state.root().to_path_buf()).into())
    }
}

/// The member's key: `private.key`, or the key of an interrupted rotation if the network already
/// knows the member by it.
fn member_key(state: &StateDir, member: &MemberState) -> anyhow::Result<PrivateKey> {
    let known = member.state.nodes.iter().find(|n| n.name == member.me).map(|n| n.public_key.clone());
    let key = state.read_private_key()?;
    match state.read_next_private_key()? {
        Some(next) if Some(next.public_key()) == known => {
            state.promote_next_private_key()?;
            info!("finishing an interrupted key rotation");
            Ok(next)
        }
        Some(_) => {
            state.discard_next_private_key();
            Ok(key)
        }
        None => Ok(key),
    }
}

/// Bring this host's part of the network up: access rules, interface, forwarders, DNS.
async fn start_host(
    state: &StateDir,
    options: RunOptions,
    snapshot: &Snapshot,
    key: &PrivateKey,
) -> anyhow::Result<Host> {
    let me = key.public_key();
    let name = snapshot.nodes.iter().find(|n| n.public_key == me).map(|n| n.name.to_string()).ok_or_else(|| {
        anyhow!(
            "{}: the private key belongs to no node of network {}",
            state.private_key().display(),
            snapshot.network.name
        )
    })?;
    let plan = plan_host(snapshot, &name, options.dns_port)?;
    if options.dns_port == plan.listen_port || options.dns_port == SYNC_PORT {
        return Err(anyhow!(
            "--dns-port {}: meshd itself uses that port (WireGuard and joins on {}, live updates on {SYNC_PORT}); choose another, e.g. 5353",
            options.dns_port,
            plan.listen_port
        ));
    }
    let last_seen = state.read_peer_endpoints();

    // The access rules match the interface by name, so they are in place before it comes up.
    firewall::load(&nftables::render(&plan)).await.map_err(|e| {
        let e = anyhow::Error::new(e);
        if format!("{e:#}").contains("Operation not permitted") {
            e.context("installing access rules needs root (or CAP_NET_ADMIN): run meshd run as root")
        } else {
            e.context("installing access rules")
        }
    })?;
    let created = {
        let (plan, key, last_seen) = (plan.clone(), key.clone(), last_seen.clone());
        tokio::task::spawn_blocking(move || {
            let interface = Interface::create(options.backend, &plan, &key, &last_seen)?;
            if plan.access.routes {
                interface.enable_forwarding()?;
            }
            Ok::<_, crate::host::wg::WgError>(interface)
        })
        .await?
    };
    let interface = match created {
        Ok(interface) => interface,
        Err(e) => {
            let _ = firewall::remove(&plan.interface).await;
            return Err(e.into());
        }
    };
    let stopped = interface.stopped();
    let interface = Arc::new(Mutex::new(interface));
    let endpoints = EndpointKeeper::start(state, interface.clone(), last_seen);
    let mut host = Host {
        name,
        dns_port: options.dns_port,
        plan: plan.clone(),
        stopped,
        interface,
        forwarders: Forwarders::default(),
        dns: None,
        endpoints,
    };
    if let Err(e) = bring_up(&mut host, &plan).await {
        shut_down(host).await;
        return Err(e);
    }
    Ok(host)
}

async fn wait_for_signal(mut stopped: watch::Receiver<bool>) -> anyhow::Result<()> {
    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
        _ = stopped.wait_for(|s| *s) => info!("the WireGuard device stopped"),
    }
    info!("shutting down");
    Ok(())
}

/// Open the admin socket, the join service and the sync service, then answer them until SIGINT or
/// SIGTERM. Every change is applied to this host and published to the members.
async fn serve(
    state: &StateDir,
    controller: &mut Controller,
    host: &mut Host,
    snapshot: &Snapshot,
) -> anyhow::Result<()> {
    // Joining hosts reach the join service on the TCP port of the same number as WireGuard's UDP one.
    let identity = controller.join_identity()?;
    let join_addr = SocketAddr::from((Ipv6Addr::UNSPECIFIED, host.plan.listen_port));
    let join_listener =
        TcpListener::bind(join_addr).await.with_context(|| format!("join service on TCP {join_addr}"))?;
    let (joins_tx, mut joins) = mpsc::channel::<JoinCall<JoinRequest, JoinReply>>(64);
    let mut tasks = vec![tokio::spawn(join::serve(join_listener, identity, joins_tx, |reason| {
        JoinReply::Refused(format!("malformed join request: {reason}"))
    }))];

    let publisher = Publisher::new(snapshot.shared());
    let (sessions_tx, mut sessions) = mpsc::channel::<FromSession>(64);
    for addr in host.plan.sync.iter().flat_map(|s| s.listen.iter()) {
        let listener = crate::host::socket::listen_tcp(*addr).with_context(|| format!("sync service on TCP {addr}"))?;
        tasks.push(tokio::spawn(publisher.clone().serve(listener, sessions_tx.clone())));
    }

    let (calls_tx, mut calls) = mpsc::channel::<Call>(64);
    let listener = admin::bind(&state.socket())?;
    tasks.push(tokio::spawn(admin::serve(listener, calls_tx)));
    info!(node = %host.name, socket = %state.socket().display(), join = %join_addr, "meshd ready");
    // Peers (members and devices alike) still hold sessions with the hub as it was before the restart and
    // would send on them, dropped here, until their own rekey (~15 s). Where they were last seen is
    // known: a handshake from here renews them at once.
    open_known_tunnels(host).await;
    let shutdown = wait_for_signal(host.stopped.clone());
    tokio::pin!(shutdown);
    let result = loop {
        tokio::select! {
            Some((request, reply)) = calls.recv() => {
                let outcome = handle(controller, host, &publisher, request).await;
                let _ = reply.send(outcome);
            }
            Some((request, peer, reply)) = joins.recv() => {
                let _ = reply.send(redeem(controller, host, &publisher, &request, peer).await);
            }
            Some(request) = sessions.recv() => rotate_member_key(controller, host, &publisher, request).await,
            result = &mut shutdown => break result,
        }
    };
    tasks.iter().for_each(tokio::task::JoinHandle::abort);
    let _ = std::fs::remove_file(state.socket());
    result
}

/// A member asked for a new key offers it, then switches to it.
async fn rotate_member_key(controller: &mut Controller, host: &mut Host, publisher: &Publisher, request: FromSession) {
    match request {
        FromSession::Offer(offer) => {
            let verdict = controller.check_node_key(&offer.node, &offer.public_key).map_err(|e| e.to_string());
            let _ = offer.reply.send(verdict);
        }
        FromSession::Switch { node, public_key } => match controller.replace_node_key(&node, &public_key) {
            Ok(()) => {
                info!(%node, "member switched to its new key");
                if let Err(e) = publish_change(controller, host, publisher).await {
                    error!(error = format!("{e:#}"), "applying the new key failed");
                }
            }
            Err(e) => warn!(%node, error = %e, "refused the member's new key"),
        },
    }
}

/// A joining host redeems its invite; the hub takes the new node as a peer before answering.
async fn redeem(
    controller: &mut Controller,
    host: &mut Host,
    publisher: &Publisher,
    request: &JoinRequest,
    peer: SocketAddr,
) -> JoinReply {
    match controller.redeem(request) {
        Ok(member) => {
            info!(node = %member.me, %peer, "host joined");
            if let Err(e) = publish_change(controller, host, publisher).await {
                error!(error = format!("{e:#}"), "applying the join failed");
            }
            JoinReply::Joined(Box::new(member))
        }
        Err(e) => {
            info!(%peer, reason = %e, "join refused");
            JoinReply::Refused(e.to_string())
        }
    }
}

/// After a change: apply the stored network to this host, then push it to the members.
async fn publish_change(controller: &mut Controller, host: &mut Host, publisher: &Publisher) -> anyhow::Result<()> {
    let snapshot = controller.snapshot()?;
    let renewable = reconcile(host, &snapshot).await?;
    // Nodes the hub gained or replaced as peers: open the tunnel from here. One behind NAT that comes
    // back (enabled again) is reached at once from where it was last seen, rather than when one of its
    // own attempts gets through. Devices are left alone.
    let nodes: HashSet<&str> = snapshot.nodes.iter().map(|n| n.public_key.as_str()).collect();
    open_tunnels(renewable.iter().filter(|(key, _)| nodes.contains(key.as_str())).map(|(_, p)| p));
    publisher.publish(snapshot.shared());
    Ok(())
}

/// A member's key rotation, as far as it got.
enum Rotation {
    Idle,
    /// The key was offered to the controller.
    Offered(PrivateKey),
    /// The controller accepted it and the interface uses it; waiting for the network to confirm.
    Switched {
        key: PrivateKey,
        old: PrivateKey,
        since: tokio::time::Instant,
    },
}

/// When a member opens its tunnels: shortly after its controller session starts, or this long after
/// start without one.
const TUNNELS_AFTER_CONNECT: Duration = Duration::from_millis(500);
const TUNNELS_WITHOUT_CONTROLLER: Duration = Duration::from_secs(3);

/// How long a member waits, after switching keys, for the network to confirm before it goes back.
const ROTATION_CONFIRM: Duration = Duration::from_secs(30);

/// A member host: follow the controller's live updates, apply each to this host and cache it, and
/// carry out key rotations the operator asks for. Without a controller the host keeps running on its
/// cached state and reconnects with backoff.
async fn follow_controller(
    state: &StateDir,
    mut member: MemberState,
    key: PrivateKey,
    host: &mut Host,
) -> anyhow::Result<()> {
    let snapshot = member.state.snapshot();
    let hub = snapshot.hub().ok_or_else(|| anyhow!("the cached network has no hub"))?;
    let hub_addr = SocketAddr::new(snapshot.network.pool().v4_of(hub.index).into(), SYNC_PORT);
    let (digest_tx, digest_rx) = watch::channel(wire_sync::digest(&member.state));
    let (events_tx, mut events) = mpsc::channel(64);
    let (outgoing, outgoing_rx) = mpsc::channel(8);
    let client = tokio::spawn(sync::follow(hub_addr, digest_rx, events_tx, outgoing_rx));
    // Open the tunnels once peers have had a moment to learn of this host from the controller (a
    // handshake they drop blocks the next attempt for 5 s), or soon anyway if it does not answer.
    let mut open_tunnels_at = Some(tokio::time::Instant::now() + TUNNELS_WITHOUT_CONTROLLER);

    let mut key = key;
    let mut rotation = Rotation::Idle;
    let shutdown = wait_for_signal(host.stopped.clone());
    tokio::pin!(shutdown);
    let result = loop {
        let confirm_by = match &rotation {
            Rotation::Switched { since, .. } => *since + ROTATION_CONFIRM,
            _ => tokio::time::Instant::now() + Duration::from_secs(3600),
        };
        tokio::select! {
            Some(event) = events.recv() => {
                let message = match event {
                    SyncEvent::Connected => {
                        if open_tunnels_at.is_some() {
                            open_tunnels_at = Some(tokio::time::Instant::now() + TUNNELS_AFTER_CONNECT);
                        }
                        if let Err(e) = offer_key_if_asked(state, &member, &mut rotation, &outgoing).await {
                            warn!(error = format!("{e:#}"), "starting the key rotation");
                        }
                        continue;
                    }
                    SyncEvent::Message(message) => message,
                };
                let updated = match message {
                    ToMember::State { digest, state: shared } => {
                        member.state = shared;
                        Some(digest)
                    }
                    ToMember::Changes { from, to, changes } => {
                        if from != *digest_tx.borrow() {
                            debug!("missed a change; asking for the current state");
                            let _ = outgoing.send(ToHub::Hello { digest: digest_tx.borrow().clone() }.into()).await;
                            None
                        } else {
                            wire_sync::apply(&mut member.state, &changes);
                            Some(to)
                        }
                    }
                    ToMember::KeyAccepted => {
                        if let Rotation::Offered(new) = std::mem::replace(&mut rotation, Rotation::Idle) {
                            // Switch only once the hub has the message: after that, the old key's
                            // tunnel may stop carrying anything.
                            let (delivered, acknowledged) = oneshot::channel();
                            let _ = outgoing.send(Outgoing { message: ToHub::Switch, delivered: Some(delivered) }).await;
                            if acknowledged.await.is_err() {
                                warn!("the controller went away before the key switch reached it; keeping the old key");
                                state.discard_next_private_key();
                                continue;
                            }
                            match switch_key(host, &new).await {
                                Ok(()) => {
                                    info!("switched to the new key; waiting for the network to confirm it");
                                    // Renew every session with the new key now rather than at the next keepalive.
                                    open_known_tunnels(host).await;
                                    rotation = Rotation::Switched { key: new, old: key.clone(), since: tokio::time::Instant::now() };
                                }
                                Err(e) => warn!(error = format!("{e:#}"), "switching to the new key"),
                            }
                        }
                        None
                    }
                    ToMember::Refused { reason } => {
                        warn!(%reason, "the controller refused");
                        if matches!(rotation, Rotation::Offered(_)) {
                            state.discard_next_private_key();
                            rotation = Rotation::Idle;
                        }
                        None
                    }
                };
                let Some(digest) = updated else { continue };
                let _ = digest_tx.send(digest);
                if let Err(e) = state.write_member_state(&member) {
                    warn!(error = %e, "caching the network's state");
                }
                let Some(me) = member.state.nodes.iter().find(|n| n.name == member.me).cloned() else {
                    break Err(anyhow!("this host was removed from network {}", member.state.network.name));
                };
                if let Rotation::Switched { key: new, .. } = &rotation
                    && me.public_key == new.public_key()
                {
                    state.promote_next_private_key().context("saving the new key")?;
                    info!("key rotation done");
                    key = new.clone();
                    rotation = Rotation::Idle;
                }
                match reconcile(host, &member.state.snapshot()).await {
                    // New peers get a tunnel at once; a replaced peer lost its session on this side only
                    // and would keep sending on the old one (dropped here) until its own rekey, ~15 s: a
                    // handshake now renews both.
                    Ok(renewable) => open_tunnels(renewable.iter().map(|(_, p)| p)),
                    Err(e) => error!(error = format!("{e:#}"), "applying the controller's change failed"),
                }
                if let Err(e) = offer_key_if_asked(state, &member, &mut rotation, &outgoing).await {
                    warn!(error = format!("{e:#}"), "starting the key rotation");
                }
            }
            _ = tokio::time::sleep_until(open_tunnels_at.unwrap_or(confirm_by)), if open_tunnels_at.is_some() => {
                open_tunnels_at = None;
                open_known_tunnels(host).await;
            }
            _ = tokio::time::sleep_until(confirm_by) => {
                if let Rotation::Switched { old, .. } = std::mem::replace(&mut rotation, Rotation::Idle) {
                    warn!("the network did not confirm the new key; going back to the old one");
                    state.discard_next_private_key();
                    if let Err(e) = switch_key(host, &old).await {
                        error!(error = format!("{e:#}"), "going back to the old key");
                    }
                }
            }
            result = &mut shutdown => break result,
        }
    };
    client.abort();
    result
}

/// When the network asks this host for a new key (and no rotation is under way), make one, keep it
/// next to the current one, and offer its public half.
async fn offer_key_if_asked(
    state: &StateDir,
    member: &MemberState,
    rotation: &mut Rotation,
    outgoing: &mpsc::Sender<Outgoing>,
) -> anyhow::Result<()> {
    let asked = member.state.nodes.iter().any(|n| n.name == member.me && n.rotate_key);
    if !asked || !matches!(rotation, Rotation::Idle) {
        return Ok(());
    }
    let new = PrivateKey::generate();
    state.write_next_private_key(&new)?;
    info!("the operator asked for a new key: offering one");
    outgoing.send(ToHub::NewKey { public_key: new.public_key() }.into()).await.context("sync client stopped")?;
    *rotation = Rotation::Offered(new);
    Ok(())
}

async fn switch_key(host: &Host, key: &PrivateKey) -> anyhow::Result<()> {
    let key = key.clone();
    on_interface(&host.interface, move |interface| interface.set_private_key(&key)).await
}

/// WireGuard opens a tunnel only when there is something to send, and a host behind NAT can be
/// reached only through a tunnel it opened: send one datagram to each new peer right away rather than
/// waiting for the first keepalive. (It arrives at a closed port and is dropped; the handshake is what
/// counts.)
fn open_tunnels<'a>(peers: impl IntoIterator<Item = &'a PeerPlan>) {
    let targets: Vec<SocketAddr> = peers
        .into_iter()
        .filter_map(|p| p.allowed_ips.iter().find(|n| n.addr().is_ipv4()))
        .map(|net| {
            // The hub's entry is the whole mesh range; its first host is the hub in practice, and any
            // address in the range goes through the hub's tunnel anyway.
            let addr = if net.prefix_len() == 32 { net.addr() } else { net.hosts().next().unwrap_or(net.addr()) };
            SocketAddr::new(addr, TUNNEL_OPENER_PORT)
        })
        .collect();
    if targets.is_empty() {
        return;
    }
    tokio::spawn(async move {
        let Ok(socket) = tokio::net::UdpSocket::bind("0.0.0.0:0").await else { return };
        for target in targets {
            if let Err(e) = socket.send_to(b"meshd", target).await {
                debug!(%target, error = %e, "opening tunnel");
            }
        }
    });
}

/// Open the tunnels to every peer whose endpoint the interface knows (configured, learned, or remembered
/// from before a restart); a peer behind NAT that was never seen is left to open its side itself.
async fn open_known_tunnels(host: &Host) {
    match on_interface(&host.interface, Interface::endpoints).await {
        Ok(known) => open_tunnels(host.plan.peers.iter().filter(|(key, _)| known.contains_key(*key)).map(|(_, p)| p)),
        Err(e) => debug!(error = format!("{e:#}"), "reading peer endpoints"),
    }
}

/// The discard port: nothing listens on it on mesh hosts.
const TUNNEL_OPENER_PORT: u16 = 9;

/// Forwarders and DNS, once the interface and its access rules are up.
async fn bring_up(host: &mut Host, plan: &HostPlan) -> anyhow::Result<()> {
    host.forwarders.apply(&plan.services)?;
    let dns_plan = &plan.dns;
    let own: Vec<IpAddr> = dns_plan.listen.iter().map(|a| a.ip()).collect();
    let upstreams = dns::upstreams_from_resolv_conf(Path::new(RESOLV_CONF), &own);
    if upstreams.is_empty() {
        warn!("no upstream resolvers in {RESOLV_CONF}: the mesh DNS will answer only names of the mesh");
    }
    let started =
        MeshDns::start(&dns_plan.listen, &dns_plan.domain, &dns_plan.reverse, dns_plan.records.clone(), upstreams)
            .await;
    match started {
        Ok(server) => host.dns = Some(server),
        // Devices are told to use the hub's DNS: without it they lose names, so the hub does not run without.
        Err(e) if !dns_plan.clients.is_empty() => return Err(dns_start_error(e, dns_plan)),
        // A member's DNS is a convenience for the host itself; another DNS server on port 53 of every
        // address (dnsmasq, Pi-hole) must not keep the host out of the mesh.
        Err(e) => warn!(
            error = %e,
            "no mesh DNS on this host: mesh names resolve through the hub's DNS only (with another DNS server on port 53, run with --dns-port)"
        ),
    }
    Ok(())
}

/// This host's plan, with the mesh DNS on `dns_port` (a setting of this host, not of the network).
fn plan_host(snapshot: &Snapshot, name: &str, dns_port: u16) -> anyhow::Result<HostPlan> {
    let mut plan = plan::plan_host(snapshot, name)?;
    plan.dns.listen.iter_mut().for_each(|addr| addr.set_port(dns_port));
    Ok(plan)
}

/// Why the hub's mesh DNS did not start, in one line. Port 53 taken on a mesh address almost always
/// means another DNS server listening on every address (dnsmasq, Pi-hole, Unbound): say so, and how
/// the two can run side by side.
fn dns_start_error(e: DnsError, plan: &plan::DnsPlan) -> anyhow::Error {
    match &e {
        DnsError::Bind { addr, source, .. }
            if source.kind() == std::io::ErrorKind::AddrInUse && addr.port() == DNS_PORT =>
        {
            let ip = addr.ip();
            anyhow!(
                "port 53 on the mesh address {ip} is taken, most likely by another DNS server listening on every \
                 address (dnsmasq, Pi-hole, Unbound): run `meshd run --dns-port 5353` and have that server forward \
                 {domain} to {ip} port 5353 (docs/CLI.md, \"Next to another DNS server\")",
                domain = plan.domain
            )
        }
        _ => anyhow::Error::new(e).context("starting mesh DNS"),
    }
}

async fn handle(controller: &mut Controller, host: &mut Host, publisher: &Publisher, request: Request) -> Outcome {
    let is_change = request.is_change();
    let reply = match crate::controller::outcome(controller.handle(request)) {
        Outcome::Ok(reply) => reply,
        refused => return refused,
    };
    if is_change && let Err(e) = publish_change(controller, host, publisher).await {
        error!(error = format!("{e:#}"), "applying the change failed");
        return Outcome::Error(format!("the change was saved but applying it failed: {e:#}"));
    }
    Outcome::Ok(with_handshakes(host, reply).await)
}

/// Make the host match the network in `snapshot`, touching only what changed. Returns the peers added or
/// replaced that this host can open a tunnel to (they have an endpoint), by key.
async fn reconcile(host: &mut Host, snapshot: &Snapshot) -> anyhow::Result<Vec<(String, PeerPlan)>> {
    let new = plan_host(snapshot, &host.name, host.dns_port)?;
    if new == host.plan {
        return Ok(Vec::new());
    }
    let peers = plan::diff_peers(&host.plan.peers, &new.peers);
    let (add, remove) = plan::diff_addresses(&host.plan.addresses, &new.addresses);
    // Addresses are added before peers that route to them; within the peer diff, withdrawn peers go
    // first, so a removed device loses access before anything else happens.
    let reachable = on_interface(&host.interface, move |interface| {
        interface.change_addresses(&add, &[])?;
        interface.apply_peers(&peers)
    })
    .await?;
    let renewable = reachable.into_iter().filter_map(|key| Some((key.clone(), new.peers.get(&key)?.clone()))).collect();
    // The interface has them now: should a later step fail, the next change must not add them again.
    host.plan.peers = new.peers.clone();
    firewall::load(&nftables::render(&new)).await.context("updating access rules")?;
    if new.access.routes && !host.plan.access.routes {
        // This host became the relay (the one before it left or was disabled). Without forwarding it
        // only fails to relay; the rest of the change still applies.
        if let Err(e) = on_interface(&host.interface, Interface::enable_forwarding).await {
            error!(error = format!("{e:#}"), "cannot relay: enabling forwarding failed");
        }
    }
    host.forwarders.apply(&new.services)?;
    if let Some(server) = &host.dns
        && new.dns.records != host.plan.dns.records
    {
        server.update(new.dns.records.clone()).await;
    }
    if !remove.is_empty() {
        on_interface(&host.interface, move |interface| interface.change_addresses(&[], &remove)).await?;
    }
    host.plan = new;
    Ok(renewable)
}

/// Run `f` on the interface, off the async runtime (the WireGuard API blocks).
async fn on_interface<T: Send + 'static>(
    interface: &Arc<Mutex<Interface>>,
    f: impl FnOnce(&Interface) -> Result<T, WgError> + Send + 'static,
) -> anyhow::Result<T> {
    let interface = interface.clone();
    tokio::task::spawn_blocking(move || {
        let interface = interface.lock().map_err(|_| anyhow!("interface lock poisoned"))?;
        Ok(f(&interface)?)
    })
    .await?
}

/// Fill in the last handshake of devices from the live interface.
async fn with_handshakes(host: &Host, reply: Reply) -> Reply {
    let needs = matches!(reply, Reply::Devices(_) | Reply::Status(_));
    if !needs {
        return reply;
    }
    let handshakes = match on_interface(&host.interface, Interface::handshakes).await {
        Ok(h) => h,
        Err(e) => {
            warn!(error = format!("{e:#}"), "could not read handshakes from the interface");
            return reply;
        }
    };
    let fill = |devices: &mut Vec<DeviceView>| {
        for d in devices {
            d.last_handshake = handshakes.get(&d.public_key).copied().flatten();
        }
    };
    match reply {
        Reply::Devices(mut devices) => {
            fill(&mut devices);
            Reply::Devices(devices)
        }
        Reply::Status(mut status) => {
            fill(&mut status.devices);
            Reply::Status(status)
        }
        other => other,
    }
}

async fn shut_down(host: Host) {
    let Host { plan, interface, forwarders, dns, endpoints, .. } = host;
    endpoints.finish().await;
    drop(forwarders);
    if let Some(dns) = dns {
        dns.shutdown().await;
    }
    // Dropping the last handle takes the interface down (off the runtime: it joins device threads);
    // the access rules go only after it.
    let _ = tokio::task::spawn_blocking(move || drop(interface)).await;
    if let Err(e) = firewall::remove(&plan.interface).await {
        warn!(error = %e, "removing access rules");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> Option<SocketAddr> {
        Some(s.parse().unwrap())
    }

    #[test]
    fn only_endpoints_confirmed_by_a_handshake_are_remembered() {
        let saved = PeerEndpoints::from([("natted".to_owned(), at("192.0.2.9:4000").unwrap())]);
        let states = BTreeMap::from([
            // Handshaken: where it really is now.
            ("roamed".to_owned(), (at("198.51.100.2:51820"), true)),
            // Holds another peer's endpoint but never answered from there: not a sighting.
            ("never-ran".to_owned(), (at("198.51.100.2:51820"), false)),
            // Not seen since the restart: what was remembered stays.
            ("natted".to_owned(), (at("198.51.100.2:51820"), false)),
            ("quiet".to_owned(), (None, false)),
        ]);
        let remembered = endpoints_to_remember(&saved, &states);
        assert_eq!(
            remembered,
            PeerEndpoints::from([
                ("roamed".to_owned(), at("198.51.100.2:51820").unwrap()),
                ("natted".to_owned(), at("192.0.2.9:4000").unwrap()),
            ])
        );
    }

    #[test]
    fn peers_gone_from_the_interface_are_forgotten() {
        let saved = PeerEndpoints::from([("gone".to_owned(), at("192.0.2.9:4000").unwrap())]);
        assert!(endpoints_to_remember(&saved, &BTreeMap::new()).is_empty());
    }
}
