//! The controller's state: one SQLite database per network, in the state directory.
//!
//! SQL lives here and nowhere else. Writers take SQLite's write lock up front (`BEGIN IMMEDIATE`), so
//! concurrent `meshctl` calls serialise and never hand out the same address twice; a failed operation
//! rolls back and leaves the file as it was.

use std::collections::BTreeSet;
use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, OptionalExtension, Transaction, TransactionBehavior, params};

use meshd_core::clock::{self, Stamp};

use crate::host::clock::{now as stamp_now, wall_now as now};
use meshd_core::input::{HostPort, Label};
use meshd_core::model::{AccessRule, Device, Invite, InviteStatus, Network, Node, Role, Service, Snapshot};

/// `PRAGMA application_id` of a meshd database ("mshd"), so a foreign SQLite file is recognised.
const APPLICATION_ID: i32 = 0x6d73_6864;

/// Numbered migrations; `PRAGMA user_version` records how many have run.
const MIGRATIONS: &[&str] = &[
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
];

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

/// How long a released address stays out of circulation, so a stale peer config elsewhere cannot
/// reach whoever gets it next.
pub const ADDRESS_COOLDOWN: Duration = Duration::from_secs(3600);

/// What went wrong with the state directory or database.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0} is not a meshd state directory (no meshd.db; run `meshd init` first)")]
    NotInitialized(PathBuf),
    #[error("{0} is not a meshd database")]
    Foreign(PathBuf),
    #[error("{0} already holds a meshd network; refusing to overwrite it")]
    AlreadyInitialized(PathBuf),
    #[error("{0} was written by a newer meshd (schema {1}, this one knows {2})")]
    TooNew(PathBuf, i64, usize),
    #[error("database {context}: {source}")]
    Sqlite {
        context: String,
        #[source]
        source: rusqlite::Error,
    },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("database holds an invalid value in {0}")]
    Corrupt(String),
}

fn sql(context: &str) -> impl FnOnce(rusqlite::Error) -> StoreError + '_ {
    move |source| StoreError::Sqlite { context: context.to_owned(), source }
}

/// A DER certificate and its DER (PKCS#8) private key.
pub type CertAndKey = (Vec<u8>, Vec<u8>);

/// An open meshd database.
pub struct Store {
    conn: Connection,
}

