//! The controller: validates requests against the stored network and changes it. Every change to the
//! network enters here, whether it comes over the admin socket or from `meshctl` working offline.

pub mod store;

#[cfg(test)]
mod declare_tests;

use std::net::IpAddr;
use std::path::Path;

use ipnet::{IpNet, Ipv4Net};

use crate::host::clock;
use crate::links::join::JoinIdentity;
use meshd_core::input::{self, HostPort, Label};
use meshd_core::keys;
use meshd_core::model::{
    AccessRule, DEVICE_KEEPALIVE_SECS, Device, Invite, InviteStatus, InviteView, MESH_MTU, Network, NetworkView, Node,
    Protocol, Role, Service, Snapshot,
};
use meshd_core::wire::admin::{
    DeviceHandout, InviteIssued, JoinRequest, MemberState, Outcome, Reply, Request, StatusView,
};
use meshd_core::wire::invite::{self, Token};
use store::{ADDRESS_COOLDOWN, Store, StoreError, Writer};

/// Why the controller refused a request; the message is what the operator sees.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("the name \"{name}\" is already used by a {kind} (node, device and service names share the DNS namespace)")]
    NameTaken { kind: &'static str, name: Label },
    #[error("no node named \"{0}\"")]
    UnknownNode(Label),
    #[error("no device named \"{0}\"")]
    UnknownDevice(Label),
    #[error("no service named \"{0}\"")]
    UnknownService(Label),
    #[error("--allow names no service: give at least one")]
    NothingAllowed,
    #[error("the address pool {0} is exhausted (removed hosts' addresses are reused after a cooldown of an hour)")]
    PoolExhausted(Ipv4Net),
    #[error("public key: {0}")]
    Key(#[from] keys::KeyError),
    #[error("the public key is already used by \"{0}\"")]
    KeyTaken(Label),
    #[error("the network has no hub node")]
    NoHub,
    #[error("a network has one hub; invite with --role node or --role relay")]
    SecondHub,
    #[error("no pending invite for \"{0}\"")]
    NoInvite(Label),
    #[error("\"{0}\" is the hub; it cannot be removed from its own network")]
    RemoveHub(Label),
    #[error("\"{0}\" is the hub; it cannot be disabled")]
    DisableHub(Label),
    #[error("\"{0}\" is the hub; its key is the controller's own (re-run `meshd init` elsewhere to move it)")]
    RotateHub(Label),
    #[error("\"{0}\" is disabled; enable it first")]
    NodeDisabled(Label),
    #[error("\"{0}\" was not asked for a new key")]
    NoRotation(Label),
    #[error("a node cannot be given a rule to itself")]
    RuleToSelf,
    #[error("no rule lets \"{from}\" reach \"{to}\"")]
    NoRule { from: Label, to: Label },
    #[error("this invite token was not issued by this controller (forged, mistyped or from another network)")]
    InviteForged,
    #[error("this invite was already used; ask for a new one")]
    InviteUsed,
    #[error("this invite was cancelled; ask for a new one")]
    InviteCancelled,
    #[error("this invite expired {0} s ago; ask for a new one")]
    InviteExpired(i64),
    #[error("an invite must live between 1 s and 30 days, not {0} s")]
    InviteLifetime(u64),
    #[error("a batch cannot hold another batch")]
    NestedBatch,
    #[error("a preview cannot be part of a batch or of another preview")]
    NestedPreview,
    #[error(
        "the network changed while the config of device \"{0}\" was being written (its address, the hub's key or endpoint); nothing was changed, run the command again"
    )]
    HandoutChanged(Label),
    #[error("the expected hand-out of device \"{0}\" has a malformed preshared key")]
    BadPresharedKey(Label),
    /// Request `index` of a batch was refused (and so the whole batch).
    #[error("{source}")]
    InBatch { index: usize, source: Box<ControlError> },
    #[error("the join certificate: {0}")]
    JoinIdentity(#[from] crate::links::join::JoinError),
    #[error(transparent)]
    Input(#[from] input::InputError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What `meshd init` needs to create a network whose controller and hub is this host.
#[derive(Debug, Clone)]
pub struct NewNetwork {
    pub network: Label,
    pub domain: String,
    pub cidr: Ipv4Net,
    pub hub: Label,
    pub hub_public_key: String,
    pub endpoint: HostPort,
    pub listen_port: u16,
    pub interface: String,
}

/// The controller over one network's store.
pub struct Controller {
    store: Store,
}

impl Controller {
    /// Create the network in a new database at `db` and make this host its hub (first address).
    pub fn init(db: &Path, new: &NewNetwork) -> Result<(Controller, Snapshot), ControlError> {
        input::check_dns_name(&format!("{}.{}", new.hub, new.domain))?;
        input::check_endpoint(&new.endpoint)?;
        let mut store = Store::create(db)?;
        let snapshot = store.write(|w| {
            let network = Network {
                name: new.network.clone(),
                domain: new.domain.clone(),
                cidr: new.cidr,
                ula: meshd_core::ipam::random_ula48(),
            };
            w.insert_network(&network)?;
            let index = allocate(w, &network)?;
            w.insert_node(&Node {
                name: new.hub.clone(),
                public_key: keys::parse_public_key(&new.hub_public_key)?,
                index,
                endpoint: Some(new.endpoint.clone()),
                listen_port: new.listen_port,
                interface: new.interface.clone(),
                role: Role::Hub,
                disabled: false,
                rotate_key: false,
            })?;
            Ok::<_, ControlError>(w.snapshot()?)
        })?;
        Ok((Controller { store }, snapshot))
    }

    /// Open the network stored at `db`.
    pub fn open(db: &Path) -> Result<Controller, ControlError> {
        Ok(Controller { store: Store::open(db)? })
    }

    /// The network as stored now.
    pub fn snapshot(&mut self) -> Result<Snapshot, ControlError> {
        Ok(self.store.snapshot()?)
    }

    /// Carry out one admin request (a batch: all of its requests in one transaction, or none).
    pub fn handle(&mut self, request: Request) -> Result<Reply, ControlError> {
        match request {
            Request::Preview { request } => match *request {
                Request::Preview { .. } => Err(ControlError::NestedPreview),
                request => self.store.preview(|w| carry_out_whole(w, request)),
            },
            request => self.store.write(|w| carry_out_whole(w, request)),
        }
    }

    /// Whether `public_key` may become the key of member `name`, which was asked for a new one.
    pub fn check_node_key(&mut self, name: &Label, public_key: &str) -> Result<(), ControlError> {
        let public_key = keys::parse_public_key(public_key)?;
        let s = self.snapshot()?;
        if !member(&s, name)?.rotate_key {
            return Err(ControlError::NoRotation(name.clone()));
        }
        ensure_key_free(&s, &public_key)
    }

    /// A member host made the new key it was asked for: the network knows it by that key from now on.
    pub fn replace_node_key(&mut self, name: &Label, public_key: &str) -> Result<(), ControlError> {
        let public_key = keys::parse_public_key(public_key)?;
        self.store.write(|w| {
            let s = w.snapshot()?;
            member(&s, name)?;
            ensure_key_free(&s, &public_key)?;
            w.set_node_key(name, &public_key)?;
            Ok(())
        })
    }

    /// Redeem an invite for a joining host: one transaction, so of two hosts racing on one token
    /// exactly one becomes the node.
    pub fn redeem(&mut self, request: &JoinRequest) -> Result<MemberState, ControlError> {
        let public_key = keys::parse_public_key(&request.public_key)?;
        // The joining host's word for where it is goes into every other host's config.
        if let Some(endpoint) = &request.endpoint {
            input::check_endpoint(endpoint)?;
        }
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
            })?;
            Ok(MemberState { me: invite.name, state: w.snapshot()?.shared() })
        })
    }

    /// The TLS identity joining hosts pin (made on first use).
    pub fn join_identity(&mut self) -> Result<JoinIdentity, ControlError> {
        self.store.write(join_identity)
    }
}

