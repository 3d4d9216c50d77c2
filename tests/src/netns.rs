//! Network namespaces of a test: [`Netns`] (commands, processes and sockets inside one), veth links and
//! addresses between them, and UDP probes and echo servers.

use std::fs;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::{Proc, next_serial, output, run_ok, unique_ifname};

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

/// Adds `addr` (CIDR notation; IPv6 without duplicate address detection) to `dev` in `ns`.
pub fn add_address(ns: &Netns, dev: &str, addr: &str) {
    if addr.contains(':') {
        ns.ip(&["addr", "add", addr, "dev", dev, "nodad"]);
    } else {
        ns.ip(&["addr", "add", addr, "dev", dev]);
    }
}

/// A namespace `tag` that forwards IPv4 between its links: the internet, or a home router.
pub fn router(tag: &str) -> Netns {
    let router = Netns::new(tag);
    router.run(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    router
}

/// Joins `host` to `router` on `<net>.0/24` (the router at `.1`, the host at `.2`) and routes the host's
/// traffic through the router; returns the interface names (router side, host side).
pub fn uplink(router: &Netns, host: &Netns, net: &str) -> (String, String) {
    let link = veth(router, host, &format!("{net}.1/24"), &format!("{net}.2/24"));
    host.ip(&["route", "add", "default", "via", &format!("{net}.1")]);
    link
}

/// Joins two namespaces with a veth pair, addresses and raises both ends; returns the interface names.
pub fn veth(a: &Netns, b: &Netns, addr_a: &str, addr_b: &str) -> (String, String) {
    let (if_a, if_b) = (unique_ifname("va"), unique_ifname("vb"));
    a.ip(&["link", "add", &if_a, "type", "veth", "peer", "name", &if_b, "netns", b.name()]);
    add_address(a, &if_a, addr_a);
    add_address(b, &if_b, addr_b);
    a.ip(&["link", "set", &if_a, "up"]);
    b.ip(&["link", "set", &if_b, "up"]);
    (if_a, if_b)
}
