//! The WireGuard interface of a host: kernel WireGuard where the module exists (`kernel.rs`), otherwise
//! boringtun embedded in this process (`userspace.rs`), both configured through defguard_wireguard_rs.
//! Addresses are managed with `ip` (iproute2) so that they can be removed as well as added. When the
//! embedded device stops by itself, [`Interface::stopped`] says so.
//!
//! defguard's API is blocking; callers run it off the async runtime (`spawn_blocking`).

mod kernel;
mod userspace;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::process::Command;
use std::str::FromStr;
use std::time::UNIX_EPOCH;

use defguard_wireguard_rs::key::Key;
use defguard_wireguard_rs::peer::Peer;
use defguard_wireguard_rs::{InterfaceConfiguration, Userspace, WGApi, WireguardInterfaceApi};
use ipnet::IpNet;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use meshd_core::keys::PrivateKey;
use meshd_core::keys::PublicKey;
use meshd_core::plan::{HostPlan, PeerPlan};
use meshd_core::reconcile::{PeerChange, PeerDiff, PeerEndpoints, peer_start};
use meshd_core::session::paths::{PROBE_KEEPALIVE_SECS, Reading};

/// Which WireGuard implementation to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    /// The kernel module (fails where it is absent).
    Kernel,
    /// boringtun in this process.
    Userspace,
    /// The kernel module if present, else userspace.
    Auto,
}

/// Something went wrong on the interface.
#[derive(Debug, thiserror::Error)]
pub enum WgError {
    #[error("WireGuard interface {interface}: {message}")]
    Interface { interface: String, message: String },
    /// The listen port is held by another socket (its holder named), found before the device was made.
    #[error("{0}")]
    PortHeld(String),
    #[error("peer {peer}: invalid key")]
    Key { peer: String },
    #[error("`ip {args}` failed: {message}")]
    Ip { args: String, message: String },
}

/// A live WireGuard interface.
pub struct Interface {
    name: String,
    api: Box<dyn WireguardInterfaceApi + Send>,
    /// The embedded device's waiting thread; none for a kernel interface.
    device: Option<std::thread::JoinHandle<()>>,
    stopped: watch::Receiver<bool>,
    /// Held for a kernel interface, which nothing stops behind our back, so `stopped` never fires.
    _kernel_stays: Option<watch::Sender<bool>>,
    /// Where removed peers were last seen: a peer behind NAT that comes back (a node enabled again)
    /// starts from there, so this side can open the tunnel at once.
    departed: std::sync::Mutex<PeerEndpoints>,
}

impl Interface {
    /// Create the interface of `plan` with its key, port, MTU, addresses and peers. A peer without a
    /// configured endpoint starts from where it was last seen (`last_seen`), if known.
    pub fn create(
        backend: Backend,
        plan: &HostPlan,
        key: &PrivateKey,
        last_seen: &PeerEndpoints,
    ) -> Result<Interface, WgError> {
        let name = plan.interface.clone();
        let err = |e: &dyn std::fmt::Display| WgError::Interface { interface: name.clone(), message: e.to_string() };
        let (stop_tx, stopped) = watch::channel(false);
        let kernel_api = match backend {
            Backend::Kernel => Some(kernel::create(&name).map_err(|e| err(&e))?),
            Backend::Userspace => None,
            Backend::Auto => kernel::create(&name)
                .inspect_err(|e| {
                    info!(interface = %name, reason = %e, "kernel WireGuard unavailable; using embedded userspace WireGuard")
                })
                .ok(),
        };
        let interface = match kernel_api {
            Some(api) => Interface {
                name: name.clone(),
                api: Box::new(api),
                device: None,
                stopped,
                _kernel_stays: Some(stop_tx),
                departed: Default::default(),
            },
            None => {
                // Tried first: boringtun's threads panic on a port they cannot bind.
                super::ports::check_udp_port_free(plan.listen_port).map_err(WgError::PortHeld)?;
                let device = userspace::start(&name, stop_tx).map_err(|e| err(&e))?;
                let api = WGApi::<Userspace>::new(name.as_str()).map_err(|e| err(&e))?;
                Interface {
                    name: name.clone(),
                    api: Box::new(api),
                    device: Some(device),
                    stopped,
                    _kernel_stays: None,
                    departed: Default::default(),
                }
            }
        };
        let mut peers = plan.peers.iter().map(|(k, p)| to_peer(k, p)).collect::<Result<Vec<_>, _>>()?;
        for (peer, key) in peers.iter_mut().zip(plan.peers.keys()) {
            if peer.endpoint.is_none() {
                peer.endpoint = last_seen.get(key).copied();
            }
        }
        // The interface first, without peers: boringtun's UAPI `set` carries one peer's endpoint,
        // preshared key and keepalive over to the next peer of the same message (see `set_peers`).
        let config = InterfaceConfiguration {
            name: interface.name.clone(),
            prvkey: key.to_base64(),
            addresses: Vec::new(),
            port: plan.listen_port,
            peers: Vec::new(),
            mtu: Some(u32::from(plan.mtu)),
            fwmark: None,
        };
        // The port the embedded device listened on before (one the kernel picked), to close after the move.
        let first_port = match interface.device {
            Some(_) => interface.api.read_interface_data().map_err(|e| err(&e))?.listen_port,
            None => 0,
        };
        interface.api.configure_interface(&config).map_err(|e| match interface.device {
            // A port taken since it was tried: said as clearly.
            Some(_) => super::ports::check_udp_port_free(plan.listen_port).map_or_else(WgError::PortHeld, |()| err(&e)),
            None => err(&e),
        })?;
        // The listen port is set only here (a new port needs a restart): kept private once bound.
        if interface.device.is_some() {
            userspace::keep_port_private(plan.listen_port).map_err(|e| err(&e))?;
            let closed = userspace::close_first_sockets(first_port, plan.listen_port).map_err(|e| err(&e))?;
            debug!(interface = %interface.name, port = first_port, sockets = closed, "closed the device's first UDP sockets");
        }
        interface.set_peers(&peers)?;
        let added: Vec<IpNet> = plan.addresses.iter().copied().collect();
        interface.change_addresses(&added, &[])?;
        info!(interface = %interface.name, kernel = interface.is_kernel(), port = plan.listen_port, peers = plan.peers.len(), "interface up");
        Ok(interface)
    }

