//! UDP forwarding for one mesh address of a service.
//!
//! UDP has no connections, so the forwarder keeps one *session* per client address and port, as
//! conntrack does: the first admitted datagram from a client opens an upstream socket connected to the
//! service's target; the client's datagrams go out through it, and what the target sends back on it
//! goes to the client from the service's mesh address (the socket the client wrote to). A session ends
//! when neither side has sent anything for [`SESSION_IDLE`], when its client loses access (at once, as
//! TCP connections are closed), or when the service stops. A service keeps at most [`MAX_SESSIONS`]
//! per mesh address; a new client beyond that evicts the session whose client was heard from least
//! recently. Datagrams of any size UDP allows (up to [`MAX_DATAGRAM`] bytes) pass whole.
//!
//! Each session also holds a permit of the host's UDP forwarding gate (see [`crate::host::admission`]):
//! when the host's caps are reached, a datagram that would open a session is dropped.
//!
//! Nothing here trusts a datagram: sources are checked against the admitted set before a session
//! exists, contents are never parsed, and every socket error ends at most one session.

use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use super::{Allowed, CONNECT_TIMEOUT};
use crate::host::admission::{Gate, Permit};
use meshd_core::input::{HostPort, Label};

/// A session nobody has sent anything on for this long is closed: between conntrack's timeouts for a
/// one-way UDP flow (30 s) and for one that has seen replies (`nf_conntrack_udp_timeout_stream`, 120 s). Protocols that keep a session open longer send keepalives (WireGuard every 25 s, QUIC
/// every 15-30 s); DNS and similar exchanges are done in well under a second.
pub const SESSION_IDLE: Duration = Duration::from_secs(60);

/// Most sessions one client address (a device or node, over all its ports) keeps at a time, so that one
/// granted client opening sessions from many ports evicts only its own, never other clients'.
pub const MAX_SESSIONS_PER_CLIENT: usize = 256;

/// Most sessions one mesh address of a service keeps at a time. Each holds an upstream socket (one file
/// descriptor) and a task, so this bounds both whatever granted clients do.
pub const MAX_SESSIONS: usize = 1024;

/// The largest UDP payload: over IPv6, 65535 bytes of payload (the fixed header is not counted) less
/// the 8-byte UDP header (RFC 8200 section 3); over IPv4 it is 65507. Buffers hold one byte more, so
/// a datagram that filled one would show as cut short and be dropped rather than forwarded cut.
pub const MAX_DATAGRAM: usize = 65_527;

/// Datagrams queued towards the target per session before more are dropped, as a congested router
/// drops them (sending on a UDP socket rarely waits, so the queue is almost always empty).
const SESSION_QUEUE: usize = 16;

/// Replies passed on in one go before other sessions get their turn.
const REPLY_BATCH: usize = 64;

/// Bounds of a UDP forwarder (the defaults outside tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// A session idle for this long is closed.
    pub idle: Duration,
    /// Most sessions at a time; a new client beyond this evicts the least recently heard one.
    pub max_sessions: usize,
    /// Most sessions of one client address; beyond this its own quietest session is evicted.
    pub max_per_client: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits { idle: SESSION_IDLE, max_sessions: MAX_SESSIONS, max_per_client: MAX_SESSIONS_PER_CLIENT }
    }
}

/// The sessions of one UDP socket by client address and port, with when each client was last heard.
/// Pure (time comes in as an argument), so eviction is tested without sockets or waiting.
#[derive(Debug)]
pub struct Sessions<S> {
    max: usize,
    max_per_client: usize,
    by_client: HashMap<SocketAddr, (Instant, S)>,
}

impl<S> Sessions<S> {
    /// No sessions yet; at most `max` at a time, and `max_per_client` of one client address (each at
    /// least one).
    pub fn new(max: usize, max_per_client: usize) -> Sessions<S> {
        Sessions { max: max.max(1), max_per_client: max_per_client.max(1), by_client: HashMap::new() }
    }

    /// The session of `client`, marked as heard from at `now`.
    pub fn get(&mut self, client: SocketAddr, now: Instant) -> Option<&mut S> {
        self.by_client.get_mut(&client).map(|(heard, session)| {
            *heard = now;
            session
        })
    }

