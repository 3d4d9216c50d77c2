//! Issue 11, point 1: only meshd on a host can act as that host towards the controller.
//!
//! A hub and a member `vps`. On vps, a process that is not root (uid 65534, via `setpriv`) but may bind
//! ports below 1024 (`CAP_NET_BIND_SERVICE`, as a web server is given) opens the sync stream to the hub:
//! its packets leave through vps's tunnel with vps's mesh address, as meshd's do. It says hello as a
//! member would, and answers the hub's challenge claiming vps's key with a proof it cannot make. It gets no
//! state. While the operator rotates vps's key it keeps offering its own key: vps ends up with the key its
//! own meshd made, and keeps its place in the mesh.
//!
//! A plain local user on vps (no capability) cannot even reach the sync service: meshd connects from a
//! port below 1024 and the hub admits no other. Four such processes flooding the hub's sync port through
//! vps's tunnel neither end vps's session nor keep its restarted meshd out (before, they locked it out of
//! live updates for as long as they flooded).

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use meshd_e2e::{MeshHost, Proc, describe, meshctl, require_root, run_json, run_ok, veth, wait_until};

/// The attacker: connects (from a port below 1024) to the hub's sync service every half second for `rounds` rounds, says hello
/// (with and without answering the challenge), offers its own key, and prints everything it received.
const ATTACKER: &str = r#"
import base64, json, os, random, socket, sys, time
hub, port, claimed, rounds = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
mine = base64.b64encode(os.urandom(32)).decode()
print("key", mine, flush=True)
for i in range(rounds):
    try:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("", random.randint(600, 1023)))
        s.settimeout(2)
        s.connect((hub, port))
        s.settimeout(1.5)
        lines = [json.dumps({"msg": "hello", "digest": "stale"})]
        if i % 2:
            lines = [json.dumps({"public_key": claimed, "ephemeral": mine, "proof": "00" * 32}),
                     json.dumps({"msg": "hello", "digest": "stale"})]
        lines.append(json.dumps({"msg": "new_key", "public_key": mine}))
        lines.append(json.dumps({"msg": "switch"}))
        s.sendall(("\n".join(lines) + "\n").encode())
        got = b""
        while True:
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                break
            if not chunk:
                break
            got += chunk
        print("got", got.decode(errors="replace").replace("\n", " | "), flush=True)
        s.close()
    except OSError as e:
        print("error", e, flush=True)
    time.sleep(0.5)
print("done", flush=True)
"#;

/// Asks the join service (TLS, certificate not checked) where a key stands, without proving it; prints
/// the answer. Argument 4 is the join certificate's fingerprint, from which it names the service as members
/// do (`links::join::server_name`): the strongest such caller, one who knows the name, gets past the SNI check.
const ASK_STANDING: &str = r#"
import hashlib, json, socket, ssl, sys
context = ssl.create_default_context()
context.check_hostname = False
context.verify_mode = ssl.CERT_NONE
name = hashlib.sha256(b"meshd join" + bytes.fromhex(sys.argv[4])).hexdigest()[:16] + ".meshd.invalid"
try:
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3) as raw:
        with context.wrap_socket(raw, server_hostname=name) as tls:
            tls.sendall((json.dumps({"standing": [sys.argv[3]]}) + "\n").encode())
            print("answer", tls.recv(4096).decode(errors="replace").strip(), flush=True)
except (OSError, ssl.SSLError) as e:
    print("error", e, flush=True)
"#;

/// A hub and a joined member `vps`, both running, linked by 172.31.NET.0/24, the member reaching the hub
/// through its tunnel.
struct Mesh {
    hub: MeshHost,
    vps: MeshHost,
    hub_daemon: Proc,
    vps_daemon: Proc,
    /// The hub's mesh IPv4 address.
    hub_v4: String,
}

