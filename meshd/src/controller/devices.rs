//! Roaming devices: adding one, its grants, its key rotation and removal, and the hand-out (everything
//! its wg-quick config needs) that adding and rotating answer with. A hand-out may be previewed first
//! and then committed only if it is still exactly what the caller wrote out.

use std::net::IpAddr;

use ipnet::IpNet;

use meshd_core::input::Label;
use meshd_core::keys::{PresharedKey, PublicKey};
use meshd_core::model::{DEVICE_KEEPALIVE_SECS, Device, DeviceKeys, Node, Snapshot};
use meshd_core::wire::admin::{DeviceHandout, Reply};

use super::ControlError;
use super::checks::{allocate, ensure_key_free, ensure_name_free};
use super::store::Writer;

/// Add device `name` with key `public_key`, allowed to reach the services `allow`; `expect` is the
/// hand-out the caller previewed, if any.
pub(super) fn add(
    w: &Writer<'_>,
    name: Label,
    allow: Vec<Label>,
    public_key: PublicKey,
    expect: Option<Box<DeviceHandout>>,
) -> Result<Reply, ControlError> {
    let allow = checked_allow(allow)?;
    let preshared_key = preshared_key_for(expect.as_deref());
    {
        let s = w.snapshot()?;
        ensure_name_free(w, &s, &name)?;
        ensure_services_exist(&s, &allow)?;
        ensure_key_free(&s, &public_key)?;
        let hub = s.hub().ok_or(ControlError::NoHub)?;
        let index = allocate(w, &s.network)?;
        let keys = DeviceKeys { public_key, preshared_key };
        let device = Device { name, keys: Some(keys.clone()), index, allow };
        w.insert_device(&device, &keys)?;
        handed_out(w, handout(&s, hub, &device, &keys), expect.as_deref())
    }
}

/// Replace the services device `name` may reach.
pub(super) fn allow(w: &Writer<'_>, name: Label, allow: Vec<Label>) -> Result<Reply, ControlError> {
    let allow = checked_allow(allow)?;
    let s = w.snapshot()?;
    if !s.devices.iter().any(|d| d.name == name) {
        return Err(ControlError::UnknownDevice(name));
    }
    ensure_services_exist(&s, &allow)?;
    w.set_device_grants(&name, &allow)?;
    Ok(Reply::Done)
}

/// Give device `name` a new public key and a new preshared key (those of `expect`, if previewed).
pub(super) fn rotate(
    w: &Writer<'_>,
    name: Label,
    public_key: PublicKey,
    expect: Option<Box<DeviceHandout>>,
) -> Result<Reply, ControlError> {
    {
        let s = w.snapshot()?;
        let preshared_key = preshared_key_for(expect.as_deref());
        let mut device = s.devices.iter().find(|d| d.name == name).cloned().ok_or(ControlError::UnknownDevice(name))?;
        ensure_key_free(&s, &public_key)?;
        let hub = s.hub().ok_or(ControlError::NoHub)?;
        let keys = DeviceKeys { public_key, preshared_key };
        device.keys = Some(keys.clone());
        w.update_device_keys(&device.name, &keys)?;
        handed_out(w, handout(&s, hub, &device, &keys), expect.as_deref())
    }
}

/// Remove device `name` (its address cools down before reuse).
pub(super) fn remove(w: &Writer<'_>, name: Label) -> Result<Reply, ControlError> {
    match w.delete_device(&name)? {
        true => Ok(Reply::Removed),
        false => Err(ControlError::UnknownDevice(name)),
    }
}

/// The preshared key of a device being added or rotated: the one of the hand-out the caller previewed
/// and wrote out, else a new one.
fn preshared_key_for(expect: Option<&DeviceHandout>) -> PresharedKey {
    match expect {
        Some(h) => h.preshared_key.clone(),
        None => PresharedKey::generate(),
    }
}

/// The reply with `handout`, whose endpoint and MTU are recorded as the device's config (see [`expected`]).
fn handed_out(w: &Writer<'_>, handout: DeviceHandout, expect: Option<&DeviceHandout>) -> Result<Reply, ControlError> {
    w.set_device_config(&handout.device.name, &handout.endpoint, handout.mtu)?;
    expected(handout, expect)
}

