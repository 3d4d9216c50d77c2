//! A host's onion services (`meshctl expose SERVICE --tor`): the services it runs that the network serves over
//! Tor, each with its port at the `.onion` address, where its tor sends the connections, and the clients
//! authorized to find it. The host's `tor` serves them straight from the service's target, not through the
//! mesh: Tor already authenticates and encrypts, and the home host needs no tunnel up for it.

use std::collections::BTreeMap;

use super::HostView;
use crate::input::{HostPort, Label};
use crate::tor::client::ClientPublicKey;

/// This host's onion services, by service name; empty on most hosts.
pub type OnionPlan = BTreeMap<Label, OnionServicePlan>;

/// One onion service of this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OnionServicePlan {
    /// The port at the `.onion` address.
    pub port: u16,
    /// Where tor sends the connections: the service's target.
    pub target: HostPort,
    /// The authorized clients' public keys, by device name; empty: anyone with the address (a service that
    /// lost its last client is not planned at all).
    pub clients: BTreeMap<Label, ClientPublicKey>,
}

/// The onion services of the host of `view`: those of the services it runs, while it is active, except those
/// whose clients were all removed.
pub(super) fn plan(view: &HostView<'_>) -> OnionPlan {
    if !view.node.active() {
        return OnionPlan::new();
    }
    let mine = |name: &Label| view.s.services.iter().find(|v| v.name == *name && v.node == view.node.name);
    view.s
        .onions
        .iter()
        .filter_map(|onion| {
            let service = mine(&onion.service)?;
            if onion.authorized_only && onion.clients.is_empty() {
                // Its last client was removed: serving it would open it to anyone with the address.
                return None;
            }
            let clients = onion.clients.iter().map(|c| (c.device.clone(), c.public_key)).collect();
            Some((
                onion.service.clone(),
                OnionServicePlan { port: onion.port, target: service.target.clone(), clients },
            ))
        })
        .collect()
}
