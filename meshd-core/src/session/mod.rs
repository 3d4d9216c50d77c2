//! The sync protocol's two ends as state machines without I/O (the protocol's messages are
//! [`crate::wire::sync`]): a [`member::Member`], and on the hub a [`hub::Journal`] of what it published
//! with a [`hub::HubSession`] per connected member. On every host, [`paths::Paths`] watches the paths to
//! its peers: liveness, names resolved again, addresses tried in turn, routes around a silent peer; and
//! [`rules::RulesGuard`] keeps the host's access rules in force whenever its interface passes traffic.
//!
//! Each is a value driven by `handle_*(input)` calls, `poll_timeout()` / `handle_timeout(now)` and a
//! queue of effects (`poll_effect()`) that the daemon carries out (`meshd::runtime::member`,
//! `meshd::links::sync`). The simulation test (`simulation.rs`) runs a hub and several members over an
//! in-memory network on a fake clock.

pub mod hub;
pub mod member;
pub mod paths;
pub mod rules;

#[cfg(test)]
mod simulation;
