//! `meshctl status`: the network, its nodes, devices and services; `meshctl network update`: the
//! network's own settings.

use meshd_core::input::Label;
use meshd_core::wire::admin::{NetworkUpdated, Reply, Request};

use super::{Context, unexpected};
use crate::print::{print_devices, print_nodes, print_services};

pub fn status(cx: &Context) -> anyhow::Result<()> {
    match cx.admin.send(Request::Status)? {
        Reply::Status(s) => cx.print(&s, || {
            println!(
                "network {} ({}, {}), domain {}, MTU {}",
                s.network.name, s.network.cidr, s.network.cidr_v6, s.network.domain, s.network.mtu
            );
            let offline = cx.admin.answered_offline();
            print_nodes(&s.nodes, offline);
            print_devices(&s.devices, offline);
            print_services(&s.services);
        }),
        other => unexpected(other),
    }
}

/// `meshctl network update --mtu N`: the network's MTU, which every host without its own and every
/// device's config takes.
pub fn update_network(cx: &Context, mtu: u16) -> anyhow::Result<()> {
    match cx.admin.send(Request::NetworkUpdate { mtu })? {
        Reply::NetworkUpdated(updated) => {
            warn_stale_mtu(&updated);
            cx.print(&updated, || println!("network {}: mtu {}", updated.network.name, updated.network.mtu))
        }
        other => unexpected(other),
    }
}

/// Name on standard error the devices whose config has the network's old MTU, and how to fix them.
pub fn warn_stale_mtu(updated: &NetworkUpdated) {
    if updated.devices_with_old_mtu.is_empty() {
        return;
    }
    let names = updated.devices_with_old_mtu.iter().map(Label::as_str).collect::<Vec<_>>().join(", ");
    eprintln!(
        "warning: the config of these devices has the network's old MTU: {names}; give each a new config \
         (meshctl device rotate NAME --qr) or set MTU = {} in its WireGuard app",
        updated.network.mtu
    );
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use crate::Cli;
    use crate::testing::{meshctl, network, snapshot};

    #[test]
    fn network_update_sets_the_mtu_hosts_without_their_own_take() {
        let dir = network(&["vps"]);
        meshctl(&dir, &["node", "update", "vps", "--mtu", "1400"]).unwrap();
        meshctl(&dir, &["network", "update", "--mtu", "1340"]).unwrap();
        let s = snapshot(&dir);
        assert_eq!(s.network.mtu, 1340);
        let mtus: Vec<u16> = s.nodes.iter().map(|n| n.mtu_in(&s.network)).collect();
        assert_eq!(mtus, [1340, 1400], "the hub takes the network's; vps keeps its own");
        for bad in ["1279", "9001", "x"] {
            let args = ["meshctl", "--state-dir", "/nonexistent", "network", "update", "--mtu", bad];
            assert!(Cli::try_parse_from(args).is_err(), "--mtu {bad} accepted");
        }
        assert_eq!(snapshot(&dir).network.mtu, 1340);
    }
}
