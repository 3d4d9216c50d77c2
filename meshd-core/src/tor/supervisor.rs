//! When meshd's own `tor` process starts, reloads, backs off and stops, as a state machine: the daemon's
//! `host::tor` tells it what happened ([`Supervisor::configure`], [`Supervisor::bootstrapped`],
//! [`Supervisor::exited`]) and when its timer fires
//! ([`Supervisor::handle_timeout`]), and carries out the [`Command`]s it returns.

use std::time::{Duration, Instant};

/// The first wait before starting a tor that died again; each further death in a row doubles it.
pub const FIRST_BACKOFF: Duration = Duration::from_secs(1);
/// The longest wait between two starts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// A tor that ran this long before dying starts again after [`FIRST_BACKOFF`]: the deaths before are forgiven.
pub const STABLE: Duration = Duration::from_secs(120);
/// The least time between two reloads (and between a start and the first reload). tor numbers a descriptor by
/// the second it is uploaded in (rend-spec-v3's revision counter, derived from the time since the shared random
/// value's period began), and directories keep the first of two with the same number: a second client removed in
/// the same second as the first would stay able to read the descriptor (seen with tor 0.4.9). Changes meanwhile
/// are gathered into one reload at the end of the gap.
pub const RELOAD_GAP: Duration = Duration::from_secs(2);

/// Where the process stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// No onion service to serve: no process.
    Stopped,
    /// Started at `since`, not bootstrapped yet (it may never be, offline).
    Starting {
        /// When it was started.
        since: Instant,
    },
    /// Bootstrapped: its onion services are published.
    Running {
        /// When it was started.
        since: Instant,
    },
    /// It died (or could not be started); it starts again at `until`.
    BackingOff {
        /// When it starts again.
        until: Instant,
    },
}

/// What the daemon must do to the process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Start it with the current `torrc`.
    Start,
    /// Make it read the `torrc` and the services' `authorized_clients/` again (SIGHUP): it keeps its
    /// circuits and publishes new descriptors where they changed.
    Reload,
    /// Stop it (SIGTERM).
    Stop,
}

/// The supervisor of one tor process.
#[derive(Debug, Clone)]
pub struct Supervisor {
    phase: Phase,
    /// Deaths in a row, each after less than [`STABLE`].
    failures: u32,
    /// When tor was last started or told to reload.
    last_reload: Option<Instant>,
    /// A change waits for [`RELOAD_GAP`] to pass.
    pending_reload: bool,
}

impl Default for Supervisor {
    fn default() -> Supervisor {
        Supervisor { phase: Phase::Stopped, failures: 0, last_reload: None, pending_reload: false }
    }
}

impl Supervisor {
    /// Where the process stands.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// The configuration is now `services` onion services, changed since the last call if `changed`: start
    /// a tor when the first one comes, reload it on a change, stop it when none is left. While backing off,
    /// the next start reads the new configuration anyway.
    pub fn configure(&mut self, services: usize, changed: bool, now: Instant) -> Option<Command> {
        match (self.phase, services) {
            (Phase::Stopped, 0) => None,
            (Phase::Stopped, _) => {
                self.start(now);
                Some(Command::Start)
            }
            (Phase::BackingOff { .. }, 0) => {
                self.stop();
                None
            }
            (Phase::BackingOff { .. }, _) => None,
            (Phase::Starting { .. } | Phase::Running { .. }, 0) => {
                self.stop();
                Some(Command::Stop)
            }
            (Phase::Starting { .. } | Phase::Running { .. }, _) if !changed => None,
            (Phase::Starting { .. } | Phase::Running { .. }, _) => {
                if self.last_reload.is_some_and(|last| now < last + RELOAD_GAP) {
                    self.pending_reload = true;
                    return None;
                }
                self.last_reload = Some(now);
                Some(Command::Reload)
            }
        }
    }

    /// The process said it is bootstrapped.
    pub fn bootstrapped(&mut self) {
        if let Phase::Starting { since } = self.phase {
            self.phase = Phase::Running { since };
        }
    }

    /// The process could not be started, or died by itself (not by [`Command::Stop`]): wait before the next
    /// start, doubling the wait after each early death. Returns the wait.
    pub fn exited(&mut self, now: Instant) -> Duration {
        let since = match self.phase {
            Phase::Starting { since } | Phase::Running { since } => since,
            Phase::Stopped | Phase::BackingOff { .. } => now,
        };
        if now.saturating_duration_since(since) >= STABLE {
            self.failures = 0;
        }
        let wait = FIRST_BACKOFF.saturating_mul(1 << self.failures.min(16)).min(MAX_BACKOFF);
        self.failures = self.failures.saturating_add(1);
        self.phase = Phase::BackingOff { until: now + wait };
        self.pending_reload = false;
        wait
    }

