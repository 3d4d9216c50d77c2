//! The executor: carries out the host steps of [`meshd_core::reconcile`] against the host edges (the
//! WireGuard interface, nftables, the forwarders, the mesh DNS), in the order given, and keeps what it
//! built in a [`Host`]. The one place where the daemon touches the host for the mesh.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, Mutex};

use anyhow::anyhow;
use ipnet::IpNet;
use tokio::sync::watch;
use tracing::{debug, error, info, warn};

use super::paths::{LastHeard, PathKeeper};
use super::rules::RulesKeeper;
use crate::host::dns::{self, DnsError, MeshDns};
use crate::host::firewall;
use crate::host::forward::Forwarders;
use crate::host::statedir::StateDir;
use crate::host::tor::Tor;
use crate::host::wg::{Backend, Interface, WgError};
use crate::relay::Public;
use meshd_core::keys::{PrivateKey, PublicKey};
use meshd_core::model::Snapshot;
use meshd_core::plan::dns::DNS_PORT;
use meshd_core::plan::{self, DnsPlan, HostPlan, OnionPlan, PeerPlan, nftables};
use meshd_core::reconcile::{self, HostStep};

/// Where upstream resolvers are read from.
const RESOLV_CONF: &str = "/etc/resolv.conf";

/// How often a change that failed part way is carried out again.
pub(super) const APPLY_RETRY: std::time::Duration = std::time::Duration::from_secs(2);

/// Everything this host runs for the mesh, as far as it is built.
pub(super) struct Host {
    /// This host's node name.
    pub(super) name: String,
    /// The port the mesh DNS listens on, on this host's mesh addresses.
    dns_port: u16,
    /// The plan the host matches (as far as the steps carried out got).
    pub(super) plan: HostPlan,
    state: StateDir,
    backend: Backend,
    key: PrivateKey,
    /// The access rules, kept in force.
    rules: RulesKeeper,
    rules_loaded: bool,
    /// Brought up whole: a later failure to enable forwarding only costs relaying.
    up: bool,
    /// The last change failed part way: it is carried out again (see [`Host::unapplied`]).
    unapplied: bool,
    interface: Option<Arc<Mutex<Interface>>>,
    forwarders: Forwarders,
    dns: Option<MeshDns>,
    paths: Option<PathKeeper>,
    /// Public names this host serves (relay) or terminates TLS for.
    pub(super) public: Public,
    /// The onion services of this host's services, and the tor that serves them.
    pub(super) tor: Tor,
    /// Why the onion services could not be served (no tor, one too old), as last logged. The rest of the host
    /// does not wait for them: they are tried again every [`APPLY_RETRY`] (see [`Host::unapplied`]).
    onion_error: Option<String>,
}

impl Host {
    /// A host with nothing built yet, that will run `plan` with `key` on `backend`. Errors: the public names'
    /// TLS configuration could not be made.
    pub(super) fn new(
        state: &StateDir,
        name: String,
        plan: HostPlan,
        key: &PrivateKey,
        options: &super::RunOptions,
    ) -> anyhow::Result<Host> {
        Ok(Host {
            name,
            dns_port: options.dns_port,
            rules: RulesKeeper::start(&plan.interface),
            plan,
            state: state.clone(),
            backend: options.backend,
            key: key.clone(),
            rules_loaded: false,
            up: false,
            unapplied: false,
            onion_error: None,
            interface: None,
            forwarders: Forwarders::default(),
            dns: None,
            paths: None,
            public: Public::new(options.public.clone(), state)?,
            tor: Tor::new(options.tor.clone(), state),
        })
    }

    /// Turns true when the embedded WireGuard device stops by itself (it takes SIGTERM and SIGINT too).
    pub(super) fn stopped(&self) -> anyhow::Result<watch::Receiver<bool>> {
        Ok(self.interface()?.lock().map_err(|_| anyhow!("interface lock poisoned"))?.stopped())
    }

    fn interface(&self) -> anyhow::Result<&Arc<Mutex<Interface>>> {
        self.interface.as_ref().ok_or_else(|| anyhow!("the interface is not up"))
    }

    /// Bring the host up to its plan from nothing ([`reconcile::bring_up`]); on failure, take down
    /// whatever was built.
    pub(super) async fn bring_up(mut self) -> anyhow::Result<Host> {
        let plan = self.plan.clone();
        match self.execute(&plan, reconcile::bring_up(&plan)).await {
            Ok(_) => {
                self.up = true;
                if self.onion_error.is_some() {
                    self.plan.onions = OnionPlan::default();
                }
                Ok(self)
            }
            Err(e) => {
                self.shut_down().await;
                Err(e)
            }
        }
    }

