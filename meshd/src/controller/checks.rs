//! What every new node, device and service goes through: a name that is free and DNS can carry, a key no
//! one else holds, and the lowest free address of the pool (released ones only after a cooldown).

use meshd_core::input::{self, Label};
use meshd_core::keys::PublicKey;
use meshd_core::model::{Network, Node, Snapshot};

use super::ControlError;
use super::store::{ADDRESS_COOLDOWN, Writer};
use crate::host::clock;

/// The node named `name`.
pub(super) fn member<'s>(s: &'s Snapshot, name: &Label) -> Result<&'s Node, ControlError> {
    s.nodes.iter().find(|n| &n.name == name).ok_or_else(|| ControlError::UnknownNode(name.clone()))
}

/// A key may belong to one node or device only.
pub(super) fn ensure_key_free(s: &Snapshot, public_key: &PublicKey) -> Result<(), ControlError> {
    let devices = s.devices.iter().filter_map(|d| Some((&d.name, &d.keys.as_ref()?.public_key)));
    let mut holders = s.nodes.iter().map(|n| (&n.name, &n.public_key)).chain(devices);
    match holders.find(|(_, k)| *k == public_key) {
        Some((owner, _)) => Err(ControlError::KeyTaken(owner.clone())),
        None => Ok(()),
    }
}

/// A new name must be free and, under the network's domain, a name DNS can carry.
pub(super) fn ensure_name_free(w: &Writer<'_>, s: &Snapshot, name: &Label) -> Result<(), ControlError> {
    input::check_dns_name(&s.network.fqdn(name))?;
    let kind = if s.nodes.iter().any(|n| &n.name == name) {
        "node"
    } else if s.devices.iter().any(|d| &d.name == name) {
        "device"
    } else if s.services.iter().any(|v| &v.name == name) {
        "service"
    } else if w.pending_invites()?.iter().any(|i| &i.name == name && i.seconds_left(&clock::now()) > 0) {
        "pending invite"
    } else {
        return Ok(());
    };
    Err(ControlError::NameTaken { kind, name: name.clone() })
}

/// Take the lowest free host index of the network, inside the caller's write transaction.
pub(super) fn allocate(w: &Writer<'_>, network: &Network) -> Result<u32, ControlError> {
    let pool = network.pool();
    let unavailable = w.unavailable_indexes(ADDRESS_COOLDOWN, &clock::now())?;
    let index = pool.first_free(&unavailable).ok_or(ControlError::PoolExhausted(network.cidr))?;
    w.take_index(index)?;
    Ok(index)
}

#[cfg(test)]
mod tests {
    use super::super::Controller;
    use super::super::fixtures::{label, new_network};
    use super::super::tests::{add_device, add_service};
    use super::*;
    use meshd_core::wire::admin::{Reply, Request};

    #[test]
    fn exhausts_the_pool_and_keeps_released_addresses_cooling_down() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = new_network(dir.path(), "10.9.9.0/29"); // 6 hosts: hub + service + 4 devices
        add_service(&mut c, "wallet").unwrap();
        for i in 0..4 {
            add_device(&mut c, &format!("d{i}"), &["wallet"]).unwrap();
        }
        assert!(matches!(add_device(&mut c, "d4", &["wallet"]), Err(ControlError::PoolExhausted(_))));
        c.handle(Request::DeviceRemove { name: label("d0") }).unwrap();
        assert!(
            matches!(add_device(&mut c, "d4", &["wallet"]), Err(ControlError::PoolExhausted(_))),
            "a just-released address must not be handed out again"
        );
    }

    #[test]
    fn concurrent_writers_get_distinct_addresses() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = new_network(dir.path(), "10.77.0.0/16");
        add_service(&mut c, "wallet").unwrap();
        let db = dir.path().join("meshd.db");
        let handles: Vec<_> = (0..8)
            .map(|i| {
                let db = db.clone();
                std::thread::spawn(move || {
                    let mut c = Controller::open(&db).unwrap();
                    match add_device(&mut c, &format!("d{i}"), &["wallet"]).unwrap() {
                        Reply::DeviceHandout(h) => h.device.address,
                        other => panic!("{other:?}"),
                    }
                })
            })
            .collect();
        let mut addresses: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        addresses.sort();
        addresses.dedup();
        assert_eq!(addresses.len(), 8);
    }
}