impl Store {
    /// Create the database file (0600) for a new network; fails if one exists.
    pub fn create(path: &Path) -> Result<Store, StoreError> {
        // Create the file ourselves so its mode is 0600 from the first byte; SQLite treats an empty
        // file as a new database and gives its journal the same mode.
        OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                StoreError::AlreadyInitialized(path.parent().unwrap_or(path).to_path_buf())
            } else {
                StoreError::Io { context: format!("creating {}", path.display()), source: e }
            }
        })?;
        let conn =
            Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX)
                .map_err(sql("open"))?;
        let mut store = Store { conn };
        store.configure()?;
        store.migrate(path)?;
        Ok(store)
    }

    /// Open an existing meshd database, refusing anything that is not one (without writing to it).
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let dir = path.parent().unwrap_or(path).to_path_buf();
        if !path.exists() {
            return Err(StoreError::NotInitialized(dir));
        }
        let conn =
            Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX)
                .map_err(sql("open"))?;
        // Read-only checks first: a foreign file must not be touched.
        let app_id: i32 = conn
            .query_row("PRAGMA application_id", [], |r| r.get(0))
            .map_err(|_| StoreError::Foreign(path.to_path_buf()))?;
        if app_id != APPLICATION_ID {
            return Err(StoreError::Foreign(path.to_path_buf()));
        }
        let mut store = Store { conn };
        store.configure()?;
        store.migrate(path)?;
        Ok(store)
    }

    fn configure(&mut self) -> Result<(), StoreError> {
        self.conn.busy_timeout(Duration::from_secs(10)).map_err(sql("set busy timeout"))?;
        self.conn.pragma_update(None, "foreign_keys", true).map_err(sql("enable foreign keys"))?;
        Ok(())
    }

    fn migrate(&mut self, path: &Path) -> Result<(), StoreError> {
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(sql("begin migration"))?;
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

    /// Run `f` in a write transaction: committed if it returns `Ok`, rolled back otherwise.
    pub fn write<T, E: From<StoreError>>(&mut self, f: impl FnOnce(&Writer<'_>) -> Result<T, E>) -> Result<T, E> {
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(sql("begin write"))?;
        let writer = Writer { tx };
        let value = f(&writer)?;
        writer.tx.commit().map_err(sql("commit"))?;
        Ok(value)
    }

    /// Run `f` in a write transaction like [`Store::write`], then roll it back whatever it did: what `f`
    /// returns is what it would return as a change now, and the database stays as it was.
    pub fn preview<T, E: From<StoreError>>(&mut self, f: impl FnOnce(&Writer<'_>) -> Result<T, E>) -> Result<T, E> {
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(sql("begin preview"))?;
        let writer = Writer { tx };
        let value = f(&writer);
        writer.tx.rollback().map_err(sql("roll back preview"))?;
        value
    }

    /// The whole network as stored.
    pub fn snapshot(&mut self) -> Result<Snapshot, StoreError> {
        let tx = self.conn.transaction().map_err(sql("begin read"))?;
        read_snapshot(&tx)
    }
}

/// Access to the database inside one write transaction.
pub struct Writer<'a> {
    tx: Transaction<'a>,
}

impl Writer<'_> {
    /// The state as seen inside this transaction.
    pub fn snapshot(&self) -> Result<Snapshot, StoreError> {
        read_snapshot(&self.tx)
    }

    /// Store the network's identity (once, at init).
    pub fn insert_network(&self, network: &Network) -> Result<(), StoreError> {
        self.tx
            .execute(
                "INSERT INTO network (id, name, domain, cidr, ula, created_at) VALUES (1, ?1, ?2, ?3, ?4, ?5)",
                params![
                    network.name.as_str(),
                    network.domain,
                    network.cidr.to_string(),
                    network.ula.to_string(),
                    now()
                ],
            )
            .map_err(sql("insert network"))?;
        Ok(())
    }

    /// Host indexes that may not be handed out at `now`: in use, or released less than `cooldown` of
    /// real time ago ([`clock::seconds_between`]: a wall clock that jumps neither blocks an address
    /// for a year nor frees it seconds after its release).
    pub fn unavailable_indexes(&self, cooldown: Duration, now: &Stamp) -> Result<BTreeSet<u32>, StoreError> {
        let mut stmt = self
            .tx
            .prepare("SELECT addr_index, released_at, released_boot, released_uptime FROM addresses")
            .map_err(sql("read address ledger"))?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, u32>(0)?,
                    r.get::<_, Option<i64>>(1)?,
                    r.get::<_, Option<String>>(2)?,
                    r.get::<_, Option<i64>>(3)?,
                ))
            })
            .map_err(sql("read address ledger"))?;
        let cooldown = cooldown.as_secs() as i64;
        let mut unavailable = BTreeSet::new();
        for row in rows {
            let (index, released_at, boot, uptime) = row.map_err(sql("read address ledger"))?;
            let cooling = match released_at {
                None => true,
                Some(wall) => {
                    let released = Stamp { wall, boot: boot.unwrap_or_default(), uptime: uptime.unwrap_or(0) };
                    clock::seconds_between(&released, now) < cooldown
                }
            };
            if cooling {
                unavailable.insert(index);
            }
        }
        Ok(unavailable)
    }

    /// Mark `index` as taken.
    pub fn take_index(&self, index: u32) -> Result<(), StoreError> {
        self.tx
            .execute(
                "INSERT INTO addresses (addr_index, released_at) VALUES (?1, NULL)
                 ON CONFLICT (addr_index) DO UPDATE SET released_at = NULL",
                [index],
            )
            .map_err(sql("take address"))?;
        Ok(())
    }

    fn release_index(&self, index: u32) -> Result<(), StoreError> {
        let now = stamp_now();
        self.tx
            .execute(
                "UPDATE addresses SET released_at = ?1, released_boot = ?2, released_uptime = ?3 WHERE addr_index = ?4",
                params![now.wall, now.boot, now.uptime, index],
            )
            .map_err(sql("release address"))?;
        Ok(())
    }

    /// Store a node; its index must have been taken.
    pub fn insert_node(&self, node: &Node) -> Result<(), StoreError> {
        self.tx
            .execute(
                "INSERT INTO nodes (name, public_key, addr_index, endpoint, listen_port, interface, role, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![
                    node.name.as_str(),
                    node.public_key,
                    node.index,
                    node.endpoint.as_ref().map(ToString::to_string),
                    node.listen_port,
                    node.interface,
                    role_text(node.role),
                    now()
                ],
            )
            .map_err(sql("insert node"))?;
        Ok(())
    }

    /// Store a device and its grants; its index must have been taken and its services must exist.
    pub fn insert_device(&self, device: &Device) -> Result<(), StoreError> {
        self.tx
            .execute(
                "INSERT INTO devices (name, public_key, preshared_key, addr_index, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![device.name.as_str(), device.public_key, device.preshared_key, device.index, now()],
            )
            .map_err(sql("insert device"))?;
        let device_id = self.tx.last_insert_rowid();
        for service in &device.allow {
            self.tx
                .execute(
                    "INSERT INTO grants (device_id, service_id) SELECT ?1, id FROM services WHERE name = ?2",
                    params![device_id, service.as_str()],
                )
                .map_err(sql("insert grant"))?;
        }
        Ok(())
    }

    /// Store a service on an existing node; its index must have been taken.
    pub fn insert_service(&self, service: &Service) -> Result<(), StoreError> {
        self.tx
            .execute(
                "INSERT INTO services (name, node_id, target, port, addr_index, created_at, protocol)
                 SELECT ?1, id, ?2, ?3, ?4, ?5, ?7 FROM nodes WHERE name = ?6",
                params![
                    service.name.as_str(),
                    service.target.to_string(),
                    service.port,
                    service.index,
                    now(),
                    service.node.as_str(),
                    service.protocol.as_str()
                ],
            )
            .map_err(sql("insert service"))?;
        Ok(())
    }

    /// Replace a device's public and preshared keys.
    pub fn update_device_keys(&self, device: &Device) -> Result<(), StoreError> {
        self.tx
            .execute(
                "UPDATE devices SET public_key = ?1, preshared_key = ?2 WHERE name = ?3",
                params![device.public_key, device.preshared_key, device.name.as_str()],
            )
            .map_err(sql("update device keys"))?;
        Ok(())
    }

    /// Set whether a node is disabled; false if there is no such node.
    pub fn set_node_disabled(&self, name: &Label, disabled: bool) -> Result<bool, StoreError> {
        let n = self
            .tx
            .execute("UPDATE nodes SET disabled = ?1 WHERE name = ?2", params![disabled, name.as_str()])
            .map_err(sql("update node"))?;
        Ok(n == 1)
    }

    /// Ask (or stop asking) a node for a new key.
    pub fn set_node_rotate(&self, name: &Label, rotate: bool) -> Result<(), StoreError> {
        self.tx
            .execute("UPDATE nodes SET rotate_key = ?1 WHERE name = ?2", params![rotate, name.as_str()])
            .map_err(sql("update node"))?;
        Ok(())
    }

    /// Give a node its new public key; the rotation it was asked for is done.
    pub fn set_node_key(&self, name: &Label, public_key: &str) -> Result<(), StoreError> {
        self.tx
            .execute(
                "UPDATE nodes SET public_key = ?1, rotate_key = 0 WHERE name = ?2",
                params![public_key, name.as_str()],
            )
            .map_err(sql("update node key"))?;
        Ok(())
    }

    /// Add an access rule between two existing nodes; false if it was there already.
    pub fn insert_rule(&self, rule: &AccessRule) -> Result<bool, StoreError> {
        let n = self
            .tx
            .execute(
                "INSERT OR IGNORE INTO access_rules (from_node, to_node)
                 SELECT f.id, t.id FROM nodes f, nodes t WHERE f.name = ?1 AND t.name = ?2",
                params![rule.from.as_str(), rule.to.as_str()],
            )
            .map_err(sql("insert access rule"))?;
        Ok(n == 1)
    }

    /// Remove an access rule; false if there was none.
    pub fn delete_rule(&self, rule: &AccessRule) -> Result<bool, StoreError> {
        let n = self
            .tx
            .execute(
                "DELETE FROM access_rules WHERE from_node = (SELECT id FROM nodes WHERE name = ?1)
                 AND to_node = (SELECT id FROM nodes WHERE name = ?2)",
                params![rule.from.as_str(), rule.to.as_str()],
            )
            .map_err(sql("delete access rule"))?;
        Ok(n == 1)
    }

    /// Replace the grants of an existing device; the services must exist.
    pub fn set_device_grants(&self, name: &Label, allow: &[Label]) -> Result<(), StoreError> {
        self.tx
            .execute("DELETE FROM grants WHERE device_id = (SELECT id FROM devices WHERE name = ?1)", [name.as_str()])
            .map_err(sql("delete grants"))?;
        for service in allow {
            self.tx
                .execute(
                    "INSERT INTO grants (device_id, service_id)
                     SELECT d.id, s.id FROM devices d, services s WHERE d.name = ?1 AND s.name = ?2",
                    params![name.as_str(), service.as_str()],
                )
                .map_err(sql("insert grant"))?;
        }
        Ok(())
    }

    /// Point an existing service elsewhere (target, port, protocol).
    pub fn update_service(&self, service: &Service) -> Result<(), StoreError> {
        self.tx
            .execute(
                "UPDATE services SET target = ?1, port = ?2, protocol = ?3 WHERE name = ?4",
                params![service.target.to_string(), service.port, service.protocol.as_str(), service.name.as_str()],
            )
            .map_err(sql("update service"))?;
        Ok(())
    }

    /// Store a new pending invite.
    pub fn insert_invite(&self, invite: &Invite) -> Result<(), StoreError> {
        self.tx
            .execute(
                "INSERT INTO invites (id, name, role, secret_hash, created_at, created_boot, created_uptime,
                                      expires_at, status)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, 'pending')",
                params![
                    invite.id,
                    invite.name.as_str(),
                    role_text(invite.role),
                    invite.secret_hash,
                    invite.created.wall,
                    invite.created.boot,
                    invite.created.uptime,
                    invite.expires_at
                ],
            )
            .map_err(sql("insert invite"))?;
        Ok(())
    }

    /// The invite with `id`, whatever its status.
    pub fn invite(&self, id: &str) -> Result<Option<Invite>, StoreError> {
        let mut stmt = self
            .tx
            .prepare("SELECT id, name, role, secret_hash, expires_at, status, created_at, created_boot, created_uptime FROM invites WHERE id = ?1")
            .map_err(sql("read invite"))?;
        Ok(read_invites(&mut stmt, [id])?.pop())
    }

    /// Invites not yet redeemed or cancelled (expired ones included), oldest first.
    pub fn pending_invites(&self) -> Result<Vec<Invite>, StoreError> {
        let mut stmt = self
            .tx
            .prepare(
                "SELECT id, name, role, secret_hash, expires_at, status, created_at, created_boot, created_uptime FROM invites WHERE status = 'pending'
                 ORDER BY rowid",
            )
            .map_err(sql("read invites"))?;
        read_invites(&mut stmt, [])
    }

    /// Mark an invite redeemed or cancelled.
    pub fn finish_invite(&self, id: &str, status: InviteStatus) -> Result<(), StoreError> {
        let status = match status {
            InviteStatus::Pending => "pending",
            InviteStatus::Redeemed => "redeemed",
            InviteStatus::Cancelled => "cancelled",
        };
        self.tx
            .execute("UPDATE invites SET status = ?1, finished_at = ?2 WHERE id = ?3", params![status, now(), id])
            .map_err(sql("update invite"))?;
        Ok(())
    }

    /// The controller's join certificate and key (DER), if made yet.
    pub fn join_identity(&self) -> Result<Option<CertAndKey>, StoreError> {
        self.tx
            .query_row("SELECT cert, key FROM join_identity WHERE id = 1", [], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()
            .map_err(sql("read join identity"))
    }

    /// Store the controller's join certificate and key (DER).
    pub fn insert_join_identity(&self, cert: &[u8], key: &[u8]) -> Result<(), StoreError> {
        self.tx
            .execute("INSERT INTO join_identity (id, cert, key) VALUES (1, ?1, ?2)", params![cert, key])
            .map_err(sql("store join identity"))?;
        Ok(())
    }

    /// Delete a node that hosts no service and release its address; false if there was none.
    pub fn delete_node(&self, name: &Label) -> Result<bool, StoreError> {
        self.delete_addressed("nodes", name)
    }

    /// Delete a device (and its grants) and release its address; false if there was none.
    pub fn delete_device(&self, name: &Label) -> Result<bool, StoreError> {
        self.delete_addressed("devices", name)
    }

    /// Delete a service (and its grants) and release its address; false if there was none.
    pub fn delete_service(&self, name: &Label) -> Result<bool, StoreError> {
        self.delete_addressed("services", name)
    }

    fn delete_addressed(&self, table: &'static str, name: &Label) -> Result<bool, StoreError> {
        let index: Option<u32> = self
            .tx
            .query_row(&format!("DELETE FROM {table} WHERE name = ?1 RETURNING addr_index"), [name.as_str()], |r| {
                r.get(0)
            })
            .optional()
            .map_err(sql("delete"))?;
        match index {
            Some(index) => self.release_index(index).map(|()| true),
            None => Ok(false),
        }
    }
}

