//! Parsing and validation of operator input: names, HOST:PORT pairs, address ranges, durations.
//!
//! Everything an operator types goes through here before it reaches the store, so that a bad value is
//! refused with a message naming it and nothing is written.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::str::FromStr;

use ipnet::{IpNet, Ipv4Net};
use serde::{Deserialize, Serialize};

/// Why an operator's input was refused; the message names the value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InputError {
    /// Not a DNS label (RFC 1123): the text as given.
    #[error("{0:?} is not a valid name: use 1-63 letters, digits or '-', not starting or ending with '-'")]
    Label(String),
    /// Not a domain of labels, or longer than 200 characters: the text as given.
    #[error("{0:?} is not a valid domain: use dot-separated names of letters, digits or '-'")]
    Domain(String),
    /// Not `HOST:PORT` with an IPv4 address, a `[IPv6]` address or a DNS name: the text as given.
    #[error("{0:?} is not HOST:PORT (an IPv4 address, [IPv6] address or DNS name, then a port)")]
    HostPort(String),
    /// A port that is not a number from 1 to 65535: the port as given.
    #[error("port {0:?} is out of range (1-65535)")]
    Port(String),
    /// Not `A.B.C.D/N`: the text as given.
    #[error("{0:?} is not a valid IPv4 CIDR such as 10.77.0.0/16")]
    Cidr(String),
    /// A range with room for fewer than two hosts (longer than /30).
    #[error("CIDR {0} is too small: it needs room for at least two hosts (use /30 or larger)")]
    CidrTooSmall(Ipv4Net),
    /// A range larger than a /8.
    #[error("CIDR {0} is too large for a mesh (use /8 or smaller; 10.0.0.0/8 holds 16 million hosts)")]
    CidrTooLarge(Ipv4Net),
    /// A range written with host bits set, e.g. `10.77.0.1/16`.
    #[error("CIDR {given} has host bits set; did you mean {network}?")]
    CidrHostBits {
        /// The range as given.
        given: String,
        /// The same range with the host bits cleared.
        network: Ipv4Net,
    },
    /// A service protocol other than `tcp` and `udp`: the text as given.
    #[error("protocol {0:?} is neither tcp nor udp")]
    Protocol(String),
    /// Not a Linux interface name (1 to 15 of letters, digits, `-`, `_`, `.`): the text as given.
    #[error("interface name {0:?} is invalid: 1-15 characters of letters, digits, '-', '_' or '.'")]
    Interface(String),
    /// An endpoint no phone or other host can reach (see [`HostPort::unusable_as_endpoint`]).
    #[error(
        "{endpoint} cannot be an endpoint: {reason}; give the public address or DNS name where phones and other hosts reach this host"
    )]
    Endpoint {
        /// The endpoint as given.
        endpoint: String,
        /// Why no one could reach it.
        reason: &'static str,
    },
    /// An address a device cannot use as its resolver.
    #[error("{resolver:?} cannot be a device's resolver: {reason}")]
    Resolver {
        /// The resolver as given.
        resolver: String,
        /// Why a device cannot use it.
        reason: &'static str,
    },
    /// An interface MTU outside [`MIN_MTU`]..=[`MAX_MTU`]: the value as given.
    #[error(
        "MTU {0} is not a number from {MIN_MTU} to {MAX_MTU} (IPv6 in the mesh needs at least {MIN_MTU}); behind a 1400-byte hop use 1340 (IPv4 path) or 1320 (IPv6 path)"
    )]
    Mtu(String),
    /// A port meshd keeps for itself ([`crate::plan::PRIVILEGED_PORT`]: its listeners on mesh addresses).
    #[error(
        "port {0} is meshd's own (its service forwarders and sync service listen there on mesh addresses): choose another"
    )]
    ReservedPort(u16),
    /// A full DNS name longer than [`MAX_DNS_NAME`].
    #[error(
        "the DNS name {name} would be {len} characters long (DNS allows {MAX_DNS_NAME}): choose a shorter name or domain"
    )]
    NameTooLong {
        /// The full name.
        name: String,
        /// Its length in characters.
        len: usize,
    },
    /// Not a public DNS name a certificate can be issued for: the text as given.
    #[error(
        "{0:?} is not a public DNS name: use at least two dot-separated names of letters, digits or '-' (e.g. pay.shop.example), at most 253 characters, no address"
    )]
    PublicName(String),
}

