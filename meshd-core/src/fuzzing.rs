//! Fuzz targets for the core's parsers of untrusted input: each takes raw bytes, runs them through the
//! same functions the daemon and the CLI call on what they receive, and panics only when an invariant
//! breaks (a value that does not read back as itself, a state that passed its check but cannot be
//! planned). The AFL binaries of `fuzz/` call them, and the corpus replay test below runs every
//! committed corpus file through them, so the corpus is a regression suite without AFL.
//!
//! Time: the sync target starts a member session at `Instant::now()`; nothing it checks depends on it.

use std::path::Path;
use std::str::FromStr;
use std::time::Instant;

use crate::declare::{self, Current, Declaration, DeviceSpec, NodeSpec, ServiceSpec};
use crate::fixtures::{label, named_key, sample_state};
use crate::input::{self, HostPort, Label};
use crate::keys::{PresharedKey, PrivateKey, PublicKey};
use crate::model::{AccessRule, Protocol, Role, SharedState};
use crate::plan::{dns, nftables, plan_host};
use crate::reconcile::{self, PeerEndpoints};
use crate::session::hub::HubSession;
use crate::session::member::Member;
use crate::wire::admin::Request;
use crate::wire::auth;
use crate::wire::invite::{self, InviteSecret, Token};
use crate::wire::join::{JoinReply, MemberState, ToJoinService};
use crate::wire::sync::{ToHub, ToMember};

/// A fuzz target: bytes in, a panic only on a broken invariant.
pub type Target = fn(&[u8]);

/// Every target of this crate, by the name of its AFL binary and corpus directory.
pub const TARGETS: &[(&str, Target)] = &[
    ("sync", sync),
    ("join", join),
    ("admin", admin),
    ("wg_quick", wg_quick),
    ("invite", invite),
    ("declare", declare),
    ("input", input),
    ("state_files", state_files),
];

/// A sync line, as the hub's session with a member reads it ([`ToHub`], through
/// [`HubSession::handle_line`]) and as a member reads it ([`ToMember`], through
/// [`Member::handle_message`], then planned as the member's runtime plans every new state); and the
/// lines of the session's handshake ([`auth`]), each checked as the other end checks it.
pub fn sync(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let text = text.strip_suffix('\n').unwrap_or(text);
    handshake(text);

    let mut hub = HubSession::new(label("vps"), Instant::now());
    hub.handle_line(text);
    hub.handle_line(text);
    while hub.poll_effect().is_some() {}
    if let Ok(message) = serde_json::from_str::<ToHub>(text) {
        assert_eq!(reparse::<ToHub>(&message), message, "a message to the hub reads back as itself");
    }

    let Ok(message) = serde_json::from_str::<ToMember>(text) else { return };
    assert_eq!(reparse::<ToMember>(&message), message, "a message to a member reads back as itself");
    let key = PrivateKey::from_base64("AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=").expect("a sample key");
    let cached = MemberState { me: label("vps"), state: sample_state(), hub: None };
    let mut member = Member::new(cached, key, None, Instant::now());
    member.handle_message(message);
    while member.poll_effect().is_some() {}
    plan_state(&member.member_state().state, "vps");
}

/// A handshake line: the hub's [`auth::Challenge`] (the member answers it), the member's
/// [`auth::MemberProof`] (the hub checks it) and the hub's [`auth::HubAnswer`] (the member checks it). A
/// proof made of arbitrary bytes never passes.
fn handshake(text: &str) {
    let sample = |b: u8| PrivateKey::from_base64(&base64_of([b; 32])).expect("a sample key");
    let (hub, member, challenge, ephemeral) = (sample(1), sample(2), sample(3), sample(4));
    if let Ok(message) = serde_json::from_str::<auth::Challenge>(text) {
        assert_eq!(reparse::<auth::Challenge>(&message), message, "a challenge reads back as itself");
        let _ = auth::Handshake::member(&member, &ephemeral, &hub.public_key(), &message.challenge);
    }
    if let Ok(message) = serde_json::from_str::<auth::MemberProof>(text) {
        assert_eq!(reparse::<auth::MemberProof>(&message), message, "a proof reads back as itself");
        if let Ok(check) = auth::Handshake::hub(&hub, &challenge, &message.public_key, &message.ephemeral) {
            assert!(check.verify_member(&message.proof).is_err(), "a proof nobody made passed");
        }
    }
    if let Ok(message) = serde_json::from_str::<auth::HubAnswer>(text) {
        assert_eq!(reparse::<auth::HubAnswer>(&message), message, "an answer reads back as itself");
        let mine = auth::Handshake::member(&member, &ephemeral, &hub.public_key(), &challenge.public_key())
            .expect("sample keys agree");
        if let auth::HubAnswer::Proven { proof } = message {
            assert!(mine.verify_hub(&proof).is_err(), "a hub proof nobody made passed");
        }
    }
}

