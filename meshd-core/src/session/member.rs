//! A member host's end of the sync protocol, as a state machine: it keeps the member's copy of the
//! network current from what the hub sends, says when the host must be reconciled and the copy cached,
//! carries out the key rotations the operator asks for, and times the opening of tunnels after start.
//!
//! A rotation: the member makes a key and offers it; once the hub accepts, the member sends `switch`
//! and switches its interface; the network confirms by naming the new key in its state. From the moment
//! `switch` is sent the hub may have stored the new key, and a member that drops it could never reach
//! the hub again (WireGuard admits only the key the hub has). So the member keeps both keys until it
//! knows which one the hub has: a state that names the new key, or a session with the hub opened with
//! one of them (the hub accepts only the key it has). Until then, every [`ROTATION_CONFIRM`] without
//! knowing, it tries the other key.
//!
//! A member learns that it was removed from a state that lacks it; but the hub drops a removed member's
//! peer at once, so that state rarely reaches it, and a member that was away never gets it. So a member
//! without a sync session (for [`STANDING_WITHOUT_SESSION`] after start or after a session ended, then
//! every [`STANDING_AGAIN`]) asks the controller's join service, outside the mesh and authenticated by
//! the join certificate's fingerprint from its token, where its key stands: removed, it stops; disabled,
//! it says so once and waits. Only an answer the daemon authenticated counts; a failed question changes
//! nothing but the time of the next.
//!
//! Driven by [`Member::handle_connected`], [`Member::handle_disconnected`], [`Member::handle_message`],
//! the reports of effects it asked for ([`Member::handle_acknowledged`], [`Member::handle_key_used`],
//! [`Member::handle_offer_failed`], [`Member::handle_standing`]) and [`Member::handle_timeout`] at
//! [`Member::poll_timeout`]; what the host must do comes out of [`Member::poll_effect`], in order. Time
//! comes in as an argument.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use tracing::{debug, error, info, warn};

use crate::input::Label;
use crate::keys::{PrivateKey, PublicKey};
use crate::wire::join::{MemberState, Standing};
use crate::wire::sync::{self, ToHub, ToMember};

/// When a member opens its tunnels: shortly after its session with the hub starts (peers have had a
/// moment to learn of this host: a handshake they drop blocks the next attempt for 5 s), or this long
/// after start without one.
pub const TUNNELS_AFTER_CONNECT: Duration = Duration::from_millis(500);
/// See [`TUNNELS_AFTER_CONNECT`].
pub const TUNNELS_WITHOUT_CONTROLLER: Duration = Duration::from_secs(3);
/// How long a member waits, after switching keys, for the network to confirm before it tries the other
/// key (and again after each try, until it knows which key the hub has).
pub const ROTATION_CONFIRM: Duration = Duration::from_secs(30);
/// How long a member waits, after a new key could not be saved or sent (a full or read-only state
/// directory, no session), before it makes and offers another one while the network still asks. A new
/// session or a change of the network tries sooner.
pub const OFFER_RETRY: Duration = Duration::from_secs(30);
/// How long a member goes without a sync session, after start or after one ended, before it asks the
/// controller's join service where it stands. Short: the question is one TLS exchange, and a removed
/// member should stop within seconds of noticing that its session is gone.
pub const STANDING_WITHOUT_SESSION: Duration = Duration::from_secs(2);
/// How often a member asks again while it still has no session (the hub away, the member disabled).
pub const STANDING_AGAIN: Duration = Duration::from_secs(30);

/// What the host must do for the member, in the order given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Send this to the hub in the current session (dropped if none is up: a message belongs to the
    /// session it was made in).
    Send(ToHub),
    /// Send this to the hub and report with [`Member::handle_acknowledged`] once the hub's host has
    /// acknowledged it, or the session ended first (or none was up).
    SendAcknowledged(ToHub),
    /// Save this key next to the current one (so a restart still has it), then send its public half to
    /// the hub ([`ToHub::NewKey`]); report a failure to save or send with [`Member::handle_offer_failed`]
    /// (the rotation is then postponed: offered again after [`OFFER_RETRY`]).
    OfferKey(PrivateKey),
    /// Make the interface use this private key; report with [`Member::handle_key_used`].
    UseKey(PrivateKey),
    /// Forget the saved next key (the hub does not have it).
    DiscardNextKey,
    /// The saved next key becomes this host's key (the hub has it); report with
    /// [`Member::handle_promoted`]. A failure (a read-only state directory) leaves the next key saved,
    /// so a restart still has it; the promotion is tried again after [`OFFER_RETRY`], and no new
    /// rotation starts until it is done (it would replace the saved next key).
    PromoteNextKey,
    /// Cache [`Member::member_state`], so the host starts from it without a controller.
    CacheState,
    /// Plan this host from [`Member::member_state`] and apply the difference; open a tunnel to every
    /// peer added or replaced that has an endpoint.
    Reconcile,
    /// Open a tunnel to every peer whose endpoint the interface knows.
    OpenKnownTunnels,
    /// Ask the controller's join service ([`MemberState::hub`]) where these keys stand (the key the
    /// network knows this host by, and the other key of a rotation under way); report the answer with
    /// [`Member::handle_standing`]: the server's, if it proved the join certificate, else none.
    AskStanding(Vec<PublicKey>),
    /// This host is no longer a member of the network: take it down and stop.
    Removed {
        /// The network it left.
        network: Label,
    },
}

