//! Whether a port meshd is about to listen on is free, and who holds it when not: the kernel's socket
//! tables of this network namespace (`/proc/self/net/{udp,udp6,tcp,tcp6}`: the socket's owner uid and
//! inode), and the process whose descriptors include that socket (`/proc/PID/fd`).
//!
//! Another user may bind a port while meshd is stopped (an upgrade, a restart). The embedded WireGuard
//! cannot report that cleanly: its threads panic and the interface fails with an obscure I/O error. So
//! the port is tried first, and the refusal names it and its holder in one line.

use std::fmt;
use std::fs;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use socket2::{Domain, Protocol, Socket, Type};

/// The transport of a port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// UDP (any bound socket holds the port).
    Udp,
    /// TCP (a listening socket holds the port).
    Tcp,
}

/// A socket that holds a port: its owner and, when found, the process that has it open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    /// The socket owner's uid.
    pub uid: u32,
    /// A process with the socket among its descriptors.
    pub pid: Option<u32>,
}

impl fmt::Display for Holder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.pid {
            Some(pid) => write!(f, "uid {}, pid {pid}", self.uid),
            None => write!(f, "uid {}", self.uid),
        }
    }
}

/// Check that UDP `port` can be bound on every address (IPv4 and IPv6), as the WireGuard device will:
/// Err with one line naming the port and its holder when another socket has it.
pub fn check_udp_port_free(port: u16) -> Result<(), String> {
    let probes = [
        (Domain::IPV4, SocketAddr::from((Ipv4Addr::UNSPECIFIED, port))),
        (Domain::IPV6, SocketAddr::from((Ipv6Addr::UNSPECIFIED, port))),
    ];
    for (domain, addr) in probes {
        match probe_udp(domain, addr) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
                let by = holder(Transport::Udp, port).map(|h| format!(" ({h})")).unwrap_or_default();
                return Err(format!(
                    "WireGuard UDP port {port} is held by another process{by}: stop it and start meshd again"
                ));
            }
            // No IPv6 on this host: the device binds IPv4 only then.
            Err(_) if domain == Domain::IPV6 => {}
            Err(e) => return Err(format!("WireGuard UDP port {port}: {e}")),
        }
    }
    Ok(())
}

/// Bind (and release) a UDP socket on `addr` without `SO_REUSEADDR`, which any other socket on the port
/// refuses; an IPv6 probe is IPv6-only, as the IPv4 one covers the rest.
fn probe_udp(domain: Domain, addr: SocketAddr) -> io::Result<()> {
    let socket = Socket::new(domain, Type::DGRAM, Some(Protocol::UDP))?;
    if domain == Domain::IPV6 {
        socket.set_only_v6(true)?;
    }
    socket.bind(&addr.into())
}

/// Who holds `port` (a bound UDP socket, a listening TCP one) in this network namespace, if any.
pub fn holder(transport: Transport, port: u16) -> Option<Holder> {
    let tables: [&str; 2] = match transport {
        Transport::Udp => ["/proc/self/net/udp", "/proc/self/net/udp6"],
        Transport::Tcp => ["/proc/self/net/tcp", "/proc/self/net/tcp6"],
    };
    let (uid, inode) = tables
        .iter()
        .filter_map(|table| fs::read_to_string(table).ok())
        .find_map(|text| sockets_on_port(&text, transport, port).next())?;
    Some(Holder { uid, pid: process_with_socket(inode) })
}

/// The owner uid and inode of each socket of a `/proc/net/{udp,tcp}{,6}` table (its text) bound to `port`
/// (for TCP: listening on it), in the table's order.
pub(super) fn sockets_on_port(table: &str, transport: Transport, port: u16) -> impl Iterator<Item = (u32, u64)> + '_ {
    /// The `st` of a listening TCP socket (`TCP_LISTEN`).
    const TCP_LISTEN: &str = "0A";
    table.lines().skip(1).filter_map(move |line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (local, state, uid, inode) = (fields.get(1)?, fields.get(3)?, fields.get(7)?, fields.get(9)?);
        let bound = u16::from_str_radix(local.rsplit(':').next()?, 16).ok()?;
        let listening = transport == Transport::Udp || *state == TCP_LISTEN;
        (bound == port && listening).then_some(())?;
        Some((uid.parse().ok()?, inode.parse().ok()?))
    })
}

/// A process that has socket `inode` open, by its descriptors' links (`socket:[INODE]`).
fn process_with_socket(inode: u64) -> Option<u32> {
    let target = format!("socket:[{inode}]");
    fs::read_dir("/proc").ok()?.filter_map(Result::ok).find_map(|process| {
        let pid: u32 = process.file_name().to_str()?.parse().ok()?;
        let fds = fs::read_dir(process.path().join("fd")).ok()?;
        fds.filter_map(Result::ok)
            .any(|fd| fs::read_link(fd.path()).is_ok_and(|link| link.as_os_str() == target.as_str()))
            .then_some(pid)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const UDP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
  1: 00000000:0035 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 1001 2 0000000000000000 0
  2: 00000000:CA6C 00000000:0000 07 00000000:00000000 00:00000000 00000000 65534        0 1002 2 0000000000000000 0
";
    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:CA6C 0100007F:9C40 01 00000000:00000000 00:00000000 00000000     0        0 2001 1 0000000000000000
   1: 00000000:CA6C 00000000:0000 0A 00000000:00000000 00:00000000 00000000 65534        0 2002 1 0000000000000000
";

    #[test]
    fn the_socket_on_a_port_is_read_from_the_kernels_table() {
        let first = |table, transport, port| sockets_on_port(table, transport, port).next();
        assert_eq!(first(UDP, Transport::Udp, 51820), Some((65534, 1002)));
        assert_eq!(first(UDP, Transport::Udp, 53), Some((0, 1001)));
        assert_eq!(first(UDP, Transport::Udp, 4000), None);
        // A connection from the port is not a listener.
        assert_eq!(first(TCP, Transport::Tcp, 51820), Some((65534, 2002)));
    }

    #[test]
    fn a_port_held_by_this_process_is_refused_naming_the_holder() {
        let held = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap();
        let port = held.local_addr().unwrap().port();
        let error = check_udp_port_free(port).unwrap_err();
        // SAFETY: geteuid has no preconditions.
        let uid = unsafe { libc::geteuid() };
        let expected = format!(
            "WireGuard UDP port {port} is held by another process (uid {uid}, pid {}): stop it and start meshd again",
            std::process::id()
        );
        assert_eq!(error, expected);
        drop(held);
        assert_eq!(check_udp_port_free(port), Ok(()));
    }
}
