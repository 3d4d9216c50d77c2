//! Mesh DNS server of a mesh host: authoritative A/AAAA for the network's domain, everything else
//! forwarded to the host's upstream resolvers. Every host runs one from its own copy of the network
//! (the hub for the devices too), so names keep resolving while the controller is away.
//!
//! Requests enter through a hickory [`Server`] whose [`Catalog`] holds in-memory zones for the mesh
//! domain and for the reverse names of the mesh ranges (PTR, so `ping`, `ssh` and logs show names
//! instead of waiting on a lookup nobody answers) and, when upstreams exist, a forwarder for the root
//! zone. The catalog picks the most specific zone, so mesh names never leave the host.
//!
//! Live updates replace the whole record map of each in-memory zone under its write lock
//! (`records_mut`). That is atomic for readers (a query sees the old set or the new one, never a
//! mix), removes names as easily as it adds them, and keeps the catalog, the sockets and the
//! forwarder's cache untouched; per-record `upsert` cannot delete, and swapping the catalog would
//! need a custom request handler in front of the server.

use std::{
    collections::HashSet,
    fs, io,
    net::{IpAddr, SocketAddr},
    path::Path,
    sync::Arc,
    time::Duration,
};

use hickory_proto::rr::{LowerName, Name};
use hickory_resolver::config::{ConnectionConfig, NameServerConfig};
use hickory_server::{
    Server,
    store::{
        forwarder::{ForwardConfig, ForwardZoneHandler},
        in_memory::InMemoryZoneHandler,
    },
    zone_handler::{AxfrPolicy, Catalog, ZoneHandler, ZoneType},
};
use ipnet::IpNet;
use socket2::{Protocol, Type};
use tokio::{
    net::{TcpListener, UdpSocket},
    sync::Mutex,
};
use tracing::{debug, info, warn};

use meshd_core::plan::dns::{
    DNS_PORT, DnsRecords, ZoneError, ZoneKind, mesh_names, parse_domain, reverse_zones, zone_records,
};

