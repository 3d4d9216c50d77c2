//! [`Writer`]: every statement that changes the network, and the reads a change depends on, inside one
//! write transaction (`BEGIN IMMEDIATE`) that [`super::Store::write`] commits or rolls back.

use std::collections::BTreeSet;
use std::time::Duration;

use rusqlite::{OptionalExtension, Transaction, params};

use meshd_core::clock::{self, Stamp};
use meshd_core::input::{HostPort, Label, PublicName};
use meshd_core::keys::PublicKey;
use meshd_core::model::{
    AccessRule, Device, DeviceKeys, Exposure, Invite, InviteStatus, Network, Node, OnionClient, Role, Service, Snapshot,
};

use super::read::{read_invites, read_snapshot};
use super::{CertAndKey, StoreError, sql};
use crate::host::clock::{now as stamp_now, wall_now as now};

/// Access to the database inside one write transaction.
pub struct Writer<'a> {
    pub(super) tx: Transaction<'a>,
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
                "INSERT INTO network (id, name, domain, cidr, ula, created_at, mtu) VALUES (1, ?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    network.name.as_str(),
                    network.domain,
                    network.cidr.to_string(),
                    network.ula.to_string(),
                    now(),
                    network.mtu
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
                "INSERT INTO nodes (name, public_key, addr_index, endpoint, listen_port, interface, role, created_at, mtu)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                params![
                    node.name.as_str(),
                    node.public_key.as_str(),
                    node.index,
                    node.endpoint.as_ref().map(ToString::to_string),
                    node.listen_port,
                    node.interface.as_str(),
                    role_text(node.role),
                    now(),
                    node.mtu
                ],
            )
            .map_err(sql("insert node"))?;
        Ok(())
    }

    /// Store a device and its grants; its index must have been taken and its services must exist.
    pub fn insert_device(&self, device: &Device, keys: &DeviceKeys) -> Result<(), StoreError> {
        self.tx
            .execute(
                "INSERT INTO devices (name, public_key, preshared_key, addr_index, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![device.name.as_str(), keys.public_key.as_str(), keys.preshared_key.as_str(), device.index, now()],
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

    /// Store a public name; [`StoreError`] when the name is taken (the primary key).
    pub fn insert_exposure(&self, exposure: &Exposure) -> Result<(), StoreError> {
        self.tx
            .execute(
                "INSERT INTO exposures (hostname, service_id, relay_id, tls, created_at)
                 SELECT ?1, s.id, n.id, ?4, ?5 FROM services s, nodes n WHERE s.name = ?2 AND n.name = ?3",
                params![
                    exposure.hostname.as_str(),
                    exposure.service.as_str(),
                    exposure.relay.as_str(),
                    exposure.tls.as_str(),
                    now()
                ],
            )
            .map_err(sql("insert public name"))?;
        Ok(())
    }

    /// Remove a service's public name; whether there was one.
    pub fn delete_exposure(&self, service: &Label, hostname: &PublicName) -> Result<bool, StoreError> {
        let deleted = self
            .tx
            .execute(
                "DELETE FROM exposures WHERE hostname = ?1 AND service_id = (SELECT id FROM services WHERE name = ?2)",
                params![hostname.as_str(), service.as_str()],
            )
            .map_err(sql("delete public name"))?;
        Ok(deleted > 0)
    }

    /// Serve service `service` as an onion service at `port`, or change the one it has to `port` and
    /// `authorized_only`.
    pub fn upsert_onion(&self, service: &Label, port: u16, authorized_only: bool) -> Result<(), StoreError> {
        self.tx
            .execute(
                "INSERT INTO onions (service_id, port, authorized_only, created_at)
                 SELECT id, ?2, ?3, ?4 FROM services WHERE name = ?1
                 ON CONFLICT (service_id) DO UPDATE SET port = excluded.port, authorized_only = excluded.authorized_only",
                params![service.as_str(), port, authorized_only, now()],
            )
            .map_err(sql("store onion service"))?;
        Ok(())
    }

    /// Stop serving service `service` as an onion service (its clients go with it); whether it was.
    pub fn delete_onion(&self, service: &Label) -> Result<bool, StoreError> {
        let deleted = self
            .tx
            .execute(
                "DELETE FROM onions WHERE service_id = (SELECT id FROM services WHERE name = ?1)",
                params![service.as_str()],
            )
            .map_err(sql("delete onion service"))?;
        Ok(deleted > 0)
    }

    /// Authorize `client` to find the onion service of `service` (one key per device and service).
    pub fn insert_onion_client(&self, service: &Label, client: &OnionClient) -> Result<(), StoreError> {
        self.tx
            .execute(
                "INSERT INTO onion_clients (service_id, device_id, public_key, created_at)
                 SELECT s.id, d.id, ?3, ?4 FROM services s, devices d WHERE s.name = ?1 AND d.name = ?2",
                params![service.as_str(), client.device.as_str(), client.public_key.to_string(), now()],
            )
            .map_err(sql("store onion client"))?;
        Ok(())
    }

    /// Take device `device` off the clients of the onion service of `service`; whether it was one.
    pub fn delete_onion_client(&self, service: &Label, device: &Label) -> Result<bool, StoreError> {
        let deleted = self
            .tx
            .execute(
                "DELETE FROM onion_clients WHERE service_id = (SELECT id FROM services WHERE name = ?1)
                 AND device_id = (SELECT id FROM devices WHERE name = ?2)",
                params![service.as_str(), device.as_str()],
            )
            .map_err(sql("delete onion client"))?;
        Ok(deleted > 0)
    }

    /// Replace a device's public and preshared keys.
    pub fn update_device_keys(&self, name: &Label, keys: &DeviceKeys) -> Result<(), StoreError> {
        self.tx
            .execute(
                "UPDATE devices SET public_key = ?1, preshared_key = ?2 WHERE name = ?3",
                params![keys.public_key.as_str(), keys.preshared_key.as_str(), name.as_str()],
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

    /// Set where a node is reached (`None`: nowhere, it is behind NAT).
    pub fn set_node_endpoint(&self, name: &Label, endpoint: Option<&HostPort>) -> Result<(), StoreError> {
        self.tx
            .execute(
                "UPDATE nodes SET endpoint = ?1 WHERE name = ?2",
                params![endpoint.map(ToString::to_string), name.as_str()],
            )
            .map_err(sql("update node endpoint"))?;
        Ok(())
    }

    /// Set a node's own MTU (`None`: the network's).
    pub fn set_node_mtu(&self, name: &Label, mtu: Option<u16>) -> Result<(), StoreError> {
        self.tx
            .execute("UPDATE nodes SET mtu = ?1 WHERE name = ?2", params![mtu, name.as_str()])
            .map_err(sql("update node mtu"))?;
        Ok(())
    }

    /// Set the network's MTU.
    pub fn set_network_mtu(&self, mtu: u16) -> Result<(), StoreError> {
        self.tx.execute("UPDATE network SET mtu = ?1 WHERE id = 1", params![mtu]).map_err(sql("update network mtu"))?;
        Ok(())
    }

    /// Record what device `name`'s config, as just handed out, says of the hub's endpoint and the MTU.
    pub fn set_device_config(&self, name: &Label, endpoint: &str, mtu: u16) -> Result<(), StoreError> {
        self.tx
            .execute(
                "UPDATE devices SET config_endpoint = ?1, config_mtu = ?2 WHERE name = ?3",
                params![endpoint, mtu, name.as_str()],
            )
            .map_err(sql("record a device's config"))?;
        Ok(())
    }

    /// The devices whose config names another hub endpoint than `endpoint` (as `HOST:PORT`), by name.
    pub fn devices_configured_for_another_endpoint(&self, endpoint: &str) -> Result<Vec<Label>, StoreError> {
        self.device_names("SELECT name FROM devices WHERE config_endpoint IS NOT ?1 ORDER BY name", params![endpoint])
    }

    /// The devices whose config has another MTU than `mtu`, by name.
    pub fn devices_configured_for_another_mtu(&self, mtu: u16) -> Result<Vec<Label>, StoreError> {
        self.device_names("SELECT name FROM devices WHERE config_mtu IS NOT ?1 ORDER BY name", params![mtu])
    }

    fn device_names(&self, query: &str, args: impl rusqlite::Params) -> Result<Vec<Label>, StoreError> {
        let mut stmt = self.tx.prepare(query).map_err(sql("list devices"))?;
        let names = stmt
            .query_map(args, |row| row.get::<_, String>(0))
            .map_err(sql("list devices"))?
            .collect::<Result<Vec<String>, _>>()
            .map_err(sql("list devices"))?;
        let parse = |name: String| {
            name.parse().map_err(|e: meshd_core::input::InputError| StoreError::Invalid {
                column: "devices.name".into(),
                reason: format!("{name:?}: {e}"),
            })
        };
        names.into_iter().map(parse).collect()
    }

    /// Ask (or stop asking) a node for a new key.
    pub fn set_node_rotate(&self, name: &Label, rotate: bool) -> Result<(), StoreError> {
        self.tx
            .execute("UPDATE nodes SET rotate_key = ?1 WHERE name = ?2", params![rotate, name.as_str()])
            .map_err(sql("update node"))?;
        Ok(())
    }

    /// Give a node its new public key; the rotation it was asked for is done.
    pub fn set_node_key(&self, name: &Label, public_key: &PublicKey) -> Result<(), StoreError> {
        self.tx
            .execute(
                "UPDATE nodes SET public_key = ?1, rotate_key = 0 WHERE name = ?2",
                params![public_key.as_str(), name.as_str()],
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

    /// Delete a node that hosts no service and release its address, keeping its key as a removed
    /// node's (see [`super::Store::is_removed_key`]); false if there was none.
    pub fn delete_node(&self, name: &Label) -> Result<bool, StoreError> {
        self.tx
            .execute(
                "INSERT OR REPLACE INTO removed_node_keys (public_key, name, removed_at)
                 SELECT public_key, name, ?2 FROM nodes WHERE name = ?1",
                params![name.as_str(), now()],
            )
            .map_err(sql("keep the removed node's key"))?;
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

fn role_text(role: Role) -> &'static str {
    match role {
        Role::Hub => "hub",
        Role::Node => "node",
        Role::Relay => "relay",
    }
}

#[cfg(test)]
mod clock_tests {
    //! The address cooldown against a wall clock that jumps (hosts without a real-time clock).
    use super::super::Store;
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