/// Which of a rotation's two keys the interface uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Using {
    Old,
    New,
}

impl Using {
    fn other(self) -> Using {
        match self {
            Using::Old => Using::New,
            Using::New => Using::Old,
        }
    }
}

/// A key rotation, as far as it got.
#[derive(Debug)]
enum Rotation {
    Idle,
    /// The new key was offered to the hub in the current session.
    Offered(PrivateKey),
    /// The hub accepted it; the switch is on its way to the hub.
    Acknowledging(PrivateKey),
    /// The switch may have reached the hub: it has one of the two keys, and the member does not know
    /// which yet. The interface uses (or is being switched to) `using` since `since`; `switched` is when
    /// the interface last took a key during the rotation, if it did.
    Unsettled {
        new: PrivateKey,
        using: Using,
        since: Instant,
        switched: Option<Instant>,
    },
}

/// A member's end of the sync protocol. See the module documentation.
#[derive(Debug)]
pub struct Member {
    member: MemberState,
    digest: String,
    /// The key the network knows this host by, as far as the member knows (`private.key`).
    key: PrivateKey,
    rotation: Rotation,
    /// When to offer a new key again after an offer could not be saved or sent.
    offer_again_at: Option<Instant>,
    /// Offers in a row that could not be saved or sent (only the first is worth a warning).
    offers_failed: u32,
    /// The next key is being made, or waits to be made, this host's saved key ([`Effect::PromoteNextKey`]).
    promoting: bool,
    /// When to try that again after it failed.
    promote_again_at: Option<Instant>,
    open_tunnels_at: Option<Instant>,
    /// A sync session with the hub is up.
    connected: bool,
    /// When to ask where this host stands: none while a session is up, while a question is out, or
    /// without the join service's address (a member that joined before meshd kept it).
    ask_standing_at: Option<Instant>,
    /// A question is out (answered by [`Member::handle_standing`]).
    asking: bool,
    /// The last standing heard, so a lasting one is logged once.
    heard: Option<Standing>,
    removed: bool,
    effects: VecDeque<Effect>,
}

impl Member {
    /// A member starting at `now` from its cached `member` state, with `key` (`private.key`) and the
    /// `next` key of a rotation that was under way, if one was saved. Which key the interface starts
    /// with is [`Member::interface_key`]: the next key if the cached state names it (the rotation is
    /// then finished), else `key`, keeping `next` until the member knows which one the hub has.
    pub fn new(member: MemberState, key: PrivateKey, next: Option<PrivateKey>, now: Instant) -> Member {
        let ask_standing_at = member.hub.is_some().then(|| now + STANDING_WITHOUT_SESSION);
        let mut m = Member {
            digest: sync::digest(&member.state),
            member,
            key,
            rotation: Rotation::Idle,
            offer_again_at: None,
            offers_failed: 0,
            promoting: false,
            promote_again_at: None,
            open_tunnels_at: Some(now + TUNNELS_WITHOUT_CONTROLLER),
            connected: false,
            ask_standing_at,
            asking: false,
            heard: None,
            removed: false,
            effects: VecDeque::new(),
        };
        if let Some(next) = next {
            if m.named_key().is_some_and(|k| k == next.public_key()) {
                info!("finishing an interrupted key rotation");
                m.promote();
                m.key = next;
            } else {
                info!("a key rotation was under way: keeping both keys until the hub is reached");
                m.rotation = Rotation::Unsettled { new: next, using: Using::Old, since: now, switched: None };
            }
        }
        m
    }

    /// The member's name and its copy of the network.
    pub fn member_state(&self) -> &MemberState {
        &self.member
    }

    /// The digest of the member's copy ([`sync::digest`]): what it says in its hello.
    pub fn digest(&self) -> &str {
        &self.digest
    }

    /// The key the network knows this host by, as far as the member knows (the new one once settled).
    pub fn key(&self) -> &PrivateKey {
        &self.key
    }

    /// The key the interface uses (or is being switched to).
    pub fn interface_key(&self) -> &PrivateKey {
        match &self.rotation {
            Rotation::Unsettled { new, using: Using::New, .. } => new,
            _ => &self.key,
        }
    }

    /// True when a key rotation is under way.
    pub fn is_rotating(&self) -> bool {
        !matches!(self.rotation, Rotation::Idle)
    }

