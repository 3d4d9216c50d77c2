//! meshd's core, without I/O: everything the controller, the hub and the members decide, as values and
//! pure functions. Nothing here opens a file or a socket, starts a thread or reads a clock (time comes
//! in as an argument); the daemon (`meshd`) and the CLI (`meshctl`) carry out what the core decides.
//!
//! - [`acme`]: when to order and renew the certificates of a relay's public names.
//! - [`model`], [`input`], [`keys`], [`ipam`], [`clock`]: the network's records, names and values as
//!   operators type them, WireGuard keys, address assignment, elapsed real time between two stamps.
//! - [`plan`]: one host's desired interface, peers, access rules, services and DNS zones, from the
//!   network's state; [`plan::nftables`] renders its rules as text.
//! - [`relay`]: a relay's public names, what it does with their connections and requests.
//! - [`reconcile`]: the ordered host steps that turn one plan into the next.
//! - [`handout`]: a device's wg-quick configuration and its QR code.
//! - [`declare`]: a network declared in a file, and the plan that brings the network to it.
//! - [`tor`]: onion services' keys and addresses, client authorization, meshd's `torrc` and the supervisor of
//!   its `tor` process.
//! - [`wire`]: the admin, join and sync protocols' messages, and the invite token.
//! - [`session`]: the sync protocol's two ends (a member, the hub's session with one member) as state
//!   machines driven by messages and time.
//! - `fuzzing` (feature `fuzzing`): fuzz targets for the parsers of untrusted input (see
//!   docs/FUZZING.md).

#![warn(missing_docs)]

pub mod acme;
pub mod clock;
pub mod declare;
#[cfg(any(test, feature = "test-support"))]
pub mod fixtures;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
pub mod handout;
pub mod input;
pub mod ipam;
pub mod keys;
pub mod model;
pub mod plan;
pub mod reconcile;
pub mod relay;
pub mod session;
pub mod tor;
pub mod wire;
