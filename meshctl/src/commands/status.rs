//! `meshctl status`: the network, its nodes, devices and services.

use meshd_core::wire::admin::{Reply, Request};

use super::{Context, unexpected};
use crate::print::{print_devices, print_nodes, print_services};

pub fn status(cx: &Context) -> anyhow::Result<()> {
    match cx.admin.send(Request::Status)? {
        Reply::Status(s) => cx.print(&s, || {
            println!(
                "network {} ({}, {}), domain {}, MTU {}",
                s.network.name, s.network.cidr, s.network.cidr_v6, s.network.domain, s.network.mtu
            );
            print_nodes(&s.nodes);
            print_devices(&s.devices);
            print_services(&s.services);
        }),
        other => unexpected(other),
    }
}
