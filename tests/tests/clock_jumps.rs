//! Issue 8, point 9: the address cooldown and invite lifetimes hold in real time when the host's wall
//! clock jumps (a host without a real-time clock boots at a wrong time and NTP then steps it). The jumps
//! are made with Debian's libfaketime preloaded into meshctl, which works on the state directly;
//! `FAKETIME_DONT_FAKE_MONOTONIC=1` leaves the boot-time clock alone, as a real clock step does.

use std::path::Path;
use std::process::Command;

use meshd_e2e::{init_network, libfaketime, product_bin, run_json, run_ok};
use serde_json::Value;

/// `meshctl --state-dir DIR ARGS` with the wall clock shifted by `shift` (libfaketime's `FAKETIME` syntax,
/// e.g. `+400d`, `-2h`).
fn meshctl_at(shift: &str, state: &Path) -> Command {
    let mut cmd = Command::new(product_bin("meshctl"));
    cmd.env("LD_PRELOAD", libfaketime()).env("FAKETIME", shift).env("FAKETIME_DONT_FAKE_MONOTONIC", "1");
    cmd.arg("--state-dir").arg(state);
    cmd
}

fn address(device: &Value) -> String {
    device["address"].as_str().unwrap().to_owned()
}

#[test]
fn a_removed_address_is_not_reused_when_the_clock_jumps_forward() {
    let dir = init_network(&[]);
    let state = dir.path();
    run_ok(meshctl_at("+0s", state).args(["service", "add", "wallet", "--node", "hub", "--target", "127.0.0.1:1"]));
    let first = run_json(meshctl_at("+0s", state).args(["device", "add", "phone", "--allow", "wallet", "--json"]));
    run_ok(meshctl_at("+0s", state).args(["device", "remove", "phone"]));
    // Seconds later the wall clock says 400 days have passed: the address still cools down.
    let next = run_json(meshctl_at("+400d", state).args(["device", "add", "tablet", "--allow", "wallet", "--json"]));
    assert_ne!(address(&next), address(&first), "the removed phone's address was handed out again at once");
}

#[test]
fn a_clock_set_back_blocks_no_address_for_a_year() {
    let dir = init_network(&[]);
    let state = dir.path();
    run_ok(meshctl_at("+0s", state).args(["service", "add", "wallet", "--node", "hub", "--target", "127.0.0.1:1"]));
    // Removed while the clock was a year ahead; the clock is then put right. Within this boot the
    // cooldown is an hour of real time, not a year and an hour.
    let first = run_json(meshctl_at("+365d", state).args(["device", "add", "phone", "--allow", "wallet", "--json"]));
    run_ok(meshctl_at("+365d", state).args(["device", "remove", "phone"]));
    let next = run_json(meshctl_at("+0s", state).args(["device", "add", "tablet", "--allow", "wallet", "--json"]));
    assert_ne!(address(&next), address(&first), "reused within the hour");
    // The rest of the rule (the hour measured on the boot-time clock, and across reboots) is unit-tested:
    // `store::writer::clock_tests`, `clock::tests`.
}

#[test]
fn invites_live_their_lifetime_in_real_time_whatever_the_clock_does() {
    let dir = init_network(&[]);
    let state = dir.path();
    // Made while the clock was two hours behind, for one hour; the clock is then put right: the invite
    // is not born expired, it has its hour.
    run_ok(meshctl_at("-2h", state).args(["node", "invite", "vps", "--expires", "1h"]));
    let invites = run_json(meshctl_at("+0s", state).args(["node", "invites", "--json"]));
    assert_eq!(invites.as_array().map(Vec::len), Some(1), "{invites}");
    let now = run_json(meshctl_at("+0s", state).args(["status", "--json"]));
    let left = invites[0]["expires_at"].as_i64().unwrap() - unix_now();
    assert!((3_590..=3_600).contains(&left), "{left} s left of an hour; {now}");
    // The clock jumps a day forward: the hour has not passed, the invite is still good.
    let invites = run_json(meshctl_at("+1d", state).args(["node", "invites", "--json"]));
    assert_eq!(invites.as_array().map(Vec::len), Some(1), "expired by a clock jump: {invites}");
    // A name with a pending invite is still taken.
    let out = meshd_e2e::output(meshctl_at("+1d", state).args(["node", "invite", "vps"]));
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("pending invite"));
}

fn unix_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}