    /// Make the host match the network in `snapshot`, touching only what changed. Returns the peers
    /// added or replaced that this host can open a tunnel to (they have an endpoint), by key.
    pub(super) async fn reconcile(&mut self, snapshot: &Snapshot) -> anyhow::Result<Vec<(PublicKey, PeerPlan)>> {
        let new = plan_host(snapshot, &self.name, self.dns_port)?;
        let steps = reconcile::steps(&self.plan, &new);
        let onions = self.plan.onions.clone();
        let executed = self.execute(&new, steps).await;
        self.unapplied = executed.is_err();
        let renewable = executed?;
        self.plan = new;
        if self.onion_error.is_some() {
            if self.plan.onions.is_empty() {
                // Nothing left to serve: nothing left to fail.
                self.onion_error = None;
                let _ = self.tor.apply(&OnionPlan::default()).await;
            } else {
                // Not served: the next try plans them again.
                self.plan.onions = onions;
            }
        }
        Ok(renewable)
    }

    /// Whether the last change failed part way (its rules did not load, a peer could not be set): the
    /// daemon carries it out again every [`APPLY_RETRY`] until it succeeds, rather than leaving the rest of
    /// it for the next change. The steps already done are not repeated (the plan the host matches is
    /// kept step by step).
    pub(super) fn unapplied(&self) -> bool {
        self.unapplied || self.onion_error.is_some()
    }

    /// Carry out `steps` toward `new`, in order; the first failure stops them. Returns the peers that
    /// were added or replaced and can be reached.
    async fn execute(&mut self, new: &HostPlan, steps: Vec<HostStep>) -> anyhow::Result<Vec<(PublicKey, PeerPlan)>> {
        let mut renewable = Vec::new();
        for step in steps {
            match step {
                HostStep::LoadRules(script) => {
                    let first = !self.rules_loaded;
                    self.rules.load(&script).await.map_err(|e| rules_error(e, first))?;
                    self.rules_loaded = true;
                }
                HostStep::CreateInterface => self.create_interface().await?,
                HostStep::EnableForwarding => {
                    // Without forwarding the host only fails to relay; the rest of a change still applies.
                    match self.on_interface(Interface::enable_forwarding).await {
                        Err(e) if self.up => {
                            error!(error = format!("{e:#}"), "cannot relay: enabling forwarding failed")
                        }
                        result => result?,
                    }
                }
                HostStep::SetMtu(mtu) => {
                    self.on_interface(move |interface| interface.set_mtu(mtu)).await?;
                }
                HostStep::AddAddresses(add) => {
                    self.on_interface(move |interface| interface.change_addresses(&add, &[])).await?;
                    self.rules.set_addresses(new.addresses.iter().copied());
                }
                HostStep::ChangePeers(diff) => {
                    let reachable = self.on_interface(move |interface| interface.apply_peers(&diff)).await?;
                    renewable = reachable
                        .into_iter()
                        .filter_map(|key| new.peers.get(&key).cloned().map(|peer| (key, peer)))
                        .collect();
                    // The interface has them now: should a later step fail, the next change must not add
                    // them again.
                    self.plan.peers = new.peers.clone();
                    if let Some(paths) = &self.paths {
                        paths.set_peers(&new.peers);
                    }
                }
                HostStep::RunForwarders(services) => self.forwarders.apply(&services)?,
                HostStep::StartDns => self.start_dns(&new.dns).await?,
                HostStep::ServePublic(public) => {
                    self.public.apply(&public)?;
                    self.plan.public = public;
                }
                // A host without a usable tor keeps its mesh; its report tells the hub why (`service list`).
                HostStep::ServeOnions(onions) => match self.tor.apply(&onions).await {
                    Ok(()) => {
                        if self.onion_error.take().is_some() {
                            info!("serving the onion services now");
                        }
                        self.plan.onions = onions;
                    }
                    Err(e) => {
                        let text = format!("{e:#}");
                        if self.onion_error.as_ref() != Some(&text) {
                            error!(error = %text, "cannot serve the onion services; trying again every 2 s");
                        }
                        self.onion_error = Some(text);
                    }
                },
                HostStep::UpdateDns(records) => {
                    if let Some(server) = &self.dns {
                        server.update(records).await;
                    }
                }
                HostStep::RemoveAddresses(remove) => {
                    // Forgotten first, so the rules keeper's check does not put them back meanwhile.
                    self.rules.set_addresses(new.addresses.iter().copied());
                    self.on_interface(move |interface| interface.change_addresses(&[], &remove)).await?;
                }
            }
        }
        Ok(renewable)
    }