    /// Apply a peer diff: only the listed peers are touched, so other sessions stay up.
    ///
    /// Returns the keys of the added and replaced peers that have an endpoint (configured, learned, or
    /// remembered from before they were removed): those this side can open a tunnel to.
    pub fn apply_peers(&self, diff: &PeerDiff) -> Result<Vec<PublicKey>, WgError> {
        let remove = |key: &PublicKey| {
            let k = Key::from_str(key.as_str()).map_err(|_| WgError::Key { peer: key.to_string() })?;
            self.api.remove_peer(&k).map_err(|e| self.error(e))
        };
        // Where peers are now: kept for removed ones, and carried over to replaced ones.
        let replaces = !self.is_kernel() && !diff.update.is_empty();
        let learned = if replaces || !diff.remove.is_empty() { self.endpoints()? } else { PeerEndpoints::new() };
        {
            let mut departed = self.departed.lock().map_err(|_| self.error("endpoint memory poisoned"))?;
            departed.extend(diff.remove.iter().filter_map(|k| Some((k.clone(), *learned.get(k)?))));
        }
        diff.remove.iter().try_for_each(remove)?;
        // boringtun refuses (by panicking) to edit a peer in place: replace it, resetting only its
        // session. Where each changed peer starts sending is decided by `reconcile::peer_start`.
        let change = if self.is_kernel() { PeerChange::EditedInPlace } else { PeerChange::Replaced };
        let mut reachable = Vec::new();
        let mut configured = Vec::new();
        for (key, plan) in &diff.update {
            let mut peer = to_peer(key, plan)?;
            let start = peer_start(change, peer.endpoint.is_some(), learned.get(key).copied(), None);
            if change == PeerChange::Replaced {
                remove(key)?;
                debug!(peer = %plan.name, endpoint = ?start.endpoint, known = learned.len(), "replacing peer");
            }
            peer.endpoint = peer.endpoint.or(start.endpoint);
            if start.reachable {
                reachable.push(key.clone());
            }
            configured.push(peer);
        }
        for (key, plan) in &diff.add {
            let mut peer = to_peer(key, plan)?;
            let last_seen = self.departed.lock().map_err(|_| self.error("endpoint memory poisoned"))?.remove(key);
            let start = peer_start(PeerChange::Added, peer.endpoint.is_some(), None, last_seen);
            peer.endpoint = peer.endpoint.or(start.endpoint);
            if start.reachable {
                reachable.push(key.clone());
            }
            configured.push(peer);
        }
        self.set_peers(&configured)?;
        Ok(reachable)
    }

