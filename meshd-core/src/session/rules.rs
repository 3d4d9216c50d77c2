//! The watch over a host's access rules: whenever the mesh interface is up, the rules that were meant
//! to be loaded are the ones in force. Something else on the host may flush them (Debian's stock
//! `nftables.conf` starts with `flush ruleset`, so every `systemctl reload nftables` does) or change
//! them; a change of ours may fail to load. The guard compares what nftables lists with what it listed
//! right after our last load, asks for the rules to be loaded again when they differ or are missing,
//! retries a change that failed, and, when the rules in force are not ours and cannot be put back, asks
//! for the interface to stop passing traffic until they are: a mesh without its rules would be open.
//!
//! A value without I/O: the daemon (`meshd::runtime::rules`) lists the table every few seconds and
//! carries out the [`Effect`]s.

use std::collections::VecDeque;

/// What nftables lists for the host's table (stateless: without counters), or that it has none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listing {
    /// The table as `nft -s list table` prints it.
    Table(String),
    /// No such table.
    Missing,
}

/// What the guard asks the daemon to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Load this script (an `nft -f` script that replaces the table), then report with
    /// [`RulesGuard::handle_loaded`].
    Load(String),
    /// List the table and report with [`RulesGuard::handle_listing`].
    List,
    /// Stop the interface passing traffic (the rules in force are not ours and could not be put back).
    Block,
    /// Let the interface pass traffic again (our rules are back).
    Unblock,
    /// Tell the operator, at warning level.
    Warn(String),
    /// Tell the operator that the host's protection is gone, at error level.
    Alarm(String),
    /// Tell the operator that things are back to normal, at info level.
    Recovered(String),
}

/// The guard of one table.
#[derive(Debug, Default)]
pub struct RulesGuard {
    /// The script meant to be in force.
    wanted: Option<String>,
    /// What nftables listed right after `wanted` was loaded; `None` while it is not loaded.
    loaded: Option<String>,
    /// The listing of the last script that did load (an earlier `wanted`, while a change fails).
    last_good: Option<String>,
    /// Whether the interface was asked to stop passing traffic.
    blocked: bool,
    /// Whether a failure to load was reported since the last success (reported once, not every check).
    failing: bool,
    /// A repair is under way: the next load's failure blocks unless the old rules are still in force.
    repairing: bool,
    effects: VecDeque<Effect>,
}

impl RulesGuard {
    /// A guard with no rules meant yet.
    pub fn new() -> RulesGuard {
        RulesGuard::default()
    }

    /// The rules meant to be in force are now `script` (a change of the host's plan).
    pub fn want(&mut self, script: String) {
        if self.wanted.as_ref() != Some(&script) {
            self.loaded = None;
        }
        self.wanted = Some(script.clone());
        self.effects.push_back(Effect::Load(script));
    }

    /// The periodic check (every few seconds): load what failed to load, or compare the table in force.
    pub fn check(&mut self) {
        match (&self.wanted, &self.loaded) {
            (None, _) => {}
            (Some(script), None) => {
                let script = script.clone();
                self.effects.push_back(Effect::Load(script));
            }
            (Some(_), Some(_)) => self.effects.push_back(Effect::List),
        }
    }

    /// The table as nftables lists it now.
    pub fn handle_listing(&mut self, listing: Listing) {
        let Some(script) = self.wanted.clone() else { return };
        let loaded = self.loaded.as_ref();
        let why = match &listing {
            Listing::Table(text) if Some(text) == loaded => return,
            Listing::Table(_) => "were changed by something other than meshd",
            Listing::Missing => "were removed by something other than meshd (a flushed ruleset?)",
        };
        self.effects.push_back(Effect::Warn(format!("the mesh's access rules {why}; loading them again")));
        self.loaded = None;
        self.repairing = true;
        self.effects.push_back(Effect::Load(script));
    }

