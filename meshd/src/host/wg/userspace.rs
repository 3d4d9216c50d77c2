//! The embedded userspace WireGuard: a boringtun device (defguard's fork) owned by this process, and
//! its UAPI socket (<https://www.wireguard.com/xplatform/>).
//!
//! meshd owns the device (rather than letting defguard start it) because boringtun stops its device on
//! SIGTERM, SIGINT, or when its UAPI socket is removed: a thread waits on the device and reports that,
//! so the daemon shuts down with it instead of running on without an interface. Removing the socket is
//! also how meshd stops the device.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
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
    let mut handle = DeviceHandle::new(name, DeviceConfig::default()).map_err(|e| e.to_string())?;
    if let Err(e) = super::ip(&["link", "set", "dev", name, "up"]) {
        let _ = std::fs::remove_file(uapi_socket(name));
        handle.wait();
        return Err(e.to_string());
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
