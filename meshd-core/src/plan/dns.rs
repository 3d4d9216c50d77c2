//! A host's mesh DNS as data: the records it serves (its network's names: nodes, devices, services),
//! where it listens and for whom, the mesh domain as a DNS name, the reverse zones that cover the mesh
//! ranges, and each zone's complete record map (SOA and NS at the apex, A/AAAA or PTR sets). The daemon's DNS server (`host::dns`) serves these maps; it
//! decides nothing about their content.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use hickory_proto::rr::{
    LowerName, Name, RData, RecordSet, RecordType, RrKey,
    rdata::{A, AAAA, NS, PTR, SOA},
};
use std::net::SocketAddr;

use ipnet::IpNet;
use tracing::warn;

use super::HostView;
use crate::input::Label;

/// Names to serve: fully-qualified lowercase names without trailing dot -> addresses (v4 and/or v6).
pub type DnsRecords = BTreeMap<String, Vec<IpAddr>>;

/// The mesh DNS of a host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsPlan {
    /// The host's mesh addresses, port [`DNS_PORT`] (the daemon may move it).
    pub listen: Vec<SocketAddr>,
    /// The mesh domain.
    pub domain: String,
    /// The names it answers for.
    pub records: DnsRecords,
    /// Ranges whose reverse names (PTR) it serves: the mesh ranges.
    pub reverse: Vec<IpNet>,
    /// Who may query it over the mesh: on the hub the mesh ranges (devices use it); none on members,
    /// whose server is for the host itself (its queries arrive over loopback).
    pub clients: Vec<IpNet>,
}

/// The mesh DNS of the host of `view`: names of active nodes, devices, and services on active nodes.
pub(super) fn plan(view: &HostView<'_>) -> DnsPlan {
    let s = view.s;
    let mut records = DnsRecords::new();
    let mut add = |name: &Label, index: u32| {
        records.insert(s.network.fqdn(name), view.host_addrs(index).to_vec());
    };
    view.active.iter().for_each(|n| add(&n.name, n.index));
    s.devices.iter().for_each(|d| add(&d.name, d.index));
    s.services.iter().filter(|v| view.active.iter().any(|n| n.name == v.node)).for_each(|v| add(&v.name, v.index));
    DnsPlan {
        listen: view.own(DNS_PORT),
        domain: s.network.domain.clone(),
        records,
        reverse: view.mesh().to_vec(),
        clients: if view.is_hub { view.mesh().to_vec() } else { Vec::new() },
    }
}

/// TTL of mesh records: short, because peers come and go and updates must show quickly.
pub const RECORD_TTL: u32 = 30;
/// TTL of SOA/NS and of negative answers (SOA minimum), short for the same reason.
const ZONE_TTL: u32 = 30;
/// SOA timers; nothing transfers this zone, but resolvers expect plausible values.
const SOA_REFRESH: i32 = 3600;
const SOA_RETRY: i32 = 600;
const SOA_EXPIRE: i32 = 86_400;
/// The DNS port, where the mesh DNS listens and upstream resolvers answer.
pub const DNS_PORT: u16 = 53;

/// The mesh domain or a mesh range cannot be served as a zone.
#[derive(Debug, thiserror::Error)]
pub enum ZoneError {
    /// The mesh domain is not a usable DNS name.
    #[error("invalid mesh DNS domain {domain:?}: {reason}")]
    InvalidDomain {
        /// The domain as configured.
        domain: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A mesh range too wide to serve reverse names for.
    #[error("cannot serve reverse names for {0}: the range is too wide")]
    ReverseRange(IpNet),
}

/// What a zone holds.
#[derive(Debug, Clone, Copy)]
pub enum ZoneKind {
    /// The mesh domain: A/AAAA.
    Names,
    /// Reverse names (PTR) of the addresses in this range.
    Reverse(IpNet),
}

/// Parses the mesh domain into a fully-qualified lowercase name; the root is refused because
/// the mesh zone would then shadow every name on the internet.
pub fn parse_domain(domain: &str) -> Result<Name, ZoneError> {
    let invalid = |reason: String| ZoneError::InvalidDomain { domain: domain.to_owned(), reason };
    let mut name = Name::from_ascii(domain).map_err(|error| invalid(error.to_string()))?;
    name.set_fqdn(true);
    if name.is_root() {
        return Err(invalid("the root cannot be the mesh domain".to_owned()));
    }
    Ok(name.to_lowercase())
}

/// The reverse zones that cover `range`: reverse names have one label per octet (IPv4) or nibble
/// (IPv6), so a range not on such a boundary is served as the aligned ranges it splits into.
pub fn reverse_zones(range: IpNet) -> Result<Vec<(Name, IpNet)>, ZoneError> {
    // Bits per reverse label, and the fewest bits a zone may fix (a wider zone would shadow reverse
    // names far outside the mesh), for each family.
    let (bits, narrowest) = if range.addr().is_ipv4() { (8, 8) } else { (4, 16) };
    if range.prefix_len() < narrowest {
        return Err(ZoneError::ReverseRange(range));
    }
    let aligned = range.prefix_len().div_ceil(bits) * bits;
    let subnets = range.subnets(aligned).map_err(|_| ZoneError::ReverseRange(range))?;
    // The labels of the reverse name that the zone fixes, plus "in-addr.arpa" / "ip6.arpa".
    let labels = usize::from(aligned / bits) + 2;
    Ok(subnets.map(|net| (Name::from(net.network()).trim_to(labels), net)).collect())
}

/// The mesh records' names as lowercase FQDNs within `domain`, parsed once for every zone built from
/// them; unusable ones are logged and skipped.
pub fn mesh_names<'a>(records: &'a DnsRecords, domain: &Name) -> Vec<(Name, &'a [IpAddr])> {
    let usable = |raw: &str| {
        let name = match Name::from_ascii(raw) {
            Ok(mut name) => {
                name.set_fqdn(true);
                name.to_lowercase()
            }
            Err(error) => {
                warn!(name = raw, %error, "skipping invalid mesh DNS name");
                return None;
            }
        };
        if !domain.zone_of(&name) {
            warn!(name = raw, %domain, "skipping mesh DNS name outside the domain");
            return None;
        }
        Some(name)
    };
    records.iter().filter_map(|(raw, addrs)| Some((usable(raw)?, addrs.as_slice()))).collect()
}

