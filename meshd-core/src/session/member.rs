//! A member host's end of the sync protocol, as a state machine: it keeps the member's copy of the
//! network current from what the hub sends, says when the host must be reconciled and the copy cached,
//! carries out the key rotations the operator asks for (offered, switched, confirmed or reverted), and
//! times the opening of tunnels after start.
//!
//! Driven by [`Member::handle_connected`], [`Member::handle_message`], the reports of effects it asked
//! for ([`Member::handle_acknowledged`], [`Member::handle_key_used`], [`Member::handle_offer_failed`])
//! and [`Member::handle_timeout`] at [`Member::poll_timeout`]; what the host must do comes out of
//! [`Member::poll_effect`], in order. Time comes in as an argument.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

use crate::input::Label;
use crate::keys::PrivateKey;
use crate::wire::join::MemberState;
use crate::wire::sync::{self, ToHub, ToMember};

/// When a member opens its tunnels: shortly after its session with the hub starts (peers have had a
/// moment to learn of this host: a handshake they drop blocks the next attempt for 5 s), or this long
/// after start without one.
pub const TUNNELS_AFTER_CONNECT: Duration = Duration::from_millis(500);
/// See [`TUNNELS_AFTER_CONNECT`].
pub const TUNNELS_WITHOUT_CONTROLLER: Duration = Duration::from_secs(3);
/// How long a member waits, after switching keys, for the network to confirm before it goes back.
pub const ROTATION_CONFIRM: Duration = Duration::from_secs(30);

/// What the host must do for the member, in the order given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Send this to the hub (now, or in the next session if none is up).
    Send(ToHub),
    /// Send this to the hub and report with [`Member::handle_acknowledged`] once the hub's host has
    /// acknowledged it (or the session ended first).
    SendAcknowledged(ToHub),
    /// Save this key next to the current one (so a restart can finish the rotation), then send its
    /// public half to the hub ([`ToHub::NewKey`]); report a failure to save with
    /// [`Member::handle_offer_failed`].
    OfferKey(PrivateKey),
    /// Make the interface use this private key; report with [`Member::handle_key_used`].
    UseKey(PrivateKey),
    /// Forget the saved next key.
    DiscardNextKey,
    /// The saved next key becomes this host's key (the network confirmed it). A failure is fatal: the
    /// host would otherwise restart with a key the network no longer knows.
    PromoteNextKey,
    /// Cache [`Member::member_state`], so the host starts from it without a controller.
    CacheState,
    /// Plan this host from [`Member::member_state`] and apply the difference; open a tunnel to every
    /// peer added or replaced that has an endpoint.
    Reconcile,
    /// Open a tunnel to every peer whose endpoint the interface knows.
    OpenKnownTunnels,
    /// This host is no longer a member of the network: stop.
    Removed {
        /// The network it left.
        network: Label,
    },
}

/// A key rotation, as far as it got.
#[derive(Debug)]
enum Rotation {
    Idle,
    /// The new key was offered to the hub.
    Offered(PrivateKey),
    /// The hub accepted it; the switch is on its way to the hub.
    Acknowledging(PrivateKey),
    /// The interface is being switched to `key`.
    Switching {
        key: PrivateKey,
        old: PrivateKey,
    },
    /// The interface uses `key`; waiting for the network to confirm it until `since` +
    /// [`ROTATION_CONFIRM`].
    Switched {
        key: PrivateKey,
        old: PrivateKey,
        since: Instant,
    },
    /// The interface is going back to the old key.
    Reverting,
}

/// A member's end of the sync protocol. See the module documentation.
#[derive(Debug)]
pub struct Member {
    member: MemberState,
    digest: String,
    key: PrivateKey,
    rotation: Rotation,
    open_tunnels_at: Option<Instant>,
    removed: bool,
    effects: VecDeque<Effect>,
}

impl Member {
    /// A member starting at `now` from its cached `member` state, with `key` as its interface's key.
    pub fn new(member: MemberState, key: PrivateKey, now: Instant) -> Member {
        Member {
            digest: sync::digest(&member.state),
            member,
            key,
            rotation: Rotation::Idle,
            open_tunnels_at: Some(now + TUNNELS_WITHOUT_CONTROLLER),
            removed: false,
            effects: VecDeque::new(),
        }
    }