/// Idle TCP connections are closed after this, so clients cannot pin sockets forever.
const TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(5);
/// Responses queued per TCP connection (the value hickory's own tests use).
const TCP_RESPONSE_BUFFER: usize = 32;
const TCP_BACKLOG: i32 = 128;
/// Errors from starting the mesh DNS server.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    /// The mesh domain or a mesh range cannot be served as a zone.
    #[error(transparent)]
    Zone(#[from] ZoneError),
    /// No address to listen on was given.
    #[error("mesh DNS needs at least one listen address")]
    NoListenAddress,
    /// A UDP or TCP socket could not be created or bound.
    #[error("cannot bind mesh DNS {transport} socket on {addr}: {source}")]
    Bind { transport: &'static str, addr: SocketAddr, source: io::Error },
    /// The forwarder for non-mesh names could not be built.
    #[error("cannot set up forwarding to {upstreams:?}: {reason}")]
    Forwarder { upstreams: Vec<SocketAddr>, reason: String },
}

/// A running mesh DNS server; stop it with [`MeshDns::shutdown`].
pub struct MeshDns {
    server: Server<Catalog>,
    /// The mesh domain first, then the reverse zones.
    zones: Vec<Zone>,
    origin: Name,
    /// SOA serial; the lock also serialises updates so a newer serial never carries older records.
    serial: Mutex<u32>,
    local_addrs: Vec<SocketAddr>,
}

impl MeshDns {
    /// Binds UDP and TCP on every `listen` address (even one still tentative), serves `records`
    /// under `domain` and their reverse names within the `reverse` ranges, and forwards other names
    /// to `upstreams`; names outside `domain` are skipped. Only clients within the `reverse` ranges (the
    /// mesh) and loopback are answered; others get REFUSED.
    pub async fn start(
        listen: &[SocketAddr],
        domain: &str,
        reverse: &[IpNet],
        records: DnsRecords,
        upstreams: Vec<SocketAddr>,
    ) -> Result<MeshDns, DnsError> {
        if listen.is_empty() {
            return Err(DnsError::NoListenAddress);
        }
        let origin = parse_domain(domain)?;
        let serial = 1;
        let (mut catalog, zones) = mesh_catalog(&origin, reverse, &records, serial)?;
        // Without upstreams there is no root zone, so the catalog answers REFUSED at once
        // instead of a resolver timing out against nothing.
        if !upstreams.is_empty() {
            let forwarder = forwarder(&upstreams)?;
            catalog.upsert(LowerName::new(&Name::root()), vec![Arc::new(forwarder)]);
        }

        // Bind everything before spawning anything, so a failed bind leaves nothing running.
        let mut sockets = Vec::with_capacity(listen.len());
        for &addr in listen {
            let udp = bind_udp(addr)?;
            let bound = udp.local_addr().map_err(|source| DnsError::Bind { transport: "UDP", addr, source })?;
            // TCP takes the port UDP got, so a requested port 0 yields one port for both. On
            // Linux SO_REUSEADDR lets a second UDP socket share a port, but not a second TCP
            // listener, so this bind also stops two servers from silently splitting a port.
            let tcp = bind_tcp(bound)?;
            sockets.push((bound, udp, tcp));
        }

        // Only the mesh asks (and the host itself, over loopback): a neighbour that reaches a mesh address
        // some other way gets REFUSED, neither the mesh's names nor a forwarder for outside ones.
        let loopback: [IpNet; 2] = [
            IpNet::V4(ipnet::Ipv4Net::new(std::net::Ipv4Addr::LOCALHOST, 8).expect("/8 is valid")),
            IpNet::V6(ipnet::Ipv6Net::new(std::net::Ipv6Addr::LOCALHOST, 128).expect("/128 is valid")),
        ];
        let mut server = Server::with_access(catalog, [], reverse.iter().copied().chain(loopback));
        let mut local_addrs = Vec::with_capacity(sockets.len());
        for (bound, udp, tcp) in sockets {
            server.register_socket(udp);
            server.register_listener(tcp, TCP_IDLE_TIMEOUT, TCP_RESPONSE_BUFFER);
            local_addrs.push(bound);
        }
        info!(
            domain = %origin,
            listen = ?local_addrs,
            ?upstreams,
            names = records.len(),
            "mesh DNS started"
        );

        Ok(MeshDns { server, zones, origin, serial: Mutex::new(serial), local_addrs })
    }

    /// Addresses actually bound (UDP and TCP share each one), with real ports when 0 was asked.
    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.local_addrs
    }

    /// Replaces the served records atomically: new names answer at once, removed ones get
    /// NXDOMAIN.
    pub async fn update(&self, records: DnsRecords) {
        let mut serial = self.serial.lock().await;
        *serial = serial.wrapping_add(1);
        let names = mesh_names(&records, &self.origin);
        for zone in &self.zones {
            let fresh = zone_records(&zone.origin, &self.origin, zone.kind, &names, *serial);
            *zone.handler.records_mut().await = fresh;
        }
        debug!(domain = %self.origin, serial = *serial, names = records.len(), "mesh DNS records updated");
    }

    /// Stops serving and releases the sockets.
    pub async fn shutdown(mut self) {
        if let Err(error) = self.server.shutdown_gracefully().await {
            warn!(%error, "mesh DNS server ended with an error");
        }
        info!(domain = %self.origin, "mesh DNS stopped");
    }
}

