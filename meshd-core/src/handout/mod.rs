//! What a roaming device (a phone with the WireGuard app, a laptop with wg-quick) is handed once:
//! its wg-quick config text, and QR codes of that text for a terminal, a PNG and an SVG.
//!
//! - this module: the device's `DNS` choice ([`DeviceDns`]), tunnel names the apps import, and
//!   [`RenderError`], the one error of reading a config or encoding a code;
//! - `wg_quick`: [`DeviceConfig`] as wg-quick text (render, parse, validate);
//! - `qr`: that text as a QR code for a terminal, a PNG or an SVG.

mod qr;
mod wg_quick;

use std::net::IpAddr;

use qrcode::types::QrError;
use sha2::{Digest as _, Sha256};

pub use qr::{TERMINAL_COLUMNS, compact_wg_quick, qr_png, qr_svg, qr_terminal};
pub use wg_quick::{DeviceConfig, HubPeer};

/// Which resolvers a device's config names in its `DNS` line.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum DeviceDns {
    /// The hub's mesh DNS (both its addresses) and the network domain as search domain: the default.
    #[default]
    Hub,
    /// No `DNS` line: for clients that cannot set resolvers (routers, wg-quick without resolvconf).
    Omit,
    /// Exactly these resolvers, and no search domain (other resolvers do not know the mesh names, and
    /// a search domain would send short names to them).
    Servers(Vec<IpAddr>),
}

impl DeviceDns {
    /// Exactly `servers`, each once, in the order given (a resolver named twice is asked once).
    pub fn servers(servers: impl IntoIterator<Item = IpAddr>) -> DeviceDns {
        let mut unique: Vec<IpAddr> = Vec::new();
        for server in servers {
            if !unique.contains(&server) {
                unique.push(server);
            }
        }
        DeviceDns::Servers(unique)
    }

    /// Make `config`'s `DNS` line what this choice says; `config` comes with the hub's resolvers.
    pub fn apply_to(&self, config: &mut DeviceConfig) {
        match self {
            DeviceDns::Hub => {}
            DeviceDns::Omit => {
                config.dns_servers.clear();
                config.dns_search.clear();
            }
            DeviceDns::Servers(servers) => {
                config.dns_servers = servers.clone();
                config.dns_search.clear();
            }
        }
    }
}

/// Longest tunnel name the WireGuard apps (Android's "import from file") and wg-quick accept: the
/// length of a Linux interface name.
pub const TUNNEL_NAME_MAX: usize = 15;

/// Whether the apps import a config file whose name (without `.conf`) is `name` as a tunnel of that
/// name: 1 to 15 characters out of `a-z A-Z 0-9 _ = + . -`.
pub fn is_tunnel_name(name: &str) -> bool {
    (1..=TUNNEL_NAME_MAX).contains(&name.len()) && name.bytes().all(is_tunnel_name_byte)
}

fn is_tunnel_name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"_=+.-".contains(&b)
}

/// A tunnel name for the config file of `device` that the apps accept: the name itself when it is one,
/// else its first (up to 8) characters, `-` and 6 base32 characters (30 bits) of its SHA-256, 15
/// characters at most. The same device always gets the same name; two different names get the same
/// one with a chance of one in a billion, which callers writing several files check for.
pub fn tunnel_name(device: &str) -> String {
    if is_tunnel_name(device) {
        return device.to_owned();
    }
    const BASE32: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";
    let digest = Sha256::digest(device.as_bytes());
    let bits = u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]]);
    let suffix: String = (0..6).map(|i| BASE32[(bits >> (27 - 5 * i)) as usize & 31] as char).collect();
    let keep = TUNNEL_NAME_MAX - 1 - suffix.len();
    let prefix: String =
        device.bytes().map(|b| if is_tunnel_name_byte(b) { b as char } else { '-' }).take(keep).collect();
    let prefix = prefix.trim_end_matches(['-', '.']);
    if prefix.is_empty() { format!("device-{suffix}") } else { format!("{prefix}-{suffix}") }
}