    /// The member's name and its copy of the network.
    pub fn member_state(&self) -> &MemberState {
        &self.member
    }

    /// The digest of the member's copy ([`sync::digest`]): what it says in its hello.
    pub fn digest(&self) -> &str {
        &self.digest
    }

    /// The key the network knows this host by, as far as the member knows (the new one once confirmed).
    pub fn key(&self) -> &PrivateKey {
        &self.key
    }

    /// True when a key rotation is under way.
    pub fn is_rotating(&self) -> bool {
        !matches!(self.rotation, Rotation::Idle)
    }

    /// A session with the hub started (the hello with [`Member::digest`] is sent).
    pub fn handle_connected(&mut self, now: Instant) {
        if self.open_tunnels_at.is_some() {
            self.open_tunnels_at = Some(now + TUNNELS_AFTER_CONNECT);
        }
        self.offer_key_if_asked();
    }

    /// A message from the hub.
    pub fn handle_message(&mut self, message: ToMember) {
        if self.removed {
            return;
        }
        match message {
            ToMember::State { digest, state } => {
                self.member.state = state;
                self.updated(digest);
            }
            ToMember::Changes { from, to, changes } => {
                if from != self.digest {
                    debug!("missed a change; asking for the current state");
                    self.effects.push_back(Effect::Send(ToHub::Hello { digest: self.digest.clone() }));
                } else {
                    sync::apply(&mut self.member.state, &changes);
                    self.updated(to);
                }
            }
            ToMember::KeyAccepted => {
                if let Rotation::Offered(new) = std::mem::replace(&mut self.rotation, Rotation::Idle) {
                    // Switch only once the hub has the message: after that, the old key's tunnel may
                    // stop carrying anything.
                    self.effects.push_back(Effect::SendAcknowledged(ToHub::Switch));
                    self.rotation = Rotation::Acknowledging(new);
                }
            }
            ToMember::Refused { reason } => {
                warn!(%reason, "the controller refused");
                if matches!(self.rotation, Rotation::Offered(_)) {
                    self.effects.push_back(Effect::DiscardNextKey);
                    self.rotation = Rotation::Idle;
                }
            }
        }
    }

    /// The message sent with [`Effect::SendAcknowledged`] reached the hub's host (`delivered`), or the
    /// session ended before it did.
    pub fn handle_acknowledged(&mut self, delivered: bool) {
        let Rotation::Acknowledging(new) = std::mem::replace(&mut self.rotation, Rotation::Idle) else {
            return;
        };
        if delivered {
            self.effects.push_back(Effect::UseKey(new.clone()));
            self.rotation = Rotation::Switching { key: new, old: self.key.clone() };
        } else {
            warn!("the controller went away before the key switch reached it; keeping the old key");
            self.effects.push_back(Effect::DiscardNextKey);
        }
    }

    /// The interface took the key of [`Effect::UseKey`] (`used`), or could not.
    pub fn handle_key_used(&mut self, used: bool, now: Instant) {
        match std::mem::replace(&mut self.rotation, Rotation::Idle) {
            Rotation::Switching { key, old } if used => {
                info!("switched to the new key; waiting for the network to confirm it");
                // Renew every session with the new key now rather than at the next keepalive.
                self.effects.push_back(Effect::OpenKnownTunnels);
                self.rotation = Rotation::Switched { key, old, since: now };
            }
            Rotation::Switching { .. } => warn!("switching to the new key failed"),
            // Back on the old key, which the network still knows: if it still asks for a new one, offer
            // another now rather than at the next change or reconnect.
            Rotation::Reverting if used => self.offer_key_if_asked(),
            Rotation::Reverting => warn!("going back to the old key failed"),
            other => self.rotation = other,
        }
    }

    /// Saving the key of [`Effect::OfferKey`] failed: it was not offered.
    pub fn handle_offer_failed(&mut self) {
        if matches!(self.rotation, Rotation::Offered(_)) {
            self.rotation = Rotation::Idle;
        }
    }

