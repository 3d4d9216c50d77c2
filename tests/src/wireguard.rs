//! WireGuard in a test: `wireguard-go` interfaces, keys from `wg`, wg-quick text as the WireGuard app
//! reads it ([`WgQuick`]), and a [`Phone`] brought up from that text alone.

use std::fs;
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::{Netns, Proc, add_address, describe, run_ok, wait_until};

/// Directory of the userspace WireGuard UAPI sockets, shared by every namespace.
pub const WG_SOCKET_DIR: &str = "/var/run/wireguard";

/// Starts `wireguard-go -f IF` in `ns` and waits for its UAPI socket; the guard stops it.
pub fn wireguard_go(ns: &Netns, ifname: &str, log: &Path) -> Proc {
    let mut wg = ns.spawn_logged(&["wireguard-go", "-f", ifname], log);
    let sock = Path::new(WG_SOCKET_DIR).join(format!("{ifname}.sock"));
    let up = wait_until(Duration::from_secs(10), || sock.exists());
    wg.assert_running("creating its interface");
    assert!(up, "wireguard-go made no UAPI socket {}", sock.display());
    wg
}

/// A `[Peer]` of a wg-quick config.
#[derive(Debug, Clone, Default)]
pub struct WgPeer {
    /// `PublicKey`, base64.
    pub public_key: String,
    /// `PresharedKey`, base64.
    pub preshared_key: Option<String>,
    /// `Endpoint`, `host:port`.
    pub endpoint: Option<String>,
    /// `AllowedIPs` entries (all lines), in CIDR notation.
    pub allowed_ips: Vec<String>,
    /// `PersistentKeepalive`, seconds.
    pub persistent_keepalive: Option<u32>,
}

/// The parts of a wg-quick config that the WireGuard app acts on.
#[derive(Debug, Clone, Default)]
pub struct WgQuick {
    /// `PrivateKey`, base64.
    pub private_key: String,
    /// `Address` entries (v4 and v6), as written.
    pub addresses: Vec<String>,
    /// The IP entries of `DNS`: the resolvers.
    pub dns_servers: Vec<IpAddr>,
    /// The other entries of `DNS`: search domains.
    pub dns_search: Vec<String>,
    /// `MTU`, if set.
    pub mtu: Option<u32>,
    /// The `[Peer]` sections.
    pub peers: Vec<WgPeer>,
}