fn read_snapshot(conn: &Connection) -> Result<Snapshot, StoreError> {
    let network = conn
        .query_row("SELECT name, domain, cidr, ula FROM network WHERE id = 1", [], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, String>(2)?, r.get::<_, String>(3)?))
        })
        .map_err(sql("read network"))?;
    let network = Network {
        name: parse_column("network.name", &network.0)?,
        domain: network.1,
        cidr: parse_column("network.cidr", &network.2)?,
        ula: parse_column("network.ula", &network.3)?,
    };

    let mut stmt = conn
        .prepare(
            "SELECT name, public_key, addr_index, endpoint, listen_port, interface, role, disabled, rotate_key
             FROM nodes ORDER BY addr_index",
        )
        .map_err(sql("read nodes"))?;
    let raw_nodes = stmt
        .query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, u32>(2)?,
                r.get::<_, Option<String>>(3)?,
                r.get::<_, u16>(4)?,
                r.get::<_, String>(5)?,
                r.get::<_, String>(6)?,
                r.get::<_, bool>(7)?,
                r.get::<_, bool>(8)?,
            ))
        })
        .and_then(Iterator::collect::<Result<Vec<_>, _>>)
        .map_err(sql("read nodes"))?;
    let mut nodes = Vec::with_capacity(raw_nodes.len());
    for (name, public_key, index, endpoint, listen_port, interface, role, disabled, rotate_key) in raw_nodes {
        nodes.push(Node {
            name: parse_column("nodes.name", &name)?,
            public_key,
            index,
            endpoint: endpoint.map(|e| parse_column::<HostPort>("nodes.endpoint", &e)).transpose()?,
            listen_port,
            interface,
            role: match role.as_str() {
                "hub" => Role::Hub,
                "node" => Role::Node,
                "relay" => Role::Relay,
                _ => return Err(StoreError::Corrupt("nodes.role".into())),
            },
            disabled,
            rotate_key,
        });
    }

    let mut stmt = conn
        .prepare(
            "SELECT d.name, d.public_key, d.preshared_key, d.addr_index,
                    (SELECT group_concat(s.name, ',') FROM grants g JOIN services s ON s.id = g.service_id
                     WHERE g.device_id = d.id ORDER BY s.name)
             FROM devices d ORDER BY d.addr_index",
        )
        .map_err(sql("read devices"))?;
    let raw_devices = stmt
        .query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, u32>(3)?,
                r.get::<_, Option<String>>(4)?,
            ))
        })
        .and_then(Iterator::collect::<Result<Vec<_>, _>>)
        .map_err(sql("read devices"))?;
    let mut devices = Vec::with_capacity(raw_devices.len());
    for (name, public_key, preshared_key, index, allow) in raw_devices {
        let mut allow = allow
            .unwrap_or_default()
            .split(',')
            .filter(|s| !s.is_empty())
            .map(|s| parse_column::<Label>("services.name", s))
            .collect::<Result<Vec<_>, _>>()?;
        allow.sort();
        devices.push(Device { name: parse_column("devices.name", &name)?, public_key, preshared_key, index, allow });
    }

    let mut stmt = conn
        .prepare(
            "SELECT s.name, n.name, s.target, s.port, s.addr_index, s.protocol
             FROM services s JOIN nodes n ON n.id = s.node_id ORDER BY s.addr_index",
        )
        .map_err(sql("read services"))?;
    let raw_services = stmt
        .query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, u16>(3)?,
                r.get::<_, u32>(4)?,
                r.get::<_, String>(5)?,
            ))
        })
        .and_then(Iterator::collect::<Result<Vec<_>, _>>)
        .map_err(sql("read services"))?;
    let mut services = Vec::with_capacity(raw_services.len());
    for (name, node, target, port, index, protocol) in raw_services {
        services.push(Service {
            name: parse_column("services.name", &name)?,
            node: parse_column("nodes.name", &node)?,
            target: parse_column("services.target", &target)?,
            port,
            index,
            protocol: parse_column("services.protocol", &protocol)?,
        });
    }
    let mut stmt = conn
        .prepare(
            "SELECT f.name, t.name FROM access_rules r JOIN nodes f ON f.id = r.from_node JOIN nodes t ON t.id = r.to_node
             ORDER BY f.name, t.name",
        )
        .map_err(sql("read access rules"))?;
    let raw_rules = stmt
        .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
        .and_then(Iterator::collect::<Result<Vec<_>, _>>)
        .map_err(sql("read access rules"))?;
    let rules = raw_rules
        .into_iter()
        .map(|(from, to)| {
            Ok(AccessRule { from: parse_column("nodes.name", &from)?, to: parse_column("nodes.name", &to)? })
        })
        .collect::<Result<Vec<_>, StoreError>>()?;
    Ok(Snapshot { network, nodes, devices, services, rules })
}

