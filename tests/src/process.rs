//! Processes of a test: where the `meshd` and `meshctl` binaries are, commands run to completion with
//! their output checked, and [`Proc`], a child process killed and reaped on drop.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

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

/// A refused command: exit status 1, and standard error exactly one `error: ` line that contains every
/// one of `mentions`.
pub fn assert_refused(out: &Output, mentions: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{}", describe(out));
    assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {}", describe(out));
    assert!(stderr.starts_with("error: "), "{stderr}");
    for mention in mentions {
        assert!(stderr.contains(mention), "the error should mention {mention:?}: {stderr}");
    }
}

/// A command that failed among its own log lines (a daemon's): exit status 1, and exactly one
/// `error: ` line on standard error, which contains every one of `mentions`.
pub fn assert_error_line(out: &Output, mentions: &[&str]) {
    assert_eq!(out.status.code(), Some(1), "{}", describe(out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error: ")).collect();
    assert_eq!(errors.len(), 1, "one error line: {}", describe(out));
    for mention in mentions {
        assert!(errors[0].contains(mention), "the error should mention {mention:?}: {}", describe(out));
    }
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

/// libfaketime (Debian package `faketime`), the multithreaded build (for tokio), to preload into a product binary
/// with `LD_PRELOAD` and a `FAKETIME` shift. Not the `faketime` wrapper: it would stand between a test and the
/// daemon's PID, and it makes a named semaphore that a wrapper killed before cleaning up leaves in /dev/shm, where a
/// later wrapper of the same PID fails on it (`sem_open: File exists`).
pub fn libfaketime() -> String {
    let found = fs::read_dir("/usr/lib").ok().into_iter().flatten().filter_map(Result::ok).find_map(|arch| {
        let lib = arch.path().join("faketime/libfaketimeMT.so.1");
        lib.exists().then(|| lib.display().to_string())
    });
    found.expect("libfaketime (Debian package faketime)")
}

/// PIDs of the processes whose parent is `parent` and whose command (`comm`) is `name`, from /proc.
pub fn children_named(parent: u32, name: &str) -> Vec<u32> {
    let mut pids = Vec::new();
    for entry in fs::read_dir("/proc").expect("/proc").flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(stat) = fs::read_to_string(entry.path().join("stat")) else { continue };
        // pid (comm) state ppid ...: comm may hold spaces, so split after the last ')'.
        let Some((head, rest)) = stat.rsplit_once(')') else { continue };
        let ppid = rest.split_whitespace().nth(1).and_then(|p| p.parse::<u32>().ok());
        if head.ends_with(&format!("({name}")) && ppid == Some(parent) {
            pids.push(pid);
        }
    }
    pids
}
