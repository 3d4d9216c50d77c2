//! The controller role: serves a `Publisher` over a state of N members, publishes changes and measures.

use super::*;

pub(crate) fn controller(args: &[String]) -> Result<()> {
    let hosts = number(args, "--hosts", DEFAULT_HOSTS[0])?;
    let changes = number(args, "--changes", DEFAULT_CHANGES)?;
    let reference = !args.iter().any(|a| a == "--no-reference");
    raise_nofile(hosts + 64)?;

    let mut state = build_state(hosts);
    let mut next_index = state.devices.iter().map(|d| d.index).max().unwrap_or(1) + 1;
    let publisher = Publisher::new(state.clone(), &private_key(1));
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(WORKERS).enable_all().build()?;
    // The daemon's own listener (backlog 1024), on the hub's address.
    let listener =
        runtime.block_on(async { meshd::host::socket::listen_tcp("127.0.0.1:0".parse().expect("an address")) })?;
    let hub = listener.local_addr()?;
    let (requests, _requests) = mpsc::channel(16);
    runtime.spawn(publisher.clone().serve(listener, requests));
    let (rss_idle_kb, _) = memory()?;

    let tcp_start = tcp_counters()?;
    let spawned = mono_ns();
    let mut clients = Clients::spawn(hub, hosts, changes, &publisher.digest())?;
    let connected = clients.expect(0)?;
    let tcp_connected = tcp_counters()?;
    // A first change, not counted: every session has said hello and subscribed once it is delivered.
    change(&mut state, 0, &mut next_index);
    publisher.publish(state.clone());
    let mut client_cpu = clients.expect(1)?.cpu_ns;
    let (rss_connected_kb, _) = memory()?;

    let mut deliver_ms = Vec::new();
    let mut first_ms = Vec::new();
    let mut publish_wall_ms = Vec::new();
    let mut publish_cpu_ms = Vec::new();
    let mut process_cpu_ms = Vec::new();
    let mut client_cpu_ms = Vec::new();
    let mut change_line_bytes = Vec::new();
    for k in 1..=changes {
        let old = state.clone();
        change(&mut state, k, &mut next_index);
        // The caller's copy, as the controller hands over `snapshot.shared()`: made outside the timing.
        let next = state.clone();
        let from = publisher.digest();
        let (process0, thread0) = (clock_ns(libc::CLOCK_PROCESS_CPUTIME_ID), clock_ns(libc::CLOCK_THREAD_CPUTIME_ID));
        let start = mono_ns();
        let published = publisher.publish(next);
        let wall = mono_ns() - start;
        let thread = clock_ns(libc::CLOCK_THREAD_CPUTIME_ID) - thread0;
        if !published {
            return Err(format!("change {k} changed nothing").into());
        }
        let report = clients.expect(k + 1)?;
        let process = clock_ns(libc::CLOCK_PROCESS_CPUTIME_ID) - process0;
        deliver_ms.push(ms(report.last_ns - start));
        first_ms.push(ms(report.first_ns - start));
        publish_wall_ms.push(ms(wall));
        publish_cpu_ms.push(ms(thread));
        process_cpu_ms.push(ms(process));
        client_cpu_ms.push(ms(report.cpu_ns - client_cpu));
        client_cpu = report.cpu_ns;
        let line = ToMember::Changes { from, to: publisher.digest(), changes: sync::changes(&old, &state) };
        change_line_bytes.push(serde_json::to_string(&line)?.len() + 1);
    }

    clients.command(&format!("verify {}", publisher.digest()))?;
    let verified = clients.expect(changes + 2)?;
    let tcp_changed = tcp_counters()?;
    if verified.bad > 0 {
        return Err(format!("{} members missed a change or hold a copy that differs", verified.bad).into());
    }
    let (_, hwm_kb) = memory()?;

    let process0 = clock_ns(libc::CLOCK_PROCESS_CPUTIME_ID);
    let start = mono_ns();
    clients.command("resync")?;
    let resync = clients.expect(changes + 3)?;
    let resync_cpu = clock_ns(libc::CLOCK_PROCESS_CPUTIME_ID) - process0;
    let (_, hwm_resync_kb) = memory()?;
    let tcp_resynced = tcp_counters()?;
    drop(clients);

    let whole = ToMember::State { digest: publisher.digest(), state: Box::new(state.clone()) };
    let digest_ms = time_median(|| sync::digest(&state).len());
    let changes_ms = time_median(|| sync::changes(&old_state(&state), &state).len());
    let clone_ms = time_median(|| state.clone().nodes.len());
    let mut result = json!({
        "hosts": hosts,
        "connect_ms": ms(connected.last_ns - spawned),
        "connect_listen_overflows": tcp_connected.0 - tcp_start.0,
        "changes_retransmits": tcp_changed.1 - tcp_connected.1,
        "resync_retransmits": tcp_resynced.1 - tcp_changed.1,
        "deliver_ms": deliver_ms,
        "first_ms": first_ms,
        "publish_wall_ms": publish_wall_ms,
        "publish_cpu_ms": publish_cpu_ms,
        "process_cpu_ms": process_cpu_ms,
        "client_cpu_ms": client_cpu_ms,
        "change_line_bytes": change_line_bytes,
        "rss_idle_kb": rss_idle_kb,
        "rss_connected_kb": rss_connected_kb,
        "hwm_kb": hwm_kb,
        "hwm_resync_kb": hwm_resync_kb,
        "resync_ms": ms(resync.last_ns - start),
        "resync_cpu_ms": ms(resync_cpu),
        "state_bytes": serde_json::to_vec(&state)?.len(),
        "full_line_bytes": serde_json::to_vec(&whole)?.len() + 1,
        "digest_ms": digest_ms,
        "changes_ms": changes_ms,
        "clone_ms": clone_ms,
    });
    if reference {
        // What a design that computes and sends each host its own whole map pays per change, at least:
        // the serialisation, once per host.
        result["serialise_once_ms"] = json!(time_median(|| serde_json::to_string(&whole).map_or(0, |s| s.len())));
        let start = mono_ns();
        let bytes: usize = (0..hosts).map(|_| serde_json::to_string(&whole).map_or(0, |s| s.len())).sum();
        result["serialise_each_ms"] = json!(ms(mono_ns() - start));
        result["serialise_each_bytes"] = json!(bytes);
    }
    println!("{result}");
    Ok(())
}