fn read_invites(stmt: &mut rusqlite::Statement<'_>, args: impl rusqlite::Params) -> Result<Vec<Invite>, StoreError> {
    let raw = stmt
        .query_map(args, |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, i64>(4)?,
                r.get::<_, String>(5)?,
                Stamp {
                    wall: r.get::<_, i64>(6)?,
                    boot: r.get::<_, Option<String>>(7)?.unwrap_or_default(),
                    uptime: r.get::<_, Option<i64>>(8)?.unwrap_or(0),
                },
            ))
        })
        .and_then(Iterator::collect::<Result<Vec<_>, _>>)
        .map_err(sql("read invites"))?;
    raw.into_iter()
        .map(|(id, name, role, secret_hash, expires_at, status, created)| {
            Ok(Invite {
                id,
                name: parse_column("invites.name", &name)?,
                role: match role.as_str() {
                    "node" => Role::Node,
                    "relay" => Role::Relay,
                    _ => return Err(StoreError::Corrupt("invites.role".into())),
                },
                secret_hash,
                created,
                expires_at,
                status: match status.as_str() {
                    "pending" => InviteStatus::Pending,
                    "redeemed" => InviteStatus::Redeemed,
                    "cancelled" => InviteStatus::Cancelled,
                    _ => return Err(StoreError::Corrupt("invites.status".into())),
                },
            })
        })
        .collect()
}

