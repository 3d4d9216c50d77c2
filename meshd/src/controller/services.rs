//! Services: a TCP or UDP target on a node, reached at its own mesh address and name, and served on public
//! names (HTTPS through a relay) or as an onion service (Tor) where the operator chose.

use std::collections::BTreeSet;

use meshd_core::input::{HostPort, Label, PublicName};
use meshd_core::model::{Exposure, OnionClient, Protocol, Role, Service};
use meshd_core::relay::route::TlsMode;
use meshd_core::tor::client::MAX_CLIENTS;
use meshd_core::wire::admin::Reply;

use super::ControlError;
use super::checks::{allocate, ensure_name_free, member};
use super::store::Writer;

/// Add service `name` on `node` forwarding to `target`; its mesh port is `port`, else the target's.
pub(super) fn add(
    w: &Writer<'_>,
    name: Label,
    node: Label,
    target: HostPort,
    port: Option<u16>,
    protocol: Protocol,
) -> Result<Reply, ControlError> {
    {
        let s = w.snapshot()?;
        ensure_name_free(w, &s, &name)?;
        member(&s, &node)?;
        let index = allocate(w, &s.network)?;
        let service = Service { name, node, port: port.unwrap_or(target.port()), target, index, protocol };
        w.insert_service(&service)?;
        // No device is granted a service that did not exist: the snapshot read above is enough.
        Ok(Reply::Service(s.service_view(&service)))
    }
}

/// Point service `name` elsewhere in place: it keeps its addresses and grants; its protocol unless one is named.
pub(super) fn update(
    w: &Writer<'_>,
    name: Label,
    target: HostPort,
    port: Option<u16>,
    protocol: Option<Protocol>,
) -> Result<Reply, ControlError> {
    let s = w.snapshot()?;
    let mut service = s.services.iter().find(|v| v.name == name).cloned().ok_or(ControlError::UnknownService(name))?;
    service.port = port.unwrap_or(target.port());
    service.target = target;
    service.protocol = protocol.unwrap_or(service.protocol);
    if service.protocol != Protocol::Tcp && s.exposures.iter().any(|e| e.service == service.name) {
        return Err(ControlError::ExposedStaysTcp(service.name));
    }
    if service.protocol != Protocol::Tcp && s.onions.iter().any(|o| o.service == service.name) {
        return Err(ControlError::OnionStaysTcp(service.name));
    }
    w.update_service(&service)?;
    Ok(Reply::Service(s.service_view(&service)))
}

/// Remove service `name` (its address cools down before reuse, its grants go with it).
pub(super) fn remove(w: &Writer<'_>, name: Label) -> Result<Reply, ControlError> {
    match w.delete_service(&name)? {
        true => Ok(Reply::Removed),
        false => Err(ControlError::UnknownService(name)),
    }
}

/// Serve service `service` (TCP, speaking HTTP) on `hostname` over HTTPS through `relay` (the hub or a node of
/// role relay, with an endpoint), TLS ending where `tls` says.
pub(super) fn expose(
    w: &Writer<'_>,
    service: Label,
    hostname: PublicName,
    relay: Label,
    tls: TlsMode,
) -> Result<Reply, ControlError> {
    let mut s = w.snapshot()?;
    let found = s.services.iter().find(|v| v.name == service).ok_or(ControlError::UnknownService(service.clone()))?;
    if found.protocol != Protocol::Tcp {
        return Err(ControlError::NotHttp(service));
    }
    let node = member(&s, &relay)?;
    if !matches!(node.role, Role::Hub | Role::Relay) {
        return Err(ControlError::NotRelay(relay));
    }
    if node.endpoint.is_none() {
        return Err(ControlError::RelayWithoutEndpoint(relay));
    }
    let domain = &s.network.domain;
    if hostname.is_within(domain) {
        return Err(ControlError::PublicNameInMesh { hostname, domain: domain.clone() });
    }
    if let Some(taken) = s.exposures.iter().find(|e| e.hostname == hostname) {
        return Err(ControlError::PublicNameTaken { hostname, service: taken.service.clone() });
    }
    let exposure = Exposure { hostname, service: service.clone(), relay, tls };
    w.insert_exposure(&exposure)?;
    s.exposures.push(exposure);
    let found = s.services.iter().find(|v| v.name == service).ok_or(ControlError::UnknownService(service))?;
    Ok(Reply::Service(s.service_view(found)))
}