/// Standard base64 of `bytes`.
fn base64_of(bytes: [u8; 32]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// A join service request (the controller reads [`ToJoinService`]) and its reply (a joining host reads
/// [`JoinReply`], whose state it then plans from).
pub fn join(data: &[u8]) {
    if let Ok(request) = serde_json::from_slice::<ToJoinService>(data) {
        assert_eq!(reparse::<ToJoinService>(&request), request, "a join request reads back as itself");
    }
    if let Ok(reply) = serde_json::from_slice::<JoinReply>(data) {
        assert_eq!(reparse::<JoinReply>(&reply), reply, "a join reply reads back as itself");
        if let JoinReply::Joined(member) = reply {
            plan_state(&member.state, member.me.as_str());
        }
    }
}

/// A line on the admin socket, as the daemon parses it.
pub fn admin(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(request) = serde_json::from_str::<Request>(text) {
        request.is_change();
        assert_eq!(reparse::<Request>(&request), request, "an admin request reads back as itself");
    }
}

/// A device's wg-quick configuration, as `meshctl apply` reads one back.
pub fn wg_quick(data: &[u8]) {
    use crate::handout::DeviceConfig;
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(config) = DeviceConfig::parse(text) else { return };
    // A parsed configuration may not render back (validate says so); one that does reads back as itself.
    if config.validate().is_ok() {
        let again = DeviceConfig::parse(&config.to_wg_quick()).expect("a valid configuration reads back");
        assert_eq!(again, config, "a valid configuration reads back as itself");
    }
}

/// An invite token as `meshd join` reads it, and the other invite inputs (secret, lifetime).
pub fn invite(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(token) = Token::decode(text) {
        assert_eq!(Token::decode(&token.encode()).ok(), Some(token), "a token reads back as itself");
    }
    if let Ok(secret) = InviteSecret::from_str(text) {
        assert_eq!(
            InviteSecret::from_str(secret.as_str()).ok().as_ref().map(InviteSecret::as_str),
            Some(secret.as_str())
        );
    }
    if let Ok(lifetime) = invite::parse_duration(text) {
        assert!(lifetime <= invite::MAX_EXPIRY, "{text:?} is longer than the longest lifetime");
    }
}

/// A declaration file, parsed and planned against a sample network as `meshctl apply` does; every
/// step's admin requests are sent as JSON and must read back.
pub fn declare(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let current = sample_current();
    let Ok(declaration) = Declaration::parse(text, &current.hub) else { return };
    let Ok(plan) = declare::plan(&declaration, &current) else { return };
    for step in &plan.steps {
        step.to_string();
        for request in step.requests(
            3600,
            || named_key("new device"),
            |_, _| crate::tor::client::ClientKey::generate().public_key(),
        ) {
            assert_eq!(reparse::<Request>(&request), request, "a planned request reads back as itself");
        }
    }
}

/// The values operators and peers type: the first byte picks the parser, the rest is its input.
pub fn input(data: &[u8]) {
    let Some((&which, rest)) = data.split_first() else { return };
    let Ok(text) = std::str::from_utf8(rest) else { return };
    match which % 12 {
        0 => {
            if let Ok(name) = Label::from_str(text) {
                assert_eq!(Label::from_str(name.as_str()).ok(), Some(name.clone()), "a name reads back as itself");
                input::check_dns_name(name.as_str()).expect("a label is a short DNS name");
            }
        }
        1 => {
            if let Ok(at) = HostPort::from_str(text) {
                assert_eq!(HostPort::from_str(&at.to_string()).ok(), Some(at.clone()), "{text:?} reads back");
                at.unusable_as_endpoint();
                at.host();
                at.ip();
            }
        }
        2 => {
            if let Ok(endpoint) = input::parse_endpoint(text) {
                assert!(input::check_endpoint(&endpoint).is_ok());
            }
        }
        3 => {
            if let Ok(cidr) = input::parse_cidr(text) {
                dns::reverse_zones(cidr.into()).expect("an accepted range has reverse zones");
            }
        }
        4 => {
            if let Ok(domain) = input::parse_domain(text) {
                dns::parse_domain(&domain).expect("an accepted domain is a DNS name");
            }
        }
        5 => drop(input::parse_interface(text)),
        6 => drop(input::parse_resolver(text)),
        7 => drop((input::parse_port(text), input::parse_mtu(text))),
        8 => {
            if let Ok(key) = PublicKey::parse(text) {
                assert_eq!(PublicKey::parse(key.as_str()).ok(), Some(key));
            }
        }
        9 => drop(PresharedKey::parse(text)),
        10 => {
            if let Ok(key) = PrivateKey::from_base64(text) {
                assert_eq!(PrivateKey::from_base64(&key.to_base64()).ok(), Some(key));
            }
        }
        _ => drop(dns::parse_domain(text)),
    }
}

/// The files a member reads at start: `member.json` (checked and planned as at start),
/// `peer-endpoints.json` and a private key file.
pub fn state_files(data: &[u8]) {
    if let Ok(member) = serde_json::from_slice::<MemberState>(data) {
        assert_eq!(reparse::<MemberState>(&member), member, "member.json reads back as itself");
        plan_state(&member.state, member.me.as_str());
    }
    if let Ok(endpoints) = serde_json::from_slice::<PeerEndpoints>(data) {
        assert_eq!(reparse::<PeerEndpoints>(&endpoints), endpoints, "peer endpoints read back as themselves");
    }
    if let Ok(text) = std::str::from_utf8(data) {
        drop(PrivateKey::from_base64(text.trim()));
    }
}

/// Plan `host` from `state` as a member does with a state that passed its check: the plan, its host
/// steps from nothing and from the sample network's plan, and its firewall rules.
fn plan_state(state: &SharedState, host: &str) {
    if state.check().is_err() {
        return;
    }
    let Ok(plan) = plan_host(&state.snapshot(), host) else { return };
    reconcile::bring_up(&plan);
    if let Ok(before) = plan_host(&sample_state().snapshot(), "vps") {
        reconcile::steps(&before, &plan);
    }
    nftables::render(&plan);
}

/// `value` serialised as JSON and read back.
fn reparse<T: serde::Serialize + serde::de::DeserializeOwned>(value: &T) -> T {
    let json = serde_json::to_string(value).expect("a parsed value serialises");
    serde_json::from_str(&json).unwrap_or_else(|e| panic!("{json} does not read back: {e}"))
}

/// The sample network as `meshctl apply` would see it: the hub, two members, a pending invite, a
/// service, a device and a rule.
fn sample_current() -> Current {
    let member =
        |name: &str, role| NodeSpec { name: label(name), role, disabled: false, endpoint: None, mtu: Some(1420) };
    Current {
        hub: label("hub"),
        mtu: 1420,
        domain: "mesh.internal".into(),
        members: vec![member("vps", Role::Relay), member("attic", Role::Node)],
        invites: [(label("cellar"), Role::Node)].into(),
        services: vec![ServiceSpec {
            name: label("beacon"),
            node: label("attic"),
            target: "127.0.0.1:5052".parse().expect("a sample target"),
            port: 5052,
            protocol: Protocol::Tcp,
            https: vec![],
            tor: Some(crate::declare::TorSpec {
                port: Some(80),
                clients: [label("phone")].into(),
                authorized_only: true,
            }),
        }],
        devices: vec![DeviceSpec { name: label("phone"), allow: [label("beacon")].into() }],
        rules: [AccessRule { from: label("vps"), to: label("attic") }].into(),
    }
}

/// Run every file of `corpus/<name>/` through its target, for each of `targets`; each directory must
/// hold at least one file. Panics name the target and the file that fails.
pub fn replay(corpus: &Path, targets: &[(&str, Target)]) {
    for (name, target) in targets {
        let dir = corpus.join(name);
        let mut files = 0;
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.expect("a corpus entry").path();
            let data = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            if std::panic::catch_unwind(|| target(&data)).is_err() {
                panic!("fuzz target {name} fails on {}", path.display());
            }
            files += 1;
        }
        assert!(files > 0, "no corpus for fuzz target {name} in {}", dir.display());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_committed_fuzz_input_still_passes_its_target() {
        replay(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus"), TARGETS);
    }
}
