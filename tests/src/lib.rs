//! End-to-end harness for meshd: namespaces, veth links, guarded processes and a simulated phone.
//!
//! Every namespace and process made here is removed on drop, also when a test panics.
//! Names that must be unique on the machine (namespaces, interfaces) carry the test's PID.
//!
//! - `process`: the product binaries, commands run to completion, and [`Proc`], a guarded child process;
//! - `netns`: [`Netns`], veth links and addresses, and UDP probes and echo servers inside a namespace;
//! - `wireguard`: `wireguard-go` interfaces, `wg` keys, wg-quick text ([`WgQuick`]) and a [`Phone`];
//! - `mesh`: [`MeshHost`], a meshd host of a mesh test, and [`nat_router`], a home router;
//! - `files`: private files and checks that no key is stored;
//! - `mounts`: [`Tmpfs`], a small file system to fill up or make read-only;
//! - `acme`: [`Pebble`], a test ACME CA, and [`Dns`], the DNS server it validates names with.
//! - `tor`: [`TorNetwork`], a private Tor network offline, and its [`TorClient`]s.
//! - `nix`: evaluation of the NixOS module with nixpkgs' `lib` ([`evaluate`]).
//!
//! Tests use everything from the crate root (`use meshd_e2e::...`).

pub mod acme;
mod files;
mod mesh;
mod mounts;
mod netns;
mod nix;
mod process;
mod tor;
mod wireguard;

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub use acme::{Dns, Pebble};
pub use files::{assert_key_not_stored, files_under, write_private};
pub use mesh::{MeshHost, UapiCleanup, nat_router};
pub use mounts::Tmpfs;
pub use netns::{Netns, UdpEcho, add_address, router, udp_echoed, udp_received, uplink, veth};
pub use nix::{evaluate, exec_args, nix_instantiate, nixpkgs_lib, repo_root};
pub use process::{
    Proc, assert_error_line, assert_refused, bin_dir, children_named, describe, init_network, libfaketime, meshctl,
    output, product_bin, run_json, run_ok,
};
pub use tor::{TorClient, TorNetwork};
pub use wireguard::{Phone, WG_SOCKET_DIR, WgPeer, WgQuick, wg_keypair, wg_pubkey, wireguard_go};

/// True when the test may run; false (with a loud SKIPPED line) only when not root and `CI` is unset.
pub fn require_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("this test needs root and CI is set: run the test suite as root");
    }
    eprintln!("\n*** SKIPPED: needs root (run as root; with CI set this is a failure) ***\n");
    false
}

/// A number unique within this test process, for names and probes.
fn next_serial() -> u32 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// An interface name unique on the machine: `prefix`, the PID in hex, a counter; 15 chars at most.
pub fn unique_ifname(prefix: &str) -> String {
    let name = format!("{prefix}{:x}-{}", std::process::id(), next_serial());
    assert!(name.len() <= 15, "interface name {name:?} is longer than 15 characters");
    name
}

/// Polls `check` every 100 ms until it returns true or `timeout` passes; returns whether it did.
pub fn wait_until(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if check() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
