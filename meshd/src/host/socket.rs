//! Sockets on mesh addresses, and the join service's listener on every address.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};

/// A non-blocking socket bound to `addr` with IP_FREEBIND, so it may bind an address that is not (yet)
/// configured: the forwarders and the DNS start while the interface's addresses are being added. IPv6
/// sockets are v6-only, so "::" and "0.0.0.0" can be bound side by side. TCP sockets set `SO_REUSEADDR`
/// (a restarted daemon binds again past connections in TIME_WAIT; a listening port is never shared);
/// UDP sockets do not: on a UDP socket it would let any other user's socket that sets it too bind the
/// same address and port and take its datagrams.
pub fn bind_freely(addr: SocketAddr, ty: Type, protocol: Protocol) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), ty, Some(protocol))?;
    socket.set_reuse_address(ty == Type::STREAM)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
        socket.set_freebind_v6(true)?;
    } else {
        socket.set_freebind_v4(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    Ok(socket)
}

/// A TCP listener on a mesh address, which may still be being added to the interface. The backlog is
/// the kernel's maximum (it caps the value at `net.core.somaxconn`): a hub restarting with thousands of
/// members reconnecting at once should not make them retry their SYNs.
pub fn listen_tcp(addr: SocketAddr) -> io::Result<tokio::net::TcpListener> {
    let socket = bind_freely(addr, Type::STREAM, Protocol::TCP)?;
    socket.listen(libc::c_int::MAX)?;
    tokio::net::TcpListener::from_std(socket.into())
}

/// A listener open to the internet (the join service, the relay's public HTTP and HTTPS ports) on `addr`
/// (`[::]`, both families), with the kernel's largest accept queue (`net.core.somaxconn`): under a flood of
/// connections from many addresses, the real clients' wait in the queue rather than have their SYNs dropped,
/// and are then admitted by evicting the flood's (`crate::links::join`, `crate::relay::listen`).
/// `SO_REUSEADDR` as for every TCP listener: a restart binds again past TIME_WAIT.
pub fn listen_internet(addr: SocketAddr) -> io::Result<tokio::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(false)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(libc::c_int::MAX)?;
    tokio::net::TcpListener::from_std(socket.into())
}

/// How long an accept loop waits after a failed accept (no descriptor left, above all) before the next: a loop that
/// retried at once would spin on the error.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// The next connection of `listener` and its peer's address, an IPv4 peer of a listener on both families as IPv4
/// (not `::ffff:a.b.c.d`). A failed accept (a connection reset before it was taken, no descriptor left) does not end
/// the loop: it is logged at debug level with `what` (the listener: a flood must not fill the log; the callers'
/// admission gates report what they turn away) and the next tried after [`ACCEPT_BACKOFF`].
pub async fn accept(listener: &tokio::net::TcpListener, what: &str) -> (tokio::net::TcpStream, SocketAddr) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => return (stream, SocketAddr::new(peer.ip().to_canonical(), peer.port())),
            Err(e) => {
                tracing::debug!(listener = what, error = %e, "accept failed");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
            }
        }
    }
}

/// Source ports below 1024 that meshd connects from where the other end trusts only meshd (the hub's sync
/// service, a node's passthrough terminator): only root (`CAP_NET_BIND_SERVICE`) binds them, so another user on the
/// host cannot pass for meshd. Below [`meshd_core::plan::PRIVILEGED_PORT`], clear of the well-known ports.
pub const SOURCE_PORTS: std::ops::RangeInclusive<u16> = 600..=1020;
const _: () = assert!(*SOURCE_PORTS.end() < meshd_core::plan::PRIVILEGED_PORT);

/// How many random ports of [`SOURCE_PORTS`] are tried before one connection attempt gives up.
pub const SOURCE_PORT_TRIES: usize = 16;

/// A connection to `to` from `from` (an unspecified address: any) and a random port of [`SOURCE_PORTS`]; a port
/// taken (by a service, or by a connection of the same four addresses and ports still in TIME-WAIT) is skipped for
/// another, [`SOURCE_PORT_TRIES`] times at most. Errors: no port free, or no right to bind one (not root).
pub async fn connect_from_privileged_port(from: IpAddr, to: SocketAddr) -> io::Result<tokio::net::TcpStream> {
    use std::io::{Error, ErrorKind};
    let mut taken = Vec::new();
    for _ in 0..SOURCE_PORT_TRIES {
        let port = rand::random_range(SOURCE_PORTS);
        let socket = if to.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
        socket.set_reuseaddr(true)?;
        match socket.bind(SocketAddr::new(from, port)) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::AddrInUse => {
                taken.push(port);
                continue;
            }
            Err(e) if e.kind() == ErrorKind::PermissionDenied => {
                return Err(Error::new(
                    ErrorKind::PermissionDenied,
                    format!(
                        "binding source port {port} to connect to {to}: {e} (the other end admits meshd only from ports \
                         below 1024: run meshd as root or with CAP_NET_BIND_SERVICE)"
                    ),
                ));
            }
            Err(e) => return Err(e),
        }
        match socket.connect(to).await {
            Ok(stream) => return Ok(stream),
            Err(e) if matches!(e.kind(), ErrorKind::AddrInUse | ErrorKind::AddrNotAvailable) => taken.push(port),
            Err(e) => return Err(e),
        }
    }
    Err(Error::new(
        ErrorKind::AddrInUse,
        format!(
            "no free source port in {}-{} to connect to {to} from (tried {taken:?}): the other end admits meshd only \
             from ports below 1024",
            SOURCE_PORTS.start(),
            SOURCE_PORTS.end()
        ),
    ))
}

/// A UDP socket on a mesh address, which may still be being added to the interface. Replies sent from it
/// leave from that address, so a client sees them come from the service it wrote to.
pub fn bind_udp(addr: SocketAddr) -> io::Result<tokio::net::UdpSocket> {
    let socket = bind_freely(addr, Type::DGRAM, Protocol::UDP)?;
    tokio::net::UdpSocket::from_std(socket.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 11, point 6: no other socket, whatever it sets, binds a UDP service's address beside it.
    #[test]
    fn a_udp_service_socket_is_not_shared() {
        let ours = bind_freely("127.0.0.1:0".parse().unwrap(), Type::DGRAM, Protocol::UDP).unwrap();
        let addr = ours.local_addr().unwrap();
        let other = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).unwrap();
        other.set_reuse_address(true).unwrap();
        let e = other.bind(&addr).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse, "{e}");
    }
}
