//! meshd's own `tor`: the files of its onion services (keys, `authorized_clients/`), its `torrc`, and the
//! process, supervised by the core's [`Supervisor`]. The rest of the daemon sees one small interface:
//! [`Tor::apply`] an onion plan, read [`Tor::reports`], [`Tor::shut_down`]. With
//! [`TorOptions::external`] (`meshd run --tor-external DIR`) another tor serves the same plan (the system's,
//! configured by the NixOS module): meshd keeps the keys and client lists as ever, writes the onion-service
//! lines for that tor to `tor/services.torrc`, and runs no tor of its own.
//!
//! Layout under the state directory (all 0700, files 0600):
//! `tor/torrc`, `tor/data/` (tor's `DataDirectory`), `tor/onion/SERVICE/` (its `HiddenServiceDir`: the key
//! files in the C tor format, `hostname`, `authorized_clients/DEVICE.auth`). Keys stay when a service stops
//! being served, so serving it again keeps its address; they are part of a backup of the state directory.
//! With `--tor-external DIR`: `tor/services.torrc` instead of `tor/torrc` and `tor/data/`, its `HiddenServiceDir`
//! lines naming `DIR/SERVICE`, where the other tor's keeper copies `tor/onion/SERVICE/`.

use std::collections::{BTreeMap, VecDeque};
use std::fs;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::statedir::StateDir;
use meshd_core::input::Label;
use meshd_core::plan::OnionPlan;
use meshd_core::tor::onion::{AUTHORIZED_CLIENTS_DIR, OnionKey, PUBLIC_KEY_FILE, SECRET_KEY_FILE};
use meshd_core::tor::supervisor::{Command as TorCommand, Supervisor};
use meshd_core::tor::torrc::{OnionServiceConfig, TorBuild, TorConfig, services_section};
use meshd_core::wire::sync::OnionReport;

/// How long a stopped tor has to exit after SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// Which tor to run and what to add to its configuration (`meshd run --tor-binary`, `--tor-config`).
#[derive(Debug, Clone, Default)]
pub struct TorOptions {
    /// The `tor` executable; `None`: `tor` on `PATH`.
    pub binary: Option<PathBuf>,
    /// A file whose lines are appended to the generated `torrc` (bridges, a test network).
    pub extra_config: Option<PathBuf>,
    /// Another tor serves the onion services: the directory where it keeps copies of `tor/onion/SERVICE/`
    /// (absolute). meshd then runs no tor and writes `tor/services.torrc` for that tor to `%include`.
    pub external: Option<PathBuf>,
}

impl TorOptions {
    /// Check what was named explicitly, at start-up: the binary runs and is recent enough, the extra
    /// configuration is readable. Errors: one line naming the option.
    pub fn check(&self) -> anyhow::Result<()> {
        if let Some(dir) = &self.external {
            if !dir.is_absolute() {
                bail!("--tor-external {}: not an absolute path", dir.display());
            }
            // Rendered once now, so a path tor cannot read is refused at start rather than at the first exposure.
            let probe = OnionServiceConfig { dir: dir.clone(), port: 80, target: ([127, 0, 0, 1], 80).into() };
            services_section(&[probe], false).with_context(|| format!("--tor-external {}", dir.display()))?;
        }
        if let Some(binary) = &self.binary {
            build_of(binary).with_context(|| format!("--tor-binary {}", binary.display()))?;
        }
        self.extra()?;
        Ok(())
    }

    /// The lines of `--tor-config`, read now (empty without it). Errors: not a regular file (a FIFO would block,
    /// a device never end), over [`MAX_EXTRA`], or one that another user may write (its lines run root's tor).
    fn extra(&self) -> anyhow::Result<String> {
        let Some(path) = &self.extra_config else { return Ok(String::new()) };
        let shown = path.display();
        let meta = fs::metadata(path).with_context(|| format!("--tor-config {shown}: cannot read it"))?;
        if !meta.is_file() {
            bail!("--tor-config {shown}: not a regular file");
        }
        if meta.len() > MAX_EXTRA {
            bail!("--tor-config {shown}: {} bytes, more than the {MAX_EXTRA} a torrc addition may have", meta.len());
        }
        trusted(path, &meta).with_context(|| format!("--tor-config {shown}"))?;
        fs::read_to_string(path).with_context(|| format!("--tor-config {shown}: cannot read it"))
    }

    fn binary(&self) -> PathBuf {
        self.binary.clone().unwrap_or_else(|| PathBuf::from("tor"))
    }
}

