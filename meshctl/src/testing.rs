//! Fixtures for meshctl's unit tests: commands on joined members. No host can join without a running
//! daemon, so the members here join through the controller's own redemption of an invite, as the
//! daemon's join service does.

use std::fs;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};

use clap::Parser;
use meshd::controller::{Controller, fixtures};
use meshd::host::statedir::StateDir;
use meshd_core::model::Snapshot;
use meshd_core::wire::join::JoinRequest;

use crate::{Cli, execute};

/// A new directory under the system's temporary directory, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    fn new() -> TempDir {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!("meshctl-test-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        let path = std::env::temp_dir().join(name);
        fs::create_dir(&path).unwrap();
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A state dir for network `home` (hub `hub`) in which `members` have joined as nodes behind NAT.
pub fn network(members: &[&str]) -> TempDir {
    let dir = TempDir::new();
    let mut c = fixtures::new_network(&dir.0, "10.77.0.0/16");
    for name in members {
        let join = JoinRequest { endpoint: None, ..fixtures::join_request(&fixtures::invite(&mut c, name, 60)) };
        c.redeem(&join).unwrap();
    }
    dir
}

/// `meshctl --state-dir DIR ARGS...`, carried out in-process.
pub fn meshctl(dir: &TempDir, args: &[&str]) -> anyhow::Result<()> {
    let state = dir.0.to_str().unwrap();
    execute(Cli::try_parse_from(["meshctl", "--state-dir", state].iter().chain(args)).unwrap())
}

/// The network as stored in `dir` now, read by the test itself.
pub fn snapshot(dir: &TempDir) -> Snapshot {
    Controller::open(&StateDir::new(&dir.0).db()).unwrap().snapshot().unwrap()
}
