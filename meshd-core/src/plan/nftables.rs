//! The nftables text of a host's access rules: a table per mesh interface that lets a peer reach only
//! the services it was granted (and the mesh DNS), whatever it puts in its own AllowedIPs, and drops
//! everything else that arrives on the interface, including attempts to route through the host unless
//! it routes (hub, relay): then only flows from active nodes and devices' granted flows pass, and nothing
//! but replies reaches a device. The mesh's addresses answer only on the mesh interface (and loopback): a
//! LAN neighbour routing the mesh range to the host reaches nothing. Connections to the host's own
//! services and sync service are translated to the port meshd listens on ([`PRIVILEGED_PORT`]), which no
//! other user can bind.
//!
//! Rendered from the host plan (pure); the daemon's `host::firewall` loads it in one `nft -f -`
//! transaction, so a change replaces the whole table atomically, and puts it back if anything else removes
//! or changes it.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};

use crate::model::Protocol;
use crate::plan::dns::DNS_PORT;
use crate::plan::{Grant, HostPlan, PRIVILEGED_PORT};

/// The firewall mark of the datagrams a routing host sends to open the tunnels to its peers at start (devices'
/// too: a restarted hub reaches phones at once instead of after their own retry). It is the one new flow the
/// host's own processes may start towards a device; setting a mark takes `CAP_NET_ADMIN`, which other users lack.
pub const TUNNEL_OPENER_MARK: u32 = 0x6d65_7368;

/// The port those datagrams go to: the discard port, where nothing listens on mesh hosts or phones (the
/// handshake they cause is what counts).
pub const TUNNEL_OPENER_PORT: u16 = 9;

/// TCP connections to the mesh DNS one source address on the mesh may hold at once. The DNS server (hickory)
/// accepts TCP connections itself, outside meshd's descriptor budget, so the kernel caps them: a stub
/// resolver needs TCP only for a truncated answer, one connection at a time, and mesh answers are small.
pub const DNS_TCP_PER_SOURCE: u32 = 4;

/// TCP connections to the mesh DNS the host's own processes may hold at once, all together: they arrive over
/// loopback from any of its addresses (every one of 127.0.0.0/8 too), so counting them by source would let
/// one local user take the whole total.
pub const DNS_TCP_LOCAL: u32 = 8;

/// TCP connections to the mesh DNS (all its addresses together) at once: a quarter of the smallest
/// descriptor reserve meshd keeps for its own work (256), so a full DNS still leaves 192 for the admin
/// socket, the database, `nft` and the interface.
pub const DNS_TCP_TOTAL: u32 = 64;

/// The nftables table that belongs to interface `interface`.
pub fn table_name(interface: &str) -> String {
    let safe: String = interface.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect();
    format!("meshd_{safe}")
}

/// The largest TCP segments (MSS, bytes) that fit an interface MTU over IPv4 and IPv6: the MTU less the IP
/// header (20 or 40 bytes) and the TCP header (20).
pub fn mss(mtu: u16) -> (u16, u16) {
    (mtu.saturating_sub(40), mtu.saturating_sub(60))
}