/// The file of onion-service lines written for a tor meshd does not run (`--tor-external`), under `tor/`.
pub const EXTERNAL_TORRC: &str = "services.torrc";

/// The first lines of [`EXTERNAL_TORRC`].
const EXTERNAL_HEADER: &str = "# Written by meshd (meshd run --tor-external) on every change of its onion services: edits are \
                               lost.\n# Read by the system's tor through %include; the directories are copies of \
                               meshd's tor/onion/.\n";

/// The most a `--tor-config` file may hold, bytes.
const MAX_EXTRA: u64 = 64 * 1024;
/// How long `tor --version` may take.
const VERSION_TIMEOUT: Duration = Duration::from_secs(5);

/// Refuse a file another user could change: owned by someone else, or writable by group or others.
fn trusted(path: &Path, meta: &fs::Metadata) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != me && meta.uid() != 0 {
        bail!("{} is owned by uid {}: whoever owns it controls the tor meshd runs", path.display(), meta.uid());
    }
    if meta.mode() & 0o022 != 0 {
        bail!(
            "{} may be written by other users (mode {:o}): make it 0644 or stricter",
            path.display(),
            meta.mode() & 0o777
        );
    }
    Ok(())
}

/// What the binary at `binary` is, from `tor --version`. Errors: missing, not tor, too old, writable by other
/// users, or no answer within [`VERSION_TIMEOUT`] (it is killed, with what it started).
fn build_of(binary: &Path) -> anyhow::Result<TorBuild> {
    if binary.components().count() > 1
        && let Ok(meta) = fs::metadata(binary)
    {
        trusted(binary, &meta)?;
    }
    let child = std::process::Command::new(binary)
        .arg("--version")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound if binary == Path::new("tor") => {
                anyhow!("no tor on PATH (install tor, or give meshd run --tor-binary PATH)")
            }
            std::io::ErrorKind::NotFound => {
                anyhow!("no tor at {} (install tor, or give meshd run --tor-binary PATH)", binary.display())
            }
            _ => anyhow!("cannot run {}: {e}", binary.display()),
        })?;
    let output = wait_with_timeout(child, VERSION_TIMEOUT).ok_or_else(|| {
        anyhow!("{} --version gave no answer within {} s", binary.display(), VERSION_TIMEOUT.as_secs())
    })?;
    Ok(TorBuild::parse(&String::from_utf8_lossy(&output.stdout))?)
}

/// Wait for `child` (the leader of its own process group) up to `timeout`, then kill its whole group, so
/// nothing it started stays behind holding its output open; its output, or `None` when it had to be killed.
fn wait_with_timeout(mut child: std::process::Child, timeout: Duration) -> Option<std::process::Output> {
    let deadline = std::time::Instant::now() + timeout;
    let finished = loop {
        match child.try_wait() {
            Ok(Some(_)) => break true,
            Ok(None) if std::time::Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => break false,
        }
    };
    if let Ok(group) = libc::pid_t::try_from(child.id()) {
        // SAFETY: kill(2) on the process group this child leads (`process_group(0)`); touches no memory.
        unsafe { libc::kill(-group, libc::SIGKILL) };
    }
    match finished {
        true => child.wait_with_output().ok(),
        false => {
            let _ = child.wait();
            None
        }
    }
}

/// The onion services of this host and the tor that serves them.
pub struct Tor {
    options: TorOptions,
    state: StateDir,
    /// Where each planned service stands: its address, or why it cannot be served.
    reports: BTreeMap<Label, OnionReport>,
    /// The supervisor's task, once tor was needed.
    task: Option<Supervision>,
    /// Why the running tor does not serve them, as the supervisor last saw it: set when tor exits (with the last
    /// warning it printed), cleared when a tor is bootstrapped or stopped.
    failing: Arc<Mutex<Option<String>>>,
    generation: u64,
    /// The last `torrc` written.
    torrc: Option<String>,
}

impl Tor {
    /// Nothing served yet.
    pub fn new(options: TorOptions, state: &StateDir) -> Tor {
        Tor {
            options,
            state: state.clone(),
            reports: BTreeMap::new(),
            task: None,
            generation: 0,
            torrc: None,
            failing: Arc::default(),
        }
    }

