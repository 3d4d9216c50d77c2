//! The controller: validates requests against the stored network and changes it. Every change to the
//! network enters here, whether it comes over the admin socket or from `meshctl` working offline.
//!
//! [`Controller`] is the one entry point: [`Controller::handle`] carries out an admin request in one
//! transaction of the [`store`]. What each request does is in the module of its concern:
//! `nodes` (invites, joins, removal, disabling, key rotation of member hosts), `devices` (roaming
//! devices and their hand-outs), `services`, `access` (rules between nodes), and `checks` (free names,
//! free keys and the address allocation every new entry goes through).

pub mod store;

mod access;
mod checks;
mod devices;
mod nodes;
mod services;

#[cfg(test)]
mod declare_tests;

use std::path::Path;

use ipnet::Ipv4Net;

use checks::allocate;
use meshd_core::input::{self, HostPort, InterfaceName, Label, PublicName};
use meshd_core::keys::PublicKey;
use meshd_core::model::{Network, NetworkView, Node, Role, Snapshot};
use meshd_core::wire::admin::{NetworkUpdated, Outcome, Reply, Request, StatusView};
use store::{Store, StoreError, Writer};

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
    #[error("service \"{0}\" is UDP: only a TCP service speaking HTTP can be served over HTTPS")]
    NotHttp(Label),
    #[error("service \"{0}\" has public names: it stays TCP (meshctl unexpose them first to make it UDP)")]
    ExposedStaysTcp(Label),
    #[error(
        "\"{0}\" is neither the hub nor a relay: serve public names through the hub or a node that joined with --role relay"
    )]
    NotRelay(Label),
    #[error("\"{0}\" has no endpoint: a relay needs a public address (meshctl node update {0} --endpoint HOST:PORT)")]
    RelayWithoutEndpoint(Label),
    #[error(
        "{hostname} is already served for service \"{service}\" (meshctl unexpose {service} --https {hostname} first)"
    )]
    PublicNameTaken { hostname: PublicName, service: Label },
    #[error("{hostname} is under the mesh's own domain {domain}: a public name must be one the CA can validate")]
    PublicNameInMesh { hostname: PublicName, domain: String },
    #[error("service \"{service}\" is not served on {hostname}")]
    NotExposed { service: Label, hostname: PublicName },
    #[error("service \"{0}\" is UDP: only a TCP service can be an onion service")]
    NotTcpForTor(Label),
    #[error("service \"{0}\" is an onion service: it stays TCP (meshctl unexpose {0} --tor first to make it UDP)")]
    OnionStaysTcp(Label),
    #[error("service \"{0}\" is not an onion service")]
    NotOnion(Label),
    #[error(
        "device \"{device}\" is already a client of {service}'s onion service (meshctl unexpose {service} --tor --client {device} first to give it a new key)"
    )]
    OnionClientTaken { service: Label, device: Label },
    #[error("device \"{device}\" is not a client of {service}'s onion service")]
    NotOnionClient { service: Label, device: Label },
    #[error("device \"{0}\" is named twice")]
    DeviceTwice(Label),
    #[error(
        "{service}'s onion service would have {count} clients: a descriptor holds at most {max} (tor's limit); remove some first"
    )]
    TooManyOnionClients { service: Label, count: usize, max: usize },
    #[error("--allow names no service: give at least one")]
    NothingAllowed,
    #[error("the address pool {0} is exhausted (removed hosts' addresses are reused after a cooldown of an hour)")]
    PoolExhausted(Ipv4Net),
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
    #[error(
        "\"{0}\" is the hub; devices and joining hosts reach it at its endpoint, so it must keep one (give --endpoint HOST:PORT)"
    )]
    HubNeedsEndpoint(Label),
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
    pub hub_public_key: PublicKey,
    pub endpoint: HostPort,
    pub listen_port: u16,
    pub interface: InterfaceName,
    /// The network's MTU, bytes ([`meshd_core::model::MESH_MTU`] unless `--mtu`).
    pub mtu: u16,
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
        input::check_listen_port(new.listen_port)?;
        input::check_mtu(new.mtu)?;
        let mut store = Store::create(db)?;
        let snapshot = store.write(|w| {
            let network = Network {
                name: new.network.clone(),
                domain: new.domain.clone(),
                cidr: new.cidr,
                ula: meshd_core::ipam::random_ula48(),
                mtu: new.mtu,
            };
            w.insert_network(&network)?;
            let index = allocate(w, &network)?;
            w.insert_node(&Node {
                name: new.hub.clone(),
                public_key: new.hub_public_key.clone(),
                index,
                endpoint: Some(new.endpoint.clone()),
                listen_port: new.listen_port,
                interface: new.interface.clone(),
                role: Role::Hub,
                disabled: false,
                rotate_key: false,
                mtu: None,
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
}

/// What the admin API answers for the result of [`Controller::handle`].
pub fn outcome(result: Result<Reply, ControlError>) -> Outcome {
    match result {
        Ok(reply) => Outcome::Ok(Box::new(reply)),
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
                network: network_view(&s),
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
            services::add(w, name, node, target, port, protocol)
        }
        Request::ServiceUpdate { name, target, port, protocol } => services::update(w, name, target, port, protocol),
        Request::ServiceRemove { name } => services::remove(w, name),
        Request::Expose { service, hostname, relay, tls } => services::expose(w, service, hostname, relay, tls),
        Request::Unexpose { service, hostname } => services::unexpose(w, service, hostname),
        Request::ExposeTor { service, port, clients } => services::expose_tor(w, service, port, clients),
        Request::UnexposeTor { service, clients } => services::unexpose_tor(w, service, clients),
        Request::DeviceAdd { name, allow, public_key, expect } => devices::add(w, name, allow, public_key, expect),
        Request::DeviceAllow { name, allow } => devices::allow(w, name, allow),
        Request::DeviceRotate { name, public_key, expect } => devices::rotate(w, name, public_key, expect),
        Request::DeviceRemove { name } => devices::remove(w, name),
        Request::NodeInvite { name, role, expires_secs } => nodes::invite(w, name, role, expires_secs),
        Request::NodeInvites => nodes::pending_invites(w),
        Request::NodeUninvite { name } => nodes::uninvite(w, name),
        Request::NodeRemove { name } => nodes::remove(w, name),
        Request::NodeDisable { name } => nodes::disable(w, name),
        Request::NodeEnable { name } => nodes::enable(w, name),
        Request::NodeRotate { name } => nodes::ask_for_new_key(w, name),
        Request::NodeUpdate { name, endpoint, mtu } => nodes::update(w, name, endpoint, mtu),
        Request::NetworkUpdate { mtu } => network_update(w, mtu),
        Request::AccessAllow { from, to } => access::allow(w, from, to),
        Request::AccessRevoke { from, to } => access::revoke(w, from, to),
        Request::AccessList => Ok(Reply::Rules(w.snapshot()?.rules)),
        Request::Batch { .. } => Err(ControlError::NestedBatch),
        Request::Preview { .. } => Err(ControlError::NestedPreview),
    }
}

/// The network as `meshctl status` shows it.
fn network_view(s: &Snapshot) -> NetworkView {
    NetworkView {
        name: s.network.name.clone(),
        domain: s.network.domain.clone(),
        cidr: s.network.cidr,
        cidr_v6: s.network.pool().v6(),
        mtu: s.network.mtu,
    }
}

/// Set the network's MTU; the reply lists the devices whose config has another one (handed out before a
/// change, and not since).
fn network_update(w: &Writer<'_>, mtu: u16) -> Result<Reply, ControlError> {
    input::check_mtu(mtu)?;
    if mtu != w.snapshot()?.network.mtu {
        w.set_network_mtu(mtu)?;
    }
    let devices_with_old_mtu = w.devices_configured_for_another_mtu(mtu)?;
    Ok(Reply::NetworkUpdated(NetworkUpdated { network: network_view(&w.snapshot()?), devices_with_old_mtu }))
}

/// Networks for tests: a controller over a new network, and hosts invited and joined through it. For this
/// crate's tests and, with the `test-support` feature, other crates'.
#[cfg(any(test, feature = "test-support"))]
pub mod fixtures {
    use super::*;
    use meshd_core::keys::PrivateKey;
    use meshd_core::wire::invite::Token;
    use meshd_core::wire::join::JoinRequest;

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
            interface: "meshd0".parse().expect("a sample interface"),
            mtu: meshd_core::model::MESH_MTU,
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
            interface: "meshd0".parse().expect("a sample interface"),
            mtu: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fixtures::{label, new_network};
    use super::*;
    use meshd_core::keys::PrivateKey;
    use meshd_core::model::Protocol;

    /// Add a TCP service `name` on the hub.
    pub(super) fn add_service(c: &mut Controller, name: &str) -> Result<Reply, ControlError> {
        c.handle(Request::ServiceAdd {
            name: label(name),
            node: label("hub"),
            target: "169.254.1.17:9737".parse().unwrap(),
            port: None,
            protocol: Protocol::Tcp,
        })
    }

    /// Add a device `name` with a fresh key, allowed to reach `allow`.
    pub(super) fn add_device(c: &mut Controller, name: &str, allow: &[&str]) -> Result<Reply, ControlError> {
        c.handle(Request::DeviceAdd {
            name: label(name),
            allow: allow.iter().map(|a| label(a)).collect(),
            public_key: PrivateKey::generate().public_key(),
            expect: None,
        })
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
        // A malformed key cannot reach the controller: the request is refused when read.
        let key = PrivateKey::generate().public_key();
        let add = Request::DeviceAdd {
            name: label("p"),
            allow: vec![label("wallet")],
            public_key: key.clone(),
            expect: None,
        };
        let forged = serde_json::to_string(&add).unwrap().replace(key.as_str(), "junk");
        assert!(serde_json::from_str::<Request>(&forged).is_err());
        assert!(matches!(
            c.handle(Request::DeviceRemove { name: label("ghost") }),
            Err(ControlError::UnknownDevice(_))
        ));
        assert_eq!(c.snapshot().unwrap(), before);
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
