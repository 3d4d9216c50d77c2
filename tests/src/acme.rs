//! An ACME certificate authority for the end-to-end tests: [`Pebble`] (Let's Encrypt's test CA, Debian's
//! `/usr/bin/pebble` 2.4.0) in a namespace, and [`Dns`], the `dnsmasq` it resolves the names to validate
//! with.
//!
//! Debian's pebble ships no certificate for its own HTTPS listeners, so [`Pebble::start`] makes a small CA
//! and a certificate for the listen address with rcgen; an ACME client trusts that CA
//! ([`Pebble::listener_ca_pem_path`]). The certificates pebble issues chain to a different root, made anew
//! at every start ([`Pebble::issuing_root_pem`]).

use std::fs;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType, IsCa, KeyPair};

use crate::{Netns, Proc, output, wait_until};

/// Port of pebble's ACME API (`https://IP:14000/dir`).
pub const PEBBLE_ACME_PORT: u16 = 14000;
/// Port of pebble's management API (`https://IP:15000/roots/0`...).
pub const PEBBLE_MANAGEMENT_PORT: u16 = 15000;

/// What pebble logs once for every certificate it issues.
const ISSUED_LINE: &str = "Issued certificate serial ";

/// A running pebble; killed by PID on drop.
pub struct Pebble {
    proc: Proc,
    ns: String,
    ip: IpAddr,
    dir: PathBuf,
}

impl Pebble {
    /// Starts pebble in `ns` on `listen_ip` (ports 14000 and 15000), validating HTTP-01 on `http_port` and
    /// TLS-ALPN-01 on `tls_port` of the names' addresses as resolved by the DNS server `dns`; its
    /// certificates, configuration and log go to `dir`. Returns once the ACME directory answers.
    pub fn start(ns: &Netns, listen_ip: &str, http_port: u16, tls_port: u16, dns: SocketAddr, dir: &Path) -> Pebble {
        let ip: IpAddr = listen_ip.parse().unwrap_or_else(|e| panic!("{listen_ip:?} is not an IP address: {e}"));
        write_listener_certificate(dir, listen_ip);
        let config = serde_json::json!({
            "pebble": {
                "listenAddress": SocketAddr::new(ip, PEBBLE_ACME_PORT).to_string(),
                "managementListenAddress": SocketAddr::new(ip, PEBBLE_MANAGEMENT_PORT).to_string(),
                "certificate": dir.join("listener.pem"),
                "privateKey": dir.join("listener.key"),
                "httpPort": http_port,
                "tlsPort": tls_port,
                "ocspResponderURL": "",
                "externalAccountBindingRequired": false,
            }
        });
        let config_path = dir.join("pebble-config.json");
        fs::write(&config_path, config.to_string()).expect("write pebble's config");

        let mut cmd = ns.command("/usr/bin/pebble");
        cmd.arg("-config").arg(&config_path).arg(format!("-dnsserver={dns}")).arg("-strict=false");
        cmd.env("PEBBLE_VA_NOSLEEP", "1").env("PEBBLE_WFE_NONCEREJECT", "0");
        // A fresh log: `issued_count` counts this run's certificates only, also when `dir` is reused.
        let log = dir.join("pebble.log");
        let _ = fs::remove_file(&log);
        let proc = Proc::spawn_logged(cmd, "pebble", &log);
        let mut pebble = Pebble { proc, ns: ns.name().to_string(), ip, dir: dir.into() };
        let url = pebble.directory_url();
        let up = wait_until(Duration::from_secs(20), || {
            pebble.proc.assert_running("starting");
            pebble.fetch(&url).is_some()
        });
        assert!(up, "pebble's directory {url} did not answer within 20 s; log:\n{}", pebble.proc.log_text());
        pebble
    }

    /// The ACME directory URL, `https://LISTEN_IP:14000/dir`.
    pub fn directory_url(&self) -> String {
        self.url(PEBBLE_ACME_PORT, "/dir")
    }

    /// The CA a client must trust to talk to pebble's ACME and management APIs (PEM file).
    pub fn listener_ca_pem_path(&self) -> PathBuf {
        self.dir.join("listener-ca.pem")
    }

    /// The root that signs the certificates pebble issues (new at every start), as PEM; also written to
    /// [`Pebble::issuing_root_path`].
    pub fn issuing_root_pem(&self) -> String {
        let url = self.url(PEBBLE_MANAGEMENT_PORT, "/roots/0");
        let pem = self.fetch(&url).unwrap_or_else(|| panic!("pebble did not serve its issuing root at {url}"));
        assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"), "{url} answered no PEM certificate: {pem}");
        fs::write(self.issuing_root_path(), &pem).expect("write pebble's issuing root");
        pem
    }

