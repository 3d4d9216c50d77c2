//! The database schema: numbered migrations (`PRAGMA user_version` counts those that have run), the
//! `application_id` that marks a meshd database, and, for tests, a database as an older meshd left it.
//! A change to the schema is a new migration at the end: a database records only how many have run.

use std::path::Path;

use rusqlite::{Connection, TransactionBehavior};

use super::{StoreError, sql};

/// `PRAGMA application_id` of a meshd database ("mshd"), so a foreign SQLite file is recognised.
pub(super) const APPLICATION_ID: i32 = 0x6d73_6864;

/// Numbered migrations; `PRAGMA user_version` records how many have run.
pub(super) const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE network (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    name TEXT NOT NULL,
    domain TEXT NOT NULL,
    cidr TEXT NOT NULL,
    ula TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
-- Every host index ever handed out; a released one is reused only after a cooldown.
CREATE TABLE addresses (
    addr_index INTEGER PRIMARY KEY,
    released_at INTEGER
);
CREATE TABLE nodes (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    public_key TEXT NOT NULL UNIQUE,
    addr_index INTEGER NOT NULL UNIQUE REFERENCES addresses(addr_index),
    endpoint TEXT,
    listen_port INTEGER NOT NULL,
    interface TEXT NOT NULL,
    role TEXT NOT NULL CHECK (role IN ('hub', 'node', 'relay')),
    created_at INTEGER NOT NULL
);
CREATE TABLE devices (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    public_key TEXT NOT NULL UNIQUE,
    preshared_key TEXT NOT NULL,
    addr_index INTEGER NOT NULL UNIQUE REFERENCES addresses(addr_index),
    created_at INTEGER NOT NULL
);
CREATE TABLE services (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    node_id INTEGER NOT NULL REFERENCES nodes(id),
    target TEXT NOT NULL,
    port INTEGER NOT NULL CHECK (port BETWEEN 1 AND 65535),
    addr_index INTEGER NOT NULL UNIQUE REFERENCES addresses(addr_index),
    created_at INTEGER NOT NULL
);
CREATE TABLE grants (
    device_id INTEGER NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
    service_id INTEGER NOT NULL REFERENCES services(id) ON DELETE CASCADE,
    PRIMARY KEY (device_id, service_id)
);
"#,
    r#"
-- Invites to join; the secret is stored hashed. A pending name is reserved.
CREATE TABLE invites (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    role TEXT NOT NULL CHECK (role IN ('node', 'relay')),
    secret_hash TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('pending', 'redeemed', 'cancelled')),
    finished_at INTEGER
);
CREATE UNIQUE INDEX invites_pending_name ON invites (name) WHERE status = 'pending';
-- The controller's TLS identity for joins (the certificate's fingerprint goes into tokens).
CREATE TABLE join_identity (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    cert BLOB NOT NULL,
    key BLOB NOT NULL
);
"#,
    r#"
-- A disabled node keeps its name and addresses; a node asked for a new key makes it on next contact.
ALTER TABLE nodes ADD COLUMN disabled INTEGER NOT NULL DEFAULT 0 CHECK (disabled IN (0, 1));
ALTER TABLE nodes ADD COLUMN rotate_key INTEGER NOT NULL DEFAULT 0 CHECK (rotate_key IN (0, 1));
-- Node `from_node` may reach node `to_node`; a node that is the target of any rule admits only its sources.
CREATE TABLE access_rules (
    from_node INTEGER NOT NULL REFERENCES nodes(id) ON DELETE CASCADE,
    to_node INTEGER NOT NULL REFERENCES nodes(id) ON DELETE CASCADE,
    PRIMARY KEY (from_node, to_node)
);
"#,
    r#"
-- A service is TCP or UDP; every service made before this migration was TCP.
ALTER TABLE services ADD COLUMN protocol TEXT NOT NULL DEFAULT 'tcp' CHECK (protocol IN ('tcp', 'udp'));
"#,
    r#"
-- Waits that must last a real time are measured on the boot-time clock within a boot (a wall clock
-- that jumps changes nothing): the boot id and seconds since boot when an address was released and
-- when an invite was made. NULL for rows from before: they count as from another boot.
ALTER TABLE addresses ADD COLUMN released_boot TEXT;
ALTER TABLE addresses ADD COLUMN released_uptime INTEGER;
ALTER TABLE invites ADD COLUMN created_boot TEXT;
ALTER TABLE invites ADD COLUMN created_uptime INTEGER;
"#,
    r#"
-- The keys of removed nodes: a removed host that asks where its key stands is told it was removed.
CREATE TABLE removed_node_keys (
    public_key TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    removed_at INTEGER NOT NULL
);
"#,
    r#"