/// The smallest mesh MTU: IPv6 (inside the tunnel) needs links of at least 1280 bytes (RFC 8200).
pub const MIN_MTU: u16 = 1280;

/// The largest mesh MTU: jumbo frames of 9000 bytes, less nothing (a mesh that large needs jumbo frames
/// on every path; anything beyond is a typo).
pub const MAX_MTU: u16 = 9000;

/// Parse a mesh MTU, bytes: [`MIN_MTU`] to [`MAX_MTU`]. Errors: [`InputError::Mtu`].
pub fn parse_mtu(s: &str) -> Result<u16, InputError> {
    let mtu: u16 = s.trim().parse().map_err(|_| InputError::Mtu(s.to_owned()))?;
    check_mtu(mtu)?;
    Ok(mtu)
}

/// Refuse an MTU outside [`MIN_MTU`]..=[`MAX_MTU`] (the admin and join sockets take numbers from JSON).
pub fn check_mtu(mtu: u16) -> Result<(), InputError> {
    if (MIN_MTU..=MAX_MTU).contains(&mtu) { Ok(()) } else { Err(InputError::Mtu(mtu.to_string())) }
}

/// The longest DNS name in presentation form, without the final dot (RFC 1035 section 2.3.4: 255
/// octets on the wire).
pub const MAX_DNS_NAME: usize = 253;

/// Check that `name` (a full DNS name, without the final dot) fits DNS's limits; every label of it is
/// 63 characters at most already, as a [`Label`] or a domain from [`parse_domain`]. Errors:
/// [`InputError::NameTooLong`].
pub fn check_dns_name(name: &str) -> Result<(), InputError> {
    if name.len() > MAX_DNS_NAME {
        return Err(InputError::NameTooLong { name: name.to_owned(), len: name.len() });
    }
    Ok(())
}

/// A DNS label used as the name of a network, node, device or service (RFC 1123). DNS compares names
/// without regard to case (RFC 4343): a label is stored lowercase, so `Phone` and `phone` are one name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Label(String);

impl Label {
    /// The label as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for Label {
    type Err = InputError;
    fn from_str(s: &str) -> Result<Self, InputError> {
        let ok = !s.is_empty()
            && s.len() <= 63
            && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !s.starts_with('-')
            && !s.ends_with('-');
        if ok { Ok(Label(s.to_ascii_lowercase())) } else { Err(InputError::Label(s.to_owned())) }
    }
}

impl TryFrom<String> for Label {
    type Error = InputError;
    fn try_from(s: String) -> Result<Self, InputError> {
        s.parse()
    }
}

impl From<Label> for String {
    fn from(l: Label) -> String {
        l.0
    }
}

impl fmt::Display for Label {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(&self.0)
    }
}

/// Check a DNS domain made of labels (e.g. `home.internal`); returns it lowercase without a trailing dot.
/// At most 200 characters, so that names under it (a label of up to 63 and a dot) still fit DNS.
pub fn parse_domain(s: &str) -> Result<String, InputError> {
    let trimmed = s.strip_suffix('.').unwrap_or(s);
    let ok =
        !trimmed.is_empty() && trimmed.len() <= 200 && trimmed.split('.').all(|part| part.parse::<Label>().is_ok());
    if ok { Ok(trimmed.to_ascii_lowercase()) } else { Err(InputError::Domain(s.to_owned())) }
}

/// A public DNS name served over HTTPS (`pay.shop.example`): at least two labels (RFC 1123), the last not all
/// digits (so no IPv4 address), at most [`MAX_DNS_NAME`] characters; stored lowercase without a trailing dot,
/// as certificates and server names (SNI, RFC 6066 section 3) compare it. No wildcard: each name is ordered on its own.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PublicName(String);

impl PublicName {
    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether the name is `domain` (a mesh domain such as `mesh.internal`, lowercase, no trailing dot) or under it:
    /// a name the mesh's own DNS answers, which no public CA can validate.
    pub fn is_within(&self, domain: &str) -> bool {
        self.0 == domain || self.0.strip_suffix(domain).is_some_and(|head| head.ends_with('.'))
    }
}

