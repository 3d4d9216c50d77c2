//! Live updates: the controller pushes the network's state to every member host over one long-lived
//! TCP stream per member, inside the mesh (to the hub's mesh address, [`SYNC_PORT`]). A member's source
//! address only says the connection came through its tunnel, which any process on that host can use: each
//! session therefore opens with a handshake in which the member proves it holds the node's WireGuard
//! private key and the hub proves it holds the hub's ([`meshd_core::wire::auth`]). Nothing of the state is
//! sent before, and a new proven session of a node ends the one it had.
//!
//! Nor can another process on the member's host crowd meshd's handshakes out by flooding the hub from
//! the member's address: the member connects from a source port below 1024 ([`SOURCE_PORTS`]), which only
//! root may bind (unless `net.ipv4.ip_unprivileged_port_start` was lowered: [`warn_if_ports_unprotected`]),
//! and the hub admits sync connections only from such ports, in its firewall and in its accept loop.
//!
//! The protocol is JSON lines. After the handshake, a member says `hello` with the digest of the state it has cached; the
//! hub answers with nothing (up to date), the changes since that digest (if it still has them), or the
//! whole state. After that, every change is serialised once and the same line goes to every member.
//! A member applies the changes to its cached copy and plans its own interface from it, exactly as the
//! hub plans its own from the controller's snapshot, so the controller's work per change does not
//! depend on how many peers each host has.
//!
//! [`SYNC_PORT`]: meshd_core::model::SYNC_PORT

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tokio::io::{AsyncRead, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio_util::codec::{FramedRead, LinesCodec, LinesCodecError};
use tracing::{debug, info, warn};

use crate::host::admission::{Caps, Gate, TurnedAway};
use crate::host::clock;
use meshd_core::acme::renewal::Status;
use meshd_core::input::{Label, PublicName};
use meshd_core::keys::{PrivateKey, PublicKey};
use meshd_core::model::SharedState;
use meshd_core::session::hub::{self, HELLO_TIMEOUT, HubSession, Journal};
use meshd_core::wire::auth::{Challenge, Handshake, HubAnswer, MemberProof};
use meshd_core::wire::sync::{OnionReport, ToHub, ToMember, line};

/// Longest line a member accepts from the hub (a whole state of a large network fits).
const MAX_TO_MEMBER: usize = 64 << 20;
/// Longest line the hub accepts from a member (hello, key offers: a few hundred bytes).
const MAX_TO_HUB: usize = 4096;
/// How long a connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Source ports a member's sync client binds: below 1024, which an unprivileged process cannot bind (while
/// `net.ipv4.ip_unprivileged_port_start` keeps its default, 1024), above those of common services, and below
/// the port meshd's own listeners bind ([`meshd_core::plan::PRIVILEGED_PORT`], 1021), which a source port
/// bound on every address would take from a service's forwarder.
pub use crate::host::socket::{SOURCE_PORT_TRIES, SOURCE_PORTS};
/// Source ports the hub admits sync connections from: the privileged ones.
pub const PRIVILEGED_PORTS_END: u16 = 1024;
/// Where the kernel says from which port on unprivileged processes may bind.
const UNPRIVILEGED_PORT_START: &str = "/proc/sys/net/ipv4/ip_unprivileged_port_start";
/// Reconnect backoff of members.
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// Handshakes that may be under way at once from one member's address. Only meshd on the host can
/// finish one (within a round trip), so more are someone else on that host: the oldest is closed, so that
/// they hold no more of the hub's descriptors than this and cannot keep the member out; each handshake has
/// [`HELLO_TIMEOUT`] to finish.
const HANDSHAKES_PER_MEMBER: usize = 4;

/// How often at most a failed handshake from one member is logged at warning level (the others at debug).
const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(60);
/// Most sessions and handshakes of all members at a time (within the process's descriptor budget).
const SESSIONS_TOTAL: usize = 16_384;

/// The hub's side: the [`Journal`] of what it published, and the stream every session listens to.
#[derive(Clone)]
pub struct Publisher {
    inner: Arc<RwLock<Published>>,
    sessions: Arc<std::sync::Mutex<Sessions>>,
    /// The hub's private key, which its proofs are made with.
    key: Arc<PrivateKey>,
}

/// Each member's handshakes under way and its proven session.
#[derive(Default)]
struct Sessions {
    /// The number of the last session.
    last: u64,
    /// By member: handshakes under way, oldest first (dropping the sender closes one).
    handshakes: HashMap<Label, VecDeque<(u64, oneshot::Sender<()>)>>,
    /// By member: its proven session's number, and what ends it when dropped.
    live: HashMap<Label, (u64, oneshot::Sender<()>)>,
    /// By member: when a failed handshake was last logged at warning level.
    warned: HashMap<Label, Instant>,
}

struct Published {
    journal: Journal,
    lines: broadcast::Sender<Arc<str>>,
}

/// A member's request that needs the controller.
#[derive(Debug)]
pub struct KeyOffer {
    pub node: Label,
    pub public_key: PublicKey,
    pub reply: oneshot::Sender<Result<(), String>>,
}

/// Requests from sessions to the controller's loop.
#[derive(Debug)]
pub enum FromSession {
    /// A member offers a new key (after `NodeRotate`); the controller checks it is valid and free.
    Offer(KeyOffer),
    /// A member whose offer was accepted switches to that key now.
    Switch { node: Label, public_key: PublicKey },
    /// A member reports the state of the certificates it holds.
    Certificates { node: Label, certificates: BTreeMap<PublicName, Status> },
    /// A member reports the onion services it serves.
    Onions { node: Label, onions: BTreeMap<Label, OnionReport> },
}

impl Publisher {
    /// The publisher of `state`, proving itself with the hub's private key `key`.
    pub fn new(state: SharedState, key: &PrivateKey) -> Publisher {
        let (lines, _) = broadcast::channel(hub::LOG_LEN);
        Publisher {
            inner: Arc::new(RwLock::new(Published { journal: Journal::new(state), lines })),
            sessions: Arc::default(),
            key: Arc::new(key.clone()),
        }
    }

    /// Make `state` the current one and send what changed to every member; false if nothing did.
    pub fn publish(&self, state: SharedState) -> bool {
        // What depends only on the new state is made under the read lock, which sessions and new
        // connections share: under the write lock, only fields are swapped. (This is the only writer.)
        let Some(prepared) = self.read().journal.prepare(state) else { return false };
        let mut p = self.inner.write().unwrap_or_else(|e| e.into_inner());
        let message = p.journal.commit(prepared);
        // No receiver (no member connected) is not an error.
        let _ = p.lines.send(message);
        true
    }

    /// The digest of the current state.
    pub fn digest(&self) -> String {
        self.read().journal.digest().to_owned()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Published> {
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    fn member(&self, addr: IpAddr) -> Option<Label> {
        self.read().journal.member(addr).cloned()
    }

    /// Whether `node` is still the active member at `addr` (compared in place: once per line per session).
    fn is_member(&self, addr: IpAddr, node: &Label) -> bool {
        self.read().journal.member(addr) == Some(node)
    }

    /// The current public key of member `node`.
    fn member_key(&self, node: &Label) -> Option<PublicKey> {
        self.read().journal.state().nodes.iter().find(|n| n.name == *node).map(|n| n.public_key.clone())
    }

    /// Accept member sessions on `listener` until the task is dropped. Each connection holds a permit of
    /// the listener's gate (see [`crate::host::admission`]); a connection over its caps is closed at once.
    pub async fn serve(self, listener: TcpListener, requests: mpsc::Sender<FromSession>) {
        // Well above what one member's address holds (its session and the handshakes under way, the oldest
        // of which are closed), so that crowded-out handshakes free their permits before the member meets it.
        let caps =
            Caps { per_source: 2 * HANDSHAKES_PER_MEMBER + 1, total: SESSIONS_TOTAL, descriptors: 1, internet: false };
        let gate = Gate::new("sync listener", caps);
        loop {
            let (stream, peer) = crate::host::socket::accept(&listener, "sync").await;
            // Any local user may connect from an unprivileged port (on the member, or on the hub past the
            // firewall): closed at once, counted in the listener's report, never against the member's caps.
            if peer.port() >= PRIVILEGED_PORTS_END {
                gate.turn_away(TurnedAway::UnprivilegedPort);
                continue;
            }
            let Some(node) = self.member(peer.ip()) else {
                debug!(%peer, "sync: connection from an address that is no active member; closed");
                continue;
            };
            let Some(permit) = gate.admit(peer.ip()) else { continue };
            let (id, mut crowded_out) = {
                let mut sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
                sessions.last += 1;
                let id = sessions.last;
                let (close, closed) = oneshot::channel();
                let under_way = sessions.handshakes.entry(node.clone()).or_default();
                under_way.push_back((id, close));
                if under_way.len() > HANDSHAKES_PER_MEMBER {
                    debug!(%node, %peer, "sync: too many handshakes under way from one member; closing the oldest");
                    under_way.pop_front();
                }
                (id, closed)
            };
            let publisher = self.clone();
            let requests = requests.clone();
            tokio::spawn(async move {
                let _ = stream.set_nodelay(true);
                let (read, mut write) = stream.into_split();
                let mut lines = line_reader(read, MAX_TO_HUB);
                let proven = tokio::select! {
                    proven = tokio::time::timeout(HELLO_TIMEOUT, publisher.handshake(&mut lines, &mut write, &node)) => {
                        proven.unwrap_or_else(|_| Err("no proof in time".into()))
                    }
                    _ = &mut crowded_out => Err("crowded out by newer handshakes".into()),
                };
                publisher.handshake_ended(&node, id);
                if let Err(reason) = proven {
                    publisher.refused(&node, peer, &reason);
                    return;
                }
                let superseded = publisher.go_live(&node, id);
                match publisher.session(lines, write, peer, node.clone(), requests, superseded).await {
                    Ok(()) => debug!(%node, "sync session ended"),
                    Err(e) => debug!(%node, error = %e, "sync session ended"),
                }
                publisher.session_ended(&node, id);
                drop(permit);
            });
        }
    }

    /// The handshake of a session of `node` ([`meshd_core::wire::auth`]): the challenge, the member's proof
    /// checked against the node's key, and the hub's proof. Err: why the member is not proven (it was told).
    async fn handshake(
        &self,
        lines: &mut FramedRead<tokio::net::tcp::OwnedReadHalf, LinesCodec>,
        write: &mut tokio::net::tcp::OwnedWriteHalf,
        node: &Label,
    ) -> Result<(), String> {
        let challenge = PrivateKey::generate();
        let first = to_json_line(&Challenge { challenge: challenge.public_key() });
        write.write_all(first.as_bytes()).await.map_err(|e| e.to_string())?;
        let text = next_line(lines).await.map_err(|e| e.to_string())?.ok_or("closed before its proof")?;
        let verdict = match serde_json::from_str::<MemberProof>(&text) {
            Err(e) => Err(format!("malformed proof: {e}")),
            Ok(offer) => match self.member_key(node) {
                Some(key) if key != offer.public_key => Err(format!("not the key of node {node}")),
                None => Err(format!("node {node} is no member")),
                Some(key) => Handshake::hub(&self.key, &challenge, &key, &offer.ephemeral)
                    .and_then(|h| h.verify_member(&offer.proof).map(|()| h))
                    .map_err(|e| format!("not proven: {e}")),
            },
        };
        let (answer, result) = match verdict {
            Ok(handshake) => (HubAnswer::Proven { proof: handshake.hub_proof() }, Ok(())),
            Err(reason) => (HubAnswer::Refused { reason: reason.clone() }, Err(reason)),
        };
        write.write_all(to_json_line(&answer).as_bytes()).await.map_err(|e| e.to_string())?;
        result
    }

    /// A handshake of `node` failed: logged at warning level once a minute per member, else at debug.
    fn refused(&self, node: &Label, peer: SocketAddr, reason: &str) {
        let mut sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let last = sessions.warned.get(node).copied();
        if last.is_none_or(|at| now.duration_since(at) >= REFUSAL_LOG_INTERVAL) {
            sessions.warned.insert(node.clone(), now);
            warn!(%node, %peer, reason, "sync: a connection from the member's address did not prove the node's key (another process on that host?); closed");
        } else {
            debug!(%node, %peer, reason, "sync: handshake refused");
        }
    }

    /// Handshake `id` of `node` is over.
    fn handshake_ended(&self, node: &Label, id: u64) {
        let mut sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(under_way) = sessions.handshakes.get_mut(node) {
            under_way.retain(|(other, _)| *other != id);
            if under_way.is_empty() {
                sessions.handshakes.remove(node);
            }
        }
    }

    /// Session `id` of `node` is proven: it is the node's session now, and the one it had ends. The
    /// receiver resolves when a later one supersedes this.
    fn go_live(&self, node: &Label, id: u64) -> oneshot::Receiver<()> {
        let (end, superseded) = oneshot::channel();
        let mut sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        if sessions.live.insert(node.clone(), (id, end)).is_some() {
            debug!(%node, "sync: a new session of the member supersedes its previous one");
        }
        superseded
    }

    /// Session `id` of `node` is over.
    fn session_ended(&self, node: &Label, id: u64) {
        let mut sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        if sessions.live.get(node).is_some_and(|(live, _)| *live == id) {
            sessions.live.remove(node);
        }
    }

    /// One member's session: the socket, the broadcast of changes and the controller's verdicts,
    /// driving the session's state machine ([`HubSession`]) and carrying out what it asks for.
    async fn session(
        &self,
        mut lines: FramedRead<tokio::net::tcp::OwnedReadHalf, LinesCodec>,
        mut write: tokio::net::tcp::OwnedWriteHalf,
        peer: SocketAddr,
        node: Label,
        requests: mpsc::Sender<FromSession>,
        mut superseded: oneshot::Receiver<()>,
    ) -> std::io::Result<()> {
        let mut session = HubSession::new(node.clone(), Instant::now());
        let mut updates: Option<broadcast::Receiver<Arc<str>>> = None;
        loop {
            while let Some(effect) = session.poll_effect() {
                match effect {
                    hub::Effect::CatchUp { digest } => {
                        let (catch_up, fresh) = self.catch_up(&digest);
                        if updates.is_none() {
                            info!(%node, %peer, sent = catch_up.len(), "member connected for live updates");
                        }
                        updates = Some(fresh);
                        for l in catch_up {
                            write.write_all(l.as_bytes()).await?;
                        }
                    }
                    hub::Effect::Send(message) => write.write_all(line(&message).as_bytes()).await?,
                    hub::Effect::CheckKey { public_key } => {
                        let (reply, answer) = oneshot::channel();
                        let offer = KeyOffer { node: node.clone(), public_key, reply };
                        if requests.send(FromSession::Offer(offer)).await.is_err() {
                            return Ok(());
                        }
                        let Ok(verdict) = answer.await else { return Ok(()) };
                        session.handle_key_verdict(verdict);
                    }
                    hub::Effect::SwitchKey { public_key } => {
                        let _ = requests.send(FromSession::Switch { node: node.clone(), public_key }).await;
                    }
                    hub::Effect::Certificates(certificates) => {
                        let _ = requests.send(FromSession::Certificates { node: node.clone(), certificates }).await;
                    }
                    hub::Effect::Onions(onions) => {
                        let _ = requests.send(FromSession::Onions { node: node.clone(), onions }).await;
                    }
                    hub::Effect::Close(reason) => {
                        info!(%node, reason, "closing the member's sync session");
                        return Ok(());
                    }
                }
            }
            let deadline = session.poll_timeout();
            tokio::select! {
                update = next_update(&mut updates) => {
                    match update {
                        Ok(l) => write.write_all(l.as_bytes()).await?,
                        Err(broadcast::error::RecvError::Lagged(missed)) => {
                            debug!(%node, missed, "member fell behind; sending the whole state");
                            let l = self.inner.write().unwrap_or_else(|e| e.into_inner()).journal.full_line();
                            write.write_all(l.as_bytes()).await?;
                        }
                        Err(broadcast::error::RecvError::Closed) => return Ok(()),
                    }
                    session.handle_published(self.is_member(peer.ip(), &node));
                }
                incoming = next_line(&mut lines) => {
                    let Some(text) = incoming? else { return Ok(()) };
                    session.handle_line(&text);
                }
                () = clock::sleep_until(deadline) => session.handle_timeout(Instant::now()),
                _ = &mut superseded => {
                    info!(%node, %peer, "the member opened a new session; closing this one");
                    return Ok(());
                }
            }
        }
    }

    /// Lines that bring a member at `digest` up to date, and the stream of changes after them (taken
    /// under the same lock, so nothing is missed or sent twice).
    fn catch_up(&self, digest: &str) -> (Vec<Arc<str>>, broadcast::Receiver<Arc<str>>) {
        let mut p = self.inner.write().unwrap_or_else(|e| e.into_inner());
        (p.journal.catch_up(digest), p.lines.subscribe())
    }
}

/// The next published line, once the session listens (after its hello).
async fn next_update(
    updates: &mut Option<broadcast::Receiver<Arc<str>>>,
) -> Result<Arc<str>, broadcast::error::RecvError> {
    match updates {
        Some(updates) => updates.recv().await,
        None => std::future::pending().await,
    }
}

/// What the member's loop hears from its sync client.
#[derive(Debug)]
pub enum SyncEvent {
    /// A session with the hub started (the member's hello is sent); its connection was made `at`.
    Connected {
        at: std::time::Instant,
    },
    /// That session ended (what the member sent in it and the hub did not read is lost).
    Disconnected,
    Message(ToMember),
}

/// A message for the hub; `delivered` fires once the hub's host has acknowledged every byte of it, or
/// after a quarter of a second (so the member may then change what its tunnel depends on).
#[derive(Debug)]
pub struct Outgoing {
    pub message: ToHub,
    pub delivered: Option<oneshot::Sender<()>>,
}

impl From<ToHub> for Outgoing {
    fn from(message: ToHub) -> Outgoing {
        Outgoing { message, delivered: None }
    }
}

/// Who a member is towards the hub: the private key its interface uses (its proof is made with it) and
/// the hub's public key (the hub's proof must match it).
#[derive(Clone, PartialEq, Eq)]
pub struct Identity {
    /// This host's private key, as its interface uses it.
    pub key: PrivateKey,
    /// The hub's public key.
    pub hub: PublicKey,
}

/// The member's side: keep a session with the hub at `hub`, reconnecting with backoff, forward what
/// the hub sends to `events` and what the member's loop sends from `outgoing`. `identity` and `digest`
/// (of the state the member has) are read at each (re)connect.
pub async fn follow(
    hub: SocketAddr,
    identity: watch::Receiver<Identity>,
    digest: watch::Receiver<String>,
    events: mpsc::Sender<SyncEvent>,
    mut outgoing: mpsc::Receiver<Outgoing>,
) {
    let mut pause = BACKOFF_MIN;
    loop {
        let started = tokio::time::Instant::now();
        match session(hub, &identity, &digest, &events, &mut outgoing).await {
            Ok(()) => return,
            // Refused or not proven, or no privileged source port to connect from: the operator's to fix.
            Err(e) if matches!(e.kind(), std::io::ErrorKind::PermissionDenied | std::io::ErrorKind::AddrInUse) => {
                warn!(%hub, error = %e, "the sync session with the hub failed");
            }
            Err(e) => debug!(%hub, error = %e, "sync session with the hub ended"),
        }
        if started.elapsed() > BACKOFF_MAX {
            pause = BACKOFF_MIN;
        }
        // Jitter spreads a crowd of members reconnecting to a restarted hub.
        let jitter = Duration::from_millis(u64::from(rand::random::<u16>()) % (pause.as_millis() as u64 / 2 + 1));
        tokio::time::sleep(pause + jitter).await;
        pause = (pause * 2).min(BACKOFF_MAX);
    }
}

/// One session; `Ok` only when the member's loop has gone away.
async fn session(
    hub: SocketAddr,
    identity: &watch::Receiver<Identity>,
    digest: &watch::Receiver<String>,
    events: &mpsc::Sender<SyncEvent>,
    outgoing: &mut mpsc::Receiver<Outgoing>,
) -> std::io::Result<()> {
    // The key the interface uses as the connection is made is the one the hub admitted it with.
    let identity = identity.borrow().clone();
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, connect_from_privileged_port(hub))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connecting"))??;
    // When the hub admitted the key the interface used (the member's key rotation relies on it).
    let at = std::time::Instant::now();
    let _ = stream.set_nodelay(true);
    set_keepalive(&stream);
    let (read, mut write) = stream.into_split();
    let mut lines = line_reader(read, MAX_TO_MEMBER);
    tokio::time::timeout(HELLO_TIMEOUT, prove(&mut lines, &mut write, &identity))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "the hub's handshake did not finish"))??;
    let hello = ToHub::Hello { digest: digest.borrow().clone() };
    write.write_all(to_json_line(&hello).as_bytes()).await?;
    info!(%hub, "connected to the controller for live updates");
    // A message belongs to the session it was made in (an offer, a switch): any made for an earlier one
    // is dropped unsent (its `delivered` reports it was not).
    while outgoing.try_recv().is_ok() {}
    if events.send(SyncEvent::Connected { at }).await.is_err() {
        return Ok(());
    }
    let result = live(lines, &mut write, events, outgoing).await;
    if result.is_err() && events.send(SyncEvent::Disconnected).await.is_err() {
        return Ok(());
    }
    result
}