    /// Add the session of a new `client`. A client address at its own limit loses its quietest session.
    /// Otherwise, when full, sessions for which `ended` holds are dropped first; if that frees no room,
    /// the session whose client was heard from least recently is evicted. The evicted client is returned.
    pub fn insert(
        &mut self,
        client: SocketAddr,
        session: S,
        now: Instant,
        ended: impl Fn(&S) -> bool,
    ) -> Option<SocketAddr> {
        let quietest = |sessions: &HashMap<SocketAddr, (Instant, S)>, of: &dyn Fn(&SocketAddr) -> bool| {
            sessions.iter().filter(|(c, _)| of(c)).min_by_key(|(_, (heard, _))| *heard).map(|(c, _)| *c)
        };
        let same_client = |c: &SocketAddr| c.ip() == client.ip();
        let own = |sessions: &HashMap<SocketAddr, (Instant, S)>| sessions.keys().filter(|c| same_client(c)).count();
        let mut evicted = None;
        if !self.by_client.contains_key(&client) {
            if own(&self.by_client) >= self.max_per_client || self.by_client.len() >= self.max {
                self.by_client.retain(|_, (_, s)| !ended(s));
            }
            evicted = if own(&self.by_client) >= self.max_per_client {
                quietest(&self.by_client, &same_client)
            } else if self.by_client.len() >= self.max {
                quietest(&self.by_client, &|_| true)
            } else {
                None
            };
            if let Some(quietest) = evicted {
                self.by_client.remove(&quietest);
            }
        }
        self.by_client.insert(client, (now, session));
        evicted
    }

    /// Drop the session of `client`, if any.
    pub fn remove(&mut self, client: SocketAddr) {
        self.by_client.remove(&client);
    }

    /// Keep only the sessions whose client `keep` accepts; returns how many were dropped.
    pub fn retain(&mut self, keep: impl Fn(&SocketAddr) -> bool) -> usize {
        let before = self.by_client.len();
        self.by_client.retain(|client, _| keep(client));
        before - self.by_client.len()
    }

    /// How many sessions there are.
    pub fn len(&self) -> usize {
        self.by_client.len()
    }

    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.by_client.is_empty()
    }
}

/// A running session: the queue towards its task, which owns the upstream socket. Dropping it ends the
/// task, and with it the upstream socket: nothing the target sends afterwards reaches the client.
struct Session {
    to_target: mpsc::Sender<Vec<u8>>,
    task: JoinHandle<()>,
}

