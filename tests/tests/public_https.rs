//! Issue 12: a service at home, behind NAT, served on a public name through the relay with a certificate from a
//! real ACME CA (Pebble, Let's Encrypt's test CA), fetched by a shop on the internet with curl trusting only
//! Pebble's root. The relay is the hub (the common merchant setup: a VPS running controller, hub and relay).
//!
//! Hosts: the internet (a router), the relay (public), the home node `attic` behind a NAT router with no
//! inbound, the CA (Pebble, and the DNS server it asks, which points the names at the relay) and the shop.

use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use meshd_e2e::{
    Dns, MeshHost, Netns, Pebble, Proc, meshctl, nat_router, require_root, router, run_json, run_ok, uplink, wait_until,
};
use serde_json::Value;

/// The relay's public address.
const RELAY_IP: &str = "172.31.70.2";
/// The shop's address: what the service must see as the client.
const SHOP_IP: &str = "172.31.72.2";
/// The CA's address (Pebble and its DNS server).
const CA_IP: &str = "172.31.71.2";

/// A backend that answers every request with what it saw (path, headers, peer) as JSON, and echoes WebSocket
/// text frames: the service on the home node.
const BACKEND: &str = r#"
import base64, hashlib, json, sys
from http.server import ThreadingHTTPServer, BaseHTTPRequestHandler

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        if self.headers.get("Upgrade", "").lower() == "websocket":
            key = self.headers["Sec-WebSocket-Key"]
            accept = base64.b64encode(hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()).decode()
            self.send_response(101)
            self.send_header("Upgrade", "websocket")
            self.send_header("Connection", "Upgrade")
            self.send_header("Sec-WebSocket-Accept", accept)
            self.end_headers()
            self.wfile.flush()
            head = self.rfile.read(2)
            n = head[1] & 0x7f
            mask = self.rfile.read(4)
            data = bytes(b ^ mask[i % 4] for i, b in enumerate(self.rfile.read(n)))
            self.wfile.write(bytes([0x81, len(b"echo:" + data)]) + b"echo:" + data)
            self.wfile.flush()
            return
        body = json.dumps({"path": self.path, "peer": self.client_address[0],
                           "headers": {k.lower(): v for k, v in self.headers.items()},
                           "forwarded_for": self.headers.get_all("X-Forwarded-For")}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass

class Server(ThreadingHTTPServer):
    def server_bind(self):
        import socketserver
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

Server(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"#;

/// A WebSocket client: TLS to the relay for `name`, an HTTP/1.1 upgrade, one text frame; prints the echo.
const WEBSOCKET_CLIENT: &str = r#"
import base64, os, socket, ssl, sys
name, ip, root = sys.argv[1], sys.argv[2], sys.argv[3]
context = ssl.create_default_context(cafile=root)
context.set_alpn_protocols(["http/1.1"])
tls = context.wrap_socket(socket.create_connection((ip, 443), timeout=10), server_hostname=name)
key = base64.b64encode(os.urandom(16)).decode()
tls.sendall(("GET /ws HTTP/1.1\r\nHost: %s\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
             "Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n" % (name, key)).encode())
head = b""
while b"\r\n\r\n" not in head:
    head += tls.recv(1)
assert head.startswith(b"HTTP/1.1 101"), head
payload = b"hello"
mask = os.urandom(4)
tls.sendall(bytes([0x81, 0x80 | len(payload)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))
frame = tls.recv(2)
print(tls.recv(frame[1] & 0x7f).decode())
"#;

/// The network of the test: every namespace and process, removed by their guards.
struct Merchant {
    _internet: Netns,
    _home_router: Netns,
    relay: MeshHost,
    attic: MeshHost,
    _ca: Netns,
    shop: Netns,
    pebble: Pebble,
    _dns: Dns,
    relay_daemon: Proc,
    attic_daemon: Proc,
    _backend: Proc,
    root: PathBuf,
}

impl Merchant {
    /// The relay (hub) and the home node up, the service `btcpay` on the home node, Pebble serving
    /// `names` (all pointed at the relay).
    fn new(root: &Path, names: &[&str]) -> Merchant {
        Merchant::validated_on(root, names, 443)
    }

    /// [`Merchant::new`] with Pebble validating TLS-ALPN-01 on `tls_port` of the relay.
    fn validated_on(root: &Path, names: &[&str], tls_port: u16) -> Merchant {
        let internet = router("inet");
        let home_router = router("home");
        let relay = MeshHost::new("relay", root, "ph");
        let attic = MeshHost::new("attic", root, "ph");
        let ca = Netns::new("ca");
        let shop = Netns::new("shop");
        uplink(&internet, &relay.ns, "172.31.70");
        uplink(&internet, &ca, "172.31.71");
        uplink(&internet, &shop, "172.31.72");
        uplink(&internet, &home_router, "172.31.73");
        let (home_lan, _) = uplink(&home_router, &attic.ns, "192.168.70");
        nat_router(&home_router, &[("192.168.70.0/24", &home_lan)]);

        let dns_addr: SocketAddr = format!("{CA_IP}:5353").parse().unwrap();
        let mapped: Vec<(&str, &str)> = names.iter().map(|n| (*n, RELAY_IP)).collect();
        let dns = Dns::start(&ca, dns_addr, &mapped, root);
        let pebble = Pebble::start(&ca, CA_IP, 80, tls_port, dns_addr, root);
        // The root that signs what Pebble issues (new at every start): the only one the shop trusts.
        pebble.issuing_root_pem();

        relay.init_hub(&format!("{RELAY_IP}:51820"), &[]);
        let relay_daemon = start_relay(&relay, &pebble, root, "relay.log");
        let token = run_ok(meshctl(&relay.state).args(["node", "invite", "attic", "--expires", "10m"]));
        let joined = attic.join(token.trim(), &attic.state, None);
        assert!(joined.status.success(), "attic joins: {}", String::from_utf8_lossy(&joined.stderr));
        let attic_daemon = attic.run_daemon_with(&root.join("attic.log"), &acme_args(&pebble));
        let script = root.join("backend.py");
        fs::write(&script, BACKEND).unwrap();
        let backend = attic.ns.spawn(&["/usr/bin/python3", script.to_str().unwrap(), "8080"]);
        run_ok(meshctl(&relay.state).args([
            "service",
            "add",
            "btcpay",
            "--node",
            "attic",
            "--target",
            "127.0.0.1:8080",
        ]));
        Merchant {
            _internet: internet,
            _home_router: home_router,
            relay,
            attic,
            _ca: ca,
            shop,
            pebble,
            _dns: dns,
            relay_daemon,
            attic_daemon,
            _backend: backend,
            root: root.to_path_buf(),
        }
    }

    /// `curl` from the shop to `url` with `args`, trusting only Pebble's root, the name resolved to the relay:
    /// (HTTP status, HTTP version, body), or None when curl got no HTTP answer.
    fn fetch(&self, name: &str, url: &str, args: &[&str]) -> Option<(u16, String, String)> {
        self.fetch_or_why(name, url, args).ok()
    }

    /// [`Merchant::fetch`], or what curl said when it got no HTTP answer.
    fn fetch_or_why(&self, name: &str, url: &str, args: &[&str]) -> Result<(u16, String, String), String> {
        let root = self.pebble.issuing_root_path();
        let mut cmd = self.shop.command("curl");
        cmd.args(["-sS", "--max-time", "5", "--cacert"]).arg(root);
        cmd.args(["--resolve", &format!("{name}:443:{RELAY_IP}"), "--resolve", &format!("{name}:80:{RELAY_IP}")]);
        cmd.args(args).args(["-w", "\n%{http_code} %{http_version}", url]);
        let out = cmd.output().expect("curl");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let why = || format!("{}: {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
        let (body, tail) = text.rsplit_once('\n').ok_or_else(why)?;
        let (code, version) = tail.split_once(' ').ok_or_else(why)?;
        match code.parse::<u16>() {
            Ok(code) if out.status.success() && code != 0 => Ok((code, version.to_owned(), body.to_owned())),
            _ => Err(why()),
        }
    }

    /// Wait until the shop gets the service's page on `https://NAME/`.
    fn wait_served(&self, name: &str, within: Duration) -> Value {
        let url = format!("https://{name}/");
        let mut last = Err(String::new());
        let served = wait_until(within, || {
            last = self.fetch_or_why(name, &url, &[]);
            matches!(&last, Ok((200, _, _)))
        });
        if !served {
            panic!(
                "{url} was not served within {within:?} (last: {last:?})\nrelay:\n{}\nattic:\n{}\npebble:\n{}",
                self.relay_daemon.log_text(),
                self.attic_daemon.log_text(),
                self.pebble.log_text()
            );
        }
        serde_json::from_str(&last.unwrap().2).expect("the backend's JSON")
    }

    fn services(&self) -> Value {
        run_json(meshctl(&self.relay.state).args(["service", "list", "--json"]))
    }
}

/// `meshd run` arguments that make Pebble the CA.
fn acme_args(pebble: &Pebble) -> Vec<&'static str> {
    let leak = |s: String| -> &'static str { Box::leak(s.into_boxed_str()) };
    vec![
        "--acme-directory",
        leak(pebble.directory_url()),
        "--acme-ca-root",
        leak(pebble.listener_ca_pem_path().display().to_string()),
        "--acme-contact",
        "ops@shop.test",
    ]
}

/// The relay's daemon with Pebble as its CA, ready.
fn start_relay(relay: &MeshHost, pebble: &Pebble, root: &Path, log: &str) -> Proc {
    let mut daemon = relay.run_daemon_with(&root.join(log), &acme_args(pebble));
    let ready = wait_until(Duration::from_secs(60), || {
        daemon.assert_running("starting up");
        std::os::unix::net::UnixStream::connect(relay.state.join("meshd.sock")).is_ok()
    });
    assert!(ready, "the relay did not become ready");
    daemon
}

/// A TCP connection from the shop to the relay's port `port`.
fn connect_from_shop(shop: &Netns, port: u16) -> TcpStream {
    let addr: SocketAddr = format!("{RELAY_IP}:{port}").parse().unwrap();
    shop.within(move || TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect to the relay"))
}

#[test]
fn a_home_service_is_served_on_its_public_name_with_the_relay_terminating_tls() {
    if !require_root() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut m = Merchant::new(tmp.path(), &["pay.shop.test", "other.shop.test"]);
    run_ok(meshctl(&m.relay.state).args(["expose", "btcpay", "--https", "pay.shop.test", "--relay", "relay"]));

    // The shop gets the page from the home node, over HTTP/1.1 and HTTP/2, with its own address forwarded and
    // a spoofed X-Forwarded-For replaced.
    let page = m.wait_served("pay.shop.test", Duration::from_secs(60));
    assert_eq!(page["path"], "/");
    let (code, version, body) = m
        .fetch("pay.shop.test", "https://pay.shop.test/invoice?id=7", &["--http1.1", "-H", "X-Forwarded-For: 6.6.6.6"])
        .expect("an HTTP/1.1 answer");
    assert_eq!((code, version.as_str()), (200, "1.1"));
    let seen: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(seen["path"], "/invoice?id=7");
    assert_eq!(seen["forwarded_for"], serde_json::json!([SHOP_IP]), "only the real client's address: {seen}");
    assert_eq!(seen["headers"]["x-forwarded-proto"], "https");
    assert_eq!(seen["headers"]["x-forwarded-host"], "pay.shop.test");
    let (code, version, body) =
        m.fetch("pay.shop.test", "https://pay.shop.test/h2", &["--http2"]).expect("an HTTP/2 answer");
    assert_eq!((code, version.as_str()), (200, "2"));
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["headers"]["x-forwarded-for"], SHOP_IP);

    // A ClientHello spread over several TCP segments is read whole.
    let root = m.pebble.issuing_root_path();
    assert_eq!(fetch_with_a_split_client_hello(&m.shop, &root, "pay.shop.test"), "HTTP/1.1 200 OK");

    // A WebSocket echo through the relay.
    let client = m.root.join("ws.py");
    fs::write(&client, WEBSOCKET_CLIENT).unwrap();
    let root = m.pebble.issuing_root_path();
    let out =
        m.shop.exec(&["/usr/bin/python3", client.to_str().unwrap(), "pay.shop.test", RELAY_IP, root.to_str().unwrap()]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "echo:hello", "{}", String::from_utf8_lossy(&out.stderr));

    // And over HTTP/2 (RFC 8441's extended CONNECT), which the relay turns into the service's HTTP/1.1 handshake.
    assert_eq!(h2_websocket_echo(&m.shop, &m.pebble.issuing_root_path(), "pay.shop.test"), "echo:hello");

    // A client that comes back resumes its TLS session (a ticket) instead of a full handshake.
    let session = m.root.join("tls-session");
    let s_client = |extra: &[&str]| {
        let mut args = vec!["openssl", "s_client", "-connect", "172.31.70.2:443", "-servername", "pay.shop.test"];
        let root = m.pebble.issuing_root_path();
        args.extend(["-CAfile", root.to_str().unwrap()]);
        args.extend(extra);
        let mut child = m.shop.command(args[0]);
        child.args(&args[1..]).stdin(std::process::Stdio::piped()).stdout(std::process::Stdio::piped());
        let mut child = child.spawn().unwrap();
        // A request, so the server's tickets (sent after the handshake) are read before the client leaves.
        let request = "GET / HTTP/1.1\r\nHost: pay.shop.test\r\nConnection: close\r\n\r\n";
        child.stdin.take().unwrap().write_all(request.as_bytes()).unwrap();
        String::from_utf8_lossy(&child.wait_with_output().unwrap().stdout).into_owned()
    };
    let first = s_client(&["-sess_out", session.to_str().unwrap(), "-ign_eof"]);
    assert!(first.contains("Verify return code: 0 (ok)") && first.contains("New, TLSv1.3"), "{first}");
    let again = s_client(&["-sess_in", session.to_str().unwrap(), "-ign_eof"]);
    assert!(again.contains("Reused, TLSv1.3"), "the session was not resumed:\n{again}");

    // service list shows the URL and its certificate, valid.
    let services = m.services();
    let https = &services[0]["https"][0];
    assert_eq!(https["url"], "https://pay.shop.test/");
    assert_eq!(https["certificate"]["state"], "valid", "{services}");
    assert_eq!(https["certificate"]["holder"], "relay");
    let listed = run_ok(meshctl(&m.relay.state).args(["service", "list"]));
    assert!(listed.contains("https://pay.shop.test/") && listed.contains("valid until"), "{listed}");

    // No open proxy: a name not exposed gets no certificate and no page (even with Pebble's DNS pointing it
    // here), a Host other than the SNI's is refused, CONNECT too.
    let unknown = m.fetch_or_why("other.shop.test", "https://other.shop.test/", &["-k"]);
    assert!(
        unknown.as_ref().is_err_and(|why| why.contains("unrecognized name")),
        "an unknown name gets a TLS alert and nothing else: {unknown:?}"
    );
    let misdirected = m.fetch("pay.shop.test", "https://pay.shop.test/", &["-H", "Host: other.shop.test"]);
    assert_eq!(misdirected.map(|r| r.0), Some(421), "a Host that is not the SNI's");
    let connect = m.fetch("pay.shop.test", "https://pay.shop.test/", &["--http1.1", "-X", "CONNECT"]);
    assert!(connect.is_some_and(|r| r.0 == 405 || r.0 == 400), "CONNECT is refused");
    // An absolute-form target naming the hub's sync service: no open proxy into the mesh.
    let absolute = m.fetch(
        "pay.shop.test",
        "https://pay.shop.test/",
        &["--http1.1", "--request-target", "http://10.77.0.1:51871/"],
    );
    assert_eq!(absolute.map(|r| r.0), Some(400), "an absolute-form request is refused");
    let asterisk = m.fetch("pay.shop.test", "https://pay.shop.test/", &["-X", "OPTIONS", "--request-target", "*"]);
    assert_eq!(asterisk.map(|r| r.0), Some(400), "OPTIONS * is answered by the relay, not a 502");

    // Two Host headers, and an authority-form target: refused, not guessed at.
    let raw = r#"
import socket, ssl, sys
context = ssl.create_default_context(cafile=sys.argv[1])
context.set_alpn_protocols(["http/1.1"])
for request in (b"GET / HTTP/1.1\r\nHost: pay.shop.test\r\nHost: pay.shop.test\r\n\r\n",
                b"GET pay.shop.test:443 HTTP/1.1\r\nHost: pay.shop.test\r\n\r\n"):
    tls = context.wrap_socket(socket.create_connection(("172.31.70.2", 443), timeout=5), server_hostname="pay.shop.test")
    tls.sendall(request)
    print(tls.recv(12).decode())
"#;
    let root = m.pebble.issuing_root_path();
    let out = m.shop.exec(&["/usr/bin/python3", "-c", raw, root.to_str().unwrap()]);
    let statuses: Vec<String> = String::from_utf8_lossy(&out.stdout).lines().map(str::to_owned).collect();
    assert_eq!(statuses, ["HTTP/1.1 400", "HTTP/1.1 400"], "{}", String::from_utf8_lossy(&out.stderr));

    // Port 80: a redirect to HTTPS keeping path and query.
    let (code, _, _) = m.fetch("pay.shop.test", "http://pay.shop.test/a/b?c=1", &[]).expect("an answer on port 80");
    assert_eq!(code, 308);
    let out = m.shop.exec(&[
        "curl",
        "-s",
        "-o",
        "/dev/null",
        "-w",
        "%{redirect_url}",
        "--resolve",
        &format!("pay.shop.test:80:{RELAY_IP}"),
        "http://pay.shop.test/a/b?c=1",
    ]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "https://pay.shop.test/a/b?c=1");

    // A slow client is cut: a connection that sends no ClientHello is closed within the hello timeout.
    let mut idle = connect_from_shop(&m.shop, 443);
    idle.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let opened = Instant::now();
    let read = idle.read(&mut [0u8; 16]);
    assert!(matches!(read, Ok(0)) || read.is_err(), "the relay sent bytes to a client that said nothing");
    assert!(opened.elapsed() < Duration::from_secs(8), "an idle connection was kept {:?}", opened.elapsed());
    // One that sends half a request head inside TLS is cut by the header timeout: curl's own limit is longer.
    let mut slow = connect_from_shop(&m.shop, 80);
    slow.write_all(b"GET / HTTP/1.1\r\nHost: pay.shop.test\r\n").unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let opened = Instant::now();
    let _ = slow.read(&mut [0u8; 256]);
    assert!(opened.elapsed() < Duration::from_secs(15), "a slow request head was waited for {:?}", opened.elapsed());

    // The certificate and the account key are kept, private.
    let kept = m.relay.state.join("acme/pay.shop.test.json");
    assert_eq!(fs::metadata(&kept).unwrap().permissions().mode() & 0o777, 0o600);
    assert_eq!(fs::metadata(m.relay.state.join("acme")).unwrap().permissions().mode() & 0o777, 0o700);
    assert_eq!(fs::metadata(m.relay.state.join("acme/account.json")).unwrap().permissions().mode() & 0o777, 0o600);

    // A restart of the relay serves the same certificate without asking the CA again.
    let issued = m.pebble.issued_count();
    assert_eq!(issued, 1, "one certificate for one name");
    let stopped = m.relay_daemon.stop(Duration::from_secs(10));
    assert!(stopped.success(), "SIGTERM ends the relay cleanly: {stopped:?}");
    m.relay_daemon = start_relay(&m.relay, &m.pebble, &m.root, "relay-restarted.log");
    m.wait_served("pay.shop.test", Duration::from_secs(30));
    assert_eq!(m.pebble.issued_count(), issued, "the restarted relay ordered again:\n{}", m.pebble.log_text());

    // Unexposed: the name is served no more.
    run_ok(meshctl(&m.relay.state).args(["unexpose", "btcpay", "--https", "pay.shop.test"]));
    let gone =
        wait_until(Duration::from_secs(10), || m.fetch("pay.shop.test", "https://pay.shop.test/", &[]).is_none());
    assert!(gone, "an unexposed name is still served");
    assert!(m.services()[0]["https"].as_array().unwrap().is_empty());
}

#[test]
fn a_home_service_is_served_on_its_public_name_with_tls_passed_through_to_the_home_node() {
    if !require_root() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut m = Merchant::new(tmp.path(), &["store.shop.test"]);
    // First served with TLS ended on the relay, then moved to passthrough: the relay must not keep that key.
    run_ok(meshctl(&m.relay.state).args(["expose", "btcpay", "--https", "store.shop.test", "--relay", "relay"]));
    m.wait_served("store.shop.test", Duration::from_secs(60));
    assert!(m.relay.state.join("acme/store.shop.test.json").exists());
    run_ok(meshctl(&m.relay.state).args(["unexpose", "btcpay", "--https", "store.shop.test"]));
    let exposed = run_ok(meshctl(&m.relay.state).args([
        "expose",
        "btcpay",
        "--https",
        "store.shop.test",
        "--relay",
        "relay",
        "--tls",
        "passthrough",
    ]));
    assert!(exposed.contains("https://store.shop.test/"), "{exposed}");

    // The home node gets its certificate through the relay (TLS-ALPN-01 passed through), and terminates TLS:
    // the service sees the shop's address, carried over the mesh by the PROXY header.
    let page = m.wait_served("store.shop.test", Duration::from_secs(60));
    assert_eq!(page["headers"]["x-forwarded-for"], SHOP_IP, "{page}");
    assert_eq!(page["headers"]["x-forwarded-proto"], "https");
    let (code, version, _) = m.fetch("store.shop.test", "https://store.shop.test/", &["--http2"]).expect("HTTP/2");
    assert_eq!((code, version.as_str()), (200, "2"));
    let spoofed =
        m.fetch("store.shop.test", "https://store.shop.test/", &["-H", "X-Forwarded-For: 6.6.6.6"]).expect("an answer");
    let seen: Value = serde_json::from_str(&spoofed.2).unwrap();
    assert_eq!(seen["forwarded_for"], serde_json::json!([SHOP_IP]), "{seen}");

    // A ClientHello spread over several TCP segments is read whole and passed on whole.
    let root = m.pebble.issuing_root_path();
    assert_eq!(fetch_with_a_split_client_hello(&m.shop, &root, "store.shop.test"), "HTTP/1.1 200 OK");

    // The relay holds no key for the name; the home node does, privately.
    let relay_files: Vec<String> =
        meshd_e2e::files_under(&m.relay.state).iter().map(|p| p.display().to_string()).collect();
    assert!(
        !relay_files.iter().any(|f| f.contains("store.shop.test")),
        "the relay keeps something of the name: {relay_files:?}"
    );
    let kept = m.attic.state.join("acme/store.shop.test.json");
    assert_eq!(fs::metadata(&kept).unwrap().permissions().mode() & 0o777, 0o600);
    assert!(fs::read_to_string(&kept).unwrap().contains("PRIVATE KEY"));
    // A local user on the home node cannot pass for the relay: its connection to the terminator, with a PROXY
    // header claiming any client, gets not one byte (only the relay's mesh address is taken).
    let forged = r#"
import socket, struct
s = socket.create_connection(("10.77.0.2", 1022), timeout=5)
header = b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x21, 0x11]) + struct.pack("!H", 12)
header += socket.inet_aton("6.6.6.6") + socket.inet_aton("10.77.0.2") + struct.pack("!HH", 4444, 1022)
s.sendall(header + b"GET /.well-known/acme-challenge/x HTTP/1.1\r\nHost: store.shop.test\r\n\r\n")
try:
    print(len(s.recv(100)))
except OSError as e:
    print("error", e)
"#;
    // Nor can a local user on the relay, whose connections leave from the relay's own mesh address.
    for host in [&m.attic, &m.relay] {
        let nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3", "-c", forged];
        let out = host.ns.exec(&nobody);
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(
            said.trim() == "0" || said.starts_with("error"),
            "the terminator answered a local user on {}: {said} {}",
            host.name,
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // service list on the hub shows the certificate as the home node reports it.
    let mut services = Value::Null;
    let reported = wait_until(Duration::from_secs(10), || {
        services = m.services();
        services[0]["https"][0]["certificate"]["state"] == "valid"
    });
    assert!(reported, "the home node's certificate is not shown: {services}");
    assert_eq!(services[0]["https"][0]["tls"], "passthrough");
    assert_eq!(services[0]["https"][0]["certificate"]["holder"], "attic");

    // The home node killed outright (a power cut) comes back serving the same certificate, without the CA.
    let issued = m.pebble.issued_count();
    assert_eq!(issued, 2, "one certificate for the relay (terminate), one for the home node (passthrough)");
    m.attic_daemon.kill_hard();
    m.attic_daemon = m.attic.run_daemon_with(&m.root.join("attic-restarted.log"), &acme_args(&m.pebble));
    let page = m.wait_served("store.shop.test", Duration::from_secs(30));
    assert_eq!(page["headers"]["x-forwarded-for"], SHOP_IP);
    assert_eq!(m.pebble.issued_count(), issued, "the restarted node ordered again:\n{}", m.pebble.log_text());
}

#[test]
fn http_01_takes_over_where_tls_alpn_01_cannot_validate_and_a_name_that_fails_both_backs_off() {
    if !require_root() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    // Pebble validates TLS-ALPN-01 on a port where nothing listens: only HTTP-01 can succeed.
    let m = Merchant::validated_on(tmp.path(), &["pay.shop.test", "store.shop.test"], 4443);
    let expose = |name: &str, tls: &str| {
        run_ok(meshctl(&m.relay.state).args(["expose", "btcpay", "--https", name, "--relay", "relay", "--tls", tls]))
    };
    expose("pay.shop.test", "terminate");
    expose("store.shop.test", "passthrough");
    // fail.shop.test is not in the CA's DNS: neither validation can succeed.
    expose("fail.shop.test", "terminate");

    // The relay answers HTTP-01 itself (terminate), and passes it to the home node (passthrough).
    m.wait_served("pay.shop.test", Duration::from_secs(60));
    let page = m.wait_served("store.shop.test", Duration::from_secs(60));
    assert_eq!(page["headers"]["x-forwarded-for"], SHOP_IP);
    assert!(m.relay_daemon.log_text().contains("challenge=\"http-01\""), "the relay's certificate came by HTTP-01");
    assert!(m.attic_daemon.log_text().contains("challenge=\"http-01\""), "the home node's certificate came by HTTP-01");

    // The failing name: pending, with the reason, and no order again before the backoff (a minute).
    let mut services = Value::Null;
    let failed = wait_until(Duration::from_secs(30), || {
        services = m.services();
        let urls = services[0]["https"].as_array().cloned().unwrap_or_default();
        urls.iter().any(|u| u["hostname"] == "fail.shop.test" && u["certificate"]["last_error"].is_string())
    });
    assert!(failed, "the failing name shows no error: {services}");
    let url =
        services[0]["https"].as_array().unwrap().iter().find(|u| u["hostname"] == "fail.shop.test").unwrap().clone();
    assert_eq!(url["certificate"]["state"], "pending");
    let error = url["certificate"]["last_error"].as_str().unwrap();
    assert!(error.contains("tls-alpn-01") && error.contains("http-01"), "both validations were tried: {error}");
    let listed = run_ok(meshctl(&m.relay.state).args(["service", "list"]));
    assert!(listed.contains("https://fail.shop.test/") && listed.contains("pending (last error: "), "{listed}");
    let orders = || m.relay_daemon.log_text().matches("name=fail.shop.test challenge=").count();
    let tried = orders();
    assert_eq!(tried, 2, "one order per validation method:\n{}", m.relay_daemon.log_text());
    std::thread::sleep(Duration::from_secs(10));
    assert_eq!(
        orders(),
        tried,
        "the failing name was ordered again within its backoff:\n{}",
        m.relay_daemon.log_text()
    );
}

#[test]
fn a_flood_of_idle_connections_to_the_public_port_keeps_no_shop_out() {
    if !require_root() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let m = Merchant::new(tmp.path(), &["pay.shop.test"]);
    run_ok(meshctl(&m.relay.state).args(["expose", "btcpay", "--https", "pay.shop.test", "--relay", "relay"]));
    m.wait_served("pay.shop.test", Duration::from_secs(60));

    // More idle connections than one source may hold (256), from the shop's own address, kept open.
    let addr: SocketAddr = format!("{RELAY_IP}:443").parse().unwrap();
    let flood: Vec<TcpStream> = m.shop.within(move || {
        (0..400).filter_map(|_| TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()).collect()
    });
    assert!(flood.len() >= 300, "the flood could not connect: {}", flood.len());
    // The shop's real request still gets through, at once: the oldest idle connections make way.
    let started = Instant::now();
    let (code, _, _) = m.fetch("pay.shop.test", "https://pay.shop.test/", &[]).expect("served during the flood");
    assert_eq!(code, 200);
    assert!(started.elapsed() < Duration::from_secs(3), "served only after {:?}", started.elapsed());
    // And the flood's connections are closed, not kept: each reads end-of-stream within the hello timeout.
    let closed = flood
        .into_iter()
        .filter(|mut c| {
            c.set_read_timeout(Some(Duration::from_secs(8))).unwrap();
            match c.read(&mut [0u8; 1]) {
                Ok(n) => n == 0,
                Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
            }
        })
        .count();
    assert!(closed >= 300, "only {closed} idle connections were closed");

    // Connections that complete their TLS handshake and then idle cannot hold the source's places either: the
    // shop's own request still evicts the oldest of them.
    let holder = r#"
import socket, ssl, sys, time
context = ssl.create_default_context(cafile=sys.argv[1])
context.set_alpn_protocols(["http/1.1"])
held = []
for _ in range(300):
    try:
        held.append(context.wrap_socket(socket.create_connection(("172.31.70.2", 443), timeout=5), server_hostname="pay.shop.test"))
    except OSError:
        pass
print(len(held), flush=True)
time.sleep(60)
"#;
    let root = m.pebble.issuing_root_path();
    let mut cmd = m.shop.command("/usr/bin/python3");
    cmd.args(["-c", holder, root.to_str().unwrap()]).stdout(std::process::Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.take().unwrap()), &mut line).unwrap();
    let handshaken: usize = line.trim().parse().unwrap_or(0);
    assert!(handshaken >= 256, "the holder completed only {handshaken} handshakes");
    let started = Instant::now();
    let served = m.fetch("pay.shop.test", "https://pay.shop.test/", &[]);
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(served.map(|r| r.0), Some(200), "the shop was kept out by its own idle TLS connections");
    assert!(started.elapsed() < Duration::from_secs(3), "served only after {:?}", started.elapsed());
}

/// One WebSocket text frame through the relay over HTTP/2 (an extended CONNECT, RFC 8441), from the shop; the echo.
fn h2_websocket_echo(shop: &Netns, root: &Path, name: &'static str) -> String {
    use http_body_util::Empty;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let root = fs::read(root).unwrap();
    shop.within(move || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async move {
            let mut roots = rustls::RootCertStore::empty();
            for cert in rustls::pki_types::pem::PemObject::pem_slice_iter(&root) {
                roots.add(cert.unwrap()).unwrap();
            }
            let mut config = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
            config.alpn_protocols = vec![b"h2".to_vec()];
            let tcp = tokio::net::TcpStream::connect((RELAY_IP, 443)).await.unwrap();
            let server = rustls::pki_types::ServerName::try_from(name).unwrap();
            let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config)).connect(server, tcp).await.unwrap();
            let (mut sender, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls)).await.unwrap();
            tokio::spawn(conn);
            // A first request: the server's SETTINGS (which allow extended CONNECT) have arrived after it.
            let get = hyper::Request::get(format!("https://{name}/")).body(Empty::<bytes::Bytes>::new()).unwrap();
            assert_eq!(sender.send_request(get).await.unwrap().status(), 200);
            let mut connect = hyper::Request::connect(format!("https://{name}/ws"))
                .header("sec-websocket-version", "13")
                .body(Empty::<bytes::Bytes>::new())
                .unwrap();
            connect.extensions_mut().insert(hyper::ext::Protocol::from_static("websocket"));
            let response = sender.send_request(connect).await.unwrap();
            assert_eq!(response.status(), 200, "an extended CONNECT is accepted with 200");
            let mut stream = TokioIo::new(hyper::upgrade::on(response).await.unwrap());
            let (payload, mask) = (b"hello", [7u8, 1, 2, 3]);
            let mut frame = vec![0x81, 0x80 | payload.len() as u8];
            frame.extend_from_slice(&mask);
            frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
            stream.write_all(&frame).await.unwrap();
            let mut head = [0u8; 2];
            stream.read_exact(&mut head).await.unwrap();
            let mut echo = vec![0u8; usize::from(head[1] & 0x7f)];
            stream.read_exact(&mut echo).await.unwrap();
            String::from_utf8(echo).unwrap()
        })
    })
}

