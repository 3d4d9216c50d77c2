//! The hub: the controller's loop. Requests enter here (the admin socket, the join service, the
//! members' sync sessions), change the network through the [`Controller`], and every change is applied
//! to this host (one reconcile) and published to the members.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{Ipv6Addr, SocketAddr};

use anyhow::Context;
use tokio::sync::mpsc;
use tracing::{debug, error, info, warn};

use super::apply::{APPLY_RETRY, Host, open_tunnels};
use super::{Signals, wait_for_signal};
use crate::controller::Controller;
use crate::host::statedir::StateDir;
use crate::host::wg::Interface;
use crate::links::admin::{self, Call};
use crate::links::join::{self, Binding, JoinCall};
use crate::links::sync::{FromSession, Publisher};
use meshd_core::acme::renewal::Status;
use meshd_core::input::{Label, PublicName};
use meshd_core::keys::{PrivateKey, PublicKey};
use meshd_core::model::{CertificateReport, DeviceView, NodeView, ServiceView, Snapshot};
use meshd_core::plan::SyncPlan;
use meshd_core::relay::route::TlsMode;
use meshd_core::wire::admin::{Outcome, Reply, Request};
use meshd_core::wire::auth;
use meshd_core::wire::join::{JoinReply, JoinRequest, StandingRequest, ToJoinService};
use meshd_core::wire::sync::OnionReport;

/// Open the admin socket, the join service and the sync service, then answer them until SIGINT or
/// SIGTERM. Every change is applied to this host and published to the members.
pub(super) async fn serve(
    state: &StateDir,
    controller: &mut Controller,
    host: &mut Host,
    snapshot: &Snapshot,
    signals: &mut Signals,
) -> anyhow::Result<()> {
    // Joining hosts reach the join service on the TCP port of the same number as WireGuard's UDP one.
    let identity = controller.join_identity()?;
    let join_addr = SocketAddr::from((Ipv6Addr::UNSPECIFIED, host.plan.listen_port));
    let join_listener = crate::host::socket::listen_internet(join_addr).map_err(|e| {
        let held = (e.kind() == std::io::ErrorKind::AddrInUse)
            .then(|| crate::host::ports::holder(crate::host::ports::Transport::Tcp, join_addr.port()))
            .flatten();
        match held {
            Some(holder) => anyhow::anyhow!(
                "join service on TCP {join_addr}: the port is held by another process ({holder}): stop it and start \
                 meshd again"
            ),
            None => anyhow::Error::new(e).context(format!("join service on TCP {join_addr}")),
        }
    })?;
    let (joins_tx, mut joins) = mpsc::channel::<JoinCall<ToJoinService, JoinReply>>(64);
    let mut tasks = vec![tokio::spawn(join::serve(join_listener, identity, joins_tx, |reason| {
        JoinReply::Refused(format!("malformed join request: {reason}"))
    }))];

    let publisher = Publisher::new(snapshot.shared(), host.key());
    let (sessions_tx, mut sessions) = mpsc::channel::<FromSession>(64);
    // On the hub's mesh addresses at the port only root binds; the rules send SYNC_PORT there.
    for addr in host.plan.sync.iter().flat_map(SyncPlan::bound) {
        let listener = crate::host::socket::listen_tcp(addr).with_context(|| format!("sync service on TCP {addr}"))?;
        tasks.push(tokio::spawn(publisher.clone().serve(listener, sessions_tx.clone())));
    }

    let (calls_tx, mut calls) = mpsc::channel::<Call>(64);
    let listener = admin::bind(&state.socket())?;
    tasks.push(tokio::spawn(admin::serve(listener, calls_tx)));
    info!(node = %host.name, socket = %state.socket().display(), join = %join_addr, "meshd ready");
    crate::host::systemd::ready();
    // Peers (members and devices alike) still hold sessions with the hub as it was before the restart and
    // would send on them, dropped here, until their own rekey (~15 s). Where they were last seen is
    // known: a handshake from here renews them at once.
    host.open_known_tunnels().await;
    let shutdown = wait_for_signal(host.stopped()?, signals);
    tokio::pin!(shutdown);
    // What members last reported of the certificates they hold (since this hub started).
    let mut reports = Reports::default();
    let result = loop {
        tokio::select! {
            Some((request, reply)) = calls.recv() => {
                let outcome = handle(controller, host, &publisher, &reports, request).await;
                let _ = reply.send(outcome);
            }
            Some((request, peer, binding, reply)) = joins.recv() => {
                let answer = match request {
                    ToJoinService::Join(request) => redeem(controller, host, &publisher, &request, peer).await,
                    ToJoinService::Standing(request) => standing(controller, host.key(), &request, &binding, peer),
                };
                let _ = reply.send(answer);
            }
            Some(request) = sessions.recv() => from_session(controller, host, &publisher, &mut reports, request).await,
            () = tokio::time::sleep(APPLY_RETRY), if host.unapplied() => match publish_change(controller, host, &publisher).await {
                Ok(()) => info!("the last change is applied now"),
                Err(e) => debug!(error = format!("{e:#}"), "applying the change failed again"),
            },
            result = &mut shutdown => break result,
        }
    };
    tasks.iter().for_each(tokio::task::JoinHandle::abort);
    let _ = std::fs::remove_file(state.socket());
    result
}