    async fn create_interface(&mut self) -> anyhow::Result<()> {
        let last_seen = self.state.read_peer_endpoints();
        let (plan, key, backend, seen) = (self.plan.clone(), self.key.clone(), self.backend, last_seen.clone());
        let interface = tokio::task::spawn_blocking(move || Interface::create(backend, &plan, &key, &seen)).await??;
        let interface = Arc::new(Mutex::new(interface));
        self.rules.set_interface(interface.clone());
        self.rules.set_addresses(self.plan.addresses.iter().copied());
        // The mesh's ranges: the interface's own addresses carry the mesh prefixes.
        let mesh = self.plan.addresses.iter().map(IpNet::trunc).collect();
        self.paths = Some(PathKeeper::start(&self.state, interface.clone(), last_seen, self.plan.peers.clone(), mesh));
        self.interface = Some(interface);
        Ok(())
    }

    async fn start_dns(&mut self, plan: &DnsPlan) -> anyhow::Result<()> {
        let own: Vec<IpAddr> = plan.listen.iter().map(|a| a.ip()).collect();
        let upstreams = dns::upstreams_from_resolv_conf(Path::new(RESOLV_CONF), &own);
        if upstreams.is_empty() {
            warn!("no upstream resolvers in {RESOLV_CONF}: the mesh DNS will answer only names of the mesh");
        }
        match MeshDns::start(&plan.listen, &plan.domain, &plan.reverse, plan.records.clone(), upstreams).await {
            Ok(server) => self.dns = Some(server),
            // Devices are told to use the hub's DNS: without it they lose names, so the hub does not run without.
            Err(e) if !plan.clients.is_empty() => return Err(dns_start_error(e, plan)),
            // A member's DNS is a convenience for the host itself; another DNS server on port 53 of every
            // address (dnsmasq, Pi-hole) must not keep the host out of the mesh.
            Err(e) => warn!(
                error = %e,
                "no mesh DNS on this host: mesh names resolve through the hub's DNS only (with another DNS server on port 53, run with --dns-port)"
            ),
        }
        Ok(())
    }

    /// Run `f` on the interface, off the async runtime (the WireGuard API blocks).
    pub(super) async fn on_interface<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Interface) -> Result<T, WgError> + Send + 'static,
    ) -> anyhow::Result<T> {
        on_interface(self.interface()?, f).await
    }

    /// The private key the interface uses.
    pub(super) fn key(&self) -> &PrivateKey {
        &self.key
    }

    /// Switch the interface to `key` (a member's key rotation: not a step of a plan, since plans hold no
    /// private key; the member's state machine decides when).
    pub(super) async fn use_key(&mut self, key: &PrivateKey) -> anyhow::Result<()> {
        let new = key.clone();
        self.on_interface(move |interface| interface.set_private_key(&new)).await?;
        self.key = key.clone();
        Ok(())
    }

    /// Open the tunnels to every peer whose endpoint the interface knows (configured, learned, or
    /// remembered from before a restart); a peer behind NAT that was never seen is left to open its side
    /// itself.
    pub(super) async fn open_known_tunnels(&self) {
        match self.on_interface(Interface::endpoints).await {
            Ok(known) => {
                open_tunnels(self.plan.peers.iter().filter(|(key, _)| known.contains_key(*key)).map(|(_, p)| p));
            }
            Err(e) => debug!(error = format!("{e:#}"), "reading peer endpoints"),
        }
    }

    /// When each peer was last heard from, unix seconds, by public key (empty before the interface is up).
    pub(super) fn last_heard(&self) -> LastHeard {
        self.paths.as_ref().map(PathKeeper::last_heard).unwrap_or_default()
    }

    /// Take down what was built: tor, the watch over paths, forwarders, DNS, interface, then the access rules.
    pub(super) async fn shut_down(self) {
        let Host { plan, interface, forwarders, dns, paths, rules, rules_loaded, tor, .. } = self;
        tor.shut_down().await;
        if let Some(paths) = paths {
            paths.finish().await;
        }
        rules.finish().await;
        drop(forwarders);
        if let Some(dns) = dns {
            dns.shutdown().await;
        }
        // Dropping the last handle takes the interface down (off the runtime: it joins device threads);
        // the access rules go only after it.
        let _ = tokio::task::spawn_blocking(move || drop(interface)).await;
        if rules_loaded && let Err(e) = firewall::remove(&plan.interface).await {
            warn!(error = %e, "removing access rules");
        }
    }
}

