//! Reading wg-quick text back into a [`DeviceConfig`], line by line, with wg-quick(8)'s leniencies
//! (case-insensitive keys, `#` comments, repeated list keys, bare host addresses) and its strictness
//! about keys: anything this device config does not have is an error naming its line.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use ipnet::IpNet;

use super::{DeviceConfig, Field, HubPeer, RenderError, Section};
use crate::keys::{KeyError, PresharedKey, PrivateKey, PublicKey};

/// Length in bytes of a WireGuard (x25519) key or preshared key.
pub(super) const KEY_LEN: usize = 32;

/// Accumulates a config line by line; lists may span several lines, as wg-quick allows.
#[derive(Default)]
pub(super) struct Parser {
    section: Option<Section>,
    seen_interface: bool,
    seen_peer: bool,
    private_key: Option<PrivateKey>,
    addresses: Vec<IpNet>,
    dns_servers: Vec<IpAddr>,
    dns_search: Vec<String>,
    mtu: Option<u16>,
    public_key: Option<PublicKey>,
    preshared_key: Option<PresharedKey>,
    endpoint: Option<String>,
    allowed_ips: Vec<IpNet>,
    persistent_keepalive: Option<u16>,
}

impl Parser {
    pub(super) fn line(&mut self, line: usize, raw: &str) -> Result<(), RenderError> {
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
            Field::PrivateKey => {
                set_once(&mut self.private_key, parse_key(line, key, value, PrivateKey::from_base64)?, line, key)
            }
            Field::PublicKey => {
                set_once(&mut self.public_key, parse_key(line, key, value, PublicKey::parse)?, line, key)
            }
            Field::PresharedKey => {
                set_once(&mut self.preshared_key, parse_key(line, key, value, PresharedKey::parse)?, line, key)
            }
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

    pub(super) fn finish(self) -> Result<DeviceConfig, RenderError> {
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

fn parse_key<T>(
    line: usize,
    key: Field,
    value: &str,
    make: impl FnOnce(&str) -> Result<T, KeyError>,
) -> Result<T, RenderError> {
    let not_base64 = || RenderError::KeyNotBase64 { line, key: key.name() };
    let bytes = BASE64.decode(value).map_err(|_| not_base64())?;
    if bytes.len() != KEY_LEN {
        return Err(RenderError::KeyWrongLength { line, key: key.name(), len: bytes.len() });
    }
    make(value).map_err(|_| not_base64())
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

#[cfg(test)]
mod tests {
    use super::super::tests::{GOLDEN, config};
    use super::*;
    use crate::handout::tests::net;
    use proptest::prelude::*;

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

    proptest! {

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
}
