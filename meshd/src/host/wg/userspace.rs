//! The embedded userspace WireGuard: a boringtun device (defguard's fork) owned by this process, and
//! its UAPI socket (<https://www.wireguard.com/xplatform/>).
//!
//! meshd owns the device (rather than letting defguard start it) because boringtun stops its device on
//! SIGTERM, SIGINT, or when its UAPI socket is removed: a thread waits on the device and reports that,
//! so the daemon shuts down with it instead of running on without an interface. Removing the socket is
//! also how meshd stops the device.
//!
//! Other users of the host get neither the tunnel nor its key (issue 11, point 6):
//! - The UAPI socket answers `get=1` with the private key: it is made under meshd's umask (077, set at
//!   start), then set to 0600, in a directory that only root may write.
//! - boringtun binds its UDP sockets with `SO_REUSEADDR`, with which Linux lets any other process (of any
//!   user) that sets it too bind the same port and take the tunnel's packets. [`keep_port_private`]
//!   clears the option on the device's sockets once they are bound: a second bind of the port then
//!   fails (the kernel shares a UDP port only between sockets that all set it). The workaround is
//!   narrow: only the device's sockets on its listen port, on the unspecified address, are touched, and
//!   the device's per-peer "connected" sockets (which would need to share the port) are turned off.
//! - boringtun first listens on a port the kernel picks, and when the listen port is set it drops its own
//!   handle of those sockets but not the copies its event loop reads from (it unregisters them by the
//!   wrong descriptor): a second pair, on a random port, with `SO_REUSEADDR`, that another user could bind
//!   beside and that any peer could use. [`close_first_sockets`] swaps each copy for an unbound socket,
//!   so meshd holds UDP sockets on its listen port only.

use std::collections::BTreeSet;
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::thread::JoinHandle;

use defguard_boringtun::device::{DeviceConfig, DeviceHandle};
use tokio::sync::watch;
use tracing::debug;

use meshd_core::keys::PrivateKey;

/// Where boringtun puts its UAPI socket.
const UAPI_DIR: &str = "/var/run/wireguard";

fn uapi_socket(interface: &str) -> String {
    format!("{UAPI_DIR}/{interface}.sock")
}

/// Start boringtun for `name`, bring the link up, and wait for the device on a thread of its own, which
/// sends `true` on `stopped` when the device stops.
pub(super) fn start(name: &str, stopped: watch::Sender<bool>) -> Result<JoinHandle<()>, String> {
    // The socket directory is shared by every network namespace: a live socket of this name is another
    // process's interface (here or in another namespace), which boringtun would take over. A socket
    // left by a process that died answers nothing and is replaced.
    let socket = uapi_socket(name);
    if UnixStream::connect(&socket).is_ok() {
        return Err(format!(
            "its UAPI socket {socket} answers: another userspace WireGuard (another meshd or wireguard-go, perhaps \
             in another network namespace) runs an interface of this name; choose another --interface"
        ));
    }
    private_socket_dir()?;
    // Connected per-peer sockets would bind the listen port a second time, which the port kept private
    // (see `keep_port_private`) refuses; all traffic then goes through the listening sockets.
    let config = DeviceConfig { use_connected_socket: false, ..DeviceConfig::default() };
    let mut handle = DeviceHandle::new(name, config).map_err(|e| e.to_string())?;
    // Made under the umask (077) already; set again in case the umask was changed since.
    let private = fs::set_permissions(&socket, fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("making its UAPI socket {socket} private: {e}"));
    let up = private.and_then(|()| super::ip(&["link", "set", "dev", name, "up"]).map_err(|e| e.to_string()));
    if let Err(e) = up {
        let _ = std::fs::remove_file(uapi_socket(name));
        handle.wait();
        return Err(e);
    }
    let name = name.to_owned();
    std::thread::Builder::new()
        .name(format!("wg-{name}"))
        .spawn(move || {
            handle.wait();
            handle.clean();
            drop(handle);
            debug!(interface = %name, "embedded WireGuard device stopped");
            let _ = stopped.send(true);
        })
        .map_err(|e| e.to_string())
}

/// Make the UAPI socket directory (0700) if missing; refuse one that another user owns or others may
/// write, where the socket (and with it the key, and the keys meshd sends) could be replaced.
fn private_socket_dir() -> Result<(), String> {
    let dir = Path::new(UAPI_DIR);
    fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(|e| format!("{UAPI_DIR}: {e}"))?;
    let meta = fs::symlink_metadata(dir).map_err(|e| format!("{UAPI_DIR}: {e}"))?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if !meta.is_dir() || meta.uid() != me || meta.mode() & 0o022 != 0 {
        return Err(format!(
            "{UAPI_DIR} (where the UAPI socket that holds the private key goes) is not a directory owned by uid {me} \
             and writable by it alone (owner uid {}, mode {:o}): run `chown {me}: {UAPI_DIR} && chmod go-w {UAPI_DIR}`",
            meta.uid(),
            meta.mode() & 0o7777
        ));
    }
    Ok(())
}

