//! `meshd run`: brings this host's part of the network up and keeps it matching the controller's state.
//!
//! Requests enter through the admin socket, change the store through the controller, and every change
//! is followed by one reconcile: new plan, diff against the running one, apply only the difference.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, anyhow};
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{mpsc, watch};
use tracing::{debug, error, info, warn};

use crate::admin::{self, Call};
use crate::api::{JoinReply, JoinRequest, Outcome, Reply, Request};
use crate::controller::Controller;
use crate::desired::{self, HostPlan};
use crate::dns::{self, MeshDns};
use crate::firewall;
use crate::forward::Forwarders;
use crate::join::{self, JoinCall};
use crate::model::{DeviceView, Snapshot};
use crate::statedir::StateDir;
use crate::store::StoreError;
use crate::wg::{Backend, Interface};

/// Where upstream resolvers are read from.
const RESOLV_CONF: &str = "/etc/resolv.conf";

/// Everything this host runs for the mesh.
struct Host {
    name: String,
    plan: HostPlan,
    interface: Arc<Mutex<Interface>>,
    forwarders: Forwarders,
    dns: Option<MeshDns>,
    /// Fires when the embedded WireGuard device stops by itself (it takes SIGTERM and SIGINT too).
    stopped: watch::Receiver<bool>,
}

/// Run the daemon on `state` until SIGINT or SIGTERM: the controller and hub where the network's
/// database is, a member host where `meshd join` left its membership.
pub async fn run(state: &StateDir, backend: Backend) -> anyhow::Result<()> {
    let _lock = state.lock_daemon()?;
    if state.db().exists() {
        let mut controller = Controller::open(&state.db())?;
        let snapshot = controller.snapshot()?;
        let mut host = start_host(state, backend, &snapshot).await?;
        let result = serve(state, &mut controller, &mut host).await;
        shut_down(host).await;
        result
    } else if state.member_state().exists() {
        let member = state.read_member_state()?;
        let snapshot = member.state.snapshot();
        let host = start_host(state, backend, &snapshot).await?;
        info!(node = %host.name, network = %member.state.network.name, "meshd ready (member)");
        let opener = snapshot.hub().map(|hub| {
            let dns = SocketAddr::new(snapshot.network.pool().v4_of(hub.index).into(), dns::DNS_PORT);
            tokio::spawn(open_tunnel_to_hub(dns, snapshot.network.fqdn(&hub.name)))
        });
        let result = wait_for_signal(host.stopped.clone()).await;
        opener.inspect(tokio::task::JoinHandle::abort);
        shut_down(host).await;
        result
    } else {
        Err(StoreError::NotInitialized(state.root().to_path_buf()).into())
    }
}

