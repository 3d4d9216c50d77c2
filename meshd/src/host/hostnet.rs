//! What this host's networking already uses: a new mesh range must not overlap a network the host
//! routes elsewhere (its LAN, a VPN), or traffic for one of them would go to the other. And how an
//! interface stands (up or not, its addresses), read without starting a process.

use std::collections::HashSet;
use std::ffi::CStr;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::Ipv4Net;

/// Where the kernel lists IPv4 routes.
const PROC_ROUTES: &str = "/proc/net/route";

/// A route of the host: destination network and interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub interface: String,
    pub network: Ipv4Net,
}

/// The host's IPv4 routes other than default routes; none when they cannot be read.
pub fn ipv4_routes() -> Vec<Route> {
    std::fs::read_to_string(PROC_ROUTES).map(|text| parse_proc_routes(&text)).unwrap_or_default()
}

/// Parse `/proc/net/route` (addresses in the kernel's native byte order, as hex), skipping default routes.
pub fn parse_proc_routes(text: &str) -> Vec<Route> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (interface, destination, mask) = (fields.first()?, fields.get(1)?, fields.get(7)?);
            let destination = Ipv4Addr::from(u32::from_be(u32::from_str_radix(destination, 16).ok()?));
            let mask = u32::from_be(u32::from_str_radix(mask, 16).ok()?);
            // Only contiguous masks describe a network; a default route overlaps everything by design.
            if mask == 0 || mask.leading_ones() + mask.trailing_zeros() != 32 {
                return None;
            }
            let network = Ipv4Net::new(destination, mask.leading_ones() as u8).ok()?.trunc();
            Some(Route { interface: (*interface).to_owned(), network })
        })
        .collect()
}

/// The first route whose network overlaps `cidr`.
pub fn overlapping<'a>(cidr: &Ipv4Net, routes: &'a [Route]) -> Option<&'a Route> {
    routes.iter().find(|r| r.network.contains(&cidr.network()) || cidr.contains(&r.network.network()))
}

/// Whether interface `name` is up (administratively), and its addresses; `None` when it does not exist.
pub fn interface_state(name: &str) -> io::Result<Option<(bool, HashSet<IpAddr>)>> {
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs writes a list head we own and free below with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let (mut found, mut up, mut addresses) = (false, false, HashSet::new());
    let mut entry = list;
    while !entry.is_null() {
        // SAFETY: a non-null entry of the list getifaddrs made, valid until freeifaddrs.
        let ifa = unsafe { &*entry };
        entry = ifa.ifa_next;
        // SAFETY: ifa_name is a NUL-terminated string of the entry.
        if ifa.ifa_name.is_null() || unsafe { CStr::from_ptr(ifa.ifa_name) }.to_bytes() != name.as_bytes() {
            continue;
        }
        found = true;
        up |= ifa.ifa_flags & libc::IFF_UP as u32 != 0;
        if ifa.ifa_addr.is_null() {
            continue;
        }
        // SAFETY: ifa_addr points to a sockaddr whose family says which struct it is.
        match i32::from(unsafe { (*ifa.ifa_addr).sa_family }) {
            libc::AF_INET => {
                // SAFETY: an AF_INET address is a sockaddr_in.
                let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                addresses.insert(IpAddr::V4(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr))));
            }
            libc::AF_INET6 => {
                // SAFETY: an AF_INET6 address is a sockaddr_in6.
                let sin6 = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in6) };
                addresses.insert(IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)));
            }
            _ => {}
        }
    }
    // SAFETY: the list getifaddrs made, freed once.
    unsafe { libc::freeifaddrs(list) };
    Ok(found.then_some((up, addresses)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_is_up_with_its_address_and_a_missing_interface_is_none() {
        let (up, addresses) = interface_state("lo").unwrap().expect("lo exists");
        assert!(up && addresses.contains(&IpAddr::V4(Ipv4Addr::LOCALHOST)), "{addresses:?}");
        assert_eq!(interface_state("no-such-if0").unwrap(), None);
    }

    // Captured on a little-endian host: default via 192.168.1.1, 192.168.1.0/24 on eth0,
    // 10.8.0.0/24 on tun0, and a host route.
    const SAMPLE: &str = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
eth0\t00000000\t0101A8C0\t0003\t0\t0\t100\t00000000\t0\t0\t0
eth0\t0001A8C0\t00000000\t0001\t0\t0\t100\t00FFFFFF\t0\t0\t0
tun0\t0000080A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0
eth0\t0A0A0A0A\t0101A8C0\t0007\t0\t0\t0\tFFFFFFFF\t0\t0\t0
";

    #[test]
    fn reads_networks_and_skips_default_routes() {
        let routes = parse_proc_routes(SAMPLE);
        if cfg!(target_endian = "little") {
            let nets: Vec<String> = routes.iter().map(|r| format!("{} {}", r.interface, r.network)).collect();
            assert_eq!(nets, ["eth0 192.168.1.0/24", "tun0 10.8.0.0/24", "eth0 10.10.10.10/32"]);
        }
        assert!(parse_proc_routes("garbage\nline without fields\n").is_empty());
    }

    #[test]
    fn finds_overlaps_both_ways() {
        let routes = vec![
            Route { interface: "eth0".into(), network: "192.168.1.0/24".parse().unwrap() },
            Route { interface: "tun0".into(), network: "10.77.5.0/24".parse().unwrap() },
        ];
        let inner = overlapping(&"10.77.0.0/16".parse().unwrap(), &routes).unwrap();
        assert_eq!(inner.interface, "tun0", "a route inside the mesh range");
        let outer = overlapping(&"192.168.1.64/26".parse().unwrap(), &routes).unwrap();
        assert_eq!(outer.interface, "eth0", "a mesh range inside a route");
        assert_eq!(overlapping(&"10.78.0.0/16".parse().unwrap(), &routes), None);
    }
}