/// Upstream resolvers (port 53) from a resolv.conf-format file, skipping `exclude` (the mesh
/// DNS's own addresses, which would loop) and scoped link-local ones; a missing file gives none.
pub fn upstreams_from_resolv_conf(path: &Path, exclude: &[IpAddr]) -> Vec<SocketAddr> {
    let text = match fs::read_to_string(path) {
        Ok(text) => text,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Vec::new(),
        Err(error) => {
            warn!(path = %path.display(), %error, "cannot read resolver configuration");
            return Vec::new();
        }
    };

    let mut seen = HashSet::new();
    let mut upstreams = Vec::new();
    for line in text.lines() {
        // resolv.conf comments start with '#' or ';', also after a value.
        let line = line.split(['#', ';']).next().unwrap_or_default();
        let mut words = line.split_whitespace();
        if words.next() != Some("nameserver") {
            continue;
        }
        let Some(value) = words.next() else {
            continue;
        };
        // A scoped address (fe80::1%eth0) cannot be expressed in the forwarder's config, which
        // takes a bare IP; the same holds for unscoped link-local, which the kernel cannot route.
        if value.contains('%') {
            debug!(nameserver = value, "skipping scoped nameserver");
            continue;
        }
        let ip: IpAddr = match value.parse() {
            Ok(ip) => ip,
            Err(_) => {
                warn!(path = %path.display(), nameserver = value, "skipping unparsable nameserver");
                continue;
            }
        };
        let link_local = matches!(ip, IpAddr::V6(v6) if v6.is_unicast_link_local());
        if link_local || ip.is_unspecified() || exclude.contains(&ip) || !seen.insert(ip) {
            debug!(nameserver = %ip, "skipping nameserver");
            continue;
        }
        upstreams.push(SocketAddr::new(ip, DNS_PORT));
    }
    upstreams
}

/// The catalog of the mesh zones: `records` under `origin`, and their reverse names within the
/// `reverse` ranges; and those zones, the mesh domain first. Names outside `origin` are skipped.
pub(crate) fn mesh_catalog(
    origin: &Name,
    reverse: &[IpNet],
    records: &DnsRecords,
    serial: u32,
) -> Result<(Catalog, Vec<Zone>), ZoneError> {
    let mut kinds = vec![(origin.clone(), ZoneKind::Names)];
    for &range in reverse {
        kinds.extend(reverse_zones(range)?.into_iter().map(|(name, net)| (name, ZoneKind::Reverse(net))));
    }
    let names = mesh_names(records, origin);
    let mut catalog = Catalog::new();
    let mut zones = Vec::with_capacity(kinds.len());
    for (zone_origin, kind) in kinds {
        let mut handler = InMemoryZoneHandler::empty(zone_origin.clone(), ZoneType::Primary, AxfrPolicy::Deny);
        *handler.records_get_mut() = zone_records(&zone_origin, origin, kind, &names, serial);
        let handler = Arc::new(handler);
        catalog.upsert(LowerName::new(&zone_origin), vec![handler.clone() as Arc<dyn ZoneHandler>]);
        zones.push(Zone { origin: zone_origin, kind, handler });
    }
    Ok((catalog, zones))
}

/// One zone served from the mesh records.
pub(crate) struct Zone {
    origin: Name,
    kind: ZoneKind,
    handler: Arc<InMemoryZoneHandler>,
}

/// Builds the root-zone forwarder; upstreams are asked over UDP, and over TCP when truncated.
fn forwarder(upstreams: &[SocketAddr]) -> Result<ForwardZoneHandler, DnsError> {
    let name_servers = upstreams
        .iter()
        .map(|upstream| {
            let mut udp = ConnectionConfig::udp();
            udp.port = upstream.port();
            let mut tcp = ConnectionConfig::tcp();
            tcp.port = upstream.port();
            NameServerConfig::new(upstream.ip(), true, vec![udp, tcp])
        })
        .collect();
    let config = ForwardConfig { name_servers, options: None };
    ForwardZoneHandler::builder_tokio(config)
        .build()
        .map_err(|reason| DnsError::Forwarder { upstreams: upstreams.to_vec(), reason })
}

fn bind_udp(addr: SocketAddr) -> Result<UdpSocket, DnsError> {
    crate::host::socket::bind_freely(addr, Type::DGRAM, Protocol::UDP)
        .and_then(|socket| UdpSocket::from_std(socket.into()))
        .map_err(|source| DnsError::Bind { transport: "UDP", addr, source })
}

