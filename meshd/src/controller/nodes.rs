//! Member nodes: invites and their redemption by joining hosts, removal, disabling, and the rotation of a
//! member's key (asked for here, made by the host, checked and recorded on its next contact).

use std::net::IpAddr;

use ipnet::IpNet;
use meshd_core::input::{self, HostPort, InputError, Label};
use meshd_core::keys::PublicKey;
use meshd_core::model::{Invite, InviteStatus, InviteView, Node, Role, Snapshot};
use meshd_core::wire::admin::{EndpointChange, InviteIssued, NodeUpdated, Reply};
use meshd_core::wire::invite::{self, Token};
use meshd_core::wire::join::{JoinRequest, MemberState, Standing};

use super::checks::{allocate, ensure_key_free, ensure_name_free, member};
use super::store::Writer;
use super::{ControlError, Controller};
use crate::host::clock;
use crate::links::join::JoinIdentity;

impl Controller {
    /// Whether `public_key` may become the key of member `name`, which was asked for a new one.
    pub fn check_node_key(&mut self, name: &Label, public_key: &PublicKey) -> Result<(), ControlError> {
        let s = self.snapshot()?;
        if !member(&s, name)?.rotate_key {
            return Err(ControlError::NoRotation(name.clone()));
        }
        ensure_key_free(&s, public_key)
    }

    /// A member host made the new key it was asked for: the network knows it by that key from now on.
    pub fn replace_node_key(&mut self, name: &Label, public_key: &PublicKey) -> Result<(), ControlError> {
        self.store.write(|w| {
            let s = w.snapshot()?;
            // Only while the network asks for a new key: an offer accepted in another session, or before
            // an earlier rotation ended, cannot change the key afterwards.
            if !member(&s, name)?.rotate_key {
                return Err(ControlError::NoRotation(name.clone()));
            }
            ensure_key_free(&s, public_key)?;
            w.set_node_key(name, public_key)?;
            Ok(())
        })
    }

    /// Redeem an invite for a joining host: one transaction, so of two hosts racing on one token
    /// exactly one becomes the node.
    pub fn redeem(&mut self, request: &JoinRequest) -> Result<MemberState, ControlError> {
        let public_key = request.public_key.clone();
        // The joining host's word for where it is goes into every other host's config.
        if let Some(endpoint) = &request.endpoint {
            check_node_endpoint(&self.snapshot()?, endpoint)?;
        }
        if let Some(mtu) = request.mtu {
            input::check_mtu(mtu)?;
        }
        // The interface name was checked when the request was read (an `InterfaceName`).
        input::check_listen_port(request.listen_port)?;
        self.store.write(|w| {
            let invite = w.invite(&request.id)?.ok_or(ControlError::InviteForged)?;
            if !invite::hashes_equal(&invite.secret_hash, &invite::hash_secret(&request.secret)) {
                return Err(ControlError::InviteForged);
            }
            match invite.status {
                InviteStatus::Redeemed => return Err(ControlError::InviteUsed),
                InviteStatus::Cancelled => return Err(ControlError::InviteCancelled),
                InviteStatus::Pending => {}
            }
            let left = invite.seconds_left(&clock::now());
            if left <= 0 {
                return Err(ControlError::InviteExpired(-left));
            }
            let s = w.snapshot()?;
            ensure_key_free(&s, &public_key)?;
            w.finish_invite(&invite.id, InviteStatus::Redeemed)?;
            ensure_name_free(w, &s, &invite.name)?;
            let index = allocate(w, &s.network)?;
            w.insert_node(&Node {
                name: invite.name.clone(),
                public_key,
                index,
                endpoint: request.endpoint.clone(),
                listen_port: request.listen_port,
                interface: request.interface.clone(),
                role: invite.role,
                disabled: false,
                rotate_key: false,
                mtu: request.mtu,
            })?;
            Ok(MemberState { me: invite.name, state: w.snapshot()?.shared(), hub: None })
        })
    }

    /// Where a member known by any of `keys` stands: a node (enabled or disabled), a removed node, or
    /// unknown to this network.
    pub fn standing(&mut self, keys: &[PublicKey]) -> Result<Standing, ControlError> {
        let s = self.snapshot()?;
        let mut standings = Vec::with_capacity(keys.len());
        for key in keys {
            standings.push(match s.nodes.iter().find(|n| &n.public_key == key) {
                Some(node) if node.disabled => Standing::Disabled,
                Some(_) => Standing::Member,
                None if self.store.is_removed_key(key)? => Standing::Removed,
                None => Standing::Unknown,
            });
        }
        Ok(Standing::best(standings))
    }

