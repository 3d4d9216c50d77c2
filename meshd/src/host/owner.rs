//! Which meshd runs a WireGuard interface: an advisory lock (`flock`) per network namespace and
//! interface name, on a file in [`RUN_DIR`], held by `meshd run` for its whole life.
//!
//! Two daemons with different state directories would otherwise both run one interface (each replacing
//! the other's rules and peers, and the first to stop taking it down under the second). The kernel
//! drops the lock when its holder dies, even by SIGKILL, so a crashed daemon never blocks its own
//! restart (a lock file left behind is only a file). Interface names are per network namespace, so the
//! key includes the namespace (the inode of `/proc/self/ns/net`): daemons in two namespaces may each
//! run a `meshd0`. (A userspace interface's UAPI socket, `/var/run/wireguard/NAME.sock`, is not per
//! namespace: two userspace daemons in two namespaces still need two names.) The file holds the
//! owner's pid and state directory, for the message that refuses a second daemon; it is 0600, since
//! whoever can open it can lock it.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};

use super::statedir::open_lock_file;
use std::path::{Path, PathBuf};

/// Where the locks live (a tmpfs: nothing survives a reboot, when no interface does either).
pub const RUN_DIR: &str = "/run/meshd";

/// The interface is run by another meshd, or its lock cannot be taken.
#[derive(Debug, thiserror::Error)]
pub enum OwnerError {
    #[error("interface {interface} is run by another meshd ({owner})")]
    Taken { interface: String, owner: String },
    /// The reason is in the message, not the source chain, so that a chain printed whole says it once.
    #[error("{path}: {error}")]
    Io { path: PathBuf, error: std::io::Error },
}

/// This process runs the interface until the value is dropped.
#[derive(Debug)]
pub struct InterfaceLock {
    _file: File,
}

impl InterfaceLock {
    /// Take the lock of `interface` (in this network namespace) in `dir`, recording this process and
    /// `state_dir` as its owner; [`OwnerError::Taken`] at once if another process holds it.
    pub fn take(dir: &Path, interface: &str, state_dir: &Path) -> Result<InterfaceLock, OwnerError> {
        fs::DirBuilder::new().recursive(true).mode(0o755).create(dir).map_err(io(dir))?;
        let path = lock_path(dir, interface);
        let mut file = open_lock_file(&path).map_err(io(&path))?;
        // A file left by an older meshd may be readable by others.
        file.set_permissions(fs::Permissions::from_mode(0o600)).map_err(io(&path))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => return Err(taken(&mut file, interface)),
            Err(fs::TryLockError::Error(e)) => return Err(io(&path)(e)),
        }
        let owner = format!("pid {}, state dir {}", std::process::id(), state_dir.display());
        file.set_len(0).and_then(|()| file.write_all(owner.as_bytes())).map_err(io(&path))?;
        Ok(InterfaceLock { _file: file })
    }
}

/// Whether `interface` (in this network namespace) is free of a running meshd, by its lock in `dir`;
/// creates nothing, so it needs no write access.
pub fn check_free(dir: &Path, interface: &str) -> Result<(), OwnerError> {
    let path = lock_path(dir, interface);
    let mut file = match File::open(&path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io(&path)(e)),
    };
    match file.try_lock_shared() {
        Ok(()) => Ok(()),
        Err(fs::TryLockError::WouldBlock) => Err(taken(&mut file, interface)),
        Err(fs::TryLockError::Error(e)) => Err(io(&path)(e)),
    }
}

/// The refusal, naming the owner the lock file records.
fn taken(file: &mut File, interface: &str) -> OwnerError {
    let mut owner = String::new();
    let _ = file.take(512).read_to_string(&mut owner);
    let owner = match owner.trim() {
        "" => "its pid is not recorded".to_owned(),
        text => text.to_owned(),
    };
    OwnerError::Taken { interface: interface.to_owned(), owner }
}

/// `dir/NAME.net-INODE.lock`, INODE naming this process's network namespace (`unknown` where
/// `/proc` cannot tell).
fn lock_path(dir: &Path, interface: &str) -> PathBuf {
    let namespace = fs::metadata("/proc/self/ns/net").map(|m| m.ino().to_string()).unwrap_or_else(|_| "unknown".into());
    dir.join(format!("{interface}.net-{namespace}.lock"))
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> OwnerError + '_ {
    move |error| OwnerError::Io { path: path.to_path_buf(), error }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_owner_per_interface_named_in_the_refusal_and_free_once_dropped() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("run");
        check_free(&dir, "meshd0").expect("free before any daemon (no directory yet)");
        let first = InterfaceLock::take(&dir, "meshd0", Path::new("/var/lib/meshd")).unwrap();
        let refused = InterfaceLock::take(&dir, "meshd0", Path::new("/srv/other")).unwrap_err();
        let text = refused.to_string();
        let pid = std::process::id();
        assert_eq!(text, format!("interface meshd0 is run by another meshd (pid {pid}, state dir /var/lib/meshd)"));
        assert_eq!(check_free(&dir, "meshd0").unwrap_err().to_string(), text);
        InterfaceLock::take(&dir, "meshd1", Path::new("/srv/other")).expect("another interface is free");
        drop(first);
        check_free(&dir, "meshd0").expect("free once its owner is gone");
        InterfaceLock::take(&dir, "meshd0", Path::new("/srv/other")).expect("taken again");
        let mode = fs::metadata(lock_path(&dir, "meshd0")).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o600, "another user who could open the lock file could hold its lock");
    }
}
