//! A member host: follows the controller's live updates through its sync session and carries out what
//! its state machine ([`meshd_core::session::member::Member`]) decides: apply each change to this host
//! and cache it, key rotations the operator asks for, the opening of tunnels after start, and, without a
//! session, the question where this host stands, put to the controller's join service over TLS pinned
//! to the join certificate of its token. Without a controller the host keeps running on its cached
//! state and reconnects with backoff.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::anyhow;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, error, info, warn};

use super::apply::{APPLY_RETRY, Host, open_tunnels};
use super::{Signals, wait_for_signal};
use crate::host::clock;
use crate::host::statedir::StateDir;
use crate::links::join;
use crate::links::sync::{self, Identity, Outgoing, SyncEvent};
use meshd_core::acme::renewal::Status;
use meshd_core::input::{Label, PublicName};
use meshd_core::keys::{PrivateKey, PublicKey};
use meshd_core::model::SYNC_PORT;
use meshd_core::session::member::{Effect, Member};
use meshd_core::wire::auth;
use meshd_core::wire::join::{HubContact, JoinReply, Standing, StandingRequest, ToJoinService};
use meshd_core::wire::sync::{OnionReport, ToHub};

/// How long a question to the join service may take.
const STANDING_TIMEOUT: Duration = Duration::from_secs(10);

/// How often a member looks whether the certificates it holds changed state, to tell the hub.
const REPORT_EVERY: Duration = Duration::from_secs(2);

/// Follow the controller until SIGINT or SIGTERM, or until this host is removed from the network.
pub(super) async fn follow_controller(
    state: &StateDir,
    mut member: Member,
    host: &mut Host,
    signals: &mut Signals,
) -> anyhow::Result<()> {
    let shared = &member.member_state().state;
    let hub = shared.hub().ok_or_else(|| anyhow!("the cached network has no hub"))?;
    let hub_addr = SocketAddr::new(shared.network.pool().v4_of(hub.index).into(), SYNC_PORT);
    let identity = |member: &Member, host: &Host| {
        let hub = member.member_state().state.hub().map(|h| h.public_key.clone());
        hub.map(|hub| Identity { key: host.key().clone(), hub })
    };
    let (identity_tx, identity_rx) =
        watch::channel(identity(&member, host).ok_or_else(|| anyhow!("the cached network has no hub"))?);
    let (digest_tx, digest_rx) = watch::channel(member.digest().to_owned());
    let (events_tx, mut events) = mpsc::channel(64);
    let (outgoing, outgoing_rx) = mpsc::channel(8);
    let (standing_tx, mut standings) = mpsc::channel(1);
    let client = tokio::spawn(sync::follow(hub_addr, identity_rx, digest_rx, events_tx, outgoing_rx));
    let shutdown = wait_for_signal(host.stopped()?, signals);
    tokio::pin!(shutdown);
    // The delivery of a message sent with `SendAcknowledged`, awaited beside everything else.
    let mut delivery: Option<oneshot::Receiver<()>> = None;
    // The certificates this host holds, as last told to the hub (None: tell it, after connecting).
    let mut reported: Option<BTreeMap<PublicName, Status>> = None;
    let mut reported_onions: Option<BTreeMap<Label, OnionReport>> = None;
    let mut report_tick = tokio::time::interval(REPORT_EVERY);
    report_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let result = loop {
        if let Err(e) = carry_out(&mut member, state, host, &outgoing, &mut delivery, &standing_tx).await {
            break Err(e);
        }
        // The key the interface uses (a rotation switches it) and the hub's, for the next handshake.
        if let Some(now) = identity(&member, host) {
            identity_tx.send_if_modified(|identity| {
                let changed = *identity != now;
                *identity = now;
                changed
            });
        }
        digest_tx.send_if_modified(|digest| {
            let changed = digest != member.digest();
            if changed {
                member.digest().clone_into(digest);
            }
            changed
        });
        let deadline = member.poll_timeout();
        tokio::select! {
            Some(event) = events.recv() => match event {
                SyncEvent::Connected { at } => {
                    member.handle_connected(at);
                    reported = None;
                    reported_onions = None;
                }
                SyncEvent::Disconnected => member.handle_disconnected(Instant::now()),
                SyncEvent::Message(message) => member.handle_message(message),
            },
            delivered = delivered(&mut delivery) => {
                delivery = None;
                member.handle_acknowledged(delivered, Instant::now());
            }
            Some(answer) = standings.recv() => member.handle_standing(answer, Instant::now()),
            () = clock::sleep_until(deadline) => member.handle_timeout(Instant::now()),
            _ = report_tick.tick() => {
                let now = clock::wall_now().max(0) as u64;
                let certificates = host.public.certificates(now);
                let news = reported.as_ref() != Some(&certificates);
                let worth = !certificates.is_empty() || reported.as_ref().is_some_and(|r| !r.is_empty());
                if news && worth && outgoing.try_send(ToHub::Certificates { certificates: certificates.clone() }.into()).is_ok() {
                    reported = Some(certificates);
                }
                let onions = host.tor.reports();
                if reported_onions.as_ref() != Some(&onions)
                    && (!onions.is_empty() || reported_onions.as_ref().is_some_and(|r| !r.is_empty()))
                    && outgoing.try_send(ToHub::Onions { onions: onions.clone() }.into()).is_ok()
                {
                    reported_onions = Some(onions);
                }
            }
            () = tokio::time::sleep(APPLY_RETRY), if host.unapplied() => {
                match host.reconcile(&member.member_state().state.snapshot()).await {
                    Ok(renewable) => {
                        info!("the controller's last change is applied now");
                        open_tunnels(renewable.iter().map(|(_, p)| p));
                    }
                    Err(e) => debug!(error = format!("{e:#}"), "applying the controller's change failed again"),
                }
            }
            result = &mut shutdown => break result,
        }
    };
    client.abort();
    result
}

