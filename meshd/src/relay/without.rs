//! A meshd built without the `relay` feature (no hyper, no ACME client): it serves no public name, and says so
//! in one line when its plan asks it to.

use std::collections::BTreeMap;

use crate::host::statedir::StateDir;
use meshd_core::acme::renewal::Status;
use meshd_core::input::PublicName;
use meshd_core::plan::PublicPlan;

use super::PublicOptions;

/// Nothing served.
pub struct Public;

impl Public {
    /// Nothing served.
    pub fn new(_options: PublicOptions, _state: &StateDir) -> anyhow::Result<Public> {
        Ok(Public)
    }

    /// Refuses any public name. Errors: the plan names one.
    pub fn apply(&mut self, plan: &PublicPlan) -> anyhow::Result<()> {
        if plan.is_empty() {
            return Ok(());
        }
        anyhow::bail!(
            "this meshd was built without the relay feature: it cannot serve public names (rebuild it with --features relay)"
        )
    }

    /// No certificate is held.
    pub fn certificate(&self, _name: &PublicName, _now: u64) -> Option<Status> {
        None
    }

    /// No certificate is held.
    pub fn certificates(&self, _now: u64) -> BTreeMap<PublicName, Status> {
        BTreeMap::new()
    }
}