/// A connection to `hub` from a random port of [`SOURCE_PORTS`] (the hub admits no other).
pub async fn connect_from_privileged_port(hub: SocketAddr) -> std::io::Result<TcpStream> {
    let any: IpAddr = if hub.is_ipv4() { Ipv4Addr::UNSPECIFIED.into() } else { Ipv6Addr::UNSPECIFIED.into() };
    crate::host::socket::connect_from_privileged_port(any, hub).await
}

/// Warn, once at start, when unprivileged processes may bind ports below 1024 on this host
/// (`net.ipv4.ip_unprivileged_port_start` lowered, as some container runtimes do): then any local user
/// on a member can flood the hub's sync port as the member and keep its meshd out.
pub fn warn_if_ports_unprotected() {
    match std::fs::read_to_string(UNPRIVILEGED_PORT_START) {
        Ok(text) => match unprivileged_from(&text) {
            Some(start) if start < u32::from(PRIVILEGED_PORTS_END) => warn!(
                net.ipv4.ip_unprivileged_port_start = start,
                "unprivileged processes may bind ports from {start} on: a local user on a member can then keep it \
                 from the hub's live updates (set net.ipv4.ip_unprivileged_port_start=1024 on members and hub)"
            ),
            Some(_) => {}
            None => debug!(text, "cannot read {UNPRIVILEGED_PORT_START}"),
        },
        Err(e) => debug!(error = %e, "reading {UNPRIVILEGED_PORT_START}"),
    }
}

