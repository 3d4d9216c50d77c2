//! The hub's end of the sync protocol: the [`Journal`] of what it published (the current state, its
//! digest, the recent changes as ready-made lines, which addresses belong to active members) and a
//! [`HubSession`] per connected member, a state machine that answers the member's hello with a catch-up,
//! and keeps the bookkeeping of a key offer (checked by the controller, then switched to).
//!
//! The daemon's `links::sync` carries both out: it owns the sockets, the broadcast of new lines to every
//! session and the calls to the controller.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::acme::renewal::Status;
use crate::input::{Label, PublicName};
use crate::keys::PublicKey;
use crate::model::{Role, SharedState};
use crate::wire::sync::{self, Change, OnionReport, ToHub, ToMember, line};

/// How many past changes the hub keeps to catch up a member that missed some.
pub const LOG_LEN: usize = 256;
/// How long a member has to say hello after connecting.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(5);

/// What the hub published: the current state and the recent changes. See the module documentation.
#[derive(Debug, Clone)]
pub struct Journal {
    state: SharedState,
    digest: String,
    /// Active member nodes (a session whose node leaves this set is closed), by mesh address.
    members: HashMap<IpAddr, Label>,
    /// (digest before, serialised `Changes` line) of recent changes, oldest first.
    log: VecDeque<(String, Arc<str>)>,
    /// The whole state as a `State` line, made on first need after each change.
    full: Option<Arc<str>>,
}

/// A change to publish, prepared from the journal and a new state (see [`Journal::prepare`]).
#[derive(Debug)]
pub struct Prepared {
    state: SharedState,
    digest: String,
    members: HashMap<IpAddr, Label>,
    from: String,
    changes: Vec<Change>,
}

impl Journal {
    /// A journal whose current state is `state`, with no past changes (a hub just started).
    pub fn new(state: SharedState) -> Journal {
        Journal { digest: sync::digest(&state), members: members_of(&state), state, log: VecDeque::new(), full: None }
    }

    /// The current state.
    pub fn state(&self) -> &SharedState {
        &self.state
    }

    /// The digest of the current state.
    pub fn digest(&self) -> &str {
        &self.digest
    }

    /// What publishing `state` takes, worked out from a shared borrow (the hub does this outside its
    /// write lock); `None` if nothing changed.
    pub fn prepare(&self, state: SharedState) -> Option<Prepared> {
        let changes = sync::changes(&self.state, &state);
        if changes.is_empty() {
            return None;
        }
        Some(Prepared {
            digest: sync::digest(&state),
            members: members_of(&state),
            state,
            from: self.digest.clone(),
            changes,
        })
    }

    /// Make the prepared state the current one; returns the `Changes` line every live session sends.
    pub fn commit(&mut self, prepared: Prepared) -> Arc<str> {
        let Prepared { state, digest, members, from, changes } = prepared;
        let message = line(&ToMember::Changes { from, to: digest.clone(), changes });
        let from = std::mem::replace(&mut self.digest, digest);
        self.log.push_back((from, message.clone()));
        if self.log.len() > LOG_LEN {
            self.log.pop_front();
        }
        self.members = members;
        self.state = state;
        self.full = None;
        message
    }

    /// [`Journal::prepare`] and [`Journal::commit`] in one; `None` if nothing changed.
    pub fn publish(&mut self, state: SharedState) -> Option<Arc<str>> {
        let prepared = self.prepare(state)?;
        Some(self.commit(prepared))
    }

    /// The whole state as one `State` line.
    pub fn full_line(&mut self) -> Arc<str> {
        let (state, digest) = (&self.state, &self.digest);
        self.full
            .get_or_insert_with(|| line(&ToMember::State { digest: digest.clone(), state: Box::new(state.clone()) }))
            .clone()
    }

    /// What a member whose state has `digest` must receive to be current: nothing, the changes it
    /// missed (if the journal still has them), or the whole state.
    pub fn catch_up(&mut self, digest: &str) -> Vec<Arc<str>> {
        if digest == self.digest {
            return Vec::new();
        }
        match self.log.iter().position(|(from, _)| from == digest) {
            Some(start) => self.log.iter().skip(start).map(|(_, l)| l.clone()).collect(),
            None => vec![self.full_line()],
        }
    }

