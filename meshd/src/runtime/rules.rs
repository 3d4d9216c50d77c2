//! The access rules kept in force ([`meshd_core::session::rules::RulesGuard`]): every load of the host's
//! rules goes through the guard, and a task lists the table every [`CHECK_INTERVAL`], loads it again when
//! something else removed or changed it, retries a change that failed, and takes the interface down while
//! the rules in force are not meshd's and cannot be put back.
//!
//! The same task keeps the interface up with its addresses while the rules are in force: someone else's
//! `ip link set IF down` (and up) makes Linux drop the interface's IPv6 addresses and their routes, which
//! meshd would otherwise add back only at its next change.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ipnet::IpNet;
use tracing::{debug, error, info, warn};

use super::apply::on_interface;
use crate::host::firewall::{self, FirewallError};
use crate::host::hostnet::interface_state;
use crate::host::wg::Interface;
use meshd_core::session::rules::{Effect, Listing, RulesGuard};

/// How often the table in force is compared with what was loaded: a flushed ruleset is noticed (and
/// repaired) within this. One `nft -s list table` each time, a few milliseconds.
const CHECK_INTERVAL: Duration = Duration::from_secs(2);

/// What the guard needs to stop and restart traffic: the interface (once created) and its addresses.
#[derive(Default)]
struct Traffic {
    interface: Option<Arc<Mutex<Interface>>>,
    addresses: Vec<IpNet>,
}

struct Shared {
    interface_name: String,
    guard: tokio::sync::Mutex<RulesGuard>,
    traffic: Mutex<Traffic>,
    /// The interface was found down or without some of its addresses, and is not restored yet (said once).
    lost: AtomicBool,
}

