//! Resolving the endpoint names of peers (a hub or member on a dynamic IP behind a DDNS name), both
//! families, with the records' TTL: hickory's resolver, configured from the host's `/etc/resolv.conf`
//! and `/etc/hosts` afresh at each lookup (so a changed hosts file or resolver counts at once), with
//! the system's resolver (getaddrinfo, which knows nsswitch modules such as mDNS) as the fallback.

use std::net::SocketAddr;
use std::time::Duration;

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{LookupIpStrategy, ResolveHosts};
use meshd_core::input::HostPort;
use meshd_core::session::paths::Resolved;

/// How long hickory may take before the system resolver is asked instead.
const DNS_WAIT: Duration = Duration::from_secs(3);

/// The TTL assumed for an answer of the system resolver, which does not tell it.
const SYSTEM_TTL: Duration = Duration::from_secs(60);

/// Every address `endpoint` resolves to, AAAA before A (RFC 6724 prefers IPv6; the peer's watch tries
/// the others in turn), with its port, and the shortest TTL of the records. Errors: the name does not
/// resolve by either resolver (the message says why, for the log).
pub async fn resolve(endpoint: &HostPort) -> Result<Resolved, String> {
    let host = endpoint.host();
    let port = endpoint.port();
    // A name only in the hosts file for one family still sends the other family's question to the
    // configured servers; unreachable (a LAN resolver from elsewhere), they cost their full timeout. The
    // system resolver answers such a name at once.
    let dns = tokio::time::timeout(DNS_WAIT, lookup(&host)).await.unwrap_or_else(|_| Err("timed out".into()));
    match dns {
        Ok((ips, ttl)) if !ips.is_empty() => {
            Ok(Resolved { addrs: ips.into_iter().map(|ip| SocketAddr::new(ip, port)).collect(), ttl })
        }
        first => {
            let system = tokio::net::lookup_host((host.as_str(), port)).await;
            match system {
                Ok(addrs) => {
                    let mut addrs: Vec<SocketAddr> = addrs.collect();
                    addrs.sort_by_key(SocketAddr::is_ipv4);
                    addrs.dedup();
                    Ok(Resolved { addrs, ttl: SYSTEM_TTL })
                }
                Err(e) => Err(match first {
                    Err(dns) => format!("{host}: {dns}; system resolver: {e}"),
                    Ok(_) => format!("{host}: no address; system resolver: {e}"),
                }),
            }
        }
    }
}

async fn lookup(host: &str) -> Result<(Vec<std::net::IpAddr>, Duration), String> {
    let mut builder = TokioResolver::builder_tokio().map_err(|e| e.to_string())?;
    let options = builder.options_mut();
    options.use_hosts_file = ResolveHosts::Always;
    options.ip_strategy = LookupIpStrategy::Ipv6AndIpv4;
    options.cache_size = 0;
    let resolver = builder.build().map_err(|e| e.to_string())?;
    let answer = resolver.lookup_ip(host).await.map_err(|e| e.to_string())?;
    let ttl = answer.valid_until().saturating_duration_since(std::time::Instant::now());
    Ok((answer.iter().collect(), ttl))
}
