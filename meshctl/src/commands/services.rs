//! `meshctl service`: services of the nodes, exposed to the mesh on their own addresses.

use meshd_core::input::{HostPort, Label, PublicName};
use meshd_core::model::Protocol;
use meshd_core::relay::route::TlsMode;
use meshd_core::wire::admin::{Reply, Request};

use super::onion::onion_url;
use super::{Context, removed, unexpected};
use crate::print::print_services;

/// List the services; with `qr`, each onion service's URL as a QR code after the table.
pub fn list(cx: &Context, qr: bool) -> anyhow::Result<()> {
    let services = match cx.admin.send(Request::ServiceList)? {
        Reply::Services(services) => services,
        other => return unexpected(other),
    };
    cx.print(&services, || print_services(&services))?;
    if qr {
        for s in &services {
            let Some((address, port)) = s.tor.as_ref().and_then(|t| t.address.as_ref().map(|a| (a, t.port))) else {
                continue;
            };
            let url = onion_url(address, port);
            println!("\n{} ({url}):", s.name);
            print!("{}", meshd_core::handout::qr_terminal(&url)?);
        }
    }
    Ok(())
}

pub fn add(
    cx: &Context,
    name: Label,
    node: Label,
    target: HostPort,
    port: Option<u16>,
    protocol: Protocol,
) -> anyhow::Result<()> {
    show(cx, cx.admin.send(Request::ServiceAdd { name, node, target, port, protocol })?)
}

/// Point a service elsewhere; `protocol` `None` keeps its protocol.
pub fn update(
    cx: &Context,
    name: Label,
    target: HostPort,
    port: Option<u16>,
    protocol: Option<Protocol>,
) -> anyhow::Result<()> {
    show(cx, cx.admin.send(Request::ServiceUpdate { name, target, port, protocol })?)
}

pub fn remove(cx: &Context, name: Label) -> anyhow::Result<()> {
    removed(cx, Request::ServiceRemove { name: name.clone() }, "service", &name)
}

/// Serve `service` on `hostname` through `relay`, TLS ending where `tls` says.
pub fn expose(cx: &Context, service: Label, hostname: PublicName, relay: Label, tls: TlsMode) -> anyhow::Result<()> {
    match cx.admin.send(Request::Expose { service, hostname: hostname.clone(), relay, tls })? {
        Reply::Service(s) => cx.print(&s, || {
            let held = if tls == TlsMode::Terminate { "the relay" } else { "the service's node" };
            println!("service {} on https://{hostname}/ (TLS {tls}; {held} orders the certificate)", s.name);
        }),
        other => unexpected(other),
    }
}

/// Stop serving `service` on `hostname`.
pub fn unexpose(cx: &Context, service: Label, hostname: PublicName) -> anyhow::Result<()> {
    match cx.admin.send(Request::Unexpose { service, hostname: hostname.clone() })? {
        Reply::Service(s) => cx.print(&s, || println!("service {} no longer served on https://{hostname}/", s.name)),
        other => unexpected(other),
    }
}