    /// When [`Member::handle_timeout`] is due next, if ever.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let confirm_by = match &self.rotation {
            Rotation::Switched { since, .. } => Some(*since + ROTATION_CONFIRM),
            _ => None,
        };
        [self.open_tunnels_at, confirm_by].into_iter().flatten().min()
    }

    /// Time passed to `now`: open the tunnels once it is time, go back to the old key if the network
    /// did not confirm the new one in time.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.open_tunnels_at.is_some_and(|at| at <= now) {
            self.open_tunnels_at = None;
            self.effects.push_back(Effect::OpenKnownTunnels);
        }
        if let Rotation::Switched { since, .. } = &self.rotation
            && *since + ROTATION_CONFIRM <= now
            && let Rotation::Switched { old, .. } = std::mem::replace(&mut self.rotation, Rotation::Reverting)
        {
            warn!("the network did not confirm the new key; going back to the old one");
            self.effects.push_back(Effect::DiscardNextKey);
            self.effects.push_back(Effect::UseKey(old));
        }
    }

    /// The next thing the host must do, if any.
    pub fn poll_effect(&mut self) -> Option<Effect> {
        self.effects.pop_front()
    }

    /// The copy now has `digest`: cache it, finish a confirmed rotation, reconcile the host, and start
    /// a rotation the network asks for.
    fn updated(&mut self, digest: String) {
        self.digest = digest;
        self.effects.push_back(Effect::CacheState);
        let Some(me) = self.member.state.nodes.iter().find(|n| n.name == self.member.me) else {
            self.removed = true;
            self.effects.push_back(Effect::Removed { network: self.member.state.network.name.clone() });
            return;
        };
        if let Rotation::Switched { key, .. } = &self.rotation
            && me.public_key == key.public_key()
            && let Rotation::Switched { key, .. } = std::mem::replace(&mut self.rotation, Rotation::Idle)
        {
            info!("key rotation done");
            self.effects.push_back(Effect::PromoteNextKey);
            self.key = key;
        }
        self.effects.push_back(Effect::Reconcile);
        self.offer_key_if_asked();
    }

    /// When the network asks this host for a new key and no rotation is under way, make one and offer it.
    fn offer_key_if_asked(&mut self) {
        let asked = self.member.state.nodes.iter().any(|n| n.name == self.member.me && n.rotate_key);
        if !asked || self.is_rotating() || self.removed {
            return;
        }
        let new = PrivateKey::generate();
        info!("the operator asked for a new key: offering one");
        self.effects.push_back(Effect::OfferKey(new.clone()));
        self.rotation = Rotation::Offered(new);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{label, sample_state};

    fn member(now: Instant) -> (Member, PrivateKey) {
        let key = PrivateKey::generate();
        let mut state = sample_state();
        state.nodes[1].public_key = key.public_key();
        (Member::new(MemberState { me: label("vps"), state }, key.clone(), now), key)
    }

    fn effects(member: &mut Member) -> Vec<Effect> {
        std::iter::from_fn(|| member.poll_effect()).collect()
    }

    #[test]
    fn tunnels_open_soon_after_connecting_or_a_while_after_start_without_a_hub() {
        let start = Instant::now();
        let (mut alone, _) = member(start);
        assert_eq!(alone.poll_timeout(), Some(start + TUNNELS_WITHOUT_CONTROLLER));
        alone.handle_timeout(start + TUNNELS_WITHOUT_CONTROLLER);
        assert_eq!(effects(&mut alone), [Effect::OpenKnownTunnels]);
        assert_eq!(alone.poll_timeout(), None, "once");

        let (mut connected, _) = member(start);
        connected.handle_connected(start + Duration::from_secs(1));
        assert_eq!(connected.poll_timeout(), Some(start + Duration::from_secs(1) + TUNNELS_AFTER_CONNECT));
    }

    #[test]
    fn a_change_is_cached_applied_and_a_missed_one_asks_for_the_state() {
        let (mut m, _) = member(Instant::now());
        let mut next = m.member_state().state.clone();
        next.rules.push(crate::model::AccessRule { from: label("vps"), to: label("attic") });
        let changes = sync::changes(&m.member_state().state, &next);
        let to = sync::digest(&next);
        m.handle_message(ToMember::Changes { from: "elsewhere".into(), to: to.clone(), changes: changes.clone() });
        assert_eq!(effects(&mut m), [Effect::Send(ToHub::Hello { digest: m.digest().to_owned() })]);
        let from = m.digest().to_owned();
        m.handle_message(ToMember::Changes { from, to: to.clone(), changes });
        assert_eq!(effects(&mut m), [Effect::CacheState, Effect::Reconcile]);
        assert_eq!((m.digest(), &m.member_state().state), (to.as_str(), &next));
    }

    #[test]
    fn a_member_left_out_of_the_state_stops() {
        let (mut m, _) = member(Instant::now());
        let mut gone = m.member_state().state.clone();
        gone.nodes.retain(|n| n.name.as_str() != "vps");
        m.handle_message(ToMember::State { digest: sync::digest(&gone), state: gone });
        assert_eq!(effects(&mut m), [Effect::CacheState, Effect::Removed { network: label("home") }]);
    }

    #[test]
    fn a_rotation_offers_switches_after_delivery_and_finishes_when_confirmed() {
        let start = Instant::now();
        let (mut m, old) = member(start);
        let mut asked = m.member_state().state.clone();
        asked.nodes[1].rotate_key = true;
        m.handle_message(ToMember::State { digest: sync::digest(&asked), state: asked.clone() });
        let offered = match &effects(&mut m)[..] {
            [Effect::CacheState, Effect::Reconcile, Effect::OfferKey(new)] => new.clone(),
            other => panic!("{other:?}"),
        };
        assert_ne!(offered, old);
        m.handle_message(ToMember::KeyAccepted);
        assert_eq!(effects(&mut m), [Effect::SendAcknowledged(ToHub::Switch)]);
        m.handle_acknowledged(true);
        assert_eq!(effects(&mut m), [Effect::UseKey(offered.clone())]);
        m.handle_key_used(true, start);
        assert_eq!(effects(&mut m), [Effect::OpenKnownTunnels]);
        assert_eq!(m.poll_timeout(), Some(start + ROTATION_CONFIRM).min(Some(start + TUNNELS_WITHOUT_CONTROLLER)));
        let mut confirmed = asked;
        confirmed.nodes[1].public_key = offered.public_key();
        confirmed.nodes[1].rotate_key = false;
        m.handle_message(ToMember::State { digest: sync::digest(&confirmed), state: confirmed });
        assert_eq!(effects(&mut m), [Effect::CacheState, Effect::PromoteNextKey, Effect::Reconcile]);
        assert_eq!(m.key(), &offered);
        assert!(!m.is_rotating());
    }

    #[test]
    fn an_unconfirmed_key_is_given_up_and_a_refused_or_undelivered_one_discarded() {
        let start = Instant::now();
        let (mut m, old) = member(start);
        let mut asked = m.member_state().state.clone();
        asked.nodes[1].rotate_key = true;
        m.handle_message(ToMember::State { digest: sync::digest(&asked), state: asked });
        effects(&mut m);
        m.handle_message(ToMember::Refused { reason: "the key is in use".into() });
        assert_eq!(effects(&mut m), [Effect::DiscardNextKey]);
        assert!(!m.is_rotating());

        m.handle_connected(start);
        assert!(matches!(effects(&mut m)[..], [Effect::OfferKey(_)]), "offered again at the next session");
        m.handle_message(ToMember::KeyAccepted);
        effects(&mut m);
        m.handle_acknowledged(false);
        assert_eq!(effects(&mut m), [Effect::DiscardNextKey]);

        m.handle_connected(start);
        effects(&mut m);
        m.handle_message(ToMember::KeyAccepted);
        m.handle_acknowledged(true);
        m.handle_key_used(true, start);
        effects(&mut m);
        m.handle_timeout(start + ROTATION_CONFIRM);
        assert_eq!(effects(&mut m), [Effect::OpenKnownTunnels, Effect::DiscardNextKey, Effect::UseKey(old.clone())]);
        m.handle_key_used(true, start + ROTATION_CONFIRM);
        assert!(matches!(effects(&mut m)[..], [Effect::OfferKey(_)]), "the network still asks: another offer");
        assert_eq!(m.key(), &old);
    }
}
