//! End-to-end harness for meshd: namespaces, veth links, guarded processes and a simulated phone.
//!
//! Every namespace and process made here is removed on drop, also when a test panics.
//! Names that must be unique on the machine (namespaces, interfaces) carry the test's PID.

use std::fs;
use std::io::Write;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Directory of the userspace WireGuard UAPI sockets, shared by every namespace.
pub const WG_SOCKET_DIR: &str = "/var/run/wireguard";

/// True when the test may run; false (with a loud SKIPPED line) only when not root and `CI` is unset.
pub fn require_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("this test needs root and CI is set: run the test suite as root");
    }
    eprintln!("\n*** SKIPPED: needs root (run as root; with CI set this is a failure) ***\n");
    false
}

fn next_serial() -> u32 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// An interface name unique on the machine: `prefix`, the PID in hex, a counter; 15 chars at most.
pub fn unique_ifname(prefix: &str) -> String {
    let name = format!("{prefix}{:x}-{}", std::process::id(), next_serial());
    assert!(name.len() <= 15, "interface name {name:?} is longer than 15 characters");
    name
}

/// Polls `check` every 100 ms until it returns true or `timeout` passes; returns whether it did.
pub fn wait_until(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if check() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Directory of the `meshd` and `meshctl` binaries: `$MESHD_BIN_DIR`, else the workspace's `target/debug`.
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("MESHD_BIN_DIR") {
        return PathBuf::from(dir);
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let target = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| workspace.join("target"));
    target.join("debug")
}

/// Path of a product binary (`meshd` or `meshctl`), panicking with a hint when it was not built.
pub fn product_bin(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.is_file(),
        "{} is missing: run `cargo build --workspace` first (or set MESHD_BIN_DIR)",
        path.display()
    );
    path
}

/// A `meshctl --state-dir DIR` command, ready for its subcommand arguments.
pub fn meshctl(state_dir: &Path) -> Command {
    let mut cmd = Command::new(product_bin("meshctl"));
    cmd.arg("--state-dir").arg(state_dir);
    cmd
}

/// A state dir for network `home` with hub `hub` (endpoint 192.0.2.1:51820), made by `meshd init` with
/// `extra` arguments; no daemon, no root.
pub fn init_network(extra: &[&str]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    run_ok(
        Command::new(product_bin("meshd"))
            .args(["init", "--network", "home", "--name", "hub", "--endpoint", "192.0.2.1:51820"])
            .args(extra)
            .arg("--state-dir")
            .arg(dir.path()),
    );
    dir
}

