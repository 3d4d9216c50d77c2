//! Service forwarders: a TCP listener (or a UDP socket, see [`udp`]) on each mesh address of a local
//! service that relays admitted connections (datagrams) to the service's target (a namespace address
//! such as `169.254.1.17:9737`, or loopback). It listens on [`PRIVILEGED_PORT`], where the access rules
//! send what clients write to the service's own port: another user on the host cannot bind it first. The forwarder checks the peer's source address itself too,
//! so access holds even where the firewall is bypassed, and it cuts live connections (sessions) of a
//! peer whose access is withdrawn.
//!
//! Granted peers are still not trusted with the daemon's resources: every connection (UDP session) holds
//! a permit of the host's forwarding [`Gate`] (at most [`PER_SOURCE`] per client address and [`TOTAL`]
//! over all services, within the process's descriptor budget), a connection with no byte either way for
//! [`IDLE`] is closed, and the target gets [`CONNECT_TIMEOUT`] to accept.
pub mod udp;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::host::admission::{Caps, Gate, Permit};
use meshd_core::input::{HostPort, Label};
use meshd_core::model::Protocol;
#[cfg(any(doc, test))]
use meshd_core::plan::PRIVILEGED_PORT;
use meshd_core::plan::ServicePlan;

/// How long a forwarder waits for the service's target to accept.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A forwarded TCP connection with no byte either way for this long is closed. Long enough for an idle
/// SSH or database session between keepalives; short enough that connections whose client vanished
/// (a phone that went offline sends no FIN) do not pile up. Applications that idle longer send
/// keepalives (`ssh -o ServerAliveInterval=60`).
pub const IDLE: Duration = Duration::from_secs(30 * 60);
/// Most forwarded connections (and, separately, UDP sessions) of one client address over all services:
/// far more than a browser or an app opens, far fewer than the descriptors the host has.
pub const PER_SOURCE: usize = 256;
/// Most forwarded connections (and, separately, UDP sessions) of all clients over all services.
pub const TOTAL: usize = 4096;

/// A listener could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("service {service}: listening on {addr}")]
pub struct ForwardError {
    service: Label,
    addr: SocketAddr,
    #[source]
    source: std::io::Error,
}

/// The source addresses a forwarder admits; replaced whole when grants change.
type Allowed = Arc<BTreeSet<IpAddr>>;

struct Running {
    listen: Vec<SocketAddr>,
    target: HostPort,
    protocol: Protocol,
    allowed: watch::Sender<Allowed>,
    listeners: Vec<JoinHandle<()>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        // Closing the listeners and emptying the allowed set ends every open connection (and UDP
        // session) too.
        self.listeners.iter().for_each(JoinHandle::abort);
        self.allowed.send_replace(Arc::default());
    }
}

/// The forwarders of one host.
pub struct Forwarders {
    running: BTreeMap<Label, Running>,
    /// Admission of TCP connections: two descriptors each (the client's and the target's).
    tcp: Arc<Gate>,
    /// Admission of UDP sessions: one upstream socket each.
    udp: Arc<Gate>,
}

impl Default for Forwarders {
    fn default() -> Forwarders {
        let caps = Caps { per_source: PER_SOURCE, total: TOTAL, descriptors: 2, internet: false };
        Forwarders {
            running: BTreeMap::new(),
            tcp: Gate::new("TCP forwarders", caps),
            udp: Gate::new("UDP forwarders", Caps { descriptors: 1, ..caps }),
        }
    }
}

impl Forwarders {
    /// Make the running forwarders match `plans`: start new ones, stop removed ones, and update who is
    /// admitted in place (connections and UDP sessions of peers no longer admitted are closed). A service
    /// whose addresses, target or protocol changed is restarted.
    pub fn apply(&mut self, plans: &[ServicePlan]) -> Result<(), ForwardError> {
        let wanted: BTreeSet<&Label> = plans.iter().map(|p| &p.name).collect();
        self.running.retain(|name, _| wanted.contains(name));
        for plan in plans {
            let allowed: Allowed = Arc::new(plan.allowed.clone());
            match self.running.get(&plan.name) {
                Some(r) if r.listen == plan.listen && r.target == plan.target && r.protocol == plan.protocol => {
                    r.allowed.send_if_modified(|current| {
                        let changed = *current != allowed;
                        *current = allowed.clone();
                        changed
                    });
                }
                _ => {
                    self.running.remove(&plan.name);
                    let running = start(plan, allowed, &self.tcp, &self.udp)?;
                    self.running.insert(plan.name.clone(), running);
                }
            }
        }
        Ok(())
    }
}