fn parse_column<T: std::str::FromStr>(column: &str, text: &str) -> Result<T, StoreError> {
    text.parse().map_err(|_| StoreError::Corrupt(column.to_owned()))
}

fn role_text(role: Role) -> &'static str {
    match role {
        Role::Hub => "hub",
        Role::Node => "node",
        Role::Relay => "relay",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshd_core::model::Protocol;

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
                 VALUES ('hub', 'HUB', 1, NULL, 51820, 'meshd0', 'hub', 0);
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
    fn a_protocol_other_than_tcp_or_udp_is_refused_by_the_schema() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meshd.db");
        schema_3_with_a_service(&path);
        let store = Store::open(&path).unwrap();
        assert!(store.conn.execute("UPDATE services SET protocol = 'sctp'", []).is_err());
    }
}

#[cfg(test)]
mod clock_tests {
    //! The address cooldown against a wall clock that jumps (hosts without a real-time clock).
    use super::*;

    const YEAR: i64 = 365 * 86_400;
    const T: i64 = 1_800_000_000;

    fn released(w: &Writer<'_>, index: u32, at: &Stamp) {
        w.tx.execute(
            "INSERT INTO addresses (addr_index, released_at, released_boot, released_uptime) VALUES (?1, ?2, ?3, ?4)",
            params![index, at.wall, at.boot, at.uptime],
        )
        .unwrap();
    }

