//! A private Tor network inside one namespace, offline: three directory authorities (keys from
//! `tor-gencert`), three relays, all on loopback with `TestingTorNetwork 1` and fast voting, plus client
//! tors with a SOCKS port. It bootstraps in about 20 s. [`TorNetwork::config_lines`] is what any other tor
//! of the network (the one `meshd` supervises) needs in its torrc.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::{Netns, Proc, next_serial, run_ok, wait_until};

const AUTHORITIES: u16 = 3;
const RELAYS: u16 = 3;
const AUTH_OR_PORT: u16 = 5000;
const AUTH_DIR_PORT: u16 = 7000;
const RELAY_OR_PORT: u16 = 5100;
const CLIENT_SOCKS_PORT: u16 = 9050;

/// Options every tor of a small test network needs: a testing network that votes every 10 s, gives every
/// relay the flags paths need, and counts its loopback relays as distinct.
const TESTING: &str = "TestingTorNetwork 1
PathsNeededToBuildCircuits 0.67
TestingDirAuthVoteExit *
TestingDirAuthVoteHSDir *
TestingDirAuthVoteGuard *
TestingMinExitFlagThreshold 0
V3AuthNIntervalsValid 2
TestingV3AuthInitialVotingInterval 10
TestingV3AuthInitialVoteDelay 2
TestingV3AuthInitialDistDelay 2
V3AuthVotingInterval 10
V3AuthVoteDelay 2
V3AuthDistDelay 2
AssumeReachable 1
ShutdownWaitLength 0
SafeLogging 0
";

/// The running directory authorities and relays; every tor is killed by PID on drop.
pub struct TorNetwork {
    dir: PathBuf,
    config: String,
    tors: Vec<Proc>,
}

/// A client tor of the network: its SOCKS port on loopback and its `ClientOnionAuthDir`.
pub struct TorClient {
    /// Its `ClientOnionAuthDir`, read when it starts.
    pub auth_dir: PathBuf,
    socks: u16,
    log: PathBuf,
    proc: Proc,
}

impl TorNetwork {
    /// Makes the keys and starts the authorities and relays in `ns`, with their files under `dir`.
    pub fn start(ns: &Netns, dir: &Path) -> TorNetwork {
        let mut config = String::from(TESTING);
        let mut torrcs = Vec::new();
        for i in 0..AUTHORITIES {
            let data = private_dir(&dir.join(format!("auth{i}")));
            let keys = private_dir(&data.join("keys"));
            let mut gencert = Command::new("tor-gencert");
            gencert.current_dir(&keys).args(["--create-identity-key", "-m", "12", "-a"]);
            gencert.arg(format!("127.0.0.1:{}", AUTH_DIR_PORT + i)).args(["--passphrase-fd", "0"]);
            gencert.stdin(fs::File::open("/dev/null").expect("/dev/null"));
            let out = gencert.output().expect("tor-gencert (Debian package tor)");
            assert!(out.status.success(), "tor-gencert failed: {}", String::from_utf8_lossy(&out.stderr));
            let cert = fs::read_to_string(keys.join("authority_certificate")).expect("authority certificate");
            let v3ident = cert
                .lines()
                .find_map(|l| l.strip_prefix("fingerprint "))
                .expect("fingerprint line in the authority certificate")
                .trim()
                .to_string();
            let listed = run_ok(
                Command::new("tor")
                    .args(["--list-fingerprint", "--quiet", "--DataDirectory"])
                    .arg(&data)
                    .args(["--ORPort", &(AUTH_OR_PORT + i).to_string()]),
            );
            let fingerprint: String =
                listed.lines().last().expect("tor --list-fingerprint output").split_whitespace().skip(1).collect();
            config.push_str(&format!(
                "DirAuthority auth{i} orport={} no-v2 v3ident={v3ident} 127.0.0.1:{} {fingerprint}\n",
                AUTH_OR_PORT + i,
                AUTH_DIR_PORT + i
            ));
            let own = format!(
                "Nickname auth{i}\nAddress 127.0.0.1\nORPort {}\nDirPort {}\nSocksPort 0\nExitPolicy reject *:*\n\
                 AuthoritativeDirectory 1\nV3AuthoritativeDirectory 1\nContactInfo auth{i}@test.invalid\n",
                AUTH_OR_PORT + i,
                AUTH_DIR_PORT + i
            );
            torrcs.push((format!("auth{i}"), data, own));
        }
        for i in 0..RELAYS {
            let data = private_dir(&dir.join(format!("relay{i}")));
            let own = format!(
                "Nickname relay{i}\nAddress 127.0.0.1\nORPort {}\nSocksPort 0\nExitPolicy reject *:*\n\
                 ContactInfo relay{i}@test.invalid\n",
                RELAY_OR_PORT + i
            );
            torrcs.push((format!("relay{i}"), data, own));
        }
        let mut tors = Vec::new();
        for (name, data, own) in torrcs {
            tors.push(start_tor(ns, &name, &data, &format!("{config}{own}")));
        }
        TorNetwork { dir: dir.to_path_buf(), config, tors }
    }

