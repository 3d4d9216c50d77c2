//! The clients role: N light members in one process, each a TCP session from its own mesh address.

use super::*;

#[derive(Clone)]
pub(crate) enum Order {
    /// Check the last digest received (and a kept copy's digest) against this one.
    Verify(Arc<str>),
    /// Say hello again with an unknown digest: the hub sends the whole state.
    Resync,
}

/// Steps every member reports: 0 connected, 1..=changes+1 each change (1 is the uncounted first),
/// then the verification and the resync.
pub(crate) struct Tracker {
    hosts: usize,
    steps: Vec<Step>,
    bad: AtomicU64,
    out: std_mpsc::Sender<String>,
}

pub(crate) struct Step {
    done: AtomicUsize,
    first: AtomicU64,
    last: AtomicU64,
}

impl Tracker {
    fn record(&self, step: usize) -> Result<()> {
        let now = mono_ns();
        let s = self.steps.get(step).ok_or_else(|| format!("step {step} was not announced"))?;
        s.first.fetch_min(now, SeqCst);
        s.last.fetch_max(now, SeqCst);
        if s.done.fetch_add(1, SeqCst) + 1 == self.hosts {
            let (first, last) = (s.first.load(SeqCst), s.last.load(SeqCst));
            let cpu = clock_ns(libc::CLOCK_PROCESS_CPUTIME_ID);
            let _ = self.out.send(format!("step {step} {first} {last} {cpu} {}", self.bad.load(SeqCst)));
        }
        Ok(())
    }
}

pub(crate) fn clients(args: &[String]) -> Result<()> {
    let hub: SocketAddr = required(args, "--hub")?.parse()?;
    let hosts = number(args, "--hosts", 0)?;
    let changes = number(args, "--changes", 0)?;
    let digest: Arc<str> = required(args, "--digest")?.into();
    raise_nofile(hosts + 64)?;

    let (out, printed) = std_mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in printed {
            println!("{line}");
        }
    });
    let steps = (0..changes + 4)
        .map(|_| Step { done: AtomicUsize::new(0), first: AtomicU64::new(u64::MAX), last: AtomicU64::new(0) })
        .collect();
    let tracker = Arc::new(Tracker { hosts, steps, bad: AtomicU64::new(0), out });
    let (orders, _) = broadcast::channel::<Order>(8);
    let receivers: Vec<_> = (0..hosts).map(|_| orders.subscribe()).collect();
    std::thread::spawn(move || {
        for line in std::io::stdin().lines().map_while(std::result::Result::ok) {
            let order = match line.split_once(' ') {
                Some(("verify", digest)) => Order::Verify(digest.into()),
                _ if line == "resync" => Order::Resync,
                _ => {
                    eprintln!("clients: unknown order {line:?}");
                    continue;
                }
            };
            let _ = orders.send(order);
        }
        // The controller is gone.
        std::process::exit(0);
    });

    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(WORKERS).enable_all().build()?;
    runtime.block_on(async move {
        let gate = Arc::new(Semaphore::new(CONNECTING));
        let stride = (hosts / FULL_MEMBERS).max(1);
        let members: Vec<_> = receivers
            .into_iter()
            .enumerate()
            .map(|(ordinal, orders)| {
                let member = Member {
                    index: u32::try_from(ordinal + 2).expect("a member index fits in u32"),
                    keeps_copy: ordinal.is_multiple_of(stride) && ordinal / stride < FULL_MEMBERS,
                    hub,
                    digest: digest.clone(),
                    tracker: tracker.clone(),
                    gate: gate.clone(),
                };
                tokio::spawn(async move {
                    if let Err(e) = member.follow(orders).await {
                        let _ = member.tracker.out.send(format!("fail member {}: {e}", member.index));
                    }
                })
            })
            .collect();
        for member in members {
            member.await?;
        }
        Ok(())
    })
}

/// The member's side of the sync handshake, as the daemon does it (every session opens with one).
async fn prove(
    index: u32,
    reader: &mut BufReader<OwnedReadHalf>,
    write: &mut tokio::net::tcp::OwnedWriteHalf,
    line: &mut Vec<u8>,
) -> Result<()> {
    let mut next = async |line: &mut Vec<u8>| -> Result<()> {
        line.clear();
        if reader.read_until(b'\n', line).await? == 0 {
            return Err("the hub closed the session during the handshake".into());
        }
        Ok(())
    };
    next(line).await?;
    let Challenge { challenge } = serde_json::from_slice(line)?;
    let (own, ephemeral) = (private_key(index), PrivateKey::generate());
    let handshake = Handshake::member(&own, &ephemeral, &private_key(1).public_key(), &challenge)?;
    let proof = MemberProof {
        public_key: own.public_key(),
        ephemeral: ephemeral.public_key(),
        proof: handshake.member_proof(),
    };
    let mut text = serde_json::to_string(&proof)?;
    text.push('\n');
    write.write_all(text.as_bytes()).await?;
    next(line).await?;
    match serde_json::from_slice(line)? {
        HubAnswer::Proven { proof } => handshake.verify_hub(&proof)?,
        HubAnswer::Refused { reason } => return Err(format!("the hub refused the handshake: {reason}").into()),
    }
    line.clear();
    Ok(())
}