/// Clear `SO_REUSEADDR` on the embedded device's UDP sockets listening on `port` (the unspecified
/// address, IPv4 and IPv6), so that no other socket can bind that port beside them; then check that
/// none already has (one bound in the moment between the device's bind and this call), by the
/// kernel's list of UDP sockets of this network namespace. Called after every change of the listen
/// port.
pub(super) fn keep_port_private(port: u16) -> Result<(), String> {
    let mut ours = BTreeSet::new();
    let fds = fs::read_dir("/proc/self/fd").map_err(|e| format!("listing /proc/self/fd: {e}"))?;
    for fd in fds.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok()) {
        // SAFETY: the descriptor is only queried and, when it is the device's socket (which lives as
        // long as the device), has an option set; one closed meanwhile fails these calls harmlessly.
        let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
        let socket = socket2::SockRef::from(&borrowed);
        let Ok(local) = socket.local_addr().map(|a| a.as_socket()) else { continue };
        let Some(local) = local else { continue };
        if local.port() != port || !local.ip().is_unspecified() || socket.r#type().ok() != Some(socket2::Type::DGRAM) {
            continue;
        }
        socket.set_reuse_address(false).map_err(|e| format!("clearing SO_REUSEADDR on UDP port {port}: {e}"))?;
        // SAFETY: a zeroed `stat` is a valid value of this plain C struct.
        let mut stat: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: fstat writes only into the buffer given.
        if unsafe { libc::fstat(fd, &mut stat) } == 0 {
            ours.insert(stat.st_ino);
        }
    }
    if ours.is_empty() {
        return Err(format!("found no socket of the device on UDP port {port}"));
    }
    for table in ["/proc/self/net/udp", "/proc/self/net/udp6"] {
        let text = fs::read_to_string(table).map_err(|e| format!("reading {table}: {e}"))?;
        if let Some(uid) = udp_socket_beside(&text, port, &ours) {
            return Err(format!(
                "another process (uid {uid}) has bound UDP port {port} beside the WireGuard device and could take its \
                 packets; stop it (`ss -ulpn sport = :{port}` shows it) and start meshd again"
            ));
        }
    }
    Ok(())
}

/// Close the UDP sockets that boringtun's first bind (on `first`, a port the kernel picked) left open once
/// the device moved to its listen port `port`: each descriptor is replaced in place (`dup2`) by a new,
/// unbound, non-blocking UDP socket, so the event loop that still owns the number reads nothing from it
/// (and closes it with the device), and the port is free. Returns how many were replaced.
pub(super) fn close_first_sockets(first: u16, port: u16) -> Result<usize, String> {
    if first == port || first == 0 {
        return Ok(0);
    }
    let mut replaced = 0;
    let fds = fs::read_dir("/proc/self/fd").map_err(|e| format!("listing /proc/self/fd: {e}"))?;
    for fd in fds.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok()) {
        // SAFETY: the descriptor is only queried here; one closed meanwhile fails these calls harmlessly.
        let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
        let socket = socket2::SockRef::from(&borrowed);
        let Some(local) = socket.local_addr().ok().and_then(|a| a.as_socket()) else { continue };
        if local.port() != first || !local.ip().is_unspecified() || socket.r#type().ok() != Some(socket2::Type::DGRAM) {
            continue;
        }
        let blank = socket2::Socket::new(socket2::Domain::for_address(local), socket2::Type::DGRAM, None)
            .and_then(|s| s.set_nonblocking(true).map(|()| s))
            .map_err(|e| format!("making a socket to close UDP port {first} with: {e}"))?;
        // SAFETY: dup2 replaces descriptor `fd` (boringtun's copy, which its event loop owns and keeps
        // using by number) with a duplicate of `blank`, atomically; both descriptors are valid.
        if unsafe { libc::dup2(blank.as_raw_fd(), fd) } < 0 {
            return Err(format!("closing UDP port {first}: {}", std::io::Error::last_os_error()));
        }
        replaced += 1;
    }
    Ok(replaced)
}

/// The owner's uid of a socket in a `/proc/net/udp{,6}` table bound to `port` that is not one of
/// `ours` (socket inodes), if any.
fn udp_socket_beside(table: &str, port: u16, ours: &BTreeSet<u64>) -> Option<String> {
    crate::host::ports::sockets_on_port(table, crate::host::ports::Transport::Udp, port)
        .find(|(_, inode)| !ours.contains(inode))
        .map(|(uid, _)| uid.to_string())
}

/// Stop the device of `name` and wait for its thread.
pub(super) fn stop(name: &str, device: JoinHandle<()>) {
    // boringtun checks every second that its socket still exists and stops when it does not.
    let _ = std::fs::remove_file(uapi_socket(name));
    let _ = device.join();
}

/// Switch the device of `name` to `key` with a UAPI `set`.
pub(super) fn set_private_key(name: &str, key: &PrivateKey) -> Result<(), String> {
    let mut socket = UnixStream::connect(uapi_socket(name)).map_err(|e| e.to_string())?;
    write!(socket, "set=1\nprivate_key={}\n\n", key.to_hex()).map_err(|e| e.to_string())?;
    let mut reply = String::new();
    BufReader::new(socket).read_line(&mut reply).map_err(|e| e.to_string())?;
    match reply.trim() {
        "errno=0" => Ok(()),
        other => Err(format!("setting the private key: {other}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_foreign_socket_on_the_port_is_found_in_the_kernels_table() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
  1: 00000000:CA6C 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 1001 2 0000000000000000 0
  2: 0100007F:CA6C 00000000:0000 07 00000000:00000000 00:00000000 00000000 65534        0 1002 2 0000000000000000 0
  3: 00000000:0035 00000000:0000 07 00000000:00000000 00:00000000 00000000 65534        0 1003 2 0000000000000000 0
";
        assert_eq!(udp_socket_beside(table, 51820, &BTreeSet::from([1001])), Some("65534".to_owned()));
        assert_eq!(udp_socket_beside(table, 51820, &BTreeSet::from([1001, 1002])), None);
        assert_eq!(udp_socket_beside(table, 53, &BTreeSet::from([1001])), Some("65534".to_owned()));
        assert_eq!(udp_socket_beside(table, 4000, &BTreeSet::new()), None);
    }
}