fn bind_tcp(addr: SocketAddr) -> Result<TcpListener, DnsError> {
    crate::host::socket::bind_freely(addr, Type::STREAM, Protocol::TCP)
        .and_then(|socket| {
            socket.listen(TCP_BACKLOG)?;
            TcpListener::from_std(socket.into())
        })
        .map_err(|source| DnsError::Bind { transport: "TCP", addr, source })
}

#[cfg(test)]
mod tests {
    use std::{
        io::Write,
        net::{Ipv4Addr, Ipv6Addr},
        str::FromStr,
    };

    use hickory_proto::{
        op::{DnsResponse, ResponseCode},
        rr::{DNSClass, Record},
    };
    use hickory_server::net::{
        client::{Client, ClientHandle},
        runtime::TokioRuntimeProvider,
        tcp::TcpClientStream,
        udp::UdpClientStream,
    };
    use tokio::time::timeout;

    use hickory_proto::rr::{RData, RecordType};
    use meshd_core::plan::dns::RECORD_TTL;

    use super::*;

    const DOMAIN: &str = "home.internal";
    const QUERY_DEADLINE: Duration = Duration::from_secs(2);

    fn v4(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(a, b, c, d))
    }

    fn v6(text: &str) -> IpAddr {
        IpAddr::V6(Ipv6Addr::from_str(text).expect("test IPv6 literal"))
    }

    fn mesh_records() -> DnsRecords {
        DnsRecords::from([
            ("node1.home.internal".to_owned(), vec![v4(10, 77, 0, 1), v6("fd77::1")]),
            ("web.home.internal".to_owned(), vec![v4(10, 77, 0, 10)]),
        ])
    }

    /// One UDP query through hickory's client, bounded so a hang fails the test.
    async fn query_udp(server: SocketAddr, name: &str, rtype: RecordType) -> DnsResponse {
        let stream = UdpClientStream::builder(server, TokioRuntimeProvider::default()).build();
        let (client, background) = Client::<TokioRuntimeProvider>::from_sender(stream);
        tokio::spawn(background);
        send(client, name, rtype).await
    }

    async fn query_tcp(server: SocketAddr, name: &str, rtype: RecordType) -> DnsResponse {
        let (connect, handle) = TcpClientStream::new(server, None, None, TokioRuntimeProvider::default());
        let stream = connect.await.expect("TCP connect to mesh DNS");
        let (client, background) = Client::<TokioRuntimeProvider>::new(stream, handle);
        tokio::spawn(background);
        send(client, name, rtype).await
    }

    async fn send(mut client: Client<TokioRuntimeProvider>, name: &str, rtype: RecordType) -> DnsResponse {
        let name = Name::from_ascii(name).expect("test query name");
        timeout(QUERY_DEADLINE, client.query(name, DNSClass::IN, rtype))
            .await
            .expect("no DNS answer within the deadline")
            .expect("DNS exchange failed")
    }

    fn answer_ips(response: &DnsResponse) -> Vec<IpAddr> {
        response
            .answers
            .iter()
            .filter_map(|record: &Record| match &record.data {
                RData::A(a) => Some(IpAddr::V4(a.0)),
                RData::AAAA(aaaa) => Some(IpAddr::V6(aaaa.0)),
                _ => None,
            })
            .collect()
    }

    async fn soa_serial(server: SocketAddr) -> Option<u32> {
        let response = query_udp(server, "home.internal.", RecordType::SOA).await;
        response.answers.iter().find_map(|record| match &record.data {
            RData::SOA(soa) => Some(soa.serial),
            _ => None,
        })
    }

    fn has_soa_authority(response: &DnsResponse) -> bool {
        response.authorities.iter().any(|record| record.record_type() == RecordType::SOA)
    }

    #[tokio::test]
    async fn answers_mesh_names_authoritatively() {
        let listen = ["127.0.0.1:0".parse().unwrap(), "[::1]:0".parse().unwrap()];
        let dns = MeshDns::start(&listen, DOMAIN, &[], mesh_records(), Vec::new()).await.expect("start mesh DNS");
        let [v4_addr, v6_addr] = dns.local_addrs() else {
            panic!("expected two bound addresses, got {:?}", dns.local_addrs());
        };
        let (v4_addr, v6_addr) = (*v4_addr, *v6_addr);
        assert_ne!(v4_addr.port(), 0);

        let node_a = query_udp(v4_addr, "node1.home.internal.", RecordType::A).await;
        assert_eq!(node_a.metadata.response_code, ResponseCode::NoError);
        assert!(node_a.metadata.authoritative, "mesh answers carry AA");
        assert_eq!(answer_ips(&node_a), vec![v4(10, 77, 0, 1)]);
        assert!(node_a.answers.iter().all(|r| r.ttl == RECORD_TTL));

        let node_aaaa = query_udp(v6_addr, "node1.home.internal.", RecordType::AAAA).await;
        assert_eq!(node_aaaa.metadata.response_code, ResponseCode::NoError);
        assert_eq!(answer_ips(&node_aaaa), vec![v6("fd77::1")]);

        let web = query_udp(v4_addr, "WEB.Home.Internal.", RecordType::A).await;
        assert_eq!(web.metadata.response_code, ResponseCode::NoError);
        assert_eq!(answer_ips(&web), vec![v4(10, 77, 0, 10)]);

        let web_tcp = query_tcp(v4_addr, "web.home.internal.", RecordType::A).await;
        assert_eq!(answer_ips(&web_tcp), vec![v4(10, 77, 0, 10)]);

        // web has no IPv6 address: NODATA, i.e. NOERROR, no answer, SOA for negative caching.
        let web_aaaa = query_udp(v4_addr, "web.home.internal.", RecordType::AAAA).await;
        assert_eq!(web_aaaa.metadata.response_code, ResponseCode::NoError);
        assert!(web_aaaa.answers.is_empty());
        assert!(has_soa_authority(&web_aaaa));

        let unknown = query_udp(v4_addr, "nope.home.internal.", RecordType::A).await;
        assert_eq!(unknown.metadata.response_code, ResponseCode::NXDomain);
        assert!(unknown.metadata.authoritative);
        assert!(unknown.answers.is_empty());
        assert!(has_soa_authority(&unknown));

        let soa = query_udp(v4_addr, "home.internal.", RecordType::SOA).await;
        assert_eq!(soa.metadata.response_code, ResponseCode::NoError);
        assert!(matches!(
            soa.answers.first().map(|r| &r.data),
            Some(RData::SOA(soa)) if soa.mname == Name::from_ascii("home.internal.").unwrap()
        ));
        let ns = query_udp(v4_addr, "home.internal.", RecordType::NS).await;
        assert_eq!(ns.metadata.response_code, ResponseCode::NoError);
        assert!(matches!(ns.answers.first().map(|r| &r.data), Some(RData::NS(_))));

        dns.shutdown().await;
    }

    #[tokio::test]
    async fn update_adds_and_removes_names() {
        let listen = ["127.0.0.1:0".parse().unwrap()];
        let dns = MeshDns::start(&listen, DOMAIN, &[], mesh_records(), Vec::new()).await.expect("start mesh DNS");
        let addr = dns.local_addrs()[0];
        let serial_before = soa_serial(addr).await;

        let mut records = mesh_records();
        records.remove("web.home.internal");
        records.insert("phone.home.internal".to_owned(), vec![v4(10, 77, 0, 20)]);
        dns.update(records).await;

        let phone = query_udp(addr, "phone.home.internal.", RecordType::A).await;
        assert_eq!(phone.metadata.response_code, ResponseCode::NoError);
        assert_eq!(answer_ips(&phone), vec![v4(10, 77, 0, 20)]);

        let web = query_udp(addr, "web.home.internal.", RecordType::A).await;
        assert_eq!(web.metadata.response_code, ResponseCode::NXDomain);
        assert!(web.answers.is_empty());

        let node = query_udp(addr, "node1.home.internal.", RecordType::A).await;
        assert_eq!(answer_ips(&node), vec![v4(10, 77, 0, 1)]);

        let serial_after = soa_serial(addr).await;
        assert!(serial_after > serial_before, "{serial_after:?} > {serial_before:?}");

        dns.shutdown().await;
    }

    #[tokio::test]
    async fn forwards_other_names_to_upstream() {
        let upstream_records = DnsRecords::from([("outside.test".to_owned(), vec![v4(192, 0, 2, 55)])]);
        let upstream = MeshDns::start(&["127.0.0.1:0".parse().unwrap()], "test", &[], upstream_records, Vec::new())
            .await
            .expect("start upstream DNS");

        let dns = MeshDns::start(
            &["127.0.0.1:0".parse().unwrap()],
            DOMAIN,
            &[],
            mesh_records(),
            upstream.local_addrs().to_vec(),
        )
        .await
        .expect("start mesh DNS");
        let addr = dns.local_addrs()[0];

        let outside = query_udp(addr, "outside.test.", RecordType::A).await;
        assert_eq!(outside.metadata.response_code, ResponseCode::NoError);
        assert_eq!(answer_ips(&outside), vec![v4(192, 0, 2, 55)]);
        assert!(!outside.metadata.authoritative, "forwarded answers are not ours");
        assert!(outside.metadata.recursion_available);

        let missing = query_udp(addr, "missing.test.", RecordType::A).await;
        assert_eq!(missing.metadata.response_code, ResponseCode::NXDomain);

        // Mesh names are still answered locally, never forwarded.
        let web = query_udp(addr, "web.home.internal.", RecordType::A).await;
        assert_eq!(answer_ips(&web), vec![v4(10, 77, 0, 10)]);

        dns.shutdown().await;
        upstream.shutdown().await;
    }

    #[tokio::test]
    async fn non_mesh_query_without_upstreams_fails_fast() {
        let dns = MeshDns::start(&["127.0.0.1:0".parse().unwrap()], DOMAIN, &[], mesh_records(), Vec::new())
            .await
            .expect("start mesh DNS");

        // send() already fails the test if nothing arrives within two seconds.
        let response = query_udp(dns.local_addrs()[0], "example.com.", RecordType::A).await;
        assert_eq!(response.metadata.response_code, ResponseCode::Refused);
        assert!(response.answers.is_empty());

        dns.shutdown().await;
    }

    #[tokio::test]
    async fn shutdown_releases_the_port() {
        let dns = MeshDns::start(&["127.0.0.1:0".parse().unwrap()], DOMAIN, &[], mesh_records(), Vec::new())
            .await
            .expect("start mesh DNS");
        let addr = dns.local_addrs()[0];
        dns.shutdown().await;

        // A plain bind (no SO_REUSEADDR) succeeds only if no socket holds the port any more.
        std::net::UdpSocket::bind(addr).expect("UDP port released");
        std::net::TcpListener::bind(addr).expect("TCP port released");
    }

    #[tokio::test]
    async fn binds_addresses_not_configured_on_this_host() {
        // Documentation prefixes are never local; binding them needs IP_FREEBIND/IPV6_FREEBIND,
        // as a freshly added (still tentative) mesh address does. Nothing is sent to them.
        let listen = ["192.0.2.1:0".parse().unwrap(), "[2001:db8::1]:0".parse().unwrap()];
        let dns = MeshDns::start(&listen, DOMAIN, &[], mesh_records(), Vec::new())
            .await
            .expect("freebind lets the server bind non-local addresses");
        let ips: Vec<IpAddr> = dns.local_addrs().iter().map(SocketAddr::ip).collect();
        assert_eq!(ips, vec![v4(192, 0, 2, 1), v6("2001:db8::1")]);
        dns.shutdown().await;
    }

    #[tokio::test]
    async fn rejects_bad_configuration() {
        let listen = ["127.0.0.1:0".parse().unwrap()];
        assert!(matches!(
            MeshDns::start(&listen, ".", &[], DnsRecords::new(), Vec::new()).await,
            Err(DnsError::Zone(ZoneError::InvalidDomain { .. }))
        ));
        assert!(matches!(
            MeshDns::start(&[], DOMAIN, &[], DnsRecords::new(), Vec::new()).await,
            Err(DnsError::NoListenAddress)
        ));
    }

    fn ptr_names(response: &DnsResponse) -> Vec<String> {
        response
            .answers
            .iter()
            .filter_map(|record| match &record.data {
                RData::PTR(ptr) => Some(ptr.0.to_string()),
                _ => None,
            })
            .collect()
    }

    #[tokio::test]
    async fn answers_reverse_names_of_mesh_addresses() {
        let ranges = ["10.77.0.0/16".parse().unwrap(), "fd77::/64".parse().unwrap()];
        let dns = MeshDns::start(&["127.0.0.1:0".parse().unwrap()], DOMAIN, &ranges, mesh_records(), Vec::new())
            .await
            .expect("start mesh DNS");
        let addr = dns.local_addrs()[0];

        let node = query_udp(addr, "1.0.77.10.in-addr.arpa.", RecordType::PTR).await;
        assert_eq!(node.metadata.response_code, ResponseCode::NoError);
        assert!(node.metadata.authoritative);
        assert_eq!(ptr_names(&node), ["node1.home.internal."]);
        let v6_name = Name::from(v6("fd77::1")).to_string();
        assert_eq!(ptr_names(&query_udp(addr, &v6_name, RecordType::PTR).await), ["node1.home.internal."]);
        assert_eq!(
            ptr_names(&query_udp(addr, "10.0.77.10.in-addr.arpa.", RecordType::PTR).await),
            ["web.home.internal."]
        );

        // An unused mesh address gets an authoritative NXDOMAIN at once, not a timeout.
        let unused = query_udp(addr, "99.0.77.10.in-addr.arpa.", RecordType::PTR).await;
        assert_eq!(unused.metadata.response_code, ResponseCode::NXDomain);
        assert!(unused.metadata.authoritative && has_soa_authority(&unused));

        // Updates reach the reverse names too.
        let mut records = mesh_records();
        records.remove("web.home.internal");
        dns.update(records).await;
        let gone = query_udp(addr, "10.0.77.10.in-addr.arpa.", RecordType::PTR).await;
        assert_eq!(gone.metadata.response_code, ResponseCode::NXDomain);
        dns.shutdown().await;
    }

    #[test]
    fn reads_upstreams_from_resolv_conf() {
        let mut file = tempfile::NamedTempFile::new().expect("temp file");
        writeln!(
            file,
            "# generated by NetworkManager\n\
             search lan\n\
             nameserver 10.77.0.1\n\
             nameserver 192.168.1.1 # home router\n\
             ; nameserver 9.9.9.9\n\
             nameserver 2001:db8::53\n\
             nameserver fe80::1%eth0\n\
             nameserver 192.168.1.1\n\
             nameserver not-an-address\n\
             options edns0 trust-ad"
        )
        .expect("write temp file");

        let upstreams = upstreams_from_resolv_conf(file.path(), &[v4(10, 77, 0, 1)]);
        assert_eq!(upstreams, vec![SocketAddr::new(v4(192, 168, 1, 1), 53), SocketAddr::new(v6("2001:db8::53"), 53),]);
    }

    #[test]
    fn missing_resolv_conf_means_no_upstreams() {
        let dir = tempfile::tempdir().expect("temp dir");
        let upstreams = upstreams_from_resolv_conf(&dir.path().join("resolv.conf"), &[]);
        assert!(upstreams.is_empty());
    }
}