/// The full ruleset (as an `nft -f` script that replaces the table) for `plan`.
pub fn render(plan: &HostPlan) -> String {
    let table = table_name(&plan.interface);
    let access = &plan.access;
    let (nodes_v4, nodes_v6): (Vec<&IpAddr>, Vec<&IpAddr>) = access.nodes.iter().partition(|ip| ip.is_ipv4());
    let (members_v4, members_v6): (Vec<&IpAddr>, Vec<&IpAddr>) = access.members.iter().partition(|ip| ip.is_ipv4());
    let (grants_v4, grants_v6): (Vec<&Grant>, Vec<&Grant>) = access.grants.iter().partition(|g| g.source.is_ipv4());
    // A grant to one of the host's own services is checked after the translation to its forwarder's port;
    // grants the host routes (hub, relay) keep the service's port.
    let local: BTreeSet<(SocketAddr, Protocol)> =
        plan.services.iter().flat_map(|s| s.listen.iter().map(|&addr| (addr, s.protocol))).collect();
    let grant = |g: &&Grant| {
        let port = if local.contains(&(g.service, g.protocol)) { PRIVILEGED_PORT } else { g.service.port() };
        format!("{} . {} . {} . {port}", g.source, g.service.ip(), g.protocol)
    };

    let mut out = String::new();
    // Creating then deleting makes the script work whether or not the table exists yet.
    let _ = writeln!(out, "table inet {table}\ndelete table inet {table}\ntable inet {table} {{");
    let (devices_v4, devices_v6): (Vec<&IpAddr>, Vec<&IpAddr>) = access.devices.iter().partition(|ip| ip.is_ipv4());
    let sets: [(&str, &str, Vec<String>); 8] = [
        ("nodes_v4", "ipv4_addr", nodes_v4.iter().map(ToString::to_string).collect()),
        ("nodes_v6", "ipv6_addr", nodes_v6.iter().map(ToString::to_string).collect()),
        ("members_v4", "ipv4_addr", members_v4.iter().map(ToString::to_string).collect()),
        ("members_v6", "ipv6_addr", members_v6.iter().map(ToString::to_string).collect()),
        ("devices_v4", "ipv4_addr", devices_v4.iter().map(ToString::to_string).collect()),
        ("devices_v6", "ipv6_addr", devices_v6.iter().map(ToString::to_string).collect()),
        ("grants_v4", "ipv4_addr . ipv4_addr . inet_proto . inet_service", grants_v4.iter().map(grant).collect()),
        ("grants_v6", "ipv6_addr . ipv6_addr . inet_proto . inet_service", grants_v6.iter().map(grant).collect()),
    ];
    for (set, ty, elements) in sets {
        let _ = writeln!(out, "  set {set} {{\n    type {ty}");
        if !elements.is_empty() {
            let _ = writeln!(out, "    elements = {{ {} }}", elements.join(", "));
        }
        let _ = writeln!(out, "  }}");
    }
    render_dns_tcp_caps(&mut out, &plan.dns.listen);
    // Admitted nodes reach this host freely; devices only their granted services (and the hub's DNS), each
    // over its own protocol: a TCP grant admits no UDP to the same port, and the other way round.
    let grants = "ip saddr . ip daddr . meta l4proto . th dport @grants_v4 accept\n    \
                  ip6 saddr . ip6 daddr . meta l4proto . th dport @grants_v6 accept";
    let admitted = format!("ip saddr @nodes_v4 accept\n    ip6 saddr @nodes_v6 accept\n    {grants}");
    // Routing hosts (hub, relay) pass flows between all nodes (receivers apply their own rules) and
    // devices' granted flows.
    let routed = format!("ip saddr @members_v4 accept\n    ip6 saddr @members_v6 accept\n    {grants}");
    let iface = &plan.interface;
    // The mesh's addresses are reached through the mesh interface, or from the host itself: a neighbour
    // routing the mesh range to this host reaches neither the host's mesh addresses nor, routed, its peers.
    // Dropped before connection tracking (priority raw), so a flood of them costs no state.
    let _ = writeln!(out, "  chain outside {{\n    type filter hook prerouting priority raw; policy accept;");
    for range in &access.mesh {
        let daddr = if range.addr().is_ipv4() { "ip daddr" } else { "ip6 daddr" };
        let _ = writeln!(out, "    iifname != {{ \"{iface}\", \"lo\" }} {daddr} {range} drop");
    }
    let _ = writeln!(out, "  }}");
    // Clients (through the tunnel, and the host's own processes) write to a service's (the sync service's)
    // address and port; meshd listens on the same address at PRIVILEGED_PORT. Only the first packet of a flow
    // passes these chains; conntrack translates the rest and the replies.
    let services = plan.services.iter().flat_map(|s| s.listen.iter().zip(s.bound()).map(|(&a, b)| (a, b, s.protocol)));
    let sync = plan.sync.iter().flat_map(|s| s.listen.iter().zip(s.bound()).map(|(&a, b)| (a, b, Protocol::Tcp)));
    let mut dnat = String::new();
    for (addr, bound, protocol) in services.chain(sync) {
        let (family, daddr, to) = match addr.ip() {
            IpAddr::V4(ip) => ("ip", "ip daddr", format!("{ip}:{}", bound.port())),
            IpAddr::V6(ip) => ("ip6", "ip6 daddr", format!("[{ip}]:{}", bound.port())),
        };
        let _ = writeln!(dnat, "    {daddr} {} {protocol} dport {} dnat {family} to {to}", addr.ip(), addr.port());
    }
    if !dnat.is_empty() {
        let _ = writeln!(out, "  chain services {{\n    type nat hook prerouting priority dstnat; policy accept;");
        let _ = writeln!(out, "{dnat}  }}");
        let _ = writeln!(out, "  chain services_local {{\n    type nat hook output priority -100; policy accept;");
        let _ = writeln!(out, "{dnat}  }}");
    }
    let _ = writeln!(out, "  chain input {{\n    type filter hook input priority filter; policy accept;");
    // Before anything is accepted: local users reach the mesh DNS over loopback.
    for listen in &plan.dns.listen {
        let daddr = if listen.is_ipv4() { "ip daddr" } else { "ip6 daddr" };
        let _ = writeln!(out, "    {daddr} {} tcp dport {} ct state new jump dns_tcp", listen.ip(), listen.port());
    }
    let _ = writeln!(out, "    iifname != \"{iface}\" accept");
    let _ = writeln!(out, "    ct state established,related accept");
    for listen in &plan.dns.listen {
        for client in &plan.dns.clients {
            let (saddr, daddr) = match (client, listen.ip()) {
                (ipnet::IpNet::V4(_), IpAddr::V4(_)) => ("ip saddr", "ip daddr"),
                (ipnet::IpNet::V6(_), IpAddr::V6(_)) => ("ip6 saddr", "ip6 daddr"),
                _ => continue,
            };
            let _ = writeln!(
                out,
                "    {saddr} {client} {daddr} {} meta l4proto {{ tcp, udp }} th dport {DNS_PORT} accept",
                listen.ip()
            );
        }
    }
    if let Some(sync) = &plan.sync {
        // Every node reaches the sync service, whatever access rules say about the hub itself, but only from a
        // port below 1024 as meshd binds: what an unprivileged user on a member sends never reaches the hub's
        // accept queue. (Checked after the translation to the port meshd listens on.)
        for listen in sync.bound() {
            let (saddr, daddr, set) =
                if listen.is_ipv4() { ("ip", "ip", "members_v4") } else { ("ip6", "ip6", "members_v6") };
            let (ip, port) = (listen.ip(), listen.port());
            let _ =
                writeln!(out, "    {saddr} saddr @{set} {daddr} daddr {ip} tcp dport {port} tcp sport < 1024 accept");
            let _ = writeln!(out, "    {daddr} daddr {ip} tcp dport {port} counter drop");
        }
    }
    let _ = writeln!(out, "    {admitted}\n    counter drop\n  }}");
    let _ = writeln!(out, "  chain forward {{\n    type filter hook forward priority filter; policy accept;");
    if access.routes {
        // What a routing host forwards leaves by its own interface, whose MTU may be smaller than what the two
        // ends use (a member with a larger MTU of its own, a device with an old config). ICMP "fragmentation
        // needed" is often eaten on the way, so path MTU discovery cannot be relied on: the SYNs it forwards
        // announce at most the MSS its MTU carries (less 40 bytes of IPv4 and TCP headers, 60 for IPv6).
        let (mss_v4, mss_v6) = mss(plan.mtu);
        for (family, mss) in [("ipv4", mss_v4), ("ipv6", mss_v6)] {
            let _ = writeln!(
                out,
                "    iifname \"{iface}\" oifname \"{iface}\" meta nfproto {family} tcp flags & (syn | rst) == syn \
                 tcp option maxseg size > {mss} tcp option maxseg size set {mss}"
            );
        }
        // A routing host (hub, relay) routes between its peers.
        let _ = writeln!(out, "    iifname \"{iface}\" oifname \"{iface}\" jump mesh_routing");
    }
    let _ = writeln!(out, "    iifname \"{iface}\" counter drop\n  }}");
    if access.routes {
        // Devices start flows; nothing starts one towards a device (a member host, a local user on the
        // routing host, another device), since the stock WireGuard apps filter nothing themselves.
        let devices = "ip daddr @devices_v4 drop\n    ip6 daddr @devices_v6 drop";
        let _ = writeln!(
            out,
            "  chain mesh_routing {{\n    ct state established,related accept\n    {devices}\n    {routed}\n  }}"
        );
        let _ = writeln!(
            out,
            "  chain output {{\n    type filter hook output priority filter; policy accept;\n    \
             oifname != \"{iface}\" accept\n    ct state established,related accept\n    \
             meta mark {TUNNEL_OPENER_MARK:#x} udp dport {TUNNEL_OPENER_PORT} accept\n    {devices}\n  }}"
        );
    }
    let _ = writeln!(out, "}}");
    out
}