    /// The active member whose mesh address is `addr`, if any.
    pub fn member(&self, addr: IpAddr) -> Option<&Label> {
        self.members.get(&addr)
    }
}

/// Active members other than the hub, by both of their mesh addresses.
fn members_of(state: &SharedState) -> HashMap<IpAddr, Label> {
    let pool = state.network.pool();
    state
        .nodes
        .iter()
        .filter(|n| n.active() && n.role != Role::Hub)
        .flat_map(|n| {
            [(IpAddr::V4(pool.v4_of(n.index)), n.name.clone()), (IpAddr::V6(pool.v6_of(n.index)), n.name.clone())]
        })
        .collect()
}

/// What the hub must do for one member's session, in the order given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Send the member what brings a state of `digest` up to date ([`Journal::catch_up`]), then every
    /// change published after it.
    CatchUp {
        /// The digest the member said it has.
        digest: String,
    },
    /// Send this to the member.
    Send(ToMember),
    /// Ask the controller whether `public_key` is a valid key no other peer uses; report with
    /// [`HubSession::handle_key_verdict`].
    CheckKey {
        /// The key the member offers.
        public_key: PublicKey,
    },
    /// Tell the controller the member switches to `public_key` now (it was accepted).
    SwitchKey {
        /// The accepted key.
        public_key: PublicKey,
    },
    /// Keep what the member reports of the certificates it holds (the hub checks which names it holds).
    Certificates(BTreeMap<PublicName, Status>),
    /// Keep what the member reports of the onion services it serves (the hub keeps only its own services').
    Onions(BTreeMap<Label, OnionReport>),
    /// End the session.
    Close(&'static str),
}

/// Where a session is.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    /// Connected; the member must say hello by this time.
    AwaitingHello(Instant),
    Live,
    Closed,
}

/// The hub's end of one member's session. See the module documentation.
#[derive(Debug)]
pub struct HubSession {
    node: Label,
    phase: Phase,
    /// A key being checked by the controller.
    checking: Option<PublicKey>,
    /// The key the controller accepted, until the member switches to it.
    offered: Option<PublicKey>,
    effects: VecDeque<Effect>,
}

impl HubSession {
    /// A session of member `node` that connected at `now`.
    pub fn new(node: Label, now: Instant) -> HubSession {
        HubSession {
            node,
            phase: Phase::AwaitingHello(now + HELLO_TIMEOUT),
            checking: None,
            offered: None,
            effects: VecDeque::new(),
        }
    }

    /// The member this session belongs to.
    pub fn node(&self) -> &Label {
        &self.node
    }

    /// True once the session must end (the host closes the connection).
    pub fn is_closed(&self) -> bool {
        self.phase == Phase::Closed
    }

    /// A line the member sent (without its newline).
    pub fn handle_line(&mut self, text: &str) {
        let message = serde_json::from_str::<ToHub>(text);
        match (&self.phase, message) {
            (Phase::Closed, _) => {}
            (Phase::AwaitingHello(_), Ok(ToHub::Hello { digest })) => {
                self.phase = Phase::Live;
                self.effects.push_back(Effect::CatchUp { digest });
            }
            (Phase::AwaitingHello(_), _) => self.close("expected hello"),
            (Phase::Live, Ok(ToHub::Hello { digest })) => self.effects.push_back(Effect::CatchUp { digest }),
            (Phase::Live, Ok(ToHub::NewKey { public_key })) => {
                self.checking = Some(public_key.clone());
                self.effects.push_back(Effect::CheckKey { public_key });
            }
            (Phase::Live, Ok(ToHub::Certificates { certificates })) => {
                self.effects.push_back(Effect::Certificates(certificates));
            }
            (Phase::Live, Ok(ToHub::Onions { onions })) => self.effects.push_back(Effect::Onions(onions)),
            (Phase::Live, Ok(ToHub::Switch)) => match self.offered.take() {
                Some(public_key) => self.effects.push_back(Effect::SwitchKey { public_key }),
                None => self.send(ToMember::Refused { reason: "no key was accepted to switch to".into() }),
            },
            (Phase::Live, Err(e)) => self.send(ToMember::Refused { reason: format!("malformed message: {e}") }),
        }
    }