/// The first load of the access rules failing for lack of privileges says how to run meshd.
fn rules_error(e: firewall::FirewallError, first: bool) -> anyhow::Error {
    let e = anyhow::Error::new(e);
    if !first {
        e.context("updating access rules")
    } else if format!("{e:#}").contains("Operation not permitted") {
        e.context("installing access rules needs root (or CAP_NET_ADMIN): run meshd run as root")
    } else {
        e.context("installing access rules")
    }
}

/// This host's plan, with the mesh DNS on `dns_port` (a setting of this host, not of the network).
pub(super) fn plan_host(snapshot: &Snapshot, name: &str, dns_port: u16) -> anyhow::Result<HostPlan> {
    let mut plan = plan::plan_host(snapshot, name)?;
    plan.dns.listen.iter_mut().for_each(|addr| addr.set_port(dns_port));
    Ok(plan)
}

/// Why the hub's mesh DNS did not start, in one line. Port 53 taken on a mesh address almost always
/// means another DNS server listening on every address (dnsmasq, Pi-hole, Unbound): say so, and how
/// the two can run side by side.
fn dns_start_error(e: DnsError, plan: &DnsPlan) -> anyhow::Error {
    match &e {
        DnsError::Bind { addr, source, .. }
            if source.kind() == std::io::ErrorKind::AddrInUse && addr.port() == DNS_PORT =>
        {
            let ip = addr.ip();
            anyhow!(
                "port 53 on the mesh address {ip} is taken, most likely by another DNS server listening on every \
                 address (dnsmasq, Pi-hole, Unbound): run `meshd run --dns-port 5353` and have that server forward \
                 {domain} to {ip} port 5353 (docs/CLI.md, \"Next to another DNS server\")",
                domain = plan.domain
            )
        }
        _ => anyhow::Error::new(e).context("starting mesh DNS"),
    }
}

/// Run `f` on `interface`, off the async runtime.
pub(super) async fn on_interface<T: Send + 'static>(
    interface: &Arc<Mutex<Interface>>,
    f: impl FnOnce(&Interface) -> Result<T, WgError> + Send + 'static,
) -> anyhow::Result<T> {
    let interface = interface.clone();
    tokio::task::spawn_blocking(move || {
        let interface = interface.lock().map_err(|_| anyhow!("interface lock poisoned"))?;
        Ok(f(&interface)?)
    })
    .await?
}

/// WireGuard opens a tunnel only when there is something to send, and a host behind NAT can be
/// reached only through a tunnel it opened: send one datagram to each new peer right away rather than
/// waiting for the first keepalive. (It arrives at a closed port and is dropped; the handshake is what
/// counts.)
pub(super) fn open_tunnels<'a>(peers: impl IntoIterator<Item = &'a PeerPlan>) {
    let targets: Vec<SocketAddr> = peers
        .into_iter()
        .filter_map(|p| p.allowed_ips.iter().find(|n| n.addr().is_ipv4()))
        .map(|net| {
            // The hub's entry is the whole mesh range; its first host is the hub in practice, and any
            // address in the range goes through the hub's tunnel anyway.
            let addr = if net.prefix_len() == 32 { net.addr() } else { net.hosts().next().unwrap_or(net.addr()) };
            SocketAddr::new(addr, nftables::TUNNEL_OPENER_PORT)
        })
        .collect();
    if targets.is_empty() {
        return;
    }
    tokio::spawn(async move {
        let Some(socket) = opener_socket() else { return };
        for target in targets {
            if let Err(e) = socket.send_to(b"meshd", target).await {
                debug!(%target, error = %e, "opening tunnel");
            }
        }
    });
}

/// The socket the tunnel opener sends from, marked so that a routing host's rules let it reach devices
/// ([`nftables::TUNNEL_OPENER_MARK`]).
fn opener_socket() -> Option<tokio::net::UdpSocket> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))
        .inspect_err(|e| debug!(error = %e, "opening tunnels: no socket"))
        .ok()?;
    if let Err(e) = socket.set_mark(nftables::TUNNEL_OPENER_MARK) {
        debug!(error = %e, "opening tunnels: cannot mark the datagrams (devices are left to open theirs)");
    }
    socket.set_nonblocking(true).ok()?;
    socket.bind(&std::net::SocketAddr::from(([0, 0, 0, 0], 0)).into()).ok()?;
    tokio::net::UdpSocket::from_std(socket.into()).ok()
}
