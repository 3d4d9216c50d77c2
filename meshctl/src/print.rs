//! What meshctl prints on standard output: JSON with `--json`, else the human tables and lines. The
//! tables' columns are a contract with scripts: new columns go last.

use meshd_core::input::Label;
use std::time::{Duration, UNIX_EPOCH};

use meshd_core::acme::renewal::Status;
use meshd_core::model::{AccessRule, DeviceView, InviteView, NodeView, OnionView, PublicUrl, Role, ServiceView};
use meshd_core::relay::route::TlsMode;
use serde::Serialize;

/// Print `value` as pretty JSON with `--json` (`json`), else what `human` prints.
pub fn print<T: Serialize>(json: bool, value: &T, human: impl FnOnce()) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(value)?);
    } else {
        human();
    }
    Ok(())
}

/// Labels separated by commas, `-` for none.
pub fn join(labels: &[Label]) -> String {
    if labels.is_empty() { "-".into() } else { labels.iter().map(Label::as_str).collect::<Vec<_>>().join(",") }
}

/// A role as its JSON name (`hub`, `node`, `relay`).
pub fn role_name(role: Role) -> String {
    serde_json::to_value(role).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default()
}

/// What LAST HEARD and LAST HANDSHAKE say of a time that is not known: `never` from the daemon, `unknown` when
/// meshctl answered without one (only a running daemon knows).
fn not_heard(offline: bool) -> String {
    if offline { "unknown".into() } else { "never".into() }
}

pub fn print_nodes(nodes: &[NodeView], offline: bool) {
    print!("{}", nodes_table(nodes, offline));
}

/// The node table; STATE and LAST HEARD (when the hub last heard from the node) come last so the
/// columns before them stay where scripts expect them. `offline`: answered without the daemon.
pub fn nodes_table(nodes: &[NodeView], offline: bool) -> String {
    let mut table = format!(
        "{:<20} {:<6} {:<16} {:<28} {:<24} {:<30} LAST HEARD\n",
        "NODE", "ROLE", "ADDRESS", "ADDRESS6", "ENDPOINT", "STATE"
    );
    let now = meshd::host::clock::wall_now();
    for n in nodes {
        let heard = match (n.role, n.last_heard) {
            (Role::Hub, _) => "-".to_owned(),
            (_, Some(t)) => ago(now, t),
            (_, None) => not_heard(offline),
        };
        table.push_str(&format!(
            "{:<20} {:<6} {:<16} {:<28} {:<24} {:<30} {}\n",
            n.name,
            role_name(n.role),
            n.address,
            n.address_v6,
            n.endpoint.as_deref().unwrap_or("-"),
            node_state(n),
            heard
        ));
    }
    table
}

/// `Ns ago` for unix seconds `then`, seen at `now`.
fn ago(now: i64, then: u64) -> String {
    format!("{}s ago", now.saturating_sub(then as i64).max(0))
}

fn node_state(n: &NodeView) -> &'static str {
    match (n.disabled, n.rotate_key) {
        (false, false) => "active",
        (false, true) => "key rotation pending",
        (true, false) => "disabled",
        (true, true) => "disabled, key rotation pending",
    }
}

/// The pending invites with the seconds each has left.
pub fn print_invites(invites: &[InviteView]) {
    println!("{:<20} {:<6} EXPIRES IN", "NAME", "ROLE");
    for i in invites {
        let left = i.expires_at - meshd::host::clock::wall_now();
        println!("{:<20} {:<6} {left} s", i.name, role_name(i.role));
    }
}

pub fn print_rules(rules: &[AccessRule]) {
    if rules.is_empty() {
        println!("no access rules: every node reaches every node");
        return;
    }
    println!("{:<20} TO", "FROM");
    for rule in rules {
        println!("{:<20} {}", rule.from, rule.to);
    }
}

pub fn print_devices(devices: &[DeviceView], offline: bool) {
    println!("{:<20} {:<16} {:<28} {:<24} LAST HANDSHAKE", "DEVICE", "ADDRESS", "ADDRESS6", "ALLOW");
    let now = meshd::host::clock::wall_now();
    for d in devices {
        let seen = d.last_handshake.map_or_else(|| not_heard(offline), |t| ago(now, t));
        println!("{:<20} {:<16} {:<28} {:<24} {}", d.name, d.address, d.address_v6, join(&d.allow), seen);
    }
}

pub fn print_services(services: &[ServiceView]) {
    print!("{}", services_table(services));
}

