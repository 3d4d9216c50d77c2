//! The PROXY protocol version 2 header (HAProxy's `proxy-protocol.txt`, section 2.2) a relay sends before a
//! passed-through TLS stream, so the service's node knows the client's address; built and parsed with the
//! `ppp` crate.
//!
//! Workaround (ppp 2.3.0): given a source and a destination of different families (an IPv6 client reaching
//! the relay, which connects to the node over IPv4 in the mesh), ppp's address conversion silently writes
//! "unspecified" addresses; [`header`] maps both to IPv6 (an IPv4 address as `::ffff:a.b.c.d`) first.

use std::net::{IpAddr, SocketAddr};

use ppp::v2::{Addresses, Builder, Command, Header, ParseError, Protocol, Version};

/// The longest header accepted: the fixed 16 bytes and the 216 of the largest (UNIX) addresses, no TLVs
/// beyond (the relay sends none; the node reads no more than this before it has a header).
pub const MAX_HEADER: usize = 16 + 216;

/// A header could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    /// Not a PROXY v2 header, or a malformed one.
    #[error("not a PROXY protocol v2 header: {0}")]
    Malformed(String),
    /// Longer than [`MAX_HEADER`].
    #[error("PROXY protocol header of {0} bytes is longer than {MAX_HEADER}")]
    TooLong(usize),
}

/// What the bytes read so far hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Read {
    /// Not the whole header yet: read more (at most [`MAX_HEADER`] bytes in all).
    Incomplete,
    /// The header, `len` bytes long (the stream's data starts after it), naming the client's address and
    /// port (None: the `LOCAL` command, a health check of the relay's own, or an unspecified family).
    Header {
        /// The client's address and port.
        client: Option<SocketAddr>,
        /// The header's length, bytes.
        len: usize,
    },
}

/// The header for a stream from `client` that reached the relay at `relay`.
pub fn header(client: SocketAddr, relay: SocketAddr) -> Vec<u8> {
    let (client, relay) = match (client, relay) {
        (SocketAddr::V4(_), SocketAddr::V4(_)) | (SocketAddr::V6(_), SocketAddr::V6(_)) => (client, relay),
        _ => (as_v6(client), as_v6(relay)),
    };
    let addresses = Addresses::from((client, relay));
    // Writing into a Vec cannot fail, and the length of two addresses fits the header's 16 bits.
    Builder::with_addresses(Version::Two | Command::Proxy, Protocol::Stream, addresses).build().unwrap_or_default()
}

/// Read a header from the start of `bytes` (what has arrived so far).
pub fn read(bytes: &[u8]) -> Result<Read, ProxyError> {
    match Header::try_from(bytes) {
        Ok(header) if header.len() > MAX_HEADER => Err(ProxyError::TooLong(header.len())),
        Ok(header) => {
            let client = match (header.command, header.addresses) {
                (Command::Local, _) => None,
                (Command::Proxy, Addresses::IPv4(a)) => Some(SocketAddr::from((a.source_address, a.source_port))),
                (Command::Proxy, Addresses::IPv6(a)) => Some(SocketAddr::from((a.source_address, a.source_port))),
                (Command::Proxy, Addresses::Unix(_) | Addresses::Unspecified) => None,
            };
            let client = client.map(|c| SocketAddr::new(c.ip().to_canonical(), c.port()));
            Ok(Read::Header { client, len: header.len() })
        }
        Err(ParseError::Incomplete(_)) if bytes.len() < MAX_HEADER => Ok(Read::Incomplete),
        Err(ParseError::Partial(_, length)) if v2_total(length) > MAX_HEADER => {
            Err(ProxyError::TooLong(v2_total(length)))
        }
        Err(ParseError::Partial(..)) => Ok(Read::Incomplete),
        Err(e) => Err(ProxyError::Malformed(e.to_string())),
    }
}

/// The whole length of a header whose length field says `length`.
fn v2_total(length: usize) -> usize {
    16 + length
}

fn as_v6(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) => SocketAddr::new(IpAddr::V6(ip.to_ipv6_mapped()), addr.port()),
        IpAddr::V6(_) => addr,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_header_carries_the_clients_address_and_is_read_back_before_the_stream() {
        for (client, relay) in [
            ("203.0.113.7:51234", "10.77.0.1:443"),
            ("[2001:db8::7]:51234", "[fd00::1]:443"),
            ("[2001:db8::7]:51234", "10.77.0.1:443"),
            ("203.0.113.7:51234", "[fd00::1]:443"),
        ] {
            let (client, relay): (SocketAddr, SocketAddr) = (client.parse().unwrap(), relay.parse().unwrap());
            let mut stream = header(client, relay);
            let len = stream.len();
            assert!(len == 28 || len == 52, "{len}");
            stream.extend_from_slice(b"\x16\x03\x01 the ClientHello");
            assert_eq!(read(&stream), Ok(Read::Header { client: Some(client), len }), "{client} via {relay}");
            // Arriving a byte at a time: incomplete until the last byte of the header.
            for cut in 0..len {
                assert_eq!(read(&stream[..cut]), Ok(Read::Incomplete), "{cut} of {len}");
            }
        }
    }

    #[test]
    fn anything_else_is_refused_and_a_long_header_is_not_waited_for() {
        assert!(matches!(read(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"), Err(ProxyError::Malformed(_))));
        assert!(matches!(read(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03abcdefgh"), Err(ProxyError::Malformed(_))));
        assert!(
            matches!(read(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n"), Err(ProxyError::Malformed(_))),
            "v1 is not spoken"
        );
        // A length field of 65535: refused at once, not read to the end.
        let mut long = header("192.0.2.1:1".parse().unwrap(), "192.0.2.2:2".parse().unwrap());
        long[14..16].copy_from_slice(&u16::MAX.to_be_bytes());
        assert_eq!(read(&long), Err(ProxyError::TooLong(16 + 65535)));
        // LOCAL (a health check): no client.
        let mut local = header("192.0.2.1:1".parse().unwrap(), "192.0.2.2:2".parse().unwrap());
        local[12] = 0x20;
        assert_eq!(read(&local), Ok(Read::Header { client: None, len: 28 }));
    }
}