/// The source port every member connects from: the first of those meshd's members use.
const MEMBER_PORT: u16 = *meshd::links::sync::SOURCE_PORTS.start();

pub(crate) struct Member {
    index: u32,
    keeps_copy: bool,
    hub: SocketAddr,
    digest: Arc<str>,
    tracker: Arc<Tracker>,
    gate: Arc<Semaphore>,
}

impl Member {
    async fn follow(&self, mut orders: broadcast::Receiver<Order>) -> Result<()> {
        let address = network().pool().v4_of(self.index);
        let permit = self.gate.acquire().await?;
        let socket = TcpSocket::new_v4()?;
        // From a port below 1024, as meshd's members connect (the hub admits no other; binding one takes root).
        // Every member has an address of its own, so they all use the same port.
        socket.set_reuseaddr(true)?;
        socket.bind(SocketAddr::new(address.into(), MEMBER_PORT))?;
        let stream = socket.connect(self.hub).await?;
        stream.set_nodelay(true)?;
        let (read, mut write) = stream.into_split();
        let mut reader = BufReader::new(read);
        let mut line = Vec::new();
        prove(self.index, &mut reader, &mut write, &mut line).await?;
        let mut copy = None;
        let mut last = self.digest.to_string();
        if self.keeps_copy {
            write.write_all(hello("stale").as_bytes()).await?;
            let (digest, state) = read_state(&mut reader, &mut line).await?;
            (last, copy) = (digest, Some(state));
        } else {
            write.write_all(hello(&last).as_bytes()).await?;
        }
        drop(permit);
        self.tracker.record(0)?;
        let mut step = 0;
        loop {
            tokio::select! {
                read = reader.read_until(b'\n', &mut line) => {
                    if read? == 0 || !line.ends_with(b"\n") {
                        return Err("the hub closed the session".into());
                    }
                    let ToMember::Changes { from, to, changes } = serde_json::from_slice(&line)? else {
                        return Err(format!("expected changes: {}", String::from_utf8_lossy(&line)).into());
                    };
                    line.clear();
                    if from != last {
                        self.tracker.bad.fetch_add(1, SeqCst);
                    }
                    if let Some(copy) = copy.as_mut() {
                        sync::apply(copy, &changes);
                    }
                    last = to;
                    step += 1;
                    self.tracker.record(step)?;
                }
                order = orders.recv() => match order? {
                    Order::Verify(expected) => {
                        let copy_ok = copy.as_ref().is_none_or(|c: &SharedState| sync::digest(c) == *expected);
                        if last != *expected || !copy_ok {
                            self.tracker.bad.fetch_add(1, SeqCst);
                        }
                        self.tracker.record(self.tracker.steps.len() - 2)?;
                    }
                    Order::Resync => {
                        write.write_all(hello("stale").as_bytes()).await?;
                        if let Some(copy) = copy.as_mut() {
                            (last, *copy) = read_state(&mut reader, &mut line).await?;
                        } else {
                            skip_state(&mut reader).await?;
                        }
                        self.tracker.record(self.tracker.steps.len() - 1)?;
                    }
                },
            }
        }
    }
}

pub(crate) fn hello(digest: &str) -> String {
    let mut text = serde_json::to_string(&ToHub::Hello { digest: digest.into() }).expect("messages serialise");
    text.push('\n');
    text
}

/// Read and parse a whole-state line, as a member does.
pub(crate) async fn read_state(
    reader: &mut BufReader<OwnedReadHalf>,
    line: &mut Vec<u8>,
) -> Result<(String, SharedState)> {
    line.clear();
    reader.read_until(b'\n', line).await?;
    let parsed = serde_json::from_slice(line);
    line.clear();
    match parsed? {
        ToMember::State { digest, state } => Ok((digest, *state)),
        _ => Err("expected the whole state".into()),
    }
}

/// Receive a whole-state line without keeping or parsing it (the members' parsing would only measure
/// the client process).
pub(crate) async fn skip_state(reader: &mut BufReader<OwnedReadHalf>) -> Result<()> {
    const START: &[u8] = b"{\"msg\":\"state\"";
    if !reader.fill_buf().await?.starts_with(START) {
        return Err("expected the whole state".into());
    }
    loop {
        let chunk = reader.fill_buf().await?;
        if chunk.is_empty() {
            return Err("the hub closed the session".into());
        }
        match chunk.iter().position(|&b| b == b'\n') {
            Some(end) => {
                reader.consume(end + 1);
                return Ok(());
            }
            None => {
                let len = chunk.len();
                reader.consume(len);
            }
        }
    }
}