impl FromStr for PublicName {
    type Err = InputError;
    fn from_str(s: &str) -> Result<Self, InputError> {
        let trimmed = s.strip_suffix('.').unwrap_or(s);
        let labels: Vec<&str> = trimmed.split('.').collect();
        let ok = labels.len() >= 2
            && trimmed.len() <= MAX_DNS_NAME
            && labels.iter().all(|l| l.parse::<Label>().is_ok())
            && labels.last().is_some_and(|tld| !tld.bytes().all(|b| b.is_ascii_digit()));
        if ok { Ok(PublicName(trimmed.to_ascii_lowercase())) } else { Err(InputError::PublicName(s.to_owned())) }
    }
}

impl TryFrom<String> for PublicName {
    type Error = InputError;
    fn try_from(s: String) -> Result<Self, InputError> {
        s.parse()
    }
}

impl From<PublicName> for String {
    fn from(n: PublicName) -> String {
        n.0
    }
}

impl fmt::Display for PublicName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(&self.0)
    }
}

/// Where to reach something: a host (IP address or DNS name) and a port.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct HostPort {
    host: Host,
    port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Host {
    Ip(IpAddr),
    Name(String),
}

impl HostPort {
    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The host as an IP address, when it is one.
    pub fn ip(&self) -> Option<IpAddr> {
        match self.host {
            Host::Ip(ip) => Some(ip),
            Host::Name(_) => None,
        }
    }

    /// Why no phone or other host could reach this as a WireGuard endpoint, if so: an unspecified,
    /// loopback, multicast, broadcast or link-local address (RFC 6890), or `localhost` (RFC 6761
    /// section 6.3). Private and documentation addresses pass: a LAN or a lab may use them.
    pub fn unusable_as_endpoint(&self) -> Option<&'static str> {
        match &self.host {
            Host::Name(name) if name == "localhost" || name.ends_with(".localhost") => {
                Some("localhost is this host itself on every device")
            }
            Host::Name(_) => None,
            Host::Ip(ip) => {
                // An IPv4-mapped or -compatible IPv6 address (`::ffff:127.0.0.1`, `::127.0.0.1`) is
                // judged as the IPv4 address it carries; `::` and `::1` as themselves.
                let ip = match ip {
                    IpAddr::V6(v6) if !v6.is_loopback() && !v6.is_unspecified() => {
                        v6.to_ipv4().map(IpAddr::V4).unwrap_or(*ip)
                    }
                    _ => *ip,
                };
                match ip {
                    ip if ip.is_unspecified() => Some("an unspecified address reaches nothing"),
                    ip if ip.is_loopback() => Some("a loopback address is each device itself"),
                    ip if ip.is_multicast() => Some("a multicast address is no single host"),
                    IpAddr::V4(v4) if v4.is_broadcast() => Some("the broadcast address is no single host"),
                    IpAddr::V4(v4) if v4.octets()[0] == 0 => Some("0.0.0.0/8 addresses no host (RFC 791)"),
                    IpAddr::V4(v4) if v4.octets()[0] >= 240 => Some("240.0.0.0/4 is reserved (RFC 1112)"),
                    IpAddr::V4(v4) if v4.is_link_local() => Some("a link-local address is not routed"),
                    IpAddr::V6(v6) if v6.is_unicast_link_local() => Some("a link-local address is not routed"),
                    _ => None,
                }
            }
        }
    }

    /// The host in a form suitable for a socket lookup (`name` or `ip`, without brackets).
    pub fn host(&self) -> String {
        match &self.host {
            Host::Ip(ip) => ip.to_string(),
            Host::Name(n) => n.clone(),
        }
    }
}

impl FromStr for HostPort {
    type Err = InputError;
    fn from_str(s: &str) -> Result<Self, InputError> {
        let bad = || InputError::HostPort(s.to_owned());
        let (host, port) = if let Some(rest) = s.strip_prefix('[') {
            let (v6, port) = rest.split_once("]:").ok_or_else(bad)?;
            let ip: std::net::Ipv6Addr = v6.parse().map_err(|_| bad())?;
            (Host::Ip(IpAddr::V6(ip)), port)
        } else {
            let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
            if host.contains(':') {
                // A bare IPv6 address is ambiguous with its port: wg-quick and URLs both want brackets.
                return Err(bad());
            }
            let host = match host.parse::<Ipv4Addr>() {
                Ok(ip) => Host::Ip(IpAddr::V4(ip)),
                // A final dot makes a name absolute; it does not make an address a name.
                Err(_) if looks_like_ipv4(host.strip_suffix('.').unwrap_or(host)) => return Err(bad()),
                Err(_) => Host::Name(parse_domain(host).map_err(|_| bad())?),
            };
            (host, port)
        };
        if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        let port = match port.parse::<u16>() {
            Ok(p) if p > 0 => p,
            _ => return Err(InputError::Port(port.to_owned())),
        };
        Ok(HostPort { host, port })
    }
}