/// Runs a command to completion with stdin closed and returns its output.
pub fn output(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null()).output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// Runs a command and returns its stdout, panicking with the full output unless it exits 0.
pub fn run_ok(cmd: &mut Command) -> String {
    let out = output(cmd);
    assert!(out.status.success(), "{cmd:?} failed: {}", describe(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a command that must succeed and parses its stdout as JSON.
pub fn run_json(cmd: &mut Command) -> serde_json::Value {
    let stdout = run_ok(cmd);
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{cmd:?} printed no valid JSON ({e}): {stdout}"))
}

/// Exit status, stdout and stderr of an output, for assertion messages.
pub fn describe(out: &Output) -> String {
    format!(
        "{}\n--- stdout ---\n{}--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A child process that is killed by PID (SIGTERM, then SIGKILL) and reaped on drop.
pub struct Proc {
    child: Child,
    label: String,
    log: Option<PathBuf>,
}

impl Proc {
    /// Starts `cmd` with stdin closed and its stdout and stderr discarded.
    pub fn spawn(cmd: Command, label: &str) -> Proc {
        Proc::start(cmd, label, None)
    }

    /// Starts `cmd` with stdout and stderr appended to `log`, which is printed if the test panics.
    pub fn spawn_logged(cmd: Command, label: &str, log: &Path) -> Proc {
        Proc::start(cmd, label, Some(log.to_path_buf()))
    }

    fn start(mut cmd: Command, label: &str, log: Option<PathBuf>) -> Proc {
        cmd.stdin(Stdio::null());
        match &log {
            Some(path) => {
                let file = fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .unwrap_or_else(|e| panic!("cannot open log {}: {e}", path.display()));
                cmd.stdout(file.try_clone().expect("dup log file"));
                cmd.stderr(file);
            }
            None => {
                cmd.stdout(Stdio::null());
                cmd.stderr(Stdio::null());
            }
        }
        let child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start {label} ({cmd:?}): {e}"));
        Proc { child, label: label.to_string(), log }
    }

    /// The process ID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process has not exited yet.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// What the process wrote to its log so far (empty without a log).
    pub fn log_text(&self) -> String {
        self.log
            .as_ref()
            .and_then(|p| fs::read(p).ok())
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Panics with the log when the process has exited; `what` says what was expected of it.
    pub fn assert_running(&mut self, what: &str) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("{} exited ({status}) while {what}; its log:\n{}", self.label, self.log_text());
        }
    }

    /// SIGKILL, as a crash or `kill -9` would; returns once the process is gone.
    pub fn kill_hard(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM, waits up to `grace`, then SIGKILL; returns how it ended.
    pub fn stop(&mut self, grace: Duration) -> std::process::ExitStatus {
        if let Ok(Some(status)) = self.child.try_wait() {
            return status;
        }
        // SAFETY: kill(2) on our own child's PID; the child is not reaped yet, so the PID is still ours.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        self.child.wait().expect("wait for killed child")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(5));
        if std::thread::panicking() && self.log.is_some() {
            eprintln!("===== log of {} =====\n{}===== end of log of {} =====", self.label, self.log_text(), self.label);
        }
    }
}

/// A network namespace made for one test, loopback up; deleted with its `/etc/netns` files on drop.
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates a namespace named `e2e-<tag>-<pid>-<n>`.
    pub fn new(tag: &str) -> Netns {
        let name = format!("e2e-{tag}-{}-{}", std::process::id(), next_serial());
        run_ok(Command::new("ip").args(["netns", "add", &name]));
        let ns = Netns { name };
        run_ok(Command::new("ip").args(["-n", &ns.name, "link", "set", "lo", "up"]));
        ns
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A command running `program` inside the namespace (`ip netns exec NS program`).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    fn argv(&self, argv: &[&str]) -> Command {
        let mut cmd = self.command(argv[0]);
        cmd.args(&argv[1..]);
        cmd
    }

    /// Runs `argv` inside the namespace and returns its output.
    pub fn exec(&self, argv: &[&str]) -> Output {
        output(&mut self.argv(argv))
    }

    /// Runs `argv` inside the namespace; panics unless it succeeds; returns stdout.
    pub fn run(&self, argv: &[&str]) -> String {
        run_ok(&mut self.argv(argv))
    }

    /// Runs `ip -n NS ARGS...` (configures the namespace from outside); panics unless it succeeds.
    pub fn ip(&self, args: &[&str]) -> String {
        run_ok(Command::new("ip").args(["-n", &self.name]).args(args))
    }

    /// Starts `argv` inside the namespace, output discarded; the guard kills it by PID.
    pub fn spawn(&self, argv: &[&str]) -> Proc {
        Proc::spawn(self.argv(argv), argv[0])
    }

    /// Starts `argv` inside the namespace with its output in `log`; the guard kills it by PID.
    pub fn spawn_logged(&self, argv: &[&str], log: &Path) -> Proc {
        Proc::spawn_logged(self.argv(argv), argv[0], log)
    }

    /// HTTP GET from inside the namespace with curl; the body, or None if curl failed.
    pub fn http_get(&self, url: &str, max_time_secs: u32) -> Option<String> {
        self.http_get_within(url, Duration::from_secs(max_time_secs.into()))
    }

    /// HTTP GET that gives up after `max_time` (fractions of a second allowed): short attempts in a loop
    /// see a route that just appeared, where one long attempt would wait out a SYN retransmit (1 s).
    pub fn http_get_within(&self, url: &str, max_time: Duration) -> Option<String> {
        let out = self.exec(&["curl", "-sf", "--max-time", &format!("{:.3}", max_time.as_secs_f64()), url]);
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs `f` on a thread that has entered the namespace (the test process stays where it is). Sockets
    /// made there belong to the namespace and can be used from any thread afterwards.
    pub fn within<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = Path::new("/run/netns").join(&self.name);
        std::thread::spawn(move || {
            let ns = fs::File::open(&path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
            // SAFETY: setns(2) with a namespace fd we own; CLONE_NEWNET moves only this thread, which ends
            // after `f`.
            let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns into {}: {}", path.display(), std::io::Error::last_os_error());
            f()
        })
        .join()
        .unwrap_or_else(|_| panic!("the thread inside namespace {} panicked", self.name))
    }

    /// A UDP socket of the namespace bound to `addr` (`0.0.0.0:0`, `[::]:0`, `169.254.1.17:7007`...).
    pub fn udp_socket(&self, addr: &str) -> UdpSocket {
        let addr: SocketAddr = addr.parse().unwrap_or_else(|e| panic!("{addr:?} is not a socket address: {e}"));
        self.within(move || UdpSocket::bind(addr)).unwrap_or_else(|e| panic!("bind UDP {addr} in {}: {e}", self.name))
    }

    /// A UDP echo server of the namespace on `addr`; it stops when the guard is dropped.
    pub fn udp_echo(&self, addr: &str) -> UdpEcho {
        let socket = self.udp_socket(addr);
        socket.set_read_timeout(Some(Duration::from_millis(100))).expect("set a read timeout");
        let pusher = socket.try_clone().expect("clone the echo socket");
        let stop = Arc::new(AtomicBool::new(false));
        let last_client = Arc::new(Mutex::new(None));
        let (stopped, last) = (stop.clone(), last_client.clone());
        let thread = std::thread::spawn(move || {
            let mut buf = vec![0u8; 65_536];
            while !stopped.load(Ordering::Relaxed) {
                if let Ok((len, from)) = socket.recv_from(&mut buf) {
                    let _ = socket.send_to(&buf[..len], from);
                    *last.lock().unwrap_or_else(|e| e.into_inner()) = Some(from);
                }
            }
        });
        UdpEcho { stop, thread: Some(thread), socket: pusher, last_client }
    }

    /// Directory whose files `ip netns exec` mounts over `/etc` in this namespace.
    pub fn etc_dir(&self) -> PathBuf {
        Path::new("/etc/netns").join(&self.name)
    }

    /// Writes the namespace's own resolv.conf (seen by processes started with `ip netns exec`).
    pub fn set_resolv_conf(&self, text: &str) {
        fs::create_dir_all(self.etc_dir()).expect("create /etc/netns/<ns>");
        fs::write(self.etc_dir().join("resolv.conf"), text).expect("write resolv.conf");
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Safety net for processes left inside by a failed test: each is one we started in our namespace.
        if let Ok(out) = Command::new("ip").args(["netns", "pids", &self.name]).output() {
            for pid in
                String::from_utf8_lossy(&out.stdout).split_whitespace().filter_map(|p| p.parse::<libc::pid_t>().ok())
            {
                // SAFETY: kill(2) by PID; only processes inside this test's namespace are listed.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        let _ = Command::new("ip").args(["netns", "del", &self.name]).stderr(Stdio::null()).status();
        let _ = fs::remove_dir_all(self.etc_dir());
    }
}

/// A UDP echo server on a thread of the test (its socket in a namespace); stopped and joined on drop.
pub struct UdpEcho {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    socket: UdpSocket,
    last_client: Arc<Mutex<Option<SocketAddr>>>,
}

impl UdpEcho {
    /// Sends `payload` unasked to whoever the server last echoed (as a server pushing data on an open
    /// flow does); false if it echoed nobody yet.
    pub fn push(&self, payload: &[u8]) -> bool {
        let last = *self.last_client.lock().unwrap_or_else(|e| e.into_inner());
        last.is_some_and(|client| self.socket.send_to(payload, client).is_ok())
    }
}

impl Drop for UdpEcho {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Sends a datagram unique to this call from `socket` to `to` and waits up to `wait` for the same bytes
/// to come back from `to` (replies to earlier calls are skipped); whether they did.
pub fn udp_echoed(socket: &UdpSocket, to: SocketAddr, wait: Duration) -> bool {
    let payload = format!("probe {} {:?}", next_serial(), Instant::now());
    socket.send_to(payload.as_bytes(), to).is_ok() && udp_received(socket, to, payload.as_bytes(), wait)
}

/// Whether `payload` arrives on `socket` from `from` within `wait` (other datagrams are skipped).
pub fn udp_received(socket: &UdpSocket, from: SocketAddr, payload: &[u8], wait: Duration) -> bool {
    let deadline = Instant::now() + wait;
    let mut buf = vec![0u8; 65_536];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || socket.set_read_timeout(Some(left)).is_err() {
            return false;
        }
        match socket.recv_from(&mut buf) {
            Ok((len, sender)) if sender == from && buf[..len] == *payload => return true,
            Ok(_) => continue,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                return false;
            }
            // An ICMP error from an earlier datagram (port unreachable): keep waiting for this one's echo.
            Err(_) => continue,
        }
    }
}

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
        let mut cmd = self.ns.command(product_bin("meshd"));
        cmd.env("RUST_LOG", "info,meshd=debug")
            .args(["run", "--wireguard", "userspace", "--state-dir"])
            .arg(&self.state);
        Proc::spawn_logged(cmd, &format!("meshd run on {}", self.name), log)
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

/// Adds `addr` (CIDR notation; IPv6 without duplicate address detection) to `dev` in `ns`.
pub fn add_address(ns: &Netns, dev: &str, addr: &str) {
    if addr.contains(':') {
        ns.ip(&["addr", "add", addr, "dev", dev, "nodad"]);
    } else {
        ns.ip(&["addr", "add", addr, "dev", dev]);
    }
}

/// Joins two namespaces with a veth pair, addresses and raises both ends; returns the interface names.
pub fn veth(a: &Netns, b: &Netns, addr_a: &str, addr_b: &str) -> (String, String) {
    let (if_a, if_b) = (unique_ifname("va"), unique_ifname("vb"));
    a.ip(&["link", "add", &if_a, "type", "veth", "peer", "name", &if_b, "netns", &b.name]);
    add_address(a, &if_a, addr_a);
    add_address(b, &if_b, addr_b);
    a.ip(&["link", "set", &if_a, "up"]);
    b.ip(&["link", "set", &if_b, "up"]);
    (if_a, if_b)
}

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

/// Writes `text` to `path` with mode 0600.
pub fn write_private(path: &Path, text: &str) {
    fs::write(path, text).expect("write file");
    fs::set_permissions(path, fs::Permissions::from_mode(0o600)).expect("chmod 0600");
}

/// Every regular file under `dir`, recursively.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for entry in fs::read_dir(dir).expect("read dir").flatten() {
        let path = entry.path();
        match entry.file_type() {
            Ok(kind) if kind.is_dir() => found.extend(files_under(&path)),
            Ok(kind) if kind.is_file() => found.push(path),
            _ => {}
        }
    }
    found
}

/// Panics if any file under `dir` holds the base64 key `key_b64`, its raw bytes or its hex form.
pub fn assert_key_not_stored(dir: &Path, key_b64: &str) {
    use base64::Engine;
    let raw = base64::engine::general_purpose::STANDARD
        .decode(key_b64)
        .unwrap_or_else(|e| panic!("{key_b64:?} is not base64: {e}"));
    let hex: String = raw.iter().map(|b| format!("{b:02x}")).collect();
    for file in files_under(dir) {
        let bytes = fs::read(&file).unwrap_or_default();
        for (form, needle) in [("base64", key_b64.as_bytes()), ("raw", &raw[..]), ("hex", hex.as_bytes())] {
            assert!(
                !bytes.windows(needle.len()).any(|w| w == needle),
                "{} holds the private key ({form})",
                file.display()
            );
        }
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