/// What the admin API answers for the result of [`Controller::handle`].
pub fn outcome(result: Result<Reply, ControlError>) -> Outcome {
    match result {
        Ok(reply) => Outcome::Ok(reply),
        Err(ControlError::InBatch { index, source }) => Outcome::BatchRefused { index, error: source.to_string() },
        Err(e @ ControlError::HandoutChanged(_)) => Outcome::Stale(e.to_string()),
        Err(e) => Outcome::Error(e.to_string()),
    }
}

/// Carry out a request, a batch as a whole, inside the caller's write transaction.
fn carry_out_whole(w: &Writer<'_>, request: Request) -> Result<Reply, ControlError> {
    match request {
        Request::Batch { requests } => {
            let carried = requests.into_iter().enumerate().map(|(index, request)| {
                carry_out(w, request).map_err(|e| ControlError::InBatch { index, source: Box::new(e) })
            });
            Ok(Reply::Batch(carried.collect::<Result<_, _>>()?))
        }
        request => carry_out(w, request),
    }
}

/// Carry out one request inside the caller's write transaction.
fn carry_out(w: &Writer<'_>, request: Request) -> Result<Reply, ControlError> {
    match request {
        Request::Status => {
            let s = w.snapshot()?;
            Ok(Reply::Status(StatusView {
                network: NetworkView {
                    name: s.network.name.clone(),
                    domain: s.network.domain.clone(),
                    cidr: s.network.cidr,
                    cidr_v6: s.network.pool().v6(),
                },
                nodes: s.nodes.iter().map(|n| s.node_view(n)).collect(),
                devices: s.devices.iter().map(|d| s.device_view(d)).collect(),
                services: s.services.iter().map(|v| s.service_view(v)).collect(),
            }))
        }
        Request::NodeList => {
            let s = w.snapshot()?;
            Ok(Reply::Nodes(s.nodes.iter().map(|n| s.node_view(n)).collect()))
        }
        Request::ServiceList => {
            let s = w.snapshot()?;
            Ok(Reply::Services(s.services.iter().map(|v| s.service_view(v)).collect()))
        }
        Request::DeviceList => {
            let s = w.snapshot()?;
            Ok(Reply::Devices(s.devices.iter().map(|d| s.device_view(d)).collect()))
        }
        Request::ServiceAdd { name, node, target, port, protocol } => {
            add_service(w, name, node, target, port, protocol)
        }
        Request::ServiceRemove { name } => match w.delete_service(&name)? {
            true => Ok(Reply::Removed),
            false => Err(ControlError::UnknownService(name)),
        },
        Request::DeviceAdd { name, allow, public_key, expect } => add_device(w, name, allow, &public_key, expect),
        Request::DeviceRemove { name } => match w.delete_device(&name)? {
            true => Ok(Reply::Removed),
            false => Err(ControlError::UnknownDevice(name)),
        },
        Request::DeviceRotate { name, public_key, expect } => rotate_device(w, name, &public_key, expect),
        Request::NodeInvite { name, role, expires_secs } => invite(w, name, role, expires_secs),
        Request::NodeInvites => {
            // When each expires, by this host's wall clock now: real time left, from now.
            let now = clock::now();
            let pending =
                w.pending_invites()?.into_iter().map(|i| (i.seconds_left(&now), i)).filter(|(left, _)| *left > 0);
            Ok(Reply::Invites(
                pending
                    .map(|(left, i)| InviteView { name: i.name, role: i.role, expires_at: now.wall + left })
                    .collect(),
            ))
        }
        Request::NodeUninvite { name } => {
            let invite = w.pending_invites()?.into_iter().find(|i| i.name == name);
            let invite = invite.ok_or(ControlError::NoInvite(name))?;
            w.finish_invite(&invite.id, InviteStatus::Cancelled)?;
            Ok(Reply::Removed)
        }
        Request::NodeRemove { name } => {
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
        Request::NodeDisable { name } => {
            if member(&w.snapshot()?, &name)?.role == Role::Hub {
                return Err(ControlError::DisableHub(name));
            }
            w.set_node_disabled(&name, true)?;
            Ok(Reply::Done)
        }
        Request::NodeEnable { name } => {
            member(&w.snapshot()?, &name)?;
            w.set_node_disabled(&name, false)?;
            Ok(Reply::Done)
        }
        Request::NodeRotate { name } => {
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
        Request::AccessAllow { from, to } => {
            let s = w.snapshot()?;
            member(&s, &from)?;
            member(&s, &to)?;
            if from == to {
                return Err(ControlError::RuleToSelf);
            }
            w.insert_rule(&AccessRule { from, to })?;
            Ok(Reply::Done)
        }
        Request::AccessRevoke { from, to } => {
            let rule = AccessRule { from, to };
            match w.delete_rule(&rule)? {
                true => Ok(Reply::Done),
                false => Err(ControlError::NoRule { from: rule.from, to: rule.to }),
            }
        }
        Request::AccessList => Ok(Reply::Rules(w.snapshot()?.rules)),
        Request::DeviceAllow { name, allow } => {
            let allow = checked_allow(allow)?;
            let s = w.snapshot()?;
            if !s.devices.iter().any(|d| d.name == name) {
                return Err(ControlError::UnknownDevice(name));
            }
            ensure_services_exist(&s, &allow)?;
            w.set_device_grants(&name, &allow)?;
            Ok(Reply::Done)
        }
        Request::ServiceUpdate { name, target, port, protocol } => {
            let s = w.snapshot()?;
            let mut service =
                s.services.iter().find(|v| v.name == name).cloned().ok_or(ControlError::UnknownService(name))?;
            service.port = port.unwrap_or(target.port());
            service.target = target;
            service.protocol = protocol.unwrap_or(service.protocol);
            w.update_service(&service)?;
            Ok(Reply::Service(s.service_view(&service)))
        }
        Request::Batch { .. } => Err(ControlError::NestedBatch),
        Request::Preview { .. } => Err(ControlError::NestedPreview),
    }
}

fn invite(w: &Writer<'_>, name: Label, role: Role, expires_secs: u64) -> Result<Reply, ControlError> {
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
        let token =
            Token { v: 1, network: s.network.name.to_string(), join, fingerprint: identity.fingerprint(), id, secret };
        Ok(Reply::Invite(InviteIssued { invite: InviteView { name, role, expires_at }, token: token.encode() }))
    }
}

fn rotate_device(
    w: &Writer<'_>,
    name: Label,
    public_key: &str,
    expect: Option<Box<DeviceHandout>>,
) -> Result<Reply, ControlError> {
    let public_key = keys::parse_public_key(public_key)?;
    {
        let s = w.snapshot()?;
        let preshared_key = preshared_key_for(&name, expect.as_deref())?;
        let mut device = s.devices.iter().find(|d| d.name == name).cloned().ok_or(ControlError::UnknownDevice(name))?;
        ensure_key_free(&s, &public_key)?;
        let hub = s.hub().ok_or(ControlError::NoHub)?;
        device.public_key = public_key;
        device.preshared_key = preshared_key;
        w.update_device_keys(&device)?;
        expected(handout(&s, hub, &device), expect.as_deref())
    }
}

/// The preshared key of a device being added or rotated: the one of the hand-out the caller previewed
/// and wrote out, else a new one.
fn preshared_key_for(name: &Label, expect: Option<&DeviceHandout>) -> Result<String, ControlError> {
    match expect {
        Some(h) => keys::parse_preshared_key(&h.preshared_key).map_err(|_| ControlError::BadPresharedKey(name.clone())),
        None => Ok(keys::generate_preshared_key()),
    }
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

fn add_service(
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

fn add_device(
    w: &Writer<'_>,
    name: Label,
    allow: Vec<Label>,
    public_key: &str,
    expect: Option<Box<DeviceHandout>>,
) -> Result<Reply, ControlError> {
    let public_key = keys::parse_public_key(public_key)?;
    let allow = checked_allow(allow)?;
    let preshared_key = preshared_key_for(&name, expect.as_deref())?;
    {
        let s = w.snapshot()?;
        ensure_name_free(w, &s, &name)?;
        ensure_services_exist(&s, &allow)?;
        ensure_key_free(&s, &public_key)?;
        let hub = s.hub().ok_or(ControlError::NoHub)?;
        let index = allocate(w, &s.network)?;
        let device = Device { name, public_key, preshared_key, index, allow };
        w.insert_device(&device)?;
        expected(handout(&s, hub, &device), expect.as_deref())
    }
}

/// Everything a device's config needs from the network, for `meshctl` to render.
fn handout(s: &Snapshot, hub: &Node, device: &Device) -> DeviceHandout {
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
        mtu: MESH_MTU,
        hub_public_key: hub.public_key.clone(),
        preshared_key: device.preshared_key.clone(),
        endpoint: hub.endpoint.as_ref().map(ToString::to_string).unwrap_or_default(),
        allowed_ips: vec![IpNet::V4(pool.v4()), IpNet::V6(pool.v6())],
        persistent_keepalive: DEVICE_KEEPALIVE_SECS,
    }
}

fn join_identity(w: &Writer<'_>) -> Result<JoinIdentity, ControlError> {
    if let Some((cert, key)) = w.join_identity()? {
        return Ok(JoinIdentity::from_der(cert, key)?);
    }
    let identity = JoinIdentity::generate()?;
    w.insert_join_identity(identity.cert_der(), identity.key_der())?;
    Ok(identity)
}

/// The node named `name`.
fn member<'s>(s: &'s Snapshot, name: &Label) -> Result<&'s Node, ControlError> {
    s.nodes.iter().find(|n| &n.name == name).ok_or_else(|| ControlError::UnknownNode(name.clone()))
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

fn ensure_services_exist(s: &Snapshot, allow: &[Label]) -> Result<(), ControlError> {
    match allow.iter().find(|a| !s.services.iter().any(|svc| &svc.name == *a)) {
        Some(unknown) => Err(ControlError::UnknownService(unknown.clone())),
        None => Ok(()),
    }
}

/// A key may belong to one node or device only.
fn ensure_key_free(s: &Snapshot, public_key: &str) -> Result<(), ControlError> {
    let holders =
        s.nodes.iter().map(|n| (&n.name, &n.public_key)).chain(s.devices.iter().map(|d| (&d.name, &d.public_key)));
    match holders.into_iter().find(|(_, k)| *k == public_key) {
        Some((owner, _)) => Err(ControlError::KeyTaken(owner.clone())),
        None => Ok(()),
    }
}

/// A new name must be free and, under the network's domain, a name DNS can carry.
fn ensure_name_free(w: &Writer<'_>, s: &Snapshot, name: &Label) -> Result<(), ControlError> {
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
fn allocate(w: &Writer<'_>, network: &Network) -> Result<u32, ControlError> {
    let pool = network.pool();
    let unavailable = w.unavailable_indexes(ADDRESS_COOLDOWN, &clock::now())?;
    let index = pool.first_free(&unavailable).ok_or(ControlError::PoolExhausted(network.cidr))?;
    w.take_index(index)?;
    Ok(index)
}

/// Networks for tests: a controller over a new network, and hosts invited and joined through it. For this
/// crate's tests and, with the `test-support` feature, other crates'.
#[cfg(any(test, feature = "test-support"))]
pub mod fixtures {
    use super::*;
    use meshd_core::keys::PrivateKey;

    pub use meshd_core::fixtures::label;

    /// A new network `home` (domain `home.internal`, hub `hub`) in `dir`.
    pub fn new_network(dir: &Path, cidr: &str) -> Controller {
        let new = NewNetwork {
            network: label("home"),
            domain: "home.internal".into(),
            cidr: cidr.parse().expect("a sample range"),
            hub: label("hub"),
            hub_public_key: PrivateKey::generate().public_key(),
            endpoint: "203.0.113.5:51820".parse().expect("a sample endpoint"),
            listen_port: 51820,
            interface: "meshd0".into(),
        };
        Controller::init(&dir.join("meshd.db"), &new).expect("a new network").0
    }

    /// Invite `name` as a node.
    pub fn invite(c: &mut Controller, name: &str, expires_secs: u64) -> Token {
        invite_as(c, name, Role::Node, expires_secs)
    }

    pub fn invite_as(c: &mut Controller, name: &str, role: Role, expires_secs: u64) -> Token {
        let reply = c.handle(Request::NodeInvite { name: label(name), role, expires_secs }).expect("an invite");
        let Reply::Invite(issued) = reply else { panic!("{reply:?}") };
        Token::decode(&issued.token).expect("a token")
    }

    /// What a host with a fresh key and an endpoint sends to redeem `token`.
    pub fn join_request(token: &Token) -> JoinRequest {
        JoinRequest {
            id: token.id.clone(),
            secret: token.secret.clone(),
            public_key: PrivateKey::generate().public_key(),
            endpoint: Some("198.51.100.7:51820".parse().expect("a sample endpoint")),
            listen_port: 51820,
            interface: "meshd0".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fixtures::{invite, join_request, label, new_network};
    use super::*;
    use meshd_core::keys::PrivateKey;

    fn add_service(c: &mut Controller, name: &str) -> Result<Reply, ControlError> {
        c.handle(Request::ServiceAdd {
            name: label(name),
            node: label("hub"),
            target: "169.254.1.17:9737".parse().unwrap(),
            port: None,
            protocol: Protocol::Tcp,
        })
    }

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

    fn add_device(c: &mut Controller, name: &str, allow: &[&str]) -> Result<Reply, ControlError> {
        c.handle(Request::DeviceAdd {
            name: label(name),
            allow: allow.iter().map(|a| label(a)).collect(),
            public_key: PrivateKey::generate().public_key(),
            expect: None,
        })
    }

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
    fn a_batch_is_carried_out_whole_or_not_at_all() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = new_network(dir.path(), "10.77.0.0/16");
        let service = |name: &str| Request::ServiceAdd {
            name: label(name),
            node: label("hub"),
            target: "127.0.0.1:9737".parse().unwrap(),
            port: None,
            protocol: Protocol::Tcp,
        };
        let device = |name: &str, allow: &str| Request::DeviceAdd {
            name: label(name),
            allow: vec![label(allow)],
            public_key: PrivateKey::generate().public_key(),
            expect: None,
        };

        // The third request refers to a service nobody adds: nothing of the batch stays, not even the
        // addresses the first two took.
        let before = c.snapshot().unwrap();
        let refused = c.handle(Request::Batch {
            requests: vec![service("wallet"), device("phone", "wallet"), device("tab", "nope")],
        });
        let Err(ControlError::InBatch { index: 2, source }) = refused else { panic!("{refused:?}") };
        assert!(matches!(*source, ControlError::UnknownService(_)), "{source:?}");
        assert_eq!(c.snapshot().unwrap(), before);

        // Requests see the effects of the ones before them; replies come in order.
        let Reply::Batch(replies) = c
            .handle(Request::Batch {
                requests: vec![service("wallet"), device("phone", "wallet"), Request::ServiceList],
            })
            .unwrap()
        else {
            panic!("a batch answers with a batch")
        };
        assert!(matches!(&replies[0], Reply::Service(v) if v.mesh_address == "10.77.0.2:9737"), "{replies:?}");
        assert!(matches!(&replies[1], Reply::DeviceHandout(h) if h.device.address.to_string() == "10.77.0.3"));
        assert!(matches!(&replies[2], Reply::Services(list) if list.len() == 1));

        let nested = c.handle(Request::Batch { requests: vec![Request::Batch { requests: Vec::new() }] });
        assert!(
            matches!(nested, Err(ControlError::InBatch { index: 0, source }) if matches!(*source, ControlError::NestedBatch))
        );
        assert!(Request::Batch { requests: vec![Request::NodeList, service("x")] }.is_change());
        assert!(!Request::Batch { requests: vec![Request::NodeList] }.is_change());
    }

    #[test]
    fn refuses_bad_requests_without_changing_anything() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = new_network(dir.path(), "10.9.9.0/29");
        add_service(&mut c, "wallet").unwrap();
        let before = c.snapshot().unwrap();
        assert!(matches!(add_service(&mut c, "wallet"), Err(ControlError::NameTaken { kind: "service", .. })));
        assert!(matches!(add_service(&mut c, "hub"), Err(ControlError::NameTaken { kind: "node", .. })));
        assert!(matches!(add_device(&mut c, "p", &["nope"]), Err(ControlError::UnknownService(_))));
        assert!(matches!(add_device(&mut c, "p", &[]), Err(ControlError::NothingAllowed)));
        assert!(matches!(
            c.handle(Request::DeviceAdd {
                name: label("p"),
                allow: vec![label("wallet")],
                public_key: "junk".into(),
                expect: None
            }),
            Err(ControlError::Key(_))
        ));
        assert!(matches!(
            c.handle(Request::DeviceRemove { name: label("ghost") }),
            Err(ControlError::UnknownDevice(_))
        ));
        assert_eq!(c.snapshot().unwrap(), before);
    }

    #[test]
    fn rotation_replaces_keys_and_keeps_address_and_grants() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = new_network(dir.path(), "10.77.0.0/16");
        add_service(&mut c, "wallet").unwrap();
        let Reply::DeviceHandout(before) = add_device(&mut c, "phone", &["wallet"]).unwrap() else { panic!() };
        let new_key = PrivateKey::generate().public_key();
        let rotate = |c: &mut Controller, name: &str, key: &str| {
            c.handle(Request::DeviceRotate { name: label(name), public_key: key.to_owned(), expect: None })
        };
        let Reply::DeviceHandout(after) = rotate(&mut c, "phone", &new_key).unwrap() else { panic!() };
        assert_eq!(after.device.public_key, new_key);
        assert_ne!(after.preshared_key, before.preshared_key, "a new preshared key too");
        assert_eq!(after.addresses, before.addresses);
        assert_eq!(after.device.allow, before.device.allow);
        let stored = c.snapshot().unwrap();
        assert_eq!(stored.devices[0].public_key, new_key);

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
            stored.devices.iter().find(|d| d.name.as_str() == "phone").unwrap().preshared_key,
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
            c.snapshot().unwrap().devices.iter().find(|d| d.name.as_str() == "phone").unwrap().public_key,
            new_key
        );

        let mut forged = previewed;
        forged.preshared_key = "junk".into();
        assert!(matches!(c.handle(rotate(Some(forged))), Err(ControlError::BadPresharedKey(_))));
        let nested = Request::Preview { request: Box::new(Request::Preview { request: Box::new(Request::NodeList) }) };
        assert!(matches!(c.handle(nested), Err(ControlError::NestedPreview)));
        let in_batch = Request::Batch { requests: vec![Request::Preview { request: Box::new(Request::NodeList) }] };
        assert!(matches!(c.handle(in_batch), Err(ControlError::InBatch { index: 0, .. })));
        assert!(!Request::Preview { request: Box::new(add(None)) }.is_change(), "a preview changes nothing");
    }

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
        forged.secret = "0".repeat(32);
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
        assert!(matches!(c.replace_node_key(&vps, &new_key), Err(ControlError::KeyTaken(_))));

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

    #[test]
    fn refuses_a_foreign_database_without_touching_it() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("meshd.db");
        std::fs::write(&db, b"not a database at all, just bytes").unwrap();
        assert!(matches!(Controller::open(&db), Err(ControlError::Store(StoreError::Foreign(_)))));
        assert_eq!(std::fs::read(&db).unwrap(), b"not a database at all, just bytes");
        let other = dir.path().join("other.db");
        rusqlite::Connection::open(&other).unwrap().execute_batch("CREATE TABLE t (x);").unwrap();
        let before = std::fs::read(&other).unwrap();
        assert!(matches!(Controller::open(&other), Err(ControlError::Store(StoreError::Foreign(_)))));
        assert_eq!(std::fs::read(&other).unwrap(), before);
    }
}