/// Not a DNS name but an address in disguise: `300.1.2.3`, and the forms resolvers take for IPv4
/// addresses (`inet_aton(3)`: `127.1`, `2130706433`, `0x7f000001`, `0` is 0.0.0.0). A top-level label
/// is never all digits (RFC 3696 section 2), so no real name looks like this.
fn looks_like_ipv4(s: &str) -> bool {
    let number = |part: &str| match part.strip_prefix("0x").or_else(|| part.strip_prefix("0X")) {
        Some(hex) => hex.bytes().all(|b| b.is_ascii_hexdigit()),
        None => !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit()),
    };
    let last_is_numeric = s.rsplit('.').next().is_some_and(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_digit()));
    last_is_numeric || (s.split('.').count() <= 4 && s.split('.').all(number))
}

impl TryFrom<String> for HostPort {
    type Error = InputError;
    fn try_from(s: String) -> Result<Self, InputError> {
        s.parse()
    }
}

impl From<HostPort> for String {
    fn from(h: HostPort) -> String {
        h.to_string()
    }
}

impl fmt::Display for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.host {
            Host::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]:{}", self.port),
            Host::Ip(IpAddr::V4(ip)) => write!(f, "{ip}:{}", self.port),
            Host::Name(n) => write!(f, "{n}:{}", self.port),
        }
    }
}

/// Parse a WireGuard endpoint: a [`HostPort`] that phones and other hosts can reach (see
/// [`HostPort::unusable_as_endpoint`]). Errors: [`InputError::HostPort`], [`InputError::Port`],
/// [`InputError::Endpoint`].
pub fn parse_endpoint(s: &str) -> Result<HostPort, InputError> {
    let endpoint: HostPort = s.parse()?;
    check_endpoint(&endpoint)?;
    Ok(endpoint)
}

/// Refuse an endpoint no phone or other host can reach, with the reason.
pub fn check_endpoint(endpoint: &HostPort) -> Result<(), InputError> {
    match endpoint.unusable_as_endpoint() {
        Some(reason) => Err(InputError::Endpoint { endpoint: endpoint.to_string(), reason }),
        None => Ok(()),
    }
}

/// Parse a resolver's address for a device's `DNS` line: an IP address a client can send queries to
/// (not unspecified, multicast or broadcast). Errors: [`InputError::Resolver`].
pub fn parse_resolver(s: &str) -> Result<IpAddr, InputError> {
    let bad = |reason| InputError::Resolver { resolver: s.to_owned(), reason };
    let ip: IpAddr = s.trim().parse().map_err(|_| bad("not an IP address"))?;
    match ip {
        ip if ip.is_unspecified() => Err(bad("an unspecified address reaches no resolver")),
        ip if ip.is_multicast() => Err(bad("a multicast address is no single resolver")),
        IpAddr::V4(v4) if v4.is_broadcast() => Err(bad("the broadcast address is no single resolver")),
        ip => Ok(ip),
    }
}

/// Parse a port number (1-65535).
pub fn parse_port(s: &str) -> Result<u16, InputError> {
    match s.parse::<u16>() {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(InputError::Port(s.to_owned())),
    }
}

/// Parse the network's IPv4 range; it must be a network address with room for two hosts or more.
pub fn parse_cidr(s: &str) -> Result<Ipv4Net, InputError> {
    let net: Ipv4Net = match s.parse::<IpNet>() {
        Ok(IpNet::V4(n)) => n,
        _ => return Err(InputError::Cidr(s.to_owned())),
    };
    if net.addr() != net.network() {
        return Err(InputError::CidrHostBits { given: s.to_owned(), network: net.trunc() });
    }
    if net.prefix_len() > 30 {
        return Err(InputError::CidrTooSmall(net));
    }
    // Wider ranges would overlap most of the internet, and their reverse names could not be served.
    if net.prefix_len() < 8 {
        return Err(InputError::CidrTooLarge(net));
    }
    Ok(net)
}

