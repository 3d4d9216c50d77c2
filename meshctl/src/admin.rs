//! The one way from meshctl to the controller: [`Admin`] carries a request over the daemon's admin
//! socket when a daemon runs on the state directory, or to the controller in-process when none does.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use meshd::controller::store::StoreError;
use meshd::controller::{self, Controller};
use meshd::host::statedir::{StateDir, StateLock};
use meshd::links::admin::AdminError;
use meshd_core::wire::admin::{Outcome, Reply, Request};

/// The controller of one state directory, as meshctl reaches it. Every request meshctl makes goes
/// through here, and nothing else in meshctl opens the database.
///
/// Two transports: the daemon's admin socket, or the database itself while meshctl holds the state
/// directory's shared (offline) lock, which it gets only when no daemon holds the exclusive one. The
/// lock comes before the database is opened: a daemon's database is its own, and a newer meshctl must
/// not migrate it under an older daemon. The transport is chosen for each request, holding the lock
/// only for that request, since a daemon may start or stop between two of them.
pub struct Admin {
    state: StateDir,
    /// `--socket`: always the daemon at this socket, whatever holds the state directory.
    socket: Option<PathBuf>,
    /// The last request was answered from the database, no daemon running: what only a running daemon
    /// knows (when hosts and devices were last heard from) is unknown then.
    offline: std::cell::Cell<bool>,
}

impl Admin {
    /// The controller of the state directory `state_dir`, or of the daemon at `socket` if given.
    /// Nothing is opened or created until a request is made.
    pub fn new(state_dir: &Path, socket: Option<&Path>) -> Admin {
        Admin { state: StateDir::new(state_dir), socket: socket.map(Path::to_path_buf), offline: Default::default() }
    }

    /// Carry out `request`: the controller's reply, or its refusal as an error ([`Stale`] and
    /// [`BatchRefused`] for the refusals a caller may act on).
    pub fn send(&self, request: Request) -> anyhow::Result<Reply> {
        match self.call(request)? {
            Outcome::Ok(reply) => Ok(*reply),
            Outcome::Error(message) => bail!("{message}"),
            Outcome::BatchRefused { index, error } => Err(BatchRefused { index, error }.into()),
            Outcome::Stale(message) => Err(Stale(message).into()),
        }
    }

    /// The outcome of `request` from the running daemon, or from the controller in-process when none
    /// runs. An error here means the request did not reach the controller, or got no clear answer.
    pub fn call(&self, request: Request) -> anyhow::Result<Outcome> {
        self.offline.set(false);
        if let Some(socket) = &self.socket {
            return call_daemon(socket, &request);
        }
        let state = &self.state;
        let db = state.db();
        // Nothing is created in a directory that holds no network, not even the lock file.
        if !db.exists() {
            if state.member_state().exists() {
                bail!(
                    "{} is the state of a member host; run meshctl on the network's controller",
                    state.root().display()
                );
            }
            return Err(StoreError::NotInitialized(db.parent().unwrap_or(&db).to_path_buf()).into());
        }
        // Without a lock file no daemon runs here: the directory is checked before the lock file is made, so a
        // refused directory (another user's: meshd's own, say) gets no file of this user's that would then
        // keep its owner's meshd from starting.
        if !state.has_lock_file() {
            state.check_private()?;
        }
        // The shared lock is free only when no daemon runs (a socket file left by a killed daemon is
        // then ignored); a daemon waits for it to be released before it opens the database.
        match state.lock_offline()? {
            Some(_lock) => {
                // Working on the database itself, perhaps as root: not on what another user could plant.
                state.check_private()?;
                let mut controller = Controller::open(&db)?;
                self.offline.set(true);
                Ok(controller::outcome(controller.handle(request)))
            }
            None => call_daemon(&state.socket(), &request),
        }
    }

    /// Whether the last request was answered without the daemon (from the database itself).
    pub fn answered_offline(&self) -> bool {
        self.offline.get()
    }

    /// An exclusive lock held from previewing a hand-out to committing it, so that two meshctl handing
    /// out configs on this state directory do not both preview the same address (waits for the other);
    /// `None` when the directory cannot be locked.
    pub fn lock_hand_out(&self) -> Option<StateLock> {
        self.state.lock_hand_out().ok()
    }
}

/// The network changed since the request was previewed; nothing was changed.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Stale(String);

/// Request `index` of a batch was refused: nothing of the batch was carried out.
#[derive(Debug, thiserror::Error)]
#[error("{error}")]
pub struct BatchRefused {
    /// Which request of the batch, from 0.
    pub index: usize,
    error: String,
}

/// The daemon's outcome of `request` over the admin socket at `socket`.
fn call_daemon(socket: &Path, request: &Request) -> anyhow::Result<Outcome> {
    // A daemon that is starting holds the lock before its socket exists: give it a moment. Only a
    // connection that failed is tried again: once the request is sent, the daemon may have carried it
    // out, and sending it twice would (at best) be refused as a duplicate.
    let mut attempts = 0;
    loop {
        match meshd::links::admin::call(socket, request) {
            Ok(outcome) => return Ok(outcome),
            Err(AdminError::Connect { .. }) if attempts < 50 => attempts += 1,
            Err(e @ AdminError::Connect { .. }) => {
                return Err(e).context("meshd is running but its admin socket does not answer");
            }
            Err(e @ AdminError::TooLarge(_)) => return Err(e.into()),
            Err(e) => {
                return Err(e).context(
                    "no answer from meshd: whether the request was carried out is unknown; check with a list command",
                );
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}