    /// Configure `peers`, each in a `set` of its own, then read every one back and compare it with
    /// what was meant.
    ///
    /// Works around a bug of boringtun's UAPI handler (defguard's fork 0.7.1, as upstream): within one
    /// `set`, a `public_key=` line that starts the next peer resets only the allowed IPs, so the
    /// endpoint, preshared key, persistent keepalive and `remove` flag of one peer carry over to the
    /// next peer that does not set its own (a node listed after a device got the device's preshared
    /// key). One peer per `set` leaves nothing to carry over; the read-back catches any backend that
    /// still applies something else. Errors: the first peer that failed to apply or reads back wrong.
    fn set_peers(&self, peers: &[Peer]) -> Result<(), WgError> {
        if peers.is_empty() {
            return Ok(());
        }
        for peer in peers {
            self.api.configure_peer(peer).map_err(|e| self.error(e))?;
        }
        let host = self.api.read_interface_data().map_err(|e| self.error(e))?;
        for want in peers {
            let Some(got) = host.peers.get(&want.public_key) else {
                return Err(self.error(format!("peer {} is missing after it was configured", want.public_key)));
            };
            if let Some(field) = peer_mismatch(want, got) {
                return Err(
                    self.error(format!("peer {} reads back with another {field} than was configured", want.public_key))
                );
            }
        }
        Ok(())
    }

    /// Set the interface's MTU, bytes; the kernel takes it at once (routes and new TCP connections follow).
    pub fn set_mtu(&self, mtu: u16) -> Result<(), WgError> {
        ip(&["link", "set", "dev", &self.name, "mtu", &mtu.to_string()])?;
        info!(interface = %self.name, mtu, "interface MTU set");
        Ok(())
    }

    /// Stop the interface passing traffic (its access rules are gone and cannot be put back): the link goes
    /// down, which takes its routes (and IPv6 addresses) with it.
    pub fn block(&self) -> Result<(), WgError> {
        ip(&["link", "set", "dev", &self.name, "down"])
    }

    /// Let the interface pass traffic again, with its `addresses` (and so its routes) back.
    pub fn unblock(&self, addresses: &[IpNet]) -> Result<(), WgError> {
        ip(&["link", "set", "dev", &self.name, "up"])?;
        self.change_addresses(addresses, &[])
    }

    /// Add and remove interface addresses.
    pub fn change_addresses(&self, add: &[IpNet], remove: &[IpNet]) -> Result<(), WgError> {
        for net in remove {
            ip(&["addr", "del", &net.to_string(), "dev", &self.name])?;
        }
        for net in add {
            let text = net.to_string();
            let mut args = vec!["addr", "replace", &text, "dev", &self.name];
            if let IpNet::V6(v6) = net {
                // No duplicate address detection: the address is ours by construction, and DAD would
                // leave it unusable for a second or two.
                args.push("nodad");
                // A service's host address must never be picked as the source of the host's own
                // traffic (its longer prefix would win IPv6 source selection, and peers admit the
                // node by its own address): deprecated, it still receives and can be bound.
                if v6.prefix_len() == 128 {
                    args.extend(["preferred_lft", "0"]);
                }
            }
            ip(&args)?;
        }
        Ok(())
    }

    /// Turns true when the embedded device has stopped by itself (signal, or its socket removed).
    pub fn stopped(&self) -> watch::Receiver<bool> {
        self.stopped.clone()
    }

    /// Let the kernel route packets that arrive on this interface (the hub routes between its peers;
    /// the firewall decides what may pass), for this interface only. IPv4 has a per-interface switch;
    /// IPv6 has one (`force_forwarding`) from Linux 6.17. On older kernels IPv6 forwarding is host-wide
    /// and changes how every interface treats router advertisements, so meshd leaves it off and says
    /// so: two members that are both behind NAT then reach each other over IPv4 only.
    pub fn enable_forwarding(&self) -> Result<(), WgError> {
        let path = format!("/proc/sys/net/ipv4/conf/{}/forwarding", self.name);
        std::fs::write(&path, "1").map_err(|e| self.error(format!("enabling forwarding ({path}): {e}")))?;
        let v6 = format!("/proc/sys/net/ipv6/conf/{}/force_forwarding", self.name);
        if let Err(e) = std::fs::write(&v6, "1") {
            warn!(interface = %self.name, error = %e, "no per-interface IPv6 forwarding (Linux < 6.17): members behind NAT reach each other over IPv4 only");
        }
        Ok(())
    }