/// [`Mesh`] under `root` with interfaces named from `prefix`; `before_run` prepares the hub's network (services)
/// before its daemon starts.
fn hub_and_member(root: &Path, prefix: &str, net: u8, before_run: &dyn Fn(&MeshHost)) -> Mesh {
    let hub = MeshHost::new("hub", root, prefix);
    let vps = MeshHost::new("vps", root, prefix);
    veth(&hub.ns, &vps.ns, &format!("172.31.{net}.1/24"), &format!("172.31.{net}.2/24"));
    vps.ns.ip(&["route", "add", "default", "via", &format!("172.31.{net}.1")]);
    hub.init_hub(&format!("172.31.{net}.1:51820"), &[]);
    before_run(&hub);
    let hub_daemon = hub.run_hub(&root.join("hub.log"));
    let token = run_ok(meshctl(&hub.state).args(["node", "invite", "vps"]));
    let out = vps.join(token.trim(), &vps.state, None);
    assert!(out.status.success(), "vps join: {}", describe(&out));
    let vps_daemon = vps.run_daemon(&root.join("vps.log"));
    let nodes = run_json(meshctl(&hub.state).args(["node", "list", "--json"]));
    let hub_v4 =
        nodes.as_array().unwrap().iter().find(|n| n["name"] == "hub").unwrap()["address"].as_str().unwrap().to_owned();
    assert!(wait_until(Duration::from_secs(20), || vps.pings(&hub_v4)), "vps -> hub");
    Mesh { hub, vps, hub_daemon, vps_daemon, hub_v4 }
}