/// The reply with `handout`, refused (so the caller's transaction rolls back) unless it is the one the
/// caller previewed and already wrote out.
fn expected(handout: DeviceHandout, expect: Option<&DeviceHandout>) -> Result<Reply, ControlError> {
    if let Some(expect) = expect {
        // The last handshake is not part of a config (and is filled in only for listings).
        let same = |h: &DeviceHandout| {
            let mut h = h.clone();
            h.device.last_handshake = None;
            h
        };
        if same(expect) != same(&handout) {
            return Err(ControlError::HandoutChanged(handout.device.name));
        }
    }
    Ok(Reply::DeviceHandout(Box::new(handout)))
}

/// Everything a device's config needs from the network, for `meshctl` to render.
fn handout(s: &Snapshot, hub: &Node, device: &Device, keys: &DeviceKeys) -> DeviceHandout {
    let pool = s.network.pool();
    let hub_v4 = pool.v4_of(hub.index);
    let hub_v6 = pool.v6_of(hub.index);
    DeviceHandout {
        device: s.device_view(device),
        addresses: vec![
            IpNet::new(pool.v4_of(device.index).into(), 32).expect("/32 is valid"),
            IpNet::new(pool.v6_of(device.index).into(), 128).expect("/128 is valid"),
        ],
        dns_servers: vec![IpAddr::V4(hub_v4), IpAddr::V6(hub_v6)],
        dns_search: vec![s.network.domain.clone()],
        mtu: s.network.mtu,
        hub_public_key: hub.public_key.clone(),
        preshared_key: keys.preshared_key.clone(),
        endpoint: hub.endpoint.as_ref().map(ToString::to_string).unwrap_or_default(),
        allowed_ips: vec![IpNet::V4(pool.v4()), IpNet::V6(pool.v6())],
        persistent_keepalive: DEVICE_KEEPALIVE_SECS,
    }
}

/// A device's grants, sorted and without repeats; at least one.
fn checked_allow(mut allow: Vec<Label>) -> Result<Vec<Label>, ControlError> {
    allow.sort();
    allow.dedup();
    if allow.is_empty() {
        return Err(ControlError::NothingAllowed);
    }
    Ok(allow)
}