/// The first port unprivileged processes may bind, from the text of [`UNPRIVILEGED_PORT_START`].
fn unprivileged_from(text: &str) -> Option<u32> {
    text.trim().parse().ok()
}

/// The member's side of the handshake ([`meshd_core::wire::auth`]): answer the hub's challenge with this
/// host's proof and check the hub's. A refusal, or an answer that is not the hub's, is `PermissionDenied`.
async fn prove(
    lines: &mut FramedRead<tokio::net::tcp::OwnedReadHalf, LinesCodec>,
    write: &mut tokio::net::tcp::OwnedWriteHalf,
    identity: &Identity,
) -> std::io::Result<()> {
    let denied = |why: String| std::io::Error::new(std::io::ErrorKind::PermissionDenied, why);
    let eof = || std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "hub closed");
    let text = next_line(lines).await?.ok_or_else(eof)?;
    let Challenge { challenge } =
        serde_json::from_str(&text).map_err(|e| denied(format!("no challenge from the hub: {e}")))?;
    let ephemeral = PrivateKey::generate();
    let handshake = Handshake::member(&identity.key, &ephemeral, &identity.hub, &challenge)
        .map_err(|e| denied(format!("the hub's challenge: {e}")))?;
    let proof = MemberProof {
        public_key: identity.key.public_key(),
        ephemeral: ephemeral.public_key(),
        proof: handshake.member_proof(),
    };
    write.write_all(to_json_line(&proof).as_bytes()).await?;
    let text = next_line(lines).await?.ok_or_else(eof)?;
    match serde_json::from_str::<HubAnswer>(&text) {
        Ok(HubAnswer::Proven { proof }) => handshake
            .verify_hub(&proof)
            .map_err(|_| denied("the answer at the hub's address is not the hub's (its proof does not match)".into())),
        Ok(HubAnswer::Refused { reason }) => Err(denied(format!("the hub refused: {reason}"))),
        Err(e) => Err(denied(format!("malformed answer to the handshake: {e}"))),
    }
}

