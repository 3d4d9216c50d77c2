//! Kernel WireGuard (the `wireguard` module), through defguard_wireguard_rs's netlink API and, for a key
//! change, the `wg` tool.

use std::io::Write;
use std::process::{Command, Stdio};

use defguard_wireguard_rs::error::WireguardInterfaceError;
use defguard_wireguard_rs::{Kernel, WGApi, WireguardInterfaceApi};

use meshd_core::keys::PrivateKey;

/// Create kernel interface `name`; fails where the module is absent.
pub(super) fn create(name: &str) -> Result<WGApi<Kernel>, WireguardInterfaceError> {
    let mut api = WGApi::<Kernel>::new(name)?;
    api.create_interface()?;
    Ok(api)
}

/// Switch interface `name` to `key`. `wg` reads the key from standard input, never from its command line.
pub(super) fn set_private_key(name: &str, key: &PrivateKey) -> Result<(), String> {
    let mut child = Command::new("wg")
        .args(["set", name, "private-key", "/dev/stdin"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("running wg: {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        writeln!(stdin, "{}", key.to_base64()).map_err(|e| e.to_string())?;
    }
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!("wg set: {}", String::from_utf8_lossy(&out.stderr).trim()));
    }
    Ok(())
}