    /// Switch the interface to a new private key (a rotation). Peers keep their settings; sessions
    /// are renewed with the new key.
    pub fn set_private_key(&self, key: &PrivateKey) -> Result<(), WgError> {
        let set = if self.is_kernel() { kernel::set_private_key } else { userspace::set_private_key };
        set(&self.name, key).map_err(|e| self.error(e))
    }

    /// Where each peer with a known endpoint (configured, or learned from its packets) is, by public key.
    pub fn endpoints(&self) -> Result<PeerEndpoints, WgError> {
        Ok(self.readings()?.into_iter().filter_map(|(key, reading)| Some((key, reading.endpoint?))).collect())
    }

    /// Every peer as the interface has it now, by public key: bytes received, last handshake (since the
    /// peer was configured), and where it sends to it (configured, learned, or remembered).
    pub fn readings(&self) -> Result<BTreeMap<PublicKey, Reading>, WgError> {
        let host = self.api.read_interface_data().map_err(|e| self.error(e))?;
        Ok(host
            .peers
            .into_iter()
            .filter_map(|(key, peer)| {
                let reading = Reading {
                    rx_bytes: peer.rx_bytes,
                    last_handshake: unix_secs(peer.last_handshake),
                    endpoint: peer.endpoint,
                };
                Some((public_key(&key)?, reading))
            })
            .collect())
    }

    /// Configure the peer `key` afresh from `plan`: a new session, started from this side by its next
    /// packet (a keepalive, or anything routed to it), sending to `endpoint` (or where the interface
    /// sends to it now), with the plan's allowed IPs when `routes`, else none, so that the more general
    /// route (the hub's) carries its traffic, and a keepalive of [`PROBE_KEEPALIVE_SECS`] whose
    /// handshakes probe its path. A peer the interface does not have is left alone.
    pub fn reset_peer(
        &self,
        key: &PublicKey,
        plan: &PeerPlan,
        endpoint: Option<SocketAddr>,
        routes: bool,
    ) -> Result<(), WgError> {
        let Some(now) = self.readings()?.remove(key) else { return Ok(()) };
        let mut peer = to_peer(key, &PeerPlan { endpoint: None, ..plan.clone() })?;
        peer.endpoint = endpoint.or(now.endpoint);
        if !routes {
            peer.allowed_ips.clear();
            peer.persistent_keepalive_interval = Some(PROBE_KEEPALIVE_SECS);
        }
        self.api.remove_peer(&peer.public_key).map_err(|e| self.error(e))?;
        self.set_peers(&[peer])
    }

    /// Last handshake (unix seconds) of every peer, by public key; `None` for never.
    pub fn handshakes(&self) -> Result<HashMap<PublicKey, Option<u64>>, WgError> {
        Ok(self.readings()?.into_iter().map(|(key, reading)| (key, reading.last_handshake)).collect())
    }

    fn is_kernel(&self) -> bool {
        self.device.is_none()
    }

    fn error(&self, e: impl std::fmt::Display) -> WgError {
        WgError::Interface { interface: self.name.clone(), message: e.to_string() }
    }
}

impl Drop for Interface {
    fn drop(&mut self) {
        if self.is_kernel() {
            // A kernel interface must be deleted; a userspace one goes with its device.
            if let Err(e) = self.api.remove_interface() {
                debug!(interface = %self.name, error = %e, "removing interface");
            }
        }
        if let Some(device) = self.device.take() {
            userspace::stop(&self.name, device);
        }
    }
}

/// A time as unix seconds; `None` for none, or for the epoch (how a peer that never completed a
/// handshake reads back).
fn unix_secs(t: Option<std::time::SystemTime>) -> Option<u64> {
    t.and_then(|t| t.duration_since(UNIX_EPOCH).ok()).map(|d| d.as_secs()).filter(|s| *s > 0)
}

/// A peer's key as the interface reports it, as meshd's type (always valid: 32 bytes).
fn public_key(key: &Key) -> Option<PublicKey> {
    PublicKey::parse(&key.to_string()).ok()
}

fn to_peer(key: &PublicKey, plan: &PeerPlan) -> Result<Peer, WgError> {
    let bad_key = || WgError::Key { peer: plan.name.to_string() };
    let mut peer = Peer::new(Key::from_str(key.as_str()).map_err(|_| bad_key())?);
    peer.preshared_key =
        plan.preshared_key.as_ref().map(|k| Key::from_str(k.as_str())).transpose().map_err(|_| bad_key())?;
    if let Some(endpoint) = &plan.endpoint {
        // An endpoint that does not resolve now is left unset; the peer can still roam to us.
        if let Err(e) = peer.set_endpoint(&endpoint.to_string()) {
            warn!(peer = %plan.name, %endpoint, error = %e, "endpoint does not resolve");
        }
    }
    peer.persistent_keepalive_interval = plan.persistent_keepalive;
    peer.allowed_ips = plan
        .allowed_ips
        .iter()
        .map(|n| defguard_wireguard_rs::net::IpAddrMask::new(n.addr(), n.prefix_len()))
        .collect();
    Ok(peer)
}