/// Bring this host's part of the network up: access rules, interface, forwarders, DNS.
async fn start_host(state: &StateDir, backend: Backend, snapshot: &Snapshot) -> anyhow::Result<Host> {
    let key = state.read_private_key()?;
    let me = key.public_key();
    let name = snapshot.nodes.iter().find(|n| n.public_key == me).map(|n| n.name.to_string()).ok_or_else(|| {
        anyhow!(
            "{}: the private key belongs to no node of network {}",
            state.private_key().display(),
            snapshot.network.name
        )
    })?;
    let plan = desired::plan_host(snapshot, &name)?;

    // The access rules match the interface by name, so they are in place before it comes up.
    firewall::load(&firewall::render(&plan)).await.context("installing access rules")?;
    let created = {
        let plan = plan.clone();
        tokio::task::spawn_blocking(move || {
            let interface = Interface::create(backend, &plan, &key)?;
            if plan.access.routes {
                interface.enable_forwarding()?;
            }
            Ok::<_, crate::wg::WgError>(interface)
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
    let mut host = Host {
        name,
        plan: plan.clone(),
        stopped: interface.stopped(),
        interface: Arc::new(Mutex::new(interface)),
        forwarders: Forwarders::default(),
        dns: None,
    };
    if let Err(e) = bring_up(&mut host, &plan).await {
        shut_down(host).await;
        return Err(e);
    }
    Ok(host)
}

/// A member behind NAT can be reached only once its tunnel to the hub is up, and WireGuard opens a
/// tunnel only when there is something to send: ask the hub's DNS for the hub's name until it answers,
/// rather than waiting for the first keepalive.
async fn open_tunnel_to_hub(dns: SocketAddr, hub_name: String) {
    let mut pause = Duration::from_millis(250);
    loop {
        match dns::probe(dns, &hub_name, Duration::from_secs(2)).await {
            Ok(_) => return info!(%dns, "tunnel to the hub is open"),
            Err(e) => debug!(%dns, error = %e, "hub not answering yet"),
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(10));
    }
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

/// Open the admin socket and the join service, then answer both until SIGINT or SIGTERM.
async fn serve(state: &StateDir, controller: &mut Controller, host: &mut Host) -> anyhow::Result<()> {
    // Joining hosts reach the join service on the TCP port of the same number as WireGuard's UDP one.
    let identity = controller.join_identity()?;
    let join_addr = SocketAddr::from((Ipv6Addr::UNSPECIFIED, host.plan.listen_port));
    let join_listener =
        TcpListener::bind(join_addr).await.with_context(|| format!("join service on TCP {join_addr}"))?;
    let (joins_tx, mut joins) = mpsc::channel::<JoinCall<JoinRequest, JoinReply>>(64);
    let join_server = tokio::spawn(join::serve(join_listener, identity, joins_tx, |reason| {
        JoinReply::Refused(format!("malformed join request: {reason}"))
    }));

    let (calls_tx, mut calls) = mpsc::channel::<Call>(64);
    let listener = admin::bind(&state.socket())?;
    let server = tokio::spawn(admin::serve(listener, calls_tx));
    info!(node = %host.name, socket = %state.socket().display(), join = %join_addr, "meshd ready");
    let shutdown = wait_for_signal(host.stopped.clone());
    tokio::pin!(shutdown);
    let result = loop {
        tokio::select! {
            Some((request, reply)) = calls.recv() => {
                let outcome = handle(controller, host, request).await;
                let _ = reply.send(outcome);
            }
            Some((request, peer, reply)) = joins.recv() => {
                let _ = reply.send(redeem(controller, host, &request, peer).await);
            }
            result = &mut shutdown => break result,
        }
    };
    server.abort();
    join_server.abort();
    let _ = std::fs::remove_file(state.socket());
    result
}

/// A joining host redeems its invite; the hub takes the new node as a peer before answering.
async fn redeem(controller: &mut Controller, host: &mut Host, request: &JoinRequest, peer: SocketAddr) -> JoinReply {
    match controller.redeem(request) {
        Ok(member) => {
            info!(node = %member.me, %peer, "host joined");
            if let Err(e) = reconcile(controller, host).await {
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

/// Forwarders and DNS, once the interface and its access rules are up.
async fn bring_up(host: &mut Host, plan: &HostPlan) -> anyhow::Result<()> {
    host.forwarders.apply(&plan.services)?;
    if let Some(dns_plan) = &plan.dns {
        let own: Vec<IpAddr> = dns_plan.listen.iter().map(|a| a.ip()).collect();
        let upstreams = dns::upstreams_from_resolv_conf(Path::new(RESOLV_CONF), &own);
        if upstreams.is_empty() {
            warn!("no upstream resolvers in {RESOLV_CONF}: names outside the mesh will not resolve for devices");
        }
        let server = MeshDns::start(&dns_plan.listen, &dns_plan.domain, dns_plan.records.clone(), upstreams)
            .await
            .context("starting mesh DNS")?;
        host.dns = Some(server);
    }
    Ok(())
}

async fn handle(controller: &mut Controller, host: &mut Host, request: Request) -> Outcome {
    let is_change = request.is_change();
    let reply = match controller.handle(request) {
        Ok(reply) => reply,
        Err(e) => return Outcome::Error(e.to_string()),
    };
    if is_change && let Err(e) = reconcile(controller, host).await {
        error!(error = format!("{e:#}"), "applying the change failed");
        return Outcome::Error(format!("the change was saved but applying it failed: {e:#}"));
    }
    Outcome::Ok(with_handshakes(host, reply).await)
}

/// Make the host match the stored network, touching only what changed.
async fn reconcile(controller: &mut Controller, host: &mut Host) -> anyhow::Result<()> {
    let snapshot = controller.snapshot()?;
    let new = desired::plan_host(&snapshot, &host.name)?;
    let peers = desired::diff_peers(&host.plan.peers, &new.peers);
    let (add, remove) = desired::diff_addresses(&host.plan.addresses, &new.addresses);
    // Addresses are added before peers that route to them; within the peer diff, withdrawn peers go
    // first, so a removed device loses access before anything else happens.
    let interface = host.interface.clone();
    tokio::task::spawn_blocking(move || {
        let interface = interface.lock().map_err(|_| anyhow!("interface lock poisoned"))?;
        interface.change_addresses(&add, &[])?;
        interface.apply_peers(&peers)?;
        anyhow::Ok(())
    })
    .await??;
    firewall::load(&firewall::render(&new)).await.context("updating access rules")?;
    host.forwarders.apply(&new.services)?;
    if let (Some(server), Some(plan)) = (&host.dns, &new.dns) {
        server.update(plan.records.clone()).await;
    }
    if !remove.is_empty() {
        let interface = host.interface.clone();
        tokio::task::spawn_blocking(move || {
            let interface = interface.lock().map_err(|_| anyhow!("interface lock poisoned"))?;
            anyhow::Ok(interface.change_addresses(&[], &remove)?)
        })
        .await??;
    }
    host.plan = new;
    Ok(())
}

/// Fill in the last handshake of devices from the live interface.
async fn with_handshakes(host: &Host, reply: Reply) -> Reply {
    let needs = matches!(reply, Reply::Devices(_) | Reply::Status(_));
    if !needs {
        return reply;
    }
    let interface = host.interface.clone();
    let handshakes = tokio::task::spawn_blocking(move || interface.lock().ok().map(|i| i.handshakes())).await;
    let handshakes = match handshakes {
        Ok(Some(Ok(h))) => h,
        _ => {
            warn!("could not read handshakes from the interface");
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
    let Host { plan, interface, forwarders, dns, .. } = host;
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