/// A session after its hello: what the hub sends goes to `events`, what the member sends goes out.
async fn live(
    mut lines: FramedRead<tokio::net::tcp::OwnedReadHalf, LinesCodec>,
    write: &mut tokio::net::tcp::OwnedWriteHalf,
    events: &mpsc::Sender<SyncEvent>,
    outgoing: &mut mpsc::Receiver<Outgoing>,
) -> std::io::Result<()> {
    loop {
        tokio::select! {
            incoming = next_line(&mut lines) => {
                let text = incoming?.ok_or_else(|| std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "hub closed"))?;
                let message = serde_json::from_str::<ToMember>(&text)
                    .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, format!("malformed message: {e}")))?;
                if events.send(SyncEvent::Message(message)).await.is_err() {
                    return Ok(());
                }
            }
            message = outgoing.recv() => {
                let Some(Outgoing { message, delivered }) = message else { return Ok(()) };
                write.write_all(to_json_line(&message).as_bytes()).await?;
                if let Some(delivered) = delivered {
                    wait_until_acknowledged((*write).as_ref()).await;
                    let _ = delivered.send(());
                }
            }
        }
    }
}

/// `message` as one JSON line, newline included.
fn to_json_line(message: &impl serde::Serialize) -> String {
    let mut text = serde_json::to_string(message).expect("messages serialise");
    text.push('\n');
    text
}