fn start(plan: &ServicePlan, allowed: Allowed, tcp: &Arc<Gate>, udp: &Arc<Gate>) -> Result<Running, ForwardError> {
    let (tx, rx) = watch::channel(allowed);
    let mut listeners = Vec::new();
    for (&addr, bound) in plan.listen.iter().zip(plan.bound()) {
        let failed = |source| ForwardError { service: plan.name.clone(), addr: bound, source };
        let (service, target) = (plan.name.clone(), plan.target.clone());
        info!(%service, %addr, via = %bound, %target, protocol = %plan.protocol, "forwarding");
        listeners.push(match plan.protocol {
            Protocol::Tcp => {
                let listener = crate::host::socket::listen_tcp(bound).map_err(failed)?;
                tokio::spawn(accept_loop(service, listener, target, rx.clone(), tcp.clone()))
            }
            Protocol::Udp => {
                let socket = crate::host::socket::bind_udp(bound).map_err(failed)?;
                tokio::spawn(udp::serve(service, socket, target, rx.clone(), udp::Limits::default(), udp.clone()))
            }
        });
    }
    Ok(Running {
        listen: plan.listen.clone(),
        target: plan.target.clone(),
        protocol: plan.protocol,
        allowed: tx,
        listeners,
    })
}

async fn accept_loop(
    service: Label,
    listener: TcpListener,
    target: HostPort,
    allowed: watch::Receiver<Allowed>,
    gate: Arc<Gate>,
) {
    loop {
        let (inbound, peer) = crate::host::socket::accept(&listener, service.as_str()).await;
        // Refusals are not logged one line each: a flood would fill the log (the gate reports its own).
        if !allowed.borrow().contains(&peer.ip()) {
            debug!(%service, peer = %peer.ip(), "refused: not granted");
            continue;
        }
        let Some(permit) = gate.admit(peer.ip()) else { continue };
        tokio::spawn(relay(service.clone(), inbound, peer.ip(), target.clone(), allowed.clone(), permit, IDLE));
    }
}

async fn relay(
    service: Label,
    inbound: TcpStream,
    peer: IpAddr,
    target: HostPort,
    mut allowed: watch::Receiver<Allowed>,
    _permit: Permit,
    idle: Duration,
) {
    let connect = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect((target.host(), target.port())));
    let mut outbound = match connect.await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => return warn!(%service, %target, error = %e, "target unreachable"),
        Err(_) => return warn!(%service, %target, "target did not accept in time"),
    };
    let _ = inbound.set_nodelay(true);
    let _ = outbound.set_nodelay(true);
    debug!(%service, %peer, "relaying");
    let revoked = async {
        loop {
            if allowed.changed().await.is_err() || !allowed.borrow_and_update().contains(&peer) {
                return;
            }
        }
    };
    let mut inbound = Watched::new(inbound);
    let last_heard = inbound.last.clone();
    tokio::select! {
        result = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {
            if let Err(e) = result {
                debug!(%service, %peer, error = %e, "connection ended");
            }
        }
        () = revoked => info!(%service, %peer, "access withdrawn: connection closed"),
        () = last_heard.idle_for(idle) => debug!(%service, %peer, "connection idle: closed"),
    }
}

/// When a connection last carried a byte, as milliseconds since it started (so one atomic holds it).
struct LastHeard {
    start: Instant,
    millis: AtomicU64,
}

impl LastHeard {
    fn touch(&self) {
        let millis = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.millis.store(millis, Ordering::Relaxed);
    }

    /// Returns once no byte has passed for `idle`.
    async fn idle_for(&self, idle: Duration) {
        loop {
            let last = self.start + Duration::from_millis(self.millis.load(Ordering::Relaxed));
            let deadline = last + idle;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline.into()).await;
        }
    }
}

/// The client's side of a forwarded connection, noting every byte that passes either way.
struct Watched {
    stream: TcpStream,
    last: Arc<LastHeard>,
}

impl Watched {
    fn new(stream: TcpStream) -> Watched {
        Watched { stream, last: Arc::new(LastHeard { start: Instant::now(), millis: AtomicU64::new(0) }) }
    }
}