    /// The result of an [`Effect::Load`]: the listing right after it, or why it failed together with
    /// what is in force now.
    pub fn handle_loaded(&mut self, result: Result<String, (String, Listing)>) {
        match result {
            Ok(listing) => {
                self.loaded = Some(listing.clone());
                self.last_good = Some(listing);
                self.repairing = false;
                if std::mem::take(&mut self.failing) || self.blocked {
                    self.effects.push_back(Effect::Recovered("the mesh's access rules are loaded again".into()));
                }
                if std::mem::take(&mut self.blocked) {
                    self.effects.push_back(Effect::Unblock);
                }
            }
            // The first rules never loaded: the daemon does not start (and says why), there is no traffic.
            Err(_) if self.last_good.is_none() => self.failing = true,
            Err((error, now)) => {
                let ours_in_force = matches!(&now, Listing::Table(text) if Some(text) == self.last_good.as_ref());
                if !ours_in_force && !self.blocked {
                    self.blocked = true;
                    self.effects.push_back(Effect::Block);
                    self.effects.push_back(Effect::Alarm(format!(
                        "the mesh's access rules cannot be loaded ({error}): the mesh interface passes no traffic until they are"
                    )));
                    self.failing = true;
                } else if !self.failing {
                    self.failing = true;
                    let what = if self.repairing { "putting back" } else { "changing" };
                    self.effects.push_back(Effect::Warn(format!(
                        "{what} the mesh's access rules failed ({error}); the previous rules stay in force and meshd keeps trying"
                    )));
                }
            }
        }
    }

    /// An [`Effect::Load`] that changed nothing in nftables, with nothing known of the table since: `nft`
    /// could not be run (meshd out of descriptors under a flood, or no `nft`), or it refused the whole
    /// transaction and could not be asked what is in force. The table is then what it was before: the
    /// previous rules while a change fails (kept, and the load retried: meshd's own lack of descriptors
    /// never takes the interface down), or not ours during a repair (blocked, as for any failed repair).
    pub fn handle_load_not_run(&mut self, error: String) {
        let before = match (&self.last_good, self.repairing) {
            (Some(good), false) => Listing::Table(good.clone()),
            _ => Listing::Missing,
        };
        self.handle_loaded(Err((error, before)));
    }

    /// Whether the interface is asked to pass no traffic.
    pub fn blocked(&self) -> bool {
        self.blocked
    }