/// Wait until the peer has acknowledged everything written to `stream`, or a quarter of a second:
/// the acknowledgement of a key switch may itself be lost to the switch, the hub having changed keys
/// the moment it read the message.
async fn wait_until_acknowledged(stream: &TcpStream) {
    use std::os::fd::AsRawFd;
    let fd = stream.as_raw_fd();
    for _ in 0..25 {
        let mut unacknowledged: libc::c_int = 0;
        // SAFETY: TIOCOUTQ (SIOCOUTQ) on a TCP socket we own writes one int: the bytes not yet acknowledged.
        let rc = unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut unacknowledged) };
        if rc != 0 || unacknowledged == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// TCP keepalives notice a hub that vanished (killed, or its host gone), or that dropped this member
/// as a peer (removed or disabled: the end of the session never reaches it), within about 5 s: 2 s idle,
/// then 3 probes 1 s apart. The member then asks where it stands; the probes are a few bytes each.
fn set_keepalive(stream: &TcpStream) {
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(2))
        .with_interval(Duration::from_secs(1))
        .with_retries(3);
    if let Err(e) = socket2::SockRef::from(stream).set_tcp_keepalive(&keepalive) {
        debug!(error = %e, "setting TCP keepalive");
    }
}

/// JSON lines from `read`, refusing a line longer than `max` before buffering more of it.
fn line_reader<R: AsyncRead>(read: R, max: usize) -> FramedRead<R, LinesCodec> {
    FramedRead::new(read, LinesCodec::new_with_max_length(max))
}