/// The caps on TCP connections to the mesh DNS: [`DNS_TCP_LOCAL`] for the host's own processes together,
/// [`DNS_TCP_PER_SOURCE`] per source address on the mesh (a set that counts each source's connections) and
/// [`DNS_TCP_TOTAL`] in all; a connection over a cap is reset at once.
fn render_dns_tcp_caps(out: &mut String, listen: &[std::net::SocketAddr]) {
    if listen.is_empty() {
        return;
    }
    for (set, ty) in [("dns_tcp_v4", "ipv4_addr"), ("dns_tcp_v6", "ipv6_addr")] {
        let _ = writeln!(out, "  set {set} {{\n    type {ty}\n    size 65535\n    flags dynamic\n  }}");
    }
    let _ = writeln!(
        out,
        "  chain dns_tcp {{\n    \
         iifname \"lo\" meta l4proto tcp ct count over {DNS_TCP_LOCAL} reject with tcp reset\n    \
         iifname != \"lo\" meta l4proto tcp add @dns_tcp_v4 {{ ip saddr ct count over {DNS_TCP_PER_SOURCE} }} reject with tcp reset\n    \
         iifname != \"lo\" meta l4proto tcp add @dns_tcp_v6 {{ ip6 saddr ct count over {DNS_TCP_PER_SOURCE} }} reject with tcp reset\n    \
         meta l4proto tcp ct count over {DNS_TCP_TOTAL} reject with tcp reset\n  }}"
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{sample_host_plan, with_udp_echo};
    use crate::plan::Grant;

    #[test]
    fn grants_are_exact_source_destination_port_triples() {
        let rules = render(&sample_host_plan(&["10.77.0.4", "fd00::4"], true));
        assert!(rules.contains("table inet meshd_wg_home_1 {"), "{rules}");
        assert!(rules.contains("elements = { 10.77.0.4 . 10.77.0.2 . tcp . 1021 }"), "{rules}");
        assert!(rules.contains("elements = { fd00::4 . fd00::2 . tcp . 1021 }"), "{rules}");
        assert!(
            rules.contains("ip saddr 10.77.0.0/16 ip daddr 10.77.0.1 meta l4proto { tcp, udp } th dport 53 accept")
        );
        assert!(rules.contains("ip6 saddr fd00::/64 ip6 daddr fd00::1 meta l4proto { tcp, udp } th dport 53 accept"));
        assert!(rules.contains("iifname \"wg-home.1\" counter drop"));
        let drop_at = rules.find("counter drop\n  }").unwrap();
        assert!(rules.find("@grants_v4 accept").unwrap() < drop_at, "grants must come before the final drop");
        assert!(rules.contains("elements = { 10.77.0.1, 10.77.0.5 }"), "nodes reach each other: {rules}");
        assert!(rules.contains("iifname \"wg-home.1\" oifname \"wg-home.1\" jump mesh_routing"), "{rules}");
        let sync = "ip saddr @members_v4 ip daddr 10.77.0.1 tcp dport 1021 tcp sport < 1024 accept\n    \
                    ip daddr 10.77.0.1 tcp dport 1021 counter drop\n    ip saddr @nodes_v4 accept";
        assert!(
            rules.contains(sync),
            "only privileged source ports reach the sync service, before nodes pass: {rules}"
        );
        let routing = &rules[rules.find("chain mesh_routing").unwrap()..];
        assert!(routing.contains("ip saddr @members_v4 accept"), "the hub routes between all nodes: {rules}");
        assert!(rules.contains("elements = { 10.77.0.1, 10.77.0.5, 10.77.0.6 }"), "{rules}");
    }

    /// A UDP service: the same exact triples, with udp as the protocol, matched on the transport port.
    #[test]
    fn udp_grants_admit_udp_to_the_service_port_only() {
        let rules = render(&with_udp_echo(sample_host_plan(&["10.77.0.4", "fd00::4"], false)));
        assert!(
            rules.contains("elements = { 10.77.0.4 . 10.77.0.2 . tcp . 1021, 10.77.0.4 . 10.77.0.3 . udp . 1021 }"),
            "{rules}"
        );
        assert!(rules.contains("type ipv4_addr . ipv4_addr . inet_proto . inet_service"), "{rules}");
        assert!(rules.contains("ip saddr . ip daddr . meta l4proto . th dport @grants_v4 accept"), "{rules}");
        assert!(rules.contains("ip6 saddr . ip6 daddr . meta l4proto . th dport @grants_v6 accept"), "{rules}");
        assert!(!rules.contains("tcp dport @grants"), "grants must not be TCP-only: {rules}");
        let routed = render(&with_udp_echo(sample_host_plan(&["10.77.0.4"], true)));
        let routing = &routed[routed.find("chain mesh_routing").unwrap()..];
        assert!(routing.contains("meta l4proto . th dport @grants_v4 accept"), "the hub routes UDP grants: {routed}");
    }

    /// Issue 11 (another user's listener on `0.0.0.0:PORT` took a service's clients): what clients write to
    /// a local service's (the hub's sync service's) address and port goes to meshd's privileged port, for
    /// flows through the tunnel and from the host itself; grants and the sync rule are checked on the
    /// translated port. A grant the host only routes keeps the service's own port, and a host with nothing
    /// to translate has no nat chains at all.
    #[test]
    fn a_local_service_port_is_translated_to_its_forwarder_and_checked_there() {
        let mut plan = with_udp_echo(sample_host_plan(&["10.77.0.4", "fd00::4"], true));
        let routed: std::net::SocketAddr = "10.77.0.9:5052".parse().unwrap();
        let source = "10.77.0.4".parse().unwrap();
        plan.access.grants.insert(Grant { source, service: routed, protocol: crate::model::Protocol::Tcp });
        let rules = render(&plan);
        for chain in [
            "chain services {\n    type nat hook prerouting priority dstnat; policy accept;\n",
            "chain services_local {\n    type nat hook output priority -100; policy accept;\n",
        ] {
            let at = rules.find(chain).unwrap_or_else(|| panic!("no {chain} in {rules}"));
            let body = &rules[at..at + rules[at..].find("  }").unwrap()];
            for rule in [
                "ip daddr 10.77.0.2 tcp dport 9737 dnat ip to 10.77.0.2:1021",
                "ip6 daddr fd00::2 tcp dport 9737 dnat ip6 to [fd00::2]:1021",
                "ip daddr 10.77.0.3 udp dport 7 dnat ip to 10.77.0.3:1021",
            ] {
                assert!(body.contains(rule), "{rule} missing from {chain}: {rules}");
            }
            assert!(!body.contains("10.77.0.9"), "a routed service is not translated: {rules}");
            assert!(body.contains("ip daddr 10.77.0.1 tcp dport 51871 dnat ip to 10.77.0.1:1021"), "sync: {rules}");
        }
        assert!(
            rules.contains("10.77.0.4 . 10.77.0.2 . tcp . 1021, 10.77.0.4 . 10.77.0.3 . udp . 1021, 10.77.0.4 . 10.77.0.9 . tcp . 5052"),
            "{rules}"
        );
        plan.services.clear();
        plan.sync = None;
        assert!(!render(&plan).contains("type nat"), "nothing to translate, no nat hooks");
    }

    #[test]
    fn a_routing_host_clamps_the_mss_of_what_it_forwards_to_its_mtu() {
        let mut plan = sample_host_plan(&["10.77.0.4"], true);
        plan.mtu = 1340;
        let rules = render(&plan);
        let forward = &rules[rules.find("chain forward").unwrap()..rules.find("chain mesh_routing").unwrap()];
        assert!(
            forward.contains(
                "iifname \"wg-home.1\" oifname \"wg-home.1\" meta nfproto ipv4 tcp flags & (syn | rst) == syn \
                 tcp option maxseg size > 1300 tcp option maxseg size set 1300"
            ),
            "{rules}"
        );
        assert!(forward.contains("meta nfproto ipv6 tcp flags & (syn | rst) == syn tcp option maxseg size > 1280 tcp option maxseg size set 1280"), "{rules}");
        assert!(
            forward.find("maxseg").unwrap() < forward.find("jump mesh_routing").unwrap(),
            "clamped whatever is accepted"
        );
        assert_eq!(mss(1420), (1380, 1360));
        assert!(!render(&sample_host_plan(&["10.77.0.4"], false)).contains("maxseg"), "a member routes nothing");
    }

    /// Member hosts reach each other through the hub, never a device; the hub's own processes reach no
    /// device either. Only replies to what a device started go back to it.
    #[test]
    fn a_routing_host_passes_nothing_towards_devices_but_replies() {
        let rules = render(&sample_host_plan(&["10.77.0.4"], true));
        assert!(
            rules.contains("set devices_v4 {\n    type ipv4_addr\n    elements = { 10.77.0.4, 10.77.0.7 }"),
            "{rules}"
        );
        let routing = &rules[rules.find("chain mesh_routing").unwrap()..rules.find("chain output").unwrap()];
        let replies = routing.find("ct state established,related accept").unwrap();
        let to_devices = routing.find("ip daddr @devices_v4 drop").unwrap();
        assert!(routing.contains("ip6 daddr @devices_v6 drop"), "{rules}");
        assert!(replies < to_devices, "replies pass first: {rules}");
        assert!(to_devices < routing.find("ip saddr @members_v4 accept").unwrap(), "before members pass: {rules}");
        let output = &rules[rules.find("chain output").unwrap()..];
        assert!(output.contains("type filter hook output priority filter; policy accept;"), "{rules}");
        assert!(output.contains("oifname != \"wg-home.1\" accept"), "{rules}");
        let opener = output.find("meta mark 0x6d657368 udp dport 9 accept").expect("the tunnel opener passes");
        assert!(opener < output.find("@devices_v4 drop").unwrap(), "{rules}");
        assert!(
            output.find("ct state established,related accept").unwrap() < output.find("@devices_v4 drop").unwrap(),
            "{rules}"
        );
        let member = render(&sample_host_plan(&["10.77.0.4"], false));
        assert!(
            !member.contains("chain output") && !member.contains("elements = { 10.77.0.4, 10.77.0.7 }"),
            "{member}"
        );
    }

    /// A neighbour on the LAN that routes the mesh range to the host reaches none of it: the mesh's
    /// addresses are dropped unless they arrive on the mesh interface or loopback, on every host.
    #[test]
    fn mesh_addresses_answer_only_on_the_mesh_interface_and_loopback() {
        for routes in [false, true] {
            let rules = render(&sample_host_plan(&[], routes));
            let outside = &rules[rules.find("chain outside").unwrap()..rules.find("chain input").unwrap()];
            assert!(outside.contains("type filter hook prerouting priority raw; policy accept;"), "{rules}");
            assert!(outside.contains("iifname != { \"wg-home.1\", \"lo\" } ip daddr 10.77.0.0/16 drop"), "{rules}");
            assert!(outside.contains("iifname != { \"wg-home.1\", \"lo\" } ip6 daddr fd00::/64 drop"), "{rules}");
        }
    }

    /// The DNS server accepts TCP connections outside meshd's descriptor budget: the kernel caps them per
    /// source and in total, for every source (a local user arrives over loopback, so the caps come before
    /// the rule that accepts everything not on the mesh interface).
    #[test]
    fn tcp_to_the_mesh_dns_is_capped_per_source_and_in_total_before_anything_is_accepted() {
        let rules = render(&sample_host_plan(&["10.77.0.4"], true));
        let input = &rules[rules.find("chain input").unwrap()..];
        let jump_v4 = input.find("ip daddr 10.77.0.1 tcp dport 53 ct state new jump dns_tcp").expect("v4 jump");
        let jump_v6 = input.find("ip6 daddr fd00::1 tcp dport 53 ct state new jump dns_tcp").expect("v6 jump");
        let first_accept = input.find("iifname != \"wg-home.1\" accept").unwrap();
        assert!(jump_v4 < first_accept && jump_v6 < first_accept, "{rules}");
        let caps = &rules[rules.find("chain dns_tcp").unwrap()..];
        // The host's own processes count as one, whichever loopback address they write from.
        assert!(caps.contains("iifname \"lo\" meta l4proto tcp ct count over 8 reject with tcp reset"), "{rules}");
        let v4 =
            "iifname != \"lo\" meta l4proto tcp add @dns_tcp_v4 { ip saddr ct count over 4 } reject with tcp reset";
        let v6 =
            "iifname != \"lo\" meta l4proto tcp add @dns_tcp_v6 { ip6 saddr ct count over 4 } reject with tcp reset";
        assert!(caps.contains(v4) && caps.contains(v6), "{rules}");
        assert!(caps.contains("meta l4proto tcp ct count over 64 reject with tcp reset"), "{rules}");
        assert!(rules.contains("set dns_tcp_v4 {\n    type ipv4_addr\n    size 65535\n    flags dynamic"), "{rules}");
    }

    #[test]
    fn only_the_hub_routes_between_peers() {
        let rules = render(&sample_host_plan(&["10.77.0.4"], false));
        assert!(!rules.contains("mesh_routing") && !rules.contains("51871"), "{rules}");
        assert!(!rules.contains("ip saddr 10.77.0.0/16 accept"), "a member admits exact sources only: {rules}");
        assert!(rules.contains("iifname \"wg-home.1\" counter drop"));
    }

    #[test]
    fn no_grant_means_empty_sets_and_default_deny() {
        let mut empty = sample_host_plan(&[], false);
        empty.access.nodes.clear();

        let rules = render(&empty);
        assert!(!rules.contains("elements"), "{rules}");
        assert!(rules.contains("counter drop"));
    }
}