    /// The TLS identity joining hosts pin (made on first use).
    pub fn join_identity(&mut self) -> Result<JoinIdentity, ControlError> {
        self.store.write(join_identity)
    }
}

/// Invite a host to join as `name` with `role` (not the hub), for `expires_secs` seconds: a token.
pub(super) fn invite(w: &Writer<'_>, name: Label, role: Role, expires_secs: u64) -> Result<Reply, ControlError> {
    if role == Role::Hub {
        return Err(ControlError::SecondHub);
    }
    // An invite born expired (or living past any sane horizon) would be a token nobody can use, or
    // one that never dies: refused, whoever asks (meshctl checks too, but the admin socket takes JSON).
    if expires_secs == 0 || expires_secs > invite::MAX_EXPIRY.as_secs() {
        return Err(ControlError::InviteLifetime(expires_secs));
    }
    {
        let s = w.snapshot()?;
        ensure_name_free(w, &s, &name)?;
        let now = clock::now();
        // An expired invite no longer reserves the name (ensure_name_free refused a live one).
        for expired in w.pending_invites()?.into_iter().filter(|i| i.name == name) {
            w.finish_invite(&expired.id, InviteStatus::Cancelled)?;
        }
        let hub = s.hub().ok_or(ControlError::NoHub)?;
        let join = hub.endpoint.clone().ok_or(ControlError::NoHub)?;
        let identity = join_identity(w)?;
        let (id, secret) = invite::new_id_and_secret();
        let expires_at = now.wall + expires_secs as i64;
        w.insert_invite(&Invite {
            id: id.clone(),
            name: name.clone(),
            role,
            secret_hash: invite::hash_secret(&secret),
            created: now,
            expires_at,
            status: InviteStatus::Pending,
        })?;
        let token = Token {
            v: 1,
            network: s.network.name.to_string(),
            join,
            cidr: Some(s.network.cidr),
            fingerprint: identity.fingerprint(),
            id,
            secret,
        };
        Ok(Reply::Invite(InviteIssued { invite: InviteView { name, role, expires_at }, token: token.encode() }))
    }
}

/// The pending invites that have not expired, with when each expires.
pub(super) fn pending_invites(w: &Writer<'_>) -> Result<Reply, ControlError> {
    // When each expires, by this host's wall clock now: real time left, from now.
    let now = clock::now();
    let pending = w.pending_invites()?.into_iter().map(|i| (i.seconds_left(&now), i)).filter(|(left, _)| *left > 0);
    Ok(Reply::Invites(
        pending.map(|(_, i)| InviteView { expires_at: i.expires_at_by(&now), name: i.name, role: i.role }).collect(),
    ))
}

/// Cancel the pending invite for `name`.
pub(super) fn uninvite(w: &Writer<'_>, name: Label) -> Result<Reply, ControlError> {
    let invite = w.pending_invites()?.into_iter().find(|i| i.name == name);
    let invite = invite.ok_or(ControlError::NoInvite(name))?;
    w.finish_invite(&invite.id, InviteStatus::Cancelled)?;
    Ok(Reply::Removed)
}

/// Remove a member node (never the hub) and its services.
pub(super) fn remove(w: &Writer<'_>, name: Label) -> Result<Reply, ControlError> {
    let s = w.snapshot()?;
    if member(&s, &name)?.role == Role::Hub {
        return Err(ControlError::RemoveHub(name));
    }
    // Its services go with it (their addresses, like its own, cool down before reuse).
    for service in s.services.iter().filter(|v| v.node == name) {
        w.delete_service(&service.name)?;
    }
    w.delete_node(&name)?;
    Ok(Reply::Removed)
}

/// Disable a member node (never the hub): it keeps its name and addresses.
pub(super) fn disable(w: &Writer<'_>, name: Label) -> Result<Reply, ControlError> {
    if member(&w.snapshot()?, &name)?.role == Role::Hub {
        return Err(ControlError::DisableHub(name));
    }
    w.set_node_disabled(&name, true)?;
    Ok(Reply::Done)
}