impl Session {
    /// Whether the task has finished (idle, or the target could not be reached).
    fn ended(&self) -> bool {
        self.to_target.is_closed()
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Serve `service` on `socket` until the allowed set's sender is dropped (the service stopped) or the
/// task is aborted: admitted clients' datagrams go to `target`, the replies come back from `socket`.
/// Every session holds a permit of `gate`.
pub async fn serve(
    service: Label,
    socket: UdpSocket,
    target: HostPort,
    mut allowed: watch::Receiver<Allowed>,
    limits: Limits,
    gate: Arc<Gate>,
) {
    let socket = Arc::new(socket);
    let mut sessions: Sessions<Session> = Sessions::new(limits.max_sessions, limits.max_per_client);
    // One buffer for every client of this address: larger than any UDP payload, so nothing is cut.
    let mut buf = vec![0u8; MAX_DATAGRAM + 1];
    loop {
        tokio::select! {
            received = socket.recv_from(&mut buf) => {
                let (len, client) = match received {
                    Ok(received) => received,
                    Err(e) => {
                        // An error on the shared socket is not any one client's; keep serving.
                        debug!(%service, error = %e, "receive failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                if !allowed.borrow().contains(&client.ip()) {
                    debug!(%service, %client, "datagram refused: not granted");
                    continue;
                }
                if len > MAX_DATAGRAM {
                    debug!(%service, %client, "datagram larger than UDP allows: dropped");
                    continue;
                }
                let datagram = buf.get(..len).unwrap_or_default().to_vec();
                let new = Opening { service: &service, socket: &socket, target: &target, gate: &gate, limits };
                forward(new, &mut sessions, client, datagram);
            }
            changed = allowed.changed() => {
                if changed.is_err() {
                    return;
                }
                let now_allowed = allowed.borrow_and_update().clone();
                let cut = sessions.retain(|client| now_allowed.contains(&client.ip()));
                if cut > 0 {
                    info!(%service, sessions = cut, "access withdrawn: UDP sessions closed");
                }
            }
        }
    }
}

/// What opening a session of one service's socket takes.
struct Opening<'a> {
    service: &'a Label,
    socket: &'a Arc<UdpSocket>,
    target: &'a HostPort,
    gate: &'a Arc<Gate>,
    limits: Limits,
}

/// Queue `datagram` on the session of `client`, opening one if it has none (or its last one ended) and
/// the gate admits it.
fn forward(new: Opening<'_>, sessions: &mut Sessions<Session>, client: SocketAddr, datagram: Vec<u8>) {
    let Opening { service, socket, target, gate, limits } = new;
    let now = Instant::now();
    let datagram = match sessions.get(client, now) {
        Some(session) => match session.to_target.try_send(datagram) {
            Ok(()) => return,
            Err(TrySendError::Full(_)) => return debug!(%service, %client, "session queue full: datagram dropped"),
            Err(TrySendError::Closed(datagram)) => {
                sessions.remove(client);
                datagram
            }
        },
        None => datagram,
    };
    // Over the host's caps the datagram is dropped, as a full router drops it (the gate reports refusals).
    let Some(permit) = gate.admit(client.ip()) else { return };
    let (to_target, from_client) = mpsc::channel(SESSION_QUEUE);
    // The queue is new and empty: the first datagram always fits.
    let _ = to_target.try_send(datagram);
    let ends = Ends { client, target: target.clone(), socket: socket.clone() };
    let task = tokio::spawn(relay(service.clone(), ends, from_client, limits.idle, permit));
    let evicted = sessions.insert(client, Session { to_target, task }, now, Session::ended);
    debug!(%service, %client, sessions = sessions.len(), "UDP session opened");
    if let Some(quietest) = evicted {
        // At debug level: a client flooding from many ports would otherwise write a line per datagram.
        debug!(%service, client = %quietest, max = limits.max_sessions, "too many UDP sessions: the quietest closed");
    }
}

/// One session: connect to the target, then pass datagrams both ways until it is idle for `idle`, its
/// queue is dropped (access withdrawn, evicted, service stopped) or the target cannot be reached.
/// The two ends of a session: the client (reached through the service's socket) and the target.
struct Ends {
    client: SocketAddr,
    target: HostPort,
    socket: Arc<UdpSocket>,
}

async fn relay(service: Label, ends: Ends, mut from_client: mpsc::Receiver<Vec<u8>>, idle: Duration, _permit: Permit) {
    let Ends { client, target, socket } = ends;
    let upstream = match tokio::time::timeout(CONNECT_TIMEOUT, connect(&target)).await {
        Ok(Ok(upstream)) => upstream,
        Ok(Err(e)) => return warn!(%service, %target, error = %e, "target unreachable"),
        Err(_) => return warn!(%service, %target, "target name did not resolve in time"),
    };
    loop {
        let event = tokio::time::timeout(idle, async {
            tokio::select! {
                datagram = from_client.recv() => Event::FromClient(datagram),
                ready = upstream.readable() => Event::Reply(ready),
            }
        });
        match event.await {
            Err(_) => return debug!(%service, %client, "UDP session idle: closed"),
            Ok(Event::FromClient(None)) => return,
            Ok(Event::FromClient(Some(datagram))) => {
                // A refusal (ICMP port unreachable from an earlier datagram) is reported here; the target
                // may come back, so the session stays.
                if let Err(e) = upstream.send(&datagram).await {
                    debug!(%service, %target, error = %e, "sending to the target failed");
                }
            }
            Ok(Event::Reply(Err(e))) => return debug!(%service, %target, error = %e, "upstream socket failed"),
            Ok(Event::Reply(Ok(()))) => pass_replies(&service, &upstream, &socket, client),
        }
    }
}

enum Event {
    FromClient(Option<Vec<u8>>),
    Reply(io::Result<()>),
}

/// Pass what the target sent (up to [`REPLY_BATCH`] datagrams) to the client, from the service's address.
/// A datagram the client's side cannot take now is dropped, as UDP allows.
fn pass_replies(service: &Label, upstream: &UdpSocket, socket: &UdpSocket, client: SocketAddr) {
    let mut buf = [0u8; MAX_DATAGRAM + 1];
    for _ in 0..REPLY_BATCH {
        match upstream.try_recv(&mut buf) {
            Ok(len) if len > MAX_DATAGRAM => debug!(%service, "reply larger than UDP allows: dropped"),
            Ok(len) => {
                if let Err(e) = socket.try_send_to(buf.get(..len).unwrap_or_default(), client) {
                    debug!(%service, %client, error = %e, "reply dropped");
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(e) => return debug!(%service, error = %e, "receiving from the target failed"),
        }
    }
}

/// A socket connected to the target (resolved now if it is a name), so only the target's datagrams
/// arrive on it.
async fn connect(target: &HostPort) -> io::Result<UdpSocket> {
    let addr = match target.ip() {
        Some(ip) => SocketAddr::new(ip, target.port()),
        None => tokio::net::lookup_host((target.host(), target.port()))
            .await?
            .next()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("{} has no address", target.host())))?,
    };
    let any: SocketAddr =
        if addr.is_ipv4() { (Ipv4Addr::UNSPECIFIED, 0).into() } else { (Ipv6Addr::UNSPECIFIED, 0).into() };
    let socket = UdpSocket::bind(any).await?;
    socket.connect(addr).await?;
    Ok(socket)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::admission::{Budget, Caps};
    use std::collections::BTreeSet;
    use std::net::IpAddr;

    fn client(port: u16) -> SocketAddr {
        SocketAddr::from(([10, 77, 0, 4], port))
    }

    #[test]
    fn a_full_table_evicts_ended_sessions_first_then_the_quietest() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut sessions: Sessions<&str> = Sessions::new(2, 8);
        assert_eq!(sessions.insert(client(1), "live", at(0), |_| false), None);
        assert_eq!(sessions.insert(client(2), "live", at(1), |_| false), None);
        assert!(sessions.get(client(1), at(2)).is_some(), "client 1 is heard from again");
        assert_eq!(sessions.insert(client(3), "live", at(3), |_| false), Some(client(2)), "the quietest goes");
        assert!(sessions.get(client(2), at(4)).is_none());

        *sessions.get(client(1), at(5)).unwrap() = "ended";
        assert_eq!(sessions.insert(client(4), "live", at(6), |s| *s == "ended"), None, "an ended session goes first");
        assert!(sessions.get(client(1), at(7)).is_none());
        assert_eq!(sessions.len(), 2);
        assert_eq!(sessions.insert(client(4), "again", at(8), |_| false), None, "a known client replaces its own");
    }

    #[test]
    fn a_client_opening_sessions_from_many_ports_evicts_only_its_own() {
        let t0 = Instant::now();
        let other = SocketAddr::from(([10, 77, 0, 9], 5000));
        let mut sessions: Sessions<u16> = Sessions::new(8, 3);
        sessions.insert(other, 0, t0, |_| false);
        for port in 1..=100u16 {
            let evicted = sessions.insert(client(port), port, t0 + Duration::from_secs(port.into()), |_| false);
            if port > 3 {
                assert_eq!(evicted, Some(client(port - 3)), "its own quietest goes");
            }
        }
        assert_eq!(sessions.len(), 4);
        assert!(sessions.get(other, t0).is_some(), "the other client keeps its session");
    }

    #[test]
    fn withdrawn_clients_lose_their_sessions() {
        let now = Instant::now();
        let mut sessions = Sessions::new(8, 8);
        for port in 1..=3 {
            sessions.insert(client(port), (), now, |_| false);
        }
        sessions.insert(SocketAddr::from(([10, 77, 0, 5], 1)), (), now, |_| false);
        assert_eq!(sessions.retain(|c| c.ip() != client(0).ip()), 3);
        assert_eq!(sessions.len(), 1);
        assert_eq!(Sessions::<()>::new(0, 0).insert(client(1), (), now, |_| false), None, "at least one session");
    }

    /// A UDP echo on loopback; returns its address.
    async fn echo_server(ip: IpAddr) -> SocketAddr {
        let socket = UdpSocket::bind((ip, 0)).await.unwrap();
        let addr = socket.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 70_000];
            while let Ok((n, from)) = socket.recv_from(&mut buf).await {
                let _ = socket.send_to(&buf[..n], from).await;
            }
        });
        addr
    }

    /// A forwarder on a free loopback port towards `target`, admitting `allowed`.
    async fn forwarder(
        listen_ip: IpAddr,
        target: SocketAddr,
        allowed: &[IpAddr],
        limits: Limits,
    ) -> (SocketAddr, watch::Sender<Allowed>, JoinHandle<()>) {
        let caps = Caps { per_source: 64, total: 64, descriptors: 1, internet: false };
        gated_forwarder(listen_ip, target, allowed, limits, Gate::with_budget("test", caps, Budget::new(64))).await
    }

    /// [`forwarder`] with the host's gate `gate`.
    async fn gated_forwarder(
        listen_ip: IpAddr,
        target: SocketAddr,
        allowed: &[IpAddr],
        limits: Limits,
        gate: Arc<Gate>,
    ) -> (SocketAddr, watch::Sender<Allowed>, JoinHandle<()>) {
        let socket = crate::host::socket::bind_udp((listen_ip, 0).into()).unwrap();
        let listen = socket.local_addr().unwrap();
        let (tx, rx) = watch::channel(Arc::new(allowed.iter().copied().collect::<BTreeSet<_>>()));
        let task =
            tokio::spawn(serve("echo".parse().unwrap(), socket, target.to_string().parse().unwrap(), rx, limits, gate));
        (listen, tx, task)
    }

    /// Send `payload` from `client` and wait up to 1 s for a datagram back; None if nothing came.
    async fn exchange(client: &UdpSocket, to: SocketAddr, payload: &[u8]) -> Option<(Vec<u8>, SocketAddr)> {
        client.send_to(payload, to).await.unwrap();
        let mut buf = vec![0u8; 70_000];
        let (n, from) = tokio::time::timeout(Duration::from_secs(1), client.recv_from(&mut buf)).await.ok()?.ok()?;
        Some((buf[..n].to_vec(), from))
    }

    #[tokio::test]
    async fn echoes_granted_clients_over_v4_and_v6_from_the_service_address() {
        for ip in [IpAddr::from(Ipv4Addr::LOCALHOST), IpAddr::from(Ipv6Addr::LOCALHOST)] {
            let target = echo_server(ip).await;
            let (listen, _allowed, _task) = forwarder(ip, target, &[ip], Limits::default()).await;
            let phone = UdpSocket::bind((ip, 0)).await.unwrap();
            let (reply, from) = exchange(&phone, listen, b"ping").await.expect("an echo");
            assert_eq!((reply.as_slice(), from), (&b"ping"[..], listen), "the reply comes from the service");
            // The largest payload of each family passes whole (IPv6 counts no header in its length).
            let size = if ip.is_ipv4() { 65_507 } else { MAX_DATAGRAM };
            let largest = vec![0xa5; size];
            let (reply, _) = exchange(&phone, listen, &largest).await.expect("the largest datagram is echoed");
            assert_eq!(reply.len(), size);
            assert_eq!(exchange(&phone, listen, b"").await.map(|(r, _)| r), Some(vec![]), "an empty datagram");
        }
    }

    #[tokio::test]
    async fn a_client_over_the_hosts_session_cap_gets_no_new_session_while_others_do() {
        let ip: IpAddr = Ipv4Addr::LOCALHOST.into();
        let other: IpAddr = Ipv4Addr::new(127, 0, 0, 2).into();
        let target = echo_server(ip).await;
        let caps = Caps { per_source: 2, total: 3, descriptors: 1, internet: false };
        let gate = Gate::with_budget("test", caps, Budget::new(100));
        let (listen, _allowed, _task) =
            gated_forwarder(ip, target, &[ip, other], Limits::default(), gate.clone()).await;
        let mut clients = Vec::new();
        for _ in 0..2 {
            let client = UdpSocket::bind((ip, 0)).await.unwrap();
            assert!(exchange(&client, listen, b"ping").await.is_some(), "within the cap");
            clients.push(client);
        }
        let third = UdpSocket::bind((ip, 0)).await.unwrap();
        assert!(exchange(&third, listen, b"ping").await.is_none(), "a third session of one client address");
        let elsewhere = UdpSocket::bind((other, 0)).await.unwrap();
        assert!(exchange(&elsewhere, listen, b"ping").await.is_some(), "another client still gets one");
        assert_eq!(gate.open(), 3);
        assert!(exchange(&clients[0], listen, b"again").await.is_some(), "open sessions keep working");
    }

    #[tokio::test]
    async fn refuses_others_and_cuts_sessions_when_access_is_withdrawn() {
        let granted: IpAddr = Ipv4Addr::LOCALHOST.into();
        // A target that records who wrote, so it can also send unasked on an open session.
        let target = UdpSocket::bind((granted, 0)).await.unwrap();
        let not_granted = [IpAddr::from([10, 77, 0, 9])];
        let (listen, allowed, task) =
            forwarder(granted, target.local_addr().unwrap(), &not_granted, Limits::default()).await;
        let phone = UdpSocket::bind((granted, 0)).await.unwrap();
        let mut buf = [0u8; 16];
        phone.send_to(b"ping", listen).await.unwrap();
        let heard = tokio::time::timeout(Duration::from_millis(300), target.recv_from(&mut buf)).await;
        assert!(heard.is_err(), "a client not granted reaches nothing");

        allowed.send_replace(Arc::new(BTreeSet::from([granted])));
        tokio::time::sleep(Duration::from_millis(50)).await;
        phone.send_to(b"ping", listen).await.unwrap();
        let (_, upstream) = target.recv_from(&mut buf).await.unwrap();
        target.send_to(b"push", upstream).await.unwrap();
        let (n, _) = tokio::time::timeout(Duration::from_secs(1), phone.recv_from(&mut buf)).await.unwrap().unwrap();
        assert_eq!(&buf[..n], b"push", "granted now: the target reaches the client on its session");

        allowed.send_replace(Arc::new(BTreeSet::new()));
        tokio::time::sleep(Duration::from_millis(50)).await;
        target.send_to(b"push", upstream).await.unwrap();
        let pushed = tokio::time::timeout(Duration::from_millis(300), phone.recv_from(&mut buf)).await;
        assert!(pushed.is_err(), "the session must be gone at once, not when it idles out");
        phone.send_to(b"ping", listen).await.unwrap();
        let heard = tokio::time::timeout(Duration::from_millis(300), target.recv_from(&mut buf)).await;
        assert!(heard.is_err(), "and the client's datagrams are refused again");

        drop(allowed);
        tokio::time::timeout(Duration::from_secs(1), task).await.expect("the forwarder stops").unwrap();
    }

    #[tokio::test]
    async fn idle_sessions_expire_and_a_full_table_takes_new_clients() {
        let ip: IpAddr = Ipv4Addr::LOCALHOST.into();
        // A target that answers from where the session's upstream socket can see: it records who wrote.
        let target = UdpSocket::bind((ip, 0)).await.unwrap();
        let target_addr = target.local_addr().unwrap();
        let limits = Limits { idle: Duration::from_millis(300), max_sessions: 2, max_per_client: 2 };
        let (listen, _allowed, _task) = forwarder(ip, target_addr, &[ip], limits).await;
        let mut buf = [0u8; 16];
        let phones = [
            UdpSocket::bind((ip, 0)).await.unwrap(),
            UdpSocket::bind((ip, 0)).await.unwrap(),
            UdpSocket::bind((ip, 0)).await.unwrap(),
        ];
        let mut upstream_of = Vec::new();
        for phone in &phones {
            phone.send_to(b"hello", listen).await.unwrap();
            let (_, upstream) = target.recv_from(&mut buf).await.unwrap();
            upstream_of.push(upstream);
        }
        // The third client evicted the first: a reply to the first's upstream socket goes nowhere.
        target.send_to(b"late", upstream_of[0]).await.unwrap();
        target.send_to(b"to 3", upstream_of[2]).await.unwrap();
        let mut reply = [0u8; 16];
        let (n, _) =
            tokio::time::timeout(Duration::from_secs(1), phones[2].recv_from(&mut reply)).await.unwrap().unwrap();
        assert_eq!(&reply[..n], b"to 3");
        assert!(tokio::time::timeout(Duration::from_millis(200), phones[0].recv_from(&mut reply)).await.is_err());

        // Idle past the limit: the session is gone, and the client's next datagram opens a new one.
        tokio::time::sleep(Duration::from_millis(500)).await;
        target.send_to(b"stale", upstream_of[2]).await.unwrap();
        assert!(tokio::time::timeout(Duration::from_millis(200), phones[2].recv_from(&mut reply)).await.is_err());
        phones[2].send_to(b"again", listen).await.unwrap();
        let (_, upstream) = target.recv_from(&mut buf).await.unwrap();
        target.send_to(b"fresh", upstream).await.unwrap();
        let (n, _) =
            tokio::time::timeout(Duration::from_secs(1), phones[2].recv_from(&mut reply)).await.unwrap().unwrap();
        assert_eq!(&reply[..n], b"fresh", "a new session carries replies again");
    }
}