    /// Where each onion service of the last plan stands, by service: its address, or why it is not served (its
    /// files could not be made, or tor keeps exiting).
    pub fn reports(&self) -> BTreeMap<Label, OnionReport> {
        let failing = self.failing.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
        match failing {
            Some(error) => {
                self.reports.keys().map(|service| (service.clone(), OnionReport::Error(error.clone()))).collect()
            }
            None => self.reports.clone(),
        }
    }

    /// Serve exactly the onion services of `plan`: keys made where missing, clients listed, the `torrc`
    /// written, tor started, told to reload (SIGHUP) or stopped. Errors (no tor, one too old, a file that
    /// cannot be written) are also kept as every planned service's report. A service that cannot be served (its
    /// target does not resolve, a file in its way) is left out and reported; the others are served all the same,
    /// and the error returned so that the step is tried again.
    pub async fn apply(&mut self, plan: &OnionPlan) -> anyhow::Result<()> {
        // The other tor is told of an empty plan too (an empty services.torrc), so that it stops serving.
        if plan.is_empty() && self.options.external.is_none() {
            self.reports.clear();
            self.tell(0, false);
            return Ok(());
        }
        match self.write(plan).await {
            Ok((reports, served, changed)) => {
                let failures: Vec<String> = (reports.iter())
                    .filter_map(|(service, r)| match r {
                        OnionReport::Error(e) => Some(format!("{service}: {e}")),
                        OnionReport::Address(_) => None,
                    })
                    .collect();
                self.reports = reports;
                self.tell(served, changed);
                match failures.is_empty() {
                    true => Ok(()),
                    false => Err(anyhow!("serving onion services: {}", failures.join("; "))),
                }
            }
            Err(e) => {
                let line = format!("{e:#}");
                self.reports = plan.keys().map(|service| (service.clone(), OnionReport::Error(line.clone()))).collect();
                Err(e.context("serving onion services"))
            }
        }
    }

    /// Write every file of `plan`; each service's report, how many are served, and whether any file tor reads
    /// changed (the `torrc`, a key, a client list: tor rereads them all on SIGHUP and publishes new descriptors).
    /// The binary is checked first, so a missing or old tor writes nothing. Errors: what concerns every service.
    async fn write(&mut self, plan: &OnionPlan) -> anyhow::Result<(BTreeMap<Label, OnionReport>, usize, bool)> {
        let root = self.state.root().join("tor");
        let external = self.options.external.clone();
        // The other tor's own build and configuration are its keeper's business (no PoW line: whether it has the
        // defence is not known here).
        let (pow, extra) = match &external {
            Some(_) => (false, String::new()),
            None => {
                let binary = self.options.binary();
                let build = tokio::task::spawn_blocking(move || build_of(&binary)).await??;
                (build.pow, self.options.extra()?)
            }
        };
        private_dir(&root)?;
        if external.is_none() {
            private_dir(&root.join("data"))?;
        }
        private_dir(&root.join("onion"))?;
        let mut reports = BTreeMap::new();
        let mut services = Vec::new();
        let mut changed = false;
        for (name, service) in plan {
            let dir = root.join("onion").join(name.as_str());
            let files = self.service_files(&dir, &service.clients);
            let ready = match files {
                Ok((key, files_changed)) => {
                    changed |= files_changed;
                    resolve(&service.target).await.map(|target| (key, target))
                }
                Err(e) => Err(e),
            };
            match ready {
                Ok((key, target)) => {
                    reports.insert(name.clone(), OnionReport::Address(key.address()));
                    let dir = external.as_ref().map_or(dir, |other| other.join(name.as_str()));
                    services.push(OnionServiceConfig { dir, port: service.port, target });
                }
                Err(e) => {
                    reports.insert(name.clone(), OnionReport::Error(format!("{e:#}")));
                }
            }
        }
        let served = services.len();
        if external.is_some() {
            let text = format!("{EXTERNAL_HEADER}{}", services_section(&services, false)?);
            // Written again also when only a key or client list changed: the rename is what the other tor's keeper
            // watches for (the NixOS module's path unit), to copy the files and reload that tor.
            if changed || self.torrc.as_ref() != Some(&text) {
                changed = true;
                self.state.replace_private_file(&root.join(EXTERNAL_TORRC), text.as_bytes())?;
                self.torrc = Some(text);
            }
            return Ok((reports, served, changed));
        }
        let config = TorConfig { data_dir: root.join("data"), services, pow, owner: std::process::id(), extra };
        let text = config.render()?;
        if self.torrc.as_ref() != Some(&text) {
            changed = true;
            self.state.replace_private_file(&root.join("torrc"), text.as_bytes())?;
            self.torrc = Some(text);
        }
        Ok((reports, served, changed))
    }