#[test]
fn another_process_on_a_member_gets_no_state_and_cannot_take_its_key() {
    if !require_root() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let Mesh { hub, vps, mut hub_daemon, mut vps_daemon, hub_v4 } =
        hub_and_member(root, "sa", 215, &|hub: &MeshHost| {
            run_ok(meshctl(&hub.state).args([
                "service",
                "add",
                "secret",
                "--node",
                "hub",
                "--target",
                "127.0.0.1:9999",
            ]));
        });
    let nodes = run_json(meshctl(&hub.state).args(["node", "list", "--json"]));
    let key_of = |nodes: &serde_json::Value, name: &str| {
        let node = nodes.as_array().unwrap().iter().find(|n| n["name"] == name).unwrap();
        node["public_key"].as_str().unwrap().to_owned()
    };
    let old_key = key_of(&nodes, "vps");
    assert!(
        wait_until(Duration::from_secs(10), || vps_daemon.log_text().contains("connected to the controller")),
        "vps has no sync session:\n{}",
        vps_daemon.log_text()
    );

    // The attack, first without a rotation under way, then while the operator rotates vps's key.
    let attacker_log = root.join("attacker.log");
    let mut attacker = vps.ns.command("setpriv");
    attacker.args(["--reuid=65534", "--regid=65534", "--clear-groups"]);
    attacker.args(["--inh-caps=+net_bind_service", "--ambient-caps=+net_bind_service"]);
    attacker.args(["/usr/bin/python3", "-c", ATTACKER]);
    attacker.args([hub_v4.as_str(), "51871", old_key.as_str(), "16"]);
    let mut attacker = meshd_e2e::Proc::spawn_logged(attacker, "attacker on vps", &attacker_log);
    std::thread::sleep(Duration::from_secs(3));
    run_ok(meshctl(&hub.state).args(["node", "rotate", "vps"]));
    let rotated = wait_until(Duration::from_secs(30), || {
        let nodes = run_json(meshctl(&hub.state).args(["node", "list", "--json"]));
        key_of(&nodes, "vps") != old_key
    });
    assert!(rotated, "vps did not rotate its key:\n{}", vps_daemon.log_text());
    assert!(wait_until(Duration::from_secs(30), || !attacker.is_running()), "the attacker did not finish");
    let seen = fs::read_to_string(&attacker_log).unwrap();
    assert!(seen.contains("done"), "{seen}");
    let rounds = seen.lines().filter(|l| l.starts_with("got ")).count();
    assert!(rounds >= 8, "the attacker reached the hub only {rounds} times:\n{seen}");
    // Nothing of the state: no node, service or digest; only the challenge and a refusal.
    let received: String = seen.lines().filter(|l| l.starts_with("got ")).collect();
    for secret in ["\"state\"", "\"nodes\"", "secret", "\"changes\"", "key_accepted", &old_key] {
        assert!(!received.contains(secret), "the attacker received {secret}:\n{received}");
    }
    assert!(received.contains("\"challenge\"") && received.contains("refused"), "{seen}");

    // vps has the key its own meshd made, and its place in the mesh.
    let attacker_key = seen.lines().find_map(|l| l.strip_prefix("key ")).unwrap().trim().to_owned();
    let nodes = run_json(meshctl(&hub.state).args(["node", "list", "--json"]));
    let new_key = key_of(&nodes, "vps");
    assert_ne!(new_key, attacker_key, "the attacker's key became vps's");
    let own = fs::read_to_string(vps.state.join("private.key")).unwrap();
    assert_eq!(meshd_e2e::wg_pubkey(own.trim()), new_key, "vps's key is not the one its meshd made");
    assert!(wait_until(Duration::from_secs(20), || vps.pings(&hub_v4)), "vps lost the hub after the rotation");
    let node = nodes.as_array().unwrap().iter().find(|n| n["name"] == "vps").unwrap().clone();
    assert_eq!(node["rotate_key"], false, "{node}");
    let log = hub_daemon.log_text();
    assert!(log.contains("did not prove the node's key"), "the hub did not say so:\n{log}");

    // The standing question (asked by members that lost their sync session) tells nothing about a key
    // to whoever cannot prove it.
    let mut ask = vps.ns.command("setpriv");
    ask.args(["--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3", "-c", ASK_STANDING]);
    let member: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(vps.state.join("member.json")).unwrap()).expect("vps's member.json");
    let fingerprint = member["hub"]["fingerprint"].as_str().expect("the join certificate's fingerprint").to_owned();
    let answer = run_ok(ask.args(["172.31.215.1", "51820", new_key.as_str(), &fingerprint]));
    assert!(answer.starts_with("answer"), "the question did not get past TLS: {answer}");
    assert!(!answer.contains("\"standing\""), "an unproven standing question was answered: {answer}");
    assert!(!answer.contains("member"), "{answer}");
    eprintln!("unproven standing question: {}", answer.trim());
    hub_daemon.assert_running("after the attack");
    vps_daemon.assert_running("after the attack");
}

/// A local user's flood: non-blocking connects to `HOST PORT` in a tight loop (the 50 newest kept, the
/// older closed) for `SECONDS`; prints how many it made every second.
const SYN_FLOOD: &str = r#"
import collections, socket, sys, time
dst, seconds = (sys.argv[1], int(sys.argv[2])), float(sys.argv[3])
held, made, end, last = collections.deque(), 0, time.time() + seconds, 0.0
while time.time() < end:
    s = socket.socket()
    s.setblocking(False)
    try:
        s.connect(dst)
    except OSError:
        pass
    held.append(s)
    made += 1
    if len(held) > 50:
        held.popleft().close()
    if time.time() - last >= 1:
        last = time.time()
        print("connects", made, flush=True)
print("connects", made, flush=True)
print("done", flush=True)
"#;

/// Starts `n` unprivileged processes flooding `addr`'s sync port from `host` for `seconds`.
fn flood_sync_port(
    host: &MeshHost,
    addr: &str,
    n: usize,
    seconds: u32,
    root: &Path,
) -> Vec<(Proc, std::path::PathBuf)> {
    (0..n)
        .map(|i| {
            let log = root.join(format!("flood-{i}.log"));
            let mut cmd = host.ns.command("setpriv");
            cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3", "-c", SYN_FLOOD]);
            cmd.args([addr, "51871", &seconds.to_string()]);
            (Proc::spawn_logged(cmd, &format!("sync flooder {i} on {}", host.name), &log), log)
        })
        .collect()
}

