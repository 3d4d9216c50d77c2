//! The host edges: one module per outside system the daemon touches. Each carries out what it is asked
//! (by `runtime::apply`, from the core's plans and steps); what they decide is how to talk to their
//! system (a UAPI `set` per peer, a ruleset in one `nft` transaction, a forwarder's sessions).
//!
//! - [`wg`]: the WireGuard interface (kernel, or the embedded userspace boringtun).
//! - [`firewall`]: nftables. [`forward`]: the TCP and UDP forwarders of services. [`dns`]: the mesh DNS
//!   server. [`hostnet`]: the host's addresses and routes as `ip` sees them. [`socket`]: sockets bound
//!   on mesh addresses. [`resolve`]: peers' endpoint names, through the host's resolver configuration.
//! - [`admission`]: the open-file limit, and the caps on connections from untrusted peers that keep
//!   descriptors in reserve for the daemon's own work.
//! - [`tor`]: meshd's own `tor` process and the files of its onion services.
//! - [`statedir`]: the state directory (files, locks). [`owner`]: which meshd runs an interface.
//!   [`clock`]: the host's clocks. [`ports`]: whether a port is free, and who holds it.
//! - [`systemd`]: the service manager's readiness notification.

pub mod admission;
pub mod clock;
pub mod dns;
pub mod firewall;
pub mod forward;
pub mod hostnet;
pub mod owner;
pub mod ports;
pub mod resolve;
pub mod socket;
pub mod statedir;
pub mod systemd;
pub mod tor;
pub mod wg;