/// Carry out every effect the member asks for, in order, reporting back what it needs to know. Nothing
/// here waits on the hub: a message goes into the current session's queue or is dropped, and a question
/// to the join service runs in a task of its own that answers on `standings`. An error ends the
/// daemon: the host was removed from the network.
async fn carry_out(
    member: &mut Member,
    state: &StateDir,
    host: &mut Host,
    outgoing: &mpsc::Sender<Outgoing>,
    delivery: &mut Option<oneshot::Receiver<()>>,
    standings: &mpsc::Sender<Option<Standing>>,
) -> anyhow::Result<()> {
    while let Some(effect) = member.poll_effect() {
        match effect {
            Effect::Send(message) => {
                let _ = outgoing.try_send(message.into());
            }
            Effect::SendAcknowledged(message) => {
                let (delivered, receiver) = oneshot::channel();
                match outgoing.try_send(Outgoing { message, delivered: Some(delivered) }) {
                    Ok(()) => *delivery = Some(receiver),
                    Err(_) => member.handle_acknowledged(false, Instant::now()),
                }
            }
            Effect::OfferKey(key) => {
                let saved = state.write_next_private_key(&key);
                state.log_save(&state.next_private_key(), "a new key", &saved);
                let offered = saved.is_ok()
                    && match outgoing.try_send(ToHub::NewKey { public_key: key.public_key() }.into()) {
                        Ok(()) => true,
                        Err(_) => {
                            warn!("no session with the hub: the new key was not offered");
                            false
                        }
                    };
                if !offered {
                    member.handle_offer_failed(Instant::now());
                }
            }
            Effect::UseKey(key) => {
                let used = host.use_key(&key).await;
                if let Err(e) = &used {
                    warn!(error = format!("{e:#}"), "switching keys");
                }
                member.handle_key_used(used.is_ok(), Instant::now());
            }
            Effect::DiscardNextKey => {
                if let Err(e) = state.discard_next_private_key() {
                    warn!(error = %e, "removing the dropped new key");
                }
            }
            Effect::PromoteNextKey => {
                let saved = state.promote_next_private_key();
                state.log_save(&state.private_key(), "the new key as this host's key", &saved);
                member.handle_promoted(saved.is_ok(), Instant::now());
            }
            Effect::CacheState => {
                let saved = state.write_member_state(member.member_state());
                state.log_save(&state.member_state(), "the network's changes", &saved);
            }
            Effect::Reconcile => match host.reconcile(&member.member_state().state.snapshot()).await {
                // New peers get a tunnel at once; a replaced peer lost its session on this side only and
                // would keep sending on the old one (dropped here) until its own rekey, ~15 s: a handshake
                // now renews both.
                Ok(renewable) => open_tunnels(renewable.iter().map(|(_, p)| p)),
                Err(e) => error!(error = format!("{e:#}"), "applying the controller's change failed"),
            },
            Effect::OpenKnownTunnels => host.open_known_tunnels().await,
            Effect::AskStanding(keys) => match member.member_state().hub.clone() {
                Some(contact) => {
                    // The hub's endpoint now (it may have moved since the token was made: the join service
                    // listens on the same port), then the token's join address.
                    let now = member.member_state().state.hub().and_then(|h| h.endpoint.clone());
                    let contacts: Vec<HubContact> = now
                        .filter(|e| *e != contact.join)
                        .map(|join| HubContact { join, fingerprint: contact.fingerprint.clone() })
                        .into_iter()
                        .chain([contact])
                        .collect();
                    // Each key is proven with its private half: the interface's key, and the other of a rotation.
                    let held = [
                        Some(host.key().clone()),
                        state.read_private_key().ok(),
                        state.read_next_private_key().ok().flatten(),
                    ];
                    let keys: Vec<PrivateKey> = keys
                        .iter()
                        .filter_map(|public| held.iter().flatten().find(|k| k.public_key() == *public).cloned())
                        .collect();
                    let hub_key = member.member_state().state.hub().map(|h| h.public_key.clone());
                    let standings = standings.clone();
                    tokio::spawn(async move {
                        let mut answer = None;
                        if let Some(hub) = &hub_key {
                            for contact in &contacts {
                                answer = ask_standing(contact, &keys, hub).await;
                                if answer.is_some() {
                                    break;
                                }
                            }
                        }
                        let _ = standings.send(answer).await;
                    });
                }
                None => member.handle_standing(None, Instant::now()),
            },
            Effect::Removed { network } => {
                error!(%network, "this host was removed from the network: taking its interface, rules and forwarders down");
                return Err(anyhow!(
                    "this host was removed from network {network}; its interface is down (to come back, join with a new invite into a new state directory)"
                ));
            }
        }
    }
    Ok(())
}