/// Builds the complete record map of one zone: SOA and NS at the apex plus A/AAAA sets (the mesh
/// domain) or PTR records (a reverse zone).
pub fn zone_records(
    origin: &Name,
    domain: &Name,
    kind: ZoneKind,
    names: &[(Name, &[IpAddr])],
    serial: u32,
) -> BTreeMap<RrKey, Arc<RecordSet>> {
    let mut sets: BTreeMap<RrKey, RecordSet> = BTreeMap::new();
    let mut add = |name: &Name, rtype: RecordType, ttl: u32, rdata: RData| {
        sets.entry(RrKey::new(LowerName::new(name), rtype))
            .or_insert_with(|| RecordSet::with_ttl(name.clone(), rtype, ttl))
            .add_rdata(rdata);
    };

    // The apex names the mesh domain as its name server: the zones only exist on this host.
    let hostmaster = Name::from_labels([&b"hostmaster"[..]]).and_then(|label| label.append_domain(domain));
    let rname = hostmaster.unwrap_or_else(|_| domain.clone());
    let soa = SOA::new(domain.clone(), rname, serial, SOA_REFRESH, SOA_RETRY, SOA_EXPIRE, ZONE_TTL);
    add(origin, RecordType::SOA, ZONE_TTL, RData::SOA(soa));
    add(origin, RecordType::NS, ZONE_TTL, RData::NS(NS(domain.clone())));

    for (name, addrs) in names {
        for &addr in *addrs {
            match (kind, addr) {
                (ZoneKind::Names, IpAddr::V4(v4)) => add(name, RecordType::A, RECORD_TTL, RData::A(A(v4))),
                (ZoneKind::Names, IpAddr::V6(v6)) => add(name, RecordType::AAAA, RECORD_TTL, RData::AAAA(AAAA(v6))),
                (ZoneKind::Reverse(net), addr) if net.contains(&addr) => {
                    add(&Name::from(addr), RecordType::PTR, RECORD_TTL, RData::PTR(PTR(name.clone())));
                }
                (ZoneKind::Reverse(_), _) => {}
            }
        }
    }

    sets.into_iter().map(|(key, set)| (key, Arc::new(set))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
        IpAddr::from([a, b, c, d])
    }

    #[test]
    fn reverse_zones_follow_label_boundaries() {
        let names = |range: &str| -> Vec<String> {
            reverse_zones(range.parse().unwrap()).unwrap().iter().map(|(name, _)| name.to_string()).collect()
        };
        assert_eq!(names("10.77.0.0/16"), ["77.10.in-addr.arpa."]);
        let split = names("10.77.0.0/20");
        assert_eq!(split.len(), 16);
        assert_eq!((split[0].as_str(), split[15].as_str()), ("0.77.10.in-addr.arpa.", "15.77.10.in-addr.arpa."));
        assert_eq!(names("fd77::/64"), ["0.0.0.0.0.0.0.0.0.0.0.0.7.7.d.f.ip6.arpa."]);
        assert_eq!(names("fd77:1::/62").len(), 4);
        for too_wide in ["10.0.0.0/7", "fd00::/8"] {
            assert!(matches!(reverse_zones(too_wide.parse().unwrap()), Err(ZoneError::ReverseRange(_))), "{too_wide}");
        }
    }

    #[test]
    fn zone_skips_names_outside_the_domain() {
        let origin = parse_domain("Home.Internal.").expect("valid domain");
        assert_eq!(origin, Name::from_ascii("home.internal.").unwrap());
        let records = DnsRecords::from([
            ("web.home.internal".to_owned(), vec![v4(10, 77, 0, 10)]),
            ("web.elsewhere.org".to_owned(), vec![v4(10, 77, 0, 11)]),
        ]);
        let zone = zone_records(&origin, &origin, ZoneKind::Names, &mesh_names(&records, &origin), 7);
        let names: Vec<String> =
            zone.keys().filter(|key| key.record_type == RecordType::A).map(|key| key.name().to_string()).collect();
        assert_eq!(names, vec!["web.home.internal.".to_owned()]);
    }
}
