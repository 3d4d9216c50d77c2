//! systemd's readiness protocol (`sd_notify(3)`): `READY=1` on `$NOTIFY_SOCKET` once the host is up (the
//! interface, rules, forwarders, DNS, and on the hub the admin socket), so that a `Type=notify` unit is started
//! only then and the units ordered after it (the NixOS module's `meshd-apply`) find meshd answering.

use tracing::{debug, warn};

/// Tell the service manager that meshd is ready. Without `$NOTIFY_SOCKET` (not started by systemd, or by a
/// unit of another type) this does nothing; a failure to send is logged, never fatal. The variable is left
/// in place (changing the environment of a running multi-threaded process is unsound); meshd's tor is started
/// without it (`host::tor`), and systemd takes notifications from the main process only (`NotifyAccess=main`).
pub fn ready() {
    match sd_notify::notify(false, &[sd_notify::NotifyState::Ready]) {
        Ok(()) => debug!("readiness sent to the service manager (if any)"),
        Err(e) => warn!(error = %e, "cannot tell the service manager that meshd is ready"),
    }
}