/// Enable a disabled node again.
pub(super) fn enable(w: &Writer<'_>, name: Label) -> Result<Reply, ControlError> {
    member(&w.snapshot()?, &name)?;
    w.set_node_disabled(&name, false)?;
    Ok(Reply::Done)
}

/// Ask an enabled member node (not the hub) to make a new key on its next contact.
pub(super) fn ask_for_new_key(w: &Writer<'_>, name: Label) -> Result<Reply, ControlError> {
    let s = w.snapshot()?;
    let node = member(&s, &name)?;
    if node.role == Role::Hub {
        return Err(ControlError::RotateHub(name));
    }
    if node.disabled {
        return Err(ControlError::NodeDisabled(name));
    }
    w.set_node_rotate(&name, true)?;
    Ok(Reply::Done)
}

/// Change where a node is reached, or its interface's own MTU. A new endpoint must be one other hosts can
/// reach; the hub cannot go without one. Given the hub's endpoint, the reply lists the devices whose config
/// names another one (handed out before a change, and not since).
pub(super) fn update(
    w: &Writer<'_>,
    name: Label,
    endpoint: Option<EndpointChange>,
    mtu: Option<u16>,
) -> Result<Reply, ControlError> {
    let s = w.snapshot()?;
    let node = member(&s, &name)?;
    if let Some(mtu) = mtu {
        input::check_mtu(mtu)?;
        w.set_node_mtu(&name, Some(mtu))?;
    }
    let mut devices_with_old_endpoint = Vec::new();
    if let Some(change) = endpoint {
        let endpoint = match change {
            EndpointChange::Set(endpoint) => {
                check_node_endpoint(&s, &endpoint)?;
                Some(endpoint)
            }
            EndpointChange::Clear if node.role == Role::Hub => return Err(ControlError::HubNeedsEndpoint(name)),
            EndpointChange::Clear => None,
        };
        if endpoint != node.endpoint {
            w.set_node_endpoint(&name, endpoint.as_ref())?;
        }
        if let (Role::Hub, Some(endpoint)) = (node.role, &endpoint) {
            devices_with_old_endpoint = w.devices_configured_for_another_endpoint(&endpoint.to_string())?;
        }
    }
    let s = w.snapshot()?;
    let node = s.node_view(member(&s, &name)?);
    Ok(Reply::NodeUpdated(NodeUpdated { node, devices_with_old_endpoint }))
}

/// The TLS identity joining hosts pin, made and stored on first use.
fn join_identity(w: &Writer<'_>) -> Result<JoinIdentity, ControlError> {
    if let Some((cert, key)) = w.join_identity()? {
        return Ok(JoinIdentity::from_der(cert, key)?);
    }
    let identity = JoinIdentity::generate()?;
    w.insert_join_identity(identity.cert_der(), identity.key_der())?;
    Ok(identity)
}

