//! Live updates: the controller pushes the network's state to every member host over one long-lived
//! TCP stream per member, inside the mesh (to the hub's mesh address, [`SYNC_PORT`]), so WireGuard's
//! cryptokey routing is what authenticates a member: its source address can only come from its key.
//!
//! The protocol is JSON lines. A member says `hello` with the digest of the state it has cached; the
//! hub answers with nothing (up to date), the changes since that digest (if it still has them), or the
//! whole state. After that, every change is serialised once and the same line goes to every member.
//! A member applies the changes to its cached copy and plans its own interface from it, exactly as the
//! hub plans its own from the controller's snapshot, so the controller's work per change does not
//! depend on how many peers each host has.
//!
//! [`SYNC_PORT`]: meshd_core::model::SYNC_PORT

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tokio::io::{AsyncRead, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::task::AbortHandle;
use tokio_util::codec::{FramedRead, LinesCodec, LinesCodecError};
use tracing::{debug, info, warn};

use crate::host::admission::{Caps, Gate};
use crate::host::clock;
use meshd_core::input::Label;
use meshd_core::keys::PublicKey;
use meshd_core::model::SharedState;
use meshd_core::session::hub::{self, HubSession, Journal};
use meshd_core::wire::sync::{ToHub, ToMember, line};

/// Longest line a member accepts from the hub (a whole state of a large network fits).
const MAX_TO_MEMBER: usize = 64 << 20;
/// Longest line the hub accepts from a member (hello, key offers: a few hundred bytes).
const MAX_TO_HUB: usize = 4096;
/// How long a connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Reconnect backoff of members.
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// Sessions one member may hold at once: one, and room for reconnects that overlap sessions the hub
/// has not yet seen end. A member opening more is gone bad (or its old sessions died unnoticed): its
/// oldest session is closed, so it can hold no more of the hub's file descriptors than this.
const SESSIONS_PER_MEMBER: usize = 4;
/// Most sessions of all members at a time (within the process's descriptor budget).
const SESSIONS_TOTAL: usize = 16_384;

/// The hub's side: the [`Journal`] of what it published, and the stream every session listens to.
#[derive(Clone)]
pub struct Publisher {
    inner: Arc<RwLock<Published>>,
    sessions: Arc<std::sync::Mutex<Sessions>>,
}

/// Each member's live sessions, oldest first.
#[derive(Default)]
struct Sessions {
    /// The number of the last session.
    last: u64,
    /// By member: (session number, the task to abort).
    live: HashMap<Label, VecDeque<(u64, AbortHandle)>>,
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
}

impl Publisher {
    pub fn new(state: SharedState) -> Publisher {
        let (lines, _) = broadcast::channel(hub::LOG_LEN);
        Publisher {
            inner: Arc::new(RwLock::new(Published { journal: Journal::new(state), lines })),
            sessions: Arc::default(),
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

    /// Accept member sessions on `listener` until the task is dropped. Each session holds a permit of
    /// the listener's gate (see [`crate::host::admission`]); a connection over its caps is closed at once.
    pub async fn serve(self, listener: TcpListener, requests: mpsc::Sender<FromSession>) {
        // Above the sessions a member keeps, so a reconnecting member supersedes its stale sessions
        // (below) before it meets the cap.
        let caps =
            Caps { per_source: 2 * SESSIONS_PER_MEMBER, total: SESSIONS_TOTAL, descriptors: 1, ipv6_by_64: false };
        let gate = Gate::new("sync listener", caps);
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(conn) => conn,
                Err(e) => {
                    warn!(error = %e, "sync: accepting a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Some(node) = self.member(peer.ip()) else {
                debug!(%peer, "sync: connection from an address that is no active member; closed");
                continue;
            };
            let Some(permit) = gate.admit(peer.ip()) else { continue };
            let publisher = self.clone();
            let requests = requests.clone();
            let mut sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
            sessions.last += 1;
            let id = sessions.last;
            let member = node.clone();
            let task = tokio::spawn(async move {
                match publisher.session(stream, peer, member.clone(), requests).await {
                    Ok(()) => debug!(node = %member, "sync session ended"),
                    Err(e) => debug!(node = %member, error = %e, "sync session ended"),
                }
                publisher.session_ended(&member, id);
                drop(permit);
            });
            let live = sessions.live.entry(node.clone()).or_default();
            live.push_back((id, task.abort_handle()));
            if live.len() > SESSIONS_PER_MEMBER
                && let Some((_, oldest)) = live.pop_front()
            {
                warn!(%node, %peer, "sync: too many sessions from one member; closing its oldest");
                oldest.abort();
            }
        }
    }

    /// Session `id` of `node` is over.
    fn session_ended(&self, node: &Label, id: u64) {
        let mut sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(live) = sessions.live.get_mut(node) {
            live.retain(|(other, _)| *other != id);
            if live.is_empty() {
                sessions.live.remove(node);
            }
        }
    }

    /// One member's session: the socket, the broadcast of changes and the controller's verdicts,
    /// driving the session's state machine ([`HubSession`]) and carrying out what it asks for.
    async fn session(
        &self,
        stream: TcpStream,
        peer: SocketAddr,
        node: Label,
        requests: mpsc::Sender<FromSession>,
    ) -> std::io::Result<()> {
        let _ = stream.set_nodelay(true);
        let (read, mut write) = stream.into_split();
        let mut lines = line_reader(read, MAX_TO_HUB);
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

/// The member's side: keep a session with the hub at `hub`, reconnecting with backoff, forward what
/// the hub sends to `events` and what the member's loop sends from `outgoing`. `digest` is the digest
/// of the state the member has, read at each (re)connect.
pub async fn follow(
    hub: SocketAddr,
    digest: watch::Receiver<String>,
    events: mpsc::Sender<SyncEvent>,
    mut outgoing: mpsc::Receiver<Outgoing>,
) {
    let mut pause = BACKOFF_MIN;
    loop {
        let started = tokio::time::Instant::now();
        match session(hub, &digest, &events, &mut outgoing).await {
            Ok(()) => return,
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
    digest: &watch::Receiver<String>,
    events: &mpsc::Sender<SyncEvent>,
    outgoing: &mut mpsc::Receiver<Outgoing>,
) -> std::io::Result<()> {
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(hub))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connecting"))??;
    // When the hub admitted the key the interface used (the member's key rotation relies on it).
    let at = std::time::Instant::now();
    let _ = stream.set_nodelay(true);
    set_keepalive(&stream);
    let (read, mut write) = stream.into_split();
    let hello = ToHub::Hello { digest: digest.borrow().clone() };
    write.write_all(to_line(&hello).as_bytes()).await?;
    info!(%hub, "connected to the controller for live updates");
    // A message belongs to the session it was made in (an offer, a switch): any made for an earlier one
    // is dropped unsent (its `delivered` reports it was not).
    while outgoing.try_recv().is_ok() {}
    if events.send(SyncEvent::Connected { at }).await.is_err() {
        return Ok(());
    }
    let result = live(read, &mut write, events, outgoing).await;
    if result.is_err() && events.send(SyncEvent::Disconnected).await.is_err() {
        return Ok(());
    }
    result
}

/// A session after its hello: what the hub sends goes to `events`, what the member sends goes out.
async fn live(
    read: tokio::net::tcp::OwnedReadHalf,
    write: &mut tokio::net::tcp::OwnedWriteHalf,
    events: &mpsc::Sender<SyncEvent>,
    outgoing: &mut mpsc::Receiver<Outgoing>,
) -> std::io::Result<()> {
    let mut lines = line_reader(read, MAX_TO_MEMBER);
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
                write.write_all(to_line(&message).as_bytes()).await?;
                if let Some(delivered) = delivered {
                    wait_until_acknowledged((*write).as_ref()).await;
                    let _ = delivered.send(());
                }
            }
        }
    }
}

fn to_line(message: &ToHub) -> String {
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
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};

    use meshd_core::fixtures::sample_state as state;
    use meshd_core::wire::sync::{apply, digest};

    use super::*;

    /// The sample network on loopback (member `vps`, index 2, is 127.0.0.2) and a publisher of it serving
    /// on an ephemeral port: the state, the publisher, its address and the serving task.
    async fn serve_on_loopback() -> (SharedState, Publisher, SocketAddr, tokio::task::JoinHandle<()>) {
        let mut s = state();
        s.network.cidr = "127.0.0.0/8".parse().unwrap();
        let publisher = Publisher::new(s.clone());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (requests, _) = mpsc::channel(4);
        let server = tokio::spawn(publisher.clone().serve(listener, requests));
        (s, publisher, addr, server)
    }

    /// A connection to `addr` from `source`, a mesh address on loopback.
    async fn connect_from(source: &str, addr: SocketAddr) -> TcpStream {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::new(source.parse().unwrap(), 0)).unwrap();
        socket.connect(addr).await.unwrap()
    }

    #[test]
    fn a_hello_is_one_line() {
        let hello = to_line(&ToHub::Hello { digest: "x".into() });
        assert_eq!(hello, "{\"msg\":\"hello\",\"digest\":\"x\"}\n");
    }

    /// A member gone bad opens session after session: it holds no more than four; the oldest go, and
    /// the newest sessions keep working.
    #[tokio::test]
    async fn one_member_holds_at_most_four_sessions() {
        let (mut s, publisher, addr, server) = serve_on_loopback().await;
        let mut sessions = Vec::new();
        for _ in 0..6 {
            let (read, mut write) = connect_from("127.0.0.2", addr).await.into_split();
            let lines = BufReader::new(read).lines();
            write.write_all(to_line(&ToHub::Hello { digest: publisher.digest() }).as_bytes()).await.unwrap();
            sessions.push((lines, write));
            // Each connection is accepted before the next one.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        s.services.clear();
        publisher.publish(s);
        for (i, (lines, _)) in sessions.iter_mut().enumerate() {
            let line = tokio::time::timeout(Duration::from_secs(5), lines.next_line()).await.unwrap().unwrap();
            if i < 2 {
                assert_eq!(line, None, "session {i} was closed");
            } else {
                let message: ToMember = serde_json::from_str(&line.unwrap()).unwrap();
                assert!(matches!(message, ToMember::Changes { .. }), "session {i} lives: {message:?}");
            }
        }
        assert_eq!(publisher.sessions.lock().unwrap().live[&"vps".parse::<Label>().unwrap()].len(), 4);
        server.abort();
    }

    /// A real session over loopback: hello, catch-up, a live change, and the session closed when the
    /// member is removed.
    #[tokio::test]
    async fn a_member_follows_live_changes_until_removed() {
        let (mut s, publisher, addr, server) = serve_on_loopback().await;
        let (read, mut write) = connect_from("127.0.0.2", addr).await.into_split();
        let mut lines = BufReader::new(read).lines();
        write.write_all(to_line(&ToHub::Hello { digest: "stale".into() }).as_bytes()).await.unwrap();
        let first: ToMember = serde_json::from_str(&lines.next_line().await.unwrap().unwrap()).unwrap();
        let ToMember::State { state: mut copy, digest: d } = first else { panic!("expected the whole state") };
        assert_eq!(d, publisher.digest());

        s.services.clear();
        publisher.publish(s.clone());
        let next: ToMember = serde_json::from_str(&lines.next_line().await.unwrap().unwrap()).unwrap();
        let ToMember::Changes { from, to, changes } = next else { panic!("expected changes") };
        assert_eq!(from, d);
        apply(&mut copy, &changes);
        assert_eq!(digest(&copy), to);
        assert_eq!(copy, s);

        s.nodes.retain(|n| n.name.as_str() != "vps");
        publisher.publish(s);
        let gone: ToMember = serde_json::from_str(&lines.next_line().await.unwrap().unwrap()).unwrap();
        assert!(matches!(gone, ToMember::Changes { .. }));
        assert_eq!(lines.next_line().await.unwrap(), None, "the session of a removed member is closed");

        let mut lines = BufReader::new(connect_from("127.0.0.9", addr).await).lines();
        assert_eq!(lines.next_line().await.unwrap_or(None), None, "no session for a non-member address");
        server.abort();
    }

    /// A member that sends an endless line is cut off once it passes the limit; the hub does not keep
    /// buffering it.
    #[tokio::test]
    async fn an_overlong_line_from_a_member_ends_its_session() {
        let (_, publisher, addr, server) = serve_on_loopback().await;
        let (mut read, mut write) = connect_from("127.0.0.2", addr).await.into_split();
        let hello = to_line(&ToHub::Hello { digest: publisher.digest() });
        write.write_all(hello.as_bytes()).await.unwrap();
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