    /// The file [`Pebble::issuing_root_pem`] writes (for `curl --cacert`).
    pub fn issuing_root_path(&self) -> PathBuf {
        self.dir.join("issuing-root.pem")
    }

    /// How many certificates pebble has issued since it started (its "Issued certificate serial" log
    /// lines): equal before and after a client's restart when the client kept its certificate.
    pub fn issued_count(&self) -> usize {
        self.proc.log_text().lines().filter(|line| line.contains(ISSUED_LINE)).count()
    }

    /// Pebble's log so far.
    pub fn log_text(&self) -> String {
        self.proc.log_text()
    }

    fn url(&self, port: u16, path: &str) -> String {
        format!("https://{}{path}", SocketAddr::new(self.ip, port))
    }

    /// GET `url` from inside pebble's namespace, trusting the listener CA; the body, or None.
    fn fetch(&self, url: &str) -> Option<String> {
        let mut curl = Command::new("ip");
        curl.args(["netns", "exec", &self.ns, "curl", "-sf", "--max-time", "2", "--cacert"])
            .arg(self.listener_ca_pem_path())
            .arg(url);
        let out = output(&mut curl);
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

/// Writes `listener-ca.pem` (a fresh CA) and `listener.pem`/`listener.key` (a certificate it signs for
/// `listen_ip` and `localhost`) into `dir`.
fn write_listener_certificate(dir: &Path, listen_ip: &str) {
    let mut ca_params = CertificateParams::default();
    ca_params.distinguished_name.push(DnType::CommonName, "meshd e2e pebble listener CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_key = KeyPair::generate().expect("generate the listener CA key");
    let ca = CertifiedIssuer::self_signed(ca_params, ca_key).expect("self-sign the listener CA");

    let mut params =
        CertificateParams::new([listen_ip.to_string(), "localhost".to_string()]).expect("listener certificate names");
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, "pebble");
    let key = KeyPair::generate().expect("generate the listener key");
    let cert = params.signed_by(&key, &ca).expect("sign the listener certificate");

    fs::write(dir.join("listener-ca.pem"), ca.pem()).expect("write the listener CA");
    fs::write(dir.join("listener.pem"), cert.pem()).expect("write the listener certificate");
    fs::write(dir.join("listener.key"), key.serialize_pem()).expect("write the listener key");
}

/// A DNS server (`dnsmasq`) that answers only the names it was given; killed by PID on drop.
pub struct Dns {
    proc: Proc,
}

impl Dns {
    /// Starts dnsmasq in `ns` on `listen` (UDP and TCP), answering each `(name, ip)` of `names` (a name
    /// may appear once per address family). A name without an IPv6 address answers AAAA with an empty
    /// NOERROR (pebble asks AAAA first and would take a failure for a lookup error); any other name
    /// gets REFUSED, as nothing is forwarded. Its log goes to `dir/dnsmasq.log`.
    pub fn start(ns: &Netns, listen: SocketAddr, names: &[(&str, &str)], dir: &Path) -> Dns {
        let mut cmd = ns.command("/usr/sbin/dnsmasq");
        cmd.args(["--no-daemon", "--conf-file=/dev/null", "--no-resolv", "--no-hosts", "--bind-interfaces"])
            .args(["--log-queries", "--log-facility=-"])
            .arg(format!("--port={}", listen.port()))
            .arg(format!("--listen-address={}", listen.ip()));
        for (name, ip) in names {
            let _: IpAddr = ip.parse().unwrap_or_else(|e| panic!("{ip:?} (for {name}) is not an IP address: {e}"));
            // `--local` makes dnsmasq authoritative for the name: the other record type gets NODATA
            // instead of being forwarded (since dnsmasq 2.86) to no server.
            cmd.arg(format!("--address=/{name}/{ip}")).arg(format!("--local=/{name}/"));
        }
        let proc = Proc::spawn_logged(cmd, "dnsmasq", &dir.join("dnsmasq.log"));
        let mut dns = Dns { proc };
        // dnsmasq binds its sockets before it logs that it started.
        let up = wait_until(Duration::from_secs(10), || {
            dns.proc.assert_running("starting");
            dns.proc.log_text().contains("started, version")
        });
        assert!(up, "dnsmasq on {listen} did not answer within 10 s; log:\n{}", dns.proc.log_text());
        dns
    }

    /// dnsmasq's log so far (one line per query: what pebble asked).
    pub fn log_text(&self) -> String {
        self.proc.log_text()
    }
}