/// Ask the controller's join service where the public halves of `keys` stand, proving each to the hub
/// (public key `hub`). Only an answer from the server that proves the join certificate of the token
/// counts; any failure is no answer.
async fn ask_standing(contact: &HubContact, keys: &[PrivateKey], hub: &PublicKey) -> Option<Standing> {
    let request = |binding: &join::Binding| {
        let proofs = keys.iter().map(|k| auth::standing_proof(k, hub, binding)).collect::<Result<Vec<_>, _>>();
        let standing = keys.iter().map(PrivateKey::public_key).collect();
        ToJoinService::Standing(StandingRequest { standing, proofs: proofs.unwrap_or_default() })
    };
    let addr = contact.join.to_string();
    match join::call_bound::<ToJoinService, JoinReply>(&addr, &contact.fingerprint, request, STANDING_TIMEOUT).await {
        Ok(JoinReply::Standing(standing)) => Some(standing),
        Ok(JoinReply::Refused(reason)) => {
            // A controller from before standing questions refuses them as malformed joins.
            debug!(%addr, %reason, "the controller's join service did not say where this host stands");
            None
        }
        Ok(JoinReply::Joined(_)) => {
            warn!(%addr, "unexpected answer from the controller's join service");
            None
        }
        Err(e @ join::JoinError::WrongServer { .. }) => {
            warn!(error = %e, "asking the controller's join service where this host stands");
            None
        }
        Err(e) => {
            debug!(%addr, error = %e, "asking the controller's join service where this host stands");
            None
        }
    }
}

/// Whether the message awaited in `delivery` reached the hub's host; forever pending without one.
async fn delivered(delivery: &mut Option<oneshot::Receiver<()>>) -> bool {
    match delivery {
        Some(receiver) => receiver.await.is_ok(),
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use tokio::net::TcpListener;

    use super::*;
    use crate::links::join::{JoinCall, JoinIdentity};

    /// A join service on loopback that says every key was removed once its proofs check out for the hub's
    /// key `hub` (and refuses otherwise); its address and identity.
    async fn says_removed(hub: PrivateKey) -> (String, JoinIdentity) {
        let identity = JoinIdentity::generate().unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let (calls_tx, mut calls) = mpsc::channel::<JoinCall<ToJoinService, JoinReply>>(4);
        tokio::spawn(join::serve(listener, identity.clone(), calls_tx, JoinReply::Refused));
        tokio::spawn(async move {
            while let Some((request, _, binding, reply)) = calls.recv().await {
                let ToJoinService::Standing(request) = request else { continue };
                let proven = request.standing.len() == request.proofs.len()
                    && request
                        .standing
                        .iter()
                        .zip(&request.proofs)
                        .all(|(k, p)| auth::verify_standing(&hub, k, &binding, p).is_ok());
                let answer = if proven {
                    JoinReply::Standing(Standing::Removed)
                } else {
                    JoinReply::Refused("not proven".into())
                };
                let _ = reply.send(answer);
            }
        });
        (addr, identity)
    }

    #[tokio::test]
    async fn only_the_server_proving_the_tokens_certificate_is_believed() {
        let hub_key = PrivateKey::generate();
        let (addr, identity) = says_removed(hub_key.clone()).await;
        let join: meshd_core::input::HostPort = addr.parse().unwrap();
        let keys = vec![PrivateKey::generate()];
        let hub = HubContact { join: join.clone(), fingerprint: identity.fingerprint() };
        assert_eq!(ask_standing(&hub, &keys, &hub_key.public_key()).await, Some(Standing::Removed));
        // Proofs made for another hub's key do not pass (no answer).
        assert_eq!(ask_standing(&hub, &keys, &PrivateKey::generate().public_key()).await, None);
        // The same answer from a server with another certificate (an attacker on the path) is no answer.
        let other = JoinIdentity::generate().unwrap().fingerprint();
        assert_eq!(ask_standing(&HubContact { join, fingerprint: other }, &keys, &hub_key.public_key()).await, None);
        // Nobody listening: no answer either.
        let gone = HubContact { join: "127.0.0.1:1".parse().unwrap(), fingerprint: identity.fingerprint() };
        assert_eq!(ask_standing(&gone, &keys, &hub_key.public_key()).await, None);
    }
}
