//! The core stays without I/O: nothing it depends on, directly or through another crate, is a runtime,
//! a database, a server, a WireGuard implementation or an HTTP or ACME client. Checked on the workspace's
//! `Cargo.lock`, which lists every package's dependencies (the core's dev-dependencies included, so
//! its tests cannot bring one in either).

use std::collections::{BTreeMap, BTreeSet};

const FORBIDDEN: &[&str] = &[
    "tokio",
    "mio",
    "rusqlite",
    "hickory-server",
    "hickory-net",
    "defguard_boringtun",
    "defguard_wireguard_rs",
    "hyper",
    "instant-acme",
    "socket2",
];

#[test]
fn the_core_depends_on_no_runtime_database_server_or_wireguard() {
    let lock = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../Cargo.lock")).expect("Cargo.lock");
    let lock: toml::Table = lock.parse().expect("Cargo.lock is TOML");
    let packages = lock["package"].as_array().expect("packages");
    let deps: BTreeMap<&str, Vec<&str>> = packages
        .iter()
        .map(|p| {
            let name = p["name"].as_str().expect("a name");
            let list = p.get("dependencies").and_then(|d| d.as_array()).map(Vec::as_slice).unwrap_or_default();
            // An entry is "name" or "name version" when several versions are locked.
            (name, list.iter().filter_map(|d| d.as_str()?.split(' ').next()).collect())
        })
        .collect();
    let mut seen = BTreeSet::new();
    let mut todo = vec!["meshd-core"];
    while let Some(name) = todo.pop() {
        if seen.insert(name) {
            todo.extend(deps.get(name).into_iter().flatten());
        }
    }
    let found: Vec<&&str> = FORBIDDEN.iter().filter(|f| seen.contains(**f)).collect();
    assert!(found.is_empty(), "meshd-core depends on {found:?}");
    assert!(seen.contains("serde") && seen.len() > 20, "the walk found the core's dependencies: {seen:?}");
}