#[test]
fn a_public_port_another_process_holds_is_named_and_taken_once_it_is_free() {
    if !require_root() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let m = Merchant::new(tmp.path(), &["pay.shop.test"]);
    let mut holder = m.relay.ns.spawn(&[
        "/usr/bin/python3",
        "-c",
        "import socket, time\ns = socket.socket(socket.AF_INET6)\ns.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)\n\
         s.bind(('::', 443))\ns.listen()\ntime.sleep(60)",
    ]);
    let held = wait_until(Duration::from_secs(5), || m.relay.ns.run(&["ss", "-Htln", "sport = :443"]).contains("443"));
    assert!(held, "the holder did not listen");
    let out = meshctl_output(&m, &["expose", "btcpay", "--https", "pay.shop.test", "--relay", "relay"]);
    assert!(!out.status.success(), "an expose that cannot be served must say so");
    let said = String::from_utf8_lossy(&out.stderr);
    assert_eq!(said.trim().lines().count(), 1, "one line: {said}");
    assert!(
        said.contains("port 443") && said.contains(&format!("pid {}", holder.pid())),
        "the holder is named: {said}"
    );
    // Once the port is free the relay takes it by itself (the change is retried) and serves the name.
    holder.kill_hard();
    m.wait_served("pay.shop.test", Duration::from_secs(60));
}