/// The keeper of one interface's access rules; the task stops when it is dropped.
pub(super) struct RulesKeeper {
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl RulesKeeper {
    /// Keep the rules of interface `interface_name` (none are meant until the first [`RulesKeeper::load`]).
    pub(super) fn start(interface_name: &str) -> RulesKeeper {
        let shared = Arc::new(Shared {
            interface_name: interface_name.to_owned(),
            guard: tokio::sync::Mutex::new(RulesGuard::new()),
            traffic: Mutex::default(),
            lost: AtomicBool::new(false),
        });
        let watched = shared.clone();
        let task = tokio::spawn(async move {
            let mut ticks = tokio::time::interval(CHECK_INTERVAL);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ticks.tick().await;
            loop {
                ticks.tick().await;
                let mut guard = watched.guard.lock().await;
                guard.check();
                let _ = watched.carry_out(&mut guard).await;
                // Under the guard's lock: a block (the interface down on purpose) cannot come in between.
                if !guard.blocked() {
                    watched.keep_interface_up().await;
                }
            }
        });
        RulesKeeper { shared, task }
    }

    /// Make `script` the rules in force. On failure the guard keeps trying (and takes the interface down
    /// if the rules in force are not the previous ones); the error is returned all the same.
    pub(super) async fn load(&self, script: &str) -> Result<(), FirewallError> {
        let mut guard = self.shared.guard.lock().await;
        guard.want(script.to_owned());
        self.shared.carry_out(&mut guard).await.unwrap_or(Ok(()))
    }

    /// The interface whose traffic stops while the rules are not in force, and the addresses it gets back
    /// when they are.
    pub(super) fn set_interface(&self, interface: Arc<Mutex<Interface>>) {
        self.shared.traffic.lock().unwrap_or_else(|e| e.into_inner()).interface = Some(interface);
    }

    /// The interface's addresses are now `addresses`.
    pub(super) fn set_addresses(&self, addresses: impl IntoIterator<Item = IpNet>) {
        self.shared.traffic.lock().unwrap_or_else(|e| e.into_inner()).addresses = addresses.into_iter().collect();
    }

    /// Stop watching (before the rules are removed at shutdown).
    pub(super) async fn finish(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}

impl Shared {
    /// Carry out what the guard asks; the result of the last load, if there was one.
    async fn carry_out(&self, guard: &mut RulesGuard) -> Option<Result<(), FirewallError>> {
        let mut result = None;
        while let Some(effect) = guard.poll_effect() {
            match effect {
                Effect::Load(script) => match firewall::load(&script).await {
                    Ok(()) => {
                        guard.handle_loaded(Ok(self.listing().await));
                        result = Some(Ok(()));
                    }
                    Err(e) => {
                        // What is in force now. An nft that did not run (no descriptor left, under a flood)
                        // changed nothing, and neither did one that refused the transaction: when nft cannot
                        // even list the table, it is what it was before, never taken as gone.
                        let now = match &e {
                            FirewallError::Spawn(_) => None,
                            FirewallError::Rejected(_) => firewall::list(&self.interface_name).await.ok(),
                        };
                        match now {
                            Some(now) => guard.handle_loaded(Err((e.to_string(), now))),
                            None => guard.handle_load_not_run(e.to_string()),
                        }
                        result = Some(Err(e));
                    }
                },
                // nft that cannot be run (no descriptor left, under a flood) says nothing of the table: the
                // next check asks again, rather than reloading (or taking the interface down) for nothing.
                Effect::List => match firewall::list(&self.interface_name).await {
                    Ok(listing) => guard.handle_listing(listing),
                    Err(e) => {
                        debug!(interface = %self.interface_name, error = %e, "listing the access rules failed; checking again later")
                    }
                },
                Effect::Block | Effect::Unblock => self.set_traffic(matches!(effect, Effect::Unblock)).await,
                Effect::Warn(message) => warn!(interface = %self.interface_name, "{message}"),
                Effect::Alarm(message) => error!(interface = %self.interface_name, "{message}"),
                Effect::Recovered(message) => info!(interface = %self.interface_name, "{message}"),
            }
        }
        result
    }

    /// The table right after a load (an empty text if nft cannot list it: the next check loads it again).
    async fn listing(&self) -> String {
        match firewall::list(&self.interface_name).await {
            Ok(Listing::Table(text)) => text,
            Ok(Listing::Missing) | Err(_) => String::new(),
        }
    }

    /// Put the interface back up with its addresses (and so their routes) if something else took it down
    /// or removed some of them; said at WARN once per event.
    async fn keep_interface_up(&self) {
        let (interface, addresses) = {
            let traffic = self.traffic.lock().unwrap_or_else(|e| e.into_inner());
            (traffic.interface.clone(), traffic.addresses.clone())
        };
        let Some(interface) = interface else { return };
        let (up, present) = match interface_state(&self.interface_name) {
            Ok(Some(state)) => state,
            // Gone altogether (the device stopped): the daemon shuts down on that elsewhere.
            Ok(None) => return,
            Err(e) => {
                debug!(interface = %self.interface_name, error = %e, "reading the interface's addresses failed; checking again later");
                return;
            }
        };
        let missing: Vec<String> =
            addresses.iter().filter(|net| !present.contains(&net.addr())).map(ToString::to_string).collect();
        if up && missing.is_empty() {
            return;
        }
        if !self.lost.swap(true, Ordering::Relaxed) {
            warn!(
                interface = %self.interface_name,
                up,
                ?missing,
                "the mesh interface was taken down or lost addresses by something other than meshd; restoring them"
            );
        }
        match on_interface(&interface, move |i| i.unblock(&addresses)).await {
            Ok(()) => {
                self.lost.store(false, Ordering::Relaxed);
                info!(interface = %self.interface_name, "the mesh interface is up with its addresses again");
            }
            Err(e) => {
                debug!(interface = %self.interface_name, error = format!("{e:#}"), "restoring the interface failed; trying again")
            }
        }
    }

    /// Let the interface pass traffic, or stop it.
    async fn set_traffic(&self, pass: bool) {
        let (interface, addresses) = {
            let traffic = self.traffic.lock().unwrap_or_else(|e| e.into_inner());
            (traffic.interface.clone(), traffic.addresses.clone())
        };
        // Before the interface exists there is no traffic to stop (and the daemon does not start without
        // its rules).
        let Some(interface) = interface else { return };
        let outcome = if pass {
            on_interface(&interface, move |i| i.unblock(&addresses)).await
        } else {
            on_interface(&interface, Interface::block).await
        };
        if let Err(e) = outcome {
            error!(interface = %self.interface_name, error = format!("{e:#}"), pass, "switching the interface's traffic");
        }
    }
}