/// The first field in which the peer read back from the interface (`got`) differs from the one
/// configured (`want`), if any: preshared key, persistent keepalive, allowed IPs. Nothing but meshd
/// changes those. The endpoint is not compared: the peer itself changes it, by sending a handshake
/// initiation from elsewhere between the `set` and the read-back (a restarting hub's members do), and a
/// device would then stop the daemon from starting. (The tests compare endpoints, where no peer sends.)
/// A zero preshared key and a zero keepalive read back as "none" (wireguard-go reports them so).
fn peer_mismatch(want: &Peer, got: &Peer) -> Option<&'static str> {
    let psk = |p: &Peer| p.preshared_key.as_ref().map(Key::as_array).filter(|k| k.iter().any(|b| *b != 0));
    let keepalive = |p: &Peer| p.persistent_keepalive_interval.filter(|s| *s != 0);
    let ips = |p: &Peer| {
        let mut ips: Vec<String> = p.allowed_ips.iter().map(ToString::to_string).collect();
        ips.sort();
        ips
    };
    if psk(want) != psk(got) {
        Some("preshared key")
    } else if keepalive(want) != keepalive(got) {
        Some("persistent keepalive")
    } else if ips(want) != ips(got) {
        Some("allowed IPs")
    } else {
        None
    }
}

/// Run `ip` with `args` (iproute2); its first error line on failure.
fn ip(args: &[&str]) -> Result<(), WgError> {
    let output = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| WgError::Ip { args: args.join(" "), message: e.to_string() })?;
    if output.status.success() {
        Ok(())
    } else {
        let stderr = String::from_utf8_lossy(&output.stderr);
        Err(WgError::Ip { args: args.join(" "), message: stderr.trim().to_owned() })
    }
}

#[cfg(test)]
mod tests {
    use defguard_wireguard_rs::net::IpAddrMask;

    use super::*;

    fn peer(psk: Option<u8>, endpoint: Option<&str>, keepalive: Option<u16>) -> Peer {
        let mut p = Peer::new(Key::new([7; 32]));
        p.preshared_key = psk.map(|b| Key::new([b; 32]));
        p.endpoint = endpoint.map(|e| e.parse().unwrap());
        p.persistent_keepalive_interval = keepalive;
        p.allowed_ips =
            vec![IpAddrMask::from_str("10.77.0.3/32").unwrap(), IpAddrMask::from_str("fd00::3/128").unwrap()];
        p
    }

    #[test]
    fn a_peer_that_reads_back_as_configured_matches() {
        let want = peer(Some(1), Some("192.0.2.1:51820"), Some(25));
        let mut got = want.clone();
        got.allowed_ips.reverse();
        assert_eq!(peer_mismatch(&want, &got), None);
        // wireguard-go reports "none" as zeros.
        let (want, mut got) = (peer(None, None, None), peer(Some(0), None, Some(0)));
        got.last_handshake = Some(UNIX_EPOCH);
        assert_eq!(peer_mismatch(&want, &got), None);
    }

    #[test]
    fn fields_carried_over_from_another_peer_are_caught() {
        let node = peer(None, None, None);
        assert_eq!(peer_mismatch(&node, &peer(Some(9), None, None)), Some("preshared key"));
        assert_eq!(peer_mismatch(&node, &peer(None, None, Some(25))), Some("persistent keepalive"));
        let mut fewer = node.clone();
        fewer.allowed_ips.pop();
        assert_eq!(peer_mismatch(&node, &fewer), Some("allowed IPs"));
    }

    #[test]
    fn the_endpoint_is_the_peers_own_to_change() {
        // A handshake initiation from elsewhere may land between the `set` and the read-back.
        let want = peer(None, Some("192.0.2.1:51820"), None);
        assert_eq!(peer_mismatch(&want, &peer(None, Some("203.0.113.9:40000"), None)), None);
        assert_eq!(peer_mismatch(&peer(None, None, None), &peer(None, Some("203.0.113.9:40000"), None)), None);
    }
}