/// Stop serving service `service` on `hostname`.
pub(super) fn unexpose(w: &Writer<'_>, service: Label, hostname: PublicName) -> Result<Reply, ControlError> {
    if !w.snapshot()?.services.iter().any(|v| v.name == service) {
        return Err(ControlError::UnknownService(service));
    }
    if !w.delete_exposure(&service, &hostname)? {
        return Err(ControlError::NotExposed { service, hostname });
    }
    let s = w.snapshot()?;
    let found = s.services.iter().find(|v| v.name == service).ok_or(ControlError::UnknownService(service))?;
    Ok(Reply::Service(s.service_view(found)))
}

/// Serve TCP service `service` as an onion service from its node at `port` (the one it has, else the service's
/// mesh port), authorizing `clients` (devices, each once, within tor's [`MAX_CLIENTS`]).
pub(super) fn expose_tor(
    w: &Writer<'_>,
    service: Label,
    port: Option<u16>,
    clients: Vec<OnionClient>,
) -> Result<Reply, ControlError> {
    let s = w.snapshot()?;
    let found = s.services.iter().find(|v| v.name == service).ok_or(ControlError::UnknownService(service.clone()))?;
    if found.protocol != Protocol::Tcp {
        return Err(ControlError::NotTcpForTor(service));
    }
    let existing = s.onions.iter().find(|o| o.service == service);
    let mut named = BTreeSet::new();
    for client in &clients {
        if !s.devices.iter().any(|d| d.name == client.device) {
            return Err(ControlError::UnknownDevice(client.device.clone()));
        }
        if !named.insert(&client.device) {
            return Err(ControlError::DeviceTwice(client.device.clone()));
        }
        if existing.is_some_and(|o| o.clients.iter().any(|c| c.device == client.device)) {
            return Err(ControlError::OnionClientTaken { service, device: client.device.clone() });
        }
    }
    let count = existing.map_or(0, |o| o.clients.len()) + clients.len();
    if count > MAX_CLIENTS {
        return Err(ControlError::TooManyOnionClients { service, count, max: MAX_CLIENTS });
    }
    let port = port.or(existing.map(|o| o.port)).unwrap_or(found.port);
    let authorized_only = existing.is_some_and(|o| o.authorized_only) || !clients.is_empty();
    w.upsert_onion(&service, port, authorized_only)?;
    for client in &clients {
        w.insert_onion_client(&service, client)?;
    }
    view_of(w, service)
}

/// Stop serving `service` as an onion service, or take `clients` off its clients.
pub(super) fn unexpose_tor(w: &Writer<'_>, service: Label, clients: Vec<Label>) -> Result<Reply, ControlError> {
    if !w.snapshot()?.services.iter().any(|v| v.name == service) {
        return Err(ControlError::UnknownService(service));
    }
    if clients.is_empty() {
        if !w.delete_onion(&service)? {
            return Err(ControlError::NotOnion(service));
        }
        return view_of(w, service);
    }
    let s = w.snapshot()?;
    if !s.onions.iter().any(|o| o.service == service) {
        return Err(ControlError::NotOnion(service));
    }
    let mut named = BTreeSet::new();
    for device in &clients {
        if !s.devices.iter().any(|d| &d.name == device) {
            return Err(ControlError::UnknownDevice(device.clone()));
        }
        if !named.insert(device) {
            return Err(ControlError::DeviceTwice(device.clone()));
        }
    }
    for device in clients {
        if !w.delete_onion_client(&service, &device)? {
            return Err(ControlError::NotOnionClient { service, device });
        }
    }
    view_of(w, service)
}