-- The mesh MTU: the network's (hosts without their own, devices' configs) and a host's own (NULL: the
-- network's). Every network made before this migration had 1420.
ALTER TABLE network ADD COLUMN mtu INTEGER NOT NULL DEFAULT 1420 CHECK (mtu BETWEEN 1280 AND 9000);
ALTER TABLE nodes ADD COLUMN mtu INTEGER CHECK (mtu IS NULL OR mtu BETWEEN 1280 AND 9000);
"#,
    r#"
-- What each device's config says of the hub's endpoint and the MTU, as handed out (device add, device
-- rotate): changing either names exactly the devices whose config no longer matches. Devices made before
-- this migration are taken to have the values of now.
ALTER TABLE devices ADD COLUMN config_endpoint TEXT;
ALTER TABLE devices ADD COLUMN config_mtu INTEGER;
UPDATE devices SET config_endpoint = (SELECT endpoint FROM nodes WHERE role = 'hub'),
                   config_mtu = (SELECT mtu FROM network WHERE id = 1);
"#,
    r#"
-- Public names served over HTTPS through a relay (`meshctl expose`): one service per name; the name goes
-- with its service or its relay.
CREATE TABLE exposures (
    hostname TEXT PRIMARY KEY,
    service_id INTEGER NOT NULL REFERENCES services(id) ON DELETE CASCADE,
    relay_id INTEGER NOT NULL REFERENCES nodes(id) ON DELETE CASCADE,
    tls TEXT NOT NULL CHECK (tls IN ('terminate', 'passthrough')),
    created_at INTEGER NOT NULL
);
"#,
    r#"
-- Services served as Tor onion services by their node (`meshctl expose --tor`), with the devices authorized
-- to find them: only the public half of each client key (the private half is handed out once). A client goes
-- with its device, an onion service with its service.
CREATE TABLE onions (
    service_id INTEGER PRIMARY KEY REFERENCES services(id) ON DELETE CASCADE,
    port INTEGER NOT NULL CHECK (port BETWEEN 1 AND 65535),
    authorized_only INTEGER NOT NULL CHECK (authorized_only IN (0, 1)),
    created_at INTEGER NOT NULL
);
CREATE TABLE onion_clients (
    service_id INTEGER NOT NULL REFERENCES onions(service_id) ON DELETE CASCADE,
    device_id INTEGER NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
    public_key TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (service_id, device_id)
);
"#,
];

/// Bring the database at `path` to this meshd's schema in one transaction (a no-op when it is there);
/// refuses a database a newer meshd wrote.
pub(super) fn migrate(conn: &mut Connection, path: &Path) -> Result<(), StoreError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(sql("begin migration"))?;
    let version: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0)).map_err(sql("read schema version"))?;
    if version as usize > MIGRATIONS.len() {
        return Err(StoreError::TooNew(path.to_path_buf(), version, MIGRATIONS.len()));
    }
    if version as usize == MIGRATIONS.len() {
        return Ok(());
    }
    for (i, migration) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        tx.execute_batch(migration)
            .map_err(|e| StoreError::Sqlite { context: format!("migration {}", i + 1), source: e })?;
    }
    tx.pragma_update(None, "application_id", APPLICATION_ID).map_err(sql("set application id"))?;
    tx.pragma_update(None, "user_version", MIGRATIONS.len() as i64).map_err(sql("set schema version"))?;
    tx.commit().map_err(sql("commit migration"))
}

/// Test support: make a database at `path` as a meshd of schema `version` left it (its first `version`
/// real migrations, no rows), for tests of what newer programs do to an older database.
#[cfg(any(test, feature = "test-support"))]
pub fn create_at_schema(path: &Path, version: usize) -> Result<(), StoreError> {
    assert!(version <= MIGRATIONS.len(), "schema {version} is newer than this meshd's");
    let conn = Connection::open(path).map_err(sql("open"))?;
    for (i, migration) in MIGRATIONS[..version].iter().enumerate() {
        conn.execute_batch(migration)
            .map_err(|e| StoreError::Sqlite { context: format!("migration {}", i + 1), source: e })?;
    }
    conn.pragma_update(None, "application_id", APPLICATION_ID).map_err(sql("set application id"))?;
    conn.pragma_update(None, "user_version", version as i64).map_err(sql("set schema version"))
}

#[cfg(test)]
mod tests {
    use super::super::Store;
    use super::*;
    use meshd_core::model::{Protocol, Service};