/// A network interface name as Linux accepts it and as meshd allows it: 1 to 15 bytes of ASCII letters,
/// digits, `-`, `_` and `.`, not `.` nor `..`. The name reaches `ip` commands, nftables rules and a
/// socket path as root: every name meshd reads (the command line, the database, `member.json`, a join
/// request, the sync stream) is one of these, so a name that could break out of them (a quote, a space,
/// a `;`, a `/`) is refused when it is read, never passed on.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct InterfaceName(String);

impl InterfaceName {
    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for InterfaceName {
    type Err = InputError;
    fn from_str(s: &str) -> Result<Self, InputError> {
        let ok = !s.is_empty()
            && s.len() <= 15
            && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
            && s != "."
            && s != "..";
        if ok { Ok(InterfaceName(s.to_owned())) } else { Err(InputError::Interface(s.to_owned())) }
    }
}

impl TryFrom<String> for InterfaceName {
    type Error = InputError;
    fn try_from(s: String) -> Result<Self, InputError> {
        s.parse()
    }
}

impl From<InterfaceName> for String {
    fn from(name: InterfaceName) -> String {
        name.0
    }
}

impl std::ops::Deref for InterfaceName {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for InterfaceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(&self.0)
    }
}

/// Parse a network interface name (see [`InterfaceName`]). Errors: [`InputError::Interface`].
pub fn parse_interface(s: &str) -> Result<InterfaceName, InputError> {
    s.parse()
}

/// Refuse port 0 (a port that numbers from JSON or the database can hold, but that nothing listens on).
/// Errors: [`InputError::Port`].
pub fn check_port(port: u16) -> Result<(), InputError> {
    if port == 0 { Err(InputError::Port(port.to_string())) } else { Ok(()) }
}

