//! `meshctl` on a state dir whose daemon holds the lock: it goes to the daemon only and never opens the
//! database itself, so a newer meshctl cannot migrate an older daemon's database under it.
//!
//! No root: the daemon is stood in for by its lock, taken as `meshd` takes it, and no admin socket.

use std::collections::BTreeSet;
use std::fs;
use std::path::Path;

use base64::Engine;
use meshd::controller::store;
use meshd::host::statedir::StateDir;
use meshd_e2e::{describe, meshctl, output, run_json};

/// The schema of a meshd from before UDP services.
const OLD_SCHEMA: usize = 3;

/// A network `home` with its hub, as a meshd of schema [`OLD_SCHEMA`] stored it.
fn old_network(db: &Path) {
    store::create_at_schema(db, OLD_SCHEMA).unwrap();
    let hub_key = base64::engine::general_purpose::STANDARD.encode([7u8; 32]);
    let conn = rusqlite::Connection::open(db).unwrap();
    conn.execute_batch(&format!(
        "INSERT INTO network VALUES (1, 'home', 'home.internal', '10.77.0.0/16', 'fd00:1:2::/48', 0);
         INSERT INTO addresses VALUES (1, NULL);
         INSERT INTO nodes (name, public_key, addr_index, endpoint, listen_port, interface, role, created_at)
             VALUES ('hub', '{hub_key}', 1, '192.0.2.1:51820', 51820, 'meshd0', 'hub', 0);"
    ))
    .unwrap();
}

fn user_version(db: &Path) -> i64 {
    let conn = rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
    conn.query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap()
}

fn files(dir: &Path) -> BTreeSet<String> {
    fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect()
}

#[test]
fn meshctl_leaves_an_older_database_alone_while_a_daemon_holds_the_state_dir() {
    let dir = tempfile::tempdir().unwrap();
    let state = StateDir::new(dir.path());
    old_network(&state.db());
    let before = fs::read(state.db()).unwrap();
    let daemon = state.lock_daemon().unwrap();

    let mut cmd = meshctl(dir.path());
    let out = output(cmd.args(["node", "list"]));
    assert_eq!(out.status.code(), Some(1), "{cmd:?} should fail: {}", describe(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.trim_end().lines().collect();
    assert!(
        lines.len() == 1 && lines[0].starts_with("error: meshd is running but its admin socket does not answer"),
        "{cmd:?} should say in one line that meshd runs but does not answer: {}",
        describe(&out)
    );
    assert!(fs::read(state.db()).unwrap() == before, "meshctl changed the running daemon's meshd.db");
    assert_eq!(user_version(&state.db()), OLD_SCHEMA as i64, "meshctl migrated the running daemon's meshd.db");
    let expected: BTreeSet<String> = ["meshd.db", "meshd.lock"].map(String::from).into();
    assert_eq!(files(dir.path()), expected, "meshctl left files in the state dir");

    // The daemon gone, meshctl works on the state itself: the same database is migrated and read.
    drop(daemon);
    let nodes = run_json(meshctl(dir.path()).args(["node", "list", "--json"]));
    assert_eq!(nodes[0]["name"], "hub", "{nodes}");
    assert!(user_version(&state.db()) > OLD_SCHEMA as i64, "meshctl offline did not migrate meshd.db");
}
