//! Services: a TCP or UDP target on a node, reached at its own mesh address and name.

use meshd_core::input::{HostPort, Label};
use meshd_core::model::{Protocol, Service};
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
}