    /// Make `dir` a `HiddenServiceDir`: its key (read, or made and written if missing) and exactly `clients`
    /// in `authorized_clients/`. Returns the key, and whether a file was written or removed.
    fn service_files(
        &self,
        dir: &Path,
        clients: &BTreeMap<Label, meshd_core::tor::client::ClientPublicKey>,
    ) -> anyhow::Result<(OnionKey, bool)> {
        private_dir(dir)?;
        let secret = dir.join(SECRET_KEY_FILE);
        let mut changed = false;
        let key = match self.state.read_private_file(&secret)? {
            Some(bytes) => OnionKey::from_secret_file(&bytes).with_context(|| format!("{}", secret.display()))?,
            None => {
                let key = OnionKey::generate();
                self.state.replace_private_file(&dir.join(PUBLIC_KEY_FILE), &key.public_file())?;
                self.state.replace_private_file(&secret, &key.secret_file())?;
                info!(address = %key.address(), dir = %dir.display(), "made a new onion service key");
                changed = true;
                key
            }
        };
        let authorized = dir.join(AUTHORIZED_CLIENTS_DIR);
        private_dir(&authorized)?;
        for entry in fs::read_dir(&authorized).with_context(|| format!("reading {}", authorized.display()))? {
            let entry = entry?;
            let path = entry.path();
            let device = path.file_stem().and_then(|s| s.to_str()).and_then(|s| s.parse::<Label>().ok());
            // Only regular files meshd wrote stay: a link or FIFO planted there is removed, never followed or read.
            let regular = entry.file_type().is_ok_and(|t| t.is_file());
            if !regular || !device.is_some_and(|d| clients.contains_key(&d)) {
                fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
                changed = true;
            }
        }
        for (device, key) in clients {
            let path = authorized.join(format!("{device}.auth"));
            let line = key.auth_line();
            if fs::read_to_string(&path).ok().as_deref() != Some(line.as_str()) {
                self.state.replace_private_file(&path, line.as_bytes())?;
                changed = true;
            }
        }
        Ok((key, changed))
    }

    /// Tell the supervisor there are `services` services now, `changed` if the files changed. With another tor
    /// serving them there is no supervisor.
    fn tell(&mut self, services: usize, changed: bool) {
        if self.options.external.is_some() {
            return;
        }
        if changed {
            self.generation += 1;
        }
        let generation = self.generation;
        match &self.task {
            Some(supervision) => {
                let _ = supervision.desired.send((services, generation));
            }
            None if services > 0 => {
                let (desired, rx) = watch::channel((services, generation));
                let torrc = self.state.root().join("tor").join("torrc");
                let task = tokio::spawn(supervise(self.options.binary(), torrc, rx, self.failing.clone()));
                self.task = Some(Supervision { desired, task });
            }
            None => {}
        }
    }

    /// Stop tor, if it runs.
    pub async fn shut_down(self) {
        if let Some(Supervision { desired, task }) = self.task {
            drop(desired);
            let _ = task.await;
        }
    }
}

/// What the supervisor is told: how many services, and a counter bumped on each change of the files.
type Desired = (usize, u64);

/// The supervisor's task and the channel that tells it what is desired (closed: stop tor and end).
struct Supervision {
    desired: watch::Sender<Desired>,
    task: JoinHandle<()>,
}

/// Make `dir` if missing, and make it 0700 (tor refuses a `HiddenServiceDir` or `DataDirectory` others can
/// read). One found there must be a real directory of meshd's user: a symbolic link (or another user's
/// directory), planted before the state directory was handed to root, would have root change, write and delete
/// wherever it points. Each level is checked before the next is entered, and once checked only root may write it.
fn private_dir(dir: &Path) -> anyhow::Result<()> {
    match fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let meta = fs::symlink_metadata(dir).with_context(|| format!("{}", dir.display()))?;
            // SAFETY: geteuid has no preconditions and cannot fail.
            let me = unsafe { libc::geteuid() };
            if meta.file_type().is_symlink() {
                bail!("{} is a symbolic link: meshd follows none in its state directory; remove it", dir.display());
            }
            if !meta.is_dir() {
                bail!("{} is not a directory: remove it", dir.display());
            }
            if meta.uid() != me {
                bail!("{} is owned by uid {}, not by meshd's: remove it", dir.display(), meta.uid());
            }
            fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).with_context(|| format!("{}", dir.display()))
        }
        Err(e) => Err(e).with_context(|| format!("creating {}", dir.display())),
    }
}

