//! Hosts of a mesh test: [`MeshHost`] (a namespace, a state directory and a unique interface name,
//! with `meshd join` and `meshd run` in it) and [`nat_router`], a home router in front of some of them.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};

use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::Duration;

use crate::{Netns, Proc, WG_SOCKET_DIR, product_bin, run_ok, unique_ifname, wait_until};

/// Removes a userspace interface's UAPI socket file on drop: a daemon stopped with SIGKILL (or by a
/// failing test) leaves boringtun's socket behind in the directory every namespace shares.
pub struct UapiCleanup(pub String);

impl Drop for UapiCleanup {
    fn drop(&mut self) {
        let _ = fs::remove_file(Path::new(WG_SOCKET_DIR).join(format!("{}.sock", self.0)));
    }
}

/// A host of a mesh test: its namespace, state directory and interface name (unique on the machine).
pub struct MeshHost {
    /// The node's name in the network.
    pub name: &'static str,
    /// Its namespace.
    pub ns: Netns,
    /// Its state directory.
    pub state: PathBuf,
    /// Its WireGuard interface.
    pub ifname: String,
    _uapi: UapiCleanup,
}

impl MeshHost {
    /// A host `name` with state in `root/name` and an interface named from `prefix`.
    pub fn new(name: &'static str, root: &Path, prefix: &str) -> MeshHost {
        let ifname = unique_ifname(prefix);
        MeshHost { name, ns: Netns::new(name), state: root.join(name), _uapi: UapiCleanup(ifname.clone()), ifname }
    }

    /// `meshd join` with the token on standard input (as the docs recommend), state in `state`, on this
    /// host's interface.
    pub fn join(&self, token: &str, state: &Path, endpoint: Option<&str>) -> Output {
        self.join_as(token, state, &self.ifname, endpoint)
    }

    /// `meshd join` as another node of this host (its own state directory and interface).
    pub fn join_as(&self, token: &str, state: &Path, ifname: &str, endpoint: Option<&str>) -> Output {
        let mut cmd = self.ns.command(product_bin("meshd"));
        cmd.arg("join").arg("-").arg("--state-dir").arg(state).args(["--interface", ifname]);
        if let Some(endpoint) = endpoint {
            cmd.args(["--endpoint", endpoint]);
        }
        let mut child =
            cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("meshd join");
        child.stdin.take().expect("stdin").write_all(token.as_bytes()).expect("token to meshd join");
        child.wait_with_output().expect("meshd join")
    }

    /// `meshd run` (userspace WireGuard, debug logs of meshd) with its output in `log`.
    pub fn run_daemon(&self, log: &Path) -> Proc {
        self.run_daemon_with(log, &[])
    }

    /// [`MeshHost::run_daemon`] with `extra` arguments (`--acme-directory`, `--https-port`, ...).
    pub fn run_daemon_with(&self, log: &Path, extra: &[&str]) -> Proc {
        let mut cmd = self.ns.command(product_bin("meshd"));
        cmd.env("RUST_LOG", "info,meshd=debug")
            .args(["run", "--wireguard", "userspace", "--state-dir"])
            .arg(&self.state)
            .args(extra);
        Proc::spawn_logged(cmd, &format!("meshd run on {}", self.name), log)
    }

    /// [`MeshHost::run_hub`] as a service runs: under `prlimit --nofile=NOFILE` (`1024:` is systemd's soft
    /// limit for services, with the hard limit left as it is; `1024:1024` a host where it cannot be
    /// raised), logging at meshd's default level plus the descriptor budget it settles on.
    pub fn run_hub_limited(&self, log: &Path, nofile: &str) -> Proc {
        let mut cmd = self.ns.command("prlimit");
        cmd.env("RUST_LOG", "info,hickory_server=warn,defguard_wireguard_rs::netlink=off,meshd::host::admission=debug")
            .arg(format!("--nofile={nofile}"))
            .arg(product_bin("meshd"))
            .args(["run", "--wireguard", "userspace", "--state-dir"])
            .arg(&self.state);
        // prlimit and `ip netns exec` both exec their command: the PID is meshd's.
        let mut daemon = Proc::spawn_logged(cmd, &format!("meshd run on {} (nofile {nofile})", self.name), log);
        let ready = wait_until(Duration::from_secs(60), || {
            daemon.assert_running("starting up");
            UnixStream::connect(self.state.join("meshd.sock")).is_ok()
        });
        assert!(ready, "the hub did not become ready");
        daemon
    }

    /// `meshd init` of network `home` with this host as the hub `hub`, reached at `endpoint`, on its
    /// interface and state directory, with `extra` arguments (`--cidr`, `--mtu`, ...).
    pub fn init_hub(&self, endpoint: &str, extra: &[&str]) {
        let mut init = Command::new(product_bin("meshd"));
        init.args(["init", "--network", "home", "--name", self.name, "--endpoint", endpoint]);
        init.args(["--interface", &self.ifname]).args(extra).arg("--state-dir").arg(&self.state);
        run_ok(&mut init);
    }

    /// [`MeshHost::run_daemon`] on the hub, returned once its admin socket answers.
    pub fn run_hub(&self, log: &Path) -> Proc {
        self.run_hub_with(log, &[])
    }

    /// [`MeshHost::run_hub`] with `extra` arguments (`--tor-config`, ...).
    pub fn run_hub_with(&self, log: &Path, extra: &[&str]) -> Proc {
        let mut daemon = self.run_daemon_with(log, extra);
        let ready = wait_until(Duration::from_secs(60), || {
            daemon.assert_running("starting up");
            UnixStream::connect(self.state.join("meshd.sock")).is_ok()
        });
        assert!(ready, "the hub did not become ready");
        daemon
    }

    /// One ping, answered within half a second (a mesh round trip here takes about a millisecond; a
    /// new tunnel's handshake a few), so a cut is seen promptly.
    pub fn pings(&self, addr: &str) -> bool {
        self.ns.exec(&["ping", "-c1", "-W0.5", addr]).status.success()
    }
}

/// Makes `router` a home router for each `(private subnet, router-side interface)`: traffic from the
/// subnet leaving by another interface is masqueraded, and no new flow enters towards it (as behind
/// NAT without port forwarding).
pub fn nat_router(router: &Netns, homes: &[(&str, &str)]) {
    let masquerade: String = homes
        .iter()
        .map(|(subnet, iface)| format!("    ip saddr {subnet} oifname != \"{iface}\" masquerade\n"))
        .collect();
    let drops: String = homes.iter().map(|(_, iface)| format!("    oifname \"{iface}\" drop\n")).collect();
    let rules = format!(
        "table ip nat {{\n  chain postrouting {{\n    type nat hook postrouting priority srcnat;\n{masquerade}  }}\n}}\n\
         table inet nofwd {{\n  chain forward {{\n    type filter hook forward priority filter;\n    \
         ct state established,related accept\n{drops}  }}\n}}\n"
    );
    let mut child = router.command("nft").args(["-f", "-"]).stdin(Stdio::piped()).spawn().expect("nft");
    child.stdin.take().expect("stdin").write_all(rules.as_bytes()).expect("rules to nft");
    assert!(child.wait().expect("nft").success(), "router NAT rules:\n{rules}");
}
