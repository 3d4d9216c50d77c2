//! When meshd's own `tor` process starts, reloads, backs off and stops, as a state machine: the daemon's
//! `host::tor` tells it what happened ([`Supervisor::configure`], [`Supervisor::started`],
//! [`Supervisor::bootstrapped`], [`Supervisor::exited`]) and when its timer fires
//! ([`Supervisor::handle_timeout`]), and carries out the [`Command`]s it returns.

use std::time::{Duration, Instant};

/// The first wait before starting a tor that died again; each further death in a row doubles it.
pub const FIRST_BACKOFF: Duration = Duration::from_secs(1);
/// The longest wait between two starts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// A tor that ran this long before dying starts again after [`FIRST_BACKOFF`]: the deaths before are forgiven.
pub const STABLE: Duration = Duration::from_secs(120);

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
}

impl Default for Supervisor {
    fn default() -> Supervisor {
        Supervisor { phase: Phase::Stopped, failures: 0 }
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
                self.phase = Phase::Starting { since: now };
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
            (Phase::Starting { .. } | Phase::Running { .. }, _) => changed.then_some(Command::Reload),
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
        wait
    }

    /// When [`Supervisor::handle_timeout`] must be called next, if ever.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.phase {
            Phase::BackingOff { until } => Some(until),
            _ => None,
        }
    }

    /// The time is `now`: start the process again once the wait is over.
    pub fn handle_timeout(&mut self, now: Instant) -> Option<Command> {
        match self.phase {
            Phase::BackingOff { until } if now >= until => {
                self.phase = Phase::Starting { since: now };
                Some(Command::Start)
            }
            _ => None,
        }
    }

    fn stop(&mut self) {
        self.phase = Phase::Stopped;
        self.failures = 0;
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
        assert_eq!(s.configure(2, true, t), Some(Command::Reload), "a change reloads, never restarts");
        s.bootstrapped();
        assert_eq!(s.phase(), Phase::Running { since: t });
        assert_eq!(s.configure(1, true, t), Some(Command::Reload));
        assert_eq!(s.configure(0, true, t), Some(Command::Stop));
        assert_eq!((s.phase(), s.poll_timeout()), (Phase::Stopped, None));
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
