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
use crate::wire::admin::MemberState;
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
    Switching { key: PrivateKey, old: PrivateKey },
    /// The interface uses `key`; waiting for the network to confirm it until `since` +
    /// [`ROTATION_CONFIRM`].
    Switched { key: PrivateKey, old: PrivateKey, since: Instant },
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
            Rotation::Reverting if !used => warn!("going back to the old key failed"),
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