/// The service a change made, as one line (or its record with `--json`).
fn show(cx: &Context, reply: Reply) -> anyhow::Result<()> {
    match reply {
        Reply::Service(s) => cx.print(&s, || {
            // TCP, the default, is not named: the line stays as it was before UDP services.
            let udp = if s.protocol == Protocol::Udp { ", udp" } else { "" };
            println!("service {} on {}: {} ({}) -> {}{udp}", s.name, s.node, s.mesh_address, s.dns_name, s.target)
        }),
        other => unexpected(other),
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;
    use meshd_core::model::ServiceView;

    use super::*;
    use crate::Cli;
    use crate::print::services_table;
    use crate::testing::{TempDir, meshctl, network, snapshot};

    #[test]
    fn udp_services_are_added_listed_and_keep_their_protocol_on_update() {
        let dir = network(&[]);
        meshctl(&dir, &["service", "add", "echo", "--node", "hub", "--target", "127.0.0.1:7", "--udp"]).unwrap();
        meshctl(&dir, &["service", "add", "web", "--node", "hub", "--target", "127.0.0.1:80"]).unwrap();
        let protocols = |dir: &TempDir| -> Vec<(String, Protocol)> {
            snapshot(dir).services.iter().map(|v| (v.name.to_string(), v.protocol)).collect()
        };
        assert_eq!(protocols(&dir), [("echo".into(), Protocol::Udp), ("web".into(), Protocol::Tcp)]);

        meshctl(&dir, &["service", "update", "echo", "--target", "127.0.0.1:7007"]).unwrap();
        assert_eq!(protocols(&dir)[0], ("echo".into(), Protocol::Udp), "an update keeps the protocol");
        meshctl(&dir, &["service", "update", "web", "--target", "127.0.0.1:53", "--udp"]).unwrap();
        assert_eq!(protocols(&dir)[1], ("web".into(), Protocol::Udp));
        meshctl(&dir, &["service", "update", "web", "--target", "127.0.0.1:53", "--tcp"]).unwrap();
        assert_eq!(protocols(&dir)[1], ("web".into(), Protocol::Tcp));
        let both = ["meshctl", "service", "update", "web", "--target", "127.0.0.1:53", "--udp", "--tcp"];
        assert!(Cli::try_parse_from(both).is_err(), "--udp and --tcp exclude each other");

        let s = snapshot(&dir);
        let views: Vec<ServiceView> = s.services.iter().map(|v| s.service_view(v)).collect();
        let table = services_table(&views);
        let last_column: Vec<&str> = table.lines().map(|l| l.split_whitespace().last().unwrap()).collect();
        assert_eq!(last_column, ["PROTOCOL", "udp", "tcp"], "{table}");
        let json = serde_json::to_value(&views).unwrap();
        assert_eq!((json[0]["protocol"].as_str(), json[1]["protocol"].as_str()), (Some("udp"), Some("tcp")));
    }

    #[test]
    fn exposed_names_are_listed_with_their_certificate_and_bad_input_changes_nothing() {
        use meshd_core::acme::renewal::Status;
        use meshd_core::model::CertificateReport;

        let dir = network(&["home"]);
        meshctl(&dir, &["service", "add", "btcpay", "--node", "home", "--target", "127.0.0.1:23000"]).unwrap();
        let expose = ["expose", "btcpay", "--https", "pay.shop.example", "--relay", "hub", "--tls", "passthrough"];
        meshctl(&dir, &expose).unwrap();
        for bad in [
            &["expose", "btcpay", "--https", "10.0.0.1", "--relay", "hub"][..],
            &["expose", "btcpay", "--https", "x.example", "--relay", "hub", "--tls", "split"],
            &["expose", "btcpay", "--https", "x.example", "--relay", "home"],
            &["expose", "btcpay", "--https", "pay.shop.example", "--relay", "hub"],
        ] {
            let parsed = Cli::try_parse_from(std::iter::once("meshctl").chain(bad.iter().copied()));
            if parsed.is_ok() {
                assert!(meshctl(&dir, bad).is_err(), "{bad:?} was accepted");
            }
        }
        let s = snapshot(&dir);
        assert_eq!(s.exposures.len(), 1, "a refused expose changes nothing");

        let mut views: Vec<ServiceView> = s.services.iter().map(|v| s.service_view(v)).collect();
        let table = services_table(&views);
        assert!(table.contains("https://pay.shop.example/"), "{table}");
        assert!(table.contains("not reported (held by home)"), "passthrough: the node holds it\n{table}");
        views[0].https[0].certificate = Some(CertificateReport {
            holder: "home".parse().unwrap(),
            status: Status::Valid {
                until: 1_800_000_000,
                last_error: Some("http-01: timeout\u{1b}[2J".into()),
                retry_at: Some(1_790_000_000),
            },
        });
        let table = services_table(&views);
        assert!(
            table.contains(
                "valid until 2027-01-15T08:00:00Z (last error: http-01: timeout?[2J; next try 2026-09-21T14:13:20Z)"
            ),
            "{table}"
        );

        meshctl(&dir, &["unexpose", "btcpay", "--https", "pay.shop.example"]).unwrap();
        assert!(snapshot(&dir).exposures.is_empty());
        assert!(meshctl(&dir, &["unexpose", "btcpay", "--https", "pay.shop.example"]).is_err(), "not served any more");
    }
}