/// Refuse an endpoint no host or phone can reach ([`input::check_endpoint`]), or one inside the mesh's
/// own ranges (reached through the tunnels themselves: a peer there is never reached).
fn check_node_endpoint(s: &Snapshot, endpoint: &HostPort) -> Result<(), ControlError> {
    input::check_endpoint(endpoint)?;
    let inside = endpoint.ip().is_some_and(|ip| {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        IpNet::V4(s.network.cidr).contains(&ip) || IpNet::V6(s.network.ula).contains(&ip)
    });
    if inside {
        let reason = "an address inside the mesh is reached through the mesh itself, never by a peer's endpoint";
        return Err(InputError::Endpoint { endpoint: endpoint.to_string(), reason }.into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::{invite, join_request, label, new_network};
    use super::super::tests::{add_device, add_service};
    use super::*;
    use meshd_core::keys::PrivateKey;
    use meshd_core::model::{AccessRule, Protocol};
    use meshd_core::wire::admin::{EndpointChange, Request};

    #[test]
    fn an_invite_is_redeemed_once_into_a_node() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = new_network(dir.path(), "10.77.0.0/16");
        let token = invite(&mut c, "vps", 3600);
        assert_eq!(token.join.to_string(), "203.0.113.5:51820");
        assert_eq!(token.fingerprint, c.join_identity().unwrap().fingerprint(), "the token pins the join certificate");
        let Reply::Invites(list) = c.handle(Request::NodeInvites).unwrap() else { panic!() };
        assert_eq!(list.iter().map(|i| i.name.as_str()).collect::<Vec<_>>(), ["vps"]);
        assert!(matches!(add_device(&mut c, "vps", &[]), Err(ControlError::NothingAllowed)));
        add_service(&mut c, "wallet").unwrap();
        assert!(
            matches!(
                add_device(&mut c, "vps", &["wallet"]),
                Err(ControlError::NameTaken { kind: "pending invite", .. })
            ),
            "an invited name is reserved"
        );

        let member = c.redeem(&join_request(&token)).unwrap();
        assert_eq!(member.me.as_str(), "vps");
        let vps = member.state.nodes.iter().find(|n| n.name.as_str() == "vps").unwrap();
        assert_eq!(vps.index, 3, "hub 1, wallet 2, vps 3");
        assert_eq!(vps.endpoint.as_ref().map(ToString::to_string).as_deref(), Some("198.51.100.7:51820"));
        assert!(matches!(c.redeem(&join_request(&token)), Err(ControlError::InviteUsed)));
        let Reply::Invites(list) = c.handle(Request::NodeInvites).unwrap() else { panic!() };
        assert!(list.is_empty());
    }

    #[test]
    fn forged_cancelled_and_expired_invites_are_refused_without_changes() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = new_network(dir.path(), "10.77.0.0/16");
        let token = invite(&mut c, "vps", 3600);
        let mut forged = token.clone();
        forged.secret = "0".repeat(32).parse().unwrap();
        assert!(matches!(c.redeem(&join_request(&forged)), Err(ControlError::InviteForged)));
        forged.id = "1".repeat(32);
        assert!(matches!(c.redeem(&join_request(&forged)), Err(ControlError::InviteForged)));

        c.handle(Request::NodeUninvite { name: label("vps") }).unwrap();
        assert!(matches!(c.redeem(&join_request(&token)), Err(ControlError::InviteCancelled)));
        assert!(matches!(c.handle(Request::NodeUninvite { name: label("vps") }), Err(ControlError::NoInvite(_))));

        let expired = invite(&mut c, "attic", 1);
        std::thread::sleep(std::time::Duration::from_millis(1_100));
        assert!(matches!(c.redeem(&join_request(&expired)), Err(ControlError::InviteExpired(_))));
        let again = invite(&mut c, "attic", 3600);
        assert_eq!(c.snapshot().unwrap().nodes.len(), 1, "only the hub");
        c.redeem(&join_request(&again)).expect("a new invite for a name whose invite expired");
    }

    #[test]
    fn an_invite_born_expired_or_immortal_is_refused_loudly() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = new_network(dir.path(), "10.77.0.0/16");
        for secs in [0, meshd_core::wire::invite::MAX_EXPIRY.as_secs() + 1, u64::MAX] {
            let refused = c.handle(Request::NodeInvite { name: label("vps"), role: Role::Node, expires_secs: secs });
            assert!(matches!(refused, Err(ControlError::InviteLifetime(s)) if s == secs), "{secs}: {refused:?}");
        }
        let Reply::Invites(pending) = c.handle(Request::NodeInvites).unwrap() else { panic!() };
        assert!(pending.is_empty(), "{pending:?}");
    }

    #[test]
    fn racing_redemptions_have_one_winner() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = new_network(dir.path(), "10.77.0.0/16");
        let token = invite(&mut c, "vps", 3600);
        let db = dir.path().join("meshd.db");
        let results: Vec<bool> = (0..6)
            .map(|_| {
                let (db, request) = (db.clone(), join_request(&token));
                std::thread::spawn(move || Controller::open(&db).unwrap().redeem(&request).is_ok())
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|h| h.join().unwrap())
            .collect();
        assert_eq!(results.iter().filter(|ok| **ok).count(), 1, "{results:?}");
        assert_eq!(c.snapshot().unwrap().nodes.len(), 2);
    }

    #[test]
    fn removing_a_node_takes_its_services_and_rules_with_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = new_network(dir.path(), "10.77.0.0/16");
        let token = invite(&mut c, "vps", 3600);
        c.redeem(&join_request(&token)).unwrap();
        let on_member = Request::ServiceAdd {
            name: label("beacon"),
            node: label("vps"),
            target: "127.0.0.1:5052".parse().unwrap(),
            port: None,
            protocol: Protocol::Tcp,
        };
        c.handle(on_member).expect("services may live on members");
        add_device(&mut c, "phone", &["beacon"]).unwrap();
        c.handle(Request::AccessAllow { from: label("hub"), to: label("vps") }).unwrap();
        assert!(matches!(c.handle(Request::NodeRemove { name: label("hub") }), Err(ControlError::RemoveHub(_))));
        c.handle(Request::NodeRemove { name: label("vps") }).unwrap();
        let s = c.snapshot().unwrap();
        assert_eq!(s.nodes.len(), 1);
        assert!(s.services.is_empty() && s.rules.is_empty());
        assert!(s.devices[0].allow.is_empty(), "the grant went with the service");
        assert!(matches!(c.handle(Request::NodeRemove { name: label("vps") }), Err(ControlError::UnknownNode(_))));
    }

    #[test]
    fn a_nodes_standing_follows_disable_enable_and_removal() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = new_network(dir.path(), "10.77.0.0/16");
        let request = join_request(&invite(&mut c, "vps", 3600));
        let key = request.public_key.clone();
        c.redeem(&request).unwrap();
        let stranger = PrivateKey::generate().public_key();
        assert_eq!(c.standing(std::slice::from_ref(&key)).unwrap(), Standing::Member);
        assert_eq!(c.standing(std::slice::from_ref(&stranger)).unwrap(), Standing::Unknown);
        c.handle(Request::NodeDisable { name: label("vps") }).unwrap();
        assert_eq!(c.standing(&[stranger.clone(), key.clone()]).unwrap(), Standing::Disabled);
        c.handle(Request::NodeEnable { name: label("vps") }).unwrap();
        c.handle(Request::NodeRemove { name: label("vps") }).unwrap();
        assert_eq!(c.standing(&[stranger.clone(), key.clone()]).unwrap(), Standing::Removed);
        // Reopened: the removed key is kept in the database.
        let mut reopened = Controller::open(&dir.path().join("meshd.db")).unwrap();
        assert_eq!(reopened.standing(&[key]).unwrap(), Standing::Removed);
    }

    #[test]
    fn a_node_s_endpoint_changes_and_a_new_hub_endpoint_names_the_devices_to_hand_out_again() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = new_network(dir.path(), "10.77.0.0/16");
        let token = invite(&mut c, "vps", 3600);
        c.redeem(&join_request(&token)).unwrap();
        add_service(&mut c, "wallet").unwrap();
        add_device(&mut c, "phone", &["wallet"]).unwrap();
        let update = |c: &mut Controller, name: &str, change: Option<EndpointChange>| {
            c.handle(Request::NodeUpdate { name: label(name), endpoint: change, mtu: None })
        };
        let set = |e: &str| Some(EndpointChange::Set(e.parse().unwrap()));

        let Reply::NodeUpdated(moved) = update(&mut c, "vps", set("198.51.100.9:51821")).unwrap() else { panic!() };
        assert_eq!(moved.node.endpoint.as_deref(), Some("198.51.100.9:51821"));
        assert!(moved.devices_with_old_endpoint.is_empty(), "devices carry only the hub's endpoint");
        let Reply::NodeUpdated(nat) = update(&mut c, "vps", Some(EndpointChange::Clear)).unwrap() else { panic!() };
        assert_eq!(nat.node.endpoint, None);
        assert_eq!(c.snapshot().unwrap().nodes[1].endpoint, None);

        let old = c.snapshot().unwrap().nodes[0].endpoint.as_ref().unwrap().to_string();
        let Reply::NodeUpdated(hub) = update(&mut c, "hub", set("hub.example.net:51820")).unwrap() else { panic!() };
        assert_eq!(hub.node.endpoint.as_deref(), Some("hub.example.net:51820"));
        assert_eq!(hub.devices_with_old_endpoint, [label("phone")]);
        let Reply::NodeUpdated(same) = update(&mut c, "hub", set("hub.example.net:51820")).unwrap() else { panic!() };
        assert_eq!(same.devices_with_old_endpoint, [label("phone")], "its config still names the old endpoint");
        // Back where the phone's config says: nothing to hand out; a device handed out since is up to date.
        let Reply::NodeUpdated(back) = update(&mut c, "hub", set(&old)).unwrap() else { panic!() };
        assert!(back.devices_with_old_endpoint.is_empty(), "{back:?}");
        update(&mut c, "hub", set("hub.example.net:51820")).unwrap();
        let public_key = PrivateKey::generate().public_key();
        c.handle(Request::DeviceRotate { name: label("phone"), public_key, expect: None }).unwrap();
        add_device(&mut c, "tablet", &["wallet"]).unwrap();
        let Reply::NodeUpdated(same) = update(&mut c, "hub", set("hub.example.net:51820")).unwrap() else { panic!() };
        assert!(same.devices_with_old_endpoint.is_empty(), "both configs were handed out since");
        let Reply::NodeUpdated(back) = update(&mut c, "hub", set(&old)).unwrap() else { panic!() };
        assert_eq!(back.devices_with_old_endpoint, [label("phone"), label("tablet")]);
        update(&mut c, "hub", set("hub.example.net:51820")).unwrap();
        let Reply::NodeUpdated(unchanged) = update(&mut c, "hub", None).unwrap() else { panic!() };
        assert_eq!(unchanged.node.endpoint.as_deref(), Some("hub.example.net:51820"));

        let before = c.snapshot().unwrap();
        assert!(matches!(update(&mut c, "hub", Some(EndpointChange::Clear)), Err(ControlError::HubNeedsEndpoint(_))));
        assert!(matches!(update(&mut c, "ghost", set("198.51.100.9:1")), Err(ControlError::UnknownNode(_))));
        // The admin socket takes JSON: an endpoint meshctl would refuse is refused here too.
        // Nor one inside the mesh (reached through the mesh itself), nor loopback in IPv6 clothing.
        let mesh_v6 = format!("[{}]:51820", before.network.pool().v6_of(2));
        let unusables = [
            "127.0.0.1:51820",
            "0.0.0.0:51820",
            "localhost:51820",
            "[fe80::1]:51820",
            "10.77.0.2:51820",
            "[::127.0.0.1]:5",
        ];
        for unusable in unusables.iter().copied().chain([mesh_v6.as_str()]) {
            let refused = update(&mut c, "vps", set(unusable));
            assert!(matches!(refused, Err(ControlError::Input(_))), "{unusable}: {refused:?}");
        }
        assert_eq!(c.snapshot().unwrap(), before);
    }

    #[test]
    fn mtus_of_the_network_and_of_hosts_are_checked_stored_and_handed_to_devices() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = new_network(dir.path(), "10.77.0.0/16");
        add_service(&mut c, "wallet").unwrap();
        add_device(&mut c, "phone", &["wallet"]).unwrap();
        let mut small = join_request(&invite(&mut c, "cellar", 3600));
        small.mtu = Some(1279);
        let before = c.snapshot().unwrap();
        assert!(matches!(c.redeem(&small), Err(ControlError::Input(_))), "a join with an MTU below 1280");
        assert_eq!(c.snapshot().unwrap(), before);
        small.mtu = Some(1340);
        small.listen_port = 0;
        assert!(matches!(c.redeem(&small), Err(ControlError::Input(_))), "a join listening on port 0");
        assert_eq!(c.snapshot().unwrap(), before);
        small.listen_port = 51820;
        c.redeem(&small).unwrap();
        let s = c.snapshot().unwrap();
        let cellar = &s.nodes[1];
        assert_eq!((cellar.mtu, s.node_view(cellar).mtu, s.node_view(&s.nodes[0]).mtu), (Some(1340), 1340, 1420));

        let update =
            |c: &mut Controller, mtu| c.handle(Request::NodeUpdate { name: label("hub"), endpoint: None, mtu });
        let before = c.snapshot().unwrap();
        for bad in [0, 1279, 9001] {
            assert!(matches!(update(&mut c, Some(bad)), Err(ControlError::Input(_))), "{bad}");
            assert!(matches!(c.handle(Request::NetworkUpdate { mtu: bad }), Err(ControlError::Input(_))), "{bad}");
        }
        assert_eq!(c.snapshot().unwrap(), before);
        let Reply::NodeUpdated(hub) = update(&mut c, Some(1400)).unwrap() else { panic!() };
        assert_eq!((hub.node.mtu, hub.devices_with_old_endpoint.len()), (1400, 0));

        let Reply::NetworkUpdated(net) = c.handle(Request::NetworkUpdate { mtu: 1320 }).unwrap() else { panic!() };
        assert_eq!((net.network.mtu, net.devices_with_old_mtu), (1320, vec![label("phone")]));
        let Reply::NetworkUpdated(same) = c.handle(Request::NetworkUpdate { mtu: 1320 }).unwrap() else { panic!() };
        assert_eq!(same.devices_with_old_mtu, [label("phone")], "its config still has the old MTU");
        let s = c.snapshot().unwrap();
        let mtus: Vec<u16> = s.nodes.iter().map(|n| s.node_view(n).mtu).collect();
        assert_eq!(mtus, [1400, 1340], "their own MTUs stay; hub, then cellar");
        let Reply::DeviceHandout(handout) = add_device(&mut c, "tablet", &["wallet"]).unwrap() else { panic!() };
        assert_eq!(handout.mtu, 1320, "devices get the network's MTU");
        // Each device is named by what its own config has: back at 1420 only the tablet's is off.
        let Reply::NetworkUpdated(back) = c.handle(Request::NetworkUpdate { mtu: 1420 }).unwrap() else { panic!() };
        assert_eq!(back.devices_with_old_mtu, [label("tablet")]);
    }

    #[test]
    fn disabling_rotating_and_rules() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = new_network(dir.path(), "10.77.0.0/16");
        let token = invite(&mut c, "vps", 3600);
        c.redeem(&join_request(&token)).unwrap();
        let (hub, vps) = (label("hub"), label("vps"));
        assert!(matches!(c.handle(Request::NodeDisable { name: hub.clone() }), Err(ControlError::DisableHub(_))));
        assert!(matches!(c.handle(Request::NodeRotate { name: hub.clone() }), Err(ControlError::RotateHub(_))));
        c.handle(Request::NodeDisable { name: vps.clone() }).unwrap();
        assert!(c.snapshot().unwrap().nodes[1].disabled);
        assert!(matches!(c.handle(Request::NodeRotate { name: vps.clone() }), Err(ControlError::NodeDisabled(_))));
        c.handle(Request::NodeEnable { name: vps.clone() }).unwrap();
        c.handle(Request::NodeRotate { name: vps.clone() }).unwrap();
        assert!(c.snapshot().unwrap().nodes[1].rotate_key);
        let new_key = PrivateKey::generate().public_key();
        c.check_node_key(&vps, &new_key).unwrap();
        let hub_key = c.snapshot().unwrap().nodes[0].public_key.clone();
        assert!(matches!(c.check_node_key(&vps, &hub_key), Err(ControlError::KeyTaken(_))));
        c.replace_node_key(&vps, &new_key).unwrap();
        assert!(matches!(c.check_node_key(&vps, &new_key), Err(ControlError::NoRotation(_))));
        let node = c.snapshot().unwrap().nodes[1].clone();
        assert_eq!((node.public_key.as_str(), node.rotate_key), (new_key.as_str(), false));
        // A second offer accepted during that rotation (another session) cannot switch afterwards.
        let stale_offer = PrivateKey::generate().public_key();
        assert!(matches!(c.replace_node_key(&vps, &stale_offer), Err(ControlError::NoRotation(_))));
        assert_eq!(c.snapshot().unwrap().nodes[1].public_key, new_key);

        assert!(matches!(
            c.handle(Request::AccessAllow { from: vps.clone(), to: vps.clone() }),
            Err(ControlError::RuleToSelf)
        ));
        assert!(matches!(
            c.handle(Request::AccessAllow { from: label("ghost"), to: vps.clone() }),
            Err(ControlError::UnknownNode(_))
        ));
        c.handle(Request::AccessAllow { from: hub.clone(), to: vps.clone() }).unwrap();
        c.handle(Request::AccessAllow { from: hub.clone(), to: vps.clone() }).expect("allowing twice is harmless");
        assert_eq!(
            c.handle(Request::AccessList).unwrap(),
            Reply::Rules(vec![AccessRule { from: hub.clone(), to: vps.clone() }])
        );
        c.handle(Request::AccessRevoke { from: hub.clone(), to: vps.clone() }).unwrap();
        assert!(matches!(c.handle(Request::AccessRevoke { from: hub, to: vps }), Err(ControlError::NoRule { .. })));
    }
}