impl AsyncRead for Watched {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.stream).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.last.touch();
        }
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.stream).poll_write(cx, data);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.last.touch();
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn echo_server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        addr
    }

    /// A service on loopback address `ip` (port 9737), and where its forwarder listens: `ip` at
    /// `PRIVILEGED_PORT` (binding it takes root, as meshd has; each test has its own address).
    fn plan(ip: &str, target: SocketAddr, allowed: &[&str]) -> (ServicePlan, SocketAddr) {
        let plan = ServicePlan {
            name: "echo".parse().unwrap(),
            listen: vec![SocketAddr::new(ip.parse().unwrap(), 9737)],
            target: target.to_string().parse().unwrap(),
            allowed: allowed.iter().map(|a| a.parse().unwrap()).collect(),
            protocol: Protocol::Tcp,
        };
        let bound = plan.bound().next().unwrap();
        assert_eq!(bound.port(), PRIVILEGED_PORT);
        (plan, bound)
    }

    async fn round_trip(addr: SocketAddr) -> std::io::Result<Vec<u8>> {
        let mut s = TcpStream::connect(addr).await?;
        s.write_all(b"ping").await?;
        let mut buf = vec![0u8; 4];
        tokio::time::timeout(Duration::from_secs(2), s.read_exact(&mut buf))
            .await
            .map_err(|_| std::io::ErrorKind::TimedOut)??;
        Ok(buf)
    }

    #[tokio::test]
    async fn relays_granted_peers_and_refuses_others() {
        let target = echo_server().await;
        let (granted, listen) = plan("127.0.21.1", target, &["127.0.0.1"]);
        let mut f = Forwarders::default();

        f.apply(&[granted]).unwrap();
        assert_eq!(round_trip(listen).await.unwrap(), b"ping");

        // Withdraw access: new connections are refused, and an open one is cut.
        let mut open = TcpStream::connect(listen).await.unwrap();
        open.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        open.read_exact(&mut buf).await.unwrap();
        f.apply(&[plan("127.0.21.1", target, &["10.77.0.9"]).0]).unwrap();
        let n = tokio::time::timeout(Duration::from_secs(2), open.read(&mut buf))
            .await
            .expect("cut within 2 s")
            .unwrap_or(0);
        assert_eq!(n, 0, "the open connection must be closed");
        assert!(round_trip(listen).await.is_err(), "a refused peer must get nothing back");

        // Removing the service closes its listener.
        f.apply(&[]).unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(TcpStream::connect(listen).await.is_err());
    }

    /// A relayed connection to `target` from a granted loopback client, closed after `idle` without a byte.
    async fn relayed(target: SocketAddr, idle: Duration, gate: &Arc<Gate>) -> TcpStream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (inbound, peer) = listener.accept().await.unwrap();
        let allowed: Allowed = Arc::new([peer.ip()].into_iter().collect());
        let (access, rx) = watch::channel(allowed);
        let permit = gate.admit(peer.ip()).expect("permit");
        let target = target.to_string().parse().unwrap();
        tokio::spawn(async move {
            let _access = access;
            relay("echo".parse().unwrap(), inbound, peer.ip(), target, rx, permit, idle).await;
        });
        client
    }

    #[tokio::test]
    async fn a_connection_idle_both_ways_is_closed_and_gives_its_permit_back() {
        let target = echo_server().await;
        let caps = Caps { per_source: 4, total: 4, descriptors: 2, internet: false };
        let gate = Gate::with_budget("test", caps, crate::host::admission::Budget::new(8));
        let idle = Duration::from_millis(400);
        let mut client = relayed(target, idle, &gate).await;
        let mut buf = [0u8; 4];
        // Traffic keeps it open past the idle time...
        for _ in 0..4 {
            tokio::time::sleep(idle / 2).await;
            client.write_all(b"ping").await.unwrap();
            client.read_exact(&mut buf).await.expect("still open while busy");
        }
        assert_eq!(gate.open(), 1);
        // ...silence closes it.
        let started = std::time::Instant::now();
        let n = tokio::time::timeout(Duration::from_secs(3), client.read(&mut buf)).await.expect("closed").unwrap_or(0);
        assert_eq!(n, 0);
        assert!(started.elapsed() >= idle - Duration::from_millis(50), "closed after {:?}", started.elapsed());
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(gate.open(), 0, "the permit is given back");
    }

    #[tokio::test]
    async fn a_client_over_its_cap_is_not_relayed_while_others_are() {
        let target = echo_server().await;
        let (granted, listen) = plan("127.0.21.2", target, &["127.0.0.1", "127.0.0.2"]);
        let mut f = Forwarders::default();
        let caps = Caps { per_source: 2, total: 10, descriptors: 2, internet: false };
        f.tcp = Gate::with_budget("test", caps, crate::host::admission::Budget::new(100));
        f.apply(&[granted]).unwrap();
        let mut held = Vec::new();
        for _ in 0..2 {
            let mut s = TcpStream::connect(listen).await.unwrap();
            s.write_all(b"ping").await.unwrap();
            let mut buf = [0u8; 4];
            s.read_exact(&mut buf).await.unwrap();
            held.push(s);
        }
        assert!(round_trip(listen).await.is_err(), "a third connection of one client is refused");
        let other = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        other.bind(&SocketAddr::from(([127, 0, 0, 2], 0)).into()).unwrap();
        other.connect(&listen.into()).unwrap();
        other.set_nonblocking(true).unwrap();
        let mut other = TcpStream::from_std(other.into()).unwrap();
        other.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        tokio::time::timeout(Duration::from_secs(2), other.read_exact(&mut buf)).await.expect("relayed").unwrap();
        drop(held);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(round_trip(listen).await.unwrap(), b"ping", "room again once the first ones closed");
    }
}