impl WgQuick {
    /// Parses wg-quick text (case-insensitive keys, comma lists, repeated keys, `#` comments).
    pub fn parse(text: &str) -> WgQuick {
        let mut conf = WgQuick::default();
        let mut in_peer = false;
        let list = |v: &str| -> Vec<String> {
            v.split(',').map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect()
        };
        for raw in text.lines() {
            let line = raw.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            if line.starts_with('[') {
                in_peer = line.eq_ignore_ascii_case("[peer]");
                if in_peer {
                    conf.peers.push(WgPeer::default());
                }
                continue;
            }
            let Some((key, value)) = line.split_once('=') else {
                panic!("not a wg-quick line: {raw:?}");
            };
            let (key, value) = (key.trim().to_ascii_lowercase(), value.trim());
            if in_peer {
                let peer = conf.peers.last_mut().expect("peer section");
                match key.as_str() {
                    "publickey" => peer.public_key = value.to_string(),
                    "presharedkey" => peer.preshared_key = Some(value.to_string()),
                    "endpoint" => peer.endpoint = Some(value.to_string()),
                    "allowedips" => peer.allowed_ips.extend(list(value)),
                    "persistentkeepalive" => peer.persistent_keepalive = Some(value.parse().expect("keepalive number")),
                    _ => {}
                }
            } else {
                match key.as_str() {
                    "privatekey" => conf.private_key = value.to_string(),
                    "address" => conf.addresses.extend(list(value)),
                    "mtu" => conf.mtu = Some(value.parse().expect("MTU number")),
                    "dns" => {
                        for item in list(value) {
                            match item.parse::<IpAddr>() {
                                Ok(ip) => conf.dns_servers.push(ip),
                                Err(_) => conf.dns_search.push(item),
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
        conf
    }
}

/// A phone: `wireguard-go` in a namespace set up only from wg-quick text, as the WireGuard app does.
pub struct Phone {
    /// The phone's tunnel interface.
    pub ifname: String,
    /// The parsed config it was brought up from.
    pub config: WgQuick,
    etc_dir: PathBuf,
    _wireguard: Proc,
    _conf_dir: tempfile::TempDir,
}

impl Phone {
    /// Brings the tunnel described by `text` up in `ns` on interface `ifname`.
    pub fn up(ns: &Netns, ifname: &str, text: &str) -> Phone {
        let config = WgQuick::parse(text);
        let conf_dir = tempfile::tempdir().expect("temp dir");
        let wireguard = wireguard_go(ns, ifname, &conf_dir.path().join("wireguard-go.log"));

        // wg-quick names the interface after the file, and wants it private.
        let conf_path = conf_dir.path().join(format!("{ifname}.conf"));
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&conf_path)
            .expect("write phone config");
        file.write_all(text.as_bytes()).expect("write phone config");
        drop(file);
        let stripped = run_ok(Command::new("wg-quick").arg("strip").arg(&conf_path));
        let mut setconf = ns
            .command("wg")
            .args(["setconf", ifname, "/dev/stdin"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start wg setconf");
        setconf.stdin.take().expect("stdin").write_all(stripped.as_bytes()).expect("feed wg setconf");
        let out = setconf.wait_with_output().expect("wg setconf");
        assert!(out.status.success(), "wg setconf: {}", describe(&out));

        for addr in &config.addresses {
            add_address(ns, ifname, addr);
        }
        let mtu = config.mtu.unwrap_or(1420).to_string();
        ns.ip(&["link", "set", ifname, "mtu", &mtu, "up"]);
        for cidr in config.peers.iter().flat_map(|p| &p.allowed_ips) {
            let family = if cidr.contains(':') { "-6" } else { "-4" };
            // Like wg-quick: skip prefixes the interface already routes (e.g. an Address's own subnet).
            let covered = ns.ip(&[family, "route", "show", "dev", ifname, "match", cidr]);
            if covered.trim().is_empty() {
                ns.ip(&[family, "route", "add", cidr, "dev", ifname]);
            }
        }
        let etc_dir = ns.etc_dir();
        if !config.dns_servers.is_empty() {
            let mut resolv: String = config.dns_servers.iter().map(|s| format!("nameserver {s}\n")).collect();
            if !config.dns_search.is_empty() {
                resolv.push_str(&format!("search {}\n", config.dns_search.join(" ")));
            }
            ns.set_resolv_conf(&resolv);
        }
        Phone { ifname: ifname.to_string(), config, etc_dir, _wireguard: wireguard, _conf_dir: conf_dir }
    }
}

impl Drop for Phone {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.etc_dir);
    }
}

/// The public key of a base64 WireGuard private key, computed by `wg pubkey`.
pub fn wg_pubkey(private: &str) -> String {
    let mut pubkey = Command::new("wg")
        .arg("pubkey")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start wg pubkey");
    pubkey.stdin.take().expect("stdin").write_all(private.as_bytes()).expect("feed wg pubkey");
    let out = pubkey.wait_with_output().expect("wg pubkey");
    assert!(out.status.success(), "wg pubkey: {}", describe(&out));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A fresh WireGuard key pair from `wg genkey` / `wg pubkey`: (private, public), base64.
pub fn wg_keypair() -> (String, String) {
    let private = run_ok(Command::new("wg").arg("genkey")).trim().to_string();
    let public = wg_pubkey(&private);
    (private, public)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{require_root, unique_ifname, veth, write_private};

    #[test]
    fn parses_wg_quick_text() {
        let conf = WgQuick::parse(
            "[Interface]\nPrivateKey = aaa=\nAddress = 10.1.0.2/32, fd00::2/128\nDNS = 10.1.0.1, fd00::1, home.internal\n\
             MTU = 1380\n\n[Peer]\n# the hub\nPublicKey = bbb=\nPresharedKey = ccc=\nEndpoint = 192.0.2.1:51820\n\
             AllowedIPs = 10.1.0.0/16\nAllowedIPs = fd00::/48\nPersistentKeepalive = 25\n",
        );
        assert_eq!(conf.private_key, "aaa=");
        assert_eq!(conf.addresses, ["10.1.0.2/32", "fd00::2/128"]);
        assert_eq!(conf.dns_servers, ["10.1.0.1".parse::<IpAddr>().unwrap(), "fd00::1".parse().unwrap()]);
        assert_eq!(conf.dns_search, ["home.internal"]);
        assert_eq!(conf.mtu, Some(1380));
        assert_eq!(conf.peers.len(), 1);
        let peer = &conf.peers[0];
        assert_eq!(peer.public_key, "bbb=");
        assert_eq!(peer.preshared_key.as_deref(), Some("ccc="));
        assert_eq!(peer.endpoint.as_deref(), Some("192.0.2.1:51820"));
        assert_eq!(peer.allowed_ips, ["10.1.0.0/16", "fd00::/48"]);
        assert_eq!(peer.persistent_keepalive, Some(25));
    }

    /// The harness on its own: a hand-configured wireguard-go hub and a Phone from wg-quick text.
    #[test]
    fn phone_reaches_hand_made_hub() {
        if !require_root() {
            return;
        }
        let logs = tempfile::tempdir().unwrap();
        let hub = Netns::new("hhub");
        let phone_ns = Netns::new("hphone");
        veth(&hub, &phone_ns, "172.31.201.1/24", "172.31.201.2/24");

        let (hub_if, phone_if) = (unique_ifname("hh"), unique_ifname("hp"));
        let (hub_priv, hub_pub) = wg_keypair();
        let (phone_priv, phone_pub) = wg_keypair();
        let psk = run_ok(Command::new("wg").arg("genpsk")).trim().to_string();
        let hub_wg = wireguard_go(&hub, &hub_if, &logs.path().join("hub-wg.log"));
        let key_file = logs.path().join("hub.key");
        let psk_file = logs.path().join("psk");
        write_private(&key_file, &hub_priv);
        write_private(&psk_file, &psk);
        hub.run(&[
            "wg",
            "set",
            &hub_if,
            "private-key",
            key_file.to_str().unwrap(),
            "listen-port",
            "51820",
            "peer",
            &phone_pub,
            "preshared-key",
            psk_file.to_str().unwrap(),
            "allowed-ips",
            "10.99.0.2/32,fd99::2/128",
        ]);
        add_address(&hub, &hub_if, "10.99.0.1/24");
        add_address(&hub, &hub_if, "fd99::1/64");
        hub.ip(&["link", "set", &hub_if, "mtu", "1420", "up"]);

        let text = format!(
            "[Interface]\nPrivateKey = {phone_priv}\nAddress = 10.99.0.2/32, fd99::2/128\n\
             DNS = 10.99.0.1, example.test\n\n[Peer]\nPublicKey = {hub_pub}\nPresharedKey = {psk}\n\
             Endpoint = 172.31.201.1:51820\nAllowedIPs = 10.99.0.0/24, fd99::/64\nPersistentKeepalive = 25\n"
        );
        let phone = Phone::up(&phone_ns, &phone_if, &text);
        for target in ["10.99.0.1", "fd99::1"] {
            assert!(
                wait_until(Duration::from_secs(15), || phone_ns.exec(&["ping", "-c1", "-W1", target]).status.success()),
                "phone cannot ping the hub at {target} through the tunnel"
            );
        }
        let resolv = phone_ns.run(&["cat", "/etc/resolv.conf"]);
        assert!(resolv.contains("nameserver 10.99.0.1"), "{resolv}");
        assert!(resolv.contains("search example.test"), "{resolv}");
        let route = phone_ns.ip(&["route", "show", "10.99.0.0/24"]);
        assert!(route.contains(&phone_if), "no tunnel route: {route}");

        let phone_etc = phone_ns.etc_dir();
        let names = [hub.name().to_string(), phone_ns.name().to_string()];
        drop(phone);
        drop(hub_wg);
        assert!(!phone_etc.exists(), "phone left {}", phone_etc.display());
        for ifname in [&hub_if, &phone_if] {
            let sock = Path::new(WG_SOCKET_DIR).join(format!("{ifname}.sock"));
            assert!(wait_until(Duration::from_secs(5), || !sock.exists()), "{} left behind", sock.display());
        }
        drop(hub);
        drop(phone_ns);
        let list = run_ok(Command::new("ip").args(["netns", "list"]));
        for name in names {
            assert!(!list.contains(&name), "namespace {name} left behind");
        }
    }
}