    /// The controller's verdict on the key of [`Effect::CheckKey`]: accepted, or refused with a reason.
    pub fn handle_key_verdict(&mut self, verdict: Result<(), String>) {
        let Some(public_key) = self.checking.take() else { return };
        match verdict {
            Ok(()) => {
                self.offered = Some(public_key);
                self.send(ToMember::KeyAccepted);
            }
            Err(reason) => self.send(ToMember::Refused { reason }),
        }
    }

    /// Something was published; `still_member` says whether the session's node is still an active
    /// member at the address it connected from. A session of a node that left is closed.
    pub fn handle_published(&mut self, still_member: bool) {
        if !still_member {
            self.close("no longer an active member");
        }
    }

    /// When [`HubSession::handle_timeout`] is due, if ever.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.phase {
            Phase::AwaitingHello(deadline) => Some(deadline),
            _ => None,
        }
    }

    /// Time passed to `now`: a member that did not say hello in time is dropped.
    pub fn handle_timeout(&mut self, now: Instant) {
        if let Phase::AwaitingHello(deadline) = self.phase
            && deadline <= now
        {
            self.close("no hello");
        }
    }

    /// The next thing the host must do for this session, if any.
    pub fn poll_effect(&mut self) -> Option<Effect> {
        self.effects.pop_front()
    }

    fn send(&mut self, message: ToMember) {
        self.effects.push_back(Effect::Send(message));
    }

    fn close(&mut self, reason: &'static str) {
        self.phase = Phase::Closed;
        self.effects.push_back(Effect::Close(reason));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{label, named_key, sample_state as state};
    use crate::model::AccessRule;

    #[test]
    fn catch_up_sends_nothing_the_missed_changes_or_everything() {
        let mut journal = Journal::new(state());
        let d0 = journal.digest().to_owned();
        let mut s = state();
        s.nodes[1].endpoint = Some("198.51.100.3:51820".parse().unwrap());
        assert!(journal.publish(s.clone()).is_some());
        assert!(journal.publish(s.clone()).is_none(), "an identical state is no change");
        let d1 = journal.digest().to_owned();
        s.rules.push(AccessRule { from: label("vps"), to: label("attic") });
        journal.publish(s);
        let current = journal.digest().to_owned();
        assert!(journal.catch_up(&current).is_empty());
        let missed = journal.catch_up(&d0);
        assert_eq!(missed.len(), 2);
        assert!(missed[0].contains(&d0) && missed[1].contains(&d1));
        let unknown = journal.catch_up("something else");
        assert_eq!(unknown.len(), 1);
        assert!(matches!(serde_json::from_str::<ToMember>(&unknown[0]).unwrap(), ToMember::State { .. }));
    }

    fn now() -> Instant {
        Instant::now()
    }

    fn effects(session: &mut HubSession) -> Vec<Effect> {
        std::iter::from_fn(|| session.poll_effect()).collect()
    }

    #[test]
    fn a_member_must_say_hello_first_and_in_time() {
        let start = now();
        let mut quiet = HubSession::new(label("vps"), start);
        assert_eq!(quiet.poll_timeout(), Some(start + HELLO_TIMEOUT));
        quiet.handle_timeout(start + HELLO_TIMEOUT - Duration::from_millis(1));
        assert!(effects(&mut quiet).is_empty());
        quiet.handle_timeout(start + HELLO_TIMEOUT);
        assert_eq!(effects(&mut quiet), [Effect::Close("no hello")]);
        assert!(quiet.is_closed());

        let mut rude = HubSession::new(label("vps"), start);
        rude.handle_line(r#"{"msg":"switch"}"#);
        assert_eq!(effects(&mut rude), [Effect::Close("expected hello")]);

        let mut polite = HubSession::new(label("vps"), start);
        polite.handle_line(r#"{"msg":"hello","digest":"d1"}"#);
        assert_eq!(effects(&mut polite), [Effect::CatchUp { digest: "d1".into() }]);
        assert_eq!(polite.poll_timeout(), None);
    }

    #[test]
    fn a_key_is_switched_to_only_after_the_controller_accepted_it() {
        let mut session = HubSession::new(label("vps"), now());
        session.handle_line(r#"{"msg":"hello","digest":"d1"}"#);
        effects(&mut session);
        session.handle_line(r#"{"msg":"switch"}"#);
        assert_eq!(
            effects(&mut session),
            [Effect::Send(ToMember::Refused { reason: "no key was accepted to switch to".into() })]
        );
        let (k1, k2) = (named_key("K1"), named_key("K2"));
        session.handle_line(&format!(r#"{{"msg":"new_key","public_key":"{k1}"}}"#));
        assert_eq!(effects(&mut session), [Effect::CheckKey { public_key: k1 }]);
        session.handle_key_verdict(Err("the key is in use".into()));
        assert_eq!(effects(&mut session), [Effect::Send(ToMember::Refused { reason: "the key is in use".into() })]);
        session.handle_line(r#"{"msg":"switch"}"#);
        assert!(
            matches!(effects(&mut session)[..], [Effect::Send(ToMember::Refused { .. })]),
            "a refused key is not switched to"
        );
        session.handle_line(&format!(r#"{{"msg":"new_key","public_key":"{k2}"}}"#));
        effects(&mut session);
        session.handle_key_verdict(Ok(()));
        assert_eq!(effects(&mut session), [Effect::Send(ToMember::KeyAccepted)]);
        session.handle_line(r#"{"msg":"switch"}"#);
        assert_eq!(effects(&mut session), [Effect::SwitchKey { public_key: k2 }]);
        session.handle_line("not json");
        assert!(
            matches!(&effects(&mut session)[..], [Effect::Send(ToMember::Refused { reason })] if reason.starts_with("malformed message"))
        );
    }

    #[test]
    fn a_session_closes_when_its_node_is_no_longer_an_active_member() {
        let mut journal = Journal::new(state());
        let vps = journal.state().network.pool().v4_of(2);
        assert_eq!(journal.member(IpAddr::V4(vps)), Some(&label("vps")));
        assert_eq!(journal.member(IpAddr::V4(journal.state().network.pool().v4_of(1))), None, "the hub is no member");
        let mut s = state();
        s.nodes[1].disabled = true;
        journal.publish(s);
        assert_eq!(journal.member(IpAddr::V4(vps)), None);
        let mut session = HubSession::new(label("vps"), now());
        session.handle_published(true);
        assert!(effects(&mut session).is_empty());
        session.handle_published(false);
        assert_eq!(effects(&mut session), [Effect::Close("no longer an active member")]);
    }

    #[test]
    fn a_live_members_certificate_report_is_passed_on_and_one_before_hello_closes_the_session() {
        let report =
            r#"{"msg":"certificates","certificates":{"pay.shop.example":{"state":"valid","until":1900000000}}}"#;
        let mut session = HubSession::new(label("vps"), now());
        session.handle_line(r#"{"msg":"hello","digest":"d1"}"#);
        effects(&mut session);
        session.handle_line(report);
        let Some(Effect::Certificates(certificates)) = session.poll_effect() else { panic!("no report") };
        let name: PublicName = "pay.shop.example".parse().unwrap();
        assert_eq!(certificates[&name], Status::Valid { until: 1_900_000_000, last_error: None, retry_at: None });
        let mut early = HubSession::new(label("vps"), now());
        early.handle_line(report);
        assert!(early.is_closed(), "a report is no hello");
    }

    #[test]
    fn a_live_members_onion_report_is_passed_on_and_a_bad_address_refused() {
        let address = crate::tor::onion::OnionKey::from_seed([5; 32]).address();
        let report = format!(
            r#"{{"msg":"onions","onions":{{"btcpay":{{"address":"{address}"}},"electrs":{{"error":"no tor"}}}}}}"#
        );
        let mut session = HubSession::new(label("home"), now());
        session.handle_line(r#"{"msg":"hello","digest":"d1"}"#);
        effects(&mut session);
        session.handle_line(&report);
        let Some(Effect::Onions(onions)) = session.poll_effect() else { panic!("no report") };
        assert_eq!(onions[&label("btcpay")], OnionReport::Address(address.clone()));
        assert_eq!(onions[&label("electrs")], OnionReport::Error("no tor".into()));
        session.handle_line(&report.replace(&address.to_string()[..4], "aaaa"));
        assert!(
            matches!(session.poll_effect(), Some(Effect::Send(_))),
            "a forged address is refused as malformed, not passed on"
        );
    }
}
