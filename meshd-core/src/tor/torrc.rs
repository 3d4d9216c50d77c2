//! The `torrc` meshd writes for its own `tor` (tor(1), "THE CONFIGURATION FILE FORMAT"), and the versions of
//! tor it can drive, read from `tor --version`.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// Client authorization for version 3 onion services came with tor 0.3.5.7 (its first stable release).
pub const MIN_VERSION: TorVersion = TorVersion([0, 3, 5, 7]);
/// The onion-service proof-of-work defence (`HiddenServicePoWDefensesEnabled`, proposal 327) came with
/// 0.4.8.1-alpha, in builds with `--enable-gpl` (its solver is GPL code).
pub const POW_VERSION: TorVersion = TorVersion([0, 4, 8, 1]);

/// A tor version, `MAJOR.MINOR.MICRO.PATCH`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct TorVersion(pub [u16; 4]);

impl fmt::Display for TorVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d] = self.0;
        write!(f, "{a}.{b}.{c}.{d}")
    }
}

/// What a `tor` binary can do, from the output of `tor --version`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TorBuild {
    /// Its version.
    pub version: TorVersion,
    /// Whether it has the onion-service proof-of-work defence (version and a GPL build).
    pub pow: bool,
}

/// Why a `tor` cannot serve meshd's onion services.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TorBuildError {
    /// The output has no `Tor version X.Y.Z.W` line.
    #[error("it does not say which tor version it is (\"tor --version\" printed {0:?})")]
    Unrecognised(String),
    /// Older than [`MIN_VERSION`].
    #[error("tor {0} is too old: client authorization needs tor {MIN_VERSION} or later")]
    TooOld(TorVersion),
}

impl TorBuild {
    /// Read the output of `tor --version` (`Tor version 0.4.9.11.`, then a line that says whether the build is
    /// covered by the GPL). Errors: [`TorBuildError`].
    pub fn parse(output: &str) -> Result<TorBuild, TorBuildError> {
        let unrecognised = || TorBuildError::Unrecognised(output.lines().next().unwrap_or_default().to_owned());
        let line = output.lines().find_map(|l| l.trim().strip_prefix("Tor version ")).ok_or_else(unrecognised)?;
        let number = line.split(|c: char| !(c.is_ascii_digit() || c == '.')).next().unwrap_or_default();
        let parts: Vec<u16> = number
            .trim_end_matches('.')
            .split('.')
            .map(str::parse)
            .collect::<Result<_, _>>()
            .map_err(|_| unrecognised())?;
        let version = TorVersion(parts.try_into().map_err(|_| unrecognised())?);
        if version < MIN_VERSION {
            return Err(TorBuildError::TooOld(version));
        }
        let gpl = output.contains("GNU General Public License");
        Ok(TorBuild { version, pow: version >= POW_VERSION && gpl })
    }
}

/// One onion service in the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OnionServiceConfig {
    /// Its `HiddenServiceDir` (keys, `hostname`, `authorized_clients/`).
    pub dir: PathBuf,
    /// The port clients connect to at the `.onion` address.
    pub port: u16,
    /// Where tor sends those connections.
    pub target: SocketAddr,
}

/// Everything meshd's `torrc` says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TorConfig {
    /// tor's `DataDirectory` (its state and cached directory documents).
    pub data_dir: PathBuf,
    /// The onion services, in order.
    pub services: Vec<OnionServiceConfig>,
    /// Turn on the proof-of-work defence for every service.
    pub pow: bool,
    /// meshd's process ID: tor exits when that process is gone (`__OwningControllerProcess`), so a killed
    /// meshd leaves no tor holding the data directory's lock.
    pub owner: u32,
    /// Lines appended as they are (`meshd run --tor-config FILE`: bridges, a test network).
    pub extra: String,
}

/// A path that a `torrc` cannot hold.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}: tor's configuration cannot name a path with a line break, a NUL or bytes that are not UTF-8")]
pub struct TorrcError(PathBuf);

impl TorConfig {
    /// The `torrc` text. tor listens on no SOCKS port (it only serves the onion services) and logs to its
    /// standard output, which meshd reads. Errors: a path with a line break.
    pub fn render(&self) -> Result<String, TorrcError> {
        let mut out = String::from(
            "# Written by meshd on every change: edits are lost. Add lines with `meshd run --tor-config FILE`.\n",
        );
        out += &format!("DataDirectory {}\n", quote(&self.data_dir)?);
        out += "SocksPort 0\nLog notice stdout\nRunAsDaemon 0\n";
        out += &format!("__OwningControllerProcess {}\n", self.owner);
        // Before the services: tor reads a `HiddenService...` option as the last `HiddenServiceDir`'s, so a stray
        // one here is refused by tor rather than quietly changing one of meshd's services.
        if !self.extra.is_empty() {
            out += "\n# From --tor-config:\n";
            out += &self.extra;
            if !self.extra.ends_with('\n') {
                out.push('\n');
            }
        }
        out += &services_section(&self.services, self.pow)?;
        Ok(out)
    }
}