/// A service's target as tor needs it: an address (a name is looked up through the host's resolver).
async fn resolve(target: &meshd_core::input::HostPort) -> anyhow::Result<std::net::SocketAddr> {
    if let Some(ip) = target.ip() {
        return Ok(std::net::SocketAddr::new(ip, target.port()));
    }
    let text = target.to_string();
    // Bounded: a resolver that never answers must not hold up the daemon's loop on every retry.
    tokio::time::timeout(Duration::from_secs(2), tokio::net::lookup_host(&text))
        .await
        .map_err(|_| anyhow!("looking up the target {text}: no answer within 2 s"))?
        .with_context(|| format!("looking up the target {text}"))?
        .next()
        .ok_or_else(|| anyhow!("the target {text} has no address"))
}

/// Run the supervisor of one tor until the sender of `desired` is dropped; then stop tor.
async fn supervise(
    binary: PathBuf,
    torrc: PathBuf,
    mut desired: watch::Receiver<Desired>,
    failing: Arc<Mutex<Option<String>>>,
) {
    let mut supervisor = Supervisor::default();
    let mut child: Option<Child> = None;
    let mut lines = None;
    let mut seen = None;
    // The last two warnings or errors tor printed, to say why it exited (its detail is usually the warning
    // before a generic "[err] Reading config failed--see warnings above.").
    let mut warnings: VecDeque<String> = VecDeque::with_capacity(2);
    let set_failing = |why: Option<String>| *failing.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = why;
    loop {
        let (services, generation) = *desired.borrow_and_update();
        let changed = seen != Some(generation);
        seen = Some(generation);
        if let Some(command) = supervisor.configure(services, changed, Instant::now().into_std()) {
            if command == TorCommand::Stop {
                set_failing(None);
            }
            carry_out(command, &binary, &torrc, &mut child, &mut lines, &mut supervisor).await;
        }
        let deadline = supervisor.poll_timeout().map(Instant::from_std);
        tokio::select! {
            gone = desired.changed() => if gone.is_err() { break },
            status = exited(&mut child) => {
                child = None;
                // What it printed before exiting may not have been read yet: it says why.
                if let Some(mut rest) = lines.take() {
                    while let Ok(Some(line)) = tokio::time::timeout(Duration::from_millis(200), rest.next_line()).await {
                        if let Said::Warning(warning) = log_line(&line, &mut supervisor) {
                            remember(&mut warnings, warning);
                        }
                    }
                }
                let wait = supervisor.exited(Instant::now().into_std());
                warn!(status = %status, retry_in = ?wait, "tor exited; starting it again after a wait");
                // Killed by a signal, its warnings say nothing of why.
                let said = match (warnings.is_empty(), status.contains("signal")) {
                    (false, false) => format!("; it last said: {}", warnings.drain(..).collect::<Vec<_>>().join(" ")),
                    _ => String::new(),
                };
                warnings.clear();
                set_failing(Some(format!("tor exited ({status}){said}")));
            }
            line = next_line(&mut lines) => match line {
                Some(line) => match log_line(&line, &mut supervisor) {
                    Said::Started => set_failing(None),
                    Said::Warning(warning) => remember(&mut warnings, warning),
                    Said::Other => {}
                },
                None => lines = None,
            },
            () = sleep_until(deadline) => {
                if let Some(command) = supervisor.handle_timeout(Instant::now().into_std()) {
                    carry_out(command, &binary, &torrc, &mut child, &mut lines, &mut supervisor).await;
                }
            }
        }
    }
    if let Some(child) = child.take() {
        stop(child).await;
    }
}

/// tor's standard output, line by line. Not `tokio::io::Lines`: a line that is not UTF-8 would end it, the pipe
/// would close and tor die of SIGPIPE. Cancel-safe: a line read in part stays in `partial`.
struct Lines {
    reader: BufReader<tokio::process::ChildStdout>,
    partial: Vec<u8>,
}

impl Lines {
    fn new(out: tokio::process::ChildStdout) -> Lines {
        Lines { reader: BufReader::new(out), partial: Vec::new() }
    }

    /// The next line, invalid UTF-8 replaced; `None` at the end.
    async fn next_line(&mut self) -> Option<String> {
        let read = self.reader.read_until(b'\n', &mut self.partial).await;
        if matches!(read, Ok(0) | Err(_)) && self.partial.is_empty() {
            return None;
        }
        let line = String::from_utf8_lossy(&self.partial).trim_end().to_owned();
        self.partial.clear();
        Some(line)
    }
}