    /// When [`Supervisor::handle_timeout`] must be called next, if ever.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.phase {
            Phase::BackingOff { until } => Some(until),
            Phase::Starting { .. } | Phase::Running { .. } if self.pending_reload => {
                self.last_reload.map(|last| last + RELOAD_GAP)
            }
            _ => None,
        }
    }

    /// The time is `now`: start the process again once the wait is over.
    pub fn handle_timeout(&mut self, now: Instant) -> Option<Command> {
        match self.phase {
            Phase::BackingOff { until } if now >= until => {
                self.start(now);
                Some(Command::Start)
            }
            Phase::Starting { .. } | Phase::Running { .. }
                if self.pending_reload && self.last_reload.is_none_or(|last| now >= last + RELOAD_GAP) =>
            {
                self.pending_reload = false;
                self.last_reload = Some(now);
                Some(Command::Reload)
            }
            _ => None,
        }
    }

    /// A start reads the configuration as it is: nothing waits to be reloaded.
    fn start(&mut self, now: Instant) {
        self.phase = Phase::Starting { since: now };
        self.last_reload = Some(now);
        self.pending_reload = false;
    }

    fn stop(&mut self) {
        self.phase = Phase::Stopped;
        self.failures = 0;
        self.pending_reload = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tor_starts_with_the_first_service_reloads_on_changes_and_stops_with_the_last() {
        let t = Instant::now();
        let mut s = Supervisor::default();
        assert_eq!(s.configure(0, true, t), None, "nothing to serve, no tor");
        assert_eq!(s.configure(1, true, t), Some(Command::Start));
        assert_eq!(s.phase(), Phase::Starting { since: t });
        assert_eq!(s.configure(1, false, t), None, "nothing changed");
        let later = t + RELOAD_GAP;
        assert_eq!(s.configure(2, true, later), Some(Command::Reload), "a change reloads, never restarts");
        s.bootstrapped();
        assert_eq!(s.phase(), Phase::Running { since: t });
        assert_eq!(s.configure(1, true, later + RELOAD_GAP), Some(Command::Reload));
        assert_eq!(s.configure(0, true, later + RELOAD_GAP), Some(Command::Stop));
        assert_eq!((s.phase(), s.poll_timeout()), (Phase::Stopped, None));
    }

    #[test]
    fn reloads_are_two_seconds_apart_so_each_descriptor_gets_a_higher_revision() {
        let t = Instant::now();
        let mut s = Supervisor::default();
        assert_eq!(s.configure(1, true, t), Some(Command::Start));
        s.bootstrapped();
        // A change just after the start, and two more within the gap: one reload, once the gap is over.
        let ms = Duration::from_millis;
        assert_eq!(s.configure(1, true, t + ms(300)), None);
        assert_eq!(s.configure(1, true, t + ms(900)), None);
        assert_eq!(s.poll_timeout(), Some(t + RELOAD_GAP));
        assert_eq!(s.handle_timeout(t + ms(1500)), None, "not before the gap is over");
        assert_eq!(s.handle_timeout(t + RELOAD_GAP), Some(Command::Reload));
        assert_eq!(s.poll_timeout(), None, "nothing waits");
        // The next change waits for the gap after that reload.
        assert_eq!(s.configure(1, true, t + RELOAD_GAP + ms(100)), None);
        assert_eq!(s.handle_timeout(t + RELOAD_GAP * 2), Some(Command::Reload));
        assert_eq!(s.configure(1, true, t + RELOAD_GAP * 4), Some(Command::Reload), "after a quiet gap: at once");
        // A stop or a death drops what waited: the next start reads the files as they are.
        assert_eq!(s.configure(1, true, t + RELOAD_GAP * 4 + ms(10)), None);
        s.exited(t + RELOAD_GAP * 5);
        assert!(matches!(s.phase(), Phase::BackingOff { .. }));
        assert_eq!(s.handle_timeout(t + RELOAD_GAP * 5 + FIRST_BACKOFF), Some(Command::Start));
        assert_eq!(s.poll_timeout(), None);
    }

    #[test]
    fn a_dying_tor_comes_back_after_a_wait_that_doubles_up_to_a_minute_and_resets_once_it_ran_stably() {
        let t = Instant::now();
        let mut s = Supervisor::default();
        s.configure(1, true, t);
        let mut now = t;
        let mut waits = Vec::new();
        for _ in 0..9 {
            let wait = s.exited(now);
            assert_eq!(s.poll_timeout(), Some(now + wait));
            assert_eq!(s.handle_timeout(now + wait / 2), None, "not before the wait is over");
            now += wait;
            assert_eq!(s.handle_timeout(now), Some(Command::Start));
            waits.push(wait.as_secs());
        }
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        s.bootstrapped();
        now += STABLE;
        assert_eq!(s.exited(now), FIRST_BACKOFF, "a tor that ran stably is forgiven its earlier deaths");
    }

    #[test]
    fn changes_while_backing_off_wait_for_the_next_start_and_removing_every_service_cancels_it() {
        let t = Instant::now();
        let mut s = Supervisor::default();
        s.configure(1, true, t);
        s.exited(t);
        assert_eq!(s.configure(2, true, t), None, "the next start reads the new torrc");
        assert_eq!(s.configure(0, true, t), None, "no process to stop");
        assert_eq!((s.phase(), s.poll_timeout()), (Phase::Stopped, None));
        assert_eq!(s.handle_timeout(t + MAX_BACKOFF), None, "the cancelled start never comes");
        assert_eq!(s.configure(1, true, t), Some(Command::Start));
        assert_eq!(s.exited(t), FIRST_BACKOFF, "stopping forgave the deaths before");
    }
}