/// The onion-service lines of a torrc: for each service, in order, a blank line, its `HiddenServiceDir`, its
/// `HiddenServicePort` and, with `pow`, `HiddenServicePoWDefensesEnabled 1`. The end of meshd's own torrc, and
/// the whole of the file meshd writes for a tor it does not run (`meshd run --tor-external`), which that tor
/// reads through `%include` (tor(1), "THE CONFIGURATION FILE FORMAT"). Errors: a path with a line break.
pub fn services_section(services: &[OnionServiceConfig], pow: bool) -> Result<String, TorrcError> {
    let mut out = String::new();
    for service in services {
        out += &format!("\nHiddenServiceDir {}\n", quote(&service.dir)?);
        out += &format!("HiddenServicePort {} {}\n", service.port, service.target);
        if pow {
            out += "HiddenServicePoWDefensesEnabled 1\n";
        }
    }
    Ok(out)
}

/// A path as a torrc value: quoted, with `\` and `"` escaped (tor(1): values may be quoted C strings).
fn quote(path: &Path) -> Result<String, TorrcError> {
    let text = path.to_str().ok_or_else(|| TorrcError(path.to_path_buf()))?;
    if text.contains(['\n', '\r', '\0']) {
        return Err(TorrcError(path.to_path_buf()));
    }
    Ok(format!("\"{}\"", text.replace('\\', "\\\\").replace('"', "\\\"")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> TorConfig {
        TorConfig {
            data_dir: "/var/lib/meshd/tor/data".into(),
            services: vec![
                OnionServiceConfig {
                    dir: "/var/lib/meshd/tor/onion/btcpay".into(),
                    port: 80,
                    target: "10.77.0.9:23000".parse().unwrap(),
                },
                OnionServiceConfig {
                    dir: "/var/lib/meshd/tor/onion/my \"node\"".into(),
                    port: 50001,
                    target: "[::1]:50001".parse().unwrap(),
                },
            ],
            pow: true,
            owner: 4242,
            extra: "UseBridges 1".into(),
        }
    }

    #[test]
    fn the_torrc_names_each_service_with_its_port_target_and_defence() {
        let text = config().render().unwrap();
        for line in [
            "DataDirectory \"/var/lib/meshd/tor/data\"\n",
            "SocksPort 0\n",
            "__OwningControllerProcess 4242\n",
            "HiddenServiceDir \"/var/lib/meshd/tor/onion/btcpay\"\nHiddenServicePort 80 10.77.0.9:23000\nHiddenServicePoWDefensesEnabled 1\n",
            "HiddenServiceDir \"/var/lib/meshd/tor/onion/my \\\"node\\\"\"\nHiddenServicePort 50001 [::1]:50001\n",
            "# From --tor-config:\nUseBridges 1\n",
        ] {
            assert!(text.contains(line), "{line:?} missing from\n{text}");
        }
        assert!(text.find("UseBridges").unwrap() < text.find("HiddenServiceDir").unwrap(), "{text}");
        let without = TorConfig { pow: false, extra: String::new(), ..config() }.render().unwrap();
        assert!(!without.contains("PoW") && !without.contains("--tor-config:"), "{without}");
        let bad = TorConfig { data_dir: "/tmp/a\nSocksPort 9050".into(), ..config() };
        assert!(bad.render().is_err(), "a line break cannot smuggle an option in");
    }

    #[test]
    fn versions_are_read_from_tor_version_and_old_ones_refused() {
        let debian = "Tor version 0.4.9.11.\nThis build of Tor is covered by the GNU General Public License (https://www.gnu.org/licenses/gpl-3.0.en.html)\nTor is running on Linux";
        assert_eq!(TorBuild::parse(debian), Ok(TorBuild { version: TorVersion([0, 4, 9, 11]), pow: true }));
        let bsd = "Tor version 0.4.8.12 (git-abc).\nTor is running on FreeBSD";
        assert_eq!(TorBuild::parse(bsd), Ok(TorBuild { version: TorVersion([0, 4, 8, 12]), pow: false }));
        let alpha = "Tor version 0.4.7.1-alpha.\nThis build of Tor is covered by the GNU General Public License";
        assert_eq!(TorBuild::parse(alpha).map(|b| b.pow), Ok(false));
        assert_eq!(TorBuild::parse("Tor version 0.3.4.11."), Err(TorBuildError::TooOld(TorVersion([0, 3, 4, 11]))));
        assert!(matches!(TorBuild::parse("Python 3.11.7"), Err(TorBuildError::Unrecognised(_))));
        assert!(matches!(TorBuild::parse("Tor version x."), Err(TorBuildError::Unrecognised(_))));
    }
}