async fn carry_out(
    command: TorCommand,
    binary: &Path,
    torrc: &Path,
    child: &mut Option<Child>,
    lines: &mut Option<Lines>,
    supervisor: &mut Supervisor,
) {
    match command {
        TorCommand::Start => {
            let mut command = Command::new(binary);
            // tor built with systemd support would tell meshd's service manager it is ready: only meshd does.
            command.env_remove("NOTIFY_SOCKET");
            command
                .arg("-f")
                .arg(torrc)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .kill_on_drop(true);
            // tor needs none of meshd's capabilities: a meshd running as its own user with CAP_NET_ADMIN and
            // CAP_NET_BIND_SERVICE ambient (the unit's way) would hand them on to it; the ambient set is cleared
            // in the child before exec, so tor runs with none (prctl(2), PR_CAP_AMBIENT_CLEAR_ALL).
            // SAFETY: prctl is async-signal-safe and touches no memory of the parent; it runs in the forked child.
            unsafe {
                command.pre_exec(|| {
                    if libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) == 0 {
                        Ok(())
                    } else {
                        Err(std::io::Error::last_os_error())
                    }
                });
            }
            let spawned = command.spawn();
            match spawned {
                Ok(mut started) => {
                    info!(pid = started.id(), "started tor");
                    *lines = started.stdout.take().map(Lines::new);
                    *child = Some(started);
                }
                Err(e) => {
                    let wait = supervisor.exited(Instant::now().into_std());
                    warn!(binary = %binary.display(), error = %e, retry_in = ?wait, "cannot start tor");
                }
            }
        }
        TorCommand::Reload => {
            if let Some(pid) = child.as_ref().and_then(Child::id) {
                debug!(pid, "telling tor to reload its configuration");
                signal(pid, libc::SIGHUP);
            }
        }
        TorCommand::Stop => {
            *lines = None;
            if let Some(running) = child.take() {
                stop(running).await;
            }
        }
    }
}

/// SIGTERM, then SIGKILL after [`STOP_GRACE`].
async fn stop(mut child: Child) {
    if let Some(pid) = child.id() {
        signal(pid, libc::SIGTERM);
    }
    if tokio::time::timeout(STOP_GRACE, child.wait()).await.is_err() {
        let _ = child.kill().await;
    }
    info!("stopped tor");
}

fn signal(pid: u32, signal: libc::c_int) {
    let Ok(pid) = libc::pid_t::try_from(pid) else { return };
    // SAFETY: kill(2) takes any pid and signal number and touches no memory of ours.
    unsafe { libc::kill(pid, signal) };
}

async fn exited(child: &mut Option<Child>) -> String {
    match child {
        Some(child) => match child.wait().await {
            Ok(status) => status.to_string(),
            Err(e) => e.to_string(),
        },
        None => std::future::pending().await,
    }
}

async fn next_line(lines: &mut Option<Lines>) -> Option<String> {
    match lines {
        Some(lines) => lines.next_line().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Keep `warning` among the last two.
fn remember(warnings: &mut VecDeque<String>, warning: String) {
    if warnings.len() == 2 {
        warnings.pop_front();
    }
    warnings.push_back(warning);
}

/// What a line of tor's log says that matters to the supervisor.
enum Said {
    /// It reports bootstrap progress: its configuration was accepted and it runs.
    Started,
    /// A warning or error, without tor's timestamp.
    Warning(String),
    Other,
}

/// Pass a line of tor's log on to meshd's: warnings as warnings, the rest at debug; note when it is
/// bootstrapped.
fn log_line(line: &str, supervisor: &mut Supervisor) -> Said {
    if line.contains("Bootstrapped 100%") {
        supervisor.bootstrapped();
        info!("tor is bootstrapped: the onion services are being published");
        Said::Started
    } else if line.contains("Bootstrapped ") {
        debug!(tor = line, "tor");
        Said::Started
    } else if line.contains("You are running Tor as root") {
        // meshd runs as root and so does its tor (issue 14's service units drop privileges).
        debug!(tor = line, "tor");
        Said::Other
    } else if let Some(at) = line.find("[warn]").or_else(|| line.find("[err]")) {
        warn!(tor = line, "tor");
        Said::Warning(line[at..].to_owned())
    } else {
        debug!(tor = line, "tor");
        Said::Other
    }
}