    /// The torrc lines that make a tor part of this network (for `meshd run --tor-config`).
    pub fn config_lines(&self) -> &str {
        &self.config
    }

    /// Whether every authority and relay is still running.
    pub fn assert_running(&mut self) {
        for tor in &mut self.tors {
            tor.assert_running("the Tor test network runs");
        }
    }

    /// Starts a client tor with a fresh data directory (no cached descriptors) and `auth_private` lines in
    /// its `ClientOnionAuthDir` as `NAME.auth_private` files; returns once it has bootstrapped.
    pub fn client(&mut self, ns: &Netns, auth_private: &[(&str, &str)]) -> TorClient {
        let n = next_serial();
        let data = private_dir(&self.dir.join(format!("client{n}")));
        let auth_dir = private_dir(&data.join("onion-auth"));
        for (name, line) in auth_private {
            let path = auth_dir.join(format!("{name}.auth_private"));
            fs::write(&path, format!("{line}\n")).expect("write an auth_private file");
            fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).expect("chmod auth_private");
        }
        let socks = CLIENT_SOCKS_PORT + n as u16;
        let own = format!("SocksPort 127.0.0.1:{socks}\nClientOnionAuthDir {}\n", auth_dir.display());
        let mut proc = start_tor(ns, &format!("client{n}"), &data, &format!("{}{own}", self.config));
        let log = data.join("notice.log");
        let booted = wait_until(Duration::from_secs(120), || {
            proc.assert_running("bootstrapping");
            fs::read_to_string(&log).is_ok_and(|t| t.contains("Bootstrapped 100%"))
        });
        self.assert_running();
        assert!(booted, "a client tor did not bootstrap within 120 s; its log:\n{}", read(&log));
        TorClient { auth_dir, socks, log, proc }
    }
}

impl TorClient {
    /// GET `url` through this client's SOCKS port (names resolved by tor), giving up after `max_time`; the
    /// body, or None.
    pub fn get(&mut self, ns: &Netns, url: &str, max_time: Duration) -> Option<String> {
        self.proc.assert_running("fetching through it");
        let out = ns.exec(&[
            "curl",
            "-sf",
            "--max-time",
            &max_time.as_secs().to_string(),
            "--socks5-hostname",
            &format!("127.0.0.1:{}", self.socks),
            url,
        ]);
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// GET `url`, retrying for up to `timeout` (a new descriptor or circuit can take a few seconds).
    pub fn get_within(&mut self, ns: &Netns, url: &str, timeout: Duration) -> Option<String> {
        let mut body = None;
        wait_until(timeout, || {
            body = self.get(ns, url, Duration::from_secs(10));
            body.is_some()
        });
        body
    }

    /// Its notice log so far.
    pub fn log_text(&self) -> String {
        read(&self.log)
    }
}

fn start_tor(ns: &Netns, name: &str, data: &Path, torrc: &str) -> Proc {
    let log = data.join("notice.log");
    let torrc = format!("{torrc}DataDirectory {}\nLog notice file {}\nRunAsDaemon 0\n", data.display(), log.display());
    let path = data.join("torrc");
    fs::write(&path, torrc).expect("write a torrc");
    let mut cmd = ns.command("tor");
    cmd.arg("-f").arg(&path).arg("--quiet");
    Proc::spawn_logged(cmd, &format!("tor {name}"), &data.join("stdout.log"))
}

fn private_dir(path: &Path) -> PathBuf {
    fs::create_dir_all(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    fs::set_permissions(path, fs::Permissions::from_mode(0o700)).expect("chmod 0700");
    path.to_path_buf()
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_default()
}