/// The connects a flooder reported last.
fn connects(log: &Path) -> u64 {
    let text = fs::read_to_string(log).unwrap_or_default();
    let last = text.lines().rev().find_map(|l| l.strip_prefix("connects "));
    last.and_then(|n| n.trim().parse().ok()).unwrap_or(0)
}

/// Whether `host`'s interface carries `addr` (a service of the host gets its own mesh address there).
fn carries(host: &MeshHost, addr: &str) -> bool {
    let text = host.ns.run(&["ip", "-o", "addr", "show", "dev", &host.ifname]);
    text.contains(&format!(" {addr}/"))
}

/// Adds service `name` on vps on the hub; returns its mesh address.
fn add_service_on_vps(hub: &MeshHost, name: &str, port: u16) -> String {
    let target = format!("127.0.0.1:{port}");
    run_ok(meshctl(&hub.state).args(["service", "add", name, "--node", "vps", "--target", &target]));
    let services = run_json(meshctl(&hub.state).args(["service", "list", "--json"]));
    let service = services.as_array().unwrap().iter().find(|s| s["name"] == name).unwrap();
    service["mesh_address"].as_str().unwrap().split(':').next().unwrap().to_owned()
}

/// Packets the hub's firewall dropped at its sync port (translated to 1021, where meshd listens) since it last
/// loaded its rules.
fn sync_drops(hub: &MeshHost) -> u64 {
    let table = format!("meshd_{}", hub.ifname.replace(|c: char| !c.is_ascii_alphanumeric(), "_"));
    let rules = hub.ns.run(&["nft", "list", "table", "inet", &table]);
    rules
        .lines()
        .find(|l| l.contains("tcp dport 1021 counter"))
        .and_then(|l| l.split_whitespace().skip_while(|w| *w != "packets").nth(1)?.parse().ok())
        .unwrap_or_else(|| panic!("no drop counter for the sync port:\n{rules}"))
}

/// For every sync session a member's log says ended, how long until the next one was up
/// ([`Duration::MAX`] when none was).
fn reconnect_gaps(log: &str) -> Vec<Duration> {
    // Log lines start with an RFC 3339 time: 2026-12-01T00:52:26.280823Z.
    let at = |line: &str| -> Option<f64> {
        let time = line.get(11..26)?;
        let mut parts = time.split(':');
        let (h, m, s): (f64, f64, f64) =
            (parts.next()?.parse().ok()?, parts.next()?.parse().ok()?, parts.next()?.parse().ok()?);
        Some(h * 3600.0 + m * 60.0 + s)
    };
    let mut gaps = Vec::new();
    let mut ended: Option<f64> = None;
    for line in log.lines() {
        let Some(time) = at(line) else { continue };
        if line.contains("sync session with the hub ended") {
            ended = ended.or(Some(time));
        } else if line.contains("connected to the controller for live updates")
            && let Some(since) = ended.take()
        {
            gaps.push(Duration::from_secs_f64(time - since));
        }
    }
    if ended.is_some() {
        gaps.push(Duration::MAX);
    }
    gaps
}

/// How soon a change made on the hub reaches a member that has its session (here: well under a second).
const CHANGE_REACHES_MEMBER: Duration = Duration::from_secs(5);

/// How soon a change made during the flood reaches the member: as [`CHANGE_REACHES_MEMBER`], plus the time a
/// session the flood's congestion of the tunnel ended (the tunnel's capacity is not promised: DESIGN.md)
/// takes to be noticed (TCP keepalive: 2 s idle, 3 probes 1 s apart) and to come back (2 s, checked below).
/// Still far below the flood's 45 s, for which a member crowded out gets no change at all.
const CHANGE_REACHES_FLOODED_MEMBER: Duration = Duration::from_secs(5 + 5 + 2);