/// The view of service `name` as stored now.
fn view_of(w: &Writer<'_>, name: Label) -> Result<Reply, ControlError> {
    let s = w.snapshot()?;
    let found = s.services.iter().find(|v| v.name == name).ok_or(ControlError::UnknownService(name))?;
    Ok(Reply::Service(s.service_view(found)))
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::{label, new_network};
    use super::*;
    use meshd_core::wire::admin::Request;

    #[test]
    fn a_udp_service_keeps_its_protocol_unless_an_update_names_one() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = new_network(dir.path(), "10.77.0.0/16");
        let add = Request::ServiceAdd {
            name: label("echo"),
            node: label("hub"),
            target: "127.0.0.1:7".parse().unwrap(),
            port: None,
            protocol: Protocol::Udp,
        };
        let Reply::Service(echo) = c.handle(add).unwrap() else { panic!() };
        assert_eq!((echo.protocol, echo.mesh_address.as_str()), (Protocol::Udp, "10.77.0.2:7"));
        let update = |protocol| Request::ServiceUpdate {
            name: label("echo"),
            target: "127.0.0.1:7007".parse().unwrap(),
            port: None,
            protocol,
        };
        let Reply::Service(echo) = c.handle(update(None)).unwrap() else { panic!() };
        assert_eq!((echo.protocol, echo.target.as_str()), (Protocol::Udp, "127.0.0.1:7007"));
        let Reply::Service(echo) = c.handle(update(Some(Protocol::Tcp))).unwrap() else { panic!() };
        assert_eq!(echo.protocol, Protocol::Tcp);
        assert_eq!(echo.mesh_address, "10.77.0.2:7007", "an update keeps the service's address");
        // A request from a meshctl that knows no protocol field means TCP.
        let old: Request = serde_json::from_str(
            r#"{"op":"service_add","name":"web","node":"hub","target":"127.0.0.1:80","port":null}"#,
        )
        .unwrap();
        assert!(matches!(old, Request::ServiceAdd { protocol: Protocol::Tcp, .. }));
    }

    #[test]
    fn a_public_name_goes_to_one_tcp_service_through_a_relay_with_an_endpoint_outside_the_mesh_domain() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = new_network(dir.path(), "10.77.0.0/16");
        let add = |name: &str, protocol| Request::ServiceAdd {
            name: label(name),
            node: label("hub"),
            target: "127.0.0.1:23000".parse().unwrap(),
            port: None,
            protocol,
        };
        c.handle(add("btcpay", Protocol::Tcp)).unwrap();
        c.handle(add("dns", Protocol::Udp)).unwrap();
        let expose = |service: &str, hostname: &str, relay: &str| Request::Expose {
            service: label(service),
            hostname: hostname.parse().unwrap(),
            relay: label(relay),
            tls: TlsMode::Terminate,
        };
        let Reply::Service(view) = c.handle(expose("btcpay", "pay.shop.example", "hub")).unwrap() else { panic!() };
        assert_eq!(view.https.len(), 1);
        assert_eq!((view.https[0].url.as_str(), view.https[0].relay.as_str()), ("https://pay.shop.example/", "hub"));
        let mut refused = |request, mentions: &str| {
            let error = c.handle(request).unwrap_err().to_string();
            assert!(error.contains(mentions), "{error}");
        };
        refused(expose("btcpay", "pay.shop.example", "hub"), "already served for service \"btcpay\"");
        refused(expose("dns", "dns.shop.example", "hub"), "is UDP");
        refused(expose("ghost", "x.shop.example", "hub"), "no service named");
        refused(expose("btcpay", "x.shop.example", "nobody"), "no node named");
        refused(expose("btcpay", "btcpay.home.internal", "hub"), "mesh's own domain");
        refused(
            Request::ServiceUpdate {
                name: label("btcpay"),
                target: "127.0.0.1:23000".parse().unwrap(),
                port: None,
                protocol: Some(Protocol::Udp),
            },
            "has public names: it stays TCP",
        );
        refused(
            Request::Unexpose { service: label("btcpay"), hostname: "other.shop.example".parse().unwrap() },
            "not served on other.shop.example",
        );
        let unexpose = Request::Unexpose { service: label("btcpay"), hostname: "pay.shop.example".parse().unwrap() };
        let Reply::Service(view) = c.handle(unexpose).unwrap() else { panic!() };
        assert!(view.https.is_empty());
        assert!(c.snapshot().unwrap().exposures.is_empty());
    }

    #[test]
    fn an_onion_service_keeps_its_clients_to_devices_and_its_limits() {
        use meshd_core::keys::PrivateKey;
        use meshd_core::tor::client::{ClientKey, MAX_CLIENTS};
        let dir = tempfile::tempdir().unwrap();
        let mut c = new_network(dir.path(), "10.77.0.0/16");
        for (name, protocol) in [("wallet", Protocol::Tcp), ("dns", Protocol::Udp)] {
            let target = "127.0.0.1:9737".parse().unwrap();
            c.handle(Request::ServiceAdd { name: label(name), node: label("hub"), target, port: None, protocol })
                .unwrap();
        }
        for device in ["phone", "laptop", "tablet"] {
            let public_key = PrivateKey::generate().public_key();
            c.handle(Request::DeviceAdd {
                name: label(device),
                allow: vec![label("wallet")],
                public_key,
                expect: None,
            })
            .unwrap();
        }
        let client =
            |device: &str| OnionClient { device: label(device), public_key: ClientKey::generate().public_key() };
        let expose = |service: &str, port, clients: Vec<OnionClient>| Request::ExposeTor {
            service: label(service),
            port,
            clients,
        };
        let unexpose = |service: &str, clients: &[&str]| Request::UnexposeTor {
            service: label(service),
            clients: clients.iter().map(|d| label(d)).collect(),
        };
        let refused = |c: &mut super::super::Controller, request, mentions: &str| {
            let before = c.snapshot().unwrap();
            let error = c.handle(request).unwrap_err().to_string();
            assert!(error.contains(mentions), "{error}");
            assert_eq!(c.snapshot().unwrap(), before, "a refused request changed the network");
        };

        // Refused, changing nothing.
        refused(&mut c, expose("dns", None, vec![]), "UDP");
        refused(&mut c, expose("ghost", None, vec![]), "no service named");
        refused(&mut c, expose("wallet", None, vec![client("ghost")]), "ghost");
        refused(&mut c, expose("wallet", None, vec![client("phone"), client("phone")]), "named twice");
        refused(&mut c, unexpose("wallet", &[]), "not an onion service");

        // Public at the mesh port, then for clients only; the port stays unless given.
        let Reply::Service(view) = c.handle(expose("wallet", None, vec![])).unwrap() else { panic!() };
        let tor = view.tor.unwrap();
        assert_eq!((tor.port, tor.authorized_only, tor.address), (9737, false, None));
        let Reply::Service(view) = c.handle(expose("wallet", Some(80), vec![client("phone")])).unwrap() else {
            panic!()
        };
        let tor = view.tor.unwrap();
        assert_eq!((tor.port, tor.authorized_only, tor.clients), (80, true, vec![label("phone")]));
        let Reply::Service(view) = c.handle(expose("wallet", None, vec![client("laptop")])).unwrap() else { panic!() };
        assert_eq!(view.tor.as_ref().map(|t| (t.port, t.clients.len())), Some((80, 2)));
        refused(&mut c, expose("wallet", None, vec![client("phone")]), "already a client");
        refused(&mut c, unexpose("wallet", &["ghost"]), "no device named \"ghost\"");
        refused(&mut c, unexpose("wallet", &["tablet"]), "not a client");
        refused(&mut c, unexpose("wallet", &["phone", "phone"]), "named twice");
        refused(
            &mut c,
            Request::ServiceUpdate {
                name: label("wallet"),
                target: "127.0.0.1:9737".parse().unwrap(),
                port: None,
                protocol: Some(Protocol::Udp),
            },
            "stays TCP",
        );

        // A client goes with its device; the last one taken off leaves it for clients only, served to nobody.
        c.handle(Request::DeviceRemove { name: label("laptop") }).unwrap();
        let Reply::Service(view) = c.handle(unexpose("wallet", &["phone"])).unwrap() else { panic!() };
        let tor = view.tor.unwrap();
        assert!(tor.authorized_only && tor.clients.is_empty(), "{tor:?}");
        let Reply::Service(view) = c.handle(unexpose("wallet", &[])).unwrap() else { panic!() };
        assert_eq!(view.tor, None);

        // At most what a descriptor holds.
        for i in 0..MAX_CLIENTS {
            let public_key = PrivateKey::generate().public_key();
            let name = label(&format!("d{i}"));
            c.handle(Request::DeviceAdd { name, allow: vec![label("wallet")], public_key, expect: None }).unwrap();
        }
        let all: Vec<OnionClient> = (0..MAX_CLIENTS).map(|i| client(&format!("d{i}"))).collect();
        c.handle(expose("wallet", None, all)).unwrap();
        let public_key = PrivateKey::generate().public_key();
        c.handle(Request::DeviceAdd {
            name: label("one-more"),
            allow: vec![label("wallet")],
            public_key,
            expect: None,
        })
        .unwrap();
        refused(&mut c, expose("wallet", None, vec![client("one-more")]), &format!("at most {MAX_CLIENTS}"));

        // Removing the service takes its onion service with it.
        c.handle(Request::ServiceRemove { name: label("wallet") }).unwrap();
        assert!(c.snapshot().unwrap().onions.is_empty());
    }
}