    /// The next thing to do, if any.
    pub fn poll_effect(&mut self) -> Option<Effect> {
        self.effects.pop_front()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(guard: &mut RulesGuard) -> Vec<Effect> {
        std::iter::from_fn(|| guard.poll_effect()).collect()
    }

    fn loaded(guard: &mut RulesGuard, script: &str, listing: &str) {
        guard.want(script.into());
        assert_eq!(drain(guard), [Effect::Load(script.into())]);
        guard.handle_loaded(Ok(listing.into()));
        assert!(drain(guard).is_empty());
    }

    #[test]
    fn rules_in_force_are_left_alone() {
        let mut guard = RulesGuard::new();
        guard.check();
        assert!(drain(&mut guard).is_empty(), "nothing meant yet");
        loaded(&mut guard, "script", "table");
        guard.check();
        assert_eq!(drain(&mut guard), [Effect::List]);
        guard.handle_listing(Listing::Table("table".into()));
        assert!(drain(&mut guard).is_empty());
    }

    #[test]
    fn a_flushed_or_altered_table_is_loaded_again_and_said() {
        for listing in [Listing::Missing, Listing::Table("table with a rule added".into())] {
            let mut guard = RulesGuard::new();
            loaded(&mut guard, "script", "table");
            guard.handle_listing(listing);
            let effects = drain(&mut guard);
            assert!(matches!(&effects[0], Effect::Warn(w) if w.contains("loading them again")), "{effects:?}");
            assert_eq!(effects[1], Effect::Load("script".into()));
            guard.handle_loaded(Ok("table".into()));
            assert!(drain(&mut guard).is_empty());
            assert!(!guard.blocked());
        }
    }

    #[test]
    fn rules_that_cannot_be_put_back_block_the_interface_until_they_are() {
        let mut guard = RulesGuard::new();
        loaded(&mut guard, "script", "table");
        guard.handle_listing(Listing::Missing);
        drain(&mut guard);
        guard.handle_loaded(Err(("nft: not found".into(), Listing::Missing)));
        let effects = drain(&mut guard);
        assert_eq!(effects[0], Effect::Block);
        assert!(matches!(&effects[1], Effect::Alarm(a) if a.contains("nft: not found")), "{effects:?}");
        assert!(guard.blocked());
        // Retried at every check, reported once.
        guard.check();
        assert_eq!(drain(&mut guard), [Effect::Load("script".into())]);
        guard.handle_loaded(Err(("nft: not found".into(), Listing::Missing)));
        assert!(drain(&mut guard).is_empty());
        guard.check();
        drain(&mut guard);
        guard.handle_loaded(Ok("table".into()));
        let effects = drain(&mut guard);
        assert!(matches!(&effects[0], Effect::Recovered(_)), "{effects:?}");
        assert_eq!(effects[1], Effect::Unblock);
        assert!(!guard.blocked());
    }

    #[test]
    fn a_change_that_fails_to_load_is_retried_while_the_old_rules_stay() {
        let mut guard = RulesGuard::new();
        loaded(&mut guard, "old", "old table");
        guard.want("new".into());
        drain(&mut guard);
        guard.handle_loaded(Err(("syntax error".into(), Listing::Table("old table".into()))));
        let effects = drain(&mut guard);
        assert_eq!(effects.len(), 1, "{effects:?}");
        assert!(matches!(&effects[0], Effect::Warn(w) if w.contains("changing") && w.contains("syntax error")));
        assert!(!guard.blocked(), "the previous rules are in force");
        guard.check();
        assert_eq!(drain(&mut guard), [Effect::Load("new".into())], "retried, not forgotten");
        guard.handle_loaded(Ok("new table".into()));
        assert!(matches!(&drain(&mut guard)[..], [Effect::Recovered(_)]));
        guard.check();
        assert_eq!(drain(&mut guard), [Effect::List]);
    }

    /// Under a flood meshd may have no descriptor left to start `nft`: that says nothing of the table, so a
    /// change that cannot be loaded leaves the previous rules in force, is retried, and never blocks.
    #[test]
    fn an_nft_that_cannot_be_run_leaves_the_rules_in_force_and_the_interface_up() {
        let mut guard = RulesGuard::new();
        loaded(&mut guard, "old", "old table");
        guard.want("new".into());
        drain(&mut guard);
        guard.handle_load_not_run("running nft: Too many open files".into());
        let effects = drain(&mut guard);
        assert!(!effects.contains(&Effect::Block) && !guard.blocked(), "{effects:?}");
        assert!(matches!(&effects[..], [Effect::Warn(w)] if w.contains("previous rules stay")), "{effects:?}");
        guard.check();
        assert_eq!(drain(&mut guard), [Effect::Load("new".into())], "retried");
        guard.handle_load_not_run("running nft: Too many open files".into());
        assert!(drain(&mut guard).is_empty(), "said once");
        guard.handle_loaded(Ok("new table".into()));
        assert!(matches!(&drain(&mut guard)[..], [Effect::Recovered(_)]));
        // The same script loaded again (a periodic reload) while nft cannot run: nothing changes either.
        guard.want("new".into());
        drain(&mut guard);
        guard.handle_load_not_run("running nft: Too many open files".into());
        assert!(!guard.blocked());
        // A table someone else removed that cannot be put back still blocks: the removal is the cause.
        guard.handle_listing(Listing::Missing);
        drain(&mut guard);
        guard.handle_load_not_run("running nft: Too many open files".into());
        assert_eq!(drain(&mut guard)[0], Effect::Block);
    }

    #[test]
    fn a_change_that_fails_while_the_table_is_gone_blocks() {
        let mut guard = RulesGuard::new();
        loaded(&mut guard, "old", "old table");
        guard.want("new".into());
        drain(&mut guard);
        guard.handle_loaded(Err(("refused".into(), Listing::Missing)));
        assert_eq!(drain(&mut guard)[0], Effect::Block);
    }

    #[test]
    fn the_first_rules_failing_are_the_callers_to_report_and_a_block_is_asked_once() {
        let mut guard = RulesGuard::new();
        guard.want("script".into());
        drain(&mut guard);
        guard.handle_loaded(Err(("refused".into(), Listing::Missing)));
        assert!(drain(&mut guard).is_empty(), "the daemon refuses to start with the error");
        guard.handle_loaded(Ok("table".into()));
        drain(&mut guard);
        guard.handle_listing(Listing::Missing);
        drain(&mut guard);
        guard.handle_loaded(Err(("refused".into(), Listing::Missing)));
        assert_eq!(drain(&mut guard)[0], Effect::Block);
        guard.want("script".into());
        drain(&mut guard);
        guard.handle_loaded(Err(("refused".into(), Listing::Missing)));
        assert!(drain(&mut guard).is_empty(), "blocked once, said once");
    }
}