    /// A session with the hub started, its connection made at `at` (the hello with [`Member::digest`] is
    /// sent). The hub admits only the key it has, so the key the interface used at `at` is the one it
    /// has: the current one, or the other if the interface switched keys after `at`.
    pub fn handle_connected(&mut self, at: Instant) {
        self.connected = true;
        self.ask_standing_at = None;
        if self.heard.take() == Some(Standing::Disabled) {
            info!("the hub takes this host back: it was enabled again");
        }
        if self.open_tunnels_at.is_some() {
            self.open_tunnels_at = Some(at + TUNNELS_AFTER_CONNECT);
        }
        if let Rotation::Unsettled { new, using, switched, .. } = &self.rotation {
            let proven = match switched {
                Some(switched) if at < *switched => using.other(),
                _ => *using,
            };
            if proven != *using {
                // The interface must go back to the key the connection was made with.
                let key = if proven == Using::New { new.clone() } else { self.key.clone() };
                self.effects.push_back(Effect::UseKey(key));
            }
            self.settle(proven);
        }
        self.offer_key_if_asked();
    }

    /// The session with the hub ended. An offer made in it is void (the hub forgets it with the
    /// session); a switch not yet known to have arrived may still have: both keys are kept.
    pub fn handle_disconnected(&mut self, now: Instant) {
        self.connected = false;
        if self.member.hub.is_some() && self.ask_standing_at.is_none() && !self.asking {
            self.ask_standing_at = Some(now + STANDING_WITHOUT_SESSION);
        }
        match std::mem::replace(&mut self.rotation, Rotation::Idle) {
            Rotation::Offered(_) => self.effects.push_back(Effect::DiscardNextKey),
            Rotation::Acknowledging(new) => {
                self.rotation = Rotation::Unsettled { new, using: Using::Old, since: now, switched: None };
            }
            other => self.rotation = other,
        }
    }