/// Check a port a host listens on itself (WireGuard's UDP port and the join service's TCP port, the mesh
/// DNS's): not 0, and not [`crate::plan::PRIVILEGED_PORT`], which meshd's own listeners on mesh addresses
/// bind. Errors: [`InputError::Port`], [`InputError::ReservedPort`].
pub fn check_listen_port(port: u16) -> Result<(), InputError> {
    check_port(port)?;
    if port == crate::plan::PRIVILEGED_PORT { Err(InputError::ReservedPort(port)) } else { Ok(()) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_host_listens_on_neither_port_0_nor_meshds_own() {
        assert_eq!(check_listen_port(0), Err(InputError::Port("0".into())));
        assert_eq!(check_listen_port(1021), Err(InputError::ReservedPort(1021)));
        assert!(check_listen_port(1021).unwrap_err().to_string().contains("port 1021 is meshd's own"));
        for fine in [1, 53, 443, 1020, 1022, 51820, 65535] {
            assert_eq!(check_listen_port(fine), Ok(()), "{fine}");
        }
    }

    #[test]
    fn labels() {
        for good in ["a", "phone1", "btc-pay", "0x", &"a".repeat(63)] {
            assert!(good.parse::<Label>().is_ok(), "{good}");
        }
        for bad in ["", "-a", "a-", "bad_name!", "a.b", "é", &"a".repeat(64), "a b"] {
            assert_eq!(bad.parse::<Label>(), Err(InputError::Label(bad.to_owned())), "{bad}");
        }
    }

    #[test]
    fn names_are_case_insensitive_and_stored_lowercase() {
        assert_eq!("Alice-Phone".parse::<Label>().unwrap(), "alice-phone".parse::<Label>().unwrap());
        assert_eq!("BTCPay".parse::<Label>().unwrap().as_str(), "btcpay");
        assert_eq!(parse_domain("Home.Internal.").unwrap(), "home.internal");
        let endpoint: HostPort = "Node.DynDNS.Example:51820".parse().unwrap();
        assert_eq!(endpoint.to_string(), "node.dyndns.example:51820");
    }

    #[test]
    fn endpoints_no_device_can_reach_are_refused_with_the_reason() {
        for (bad, why) in [
            ("0.0.0.0:51820", "unspecified"),
            ("[::]:51820", "unspecified"),
            ("127.0.0.1:51820", "loopback"),
            ("127.8.9.10:51820", "loopback"),
            ("[::1]:51820", "loopback"),
            ("[::ffff:127.0.0.1]:51820", "loopback"),
            ("224.0.0.1:51820", "multicast"),
            ("[ff02::1]:51820", "multicast"),
            ("255.255.255.255:51820", "broadcast"),
            ("169.254.1.1:51820", "link-local"),
            ("[fe80::1]:51820", "link-local"),
            ("localhost:51820", "localhost"),
            ("LocalHost:51820", "localhost"),
            ("vpn.localhost:51820", "localhost"),
            ("0.0.0.1:51820", "0.0.0.0/8"),
            ("240.0.0.1:51820", "reserved"),
        ] {
            let refused = parse_endpoint(bad).unwrap_err();
            assert!(matches!(refused, InputError::Endpoint { .. }), "{bad}: {refused:?}");
            assert!(refused.to_string().contains(why), "{bad}: {refused}");
        }
        // Numbers resolvers take for IPv4 addresses are neither addresses nor names here.
        for disguised in ["0:1", "127.1:1", "2130706433:1", "0x7f000001:1", "0X7F.1:1", "host.123:1"] {
            assert_eq!(parse_endpoint(disguised), Err(InputError::HostPort(disguised.to_owned())), "{disguised}");
        }
        for good in [
            "node.example.net.:51820",
            "203.0.113.10:51820",
            "1password.example:51820",
            "0xdead.example:51820",
            "192.168.1.2:51820",
            "[2001:db8::1]:51820",
            "[2001:db8:aaaa:bbbb:cccc:dddd:eeee:ffff]:51820",
            "node.example.net:51820",
        ] {
            assert!(parse_endpoint(good).is_ok(), "{good}");
        }
    }

    #[test]
    fn an_address_with_a_final_dot_is_no_name() {
        // Found by the declare fuzz target: "127.0.0.:5052" read as the name "127.0.0", written back as
        // "127.0.0:5052", which no longer reads; "127.0.0.1.:51820" passed as a name for loopback.
        for disguised in ["127.0.0.1.:51820", "127.0.0.:5052", "127.:5052", "10.10.27.:5052", "0x7f000001.:1"] {
            assert_eq!(disguised.parse::<HostPort>(), Err(InputError::HostPort(disguised.to_owned())), "{disguised}");
        }
        let name: HostPort = "Node.Example.NET.:51820".parse().unwrap();
        assert_eq!(name.to_string().parse::<HostPort>(), Ok(name));
    }

    #[test]
    fn resolvers_must_be_single_reachable_addresses() {
        assert_eq!(parse_resolver("192.168.1.1"), Ok("192.168.1.1".parse().unwrap()));
        assert_eq!(parse_resolver("2001:db8::53"), Ok("2001:db8::53".parse().unwrap()));
        for (bad, why) in [
            ("0.0.0.0", "unspecified"),
            ("::", "unspecified"),
            ("224.0.0.251", "multicast"),
            ("255.255.255.255", "broadcast"),
            ("dns.example", "not an IP"),
        ] {
            let refused = parse_resolver(bad).unwrap_err();
            assert!(refused.to_string().contains(why), "{bad}: {refused}");
        }
    }

    #[test]
    fn names_longer_than_dns_allows_are_refused() {
        let domain = parse_domain(&[&"d".repeat(63)[..], &"e".repeat(63), &"f".repeat(63)].join(".")).unwrap();
        let label: Label = "a".repeat(63).parse().unwrap();
        let name = format!("{label}.{domain}");
        assert_eq!(name.len(), 255);
        assert_eq!(check_dns_name(&name), Err(InputError::NameTooLong { name: name.clone(), len: 255 }));
        assert!(check_dns_name(&name[2..]).is_ok(), "253 characters fit");
    }

    #[test]
    fn domains() {
        assert_eq!(parse_domain("home.internal.").unwrap(), "home.internal");
        assert_eq!(parse_domain("shop").unwrap(), "shop");
        for bad in ["", ".", "a..b", "-a.b", "a_b.c", &format!("{}.b", "a".repeat(199))] {
            assert!(parse_domain(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn host_ports() {
        let cases = [
            ("127.0.0.1:8080", "127.0.0.1:8080", Some("127.0.0.1")),
            ("[fd00::1]:51820", "[fd00::1]:51820", Some("fd00::1")),
            ("relay.example.com:443", "relay.example.com:443", None),
            ("169.254.1.17:9737", "169.254.1.17:9737", Some("169.254.1.17")),
        ];
        for (input, shown, ip) in cases {
            let hp: HostPort = input.parse().unwrap();
            assert_eq!(hp.to_string(), shown);
            assert_eq!(hp.ip().map(|i| i.to_string()).as_deref(), ip);
        }
        for bad in ["nocolon", "1.2.3.4", ":80", "host:", "fd00::1:80", "[fd00::1]80", "300.1.2.3:80", "a b:1", "h:+1"]
        {
            assert_eq!(bad.parse::<HostPort>(), Err(InputError::HostPort(bad.to_owned())), "{bad}");
        }
        assert_eq!("1.2.3.4:70000".parse::<HostPort>(), Err(InputError::Port("70000".into())));
        assert_eq!("1.2.3.4:0".parse::<HostPort>(), Err(InputError::Port("0".into())));
    }

    #[test]
    fn cidrs() {
        assert_eq!(parse_cidr("10.77.0.0/16").unwrap().to_string(), "10.77.0.0/16");
        assert_eq!(parse_cidr("10.0.0.0/33"), Err(InputError::Cidr("10.0.0.0/33".into())));
        assert_eq!(parse_cidr("banana"), Err(InputError::Cidr("banana".into())));
        assert_eq!(parse_cidr("fd00::/64"), Err(InputError::Cidr("fd00::/64".into())));
        assert!(matches!(parse_cidr("10.0.0.0/31"), Err(InputError::CidrTooSmall(_))));
        assert!(matches!(parse_cidr("10.0.0.0/7"), Err(InputError::CidrTooLarge(_))));
        assert!(parse_cidr("10.0.0.0/8").is_ok());
        assert!(matches!(parse_cidr("10.0.0.5/24"), Err(InputError::CidrHostBits { .. })));
    }

    #[test]
    fn interfaces() {
        assert!(parse_interface("meshd0").is_ok());
        assert!(parse_interface("wg-home_1.x").is_ok());
        for bad in ["", "sixteen-chars-xx", "a/b", "a b", ".", "..", "x\"", "a:b", "a\0", "x\";flush", "tab\tx", "é"] {
            assert!(parse_interface(bad).is_err(), "{bad}");
        }
        // The same check on every path a name is read by: JSON (member.json, join requests, sync).
        let e = serde_json::from_str::<InterfaceName>(r#""x\"; flush ruleset""#).unwrap_err().to_string();
        assert!(e.contains("interface name") && e.contains("flush ruleset"), "{e}");
        assert_eq!(serde_json::from_str::<InterfaceName>(r#""meshd0""#).unwrap().as_str(), "meshd0");
        assert!(check_port(0).is_err() && check_port(1).is_ok());
    }

    proptest! {
        #[test]
        fn host_port_display_round_trips(a in any::<[u8; 4]>(), v6 in any::<[u16; 8]>(), port in 1u16.., use_v6 in any::<bool>()) {
            let ip: IpAddr = if use_v6 { std::net::Ipv6Addr::from(v6).into() } else { Ipv4Addr::from(a).into() };
            let text = HostPort { host: Host::Ip(ip), port }.to_string();
            let back: HostPort = text.parse().unwrap();
            prop_assert_eq!(back.ip(), Some(ip));
            prop_assert_eq!(back.port(), port);
        }

        #[test]
        fn label_parsing_never_panics(s in ".{0,80}") {
            let _ = s.parse::<Label>();
            let _ = s.parse::<HostPort>();
            let _ = parse_cidr(&s);
        }
    }

    #[test]
    fn public_names_are_dns_names_of_two_labels_or_more_and_never_addresses() {
        let name: PublicName = "Pay.Shop.Example.".parse().unwrap();
        assert_eq!(name.as_str(), "pay.shop.example");
        for bad in ["shop", "", "10.0.0.1", "pay..example", "-pay.example", "*.shop.example", "pay.shop.example:443"] {
            assert_eq!(bad.parse::<PublicName>(), Err(InputError::PublicName(bad.to_owned())), "{bad:?}");
        }
        let long = format!("{}.example", vec!["a".repeat(63); 4].join("."));
        assert!(long.parse::<PublicName>().is_err(), "longer than 253 characters");
    }
}
