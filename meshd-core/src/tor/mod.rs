//! Tor onion services (version 3, Tor's rend-spec-v3) as values: the service's key and address in the
//! on-disk format the C tor reads, the x25519 keys of client authorization, the `torrc` meshd writes for
//! its own `tor` and the supervisor that decides when that process starts, reloads, backs off and stops.
//! The daemon's `host::tor` carries these out; nothing here touches a file or a process.
//!
//! - [`onion`]: the ed25519 identity key of an onion service, its files and its `.onion` address.
//! - [`client`]: client authorization keys and the lines tor and apps (Orbot, Tor Browser) import.
//! - [`torrc`]: the configuration text, and which `tor` versions meshd can drive.
//! - [`supervisor`]: the process's life as a state machine driven by events and time.

pub mod client;
pub mod onion;
pub mod supervisor;
pub mod torrc;

/// RFC 4648 base32, upper case, without padding: how tor writes and reads client authorization keys.
pub(crate) const BASE32: data_encoding::Encoding = data_encoding::BASE32_NOPAD;
