//! The controller's state: one SQLite database per network, in the state directory.
//!
//! SQL lives here and nowhere else. Writers take SQLite's write lock up front (`BEGIN IMMEDIATE`), so
//! concurrent `meshctl` calls serialise and never hand out the same address twice; a failed operation
//! rolls back and leaves the file as it was.
//!
//! - `migrations`: the schema, as numbered migrations;
//! - `writer`: [`Writer`], every change inside one write transaction;
//! - `read`: rows back into the model ([`Snapshot`], invites).

mod migrations;
mod read;
mod writer;

use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, OptionalExtension, TransactionBehavior};

use meshd_core::keys::PublicKey;
use meshd_core::model::Snapshot;

use migrations::APPLICATION_ID;
#[cfg(any(test, feature = "test-support"))]
pub use migrations::create_at_schema;
use read::read_snapshot;
pub use writer::Writer;

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
    #[error(
        "database holds an invalid value in {column}: {reason}; it was not written by meshd: restore a backup or set it right with sqlite3"
    )]
    Invalid { column: String, reason: String },
}

/// Map a SQLite error to [`StoreError::Sqlite`] saying what was being done.
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
        migrations::migrate(&mut store.conn, path)?;
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
        migrations::migrate(&mut store.conn, path)?;
        Ok(store)
    }

    fn configure(&mut self) -> Result<(), StoreError> {
        self.conn.busy_timeout(Duration::from_secs(10)).map_err(sql("set busy timeout"))?;
        self.conn.pragma_update(None, "foreign_keys", true).map_err(sql("enable foreign keys"))?;
        Ok(())
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

    /// Whether `key` was the key of a node that was removed (and is no node's key since).
    pub fn is_removed_key(&mut self, key: &PublicKey) -> Result<bool, StoreError> {
        self.conn
            .query_row("SELECT 1 FROM removed_node_keys WHERE public_key = ?1", [key.as_str()], |_| Ok(()))
            .optional()
            .map(|found| found.is_some())
            .map_err(sql("read removed node keys"))
    }

    /// The whole network as stored.
    pub fn snapshot(&mut self) -> Result<Snapshot, StoreError> {
        let tx = self.conn.transaction().map_err(sql("begin read"))?;
        read_snapshot(&tx)
    }
}