/// The state before a typical change (an endpoint moved), for timing `sync::changes` alone.
pub(crate) fn old_state(state: &SharedState) -> SharedState {
    let mut old = state.clone();
    old.nodes[1].endpoint = Some("192.0.2.1:1".parse().expect("a valid endpoint"));
    old
}

/// Median wall time of `REPEATS` runs of `work`, in ms; its result is consumed so nothing is optimised away.
pub(crate) fn time_median(mut work: impl FnMut() -> usize) -> f64 {
    median_of(
        (0..REPEATS)
            .map(|_| {
                let start = mono_ns();
                std::hint::black_box(work());
                ms(mono_ns() - start)
            })
            .collect(),
    )
}

/// The client process, seen from the controller.
pub(crate) struct Clients {
    child: Child,
    stdin: ChildStdin,
    reports: std_mpsc::Receiver<String>,
}

/// A step every member reached: when the first and the last did (CLOCK_MONOTONIC, ns), the client
/// process's CPU time so far, and how many members found something wrong so far.
pub(crate) struct Report {
    first_ns: u64,
    last_ns: u64,
    cpu_ns: u64,
    bad: u64,
}

impl Clients {
    fn spawn(hub: SocketAddr, hosts: usize, changes: usize, digest: &str) -> Result<Clients> {
        let mut child = Command::new(std::env::current_exe()?)
            .args(["clients", "--hub", &hub.to_string(), "--hosts", &hosts.to_string()])
            .args(["--changes", &changes.to_string(), "--digest", digest])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdin = child.stdin.take().ok_or("no stdin for the clients")?;
        let stdout = child.stdout.take().ok_or("no stdout from the clients")?;
        let (lines, reports) = std_mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines().map_while(std::result::Result::ok) {
                if lines.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Clients { child, stdin, reports })
    }

    fn command(&mut self, command: &str) -> Result<()> {
        writeln!(self.stdin, "{command}")?;
        self.stdin.flush()?;
        Ok(())
    }

    /// Wait for every member to reach `step`.
    fn expect(&self, step: usize) -> Result<Report> {
        let line = self
            .reports
            .recv_timeout(STEP_TIMEOUT)
            .map_err(|_| format!("no report of step {step} from the clients"))?;
        let fields: Vec<&str> = line.split_whitespace().collect();
        match fields.as_slice() {
            ["step", k, first, last, cpu, bad] if k.parse::<usize>()? == step => {
                Ok(Report { first_ns: first.parse()?, last_ns: last.parse()?, cpu_ns: cpu.parse()?, bad: bad.parse()? })
            }
            _ => Err(format!("clients, waiting for step {step}: {line}").into()),
        }
    }
}

impl Drop for Clients {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