/// What went wrong reading a config or encoding a QR code.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    /// A line that is neither a section header, a `KEY = VALUE` pair, a comment nor blank.
    #[error("line {line}: expected a [Section] header or KEY = VALUE")]
    Syntax {
        /// 1-based line number in the text.
        line: usize,
    },
    /// A section header other than `[Interface]` and `[Peer]`.
    #[error("line {line}: unknown section {header:?}")]
    UnknownSection {
        /// 1-based line number in the text.
        line: usize,
        /// The header as written.
        header: String,
    },
    /// A second `[Interface]` or `[Peer]`: a device config has one of each.
    #[error("line {line}: second {section} section; a device config has one [Interface] and one [Peer]")]
    DuplicateSection {
        /// 1-based line number in the text.
        line: usize,
        /// `[Interface]` or `[Peer]`.
        section: &'static str,
    },
    /// A key before the first section header.
    #[error("line {line}: key {key:?} outside any section")]
    KeyOutsideSection {
        /// 1-based line number in the text.
        line: usize,
        /// The key as written.
        key: String,
    },
    /// A key wg-quick or this device config does not have in that section.
    #[error("line {line}: unknown key {key:?} in {section}")]
    UnknownKey {
        /// 1-based line number in the text.
        line: usize,
        /// The key as written.
        key: String,
        /// `[Interface]` or `[Peer]`.
        section: &'static str,
    },
    /// A single-valued key given a second time.
    #[error("line {line}: {key} given twice")]
    DuplicateKey {
        /// 1-based line number in the text.
        line: usize,
        /// The key as wg-quick spells it, e.g. `PublicKey`.
        key: &'static str,
    },
    /// A value that does not have the form its key needs.
    #[error("line {line}: bad {key} {value:?}: expected {expected}")]
    BadValue {
        /// 1-based line number in the text.
        line: usize,
        /// The key as wg-quick spells it, e.g. `PublicKey`.
        key: &'static str,
        /// The offending value (one item of a list).
        value: String,
        /// What the key takes, in words.
        expected: &'static str,
    },
    /// A key that is not standard base64.
    #[error("line {line}: {key} is not standard base64")]
    KeyNotBase64 {
        /// 1-based line number in the text.
        line: usize,
        /// The key as wg-quick spells it, e.g. `PublicKey`.
        key: &'static str,
    },
    /// A key that decodes, but not to the 32 bytes of a WireGuard key.
    #[error("line {line}: {key} decodes to {len} bytes, a WireGuard key has 32")]
    KeyWrongLength {
        /// 1-based line number in the text.
        line: usize,
        /// The key as wg-quick spells it, e.g. `PublicKey`.
        key: &'static str,
        /// Bytes it decodes to.
        len: usize,
    },
    /// A section that the config must have.
    #[error("missing {section} section")]
    MissingSection {
        /// `[Interface]` or `[Peer]`.
        section: &'static str,
    },
    /// A key that the config must have.
    #[error("missing {key} in {section}")]
    MissingKey {
        /// The key as wg-quick spells it, e.g. `PublicKey`.
        key: &'static str,
        /// `[Interface]` or `[Peer]`.
        section: &'static str,
    },
    /// A config whose fields would be written as text that reads back differently, e.g. a newline
    /// or comma inside a value.
    #[error("config does not survive being written as wg-quick text: reading it back fails: {0}")]
    NotRepresentable(Box<RenderError>),
    /// See [`RenderError::NotRepresentable`]: the text reads back, but to other values.
    #[error("config does not survive being written as wg-quick text: a value holds a comma, space, '#' or line break")]
    ReadsBackDifferently,
    /// More bytes than the largest QR code holds.
    #[error("config too long for a QR code ({len} bytes)")]
    TooLongForQr {
        /// Length of the text, in bytes.
        len: usize,
    },
    /// The terminal QR code would be wider than [`TERMINAL_COLUMNS`]: wrapped, no camera reads it.
    #[error(
        "the config's QR code needs {columns} columns, more than an {TERMINAL_COLUMNS}-column terminal has: write it with --qr-png FILE or --qr-svg FILE instead of --qr"
    )]
    TooWideForTerminal {
        /// Columns the code needs with the standard quiet zone of 4 modules.
        columns: usize,
    },
    /// Any other refusal of the QR encoder.
    #[error("QR encoding failed: {0}")]
    Qr(QrError),
    /// Writing the PNG failed.
    #[error("PNG encoding failed: {0}")]
    Png(#[from] image::ImageError),
}