/// The next line, or None at the end of the stream. Cancel-safe (partial lines stay in the reader), so
/// it can race other events in `select!`.
async fn next_line<R: AsyncRead + Unpin>(lines: &mut FramedRead<R, LinesCodec>) -> std::io::Result<Option<String>> {
    match lines.next().await {
        None => Ok(None),
        Some(Ok(line)) => Ok(Some(line)),
        Some(Err(LinesCodecError::Io(e))) => Err(e),
        Some(Err(LinesCodecError::MaxLineLengthExceeded)) => {
            Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "line too long"))
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncReadExt;

    use meshd_core::fixtures::sample_state as state;
    use meshd_core::wire::sync::{apply, digest};

    use super::*;

    type Lines = FramedRead<tokio::net::tcp::OwnedReadHalf, LinesCodec>;

    /// The sample network on loopback (member `vps`, index 2, is 127.0.0.2) with keys the test holds, and a
    /// publisher of it serving on an ephemeral port: the state, the publisher, its address, the serving
    /// task and vps's identity.
    async fn serve_on_loopback() -> (SharedState, Publisher, SocketAddr, tokio::task::JoinHandle<()>, Identity) {
        let mut s = state();
        s.network.cidr = "127.0.0.0/8".parse().unwrap();
        let (hub_key, vps_key) = (PrivateKey::generate(), PrivateKey::generate());
        s.nodes[0].public_key = hub_key.public_key();
        s.nodes[1].public_key = vps_key.public_key();
        let publisher = Publisher::new(s.clone(), &hub_key);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (requests, _) = mpsc::channel(4);
        let server = tokio::spawn(publisher.clone().serve(listener, requests));
        (s, publisher, addr, server, Identity { key: vps_key, hub: hub_key.public_key() })
    }

    /// A connection to `addr` from `source`, a mesh address on loopback, and a source port below 1024 as
    /// meshd's (binding one needs root, as the tests have: a failure to bind fails the test), as lines and a
    /// writer.
    async fn connect_from(source: &str, addr: SocketAddr) -> (Lines, tokio::net::tcp::OwnedWriteHalf) {
        for _ in 0..SOURCE_PORT_TRIES {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.set_reuseaddr(true).unwrap();
            match socket.bind(SocketAddr::new(source.parse().unwrap(), rand::random_range(SOURCE_PORTS))) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => continue,
                Err(e) => panic!("binding a privileged port (the tests need root): {e}"),
            }
            match socket.connect(addr).await {
                Ok(stream) => {
                    let (read, write) = stream.into_split();
                    return (line_reader(read, MAX_TO_MEMBER), write);
                }
                // The port is bound by another of the test's connections to the same address.
                Err(e) if e.kind() == std::io::ErrorKind::AddrNotAvailable => continue,
                Err(e) => panic!("connecting to {addr}: {e}"),
            }
        }
        panic!("no free privileged port on {source}");
    }

    /// A connection to `addr` from `source` and a port the kernel picks (unprivileged).
    async fn connect_unprivileged(source: &str, addr: SocketAddr) -> Lines {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::new(source.parse().unwrap(), 0)).unwrap();
        let stream = socket.connect(addr).await.unwrap();
        assert!(stream.local_addr().unwrap().port() >= PRIVILEGED_PORTS_END);
        line_reader(stream.into_split().0, MAX_TO_MEMBER)
    }

    /// A session of vps that passed the handshake with `identity` and said hello with `digest`.
    async fn proven(addr: SocketAddr, identity: &Identity, digest: &str) -> (Lines, tokio::net::tcp::OwnedWriteHalf) {
        let (mut lines, mut write) = connect_from("127.0.0.2", addr).await;
        prove(&mut lines, &mut write, identity).await.expect("the handshake");
        write.write_all(to_json_line(&ToHub::Hello { digest: digest.into() }).as_bytes()).await.unwrap();
        (lines, write)
    }

    async fn next(lines: &mut Lines) -> Option<String> {
        tokio::time::timeout(Duration::from_secs(5), next_line(lines)).await.expect("an answer in time").unwrap_or(None)
    }

    /// Another process on vps's host, which cannot bind a port below 1024, floods the hub from vps's address:
    /// each of its connections is closed without a challenge and without counting against vps, whose meshd
    /// still connects from its privileged port and is proven.
    #[tokio::test]
    async fn connections_from_unprivileged_ports_are_closed_at_once_and_keep_no_member_out() {
        let (mut s, publisher, addr, server, vps) = serve_on_loopback().await;
        let mut flood = Vec::new();
        for _ in 0..40 {
            flood.push(connect_unprivileged("127.0.0.2", addr).await);
        }
        let stream = connect_from_privileged_port(addr).await.expect("a privileged source port (needs root)");
        assert!(SOURCE_PORTS.contains(&stream.local_addr().unwrap().port()));
        drop(stream);
        let (mut real, _real_write) = proven(addr, &vps, &publisher.digest()).await;
        for lines in &mut flood {
            assert_eq!(next(lines).await, None, "a connection from an unprivileged port got a challenge");
        }
        s.services.clear();
        publisher.publish(s);
        let message: ToMember = serde_json::from_str(&next(&mut real).await.unwrap()).unwrap();
        assert!(matches!(message, ToMember::Changes { .. }), "{message:?}");
        server.abort();
    }

    #[test]
    fn the_first_unprivileged_port_is_read_from_the_kernels_text() {
        assert_eq!(unprivileged_from("1024\n"), Some(1024));
        assert_eq!(unprivileged_from("0\n"), Some(0));
        assert_eq!(unprivileged_from(""), None);
        assert_eq!(unprivileged_from("x"), None);
        let here = std::fs::read_to_string(UNPRIVILEGED_PORT_START).expect("the kernel's setting");
        assert!(unprivileged_from(&here).is_some(), "{here:?}");
    }

    #[test]
    fn a_hello_is_one_line() {
        let hello = to_json_line(&ToHub::Hello { digest: "x".into() });
        assert_eq!(hello, "{\"msg\":\"hello\",\"digest\":\"x\"}\n");
    }

    /// Another process on vps's host (its packets carry vps's address) asks for the state: it cannot prove
    /// vps's key, gets nothing of the state, and vps's session goes on. Nor does a fake hub pass.
    #[tokio::test]
    async fn a_connection_that_does_not_prove_the_nodes_key_gets_nothing() {
        let (mut s, publisher, addr, server, vps) = serve_on_loopback().await;
        let (mut real, _real_write) = proven(addr, &vps, &publisher.digest()).await;

        let impostor = Identity { key: PrivateKey::generate(), ..vps.clone() };
        let (mut lines, mut write) = connect_from("127.0.0.2", addr).await;
        let refused = prove(&mut lines, &mut write, &impostor).await.unwrap_err();
        assert_eq!(refused.kind(), std::io::ErrorKind::PermissionDenied);
        assert!(refused.to_string().contains("not the key of node vps"), "{refused}");
        assert_eq!(next(&mut lines).await, None, "the connection ends without the state");

        // Claiming vps's key without its private half: the proof does not match.
        let (mut lines, mut write) = connect_from("127.0.0.2", addr).await;
        let text = next(&mut lines).await.unwrap();
        let Challenge { challenge } = serde_json::from_str(&text).unwrap();
        let ephemeral = PrivateKey::generate();
        let forged = Handshake::member(&PrivateKey::generate(), &ephemeral, &vps.hub, &challenge).unwrap();
        let claim = MemberProof {
            public_key: vps.key.public_key(),
            ephemeral: ephemeral.public_key(),
            proof: forged.member_proof(),
        };
        write.write_all(to_json_line(&claim).as_bytes()).await.unwrap();
        let answer: HubAnswer = serde_json::from_str(&next(&mut lines).await.unwrap()).unwrap();
        assert!(matches!(&answer, HubAnswer::Refused { reason } if reason.contains("not proven")), "{answer:?}");
        assert_eq!(next(&mut lines).await, None);

        // Saying hello without a proof: refused too.
        let (mut lines, mut write) = connect_from("127.0.0.2", addr).await;
        next(&mut lines).await.unwrap();
        write.write_all(to_json_line(&ToHub::Hello { digest: "stale".into() }).as_bytes()).await.unwrap();
        let answer: HubAnswer = serde_json::from_str(&next(&mut lines).await.unwrap()).unwrap();
        assert!(matches!(answer, HubAnswer::Refused { .. }), "{answer:?}");
        assert_eq!(next(&mut lines).await, None);

        // The real session was not disturbed.
        s.services.clear();
        publisher.publish(s);
        let message: ToMember = serde_json::from_str(&next(&mut real).await.unwrap()).unwrap();
        assert!(matches!(message, ToMember::Changes { .. }), "{message:?}");

        // Whoever answers at the hub's address without the hub's key (a local user on the hub's host who
        // bound the port first) is not believed: it cannot make the hub's proof.
        let fake = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let fake_addr = fake.local_addr().unwrap();
        let fake_hub = tokio::spawn(async move {
            let (stream, _) = fake.accept().await.unwrap();
            let (read, mut write) = stream.into_split();
            let mut lines = line_reader(read, MAX_TO_HUB);
            let challenge = PrivateKey::generate();
            write.write_all(to_json_line(&Challenge { challenge: challenge.public_key() }).as_bytes()).await.unwrap();
            let offer: MemberProof = serde_json::from_str(&next_line(&mut lines).await.unwrap().unwrap()).unwrap();
            let own = Handshake::hub(&PrivateKey::generate(), &challenge, &offer.public_key, &offer.ephemeral).unwrap();
            let answer = HubAnswer::Proven { proof: own.hub_proof() };
            write.write_all(to_json_line(&answer).as_bytes()).await.unwrap();
            write.write_all(to_json_line(&ToMember::KeyAccepted).as_bytes()).await.unwrap();
        });
        let (mut lines, mut write) = connect_from("127.0.0.2", fake_addr).await;
        let refused = prove(&mut lines, &mut write, &vps).await.unwrap_err();
        assert!(refused.to_string().contains("not the hub's"), "{refused}");
        fake_hub.await.unwrap();
        server.abort();
    }

    /// A second proven session of a member ends its first; connections that only hold handshakes open
    /// are capped and end without disturbing the proven one.
    #[tokio::test]
    async fn a_new_proven_session_supersedes_the_old_and_idle_handshakes_are_capped() {
        let (mut s, publisher, addr, server, vps) = serve_on_loopback().await;
        let (mut first, _first_write) = proven(addr, &vps, &publisher.digest()).await;
        let mut idle = Vec::new();
        for _ in 0..6 {
            idle.push(connect_from("127.0.0.2", addr).await);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let (mut second, _second_write) = proven(addr, &vps, &publisher.digest()).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (mut third, _third_write) = proven(addr, &vps, &publisher.digest()).await;
        assert_eq!(next(&mut first).await, None, "the first session was superseded");
        assert_eq!(next(&mut second).await, None, "the second session was superseded");
        s.services.clear();
        publisher.publish(s);
        let message: ToMember = serde_json::from_str(&next(&mut third).await.unwrap()).unwrap();
        assert!(matches!(message, ToMember::Changes { .. }), "{message:?}");
        // The idle handshakes were crowded out by the newer ones and the proven sessions' (or timed out).
        for (lines, _) in &mut idle {
            let challenge = next(lines).await;
            assert!(challenge.is_some_and(|c| c.contains("challenge")), "every connection is challenged first");
            assert_eq!(next(lines).await, None, "an idle handshake stays open");
        }
        server.abort();
    }

    /// A real session over loopback: handshake, hello, catch-up, a live change, and the session closed
    /// when the member is removed.
    #[tokio::test]
    async fn a_member_follows_live_changes_until_removed() {
        let (mut s, publisher, addr, server, vps) = serve_on_loopback().await;
        let (mut lines, _write) = proven(addr, &vps, "stale").await;
        let first: ToMember = serde_json::from_str(&next(&mut lines).await.unwrap()).unwrap();
        let ToMember::State { state: mut copy, digest: d } = first else { panic!("expected the whole state") };
        assert_eq!(d, publisher.digest());

        s.services.clear();
        publisher.publish(s.clone());
        let next_message: ToMember = serde_json::from_str(&next(&mut lines).await.unwrap()).unwrap();
        let ToMember::Changes { from, to, changes } = next_message else { panic!("expected changes") };
        assert_eq!(from, d);
        apply(&mut copy, &changes);
        assert_eq!(digest(&copy), to);
        assert_eq!(*copy, s);

        s.nodes.retain(|n| n.name.as_str() != "vps");
        publisher.publish(s);
        let gone: ToMember = serde_json::from_str(&next(&mut lines).await.unwrap()).unwrap();
        assert!(matches!(gone, ToMember::Changes { .. }));
        assert_eq!(next(&mut lines).await, None, "the session of a removed member is closed");

        let (mut lines, _) = connect_from("127.0.0.9", addr).await;
        assert_eq!(next(&mut lines).await, None, "no session for a non-member address");
        server.abort();
    }

    /// A member that sends an endless line is cut off once it passes the limit; the hub does not keep
    /// buffering it.
    #[tokio::test]
    async fn an_overlong_line_from_a_member_ends_its_session() {
        let (_, publisher, addr, server, vps) = serve_on_loopback().await;
        let (lines, mut write) = proven(addr, &vps, &publisher.digest()).await;
        let mut read = lines.into_inner();
        let chunk = vec![b'x'; 1024];
        let mut sent = 0;
        // A valid hello (the hub's own digest: nothing to send back), then one endless line. Writing
        // fails once the hub has closed the session; the limit is 4 KiB.
        while sent < (1 << 20) && write.write_all(&chunk).await.is_ok() {
            sent += chunk.len();
            tokio::task::yield_now().await;
        }
        let mut rest = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(5), read.read_to_end(&mut rest)).await;
        assert!(closed.is_ok(), "the hub kept the session open");
        server.abort();
    }
}