/// Every service in `allow` exists.
fn ensure_services_exist(s: &Snapshot, allow: &[Label]) -> Result<(), ControlError> {
    match allow.iter().find(|a| !s.services.iter().any(|svc| &svc.name == *a)) {
        Some(unknown) => Err(ControlError::UnknownService(unknown.clone())),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::super::Controller;
    use super::super::fixtures::{label, new_network};
    use super::super::tests::{add_device, add_service};
    use super::*;
    use meshd_core::keys::PrivateKey;
    use meshd_core::wire::admin::Request;

    #[test]
    fn hub_gets_the_first_address_and_devices_the_next() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = new_network(dir.path(), "10.77.0.0/16");
        let Reply::Service(svc) = add_service(&mut c, "wallet").unwrap() else { panic!() };
        assert_eq!(svc.mesh_address, "10.77.0.2:9737");
        assert_eq!(svc.dns_name, "wallet.home.internal");
        let Reply::DeviceHandout(h) = add_device(&mut c, "phone", &["wallet"]).unwrap() else { panic!() };
        assert_eq!(h.device.address.to_string(), "10.77.0.3");
        assert_eq!(h.addresses[0].to_string(), "10.77.0.3/32");
        assert!(h.addresses[1].to_string().ends_with("::3/128"));
        assert_eq!(h.dns_servers[0].to_string(), "10.77.0.1");
        assert_eq!(h.endpoint, "203.0.113.5:51820");
        assert_eq!(h.allowed_ips[0].to_string(), "10.77.0.0/16");
        assert_eq!(h.allowed_ips[1].prefix_len(), 64);
        let Reply::Services(list) = c.handle(Request::ServiceList).unwrap() else { panic!() };
        assert_eq!(list[0].devices, vec![label("phone")]);
    }

    #[test]
    fn rotation_replaces_keys_and_keeps_address_and_grants() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = new_network(dir.path(), "10.77.0.0/16");
        add_service(&mut c, "wallet").unwrap();
        let Reply::DeviceHandout(before) = add_device(&mut c, "phone", &["wallet"]).unwrap() else { panic!() };
        let new_key = PrivateKey::generate().public_key();
        let rotate = |c: &mut Controller, name: &str, key: &PublicKey| {
            c.handle(Request::DeviceRotate { name: label(name), public_key: key.clone(), expect: None })
        };
        let Reply::DeviceHandout(after) = rotate(&mut c, "phone", &new_key).unwrap() else { panic!() };
        assert_eq!(after.device.public_key.as_ref(), Some(&new_key));
        assert_ne!(after.preshared_key, before.preshared_key, "a new preshared key too");
        assert_eq!(after.addresses, before.addresses);
        assert_eq!(after.device.allow, before.device.allow);
        let stored = c.snapshot().unwrap();
        assert_eq!(stored.devices[0].keys.as_ref().map(|k| &k.public_key), Some(&new_key));

        assert!(matches!(
            rotate(&mut c, "ghost", &PrivateKey::generate().public_key()),
            Err(ControlError::UnknownDevice(_))
        ));
        let hub_key = stored.hub().unwrap().public_key.clone();
        assert!(matches!(rotate(&mut c, "phone", &hub_key), Err(ControlError::KeyTaken(_))));
        assert_eq!(c.snapshot().unwrap(), stored, "refused rotations change nothing");
    }

    #[test]
    fn a_previewed_hand_out_is_committed_exactly_or_refused_without_changes() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = new_network(dir.path(), "10.77.0.0/16");
        add_service(&mut c, "wallet").unwrap();
        let key = PrivateKey::generate().public_key();
        let add = |expect| Request::DeviceAdd {
            name: label("phone"),
            allow: vec![label("wallet")],
            public_key: key.clone(),
            expect,
        };
        let preview =
            |c: &mut Controller, request: Request| match c.handle(Request::Preview { request: Box::new(request) }) {
                Ok(Reply::DeviceHandout(h)) => h,
                other => panic!("{other:?}"),
            };

        // A preview changes nothing, not even the address ledger.
        let before = c.snapshot().unwrap();
        let previewed = preview(&mut c, add(None));
        assert_eq!(c.snapshot().unwrap(), before);
        assert_eq!(preview(&mut c, add(None)).device.address, previewed.device.address, "same address again");

        // Someone else takes the previewed address meanwhile: refused, and nothing of it stays.
        let other = Request::DeviceAdd {
            name: label("tablet"),
            allow: vec![label("wallet")],
            public_key: PrivateKey::generate().public_key(),
            expect: None,
        };
        c.handle(other).unwrap();
        let taken = c.snapshot().unwrap();
        let refused = c.handle(add(Some(previewed.clone())));
        assert!(matches!(refused, Err(ControlError::HandoutChanged(_))), "{refused:?}");
        assert_eq!(c.snapshot().unwrap(), taken);

        // Previewed again: committed with exactly that hand-out, its preshared key included.
        let previewed = preview(&mut c, add(None));
        let Reply::DeviceHandout(added) = c.handle(add(Some(previewed.clone()))).unwrap() else { panic!() };
        assert_eq!(added, previewed);
        let stored = c.snapshot().unwrap();
        assert_eq!(
            stored.devices.iter().find(|d| d.name.as_str() == "phone").unwrap().keys.as_ref().unwrap().preshared_key,
            added.preshared_key
        );

        // A rotation likewise: the preview leaves the old keys in place.
        let new_key = PrivateKey::generate().public_key();
        let rotate = |expect| Request::DeviceRotate { name: label("phone"), public_key: new_key.clone(), expect };
        let previewed = preview(&mut c, rotate(None));
        assert_eq!(c.snapshot().unwrap(), stored, "a previewed rotation keeps the old key");
        let Reply::DeviceHandout(rotated) = c.handle(rotate(Some(previewed.clone()))).unwrap() else { panic!() };
        assert_eq!(rotated, previewed);
        assert_eq!(
            c.snapshot()
                .unwrap()
                .devices
                .iter()
                .find(|d| d.name.as_str() == "phone")
                .unwrap()
                .keys
                .as_ref()
                .unwrap()
                .public_key,
            new_key
        );

        // A malformed preshared key cannot reach the controller: the request is refused when read.
        let psk = previewed.preshared_key.as_str().to_owned();
        let forged = serde_json::to_string(&rotate(Some(previewed))).unwrap().replace(&psk, "junk");
        assert!(serde_json::from_str::<Request>(&forged).is_err());
        let nested = Request::Preview { request: Box::new(Request::Preview { request: Box::new(Request::NodeList) }) };
        assert!(matches!(c.handle(nested), Err(ControlError::NestedPreview)));
        let in_batch = Request::Batch { requests: vec![Request::Preview { request: Box::new(Request::NodeList) }] };
        assert!(matches!(c.handle(in_batch), Err(ControlError::InBatch { index: 0, .. })));
        assert!(!Request::Preview { request: Box::new(add(None)) }.is_change(), "a preview changes nothing");
    }
}