#[cfg(test)]
mod tests {
    use super::*;
    use ipnet::IpNet;

    use crate::keys::{PresharedKey, PrivateKey, PublicKey};

    pub(super) fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    /// A device config as meshd hands it out: two addresses, the hub's resolvers, MTU and keepalive set.
    pub(super) fn sample() -> DeviceConfig {
        DeviceConfig {
            private_key: PrivateKey::from_base64("yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=").unwrap(),
            addresses: vec![net("10.77.0.3/32"), net("fd12:3456:789a::3/128")],
            dns_servers: vec!["10.77.0.1".parse().unwrap(), "fd12:3456:789a::1".parse().unwrap()],
            dns_search: vec!["home.internal".into()],
            mtu: Some(1420),
            peer: HubPeer {
                public_key: PublicKey::parse("xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=").unwrap(),
                preshared_key: PresharedKey::parse("AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=").unwrap(),
                endpoint: "hub.example.net:51820".into(),
                allowed_ips: vec![net("10.77.0.0/16"), net("fd12:3456:789a::/48"), net("192.168.1.0/24")],
                persistent_keepalive: 25,
            },
        }
    }

    #[test]
    fn device_dns_choices_shape_the_dns_line() {
        let mut omitted = sample();
        DeviceDns::Omit.apply_to(&mut omitted);
        let text = omitted.to_wg_quick();
        assert!(!text.to_ascii_lowercase().contains("dns"), "{text}");
        assert_eq!(DeviceConfig::parse(&text).unwrap(), omitted);
        omitted.validate().unwrap();

        let mut own = sample();
        let servers: Vec<IpAddr> = vec!["192.168.1.1".parse().unwrap(), "2001:db8::53".parse().unwrap()];
        DeviceDns::Servers(servers.clone()).apply_to(&mut own);
        let text = own.to_wg_quick();
        assert!(text.contains("\nDNS = 192.168.1.1, 2001:db8::53\n"), "{text}");
        assert_eq!(DeviceConfig::parse(&text).unwrap().dns_servers, servers);
        own.validate().unwrap();

        let mut hub = sample();
        DeviceDns::Hub.apply_to(&mut hub);
        assert_eq!(hub, sample());
    }

    #[test]
    fn tunnel_names_are_what_the_apps_import() {
        for ok in ["phone", "alice-phone", "a", "exactly-15-char", "A_b=c+d.e-f"] {
            assert!(is_tunnel_name(ok), "{ok}");
            assert_eq!(tunnel_name(ok), ok, "a name the apps take stays as it is");
        }
        for bad in ["", "sixteen-chars-xx", "grandmas-living-room-tablet", "with space", "ümlaut", "a/b"] {
            assert!(!is_tunnel_name(bad), "{bad:?}");
            let short = tunnel_name(bad);
            assert!(is_tunnel_name(&short), "{bad:?} -> {short:?}");
            assert_eq!(tunnel_name(bad), short, "stable");
        }
        let long = tunnel_name("grandmas-living-room-tablet");
        assert!(long.starts_with("grandmas-"), "{long}");
        assert_eq!(long.len(), 15, "{long}");
        assert_eq!(tunnel_name("abcdefg-hijklmnop").len(), 14, "a prefix loses its trailing dash");
        assert_ne!(tunnel_name("grandmas-living-room-tablet"), tunnel_name("grandmas-living-room-tv"));
        // Many long names sharing a prefix stay distinct.
        let names: std::collections::BTreeSet<String> =
            (0..2000).map(|i| tunnel_name(&format!("shared-prefix-device-{i}"))).collect();
        assert_eq!(names.len(), 2000);
    }

    #[test]
    fn a_resolver_named_twice_is_listed_once() {
        let ips: Vec<IpAddr> = ["1.1.1.1", "9.9.9.9", "1.1.1.1"].iter().map(|s| s.parse().unwrap()).collect();
        assert_eq!(DeviceDns::servers(ips.clone()), DeviceDns::Servers(ips[..2].to_vec()));
    }
}