/// `meshctl ARGS` on the relay's state, its output whatever the outcome.
fn meshctl_output(m: &Merchant, args: &[&str]) -> std::process::Output {
    meshctl(&m.relay.state).args(args).output().expect("meshctl")
}

/// A GET for `name` from the shop whose ClientHello is large (many ALPN protocols, as post-quantum key shares make
/// it: over 2 KiB, more than one TCP segment) and sent in pieces 50 ms apart; the answer's first line.
fn fetch_with_a_split_client_hello(shop: &Netns, root: &Path, name: &'static str) -> String {
    let root = fs::read(root).unwrap();
    shop.within(move || {
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls::pki_types::pem::PemObject::pem_slice_iter(&root) {
            roots.add(cert.unwrap()).unwrap();
        }
        let mut config = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
        config.alpn_protocols = std::iter::once(b"http/1.1".to_vec())
            .chain((0..32).map(|i| format!("x-padding-protocol-{i:02}-{}", "p".repeat(40)).into_bytes()))
            .collect();
        let server = rustls::pki_types::ServerName::try_from(name).unwrap();
        let mut tls = rustls::ClientConnection::new(std::sync::Arc::new(config), server).unwrap();
        let mut hello = Vec::new();
        tls.write_tls(&mut hello).unwrap();
        assert!(hello.len() > 2048, "the ClientHello is {} bytes", hello.len());
        let mut tcp =
            TcpStream::connect_timeout(&format!("{RELAY_IP}:443").parse().unwrap(), Duration::from_secs(5)).unwrap();
        tcp.set_nodelay(true).unwrap();
        for piece in hello.chunks(700) {
            tcp.write_all(piece).unwrap();
            std::thread::sleep(Duration::from_millis(50));
        }
        tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut stream = rustls::Stream::new(&mut tls, &mut tcp);
        let request = format!("GET / HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).unwrap();
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer);
        String::from_utf8_lossy(&answer).lines().next().unwrap_or("").to_owned()
    })
}