/// What each member last reported of the certificates it holds and of its onion services (since this hub
/// started).
#[derive(Default)]
struct Reports {
    /// By node, the certificates it holds.
    certificates: HashMap<Label, BTreeMap<PublicName, Status>>,
    /// By node, its onion services.
    onions: HashMap<Label, BTreeMap<Label, OnionReport>>,
}

/// What a member's session asks of the controller: a member asked for a new key offers it, then switches to it;
/// a member reports the certificates it holds.
async fn from_session(
    controller: &mut Controller,
    host: &mut Host,
    publisher: &Publisher,
    reports: &mut Reports,
    request: FromSession,
) {
    match request {
        FromSession::Certificates { node, certificates } => {
            reports.certificates.insert(node, certificates);
        }
        FromSession::Onions { node, onions } => {
            reports.onions.insert(node, onions);
        }
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

/// A member without a sync session asks where its keys stand (removed members are told so), proving each
/// with the hub's key `own` and the TLS session's `binding`.
fn standing(
    controller: &mut Controller,
    own: &PrivateKey,
    request: &StandingRequest,
    binding: &Binding,
    peer: SocketAddr,
) -> JoinReply {
    let keys = &request.standing;
    // A member knows itself by one key, two during a key rotation.
    if !(1..=2).contains(&keys.len()) {
        return JoinReply::Refused(format!("a standing request names one or two keys, not {}", keys.len()));
    }
    let proven = keys.len() == request.proofs.len()
        && keys.iter().zip(&request.proofs).all(|(key, proof)| auth::verify_standing(own, key, binding, proof).is_ok());
    if !proven {
        debug!(%peer, "a standing question without proof of its keys; refused");
        return JoinReply::Refused("the keys asked about are not proven".into());
    }
    match controller.standing(keys) {
        Ok(standing) => {
            debug!(%peer, ?standing, "told a host where its key stands");
            JoinReply::Standing(standing)
        }
        Err(e) => {
            warn!(%peer, error = %e, "reading where a host stands");
            JoinReply::Refused(format!("the controller cannot tell: {e}"))
        }
    }
}

/// After a change: apply the stored network to this host, then push it to the members. The change is
/// saved: the members get it even if applying it here failed (that error is returned, and the next
/// change applies the whole difference again).
async fn publish_change(controller: &mut Controller, host: &mut Host, publisher: &Publisher) -> anyhow::Result<()> {
    let snapshot = controller.snapshot()?;
    let applied = host.reconcile(&snapshot).await;
    publisher.publish(snapshot.shared());
    // Nodes the hub gained or replaced as peers: open the tunnel from here. One behind NAT that comes
    // back (enabled again) is reached at once from where it was last seen, rather than when one of its
    // own attempts gets through. Devices are left alone.
    let nodes: HashSet<&PublicKey> = snapshot.nodes.iter().map(|n| &n.public_key).collect();
    open_tunnels(applied?.iter().filter(|(key, _)| nodes.contains(key)).map(|(_, p)| p));
    Ok(())
}

/// Carry out one admin request; a change is applied to this host and published to the members.
async fn handle(
    controller: &mut Controller,
    host: &mut Host,
    publisher: &Publisher,
    reports: &Reports,
    request: Request,
) -> Outcome {
    let is_change = request.is_change();
    let reply = match crate::controller::outcome(controller.handle(request)) {
        Outcome::Ok(reply) => *reply,
        refused => return refused,
    };
    if is_change && let Err(e) = publish_change(controller, host, publisher).await {
        error!(error = format!("{e:#}"), "applying the change failed");
        return Outcome::Error(format!("the change was saved but applying it failed: {e:#}"));
    }
    Outcome::Ok(Box::new(
        with_handshakes(host, with_onions(host, reports, with_certificates(host, reports, reply))).await,
    ))
}

/// Fill in the state of each public name's certificate, as its holder (the relay in terminate mode, the service's
/// node in passthrough mode) knows it: this host's own, the members' as they last reported them.
fn with_certificates(host: &Host, reports: &Reports, mut reply: Reply) -> Reply {
    let now = u64::try_from(crate::host::clock::wall_now()).unwrap_or(0);
    let fill = |service: &mut ServiceView| {
        for url in &mut service.https {
            let holder = match url.tls {
                TlsMode::Terminate => &url.relay,
                TlsMode::Passthrough => &service.node,
            };
            let status = if holder.as_str() == host.name {
                host.public.certificate(&url.hostname, now)
            } else {
                reports.certificates.get(holder).and_then(|held| held.get(&url.hostname)).cloned()
            };
            url.certificate = status.map(|status| CertificateReport { holder: holder.clone(), status });
        }
    };
    for_each_service(&mut reply, fill);
    reply
}

/// Call `fill` on every service a reply describes.
fn for_each_service(reply: &mut Reply, fill: impl FnMut(&mut ServiceView)) {
    match reply {
        Reply::Services(services) => services.iter_mut().for_each(fill),
        Reply::Service(service) => std::iter::once(service).for_each(fill),
        Reply::Status(status) => status.services.iter_mut().for_each(fill),
        _ => {}
    }
}

/// Fill in each onion service's address (or why it cannot be served), as its node knows it: this host's own,
/// the members' as they last reported them. A member reports only the services it runs.
fn with_onions(host: &Host, reports: &Reports, mut reply: Reply) -> Reply {
    let own = host.tor.reports();
    let fill = |service: &mut ServiceView| {
        let Some(tor) = &mut service.tor else { return };
        let report = if service.node.as_str() == host.name {
            own.get(&service.name)
        } else {
            reports.onions.get(&service.node).and_then(|served| served.get(&service.name))
        };
        match report {
            Some(OnionReport::Address(address)) => tor.address = Some(address.clone()),
            Some(OnionReport::Error(error)) => tor.error = Some(error.clone()),
            None => {}
        }
    };
    for_each_service(&mut reply, fill);
    reply
}

/// Fill in what the live interface knows: the last handshake of devices, and when the hub last heard
/// from each node.
async fn with_handshakes(host: &Host, reply: Reply) -> Reply {
    let needs = matches!(reply, Reply::Devices(_) | Reply::Status(_) | Reply::Nodes(_));
    if !needs {
        return reply;
    }
    let handshakes = match host.on_interface(Interface::handshakes).await {
        Ok(h) => h,
        Err(e) => {
            warn!(error = format!("{e:#}"), "could not read handshakes from the interface");
            return reply;
        }
    };
    let fill = |devices: &mut Vec<DeviceView>| {
        for d in devices {
            d.last_handshake = d.public_key.as_ref().and_then(|k| handshakes.get(k).copied().flatten());
        }
    };
    let heard = host.last_heard();
    let fill_nodes = |nodes: &mut Vec<NodeView>| {
        for n in nodes {
            n.last_heard = heard.get(&n.public_key).copied();
        }
    };
    match reply {
        Reply::Devices(mut devices) => {
            fill(&mut devices);
            Reply::Devices(devices)
        }
        Reply::Nodes(mut nodes) => {
            fill_nodes(&mut nodes);
            Reply::Nodes(nodes)
        }
        Reply::Status(mut status) => {
            fill(&mut status.devices);
            fill_nodes(&mut status.nodes);
            Reply::Status(status)
        }
        other => other,
    }
}