    /// A message from the hub.
    pub fn handle_message(&mut self, message: ToMember) {
        if self.removed {
            return;
        }
        match message {
            ToMember::State { digest, state } => {
                self.member.state = *state;
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
                    self.offers_failed = 0;
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
    /// session ended before it was known to.
    pub fn handle_acknowledged(&mut self, delivered: bool, now: Instant) {
        let Rotation::Acknowledging(new) = std::mem::replace(&mut self.rotation, Rotation::Idle) else {
            return;
        };
        if delivered {
            self.effects.push_back(Effect::UseKey(new.clone()));
            self.rotation = Rotation::Unsettled { new, using: Using::New, since: now, switched: None };
        } else {
            warn!("the session ended before the key switch was known to reach the hub; keeping both keys");
            self.rotation = Rotation::Unsettled { new, using: Using::Old, since: now, switched: None };
        }
    }

    /// The interface took the key of [`Effect::UseKey`] (`used`), or could not (it keeps the other).
    pub fn handle_key_used(&mut self, used: bool, now: Instant) {
        match &mut self.rotation {
            Rotation::Unsettled { using, since, switched, .. } if used => {
                if *using == Using::New {
                    info!("switched to the new key; waiting for the network to confirm it");
                }
                *since = now;
                *switched = Some(now);
                // Renew every session with this key now rather than at the next keepalive.
                self.effects.push_back(Effect::OpenKnownTunnels);
            }
            Rotation::Unsettled { using, .. } => {
                warn!("switching keys failed; the interface keeps the other key");
                *using = using.other();
            }
            _ => {}
        }
    }

    /// The answer to [`Effect::AskStanding`]: the standing the controller's join service gave, once the
    /// daemon authenticated it, or `None` (no answer, a server that did not prove the join certificate,
    /// a malformed reply). Removed: the member stops ([`Effect::Removed`]); nothing else changes what it
    /// does, and without a session it asks again after [`STANDING_AGAIN`].
    pub fn handle_standing(&mut self, answer: Option<Standing>, now: Instant) {
        self.asking = false;
        if self.removed {
            return;
        }
        let network = &self.member.state.network.name;
        match answer {
            Some(Standing::Removed) => {
                error!(%network, "the controller says this host was removed from the network");
                self.removed = true;
                self.ask_standing_at = None;
                self.effects.push_back(Effect::Removed { network: network.clone() });
                return;
            }
            Some(Standing::Disabled) if self.heard != answer => {
                warn!(%network, node = %self.member.me, "this host is disabled in the network: it waits until the operator enables it again (meshctl node enable)");
            }
            Some(Standing::Unknown) if self.heard != answer => {
                warn!(%network, "the controller does not know this host's key; waiting for the hub");
            }
            Some(Standing::Member) => {
                debug!("the controller counts this host as a member; waiting for the sync session")
            }
            None => debug!("no authenticated answer from the controller's join service; asking again later"),
            Some(_) => {}
        }
        if answer.is_some() {
            self.heard = answer;
        }
        if !self.connected {
            self.ask_standing_at = Some(now + STANDING_AGAIN);
        }
    }

    /// Saving or sending the key of [`Effect::OfferKey`] failed at `now`: it was not offered. The
    /// rotation is postponed: another key is made and offered after [`OFFER_RETRY`], at the next
    /// session or at the next change of the network, whichever comes first, while the network asks.
    pub fn handle_offer_failed(&mut self, now: Instant) {
        if matches!(self.rotation, Rotation::Offered(_)) {
            self.rotation = Rotation::Idle;
            if self.offers_failed == 0 {
                warn!(
                    retry_in_secs = OFFER_RETRY.as_secs(),
                    "the new key could not be saved or offered: rotation postponed"
                );
            } else {
                debug!("the new key could not be saved or offered again");
            }
            self.offers_failed = self.offers_failed.saturating_add(1);
            self.offer_again_at = Some(now + OFFER_RETRY);
        }
    }

    /// The saved next key became this host's key (`saved`), or could not: then it is tried again later.
    pub fn handle_promoted(&mut self, saved: bool, now: Instant) {
        if !self.promoting {
            return;
        }
        if saved {
            self.promoting = false;
            self.promote_again_at = None;
            // A rotation asked for meanwhile waited for this.
            self.offer_key_if_asked();
        } else {
            if self.promote_again_at.is_none() {
                warn!(retry_in_secs = OFFER_RETRY.as_secs(), "the new key could not be saved as this host's key yet");
            }
            self.promote_again_at = Some(now + OFFER_RETRY);
        }
    }

    /// When [`Member::handle_timeout`] is due next, if ever.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let try_other_by = match &self.rotation {
            Rotation::Unsettled { since, .. } => Some(*since + ROTATION_CONFIRM),
            _ => None,
        };
        [self.open_tunnels_at, try_other_by, self.offer_again_at, self.promote_again_at, self.ask_standing_at]
            .into_iter()
            .flatten()
            .min()
    }

    /// Time passed to `now`: open the tunnels once it is time; offer a postponed new key again; while it
    /// is not known which key the hub has, try the other one every [`ROTATION_CONFIRM`]; without a
    /// session, ask where this host stands.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.ask_standing_at.is_some_and(|at| at <= now) && !self.removed {
            self.ask_standing_at = None;
            self.asking = true;
            let mut keys = vec![self.key.public_key()];
            if let Rotation::Unsettled { new, .. } = &self.rotation {
                keys.push(new.public_key());
            }
            self.effects.push_back(Effect::AskStanding(keys));
        }
        if self.open_tunnels_at.is_some_and(|at| at <= now) {
            self.open_tunnels_at = None;
            self.effects.push_back(Effect::OpenKnownTunnels);
        }
        if self.offer_again_at.is_some_and(|at| at <= now) {
            self.offer_again_at = None;
            self.offer_key_if_asked();
        }
        if self.promoting && self.promote_again_at.is_some_and(|at| at <= now) {
            // Stays set until a report: a failure sets the next time, a success clears it.
            self.promote_again_at = Some(now + OFFER_RETRY);
            self.effects.push_back(Effect::PromoteNextKey);
        }
        if let Rotation::Unsettled { new, using, since, .. } = &mut self.rotation
            && *since + ROTATION_CONFIRM <= now
        {
            *since = now;
            let other = match using {
                Using::New => {
                    warn!("the network did not confirm the new key; trying the old one");
                    *using = Using::Old;
                    self.key.clone()
                }
                Using::Old => {
                    warn!("the hub cannot be reached with the old key; trying the new one");
                    *using = Using::New;
                    new.clone()
                }
            };
            self.effects.push_back(Effect::UseKey(other));
        }
    }

    /// The next thing the host must do, if any.
    pub fn poll_effect(&mut self) -> Option<Effect> {
        self.effects.pop_front()
    }

    /// Make the saved next key this host's key, until [`Member::handle_promoted`] says it is done.
    fn promote(&mut self) {
        self.promoting = true;
        self.effects.push_back(Effect::PromoteNextKey);
    }

    /// The hub has the key the member uses as `which`: keep that one, forget the other.
    fn settle(&mut self, which: Using) {
        let Rotation::Unsettled { new, .. } = std::mem::replace(&mut self.rotation, Rotation::Idle) else {
            return;
        };
        match which {
            Using::New => {
                info!("key rotation done");
                self.promote();
                self.key = new;
            }
            Using::Old => {
                info!("the hub has the old key: the new one is dropped");
                self.effects.push_back(Effect::DiscardNextKey);
            }
        }
    }

    /// This host's key as the member's copy of the network names it.
    fn named_key(&self) -> Option<crate::keys::PublicKey> {
        self.member.state.nodes.iter().find(|n| n.name == self.member.me).map(|n| n.public_key.clone())
    }

    /// The copy now has `digest`: cache it, settle a rotation the network confirms, reconcile the host,
    /// and start a rotation the network asks for.
    fn updated(&mut self, digest: String) {
        self.digest = digest;
        self.effects.push_back(Effect::CacheState);
        let Some(named) = self.named_key() else {
            self.removed = true;
            self.effects.push_back(Effect::Removed { network: self.member.state.network.name.clone() });
            return;
        };
        // Only a state naming the new key settles anything: one naming the old key may have been sent
        // before the hub stored the new one.
        if let Rotation::Unsettled { new, using, .. } = &self.rotation
            && named == new.public_key()
        {
            if *using == Using::Old {
                self.effects.push_back(Effect::UseKey(new.clone()));
            }
            self.settle(Using::New);
        }
        self.effects.push_back(Effect::Reconcile);
        self.offer_key_if_asked();
    }

    /// When the network asks this host for a new key and no rotation is under way, make one and offer it.
    /// Not while the copy still names another key than this host's: it predates a rotation just settled.
    fn offer_key_if_asked(&mut self) {
        let asked = self.member.state.nodes.iter().any(|n| n.name == self.member.me && n.rotate_key);
        let current = self.named_key().is_some_and(|k| k == self.key.public_key());
        if !asked || !current || self.is_rotating() || self.promoting || self.removed {
            return;
        }
        let new = PrivateKey::generate();
        if self.offers_failed == 0 {
            info!("the operator asked for a new key: offering one");
        } else {
            debug!("offering a new key again");
        }
        self.offer_again_at = None;
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
        (Member::new(MemberState { me: label("vps"), state, hub: None }, key.clone(), None, now), key)
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
        m.handle_message(ToMember::State { digest: sync::digest(&gone), state: Box::new(gone) });
        assert_eq!(effects(&mut m), [Effect::CacheState, Effect::Removed { network: label("home") }]);
    }

    /// A member that knows the controller's join service (it joined with a token that named it).
    fn member_with_contact(now: Instant) -> (Member, PrivateKey) {
        let key = PrivateKey::generate();
        let mut state = sample_state();
        state.nodes[1].public_key = key.public_key();
        let hub =
            crate::wire::join::HubContact { join: "203.0.113.5:51820".parse().unwrap(), fingerprint: "ab".repeat(32) };
        (Member::new(MemberState { me: label("vps"), state, hub: Some(hub) }, key.clone(), None, now), key)
    }

    /// Effects other than opening tunnels (whose timer runs beside).
    fn asked(m: &mut Member) -> Vec<Effect> {
        effects(m).into_iter().filter(|e| *e != Effect::OpenKnownTunnels).collect()
    }

    #[test]
    fn without_a_session_a_member_asks_where_it_stands_and_stops_only_when_removed() {
        let start = Instant::now();
        let (mut m, key) = member_with_contact(start);
        assert_eq!(m.poll_timeout(), Some(start + STANDING_WITHOUT_SESSION));
        m.handle_timeout(start + STANDING_WITHOUT_SESSION);
        assert_eq!(asked(&mut m), [Effect::AskStanding(vec![key.public_key()])]);
        assert_eq!(m.poll_timeout(), Some(start + TUNNELS_WITHOUT_CONTROLLER), "one question at a time");
        // No answer (the hub away, a server that is not the hub): only the next question is planned.
        let t = start + Duration::from_secs(3);
        m.handle_timeout(t);
        m.handle_standing(None, t);
        assert!(asked(&mut m).is_empty());
        assert_eq!(m.poll_timeout(), Some(t + STANDING_AGAIN));
        // Disabled, or a key the controller does not know: the member waits and asks again.
        for (i, standing) in
            [Standing::Disabled, Standing::Disabled, Standing::Unknown, Standing::Member].into_iter().enumerate()
        {
            let at = t + STANDING_AGAIN * (i as u32 + 1);
            m.handle_timeout(at);
            assert_eq!(asked(&mut m), [Effect::AskStanding(vec![key.public_key()])]);
            m.handle_standing(Some(standing), at);
            assert!(asked(&mut m).is_empty(), "{standing:?} changes nothing");
            assert_eq!(m.poll_timeout(), Some(at + STANDING_AGAIN));
        }
        // Removed: it stops, and asks nothing more.
        m.handle_standing(Some(Standing::Removed), t);
        assert_eq!(asked(&mut m), [Effect::Removed { network: label("home") }]);
        assert_eq!(m.poll_timeout(), None);
        m.handle_standing(Some(Standing::Removed), t);
        assert!(asked(&mut m).is_empty(), "said once");
    }

    #[test]
    fn a_member_with_a_session_asks_nothing_until_it_ends() {
        let start = Instant::now();
        let (mut m, key) = member_with_contact(start);
        m.handle_connected(start + Duration::from_secs(1));
        m.handle_timeout(start + Duration::from_secs(10));
        assert!(asked(&mut m).is_empty());
        assert_eq!(m.poll_timeout(), None);
        let ended = start + Duration::from_secs(20);
        m.handle_disconnected(ended);
        assert_eq!(m.poll_timeout(), Some(ended + STANDING_WITHOUT_SESSION));
        m.handle_timeout(ended + STANDING_WITHOUT_SESSION);
        assert_eq!(asked(&mut m), [Effect::AskStanding(vec![key.public_key()])]);
        // The session ends again while the question is out: one question at a time.
        m.handle_disconnected(ended + STANDING_WITHOUT_SESSION);
        assert_eq!(m.poll_timeout(), None);
        m.handle_standing(None, ended + STANDING_WITHOUT_SESSION);
        assert_eq!(m.poll_timeout(), Some(ended + STANDING_WITHOUT_SESSION + STANDING_AGAIN));
        m.handle_timeout(ended + STANDING_WITHOUT_SESSION + STANDING_AGAIN);
        assert_eq!(asked(&mut m), [Effect::AskStanding(vec![key.public_key()])]);
        // The session is back before the answer: the answer plans no further question.
        m.handle_connected(ended + STANDING_WITHOUT_SESSION);
        m.handle_standing(Some(Standing::Member), ended + STANDING_WITHOUT_SESSION);
        assert_eq!(m.poll_timeout(), None);

        // A member that joined before meshd kept the join service's address never asks.
        let (mut old, _) = member(start);
        old.handle_timeout(start + Duration::from_secs(60));
        old.handle_disconnected(start + Duration::from_secs(60));
        old.handle_timeout(start + Duration::from_secs(120));
        assert!(asked(&mut old).is_empty());
    }

    #[test]
    fn a_member_rotating_its_key_asks_for_both_keys() {
        let start = Instant::now();
        let (m, old, new) = switching(start);
        let mut state = m.member_state().clone();
        state.hub = Some(crate::wire::join::HubContact {
            join: "203.0.113.5:51820".parse().unwrap(),
            fingerprint: "ab".repeat(32),
        });
        let mut restarted = Member::new(state, old.clone(), Some(new.clone()), start);
        restarted.handle_timeout(start + STANDING_WITHOUT_SESSION);
        assert_eq!(asked(&mut restarted), [Effect::AskStanding(vec![old.public_key(), new.public_key()])]);
    }

    /// A member asked for a new key, with the offer made and accepted: it has sent `switch`.
    fn switching(start: Instant) -> (Member, PrivateKey, PrivateKey) {
        let (mut m, old) = member(start);
        m.handle_timeout(start + TUNNELS_WITHOUT_CONTROLLER);
        assert_eq!(effects(&mut m), [Effect::OpenKnownTunnels]);
        let mut asked = m.member_state().state.clone();
        asked.nodes[1].rotate_key = true;
        m.handle_message(ToMember::State { digest: sync::digest(&asked), state: Box::new(asked) });
        let new = match &effects(&mut m)[..] {
            [Effect::CacheState, Effect::Reconcile, Effect::OfferKey(new)] => new.clone(),
            other => panic!("{other:?}"),
        };
        assert_ne!(new, old);
        m.handle_message(ToMember::KeyAccepted);
        assert_eq!(effects(&mut m), [Effect::SendAcknowledged(ToHub::Switch)]);
        (m, old, new)
    }

    fn confirming(m: &Member, new: &PrivateKey) -> ToMember {
        let mut confirmed = m.member_state().state.clone();
        confirmed.nodes[1].public_key = new.public_key();
        confirmed.nodes[1].rotate_key = false;
        ToMember::State { digest: sync::digest(&confirmed), state: Box::new(confirmed) }
    }

    #[test]
    fn a_rotation_switches_after_delivery_and_finishes_when_the_network_names_the_new_key() {
        let start = Instant::now();
        let (mut m, _, new) = switching(start);
        m.handle_acknowledged(true, start);
        assert_eq!(effects(&mut m), [Effect::UseKey(new.clone())]);
        m.handle_key_used(true, start);
        assert_eq!(effects(&mut m), [Effect::OpenKnownTunnels]);
        assert_eq!(m.interface_key(), &new);
        // A change sent before the hub stored the key still names the old one: it settles nothing.
        let mut unrelated = m.member_state().state.clone();
        unrelated.rules.push(crate::model::AccessRule { from: label("vps"), to: label("attic") });
        m.handle_message(ToMember::State { digest: sync::digest(&unrelated), state: Box::new(unrelated) });
        assert_eq!(effects(&mut m), [Effect::CacheState, Effect::Reconcile]);
        assert!(m.is_rotating());
        m.handle_message(confirming(&m, &new));
        assert_eq!(effects(&mut m), [Effect::CacheState, Effect::PromoteNextKey, Effect::Reconcile]);
        assert_eq!((m.key(), m.interface_key()), (&new, &new));
        assert!(!m.is_rotating());
    }

    #[test]
    fn an_offer_refused_or_lost_with_its_session_is_dropped_and_made_again() {
        let start = Instant::now();
        let (mut m, old) = member(start);
        let mut asked = m.member_state().state.clone();
        asked.nodes[1].rotate_key = true;
        m.handle_message(ToMember::State { digest: sync::digest(&asked), state: Box::new(asked) });
        effects(&mut m);
        m.handle_message(ToMember::Refused { reason: "the key is in use".into() });
        assert_eq!(effects(&mut m), [Effect::DiscardNextKey]);
        assert!(!m.is_rotating());
        m.handle_connected(start);
        assert!(matches!(effects(&mut m)[..], [Effect::OfferKey(_)]), "offered again at the next session");
        m.handle_disconnected(start);
        assert_eq!(effects(&mut m), [Effect::DiscardNextKey], "the hub forgets an offer with its session");
        m.handle_connected(start);
        assert!(matches!(effects(&mut m)[..], [Effect::OfferKey(_)]));
        assert_eq!(m.key(), &old);
    }

    #[test]
    fn a_new_key_that_cannot_be_saved_is_offered_again_later_until_it_can() {
        let start = Instant::now();
        let later = |secs| start + Duration::from_secs(secs);
        let (mut m, old) = member(start);
        m.handle_timeout(start + TUNNELS_WITHOUT_CONTROLLER);
        effects(&mut m);
        let mut asked = m.member_state().state.clone();
        asked.nodes[1].rotate_key = true;
        m.handle_message(ToMember::State { digest: sync::digest(&asked), state: Box::new(asked.clone()) });
        let Some(Effect::OfferKey(first)) = effects(&mut m).pop() else { panic!("an offer") };
        // The state directory is full: nothing was offered, and the member tries again in a while.
        m.handle_offer_failed(later(4));
        assert!(effects(&mut m).is_empty() && !m.is_rotating());
        assert_eq!(m.poll_timeout(), Some(later(4) + OFFER_RETRY));
        m.handle_timeout(later(20));
        assert!(effects(&mut m).is_empty(), "not before its time");
        m.handle_timeout(later(4) + OFFER_RETRY);
        let Some(Effect::OfferKey(second)) = effects(&mut m).pop() else { panic!("offered again") };
        assert_ne!(second, first, "a fresh key: the first was never saved");
        // Still full: again later. Then space is back: the offer goes through and the rotation goes on.
        m.handle_offer_failed(later(34));
        assert_eq!(m.poll_timeout(), Some(later(34) + OFFER_RETRY));
        m.handle_timeout(later(34) + OFFER_RETRY);
        assert!(matches!(effects(&mut m)[..], [Effect::OfferKey(_)]));
        assert_eq!(m.poll_timeout(), None, "no retry once offered");
        m.handle_message(ToMember::KeyAccepted);
        assert_eq!(effects(&mut m), [Effect::SendAcknowledged(ToHub::Switch)]);
        assert_eq!(m.key(), &old);

        // A retry due after the network stopped asking (the node was disabled) offers nothing.
        let (mut m, _) = member(start);
        m.handle_timeout(start + TUNNELS_WITHOUT_CONTROLLER);
        m.handle_message(ToMember::State { digest: sync::digest(&asked), state: Box::new(asked.clone()) });
        effects(&mut m);
        m.handle_offer_failed(later(4));
        let mut disabled = asked;
        disabled.nodes[1].rotate_key = false;
        disabled.nodes[1].disabled = true;
        m.handle_message(ToMember::State { digest: sync::digest(&disabled), state: Box::new(disabled) });
        effects(&mut m);
        m.handle_timeout(later(4) + OFFER_RETRY);
        assert!(effects(&mut m).is_empty() && !m.is_rotating());
        assert_eq!(m.poll_timeout(), None);
    }

    #[test]
    fn a_new_key_that_cannot_become_the_saved_key_is_kept_and_tried_again_before_any_new_rotation() {
        let start = Instant::now();
        let later = |secs| start + Duration::from_secs(secs);
        let (mut m, _, new) = switching(start);
        m.handle_acknowledged(true, start);
        m.handle_key_used(true, start);
        effects(&mut m);
        // Confirmed, but the state directory went read-only: the rename fails, the daemon runs on.
        m.handle_message(confirming(&m, &new));
        assert_eq!(effects(&mut m), [Effect::CacheState, Effect::PromoteNextKey, Effect::Reconcile]);
        m.handle_promoted(false, later(1));
        assert_eq!((m.key(), m.interface_key()), (&new, &new));
        assert_eq!(m.poll_timeout(), Some(later(1) + OFFER_RETRY));
        // The operator asks again meanwhile: no new key may replace the saved next key before it is promoted.
        let mut asked = m.member_state().state.clone();
        asked.nodes[1].rotate_key = true;
        m.handle_message(ToMember::State { digest: sync::digest(&asked), state: Box::new(asked) });
        assert_eq!(effects(&mut m), [Effect::CacheState, Effect::Reconcile]);
        m.handle_timeout(later(1) + OFFER_RETRY);
        assert_eq!(effects(&mut m), [Effect::PromoteNextKey]);
        m.handle_promoted(false, later(31));
        m.handle_timeout(later(61));
        assert_eq!(effects(&mut m), [Effect::PromoteNextKey]);
        // Writable again: promoted, and the rotation asked for meanwhile starts.
        m.handle_promoted(true, later(61));
        assert!(matches!(effects(&mut m)[..], [Effect::OfferKey(_)]));
        assert_eq!(m.poll_timeout(), None);
    }

    #[test]
    fn after_a_switch_both_keys_are_kept_until_a_session_shows_which_one_the_hub_has() {
        let start = Instant::now();
        let later = |secs| start + Duration::from_secs(secs);
        // The switch may have arrived although its delivery was not confirmed: the old key stays in use.
        let (mut m, old, new) = switching(start);
        m.handle_acknowledged(false, start);
        assert!(effects(&mut m).is_empty());
        assert_eq!(m.interface_key(), &old);
        // No session for a while: the new key is tried, then the old one again, and so on.
        m.handle_timeout(later(30));
        assert_eq!(effects(&mut m), [Effect::UseKey(new.clone())]);
        m.handle_key_used(true, later(30));
        assert_eq!(effects(&mut m), [Effect::OpenKnownTunnels]);
        m.handle_timeout(later(60));
        assert_eq!(effects(&mut m), [Effect::UseKey(old.clone())]);
        m.handle_key_used(true, later(60));
        effects(&mut m);
        m.handle_timeout(later(90));
        assert_eq!(effects(&mut m), [Effect::UseKey(new.clone())]);
        m.handle_key_used(true, later(90));
        effects(&mut m);
        // A session opens with the new key: the hub has it.
        m.handle_connected(later(95));
        assert_eq!(effects(&mut m), [Effect::PromoteNextKey]);
        assert_eq!(m.key(), &new);
        assert!(!m.is_rotating());

        // Likewise a session opened with the old key drops the new one, and a new offer follows while
        // the network still asks.
        let (mut m, old, _) = switching(start);
        m.handle_acknowledged(true, start);
        m.handle_key_used(true, start);
        effects(&mut m);
        m.handle_timeout(later(30));
        assert_eq!(effects(&mut m), [Effect::UseKey(old.clone())]);
        m.handle_key_used(true, later(30));
        effects(&mut m);
        m.handle_connected(later(31));
        assert!(matches!(&effects(&mut m)[..], [Effect::DiscardNextKey, Effect::OfferKey(_)]));
        assert_eq!(m.key(), &old);
    }

    #[test]
    fn a_session_made_just_before_a_key_switch_proves_the_key_it_was_made_with() {
        let start = Instant::now();
        let later = |secs| start + Duration::from_secs(secs);
        let (mut m, old, new) = switching(start);
        m.handle_acknowledged(false, start);
        m.handle_timeout(later(30));
        assert_eq!(effects(&mut m), [Effect::UseKey(new.clone())]);
        m.handle_key_used(true, later(30));
        effects(&mut m);
        // The connection was made with the old key, a moment before the interface took the new one.
        m.handle_connected(later(29));
        let after = effects(&mut m);
        assert_eq!(after[..2], [Effect::UseKey(old.clone()), Effect::DiscardNextKey]);
        assert!(matches!(after[2..], [Effect::OfferKey(_)]), "the network still asks: another offer");
        assert_eq!(m.key(), &old);
    }

    #[test]
    fn a_restart_mid_rotation_finishes_it_or_keeps_both_keys() {
        let start = Instant::now();
        let (m, old, new) = switching(start);
        // Restarted after the network named the new key: finished at once.
        let mut confirmed = m.member_state().clone();
        confirmed.state.nodes[1].public_key = new.public_key();
        let mut restarted = Member::new(confirmed, old.clone(), Some(new.clone()), start);
        assert_eq!(effects(&mut restarted), [Effect::PromoteNextKey]);
        assert_eq!(restarted.interface_key(), &new);
        // Restarted before: it starts on the old key and keeps the new one until it reaches the hub.
        let mut unsure = Member::new(m.member_state().clone(), old.clone(), Some(new.clone()), start);
        assert!(effects(&mut unsure).is_empty() && unsure.is_rotating());
        assert_eq!(unsure.interface_key(), &old);
        unsure.handle_timeout(start + ROTATION_CONFIRM);
        assert_eq!(effects(&mut unsure), [Effect::OpenKnownTunnels, Effect::UseKey(new.clone())]);
    }
}