    /// A database made by a meshd from before UDP services (schema 3), holding one service.
    fn schema_3_with_a_service(path: &Path) {
        let conn = Connection::open(path).unwrap();
        for migration in &MIGRATIONS[..3] {
            conn.execute_batch(migration).unwrap();
        }
        conn.pragma_update(None, "application_id", APPLICATION_ID).unwrap();
        conn.pragma_update(None, "user_version", 3).unwrap();
        conn.execute_batch(
            "INSERT INTO network VALUES (1, 'home', 'home.internal', '10.77.0.0/16', 'fd00:1:2::/48', 0);
             INSERT INTO addresses VALUES (1, NULL), (2, NULL);
             INSERT INTO nodes (name, public_key, addr_index, endpoint, listen_port, interface, role, created_at)
                 VALUES ('hub', 'xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=', 1, NULL, 51820, 'meshd0', 'hub', 0);
             INSERT INTO services (name, node_id, target, port, addr_index, created_at)
                 VALUES ('wallet', 1, '127.0.0.1:9737', 9737, 2, 0);",
        )
        .unwrap();
    }

    #[test]
    fn services_of_an_older_database_migrate_as_tcp() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meshd.db");
        schema_3_with_a_service(&path);

        let mut store = Store::open(&path).unwrap();
        let s = store.snapshot().unwrap();
        assert_eq!(s.services.len(), 1);
        assert_eq!(s.services[0].protocol, Protocol::Tcp);
        let version: i64 = store.conn.query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
        assert_eq!(version as usize, MIGRATIONS.len());

        // A UDP service is stored as such, and an update may switch the protocol.
        store
            .write(|w| {
                w.take_index(3)?;
                w.insert_service(&Service {
                    name: "dns".parse().unwrap(),
                    node: "hub".parse().unwrap(),
                    target: "127.0.0.1:5353".parse().unwrap(),
                    port: 53,
                    index: 3,
                    protocol: Protocol::Udp,
                })?;
                let mut wallet = w.snapshot()?.services[0].clone();
                wallet.protocol = Protocol::Udp;
                w.update_service(&wallet)
            })
            .unwrap();
        let protocols: Vec<(String, Protocol)> =
            store.snapshot().unwrap().services.iter().map(|v| (v.name.to_string(), v.protocol)).collect();
        assert_eq!(protocols, [("wallet".into(), Protocol::Udp), ("dns".into(), Protocol::Udp)]);
    }

    #[test]
    fn a_network_from_before_mtus_opens_at_1420_and_the_schema_keeps_mtus_in_range() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meshd.db");
        schema_3_with_a_service(&path);
        let mut store = Store::open(&path).unwrap();
        let s = store.snapshot().unwrap();
        assert_eq!(s.network.mtu, 1420);
        assert_eq!(s.nodes[0].mtu, None);
        store
            .write(|w| {
                w.set_network_mtu(1340)?;
                w.set_node_mtu(&"hub".parse().unwrap(), Some(1280))
            })
            .unwrap();
        let s = store.snapshot().unwrap();
        assert_eq!((s.network.mtu, s.nodes[0].mtu), (1340, Some(1280)));
        assert!(store.conn.execute("UPDATE network SET mtu = 1279", []).is_err());
        assert!(store.conn.execute("UPDATE nodes SET mtu = 9001", []).is_err());
    }

    /// Devices made before configs were recorded are taken to have the hub's endpoint and the MTU of now:
    /// the same values again name none of them, another one names them all.
    #[test]
    fn devices_of_an_older_database_are_taken_to_have_the_configs_of_now() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meshd.db");
        schema_3_with_a_service(&path);
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(
            "UPDATE nodes SET endpoint = '192.0.2.1:51820';
             INSERT INTO addresses VALUES (3, NULL);
             INSERT INTO devices (name, public_key, preshared_key, addr_index, created_at)
                 VALUES ('phone', 'yTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=', 'zTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=', 3, 0);",
        )
        .unwrap();
        drop(conn);
        let mut store = Store::open(&path).unwrap();
        let stale = store
            .write(|w| {
                Ok::<_, StoreError>([
                    w.devices_configured_for_another_endpoint("192.0.2.1:51820")?,
                    w.devices_configured_for_another_mtu(1420)?,
                    w.devices_configured_for_another_endpoint("192.0.2.1:51821")?,
                    w.devices_configured_for_another_mtu(1400)?,
                ])
            })
            .unwrap();
        let phone: meshd_core::input::Label = "phone".parse().unwrap();
        assert_eq!(stale, [vec![], vec![], vec![phone.clone()], vec![phone]]);
    }

    #[test]
    fn a_protocol_other_than_tcp_or_udp_is_refused_by_the_schema() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meshd.db");
        schema_3_with_a_service(&path);
        let store = Store::open(&path).unwrap();
        assert!(store.conn.execute("UPDATE services SET protocol = 'sctp'", []).is_err());
    }
}