/// The service table; PROTOCOL comes last so the columns before it stay where scripts expect them.
pub fn services_table(services: &[ServiceView]) -> String {
    let mut table = format!(
        "{:<20} {:<12} {:<22} {:<32} {:<24} {:<24} PROTOCOL\n",
        "SERVICE", "NODE", "MESH ADDRESS", "DNS NAME", "TARGET", "DEVICES"
    );
    for s in services {
        table.push_str(&format!(
            "{:<20} {:<12} {:<22} {:<32} {:<24} {:<24} {}\n",
            s.name,
            s.node,
            s.mesh_address,
            s.dns_name,
            s.target,
            join(&s.devices),
            s.protocol
        ));
    }
    let urls: Vec<(&ServiceView, &PublicUrl)> =
        services.iter().flat_map(|s| s.https.iter().map(move |u| (s, u))).collect();
    if !urls.is_empty() {
        table
            .push_str(&format!("\n{:<40} {:<20} {:<12} {:<12} CERTIFICATE\n", "PUBLIC URL", "SERVICE", "RELAY", "TLS"));
        for (s, u) in urls {
            table.push_str(&format!(
                "{:<40} {:<20} {:<12} {:<12} {}\n",
                u.url,
                s.name,
                u.relay,
                u.tls,
                certificate_text(s, u)
            ));
        }
    }
    let onions: Vec<(&ServiceView, &OnionView)> =
        services.iter().filter_map(|s| s.tor.as_ref().map(|t| (s, t))).collect();
    if !onions.is_empty() {
        table.push_str(&format!("\n{:<76} {:<20} CLIENTS\n", "ONION URL", "SERVICE"));
        for (s, t) in onions {
            let url = match (&t.address, &t.error) {
                (Some(address), _) => crate::commands::onion::onion_url(address, t.port),
                (None, Some(error)) => format!("(cannot serve: {})", clean(error)),
                (None, None) => format!("(port {}; not reported by {})", t.port, s.node),
            };
            let clients = match (t.authorized_only, t.clients.is_empty()) {
                (false, _) => "anyone with the address".to_owned(),
                (true, true) => "none left: not served".to_owned(),
                (true, false) => join(&t.clients),
            };
            table.push_str(&format!("{url:<76} {:<20} {clients}\n", s.name));
        }
    }
    table
}

/// `text` from another host with its control characters replaced, so none reaches the operator's terminal.
pub(crate) fn clean(text: &str) -> String {
    text.chars().map(|c| if c.is_control() { '?' } else { c }).collect()
}

/// A public name's certificate in words: pending, valid until, expired, with the last error.
fn certificate_text(service: &ServiceView, url: &PublicUrl) -> String {
    let date = |secs: u64| humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(secs)).to_string();
    // A member reports these: no control character of its reaches the operator's terminal.
    let error = |e: &Option<String>, retry: &Option<u64>| match (e.as_deref().map(clean), retry) {
        (Some(e), Some(at)) => format!(" (last error: {e}; next try {})", date(*at)),
        (Some(e), None) => format!(" (last error: {e})"),
        (None, _) => String::new(),
    };
    match &url.certificate {
        None => {
            let holder = if url.tls == TlsMode::Terminate { &url.relay } else { &service.node };
            format!("not reported (held by {holder})")
        }
        Some(report) => match &report.status {
            Status::Pending { last_error, retry_at } => format!("pending{}", error(last_error, retry_at)),
            Status::Valid { until, last_error, retry_at } => {
                format!("valid until {}{}", date(*until), error(last_error, retry_at))
            }
            Status::Expired { since, last_error, retry_at } => {
                format!("expired {}{}", date(*since), error(last_error, retry_at))
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use meshd::controller::fixtures::label;

    use super::*;

    #[test]
    fn node_states_and_last_heard_in_the_table() {
        let now = meshd::host::clock::wall_now() as u64;
        let view = |name: &str, disabled, rotate_key, last_heard| NodeView {
            name: label(name),
            public_key: meshd_core::fixtures::public_key(2),
            address: "10.77.0.2".parse().unwrap(),
            address_v6: "fd00::2".parse().unwrap(),
            endpoint: None,
            role: Role::Node,
            dns_name: format!("{name}.home.internal"),
            disabled,
            rotate_key,
            last_heard,
            mtu: 1420,
        };
        let views =
            [view("a", false, false, Some(now - 7)), view("b", true, false, None), view("c", false, true, Some(now))];
        let rows = |table: &str| -> Vec<(String, String)> {
            table
                .lines()
                .skip(1)
                .map(|l| {
                    let (state, heard) = l.split_once(" - ").unwrap().1.trim().split_at(30);
                    (state.trim().to_owned(), heard.trim().to_owned())
                })
                .collect()
        };
        let table = nodes_table(&views, false);
        let expected = [("active", "7s ago"), ("disabled", "never"), ("key rotation pending", "0s ago")];
        assert_eq!(rows(&table), expected.map(|(s, h)| (s.to_owned(), h.to_owned())), "{table}");
        // Without the daemon, when a node was last heard from is not known: not "never".
        let offline = nodes_table(&views, true);
        assert_eq!(rows(&offline)[1], ("disabled".to_owned(), "unknown".to_owned()), "{offline}");
    }
}