    fn this_boot(wall: i64, uptime: i64) -> Stamp {
        Stamp { wall, boot: "b1".into(), uptime }
    }

    #[test]
    fn a_released_address_cools_down_for_an_hour_of_real_time_whatever_the_wall_clock_does() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::create(&dir.path().join("meshd.db")).unwrap();
        let cooldown = Duration::from_secs(3600);
        store
            .write(|w| {
                released(w, 2, &this_boot(T, 1_000));
                // Released before a reboot, by a clock then a year ahead.
                released(w, 3, &Stamp { wall: T + YEAR, boot: "b0".into(), uptime: 50 });
                // Rows from before boot times were kept: two hours and one minute ago by the wall clock.
                w.tx.execute("INSERT INTO addresses (addr_index, released_at) VALUES (4, ?1)", [T - 7_200]).unwrap();
                w.tx.execute("INSERT INTO addresses (addr_index, released_at) VALUES (6, ?1)", [T - 60]).unwrap();
                w.take_index(5)?;
                let unavailable = |now: Stamp| w.unavailable_indexes(cooldown, &now).unwrap();
                // Ten real seconds later with the wall clock a year ahead: no reuse seconds after removal.
                // Index 3 waits for this boot to have lasted the cooldown.
                assert_eq!(unavailable(this_boot(T + YEAR, 1_010)), BTreeSet::from([2, 3, 5]));
                // An hour of real time later with the wall clock a year behind: no year-long block. (Rows
                // without boot times go by the wall clock alone, as they always did.)
                assert_eq!(unavailable(this_boot(T - YEAR, 4_600)), BTreeSet::from([4, 5, 6]));
                // The clock right and the host up for days: a row without boot times released a minute
                // ago still cools down (it may come from this very boot).
                assert_eq!(unavailable(this_boot(T, 900_000)), BTreeSet::from([5, 6]));
                Ok::<_, StoreError>(())
            })
            .unwrap();
    }

    #[test]
    fn a_release_records_both_clocks() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::create(&dir.path().join("meshd.db")).unwrap();
        store
            .write(|w| {
                w.take_index(7)?;
                w.release_index(7)?;
                let now = stamp_now();
                assert_eq!(w.unavailable_indexes(Duration::from_secs(3600), &now)?, BTreeSet::from([7]));
                let later = Stamp { wall: now.wall + 10 * YEAR, ..now.clone() };
                assert_eq!(w.unavailable_indexes(Duration::from_secs(3600), &later)?, BTreeSet::from([7]));
                let real_hour_later = Stamp { uptime: now.uptime + 3_601, ..now };
                assert!(w.unavailable_indexes(Duration::from_secs(3600), &real_hour_later)?.is_empty());
                Ok::<_, StoreError>(())
            })
            .unwrap();
    }
}