#[test]
fn a_local_users_flood_of_the_sync_port_keeps_neither_the_member_nor_its_restarted_meshd_out() {
    if !require_root() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let Mesh { hub, vps, mut hub_daemon, mut vps_daemon, hub_v4 } = hub_and_member(root, "sf", 216, &|_| {});
    let connected = |daemon: &Proc| daemon.log_text().matches("connected to the controller for live updates").count();
    assert!(wait_until(Duration::from_secs(10), || connected(&vps_daemon) == 1), "{}", vps_daemon.log_text());

    // Four local users on vps flood the hub's sync port through vps's tunnel.
    let flooders = flood_sync_port(&vps, &hub_v4, 4, 45, root);
    let flood_started = Instant::now();
    // vps keeps its live updates: changes made 6, 12 and 18 s into the flood reach it within seconds.
    for (i, at) in [6, 12, 18].into_iter().enumerate() {
        while flood_started.elapsed() < Duration::from_secs(at) {
            std::thread::sleep(Duration::from_millis(50));
        }
        let name = format!("web{i}");
        let address = add_service_on_vps(&hub, &name, 8080 + i as u16);
        let changed = Instant::now();
        assert!(
            wait_until(CHANGE_REACHES_FLOODED_MEMBER, || carries(&vps, &address)),
            "a change made {at} s into the flood did not reach vps:\n{}",
            vps_daemon.log_text()
        );
        eprintln!("{at} s into the flood, a change reached vps after {:?}", changed.elapsed());
    }
    while flood_started.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(100));
    }
    // The flood congests vps's tunnel (the hub's userspace WireGuard drops datagrams it cannot read in time),
    // so the session's keepalives may give up once; it is back at once, never held out.
    let log = vps_daemon.log_text();
    for gap in reconnect_gaps(&log) {
        assert!(gap < Duration::from_secs(2), "vps was without a session for {gap:?} during the flood:\n{log}");
    }
    // The hub's firewall drops the flood's SYNs before its accept queue (since its last change, at 18 s).
    let dropped = sync_drops(&hub);
    assert!(dropped > 10_000, "the hub's firewall dropped only {dropped} packets of the flood in 2 s");

    // vps's meshd restarts during the flood: its new session is up within seconds, and takes changes.
    assert!(vps_daemon.stop(Duration::from_secs(10)).success(), "{}", vps_daemon.log_text());
    let restarted = Instant::now();
    let mut vps_daemon = vps.run_daemon(&root.join("vps-restarted.log"));
    // (0.3-2.3 s here during the flood: the sync client backs off while the tunnel comes up.)
    let back = wait_until(Duration::from_secs(8), || connected(&vps_daemon) == 1);
    assert!(back, "the restarted vps got no session during the flood:\n{}", vps_daemon.log_text());
    eprintln!("during the flood, the restarted vps was connected after {:?}", restarted.elapsed());
    let web3 = add_service_on_vps(&hub, "web3", 8083);
    assert!(
        wait_until(CHANGE_REACHES_MEMBER, || carries(&vps, &web3)),
        "a change did not reach the restarted vps during the flood:\n{}",
        vps_daemon.log_text()
    );
    let mut flooders = flooders;
    for (flooder, log) in &mut flooders {
        assert!(flooder.is_running(), "the flood ended before the checks: {}", fs::read_to_string(log).unwrap());
    }
    let made: u64 = flooders.iter().map(|(_, log)| connects(log)).sum();
    eprintln!("the flood made {made} connects in {:?}", flood_started.elapsed());
    assert!(made > 100_000, "too small a flood to tell: {made} connects");
    drop(flooders);
    hub_daemon.assert_running("after the flood");
    vps_daemon.assert_running("after the flood");
}
